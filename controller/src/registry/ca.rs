//! The fleet's certificate authority: created on first start in the data dir, then used to issue
//! short-lived node certificates and the controller's own server certificates.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use shoal_proto::{NodeId, UnixMillis};
use time::OffsetDateTime;

/// File name of the CA certificate (PEM) in the data dir.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA key (PEM, mode 0600) in the data dir.
pub const CA_KEY_FILE: &str = "ca.key";

/// Why the CA could not be loaded or could not issue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// Reading or writing the CA files failed.
    #[error("CA file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The CA files exist but do not hold a usable certificate and key.
    #[error("CA in {0} is unusable: {1}")]
    Invalid(PathBuf, String),
    /// Only one of the two CA files exists: refuse rather than silently mint a new fleet CA.
    #[error("{0} exists without its partner file; restore both {CA_CERT_FILE} and {CA_KEY_FILE} or neither")]
    HalfPresent(PathBuf),
    /// The certificate signing request is malformed or its signature is wrong.
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
    /// Key generation failed.
    #[error("key generation failed: {0}")]
    Key(#[from] shoal_overlay::pki::PkiError),
}

/// The fleet CA.
pub struct Ca {
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("sha256", &hex::encode(self.sha256()))
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

pub use shoal_overlay::pki::write_private_file;

fn time_at(ms: UnixMillis) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp((ms.0 / 1000) as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

impl Ca {
    /// A secret for `label` that only holders of the CA key can compute (the controllers of the
    /// fleet): SHA-256 over the label and the key.
    pub fn derive_secret(&self, label: &str) -> [u8; 32] {
        let mut input = label.as_bytes().to_vec();
        input.push(0);
        input.extend_from_slice(&self.issuer.key().serialize_der());
        shoal_overlay::pki::sha256(&input)
    }

    /// Loads the CA from `dir`, creating it on first start.
    pub fn load_or_create(dir: &Path) -> Result<Ca, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(&cert_path, &key_path),
            (false, false) => Self::create(&cert_path, &key_path),
            (true, false) => Err(CaError::HalfPresent(cert_path)),
            (false, true) => Err(CaError::HalfPresent(key_path)),
        }
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, CaError> {
        let cert_pem = fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
        let key_pem = fs::read_to_string(key_path).map_err(io_err(key_path))?;
        let invalid = |e: rcgen::Error| CaError::Invalid(cert_path.to_owned(), e.to_string());
        let key = KeyPair::from_pem(&key_pem).map_err(invalid)?;
        let cert_der = pem_to_der(&cert_pem)
            .ok_or_else(|| CaError::Invalid(cert_path.to_owned(), "not PEM".into()))?;
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(cert_der.clone()), key)
            .map_err(invalid)?;
        Ok(Ca { cert_der, issuer })
    }

    fn create(cert_path: &Path, key_path: &Path) -> Result<Ca, CaError> {
        let key = shoal_overlay::pki::generate_key()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "shoal fleet CA");
        dn.push(DnType::OrganizationName, "shoal");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365 * 20);
        let cert = params.self_signed(&key)?;
        // Key first: a crash between the two writes leaves a key without a cert, which load refuses
        // loudly instead of minting a second CA.
        write_private_file(key_path, key.serialize_pem().as_bytes(), 0o600)
            .map_err(io_err(key_path))?;
        write_private_file(cert_path, cert.pem().as_bytes(), 0o644).map_err(io_err(cert_path))?;
        Ok(Ca {
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> String {
        der_to_pem("CERTIFICATE", &self.cert_der)
    }

    /// SHA-256 of the CA certificate: what join tokens pin.
    pub fn sha256(&self) -> [u8; 32] {
        shoal_overlay::pki::sha256(&self.cert_der)
    }

    /// Issues a node certificate for the key in `csr_der`, valid from a few minutes ago (clock
    /// skew) for `ttl`. The subject is the node id; whatever the request asks for is ignored.
    pub fn issue_node_cert(
        &self,
        csr_der: &[u8],
        node: &NodeId,
        now: UnixMillis,
        ttl: Duration,
    ) -> Result<(Vec<u8>, UnixMillis), CaError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.into())
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node.0.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(
            format!("{}.node.shoal", node.0)
                .try_into()
                .map_err(|e: rcgen::Error| CaError::BadCsr(e.to_string()))?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.not_before = time_at(now) - time::Duration::minutes(5);
        let not_after = UnixMillis(now.0 + ttl.as_millis() as u64);
        params.not_after = time_at(not_after);
        params.serial_number = Some(rand::random::<[u8; 16]>().to_vec().into());
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok((cert.der().to_vec(), not_after))
    }

    /// Issues a server certificate (with a fresh key) for the controller's QUIC and admin
    /// endpoints.
    pub fn issue_server_cert(
        &self,
        names: &[String],
        ips: &[IpAddr],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = shoal_overlay::pki::generate_key()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "shoal controller");
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(397);
        let cert = params.signed_by(&key, &self.issuer)?;
        let chain = vec![
            cert.der().clone(),
            CertificateDer::from(self.cert_der.clone()),
        ];
        Ok((chain, shoal_overlay::pki::tls_key(&key)))
    }
}

/// PEM-encodes a DER blob.
pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der))
}

/// Decodes the first PEM block's body.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn created_once_then_loaded_with_private_key_mode() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(ca.cert_der(), again.cert_der());
        assert_eq!(pem_to_der(&ca.cert_pem()).unwrap(), ca.cert_der());
    }

    #[test]
    fn half_present_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path()).unwrap();
        fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
        assert!(matches!(
            Ca::load_or_create(dir.path()),
            Err(CaError::HalfPresent(_))
        ));
    }

    #[test]
    fn node_cert_names_the_node_and_expires_on_time() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let key = shoal_overlay::pki::generate_key().unwrap();
        let csr = shoal_overlay::pki::make_csr(&key).unwrap();
        let now = UnixMillis(1_800_000_000_000);
        let (der, not_after) = ca
            .issue_node_cert(
                &csr,
                &NodeId("n0123".into()),
                now,
                Duration::from_secs(3600),
            )
            .unwrap();
        let info = shoal_overlay::pki::cert_info(&der).unwrap();
        assert_eq!(info.node_id, NodeId("n0123".into()));
        assert_eq!(info.not_after_unix as u64 * 1000, not_after.0);
        assert!(ca
            .issue_node_cert(b"garbage", &NodeId("x".into()), now, Duration::from_secs(1))
            .is_err());
    }
}
