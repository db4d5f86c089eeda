//! Overlay networks as the controller plans them: subnets, network and member records, what a change
//! did ([`MembershipChange`], for the coordinator), and the IPAM and MAC rules. The store and the
//! locking are the shell's (`shoal_controller::networks`); the rules are here.
//!
//! - IPAM: a member gets the lowest free host address of the subnet (not the network or broadcast
//!   address) — [`free_address`].
//! - MAC: `02:5e:` (locally administered, unicast) and four bytes of SHA-256(network id ‖ node id),
//!   hashed again with a counter on a collision within the network — [`free_mac`].
//! - Membership: `default` always, selector networks while a selector matches, explicit members
//!   kept — [`reconcile`].

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    str::FromStr,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shoal_proto::{MacAddr, NetworkId, NodeId, PeerIndex, UnixMillis};

use crate::selector::Selector;

/// The name of the network every node joins.
pub const DEFAULT_NETWORK: &str = "default";

/// The default network's subnet unless `serve --overlay-subnet` says otherwise: 10.90.0.0/16.
pub const DEFAULT_OVERLAY_SUBNET: Subnet = Subnet {
    addr: Ipv4Addr::new(10, 90, 0, 0),
    prefix_len: 16,
};

/// The default TAP MTU: room for the overlay's QUIC, UDP and IP headers inside a 1500-byte path.
pub const DEFAULT_OVERLAY_MTU: u16 = 1380;

/// Smallest accepted MTU: IPv6 (and so link-local addressing) needs 1280.
pub const MIN_MTU: u16 = 1280;

/// Largest accepted MTU.
pub const MAX_MTU: u16 = 9000;

/// An IPv4 subnet in CIDR form, prefix length 8 to 30, with no host bits set.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subnet {
    addr: Ipv4Addr,
    prefix_len: u8,
}

/// Why a subnet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubnetError {
    /// Not `A.B.C.D/N`.
    #[error("{0:?} is not an IPv4 subnet (expected CIDR like 10.91.0.0/24)")]
    Syntax(String),
    /// The prefix length is outside 8..=30.
    #[error("prefix length /{0} is not allowed: use /8 to /30")]
    PrefixLen(u8),
    /// Host bits are set.
    #[error("{given} has host bits set; did you mean {network}?")]
    HostBits {
        /// What was given.
        given: String,
        /// The subnet with the host bits cleared.
        network: String,
    },
}

impl Subnet {
    /// A subnet; refuses prefix lengths outside 8..=30 and set host bits.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Subnet, SubnetError> {
        if !(8..=30).contains(&prefix_len) {
            return Err(SubnetError::PrefixLen(prefix_len));
        }
        let subnet = Subnet { addr, prefix_len };
        let base = u32::from(addr) & subnet.mask();
        if base != u32::from(addr) {
            return Err(SubnetError::HostBits {
                given: format!("{addr}/{prefix_len}"),
                network: format!("{}/{prefix_len}", Ipv4Addr::from(base)),
            });
        }
        Ok(subnet)
    }

    /// The network address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix_len))
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    /// Whether the two share any address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// First and last assignable host address (the network and broadcast addresses excluded).
    pub fn hosts(&self) -> (u32, u32) {
        let base = u32::from(self.addr);
        (base + 1, (base | !self.mask()) - 1)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl fmt::Debug for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || SubnetError::Syntax(s.to_owned());
        let (addr, len) = s.trim().split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        let len: u8 = len.parse().map_err(|_| syntax())?;
        Subnet::new(addr, len)
    }
}

/// One overlay network as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// Wire identity; from a counter, never reused (`default` is 1).
    pub id: NetworkId,
    /// Unique name, `[a-z0-9][a-z0-9-]{0,30}`.
    pub name: String,
    /// Network address of the subnet.
    pub subnet: Ipv4Addr,
    /// Prefix length of the subnet (8..=30).
    pub prefix_len: u8,
    /// The members' TAP MTU.
    pub mtu: u16,
    /// Label selectors: a node whose labels match any of them is a member. Stored in the
    /// selector's compatible form (see [`crate::selector`]), so records of the old `(key, value)`
    /// form read unchanged.
    pub selectors: Vec<Selector>,
    /// When it was created.
    pub created_at: UnixMillis,
}

impl NetworkRecord {
    /// The subnet.
    pub fn subnet(&self) -> Subnet {
        Subnet {
            addr: self.subnet,
            prefix_len: self.prefix_len,
        }
    }

    /// Whether this is the network every node joins.
    pub fn is_default(&self) -> bool {
        self.name == DEFAULT_NETWORK
    }

