//! The admin credential file `DIR/admin.conf` that `shoalctl` reads: the API address, the CA that
//! signs the API's certificate, and a bearer token. The controller keeps only the token's hash.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// File name in the data dir.
pub const ADMIN_CONF_FILE: &str = "admin.conf";

/// Contents of `admin.conf`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminConf {
    /// Base URL of the admin API (`https://127.0.0.1:7441`).
    pub api: String,
    /// Bearer token.
    pub token: String,
    /// The fleet CA certificate (PEM) that signs the API's certificate.
    pub ca: String,
}

impl std::fmt::Debug for AdminConf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConf").field("api", &self.api).field("token", &"<redacted>").finish()
    }
}

/// Why the admin credential file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminConfError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a valid admin configuration.
    #[error("{path} is not a shoal admin configuration: {cause}")]
    Parse {
        /// The file.
        path: String,
        /// The cause.
        cause: String,
    },
}

impl AdminConf {
    /// Reads and parses a credential file.
    pub fn read(path: &Path) -> Result<AdminConf, AdminConfError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| AdminConfError::Io { path: path.display().to_string(), source })?;
        toml::from_str(&text).map_err(|e| AdminConfError::Parse { path: path.display().to_string(), cause: e.to_string() })
    }

    /// Writes the file atomically with mode 0600.
    pub fn write(&self, path: &Path) -> Result<(), AdminConfError> {
        let body = toml::to_string(self)
            .map_err(|e| AdminConfError::Parse { path: path.display().to_string(), cause: e.to_string() })?;
        let text = format!("# shoalctl credentials written by shoal-controller; keep private.\n{body}");
        crate::ca::write_private_file(path, text.as_bytes(), 0o600)
            .map_err(|source| AdminConfError::Io { path: path.display().to_string(), source })
    }
}

/// A new random bearer token (256 bits, hex).
pub fn new_admin_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Compares two digests in constant time.
pub fn digest_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_private() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ADMIN_CONF_FILE);
        let conf = AdminConf { api: "https://127.0.0.1:7441".into(), token: new_admin_token(), ca: "pem".into() };
        conf.write(&path).unwrap();
        assert_eq!(AdminConf::read(&path).unwrap(), conf);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        std::fs::write(&path, "nonsense = [").unwrap();
        assert!(matches!(AdminConf::read(&path), Err(AdminConfError::Parse { .. })));
    }

    #[test]
    fn digest_compare() {
        assert!(digest_eq(&[1; 32], &[1; 32]));
        assert!(!digest_eq(&[1; 32], &[2; 32]));
    }
}
