//! `shoalctl nodes pending|approve|deny|reenrol|rotate-key` and `shoalctl certs …`: the operator's
//! side of node identity (see the operators' guide, "Enrolment rules and re-enrolling a node").

use std::time::Duration;

use clap::Subcommand;
use shoal_api::{
    identity::{CertView, PendingView, ReenrolRequest, RevokeCertRequest, RevokedCertView},
    nodes::NodeView,
    AdminClient,
};

use super::Out;

#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// A node's unexpired certificates: serial, validity, key, revocation.
    List {
        /// Node id or hostname.
        node: String,
    },
    /// Revoke one certificate by serial: connections using it close at once and it is refused from
    /// then on. If it holds the node's current key, the node must rotate to a new key.
    Revoke {
        /// Serial, as `certs list` shows it.
        serial: String,
        /// Why (kept with the revocation and shown in events).
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Lists claims waiting for an operator.
pub fn pending(client: &AdminClient, out: &Out) -> anyhow::Result<()> {
    let pending: Vec<PendingView> = client.get("/v1/enrolments/pending")?;
    out.show(&pending, || {
        out.table_wide(
            &[
                "ID",
                "NODE",
                "CLAIMED BY",
                "HARDWARE ID",
                "KEY",
                "FROM",
                "ATTEMPTS",
                "LAST SEEN",
                "STATE",
            ],
            &["LAST SEEN AT"],
            pending.iter().map(|p| {
                vec![
                    p.id.clone(),
                    format!("{} ({})", p.node, p.node_hostname),
                    p.hostname.clone(),
                    p.hardware_id.clone(),
                    p.key.clone(),
                    p.remote.clone(),
                    p.attempts.to_string(),
                    out.age(&p.last_seen),
                    p.state.clone(),
                    p.last_seen.clone(),
                ]
            }),
        );
    })?;
    Ok(())
}

/// Approves or denies a pending claim.
pub fn decide(client: &AdminClient, id: &str, approve: bool, out: &Out) -> anyhow::Result<()> {
    let verb = if approve { "approve" } else { "deny" };
    let p: PendingView = client.post(
        &format!("/v1/enrolments/pending/{id}/{verb}"),
        &serde_json::json!({}),
    )?;
    out.show(&p, || {
        if approve {
            say!(
                "approved: the machine's next attempt re-enrols it as node {} (key {})",
                p.node,
                p.key
            );
        } else {
            say!(
                "denied: the machine's claim to node {} is refused from now on",
                p.node
            );
        }
    })
}

/// Arms a one-time re-enrolment.
pub fn reenrol(
    client: &AdminClient,
    node: &str,
    ttl: Option<Duration>,
    out: &Out,
) -> anyhow::Result<()> {
    let req = ReenrolRequest {
        ttl_secs: ttl.map(|d| d.as_secs().max(1)),
    };
    client.post_no_content(&format!("/v1/nodes/{node}/reenrol"), &req)?;
    let ttl = ttl
        .map(|d| humantime::format_duration(d).to_string())
        .unwrap_or_else(|| "1h".into());
    // The API answers 204: the JSON is the node as it is now.
    let view: NodeView = client.get(&format!("/v1/nodes/{node}"))?;
    out.show(&view, || say!("armed: the next machine that claims node {node} with a valid join token within {ttl} gets it (unless the node is connected)"))
}

/// Asks a node to rotate its key.
pub fn rotate_key(client: &AdminClient, node: &str, out: &Out) -> anyhow::Result<()> {
    client.post_no_content(
        &format!("/v1/nodes/{node}/rotate-key"),
        &serde_json::json!({}),
    )?;
    let view: NodeView = client.get(&format!("/v1/nodes/{node}"))?;
    out.show(&view, || {
        say!("node {node} rotates its key now if it is connected, else on its next session")
    })
}

/// `shoalctl certs …`.
pub fn certs(client: &AdminClient, cmd: CertsCmd, out: &Out) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::List { node } => {
            let node = crate::nodes::resolve(client, &node)?;
            let certs: Vec<CertView> = client.get(&format!("/v1/nodes/{node}/certificates"))?;
            out.show(&certs, || {
                out.table_wide(
                    &["SERIAL", "ISSUED", "EXPIRES", "KEY", "STATE"],
                    &["ISSUED AT", "EXPIRES AT"],
                    certs.iter().map(|c| {
                        let state = match (&c.revoked_at, c.current_key) {
                            (Some(at), _) => format!(
                                "revoked {at}: {}",
                                c.revoked_reason.clone().unwrap_or_default()
                            ),
                            (None, true) => "valid (current key)".to_owned(),
                            (None, false) => "valid (old key: refused)".to_owned(),
                        };
                        vec![
                            c.serial.clone(),
                            out.age(&c.issued_at),
                            out.age(&c.not_after),
                            c.key.clone(),
                            state,
                            c.issued_at.clone(),
                            c.not_after.clone(),
                        ]
                    }),
                );
            })?
        }
        CertsCmd::Revoke { serial, reason } => {
            let done: RevokedCertView = client.post(
                &format!("/v1/certificates/{serial}/revoke"),
                &RevokeCertRequest { reason },
            )?;
            out.show(&done, || {
                say!("revoked certificate {} of node {}", done.serial, done.node);
                if done.closed_connections > 0 {
                    say!("closed the connection that used it");
                }
                if done.rotation_required {
                    say!("it held the node's current key: the node must rotate to a new key (it does so on its next session)");
                }
            })?;
        }
    }
    Ok(())
}
