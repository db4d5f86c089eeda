//! The agent's overlay datapath: TAP devices, peer connections, and the tasks that move frames
//! between them. A thin async shell around the sans-IO [`Switch`], [`PathManager`] and
//! [`Reassembler`].
//!
//! Tasks:
//! - one *manager* task owns the path manager, the netmap and the connection table; it applies
//!   netmaps, opens and closes connections, checks peer identities, and publishes the route table;
//! - one reader per TAP device: frame → switch → route → datagrams;
//! - one reader per peer connection: datagram → reassembly → switch → TAP;
//! - one accept loop for connections peers open towards this node.
//!
//! The frame path takes two short locks (the switch, then the route table) and never waits on the
//! manager, so a slow netmap or handshake never stalls traffic.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use shoal_proto::{
    DatapathReport, NatMapping, Netmap, NetworkId, NetworkMembership, NodeId, OverlayCounters,
    PathInfo, PathKind, PathReport, PathReportV8, Peer, Punch, RelayedPath, TapDatapath,
};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::{
    observed,
    offload::{self, Coalescer, Push, Segmenter},
    paths::{AttemptFailure, ConnId, PathAction, PathConfig, PathManager},
    pki,
    relay_socket::{relay_addr, relay_index},
    switch::{Bridging, Inbound, Member, Outbound, Switch, SwitchConfig},
    tls::{self, PeerTls},
    wire::{self, Reassembler},
};

/// How the overlay runs. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node.
    pub me: NodeId,
    /// Switch limits (see [`SwitchConfig`]).
    pub switch: SwitchConfig,
    /// Path timing (see [`PathConfig`]).
    pub paths: PathConfig,
    /// A path that carries nothing, not even keep-alives (sent every second), for this long is dead
    /// and traffic moves to another (default 4 s).
    pub path_idle: Duration,
    /// TAP devices are named this plus the network number (default `shoal`: `shoal0` for
    /// `default`).
    pub tap_prefix: String,
    /// Outer congestion controller of peer connections (default CUBIC; see docs/performance.md).
    pub congestion: tls::Congestion,
    /// Open TAP devices with `IFF_VNET_HDR` and TSO/checksum offloads (default true): the kernel
    /// hands over 64 KiB TCP super-frames and takes coalesced ones (see [`crate::offload`]). A
    /// host whose kernel refuses falls back to plain frames, per device.
    pub tap_offload: bool,
}

impl NodeConfig {
    /// Defaults for node `me`.
    pub fn new(me: NodeId) -> Self {
        Self {
            me,
            switch: SwitchConfig::default(),
            paths: PathConfig::default(),
            path_idle: Duration::from_secs(4),
            tap_prefix: "shoal".into(),
            congestion: tls::Congestion::default(),
            tap_offload: true,
        }
    }
}

/// The TAP device name of a network: `default` (network 1) is `<prefix>0`.
pub fn tap_name(prefix: &str, network: NetworkId) -> String {
    format!("{prefix}{}", network.0.saturating_sub(1))
}

/// What the agent tells its overlay.
#[derive(Debug)]
pub enum NodeCommand {
    /// The current netmap (full; the agent applies deltas before passing it on).
    Netmap(Netmap),
    /// A peer is punching towards us: punch back.
    Punch(Punch),
    /// The node certificate was renewed.
    Tls(PeerTls),
    /// This node's NAT mapping was measured (explains relayed paths in reports).
    Nat(NatMapping),
    /// Send back a path report.
    Report(tokio::sync::oneshot::Sender<PathReportV8>),
    /// Send back how the datapath moves frames (offloads, queues, batching).
    Datapath(tokio::sync::oneshot::Sender<DatapathReport>),
}

/// What the overlay asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// Ask the controller to have this peer punch towards us.
    RequestPunch(NodeId),
    /// On a direct path, `peer` sees this node's packets arrive from `addr`: a candidate address
    /// for other peers too.
    Observed {
        /// Who saw it.
        peer: NodeId,
        /// Where.
        addr: SocketAddr,
    },
}

/// A running overlay.
#[derive(Debug)]
pub struct OverlayNode {
    commands: mpsc::UnboundedSender<NodeCommand>,
    shared: Arc<Shared>,
    manager: JoinHandle<()>,
    acceptor: JoinHandle<()>,
}

impl OverlayNode {
    /// Starts the overlay on `endpoint` (which it makes accept peer connections).
    pub fn spawn(
        endpoint: quinn::Endpoint,
        tls: PeerTls,
        config: NodeConfig,
    ) -> (OverlayNode, mpsc::UnboundedReceiver<NodeEvent>) {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let transport = Arc::new(tls::peer_transport(config.path_idle, config.congestion));
        endpoint.set_server_config(Some(tls.server_config(transport.clone())));
        let shared = Arc::new(Shared::new(config.switch.clone()));
        let acceptor = tokio::spawn(accept_loop(endpoint.clone(), internal_tx.clone()));
        let manager = Manager {
            paths: PathManager::new(config.me.clone(), config.paths.clone()),
            config,
            endpoint,
            tls,
            transport,
            netmap: Netmap::default(),
            shared: shared.clone(),
            conns: HashMap::new(),
            next_conn: 0,
            taps: HashMap::new(),
            internal: internal_tx,
            events: events_tx,
        };
        let manager = tokio::spawn(manager.run(command_rx, internal_rx));
        (
            OverlayNode {
                commands,
                shared,
                manager,
                acceptor,
            },
            events_rx,
        )
    }

