//! The netboot image executor: a [`NodeUpgrader`] for [`Target::Image`].
//!
//! `begin` checks the image is in the image store, assigns it to the node (what `shoalctl nodes
//! set-image` does) and asks the node to reboot; `roll_back` assigns the previous image and asks
//! again. The node comes back by netbooting the assigned image and re-enrolling; the driver sees
//! the new version in its inventory (`shoal netboot image V`). Asking a node to reboot is the
//! protocol-4 [`ControllerMsg::Reboot`], sent by [`AgentRebooter`]
//! ([`Controller::request_reboot`]), the [`NodeRebooter`] that [`Controller::open`] installs; a v3
//! agent cannot be asked, so `begin` fails that node as refused, and its previous assignment is
//! restored, so it is unchanged.

use crate::store::MaintenanceEvent;
use std::sync::{Arc, Weak};

use shoal_proto::{BootReport, ControllerMsg, NodeId};
use tracing::{info, warn};

use super::{NodeUpgrader, TargetKind, UpgradeError};
use crate::{
    releases::updates::{UpdateError, UPDATE_PROTOCOL},
    server::now_ms,
    server::Controller,
    store::EventKind,
};
use shoal_controller_core::rollout::{Event, Target};

/// Asks a node to reboot (kexec into its assigned image, or a full reboot). Must be idempotent and
/// must not wait for the node.
pub trait NodeRebooter: Send + Sync + std::fmt::Debug {
    /// Sends the request.
    fn reboot(&self, node: &NodeId) -> Result<(), UpgradeError>;
}

/// See the module docs.
#[derive(Debug)]
pub struct ImageUpgrader {
    controller: Weak<Controller>,
    rebooter: Arc<dyn NodeRebooter>,
}

impl ImageUpgrader {
    fn assign_and_reboot(&self, node: &NodeId, version: &str) -> Result<(), UpgradeError> {
        let ctl = self
            .controller
            .upgrade()
            .ok_or_else(|| UpgradeError::Failed("the controller is shutting down".into()))?;
        ctl.netboot
            .images
            .get(version)
            .map_err(|e| UpgradeError::Failed(format!("image {version}: {e}")))?;
        let previous = ctl
            .netboot
            .machines
            .node_image(node)
            .map_err(|e| UpgradeError::Failed(e.to_string()))?;
        ctl.netboot
            .machines
            .set_node_image(node, version)
            .map_err(|e| UpgradeError::Failed(format!("cannot assign image {version}: {e}")))?;
        info!(node = %node, image = %version, "image assigned; asking the node to reboot");
        self.rebooter.reboot(node).inspect_err(|_| {
            // The request did not go out: the node is failed as refused, unchanged, so its
            // assignment must not change either (its next reboot would boot the new image).
            let restored = match &previous {
                Some(p) => ctl.netboot.machines.set_node_image(node, p),
                None => ctl.netboot.machines.clear_node_image(node),
            };
            if let Err(e) = restored {
                warn!(node = %node, cause = %e, "could not restore the image assignment after a failed reboot request");
            }
        })
    }
}

impl NodeUpgrader for ImageUpgrader {
    fn begin(&self, node: &NodeId, target: &Target) -> Result<(), UpgradeError> {
        self.assign_and_reboot(node, target.version())
    }

    fn roll_back(
        &self,
        node: &NodeId,
        to: Option<&str>,
        target: &Target,
    ) -> Result<(), UpgradeError> {
        let to = to.ok_or_else(|| {
            UpgradeError::Failed(format!("the image {node} booted before is not known"))
        })?;
        let ctl = self
            .controller
            .upgrade()
            .ok_or_else(|| UpgradeError::Failed("the controller is shutting down".into()))?;
        // A node that never left `to` (it refused the reboot, e.g. because it could not verify the
        // new image) only gets its assignment back: rebooting it would take down a node that is
        // fine.
        let connected = ctl.is_connected(node);
        let running = ctl
            .store
            .node(node)
            .ok()
            .flatten()
            .and_then(|rec| super::observed_version(target, &rec));
        if connected && running.as_deref() == Some(to) {
            ctl.netboot
                .machines
                .set_node_image(node, to)
                .map_err(|e| UpgradeError::Failed(format!("cannot assign image {to}: {e}")))?;
            info!(node = %node, image = %to, "still on the previous image; assignment restored, no reboot");
            return Ok(());
        }
        self.assign_and_reboot(node, to)
    }
}

