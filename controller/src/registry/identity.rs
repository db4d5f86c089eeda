//! The controller's shell for node identity: revoking certificates (closing what uses them, asking
//! for a rotation), operators' re-enrolment decisions, and their admin routes:
//!
//! - `GET /v1/enrolments/pending`, `POST /v1/enrolments/pending/{id}/approve|deny`;
//! - `POST /v1/nodes/{id}/reenrol` ([`ReenrolRequest`]), `POST /v1/nodes/{id}/rotate-key`;
//! - `GET /v1/nodes/{id}/certificates`, `POST /v1/certificates/{serial}/revoke`
//!   ([`RevokeCertRequest`]).
//!
//! The rules themselves are in [`shoal_controller_core::enrolment`]; the records in [`crate::store`].

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{Path, State},
    http::StatusCode,
    routing::{get, post},
    Json, Router,
};
use shoal_proto::{ControllerMsg, NodeId, UnixMillis};
use tracing::{info, warn};

use crate::{
    connections::Revoke, http::blocking, http::HttpError, registry::identity_store::normal_serial,
    registry::identity_store::short_key, server::now_ms, server::Controller, store::StoreError,
};
use shoal_api::identity::CertView;
use shoal_api::identity::PendingView;
use shoal_api::identity::ReenrolRequest;
use shoal_api::identity::RevokeCertRequest;
use shoal_api::identity::RevokedCertView;
use shoal_controller_core::enrolment::PendingState;
use shoal_controller_core::time::rfc3339_ms as rfc3339;

type Ctl = Arc<Controller>;

/// How long `nodes reenrol` stays armed unless told otherwise.
pub const DEFAULT_REENROL_TTL: Duration = Duration::from_secs(3600);

/// How often lapsed tokens, grants, pending claims and certificate records are pruned.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

impl Controller {
    /// Revokes a certificate: stored first, then every connection that presented it is closed; when
    /// it held the node's current key, a connected v5 node is asked to rotate at once.
    pub fn revoke_certificate(
        &self,
        serial: &str,
        reason: &str,
    ) -> Result<Option<RevokedCertView>, StoreError> {
        let serial = normal_serial(serial);
        let Some((rec, current)) = self.store.revoke_cert(&serial, reason, now_ms())? else {
            return Ok(None);
        };
        let closed = usize::from(self.certificate_revoked(&rec.node, &serial, reason, current));
        // The node's session may be on another controller of the cluster.
        self.mesh
            .broadcast(crate::cluster::mesh::wire::MeshMsg::CertificateRevoked {
                node: rec.node.clone(),
                serial: serial.clone(),
                reason: reason.to_owned(),
                current,
            });
        if current {
            if let Err(e) = self.overlay.withdraw_key(&self.store, &rec.node) {
                warn!(node = %rec.node, cause = %e, "could not withdraw the revoked key from the overlay; peers still accept it");
            }
        }
        info!(node = %rec.node, %serial, current_key = current, closed, "certificate revoked");
        Ok(Some(RevokedCertView {
            serial,
            node: rec.node.0,
            rotation_required: current,
            closed_connections: closed,
        }))
    }

    /// Ends `node`'s session here if it presented the revoked `serial`, or asks it to rotate its
    /// key when `current` and it presented another; whether a session was ended.
    pub(crate) fn certificate_revoked(
        &self,
        node: &NodeId,
        serial: &str,
        reason: &str,
        current: bool,
    ) -> bool {
        let mut live = self.live();
        let Some(conn) = live.conns.get(node) else {
            return false;
        };
        if conn.serial == serial {
            let _ = conn.revoke.send(Revoke::CertificateRefused(format!(
                "certificate {serial} was revoked: {reason}"
            )));
            live.conns.remove(node);
            return true;
        }
        if current && conn.protocol >= Some(shoal_proto::KEY_ROTATION_PROTOCOL) {
            let _ = conn.tx.send(ControllerMsg::RotateKey {
                reason: format!("certificate {serial} of this key was revoked"),
            });
        }
        false
    }

    /// Asks a node to rotate its key: now, if it is connected on protocol 5, else on its next
    /// session.
    pub fn request_key_rotation(&self, node: &NodeId) -> Result<bool, StoreError> {
        if !self.store.require_rotation(node, now_ms())? {
            return Ok(false);
        }
        // Not connected, or too old to rotate now: the demand is stored for its next session.
        let _ = self.send_to(
            node,
            ControllerMsg::RotateKey {
                reason: "an operator asked".into(),
            },
            shoal_proto::KEY_ROTATION_PROTOCOL,
        );
        Ok(true)
    }

