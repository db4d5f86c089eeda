//! The controller's overlay shell: the coordinator behind a lock, the links to connected overlay
//! agents, the relay, the NAT probe port, and the latest path reports.
//!
//! Ordering: deltas are computed and queued under one lock, into one unbounded queue per agent that
//! only that agent's connection task drains, so each agent sees its deltas in version order and
//! never before the full netmap it was subscribed with.
//!
//! The relay never takes that lock. Each node's networks are kept beside it as a [`Reach`],
//! replaced whole under the lock when the node's membership changes and read by the relay tasks
//! without it; so a packet is forwarded, or refused, against the membership as it is at that
//! moment, and a netmap computation never stalls forwarding.
//!
//! What one node sends here is bounded so that it cannot make the controller flood its peers or
//! starve other nodes' relayed traffic ([`OverlayLimits`]): `OverlayHello`s per connection, punch
//! requests per pair and per node, path reports per node (and their contents, [`bound_report`]),
//! relayed packets and bytes per connection. What is refused is counted ([`HubCounters`]) and
//! logged at debug level.
//!
//! With several controllers ([`MeshPort`], set when the controller mesh starts), the hub tells the
//! others about its agents' subscriptions and membership changes, and takes theirs as remote
//! subscribers of its coordinator. A punch request for a node on another controller is passed to
//! that controller; a relayed packet for one goes there as a datagram on the mesh link (the
//! sender's rate is charged here, where it entered), and the receiving controller checks the pair
//! shares a network before handing it to its agent. The mesh port is called under the hub's lock
//! (so other controllers hear of changes in the order they were made); it only queues.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use shoal_overlay::{
    relay_socket::{parse_relay_datagram, relay_datagram},
    send_msg,
};
use shoal_proto::{
    ControllerMsg, DatapathReport, NetworkId, NodeId, Observed, OverlayHello, PathKind, PathReport,
    PathReportV8, PeerIndex, Punch, RelayReason, UnixMillis,
};
use tracing::{debug, info, warn};

use crate::{server::now_ms, store::Store};
use shoal_controller_core::coordinator::{Coordinator, Delivery, Subscription};
use shoal_controller_core::networks::MembershipChange;

/// What the overlay tells the other controllers of the cluster.
#[derive(Debug, Clone, PartialEq)]
pub enum OverlayNews {
    /// A local agent subscribed, or said hello again with other endpoints.
    Subscribed(Subscription),
    /// A local agent's session ended.
    Left(NodeId),
    /// Membership changed (made here, stored in the shared store).
    Membership(Vec<MembershipChange>),
    /// A node's key changed here (withdrawn, rotated, re-enrolled).
    Key {
        /// The node.
        node: NodeId,
        /// Its new key hash.
        key: [u8; 32],
    },
}

/// How the hub reaches the other controllers (the controller mesh). Every call only queues, and
/// never calls back into the hub.
pub trait MeshPort: Send + Sync + std::fmt::Debug {
    /// Tells every other controller, best effort (a controller without a link now hears it all in
    /// the snapshot when its link is back).
    fn broadcast(&self, news: OverlayNews);
    /// Queues `msg` for `node` on `controller`, which holds its session; false if it cannot go.
    fn deliver(&self, controller: &str, node: &NodeId, msg: ControllerMsg) -> bool;
    /// Sends `packet`, relayed from `from` to `to`, to `controller`, which holds `to`'s session;
    /// false if it was dropped.
    fn relay(&self, controller: &str, to: PeerIndex, from: PeerIndex, packet: &[u8]) -> bool;
}

/// A refill rate and a bucket size, for [`TokenBucket`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: f64,
    /// The most tokens the bucket holds: what may be spent at once after a quiet spell.
    pub burst: f64,
}

/// A token bucket with time passed in. It starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: rate.burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_sec).min(rate.burst);
        self.at = self.at.max(now);
    }

    /// Whether `cost` tokens are there at `now` (refilling first), without taking them.
    pub fn has(&mut self, rate: Rate, now: Instant, cost: f64) -> bool {
        self.refill(rate, now);
        self.tokens >= cost
    }

    /// Takes `cost` tokens if they are there at `now`.
    pub fn take(&mut self, rate: Rate, now: Instant, cost: f64) -> bool {
        let ok = self.has(rate, now, cost);
        if ok {
            self.tokens -= cost;
        }
        ok
    }

    /// Whether the bucket is full at `now`: it then carries no state worth keeping.
    fn is_full(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        self.tokens >= rate.burst
    }
}

/// What one node may send the overlay hub. Every field has a documented default, sized so that a
/// well-behaved agent never meets it.
#[derive(Debug, Clone)]
pub struct OverlayLimits {
    /// `OverlayHello`s on one connection after its first (which is always served): default 10 at
    /// once, then one per 5 s. An agent sends one when it connects, one when its NAT is measured,
    /// and one per netmap gap; each may cost a delta to every peer.
    pub hellos: Rate,
    /// Punch requests from one node towards one peer: default 3 at once, then one per 2 s. The
    /// agent asks once per round of direct attempts, and rounds back off from 1 s to 15 s.
    pub punches_per_pair: Rate,
    /// Punch requests from one node in all: default 256 at once (a node that just joined asks
    /// for every peer), then 20 per second.
    pub punches_per_node: Rate,
    /// Path reports from one node: default 5 at once, then one per second (agents report every 5
    /// s).
    pub reports: Rate,
    /// Drop reasons kept from one path report (default 64; the agent knows about 25).
    pub report_drop_reasons: usize,
    /// Relayed packets from one connection: default 16 384 per second, 4 096 at once.
    pub relay_packets: Rate,
    /// Relayed bytes from one connection: default 16 MiB per second (128 Mbit/s), 4 MiB at once.
    /// Beyond it packets are dropped like on a congested link, and the peers' QUIC backs off.
    pub relay_bytes: Rate,
    /// Relayed bytes from one connection to one destination: default 8 MiB per second (64
    /// Mbit/s), 2 MiB at once. Below the sender's whole budget, so one busy pair leaves room for
    /// the sender's other pairs; the relay is a fallback, and a pair moves to a direct path as soon
    /// as one works.
    pub relay_pair_bytes: Rate,
    /// Destinations one connection keeps a pair budget for (default 1024); idle (full) budgets
    /// are dropped beyond it, so a sender spraying relay indexes costs bounded memory.
    pub relay_pair_budgets: usize,
}

impl Default for OverlayLimits {
    fn default() -> Self {
        const MIB: f64 = 1024.0 * 1024.0;
        Self {
            hellos: Rate {
                per_sec: 0.2,
                burst: 10.0,
            },
            punches_per_pair: Rate {
                per_sec: 0.5,
                burst: 3.0,
            },
            punches_per_node: Rate {
                per_sec: 20.0,
                burst: 256.0,
            },
            reports: Rate {
                per_sec: 1.0,
                burst: 5.0,
            },
            report_drop_reasons: 64,
            relay_packets: Rate {
                per_sec: 16_384.0,
                burst: 4096.0,
            },
            relay_bytes: Rate {
                per_sec: 16.0 * MIB,
                burst: 4.0 * MIB,
            },
            relay_pair_bytes: Rate {
                per_sec: 8.0 * MIB,
                burst: 2.0 * MIB,
            },
            relay_pair_budgets: 1024,
        }
    }
}

impl OverlayLimits {
    /// These limits with the relay's per-pair byte rate set to `mbit` megabits per second and a
    /// quarter second of burst.
    pub fn with_relay_pair_mbit(self, mbit: f64) -> Self {
        let per_sec = mbit * 1e6 / 8.0;
        Self {
            relay_pair_bytes: Rate {
                per_sec,
                burst: per_sec / 4.0,
            },
            ..self
        }
    }

    /// These limits with the relay's per-sender byte rate set to `mbit` megabits per second and
    /// its packet rate scaled with it (the defaults' 1 KiB per packet), a quarter second of burst
    /// each.
    pub fn with_relay_sender_mbit(self, mbit: f64) -> Self {
        let per_sec = mbit * 1e6 / 8.0;
        let packets = per_sec / 1024.0;
        Self {
            relay_bytes: Rate {
                per_sec,
                burst: per_sec / 4.0,
            },
            relay_packets: Rate {
                per_sec: packets,
                burst: packets / 4.0,
            },
            ..self
        }
    }
}

/// Why a punch request was not passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PunchRefusal {
    /// The pair's budget is spent.
    PairRate,
    /// The asking node's budget is spent.
    NodeRate,
}

/// Per-node budgets that outlive a connection, so reconnecting does not refill them.
#[derive(Debug)]
struct NodeLimits {
    punches: TokenBucket,
    pairs: HashMap<NodeId, TokenBucket>,
    reports: TokenBucket,
}

/// Pair budgets kept per node before full (idle) ones are dropped.
const PAIR_BUCKETS_BEFORE_PRUNING: usize = 64;

impl NodeLimits {
    fn new(limits: &OverlayLimits, now: Instant) -> Self {
        Self {
            punches: TokenBucket::full(limits.punches_per_node, now),
            pairs: HashMap::new(),
            reports: TokenBucket::full(limits.reports, now),
        }
    }

    /// Charges a punch towards `to` to both the pair's and the node's budget, or to neither.
    fn punch(
        &mut self,
        limits: &OverlayLimits,
        now: Instant,
        to: &NodeId,
    ) -> Result<(), PunchRefusal> {
        if self.pairs.len() >= PAIR_BUCKETS_BEFORE_PRUNING && !self.pairs.contains_key(to) {
            self.pairs
                .retain(|_, b| !b.is_full(limits.punches_per_pair, now));
        }
        let pair = self
            .pairs
            .entry(to.clone())
            .or_insert_with(|| TokenBucket::full(limits.punches_per_pair, now));
        if !pair.has(limits.punches_per_pair, now, 1.0) {
            return Err(PunchRefusal::PairRate);
        }
        if !self.punches.take(limits.punches_per_node, now, 1.0) {
            return Err(PunchRefusal::NodeRate);
        }
        pair.take(limits.punches_per_pair, now, 1.0);
        Ok(())
    }
}