    /// Sends a command; false if the overlay has stopped.
    pub fn command(&self, command: NodeCommand) -> bool {
        self.commands.send(command).is_ok()
    }

    /// (v9) Attaches a local port to `network` besides its TAP device: frames the switch finds
    /// are for the port ([`crate::switch::Inbound::Port`]: a WireGuard device's) go to `to_port`
    /// (a full channel drops the frame, like a full NIC queue), and the returned [`LocalPort`]
    /// puts frames into the network as if read from the TAP device. Replaces an earlier port.
    pub fn attach_port(&self, network: NetworkId, to_port: mpsc::Sender<Vec<u8>>) -> LocalPort {
        self.shared
            .ports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(network, to_port);
        LocalPort {
            shared: self.shared.clone(),
            network,
            fragment_id: 0,
            wire_buf: BytesMut::new(),
        }
    }

    /// (v9) Detaches `network`'s local port.
    pub fn detach_port(&self, network: NetworkId) {
        self.shared
            .ports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&network);
    }

    /// (v9) Who speaks for `network`'s WireGuard devices (see [`Bridging`]).
    pub fn set_bridging(&self, network: NetworkId, bridging: Bridging) {
        self.shared.switch().set_bridging(network, bridging);
    }

    /// The current path report, with why each relayed path is relayed.
    pub async fn report(&self) -> Option<PathReportV8> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commands.send(NodeCommand::Report(tx)).ok()?;
        rx.await.ok()
    }

    /// How the datapath moves frames: per TAP device its offloads (or why none), queues and
    /// frames per read and write; datagrams per receive batch.
    pub async fn datapath(&self) -> Option<DatapathReport> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commands.send(NodeCommand::Datapath(tx)).ok()?;
        rx.await.ok()
    }
}

impl Drop for OverlayNode {
    fn drop(&mut self) {
        self.manager.abort();
        self.acceptor.abort();
    }
}

/// Per-peer byte counters, kept across path changes.
#[derive(Debug, Default)]
struct PeerCounters {
    tx_bytes: AtomicU64,
    rx_bytes: AtomicU64,
}

#[derive(Debug, Clone)]
struct RouteEntry {
    conn: quinn::Connection,
    counters: Arc<PeerCounters>,
}

/// (v9) A local port's way into its network: frames sent here are switched like frames read from
/// the network's TAP device (the same source-MAC rule, unicast or flood to peers).
pub struct LocalPort {
    shared: Arc<Shared>,
    network: NetworkId,
    fragment_id: u16,
    /// Datagrams are cut from here, as in the TAP reader (`wire::encode_into`).
    wire_buf: BytesMut,
}

impl std::fmt::Debug for LocalPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPort")
            .field("network", &self.network)
            .finish_non_exhaustive()
    }
}

impl LocalPort {
    /// Sends one frame from the port into its network: to peers, and to this node's TAP device
    /// when it is for the node's kernel (or a broadcast).
    pub async fn send(&mut self, frame: &[u8]) {
        self.wire_buf.reserve(frame.len() + 1024);
        let local = forward(
            &self.shared,
            self.network,
            frame,
            Origin::Port,
            &mut self.fragment_id,
            &mut self.wire_buf,
        );
        if !local {
            return;
        }
        match self.shared.tap(self.network) {
            Some(tap) => tap.write_frame(&self.shared, frame).await,
            None => self.shared.drop_frame("no_network"),
        }
    }
}

/// What the frame path shares with the manager.
struct Shared {
    switch: Mutex<Switch>,
    routes: RwLock<HashMap<NodeId, RouteEntry>>,
    taps: RwLock<HashMap<NetworkId, Arc<Tap>>>,
    /// (v9) Local ports (a WireGuard gateway) by network.
    ports: RwLock<HashMap<NetworkId, mpsc::Sender<Vec<u8>>>>,
    /// Drops outside the switch (no path, wire errors), by reason.
    drops: Mutex<BTreeMap<&'static str, u64>>,
    /// Peer datagram receive batches, and the datagrams in them.
    rx_batches: AtomicU64,
    rx_datagrams: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    fn new(config: SwitchConfig) -> Self {
        Self {
            switch: Mutex::new(Switch::new(config)),
            routes: RwLock::new(HashMap::new()),
            taps: RwLock::new(HashMap::new()),
            ports: RwLock::new(HashMap::new()),
            drops: Mutex::new(BTreeMap::new()),
            rx_batches: AtomicU64::new(0),
            rx_datagrams: AtomicU64::new(0),
        }
    }

