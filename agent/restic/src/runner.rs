//! Running one restic child: environment (secrets never on argv), stdout read line by line with a
//! cap, stderr's tail kept for messages, a timeout, and classification of failures into [`Error`].

use std::ffi::OsString;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::Command;

use crate::error::{Error, Result};
use crate::{Repo, Restic};

/// How much of restic's stderr is kept for error messages.
pub(crate) const STDERR_TAIL: usize = 4096;

/// A line read from a child, or the news that it was over the cap (and was skipped).
pub(crate) enum Line<'a> {
    Full(&'a [u8]),
    TooLong,
}

/// One restic invocation.
pub(crate) struct Call {
    pub args: Vec<OsString>,
    /// The longest stdout line accepted; a longer one is an [`Error::Parse`].
    pub max_line: usize,
    /// Extra environment that is not secret (e.g. `RESTIC_PROGRESS_FPS`).
    pub env: Vec<(&'static str, String)>,
}

impl Call {
    pub fn new<I, S>(args: I) -> Call
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Call {
            args: args.into_iter().map(Into::into).collect(),
            max_line: 1 << 20,
            env: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Call {
        self.args.push(arg.into());
        self
    }

    pub fn max_line(mut self, max: usize) -> Call {
        self.max_line = max;
        self
    }

    /// The subcommand and arguments for messages.
    pub fn describe(&self) -> String {
        self.args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// How a child ended.
#[derive(Debug)]
pub(crate) struct Finished {
    pub code: Option<i32>,
    pub stderr_tail: String,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl Restic {
    /// Runs `call` against `repo`, feeding stdout lines to `on_stdout` and stderr lines to
    /// `on_stderr`; returns how restic ended (a non-zero exit is not an error here).
    pub(crate) async fn spawn(
        &self,
        repo: Option<&Repo>,
        call: &Call,
        on_stdout: &mut (dyn FnMut(&[u8]) -> Result<()> + Send),
        on_stderr: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<Finished> {
        let command = call.describe();
        let mut cmd = Command::new(&self.binary);
        for var in [
            "RESTIC_REPOSITORY",
            "RESTIC_REPOSITORY_FILE",
            "RESTIC_PASSWORD",
            "RESTIC_PASSWORD_FILE",
            "RESTIC_PASSWORD_COMMAND",
            "RESTIC_KEY_HINT",
        ] {
            cmd.env_remove(var);
        }
        if let Some(repo) = repo {
            cmd.env("RESTIC_REPOSITORY", &repo.url);
            cmd.env("RESTIC_PASSWORD", &repo.password);
            for (k, v) in &repo.env {
                cmd.env(k, v);
            }
            for option in &repo.options {
                cmd.arg("-o").arg(option);
            }
            if let Some(dir) = &self.cache_dir {
                cmd.arg("--cache-dir").arg(dir);
            }
        }
        for (k, v) in &call.env {
            cmd.env(k, v);
        }
        cmd.args(&call.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        tracing::debug!(command = %command, repo = ?repo.map(Repo::redacted_url), "running restic");
        let mut child = cmd.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound
                || source.kind() == std::io::ErrorKind::PermissionDenied
            {
                Error::NotInstalled {
                    binary: self.binary.clone(),
                    source,
                }
            } else {
                Error::io(format!("starting {:?}", self.binary), source)
            }
        })?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(Error::io(
                "restic's pipes",
                std::io::Error::other("stdout or stderr not captured"),
            ));
        };
        let mut tail = Tail::default();
        let work = async {
            let out = read_lines(stdout, call.max_line, |line| match line {
                Line::Full(l) => on_stdout(l),
                Line::TooLong => Err(Error::Parse {
                    command: command.clone(),
                    detail: format!("an output line longer than {} bytes", call.max_line),
                }),
            });
            let err = read_lines(stderr, 64 * 1024, |line| {
                if let Line::Full(l) = line {
                    tail.push(l);
                    on_stderr(l);
                }
                Ok(())
            });
            tokio::try_join!(out, err)?;
            child
                .wait()
                .await
                .map_err(|e| Error::io("waiting for restic", e))
        };
        let status = match self.timeout {
            Some(after) => match tokio::time::timeout(after, work).await {
                Ok(status) => status?,
                Err(_) => return Err(Error::Timeout { command, after }),
            },
            None => work.await?,
        };
        let finished = Finished {
            code: status.code(),
            stderr_tail: tail.into_string(),
        };
        tracing::debug!(command = %command, code = ?finished.code, "restic finished");
        Ok(finished)
    }

    /// Runs `call`, collecting stdout lines with `on_stdout`; any non-zero exit is classified into
    /// an [`Error`].
    pub(crate) async fn run(
        &self,
        repo: Option<&Repo>,
        call: &Call,
        on_stdout: &mut (dyn FnMut(&[u8]) -> Result<()> + Send),
    ) -> Result<Finished> {
        let finished = self.spawn(repo, call, on_stdout, &mut |_| {}).await?;
        if finished.success() {
            Ok(finished)
        } else {
            Err(classify(repo, call, &finished))
        }
    }

    /// Runs `call` and returns its whole stdout (bounded by `max` bytes).
    pub(crate) async fn output(
        &self,
        repo: Option<&Repo>,
        call: &Call,
        max: usize,
    ) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let command = call.describe();
        self.run(repo, call, &mut |line| {
            if out.len() + line.len() + 1 > max {
                return Err(Error::Parse {
                    command: command.clone(),
                    detail: format!("output longer than {max} bytes"),
                });
            }
            out.extend_from_slice(line);
            out.push(b'\n');
            Ok(())
        })
        .await?;
        Ok(out)
    }
}

/// The error for a failed run, from restic's words on stderr.
pub(crate) fn classify(repo: Option<&Repo>, call: &Call, finished: &Finished) -> Error {
    let url = repo.map(Repo::redacted_url).unwrap_or_default();
    let stderr = &finished.stderr_tail;
    let detail = || fatal_line(stderr);
    if stderr.contains("wrong password or no key found") {
        return Error::WrongPassword { url };
    }
    if let Some(at) = stderr.find("repository is already locked") {
        let detail = stderr[at..].lines().take(2).collect::<Vec<_>>().join("; ");
        return Error::Locked { url, detail };
    }
    let lower = stderr.to_ascii_lowercase();
    if lower.contains("unable to open config file") {
        let missing = [
            "no such file or directory",
            "does not exist",
            "not found",
            "nosuchkey",
            "nosuchbucket",
            "404",
        ]
        .iter()
        .any(|m| lower.contains(m));
        if missing {
            return Error::RepositoryMissing {
                url,
                detail: detail(),
            };
        }
        return Error::Unreachable {
            url,
            detail: detail(),
        };
    }
    let unreachable = [
        "unable to open repository",
        "connection refused",
        "no such host",
        "i/o timeout",
        "network is unreachable",
        "unable to start the sftp session",
        "ssh command exited",
    ]
    .iter()
    .any(|m| lower.contains(m));
    if unreachable {
        return Error::Unreachable {
            url,
            detail: detail(),
        };
    }
    Error::Failed {
        command: call.describe(),
        code: finished.code,
        stderr_tail: stderr.clone(),
    }
}

/// The `Fatal:` line of restic's stderr, or its last line.
fn fatal_line(stderr: &str) -> String {
    stderr
        .lines()
        .find(|l| l.starts_with("Fatal:"))
        .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or_default()
        .trim_start_matches("Fatal: ")
        .to_string()
}

/// The last [`STDERR_TAIL`] bytes of a stream of lines.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, line: &[u8]) {
        self.0.extend_from_slice(line);
        self.0.push(b'\n');
        if self.0.len() > 2 * STDERR_TAIL {
            let cut = self.0.len() - STDERR_TAIL;
            self.0.drain(..cut);
        }
    }

