//! What the drives domain does with an agent's messages, as the connection's session hands them
//! over (`shoal_controller_core::session::Action`); each returns the transport actions to carry
//! out.

use std::sync::Arc;

use shoal_controller_core::session::{Action, Session};
use shoal_proto::NodeId;
use tracing::{debug, warn};

use crate::server::{now_ms, Controller};

/// `Action::Drives`.
pub(crate) async fn report(
    controller: &Arc<Controller>,
    session: &mut Session,
    report: shoal_proto::DriveReport,
) -> Vec<Action> {
    let Some(node) = session.node().cloned() else {
        return vec![];
    };
    debug!(node = %node, drives = report.drives.len(), "drive report received");
    let c = controller.clone();
    let n = node.clone();
    match tokio::task::spawn_blocking(move || c.drives.ingest(&n, report, now_ms())).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            warn!(node = %node, cause = %e, "drive report kept in memory only: the store failed")
        }
        Err(e) => warn!(node = %node, cause = %e, "drive report task failed"),
    }
    vec![]
}

/// `Action::DriveCommandResult`.
pub(crate) async fn command_result(
    controller: &Arc<Controller>,
    session: &mut Session,
    result: shoal_proto::DriveCommandResult,
) -> Vec<Action> {
    if let Some(node) = session.node() {
        controller.drives.command_result(node, result);
    }
    vec![]
}

/// A node connected: send its agent its effective drive policy (v3 and later).
pub(crate) async fn connected(
    controller: &Arc<Controller>,
    node: &NodeId,
    conn_id: u64,
    protocol: Option<u16>,
) {
    if protocol.is_some_and(|v| v >= shoal_proto::DRIVES_PROTOCOL) {
        let c = controller.clone();
        let n = node.clone();
        let _ =
            tokio::task::spawn_blocking(move || c.send_drive_policy_on_connect(&n, conn_id)).await;
    }
}
