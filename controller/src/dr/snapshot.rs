//! Taking the snapshot: the store frozen ([`crate::store::Store::freeze`]) while every table and
//! the data dir's files are read, so the archive is one point in time; encoding and encryption
//! happen after the store is released.
//!
//! What an archive holds, and why (the operators' guide repeats it for operators):
//! - every store table (nodes, identities and certificates by serial, revocations, tokens,
//!   networks, memberships, overlay addresses and keys, drives and policies, windows, budgets,
//!   rollouts, machines, the event log, metadata: the admin token's hash, the QUIC stateless-reset
//!   key) — so agents reconnect as the same nodes with their certificates, addresses and keys;
//! - `ca.crt` and `ca.key` — every agent pins this CA, and node certificates chain to it;
//! - `admin.conf` — the operator's credential keeps working;
//! - `backup-secrets.key` — the key the backup targets' secrets are sealed with.
//!
//! Left out, and listed in the manifest's `left_out` for the operator to upload again: the signed
//! agent releases (`releases/`) and netboot images (`images/`). They are large, reproducible from
//! the build and signed with keys kept elsewhere, and the controller checks every upload again.
//! The admin API's server certificate is not a file: the controller issues it from the CA at each
//! start.

use std::path::Path;

use shoal_proto::UnixMillis;

use super::archive::{self, Archive, ArchiveError, ArchivedFile, ArchivedTable, Manifest};
use crate::{server::Controller, store::StoreError};

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file of the data dir could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The archive could not be built (too large, a weak passphrase, encryption).
    #[error(transparent)]
    Archive(#[from] ArchiveError),
}

/// The encrypted archive of `ctl`'s state now, sealed with `passphrase`: what `POST
/// /v1/controller/backup` answers, and what a scheduled backup writes. Blocking (the store is
/// frozen while it is read, then scrypt runs): call it off the async threads.
pub fn snapshot_archive(ctl: &Controller, passphrase: &str) -> Result<Vec<u8>, SnapshotError> {
    snapshot_archive_with(ctl, passphrase, archive::WORK_FACTOR)
}

pub(crate) fn snapshot_archive_with(
    ctl: &Controller,
    passphrase: &str,
    work_factor: u8,
) -> Result<Vec<u8>, SnapshotError> {
    shoal_api::dr::check_passphrase(passphrase).map_err(ArchiveError::WeakPassphrase)?;
    let archive = take(ctl, crate::server::now_ms())?;
    Ok(archive::pack(&archive, passphrase, work_factor)?)
}

/// The archive of `ctl`'s state, unencrypted: tables and files read while the store is frozen.
pub fn take(ctl: &Controller, now: UnixMillis) -> Result<Archive, SnapshotError> {
    let dir = &ctl.config.data_dir;
    let started = std::time::Instant::now();
    let (tables, files) = {
        let frozen = ctl.store.freeze()?;
        let tables = frozen.tables()?;
        // The files change only at start (the CA once, admin.conf when its address changes), but
        // reading them frozen keeps admin.conf and the token hash in `meta` from disagreeing.
        let files = read_files(dir)?;
        (tables, files)
    };
    let frozen_for = started.elapsed();
    let tables: Vec<ArchivedTable> = tables.into_iter().map(ArchivedTable::from).collect();
    let nodes = tables
        .iter()
        .find(|t| t.name == crate::registry::store::NODES)
        .map_or(0, |t| t.entries.len() as u64);
    let entries = tables.iter().map(|t| t.entries.len() as u64).sum();
    tracing::info!(
        tables = tables.len(),
        entries,
        nodes,
        frozen_ms = frozen_for.as_millis() as u64,
        "controller snapshot taken"
    );
    Ok(Archive {
        manifest: Manifest {
            controller_version: env!("CARGO_PKG_VERSION").to_owned(),
            created_at: now,
            nodes,
            tables: tables.len() as u64,
            entries,
            files: files.len() as u64,
            left_out: left_out(dir),
        },
        tables,
        files,
    })
}

fn read_files(dir: &Path) -> Result<Vec<ArchivedFile>, SnapshotError> {
    use std::os::unix::fs::PermissionsExt;
    archive::FILES
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let io = |source| SnapshotError::Io {
                path: path.display().to_string(),
                source,
            };
            let bytes = std::fs::read(&path).map_err(io)?;
            let mode = std::fs::metadata(&path).map_err(io)?.permissions().mode() & 0o777;
            Ok(ArchivedFile {
                name: (*name).to_owned(),
                mode,
                bytes,
            })
        })
        .collect()
}

