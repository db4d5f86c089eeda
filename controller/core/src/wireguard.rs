//! WireGuard devices as the controller stores them: devices that reach an overlay network through
//! gateway agents with a stock WireGuard client (issue 17), and each network's gateway key.
//!
//! A device's address comes from its network's IPAM, shared with the nodes' addresses
//! ([`crate::networks::free_address`] over members and devices alike). Its private key is never
//! stored: `shoalctl` generates it and prints it once, or the operator brings their own and gives
//! the public key.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use shoal_proto::{
    NetworkId, NodeId, UnixMillis, WireGuardDevice, WireGuardGatewayRole, WireGuardMap,
    WireGuardNetwork,
};

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

/// One network with WireGuard access as [`map_for`] needs it.
#[derive(Debug, Clone)]
pub struct WireGuardSite {
    /// The network's gateway record (its key).
    pub gateway: GatewayRecord,
    /// Its devices.
    pub devices: Vec<DeviceRecord>,
    /// Its member nodes.
    pub members: BTreeSet<NodeId>,
}

/// The network's active gateway: the `current` one while it is still a connected gateway member
/// (so a gateway that comes back does not take the address away again, which would cost the
/// devices another re-handshake), otherwise the lowest node id among its members whose agents are
/// connected as gateways (deterministic; it moves only when the active agent disconnects).
pub fn active_gateway<'a>(
    site: &WireGuardSite,
    gateways: &'a BTreeSet<NodeId>,
    current: Option<&NodeId>,
) -> Option<&'a NodeId> {
    let eligible = |g: &&NodeId| site.members.contains(*g);
    current
        .and_then(|c| gateways.get(c))
        .filter(eligible)
        .or_else(|| gateways.iter().find(eligible))
}

/// Each network's active gateway ([`active_gateway`]), given the previous choice.
pub fn active_gateways(
    sites: &BTreeMap<NetworkId, WireGuardSite>,
    gateways: &BTreeSet<NodeId>,
    current: &BTreeMap<NetworkId, NodeId>,
) -> BTreeMap<NetworkId, NodeId> {
    sites
        .iter()
        .filter_map(|(id, site)| {
            active_gateway(site, gateways, current.get(id)).map(|g| (*id, g.clone()))
        })
        .collect()
}

/// What `node` is told (v9 `ControllerMsg::WireGuard`): every network it is a member of that has
/// devices, with the gateway members; the gateway key and whether it is active (`active`, from
/// [`active_gateways`]) only where `node` is itself a connected gateway.
pub fn map_for(
    node: &NodeId,
    sites: &BTreeMap<NetworkId, WireGuardSite>,
    gateways: &BTreeSet<NodeId>,
    active: &BTreeMap<NetworkId, NodeId>,
) -> WireGuardMap {
    let networks = sites
        .values()
        .filter(|site| site.members.contains(node) && !site.devices.is_empty())
        .map(|site| {
            let members: Vec<NodeId> = gateways
                .iter()
                .filter(|g| site.members.contains(*g))
                .cloned()
                .collect();
            let role = gateways.contains(node).then(|| WireGuardGatewayRole {
                private_key: site.gateway.private_key,
                active: active.get(&site.gateway.network) == Some(node),
            });
            WireGuardNetwork {
                network: site.gateway.network,
                devices: site
                    .devices
                    .iter()
                    .map(|d| WireGuardDevice {
                        public_key: d.public_key,
                        address: d.address,
                    })
                    .collect(),
                gateways: members,
                role,
            }
        })
        .collect();
    WireGuardMap { networks }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(s: &str) -> NodeId {
        NodeId(s.into())
    }

    fn site(members: &[&str], devices: usize) -> BTreeMap<NetworkId, WireGuardSite> {
        let network = NetworkId(1);
        let site = WireGuardSite {
            gateway: GatewayRecord {
                network,
                private_key: [9; 32],
                endpoint: "192.0.2.1:51820".into(),
            },
            devices: (0..devices)
                .map(|k| DeviceRecord {
                    network,
                    name: format!("d{k}"),
                    public_key: [k as u8; 32],
                    address: Ipv4Addr::new(10, 90, 0, 10 + k as u8),
                    created_at: UnixMillis(0),
                })
                .collect(),
            members: members.iter().map(|m| node(m)).collect(),
        };
        BTreeMap::from([(network, site)])
    }

    #[test]
    fn only_gateways_get_the_key_and_the_lowest_connected_one_is_active() {
        let sites = site(&["a", "b", "c"], 2);
        let gateways: BTreeSet<NodeId> = [node("b"), node("c"), node("x")].into();
        let active = active_gateways(&sites, &gateways, &BTreeMap::new());
        let plain = map_for(&node("a"), &sites, &gateways, &active);
        assert_eq!(plain.networks.len(), 1);
        let n = &plain.networks[0];
        assert_eq!(n.devices.len(), 2);
        // x is a gateway but not a member of this network: it may not speak for its devices.
        assert_eq!(n.gateways, vec![node("b"), node("c")]);
        assert!(n.role.is_none(), "a plain member never gets the key");
        let b = map_for(&node("b"), &sites, &gateways, &active);
        let role = b.networks[0].role.as_ref().expect("gateway role");
        assert_eq!((role.private_key, role.active), ([9; 32], true));
        let c = map_for(&node("c"), &sites, &gateways, &active);
        assert_eq!(c.networks[0].role.as_ref().map(|r| r.active), Some(false));
        // b disconnects: c takes over.
        let gateways: BTreeSet<NodeId> = [node("c")].into();
        let active = active_gateways(&sites, &gateways, &active);
        let c = map_for(&node("c"), &sites, &gateways, &active);
        assert_eq!(c.networks[0].role.as_ref().map(|r| r.active), Some(true));
        assert_eq!(c.networks[0].gateways, vec![node("c")]);
        // b comes back: c stays active (no second failover for the devices).
        let gateways: BTreeSet<NodeId> = [node("b"), node("c")].into();
        let active = active_gateways(&sites, &gateways, &active);
        assert_eq!(active.get(&NetworkId(1)), Some(&node("c")));
        let b = map_for(&node("b"), &sites, &gateways, &active);
        assert_eq!(b.networks[0].role.as_ref().map(|r| r.active), Some(false));
    }

    #[test]
    fn non_members_and_networks_without_devices_get_nothing() {
        let gateways: BTreeSet<NodeId> = [node("b")].into();
        let none = BTreeMap::new();
        assert!(map_for(&node("z"), &site(&["a", "b"], 1), &gateways, &none)
            .networks
            .is_empty());
        assert!(map_for(&node("b"), &site(&["a", "b"], 0), &gateways, &none)
            .networks
            .is_empty());
    }
}
