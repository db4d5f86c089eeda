//! The admin API's routes for the registry: join tokens, nodes and the event log.

use std::collections::BTreeMap;

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    routing::get,
    Json, Router,
};
use serde::Deserialize;
use shoal_overlay::pki;
use shoal_proto::{JoinToken, NodeId, UnixMillis};
use tracing::info;

use crate::registry::store::LabelsError;
use crate::{server::now_ms, server::Controller, store::StoreError};
use shoal_api::events::EventView;
use shoal_api::nodes::OverlayAddressView;
use shoal_api::nodes::{LabelNode, LabelsChanged, NodeView};
use shoal_api::tokens::CreateToken;
use shoal_api::tokens::CreatedToken;
use shoal_api::tokens::TokenView;
use shoal_controller_core::labels::{LabelChange, LabelChangeError};
use shoal_controller_core::networks::NetworkRecord;
use shoal_controller_core::registry::NodeRecord;
use shoal_controller_core::registry::NodeStatus;
use shoal_controller_core::registry::TokenRecord;
use shoal_controller_core::selector::{parse_selector, SelectorError};
use shoal_controller_core::time::rfc3339_ms as rfc3339;

use crate::http::{blocking, not_found, Ctl, HttpError};

/// This domain's admin routes (the router adds authentication).
pub fn routes() -> Router<Ctl> {
    Router::new()
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}", get(show_node).delete(remove_node))
        .route("/v1/nodes/{id}/labels", axum::routing::post(label_node))
        .route("/v1/events", get(list_events))
}

pub(crate) fn token_view(t: &TokenRecord, now: UnixMillis) -> TokenView {
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

pub(crate) async fn list_tokens(State(ctl): State<Ctl>) -> Result<Json<Vec<TokenView>>, HttpError> {
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

pub(crate) async fn create_token(
    State(ctl): State<Ctl>,
    Json(req): Json<CreateToken>,
) -> Result<Json<CreatedToken>, HttpError> {
    if req.max_uses == Some(0) {
        return Err(HttpError(
            StatusCode::BAD_REQUEST,
            "--uses must be at least 1".into(),
        ));
    }
    // The labels nodes will carry: the same rules as `nodes label`.
    shoal_controller_core::labels::check_labels(&req.labels)
        .map_err(|e| HttpError(StatusCode::BAD_REQUEST, e.to_string()))?;
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

pub(crate) async fn revoke_token(
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

/// Merges a stored record with the controller's live state.
pub(crate) fn node_view(ctl: &Controller, rec: NodeRecord) -> NodeView {
    let live = ctl.live().nodes.get(&rec.id).cloned().unwrap_or_default();
    let connected = ctl.is_connected(&rec.id);
    let local = ctl.live().conns.get(&rec.id).map(|c| c.boot.clone());
    let (boot, controller) = match local {
        Some(boot) => (
            boot,
            ctl.cluster.is_clustered().then(|| ctl.cluster.id.clone()),
        ),
        None => match ctl.mesh.remote(&rec.id) {
            Some(r) => (r.presence.boot, Some(r.controller)),
            None => (None, None),
        },
    };
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
            .map(|i| crate::registry::identity_store::short_key(&i.key)),
        controller,
        id: rec.id.0,
    }
}

/// Every node's overlay addresses, by node id.
pub(crate) fn overlay_views(
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

pub(crate) fn all_nodes(ctl: &Controller) -> Result<Vec<NodeView>, HttpError> {
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

impl From<SelectorError> for HttpError {
    fn from(e: SelectorError) -> Self {
        HttpError(StatusCode::BAD_REQUEST, e.to_string())
    }
}

impl From<LabelsError> for HttpError {
    fn from(e: LabelsError) -> Self {
        match e {
            LabelsError::Store(e) => e.into(),
            LabelsError::Refused(e @ LabelChangeError::Exists { .. }) => {
                HttpError(StatusCode::CONFLICT, e.to_string())
            }
            LabelsError::Refused(e) => HttpError(StatusCode::BAD_REQUEST, e.to_string()),
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct NodesQuery {
    /// A label selector: only the nodes it matches.
    pub(crate) selector: Option<String>,
}

pub(crate) async fn list_nodes(
    State(ctl): State<Ctl>,
    Query(q): Query<NodesQuery>,
) -> Result<Json<Vec<NodeView>>, HttpError> {
    // Refused before any store work: the selector is bounded by its parser.
    let selector = q.selector.as_deref().map(parse_selector).transpose()?;
    blocking(move || {
        let mut nodes = all_nodes(&ctl)?;
        if let Some(s) = selector {
            nodes.retain(|n| s.matches(&n.labels));
        }
        Ok(Json(nodes))
    })
    .await
}

/// `POST /v1/nodes/{id}/labels`: changes the labels in the store (with an event), then makes
/// everything that selects by labels follow at once.
pub(crate) async fn label_node(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
    Json(req): Json<LabelNode>,
) -> Result<Json<LabelsChanged>, HttpError> {
    blocking(move || {
        let node = NodeId(id.clone());
        let change = LabelChange {
            set: req.set,
            remove: req.remove.into_iter().collect(),
            overwrite: req.overwrite,
        };
        let (rec, edits) = ctl
            .store
            .change_labels(&node, &change, now_ms())?
            .ok_or_else(|| not_found(&format!("node {id}")))?;
        let changes: Vec<String> = edits.iter().map(ToString::to_string).collect();
        if !changes.is_empty() {
            info!(node = %node, changes = %changes.join(", "), "node labels changed");
            crate::registry::labels::follow(&ctl, &node);
        }
        Ok(Json(LabelsChanged {
            node: rec.id.0,
            hostname: rec.hostname,
            changes,
            labels: rec.labels,
        }))
    })
    .await
}

pub(crate) async fn show_node(
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

pub(crate) async fn remove_node(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
) -> Result<StatusCode, HttpError> {
    blocking(move || {
        if ctl.remove_node(&NodeId(id.clone()))? {
            ctl.store.forget_backup_node(&NodeId(id.clone()))?;
            Ok(StatusCode::NO_CONTENT)
        } else {
            Err(not_found(&format!("node {id}")))
        }
    })
    .await
}

#[derive(Debug, Deserialize)]
pub(crate) struct EventQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

pub(crate) async fn list_events(
    State(ctl): State<Ctl>,
    Query(q): Query<EventQuery>,
) -> Result<Json<Vec<EventView>>, HttpError> {
    blocking(move || {
        let events = ctl
            .store
            .events(q.after, q.limit.unwrap_or(1000).min(10_000))?;
        Ok(Json(events.into_iter().map(event_view).collect()))
    })
    .await
}

/// An event as the API lists it.
pub(crate) fn event_view(e: crate::store::Event) -> EventView {
    EventView {
        seq: e.seq,
        at: rfc3339(e.at.0),
        kind: serde_json::to_value(e.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        node: e.node.map(|n| n.0),
        message: e.message,
    }
}
