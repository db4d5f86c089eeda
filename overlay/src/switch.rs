//! The per-network learning switch: decides where a frame from our TAP device goes, and whether a
//! frame from a peer may reach it.
//!
//! One [`Switch`] per agent holds every network the node is a member of. It is sans-IO: frames are
//! borrowed byte slices, peers are [`NodeId`]s, and `now` is passed in, so the rules below are
//! tested with simulated time.
//!
//! Unlike a LAN switch, this one does not learn where MACs live: the controller assigns each member
//! its MAC on each network and the netmap says so. The MAC table is seeded from the netmap, every
//! frame from a peer must carry that peer's assigned source MAC, and frames from our TAP must carry
//! ours. Learning therefore never moves a MAC to another peer (that would be spoofing); it only
//! records when each MAC was last heard from, and that record ages out after
//! [`SwitchConfig::mac_age`]. The table is visible through [`Switch::mac_table`].
//!
//! Architecture Invariant: a frame is only ever associated with the network it arrived on. There is
//! no path, in either direction, by which a frame of one network is forwarded or delivered on another.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use shoal_proto::{MacAddr, NetworkId, NetworkMembership, NodeId, OverlayCounters};

use crate::wire::ETHERNET_HEADER_LEN;

/// The switch's limits. Every field has a default suited to a fleet of a few hundred nodes.
#[derive(Debug, Clone)]
pub struct SwitchConfig {
    /// The most peers one broadcast, multicast or unknown-unicast frame is sent to; the rest are
    /// skipped and counted as `flood_truncated`. Default 256: beyond that, flooding one ARP request
    /// costs more uplink than the frame is worth, and such networks want routing instead.
    pub max_flood_fanout: usize,
    /// Broadcast and multicast frames per second accepted from one peer (over all networks we share
    /// with it), refilling a token bucket. Default 2000: far above ARP, DHCP and mDNS chatter, low
    /// enough that one misbehaving member cannot flood every other member's TAP.
    pub flood_rate_per_peer: u32,
    /// The bucket's size: how many such frames a peer may send at once after being quiet. Default 4000.
    pub flood_burst: u32,
    /// How long a MAC counts as recently heard from after its last accepted frame. Default 300 s,
    /// the usual bridge ageing time.
    pub mac_age: Duration,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            max_flood_fanout: 256,
            flood_rate_per_peer: 2000,
            flood_burst: 4000,
            mac_age: Duration::from_secs(300),
        }
    }
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DropReason {
    /// The frame's network is not one we are a member of.
    NoNetwork,
    /// The frame is shorter than an Ethernet header.
    Malformed,
    /// Outbound: the source MAC is not ours on that network. The TAP must not bridge other
    /// machines' frames into the overlay, since receivers would refuse them anyway.
    ForeignSource,
    /// Outbound: the destination is our own MAC; the kernel should not have sent it to the TAP.
    ToSelf,
    /// Outbound: a flood with no peer on the network to send it to.
    NoPeers,
    /// Inbound: the sender is not a member of the frame's network.
    NotMember,
    /// Inbound: the source MAC is not the one the controller assigned to the sender on that network.
    SpoofedSource,
    /// Inbound: a unicast frame for a MAC other than ours.
    NotForUs,
    /// Inbound: a broadcast or multicast frame beyond the sender's rate limit.
    Storm,
}

impl DropReason {
    /// Every reason, in declaration order (which is also the index into the counters).
    pub const ALL: [DropReason; 9] = [
        DropReason::NoNetwork,
        DropReason::Malformed,
        DropReason::ForeignSource,
        DropReason::ToSelf,
        DropReason::NoPeers,
        DropReason::NotMember,
        DropReason::SpoofedSource,
        DropReason::NotForUs,
        DropReason::Storm,
    ];