    fn switch(&self) -> std::sync::MutexGuard<'_, Switch> {
        self.switch.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn drop_frame(&self, reason: &'static str) {
        *self
            .drops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    fn route(&self, peer: &NodeId) -> Option<RouteEntry> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned()
    }

    /// `network`'s TAP device as it is now.
    fn tap(&self, network: NetworkId) -> Option<Arc<Tap>> {
        self.taps
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&network)
            .cloned()
    }

    /// (v9) Hands a frame to `network`'s local port (a full queue drops it, like a full NIC's).
    fn to_port(&self, network: NetworkId, frame: &[u8]) {
        let port = self
            .ports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&network)
            .cloned();
        match port.map(|p| p.try_send(frame.to_vec())) {
            Some(Ok(())) => {}
            Some(Err(_)) => self.drop_frame("port_full"),
            None => self.drop_frame("no_port"),
        }
    }

    /// Sends one frame to one peer on its current route.
    fn send_frame(
        &self,
        route: Option<RouteEntry>,
        network: NetworkId,
        frame: &[u8],
        fragment_id: &mut u16,
        buf: &mut BytesMut,
    ) {
        let Some(route) = route else {
            self.drop_frame("no_path");
            return;
        };
        let Some(max) = route.conn.max_datagram_size() else {
            self.drop_frame("no_datagrams");
            return;
        };
        let mut lost = false;
        let encoded = wire::encode_into(network, frame, max, fragment_id, buf, |d| {
            lost = lost || route.conn.send_datagram(d).is_err();
        });
        match encoded {
            Err(e) => self.drop_frame(e.reason()),
            Ok(()) if lost => self.drop_frame("path_lost"),
            Ok(()) => {
                route
                    .counters
                    .tx_bytes
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
            }
        }
    }

    fn counters(&self) -> OverlayCounters {
        let mut c = self.switch().counters();
        for (reason, n) in self.drops.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            match c.dropped.iter_mut().find(|(r, _)| r == reason) {
                Some((_, m)) => *m += n,
                None => c.dropped.push(((*reason).to_owned(), *n)),
            }
        }
        c.dropped.sort();
        c
    }
}

enum Internal {
    /// A handshake completed: check who it is.
    Connected {
        conn: quinn::Connection,
        expected: Option<NodeId>,
    },
    /// An attempt this side started failed.
    AttemptFailed {
        peer: NodeId,
        kind: PathKind,
        how: AttemptFailure,
        cause: String,
    },
    /// A connection's reader stopped: the connection is gone.
    Closed { id: ConnId },
    /// A TAP device failed.
    TapFailed { network: NetworkId, cause: String },
    /// A peer told us where our packets arrive from.
    Observed { peer: NodeId, addr: SocketAddr },
}

struct TapEntry {
    membership: NetworkMembership,
    device: Arc<Tap>,
    reader: JoinHandle<()>,
}

/// A TAP device and whether it was opened with offloads (every read and write then carries a
/// virtio-net header).
struct Tap {
    device: tun_rs::AsyncDevice,
    offload: bool,
    /// With offloads: whether the kernel took UDP segmentation (USO) too, besides csum/TSO.
    uso: bool,
    /// Without offloads: why (see [`TapDatapath::fallback`]).
    fallback: Option<String>,
    stats: TapStats,
}

/// How a TAP device's reads and writes batch, since it came up.
#[derive(Debug, Default)]
struct TapStats {
    reads: AtomicU64,
    read_frames: AtomicU64,
    writes: AtomicU64,
    write_frames: AtomicU64,
}

impl TapStats {
    fn read(&self, frames: usize) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.read_frames.fetch_add(frames as u64, Ordering::Relaxed);
    }

    /// `writes` TAP writes carried `frames` frames between them.
    fn wrote(&self, writes: u64, frames: usize) {
        self.writes.fetch_add(writes, Ordering::Relaxed);
        self.write_frames
            .fetch_add(frames as u64, Ordering::Relaxed);
    }
}

impl Tap {
    /// What the datapath report says of this device.
    fn datapath(&self, network: NetworkId, device: String) -> TapDatapath {
        let offloads = match (self.offload, self.uso) {
            (false, _) => vec![],
            (true, false) => vec!["csum", "tso4", "tso6"],
            (true, true) => vec!["csum", "tso4", "tso6", "uso4", "uso6"],
        };
        TapDatapath {
            network,
            device,
            offloads: offloads.into_iter().map(String::from).collect(),
            fallback: self.fallback.clone(),
            queues: 1,
            reads: self.stats.reads.load(Ordering::Relaxed),
            read_frames: self.stats.read_frames.load(Ordering::Relaxed),
            writes: self.stats.writes.load(Ordering::Relaxed),
            write_frames: self.stats.write_frames.load(Ordering::Relaxed),
        }
    }

