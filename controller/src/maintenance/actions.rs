//! The maintenance action executor: a [`NodeUpgrader`] for [`Target::Action`] (`shoalctl
//! maintenance run`). A maintenance run *is* a rollout; the planner decides which node goes next
//! (max-unavailable, budgets, window, busy nodes, max-failures) and this executor walks each
//! started node through three steps over protocol 4 ([`ControllerMsg::Maintenance`], answered by
//! `AgentMsg::MaintenanceResult`):
//!
//! | step | agent | then | sub-phase, event |
//! |---|---|---|---|
//! | `Cordon` | pre-hook (`--pre-hook`), nothing without one | `Act` | `cordoning` → `node_cordoned` |
//! | `Act` | the action: `exec` (allow-listed), `smart-test`, `reboot` | `Uncordon` | `in-maintenance` → `node_in_maintenance` |
//! | `Uncordon` | post-hook (`--post-hook`) | planner: `Reported { Healthy }` | `uncordoning` → `up`, `node_up` |
//!
//! Mapping to the planner:
//!
//! - `Cordon` done → [`Event::Acknowledged`] (the node took the run; a restarted controller does
//!   not start it over). `Cordon` failed → [`Event::Refused`]: the node is failed without a
//!   roll-back; the agent itself runs the post-hook after a failed pre-hook, to undo a partial
//!   drain, and refuses an `exec` that is not on its allow-list already here, before any hook runs.
//! - `Act` failed (non-zero exit, timeout, not allowed, reboot refused) → [`Event::Failed`]: the
//!   planner rolls the node back, which for an action is [`NodeUpgrader::roll_back`] = send
//!   `Uncordon`, so the node is not left drained; its post-hook done → [`Event::Restored`] (failed,
//!   rolled back).
//! - `Act` of a reboot answers `Rebooting` → `node_rebooting` event; the node drops off. When it
//!   reconnects, the controller repeats the current step ([`Controller::maintenance_reconnected`])
//!   and the agent answers it from its record: done if the boot id changed (a new boot), failed if
//!   the agent restarted on the same boot (the machine did not reboot).
//! - `Uncordon` done → `node_up` and [`Event::Reported`] healthy on the action: succeeded.
//!   `Uncordon` failed → [`Event::Failed`] (its roll-back repeats the post-hook once); failing
//!   while rolling back is left to the roll-back deadline ("needs an operator").
//!
//! The current step of every node in flight is kept in the store tree `maintenance_steps` (run ‖ 0
//! ‖ node → [`StepRecord`]), written before the step is sent: a restarted controller repeats the
//! step when the node reconnects (every agent reconnects after a controller restart), and `begin`,
//! repeated by [`shoal_controller_core::rollout::Rollout::resend_after_restart`] for unacknowledged nodes, resends
//! the current step instead of starting over. The agent treats a repeated step it completed as
//! done.
//!
//! Failures of actions are not remembered in `failed_versions` ([`Target::remembers_failures`]).

use crate::store::MaintenanceEvent;
use std::sync::{Arc, Weak};

use serde::{Deserialize, Serialize};
use shoal_proto::{
    ControllerMsg, MaintenanceAction, MaintenanceResult, MaintenanceStep, NodeId, StepKind,
    StepOutcome, UnixMillis,
};
use tracing::{debug, info, warn};

use super::{NodeUpgrader, TargetKind, UpgradeError};
use crate::{
    releases::updates::{UpdateError, UPDATE_PROTOCOL},
    server::now_ms,
    server::Controller,
    store::decode,
    store::encode,
    store::EventKind,
    store::RawTable,
    store::StoreError,
};
use shoal_controller_core::rollout::{Event, NodePhase, ReportedHealth, Target};

/// The store tree of steps in flight.
pub const STEPS: &str = "maintenance_steps";

/// Where a node is in its maintenance, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The run (rollout id).
    pub run: String,
    /// The node.
    pub node: NodeId,
    /// The run's action.
    pub action: MaintenanceAction,
    /// The step sent last.
    pub step: StepKind,
    /// Whether that step is done (only `Uncordon` stays recorded once done: the node is `up`).
    pub done: bool,
    /// `Act` of a reboot was acknowledged: the node is going down or booting.
    pub rebooting: bool,
    /// The step is part of a roll-back (the post-hook after a failed action).
    pub rolling_back: bool,
    /// When the step was sent.
    pub since: UnixMillis,
    /// The last outcome's text (output tail, error).
    pub detail: String,
}

