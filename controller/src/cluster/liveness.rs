//! Node liveness when several controllers serve agents: each node's `up`/`down` is written by the
//! controller that holds its session, and the leader marks down the nodes whose controller died
//! with them.
//!
//! Each controller runs its own liveness (heartbeats arrive only where the session is). Without an
//! owner, a controller an agent left would mark it down after the heartbeat window even though the
//! agent is up on another controller. So an `up` transition records the controller in table
//! `node_sessions` (node id → controller id; one write per session, not per heartbeat), and a
//! controller writes `down` only for nodes whose session it holds. A node whose owner is no longer
//! a live member is an orphan: if it does not come back on another controller within the
//! heartbeat window, the leader writes it down.

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use shoal_controller_core::registry::NodeStatus;
use shoal_proto::NodeId;
use tracing::{info, warn};

use crate::{
    server::{now_ms, Controller},
    store::{EventKind, RegistryEvent, StoreError},
};

/// Table: node id → id of the controller holding its session.
pub(crate) const NODE_SESSIONS: &str = "node_sessions";

impl Controller {
    /// The controller holding `node`'s session, as recorded.
    pub(crate) fn session_owner(&self, node: &NodeId) -> Result<Option<String>, StoreError> {
        Ok(self
            .store
            .table(NODE_SESSIONS)
            .get(node.0.as_bytes())?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Records that this controller holds `node`'s session (clustered only).
    pub(crate) fn claim_session(&self, node: &NodeId) {
        if !self.cluster.is_clustered() {
            return;
        }
        if let Err(e) = self
            .store
            .table(NODE_SESSIONS)
            .insert(node.0.as_bytes(), self.cluster.id.as_bytes())
        {
            warn!(node = %node, cause = %e, "could not record which controller holds the session");
        }
    }

    /// Whether this controller may write `node` down: always on its own; clustered, only while it
    /// holds the node's session.
    pub(crate) fn may_write_down(&self, node: &NodeId) -> bool {
        if !self.cluster.is_clustered() {
            return true;
        }
        match self.session_owner(node) {
            Ok(owner) => owner.is_none_or(|o| o == self.cluster.id),
            Err(e) => {
                warn!(node = %node, cause = %e, "cannot tell which controller holds the session; not writing it down");
                false
            }
        }
    }
}

/// The leader's sweep for nodes whose controller died with them.
#[derive(Debug, Default)]
pub(crate) struct OrphanSweep {
    /// Orphans by when they were first seen as such.
    since: HashMap<NodeId, Instant>,
}

impl OrphanSweep {
    /// One pass (blocking; the leader's, fenced by the caller): one scan of `node_sessions`, and
    /// a node record read only for a node whose controller is gone.
    pub(crate) fn pass(&mut self, controller: &Controller, now: Instant) -> Result<(), StoreError> {
        let live: HashSet<String> = controller
            .cluster
            .members()
            .into_iter()
            .map(|m| m.id)
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        let window = controller.live().liveness.window();
        let mut orphans = HashSet::new();
        for entry in controller
            .store
            .table(NODE_SESSIONS)
            .scan(crate::store::Scan::all())
        {
            let (key, value) = entry?;
            let owner = String::from_utf8_lossy(&value).into_owned();
            if live.contains(&owner) {
                continue;
            }
            let node = NodeId(String::from_utf8_lossy(&key).into_owned());
            if controller.is_connected(&node) {
                continue;
            }
            orphans.insert(node.clone());
            let first = *self.since.entry(node.clone()).or_insert(now);
            if now.duration_since(first) < window {
                continue;
            }
            let was_up = controller
                .store
                .node(&node)?
                .is_some_and(|n| n.status == NodeStatus::Up);
            let updated = controller.store.update_node(&node, |n| {
                n.status = NodeStatus::Down;
            })?;
            // Settled: its record no longer names a live session anywhere.
            controller
                .store
                .table(NODE_SESSIONS)
                .remove(key.as_slice())?;
            if let (Some(n), true) = (updated, was_up) {
                let msg = format!(
                    "{} is down: its controller {owner} is gone and it did not come back on another within {window:?}",
                    n.hostname
                );
                info!(node = %node, controller = %owner, "orphaned node written down");
                controller.store.append_event(
                    EventKind::Registry(RegistryEvent::Down),
                    Some(&node),
                    &msg,
                    now_ms(),
                )?;
            }
            self.since.remove(&node);
        }
        self.since.retain(|n, _| orphans.contains(n));
        Ok(())
    }
}