/// Bounds a node's path report: only paths to its peers (`is_peer`), one per peer, with a finite
/// round-trip time; at most `max_reasons` drop reasons, each a snake_case label of at most 32
/// characters, once. Returns the report and how many entries were left out.
pub fn bound_report(
    mut report: PathReport,
    is_peer: impl Fn(&NodeId) -> bool,
    max_reasons: usize,
) -> (PathReport, usize) {
    let before = report.paths.len() + report.counters.dropped.len();
    let mut seen = HashSet::new();
    report
        .paths
        .retain(|p| is_peer(&p.peer) && seen.insert(p.peer.clone()));
    for p in &mut report.paths {
        if !p.rtt_ms.is_finite() || p.rtt_ms < 0.0 {
            p.rtt_ms = 0.0;
        }
    }
    let label_ok = |l: &str| {
        (1..=32).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    let mut labels = HashSet::new();
    report
        .counters
        .dropped
        .retain(|(l, _)| label_ok(l) && labels.len() < max_reasons && labels.insert(l.clone()));
    let after = report.paths.len() + report.counters.dropped.len();
    (report, before - after)
}

/// The networks one node is in, as the relay reads them: replaced whole under the hub's lock,
/// read without it.
#[derive(Debug, Default)]
pub struct Reach(RwLock<Arc<[NetworkId]>>);

impl Reach {
    fn set(&self, mut networks: Vec<NetworkId>) {
        networks.sort_unstable();
        let networks: Arc<[NetworkId]> = networks.into();
        // The write lock is held for a pointer swap only; the old list is freed after it.
        let old = std::mem::replace(
            &mut *self.0.write().unwrap_or_else(|p| p.into_inner()),
            networks,
        );
        drop(old);
    }

    fn get(&self) -> Arc<[NetworkId]> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the two share a network now.
    pub fn shares(&self, other: &Reach) -> bool {
        let (a, b) = (self.get(), other.get());
        a.iter().any(|n| b.binary_search(n).is_ok())
    }
}

pub use shoal_api::refusals::HubCounters;

#[derive(Debug, Default)]
struct HubStats {
    hellos_refused: AtomicU64,
    punches_unshared: AtomicU64,
    punches_rate_limited: AtomicU64,
    reports_refused: AtomicU64,
    report_entries_refused: AtomicU64,
    relay_rate_limited: AtomicU64,
    relay_pair_rate_limited: AtomicU64,
    relay_unshared: AtomicU64,
    relay_no_target: AtomicU64,
    punches_undelivered: AtomicU64,
    relay_mesh_dropped: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

#[derive(Debug)]
struct Link {
    conn_id: u64,
    tx: crate::connections::queue::NodeTx,
    index: PeerIndex,
    hellos: TokenBucket,
    /// When its latest hello was accepted: what the other controllers order subscriptions by.
    since: UnixMillis,
    /// The latest hello served, its key and the address the connection came from then: what
    /// [`OverlayHub::recheck_observed`] subscribes again with when the address changes.
    hello: OverlayHello,
    key: [u8; 32],
    observed: SocketAddr,
}

#[derive(Debug)]
struct HubState {
    coordinator: Coordinator,
    links: HashMap<NodeId, Link>,
    /// Every node that said hello (or is relaying), with its networks as the relay sees them.
    reach: HashMap<NodeId, Arc<Reach>>,
    limits: HashMap<NodeId, NodeLimits>,
}

impl HubState {
    /// `node`'s reach, created (from the coordinator) if it has none yet.
    fn reach(&mut self, node: &NodeId) -> Arc<Reach> {
        if let Some(r) = self.reach.get(node) {
            return r.clone();
        }
        let r = Arc::new(Reach::default());
        r.set(self.coordinator.networks_of(node));
        self.reach.insert(node.clone(), r.clone());
        r
    }
}

/// One relay destination: a connected node's control connection.
#[derive(Debug)]
struct RelayTarget {
    node: NodeId,
    conn: quinn::Connection,
    reach: Arc<Reach>,
}

/// A node whose session another controller holds, as the relay reads it.
#[derive(Debug)]
struct RemotePeer {
    node: NodeId,
    controller: String,
    reach: Arc<Reach>,
}

/// Where a relayed packet goes next.
#[derive(Debug)]
enum Hop {
    /// To a node connected here.
    Local(Arc<RelayTarget>),
    /// To the controller holding the node's session.
    Remote(Arc<RemotePeer>),
}

/// A path report as last received.
#[derive(Debug, Clone)]
pub struct ReportedPaths {
    /// The report.
    pub report: PathReport,
    /// (v8) Why each relayed path of `report` is relayed, where the agent said.
    pub relayed: HashMap<NodeId, RelayReason>,
    /// When it arrived.
    pub at: UnixMillis,
}

/// See the module docs.
#[derive(Debug)]
pub struct OverlayHub {
    state: Mutex<HubState>,
    /// Relay index → the control connection of the node that has it. Written when an agent joins
    /// or leaves the overlay, read per relayed packet.
    relays: RwLock<HashMap<PeerIndex, Arc<RelayTarget>>>,
    /// Relay index → the node on another controller that has it. Written under the hub's lock,
    /// read per relayed packet.
    remote: RwLock<HashMap<PeerIndex, Arc<RemotePeer>>>,
    /// The other controllers, once the mesh runs.
    mesh: std::sync::OnceLock<Arc<dyn MeshPort>>,
    paths: Mutex<HashMap<NodeId, ReportedPaths>>,
    /// (v9) Each node's last datapath report and when it arrived (bounded by `shoal_proto::limits`;
    /// one per node, replaced by the next).
    datapath: Mutex<HashMap<NodeId, (DatapathReport, UnixMillis)>>,
    probe_port: Mutex<Option<u16>>,
    limits: OverlayLimits,
    stats: HubStats,
}

impl OverlayHub {
    /// Loads the overlay state from the store; a new netmap epoch starts with every controller run.
    pub fn open(store: &Store, validity: Duration) -> Result<OverlayHub, crate::store::StoreError> {
        Self::open_with_limits(store, validity, OverlayLimits::default())
    }

    /// [`OverlayHub::open`] with other limits on what nodes may send.
    pub fn open_with_limits(
        store: &Store,
        validity: Duration,
        limits: OverlayLimits,
    ) -> Result<OverlayHub, crate::store::StoreError> {
        let epoch = store.next_netmap_epoch()?;
        let snapshot = store.overlay_snapshot()?;
        Ok(OverlayHub {
            state: Mutex::new(HubState {
                coordinator: Coordinator::new(epoch, snapshot, validity),
                links: HashMap::new(),
                reach: HashMap::new(),
                limits: HashMap::new(),
            }),
            relays: RwLock::new(HashMap::new()),
            remote: RwLock::new(HashMap::new()),
            mesh: std::sync::OnceLock::new(),
            paths: Mutex::new(HashMap::new()),
            datapath: Mutex::new(HashMap::new()),
            probe_port: Mutex::new(None),
            limits,
            stats: HubStats::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the NAT probe port told to agents.
    pub fn set_probe_port(&self, port: Option<u16>) {
        *self.probe_port.lock().unwrap_or_else(|p| p.into_inner()) = port;
    }

    /// What the hub refused since it started.
    pub fn counters(&self) -> HubCounters {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HubCounters {
            hellos_refused: get(&s.hellos_refused),
            punches_unshared: get(&s.punches_unshared),
            punches_rate_limited: get(&s.punches_rate_limited),
            reports_refused: get(&s.reports_refused),
            report_entries_refused: get(&s.report_entries_refused),
            relay_rate_limited: get(&s.relay_rate_limited),
            relay_pair_rate_limited: get(&s.relay_pair_rate_limited),
            relay_unshared: get(&s.relay_unshared),
            relay_no_target: get(&s.relay_no_target),
            punches_undelivered: get(&s.punches_undelivered),
            relay_mesh_dropped: get(&s.relay_mesh_dropped),
        }
    }

    /// Connects the hub to the other controllers; the first call wins.
    pub fn set_mesh(&self, port: Arc<dyn MeshPort>) {
        let _ = self.mesh.set(port);
    }

    fn tell_mesh(&self, news: impl FnOnce() -> Option<OverlayNews>) {
        if let Some(port) = self.mesh.get() {
            if let Some(news) = news() {
                port.broadcast(news);
            }
        }
    }

    /// Makes the relay's route to `node` match the coordinator: through the controller holding its
    /// session when that is another one, none otherwise. Called under the hub's lock.
    fn sync_route(&self, st: &mut HubState, node: &NodeId) {
        let Some(index) = st.coordinator.index_of(node) else {
            return;
        };
        let holder = st.coordinator.remote_holder(node).map(str::to_owned);
        let peer = holder.map(|controller| {
            let reach = st.reach(node);
            reach.set(st.coordinator.networks_of(node));
            Arc::new(RemotePeer {
                node: node.clone(),
                controller,
                reach,
            })
        });
        let mut routes = self.remote.write().unwrap_or_else(|p| p.into_inner());
        match peer {
            Some(p) => {
                routes.insert(index, p);
            }
            None => {
                if routes.get(&index).is_some_and(|r| r.node == *node) {
                    routes.remove(&index);
                }
            }
        }
    }

    /// Calls `f` with every local subscription, under the hub's lock: a mesh link that starts
    /// with this snapshot, and is registered inside `f`, misses no later change.
    pub fn with_subscriptions<R>(&self, f: impl FnOnce(Vec<Subscription>) -> R) -> R {
        let st = self.state();
        let subs = st
            .links
            .iter()
            .filter_map(|(node, link)| st.coordinator.subscription(node, link.since))
            .collect();
        f(subs)
    }

    /// What another controller (`controller`) says about its agents' subscriptions: with `reset`,
    /// it is saying them all again. Their peers here get deltas; their places in netmaps outlive
    /// `controller` (see the coordinator).
    pub fn remote_subscriptions(
        &self,
        controller: &str,
        reset: bool,
        up: Vec<Subscription>,
        left: Vec<NodeId>,
    ) {
        let now = now_ms();
        let mut guard = self.state();
        let st = &mut *guard;
        if reset {
            for node in st.coordinator.reset_remote(controller) {
                self.sync_route(st, &node);
            }
        }
        for sub in up {
            let node = sub.node.clone();
            let (taken, deliveries) = st.coordinator.subscribe_remote(controller, sub, now);
            if !taken {
                debug!(node = %node, controller, "older overlay subscription from another controller ignored");
                continue;
            }
            Self::send_all(&st.links, deliveries);
            self.sync_route(st, &node);
        }
        for node in left {
            if st.coordinator.unsubscribe_remote(controller, &node) {
                self.sync_route(st, &node);
            }
        }
    }

    /// Membership changes another controller made (the store already holds them).
    pub fn remote_membership_changed(&self, store: &Store, changes: &[MembershipChange]) {
        self.apply_membership(store, changes);
    }

    /// Brings the coordinator to the store as it is now: for membership and key changes another
    /// controller made while this one could not hear of them (its mesh link was down). The relay
    /// sees the result before this returns.
    pub fn resync(&self, store: &Store) -> Result<(), crate::store::StoreError> {
        let snapshot = store.overlay_snapshot()?;
        let mut guard = self.state();
        let st = &mut *guard;
        let deliveries = st.coordinator.resync(snapshot, now_ms());
        for (node, reach) in &st.reach {
            reach.set(st.coordinator.networks_of(node));
        }
        debug!(
            deliveries = deliveries.len(),
            "overlay state brought to the store's"
        );
        Self::send_all(&st.links, deliveries);
        Ok(())
    }

    /// A node's key changed on another controller (the store already holds it).
    pub fn remote_key_changed(&self, node: &NodeId, key: [u8; 32]) {
        let st = &mut *self.state();
        let Some(index) = st.coordinator.index_of(node) else {
            return;
        };
        let deliveries = st.coordinator.node_known(node, index, Some(key), now_ms());
        Self::send_all(&st.links, deliveries);
    }

    /// The node's current key is no longer trusted (a certificate of it was revoked): its peers get
    /// [`shoal_proto::KEY_WITHDRAWN`] for it, so they close their paths to it and refuse new ones
    /// until it connects with a new key. Persisted, so a restart does not trust the key again.
    pub fn withdraw_key(
        &self,
        store: &Store,
        node: &NodeId,
    ) -> Result<(), crate::store::StoreError> {
        self.key_changed(store, node, shoal_proto::KEY_WITHDRAWN)
    }

    /// The node is bound to another key now (re-enrolment, withdrawal): its peers learn it at once,
    /// so they close paths made with the old key and refuse new ones.
    pub fn key_changed(
        &self,
        store: &Store,
        node: &NodeId,
        key: [u8; 32],
    ) -> Result<(), crate::store::StoreError> {
        let index = match store.peer_index(node) {
            Ok(i) => i,
            Err(_) => return Ok(()), // not in any network
        };
        store.set_node_key(node, key)?;
        let st = &mut *self.state();
        let deliveries = st.coordinator.node_known(node, index, Some(key), now_ms());
        Self::send_all(&st.links, deliveries);
        self.tell_mesh(|| {
            Some(OverlayNews::Key {
                node: node.clone(),
                key,
            })
        });
        Ok(())
    }

    fn send_all(links: &HashMap<NodeId, Link>, deliveries: Vec<Delivery>) {
        for (node, msg) in deliveries {
            if let Some(link) = links.get(&node) {
                let _ = link.tx.send(msg);
            }
        }
    }

    /// An agent said it takes part in the overlay (first time on a connection, or again when its
    /// endpoints or NAT changed, or to ask for a full netmap). Returns what to send it now, in
    /// order; nothing when a repeated hello exceeds [`OverlayLimits::hellos`].
    #[allow(clippy::too_many_arguments)]
    pub fn hello(
        &self,
        node: &NodeId,
        conn_id: u64,
        conn: &quinn::Connection,
        tx: &crate::connections::queue::NodeTx,
        index: PeerIndex,
        key: [u8; 32],
        hello: &OverlayHello,
    ) -> Vec<ControllerMsg> {
        let now = now_ms();
        let instant = Instant::now();
        let observed = conn.remote_address();
        let mut guard = self.state();
        let st = &mut *guard;
        let first_on_conn = match st.links.get_mut(node) {
            Some(link) if link.conn_id == conn_id => {
                if !link.hellos.take(self.limits.hellos, instant, 1.0) {
                    bump(&self.stats.hellos_refused, 1);
                    debug!(node = %node, "overlay hello beyond the connection's rate ignored");
                    return vec![];
                }
                false
            }
            _ => true,
        };
        // Known first (with its index); its key goes with its endpoints in one delta to its peers.
        st.coordinator.node_known(node, index, None, now);
        let (netmap, updates) = st
            .coordinator
            .subscribe(node, Some(key), observed, hello, now);
        if first_on_conn {
            let hellos = TokenBucket::full(self.limits.hellos, instant);
            st.links.insert(
                node.clone(),
                Link {
                    conn_id,
                    tx: tx.clone(),
                    index,
                    hellos,
                    since: now,
                    hello: hello.clone(),
                    key,
                    observed,
                },
            );
        } else if let Some(link) = st.links.get_mut(node) {
            link.since = now;
            link.hello = hello.clone();
            link.key = key;
            link.observed = observed;
        }
        let reach = st.reach(node);
        reach.set(st.coordinator.networks_of(node));
        Self::send_all(&st.links, updates);
        self.sync_route(st, node);
        self.tell_mesh(|| {
            st.coordinator
                .subscription(node, now)
                .map(OverlayNews::Subscribed)
        });
        drop(guard);
        let mut out = Vec::new();
        if first_on_conn {
            let target = Arc::new(RelayTarget {
                node: node.clone(),
                conn: conn.clone(),
                reach,
            });
            self.relays
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(index, target);
            let probe_port = *self.probe_port.lock().unwrap_or_else(|p| p.into_inner());
            out.push(ControllerMsg::Observed(Observed {
                address: observed,
                index,
                probe_port,
            }));
        }
        out.push(netmap);
        out
    }

    /// The agent's connection ended.
    pub fn disconnected(&self, node: &NodeId, conn_id: u64) {
        let mut guard = self.state();
        let st = &mut *guard;
        let Some(link) = st.links.get(node) else {
            return;
        };
        if link.conn_id != conn_id {
            return;
        }
        let index = link.index;
        st.links.remove(node);
        // Another controller may hold its new session already: its peers here hear that now.
        let deliveries = st.coordinator.unsubscribe(node, now_ms());
        Self::send_all(&st.links, deliveries);
        self.sync_route(st, node);
        self.tell_mesh(|| Some(OverlayNews::Left(node.clone())));
        drop(guard);
        let mut relays = self.relays.write().unwrap_or_else(|p| p.into_inner());
        if relays.get(&index).is_some_and(|t| t.node == *node) {
            relays.remove(&index);
        }
    }

    /// Membership changed in the store: tell the connected agents concerned. The relay sees the new
    /// membership before this returns, so a node that left a network can no longer relay into it.
    pub fn membership_changed(&self, store: &Store, changes: &[MembershipChange]) {
        if let Some(_held) = self.apply_membership(store, changes) {
            self.tell_mesh(|| Some(OverlayNews::Membership(changes.to_vec())));
        }
    }

    /// Applies membership changes and returns the hub's lock still held (so a broadcast of them
    /// keeps their order), or `None` if there were none.
    fn apply_membership(
        &self,
        store: &Store,
        changes: &[MembershipChange],
    ) -> Option<std::sync::MutexGuard<'_, HubState>> {
        if changes.is_empty() {
            return None;
        }
        let now = now_ms();
        let mut st = self.state();
        for change in changes {
            if let MembershipChange::Joined { node, .. } = change {
                if !st.coordinator.knows(node) {
                    match store.peer_index(node) {
                        Ok(index) => {
                            let key = store.node_key(node).ok().flatten();
                            st.coordinator.node_known(node, index, key, now);
                        }
                        Err(e) => {
                            warn!(node = %node, cause = %e, "no relay index; the node's membership waits for its next connection")
                        }
                    }
                }
            }
        }
        let deliveries = st.coordinator.apply(changes, now);
        for change in changes {
            let node = match change {
                MembershipChange::Joined { node, .. } | MembershipChange::Left { node, .. } => node,
                _ => continue,
            };
            if let Some(reach) = st.reach.get(node) {
                reach.set(st.coordinator.networks_of(node));
            }
        }
        debug!(
            changes = changes.len(),
            deliveries = deliveries.len(),
            "netmap changes sent"
        );
        Self::send_all(&st.links, deliveries);
        Some(st)
    }

    /// A node left the fleet: it can no longer relay, or be relayed to, from this moment.
    pub fn forget(&self, node: &NodeId) {
        let mut st = self.state();
        st.coordinator.forget(node);
        if let Some(reach) = st.reach.remove(node) {
            reach.set(Vec::new());
        }
        st.limits.remove(node);
        self.remote
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, r| r.node != *node);
        drop(st);
        self.paths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
        self.datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
    }

    /// `from` asks `punch.peer` to punch towards it now. Passed on only between nodes that share a
    /// network, within [`OverlayLimits::punches_per_pair`] and [`OverlayLimits::punches_per_node`].
    pub fn punch(&self, from: &NodeId, punch: &Punch) {
        let now = Instant::now();
        let mut guard = self.state();
        let st = &mut *guard;
        if !st.coordinator.share_network(from, &punch.peer) {
            bump(&self.stats.punches_unshared, 1);
            debug!(from = %from, to = %punch.peer, "punch request between nodes that share no network ignored");
            return;
        }
        let limits = st
            .limits
            .entry(from.clone())
            .or_insert_with(|| NodeLimits::new(&self.limits, now));
        if let Err(why) = limits.punch(&self.limits, now, &punch.peer) {
            bump(&self.stats.punches_rate_limited, 1);
            debug!(from = %from, to = %punch.peer, ?why, "punch request beyond its rate ignored");
            return;
        }
        let msg = ControllerMsg::Punch(Punch {
            peer: from.clone(),
            endpoints: st.coordinator.endpoints(from),
        });
        // Another controller's newer session wins over one lingering here.
        if let (Some(port), Some(controller)) =
            (self.mesh.get(), st.coordinator.remote_holder(&punch.peer))
        {
            if !port.deliver(controller, &punch.peer, msg) {
                bump(&self.stats.punches_undelivered, 1);
                debug!(from = %from, to = %punch.peer, controller, "punch request for a node on another controller not passed on");
            }
        } else if let Some(link) = st.links.get(&punch.peer) {
            let _ = link.tx.send(msg);
        }
    }

    /// The node's control connection now comes from another address than at its last hello (its
    /// NAT rebound the mapping, or the node moved, and QUIC followed): its peers get the new
    /// address at once, as after a hello, and the node gets `Observed` (so it measures its NAT
    /// again) and a full netmap. Called on every path report, so a pair whose direct path died
    /// with the old mapping punches to the new one within a report interval instead of staying
    /// relayed. Nothing happens for a connection that is not the node's current one.
    pub fn recheck_observed(
        &self,
        node: &NodeId,
        conn_id: u64,
        conn: &quinn::Connection,
    ) -> Vec<ControllerMsg> {
        let observed = conn.remote_address();
        let now = now_ms();
        let mut guard = self.state();
        let st = &mut *guard;
        let Some(link) = st.links.get_mut(node) else {
            return vec![];
        };
        if link.conn_id != conn_id || link.observed == observed {
            return vec![];
        }
        let old = std::mem::replace(&mut link.observed, observed);
        link.since = now;
        // A full netmap: the node's cached version says nothing about this subscription.
        let hello = OverlayHello {
            netmap_version: None,
            ..link.hello.clone()
        };
        let (key, index) = (link.key, link.index);
        let (netmap, updates) = st
            .coordinator
            .subscribe(node, Some(key), observed, &hello, now);
        Self::send_all(&st.links, updates);
        self.sync_route(st, node);
        self.tell_mesh(|| {
            st.coordinator
                .subscription(node, now)
                .map(OverlayNews::Subscribed)
        });
        drop(guard);
        info!(node = %node, %old, new = %observed, "control connection rebound; peers told the new address");
        let probe_port = *self.probe_port.lock().unwrap_or_else(|p| p.into_inner());
        vec![
            ControllerMsg::Observed(Observed {
                address: observed,
                index,
                probe_port,
            }),
            netmap,
        ]
    }

    /// Stores an agent's path report, bounded by [`bound_report`] and [`OverlayLimits::reports`].
    pub fn paths_reported(&self, node: &NodeId, report: impl Into<PathReportV8>) {
        let PathReportV8 { report, relayed } = report.into();
        let now = Instant::now();
        let (report, refused) = {
            let mut guard = self.state();
            let st = &mut *guard;
            let limits = st
                .limits
                .entry(node.clone())
                .or_insert_with(|| NodeLimits::new(&self.limits, now));
            if !limits.reports.take(self.limits.reports, now, 1.0) {
                bump(&self.stats.reports_refused, 1);
                debug!(node = %node, "path report beyond its rate ignored");
                return;
            }
            let coordinator = &st.coordinator;
            bound_report(
                report,
                |peer| coordinator.share_network(node, peer),
                self.limits.report_drop_reasons,
            )
        };
        if refused > 0 {
            bump(&self.stats.report_entries_refused, refused as u64);
            debug!(node = %node, refused, "path report entries left out");
        }
        self.paths.lock().unwrap_or_else(|p| p.into_inner()).insert(
            node.clone(),
            ReportedPaths {
                // Only reasons for paths the bounded report keeps as relayed.
                relayed: relayed
                    .into_iter()
                    .filter(|r| {
                        report
                            .paths
                            .iter()
                            .any(|p| p.peer == r.peer && p.kind == PathKind::Relay)
                    })
                    .map(|r| (r.peer, r.reason))
                    .collect(),
                report,
                at: now_ms(),
            },
        );
    }

    /// (v9) Keeps a node's datapath report (already checked against the protocol limits).
    pub fn datapath_reported(&self, node: &NodeId, report: DatapathReport) {
        self.datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.clone(), (report, now_ms()));
    }

    /// (v9) A node's latest datapath report and when it arrived.
    pub fn reported_datapath(&self, node: &NodeId) -> Option<(DatapathReport, UnixMillis)> {
        self.datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
    }

    /// The latest path report of every node.
    pub fn reported_paths(&self) -> Vec<(NodeId, ReportedPaths)> {
        let mut v: Vec<_> = self
            .paths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Where a packet that a node with `reach` relays to `to` goes, if anywhere: a node connected
    /// here, or the controller holding the node's session. Reads the relay tables and the two
    /// nodes' reach, never the hub's lock.
    fn relay_target(&self, from: &NodeId, reach: &Reach, to: PeerIndex) -> Option<Hop> {
        // Another controller's newer session wins over one lingering here.
        let remote = self
            .remote
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&to)
            .cloned();
        let (node, target_reach, hop) = match remote {
            Some(r) => (r.node.clone(), r.reach.clone(), Hop::Remote(r)),
            None => {
                let local = self
                    .relays
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&to)
                    .cloned();
                let Some(t) = local else {
                    bump(&self.stats.relay_no_target, 1);
                    debug!(from = %from, to = to.0, "relay destination not connected");
                    return None;
                };
                (t.node.clone(), t.reach.clone(), Hop::Local(t))
            }
        };
        if node == *from || !reach.shares(&target_reach) {
            bump(&self.stats.relay_unshared, 1);
            debug!(from = %from, to = %node, "relay between nodes that share no network refused");
            return None;
        }
        Some(hop)
    }

    /// A packet another controller (`controller`) relays from `from`, a node connected there, to
    /// `to`, which should be connected here. Handed to `to` only if the two share a network now;
    /// the sender's rate was charged where it entered.
    pub fn relay_from_mesh(&self, controller: &str, to: PeerIndex, from: PeerIndex, packet: &[u8]) {
        let target = self
            .relays
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&to)
            .cloned();
        let Some(target) = target else {
            bump(&self.stats.relay_no_target, 1);
            debug!(
                controller,
                from = from.0,
                to = to.0,
                "relay destination from another controller not connected here"
            );
            return;
        };
        let remote = self
            .remote
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&from)
            .map(|r| (r.node.clone(), r.reach.clone()));
        // A source that moved there from here, before its session here has ended.
        let source = remote.or_else(|| {
            self.relays
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&from)
                .map(|t| (t.node.clone(), t.reach.clone()))
        });
        let Some((source, source_reach)) = source else {
            bump(&self.stats.relay_mesh_dropped, 1);
            debug!(controller, from = from.0, to = %target.node, "relayed packet from another controller with an unknown source dropped");
            return;
        };
        if source == target.node || !source_reach.shares(&target.reach) {
            bump(&self.stats.relay_unshared, 1);
            debug!(controller, from = %source, to = %target.node, "relay from another controller between nodes that share no network refused");
            return;
        }
        if let Err(e) = target.conn.send_datagram(relay_datagram(from, packet)) {
            debug!(controller, from = %source, to = %target.node, cause = %e, "relay datagram dropped");
        }
    }

    /// Forwards relayed packets arriving on `node`'s control connection until it closes. A packet
    /// goes only to a node that shares a network with the sender, within the sender's
    /// [`OverlayLimits::relay_packets`] and [`OverlayLimits::relay_bytes`] and the pair's
    /// [`OverlayLimits::relay_pair_bytes`]; the relay sees only the peers' QUIC ciphertext.
    pub async fn relay(self: Arc<Self>, node: NodeId, index: PeerIndex, conn: quinn::Connection) {
        let reach = self.state().reach(&node);
        let start = Instant::now();
        let mut budget = RelayBudget::new(&self.limits, start);
        while let Ok(d) = conn.read_datagram().await {
            let now = Instant::now();
            let Some((to, packet)) = parse_relay_datagram(&d) else {
                bump(&self.stats.relay_no_target, 1);
                continue;
            };
            match budget.take(&self.limits, now, to, d.len() as f64) {
                Ok(()) => {}
                Err(RelayRefusal::Sender) => {
                    bump(&self.stats.relay_rate_limited, 1);
                    debug!(from = %node, bytes = d.len(), "relayed packet beyond the sender's rate dropped");
                    continue;
                }
                Err(RelayRefusal::Pair) => {
                    bump(&self.stats.relay_pair_rate_limited, 1);
                    debug!(from = %node, to = to.0, bytes = d.len(), "relayed packet beyond the pair's rate dropped");
                    continue;
                }
            }
            match self.relay_target(&node, &reach, to) {
                None => {}
                Some(Hop::Local(target)) => {
                    if let Err(e) = target.conn.send_datagram(relay_datagram(index, &packet)) {
                        debug!(from = %node, to = %target.node, cause = %e, "relay datagram dropped");
                    }
                }
                Some(Hop::Remote(peer)) => {
                    let sent = self
                        .mesh
                        .get()
                        .is_some_and(|port| port.relay(&peer.controller, to, index, &packet));
                    if !sent {
                        bump(&self.stats.relay_mesh_dropped, 1);
                        debug!(from = %node, to = %peer.node, controller = %peer.controller, "relay datagram for a node on another controller dropped");
                    }
                }
            }
        }
    }
}

