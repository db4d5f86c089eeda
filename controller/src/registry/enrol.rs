//! Where the registry acts on an agent's session: enrolment (the decision is
//! `shoal_controller_core::enrolment::decide`, written by `Store::enrol`), certificate renewal and
//! key rotation, and what a connected node's first messages and heartbeats change.

use crate::server::{now_ms, Controller};
use std::{sync::Arc, time::Instant};

use shoal_overlay::pki;
use shoal_proto::{Enrolled, HealthReport, JoinToken, NodeId, RejectCode, UnixMillis};
use tracing::{info, warn};

use crate::registry::{
    identity_store::CertRecord,
    store::{EnrolError, EnrolParams},
};

pub(crate) fn heartbeat(controller: &Arc<Controller>, node: &NodeId, health: Option<HealthReport>) {
    let transition = {
        let mut live = controller.live();
        let entry = live.nodes.entry(node.clone()).or_default();
        entry.last_seen = Some(now_ms());
        entry.dirty = true;
        if health.is_some() {
            entry.health = health;
        }
        live.liveness.heartbeat(node, Instant::now())
    };
    if let Some(t) = transition {
        let _ = controller.transitions.send(vec![t]);
    }
}

/// Issues a certificate for `key`'s CSR and records its serial before it is handed out.
pub(crate) fn issue_cert(
    controller: &Controller,
    csr_der: &[u8],
    node: &NodeId,
    key: [u8; 32],
) -> Result<(Vec<u8>, UnixMillis), (RejectCode, String)> {
    let now = now_ms();
    let (cert_der, not_after) = controller
        .ca
        .issue_node_cert(csr_der, node, now, controller.config.cert_ttl)
        .map_err(|e| (RejectCode::BadRequest, e.to_string()))?;
    let serial = pki::cert_info(&cert_der)
        .map_err(|e| (RejectCode::Unavailable, e.to_string()))?
        .serial;
    controller
        .store
        .record_cert(
            &serial,
            &CertRecord {
                node: node.clone(),
                key,
                issued_at: now,
                not_after,
            },
        )
        .map_err(|e| {
            (
                RejectCode::Unavailable,
                format!("controller storage failed: {e}"),
            )
        })?;
    Ok((cert_der, not_after))
}

/// A key rotation: the old key (the one this connection's certificate holds) signed the new key;
/// the new key becomes the node's next key and gets a certificate.
pub(crate) fn rotate_key(
    controller: &Controller,
    node: &NodeId,
    old_cert: &[u8],
    req: &shoal_proto::RotateKeyRequest,
) -> Result<(Vec<u8>, UnixMillis), (RejectCode, String)> {
    let bad = |m: String| (RejectCode::BadRequest, m);
    let new_spki = pki::csr_spki(&req.csr_der)
        .map_err(|e| bad(format!("invalid certificate signing request: {e}")))?;
    let old_spki = pki::cert_spki(old_cert).map_err(|e| bad(e.to_string()))?;
    if !pki::verify_rotation(&old_spki, node, &new_spki, &req.signature) {
        return Err(bad(
            "the key rotation is not signed by the node's current key".into(),
        ));
    }
    let new_key = pki::sha256(&new_spki);
    if new_key == pki::sha256(&old_spki) {
        return Err(bad("a rotation needs a new key".into()));
    }
    controller
        .store
        .begin_rotation(node, &new_key, now_ms())
        .map_err(|e| {
            (
                RejectCode::Unavailable,
                format!("controller storage failed: {e}"),
            )
        })?;
    issue_cert(controller, &req.csr_der, node, new_key)
}

/// Enrols an agent (see [`enrol_once`]), counted for the metrics.
pub(crate) fn enrol(
    controller: &Controller,
    request: &shoal_proto::EnrolRequest,
    hello: &shoal_proto::Hello,
    remote: &str,
) -> Result<Enrolled, (RejectCode, String)> {
    let result = enrol_once(controller, request, hello, remote);
    controller
        .observe
        .enrolment(result.as_ref().err().map(|(code, _)| *code));
    result
}