    /// A stable snake_case label for drop counters and metrics.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::NoNetwork => "no_network",
            DropReason::Malformed => "malformed",
            DropReason::ForeignSource => "foreign_source",
            DropReason::ToSelf => "to_self",
            DropReason::NoPeers => "no_peers",
            DropReason::NotMember => "not_member",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::NotForUs => "not_for_us",
            DropReason::Storm => "storm",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The label under which floods that reached only the first [`SwitchConfig::max_flood_fanout`]
/// peers are counted in [`OverlayCounters::dropped`]: the frame went out, but not to everyone.
pub const FLOOD_TRUNCATED: &str = "flood_truncated";

/// Where a frame read from our TAP device goes. Borrows the peer ids from the switch, so deciding
/// allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound<'s> {
    /// To the one peer whose MAC is the destination.
    Unicast(&'s NodeId),
    /// To each of these peers (broadcast, multicast, or a destination no member has), in
    /// [`NodeId`] order, at most [`SwitchConfig::max_flood_fanout`] of them.
    Flood(&'s [NodeId]),
    /// Nowhere.
    Drop(DropReason),
}

/// What to do with a frame received from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// Write it to the network's TAP device.
    Deliver,
    /// Discard it.
    Drop(DropReason),
}

/// A network's configuration could not be applied; the previous one (if any) is kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SwitchError {
    /// A MAC with the group bit set was assigned to a node: frames to it would be flooded and
    /// frames from it could not be told from broadcasts.
    #[error("network {network:?}: group MAC {mac} assigned to a node")]
    GroupMac {
        /// The network.
        network: NetworkId,
        /// The MAC.
        mac: MacAddr,
    },
    /// Two members (or a member and this node) were assigned the same MAC, so unicast to it has
    /// no single destination.
    #[error("network {network:?}: MAC {mac} assigned twice")]
    DuplicateMac {
        /// The network.
        network: NetworkId,
        /// The MAC.
        mac: MacAddr,
    },
    /// One peer was listed twice with different MACs.
    #[error("network {network:?}: peer {node} listed twice with different MACs")]
    DuplicateMember {
        /// The network.
        network: NetworkId,
        /// The peer.
        node: NodeId,
    },
}

/// One row of a network's MAC table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacTableEntry {
    /// The MAC.
    pub mac: MacAddr,
    /// The peer it belongs to (assigned by the controller).
    pub node: NodeId,
    /// When a frame from it was last accepted, if within [`SwitchConfig::mac_age`].
    pub last_seen: Option<Instant>,
}

/// One network's state. Peers are kept sorted by id in parallel vectors so that a flood is a slice
/// of `peers` and a sender lookup is a binary search.
#[derive(Debug)]
struct Network {
    own_mac: MacAddr,
    peers: Vec<NodeId>,
    peer_macs: Vec<MacAddr>,
    last_seen: Vec<Option<Instant>>,
    by_mac: HashMap<MacAddr, usize>,
}

/// A token bucket in fractional tokens; refilled from elapsed simulated time on each use.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// The learning switch for all of this node's networks. See the module documentation for the rules.
#[derive(Debug)]
pub struct Switch {
    config: SwitchConfig,
    networks: BTreeMap<NetworkId, Network>,
    buckets: HashMap<NodeId, Bucket>,
    counts: Counts,
}

/// Kept apart from the tables so that counting borrows only this field while a decision still
/// borrows the tables.
#[derive(Debug, Default)]
struct Counts {
    forwarded: u64,
    flooded: u64,
    delivered: u64,
    flood_truncated: u64,
    outbound_drops: [u64; DropReason::ALL.len()],
    inbound_drops: [u64; DropReason::ALL.len()],
}

impl Counts {
    fn drop_outbound(&mut self, reason: DropReason) -> Outbound<'static> {
        self.outbound_drops[reason.index()] += 1;
        Outbound::Drop(reason)
    }

    fn drop_inbound(&mut self, reason: DropReason) -> Inbound {
        self.inbound_drops[reason.index()] += 1;
        Inbound::Drop(reason)
    }
}

/// Takes one token from `from`'s flood bucket, refilling it for the time since its last use. A peer
/// starts with a full bucket; its id is cloned only then, not per frame.
fn take_flood_token(buckets: &mut HashMap<NodeId, Bucket>, config: &SwitchConfig, now: Instant, from: &NodeId) -> bool {
    let rate = f64::from(config.flood_rate_per_peer);
    let burst = f64::from(config.flood_burst.max(1));
    let take = |bucket: &mut Bucket| {
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    };
    if let Some(bucket) = buckets.get_mut(from) {
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.refilled = bucket.refilled.max(now);
        return take(bucket);
    }
    take(buckets.entry(from.clone()).or_insert(Bucket { tokens: burst, refilled: now }))
}

