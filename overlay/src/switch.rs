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
//! A frame from a peer must also carry only the addresses the controller gave that peer, so that no
//! member can make another member's traffic its own (ARP or neighbour-discovery cache poisoning, or
//! packets in another member's name). [`check_addresses`] holds the rule, per ethertype:
//!
//! - **ARP** (Ethernet/IPv4 only): the sender hardware address is the peer's MAC and the sender
//!   protocol address its IPv4 address, or 0.0.0.0 for an RFC 5227 probe of its own address.
//! - **IPv4**: the source is the peer's IPv4 address.
//! - **IPv6**: the source is the peer's link-local address, which is the modified EUI-64 of its MAC
//!   (fe80::/64; the agent configures its TAP devices to generate exactly that, see
//!   [`ipv6_link_local`]), or `::` for duplicate address detection (a neighbour solicitation for
//!   that same link-local) and MLD reports. The controller assigns no other IPv6 address. Neighbour
//!   discovery is held to the same rule: a neighbour advertisement's target is the sender's own
//!   link-local, link-layer address options carry its own MAC, and router advertisements and
//!   redirects are refused (no member is a router).
//! - **802.1Q / 802.1ad (QinQ) tagged frames** are refused: the inner frame would escape these
//!   checks, and a VLAN inside an overlay network would be a network the controller does not know.
//! - **Every other ethertype** (and 802.3 length frames such as STP) is refused: the overlay
//!   carries IPv4, IPv6 and ARP.
//!
//! **WireGuard gateways (v9).** A member the controller names a gateway of a network (see
//! [`Bridging`]) bridges WireGuard devices into it: its frames may also carry any of the network's
//! device addresses as their IPv4 source (IPv4 and ARP), and no other member's may. The gateway
//! speaks for its devices with its own MAC, [`gateway_mac`] of the member's (every member derives
//! it from the netmap): a gateway member's frames may carry that source MAC, with device addresses
//! only (no IPv6: devices have none), and unicast to it goes to that member. On the gateway's own
//! node, frames for a device (to the gateway MAC, or ARP for a device's address) go to the
//! network's local port ([`Inbound::Port`]) instead of the TAP device, and the switch delivers
//! between the local port and the TAP device ([`Outbound::Local`], [`Switch::from_port`]), so the
//! node's own kernel reaches the devices like any other member's.
//!
//! The checks apply to frames from peers, where they protect the receiver whatever the sender runs.
//! Frames from our own TAP are checked for their source MAC only: a node that wants to spoof can
//! change its own agent, so a sending-side check would protect no one; it would only hide a
//! misconfiguration from the fleet's counters, where receivers count it by reason.
//!
//! Architecture Invariant: a frame is only ever associated with the network it arrived on. There is
//! no path, in either direction, by which a frame of one network is forwarded or delivered on
//! another.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};
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
    /// The bucket's size: how many such frames a peer may send at once after being quiet. Default
    /// 4000.
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
    /// The frame is shorter than an Ethernet header, or its ARP, IPv4 or IPv6 header is cut short
    /// or invalid (the checks below could not read the addresses).
    Malformed,
    /// Outbound: the source MAC is not ours on that network (from the local port: not our
    /// [`gateway_mac`], or we are no gateway there). The TAP must not bridge other machines'
    /// frames into the overlay, since receivers would refuse them anyway.
    ForeignSource,
    /// Outbound: the destination is our own MAC; the kernel should not have sent it to the TAP.
    ToSelf,
    /// Outbound: a flood with no peer on the network to send it to.
    NoPeers,
    /// Inbound: the sender is not a member of the frame's network.
    NotMember,
    /// Inbound: the source MAC is not the one the controller assigned to the sender on that
    /// network (nor, for a gateway member, its [`gateway_mac`]).
    SpoofedSource,
    /// Inbound: a unicast frame for a MAC other than ours.
    NotForUs,
    /// Inbound: a broadcast or multicast frame beyond the sender's rate limit.
    Storm,
    /// Inbound: an ARP packet whose sender addresses are not the peer's assigned MAC and IPv4
    /// address (or a probe, from 0.0.0.0, for an address not its own).
    SpoofedArp,
    /// Inbound: an IPv4 packet whose source is not the peer's assigned address.
    SpoofedIpv4,
    /// Inbound: an IPv6 packet whose source is neither the peer's link-local address nor `::` for
    /// duplicate address detection or MLD.
    SpoofedIpv6,
    /// Inbound: IPv6 neighbour discovery claiming another's address or link-layer address, or a
    /// router advertisement or redirect.
    SpoofedNd,
    /// Inbound: an 802.1Q or 802.1ad (QinQ) tagged frame.
    VlanTagged,
    /// Inbound: an ethertype other than IPv4, IPv6 and ARP (or an 802.3 length field).
    OtherEthertype,
}

impl DropReason {
    /// Every reason, in declaration order (which is also the index into the counters).
    pub const ALL: [DropReason; 15] = [
        DropReason::NoNetwork,
        DropReason::Malformed,
        DropReason::ForeignSource,
        DropReason::ToSelf,
        DropReason::NoPeers,
        DropReason::NotMember,
        DropReason::SpoofedSource,
        DropReason::NotForUs,
        DropReason::Storm,
        DropReason::SpoofedArp,
        DropReason::SpoofedIpv4,
        DropReason::SpoofedIpv6,
        DropReason::SpoofedNd,
        DropReason::VlanTagged,
        DropReason::OtherEthertype,
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
            DropReason::SpoofedArp => "spoofed_arp",
            DropReason::SpoofedIpv4 => "spoofed_ipv4",
            DropReason::SpoofedIpv6 => "spoofed_ipv6",
            DropReason::SpoofedNd => "spoofed_nd",
            DropReason::VlanTagged => "vlan_tagged",
            DropReason::OtherEthertype => "other_ethertype",
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
    /// (v9) To this node's other end of the network: a frame from the TAP device goes to the
    /// local port (it is for the gateway's MAC), one from the local port to the TAP device.
    Local,
    /// (v9) [`Outbound::Flood`] to these peers, and also to this node's other end (a broadcast
    /// from a device reaches the node's kernel; the kernel's ARP for a device reaches the port).
    FloodAndLocal(&'s [NodeId]),
    /// Nowhere.
    Drop(DropReason),
}

/// What to do with a frame received from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// Write it to the network's TAP device.
    Deliver,
    /// Hand it to the network's local port (this node's WireGuard gateway): it is for a device.
    Port,
    /// (v9) Both: a broadcast about a device (an ARP request for it, or another gateway's
    /// gratuitous ARP for it, which the node's kernel must see to follow a failover).
    DeliverAndPort,
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
    /// Two members (or a member and this node) were assigned the same IPv4 address: both would be
    /// allowed to claim it, so the address check would have no single answer.
    #[error("network {network:?}: IPv4 address {address} assigned twice")]
    DuplicateAddress {
        /// The network.
        network: NetworkId,
        /// The address.
        address: Ipv4Addr,
    },
}

/// A peer's membership of one network as the switch holds it: the only MAC and IPv4 address it may
/// send from there (its IPv6 link-local address follows from the MAC).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    /// The peer.
    pub node: NodeId,
    /// Its controller-assigned MAC on the network.
    pub mac: MacAddr,
    /// Its controller-assigned IPv4 address on the network.
    pub address: Ipv4Addr,
}

/// (v9) Who speaks for a network's WireGuard devices: the gateway members, which alone may send
/// from the devices' addresses, and whether this node's local port serves them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bridging {
    /// The members that are gateways of the network.
    pub gateways: BTreeSet<NodeId>,
    /// The devices' addresses.
    pub devices: HashSet<Ipv4Addr>,
    /// This node is a gateway of the network: frames for a device go to its local port.
    pub local: bool,
}

/// (v9) The MAC a gateway member speaks for its WireGuard devices with, on a network where its own
/// MAC is `member`: the first octet's bit 2 flipped, locally administered and unicast. Every member
/// derives it from the netmap, so no message carries it; it is stable as long as the member's MAC
/// is, and never a controller-assigned MAC (those start 02:5e), so the node's TAP device and its
/// gateway are two stations the switch can tell apart.
pub fn gateway_mac(member: MacAddr) -> MacAddr {
    let mut m = member.0;
    m[0] = ((m[0] ^ 0x04) | 0x02) & !0x01;
    MacAddr(m)
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
    peer_addresses: Vec<Ipv4Addr>,
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
    /// (v9) WireGuard bridging per network; outlives netmap changes (it comes in its own message).
    bridging: BTreeMap<NetworkId, Bridging>,
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
fn take_flood_token(
    buckets: &mut HashMap<NodeId, Bucket>,
    config: &SwitchConfig,
    now: Instant,
    from: &NodeId,
) -> bool {
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
    take(buckets.entry(from.clone()).or_insert(Bucket {
        tokens: burst,
        refilled: now,
    }))
}

/// Where a frame from this node (TAP device or local port) goes among the peers: unicast to the
/// member whose MAC (or, for a gateway member, whose [`gateway_mac`]) is `dst`, else a flood
/// (`also_local`: to this node's other end too).
fn switch_to_peers<'n>(
    config: &SwitchConfig,
    counts: &mut Counts,
    net: &'n Network,
    bridging: Option<&Bridging>,
    dst: MacAddr,
    also_local: bool,
) -> Outbound<'n> {
    if !dst.is_group() {
        let gateway = || {
            bridging?
                .gateways
                .iter()
                .filter_map(|g| net.peers.binary_search(g).ok())
                .find(|&i| gateway_mac(net.peer_macs[i]) == dst)
        };
        if let Some(i) = net.by_mac.get(&dst).copied().or_else(gateway) {
            counts.forwarded += 1;
            return Outbound::Unicast(&net.peers[i]);
        }
    }
    if net.peers.is_empty() {
        if also_local {
            counts.flooded += 1;
            return Outbound::Local;
        }
        return counts.drop_outbound(DropReason::NoPeers);
    }
    let fanout = net.peers.len().min(config.max_flood_fanout.max(1));
    counts.flooded += 1;
    if fanout < net.peers.len() {
        counts.flood_truncated += 1;
    }
    let peers = &net.peers[..fanout];
    if also_local {
        Outbound::FloodAndLocal(peers)
    } else {
        Outbound::Flood(peers)
    }
}

/// Destination and source MAC of a frame, or `None` if it is shorter than an Ethernet header.
fn macs(frame: &[u8]) -> Option<(MacAddr, MacAddr)> {
    let (header, _) = frame.split_first_chunk::<ETHERNET_HEADER_LEN>()?;
    let [d0, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5, _, _] = *header;
    Some((
        MacAddr([d0, d1, d2, d3, d4, d5]),
        MacAddr([s0, s1, s2, s3, s4, s5]),
    ))
}

/// Ethertypes the address checks know.
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
/// 802.1Q, 802.1ad (QinQ) and the pre-standard QinQ tag.
const ETHERTYPE_TAGS: [u16; 3] = [0x8100, 0x88a8, 0x9100];

