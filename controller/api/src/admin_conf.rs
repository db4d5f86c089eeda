//! The admin credential file `DATA_DIR/admin.conf` that `shoalctl` reads: the API address, the CA
//! that signs the API's certificate, and a bearer token. The controller writes it (and keeps only
//! the token's hash); this side only reads it.

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
        f.debug_struct("AdminConf")
            .field("api", &self.api)
            .field("token", &"<redacted>")
            .finish()
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
        let text = std::fs::read_to_string(path).map_err(|source| AdminConfError::Io {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| AdminConfError::Parse {
            path: path.display().to_string(),
            cause: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_controller_writes_and_refuses_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(ADMIN_CONF_FILE);
        std::fs::write(
            &path,
            "# shoalctl credentials written by shoal-controller; keep private.\n\
             api = \"https://127.0.0.1:7441\"\ntoken = \"t0k\"\nca = \"pem\"\n",
        )
        .expect("write");
        let conf = AdminConf::read(&path).expect("reads");
        assert_eq!(conf.api, "https://127.0.0.1:7441");
        assert_eq!(conf.token, "t0k");
        assert!(
            !format!("{conf:?}").contains("t0k"),
            "Debug redacts the token"
        );
        std::fs::write(&path, "nonsense = [").expect("write");
        assert!(matches!(
            AdminConf::read(&path),
            Err(AdminConfError::Parse { .. })
        ));
        assert!(matches!(
            AdminConf::read(&dir.path().join("absent")),
            Err(AdminConfError::Io { .. })
        ));
    }
}