    fn pending_views(&self) -> Result<Vec<PendingView>, StoreError> {
        let now = now_ms();
        Ok(self
            .store
            .pending_enrolments()?
            .into_iter()
            .filter(|p| {
                now.0
                    < p.last_seen
                        .0
                        .saturating_add(shoal_controller_core::enrolment::PENDING_TTL_MS)
            })
            .map(|p| PendingView {
                node_hostname: self.store.hostname_or_id(&p.node),
                id: p.id,
                node: p.node.0,
                hostname: p.hostname,
                hardware_id: p.hardware_id.to_string(),
                key: short_key(&p.key),
                token: p.token_id,
                remote: p.remote,
                first_seen: rfc3339(p.first_seen.0),
                last_seen: rfc3339(p.last_seen.0),
                attempts: p.attempts,
                state: match p.state {
                    PendingState::Waiting => "waiting",
                    PendingState::Approved => "approved",
                    PendingState::Denied => "denied",
                }
                .to_owned(),
            })
            .collect())
    }

    fn cert_views(&self, node: &NodeId) -> Result<Vec<CertView>, StoreError> {
        let bound = self.store.identity(node)?;
        Ok(self
            .store
            .certs_of(node)?
            .into_iter()
            .map(|(serial, c, revoked)| CertView {
                serial,
                issued_at: rfc3339(c.issued_at.0),
                not_after: rfc3339(c.not_after.0),
                key: short_key(&c.key),
                current_key: bound.as_ref().is_some_and(|b| b.key == c.key),
                revoked_at: revoked.as_ref().map(|r| rfc3339(r.revoked_at.0)),
                revoked_reason: revoked.map(|r| r.reason),
            })
            .collect())
    }
}

/// The identity routes, merged into the authenticated admin router.
pub fn routes() -> Router<Ctl> {
    Router::new()
        .route("/v1/enrolments/pending", get(list_pending))
        .route("/v1/enrolments/pending/{id}/approve", post(approve))
        .route("/v1/enrolments/pending/{id}/deny", post(deny))
        .route("/v1/nodes/{id}/reenrol", post(reenrol))
        .route("/v1/nodes/{id}/rotate-key", post(rotate_key))
        .route("/v1/nodes/{id}/certificates", get(certificates))
        .route("/v1/certificates/{serial}/revoke", post(revoke))
}

fn not_found(what: String) -> HttpError {
    HttpError(StatusCode::NOT_FOUND, format!("{what} not found"))
}

async fn list_pending(State(ctl): State<Ctl>) -> Result<Json<Vec<PendingView>>, HttpError> {
    blocking(move || Ok(Json(ctl.pending_views()?))).await
}

async fn decide(ctl: Ctl, id: String, approve: bool) -> Result<Json<PendingView>, HttpError> {
    blocking(move || {
        let decided = ctl
            .store
            .decide_pending(&id, approve, now_ms())?
            .ok_or_else(|| not_found(format!("pending request {id}")))?;
        info!(request = %id, node = %decided.node, approve, "pending enrolment decided");
        let view = ctl
            .pending_views()?
            .into_iter()
            .find(|p| p.id == id)
            .ok_or_else(|| not_found(format!("pending request {id}")))?;
        Ok(Json(view))
    })
    .await
}

async fn approve(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
) -> Result<Json<PendingView>, HttpError> {
    decide(ctl, id, true).await
}

async fn deny(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
) -> Result<Json<PendingView>, HttpError> {
    decide(ctl, id, false).await
}

async fn reenrol(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
    Json(req): Json<ReenrolRequest>,
) -> Result<StatusCode, HttpError> {
    blocking(move || {
        let now = now_ms();
        let ttl = req
            .ttl_secs
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_REENROL_TTL);
        let until = UnixMillis(now.0.saturating_add(ttl.as_millis() as u64));
        if !ctl.store.arm_reenrol(&NodeId(id.clone()), until, now)? {
            return Err(not_found(format!("node {id}")));
        }
        info!(node = %id, ttl = ?ttl, "re-enrolment armed");
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn rotate_key(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
) -> Result<StatusCode, HttpError> {
    blocking(move || {
        if !ctl.request_key_rotation(&NodeId(id.clone()))? {
            return Err(not_found(format!("node {id} (with a key binding)")));
        }
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn certificates(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
) -> Result<Json<Vec<CertView>>, HttpError> {
    blocking(move || {
        let node = NodeId(id.clone());
        if ctl.store.node(&node)?.is_none() {
            return Err(not_found(format!("node {id}")));
        }
        Ok(Json(ctl.cert_views(&node)?))
    })
    .await
}

async fn revoke(
    State(ctl): State<Ctl>,
    Path(serial): Path<String>,
    Json(req): Json<RevokeCertRequest>,
) -> Result<Json<RevokedCertView>, HttpError> {
    blocking(move || {
        let reason = req
            .reason
            .unwrap_or_else(|| "revoked by an operator".into());
        let done = ctl
            .revoke_certificate(&serial, &reason)?
            .ok_or_else(|| not_found(format!("unexpired certificate {serial}")))?;
        Ok(Json(done))
    })
    .await
}
