//! (v7) The controller set this controller tells its agents: every live controller's agent
//! endpoint from the cluster, this one first, within the bounds an agent accepts.

use shoal_proto::{
    limits::{MAX_CONTROLLERS, MAX_CONTROLLER_ID_LEN},
    ControllerEndpoint, ControllerSet,
};
use tracing::warn;

use crate::{cluster::AgentEndpoint, server::Controller};

impl Controller {
    /// Replaces the set of agent endpoints this controller announces, as the cluster's membership
    /// watcher does: the seam in-process tests of agent failover use (one process, no etcd).
    #[doc(hidden)]
    pub fn announce_agent_endpoints(&self, endpoints: Vec<AgentEndpoint>) {
        self.cluster.set_agent_endpoints(endpoints);
    }
}

/// The set to announce for these endpoints; `None` when there is nothing to say (a controller on
/// its own): an empty set would only make agents forget controllers they may still need.
pub(crate) fn controller_set(endpoints: &[AgentEndpoint]) -> Option<ControllerSet> {
    let mut controllers = Vec::new();
    for e in endpoints {
        if e.id.len() > MAX_CONTROLLER_ID_LEN {
            warn!(controller = %e.addr, id_len = e.id.len(), "controller id too long to announce; left out");
            continue;
        }
        if controllers.len() == MAX_CONTROLLERS {
            warn!(
                announced = MAX_CONTROLLERS,
                known = endpoints.len(),
                "more controllers than an agent keeps; the rest left out"
            );
            break;
        }
        controllers.push(ControllerEndpoint {
            id: e.id.clone(),
            addr: e.addr,
        });
    }
    (!controllers.is_empty()).then_some(ControllerSet { controllers })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(id: &str, port: u16) -> AgentEndpoint {
        AgentEndpoint {
            id: id.into(),
            addr: ([192, 0, 2, 1], port).into(),
        }
    }

    #[test]
    fn a_lone_controller_announces_nothing_and_a_cluster_stays_within_the_bounds() {
        assert_eq!(controller_set(&[]), None);
        let many: Vec<_> = (0..40).map(|k| ep(&format!("c{k}"), 7000 + k)).collect();
        let set = controller_set(&many).expect("a set");
        assert_eq!(set.controllers.len(), MAX_CONTROLLERS);
        assert_eq!(set.controllers[0].id, "c0", "this controller stays first");
        assert_eq!(shoal_proto::limits::check_controller_set(&set), Ok(()));
        let long = [ep(&"x".repeat(MAX_CONTROLLER_ID_LEN + 1), 1), ep("ok", 2)];
        let set = controller_set(&long).expect("a set");
        assert_eq!(set.controllers.len(), 1);
        assert_eq!(set.controllers[0].id, "ok");
    }
}
