//! The agent update executor: a [`NodeUpgrader`] for [`Target::Agent`] on top of the protocol-4
//! update path ([`crate::releases::updates`]), and the task that turns the agents' acknowledgements and
//! reports into the planner's [`Event`]s.
//!
//! - `begin` = [`Controller::offer_agent_update`] (the stored release for the node's architecture);
//!   a v3 agent is [`UpgradeError::Unsupported`] ("agent too old for remote update"), so the node
//!   is failed as refused and did not change.
//! - `roll_back` = [`Controller::revert_agent`] (the agent restores `<exe>.prev` and re-executes);
//!   nothing is sent when the node already runs the version to go back to, so repeating it after a
//!   restart is harmless.
//! - [`forward_agent_updates`] maps each [`UpdateNotice`] with [`notice_event`] and hands it to
//!   [`Controller::rollout_event`].
//!
//! Health: for a v4 agent the driver's `healthy` is the agent's own verdict, from its latest
//! [`UpdateReport`] ([`report_healthy`]), not just "connected".

use std::sync::{Arc, Weak};

use shoal_proto::{NodeId, UpdateReport};
use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, info, warn};

use super::{BeginOptions, NodeUpgrader, TargetKind, UpgradeError};
use crate::{
    releases::updates::{OfferOptions, UpdateError, UpdateNotice},
    server::Controller,
};
use shoal_controller_core::rollout::{Event, ReportedHealth, Target};

/// See the module docs.
#[derive(Debug)]
pub struct AgentUpgrader {
    controller: Weak<Controller>,
}

impl AgentUpgrader {
    fn controller(&self) -> Result<Arc<Controller>, UpgradeError> {
        self.controller
            .upgrade()
            .ok_or_else(|| UpgradeError::Failed("the controller is shutting down".into()))
    }
}

/// How a node's agent could not be asked (update, revert, reboot, maintenance step) reads to the
/// rollout driver: not connected, too old (protocol < 4), or failed.
impl From<UpdateError> for UpgradeError {
    fn from(e: UpdateError) -> UpgradeError {
        let why = e.to_string();
        match e {
            UpdateError::NotConnected(node) => UpgradeError::NotConnected(node),
            UpdateError::AgentTooOld { node, .. } => UpgradeError::Unsupported { node, why },
            _ => UpgradeError::Failed(why),
        }
    }
}

impl NodeUpgrader for AgentUpgrader {
    fn begin(&self, node: &NodeId, target: &Target) -> Result<(), UpgradeError> {
        self.begin_with(node, target, &BeginOptions::default())
    }

    /// Offers the release with the rollout's downgrade permission ([`ControllerMsg::UpdateOffer`]
    /// to v5 agents, which refuse an older version without it).
    ///
    /// [`ControllerMsg::UpdateOffer`]: shoal_proto::ControllerMsg::UpdateOffer
    fn begin_with(
        &self,
        node: &NodeId,
        target: &Target,
        options: &BeginOptions,
    ) -> Result<(), UpgradeError> {
        let offer = OfferOptions {
            allow_downgrade: options.allow_downgrade,
        };
        self.controller()?
            .offer_agent_update_with(node, target.version(), &offer)
            .map_err(UpgradeError::from)
    }

    fn roll_back(
        &self,
        node: &NodeId,
        to: Option<&str>,
        target: &Target,
    ) -> Result<(), UpgradeError> {
        let ctl = self.controller()?;
        let running = ctl
            .store
            .node(node)
            .map_err(|e| UpgradeError::Failed(e.to_string()))?
            .map(|n| n.agent_version);
        if let (Some(to), Some(running)) = (to, running.as_deref()) {
            if running == to {
                debug!(node = %node, version = to, "already back on the previous agent; no revert sent");
                return Ok(());
            }
        }
        let reason = format!("rollout of agent {} failed on this node", target.version());
        ctl.revert_agent(node, &reason).map_err(UpgradeError::from)
    }
}

/// Whether a report says the running version is healthy: the checks of an attempt of the running
/// version (all ran and passed; `false` while any is failing or none ran yet), or `true` for a
/// version the agent did not just try (it never updated, or it went back to the version it runs).
pub fn report_healthy(report: &UpdateReport) -> bool {
    if report.failure.is_none() && report.attempted.as_deref() == Some(report.running.as_str()) {
        !report.checks.is_empty() && report.checks.iter().all(|c| c.passed)
    } else {
        true
    }
}

