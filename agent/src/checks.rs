//! Health checks, one piece of code for both of their uses:
//!
//! - the updater ([`crate::updater`]) runs them after a new agent *version* started, until it
//!   settles;
//! - the boot report ([`BootHealth`]) runs them after every *start* of the agent, so the controller
//!   learns what this machine booted (boot id, netboot image) and whether it is healthy, instead of
//!   guessing from "it connected" (protocol 4, [`AgentMsg::BootReport`]).
//!
//! The checks: `session` and `heartbeat` (they pass by construction: checks run after a heartbeat
//! went out on an established session) and `check:<name>` for the operator's `--health-check`
//! program (exit 0 passes; it gets `SHOAL_AGENT_VERSION`, and `SHOAL_AGENT_PREVIOUS` /
//! `SHOAL_IMAGE` / `SHOAL_CHECK` = `update` or `boot`). A failing boot check is run again every
//! [`BootHealth::retry`] (default 10 s) until it passes; the report goes out again when the outcome
//! changes.
//!
//! [`AgentMsg::BootReport`]: shoal_proto::AgentMsg::BootReport

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use shoal_proto::{BootReport, CheckResult};

use crate::inventory::SysRoots;

/// The checks, in order: `session`, `heartbeat`, then the program's (if any). Blocking (runs the
/// program).
pub fn run(program: Option<&Path>, env: &[(&str, &str)]) -> Vec<CheckResult> {
    let mut checks = vec![
        CheckResult {
            name: "session".into(),
            passed: true,
            detail: None,
        },
        CheckResult {
            name: "heartbeat".into(),
            passed: true,
            detail: None,
        },
    ];
    if let Some(cmd) = program {
        checks.push(run_program(cmd, env));
    }
    checks
}

/// Runs the check program: `check:<file name>`, passed on exit 0; the detail of a failure is the
/// exit status and the first 200 characters of stderr.
pub fn run_program(cmd: &Path, env: &[(&str, &str)]) -> CheckResult {
    let name = format!(
        "check:{}",
        cmd.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let mut command = std::process::Command::new(cmd);
    command.stdin(std::process::Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    match command.output() {
        Ok(out) if out.status.success() => CheckResult {
            name,
            passed: true,
            detail: None,
        },
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stderr)
                .trim()
                .chars()
                .take(200)
                .collect::<String>();
            let detail = if text.is_empty() {
                out.status.to_string()
            } else {
                format!("{}: {text}", out.status)
            };
            CheckResult {
                name,
                passed: false,
                detail: Some(detail),
            }
        }
        Err(e) => CheckResult {
            name,
            passed: false,
            detail: Some(format!("{}: {e}", cmd.display())),
        },
    }
}

/// The netboot image this OS is: os-release `VERSION_ID` when `ID=shoal-netboot` (what
/// `images/build.sh` writes), else `None`.
pub fn netboot_image(os_release: &str) -> Option<String> {
    let fields: HashMap<&str, String> = os_release
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), crate::inventory::unquote_shell(v.trim())))
        .collect();
    (fields.get("ID").map(String::as_str) == Some("shoal-netboot"))
        .then(|| fields.get("VERSION_ID").cloned())
        .flatten()
        .filter(|v| !v.is_empty())
}

/// The boot report's state in the agent. Pure apart from [`BootHealth::load`] (two file reads); the
/// shell runs the checks ([`run`]) when [`BootHealth::due`] says so and hands the results to
/// [`BootHealth::checked`].
#[derive(Debug, Clone)]
pub struct BootHealth {
    boot_id: String,
    image: Option<String>,
    /// The operator's check program (`--health-check`).
    pub program: Option<PathBuf>,
    /// How often failing checks are run again (default 10 s).
    pub retry: Duration,
    /// The last report sent on the current session.
    sent: Option<BootReport>,
    last_run: Option<Instant>,
}

impl BootHealth {
    /// A boot's state from its facts.
    pub fn new(boot_id: String, image: Option<String>, program: Option<PathBuf>) -> BootHealth {
        BootHealth {
            boot_id,
            image,
            program,
            retry: Duration::from_secs(10),
            sent: None,
            last_run: None,
        }
    }

    /// Reads the boot id from `boot_id_file` (the kernel's `/proc/sys/kernel/random/boot_id` unless
    /// `--boot-id-file` says otherwise; the maintenance steps read the same file) and the netboot
    /// image (`etc/os-release`).
    pub fn load(
        roots: &SysRoots,
        boot_id_file: &std::path::Path,
        program: Option<PathBuf>,
    ) -> BootHealth {
        let boot_id = crate::maintenance::read_boot_id(boot_id_file);
        let image = std::fs::read_to_string(roots.etc.join("os-release"))
            .ok()
            .and_then(|t| netboot_image(&t));
        BootHealth::new(boot_id, image, program)
    }

