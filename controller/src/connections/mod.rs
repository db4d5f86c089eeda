//! The agents' connections: the live state of every connected node ([`LiveState`], [`ConnHandle`]),
//! the registry other domains reach a node through ([`Controller::send_to`]), the bounded queue
//! behind it ([`queue`]), and the task that serves one connection ([`handler`]).

use crate::server::Controller;
use std::{collections::HashMap, net::IpAddr, sync::Arc};

use shoal_proto::{ControllerMsg, HealthReport, NodeId, UnixMillis};
use tokio::sync::mpsc;

use shoal_controller_core::liveness::Liveness;

pub mod queue;

/// QUIC application close codes.
pub mod close_code {
    /// Normal end (enrolment finished, shutdown).
    pub const DONE: u32 = 0;
    /// The agent broke the protocol (bad frame, wrong order) or its request was refused.
    pub const PROTOCOL: u32 = 1;
    /// The node was removed or its certificate is not accepted.
    pub const REVOKED: u32 = 2;
    /// A newer connection from the same node replaced this one.
    pub const REPLACED: u32 = 3;
    /// The controller is at a connection limit, or this connection did not read what it was sent;
    /// retry later.
    pub const BUSY: u32 = 4;
}

pub use shoal_api::refusals::ConnCounters;

#[derive(Debug, Default)]
pub(crate) struct ConnStats {
    pub(crate) retried: std::sync::atomic::AtomicU64,
    pub(crate) handshakes_refused: std::sync::atomic::AtomicU64,
    pub(crate) unauthenticated_refused: std::sync::atomic::AtomicU64,
    pub(crate) enrolment_timeouts: std::sync::atomic::AtomicU64,
    pub(crate) slow_consumers: std::sync::atomic::AtomicU64,
}

pub(crate) fn bump(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

impl ConnStats {
    pub(crate) fn snapshot(&self) -> ConnCounters {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        ConnCounters {
            retried: get(&self.retried),
            handshakes_refused: get(&self.handshakes_refused),
            unauthenticated_refused: get(&self.unauthenticated_refused),
            enrolment_timeouts: get(&self.enrolment_timeouts),
            slow_consumers: get(&self.slow_consumers),
        }
    }
}

/// One unauthenticated connection's share of its address's allowance; given back on drop. The map
/// holds only addresses with connections open, so it is bounded by the overall cap.
pub(crate) struct PerAddressSlot {
    controller: Arc<Controller>,
    ip: IpAddr,
}

impl PerAddressSlot {
    pub(crate) fn take(
        controller: &Arc<Controller>,
        ip: IpAddr,
        max: usize,
    ) -> Option<PerAddressSlot> {
        let mut counts = controller
            .unauthenticated_by_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PerAddressSlot {
            controller: controller.clone(),
            ip,
        })
    }
}

