//! The controller's maintenance shell: windows, disruption budgets and rollouts in the store, and
//! the rollout driver that feeds the sans-IO planner ([`shoal_controller_core::rollout`]) and carries out its
//! actions through a [`NodeUpgrader`].
//!
//! Trees:
//!
//! | tree | key | value |
//! |---|---|---|
//! | `windows` | window name | [`WindowRecord`] |
//! | `budgets` | `KEY=VALUE` | [`Budget`] |
//! | `rollouts` | rollout id (`r1`, `r2`, …) | [`Rollout`] (the planner's whole state) |
//! | `failed_versions` | node id ‖ 0 ‖ target (`agent 1.2.0`) | [`FailedVersion`] |
//!
//! **Persist, then act.** Every change of a rollout (a poll, a node's report, an operator's
//! command) is written together with its events (and the failures to remember) in one sled
//! transaction, flushed, and only then are the planner's actions carried out. A crash between the
//! two loses at most commands that [`Rollout::resend_after_restart`] repeats at the first tick
//! after a restart.
//!
//! **The driver** ([`run_driver`]) is one task per controller. Every
//! [`ControllerConfig::rollout_tick`] (default 5 s), and at once when an operator acts, it polls
//! every rollout that is not finished: it builds the [`Fleet`] from the store's node records
//! (labels, the agent's reported version), the live connections (up = has a control connection) and
//! the other rollouts (a node in flight in another rollout is busy), reads the budgets and the
//! rollout's window, feeds the planner the nodes that came back on the target (or on their old
//! version after a roll-back), then polls it.
//!
//! **Clock.** The driver reads [`RolloutClock`], the wall clock plus an offset that is zero unless
//! a test sets it (a documented test hook: it moves only the rollout driver's "now", e.g. into or
//! out of a window; nothing else in the controller reads it).
//!
//! [`ControllerConfig::rollout_tick`]: crate::server::ControllerConfig::rollout_tick

use crate::store::MaintenanceEvent;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use shoal_proto::{MaintenanceAction, NodeId, UnixMillis};
use tracing::{debug, info, warn};

use crate::{
    server::now_ms, server::Controller, store::decode, store::encode, store::EventKind,
    store::RawTable, store::Store, store::StoreError, store::EVENTS,
};
use shoal_controller_core::registry::NodeRecord;
use shoal_controller_core::rollout::{
    Action, Budget, Command, Event, Failure, Fleet, NodePhase, Observed, ReportedHealth, Rollout,
    RolloutError, RolloutSpec, RolloutState, Target,
};
use shoal_controller_core::selector::{parse_selector, Selector, SelectorError};
use shoal_controller_core::windows::{AlwaysOpen, Window, WindowCheck, WindowError, WindowRecord};

pub mod actions;
pub mod agent;
pub mod image;
pub mod messages;
pub mod routes;

#[cfg(test)]
mod tests;

const WINDOWS: &str = "windows";
const BUDGETS: &str = "budgets";
const ROLLOUTS: &str = "rollouts";
const FAILED_VERSIONS: &str = "failed_versions";
/// News from agents for the rollouts, written by a controller that does not lead and applied (then
/// deleted) by the leader: key = arrival time (ms, big-endian) and 8 random bytes, value = the
/// [`Event`]. In the store, so no news is lost when the leader dies before it applied it.
const ROLLOUT_INBOX: &str = "rollout_inbox";
/// The per-node deadline of a maintenance action run unless `--deadline` says otherwise: the
/// agent's default `--maintenance-timeout` (30 min) plus hooks and a reboot.
pub const ACTION_DEADLINE: Duration = Duration::from_secs(45 * 60);

/// The rollout driver's clock: the wall clock plus an offset.
///
/// **Test hook.** The offset is 0 in production. Tests set it ([`RolloutClock::set_offset`]) to
/// move the rollout driver's "now" into or out of a window without waiting for it; only the rollout
/// driver reads this clock.
#[derive(Debug, Clone, Default)]
pub struct RolloutClock {
    offset_ms: Arc<AtomicI64>,
}

impl RolloutClock {
    /// The driver's now.
    pub fn now(&self) -> UnixMillis {
        let wall = now_ms().0 as i64;
        UnixMillis(
            wall.saturating_add(self.offset_ms.load(Ordering::SeqCst))
                .max(0) as u64,
        )
    }

    /// Test hook: the driver's now becomes the wall clock plus `offset_ms`.
    pub fn set_offset(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms, Ordering::SeqCst);
    }

    /// Test hook: makes the driver's now `at` (as of this call; it runs on from there).
    pub fn set_now(&self, at: UnixMillis) {
        self.set_offset(at.0 as i64 - now_ms().0 as i64);
    }
}

/// Why an upgrader could not carry out a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    /// The node has no control connection to send the command on.
    #[error("node {0} is not connected")]
    NotConnected(NodeId),
    /// The node cannot take this kind of update (e.g. an agent too old for remote updates).
    #[error("node {node} cannot be updated this way: {why}")]
    Unsupported {
        /// The node.
        node: NodeId,
        /// Why.
        why: String,
    },
    /// Anything else, in the upgrader's words.
    #[error("{0}")]
    Failed(String),
}

