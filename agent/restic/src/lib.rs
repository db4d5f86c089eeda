//! shoal's driver for [restic](https://restic.net) 0.14 (Debian bookworm's `restic` package): the
//! agent runs backup jobs with it and the controller writes its own disaster-recovery archive.
//!
//! Each operation starts one restic child (`kill_on_drop`, optional timeout), reads its `--json`
//! output line by line with a cap on line length, keeps the last few KiB of stderr for messages,
//! and classifies failures into [`Error`]. Secrets reach restic through its environment
//! (`RESTIC_PASSWORD`, backend credentials), never through argv or `Debug` output.
//!
//! Every node writes to its own repository under a target ([`Repo::for_node`]), so locks, pruning
//! and damage never cross nodes. After a backup the agent proves the snapshot restorable:
//! [`record_hashes`] hashes a [`sample_files`] sample of the live files right after the backup,
//! [`Restic::verify_sample`] restores exactly those files into a scratch directory and compares
//! them, and [`Restic::check`] reads a rotating subset of the packs.
//!
//! **Architecture Invariant:** this crate knows nothing of agents, controllers or the protocol;
//! it is a leaf that both use.

mod error;
mod ops;
mod repo;
mod runner;
mod sftp;
mod types;
mod verify;

use std::path::PathBuf;
use std::time::Duration;

pub use error::{Error, Result};
pub use ops::STALE_LOCK_AGE;
pub use repo::Repo;
pub use sftp::{sftp_destination, SftpAccess};
pub use types::{
    parse_rfc3339, BackupSpec, BackupSummary, BackupWarning, CheckOutcome, Entry, EntryKind,
    FileHash, Filter, ForgetOutcome, LockInfo, Mismatch, Progress, Retention, SampleVerification,
    Snapshot,
};
pub use verify::{record_hashes, sample_files};

/// The most warnings or error lines kept from one run; the rest are counted, not stored.
pub const MAX_WARNINGS: usize = 100;

/// The most entries [`Restic::ls`] returns.
pub const MAX_ENTRIES: usize = 10_000_000;

/// How to run restic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restic {
    /// The restic program. Default: `restic`, looked up on `$PATH`.
    pub binary: PathBuf,
    /// restic's cache directory (`--cache-dir`). Default: `None`, restic's own
    /// (`$XDG_CACHE_HOME/restic` or `~/.cache/restic`).
    pub cache_dir: Option<PathBuf>,
    /// A deadline for each restic run, after which the child is killed and the operation fails
    /// with [`Error::Timeout`]. Default: `None` (no deadline).
    pub timeout: Option<Duration>,
}

impl Default for Restic {
    fn default() -> Restic {
        Restic {
            binary: PathBuf::from("restic"),
            cache_dir: None,
            timeout: None,
        }
    }
}

/// restic's version, from `restic version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Major, minor, patch.
    pub number: (u32, u32, u32),
    /// The whole line restic printed.
    pub text: String,
}
