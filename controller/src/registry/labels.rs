//! What follows a change of a node's labels (an operator's `nodes label`, a re-enrolment that
//! merged a token's labels): every place that selects nodes by label sees the new labels at once.
//!
//! - overlay networks: the node's memberships are reconciled with the networks' selectors in the
//!   store, and the coordinator sends the netmap deltas to the agents concerned (and tells the
//!   other controllers over the mesh);
//! - drive policies: the node's agent gets its new effective policy if it changed, through
//!   whichever controller holds its session (the others are told over the mesh);
//! - budgets, windows, rollouts and backup jobs read labels from the store on every pass: their
//!   drivers are woken so the next pass is now.

use shoal_proto::NodeId;
use tracing::warn;

use crate::server::Controller;

/// Makes everything that selects by label follow `node`'s labels as stored now (blocking: store
/// work).
pub(crate) fn follow(controller: &Controller, node: &NodeId) {
    match controller.store.join_networks(node) {
        Ok(changes) => controller.membership_changed(changes),
        Err(e) => {
            warn!(node = %node, cause = %e, "the node's overlay memberships could not follow its labels")
        }
    }
    controller.drive_policies_changed(Some(std::slice::from_ref(node)));
    controller.maint.wake.notify_one();
    controller.backups.wake.notify_one();
}
