//! The controller mesh: how controllers of one cluster reach each other's agents without going
//! through etcd.
//!
//! Every controller dials every other live member (from the membership in etcd) on its agent port
//! with ALPN `shoal-mesh`, proves it holds the fleet CA's key ([`wire::PROOF_LABEL`]) and then
//! sends, on that one connection: its *presence* (which nodes are connected to it, their protocol,
//! boot and update reports — a full snapshot first, then what changed, once a second), messages
//! for agents the other controller holds (`Deliver`), and agents' news for the rollouts when the
//! other controller leads (`RolloutNews`: the news itself waits in the store). Each direction has its own connection: the dialer
//! only sends, the acceptor only receives.
//!
//! So the leader's drivers see and reach every node wherever its session is
//! ([`crate::server::Controller::send_to`], [`crate::server::Controller::presence_of`]), and
//! liveness, heartbeats and path reports never become etcd writes. When a mesh connection ends,
//! what its dialer said is forgotten at once; the dialer resends a full snapshot when it is back.
//!
//! The overlay rides the same links ([`OverlayPort`]): each controller's agents' subscriptions (a
//! snapshot first, then each change), the membership and key changes it makes, punch requests for
//! agents the other holds (`Deliver`), and relayed packets as QUIC datagrams
//! ([`wire::relay_datagram`]). Unlike presence, overlay subscriptions outlive the link: an agent
//! whose controller died keeps its place in the other controllers' netmaps.

pub(crate) mod wire;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use shoal_overlay::{framed, pki, tls, TransportError};
use shoal_proto::{ControllerMsg, FrameError, NodeId, PeerIndex};
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};

use crate::connections::SendError;
use crate::overlay::hub::{MeshPort, OverlayHub, OverlayNews};
use crate::server::Controller;
use wire::{
    MeshMsg, NodePresence, MAX_GATEWAYS_PER_FRAME, MAX_MEMBERSHIP_CHANGES_PER_FRAME,
    MAX_PRESENCE_PER_FRAME, MAX_SUBSCRIPTIONS_PER_FRAME, MESH_VERSION,
};

/// Messages queued for one peer before the link counts as stuck (it is then dropped and redialled,
/// which resends the presence in full).
const LINK_QUEUE: usize = 16_384;
/// Mesh connections that have not proved themselves yet, at once.
const MAX_PENDING: usize = 32;
/// How long a dial, and a Hello, may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// A node connected to another controller.
#[derive(Debug, Clone)]
pub(crate) struct RemoteNode {
    /// The controller that holds its session.
    pub controller: String,
    /// What that controller said of it.
    pub presence: NodePresence,
}

#[derive(Debug)]
struct LinkTx {
    tx: mpsc::Sender<MeshMsg>,
    generation: u64,
    /// The link's connection, for relayed packets (datagrams).
    conn: quinn::Connection,
}

/// The mesh's state in one controller.
#[derive(Debug)]
pub(crate) struct Mesh {
    secret: [u8; 32],
    /// Outgoing links, by peer id.
    links: Mutex<HashMap<String, LinkTx>>,
    /// Peers being dialled.
    dialing: Mutex<HashSet<String>>,
    /// Nodes connected to other controllers.
    remote: RwLock<HashMap<NodeId, RemoteNode>>,
    /// The presence every link has been told.
    published: Mutex<HashMap<NodeId, NodePresence>>,
    /// The newest accepted connection per peer.
    accepted: Mutex<HashMap<String, u64>>,
    /// The WireGuard gateways connected here, as every link has been told.
    gateways: Mutex<Vec<NodeId>>,
    /// The WireGuard gateways each peer said it holds, on the link it dials to us now.
    remote_gateways: Mutex<HashMap<String, Vec<NodeId>>>,
    generation: AtomicU64,
    pending: Arc<Semaphore>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Mesh {
    /// A mesh whose members prove themselves with `secret`.
    pub(crate) fn new(secret: [u8; 32]) -> Mesh {
        Mesh {
            secret,
            links: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashSet::new()),
            remote: RwLock::new(HashMap::new()),
            published: Mutex::new(HashMap::new()),
            accepted: Mutex::new(HashMap::new()),
            gateways: Mutex::new(Vec::new()),
            remote_gateways: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            pending: Arc::new(Semaphore::new(MAX_PENDING)),
        }
    }

