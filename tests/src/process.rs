//! A supervisor for the processes of a host test: each runs (optionally) inside a network namespace
//! and a UTS namespace of its own, with stdout and stderr appended to one log file, and is killed
//! on `Drop`.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

// The command runners live in shoal-testkit; re-exported for the supervisor's callers.
pub use shoal_testkit::cmd::{describe_status, output_with_timeout};

/// How much of the end of a log [`Proc::log_tail`] and [`dump_logs`] show.
pub const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// What to run and where; [`ProcSpec::spawn`] starts it.
#[derive(Debug, Clone)]
pub struct ProcSpec {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    netns: Option<String>,
    hostname: Option<String>,
    log_dir: PathBuf,
}

impl ProcSpec {
    /// `program` under the name `name` (which names its log file, `<log_dir>/<name>.log`).
    pub fn new(name: &str, program: impl Into<PathBuf>, log_dir: impl Into<PathBuf>) -> Self {
        ProcSpec {
            name: name.to_string(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            netns: None,
            hostname: None,
            log_dir: log_dir.into(),
        }
    }

    /// Appends an argument.
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable (on top of the inherited environment).
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.env
            .push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }

    /// Runs inside network namespace `ns` (`ip netns exec`).
    pub fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_string());
        self
    }

    /// Runs in a UTS namespace of its own with this hostname, so hosts sharing one kernel look
    /// distinct.
    pub fn hostname(mut self, h: &str) -> Self {
        self.hostname = Some(h.to_string());
        self
    }

    /// Starts the process.
    pub fn spawn(self) -> Result<Proc> {
        let log_path = self.log_dir.join(format!("{}.log", self.name));
        let mut p = Proc {
            spec: self,
            log_path,
            child: None,
            last_status: None,
            starts: 0,
        };
        p.start()?;
        Ok(p)
    }

    /// The command line, as run: `ip netns exec NS unshare --uts sh -c … HOSTNAME program args…`.
    fn command(&self) -> Command {
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(ns) = &self.netns {
            argv.extend(["ip", "netns", "exec", ns.as_str()].map(OsString::from));
        }
        if let Some(h) = &self.hostname {
            // unshare and sh both exec, so the pid we hold is the program's own and signals reach
            // it.
            argv.extend(
                [
                    "unshare",
                    "--uts",
                    "--",
                    "sh",
                    "-c",
                    r#"echo "$0" > /proc/sys/kernel/hostname && exec "$@""#,
                    h,
                ]
                .map(OsString::from),
            );
        }
        argv.push(self.program.clone().into_os_string());
        argv.extend(self.args.iter().cloned());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// A supervised process. `Drop` SIGKILLs it.
#[derive(Debug)]
pub struct Proc {
    spec: ProcSpec,
    log_path: PathBuf,
    child: Option<Child>,
    last_status: Option<ExitStatus>,
    starts: u32,
}

impl Proc {
    fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.spec.name);
        }
        std::fs::create_dir_all(&self.spec.log_dir)
            .with_context(|| format!("cannot create {}", self.spec.log_dir.display()))?;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("cannot open {}", self.log_path.display()))?;
        self.starts += 1;
        let mut cmd = self.spec.command();
        writeln!(
            log,
            "==== [shoal-tests] start #{} of {}: {:?}",
            self.starts, self.spec.name, cmd
        )?;
        let err = log.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            // Its own process group: a Ctrl-C at the terminal reaches the harness, which then tears
            // down in order.
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}: {cmd:?}", self.spec.name))?;
        self.child = Some(child);
        self.last_status = None;
        Ok(())
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Where its output goes.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Its pid while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How many times it was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// Whether it has exited, without blocking: `Some(status)` once it has.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(child) = &mut self.child {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                self.last_status = Some(status);
            }
        }
        Ok(self.last_status)
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_status(), Ok(None)) && self.child.is_some()
    }

    /// An error unless it is running (with the exit status and the end of its log).
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.try_status()? {
            None if self.child.is_some() => Ok(()),
            status => Err(anyhow!(
                "{} is not running (exit: {}); end of its log:\n{}",
                self.spec.name,
                status
                    .map(|s| describe_status(&s))
                    .unwrap_or_else(|| "never started".into()),
                self.log_tail(4096)
            )),
        }
    }

    /// Waits (≤ `timeout`) for it to exit by itself; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!("{} still running after {timeout:?}", self.spec.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL and reap (a no-op returning the old status if it already exited).
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(mut child) = self.child.take() {
            if child.try_wait()?.is_none() {
                child
                    .kill()
                    .with_context(|| format!("cannot kill {}", self.spec.name))?;
            }
            self.last_status = Some(child.wait()?);
        }
        self.last_status
            .ok_or_else(|| anyhow!("{} was never started", self.spec.name))
    }

    /// Sends `sig` to it.
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("{} is not running", self.spec.name))?;
        let pid = i32::try_from(pid).context("pid out of range")?;
        kill(Pid::from_raw(pid), sig)
            .with_context(|| format!("cannot send {sig} to {}", self.spec.name))
    }

    /// SIGTERM, then wait up to `grace` for it to exit, then SIGKILL. Its exit status.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if self.try_status()?.is_none() && self.child.is_some() {
            self.signal(Signal::SIGTERM)?;
            if let Ok(s) = self.wait_exit(grace) {
                return Ok(s);
            }
        }
        self.kill()
    }

    /// Starts it again with the same command line, killing it first if it still runs. The log is
    /// appended to.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.kill()?;
        }
        self.start()
    }

    /// Like [`Proc::restart`], with `args` appended to its command line first (kept for later
    /// restarts), e.g. a controller restarted with a test hook turned on.
    pub fn restart_with_args<I, S>(&mut self, args: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        if self.child.is_some() {
            self.kill()?;
        }
        self.spec
            .args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self.start()
    }

    /// Replaces the value after `flag` in the arguments of the next (re)start (appends both if
    /// absent).
    pub fn set_arg(&mut self, flag: &str, value: &str) {
        let args = &mut self.spec.args;
        match args.iter().position(|a| a == flag) {
            Some(i) if i + 1 < args.len() => args[i + 1] = value.into(),
            _ => args.extend([flag.into(), value.into()]),
        }
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The log since the latest start.
    pub fn log_since_start(&self) -> String {
        let log = self.log();
        let marker = format!("==== [shoal-tests] start #{} of", self.starts);
        match log.rfind(&marker) {
            Some(i) => log[i..].to_string(),
            None => log,
        }
    }

    /// The last `max_bytes` of the log.
    pub fn log_tail(&self, max_bytes: u64) -> String {
        tail(&self.log_path, max_bytes)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// The last `max_bytes` of a file (lossy UTF-8), or a note that it could not be read.
pub fn tail(path: &Path, max_bytes: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        let start = len.saturating_sub(max_bytes);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        let mut text = String::from_utf8_lossy(&buf).into_owned();
        if start > 0 {
            text = format!("[… {start} earlier bytes omitted …]\n{text}");
        }
        Ok(text)
    };
    read().unwrap_or_else(|e| format!("[cannot read {}: {e}]", path.display()))
}

/// Prints, to stderr, the end of each log in `logs` (name, path).
pub fn dump_logs<'a>(logs: impl IntoIterator<Item = (&'a str, &'a Path)>) {
    for (name, path) in logs {
        eprintln!("\n===== log of {name} ({}) =====", path.display());
        eprintln!("{}", tail(path, LOG_TAIL_BYTES));
        eprintln!("===== end of log of {name} =====");
    }
}