impl Drop for PerAddressSlot {
    fn drop(&mut self) {
        let mut counts = self
            .controller
            .unauthenticated_by_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// What the controller holds in memory about a node between checkpoints.
#[derive(Debug, Default, Clone)]
pub(crate) struct LiveNode {
    pub last_seen: Option<UnixMillis>,
    pub health: Option<HealthReport>,
    pub dirty: bool,
}

/// Why another task ends a node's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Revoke {
    /// A newer connection that proved the node's key replaced this one.
    Replaced,
    /// The node was removed from the fleet (the agent forgets its certificate and stops).
    Removed(String),
    /// The certificate this connection presented is no longer accepted (its serial was revoked).
    CertificateRefused(String),
}

/// A node's open control connection, as other tasks (the API, other connections) reach it.
#[derive(Debug)]
pub(crate) struct ConnHandle {
    pub conn_id: u64,
    /// Ends the connection.
    pub revoke: mpsc::UnboundedSender<Revoke>,
    /// The serial of the certificate the connection presented (normalised hex).
    pub serial: String,
    /// The agent acknowledged a reboot: the session is ending, so it no longer holds the node's
    /// identity against the node's own re-enrolment after the reboot.
    pub leaving: bool,
    /// Queues a message to the agent; the connection's task sends it in order.
    pub tx: crate::connections::queue::NodeTx,
    /// The negotiated protocol version, once the agent's Hello was accepted. Nothing newer than it
    /// is ever queued: v1/v2 agents get no v3 messages.
    pub protocol: Option<u16>,
    /// The drive policy last sent on this connection (v3).
    pub drive_policy: Option<shoal_proto::DrivePolicy>,
    /// The agent's latest boot report on this connection (v4): what it booted and its health
    /// checks. Kept with the connection, so it is always about the boot that is connected now.
    pub boot: Option<shoal_proto::BootReport>,
}

#[derive(Debug)]
pub(crate) struct LiveState {
    pub liveness: Liveness,
    pub nodes: HashMap<NodeId, LiveNode>,
    pub(crate) conns: HashMap<NodeId, ConnHandle>,
    pub(crate) next_conn_id: u64,
}

/// Why a message did not reach a node's connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The node has no open control connection (or it closed while the message was queued).
    #[error("node {0} is not connected")]
    NotConnected(NodeId),
    /// The node's agent speaks an older protocol than the message needs: it would not understand it.
    #[error("node {node} speaks protocol {protocol}; this message needs {needs}")]
    TooOld {
        /// The node.
        node: NodeId,
        /// The protocol its session negotiated.
        protocol: u16,
        /// The protocol the message needs.
        needs: u16,
    },
}

impl Controller {
    /// Queues `msg` on `node`'s open control connection when its agent speaks at least
    /// `min_protocol`: the one way every domain reaches a node. Nothing newer than a session's
    /// protocol is ever queued on it. A node whose session another controller of the cluster
    /// holds gets it through that controller (the mesh).
    pub(crate) fn send_to(
        &self,
        node: &NodeId,
        msg: ControllerMsg,
        min_protocol: u16,
    ) -> Result<(), SendError> {
        if !self.cluster.is_clustered() || self.live().conns.contains_key(node) {
            return self.send_local(node, msg, min_protocol);
        }
        self.mesh.forward(node, msg, min_protocol)
    }

    /// [`Controller::send_to`] for a session this controller holds.
    pub(crate) fn send_local(
        &self,
        node: &NodeId,
        msg: ControllerMsg,
        min_protocol: u16,
    ) -> Result<(), SendError> {
        let live = self.live();
        let conn = live
            .conns
            .get(node)
            .ok_or_else(|| SendError::NotConnected(node.clone()))?;
        let protocol = conn.protocol.unwrap_or(0);
        if protocol < min_protocol {
            return Err(SendError::TooOld {
                node: node.clone(),
                protocol,
                needs: min_protocol,
            });
        }
        conn.tx
            .send(msg)
            .map_err(|_| SendError::NotConnected(node.clone()))
    }

    pub(crate) fn live(&self) -> std::sync::MutexGuard<'_, LiveState> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // more than losing the controller: recover the guard.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a node currently has an open control connection, here or on another controller.
    pub(crate) fn is_connected(&self, id: &NodeId) -> bool {
        self.is_connected_with(&self.live(), id)
    }

    /// [`Self::is_connected`] for a caller that holds the live state already (one lock for a
    /// whole fleet's worth of questions).
    pub(crate) fn is_connected_with(&self, live: &LiveState, id: &NodeId) -> bool {
        live.conns.contains_key(id) || self.mesh.remote(id).is_some()
    }

    /// The protocol of `node`'s session — here, or on another controller of the cluster — once its
    /// Hello was accepted (`Some(0)` before); `None` when it is not connected.
    pub(crate) fn session_protocol(&self, node: &NodeId) -> Option<u16> {
        if let Some(c) = self.live().conns.get(node) {
            return Some(c.protocol.unwrap_or(0));
        }
        self.mesh
            .remote(node)
            .map(|r| r.presence.protocol.unwrap_or(0))
    }

