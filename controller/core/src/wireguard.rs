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

/// A network's active gateway as the shared store keeps it (one record per network, written with
/// a compare-and-swap transaction), so every controller of a fleet names the same one and a
/// restarted controller finds the choice it must keep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveGateway {
    /// The active gateway node.
    pub node: NodeId,
    /// The controller that held its session when the record was written.
    pub controller: String,
}

/// Where the gateway agents of the fleet are connected, as one controller knows it.
#[derive(Debug, Clone, Default)]
pub struct FleetGateways {
    /// This controller's id.
    pub me: String,
    /// Gateway node → the controller holding its session: this controller's own, and what its
    /// peers said of theirs.
    pub connected: BTreeMap<NodeId, String>,
    /// Controllers whose gateway lists this one knows: itself, and every peer that has said its
    /// list on the link it holds now.
    pub heard: BTreeSet<String>,
    /// The live controllers (the membership); `None` until it was first read.
    pub live: Option<BTreeSet<String>>,
}

impl FleetGateways {
    /// Whether `controller` may hold a gateway this controller does not know about: it is
    /// (possibly) alive and has not said which gateways it holds.
    fn may_hold_unknown(&self, controller: &str) -> bool {
        controller != self.me
            && !self.heard.contains(controller)
            && self.live.as_ref().is_none_or(|l| l.contains(controller))
    }
}

/// The record a network's active gateway should have, given the stored one (`stored`):
///
/// - the stored gateway stays active while it is connected to any controller (sticky: a gateway
///   that comes back does not take the address back, which would cost the devices another
///   re-handshake), its record following its session to another controller;
/// - it also stays while the controller that held it may still hold it unbeknown to this one (a
///   controller that has just started and not heard from that peer yet, so a restart flips
///   nothing);
/// - otherwise the lowest node id among the connected gateways that serve the network
///   ([`served_network`]; deterministic, so controllers that decide at once decide alike and the
///   transaction of the second one finds the record already written);
/// - with no gateway connected anywhere, the stored record is kept (nobody holds the address).
///
/// Only a gateway that serves the network counts, the stored one included: an agent that is a
/// member of a lower network with devices too serves that one, and could not hold this one's
/// address.
pub fn decide_active(
    network: NetworkId,
    sites: &BTreeMap<NetworkId, WireGuardSite>,
    fleet: &FleetGateways,
    stored: Option<&ActiveGateway>,
) -> Option<ActiveGateway> {
    let serves = |node: &NodeId| served_network(node, sites) == Some(network);
    if let Some(s) = stored.filter(|s| serves(&s.node)) {
        if let Some(controller) = fleet.connected.get(&s.node) {
            return Some(ActiveGateway {
                node: s.node.clone(),
                controller: controller.clone(),
            });
        }
        if fleet.may_hold_unknown(&s.controller) {
            return Some(s.clone());
        }
    }
    fleet
        .connected
        .iter()
        .find(|(node, _)| serves(node))
        .map(|(node, controller)| ActiveGateway {
            node: node.clone(),
            controller: controller.clone(),
        })
        .or_else(|| stored.cloned())
}

/// The network whose devices `node` serves if it runs a gateway: one UDP port serves one network's
/// key, so of the networks it is a member of that have devices, the lowest id. The agent applies
/// the same rule (`agent/src/wireguard.rs`, `plan`).
pub fn served_network(
    node: &NodeId,
    sites: &BTreeMap<NetworkId, WireGuardSite>,
) -> Option<NetworkId> {
    sites
        .iter()
        .find(|(_, site)| !site.devices.is_empty() && site.members.contains(node))
        .map(|(id, _)| *id)
}