/// The planner's event for a notice (the mapping in `docs/maintenance-design.md` §4 "As built"):
/// - acknowledged → [`Event::Acknowledged`];
/// - a report of an attempt of the version it runs, no failure: every check passed → `Reported {
///   Healthy }`, otherwise `Reported { Checking }` (the agent settles by itself: it rolls back at
///   its health deadline and reports `Unhealthy`, so the driver does not race it with a revert);
/// - any `failure` (bad signature, download, install, or `Unhealthy`: the agent rolled itself back
///   and runs its old version) → [`Event::Refused`] with the failure and the failed checks; the
///   node did not stay changed, so no roll-back is due. Only a `fresh` report refuses: an agent
///   resends its last report at every session start, and an old failure must not fail a new
///   attempt;
/// - anything else (no attempt, or an attempt of another version, e.g. after a revert) →
///   `Reported { version: running, Healthy }`: the node is settled on the version it runs.
pub fn notice_event(notice: &UpdateNotice) -> Option<Event> {
    match notice {
        UpdateNotice::Acknowledged { node, .. } => Some(Event::Acknowledged { node: node.clone() }),
        UpdateNotice::Reported {
            node,
            report,
            fresh,
        } => {
            let node = node.clone();
            let version = report.running.clone();
            if let Some(failure) = &report.failure {
                if !fresh {
                    return None;
                }
                let failed: Vec<&str> = report
                    .checks
                    .iter()
                    .filter(|c| !c.passed)
                    .map(|c| c.name.as_str())
                    .collect();
                let mut reason = failure.to_string();
                if !failed.is_empty() {
                    reason = format!("{reason} (failed checks: {})", failed.join(", "));
                }
                return Some(Event::Refused { node, reason });
            }
            let health = if report_healthy(report) {
                ReportedHealth::Healthy
            } else {
                ReportedHealth::Checking
            };
            Some(Event::Reported {
                node,
                version,
                health,
            })
        }
    }
}

