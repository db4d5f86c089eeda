//! Where the agent's executable lives when a package manager owns the installed one.
//!
//! dpkg owns `/usr/bin/shoal-agent` and replaces it on upgrades; self-update must not write there
//! (dpkg would silently undo it at the next upgrade, `debsums` would flag it, and the unit's
//! `ProtectSystem=strict` keeps `/usr` read-only anyway). With `--exe PATH` (the package's unit
//! passes `/var/lib/shoal-agent/bin/shoal-agent`) the agent runs from a copy it owns: the packaged
//! binary starts, compares itself with the copy ([`decide`]), puts itself there when the copy is
//! missing, broken or not newer than the package (so a package upgrade or reinstall takes effect),
//! and re-executes the copy. Self-updates and roll-backs ([`crate::updater`]) replace only the
//! copy and its `.prev`, both under the state dir.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::updater::{self, UpdatePaths};

/// How long the copy may take to print its version.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// What the start does with the managed copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// This process is the copy: carry on.
    Carry,
    /// Re-execute the copy as it is (it is newer than the package: a self-update).
    Run,
    /// Put the packaged binary there first (the copy is missing, broken, older, or the same
    /// version built differently), then re-execute it.
    Place,
}

/// What is known about the managed copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// Byte for byte the running (packaged) binary.
    pub same_bytes: bool,
    /// The version it prints (`--version`); `None` when it does not run or answers nonsense.
    pub version: Option<String>,
}

/// The decision: the copy runs when it is the package's bytes or a newer version than the package
/// (semver precedence, as the updater orders versions); the package wins otherwise. A copy whose
/// version cannot be ordered against the package's is a self-update to a release name, and runs.
pub fn decide(packaged: &str, copy: Option<&Copy>) -> Launch {
    match copy {
        None => Launch::Place,
        Some(c) if c.same_bytes => Launch::Run,
        Some(Copy { version: None, .. }) => Launch::Place,
        Some(Copy {
            version: Some(v), ..
        }) => {
            if crate::update::is_downgrade(v, packaged) {
                Launch::Run
            } else {
                Launch::Place
            }
        }
    }
}

/// Why the managed copy could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// At start, before anything else: makes sure `managed` is the executable that runs. Returns when
/// this process is it ([`Launch::Carry`]); otherwise places the packaged binary when needed and
/// re-executes `managed` with the same arguments, returning only if that failed.
pub fn ensure(managed: &Path, state_dir: &Path, version: &str) -> Result<(), LaunchError> {
    let running = std::env::current_exe().map_err(|source| LaunchError::Io {
        what: "finding",
        path: "/proc/self/exe".into(),
        source,
    })?;
    match prepare(&running, version, managed, state_dir)? {
        Launch::Carry => Ok(()),
        Launch::Run | Launch::Place => {
            let e = updater::reexec(managed);
            Err(LaunchError::Io {
                what: "executing",
                path: managed.to_owned(),
                source: e,
            })
        }
    }
}

/// [`ensure`] without the re-execution: decides and places; what it did.
pub fn prepare(
    running: &Path,
    version: &str,
    managed: &Path,
    state_dir: &Path,
) -> Result<Launch, LaunchError> {
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| LaunchError::Io { what, path, source }
    };
    let running = running.canonicalize().map_err(io("resolving", running))?;
    if managed.canonicalize().is_ok_and(|m| m == running) {
        return Ok(Launch::Carry);
    }
    let copy = match std::fs::read(managed) {
        Ok(bytes) => Some(Copy {
            same_bytes: std::fs::read(&running).map_err(io("reading", &running))? == bytes,
            version: None,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            warn!(exe = %managed.display(), cause = %e, "managed executable unreadable; replacing it");
            None
        }
    };
    let copy = copy.map(|c| Copy {
        version: (!c.same_bytes).then(|| version_of(managed)).flatten(),
        ..c
    });
    let launch = decide(version, copy.as_ref());
    let theirs = copy.as_ref().and_then(|c| c.version.as_deref());
    match launch {
        Launch::Place => {
            info!(package = version, copy = ?theirs, exe = %managed.display(), "placing the packaged agent as the executable that runs");
            let paths = UpdatePaths::new(state_dir, managed.to_owned());
            updater::place(&running, &paths).map_err(io("placing the agent at", managed))?;
        }
        Launch::Run if copy.as_ref().is_some_and(|c| !c.same_bytes) => {
            info!(package = version, copy = ?theirs, exe = %managed.display(), "running the self-updated agent");
        }
        _ => {}
    }
    Ok(launch)
}