    /// The node's session on another controller, if one said so.
    pub(crate) fn remote(&self, node: &NodeId) -> Option<RemoteNode> {
        self.remote
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
    }

    /// Every node connected to another controller.
    pub(crate) fn remote_all(&self) -> HashMap<NodeId, RemoteNode> {
        self.remote
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends `msg` to every peer it has a link to (best effort: a peer without a link now gets
    /// nothing).
    pub(crate) fn broadcast(&self, msg: MeshMsg) {
        for (peer, link) in lock(&self.links).iter() {
            if link.tx.try_send(msg.clone()).is_err() {
                warn!(peer = %peer, "mesh link full; a broadcast was not queued");
            }
        }
    }

    fn send_to_peer(&self, peer: &str, msg: MeshMsg) -> bool {
        let links = lock(&self.links);
        match links.get(peer) {
            Some(link) => link.tx.try_send(msg).is_ok(),
            None => false,
        }
    }

    /// Queues `msg` for `node` on the controller that holds its session.
    pub(crate) fn forward(
        &self,
        node: &NodeId,
        msg: ControllerMsg,
        min_protocol: u16,
    ) -> Result<(), SendError> {
        let remote = self
            .remote(node)
            .ok_or_else(|| SendError::NotConnected(node.clone()))?;
        let protocol = remote.presence.protocol.unwrap_or(0);
        if protocol < min_protocol {
            return Err(SendError::TooOld {
                node: node.clone(),
                protocol,
                needs: min_protocol,
            });
        }
        let sent = self.send_to_peer(
            &remote.controller,
            MeshMsg::Deliver {
                node: node.clone(),
                min_protocol,
                msg,
            },
        );
        if sent {
            Ok(())
        } else {
            Err(SendError::NotConnected(node.clone()))
        }
    }

    /// Tells the leader `leader` that the rollout inbox holds news; false when it cannot go now
    /// (the leader's next tick finds it anyway).
    pub(crate) fn wake_leader(&self, leader: &str) -> bool {
        self.send_to_peer(leader, MeshMsg::RolloutNews)
    }

    /// Publishes `now` (this controller's connected nodes) to every link: what changed since the
    /// last call.
    pub(crate) fn publish(&self, now: HashMap<NodeId, NodePresence>) {
        let mut published = lock(&self.published);
        let mut up: Vec<NodePresence> = now
            .values()
            .filter(|p| published.get(&p.node) != Some(*p))
            .cloned()
            .collect();
        let gone: Vec<NodeId> = published
            .keys()
            .filter(|n| !now.contains_key(*n))
            .cloned()
            .collect();
        *published = now;
        if up.is_empty() && gone.is_empty() {
            return;
        }
        let mut frames = Vec::new();
        let mut gone = Some(gone);
        loop {
            let take = up.len().min(MAX_PRESENCE_PER_FRAME);
            let chunk: Vec<NodePresence> = up.drain(..take).collect();
            frames.push(MeshMsg::Presence {
                reset: false,
                up: chunk,
                gone: gone.take().unwrap_or_default(),
            });
            if up.is_empty() {
                break;
            }
        }
        let mut links = lock(&self.links);
        links.retain(|peer, link| {
            for f in &frames {
                if link.tx.try_send(f.clone()).is_err() {
                    warn!(peer = %peer, "mesh link not keeping up; dropping it (it resends everything when redialled)");
                    return false;
                }
            }
            true
        });
    }

    /// Tells every link the WireGuard gateways connected here, when they changed.
    pub(crate) fn publish_gateways(&self, mut now: Vec<NodeId>) {
        if now.len() > MAX_GATEWAYS_PER_FRAME {
            warn!(
                gateways = now.len(),
                "more WireGuard gateways than the mesh carries; the others are not announced"
            );
            now.truncate(MAX_GATEWAYS_PER_FRAME);
        }
        let mut published = lock(&self.gateways);
        if *published == now {
            return;
        }
        *published = now.clone();
        self.broadcast(MeshMsg::WireGuardGateways(now));
    }

    /// The WireGuard gateways each peer holds, by peer, as each said on its link now.
    pub(crate) fn remote_gateways(&self) -> HashMap<String, Vec<NodeId>> {
        lock(&self.remote_gateways).clone()
    }

    fn apply_gateways(&self, peer: &str, mut gateways: Vec<NodeId>) {
        gateways.truncate(MAX_GATEWAYS_PER_FRAME);
        lock(&self.remote_gateways).insert(peer.to_owned(), gateways);
    }

    /// Sends a relayed packet to `peer` as a datagram on the link; false if it was dropped.
    pub(crate) fn relay(&self, peer: &str, to: PeerIndex, from: PeerIndex, packet: &[u8]) -> bool {
        let conn = match lock(&self.links).get(peer) {
            Some(link) => link.conn.clone(),
            None => return false,
        };
        match conn.send_datagram(wire::relay_datagram(to, from, packet)) {
            Ok(()) => true,
            Err(e) => {
                debug!(peer = %peer, cause = %e, bytes = packet.len(), "relay datagram not sent on the mesh link");
                false
            }
        }
    }

    /// A new outgoing link: queues the full presence and the overlay's subscriptions on it, then
    /// adds it (under the publish lock and the hub's, so it misses no change).
    fn register(
        &self,
        peer: &str,
        tx: mpsc::Sender<MeshMsg>,
        conn: quinn::Connection,
        overlay: &OverlayHub,
    ) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let published = lock(&self.published);
        // Held until the link is added, so a change published meanwhile is not missed.
        let gateways = lock(&self.gateways);
        let _ = tx.try_send(MeshMsg::WireGuardGateways(gateways.clone()));
        let all: Vec<NodePresence> = published.values().cloned().collect();
        let mut first = true;
        for chunk in all.chunks(MAX_PRESENCE_PER_FRAME) {
            let _ = tx.try_send(MeshMsg::Presence {
                reset: first,
                up: chunk.to_vec(),
                gone: Vec::new(),
            });
            first = false;
        }
        if first {
            let _ = tx.try_send(MeshMsg::Presence {
                reset: true,
                up: Vec::new(),
                gone: Vec::new(),
            });
        }
        overlay.with_subscriptions(|subs| {
            for (i, chunk) in subs
                .chunks(MAX_SUBSCRIPTIONS_PER_FRAME)
                .chain(subs.is_empty().then_some(&[][..]))
                .enumerate()
            {
                let _ = tx.try_send(MeshMsg::OverlaySubscriptions {
                    reset: i == 0,
                    up: chunk.to_vec(),
                    left: Vec::new(),
                });
            }
            lock(&self.links).insert(
                peer.to_owned(),
                LinkTx {
                    tx,
                    generation,
                    conn,
                },
            );
        });
        generation
    }

    fn unregister(&self, peer: &str, generation: u64) {
        let mut links = lock(&self.links);
        if links.get(peer).is_some_and(|l| l.generation == generation) {
            links.remove(peer);
        }
    }

    fn apply_presence(&self, peer: &str, reset: bool, up: Vec<NodePresence>, gone: Vec<NodeId>) {
        let mut remote = self.remote.write().unwrap_or_else(|p| p.into_inner());
        if reset {
            remote.retain(|_, r| r.controller != peer);
        }
        for n in gone {
            if remote.get(&n).is_some_and(|r| r.controller == peer) {
                remote.remove(&n);
            }
        }
        for p in up {
            remote.insert(
                p.node.clone(),
                RemoteNode {
                    controller: peer.to_owned(),
                    presence: p,
                },
            );
        }
    }

    fn forget_peer(&self, peer: &str) {
        lock(&self.remote_gateways).remove(peer);
        self.remote
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, r| r.controller != peer);
    }
}

