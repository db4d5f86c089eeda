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
    /// Shared with the running tasks: a task keeps its result itself as it ends, so the result is
    /// on disk even while no session runs (the controller is down) and outlives the agent.
    pub(super) book: std::sync::Arc<std::sync::Mutex<ResultBook>>,
}

impl BackupState {
    /// The result book.
    pub(super) fn book(&self) -> std::sync::MutexGuard<'_, ResultBook> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Results kept in the state dir from before.
    pub(super) fn new(config: BackupConfig) -> BackupState {
        let book = ResultBook::load(config.work_dir.join("results"));
        BackupState {
            config,
            book: std::sync::Arc::new(std::sync::Mutex::new(book)),
        }
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
        let offered = self.backups.book().offer(&task.id);
        match offered {
            TaskDecision::Running => {
                debug!(task = %task.id, "backup task already running");
                None
            }
            TaskDecision::Finished(result) => Some(AgentMsg::BackupResult(*result)),
            TaskDecision::Start => {
                info!(task = %task.id, job = %task.job, kind = task.kind.name(), targets = task.targets.len(), "backup task started");
                let config = self.backups.config.clone();
                let events = self.events.clone();
                let book = self.backups.book.clone();
                tokio::spawn(async move {
                    let progress_events = events.clone();
                    let result = backup::run_task(&config, &node, &task, move |p| {
                        let _ = progress_events.send(ShellEvent::BackupProgress(p));
                    })
                    .await;
                    book.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .finished(&result);
                    let _ = events.send(ShellEvent::BackupDone(Box::new(result)));
                });
                None
            }
        }
    }

    /// A task ended (its result is already kept): send it.
    pub(super) fn backup_done(&mut self, result: BackupResult, ready: bool) -> Option<AgentMsg> {
        info!(task = %result.task, job = %result.job, failed_targets = result.targets.iter().filter(|t| t.error.is_some()).count(), error = ?result.error, "backup task ended");
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
        let kept = self.backups.book().unacknowledged();
        for result in kept {
            shoal_overlay::send_msg(send, &AgentMsg::BackupResult(result)).await?;
        }
        Ok(())
    }
}