    /// Writes one plain frame, counting the write or the drop.
    async fn write_frame(&self, shared: &Shared, frame: &[u8]) {
        let written = if self.offload {
            let parts = [
                std::io::IoSlice::new(&offload::PLAIN_HDR),
                std::io::IoSlice::new(frame),
            ];
            self.device.send_vectored(&parts).await
        } else {
            self.device.send(frame).await
        };
        match written {
            Ok(_) => self.stats.wrote(1, 1),
            Err(_) => shared.drop_frame("tap_write"),
        }
    }
}

struct ConnEntry {
    conn: quinn::Connection,
    peer: NodeId,
    reader: JoinHandle<()>,
    counters: Arc<PeerCounters>,
}

struct Manager {
    config: NodeConfig,
    paths: PathManager,
    endpoint: quinn::Endpoint,
    tls: PeerTls,
    transport: Arc<quinn::TransportConfig>,
    netmap: Netmap,
    shared: Arc<Shared>,
    conns: HashMap<ConnId, ConnEntry>,
    next_conn: ConnId,
    taps: HashMap<NetworkId, TapEntry>,
    internal: mpsc::UnboundedSender<Internal>,
    events: mpsc::UnboundedSender<NodeEvent>,
}

impl Manager {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<NodeCommand>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
    ) {
        let mut counters: HashMap<NodeId, Arc<PeerCounters>> = HashMap::new();
        loop {
            let deadline = self
                .paths
                .poll_timeout()
                .map(tokio::time::Instant::from_std);
            let actions = tokio::select! {
                cmd = commands.recv() => match cmd {
                    None => break,
                    Some(NodeCommand::Netmap(map)) => self.apply_netmap(Instant::now(), map),
                    Some(NodeCommand::Punch(p)) => self.paths.punch_requested(Instant::now(), &p.peer, &p.endpoints),
                    Some(NodeCommand::Tls(tls)) => {
                        self.endpoint.set_server_config(Some(tls.server_config(self.transport.clone())));
                        self.tls = tls;
                        vec![]
                    }
                    Some(NodeCommand::Nat(nat)) => {
                        self.paths.set_nat(nat);
                        vec![]
                    }
                    Some(NodeCommand::Report(tx)) => {
                        let _ = tx.send(self.report(&counters));
                        vec![]
                    }
                    Some(NodeCommand::Datapath(tx)) => {
                        let _ = tx.send(self.datapath());
                        vec![]
                    }
                },
                ev = internal.recv() => match ev {
                    None => break,
                    Some(ev) => self.handle_internal(Instant::now(), ev, &mut counters),
                },
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    self.paths.handle_timeout(Instant::now())
                }
            };
            self.perform(actions);
            self.publish_routes(&mut counters);
        }
        for (_, c) in self.conns.drain() {
            c.conn.close(0u32.into(), b"overlay stopped");
            c.reader.abort();
        }
        for (_, t) in self.taps.drain() {
            t.reader.abort();
        }
    }

    fn handle_internal(
        &mut self,
        now: Instant,
        ev: Internal,
        counters: &mut HashMap<NodeId, Arc<PeerCounters>>,
    ) -> Vec<PathAction> {
        match ev {
            Internal::Connected { conn, expected } => {
                let ours = expected.is_some();
                let peer = match self.verify(&conn, expected.as_ref()) {
                    Ok(peer) => peer,
                    Err(reason) => {
                        warn!(remote = %conn.remote_address(), reason, "refused a peer connection");
                        self.shared.drop_frame("refused_peer");
                        conn.close(1u32.into(), reason.as_bytes());
                        if let Some(peer) = expected {
                            let kind = kind_of(conn.remote_address());
                            return self.paths.attempt_failed(
                                now,
                                &peer,
                                kind,
                                AttemptFailure::Refused,
                            );
                        }
                        return vec![];
                    }
                };
                let kind = kind_of(conn.remote_address());
                let id = self.next_conn;
                self.next_conn += 1;
                let peer_counters = counters.entry(peer.clone()).or_default().clone();
                let reader = tokio::spawn(read_loop(
                    conn.clone(),
                    peer.clone(),
                    id,
                    self.shared.clone(),
                    peer_counters.clone(),
                    self.internal.clone(),
                ));
                info!(peer = %peer, conn = id, ?kind, remote = %conn.remote_address(), ours, "peer path up");
                if kind == PathKind::Direct {
                    tokio::spawn(exchange_observed(
                        conn.clone(),
                        peer.clone(),
                        self.internal.clone(),
                    ));
                }
                self.conns.insert(
                    id,
                    ConnEntry {
                        conn: conn.clone(),
                        peer: peer.clone(),
                        reader,
                        counters: peer_counters,
                    },
                );
                self.paths
                    .connected(now, &peer, id, kind, ours, conn.remote_address())
            }
            Internal::AttemptFailed {
                peer,
                kind,
                how,
                cause,
            } => {
                debug!(peer = %peer, ?kind, ?how, cause, "path attempt failed");
                self.paths.attempt_failed(now, &peer, kind, how)
            }
            Internal::Closed { id } => match self.conns.remove(&id) {
                Some(c) => {
                    info!(peer = %c.peer, conn = id, reason = ?c.conn.close_reason(), "peer path down");
                    self.paths.closed(now, id)
                }
                None => vec![],
            },
            Internal::Observed { peer, addr } => {
                debug!(peer = %peer, %addr, "a peer sees this node at this address");
                let _ = self.events.send(NodeEvent::Observed { peer, addr });
                vec![]
            }
            Internal::TapFailed { network, cause } => {
                warn!(
                    network = network.0,
                    cause, "TAP device failed; recreating it at the next netmap"
                );
                if let Some(t) = self.taps.remove(&network) {
                    t.reader.abort();
                    self.shared
                        .taps
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&network);
                }
                vec![]
            }
        }
    }

    /// Checks that a connection's peer is a current peer with the key the controller vouched for.
    fn verify(
        &self,
        conn: &quinn::Connection,
        expected: Option<&NodeId>,
    ) -> Result<NodeId, &'static str> {
        let chain = tls::peer_chain(conn).ok_or("no certificate")?;
        let info = chain
            .first()
            .map(|c| pki::cert_info(c))
            .ok_or("no certificate")?
            .map_err(|_| "unusable certificate")?;
        if expected.is_some_and(|e| *e != info.node_id) {
            return Err("certificate names another node");
        }
        let peer = self
            .netmap
            .peer(&info.node_id)
            .ok_or("not a peer in the netmap")?;
        if peer.key_sha256 != [0; 32] && peer.key_sha256 != info.key_sha256 {
            return Err("key does not match the netmap (stale certificate)");
        }
        Ok(info.node_id)
    }

    fn apply_netmap(&mut self, now: Instant, map: Netmap) -> Vec<PathAction> {
        // TAP devices: one per network; recreated when their settings change.
        for m in &map.networks {
            if self.taps.get(&m.id).is_some_and(|t| t.membership == *m) {
                continue;
            }
            if let Some(old) = self.taps.remove(&m.id) {
                old.reader.abort();
            }
            match self.create_tap(m) {
                Ok(entry) => {
                    self.shared
                        .taps
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(m.id, entry.device.clone());
                    self.taps.insert(m.id, entry);
                }
                Err(e) => warn!(network = %m.name, cause = %e, "could not create the TAP device"),
            }
        }
        let gone: Vec<NetworkId> = self
            .taps
            .keys()
            .filter(|id| !map.networks.iter().any(|m| m.id == **id))
            .copied()
            .collect();
        for id in gone {
            if let Some(t) = self.taps.remove(&id) {
                t.reader.abort();
                info!(network = id.0, device = %tap_name(&self.config.tap_prefix, id), "left network; TAP device removed");
            }
            self.shared
                .taps
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            self.shared.switch().remove_network(id);
        }
        {
            let mut switch = self.shared.switch();
            for m in &map.networks {
                let members = map.peers.iter().filter_map(|p| {
                    let n = p.networks.iter().find(|n| n.id == m.id)?;
                    Some(Member {
                        node: p.node.clone(),
                        mac: n.mac,
                        address: n.address,
                    })
                });
                if let Err(e) = switch.set_network(m, members) {
                    warn!(network = %m.name, cause = %e, "netmap refused by the switch");
                }
            }
        }
        // A peer whose key changed must not keep a connection made with the old one.
        let mut actions = Vec::new();
        for (id, c) in &self.conns {
            let changed = |p: &Peer| {
                self.netmap
                    .peer(&p.node)
                    .is_some_and(|old| old.key_sha256 != p.key_sha256)
            };
            if map.peers.iter().any(|p| p.node == c.peer && changed(p)) {
                actions.push(PathAction::Close {
                    conn: *id,
                    reason: "peer key changed",
                });
            }
        }
        let peers = map.peers.clone();
        self.netmap = map;
        actions.extend(self.paths.set_peers(now, &peers));
        actions
    }

    fn create_tap(&self, m: &NetworkMembership) -> std::io::Result<TapEntry> {
        let name = tap_name(&self.config.tap_prefix, m.id);
        // Created down, so that the link-local address is generated, when it comes up, by the rule
        // peers check (see `link_sysctls`).
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(&name)
                .layer(tun_rs::Layer::L2)
                .mac_addr(m.mac.0)
                .mtu(m.mtu)
                .ipv4(m.address, m.prefix_len, None)
                .offload(offload)
                .enable(false)
                .build_async()
        };
        let (device, fallback) = match self.config.tap_offload {
            false => (build(false)?, Some("disabled".to_owned())),
            true => match build(true) {
                Ok(d) => (d, None),
                Err(e) => {
                    warn!(device = %name, cause = %e, "TAP offloads refused by the kernel; plain frames");
                    (build(false)?, Some(format!("refused: {e}")))
                }
            },
        };
        let offload = fallback.is_none();
        link_sysctls(&name);
        device.enabled(true)?;
        let uso = offload && device.udp_gso();
        let device = Arc::new(Tap {
            device,
            offload,
            uso,
            fallback,
            stats: TapStats::default(),
        });
        info!(device = %name, network = %m.name, mac = %m.mac, address = %m.address, prefix = m.prefix_len, mtu = m.mtu, offload, "TAP device up");
        let reader = tokio::spawn(tap_loop(
            m.id,
            device.clone(),
            self.shared.clone(),
            self.internal.clone(),
        ));
        Ok(TapEntry {
            membership: m.clone(),
            device,
            reader,
        })
    }

    fn perform(&mut self, actions: Vec<PathAction>) {
        for action in actions {
            match action {
                PathAction::ConnectDirect { peer, addr } => self.connect(peer, addr),
                PathAction::ConnectRelay { peer, index } => self.connect(peer, relay_addr(index)),
                PathAction::RequestPunch { peer } => {
                    let _ = self.events.send(NodeEvent::RequestPunch(peer));
                }
                PathAction::Close { conn, reason } => {
                    if let Some(c) = self.conns.get(&conn) {
                        debug!(peer = %c.peer, conn, reason, "closing path");
                        c.conn.close(0u32.into(), reason.as_bytes());
                    }
                }
            }
        }
    }

    fn connect(&self, peer: NodeId, addr: SocketAddr) {
        let kind = kind_of(addr);
        let internal = self.internal.clone();
        let connecting = self
            .tls
            .client_config(self.transport.clone())
            .map_err(|e| e.to_string())
            .and_then(|cfg| {
                self.endpoint
                    .connect_with(cfg, addr, &pki::node_server_name(&peer))
                    .map_err(|e| e.to_string())
            });
        tokio::spawn(async move {
            let event = match connecting {
                Ok(connecting) => match connecting.await {
                    Ok(conn) => Internal::Connected {
                        conn,
                        expected: Some(peer),
                    },
                    Err(e) => Internal::AttemptFailed {
                        peer,
                        kind,
                        how: match e {
                            quinn::ConnectionError::TimedOut => AttemptFailure::TimedOut,
                            _ => AttemptFailure::Refused,
                        },
                        cause: e.to_string(),
                    },
                },
                Err(cause) => Internal::AttemptFailed {
                    peer,
                    kind,
                    how: AttemptFailure::Refused,
                    cause,
                },
            };
            let _ = internal.send(event);
        });
    }

    fn publish_routes(&mut self, counters: &mut HashMap<NodeId, Arc<PeerCounters>>) {
        let routes: HashMap<NodeId, RouteEntry> = self
            .paths
            .routes()
            .filter_map(|(peer, route)| {
                let c = self.conns.get(&route?.conn)?;
                Some((
                    peer.clone(),
                    RouteEntry {
                        conn: c.conn.clone(),
                        counters: c.counters.clone(),
                    },
                ))
            })
            .collect();
        counters.retain(|peer, _| self.paths.is_peer(peer));
        *self
            .shared
            .routes
            .write()
            .unwrap_or_else(|p| p.into_inner()) = routes;
    }

    fn datapath(&self) -> DatapathReport {
        let mut taps: Vec<TapDatapath> = self
            .taps
            .iter()
            .map(|(id, t)| {
                t.device
                    .datapath(*id, tap_name(&self.config.tap_prefix, *id))
            })
            .collect();
        taps.sort_by_key(|t| t.network);
        DatapathReport {
            taps,
            rx_batches: self.shared.rx_batches.load(Ordering::Relaxed),
            rx_datagrams: self.shared.rx_datagrams.load(Ordering::Relaxed),
        }
    }

    fn report(&self, counters: &HashMap<NodeId, Arc<PeerCounters>>) -> PathReportV8 {
        let paths: Vec<PathInfo> = self
            .paths
            .routes()
            .filter_map(|(peer, route)| {
                let route = route?;
                let conn = self.conns.get(&route.conn)?;
                let c = counters.get(peer);
                Some(PathInfo {
                    peer: peer.clone(),
                    kind: route.kind,
                    remote: (route.kind == PathKind::Direct).then_some(conn.conn.remote_address()),
                    rtt_ms: conn.conn.rtt().as_secs_f64() * 1000.0,
                    tx_bytes: c.map_or(0, |c| c.tx_bytes.load(Ordering::Relaxed)),
                    rx_bytes: c.map_or(0, |c| c.rx_bytes.load(Ordering::Relaxed)),
                })
            })
            .collect();
        let relayed = paths
            .iter()
            .filter(|p| p.kind == PathKind::Relay)
            .filter_map(|p| {
                Some(RelayedPath {
                    peer: p.peer.clone(),
                    reason: self.paths.relay_reason(&p.peer)?,
                })
            })
            .collect();
        PathReportV8 {
            report: PathReport {
                paths,
                counters: self.shared.counters(),
            },
            relayed,
        }
    }
}

