//! The admin API: HTTPS (axum + rustls), bearer-token authenticated, JSON in and out.
//!
//! Routes: `GET/POST /v1/tokens`, `DELETE /v1/tokens/{id}`, `GET /v1/nodes`, `GET/DELETE
//! /v1/nodes/{id}`, `GET /v1/events`, `GET /v1/report`, `GET/POST /v1/networks`, `GET/DELETE
//! /v1/networks/{name}`, `POST/DELETE /v1/networks/{name}/members` (body `{"node": ID}` or
//! `{"selector": "KEY=VALUE"}`; DELETE also takes them as query parameters), `GET
//! /v1/drives?node=ID`, `POST /v1/drives/{node}/{device}/prepare` (body [`PrepareRequest`]), `POST
//! /v1/drives/{node}/{device}/self-test` (body `{"kind": "short"|"long"}`), `GET/POST
//! /v1/drive-policies`, `DELETE /v1/drive-policies?node=ID|selector=KEY=VALUE`.

pub mod admin;

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use axum::{
    body::Bytes,
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
    drives::hub::{DriveRequest, PolicyError},
    overlay::networks::{
        parse_selector, MemberRecord, MembershipChange, NetworkError, NetworkRecord, Subnet,
    },
    server::now_ms,
    server::Controller,
    server::ServeError,
    store::{NodeRecord, NodeStatus, StoreError, TokenRecord},
};
use shoal_api::drives::DriveCommandView;
use shoal_api::drives::DrivePolicies;
use shoal_api::drives::DrivePolicyView;
use shoal_api::drives::DriveView;
use shoal_api::drives::EffectivePolicyView;
use shoal_api::drives::SelfTestRequest;
use shoal_api::drives::SetDrivePolicy;
use shoal_api::error::ApiError;
use shoal_api::events::EventView;
use shoal_api::networks::CreateNetwork;
use shoal_api::networks::MemberSpec;
use shoal_api::networks::MemberView;
use shoal_api::networks::NetworkDetail;
use shoal_api::networks::NetworkUpdate;
use shoal_api::networks::NetworkView;
use shoal_api::nodes::NodeView;
use shoal_api::nodes::OverlayAddressView;
use shoal_api::tokens::CreateToken;
use shoal_api::tokens::CreatedToken;
use shoal_api::tokens::TokenView;
use shoal_controller_core::drives::fleet::{CommandError, PrepareRequest};
use shoal_controller_core::drives::policy::{PolicyRecord, PolicyTarget};
use shoal_controller_core::report::{FleetReport, ReportThresholds};
use shoal_controller_core::time::rfc3339_ms as rfc3339;

type Ctl = Arc<Controller>;

/// An API failure with its HTTP status: every admin route module answers with it (each adds `From`
/// impls for its own errors).
#[derive(Debug)]
pub struct HttpError(pub(crate) StatusCode, pub(crate) String);

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

impl From<NetworkError> for HttpError {
    fn from(e: NetworkError) -> Self {
        use NetworkError as E;
        if let E::Store(s) = e {
            return s.into();
        }
        let status = match &e {
            E::UnknownNetwork(_)
            | E::UnknownNode(_)
            | E::NotMember { .. }
            | E::UnknownSelector { .. } => StatusCode::NOT_FOUND,
            E::BadName(_) | E::BadSubnet(_) | E::BadMtu(_) | E::BadSelector(_) => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::CONFLICT,
        };
        HttpError(status, e.to_string())
    }
}

impl From<CommandError> for HttpError {
    fn from(e: CommandError) -> Self {
        use CommandError as E;
        let status = match &e {
            E::UnknownNode(_) | E::UnknownDrive { .. } => StatusCode::NOT_FOUND,
            E::ForceNeedsSerial => StatusCode::BAD_REQUEST,
            E::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            E::Disconnected { .. } | E::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::Agent { .. } => StatusCode::BAD_GATEWAY,
            _ => StatusCode::CONFLICT,
        };
        HttpError(status, e.to_string())
    }
}

