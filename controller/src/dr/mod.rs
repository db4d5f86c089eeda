//! Controller disaster recovery: the whole controller — store, CA, admin credential — in one
//! passphrase-encrypted file, taken online and restored all-or-nothing into a new data dir.
//!
//! - `archive.rs`: the file's format, its bounds and checks, and its encryption (age, scrypt); no
//!   I/O.
//! - `snapshot.rs`: taking a consistent snapshot of a running controller, and what it holds.
//! - `restore.rs`: writing an archive into a new data dir through a temporary sibling, and
//!   verifying one (the seam for scheduled, verified backups).
//! - `routes.rs`: `POST /v1/controller/backup`.
//! - `migrate.rs`: `shoal-controller migrate`: a stopped controller's sled store copied into etcd
//!   and verified.
//! - `schedule.rs`: `--dr-target`: the archive written to a backup target on a schedule, kept
//!   `--dr-keep` deep and verified by restoring it.

pub mod archive;
pub mod migrate;
pub mod restore;
pub(crate) mod routes;
pub mod schedule;
pub mod snapshot;

pub use archive::{Archive, ArchiveError, Manifest};
pub use restore::{restore, verify_archive, RestoreError, RestoreReport, VerifyReport};
pub use snapshot::{snapshot_archive, SnapshotError};
