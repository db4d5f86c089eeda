//! Remote reboots (protocol 4, `ControllerMsg::Reboot`): the controller assigned this netbooted node a
//! new image and asks it to boot it.
//!
//! The decision ([`decide`]) is pure: refuse when `--no-remote-reboot`; else the operator's
//! `--reboot-command` if given (tests use a stand-in); else `kexec -e` when the controller prefers it
//! and a kexec kernel is loaded (`/sys/kernel/kexec_loaded` is `1`); else the `reboot(2)` syscall
//! after `sync(2)`. [`execute`] carries it out. The agent acknowledges before executing.

use std::path::PathBuf;

/// Remote reboot settings. Every field has a documented default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebootConfig {
    /// Whether the controller may reboot this machine (default true; `--no-remote-reboot` turns it off).
    pub allowed: bool,
    /// A shell command run instead of kexec or `reboot(2)` (`--reboot-command`; default none).
    pub command: Option<String>,
    /// The file saying whether a kexec kernel is loaded (default `/sys/kernel/kexec_loaded`).
    pub kexec_loaded: PathBuf,
}

impl Default for RebootConfig {
    fn default() -> Self {
        Self { allowed: true, command: None, kexec_loaded: PathBuf::from("/sys/kernel/kexec_loaded") }
    }
}

/// How the agent reboots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootMethod {
    /// `sh -c COMMAND` (the operator's `--reboot-command`).
    Command(String),
    /// `kexec -e` into the loaded kernel.
    Kexec,
    /// `sync(2)` then `reboot(2)` with `RB_AUTOBOOT`.
    Syscall,
}

impl std::fmt::Display for RebootMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RebootMethod::Command(c) => write!(f, "--reboot-command {c}"),
            RebootMethod::Kexec => f.write_str("kexec -e"),
            RebootMethod::Syscall => f.write_str("reboot(2)"),
        }
    }
}

/// Whether a kexec kernel is loaded, from the kernel's `kexec_loaded` file (`1` or `0`); a missing
/// or unreadable file means no.
pub fn kexec_loaded(config: &RebootConfig) -> bool {
    std::fs::read_to_string(&config.kexec_loaded).map(|s| s.trim() == "1").unwrap_or(false)
}

/// What to do with a reboot request: the method, or the reason for refusing.
pub fn decide(config: &RebootConfig, prefer_kexec: bool) -> Result<RebootMethod, String> {
    if !config.allowed {
        return Err("remote reboots are disabled on this node (--no-remote-reboot)".into());
    }
    if let Some(c) = &config.command {
        return Ok(RebootMethod::Command(c.clone()));
    }
    if prefer_kexec && kexec_loaded(config) {
        return Ok(RebootMethod::Kexec);
    }
    Ok(RebootMethod::Syscall)
}

/// Carries out the reboot. Returns only if it did not happen (a command that exits 0 counts as
/// done: the machine is expected to go down by itself).
pub fn execute(method: &RebootMethod) -> Result<(), String> {
    let run = |cmd: &mut std::process::Command| -> Result<(), String> {
        let status = cmd.status().map_err(|e| format!("{}: {e}", describe(cmd)))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{} exited with {status}", describe(cmd)))
        }
    };
    match method {
        RebootMethod::Command(c) => run(std::process::Command::new("sh").arg("-c").arg(c)),
        RebootMethod::Kexec => {
            nix::unistd::sync();
            run(std::process::Command::new("kexec").arg("-e"))
        }
        RebootMethod::Syscall => {
            nix::unistd::sync();
            match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
                Ok(never) => match never {},
                Err(e) => Err(format!("reboot(2): {e}")),
            }
        }
    }
}

fn describe(cmd: &std::process::Command) -> String {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|s| s.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, loaded: Option<&str>) -> RebootConfig {
        let path = dir.join("kexec_loaded");
        if let Some(v) = loaded {
            std::fs::write(&path, v).unwrap();
        }
        RebootConfig { kexec_loaded: path, ..Default::default() }
    }

    #[test]
    fn kexec_when_loaded_and_preferred_else_the_syscall() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(decide(&config(dir.path(), None), true), Ok(RebootMethod::Syscall), "no kexec_loaded file");
        assert_eq!(decide(&config(dir.path(), Some("0\n")), true), Ok(RebootMethod::Syscall));
        let loaded = config(dir.path(), Some("1\n"));
        assert_eq!(decide(&loaded, true), Ok(RebootMethod::Kexec));
        assert_eq!(decide(&loaded, false), Ok(RebootMethod::Syscall), "the controller asked for a full reboot");
        assert_eq!(RebootMethod::Kexec.to_string(), "kexec -e");
    }

    #[test]
    fn the_command_overrides_both_and_refusal_overrides_everything() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path(), Some("1"));
        c.command = Some("true".into());
        assert_eq!(decide(&c, true), Ok(RebootMethod::Command("true".into())));
        c.allowed = false;
        let why = decide(&c, true).unwrap_err();
        assert!(why.contains("--no-remote-reboot"), "{why}");
    }

    #[test]
    fn the_stand_in_command_runs_and_its_failure_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("rebooted");
        let script = dir.path().join("fake-reboot.sh");
        std::fs::write(&script, format!("#!/bin/sh\necho \"$1\" > '{}'\n", marker.display())).unwrap();
        let mut c = config(dir.path(), Some("1"));
        c.command = Some(format!("sh '{}' now", script.display()));
        let method = decide(&c, true).unwrap();
        execute(&method).unwrap();
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "now\n");
        let err = execute(&RebootMethod::Command("exit 3".into())).unwrap_err();
        assert!(err.contains("exit 3") && err.contains("3"), "{err}");
    }
}
