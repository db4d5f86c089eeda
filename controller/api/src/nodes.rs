//! Nodes as `GET /v1/nodes` (`?selector=SELECTOR` keeps the nodes a label selector matches) and
//! `GET /v1/nodes/{id}` show them, and label changes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_proto::{BootReport, HealthReport, Inventory};

/// A node as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Hostname.
    pub hostname: String,
    /// `up` or `down`.
    pub status: String,
    /// Whether a control connection is open right now.
    pub connected: bool,
    /// Agent software version.
    pub agent_version: String,
    /// Last heartbeat (RFC 3339).
    pub last_seen: Option<String>,
    /// Last heartbeat (Unix ms).
    pub last_seen_unix_ms: Option<u64>,
    /// When the node first enrolled (RFC 3339).
    pub enrolled_at: String,
    /// The hardware identity that keeps the record across re-enrolments.
    pub hardware_id: String,
    /// Labels: from the join token and `shoalctl nodes label`.
    pub labels: BTreeMap<String, String>,
    /// Last reported inventory.
    pub inventory: Option<Inventory>,
    /// Last reported health.
    pub health: Option<HealthReport>,
    /// The node's overlay addresses, one per network it is a member of.
    #[serde(default)]
    pub overlay: Vec<OverlayAddressView>,
    /// The connected agent's boot report (protocol 4): boot id, netboot image, health checks.
    #[serde(default)]
    pub boot: Option<BootReport>,
    /// Fingerprint of the key the node is bound to (first 8 bytes of its SPKI SHA-256, hex).
    #[serde(default)]
    pub key: Option<String>,
    /// The controller holding its session, when several controllers share one store.
    #[serde(default)]
    pub controller: Option<String>,
}

/// A node's address on one overlay network.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OverlayAddressView {
    /// Network name.
    pub network: String,
    /// Network id (as carried in overlay datagrams).
    pub network_id: u32,
    /// The node's MAC there.
    pub mac: String,
    /// The node's IPv4 address there.
    pub address: String,
    /// The subnet's prefix length.
    pub prefix_len: u8,
}

/// `POST /v1/nodes/{id}/labels`: set and remove labels (`shoalctl nodes label`), kubectl's rules:
/// giving a label the node has another value needs `overwrite`; removing one it lacks is no error.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LabelNode {
    /// Labels to set, `KEY` → `VALUE`.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Keys to remove.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Whether a label the node has may get another value.
    #[serde(default)]
    pub overwrite: bool,
}

/// What `POST /v1/nodes/{id}/labels` did.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LabelsChanged {
    /// Node id.
    pub node: String,
    /// Hostname.
    pub hostname: String,
    /// Each change (`role=db added`, `role=db (was web)`, `zone removed (was a)`); empty when
    /// nothing changed.
    pub changes: Vec<String>,
    /// The node's labels now.
    pub labels: BTreeMap<String, String>,
}
