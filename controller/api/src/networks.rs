//! Overlay networks and their members: `/v1/networks…`.

use serde::{Deserialize, Serialize};

/// An overlay network as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkView {
    /// Network id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Subnet, CIDR.
    pub subnet: String,
    /// TAP MTU.
    pub mtu: u16,
    /// Label selectors (canonical text); nodes matching any are members.
    pub selectors: Vec<String>,
    /// Number of members.
    pub members: usize,
    /// Creation time (RFC 3339).
    pub created_at: String,
}

/// A member of an overlay network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// Node id.
    pub node: String,
    /// Hostname (empty if the node is gone).
    pub hostname: String,
    /// MAC on the network.
    pub mac: String,
    /// IPv4 address on the network.
    pub address: String,
    /// Added by an operator.
    pub explicit: bool,
    /// A selector matches its labels.
    pub via_selector: bool,
}

/// One network with its members (`GET /v1/networks/{name}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDetail {
    /// The network.
    pub network: NetworkView,
    /// Its members, by address.
    pub members: Vec<MemberView>,
}

/// Request body of `POST /v1/networks`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CreateNetwork {
    /// Name, `[a-z0-9][a-z0-9-]{0,30}`.
    pub name: String,
    /// Subnet, CIDR (`10.91.0.0/24`).
    pub subnet: String,
    /// TAP MTU; none means the default network's.
    pub mtu: Option<u16>,
}

/// Who to add or remove (`/v1/networks/{name}/members`): exactly one of the two.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MemberSpec {
    /// A node id.
    pub node: Option<String>,
    /// A label selector (`role=db,zone in (a,b)`).
    pub selector: Option<String>,
}

/// What a network change did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkUpdate {
    /// The network after the change.
    pub network: NetworkView,
    /// Members that joined.
    pub joined: Vec<MemberView>,
    /// Node ids that left.
    pub left: Vec<String>,
}
