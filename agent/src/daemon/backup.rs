//! Backup tasks as the shell carries them out: each runs in its own tokio task (the control
//! session goes on meanwhile), reports progress and its result as [`ShellEvent`]s, and the result
//! is kept until the controller acknowledges it.

use shoal_proto::{AgentMsg, BackupResult, BackupTask};
use tracing::{debug, info, warn};

use super::shell::{Shell, ShellEvent};
use crate::backup::{self, BackupConfig, ResultBook, TaskDecision};

/// Backups as the shell sees them.
pub(super) struct BackupState {
    pub(super) config: BackupConfig,
    pub(super) book: ResultBook,
}

impl BackupState {
    /// Results kept in the state dir from before.
    pub(super) fn new(config: BackupConfig) -> BackupState {
        let book = ResultBook::load(config.work_dir.join("results"));
        BackupState { config, book }
    }
}

impl Shell<'_> {
    /// A task from the controller: started, ignored (it runs), or answered with its kept result.
    pub(super) fn backup_task(&mut self, task: BackupTask) -> Option<AgentMsg> {
        let node = match self.state.load() {
            Ok(Some(c)) => c.node_id.0,
            _ => {
                warn!(task = %task.id, "backup task without credentials; ignored");
                return None;
            }
        };
        match self.backups.book.offer(&task.id) {
            TaskDecision::Running => {
                debug!(task = %task.id, "backup task already running");
                None
            }
            TaskDecision::Finished(result) => Some(AgentMsg::BackupResult(*result)),
            TaskDecision::Start => {
                info!(task = %task.id, job = %task.job, kind = task.kind.name(), targets = task.targets.len(), "backup task started");
                let config = self.backups.config.clone();
                let events = self.events.clone();
                tokio::spawn(async move {
                    let progress_events = events.clone();
                    let result = backup::run_task(&config, &node, &task, move |p| {
                        let _ = progress_events.send(ShellEvent::BackupProgress(p));
                    })
                    .await;
                    let _ = events.send(ShellEvent::BackupDone(Box::new(result)));
                });
                None
            }
        }
    }

    /// A task ended: keep the result and send it.
    pub(super) fn backup_done(&mut self, result: BackupResult, ready: bool) -> Option<AgentMsg> {
        info!(task = %result.task, job = %result.job, failed_targets = result.targets.iter().filter(|t| t.error.is_some()).count(), error = ?result.error, "backup task ended");
        self.backups.book.finished(&result);
        (ready && self.protocol >= shoal_proto::BACKUP_PROTOCOL)
            .then_some(AgentMsg::BackupResult(result))
    }

    /// Progress, passed on while connected.
    pub(super) fn backup_progress(
        &mut self,
        p: shoal_proto::BackupProgress,
        ready: bool,
    ) -> Option<AgentMsg> {
        (ready && self.protocol >= shoal_proto::BACKUP_PROTOCOL)
            .then_some(AgentMsg::BackupProgress(p))
    }

    /// A new session: send every result not acknowledged yet.
    pub(super) async fn send_backup_results(
        &mut self,
        send: &mut quinn::SendStream,
    ) -> Result<(), super::shell::AttemptError> {
        for result in self.backups.book.unacknowledged() {
            shoal_overlay::send_msg(send, &AgentMsg::BackupResult(result)).await?;
        }
        Ok(())
    }
}
