//! The updater's glue: the updater across restarts (its health deadline runs whatever the
//! connection does), offers verified and fetched in the background, installs that end in a
//! re-execution, reverts, and update reports in the form the session's protocol decodes.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use shoal_overlay::send_msg;
use shoal_proto::{AgentMsg, UpdateFailure, UpdateOffer, UpdateReport};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    shell::{now_ms, AttemptError, Shell, ShellEvent},
    AgentConfig,
};
use crate::updater::{self, Updater};

/// The updater as the shell sees it.
pub(super) struct Updates {
    /// Self-update state, shared with the health-deadline task and the download tasks.
    updater: Arc<Mutex<Updater>>,
    /// The connection of each v4 session once it is established: a release download broken off with
    /// its connection resumes on the next one ([`updater::fetch`]).
    fetch_conns: watch::Sender<Option<quinn::Connection>>,
}

impl Updates {
    /// Counts this start (or rolls back) with [`Updater::boot`]: called before anything else. A
    /// new version's health deadline is then kept by a task of its own.
    pub(super) fn boot(config: &AgentConfig, version: &str) -> Updates {
        let updater = Updater::boot(config.update.clone(), &config.state_dir, version);
        let update_deadline = updater.deadline();
        let updater = Arc::new(Mutex::new(updater));
        if let Some(deadline) = update_deadline {
            // The deadline holds whether or not the controller is reachable: a new version that
            // cannot connect is rolled back all the same.
            let updater = updater.clone();
            tokio::spawn(async move {
                let wait = deadline.0.saturating_sub(now_ms().0);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                let _ = lock(&updater).timeout();
            });
        }
        Updates {
            updater,
            fetch_conns: watch::Sender::new(None),
        }
    }
}

fn lock(updater: &Mutex<Updater>) -> MutexGuard<'_, Updater> {
    updater.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shell<'_> {
    /// An update report as the current session can decode it ([`UpdateReport::for_protocol`]).
    fn update_report(&self, report: UpdateReport) -> AgentMsg {
        AgentMsg::UpdateReport(report.for_protocol(self.protocol))
    }

    /// The session speaks updates: sends the current report, and lets a download broken off with
    /// an earlier connection resume on this one.
    pub(super) async fn send_update_report(
        &mut self,
        send: &mut quinn::SendStream,
    ) -> Result<(), AttemptError> {
        let report = lock(&self.update.updater).report();
        send_msg(send, &self.update_report(report)).await?;
        self.update.fetch_conns.send_replace(self.conn.clone());
        Ok(())
    }

    /// A heartbeat went out on an established session: a new version's checks may have passed.
    pub(super) async fn heartbeat_sent(
        &mut self,
        send: &mut quinn::SendStream,
    ) -> Result<(), AttemptError> {
        let updater = self.update.updater.clone();
        let changed = tokio::task::spawn_blocking(move || lock(&updater).heartbeat_sent())
            .await
            .ok()
            .flatten();
        if let Some(report) = changed.filter(|_| self.updates) {
            send_msg(send, &self.update_report(report)).await?;
        }
        Ok(())
    }

    /// An offer of another version (v4 `UpdateAgent` or v5 `UpdateOffer`): verified, acknowledged
    /// and fetched in the background (installed when complete, [`ShellEvent::Update`]), or
    /// refused; the message to answer with.
    pub(super) fn update_offer(&mut self, offer: UpdateOffer) -> Option<AgentMsg> {
        let UpdateOffer {
            version,
            release,
            allow_downgrade,
        } = offer;
        let offer = lock(&self.update.updater).offer(&version, &release, allow_downgrade);
        match (offer, self.conn.clone()) {
            (Ok(updater::Offer::InProgress), _) => Some(AgentMsg::UpdateAck { version }),
            (Ok(updater::Offer::Fetch(manifest)), Some(conn)) => {
                let ack = AgentMsg::UpdateAck {
                    version: version.clone(),
                };
                let (paths, policy) = {
                    let u = lock(&self.update.updater);
                    (u.paths().clone(), u.policy())
                };
                let shared = self.update.updater.clone();
                let events = self.events.clone();
                self.update.fetch_conns.send_replace(Some(conn));
                let conns = self.update.fetch_conns.subscribe();
                tokio::spawn(async move {
                    let result = match updater::fetch(conns, &paths, &manifest, &policy).await {
                        Ok(()) => {
                            // The health deadline runs from the install, not from the offer: a
                            // slow download must not use up the new version's time to pass its
                            // checks (it was rolled back at its first start, no check run).
                            let trying = lock(&shared).trying(&version);
                            tokio::task::spawn_blocking(move || updater::install(&paths, &trying))
                                .await
                                .unwrap_or_else(|e| Err(UpdateFailure::Install(e.to_string())))
                        }
                        Err(e) => {
                            let _ = std::fs::remove_file(&paths.download);
                            Err(e)
                        }
                    };
                    let _ = events.send(ShellEvent::Update { version, result });
                });
                Some(ack)
            }
            (Ok(updater::Offer::Fetch(_)), None) => {
                let report = lock(&self.update.updater).failed(
                    &version,
                    UpdateFailure::Install("no connection to fetch on".into()),
                );
                Some(self.update_report(report))
            }
            (Err(report), _) => Some(self.update_report(*report)),
        }
    }

    /// The controller asks to go back to the previous binary: restore it and re-execute.
    pub(super) fn revert_agent(&self, reason: String) {
        let paths = lock(&self.update.updater).paths().clone();
        warn!(%reason, "the controller asks to revert to the previous binary");
        match updater::restore_prev(&paths) {
            Ok(true) => {
                let e = updater::reexec(&paths.exe);
                warn!(cause = %e, "could not re-execute the previous binary");
            }
            Ok(false) => warn!("no previous binary to revert to"),
            Err(e) => warn!(cause = %e, "could not restore the previous binary"),
        }
    }

    /// A download and install ended: re-execute the new version, or report why not (if the
    /// session can carry the report).
    pub(super) fn update_ended(
        &mut self,
        version: String,
        result: Result<(), UpdateFailure>,
        ready: bool,
    ) -> Option<AgentMsg> {
        let report = match result {
            Ok(()) => {
                let exe = lock(&self.update.updater).paths().exe.clone();
                info!(version = %version, "update installed");
                let e = updater::reexec(&exe);
                lock(&self.update.updater).failed(
                    &version,
                    UpdateFailure::Install(format!("re-executing {}: {e}", exe.display())),
                )
            }
            Err(failure) => lock(&self.update.updater).failed(&version, failure),
        };
        (ready && self.updates).then(|| self.update_report(report))
    }
}
