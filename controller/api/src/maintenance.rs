//! Maintenance windows, disruption budgets and rollouts (`/v1/windows`, `/v1/budgets`,
//! `/v1/rollouts…`). Built from the planner's accessors, never its stored form.

use serde::{Deserialize, Serialize};

/// `POST /v1/windows`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateWindow {
    /// Name, `[a-z0-9][a-z0-9-]{0,30}`.
    pub name: String,
    /// Five-field cron schedule.
    pub schedule: String,
    /// How long each opening lasts, in seconds (60 to 604800).
    pub duration_secs: u64,
    /// IANA time zone (default UTC).
    pub tz: Option<String>,
    /// A label selector: the nodes the window is for.
    pub selector: Option<String>,
}

/// A window as `window list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WindowView {
    /// Name.
    pub name: String,
    /// Cron schedule.
    pub schedule: String,
    /// Duration in seconds.
    pub duration_secs: u64,
    /// Time zone.
    pub tz: String,
    /// Selector, canonical text.
    pub selector: Option<String>,
    /// Open now (as the rollout driver's clock says).
    pub open: bool,
    /// The current opening's start, or the next one's (RFC 3339).
    pub opens_at: Option<String>,
    /// When that open period ends (RFC 3339).
    pub closes_at: Option<String>,
}

/// `POST /v1/budgets`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetBudget {
    /// A label selector (`role=db,zone in (a,b)`).
    pub selector: String,
    /// The most of the group unavailable at once (at least 1).
    pub max_unavailable: u32,
}

/// A disruption budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BudgetView {
    /// A label selector (`role=db,zone in (a,b)`).
    pub selector: String,
    /// The most of the group unavailable at once.
    pub max_unavailable: u32,
    /// How many of the group's nodes are in the fleet now.
    pub nodes: usize,
}

/// `POST /v1/rollouts`. Exactly one of `agent`, `image` and `action`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StartRollout {
    /// Agent release version (exactly one of `agent` and `image`).
    pub agent: Option<String>,
    /// Netboot image version.
    pub image: Option<String>,
    /// A maintenance action (`shoalctl maintenance run`): `"reboot"`, `"smart_test"` or `{"exec":
    /// {"argv": ["/usr/local/bin/x", "arg"]}}`. Exactly one of `agent`, `image`, `action`.
    #[serde(default)]
    pub action: Option<shoal_proto::MaintenanceAction>,
    /// A label selector; every node without one.
    pub selector: Option<String>,
    /// N (default 1).
    pub max_unavailable: Option<u32>,
    /// K (default 1).
    pub max_failures: Option<u32>,
    /// The window to run in; at once without one.
    pub window: Option<String>,
    /// Per-node deadline in seconds (default 900).
    pub deadline_secs: Option<u64>,
    /// Agent rollouts: allow nodes to go to an older version than they run (default false; v5
    /// agents refuse a downgrade without it).
    #[serde(default)]
    pub allow_downgrade: bool,
}

/// `POST /v1/rollouts/{id}/retry`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetryNode {
    /// The node to try again.
    pub node: String,
}

/// One node of a rollout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutNodeView {
    /// Node id.
    pub node: String,
    /// Hostname, if the node is still in the fleet.
    pub hostname: Option<String>,
    /// `pending`, `upgrading`, `succeeded`, `rolling_back`, `failed`, `skipped`.
    pub phase: String,
    /// Since when (RFC 3339), for phases that have a time.
    pub since: Option<String>,
    /// Deadline of a node in flight (RFC 3339).
    pub deadline: Option<String>,
    /// Failure, skip reason, or `already` / roll-back detail.
    pub detail: Option<String>,
    /// Maintenance runs: the node's sub-phase (`cordoning`, `in-maintenance`, `rebooting`,
    /// `uncordoning`, `up`), from the action executor.
    #[serde(default)]
    pub step: Option<String>,
    /// Maintenance runs: the last step's output or error (at most a few KiB).
    #[serde(default)]
    pub output: Option<String>,
}

/// A rollout as `upgrade status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutView {
    /// Id (`r1`, …).
    pub id: String,
    /// `agent 1.2.0` / `image 2026.11.1`.
    pub target: String,
    /// `running`, `paused`, `aborted`, `done`.
    pub state: String,
    /// Why paused.
    pub reason: Option<String>,
    /// Nothing more will happen.
    pub finished: bool,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Selector the nodes were chosen with.
    pub selector: Option<String>,
    /// Window name.
    pub window: Option<String>,
    /// N.
    pub max_unavailable: u32,
    /// K.
    pub max_failures: u32,
    /// Agent rollouts: nodes may go to an older version (`--allow-downgrade`).
    #[serde(default)]
    pub allow_downgrade: bool,
    /// Counts.
    pub progress: Progress,
    /// Why nothing more started at the last poll, one line each.
    pub waiting: Vec<String>,
    /// Every node.
    pub nodes: Vec<RolloutNodeView>,
}

/// Counts for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Nodes in the rollout.
    pub total: u32,
    /// Not started.
    pub pending: u32,
    /// Upgrading or rolling back.
    pub in_flight: u32,
    /// On the target.
    pub succeeded: u32,
    /// Failed.
    pub failed: u32,
    /// Skipped.
    pub skipped: u32,
}
