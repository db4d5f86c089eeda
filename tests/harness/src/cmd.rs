//! Running commands to completion from tests: stdin closed, output captured, and an error that
//! names the command, its exit status and what it printed unless it exits 0.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Runs `cmd` to completion; its stdout (lossily UTF-8), or an error with its stderr unless it
/// exits 0.
pub fn run(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&output(cmd)?).into_owned())
}

/// [`run`] for programs that print bytes: stdout as it came.
pub fn output(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    check(&format!("{cmd:?}"), &out)?;
    Ok(out.stdout)
}

/// An error unless `out` is of a command (`what`) that exited 0; the error holds its status,
/// stderr and stdout.
pub fn check(what: &str, out: &Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            describe_status(&out.status),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

/// Runs `cmd` to completion with its output captured, killing it (and its process group) after
/// `timeout`. The exit status is the caller's to judge.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let desc = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot run {desc}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => Ok(out.with_context(|| format!("running {desc}"))?),
        Err(_) => {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            bail!("{desc} did not finish within {timeout:?} (killed)")
        }
    }
}

/// "exit code 2" / "killed by SIGKILL".
pub fn describe_status(s: &ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(sig) => format!("killed by {sig}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => format!("{s}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn run_returns_stdout_or_an_error_with_stderr() {
        assert_eq!(run(Command::new("echo").arg("hi")).expect("runs"), "hi\n");
        let err =
            run(Command::new("sh").args(["-c", "echo broken >&2; exit 3"])).expect_err("fails");
        let text = format!("{err:#}");
        assert!(
            text.contains("exit code 3") && text.contains("broken"),
            "{text}"
        );
        let err = run(&mut Command::new("shoal-no-such-program")).expect_err("cannot run");
        assert!(format!("{err:#}").contains("cannot run"), "{err:#}");
    }

    #[test]
    fn output_keeps_bytes() {
        let out = output(Command::new("printf").arg("\\377\\000")).expect("runs");
        assert_eq!(out, [0xff, 0]);
    }

    #[test]
    fn children_start_with_no_blocked_signals() {
        // shoal-demo blocks SIGINT/SIGTERM in its own threads; the processes it supervises must
        // still get them.
        std::thread::spawn(|| {
            let mut set = nix::sys::signal::SigSet::empty();
            set.add(Signal::SIGTERM);
            set.add(Signal::SIGINT);
            set.thread_block().expect("blocks");
            let out = output_with_timeout(
                Command::new("sh").args(["-c", "grep SigBlk /proc/self/status"]),
                Duration::from_secs(10),
            )
            .expect("runs");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(text.trim().ends_with("0000000000000000"), "{text}");
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn output_timeout_kills() {
        let start = Instant::now();
        let err = output_with_timeout(Command::new("sleep").arg("100"), Duration::from_millis(300))
            .expect_err("times out");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(format!("{err}").contains("did not finish"));
        let out = output_with_timeout(Command::new("echo").arg("hi"), Duration::from_secs(10))
            .expect("runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    }
}
