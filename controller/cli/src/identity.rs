//! `shoalctl nodes pending|approve|deny|reenrol|rotate-key` and `shoalctl certs …`: the operator's
//! side of node identity (see the operators' guide, "Enrolment rules and re-enrolling a node").

use std::time::Duration;

use clap::Subcommand;
use shoal_api::{
    identity::{CertView, PendingView, ReenrolRequest, RevokeCertRequest, RevokedCertView},
    AdminClient,
};

use super::{print_json, table, Output};

#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// A node's unexpired certificates: serial, validity, key, revocation.
    List {
        /// Node id or hostname.
        node: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
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
pub fn pending(client: &AdminClient, output: Output) -> anyhow::Result<()> {
    let pending: Vec<PendingView> = client.get("/v1/enrolments/pending")?;
    match output {
        Output::Json => print_json(&pending)?,
        Output::Table => table(
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
            pending.iter().map(|p| {
                vec![
                    p.id.clone(),
                    format!("{} ({})", p.node, p.node_hostname),
                    p.hostname.clone(),
                    p.hardware_id.clone(),
                    p.key.clone(),
                    p.remote.clone(),
                    p.attempts.to_string(),
                    p.last_seen.clone(),
                    p.state.clone(),
                ]
            }),
        ),
    }
    Ok(())
}

/// Approves or denies a pending claim.
pub fn decide(client: &AdminClient, id: &str, approve: bool) -> anyhow::Result<()> {
    let verb = if approve { "approve" } else { "deny" };
    let p: PendingView = client.post(
        &format!("/v1/enrolments/pending/{id}/{verb}"),
        &serde_json::json!({}),
    )?;
    if approve {
        println!(
            "approved: the machine's next attempt re-enrols it as node {} (key {})",
            p.node, p.key
        );
    } else {
        println!(
            "denied: the machine's claim to node {} is refused from now on",
            p.node
        );
    }
    Ok(())
}

/// Arms a one-time re-enrolment.
pub fn reenrol(client: &AdminClient, node: &str, ttl: Option<Duration>) -> anyhow::Result<()> {
    let req = ReenrolRequest {
        ttl_secs: ttl.map(|d| d.as_secs().max(1)),
    };
    client.post_no_content(&format!("/v1/nodes/{node}/reenrol"), &req)?;
    let ttl = ttl
        .map(|d| humantime::format_duration(d).to_string())
        .unwrap_or_else(|| "1h".into());
    println!("armed: the next machine that claims node {node} with a valid join token within {ttl} gets it (unless the node is connected)");
    Ok(())
}

/// Asks a node to rotate its key.
pub fn rotate_key(client: &AdminClient, node: &str) -> anyhow::Result<()> {
    client.post_no_content(
        &format!("/v1/nodes/{node}/rotate-key"),
        &serde_json::json!({}),
    )?;
    println!("node {node} rotates its key now if it is connected, else on its next session");
    Ok(())
}

/// `shoalctl certs …`.
pub fn certs(client: &AdminClient, cmd: CertsCmd) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::List { node, output } => {
            let node = crate::nodes::resolve(client, &node)?;
            let certs: Vec<CertView> = client.get(&format!("/v1/nodes/{node}/certificates"))?;
            match output {
                Output::Json => print_json(&certs)?,
                Output::Table => table(
                    &["SERIAL", "ISSUED", "EXPIRES", "KEY", "STATE"],
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
                            c.issued_at.clone(),
                            c.not_after.clone(),
                            c.key.clone(),
                            state,
                        ]
                    }),
                ),
            }
        }
        CertsCmd::Revoke { serial, reason } => {
            let done: RevokedCertView = client.post(
                &format!("/v1/certificates/{serial}/revoke"),
                &RevokeCertRequest { reason },
            )?;
            println!("revoked certificate {} of node {}", done.serial, done.node);
            if done.closed_connections > 0 {
                println!("closed the connection that used it");
            }
            if done.rotation_required {
                println!("it held the node's current key: the node must rotate to a new key (it does so on its next session)");
            }
        }
    }
    Ok(())
}
