//! Signed agent releases: the manifest an operator signs with the release key, the signed envelope
//! the controller hands to agents, why an agent refused or failed an update, and what it reports
//! after one.
//!
//! These are value types only. Signing happens in `shoalctl` (controller crate); verifying happens
//! in the agent (`shoal_agent::release`), which trusts the release public key, not the controller.
//! Neither needs the other's code: both agree on these types and on the rules written here.
//!
//! Rules:
//! - The manifest is JSON (so an operator can read it, and later formats can add fields with
//!   defaults). The signature is a raw 64-byte Ed25519 signature over the *exact bytes* of that
//!   JSON, the same scheme as netboot images (`manifest.json` + `manifest.sig`). Verifiers check
//!   the signature before parsing anything.
//! - Keys are 32 raw bytes; on disk, 64 hex characters (the `.pub` file). A key id is the first 8
//!   bytes of the SHA-256 of the public key, as 16 hex characters; it travels beside the signature
//!   as an unauthenticated hint, so a refusal can say "signed by another key" rather than only "bad
//!   signature". It never decides trust.
//! - The binary is identified by its size and SHA-256; both are checked, size first (a truncated
//!   download fails as `Truncated`, an overlong one as `Oversize` as soon as it overflows).

use serde::{Deserialize, Serialize};

use crate::types::UnixMillis;

/// The manifest format this build writes and understands.
pub const RELEASE_MANIFEST_FORMAT: u32 = 1;

/// What an operator signs: one agent binary for one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseManifest {
    /// [`RELEASE_MANIFEST_FORMAT`].
    pub format: u32,
    /// The agent version the binary reports (`shoal-agent --version`), a plain name (see
    /// [`check_release_name`]).
    pub version: String,
    /// SHA-256 of the binary, 64 lower-case hex characters.
    pub sha256: String,
    /// Size of the binary in bytes.
    pub size: u64,
    /// Rust target triple the binary was built for (`x86_64-unknown-linux-gnu`).
    pub target: String,
    /// When it was signed.
    pub created_at: UnixMillis,
}

/// A manifest with its signature, as stored by the controller and sent to agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRelease {
    /// The manifest's JSON, exactly as signed.
    pub manifest: Vec<u8>,
    /// Raw Ed25519 signature over `manifest`, 64 bytes.
    pub signature: Vec<u8>,
    /// Key id of the signing key (16 hex characters); a hint for error messages, not trusted.
    pub key_id: String,
}

/// Why an agent did not take an update. Sent to the controller in the update report, so each
/// variant is something an operator can act on. The agent stays on its current version in every
/// case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateFailure {
    /// The envelope is unusable: a signature that is not 64 bytes, a manifest that is not JSON of
    /// the expected shape, an unknown format, or a field that breaks the rules.
    #[error("malformed release: {0}")]
    Malformed(String),
    /// The signature does not verify with the trusted release key, and the envelope claims that
    /// key: the manifest or the signature was altered.
    #[error("release signature does not verify with the trusted release key {key_id}")]
    BadSignature {
        /// The trusted key's id.
        key_id: String,
    },
    /// The release was signed by a key the agent does not trust.
    #[error("release is signed by key {signed_by}, but this agent trusts release key {trusted}")]
    WrongKey {
        /// The id the envelope claims.
        signed_by: String,
        /// The trusted key's id.
        trusted: String,
    },
    /// The agent has no release key configured, so it accepts no update.
    #[error("no trusted release key: start the agent with --release-key FILE")]
    NoTrustedKey,
    /// The binary is for another platform.
    #[error("release is for target {release}, this agent runs on {agent}")]
    WrongTarget {
        /// The manifest's target.
        release: String,
        /// The agent's.
        agent: String,
    },
    /// The manifest's version is not the one the controller asked for.
    #[error("release manifest is for version {manifest}, but version {requested} was requested")]
    VersionMismatch {
        /// What the update asked for.
        requested: String,
        /// What the signed manifest says.
        manifest: String,
    },
    /// The download ended before the manifest's size.
    #[error("download truncated: got {got} of {expected} bytes")]
    Truncated {
        /// Bytes received.
        got: u64,
        /// The manifest's size.
        expected: u64,
    },
    /// The download is longer than the manifest's size.
    #[error("download is longer than the release's {expected} bytes")]
    Oversize {
        /// The manifest's size.
        expected: u64,
    },
    /// The binary's SHA-256 differs from the manifest's.
    #[error("binary SHA-256 {actual} does not match the release's {expected}")]
    HashMismatch {
        /// The manifest's hash.
        expected: String,
        /// The downloaded binary's hash.
        actual: String,
    },
    /// Writing or swapping the binary failed (e.g. disk full); the previous binary is untouched.
    #[error("installing the new binary failed: {0}")]
    Install(String),
    /// The new binary started but did not pass its health checks before the deadline, and the
    /// previous binary was restored.
    #[error("new version did not become healthy in time; rolled back to the previous binary")]
    Unhealthy,
    /// (v5) The offered version is older than the one running (semver order; or the two cannot be
    /// ordered) and the offer does not allow a downgrade (`shoalctl upgrade start
    /// --allow-downgrade`).
    #[error("refused to downgrade from {running} to {offered}: start the rollout with --allow-downgrade to go back a version")]
    Downgrade {
        /// The version running.
        running: String,
        /// The version offered.
        offered: String,
    },
}