impl StepRecord {
    /// The sub-phase for status output: `cordoning`, `refused` (pre-hook failed, or the action is
    /// not allowed there), `in-maintenance`, `rebooting`, `uncordoning`, `up`.
    pub fn sub_phase(&self) -> &'static str {
        match (self.step, self.done) {
            (StepKind::Cordon, false) => "cordoning",
            (StepKind::Cordon, true) => "refused",
            (StepKind::Act, _) if self.rebooting => "rebooting",
            (StepKind::Act, _) => "in-maintenance",
            (StepKind::Uncordon, false) => "uncordoning",
            (StepKind::Uncordon, true) => "up",
        }
    }
}

fn key(run: &str, node: &NodeId) -> Vec<u8> {
    let mut k = run.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(node.0.as_bytes());
    k
}

/// See the module docs.
#[derive(Debug)]
pub struct ActionRunner {
    controller: Weak<Controller>,
}

impl ActionRunner {
    fn ctl(&self) -> Result<Arc<Controller>, UpgradeError> {
        self.controller
            .upgrade()
            .ok_or_else(|| UpgradeError::Failed("the controller is shutting down".into()))
    }
}

fn store_err(e: StoreError) -> UpgradeError {
    UpgradeError::Failed(e.to_string())
}

impl NodeUpgrader for ActionRunner {
    fn begin(&self, node: &NodeId, target: &Target) -> Result<(), UpgradeError> {
        let ctl = self.ctl()?;
        let Target::Action(action) = target else {
            return Err(UpgradeError::Failed(format!(
                "the action executor cannot carry out {target}"
            )));
        };
        let run = ctl.run_holding(node, target).map_err(store_err)?;
        // Repeated after a restart: go on where the node was, do not start over.
        if let Some(rec) = ctl.step_record(&run, node).map_err(store_err)? {
            if !rec.rolling_back && !rec.done {
                return ctl.send_step(&rec);
            }
        }
        let rec = StepRecord {
            run,
            node: node.clone(),
            action: action.clone(),
            step: StepKind::Cordon,
            done: false,
            rebooting: false,
            rolling_back: false,
            since: now_ms(),
            detail: String::new(),
        };
        ctl.check_step_protocol(node)?;
        ctl.put_step(&rec).map_err(store_err)?;
        ctl.send_step(&rec)
    }

    fn roll_back(
        &self,
        node: &NodeId,
        _to: Option<&str>,
        target: &Target,
    ) -> Result<(), UpgradeError> {
        let ctl = self.ctl()?;
        let Target::Action(action) = target else {
            return Err(UpgradeError::Failed(format!(
                "the action executor cannot roll back {target}"
            )));
        };
        let run = ctl.run_holding(node, target).map_err(store_err)?;
        let rec = StepRecord {
            run,
            node: node.clone(),
            action: action.clone(),
            step: StepKind::Uncordon,
            done: false,
            rebooting: false,
            rolling_back: true,
            since: now_ms(),
            detail: String::new(),
        };
        ctl.put_step(&rec).map_err(store_err)?;
        ctl.send_step(&rec)
    }
}

impl Controller {
    /// Installs [`ActionRunner`] for [`TargetKind::Action`] (done by [`Controller::open`]).
    pub fn install_action_runner(self: &Arc<Self>) {
        self.set_upgrader(
            TargetKind::Action,
            Arc::new(ActionRunner {
                controller: Arc::downgrade(self),
            }),
        );
    }

    fn steps_tree(&self) -> Result<RawTable, StoreError> {
        Ok(self.store.table(STEPS))
    }

    /// The unfinished rollout of `target` that has `node` in flight (the run's id).
    fn run_holding(&self, node: &NodeId, target: &Target) -> Result<String, StoreError> {
        let all = self.maint.rollouts()?;
        let run = all
            .iter()
            .rev()
            .find(|r| {
                !r.is_finished()
                    && r.spec().target == *target
                    && r.phase(node).is_some_and(NodePhase::in_flight)
            })
            .or_else(|| {
                all.iter()
                    .rev()
                    .find(|r| r.spec().target == *target && r.phase(node).is_some())
            });
        Ok(run.map(|r| r.id().to_owned()).unwrap_or_else(|| "?".into()))
    }

