//! The admin credential, controller side: a new bearer token, the constant-time comparison of its
//! digest, and writing `DATA_DIR/admin.conf` (which `shoalctl` reads). The controller keeps only
//! the token's hash.
//!
//! The file's shape and the client that reads it are `shoal_api`'s ([`AdminConf`],
//! [`AdminClient`]), re-exported here under their old paths.

use std::path::Path;

pub use shoal_api::{AdminClient, AdminClientError, AdminConf, AdminConfError, ADMIN_CONF_FILE};

/// Writes `conf` to `path` atomically with mode 0600.
pub fn write_admin_conf(path: &Path, conf: &AdminConf) -> Result<(), AdminConfError> {
    let body = toml::to_string(conf).map_err(|e| AdminConfError::Parse {
        path: path.display().to_string(),
        cause: e.to_string(),
    })?;
    let text = format!("# shoalctl credentials written by shoal-controller; keep private.\n{body}");
    crate::registry::ca::write_private_file(path, text.as_bytes(), 0o600).map_err(|source| {
        AdminConfError::Io {
            path: path.display().to_string(),
            source,
        }
    })
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
        let conf = AdminConf {
            api: "https://127.0.0.1:7441".into(),
            token: new_admin_token(),
            ca: "pem".into(),
        };
        write_admin_conf(&path, &conf).unwrap();
        assert_eq!(AdminConf::read(&path).unwrap(), conf);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        std::fs::write(&path, "nonsense = [").unwrap();
        assert!(matches!(
            AdminConf::read(&path),
            Err(AdminConfError::Parse { .. })
        ));
    }

    #[test]
    fn digest_compare() {
        assert!(digest_eq(&[1; 32], &[1; 32]));
        assert!(!digest_eq(&[1; 32], &[2; 32]));
    }
}
