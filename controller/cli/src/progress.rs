//! Progress of long operations on stderr: uploads of images and releases, drive preparation,
//! `--wait`. Only when stderr is a terminal: in a pipe, a log or a test, nothing is written, so
//! stderr carries only errors there. One status line, rewritten in place (`\r`, erase to end of
//! line) and erased when done — hand-rolled, since that is all it takes.

use std::{
    io::{IsTerminal, Write},
    sync::mpsc::{self, RecvTimeoutError},
    time::{Duration, Instant},
};

use shoal_api::{AdminClient, AdminClientError};

use crate::{bytes_text, printable::printable};

/// How often a status line may be redrawn.
const REDRAW: Duration = Duration::from_millis(100);

/// A one-line status on stderr, drawn only when stderr is a terminal.
#[derive(Debug)]
pub struct StatusLine {
    on: bool,
    drawn: bool,
    last: Option<Instant>,
}

impl StatusLine {
    /// A status line; silent unless stderr is a terminal.
    pub fn new() -> StatusLine {
        StatusLine {
            on: std::io::stderr().is_terminal(),
            drawn: false,
            last: None,
        }
    }

    /// Shows `text` in place of the line (at most every 100 ms).
    pub fn set(&mut self, text: &str) {
        if !self.on || self.last.is_some_and(|t| t.elapsed() < REDRAW) {
            return;
        }
        self.last = Some(Instant::now());
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{}\x1b[K", printable(text));
        let _ = err.flush();
        self.drawn = true;
    }

    /// Erases the line.
    pub fn clear(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
            self.drawn = false;
        }
    }
}

impl Drop for StatusLine {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Uploads `bytes` to `path`, showing `uploading NAME: 12.0 MiB of 27.1 MiB (44%)`.
pub fn upload(
    client: &AdminClient,
    path: &str,
    name: &str,
    bytes: &[u8],
) -> Result<(), AdminClientError> {
    let mut line = StatusLine::new();
    let total = bytes.len() as u64;
    let result = client.upload_reporting(path, bytes, &mut |sent| {
        line.set(&format!(
            "uploading {name}: {} of {} ({}%)",
            bytes_text(sent),
            bytes_text(total),
            (sent * 100).checked_div(total).unwrap_or(100)
        ))
    });
    line.clear();
    result
}

/// Runs `f` (a blocking wait on the controller) while a line says `WHAT: 35s`, each second.
pub fn ticking<T>(what: &str, f: impl FnOnce() -> T) -> T {
    if !std::io::stderr().is_terminal() {
        return f();
    }
    let started = Instant::now();
    std::thread::scope(|s| {
        let (done, ticks) = mpsc::channel::<()>();
        s.spawn(move || {
            let mut line = StatusLine::new();
            loop {
                line.set(&format!("{what}: {}s", started.elapsed().as_secs()));
                if !matches!(
                    ticks.recv_timeout(Duration::from_secs(1)),
                    Err(RecvTimeoutError::Timeout)
                ) {
                    break;
                }
            }
        });
        let result = f();
        drop(done);
        result
    })
}
