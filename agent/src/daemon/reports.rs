//! What the node reports on its own schedule: health (with the checks a heartbeat sets off: a new
//! version's update checks and the boot checks), and the inventory when it changes.

use std::time::{Duration, Instant};

use shoal_overlay::send_msg;
use shoal_proto::{AgentMsg, Inventory};
use tracing::{info, warn};

use super::{
    shell::{now_ms, AttemptError, Shell},
    AgentConfig, AgentError,
};
use crate::{checks::BootHealth, health::HealthCollector, inventory};

/// How long a health check program may run before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// The reports' state across connections.
pub(super) struct Reports {
    /// Kept between reports for CPU usage; `None` while a stuck collection holds it.
    health: Option<HealthCollector>,
    /// The inventory last sent, to send only changes.
    last_inventory: Option<Inventory>,
    /// What this machine booted and its health checks, reported on every v4 session.
    pub(super) boot: BootHealth,
}

impl Reports {
    pub(super) fn new(config: &AgentConfig, boot: BootHealth) -> Reports {
        Reports {
            health: Some(HealthCollector::new(config.roots.clone())),
            last_inventory: None,
            boot,
        }
    }

    /// Runs the boot health checks off the async thread (a check program that hangs for more than
    /// [`CHECK_TIMEOUT`] counts as failed); the report to send, if any.
    async fn boot_checks(&mut self) -> Option<shoal_proto::BootReport> {
        let program = self.boot.program.clone();
        let image = self.boot.image().unwrap_or_default().to_owned();
        let job = tokio::task::spawn_blocking(move || {
            let version = crate::version::agent_version();
            crate::checks::run(
                program.as_deref(),
                &[
                    ("SHOAL_CHECK", "boot"),
                    ("SHOAL_AGENT_VERSION", &version),
                    ("SHOAL_IMAGE", &image),
                ],
            )
        });
        let checks = match tokio::time::timeout(CHECK_TIMEOUT, job).await {
            Ok(Ok(checks)) => checks,
            Ok(Err(e)) => {
                warn!(cause = %e, "boot checks failed to run");
                return None;
            }
            Err(_) => {
                let mut checks = crate::checks::run(None, &[]);
                let name = self
                    .boot
                    .program
                    .as_deref()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                checks.push(shoal_proto::CheckResult {
                    name: format!("check:{name}"),
                    passed: false,
                    detail: Some(format!("still running after {CHECK_TIMEOUT:?}")),
                });
                checks
            }
        };
        let report = self.boot.checked(checks, Instant::now())?;
        let failed: Vec<&str> = report
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name.as_str())
            .collect();
        if failed.is_empty() {
            info!(image = ?report.image, "boot checks passed");
        } else {
            warn!(image = ?report.image, ?failed, "boot checks failed; running them again every {:?}", self.boot.retry);
        }
        Some(report)
    }
}

impl Shell<'_> {
    /// Collects a health report and sends it; the heartbeat then sets off a new version's checks
    /// and, when due, the boot checks.
    pub(super) async fn send_health(
        &mut self,
        send: &mut quinn::SendStream,
    ) -> Result<(), AttemptError> {
        // statvfs on a hung network mount blocks: collect off the async thread, with a deadline.
        let mut collector = self
            .reports
            .health
            .take()
            .unwrap_or_else(|| HealthCollector::new(self.config.roots.clone()));
        let job = tokio::task::spawn_blocking(move || {
            let report = collector.collect(now_ms());
            (collector, report)
        });
        match tokio::time::timeout(Duration::from_secs(5), job).await {
            Ok(Ok((collector, report))) => {
                self.reports.health = Some(collector);
                send_msg(send, &AgentMsg::Health(report)).await?;
                // The heartbeat went out on an established session: a new version's checks.
                self.heartbeat_sent(send).await?;
                if self.updates && self.reports.boot.due(Instant::now()) {
                    if let Some(report) = self.reports.boot_checks().await {
                        send_msg(send, &AgentMsg::BootReport(report)).await?;
                    }
                }
            }
            Ok(Err(e)) => warn!(cause = %e, "health collection failed"),
            // The stuck collector stays with its thread; the next report uses a fresh one.
            Err(_) => warn!("health collection took over 5 s (a hung mount?); skipped this report"),
        }
        Ok(())
    }

    /// Collects the inventory and sends it if `force`d or changed since the last one sent.
    pub(super) async fn send_inventory(
        &mut self,
        send: &mut quinn::SendStream,
        force: bool,
    ) -> Result<(), AttemptError> {
        let roots = self.config.roots.clone();
        let inv = tokio::task::spawn_blocking(move || inventory::collect_inventory(&roots))
            .await
            .map_err(|e| AgentError::Tls(e.to_string()))?;
        if force || self.reports.last_inventory.as_ref() != Some(&inv) {
            if !force {
                info!("inventory changed; reporting");
            }
            send_msg(send, &AgentMsg::Inventory(inv.clone())).await?;
            self.reports.last_inventory = Some(inv);
        }
        Ok(())
    }
}
