//! Deadline-bounded waits for blocking tests (host tests, unit tests). Every timeout in a test is
//! a deadline for one of these, never a bare sleep. Async tests use `wait_async`.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Error, Result};

/// How often [`eventually`] and [`consistently`] re-evaluate their condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(150);

/// An error that makes [`eventually`] give up at once instead of retrying until the deadline, e.g.
/// "the controller process exited" while waiting for it to answer. Build one with [`abort`].
#[derive(Debug)]
pub struct Abort(pub String);

impl fmt::Display for Abort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Abort {}

/// An error that stops an [`eventually`] wait immediately.
pub fn abort(msg: impl Into<String>) -> Error {
    Error::new(Abort(msg.into()))
}

fn is_abort(e: &Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<Abort>().is_some())
}

/// Polls `f` every [`POLL_INTERVAL`] until it returns `Ok`, for at most `timeout`. On timeout the
/// error says what was awaited (`desc`), for how long, how many attempts were made, and the last
/// error `f` returned. An error built with [`abort`] ends the wait at once.
pub fn eventually<T>(timeout: Duration, desc: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let err = match f() {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if is_abort(&err) {
            return Err(err.context(format!(
                "gave up waiting for {desc} after {:.1?} ({attempts} attempts)",
                start.elapsed()
            )));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(err.context(format!(
                "timed out after {:.1?} ({attempts} attempts) waiting for {desc}",
                start.elapsed()
            )));
        }
        std::thread::sleep(POLL_INTERVAL.min(deadline - now));
    }
}

/// Checks that `f` keeps returning `Ok` for the whole of `duration` (polled every
/// [`POLL_INTERVAL`], at least twice). Use it to assert that something does *not* happen, e.g. a
/// removed node does not come back.
pub fn consistently(
    duration: Duration,
    desc: &str,
    mut f: impl FnMut() -> Result<()>,
) -> Result<()> {
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        if let Err(e) = f() {
            return Err(e.context(format!(
                "expected {desc} to hold for {duration:?}, but it failed after {:.1?} (check {attempts})",
                start.elapsed()
            )));
        }
        if start.elapsed() >= duration && attempts >= 2 {
            return Ok(());
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// `eventually!(timeout, || expr)` is [`eventually`] with the closure's source text as its
/// description; `eventually!(timeout, "desc", || expr)` names it explicitly.
#[macro_export]
macro_rules! eventually {
    ($timeout:expr, $desc:expr, $f:expr $(,)?) => {
        $crate::wait::eventually($timeout, $desc, $f)
    };
    ($timeout:expr, $f:expr $(,)?) => {
        $crate::wait::eventually($timeout, stringify!($f), $f)
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;

    #[test]
    fn eventually_returns_first_success() {
        let mut n = 0;
        let v = eventually(Duration::from_secs(5), "third try", || {
            n += 1;
            if n < 3 {
                bail!("not yet ({n})")
            }
            Ok(n)
        })
        .expect("succeeds");
        assert_eq!(v, 3);
    }

    #[test]
    fn eventually_times_out_with_last_error_and_description() {
        let start = Instant::now();
        let err = eventually(
            Duration::from_millis(400),
            "the impossible",
            || -> Result<()> { bail!("still impossible") },
        )
        .expect_err("times out");
        assert!(start.elapsed() >= Duration::from_millis(400));
        assert!(start.elapsed() < Duration::from_secs(3));
        let text = format!("{err:#}");
        assert!(text.contains("the impossible"), "{text}");
        assert!(text.contains("still impossible"), "{text}");
    }

    #[test]
    fn abort_stops_waiting_at_once() {
        let start = Instant::now();
        let err = eventually(
            Duration::from_secs(30),
            "a dead process",
            || -> Result<()> { Err(abort("process exited with code 1")) },
        )
        .expect_err("aborts");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(format!("{err:#}").contains("process exited"));
    }

    #[test]
    fn macro_uses_closure_text_as_description() {
        let err = crate::eventually!(Duration::from_millis(200), || -> Result<()> {
            bail!("nope")
        })
        .expect_err("times out");
        assert!(format!("{err:#}").contains("bail"), "{err:#}");
    }

    #[test]
    fn consistently_detects_a_violation() {
        let mut n = 0;
        let err = consistently(Duration::from_secs(5), "n stays small", || {
            n += 1;
            if n > 2 {
                bail!("n = {n}")
            }
            Ok(())
        })
        .expect_err("violated");
        assert!(format!("{err:#}").contains("n = 3"));
        consistently(Duration::from_millis(300), "true", || Ok(())).expect("holds");
    }
}