/// Which budget a relayed packet did not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RelayRefusal {
    /// The sender's packet or byte budget, over all its destinations.
    Sender,
    /// The budget of the sender's pair with this destination.
    Pair,
}

/// One relaying connection's budgets: its own, and one per destination.
#[derive(Debug)]
struct RelayBudget {
    packets: TokenBucket,
    bytes: TokenBucket,
    pairs: HashMap<PeerIndex, TokenBucket>,
}

impl RelayBudget {
    fn new(limits: &OverlayLimits, now: Instant) -> Self {
        Self {
            packets: TokenBucket::full(limits.relay_packets, now),
            bytes: TokenBucket::full(limits.relay_bytes, now),
            pairs: HashMap::new(),
        }
    }

    /// Charges a packet of `size` bytes to `to` against every budget, or against none.
    fn take(
        &mut self,
        limits: &OverlayLimits,
        now: Instant,
        to: PeerIndex,
        size: f64,
    ) -> Result<(), RelayRefusal> {
        if !(self.packets.has(limits.relay_packets, now, 1.0)
            && self.bytes.has(limits.relay_bytes, now, size))
        {
            return Err(RelayRefusal::Sender);
        }
        if self.pairs.len() >= limits.relay_pair_budgets && !self.pairs.contains_key(&to) {
            self.pairs
                .retain(|_, b| !b.is_full(limits.relay_pair_bytes, now));
            if self.pairs.len() >= limits.relay_pair_budgets {
                // Every kept pair is busy: a new destination waits until one goes idle.
                return Err(RelayRefusal::Pair);
            }
        }
        let pair = self
            .pairs
            .entry(to)
            .or_insert_with(|| TokenBucket::full(limits.relay_pair_bytes, now));
        if !pair.take(limits.relay_pair_bytes, now, size) {
            return Err(RelayRefusal::Pair);
        }
        self.packets.take(limits.relay_packets, now, 1.0);
        self.bytes.take(limits.relay_bytes, now, size);
        Ok(())
    }
}

