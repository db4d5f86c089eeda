//! Maintenance steps (protocol 4, `ControllerMsg::Maintenance`): the controller walks this node
//! through `cordon` (pre-hook) → `act` (the action) → `uncordon` (post-hook) for a maintenance run
//! (`shoalctl maintenance run`).
//!
//! The decisions are pure ([`MaintenanceBook::decide`], [`check_exec`]): which work a step needs,
//! whether a command is allowed, and whether a repeated step was already done. The shell
//! ([`run_hook`], [`run_exec`], the reboot path in `daemon.rs`) carries the work out.
//!
//! - **Allow-list**: `exec` runs `argv` only if `argv[0]` is absolute and, canonicalised (symlinks
//!   and `..` resolved), is exactly one of the canonicalised `--allow-exec PATH` entries. Anything
//!   else is refused naming the flag; nothing runs.
//! - **Hooks**: `--pre-hook CMD` for `cordon`, `--post-hook CMD` for `uncordon`, run with `sh -c`,
//!   with `SHOAL_MAINTENANCE_ACTION` (`reboot`, `smart-test`, `exec`), `SHOAL_MAINTENANCE_RUN` (the
//!   run id), `SHOAL_MAINTENANCE_STEP` (`cordon`, `uncordon`) and, for `exec`,
//!   `SHOAL_MAINTENANCE_COMMAND` set. No hook: the step is done at once. A failed pre-hook is
//!   followed by the post-hook (to undo a partial drain) and the step fails. Hooks run around
//!   maintenance actions only, not around agent self-updates.
//! - **Timeout**: hooks and `exec` are killed after `--maintenance-timeout` (default 30 min).
//! - **Repeats**: the controller repeats the current step after a reconnect or its own restart. A
//!   step of the same run that is running is ignored (its answer comes when it ends); one that
//!   ended well is answered from the record without doing it again (kept in memory: a restarted
//!   agent runs a repeated hook or `exec` again); a failed one is tried again.
//! - **Reboot**: before rebooting the agent writes `maintenance-reboot.json` (run, boot id) to its
//!   state dir and answers `Rebooting`. The repeated `act` is answered from that record: done if
//!   the boot id (`/proc/sys/kernel/random/boot_id`, `--boot-id-file` for tests) changed, failed if
//!   the agent restarted on the same boot (the machine did not reboot).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use shoal_proto::{
    output_tail, MaintenanceAction, MaintenanceStep, StepKind, StepOutcome, MAX_STEP_OUTPUT,
};

/// Maintenance settings. Every field has a documented default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceConfig {
    /// Programs `exec` may run (`--allow-exec PATH`, repeatable; default none: every `exec` is
    /// refused). Canonicalised once at start ([`MaintenanceConfig::canonical_allow`]).
    pub allow_exec: Vec<PathBuf>,
    /// Shell command run for `cordon` (`--pre-hook`; default none).
    pub pre_hook: Option<String>,
    /// Shell command run for `uncordon` (`--post-hook`; default none).
    pub post_hook: Option<String>,
    /// How long a hook or `exec` may run (`--maintenance-timeout`; default 30 min).
    pub timeout: Duration,
    /// Where the boot id is read (default `/proc/sys/kernel/random/boot_id`; `--boot-id-file`).
    pub boot_id_file: PathBuf,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            allow_exec: Vec::new(),
            pre_hook: None,
            post_hook: None,
            timeout: Duration::from_secs(30 * 60),
            boot_id_file: PathBuf::from("/proc/sys/kernel/random/boot_id"),
        }
    }
}

impl MaintenanceConfig {
    /// The allow-list canonicalised; an entry that does not exist or is not absolute is an error.
    pub fn canonical_allow(&self) -> Result<Vec<PathBuf>, String> {
        self.allow_exec
            .iter()
            .map(|p| {
                if !p.is_absolute() {
                    return Err(format!(
                        "--allow-exec {}: not an absolute path",
                        p.display()
                    ));
                }
                std::fs::canonicalize(p).map_err(|e| format!("--allow-exec {}: {e}", p.display()))
            })
            .collect()
    }
}