const IPPROTO_ICMPV6: u8 = 58;
/// Extension headers walked to find the upper-layer header: hop-by-hop, routing, fragment,
/// destination options.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
/// More extension headers than this before the upper layer is refused as malformed, so a chain
/// cannot hide a neighbour-discovery message from the check.
const MAX_IPV6_EXTENSION_HEADERS: usize = 8;

/// The IPv6 link-local address of `mac`: fe80::/64 with the modified EUI-64 interface identifier
/// (RFC 4291 appendix A), which is what Linux generates for an Ethernet device with
/// `addr_gen_mode` 0. The agent sets that mode on its TAP devices, so this is the one link-local
/// address a member sends from.
pub fn ipv6_link_local(mac: MacAddr) -> Ipv6Addr {
    let m = mac.0;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 0x02,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn array<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at + N)?.try_into().ok()
}

/// Whether a frame from a peer carries only that peer's addresses: `mac` and `address` are what the
/// controller assigned it (the source MAC has been checked already). See the module documentation
/// for the rule. Reads only fixed offsets and bounded option lists, and allocates nothing.
pub fn check_addresses(frame: &[u8], mac: MacAddr, address: Ipv4Addr) -> Result<(), DropReason> {
    check_addresses_bridged(frame, mac, address, None)
}

/// [`check_addresses`] for a gateway member: its frames may also carry one of `bridged` (the
/// network's device addresses) as their IPv4 source, in IPv4 and in ARP.
pub fn check_addresses_bridged(
    frame: &[u8],
    mac: MacAddr,
    address: Ipv4Addr,
    bridged: Option<&HashSet<Ipv4Addr>>,
) -> Result<(), DropReason> {
    let own = |a: Ipv4Addr| a == address || bridged.is_some_and(|b| b.contains(&a));
    check_frame(frame, mac, Some(address), own)
}

/// (v9) The check for a frame from a gateway member's [`gateway_mac`] (`mac`): it speaks for the
/// devices only, so its IPv4 and ARP carry one of `devices` and it sends no IPv6.
pub fn check_gateway_addresses(
    frame: &[u8],
    mac: MacAddr,
    devices: &HashSet<Ipv4Addr>,
) -> Result<(), DropReason> {
    check_frame(frame, mac, None, |a| devices.contains(&a))
}

/// The rule per ethertype; `member` is the sender's own address (`None`: a gateway's MAC, which
/// has no address of its own, makes no probes and sends no IPv6).
fn check_frame(
    frame: &[u8],
    mac: MacAddr,
    member: Option<Ipv4Addr>,
    own: impl Fn(Ipv4Addr) -> bool,
) -> Result<(), DropReason> {
    let ethertype = be16(frame, 12).ok_or(DropReason::Malformed)?;
    let payload = frame
        .get(ETHERNET_HEADER_LEN..)
        .ok_or(DropReason::Malformed)?;
    match ethertype {
        ETHERTYPE_ARP => check_arp(payload, mac, member, own),
        ETHERTYPE_IPV4 => check_ipv4(payload, own),
        ETHERTYPE_IPV6 if member.is_some() => check_ipv6(payload, mac),
        ETHERTYPE_IPV6 => Err(DropReason::SpoofedIpv6),
        t if ETHERTYPE_TAGS.contains(&t) => Err(DropReason::VlanTagged),
        _ => Err(DropReason::OtherEthertype),
    }
}

/// Whether a (checked) frame is for one of `devices`: ARP whose target is one, or IPv4 to one.
fn for_device(frame: &[u8], devices: &HashSet<Ipv4Addr>) -> bool {
    let target = match be16(frame, 12) {
        Some(ETHERTYPE_ARP) => array::<4>(frame, ETHERNET_HEADER_LEN + 24),
        Some(ETHERTYPE_IPV4) => array::<4>(frame, ETHERNET_HEADER_LEN + 16),
        _ => None,
    };
    target.is_some_and(|t| devices.contains(&Ipv4Addr::from(t)))
}

/// ARP for IPv4 over Ethernet (RFC 826): sender hardware address at 8, sender protocol address at
/// 14, target protocol address at 24.
fn check_arp(
    arp: &[u8],
    mac: MacAddr,
    address: Option<Ipv4Addr>,
    own: impl Fn(Ipv4Addr) -> bool,
) -> Result<(), DropReason> {
    let header: [u8; 8] = array(arp, 0).ok_or(DropReason::Malformed)?;
    // Ethernet (1), IPv4, 6-byte and 4-byte addresses, request (1) or reply (2).
    if header[..6] != [0, 1, 0x08, 0x00, 6, 4] || !matches!(header[6..], [0, 1] | [0, 2]) {
        return Err(DropReason::Malformed);
    }
    let sha: [u8; 6] = array(arp, 8).ok_or(DropReason::Malformed)?;
    let spa = Ipv4Addr::from(array::<4>(arp, 14).ok_or(DropReason::Malformed)?);
    let tpa = Ipv4Addr::from(array::<4>(arp, 24).ok_or(DropReason::Malformed)?);
    let own_probe = spa.is_unspecified() && Some(tpa) == address;
    if sha != mac.0 || (!own(spa) && !own_probe) {
        return Err(DropReason::SpoofedArp);
    }
    Ok(())
}

fn check_ipv4(ip: &[u8], own: impl Fn(Ipv4Addr) -> bool) -> Result<(), DropReason> {
    let first = *ip.first().ok_or(DropReason::Malformed)?;
    if first >> 4 != 4 || first & 0x0f < 5 {
        return Err(DropReason::Malformed);
    }
    let source = Ipv4Addr::from(array::<4>(ip, 12).ok_or(DropReason::Malformed)?);
    if !own(source) {
        return Err(DropReason::SpoofedIpv4);
    }
    Ok(())
}

/// What follows the IPv6 header and its extension headers.
enum Upper<'a> {
    /// An ICMPv6 message (the rest of the packet).
    Icmpv6(&'a [u8]),
    /// Another protocol, or a fragment after the first (whose upper-layer header is elsewhere).
    Other,
}

/// Walks the extension headers after the fixed IPv6 header (`next` is its Next Header field).
fn ipv6_upper(mut next: u8, mut rest: &[u8]) -> Result<Upper<'_>, DropReason> {
    for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
        match next {
            IPPROTO_ICMPV6 => return Ok(Upper::Icmpv6(rest)),
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let len = (usize::from(*rest.get(1).ok_or(DropReason::Malformed)?) + 1) * 8;
                next = rest[0];
                rest = rest.get(len..).ok_or(DropReason::Malformed)?;
            }
            IPV6_FRAGMENT => {
                let offset = be16(rest, 2).ok_or(DropReason::Malformed)? >> 3;
                if offset != 0 {
                    return Ok(Upper::Other);
                }
                next = rest[0];
                rest = rest.get(8..).ok_or(DropReason::Malformed)?;
            }
            _ => return Ok(Upper::Other),
        }
    }
    Err(DropReason::Malformed)
}

/// ICMPv6 types the check looks into.
const ICMPV6_MLD_REPORT: u8 = 131;
const ICMPV6_MLD2_REPORT: u8 = 143;
const ND_ROUTER_SOLICIT: u8 = 133;
const ND_ROUTER_ADVERT: u8 = 134;
const ND_NEIGHBOUR_SOLICIT: u8 = 135;
const ND_NEIGHBOUR_ADVERT: u8 = 136;
const ND_REDIRECT: u8 = 137;
/// Neighbour-discovery options that carry a link-layer address: source (1) and target (2).
const ND_OPT_SOURCE_LL: u8 = 1;
const ND_OPT_TARGET_LL: u8 = 2;

fn check_ipv6(ip: &[u8], mac: MacAddr) -> Result<(), DropReason> {
    let header: [u8; 40] = array(ip, 0).ok_or(DropReason::Malformed)?;
    if header[0] >> 4 != 6 {
        return Err(DropReason::Malformed);
    }
    // Bound the packet by its payload length, so Ethernet padding is never read as options.
    let payload_len = usize::from(u16::from_be_bytes([header[4], header[5]]));
    let body = &ip[40..];
    let body = if payload_len == 0 {
        body
    } else {
        body.get(..payload_len).ok_or(DropReason::Malformed)?
    };
    let source = Ipv6Addr::from(array::<16>(&header, 8).ok_or(DropReason::Malformed)?);
    let link_local = ipv6_link_local(mac);
    let unspecified = source.is_unspecified();
    if source != link_local && !unspecified {
        return Err(DropReason::SpoofedIpv6);
    }
    let icmp = match ipv6_upper(header[6], body)? {
        Upper::Icmpv6(icmp) => icmp,
        // From `::` only DAD and MLD, both ICMPv6; from the link-local anything but ND goes.
        Upper::Other if unspecified => return Err(DropReason::SpoofedIpv6),
        Upper::Other => return Ok(()),
    };
    let kind = *icmp.first().ok_or(DropReason::Malformed)?;
    if unspecified
        && !matches!(
            kind,
            ND_NEIGHBOUR_SOLICIT | ICMPV6_MLD_REPORT | ICMPV6_MLD2_REPORT
        )
    {
        return Err(DropReason::SpoofedIpv6);
    }
    match kind {
        ND_ROUTER_ADVERT | ND_REDIRECT => Err(DropReason::SpoofedNd),
        ND_ROUTER_SOLICIT => check_nd_options(icmp.get(8..).ok_or(DropReason::Malformed)?, mac),
        ND_NEIGHBOUR_SOLICIT | ND_NEIGHBOUR_ADVERT => {
            let target = Ipv6Addr::from(array::<16>(icmp, 8).ok_or(DropReason::Malformed)?);
            // An advertisement may only be for the sender's own address; a solicitation from `::`
            // is DAD, which only probes the sender's own address.
            if (kind == ND_NEIGHBOUR_ADVERT || unspecified) && target != link_local {
                return Err(DropReason::SpoofedNd);
            }
            check_nd_options(&icmp[24..], mac)
        }
        _ => Ok(()),
    }
}

/// Neighbour-discovery options (RFC 4861 4.6): every link-layer address option names the sender's
/// MAC. A zero-length option is invalid (receivers must discard the packet).
fn check_nd_options(mut options: &[u8], mac: MacAddr) -> Result<(), DropReason> {
    while !options.is_empty() {
        let [kind, len] = array::<2>(options, 0).ok_or(DropReason::Malformed)?;
        let len = usize::from(len) * 8;
        let option = options
            .get(..len)
            .filter(|_| len > 0)
            .ok_or(DropReason::Malformed)?;
        if matches!(kind, ND_OPT_SOURCE_LL | ND_OPT_TARGET_LL)
            && option.get(2..8) != Some(&mac.0[..])
        {
            return Err(DropReason::SpoofedNd);
        }
        options = &options[len..];
    }
    Ok(())
}

impl Switch {
    /// An empty switch: no networks, so every frame is dropped as `no_network` until
    /// [`Switch::set_network`] is called.
    pub fn new(config: SwitchConfig) -> Self {
        Switch {
            config,
            networks: BTreeMap::new(),
            buckets: HashMap::new(),
            bridging: BTreeMap::new(),
            counts: Counts::default(),
        }
    }

