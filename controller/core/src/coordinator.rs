//! The overlay coordinator: who is in which network, where each node can be reached, and which
//! netmap changes each connected agent must hear. A state machine with no I/O.
//!
//! Every change is turned into per-recipient [`NetmapChange`]s touching only what changed: a node
//! joining a network of N members costs one peer record for each of the N members and one full
//! picture for the newcomer, never a rebuild of everyone's map. Versions are `epoch << 32 |
//! counter`; the epoch rises at every controller start, so an agent's cached version from an
//! earlier run never passes for current.
//!
//! What an agent says about itself is bounded here before anyone else hears it: the endpoints of an
//! `OverlayHello` are kept only if a peer could use them ([`usable_endpoint`]), at most
//! [`MAX_LOCAL_ENDPOINTS`] of them.
//!
//! With several controllers, each one's agents are *local* subscribers here and the others' are
//! *remote* ones ([`Coordinator::subscribe_remote`]): what their controllers say of them reaches
//! local agents' netmaps like a local hello would, but no delta is ever addressed to them (their own
//! controller sends those). A remote subscription is replaced by a newer one (the agent moved to
//! another controller) and outlives the controller that sent it: an agent whose controller died
//! keeps its place in everyone's netmap, so its direct paths go on until it reappears elsewhere.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use shoal_proto::{
    ControllerMsg, MacAddr, NatMapping, Netmap, NetmapChange, NetmapDelta, NetworkId,
    NetworkMembership, NodeId, OverlayHello, Peer, PeerIndex, PeerNetwork, UnixMillis,
};

use crate::networks::{MembershipChange, NetworkRecord, OverlaySnapshot};

#[derive(Debug, Clone)]
struct NodeInfo {
    index: PeerIndex,
    key: Option<[u8; 32]>,
    observed: Option<SocketAddr>,
    local: Vec<SocketAddr>,
    nat: NatMapping,
    /// Networks and this node's MAC and address in each.
    networks: BTreeMap<NetworkId, (MacAddr, std::net::Ipv4Addr)>,
}

impl NodeInfo {
    fn new(index: PeerIndex, key: Option<[u8; 32]>) -> Self {
        Self {
            index,
            key,
            observed: None,
            local: Vec::new(),
            nat: NatMapping::Unknown,
            networks: BTreeMap::new(),
        }
    }

    fn endpoints(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self.observed.into_iter().collect();
        out.extend(self.local.iter().filter(|a| Some(**a) != self.observed));
        out
    }
}

/// A message for one connected agent.
pub type Delivery = (NodeId, ControllerMsg);

/// An agent's overlay subscription as the controller holding its session tells the others: what
/// their agents' netmaps need of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// The node.
    pub node: NodeId,
    /// Its relay index.
    pub index: PeerIndex,
    /// SHA-256 of the public key it connected with (or [`shoal_proto::KEY_WITHDRAWN`]).
    pub key: [u8; 32],
    /// Where its controller saw it.
    pub observed: SocketAddr,
    /// The endpoints it announced that peers may be told about (already bounded by its
    /// controller; bounded again on arrival).
    pub local_endpoints: Vec<SocketAddr>,
    /// Its NAT's mapping behaviour.
    pub nat: NatMapping,
    /// When its controller accepted the hello this describes (wall clock): of two subscriptions
    /// from different controllers, the later one is the agent's current session.
    pub since: UnixMillis,
}

/// A subscription another controller holds, with that controller's id.
#[derive(Debug, Clone)]
struct RemoteSub {
    controller: String,
    since: UnixMillis,
    sub: Subscription,
}

/// The most local endpoints kept from one `OverlayHello` (the observed address comes on top). Peers
/// attempt every candidate at once, one handshake each, so the list stays short; 16 covers a host
/// with a LAN address behind a dozen container bridges.
pub const MAX_LOCAL_ENDPOINTS: usize = 16;

