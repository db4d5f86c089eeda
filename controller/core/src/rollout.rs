//! The rollout planner: which node to upgrade next, when to roll one back, when to stop.
//!
//! A sans-IO state machine in the quinn-proto style. The shell (not built yet) feeds it what
//! happened ([`Rollout::handle`]: a node acknowledged, reported its version and health, refused;
//! the operator paused, resumed, aborted, retried a node) and, on a timer and whenever observations
//! change, asks it what to do ([`Rollout::poll`], given the fleet as observed, the disruption
//! budgets, the window and the time). Both return [`Action`]s for the shell to carry out. Time is
//! wall-clock [`UnixMillis`], so the whole state ([`Rollout`] is serde) can be stored and a
//! restarted controller resumes exactly where it stopped: deadlines keep running while the
//! controller is down.
//!
//! The planner does not know whether it upgrades agents or netboot images: the [`Target`] is
//! carried through to the actions, and [`Observed::version`] is whichever version the target is
//! about.
//!
//! # Node states
//!
//! `pending` → `upgrading` → `succeeded`, or on a failure `upgrading` → `rolling_back` → `failed`.
//! A node that refuses an update (bad signature, disk full: it stays on its version) goes straight
//! to `failed` with nothing to roll back. A node already on the target is `succeeded` at once; one
//! on which this target failed before, or that left the fleet, is `skipped`. [`Command::Retry`]
//! puts a failed or skipped node back to `pending`.
//!
//! # Invariants (unit-tested, including random fleets)
//!
//! - **Max unavailable**: a node is started only if, counting it, at most `max_unavailable` of the
//!   rollout's nodes are unavailable. Unavailable means down, unhealthy, busy with other
//!   maintenance, or in flight in this rollout (`upgrading`, `rolling_back`). Nodes already down
//!   for other reasons count, so they can hold the rollout back; they are never "made up for" by
//!   exceeding the limit.
//! - **Budgets**: likewise for every disruption budget whose selector matches the node, counted
//!   over the *whole fleet's* nodes in that label group (an etcd member down outside the rollout
//!   counts against `role=etcd max 1`).
//! - **Window**: no node is started while the window is closed, or when it closes within
//!   [`RolloutSpec::min_window_left`]. Nodes in flight finish (or roll back) after it closes.
//! - **Failures**: every failure of a node that changed (checks failed, never came back) rolls that
//!   node back at once. When failures since the last start or resume reach `max_failures`, the
//!   rollout pauses; nodes in flight finish, no new node starts until [`Command::Resume`].
//! - **Memory**: a node on which the target failed is not started again without [`Command::Retry`];
//!   nodes listed as `failed_before` at creation (from earlier rollouts) are skipped likewise.
//! - **Restart**: the state round-trips through serde; [`Rollout::resend_after_restart`] repeats
//!   the commands a crash may have lost (both are idempotent at the node).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use shoal_proto::{MaintenanceAction, NodeId, UnixMillis};
use tracing::{info, warn};

use crate::windows::{add, WindowCheck};

/// A label selector, as networks keep them (stored in the compatible form of
/// [`crate::selector`]: rollouts and budgets of the old `(key, value)` form read unchanged).
pub use crate::selector::Selector;

/// What a rollout installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// An agent release version (`shoalctl release add`).
    Agent(String),
    /// A netboot image version.
    Image(String),
    /// A maintenance action (`shoalctl maintenance run`): nothing is installed; a node succeeds
    /// when it is back up and healthy after the action, and "rolling back" means running its
    /// post-hook so it is not left drained. Its failures are not remembered across runs (see
    /// [`Target::remembers_failures`]).
    Action(MaintenanceAction),
}

impl Target {
    /// The version installed; for an action, its name (`reboot`, `smart-test`, `exec`), which no
    /// node ever reports as its version, so a node never counts as "already done".
    pub fn version(&self) -> &str {
        match self {
            Target::Agent(v) | Target::Image(v) => v,
            Target::Action(a) => a.name(),
        }
    }

    /// Whether a failure of this target on a node is remembered (and the node skipped by later
    /// rollouts of the same target until retried). True for versions: a version that failed on a
    /// node will fail again. False for actions: a maintenance action that failed once (a drain that
    /// timed out, a script that hit a busy disk) is exactly what the operator runs again later.
    pub fn remembers_failures(&self) -> bool {
        !matches!(self, Target::Action(_))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Agent(v) => write!(f, "agent {v}"),
            Target::Image(v) => write!(f, "image {v}"),
            Target::Action(a) => write!(f, "action {a}"),
        }
    }
}

