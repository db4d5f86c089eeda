//! What the backup domain does with an agent's messages: progress is kept in memory, a result is
//! folded into the node's job state, logged, and acknowledged.

use std::sync::Arc;

use shoal_controller_core::{
    backups::{short_id, BackupEvent, Finding},
    session::{Action, Session},
};
use shoal_proto::{BackupProgress, BackupResult, ControllerMsg, NodeId};
use tracing::{info, warn};

use crate::server::{now_ms, Controller};

/// A node connected: send it again every task it has in flight (v6 and later).
pub(crate) async fn connected(controller: &Arc<Controller>, node: &NodeId, protocol: Option<u16>) {
    if protocol.is_some_and(|v| v >= shoal_proto::BACKUP_PROTOCOL) {
        let c = controller.clone();
        let n = node.clone();
        let _ = tokio::task::spawn_blocking(move || c.backup_reconnected(&n)).await;
    }
}

/// `Action::BackupProgress`.
pub(crate) fn progress(
    controller: &Arc<Controller>,
    session: &Session,
    p: BackupProgress,
) -> Vec<Action> {
    if let Some(node) = session.node().cloned() {
        let key = (node, p.task.clone());
        controller
            .backups
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (p, now_ms()));
    }
    vec![]
}

/// `Action::BackupResult`: stored (and logged) before it is acknowledged, so an agent forgets a
/// result only once the controller has it.
pub(crate) async fn result(
    controller: &Arc<Controller>,
    session: &Session,
    result: BackupResult,
) -> Vec<Action> {
    let Some(node) = session.node().cloned() else {
        return vec![];
    };
    let task = result.task.clone();
    let c = controller.clone();
    match tokio::task::spawn_blocking(move || c.backup_result(&node, result)).await {
        Ok(true) => vec![Action::Send(ControllerMsg::BackupAck { task })],
        _ => vec![],
    }
}

impl Controller {
    /// Folds a result into the node's state and logs what it meant; `false` if it could not be
    /// stored (the agent sends it again).
    pub(crate) fn backup_result(&self, node: &NodeId, result: BackupResult) -> bool {
        let now = now_ms();
        self.backups
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(node.clone(), result.task.clone()));
        match self.store.backup_job(&result.job) {
            Ok(Some(_)) => {}
            Ok(None) => {
                info!(node = %node, job = %result.job, task = %result.task, "result of a deleted backup job dropped");
                return true;
            }
            Err(e) => {
                warn!(node = %node, cause = %e, "backup result not stored");
                return false;
            }
        }
        let findings = match self
            .store
            .update_backup_state(&result.job, node, |s| s.apply(&result, now))
        {
            Ok(f) => f,
            Err(e) => {
                warn!(node = %node, job = %result.job, cause = %e, "backup result not stored");
                return false;
            }
        };
        let host = self.store.hostname_or_id(node);
        let job = &result.job;
        for f in findings {
            let (kind, message) = match f {
                Finding::BackedUp {
                    target,
                    snapshot,
                    bytes_added,
                } => (
                    BackupEvent::BackupSucceeded,
                    format!("{host}: job {job} backed up to {target}: snapshot {} ({bytes_added} bytes added)", short_id(&snapshot)),
                ),
                Finding::Verified {
                    target,
                    snapshot,
                    files,
                    subset,
                } => (
                    BackupEvent::BackupVerified,
                    format!(
                        "{host}: job {job} on {target}: snapshot {} verified ({files} files restored intact, data subset {}/{} read)",
                        short_id(&snapshot),
                        subset.0,
                        subset.1
                    ),
                ),
                Finding::VerifyFailed {
                    target,
                    snapshot,
                    problems,
                } => (
                    BackupEvent::BackupVerifyFailed,
                    format!("{host}: job {job} on {target}: verification of snapshot {} failed: {problems}", short_id(&snapshot)),
                ),
                Finding::TargetFailed { target, message } => (
                    BackupEvent::BackupFailed,
                    format!("{host}: job {job} on {target}: {} failed: {message}", result.kind),
                ),
                Finding::Restored { target, outcome } => (
                    BackupEvent::BackupRestored,
                    match outcome {
                        Ok(s) => format!("{host}: job {job}: snapshot {} restored from {target}", short_id(&s)),
                        Err(e) => format!("{host}: job {job}: restore from {target} failed: {e}"),
                    },
                ),
                Finding::TaskFailed { message } => (
                    BackupEvent::BackupFailed,
                    format!("{host}: job {job}: {} could not run: {message}", result.kind),
                ),
            };
            info!(node = %node, job = %job, event = kind.name(), "{message}");
            if let Err(e) = self
                .store
                .append_event(kind.into(), Some(node), &message, now)
            {
                warn!(cause = %e, "backup event not logged");
            }
        }
        self.backups.wake.notify_one();
        true
    }
}