    /// The netboot image this machine booted, if it is one.
    pub fn image(&self) -> Option<&str> {
        self.image.as_deref()
    }

    /// A new session: its first heartbeat runs the checks and sends a report whatever they say.
    pub fn new_session(&mut self) {
        self.sent = None;
        self.last_run = None;
    }

    /// Whether the checks should run now (after a heartbeat went out): nothing sent on this session
    /// yet, or a check failed and `retry` has passed since they last ran.
    pub fn due(&self, now: Instant) -> bool {
        match (&self.sent, self.last_run) {
            (None, _) => true,
            (Some(r), Some(at)) => !r.healthy() && now.saturating_duration_since(at) >= self.retry,
            (Some(r), None) => !r.healthy(),
        }
    }

    /// The checks ran at `now`: the report to send, if it is the session's first or its outcome
    /// changed.
    pub fn checked(&mut self, checks: Vec<CheckResult>, now: Instant) -> Option<BootReport> {
        self.last_run = Some(now);
        let report = BootReport {
            boot_id: self.boot_id.clone(),
            image: self.image.clone(),
            checks,
        };
        if self.sent.as_ref() == Some(&report) {
            return None;
        }
        self.sent = Some(report.clone());
        Some(report)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_image_is_the_version_id_of_a_shoal_netboot_os_only() {
        let ours = "NAME=\"shoal netboot\"\nID=shoal-netboot\nVERSION_ID=\"2030.2\"\nPRETTY_NAME=\"shoal netboot image 2030.2\"\n";
        assert_eq!(netboot_image(ours).as_deref(), Some("2030.2"));
        assert_eq!(netboot_image("ID=debian\nVERSION_ID=\"12\"\n"), None);
        assert_eq!(netboot_image("ID=shoal-netboot\n"), None);
    }

    #[test]
    fn the_program_passes_on_exit_0_and_its_stderr_explains_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        let bad = dir.path().join("bad");
        std::fs::write(&good, "#!/bin/sh\n[ \"$SHOAL_CHECK\" = boot ]\n").unwrap();
        std::fs::write(&bad, "#!/bin/sh\necho 'broken on purpose' >&2\nexit 3\n").unwrap();
        for f in [&good, &bad] {
            std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        let checks = run(Some(&good), &[("SHOAL_CHECK", "boot")]);
        assert_eq!(
            checks
                .iter()
                .map(|c| (c.name.as_str(), c.passed))
                .collect::<Vec<_>>(),
            [("session", true), ("heartbeat", true), ("check:good", true)]
        );
        let failed = run_program(&bad, &[]);
        assert!(!failed.passed);
        let detail = failed.detail.unwrap();
        assert!(
            detail.contains("3") && detail.contains("broken on purpose"),
            "{detail}"
        );
        let missing = run_program(&dir.path().join("missing"), &[]);
        assert!(!missing.passed && missing.detail.unwrap().contains("missing"));
        assert_eq!(run(None, &[]).len(), 2);
    }

    fn fail() -> Vec<CheckResult> {
        let mut c = run(None, &[]);
        c.push(CheckResult {
            name: "check:x".into(),
            passed: false,
            detail: Some("exit status: 1".into()),
        });
        c
    }

    #[test]
    fn a_report_per_session_and_again_when_failing_checks_pass() {
        let t0 = Instant::now();
        let mut b = BootHealth::new("boot-1".into(), Some("v3".into()), None);
        assert!(b.due(t0), "nothing sent yet");
        let first = b.checked(fail(), t0).expect("first report of the session");
        assert_eq!(
            (
                first.boot_id.as_str(),
                first.image.as_deref(),
                first.healthy()
            ),
            ("boot-1", Some("v3"), false)
        );
        assert!(
            !b.due(t0 + Duration::from_secs(9)),
            "failing checks wait for the retry interval"
        );
        assert!(b.due(t0 + Duration::from_secs(10)));
        assert_eq!(
            b.checked(fail(), t0 + Duration::from_secs(10)),
            None,
            "unchanged: not sent again"
        );
        let healed = b
            .checked(run(None, &[]), t0 + Duration::from_secs(20))
            .expect("passes now");
        assert!(healed.healthy());
        assert!(
            !b.due(t0 + Duration::from_secs(60)),
            "healthy: no more runs on this session"
        );
        b.new_session();
        assert!(
            b.due(t0 + Duration::from_secs(61)),
            "a new session gets its own report"
        );
        assert!(b
            .checked(run(None, &[]), t0 + Duration::from_secs(61))
            .is_some());
    }
}