    /// Configures one network from the netmap: our MAC there and each peer member's assigned MAC
    /// and IPv4 address.
    ///
    /// `members` replaces the network's previous member set; peers that left are forgotten with
    /// their MAC table rows, and peers that stay keep their last-seen time if their MAC is
    /// unchanged. Refused, keeping the previous configuration, if the MACs are not unique unicast
    /// addresses or the IPv4 addresses are not unique, because then unicast and the source checks
    /// would have no single answer.
    pub fn set_network(
        &mut self,
        membership: &NetworkMembership,
        members: impl IntoIterator<Item = Member>,
    ) -> Result<(), SwitchError> {
        let network = membership.id;
        let own_mac = membership.mac;
        if own_mac.is_group() {
            return Err(SwitchError::GroupMac {
                network,
                mac: own_mac,
            });
        }
        let mut sorted: Vec<Member> = members.into_iter().collect();
        sorted.sort();
        sorted.dedup();
        let mut by_mac = HashMap::with_capacity(sorted.len());
        let mut addresses = std::collections::HashSet::with_capacity(sorted.len() + 1);
        addresses.insert(membership.address);
        for (index, m) in sorted.iter().enumerate() {
            if index > 0 && sorted[index - 1].node == m.node {
                return Err(SwitchError::DuplicateMember {
                    network,
                    node: m.node.clone(),
                });
            }
            if m.mac.is_group() {
                return Err(SwitchError::GroupMac {
                    network,
                    mac: m.mac,
                });
            }
            if m.mac == own_mac || by_mac.insert(m.mac, index).is_some() {
                return Err(SwitchError::DuplicateMac {
                    network,
                    mac: m.mac,
                });
            }
            if !addresses.insert(m.address) {
                return Err(SwitchError::DuplicateAddress {
                    network,
                    address: m.address,
                });
            }
        }
        let previous = self.networks.get(&network);
        let last_seen = sorted
            .iter()
            .map(|m| {
                let prev = previous?;
                let i = prev.peers.binary_search(&m.node).ok()?;
                if prev.peer_macs[i] == m.mac {
                    prev.last_seen[i]
                } else {
                    None
                }
            })
            .collect();
        let peer_macs = sorted.iter().map(|m| m.mac).collect();
        let peer_addresses = sorted.iter().map(|m| m.address).collect();
        let peers = sorted.into_iter().map(|m| m.node).collect();
        self.networks.insert(
            network,
            Network {
                own_mac,
                peers,
                peer_macs,
                peer_addresses,
                last_seen,
                by_mac,
            },
        );
        self.forget_departed_buckets();
        Ok(())
    }

    /// (v9) Sets who speaks for `network`'s WireGuard devices (replacing the previous setting); an
    /// empty one removes it.
    pub fn set_bridging(&mut self, network: NetworkId, bridging: Bridging) {
        if bridging == Bridging::default() {
            self.bridging.remove(&network);
        } else {
            self.bridging.insert(network, bridging);
        }
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

    /// Rate-limit state is per peer across networks, so it lives until the peer shares none with
    /// us.
    fn forget_departed_buckets(&mut self) {
        let networks = &self.networks;
        self.buckets.retain(|node, _| {
            networks
                .values()
                .any(|n| n.peers.binary_search(node).is_ok())
        });
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
        let bridging = self.bridging.get(&network);
        let local = bridging.filter(|b| b.local);
        if local.is_some() && dst == gateway_mac(net.own_mac) {
            self.counts.forwarded += 1;
            return Outbound::Local;
        }
        // The kernel's ARP for a device: the local port answers if the device is connected here.
        let also_local = dst.is_group() && local.is_some_and(|b| for_device(frame, &b.devices));
        switch_to_peers(
            &self.config,
            &mut self.counts,
            net,
            bridging,
            dst,
            also_local,
        )
    }

    /// (v9) Decides where a frame from `network`'s local port (this node's WireGuard gateway)
    /// goes: like a frame from the TAP device, but from our [`gateway_mac`], and to the TAP device
    /// as well ([`Outbound::Local`]) when it is for this node or a broadcast.
    pub fn from_port(&mut self, network: NetworkId, frame: &[u8]) -> Outbound<'_> {
        let Some(net) = self.networks.get(&network) else {
            return self.counts.drop_outbound(DropReason::NoNetwork);
        };
        let Some((dst, src)) = macs(frame) else {
            return self.counts.drop_outbound(DropReason::Malformed);
        };
        let bridging = self.bridging.get(&network);
        if bridging.is_none_or(|b| !b.local) || src != gateway_mac(net.own_mac) {
            return self.counts.drop_outbound(DropReason::ForeignSource);
        }
        if dst == src {
            return self.counts.drop_outbound(DropReason::ToSelf);
        }
        if dst == net.own_mac {
            self.counts.forwarded += 1;
            return Outbound::Local;
        }
        let also_local = dst.is_group();
        switch_to_peers(
            &self.config,
            &mut self.counts,
            net,
            bridging,
            dst,
            also_local,
        )
    }

    /// Decides whether a frame that peer `from` sent on `network` may be written to that network's
    /// TAP device, and records when its source MAC was last heard from.
    pub fn inbound(
        &mut self,
        now: Instant,
        from: &NodeId,
        network: NetworkId,
        frame: &[u8],
    ) -> Inbound {
        let Some(net) = self.networks.get_mut(&network) else {
            return self.counts.drop_inbound(DropReason::NoNetwork);
        };
        let Ok(sender) = net.peers.binary_search(from) else {
            return self.counts.drop_inbound(DropReason::NotMember);
        };
        let Some((dst, src)) = macs(frame) else {
            return self.counts.drop_inbound(DropReason::Malformed);
        };
        let bridging = self.bridging.get(&network);
        let bridged = bridging
            .filter(|b| b.gateways.contains(from))
            .map(|b| &b.devices);
        let member_mac = net.peer_macs[sender];
        let checked = match bridged {
            Some(devices) if src != member_mac && src == gateway_mac(member_mac) => {
                check_gateway_addresses(frame, src, devices)
            }
            _ if src != member_mac => {
                return self.counts.drop_inbound(DropReason::SpoofedSource);
            }
            _ => check_addresses_bridged(frame, src, net.peer_addresses[sender], bridged),
        };
        if let Err(reason) = checked {
            tracing::debug!(peer = %from, network = network.0, reason = reason.label(), "frame from a peer dropped");
            return self.counts.drop_inbound(reason);
        }
        let local = bridging.filter(|b| b.local);
        let to_gateway = local.is_some() && dst == gateway_mac(net.own_mac);
        if dst.is_group() {
            let accepted = take_flood_token(&mut self.buckets, &self.config, now, from);
            if !accepted {
                return self.counts.drop_inbound(DropReason::Storm);
            }
        } else if dst != net.own_mac && !to_gateway {
            return self.counts.drop_inbound(DropReason::NotForUs);
        }
        net.last_seen[sender] = Some(now);
        self.counts.delivered += 1;
        match local {
            Some(_) if to_gateway => Inbound::Port,
            Some(b) if for_device(frame, &b.devices) => {
                if dst.is_group() {
                    Inbound::DeliverAndPort
                } else {
                    Inbound::Port
                }
            }
            _ => Inbound::Deliver,
        }
    }

    /// A network's MAC table, in peer order; `None` if the network is not configured.
    pub fn mac_table(&self, network: NetworkId, now: Instant) -> Option<Vec<MacTableEntry>> {
        let net = self.networks.get(&network)?;
        let fresh = |seen: Option<Instant>| {
            seen.filter(|t| now.saturating_duration_since(*t) < self.config.mac_age)
        };
        Some(
            net.peers
                .iter()
                .zip(&net.peer_macs)
                .zip(&net.last_seen)
                .map(|((node, mac), seen)| MacTableEntry {
                    mac: *mac,
                    node: node.clone(),
                    last_seen: fresh(*seen),
                })
                .collect(),
        )
    }

    /// Datapath counters since the switch was created; drops of both directions are summed per
    /// label, sorted by label, and only reasons that occurred are listed.
    pub fn counters(&self) -> OverlayCounters {
        let mut dropped: Vec<(String, u64)> = DropReason::ALL
            .iter()
            .map(|r| {
                (
                    r.label().to_owned(),
                    self.counts.outbound_drops[r.index()] + self.counts.inbound_drops[r.index()],
                )
            })
            .chain(std::iter::once((
                FLOOD_TRUNCATED.to_owned(),
                self.counts.flood_truncated,
            )))
            .filter(|(_, n)| *n > 0)
            .collect();
        dropped.sort();
        let c = &self.counts;
        OverlayCounters {
            forwarded: c.forwarded,
            flooded: c.flooded,
            delivered: c.delivered,
            dropped,
        }
    }