/// Per-device settings that make this node's frames pass its peers' address checks
/// ([`crate::switch::check_addresses`]), written before the device first comes up:
///
/// - `ipv6/conf/<dev>/addr_gen_mode = 0`: the link-local address is the EUI-64 of the assigned MAC
///   ([`crate::switch::ipv6_link_local`]), not a stable-privacy or random one a host's defaults may
///   ask for;
/// - `ipv4/conf/<dev>/arp_announce = 2`: ARP requests name the device's own address as sender,
///   never an address of another interface.
///
/// Best effort: without IPv6 the first does not exist, and a failure is logged.
fn link_sysctls(device: &str) {
    for (path, value) in [
        (
            format!("/proc/sys/net/ipv6/conf/{device}/addr_gen_mode"),
            "0",
        ),
        (
            format!("/proc/sys/net/ipv4/conf/{device}/arp_announce"),
            "2",
        ),
    ] {
        match std::fs::write(&path, value) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                debug!(path, "sysctl absent; skipped")
            }
            Err(e) => {
                warn!(path, cause = %e, "could not set a TAP sysctl; peers may drop this node's frames")
            }
        }
    }
}

fn kind_of(addr: SocketAddr) -> PathKind {
    if relay_index(addr).is_some() {
        PathKind::Relay
    } else {
        PathKind::Direct
    }
}

