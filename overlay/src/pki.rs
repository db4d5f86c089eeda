//! Node keys, certificate signing requests, and reading identities out of certificates.

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use sha2::{Digest, Sha256};
use shoal_proto::NodeId;

/// The TLS server name every agent uses for the controller, whatever address it dials: certificates are
/// bound to this name rather than to IP addresses that NAT and DHCP change.
pub const CONTROLLER_SERVER_NAME: &str = "controller.shoal";

/// Why a key, request or certificate could not be handled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Key generation, parsing or signing failed.
    #[error("certificate or key error: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A certificate could not be parsed.
    #[error("unparsable certificate: {0}")]
    Certificate(String),
    /// The certificate has no node identity in its subject.
    #[error("certificate carries no node identity")]
    NoIdentity,
}

/// Generates a fresh ECDSA P-256 key pair.
pub fn generate_key() -> Result<KeyPair, PkiError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

/// A PKCS#10 request (DER) for `key`. The controller decides the subject; the request only proves
/// possession of the key.
pub fn make_csr(key: &KeyPair) -> Result<Vec<u8>, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "shoal-node");
    params.distinguished_name = dn;
    Ok(params.serialize_request(key)?.der().to_vec())
}

/// A key pair as rustls takes it (PKCS#8 DER).
pub fn tls_key(key: &KeyPair) -> rustls_pki_types::PrivateKeyDer<'static> {
    rustls_pki_types::PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// Writes a key or certificate file atomically — temporary file with `mode`, fsync, rename, fsync of
/// the directory — so a crash leaves the old file or the new one, never a torn or world-readable one.
pub fn write_private_file(path: &std::path::Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::{
        io::Write,
        os::unix::fs::{OpenOptionsExt, PermissionsExt},
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    // `mode` at creation is filtered by the umask, and an old temporary file keeps its mode: set it.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The TLS name of a node's certificate (its subject alternative name), which peers verify.
pub fn node_server_name(node: &NodeId) -> String {
    format!("{}.node.shoal", node.0)
}

/// SHA-256 of a DER blob (a certificate fingerprint).
pub fn sha256(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// The facts shoal reads from a node certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The node the certificate names (its common name).
    pub node_id: NodeId,
    /// Expiry, seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// Serial number, hex.
    pub serial: String,
    /// SHA-256 of the SubjectPublicKeyInfo (DER): stays the same across renewals with the same key.
    pub key_sha256: [u8; 32],
}

/// Reads the node identity and validity out of a certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Certificate(e.to_string()))?;
    let node_id = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(PkiError::NoIdentity)?;
    Ok(CertInfo {
        node_id: NodeId(node_id.to_owned()),
        not_after_unix: cert.validity().not_after.timestamp(),
        serial: cert.raw_serial_as_string().replace(':', ""),
        key_sha256: sha256(cert.public_key().raw),
    })
}

/// The SubjectPublicKeyInfo (DER) of the key a certificate signing request holds. Parsing checks the
/// request's own signature, so the requester holds that key.
pub fn csr_spki(csr_der: &[u8]) -> Result<Vec<u8>, PkiError> {
    use rcgen::PublicKeyData;
    let params = rcgen::CertificateSigningRequestParams::from_der(&csr_der.into())?;
    Ok(params.public_key.subject_public_key_info())
}

/// The SubjectPublicKeyInfo (DER) of a certificate's key; its SHA-256 is [`CertInfo::key_sha256`].
pub fn cert_spki(cert_der: &[u8]) -> Result<Vec<u8>, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| PkiError::Certificate(e.to_string()))?;
    Ok(cert.public_key().raw.to_vec())
}

/// The old key's signature over a key rotation to `new_spki` ([`shoal_proto::rotation_message`]).
pub fn sign_rotation(old: &KeyPair, node: &NodeId, new_spki: &[u8]) -> Result<Vec<u8>, PkiError> {
    use rcgen::SigningKey;
    Ok(old.sign(&shoal_proto::rotation_message(node, new_spki))?)
}

/// Whether `signature` is the key in `old_spki` (ECDSA P-256) signing a rotation of `node` to `new_spki`.
pub fn verify_rotation(old_spki: &[u8], node: &NodeId, new_spki: &[u8], signature: &[u8]) -> bool {
    use x509_parser::prelude::FromDer;
    let Ok((_, spki)) = x509_parser::x509::SubjectPublicKeyInfo::from_der(old_spki) else { return false };
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, spki.subject_public_key.data.as_ref());
    key.verify(&shoal_proto::rotation_message(node, new_spki), signature).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_parses_and_proves_the_key() {
        let key = generate_key().unwrap();
        let csr = make_csr(&key).unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_der(&csr.as_slice().into()).unwrap();
        use rcgen::PublicKeyData;
        assert_eq!(parsed.public_key.der_bytes(), key.der_bytes());
        let mut tampered = csr.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(rcgen::CertificateSigningRequestParams::from_der(&tampered.as_slice().into()).is_err());
        assert!(csr_spki(&tampered).is_err(), "a request whose signature fails proves no key");
    }

    #[test]
    fn the_requested_key_is_the_certified_key_and_rotations_verify_only_with_the_old_key() {
        let old = generate_key().unwrap();
        let new = generate_key().unwrap();
        let csr = make_csr(&old).unwrap();
        let spki = csr_spki(&csr).unwrap();
        // A certificate for that request carries the same SubjectPublicKeyInfo bytes.
        let issuer_key = generate_key().unwrap();
        let issuer = rcgen::CertificateParams::new(vec!["ca".to_string()]).unwrap().self_signed(&issuer_key).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_der(issuer.der(), issuer_key).unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_der(&csr.as_slice().into()).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "n1");
        let cert = params.signed_by(&parsed.public_key, &issuer).unwrap();
        assert_eq!(cert_spki(cert.der()).unwrap(), spki);
        assert_eq!(cert_info(cert.der()).unwrap().key_sha256, sha256(&spki));

        let node = NodeId("n1".into());
        let new_spki = csr_spki(&make_csr(&new).unwrap()).unwrap();
        let sig = sign_rotation(&old, &node, &new_spki).unwrap();
        assert!(verify_rotation(&spki, &node, &new_spki, &sig));
        assert!(!verify_rotation(&new_spki, &node, &new_spki, &sig), "only the old key's signature counts");
        assert!(!verify_rotation(&spki, &NodeId("n2".into()), &new_spki, &sig), "bound to the node");
        let self_signed = sign_rotation(&new, &node, &new_spki).unwrap();
        assert!(!verify_rotation(&spki, &node, &new_spki, &self_signed), "the new key cannot vouch for itself");
    }
}