    /// Frames from our TAP devices dropped, by reason (every reason, zeros included).
    pub fn outbound_drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.counts.outbound_drops[r.index()]))
    }

    /// Frames from peers dropped, by reason (every reason, zeros included).
    pub fn inbound_drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.counts.inbound_drops[r.index()]))
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
            address: ip(own),
            mtu: 1500,
        }
    }

    /// The address that goes with `mac` in these tests: 10.0.0.<last byte>.
    fn ip(mac: MacAddr) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, mac.0[5])
    }

    /// Configures a network whose members have the addresses [`ip`] gives their MACs.
    fn set(
        s: &mut Switch,
        membership: &NetworkMembership,
        members: impl IntoIterator<Item = (NodeId, MacAddr)>,
    ) -> Result<(), SwitchError> {
        s.set_network(
            membership,
            members.into_iter().map(|(node, mac)| Member {
                node,
                mac,
                address: ip(mac),
            }),
        )
    }

    /// An IPv4 frame from `src` (and its address) to `dst`.
    fn frame(dst: MacAddr, src: MacAddr) -> Vec<u8> {
        let mut f = Vec::with_capacity(60);
        f.extend(dst.0);
        f.extend(src.0);
        f.extend([0x08, 0x00]);
        f.extend([0x45, 0, 0, 46, 0, 0, 0, 0, 64, 17, 0, 0]);
        f.extend(ip(src).octets());
        f.extend([10, 0, 0, 1]);
        f.resize(60, 0xab);
        f
    }

    /// Us at mac(1) on NET with peers a (mac 2), b (mac 3), c (mac 4).
    fn switch() -> Switch {
        let mut s = Switch::new(SwitchConfig::default());
        set(
            &mut s,
            &membership(NET, mac(1)),
            [
                (node("a"), mac(2)),
                (node("b"), mac(3)),
                (node("c"), mac(4)),
            ],
        )
        .unwrap();
        s
    }

    fn dropped(s: &Switch, label: &str) -> u64 {
        s.counters()
            .dropped
            .iter()
            .find(|(l, _)| l == label)
            .map_or(0, |(_, n)| *n)
    }

    #[test]
    fn outbound_unicast_goes_to_the_owner_and_floods_go_to_every_member() {
        let mut s = switch();
        let now = Instant::now();
        assert_eq!(
            s.outbound(now, NET, &frame(mac(3), mac(1))),
            Outbound::Unicast(&node("b"))
        );
        let all = [node("a"), node("b"), node("c")];
        assert_eq!(
            s.outbound(now, NET, &frame(MacAddr::BROADCAST, mac(1))),
            Outbound::Flood(&all)
        );
        let multicast = MacAddr([0x01, 0x00, 0x5e, 0, 0, 0xfb]);
        assert_eq!(
            s.outbound(now, NET, &frame(multicast, mac(1))),
            Outbound::Flood(&all)
        );
        assert_eq!(
            s.outbound(now, NET, &frame(mac(99), mac(1))),
            Outbound::Flood(&all),
            "unknown unicast"
        );
        let c = s.counters();
        assert_eq!((c.forwarded, c.flooded, c.delivered), (1, 3, 0));
        assert!(c.dropped.is_empty());
    }

    #[test]
    fn outbound_drops_are_counted_by_reason() {
        let mut s = switch();
        let now = Instant::now();
        assert_eq!(
            s.outbound(now, OTHER_NET, &frame(mac(2), mac(1))),
            Outbound::Drop(DropReason::NoNetwork)
        );
        assert_eq!(
            s.outbound(now, NET, &frame(mac(2), mac(1))[..13]),
            Outbound::Drop(DropReason::Malformed)
        );
        assert_eq!(
            s.outbound(now, NET, &[]),
            Outbound::Drop(DropReason::Malformed)
        );
        assert_eq!(
            s.outbound(now, NET, &frame(mac(2), mac(7))),
            Outbound::Drop(DropReason::ForeignSource)
        );
        assert_eq!(
            s.outbound(now, NET, &frame(mac(2), mac(2))),
            Outbound::Drop(DropReason::ForeignSource)
        );
        assert_eq!(
            s.outbound(now, NET, &frame(mac(1), mac(1))),
            Outbound::Drop(DropReason::ToSelf)
        );
        set(&mut s, &membership(OTHER_NET, mac(1)), []).unwrap();
        assert_eq!(
            s.outbound(now, OTHER_NET, &frame(MacAddr::BROADCAST, mac(1))),
            Outbound::Drop(DropReason::NoPeers)
        );
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
            [
                ("foreign_source", 2),
                ("malformed", 2),
                ("no_network", 1),
                ("no_peers", 1),
                ("to_self", 1)
            ]
            .map(|(l, n)| (l.to_owned(), n))
        );
    }

    #[test]
    fn floods_are_capped_at_the_fanout_limit_and_counted() {
        let mut s = Switch::new(SwitchConfig {
            max_flood_fanout: 2,
            ..Default::default()
        });
        set(
            &mut s,
            &membership(NET, mac(1)),
            (2..=5).map(|i| (node(&format!("p{i}")), mac(i))),
        )
        .unwrap();
        let out = s.outbound(Instant::now(), NET, &frame(MacAddr::BROADCAST, mac(1)));
        assert_eq!(out, Outbound::Flood(&[node("p2"), node("p3")]));
        assert_eq!(s.counters().flooded, 1);
        assert_eq!(dropped(&s, FLOOD_TRUNCATED), 1);
    }

    #[test]
    fn inbound_accepts_members_frames_to_us_and_to_groups() {
        let mut s = switch();
        let now = Instant::now();
        assert_eq!(
            s.inbound(now, &node("a"), NET, &frame(mac(1), mac(2))),
            Inbound::Deliver
        );
        assert_eq!(
            s.inbound(now, &node("b"), NET, &frame(MacAddr::BROADCAST, mac(3))),
            Inbound::Deliver
        );
        assert_eq!(s.counters().delivered, 2);
    }

    #[test]
    fn inbound_drops_are_counted_by_reason() {
        let mut s = switch();
        let now = Instant::now();
        let cases = [
            (
                node("a"),
                OTHER_NET,
                frame(mac(1), mac(2)),
                DropReason::NoNetwork,
            ),
            (
                node("mallory"),
                NET,
                frame(mac(1), mac(2)),
                DropReason::NotMember,
            ),
            (
                node("a"),
                NET,
                frame(mac(1), mac(2))[..10].to_vec(),
                DropReason::Malformed,
            ),
            (
                node("a"),
                NET,
                frame(mac(1), mac(3)),
                DropReason::SpoofedSource,
            ),
            (
                node("a"),
                NET,
                frame(MacAddr::BROADCAST, mac(9)),
                DropReason::SpoofedSource,
            ),
            (node("a"), NET, frame(mac(3), mac(2)), DropReason::NotForUs),
        ];
        for (from, network, f, reason) in cases {
            assert_eq!(
                s.inbound(now, &from, network, &f),
                Inbound::Drop(reason),
                "{from} {reason:?}"
            );
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
        let mut s = Switch::new(SwitchConfig {
            flood_rate_per_peer: 10,
            flood_burst: 20,
            ..Default::default()
        });
        set(
            &mut s,
            &membership(NET, mac(1)),
            [(node("a"), mac(2)), (node("b"), mac(3))],
        )
        .unwrap();
        let t0 = Instant::now();
        let storm = frame(MacAddr::BROADCAST, mac(2));
        let delivered = (0..1000)
            .filter(|_| s.inbound(t0, &node("a"), NET, &storm) == Inbound::Deliver)
            .count();
        assert_eq!(delivered, 20, "the burst, then nothing");
        assert_eq!(dropped(&s, "storm"), 980);
        // Unicast from the storming peer and broadcasts from another peer still pass.
        assert_eq!(
            s.inbound(t0, &node("a"), NET, &frame(mac(1), mac(2))),
            Inbound::Deliver
        );
        assert_eq!(
            s.inbound(t0, &node("b"), NET, &frame(MacAddr::BROADCAST, mac(3))),
            Inbound::Deliver
        );
        // Refill at the configured rate over simulated time: 0.5 s buys 5 frames, 10 s at most the
        // burst.
        let t1 = t0 + Duration::from_millis(500);
        let delivered = (0..100)
            .filter(|_| s.inbound(t1, &node("a"), NET, &storm) == Inbound::Deliver)
            .count();
        assert_eq!(delivered, 5);
        let t2 = t1 + Duration::from_secs(10);
        let delivered = (0..100)
            .filter(|_| s.inbound(t2, &node("a"), NET, &storm) == Inbound::Deliver)
            .count();
        assert_eq!(delivered, 20);
        // A clock that appears to go backwards refills nothing and does not panic.
        assert_eq!(
            s.inbound(t0, &node("a"), NET, &storm),
            Inbound::Drop(DropReason::Storm)
        );
    }

    #[test]
    fn the_flood_budget_is_per_peer_across_networks() {
        let mut s = Switch::new(SwitchConfig {
            flood_rate_per_peer: 1,
            flood_burst: 3,
            ..Default::default()
        });
        set(&mut s, &membership(NET, mac(1)), [(node("a"), mac(2))]).unwrap();
        set(
            &mut s,
            &membership(OTHER_NET, mac(11)),
            [(node("a"), mac(12))],
        )
        .unwrap();
        let now = Instant::now();
        let results: Vec<_> = [
            (NET, mac(2)),
            (OTHER_NET, mac(12)),
            (NET, mac(2)),
            (OTHER_NET, mac(12)),
        ]
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
        set(&mut s, &membership(NET, mac(1)), [(node("a"), mac(2))]).unwrap();
        set(
            &mut s,
            &membership(OTHER_NET, mac(11)),
            [(node("b"), mac(12))],
        )
        .unwrap();
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
        assert_eq!(
            s.inbound(now, &node("a"), NET, &frame(mac(11), mac(2))),
            Inbound::Drop(DropReason::NotForUs)
        );
        // Outbound: floods reach only that network's members; the other network's MACs are unknown
        // here.
        let only_a = [node("a")];
        assert_eq!(
            s.outbound(now, NET, &frame(MacAddr::BROADCAST, mac(1))),
            Outbound::Flood(&only_a)
        );
        assert_eq!(
            s.outbound(now, NET, &frame(mac(12), mac(1))),
            Outbound::Flood(&only_a)
        );
        assert_eq!(
            s.outbound(now, OTHER_NET, &frame(mac(2), mac(11))),
            Outbound::Flood(&[node("b")])
        );
        // Our MAC of one network is foreign on the other.
        assert_eq!(
            s.outbound(now, NET, &frame(mac(2), mac(11))),
            Outbound::Drop(DropReason::ForeignSource)
        );
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
            table
                .iter()
                .map(|e| (e.mac, e.node.0.as_str()))
                .collect::<Vec<_>>(),
            [(mac(2), "a"), (mac(3), "b"), (mac(4), "c")]
        );
        assert!(
            table.iter().all(|e| e.last_seen.is_none()),
            "seeded, not yet heard from"
        );
        assert_eq!(
            s.inbound(t0, &node("a"), NET, &frame(mac(1), mac(2))),
            Inbound::Deliver
        );
        // Refused frames teach nothing.
        assert_eq!(
            s.inbound(t0, &node("b"), NET, &frame(mac(9), mac(3))),
            Inbound::Drop(DropReason::NotForUs)
        );
        let seen = |s: &Switch, at: Instant| {
            s.mac_table(NET, at)
                .unwrap()
                .into_iter()
                .filter_map(|e| e.last_seen.map(|t| (e.node.0, t)))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            seen(&s, t0 + Duration::from_secs(299)),
            [("a".to_owned(), t0)]
        );
        assert_eq!(seen(&s, t0 + Duration::from_secs(300)), [], "aged out");
        // Ageing is observational: the netmap still says where the MAC lives.
        assert_eq!(
            s.outbound(t0 + Duration::from_secs(900), NET, &frame(mac(2), mac(1))),
            Outbound::Unicast(&node("a"))
        );
        assert!(s.mac_table(OTHER_NET, t0).is_none());
    }

    #[test]
    fn unicast_stops_flooding_as_soon_as_the_destination_mac_is_known() {
        let mut s = switch();
        let t0 = Instant::now();
        let to_e = frame(mac(8), mac(1));
        // e is not a member yet: its MAC is unknown unicast and floods.
        assert!(matches!(s.outbound(t0, NET, &to_e), Outbound::Flood(_)));
        set(
            &mut s,
            &membership(NET, mac(1)),
            [
                (node("a"), mac(2)),
                (node("b"), mac(3)),
                (node("c"), mac(4)),
                (node("e"), mac(8)),
            ],
        )
        .unwrap();
        // Known from the netmap: one peer, no flood, however many frames follow.
        for _ in 0..100 {
            assert_eq!(s.outbound(t0, NET, &to_e), Outbound::Unicast(&node("e")));
        }
        let c = s.counters();
        assert_eq!((c.flooded, c.forwarded), (1, 100));
    }

    #[test]
    fn reconfiguring_a_network_replaces_its_members() {
        let mut s = switch();
        let t0 = Instant::now();
        for (from, src) in [("a", 2), ("b", 3)] {
            assert_eq!(
                s.inbound(t0, &node(from), NET, &frame(mac(1), mac(src))),
                Inbound::Deliver
            );
        }
        // c leaves, b gets a new MAC, d joins, a stays as it was.
        set(
            &mut s,
            &membership(NET, mac(1)),
            [
                (node("d"), mac(5)),
                (node("a"), mac(2)),
                (node("b"), mac(6)),
            ],
        )
        .unwrap();
        let table: Vec<_> = s
            .mac_table(NET, t0)
            .unwrap()
            .into_iter()
            .map(|e| (e.node.0, e.mac, e.last_seen.is_some()))
            .collect();
        assert_eq!(
            table,
            [
                ("a".to_owned(), mac(2), true),
                ("b".to_owned(), mac(6), false),
                ("d".to_owned(), mac(5), false)
            ]
        );
        assert_eq!(
            s.inbound(t0, &node("c"), NET, &frame(mac(1), mac(4))),
            Inbound::Drop(DropReason::NotMember)
        );
        assert_eq!(
            s.inbound(t0, &node("b"), NET, &frame(mac(1), mac(3))),
            Inbound::Drop(DropReason::SpoofedSource)
        );
        assert_eq!(
            s.outbound(t0, NET, &frame(mac(4), mac(1))),
            Outbound::Flood(&[node("a"), node("b"), node("d")])
        );
        assert_eq!(
            s.outbound(t0, NET, &frame(mac(6), mac(1))),
            Outbound::Unicast(&node("b"))
        );
        // Our own MAC may change too.
        set(&mut s, &membership(NET, mac(7)), [(node("a"), mac(2))]).unwrap();
        assert_eq!(
            s.outbound(t0, NET, &frame(mac(2), mac(1))),
            Outbound::Drop(DropReason::ForeignSource)
        );
        assert_eq!(
            s.outbound(t0, NET, &frame(mac(2), mac(7))),
            Outbound::Unicast(&node("a"))
        );
    }

    /// `payload` after an Ethernet header with `ethertype`, padded to the 60-byte minimum.
    fn eth(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(60.max(14 + payload.len()));
        f.extend(dst.0);
        f.extend(src.0);
        f.extend(ethertype.to_be_bytes());
        f.extend(payload);
        f.resize(f.len().max(60), 0);
        f
    }

    /// An ARP packet for IPv4 over Ethernet.
    fn arp(op: u16, sha: MacAddr, spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
        let mut a = vec![0, 1, 0x08, 0x00, 6, 4];
        a.extend(op.to_be_bytes());
        a.extend(sha.0);
        a.extend(spa.octets());
        a.extend([0; 6]);
        a.extend(tpa.octets());
        a
    }

    /// An IPv6 packet (hop limit 255) with `body` after the fixed header.
    fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, body: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend((body.len() as u16).to_be_bytes());
        p.extend([next, 255]);
        p.extend(src.octets());
        p.extend(dst.octets());
        p.extend(body);
        p
    }

    /// An ICMPv6 neighbour solicitation (135) or advertisement (136) for `target`, with link-layer
    /// address options (type, MAC).
    fn nd(kind: u8, target: Ipv6Addr, options: &[(u8, MacAddr)]) -> Vec<u8> {
        let mut m = vec![kind, 0, 0, 0, 0x60, 0, 0, 0];
        m.extend(target.octets());
        for (t, mac) in options {
            m.extend([*t, 1]);
            m.extend(mac.0);
        }
        m
    }

    /// An IPv6 frame from peer `src` (its MAC) with source address `from`.
    fn v6_frame(src: MacAddr, from: Ipv6Addr, next: u8, body: &[u8]) -> Vec<u8> {
        eth(
            MacAddr([0x33, 0x33, 0, 0, 0, 1]),
            src,
            ETHERTYPE_IPV6,
            &ipv6(from, "ff02::1".parse().unwrap(), next, body),
        )
    }

    #[test]
    fn link_local_addresses_are_the_modified_eui64_of_the_mac() {
        let qemu: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(
            ipv6_link_local(qemu),
            "fe80::5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            ipv6_link_local(mac(2)),
            "fe80::5e:ff:fe00:2".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn arp_must_name_the_senders_own_mac_and_address() {
        let mut s = switch();
        let now = Instant::now();
        let (me, victim) = (ip(mac(2)), ip(mac(3)));
        let from_a = |payload: Vec<u8>| eth(MacAddr::BROADCAST, mac(2), ETHERTYPE_ARP, &payload);
        let mut truncated = arp(1, mac(2), me, victim);
        truncated.truncate(27);
        let mut rarp_types = arp(1, mac(2), me, victim);
        rarp_types[1] = 6;
        let cases = [
            (arp(1, mac(2), me, victim), Inbound::Deliver, "a request"),
            (arp(2, mac(2), me, ip(mac(1))), Inbound::Deliver, "a reply"),
            (
                arp(1, mac(2), me, me),
                Inbound::Deliver,
                "a gratuitous announcement",
            ),
            (
                arp(1, mac(2), Ipv4Addr::UNSPECIFIED, me),
                Inbound::Deliver,
                "an RFC 5227 probe of its own address",
            ),
            (
                arp(1, mac(2), victim, victim),
                Inbound::Drop(DropReason::SpoofedArp),
                "a gratuitous claim of b's address",
            ),
            (
                arp(2, mac(2), victim, ip(mac(1))),
                Inbound::Drop(DropReason::SpoofedArp),
                "a reply in b's name",
            ),
            (
                arp(1, mac(3), me, victim),
                Inbound::Drop(DropReason::SpoofedArp),
                "b's MAC as sender hardware address",
            ),
            (
                arp(1, mac(2), Ipv4Addr::UNSPECIFIED, victim),
                Inbound::Drop(DropReason::SpoofedArp),
                "a probe of b's address",
            ),
            (
                arp(1, mac(2), Ipv4Addr::new(10, 0, 0, 200), victim),
                Inbound::Drop(DropReason::SpoofedArp),
                "an unassigned address",
            ),
            (
                arp(3, mac(2), me, victim),
                Inbound::Drop(DropReason::Malformed),
                "an unknown operation",
            ),
            (
                rarp_types,
                Inbound::Drop(DropReason::Malformed),
                "another hardware type",
            ),
        ];
        for (payload, want, what) in cases {
            assert_eq!(
                s.inbound(now, &node("a"), NET, &from_a(payload)),
                want,
                "{what}"
            );
        }
        // Cut short inside the Ethernet padding is still padding: build a frame without it.
        let mut short = eth(MacAddr::BROADCAST, mac(2), ETHERTYPE_ARP, &truncated);
        short.truncate(14 + 27);
        assert_eq!(
            s.inbound(now, &node("a"), NET, &short),
            Inbound::Drop(DropReason::Malformed)
        );
        assert_eq!(dropped(&s, "spoofed_arp"), 5);
        assert_eq!(dropped(&s, "malformed"), 3);
        assert_eq!(s.counters().delivered, 4);
    }

    #[test]
    fn only_gateways_may_source_device_addresses_and_only_those() {
        let mut s = switch();
        let now = Instant::now();
        let device = Ipv4Addr::new(10, 0, 0, 200);
        let other_device = Ipv4Addr::new(10, 0, 0, 201);
        // a (mac 2) is a gateway, b (mac 3) is not.
        let from_a = |p: &[u8]| eth(mac(1), mac(2), ETHERTYPE_IPV4, p);
        let from_b = |p: &[u8]| eth(mac(1), mac(3), ETHERTYPE_IPV4, p);
        // Before the controller names gateways, nobody may speak for a device.
        assert_eq!(
            s.inbound(now, &node("a"), NET, &from_a(&ipv4(device, ip(mac(1))))),
            Inbound::Drop(DropReason::SpoofedIpv4)
        );
        s.set_bridging(
            NET,
            Bridging {
                gateways: [node("a")].into(),
                devices: [device].into(),
                local: false,
            },
        );
        assert_eq!(
            s.inbound(now, &node("a"), NET, &from_a(&ipv4(device, ip(mac(1))))),
            Inbound::Deliver
        );
        // Its own address still passes; an address that is no device's does not.
        assert_eq!(
            s.inbound(now, &node("a"), NET, &from_a(&ipv4(ip(mac(2)), ip(mac(1))))),
            Inbound::Deliver
        );
        assert_eq!(
            s.inbound(
                now,
                &node("a"),
                NET,
                &from_a(&ipv4(other_device, ip(mac(1))))
            ),
            Inbound::Drop(DropReason::SpoofedIpv4)
        );
        // b is no gateway: a device's address from it is spoofed, in IPv4 and in ARP.
        assert_eq!(
            s.inbound(now, &node("b"), NET, &from_b(&ipv4(device, ip(mac(1))))),
            Inbound::Drop(DropReason::SpoofedIpv4)
        );
        let announce = |sha: MacAddr| {
            eth(
                MacAddr::BROADCAST,
                sha,
                ETHERTYPE_ARP,
                &arp(1, sha, device, device),
            )
        };
        assert_eq!(
            s.inbound(now, &node("b"), NET, &announce(mac(3))),
            Inbound::Drop(DropReason::SpoofedArp)
        );
        // The gateway's announcement (gratuitous ARP) of a device at its MAC passes.
        assert_eq!(
            s.inbound(now, &node("a"), NET, &announce(mac(2))),
            Inbound::Deliver
        );
        // Removing the device (an empty setting) takes the right away at once.
        s.set_bridging(NET, Bridging::default());
        assert_eq!(
            s.inbound(now, &node("a"), NET, &from_a(&ipv4(device, ip(mac(1))))),
            Inbound::Drop(DropReason::SpoofedIpv4)
        );
    }

    #[test]
    fn on_a_gateway_frames_for_devices_go_to_the_local_port() {
        let mut s = switch();
        let now = Instant::now();
        let device = Ipv4Addr::new(10, 0, 0, 200);
        s.set_bridging(
            NET,
            Bridging {
                gateways: [node("z")].into(),
                devices: [device].into(),
                local: true,
            },
        );
        let packet = |dst: Ipv4Addr| ipv4(ip(mac(2)), dst);
        // IPv4 to the device, sent to this node's MAC (the gateway's), goes to the port.
        let to_device = eth(mac(1), mac(2), ETHERTYPE_IPV4, &packet(device));
        assert_eq!(s.inbound(now, &node("a"), NET, &to_device), Inbound::Port);
        // IPv4 to this node's own address stays with the TAP.
        let to_me = eth(mac(1), mac(2), ETHERTYPE_IPV4, &packet(ip(mac(1))));
        assert_eq!(s.inbound(now, &node("a"), NET, &to_me), Inbound::Deliver);
        // An ARP request for the device goes to the port (and the TAP: broadcasts about a device
        // are how the node's kernel follows a failover); one for this node to the TAP only.
        let who_has = |tpa: Ipv4Addr| {
            eth(
                MacAddr::BROADCAST,
                mac(2),
                ETHERTYPE_ARP,
                &arp(1, mac(2), ip(mac(2)), tpa),
            )
        };
        assert_eq!(
            s.inbound(now, &node("a"), NET, &who_has(device)),
            Inbound::DeliverAndPort
        );
        assert_eq!(
            s.inbound(now, &node("a"), NET, &who_has(ip(mac(1)))),
            Inbound::Deliver
        );
        // The checks still come first: a spoofed frame for a device is dropped, not ported.
        let spoofed = eth(mac(1), mac(9), ETHERTYPE_IPV4, &packet(device));
        assert!(matches!(
            s.inbound(now, &node("a"), NET, &spoofed),
            Inbound::Drop(_)
        ));
    }

    /// An IPv4 packet from `source` to `dst` (no payload).
    fn ipv4(source: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0];
        p.extend(source.octets());
        p.extend(dst.octets());
        p
    }

    #[test]
    fn the_gateway_mac_is_derived_unicast_local_and_never_the_members() {
        for m in [
            mac(1),
            MacAddr([0x02, 0x5e, 1, 2, 3, 4]),
            MacAddr([0, 1, 2, 3, 4, 5]),
        ] {
            let g = gateway_mac(m);
            assert_ne!(g, m);
            assert!(!g.is_group());
            assert_eq!(g.0[0] & 0x02, 0x02, "locally administered");
            assert_eq!(g.0[1..], m.0[1..]);
            assert_eq!(gateway_mac(m), g, "stable");
        }
        // Controller-assigned MACs (02:5e:…) map to 06:5e:…, which the controller never assigns.
        assert_eq!(gateway_mac(mac(7)), MacAddr([0x06, 0x5e, 0, 0, 0, 7]));
    }

    /// On the gateway's node (us, mac 1) the kernel and the devices reach each other through the
    /// switch, both ways, without any peer.
    #[test]
    fn on_the_gateway_node_the_tap_and_the_local_port_reach_each_other() {
        let mut s = Switch::new(SwitchConfig::default());
        set(&mut s, &membership(NET, mac(1)), []).unwrap();
        let now = Instant::now();
        let device = Ipv4Addr::new(10, 0, 0, 200);
        let gw = gateway_mac(mac(1));
        let me = ip(mac(1));
        let kernel_arp = eth(
            MacAddr::BROADCAST,
            mac(1),
            ETHERTYPE_ARP,
            &arp(1, mac(1), me, device),
        );
        let kernel_ping = eth(gw, mac(1), ETHERTYPE_IPV4, &ipv4(me, device));
        let port_reply = eth(mac(1), gw, ETHERTYPE_IPV4, &ipv4(device, me));
        let port_arp_reply = eth(mac(1), gw, ETHERTYPE_ARP, &arp(2, gw, device, me));
        let announce = eth(
            MacAddr::BROADCAST,
            gw,
            ETHERTYPE_ARP,
            &arp(1, gw, device, device),
        );
        // Not a gateway (yet): the kernel's ARP has nowhere to go, the gateway MAC is no one's,
        // and the port may not speak.
        assert_eq!(
            s.outbound(now, NET, &kernel_arp),
            Outbound::Drop(DropReason::NoPeers)
        );
        assert_eq!(
            s.from_port(NET, &port_reply),
            Outbound::Drop(DropReason::ForeignSource)
        );
        s.set_bridging(
            NET,
            Bridging {
                gateways: [node("self")].into(),
                devices: [device].into(),
                local: true,
            },
        );
        // Kernel → port: the ARP for the device, then IPv4 to the gateway's MAC.
        assert_eq!(s.outbound(now, NET, &kernel_arp), Outbound::Local);
        assert_eq!(s.outbound(now, NET, &kernel_ping), Outbound::Local);
        // Port → kernel: the ARP reply and the device's reply, and its broadcasts.
        assert_eq!(s.from_port(NET, &port_arp_reply), Outbound::Local);
        assert_eq!(s.from_port(NET, &port_reply), Outbound::Local);
        assert_eq!(s.from_port(NET, &announce), Outbound::Local);
        // The port speaks only with the gateway MAC, and the TAP only with the node's.
        assert_eq!(
            s.from_port(NET, &eth(mac(1), mac(1), ETHERTYPE_IPV4, &ipv4(device, me))),
            Outbound::Drop(DropReason::ForeignSource)
        );
        assert_eq!(
            s.outbound(
                now,
                NET,
                &eth(mac(1), gw, ETHERTYPE_IPV4, &ipv4(device, me))
            ),
            Outbound::Drop(DropReason::ForeignSource)
        );
        assert_eq!(
            s.from_port(NET, &eth(gw, gw, ETHERTYPE_IPV4, &ipv4(device, device))),
            Outbound::Drop(DropReason::ToSelf)
        );
        // The kernel's broadcasts that are not about a device stay off the port.
        let other_arp = eth(
            MacAddr::BROADCAST,
            mac(1),
            ETHERTYPE_ARP,
            &arp(1, mac(1), me, Ipv4Addr::new(10, 0, 0, 99)),
        );
        assert_eq!(
            s.outbound(now, NET, &other_arp),
            Outbound::Drop(DropReason::NoPeers)
        );
        // No longer a gateway: no local delivery either way.
        s.set_bridging(NET, Bridging::default());
        assert!(matches!(
            s.outbound(now, NET, &kernel_ping),
            Outbound::Drop(_)
        ));
        assert_eq!(
            s.from_port(NET, &port_reply),
            Outbound::Drop(DropReason::ForeignSource)
        );
    }

    /// With peers: the gateway node's traffic still reaches them, broadcasts reach both ends, and
    /// the peers' frames for the gateway MAC come to the port.
    #[test]
    fn the_local_port_and_the_peers_share_the_network() {
        let mut s = switch();
        let now = Instant::now();
        let device = Ipv4Addr::new(10, 0, 0, 200);
        let gw = gateway_mac(mac(1));
        s.set_bridging(
            NET,
            Bridging {
                gateways: [node("self")].into(),
                devices: [device].into(),
                local: true,
            },
        );
        let all = [node("a"), node("b"), node("c")];
        // The kernel's ARP for a device goes to the port and the peers (another gateway may hold
        // the device's session).
        let kernel_arp = eth(
            MacAddr::BROADCAST,
            mac(1),
            ETHERTYPE_ARP,
            &arp(1, mac(1), ip(mac(1)), device),
        );
        assert_eq!(
            s.outbound(now, NET, &kernel_arp),
            Outbound::FloodAndLocal(&all)
        );
        // The gateway's gratuitous ARP reaches the peers and the node's own kernel.
        let announce = eth(
            MacAddr::BROADCAST,
            gw,
            ETHERTYPE_ARP,
            &arp(1, gw, device, device),
        );
        assert_eq!(s.from_port(NET, &announce), Outbound::FloodAndLocal(&all));
        // A device's packet to a member goes to that member only.
        let to_b = eth(mac(3), gw, ETHERTYPE_IPV4, &ipv4(device, ip(mac(3))));
        assert_eq!(s.from_port(NET, &to_b), Outbound::Unicast(&all[1]));
        // A member's packet to the device, sent to the gateway MAC, goes to the port; a unicast
        // ARP probe for the device too.
        let from_b = eth(gw, mac(3), ETHERTYPE_IPV4, &ipv4(ip(mac(3)), device));
        assert_eq!(s.inbound(now, &node("b"), NET, &from_b), Inbound::Port);
        let probe = eth(
            gw,
            mac(3),
            ETHERTYPE_ARP,
            &arp(1, mac(3), ip(mac(3)), device),
        );
        assert_eq!(s.inbound(now, &node("b"), NET, &probe), Inbound::Port);
        // Another node's gateway MAC is not ours.
        let elsewhere = eth(
            gateway_mac(mac(4)),
            mac(3),
            ETHERTYPE_IPV4,
            &ipv4(ip(mac(3)), device),
        );
        assert_eq!(
            s.inbound(now, &node("b"), NET, &elsewhere),
            Inbound::Drop(DropReason::NotForUs)
        );
    }

    /// On other members: a gateway member may send with its gateway MAC (device addresses only),
    /// unicast to that MAC goes to it, and when the active gateway moves, the new one's
    /// gratuitous ARP is accepted and delivered, so the members' kernels follow.
    #[test]
    fn members_accept_and_reach_each_gateway_by_its_gateway_mac() {
        let mut s = switch();
        let now = Instant::now();
        let device = Ipv4Addr::new(10, 0, 0, 200);
        // a (mac 2) and c (mac 4) are gateways; b (mac 3) is not.
        let (gw_a, gw_b, gw_c) = (
            gateway_mac(mac(2)),
            gateway_mac(mac(3)),
            gateway_mac(mac(4)),
        );
        let announce = |gw: MacAddr| {
            eth(
                MacAddr::BROADCAST,
                gw,
                ETHERTYPE_ARP,
                &arp(1, gw, device, device),
            )
        };
        let reply = |gw: MacAddr| eth(mac(1), gw, ETHERTYPE_IPV4, &ipv4(device, ip(mac(1))));
        // Before the controller names gateways, a gateway MAC is spoofed.
        assert_eq!(
            s.inbound(now, &node("a"), NET, &reply(gw_a)),
            Inbound::Drop(DropReason::SpoofedSource)
        );
        s.set_bridging(
            NET,
            Bridging {
                gateways: [node("a"), node("c")].into(),
                devices: [device].into(),
                local: false,
            },
        );
        assert_eq!(
            s.inbound(now, &node("a"), NET, &announce(gw_a)),
            Inbound::Deliver
        );
        assert_eq!(
            s.inbound(now, &node("a"), NET, &reply(gw_a)),
            Inbound::Deliver
        );
        // Our kernel's packets to the device, at a's gateway MAC, go to a.
        let to_device = |gw: MacAddr| eth(gw, mac(1), ETHERTYPE_IPV4, &ipv4(ip(mac(1)), device));
        assert_eq!(
            s.outbound(now, NET, &to_device(gw_a)),
            Outbound::Unicast(&node("a"))
        );
        // Failover: c takes over; its announcement passes, and unicast follows its MAC.
        assert_eq!(
            s.inbound(now, &node("c"), NET, &announce(gw_c)),
            Inbound::Deliver
        );
        assert_eq!(
            s.outbound(now, NET, &to_device(gw_c)),
            Outbound::Unicast(&node("c"))
        );
        // Only a member's own gateway MAC: a may not use c's, b (no gateway) none at all.
        assert_eq!(
            s.inbound(now, &node("a"), NET, &announce(gw_c)),
            Inbound::Drop(DropReason::SpoofedSource)
        );
        assert_eq!(
            s.inbound(now, &node("b"), NET, &announce(gw_b)),
            Inbound::Drop(DropReason::SpoofedSource)
        );
        // The gateway MAC speaks for devices only: not for the member's own address, not IPv6.
        assert_eq!(
            s.inbound(
                now,
                &node("a"),
                NET,
                &eth(mac(1), gw_a, ETHERTYPE_IPV4, &ipv4(ip(mac(2)), ip(mac(1))))
            ),
            Inbound::Drop(DropReason::SpoofedIpv4)
        );
        let own_arp = eth(
            MacAddr::BROADCAST,
            gw_a,
            ETHERTYPE_ARP,
            &arp(1, gw_a, ip(mac(2)), ip(mac(2))),
        );
        assert_eq!(
            s.inbound(now, &node("a"), NET, &own_arp),
            Inbound::Drop(DropReason::SpoofedArp)
        );
        let probe = eth(
            MacAddr::BROADCAST,
            gw_a,
            ETHERTYPE_ARP,
            &arp(1, gw_a, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED),
        );
        assert_eq!(
            s.inbound(now, &node("a"), NET, &probe),
            Inbound::Drop(DropReason::SpoofedArp)
        );
        let v6 = eth(
            MacAddr::BROADCAST,
            gw_a,
            ETHERTYPE_IPV6,
            &ipv6(
                ipv6_link_local(gw_a),
                "ff02::1".parse().unwrap(),
                17,
                &[0; 8],
            ),
        );
        assert_eq!(
            s.inbound(now, &node("a"), NET, &v6),
            Inbound::Drop(DropReason::SpoofedIpv6)
        );
        // ARP naming one MAC in the header and another inside is refused.
        let mixed = eth(
            MacAddr::BROADCAST,
            gw_a,
            ETHERTYPE_ARP,
            &arp(1, mac(2), device, device),
        );
        assert_eq!(
            s.inbound(now, &node("a"), NET, &mixed),
            Inbound::Drop(DropReason::SpoofedArp)
        );
        // A gateway's member MAC still speaks for devices (a gateway of an earlier build).
        assert_eq!(
            s.inbound(now, &node("a"), NET, &announce(mac(2))),
            Inbound::Deliver
        );
    }

    #[test]
    fn ipv4_must_come_from_the_senders_address() {
        let mut s = switch();
        let now = Instant::now();
        let packet = |source: Ipv4Addr| ipv4(source, ip(mac(1)));
        let from_a = |p: &[u8]| eth(mac(1), mac(2), ETHERTYPE_IPV4, p);
        assert_eq!(
            s.inbound(now, &node("a"), NET, &from_a(&packet(ip(mac(2))))),
            Inbound::Deliver
        );
        for source in [
            ip(mac(3)),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(192, 0, 2, 1),
            Ipv4Addr::BROADCAST,
        ] {
            assert_eq!(
                s.inbound(now, &node("a"), NET, &from_a(&packet(source))),
                Inbound::Drop(DropReason::SpoofedIpv4),
                "{source}"
            );
        }
        let mut v6_in_v4 = packet(ip(mac(2)));
        v6_in_v4[0] = 0x65;
        let mut short_ihl = packet(ip(mac(2)));
        short_ihl[0] = 0x44;
        let mut truncated = from_a(&packet(ip(mac(2))));
        truncated.truncate(14 + 15);
        for f in [from_a(&v6_in_v4), from_a(&short_ihl), truncated] {
            assert_eq!(
                s.inbound(now, &node("a"), NET, &f),
                Inbound::Drop(DropReason::Malformed)
            );
        }
        assert_eq!(
            (
                dropped(&s, "spoofed_ipv4"),
                dropped(&s, "malformed"),
                s.counters().delivered
            ),
            (4, 3, 1)
        );
        // The same spoofed packet from b's own MAC is b's, and passes: the check is per sender.
        let from_b = eth(mac(1), mac(3), ETHERTYPE_IPV4, &packet(ip(mac(3))));
        assert_eq!(s.inbound(now, &node("b"), NET, &from_b), Inbound::Deliver);
    }

    #[test]
    fn ipv6_must_come_from_the_senders_link_local_and_neighbour_discovery_may_not_lie() {
        let mut s = switch();
        let now = Instant::now();
        let (me, victim) = (ipv6_link_local(mac(2)), ipv6_link_local(mac(3)));
        let any = Ipv6Addr::UNSPECIFIED;
        let udp = [0u8, 1, 0, 2, 0, 8, 0, 0];
        let mut hop_by_hop_mld = vec![IPPROTO_ICMPV6, 0, 5, 2, 0, 0, 1, 0];
        hop_by_hop_mld.extend([ICMPV6_MLD2_REPORT, 0, 0, 0, 0, 0, 0, 0]);
        let mut dest_opts_na = vec![IPPROTO_ICMPV6, 0, 1, 4, 0, 0, 0, 0];
        dest_opts_na.extend(nd(ND_NEIGHBOUR_ADVERT, victim, &[]));
        let fragment = |offset: u16, body: &[u8]| {
            let mut f = vec![IPPROTO_ICMPV6, 0];
            f.extend((offset << 3 | 1).to_be_bytes());
            f.extend([0, 0, 0, 7]);
            f.extend(body);
            f
        };
        let mut too_many = Vec::new();
        for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
            too_many.extend([IPV6_DEST_OPTS, 0, 1, 4, 0, 0, 0, 0]);
        }
        too_many.extend(udp);
        let mut zero_length_option = nd(ND_NEIGHBOUR_SOLICIT, victim, &[]);
        zero_length_option.extend([ND_OPT_SOURCE_LL, 0, 0, 0, 0, 0, 0, 0]);
        let cases: Vec<(Ipv6Addr, u8, Vec<u8>, Inbound, &str)> = vec![
            (
                me,
                17,
                udp.to_vec(),
                Inbound::Deliver,
                "UDP from its link-local",
            ),
            (
                victim,
                17,
                udp.to_vec(),
                Inbound::Drop(DropReason::SpoofedIpv6),
                "UDP from b's link-local",
            ),
            (
                "2001:db8::2".parse().unwrap(),
                17,
                udp.to_vec(),
                Inbound::Drop(DropReason::SpoofedIpv6),
                "an unassigned global",
            ),
            (
                any,
                17,
                udp.to_vec(),
                Inbound::Drop(DropReason::SpoofedIpv6),
                "UDP from ::",
            ),
            (
                any,
                IPPROTO_ICMPV6,
                nd(ND_NEIGHBOUR_SOLICIT, me, &[]),
                Inbound::Deliver,
                "DAD for its link-local",
            ),
            (
                any,
                IPPROTO_ICMPV6,
                nd(ND_NEIGHBOUR_SOLICIT, victim, &[]),
                Inbound::Drop(DropReason::SpoofedNd),
                "DAD for b's",
            ),
            (
                any,
                IPPROTO_ICMPV6,
                nd(ND_NEIGHBOUR_ADVERT, me, &[]),
                Inbound::Drop(DropReason::SpoofedIpv6),
                "an NA from ::",
            ),
            (
                any,
                IPV6_HOP_BY_HOP,
                hop_by_hop_mld,
                Inbound::Deliver,
                "an MLDv2 report from :: during DAD",
            ),
            (
                me,
                IPPROTO_ICMPV6,
                nd(ND_NEIGHBOUR_SOLICIT, victim, &[(ND_OPT_SOURCE_LL, mac(2))]),
                Inbound::Deliver,
                "address resolution of b",
            ),
            (
                me,
                IPPROTO_ICMPV6,
                nd(ND_NEIGHBOUR_SOLICIT, victim, &[(ND_OPT_SOURCE_LL, mac(3))]),
                Inbound::Drop(DropReason::SpoofedNd),
                "a solicitation naming b's MAC",
            ),
            (
                me,
                IPPROTO_ICMPV6,
                nd(ND_NEIGHBOUR_ADVERT, me, &[(ND_OPT_TARGET_LL, mac(2))]),
                Inbound::Deliver,
                "an advertisement of itself",
            ),
            (
                me,
                IPPROTO_ICMPV6,
                nd(ND_NEIGHBOUR_ADVERT, victim, &[]),
                Inbound::Drop(DropReason::SpoofedNd),
                "an NA for b",
            ),
            (
                me,
                IPPROTO_ICMPV6,
                nd(ND_NEIGHBOUR_ADVERT, me, &[(ND_OPT_TARGET_LL, mac(3))]),
                Inbound::Drop(DropReason::SpoofedNd),
                "an NA pointing its address at b's MAC",
            ),
            (
                me,
                IPV6_DEST_OPTS,
                dest_opts_na,
                Inbound::Drop(DropReason::SpoofedNd),
                "an NA for b behind an extension header",
            ),
            (
                me,
                IPV6_FRAGMENT,
                fragment(0, &nd(ND_NEIGHBOUR_ADVERT, victim, &[])),
                Inbound::Drop(DropReason::SpoofedNd),
                "an NA for b in a first fragment",
            ),
            (
                me,
                IPV6_FRAGMENT,
                fragment(3, &[0; 16]),
                Inbound::Deliver,
                "a later fragment",
            ),
            (
                me,
                IPPROTO_ICMPV6,
                vec![
                    ND_ROUTER_ADVERT,
                    0,
                    0,
                    0,
                    64,
                    0,
                    0,
                    30,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                ],
                Inbound::Drop(DropReason::SpoofedNd),
                "a router advertisement",
            ),
            (
                me,
                IPPROTO_ICMPV6,
                nd(ND_REDIRECT, victim, &[]),
                Inbound::Drop(DropReason::SpoofedNd),
                "a redirect",
            ),
            (
                me,
                IPPROTO_ICMPV6,
                vec![
                    ND_ROUTER_SOLICIT,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    ND_OPT_SOURCE_LL,
                    1,
                    2,
                    0x5e,
                    0,
                    0,
                    0,
                    3,
                ],
                Inbound::Drop(DropReason::SpoofedNd),
                "a router solicitation naming b's MAC",
            ),
            (
                me,
                IPPROTO_ICMPV6,
                vec![128, 0, 0, 0, 0, 1, 0, 1],
                Inbound::Deliver,
                "an echo request",
            ),
            (
                me,
                IPV6_DEST_OPTS,
                too_many,
                Inbound::Drop(DropReason::Malformed),
                "too many extension headers",
            ),
            (
                me,
                IPPROTO_ICMPV6,
                zero_length_option,
                Inbound::Drop(DropReason::Malformed),
                "a zero-length option",
            ),
        ];
        for (from, next, body, want, what) in cases {
            assert_eq!(
                s.inbound(now, &node("a"), NET, &v6_frame(mac(2), from, next, &body)),
                want,
                "{what}"
            );
        }
        // A payload length beyond the frame is malformed; one shorter than the frame bounds the
        // options.
        let mut overlong = v6_frame(mac(2), me, 17, &udp);
        overlong[14 + 5] = 200;
        assert_eq!(
            s.inbound(now, &node("a"), NET, &overlong),
            Inbound::Drop(DropReason::Malformed)
        );
        let mut padded = v6_frame(
            mac(2),
            me,
            IPPROTO_ICMPV6,
            &nd(ND_NEIGHBOUR_ADVERT, me, &[]),
        );
        padded.extend([ND_OPT_TARGET_LL, 1, 2, 0x5e, 0, 0, 0, 3]);
        assert_eq!(
            s.inbound(now, &node("a"), NET, &padded),
            Inbound::Deliver,
            "bytes past the payload are not options"
        );
        let mut cut = v6_frame(mac(2), me, 17, &udp);
        cut.truncate(14 + 39);
        assert_eq!(
            s.inbound(now, &node("a"), NET, &cut),
            Inbound::Drop(DropReason::Malformed)
        );
        let labels: Vec<_> = s.counters().dropped;
        assert_eq!(
            labels,
            [("malformed", 4), ("spoofed_ipv6", 4), ("spoofed_nd", 9)]
                .map(|(l, n)| (l.to_owned(), n))
        );
    }

    #[test]
    fn tagged_frames_and_other_ethertypes_are_refused() {
        let mut s = switch();
        let now = Instant::now();
        // An 802.1Q frame whose inner IPv4 packet is a's own would still be refused: the tag itself
        // is.
        let mut inner = vec![0, 5, 0x08, 0x00];
        inner.extend(&frame(mac(1), mac(2))[14..]);
        let cases = [
            (0x8100, DropReason::VlanTagged),
            (0x88a8, DropReason::VlanTagged),
            (0x9100, DropReason::VlanTagged),
            (0x88cc, DropReason::OtherEthertype),
            (0x8035, DropReason::OtherEthertype),
            (0x0026, DropReason::OtherEthertype),
        ];
        for (ethertype, reason) in cases {
            let f = eth(MacAddr::BROADCAST, mac(2), ethertype, &inner);
            assert_eq!(
                s.inbound(now, &node("a"), NET, &f),
                Inbound::Drop(reason),
                "{ethertype:#06x}"
            );
        }
        assert_eq!(dropped(&s, "vlan_tagged"), 3);
        assert_eq!(dropped(&s, "other_ethertype"), 3);
        // A bare Ethernet header announcing IPv4 has no address to check.
        assert_eq!(
            s.inbound(now, &node("a"), NET, &frame(mac(1), mac(2))[..14]),
            Inbound::Drop(DropReason::Malformed)
        );
        // Our own frames are checked for their MAC only (the receivers check the rest).
        let tagged = eth(mac(2), mac(1), 0x8100, &inner);
        assert_eq!(s.outbound(now, NET, &tagged), Outbound::Unicast(&node("a")));
    }

    /// The fuzz target's property (`overlay/fuzz/fuzz_targets/switch_inbound.rs`) on deterministic
    /// mutations of valid frames, so CI exercises it without a fuzzer: the ingress path never
    /// panics, and a frame it delivers carries only the sender's addresses where any receiver reads
    /// them.
    #[test]
    fn mutated_frames_never_panic_and_only_the_senders_addresses_pass() {
        let (me, victim) = (ipv6_link_local(mac(2)), ipv6_link_local(mac(3)));
        let udp = [0u8, 1, 0, 2, 0, 8, 0, 0];
        let seeds = [
            frame(mac(1), mac(2)),
            frame(MacAddr::BROADCAST, mac(2)),
            eth(
                MacAddr::BROADCAST,
                mac(2),
                ETHERTYPE_ARP,
                &arp(1, mac(2), ip(mac(2)), ip(mac(1))),
            ),
            eth(
                MacAddr::BROADCAST,
                mac(2),
                ETHERTYPE_ARP,
                &arp(1, mac(2), Ipv4Addr::UNSPECIFIED, ip(mac(2))),
            ),
            v6_frame(mac(2), me, 17, &udp),
            v6_frame(
                mac(2),
                Ipv6Addr::UNSPECIFIED,
                IPPROTO_ICMPV6,
                &nd(ND_NEIGHBOUR_SOLICIT, me, &[]),
            ),
            v6_frame(
                mac(2),
                me,
                IPPROTO_ICMPV6,
                &nd(ND_NEIGHBOUR_ADVERT, me, &[(ND_OPT_TARGET_LL, mac(2))]),
            ),
            v6_frame(
                mac(2),
                me,
                IPPROTO_ICMPV6,
                &nd(ND_NEIGHBOUR_SOLICIT, victim, &[(ND_OPT_SOURCE_LL, mac(2))]),
            ),
        ];
        use rand::{rngs::StdRng, RngCore, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0x2545_f491_4f6c_dd1d);
        let mut rand = move || rng.next_u64();
        let mut s = switch();
        let t0 = Instant::now();
        let mut delivered = 0;
        for i in 0..40_000u32 {
            let mut f = seeds[i as usize % seeds.len()].clone();
            for _ in 0..=rand() % 3 {
                match rand() % 5 {
                    0 | 1 => {
                        let at = rand() as usize % f.len().max(1);
                        if let Some(b) = f.get_mut(at) {
                            *b ^= 1 << (rand() % 8);
                        }
                    }
                    2 => f.truncate(rand() as usize % (f.len() + 1)),
                    3 => {
                        let at = rand() as usize % (f.len() + 1);
                        f.insert(at, rand() as u8);
                    }
                    _ => {
                        // Overwrite an address field with the victim's, where a spoofer would.
                        let at = [6, 22, 26, 28, 36]
                            .get(rand() as usize % 5)
                            .copied()
                            .unwrap_or(0);
                        for (k, b) in mac(3).0.iter().enumerate() {
                            if let Some(x) = f.get_mut(at + k) {
                                *x = *b;
                            }
                        }
                    }
                }
            }
            // A fresh flood budget every frame: the storm limit is not what is under test.
            let now = t0 + Duration::from_secs(u64::from(i));
            if s.inbound(now, &node("a"), NET, &f) == Inbound::Deliver {
                delivered += 1;
                assert_only_own_addresses(&f, mac(2), ip(mac(2)));
            }
        }
        let c = s.counters();
        let total: u64 = c.dropped.iter().map(|(_, n)| n).sum::<u64>() + c.delivered;
        assert_eq!(
            total, 40_000,
            "every frame is delivered or counted as dropped: {c:?}"
        );
        assert!(
            delivered > 4000,
            "the mutations keep enough frames valid to test the positive side: {delivered}"
        );
        for label in [
            "spoofed_source",
            "spoofed_arp",
            "spoofed_ipv4",
            "spoofed_ipv6",
            "malformed",
            "other_ethertype",
        ] {
            assert!(dropped(&s, label) > 0, "{label} never hit: {c:?}");
        }
    }

    /// An oracle written apart from [`check_addresses`]: the fields receivers learn addresses from
    /// name only the sender.
    fn assert_only_own_addresses(f: &[u8], mac: MacAddr, address: Ipv4Addr) {
        assert_eq!(f[6..12], mac.0, "source MAC");
        let at = |range: std::ops::Range<usize>| {
            f.get(range)
                .unwrap_or_else(|| panic!("delivered a short frame {f:02x?}"))
        };
        match u16::from_be_bytes([f[12], f[13]]) {
            0x0806 => {
                assert_eq!(at(22..28), mac.0, "ARP sender MAC in {f:02x?}");
                let spa = at(28..32);
                assert!(
                    spa == address.octets() || (spa == [0; 4] && at(38..42) == address.octets()),
                    "ARP sender {f:02x?}"
                );
            }
            0x0800 => assert_eq!(at(26..30), address.octets(), "IPv4 source in {f:02x?}"),
            0x86dd => {
                let src = at(22..38);
                assert!(
                    src == ipv6_link_local(mac).octets() || src == [0; 16],
                    "IPv6 source in {f:02x?}"
                );
                if at(20..21) == [IPPROTO_ICMPV6] && f.get(54) == Some(&ND_NEIGHBOUR_ADVERT) {
                    assert_eq!(
                        at(62..78),
                        ipv6_link_local(mac).octets(),
                        "NA target in {f:02x?}"
                    );
                }
            }
            other => panic!("delivered ethertype {other:#06x}"),
        }
    }

    #[test]
    fn ambiguous_mac_assignments_are_refused_and_the_previous_configuration_kept() {
        let mut s = switch();
        let own = membership(NET, mac(1));
        let refused = [
            (
                vec![(node("x"), mac(1))],
                SwitchError::DuplicateMac {
                    network: NET,
                    mac: mac(1),
                },
            ),
            (
                vec![(node("x"), mac(8)), (node("y"), mac(8))],
                SwitchError::DuplicateMac {
                    network: NET,
                    mac: mac(8),
                },
            ),
            (
                vec![(node("x"), mac(8)), (node("x"), mac(9))],
                SwitchError::DuplicateMember {
                    network: NET,
                    node: node("x"),
                },
            ),
            (
                vec![(node("x"), MacAddr::BROADCAST)],
                SwitchError::GroupMac {
                    network: NET,
                    mac: MacAddr::BROADCAST,
                },
            ),
        ];
        for (members, err) in refused {
            assert_eq!(set(&mut s, &own, members), Err(err));
        }
        let same_address = |address| {
            [Member {
                node: node("x"),
                mac: mac(8),
                address,
            }]
        };
        assert_eq!(
            s.set_network(&own, same_address(ip(mac(1)))),
            Err(SwitchError::DuplicateAddress {
                network: NET,
                address: ip(mac(1))
            })
        );
        let twice = [
            Member {
                node: node("x"),
                mac: mac(8),
                address: ip(mac(9)),
            },
            Member {
                node: node("y"),
                mac: mac(9),
                address: ip(mac(9)),
            },
        ];
        assert_eq!(
            s.set_network(&own, twice),
            Err(SwitchError::DuplicateAddress {
                network: NET,
                address: ip(mac(9))
            })
        );
        assert_eq!(
            set(&mut s, &membership(NET, MacAddr::BROADCAST), []),
            Err(SwitchError::GroupMac {
                network: NET,
                mac: MacAddr::BROADCAST
            })
        );
        // The same pair listed twice is harmless.
        let mut fresh = Switch::new(SwitchConfig::default());
        set(&mut fresh, &own, [(node("x"), mac(8)), (node("x"), mac(8))]).unwrap();
        assert_eq!(fresh.mac_table(NET, Instant::now()).unwrap().len(), 1);
        // The refusals left the first configuration in place.
        assert_eq!(
            s.outbound(Instant::now(), NET, &frame(mac(3), mac(1))),
            Outbound::Unicast(&node("b"))
        );
    }

    #[test]
    fn departed_peers_rate_limit_state_is_forgotten() {
        let mut s = Switch::new(SwitchConfig {
            flood_burst: 1,
            flood_rate_per_peer: 0,
            ..Default::default()
        });
        set(&mut s, &membership(NET, mac(1)), [(node("a"), mac(2))]).unwrap();
        let now = Instant::now();
        let bcast = frame(MacAddr::BROADCAST, mac(2));
        assert_eq!(s.inbound(now, &node("a"), NET, &bcast), Inbound::Deliver);
        assert_eq!(
            s.inbound(now, &node("a"), NET, &bcast),
            Inbound::Drop(DropReason::Storm)
        );
        set(&mut s, &membership(NET, mac(1)), []).unwrap();
        assert!(s.buckets.is_empty());
        set(&mut s, &membership(NET, mac(1)), [(node("a"), mac(2))]).unwrap();
        assert_eq!(
            s.inbound(now, &node("a"), NET, &bcast),
            Inbound::Deliver,
            "a fresh bucket after rejoining"
        );
    }
}
