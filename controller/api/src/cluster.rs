//! `GET /v1/controllers`: the controllers of the fleet, which one leads, how many agents each
//! serves, and the health of the etcd cluster they share.

use serde::{Deserialize, Serialize};

/// The route.
pub const CONTROLLERS_PATH: &str = "/v1/controllers";

/// `GET /v1/controllers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllersView {
    /// `embedded` (one controller on its own store) or `etcd`.
    pub store: String,
    /// The controller that answered.
    pub answered_by: String,
    /// Every live controller.
    pub controllers: Vec<ControllerView>,
    /// Every etcd endpoint the answering controller uses (empty on the embedded store).
    pub etcd: Vec<EtcdEndpointView>,
}

/// One controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerView {
    /// Its id.
    pub id: String,
    /// Whether it leads (runs rollouts, maintenance, backup schedules, netboot DHCP, pruning).
    pub leader: bool,
    /// Where agents reach it.
    pub agent_addr: String,
    /// Its admin API.
    pub api: String,
    /// Its version.
    pub version: String,
    /// Agents connected to it.
    pub agents: u64,
    /// When it started (RFC 3339).
    pub started: String,
    /// How long ago it last wrote its record, in ms (a live controller rewrites it every 2 s).
    pub seen_ms_ago: u64,
}

/// One etcd endpoint, as the answering controller sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdEndpointView {
    /// The endpoint URL.
    pub endpoint: String,
    /// Whether it answered a status request.
    pub healthy: bool,
    /// Its etcd version, when it answered.
    pub version: Option<String>,
    /// Whether it is the raft leader of the etcd cluster.
    pub raft_leader: bool,
    /// Database size in bytes, when it answered.
    pub db_size: Option<i64>,
    /// Why it is not healthy.
    pub error: Option<String>,
}