/// Destination and source MAC of a frame, or `None` if it is shorter than an Ethernet header.
fn macs(frame: &[u8]) -> Option<(MacAddr, MacAddr)> {
    let (header, _) = frame.split_first_chunk::<ETHERNET_HEADER_LEN>()?;
    let [d0, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5, _, _] = *header;
    Some((MacAddr([d0, d1, d2, d3, d4, d5]), MacAddr([s0, s1, s2, s3, s4, s5])))
}

impl Switch {
    /// An empty switch: no networks, so every frame is dropped as `no_network` until
    /// [`Switch::set_network`] is called.
    pub fn new(config: SwitchConfig) -> Self {
        Switch { config, networks: BTreeMap::new(), buckets: HashMap::new(), counts: Counts::default() }
    }

    /// Configures one network from the netmap: our MAC there and each peer member's assigned MAC.
    ///
    /// `members` replaces the network's previous member set; peers that left are forgotten with
    /// their MAC table rows, and peers that stay keep their last-seen time if their MAC is
    /// unchanged. Refused, keeping the previous configuration, if the MACs are not unique unicast
    /// addresses, because then unicast and the source check would have no single answer.
    pub fn set_network(
        &mut self,
        membership: &NetworkMembership,
        members: impl IntoIterator<Item = (NodeId, MacAddr)>,
    ) -> Result<(), SwitchError> {
        let network = membership.id;
        let own_mac = membership.mac;
        if own_mac.is_group() {
            return Err(SwitchError::GroupMac { network, mac: own_mac });
        }
        let mut sorted: Vec<(NodeId, MacAddr)> = members.into_iter().collect();
        sorted.sort();
        sorted.dedup();
        let mut by_mac = HashMap::with_capacity(sorted.len());
        for (index, pair) in sorted.iter().enumerate() {
            let (node, mac) = pair;
            if index > 0 && sorted[index - 1].0 == *node {
                return Err(SwitchError::DuplicateMember { network, node: node.clone() });
            }
            if mac.is_group() {
                return Err(SwitchError::GroupMac { network, mac: *mac });
            }
            if *mac == own_mac || by_mac.insert(*mac, index).is_some() {
                return Err(SwitchError::DuplicateMac { network, mac: *mac });
            }
        }
        let previous = self.networks.get(&network);
        let last_seen = sorted
            .iter()
            .map(|(node, mac)| {
                let prev = previous?;
                let i = prev.peers.binary_search(node).ok()?;
                if prev.peer_macs[i] == *mac {
                    prev.last_seen[i]
                } else {
                    None
                }
            })
            .collect();
        let (peers, peer_macs) = sorted.into_iter().unzip();
        self.networks.insert(network, Network { own_mac, peers, peer_macs, last_seen, by_mac });
        self.forget_departed_buckets();
        Ok(())
    }

    /// Leaves a network: its frames are dropped as `no_network` from now on.
    pub fn remove_network(&mut self, id: NetworkId) {
        if self.networks.remove(&id).is_some() {
            self.forget_departed_buckets();
        }
    }