    /// The nodes connected here, as the mesh tells other controllers.
    pub(crate) fn local_presence(
        &self,
    ) -> HashMap<NodeId, crate::cluster::mesh::wire::NodePresence> {
        let updates: HashMap<NodeId, _> = self.agent_updates().into_iter().collect();
        // Whether the node was heard from within two heartbeats: another controller must not refuse
        // the node's re-enrolment (after a crash) for a session that is dead but not yet timed out
        // here.
        let recent = self.config.heartbeat_interval.as_millis() as u64 * 2;
        let now = crate::server::now_ms().0;
        let live = self.live();
        live.conns
            .iter()
            .map(|(node, c)| {
                let live_now = !c.leaving
                    && live
                        .nodes
                        .get(node)
                        .and_then(|l| l.last_seen)
                        .is_some_and(|t| now.saturating_sub(t.0) <= recent);
                (
                    node.clone(),
                    crate::cluster::mesh::wire::NodePresence {
                        node: node.clone(),
                        protocol: c.protocol,
                        boot: c.boot.clone(),
                        update: updates.get(node).and_then(|u| u.report.clone()),
                        live: live_now,
                    },
                )
            })
            .collect()
    }

    /// Every connected node — here, or on another controller of the cluster — with its session's
    /// protocol and latest reports.
    pub(crate) fn presence(&self) -> HashMap<NodeId, crate::cluster::mesh::wire::NodePresence> {
        let mut all: HashMap<_, _> = self
            .mesh
            .remote_all()
            .into_iter()
            .map(|(n, r)| (n, r.presence))
            .collect();
        all.extend(self.local_presence());
        all
    }
}

#[cfg(test)]
impl Controller {
    /// Registers a connection without QUIC, as a v`protocol` agent after its Hello; returns its id
    /// and the queue of what the controller sends it.
    pub(crate) fn fake_connection(
        &self,
        node: &NodeId,
        protocol: u16,
    ) -> (u64, crate::connections::queue::NodeRx) {
        let (tx, rx) =
            crate::connections::queue::node_queue(crate::connections::queue::NODE_QUEUE_CAPACITY);
        let (revoke, _) = mpsc::unbounded_channel();
        let mut live = self.live();
        live.next_conn_id += 1;
        let conn_id = live.next_conn_id;
        live.conns.insert(
            node.clone(),
            ConnHandle {
                conn_id,
                revoke,
                tx,
                serial: String::new(),
                leaving: false,
                protocol: Some(protocol),
                drive_policy: None,
                boot: None,
            },
        );
        (conn_id, rx)
    }

    /// Ends a connection registered by [`Controller::fake_connection`] the way a real one ends.
    pub(crate) fn end_fake_connection(&self, node: &NodeId, conn_id: u64) {
        forget_connection(self, node, conn_id);
        self.drives.connection_closed(node, conn_id);
    }
}

/// Drops a node's connection handle, unless a newer connection has replaced it.
pub(crate) fn forget_connection(controller: &Controller, id: &NodeId, conn_id: u64) {
    let mut live = controller.live();
    if live.conns.get(id).map(|c| c.conn_id) == Some(conn_id) {
        live.conns.remove(id);
    }
}

/// What a connection's actions need besides the session.
pub(crate) struct ConnCtx {
    pub(crate) conn: quinn::Connection,
    pub(crate) conn_id: u64,
    /// SHA-256 of the node certificate's public key.
    pub(crate) node_key: Option<[u8; 32]>,
    /// The node certificate the connection presented (DER): its key signs key rotations.
    pub(crate) cert_der: Option<Vec<u8>>,
    /// A certificate of the node's key was revoked: ask the agent to rotate once its Hello is in.
    pub(crate) must_rotate: bool,
    /// The peer's address, for the operator.
    pub(crate) remote: String,
    /// Netmap deltas, punch requests, drive policies and drive commands for this agent, queued by
    /// other connections and the API.
    pub(crate) overlay_tx: crate::connections::queue::NodeTx,
    /// The task relaying this agent's datagrams, once it joined the overlay.
    pub(crate) relay: Option<tokio::task::JoinHandle<()>>,
}