/// Keeps a link to every other live member and publishes this controller's presence, until the
/// task is aborted.
pub(crate) async fn run(controller: Arc<Controller>, endpoint: quinn::Endpoint) {
    controller
        .overlay
        .set_mesh(Arc::new(OverlayPort(Arc::downgrade(&controller))));
    let client = match tls::mesh_client_config(controller.ca.cert_der()) {
        Ok(c) => c,
        Err(e) => {
            warn!(cause = %e, "no mesh: cannot build its TLS configuration");
            return;
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut publish_due = tokio::time::Instant::now();
    let mut wireguard_due = tokio::time::Instant::now();
    let mut live_ids: Vec<String> = Vec::new();
    loop {
        tick.tick().await;
        // The active WireGuard gateways depend on which controllers live (a dead one's gateways
        // are gone once its lease is); settled again when that changes, and now and then in case
        // a peer's news was lost with a link.
        let ids: Vec<String> = controller
            .cluster
            .members()
            .into_iter()
            .map(|m| m.id)
            .collect();
        if ids != live_ids || tokio::time::Instant::now() >= wireguard_due {
            live_ids = ids;
            wireguard_due = tokio::time::Instant::now() + Duration::from_secs(5);
            controller.wireguard_changed();
        }
        for m in controller.cluster.members() {
            if m.id == controller.cluster.id
                || m.agent_addr.ip().is_unspecified()
                || lock(&controller.mesh.links).contains_key(&m.id)
                || !lock(&controller.mesh.dialing).insert(m.id.clone())
            {
                continue;
            }
            tokio::spawn(dial(
                controller.clone(),
                endpoint.clone(),
                client.clone(),
                m.id,
                m.agent_addr,
            ));
        }
        if tokio::time::Instant::now() >= publish_due {
            publish_due = tokio::time::Instant::now() + Duration::from_secs(1);
            let now = controller.local_presence();
            controller.mesh.publish(now);
        }
    }
}

async fn dial(
    controller: Arc<Controller>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    peer: String,
    addr: SocketAddr,
) {
    let result = link(&controller, &endpoint, client, &peer, addr).await;
    lock(&controller.mesh.dialing).remove(&peer);
    match result {
        Ok(()) => debug!(peer = %peer, "mesh link closed"),
        Err(e) => debug!(peer = %peer, %addr, cause = %e, "mesh link failed; redialling"),
    }
}

async fn link(
    controller: &Arc<Controller>,
    endpoint: &quinn::Endpoint,
    client: quinn::ClientConfig,
    peer: &str,
    addr: SocketAddr,
) -> Result<(), String> {
    let connecting = endpoint
        .connect_with(client, addr, pki::CONTROLLER_SERVER_NAME)
        .map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let (mut send, _recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let hello = MeshMsg::Hello {
        version: MESH_VERSION,
        id: controller.cluster.id.clone(),
        proof: controller.mesh.secret,
    };
    framed::send_msg(&mut send, &hello)
        .await
        .map_err(|e| e.to_string())?;
    let (tx, mut rx) = mpsc::channel(LINK_QUEUE);
    let generation = controller
        .mesh
        .register(peer, tx, conn.clone(), &controller.overlay);
    lock(&controller.mesh.dialing).remove(peer);
    info!(peer = %peer, %addr, "mesh link up");
    let result = loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(msg) => {
                    if let Err(e) = framed::send_msg(&mut send, &msg).await {
                        break Err(e.to_string());
                    }
                }
                None => break Ok(()),
            },
            e = conn.closed() => break Err(e.to_string()),
        }
    };
    controller.mesh.unregister(peer, generation);
    conn.close(0u32.into(), b"mesh link done");
    info!(peer = %peer, "mesh link down");
    result
}

