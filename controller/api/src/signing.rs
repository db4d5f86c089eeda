//! Signing agent releases (`shoalctl release add BINARY --version V --key FILE`), run where the
//! private key is, never on the controller: a binary becomes a [`SignedRelease`].
//!
//! The agent verifies with `shoal_agent::release`, trusting the release public key rather than the
//! controller, and the controller checks uploads (`shoal_controller::releases::verify_upload`); the
//! rules all sides follow (JSON manifest, raw Ed25519 signature over its exact bytes, key ids) are
//! in `shoal_proto::release`. The key file is the one `images/build.sh` uses for images: a PEM
//! PKCS#8 Ed25519 key as `openssl genpkey -algorithm ed25519` writes it; its public half, 64 hex
//! characters, is what agents get with `--release-key`. Pure: callers read the files.

use ring::signature::{Ed25519KeyPair, KeyPair};
use sha2::{Digest, Sha256};
use shoal_proto::{
    check_release_name, ReleaseManifest, SignedRelease, UnixMillis, RELEASE_MANIFEST_FORMAT,
};

/// Why a release could not be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseError {
    /// The signing key file is not a PEM PKCS#8 Ed25519 private key.
    #[error("signing key: {0} (expected the PEM written by `openssl genpkey -algorithm ed25519`)")]
    BadKey(String),
    /// The version or target is not a plain name, or the binary is empty.
    #[error("{0}")]
    Invalid(String),
}

/// Reads a PEM PKCS#8 Ed25519 private key (OpenSSL's v1 form without the public key, or v2 with
/// it).
pub fn load_signing_key(pem_text: &str) -> Result<Ed25519KeyPair, ReleaseError> {
    let block = pem::parse(pem_text.trim()).map_err(|e| ReleaseError::BadKey(e.to_string()))?;
    if block.tag() != "PRIVATE KEY" {
        return Err(ReleaseError::BadKey(format!(
            "PEM block is {:?}, not \"PRIVATE KEY\"",
            block.tag()
        )));
    }
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(block.contents())
        .map_err(|e| ReleaseError::BadKey(e.to_string()))
}

/// The key id of a public key: the first 8 bytes of its SHA-256, as hex (`shoal_proto::release`).
pub fn key_id(public: &[u8]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

/// The public half of a signing key as the agents' `--release-key` file holds it: 64 hex
/// characters.
pub fn public_key_hex(key: &Ed25519KeyPair) -> String {
    hex::encode(key.public_key().as_ref())
}

/// Signs `binary` as release `version` for `target`.
pub fn sign_release(
    binary: &[u8],
    version: &str,
    target: &str,
    created_at: UnixMillis,
    key: &Ed25519KeyPair,
) -> Result<(ReleaseManifest, SignedRelease), ReleaseError> {
    if binary.is_empty() {
        return Err(ReleaseError::Invalid("the binary is empty".into()));
    }
    let manifest = ReleaseManifest {
        format: RELEASE_MANIFEST_FORMAT,
        version: version.to_owned(),
        sha256: hex::encode(Sha256::digest(binary)),
        size: binary.len() as u64,
        target: target.to_owned(),
        created_at,
    };
    check_release_name(version).map_err(|e| ReleaseError::Invalid(format!("version: {e}")))?;
    manifest
        .validate()
        .map_err(|e| ReleaseError::Invalid(e.to_string()))?;
    let bytes =
        serde_json::to_vec_pretty(&manifest).map_err(|e| ReleaseError::Invalid(e.to_string()))?;
    let signed = SignedRelease {
        signature: key.sign(&bytes).as_ref().to_vec(),
        manifest: bytes,
        key_id: key_id(key.public_key().as_ref()),
    };
    Ok((manifest, signed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_release_names_its_binary_and_verifies_with_the_public_key() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
        let binary = b"\x7fELF agent".to_vec();
        let (manifest, signed) = sign_release(
            &binary,
            "1.2.0",
            "x86_64-unknown-linux-gnu",
            UnixMillis(7),
            &key,
        )
        .expect("signed");
        assert_eq!(manifest.size, binary.len() as u64);
        assert_eq!(manifest.sha256, hex::encode(Sha256::digest(&binary)));
        assert_eq!(
            serde_json::from_slice::<ReleaseManifest>(&signed.manifest).expect("json"),
            manifest,
            "the signed bytes are the manifest"
        );
        assert_eq!(signed.key_id, key_id(key.public_key().as_ref()));
        assert_eq!(public_key_hex(&key).len(), 64);
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key.public_key())
            .verify(&signed.manifest, &signed.signature)
            .expect("signature verifies");
    }
}
