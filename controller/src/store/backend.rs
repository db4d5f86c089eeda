//! The storage contract between the controller's domains and a database: named tables of byte keys
//! and byte values, point reads, ordered scans, and atomic transactions over several tables.
//!
//! The domains never see the database: they go through [`super::Store`] and its typed tables
//! ([`super::Table`]), which sit on a [`Backend`]. The embedded one is [`super::SledBackend`]; a
//! distributed one goes behind the same trait, and [`contract`] is the one test suite every
//! implementation must pass.
//!
//! What an implementation promises:
//! - A transaction ([`Backend::transact`]) is atomic and isolated: its writes land together or not
//!   at all, and what it read was not changed by another commit before it committed. The body may
//!   run more than once (after a conflict), so it must not act outside the transaction.
//! - A committed transaction asked to be durable ([`Txn::flush_on_commit`]) and every [`Backend::flush`]
//!   is on stable storage when the call returns.
//! - Scans return keys in byte order and see a consistent view of one table.
//! - Scans are not available inside a transaction (sled cannot); a domain that must scan and then
//!   write consistently serialises its writers (the store's locks) and re-checks in the transaction.
//! - [`Backend::export`] lists every table that holds data with all its entries, and
//!   [`Backend::import`] writes such a list into an empty database; a backup is one and a restore
//!   the other. `export` is consistent across tables only while no one writes: the store's write
//!   gate ([`super::Store::freeze`]) keeps writers out while it runs.

use std::{cell::RefCell, fmt, ops::Bound};

use super::StoreError;

/// A condition every write must meet to land: the etcd key `key` (absolute, not under the store's
/// prefix) still has create revision `revision` — the leader's election key, so a controller that
/// lost its leadership cannot write. Made current for a thread's writes by [`fenced`]; a backend
/// with a single writer ([`super::SledBackend`]) ignores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The etcd key, absolute.
    pub key: Vec<u8>,
    /// The create revision it must still have.
    pub revision: i64,
}

thread_local! {
    /// The fence this thread's writes carry.
    static FENCE: RefCell<Option<Fence>> = const { RefCell::new(None) };
}

/// Runs `f` with `fence` current on this thread: every store write `f` makes (put, delete, batch,
/// transaction) lands only while the fence holds, and fails with [`StoreError::Fenced`] otherwise.
/// The previous fence is current again afterwards, also when `f` panics. The fence is this
/// thread's: work `f` hands to other threads is not fenced.
pub fn fenced<T>(fence: &Fence, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Fence>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            FENCE.with(|c| *c.borrow_mut() = previous);
        }
    }
    let previous = FENCE.with(|c| c.replace(Some(fence.clone())));
    let _restore = Restore(previous);
    f()
}

/// The fence current on this thread, if any.
pub fn current_fence() -> Option<Fence> {
    FENCE.with(|c| c.borrow().clone())
}

/// One (key, value) a scan yields.
pub type Entry = (Vec<u8>, Vec<u8>);

/// Scans a backend yields, oldest key first unless the scan is reversed.
pub type Entries<'a> = Box<dyn Iterator<Item = Result<Entry, StoreError>> + 'a>;

/// Which keys of a table a scan visits.
#[derive(Debug, Clone)]
pub struct Scan {
    /// Lower bound.
    pub start: Bound<Vec<u8>>,
    /// Upper bound.
    pub end: Bound<Vec<u8>>,
    /// Greatest key first.
    pub reverse: bool,
}

impl Scan {
    /// Every key.
    pub fn all() -> Scan {
        Scan {
            start: Bound::Unbounded,
            end: Bound::Unbounded,
            reverse: false,
        }
    }

    /// Keys that start with `prefix`.
    pub fn prefix(prefix: impl AsRef<[u8]>) -> Scan {
        let prefix = prefix.as_ref();
        Scan {
            start: Bound::Included(prefix.to_vec()),
            end: match prefix_end(prefix) {
                Some(end) => Bound::Excluded(end),
                None => Bound::Unbounded,
            },
            reverse: false,
        }
    }

    /// Keys from `start` (included) on.
    pub fn from(start: impl AsRef<[u8]>) -> Scan {
        Scan {
            start: Bound::Included(start.as_ref().to_vec()),
            end: Bound::Unbounded,
            reverse: false,
        }
    }

