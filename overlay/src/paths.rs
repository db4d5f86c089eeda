//! Which connection carries traffic to each peer, and when to open or close one: a state machine
//! with time passed in.
//!
//! Per peer there are two kinds of path: *direct* (UDP between the two nodes, after NAT traversal)
//! and *relay* (the same QUIC connection, carried through the controller). The rules:
//!
//! - Both sides attempt direct paths, to every candidate endpoint of the peer at once, and ask the
//!   controller to make the peer attempt towards them at the same moment
//!   ([`PathAction::RequestPunch`]): each side's outgoing packets open its own NAT for the other's.
//!   Failed rounds back off exponentially (1 s to 15 s by default) and keep going for as long as
//!   the peer exists, so a pair that is relayed moves to direct when the network lets it.
//! - While no direct path is up, the side with the lower node id opens a relay path; the other
//!   waits for it. Relaying starts at once, so traffic flows while hole punching is still trying.
//! - A relay path that has been redundant for `relay_linger` is closed by the side that opened it;
//!   when the direct path dies (quinn's idle timeout), the relay is reopened at once.
//! - Duplicate connections of one kind (both sides punched and both handshakes won, or two
//!   candidate endpoints worked) are settled without a round trip: the connection opened by the
//!   lower node id wins, and each side only ever closes connections it opened itself, so the two
//!   sides can never close each other's winner.
//!
//! Traffic goes on the winning direct connection if there is one, else on the winning relay one.
//! Frames received on any live connection are accepted, so a switch-over loses nothing that
//! arrives.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use shoal_proto::{NatMapping, NodeId, PathKind, Peer, PeerIndex, RelayReason};

/// The shell's handle for one QUIC connection.
pub type ConnId = u64;

/// Timing knobs. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct PathConfig {
    /// First wait after a failed round of direct attempts (default 1 s); doubles per failed round.
    pub direct_retry_min: Duration,
    /// Longest wait between rounds of direct attempts (default 15 s).
    pub direct_retry_max: Duration,
    /// First wait after a failed relay attempt (default 500 ms); doubles up to `direct_retry_max`.
    pub relay_retry_min: Duration,
    /// How long a relay path stays open after a direct one came up (default 10 s), so a direct path
    /// that dies right after the handshake does not leave the pair with nothing.
    pub relay_linger: Duration,
    /// The most candidate endpoints of one peer attempted per round (default 16, the controller's
    /// own cap): each costs a handshake, so a long list from a netmap or punch is cut to this.
    pub max_candidates: usize,
}

impl Default for PathConfig {
    fn default() -> Self {
        Self {
            direct_retry_min: Duration::from_secs(1),
            direct_retry_max: Duration::from_secs(15),
            relay_retry_min: Duration::from_millis(500),
            relay_linger: Duration::from_secs(10),
            max_candidates: 16,
        }
    }
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathAction {
    /// Open a QUIC connection to the peer at this address; report the outcome with
    /// [`PathManager::connected`] or [`PathManager::attempt_failed`].
    ConnectDirect {
        /// The peer.
        peer: NodeId,
        /// One of its candidate endpoints.
        addr: SocketAddr,
    },
    /// Open a QUIC connection to the peer through the relay.
    ConnectRelay {
        /// The peer.
        peer: NodeId,
        /// Its relay index.
        index: PeerIndex,
    },
    /// Ask the controller to have the peer attempt a direct path towards us now.
    RequestPunch {
        /// The peer.
        peer: NodeId,
    },
    /// Close this connection.
    Close {
        /// Which.
        conn: ConnId,
        /// Why, for the peer's logs.
        reason: &'static str,
    },
}

/// How a direct attempt failed, as far as the shell can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptFailure {
    /// No answer within the handshake timeout: silence, as a NAT or firewall that drops
    /// unsolicited packets gives.
    TimedOut,
    /// An answer that refused: ICMP unreachable, a handshake error, a wrong identity.
    Refused,
}

#[derive(Debug, Clone)]
struct Conn {
    id: ConnId,
    kind: PathKind,
    /// Opened by the lower node id of the pair.
    from_lower: bool,
    ours: bool,
    since: Instant,
    remote: SocketAddr,
}

