//! Agent self-updates, controller side: offering a stored release to a connected v4 agent, serving
//! the binary on the agent's download stream, and recording what agents report.
//!
//! The interface for the rollout driver:
//! - [`Controller::offer_agent_update`]`(node, version)` sends the offer (or says why it cannot);
//! - [`Controller::agent_update`]`(node)` / [`Controller::agent_updates`] read the latest
//!   [`AgentUpdate`] (offer, acknowledgement, report) per node;
//! - [`Controller::subscribe_agent_updates`] yields an [`UpdateNotice`] on every acknowledgement
//!   and report, to wake the driver.
//!
//! Reports are kept in memory and the last one per node in the store's meta tree (so a controller
//! restart does not log the same outcome twice); agents send a fresh report on every session start,
//! so the controller never depends on what it remembered.

use crate::connections::SendError;
use crate::store::ReleaseEvent;
use std::{path::PathBuf, sync::Arc};

use shoal_overlay::{recv_msg, send_msg};
use shoal_proto::{
    check_release_name, ControllerMsg, FetchRelease, FetchReply, NodeId, ReleaseChunk, UnixMillis,
    UpdateFailure, UpdateOffer, UpdateReport,
};
use tracing::{debug, info, warn};

use crate::{
    releases::store::{read_chunk, ReleaseStoreError},
    server::now_ms,
    server::Controller,
    store::EventKind,
    store::StoreError,
};

/// The first protocol version with agent updates.
pub const UPDATE_PROTOCOL: u16 = shoal_proto::UPDATES_PROTOCOL;

/// The first protocol whose agents refuse downgrades unless the offer allows them
/// ([`ControllerMsg::UpdateOffer`]).
pub const OFFER_PROTOCOL: u16 = 5;

/// How an agent release is offered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OfferOptions {
    /// The agent may go to a version older than the one it runs (`--allow-downgrade`). Default
    /// false.
    pub allow_downgrade: bool,
}

/// Why an update could not be offered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// The node is not in the fleet.
    #[error("node {0} not found")]
    UnknownNode(NodeId),
    /// The node has no open control connection.
    #[error("node {0} is not connected")]
    NotConnected(NodeId),
    /// The node's agent speaks a protocol without updates.
    #[error("agent too old for remote update: node {node} speaks protocol {protocol}, updates need {UPDATE_PROTOCOL}")]
    AgentTooOld {
        /// The node.
        node: NodeId,
        /// Its negotiated protocol.
        protocol: u16,
    },
    /// No stored release of this version matches the node's architecture.
    #[error(
        "no release {version} for node {node} (architecture {arch}; stored targets: {targets:?})"
    )]
    NoRelease {
        /// The node.
        node: NodeId,
        /// The version asked for.
        version: String,
        /// The node's architecture from its inventory (empty when unknown).
        arch: String,
        /// The targets stored for the version.
        targets: Vec<String>,
    },
    /// The release store failed.
    #[error(transparent)]
    Releases(#[from] ReleaseStoreError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the controller knows about a node's agent update.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AgentUpdate {
    /// The version last offered, and when.
    pub offered: Option<(String, UnixMillis)>,
    /// The version the agent acknowledged last (it is fetching or installing it).
    pub acknowledged: Option<String>,
    /// The agent's latest report.
    pub report: Option<UpdateReport>,
    /// When the report arrived.
    pub reported_at: Option<UnixMillis>,
}

/// Sent to subscribers on every acknowledgement and report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateNotice {
    /// The agent took an offer.
    Acknowledged {
        /// The node.
        node: NodeId,
        /// The version.
        version: String,
    },
    /// The agent reported.
    Reported {
        /// The node.
        node: NodeId,
        /// The report.
        report: UpdateReport,
        /// Whether the report is news: it differs from the last one this controller holds for the
        /// node, or it is the first report since a newer offer (a repeated refusal of a new offer).
        /// An agent resends its last report at every session start; such a repeat is not fresh.
        fresh: bool,
    },
}

