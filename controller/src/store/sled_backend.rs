//! The embedded [`Backend`]: one sled database in the controller's data directory, a sled tree per
//! table.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        RwLock,
    },
    time::{Duration, Instant},
};

use tracing::warn;

use sled::transaction::{
    ConflictableTransactionError, TransactionError, Transactional, TransactionalTree,
    UnabortableTransactionError,
};

use super::{
    backend::{Backend, Batch, Entries, Entry, Scan, TableDump, TxBody, TxFail, Txn},
    StoreError, CACHE_CAPACITY, FLUSH_EVERY_MS, OPEN_LOCK_WAIT,
};

/// sled, as a [`Backend`].
pub struct SledBackend {
    db: sled::Db,
    /// Trees opened so far, by table name (opening one is a lookup in sled's own catalogue).
    trees: RwLock<HashMap<&'static str, sled::Tree>>,
}

impl std::fmt::Debug for SledBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledBackend").finish_non_exhaustive()
    }
}

impl SledBackend {
    /// Wraps an open database.
    pub fn new(db: sled::Db) -> SledBackend {
        SledBackend {
            db,
            trees: RwLock::new(HashMap::new()),
        }
    }

    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<SledBackend, StoreError> {
        Ok(SledBackend::new(open_db(dir)?))
    }

    fn tree(&self, table: &'static str) -> Result<sled::Tree, StoreError> {
        if let Some(t) = self
            .trees
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(table)
        {
            return Ok(t.clone());
        }
        let tree = self.db.open_tree(table)?;
        self.trees
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(table, tree.clone());
        Ok(tree)
    }
}

fn storage(e: UnabortableTransactionError) -> TxFail {
    match e {
        UnabortableTransactionError::Conflict => TxFail::Conflict,
        UnabortableTransactionError::Storage(e) => TxFail::Storage(e.into()),
    }
}

/// One transaction's trees, by the table names it was started with.
struct SledTxn<'a> {
    tables: &'a [&'static str],
    views: &'a [TransactionalTree],
    flush: &'a AtomicBool,
}

impl SledTxn<'_> {
    fn view(&self, table: &'static str) -> Result<&TransactionalTree, TxFail> {
        match self.tables.iter().position(|t| *t == table) {
            Some(i) => Ok(&self.views[i]),
            None => Err(TxFail::Storage(StoreError::Db(format!(
                "table {table} is not part of this transaction"
            )))),
        }
    }
}

impl Txn for SledTxn<'_> {
    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, TxFail> {
        Ok(self
            .view(table)?
            .get(key)
            .map_err(storage)?
            .map(|v| v.to_vec()))
    }

    fn put(&self, table: &'static str, key: &[u8], value: &[u8]) -> Result<(), TxFail> {
        self.view(table)?.insert(key, value).map_err(storage)?;
        Ok(())
    }

    fn delete(&self, table: &'static str, key: &[u8]) -> Result<(), TxFail> {
        self.view(table)?.remove(key).map_err(storage)?;
        Ok(())
    }

    fn flush_on_commit(&self) {
        self.flush.store(true, Ordering::SeqCst);
    }
}

impl Backend for SledBackend {
    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree(table)?.get(key)?.map(|v| v.to_vec()))
    }

    fn scan(&self, table: &'static str, scan: Scan) -> Result<Entries<'_>, StoreError> {
        let tree = self.tree(table)?;
        let range = (scan.start, scan.end);
        let iter = tree.range::<Vec<u8>, _>(range).map(|r| {
            r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(StoreError::from)
        });
        Ok(if scan.reverse {
            Box::new(iter.rev())
        } else {
            Box::new(iter)
        })
    }

    fn put(&self, table: &'static str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.tree(table)?.insert(key, value)?;
        Ok(())
    }

    fn delete(&self, table: &'static str, key: &[u8]) -> Result<(), StoreError> {
        self.tree(table)?.remove(key)?;
        Ok(())
    }

    fn write_batch(&self, table: &'static str, batch: &Batch) -> Result<(), StoreError> {
        let mut sled_batch = sled::Batch::default();
        for (k, v) in &batch.ops {
            match v {
                Some(v) => sled_batch.insert(k.as_slice(), v.as_slice()),
                None => sled_batch.remove(k.as_slice()),
            }
        }
        self.tree(table)?.apply_batch(sled_batch)?;
        Ok(())
    }

    fn transact(&self, tables: &[&'static str], body: &TxBody<'_>) -> Result<(), TxFail> {
        let trees = tables
            .iter()
            .map(|t| self.tree(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TxFail::Storage)?;
        let refs: Vec<&sled::Tree> = trees.iter().collect();
        let flush = AtomicBool::new(false);
        let result = refs.as_slice().transaction(|views| {
            flush.store(false, Ordering::SeqCst);
            let txn = SledTxn {
                tables,
                views,
                flush: &flush,
            };
            match body(&txn) {
                Ok(()) => {
                    if flush.load(Ordering::SeqCst) {
                        if let Some(first) = views.first() {
                            first.flush();
                        }
                    }
                    Ok(())
                }
                Err(TxFail::Conflict) => Err(ConflictableTransactionError::Conflict),
                Err(other) => Err(ConflictableTransactionError::Abort(other)),
            }
        });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(fail)) => Err(fail),
            Err(TransactionError::Storage(e)) => Err(TxFail::Storage(e.into())),
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn export(&self) -> Result<Vec<TableDump>, StoreError> {
        let mut names = self.db.tree_names();
        names.sort();
        let mut out = Vec::new();
        for raw in names {
            let name = std::str::from_utf8(&raw).map_err(|_| {
                StoreError::Db(format!("table name {} is not UTF-8", hex::encode(&raw)))
            })?;
            let tree = self.db.open_tree(&raw)?;
            let entries = tree
                .iter()
                .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())))
                .collect::<Result<Vec<Entry>, _>>()?;
            if !entries.is_empty() {
                out.push(TableDump {
                    name: name.to_owned(),
                    entries,
                });
            }
        }
        Ok(out)
    }

    fn import(&self, name: &str, entries: &[Entry]) -> Result<(), StoreError> {
        let tree = self.db.open_tree(name)?;
        let mut batch = sled::Batch::default();
        for (k, v) in entries {
            batch.insert(k.as_slice(), v.as_slice());
        }
        tree.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Db(sled_message(e))
    }
}

