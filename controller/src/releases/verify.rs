//! Agent releases, controller side: [`verify_upload`], the check of a release an operator
//! uploads. Signing a binary into a [`SignedRelease`] (`shoalctl release add BINARY --version V
//! --key FILE`, run where the private key is, never on the controller) is `shoal_api::signing`,
//! re-exported here.
//!
//! The agent verifies with `shoal_agent::release`, trusting the release public key rather than the
//! controller; the rules all sides follow (JSON manifest, raw Ed25519 signature over its exact
//! bytes, key ids) are in `shoal_proto::release`. Pure: callers read the files.

use sha2::{Digest, Sha256};
use shoal_proto::{ReleaseManifest, SignedRelease, UpdateFailure};

/// Signing lives in `shoal_api::signing`, where `shoalctl` uses it without the controller.
pub use shoal_api::signing::{
    key_id, load_signing_key, public_key_hex, sign_release, ReleaseError,
};

/// The controller's check of an uploaded release (`release add`): signed by one of the release keys
/// it was given, a valid manifest, and a binary of the manifest's size and hash. Refusing here
/// spares the fleet a useless rollout; the agents still verify for themselves.
pub fn verify_upload(
    signed: &SignedRelease,
    binary: &[u8],
    keys: &[[u8; 32]],
) -> Result<ReleaseManifest, UpdateFailure> {
    if keys.is_empty() {
        return Err(UpdateFailure::NoTrustedKey);
    }
    let ok = keys.iter().any(|k| {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, k)
            .verify(&signed.manifest, &signed.signature)
            .is_ok()
    });
    if !ok {
        let trusted: Vec<String> = keys.iter().map(|k| key_id(k)).collect();
        return Err(if trusted.contains(&signed.key_id) {
            UpdateFailure::BadSignature {
                key_id: signed.key_id.clone(),
            }
        } else {
            UpdateFailure::WrongKey {
                signed_by: signed.key_id.clone(),
                trusted: trusted.join(","),
            }
        });
    }
    let manifest: ReleaseManifest = serde_json::from_slice(&signed.manifest)
        .map_err(|e| UpdateFailure::Malformed(format!("manifest: {e}")))?;
    manifest.validate()?;
    let size = binary.len() as u64;
    if size < manifest.size {
        return Err(UpdateFailure::Truncated {
            got: size,
            expected: manifest.size,
        });
    }
    if size > manifest.size {
        return Err(UpdateFailure::Oversize {
            expected: manifest.size,
        });
    }
    let actual = hex::encode(Sha256::digest(binary));
    if actual != manifest.sha256 {
        return Err(UpdateFailure::HashMismatch {
            expected: manifest.sha256,
            actual,
        });
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};
    use shoal_agent::release::{verify_binary, verify_release, ReleaseKey};
    use shoal_proto::UnixMillis;

    /// Written by `openssl genpkey -algorithm ed25519` (a throwaway test key).
    const OPENSSL_KEY: &str = "-----BEGIN PRIVATE KEY-----\n\
        MC4CAQAwBQYDK2VwBCIEIK+B2im/6O/v2TLJvQeJok4Rx0py/TkTrJAYqLjrQq7a\n\
        -----END PRIVATE KEY-----\n";
    /// Its public half, as `openssl pkey -pubout -outform DER | tail -c 32` gives it.
    const OPENSSL_PUB: &str = "46badf9cba6ddc2caefc23d7cbe486fbf70c11833afb5952c750170fdf0e3aa2";
    const TARGET: &str = "x86_64-unknown-linux-gnu";

    #[test]
    fn an_openssl_key_signs_releases_the_agent_accepts() {
        let key = load_signing_key(OPENSSL_KEY).expect("openssl key loads");
        assert_eq!(public_key_hex(&key), OPENSSL_PUB);
        let binary = b"\x7fELF shoal-agent 0.2.0".repeat(100);
        let (manifest, signed) =
            sign_release(&binary, "0.2.0", TARGET, UnixMillis(1), &key).expect("signed");
        let trusted = ReleaseKey::parse(OPENSSL_PUB).expect("pub parses");
        assert_eq!(
            signed.key_id,
            trusted.id(),
            "both sides compute the same key id"
        );
        let verified =
            verify_release(&signed, Some(&trusted), TARGET, Some("0.2.0")).expect("agent accepts");
        assert_eq!(verified, manifest);
        verify_binary(&verified, &binary).expect("binary matches");
        assert!(matches!(
            verify_binary(&verified, &binary[..100]),
            Err(UpdateFailure::Truncated { .. })
        ));
    }

    #[test]
    fn a_release_signed_with_another_key_is_refused_by_the_agent() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let other = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
        let (_, signed) =
            sign_release(b"binary", "0.2.0", TARGET, UnixMillis(1), &other).expect("signed");
        let trusted = ReleaseKey::parse(OPENSSL_PUB).expect("pub parses");
        assert!(matches!(
            verify_release(&signed, Some(&trusted), TARGET, None),
            Err(UpdateFailure::WrongKey { .. })
        ));
    }

    #[test]
    fn the_controller_refuses_bad_uploads_before_any_agent_sees_them() {
        let key = load_signing_key(OPENSSL_KEY).expect("key");
        let public: [u8; 32] = key.public_key().as_ref().try_into().expect("32 bytes");
        let binary = b"agent binary".to_vec();
        let (manifest, signed) =
            sign_release(&binary, "0.2.0", TARGET, UnixMillis(1), &key).expect("signed");
        assert_eq!(verify_upload(&signed, &binary, &[public]), Ok(manifest));
        assert!(matches!(
            verify_upload(&signed, &binary[..5], &[public]),
            Err(UpdateFailure::Truncated { got: 5, .. })
        ));
        assert!(matches!(
            verify_upload(&signed, b"agent binarY", &[public]),
            Err(UpdateFailure::HashMismatch { .. })
        ));
        assert!(matches!(
            verify_upload(&signed, &binary, &[[7; 32]]),
            Err(UpdateFailure::WrongKey { .. })
        ));
        assert_eq!(
            verify_upload(&signed, &binary, &[]),
            Err(UpdateFailure::NoTrustedKey)
        );
        let mut tampered = signed.clone();
        tampered.manifest[3] ^= 1;
        assert!(matches!(
            verify_upload(&tampered, &binary, &[public]),
            Err(UpdateFailure::BadSignature { .. })
        ));
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(matches!(
            load_signing_key("not a key"),
            Err(ReleaseError::BadKey(_))
        ));
        let cert = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            load_signing_key(cert),
            Err(ReleaseError::BadKey(_))
        ));
        let key = load_signing_key(OPENSSL_KEY).expect("key");
        assert!(matches!(
            sign_release(b"", "0.2.0", TARGET, UnixMillis(1), &key),
            Err(ReleaseError::Invalid(_))
        ));
        assert!(matches!(
            sign_release(b"x", "../0.2", TARGET, UnixMillis(1), &key),
            Err(ReleaseError::Invalid(_))
        ));
    }
}
