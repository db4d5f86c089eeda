//! The admin API's routes for overlay networks, their members, and the overlay's paths and counters.

use std::collections::BTreeMap;

use axum::{
    body::Bytes,
    extract::{Path, Query, State},
    http::StatusCode,
    routing::get,
    Json, Router,
};
use shoal_proto::NodeId;

use crate::{
    overlay::networks::NetworkError, server::now_ms, server::Controller, store::StoreError,
};
use shoal_api::networks::CreateNetwork;
use shoal_api::networks::MemberSpec;
use shoal_api::networks::MemberView;
use shoal_api::networks::NetworkDetail;
use shoal_api::networks::NetworkUpdate;
use shoal_api::networks::NetworkView;
use shoal_controller_core::networks::{MemberRecord, MembershipChange, NetworkRecord, Subnet};
use shoal_controller_core::selector::{parse_selector, Selector};
use shoal_controller_core::time::rfc3339_ms as rfc3339;

use crate::http::{blocking, Ctl, HttpError};

/// This domain's admin routes (the router adds authentication).
pub fn routes() -> Router<Ctl> {
    Router::new()
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
}

impl From<NetworkError> for HttpError {
    fn from(e: NetworkError) -> Self {
        use NetworkError as E;
        if let E::Store(s) = e {
            return s.into();
        }
        let status = match &e {
            E::UnknownNetwork(_)
            | E::UnknownDevice { .. }
            | E::UnknownNode(_)
            | E::NotMember { .. }
            | E::UnknownSelector { .. } => StatusCode::NOT_FOUND,
            E::BadName(_)
            | E::BadSubnet(_)
            | E::BadMtu(_)
            | E::BadSelector(_)
            | E::BadWireguard(_)
            | E::NoEndpoint(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::CONFLICT,
        };
        HttpError(status, e.to_string())
    }
}

pub(crate) async fn overlay_paths(
    State(ctl): State<Ctl>,
) -> Json<Vec<shoal_api::overlay::PathView>> {
    Json(path_views(&ctl))
}

/// Every reported path, per direction (`overlay paths`, and the metrics).
pub(crate) fn path_views(ctl: &Controller) -> Vec<shoal_api::overlay::PathView> {
    let mut out = Vec::new();
    for (node, r) in ctl.overlay.reported_paths() {
        for p in r.report.paths {
            let relay_reason = r.relayed.get(&p.peer).map(|x| x.label().to_owned());
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
                relay_reason,
            });
        }
    }
    out
}

pub(crate) async fn overlay_counters(
    State(ctl): State<Ctl>,
) -> Json<Vec<shoal_api::overlay::OverlayCountersView>> {
    Json(
        ctl.overlay
            .reported_paths()
            .into_iter()
            .map(|(node, r)| shoal_api::overlay::OverlayCountersView {
                datapath: ctl.overlay.reported_datapath(&node).map(datapath_view),
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

fn datapath_view(
    (d, at): (shoal_proto::DatapathReport, shoal_proto::UnixMillis),
) -> shoal_api::overlay::DatapathView {
    shoal_api::overlay::DatapathView {
        datagrams_per_batch: d.datagrams_per_batch(),
        taps: d
            .taps
            .into_iter()
            .map(|t| shoal_api::overlay::TapView {
                frames_per_read: t.frames_per_read(),
                frames_per_write: t.frames_per_write(),
                network: t.network.0,
                device: t.device,
                offloads: t.offloads,
                fallback: t.fallback,
                queues: t.queues,
                reads: t.reads,
                read_frames: t.read_frames,
                writes: t.writes,
                write_frames: t.write_frames,
            })
            .collect(),
        rx_batches: d.rx_batches,
        rx_datagrams: d.rx_datagrams,
        reported_at: rfc3339(at.0),
    }
}

pub(crate) fn network_view(rec: &NetworkRecord, members: usize) -> NetworkView {
    NetworkView {
        id: rec.id.0,
        name: rec.name.clone(),
        subnet: rec.subnet().to_string(),
        mtu: rec.mtu,
        selectors: rec.selectors.iter().map(Selector::to_string).collect(),
        members,
        created_at: rfc3339(rec.created_at.0),
    }
}

pub(crate) fn member_view(ctl: &Controller, m: &MemberRecord) -> Result<MemberView, StoreError> {
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

pub(crate) fn network_detail(ctl: &Controller, name: &str) -> Result<NetworkDetail, HttpError> {
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
pub(crate) fn network_update(
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

pub(crate) async fn list_networks(
    State(ctl): State<Ctl>,
) -> Result<Json<Vec<NetworkView>>, HttpError> {
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

pub(crate) async fn create_network(
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

pub(crate) async fn show_network(
    State(ctl): State<Ctl>,
    Path(name): Path<String>,
) -> Result<Json<NetworkDetail>, HttpError> {
    blocking(move || Ok(Json(network_detail(&ctl, &name)?))).await
}

pub(crate) async fn delete_network(
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
pub(crate) enum Who {
    Node(NodeId),
    Selector(Selector),
}

pub(crate) fn who(spec: MemberSpec) -> Result<Who, HttpError> {
    match (spec.node, spec.selector) {
        (Some(node), None) => Ok(Who::Node(NodeId(node))),
        (None, Some(selector)) => {
            let selector = parse_selector(&selector).map_err(NetworkError::from)?;
            Ok(Who::Selector(selector))
        }
        _ => Err(HttpError(
            StatusCode::BAD_REQUEST,
            "name exactly one of node or selector".into(),
        )),
    }
}

pub(crate) async fn add_member(
    State(ctl): State<Ctl>,
    Path(name): Path<String>,
    Json(spec): Json<MemberSpec>,
) -> Result<Json<NetworkUpdate>, HttpError> {
    blocking(move || {
        let changes = match who(spec)? {
            Who::Node(node) => ctl.store.add_member(&name, &node, now_ms())?.1,
            Who::Selector(s) => ctl.store.add_selector(&name, &s, now_ms())?,
        };
        Ok(Json(network_update(&ctl, &name, changes)?))
    })
    .await
}

pub(crate) async fn remove_member(
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
            Who::Selector(s) => ctl.store.remove_selector(&name, &s, now_ms())?,
        };
        Ok(Json(network_update(&ctl, &name, changes)?))
    })
    .await
}
