//! `shoalctl release …`: sign and upload agent releases, list them, offer one to a node, and show
//! what agents report.

use std::{path::PathBuf, time::SystemTime};

use anyhow::Context;
use clap::Subcommand;
use shoal_api::{
    releases::{AgentUpdateView, OfferUpdate, ReleaseView, BINARY, MANIFEST, SIGNATURE},
    signing::{load_signing_key, sign_release},
    AdminClient,
};
use shoal_proto::UnixMillis;

use super::{print_json, table, Output};

#[derive(Debug, Subcommand)]
pub enum ReleaseCmd {
    /// Sign an agent binary with the release key (here, on this machine: the controller never sees
    /// the private key) and upload it. The controller checks it against its --release-key.
    Add {
        /// The shoal-agent binary.
        binary: PathBuf,
        /// The version the binary reports (`shoal-agent --version`).
        #[arg(long)]
        version: String,
        /// The release signing key: PEM from `openssl genpkey -algorithm ed25519`.
        #[arg(long)]
        key: PathBuf,
        /// The target triple the binary runs on (default: this machine's).
        #[arg(long)]
        target: Option<String>,
    },
    /// List stored releases.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Offer a stored release to one node's agent (a rollout does this for many).
    Offer {
        /// Node id or hostname.
        node: String,
        /// Release version.
        #[arg(long)]
        version: String,
    },
    /// What each agent reported about its last update.
    Status {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

/// Now, as the release manifest's `created_at`.
fn now_ms() -> UnixMillis {
    UnixMillis(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

/// This machine's target triple, as the agent computes its own.
fn host_target() -> String {
    let env = if cfg!(target_env = "musl") {
        "musl"
    } else {
        "gnu"
    };
    format!(
        "{}-unknown-{}-{env}",
        std::env::consts::ARCH,
        std::env::consts::OS
    )
}

pub fn release(client: &AdminClient, cmd: ReleaseCmd) -> anyhow::Result<()> {
    match cmd {
        ReleaseCmd::Add {
            binary,
            version,
            key,
            target,
        } => {
            let pem = std::fs::read_to_string(&key)
                .with_context(|| format!("reading {}", key.display()))?;
            let key = load_signing_key(&pem)?;
            let bytes =
                std::fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
            let target = target.unwrap_or_else(host_target);
            let (_, signed) = sign_release(&bytes, &version, &target, now_ms(), &key)?;
            let base = format!("/v1/releases/{version}/{target}");
            client
                .upload(&format!("{base}/files/{MANIFEST}"), &signed.manifest)
                .context("uploading the manifest")?;
            client
                .upload(&format!("{base}/files/{SIGNATURE}"), &signed.signature)
                .context("uploading the signature")?;
            client
                .upload(&format!("{base}/files/{BINARY}"), &bytes)
                .context("uploading the binary")?;
            let view: ReleaseView = client.post(&base, &serde_json::json!({}))?;
            say!(
                "added agent release {} for {} ({} bytes, key {})",
                view.version,
                view.target,
                view.size,
                view.key_id
            );
        }
        ReleaseCmd::List { output } => {
            let list: Vec<ReleaseView> = client.get("/v1/releases")?;
            match output {
                Output::Json => print_json(&list)?,
                Output::Table => table(
                    &["VERSION", "TARGET", "SIZE", "SHA256", "KEY", "SIGNED"],
                    list.iter().map(|r| {
                        vec![
                            r.version.clone(),
                            r.target.clone(),
                            r.size.to_string(),
                            r.sha256[..16.min(r.sha256.len())].to_owned(),
                            r.key_id.clone(),
                            r.created_at.clone(),
                        ]
                    }),
                ),
            }
        }
        ReleaseCmd::Offer { node, version } => {
            let node = crate::nodes::resolve(client, &node)?;
            client.post_no_content(
                &format!("/v1/nodes/{node}/agent-update"),
                &OfferUpdate {
                    version: version.clone(),
                },
            )?;
            say!("offered agent {version} to {node}");
        }
        ReleaseCmd::Status { output } => {
            let list: Vec<AgentUpdateView> = client.get("/v1/agent-updates")?;
            match output {
                Output::Json => print_json(&list)?,
                Output::Table => table(
                    &[
                        "NODE",
                        "RUNNING",
                        "OFFERED",
                        "ATTEMPTED",
                        "STARTS",
                        "CHECKS",
                        "FAILURE",
                    ],
                    list.iter().map(|u| {
                        let r = u.report.as_ref();
                        let checks = r
                            .map(|r| {
                                r.checks
                                    .iter()
                                    .map(|c| {
                                        format!(
                                            "{}:{}",
                                            c.name,
                                            if c.passed { "ok" } else { "failed" }
                                        )
                                    })
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .unwrap_or_default();
                        vec![
                            u.node.clone(),
                            r.map(|r| r.running.clone()).unwrap_or_else(|| "-".into()),
                            u.offered.clone().unwrap_or_else(|| "-".into()),
                            r.and_then(|r| r.attempted.clone())
                                .unwrap_or_else(|| "-".into()),
                            r.map(|r| r.attempts.to_string()).unwrap_or_default(),
                            checks,
                            u.failure.clone().unwrap_or_else(|| "-".into()),
                        ]
                    }),
                ),
            }
        }
    }
    Ok(())
}