/// The version an agent binary prints (`shoal-agent VERSION`), within [`VERSION_TIMEOUT`].
fn version_of(exe: &Path) -> Option<String> {
    let mut child = Command::new(exe)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| warn!(exe = %exe.display(), cause = %e, "cannot run the managed executable"))
        .ok()?;
    let deadline = Instant::now() + VERSION_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                warn!(exe = %exe.display(), "the managed executable did not print its version");
                return None;
            }
        }
    };
    let mut out = String::new();
    child
        .stdout
        .take()?
        .take(256)
        .read_to_string(&mut out)
        .ok()?;
    let version = out.trim().strip_prefix("shoal-agent ")?;
    (status.success() && shoal_proto::check_release_name(version).is_ok())
        .then(|| version.to_owned())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn copy(same: bool, version: Option<&str>) -> Copy {
        Copy {
            same_bytes: same,
            version: version.map(str::to_owned),
        }
    }

    #[test]
    fn the_package_wins_unless_the_copy_is_it_or_newer() {
        assert_eq!(decide("0.2.0", None), Launch::Place);
        assert_eq!(decide("0.2.0", Some(&copy(true, None))), Launch::Run);
        assert_eq!(decide("0.2.0", Some(&copy(false, None))), Launch::Place);
        assert_eq!(
            decide("0.2.0", Some(&copy(false, Some("0.1.9")))),
            Launch::Place
        );
        assert_eq!(
            decide("0.2.0", Some(&copy(false, Some("0.2.0")))),
            Launch::Place
        );
        assert_eq!(
            decide("0.2.0", Some(&copy(false, Some("0.3.0")))),
            Launch::Run
        );
        assert_eq!(
            decide("0.2.0", Some(&copy(false, Some("nightly")))),
            Launch::Run
        );
    }

    fn script(path: &Path, body: &str) {
        std::fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn the_packaged_binary_is_placed_when_needed_and_the_old_copy_kept_as_prev() {
        let dir = tempfile::tempdir().expect("tmp");
        let packaged = dir.path().join("usr-bin-shoal-agent");
        script(&packaged, "echo 'shoal-agent 0.2.0'");
        let state = dir.path().join("state");
        let managed = state.join("bin/shoal-agent");
        let prev = state.join("bin/shoal-agent.prev");
        let read = |p: &Path| std::fs::read_to_string(p).expect("read");

        // First start: no copy yet.
        assert_eq!(
            prepare(&packaged, "0.2.0", &managed, &state).expect("ok"),
            Launch::Place
        );
        assert_eq!(read(&managed), read(&packaged));
        let mode = std::fs::metadata(&managed)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        // The same bytes: run it.
        assert_eq!(
            prepare(&packaged, "0.2.0", &managed, &state).expect("ok"),
            Launch::Run
        );
        // Self-updated to a newer version: it runs, untouched.
        script(&managed, "echo 'shoal-agent 0.3.0'");
        assert_eq!(
            prepare(&packaged, "0.2.0", &managed, &state).expect("ok"),
            Launch::Run
        );
        assert!(read(&managed).contains("0.3.0"));
        // The package was upgraded past it: the package is placed, the copy kept as .prev.
        assert_eq!(
            prepare(&packaged, "0.4.0", &managed, &state).expect("ok"),
            Launch::Place
        );
        assert_eq!(read(&managed), read(&packaged));
        assert!(read(&prev).contains("0.3.0"));
        // A copy that does not run, or prints nonsense, is replaced.
        for body in ["exit 1", "echo hello", "sleep 0; echo 'shoal-agent ../x'"] {
            script(&managed, body);
            assert_eq!(
                prepare(&packaged, "0.2.0", &managed, &state).expect("ok"),
                Launch::Place,
                "{body}"
            );
        }
        // Running as the copy itself: carry on.
        assert_eq!(
            prepare(&managed, "0.2.0", &managed, &state).expect("ok"),
            Launch::Carry
        );
    }
}
