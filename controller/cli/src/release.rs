//! `shoalctl release …`: sign and upload agent releases, list them, offer one to a node, and show
//! what agents report.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{bail, Context};
use clap::Subcommand;
use shoal_api::{
    releases::{AgentUpdateView, OfferUpdate, ReleaseView, BINARY, MANIFEST, SIGNATURE},
    signing::{generate_signing_key, load_signing_key, sign_release},
    AdminClient,
};
use shoal_proto::UnixMillis;

use super::{output::Out, progress};

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
        /// The release signing key: PEM from `shoalctl release keygen` (or `openssl genpkey
        /// -algorithm ed25519`).
        #[arg(long)]
        key: PathBuf,
        /// The target triple the binary runs on (default: this machine's).
        #[arg(long)]
        target: Option<String>,
    },
    /// List stored releases.
    List {},
    /// Offer a stored release to one node's agent (a rollout does this for many).
    Offer {
        /// Node id or hostname.
        node: String,
        /// Release version.
        #[arg(long)]
        version: String,
    },
    /// What each agent reported about its last update.
    Status {},
    /// Make a release signing key pair: the private key (PEM PKCS#8 Ed25519, as `openssl genpkey
    /// -algorithm ed25519` writes it; mode 0600) and beside it the public key as 64 hex
    /// characters, for the controller's and the agents' --release-key. Never overwrites.
    Keygen(Keygen),
}

/// `release keygen`.
#[derive(Debug, clap::Args)]
pub struct Keygen {
    /// The private key file to write (`release.pem`); the public key goes beside it with `.pub`
    /// for `.pem` (`release.pub`), or with `.pub` appended.
    key: PathBuf,
}

/// Where `keygen` writes the public key: `release.pem` → `release.pub`, `key` → `key.pub`.
fn public_path(key: &Path) -> PathBuf {
    if key.extension().is_some_and(|e| e == "pem") {
        key.with_extension("pub")
    } else {
        let mut p = key.as_os_str().to_owned();
        p.push(".pub");
        PathBuf::from(p)
    }
}

/// Writes `text` to a new file (never over an existing one) with `mode`.
fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// `shoalctl release keygen KEY`.
pub fn keygen(args: &Keygen, out: &Out) -> anyhow::Result<()> {
    let public_file = public_path(&args.key);
    for p in [&args.key, &public_file] {
        if p.symlink_metadata().is_ok() {
            bail!("{} exists: refusing to overwrite a key", p.display());
        }
    }
    let made = generate_signing_key()?;
    write_new(&args.key, &made.private_pem, 0o600)?;
    if let Err(e) = write_new(&public_file, &format!("{}\n", made.public_hex), 0o644) {
        // A private key without its public half would only confuse; take it back.
        let _ = std::fs::remove_file(&args.key);
        return Err(e);
    }
    let id = &made.key_id;
    let written = serde_json::json!({
        "private_key": args.key,
        "public_key_file": public_file,
        "public_key": made.public_hex,
        "key_id": id,
    });
    out.show(&written, || {
        say!(
            "wrote the private key {} (mode 0600; keep it secret) and the public key {} (key id {id})",
            args.key.display(),
            public_file.display()
        );
        say!(
            "trust it with `shoal-controller serve --release-key {}` and `shoal-agent --release-key {}`",
            public_file.display(),
            public_file.display()
        );
    })
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

pub fn release(client: &AdminClient, cmd: ReleaseCmd, out: &Out) -> anyhow::Result<()> {
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
            progress::upload(client, &format!("{base}/files/{BINARY}"), "binary", &bytes)
                .context("uploading the binary")?;
            let view: ReleaseView = client.post(&base, &serde_json::json!({}))?;
            out.show(&view, || {
                say!(
                    "added agent release {} for {} ({} bytes, key {})",
                    view.version,
                    view.target,
                    view.size,
                    view.key_id
                )
            })?;
        }
        ReleaseCmd::List {} => {
            let list: Vec<ReleaseView> = client.get("/v1/releases")?;
            out.show(&list, || {
                out.table_wide(
                    &["VERSION", "TARGET", "SIZE", "SHA256", "KEY", "SIGNED"],
                    &["SIGNED AT"],
                    list.iter().map(|r| {
                        vec![
                            r.version.clone(),
                            r.target.clone(),
                            r.size.to_string(),
                            r.sha256[..16.min(r.sha256.len())].to_owned(),
                            r.key_id.clone(),
                            out.age(&r.created_at),
                            r.created_at.clone(),
                        ]
                    }),
                );
            })?
        }
        ReleaseCmd::Keygen(k) => keygen(&k, out)?,
        ReleaseCmd::Offer { node, version } => {
            let node = crate::nodes::resolve(client, &node)?;
            client.post_no_content(
                &format!("/v1/nodes/{node}/agent-update"),
                &OfferUpdate {
                    version: version.clone(),
                },
            )?;
            // The API answers 204: the JSON is the node's update record as it is now.
            let all: Vec<AgentUpdateView> = client.get("/v1/agent-updates")?;
            let record = all.into_iter().find(|u| u.node == node);
            out.show(&record, || say!("offered agent {version} to {node}"))?;
        }
        ReleaseCmd::Status {} => {
            let list: Vec<AgentUpdateView> = client.get("/v1/agent-updates")?;
            out.show(&list, || {
                out.table(
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
                );
            })?;
        }
    }
    Ok(())
}