/// Whether a peer could reach an agent at `addr`, which the agent announced while the controller
/// saw it at `observed`: a unicast address with a port. Refused: port 0; unspecified, multicast
/// and broadcast addresses; `0.0.0.0/8` and the reserved `240.0.0.0/4` (which also holds the
/// relay addresses, so no endpoint can pose as one); IPv6 link-local (meaningless without the
/// agent's scope); loopback unless the agent itself connected over loopback; and any address
/// inside an overlay subnet (`in_overlay`), since the overlay must never be carried over itself.
pub fn usable_endpoint(
    addr: &SocketAddr,
    observed: &SocketAddr,
    in_overlay: impl Fn(Ipv4Addr) -> bool,
) -> bool {
    if addr.port() == 0 {
        return false;
    }
    let local_agent = observed.ip().to_canonical().is_loopback();
    match addr.ip().to_canonical() {
        IpAddr::V4(v4) => {
            let first = v4.octets()[0];
            !(first == 0
                || first >= 240
                || v4.is_multicast()
                || (v4.is_loopback() && !local_agent)
                || in_overlay(v4))
        }
        IpAddr::V6(v6) => {
            let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
            !(v6.is_unspecified()
                || v6.is_multicast()
                || link_local
                || (v6.is_loopback() && !local_agent))
        }
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct Coordinator {
    epoch: u32,
    counter: u32,
    validity: Duration,
    networks: BTreeMap<NetworkId, (NetworkRecord, BTreeSet<NodeId>)>,
    nodes: HashMap<NodeId, NodeInfo>,
    /// Connected overlay agents and the version each was last brought to.
    subscribed: HashMap<NodeId, u64>,
    /// When each connected agent's latest hello was accepted here.
    local_since: HashMap<NodeId, UnixMillis>,
    /// Agents subscribed on other controllers, by the newest word about each. Always newer than the
    /// node's subscription here, if it has one: the agent has moved on, and its session here is
    /// only lingering until this controller notices.
    remote: HashMap<NodeId, RemoteSub>,
}

impl Coordinator {
    /// A coordinator for this controller run (`epoch`), loaded from the store. A cached netmap
    /// stays usable for `validity` after the controller last confirmed it.
    pub fn new(epoch: u32, snapshot: OverlaySnapshot, validity: Duration) -> Self {
        let mut nodes: HashMap<NodeId, NodeInfo> = snapshot
            .nodes
            .into_iter()
            .map(|(id, n)| (id, NodeInfo::new(n.index, n.key_sha256)))
            .collect();
        let mut networks = BTreeMap::new();
        for net in snapshot.networks {
            let mut members = BTreeSet::new();
            for m in net.members {
                if let Some(n) = nodes.get_mut(&m.node) {
                    n.networks.insert(net.network.id, (m.mac, m.address));
                    members.insert(m.node);
                }
            }
            networks.insert(net.network.id, (net.network, members));
        }
        Self {
            epoch,
            counter: 0,
            validity,
            networks,
            nodes,
            subscribed: HashMap::new(),
            local_since: HashMap::new(),
            remote: HashMap::new(),
        }
    }

    /// The current version.
    pub fn version(&self) -> u64 {
        (u64::from(self.epoch) << 32) | u64::from(self.counter)
    }

    fn valid_until(&self, now: UnixMillis) -> UnixMillis {
        UnixMillis(now.0 + self.validity.as_millis() as u64)
    }

    /// Makes a node known (it has a peer index), or updates its key. Returns peer updates when the
    /// key changed.
    pub fn node_known(
        &mut self,
        node: &NodeId,
        index: PeerIndex,
        key: Option<[u8; 32]>,
        now: UnixMillis,
    ) -> Vec<Delivery> {
        match self.nodes.get_mut(node) {
            None => {
                self.nodes.insert(node.clone(), NodeInfo::new(index, key));
                vec![]
            }
            Some(n) if key.is_some() && n.key != key => {
                n.key = key;
                n.index = index;
                self.peer_changed(node, now)
            }
            Some(n) => {
                n.index = index;
                vec![]
            }
        }
    }

    /// An agent connected with overlay support: returns what it needs first (a full netmap, or an
    /// empty delta that renews its cached one's validity), then peer updates for its new endpoints.
    /// `key` is the public-key hash of the certificate it connected with; a new key and new
    /// endpoints reach its peers together, as one delta.
    pub fn subscribe(
        &mut self,
        node: &NodeId,
        key: Option<[u8; 32]>,
        observed: SocketAddr,
        hello: &OverlayHello,
        now: UnixMillis,
    ) -> (ControllerMsg, Vec<Delivery>) {
        let local = self.usable_endpoints(node, observed, &hello.local_endpoints);
        // What another controller said before this session began is stale now.
        if self.remote.get(node).is_some_and(|r| r.since <= now) {
            self.remote.remove(node);
        }
        let updates = self.set_endpoints(node, key, observed, local, hello.nat, now);
        let version = self.version();
        let first = if hello.netmap_version == Some(version) {
            ControllerMsg::NetmapDelta(NetmapDelta {
                from_version: version,
                to_version: version,
                valid_until: self.valid_until(now),
                changes: vec![],
            })
        } else {
            ControllerMsg::Netmap(self.netmap(node, now))
        };
        self.subscribed.insert(node.clone(), version);
        self.local_since.insert(node.clone(), now);
        (first, updates)
    }

    /// Sets what peers are told of `node`'s reachability; its neighbours' deltas if it changed.
    fn set_endpoints(
        &mut self,
        node: &NodeId,
        key: Option<[u8; 32]>,
        observed: SocketAddr,
        local: Vec<SocketAddr>,
        nat: NatMapping,
        now: UnixMillis,
    ) -> Vec<Delivery> {
        let changed = self.nodes.get_mut(node).is_some_and(|n| {
            let changed = n.observed != Some(observed)
                || n.local != local
                || n.nat != nat
                || (key.is_some() && n.key != key);
            if key.is_some() {
                n.key = key;
            }
            n.observed = Some(observed);
            n.local = local;
            n.nat = nat;
            changed
        });
        if changed {
            self.peer_changed(node, now)
        } else {
            vec![]
        }
    }

    /// `node`'s subscription as other controllers are told it (`None` unless it is subscribed
    /// here and has been seen).
    pub fn subscription(&self, node: &NodeId, since: UnixMillis) -> Option<Subscription> {
        if !self.subscribed.contains_key(node) {
            return None;
        }
        let n = self.nodes.get(node)?;
        Some(Subscription {
            node: node.clone(),
            index: n.index,
            key: n.key.unwrap_or([0; 32]),
            observed: n.observed?,
            local_endpoints: n.local.clone(),
            nat: n.nat,
            since,
        })
    }

    /// Another controller (`controller`) holds `sub.node`'s session and says where it is. Taken
    /// unless a newer subscription is known (from another controller, or here); it changes the
    /// netmaps of local agents (their deltas are returned). Taken while the node is also
    /// subscribed here, it means the agent moved on and its session here only lingers. Returns
    /// whether it was taken, and the deltas.
    pub fn subscribe_remote(
        &mut self,
        controller: &str,
        mut sub: Subscription,
        now: UnixMillis,
    ) -> (bool, Vec<Delivery>) {
        let older_remote = self
            .remote
            .get(&sub.node)
            .is_some_and(|r| r.controller != controller && r.since > sub.since);
        let older_local = self
            .local_since
            .get(&sub.node)
            .is_some_and(|since| *since >= sub.since);
        if older_remote || older_local {
            return (false, vec![]);
        }
        sub.local_endpoints = self.usable_endpoints(&sub.node, sub.observed, &sub.local_endpoints);
        let node = sub.node.clone();
        let mut out = self.node_known(&node, sub.index, None, now);
        out.extend(self.set_endpoints(
            &node,
            Some(sub.key),
            sub.observed,
            sub.local_endpoints.clone(),
            sub.nat,
            now,
        ));
        self.remote.insert(
            node,
            RemoteSub {
                controller: controller.to_owned(),
                since: sub.since,
                sub,
            },
        );
        (true, out)
    }

    /// `controller` no longer holds `node`'s session. Its place in netmaps stays as it was (peers
    /// keep their direct paths; where it went next will say so). Whether `controller` was the one
    /// known to hold it.
    pub fn unsubscribe_remote(&mut self, controller: &str, node: &NodeId) -> bool {
        let held = self
            .remote
            .get(node)
            .is_some_and(|r| r.controller == controller);
        if held {
            self.remote.remove(node);
        }
        held
    }

    /// Forgets which of `controller`'s nodes it holds (it is about to say them all again); their
    /// places in netmaps stay. Returns the nodes it held.
    pub fn reset_remote(&mut self, controller: &str) -> Vec<NodeId> {
        let gone: Vec<NodeId> = self
            .remote
            .iter()
            .filter(|(_, r)| r.controller == controller)
            .map(|(n, _)| n.clone())
            .collect();
        for n in &gone {
            self.remote.remove(n);
        }
        gone
    }

    /// The controller that holds `node`'s session, when another one does (even if a session
    /// here lingers: the other one is newer).
    pub fn remote_holder(&self, node: &NodeId) -> Option<&str> {
        self.remote.get(node).map(|r| r.controller.as_str())
    }

    /// The node's relay index, if known.
    pub fn index_of(&self, node: &NodeId) -> Option<PeerIndex> {
        self.nodes.get(node).map(|n| n.index)
    }

    /// The endpoints of `announced` peers may be told about: [`usable_endpoint`] ones, without
    /// duplicates, at most [`MAX_LOCAL_ENDPOINTS`]. What is left out is logged.
    pub fn usable_endpoints(
        &self,
        node: &NodeId,
        observed: SocketAddr,
        announced: &[SocketAddr],
    ) -> Vec<SocketAddr> {
        let in_overlay = |ip: Ipv4Addr| {
            self.networks
                .values()
                .any(|(rec, _)| rec.subnet().contains(ip))
        };
        let mut kept: Vec<SocketAddr> = Vec::new();
        let mut refused = 0usize;
        for addr in announced {
            if kept.contains(addr) {
                continue;
            }
            if kept.len() < MAX_LOCAL_ENDPOINTS && usable_endpoint(addr, &observed, in_overlay) {
                kept.push(*addr);
            } else {
                refused += 1;
            }
        }
        if refused > 0 {
            tracing::debug!(node = %node, refused, kept = kept.len(), "announced endpoints left out");
        }
        kept
    }

    /// The networks `node` is a member of, in id order (empty for an unknown node).
    pub fn networks_of(&self, node: &NodeId) -> Vec<NetworkId> {
        self.nodes
            .get(node)
            .map(|n| n.networks.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The agent's connection here ended. If another controller has since said it holds the
    /// agent's session, what it said stays what the agent's peers know (their deltas, if any, are
    /// returned).
    pub fn unsubscribe(&mut self, node: &NodeId, now: UnixMillis) -> Vec<Delivery> {
        self.subscribed.remove(node);
        self.local_since.remove(node);
        let Some(sub) = self.remote.get(node).map(|r| r.sub.clone()) else {
            return vec![];
        };
        self.set_endpoints(
            node,
            Some(sub.key),
            sub.observed,
            sub.local_endpoints,
            sub.nat,
            now,
        )
    }

    /// Whether a node is a known overlay node.
    pub fn knows(&self, node: &NodeId) -> bool {
        self.nodes.contains_key(node)
    }

    /// Where a node can be reached, for punch requests.
    pub fn endpoints(&self, node: &NodeId) -> Vec<SocketAddr> {
        self.nodes
            .get(node)
            .map(NodeInfo::endpoints)
            .unwrap_or_default()
    }

    /// Whether two nodes share a network (the relay and punch requests serve only such pairs).
    pub fn share_network(&self, a: &NodeId, b: &NodeId) -> bool {
        match (self.nodes.get(a), self.nodes.get(b)) {
            (Some(a), Some(b)) => a.networks.keys().any(|n| b.networks.contains_key(n)),
            _ => false,
        }
    }

    /// The full netmap for `node`.
    pub fn netmap(&self, node: &NodeId, now: UnixMillis) -> Netmap {
        let Some(me) = self.nodes.get(node) else {
            return Netmap {
                version: self.version(),
                valid_until: self.valid_until(now),
                ..Default::default()
            };
        };
        let networks = me
            .networks
            .iter()
            .filter_map(|(id, (mac, addr))| self.membership(*id, *mac, *addr))
            .collect();
        let mut peer_ids = BTreeSet::new();
        for id in me.networks.keys() {
            if let Some((_, members)) = self.networks.get(id) {
                peer_ids.extend(members.iter().filter(|m| *m != node));
            }
        }
        let peers = peer_ids
            .into_iter()
            .filter_map(|p| self.peer_for(p, node))
            .collect();
        Netmap {
            version: self.version(),
            valid_until: self.valid_until(now),
            networks,
            peers,
        }
    }

    fn membership(
        &self,
        id: NetworkId,
        mac: MacAddr,
        address: std::net::Ipv4Addr,
    ) -> Option<NetworkMembership> {
        let (rec, _) = self.networks.get(&id)?;
        Some(NetworkMembership {
            id,
            name: rec.name.clone(),
            subnet: rec.subnet,
            prefix_len: rec.prefix_len,
            mac,
            address,
            mtu: rec.mtu,
        })
    }

    /// `peer` as `viewer` sees it: only the networks they share. `None` if they share none.
    fn peer_for(&self, peer: &NodeId, viewer: &NodeId) -> Option<Peer> {
        let p = self.nodes.get(peer)?;
        let v = self.nodes.get(viewer)?;
        let networks: Vec<PeerNetwork> = p
            .networks
            .iter()
            .filter(|(id, _)| v.networks.contains_key(id))
            .map(|(id, (mac, address))| PeerNetwork {
                id: *id,
                mac: *mac,
                address: *address,
            })
            .collect();
        if networks.is_empty() {
            return None;
        }
        Some(Peer {
            node: peer.clone(),
            index: p.index,
            key_sha256: p.key.unwrap_or([0; 32]),
            endpoints: p.endpoints(),
            nat: p.nat,
            networks,
        })
    }

    /// Everyone who shares a network with `node`.
    fn neighbours(&self, node: &NodeId) -> BTreeSet<NodeId> {
        let mut out = BTreeSet::new();
        if let Some(n) = self.nodes.get(node) {
            for id in n.networks.keys() {
                if let Some((_, members)) = self.networks.get(id) {
                    out.extend(members.iter().filter(|m| *m != node).cloned());
                }
            }
        }
        out
    }

    /// `node`'s record changed (endpoints, key): its neighbours get the new one.
    fn peer_changed(&mut self, node: &NodeId, now: UnixMillis) -> Vec<Delivery> {
        let mut changes: BTreeMap<NodeId, Vec<NetmapChange>> = BTreeMap::new();
        for viewer in self.neighbours(node) {
            if let Some(p) = self.peer_for(node, &viewer) {
                changes
                    .entry(viewer)
                    .or_default()
                    .push(NetmapChange::Peer(p));
            }
        }
        self.deliver(changes, now)
    }

    /// Applies membership changes from the store; returns each connected agent's delta.
    pub fn apply(&mut self, changes: &[MembershipChange], now: UnixMillis) -> Vec<Delivery> {
        let mut out: BTreeMap<NodeId, Vec<NetmapChange>> = BTreeMap::new();
        for change in changes {
            match change {
                MembershipChange::NetworkCreated(rec) => {
                    self.networks
                        .entry(rec.id)
                        .or_insert_with(|| (rec.clone(), BTreeSet::new()))
                        .0 = rec.clone();
                }
                MembershipChange::NetworkDeleted(id) => {
                    self.networks.remove(id);
                }
                MembershipChange::Joined {
                    network,
                    node,
                    mac,
                    address,
                } => {
                    let Some(n) = self.nodes.get_mut(node) else {
                        continue;
                    };
                    n.networks.insert(*network, (*mac, *address));
                    let Some((_, members)) = self.networks.get_mut(network) else {
                        continue;
                    };
                    members.insert(node.clone());
                    let others: Vec<NodeId> =
                        members.iter().filter(|m| *m != node).cloned().collect();
                    if let Some(m) = self.membership(*network, *mac, *address) {
                        out.entry(node.clone())
                            .or_default()
                            .push(NetmapChange::Network(m));
                    }
                    for other in others {
                        if let Some(p) = self.peer_for(&other, node) {
                            out.entry(node.clone())
                                .or_default()
                                .push(NetmapChange::Peer(p));
                        }
                        if let Some(p) = self.peer_for(node, &other) {
                            out.entry(other).or_default().push(NetmapChange::Peer(p));
                        }
                    }
                }
                MembershipChange::Left { network, node } => {
                    if let Some(n) = self.nodes.get_mut(node) {
                        n.networks.remove(network);
                    }
                    let others: Vec<NodeId> = match self.networks.get_mut(network) {
                        Some((_, members)) => {
                            members.remove(node);
                            members.iter().cloned().collect()
                        }
                        None => vec![],
                    };
                    out.entry(node.clone())
                        .or_default()
                        .push(NetmapChange::NetworkGone(*network));
                    for other in others {
                        let (to_node, to_other) =
                            match (self.peer_for(&other, node), self.peer_for(node, &other)) {
                                (Some(a), Some(b)) => {
                                    (NetmapChange::Peer(a), NetmapChange::Peer(b))
                                }
                                _ => (
                                    NetmapChange::PeerGone(other.clone()),
                                    NetmapChange::PeerGone(node.clone()),
                                ),
                            };
                        out.entry(node.clone()).or_default().push(to_node);
                        out.entry(other).or_default().push(to_other);
                    }
                }
                #[allow(unreachable_patterns)]
                _ => {}
            }
        }
        self.deliver(out, now)
    }

    /// Brings the coordinator to `snapshot` (the store as it is now), for changes another
    /// controller made while this one could not hear of them (a mesh link was down): nodes and keys
    /// first, then the membership changes that lead there, applied like [`Self::apply`]. Returns
    /// the connected agents' deltas.
    pub fn resync(&mut self, snapshot: OverlaySnapshot, now: UnixMillis) -> Vec<Delivery> {
        let mut out = Vec::new();
        for (node, n) in &snapshot.nodes {
            let key = n
                .key_sha256
                .filter(|k| self.nodes.get(node).map(|i| i.key) != Some(Some(*k)));
            out.extend(self.node_known(node, n.index, key, now));
        }
        let mut changes = Vec::new();
        let wanted: BTreeMap<NetworkId, &crate::networks::NetworkSnapshot> = snapshot
            .networks
            .iter()
            .map(|n| (n.network.id, n))
            .collect();
        // Members that left (and networks deleted) first, so nothing is briefly in two places.
        for (id, (_, members)) in &self.networks {
            let keep = wanted.get(id);
            for m in members {
                let still = keep.is_some_and(|w| {
                    w.members.iter().any(|r| {
                        r.node == *m
                            && self.nodes.get(m).and_then(|n| n.networks.get(id))
                                == Some(&(r.mac, r.address))
                    })
                });
                if !still {
                    changes.push(MembershipChange::Left {
                        network: *id,
                        node: m.clone(),
                    });
                }
            }
            if keep.is_none() {
                changes.push(MembershipChange::NetworkDeleted(*id));
            }
        }
        for (id, w) in &wanted {
            if self.networks.get(id).map(|(rec, _)| rec) != Some(&w.network) {
                changes.push(MembershipChange::NetworkCreated(w.network.clone()));
            }
            for r in &w.members {
                let here = self
                    .networks
                    .get(id)
                    .is_some_and(|(_, m)| m.contains(&r.node))
                    && self.nodes.get(&r.node).and_then(|n| n.networks.get(id))
                        == Some(&(r.mac, r.address));
                if !here {
                    changes.push(MembershipChange::Joined {
                        network: *id,
                        node: r.node.clone(),
                        mac: r.mac,
                        address: r.address,
                    });
                }
            }
        }
        out.extend(self.apply(&changes, now));
        out
    }

    /// A node left the fleet: forget it (its memberships' `Left` changes come through
    /// [`Self::apply`]).
    pub fn forget(&mut self, node: &NodeId) {
        self.nodes.remove(node);
        self.subscribed.remove(node);
        self.local_since.remove(node);
        self.remote.remove(node);
    }

    /// Bumps the version once and turns per-recipient changes into deltas for connected agents.
    fn deliver(
        &mut self,
        changes: BTreeMap<NodeId, Vec<NetmapChange>>,
        now: UnixMillis,
    ) -> Vec<Delivery> {
        if changes.is_empty() {
            return vec![];
        }
        self.counter = self.counter.wrapping_add(1);
        let version = self.version();
        let valid_until = self.valid_until(now);
        let mut out = Vec::new();
        for (node, changes) in changes {
            if let Some(sent) = self.subscribed.get_mut(&node) {
                out.push((
                    node,
                    ControllerMsg::NetmapDelta(NetmapDelta {
                        from_version: *sent,
                        to_version: version,
                        valid_until,
                        changes,
                    }),
                ));
                *sent = version;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::networks::{MemberRecord, NetworkSnapshot, NodeOverlay};

    fn n(s: &str) -> NodeId {
        NodeId(s.into())
    }

    fn net(id: u32, name: &str) -> NetworkRecord {
        NetworkRecord {
            id: NetworkId(id),
            name: name.into(),
            subnet: "10.90.0.0".parse().unwrap(),
            prefix_len: 16,
            mtu: 1380,
            selectors: vec![],
            created_at: UnixMillis(0),
        }
    }

    fn mac(i: u8) -> MacAddr {
        MacAddr([2, 0x5e, 0, 0, 0, i])
    }

    fn joined(network: u32, node: &str, i: u8) -> MembershipChange {
        MembershipChange::Joined {
            network: NetworkId(network),
            node: n(node),
            mac: mac(i),
            address: [10, 90, 0, i].into(),
        }
    }

    fn hello() -> OverlayHello {
        OverlayHello {
            netmap_version: None,
            local_endpoints: vec!["10.0.0.9:7000".parse().unwrap()],
            nat: NatMapping::EndpointIndependent,
        }
    }

    impl Coordinator {
        fn subscribe_test(
            &mut self,
            node: &NodeId,
            observed: SocketAddr,
            hello: &OverlayHello,
            now: UnixMillis,
        ) -> (ControllerMsg, Vec<Delivery>) {
            self.subscribe(node, None, observed, hello, now)
        }
    }

    #[test]
    fn a_new_key_and_new_endpoints_reach_peers_as_one_delta() {
        let mut c = coordinator();
        let now = UnixMillis(0);
        c.node_known(&n("a"), PeerIndex(1), None, now);
        c.node_known(&n("b"), PeerIndex(2), None, now);
        c.apply(&[joined(1, "a", 1), joined(1, "b", 2)], now);
        c.subscribe(
            &n("a"),
            Some([1; 32]),
            "192.0.2.1:1".parse().unwrap(),
            &hello(),
            now,
        );
        let (_, updates) = c.subscribe(
            &n("b"),
            Some([2; 32]),
            "192.0.2.2:1".parse().unwrap(),
            &hello(),
            now,
        );
        assert_eq!(updates.len(), 1);
        let d = delta(&updates[0].1);
        assert!(
            matches!(&d.changes[..], [NetmapChange::Peer(p)] if p.key_sha256 == [2; 32] && !p.endpoints.is_empty())
        );
    }

    fn coordinator() -> Coordinator {
        let snapshot = OverlaySnapshot {
            networks: vec![NetworkSnapshot {
                network: net(1, "default"),
                members: vec![],
            }],
            nodes: BTreeMap::new(),
        };
        Coordinator::new(3, snapshot, Duration::from_secs(3600))
    }

    fn delta(msg: &ControllerMsg) -> &NetmapDelta {
        match msg {
            ControllerMsg::NetmapDelta(d) => d,
            other => panic!("expected a delta, got {other:?}"),
        }
    }

    #[test]
    fn a_joining_node_costs_one_record_per_member_and_deltas_chain_per_recipient() {
        let mut c = coordinator();
        let now = UnixMillis(1000);
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            c.node_known(&n(id), PeerIndex(i as u32 + 1), Some([i as u8; 32]), now);
        }
        c.apply(&[joined(1, "a", 1), joined(1, "b", 2)], now);
        let (first, _) =
            c.subscribe_test(&n("a"), "198.51.100.1:7000".parse().unwrap(), &hello(), now);
        let ControllerMsg::Netmap(map_a) = first else {
            panic!("full netmap first")
        };
        assert_eq!(map_a.peers.len(), 1);
        assert_eq!(map_a.peers[0].node, n("b"));
        let (first_b, updates) =
            c.subscribe_test(&n("b"), "198.51.100.2:7000".parse().unwrap(), &hello(), now);
        assert!(matches!(first_b, ControllerMsg::Netmap(_)));
        // A hears B's new endpoints.
        assert_eq!(updates.len(), 1);
        let d = delta(&updates[0].1);
        assert_eq!(d.from_version, map_a.version);
        let mut map_a = map_a;
        map_a.apply(d).unwrap();
        assert_eq!(
            map_a.peers[0].endpoints[0],
            "198.51.100.2:7000".parse::<SocketAddr>().unwrap()
        );

        let out = c.apply(&[joined(1, "c", 3)], now);
        let to_a: Vec<_> = out.iter().filter(|(to, _)| *to == n("a")).collect();
        assert_eq!(to_a.len(), 1);
        let d = delta(&to_a[0].1);
        assert!(
            matches!(&d.changes[..], [NetmapChange::Peer(p)] if p.node == n("c")),
            "{d:?}"
        );
        map_a.apply(d).unwrap();
        assert_eq!(
            map_a,
            c.netmap(&n("a"), now).clone_with_version(map_a.version)
        );
    }

    trait WithVersion {
        fn clone_with_version(self, v: u64) -> Self;
    }
    impl WithVersion for Netmap {
        fn clone_with_version(mut self, v: u64) -> Self {
            self.version = v;
            self
        }
    }

    #[test]
    fn leaving_tells_both_sides_and_networks_stay_apart() {
        let mut c = coordinator();
        let now = UnixMillis(0);
        c.apply(&[MembershipChange::NetworkCreated(net(2, "lab"))], now);
        for (i, id) in ["a", "b", "x"].iter().enumerate() {
            c.node_known(&n(id), PeerIndex(i as u32 + 1), None, now);
        }
        c.apply(
            &[
                joined(1, "a", 1),
                joined(1, "b", 2),
                joined(2, "a", 11),
                joined(2, "x", 12),
            ],
            now,
        );
        assert!(c.share_network(&n("a"), &n("x")));
        assert!(
            !c.share_network(&n("b"), &n("x")),
            "b and x are in different networks"
        );
        let x_view = c.netmap(&n("x"), now);
        assert_eq!(x_view.peers.len(), 1);
        assert_eq!(
            x_view.peers[0].networks.len(),
            1,
            "x sees only the network it shares with a"
        );
        for id in ["a", "b", "x"] {
            c.subscribe_test(&n(id), "192.0.2.1:1".parse().unwrap(), &hello(), now);
        }
        let out = c.apply(
            &[MembershipChange::Left {
                network: NetworkId(1),
                node: n("b"),
            }],
            now,
        );
        let to_b = delta(&out.iter().find(|(to, _)| *to == n("b")).unwrap().1);
        assert!(to_b
            .changes
            .contains(&NetmapChange::NetworkGone(NetworkId(1))));
        assert!(to_b.changes.contains(&NetmapChange::PeerGone(n("a"))));
        let to_a = delta(&out.iter().find(|(to, _)| *to == n("a")).unwrap().1);
        assert_eq!(to_a.changes, vec![NetmapChange::PeerGone(n("b"))]);
        assert!(
            out.iter().all(|(to, _)| *to != n("x")),
            "x is not told about another network"
        );
    }

    #[test]
    fn a_current_cache_gets_an_empty_delta_and_a_new_epoch_never_matches() {
        let mut c = coordinator();
        let now = UnixMillis(0);
        c.node_known(&n("a"), PeerIndex(1), None, now);
        c.apply(&[joined(1, "a", 1)], now);
        let v = c.version();
        let mut h = hello();
        h.netmap_version = Some(v);
        let (first, _) =
            c.subscribe_test(&n("a"), "192.0.2.1:1".parse().unwrap(), &h, UnixMillis(5));
        let d = delta(&first);
        assert!(
            d.changes.is_empty()
                && d.from_version == v
                && d.valid_until == UnixMillis(5 + 3_600_000)
        );
        let c2 = Coordinator::new(4, OverlaySnapshot::default(), Duration::from_secs(1));
        assert_ne!(c2.version() >> 32, v >> 32);
    }

    #[test]
    fn loads_members_from_the_store_snapshot() {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            n("a"),
            NodeOverlay {
                index: PeerIndex(1),
                key_sha256: Some([1; 32]),
            },
        );
        nodes.insert(
            n("b"),
            NodeOverlay {
                index: PeerIndex(2),
                key_sha256: None,
            },
        );
        let member = |node: &str, i: u8| MemberRecord {
            network: NetworkId(1),
            node: n(node),
            mac: mac(i),
            address: [10, 90, 0, i].into(),
            explicit: false,
            via_selector: false,
        };
        let snapshot = OverlaySnapshot {
            networks: vec![NetworkSnapshot {
                network: net(1, "default"),
                members: vec![member("a", 1), member("b", 2)],
            }],
            nodes,
        };
        let c = Coordinator::new(1, snapshot, Duration::from_secs(60));
        let map = c.netmap(&n("b"), UnixMillis(0));
        assert_eq!(
            map.networks[0].address,
            std::net::Ipv4Addr::new(10, 90, 0, 2)
        );
        assert_eq!(map.peers[0].key_sha256, [1; 32]);
    }

    #[test]
    fn only_usable_endpoints_are_kept_and_at_most_the_cap() {
        let remote: SocketAddr = "198.51.100.7:7000".parse().unwrap();
        let no_overlay = |_: Ipv4Addr| false;
        let usable = |a: &str, observed: &SocketAddr| {
            usable_endpoint(&a.parse().unwrap(), observed, no_overlay)
        };
        for ok in [
            "10.0.0.9:7000",
            "192.168.1.2:1",
            "169.254.3.4:7000",
            "[2001:db8::1]:7000",
            "[::ffff:10.1.2.3]:7000",
        ] {
            assert!(usable(ok, &remote), "{ok}");
        }
        for refused in [
            "10.0.0.9:0",
            "0.0.0.0:7000",
            "0.1.2.3:7000",
            "255.255.255.255:7000",
            "224.0.0.251:5353",
            "240.0.0.2:1",
            "127.0.0.1:7000",
            "[::]:7000",
            "[::1]:7000",
            "[ff02::1]:7000",
            "[fe80::1]:7000",
            "[::ffff:127.0.0.1]:7000",
            "[::ffff:224.0.0.1]:7000",
        ] {
            assert!(!usable(refused, &remote), "{refused}");
        }
        // Loopback is a usable endpoint for an agent on the controller's own host.
        assert!(usable("127.0.0.1:7001", &"127.0.0.1:7000".parse().unwrap()));

        let mut c = coordinator();
        let now = UnixMillis(0);
        c.node_known(&n("a"), PeerIndex(1), None, now);
        c.node_known(&n("b"), PeerIndex(2), None, now);
        c.apply(&[joined(1, "a", 1), joined(1, "b", 2)], now);
        let mut announced: Vec<SocketAddr> = vec![
            "224.0.0.1:1".parse().unwrap(),
            "10.90.0.2:7000".parse().unwrap(), // inside the default network: the overlay itself
            "10.0.0.9:7000".parse().unwrap(),
            "10.0.0.9:7000".parse().unwrap(),
        ];
        announced.extend((1..=100u8).map(|i| SocketAddr::from(([192, 0, 2, i], 7000))));
        let h = OverlayHello {
            netmap_version: None,
            local_endpoints: announced,
            nat: NatMapping::Unknown,
        };
        c.subscribe_test(&n("a"), remote, &h, now);
        let seen = &c.netmap(&n("b"), now).peers[0].endpoints;
        assert_eq!(seen.len(), 1 + MAX_LOCAL_ENDPOINTS, "{seen:?}");
        assert_eq!(seen[0], remote, "the observed address first");
        assert_eq!(seen[1], "10.0.0.9:7000".parse::<SocketAddr>().unwrap());
        assert!(seen.iter().all(|e| usable_endpoint(e, &remote, no_overlay)));
        assert!(!seen.contains(&"10.90.0.2:7000".parse().unwrap()));
        assert_eq!(
            c.endpoints(&n("a")),
            *seen,
            "punches carry the same bounded list"
        );
    }

    fn remote_sub(node: &str, index: u32, port: u16, since: u64) -> Subscription {
        Subscription {
            node: n(node),
            index: PeerIndex(index),
            key: [index as u8; 32],
            observed: SocketAddr::from(([198, 51, 100, index as u8], port)),
            local_endpoints: vec![
                SocketAddr::from(([10, 0, 0, index as u8], 7000)),
                "224.0.0.1:9".parse().unwrap(),
            ],
            nat: NatMapping::EndpointIndependent,
            since: UnixMillis(since),
        }
    }

    /// a is subscribed here; b is known from the store and in a's network.
    fn with_local_a() -> (Coordinator, Netmap) {
        let mut c = coordinator();
        let now = UnixMillis(0);
        c.node_known(&n("a"), PeerIndex(1), None, now);
        c.node_known(&n("b"), PeerIndex(2), None, now);
        c.apply(&[joined(1, "a", 1), joined(1, "b", 2)], now);
        let (first, _) = c.subscribe(
            &n("a"),
            Some([1; 32]),
            "192.0.2.1:1".parse().unwrap(),
            &hello(),
            now,
        );
        let ControllerMsg::Netmap(map) = first else {
            panic!("full netmap first")
        };
        (c, map)
    }

    #[test]
    fn a_remote_subscriber_reaches_local_netmaps_and_is_never_sent_anything() {
        let (mut c, mut map_a) = with_local_a();
        let (taken, out) =
            c.subscribe_remote("ctl-2", remote_sub("b", 2, 4000, 10), UnixMillis(10));
        assert!(taken);
        let [(to, msg)] = &out[..] else {
            panic!("one delta, for a: {out:?}")
        };
        assert_eq!(*to, n("a"));
        map_a.apply(delta(msg)).unwrap();
        let b = &map_a.peers[0];
        assert_eq!((b.node.clone(), b.key_sha256), (n("b"), [2; 32]));
        assert_eq!(
            b.endpoints,
            vec![
                "198.51.100.2:4000".parse::<SocketAddr>().unwrap(),
                "10.0.0.2:7000".parse().unwrap()
            ],
            "observed first, and the unusable endpoint bounded out here too"
        );
        assert_eq!(
            map_a,
            c.netmap(&n("a"), UnixMillis(10))
                .clone_with_version(map_a.version)
        );
        assert_eq!(c.remote_holder(&n("b")), Some("ctl-2"));
        assert_eq!(c.endpoints(&n("b"))[0], b.endpoints[0], "punches carry it");

        // a's own changes, and membership changes, are never addressed to b.
        let (_, out) = c.subscribe(
            &n("a"),
            Some([1; 32]),
            "192.0.2.1:2".parse().unwrap(),
            &hello(),
            UnixMillis(20),
        );
        assert!(out.is_empty(), "{out:?}");
        c.node_known(&n("x"), PeerIndex(3), None, UnixMillis(20));
        let out = c.apply(&[joined(1, "x", 3)], UnixMillis(20));
        assert!(out.iter().all(|(to, _)| *to == n("a")), "{out:?}");
        // The same word again changes nothing.
        let (taken, out) =
            c.subscribe_remote("ctl-2", remote_sub("b", 2, 4000, 10), UnixMillis(30));
        assert!(taken && out.is_empty());
    }

    #[test]
    fn a_newer_subscription_from_another_controller_replaces_the_old_and_an_older_one_does_not() {
        let (mut c, _) = with_local_a();
        c.subscribe_remote("ctl-2", remote_sub("b", 2, 4000, 100), UnixMillis(100));
        // The agent moved to ctl-3.
        let (taken, out) =
            c.subscribe_remote("ctl-3", remote_sub("b", 2, 5000, 200), UnixMillis(200));
        assert!(taken);
        assert_eq!(out.len(), 1);
        assert_eq!(c.remote_holder(&n("b")), Some("ctl-3"));
        assert_eq!(c.endpoints(&n("b"))[0].port(), 5000);
        // ctl-2's late snapshot (it had not noticed yet) loses.
        let (taken, out) =
            c.subscribe_remote("ctl-2", remote_sub("b", 2, 4000, 100), UnixMillis(300));
        assert!(!taken && out.is_empty());
        assert_eq!(c.endpoints(&n("b"))[0].port(), 5000);
        // ctl-2 saying the session ended there does not touch ctl-3's.
        assert!(!c.unsubscribe_remote("ctl-2", &n("b")));
        assert_eq!(c.remote_holder(&n("b")), Some("ctl-3"));
        // ctl-3 saying so forgets who holds it, but b stays in a's netmap as it was.
        assert!(c.unsubscribe_remote("ctl-3", &n("b")));
        assert_eq!(c.remote_holder(&n("b")), None);
        let map = c.netmap(&n("a"), UnixMillis(400));
        assert_eq!(map.peers[0].endpoints[0].port(), 5000);
        // A controller that comes back and resets forgets only its own.
        c.subscribe_remote("ctl-3", remote_sub("b", 2, 5000, 500), UnixMillis(500));
        assert!(c.reset_remote("ctl-2").is_empty());
        assert_eq!(c.reset_remote("ctl-3"), vec![n("b")]);
        assert_eq!(
            c.netmap(&n("a"), UnixMillis(600)).peers[0].endpoints[0].port(),
            5000
        );
    }

    #[test]
    fn a_newer_session_elsewhere_takes_over_from_a_lingering_one_here_and_an_older_one_never_does()
    {
        let (mut c, _) = with_local_a();
        c.subscribe(
            &n("b"),
            Some([2; 32]),
            "192.0.2.2:1".parse().unwrap(),
            &hello(),
            UnixMillis(50),
        );
        // ctl-2's word from before b came here loses.
        let (taken, out) =
            c.subscribe_remote("ctl-2", remote_sub("b", 2, 4000, 40), UnixMillis(55));
        assert!(!taken && out.is_empty(), "{out:?}");
        assert_eq!(c.remote_holder(&n("b")), None, "b's session is here");
        // b moved to ctl-2 while its session here lingers: ctl-2 speaks for it at once.
        let (taken, out) =
            c.subscribe_remote("ctl-2", remote_sub("b", 2, 4000, 60), UnixMillis(60));
        assert!(taken);
        let [(to, msg)] = &out[..] else {
            panic!("one delta, for a: {out:?}")
        };
        assert_eq!(*to, n("a"));
        assert!(
            matches!(&delta(msg).changes[..], [NetmapChange::Peer(p)] if p.endpoints[0].port() == 4000)
        );
        assert_eq!(c.remote_holder(&n("b")), Some("ctl-2"));
        // The lingering session ends: nothing changes for a.
        assert!(c.unsubscribe(&n("b"), UnixMillis(70)).is_empty());
        assert_eq!(c.remote_holder(&n("b")), Some("ctl-2"));
        assert_eq!(c.endpoints(&n("b"))[0].port(), 4000);

        // b comes back here: the older remote word is dropped, and not replayed after it.
        c.subscribe(
            &n("b"),
            Some([2; 32]),
            "192.0.2.2:1".parse().unwrap(),
            &hello(),
            UnixMillis(80),
        );
        assert_eq!(c.remote_holder(&n("b")), None);
        assert!(c.unsubscribe(&n("b"), UnixMillis(90)).is_empty());
        assert_eq!(
            c.endpoints(&n("b"))[0],
            "192.0.2.2:1".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn a_remote_node_not_yet_in_the_store_snapshot_appears_once_its_membership_arrives() {
        let (mut c, mut map_a) = with_local_a();
        let (taken, out) =
            c.subscribe_remote("ctl-2", remote_sub("new", 9, 4000, 10), UnixMillis(10));
        assert!(taken && out.is_empty(), "in no network yet: {out:?}");
        let out = c.apply(&[joined(1, "new", 9)], UnixMillis(20));
        let [(to, msg)] = &out[..] else {
            panic!("one delta, for a: {out:?}")
        };
        assert_eq!(*to, n("a"));
        map_a.apply(delta(msg)).unwrap();
        let p = map_a.peers.iter().find(|p| p.node == n("new")).unwrap();
        assert_eq!((p.index, p.endpoints[0].port()), (PeerIndex(9), 4000));
        assert!(c.share_network(&n("a"), &n("new")));
        c.forget(&n("new"));
        assert_eq!(c.remote_holder(&n("new")), None);
    }

    #[test]
    fn a_local_subscription_is_described_for_the_other_controllers() {
        let (c, _) = with_local_a();
        let sub = c.subscription(&n("a"), UnixMillis(5)).unwrap();
        assert_eq!(
            (sub.index, sub.key, sub.observed, sub.since),
            (
                PeerIndex(1),
                [1; 32],
                "192.0.2.1:1".parse().unwrap(),
                UnixMillis(5)
            )
        );
        assert_eq!(sub.local_endpoints, vec!["10.0.0.9:7000".parse().unwrap()]);
        assert!(
            c.subscription(&n("b"), UnixMillis(5)).is_none(),
            "b is not subscribed here"
        );
    }

    #[test]
    fn a_resync_from_the_store_brings_what_was_missed_and_nothing_else() {
        use crate::networks::{MemberRecord, NetworkSnapshot, NodeOverlay};
        let (mut c, mut map_a) = with_local_a();
        let member = |network: u32, node: &str, i: u8| MemberRecord {
            network: NetworkId(network),
            node: n(node),
            mac: mac(i),
            address: [10, 90, 0, i].into(),
            explicit: false,
            via_selector: false,
        };
        let overlay = |index: u32, key: Option<[u8; 32]>| NodeOverlay {
            index: PeerIndex(index),
            key_sha256: key,
        };
        let snapshot = |networks: Vec<NetworkSnapshot>, nodes: &[(&str, u32, Option<[u8; 32]>)]| {
            OverlaySnapshot {
                networks,
                nodes: nodes
                    .iter()
                    .map(|(id, i, k)| (n(id), overlay(*i, *k)))
                    .collect(),
            }
        };
        // The store as it is: nothing missed.
        let same = snapshot(
            vec![NetworkSnapshot {
                network: net(1, "default"),
                members: vec![member(1, "a", 1), member(1, "b", 2)],
            }],
            &[("a", 1, Some([1; 32])), ("b", 2, None)],
        );
        assert!(c.resync(same, UnixMillis(1)).is_empty());

        // Missed: b rotated its key, "new" enrolled and joined, network 2 was created with a in it.
        let missed = snapshot(
            vec![
                NetworkSnapshot {
                    network: net(1, "default"),
                    members: vec![member(1, "a", 1), member(1, "b", 2), member(1, "new", 3)],
                },
                NetworkSnapshot {
                    network: net(2, "lab"),
                    members: vec![member(2, "a", 11)],
                },
            ],
            &[
                ("a", 1, Some([1; 32])),
                ("b", 2, Some([9; 32])),
                ("new", 3, None),
            ],
        );
        let out = c.resync(missed, UnixMillis(2));
        assert!(out.iter().all(|(to, _)| *to == n("a")), "{out:?}");
        for (_, msg) in &out {
            map_a.apply(delta(msg)).unwrap();
        }
        assert_eq!(
            map_a,
            c.netmap(&n("a"), UnixMillis(2))
                .clone_with_version(map_a.version)
        );
        assert_eq!(map_a.networks.len(), 2);
        assert_eq!(map_a.peers.len(), 2);
        assert!(map_a
            .peers
            .iter()
            .any(|p| p.node == n("b") && p.key_sha256 == [9; 32]));

        // Missed: b left, network 2 was deleted.
        let missed = snapshot(
            vec![NetworkSnapshot {
                network: net(1, "default"),
                members: vec![member(1, "a", 1), member(1, "new", 3)],
            }],
            &[
                ("a", 1, Some([1; 32])),
                ("b", 2, Some([9; 32])),
                ("new", 3, None),
            ],
        );
        for (_, msg) in c.resync(missed, UnixMillis(3)) {
            map_a.apply(delta(&msg)).unwrap();
        }
        assert_eq!(
            map_a,
            c.netmap(&n("a"), UnixMillis(3))
                .clone_with_version(map_a.version)
        );
        assert_eq!(map_a.networks.len(), 1);
        assert_eq!(
            map_a
                .peers
                .iter()
                .map(|p| p.node.clone())
                .collect::<Vec<_>>(),
            vec![n("new")]
        );
    }
}