/// A disruption budget: at most `max_unavailable` nodes of a label group unavailable at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// The group.
    pub selector: Selector,
    /// The most of the group that may be unavailable at once.
    pub max_unavailable: u32,
}

/// How a rollout runs; fixed at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// What to install.
    pub target: Target,
    /// The selector the nodes were chosen with, for display (the node set is fixed at start).
    pub selector: Option<Selector>,
    /// N: the most of the rollout's nodes unavailable at once. At least 1.
    pub max_unavailable: u32,
    /// K: failures (since start or the last resume) that pause the rollout. At least 1.
    pub max_failures: u32,
    /// The window's name, for display; `None` runs at once (`--now`). The shell resolves it.
    pub window: Option<String>,
    /// How long a node has, from the begin command, to report the target version healthy.
    /// Default 15 min (an agent update takes seconds; a reboot into a new image, minutes).
    pub upgrade_deadline: Duration,
    /// How long a node being rolled back has to report the previous version healthy. Default 15
    /// min.
    pub rollback_deadline: Duration,
    /// A node is started only if the window stays open at least this long. Default 0 (start
    /// whenever open).
    pub min_window_left: Duration,
}

impl RolloutSpec {
    /// A spec with the documented defaults: one node at a time, pause at the first failure, no
    /// window.
    pub fn new(target: Target) -> RolloutSpec {
        RolloutSpec {
            target,
            selector: None,
            max_unavailable: 1,
            max_failures: 1,
            window: None,
            upgrade_deadline: Duration::from_secs(15 * 60),
            rollback_deadline: Duration::from_secs(15 * 60),
            min_window_left: Duration::ZERO,
        }
    }
}

/// One node as the controller observes it now, for [`Rollout::poll`]. Built fresh by the shell from
/// the store, liveness and reports; never stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    /// The node's labels.
    pub labels: BTreeMap<String, String>,
    /// Connected and heartbeating.
    pub up: bool,
    /// Its health checks pass.
    pub healthy: bool,
    /// The version the rollout's target is about (agent or image), as last reported.
    pub version: Option<String>,
    /// In maintenance or in another rollout: unavailable, and not to be started by this one.
    pub busy: bool,
}

impl Observed {
    fn available(&self) -> bool {
        self.up && self.healthy && !self.busy
    }
}

/// The whole fleet as observed, by node id.
pub type Fleet = BTreeMap<NodeId, Observed>;

/// Why a node's upgrade failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Failure {
    /// The node did not take the update and stayed on its version (bad signature, truncated
    /// download, disk full, or the agent's own health deadline rolled it back); the node's words.
    Refused {
        /// What the node said.
        reason: String,
    },
    /// The node runs the target version but these health checks failed.
    ChecksFailed {
        /// The failed checks' names.
        checks: Vec<String>,
    },
    /// No healthy report on the target version before the deadline (e.g. it never came back).
    Deadline,
    /// The node carried out (part of) the work and it failed, e.g. a maintenance action exited
    /// non-zero; it is rolled back.
    Failed {
        /// The node's words.
        reason: String,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused { reason } => write!(f, "refused: {reason}"),
            Failure::ChecksFailed { checks } => {
                write!(f, "health checks failed: {}", checks.join(", "))
            }
            Failure::Deadline => {
                f.write_str("not healthy on the target version before the deadline")
            }
            Failure::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

/// Why a node is not part of the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// This target failed on the node before; [`Command::Retry`] to try again.
    FailedBefore,
    /// The node left the fleet.
    Removed,
}

/// Where one node is in the rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodePhase {
    /// Not started.
    Pending,
    /// Told to upgrade; unavailable until it reports the target version healthy.
    Upgrading {
        /// When the begin command was issued.
        since: UnixMillis,
        /// When it fails if not healthy on the target.
        deadline: UnixMillis,
        /// Its version before, to roll back to.
        from: Option<String>,
        /// The node confirmed it got the command.
        acknowledged: bool,
    },
    /// On the target version and healthy.
    Succeeded {
        /// When.
        at: UnixMillis,
        /// It was on the target before the rollout touched it.
        already: bool,
    },
    /// Failed; being put back on its previous version.
    RollingBack {
        /// When the roll-back was issued.
        since: UnixMillis,
        /// When it is given up on.
        deadline: UnixMillis,
        /// The version it goes back to.
        to: Option<String>,
        /// Why it failed.
        failure: Failure,
    },
    /// Failed. `rolled_back`: back and healthy on its previous version (or never left it);
    /// otherwise it did not come back and needs an operator.
    Failed {
        /// When it was settled.
        at: UnixMillis,
        /// Why it failed.
        failure: Failure,
        /// Whether it is back on its previous version.
        rolled_back: bool,
    },
    /// Not part of the work.
    Skipped {
        /// Why.
        reason: SkipReason,
    },
}