#[derive(Debug, Clone)]
struct PeerPaths {
    index: PeerIndex,
    endpoints: Vec<SocketAddr>,
    /// The peer's NAT mapping, from the netmap.
    nat: NatMapping,
    /// How the last round of direct attempts ended (`None` until one ends without a path), for
    /// [`PathManager::relay_reason`]. A round fails as a whole: a refusal from any candidate
    /// counts over silence from the others only if none timed out.
    last_failure: Option<AttemptFailure>,
    /// Failures of the round in flight so far.
    round_failures: Vec<AttemptFailure>,
    conns: Vec<Conn>,
    direct_in_flight: usize,
    direct_backoff: Duration,
    next_direct: Instant,
    relay_in_flight: bool,
    relay_backoff: Duration,
    next_relay: Instant,
}

impl PeerPaths {
    fn has(&self, kind: PathKind) -> bool {
        self.conns.iter().any(|c| c.kind == kind)
    }

    /// When the next round of direct attempts is due, if one is wanted: no direct path, none being
    /// attempted, and somewhere to attempt.
    fn direct_due(&self) -> Option<Instant> {
        (!self.has(PathKind::Direct) && self.direct_in_flight == 0 && !self.endpoints.is_empty())
            .then_some(self.next_direct)
    }

    /// When this side should open a relay path, if it should: it has the lower id (`opens_relay`)
    /// and the pair has no path at all and no relay attempt in flight.
    fn relay_due(&self, opens_relay: bool) -> Option<Instant> {
        (opens_relay
            && !self.has(PathKind::Direct)
            && !self.has(PathKind::Relay)
            && !self.relay_in_flight)
            .then_some(self.next_relay)
    }

    /// When a relay this side opened has been redundant for `linger` beside the oldest direct path.
    fn linger_due(&self, linger: Duration) -> Option<Instant> {
        if !self
            .conns
            .iter()
            .any(|c| c.kind == PathKind::Relay && c.ours)
        {
            return None;
        }
        self.conns
            .iter()
            .filter(|c| c.kind == PathKind::Direct)
            .map(|c| c.since)
            .min()
            .map(|t| t + linger)
    }
}

/// The first `max` distinct endpoints, in the order given (the controller lists the observed
/// address first).
fn candidates(endpoints: &[SocketAddr], max: usize) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::with_capacity(endpoints.len().min(max));
    for e in endpoints {
        if out.len() == max {
            break;
        }
        if !out.contains(e) {
            out.push(*e);
        }
    }
    out
}

/// A peer's current route, for the datapath and for path reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The connection frames go on.
    pub conn: ConnId,
    /// Its kind.
    pub kind: PathKind,
    /// Its remote address (a relay address for relayed paths).
    pub remote: SocketAddr,
}

/// Path state for every peer of this node.
#[derive(Debug)]
pub struct PathManager {
    me: NodeId,
    /// This node's NAT mapping, as measured against the controller.
    nat: NatMapping,
    config: PathConfig,
    peers: BTreeMap<NodeId, PeerPaths>,
}

impl PathManager {
    /// A manager for node `me`.
    pub fn new(me: NodeId, config: PathConfig) -> Self {
        Self {
            me,
            nat: NatMapping::Unknown,
            config,
            peers: BTreeMap::new(),
        }
    }

    /// This node's NAT mapping was measured (it only explains relayed paths).
    pub fn set_nat(&mut self, nat: NatMapping) {
        self.nat = nat;
    }

    fn we_are_lower(&self, peer: &NodeId) -> bool {
        self.me < *peer
    }

    /// Whether `peer` is currently a peer (shares a network with this node).
    pub fn is_peer(&self, peer: &NodeId) -> bool {
        self.peers.contains_key(peer)
    }

    /// The peer a relay index belongs to.
    pub fn peer_by_index(&self, index: PeerIndex) -> Option<&NodeId> {
        self.peers
            .iter()
            .find(|(_, p)| p.index == index)
            .map(|(id, _)| id)
    }

