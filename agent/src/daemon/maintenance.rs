//! Maintenance steps as the shell carries them out: [`MaintenanceBook::decide`] says what a step
//! needs, and this module runs it (hooks and programs as child processes, SMART self-tests through
//! the drive manager, a full reboot), keeps the reboot record, and answers the controller.

use std::{collections::BTreeMap, path::PathBuf};

use shoal_proto::{AgentMsg, DriveCommandResult, MaintenanceResult, MaintenanceStep, StepOutcome};
use tracing::{debug, info, warn};

use super::{
    reboot::spawn_reboot,
    shell::{Shell, ShellEvent},
};
use crate::{
    drives::DriveInput,
    maintenance::{self as maint, Decision, MaintenanceBook, Work},
    reboot,
};

/// Maintenance as the shell sees it.
pub(super) struct MaintState {
    book: MaintenanceBook,
    /// `--allow-exec`, canonicalised at start.
    allow: Vec<PathBuf>,
    /// A SMART self-test step waiting for the drive manager's answers.
    smart: Option<PendingSmart>,
    /// Counter for the drive command ids of self-tests.
    next_id: u64,
}

impl MaintState {
    /// The book as the reboot record in the state dir left it, and the canonical allow-list.
    pub(super) fn new(book: MaintenanceBook, allow: Vec<PathBuf>) -> MaintState {
        MaintState {
            book,
            allow,
            smart: None,
            next_id: 0,
        }
    }
}

/// Drive command ids of maintenance self-tests have this bit set (the controller's ids are small
/// counters), so their answers are kept from the controller.
const MAINT_DRIVE_ID: u64 = 1 << 62;

/// Self-tests started for a step, waiting for the drive manager to say whether each started.
struct PendingSmart {
    step: MaintenanceStep,
    /// Command id → device.
    waiting: BTreeMap<u64, String>,
    started: Vec<String>,
    failed: Vec<String>,
    skipped: Vec<String>,
}

impl PendingSmart {
    fn outcome(&self) -> StepOutcome {
        let skipped = if self.skipped.is_empty() {
            String::new()
        } else {
            format!("; skipped (no SMART): {}", self.skipped.join(", "))
        };
        let text = if self.started.is_empty() && self.failed.is_empty() {
            format!("no drives with SMART{skipped}")
        } else {
            format!(
                "short self-test started on {}{skipped}",
                if self.started.is_empty() {
                    "none".to_owned()
                } else {
                    self.started.join(", ")
                }
            )
        };
        if self.failed.is_empty() {
            StepOutcome::Done(shoal_proto::output_tail(
                &text,
                shoal_proto::MAX_STEP_OUTPUT,
            ))
        } else {
            StepOutcome::Failed(shoal_proto::output_tail(
                &format!(
                    "self-test could not start: {}; {text}",
                    self.failed.join("; ")
                ),
                shoal_proto::MAX_STEP_OUTPUT,
            ))
        }
    }
}

