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
        Switch {
            config,
            networks: BTreeMap::new(),
            buckets: HashMap::new(),
            counts: Counts::default(),
        }
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
            .map(|r| (r.label().to_owned(), self.counts.outbound_drops[r.index()] + self.counts.inbound_drops[r.index()]))
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