    /// Replaces the set of peers (from the netmap). Peers that left get their connections closed;
    /// new ones get their first attempts at the next timeout.
    pub fn set_peers(&mut self, now: Instant, peers: &[Peer]) -> Vec<PathAction> {
        let mut out = Vec::new();
        let gone: Vec<NodeId> = self
            .peers
            .keys()
            .filter(|id| !peers.iter().any(|p| &p.node == *id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(p) = self.peers.remove(&id) {
                out.extend(p.conns.iter().map(|c| PathAction::Close {
                    conn: c.id,
                    reason: "no longer a peer",
                }));
            }
        }
        for peer in peers.iter().filter(|p| p.node != self.me) {
            match self.peers.get_mut(&peer.node) {
                Some(p) => {
                    let endpoints = candidates(&peer.endpoints, self.config.max_candidates);
                    if p.endpoints != endpoints {
                        // New candidates: try them now rather than at the end of a long backoff.
                        p.endpoints = endpoints;
                        p.direct_backoff = self.config.direct_retry_min;
                        p.next_direct = now;
                    }
                    p.index = peer.index;
                    p.nat = peer.nat;
                }
                None => {
                    self.peers.insert(
                        peer.node.clone(),
                        PeerPaths {
                            index: peer.index,
                            endpoints: candidates(&peer.endpoints, self.config.max_candidates),
                            nat: peer.nat,
                            last_failure: None,
                            round_failures: Vec::new(),
                            conns: Vec::new(),
                            direct_in_flight: 0,
                            direct_backoff: self.config.direct_retry_min,
                            next_direct: now,
                            relay_in_flight: false,
                            relay_backoff: self.config.relay_retry_min,
                            next_relay: now,
                        },
                    );
                }
            }
        }
        out.extend(self.handle_timeout(now));
        out
    }

    /// A connection with `peer` completed its handshake (and the shell checked the peer's
    /// identity). `ours` says whether this side opened it.
    pub fn connected(
        &mut self,
        now: Instant,
        peer: &NodeId,
        conn: ConnId,
        kind: PathKind,
        ours: bool,
        remote: SocketAddr,
    ) -> Vec<PathAction> {
        let lower = self.we_are_lower(peer);
        let config = self.config.clone();
        let Some(p) = self.peers.get_mut(peer) else {
            return vec![PathAction::Close {
                conn,
                reason: "not a peer",
            }];
        };
        if ours {
            match kind {
                PathKind::Direct => p.direct_in_flight = p.direct_in_flight.saturating_sub(1),
                PathKind::Relay => p.relay_in_flight = false,
            }
        }
        if kind == PathKind::Direct {
            p.direct_backoff = config.direct_retry_min;
            p.last_failure = None;
            p.round_failures.clear();
        } else {
            p.relay_backoff = config.relay_retry_min;
        }
        p.conns.push(Conn {
            id: conn,
            kind,
            from_lower: ours == lower,
            ours,
            since: now,
            remote,
        });
        settle_duplicates(p, kind)
    }

    /// An attempt this side started failed (handshake timeout, refused, unreachable).
    pub fn attempt_failed(
        &mut self,
        now: Instant,
        peer: &NodeId,
        kind: PathKind,
        how: AttemptFailure,
    ) -> Vec<PathAction> {
        let max = self.config.direct_retry_max;
        let Some(p) = self.peers.get_mut(peer) else {
            return vec![];
        };
        match kind {
            PathKind::Direct => {
                p.direct_in_flight = p.direct_in_flight.saturating_sub(1);
                p.round_failures.push(how);
                if p.direct_in_flight == 0 && !p.has(PathKind::Direct) {
                    p.next_direct = now + p.direct_backoff;
                    p.direct_backoff = (p.direct_backoff * 2).min(max);
                    // Silence from any candidate says more about the NATs than a refusal from
                    // another (a LAN address that is not the peer's answers "unreachable").
                    p.last_failure =
                        Some(if p.round_failures.contains(&AttemptFailure::TimedOut) {
                            AttemptFailure::TimedOut
                        } else {
                            AttemptFailure::Refused
                        });
                    p.round_failures.clear();
                }
            }
            PathKind::Relay => {
                p.relay_in_flight = false;
                p.next_relay = now + p.relay_backoff;
                p.relay_backoff = (p.relay_backoff * 2).min(max);
            }
        }
        vec![]
    }

    /// A connection ended (closed by either side, or timed out).
    pub fn closed(&mut self, now: Instant, conn: ConnId) -> Vec<PathAction> {
        let min = self.config.direct_retry_min;
        for p in self.peers.values_mut() {
            if let Some(pos) = p.conns.iter().position(|c| c.id == conn) {
                let c = p.conns.remove(pos);
                if c.kind == PathKind::Direct && !p.has(PathKind::Direct) {
                    // The direct path died: relay at once, and try direct again soon.
                    p.next_relay = now;
                    p.next_direct = p.next_direct.min(now + min);
                }
                if c.kind == PathKind::Relay {
                    p.next_relay = p.next_relay.max(now);
                }
                break;
            }
        }
        self.handle_timeout(now)
    }

    /// The controller says `peer` is attempting towards us now: attempt towards it too.
    pub fn punch_requested(
        &mut self,
        now: Instant,
        peer: &NodeId,
        endpoints: &[SocketAddr],
    ) -> Vec<PathAction> {
        let Some(p) = self.peers.get_mut(peer) else {
            return vec![];
        };
        if !endpoints.is_empty() {
            p.endpoints = candidates(endpoints, self.config.max_candidates);
        }
        if p.has(PathKind::Direct) || p.direct_in_flight > 0 {
            return vec![];
        }
        p.direct_in_flight = p.endpoints.len();
        p.round_failures.clear();
        p.next_direct = now;
        p.endpoints
            .iter()
            .map(|addr| PathAction::ConnectDirect {
                peer: peer.clone(),
                addr: *addr,
            })
            .collect()
    }

    /// When [`PathManager::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let linger = self.config.relay_linger;
        self.peers
            .iter()
            .flat_map(|(id, p)| {
                [
                    p.direct_due(),
                    p.relay_due(self.we_are_lower(id)),
                    p.linger_due(linger),
                ]
            })
            .flatten()
            .min()
    }