    /// Keys from `start` (included) to `end` (excluded).
    pub fn between(start: impl AsRef<[u8]>, end: impl AsRef<[u8]>) -> Scan {
        Scan {
            start: Bound::Included(start.as_ref().to_vec()),
            end: Bound::Excluded(end.as_ref().to_vec()),
            reverse: false,
        }
    }

    /// Keys before `end` (excluded).
    pub fn before(end: impl AsRef<[u8]>) -> Scan {
        Scan {
            start: Bound::Unbounded,
            end: Bound::Excluded(end.as_ref().to_vec()),
            reverse: false,
        }
    }

    /// Keys up to `end` (included).
    pub fn through(end: impl AsRef<[u8]>) -> Scan {
        Scan {
            start: Bound::Unbounded,
            end: Bound::Included(end.as_ref().to_vec()),
            reverse: false,
        }
    }

    /// The same keys, greatest first.
    pub fn rev(self) -> Scan {
        Scan {
            reverse: !self.reverse,
            ..self
        }
    }
}

/// The first key after every key that starts with `prefix`, or `None` when there is none (the
/// prefix is empty or all `0xff`).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Writes to one table, applied together by [`Backend::write_batch`].
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Each key with its new value, or `None` to delete it; later entries win.
    pub ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    /// Writes `value` at `key`.
    pub fn insert(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), Some(value.into())));
    }

    /// Deletes `key`.
    pub fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), None));
    }

    /// A batch that deletes every key of `keys`.
    pub fn deleting(keys: impl IntoIterator<Item = Vec<u8>>) -> Batch {
        Batch {
            ops: keys.into_iter().map(|k| (k, None)).collect(),
        }
    }

    /// Whether it writes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// One table with every entry, in key order: what [`Backend::export`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDump {
    /// The table's name.
    pub name: String,
    /// Its entries, in key order.
    pub entries: Vec<Entry>,
}

/// Why a transaction body stopped.
#[derive(Debug)]
pub enum TxFail {
    /// Another commit changed what the body read: the backend runs the body again. Bodies pass it
    /// on with `?` and never make one.
    Conflict,
    /// The body decided not to commit (its reason is the caller's to keep).
    Abort,
    /// The database failed.
    Storage(StoreError),
}

