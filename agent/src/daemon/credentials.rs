//! The node's key and certificates as the session changes them: storing an enrolment, renewing,
//! rotating to a new key, and handing a renewed certificate to the overlay.

use rustls_pki_types::PrivateKeyDer;
use shoal_overlay::{node::NodeCommand, pki, send_msg, tls::PeerTls};
use shoal_proto::{AgentMsg, Enrolled, RenewRequest, Renewed};
use tracing::{info, warn};

use super::{
    shell::{AttemptError, Shell},
    AgentError,
};
use crate::state::Credentials;

impl Shell<'_> {
    /// Enrolment succeeded: the enrolment key becomes the node key, with the new certificate.
    pub(super) fn store_enrolled(&self, e: &Enrolled, key_pem: &str) -> Result<(), AgentError> {
        let creds = Credentials {
            key_pem: key_pem.to_owned(),
            cert_der: e.cert_der.clone(),
            ca_der: e.ca_der.clone(),
            node_id: e.node_id.clone(),
            not_after: e.not_after,
        };
        self.state.save_enrolled(&creds)?;
        info!(node = %e.node_id, "enrolled");
        Ok(())
    }

    /// Asks for a new certificate for the same key.
    pub(super) async fn renew(
        &self,
        send: &mut quinn::SendStream,
        key_pem: &str,
    ) -> Result<(), AttemptError> {
        let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| AgentError::Tls(e.to_string()))?;
        let csr_der = pki::make_csr(&key).map_err(|e| AgentError::Tls(e.to_string()))?;
        info!("renewing certificate");
        send_msg(send, &AgentMsg::Renew(RenewRequest { csr_der })).await?;
        Ok(())
    }

    /// Stores a renewed certificate and gives it to the overlay.
    pub(super) fn store_renewed(
        &self,
        r: Renewed,
        creds: Option<&Credentials>,
    ) -> Result<(), AgentError> {
        let Some(c) = creds else { return Ok(()) };
        let mut renewed = c.clone();
        renewed.cert_der = r.cert_der;
        renewed.not_after = r.not_after;
        self.state.save(&renewed)?;
        info!(not_after = r.not_after.0, "certificate renewed");
        if let Some(node) = self.overlay.node() {
            match key_der(&renewed.key_pem).and_then(|k| {
                PeerTls::new(&renewed.ca_der, &renewed.cert_der, k)
                    .map_err(|e| AgentError::Tls(e.to_string()))
            }) {
                Ok(tls) => {
                    node.command(NodeCommand::Tls(tls));
                }
                Err(e) => warn!(cause = %e, "overlay keeps the old certificate"),
            }
        }
        Ok(())
    }

    /// The controller asks for a new key: a CSR for it, signed over with the current key.
    pub(super) async fn rotate(
        &self,
        send: &mut quinn::SendStream,
        reason: String,
        key_pem: &str,
        creds: Option<&Credentials>,
    ) -> Result<(), AttemptError> {
        let Some(c) = creds else { return Ok(()) };
        warn!(%reason, "the controller asks this node to rotate its key");
        let old = rcgen::KeyPair::from_pem(key_pem).map_err(|e| AgentError::Tls(e.to_string()))?;
        let new_pem = self.state.rotation_key().map_err(AgentError::from)?;
        let new = rcgen::KeyPair::from_pem(&new_pem).map_err(|e| AgentError::Tls(e.to_string()))?;
        let csr_der = pki::make_csr(&new).map_err(|e| AgentError::Tls(e.to_string()))?;
        let new_spki = pki::csr_spki(&csr_der).map_err(|e| AgentError::Tls(e.to_string()))?;
        let signature = pki::sign_rotation(&old, &c.node_id, &new_spki)
            .map_err(|e| AgentError::Tls(e.to_string()))?;
        send_msg(
            send,
            &AgentMsg::RotateKey(shoal_proto::RotateKeyRequest { csr_der, signature }),
        )
        .await?;
        Ok(())
    }

    /// The certificate for the rotated key: the new key and it replace the old pair.
    pub(super) fn store_rotated(
        &self,
        r: Renewed,
        creds: Option<&Credentials>,
    ) -> Result<(), AgentError> {
        let Some(c) = creds else { return Ok(()) };
        let key_pem = self.state.rotation_key()?;
        let rotated = Credentials {
            key_pem,
            cert_der: r.cert_der,
            not_after: r.not_after,
            ..c.clone()
        };
        self.state.save_rotated(&rotated)?;
        info!(
            not_after = r.not_after.0,
            "key rotated; reconnecting with the new key"
        );
        Ok(())
    }
}

/// The node key in the form rustls takes.
pub(super) fn key_der(key_pem: &str) -> Result<PrivateKeyDer<'static>, AgentError> {
    let key =
        rcgen::KeyPair::from_pem(key_pem).map_err(|e| AgentError::Tls(format!("node key: {e}")))?;
    Ok(pki::tls_key(&key))
}