impl NodePhase {
    /// Upgrading or rolling back: unavailable because of this rollout.
    pub fn in_flight(&self) -> bool {
        matches!(
            self,
            NodePhase::Upgrading { .. } | NodePhase::RollingBack { .. }
        )
    }

    /// Nothing more will happen to it (without a retry).
    pub fn settled(&self) -> bool {
        matches!(
            self,
            NodePhase::Succeeded { .. } | NodePhase::Failed { .. } | NodePhase::Skipped { .. }
        )
    }

    /// `pending`, `upgrading`, …, for status output.
    pub fn as_str(&self) -> &'static str {
        match self {
            NodePhase::Pending => "pending",
            NodePhase::Upgrading { .. } => "upgrading",
            NodePhase::Succeeded { .. } => "succeeded",
            NodePhase::RollingBack { .. } => "rolling_back",
            NodePhase::Failed { .. } => "failed",
            NodePhase::Skipped { .. } => "skipped",
        }
    }
}

/// Why a rollout paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseReason {
    /// `upgrade pause`.
    Operator,
    /// `max_failures` nodes failed since the start or the last resume.
    TooManyFailures {
        /// The failed nodes, with why.
        failed: Vec<(NodeId, Failure)>,
    },
}

impl fmt::Display for PauseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PauseReason::Operator => f.write_str("paused by an operator"),
            PauseReason::TooManyFailures { failed } => {
                write!(f, "{} node(s) failed: ", failed.len())?;
                let parts: Vec<String> = failed
                    .iter()
                    .map(|(n, why)| format!("{n} ({why})"))
                    .collect();
                f.write_str(&parts.join("; "))
            }
        }
    }
}

/// The rollout as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Starting nodes as limits allow.
    Running,
    /// Starting nothing until resumed; nodes in flight finish.
    Paused {
        /// Since when.
        at: UnixMillis,
        /// Why.
        reason: PauseReason,
    },
    /// Stopped for good; nodes in flight finish.
    Aborted {
        /// When.
        at: UnixMillis,
    },
    /// Every node settled while running.
    Done {
        /// When.
        at: UnixMillis,
    },
}

impl RolloutState {
    /// `running`, `paused`, `aborted` or `done`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused { .. } => "paused",
            RolloutState::Aborted { .. } => "aborted",
            RolloutState::Done { .. } => "done",
        }
    }
}

/// Why the last [`Rollout::poll`] started no (more) nodes, for `upgrade status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Waiting {
    /// The window is closed.
    WindowClosed,
    /// The window closes before [`RolloutSpec::min_window_left`] would pass.
    WindowClosing {
        /// When it closes.
        closes_at: UnixMillis,
    },
    /// N of the rollout's nodes are unavailable.
    MaxUnavailable {
        /// How many are.
        unavailable: u32,
    },
    /// A budget's group has no room.
    Budget {
        /// The budget's selector, canonical text.
        selector: String,
        /// How many of the group are unavailable.
        unavailable: u32,
        /// The budget.
        max: u32,
    },
    /// Pending nodes are down, unhealthy or busy, so they cannot be started.
    NodesUnavailable {
        /// Which.
        nodes: Vec<NodeId>,
    },
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Start upgrading a node (agent: send the signed release; image: assign it and reboot).
    BeginUpgrade {
        /// The node.
        node: NodeId,
        /// What to install.
        target: Target,
    },
    /// Put a node back on its previous version (agent: tell it to revert if it is reachable, it
    /// also does so by itself; image: restore the previous assignment and reboot).
    RollBack {
        /// The node.
        node: NodeId,
        /// The version to go back to, if known.
        to: Option<String>,
        /// What failed.
        target: Target,
    },
    /// The rollout paused (record an event, tell the operator).
    Paused {
        /// Why.
        reason: PauseReason,
    },
    /// Every node settled.
    Done {
        /// Nodes on the target now.
        succeeded: u32,
        /// Nodes that failed.
        failed: u32,
        /// Nodes skipped.
        skipped: u32,
    },
}

/// A node's health in a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportedHealth {
    /// All checks passed.
    Healthy,
    /// Checks still running.
    Checking,
    /// These checks failed.
    Failed(Vec<String>),
}