/// The view of the database inside a transaction. Every table used must be named when the
/// transaction starts.
pub trait Txn {
    /// The value of `key` in `table`, as of this transaction.
    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, TxFail>;
    /// Writes `key` in `table` when the transaction commits.
    fn put(&self, table: &'static str, key: &[u8], value: &[u8]) -> Result<(), TxFail>;
    /// Deletes `key` from `table` when the transaction commits.
    fn delete(&self, table: &'static str, key: &[u8]) -> Result<(), TxFail>;
    /// Makes the commit durable before [`Backend::transact`] returns.
    fn flush_on_commit(&self);
}

/// A transaction body, as a backend runs it.
pub type TxBody<'a> = dyn Fn(&dyn Txn) -> Result<(), TxFail> + 'a;

/// A database of named tables, as [`super::Store`] needs one.
pub trait Backend: Send + Sync + fmt::Debug {
    /// The value of `key` in `table`.
    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// The entries of `table` that `scan` selects, in key order (reversed if it says so).
    fn scan(&self, table: &'static str, scan: Scan) -> Result<Entries<'_>, StoreError>;
    /// Writes one key outside any transaction.
    fn put(&self, table: &'static str, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    /// Deletes one key outside any transaction.
    fn delete(&self, table: &'static str, key: &[u8]) -> Result<(), StoreError>;
    /// Applies `batch` to `table` at once (all or none).
    fn write_batch(&self, table: &'static str, batch: &Batch) -> Result<(), StoreError>;
    /// Runs `body` as one transaction over `tables`, again after a conflict, until it commits or
    /// stops. `Err(TxFail::Abort)` when the body aborted; never `Conflict`.
    fn transact(&self, tables: &[&'static str], body: &TxBody<'_>) -> Result<(), TxFail>;
    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Every table that holds at least one entry, by name, with its entries in key order. Not
    /// isolated from concurrent writes: the caller keeps writers out ([`super::Store::freeze`]).
    fn export(&self) -> Result<Vec<TableDump>, StoreError>;
    /// Writes `entries` into table `name` and makes them durable; for restoring a backup into an
    /// empty database.
    fn import(&self, name: &str, entries: &[Entry]) -> Result<(), StoreError>;
}

/// The one test suite of the contract; each backend's tests call [`contract::run`].
#[cfg(test)]
pub mod contract {
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc, Barrier,
        },
        thread,
    };

    use super::*;

    const A: &str = "contract_a";
    const B: &str = "contract_b";

    /// Runs every check of the contract on `backend` (empty tables `contract_a` and `contract_b`).
    pub fn run(backend: Arc<dyn Backend>) {
        reads_see_writes(&*backend);
        scans_are_ordered_and_bounded(&*backend);
        transactions_are_atomic(&*backend);
        aborts_write_nothing(&*backend);
        concurrent_increments_are_not_lost(backend.clone());
        batches_write_and_delete_exactly_their_keys(&*backend);
        export_lists_every_table_and_import_restores_it(&*backend);
    }

    fn keys(entries: Entries<'_>) -> Vec<Vec<u8>> {
        entries.map(|e| e.expect("scan entry").0).collect()
    }

    fn reads_see_writes(b: &dyn Backend) {
        assert_eq!(b.get(A, b"k").unwrap(), None);
        b.put(A, b"k", b"v1").unwrap();
        assert_eq!(b.get(A, b"k").unwrap().as_deref(), Some(&b"v1"[..]));
        assert_eq!(b.get(B, b"k").unwrap(), None, "tables are separate");
        b.delete(A, b"k").unwrap();
        assert_eq!(b.get(A, b"k").unwrap(), None);
        b.flush().unwrap();
    }

    fn scans_are_ordered_and_bounded(b: &dyn Backend) {
        for k in [&b"b2"[..], b"a1", b"b1", b"c", b"b\xff", b"\xff\xff"] {
            b.put(A, k, k).unwrap();
        }
        let all = keys(b.scan(A, Scan::all()).unwrap());
        assert_eq!(
            all,
            vec![
                b"a1".to_vec(),
                b"b1".to_vec(),
                b"b2".to_vec(),
                b"b\xff".to_vec(),
                b"c".to_vec(),
                b"\xff\xff".to_vec()
            ]
        );
        let prefixed = keys(b.scan(A, Scan::prefix(b"b")).unwrap());
        assert_eq!(
            prefixed,
            vec![b"b1".to_vec(), b"b2".to_vec(), b"b\xff".to_vec()]
        );
        let ff = keys(b.scan(A, Scan::prefix(b"\xff")).unwrap());
        assert_eq!(ff, vec![b"\xff\xff".to_vec()]);
        let from = keys(b.scan(A, Scan::from(b"b2")).unwrap());
        assert_eq!(from.first().map(Vec::as_slice), Some(&b"b2"[..]));
        assert_eq!(from.len(), 4);
        let before = keys(b.scan(A, Scan::before(b"b2")).unwrap());
        assert_eq!(before, vec![b"a1".to_vec(), b"b1".to_vec()]);
        let through = keys(b.scan(A, Scan::through(b"b2")).unwrap());
        assert_eq!(through.len(), 3);
        let newest = keys(b.scan(A, Scan::all().rev()).unwrap());
        assert_eq!(newest.first().map(Vec::as_slice), Some(&b"\xff\xff"[..]));
        let all_keys = keys(b.scan(A, Scan::all()).unwrap());
        b.write_batch(A, &Batch::deleting(all_keys)).unwrap();
        assert_eq!(b.scan(A, Scan::all()).unwrap().count(), 0);
    }

    fn transactions_are_atomic(b: &dyn Backend) {
        b.transact(&[A, B], &|tx| {
            tx.put(A, b"x", b"1")?;
            tx.put(B, b"y", b"2")?;
            assert_eq!(
                tx.get(A, b"x")?.as_deref(),
                Some(&b"1"[..]),
                "a transaction reads its own writes"
            );
            tx.flush_on_commit();
            Ok(())
        })
        .unwrap();
        assert_eq!(b.get(A, b"x").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(b.get(B, b"y").unwrap().as_deref(), Some(&b"2"[..]));
        b.transact(&[A, B], &|tx| {
            tx.delete(A, b"x")?;
            tx.delete(B, b"y")?;
            Ok(())
        })
        .unwrap();
        assert_eq!(b.get(A, b"x").unwrap(), None);
        assert_eq!(b.get(B, b"y").unwrap(), None);
    }

    fn aborts_write_nothing(b: &dyn Backend) {
        let result = b.transact(&[A, B], &|tx| {
            tx.put(A, b"gone", b"1")?;
            tx.put(B, b"gone", b"1")?;
            Err(TxFail::Abort)
        });
        assert!(matches!(result, Err(TxFail::Abort)), "{result:?}");
        assert_eq!(b.get(A, b"gone").unwrap(), None);
        assert_eq!(b.get(B, b"gone").unwrap(), None);
    }

    /// Read-modify-write transactions from several threads: none is lost, so the reads were
    /// isolated (a conflict re-ran the body).
    fn concurrent_increments_are_not_lost(b: Arc<dyn Backend>) {
        const THREADS: usize = 4;
        const EACH: usize = 50;
        b.put(A, b"counter", &0u64.to_be_bytes()).unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let (b, runs, start) = (b.clone(), runs.clone(), start.clone());
                thread::spawn(move || {
                    start.wait();
                    for _ in 0..EACH {
                        b.transact(&[A], &|tx| {
                            runs.fetch_add(1, Ordering::SeqCst);
                            let v = tx.get(A, b"counter")?.expect("counter");
                            let n = u64::from_be_bytes(v.as_slice().try_into().expect("8 bytes"));
                            tx.put(A, b"counter", &(n + 1).to_be_bytes())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let v = b.get(A, b"counter").unwrap().unwrap();
        assert_eq!(
            u64::from_be_bytes(v.as_slice().try_into().unwrap()),
            (THREADS * EACH) as u64
        );
        assert!(runs.load(Ordering::SeqCst) >= THREADS * EACH);
        b.delete(A, b"counter").unwrap();
    }

    fn batches_write_and_delete_exactly_their_keys(b: &dyn Backend) {
        for k in [&b"k1"[..], b"k2", b"k3"] {
            b.put(B, k, b"v").unwrap();
        }
        let mut batch = Batch::deleting([b"k1".to_vec(), b"k3".to_vec()]);
        batch.insert(b"k4".to_vec(), b"v".to_vec());
        b.write_batch(B, &batch).unwrap();
        assert_eq!(
            keys(b.scan(B, Scan::all()).unwrap()),
            vec![b"k2".to_vec(), b"k4".to_vec()]
        );
        b.write_batch(B, &Batch::deleting([b"k2".to_vec(), b"k4".to_vec()]))
            .unwrap();
    }

    fn export_lists_every_table_and_import_restores_it(b: &dyn Backend) {
        b.put(A, b"a1", b"x").unwrap();
        b.put(A, b"a0", b"y").unwrap();
        b.put(B, b"b", b"z").unwrap();
        let dump = b.export().unwrap();
        let a = dump.iter().find(|t| t.name == A).expect("table a exported");
        assert_eq!(
            a.entries,
            vec![
                (b"a0".to_vec(), b"y".to_vec()),
                (b"a1".to_vec(), b"x".to_vec())
            ]
        );
        assert!(
            dump.iter().all(|t| !t.entries.is_empty()),
            "empty tables are left out"
        );
        b.write_batch(A, &Batch::deleting([b"a0".to_vec(), b"a1".to_vec()]))
            .unwrap();
        b.delete(B, b"b").unwrap();
        assert!(b
            .export()
            .unwrap()
            .iter()
            .all(|t| t.name != A && t.name != B));
        for t in &dump {
            if t.name == A || t.name == B {
                b.import(&t.name, &t.entries).unwrap();
            }
        }
        assert_eq!(b.get(A, b"a0").unwrap().as_deref(), Some(&b"y"[..]));
        assert_eq!(b.get(B, b"b").unwrap().as_deref(), Some(&b"z"[..]));
        b.write_batch(A, &Batch::deleting([b"a0".to_vec(), b"a1".to_vec()]))
            .unwrap();
        b.delete(B, b"b").unwrap();
    }
}
