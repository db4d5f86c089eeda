//! `GET /v1/controllers`: every live controller, the leader, agents per controller, etcd's health.

use axum::{extract::State, routing::get, Json, Router};
use shoal_api::cluster::{ControllerView, ControllersView, EtcdEndpointView, CONTROLLERS_PATH};

use crate::{http::Ctl, http::HttpError, server::now_ms};

/// The route.
pub fn routes() -> Router<Ctl> {
    Router::new().route(CONTROLLERS_PATH, get(controllers))
}

async fn controllers(State(ctl): State<Ctl>) -> Result<Json<ControllersView>, HttpError> {
    let cluster = &ctl.cluster;
    let now = now_ms().0;
    let leader = cluster.leader().leader;
    let mut members = cluster.members();
    if !cluster.is_clustered() {
        members = vec![ctl.member_record()];
    }
    let controllers = members
        .into_iter()
        .map(|m| ControllerView {
            leader: leader.as_deref() == Some(m.id.as_str()),
            agent_addr: m.agent_addr.to_string(),
            api: m.api,
            version: m.version,
            agents: m.agents,
            started: shoal_controller_core::time::rfc3339_ms(m.started_ms),
            seen_ms_ago: now.saturating_sub(m.updated_ms),
            id: m.id,
        })
        .collect();
    let etcd = match &ctl.config.etcd {
        Some(config) => etcd_health(config).await,
        None => Vec::new(),
    };
    Ok(Json(ControllersView {
        store: if cluster.is_clustered() {
            "etcd"
        } else {
            "embedded"
        }
        .into(),
        answered_by: cluster.id.clone(),
        controllers,
        etcd,
    }))
}

/// Asks every endpoint for its status, each on a connection of its own, all at once (each bounded
/// by the request timeout).
async fn etcd_health(config: &crate::etcd::EtcdConfig) -> Vec<EtcdEndpointView> {
    let mut asks = tokio::task::JoinSet::new();
    for (i, endpoint) in config.endpoints.iter().enumerate() {
        let mut one = config.clone();
        one.endpoints = vec![endpoint.clone()];
        let endpoint = endpoint.clone();
        asks.spawn(async move { (i, endpoint_health(one, endpoint).await) });
    }
    let mut out: Vec<(usize, EtcdEndpointView)> = asks.join_all().await;
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, v)| v).collect()
}

async fn endpoint_health(one: crate::etcd::EtcdConfig, endpoint: String) -> EtcdEndpointView {
    let status = async {
        let mut client = crate::etcd::connect(&one)
            .await
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(one.request_timeout, client.status())
            .await
            .map_err(|_| format!("no answer within {:?}", one.request_timeout))?
            .map_err(|e| e.to_string())
    }
    .await;
    match status {
        Ok(s) => EtcdEndpointView {
            endpoint,
            healthy: true,
            version: Some(s.version().to_owned()),
            raft_leader: s.header().map(|h| h.member_id()) == Some(s.leader()),
            db_size: Some(s.db_size()),
            error: None,
        },
        Err(e) => EtcdEndpointView {
            endpoint,
            healthy: false,
            version: None,
            raft_leader: false,
            db_size: None,
            error: Some(e),
        },
    }
}