impl UpdateFailure {
    /// The failure to send on a session of `protocol`: failures newer than it become
    /// [`UpdateFailure::Malformed`] with the same text (an older controller cannot decode them).
    pub fn for_protocol(self, protocol: u16) -> UpdateFailure {
        match self {
            f @ UpdateFailure::Downgrade { .. } if protocol < 5 => {
                UpdateFailure::Malformed(f.to_string())
            }
            other => other,
        }
    }
}

/// One health check's result after an update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// The check (`session`, `overlay`, `disk`, a hook's name).
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// What it saw, when it failed.
    pub detail: Option<String>,
}

/// (v4) What an agent booted and how its health checks went, so the controller never guesses
/// whether a netbooted node came back healthy: sent on every session once the first heartbeat went
/// out and the checks ran, and again whenever the checks' outcome changes (failing checks are
/// re-run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootReport {
    /// The kernel's id of this boot (`/proc/sys/kernel/random/boot_id`); empty if unreadable.
    pub boot_id: String,
    /// The netboot image version (os-release `VERSION_ID`) when the OS is a shoal netboot image
    /// (`ID=shoal-netboot`); `None` on any other OS.
    pub image: Option<String>,
    /// The health checks, in the order they ran (`session`, `heartbeat`, `check:<program>`).
    pub checks: Vec<CheckResult>,
}

impl UpdateReport {
    /// The report to send on a session of `protocol` ([`UpdateFailure::for_protocol`]).
    pub fn for_protocol(mut self, protocol: u16) -> UpdateReport {
        self.failure = self.failure.map(|f| f.for_protocol(protocol));
        self
    }
}

impl BootReport {
    /// Whether every check passed (and at least one ran).
    pub fn healthy(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.passed)
    }
}

/// What an agent says about its last update, on every start and whenever it changes, so the
/// controller reads facts instead of guessing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateReport {
    /// The version running now.
    pub running: String,
    /// The version the last update tried to install, if any.
    pub attempted: Option<String>,
    /// How many times the attempted version was started (a crash loop shows as several).
    pub attempts: u32,
    /// Health checks of the attempted version, in the order they ran.
    pub checks: Vec<CheckResult>,
    /// Why the attempt failed; `None` while it is in progress or once it succeeded.
    pub failure: Option<UpdateFailure>,
}

/// Whether `name` is a plain name, safe as one path component and in a URL: 1 to 64 of ASCII
/// letters, digits, `.`, `-`, `_` and `+`, not starting with `.`. Release versions and targets,
/// netboot image versions and their file names all follow it.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'))
}