/// Something that happened, for [`Rollout::handle`]. Serializable: a controller that is not the
/// leader forwards the news its agents bring to the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The node confirmed it received the begin command and is working on it.
    Acknowledged {
        /// The node.
        node: NodeId,
    },
    /// The node reported the version it runs and its health (after an update, a re-exec or a boot).
    Reported {
        /// The node.
        node: NodeId,
        /// The version it runs.
        version: String,
        /// Its health.
        health: ReportedHealth,
    },
    /// The node could not take the update and stays on its version.
    Refused {
        /// The node.
        node: NodeId,
        /// What it said.
        reason: String,
    },
    /// The node started the work and it failed (it may have changed): roll it back.
    Failed {
        /// The node.
        node: NodeId,
        /// What it said.
        reason: String,
    },
    /// A node being rolled back is back as it was (for actions: its post-hook ran); it is settled
    /// as failed and rolled back. Versioned targets use [`Event::Reported`] with the old version
    /// instead.
    Restored {
        /// The node.
        node: NodeId,
    },
}

impl Event {
    /// The node the event is about.
    pub fn node(&self) -> &NodeId {
        match self {
            Event::Acknowledged { node }
            | Event::Reported { node, .. }
            | Event::Refused { node, .. }
            | Event::Failed { node, .. }
            | Event::Restored { node } => node,
        }
    }
}

/// An operator's command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Start no new node.
    Pause,
    /// Start nodes again; the failure count starts over.
    Resume,
    /// Stop for good; nodes in flight finish.
    Abort,
    /// Try a failed or skipped node again.
    Retry(NodeId),
}

/// Why a rollout or a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RolloutError {
    /// `max_unavailable` or `max_failures` is zero.
    #[error("{0} must be at least 1")]
    ZeroLimit(&'static str),
    /// No node matched.
    #[error("the rollout has no nodes")]
    NoNodes,
    /// The command does not apply in the rollout's state.
    #[error("cannot {command} a rollout that is {state}")]
    BadState {
        /// The command.
        command: &'static str,
        /// The rollout's state.
        state: &'static str,
    },
    /// The node is not part of the rollout.
    #[error("node {0} is not part of this rollout")]
    UnknownNode(NodeId),
    /// Only failed or skipped nodes can be retried.
    #[error("node {node} is {phase}; only failed or skipped nodes can be retried")]
    NotRetryable {
        /// The node.
        node: NodeId,
        /// Its phase.
        phase: &'static str,
    },
}

pub use shoal_api::maintenance::Progress;

/// One rollout: spec, state and every node's phase. Serialize it to store it (postcard; the enums
/// are externally tagged because postcard cannot decode internally tagged ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    id: String,
    spec: RolloutSpec,
    created_at: UnixMillis,
    state: RolloutState,
    nodes: BTreeMap<NodeId, NodePhase>,
    /// Failures since the start or the last resume, oldest first.
    recent_failures: Vec<(NodeId, Failure)>,
    /// Why the last poll started nothing more.
    waiting: Vec<Waiting>,
    /// Agent targets: nodes may go to an older version than they run (`--allow-downgrade`); v5
    /// agents refuse a downgrade without it. Part of how the rollout runs, fixed at start; kept
    /// last (not in [`RolloutSpec`]) so that records written before it existed still decode
    /// ([`RolloutV1`]).
    allow_downgrade: bool,
}

/// A [`Rollout`] as stored before `allow_downgrade` existed (postcard has no optional trailing
/// fields): read with it when the current layout does not decode, then converted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutV1 {
    id: String,
    spec: RolloutSpec,
    created_at: UnixMillis,
    state: RolloutState,
    nodes: BTreeMap<NodeId, NodePhase>,
    recent_failures: Vec<(NodeId, Failure)>,
    waiting: Vec<Waiting>,
}

impl From<RolloutV1> for Rollout {
    fn from(r: RolloutV1) -> Rollout {
        Rollout {
            id: r.id,
            spec: r.spec,
            created_at: r.created_at,
            state: r.state,
            nodes: r.nodes,
            recent_failures: r.recent_failures,
            waiting: r.waiting,
            allow_downgrade: false,
        }
    }
}

impl Rollout {
    /// A new rollout over `nodes`. Nodes in `failed_before` (this target failed on them in an
    /// earlier rollout) are skipped until retried.
    pub fn new(
        id: impl Into<String>,
        spec: RolloutSpec,
        nodes: impl IntoIterator<Item = NodeId>,
        failed_before: &BTreeSet<NodeId>,
        now: UnixMillis,
    ) -> Result<Rollout, RolloutError> {
        if spec.max_unavailable == 0 {
            return Err(RolloutError::ZeroLimit("max_unavailable"));
        }
        if spec.max_failures == 0 {
            return Err(RolloutError::ZeroLimit("max_failures"));
        }
        let nodes: BTreeMap<NodeId, NodePhase> = nodes
            .into_iter()
            .map(|n| {
                let phase = if failed_before.contains(&n) {
                    NodePhase::Skipped {
                        reason: SkipReason::FailedBefore,
                    }
                } else {
                    NodePhase::Pending
                };
                (n, phase)
            })
            .collect();
        if nodes.is_empty() {
            return Err(RolloutError::NoNodes);
        }
        Ok(Rollout {
            id: id.into(),
            spec,
            created_at: now,
            state: RolloutState::Running,
            nodes,
            recent_failures: Vec::new(),
            waiting: Vec::new(),
            allow_downgrade: false,
        })
    }

