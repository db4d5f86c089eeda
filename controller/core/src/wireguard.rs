//! WireGuard devices as the controller stores them: devices that reach an overlay network through
//! gateway agents with a stock WireGuard client (issue 17), and each network's gateway key.
//!
//! A device's address comes from its network's IPAM, shared with the nodes' addresses
//! ([`crate::networks::free_address`] over members and devices alike). Its private key is never
//! stored: `shoalctl` generates it and prints it once, or the operator brings their own and gives
//! the public key.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use shoal_proto::{NetworkId, UnixMillis};

/// One WireGuard device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The network it is on.
    pub network: NetworkId,
    /// Unique per network, `[a-z0-9][a-z0-9-]{0,30}`.
    pub name: String,
    /// Its WireGuard (x25519) public key.
    pub public_key: [u8; 32],
    /// Its overlay address.
    pub address: Ipv4Addr,
    /// When it was added.
    pub created_at: UnixMillis,
}

/// A network's WireGuard side: the key every gateway of the network shares, and the endpoint
/// clients are told to use.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRecord {
    /// The network.
    pub network: NetworkId,
    /// The gateways' shared x25519 private key (goes only to the network's gateway agents).
    pub private_key: [u8; 32],
    /// `HOST:PORT` clients send to: the network's floating gateway endpoint.
    pub endpoint: String,
}

impl std::fmt::Debug for GatewayRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayRecord")
            .field("network", &self.network)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}
