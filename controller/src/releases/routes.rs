//! Agent release routes of the admin API (behind the same bearer authentication):
//!
//! - `GET /v1/releases`: stored releases;
//! - `POST /v1/releases/{version}/{target}/files/{agent|manifest.json|manifest.sig}` (raw body,
//!   staged), then `POST /v1/releases/{version}/{target}` (verify with the controller's release
//!   keys, store);
//! - `POST /v1/nodes/{id}/agent-update` `{"version": V}`: offer a release to a node;
//! - `GET /v1/agent-updates`: the latest offer, acknowledgement and report per node.

use crate::store::ReleaseEvent;
use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::StatusCode,
    routing::{get, post},
    Json, Router,
};
use shoal_proto::NodeId;
use tracing::info;

use crate::{
    releases::store::{ReleaseStoreError, StoredRelease},
    releases::updates::UpdateError,
    server::now_ms,
    server::Controller,
    store::EventKind,
};
use shoal_controller_core::time::rfc3339_ms as rfc3339;

type Ctl = Arc<Controller>;

/// Largest agent binary accepted (512 MiB).
const MAX_UPLOAD: usize = 512 << 20;

use crate::http::{blocking, HttpError as Failure};

impl From<ReleaseStoreError> for Failure {
    fn from(e: ReleaseStoreError) -> Self {
        let status = match e {
            ReleaseStoreError::Io { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ReleaseStoreError::Unknown { .. } => StatusCode::NOT_FOUND,
            ReleaseStoreError::Exists { .. } => StatusCode::CONFLICT,
            _ => StatusCode::BAD_REQUEST,
        };
        Failure(status, e.to_string())
    }
}

impl From<UpdateError> for Failure {
    fn from(e: UpdateError) -> Self {
        let status = match e {
            UpdateError::UnknownNode(_) => StatusCode::NOT_FOUND,
            UpdateError::NotConnected(_)
            | UpdateError::AgentTooOld { .. }
            | UpdateError::NoRelease { .. } => StatusCode::CONFLICT,
            UpdateError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        };
        Failure(status, e.to_string())
    }
}

pub use shoal_api::releases::{AgentUpdateView, OfferUpdate, ReleaseView};

fn release_view(r: &StoredRelease) -> ReleaseView {
    ReleaseView {
        version: r.manifest.version.clone(),
        target: r.manifest.target.clone(),
        size: r.manifest.size,
        sha256: r.manifest.sha256.clone(),
        key_id: r.key_id.clone(),
        created_at: rfc3339(r.manifest.created_at.0),
    }
}

/// The routes; the caller adds authentication and state.
pub fn routes() -> Router<Ctl> {
    Router::new()
        .route("/v1/releases", get(list))
        .route("/v1/releases/{version}/{target}", post(commit))
        .route(
            "/v1/releases/{version}/{target}/files/{name}",
            post(upload).layer(DefaultBodyLimit::max(MAX_UPLOAD)),
        )
        .route("/v1/nodes/{id}/agent-update", post(offer))
        .route("/v1/agent-updates", get(updates))
}

async fn list(State(ctl): State<Ctl>) -> Result<Json<Vec<ReleaseView>>, Failure> {
    blocking(move || {
        Ok(Json(
            ctl.releases.list()?.iter().map(release_view).collect(),
        ))
    })
    .await
}

async fn upload(
    State(ctl): State<Ctl>,
    Path((version, target, name)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<StatusCode, Failure> {
    blocking(move || {
        ctl.releases.stage(&version, &target, &name, &body)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn commit(
    State(ctl): State<Ctl>,
    Path((version, target)): Path<(String, String)>,
) -> Result<Json<ReleaseView>, Failure> {
    blocking(move || {
        let r = ctl.releases.commit(&version, &target).inspect_err(|e| info!(version = %version, cause = %e, "release refused"))?;
        info!(version = %version, target = %target, size = r.manifest.size, key_id = %r.key_id, "agent release added");
        let message = format!("agent release {version} for {target} added ({} bytes, key {})", r.manifest.size, r.key_id);
        ctl.store.append_event(EventKind::Releases(ReleaseEvent::ReleaseAdded), None, &message, now_ms()).map_err(|e| Failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        Ok(Json(release_view(&r)))
    })
    .await
}

async fn offer(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
    Json(req): Json<OfferUpdate>,
) -> Result<StatusCode, Failure> {
    blocking(move || {
        ctl.offer_agent_update(&NodeId(id), &req.version)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn updates(State(ctl): State<Ctl>) -> Json<Vec<AgentUpdateView>> {
    Json(
        ctl.agent_updates()
            .into_iter()
            .map(|(node, u)| AgentUpdateView {
                node: node.0,
                offered: u.offered.map(|o| o.0),
                acknowledged: u.acknowledged,
                failure: u
                    .report
                    .as_ref()
                    .and_then(|r| r.failure.as_ref())
                    .map(|f| f.to_string()),
                report: u.report,
            })
            .collect(),
    )
}
