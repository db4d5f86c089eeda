//! WireGuard devices of overlay networks: `/v1/wireguard/{network}/peers…`.

use serde::{Deserialize, Serialize};

/// A WireGuard device as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    /// Its name, unique in its network.
    pub name: String,
    /// The network.
    pub network: String,
    /// Its overlay address.
    pub address: String,
    /// Its WireGuard public key (base64).
    pub public_key: String,
    /// When it was added (RFC 3339).
    pub created_at: String,
}

/// Request body of `POST /v1/wireguard/{network}/peers`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AddPeer {
    /// Name, `[a-z0-9][a-z0-9-]{0,30}`.
    pub name: String,
    /// The device's public key (base64, as `wg pubkey` prints it).
    pub public_key: String,
    /// The endpoint clients send to (`HOST:PORT`); needed for the network's first device, and
    /// replaces the stored one when given.
    pub endpoint: Option<String>,
}

/// What `POST /v1/wireguard/{network}/peers` returns: the device and what its configuration needs
/// (all but its private key, which the controller never sees).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedPeer {
    /// The device.
    pub peer: PeerView,
    /// The network's gateway public key (base64): the client's one `[Peer]`.
    pub gateway_public_key: String,
    /// The endpoint clients send to.
    pub endpoint: String,
    /// The network's subnet, CIDR: the client's AllowedIPs.
    pub allowed_ips: String,
}