/// Prints the logs it watches when dropped during a panic: keep one alive for the length of a test
/// that runs its own [`Proc`]s (a [`crate::Fleet`] does this by itself).
#[derive(Debug, Default)]
pub struct PanicLogs {
    logs: Vec<(String, PathBuf)>,
}

impl PanicLogs {
    /// Watches nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `p`'s log.
    pub fn watch(&mut self, p: &Proc) {
        self.watch_file(p.name(), p.log_path());
    }

    /// Adds any file.
    pub fn watch_file(&mut self, name: &str, path: &Path) {
        self.logs.push((name.to_string(), path.to_path_buf()));
    }
}

impl Drop for PanicLogs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            dump_logs(self.logs.iter().map(|(n, p)| (n.as_str(), p.as_path())));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn supervises_a_local_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = ProcSpec::new("sh", "sh", dir.path())
            .args(["-c", "echo hello $GREETING; exec sleep 1000"])
            .env("GREETING", "world")
            .spawn()
            .expect("spawns");
        crate::wait::eventually(Duration::from_secs(10), "greeting in log", || {
            anyhow::ensure!(p.log().contains("hello world"), "log: {}", p.log());
            Ok(())
        })
        .expect("greets");
        assert!(p.is_running());
        let s = p.kill().expect("kills");
        assert_eq!(s.signal(), Some(9));
        assert_eq!(describe_status(&s), "killed by SIGKILL");
        assert!(!p.is_running());
        p.restart().expect("restarts");
        assert_eq!(p.starts(), 2);
        crate::wait::eventually(Duration::from_secs(10), "second greeting", || {
            anyhow::ensure!(p.log_since_start().contains("hello world"));
            Ok(())
        })
        .expect("greets again");
        assert_eq!(p.log().matches("hello world").count(), 2);
        let s = p.stop(Duration::from_secs(5)).expect("stops");
        assert_eq!(
            s.signal(),
            Some(15),
            "SIGTERM ended it: {}",
            describe_status(&s)
        );
    }

    #[test]
    fn reports_exit_codes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = ProcSpec::new("exit3", "sh", dir.path())
            .args(["-c", "exit 3"])
            .spawn()
            .expect("spawns");
        let s = p.wait_exit(Duration::from_secs(10)).expect("exits");
        assert_eq!(s.code(), Some(3));
        assert!(p.ensure_running().is_err());
    }
}