    /// Whether a selector matches these labels.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selectors.iter().any(|s| s.matches(labels))
    }
}

/// One node's membership of one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The network.
    pub network: NetworkId,
    /// The node.
    pub node: NodeId,
    /// Its MAC there.
    pub mac: MacAddr,
    /// Its IPv4 address there.
    pub address: Ipv4Addr,
    /// Added by an operator (`network add NAME --node ID`).
    pub explicit: bool,
    /// A selector of the network matches the node's labels.
    pub via_selector: bool,
}

/// What a change did to the overlay, for the coordinator (and for the other controllers'
/// coordinators, over the controller mesh).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// A node became a member.
    Joined {
        /// The network.
        network: NetworkId,
        /// The node.
        node: NodeId,
        /// Its MAC there.
        mac: MacAddr,
        /// Its address there.
        address: Ipv4Addr,
    },
    /// A node stopped being a member.
    Left {
        /// The network.
        network: NetworkId,
        /// The node.
        node: NodeId,
    },
    /// A network was created (its members follow as `Joined`).
    NetworkCreated(NetworkRecord),
    /// A network was deleted (its members' `Left` come first).
    NetworkDeleted(NetworkId),
}

/// A node's overlay identity, as the coordinator needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeOverlay {
    /// Its relay address.
    pub index: PeerIndex,
    /// SHA-256 of its public key, once known.
    pub key_sha256: Option<[u8; 32]>,
}

/// One network with its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSnapshot {
    /// The network.
    pub network: NetworkRecord,
    /// Its members, by node id.
    pub members: Vec<MemberRecord>,
}

/// Everything the overlay coordinator loads at start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OverlaySnapshot {
    /// All networks, by id.
    pub networks: Vec<NetworkSnapshot>,
    /// Every node that has a peer index (all members do).
    pub nodes: BTreeMap<NodeId, NodeOverlay>,
}

/// The MAC for `node` on `network`, `attempt` counting collisions.
pub fn mac_for(network: NetworkId, node: &NodeId, attempt: u32) -> MacAddr {
    let mut h = Sha256::new();
    h.update(network.0.to_be_bytes());
    h.update(node.0.as_bytes());
    if attempt > 0 {
        h.update(attempt.to_be_bytes());
    }
    let d = h.finalize();
    MacAddr([0x02, 0x5e, d[0], d[1], d[2], d[3]])
}

/// The lowest host address of `subnet` not in `used` (addresses as `u32`), if any is left.
pub fn free_address(subnet: Subnet, used: &BTreeSet<u32>) -> Option<Ipv4Addr> {
    let (first, last) = subnet.hosts();
    (first..=last)
        .find(|a| !used.contains(a))
        .map(Ipv4Addr::from)
}

/// `node`'s MAC on `network`: the first of its hashed candidates that no member in `used` has.
pub fn free_mac(network: NetworkId, node: &NodeId, used: &BTreeSet<MacAddr>) -> MacAddr {
    (0u32..)
        .map(|attempt| mac_for(network, node, attempt))
        .find(|m| !used.contains(m))
        .unwrap_or(MacAddr([0x02, 0x5e, 0, 0, 0, 0])) // unreachable: fewer than 2^32 members
}

/// What one node's membership of one network must become ([`reconcile`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciled {
    /// Nothing changes.
    Keep,
    /// The node joins (with a fresh address and MAC).
    Join {
        /// Whether a selector brings it in.
        via_selector: bool,
    },
    /// The node stays, with `via_selector` updated.
    Update {
        /// Whether a selector matches now.
        via_selector: bool,
    },
    /// The node leaves.
    Leave,
}

/// Brings one node's membership of `net` in line with its labels: `default` always, a selector
/// network while one of its selectors matches, an explicit membership kept.
pub fn reconcile(
    net: &NetworkRecord,
    labels: &BTreeMap<String, String>,
    current: Option<&MemberRecord>,
) -> Reconciled {
    let selected = net.selects(labels);
    match current {
        None if net.is_default() || selected => Reconciled::Join {
            via_selector: selected,
        },
        None => Reconciled::Keep,
        Some(m) if m.via_selector == selected => Reconciled::Keep,
        Some(m) if selected || m.explicit || net.is_default() => Reconciled::Update {
            via_selector: selected,
        },
        Some(_) => Reconciled::Leave,
    }
}

crate::event_kinds! {
    /// What overlay networks log.
    pub enum OverlayEvent {
        /// An overlay network was created.
        NetworkCreated => "network_created",
        /// An overlay network was deleted.
        NetworkDeleted => "network_deleted",
        /// An operator changed an overlay network's members or selectors.
        NetworkChanged => "network_changed",
    }
}