/// Whether `argv` may run: `argv[0]` absolute, and its canonical form (`canonical`, `None` when it
/// does not resolve) one of `allow` (canonical). The error names the flag.
pub fn check_exec(
    argv: &[String],
    canonical: Option<&Path>,
    allow: &[PathBuf],
) -> Result<(), String> {
    let Some(program) = argv.first() else {
        return Err("exec needs a command".into());
    };
    if !Path::new(program).is_absolute() {
        return Err(format!("{program} is not an absolute path; exec runs only programs allowed with --allow-exec PATH"));
    }
    match canonical {
        Some(c) if allow.iter().any(|a| a == c) => Ok(()),
        _ => Err(format!("{program} is not allowed on this node: the agent runs only programs given with --allow-exec PATH")),
    }
}

/// The work a step needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// `sh -c` this hook (and for a pre-hook, the post-hook after it if it fails).
    Hook {
        /// The command.
        command: String,
        /// `cordon` or `uncordon`.
        step: StepKind,
    },
    /// Run the allowed program.
    Exec(Vec<String>),
    /// Start short SMART self-tests.
    SmartTest,
    /// Reboot the machine.
    Reboot,
}

/// What to do with a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answer at once.
    Answer(StepOutcome),
    /// The same step is running; its answer comes when it ends.
    Ignore,
    /// Carry this out, then call [`MaintenanceBook::finished`].
    Run(Work),
}

/// The persisted record of a reboot in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootRecord {
    /// The run.
    pub run: String,
    /// The boot id before the reboot.
    pub boot_id: String,
}

/// The agent's memory of maintenance steps (sans-IO).
#[derive(Debug, Clone, Default)]
pub struct MaintenanceBook {
    /// The step running now.
    running: Option<(String, StepKind)>,
    /// The last step that ended well, with its answer.
    done: Option<(String, StepKind, StepOutcome)>,
    /// A reboot this agent started (from the state dir: it survives the reboot).
    reboot: Option<RebootRecord>,
    /// This process started the reboot (it has not happened yet).
    rebooting_here: bool,
}

impl MaintenanceBook {
    /// A book that knows about a reboot record found in the state dir.
    pub fn new(reboot: Option<RebootRecord>) -> Self {
        Self {
            reboot,
            ..Self::default()
        }
    }

    /// Decides what to do with `step`, given the hooks, whether an `exec` action is allowed
    /// ([`check_exec`], done by the shell) and the current boot id. An `exec` that is not allowed
    /// is refused at `cordon` already: no hook runs for an action that cannot run.
    pub fn decide(
        &mut self,
        step: &MaintenanceStep,
        config: &MaintenanceConfig,
        exec_allowed: Result<(), String>,
        boot_id: &str,
    ) -> Decision {
        if let (StepKind::Cordon | StepKind::Act, Err(why)) = (step.step, &exec_allowed) {
            return Decision::Answer(StepOutcome::Failed(why.clone()));
        }
        if self
            .running
            .as_ref()
            .is_some_and(|(r, s)| *r == step.run && *s == step.step)
        {
            return Decision::Ignore;
        }
        if let Some((_, _, outcome)) = self
            .done
            .as_ref()
            .filter(|(r, s, _)| *r == step.run && *s == step.step)
        {
            return Decision::Answer(outcome.clone());
        }
        let work = match (&step.step, &step.action) {
            (StepKind::Cordon, _) => match &config.pre_hook {
                Some(c) => Work::Hook {
                    command: c.clone(),
                    step: StepKind::Cordon,
                },
                None => return self.answer_now(step, StepOutcome::Done("no pre-hook".into())),
            },
            (StepKind::Uncordon, _) => match &config.post_hook {
                Some(c) => Work::Hook {
                    command: c.clone(),
                    step: StepKind::Uncordon,
                },
                None => return self.answer_now(step, StepOutcome::Done("no post-hook".into())),
            },
            (StepKind::Act, MaintenanceAction::Reboot) => {
                if let Some(rec) = self.reboot.clone().filter(|r| r.run == step.run) {
                    if rec.boot_id != boot_id {
                        let outcome = StepOutcome::Done(format!(
                            "rebooted (boot {} → {})",
                            short(&rec.boot_id),
                            short(boot_id)
                        ));
                        self.reboot = None;
                        return self.answer_now(step, outcome);
                    }
                    if self.rebooting_here {
                        return Decision::Ignore;
                    }
                    self.reboot = None;
                    return Decision::Answer(StepOutcome::Failed(
                        "the agent restarted but the machine did not reboot (same boot id)".into(),
                    ));
                }
                Work::Reboot
            }
            (StepKind::Act, MaintenanceAction::SmartTest) => Work::SmartTest,
            (StepKind::Act, MaintenanceAction::Exec { argv }) => Work::Exec(argv.clone()),
        };
        self.running = Some((step.run.clone(), step.step));
        Decision::Run(work)
    }