/// The event a new report deserves, if it differs from the previous one: `None` for a repeat, an
/// update still in progress, or a node that never tried an update.
pub fn report_event(
    previous: Option<&UpdateReport>,
    report: &UpdateReport,
) -> Option<(EventKind, String)> {
    if previous == Some(report) {
        return None;
    }
    let attempted = report.attempted.as_deref()?;
    let checks = |r: &UpdateReport| {
        r.checks
            .iter()
            .map(|c| match &c.detail {
                Some(d) if !c.passed => format!("{} failed ({d})", c.name),
                _ if !c.passed => format!("{} failed", c.name),
                _ => format!("{} passed", c.name),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match &report.failure {
        None if report.running == attempted && !report.checks.is_empty() && report.checks.iter().all(|c| c.passed) => Some((
            EventKind::Releases(ReleaseEvent::AgentUpdateSucceeded),
            format!("agent updated to {attempted} after {} start(s); checks: {}", report.attempts, checks(report)),
        )),
        None => None,
        Some(UpdateFailure::Unhealthy) => Some((
            EventKind::Releases(ReleaseEvent::AgentUpdateRolledBack),
            format!(
                "agent {attempted} did not become healthy after {} start(s) (checks: {}); rolled back to {}",
                report.attempts,
                if report.checks.is_empty() { "none ran".into() } else { checks(report) },
                report.running
            ),
        )),
        Some(failure) => Some((
            EventKind::Releases(ReleaseEvent::AgentUpdateFailed),
            format!("agent update to {attempted} failed, still running {}: {failure}", report.running),
        )),
    }
}

fn meta_key(node: &NodeId) -> String {
    format!("agent_update_report/{}", node.0)
}

impl Controller {
    /// Offers the stored release `version` to the node's agent (the target is chosen from the
    /// node's architecture). Returns once the offer is queued on the connection; the outcome
    /// arrives as [`UpdateNotice`]s and in [`Controller::agent_update`]. The agent refuses a
    /// version older than the one it runs ([`Controller::offer_agent_update_with`] allows that).
    pub fn offer_agent_update(&self, node: &NodeId, version: &str) -> Result<(), UpdateError> {
        self.offer_agent_update_with(node, version, &OfferOptions::default())
    }

    /// [`Controller::offer_agent_update`] with options: a v5 agent gets
    /// [`ControllerMsg::UpdateOffer`] carrying the downgrade permission, a v4 agent
    /// [`ControllerMsg::UpdateAgent`] (it does not check versions).
    pub fn offer_agent_update_with(
        &self,
        node: &NodeId,
        version: &str,
        options: &OfferOptions,
    ) -> Result<(), UpdateError> {
        check_release_name(version).map_err(ReleaseStoreError::Refused)?;
        let rec = self
            .store
            .node(node)?
            .ok_or_else(|| UpdateError::UnknownNode(node.clone()))?;
        let protocol = self
            .session_protocol(node)
            .ok_or_else(|| UpdateError::NotConnected(node.clone()))?;
        if protocol < UPDATE_PROTOCOL {
            return Err(UpdateError::AgentTooOld {
                node: node.clone(),
                protocol,
            });
        }
        let arch = rec
            .inventory
            .as_ref()
            .map(|i| i.arch.clone())
            .unwrap_or_default();
        let targets = self.releases.targets(version)?;
        let target = match targets
            .iter()
            .find(|t| !arch.is_empty() && t.starts_with(&format!("{arch}-")))
        {
            Some(t) => t.clone(),
            None if arch.is_empty() && targets.len() == 1 => targets[0].clone(),
            None => {
                return Err(UpdateError::NoRelease {
                    node: node.clone(),
                    version: version.to_owned(),
                    arch,
                    targets,
                });
            }
        };
        let (release, _) = self.releases.get(version, &target)?;
        let msg = if protocol >= OFFER_PROTOCOL {
            ControllerMsg::UpdateOffer(UpdateOffer {
                version: version.to_owned(),
                release,
                allow_downgrade: options.allow_downgrade,
            })
        } else {
            ControllerMsg::UpdateAgent {
                version: version.to_owned(),
                release,
            }
        };
        self.send_to(node, msg, 0)
            .map_err(|_| UpdateError::NotConnected(node.clone()))?;
        let now = now_ms();
        self.agent_updates_mut()
            .entry(node.clone())
            .or_default()
            .offered = Some((version.to_owned(), now));
        let downgrade = if options.allow_downgrade {
            ", downgrade allowed"
        } else {
            ""
        };
        let message = format!(
            "{}: agent {version} ({target}) offered{downgrade}; running {}",
            rec.hostname, rec.agent_version
        );
        self.store.append_event(
            EventKind::Releases(ReleaseEvent::AgentUpdateOffered),
            Some(node),
            &message,
            now,
        )?;
        info!(node = %node, version, target = %target, "agent update offered");
        Ok(())
    }

    /// Queues a protocol-4 message on the node's control connection: `NotConnected` without one,
    /// `AgentTooOld` when the session speaks an older protocol (it would not understand it).
    pub(crate) fn send_v4(&self, node: &NodeId, msg: ControllerMsg) -> Result<(), UpdateError> {
        self.send_to(node, msg, UPDATE_PROTOCOL)
            .map_err(|e| match e {
                SendError::NotConnected(node) => UpdateError::NotConnected(node),
                SendError::TooOld { node, protocol, .. } => {
                    UpdateError::AgentTooOld { node, protocol }
                }
            })
    }

    /// Asks the node's agent to go back to the binary it kept from its last update (`<exe>.prev`)
    /// and re-execute: the rollout driver's `RollBack` for an agent that updated but must not stay.
    /// The agent reports the version it then runs.
    pub fn revert_agent(&self, node: &NodeId, reason: &str) -> Result<(), UpdateError> {
        let rec = self
            .store
            .node(node)?
            .ok_or_else(|| UpdateError::UnknownNode(node.clone()))?;
        self.send_v4(
            node,
            ControllerMsg::RevertAgent {
                reason: reason.to_owned(),
            },
        )?;
        let message = format!(
            "{}: asked to revert agent {} to its previous binary: {reason}",
            rec.hostname, rec.agent_version
        );
        self.store.append_event(
            EventKind::Releases(ReleaseEvent::AgentUpdateRolledBack),
            Some(node),
            &message,
            now_ms(),
        )?;
        info!(node = %node, %reason, "agent revert requested");
        Ok(())
    }

    /// The latest update facts for one node.
    pub fn agent_update(&self, node: &NodeId) -> Option<AgentUpdate> {
        self.agent_updates_mut().get(node).cloned()
    }

    /// The latest update facts for every node that has any.
    pub fn agent_updates(&self) -> Vec<(NodeId, AgentUpdate)> {
        let mut all: Vec<_> = self
            .agent_updates_mut()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Acknowledgements and reports as they arrive (a lagging subscriber misses old ones; the state
    /// is always in [`Controller::agent_update`]).
    pub fn subscribe_agent_updates(&self) -> tokio::sync::broadcast::Receiver<UpdateNotice> {
        self.update_notices.subscribe()
    }

    pub(crate) fn update_acknowledged(&self, node: &NodeId, version: String) {
        info!(node = %node, version = %version, "agent is fetching the update");
        self.agent_updates_mut()
            .entry(node.clone())
            .or_default()
            .acknowledged = Some(version.clone());
        let _ = self.update_notices.send(UpdateNotice::Acknowledged {
            node: node.clone(),
            version,
        });
    }

    /// Records a report; appends an event when its outcome is new. Blocking (store).
    pub(crate) fn update_reported(&self, node: &NodeId, report: UpdateReport) {
        let now = now_ms();
        let (previous, after_offer) = {
            let mut map = self.agent_updates_mut();
            let entry = map.entry(node.clone()).or_default();
            let after_offer = matches!((&entry.offered, entry.reported_at), (Some((_, offered)), Some(at)) if *offered > at);
            let previous = entry.report.replace(report.clone());
            entry.reported_at = Some(now);
            (previous, after_offer)
        };
        let previous = previous.or_else(|| {
            self.store
                .get_meta(&meta_key(node))
                .ok()
                .flatten()
                .and_then(|b| postcard::from_bytes(&b).ok())
        });
        if let Some((kind, message)) = report_event(previous.as_ref(), &report) {
            info!(node = %node, running = %report.running, attempted = ?report.attempted, attempts = report.attempts, outcome = ?kind, "agent update outcome");
            let host = self.store.hostname_or_id(node);
            if let Err(e) =
                self.store
                    .append_event(kind, Some(node), &format!("{host}: {message}"), now)
            {
                warn!(node = %node, cause = %e, "could not record the update outcome");
            }
        } else {
            debug!(node = %node, running = %report.running, "update report unchanged");
        }
        let fresh = previous.as_ref() != Some(&report) || after_offer;
        if previous.as_ref() != Some(&report) {
            if let Ok(bytes) = postcard::to_allocvec(&report) {
                if let Err(e) = self.store.put_meta(&meta_key(node), &bytes) {
                    warn!(node = %node, cause = %e, "could not store the update report");
                }
            }
        }
        let _ = self.update_notices.send(UpdateNotice::Reported {
            node: node.clone(),
            report,
            fresh,
        });
    }

    fn agent_updates_mut(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<NodeId, AgentUpdate>> {
        self.agent_updates.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Serves one release download stream of an authenticated v4 agent: reads its [`FetchRelease`],
/// sends the binary from the requested offset in [`ReleaseChunk`]s, then finishes the stream.
pub(crate) async fn serve_fetch(
    controller: Arc<Controller>,
    node: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let req = match tokio::time::timeout(
        std::time::Duration::from_secs(10),
        recv_msg::<FetchRelease>(&mut recv),
    )
    .await
    {
        Ok(Ok(Some(req))) => req,
        Ok(Ok(None)) | Err(_) => return,
        Ok(Err(e)) => {
            warn!(node = %node, cause = %e, "bad release fetch request");
            return;
        }
    };
    let path: Result<PathBuf, ReleaseStoreError> = controller
        .releases
        .get(&req.version, &req.target)
        .map(|(_, p)| p);
    let path = match path {
        Ok(p) => p,
        Err(e) => {
            let _ = send_msg(&mut send, &FetchReply::Error(e.to_string())).await;
            let _ = send.finish();
            return;
        }
    };
    info!(node = %node, version = %req.version, target = %req.target, offset = req.offset, "serving agent release");
    let mut offset = req.offset;
    loop {
        let p = path.clone();
        let chunk = tokio::task::spawn_blocking(move || read_chunk(&p, offset)).await;
        let bytes = match chunk {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                warn!(node = %node, cause = %e, "release unreadable");
                let _ = send_msg(&mut send, &FetchReply::Error(e.to_string())).await;
                break;
            }
            Err(_) => break,
        };
        if bytes.is_empty() {
            break;
        }
        let len = bytes.len() as u64;
        if let Err(e) = send_msg(
            &mut send,
            &FetchReply::Chunk(ReleaseChunk { offset, bytes }),
        )
        .await
        {
            debug!(node = %node, cause = %e, "release download stream closed by the agent");
            return;
        }
        offset += len;
    }
    let _ = send.finish();
    let _ = send.stopped().await;
    debug!(node = %node, bytes = offset, "release served");
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::CheckResult;

    fn report(
        running: &str,
        attempted: Option<&str>,
        failure: Option<UpdateFailure>,
        passed: bool,
    ) -> UpdateReport {
        UpdateReport {
            running: running.into(),
            attempted: attempted.map(Into::into),
            attempts: 1,
            checks: vec![CheckResult {
                name: "session".into(),
                passed,
                detail: None,
            }],
            failure,
        }
    }

    #[test]
    fn offers_reach_v4_agents_only_and_reports_are_recorded_once() {
        const KEY: &str = "-----BEGIN PRIVATE KEY-----\n\
            MC4CAQAwBQYDK2VwBCIEIK+B2im/6O/v2TLJvQeJok4Rx0py/TkTrJAYqLjrQq7a\n\
            -----END PRIVATE KEY-----\n";
        const PUB: &str = "46badf9cba6ddc2caefc23d7cbe486fbf70c11833afb5952c750170fdf0e3aa2";
        const TARGET: &str = "x86_64-unknown-linux-gnu";
        let dir = tempfile::tempdir().expect("tmp");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let _enter = rt.enter();
        std::fs::write(dir.path().join("release.pub"), PUB).expect("pub");
        let mut config = crate::server::ControllerConfig::for_tests(dir.path().join("data"));
        config.release_keys = vec![dir.path().join("release.pub")];
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let ctl = Controller::open(config, listener.local_addr().expect("addr")).expect("open");
        let old = crate::test_support::enrol_for_tests(&ctl.store, "old", &[], now_ms());
        let new = crate::test_support::enrol_for_tests(&ctl.store, "new", &[], now_ms());
        let away = crate::test_support::enrol_for_tests(&ctl.store, "away", &[], now_ms());

        let key = crate::releases::verify::load_signing_key(KEY).expect("key");
        let binary = b"\x7fELF agent 0.2.0".repeat(1000);
        let (_, signed) =
            crate::releases::verify::sign_release(&binary, "0.2.0", TARGET, UnixMillis(1), &key)
                .expect("sign");
        for (name, bytes) in [
            ("agent", &binary),
            ("manifest.json", &signed.manifest),
            ("manifest.sig", &signed.signature),
        ] {
            ctl.releases
                .stage("0.2.0", TARGET, name, bytes)
                .expect("stage");
        }
        ctl.releases.commit("0.2.0", TARGET).expect("commit");

        let (_, mut old_rx) = ctl.fake_connection(&old, 3);
        let (_, mut new_rx) = ctl.fake_connection(&new, 4);
        let err = ctl
            .offer_agent_update(&old, "0.2.0")
            .expect_err("v3 refused");
        assert!(
            matches!(err, UpdateError::AgentTooOld { protocol: 3, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("agent too old for remote update"),
            "{err}"
        );
        assert!(
            old_rx.try_recv().is_err(),
            "a v3 agent never gets UpdateAgent"
        );
        assert!(matches!(
            ctl.offer_agent_update(&away, "0.2.0"),
            Err(UpdateError::NotConnected(_))
        ));
        assert!(matches!(
            ctl.offer_agent_update(&new, "0.3.0"),
            Err(UpdateError::NoRelease { .. })
        ));

        let mut notices = ctl.subscribe_agent_updates();
        ctl.offer_agent_update(&new, "0.2.0").expect("offered");
        match new_rx.try_recv() {
            Ok(ControllerMsg::UpdateAgent { version, release }) => {
                assert_eq!(version, "0.2.0");
                assert_eq!(release, signed);
            }
            other => panic!("expected UpdateAgent, got {other:?}"),
        }
        // A v5 agent gets the offer with the downgrade permission (none unless asked for).
        let v5 = crate::test_support::enrol_for_tests(&ctl.store, "v5", &[], now_ms());
        let (_, mut v5_rx) = ctl.fake_connection(&v5, 5);
        ctl.offer_agent_update(&v5, "0.2.0").expect("offered");
        ctl.offer_agent_update_with(
            &v5,
            "0.2.0",
            &OfferOptions {
                allow_downgrade: true,
            },
        )
        .expect("offered");
        for allowed in [false, true] {
            match v5_rx.try_recv() {
                Ok(ControllerMsg::UpdateOffer(o)) => {
                    assert_eq!((o.version.as_str(), o.allow_downgrade), ("0.2.0", allowed));
                    assert_eq!(o.release, signed);
                }
                other => panic!("expected UpdateOffer, got {other:?}"),
            }
        }
        ctl.update_acknowledged(&new, "0.2.0".into());
        let ok = report("0.2.0", Some("0.2.0"), None, true);
        ctl.update_reported(&new, ok.clone());
        ctl.update_reported(&new, ok.clone());
        assert_eq!(
            notices.try_recv().ok(),
            Some(UpdateNotice::Acknowledged {
                node: new.clone(),
                version: "0.2.0".into()
            })
        );
        assert_eq!(
            notices.try_recv().ok(),
            Some(UpdateNotice::Reported {
                node: new.clone(),
                report: ok.clone(),
                fresh: true
            })
        );
        let facts = ctl.agent_update(&new).expect("facts");
        assert_eq!(
            (facts.offered.map(|o| o.0), facts.acknowledged, facts.report),
            (Some("0.2.0".into()), Some("0.2.0".into()), Some(ok))
        );
        assert!(matches!(
            ctl.revert_agent(&old, "test"),
            Err(UpdateError::AgentTooOld { .. })
        ));
        ctl.revert_agent(&new, "rollout aborted")
            .expect("revert sent");
        assert_eq!(
            new_rx.try_recv().ok(),
            Some(ControllerMsg::RevertAgent {
                reason: "rollout aborted".into()
            })
        );
        let kinds: Vec<EventKind> = ctl
            .store
            .events(None, 1000)
            .expect("events")
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds
                .iter()
                .filter(|k| **k == EventKind::Releases(ReleaseEvent::AgentUpdateOffered))
                .count(),
            3
        );
        assert_eq!(
            kinds
                .iter()
                .filter(|k| **k == EventKind::Releases(ReleaseEvent::AgentUpdateSucceeded))
                .count(),
            1,
            "a repeated report is logged once"
        );
    }

    #[test]
    fn reports_become_one_event_per_outcome() {
        let ok = report("0.2.0", Some("0.2.0"), None, true);
        assert_eq!(
            report_event(None, &ok).map(|e| e.0),
            Some(EventKind::Releases(ReleaseEvent::AgentUpdateSucceeded))
        );
        assert_eq!(
            report_event(Some(&ok), &ok),
            None,
            "a repeated report is not a new outcome"
        );
        assert_eq!(
            report_event(None, &report("0.1.0", None, None, true)),
            None,
            "never updated"
        );
        assert_eq!(
            report_event(None, &report("0.2.0", Some("0.2.0"), None, false)),
            None,
            "still checking"
        );
        let back = report(
            "0.1.0",
            Some("0.2.0"),
            Some(UpdateFailure::Unhealthy),
            false,
        );
        let (kind, text) = report_event(None, &back).expect("event");
        assert_eq!(
            kind,
            EventKind::Releases(ReleaseEvent::AgentUpdateRolledBack)
        );
        assert!(
            text.contains("rolled back to 0.1.0") && text.contains("session failed"),
            "{text}"
        );
        let refused = report(
            "0.1.0",
            Some("0.2.0"),
            Some(UpdateFailure::Truncated {
                got: 1,
                expected: 2,
            }),
            false,
        );
        let (kind, text) = report_event(None, &refused).expect("event");
        assert_eq!(kind, EventKind::Releases(ReleaseEvent::AgentUpdateFailed));
        assert!(
            text.contains("still running 0.1.0") && text.contains("truncated"),
            "{text}"
        );
    }
}