impl Controller {
    /// Installs the netboot image executor, with the agent path's way of asking a node to reboot.
    pub fn install_image_upgrader(self: &Arc<Self>, rebooter: Arc<dyn NodeRebooter>) {
        let upgrader = ImageUpgrader {
            controller: Arc::downgrade(self),
            rebooter,
        };
        self.set_upgrader(TargetKind::Image, Arc::new(upgrader));
    }
}

/// The [`NodeRebooter`] of the agent path: [`Controller::request_reboot`] with `prefer_kexec`.
#[derive(Debug)]
pub struct AgentRebooter {
    controller: Weak<Controller>,
    /// Whether agents may `kexec -e` into a loaded kernel instead of a full reboot (default true).
    pub prefer_kexec: bool,
}

impl NodeRebooter for AgentRebooter {
    fn reboot(&self, node: &NodeId) -> Result<(), UpgradeError> {
        let ctl = self
            .controller
            .upgrade()
            .ok_or_else(|| UpgradeError::Failed("the controller is shutting down".into()))?;
        let image = ctl
            .netboot
            .machines
            .node_image(node)
            .ok()
            .flatten()
            .unwrap_or_else(|| "?".into());
        if self.prefer_kexec {
            ctl.offer_kexec_image(node, &image);
        }
        Ok(ctl.request_reboot(
            node,
            &format!("netboot image {image} assigned"),
            self.prefer_kexec,
        )?)
    }
}

impl Controller {
    /// Installs [`ImageUpgrader`] with [`AgentRebooter`] (done by [`Controller::open`]).
    pub fn install_agent_rebooter(self: &Arc<Self>) {
        self.install_image_upgrader(Arc::new(AgentRebooter {
            controller: Arc::downgrade(self),
            prefer_kexec: true,
        }));
    }

    /// Queues the kexec instructions for `version` on the node's connection, so that the
    /// [`ControllerMsg::Reboot`] after it can kexec into the image instead of going through
    /// firmware: [`ControllerMsg::SignedKexecImage`] for a v5 agent (it verifies the image with its
    /// own keys and refuses the reboot if it cannot), [`ControllerMsg::KexecImage`] for a v4 one.
    /// Nothing is sent (and the reboot is a full one) when the node is not connected on v4 or
    /// later, or the netboot servers do not run, or its MAC or the image is not known.
    pub fn offer_kexec_image(&self, node: &NodeId, version: &str) {
        let Some(protocol) = self
            .session_protocol(node)
            .filter(|p| *p >= UPDATE_PROTOCOL)
        else {
            return;
        };
        match crate::netboot::http::kexec_image(self, node, version, protocol) {
            Ok(Some(msg)) => {
                // A node that went away meanwhile reboots fully when it is asked to.
                let _ = self.send_to(node, msg, protocol);
            }
            Ok(None) => {
                info!(node = %node, image = %version, "no kexec instructions for this node; it reboots fully")
            }
            Err(e) => {
                warn!(node = %node, cause = %e, "could not prepare kexec instructions; the node reboots fully")
            }
        }
    }

    /// Sends [`ControllerMsg::Reboot`] to the node's connected v4 agent, with a
    /// `node_reboot_requested` event. Returns once the message is queued; the agent answers
    /// `RebootAck` (then drops off, and re-enrols from its new boot) or `RebootRefused`.
    pub fn request_reboot(
        &self,
        node: &NodeId,
        reason: &str,
        prefer_kexec: bool,
    ) -> Result<(), UpdateError> {
        let rec = self
            .store
            .node(node)?
            .ok_or_else(|| UpdateError::UnknownNode(node.clone()))?;
        self.send_v4(
            node,
            ControllerMsg::Reboot {
                reason: reason.to_owned(),
                prefer_kexec,
            },
        )?;
        let message = format!("{}: asked to reboot ({reason})", rec.hostname);
        self.store.append_event(
            EventKind::Maintenance(MaintenanceEvent::NodeRebootRequested),
            Some(node),
            &message,
            now_ms(),
        )?;
        info!(node = %node, %reason, prefer_kexec, "reboot requested");
        Ok(())
    }

