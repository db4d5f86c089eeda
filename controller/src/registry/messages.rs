//! What the registry domain does with an agent's messages, as the connection's session hands them
//! over (`shoal_controller_core::session::Action`); each returns the transport actions to carry
//! out.

use std::sync::Arc;

use shoal_controller_core::session::{Action, Session};
use shoal_overlay::pki;
use shoal_proto::{ControllerMsg, RejectCode, Renewed};
use tracing::{debug, info, warn};

use crate::{
    connections::ConnCtx,
    registry::enrol::{enrol as enrol_node, heartbeat, issue_cert, rotate_key as rotate_node_key},
    server::{now_ms, Controller},
};

/// `Action::Enrol`.
pub(crate) async fn enrol(
    controller: &Arc<Controller>,
    ctx: &mut ConnCtx,
    session: &mut Session,
    request: shoal_proto::EnrolRequest,
    hello: shoal_proto::Hello,
) -> Vec<Action> {
    let c = controller.clone();
    let remote = ctx.remote.clone();
    let outcome =
        tokio::task::spawn_blocking(move || enrol_node(&c, &request, &hello, &remote)).await;
    match outcome {
        Ok(Ok(enrolled)) => session.enrolled(enrolled),
        Ok(Err((code, message))) => {
            info!(code = ?code, %message, "enrolment refused");
            session.refused(code.for_protocol(session.version().unwrap_or(1)), message)
        }
        Err(e) => session.refused(RejectCode::Unavailable, format!("controller error: {e}")),
    }
}

/// `Action::Renew`.
pub(crate) async fn renew(
    controller: &Arc<Controller>,
    ctx: &mut ConnCtx,
    session: &mut Session,
    req: shoal_proto::RenewRequest,
) -> Vec<Action> {
    let (Some(node), Some(bound)) = (session.node().cloned(), ctx.node_key) else {
        return vec![];
    };
    // A renewal is for the key this connection proved, which is the node's; a new key needs
    // a rotation signed by the old one.
    match pki::csr_spki(&req.csr_der).map(|spki| pki::sha256(&spki)) {
        Ok(key) if key == bound => {}
        Ok(_) => {
            return session.refused(
                RejectCode::BadRequest,
                "a renewal must be for the node's own key: rotate keys with RotateKey",
            );
        }
        Err(e) => {
            return session.refused(
                RejectCode::BadRequest,
                format!("invalid certificate signing request: {e}"),
            )
        }
    }
    let c = controller.clone();
    let n = node.clone();
    match tokio::task::spawn_blocking(move || issue_cert(&c, &req.csr_der, &n, bound)).await {
        Ok(Ok((cert_der, not_after))) => {
            info!(node = %node, "certificate renewed");
            vec![Action::Send(ControllerMsg::Renewed(Renewed {
                cert_der,
                not_after,
            }))]
        }
        Ok(Err((code, message))) => session.refused(code, message),
        Err(e) => session.refused(RejectCode::Unavailable, format!("controller error: {e}")),
    }
}

/// `Action::RotateKey`.
pub(crate) async fn rotate_key(
    controller: &Arc<Controller>,
    ctx: &mut ConnCtx,
    session: &mut Session,
    req: shoal_proto::RotateKeyRequest,
) -> Vec<Action> {
    let (Some(node), Some(old_cert)) = (session.node().cloned(), ctx.cert_der.clone()) else {
        return vec![];
    };
    let c = controller.clone();
    let n = node.clone();
    match tokio::task::spawn_blocking(move || rotate_node_key(&c, &n, &old_cert, &req)).await {
        Ok(Ok((cert_der, not_after))) => {
            info!(node = %node, "key rotated: certificate issued for the new key");
            ctx.must_rotate = false;
            vec![Action::Send(ControllerMsg::Renewed(Renewed {
                cert_der,
                not_after,
            }))]
        }
        Ok(Err((code, message))) => {
            warn!(node = %node, %message, "key rotation refused");
            session.refused(code, message)
        }
        Err(e) => session.refused(RejectCode::Unavailable, format!("controller error: {e}")),
    }
}

/// `Action::Connected`: the registry's part (agent version, liveness, the connection's protocol, a
/// pending key rotation); the other domains' parts follow it in the session dispatch.
pub(crate) async fn connected(
    controller: &Arc<Controller>,
    ctx: &mut ConnCtx,
    session: &mut Session,
    hello: shoal_proto::Hello,
) -> Vec<Action> {
    let Some(node) = session.node().cloned() else {
        return vec![];
    };
    let version = hello.agent_version.clone();
    let c = controller.clone();
    let n = node.clone();
    let _ = tokio::task::spawn_blocking(move || {
        c.store.update_node(&n, |rec| {
            if rec.agent_version != version {
                rec.agent_version = version.clone();
            }
        })
    })
    .await;
    info!(node = %node, agent_version = %hello.agent_version, protocol = ?session.version(), "agent connected");
    heartbeat(controller, &node, None);
    let version = session.version();
    if let Some(conn) = controller
        .live()
        .conns
        .get_mut(&node)
        .filter(|c| c.conn_id == ctx.conn_id)
    {
        conn.protocol = version;
    }
    if ctx.must_rotate {
        if version >= Some(shoal_proto::KEY_ROTATION_PROTOCOL) {
            info!(node = %node, "asking the node to rotate its key");
            let reason =
                "a certificate of this node's key was revoked, or an operator asked".to_owned();
            return vec![Action::Send(ControllerMsg::RotateKey { reason })];
        }
        warn!(node = %node, "a certificate of this node's key was revoked, but its agent is too old to rotate keys (protocol 5)");
    }
    vec![]
}

/// `Action::Inventory`.
pub(crate) async fn inventory(
    controller: &Arc<Controller>,
    session: &mut Session,
    inv: shoal_proto::Inventory,
) -> Vec<Action> {
    let Some(node) = session.node().cloned() else {
        return vec![];
    };
    let c = controller.clone();
    let n = node.clone();
    let result = tokio::task::spawn_blocking(move || {
        c.store.update_node(&n, |rec| {
            if !inv.hostname.is_empty() {
                rec.hostname = inv.hostname.clone();
            }
            rec.inventory = Some(inv.clone());
            rec.inventory_at = Some(now_ms());
        })
    })
    .await;
    match result {
        Ok(Ok(_)) => debug!(node = %node, "inventory stored"),
        Ok(Err(e)) => warn!(node = %node, cause = %e, "could not store inventory"),
        Err(e) => warn!(node = %node, cause = %e, "inventory task failed"),
    }
    vec![]
}

/// `Action::Health`.
pub(crate) async fn health(
    controller: &Arc<Controller>,
    session: &mut Session,
    h: shoal_proto::HealthReport,
) -> Vec<Action> {
    if let Some(node) = session.node().cloned() {
        heartbeat(controller, &node, Some(h));
    }
    vec![]
}
