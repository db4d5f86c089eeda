//! The netboot image executor: a [`NodeUpgrader`] for [`Target::Image`].
//!
//! `begin` checks the image is in the image store, assigns it to the node (what `shoalctl nodes
//! set-image` does) and asks the node to reboot; `roll_back` assigns the previous image and asks
//! again. The node comes back by netbooting the assigned image and re-enrolling; the driver sees the
//! new version in its inventory (`shoal netboot image V`). Asking a node to reboot needs a message of
//! protocol v4, which the agent update path adds: it is the [`NodeRebooter`] given to
//! [`Controller::install_image_upgrader`].

use std::sync::{Arc, Weak};

use shoal_proto::NodeId;
use tracing::info;

use super::{NodeUpgrader, TargetKind, UpgradeError};
use crate::{rollout::Target, server::Controller};

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
        let ctl = self.controller.upgrade().ok_or_else(|| UpgradeError::Failed("the controller is shutting down".into()))?;
        ctl.netboot.images.get(version).map_err(|e| UpgradeError::Failed(format!("image {version}: {e}")))?;
        ctl.netboot
            .machines
            .set_node_image(node, version)
            .map_err(|e| UpgradeError::Failed(format!("cannot assign image {version}: {e}")))?;
        info!(node = %node, image = %version, "image assigned; asking the node to reboot");
        self.rebooter.reboot(node)
    }
}

impl NodeUpgrader for ImageUpgrader {
    fn begin(&self, node: &NodeId, target: &Target) -> Result<(), UpgradeError> {
        self.assign_and_reboot(node, target.version())
    }

    fn roll_back(&self, node: &NodeId, to: Option<&str>, _target: &Target) -> Result<(), UpgradeError> {
        let to = to.ok_or_else(|| UpgradeError::Failed(format!("the image {node} booted before is not known")))?;
        self.assign_and_reboot(node, to)
    }
}

impl Controller {
    /// Installs the netboot image executor, with the agent path's way of asking a node to reboot.
    pub fn install_image_upgrader(self: &Arc<Self>, rebooter: Arc<dyn NodeRebooter>) {
        let upgrader = ImageUpgrader { controller: Arc::downgrade(self), rebooter };
        self.set_upgrader(TargetKind::Image, Arc::new(upgrader));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{netboot::images::tests::make_image, server::ControllerConfig};

    #[derive(Debug, Default)]
    struct Reboots(Mutex<Vec<NodeId>>);

    impl NodeRebooter for Reboots {
        fn reboot(&self, node: &NodeId) -> Result<(), UpgradeError> {
            self.0.lock().unwrap().push(node.clone());
            Ok(())
        }
    }

    #[test]
    fn begin_assigns_the_image_and_reboots_roll_back_restores_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (make_image("2030.1"), make_image("2030.2"));
        let mut config = ControllerConfig::new(dir.path().to_owned());
        config.overlay_subnet = "10.70.0.0/24".parse().unwrap();
        for (i, img) in [&old, &new].iter().enumerate() {
            let path = dir.path().join(format!("key{i}.pub"));
            std::fs::write(&path, hex::encode(img.public)).unwrap();
            config.netboot.image_keys.push(path);
        }
        let ctl = Controller::open(config, "127.0.0.1:1".parse().unwrap()).unwrap();
        for (img, v) in [(&old, "2030.1"), (&new, "2030.2")] {
            for name in ["manifest.json", "manifest.sig", "vmlinuz", "initrd.img"] {
                ctl.netboot.images.stage(v, name, &std::fs::read(img.dir.path().join(name)).unwrap()).unwrap();
            }
            ctl.netboot.images.commit(v).unwrap();
        }
        let node = crate::networks::enrol_for_tests(&ctl.store, "m", &[], crate::server::now_ms());
        let reboots = Arc::new(Reboots::default());
        ctl.install_image_upgrader(reboots.clone());
        let up = ctl.maint.upgrader(&Target::Image("x".into())).unwrap();

        let err = up.begin(&node, &Target::Image("2031.9".into())).unwrap_err();
        assert!(err.to_string().contains("image 2031.9"), "{err}");
        assert_eq!(ctl.netboot.machines.node_image(&node).unwrap(), None, "nothing assigned");
        assert!(reboots.0.lock().unwrap().is_empty(), "no reboot");

        up.begin(&node, &Target::Image("2030.2".into())).unwrap();
        assert_eq!(ctl.netboot.machines.node_image(&node).unwrap().as_deref(), Some("2030.2"));
        up.roll_back(&node, Some("2030.1"), &Target::Image("2030.2".into())).unwrap();
        assert_eq!(ctl.netboot.machines.node_image(&node).unwrap().as_deref(), Some("2030.1"));
        assert_eq!(reboots.0.lock().unwrap().len(), 2);
        assert!(up.roll_back(&node, None, &Target::Image("2030.2".into())).is_err(), "previous image unknown");
    }
}
