//! Controller disaster recovery: `POST /v1/controller/backup` takes a [`BackupRequest`] and
//! answers the encrypted archive's bytes (`application/octet-stream`).

use serde::{Deserialize, Serialize};

/// The route.
pub const BACKUP_PATH: &str = "/v1/controller/backup";

/// Shortest passphrase (in characters) a backup may be encrypted with.
pub const MIN_PASSPHRASE_CHARS: usize = 12;

/// Longest passphrase (in bytes) accepted: a bound on what the controller hashes.
pub const MAX_PASSPHRASE_BYTES: usize = 1024;

/// Largest archive a client accepts as an answer (and the controller writes): a bound on what the
/// client buffers.
pub const MAX_ARCHIVE_BYTES: u64 = 512 << 20;

/// `POST /v1/controller/backup`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRequest {
    /// The passphrase the archive is encrypted with (age, scrypt).
    pub passphrase: String,
}

impl std::fmt::Debug for BackupRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupRequest")
            .field("passphrase", &"<redacted>")
            .finish()
    }
}

/// Why a passphrase is refused, if it is: shorter than [`MIN_PASSPHRASE_CHARS`] characters or
/// longer than [`MAX_PASSPHRASE_BYTES`] bytes.
pub fn check_passphrase(passphrase: &str) -> Result<(), String> {
    let chars = passphrase.chars().count();
    if chars < MIN_PASSPHRASE_CHARS {
        return Err(format!(
            "the passphrase has {chars} characters; a backup needs at least {MIN_PASSPHRASE_CHARS}"
        ));
    }
    if passphrase.len() > MAX_PASSPHRASE_BYTES {
        return Err(format!(
            "the passphrase is longer than {MAX_PASSPHRASE_BYTES} bytes"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_huge_passphrases_are_refused() {
        assert!(check_passphrase("eleven char").is_err());
        assert!(check_passphrase("twelve chars").is_ok());
        assert!(
            check_passphrase("ääääääääääää").is_ok(),
            "characters, not bytes"
        );
        assert!(check_passphrase(&"x".repeat(MAX_PASSPHRASE_BYTES + 1)).is_err());
        assert!(!format!(
            "{:?}",
            BackupRequest {
                passphrase: "secret".into()
            }
        )
        .contains("secret"));
    }
}
