//! The write gate: every write to the store passes it shared, a backup holds it exclusively, so a
//! backup sees every table at one point in time.
//!
//! The backend's own isolation covers one transaction; a scan of one table is consistent with
//! itself, but scanning the tables one after the other is not a snapshot (a transaction that
//! commits between two scans lands in one half). [`GatedBackend`] wraps the store's backend and
//! takes the gate shared around every write (`put`, `delete`, `write_batch`, `transact`); the
//! store hands out only the wrapped backend, so no write can pass around it.
//! [`super::Store::freeze`] takes the gate exclusively: once it holds it, no write is in progress
//! and none starts until it is dropped, and what it reads is every committed write and nothing
//! half-done.
//!
//! Writes take the gate at most once per thread: a write made while the same thread already holds
//! it (a nested call) does not take it again, since a second shared acquisition could wait behind a
//! queued exclusive one and deadlock. Reads never take it.

use std::{
    cell::Cell,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use super::{
    backend::{Backend, Batch, Entries, Entry, Scan, TableDump, TxBody, TxFail},
    StoreError,
};

thread_local! {
    /// How many shared passes this thread holds (nested writes take the lock only once).
    static HELD: Cell<usize> = const { Cell::new(0) };
}

/// The gate itself.
#[derive(Debug, Default)]
pub(crate) struct WriteGate {
    lock: RwLock<()>,
}

/// A write's pass through the gate.
pub(crate) struct Pass<'a> {
    _guard: Option<RwLockReadGuard<'a, ()>>,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        HELD.with(|h| h.set(h.get().saturating_sub(1)));
    }
}

impl WriteGate {
    /// Lets a write through (waits while the gate is held exclusively).
    pub(crate) fn pass(&self) -> Pass<'_> {
        let nested = HELD.with(|h| h.get()) > 0;
        // `()` is guarded: a panic while holding the lock left nothing inconsistent.
        let guard = (!nested).then(|| self.lock.read().unwrap_or_else(|p| p.into_inner()));
        HELD.with(|h| h.set(h.get() + 1));
        Pass { _guard: guard }
    }

    /// Holds every writer out until the guard is dropped. Refused on a thread that is inside a
    /// write (it would wait for itself).
    pub(crate) fn close(&self) -> Result<RwLockWriteGuard<'_, ()>, StoreError> {
        if HELD.with(|h| h.get()) > 0 {
            return Err(StoreError::Db(
                "a store snapshot cannot be taken inside a write".into(),
            ));
        }
        Ok(self.lock.write().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A backend whose writes pass the gate.
#[derive(Debug)]
pub(crate) struct GatedBackend {
    pub(crate) inner: Arc<dyn Backend>,
    pub(crate) gate: Arc<WriteGate>,
}

impl Backend for GatedBackend {
    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(table, key)
    }

    fn scan(&self, table: &'static str, scan: Scan) -> Result<Entries<'_>, StoreError> {
        self.inner.scan(table, scan)
    }

    fn put(&self, table: &'static str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let _pass = self.gate.pass();
        self.inner.put(table, key, value)
    }

    fn delete(&self, table: &'static str, key: &[u8]) -> Result<(), StoreError> {
        let _pass = self.gate.pass();
        self.inner.delete(table, key)
    }

    fn write_batch(&self, table: &'static str, batch: &Batch) -> Result<(), StoreError> {
        let _pass = self.gate.pass();
        self.inner.write_batch(table, batch)
    }

    fn transact(&self, tables: &[&'static str], body: &TxBody<'_>) -> Result<(), TxFail> {
        let _pass = self.gate.pass();
        self.inner.transact(tables, body)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }

    fn export(&self) -> Result<Vec<TableDump>, StoreError> {
        self.inner.export()
    }

    fn import(&self, name: &str, entries: &[Entry]) -> Result<(), StoreError> {
        let _pass = self.gate.pass();
        self.inner.import(name, entries)
    }
}