/// Carries out the planner's commands for one kind of [`Target`]: the interface between the rollout
/// driver and whatever actually changes a node (agent self-update over protocol v4, netboot image
/// assignment and reboot). Both calls must be idempotent at the node: after a controller restart
/// the driver repeats the ones a crash may have lost.
///
/// The driver learns the outcome by observation (the node's reported version on a live connection,
/// see the module docs) and through [`Controller::rollout_event`] (acknowledgements, health
/// reports, refusals), not from these return values; an `Err` from `begin` means the command did
/// not go out, and the node is failed as refused (it did not change).
pub trait NodeUpgrader: Send + Sync + fmt::Debug {
    /// Start putting `node` on `target` (agent: send the signed release; image: assign it and
    /// reboot).
    fn begin(&self, node: &NodeId, target: &Target) -> Result<(), UpgradeError>;
    /// [`NodeUpgrader::begin`] with the rollout's options (the driver calls this one). Upgraders
    /// that have no use for them keep this default.
    fn begin_with(
        &self,
        node: &NodeId,
        target: &Target,
        options: &BeginOptions,
    ) -> Result<(), UpgradeError> {
        let _ = options;
        self.begin(node, target)
    }
    /// Put `node` back on `to` (its version before `target`, if known).
    fn roll_back(
        &self,
        node: &NodeId,
        to: Option<&str>,
        target: &Target,
    ) -> Result<(), UpgradeError>;
}

/// What a rollout lets its nodes do, passed with every begin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BeginOptions {
    /// The node may go to an older version than it runs ([`Rollout::allow_downgrade`]). Default
    /// false.
    pub allow_downgrade: bool,
}

/// The kinds of target an upgrader can be installed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum TargetKind {
    /// [`Target::Agent`].
    Agent,
    /// [`Target::Image`].
    Image,
    /// [`Target::Action`].
    Action,
}

