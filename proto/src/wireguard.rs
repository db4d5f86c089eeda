//! (v9) WireGuard access: what the controller tells agents about a network's WireGuard devices and
//! gateways, and how an agent says it is a gateway.

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::{NetworkId, NodeId};

/// (v9) An agent runs a WireGuard gateway (`--wireguard-gateway`) on this UDP address (the
/// network's floating endpoint, bound by every gateway). Sent after Welcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGuardGatewayHello {
    /// The UDP address the gateway listens on.
    pub listen: SocketAddr,
}

/// (v9) The WireGuard state of every network the agent is a member of that has WireGuard devices.
/// Sent whole after Welcome (v9) and whenever a device, a gateway or the active gateway changes; a
/// network missing from it has no WireGuard access (or no longer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGuardMap {
    /// One entry per network.
    pub networks: Vec<WireGuardNetwork>,
}

/// (v9) One network's WireGuard devices and gateways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGuardNetwork {
    /// The network.
    pub network: NetworkId,
    /// Its devices.
    pub devices: Vec<WireGuardDevice>,
    /// The members that are gateways for it: the only members whose frames may carry a device's
    /// address as their source (receivers' anti-spoofing rule).
    pub gateways: Vec<NodeId>,
    /// Present only in the message to a gateway of this network.
    pub role: Option<WireGuardGatewayRole>,
}

/// (v9) One WireGuard device: its public key and its address on the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGuardDevice {
    /// The device's x25519 public key.
    pub public_key: [u8; 32],
    /// Its overlay address.
    pub address: Ipv4Addr,
}

/// (v9) What a gateway needs to serve a network.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGuardGatewayRole {
    /// The network's gateway private key, shared by its gateways (kept in memory only).
    pub private_key: [u8; 32],
    /// Whether this agent is the network's active gateway: the one that holds the floating
    /// endpoint address.
    pub active: bool,
}

impl std::fmt::Debug for WireGuardGatewayRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireGuardGatewayRole")
            .field("private_key", &"<redacted>")
            .field("active", &self.active)
            .finish()
    }
}
