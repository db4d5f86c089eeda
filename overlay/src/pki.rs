//! Node keys, certificate signing requests, and reading identities out of certificates.

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use sha2::{Digest, Sha256};
use shoal_proto::NodeId;

/// The TLS server name every agent uses for the controller, whatever address it dials: certificates
/// are bound to this name rather than to IP addresses that NAT and DHCP change.
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
    rustls_pki_types::PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(
        key.serialize_der(),
    ))
}

/// A temporary file created exclusively (`O_CREAT|O_EXCL|O_NOFOLLOW`, so it is never an existing
/// file or a symlink someone planted) under a random name (`.<name>.<16 hex>.tmp`) in the directory
/// of the file it will become, so the final `rename` stays on one filesystem. It is removed when
/// dropped, unless [`TempFile::persist`] renamed it into place: a failed write leaves nothing
/// behind.
#[derive(Debug)]
pub struct TempFile {
    path: std::path::PathBuf,
    file: std::fs::File,
    persisted: bool,
}

impl TempFile {
    /// Creates a temporary file beside `target` (same directory) with `mode` (set explicitly: the
    /// umask does not narrow or widen it).
    pub fn new_beside(target: &std::path::Path, mode: u32) -> std::io::Result<TempFile> {
        let dir = target
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        TempFile::new_in(dir, &name, mode)
    }

    /// Creates a temporary file in `dir`, its name starting with `.<prefix>.`.
    pub fn new_in(dir: &std::path::Path, prefix: &str, mode: u32) -> std::io::Result<TempFile> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mut last = None;
        // 64 random bits: a collision is practically impossible, but a name someone guessed and
        // took only costs another try.
        for _ in 0..8 {
            let path = dir.join(format!(".{prefix}.{:016x}.tmp", rand::random::<u64>()));
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .read(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
                .open(&path);
            match opened {
                Ok(file) => {
                    let temp = TempFile {
                        path,
                        file,
                        persisted: false,
                    };
                    temp.file
                        .set_permissions(std::fs::Permissions::from_mode(mode))?;
                    return Ok(temp);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no unique temporary name")))
    }

    /// The open file.
    pub fn file(&mut self) -> &mut std::fs::File {
        &mut self.file
    }

    /// Swaps the writable descriptor for a read-only one of the same file (checked by device and
    /// inode; the name is opened with `O_NOFOLLOW`). The kernel refuses to load a file that anyone
    /// holds open for writing (`kexec_file_load(2)`: `ETXTBSY`).
    pub fn reopen_read_only(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        self.file.sync_all()?;
        let ro = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&self.path)?;
        let (a, b) = (self.file.metadata()?, ro.metadata()?);
        if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
            return Err(std::io::Error::other(format!(
                "{} was replaced while it was written",
                self.path.display()
            )));
        }
        self.file = ro;
        Ok(())
    }

    /// Where it is.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// fsyncs the file, renames it over `target` and fsyncs the directory: a crash leaves the old
    /// `target` or the new one, never a torn one.
    pub fn persist(mut self, target: &std::path::Path) -> std::io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.path, target)?;
        self.persisted = true;
        if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes a key, certificate or state file atomically — an exclusive temporary file with `mode` and
/// a unique name beside it ([`TempFile`]), fsync, rename, fsync of the directory — so a crash
/// leaves the old file or the new one, never a torn or world-readable one, and a symlink or file
/// planted under a temporary name is never written through.
pub fn write_private_file(
    path: &std::path::Path,
    contents: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = TempFile::new_beside(path, mode)?;
    tmp.file().write_all(contents)?;
    tmp.persist(path)
}

/// Creates `dir` (and its parents) mode 0700, or tightens an existing one to 0700 if its group or
/// others have any access: a data or state directory holding keys is the owner's alone.
pub fn ensure_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
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
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::Certificate(e.to_string()))?;
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

/// The SubjectPublicKeyInfo (DER) of the key a certificate signing request holds. Parsing checks
/// the request's own signature, so the requester holds that key.
pub fn csr_spki(csr_der: &[u8]) -> Result<Vec<u8>, PkiError> {
    use rcgen::PublicKeyData;
    let params = rcgen::CertificateSigningRequestParams::from_der(&csr_der.into())?;
    Ok(params.public_key.subject_public_key_info())
}

/// The SubjectPublicKeyInfo (DER) of a certificate's key; its SHA-256 is [`CertInfo::key_sha256`].
pub fn cert_spki(cert_der: &[u8]) -> Result<Vec<u8>, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::Certificate(e.to_string()))?;
    Ok(cert.public_key().raw.to_vec())
}

/// The old key's signature over a key rotation to `new_spki` ([`shoal_proto::rotation_message`]).
pub fn sign_rotation(old: &KeyPair, node: &NodeId, new_spki: &[u8]) -> Result<Vec<u8>, PkiError> {
    use rcgen::SigningKey;
    Ok(old.sign(&shoal_proto::rotation_message(node, new_spki))?)
}

