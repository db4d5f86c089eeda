//! Remote reboots as the shell carries them out: the image named for the next reboot (judged with
//! [`reboot::check_image`]), a reboot request decided by [`reboot::decide`] and acknowledged with
//! the method that will really be used, and the reboot itself after a grace period.

use std::time::Duration;

use shoal_overlay::{pki, send_msg};
use shoal_proto::{AgentMsg, KexecImage, SignedKexecImage};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::shell::{AttemptError, Shell, ShellEvent};
use crate::{
    reboot::{self, NamedImage, RebootMethod},
    state::Credentials,
};

/// How long an acknowledged reboot waits, for the acknowledgement to reach the controller.
const REBOOT_GRACE: Duration = Duration::from_secs(1);

impl Shell<'_> {
    /// An unsigned image (a v4 controller) for the next reboot: nothing this node can verify, so no
    /// kexec into it.
    pub(super) fn unsigned_image(&mut self, image: KexecImage) {
        info!(image = %image.version, "the controller names an unsigned image for the next reboot; it will be a full reboot");
        self.kexec = Some(NamedImage::Untrusted {
            version: image.version,
            why: "unsigned (KexecImage)",
        });
    }

    /// A signed image for the next reboot, judged with this node's own image keys.
    pub(super) fn signed_image(&mut self, image: SignedKexecImage, creds: Option<&Credentials>) {
        let ca = creds.map(|c| pki::sha256(&c.ca_der));
        let named = reboot::check_image(&image, &self.config.reboot.image_keys, ca);
        match &named {
            NamedImage::Verified(_) => {
                info!(image = %image.version, "the image named for the next reboot verified with this node's image key")
            }
            NamedImage::Refused { reason, .. } => {
                warn!(image = %image.version, %reason, "the image named for the next reboot is refused; the reboot will be too")
            }
            NamedImage::Untrusted { why, .. } => {
                info!(image = %image.version, why, "no kexec into the image named for the next reboot; it will be a full reboot")
            }
        }
        self.kexec = Some(named);
    }

    /// The controller asks to reboot: refused, acknowledged and done, or (kexec into a named
    /// image) loaded first and acknowledged when loaded ([`ShellEvent::RebootReady`]).
    pub(super) async fn reboot(
        &mut self,
        send: &mut quinn::SendStream,
        reason: String,
        prefer_kexec: bool,
    ) -> Result<(), AttemptError> {
        // One named image per reboot: a later request without one does not reuse it.
        let named = self.kexec.take();
        match reboot::decide(&self.config.reboot, prefer_kexec, named.as_ref()) {
            Err(refusal) => {
                warn!(%reason, %refusal, "the controller asks to reboot; refused");
                send_msg(send, &AgentMsg::RebootRefused { reason: refusal }).await?;
            }
            Ok(method @ RebootMethod::KexecImage(_)) => {
                // Load first (seconds), off the session loop; acknowledge with what will really
                // happen (kexec, or the full reboot if loading failed).
                warn!(%reason, %method, "the controller asks to reboot; loading the image first");
                let events = self.events.clone();
                let dir = self.config.reboot.kexec_dir.clone();
                tokio::spawn(async move {
                    let (method, ack) =
                        tokio::task::spawn_blocking(move || reboot::prepare(method, &dir))
                            .await
                            .unwrap_or_else(|e| {
                                (
                                    RebootMethod::Syscall,
                                    format!("reboot(2) (loading the image failed: {e})"),
                                )
                            });
                    let _ = events.send(ShellEvent::RebootReady { method, ack });
                });
            }
            Ok(method) => {
                warn!(%reason, %method, "the controller asks to reboot; rebooting");
                send_msg(
                    send,
                    &AgentMsg::RebootAck {
                        method: method.to_string(),
                    },
                )
                .await?;
                spawn_reboot(self.events.clone(), method, ShellEvent::RebootFailed);
            }
        }
        Ok(())
    }

    /// A kexec image is loaded (or loading failed): reboot, and acknowledge with the method.
    pub(super) fn reboot_ready(
        &mut self,
        method: RebootMethod,
        ack: String,
        ready: bool,
    ) -> Option<AgentMsg> {
        warn!(%ack, "rebooting");
        spawn_reboot(self.events.clone(), method, ShellEvent::RebootFailed);
        (ready && self.updates).then_some(AgentMsg::RebootAck { method: ack })
    }

    /// An acknowledged reboot did not happen: tell the controller.
    pub(super) fn reboot_failed(&self, reason: String, ready: bool) -> Option<AgentMsg> {
        warn!(%reason, "the reboot did not happen");
        (ready && self.updates).then_some(AgentMsg::RebootRefused { reason })
    }
}

/// Reboots after [`REBOOT_GRACE`] (for the acknowledgement to leave); a reboot that did not happen
/// comes back as the event `failed` makes of the error ([`ShellEvent::RebootFailed`] for a
/// controller's reboot request, a failed step for a maintenance reboot).
pub(super) fn spawn_reboot(
    events: mpsc::UnboundedSender<ShellEvent>,
    method: RebootMethod,
    failed: impl FnOnce(String) -> ShellEvent + Send + 'static,
) {
    tokio::spawn(async move {
        tokio::time::sleep(REBOOT_GRACE).await;
        let result = tokio::task::spawn_blocking(move || reboot::execute(&method))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = result {
            let _ = events.send(failed(e));
        }
    });
}