/// Serves a mesh connection a peer dialled: its Hello, then what it says, until it ends.
pub(crate) async fn serve(controller: Arc<Controller>, conn: quinn::Connection) {
    let remote_addr = conn.remote_address();
    let Ok(_pending) = controller.mesh.pending.clone().try_acquire_owned() else {
        conn.close(1u32.into(), b"too many mesh connections in progress");
        return;
    };
    let hello = async {
        let (_send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let mut reader = framed::FrameReader::new(recv);
        let hello: MeshMsg = reader
            .recv()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no hello")?;
        Ok::<_, String>((reader, hello))
    };
    let (mut reader, hello) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, hello).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            debug!(remote = %remote_addr, cause = %e, "mesh connection without a hello");
            return;
        }
        Err(_) => {
            conn.close(1u32.into(), b"no hello in time");
            return;
        }
    };
    let peer = match hello {
        MeshMsg::Hello { version, id, proof }
            if version == MESH_VERSION
                && crate::api::admin::digest_eq(&proof, &controller.mesh.secret)
                && id != controller.cluster.id
                && (1..=63).contains(&id.len()) =>
        {
            id
        }
        _ => {
            warn!(remote = %remote_addr, "mesh connection refused: wrong proof, version or id");
            conn.close(2u32.into(), b"refused");
            return;
        }
    };
    drop(_pending);
    let generation = controller.mesh.generation.fetch_add(1, Ordering::SeqCst) + 1;
    lock(&controller.mesh.accepted).insert(peer.clone(), generation);
    debug!(peer = %peer, remote = %remote_addr, "mesh peer accepted");
    // What the peer changed while it could not tell us is in the store. Read before its frames
    // are applied, so what they say is never older than the snapshot.
    let resync = tokio::task::spawn_blocking({
        let controller = controller.clone();
        move || controller.overlay.resync(&controller.store)
    })
    .await;
    if let Ok(Err(e)) = resync {
        warn!(peer = %peer, cause = %e, "overlay state not brought to the store's; the next mesh link retries");
    }
    // Relayed packets from the peer's agents to ours, beside its frames.
    let datagrams = tokio::spawn({
        let (controller, conn, peer) = (controller.clone(), conn.clone(), peer.clone());
        async move {
            while let Ok(d) = conn.read_datagram().await {
                match wire::parse_relay_datagram(&d) {
                    Some((to, from, packet)) => {
                        controller.overlay.relay_from_mesh(&peer, to, from, &packet)
                    }
                    None => {
                        debug!(peer = %peer, bytes = d.len(), "runt relay datagram on the mesh")
                    }
                }
            }
        }
    });
    loop {
        let msg: MeshMsg = match reader.recv().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            // A message this release does not know (a newer controller's, during a rolling
            // upgrade of the controllers): the frame was read whole, so the link goes on.
            Err(TransportError::Frame(
                e @ (FrameError::Malformed(_) | FrameError::TrailingBytes(_)),
            )) => {
                warn!(peer = %peer, cause = %e, "mesh message not understood; skipped");
                continue;
            }
            Err(e) => {
                debug!(peer = %peer, cause = %e, "mesh connection ended");
                break;
            }
        };
        match msg {
            MeshMsg::Hello { .. } => {}
            MeshMsg::Presence { reset, up, gone } => {
                controller.mesh.apply_presence(&peer, reset, up, gone)
            }
            MeshMsg::Deliver {
                node,
                min_protocol,
                msg,
            } => {
                if let Err(e) = controller.send_local(&node, msg, min_protocol) {
                    debug!(peer = %peer, node = %node, cause = %e, "forwarded message not delivered");
                }
            }
            MeshMsg::CertificateRevoked {
                node,
                serial,
                reason,
                current,
            } => {
                if controller.certificate_revoked(&node, &serial, &reason, current) {
                    info!(peer = %peer, node = %node, %serial, "revoked certificate's session ended");
                }
            }
            MeshMsg::NodeRemoved { node } => {
                controller.node_removed(&node);
                controller.overlay.forget(&node);
            }
            MeshMsg::OverlaySubscriptions { reset, up, left } => controller
                .overlay
                .remote_subscriptions(&peer, reset, up, left),
            MeshMsg::OverlayMembership(changes) => {
                let c = controller.clone();
                // Joins of nodes new here read their relay index from the store; awaited, so
                // changes apply in the order they were made.
                let _ = tokio::task::spawn_blocking(move || {
                    c.overlay.remote_membership_changed(&c.store, &changes);
                    // A member of a network with WireGuard devices changes its agents' maps.
                    c.wireguard_resync();
                })
                .await;
            }
            MeshMsg::OverlayKey { node, key } => controller.overlay.remote_key_changed(&node, key),
            MeshMsg::DrivePolicies { only } => {
                let c = controller.clone();
                tokio::task::spawn_blocking(move || c.push_drive_policies(only.as_deref()));
            }
            MeshMsg::WireGuardGateways(gateways) => {
                controller.mesh.apply_gateways(&peer, gateways);
                controller.wireguard_changed();
            }
            MeshMsg::WireGuardChanged => controller.wireguard_changed(),
            MeshMsg::RolloutNews => {
                let c = controller.clone();
                tokio::task::spawn_blocking(move || {
                    if c.cluster.as_leader(|| c.apply_rollout_inbox()).is_none() {
                        debug!("rollout news for a leader this controller no longer is");
                    }
                });
            }
        }
    }
    datagrams.abort();
    let mut accepted = lock(&controller.mesh.accepted);
    if accepted.get(&peer) == Some(&generation) {
        accepted.remove(&peer);
        drop(accepted);
        controller.mesh.forget_peer(&peer);
        info!(peer = %peer, "mesh peer gone: its nodes' presence dropped");
        // Its gateways are no longer known to be connected: another may have to take over.
        controller.wireguard_changed();
    }
}

