//! The overlay's coordination data: what the controller tells each agent about its networks and
//! peers.
//!
//! An agent receives a full [`Netmap`] when it connects with a version the controller cannot bring
//! up to date, and [`NetmapDelta`]s after that: one per change, carrying only the records that
//! changed. Versions come from one counter in the controller's store, so they rise across
//! controller restarts. The agent caches the netmap on disk; `valid_until` bounds how long a cached
//! copy may be used without the controller confirming it.

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::{NodeId, UnixMillis};

/// The key hash the controller puts in a peer's netmap entry once that peer's key is no longer
/// trusted (a certificate of it was revoked): no certificate hashes to it, so every path from the
/// peer is refused until it connects with a new key. (All zeros means "not known yet".)
pub const KEY_WITHDRAWN: [u8; 32] = [0xff; 32];

/// A network's short identity, carried in every overlay datagram. Assigned by the controller, never
/// reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NetworkId(pub u32);

/// A node's short identity on the overlay, used to address relayed datagrams. Assigned at enrolment
/// by the controller, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PeerIndex(pub u32);

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Whether the group bit is set (broadcast and multicast).
    pub fn is_group(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A MAC address could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a MAC address (expected six hex pairs separated by ':'): {0:?}")]
pub struct MacParseError(pub String);

impl std::str::FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for b in &mut out {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

/// How the agent's NAT maps its socket to public addresses, as measured against two controller
/// ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NatMapping {
    /// Not measured (yet), or the probe failed.
    Unknown,
    /// The agent's observed address equals its local one: no NAT.
    None,
    /// One public address and port for every destination: hole punching works from either side.
    EndpointIndependent,
    /// A different public port per destination ("symmetric"): only the relay, or a peer that can
    /// reach this node's mapping first, can connect.
    EndpointDependent,
}

/// One network this agent is a member of: what its TAP device is configured with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkMembership {
    /// The network's wire identity.
    pub id: NetworkId,
    /// The operator's name for it (`default`, ...).
    pub name: String,
    /// The network's IPv4 subnet address.
    pub subnet: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix_len: u8,
    /// This node's MAC on the network.
    pub mac: MacAddr,
    /// This node's IPv4 address on the network.
    pub address: Ipv4Addr,
    /// The TAP device's MTU.
    pub mtu: u16,
}

/// A peer's membership of one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNetwork {
    /// Which network.
    pub id: NetworkId,
    /// The peer's MAC there: the only source MAC accepted from it on that network.
    pub mac: MacAddr,
    /// The peer's IPv4 address there.
    pub address: Ipv4Addr,
}

/// Another node that shares at least one network with this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Its fleet identity (its certificate names `<id>.node.shoal`).
    pub node: NodeId,
    /// Its relay address.
    pub index: PeerIndex,
    /// SHA-256 of its public key (SubjectPublicKeyInfo DER): a certificate for the node id with
    /// another key is refused, so a stale certificate of a re-enrolled node cannot be replayed.
    pub key_sha256: [u8; 32],
    /// Where it may be reached directly: the address the controller observed first, then its local
    /// ones.
    pub endpoints: Vec<SocketAddr>,
    /// Its NAT's mapping behaviour.
    pub nat: NatMapping,
    /// The networks it shares with the receiving node.
    pub networks: Vec<PeerNetwork>,
}

/// The whole picture for one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Netmap {
    /// Version of the controller's state this reflects.
    pub version: u64,
    /// Until when an agent may use a cached copy without hearing from the controller.
    pub valid_until: UnixMillis,
    /// The networks this node is a member of.
    pub networks: Vec<NetworkMembership>,
    /// Everyone it shares a network with.
    pub peers: Vec<Peer>,
}

/// One change to an agent's netmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetmapChange {
    /// This node joined a network, or its settings there changed.
    Network(NetworkMembership),
    /// This node left a network.
    NetworkGone(NetworkId),
    /// A peer appeared or changed (endpoints, networks, key).
    Peer(Peer),
    /// A peer no longer shares any network with this node (or was removed from the fleet).
    PeerGone(NodeId),
}