    /// Starts whatever attempts are due and closes relays that have lingered long enough.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<PathAction> {
        let mut out = Vec::new();
        let linger = self.config.relay_linger;
        let me = self.me.clone();
        for (id, p) in self.peers.iter_mut() {
            if p.direct_due().is_some_and(|t| t <= now) {
                p.direct_in_flight = p.endpoints.len();
                p.round_failures.clear();
                // Pessimistically schedule the next round; success or a new netmap resets it.
                p.next_direct = now + p.direct_backoff;
                out.extend(p.endpoints.iter().map(|addr| PathAction::ConnectDirect {
                    peer: id.clone(),
                    addr: *addr,
                }));
                out.push(PathAction::RequestPunch { peer: id.clone() });
            }
            if p.relay_due(me < *id).is_some_and(|t| t <= now) {
                p.relay_in_flight = true;
                out.push(PathAction::ConnectRelay {
                    peer: id.clone(),
                    index: p.index,
                });
            }
            if p.linger_due(linger).is_some_and(|t| t <= now) {
                out.extend(
                    p.conns
                        .iter()
                        .filter(|c| c.kind == PathKind::Relay && c.ours)
                        .map(|c| PathAction::Close {
                            conn: c.id,
                            reason: "a direct path is up",
                        }),
                );
            }
        }
        out
    }

    /// Where frames for `peer` go now.
    pub fn route(&self, peer: &NodeId) -> Option<Route> {
        let p = self.peers.get(peer)?;
        [PathKind::Direct, PathKind::Relay]
            .into_iter()
            .find_map(|kind| winner(p, kind))
            .map(|c| Route {
                conn: c.id,
                kind: c.kind,
                remote: c.remote,
            })
    }

    /// Why traffic to `peer` is not on a direct path: `None` when it is (or the peer is unknown).
    /// Direct attempts go on in the background whatever the reason, so a pair moves to direct as
    /// soon as the network lets it.
    pub fn relay_reason(&self, peer: &NodeId) -> Option<RelayReason> {
        let p = self.peers.get(peer)?;
        if p.has(PathKind::Direct) {
            return None;
        }
        if p.endpoints.is_empty() {
            return Some(RelayReason::NoCandidates);
        }
        let dependent = |n: NatMapping| n == NatMapping::EndpointDependent;
        let known = |n: NatMapping| n != NatMapping::Unknown;
        Some(match p.last_failure {
            None => RelayReason::Trying,
            Some(AttemptFailure::Refused) => RelayReason::Refused,
            Some(AttemptFailure::TimedOut) => match (self.nat, p.nat) {
                (a, b) if dependent(a) && dependent(b) => RelayReason::BothEndpointDependent,
                (a, _) if dependent(a) => RelayReason::LocalEndpointDependent,
                (_, b) if dependent(b) => RelayReason::PeerEndpointDependent,
                (a, b) if known(a) && known(b) => RelayReason::UdpBlocked,
                _ => RelayReason::PunchTimedOut,
            },
        })
    }

    /// Every peer and its route (`None` while no path is up).
    pub fn routes(&self) -> impl Iterator<Item = (&NodeId, Option<Route>)> {
        self.peers.keys().map(|id| (id, self.route(id)))
    }
}

/// The connection of `kind` traffic should use: opened by the lower id if any, oldest first.
fn winner(p: &PeerPaths, kind: PathKind) -> Option<&Conn> {
    p.conns
        .iter()
        .filter(|c| c.kind == kind)
        .min_by_key(|c| (!c.from_lower, c.since, c.id))
}