impl From<PolicyError> for HttpError {
    fn from(e: PolicyError) -> Self {
        use PolicyError as E;
        let status = match &e {
            E::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::UnknownNode(_) | E::NoPolicy(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        };
        HttpError(status, e.to_string())
    }
}

fn not_found(what: &str) -> HttpError {
    HttpError(StatusCode::NOT_FOUND, format!("{what} not found"))
}

/// How long a client has to send a request head (and how long an idle keep-alive connection lives).
pub const API_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Most header fields in one request.
pub const API_MAX_HEADERS: usize = 64;
/// hyper's read buffer, which bounds a request head (bodies stream through it).
pub const API_MAX_HEAD_BYTES: usize = 64 * 1024;

/// Starts serving the admin API on `listener`; returns the handle that stops it.
pub fn serve(
    controller: Ctl,
    listener: std::net::TcpListener,
) -> Result<axum_server::Handle, ServeError> {
    let local = listener.local_addr()?;
    let mut ips: Vec<IpAddr> = vec![
        IpAddr::from([127, 0, 0, 1]),
        IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
    ];
    if !local.ip().is_unspecified() && !ips.contains(&local.ip()) {
        ips.push(local.ip());
    }
    let names = vec![
        pki::CONTROLLER_SERVER_NAME.to_owned(),
        "localhost".to_owned(),
    ];
    let (chain, key) = controller.ca.issue_server_cert(&names, &ips)?;
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
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
    let mut server = axum_server::from_tcp_rustls(
        listener,
        axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls)),
    )
    .handle(handle.clone());
    // A client that trickles its request head, or parks an idle keep-alive connection, is cut off
    // (hyper applies the header timeout to idle keep-alive connections too); TLS handshakes have
    // axum-server's 10 s limit.
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(API_HEADER_TIMEOUT)
        .max_headers(API_MAX_HEADERS)
        .max_buf_size(API_MAX_HEAD_BYTES);
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
        .route("/v1/networks", get(list_networks).post(create_network))
        .route(
            "/v1/networks/{name}",
            get(show_network).delete(delete_network),
        )
        .route(
            "/v1/networks/{name}/members",
            axum::routing::post(add_member).delete(remove_member),
        )
        .route("/v1/overlay/paths", get(overlay_paths))
        .route("/v1/overlay/counters", get(overlay_counters))
        .route("/v1/refusals", get(refusals))
        .route("/v1/drives", get(list_drives))
        .route(
            "/v1/drives/{node}/{device}/prepare",
            axum::routing::post(prepare_drive),
        )
        .route(
            "/v1/drives/{node}/{device}/self-test",
            axum::routing::post(self_test_drive),
        )
        .route(
            "/v1/drive-policies",
            get(list_drive_policies)
                .post(set_drive_policy)
                .delete(delete_drive_policy),
        )
        .merge(crate::netboot::api::routes())
        .merge(crate::maintenance::api::routes())
        .merge(crate::releases::routes::routes())
        .merge(crate::registry::identity::routes())
        .layer(middleware::from_fn_with_state(
            controller.clone(),
            authenticate,
        ))
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
        Some(hash) if crate::api::admin::digest_eq(&hash, &ctl.admin_token_sha256) => {
            next.run(req).await
        }
        Some(_) => {
            HttpError(StatusCode::UNAUTHORIZED, "invalid admin credentials".into()).into_response()
        }
        None => HttpError(
            StatusCode::UNAUTHORIZED,
            "admin credentials required (shoalctl --config DATA_DIR/admin.conf)".into(),
        )
        .into_response(),
    }
}

/// Runs blocking store work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, HttpError> + Send + 'static,
) -> Result<T, HttpError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HttpError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

fn token_view(t: &TokenRecord, now: UnixMillis) -> TokenView {
    let state = serde_json::to_value(t.state(now))
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
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
        Ok(Json(
            ctl.store
                .tokens()?
                .iter()
                .map(|t| token_view(t, now))
                .collect(),
        ))
    })
    .await
}