/// The artifacts the data dir holds that the archive leaves out.
fn left_out(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for version in visible_dirs(&dir.join("releases")) {
        for target in visible_dirs(&dir.join("releases").join(&version)) {
            out.push(format!("releases/{version}/{target}"));
        }
    }
    for version in visible_dirs(&dir.join("images")) {
        out.push(format!("images/{version}"));
    }
    if let Ok(default) = std::fs::read_to_string(dir.join("images").join("default")) {
        out.push(format!("images/default = {}", default.trim()));
    }
    out.truncate(archive::MAX_LEFT_OUT);
    for item in &mut out {
        if item.len() > archive::MAX_TEXT {
            *item = item.chars().take(archive::MAX_TEXT / 4).collect();
        }
    }
    out
}

fn visible_dirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };

    use crate::store::{abort, Store, StoreError, TxError};

    const LEFT: &str = "dr_test_left";
    const RIGHT: &str = "dr_test_right";
    const TOKENS: u32 = 64;

    /// Tokens move between two tables, each move one transaction; another thread writes pairs
    /// across both tables. Every snapshot, taken while they run, sees all tokens exactly once and
    /// every pair whole: no write is torn or lost by a snapshot.
    #[test]
    fn every_snapshot_is_one_point_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for t in 0..TOKENS {
            store.table(LEFT).insert(t.to_be_bytes(), b"token").unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mover = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut moves = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let t = ((moves * 7) % u64::from(TOKENS)) as u32;
                    store
                        .transaction::<_, StoreError>(&[LEFT, RIGHT], |tx| {
                            let (l, r) = (tx.table(LEFT), tx.table(RIGHT));
                            let key = t.to_be_bytes();
                            if let Some(v) = l.remove(key)? {
                                r.insert(key, v)?;
                            } else if let Some(v) = r.remove(key)? {
                                l.insert(key, v)?;
                            } else {
                                return Err(abort(StoreError::Db("token lost".into())));
                            }
                            Ok(())
                        })
                        .unwrap();
                    moves += 1;
                }
                moves
            })
        };
        let pairs = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    store
                        .transaction::<_, StoreError>(&[LEFT, RIGHT], |tx| {
                            tx.table(LEFT).insert(b"pair", n.to_be_bytes())?;
                            tx.table(RIGHT).insert(b"pair", n.to_be_bytes())?;
                            Ok::<_, TxError<StoreError>>(())
                        })
                        .unwrap();
                }
                n
            })
        };
        let mut slowest = std::time::Duration::ZERO;
        for _ in 0..200 {
            let started = std::time::Instant::now();
            let tables = store.freeze().unwrap().tables().unwrap();
            slowest = slowest.max(started.elapsed());
            let entries = |name: &str| {
                tables
                    .iter()
                    .find(|t| t.name == name)
                    .map(|t| t.entries.clone())
                    .unwrap_or_default()
            };
            let (left, right) = (entries(LEFT), entries(RIGHT));
            let tokens = |e: &[(Vec<u8>, Vec<u8>)]| e.iter().filter(|(k, _)| k != b"pair").count();
            assert_eq!(
                tokens(&left) + tokens(&right),
                TOKENS as usize,
                "a move was torn"
            );
            let pair = |e: &[(Vec<u8>, Vec<u8>)]| {
                e.iter().find(|(k, _)| k == b"pair").map(|(_, v)| v.clone())
            };
            assert_eq!(pair(&left), pair(&right), "a pair was torn");
        }
        stop.store(true, Ordering::SeqCst);
        let (moves, pairs) = (mover.join().unwrap(), pairs.join().unwrap());
        assert!(moves > 0 && pairs > 0, "the writers ran");
        eprintln!("{moves} moves, {pairs} pairs; slowest freeze {slowest:?}");
    }

    #[test]
    fn a_snapshot_inside_a_write_is_refused_not_deadlocked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let inner = store.clone();
        let result = store.transaction::<_, StoreError>(&[LEFT], move |tx| {
            tx.table(LEFT).insert(b"k", b"v")?;
            inner.freeze().map(|_| ()).map_err(abort)
        });
        assert!(result.is_err());
    }
}