    /// The networks configured, in id order.
    pub fn networks(&self) -> impl Iterator<Item = NetworkId> + '_ {
        self.networks.keys().copied()
    }

    /// Rate-limit state is per peer across networks, so it lives until the peer shares none with us.
    fn forget_departed_buckets(&mut self) {
        let networks = &self.networks;
        self.buckets.retain(|node, _| networks.values().any(|n| n.peers.binary_search(node).is_ok()));
    }

    /// Decides where a frame read from `network`'s TAP device goes.
    pub fn outbound(&mut self, now: Instant, network: NetworkId, frame: &[u8]) -> Outbound<'_> {
        let _ = now; // Outbound decisions need no clock today; kept so callers need not change if one does.
        let Some(net) = self.networks.get(&network) else {
            return self.counts.drop_outbound(DropReason::NoNetwork);
        };
        let Some((dst, src)) = macs(frame) else {
            return self.counts.drop_outbound(DropReason::Malformed);
        };
        if src != net.own_mac {
            return self.counts.drop_outbound(DropReason::ForeignSource);
        }
        if dst == net.own_mac {
            return self.counts.drop_outbound(DropReason::ToSelf);
        }
        if !dst.is_group() {
            if let Some(&i) = net.by_mac.get(&dst) {
                self.counts.forwarded += 1;
                return Outbound::Unicast(&net.peers[i]);
            }
        }
        if net.peers.is_empty() {
            return self.counts.drop_outbound(DropReason::NoPeers);
        }
        let fanout = net.peers.len().min(self.config.max_flood_fanout.max(1));
        self.counts.flooded += 1;
        if fanout < net.peers.len() {
            self.counts.flood_truncated += 1;
        }
        Outbound::Flood(&net.peers[..fanout])
    }

    /// Decides whether a frame that peer `from` sent on `network` may be written to that network's
    /// TAP device, and records when its source MAC was last heard from.
    pub fn inbound(&mut self, now: Instant, from: &NodeId, network: NetworkId, frame: &[u8]) -> Inbound {
        let Some(net) = self.networks.get_mut(&network) else {
            return self.counts.drop_inbound(DropReason::NoNetwork);
        };
        let Ok(sender) = net.peers.binary_search(from) else {
            return self.counts.drop_inbound(DropReason::NotMember);
        };
        let Some((dst, src)) = macs(frame) else {
            return self.counts.drop_inbound(DropReason::Malformed);
        };
        if src != net.peer_macs[sender] {
            return self.counts.drop_inbound(DropReason::SpoofedSource);
        }
        if dst.is_group() {
            let accepted = take_flood_token(&mut self.buckets, &self.config, now, from);
            if !accepted {
                return self.counts.drop_inbound(DropReason::Storm);
            }
        } else if dst != net.own_mac {
            return self.counts.drop_inbound(DropReason::NotForUs);
        }
        net.last_seen[sender] = Some(now);
        self.counts.delivered += 1;
        Inbound::Deliver
    }

    /// A network's MAC table, in peer order; `None` if the network is not configured.
    pub fn mac_table(&self, network: NetworkId, now: Instant) -> Option<Vec<MacTableEntry>> {
        let net = self.networks.get(&network)?;
        let fresh = |seen: Option<Instant>| seen.filter(|t| now.saturating_duration_since(*t) < self.config.mac_age);
        Some(
            net.peers
                .iter()
                .zip(&net.peer_macs)
                .zip(&net.last_seen)
                .map(|((node, mac), seen)| MacTableEntry { mac: *mac, node: node.clone(), last_seen: fresh(*seen) })
                .collect(),
        )
    }

    /// Datapath counters since the switch was created; drops of both directions are summed per
    /// label, sorted by label, and only reasons that occurred are listed.
    pub fn counters(&self) -> OverlayCounters {
        let mut dropped: Vec<(String, u64)> = DropReason::ALL
            .iter()
            .map(|r| {
                (r.label().to_owned(), self.counts.outbound_drops[r.index()] + self.counts.inbound_drops[r.index()])
            })
            .chain(std::iter::once((FLOOD_TRUNCATED.to_owned(), self.counts.flood_truncated)))
            .filter(|(_, n)| *n > 0)
            .collect();
        dropped.sort();
        let c = &self.counts;
        OverlayCounters { forwarded: c.forwarded, flooded: c.flooded, delivered: c.delivered, dropped }
    }

    /// Frames from our TAP devices dropped, by reason (every reason, zeros included).
    pub fn outbound_drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.counts.outbound_drops[r.index()]))
    }

    /// Frames from peers dropped, by reason (every reason, zeros included).
    pub fn inbound_drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.counts.inbound_drops[r.index()]))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const NET: NetworkId = NetworkId(1);
    const OTHER_NET: NetworkId = NetworkId(2);

    fn mac(last: u8) -> MacAddr {
        MacAddr([0x02, 0x5e, 0, 0, 0, last])
    }

    fn node(name: &str) -> NodeId {
        NodeId(name.into())
    }

    fn membership(id: NetworkId, own: MacAddr) -> NetworkMembership {
        NetworkMembership {
            id,
            name: format!("net{}", id.0),
            subnet: Ipv4Addr::new(10, 0, 0, 0),
            prefix_len: 24,
            mac: own,
            address: Ipv4Addr::new(10, 0, 0, 1),
            mtu: 1500,
        }
    }

    fn frame(dst: MacAddr, src: MacAddr) -> Vec<u8> {
        let mut f = Vec::with_capacity(60);
        f.extend(dst.0);
        f.extend(src.0);
        f.extend([0x08, 0x00]);
        f.resize(60, 0xab);
        f
    }

    /// Us at mac(1) on NET with peers a (mac 2), b (mac 3), c (mac 4).
    fn switch() -> Switch {
        let mut s = Switch::new(SwitchConfig::default());
        s.set_network(&membership(NET, mac(1)), [(node("a"), mac(2)), (node("b"), mac(3)), (node("c"), mac(4))])
            .unwrap();
        s
    }

    fn dropped(s: &Switch, label: &str) -> u64 {
        s.counters().dropped.iter().find(|(l, _)| l == label).map_or(0, |(_, n)| *n)
    }

    #[test]
    fn outbound_unicast_goes_to_the_owner_and_floods_go_to_every_member() {
        let mut s = switch();
        let now = Instant::now();
        assert_eq!(s.outbound(now, NET, &frame(mac(3), mac(1))), Outbound::Unicast(&node("b")));
        let all = [node("a"), node("b"), node("c")];
        assert_eq!(s.outbound(now, NET, &frame(MacAddr::BROADCAST, mac(1))), Outbound::Flood(&all));
        let multicast = MacAddr([0x01, 0x00, 0x5e, 0, 0, 0xfb]);
        assert_eq!(s.outbound(now, NET, &frame(multicast, mac(1))), Outbound::Flood(&all));
        assert_eq!(s.outbound(now, NET, &frame(mac(99), mac(1))), Outbound::Flood(&all), "unknown unicast");
        let c = s.counters();
        assert_eq!((c.forwarded, c.flooded, c.delivered), (1, 3, 0));
        assert!(c.dropped.is_empty());
    }

    #[test]
    fn outbound_drops_are_counted_by_reason() {
        let mut s = switch();
        let now = Instant::now();
        assert_eq!(s.outbound(now, OTHER_NET, &frame(mac(2), mac(1))), Outbound::Drop(DropReason::NoNetwork));
        assert_eq!(s.outbound(now, NET, &frame(mac(2), mac(1))[..13]), Outbound::Drop(DropReason::Malformed));
        assert_eq!(s.outbound(now, NET, &[]), Outbound::Drop(DropReason::Malformed));
        assert_eq!(s.outbound(now, NET, &frame(mac(2), mac(7))), Outbound::Drop(DropReason::ForeignSource));
        assert_eq!(s.outbound(now, NET, &frame(mac(2), mac(2))), Outbound::Drop(DropReason::ForeignSource));
        assert_eq!(s.outbound(now, NET, &frame(mac(1), mac(1))), Outbound::Drop(DropReason::ToSelf));
        s.set_network(&membership(OTHER_NET, mac(1)), []).unwrap();
        assert_eq!(s.outbound(now, OTHER_NET, &frame(MacAddr::BROADCAST, mac(1))), Outbound::Drop(DropReason::NoPeers));
        let out: Vec<_> = s.outbound_drops().filter(|(_, n)| *n > 0).collect();
        assert_eq!(
            out,
            [
                (DropReason::NoNetwork, 1),
                (DropReason::Malformed, 2),
                (DropReason::ForeignSource, 2),
                (DropReason::ToSelf, 1),
                (DropReason::NoPeers, 1)
            ]
        );
        assert!(s.inbound_drops().all(|(_, n)| n == 0));
        let labels: Vec<_> = s.counters().dropped;
        assert_eq!(
            labels,
            [("foreign_source", 2), ("malformed", 2), ("no_network", 1), ("no_peers", 1), ("to_self", 1)]
                .map(|(l, n)| (l.to_owned(), n))
        );
    }

    #[test]
    fn floods_are_capped_at_the_fanout_limit_and_counted() {
        let mut s = Switch::new(SwitchConfig { max_flood_fanout: 2, ..Default::default() });
        s.set_network(&membership(NET, mac(1)), (2..=5).map(|i| (node(&format!("p{i}")), mac(i)))).unwrap();
        let out = s.outbound(Instant::now(), NET, &frame(MacAddr::BROADCAST, mac(1)));
        assert_eq!(out, Outbound::Flood(&[node("p2"), node("p3")]));
        assert_eq!(s.counters().flooded, 1);
        assert_eq!(dropped(&s, FLOOD_TRUNCATED), 1);
    }

    #[test]
    fn inbound_accepts_members_frames_to_us_and_to_groups() {
        let mut s = switch();
        let now = Instant::now();
        assert_eq!(s.inbound(now, &node("a"), NET, &frame(mac(1), mac(2))), Inbound::Deliver);
        assert_eq!(s.inbound(now, &node("b"), NET, &frame(MacAddr::BROADCAST, mac(3))), Inbound::Deliver);
        assert_eq!(s.counters().delivered, 2);
    }

    #[test]
    fn inbound_drops_are_counted_by_reason() {
        let mut s = switch();
        let now = Instant::now();
        let cases = [
            (node("a"), OTHER_NET, frame(mac(1), mac(2)), DropReason::NoNetwork),
            (node("mallory"), NET, frame(mac(1), mac(2)), DropReason::NotMember),
            (node("a"), NET, frame(mac(1), mac(2))[..10].to_vec(), DropReason::Malformed),
            (node("a"), NET, frame(mac(1), mac(3)), DropReason::SpoofedSource),
            (node("a"), NET, frame(MacAddr::BROADCAST, mac(9)), DropReason::SpoofedSource),
            (node("a"), NET, frame(mac(3), mac(2)), DropReason::NotForUs),
        ];
        for (from, network, f, reason) in cases {
            assert_eq!(s.inbound(now, &from, network, &f), Inbound::Drop(reason), "{from} {reason:?}");
        }
        let counted: Vec<_> = s.inbound_drops().filter(|(_, n)| *n > 0).collect();
        assert_eq!(
            counted,
            [
                (DropReason::NoNetwork, 1),
                (DropReason::Malformed, 1),
                (DropReason::NotMember, 1),
                (DropReason::SpoofedSource, 2),
                (DropReason::NotForUs, 1)
            ]
        );
        assert_eq!(s.counters().delivered, 0);
        assert_eq!(dropped(&s, "spoofed_source"), 2);
        assert_eq!(DropReason::SpoofedSource.label(), "spoofed_source");
    }

    #[test]
    fn a_storming_member_is_bounded_without_hurting_its_unicast_or_other_members() {
        let mut s = Switch::new(SwitchConfig { flood_rate_per_peer: 10, flood_burst: 20, ..Default::default() });
        s.set_network(&membership(NET, mac(1)), [(node("a"), mac(2)), (node("b"), mac(3))]).unwrap();
        let t0 = Instant::now();
        let storm = frame(MacAddr::BROADCAST, mac(2));
        let delivered = (0..1000).filter(|_| s.inbound(t0, &node("a"), NET, &storm) == Inbound::Deliver).count();
        assert_eq!(delivered, 20, "the burst, then nothing");
        assert_eq!(dropped(&s, "storm"), 980);
        // Unicast from the storming peer and broadcasts from another peer still pass.
        assert_eq!(s.inbound(t0, &node("a"), NET, &frame(mac(1), mac(2))), Inbound::Deliver);
        assert_eq!(s.inbound(t0, &node("b"), NET, &frame(MacAddr::BROADCAST, mac(3))), Inbound::Deliver);
        // Refill at the configured rate over simulated time: 0.5 s buys 5 frames, 10 s at most the burst.
        let t1 = t0 + Duration::from_millis(500);
        let delivered = (0..100).filter(|_| s.inbound(t1, &node("a"), NET, &storm) == Inbound::Deliver).count();
        assert_eq!(delivered, 5);
        let t2 = t1 + Duration::from_secs(10);
        let delivered = (0..100).filter(|_| s.inbound(t2, &node("a"), NET, &storm) == Inbound::Deliver).count();
        assert_eq!(delivered, 20);
        // A clock that appears to go backwards refills nothing and does not panic.
        assert_eq!(s.inbound(t0, &node("a"), NET, &storm), Inbound::Drop(DropReason::Storm));
    }

    #[test]
    fn the_flood_budget_is_per_peer_across_networks() {
        let mut s = Switch::new(SwitchConfig { flood_rate_per_peer: 1, flood_burst: 3, ..Default::default() });
        s.set_network(&membership(NET, mac(1)), [(node("a"), mac(2))]).unwrap();
        s.set_network(&membership(OTHER_NET, mac(11)), [(node("a"), mac(12))]).unwrap();
        let now = Instant::now();
        let results: Vec<_> = [(NET, mac(2)), (OTHER_NET, mac(12)), (NET, mac(2)), (OTHER_NET, mac(12))]
            .iter()
            .map(|(net, src)| s.inbound(now, &node("a"), *net, &frame(MacAddr::BROADCAST, *src)))
            .collect();
        assert_eq!(results[..3], [Inbound::Deliver; 3]);
        assert_eq!(results[3], Inbound::Drop(DropReason::Storm));
    }

    #[test]
    fn frames_never_cross_networks() {
        // a is a member of NET only; b of OTHER_NET only.
        let mut s = Switch::new(SwitchConfig::default());
        s.set_network(&membership(NET, mac(1)), [(node("a"), mac(2))]).unwrap();
        s.set_network(&membership(OTHER_NET, mac(11)), [(node("b"), mac(12))]).unwrap();
        assert_eq!(s.networks().collect::<Vec<_>>(), [NET, OTHER_NET]);
        let now = Instant::now();
        // Inbound: a cannot send on OTHER_NET, even with b's MAC or to our OTHER_NET MAC.
        assert_eq!(
            s.inbound(now, &node("a"), OTHER_NET, &frame(mac(11), mac(2))),
            Inbound::Drop(DropReason::NotMember)
        );
        assert_eq!(
            s.inbound(now, &node("a"), OTHER_NET, &frame(mac(11), mac(12))),
            Inbound::Drop(DropReason::NotMember)
        );
        // On its own network, a frame to our MAC of the other network is not for us.
        assert_eq!(s.inbound(now, &node("a"), NET, &frame(mac(11), mac(2))), Inbound::Drop(DropReason::NotForUs));
        // Outbound: floods reach only that network's members; the other network's MACs are unknown here.
        let only_a = [node("a")];
        assert_eq!(s.outbound(now, NET, &frame(MacAddr::BROADCAST, mac(1))), Outbound::Flood(&only_a));
        assert_eq!(s.outbound(now, NET, &frame(mac(12), mac(1))), Outbound::Flood(&only_a));
        assert_eq!(s.outbound(now, OTHER_NET, &frame(mac(2), mac(11))), Outbound::Flood(&[node("b")]));
        // Our MAC of one network is foreign on the other.
        assert_eq!(s.outbound(now, NET, &frame(mac(2), mac(11))), Outbound::Drop(DropReason::ForeignSource));
        s.remove_network(OTHER_NET);
        assert_eq!(s.networks().collect::<Vec<_>>(), [NET]);
        assert_eq!(
            s.inbound(now, &node("b"), OTHER_NET, &frame(mac(11), mac(12))),
            Inbound::Drop(DropReason::NoNetwork)
        );
    }

    #[test]
    fn learning_refreshes_seeded_entries_which_age_out() {
        let mut s = switch();
        let t0 = Instant::now();
        let table = s.mac_table(NET, t0).unwrap();
        assert_eq!(
            table.iter().map(|e| (e.mac, e.node.0.as_str())).collect::<Vec<_>>(),
            [(mac(2), "a"), (mac(3), "b"), (mac(4), "c")]
        );
        assert!(table.iter().all(|e| e.last_seen.is_none()), "seeded, not yet heard from");
        assert_eq!(s.inbound(t0, &node("a"), NET, &frame(mac(1), mac(2))), Inbound::Deliver);
        // Refused frames teach nothing.
        assert_eq!(s.inbound(t0, &node("b"), NET, &frame(mac(9), mac(3))), Inbound::Drop(DropReason::NotForUs));
        let seen = |s: &Switch, at: Instant| {
            s.mac_table(NET, at)
                .unwrap()
                .into_iter()
                .filter_map(|e| e.last_seen.map(|t| (e.node.0, t)))
                .collect::<Vec<_>>()
        };
        assert_eq!(seen(&s, t0 + Duration::from_secs(299)), [("a".to_owned(), t0)]);
        assert_eq!(seen(&s, t0 + Duration::from_secs(300)), [], "aged out");
        // Ageing is observational: the netmap still says where the MAC lives.
        assert_eq!(
            s.outbound(t0 + Duration::from_secs(900), NET, &frame(mac(2), mac(1))),
            Outbound::Unicast(&node("a"))
        );
        assert!(s.mac_table(OTHER_NET, t0).is_none());
    }

    #[test]
    fn reconfiguring_a_network_replaces_its_members() {
        let mut s = switch();
        let t0 = Instant::now();
        for (from, src) in [("a", 2), ("b", 3)] {
            assert_eq!(s.inbound(t0, &node(from), NET, &frame(mac(1), mac(src))), Inbound::Deliver);
        }
        // c leaves, b gets a new MAC, d joins, a stays as it was.
        s.set_network(&membership(NET, mac(1)), [(node("d"), mac(5)), (node("a"), mac(2)), (node("b"), mac(6))])
            .unwrap();
        let table: Vec<_> =
            s.mac_table(NET, t0).unwrap().into_iter().map(|e| (e.node.0, e.mac, e.last_seen.is_some())).collect();
        assert_eq!(
            table,
            [("a".to_owned(), mac(2), true), ("b".to_owned(), mac(6), false), ("d".to_owned(), mac(5), false)]
        );
        assert_eq!(s.inbound(t0, &node("c"), NET, &frame(mac(1), mac(4))), Inbound::Drop(DropReason::NotMember));
        assert_eq!(s.inbound(t0, &node("b"), NET, &frame(mac(1), mac(3))), Inbound::Drop(DropReason::SpoofedSource));
        assert_eq!(s.outbound(t0, NET, &frame(mac(4), mac(1))), Outbound::Flood(&[node("a"), node("b"), node("d")]));
        assert_eq!(s.outbound(t0, NET, &frame(mac(6), mac(1))), Outbound::Unicast(&node("b")));
        // Our own MAC may change too.
        s.set_network(&membership(NET, mac(7)), [(node("a"), mac(2))]).unwrap();
        assert_eq!(s.outbound(t0, NET, &frame(mac(2), mac(1))), Outbound::Drop(DropReason::ForeignSource));
        assert_eq!(s.outbound(t0, NET, &frame(mac(2), mac(7))), Outbound::Unicast(&node("a")));
    }

    #[test]
    fn ambiguous_mac_assignments_are_refused_and_the_previous_configuration_kept() {
        let mut s = switch();
        let own = membership(NET, mac(1));
        let refused = [
            (vec![(node("x"), mac(1))], SwitchError::DuplicateMac { network: NET, mac: mac(1) }),
            (vec![(node("x"), mac(8)), (node("y"), mac(8))], SwitchError::DuplicateMac { network: NET, mac: mac(8) }),
            (
                vec![(node("x"), mac(8)), (node("x"), mac(9))],
                SwitchError::DuplicateMember { network: NET, node: node("x") },
            ),
            (vec![(node("x"), MacAddr::BROADCAST)], SwitchError::GroupMac { network: NET, mac: MacAddr::BROADCAST }),
        ];
        for (members, err) in refused {
            assert_eq!(s.set_network(&own, members), Err(err));
        }
        assert_eq!(
            s.set_network(&membership(NET, MacAddr::BROADCAST), []),
            Err(SwitchError::GroupMac { network: NET, mac: MacAddr::BROADCAST })
        );
        // The same pair listed twice is harmless.
        let mut fresh = Switch::new(SwitchConfig::default());
        fresh.set_network(&own, [(node("x"), mac(8)), (node("x"), mac(8))]).unwrap();
        assert_eq!(fresh.mac_table(NET, Instant::now()).unwrap().len(), 1);
        // The refusals left the first configuration in place.
        assert_eq!(s.outbound(Instant::now(), NET, &frame(mac(3), mac(1))), Outbound::Unicast(&node("b")));
    }

    #[test]
    fn departed_peers_rate_limit_state_is_forgotten() {
        let mut s = Switch::new(SwitchConfig { flood_burst: 1, flood_rate_per_peer: 0, ..Default::default() });
        s.set_network(&membership(NET, mac(1)), [(node("a"), mac(2))]).unwrap();
        let now = Instant::now();
        let bcast = frame(MacAddr::BROADCAST, mac(2));
        assert_eq!(s.inbound(now, &node("a"), NET, &bcast), Inbound::Deliver);
        assert_eq!(s.inbound(now, &node("a"), NET, &bcast), Inbound::Drop(DropReason::Storm));
        s.set_network(&membership(NET, mac(1)), []).unwrap();
        assert!(s.buckets.is_empty());
        s.set_network(&membership(NET, mac(1)), [(node("a"), mac(2))]).unwrap();
        assert_eq!(s.inbound(now, &node("a"), NET, &bcast), Inbound::Deliver, "a fresh bucket after rejoining");
    }
}
