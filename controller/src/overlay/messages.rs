//! What the overlay domain does with an agent's messages, as the connection's session hands them
//! over (`shoal_controller_core::session::Action`); each returns the transport actions to carry
//! out.

use std::sync::Arc;

use shoal_controller_core::session::{Action, Session};
use tracing::{info, warn};

use crate::{connections::ConnCtx, server::Controller};

/// `Action::Overlay`.
pub(crate) async fn hello(
    controller: &Arc<Controller>,
    ctx: &mut ConnCtx,
    session: &mut Session,
    hello: shoal_proto::OverlayHello,
) -> Vec<Action> {
    let (Some(node), Some(key)) = (session.node().cloned(), ctx.node_key) else {
        return vec![];
    };
    // A node whose key must rotate away (a certificate of it was revoked) is not vouched
    // for to its peers with that key.
    let key = if ctx.must_rotate {
        shoal_proto::KEY_WITHDRAWN
    } else {
        key
    };
    let c = controller.clone();
    let n = node.clone();
    let index = tokio::task::spawn_blocking(move || {
        c.store.set_node_key(&n, key).map_err(|e| e.to_string())?;
        c.store.peer_index(&n).map_err(|e| e.to_string())
    })
    .await;
    let index = match index {
        Ok(Ok(i)) => i,
        Ok(Err(e)) => {
            warn!(node = %node, cause = %e, "overlay state unavailable; the agent will retry on its next connection");
            return vec![];
        }
        Err(_) => return vec![],
    };
    let msgs = controller.overlay.hello(
        &node,
        ctx.conn_id,
        &ctx.conn,
        &ctx.overlay_tx,
        index,
        key,
        &hello,
    );
    if ctx.relay.is_none() {
        ctx.relay = Some(tokio::spawn(controller.overlay.clone().relay(
            node.clone(),
            index,
            ctx.conn.clone(),
        )));
        info!(node = %node, index = index.0, observed = %ctx.conn.remote_address(), nat = ?hello.nat, "agent joined the overlay");
    }
    msgs.into_iter().map(Action::Send).collect()
}

/// `Action::Paths`; also where a rebound control connection is noticed (reports come every 5 s).
pub(crate) async fn paths(
    controller: &Arc<Controller>,
    ctx: &mut ConnCtx,
    session: &mut Session,
    report: shoal_proto::PathReportV8,
) -> Vec<Action> {
    let Some(node) = session.node() else {
        return vec![];
    };
    controller.overlay.paths_reported(node, report);
    controller
        .overlay
        .recheck_observed(node, ctx.conn_id, &ctx.conn)
        .into_iter()
        .map(Action::Send)
        .collect()
}

/// `Action::Datapath` (v9): kept in memory with the node's path report, replacing the last one.
pub(crate) fn datapath(
    controller: &Arc<Controller>,
    session: &mut Session,
    report: shoal_proto::DatapathReport,
) -> Vec<Action> {
    if let Some(node) = session.node() {
        controller.overlay.datapath_reported(node, report);
    }
    vec![]
}

/// `Action::Punch`.
pub(crate) async fn punch(
    controller: &Arc<Controller>,
    session: &mut Session,
    p: shoal_proto::Punch,
) -> Vec<Action> {
    if let Some(node) = session.node() {
        controller.overlay.punch(node, &p);
    }
    vec![]
}