/// The overlay hub's way to the other controllers ([`MeshPort`]). Holds the controller weakly: the
/// hub it is set on belongs to the controller.
#[derive(Debug)]
pub(crate) struct OverlayPort(pub(crate) std::sync::Weak<Controller>);

impl MeshPort for OverlayPort {
    fn broadcast(&self, news: OverlayNews) {
        let Some(c) = self.0.upgrade() else { return };
        match news {
            OverlayNews::Subscribed(sub) => c.mesh.broadcast(MeshMsg::OverlaySubscriptions {
                reset: false,
                up: vec![sub],
                left: Vec::new(),
            }),
            OverlayNews::Left(node) => c.mesh.broadcast(MeshMsg::OverlaySubscriptions {
                reset: false,
                up: Vec::new(),
                left: vec![node],
            }),
            OverlayNews::Membership(changes) => {
                for chunk in changes.chunks(MAX_MEMBERSHIP_CHANGES_PER_FRAME) {
                    c.mesh.broadcast(MeshMsg::OverlayMembership(chunk.to_vec()));
                }
            }
            OverlayNews::Key { node, key } => c.mesh.broadcast(MeshMsg::OverlayKey { node, key }),
        }
    }

    fn deliver(&self, controller: &str, node: &NodeId, msg: ControllerMsg) -> bool {
        let Some(c) = self.0.upgrade() else {
            return false;
        };
        c.mesh.send_to_peer(
            controller,
            MeshMsg::Deliver {
                node: node.clone(),
                // The node subscribed to the overlay: its agent understands punch requests.
                min_protocol: 0,
                msg,
            },
        )
    }

