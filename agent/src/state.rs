//! What the agent keeps in its state dir: its key, its certificate, the fleet CA, and the
//! controllers it was told of. All mode 0600, written atomically, so a crash never leaves a key
//! without its certificate.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use shoal_proto::{NodeId, UnixMillis};
use tracing::warn;

use crate::controllers::KeptControllers;

const KEY_FILE: &str = "node.key";
const CERT_FILE: &str = "node.crt";
const CA_FILE: &str = "ca.crt";
/// The key an enrolment in progress uses: kept until the enrolment succeeds, so a retry after a
/// lost reply (or while an operator decides on a pending claim) presents the same key.
const ENROL_KEY_FILE: &str = "enrol.key";
/// The new key of a rotation in progress: kept until its certificate is stored.
const ROTATE_KEY_FILE: &str = "rotate.key";
/// The controller set last announced and the controller last up on (JSON, [`KeptControllers`]).
const CONTROLLERS_FILE: &str = "controllers.json";
/// Far above what the largest announced set takes (16 entries of about 100 bytes): anything bigger
/// was not written by the agent.
const MAX_CONTROLLERS_FILE: u64 = 64 * 1024;

/// Why the state dir could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file holds something unusable.
    #[error("{path} is unusable: {cause}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: String,
    },
}

/// The agent's credentials.
#[derive(Clone)]
pub struct Credentials {
    /// Private key (PEM, PKCS#8).
    pub key_pem: String,
    /// Node certificate (DER).
    pub cert_der: Vec<u8>,
    /// Fleet CA certificate (DER).
    pub ca_der: Vec<u8>,
    /// Node id from the certificate.
    pub node_id: NodeId,
    /// Certificate expiry.
    pub not_after: UnixMillis,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("node_id", &self.node_id)
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// Whether a PEM key's public half hashes (SPKI SHA-256) to `key_sha256`.
fn key_matches(key_pem: &str, key_sha256: &[u8; 32]) -> bool {
    use rcgen::PublicKeyData;
    rcgen::KeyPair::from_pem(key_pem)
        .is_ok_and(|k| shoal_overlay::pki::sha256(&k.subject_public_key_info()) == *key_sha256)
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), StateError> {
    shoal_overlay::pki::write_private_file(path, contents, 0o600).map_err(|source| StateError::Io {
        path: path.to_owned(),
        source,
    })
}

fn pem_der(path: &Path) -> Result<Option<Vec<u8>>, StateError> {
    match fs::read_to_string(path) {
        Ok(text) => pem::parse(text)
            .map(|p| Some(p.into_contents()))
            .map_err(|e| StateError::Invalid {
                path: path.to_owned(),
                cause: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

impl StateDir {
    /// Opens (creating, mode 0700) the state dir.
    pub fn open(dir: &Path) -> Result<StateDir, StateError> {
        fs::create_dir_all(dir).map_err(|source| StateError::Io {
            path: dir.to_owned(),
            source,
        })?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            StateError::Io {
                path: dir.to_owned(),
                source,
            }
        })?;
        Ok(StateDir {
            dir: dir.to_owned(),
        })
    }

    /// The stored credentials, if complete.
    pub fn load(&self) -> Result<Option<Credentials>, StateError> {
        let key_path = self.dir.join(KEY_FILE);
        let key_pem = match fs::read_to_string(&key_path) {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    path: key_path,
                    source,
                })
            }
        };
        let (Some(cert_der), Some(ca_der)) = (
            pem_der(&self.dir.join(CERT_FILE))?,
            pem_der(&self.dir.join(CA_FILE))?,
        ) else {
            return Ok(None);
        };
        let info = shoal_overlay::pki::cert_info(&cert_der).map_err(|e| StateError::Invalid {
            path: self.dir.join(CERT_FILE),
            cause: e.to_string(),
        })?;
        let key_pem = match key_matches(&key_pem, &info.key_sha256) {
            true => key_pem,
            // A crash during a rotation, between writing the new certificate and the new key: the
            // new key is still in rotate.key. Finish the job.
            false => match self
                .pending_key(ROTATE_KEY_FILE)?
                .filter(|k| key_matches(k, &info.key_sha256))
            {
                Some(rotated) => {
                    write_private(&key_path, rotated.as_bytes())?;
                    self.clear_pending_key(ROTATE_KEY_FILE)?;
                    rotated
                }
                None => {
                    tracing::warn!(path = %key_path.display(), "the node key does not match the certificate; enrolling again");
                    return Ok(None);
                }
            },
        };
        Ok(Some(Credentials {
            key_pem,
            cert_der,
            ca_der,
            node_id: info.node_id,
            not_after: UnixMillis((info.not_after_unix.max(0) as u64) * 1000),
        }))
    }