/// Whether `signature` is the key in `old_spki` (ECDSA P-256) signing a rotation of `node` to
/// `new_spki`.
pub fn verify_rotation(old_spki: &[u8], node: &NodeId, new_spki: &[u8], signature: &[u8]) -> bool {
    use x509_parser::prelude::FromDer;
    let Ok((_, spki)) = x509_parser::x509::SubjectPublicKeyInfo::from_der(old_spki) else {
        return false;
    };
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        spki.subject_public_key.data.as_ref(),
    );
    key.verify(&shoal_proto::rotation_message(node, new_spki), signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_parses_and_proves_the_key() {
        let key = generate_key().unwrap();
        let csr = make_csr(&key).unwrap();
        let parsed =
            rcgen::CertificateSigningRequestParams::from_der(&csr.as_slice().into()).unwrap();
        use rcgen::PublicKeyData;
        assert_eq!(parsed.public_key.der_bytes(), key.der_bytes());
        let mut tampered = csr.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(
            rcgen::CertificateSigningRequestParams::from_der(&tampered.as_slice().into()).is_err()
        );
        assert!(
            csr_spki(&tampered).is_err(),
            "a request whose signature fails proves no key"
        );
    }

    #[test]
    fn the_requested_key_is_the_certified_key_and_rotations_verify_only_with_the_old_key() {
        let old = generate_key().unwrap();
        let new = generate_key().unwrap();
        let csr = make_csr(&old).unwrap();
        let spki = csr_spki(&csr).unwrap();
        // A certificate for that request carries the same SubjectPublicKeyInfo bytes.
        let issuer_key = generate_key().unwrap();
        let issuer = rcgen::CertificateParams::new(vec!["ca".to_string()])
            .unwrap()
            .self_signed(&issuer_key)
            .unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_der(issuer.der(), issuer_key).unwrap();
        let parsed =
            rcgen::CertificateSigningRequestParams::from_der(&csr.as_slice().into()).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "n1");
        let cert = params.signed_by(&parsed.public_key, &issuer).unwrap();
        assert_eq!(cert_spki(cert.der()).unwrap(), spki);
        assert_eq!(cert_info(cert.der()).unwrap().key_sha256, sha256(&spki));

        let node = NodeId("n1".into());
        let new_spki = csr_spki(&make_csr(&new).unwrap()).unwrap();
        let sig = sign_rotation(&old, &node, &new_spki).unwrap();
        assert!(verify_rotation(&spki, &node, &new_spki, &sig));
        assert!(
            !verify_rotation(&new_spki, &node, &new_spki, &sig),
            "only the old key's signature counts"
        );
        assert!(
            !verify_rotation(&spki, &NodeId("n2".into()), &new_spki, &sig),
            "bound to the node"
        );
        let self_signed = sign_rotation(&new, &node, &new_spki).unwrap();
        assert!(
            !verify_rotation(&spki, &node, &new_spki, &self_signed),
            "the new key cannot vouch for itself"
        );
    }

    fn temp_names(dir: &std::path::Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') && n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn private_files_are_written_through_unique_exclusive_temporary_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!(
            "shoal-pki-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.key");
        // The old fixed temporary name, planted as a symlink to a file an attacker wants
        // overwritten: it is neither followed nor reused.
        let victim = dir.join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("node.tmp")).unwrap();
        write_private_file(&path, b"secret", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        write_private_file(&path, b"again", 0o644).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644,
            "mode set, not left from before"
        );
        assert!(
            temp_names(&dir).is_empty(),
            "no temporary file left: {:?}",
            temp_names(&dir)
        );
        // Two temporary files for one target never share a name; dropping one removes it.
        let (a, b) = (
            TempFile::new_beside(&path, 0o600).unwrap(),
            TempFile::new_beside(&path, 0o600).unwrap(),
        );
        assert_ne!(a.path(), b.path());
        assert!(a
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".node.key."));
        let kept = a.path().to_owned();
        drop(a);
        assert!(
            !kept.exists(),
            "a temporary file that was not persisted is removed"
        );
        drop(b);
        // A write that fails (the target is a directory) cleans up after itself.
        let sub = dir.join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("x"), b"x").unwrap();
        assert!(write_private_file(&sub, b"x", 0o600).is_err());
        assert!(temp_names(&dir).is_empty(), "{:?}", temp_names(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn private_dirs_are_created_and_tightened_to_0700() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!(
            "shoal-pki-dir-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let dir = base.join("data");
        ensure_private_dir(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700,
            "tightened"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500)).unwrap();
        ensure_private_dir(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o500,
            "a stricter mode is left alone"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }
}
