//! Several controllers, one fleet: the controllers that share one etcd cluster, which of them leads,
//! and the set of agent endpoints every controller tells its agents.
//!
//! With the embedded store there is one controller and it always leads; the set it tells agents is
//! empty (agents keep the `--controller` addresses they were given).

use std::net::SocketAddr;

use tokio::sync::watch;

/// A controller's QUIC endpoint for agents, as the cluster announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEndpoint {
    /// The controller's id (stable across restarts).
    pub id: String,
    /// Where agents reach it.
    pub addr: SocketAddr,
}

/// What this controller knows of the cluster it belongs to.
#[derive(Debug)]
pub(crate) struct Cluster {
    endpoints: watch::Sender<Vec<AgentEndpoint>>,
}

impl Cluster {
    /// A controller on its own (the embedded store).
    pub(crate) fn single() -> Cluster {
        Cluster {
            endpoints: watch::channel(Vec::new()).0,
        }
    }

    /// Every live controller's agent endpoint, this one's first; empty for a controller on its own.
    /// Changes as controllers join and leave.
    pub(crate) fn agent_endpoints(&self) -> watch::Receiver<Vec<AgentEndpoint>> {
        self.endpoints.subscribe()
    }

    /// Replaces the announced set (the membership watcher).
    #[allow(dead_code)] // used by the membership watcher, next
    pub(crate) fn set_agent_endpoints(&self, endpoints: Vec<AgentEndpoint>) {
        self.endpoints.send_if_modified(|current| {
            let changed = *current != endpoints;
            *current = endpoints;
            changed
        });
    }
}