    fn relay(&self, controller: &str, to: PeerIndex, from: PeerIndex, packet: &[u8]) -> bool {
        self.0
            .upgrade()
            .is_some_and(|c| c.mesh.relay(controller, to, from, packet))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_relayed_packet_of_quics_minimum_size_crosses_a_new_mesh_link_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::registry::ca::Ca::load_or_create(dir.path()).unwrap();
        let (chain, key) = ca
            .issue_server_cert(&[pki::CONTROLLER_SERVER_NAME.to_owned()], &[])
            .unwrap();
        let server = quinn::Endpoint::server(
            tls::controller_server_config(ca.cert_der(), chain, key).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = client
            .connect_with(
                tls::mesh_client_config(ca.cert_der()).unwrap(),
                server.local_addr().unwrap(),
                pki::CONTROLLER_SERVER_NAME,
            )
            .unwrap();
        let (dialer, acceptor) =
            tokio::join!(connecting, async { server.accept().await.unwrap().await });
        let (dialer, acceptor) = (dialer.unwrap(), acceptor.unwrap());
        // Peers' handshake packets are QUIC's 1200-byte minimum: they must cross before path MTU
        // discovery has run.
        let packet = vec![7u8; 1200];
        dialer
            .send_datagram(wire::relay_datagram(PeerIndex(2), PeerIndex(1), &packet))
            .unwrap();
        let d = tokio::time::timeout(Duration::from_secs(5), acceptor.read_datagram())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            wire::parse_relay_datagram(&d),
            Some((PeerIndex(2), PeerIndex(1), packet.into()))
        );
    }

