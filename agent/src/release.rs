//! Verifying agent releases before an update: the agent trusts the release public key
//! (`--release-key FILE`), not the controller that hands the release over.
//!
//! Sans-IO: [`verify_release`] checks a [`SignedRelease`] envelope; [`BinaryCheck`] checks the
//! binary as it arrives in chunks, so a download over the session never has to be held in memory
//! and an overlong one is refused at the first byte too many. The file writing, swap and re-exec
//! live in the updater that calls these. Rules (format, key id, hashing) are in
//! `shoal_proto::release`.

use ring::{
    digest,
    signature::{UnparsedPublicKey, ED25519},
};
use shoal_proto::{ReleaseManifest, SignedRelease, UpdateFailure};

/// An Ed25519 public key the agent trusts: for releases (`--release-key`, [`ReleaseKey`]) or
/// netboot images (`--image-key`, [`ImageKey`]). Same format for both: the `.pub` file of 64 hex
/// characters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TrustedKey([u8; 32]);

/// A key trusted for agent releases.
pub type ReleaseKey = TrustedKey;
/// A key trusted for netboot images (kexec).
pub type ImageKey = TrustedKey;

impl std::fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustedKey({})", self.id())
    }
}

impl TrustedKey {
    /// A key from its 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> TrustedKey {
        TrustedKey(bytes)
    }

    /// Parses a `.pub` file's text: 64 hex characters, surrounding whitespace ignored.
    pub fn parse(text: &str) -> Result<TrustedKey, UpdateFailure> {
        let bytes = hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok());
        bytes.map(TrustedKey).ok_or_else(|| {
            UpdateFailure::Malformed(
                "a trusted key must be 64 hex characters (an Ed25519 public key)".into(),
            )
        })
    }

    /// The key id: the first 8 bytes of SHA-256 of the key, as hex.
    pub fn id(&self) -> String {
        key_id(&self.0)
    }

    /// Whether `signature` is this key's Ed25519 signature over `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }
}

/// The key id of a raw Ed25519 public key: the first 8 bytes of its SHA-256, as 16 hex characters.
pub fn key_id(public: &[u8; 32]) -> String {
    hex::encode(&digest::digest(&digest::SHA256, public).as_ref()[..8])
}

/// The target triple this agent was built for, as release manifests name it.
pub fn current_target() -> String {
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

/// Verifies an envelope: signature first (with the trusted key; nothing is parsed before that),
/// then the manifest's rules, its target and, if given, that it is the version asked for.
pub fn verify_release(
    release: &SignedRelease,
    trusted: Option<&ReleaseKey>,
    target: &str,
    requested_version: Option<&str>,
) -> Result<ReleaseManifest, UpdateFailure> {
    let key = trusted.ok_or(UpdateFailure::NoTrustedKey)?;
    if release.signature.len() != 64 {
        return Err(UpdateFailure::Malformed(format!(
            "signature is {} bytes, not 64",
            release.signature.len()
        )));
    }
    if !key.verifies(&release.manifest, &release.signature) {
        let trusted = key.id();
        return Err(if release.key_id != trusted {
            UpdateFailure::WrongKey {
                signed_by: release.key_id.clone(),
                trusted,
            }
        } else {
            UpdateFailure::BadSignature { key_id: trusted }
        });
    }
    let manifest: ReleaseManifest = serde_json::from_slice(&release.manifest)
        .map_err(|e| UpdateFailure::Malformed(format!("manifest: {e}")))?;
    manifest.validate()?;
    if manifest.target != target {
        return Err(UpdateFailure::WrongTarget {
            release: manifest.target,
            agent: target.to_owned(),
        });
    }
    if let Some(requested) = requested_version {
        if manifest.version != requested {
            return Err(UpdateFailure::VersionMismatch {
                requested: requested.to_owned(),
                manifest: manifest.version,
            });
        }
    }
    Ok(manifest)
}

/// Checks a binary against its (verified) manifest as it arrives in chunks.
pub struct BinaryCheck {
    expected_size: u64,
    expected_sha256: String,
    received: u64,
    hash: digest::Context,
}

impl std::fmt::Debug for BinaryCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BinaryCheck")
            .field("expected_size", &self.expected_size)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl BinaryCheck {
    /// Starts checking a binary for `manifest`.
    pub fn new(manifest: &ReleaseManifest) -> BinaryCheck {
        BinaryCheck {
            expected_size: manifest.size,
            expected_sha256: manifest.sha256.clone(),
            received: 0,
            hash: digest::Context::new(&digest::SHA256),
        }
    }

    /// Bytes received so far (the offset to ask for next).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Feeds the next chunk. Refuses as soon as the binary would exceed the manifest's size.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), UpdateFailure> {
        let len = u64::try_from(chunk.len()).unwrap_or(u64::MAX);
        match self.received.checked_add(len) {
            Some(total) if total <= self.expected_size => {
                self.received = total;
                self.hash.update(chunk);
                Ok(())
            }
            _ => Err(UpdateFailure::Oversize {
                expected: self.expected_size,
            }),
        }
    }

    /// The download ended: checks the size, then the hash.
    pub fn finish(self) -> Result<(), UpdateFailure> {
        if self.received < self.expected_size {
            return Err(UpdateFailure::Truncated {
                got: self.received,
                expected: self.expected_size,
            });
        }
        let actual = hex::encode(self.hash.finish().as_ref());
        if actual != self.expected_sha256 {
            return Err(UpdateFailure::HashMismatch {
                expected: self.expected_sha256,
                actual,
            });
        }
        Ok(())
    }
}

