//! The controller's overlay shell: the coordinator behind a lock, the links to connected overlay agents,
//! the relay, the NAT probe port, and the latest path reports.
//!
//! Ordering: deltas are computed and queued under one lock, into one unbounded queue per agent that
//! only that agent's connection task drains, so each agent sees its deltas in version order and never
//! before the full netmap it was subscribed with.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use shoal_overlay::{
    relay_socket::{parse_relay_datagram, relay_datagram},
    send_msg,
};
use shoal_proto::{ControllerMsg, NodeId, Observed, OverlayHello, PathReport, PeerIndex, Punch, UnixMillis};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{
    coordinator::{Coordinator, Delivery},
    networks::MembershipChange,
    server::now_ms,
    store::Store,
};

#[derive(Debug)]
struct Link {
    conn_id: u64,
    tx: mpsc::UnboundedSender<ControllerMsg>,
    index: PeerIndex,
}

#[derive(Debug)]
struct HubState {
    coordinator: Coordinator,
    links: HashMap<NodeId, Link>,
}

/// A path report as last received.
#[derive(Debug, Clone)]
pub struct ReportedPaths {
    /// The report.
    pub report: PathReport,
    /// When it arrived.
    pub at: UnixMillis,
}

/// See the module docs.
#[derive(Debug)]
pub struct OverlayHub {
    state: Mutex<HubState>,
    /// Relay index → the control connection of the node that has it.
    relays: RwLock<HashMap<PeerIndex, (NodeId, quinn::Connection)>>,
    paths: Mutex<HashMap<NodeId, ReportedPaths>>,
    probe_port: Mutex<Option<u16>>,
}

impl OverlayHub {
    /// Loads the overlay state from the store; a new netmap epoch starts with every controller run.
    pub fn open(store: &Store, validity: Duration) -> Result<OverlayHub, crate::store::StoreError> {
        let epoch = store.next_netmap_epoch()?;
        let snapshot = store.overlay_snapshot()?;
        Ok(OverlayHub {
            state: Mutex::new(HubState { coordinator: Coordinator::new(epoch, snapshot, validity), links: HashMap::new() }),
            relays: RwLock::new(HashMap::new()),
            paths: Mutex::new(HashMap::new()),
            probe_port: Mutex::new(None),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the NAT probe port told to agents.
    pub fn set_probe_port(&self, port: Option<u16>) {
        *self.probe_port.lock().unwrap_or_else(|p| p.into_inner()) = port;
    }

    fn send_all(links: &HashMap<NodeId, Link>, deliveries: Vec<Delivery>) {
        for (node, msg) in deliveries {
            if let Some(link) = links.get(&node) {
                let _ = link.tx.send(msg);
            }
        }
    }

    /// An agent said it takes part in the overlay (first time on a connection, or again when its
    /// endpoints or NAT changed, or to ask for a full netmap). Returns what to send it now, in order.
    #[allow(clippy::too_many_arguments)]
    pub fn hello(
        &self,
        node: &NodeId,
        conn_id: u64,
        conn: &quinn::Connection,
        tx: &mpsc::UnboundedSender<ControllerMsg>,
        index: PeerIndex,
        key: [u8; 32],
        hello: &OverlayHello,
    ) -> Vec<ControllerMsg> {
        let now = now_ms();
        let observed = conn.remote_address();
        let mut st = self.state();
        // Known first (with its index); its key goes with its endpoints in one delta to its peers.
        st.coordinator.node_known(node, index, None, now);
        let first_on_conn = st.links.get(node).map(|l| l.conn_id) != Some(conn_id);
        let (netmap, updates) = st.coordinator.subscribe(node, Some(key), observed, hello, now);
        st.links.insert(node.clone(), Link { conn_id, tx: tx.clone(), index });
        Self::send_all(&st.links, updates);
        drop(st);
        let mut out = Vec::new();
        if first_on_conn {
            self.relays.write().unwrap_or_else(|p| p.into_inner()).insert(index, (node.clone(), conn.clone()));
            let probe_port = *self.probe_port.lock().unwrap_or_else(|p| p.into_inner());
            out.push(ControllerMsg::Observed(Observed { address: observed, index, probe_port }));
        }
        out.push(netmap);
        out
    }

    /// The agent's connection ended.
    pub fn disconnected(&self, node: &NodeId, conn_id: u64) {
        let mut st = self.state();
        let Some(link) = st.links.get(node) else { return };
        if link.conn_id != conn_id {
            return;
        }
        let index = link.index;
        st.links.remove(node);
        st.coordinator.unsubscribe(node);
        drop(st);
        let mut relays = self.relays.write().unwrap_or_else(|p| p.into_inner());
        if relays.get(&index).is_some_and(|(n, _)| n == node) {
            relays.remove(&index);
        }
    }

    /// Membership changed in the store: tell the connected agents concerned.
    pub fn membership_changed(&self, store: &Store, changes: &[MembershipChange]) {
        if changes.is_empty() {
            return;
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
                        Err(e) => warn!(node = %node, cause = %e, "no relay index; the node's membership waits for its next connection"),
                    }
                }
            }
        }
        let deliveries = st.coordinator.apply(changes, now);
        debug!(changes = changes.len(), deliveries = deliveries.len(), "netmap changes sent");
        Self::send_all(&st.links, deliveries);
    }

    /// A node left the fleet.
    pub fn forget(&self, node: &NodeId) {
        self.state().coordinator.forget(node);
        self.paths.lock().unwrap_or_else(|p| p.into_inner()).remove(node);
    }

    /// `from` asks `punch.peer` to punch towards it now.
    pub fn punch(&self, from: &NodeId, punch: &Punch) {
        let st = self.state();
        if !st.coordinator.share_network(from, &punch.peer) {
            debug!(from = %from, to = %punch.peer, "punch request between nodes that share no network ignored");
            return;
        }
        if let Some(link) = st.links.get(&punch.peer) {
            let endpoints = st.coordinator.endpoints(from);
            let _ = link.tx.send(ControllerMsg::Punch(Punch { peer: from.clone(), endpoints }));
        }
    }

    /// Stores an agent's path report.
    pub fn paths_reported(&self, node: &NodeId, report: PathReport) {
        self.paths.lock().unwrap_or_else(|p| p.into_inner()).insert(node.clone(), ReportedPaths { report, at: now_ms() });
    }

    /// The latest path report of every node.
    pub fn reported_paths(&self) -> Vec<(NodeId, ReportedPaths)> {
        let mut v: Vec<_> = self.paths.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Forwards relayed packets arriving on `node`'s control connection until it closes. A packet
    /// goes only to a node that shares a network with the sender; the relay sees only the peers' QUIC
    /// ciphertext.
    pub async fn relay(self: Arc<Self>, node: NodeId, index: PeerIndex, conn: quinn::Connection) {
        while let Ok(d) = conn.read_datagram().await {
            let Some((to, packet)) = parse_relay_datagram(&d) else { continue };
            let target = self.relays.read().unwrap_or_else(|p| p.into_inner()).get(&to).cloned();
            let Some((peer, target)) = target else {
                debug!(from = %node, to = to.0, "relay destination not connected");
                continue;
            };
            if !self.state().coordinator.share_network(&node, &peer) {
                debug!(from = %node, to = %peer, "relay between nodes that share no network refused");
                continue;
            }
            if let Err(e) = target.send_datagram(relay_datagram(index, &packet)) {
                debug!(from = %node, to = %peer, cause = %e, "relay datagram dropped");
            }
        }
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
                let msg = ControllerMsg::Observed(Observed { address: observed, index: PeerIndex(0), probe_port: None });
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
