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

/// RFC 8410's PKCS#8 v1 prefix of an Ed25519 private key (`PrivateKeyInfo` with the algorithm id
/// 1.3.101.112 and the 32-byte seed as an OCTET STRING): what `openssl genpkey -algorithm ed25519`
/// writes, the seed following.
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A release signing key pair made by [`generate_signing_key`].
#[derive(Clone, PartialEq, Eq)]
pub struct GeneratedKey {
    /// The private key as PEM PKCS#8 v1 (`-----BEGIN PRIVATE KEY-----`, 48 bytes of DER).
    pub private_pem: String,
    /// The public half as 64 hex characters (the agents' and the controller's `--release-key`).
    pub public_hex: String,
    /// Its key id, as releases name their signer.
    pub key_id: String,
}

impl std::fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("public_hex", &self.public_hex)
            .field("private_pem", &"<redacted>")
            .finish()
    }
}

/// A new release signing key pair, in the form `openssl genpkey -algorithm ed25519` and the
/// operators' guide make it.
pub fn generate_signing_key() -> Result<GeneratedKey, ReleaseError> {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| ReleaseError::Invalid("the system's random source failed".into()))?;
    let mut der = ED25519_PKCS8_V1_PREFIX.to_vec();
    der.extend_from_slice(&seed);
    let pem_text = pem::encode_config(
        &pem::Pem::new("PRIVATE KEY", der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    );
    // Read back through the loader `release add` uses, so what is written is what signs.
    let key = load_signing_key(&pem_text)?;
    Ok(GeneratedKey {
        public_hex: public_key_hex(&key),
        key_id: key_id(key.public_key().as_ref()),
        private_pem: pem_text,
    })
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
    fn a_generated_key_is_openssls_form_and_signs() {
        let made = generate_signing_key().expect("key");
        let (pem_text, public) = (made.private_pem.clone(), made.public_hex.clone());
        assert!(pem_text.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(pem_text.ends_with("-----END PRIVATE KEY-----\n"));
        let block = pem::parse(&pem_text).expect("pem");
        assert_eq!(
            block.contents().len(),
            48,
            "PKCS#8 v1, no public key inside"
        );
        assert_eq!(&block.contents()[..16], &ED25519_PKCS8_V1_PREFIX);
        let key = load_signing_key(&pem_text).expect("loads");
        assert_eq!(public_key_hex(&key), public);
        assert_eq!(public.len(), 64);
        assert_eq!(made.key_id, key_id(key.public_key().as_ref()));
        assert!(
            !format!("{made:?}").contains(&pem_text[30..60]),
            "Debug redacts"
        );
        let other = generate_signing_key().expect("key");
        assert_ne!(other.private_pem, pem_text, "each key is new");
    }

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