/// Checks a whole binary held in memory against its manifest.
pub fn verify_binary(manifest: &ReleaseManifest, binary: &[u8]) -> Result<(), UpdateFailure> {
    let mut check = BinaryCheck::new(manifest);
    check.update(binary)?;
    check.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};
    use shoal_proto::{UnixMillis, RELEASE_MANIFEST_FORMAT};

    const TARGET: &str = "x86_64-unknown-linux-gnu";

    struct Signer {
        pair: Ed25519KeyPair,
    }

    impl Signer {
        fn new() -> Signer {
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
            Signer {
                pair: Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key"),
            }
        }

        fn public(&self) -> ReleaseKey {
            ReleaseKey::from_bytes(
                self.pair
                    .public_key()
                    .as_ref()
                    .try_into()
                    .expect("32 bytes"),
            )
        }

        fn manifest_for(binary: &[u8], version: &str) -> ReleaseManifest {
            ReleaseManifest {
                format: RELEASE_MANIFEST_FORMAT,
                version: version.into(),
                sha256: hex::encode(digest::digest(&digest::SHA256, binary).as_ref()),
                size: binary.len() as u64,
                target: TARGET.into(),
                created_at: UnixMillis(1_790_000_000_000),
            }
        }

        fn sign(&self, manifest: &ReleaseManifest) -> SignedRelease {
            let bytes = serde_json::to_vec_pretty(manifest).expect("json");
            SignedRelease {
                signature: self.pair.sign(&bytes).as_ref().to_vec(),
                manifest: bytes,
                key_id: self.public().id(),
            }
        }
    }

    const BINARY: &[u8] = b"\x7fELF pretend this is shoal-agent 0.2.0";

    #[test]
    fn a_signed_release_and_its_binary_verify() {
        let s = Signer::new();
        let env = s.sign(&Signer::manifest_for(BINARY, "0.2.0"));
        let m = verify_release(&env, Some(&s.public()), TARGET, Some("0.2.0")).expect("verifies");
        assert_eq!(m.version, "0.2.0");
        verify_binary(&m, BINARY).expect("binary matches");
        // In chunks, as over the session.
        let mut check = BinaryCheck::new(&m);
        for chunk in BINARY.chunks(7) {
            check.update(chunk).expect("chunk");
        }
        assert_eq!(check.received(), BINARY.len() as u64);
        check.finish().expect("complete");
    }

    #[test]
    fn a_tampered_manifest_or_signature_is_a_bad_signature() {
        let s = Signer::new();
        let mut env = s.sign(&Signer::manifest_for(BINARY, "0.2.0"));
        // Flip the size in the signed JSON: same key id, the signature no longer matches.
        let text = String::from_utf8(env.manifest.clone()).expect("utf8");
        env.manifest = text
            .replace(&format!("\"size\": {}", BINARY.len()), "\"size\": 1")
            .into_bytes();
        let err = verify_release(&env, Some(&s.public()), TARGET, None).expect_err("refused");
        assert_eq!(
            err,
            UpdateFailure::BadSignature {
                key_id: s.public().id()
            }
        );
        let mut env = s.sign(&Signer::manifest_for(BINARY, "0.2.0"));
        env.signature[0] ^= 1;
        assert!(matches!(
            verify_release(&env, Some(&s.public()), TARGET, None),
            Err(UpdateFailure::BadSignature { .. })
        ));
        env.signature.pop();
        assert!(matches!(
            verify_release(&env, Some(&s.public()), TARGET, None),
            Err(UpdateFailure::Malformed(_))
        ));
    }

    #[test]
    fn a_release_signed_by_another_key_is_refused_as_wrong_key() {
        let trusted = Signer::new();
        let other = Signer::new();
        let env = other.sign(&Signer::manifest_for(BINARY, "0.2.0"));
        let err = verify_release(&env, Some(&trusted.public()), TARGET, None).expect_err("refused");
        assert_eq!(
            err,
            UpdateFailure::WrongKey {
                signed_by: other.public().id(),
                trusted: trusted.public().id()
            }
        );
        assert!(err.to_string().contains(&trusted.public().id()), "{err}");
        // Lying about the key id does not help: it is still refused.
        let mut forged = env.clone();
        forged.key_id = trusted.public().id();
        assert!(matches!(
            verify_release(&forged, Some(&trusted.public()), TARGET, None),
            Err(UpdateFailure::BadSignature { .. })
        ));
        assert_eq!(
            verify_release(&env, None, TARGET, None),
            Err(UpdateFailure::NoTrustedKey)
        );
    }

    #[test]
    fn a_truncated_overlong_or_altered_binary_is_refused() {
        let s = Signer::new();
        let m = verify_release(
            &s.sign(&Signer::manifest_for(BINARY, "0.2.0")),
            Some(&s.public()),
            TARGET,
            None,
        )
        .expect("verifies");
        let n = BINARY.len() as u64;
        assert_eq!(
            verify_binary(&m, &BINARY[..10]),
            Err(UpdateFailure::Truncated {
                got: 10,
                expected: n
            })
        );
        assert_eq!(
            verify_binary(&m, &[]),
            Err(UpdateFailure::Truncated {
                got: 0,
                expected: n
            })
        );
        let mut long = BINARY.to_vec();
        long.push(0);
        assert_eq!(
            verify_binary(&m, &long),
            Err(UpdateFailure::Oversize { expected: n })
        );
        // Overflow is caught at the chunk that overflows, not at the end.
        let mut check = BinaryCheck::new(&m);
        check.update(BINARY).expect("exactly the size");
        assert_eq!(
            check.update(b"x"),
            Err(UpdateFailure::Oversize { expected: n })
        );
        let mut altered = BINARY.to_vec();
        altered[0] ^= 1;
        assert!(matches!(
            verify_binary(&m, &altered),
            Err(UpdateFailure::HashMismatch { .. })
        ));
    }

    #[test]
    fn manifest_content_is_checked_after_the_signature() {
        let s = Signer::new();
        let mut m = Signer::manifest_for(BINARY, "0.2.0");
        m.target = "aarch64-unknown-linux-gnu".into();
        let err =
            verify_release(&s.sign(&m), Some(&s.public()), TARGET, None).expect_err("refused");
        assert!(matches!(err, UpdateFailure::WrongTarget { .. }), "{err}");
        let env = s.sign(&Signer::manifest_for(BINARY, "0.2.0"));
        assert!(matches!(
            verify_release(&env, Some(&s.public()), TARGET, Some("0.3.0")),
            Err(UpdateFailure::VersionMismatch { .. })
        ));
        let mut m = Signer::manifest_for(BINARY, "0.2.0");
        m.format = 9;
        assert!(matches!(
            verify_release(&s.sign(&m), Some(&s.public()), TARGET, None),
            Err(UpdateFailure::Malformed(_))
        ));
        // Signed garbage is malformed, not trusted.
        let bytes = b"not json".to_vec();
        let env = SignedRelease {
            signature: s.pair.sign(&bytes).as_ref().to_vec(),
            manifest: bytes,
            key_id: s.public().id(),
        };
        assert!(matches!(
            verify_release(&env, Some(&s.public()), TARGET, None),
            Err(UpdateFailure::Malformed(_))
        ));
    }

    #[test]
    fn keys_parse_from_pub_files_and_ids_are_stable() {
        let s = Signer::new();
        let text = format!("{}\n", hex::encode(s.public().0));
        assert_eq!(ReleaseKey::parse(&text).expect("parses"), s.public());
        assert!(ReleaseKey::parse("abcd").is_err());
        assert_eq!(key_id(&[0; 32]), "66687aadf862bd77");
        assert!(current_target().contains("-unknown-"));
    }
}