async fn create_token(
    State(ctl): State<Ctl>,
    Json(req): Json<CreateToken>,
) -> Result<Json<CreatedToken>, HttpError> {
    if req.max_uses == Some(0) {
        return Err(HttpError(
            StatusCode::BAD_REQUEST,
            "--uses must be at least 1".into(),
        ));
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

async fn revoke_token(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, HttpError> {
    blocking(move || {
        let now = now_ms();
        let rec = ctl
            .store
            .revoke_token(&id, now)?
            .ok_or_else(|| not_found(&format!("token {id}")))?;
        info!(token = %id, "join token revoked");
        Ok(Json(token_view(&rec, now)))
    })
    .await
}

/// What the controller's limits refused since it started: connections, and what nodes sent the
/// overlay hub.
async fn refusals(State(ctl): State<Ctl>) -> Json<shoal_api::refusals::RefusalsView> {
    Json(shoal_api::refusals::RefusalsView {
        connections: ctl.conn_stats.snapshot(),
        overlay: ctl.overlay.counters(),
    })
}

/// Merges a stored record with the controller's live state.
pub(crate) fn node_view(ctl: &Controller, rec: NodeRecord) -> NodeView {
    let live = ctl.live().nodes.get(&rec.id).cloned().unwrap_or_default();
    let connected = ctl.is_connected(&rec.id);
    let boot = ctl.live().conns.get(&rec.id).and_then(|c| c.boot.clone());
    let last_seen = live.last_seen.or(rec.last_seen);
    let status = match rec.status {
        NodeStatus::Up => "up",
        NodeStatus::Down => "down",
    };
    NodeView {
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
        overlay: Vec::new(),
        boot,
        key: ctl
            .store
            .identity(&rec.id)
            .ok()
            .flatten()
            .map(|i| crate::store::short_key(&i.key)),
        id: rec.id.0,
    }
}

/// Every node's overlay addresses, by node id.
fn overlay_views(
    ctl: &Controller,
) -> Result<BTreeMap<NodeId, Vec<OverlayAddressView>>, StoreError> {
    let networks: BTreeMap<_, NetworkRecord> = ctl
        .store
        .networks()?
        .into_iter()
        .map(|n| (n.id, n))
        .collect();
    let mut out = BTreeMap::new();
    for (node, members) in ctl.store.memberships_by_node()? {
        let views = members
            .into_iter()
            .filter_map(|m| {
                let net = networks.get(&m.network)?;
                Some(OverlayAddressView {
                    network: net.name.clone(),
                    network_id: net.id.0,
                    mac: m.mac.to_string(),
                    address: m.address.to_string(),
                    prefix_len: net.prefix_len,
                })
            })
            .collect();
        out.insert(node, views);
    }
    Ok(out)
}

fn all_nodes(ctl: &Controller) -> Result<Vec<NodeView>, HttpError> {
    let mut overlay = overlay_views(ctl)?;
    Ok(ctl
        .store
        .nodes()?
        .into_iter()
        .map(|r| {
            let addresses = overlay.remove(&r.id).unwrap_or_default();
            NodeView {
                overlay: addresses,
                ..node_view(ctl, r)
            }
        })
        .collect())
}

async fn list_nodes(State(ctl): State<Ctl>) -> Result<Json<Vec<NodeView>>, HttpError> {
    blocking(move || Ok(Json(all_nodes(&ctl)?))).await
}

async fn show_node(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
) -> Result<Json<NodeView>, HttpError> {
    blocking(move || {
        let rec = ctl
            .store
            .node(&NodeId(id.clone()))?
            .ok_or_else(|| not_found(&format!("node {id}")))?;
        let addresses = overlay_views(&ctl)?.remove(&rec.id).unwrap_or_default();
        Ok(Json(NodeView {
            overlay: addresses,
            ..node_view(&ctl, rec)
        }))
    })
    .await
}

async fn remove_node(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
) -> Result<StatusCode, HttpError> {
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

async fn list_events(
    State(ctl): State<Ctl>,
    Query(q): Query<EventQuery>,
) -> Result<Json<Vec<EventView>>, HttpError> {
    blocking(move || {
        let events = ctl
            .store
            .events(q.after, q.limit.unwrap_or(1000).min(10_000))?;
        Ok(Json(
            events
                .into_iter()
                .map(|e| EventView {
                    seq: e.seq,
                    at: rfc3339(e.at.0),
                    kind: serde_json::to_value(e.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    node: e.node.map(|n| n.0),
                    message: e.message,
                })
                .collect(),
        ))
    })
    .await
}

async fn overlay_paths(State(ctl): State<Ctl>) -> Json<Vec<shoal_api::overlay::PathView>> {
    let mut out = Vec::new();
    for (node, r) in ctl.overlay.reported_paths() {
        for p in r.report.paths {
            out.push(shoal_api::overlay::PathView {
                from: node.0.clone(),
                to: p.peer.0,
                kind: match p.kind {
                    shoal_proto::PathKind::Direct => "direct",
                    shoal_proto::PathKind::Relay => "relay",
                }
                .to_owned(),
                remote: p.remote.map(|a| a.to_string()),
                rtt_ms: (p.rtt_ms * 1000.0).round() / 1000.0,
                tx_bytes: p.tx_bytes,
                rx_bytes: p.rx_bytes,
                reported_at: rfc3339(r.at.0),
            });
        }
    }
    Json(out)
}

async fn overlay_counters(
    State(ctl): State<Ctl>,
) -> Json<Vec<shoal_api::overlay::OverlayCountersView>> {
    Json(
        ctl.overlay
            .reported_paths()
            .into_iter()
            .map(|(node, r)| shoal_api::overlay::OverlayCountersView {
                node: node.0,
                forwarded: r.report.counters.forwarded,
                flooded: r.report.counters.flooded,
                delivered: r.report.counters.delivered,
                dropped: r.report.counters.dropped.into_iter().collect(),
                reported_at: rfc3339(r.at.0),
            })
            .collect(),
    )
}

async fn fleet_report(State(ctl): State<Ctl>) -> Result<Json<FleetReport>, HttpError> {
    blocking(move || {
        let nodes = all_nodes(&ctl)?;
        let drives = ctl.drives.views(None);
        let t = ReportThresholds::for_interval(ctl.config.heartbeat_interval);
        Ok(Json(shoal_controller_core::report::build(
            &nodes,
            &drives,
            now_ms().0,
            &t,
        )))
    })
    .await
}

#[derive(Debug, Deserialize)]
struct DriveQuery {
    node: Option<String>,
}

async fn list_drives(
    State(ctl): State<Ctl>,
    Query(q): Query<DriveQuery>,
) -> Result<Json<Vec<DriveView>>, HttpError> {
    blocking(move || {
        let only = q.node.map(NodeId);
        if let Some(node) = &only {
            if ctl.store.node(node)?.is_none() {
                return Err(HttpError::from(CommandError::UnknownNode(node.clone())));
            }
        }
        Ok(Json(ctl.drives.views(only.as_ref())))
    })
    .await
}

/// A device as the operator typed it: `sdb` or `/dev/sdb`.
fn device_name(device: &str) -> String {
    device.strip_prefix("/dev/").unwrap_or(device).to_owned()
}

async fn prepare_drive(
    State(ctl): State<Ctl>,
    Path((node, device)): Path<(String, String)>,
    Json(req): Json<PrepareRequest>,
) -> Result<Json<DriveCommandView>, HttpError> {
    Ok(Json(
        ctl.drive_command(
            NodeId(node),
            device_name(&device),
            DriveRequest::Prepare(req),
        )
        .await?,
    ))
}

async fn self_test_drive(
    State(ctl): State<Ctl>,
    Path((node, device)): Path<(String, String)>,
    Json(req): Json<SelfTestRequest>,
) -> Result<Json<DriveCommandView>, HttpError> {
    let kind = match req.kind.as_str() {
        "short" => shoal_proto::SelfTestKind::Short,
        "long" => shoal_proto::SelfTestKind::Long,
        other => {
            return Err(HttpError(
                StatusCode::BAD_REQUEST,
                format!("unknown self-test {other:?}: short or long"),
            ))
        }
    };
    Ok(Json(
        ctl.drive_command(
            NodeId(node),
            device_name(&device),
            DriveRequest::SelfTest(kind),
        )
        .await?,
    ))
}

fn policy_view(p: &PolicyRecord) -> DrivePolicyView {
    let (node, selector) = match &p.target {
        PolicyTarget::Node(n) => (Some(n.0.clone()), None),
        PolicyTarget::Selector(k, v) => (None, Some(format!("{k}={v}"))),
    };
    DrivePolicyView {
        node,
        selector,
        mode: p.policy.mode.to_string(),
        filesystem: p.policy.filesystem.to_string(),
        set_at: rfc3339(p.set_at.0),
    }
}

fn policy_target(
    node: Option<String>,
    selector: Option<String>,
) -> Result<PolicyTarget, PolicyError> {
    match (node, selector) {
        (Some(n), None) => Ok(PolicyTarget::Node(NodeId(n))),
        (None, Some(s)) => {
            let (k, v) = parse_selector(&s).map_err(|_| PolicyError::BadSelector(s.clone()))?;
            Ok(PolicyTarget::Selector(k, v))
        }
        _ => Err(PolicyError::Target),
    }
}

async fn list_drive_policies(State(ctl): State<Ctl>) -> Result<Json<DrivePolicies>, HttpError> {
    blocking(move || {
        let policies = ctl.drives.policies()?;
        let effective = ctl
            .store
            .nodes()?
            .iter()
            .map(|n| {
                let (policy, source) = ctl.effective_drive_policy(n, &policies);
                EffectivePolicyView {
                    node: n.id.0.clone(),
                    hostname: n.hostname.clone(),
                    mode: policy.mode.to_string(),
                    filesystem: policy.filesystem.to_string(),
                    source: source.to_string(),
                }
            })
            .collect();
        Ok(Json(DrivePolicies {
            policies: policies.iter().map(policy_view).collect(),
            effective,
        }))
    })
    .await
}

async fn set_drive_policy(
    State(ctl): State<Ctl>,
    Json(req): Json<SetDrivePolicy>,
) -> Result<Json<DrivePolicyView>, HttpError> {
    blocking(move || {
        let target = policy_target(req.node, req.selector)?;
        let mode = req.mode.parse().map_err(PolicyError::BadMode)?;
        let filesystem = match req.filesystem {
            Some(f) => f.parse().map_err(PolicyError::BadFilesystem)?,
            None => shoal_proto::Filesystem::default(),
        };
        let rec = PolicyRecord {
            target,
            policy: shoal_proto::DrivePolicy { mode, filesystem },
            set_at: now_ms(),
        };
        ctl.drives.set_policy(&rec)?;
        ctl.push_drive_policies(None);
        Ok(Json(policy_view(&rec)))
    })
    .await
}

async fn delete_drive_policy(
    State(ctl): State<Ctl>,
    Query(spec): Query<MemberSpec>,
) -> Result<Json<DrivePolicyView>, HttpError> {
    blocking(move || {
        let target = policy_target(spec.node, spec.selector)?;
        let old = ctl.drives.delete_policy(&target, now_ms())?;
        ctl.push_drive_policies(None);
        Ok(Json(policy_view(&old)))
    })
    .await
}

fn network_view(rec: &NetworkRecord, members: usize) -> NetworkView {
    NetworkView {
        id: rec.id.0,
        name: rec.name.clone(),
        subnet: rec.subnet().to_string(),
        mtu: rec.mtu,
        selectors: rec
            .selectors
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        members,
        created_at: rfc3339(rec.created_at.0),
    }
}

fn member_view(ctl: &Controller, m: &MemberRecord) -> Result<MemberView, StoreError> {
    Ok(MemberView {
        node: m.node.0.clone(),
        hostname: ctl
            .store
            .node(&m.node)?
            .map(|n| n.hostname)
            .unwrap_or_default(),
        mac: m.mac.to_string(),
        address: m.address.to_string(),
        explicit: m.explicit,
        via_selector: m.via_selector,
    })
}

fn network_detail(ctl: &Controller, name: &str) -> Result<NetworkDetail, HttpError> {
    let rec = ctl
        .store
        .network_by_name(name)?
        .ok_or_else(|| HttpError::from(NetworkError::UnknownNetwork(name.to_owned())))?;
    let mut members = ctl.store.members(rec.id)?;
    members.sort_by_key(|m| m.address);
    let members = members
        .iter()
        .map(|m| member_view(ctl, m))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NetworkDetail {
        network: network_view(&rec, members.len()),
        members,
    })
}

/// Tells the coordinator, and describes the change for the caller.
fn network_update(
    ctl: &Controller,
    name: &str,
    changes: Vec<MembershipChange>,
) -> Result<NetworkUpdate, HttpError> {
    let mut joined = Vec::new();
    let mut left = Vec::new();
    for c in &changes {
        match c {
            MembershipChange::Joined { node, .. } => joined.push(node.clone()),
            MembershipChange::Left { node, .. } => left.push(node.0.clone()),
            _ => {}
        }
    }
    ctl.membership_changed(changes);
    let detail = network_detail(ctl, name)?;
    let joined = detail
        .members
        .iter()
        .filter(|m| joined.iter().any(|j| j.0 == m.node))
        .cloned()
        .collect();
    Ok(NetworkUpdate {
        network: detail.network,
        joined,
        left,
    })
}

async fn list_networks(State(ctl): State<Ctl>) -> Result<Json<Vec<NetworkView>>, HttpError> {
    blocking(move || {
        let counts = ctl
            .store
            .memberships_by_node()?
            .into_values()
            .flatten()
            .fold(BTreeMap::new(), |mut acc, m| {
                *acc.entry(m.network).or_insert(0usize) += 1;
                acc
            });
        let networks = ctl.store.networks()?;
        Ok(Json(
            networks
                .iter()
                .map(|n| network_view(n, counts.get(&n.id).copied().unwrap_or(0)))
                .collect(),
        ))
    })
    .await
}

async fn create_network(
    State(ctl): State<Ctl>,
    Json(req): Json<CreateNetwork>,
) -> Result<Json<NetworkView>, HttpError> {
    blocking(move || {
        let subnet: Subnet = req.subnet.parse().map_err(NetworkError::from)?;
        let (rec, changes) = ctl
            .store
            .create_network(&req.name, subnet, req.mtu, now_ms())?;
        ctl.membership_changed(changes);
        Ok(Json(network_view(&rec, 0)))
    })
    .await
}

async fn show_network(
    State(ctl): State<Ctl>,
    Path(name): Path<String>,
) -> Result<Json<NetworkDetail>, HttpError> {
    blocking(move || Ok(Json(network_detail(&ctl, &name)?))).await
}

async fn delete_network(
    State(ctl): State<Ctl>,
    Path(name): Path<String>,
) -> Result<Json<NetworkUpdate>, HttpError> {
    blocking(move || {
        let (rec, changes) = ctl.store.delete_network(&name, now_ms())?;
        let left = changes
            .iter()
            .filter_map(|c| match c {
                MembershipChange::Left { node, .. } => Some(node.0.clone()),
                _ => None,
            })
            .collect();
        ctl.membership_changed(changes);
        Ok(Json(NetworkUpdate {
            network: network_view(&rec, 0),
            joined: Vec::new(),
            left,
        }))
    })
    .await
}

/// Who a member request names.
enum Who {
    Node(NodeId),
    Selector(String, String),
}

fn who(spec: MemberSpec) -> Result<Who, HttpError> {
    match (spec.node, spec.selector) {
        (Some(node), None) => Ok(Who::Node(NodeId(node))),
        (None, Some(selector)) => {
            let (k, v) = parse_selector(&selector).map_err(NetworkError::from)?;
            Ok(Who::Selector(k, v))
        }
        _ => Err(HttpError(
            StatusCode::BAD_REQUEST,
            "name exactly one of node or selector".into(),
        )),
    }
}

async fn add_member(
    State(ctl): State<Ctl>,
    Path(name): Path<String>,
    Json(spec): Json<MemberSpec>,
) -> Result<Json<NetworkUpdate>, HttpError> {
    blocking(move || {
        let changes = match who(spec)? {
            Who::Node(node) => ctl.store.add_member(&name, &node, now_ms())?.1,
            Who::Selector(k, v) => ctl.store.add_selector(&name, &k, &v, now_ms())?,
        };
        Ok(Json(network_update(&ctl, &name, changes)?))
    })
    .await
}

async fn remove_member(
    State(ctl): State<Ctl>,
    Path(name): Path<String>,
    Query(query): Query<MemberSpec>,
    body: Bytes,
) -> Result<Json<NetworkUpdate>, HttpError> {
    let spec = if body.iter().all(u8::is_ascii_whitespace) {
        query
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| HttpError(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))?
    };
    blocking(move || {
        let changes = match who(spec)? {
            Who::Node(node) => ctl.store.remove_member(&name, &node, now_ms())?,
            Who::Selector(k, v) => ctl.store.remove_selector(&name, &k, &v, now_ms())?,
        };
        Ok(Json(network_update(&ctl, &name, changes)?))
    })
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{
        api::admin::{AdminClient, AdminClientError, AdminConf, ADMIN_CONF_FILE},
        server::ControllerConfig,
    };
    use shoal_controller_core::drives::fleet::PrepareRequest;

    fn enrol(ctl: &Controller, machine: &str, labels: &[(&str, &str)]) -> NodeId {
        crate::overlay::networks::enrol_for_tests(&ctl.store, machine, labels, now_ms())
    }

    fn status<T: std::fmt::Debug>(r: Result<T, AdminClientError>) -> (u16, String) {
        match r {
            Err(AdminClientError::Api { status, message }) => (status, message),
            other => panic!("expected an API error, got {other:?}"),
        }
    }

    fn spec(node: Option<&NodeId>, selector: Option<&str>) -> MemberSpec {
        MemberSpec {
            node: node.map(|n| n.0.clone()),
            selector: selector.map(str::to_owned),
        }
    }

    #[test]
    fn networks_over_the_admin_api() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let _enter = rt.enter();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config = ControllerConfig::for_tests(dir.path().to_owned());
        let ctl = Controller::open(config, listener.local_addr().unwrap()).unwrap();
        let handle = serve(ctl.clone(), listener).unwrap();
        let client =
            AdminClient::new(&AdminConf::read(&dir.path().join(ADMIN_CONF_FILE)).unwrap()).unwrap();

        let a = enrol(&ctl, "a", &[("role", "db")]);
        let b = enrol(&ctl, "b", &[]);
        let lab = client
            .create_network(&CreateNetwork {
                name: "lab".into(),
                subnet: "10.71.0.0/24".into(),
                mtu: None,
            })
            .unwrap();
        assert_eq!((lab.id, lab.mtu, lab.members), (2, 1380, 0));
        let list = client.networks().unwrap();
        assert_eq!(
            list.iter()
                .map(|n| (n.name.as_str(), n.subnet.as_str(), n.members))
                .collect::<Vec<_>>(),
            [("default", "10.70.0.0/24", 2), ("lab", "10.71.0.0/24", 0)]
        );

        let create = |name: &str, subnet: &str| {
            client.create_network(&CreateNetwork {
                name: name.into(),
                subnet: subnet.into(),
                mtu: None,
            })
        };
        assert_eq!(status(create("x", "10.72.0.0")).0, 400);
        let (code, msg) = status(create("x", "10.70.0.128/25"));
        assert!(
            code == 409 && msg.contains("overlaps network default"),
            "{code} {msg}"
        );
        assert_eq!(status(create("lab", "10.73.0.0/24")).0, 409);
        assert_eq!(status(client.network("nope")).0, 404);
        assert_eq!(
            status(client.add_to_network("lab", &spec(Some(&NodeId("n0".into())), None))).0,
            404
        );
        assert_eq!(
            status(client.add_to_network("lab", &spec(None, None))).0,
            400
        );
        assert_eq!(
            status(client.add_to_network("lab", &spec(None, Some("novalue")))).0,
            400
        );
        assert_eq!(status(client.delete_network("default")).0, 409);

        let up = client.add_to_network("lab", &spec(Some(&b), None)).unwrap();
        assert_eq!(
            up.joined
                .iter()
                .map(|m| (m.node.as_str(), m.address.as_str()))
                .collect::<Vec<_>>(),
            [(b.0.as_str(), "10.71.0.1")]
        );
        let up = client
            .add_to_network("lab", &spec(None, Some("role=db")))
            .unwrap();
        assert_eq!(
            (
                up.joined.len(),
                up.network.members,
                up.network.selectors.clone()
            ),
            (1, 2, vec!["role=db".to_owned()])
        );
        assert_eq!(
            status(client.remove_from_network("lab", &spec(Some(&a), None))).0,
            409
        );

        let detail = client.network("lab").unwrap();
        assert_eq!(
            detail
                .members
                .iter()
                .map(|m| m.hostname.as_str())
                .collect::<Vec<_>>(),
            ["b", "a"]
        );
        let nodes: Vec<NodeView> = client.get("/v1/nodes").unwrap();
        let node_a = nodes.iter().find(|n| n.id == a.0).unwrap();
        assert_eq!(
            node_a
                .overlay
                .iter()
                .map(|o| (
                    o.network.as_str(),
                    o.network_id,
                    o.address.as_str(),
                    o.prefix_len
                ))
                .collect::<Vec<_>>(),
            [("default", 1, "10.70.0.1", 24), ("lab", 2, "10.71.0.2", 24)]
        );
        let shown: NodeView = client.get(&format!("/v1/nodes/{}", a.0)).unwrap();
        assert_eq!(shown.overlay, node_a.overlay);

        let up = client
            .remove_from_network("lab", &spec(None, Some("role=db")))
            .unwrap();
        assert_eq!(up.left, std::slice::from_ref(&a.0));
        let gone = client.delete_network("lab").unwrap();
        assert_eq!(gone.left, std::slice::from_ref(&b.0));
        assert_eq!(client.networks().unwrap().len(), 1);

        // Removing a node frees its default-network address.
        assert!(ctl.remove_node(&a).unwrap());
        let detail = client.network("default").unwrap();
        assert_eq!(
            detail
                .members
                .iter()
                .map(|m| m.node.as_str())
                .collect::<Vec<_>>(),
            [b.0.as_str()]
        );
        handle.shutdown();
    }

    /// A controller with its admin API on loopback, and a client for it.
    fn api(
        dir: &std::path::Path,
        prepare_timeout: std::time::Duration,
    ) -> (
        tokio::runtime::Runtime,
        Ctl,
        axum_server::Handle,
        AdminClient,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut config = ControllerConfig::for_tests(dir.to_owned());
        config.drive_prepare_timeout = prepare_timeout;
        let ctl = Controller::open(config, listener.local_addr().unwrap()).unwrap();
        let handle = {
            let _enter = rt.enter();
            serve(ctl.clone(), listener).unwrap()
        };
        let client =
            AdminClient::new(&AdminConf::read(&dir.join(ADMIN_CONF_FILE)).unwrap()).unwrap();
        (rt, ctl, handle, client)
    }

    fn policies_sent(rx: &mut crate::connections::queue::NodeRx) -> Vec<shoal_proto::DrivePolicy> {
        let mut out = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            match msg {
                shoal_proto::ControllerMsg::DrivePolicy(p) => out.push(p),
                other => panic!("unexpected message {other:?}"),
            }
        }
        out
    }

    fn policy_req(
        node: Option<&NodeId>,
        selector: Option<&str>,
        mode: &str,
        fs: Option<&str>,
    ) -> SetDrivePolicy {
        SetDrivePolicy {
            node: node.map(|n| n.0.clone()),
            selector: selector.map(str::to_owned),
            mode: mode.into(),
            filesystem: fs.map(str::to_owned),
        }
    }

    #[test]
    fn drive_policies_reach_v3_agents_only_and_only_when_they_change() {
        use shoal_proto::{DrivePolicy, DrivePolicyMode as Mode, Filesystem};
        let dir = tempfile::tempdir().unwrap();
        let (_rt, ctl, handle, client) = api(dir.path(), std::time::Duration::from_secs(5));
        let a = enrol(&ctl, "a", &[("role", "db")]);
        let b = enrol(&ctl, "b", &[("role", "db")]);
        let (a_conn, mut a_rx) = ctl.fake_connection(&a, 3);
        let (_, mut b_rx) = ctl.fake_connection(&b, 2);
        // Right after the session is ready, a v3 agent gets its policy: the default.
        ctl.send_drive_policy_on_connect(&a, a_conn);
        assert_eq!(policies_sent(&mut a_rx), [DrivePolicy::default()]);

        let set = client
            .set_drive_policy(&policy_req(None, Some("role=db"), "approve", Some("xfs")))
            .unwrap();
        assert_eq!(
            (
                set.selector.as_deref(),
                set.mode.as_str(),
                set.filesystem.as_str()
            ),
            (Some("role=db"), "approve", "xfs")
        );
        let approve = DrivePolicy {
            mode: Mode::Approve,
            filesystem: Filesystem::Xfs,
        };
        assert_eq!(policies_sent(&mut a_rx), [approve]);
        // A bolder selector policy does not override the more cautious one.
        client
            .set_drive_policy(&policy_req(None, Some("role=db"), "approve", Some("xfs")))
            .unwrap();
        let rack = enrol(&ctl, "c", &[]);
        client
            .set_drive_policy(&policy_req(Some(&rack), None, "prepare", None))
            .unwrap();
        assert_eq!(
            policies_sent(&mut a_rx),
            [],
            "unchanged policies are not sent again"
        );
        client
            .set_drive_policy(&policy_req(Some(&a), None, "prepare", None))
            .unwrap();
        assert_eq!(
            policies_sent(&mut a_rx),
            [DrivePolicy {
                mode: Mode::Prepare,
                filesystem: Filesystem::Ext4
            }]
        );

        let all = client.drive_policies().unwrap();
        assert_eq!(all.policies.len(), 3);
        let eff: Vec<(String, String, String)> = all
            .effective
            .iter()
            .map(|e| (e.hostname.clone(), e.mode.clone(), e.source.clone()))
            .collect();
        assert!(
            eff.contains(&("a".into(), "prepare".into(), "node".into())),
            "{eff:?}"
        );
        assert!(
            eff.contains(&("b".into(), "approve".into(), "selector role=db".into())),
            "{eff:?}"
        );
        assert!(
            eff.contains(&("c".into(), "prepare".into(), "node".into())),
            "{eff:?}"
        );

        let gone = client.delete_drive_policy(&spec(Some(&a), None)).unwrap();
        assert_eq!(gone.mode, "prepare");
        assert_eq!(policies_sent(&mut a_rx), [approve]);
        assert_eq!(
            status(client.delete_drive_policy(&spec(Some(&a), None))).0,
            404
        );
        assert_eq!(
            status(client.set_drive_policy(&policy_req(None, Some("novalue"), "approve", None))).0,
            400
        );
        assert_eq!(
            status(client.set_drive_policy(&policy_req(None, None, "approve", None))).0,
            400
        );
        assert_eq!(
            status(client.set_drive_policy(&policy_req(None, Some("k=v"), "erase", None))).0,
            400
        );
        assert_eq!(
            status(client.set_drive_policy(&policy_req(
                None,
                Some("k=v"),
                "report",
                Some("btrfs")
            )))
            .0,
            400
        );
        assert_eq!(
            status(client.set_drive_policy(&policy_req(
                Some(&NodeId("n404".into())),
                None,
                "report",
                None
            )))
            .0,
            404
        );
        client
            .delete_drive_policy(&spec(None, Some("role=db")))
            .unwrap();
        assert_eq!(policies_sent(&mut a_rx), [DrivePolicy::default()]);

        // The v2 agent never got anything.
        assert!(b_rx.try_recv().is_err());
        handle.shutdown();
    }

    fn smart(health: bool) -> shoal_proto::SmartOutcome {
        shoal_proto::SmartOutcome::Report(shoal_proto::SmartReport {
            device: "/dev/x".into(),
            protocol: shoal_proto::DriveProtocol::Ata,
            model: Some("Disk".into()),
            serial: Some(format!("S-{health}")),
            firmware: None,
            capacity_bytes: None,
            temperature_celsius: Some(30),
            power_on_hours: Some(5),
            health_passed: Some(health),
            exit_status: shoal_proto::SmartExitStatus(0),
            predictors: shoal_proto::SmartPredictors::Ata(Default::default()),
            self_test: None,
        })
    }

    fn drive(
        name: &str,
        serial: &str,
        state: shoal_proto::DriveState,
        smart: Option<shoal_proto::SmartOutcome>,
    ) -> shoal_proto::Drive {
        shoal_proto::Drive {
            name: name.into(),
            model: Some("Disk".into()),
            serial: Some(serial.into()),
            size_bytes: 1 << 30,
            removable: false,
            state,
            smart_at: smart.as_ref().map(|_| UnixMillis(1000)),
            smart,
        }
    }

    /// Answers drive commands like an agent: `answer` decides the result, `None` stays silent.
    fn fake_agent(
        ctl: Ctl,
        node: NodeId,
        mut rx: crate::connections::queue::NodeRx,
        answer: impl Fn(&shoal_proto::DriveCommand) -> Option<Result<String, String>> + Send + 'static,
    ) -> std::sync::Arc<std::sync::Mutex<Vec<shoal_proto::DriveCommand>>> {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                if let shoal_proto::ControllerMsg::DriveCommand(cmd) = msg {
                    record.lock().unwrap().push(cmd.clone());
                    if let Some(result) = answer(&cmd) {
                        ctl.drives.command_result(
                            &node,
                            shoal_proto::DriveCommandResult { id: cmd.id, result },
                        );
                    }
                }
            }
        });
        seen
    }

    #[test]
    fn drive_commands_are_checked_sent_and_answered() {
        use shoal_proto::{DriveAction, DriveReport, DriveState, Filesystem, SelfTestKind};
        let dir = tempfile::tempdir().unwrap();
        let (rt, ctl, handle, client) = api(dir.path(), std::time::Duration::from_millis(500));
        let a = enrol(&ctl, "a", &[]);
        let old = enrol(&ctl, "old", &[]);
        let away = enrol(&ctl, "away", &[]);
        let prepare = |node: &NodeId, device: &str, force: bool, serial: Option<&str>| {
            let req = PrepareRequest {
                force,
                serial: serial.map(str::to_owned),
                filesystem: Some(Filesystem::Xfs),
            };
            client.prepare_drive(&node.0, device, &req)
        };

        assert_eq!(
            status(prepare(&NodeId("n404".into()), "sdb", false, None)),
            (404, "no node n404 in the fleet".into())
        );
        let (code, msg) = status(prepare(&away, "sdb", false, None));
        assert!(
            code == 409 && msg.contains("is not connected"),
            "{code} {msg}"
        );
        let _ = ctl.fake_connection(&old, 2);
        let (code, msg) = status(prepare(&old, "sdb", false, None));
        assert!(
            code == 409 && msg.contains("speaks protocol 2; drive commands need protocol 3"),
            "{code} {msg}"
        );
        let (a_conn, a_rx) = ctl.fake_connection(&a, 3);
        let (code, msg) = status(prepare(&a, "sdb", false, None));
        assert!(
            code == 409 && msg.contains("has not reported its drives yet"),
            "{code} {msg}"
        );

        let report = DriveReport {
            at: UnixMillis(1000),
            drives: vec![
                drive(
                    "sdb",
                    "WD-1",
                    DriveState::HasData {
                        signatures: vec!["gpt".into(), "ext4".into()],
                    },
                    None,
                ),
                drive("sdc", "S-false", DriveState::Blank, Some(smart(false))),
                drive(
                    "sdd",
                    "S-true",
                    DriveState::AwaitingApproval,
                    Some(smart(true)),
                ),
                drive(
                    "loop0",
                    "L",
                    DriveState::Blank,
                    Some(shoal_proto::SmartOutcome::NoSmart {
                        reason: "loop device has no SMART".into(),
                    }),
                ),
            ],
        };
        ctl.drives.ingest(&a, report, now_ms()).unwrap();
        let listed = client.drives(Some(&a.0)).unwrap();
        assert_eq!(
            listed
                .iter()
                .map(|d| (
                    d.device.as_str(),
                    d.state.as_str(),
                    d.smart.verdict.as_str()
                ))
                .collect::<Vec<_>>(),
            [
                ("sdb", "has-data", "unknown"),
                ("sdc", "blank", "failing"),
                ("sdd", "awaiting-approval", "ok"),
                ("loop0", "blank", "unknown")
            ]
        );
        assert_eq!(status(client.drives(Some("n404"))).0, 404);

        let seen = {
            let _enter = rt.enter();
            fake_agent(ctl.clone(), a.clone(), a_rx, |cmd| {
                match (cmd.device.as_str(), &cmd.action) {
                    ("sdd", DriveAction::Prepare { .. }) => {
                        Some(Err("mkfs.xfs: command not found".into()))
                    }
                    ("sdb", DriveAction::Prepare { .. }) => Some(Ok(
                        "sdb prepared: sdb1 xfs mounted on /var/lib/shoal/drives/u".into(),
                    )),
                    ("sdd", DriveAction::SelfTest(_)) => Some(Ok("short self-test started".into())),
                    _ => None,
                }
            })
        };
        let (code, msg) = status(prepare(&a, "sdx", false, None));
        assert!(
            code == 404 && msg.contains("reports no drive sdx (it reports: sdb, sdc, sdd, loop0)"),
            "{code} {msg}"
        );
        let (code, msg) = status(prepare(&a, "sdb", false, None));
        assert_eq!(code, 409);
        assert_eq!(msg, "refusing to prepare sdb: it holds data (gpt, ext4); to erase it, run again with --force --serial WD-1");
        let (code, msg) = status(prepare(&a, "sdb", true, Some("WD-2")));
        assert!(
            code == 409 && msg.contains("does not match its serial number WD-1"),
            "{code} {msg}"
        );
        assert_eq!(status(prepare(&a, "sdb", true, None)).0, 400);
        let (code, msg) = status(prepare(&a, "sdc", false, None));
        assert!(
            code == 409
                && msg.contains(
                    "its SMART verdict is failing (overall health self-assessment FAILED)"
                ),
            "{code} {msg}"
        );
        assert!(
            seen.lock().unwrap().is_empty(),
            "nothing refused reached the agent"
        );

        let done = prepare(&a, "/dev/sdb", true, Some("WD-1")).unwrap();
        assert_eq!(
            (done.device.as_str(), done.action.as_str()),
            ("sdb", "prepare")
        );
        assert!(done.message.starts_with("sdb prepared"), "{}", done.message);
        assert_eq!(
            seen.lock().unwrap().last().map(|c| c.action.clone()),
            Some(DriveAction::Prepare {
                force_serial: Some("WD-1".into()),
                filesystem: Some(Filesystem::Xfs)
            })
        );
        let (code, msg) = status(prepare(&a, "sdd", false, None));
        assert_eq!(
            (code, msg.as_str()),
            (
                502,
                format!("node {a} could not prepare sdd: mkfs.xfs: command not found").as_str()
            )
        );

        let started = client.self_test_drive(&a.0, "sdd", "short").unwrap();
        assert_eq!(
            (started.action.as_str(), started.message.as_str()),
            ("self-test", "short self-test started")
        );
        assert_eq!(
            seen.lock().unwrap().last().map(|c| c.action.clone()),
            Some(DriveAction::SelfTest(SelfTestKind::Short))
        );
        let (code, msg) = status(client.self_test_drive(&a.0, "loop0", "short"));
        assert!(
            code == 409 && msg.contains("loop0 has no SMART (loop device has no SMART)"),
            "{code} {msg}"
        );
        assert_eq!(status(client.self_test_drive(&a.0, "sdd", "medium")).0, 400);

        // The agent stays silent: the request times out.
        let (code, msg) = status(prepare(&a, "loop0", false, None));
        assert!(
            code == 504 && msg.contains("did not answer the prepare command for loop0"),
            "{code} {msg}"
        );

        // The connection drops while the agent works on it.
        let c = ctl.clone();
        let n = a.clone();
        let dropper = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(150));
            c.end_fake_connection(&n, a_conn);
        });
        let (code, msg) = status(prepare(&a, "loop0", false, None));
        dropper.join().unwrap();
        assert!(
            code == 503 && msg.contains("closed before it answered the prepare command for loop0"),
            "{code} {msg}"
        );
        let (code, msg) = status(prepare(&a, "sdd", false, None));
        assert!(
            code == 409 && msg.contains("is not connected"),
            "{code} {msg}"
        );
        handle.shutdown();
    }
}
