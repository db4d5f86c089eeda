//! What the releases domain does with an agent's messages, as the connection's session hands them
//! over (`shoal_controller_core::session::Action`); each returns the transport actions to carry
//! out.

use std::sync::Arc;

use shoal_controller_core::session::{Action, Session};

use crate::server::Controller;

/// `Action::UpdateAck`.
pub(crate) async fn update_ack(
    controller: &Arc<Controller>,
    session: &mut Session,
    version: String,
) -> Vec<Action> {
    if let Some(node) = session.node() {
        controller.update_acknowledged(node, version);
    }
    vec![]
}

/// `Action::UpdateReport`.
pub(crate) async fn update_report(
    controller: &Arc<Controller>,
    session: &mut Session,
    report: shoal_proto::UpdateReport,
) -> Vec<Action> {
    if let Some(node) = session.node().cloned() {
        let c = controller.clone();
        let _ = tokio::task::spawn_blocking(move || c.update_reported(&node, report)).await;
    }
    vec![]
}