    fn into_string(mut self) -> String {
        if self.0.len() > STDERR_TAIL {
            let cut = self.0.len() - STDERR_TAIL;
            self.0.drain(..cut);
        }
        String::from_utf8_lossy(&self.0).trim_end().to_string()
    }
}

/// Reads `r` line by line (without the newline), handing each to `f`; a line longer than `max`
/// is handed over as [`Line::TooLong`] and skipped, never buffered whole.
pub(crate) async fn read_lines<R: AsyncRead + Unpin>(
    r: R,
    max: usize,
    mut f: impl FnMut(Line<'_>) -> Result<()>,
) -> Result<()> {
    let mut reader = BufReader::with_capacity(64 * 1024, r);
    let mut buf = Vec::new();
    let io = |e| Error::io("reading restic's output", e);
    loop {
        buf.clear();
        let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
        let n = (&mut reader)
            .take(limit)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(io)?;
        if n == 0 {
            return Ok(());
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            f(Line::Full(&buf))?;
        } else if buf.len() > max {
            f(Line::TooLong)?;
            // Skip the rest of the line.
            loop {
                let avail = reader.fill_buf().await.map_err(io)?;
                if avail.is_empty() {
                    return Ok(());
                }
                match avail.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        reader.consume(i + 1);
                        break;
                    }
                    None => {
                        let len = avail.len();
                        reader.consume(len);
                    }
                }
            }
        } else {
            // The last line, without a newline.
            f(Line::Full(&buf))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<String> {
        let mut got = Vec::new();
        read_lines(input, max, |l| {
            got.push(match l {
                Line::Full(l) => String::from_utf8_lossy(l).into_owned(),
                Line::TooLong => "<too long>".into(),
            });
            Ok(())
        })
        .await
        .expect("read");
        got
    }

    #[tokio::test]
    async fn long_lines_are_skipped_not_buffered() {
        let mut input = b"one\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend(b"\ntwo\nlast");
        assert_eq!(
            lines(&input, 10).await,
            ["one", "<too long>", "two", "last"]
        );
        assert_eq!(lines(b"0123456789\n", 10).await, ["0123456789"]);
        assert_eq!(lines(b"0123456789a", 10).await, ["<too long>"]);
    }

    fn finished(stderr: &str) -> Finished {
        Finished {
            code: Some(1),
            stderr_tail: stderr.into(),
        }
    }

    #[test]
    fn classifies_restic_0_14_messages() {
        let repo = Repo::new("/tmp/r", "pw");
        let call = Call::new(["snapshots"]);
        let c = |s: &str| classify(Some(&repo), &call, &finished(s));
        assert!(matches!(
            c("Fatal: unable to open config file: stat /tmp/r/config: no such file or directory\n\
               Is there a repository at the following location?\n/tmp/r"),
            Error::RepositoryMissing { .. }
        ));
        assert!(matches!(
            c("Fatal: wrong password or no key found"),
            Error::WrongPassword { .. }
        ));
        assert!(matches!(
            c("Fatal: unable to open config file: client.Head: Head \"http://127.0.0.1:1/x/config\": \
               dial tcp 127.0.0.1:1: connect: connection refused\n\
               Is there a repository at the following location?\nrest:http://127.0.0.1:1/x/"),
            Error::Unreachable { .. }
        ));
        assert!(matches!(
            c("Fatal: unable to open repository at sftp:nobody@127.0.0.1:/x: unable to start the \
               sftp session, error: EOF"),
            Error::Unreachable { .. }
        ));
        match c(
            "unable to create lock in backend: repository is already locked exclusively by \
                 PID 2604 on vm by root (UID 0, GID 0)\nlock was created at 2026-12-07 04:56:13 \
                 (1.5s ago)\nstorage ID 62e2e7ca",
        ) {
            Error::Locked { detail, .. } => assert!(detail.contains("PID 2604"), "{detail}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(c("Fatal: something else"), Error::Failed { .. }));
    }

    #[test]
    fn the_tail_keeps_the_end() {
        let mut tail = Tail::default();
        for i in 0..10_000 {
            tail.push(format!("line {i}").as_bytes());
        }
        let s = tail.into_string();
        assert!(s.len() <= STDERR_TAIL);
        assert!(s.ends_with("line 9999"), "{s}");
    }
}