/// Checks that `name` is a plain release version or target name ([`is_plain_name`]).
pub fn check_release_name(name: &str) -> Result<(), UpdateFailure> {
    if is_plain_name(name) {
        Ok(())
    } else {
        Err(UpdateFailure::Malformed(format!(
            "invalid name {name:?}: use letters, digits, '.', '-', '_' and '+'"
        )))
    }
}

impl ReleaseManifest {
    /// Checks the fields against the rules (format, names, hash shape). Says nothing about the
    /// signature.
    pub fn validate(&self) -> Result<(), UpdateFailure> {
        if self.format != RELEASE_MANIFEST_FORMAT {
            return Err(UpdateFailure::Malformed(format!(
                "unknown manifest format {}",
                self.format
            )));
        }
        check_release_name(&self.version)?;
        check_release_name(&self.target)?;
        let hex = self.sha256.len() == 64
            && self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex {
            return Err(UpdateFailure::Malformed(
                "sha256 must be 64 lower-case hex characters".into(),
            ));
        }
        if self.size == 0 {
            return Err(UpdateFailure::Malformed("size must not be zero".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> ReleaseManifest {
        ReleaseManifest {
            format: RELEASE_MANIFEST_FORMAT,
            version: "0.2.0".into(),
            sha256: "ab".repeat(32),
            size: 10,
            target: "x86_64-unknown-linux-gnu".into(),
            created_at: UnixMillis(1),
        }
    }

    #[test]
    fn manifest_rules() {
        assert_eq!(manifest().validate(), Ok(()));
        let bad = |f: fn(&mut ReleaseManifest)| {
            let mut m = manifest();
            f(&mut m);
            m.validate()
        };
        assert!(matches!(
            bad(|m| m.format = 2),
            Err(UpdateFailure::Malformed(_))
        ));
        assert!(matches!(
            bad(|m| m.version = "../x".into()),
            Err(UpdateFailure::Malformed(_))
        ));
        assert!(matches!(
            bad(|m| m.sha256 = "AB".repeat(32)),
            Err(UpdateFailure::Malformed(_))
        ));
        assert!(matches!(
            bad(|m| m.sha256 = "ab".into()),
            Err(UpdateFailure::Malformed(_))
        ));
        assert!(matches!(
            bad(|m| m.size = 0),
            Err(UpdateFailure::Malformed(_))
        ));
        assert!(check_release_name("2026.11.23-1+b1").is_ok());
    }

    #[test]
    fn reports_and_envelopes_survive_the_wire() {
        let report = UpdateReport {
            running: "0.1.0".into(),
            attempted: Some("0.2.0".into()),
            attempts: 2,
            checks: vec![CheckResult {
                name: "session".into(),
                passed: false,
                detail: Some("timeout".into()),
            }],
            failure: Some(UpdateFailure::Truncated {
                got: 5,
                expected: 10,
            }),
        };
        let bytes = postcard::to_allocvec(&report).expect("encode");
        assert_eq!(
            postcard::from_bytes::<UpdateReport>(&bytes).expect("decode"),
            report
        );
        let env = SignedRelease {
            manifest: b"{}".to_vec(),
            signature: vec![0; 64],
            key_id: "00".repeat(8),
        };
        // A v5 failure reaches a v4 controller as one it can decode, with the same words.
        let down = UpdateFailure::Downgrade {
            running: "0.3.0".into(),
            offered: "0.2.0".into(),
        };
        let report = UpdateReport {
            failure: Some(down.clone()),
            ..report
        };
        let v4 = report.clone().for_protocol(4);
        assert_eq!(v4.failure, Some(UpdateFailure::Malformed(down.to_string())));
        assert_eq!(report.clone().for_protocol(5), report);
        assert_eq!(
            postcard::to_allocvec(&UpdateFailure::Unhealthy).expect("encode"),
            vec![10],
            "Unhealthy keeps its index (Downgrade is appended after it)"
        );
        let bytes = postcard::to_allocvec(&env).expect("encode");
        assert_eq!(
            postcard::from_bytes::<SignedRelease>(&bytes).expect("decode"),
            env
        );
    }
}
