//! The drive manager as the shell sees it: started once, outliving control connections; the
//! controller's policy and commands go to it, and its reports and answers go to the controller on
//! sessions that speak drives (protocol 3).

use shoal_proto::{AgentMsg, DriveCommand, DriveCommandResult, DrivePolicy, DriveReport};
use tokio::sync::mpsc;
use tracing::warn;

use super::{
    maintenance::is_self_test_answer,
    shell::{Shell, ShellEvent},
    AgentConfig,
};
use crate::drives::{DriveEvent, DriveInput};

/// The drive manager as the shell sees it.
pub(super) struct DrivesState {
    /// Policy and commands go here; `None` when the drive manager is off.
    pub(super) inputs: Option<mpsc::UnboundedSender<DriveInput>>,
    /// The newest drive report, sent again on every new connection.
    pub(super) last: Option<DriveReport>,
}

impl DrivesState {
    /// Starts the drive manager (unless `--no-drives`), its events forwarded to `events`. It
    /// outlives control connections: hot-adds, missing drives and policy `prepare` are handled
    /// while the controller is away too.
    pub(super) fn start(
        config: &AgentConfig,
        events: &mpsc::UnboundedSender<ShellEvent>,
    ) -> DrivesState {
        let inputs = config.drives.clone().map(|mut drives| {
            drives
                .policy_cache
                .get_or_insert_with(|| config.state_dir.join("drive-policy.json"));
            let (input_tx, input_rx) = mpsc::unbounded_channel();
            let (drive_tx, mut drive_rx) = mpsc::unbounded_channel();
            tokio::spawn(crate::drives::run(drives, input_rx, drive_tx));
            let events = events.clone();
            tokio::spawn(async move {
                while let Some(event) = drive_rx.recv().await {
                    if events.send(ShellEvent::Drives(event)).is_err() {
                        return;
                    }
                }
            });
            input_tx
        });
        DrivesState { inputs, last: None }
    }
}

impl Shell<'_> {
    /// The session speaks drives: the newest report, if there is one yet.
    pub(super) fn drive_report(&self) -> Option<AgentMsg> {
        self.drives
            .last
            .as_ref()
            .map(|report| AgentMsg::Drives(report.clone()))
    }

    /// The controller's drive policy, for the drive manager (if it runs).
    pub(super) fn drive_policy(&self, policy: DrivePolicy) {
        if let Some(tx) = &self.drives.inputs {
            let _ = tx.send(DriveInput::Policy(policy));
        }
    }

    /// An operator's drive command, for the drive manager; refused at once when it is off.
    pub(super) fn drive_command(&self, command: DriveCommand) -> Option<AgentMsg> {
        match &self.drives.inputs {
            Some(tx) => {
                let _ = tx.send(DriveInput::Command(command));
                None
            }
            None => Some(AgentMsg::DriveCommandResult(DriveCommandResult {
                id: command.id,
                result: Err("the drive manager is off on this node (--no-drives)".into()),
            })),
        }
    }

    /// What the drive manager reports: kept and passed on while a session that speaks drives is
    /// up; a self-test a maintenance step started goes to that step instead.
    pub(super) fn drive_event(
        &mut self,
        event: DriveEvent,
        ready: bool,
        drives: bool,
    ) -> Option<AgentMsg> {
        match event {
            DriveEvent::Report(report) => {
                self.drives.last = Some(report.clone());
                (ready && drives).then_some(AgentMsg::Drives(report))
            }
            DriveEvent::Answer(answer) if is_self_test_answer(&answer) => {
                self.self_test_answer(answer, ready)
            }
            DriveEvent::Answer(answer) => {
                if !(ready && drives) {
                    warn!(id = answer.id, "a drive command ended while the controller was away; its result is not delivered");
                }
                (ready && drives).then_some(AgentMsg::DriveCommandResult(answer))
            }
        }
    }
}