    /// Stores credentials; the certificate is written last, so a crash leaves either the old
    /// complete set or a key whose certificate does not match it (which the controller refuses, and
    /// the agent then re-enrols).
    pub fn save(&self, creds: &Credentials) -> Result<(), StateError> {
        write_private(
            &self.dir.join(CA_FILE),
            pem::encode(&pem::Pem::new("CERTIFICATE", creds.ca_der.clone())).as_bytes(),
        )?;
        write_private(&self.dir.join(KEY_FILE), creds.key_pem.as_bytes())?;
        write_private(
            &self.dir.join(CERT_FILE),
            pem::encode(&pem::Pem::new("CERTIFICATE", creds.cert_der.clone())).as_bytes(),
        )
    }

    /// The key to enrol with: the node's own key if it still has one (its certificate expired: the
    /// controller re-enrols a node that proves its key), else the key of an enrolment in progress,
    /// created on first use.
    pub fn enrolment_key(&self) -> Result<String, StateError> {
        if let Some(k) = self
            .pending_key(KEY_FILE)?
            .filter(|k| rcgen::KeyPair::from_pem(k).is_ok())
        {
            return Ok(k);
        }
        self.pending_or_new_key(ENROL_KEY_FILE)
    }

    /// The new key of a rotation in progress, creating it on first use.
    pub fn rotation_key(&self) -> Result<String, StateError> {
        self.pending_or_new_key(ROTATE_KEY_FILE)
    }

    fn pending_or_new_key(&self, name: &str) -> Result<String, StateError> {
        if let Some(k) = self
            .pending_key(name)?
            .filter(|k| rcgen::KeyPair::from_pem(k).is_ok())
        {
            return Ok(k);
        }
        let pem = shoal_overlay::pki::generate_key()
            .map_err(|e| StateError::Invalid {
                path: self.dir.join(name),
                cause: e.to_string(),
            })?
            .serialize_pem();
        write_private(&self.dir.join(name), pem.as_bytes())?;
        Ok(pem)
    }