/// Tells the peer where its packets come from on a direct connection, and learns where ours do.
async fn exchange_observed(
    conn: quinn::Connection,
    peer: NodeId,
    internal: mpsc::UnboundedSender<Internal>,
) {
    let (told, learnt) = tokio::join!(
        observed::tell(&conn),
        observed::learn(&conn, observed::OBSERVE_TIMEOUT)
    );
    if let Err(e) = told {
        debug!(peer = %peer, cause = %e, "could not tell the peer its address");
    }
    match learnt {
        Ok(addr) => {
            let _ = internal.send(Internal::Observed { peer, addr });
        }
        Err(e) => debug!(peer = %peer, cause = %e, "no observed address from the peer"),
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, internal: mpsc::UnboundedSender<Internal>) {
    while let Some(incoming) = endpoint.accept().await {
        let internal = internal.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => {
                    let _ = internal.send(Internal::Connected {
                        conn,
                        expected: None,
                    });
                }
                Err(e) => debug!(%remote, cause = %e, "incoming peer handshake failed"),
            }
        });
    }
}

async fn read_loop(
    conn: quinn::Connection,
    peer: NodeId,
    id: ConnId,
    shared: Arc<Shared>,
    counters: Arc<PeerCounters>,
    internal: mpsc::UnboundedSender<Internal>,
) {
    let mut reassembler = Reassembler::default();
    let mut out = TapOut::default();
    let mut batch = Vec::with_capacity(offload::MAX_BATCH);
    while let Ok(first) = conn.read_datagram().await {
        // Take what else has already arrived, so that the TAP writes of a burst can be coalesced.
        batch.push(first);
        while batch.len() < offload::MAX_BATCH {
            match ready_datagram(&conn) {
                Some(d) => batch.push(d),
                None => break,
            }
        }
        shared.rx_batches.fetch_add(1, Ordering::Relaxed);
        shared
            .rx_datagrams
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for datagram in batch.drain(..) {
            receive(
                &shared,
                &peer,
                &counters,
                &mut reassembler,
                &mut out,
                &datagram,
            )
            .await;
        }
        out.flush(&shared).await;
        // Looked up again next batch: a TAP device recreated meanwhile must get the frames, and
        // the old one must not be held open.
        out.tap = None;
    }
    let _ = internal.send(Internal::Closed { id });
}