impl Shell<'_> {
    /// A maintenance step from the controller: answered at once (done before, no hook, refused), or
    /// started (its answer comes as [`ShellEvent::Maintenance`]).
    pub(super) fn maintenance_step(&mut self, step: MaintenanceStep) -> Option<AgentMsg> {
        let config = &self.config.maintenance;
        let boot_id = maint::read_boot_id(&config.boot_id_file);
        let exec_allowed = match &step.action {
            shoal_proto::MaintenanceAction::Exec { argv } => {
                let canonical = argv.first().and_then(|p| std::fs::canonicalize(p).ok());
                maint::check_exec(argv, canonical.as_deref(), &self.maint.allow)
            }
            _ => Ok(()),
        };
        let work = match self
            .maint
            .book
            .decide(&step, config, exec_allowed, &boot_id)
        {
            Decision::Ignore => {
                debug!(run = %step.run, step = step.step.as_str(), "maintenance step already running");
                return None;
            }
            Decision::Answer(outcome) => {
                self.store_reboot_record();
                info!(run = %step.run, step = step.step.as_str(), outcome = ?outcome, "maintenance step answered from the record");
                return Some(result_msg(&step, outcome));
            }
            Decision::Run(work) => work,
        };
        info!(run = %step.run, step = step.step.as_str(), action = %step.action, "maintenance step");
        let events = self.events.clone();
        match work {
            Work::Hook { command, .. } => {
                let config = config.clone();
                tokio::spawn(async move {
                    let outcome = maint::hook_step(&config, &command, &step).await;
                    let _ = events.send(ShellEvent::Maintenance { step, outcome });
                });
                None
            }
            Work::Exec(argv) => {
                let (config, allow) = (config.clone(), self.maint.allow.clone());
                tokio::spawn(async move {
                    let outcome = maint::exec_step(&config, &allow, &argv, &step).await;
                    let _ = events.send(ShellEvent::Maintenance { step, outcome });
                });
                None
            }
            Work::SmartTest => {
                let mut pending = PendingSmart {
                    step: step.clone(),
                    waiting: Default::default(),
                    started: vec![],
                    failed: vec![],
                    skipped: vec![],
                };
                let Some(inputs) = self.drives.inputs.clone() else {
                    return self.maintenance_done(
                        step,
                        StepOutcome::Done(
                            "no drives with SMART (the drive manager is off: --no-drives)".into(),
                        ),
                        true,
                    );
                };
                for drive in self.drives.last.iter().flat_map(|r| r.drives.iter()) {
                    match &drive.smart {
                        Some(shoal_proto::SmartOutcome::Report(_)) => {
                            self.maint.next_id += 1;
                            let id = MAINT_DRIVE_ID | self.maint.next_id;
                            pending.waiting.insert(id, drive.name.clone());
                            let cmd = shoal_proto::DriveCommand {
                                id,
                                device: drive.name.clone(),
                                action: shoal_proto::DriveAction::SelfTest(
                                    shoal_proto::SelfTestKind::Short,
                                ),
                            };
                            let _ = inputs.send(DriveInput::Command(cmd));
                        }
                        _ => pending.skipped.push(drive.name.clone()),
                    }
                }
                if pending.waiting.is_empty() {
                    let outcome = pending.outcome();
                    return self.maintenance_done(step, outcome, true);
                }
                self.maint.smart = Some(pending);
                None
            }
            Work::Reboot => {
                // A maintenance reboot is a full one (firmware, the real boot path), not kexec.
                let method = match reboot::decide(&self.config.reboot, false, None) {
                    Ok(m) => m,
                    Err(refusal) => {
                        return self.maintenance_done(step, StepOutcome::Failed(refusal), true)
                    }
                };
                let record = maint::RebootRecord {
                    run: step.run.clone(),
                    boot_id,
                };
                if let Err(e) = maint::store_record(&self.config.state_dir, Some(&record)) {
                    return self.maintenance_done(
                        step,
                        StepOutcome::Failed(format!(
                            "cannot record the reboot in the state dir: {e}"
                        )),
                        true,
                    );
                }
                self.maint.book.rebooting(record);
                warn!(run = %step.run, %method, "maintenance reboot");
                let answer = result_msg(&step, StepOutcome::Rebooting(method.to_string()));
                spawn_reboot(events, method, move |e| ShellEvent::Maintenance {
                    step,
                    outcome: StepOutcome::Failed(format!("the reboot did not happen: {e}")),
                });
                Some(answer)
            }
        }
    }

    /// A step's work ended: remember it, answer if the session can carry it (otherwise the
    /// controller repeats the step on the next connection).
    pub(super) fn maintenance_done(
        &mut self,
        step: MaintenanceStep,
        outcome: StepOutcome,
        ready: bool,
    ) -> Option<AgentMsg> {
        self.maint.book.finished(&step.run, step.step, &outcome);
        self.store_reboot_record();
        info!(run = %step.run, step = step.step.as_str(), outcome = ?outcome, "maintenance step ended");
        (ready && self.updates).then(|| result_msg(&step, outcome))
    }

    fn store_reboot_record(&self) {
        if let Err(e) = maint::store_record(&self.config.state_dir, self.maint.book.reboot_record())
        {
            warn!(cause = %e, "cannot update the maintenance reboot record");
        }
    }

    /// The drive manager's answer to a self-test a step started ([`is_self_test_answer`]); the step
    /// ends when every drive answered.
    pub(super) fn self_test_answer(
        &mut self,
        answer: DriveCommandResult,
        ready: bool,
    ) -> Option<AgentMsg> {
        let pending = self.maint.smart.as_mut()?;
        let device = pending.waiting.remove(&answer.id)?;
        match answer.result {
            Ok(_) => pending.started.push(device),
            Err(e) => pending.failed.push(format!("{device}: {e}")),
        }
        if !pending.waiting.is_empty() {
            return None;
        }
        let pending = self.maint.smart.take()?;
        self.maintenance_done(pending.step.clone(), pending.outcome(), ready)
    }
}

/// Whether a drive command's answer is for a self-test a maintenance step started (kept from the
/// controller, which never sent that command).
pub(super) fn is_self_test_answer(answer: &DriveCommandResult) -> bool {
    answer.id & MAINT_DRIVE_ID != 0
}

fn result_msg(step: &MaintenanceStep, outcome: StepOutcome) -> AgentMsg {
    AgentMsg::MaintenanceResult(MaintenanceResult {
        run: step.run.clone(),
        step: step.step,
        outcome,
    })
}