/// Closes this side's redundant connections of `kind`. Only connections this side opened are ever
/// closed here, so both sides converge on the lower id's connection without closing each other's.
fn settle_duplicates(p: &PeerPaths, kind: PathKind) -> Vec<PathAction> {
    let Some(win) = winner(p, kind).map(|c| c.id) else {
        return vec![];
    };
    p.conns
        .iter()
        .filter(|c| c.kind == kind && c.ours && c.id != win)
        .map(|c| PathAction::Close {
            conn: c.id,
            reason: "duplicate path",
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::NatMapping;

    fn peer(id: &str, index: u32, endpoints: &[&str]) -> Peer {
        Peer {
            node: NodeId(id.into()),
            index: PeerIndex(index),
            key_sha256: [0; 32],
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            nat: NatMapping::Unknown,
            networks: vec![],
        }
    }

    fn n(id: &str) -> NodeId {
        NodeId(id.into())
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lower_id_relays_at_once_and_both_sides_punch() {
        let t0 = Instant::now();
        let mut a = PathManager::new(n("a"), PathConfig::default());
        let out = a.set_peers(t0, &[peer("b", 2, &["192.0.2.2:5000", "10.0.0.2:5000"])]);
        assert_eq!(
            out,
            vec![
                PathAction::ConnectDirect {
                    peer: n("b"),
                    addr: addr("192.0.2.2:5000")
                },
                PathAction::ConnectDirect {
                    peer: n("b"),
                    addr: addr("10.0.0.2:5000")
                },
                PathAction::RequestPunch { peer: n("b") },
                PathAction::ConnectRelay {
                    peer: n("b"),
                    index: PeerIndex(2)
                },
            ]
        );
        let mut b = PathManager::new(n("b"), PathConfig::default());
        let out = b.set_peers(t0, &[peer("a", 1, &["192.0.2.1:5000"])]);
        assert!(
            !out.iter()
                .any(|a| matches!(a, PathAction::ConnectRelay { .. })),
            "the higher id waits for the relay"
        );
        assert!(out.contains(&PathAction::ConnectDirect {
            peer: n("a"),
            addr: addr("192.0.2.1:5000")
        }));
    }

    #[test]
    fn relay_carries_traffic_until_direct_comes_up_then_lingers_and_closes() {
        let t0 = Instant::now();
        let cfg = PathConfig::default();
        let mut a = PathManager::new(n("a"), cfg.clone());
        a.set_peers(t0, &[peer("b", 2, &["192.0.2.2:5000"])]);
        let relay = relay_addr_for(2);
        a.connected(t0, &n("b"), 1, PathKind::Relay, true, relay);
        assert_eq!(a.route(&n("b")).map(|r| r.kind), Some(PathKind::Relay));
        let t1 = t0 + Duration::from_millis(300);
        assert!(a
            .connected(
                t1,
                &n("b"),
                2,
                PathKind::Direct,
                true,
                addr("192.0.2.2:5000")
            )
            .is_empty());
        assert_eq!(
            a.route(&n("b")).map(|r| (r.kind, r.conn)),
            Some((PathKind::Direct, 2))
        );
        assert_eq!(a.poll_timeout(), Some(t1 + cfg.relay_linger));
        assert!(a
            .handle_timeout(t1 + cfg.relay_linger - Duration::from_millis(1))
            .is_empty());
        assert_eq!(
            a.handle_timeout(t1 + cfg.relay_linger),
            vec![PathAction::Close {
                conn: 1,
                reason: "a direct path is up"
            }]
        );
    }

    fn relay_addr_for(i: u32) -> SocketAddr {
        crate::relay_socket::relay_addr(PeerIndex(i))
    }

    #[test]
    fn dead_direct_path_falls_back_to_relay_at_once_and_retries_direct() {
        let t0 = Instant::now();
        let mut a = PathManager::new(n("a"), PathConfig::default());
        a.set_peers(t0, &[peer("b", 2, &["192.0.2.2:5000"])]);
        a.connected(
            t0,
            &n("b"),
            1,
            PathKind::Direct,
            true,
            addr("192.0.2.2:5000"),
        );
        a.attempt_failed(t0, &n("b"), PathKind::Relay, AttemptFailure::TimedOut);
        let t1 = t0 + Duration::from_millis(100);
        let out = a.closed(t1, 1);
        assert!(
            out.contains(&PathAction::ConnectRelay {
                peer: n("b"),
                index: PeerIndex(2)
            }),
            "{out:?}"
        );
        assert_eq!(a.route(&n("b")), None);
        // Direct is retried within the minimum backoff.
        let retry = a.poll_timeout().unwrap();
        assert!(retry <= t1 + Duration::from_secs(1) && retry > t1);
        let out = a.handle_timeout(retry);
        assert!(
            out.contains(&PathAction::ConnectDirect {
                peer: n("b"),
                addr: addr("192.0.2.2:5000")
            }),
            "{out:?}"
        );
    }

    #[test]
    fn failed_rounds_back_off_exponentially_up_to_the_cap() {
        let t0 = Instant::now();
        let cfg = PathConfig::default();
        let mut a = PathManager::new(n("b"), cfg.clone());
        a.set_peers(t0, &[peer("a", 1, &["192.0.2.1:5000"])]);
        let mut now = t0;
        let mut gaps = Vec::new();
        for _ in 0..6 {
            a.attempt_failed(now, &n("a"), PathKind::Direct, AttemptFailure::TimedOut);
            let next = a.poll_timeout().unwrap();
            gaps.push(next - now);
            now = next;
            let out = a.handle_timeout(now);
            assert!(out
                .iter()
                .any(|x| matches!(x, PathAction::ConnectDirect { .. })));
        }
        assert_eq!(gaps, [1, 2, 4, 8, 15, 15].map(Duration::from_secs));
    }

    #[test]
    fn duplicates_settle_on_the_lower_ids_connection_without_closing_each_others() {
        let t0 = Instant::now();
        let mut a = PathManager::new(n("a"), PathConfig::default());
        let mut b = PathManager::new(n("b"), PathConfig::default());
        a.set_peers(t0, &[peer("b", 2, &["192.0.2.2:5000"])]);
        b.set_peers(t0, &[peer("a", 1, &["192.0.2.1:5000"])]);
        // Both punched; B's handshake completed first everywhere, then A's.
        assert!(a
            .connected(
                t0,
                &n("b"),
                20,
                PathKind::Direct,
                false,
                addr("192.0.2.2:5000")
            )
            .is_empty());
        assert!(b
            .connected(
                t0,
                &n("a"),
                20,
                PathKind::Direct,
                true,
                addr("192.0.2.1:5000")
            )
            .is_empty());
        let t1 = t0 + Duration::from_millis(5);
        let a_out = a.connected(
            t1,
            &n("b"),
            10,
            PathKind::Direct,
            true,
            addr("192.0.2.2:5000"),
        );
        let b_out = b.connected(
            t1,
            &n("a"),
            10,
            PathKind::Direct,
            false,
            addr("192.0.2.1:5000"),
        );
        assert!(a_out.is_empty(), "A never closes B's connection: {a_out:?}");
        assert_eq!(
            b_out,
            vec![PathAction::Close {
                conn: 20,
                reason: "duplicate path"
            }]
        );
        assert_eq!(a.route(&n("b")).map(|r| r.conn), Some(10));
        assert_eq!(b.route(&n("a")).map(|r| r.conn), Some(10));
    }

    #[test]
    fn removed_peer_loses_its_connections_and_unknown_peers_are_refused() {
        let t0 = Instant::now();
        let mut a = PathManager::new(n("a"), PathConfig::default());
        a.set_peers(t0, &[peer("b", 2, &[]), peer("c", 3, &[])]);
        a.connected(t0, &n("b"), 1, PathKind::Relay, true, relay_addr_for(2));
        let out = a.set_peers(t0, &[peer("c", 3, &[])]);
        assert!(out.contains(&PathAction::Close {
            conn: 1,
            reason: "no longer a peer"
        }));
        assert!(!a.is_peer(&n("b")));
        assert_eq!(
            a.connected(t0, &n("x"), 9, PathKind::Direct, false, addr("192.0.2.9:1")),
            vec![PathAction::Close {
                conn: 9,
                reason: "not a peer"
            }]
        );
    }

    #[test]
    fn punch_request_starts_attempts_to_the_fresh_endpoints_once() {
        let t0 = Instant::now();
        let mut b = PathManager::new(n("b"), PathConfig::default());
        b.set_peers(t0, &[peer("a", 1, &["192.0.2.1:5000"])]);
        b.attempt_failed(t0, &n("a"), PathKind::Direct, AttemptFailure::TimedOut);
        let out = b.punch_requested(t0, &n("a"), &[addr("198.51.100.1:6000")]);
        assert_eq!(
            out,
            vec![PathAction::ConnectDirect {
                peer: n("a"),
                addr: addr("198.51.100.1:6000")
            }]
        );
        assert!(
            b.punch_requested(t0, &n("a"), &[]).is_empty(),
            "an attempt is already in flight"
        );
    }

    #[test]
    fn a_long_candidate_list_is_cut_to_the_cap_and_deduplicated() {
        let t0 = Instant::now();
        let mut b = PathManager::new(
            n("b"),
            PathConfig {
                max_candidates: 3,
                ..PathConfig::default()
            },
        );
        let many: Vec<String> = (1..=50).map(|i| format!("192.0.2.{i}:5000")).collect();
        let listed: Vec<&str> = ["192.0.2.1:5000"]
            .into_iter()
            .chain(many.iter().map(String::as_str))
            .collect();
        let out = b.set_peers(t0, &[peer("a", 1, &listed)]);
        let attempts: Vec<_> = out
            .iter()
            .filter(|a| matches!(a, PathAction::ConnectDirect { .. }))
            .collect();
        assert_eq!(attempts.len(), 3, "{out:?}");
        assert!(attempts.iter().any(|a| matches!(a, PathAction::ConnectDirect { addr: x, .. } if *x == addr("192.0.2.3:5000"))));
        for _ in 0..3 {
            b.attempt_failed(t0, &n("a"), PathKind::Direct, AttemptFailure::TimedOut);
        }
        let punched: Vec<SocketAddr> = many.iter().map(|m| addr(m)).collect();
        assert_eq!(b.punch_requested(t0, &n("a"), &punched).len(), 3);
    }

    fn peer_behind(id: &str, index: u32, endpoints: &[&str], nat: NatMapping) -> Peer {
        Peer {
            nat,
            ..peer(id, index, endpoints)
        }
    }

    /// Runs one whole round of direct attempts from `a` to `b` that all fail with `how`.
    fn fail_round(m: &mut PathManager, now: Instant, peer: &str, how: AttemptFailure) {
        let out = m.handle_timeout(now);
        let attempts = out
            .iter()
            .filter(|x| matches!(x, PathAction::ConnectDirect { .. }))
            .count();
        assert!(attempts > 0, "a round is due at {now:?}: {out:?}");
        for _ in 0..attempts {
            m.attempt_failed(now, &n(peer), PathKind::Direct, how);
        }
    }

    #[test]
    fn relayed_paths_say_which_nat_behaviour_blocked_the_direct_one() {
        use AttemptFailure::{Refused, TimedOut};
        use NatMapping::{EndpointDependent as Edm, EndpointIndependent as Eim, None as NoNat};
        use RelayReason::*;
        let cases = [
            (Edm, Edm, TimedOut, BothEndpointDependent),
            (Edm, Eim, TimedOut, LocalEndpointDependent),
            (NoNat, Edm, TimedOut, PeerEndpointDependent),
            (Eim, Eim, TimedOut, UdpBlocked),
            (NoNat, Eim, TimedOut, UdpBlocked),
            (NatMapping::Unknown, Eim, TimedOut, PunchTimedOut),
            (Eim, Eim, Refused, RelayReason::Refused),
            (Edm, Edm, Refused, RelayReason::Refused),
        ];
        for (mine, theirs, how, want) in cases {
            let t0 = Instant::now();
            let mut a = PathManager::new(n("a"), PathConfig::default());
            a.set_nat(mine);
            a.set_peers(
                t0,
                &[peer_behind(
                    "b",
                    2,
                    &["192.0.2.2:5000", "10.0.0.2:5000"],
                    theirs,
                )],
            );
            a.connected(t0, &n("b"), 1, PathKind::Relay, true, relay_addr_for(2));
            assert_eq!(a.relay_reason(&n("b")), Some(Trying), "round still running");
            a.attempt_failed(t0, &n("b"), PathKind::Direct, how);
            assert_eq!(a.relay_reason(&n("b")), Some(Trying), "one candidate left");
            a.attempt_failed(t0, &n("b"), PathKind::Direct, how);
            assert_eq!(
                a.relay_reason(&n("b")),
                Some(want),
                "{mine:?} behind us, {theirs:?} behind the peer, {how:?}"
            );
        }
    }

    #[test]
    fn silence_from_one_candidate_outweighs_a_refusal_from_another() {
        let t0 = Instant::now();
        let mut a = PathManager::new(n("a"), PathConfig::default());
        a.set_nat(NatMapping::EndpointDependent);
        a.set_peers(
            t0,
            &[peer_behind(
                "b",
                2,
                &["192.0.2.2:5000", "10.0.0.2:5000"],
                NatMapping::EndpointDependent,
            )],
        );
        // The LAN address is not the peer's and answers "unreachable"; the public one is silent.
        a.attempt_failed(t0, &n("b"), PathKind::Direct, AttemptFailure::Refused);
        a.attempt_failed(t0, &n("b"), PathKind::Direct, AttemptFailure::TimedOut);
        assert_eq!(
            a.relay_reason(&n("b")),
            Some(RelayReason::BothEndpointDependent)
        );
    }

    #[test]
    fn a_peer_without_addresses_is_relayed_for_want_of_candidates_and_direct_has_no_reason() {
        let t0 = Instant::now();
        let mut a = PathManager::new(n("a"), PathConfig::default());
        a.set_peers(t0, &[peer("b", 2, &[]), peer("c", 3, &["192.0.2.3:5000"])]);
        assert_eq!(a.relay_reason(&n("b")), Some(RelayReason::NoCandidates));
        a.connected(
            t0,
            &n("c"),
            1,
            PathKind::Direct,
            true,
            addr("192.0.2.3:5000"),
        );
        assert_eq!(a.relay_reason(&n("c")), None);
        assert_eq!(a.relay_reason(&n("x")), None, "not a peer");
    }

    #[test]
    fn a_relayed_pair_keeps_trying_direct_with_backoff_and_moves_to_it_when_it_works() {
        let t0 = Instant::now();
        let cfg = PathConfig::default();
        let mut a = PathManager::new(n("a"), cfg.clone());
        a.set_nat(NatMapping::EndpointIndependent);
        let b = peer_behind("b", 2, &["192.0.2.2:5000"], NatMapping::EndpointIndependent);
        a.set_peers(t0, &[b]);
        a.connected(t0, &n("b"), 1, PathKind::Relay, true, relay_addr_for(2));
        // A firewall drops the pair's UDP for a minute: every round times out.
        a.attempt_failed(t0, &n("b"), PathKind::Direct, AttemptFailure::TimedOut);
        let mut now = t0;
        let mut rounds = 1;
        while now < t0 + Duration::from_secs(60) {
            now = a.poll_timeout().expect("direct attempts never stop");
            fail_round(&mut a, now, "b", AttemptFailure::TimedOut);
            rounds += 1;
            assert_eq!(a.route(&n("b")).map(|r| r.kind), Some(PathKind::Relay));
            assert_eq!(a.relay_reason(&n("b")), Some(RelayReason::UdpBlocked));
        }
        // 1 + 2 + 4 + 8 s, then every 15 s: the backoff is capped, never given up.
        assert!((6..=8).contains(&rounds), "{rounds} rounds in a minute");
        // The rule is lifted: the next round's handshake completes.
        let next = a.poll_timeout().unwrap();
        assert!(next - now <= cfg.direct_retry_max);
        let out = a.handle_timeout(next);
        assert!(out.contains(&PathAction::ConnectDirect {
            peer: n("b"),
            addr: addr("192.0.2.2:5000")
        }));
        a.connected(
            next,
            &n("b"),
            2,
            PathKind::Direct,
            true,
            addr("192.0.2.2:5000"),
        );
        assert_eq!(
            a.route(&n("b")).map(|r| (r.kind, r.conn)),
            Some((PathKind::Direct, 2))
        );
        assert_eq!(a.relay_reason(&n("b")), None);
        assert_eq!(
            a.handle_timeout(next + cfg.relay_linger),
            vec![PathAction::Close {
                conn: 1,
                reason: "a direct path is up"
            }]
        );
        // When that direct path dies later, the pair relays at once and tries direct again at
        // once, then from the shortest backoff.
        a.closed(next + cfg.relay_linger, 1);
        let t2 = next + Duration::from_secs(100);
        let out = a.closed(t2, 2);
        for want in [
            PathAction::ConnectRelay {
                peer: n("b"),
                index: PeerIndex(2),
            },
            PathAction::ConnectDirect {
                peer: n("b"),
                addr: addr("192.0.2.2:5000"),
            },
        ] {
            assert!(out.contains(&want), "{want:?} in {out:?}");
        }
        a.attempt_failed(t2, &n("b"), PathKind::Direct, AttemptFailure::TimedOut);
        assert_eq!(a.poll_timeout(), Some(t2 + cfg.direct_retry_min));
    }
}