impl TargetKind {
    fn of(target: &Target) -> Option<TargetKind> {
        match target {
            Target::Agent(_) => Some(TargetKind::Agent),
            Target::Image(_) => Some(TargetKind::Image),
            Target::Action(_) => Some(TargetKind::Action),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

/// A remembered failure of a target on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedVersion {
    /// The node.
    pub node: NodeId,
    /// What failed on it.
    pub target: Target,
    /// The rollout it failed in.
    pub rollout: String,
    /// Why.
    pub failure: Failure,
    /// When.
    pub at: UnixMillis,
}

/// Why a maintenance request was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MaintError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The window definition is not valid.
    #[error(transparent)]
    Window(#[from] WindowError),
    /// A window of this name exists.
    #[error("window {0} exists; delete it first")]
    WindowExists(String),
    /// No window has this name.
    #[error("no window named {0}")]
    UnknownWindow(String),
    /// A rollout that is not finished uses the window.
    #[error("window {window} is used by rollout {rollout}, which is not finished")]
    WindowInUse {
        /// The window.
        window: String,
        /// The rollout.
        rollout: String,
    },
    /// The selector does not parse.
    #[error(transparent)]
    BadSelector(#[from] SelectorError),
    /// No budget for this selector.
    #[error("there is no disruption budget for {0}")]
    UnknownBudget(String),
    /// A budget of 0 would block every disruption for good.
    #[error("--max-unavailable must be at least 1")]
    ZeroBudget,
    /// Not exactly one of `agent`, `image` and `action` was given.
    #[error("name exactly one of --agent VERSION, --image VERSION and a maintenance action")]
    Target,
    /// No upgrader is installed for the target's kind.
    #[error("this controller cannot carry out {0} upgrades yet (no upgrader installed)")]
    NoUpgrader(&'static str),
    /// The window's selector does not match some of the rollout's nodes.
    #[error("window {window} is for {selector}; these nodes do not match it: {}", nodes.join(", "))]
    OutsideWindow {
        /// The window.
        window: String,
        /// Its selector.
        selector: String,
        /// The nodes that do not match.
        nodes: Vec<String>,
    },
    /// No rollout has this id (or no rollout is active, for `current`).
    #[error("no rollout {0}")]
    UnknownRollout(String),
    /// A rollout is not finished on some of the same nodes.
    #[error("rollout {rollout} is not finished and holds {node}; pause and abort it first")]
    Overlap {
        /// The other rollout.
        rollout: String,
        /// A node both would hold.
        node: String,
    },
    /// The image is not in the image store.
    #[error("image {version} cannot be rolled out: {cause}")]
    UnknownImage {
        /// The version asked for.
        version: String,
        /// The image store's answer.
        cause: String,
    },
    /// The planner refused.
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    /// The maintenance action is not valid.
    #[error("{0}")]
    BadAction(String),
    /// `--allow-downgrade` was given for a target that is not an agent release.
    #[error("--allow-downgrade applies to agent rollouts (--agent VERSION) only")]
    DowngradeNotAgent,
}

/// One of the driver's event records, before it gets its seq.
type PendingEvent = (EventKind, Option<NodeId>, String);

/// See the module docs.
pub struct Maintenance {
    store: Store,
    windows: RawTable,
    budgets: RawTable,
    rollouts: RawTable,
    failed: RawTable,
    /// Serialises every change of a rollout (driver ticks, operators' commands, node events).
    lock: Mutex<()>,
    /// Serialises applying the rollout inbox (the mesh's wake-up and the driver's tick).
    inbox_lock: Mutex<()>,
    upgraders: Mutex<BTreeMap<TargetKind, Arc<dyn NodeUpgrader>>>,
    clock: RolloutClock,
    /// Rollouts whose commands lost by a restart have been repeated (in this process).
    resent: Mutex<BTreeSet<String>>,
    /// Wakes the driver.
    pub(crate) wake: tokio::sync::Notify,
}

impl fmt::Debug for Maintenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maintenance")
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

fn failed_key(node: &NodeId, target: &Target) -> Vec<u8> {
    let mut k = node.0.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(target.to_string().as_bytes());
    k
}

/// A stored rollout, of the current layout or the one before `allow_downgrade`
/// ([`Rollout::from_stored`]).
fn decode_rollout(key: &[u8], value: &[u8]) -> Result<Rollout, StoreError> {
    Rollout::from_stored(value).map_err(|e| StoreError::Corrupt {
        key: format!("{ROLLOUTS}/{}", String::from_utf8_lossy(key)),
        cause: e.to_string(),
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The version a target is about, as a node record shows it: the agent's reported version, or the
/// netboot image it booted (its inventory's OS line `shoal netboot image V`).
pub fn observed_version(target: &Target, rec: &NodeRecord) -> Option<String> {
    match target {
        Target::Agent(_) => Some(rec.agent_version.clone()).filter(|v| !v.is_empty()),
        Target::Image(_) => rec.inventory.as_ref().and_then(|i| {
            i.os.strip_prefix("shoal netboot image ")
                .map(|v| v.trim().to_owned())
        }),
        // An action installs nothing: success is reported by its executor, never observed.
        Target::Action(_) => None,
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

impl Maintenance {
    /// Opens the trees.
    pub fn open(store: &Store, clock: RolloutClock) -> Result<Maintenance, StoreError> {
        Ok(Maintenance {
            store: store.clone(),
            windows: store.table(WINDOWS),
            budgets: store.table(BUDGETS),
            rollouts: store.table(ROLLOUTS),
            failed: store.table(FAILED_VERSIONS),
            lock: Mutex::new(()),
            inbox_lock: Mutex::new(()),
            upgraders: Mutex::new(BTreeMap::new()),
            clock,
            resent: Mutex::new(BTreeSet::new()),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// The driver's clock.
    pub fn clock(&self) -> &RolloutClock {
        &self.clock
    }

    /// Installs the upgrader for one kind of target.
    pub fn set_upgrader(&self, kind: TargetKind, upgrader: Arc<dyn NodeUpgrader>) {
        lock(&self.upgraders).insert(kind, upgrader);
    }

    fn upgrader(&self, target: &Target) -> Option<Arc<dyn NodeUpgrader>> {
        TargetKind::of(target).and_then(|k| lock(&self.upgraders).get(&k).cloned())
    }

    /// Writes one record (or deletes it) with an event, in one transaction; flushed.
    fn write_with_event(
        &self,
        tree: &RawTable,
        key: &[u8],
        value: Option<Vec<u8>>,
        ev: PendingEvent,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        self.store.check_space()?;
        let event = self.store.transaction(&[tree.name(), EVENTS], |tx| {
            let (t, events) = (tx.table(tree.name()), tx.table(EVENTS));
            match &value {
                Some(v) => t.insert(key, v.as_slice())?,
                None => {
                    t.remove(key)?;
                }
            };
            self.store
                .tx_event::<StoreError>(&events, ev.0, ev.1.as_ref(), &ev.2, now)
        })?;
        self.store.flush()?;
        self.store.after_event(event.seq)
    }

    // ---------------------------------------------------------------------------------------------
    // Windows
    // ---------------------------------------------------------------------------------------------

    /// All windows, by name. A record that no longer parses (its zone left the tzdb) is logged and
    /// left out; rollouts treat its name as always closed.
    pub fn windows(&self) -> Result<Vec<Window>, StoreError> {
        let mut out = Vec::new();
        for item in self.windows.iter() {
            let (key, value) = item?;
            let rec: WindowRecord = decode(WINDOWS, &key, &value)?;
            match Window::from_record(rec) {
                Ok(w) => out.push(w),
                Err(e) => {
                    warn!(window = %String::from_utf8_lossy(&key), cause = %e, "stored window no longer parses; treated as closed")
                }
            }
        }
        Ok(out)
    }

    /// One window.
    pub fn window(&self, name: &str) -> Result<Option<Window>, StoreError> {
        match self.windows.get(name.as_bytes())? {
            Some(v) => {
                let rec: WindowRecord = decode(WINDOWS, name.as_bytes(), &v)?;
                Ok(Window::from_record(rec)
                    .inspect_err(|e| warn!(window = %name, cause = %e, "stored window no longer parses; treated as closed"))
                    .ok())
            }
            None => Ok(None),
        }
    }

    /// Stores a new window (checked to open at least once after `now`) with a `window_created`
    /// event.
    pub fn create_window(&self, window: &Window, now: UnixMillis) -> Result<(), MaintError> {
        window.check_opens(now)?;
        let _g = lock(&self.lock);
        if self.windows.get(window.name().as_bytes())?.is_some() {
            return Err(MaintError::WindowExists(window.name().to_owned()));
        }
        let r = window.record();
        let msg = format!(
            "window {} created: {:?} for {} in {}{}",
            r.name,
            r.schedule,
            humantime::format_duration(window.duration()),
            r.tz,
            window
                .selector_text()
                .map(|s| format!(", for {s}"))
                .unwrap_or_default()
        );
        let value = encode("window", r)?;
        self.write_with_event(
            &self.windows,
            r.name.as_bytes(),
            Some(value),
            (
                EventKind::Maintenance(MaintenanceEvent::WindowCreated),
                None,
                msg,
            ),
            now,
        )?;
        info!(window = %r.name, schedule = %r.schedule, tz = %r.tz, "window created");
        Ok(())
    }

    /// Deletes a window with a `window_deleted` event; refused while an unfinished rollout names
    /// it.
    pub fn delete_window(&self, name: &str, now: UnixMillis) -> Result<WindowRecord, MaintError> {
        let _g = lock(&self.lock);
        let rec: WindowRecord = match self.windows.get(name.as_bytes())? {
            Some(v) => decode(WINDOWS, name.as_bytes(), &v)?,
            None => return Err(MaintError::UnknownWindow(name.to_owned())),
        };
        for r in self.rollouts()? {
            if !r.is_finished() && r.spec().window.as_deref() == Some(name) {
                return Err(MaintError::WindowInUse {
                    window: name.to_owned(),
                    rollout: r.id().to_owned(),
                });
            }
        }
        self.write_with_event(
            &self.windows,
            name.as_bytes(),
            None,
            (
                EventKind::Maintenance(MaintenanceEvent::WindowDeleted),
                None,
                format!("window {name} deleted"),
            ),
            now,
        )?;
        info!(window = %name, "window deleted");
        Ok(rec)
    }

    // ---------------------------------------------------------------------------------------------
    // Budgets
    // ---------------------------------------------------------------------------------------------

    /// All budgets, by selector.
    pub fn budgets(&self) -> Result<Vec<Budget>, StoreError> {
        let mut out = Vec::new();
        for item in self.budgets.iter() {
            let (key, value) = item?;
            out.push(decode(BUDGETS, &key, &value)?);
        }
        Ok(out)
    }

    /// Sets (or replaces) the budget of a label group, with a `budget_set` event.
    pub fn set_budget(
        &self,
        selector: &str,
        max_unavailable: u32,
        now: UnixMillis,
    ) -> Result<Budget, MaintError> {
        let selector = parse_selector(selector)?;
        if max_unavailable == 0 {
            return Err(MaintError::ZeroBudget);
        }
        // Canonical text: the key a budget of the old `KEY=VALUE` form has too.
        let key = selector.to_string();
        let budget = Budget {
            selector,
            max_unavailable,
        };
        let msg = format!("disruption budget for {key}: at most {max_unavailable} unavailable");
        self.write_with_event(
            &self.budgets,
            key.as_bytes(),
            Some(encode("budget", &budget)?),
            (
                EventKind::Maintenance(MaintenanceEvent::BudgetSet),
                None,
                msg,
            ),
            now,
        )?;
        info!(selector = %key, max_unavailable, "budget set");
        self.wake.notify_one();
        Ok(budget)
    }

    /// Deletes a budget, with a `budget_deleted` event.
    pub fn delete_budget(&self, selector: &str, now: UnixMillis) -> Result<Budget, MaintError> {
        let key = parse_selector(selector)?.to_string();
        let old: Budget = match self.budgets.get(key.as_bytes())? {
            Some(v) => decode(BUDGETS, key.as_bytes(), &v)?,
            None => return Err(MaintError::UnknownBudget(key)),
        };
        self.write_with_event(
            &self.budgets,
            key.as_bytes(),
            None,
            (
                EventKind::Maintenance(MaintenanceEvent::BudgetDeleted),
                None,
                format!("disruption budget for {key} deleted"),
            ),
            now,
        )?;
        info!(selector = %key, "budget deleted");
        Ok(old)
    }

    // ---------------------------------------------------------------------------------------------
    // Rollouts: store
    // ---------------------------------------------------------------------------------------------

    /// Every rollout, oldest first.
    pub fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        let mut out: Vec<Rollout> = Vec::new();
        for item in self.rollouts.iter() {
            let (key, value) = item?;
            out.push(decode_rollout(&key, &value)?);
        }
        out.sort_by_key(|r| (r.created_at(), rollout_number(r.id())));
        Ok(out)
    }

    /// One rollout; `current` is the newest that is not finished (else the newest).
    pub fn rollout(&self, id: &str) -> Result<Rollout, MaintError> {
        if id == "current" {
            let all = self.rollouts()?;
            let pick = all.iter().rev().find(|r| !r.is_finished()).or(all.last());
            return pick
                .cloned()
                .ok_or_else(|| MaintError::UnknownRollout("is active".into()));
        }
        match self.rollouts.get(id.as_bytes())? {
            Some(v) => Ok(decode_rollout(id.as_bytes(), &v)?),
            None => Err(MaintError::UnknownRollout(id.to_owned())),
        }
    }

    /// Nodes on which `target` failed before.
    fn failed_before(&self, target: &Target) -> Result<BTreeSet<NodeId>, StoreError> {
        let mut out = BTreeSet::new();
        if !target.remembers_failures() {
            return Ok(out);
        }
        for item in self.failed.iter() {
            let (key, value) = item?;
            let f: FailedVersion = decode(FAILED_VERSIONS, &key, &value)?;
            if &f.target == target {
                out.insert(f.node);
            }
        }
        Ok(out)
    }

    /// Remembered failures, for display.
    pub fn failed_versions(&self) -> Result<Vec<FailedVersion>, StoreError> {
        let mut out = Vec::new();
        for item in self.failed.iter() {
            let (key, value) = item?;
            out.push(decode(FAILED_VERSIONS, &key, &value)?);
        }
        Ok(out)
    }

    /// Stores `after` with the events that describe what changed since `before` (and `extra`), and
    /// the failures to remember; one transaction, flushed. Call before carrying out `actions`.
    fn save(
        &self,
        before: Option<&Rollout>,
        after: &Rollout,
        actions: &[Action],
        extra: Vec<PendingEvent>,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        let mut events = extra;
        events.extend(describe(before, after, actions));
        let mut failed = Vec::new();
        for (node, phase) in after.nodes() {
            if let NodePhase::Failed { failure, at, .. } = phase {
                let was_failed = before
                    .and_then(|b| b.phase(node))
                    .is_some_and(|p| matches!(p, NodePhase::Failed { .. }));
                if !was_failed && after.spec().target.remembers_failures() {
                    let rec = FailedVersion {
                        node: node.clone(),
                        target: after.spec().target.clone(),
                        rollout: after.id().to_owned(),
                        failure: failure.clone(),
                        at: *at,
                    };
                    failed.push((
                        failed_key(node, &after.spec().target),
                        encode("failed version", &rec)?,
                    ));
                }
            }
        }
        let value = encode("rollout", after)?;
        self.store.check_space()?;
        let last = self
            .store
            .transaction(&[ROLLOUTS, FAILED_VERSIONS, EVENTS], |tx| {
                let (rollouts, failed_t, ev) = (
                    tx.table(ROLLOUTS),
                    tx.table(FAILED_VERSIONS),
                    tx.table(EVENTS),
                );
                {
                    rollouts.insert(after.id().as_bytes(), value.as_slice())?;
                    for (k, v) in &failed {
                        failed_t.insert(k.as_slice(), v.as_slice())?;
                    }
                    let mut last = None;
                    for (kind, node, msg) in &events {
                        last = Some(
                            self.store
                                .tx_event::<StoreError>(&ev, *kind, node.as_ref(), msg, now)?
                                .seq,
                        );
                    }
                    Ok(last)
                }
            })?;
        self.store.flush()?;
        if let Some(seq) = last {
            self.store.after_event(seq)?;
        }
        Ok(())
    }
}

fn rollout_number(id: &str) -> u64 {
    id.strip_prefix('r')
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The events for a rollout's change from `before` to `after`.
fn describe(before: Option<&Rollout>, after: &Rollout, actions: &[Action]) -> Vec<PendingEvent> {
    let id = after.id();
    let target = &after.spec().target;
    let mut out = Vec::new();
    for (node, phase) in after.nodes() {
        let old = before.and_then(|b| b.phase(node));
        if old == Some(phase) {
            continue;
        }
        let n = Some(node.clone());
        match (old, phase) {
            (_, NodePhase::Upgrading { from, .. }) if !old.is_some_and(|o| matches!(o, NodePhase::Upgrading { .. })) => out.push((
                EventKind::Maintenance(MaintenanceEvent::NodeUpgradeStarted),
                n,
                format!("rollout {id}: {node} taken down for {target} (from {})", from.as_deref().unwrap_or("unknown")),
            )),
            (_, NodePhase::Succeeded { already: false, .. }) => {
                out.push((EventKind::Maintenance(MaintenanceEvent::NodeUpgradeSucceeded), n, format!("rollout {id}: {node} back up on {target}")))
            }
            (Some(NodePhase::Upgrading { .. }), NodePhase::RollingBack { failure, to, .. }) => out.push((
                EventKind::Maintenance(MaintenanceEvent::NodeUpgradeFailed),
                n,
                format!("rollout {id}: {node} failed {target}: {failure}; rolling back to {}", to.as_deref().unwrap_or("its previous version")),
            )),
            (Some(NodePhase::Upgrading { .. }), NodePhase::Failed { failure, .. }) => {
                out.push((EventKind::Maintenance(MaintenanceEvent::NodeUpgradeFailed), n.clone(), format!("rollout {id}: {node} failed {target}: {failure}")));
                out.push((EventKind::Maintenance(MaintenanceEvent::NodeRolledBack), n, format!("rollout {id}: {node} stayed on its version")));
            }
            (Some(NodePhase::RollingBack { .. }), NodePhase::Failed { rolled_back: true, .. }) => {
                out.push((EventKind::Maintenance(MaintenanceEvent::NodeRolledBack), n, format!("rollout {id}: {node} rolled back and up again")))
            }
            (Some(NodePhase::RollingBack { .. }), NodePhase::Failed { rolled_back: false, .. }) => out.push((
                EventKind::Maintenance(MaintenanceEvent::NodeUpgradeFailed),
                n,
                format!("rollout {id}: {node} did not come back after the roll-back; it needs an operator"),
            )),
            _ => {}
        }
    }
    for a in actions {
        match a {
            Action::Paused { reason } => out.push((
                EventKind::Maintenance(MaintenanceEvent::RolloutPaused),
                None,
                format!("rollout {id} paused: {reason}"),
            )),
            Action::Done {
                succeeded,
                failed,
                skipped,
            } => out.push((
                EventKind::Maintenance(MaintenanceEvent::RolloutDone),
                None,
                format!(
                    "rollout {id} done: {succeeded} succeeded, {failed} failed, {skipped} skipped"
                ),
            )),
            _ => {}
        }
    }
    if let (Some(b), RolloutState::Aborted { .. }) = (before, after.state()) {
        if after.is_finished() && !b.is_finished() {
            out.push((
                EventKind::Maintenance(MaintenanceEvent::RolloutDone),
                None,
                format!("rollout {id} aborted; nothing in flight any more"),
            ));
        }
    }
    out
}

/// What `upgrade start` asks for.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// What to install.
    pub target: Target,
    /// Which nodes (all, without one).
    pub selector: Option<Selector>,
    /// N.
    pub max_unavailable: u32,
    /// K.
    pub max_failures: u32,
    /// The window to run in; `None` runs at once.
    pub window: Option<String>,
    /// Per-node deadline; `None` for the planner's default (15 min).
    pub upgrade_deadline: Option<Duration>,
    /// Agent targets: nodes may go to an older version than they run (`--allow-downgrade`).
    pub allow_downgrade: bool,
}

impl Controller {
    /// The maintenance hub.
    pub fn maintenance(&self) -> &Maintenance {
        &self.maint
    }

    /// Installs the upgrader for one kind of target (the agent-update path and the netboot image
    /// executor install theirs; tests install fakes).
    pub fn set_upgrader(&self, kind: TargetKind, upgrader: Arc<dyn NodeUpgrader>) {
        self.maint.set_upgrader(kind, upgrader);
    }

    /// Starts a rollout: the node set is the fleet's nodes matching the selector, now; nodes on
    /// which the target failed before are skipped. Persisted with a `rollout_started` event; the
    /// driver starts nodes at its next tick (woken at once).
    pub fn start_rollout(&self, req: StartRequest) -> Result<Rollout, MaintError> {
        let m = &self.maint;
        let kind = match req.target {
            Target::Agent(_) => "agent",
            Target::Action(_) => "maintenance action",
            _ => "image",
        };
        if let Target::Action(MaintenanceAction::Exec { argv }) = &req.target {
            if !argv.first().is_some_and(|p| p.starts_with('/')) {
                return Err(MaintError::BadAction("exec needs the absolute path of a program the agents allow (--allow-exec PATH)".into()));
            }
        }
        if req.allow_downgrade && !matches!(req.target, Target::Agent(_)) {
            return Err(MaintError::DowngradeNotAgent);
        }
        if m.upgrader(&req.target).is_none() {
            return Err(MaintError::NoUpgrader(kind));
        }
        if let Target::Image(v) = &req.target {
            self.netboot
                .images
                .get(v)
                .map_err(|e| MaintError::UnknownImage {
                    version: v.clone(),
                    cause: e.to_string(),
                })?;
        }
        let nodes: Vec<NodeRecord> = self
            .store
            .nodes()?
            .into_iter()
            .filter(|n| req.selector.as_ref().is_none_or(|s| s.matches(&n.labels)))
            .collect();
        if let Some(name) = &req.window {
            let w = m
                .window(name)?
                .ok_or_else(|| MaintError::UnknownWindow(name.clone()))?;
            let outside: Vec<String> = nodes
                .iter()
                .filter(|n| !w.applies_to(&n.labels))
                .map(|n| n.id.0.clone())
                .collect();
            if !outside.is_empty() {
                return Err(MaintError::OutsideWindow {
                    window: name.clone(),
                    selector: w.selector_text().unwrap_or_default(),
                    nodes: outside,
                });
            }
        }
        let _g = lock(&m.lock);
        let all = m.rollouts()?;
        for r in all.iter().filter(|r| !r.is_finished()) {
            if let Some(n) = nodes
                .iter()
                .find(|n| r.phase(&n.id).is_some_and(|p| !p.settled()))
            {
                return Err(MaintError::Overlap {
                    rollout: r.id().to_owned(),
                    node: n.id.0.clone(),
                });
            }
        }
        let id = format!(
            "r{}",
            all.iter()
                .map(|r| rollout_number(r.id()))
                .max()
                .unwrap_or(0)
                + 1
        );
        let mut spec = RolloutSpec::new(req.target.clone());
        spec.selector = req.selector.clone();
        spec.max_unavailable = req.max_unavailable;
        spec.max_failures = req.max_failures;
        spec.window = req.window.clone();
        if let Some(d) = req.upgrade_deadline {
            spec.upgrade_deadline = d;
            spec.rollback_deadline = d;
        } else if matches!(req.target, Target::Action(_)) {
            // The agent's own --maintenance-timeout is 30 min by default; hooks and a reboot on
            // top.
            spec.upgrade_deadline = ACTION_DEADLINE;
        }
        let now = m.clock.now();
        let mut failed_before = m.failed_before(&req.target)?;
        if req.allow_downgrade {
            // A node that refused this version only because the rollout did not allow a downgrade
            // (its latest report says so) is not skipped by one that does: its remembered failure
            // is forgotten, as `upgrade retry` would.
            let lacked_permission: Vec<NodeId> = failed_before
                .iter()
                .filter(|n| {
                    self.agent_update(n)
                        .and_then(|u| u.report)
                        .is_some_and(|r| {
                            r.attempted.as_deref() == Some(req.target.version())
                                && matches!(
                                    r.failure,
                                    Some(shoal_proto::UpdateFailure::Downgrade { .. })
                                )
                        })
                })
                .cloned()
                .collect();
            for n in lacked_permission {
                m.store.check_space()?;
                m.failed.remove(failed_key(&n, &req.target))?;
                failed_before.remove(&n);
            }
        }
        let rollout = Rollout::new(
            id.clone(),
            spec,
            nodes.iter().map(|n| n.id.clone()),
            &failed_before,
            now,
        )?
        .allowing_downgrade(req.allow_downgrade);
        let msg = format!(
            "rollout {id} started: {} on {} node(s){}, max {} unavailable, pause after {} failure(s), {}{}",
            req.target,
            rollout.nodes().len(),
            req.selector.as_ref().map(|s| format!(" matching {s}")).unwrap_or_default(),
            req.max_unavailable,
            req.max_failures,
            req.window.as_ref().map(|w| format!("in window {w}")).unwrap_or_else(|| "now".into()),
            if req.allow_downgrade { ", downgrades allowed" } else { "" },
        );
        m.save(
            None,
            &rollout,
            &[],
            vec![(
                EventKind::Maintenance(MaintenanceEvent::RolloutStarted),
                None,
                msg,
            )],
            now,
        )?;
        // Nothing of it can have been lost by a restart.
        lock(&m.resent).insert(id.clone());
        info!(rollout = %id, target = %req.target, nodes = rollout.nodes().len(), "rollout started");
        drop(_g);
        m.wake.notify_one();
        Ok(rollout)
    }

    /// An operator's command on a rollout (`current` for the newest active one). `Retry` also
    /// forgets the remembered failure of the target on that node.
    pub fn rollout_command(&self, id: &str, command: Command) -> Result<Rollout, MaintError> {
        let m = &self.maint;
        let _g = lock(&m.lock);
        let before = m.rollout(id)?;
        let now = m.clock.now();
        let mut after = before.clone();
        let actions = after.command(command.clone(), now)?;
        let (kind, what) = match &command {
            Command::Pause => (
                EventKind::Maintenance(MaintenanceEvent::RolloutPaused),
                "paused by an operator".to_owned(),
            ),
            Command::Resume => (
                EventKind::Maintenance(MaintenanceEvent::RolloutResumed),
                "resumed".to_owned(),
            ),
            Command::Abort => (
                EventKind::Maintenance(MaintenanceEvent::RolloutAborted),
                "aborted; nodes in flight finish".to_owned(),
            ),
            Command::Retry(n) => (
                EventKind::Maintenance(MaintenanceEvent::RolloutResumed),
                format!("retries {n}"),
            ),
        };
        let node = match &command {
            Command::Retry(n) => Some(n.clone()),
            _ => None,
        };
        // A pause by an operator comes back as an action too; the explicit event is enough.
        let actions: Vec<Action> = actions
            .into_iter()
            .filter(|a| !matches!(a, Action::Paused { .. }))
            .collect();
        if before != after {
            if let Command::Retry(n) = &command {
                m.store.check_space()?;
                m.failed.remove(failed_key(n, &after.spec().target))?;
            }
            m.save(
                Some(&before),
                &after,
                &actions,
                vec![(kind, node, format!("rollout {} {what}", after.id()))],
                now,
            )?;
            info!(rollout = %after.id(), command = ?command, "rollout command");
        }
        drop(_g);
        m.wake.notify_one();
        Ok(after)
    }

    /// A node's update news for every unfinished rollout that holds it: the entry point for the
    /// agent update path (acknowledgement, report with health, refusal). Persisted before acting.
    /// On a controller that does not lead, the news goes to the leader (over the mesh), which
    /// applies it; news that cannot go now is dropped with a warning — the leader's driver sees
    /// the node's version and health in its presence and settles the node from that.
    pub fn rollout_event(&self, event: Event) -> Result<(), MaintError> {
        if self.cluster.is_clustered() && !self.cluster.is_leader() {
            let mut key = now_ms().0.to_be_bytes().to_vec();
            key.extend_from_slice(&rand::random::<[u8; 8]>());
            self.store
                .table(ROLLOUT_INBOX)
                .insert(key, encode("rollout news", &event)?)?;
            if let Some(leader) = self.cluster.leader().leader {
                if !self.mesh.wake_leader(&leader) {
                    debug!(node = %event.node(), leader = %leader, "leader not told of the news now; its next tick applies it");
                }
            }
            return Ok(());
        }
        match self.cluster.as_leader(|| self.apply_rollout_event(event)) {
            Some(result) => result,
            None => Ok(()),
        }
    }

    /// Applies and deletes the news other controllers left in the rollout inbox, oldest first (the
    /// leader's; once at a time, so no news is applied twice).
    pub(crate) fn apply_rollout_inbox(&self) -> Result<usize, MaintError> {
        let _g = lock(&self.maint.inbox_lock);
        let table = self.store.table(ROLLOUT_INBOX);
        let news: Vec<(Vec<u8>, Vec<u8>)> = table
            .scan(crate::store::Scan::all())
            .take(1024)
            .collect::<Result<_, _>>()?;
        let count = news.len();
        for (key, value) in news {
            match decode::<Event>(ROLLOUT_INBOX, &key, &value) {
                Ok(event) => self.apply_rollout_event(event)?,
                Err(e) => warn!(cause = %e, "unreadable rollout news dropped"),
            }
            table.remove(&key)?;
        }
        Ok(count)
    }

    /// [`Controller::rollout_event`] on the leader.
    pub(crate) fn apply_rollout_event(&self, event: Event) -> Result<(), MaintError> {
        let m = &self.maint;
        let _g = lock(&m.lock);
        let now = m.clock.now();
        let node = event.node().clone();
        for before in m
            .rollouts()?
            .into_iter()
            .filter(|r| !r.is_finished() && r.phase(&node).is_some())
        {
            let mut after = before.clone();
            let actions = after.handle(event.clone(), now);
            if after != before {
                m.save(Some(&before), &after, &actions, Vec::new(), now)?;
                self.carry_out(&mut after, actions, now)?;
            }
        }
        Ok(())
    }

    /// The fleet as a rollout of `target` sees it; `busy` = in flight in another rollout.
    fn observe(&self, target: &Target, busy: &BTreeSet<NodeId>) -> Result<Fleet, StoreError> {
        let records = self.store.nodes()?;
        // Agent targets: a v4 agent's health is its latest update report (see
        // `agent::report_healthy`).
        // Every connected node, on this controller or another of the cluster.
        let presence = self.presence();
        let reports: BTreeMap<NodeId, shoal_proto::UpdateReport> = match target {
            Target::Agent(_) => presence
                .iter()
                .filter_map(|(n, p)| Some((n.clone(), p.update.clone()?)))
                .collect(),
            _ => BTreeMap::new(),
        };
        Ok(records
            .into_iter()
            .map(|rec| {
                let conn = presence.get(&rec.id);
                let protocol = conn.and_then(|c| c.protocol);
                let up = protocol.is_some();
                let version = observed_version(target, &rec);
                // A v4 agent reports its health checks (at every session start and on change):
                // until the report for the version (agent) or image it runs has arrived it is not
                // healthy yet. Older agents: a connected node counts as healthy.
                let healthy = match target {
                    Target::Agent(_)
                        if protocol
                            .is_some_and(|p| p >= crate::releases::updates::UPDATE_PROTOCOL) =>
                    {
                        reports.get(&rec.id).is_some_and(|r| {
                            r.running == rec.agent_version && agent::report_healthy(r)
                        })
                    }
                    Target::Image(_) => image::image_healthy(
                        protocol,
                        conn.and_then(|c| c.boot.as_ref()),
                        version.as_deref(),
                    ),
                    _ => true,
                };
                let o = Observed {
                    version,
                    labels: rec.labels.clone(),
                    up,
                    healthy,
                    busy: busy.contains(&rec.id),
                };
                (rec.id, o)
            })
            .collect())
    }

    /// Carries out actions (already persisted). A begin that cannot go out fails the node as
    /// refused, which is persisted in turn.
    fn carry_out(
        &self,
        rollout: &mut Rollout,
        actions: Vec<Action>,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        let m = &self.maint;
        let mut queue = actions;
        let mut rounds = 0;
        while !queue.is_empty() && rounds < 8 {
            rounds += 1;
            let mut refused = Vec::new();
            for a in queue.drain(..) {
                match a {
                    Action::BeginUpgrade { node, target } => {
                        let options = BeginOptions {
                            allow_downgrade: rollout.allow_downgrade(),
                        };
                        let result = match m.upgrader(&target) {
                            Some(u) => u.begin_with(&node, &target, &options),
                            None => Err(UpgradeError::Failed(format!("no upgrader for {target}"))),
                        };
                        if let Err(e) = result {
                            warn!(rollout = %rollout.id(), node = %node, cause = %e, "could not send the upgrade");
                            refused.push(Event::Refused {
                                node,
                                reason: e.to_string(),
                            });
                        }
                    }
                    Action::RollBack { node, to, target } => {
                        let result = match m.upgrader(&target) {
                            Some(u) => u.roll_back(&node, to.as_deref(), &target),
                            None => Err(UpgradeError::Failed(format!("no upgrader for {target}"))),
                        };
                        if let Err(e) = result {
                            // The roll-back deadline decides: back in time, or "needs an operator".
                            warn!(rollout = %rollout.id(), node = %node, cause = %e, "could not send the roll-back");
                        }
                    }
                    _ => {}
                }
            }
            for ev in refused {
                let before = rollout.clone();
                let more = rollout.handle(ev, now);
                m.save(Some(&before), rollout, &more, Vec::new(), now)?;
                queue.extend(more);
            }
        }
        Ok(())
    }

    /// One pass of the driver over every unfinished rollout. Blocking (store writes, upgrader
    /// calls).
    pub fn rollout_tick(&self) {
        if self.cluster.is_clustered() {
            if let Err(e) = self.apply_rollout_inbox() {
                warn!(cause = %e, "rollout news not applied; retrying at the next tick");
            }
        }
        if let Err(e) = self.try_rollout_tick() {
            warn!(cause = %e, "rollout driver pass failed; retrying at the next tick");
        }
    }

    fn try_rollout_tick(&self) -> Result<(), StoreError> {
        let m = &self.maint;
        let _g = lock(&m.lock);
        let now = m.clock.now();
        // A rollout whose kind of target has no upgrader (yet: it is installed after start) waits;
        // its nodes are not failed for it.
        let mut rollouts: Vec<Rollout> = m
            .rollouts()?
            .into_iter()
            .filter(|r| !r.is_finished() && m.upgrader(&r.spec().target).is_some())
            .collect();
        for r in rollouts.iter_mut() {
            if lock(&m.resent).insert(r.id().to_owned()) {
                let again = r.resend_after_restart();
                if !again.is_empty() {
                    info!(rollout = %r.id(), commands = again.len(), "repeating commands a restart may have lost");
                    self.carry_out(r, again, now)?;
                }
            }
        }
        let budgets = m.budgets()?;
        for i in 0..rollouts.len() {
            let busy: BTreeSet<NodeId> = rollouts
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .flat_map(|(_, r)| {
                    r.nodes()
                        .iter()
                        .filter(|(_, p)| p.in_flight())
                        .map(|(n, _)| n.clone())
                })
                .collect();
            let before = rollouts[i].clone();
            let mut r = before.clone();
            let target = r.spec().target.clone();
            let fleet = self.observe(&target, &busy)?;
            let mut actions = Vec::new();
            // Nodes that came back: on the target (success) or, rolling back, on another version.
            let news: Vec<Event> = r
                .nodes()
                .iter()
                .filter_map(|(node, phase)| {
                    let o = fleet.get(node)?;
                    let version = o.version.clone()?;
                    let back = match phase {
                        NodePhase::Upgrading { .. } => version == target.version(),
                        NodePhase::RollingBack { .. } => version != target.version(),
                        _ => false,
                    };
                    (back && o.up && o.healthy).then(|| Event::Reported {
                        node: node.clone(),
                        version,
                        health: ReportedHealth::Healthy,
                    })
                })
                .collect();
            for ev in news {
                actions.extend(r.handle(ev, now));
            }
            let window: Box<dyn WindowCheck> = match &r.spec().window {
                None => Box::new(AlwaysOpen),
                Some(name) => match m.window(name)? {
                    Some(w) => Box::new(w),
                    None => Box::new(|_: UnixMillis| None),
                },
            };
            actions.extend(r.poll(&fleet, &budgets, window.as_ref(), now));
            if r != before || !actions.is_empty() {
                m.save(Some(&before), &r, &actions, Vec::new(), now)?;
                self.carry_out(&mut r, actions, now)?;
            }
            rollouts[i] = r;
        }
        Ok(())
    }
}

/// The rollout driver: polls every unfinished rollout every `tick`, and at once when woken. Runs
/// until the task is aborted.
pub async fn run_driver(controller: Arc<Controller>, tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = controller.maint.wake.notified() => {}
        }
        let c = controller.clone();
        // The leader's work: skipped on a follower, fenced on the leader.
        let _ = tokio::task::spawn_blocking(move || c.cluster.as_leader(|| c.rollout_tick())).await;
    }
}