    fn pending_key(&self, name: &str) -> Result<Option<String>, StateError> {
        let path = self.dir.join(name);
        match fs::read_to_string(&path) {
            Ok(k) => Ok(Some(k)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    fn clear_pending_key(&self, name: &str) -> Result<(), StateError> {
        let path = self.dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Stores the credentials an enrolment produced and drops the enrolment's pending key.
    pub fn save_enrolled(&self, creds: &Credentials) -> Result<(), StateError> {
        self.save(creds)?;
        self.clear_pending_key(ENROL_KEY_FILE)
    }

    /// Stores the credentials of a finished rotation (certificate first, then key:
    /// [`StateDir::load`] repairs a crash in between from the pending rotation key) and drops the
    /// pending key.
    pub fn save_rotated(&self, creds: &Credentials) -> Result<(), StateError> {
        write_private(
            &self.dir.join(CA_FILE),
            pem::encode(&pem::Pem::new("CERTIFICATE", creds.ca_der.clone())).as_bytes(),
        )?;
        write_private(
            &self.dir.join(CERT_FILE),
            pem::encode(&pem::Pem::new("CERTIFICATE", creds.cert_der.clone())).as_bytes(),
        )?;
        write_private(&self.dir.join(KEY_FILE), creds.key_pem.as_bytes())?;
        self.clear_pending_key(ROTATE_KEY_FILE)
    }

    /// Forgets certificate and key (the controller no longer accepts them: revoked, or the node was
    /// re-enrolled with another key): the next attempt enrols with a token.
    pub fn forget_credentials(&self) -> Result<(), StateError> {
        self.forget_certificate()?;
        self.clear_pending_key(KEY_FILE)
    }

    /// The controllers kept from earlier sessions; none when the file is missing, and none (with a
    /// warning) when it is unreadable, too large, corrupt or over the protocol's bounds: the
    /// configured controllers are enough to start.
    pub fn load_controllers(&self) -> KeptControllers {
        let path = self.dir.join(CONTROLLERS_FILE);
        let read = fs::File::open(&path).and_then(|f| {
            use std::io::Read;
            let mut text = String::new();
            f.take(MAX_CONTROLLERS_FILE + 1).read_to_string(&mut text)?;
            Ok(text)
        });
        let text = match read {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return KeptControllers::default()
            }
            Err(e) => {
                warn!(path = %path.display(), cause = %e, "kept controllers unreadable; ignored");
                return KeptControllers::default();
            }
        };
        if text.len() as u64 > MAX_CONTROLLERS_FILE {
            warn!(path = %path.display(), limit = MAX_CONTROLLERS_FILE, "kept controllers file too large; ignored");
            return KeptControllers::default();
        }
        let kept = serde_json::from_str::<KeptControllers>(&text)
            .map_err(|e| e.to_string())
            .and_then(|k| {
                shoal_proto::limits::check_controller_set(&shoal_proto::ControllerSet {
                    controllers: k.announced.clone(),
                })
                .map(|()| k)
                .map_err(|e| e.to_string())
            });
        kept.unwrap_or_else(|cause| {
            warn!(path = %path.display(), %cause, "kept controllers corrupt; ignored");
            KeptControllers::default()
        })
    }

    /// Keeps the controllers (atomically: a crash leaves the old file or the new one).
    pub fn save_controllers(&self, kept: &KeptControllers) -> Result<(), StateError> {
        let path = self.dir.join(CONTROLLERS_FILE);
        let text = serde_json::to_vec_pretty(kept).map_err(|e| StateError::Invalid {
            path: path.clone(),
            cause: e.to_string(),
        })?;
        write_private(&path, &text)
    }

    /// Forgets the certificate (the node was removed): the next start must enrol with a token.
    pub fn forget_certificate(&self) -> Result<(), StateError> {
        let path = self.dir.join(CERT_FILE);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A certificate for `key_pem` (self-signed: `load` only reads the identity out of it).
    fn cert_for(key_pem: &str, node: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::from_pem(key_pem).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, node);
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn creds(key_pem: &str) -> Credentials {
        Credentials {
            key_pem: key_pem.to_owned(),
            cert_der: cert_for(key_pem, "n1"),
            ca_der: vec![1, 2, 3],
            node_id: NodeId("n1".into()),
            not_after: UnixMillis(0),
        }
    }

    #[test]
    fn an_enrolment_keeps_its_key_across_attempts_and_a_node_enrols_again_with_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let first = state.enrolment_key().unwrap();
        assert_eq!(
            state.enrolment_key().unwrap(),
            first,
            "a retry presents the same key"
        );
        state.save_enrolled(&creds(&first)).unwrap();
        assert!(
            !dir.path().join(ENROL_KEY_FILE).exists(),
            "the pending key is dropped once enrolled"
        );
        assert_eq!(
            state.enrolment_key().unwrap(),
            first,
            "an expired node enrols again with its own key"
        );
        state.forget_credentials().unwrap();
        assert!(state.load().unwrap().is_none());
        assert_ne!(
            state.enrolment_key().unwrap(),
            first,
            "a refused key is not used again"
        );
    }

    #[test]
    fn kept_controllers_round_trip_and_a_corrupt_or_huge_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert_eq!(state.load_controllers(), KeptControllers::default());
        let kept = KeptControllers {
            announced: vec![shoal_proto::ControllerEndpoint {
                id: "ctl-b".into(),
                addr: "192.0.2.2:7440".parse().unwrap(),
            }],
            last_good: Some("192.0.2.2:7440".parse().unwrap()),
        };
        state.save_controllers(&kept).unwrap();
        assert_eq!(state.load_controllers(), kept);
        let path = dir.path().join(CONTROLLERS_FILE);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::write(&path, b"{\"announced\": [").unwrap();
        assert_eq!(state.load_controllers(), KeptControllers::default());
        fs::write(&path, vec![b' '; MAX_CONTROLLERS_FILE as usize + 10]).unwrap();
        assert_eq!(state.load_controllers(), KeptControllers::default());
        let over = KeptControllers {
            announced: vec![kept.announced[0].clone(); shoal_proto::limits::MAX_CONTROLLERS + 1],
            last_good: None,
        };
        fs::write(&path, serde_json::to_vec(&over).unwrap()).unwrap();
        assert_eq!(state.load_controllers(), KeptControllers::default());
    }

    #[test]
    fn a_rotation_interrupted_between_certificate_and_key_is_finished_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let old = state.enrolment_key().unwrap();
        state.save_enrolled(&creds(&old)).unwrap();
        let new = state.rotation_key().unwrap();
        assert_eq!(
            state.rotation_key().unwrap(),
            new,
            "a retried rotation uses the same new key"
        );
        // The crash: the new certificate is written, the new key is not.
        write_private(
            &dir.path().join(CERT_FILE),
            pem::encode(&pem::Pem::new("CERTIFICATE", cert_for(&new, "n1"))).as_bytes(),
        )
        .unwrap();
        let loaded = state.load().unwrap().expect("repaired");
        assert_eq!(loaded.key_pem, new);
        assert_eq!(fs::read_to_string(dir.path().join(KEY_FILE)).unwrap(), new);
        assert!(!dir.path().join(ROTATE_KEY_FILE).exists());
        // A key that matches nothing: enrol again rather than present a certificate that cannot
        // work.
        write_private(&dir.path().join(KEY_FILE), old.as_bytes()).unwrap();
        assert!(state.load().unwrap().is_none());
    }
}