    /// The stored step of `node` in `run`.
    pub fn step_record(&self, run: &str, node: &NodeId) -> Result<Option<StepRecord>, StoreError> {
        match self.steps_tree()?.get(key(run, node))? {
            Some(v) => Ok(Some(decode(STEPS, &key(run, node), &v)?)),
            None => Ok(None),
        }
    }

    /// Every stored step of a run, by node (for `maintenance status`).
    pub fn step_records(&self, run: &str) -> Result<Vec<StepRecord>, StoreError> {
        let mut prefix = run.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.steps_tree()?.scan_prefix(prefix) {
            let (k, v) = item?;
            out.push(decode(STEPS, &k, &v)?);
        }
        Ok(out)
    }

    fn put_step(&self, rec: &StepRecord) -> Result<(), StoreError> {
        self.store.check_space()?;
        let tree = self.steps_tree()?;
        tree.insert(key(&rec.run, &rec.node), encode("maintenance step", rec)?)?;
        tree.flush()?;
        Ok(())
    }

    fn check_step_protocol(&self, node: &NodeId) -> Result<(), UpgradeError> {
        let protocol = self
            .session_protocol(node)
            .ok_or_else(|| UpgradeError::NotConnected(node.clone()))?;
        if protocol < UPDATE_PROTOCOL {
            return Err(UpgradeError::Unsupported {
                node: node.clone(),
                why: format!("agent too old for maintenance actions (protocol {protocol})"),
            });
        }
        Ok(())
    }

    /// Sends the record's step on the node's connection.
    fn send_step(&self, rec: &StepRecord) -> Result<(), UpgradeError> {
        let msg = ControllerMsg::Maintenance(MaintenanceStep {
            run: rec.run.clone(),
            action: rec.action.clone(),
            step: rec.step,
        });
        self.send_v4(&rec.node, msg).map_err(|e| match e {
            UpdateError::AgentTooOld { node, protocol } => UpgradeError::Unsupported {
                node,
                why: format!("agent too old for maintenance actions (protocol {protocol})"),
            },
            other => other.into(),
        })?;
        debug!(node = %rec.node, run = %rec.run, step = rec.step.as_str(), "maintenance step sent");
        Ok(())
    }

    fn step_event(&self, node: &NodeId, kind: EventKind, message: String) {
        let host = self.store.hostname_or_id(node);
        if let Err(e) =
            self.store
                .append_event(kind, Some(node), &format!("{host}: {message}"), now_ms())
        {
            warn!(node = %node, cause = %e, "could not record a maintenance event");
        }
    }

    fn feed(&self, event: Event) {
        let node = event.node().clone();
        if let Err(e) = self.rollout_event(event) {
            warn!(node = %node, cause = %e, "could not feed a maintenance result to its run");
        }
    }

    /// (v4) A node reconnected: repeat the current step of every run that holds it (a step lost
    /// with the old connection or a controller restart; after a reboot, the agent answers the
    /// repeated `Act` from its new boot). Blocking (store).
    pub fn maintenance_reconnected(&self, node: &NodeId) {
        let Ok(tree) = self.steps_tree() else { return };
        for item in tree.iter().flatten() {
            let Ok(rec) = decode::<StepRecord>(STEPS, &item.0, &item.1) else {
                continue;
            };
            if rec.node != *node || rec.done {
                continue;
            }
            let still = self
                .maint
                .rollout(&rec.run)
                .ok()
                .is_some_and(|r| r.phase(node).is_some_and(NodePhase::in_flight));
            if !still {
                continue;
            }
            info!(node = %node, run = %rec.run, step = rec.step.as_str(), "node reconnected; repeating its maintenance step");
            if let Err(e) = self.send_step(&rec) {
                warn!(node = %node, cause = %e, "could not repeat the maintenance step");
            }
        }
    }

