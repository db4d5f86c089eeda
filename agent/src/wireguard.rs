//! (v9) What a WireGuard map from the controller means for this node, sans-IO: who may speak for
//! each network's devices (every member's switch), and, on a gateway agent, which network its
//! gateway serves, with which key, MAC, devices and neighbours, and whether it holds the floating
//! endpoint. `daemon/wireguard.rs` performs it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use shoal_overlay::switch::{gateway_mac, Bridging};
use shoal_proto::{MacAddr, Netmap, NetworkId, WireGuardMap};
use shoal_wireguard::run::Served;
use shoal_wireguard::{Device, Key};

/// The gateway this node runs for one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serve {
    /// The network.
    pub network: NetworkId,
    /// The network's gateway private key (in memory only).
    pub key: Key,
    /// The gateway's MAC on the network, [`gateway_mac`] of this node's: not the TAP device's, so
    /// the switch can deliver between the node's kernel and its devices.
    pub mac: MacAddr,
    /// Devices and neighbours.
    pub served: Served,
    /// This node holds the floating endpoint.
    pub active: bool,
}

/// Everything a WireGuard map asks of this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Every network of the netmap, with its bridging (empty where it has no WireGuard devices).
    pub bridging: Vec<(NetworkId, Bridging)>,
    /// The network this node's gateway serves, if it runs one and is a gateway of any network:
    /// one UDP port serves one network's key, so the lowest network id wins.
    pub serve: Option<Serve>,
    /// Networks this node is a gateway of but cannot serve (beyond the first).
    pub unserved: Vec<NetworkId>,
}

/// The plan for `map` as seen with `netmap`; `gateway` says whether this agent runs a gateway
/// (`--wireguard-gateway`).
pub fn plan(map: &WireGuardMap, netmap: &Netmap, gateway: bool) -> Plan {
    let mut out = Plan::default();
    for m in &netmap.networks {
        let Some(n) = map.networks.iter().find(|n| n.network == m.id) else {
            out.bridging.push((m.id, Bridging::default()));
            continue;
        };
        let role = n.role.as_ref().filter(|_| gateway);
        let local = role.is_some() && out.serve.is_none();
        if role.is_some() && !local {
            out.unserved.push(m.id);
        }
        let devices: Vec<Device> = n
            .devices
            .iter()
            .map(|d| Device {
                public_key: Key(d.public_key),
                address: d.address,
            })
            .collect();
        out.bridging.push((
            m.id,
            Bridging {
                gateways: n.gateways.iter().cloned().collect::<BTreeSet<_>>(),
                devices: devices.iter().map(|d| d.address).collect(),
                local,
            },
        ));
        if let (true, Some(role)) = (local, role) {
            // This node is a neighbour too: its kernel is reached through the switch like a peer's.
            let neighbours = std::iter::once((m.address, m.mac))
                .chain(netmap.peers.iter().filter_map(|p| {
                    let pn = p.networks.iter().find(|pn| pn.id == m.id)?;
                    Some((pn.address, pn.mac))
                }))
                .collect();
            out.serve = Some(Serve {
                network: m.id,
                key: Key(role.private_key),
                mac: gateway_mac(m.mac),
                served: Served {
                    devices,
                    neighbours,
                    broadcast: Some(broadcast(m.subnet, m.prefix_len)),
                },
                active: role.active,
            });
        }
    }
    out
}

fn broadcast(subnet: Ipv4Addr, prefix_len: u8) -> Ipv4Addr {
    let host_bits = 32u32.saturating_sub(u32::from(prefix_len.min(32)));
    let mask = if host_bits == 32 {
        u32::MAX
    } else {
        (1u32 << host_bits) - 1
    };
    Ipv4Addr::from(u32::from(subnet) | mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{
        NetworkMembership, NodeId, Peer, PeerIndex, PeerNetwork, WireGuardDevice,
        WireGuardGatewayRole, WireGuardNetwork,
    };

    fn membership(id: u32) -> NetworkMembership {
        NetworkMembership {
            id: NetworkId(id),
            name: format!("n{id}"),
            subnet: Ipv4Addr::new(10, 90, 0, 0),
            prefix_len: 16,
            mac: MacAddr([2, 0, 0, 0, 0, id as u8]),
            address: Ipv4Addr::new(10, 90, 0, 1),
            mtu: 1380,
        }
    }

    fn netmap() -> Netmap {
        Netmap {
            version: 1,
            valid_until: shoal_proto::UnixMillis(0),
            networks: vec![membership(1), membership(2), membership(3)],
            peers: vec![Peer {
                node: NodeId("b".into()),
                index: PeerIndex(2),
                key_sha256: [0; 32],
                endpoints: vec![],
                nat: shoal_proto::NatMapping::Unknown,
                networks: vec![PeerNetwork {
                    id: NetworkId(1),
                    mac: MacAddr([2, 0, 0, 0, 1, 2]),
                    address: Ipv4Addr::new(10, 90, 0, 2),
                }],
            }],
        }
    }

    fn wg(id: u32, role: Option<bool>) -> WireGuardNetwork {
        WireGuardNetwork {
            network: NetworkId(id),
            devices: vec![WireGuardDevice {
                public_key: [1; 32],
                address: Ipv4Addr::new(10, 90, 0, 10),
            }],
            gateways: vec![NodeId("a".into())],
            role: role.map(|active| WireGuardGatewayRole {
                private_key: [5; 32],
                active,
            }),
        }
    }

    #[test]
    fn a_gateway_serves_its_first_network_and_every_network_gets_its_bridging() {
        let map = WireGuardMap {
            networks: vec![wg(1, Some(true)), wg(2, Some(false))],
        };
        let p = plan(&map, &netmap(), true);
        let serve = p.serve.expect("serves");
        assert_eq!(serve.network, NetworkId(1));
        assert_eq!(serve.key, Key([5; 32]));
        // The gateway's own MAC, derived from the node's: stable, unicast, locally administered,
        // and not the TAP device's.
        assert_eq!(serve.mac, gateway_mac(membership(1).mac));
        assert_eq!(serve.mac, MacAddr([6, 0, 0, 0, 0, 1]));
        assert!(!serve.mac.is_group() && serve.mac.0[0] & 0x02 != 0);
        assert!(serve.active);
        assert_eq!(
            serve.served.neighbours,
            vec![
                (Ipv4Addr::new(10, 90, 0, 1), membership(1).mac),
                (Ipv4Addr::new(10, 90, 0, 2), MacAddr([2, 0, 0, 0, 1, 2]))
            ]
        );
        assert_eq!(
            serve.served.broadcast,
            Some(Ipv4Addr::new(10, 90, 255, 255))
        );
        assert_eq!(p.unserved, vec![NetworkId(2)]);
        assert_eq!(p.bridging.len(), 3);
        assert!(p.bridging[0].1.local && !p.bridging[1].1.local);
        // Network 3 has no devices: its bridging is empty, so a removed network is cleared.
        assert_eq!(p.bridging[2].1, Bridging::default());
    }

    #[test]
    fn an_agent_without_the_flag_only_learns_who_speaks_for_devices() {
        let map = WireGuardMap {
            networks: vec![wg(1, Some(true))],
        };
        let p = plan(&map, &netmap(), false);
        assert!(p.serve.is_none());
        assert!(!p.bridging[0].1.local);
        assert!(p.bridging[0].1.gateways.contains(&NodeId("a".into())));
        assert!(p.bridging[0]
            .1
            .devices
            .contains(&Ipv4Addr::new(10, 90, 0, 10)));
    }
}