    /// Records the agent's answer to a reboot request: an event, and for the rollouts an
    /// acknowledgement ([`Event::Acknowledged`]) or a refusal ([`Event::Failed`]). A refusal is not
    /// `Event::Refused` ("unchanged, nothing to roll back"): the new image is already assigned, so
    /// the node is failed and rolled back at once (its previous assignment restored) instead of
    /// waiting for the deadline. Blocking (store).
    pub(crate) fn reboot_answered(&self, node: &NodeId, answer: Result<String, String>) {
        let host = self.store.hostname_or_id(node);
        let (kind, message) = match &answer {
            Ok(method) => (
                EventKind::Maintenance(MaintenanceEvent::NodeRebooting),
                format!("{host}: rebooting ({method})"),
            ),
            Err(reason) => (
                EventKind::Maintenance(MaintenanceEvent::NodeRebootRefused),
                format!("{host}: refused to reboot: {reason}"),
            ),
        };
        info!(node = %node, answer = ?answer, "reboot answer");
        if let Err(e) = self
            .store
            .append_event(kind, Some(node), &message, now_ms())
        {
            warn!(node = %node, cause = %e, "could not record the reboot answer");
        }
        let event = match answer {
            Ok(_) => Event::Acknowledged { node: node.clone() },
            Err(reason) => Event::Failed {
                node: node.clone(),
                reason: format!("refused to reboot: {reason}"),
            },
        };
        if let Err(e) = self.rollout_event(event) {
            warn!(node = %node, cause = %e, "could not feed the reboot answer to the rollouts");
        }
    }
}

/// Whether a connected node counts as healthy for an image rollout. A protocol-4 agent reports what
/// it booted and its health checks ([`BootReport`], kept with its connection): it is healthy once
/// that report names the image its inventory shows (`version`) and every check passed; until the
/// report has arrived it is not healthy yet. An older agent sends none, so for it connected =
/// healthy (the rule before boot reports). Not connected: `up` is false anyway, and this says true.
pub fn image_healthy(
    protocol: Option<u16>,
    boot: Option<&BootReport>,
    version: Option<&str>,
) -> bool {
    match protocol {
        Some(p) if p >= UPDATE_PROTOCOL => {
            boot.is_some_and(|b| b.image.is_some() && b.image.as_deref() == version && b.healthy())
        }
        _ => true,
    }
}

impl Controller {
    /// Records a node's boot report on its connection `conn_id` (a report of a replaced connection
    /// is dropped), with a `node_boot_report` event, and wakes the rollout driver. Blocking
    /// (store).
    pub(crate) fn boot_reported(&self, node: &NodeId, conn_id: u64, report: BootReport) {
        {
            let mut live = self.live();
            match live.conns.get_mut(node).filter(|c| c.conn_id == conn_id) {
                Some(conn) => conn.boot = Some(report.clone()),
                None => return,
            }
        }
        let host = self.store.hostname_or_id(node);
        let failed: Vec<String> = report
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| {
                format!(
                    "{}{}",
                    c.name,
                    c.detail
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                )
            })
            .collect();
        let booted = report
            .image
            .as_deref()
            .map(|i| format!("image {i}"))
            .unwrap_or_else(|| "not a netboot image".into());
        let verdict = if failed.is_empty() {
            format!("{} check(s) passed", report.checks.len())
        } else {
            format!("checks failed: {}", failed.join(", "))
        };
        let message = format!(
            "{host}: booted {booted} (boot {}): {verdict}",
            report.boot_id
        );
        info!(node = %node, image = ?report.image, boot_id = %report.boot_id, healthy = report.healthy(), "boot report");
        if let Err(e) = self.store.append_event(
            EventKind::Maintenance(MaintenanceEvent::NodeBootReport),
            Some(node),
            &message,
            now_ms(),
        ) {
            warn!(node = %node, cause = %e, "could not record the boot report");
        }
        self.maint.wake.notify_one();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{netboot::images::tests::make_image, server::ControllerConfig};

    #[derive(Debug, Default)]
    struct Reboots(Mutex<Vec<NodeId>>, std::sync::atomic::AtomicBool);