    /// Decodes a stored rollout (postcard) in the current layout or the one before it
    /// ([`RolloutV1`], which has no `allow_downgrade`: such rollouts never allowed downgrades).
    pub fn from_stored(bytes: &[u8]) -> Result<Rollout, postcard::Error> {
        postcard::from_bytes::<Rollout>(bytes).or_else(|e| {
            postcard::from_bytes::<RolloutV1>(bytes)
                .map(Rollout::from)
                .map_err(|_| e)
        })
    }

    /// Lets the rollout's nodes go to an older version than they run (agent targets; see
    /// [`Rollout::allow_downgrade`]).
    pub fn allowing_downgrade(mut self, allow: bool) -> Rollout {
        self.allow_downgrade = allow;
        self
    }

    /// Whether nodes may go to an older version (`shoalctl upgrade start --allow-downgrade`): the
    /// shell passes it with every begin; the planner itself does not order versions.
    pub fn allow_downgrade(&self) -> bool {
        self.allow_downgrade
    }

    /// The rollout's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// How it runs.
    pub fn spec(&self) -> &RolloutSpec {
        &self.spec
    }

    /// When it was created.
    pub fn created_at(&self) -> UnixMillis {
        self.created_at
    }

    /// Its state.
    pub fn state(&self) -> &RolloutState {
        &self.state
    }

    /// Every node's phase.
    pub fn nodes(&self) -> &BTreeMap<NodeId, NodePhase> {
        &self.nodes
    }

    /// One node's phase.
    pub fn phase(&self, node: &NodeId) -> Option<&NodePhase> {
        self.nodes.get(node)
    }

    /// Why the last poll started nothing more.
    pub fn waiting(&self) -> &[Waiting] {
        &self.waiting
    }