    /// (v4) A node's answer to a maintenance step. Blocking (store, planner).
    pub fn maintenance_result(&self, node: &NodeId, result: MaintenanceResult) {
        let rec = match self.step_record(&result.run, node) {
            Ok(Some(rec)) if rec.step == result.step && !rec.done => rec,
            Ok(_) => {
                debug!(node = %node, run = %result.run, step = result.step.as_str(), "stale maintenance result ignored");
                return;
            }
            Err(e) => {
                warn!(node = %node, cause = %e, "cannot read the maintenance step");
                return;
            }
        };
        info!(node = %node, run = %rec.run, step = rec.step.as_str(), outcome = ?result.outcome, "maintenance step answered");
        let run = rec.run.clone();
        let what = rec.action.to_string();
        let advance = |rec: &StepRecord, step: StepKind, detail: String| -> StepRecord {
            StepRecord {
                step,
                done: false,
                rebooting: false,
                since: now_ms(),
                detail,
                ..rec.clone()
            }
        };
        let store_then_send = |next: &StepRecord| {
            if let Err(e) = self.put_step(next) {
                warn!(node = %node, cause = %e, "cannot store the maintenance step");
                return;
            }
            if let Err(e) = self.send_step(next) {
                // The node dropped off: the step is repeated when it reconnects; the run's deadline
                // holds meanwhile.
                warn!(node = %node, cause = %e, "could not send the next maintenance step");
            }
        };
        match (result.step, result.outcome) {
            (StepKind::Cordon, StepOutcome::Done(out)) => {
                self.step_event(
                    node,
                    EventKind::Maintenance(MaintenanceEvent::NodeCordoned),
                    format!("run {run}: cordoned for {what}{}", suffix(&out)),
                );
                let next = advance(&rec, StepKind::Act, String::new());
                store_then_send(&next);
                self.step_event(
                    node,
                    EventKind::Maintenance(MaintenanceEvent::NodeInMaintenance),
                    format!("run {run}: in maintenance: {what}"),
                );
                self.feed(Event::Acknowledged { node: node.clone() });
            }
            (StepKind::Cordon, StepOutcome::Failed(why) | StepOutcome::Rebooting(why)) => {
                // The agent's words say which: its pre-hook failed, or the action is not allowed
                // there.
                let reason = why;
                self.step_event(
                    node,
                    EventKind::Maintenance(MaintenanceEvent::NodeMaintenanceFailed),
                    format!("run {run}: refused: {reason}"),
                );
                let _ = self.put_step(&StepRecord {
                    done: true,
                    detail: reason.clone(),
                    ..rec
                });
                self.feed(Event::Refused {
                    node: node.clone(),
                    reason,
                });
            }
            (StepKind::Act, StepOutcome::Rebooting(method)) => {
                if !rec.rebooting {
                    self.step_event(
                        node,
                        EventKind::Maintenance(MaintenanceEvent::NodeRebooting),
                        format!("run {run}: rebooting ({method})"),
                    );
                    let _ = self.put_step(&StepRecord {
                        rebooting: true,
                        detail: format!("rebooting ({method})"),
                        ..rec
                    });
                }
            }
            (StepKind::Act, StepOutcome::Done(out)) => {
                let next = advance(&rec, StepKind::Uncordon, out);
                store_then_send(&next);
            }
            (StepKind::Act, StepOutcome::Failed(why)) => {
                self.step_event(
                    node,
                    EventKind::Maintenance(MaintenanceEvent::NodeMaintenanceFailed),
                    format!("run {run}: {what} failed: {why}"),
                );
                let _ = self.put_step(&StepRecord {
                    detail: why.clone(),
                    ..rec
                });
                // The planner answers with a roll-back: `roll_back` sends Uncordon.
                self.feed(Event::Failed {
                    node: node.clone(),
                    reason: why,
                });
            }
            (StepKind::Uncordon, StepOutcome::Done(out)) => {
                let detail = if rec.detail.is_empty() {
                    out
                } else {
                    rec.detail.clone()
                };
                let message = if rec.rolling_back {
                    format!("run {run}: up again after the failed {what} (post-hook ran)")
                } else {
                    format!("run {run}: up after {what}{}", suffix(&detail))
                };
                self.step_event(
                    node,
                    EventKind::Maintenance(MaintenanceEvent::NodeUp),
                    message,
                );
                let _ = self.put_step(&StepRecord {
                    done: true,
                    detail,
                    ..rec.clone()
                });
                if rec.rolling_back {
                    self.feed(Event::Restored { node: node.clone() });
                } else {
                    let version = Target::Action(rec.action.clone()).version().to_owned();
                    self.feed(Event::Reported {
                        node: node.clone(),
                        version,
                        health: ReportedHealth::Healthy,
                    });
                }
            }
            (StepKind::Uncordon, StepOutcome::Failed(why) | StepOutcome::Rebooting(why)) => {
                let reason = format!("post-hook failed: {why}");
                self.step_event(
                    node,
                    EventKind::Maintenance(MaintenanceEvent::NodeMaintenanceFailed),
                    format!("run {run}: {reason}"),
                );
                let _ = self.put_step(&StepRecord {
                    detail: reason.clone(),
                    ..rec.clone()
                });
                if !rec.rolling_back {
                    self.feed(Event::Failed {
                        node: node.clone(),
                        reason,
                    });
                }
            }
        }
    }
}