/// Changes that bring a netmap at `from_version` to `to_version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetmapDelta {
    /// The version these changes apply to.
    pub from_version: u64,
    /// The version after them.
    pub to_version: u64,
    /// New validity of the whole map.
    pub valid_until: UnixMillis,
    /// In order.
    pub changes: Vec<NetmapChange>,
}

/// Why a delta could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("netmap delta from version {delta_from} does not apply to version {have}")]
pub struct NetmapGap {
    /// The version the agent has.
    pub have: u64,
    /// The version the delta starts from.
    pub delta_from: u64,
}

impl Netmap {
    /// Applies `delta`; refuses (and leaves the map untouched) if it does not start at this
    /// version.
    pub fn apply(&mut self, delta: &NetmapDelta) -> Result<(), NetmapGap> {
        if delta.from_version != self.version {
            return Err(NetmapGap {
                have: self.version,
                delta_from: delta.from_version,
            });
        }
        for change in &delta.changes {
            match change {
                NetmapChange::Network(n) => match self.networks.iter_mut().find(|m| m.id == n.id) {
                    Some(m) => *m = n.clone(),
                    None => self.networks.push(n.clone()),
                },
                NetmapChange::NetworkGone(id) => self.networks.retain(|m| m.id != *id),
                NetmapChange::Peer(p) => match self.peers.iter_mut().find(|q| q.node == p.node) {
                    Some(q) => *q = p.clone(),
                    None => self.peers.push(p.clone()),
                },
                NetmapChange::PeerGone(node) => self.peers.retain(|q| q.node != *node),
            }
        }
        self.version = delta.to_version;
        self.valid_until = delta.valid_until;
        Ok(())
    }

    /// The peer with this node id.
    pub fn peer(&self, node: &NodeId) -> Option<&Peer> {
        self.peers.iter().find(|p| p.node == *node)
    }
}

/// What the agent tells the controller about its overlay side, after Welcome and whenever it
/// changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayHello {
    /// The netmap version the agent holds (from its cache), if any.
    pub netmap_version: Option<u64>,
    /// Its local socket addresses (interface addresses with the agent's UDP port), for peers on the
    /// same LAN; then (from builds with peer-observed addresses) where its direct peers see it.
    pub local_endpoints: Vec<SocketAddr>,
    /// Its NAT's mapping behaviour.
    pub nat: NatMapping,
}

/// How a peer path is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PathKind {
    /// UDP straight between the two nodes.
    Direct,
    /// Through the controller's relay.
    Relay,
}

/// One peer path as the agent sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathInfo {
    /// The peer.
    pub peer: NodeId,
    /// How traffic to it is carried right now.
    pub kind: PathKind,
    /// The remote UDP address (direct paths only).
    pub remote: Option<SocketAddr>,
    /// Smoothed round-trip time.
    pub rtt_ms: f64,
    /// Bytes of overlay frames sent to the peer since the agent started.
    pub tx_bytes: u64,
    /// Bytes of overlay frames received from the peer since the agent started.
    pub rx_bytes: u64,
}

/// (v8) Why traffic to a peer goes through the relay rather than straight to it: which NAT
/// behaviour, as far as the agent can tell, blocked the direct path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RelayReason {
    /// The first round of direct attempts has not ended yet.
    Trying,
    /// No address of the peer is known to attempt.
    NoCandidates,
    /// Both NATs map per destination ("symmetric"): neither side can predict the port the other
    /// opens, so punching cannot meet.
    BothEndpointDependent,
    /// This node's NAT maps per destination and the attempts timed out.
    LocalEndpointDependent,
    /// The peer's NAT maps per destination and the attempts timed out.
    PeerEndpointDependent,
    /// Neither NAT maps per destination, yet no attempt got an answer: UDP between the two is
    /// filtered (a firewall, or a NAT that drops unsolicited packets for longer than a round).
    UdpBlocked,
    /// The attempts timed out and at least one side's NAT behaviour is unknown.
    PunchTimedOut,
    /// The attempts were answered with a refusal (ICMP unreachable, a handshake or identity
    /// failure), not silence.
    Refused,
}

