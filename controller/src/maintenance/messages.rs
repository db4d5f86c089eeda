//! What the maintenance domain does with an agent's messages, as the connection's session hands them
//! over (`shoal_controller_core::session::Action`); each returns the transport actions to carry
//! out.

use std::sync::Arc;

use shoal_controller_core::session::{Action, Session};
use shoal_proto::NodeId;

use crate::{connections::ConnCtx, server::Controller};

/// `Action::RebootAnswer`.
pub(crate) async fn reboot_answer(
    controller: &Arc<Controller>,
    ctx: &mut ConnCtx,
    session: &mut Session,
    answer: Result<String, String>,
) -> Vec<Action> {
    if let Some(node) = session.node().cloned() {
        if answer.is_ok() {
            // The node's own re-enrolment after the reboot must not be refused as a claim
            // of a live node while this session winds down.
            if let Some(conn) = controller
                .live()
                .conns
                .get_mut(&node)
                .filter(|c| c.conn_id == ctx.conn_id)
            {
                conn.leaving = true;
            }
        }
        let c = controller.clone();
        let _ = tokio::task::spawn_blocking(move || c.reboot_answered(&node, answer)).await;
    }
    vec![]
}

/// `Action::MaintenanceResult`.
pub(crate) async fn maintenance_result(
    controller: &Arc<Controller>,
    session: &mut Session,
    result: shoal_proto::MaintenanceResult,
) -> Vec<Action> {
    if let Some(node) = session.node().cloned() {
        let c = controller.clone();
        let _ = tokio::task::spawn_blocking(move || c.maintenance_result(&node, result)).await;
    }
    vec![]
}

/// `Action::BootReport`.
pub(crate) async fn boot_report(
    controller: &Arc<Controller>,
    ctx: &mut ConnCtx,
    session: &mut Session,
    report: shoal_proto::BootReport,
) -> Vec<Action> {
    if let Some(node) = session.node().cloned() {
        let c = controller.clone();
        let conn_id = ctx.conn_id;
        let _ = tokio::task::spawn_blocking(move || c.boot_reported(&node, conn_id, report)).await;
    }
    vec![]
}

/// A node connected: repeat the maintenance step it may not have received (v4 and later).
pub(crate) async fn connected(controller: &Arc<Controller>, node: &NodeId, protocol: Option<u16>) {
    if protocol.is_some_and(|v| v >= shoal_proto::UPDATES_PROTOCOL) {
        let c = controller.clone();
        let n = node.clone();
        let _ = tokio::task::spawn_blocking(move || c.maintenance_reconnected(&n)).await;
    }
}