/// Feeds every agent update notice to [`Controller::rollout_event`] until the controller goes away.
/// A lagging receiver only loses wake-ups: the driver's next pass observes versions and health
/// anyway.
pub async fn forward_agent_updates(controller: Arc<Controller>) {
    let mut notices = controller.subscribe_agent_updates();
    loop {
        let notice = match notices.recv().await {
            Ok(n) => n,
            Err(RecvError::Lagged(missed)) => {
                warn!(
                    missed,
                    "rollout driver missed agent update notices; the next pass observes the fleet"
                );
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let Some(event) = notice_event(&notice) else {
            continue;
        };
        let c = controller.clone();
        let result = tokio::task::spawn_blocking(move || c.rollout_event(event)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(cause = %e, "could not feed an agent update to the rollouts"),
            Err(e) => warn!(cause = %e, "agent update forwarding task failed"),
        }
    }
}

impl Controller {
    /// Installs the agent update executor for [`TargetKind::Agent`] (done by [`Controller::open`];
    /// a later [`Controller::set_upgrader`] replaces it, e.g. in tests).
    pub fn install_agent_upgrader(self: &Arc<Self>) {
        info!("agent rollouts use protocol-4 agent updates");
        self.set_upgrader(
            TargetKind::Agent,
            Arc::new(AgentUpgrader {
                controller: Arc::downgrade(self),
            }),
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use shoal_proto::{CheckResult, UpdateFailure};

    use super::*;

    fn report(
        running: &str,
        attempted: Option<&str>,
        failure: Option<UpdateFailure>,
        checks: &[(&str, bool)],
    ) -> UpdateReport {
        UpdateReport {
            running: running.into(),
            attempted: attempted.map(Into::into),
            attempts: 1,
            checks: checks
                .iter()
                .map(|(n, p)| CheckResult {
                    name: (*n).into(),
                    passed: *p,
                    detail: None,
                })
                .collect(),
            failure,
        }
    }

    fn ev(report: UpdateReport, fresh: bool) -> Option<Event> {
        notice_event(&UpdateNotice::Reported {
            node: NodeId("n".into()),
            report,
            fresh,
        })
    }

    fn reported(version: &str, health: ReportedHealth) -> Option<Event> {
        Some(Event::Reported {
            node: NodeId("n".into()),
            version: version.into(),
            health,
        })
    }

    #[test]
    fn notices_map_to_planner_events() {
        let n = NodeId("n".into());
        assert_eq!(
            notice_event(&UpdateNotice::Acknowledged {
                node: n.clone(),
                version: "2".into()
            }),
            Some(Event::Acknowledged { node: n.clone() })
        );
        // On the target, every check passed: healthy.
        let ok = report(
            "2",
            Some("2"),
            None,
            &[("session", true), ("heartbeat", true)],
        );
        assert_eq!(
            ev(ok.clone(), false),
            reported("2", ReportedHealth::Healthy)
        );
        assert!(report_healthy(&ok));
        // On the target, a check failing or none run yet: still checking (the agent settles).
        let failing = report(
            "2",
            Some("2"),
            None,
            &[("session", true), ("check:disk", false)],
        );
        assert_eq!(
            ev(failing.clone(), true),
            reported("2", ReportedHealth::Checking)
        );
        assert!(!report_healthy(&failing));
        assert_eq!(
            ev(report("2", Some("2"), None, &[]), true),
            reported("2", ReportedHealth::Checking)
        );
        // Rolled itself back: refused, with the failed checks, and only when fresh.
        let back = report(
            "1",
            Some("2"),
            Some(UpdateFailure::Unhealthy),
            &[("check:disk", false)],
        );
        match ev(back.clone(), true) {
            Some(Event::Refused { node, reason }) => {
                assert_eq!(node, n);
                assert!(
                    reason.contains("rolled back") && reason.contains("check:disk"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ev(back.clone(), false),
            None,
            "a resent old failure does not refuse"
        );
        assert!(
            report_healthy(&back),
            "the old version it went back to runs"
        );
        // Refused before installing.
        let bad = report("1", Some("2"), Some(UpdateFailure::NoTrustedKey), &[]);
        assert!(matches!(ev(bad, true), Some(Event::Refused { .. })));
        // Never updated, or reverted after a successful attempt: settled on what it runs.
        assert_eq!(
            ev(report("1", None, None, &[]), false),
            reported("1", ReportedHealth::Healthy)
        );
        assert_eq!(
            ev(report("1", Some("2"), None, &[("session", true)]), false),
            reported("1", ReportedHealth::Healthy)
        );
    }

    const KEY: &str = "-----BEGIN PRIVATE KEY-----\n\
        MC4CAQAwBQYDK2VwBCIEIK+B2im/6O/v2TLJvQeJok4Rx0py/TkTrJAYqLjrQq7a\n\
        -----END PRIVATE KEY-----\n";
    const PUB: &str = "46badf9cba6ddc2caefc23d7cbe486fbf70c11833afb5952c750170fdf0e3aa2";
    const TARGET: &str = "x86_64-unknown-linux-gnu";
    const OLD: &str = "0.1.0";
    const NEW: &str = "0.2.0";

    /// What the forwarding task does, stepped by hand.
    fn pump(ctl: &Controller, notices: &mut tokio::sync::broadcast::Receiver<UpdateNotice>) {
        while let Ok(n) = notices.try_recv() {
            if let Some(event) = notice_event(&n) {
                ctl.rollout_event(event).unwrap();
            }
        }
    }

    fn settled(version: &str) -> UpdateReport {
        report(version, None, None, &[])
    }

    /// A real controller, the agent executor `open` installs, fake protocol-4 connections: the
    /// offer goes out, a reconnect on the target without a report is not success yet, failing
    /// checks keep the node upgrading, passing ones succeed it; a node that rolled itself back is
    /// failed as refused and no revert is sent; a v3 node is refused at once.
    #[test]
    fn agent_rollout_runs_on_update_reports() {
        use crate::{maintenance::StartRequest, server::now_ms};
        use shoal_controller_core::rollout::NodePhase;
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _enter = rt.enter();
        std::fs::write(dir.path().join("release.pub"), PUB).unwrap();
        let mut config = crate::server::ControllerConfig::for_tests(dir.path().join("data"));
        config.release_keys = vec![dir.path().join("release.pub")];
        let ctl = Controller::open(config, "127.0.0.1:1".parse().unwrap()).unwrap();
        let key = crate::releases::verify::load_signing_key(KEY).unwrap();
        let binary = b"\x7fELF agent 0.2.0".repeat(100);
        let (_, signed) = crate::releases::verify::sign_release(
            &binary,
            NEW,
            TARGET,
            shoal_proto::UnixMillis(1),
            &key,
        )
        .unwrap();
        for (name, bytes) in [
            ("agent", &binary),
            ("manifest.json", &signed.manifest),
            ("manifest.sig", &signed.signature),
        ] {
            ctl.releases.stage(NEW, TARGET, name, bytes).unwrap();
        }
        ctl.releases.commit(NEW, TARGET).unwrap();

        let mut notices = ctl.subscribe_agent_updates();
        let [a, b, c] = ["a", "b", "c"].map(|h| {
            let id =
                crate::test_support::enrol_for_tests(&ctl.store, h, &[("role", "w")], now_ms());
            ctl.store
                .update_node(&id, |r| r.agent_version = OLD.into())
                .unwrap();
            id
        });
        let (a_conn, mut a_rx) = ctl.fake_connection(&a, 4);
        let (_, mut b_rx) = ctl.fake_connection(&b, 4);
        let (_, mut c_rx) = ctl.fake_connection(&c, 3);
        for n in [&a, &b] {
            ctl.update_reported(n, settled(OLD));
        }
        pump(&ctl, &mut notices);
        ctl.start_rollout(StartRequest {
            target: Target::Agent(NEW.into()),
            selector: Some(shoal_controller_core::selector::Selector::equals(
                "role", "w",
            )),
            max_unavailable: 1,
            max_failures: 5,
            window: None,
            upgrade_deadline: None,
            allow_downgrade: false,
        })
        .unwrap();
        let phase = |n: &NodeId| {
            ctl.maint
                .rollout("current")
                .unwrap()
                .phase(n)
                .cloned()
                .unwrap()
        };
        let upgrading = |p: &NodePhase| matches!(p, NodePhase::Upgrading { .. });

        // One at a time; the first begun gets the offer (the v3 node is refused whenever its turn
        // comes).
        let mut begun = None;
        for _ in 0..3 {
            ctl.rollout_tick();
            if upgrading(&phase(&a)) {
                begun = Some(a.clone());
                break;
            }
            if upgrading(&phase(&b)) {
                begun = Some(b.clone());
                break;
            }
        }
        let first = begun.expect("a v4 node begun");
        let (first_rx, second, second_rx) = if first == a {
            (&mut a_rx, b.clone(), &mut b_rx)
        } else {
            (&mut b_rx, a.clone(), &mut a_rx)
        };
        assert!(
            matches!(first_rx.try_recv(), Ok(shoal_proto::ControllerMsg::UpdateAgent { version, .. }) if version == NEW)
        );

        ctl.update_acknowledged(&first, NEW.into());
        pump(&ctl, &mut notices);
        assert!(
            matches!(
                phase(&first),
                NodePhase::Upgrading {
                    acknowledged: true,
                    ..
                }
            ),
            "{:?}",
            phase(&first)
        );
        // It re-executed: on the target, connected, but its report has not come yet.
        if first == a {
            ctl.end_fake_connection(&a, a_conn);
        }
        ctl.store
            .update_node(&first, |r| r.agent_version = NEW.into())
            .unwrap();
        let (_, _rx) = ctl.fake_connection(&first, 4);
        ctl.rollout_tick();
        assert!(
            upgrading(&phase(&first)),
            "no report on the target yet: {:?}",
            phase(&first)
        );
        ctl.update_reported(
            &first,
            report(
                NEW,
                Some(NEW),
                None,
                &[("session", true), ("check:app", false)],
            ),
        );
        pump(&ctl, &mut notices);
        ctl.rollout_tick();
        assert!(
            upgrading(&phase(&first)),
            "a failing check keeps it checking: {:?}",
            phase(&first)
        );
        ctl.update_reported(
            &first,
            report(
                NEW,
                Some(NEW),
                None,
                &[("session", true), ("check:app", true)],
            ),
        );
        pump(&ctl, &mut notices);
        assert!(
            matches!(phase(&first), NodePhase::Succeeded { .. }),
            "{:?}",
            phase(&first)
        );

        // The second v4 node: its new version did not become healthy and the agent went back by
        // itself.
        for _ in 0..3 {
            if upgrading(&phase(&second)) {
                break;
            }
            ctl.rollout_tick();
        }
        assert!(upgrading(&phase(&second)), "{:?}", phase(&second));
        assert!(matches!(
            second_rx.try_recv(),
            Ok(shoal_proto::ControllerMsg::UpdateAgent { .. })
        ));
        ctl.update_reported(
            &second,
            report(
                OLD,
                Some(NEW),
                Some(UpdateFailure::Unhealthy),
                &[("check:app", false)],
            ),
        );
        pump(&ctl, &mut notices);
        match phase(&second) {
            NodePhase::Failed {
                failure,
                rolled_back: true,
                ..
            } => {
                assert!(failure.to_string().contains("check:app"), "{failure}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            second_rx.try_recv().is_err(),
            "no revert for a node that went back by itself"
        );

        // The v3 node: refused (agent too old), nothing sent.
        for _ in 0..3 {
            ctl.rollout_tick();
        }
        match phase(&c) {
            NodePhase::Failed { failure, .. } => {
                assert!(failure.to_string().contains("agent too old"), "{failure}")
            }
            other => panic!("{other:?}"),
        }
        assert!(c_rx.try_recv().is_err());
    }
}
