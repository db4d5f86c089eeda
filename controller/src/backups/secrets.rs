//! Target secrets at rest: repository passwords, credentials and SSH keys are sealed with a key
//! kept beside the store (`backup-secrets.key`, 0600, made on first use), so a copy of the store
//! alone (a store dump, an etcd snapshot) reveals no repository. ChaCha20-Poly1305 from ring, a
//! random nonce per seal, the target's name as associated data (a sealed blob moved to another
//! target's record does not open).

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use ring::{
    aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN},
    rand::{SecureRandom, SystemRandom},
};
use serde::{Deserialize, Serialize};

/// The key file's name in the data dir.
pub const SECRETS_KEY_FILE: &str = "backup-secrets.key";

/// Why secrets could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The key file could not be read or written.
    #[error("backup secrets key {0}: {1}")]
    Key(PathBuf, std::io::Error),
    /// The key file is not 32 bytes.
    #[error("backup secrets key {0} is damaged (not 32 bytes)")]
    BadKey(PathBuf),
    /// A sealed blob did not open (damaged, or sealed with another key).
    #[error("the stored secrets of target {0:?} do not open with this controller's key (was the data dir restored without {SECRETS_KEY_FILE}?)")]
    Open(String),
    /// The system's random source failed.
    #[error("no randomness")]
    Random,
    /// Encoding.
    #[error("secrets encoding: {0}")]
    Encoding(String),
}

/// What a target keeps sealed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetSecrets {
    /// Repository password.
    pub password: String,
    /// Environment.
    pub env: Vec<(String, String)>,
    /// SSH private key.
    pub ssh_key: Option<String>,
}

/// The sealing key.
pub struct SecretBox {
    key: LessSafeKey,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(<key>)")
    }
}

impl SecretBox {
    /// Loads the key from `data_dir`, making it on first use.
    pub fn open(data_dir: &Path) -> Result<SecretBox, SecretError> {
        let path = data_dir.join(SECRETS_KEY_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| SecretError::Random)?;
                let tmp = path.with_extension("tmp");
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| SecretError::Key(tmp.clone(), e))?;
                f.write_all(&key)
                    .and_then(|_| f.sync_all())
                    .map_err(|e| SecretError::Key(tmp.clone(), e))?;
                std::fs::rename(&tmp, &path).map_err(|e| SecretError::Key(path.clone(), e))?;
                key.to_vec()
            }
            Err(e) => return Err(SecretError::Key(path, e)),
        };
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| SecretError::BadKey(path.clone()))?;
        Ok(SecretBox {
            key: LessSafeKey::new(key),
        })
    }

    /// Seals `secrets` for target `name`: nonce, then ciphertext and tag.
    pub fn seal(&self, name: &str, secrets: &TargetSecrets) -> Result<Vec<u8>, SecretError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SecretError::Random)?;
        let mut body =
            postcard::to_stdvec(secrets).map_err(|e| SecretError::Encoding(e.to_string()))?;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut body,
            )
            .map_err(|_| SecretError::Encoding("seal".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens what [`SecretBox::seal`] made for target `name`.
    pub fn unseal(&self, name: &str, sealed: &[u8]) -> Result<TargetSecrets, SecretError> {
        let bad = || SecretError::Open(name.to_owned());
        if sealed.len() < NONCE_LEN {
            return Err(bad());
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad())?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut body)
            .map_err(|_| bad())?;
        postcard::from_bytes(plain).map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_for_their_target_and_key() {
        let dir = tempfile::tempdir().expect("tmp");
        let b = SecretBox::open(dir.path()).expect("key");
        let s = TargetSecrets {
            password: "hunter2".into(),
            env: vec![("AWS_SECRET_ACCESS_KEY".into(), "x".into())],
            ssh_key: None,
        };
        let sealed = b.seal("offsite", &s).expect("seal");
        assert!(
            !sealed.windows(7).any(|w| w == b"hunter2"),
            "plaintext in the sealed blob"
        );
        assert_eq!(b.unseal("offsite", &sealed).expect("open"), s);
        assert!(
            b.unseal("other", &sealed).is_err(),
            "moved to another target"
        );
        let again = SecretBox::open(dir.path()).expect("same key");
        assert_eq!(again.unseal("offsite", &sealed).expect("reopen"), s);
        let other = tempfile::tempdir().expect("tmp");
        let b2 = SecretBox::open(other.path()).expect("key");
        assert!(matches!(
            b2.unseal("offsite", &sealed),
            Err(SecretError::Open(_))
        ));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(SECRETS_KEY_FILE))
                .expect("meta")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