/// What `node` is told (v9 `ControllerMsg::WireGuard`): every network it is a member of that has
/// devices, with the gateways that serve it ([`served_network`]: only they may speak for its
/// devices); the gateway key and whether it is active (`active`, each
/// network's [`decide_active`] record) only where `node` is itself a gateway connected here
/// (`gateways`).
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
                .filter(|g| served_network(g, sites) == Some(site.gateway.network))
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

    const N1: NetworkId = NetworkId(1);

    fn site(members: &[&str], devices: usize) -> BTreeMap<NetworkId, WireGuardSite> {
        site_on(N1, members, devices)
    }

    fn site_on(
        network: NetworkId,
        members: &[&str],
        devices: usize,
    ) -> BTreeMap<NetworkId, WireGuardSite> {
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

    /// `me`'s view: gateways by the controller holding them, every controller heard and live.
    fn fleet(me: &str, connected: &[(&str, &str)]) -> FleetGateways {
        let connected: BTreeMap<NodeId, String> = connected
            .iter()
            .map(|(n, c)| (node(n), (*c).to_owned()))
            .collect();
        let mut heard: BTreeSet<String> = connected.values().cloned().collect();
        heard.insert(me.to_owned());
        FleetGateways {
            me: me.into(),
            live: Some(heard.clone()),
            connected,
            heard,
        }
    }

    fn active_of(
        sites: &BTreeMap<NetworkId, WireGuardSite>,
        fleet: &FleetGateways,
        stored: Option<&ActiveGateway>,
    ) -> BTreeMap<NetworkId, NodeId> {
        sites
            .keys()
            .filter_map(|id| decide_active(*id, sites, fleet, stored).map(|a| (*id, a.node)))
            .collect()
    }

    fn rec(n: &str, c: &str) -> ActiveGateway {
        ActiveGateway {
            node: node(n),
            controller: c.into(),
        }
    }

    #[test]
    fn only_gateways_get_the_key_and_the_lowest_connected_one_is_active() {
        let sites = site(&["a", "b", "c"], 2);
        let view = fleet("k1", &[("b", "k1"), ("c", "k1"), ("x", "k1")]);
        let gateways: BTreeSet<NodeId> = view.connected.keys().cloned().collect();
        let active = active_of(&sites, &view, None);
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
        let stored = rec("b", "k1");
        let view = fleet("k1", &[("c", "k1")]);
        let gateways: BTreeSet<NodeId> = view.connected.keys().cloned().collect();
        let next = decide_active(N1, &sites, &view, Some(&stored));
        assert_eq!(next, Some(rec("c", "k1")));
        let active = active_of(&sites, &view, Some(&stored));
        let c = map_for(&node("c"), &sites, &gateways, &active);
        assert_eq!(c.networks[0].role.as_ref().map(|r| r.active), Some(true));
        assert_eq!(c.networks[0].gateways, vec![node("c")]);
        // b comes back: c stays active (no second failover for the devices).
        let stored = rec("c", "k1");
        let view = fleet("k1", &[("b", "k1"), ("c", "k1")]);
        let gateways: BTreeSet<NodeId> = view.connected.keys().cloned().collect();
        let active = active_of(&sites, &view, Some(&stored));
        assert_eq!(active.get(&NetworkId(1)), Some(&node("c")));
        let b = map_for(&node("b"), &sites, &gateways, &active);
        assert_eq!(b.networks[0].role.as_ref().map(|r| r.active), Some(false));
    }

    #[test]
    fn controllers_choose_among_every_controllers_gateways_and_agree() {
        let sites = site(&["a", "b"], 1);
        // a on k1, b on k2: both controllers, each hearing the other, name a.
        let on_k1 = fleet("k1", &[("a", "k1"), ("b", "k2")]);
        let on_k2 = fleet("k2", &[("a", "k1"), ("b", "k2")]);
        assert_eq!(
            decide_active(N1, &sites, &on_k1, None),
            Some(rec("a", "k1"))
        );
        assert_eq!(
            decide_active(N1, &sites, &on_k2, None),
            Some(rec("a", "k1"))
        );
        // The gateway list every agent is told holds both, wherever their sessions are.
        let gateways: BTreeSet<NodeId> = on_k2.connected.keys().cloned().collect();
        let active = BTreeMap::from([(NetworkId(1), node("a"))]);
        let b = map_for(&node("b"), &sites, &gateways, &active);
        assert_eq!(b.networks[0].gateways, vec![node("a"), node("b")]);
        assert_eq!(b.networks[0].role.as_ref().map(|r| r.active), Some(false));
        // Whichever decides second finds the first one's record and keeps it.
        let stored = rec("b", "k2");
        assert_eq!(
            decide_active(N1, &sites, &on_k1, Some(&stored)),
            Some(stored)
        );
    }

    #[test]
    fn a_restarted_controller_keeps_the_stored_choice_until_it_knows_better() {
        let sites = site(&["a", "b"], 1);
        let stored = rec("b", "k2");
        // k1 has just started: a (lower) reconnected to it; it has not read the membership yet.
        let mut fresh = fleet("k1", &[("a", "k1")]);
        fresh.live = None;
        assert_eq!(
            decide_active(N1, &sites, &fresh, Some(&stored)),
            Some(stored.clone())
        );
        // Membership read: k2 lives, but has not said its gateways yet.
        fresh.live = Some(["k1".to_owned(), "k2".to_owned()].into());
        assert_eq!(
            decide_active(N1, &sites, &fresh, Some(&stored)),
            Some(stored.clone())
        );
        // k2 says it holds b: b stays.
        let heard = fleet("k1", &[("a", "k1"), ("b", "k2")]);
        assert_eq!(
            decide_active(N1, &sites, &heard, Some(&stored)),
            Some(stored.clone())
        );
        // b's session moved to k1 (k2 restarted): still b, the record follows it.
        let moved = fleet("k1", &[("a", "k1"), ("b", "k1")]);
        assert_eq!(
            decide_active(N1, &sites, &moved, Some(&stored)),
            Some(rec("b", "k1"))
        );
    }

    #[test]
    fn the_next_gateway_takes_over_when_the_active_ones_agent_or_controller_dies() {
        let sites = site(&["a", "b", "c"], 1);
        let stored = rec("a", "k1");
        // a's agent died: k1 said its list without it.
        let view = fleet("k2", &[("b", "k1"), ("c", "k2")]);
        assert_eq!(
            decide_active(N1, &sites, &view, Some(&stored)),
            Some(rec("b", "k1"))
        );
        // k1 died with a and b: its link ended (not heard), its lease went (not live).
        let mut view = fleet("k2", &[("c", "k2")]);
        view.live = Some(["k2".to_owned()].into());
        assert_eq!(
            decide_active(N1, &sites, &view, Some(&stored)),
            Some(rec("c", "k2"))
        );
        // While k1's lease lasts, k2 cannot tell a is gone: it waits.
        view.live = Some(["k1".to_owned(), "k2".to_owned()].into());
        assert_eq!(
            decide_active(N1, &sites, &view, Some(&stored)),
            Some(stored.clone())
        );
        // No gateway anywhere: the record stays as it was.
        let empty = fleet("k2", &[]);
        assert_eq!(
            decide_active(N1, &sites, &empty, Some(&stored)),
            Some(stored)
        );
        assert_eq!(decide_active(N1, &sites, &empty, None), None);
        // A stored gateway that is no longer a member of the network gives way.
        let other = site(&["b", "c"], 1);
        let view = fleet("k1", &[("a", "k1"), ("c", "k1")]);
        assert_eq!(
            decide_active(N1, &other, &view, Some(&rec("a", "k1"))),
            Some(rec("c", "k1"))
        );
    }

    #[test]
    fn a_gateway_of_two_networks_serves_the_lower_one_and_is_active_only_there() {
        // a is a member of networks 1 and 2, b of 2 only; both run gateways, a has the lower id.
        let mut sites = site_on(N1, &["a", "m"], 1);
        let n2 = NetworkId(2);
        sites.extend(site_on(n2, &["a", "b", "m"], 1));
        assert_eq!(served_network(&node("a"), &sites), Some(N1));
        assert_eq!(served_network(&node("b"), &sites), Some(n2));
        let view = fleet("k1", &[("a", "k1"), ("b", "k1")]);
        let gateways: BTreeSet<NodeId> = view.connected.keys().cloned().collect();
        let active = active_of(&sites, &view, None);
        assert_eq!(active.get(&N1), Some(&node("a")));
        assert_eq!(
            active.get(&n2),
            Some(&node("b")),
            "a serves network 1 and cannot hold network 2's address"
        );
        // A record from before a served network 1 (a was active on 2) gives way to b.
        assert_eq!(
            decide_active(n2, &sites, &view, Some(&rec("a", "k1"))),
            Some(rec("b", "k1"))
        );
        // Members of network 2 hear only b speak for its devices; a still gets the key of both
        // (it warns that it serves one), active only on network 1.
        let m = map_for(&node("m"), &sites, &gateways, &active);
        assert_eq!(m.networks[0].gateways, vec![node("a")]);
        assert_eq!(m.networks[1].gateways, vec![node("b")]);
        let a = map_for(&node("a"), &sites, &gateways, &active);
        let roles: Vec<Option<bool>> = a
            .networks
            .iter()
            .map(|n| n.role.as_ref().map(|r| r.active))
            .collect();
        assert_eq!(roles, vec![Some(true), Some(false)]);
        // Network 1 loses its last device: a serves network 2 from then on.
        sites.get_mut(&N1).expect("n1").devices.clear();
        assert_eq!(served_network(&node("a"), &sites), Some(n2));
        assert_eq!(decide_active(n2, &sites, &view, None), Some(rec("a", "k1")));
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