    /// Nodes on which the target failed, to remember in the store (and skip in later rollouts).
    pub fn failed_nodes(&self) -> BTreeSet<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, p)| matches!(p, NodePhase::Failed { .. }))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Nothing more will happen: done, or aborted with nothing in flight.
    pub fn is_finished(&self) -> bool {
        match self.state {
            RolloutState::Done { .. } => true,
            RolloutState::Aborted { .. } => !self.nodes.values().any(NodePhase::in_flight),
            _ => false,
        }
    }

    /// Counts for a progress bar.
    pub fn progress(&self) -> Progress {
        let mut p = Progress {
            total: self.nodes.len() as u32,
            ..Progress::default()
        };
        for phase in self.nodes.values() {
            match phase {
                NodePhase::Pending => p.pending += 1,
                NodePhase::Upgrading { .. } | NodePhase::RollingBack { .. } => p.in_flight += 1,
                NodePhase::Succeeded { .. } => p.succeeded += 1,
                NodePhase::Failed { .. } => p.failed += 1,
                NodePhase::Skipped { .. } => p.skipped += 1,
            }
        }
        p
    }

    /// The earliest deadline of a node in flight: when to poll next at the latest.
    pub fn poll_timeout(&self) -> Option<UnixMillis> {
        self.nodes
            .values()
            .filter_map(|p| match p {
                NodePhase::Upgrading { deadline, .. } | NodePhase::RollingBack { deadline, .. } => {
                    Some(*deadline)
                }
                _ => None,
            })
            .min()
    }

    /// After a controller restart: the commands a crash may have lost between storing the state and
    /// sending them. Begin commands the node never acknowledged, and every roll-back in flight;
    /// both are idempotent at the node.
    pub fn resend_after_restart(&self) -> Vec<Action> {
        self.nodes
            .iter()
            .filter_map(|(node, phase)| match phase {
                NodePhase::Upgrading {
                    acknowledged: false,
                    ..
                } => Some(Action::BeginUpgrade {
                    node: node.clone(),
                    target: self.spec.target.clone(),
                }),
                NodePhase::RollingBack { to, .. } => Some(Action::RollBack {
                    node: node.clone(),
                    to: to.clone(),
                    target: self.spec.target.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    /// Records a failure of `node`, rolling it back if it changed; pauses at `max_failures`.
    fn fail(
        &mut self,
        node: &NodeId,
        failure: Failure,
        roll_back: Option<Option<String>>,
        now: UnixMillis,
        out: &mut Vec<Action>,
    ) {
        warn!(rollout = %self.id, node = %node, target = %self.spec.target, failure = %failure, "node upgrade failed");
        let phase = match roll_back {
            Some(to) => {
                out.push(Action::RollBack {
                    node: node.clone(),
                    to: to.clone(),
                    target: self.spec.target.clone(),
                });
                NodePhase::RollingBack {
                    since: now,
                    deadline: add(now, self.spec.rollback_deadline),
                    to,
                    failure: failure.clone(),
                }
            }
            None => NodePhase::Failed {
                at: now,
                failure: failure.clone(),
                rolled_back: true,
            },
        };
        self.nodes.insert(node.clone(), phase);
        self.recent_failures.push((node.clone(), failure));
        if self.state == RolloutState::Running
            && self.recent_failures.len() as u32 >= self.spec.max_failures
        {
            let reason = PauseReason::TooManyFailures {
                failed: self.recent_failures.clone(),
            };
            warn!(rollout = %self.id, reason = %reason, "rollout paused");
            self.state = RolloutState::Paused {
                at: now,
                reason: reason.clone(),
            };
            out.push(Action::Paused { reason });
        }
    }

    /// Feeds a node's event.
    pub fn handle(&mut self, event: Event, now: UnixMillis) -> Vec<Action> {
        let mut out = Vec::new();
        let target = self.spec.target.version().to_owned();
        match event {
            Event::Acknowledged { node } => {
                if let Some(NodePhase::Upgrading { acknowledged, .. }) = self.nodes.get_mut(&node) {
                    *acknowledged = true;
                }
            }
            Event::Refused { node, reason } => {
                if let Some(NodePhase::Upgrading { .. }) = self.nodes.get(&node) {
                    self.fail(&node, Failure::Refused { reason }, None, now, &mut out);
                }
            }
            Event::Failed { node, reason } => {
                if let Some(NodePhase::Upgrading { from, .. }) = self.nodes.get(&node).cloned() {
                    self.fail(&node, Failure::Failed { reason }, Some(from), now, &mut out);
                }
            }
            Event::Restored { node } => {
                if let Some(NodePhase::RollingBack { failure, .. }) = self.nodes.get(&node).cloned()
                {
                    info!(rollout = %self.id, node = %node, "node restored");
                    self.nodes.insert(
                        node,
                        NodePhase::Failed {
                            at: now,
                            failure,
                            rolled_back: true,
                        },
                    );
                }
            }
            Event::Reported {
                node,
                version,
                health,
            } => match self.nodes.get(&node).cloned() {
                Some(NodePhase::Upgrading { from, .. }) if version == target => match health {
                    ReportedHealth::Healthy => {
                        info!(rollout = %self.id, node = %node, version = %version, "node upgraded");
                        self.nodes.insert(
                            node,
                            NodePhase::Succeeded {
                                at: now,
                                already: false,
                            },
                        );
                    }
                    ReportedHealth::Checking => {}
                    ReportedHealth::Failed(checks) => {
                        self.fail(
                            &node,
                            Failure::ChecksFailed { checks },
                            Some(from),
                            now,
                            &mut out,
                        );
                    }
                },
                // Before the update takes effect the node still reports its old version: not news.
                Some(NodePhase::RollingBack { to, failure, .. })
                    if version != target
                        && health == ReportedHealth::Healthy
                        && to.as_ref().is_none_or(|to| *to == version) =>
                {
                    info!(rollout = %self.id, node = %node, version = %version, "node rolled back");
                    self.nodes.insert(
                        node,
                        NodePhase::Failed {
                            at: now,
                            failure,
                            rolled_back: true,
                        },
                    );
                }
                _ => {}
            },
        }
        out
    }

    /// Carries out an operator's command.
    pub fn command(
        &mut self,
        command: Command,
        now: UnixMillis,
    ) -> Result<Vec<Action>, RolloutError> {
        let bad = |command: &'static str, this: &Rollout| RolloutError::BadState {
            command,
            state: this.state.as_str(),
        };
        let mut out = Vec::new();
        match command {
            Command::Pause => match self.state {
                RolloutState::Running => {
                    self.state = RolloutState::Paused {
                        at: now,
                        reason: PauseReason::Operator,
                    };
                    out.push(Action::Paused {
                        reason: PauseReason::Operator,
                    });
                }
                RolloutState::Paused { .. } => {}
                _ => return Err(bad("pause", self)),
            },
            Command::Resume => match self.state {
                RolloutState::Paused { .. } => {
                    info!(rollout = %self.id, "rollout resumed");
                    self.state = RolloutState::Running;
                    self.recent_failures.clear();
                }
                RolloutState::Running => {}
                _ => return Err(bad("resume", self)),
            },
            Command::Abort => match self.state {
                RolloutState::Running | RolloutState::Paused { .. } => {
                    info!(rollout = %self.id, "rollout aborted");
                    self.state = RolloutState::Aborted { at: now };
                }
                RolloutState::Aborted { .. } => {}
                RolloutState::Done { .. } => return Err(bad("abort", self)),
            },
            Command::Retry(node) => {
                if matches!(self.state, RolloutState::Aborted { .. }) {
                    return Err(bad("retry a node of", self));
                }
                let phase = self
                    .nodes
                    .get_mut(&node)
                    .ok_or_else(|| RolloutError::UnknownNode(node.clone()))?;
                match phase {
                    NodePhase::Failed { .. } | NodePhase::Skipped { .. } => {
                        *phase = NodePhase::Pending
                    }
                    other => {
                        return Err(RolloutError::NotRetryable {
                            node,
                            phase: other.as_str(),
                        })
                    }
                }
                if matches!(self.state, RolloutState::Done { .. }) {
                    self.state = RolloutState::Running;
                }
            }
        }
        Ok(out)
    }

    /// Decides what to do now: fails nodes past their deadline, settles nodes already on the target
    /// or gone, and starts as many pending nodes as the window, max-unavailable and budgets allow.
    pub fn poll(
        &mut self,
        fleet: &Fleet,
        budgets: &[Budget],
        window: &dyn WindowCheck,
        now: UnixMillis,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let target = self.spec.target.version().to_owned();

        // Deadlines.
        let due: Vec<(NodeId, NodePhase)> =
            self.nodes
                .iter()
                .filter(|(_, p)| match p {
                    NodePhase::Upgrading { deadline, .. }
                    | NodePhase::RollingBack { deadline, .. } => *deadline <= now,
                    _ => false,
                })
                .map(|(n, p)| (n.clone(), p.clone()))
                .collect();
        for (node, phase) in due {
            match phase {
                NodePhase::Upgrading { from, .. } => {
                    self.fail(&node, Failure::Deadline, Some(from), now, &mut out)
                }
                NodePhase::RollingBack { failure, .. } => {
                    warn!(rollout = %self.id, node = %node, "node did not come back after roll-back; needs an operator");
                    self.nodes.insert(
                        node,
                        NodePhase::Failed {
                            at: now,
                            failure,
                            rolled_back: false,
                        },
                    );
                }
                _ => {}
            }
        }

        // Pending nodes that left the fleet or are already there.
        for (node, phase) in self.nodes.iter_mut() {
            if *phase != NodePhase::Pending {
                continue;
            }
            match fleet.get(node) {
                None => {
                    *phase = NodePhase::Skipped {
                        reason: SkipReason::Removed,
                    }
                }
                Some(o)
                    if o.available()
                        && o.version.as_deref() == Some(target.as_str())
                        && !matches!(self.spec.target, Target::Action(_)) =>
                {
                    *phase = NodePhase::Succeeded {
                        at: now,
                        already: true,
                    };
                }
                Some(_) => {}
            }
        }

        self.waiting.clear();
        if self.state == RolloutState::Running {
            self.start_nodes(fleet, budgets, window, now, &mut out);
        }

        if self.state == RolloutState::Running && self.nodes.values().all(NodePhase::settled) {
            let p = self.progress();
            info!(rollout = %self.id, succeeded = p.succeeded, failed = p.failed, skipped = p.skipped, "rollout done");
            self.state = RolloutState::Done { at: now };
            out.push(Action::Done {
                succeeded: p.succeeded,
                failed: p.failed,
                skipped: p.skipped,
            });
        }
        out
    }

    fn unavailable(&self, node: &NodeId, observed: &Observed) -> bool {
        !observed.available() || self.nodes.get(node).is_some_and(NodePhase::in_flight)
    }

    fn start_nodes(
        &mut self,
        fleet: &Fleet,
        budgets: &[Budget],
        window: &dyn WindowCheck,
        now: UnixMillis,
        out: &mut Vec<Action>,
    ) {
        if !self.nodes.values().any(|p| *p == NodePhase::Pending) {
            return;
        }
        match window.open_until(now) {
            None => {
                self.waiting.push(Waiting::WindowClosed);
                return;
            }
            Some(closes_at) if closes_at < add(now, self.spec.min_window_left) => {
                self.waiting.push(Waiting::WindowClosing { closes_at });
                return;
            }
            Some(_) => {}
        }
        let mut unavailable = self
            .nodes
            .keys()
            .filter(|n| fleet.get(*n).is_some_and(|o| self.unavailable(n, o)))
            .count() as u32;
        let mut group: Vec<u32> = budgets
            .iter()
            .map(|b| {
                fleet
                    .iter()
                    .filter(|(n, o)| b.selector.matches(&o.labels) && self.unavailable(n, o))
                    .count() as u32
            })
            .collect();
        let pending: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, p)| **p == NodePhase::Pending)
            .map(|(n, _)| n.clone())
            .collect();
        let mut down = Vec::new();
        for node in pending {
            if unavailable >= self.spec.max_unavailable {
                self.waiting.push(Waiting::MaxUnavailable { unavailable });
                break;
            }
            let Some(observed) = fleet.get(&node) else {
                continue;
            };
            if !observed.available() {
                down.push(node);
                continue;
            }
            let full = budgets.iter().zip(&group).find(|(b, used)| {
                b.selector.matches(&observed.labels) && **used + 1 > b.max_unavailable
            });
            if let Some((b, used)) = full {
                let w = Waiting::Budget {
                    selector: b.selector.to_string(),
                    unavailable: *used,
                    max: b.max_unavailable,
                };
                if !self.waiting.contains(&w) {
                    self.waiting.push(w);
                }
                continue;
            }
            for (b, used) in budgets.iter().zip(group.iter_mut()) {
                if b.selector.matches(&observed.labels) {
                    *used += 1;
                }
            }
            unavailable += 1;
            info!(rollout = %self.id, node = %node, target = %self.spec.target, "starting node upgrade");
            self.nodes.insert(
                node.clone(),
                NodePhase::Upgrading {
                    since: now,
                    deadline: add(now, self.spec.upgrade_deadline),
                    from: observed.version.clone(),
                    acknowledged: false,
                },
            );
            out.push(Action::BeginUpgrade {
                node,
                target: self.spec.target.clone(),
            });
        }
        if !down.is_empty() {
            self.waiting.push(Waiting::NodesUnavailable { nodes: down });
        }
    }
}

crate::event_kinds! {
    /// What windows, budgets, rollouts and maintenance runs log.
    pub enum MaintenanceEvent {
        /// A maintenance window was created.
        WindowCreated => "window_created",
        /// A maintenance window was deleted.
        WindowDeleted => "window_deleted",
        /// A disruption budget was set or changed.
        BudgetSet => "budget_set",
        /// A disruption budget was deleted.
        BudgetDeleted => "budget_deleted",
        /// A rollout was started.
        RolloutStarted => "rollout_started",
        /// A rollout paused (by an operator, or after too many failures; the message says which).
        RolloutPaused => "rollout_paused",
        /// A rollout was resumed, or a node of it retried.
        RolloutResumed => "rollout_resumed",
        /// A rollout was aborted.
        RolloutAborted => "rollout_aborted",
        /// A rollout finished: every node settled (or, aborted, nothing is in flight any more).
        RolloutDone => "rollout_done",
        /// A rollout took a node down to upgrade it.
        NodeUpgradeStarted => "node_upgrade_started",
        /// A node came back up on the rollout's target.
        NodeUpgradeSucceeded => "node_upgrade_succeeded",
        /// A node's upgrade failed (it is rolled back if it changed), or it did not come back after
        /// its roll-back.
        NodeUpgradeFailed => "node_upgrade_failed",
        /// A failed node is back on its previous version (or never left it).
        NodeRolledBack => "node_rolled_back",
        /// The controller asked a node to reboot (to netboot a newly assigned image).
        NodeRebootRequested => "node_reboot_requested",
        /// A node acknowledged a reboot request and is rebooting.
        NodeRebooting => "node_rebooting",
        /// A node refused a reboot request (`--no-remote-reboot`, or the reboot could not start).
        NodeRebootRefused => "node_reboot_refused",
        /// A maintenance run's pre-hook passed on a node (or it has none): the node is cordoned.
        NodeCordoned => "node_cordoned",
        /// A maintenance run's action started on a node.
        NodeInMaintenance => "node_in_maintenance",
        /// A node's post-hook passed after a maintenance action (or its roll-back): it is up again.
        NodeUp => "node_up",
        /// A step of a maintenance run failed on a node (pre-hook, action or post-hook; the message
        /// says).
        NodeMaintenanceFailed => "node_maintenance_failed",
        /// A node reported what it booted (netboot image, boot id) and how its health checks went.
        NodeBootReport => "node_boot_report",
    }
}

#[cfg(test)]
mod tests;