    /// Dials `ctl`'s mesh acceptor (run by hand on a bare endpoint) and says `hello`, then a
    /// presence naming `node`; what the acceptor did.
    async fn dial_with(
        ctl: Arc<Controller>,
        hello: MeshMsg,
        node: &NodeId,
    ) -> quinn::ConnectionError {
        let (chain, key) = ctl
            .ca
            .issue_server_cert(&[pki::CONTROLLER_SERVER_NAME.to_owned()], &[])
            .unwrap();
        let server = quinn::Endpoint::server(
            tls::controller_server_config(ctl.ca.cert_der(), chain, key).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = client
            .connect_with(
                tls::mesh_client_config(ctl.ca.cert_der()).unwrap(),
                server.local_addr().unwrap(),
                pki::CONTROLLER_SERVER_NAME,
            )
            .unwrap();
        let accepted = {
            let ctl = ctl.clone();
            tokio::spawn(async move {
                let conn = server.accept().await.unwrap().await.unwrap();
                serve(ctl, conn).await;
            })
        };
        let conn = connecting.await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        framed::send_msg(&mut send, &hello).await.unwrap();
        let presence = MeshMsg::Presence {
            reset: true,
            up: vec![NodePresence {
                node: node.clone(),
                protocol: Some(7),
                boot: None,
                update: None,
                live: true,
            }],
            gone: Vec::new(),
        };
        let _ = framed::send_msg(&mut send, &presence).await;
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            // A refused dialer is closed by the acceptor; an accepted one waits for its presence
            // to land, then ends the link itself.
            for _ in 0..50 {
                if ctl.mesh.remote(node).is_some() {
                    conn.close(0u32.into(), b"done");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            conn.closed().await
        })
        .await
        .unwrap();
        let _ = accepted.await;
        closed
    }

    fn controller(dir: &std::path::Path) -> Arc<Controller> {
        let config = crate::server::ControllerConfig::for_tests(dir.to_owned());
        Controller::open(config, "127.0.0.1:7441".parse().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_dialer_without_the_fleets_proof_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = controller(dir.path());
        let node = NodeId("n-intruder".into());
        // Another fleet's CA key gives another proof.
        let other = tempfile::tempdir().unwrap();
        let other_ca = crate::registry::ca::Ca::load_or_create(other.path()).unwrap();
        let hello = MeshMsg::Hello {
            version: MESH_VERSION,
            id: "intruder".into(),
            proof: other_ca.derive_secret(wire::PROOF_LABEL),
        };
        let closed = dial_with(ctl.clone(), hello, &node).await;
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.reason.as_ref() == b"refused"),
            "{closed:?}"
        );
        assert!(
            ctl.mesh.remote(&node).is_none(),
            "an intruder's presence was taken"
        );
        // A wrong version, or this controller's own id, is refused too.
        for hello in [
            MeshMsg::Hello {
                version: MESH_VERSION + 1,
                id: "peer".into(),
                proof: ctl.mesh.secret,
            },
            MeshMsg::Hello {
                version: MESH_VERSION,
                id: ctl.cluster.id.clone(),
                proof: ctl.mesh.secret,
            },
        ] {
            let closed = dial_with(ctl.clone(), hello, &node).await;
            assert!(
                matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.reason.as_ref() == b"refused"),
                "{closed:?}"
            );
            assert!(ctl.mesh.remote(&node).is_none());
        }
    }

    #[tokio::test]
    async fn a_peer_with_the_fleets_proof_is_heard_and_forgotten_when_its_link_ends() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = controller(dir.path());
        let node = NodeId("n-elsewhere".into());
        let hello = MeshMsg::Hello {
            version: MESH_VERSION,
            id: "peer-1".into(),
            proof: ctl.mesh.secret,
        };
        let closed = dial_with(ctl.clone(), hello, &node).await;
        assert!(
            matches!(closed, quinn::ConnectionError::LocallyClosed),
            "{closed:?}"
        );
        // Heard while the link lived (dial_with waited for it), dropped when it ended.
        for _ in 0..50 {
            if ctl.mesh.remote(&node).is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the ended peer's presence was kept");
    }
}