fn sled_message(e: sled::Error) -> String {
    match e {
        // sled hands out clones of the error it remembers, rebuilt from the original's Debug text
        // (`Os { code: 28, kind: StorageFull, message: "No space left on device" }`); say it
        // plainly. After a failed log write sled 0.34 refuses every later write of this process.
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            "I/O error: No space left on device; the database accepts no more writes until the controller is \
             restarted with free space"
                .to_owned()
        }
        sled::Error::Io(io) => format!("I/O error: {io}"),
        other => other.to_string(),
    }
}

/// Opens sled, waiting a little for the file lock: sled 0.34 releases it some time after the last
/// handle of a previous `Db` in this process is dropped (deferred epoch-based reclamation), so a
/// quick close-and-reopen in one process can find it still held.
pub(super) fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_CAPACITY)
        .flush_every_ms(Some(FLUSH_EVERY_MS));
    let deadline = Instant::now() + OPEN_LOCK_WAIT;
    loop {
        remove_interrupted_snapshots(dir)?;
        match config.open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                if Instant::now() >= deadline {
                    return Err(StoreError::Db(format!(
                        "cannot open database in {}: it is locked by another process (is another shoal-controller \
                         using this data directory?)",
                        dir.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(sled::Error::Io(e)) if e.kind() == std::io::ErrorKind::StorageFull => {
                return Err(StoreError::Db(format!(
                    "cannot open database in {}: No space left on device (opening writes a snapshot); free some \
                     space and start again",
                    dir.display()
                )))
            }
            Err(e) => {
                return Err(StoreError::Db(format!("cannot open database in {}: {}", dir.display(), sled_message(e))))
            }
        }
    }
}

/// Deletes snapshots whose writing was interrupted.
///
/// sled 0.34 writes a snapshot to `snap.<lsn>.generating` and renames it to `snap.<lsn>` once
/// complete and synced, but when it looks for the newest snapshot it does not skip `.generating`
/// files: one left behind by an interrupted write (a full disk, a crash) makes every later open
/// fail with "Read corrupted data". Such a file is never needed: older snapshots are only deleted
/// after the rename, and the log is untouched. It is deleted only while this process holds the
/// database's lock, so a sled running in another process is never disturbed.
fn remove_interrupted_snapshots(dir: &Path) -> Result<(), StoreError> {
    use nix::fcntl::{Flock, FlockArg};

    let Ok(file) = std::fs::File::open(dir.join("db")) else {
        return Ok(()); // no database yet (or unreadable: sled's open will say why)
    };
    let Ok(_lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
        return Ok(()); // in use: sled's open reports that
    };
    let entries = std::fs::read_dir(dir).map_err(|e| {
        StoreError::Db(format!(
            "cannot list database directory {}: {e}",
            dir.display()
        ))
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            warn!(file = %entry.path().display(), "removing an incompletely written database snapshot");
            std::fs::remove_file(entry.path()).map_err(|e| {
                StoreError::Db(format!("cannot remove {}: {e}", entry.path().display()))
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn sled_keeps_the_storage_contract() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        super::super::backend::contract::run(Arc::new(SledBackend::new(db)));
    }
}
