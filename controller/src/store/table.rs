//! Typed tables over the [`Backend`]: a [`Table`] names a table and the type of its values
//! (postcard-encoded); a [`Tx`] is a transaction's typed view. Keys stay bytes: each table documents
//! its key layout where it is declared.

use std::{cell::RefCell, marker::PhantomData};

use serde::{de::DeserializeOwned, Serialize};

use super::{
    backend::{Backend, Scan, TxFail, Txn},
    decode, encode, StoreError,
};

/// A table whose values are `V`, postcard-encoded.
#[derive(Debug)]
pub struct Table<V> {
    /// The table's name in the backend.
    pub name: &'static str,
    _values: PhantomData<fn() -> V>,
}

impl<V> Table<V> {
    /// The table called `name`.
    pub const fn new(name: &'static str) -> Table<V> {
        Table {
            name,
            _values: PhantomData,
        }
    }
}

impl<V> Clone for Table<V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<V> Copy for Table<V> {}

/// Why a transaction body stopped, as domain code sees it: its own error, or the backend's.
#[derive(Debug)]
pub enum TxError<E> {
    /// The body's own reason not to commit.
    Abort(E),
    /// The backend's: a conflict (the body runs again) or a failure.
    Backend(TxFail),
}

impl<E> From<TxFail> for TxError<E> {
    fn from(f: TxFail) -> Self {
        TxError::Backend(f)
    }
}

/// Aborts a transaction with a store error.
pub(crate) fn abort<E: From<StoreError>>(e: StoreError) -> TxError<E> {
    TxError::Abort(E::from(e))
}

/// A transaction's view of the tables it was started with.
pub struct Tx<'a> {
    txn: &'a dyn Txn,
}

impl Tx<'_> {
    /// The record at `key`.
    pub fn get<V: DeserializeOwned>(
        &self,
        table: &Table<V>,
        key: &[u8],
    ) -> Result<Option<V>, TxFail> {
        match self.txn.get(table.name, key)? {
            Some(bytes) => Ok(Some(
                decode(table.name, key, &bytes).map_err(TxFail::Storage)?,
            )),
            None => Ok(None),
        }
    }

    /// Writes the record at `key`.
    pub fn put<V: Serialize>(&self, table: &Table<V>, key: &[u8], value: &V) -> Result<(), TxFail> {
        let bytes = encode(table.name, value).map_err(TxFail::Storage)?;
        self.txn.put(table.name, key, &bytes)
    }
}

/// Runs `body` as one transaction over `tables` on `backend`; see [`super::Store::transaction`].
pub(crate) fn run<T, E: From<StoreError>>(
    backend: &dyn Backend,
    tables: &[&'static str],
    body: impl Fn(&Tx<'_>) -> Result<T, TxError<E>>,
) -> Result<T, E> {
    // The body may run several times; only its last run's outcome counts.
    let outcome: RefCell<Option<Result<T, E>>> = RefCell::new(None);
    let result = backend.transact(tables, &|txn| match body(&Tx { txn }) {
        Ok(v) => {
            *outcome.borrow_mut() = Some(Ok(v));
            Ok(())
        }
        Err(TxError::Abort(e)) => {
            *outcome.borrow_mut() = Some(Err(e));
            Err(TxFail::Abort)
        }
        Err(TxError::Backend(f)) => Err(f),
    });
    match result {
        Ok(()) | Err(TxFail::Abort) => outcome.into_inner().unwrap_or_else(|| {
            Err(E::from(StoreError::Db(
                "transaction ended without an outcome".into(),
            )))
        }),
        Err(TxFail::Storage(e)) => Err(E::from(e)),
        Err(TxFail::Conflict) => Err(E::from(StoreError::Db(
            "transaction conflict escaped the backend".into(),
        ))),
    }
}

/// Decoded records of a scan.
pub(crate) fn records<'a, V: DeserializeOwned + 'a>(
    backend: &'a dyn Backend,
    table: &Table<V>,
    scan: Scan,
) -> Result<impl Iterator<Item = Result<(Vec<u8>, V), StoreError>> + 'a, StoreError> {
    let name = table.name;
    Ok(backend.scan(name, scan)?.map(move |r| {
        let (k, v) = r?;
        let value = decode(name, &k, &v)?;
        Ok((k, value))
    }))
}

/// One table inside a transaction, by bytes: for tables whose values are not postcard records
/// (an index of node ids, counters, metadata) and for bodies that decode with their own context.
#[derive(Clone, Copy)]
pub struct TxTable<'a> {
    txn: &'a dyn Txn,
    name: &'static str,
}

impl Tx<'_> {
    /// Table `name` of this transaction, by bytes.
    pub fn table(&self, name: &'static str) -> TxTable<'_> {
        TxTable {
            txn: self.txn,
            name,
        }
    }
}

impl<'a> TxTable<'a> {
    /// Table `name` of the same transaction.
    pub fn sibling(&self, name: &'static str) -> TxTable<'a> {
        TxTable {
            txn: self.txn,
            name,
        }
    }

    /// The bytes at `key`.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, TxFail> {
        self.txn.get(self.name, key.as_ref())
    }

    /// Writes `value` at `key`.
    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<(), TxFail> {
        self.txn.put(self.name, key.as_ref(), value.as_ref())
    }

    /// Deletes `key`, returning what it held.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, TxFail> {
        let old = self.txn.get(self.name, key.as_ref())?;
        if old.is_some() {
            self.txn.delete(self.name, key.as_ref())?;
        }
        Ok(old)
    }

    /// Makes the commit durable before the transaction returns.
    pub fn flush(&self) {
        self.txn.flush_on_commit()
    }
}

/// A handle on one table by bytes, outside transactions: for domains that keep their own tables
/// (drives, maintenance, netboot) and read or write them one key at a time. Cloning is cheap.
#[derive(Clone)]
pub struct RawTable {
    backend: std::sync::Arc<dyn Backend>,
    name: &'static str,
}

impl std::fmt::Debug for RawTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawTable")
            .field("name", &self.name)
            .finish()
    }
}

impl RawTable {
    pub(crate) fn new(backend: std::sync::Arc<dyn Backend>, name: &'static str) -> RawTable {
        RawTable { backend, name }
    }

    /// The table's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The bytes at `key`.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, StoreError> {
        self.backend.get(self.name, key.as_ref())
    }

    /// Whether `key` holds a value.
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool, StoreError> {
        Ok(self.get(key)?.is_some())
    }

    /// Writes `value` at `key`.
    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<(), StoreError> {
        self.backend.put(self.name, key.as_ref(), value.as_ref())
    }

    /// Deletes `key`.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<(), StoreError> {
        self.backend.delete(self.name, key.as_ref())
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> super::backend::Entries<'_> {
        self.scan(Scan::all())
    }

    /// The entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> super::backend::Entries<'_> {
        self.scan(Scan::prefix(prefix))
    }

    /// The entries `scan` selects (a failure to start the scan is its first item).
    pub fn scan(&self, scan: Scan) -> super::backend::Entries<'_> {
        match self.backend.scan(self.name, scan) {
            Ok(entries) => entries,
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    }

    /// How many entries (a full scan).
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.backend.flush()
    }

    /// Deletes `keys`, in batches of [`super::DELETE_CHUNK`]: not atomic as a whole (a crash
    /// part-way leaves some), for deletions that a later run may finish.
    pub fn remove_many(&self, keys: Vec<Vec<u8>>) -> Result<(), StoreError> {
        super::delete_keys(&*self.backend, self.name, keys)
    }
}
