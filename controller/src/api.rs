//! The admin API: HTTPS (axum + rustls), bearer-token authenticated, JSON in and out.
//!
//! Routes: `GET/POST /v1/tokens`, `DELETE /v1/tokens/{id}`, `GET /v1/nodes`, `GET/DELETE /v1/nodes/{id}`,
//! `GET /v1/events`, `GET /v1/report`.

use std::{net::IpAddr, sync::Arc};

use axum::{
    extract::{Path, Query, Request, State},
    http::{header::AUTHORIZATION, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde::Deserialize;
use shoal_overlay::pki;
use shoal_proto::{JoinToken, NodeId, UnixMillis};
use tracing::{info, warn};

use crate::{
    report::{self, FleetReport, ReportThresholds},
    server::{now_ms, Controller, ServeError},
    store::{NodeRecord, NodeStatus, StoreError, TokenRecord},
    view::{rfc3339, ApiError, CreateToken, CreatedToken, EventView, NodeView, TokenView},
};

type Ctl = Arc<Controller>;

/// An API failure with its HTTP status.
#[derive(Debug)]
pub struct HttpError(StatusCode, String);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        warn!(cause = %e, "admin request failed in the store");
        HttpError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

fn not_found(what: &str) -> HttpError {
    HttpError(StatusCode::NOT_FOUND, format!("{what} not found"))
}

/// Starts serving the admin API on `listener`; returns the handle that stops it.
pub fn serve(controller: Ctl, listener: std::net::TcpListener) -> Result<axum_server::Handle, ServeError> {
    let local = listener.local_addr()?;
    let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])];
    if !local.ip().is_unspecified() && !ips.contains(&local.ip()) {
        ips.push(local.ip());
    }
    let names = vec![pki::CONTROLLER_SERVER_NAME.to_owned(), "localhost".to_owned()];
    let (chain, key) = controller.ca.issue_server_cert(&names, &ips)?;
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(shoal_overlay::tls::TlsError::from)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(shoal_overlay::tls::TlsError::from)?;
    let mut tls = tls;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    listener.set_nonblocking(true)?;
    let handle = axum_server::Handle::new();
    let app = router(controller);
    let server = axum_server::from_tcp_rustls(listener, axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls)))
        .handle(handle.clone());
    tokio::spawn(async move {
        if let Err(e) = server.serve(app.into_make_service()).await {
            warn!(cause = %e, "admin API stopped");
        }
    });
    Ok(handle)
}

/// The API's routes, behind bearer authentication.
pub fn router(controller: Ctl) -> Router {
    Router::new()
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}", get(show_node).delete(remove_node))
        .route("/v1/events", get(list_events))
        .route("/v1/report", get(fleet_report))
        .merge(crate::netboot::api::routes())
        .layer(middleware::from_fn_with_state(controller.clone(), authenticate))
        .with_state(controller)
}

async fn authenticate(State(ctl): State<Ctl>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| pki::sha256(t.trim().as_bytes()));
    match presented {
        Some(hash) if crate::admin::digest_eq(&hash, &ctl.admin_token_sha256) => next.run(req).await,
        Some(_) => HttpError(StatusCode::UNAUTHORIZED, "invalid admin credentials".into()).into_response(),
        None => HttpError(StatusCode::UNAUTHORIZED, "admin credentials required (shoalctl --config DATA_DIR/admin.conf)".into())
            .into_response(),
    }
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, HttpError> + Send + 'static,
) -> Result<T, HttpError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HttpError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

fn token_view(t: &TokenRecord, now: UnixMillis) -> TokenView {
    let state = serde_json::to_value(t.state(now)).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
    TokenView {
        id: t.id.clone(),
        state,
        created_at: rfc3339(t.created_at.0),
        expires_at: t.expires_at.map(|e| rfc3339(e.0)),
        uses: t.uses,
        max_uses: t.max_uses,
        labels: t.labels.clone(),
    }
}

async fn list_tokens(State(ctl): State<Ctl>) -> Result<Json<Vec<TokenView>>, HttpError> {
    blocking(move || {
        let now = now_ms();
        Ok(Json(ctl.store.tokens()?.iter().map(|t| token_view(t, now)).collect()))
    })
    .await
}