    fn answer_now(&mut self, step: &MaintenanceStep, outcome: StepOutcome) -> Decision {
        self.done = Some((step.run.clone(), step.step, outcome.clone()));
        Decision::Answer(outcome)
    }

    /// The reboot of `run` is about to happen (record written): repeats are ignored until it does.
    pub fn rebooting(&mut self, record: RebootRecord) {
        self.reboot = Some(record);
        self.rebooting_here = true;
        self.running = None;
    }

    /// A step's work ended. A reboot that failed forgets its record.
    pub fn finished(&mut self, run: &str, step: StepKind, outcome: &StepOutcome) {
        if self
            .running
            .as_ref()
            .is_some_and(|(r, s)| r == run && *s == step)
        {
            self.running = None;
        }
        match outcome {
            StepOutcome::Done(_) => self.done = Some((run.to_owned(), step, outcome.clone())),
            StepOutcome::Failed(_)
                if step == StepKind::Act && self.reboot.as_ref().is_some_and(|r| r.run == run) =>
            {
                self.reboot = None;
                self.rebooting_here = false;
            }
            _ => {}
        }
    }

    /// The reboot record to keep on disk (`None`: remove the file).
    pub fn reboot_record(&self) -> Option<&RebootRecord> {
        self.reboot.as_ref()
    }
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// The boot id from `path`, trimmed; empty when unreadable.
pub fn read_boot_id(path: &Path) -> String {
    crate::sysfs::read_attr(path).unwrap_or_default()
}

/// The record file in the state dir.
pub fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join("maintenance-reboot.json")
}