fn suffix(out: &str) -> String {
    let out = out.trim();
    if out.is_empty() {
        String::new()
    } else {
        format!(": {}", out.lines().last().unwrap_or(out))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{maintenance::StartRequest, server::ControllerConfig};
    use shoal_controller_core::rollout::Rollout;
    use shoal_controller_core::selector::parse_selector;

    struct Fixture {
        ctl: Arc<Controller>,
        rx: HashMap<NodeId, (u64, crate::connections::queue::NodeRx)>,
        _rt: tokio::runtime::Runtime,
    }

    impl Fixture {
        fn open(dir: &std::path::Path) -> Fixture {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let config = ControllerConfig::for_tests(dir.to_owned());
            let ctl = {
                let _enter = rt.enter();
                Controller::open(config, "127.0.0.1:1".parse().unwrap()).unwrap()
            };
            Fixture {
                ctl,
                rx: HashMap::new(),
                _rt: rt,
            }
        }

        fn nodes(&mut self, prefix: &str, count: usize, labels: &[(&str, &str)]) -> Vec<NodeId> {
            (0..count)
                .map(|i| {
                    let id = crate::test_support::enrol_for_tests(
                        &self.ctl.store,
                        &format!("{prefix}{i}"),
                        labels,
                        now_ms(),
                    );
                    self.connect(&id);
                    id
                })
                .collect()
        }

        fn connect(&mut self, node: &NodeId) {
            if let Some((conn, _)) = self.rx.remove(node) {
                self.ctl.end_fake_connection(node, conn);
            }
            let (conn, rx) = self.ctl.fake_connection(node, 4);
            self.rx.insert(node.clone(), (conn, rx));
            self.ctl.maintenance_reconnected(node);
        }

        fn start(
            &self,
            action: MaintenanceAction,
            selector: &str,
            max_unavailable: u32,
            max_failures: u32,
        ) -> Rollout {
            self.ctl
                .start_rollout(StartRequest {
                    target: Target::Action(action),
                    selector: Some(parse_selector(selector).unwrap()),
                    max_unavailable,
                    max_failures,
                    window: None,
                    upgrade_deadline: None,
                    allow_downgrade: false,
                })
                .unwrap()
        }

        /// The steps sent to `node` since the last call.
        fn sent(&mut self, node: &NodeId) -> Vec<StepKind> {
            let mut out = Vec::new();
            while let Ok(msg) = self.rx.get_mut(node).unwrap().1.try_recv() {
                if let ControllerMsg::Maintenance(s) = msg {
                    out.push(s.step);
                }
            }
            out
        }

        fn answer(&self, node: &NodeId, run: &str, step: StepKind, outcome: StepOutcome) {
            self.ctl.maintenance_result(
                node,
                MaintenanceResult {
                    run: run.into(),
                    step,
                    outcome,
                },
            );
        }

        fn phase(&self, run: &str, node: &NodeId) -> NodePhase {
            self.ctl
                .maint
                .rollout(run)
                .unwrap()
                .phase(node)
                .unwrap()
                .clone()
        }

        fn sub_phase(&self, run: &str, node: &NodeId) -> &'static str {
            self.ctl
                .step_record(run, node)
                .unwrap()
                .unwrap()
                .sub_phase()
        }

        fn events(&self, kind: EventKind) -> Vec<(NodeId, String)> {
            let all = self.ctl.store.events(None, 10_000).unwrap();
            all.into_iter()
                .filter(|e| e.kind == kind)
                .map(|e| (e.node.unwrap(), e.message))
                .collect()
        }

        /// The one node of `nodes` that was sent `Cordon` since the last call.
        fn cordoned(&mut self, nodes: &[NodeId]) -> NodeId {
            let got: Vec<NodeId> = nodes
                .iter()
                .filter(|n| self.sent(n) == vec![StepKind::Cordon])
                .cloned()
                .collect();
            assert_eq!(got.len(), 1, "one node at a time: {got:?}");
            got[0].clone()
        }

        /// Walks a started node (sent `Cordon`) through its three steps, all done.
        fn all_done(&mut self, run: &str, node: &NodeId) {
            self.answer(
                node,
                run,
                StepKind::Cordon,
                StepOutcome::Done("drained".into()),
            );
            assert_eq!(self.sub_phase(run, node), "in-maintenance");
            assert_eq!(self.sent(node), vec![StepKind::Act]);
            self.answer(node, run, StepKind::Act, StepOutcome::Done("fixed".into()));
            assert_eq!(self.sub_phase(run, node), "uncordoning");
            assert_eq!(self.sent(node), vec![StepKind::Uncordon]);
            self.answer(
                node,
                run,
                StepKind::Uncordon,
                StepOutcome::Done(String::new()),
            );
            assert_eq!(self.sub_phase(run, node), "up");
        }
    }

    #[test]
    fn an_action_run_waits_for_a_budget_used_up_by_another_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Fixture::open(dir.path());
        let a = f.nodes("a", 1, &[("role", "etcd"), ("grp", "x")]);
        let b = f.nodes("b", 3, &[("role", "etcd"), ("grp", "y")]);
        f.ctl.maint.set_budget("role=etcd", 1, now_ms()).unwrap();
        // Another run holds the etcd member of group x.
        let other = f.start(exec(), "grp=x", 1, 1).id().to_owned();
        f.ctl.rollout_tick();
        assert_eq!(f.cordoned(&a), a[0]);
        let run = f
            .start(MaintenanceAction::Reboot, "grp=y", 3, 1)
            .id()
            .to_owned();
        f.ctl.rollout_tick();
        for n in &b {
            assert!(
                f.sent(n).is_empty(),
                "the etcd budget is used up by the other run"
            );
        }
        let waiting = f.ctl.maint.rollout(&run).unwrap().waiting().to_vec();
        assert!(
            waiting
                .iter()
                .any(|w| matches!(w, shoal_controller_core::rollout::Waiting::Budget { .. })),
            "{waiting:?}"
        );
        // The other run's node is up again: one etcd member at a time, despite max-unavailable 3.
        f.all_done(&other, &a[0]);
        f.ctl.rollout_tick();
        let first = f.cordoned(&b);
        f.answer(
            &first,
            &run,
            StepKind::Cordon,
            StepOutcome::Done(String::new()),
        );
        f.ctl.rollout_tick();
        for n in &b {
            assert!(
                f.sent(n).iter().all(|s| *s != StepKind::Cordon),
                "still one at a time"
            );
        }
    }

    fn exec() -> MaintenanceAction {
        MaintenanceAction::Exec {
            argv: vec!["/usr/local/bin/fix".into(), "--now".into()],
        }
    }

    #[test]
    fn nodes_go_cordoned_in_maintenance_up_one_at_a_time_and_a_failed_action_runs_the_post_hook() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Fixture::open(dir.path());
        let n = f.nodes("db", 3, &[("role", "db")]);
        let r = f.start(exec(), "role=db", 1, 1);
        assert_eq!(
            r.spec().upgrade_deadline,
            crate::maintenance::ACTION_DEADLINE
        );
        let run = r.id().to_owned();
        f.ctl.rollout_tick();
        let first = f.cordoned(&n);
        assert!(matches!(
            f.phase(&run, &first),
            NodePhase::Upgrading {
                acknowledged: false,
                ..
            }
        ));
        assert_eq!(f.sub_phase(&run, &first), "cordoning");
        f.all_done(&run, &first);
        assert!(matches!(
            f.phase(&run, &first),
            NodePhase::Succeeded { already: false, .. }
        ));
        let up = f.events(EventKind::Maintenance(MaintenanceEvent::NodeUp));
        assert!(
            up.len() == 1
                && up[0].0 == first
                && up[0]
                    .1
                    .contains("up after exec /usr/local/bin/fix --now: fixed"),
            "{up:?}"
        );
        assert_eq!(
            f.events(EventKind::Maintenance(MaintenanceEvent::NodeCordoned))
                .len(),
            1
        );
        assert_eq!(
            f.events(EventKind::Maintenance(MaintenanceEvent::NodeInMaintenance))
                .len(),
            1
        );

        // The second node's action fails: the post-hook runs (roll-back), it settles failed, and
        // the run pauses (max-failures 1). Nothing is remembered against the node for later runs.
        f.ctl.rollout_tick();
        let second = f.cordoned(&n);
        let third = n
            .iter()
            .find(|x| **x != first && **x != second)
            .unwrap()
            .clone();
        let n = [first.clone(), second, third];
        f.answer(
            &n[1],
            &run,
            StepKind::Cordon,
            StepOutcome::Done(String::new()),
        );
        assert!(matches!(
            f.phase(&run, &n[1]),
            NodePhase::Upgrading {
                acknowledged: true,
                ..
            }
        ));
        assert_eq!(f.sent(&n[1]), vec![StepKind::Act]);
        // A stale answer (wrong step) changes nothing.
        f.answer(
            &n[1],
            &run,
            StepKind::Uncordon,
            StepOutcome::Done(String::new()),
        );
        assert!(matches!(f.phase(&run, &n[1]), NodePhase::Upgrading { .. }));
        f.answer(
            &n[1],
            &run,
            StepKind::Act,
            StepOutcome::Failed("/usr/local/bin/fix exited with exit status: 3: disk busy".into()),
        );
        assert!(matches!(
            f.phase(&run, &n[1]),
            NodePhase::RollingBack { .. }
        ));
        assert_eq!(
            f.sent(&n[1]),
            vec![StepKind::Uncordon],
            "the roll-back is the post-hook"
        );
        f.answer(
            &n[1],
            &run,
            StepKind::Uncordon,
            StepOutcome::Done(String::new()),
        );
        match f.phase(&run, &n[1]) {
            NodePhase::Failed {
                rolled_back: true,
                failure,
                ..
            } => assert!(failure.to_string().contains("disk busy"), "{failure}"),
            other => panic!("{other:?}"),
        }
        let r = f.ctl.maint.rollout(&run).unwrap();
        assert!(
            matches!(
                r.state(),
                shoal_controller_core::rollout::RolloutState::Paused { .. }
            ),
            "{:?}",
            r.state()
        );
        assert!(f
            .events(EventKind::Maintenance(
                MaintenanceEvent::NodeMaintenanceFailed
            ))
            .iter()
            .any(|(node, m)| *node == n[1] && m.contains("disk busy")));
        assert!(
            f.ctl.maint.failed_versions().unwrap().is_empty(),
            "action failures are not remembered"
        );
        f.ctl.rollout_tick();
        assert!(f.sent(&n[2]).is_empty(), "paused");
    }

    #[test]
    fn a_failed_pre_hook_refuses_the_node_and_old_agents_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Fixture::open(dir.path());
        let n = f.nodes("k", 1, &[("role", "k3s")]);
        let old =
            crate::test_support::enrol_for_tests(&f.ctl.store, "old", &[("role", "k3s")], now_ms());
        let (_c, _rx) = f.ctl.fake_connection(&old, 3);
        let run = f
            .start(MaintenanceAction::SmartTest, "role=k3s", 2, 5)
            .id()
            .to_owned();
        f.ctl.rollout_tick();
        match f.phase(&run, &old) {
            NodePhase::Failed {
                failure,
                rolled_back: true,
                ..
            } => assert!(failure.to_string().contains("too old"), "{failure}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(f.sent(&n[0]), vec![StepKind::Cordon]);
        f.answer(
            &n[0],
            &run,
            StepKind::Cordon,
            StepOutcome::Failed(
                "the pre-hook exited with 1: kubectl: timeout; the post-hook ran to undo it".into(),
            ),
        );
        match f.phase(&run, &n[0]) {
            NodePhase::Failed {
                failure,
                rolled_back: true,
                ..
            } => assert!(
                failure.to_string().contains("the pre-hook exited"),
                "{failure}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(
            f.sent(&n[0]).is_empty(),
            "nothing more is sent to a refused node"
        );
    }

    #[test]
    fn a_reboot_is_done_when_the_node_answers_from_its_new_boot_and_steps_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Fixture::open(dir.path());
        let n = f.nodes("m", 1, &[("pool", "a")]);
        let run = f
            .start(MaintenanceAction::Reboot, "pool=a", 1, 1)
            .id()
            .to_owned();
        f.ctl.rollout_tick();
        assert_eq!(f.sent(&n[0]), vec![StepKind::Cordon]);
        f.answer(
            &n[0],
            &run,
            StepKind::Cordon,
            StepOutcome::Done(String::new()),
        );
        assert_eq!(f.sent(&n[0]), vec![StepKind::Act]);
        f.answer(
            &n[0],
            &run,
            StepKind::Act,
            StepOutcome::Rebooting("--reboot-command x".into()),
        );
        assert_eq!(f.sub_phase(&run, &n[0]), "rebooting");
        assert_eq!(
            f.events(EventKind::Maintenance(MaintenanceEvent::NodeRebooting))
                .len(),
            1
        );

        // The controller restarts while the node reboots.
        drop(f);
        let mut f = Fixture::open(dir.path());
        f.ctl.rollout_tick();
        assert_eq!(
            f.sub_phase(&run, &n[0]),
            "rebooting",
            "the sub-phase survives the restart"
        );
        // The node is back: the current step is repeated, the agent answers it from its new boot.
        f.connect(&n[0]);
        assert_eq!(f.sent(&n[0]), vec![StepKind::Act]);
        f.answer(
            &n[0],
            &run,
            StepKind::Act,
            StepOutcome::Done("rebooted (boot aaaa → bbbb)".into()),
        );
        assert_eq!(f.sent(&n[0]), vec![StepKind::Uncordon]);
        f.answer(
            &n[0],
            &run,
            StepKind::Uncordon,
            StepOutcome::Done(String::new()),
        );
        assert!(matches!(f.phase(&run, &n[0]), NodePhase::Succeeded { .. }));
        f.ctl.rollout_tick();
        assert!(f.ctl.maint.rollout(&run).unwrap().is_finished());
        let view = crate::maintenance::routes::full_view(
            &f.ctl,
            &f.ctl.maint.rollout(&run).unwrap(),
            &Default::default(),
        )
        .ok()
        .unwrap();
        assert_eq!(view.nodes[0].step.as_deref(), Some("up"));
        assert!(
            view.nodes[0]
                .output
                .as_deref()
                .is_some_and(|o| o.contains("rebooted")),
            "{:?}",
            view.nodes[0]
        );
    }

    #[test]
    fn begin_repeated_after_a_restart_resends_the_current_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Fixture::open(dir.path());
        let n = f.nodes("x", 1, &[("pool", "b")]);
        let run = f.start(exec(), "pool=b", 1, 1).id().to_owned();
        f.ctl.rollout_tick();
        assert_eq!(f.sent(&n[0]), vec![StepKind::Cordon]);
        // Unacknowledged: the planner repeats begin after a restart; the node gets Cordon again,
        // once from the reconnect and once from begin (the agent dedupes).
        drop(f);
        let mut f = Fixture::open(dir.path());
        f.connect(&n[0]);
        f.ctl.rollout_tick();
        assert_eq!(f.sent(&n[0]), vec![StepKind::Cordon, StepKind::Cordon]);
        f.all_done(&run, &n[0]);
        assert!(matches!(f.phase(&run, &n[0]), NodePhase::Succeeded { .. }));
    }
}
