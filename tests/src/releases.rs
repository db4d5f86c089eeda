//! Agent releases for host tests: a release signing key made with `openssl`, other versions of the
//! agent made by patching its version slot, install directories an update may replace the binary
//! in, and the `shoalctl release` calls around them.
//!
//! A "new version" is the same agent binary with its version slot patched (`shoal_agent::version`):
//! a different file (different hash, signed separately) that reports a different version, made
//! without a second cargo build, which in another target directory would rebuild every dependency.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use shoal_testkit::cmd::output as run;

use crate::Fleet;

/// The bytes before the version slot in the agent binary
/// (`shoal_agent::version::VERSION_SLOT_MAGIC`).
pub const SLOT_MAGIC: &[u8; 16] = b"\0SHOALVERSLOT\x01\x02\0";
/// The length of the version slot (NUL-padded).
pub const SLOT_LEN: usize = 64;

/// An Ed25519 release signing key, as an operator makes one (`openssl genpkey -algorithm ed25519`).
#[derive(Debug, Clone)]
pub struct ReleaseKey {
    /// The private key (PEM), for `shoalctl release add --key`.
    pub pem: PathBuf,
    /// A file holding the public key as 64 hex characters, for the controller's `--release-key`.
    pub public_file: PathBuf,
    /// The public key as 64 hex characters, for the agents' `--release-key`.
    pub public_hex: String,
}

impl ReleaseKey {
    /// Makes a key in `dir` (`release.pem`, `release.pub`).
    pub fn generate(dir: &Path) -> Result<ReleaseKey> {
        let pem = dir.join("release.pem");
        run(Command::new("openssl")
            .args(["genpkey", "-algorithm", "ed25519", "-out"])
            .arg(&pem))?;
        let der = run(Command::new("openssl")
            .args(["pkey", "-pubout", "-outform", "DER", "-in"])
            .arg(&pem))?;
        ensure!(der.len() >= 32, "short public key");
        let public_hex: String = der[der.len() - 32..]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let public_file = dir.join("release.pub");
        std::fs::write(&public_file, format!("{public_hex}\n"))?;
        Ok(ReleaseKey {
            pem,
            public_file,
            public_hex,
        })
    }
}

/// A copy of `agent` without its debug info (`strip --strip-debug`), as `out/shoal-agent-stripped`:
/// what a release usually ships, and a quarter of the size of a debug build, so that downloads are
/// quick. The version slot is kept. Where `strip` cannot run, the copy is the unstripped binary.
pub fn stripped(agent: &Path, out: &Path) -> Result<PathBuf> {
    let path = out.join("shoal-agent-stripped");
    if let Err(e) = run(Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&path)
        .arg(agent))
    {
        eprintln!("[shoal-tests] releases are not stripped: {e:#}");
        std::fs::copy(agent, &path)?;
    }
    Ok(path)
}

/// A copy of `agent` in `out` (`shoal-agent-<version>`) whose version slot says `version`.
pub fn patched(agent: &Path, version: &str, out: &Path) -> Result<PathBuf> {
    ensure!(
        version.len() <= SLOT_LEN,
        "version {version:?} is longer than the slot"
    );
    let mut bytes = std::fs::read(agent)?;
    let hits: Vec<usize> = bytes
        .windows(16)
        .enumerate()
        .filter(|(_, w)| *w == *SLOT_MAGIC)
        .map(|(i, _)| i)
        .collect();
    let [at] = hits[..] else {
        bail!(
            "the version slot occurs {} times in {}",
            hits.len(),
            agent.display()
        )
    };
    let slot = &mut bytes[at + 16..at + 16 + SLOT_LEN];
    slot.fill(0);
    slot[..version.len()].copy_from_slice(version.as_bytes());
    let path = out.join(format!("shoal-agent-{version}"));
    std::fs::write(&path, bytes)?;
    Ok(path)
}

/// An install dir `dir` with a copy of the agent (`dir/shoal-agent`), which an update replaces.
pub fn install_dir(agent: &Path, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let exe = dir.join("shoal-agent");
    std::fs::copy(agent, &exe)?;
    Ok(exe)
}

/// Patches `agent` to each of `versions` (in `out`) and uploads each with `shoalctl release add`,
/// signed with `key`.
pub fn add_releases(
    fleet: &Fleet,
    agent: &Path,
    key: &ReleaseKey,
    versions: &[&str],
    out: &Path,
) -> Result<()> {
    for v in versions {
        let bin = patched(agent, v, out)?;
        let said = fleet.ctl_ok(&[
            "release",
            "add",
            &bin.display().to_string(),
            "--version",
            v,
            "--key",
            &key.pem.display().to_string(),
        ])?;
        ensure!(said.contains(&format!("added agent release {v}")), "{said}");
    }
    Ok(())
}

/// The node's entry in `shoalctl release status` (its latest offer, acknowledgement and report).
pub fn update_status(fleet: &Fleet, node: &str) -> Result<Value> {
    let list = fleet.ctl_json(&["release", "status"])?;
    list.as_array()
        .and_then(|l| l.iter().find(|u| u["node"] == node).cloned())
        .with_context(|| format!("no update status for {node} in {list}"))
}