fn enrol_once(
    controller: &Controller,
    request: &shoal_proto::EnrolRequest,
    hello: &shoal_proto::Hello,
    remote: &str,
) -> Result<Enrolled, (RejectCode, String)> {
    let token: JoinToken = request
        .token
        .parse()
        .map_err(|e: shoal_proto::TokenFormatError| (RejectCode::TokenUnknown, e.to_string()))?;
    if token.ca_sha256 != controller.ca.sha256() {
        return Err((
            RejectCode::TokenUnknown,
            "the join token was issued by another controller".into(),
        ));
    }
    // Check the request before spending a token use on it; its key is what the node will be bound
    // to.
    let key = pki::csr_spki(&request.csr_der)
        .map(|spki| pki::sha256(&spki))
        .map_err(|e| {
            (
                RejectCode::BadRequest,
                format!("invalid certificate signing request: {e}"),
            )
        })?;
    let now = now_ms();
    // Live: a connection is open and the node was heard from within two heartbeats. A machine that
    // crashed and rebooted must not wait out QUIC's idle timeout on its dead connection.
    let recent = controller.config.heartbeat_interval.as_millis() as u64 * 2;
    let is_live = |n: &NodeId| {
        let live = controller.live();
        let heard = live
            .nodes
            .get(n)
            .and_then(|l| l.last_seen)
            .is_some_and(|t| now.0.saturating_sub(t.0) <= recent);
        let here = heard && live.conns.get(n).is_some_and(|c| !c.leaving);
        drop(live);
        // Or connected to another controller of the cluster (which lists only sessions heard
        // from recently: see `local_presence`).
        here || controller.mesh.remote(n).is_some_and(|r| r.presence.live)
    };
    let enrolment = controller
        .store
        .enrol(&EnrolParams {
            token_id: &token.id,
            secret: &token.secret,
            hardware_id: &hello.hardware_id,
            hostname: &request.hostname,
            now,
            key: &key,
            remote,
            is_live: &is_live,
        })
        .map_err(|e| match e {
            EnrolError::Refused(r) => {
                use shoal_controller_core::registry::EnrolRefusal as R;
                let code = match r {
                    R::TokenUnknown | R::TokenForAnotherMachine { .. } => RejectCode::TokenUnknown,
                    R::TokenExpired { .. } => RejectCode::TokenExpired,
                    R::TokenUsedUp { .. } => RejectCode::TokenUsedUp,
                    R::TokenRevoked { .. } => RejectCode::TokenRevoked,
                    R::NodeRemoved { .. } | R::ClaimDenied { .. } => RejectCode::NodeRevoked,
                    R::IdentityInUse { .. } => RejectCode::IdentityInUse,
                    R::AwaitingApproval { .. } => RejectCode::AwaitingApproval,
                    R::TooManyPending { .. } => RejectCode::Unavailable,
                    #[allow(unreachable_patterns)]
                    _ => RejectCode::TokenUnknown,
                };
                if matches!(r, R::IdentityInUse { .. } | R::ClaimDenied { .. } | R::TokenForAnotherMachine { .. }) {
                    warn!(%remote, hardware_id = %hello.hardware_id, refusal = %r, "refused a claim of a node's identity");
                }
                (code, r.to_string())
            }
            EnrolError::Store(e) => (RejectCode::Unavailable, format!("controller storage failed: {e}")),
        })?;
    let node = enrolment.node;
    if !enrolment.replay {
        // A new node joins its networks; a re-enrolment merged the token's labels, which
        // networks, drive policies and the drivers follow.
        crate::registry::labels::follow(controller, &node.id);
        if enrolment.proof.is_some() {
            // Peers must stop trusting the key the record had before.
            if let Err(e) = controller
                .overlay
                .key_changed(&controller.store, &node.id, key)
            {
                warn!(node = %node.id, cause = %e, "could not tell the overlay the re-enrolled node's new key");
            }
        }
    }
    let (cert_der, not_after) = issue_cert(controller, &request.csr_der, &node.id, key)?;
    info!(
        node = %node.id, hostname = %node.hostname, hardware_id = %node.hardware_id, new = enrolment.new,
        proof = ?enrolment.proof, replay = enrolment.replay, "node enrolled"
    );
    Ok(Enrolled {
        node_id: node.id,
        cert_der,
        ca_der: controller.ca.cert_der().to_vec(),
        not_after,
    })
}
