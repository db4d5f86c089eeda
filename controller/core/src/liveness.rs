//! Liveness from heartbeats, as a state machine with time passed in.
//!
//! A node is up while its heartbeats arrive; it is down once `missed` heartbeat intervals pass
//! without one. The shell feeds heartbeats and calls [`Liveness::poll`] on a timer; both return the
//! transitions to record.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use shoal_proto::NodeId;

/// A change of a node's liveness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// A heartbeat arrived from a node that was down or unknown.
    Up(NodeId),
    /// A node missed its heartbeats.
    Down(NodeId),
}

impl Transition {
    /// The node that changed.
    pub fn node(&self) -> &NodeId {
        match self {
            Transition::Up(id) | Transition::Down(id) => id,
        }
    }
}

#[derive(Debug)]
struct Entry {
    last_heartbeat: Instant,
    up: bool,
}

/// Tracks every node's liveness.
#[derive(Debug)]
pub struct Liveness {
    window: Duration,
    nodes: HashMap<NodeId, Entry>,
}

impl Liveness {
    /// A node goes down after `missed` intervals of `interval` without a heartbeat.
    pub fn new(interval: Duration, missed: u32) -> Self {
        Self {
            window: interval * missed.max(1),
            nodes: HashMap::new(),
        }
    }

    /// How long a node may stay silent before it is down.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Seeds a node the store says was up before a restart: it stays up for one window from `now`,
    /// so a restarted controller gives agents time to reconnect before declaring them down.
    pub fn assume_up(&mut self, node: NodeId, now: Instant) {
        self.nodes.insert(
            node,
            Entry {
                last_heartbeat: now,
                up: true,
            },
        );
    }

    /// Records a heartbeat.
    pub fn heartbeat(&mut self, node: &NodeId, now: Instant) -> Option<Transition> {
        match self.nodes.get_mut(node) {
            Some(e) => {
                e.last_heartbeat = now;
                (!std::mem::replace(&mut e.up, true)).then(|| Transition::Up(node.clone()))
            }
            None => {
                self.nodes.insert(
                    node.clone(),
                    Entry {
                        last_heartbeat: now,
                        up: true,
                    },
                );
                Some(Transition::Up(node.clone()))
            }
        }
    }

    /// Stops tracking a node (removed from the fleet).
    pub fn forget(&mut self, node: &NodeId) {
        self.nodes.remove(node);
    }

    /// Marks down every node whose heartbeats stopped more than a window ago.
    pub fn poll(&mut self, now: Instant) -> Vec<Transition> {
        let mut out = Vec::new();
        for (id, e) in &mut self.nodes {
            if e.up && now.saturating_duration_since(e.last_heartbeat) > self.window {
                e.up = false;
                out.push(Transition::Down(id.clone()));
            }
        }
        // Deterministic order for the event log (the map's order is not).
        out.sort_by(|a, b| a.node().cmp(b.node()));
        out
    }

    /// When the next node would go down, for the shell's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.nodes
            .values()
            .filter(|e| e.up)
            .map(|e| e.last_heartbeat + self.window)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId(s.into())
    }

    #[test]
    fn down_only_after_the_window_then_up_on_the_next_heartbeat() {
        let t0 = Instant::now();
        let sec = Duration::from_secs(1);
        let mut l = Liveness::new(Duration::from_secs(10), 3);
        assert_eq!(l.heartbeat(&id("a"), t0), Some(Transition::Up(id("a"))));
        assert_eq!(l.heartbeat(&id("a"), t0 + 10 * sec), None);
        assert_eq!(l.poll(t0 + 40 * sec), vec![]);
        assert_eq!(l.next_deadline(), Some(t0 + 40 * sec));
        assert_eq!(l.poll(t0 + 41 * sec), vec![Transition::Down(id("a"))]);
        assert_eq!(l.poll(t0 + 50 * sec), vec![], "down is reported once");
        assert_eq!(
            l.heartbeat(&id("a"), t0 + 51 * sec),
            Some(Transition::Up(id("a")))
        );
    }

    #[test]
    fn nodes_are_independent() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Duration::from_secs(1), 2);
        l.heartbeat(&id("a"), t0);
        l.heartbeat(&id("b"), t0 + Duration::from_millis(1500));
        assert_eq!(
            l.poll(t0 + Duration::from_millis(2500)),
            vec![Transition::Down(id("a"))]
        );
        assert_eq!(
            l.poll(t0 + Duration::from_millis(3600)),
            vec![Transition::Down(id("b"))]
        );
    }

    #[test]
    fn assumed_up_nodes_get_one_window_after_restart() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Duration::from_secs(1), 3);
        l.assume_up(id("a"), t0);
        assert_eq!(
            l.heartbeat(&id("a"), t0 + Duration::from_secs(1)),
            None,
            "still up: no event"
        );
        l.forget(&id("a"));
        assert_eq!(l.poll(t0 + Duration::from_secs(100)), vec![]);
    }
}