/// A datagram that has already arrived, without waiting for one.
fn ready_datagram(conn: &quinn::Connection) -> Option<Bytes> {
    use std::future::Future;
    let mut read = std::pin::pin!(conn.read_datagram());
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match read.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(Ok(d)) => Some(d),
        _ => None,
    }
}

/// Frames received in one batch on their way to a TAP device: coalesced when it has offloads,
/// written one by one otherwise.
#[derive(Default)]
struct TapOut {
    tap: Option<(NetworkId, Arc<Tap>)>,
    coalescer: Coalescer,
}

impl TapOut {
    async fn deliver(&mut self, shared: &Shared, network: NetworkId, frame: &[u8]) {
        if self.tap.as_ref().is_none_or(|(n, _)| *n != network) {
            self.flush(shared).await;
            self.tap = shared.tap(network).map(|t| (network, t));
        }
        let Some((_, tap)) = &self.tap else {
            shared.drop_frame("no_network");
            return;
        };
        let tap = tap.clone();
        if tap.offload {
            match self.coalescer.push(frame) {
                Push::Taken => return,
                Push::Full => {
                    self.flush(shared).await;
                    if self.coalescer.push(frame) == Push::Taken {
                        return;
                    }
                }
                Push::Alone => {}
            }
        }
        tap.write_frame(shared, frame).await;
    }

    /// Writes what the coalescer holds.
    async fn flush(&mut self, shared: &Shared) {
        if self.coalescer.is_empty() {
            return;
        }
        let Some((_, tap)) = &self.tap else { return };
        let frames = self.coalescer.len();
        match self.coalescer.flush() {
            Ok(writes) => {
                let mut written = 0;
                for w in writes {
                    if tap.device.send(w).await.is_err() {
                        shared.drop_frame("tap_write");
                    } else {
                        written += 1;
                    }
                }
                // The frames count once, on the batch's writes (which are fewer when merged).
                if written > 0 {
                    tap.stats.wrote(written, frames);
                }
            }
            Err(e) => shared.drop_frame(e.reason()),
        }
    }
}

