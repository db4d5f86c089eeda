//! Agent releases and updates, as the event log names them.

crate::event_kinds! {
    /// What agent releases and updates log.
    pub enum ReleaseEvent {
        /// An operator added a signed agent release.
        ReleaseAdded => "release_added",
        /// The controller offered an agent release to a node.
        AgentUpdateOffered => "agent_update_offered",
        /// A node runs the offered version and its health checks passed.
        AgentUpdateSucceeded => "agent_update_succeeded",
        /// A node refused or could not install an update and stays on its version (bad signature,
        /// truncated download, disk full...).
        AgentUpdateFailed => "agent_update_failed",
        /// A node's new version did not become healthy and the node went back to its previous
        /// binary.
        AgentUpdateRolledBack => "agent_update_rolled_back",
    }
}