impl RelayReason {
    /// The snake_case name shown to operators.
    pub fn label(self) -> &'static str {
        match self {
            RelayReason::Trying => "trying",
            RelayReason::NoCandidates => "no_candidates",
            RelayReason::BothEndpointDependent => "both_endpoint_dependent",
            RelayReason::LocalEndpointDependent => "local_endpoint_dependent",
            RelayReason::PeerEndpointDependent => "peer_endpoint_dependent",
            RelayReason::UdpBlocked => "udp_blocked",
            RelayReason::PunchTimedOut => "punch_timed_out",
            RelayReason::Refused => "refused",
        }
    }
}

/// (v8) Why one relayed peer path is relayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayedPath {
    /// The peer.
    pub peer: NodeId,
    /// Why.
    pub reason: RelayReason,
}

/// (v8) A path report with the reason for each relayed path, sent instead of
/// [`crate::AgentMsg::Paths`] once both sides speak 8.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathReportV8 {
    /// The report as in v2.
    pub report: PathReport,
    /// One entry per relayed path of `report`.
    pub relayed: Vec<RelayedPath>,
}

impl From<PathReport> for PathReportV8 {
    /// A v2 report: no reasons.
    fn from(report: PathReport) -> Self {
        PathReportV8 {
            report,
            relayed: vec![],
        }
    }
}

/// Datapath counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayCounters {
    /// Frames sent to one peer (known unicast).
    pub forwarded: u64,
    /// Frames sent to several peers (broadcast, multicast, unknown unicast), counted once per
    /// frame.
    pub flooded: u64,
    /// Frames received from peers and delivered to a TAP device.
    pub delivered: u64,
    /// Frames dropped, by reason (`spoofed_source`, `not_member`, `malformed`, `no_path`, `storm`,
    /// ...).
    pub dropped: Vec<(String, u64)>,
}

/// The agent's periodic overlay report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathReport {
    /// Every peer the agent has a path to or is trying to reach.
    pub paths: Vec<PathInfo>,
    /// Datapath counters since start.
    pub counters: OverlayCounters,
}

/// A request to the controller, and from it to the peer, to open a direct path at once from both
/// sides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Punch {
    /// Agent→controller: the peer to punch towards. Controller→agent: the peer that asked.
    pub peer: NodeId,
    /// Controller→agent: where the asking peer can be reached now (empty from the agent).
    pub endpoints: Vec<SocketAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str) -> Peer {
        Peer {
            node: NodeId(id.into()),
            index: PeerIndex(1),
            key_sha256: [0; 32],
            endpoints: vec![],
            nat: NatMapping::Unknown,
            networks: vec![],
        }
    }

    #[test]
    fn delta_applies_in_order_and_refuses_gaps() {
        let mut map = Netmap {
            version: 3,
            ..Default::default()
        };
        let d = NetmapDelta {
            from_version: 3,
            to_version: 5,
            valid_until: UnixMillis(9),
            changes: vec![
                NetmapChange::Peer(peer("a")),
                NetmapChange::Peer(peer("b")),
                NetmapChange::PeerGone(NodeId("a".into())),
            ],
        };
        map.apply(&d).unwrap();
        assert_eq!(map.version, 5);
        assert_eq!(
            map.peers
                .iter()
                .map(|p| p.node.0.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        let err = map.apply(&d).unwrap_err();
        assert_eq!(
            err,
            NetmapGap {
                have: 5,
                delta_from: 3
            }
        );
        assert_eq!(map.version, 5);
    }

    #[test]
    fn mac_parses_and_prints() {
        let m: MacAddr = "02:5e:0a:00:00:01".parse().unwrap();
        assert_eq!(m.to_string(), "02:5e:0a:00:00:01");
        assert!(!m.is_group());
        assert!(MacAddr::BROADCAST.is_group());
        assert!("02:5e:0a:00:00".parse::<MacAddr>().is_err());
        assert!("02:5e:0a:00:00:01:02".parse::<MacAddr>().is_err());
        assert!("zz:5e:0a:00:00:01".parse::<MacAddr>().is_err());
    }
}