    impl NodeRebooter for Reboots {
        fn reboot(&self, node: &NodeId) -> Result<(), UpgradeError> {
            if self.1.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(UpgradeError::NotConnected(node.clone()));
            }
            self.0.lock().unwrap().push(node.clone());
            Ok(())
        }
    }

    #[test]
    fn begin_assigns_the_image_and_reboots_roll_back_restores_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (make_image("2030.1"), make_image("2030.2"));
        let mut config = ControllerConfig::for_tests(dir.path().to_owned());
        for (i, img) in [&old, &new].iter().enumerate() {
            let path = dir.path().join(format!("key{i}.pub"));
            std::fs::write(&path, hex::encode(img.public)).unwrap();
            config.netboot.image_keys.push(path);
        }
        let ctl = Controller::open(config, "127.0.0.1:1".parse().unwrap()).unwrap();
        for (img, v) in [(&old, "2030.1"), (&new, "2030.2")] {
            for name in ["manifest.json", "manifest.sig", "vmlinuz", "initrd.img"] {
                ctl.netboot
                    .images
                    .stage(v, name, &std::fs::read(img.dir.path().join(name)).unwrap())
                    .unwrap();
            }
            ctl.netboot.images.commit(v).unwrap();
        }
        let node =
            crate::test_support::enrol_for_tests(&ctl.store, "m", &[], crate::server::now_ms());
        let reboots = Arc::new(Reboots::default());
        ctl.install_image_upgrader(reboots.clone());
        let up = ctl.maint.upgrader(&Target::Image("x".into())).unwrap();

        let err = up
            .begin(&node, &Target::Image("2031.9".into()))
            .unwrap_err();
        assert!(err.to_string().contains("image 2031.9"), "{err}");
        assert_eq!(
            ctl.netboot.machines.node_image(&node).unwrap(),
            None,
            "nothing assigned"
        );
        assert!(reboots.0.lock().unwrap().is_empty(), "no reboot");

        up.begin(&node, &Target::Image("2030.2".into())).unwrap();
        assert_eq!(
            ctl.netboot.machines.node_image(&node).unwrap().as_deref(),
            Some("2030.2")
        );
        up.roll_back(&node, Some("2030.1"), &Target::Image("2030.2".into()))
            .unwrap();
        assert_eq!(
            ctl.netboot.machines.node_image(&node).unwrap().as_deref(),
            Some("2030.1")
        );
        assert_eq!(reboots.0.lock().unwrap().len(), 2);
        assert!(
            up.roll_back(&node, None, &Target::Image("2030.2".into()))
                .is_err(),
            "previous image unknown"
        );
        reboots.1.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(up.begin(&node, &Target::Image("2030.2".into())).is_err());
        assert_eq!(
            ctl.netboot.machines.node_image(&node).unwrap().as_deref(),
            Some("2030.1"),
            "a failed request restores the assignment"
        );
        reboots.1.store(false, std::sync::atomic::Ordering::SeqCst);

        // A connected node that still runs the image to go back to (it refused the reboot into the
        // new one) gets its assignment back without being rebooted.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _enter = rt.enter();
        up.begin(&node, &Target::Image("2030.2".into())).unwrap();
        ctl.store
            .update_node(&node, |r| {
                r.inventory = Some(shoal_proto::Inventory {
                    os: "shoal netboot image 2030.1".into(),
                    ..Default::default()
                })
            })
            .unwrap();
        let before = reboots.0.lock().unwrap().len();
        up.roll_back(&node, Some("2030.1"), &Target::Image("2030.2".into()))
            .unwrap();
        assert_eq!(
            reboots.0.lock().unwrap().len(),
            before + 1,
            "not connected: the roll-back reboots"
        );
        let (_, _rx) = ctl.fake_connection(&node, 5);
        up.begin(&node, &Target::Image("2030.2".into())).unwrap();
        up.roll_back(&node, Some("2030.1"), &Target::Image("2030.2".into()))
            .unwrap();
        assert_eq!(
            reboots.0.lock().unwrap().len(),
            before + 2,
            "only the begin rebooted"
        );
        assert_eq!(
            ctl.netboot.machines.node_image(&node).unwrap().as_deref(),
            Some("2030.1"),
            "assignment restored"
        );
    }

    #[test]
    fn the_installed_rebooter_asks_v4_agents_only_and_records_answers() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _enter = rt.enter();
        let config = ControllerConfig::for_tests(dir.path().to_owned());
        let ctl = Controller::open(config, "127.0.0.1:1".parse().unwrap()).unwrap();
        assert!(
            ctl.maint.upgrader(&Target::Image("x".into())).is_some(),
            "Controller::open installs the image upgrader"
        );
        let old =
            crate::test_support::enrol_for_tests(&ctl.store, "old", &[], crate::server::now_ms());
        let new =
            crate::test_support::enrol_for_tests(&ctl.store, "new", &[], crate::server::now_ms());
        let away =
            crate::test_support::enrol_for_tests(&ctl.store, "away", &[], crate::server::now_ms());
        let (_, mut old_rx) = ctl.fake_connection(&old, 3);
        let (_, mut new_rx) = ctl.fake_connection(&new, 4);
        let rebooter = AgentRebooter {
            controller: Arc::downgrade(&ctl),
            prefer_kexec: true,
        };
        let err = rebooter.reboot(&old).unwrap_err();
        assert!(matches!(err, UpgradeError::Unsupported { .. }), "{err}");
        assert!(old_rx.try_recv().is_err(), "a v3 agent never gets Reboot");
        assert!(matches!(
            rebooter.reboot(&away),
            Err(UpgradeError::NotConnected(_))
        ));
        rebooter.reboot(&new).unwrap();
        match new_rx.try_recv() {
            Ok(ControllerMsg::Reboot {
                prefer_kexec: true,
                reason,
            }) => assert!(reason.contains("netboot image"), "{reason}"),
            other => panic!("expected Reboot, got {other:?}"),
        }
        ctl.reboot_answered(&new, Ok("kexec -e".into()));
        ctl.reboot_answered(&new, Err("remote reboots are disabled".into()));
        let events = ctl.store.events(None, 1000).unwrap();
        let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds
                .iter()
                .filter(|k| **k == EventKind::Maintenance(MaintenanceEvent::NodeRebootRequested))
                .count(),
            1
        );
        assert!(
            kinds.contains(&EventKind::Maintenance(MaintenanceEvent::NodeRebooting))
                && kinds.contains(&EventKind::Maintenance(MaintenanceEvent::NodeRebootRefused)),
            "{kinds:?}"
        );
        assert!(events.iter().any(|e| e
            .message
            .contains("refused to reboot: remote reboots are disabled")));
    }

    #[test]
    fn a_v4_node_gets_the_kexec_instructions_of_its_assigned_image_before_the_reboot() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _enter = rt.enter();
        let img = make_image("2030.2");
        let mut config = ControllerConfig::for_tests(dir.path().to_owned());
        let key = dir.path().join("key.pub");
        std::fs::write(&key, hex::encode(img.public)).unwrap();
        config.netboot.image_keys.push(key);
        let ctl = Controller::open(config, "127.0.0.1:1".parse().unwrap()).unwrap();
        for name in ["manifest.json", "manifest.sig", "vmlinuz", "initrd.img"] {
            ctl.netboot
                .images
                .stage(
                    "2030.2",
                    name,
                    &std::fs::read(img.dir.path().join(name)).unwrap(),
                )
                .unwrap();
        }
        ctl.netboot.images.commit("2030.2").unwrap();
        let manifest = ctl.netboot.images.get("2030.2").unwrap();
        let node = crate::test_support::enrol_for_tests(
            &ctl.store,
            "vm",
            &[("netboot.mac", "52:54:00:00:00:01")],
            crate::server::now_ms(),
        );
        let (_, mut rx) = ctl.fake_connection(&node, 4);
        let rebooter = AgentRebooter {
            controller: Arc::downgrade(&ctl),
            prefer_kexec: true,
        };
        ctl.netboot
            .machines
            .set_node_image(&node, "2030.2")
            .unwrap();

        // Netboot servers not running: no instructions, a plain Reboot.
        rebooter.reboot(&node).unwrap();
        assert!(matches!(rx.try_recv(), Ok(ControllerMsg::Reboot { .. })));

        let boot = crate::netboot::http::BootContext {
            controller_addr: "10.78.0.1:7440".parse().unwrap(),
            http_base: "http://10.78.0.1:7442".into(),
        };
        ctl.netboot.boot.set(boot).unwrap();
        rebooter.reboot(&node).unwrap();
        match rx.try_recv() {
            Ok(ControllerMsg::KexecImage(k)) => {
                assert_eq!(k.version, "2030.2");
                assert_eq!(
                    k.kernel_url,
                    format!(
                        "http://10.78.0.1:7442/images/2030.2/{}",
                        manifest.kernel.file
                    )
                );
                assert_eq!(
                    (k.kernel_sha256.as_str(), k.initrd_sha256.as_str()),
                    (
                        manifest.kernel.sha256.as_str(),
                        manifest.initrd.sha256.as_str()
                    )
                );
                assert!(
                    k.cmdline
                        .contains("shoal.controller=10.78.0.1:7440 shoal.token=")
                        && k.cmdline.contains("shoal.image=2030.2"),
                    "{}",
                    k.cmdline
                );
            }
            other => panic!("expected KexecImage, got {other:?}"),
        }
        assert!(
            matches!(
                rx.try_recv(),
                Ok(ControllerMsg::Reboot {
                    prefer_kexec: true,
                    ..
                })
            ),
            "the Reboot follows"
        );
        // A v5 agent gets the signed manifest, exactly as stored, and builds the command line
        // itself.
        let (_, mut rx5) = ctl.fake_connection(&node, 5);
        rebooter.reboot(&node).unwrap();
        match rx5.try_recv() {
            Ok(ControllerMsg::SignedKexecImage(k)) => {
                assert_eq!(k.version, "2030.2");
                assert_eq!(
                    k.manifest,
                    std::fs::read(img.dir.path().join("manifest.json")).unwrap()
                );
                assert_eq!(
                    k.signature,
                    std::fs::read(img.dir.path().join("manifest.sig")).unwrap()
                );
                assert_eq!(
                    k.kernel_url,
                    format!(
                        "http://10.78.0.1:7442/images/2030.2/{}",
                        manifest.kernel.file
                    )
                );
                assert_eq!(k.controller, "10.78.0.1:7440");
                assert!(
                    k.boot_token.parse::<shoal_proto::JoinToken>().is_ok(),
                    "{}",
                    k.boot_token
                );
            }
            other => panic!("expected SignedKexecImage, got {other:?}"),
        }
        assert!(matches!(
            rx5.try_recv(),
            Ok(ControllerMsg::Reboot {
                prefer_kexec: true,
                ..
            })
        ));
        // A v3 agent gets neither.
        let (_, mut old_rx) = ctl.fake_connection(&node, 3);
        assert!(rebooter.reboot(&node).is_err());
        assert!(old_rx.try_recv().is_err());
    }

    fn boot(image: Option<&str>, passed: &[bool]) -> BootReport {
        let checks = passed
            .iter()
            .enumerate()
            .map(|(i, p)| shoal_proto::CheckResult {
                name: format!("c{i}"),
                passed: *p,
                detail: (!p).then(|| "exit status: 1".into()),
            })
            .collect();
        BootReport {
            boot_id: "b1".into(),
            image: image.map(str::to_owned),
            checks,
        }
    }

    #[test]
    fn an_image_node_is_healthy_when_its_boot_report_says_so_and_v3_agents_when_connected() {
        let v2 = Some("v2");
        assert!(
            image_healthy(Some(3), None, v2),
            "a v3 agent sends no boot report: connected = healthy"
        );
        assert!(
            !image_healthy(Some(4), None, v2),
            "no report yet: not healthy yet"
        );
        assert!(image_healthy(
            Some(4),
            Some(&boot(Some("v2"), &[true, true, true])),
            v2
        ));
        assert!(
            !image_healthy(Some(4), Some(&boot(Some("v2"), &[true, true, false])), v2),
            "a failed check"
        );
        assert!(
            !image_healthy(Some(4), Some(&boot(Some("v2"), &[])), v2),
            "no check ran"
        );
        assert!(
            !image_healthy(Some(4), Some(&boot(Some("v1"), &[true])), v2),
            "the report is about another image"
        );
        assert!(
            !image_healthy(Some(4), Some(&boot(None, &[true])), v2),
            "not a netboot image"
        );
        assert!(!image_healthy(Some(4), Some(&boot(None, &[true])), None));
    }

    #[test]
    fn boot_reports_are_kept_with_their_connection_and_logged() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _enter = rt.enter();
        let config = ControllerConfig::for_tests(dir.path().to_owned());
        let ctl = Controller::open(config, "127.0.0.1:1".parse().unwrap()).unwrap();
        let node =
            crate::test_support::enrol_for_tests(&ctl.store, "vm", &[], crate::server::now_ms());
        let (conn_id, _rx) = ctl.fake_connection(&node, 4);
        ctl.boot_reported(&node, conn_id + 1000, boot(Some("v3"), &[true]));
        assert!(
            ctl.live().conns[&node].boot.is_none(),
            "a report of another connection is dropped"
        );
        ctl.boot_reported(&node, conn_id, boot(Some("v3"), &[true, false]));
        let view =
            crate::registry::routes::node_view(&ctl, ctl.store.node(&node).unwrap().unwrap());
        assert_eq!(
            view.boot.as_ref().and_then(|b| b.image.as_deref()),
            Some("v3")
        );
        assert!(!view.boot.unwrap().healthy());
        let events = ctl.store.events(None, 1000).unwrap();
        let e = events
            .iter()
            .find(|e| e.kind == EventKind::Maintenance(MaintenanceEvent::NodeBootReport))
            .expect("boot report event");
        assert!(
            e.message.contains("booted image v3")
                && e.message.contains("checks failed: c1 (exit status: 1)"),
            "{}",
            e.message
        );
    }
}
