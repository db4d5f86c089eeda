//! Netboot routes of the admin API (behind the same bearer authentication):
//!
//! - `GET /v1/images`; `POST /v1/images/{version}/files/{name}` (raw body, staged); `POST
//!   /v1/images/{version}` (verify signature and hashes, then store); `POST /v1/images/default`;
//! - `POST /v1/nodes/{id}/image`;
//! - `GET /v1/machines`; `POST /v1/machines/{mac}/admit`; `POST /v1/machines/{mac}/wake`.

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

use super::{
    dhcp::Mac,
    images::{ImageError, Manifest},
};
use crate::server::{now_ms, Controller};
use shoal_api::netboot::{ImageView, MachineView, SetImage};
use shoal_controller_core::time::rfc3339_ms as rfc3339;

type Ctl = Arc<Controller>;

/// Largest upload of one image file (1 GiB).
const MAX_UPLOAD: usize = 1 << 30;

use crate::http::{blocking, HttpError as Failure};

impl From<ImageError> for Failure {
    fn from(e: ImageError) -> Self {
        let status = match e {
            ImageError::Io { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ImageError::Unknown(_) => StatusCode::NOT_FOUND,
            ImageError::Exists(_) => StatusCode::CONFLICT,
            _ => StatusCode::BAD_REQUEST,
        };
        Failure(status, e.to_string())
    }
}

/// The routes; the caller adds authentication and state.
pub fn routes() -> Router<Ctl> {
    Router::new()
        .route("/v1/images", get(list_images))
        .route("/v1/images/default", post(set_default))
        .route("/v1/images/{version}", post(commit_image))
        .route(
            "/v1/images/{version}/files/{name}",
            post(upload_file).layer(DefaultBodyLimit::max(MAX_UPLOAD)),
        )
        .route("/v1/nodes/{id}/image", post(set_node_image))
        .route("/v1/machines", get(list_machines))
        .route("/v1/machines/{mac}/admit", post(admit))
        .route("/v1/machines/{mac}/wake", post(wake))
}

/// The view of a manifest.
pub fn image_view(m: &Manifest, default: bool) -> ImageView {
    ImageView {
        version: m.version.clone(),
        default,
        kernel_bytes: m.kernel.size,
        initrd_bytes: m.initrd.size,
        kernel_sha256: m.kernel.sha256.clone(),
        initrd_sha256: m.initrd.sha256.clone(),
        built_at: m.built_at.clone(),
    }
}

async fn list_images(State(ctl): State<Ctl>) -> Result<Json<Vec<ImageView>>, Failure> {
    blocking(move || {
        Ok(Json(
            ctl.netboot
                .images
                .list()?
                .iter()
                .map(|i| image_view(&i.manifest, i.default))
                .collect(),
        ))
    })
    .await
}

async fn upload_file(
    State(ctl): State<Ctl>,
    Path((version, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, Failure> {
    blocking(move || {
        ctl.netboot.images.stage(&version, &name, &body)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn commit_image(
    State(ctl): State<Ctl>,
    Path(version): Path<String>,
) -> Result<Json<ImageView>, Failure> {
    blocking(move || {
        let m = ctl.netboot.images.commit(&version).inspect_err(|e| info!(image = %version, cause = %e, "image refused"))?;
        let default = ctl.netboot.images.default_version()?.as_deref() == Some(m.version.as_str());
        info!(image = %m.version, kernel_bytes = m.kernel.size, initrd_bytes = m.initrd.size, "image added");
        Ok(Json(image_view(&m, default)))
    })
    .await
}

async fn set_default(
    State(ctl): State<Ctl>,
    Json(req): Json<SetImage>,
) -> Result<Json<ImageView>, Failure> {
    blocking(move || {
        ctl.netboot.images.set_default(&req.version)?;
        info!(image = %req.version, "default image set");
        Ok(Json(image_view(
            &ctl.netboot.images.get(&req.version)?,
            true,
        )))
    })
    .await
}

async fn set_node_image(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
    Json(req): Json<SetImage>,
) -> Result<StatusCode, Failure> {
    blocking(move || {
        let node = NodeId(id.clone());
        if ctl.store.node(&node)?.is_none() {
            return Err(Failure(
                StatusCode::NOT_FOUND,
                format!("node {id} not found"),
            ));
        }
        ctl.netboot.images.get(&req.version)?;
        ctl.netboot.machines.set_node_image(&node, &req.version)?;
        info!(node = %id, image = %req.version, "image assigned");
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn list_machines(State(ctl): State<Ctl>) -> Result<Json<Vec<MachineView>>, Failure> {
    blocking(move || {
        let nodes = ctl.store.nodes()?;
        let machines = ctl.netboot.machines.machines()?;
        Ok(Json(
            machines
                .into_iter()
                .map(|m| {
                    let mac = m.mac.to_string();
                    let node = nodes
                        .iter()
                        .find(|n| {
                            n.inventory.as_ref().is_some_and(|i| {
                                i.nics
                                    .iter()
                                    .any(|nic| nic.mac.as_deref() == Some(mac.as_str()))
                            })
                        })
                        .map(|n| n.id.0.clone());
                    MachineView {
                        vendor: ctl.netboot.oui.vendor(&m.mac).map(str::to_owned),
                        mac,
                        arch: m.arch.map(|a| a.to_string()),
                        first_seen: rfc3339(m.first_seen.0),
                        last_seen: rfc3339(m.last_seen.0),
                        admitted: m.admitted,
                        last_image: m.last_image,
                        last_boot: m.last_boot.map(|t| rfc3339(t.0)),
                        node,
                    }
                })
                .collect(),
        ))
    })
    .await
}

fn parse_mac(s: &str) -> Result<Mac, Failure> {
    s.parse()
        .map_err(|e: shoal_api::netboot::MacError| Failure(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn admit(State(ctl): State<Ctl>, Path(mac): Path<String>) -> Result<StatusCode, Failure> {
    let mac = parse_mac(&mac)?;
    blocking(move || {
        ctl.netboot.machines.admit(mac, now_ms())?;
        info!(%mac, "machine admitted");
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn wake(State(ctl): State<Ctl>, Path(mac): Path<String>) -> Result<StatusCode, Failure> {
    let mac = parse_mac(&mac)?;
    super::wake(&ctl, &mac)
        .await
        .map_err(|e| Failure(StatusCode::CONFLICT, e.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}
