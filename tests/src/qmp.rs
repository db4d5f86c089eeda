//! A small QMP (QEMU Machine Protocol) client for host tests: hot-plugging drives into running VMs.
//!
//! QMP is line-delimited JSON over a unix socket (`-qmp unix:PATH,server,nowait`). The server
//! greets with `{"QMP": …}`, accepts only `qmp_capabilities` until that is negotiated, then answers
//! each `{"execute": CMD, "arguments": ARGS, "id": ID}` with `{"return": …, "id": ID}` or
//! `{"error": {"class": …, "desc": …}, "id": ID}`. Asynchronous events (`{"event": …}`) may arrive
//! at any time; [`Qmp::execute`] sets them aside ([`Qmp::events`]) while it waits for its answer.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::wait::eventually;

/// How long one command may take to be answered.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A negotiated QMP connection.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, retrying until `timeout` (qemu creates it shortly
    /// after it starts), reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let stream = eventually(
            timeout,
            &format!("the QMP socket {}", path.display()),
            || {
                UnixStream::connect(path)
                    .with_context(|| format!("connecting to {}", path.display()))
            },
        )?;
        stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        stream.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            next_id: 1,
            events: Vec::new(),
        };
        let greeting = qmp.read_message().context("reading the QMP greeting")?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", Value::Null)
            .context("negotiating QMP capabilities")?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` (`Value::Null` for none); its `return` value, or an error
    /// with QMP's error class and description.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&request)?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .with_context(|| format!("sending QMP {command}"))?;
        loop {
            let msg = self
                .read_message()
                .with_context(|| format!("waiting for the answer to QMP {command}"))?;
            if msg.get("event").is_some() {
                self.events.push(msg);
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                // An answer to something else (none are pipelined here): not ours.
                continue;
            }
            if let Some(err) = msg.get("error") {
                bail!(
                    "QMP {command} {request}: {}: {}",
                    err["class"].as_str().unwrap_or("?"),
                    err["desc"].as_str().unwrap_or("?")
                );
            }
            return msg
                .get("return")
                .cloned()
                .ok_or_else(|| anyhow!("QMP {command}: answer without return: {msg}"));
        }
    }

    /// The asynchronous events received so far (e.g. `DEVICE_DELETED`), oldest first.
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        if n == 0 {
            bail!("QMP connection closed (did qemu exit?)");
        }
        serde_json::from_str(line.trim())
            .with_context(|| format!("QMP sent something that is not JSON: {line:?}"))
    }
}