async fn receive(
    shared: &Shared,
    peer: &NodeId,
    counters: &PeerCounters,
    reassembler: &mut Reassembler,
    out: &mut TapOut,
    datagram: &Bytes,
) {
    let now = Instant::now();
    let wire::ReceivedFrame { network, frame } = match reassembler.receive(now, datagram) {
        Ok(Some(f)) => f,
        Ok(None) => return,
        Err(e) => {
            shared.drop_frame(e.reason());
            return;
        }
    };
    let verdict = shared.switch().inbound(now, peer, network, &frame);
    if matches!(verdict, Inbound::Drop(_)) {
        return;
    }
    counters
        .rx_bytes
        .fetch_add(frame.len() as u64, Ordering::Relaxed);
    match verdict {
        Inbound::Port => shared.to_port(network, &frame),
        Inbound::DeliverAndPort => {
            shared.to_port(network, &frame);
            out.deliver(shared, network, &frame).await;
        }
        Inbound::Deliver => out.deliver(shared, network, &frame).await,
        Inbound::Drop(_) => {}
    }
}

/// The least a TAP reader reserves for the datagrams of one read: plain-frame reads (no offloads)
/// then share an allocation across ~45 frames.
const WIRE_BUF_MIN: usize = 64 * 1024;

async fn tap_loop(
    network: NetworkId,
    device: Arc<Tap>,
    shared: Arc<Shared>,
    internal: mpsc::UnboundedSender<Internal>,
) {
    // With offloads a read is a virtio-net header and up to 64 KiB of TSO super-frame.
    let mut buf = vec![0u8; offload::VNET_HDR_LEN + 65536 + 64];
    let mut segmenter = Segmenter::default();
    let mut fragment_id = 0u16;
    // Datagrams are cut from this buffer (see `wire::encode_into`): one allocation per TAP read at
    // most, none once quinn has sent the previous read's datagrams and the space is reused.
    let mut wire_buf = BytesMut::new();
    loop {
        let n = match device.device.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                let _ = internal.send(Internal::TapFailed {
                    network,
                    cause: e.to_string(),
                });
                return;
            }
        };
        // Room for the segments' copied headers and wire headers too (≈ 70 bytes per 1.3 KiB
        // segment); below glibc's 128 KiB mmap threshold, so no mmap/munmap per read.
        wire_buf.reserve((n + n / 4 + 1024).max(WIRE_BUF_MIN));
        // A frame for the peers, and for this node's gateway port when the switch says so.
        let mut from_tap = |frame: &[u8]| {
            if forward(
                &shared,
                network,
                frame,
                Origin::Tap,
                &mut fragment_id,
                &mut wire_buf,
            ) {
                shared.to_port(network, frame);
            }
        };
        if device.offload {
            let sent = segmenter.split(&mut buf[..n], &mut from_tap);
            match sent {
                Ok(frames) => device.stats.read(frames),
                Err(e) => {
                    debug!(network = network.0, cause = %e, "TAP read not segmented");
                    shared.drop_frame(e.reason());
                }
            }
        } else {
            from_tap(&buf[..n]);
            device.stats.read(1);
        }
    }
}

/// Where a frame from this node entered its network.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// Read from the TAP device.
    Tap,
    /// (v9) Sent by the local port (the WireGuard gateway).
    Port,
}

/// Sends one frame from this node to the peers the switch says; true if it also goes to the
/// node's other end ([`Outbound::Local`]: the port for a TAP frame, the TAP for a port frame),
/// which the caller delivers.
fn forward(
    shared: &Shared,
    network: NetworkId,
    frame: &[u8],
    origin: Origin,
    fragment_id: &mut u16,
    buf: &mut BytesMut,
) -> bool {
    let now = Instant::now();
    // Decide and look up routes under the switch lock, then send without it. Unicast, the
    // common case, allocates nothing here.
    let mut switch = shared.switch();
    let verdict = match origin {
        Origin::Tap => switch.outbound(now, network, frame),
        Origin::Port => switch.from_port(network, frame),
    };
    match verdict {
        Outbound::Unicast(peer) => {
            let route = shared.route(peer);
            drop(switch);
            shared.send_frame(route, network, frame, fragment_id, buf);
            false
        }
        Outbound::Flood(peers) | Outbound::FloodAndLocal(peers) => {
            let local = matches!(verdict, Outbound::FloodAndLocal(_));
            let routes: Vec<Option<RouteEntry>> = peers.iter().map(|p| shared.route(p)).collect();
            drop(switch);
            for route in routes {
                shared.send_frame(route, network, frame, fragment_id, buf);
            }
            local
        }
        Outbound::Local => true,
        Outbound::Drop(_) => false,
    }
}