/// Reads the reboot record (absent or unreadable: none).
pub fn load_record(state_dir: &Path) -> Option<RebootRecord> {
    let text = std::fs::read_to_string(record_path(state_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes (or, with `None`, removes) the reboot record, synced.
pub fn store_record(state_dir: &Path, record: Option<&RebootRecord>) -> std::io::Result<()> {
    let path = record_path(state_dir);
    match record {
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Some(r) => {
            let text = serde_json::to_vec(r).map_err(std::io::Error::other)?;
            shoal_overlay::pki::write_private_file(&path, &text, 0o600)
        }
    }
}

/// Runs a command with the maintenance environment and timeout: `Ok(output tail)` on exit 0, else
/// `Err` with the status and the tail of stderr (stdout when stderr is empty).
pub async fn run_command(
    mut cmd: tokio::process::Command,
    what: &str,
    step: &MaintenanceStep,
    timeout: Duration,
) -> Result<String, String> {
    cmd.env("SHOAL_MAINTENANCE_ACTION", step.action.name())
        .env("SHOAL_MAINTENANCE_RUN", &step.run)
        .env("SHOAL_MAINTENANCE_STEP", step.step.as_str())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let MaintenanceAction::Exec { argv } = &step.action {
        cmd.env("SHOAL_MAINTENANCE_COMMAND", argv.join(" "));
    }
    let out = match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => {
            return Err(format!(
                "{what} did not finish within {} (--maintenance-timeout); killed",
                humantime::format_duration(timeout)
            ))
        }
        Ok(Err(e)) => return Err(format!("{what}: {e}")),
        Ok(Ok(out)) => out,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(output_tail(stdout.trim(), MAX_STEP_OUTPUT - 256))
    } else {
        let text = if stderr.trim().is_empty() {
            stdout.trim()
        } else {
            stderr.trim()
        };
        Err(format!(
            "{what} exited with {}: {}",
            out.status,
            output_tail(text, MAX_STEP_OUTPUT - 256)
        ))
    }
}

/// Runs a hook with `sh -c`.
pub async fn run_hook(
    command: &str,
    name: &str,
    step: &MaintenanceStep,
    timeout: Duration,
) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c").arg(command);
    run_command(cmd, name, step, timeout).await
}

/// Carries out a `cordon` or `uncordon` hook: a failed pre-hook is followed by the post-hook.
pub async fn hook_step(
    config: &MaintenanceConfig,
    command: &str,
    step: &MaintenanceStep,
) -> StepOutcome {
    let name = if step.step == StepKind::Cordon {
        "the pre-hook"
    } else {
        "the post-hook"
    };
    match run_hook(command, name, step, config.timeout).await {
        Ok(out) => StepOutcome::Done(out),
        Err(e) if step.step == StepKind::Cordon => match &config.post_hook {
            Some(post) => {
                let undo = MaintenanceStep {
                    step: StepKind::Uncordon,
                    ..step.clone()
                };
                match run_hook(post, "the post-hook", &undo, config.timeout).await {
                    Ok(_) => StepOutcome::Failed(format!("{e}; the post-hook ran to undo it")),
                    Err(e2) => StepOutcome::Failed(format!("{e}; then {e2}")),
                }
            }
            None => StepOutcome::Failed(e),
        },
        Err(e) => StepOutcome::Failed(e),
    }
}

/// The program to execute for `argv`: its canonical path, once [`check_exec`] allowed exactly that
/// path. The caller executes this path, never `argv[0]` as given: a symlink swapped in after the
/// check (or a `..` through one) cannot change what runs.
pub fn resolve_exec(argv: &[String], allow: &[PathBuf]) -> Result<PathBuf, String> {
    let canonical = argv.first().and_then(|p| std::fs::canonicalize(p).ok());
    check_exec(argv, canonical.as_deref(), allow)?;
    canonical.ok_or_else(|| "exec needs a command".to_owned())
}

/// Carries out an allowed `exec`: checked again here ([`resolve_exec`]), and the canonical path
/// that passed the check is what runs.
pub async fn exec_step(
    config: &MaintenanceConfig,
    allow: &[PathBuf],
    argv: &[String],
    step: &MaintenanceStep,
) -> StepOutcome {
    match resolve_exec(argv, allow) {
        Ok(program) => run_exec(config, &program, argv, step).await,
        Err(e) => StepOutcome::Failed(e),
    }
}

/// Runs `program` (the resolved path) with `argv[1..]`.
async fn run_exec(
    config: &MaintenanceConfig,
    program: &Path,
    argv: &[String],
    step: &MaintenanceStep,
) -> StepOutcome {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(argv.get(1..).unwrap_or_default());
    let name = argv.first().map(String::as_str).unwrap_or_default();
    match run_command(cmd, name, step, config.timeout).await {
        Ok(out) => StepOutcome::Done(out),
        Err(e) => StepOutcome::Failed(e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn step(run: &str, step: StepKind, action: MaintenanceAction) -> MaintenanceStep {
        MaintenanceStep {
            run: run.into(),
            action,
            step,
        }
    }

    fn exec(path: &str) -> MaintenanceAction {
        MaintenanceAction::Exec {
            argv: vec![path.into()],
        }
    }

    #[test]
    fn only_canonical_allowed_paths_run() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("fix.sh");
        std::fs::write(&real, "#!/bin/sh\n").unwrap();
        let link = dir.path().join("link.sh");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let config = MaintenanceConfig {
            allow_exec: vec![link.clone()],
            ..Default::default()
        };
        let allow = config.canonical_allow().unwrap();
        let canon = std::fs::canonicalize(&real).unwrap();
        let argv = |p: &Path| vec![p.display().to_string()];
        assert_eq!(
            check_exec(&argv(&real), Some(&canon), &allow),
            Ok(()),
            "the link's target is allowed"
        );
        let dotted = dir.path().join("sub/../fix.sh");
        assert_eq!(check_exec(&argv(&dotted), Some(&canon), &allow), Ok(()));
        let other = dir.path().join("other.sh");
        let err = check_exec(&argv(&other), None, &allow).unwrap_err();
        assert!(
            err.contains("not allowed") && err.contains("--allow-exec"),
            "{err}"
        );
        let err = check_exec(&["fix.sh".into()], Some(&canon), &allow).unwrap_err();
        assert!(err.contains("absolute"), "{err}");
        assert!(check_exec(&[], None, &allow).is_err());
        let bad = MaintenanceConfig {
            allow_exec: vec![PathBuf::from("relative/x")],
            ..Default::default()
        };
        assert!(bad
            .canonical_allow()
            .unwrap_err()
            .contains("--allow-exec relative/x"));
    }

    #[test]
    fn hooks_run_when_configured_and_steps_are_done_once() {
        let mut book = MaintenanceBook::default();
        let bare = MaintenanceConfig::default();
        let cordon = step("r1", StepKind::Cordon, exec("/x"));
        assert_eq!(
            book.decide(&cordon, &bare, Ok(()), "b"),
            Decision::Answer(StepOutcome::Done("no pre-hook".into()))
        );
        let hooks = MaintenanceConfig {
            pre_hook: Some("drain".into()),
            post_hook: Some("undrain".into()),
            ..Default::default()
        };
        let cordon2 = step("r2", StepKind::Cordon, exec("/x"));
        assert_eq!(
            book.decide(&cordon2, &hooks, Ok(()), "b"),
            Decision::Run(Work::Hook {
                command: "drain".into(),
                step: StepKind::Cordon
            })
        );
        assert_eq!(
            book.decide(&cordon2, &hooks, Ok(()), "b"),
            Decision::Ignore,
            "running: the repeat waits for the answer"
        );
        book.finished("r2", StepKind::Cordon, &StepOutcome::Done("drained".into()));
        assert_eq!(
            book.decide(&cordon2, &hooks, Ok(()), "b"),
            Decision::Answer(StepOutcome::Done("drained".into())),
            "done: answered, not run again"
        );
        let act = step("r2", StepKind::Act, exec("/x"));
        assert_eq!(
            book.decide(&act, &hooks, Ok(()), "b"),
            Decision::Run(Work::Exec(vec!["/x".into()]))
        );
        book.finished("r2", StepKind::Act, &StepOutcome::Failed("exit 1".into()));
        assert_eq!(
            book.decide(&act, &hooks, Ok(()), "b"),
            Decision::Run(Work::Exec(vec!["/x".into()])),
            "a failed step is tried again"
        );
        let refused = book.decide(
            &step("r4", StepKind::Cordon, exec("/y")),
            &hooks,
            Err("/y is not allowed (--allow-exec)".into()),
            "b",
        );
        assert_eq!(
            refused,
            Decision::Answer(StepOutcome::Failed(
                "/y is not allowed (--allow-exec)".into()
            )),
            "refused before any hook"
        );
        let un = step("r2", StepKind::Uncordon, exec("/x"));
        assert_eq!(
            book.decide(&un, &hooks, Ok(()), "b"),
            Decision::Run(Work::Hook {
                command: "undrain".into(),
                step: StepKind::Uncordon
            })
        );
    }

    #[test]
    fn a_reboot_is_done_when_the_boot_id_changed() {
        let config = MaintenanceConfig::default();
        let act = step("r3", StepKind::Act, MaintenanceAction::Reboot);
        let mut book = MaintenanceBook::default();
        assert_eq!(
            book.decide(&act, &config, Ok(()), "boot-a"),
            Decision::Run(Work::Reboot)
        );
        book.rebooting(RebootRecord {
            run: "r3".into(),
            boot_id: "boot-a".into(),
        });
        assert_eq!(
            book.decide(&act, &config, Ok(()), "boot-a"),
            Decision::Ignore,
            "a reconnect before the reboot"
        );
        // The new boot: a new process reads the record from the state dir.
        let rec = book.reboot_record().cloned();
        let mut after = MaintenanceBook::new(rec.clone());
        match after.decide(&act, &config, Ok(()), "boot-b") {
            Decision::Answer(StepOutcome::Done(s)) => assert!(s.contains("rebooted"), "{s}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(after.reboot_record(), None, "the record is settled");
        assert!(
            matches!(
                after.decide(&act, &config, Ok(()), "boot-b"),
                Decision::Answer(StepOutcome::Done(_))
            ),
            "repeat answered"
        );
        // The agent restarted without a reboot.
        let mut same = MaintenanceBook::new(rec);
        assert!(
            matches!(same.decide(&act, &config, Ok(()), "boot-a"), Decision::Answer(StepOutcome::Failed(s)) if s.contains("did not reboot"))
        );
        // A reboot that could not start forgets the record.
        let mut failed = MaintenanceBook::default();
        failed.decide(&act, &config, Ok(()), "boot-a");
        failed.rebooting(RebootRecord {
            run: "r3".into(),
            boot_id: "boot-a".into(),
        });
        failed.finished(
            "r3",
            StepKind::Act,
            &StepOutcome::Failed("reboot(2): EPERM".into()),
        );
        assert_eq!(failed.reboot_record(), None);
    }

    #[tokio::test]
    async fn hooks_see_the_environment_fail_with_stderr_and_a_failed_pre_hook_runs_the_post_hook() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let config = MaintenanceConfig {
            pre_hook: Some(format!("echo \"pre $SHOAL_MAINTENANCE_ACTION $SHOAL_MAINTENANCE_RUN\" >> '{}'; echo nope >&2; exit 4", log.display())),
            post_hook: Some(format!("echo \"post $SHOAL_MAINTENANCE_STEP\" >> '{}'", log.display())),
            ..Default::default()
        };
        let s = step("r9", StepKind::Cordon, MaintenanceAction::SmartTest);
        let out = hook_step(&config, config.pre_hook.as_deref().unwrap(), &s).await;
        match out {
            StepOutcome::Failed(e) => assert!(
                e.contains("pre-hook") && e.contains("nope") && e.contains("post-hook ran"),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "pre smart-test r9\npost uncordon\n"
        );
        let slow = MaintenanceConfig {
            timeout: Duration::from_millis(200),
            ..Default::default()
        };
        let out = hook_step(
            &slow,
            "sleep 5",
            &step("r9", StepKind::Uncordon, MaintenanceAction::Reboot),
        )
        .await;
        assert!(
            matches!(out, StepOutcome::Failed(ref e) if e.contains("--maintenance-timeout")),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn exec_runs_only_allowed_programs() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fix.sh");
        std::fs::write(&script, "#!/bin/sh\necho \"fixed $1\"\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let config = MaintenanceConfig {
            allow_exec: vec![script.clone()],
            ..Default::default()
        };
        let allow = config.canonical_allow().unwrap();
        let argv = vec![script.display().to_string(), "disk".into()];
        let s = step(
            "r1",
            StepKind::Act,
            MaintenanceAction::Exec { argv: argv.clone() },
        );
        assert_eq!(
            exec_step(&config, &allow, &argv, &s).await,
            StepOutcome::Done("fixed disk".into())
        );
        let out = exec_step(&config, &[], &argv, &s).await;
        assert!(
            matches!(out, StepOutcome::Failed(ref e) if e.contains("--allow-exec")),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn exec_runs_the_canonical_path_it_checked_not_the_name_it_was_given() {
        let dir = tempfile::tempdir().unwrap();
        let script = |name: &str, says: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\necho {says}\n")).unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            p
        };
        let allowed = script("fix.sh", "allowed");
        let evil = script("evil.sh", "evil");
        let link = dir.path().join("link.sh");
        std::os::unix::fs::symlink(&allowed, &link).unwrap();
        let allow = MaintenanceConfig {
            allow_exec: vec![allowed.clone()],
            ..Default::default()
        }
        .canonical_allow()
        .unwrap();
        let argv = vec![link.display().to_string()];
        // The check resolves the link to the allowed program; that resolved path is what is run.
        let program = resolve_exec(&argv, &allow).unwrap();
        assert_eq!(program, std::fs::canonicalize(&allowed).unwrap());
        let s = step(
            "r1",
            StepKind::Act,
            MaintenanceAction::Exec { argv: argv.clone() },
        );
        assert_eq!(
            exec_step(&MaintenanceConfig::default(), &allow, &argv, &s).await,
            StepOutcome::Done("allowed".into())
        );
        // The link swapped to another program between the check and the exec: what runs is still
        // the path that was checked, not the name as given.
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&evil, &link).unwrap();
        assert_eq!(
            run_exec(&MaintenanceConfig::default(), &program, &argv, &s).await,
            StepOutcome::Done("allowed".into())
        );
        // And the next check sees the swap and refuses it.
        assert!(resolve_exec(&argv, &allow)
            .unwrap_err()
            .contains("not allowed"));
        let out = exec_step(&MaintenanceConfig::default(), &allow, &argv, &s).await;
        assert!(
            matches!(out, StepOutcome::Failed(ref e) if e.contains("not allowed")),
            "{out:?}"
        );
    }
}