async fn create_token(State(ctl): State<Ctl>, Json(req): Json<CreateToken>) -> Result<Json<CreatedToken>, HttpError> {
    if req.max_uses == Some(0) {
        return Err(HttpError(StatusCode::BAD_REQUEST, "--uses must be at least 1".into()));
    }
    blocking(move || {
        let now = now_ms();
        let token = JoinToken {
            id: hex::encode(rand::random::<[u8; 8]>()),
            secret: hex::encode(rand::random::<[u8; 16]>()),
            ca_sha256: ctl.ca.sha256(),
        };
        let record = TokenRecord {
            id: token.id.clone(),
            secret_sha256: pki::sha256(token.secret.as_bytes()),
            created_at: now,
            expires_at: req.ttl_secs.map(|s| UnixMillis(now.0.saturating_add(s.saturating_mul(1000)))),
            max_uses: req.max_uses,
            uses: 0,
            revoked_at: None,
            labels: req.labels,
        };
        ctl.store.create_token(&record)?;
        info!(token = %record.id, ttl_secs = ?req.ttl_secs, max_uses = ?record.max_uses, "join token created");
        Ok(Json(CreatedToken { token: token.to_string(), info: token_view(&record, now) }))
    })
    .await
}

async fn revoke_token(State(ctl): State<Ctl>, Path(id): Path<String>) -> Result<Json<TokenView>, HttpError> {
    blocking(move || {
        let now = now_ms();
        let rec = ctl.store.revoke_token(&id, now)?.ok_or_else(|| not_found(&format!("token {id}")))?;
        info!(token = %id, "join token revoked");
        Ok(Json(token_view(&rec, now)))
    })
    .await
}

/// Merges a stored record with the controller's live state.
pub(crate) fn node_view(ctl: &Controller, rec: NodeRecord) -> NodeView {
    let live = ctl.live().nodes.get(&rec.id).cloned().unwrap_or_default();
    let connected = ctl.is_connected(&rec.id);
    let last_seen = live.last_seen.or(rec.last_seen);
    let status = match rec.status {
        NodeStatus::Up => "up",
        NodeStatus::Down => "down",
    };
    NodeView {
        id: rec.id.0,
        hostname: rec.hostname,
        status: status.to_owned(),
        connected,
        agent_version: rec.agent_version,
        last_seen: last_seen.map(|t| rfc3339(t.0)),
        last_seen_unix_ms: last_seen.map(|t| t.0),
        enrolled_at: rfc3339(rec.enrolled_at.0),
        hardware_id: rec.hardware_id.to_string(),
        labels: rec.labels,
        inventory: rec.inventory,
        health: live.health.or(rec.health),
    }
}

fn all_nodes(ctl: &Controller) -> Result<Vec<NodeView>, HttpError> {
    Ok(ctl.store.nodes()?.into_iter().map(|r| node_view(ctl, r)).collect())
}

async fn list_nodes(State(ctl): State<Ctl>) -> Result<Json<Vec<NodeView>>, HttpError> {
    blocking(move || Ok(Json(all_nodes(&ctl)?))).await
}

async fn show_node(State(ctl): State<Ctl>, Path(id): Path<String>) -> Result<Json<NodeView>, HttpError> {
    blocking(move || {
        let rec = ctl.store.node(&NodeId(id.clone()))?.ok_or_else(|| not_found(&format!("node {id}")))?;
        Ok(Json(node_view(&ctl, rec)))
    })
    .await
}

async fn remove_node(State(ctl): State<Ctl>, Path(id): Path<String>) -> Result<StatusCode, HttpError> {
    blocking(move || {
        if ctl.remove_node(&NodeId(id.clone()))? {
            Ok(StatusCode::NO_CONTENT)
        } else {
            Err(not_found(&format!("node {id}")))
        }
    })
    .await
}

#[derive(Debug, Deserialize)]
struct EventQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn list_events(State(ctl): State<Ctl>, Query(q): Query<EventQuery>) -> Result<Json<Vec<EventView>>, HttpError> {
    blocking(move || {
        let events = ctl.store.events(q.after, q.limit.unwrap_or(1000).min(10_000))?;
        Ok(Json(
            events
                .into_iter()
                .map(|e| EventView {
                    seq: e.seq,
                    at: rfc3339(e.at.0),
                    kind: serde_json::to_value(e.kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
                    node: e.node.map(|n| n.0),
                    message: e.message,
                })
                .collect(),
        ))
    })
    .await
}

async fn fleet_report(State(ctl): State<Ctl>) -> Result<Json<FleetReport>, HttpError> {
    blocking(move || {
        let nodes = all_nodes(&ctl)?;
        let t = ReportThresholds::for_interval(ctl.config.heartbeat_interval);
        Ok(Json(report::build(&nodes, now_ms().0, &t)))
    })
    .await
}