/// Serves the NAT probe port: tells each connecting agent the address it came from, on a second UDP
/// port. An agent whose NAT maps it to a different public port here than on the main port has an
/// endpoint-dependent ("symmetric") NAT.
pub async fn serve_probe(endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let observed = conn.remote_address();
            let result = async {
                let mut send = conn.open_uni().await.map_err(|e| e.to_string())?;
                let msg = ControllerMsg::Observed(Observed {
                    address: observed,
                    index: PeerIndex(0),
                    probe_port: None,
                });
                send_msg(&mut send, &msg).await.map_err(|e| e.to_string())?;
                send.finish().map_err(|e| e.to_string())?;
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
                Ok::<_, String>(())
            }
            .await;
            if let Err(e) = result {
                debug!(%observed, cause = e, "probe answer failed");
            }
        });
    }
    info!("probe endpoint stopped");
}

/// The address the probe endpoint listens on by default: the agents' port plus one on the same IP.
pub fn default_probe_addr(quic: SocketAddr) -> SocketAddr {
    SocketAddr::new(quic.ip(), quic.port().wrapping_add(1))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::mpsc as std_mpsc;

    use shoal_overlay::{pki, tls};
    use shoal_proto::{NatMapping, OverlayCounters, PathInfo};
    use shoal_testkit::wait_async;

    use super::*;
    use crate::{registry::ca::Ca, test_support::enrol_for_tests};

    const T0: UnixMillis = UnixMillis(1_700_000_000_000);
    /// Deadline for anything that should happen at once on loopback.
    const PROMPT: Duration = Duration::from_secs(5);

    fn n(s: &str) -> NodeId {
        NodeId(s.into())
    }

    #[test]
    fn token_buckets_refill_at_their_rate_up_to_their_burst() {
        let rate = Rate {
            per_sec: 2.0,
            burst: 3.0,
        };
        let t0 = Instant::now();
        let mut b = TokenBucket::full(rate, t0);
        assert_eq!((0..10).filter(|_| b.take(rate, t0, 1.0)).count(), 3);
        assert!(
            b.take(rate, t0 + Duration::from_millis(500), 1.0),
            "0.5 s at 2/s buys one"
        );
        assert!(!b.take(rate, t0 + Duration::from_millis(500), 1.0));
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            (0..10).filter(|_| b.take(rate, later, 1.0)).count(),
            3,
            "never more than the burst"
        );
        assert!(
            !b.take(rate, t0, 1.0),
            "a clock that goes back refills nothing"
        );
    }

    #[test]
    fn punches_are_limited_per_pair_and_per_node_and_a_refused_one_costs_nothing() {
        let limits = OverlayLimits {
            punches_per_pair: Rate {
                per_sec: 0.5,
                burst: 2.0,
            },
            punches_per_node: Rate {
                per_sec: 1.0,
                burst: 5.0,
            },
            ..OverlayLimits::default()
        };
        let t0 = Instant::now();
        let mut l = NodeLimits::new(&limits, t0);
        let results: Vec<_> = (0..4).map(|_| l.punch(&limits, t0, &n("b"))).collect();
        assert_eq!(
            results,
            [
                Ok(()),
                Ok(()),
                Err(PunchRefusal::PairRate),
                Err(PunchRefusal::PairRate)
            ]
        );
        // The pair refusals did not spend the node's budget: three more pairs fit.
        assert_eq!(l.punch(&limits, t0, &n("c")), Ok(()));
        assert_eq!(l.punch(&limits, t0, &n("c")), Ok(()));
        assert_eq!(l.punch(&limits, t0, &n("d")), Ok(()));
        assert_eq!(l.punch(&limits, t0, &n("e")), Err(PunchRefusal::NodeRate));
        // A node refusal did not spend the pair's: e's first punch goes once the node refills.
        assert_eq!(
            l.punch(&limits, t0 + Duration::from_secs(1), &n("e")),
            Ok(())
        );
        assert_eq!(
            l.punch(&limits, t0 + Duration::from_secs(1), &n("e")),
            Err(PunchRefusal::NodeRate)
        );
        // 2 s later b has one more.
        let t2 = t0 + Duration::from_secs(3);
        assert_eq!(l.punch(&limits, t2, &n("b")), Ok(()));
    }

    #[test]
    fn pair_budgets_are_pruned_once_idle() {
        let limits = OverlayLimits {
            punches_per_node: Rate {
                per_sec: 1e9,
                burst: 1e9,
            },
            ..OverlayLimits::default()
        };
        let t0 = Instant::now();
        let mut l = NodeLimits::new(&limits, t0);
        for i in 0..10_000 {
            let now = t0 + Duration::from_secs(10 * i);
            assert_eq!(l.punch(&limits, now, &n(&format!("p{i}"))), Ok(()));
            assert!(
                l.pairs.len() <= PAIR_BUCKETS_BEFORE_PRUNING + 1,
                "{}",
                l.pairs.len()
            );
        }
    }

    fn path(peer: &str, rtt_ms: f64) -> PathInfo {
        PathInfo {
            peer: n(peer),
            kind: PathKind::Direct,
            remote: None,
            rtt_ms,
            tx_bytes: 1,
            rx_bytes: 1,
        }
    }

    #[test]
    fn path_reports_keep_only_the_nodes_peers_and_a_bounded_drop_list() {
        let mut dropped: Vec<(String, u64)> = [
            "no_path",
            "spoofed_arp",
            "no_path",
            "Bad-Label",
            "",
            "\u{1b}[31m",
            &"x".repeat(33),
        ]
        .iter()
        .map(|l| (l.to_string(), 1))
        .collect();
        dropped.extend((0..200).map(|i| (format!("r{i}"), 1)));
        let report = PathReport {
            paths: vec![
                path("b", 1.5),
                path("stranger", 1.0),
                path("b", 9.0),
                path("c", f64::NAN),
                path("c", 2.0),
            ],
            counters: OverlayCounters {
                forwarded: 1,
                flooded: 2,
                delivered: 3,
                dropped,
            },
        };
        let peers = ["b", "c"];
        let (bounded, refused) = bound_report(report, |p| peers.contains(&p.0.as_str()), 10);
        let kept: Vec<_> = bounded
            .paths
            .iter()
            .map(|p| (p.peer.0.as_str(), p.rtt_ms))
            .collect();
        assert_eq!(kept, [("b", 1.5), ("c", 0.0)]);
        let labels: Vec<_> = bounded
            .counters
            .dropped
            .iter()
            .map(|(l, _)| l.as_str())
            .collect();
        assert_eq!(
            labels,
            [
                "no_path",
                "spoofed_arp",
                "r0",
                "r1",
                "r2",
                "r3",
                "r4",
                "r5",
                "r6",
                "r7"
            ]
        );
        assert_eq!(refused, 3 + (7 + 200 - 10));
        assert_eq!(
            (
                bounded.counters.forwarded,
                bounded.counters.flooded,
                bounded.counters.delivered
            ),
            (1, 2, 3)
        );
    }

    // ---------------------------------------------------------------------------------------------
    // In-process, with real QUIC on loopback: the hub's shell as the controller runs it.
    // ---------------------------------------------------------------------------------------------

    struct Hub {
        hub: Arc<OverlayHub>,
        store: Store,
        ca: Ca,
        server: quinn::Endpoint,
        nodes: HashMap<String, NodeId>,
        next_conn: u64,
        _dir: Arc<tempfile::TempDir>,
    }

    /// One agent: its end of the control connection, and what the hub queued for it.
    struct Agent {
        node: NodeId,
        index: PeerIndex,
        /// Its socket, which a test may rebind (as a NAT would).
        endpoint: quinn::Endpoint,
        client: quinn::Connection,
        server_side: quinn::Connection,
        conn_id: u64,
        key: [u8; 32],
        tx: crate::connections::queue::NodeTx,
        queued: crate::connections::queue::NodeRx,
        /// What the hub answered its first hello.
        welcome: Vec<ControllerMsg>,
    }

    fn hello_msg() -> OverlayHello {
        OverlayHello {
            netmap_version: None,
            local_endpoints: vec!["10.0.0.9:7000".parse().unwrap()],
            nat: NatMapping::Unknown,
        }
    }

    impl Hub {
        /// A hub over a store in which `machines` are enrolled (and members of `default`), as after
        /// a controller restart.
        fn start(limits: OverlayLimits, machines: &[&str]) -> Hub {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("store")).unwrap();
            store
                .ensure_default_network(
                    shoal_controller_core::networks::DEFAULT_OVERLAY_SUBNET,
                    shoal_controller_core::networks::DEFAULT_OVERLAY_MTU,
                )
                .unwrap();
            let nodes = machines
                .iter()
                .map(|m| (m.to_string(), enrol_for_tests(&store, m, &[], T0)))
                .collect();
            let ca = Ca::load_or_create(dir.path()).unwrap();
            let (chain, key) = ca
                .issue_server_cert(&[pki::CONTROLLER_SERVER_NAME.to_owned()], &[])
                .unwrap();
            let config = tls::controller_server_config(ca.cert_der(), chain, key).unwrap();
            let server = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
            let hub = Arc::new(
                OverlayHub::open_with_limits(&store, Duration::from_secs(3600), limits).unwrap(),
            );
            Hub {
                hub,
                store,
                ca,
                server,
                nodes,
                next_conn: 1,
                _dir: Arc::new(dir),
            }
        }

        /// Another controller's hub over the same store and CA (the cluster's shared store).
        fn second(&self) -> Hub {
            let ca = Ca::load_or_create(self._dir.path()).unwrap();
            let (chain, key) = ca
                .issue_server_cert(&[pki::CONTROLLER_SERVER_NAME.to_owned()], &[])
                .unwrap();
            let config = tls::controller_server_config(ca.cert_der(), chain, key).unwrap();
            let server = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
            let hub = Arc::new(
                OverlayHub::open_with_limits(
                    &self.store,
                    Duration::from_secs(3600),
                    OverlayLimits::default(),
                )
                .unwrap(),
            );
            Hub {
                hub,
                store: self.store.clone(),
                ca,
                server,
                nodes: self.nodes.clone(),
                next_conn: 1000,
                _dir: self._dir.clone(),
            }
        }

        /// Connects the node enrolled as `machine`, says hello and starts its relay task, as the
        /// server does.
        async fn connect(&mut self, machine: &str) -> Agent {
            let node = self.nodes[machine].clone();
            let key_pair = pki::generate_key().unwrap();
            let (cert, _) = self
                .ca
                .issue_node_cert(
                    &pki::make_csr(&key_pair).unwrap(),
                    &node,
                    now_ms(),
                    Duration::from_secs(3600),
                )
                .unwrap();
            let client_config = tls::node_client_config(
                self.ca.cert_der(),
                &cert,
                pki::tls_key(&key_pair),
                Duration::from_secs(1),
            )
            .unwrap();
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            endpoint.set_default_client_config(client_config);
            let connecting = endpoint
                .connect(
                    self.server.local_addr().unwrap(),
                    pki::CONTROLLER_SERVER_NAME,
                )
                .unwrap();
            let (client, server_side) = tokio::join!(connecting, async {
                self.server.accept().await.unwrap().await
            });
            let (client, server_side) = (client.unwrap(), server_side.unwrap());
            let index = self.store.peer_index(&node).unwrap();
            let conn_id = self.next_conn;
            self.next_conn += 1;
            let (tx, queued) = crate::connections::queue::node_queue(
                crate::connections::queue::NODE_QUEUE_CAPACITY,
            );
            let mut agent = Agent {
                node,
                index,
                endpoint,
                client,
                server_side,
                conn_id,
                key: pki::sha256(&cert),
                tx,
                queued,
                welcome: Vec::new(),
            };
            let out = self.hello(&mut agent, &hello_msg());
            assert!(
                matches!(out.first(), Some(ControllerMsg::Observed(_))),
                "{out:?}"
            );
            agent.welcome = out;
            tokio::spawn(self.hub.clone().relay(
                agent.node.clone(),
                agent.index,
                agent.server_side.clone(),
            ));
            agent
        }

        fn hello(&self, a: &mut Agent, hello: &OverlayHello) -> Vec<ControllerMsg> {
            self.hub.hello(
                &a.node,
                a.conn_id,
                &a.server_side,
                &a.tx,
                a.index,
                a.key,
                hello,
            )
        }
    }

    impl Agent {
        fn relay_to(&self, to: &Agent, payload: &[u8]) {
            self.client
                .send_datagram(relay_datagram(to.index, payload))
                .unwrap();
        }

        /// The next relayed packet this agent receives, as (sender index, payload).
        async fn relayed(&self) -> (PeerIndex, Vec<u8>) {
            let d = tokio::time::timeout(PROMPT, self.client.read_datagram())
                .await
                .expect("a relayed packet in time")
                .unwrap();
            let (from, packet) = parse_relay_datagram(&d).unwrap();
            (from, packet.to_vec())
        }

        /// Drains what the hub queued for this agent.
        fn drain(&mut self) -> Vec<ControllerMsg> {
            std::iter::from_fn(|| self.queued.try_recv().ok()).collect()
        }
    }

    /// Waits until `check` holds for the hub's counters; counters that do not satisfy it (and
    /// differ from the ones before) are printed, so a failure shows them.
    async fn counted(hub: &OverlayHub, what: &str, check: impl Fn(&HubCounters) -> bool) {
        let mut last = String::new();
        wait_async::eventually(PROMPT, what, || {
            let counters = hub.counters();
            let done = check(&counters);
            let seen = format!("{counters:?}");
            if !done && seen != last {
                println!("not yet {what}: {seen}");
                last = seen;
            }
            std::future::ready(done.then_some(()))
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_relay_forwards_while_the_hub_lock_is_held_and_cuts_a_removed_node_off_at_once() {
        let mut h = Hub::start(OverlayLimits::default(), &["a", "b", "c"]);
        let (a, b, c) = (
            h.connect("a").await,
            h.connect("b").await,
            h.connect("c").await,
        );
        a.relay_to(&b, b"hello b");
        assert_eq!(b.relayed().await, (a.index, b"hello b".to_vec()));

        // Another thread holds the hub's lock (as a long netmap computation would): forwarding goes
        // on.
        let (locked_tx, locked_rx) = std_mpsc::channel();
        let (release_tx, release_rx) = std_mpsc::channel::<()>();
        let hub = h.hub.clone();
        let holder = std::thread::spawn(move || {
            let _guard = hub.state();
            locked_tx.send(()).unwrap();
            let _ = release_rx.recv();
        });
        locked_rx.recv().unwrap();
        b.relay_to(&a, b"while locked");
        assert_eq!(a.relayed().await, (b.index, b"while locked".to_vec()));
        release_tx.send(()).unwrap();
        holder.join().unwrap();

        // b leaves every network: from the moment membership_changed returns, a's packets to b and
        // b's to a are refused (each counted, none forwarded), while a and c go on.
        let changes = h.store.leave_all_networks(&b.node).unwrap();
        h.hub.membership_changed(&h.store, &changes);
        a.relay_to(&b, b"after removal");
        counted(&h.hub, "a's packet to b refused", |c| c.relay_unshared == 1).await;
        b.relay_to(&a, b"from the removed");
        counted(&h.hub, "b's packet to a refused", |c| c.relay_unshared == 2).await;
        a.relay_to(&c, b"hello c");
        assert_eq!(c.relayed().await, (a.index, b"hello c".to_vec()));

        // c removed from the fleet: cut off at once too.
        h.hub.forget(&c.node);
        a.relay_to(&c, b"after forget");
        counted(&h.hub, "a's packet to c refused", |c| c.relay_unshared == 3).await;
        // A relay index nobody has, and a runt.
        a.client
            .send_datagram(relay_datagram(PeerIndex(999), b"nobody"))
            .unwrap();
        a.client
            .send_datagram(relay_datagram(b.index, b"").slice(..2))
            .unwrap();
        a.client
            .send_datagram(relay_datagram(b.index, b""))
            .unwrap();
        counted(&h.hub, "unknown destinations and runts counted", |c| {
            c.relay_no_target == 3
        })
        .await;
        assert_eq!(h.hub.counters().relay_rate_limited, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_flooding_the_relay_is_held_to_its_rate_and_others_are_still_served() {
        // No refill within the test: what a node gets is its burst, exactly.
        let limits = OverlayLimits {
            relay_packets: Rate {
                per_sec: 1e-9,
                burst: 50.0,
            },
            relay_bytes: Rate {
                per_sec: 1e-9,
                burst: 1e9,
            },
            ..OverlayLimits::default()
        };
        let mut h = Hub::start(limits, &["a", "b", "c"]);
        let (a, b, c) = (
            h.connect("a").await,
            h.connect("b").await,
            h.connect("c").await,
        );
        for i in 0..300u32 {
            a.relay_to(&b, &i.to_be_bytes());
        }
        counted(&h.hub, "a's packets beyond its burst dropped", |c| {
            c.relay_rate_limited == 250
        })
        .await;
        for i in 0..50u32 {
            assert_eq!(
                b.relayed().await,
                (a.index, i.to_be_bytes().to_vec()),
                "a's burst, in order"
            );
        }
        // c is not held back by a's flood.
        for i in 0..20u32 {
            c.relay_to(&b, &i.to_be_bytes());
            assert_eq!(b.relayed().await, (c.index, i.to_be_bytes().to_vec()));
        }
        assert_eq!(h.hub.counters().relay_rate_limited, 250);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relayed_bytes_are_bounded_per_node() {
        let limits = OverlayLimits {
            relay_bytes: Rate {
                per_sec: 1e-9,
                burst: 10_000.0,
            },
            ..OverlayLimits::default()
        };
        let mut h = Hub::start(limits, &["a", "b"]);
        let (a, b) = (h.connect("a").await, h.connect("b").await);
        let packet = [7u8; 996]; // 1000 bytes with the relay header
        for _ in 0..30 {
            a.relay_to(&b, &packet);
        }
        counted(&h.hub, "a's bytes beyond its burst dropped", |c| {
            c.relay_rate_limited == 20
        })
        .await;
        for _ in 0..10 {
            assert_eq!(b.relayed().await.1.len(), 996);
        }
        // b's own budget is untouched.
        b.relay_to(&a, &packet);
        assert_eq!(a.relayed().await.0, b.index);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_busy_pair_cannot_starve_the_senders_other_pairs() {
        // No refill within the test: a pair gets its burst, the sender more than one pair's.
        let limits = OverlayLimits {
            relay_pair_bytes: Rate {
                per_sec: 1e-9,
                burst: 10_000.0,
            },
            relay_bytes: Rate {
                per_sec: 1e-9,
                burst: 1e9,
            },
            ..OverlayLimits::default()
        };
        let mut h = Hub::start(limits, &["a", "b", "c"]);
        let (a, b, c) = (
            h.connect("a").await,
            h.connect("b").await,
            h.connect("c").await,
        );
        let packet = [7u8; 996]; // 1000 bytes with the relay header
        for _ in 0..30 {
            a.relay_to(&b, &packet);
        }
        counted(&h.hub, "a→b beyond the pair's burst dropped", |c| {
            c.relay_pair_rate_limited == 20
        })
        .await;
        for _ in 0..10 {
            assert_eq!(b.relayed().await, (a.index, packet.to_vec()));
        }
        // a→c has its own budget, untouched by a→b's flood.
        for i in 0..10u32 {
            a.relay_to(&c, &i.to_be_bytes());
            assert_eq!(c.relayed().await, (a.index, i.to_be_bytes().to_vec()));
        }
        let counters = h.hub.counters();
        assert_eq!(
            (
                counters.relay_pair_rate_limited,
                counters.relay_rate_limited
            ),
            (20, 0)
        );
    }

    #[test]
    fn the_sender_rate_scales_bytes_and_packets_alike_and_leaves_pairs_alone() {
        let d = OverlayLimits::default();
        let l = OverlayLimits::default()
            .with_relay_pair_mbit(64.0)
            .with_relay_sender_mbit(1000.0);
        assert_eq!(
            (l.relay_bytes.per_sec, l.relay_bytes.burst),
            (125e6, 125e6 / 4.0)
        );
        // The defaults' bytes per packet (1 KiB), a quarter second of burst.
        assert_eq!(
            l.relay_bytes.per_sec / l.relay_packets.per_sec,
            d.relay_bytes.per_sec / d.relay_packets.per_sec
        );
        assert_eq!(l.relay_packets.burst, l.relay_packets.per_sec / 4.0);
        assert_eq!(
            l.relay_pair_bytes.per_sec,
            OverlayLimits::default()
                .with_relay_pair_mbit(64.0)
                .relay_pair_bytes
                .per_sec
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rebound_control_connection_gives_peers_the_new_address_at_once() {
        let mut h = Hub::start(OverlayLimits::default(), &["a", "b"]);
        let a = h.connect("a").await;
        let mut b = h.connect("b").await;
        b.drain();
        assert!(
            h.hub
                .recheck_observed(&a.node, a.conn_id, &a.server_side)
                .is_empty(),
            "nothing changed"
        );
        // a's NAT gives it another port mid-connection; QUIC follows it.
        let before = a.server_side.remote_address();
        a.endpoint
            .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .unwrap();
        let after = wait_async::eventually(PROMPT, "the server sees a's new port", || {
            a.relay_to(&b, b"moved");
            let now = a.server_side.remote_address();
            async move { (now != before).then_some(now) }
        })
        .await;
        let out = h.hub.recheck_observed(&a.node, a.conn_id, &a.server_side);
        assert!(
            matches!(&out[..], [ControllerMsg::Observed(o), ControllerMsg::Netmap(_)] if o.address == after && o.index == a.index),
            "{out:?}"
        );
        // b hears of a's new address, first in a's endpoints.
        let endpoints: Vec<Vec<SocketAddr>> = b
            .drain()
            .iter()
            .filter_map(|m| match m {
                ControllerMsg::NetmapDelta(d) => Some(d.changes.iter().filter_map(|c| match c {
                    shoal_proto::NetmapChange::Peer(p) if p.node == a.node => {
                        Some(p.endpoints.clone())
                    }
                    _ => None,
                })),
                _ => None,
            })
            .flatten()
            .collect();
        assert!(
            endpoints.iter().any(|e| e.first() == Some(&after)),
            "{endpoints:?}"
        );
        // Once told, nothing more; nor for a connection that is not a's current one.
        assert!(h
            .hub
            .recheck_observed(&a.node, a.conn_id, &a.server_side)
            .is_empty());
        assert!(h
            .hub
            .recheck_observed(&a.node, a.conn_id + 100, &b.server_side)
            .is_empty());
    }

    #[test]
    fn pair_budgets_are_bounded_and_idle_ones_make_room() {
        let limits = OverlayLimits {
            relay_pair_bytes: Rate {
                per_sec: 1000.0,
                burst: 1000.0,
            },
            relay_pair_budgets: 2,
            ..OverlayLimits::default()
        };
        let t0 = Instant::now();
        let mut budget = RelayBudget::new(&limits, t0);
        assert_eq!(budget.take(&limits, t0, PeerIndex(1), 500.0), Ok(()));
        assert_eq!(budget.take(&limits, t0, PeerIndex(2), 500.0), Ok(()));
        assert_eq!(
            budget.take(&limits, t0, PeerIndex(3), 1.0),
            Err(RelayRefusal::Pair),
            "both kept pairs are busy"
        );
        // Once they refill they are dropped, and a new destination fits.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(budget.take(&limits, t1, PeerIndex(3), 1.0), Ok(()));
        assert!(budget.pairs.len() <= 2);
    }

    #[tokio::test]
    async fn repeated_hellos_on_a_connection_are_rate_limited_and_a_new_connection_is_served() {
        let limits = OverlayLimits {
            hellos: Rate {
                per_sec: 1e-9,
                burst: 2.0,
            },
            ..OverlayLimits::default()
        };
        let mut h = Hub::start(limits, &["a", "b"]);
        let mut a = h.connect("a").await;
        let mut b = h.connect("b").await;
        b.drain();
        // Each hello with new endpoints costs a delta to b; the third repeat costs nothing.
        for port in [7001u16, 7002] {
            let hello = OverlayHello {
                local_endpoints: vec![SocketAddr::from(([10, 0, 0, 9], port))],
                ..hello_msg()
            };
            assert!(matches!(
                h.hello(&mut a, &hello)[..],
                [ControllerMsg::Netmap(_)]
            ));
        }
        let refused = OverlayHello {
            local_endpoints: vec!["10.0.0.9:7003".parse().unwrap()],
            ..hello_msg()
        };
        assert!(h.hello(&mut a, &refused).is_empty());
        assert_eq!(h.hub.counters().hellos_refused, 1);
        assert_eq!(b.drain().len(), 2, "b heard of the two served hellos only");
        // A new connection's first hello is always served.
        a.conn_id = 99;
        assert!(matches!(
            h.hello(&mut a, &refused)[..],
            [ControllerMsg::Observed(_), ControllerMsg::Netmap(_)]
        ));
    }

    #[tokio::test]
    async fn a_hello_with_a_hostile_endpoint_list_reaches_peers_bounded() {
        let mut h = Hub::start(OverlayLimits::default(), &["a", "b"]);
        let mut a = h.connect("a").await;
        let mut b = h.connect("b").await;
        b.drain();
        let mut endpoints: Vec<SocketAddr> =
            // (Loopback is usable here: this agent connects over loopback; the coordinator's tests
            // show it refused from a remote one.)
            ["224.0.0.1:9", "255.255.255.255:9", "0.0.0.0:9", "[ff02::1]:9", "[fe80::1]:9", "10.0.0.1:0", "240.0.0.1:1"]
                .iter()
                .map(|e| e.parse().unwrap())
                .collect();
        endpoints
            .extend((0..5000u32).map(|i| {
                SocketAddr::from(([192, 0, 2, (i % 250) as u8], 1000 + (i / 250) as u16))
            }));
        h.hello(
            &mut a,
            &OverlayHello {
                local_endpoints: endpoints,
                ..hello_msg()
            },
        );
        let deltas = b.drain();
        let [ControllerMsg::NetmapDelta(d)] = &deltas[..] else {
            panic!("one delta for b: {deltas:?}")
        };
        let [shoal_proto::NetmapChange::Peer(p)] = &d.changes[..] else {
            panic!("{d:?}")
        };
        assert_eq!(
            p.endpoints.len(),
            1 + shoal_controller_core::coordinator::MAX_LOCAL_ENDPOINTS
        );
        assert_eq!(
            p.endpoints[0],
            a.server_side.remote_address(),
            "the observed address first"
        );
        assert!(
            p.endpoints[1..]
                .iter()
                .all(|e| e.ip().to_string().starts_with("192.0.2.")),
            "{:?}",
            p.endpoints
        );
    }

    #[tokio::test]
    async fn a_withdrawn_key_reaches_peers_at_once_and_survives_a_restart() {
        let mut h = Hub::start(OverlayLimits::default(), &["a", "b"]);
        let a = h.connect("a").await;
        let mut b = h.connect("b").await;
        b.drain();
        h.hub.withdraw_key(&h.store, &a.node).unwrap();
        let deltas = b.drain();
        let [ControllerMsg::NetmapDelta(d)] = &deltas[..] else {
            panic!("one delta for b: {deltas:?}")
        };
        let [shoal_proto::NetmapChange::Peer(p)] = &d.changes[..] else {
            panic!("{d:?}")
        };
        assert_eq!(
            (p.node.clone(), p.key_sha256),
            (a.node.clone(), shoal_proto::KEY_WITHDRAWN)
        );
        assert_eq!(
            h.store.node_key(&a.node).unwrap(),
            Some(shoal_proto::KEY_WITHDRAWN),
            "kept for the next start"
        );
        // A new key (the node rotated, or was re-enrolled) replaces it for the peers.
        h.hub.key_changed(&h.store, &a.node, [7; 32]).unwrap();
        let deltas = b.drain();
        assert!(
            matches!(&deltas[..], [ControllerMsg::NetmapDelta(d)] if matches!(&d.changes[..], [shoal_proto::NetmapChange::Peer(p)] if p.key_sha256 == [7; 32])),
            "{deltas:?}"
        );
    }

    #[tokio::test]
    async fn punch_requests_are_passed_on_within_their_rates_and_only_between_peers() {
        let limits = OverlayLimits {
            punches_per_pair: Rate {
                per_sec: 1e-9,
                burst: 3.0,
            },
            punches_per_node: Rate {
                per_sec: 1e-9,
                burst: 5.0,
            },
            ..OverlayLimits::default()
        };
        let mut h = Hub::start(limits, &["a", "b", "c", "d"]);
        let a = h.connect("a").await;
        let mut b = h.connect("b").await;
        let mut c = h.connect("c").await;
        let mut d = h.connect("d").await;
        let punches = |agent: &mut Agent| {
            agent
                .drain()
                .into_iter()
                .filter(|m| matches!(m, ControllerMsg::Punch(_)))
                .count()
        };
        let punch = |to: &Agent| {
            h.hub.punch(
                &a.node,
                &Punch {
                    peer: to.node.clone(),
                    endpoints: vec![],
                },
            )
        };
        for _ in 0..10 {
            punch(&b);
        }
        assert_eq!(punches(&mut b), 3, "the pair's burst");
        for _ in 0..10 {
            punch(&c);
        }
        assert_eq!(punches(&mut c), 2, "what is left of a's budget");
        assert_eq!(h.hub.counters().punches_rate_limited, 15);
        // d asks a, on its own budget.
        h.hub.punch(
            &d.node,
            &Punch {
                peer: a.node.clone(),
                endpoints: vec![],
            },
        );
        assert_eq!(h.hub.counters().punches_rate_limited, 15);
        // A node that left every network can punch no one.
        let changes = h.store.leave_all_networks(&d.node).unwrap();
        h.hub.membership_changed(&h.store, &changes);
        d.drain();
        h.hub.punch(
            &d.node,
            &Punch {
                peer: b.node.clone(),
                endpoints: vec![],
            },
        );
        assert_eq!(h.hub.counters().punches_unshared, 1);
        assert_eq!(punches(&mut b), 0);
    }

    #[tokio::test]
    async fn path_reports_are_rate_limited_and_bounded_to_the_nodes_peers() {
        let limits = OverlayLimits {
            reports: Rate {
                per_sec: 1e-9,
                burst: 2.0,
            },
            ..OverlayLimits::default()
        };
        let mut h = Hub::start(limits, &["a", "b"]);
        let (a, b) = (h.connect("a").await, h.connect("b").await);
        let report = |peers: &[&NodeId]| PathReport {
            paths: peers
                .iter()
                .map(|p| PathInfo {
                    peer: (*p).clone(),
                    ..path("x", 1.0)
                })
                .collect(),
            counters: OverlayCounters::default(),
        };
        let stranger = n("stranger");
        h.hub
            .paths_reported(&a.node, report(&[&b.node, &stranger, &b.node]));
        let stored = h.hub.reported_paths();
        assert_eq!(stored.len(), 1);
        assert_eq!(
            stored[0]
                .1
                .report
                .paths
                .iter()
                .map(|p| &p.peer)
                .collect::<Vec<_>>(),
            [&b.node]
        );
        assert_eq!(h.hub.counters().report_entries_refused, 2);
        h.hub.paths_reported(&a.node, report(&[]));
        h.hub.paths_reported(&a.node, report(&[&b.node]));
        assert_eq!(h.hub.counters().reports_refused, 1);
        assert!(
            h.hub.reported_paths()[0].1.report.paths.is_empty(),
            "the refused report did not replace the last one"
        );
        // b's budget is its own.
        h.hub.paths_reported(&b.node, report(&[&a.node]));
        assert_eq!(h.hub.reported_paths().len(), 2);
    }

    // ---------------------------------------------------------------------------------------------
    // Several controllers: hubs over one store, joined by an in-process mesh.
    // ---------------------------------------------------------------------------------------------

    /// The controller mesh as the hubs see it: every port delivers at once, to hubs whose
    /// controller is up. (Calls go straight into the other hub; the tests drive one thing at a
    /// time, so two hubs never call each other at once.)
    #[derive(Debug, Default)]
    struct Fabric {
        hubs: Mutex<HashMap<String, std::sync::Weak<OverlayHub>>>,
        down: Mutex<HashSet<String>>,
        store: Mutex<Option<Store>>,
        /// Every agent's queue, wherever its session is (`Controller::send_local` there).
        queues: Mutex<HashMap<NodeId, crate::connections::queue::NodeTx>>,
    }

    #[derive(Debug)]
    struct FabricPort {
        me: String,
        fabric: Arc<Fabric>,
    }

    impl Fabric {
        fn join(self: &Arc<Self>, id: &str, h: &Hub) {
            *self.store.lock().unwrap() = Some(h.store.clone());
            self.hubs
                .lock()
                .unwrap()
                .insert(id.into(), Arc::downgrade(&h.hub));
            h.hub.set_mesh(Arc::new(FabricPort {
                me: id.into(),
                fabric: self.clone(),
            }));
        }

        fn hub(&self, id: &str) -> Option<Arc<OverlayHub>> {
            if self.down.lock().unwrap().contains(id) {
                return None;
            }
            self.hubs.lock().unwrap().get(id)?.upgrade()
        }

        /// `from`'s link to `to` comes up: the snapshot, as the mesh sends it first.
        fn link_up(&self, from: &str, to: &str) {
            let (Some(src), Some(dst)) = (self.hub(from), self.hub(to)) else {
                return;
            };
            src.with_subscriptions(|subs| dst.remote_subscriptions(from, true, subs, vec![]));
        }

        fn add_agent(&self, a: &Agent) {
            self.queues
                .lock()
                .unwrap()
                .insert(a.node.clone(), a.tx.clone());
        }
    }

    impl MeshPort for FabricPort {
        fn broadcast(&self, news: OverlayNews) {
            if self.fabric.down.lock().unwrap().contains(&self.me) {
                return;
            }
            let others: Vec<Arc<OverlayHub>> = {
                let ids: Vec<String> = self.fabric.hubs.lock().unwrap().keys().cloned().collect();
                ids.iter()
                    .filter(|id| **id != self.me)
                    .filter_map(|id| self.fabric.hub(id))
                    .collect()
            };
            let store = self.fabric.store.lock().unwrap().clone().unwrap();
            for hub in others {
                match news.clone() {
                    OverlayNews::Subscribed(sub) => {
                        hub.remote_subscriptions(&self.me, false, vec![sub], vec![])
                    }
                    OverlayNews::Left(node) => {
                        hub.remote_subscriptions(&self.me, false, vec![], vec![node])
                    }
                    OverlayNews::Membership(changes) => {
                        hub.remote_membership_changed(&store, &changes)
                    }
                    OverlayNews::Key { node, key } => hub.remote_key_changed(&node, key),
                }
            }
        }

        fn deliver(&self, controller: &str, node: &NodeId, msg: ControllerMsg) -> bool {
            if self.fabric.hub(controller).is_none() {
                return false;
            }
            let queues = self.fabric.queues.lock().unwrap();
            queues.get(node).is_some_and(|q| q.send(msg).is_ok())
        }

        fn relay(&self, controller: &str, to: PeerIndex, from: PeerIndex, packet: &[u8]) -> bool {
            match self.fabric.hub(controller) {
                Some(hub) => {
                    hub.relay_from_mesh(&self.me, to, from, packet);
                    true
                }
                None => false,
            }
        }
    }

    /// The peer record for `of` in what `msgs` hold (the last one).
    fn peer_in(msgs: &[ControllerMsg], of: &NodeId) -> Option<shoal_proto::Peer> {
        let mut found = None;
        for m in msgs {
            let peers: Vec<shoal_proto::Peer> = match m {
                ControllerMsg::Netmap(map) => map.peers.clone(),
                ControllerMsg::NetmapDelta(d) => d
                    .changes
                    .iter()
                    .filter_map(|c| match c {
                        shoal_proto::NetmapChange::Peer(p) => Some(p.clone()),
                        _ => None,
                    })
                    .collect(),
                _ => continue,
            };
            if let Some(p) = peers.into_iter().find(|p| p.node == *of) {
                found = Some(p);
            }
        }
        found
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn agents_on_two_controllers_learn_each_other_punch_and_relay_through_the_mesh() {
        let mut one = Hub::start(OverlayLimits::default(), &["a", "b", "c"]);
        let mut two = one.second();
        let fabric = Arc::new(Fabric::default());
        fabric.join("one", &one);
        fabric.join("two", &two);
        let mut a = one.connect("a").await;
        fabric.add_agent(&a);
        let mut b = two.connect("b").await;
        fabric.add_agent(&b);

        // b's first netmap (from two) holds a as one saw it; a hears of b as two saw it.
        let a_seen = peer_in(&b.welcome, &a.node).expect("a in b's netmap");
        assert_eq!(a_seen.endpoints[0], a.server_side.remote_address());
        assert_eq!((a_seen.index, a_seen.key_sha256), (a.index, a.key));
        let b_seen = peer_in(&a.drain(), &b.node).expect("a told of b");
        assert_eq!(b_seen.endpoints[0], b.server_side.remote_address());
        assert_eq!((b_seen.index, b_seen.key_sha256), (b.index, b.key));
        assert!(b.drain().is_empty(), "two sends b nothing for a's hello");

        // A punch request for b goes to two, carrying a's endpoints.
        one.hub.punch(
            &a.node,
            &Punch {
                peer: b.node.clone(),
                endpoints: vec![],
            },
        );
        let punches: Vec<_> = b
            .drain()
            .into_iter()
            .filter_map(|m| match m {
                ControllerMsg::Punch(p) => Some(p),
                _ => None,
            })
            .collect();
        assert_eq!(punches.len(), 1);
        assert_eq!(punches[0].peer, a.node);
        assert_eq!(punches[0].endpoints[0], a.server_side.remote_address());

        // Relayed packets cross, both ways.
        a.relay_to(&b, b"from one");
        assert_eq!(b.relayed().await, (a.index, b"from one".to_vec()));
        b.relay_to(&a, b"from two");
        assert_eq!(a.relayed().await, (b.index, b"from two".to_vec()));

        // b leaves every network (on two): one refuses a's packets to b at once.
        let changes = two.store.leave_all_networks(&b.node).unwrap();
        two.hub.membership_changed(&two.store, &changes);
        assert!(
            a.drain().iter().any(|m| matches!(m, ControllerMsg::NetmapDelta(d) if d.changes.contains(&shoal_proto::NetmapChange::PeerGone(b.node.clone())))),
            "a hears b is gone through one"
        );
        a.relay_to(&b, b"after leaving");
        counted(&one.hub, "a's packet to b refused at one", |c| {
            c.relay_unshared == 1
        })
        .await;

        // c, enrolled after both started, connects to two: one learns its index from the store
        // and its place in the default network from two's membership change.
        let c_node = enrol_for_tests(&one.store, "c-late", &[], T0);
        two.nodes.insert("c-late".into(), c_node.clone());
        // (Enrolment joined it already, unseen by the hubs: join again to get the changes.)
        two.store.leave_all_networks(&c_node).unwrap();
        let changes = two.store.join_networks(&c_node).unwrap();
        two.hub.membership_changed(&two.store, &changes);
        let c = two.connect("c-late").await;
        fabric.add_agent(&c);
        let c_seen = peer_in(&a.drain(), &c.node).expect("a told of c");
        assert_eq!(c_seen.endpoints[0], c.server_side.remote_address());
        a.relay_to(&c, b"to the newcomer");
        assert_eq!(c.relayed().await, (a.index, b"to the newcomer".to_vec()));
        assert_eq!(one.hub.counters().relay_mesh_dropped, 0);

        // A change two makes while one cannot hear it reaches one when its link is back (resync
        // from the store).
        fabric.down.lock().unwrap().insert("one".into());
        let changes = two.store.leave_all_networks(&c.node).unwrap();
        two.hub.membership_changed(&two.store, &changes);
        fabric.down.lock().unwrap().remove("one");
        assert!(a.drain().is_empty(), "one did not hear of it");
        one.hub.resync(&one.store).unwrap();
        assert!(
            a.drain().iter().any(|m| matches!(m, ControllerMsg::NetmapDelta(d) if d.changes.contains(&shoal_proto::NetmapChange::PeerGone(c.node.clone())))),
            "a hears c is gone once one resyncs"
        );
        a.relay_to(&c, b"after resync");
        counted(&one.hub, "a's packet to c refused at one", |c| {
            c.relay_unshared == 2
        })
        .await;
        let _ = &mut two;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_controllers_agent_stays_in_netmaps_until_a_newer_session_elsewhere_replaces_it()
    {
        let mut one = Hub::start(OverlayLimits::default(), &["a", "b"]);
        let mut two = one.second();
        let mut three = one.second();
        let fabric = Arc::new(Fabric::default());
        fabric.join("one", &one);
        fabric.join("two", &two);
        fabric.join("three", &three);
        let mut a = one.connect("a").await;
        fabric.add_agent(&a);
        let b = two.connect("b").await;
        fabric.add_agent(&b);
        let first = peer_in(&a.drain(), &b.node).unwrap();

        // two dies with b's session: a's netmap keeps b as it was, and one has nowhere to send
        // b's packets (counted).
        fabric.down.lock().unwrap().insert("two".into());
        two.hub.disconnected(&b.node, b.conn_id);
        assert!(a.drain().is_empty(), "nothing changes for a");
        a.relay_to(&b, b"while nowhere");
        counted(&one.hub, "a's packet to b dropped", |c| {
            c.relay_mesh_dropped == 1
        })
        .await;
        one.hub.punch(
            &a.node,
            &Punch {
                peer: b.node.clone(),
                endpoints: vec![],
            },
        );
        assert_eq!(one.hub.counters().punches_undelivered, 1);

        // b reconnects to three: its newer subscription replaces two's, and packets flow again.
        let b2 = three.connect("b").await;
        fabric.add_agent(&b2);
        let now = peer_in(&a.drain(), &b.node).expect("a hears b's new session");
        assert_eq!(now.endpoints[0], b2.server_side.remote_address());
        assert_ne!(now.endpoints, first.endpoints);
        a.relay_to(&b2, b"to three");
        assert_eq!(b2.relayed().await, (a.index, b"to three".to_vec()));

        // two comes back and says its (empty) subscriptions again: nothing changes.
        fabric.down.lock().unwrap().remove("two");
        fabric.link_up("two", "one");
        assert!(a.drain().is_empty());
        a.relay_to(&b2, b"still three");
        assert_eq!(b2.relayed().await, (a.index, b"still three".to_vec()));
        // A late word from two about its old session (sent before it noticed) loses too.
        let stale = Subscription {
            node: b.node.clone(),
            index: b.index,
            key: b.key,
            observed: first.endpoints[0],
            local_endpoints: vec![],
            nat: shoal_proto::NatMapping::Unknown,
            since: UnixMillis(1),
        };
        one.hub
            .remote_subscriptions("two", false, vec![stale], vec![]);
        assert!(a.drain().is_empty());
        let _ = (&mut two, &mut three);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_that_moved_on_is_reached_where_it_went_while_its_old_session_lingers() {
        let mut one = Hub::start(OverlayLimits::default(), &["a", "b"]);
        let mut two = one.second();
        let fabric = Arc::new(Fabric::default());
        fabric.join("one", &one);
        fabric.join("two", &two);
        let mut a = one.connect("a").await;
        fabric.add_agent(&a);
        let b = one.connect("b").await;
        a.drain();
        // b lost its path to one and reconnected to two; one has not noticed yet.
        let mut b2 = two.connect("b").await;
        fabric.add_agent(&b2);
        let seen = peer_in(&a.drain(), &b.node).expect("a hears of b's new session");
        assert_eq!(seen.endpoints[0], b2.server_side.remote_address());
        a.relay_to(&b2, b"where it went");
        assert_eq!(b2.relayed().await, (a.index, b"where it went".to_vec()));
        one.hub.punch(
            &a.node,
            &Punch {
                peer: b.node.clone(),
                endpoints: vec![],
            },
        );
        assert!(
            b2.drain()
                .iter()
                .any(|m| matches!(m, ControllerMsg::Punch(p) if p.peer == a.node)),
            "the punch request went to two"
        );
        // The old session ends at last: nothing changes for a.
        one.hub.disconnected(&b.node, b.conn_id);
        assert!(a.drain().is_empty());
        a.relay_to(&b2, b"still there");
        assert_eq!(b2.relayed().await, (a.index, b"still there".to_vec()));
        let _ = &mut two;
    }
}
