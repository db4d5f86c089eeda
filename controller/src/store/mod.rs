//! The controller's database: join tokens, nodes, removals, the event log and small metadata
//! (admin token hash, QUIC stateless-reset key), kept in [sled] in the controller's data directory
//! ([`Store::open`]), or in etcd shared by several controllers ([`Store::open_etcd`],
//! [`EtcdBackend`]). The guarantees below are sled's; on etcd a commit is durable on a quorum, the
//! free-space reserve does not apply, and a store without quorum answers reads and refuses writes
//! with [`StoreError::Unavailable`].
//!
//! Guarantees:
//! - A restart loses nothing that an API call reported as written; calls that change more than one
//!   record ([`Store::create_token`], [`Store::revoke_token`], [`Store::enrol`],
//!   [`Store::remove_node`]) do it in one sled transaction across trees and flush before returning,
//!   so a crash leaves either all or none of the change.
//! - A full disk is an error, never a panic: every write first checks the free space of the data
//!   directory's filesystem and refuses with [`StoreError::Db`] (`disk full: …`) while fewer than
//!   [`FREE_SPACE_RESERVE`] bytes are free. sled 0.34 poisons the whole database after its first
//!   failed log write (every later call fails until the process reopens it), so the store stops
//!   writing *before* sled can hit `ENOSPC`; once space is freed, writes succeed again without a
//!   restart. Should sled hit `ENOSPC` anyway (something else filled the disk faster), the error is
//!   returned as [`StoreError::Db`] with the I/O error's text and what was stored before stays
//!   intact on disk.
//! - A backup ([`Store::freeze`]) is one point in time across every table. **Invariant:** every
//!   write reaches the database through the write gate ([`gate`]): the store's backend is the gated
//!   wrapper and every table handle, transaction and batch goes through it, so a write (a
//!   transaction across tables included) holds the gate shared from its start to its commit, and a
//!   frozen store (the gate held exclusively) has no write in progress and starts none. A freeze
//!   never loses or tears a write: writers wait for it, then proceed. It copies every table into
//!   memory while writers wait: bounded by the store's size, of which the event log (at most
//!   [`MAX_EVENT_BYTES`]) is the largest part. Measured: under two transactional writers on a
//!   loaded 2-core machine, the slowest of 200 freezes of a small store took 53 ms
//!   (`dr::snapshot::tests::every_snapshot_is_one_point_in_time` prints it).
//!
//! Values are postcard-encoded. Trees and their keys:
//!
//! | tree | key | value |
//! |---|---|---|
//! | `meta` | name | raw bytes |
//! | `tokens` | token id | [`TokenRecord`] |
//! | `nodes` | node id | [`NodeRecord`] |
//! | `hwid` | hardware id display text (`dmi-uuid:…`) | node id |
//! | `removed_nodes` | node id | [`UnixMillis`] of removal |
//! | `removed_hw` | hardware id display text | [`UnixMillis`] of removal |
//! | `event_log` | seq, big-endian u64 | [`Event`] (its kind by name) |
//! | `event_seq` | `next` | the next event's seq, big-endian u64 |
//!
//! Overlay networks keep five more trees, described (and used only) in [`crate::overlay::networks`]:
//! `networks`, `net_members`, `peer_indexes`, `node_keys` and `overlay_counters`; their WireGuard
//! devices two, in [`crate::overlay::wireguard`]: `wg_devices` and `wg_gateways`. Drives keep
//! three, described in [`crate::drives::hub`]: `drive_reports`, `drive_samples` and `drive_policies`.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use shoal_proto::{NodeId, UnixMillis};
use tracing::{debug, warn};

pub mod backend;
pub mod event_log;

mod etcd_backend;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod etcd_store_tests;
mod gate;
mod sled_backend;
mod table;
pub use backend::{current_fence, fenced, Backend, Batch, Fence, Scan, TableDump};

/// A test's etcd configuration under a prefix of its own.
#[cfg(test)]
pub(crate) use etcd_backend::tests::config as test_etcd_config;
pub use etcd_backend::{EtcdBackend, QUORUM_LOST_FOR};

use crate::etcd::EtcdConfig;
pub use sled_backend::SledBackend;
pub(crate) use table::{abort, RawTable, Table, Tx, TxError, TxTable};

/// Writes are refused while the data directory's filesystem has fewer free bytes than this, so that
/// sled never meets `ENOSPC` (which poisons its database until reopened) and an operator has room
/// to act.
pub const FREE_SPACE_RESERVE: u64 = 8 * 1024 * 1024;

/// The event log keeps at most this many newest events; older ones are trimmed.
pub const MAX_EVENTS: u64 = 100_000;

/// The event log keeps at most this many bytes (encoded events); the oldest are trimmed until it is
/// back under seven eighths of it. 100 000 events of a typical 100 bytes are 10 MiB; a log of
/// capped 4 KiB messages ([`crate::store::event_log::MAX_EVENT_MESSAGE`]) would be 400 MiB without it.
pub const MAX_EVENT_BYTES: u64 = 64 << 20;

/// The most writes one batch or transaction may carry: one etcd transaction each, so etcd must run
/// with `--max-txn-ops` at least this. Deletions that need no atomicity (trims, pruning) are split
/// into batches of [`DELETE_CHUNK`].
pub const MAX_BATCH_OPS: usize = 4096;

/// Keys per batch when deleting many keys without atomicity (trims, pruning).
pub const DELETE_CHUNK: usize = 1024;

/// How often (in appended events) the event log is trimmed.
const TRIM_EVERY: u64 = 1024;

/// sled's page cache size.
pub(crate) const CACHE_CAPACITY: u64 = 64 * 1024 * 1024;

/// How often sled flushes in the background.
pub(crate) const FLUSH_EVERY_MS: u64 = 200;

/// How long [`Store::open`] waits for the database's file lock.
pub(crate) const OPEN_LOCK_WAIT: Duration = Duration::from_secs(3);

pub(crate) const META: &str = "meta";
pub(crate) const EVENTS: &str = "event_log";
/// The event log's counter: key [`SEQ_KEY`], the seq the next event gets (big-endian u64). Read
/// and bumped inside every transaction that writes events ([`Store::transaction`] adds the table
/// whenever [`EVENTS`] is in one), so seqs are unique and gap-free across every controller that
/// shares the store.
pub(crate) const EVENT_SEQ: &str = "event_seq";
/// The one key of [`EVENT_SEQ`].
pub(crate) const SEQ_KEY: &[u8] = b"next";
/// Where controllers before named event kinds kept the log (kinds by position); moved to
/// [`EVENTS`] when a store is opened.
const LEGACY_EVENTS: &str = "events";
/// `events`, typed (key: seq, big-endian u64).
pub(crate) const EVENT_RECORDS: Table<Event> = Table::new(EVENTS);
pub(crate) const NETWORKS: &str = "networks";
pub(crate) const NET_MEMBERS: &str = "net_members";
pub(crate) const PEER_INDEXES: &str = "peer_indexes";
pub(crate) const NODE_KEYS: &str = "node_keys";
pub(crate) const OVERLAY_COUNTERS: &str = "overlay_counters";
/// WireGuard devices: network id (big-endian u32) ‖ name → `DeviceRecord`.
pub(crate) const WG_DEVICES: &str = "wg_devices";
/// Networks' WireGuard gateway keys and endpoints: network id (big-endian u32) → `GatewayRecord`.
pub(crate) const WG_GATEWAYS: &str = "wg_gateways";

/// A failure of the store itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed (I/O error, e.g. disk full, or corruption); includes sled's message.
    #[error("store: {0}")]
    Db(String),
    /// The distributed store cannot be reached or has no quorum: reads may still be answered
    /// (possibly stale), writes are refused until quorum returns. The message says where and why.
    #[error("{0}")]
    Unavailable(String),
    /// A write made as the leader was refused because this controller no longer leads (its
    /// [`backend::Fence`] no longer holds); nothing was written.
    #[error("this controller no longer leads: {0}")]
    Fenced(String),
    /// A stored record could not be decoded.
    #[error("store record {key} is corrupt: {cause}")]
    Corrupt {
        /// Tree and key of the record (`nodes/n0123456789`).
        key: String,
        /// The decoder's complaint.
        cause: String,
    },
}

pub use shoal_controller_core::{
    drives::DriveEvent,
    events::{EventKind, LogEvent},
    networks::OverlayEvent,
    registry::RegistryEvent,
    releases::ReleaseEvent,
    rollout::MaintenanceEvent,
};

/// One entry of the fleet's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the log; strictly increasing, also across restarts.
    pub seq: u64,
    /// When it happened.
    pub at: UnixMillis,
    /// What happened.
    pub kind: EventKind,
    /// The node concerned, if any.
    pub node: Option<NodeId>,
    /// Operator-facing text.
    pub message: String,
}

/// An event as controllers before named event kinds stored it: the kind by its position in their
/// one enum ([`EventKind::from_legacy_index`]).
#[derive(Deserialize)]
struct LegacyEvent {
    seq: u64,
    at: UnixMillis,
    kind: u32,
    node: Option<NodeId>,
    message: String,
}

/// The controller's database. Cloning is cheap; clones share one database.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// The database behind every table: the gated wrapper ([`gate::GatedBackend`]).
    pub(crate) backend: Arc<dyn Backend>,
    /// The gate every write passes and [`Store::freeze`] closes.
    gate: Arc<gate::WriteGate>,
    /// Serialises overlay changes: IPAM scans a network's members, which a sled transaction cannot.
    pub(crate) overlay_lock: Mutex<()>,
    dir: PathBuf,
    /// The seq after the newest event when the store was opened: what the first event gets in a
    /// store whose counter ([`EVENT_SEQ`]) was never written (a log from before it). Never changed
    /// by a transaction's body, which may not commit: once any event commits, the counter decides.
    next_seq: AtomicU64,
    /// Per-(node, kind) event budgets.
    event_budget: Mutex<crate::store::event_log::EventBudget>,
    /// Bytes of the events tree's values: exact after each trim, at most an over-estimate between
    /// (a retried transaction counts its event twice).
    pub(crate) event_bytes: AtomicU64,
    /// Events written since the last trim.
    events_since_trim: AtomicU64,
    /// [`MAX_EVENT_BYTES`], lowered by tests.
    event_byte_limit: AtomicU64,
    /// Serialises this process's enrolment-related writers (fewer conflicts); correctness across
    /// controllers comes from the transactions themselves.
    node_lock: Mutex<()>,
    /// Free bytes below which writes are refused; 0: no check (the etcd store, whose data is not
    /// on this disk).
    reserve_bytes: u64,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .field("next_seq", &self.inner.next_seq.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

pub(crate) fn encode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value).map_err(|e| StoreError::Db(format!("cannot encode {what}: {e}")))
}

fn key_text(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) => s.to_owned(),
        Err(_) => hex::encode(key),
    }
}

pub(crate) fn decode<T: DeserializeOwned>(
    tree: &str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        key: format!("{tree}/{}", key_text(key)),
        cause: e.to_string(),
    })
}

fn decode_seq(key: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| StoreError::Corrupt {
        key: format!("{EVENTS}/{}", hex::encode(key)),
        cause: format!("event key is {} bytes, expected 8", key.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// The seq of the newest event, if any.
fn newest_seq(backend: &dyn Backend) -> Result<Option<u64>, StoreError> {
    match backend.scan(EVENTS, Scan::all().rev())?.next() {
        Some(entry) => Ok(Some(decode_seq(&entry?.0)?)),
        None => Ok(None),
    }
}

fn decode_counter(bytes: &[u8]) -> Result<u64, StoreError> {
    let b: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        key: format!("{EVENT_SEQ}/next"),
        cause: format!("counter is {} bytes, expected 8", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(b))
}

/// Deletes `keys` of `table` in batches of [`DELETE_CHUNK`]: for deletions that need no
/// atomicity (a crash part-way leaves keys a later run deletes), kept under what one etcd
/// transaction takes.
pub(crate) fn delete_keys(
    backend: &dyn Backend,
    table: &'static str,
    keys: Vec<Vec<u8>>,
) -> Result<(), StoreError> {
    for chunk in keys.chunks(DELETE_CHUNK) {
        backend.write_batch(table, &Batch::deleting(chunk.iter().cloned()))?;
    }
    Ok(())
}

pub(crate) use shoal_controller_core::time::rfc3339;

/// Moves an event log kept by an earlier controller (kinds by enum position, table `events`) to
/// [`EVENTS`] (kinds by name), in batches; a crash part-way is finished at the next open, since a
/// moved batch is written before it is deleted and writing it again changes nothing.
fn migrate_legacy_events(backend: &dyn Backend) -> Result<(), StoreError> {
    // 256 events of at most 4 KiB stay under etcd's 1.5 MiB request limit.
    const BATCH: usize = 256;
    let mut moved = 0usize;
    loop {
        let chunk: Vec<backend::Entry> = backend
            .scan(LEGACY_EVENTS, Scan::all())?
            .take(BATCH)
            .collect::<Result<_, _>>()?;
        if chunk.is_empty() {
            break;
        }
        let mut write = Batch::default();
        for (key, value) in &chunk {
            let old: LegacyEvent = decode(LEGACY_EVENTS, key, value)?;
            let Some(kind) = EventKind::from_legacy_index(old.kind) else {
                warn!(
                    seq = old.seq,
                    kind = old.kind,
                    "dropping a stored event of an unknown kind"
                );
                continue;
            };
            let event = Event {
                seq: old.seq,
                at: old.at,
                kind,
                node: old.node,
                message: old.message,
            };
            write.insert(key.clone(), encode("event", &event)?);
        }
        backend.write_batch(EVENTS, &write)?;
        backend.flush()?;
        backend.write_batch(
            LEGACY_EVENTS,
            &Batch::deleting(chunk.into_iter().map(|e| e.0)),
        )?;
        moved += write.ops.len();
    }
    if moved > 0 {
        backend.flush()?;
        tracing::info!(events = moved, "event log moved to named kinds");
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Self::open_with_reserve(dir, FREE_SPACE_RESERVE)
    }

    /// Opens the store kept in the etcd cluster `config` names, shared with every controller that
    /// uses the same endpoints and prefix. `dir` is the controller's data directory (the CA's
    /// files); the free-space reserve does not apply, since etcd keeps the data and enforces its
    /// own quota (a full etcd is `StoreError::Db("etcd is out of space: …")`).
    pub fn open_etcd(config: &EtcdConfig, dir: &Path) -> Result<Store, StoreError> {
        let backend = Arc::new(EtcdBackend::connect(config)?);
        Self::open_backend(backend, dir, 0)
    }

    fn open_with_reserve(dir: &Path, reserve_bytes: u64) -> Result<Store, StoreError> {
        Self::open_backend(Arc::new(SledBackend::open(dir)?), dir, reserve_bytes)
    }

    fn open_backend(
        inner: Arc<dyn Backend>,
        dir: &Path,
        reserve_bytes: u64,
    ) -> Result<Store, StoreError> {
        let gate = Arc::new(gate::WriteGate::default());
        let backend: Arc<dyn Backend> = Arc::new(gate::GatedBackend {
            inner,
            gate: gate.clone(),
        });
        migrate_legacy_events(&*backend)?;
        let next_seq = newest_seq(&*backend)?.map_or(1, |s| s.saturating_add(1));
        let mut event_bytes = 0u64;
        for entry in backend.scan(EVENTS, Scan::all())? {
            event_bytes += entry?.1.len() as u64;
        }
        let store = Store {
            inner: Arc::new(Inner {
                backend,
                gate,
                overlay_lock: Mutex::new(()),
                dir: dir.to_owned(),
                next_seq: AtomicU64::new(next_seq),
                event_budget: Mutex::new(crate::store::event_log::EventBudget::new(
                    Default::default(),
                )),
                event_bytes: AtomicU64::new(event_bytes),
                events_since_trim: AtomicU64::new(0),
                event_byte_limit: AtomicU64::new(MAX_EVENT_BYTES),
                node_lock: Mutex::new(()),
                reserve_bytes,
            }),
        };
        if reserve_bytes == 0 || store.free_space()? >= reserve_bytes {
            store.trim_events()?;
        }
        Ok(store)
    }

    /// The seq the next event gets: the counter, or after the newest event when there is none.
    fn stored_next_seq(&self) -> Result<u64, StoreError> {
        match self.inner.backend.get(EVENT_SEQ, SEQ_KEY)? {
            Some(bytes) => decode_counter(&bytes),
            None => Ok(newest_seq(self.backend())?.map_or(1, |s| s.saturating_add(1))),
        }
    }

    /// Free bytes (for unprivileged users) on the data directory's filesystem.
    fn free_space(&self) -> Result<u64, StoreError> {
        let st = nix::sys::statvfs::statvfs(&self.inner.dir).map_err(|e| {
            StoreError::Db(format!(
                "cannot check free space in {}: {e}",
                self.inner.dir.display()
            ))
        })?;
        #[allow(clippy::useless_conversion)] // the field types differ between platforms
        let free = u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size()));
        Ok(free)
    }

    /// Refuses a write while the disk is (nearly) full.
    pub(crate) fn check_space(&self) -> Result<(), StoreError> {
        if self.inner.reserve_bytes == 0 {
            return Ok(());
        }
        let free = self.free_space()?;
        if free < self.inner.reserve_bytes {
            warn!(dir = %self.inner.dir.display(), free, reserve = self.inner.reserve_bytes, "store refuses a write: disk full");
            return Err(StoreError::Db(format!(
                "disk full: {free} bytes free in {}, below the {} bytes the store keeps in reserve; no space for writes",
                self.inner.dir.display(),
                self.inner.reserve_bytes
            )));
        }
        Ok(())
    }

    pub(crate) fn lock_nodes(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded value is (), so a panic while holding the lock left nothing inconsistent.
        self.inner
            .node_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn event_budget(&self) -> std::sync::MutexGuard<'_, crate::store::event_log::EventBudget> {
        // Counters only: a panic while holding the lock leaves nothing that matters inconsistent.
        self.inner
            .event_budget
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the per-node event budget (tests and benchmarks; the default is
    /// [`crate::store::event_log::EventBudgetConfig::default`]).
    pub fn configure_event_budget(&self, config: crate::store::event_log::EventBudgetConfig) {
        *self.event_budget() = crate::store::event_log::EventBudget::new(config);
    }

    #[cfg(test)]
    pub(crate) fn set_event_byte_limit(&self, bytes: u64) {
        self.inner.event_byte_limit.store(bytes, Ordering::SeqCst);
    }

    /// Writes an event inside a transaction on the events tree, taking the next seq.
    ///
    /// An event about a node goes through the node's budget ([`crate::store::event_log`]): over it,
    /// nothing is written and the returned event has seq 0; when the budget has room again, a
    /// summary of what was left out is written before the event. The message is capped at
    /// [`crate::store::event_log::MAX_EVENT_MESSAGE`] bytes.
    pub(crate) fn tx_event<E: From<StoreError>>(
        &self,
        events: &TxTable<'_>,
        kind: EventKind,
        node: Option<&NodeId>,
        message: &str,
        at: UnixMillis,
    ) -> Result<Event, TxError<E>> {
        if let Some(n) = node {
            let (decision, config) = {
                let mut budget = self.event_budget();
                (budget.admit(n, kind, at), *budget.config())
            };
            if let Some(s) = decision.summary {
                self.insert_event::<E>(
                    events,
                    EventKind::Log(LogEvent::EventsSuppressed),
                    Some(&s.node),
                    &s.message(&config),
                    at,
                )?;
            }
            if !decision.write {
                return Ok(Event {
                    seq: 0,
                    at,
                    kind,
                    node: node.cloned(),
                    message: String::new(),
                });
            }
        }
        self.insert_event(events, kind, node, message, at)
    }

    fn insert_event<E: From<StoreError>>(
        &self,
        events: &TxTable<'_>,
        kind: EventKind,
        node: Option<&NodeId>,
        message: &str,
        at: UnixMillis,
    ) -> Result<Event, TxError<E>> {
        // The counter is read and bumped in this transaction: two controllers appending at once
        // conflict on it, and one runs again with the next seq.
        let counter = events.sibling(EVENT_SEQ);
        let seq = match counter.get(SEQ_KEY)? {
            Some(bytes) => decode_counter(&bytes).map_err(abort)?,
            None => self.inner.next_seq.load(Ordering::SeqCst),
        };
        counter.insert(SEQ_KEY, seq.saturating_add(1).to_be_bytes())?;
        let message = crate::store::event_log::cap_message(message).into_owned();
        let event = Event {
            seq,
            at,
            kind,
            node: node.cloned(),
            message,
        };
        let bytes = encode("event", &event).map_err(abort)?;
        self.inner
            .event_bytes
            .fetch_add(bytes.len() as u64, Ordering::SeqCst);
        self.inner.events_since_trim.fetch_add(1, Ordering::SeqCst);
        events.insert(seq.to_be_bytes(), bytes)?;
        Ok(event)
    }

    /// Call after a transaction that wrote events committed: trims the log every [`TRIM_EVERY`]
    /// events, and as soon as it holds more than [`MAX_EVENT_BYTES`]. (`_seq` is the written
    /// event's, 0 for a suppressed one; summaries written on the way count too, so the trigger
    /// counts writes itself.)
    pub(crate) fn after_event(&self, _seq: u64) -> Result<(), StoreError> {
        let over_bytes = self.inner.event_bytes.load(Ordering::SeqCst)
            > self.inner.event_byte_limit.load(Ordering::SeqCst);
        if over_bytes || self.inner.events_since_trim.load(Ordering::SeqCst) >= TRIM_EVERY {
            self.trim_events()?;
        }
        Ok(())
    }

    /// Deletes events older than the newest [`MAX_EVENTS`], then, while the log holds more than
    /// [`MAX_EVENT_BYTES`], the oldest until it holds at most seven eighths of it.
    fn trim_events(&self) -> Result<(), StoreError> {
        self.inner.events_since_trim.store(0, Ordering::SeqCst);
        // The shared counter, not this process's hint: other controllers append too.
        let cutoff = self.stored_next_seq()?.saturating_sub(MAX_EVENTS);
        let mut batch = Vec::new();
        let mut trimmed = 0u64;
        let mut trimmed_bytes = 0u64;
        for item in self.table(EVENTS).scan(Scan::before(cutoff.to_be_bytes())) {
            let (key, value) = item?;
            batch.push(key);
            trimmed += 1;
            trimmed_bytes += value.len() as u64;
        }
        if trimmed > 0 {
            delete_keys(self.backend(), EVENTS, batch)?;
            let _ = self
                .inner
                .event_bytes
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                    Some(b.saturating_sub(trimmed_bytes))
                });
            debug!(trimmed, "trimmed the event log by count");
        }
        let limit = self.inner.event_byte_limit.load(Ordering::SeqCst);
        if self.inner.event_bytes.load(Ordering::SeqCst) <= limit {
            return Ok(());
        }
        // Count the newest back until seven eighths of the limit; everything older goes.
        let low_water = limit / 8 * 7;
        let mut kept = 0u64;
        let mut cut = None;
        for item in self.table(EVENTS).scan(Scan::all().rev()) {
            let (key, value) = item?;
            if kept + value.len() as u64 > low_water {
                cut = Some(key);
                break;
            }
            kept += value.len() as u64;
        }
        if let Some(cut) = cut {
            let mut batch = Vec::new();
            for item in self.table(EVENTS).scan(Scan::through(&cut)) {
                batch.push(item?.0);
            }
            let trimmed = batch.len();
            delete_keys(self.backend(), EVENTS, batch)?;
            debug!(trimmed, kept_bytes = kept, "trimmed the event log by size");
        }
        self.inner.event_bytes.store(kept, Ordering::SeqCst);
        Ok(())
    }

    /// A handle on table `name`, for a domain that keeps its own table.
    pub(crate) fn table(&self, name: &'static str) -> RawTable {
        RawTable::new(self.inner.backend.clone(), name)
    }

    /// The database behind the tables.
    pub(crate) fn backend(&self) -> &dyn Backend {
        &*self.inner.backend
    }

    /// The record at `key` of `table`.
    pub(crate) fn get<V: DeserializeOwned>(
        &self,
        table: &Table<V>,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<V>, StoreError> {
        match self.inner.backend.get(table.name, key.as_ref())? {
            Some(bytes) => Ok(Some(decode(table.name, key.as_ref(), &bytes)?)),
            None => Ok(None),
        }
    }

    /// The decoded records of `table` that `scan` selects, with their keys.
    pub(crate) fn records<'a, V: DeserializeOwned + 'a>(
        &'a self,
        table: &Table<V>,
        scan: Scan,
    ) -> Result<impl Iterator<Item = Result<(Vec<u8>, V), StoreError>> + 'a, StoreError> {
        table::records(&*self.inner.backend, table, scan)
    }

    /// Runs `body` as one atomic transaction over `tables`. The body may run more than once (after
    /// a conflict), so it must not act outside the transaction; its result is the last run's.
    pub(crate) fn transaction<T, E: From<StoreError>>(
        &self,
        tables: &[&'static str],
        body: impl Fn(&Tx<'_>) -> Result<T, TxError<E>>,
    ) -> Result<T, E> {
        if tables.contains(&EVENTS) && !tables.contains(&EVENT_SEQ) {
            // Events take their seq from the counter, in the same transaction.
            let mut with_seq = tables.to_vec();
            with_seq.push(EVENT_SEQ);
            return table::run(&*self.inner.backend, &with_seq, body);
        }
        table::run(&*self.inner.backend, tables, body)
    }

    /// A metadata value (admin token hash, QUIC stateless-reset key).
    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.table(META).get(key)
    }

    /// Stores a metadata value; it is on disk when this returns.
    pub fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.check_space()?;
        self.table(META).insert(key, value)?;
        self.flush()
    }

    /// Appends an event to the log and returns it with its seq. Not flushed (within 200 ms).
    ///
    /// An event about a node is subject to the node's budget (see [`Store::tx_event`]): a
    /// suppressed one is returned with seq 0 and not written. Summaries of other nodes' suppressed
    /// events that are due are written first.
    pub fn append_event(
        &self,
        kind: EventKind,
        node: Option<&NodeId>,
        message: &str,
        now: UnixMillis,
    ) -> Result<Event, StoreError> {
        self.check_space()?;
        let (due, config) = {
            let mut budget = self.event_budget();
            (budget.due(now), *budget.config())
        };
        let event = self.transaction(&[EVENTS], |tx| {
            let events = tx.table(EVENTS);
            for s in &due {
                self.insert_event::<StoreError>(
                    &events,
                    EventKind::Log(LogEvent::EventsSuppressed),
                    Some(&s.node),
                    &s.message(&config),
                    now,
                )?;
            }
            self.tx_event::<StoreError>(&events, kind, node, message, now)
        })?;
        self.after_event(event.seq)?;
        Ok(event)
    }

    /// Writes the summaries of suppressed events whose node has budget again; returns how many. The
    /// controller's sweep may call this so a flood that stopped is reported without waiting for the
    /// next event.
    pub fn flush_suppressed_events(&self, now: UnixMillis) -> Result<usize, StoreError> {
        let (due, config) = {
            let mut budget = self.event_budget();
            (budget.due(now), *budget.config())
        };
        if due.is_empty() {
            return Ok(0);
        }
        self.check_space()?;
        self.transaction(&[EVENTS], |tx| {
            let events = tx.table(EVENTS);
            for s in &due {
                self.insert_event::<StoreError>(
                    &events,
                    EventKind::Log(LogEvent::EventsSuppressed),
                    Some(&s.node),
                    &s.message(&config),
                    now,
                )?;
            }
            Ok(())
        })?;
        self.after_event(0)?;
        Ok(due.len())
    }

    /// Events with seq > after (all when None), oldest first, at most `limit`.
    pub fn events(&self, after: Option<u64>, limit: usize) -> Result<Vec<Event>, StoreError> {
        let start = match after {
            None => 0,
            Some(u64::MAX) => return Ok(Vec::new()),
            Some(seq) => seq + 1,
        };
        let mut out = Vec::new();
        for item in self
            .records(&EVENT_RECORDS, Scan::from(start.to_be_bytes()))?
            .take(limit)
        {
            out.push(item?.1);
        }
        Ok(out)
    }

    /// The newest `limit` events, newest first (the web view's recent events).
    pub fn recent_events(&self, limit: usize) -> Result<Vec<Event>, StoreError> {
        let mut out = Vec::new();
        for item in self.records(&EVENT_RECORDS, Scan::all().rev())?.take(limit) {
            out.push(item?.1);
        }
        Ok(out)
    }

    /// Writes everything buffered to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.backend.flush()
    }

    /// Holds every writer out until the returned guard is dropped (see the module docs): what is
    /// read through it is one point in time. Writers wait, so keep it short.
    pub fn freeze(&self) -> Result<Frozen<'_>, StoreError> {
        let guard = self.inner.gate.close()?;
        Ok(Frozen {
            store: self,
            _guard: guard,
        })
    }
}

/// A store with its writers held out ([`Store::freeze`]).
pub struct Frozen<'a> {
    store: &'a Store,
    _guard: std::sync::RwLockWriteGuard<'a, ()>,
}

impl fmt::Debug for Frozen<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frozen").finish_non_exhaustive()
    }
}

impl Frozen<'_> {
    /// Every table that holds data, with all its entries.
    pub fn tables(&self) -> Result<Vec<TableDump>, StoreError> {
        self.store.inner.backend.export()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Instant;

    use sha2::{Digest, Sha256};
    use shoal_proto::{HardwareId, HardwareIdSource};
    use shoal_testkit::{require, Tmpfs};

    use super::*;
    use crate::registry::{
        identity_store::CertRecord,
        store::{EnrolError, EnrolParams, Enrolment, TOKEN_USES},
    };
    use shoal_controller_core::registry::{
        EnrolRefusal, NodeStatus, TokenBinding, TokenRecord, TokenState,
    };
    use shoal_proto::{HealthReport, Inventory};
    use std::collections::BTreeMap;

    const T0: UnixMillis = UnixMillis(1_700_000_000_000);

    fn at(offset_ms: u64) -> UnixMillis {
        UnixMillis(T0.0 + offset_ms)
    }

    fn token(id: &str, secret: &str, created_at: UnixMillis) -> TokenRecord {
        TokenRecord {
            id: id.to_owned(),
            secret_sha256: Sha256::digest(secret.as_bytes()).into(),
            created_at,
            expires_at: None,
            max_uses: None,
            uses: 0,
            revoked_at: None,
            labels: BTreeMap::new(),
        }
    }

    fn hw(value: &str) -> HardwareId {
        HardwareId {
            source: HardwareIdSource::DmiUuid,
            value: value.to_owned(),
        }
    }

    fn enrol(
        store: &Store,
        token_id: &str,
        secret: &str,
        hardware_id: &HardwareId,
        hostname: &str,
        now: UnixMillis,
    ) -> Result<Enrolment, EnrolError> {
        // One key per machine: a machine that enrols again kept its key (the rules for new keys are
        // tested in `enrolment` and below).
        let key = shoal_overlay::pki::sha256(hardware_id.value.as_bytes());
        store.enrol(&EnrolParams {
            token_id,
            secret,
            hardware_id,
            hostname,
            now,
            key: &key,
            remote: "test",
            is_live: &|_| false,
        })
    }

    fn refusal(result: Result<Enrolment, EnrolError>) -> EnrolRefusal {
        match result {
            Err(EnrolError::Refused(r)) => r,
            Err(EnrolError::Store(e)) => panic!("expected a refusal, got store error {e}"),
            Ok(e) => panic!("expected a refusal, got enrolment of {:?}", e.node.id),
        }
    }

    fn kinds(store: &Store) -> Vec<EventKind> {
        store
            .events(None, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }

    // Tests run on ordinary disks with plenty of room; the reserve is what production uses.
    fn open(dir: &Path) -> Store {
        Store::open(dir).unwrap()
    }

    fn claim(
        store: &Store,
        token_id: &str,
        machine: &str,
        key: u8,
        now: UnixMillis,
    ) -> Result<Enrolment, EnrolError> {
        let hw = hw(machine);
        store.enrol(&EnrolParams {
            token_id,
            secret: "s",
            hardware_id: &hw,
            hostname: machine,
            now,
            key: &[key; 32],
            remote: "192.0.2.9:1",
            is_live: &|_| false,
        })
    }

    #[test]
    fn pending_claims_are_bounded_per_node_and_refreshed_by_retries() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.create_token(&token("t", "s", T0)).unwrap();
        let node = claim(&store, "t", "m", 1, at(1)).unwrap().node.id;
        for key in 2..2 + shoal_controller_core::enrolment::MAX_PENDING_PER_NODE as u8 {
            let r = refusal(claim(&store, "t", "m", key, at(2)));
            assert!(matches!(r, EnrolRefusal::AwaitingApproval { .. }), "{r:?}");
            // A retry with the same key refreshes its request.
            assert!(matches!(
                refusal(claim(&store, "t", "m", key, at(3))),
                EnrolRefusal::AwaitingApproval { .. }
            ));
        }
        let pending = store.pending_enrolments().unwrap();
        assert_eq!(
            pending.len(),
            shoal_controller_core::enrolment::MAX_PENDING_PER_NODE
        );
        assert!(pending.iter().all(|p| p.node == node && p.attempts == 2));
        let r = refusal(claim(&store, "t", "m", 200, at(4)));
        assert!(
            matches!(r, EnrolRefusal::TooManyPending { .. }),
            "the per-node cap holds: {r:?}"
        );
        // Requests lapse an hour after their last attempt and are pruned.
        let later = UnixMillis(at(3).0 + shoal_controller_core::enrolment::PENDING_TTL_MS);
        assert_eq!(
            store.prune(later).unwrap().pending,
            shoal_controller_core::enrolment::MAX_PENDING_PER_NODE
        );
        assert!(store.pending_enrolments().unwrap().is_empty());
    }

    #[test]
    fn lapsed_tokens_are_pruned_bound_ones_sooner_and_valid_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let minute = 60_000;
        let mut boot = token("boot", "s", T0);
        boot.expires_at = Some(at(10 * minute));
        boot.max_uses = Some(1);
        store
            .create_bound_token(&boot, &TokenBinding::Mac("52:54:00:00:00:01".into()))
            .unwrap();
        let mut general = token("general", "s", T0);
        general.expires_at = Some(at(10 * minute));
        store.create_token(&general).unwrap();
        store.create_token(&token("forever", "s", T0)).unwrap();
        let mut used = token("used", "s", T0);
        used.max_uses = Some(1);
        store.create_token(&used).unwrap();
        claim(&store, "used", "u", 9, at(minute)).unwrap();
        let ids = |store: &Store| {
            store
                .tokens()
                .unwrap()
                .into_iter()
                .map(|t| t.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            store.prune(at(15 * minute)).unwrap().tokens,
            0,
            "nothing lapsed long enough"
        );
        // A boot token goes 10 minutes after it expired; general tokens a day after they stopped
        // working.
        assert_eq!(store.prune(at(21 * minute)).unwrap().tokens, 1);
        assert!(
            !ids(&store).contains(&"boot".to_owned())
                && store.token_binding("boot").unwrap().is_none()
        );
        assert_eq!(store.prune(at(25 * 60 * minute)).unwrap().tokens, 2);
        assert_eq!(ids(&store), ["forever"], "a valid token is never pruned");
        assert!(
            store.table(TOKEN_USES).iter().next().is_none(),
            "uses go with their token"
        );
    }

    #[test]
    fn revoking_a_certificate_of_the_current_key_demands_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.create_token(&token("t", "s", T0)).unwrap();
        let node = claim(&store, "t", "m", 1, at(1)).unwrap().node.id;
        let cert = |key: u8| CertRecord {
            node: node.clone(),
            key: [key; 32],
            issued_at: at(1),
            not_after: at(1_000_000),
        };
        store.record_cert("AA:01", &cert(1)).unwrap();
        store.record_cert("aa02", &cert(7)).unwrap();
        let (_, current) = store.revoke_cert("aa02", "old", at(2)).unwrap().unwrap();
        assert!(
            !current && !store.identity(&node).unwrap().unwrap().must_rotate,
            "another key's certificate: no rotation"
        );
        let (_, current) = store.revoke_cert("aa01", "stolen", at(3)).unwrap().unwrap();
        assert!(
            current && store.identity(&node).unwrap().unwrap().must_rotate,
            "serials match whatever their spelling"
        );
        assert!(store.cert_revoked("AA:01").unwrap());
        assert_eq!(store.revoke_cert("ffff", "x", at(4)).unwrap(), None);
        let verdict = store
            .check_connection(&node, &[1; 32], "aa01", at(1_000_000), at(5), "x")
            .unwrap();
        assert_eq!(
            verdict,
            shoal_controller_core::enrolment::CertVerdict::Revoked
        );
        store.begin_rotation(&node, &[2; 32], at(6)).unwrap();
        let i = store.identity(&node).unwrap().unwrap();
        assert!(!i.must_rotate && i.next_key == Some([2; 32]));
        // Expired certificate records go, with their revocations.
        assert_eq!(store.prune(at(1_000_000)).unwrap().certs, 2);
        assert!(!store.cert_revoked("aa01").unwrap());
    }

    #[test]
    fn token_states() {
        let now = at(10_000);
        let mut t = token("t", "s", T0);
        assert_eq!(t.state(now), TokenState::Valid);
        t.expires_at = Some(at(20_000));
        assert_eq!(t.state(now), TokenState::Valid);
        assert_eq!(
            t.state(at(20_000)),
            TokenState::Expired,
            "expiry is exclusive of its instant"
        );
        t.max_uses = Some(2);
        t.uses = 1;
        assert_eq!(t.state(now), TokenState::Valid);
        t.uses = 2;
        assert_eq!(t.state(now), TokenState::UsedUp);
        assert_eq!(
            t.state(at(30_000)),
            TokenState::Expired,
            "expiry outranks exhaustion"
        );
        t.revoked_at = Some(at(5_000));
        assert_eq!(
            t.state(now),
            TokenState::Revoked,
            "revocation outranks everything"
        );
    }

    #[test]
    fn enrol_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let m = hw("machine-1");

        assert_eq!(
            refusal(enrol(&store, "nope", "s", &m, "h", T0)),
            EnrolRefusal::TokenUnknown
        );

        store.create_token(&token("good", "secret", T0)).unwrap();
        assert_eq!(
            refusal(enrol(&store, "good", "wrong", &m, "h", T0)),
            EnrolRefusal::TokenUnknown,
            "a wrong secret looks exactly like an unknown token"
        );

        let mut expiring = token("expiring", "s", T0);
        expiring.expires_at = Some(UnixMillis(1_700_000_060_000));
        store.create_token(&expiring).unwrap();
        let r = refusal(enrol(
            &store,
            "expiring",
            "s",
            &m,
            "h",
            UnixMillis(1_700_000_060_000),
        ));
        assert_eq!(
            r,
            EnrolRefusal::TokenExpired {
                id: "expiring".into(),
                at: "2023-11-14T22:14:20Z".into()
            }
        );
        assert_eq!(
            r.to_string(),
            "join token expiring expired at 2023-11-14T22:14:20Z"
        );

        let mut once = token("once", "s", T0);
        once.max_uses = Some(1);
        store.create_token(&once).unwrap();
        enrol(&store, "once", "s", &m, "h", at(1)).unwrap();
        assert_eq!(
            refusal(enrol(&store, "once", "s", &hw("machine-2"), "h2", at(2))),
            EnrolRefusal::TokenUsedUp {
                id: "once".into(),
                uses: 1
            }
        );

        store.create_token(&token("revoked", "s", T0)).unwrap();
        let rec = store.revoke_token("revoked", at(3)).unwrap().unwrap();
        assert_eq!(rec.revoked_at, Some(at(3)));
        assert_eq!(rec.state(at(4)), TokenState::Revoked);
        assert_eq!(
            store
                .revoke_token("revoked", at(9))
                .unwrap()
                .unwrap()
                .revoked_at,
            Some(at(3)),
            "revoking twice keeps the first time"
        );
        assert_eq!(store.revoke_token("unknown", at(3)).unwrap(), None);
        assert_eq!(
            refusal(enrol(&store, "revoked", "s", &m, "h", at(4))),
            EnrolRefusal::TokenRevoked {
                id: "revoked".into()
            }
        );

        // Refusals change nothing: one node, one use of "once", no use of the others.
        assert_eq!(store.nodes().unwrap().len(), 1);
        let uses: BTreeMap<String, u32> = store
            .tokens()
            .unwrap()
            .into_iter()
            .map(|t| (t.id, t.uses))
            .collect();
        assert_eq!(
            uses,
            BTreeMap::from([
                ("expiring".into(), 0),
                ("good".into(), 0),
                ("once".into(), 1),
                ("revoked".into(), 0)
            ])
        );
        assert_eq!(
            kinds(&store),
            [
                EventKind::Registry(RegistryEvent::TokenCreated),
                EventKind::Registry(RegistryEvent::TokenCreated),
                EventKind::Registry(RegistryEvent::TokenCreated),
                EventKind::Registry(RegistryEvent::Enrolled),
                EventKind::Registry(RegistryEvent::TokenCreated),
                EventKind::Registry(RegistryEvent::TokenRevoked)
            ]
        );
    }

    #[test]
    fn reenrolment_keeps_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut t1 = token("t1", "s1", T0);
        t1.labels = BTreeMap::from([
            ("rack".into(), "a".into()),
            ("role".into(), "storage".into()),
        ]);
        store.create_token(&t1).unwrap();
        let mut t2 = token("t2", "s2", T0);
        t2.labels = BTreeMap::from([("rack".into(), "b".into())]);
        store.create_token(&t2).unwrap();

        let first = enrol(&store, "t1", "s1", &hw("m"), "old-name", at(1)).unwrap();
        assert!(first.new);
        let id = first.node.id.clone();
        assert!(
            id.0.len() == 11
                && id.0.starts_with('n')
                && id.0[1..]
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{id}"
        );
        assert_eq!(first.node.enrolled_at, at(1));

        // The same token and the same key again (the first reply was lost): the same node, nothing
        // spent.
        let again = enrol(&store, "t1", "s1", &hw("m"), "old-name", at(2)).unwrap();
        assert!(!again.new && again.replay);
        assert_eq!(again.node.id, id);

        let other_token = enrol(&store, "t2", "s2", &hw("m"), "new-name", at(3)).unwrap();
        assert!(!other_token.new);
        assert_eq!(other_token.node.id, id);
        assert_eq!(
            other_token.node.enrolled_at,
            at(1),
            "enrolment time is kept"
        );
        assert_eq!(other_token.node.hostname, "new-name");
        assert_eq!(
            other_token.node.labels,
            BTreeMap::from([
                ("rack".into(), "b".into()),
                ("role".into(), "storage".into())
            ])
        );

        let nodes = store.nodes().unwrap();
        assert_eq!(nodes.len(), 1, "no duplicate node");
        assert_eq!(nodes[0], other_token.node);
        let uses: Vec<u32> = store.tokens().unwrap().iter().map(|t| t.uses).collect();
        assert_eq!(uses, [1, 1], "the replay spent no use");

        let second = enrol(&store, "t2", "s2", &hw("other"), "b-host", at(4)).unwrap();
        assert!(second.new);
        assert_ne!(second.node.id, id);
        let events = store.events(None, 100).unwrap();
        let enrol_events: Vec<(EventKind, Option<NodeId>)> = events
            .iter()
            .skip(2)
            .map(|e| (e.kind, e.node.clone()))
            .collect();
        assert_eq!(
            enrol_events,
            [
                (
                    EventKind::Registry(RegistryEvent::Enrolled),
                    Some(id.clone())
                ),
                (EventKind::Registry(RegistryEvent::Reenrolled), Some(id)),
                (
                    EventKind::Registry(RegistryEvent::Enrolled),
                    Some(second.node.id.clone())
                ),
            ]
        );
        let names: Vec<String> = store
            .nodes()
            .unwrap()
            .into_iter()
            .map(|n| n.hostname)
            .collect();
        assert_eq!(names, ["b-host", "new-name"], "sorted by hostname");
    }

    #[test]
    fn removed_hardware_needs_a_newer_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.create_token(&token("old", "s", T0)).unwrap();
        let m = hw("m");
        let node = enrol(&store, "old", "s", &m, "h", at(1)).unwrap().node;
        assert_eq!(store.removed_at(&node.id).unwrap(), None);

        let removed = store.remove_node(&node.id, at(10)).unwrap().unwrap();
        assert_eq!(removed, node);
        assert_eq!(
            store.remove_node(&node.id, at(11)).unwrap(),
            None,
            "already gone"
        );
        assert_eq!(store.node(&node.id).unwrap(), None);
        assert!(store.nodes().unwrap().is_empty());
        assert_eq!(store.removed_at(&node.id).unwrap(), Some(at(10)));

        let r = refusal(enrol(&store, "old", "s", &m, "h", at(20)));
        assert_eq!(
            r,
            EnrolRefusal::NodeRemoved {
                hardware_id: "dmi-uuid:m".into()
            }
        );
        assert!(r.to_string().contains("create a new token"), "{r}");
        // The same old token still admits other machines.
        enrol(&store, "old", "s", &hw("other"), "o", at(21)).unwrap();

        store.create_token(&token("new", "s2", at(30))).unwrap();
        let back = enrol(&store, "new", "s2", &m, "h", at(31)).unwrap();
        assert!(back.new, "a removed machine comes back as a new node");
        assert_ne!(
            back.node.id, node.id,
            "its old identity (and certificate) stays removed"
        );
        assert_eq!(store.removed_at(&node.id).unwrap(), Some(at(10)));
        // Once admitted again, it may re-enrol with any valid token, the old one included.
        let again = enrol(&store, "old", "s", &m, "h", at(32)).unwrap();
        assert_eq!((again.new, &again.node.id), (false, &back.node.id));
        assert!(kinds(&store).contains(&EventKind::Registry(RegistryEvent::Removed)));
    }

    #[test]
    fn update_node() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        assert_eq!(
            store
                .update_node(&NodeId("n0000000000".into()), |_| panic!("not called"))
                .unwrap(),
            None
        );
        store.create_token(&token("t", "s", T0)).unwrap();
        let node = enrol(&store, "t", "s", &hw("m"), "h", at(1)).unwrap().node;
        assert_eq!(node.status, NodeStatus::Down);
        let updated = store
            .update_node(&node.id, |n| {
                n.status = NodeStatus::Up;
                n.last_seen = Some(at(5));
                n.agent_version = "0.1.0".into();
                n.health = Some(HealthReport {
                    at: at(5),
                    uptime_secs: 42,
                    ..Default::default()
                });
                n.inventory = Some(Inventory {
                    hostname: "h".into(),
                    cpu_cores: 8,
                    ..Default::default()
                });
                n.inventory_at = Some(at(5));
            })
            .unwrap()
            .unwrap();
        assert_eq!(updated.status, NodeStatus::Up);
        assert_eq!(store.node(&node.id).unwrap().unwrap(), updated);
        assert_eq!(updated.health.as_ref().map(|h| h.uptime_secs), Some(42));
    }

    /// A log written by a controller that stored kinds by enum position is moved to named kinds
    /// when the store opens, keeping seqs, times, nodes and messages; seqs go on rising after it.
    #[test]
    fn an_event_log_of_an_earlier_controller_is_moved_to_named_kinds() {
        #[derive(Serialize)]
        struct Written {
            seq: u64,
            at: UnixMillis,
            kind: u32,
            node: Option<NodeId>,
            message: String,
        }
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let old = db.open_tree(LEGACY_EVENTS).unwrap();
            // Positions 0 (enrolled), 10 (drive_appeared) and 52 (events_suppressed) of the old enum.
            for (seq, kind) in [(1u64, 0u32), (2, 10), (3, 52)] {
                let e = Written {
                    seq,
                    at: UnixMillis(1000 + seq),
                    kind,
                    node: Some(NodeId("n0000000001".into())),
                    message: format!("event {seq}"),
                };
                old.insert(seq.to_be_bytes(), postcard::to_allocvec(&e).unwrap())
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let store = open(dir.path());
        let events = store.events(None, 10).unwrap();
        let got: Vec<(u64, &str, &str)> = events
            .iter()
            .map(|e| (e.seq, e.kind.name(), e.message.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, "enrolled", "event 1"),
                (2, "drive_appeared", "event 2"),
                (3, "events_suppressed", "event 3")
            ]
        );
        assert_eq!(events[0].at, UnixMillis(1001));
        assert!(store.table(LEGACY_EVENTS).iter().next().is_none());
        let next = store
            .append_event(RegistryEvent::Up.into(), None, "after", UnixMillis(2000))
            .unwrap();
        assert_eq!(next.seq, 4);
    }

    #[test]
    fn everything_survives_reopen_and_seqs_keep_rising() {
        let dir = tempfile::tempdir().unwrap();
        let (node, last_seq) = {
            let store = open(dir.path());
            store.put_meta("ca_cert", b"cert bytes").unwrap();
            let mut t = token("t", "s", T0);
            t.labels.insert("zone".into(), "1".into());
            store.create_token(&t).unwrap();
            store.create_token(&token("r", "s", T0)).unwrap();
            store.revoke_token("r", at(1)).unwrap();
            let node = enrol(&store, "t", "s", &hw("m"), "h", at(2)).unwrap().node;
            let gone = enrol(&store, "t", "s", &hw("gone"), "g", at(2))
                .unwrap()
                .node;
            store.remove_node(&gone.id, at(3)).unwrap();
            let node = store
                .update_node(&node.id, |n| n.status = NodeStatus::Up)
                .unwrap()
                .unwrap();
            let last = store
                .append_event(
                    EventKind::Registry(RegistryEvent::Up),
                    Some(&node.id),
                    "h is up",
                    at(4),
                )
                .unwrap();
            // No explicit flush: dropping the store must persist what update_node and append_event
            // wrote.
            (node, last.seq)
        };
        let store = open(dir.path());
        assert_eq!(
            store.get_meta("ca_cert").unwrap().as_deref(),
            Some(&b"cert bytes"[..])
        );
        assert_eq!(store.get_meta("absent").unwrap(), None);
        let tokens = store.tokens().unwrap();
        assert_eq!(
            tokens
                .iter()
                .map(|t| (t.id.as_str(), t.uses, t.state(at(5))))
                .collect::<Vec<_>>(),
            [("r", 0, TokenState::Revoked), ("t", 2, TokenState::Valid)]
        );
        assert_eq!(tokens[1].labels.get("zone").map(String::as_str), Some("1"));
        assert_eq!(store.nodes().unwrap(), std::slice::from_ref(&node));
        let removed = store
            .events(None, 100)
            .unwrap()
            .into_iter()
            .find(|e| e.kind == EventKind::Registry(RegistryEvent::Removed))
            .unwrap();
        assert_eq!(
            store.removed_at(removed.node.as_ref().unwrap()).unwrap(),
            Some(at(3))
        );
        assert_eq!(
            refusal(enrol(&store, "t", "s", &hw("gone"), "g", at(6))),
            EnrolRefusal::NodeRemoved {
                hardware_id: "dmi-uuid:gone".into()
            }
        );

        let events = store.events(None, 100).unwrap();
        assert_eq!(events.len(), 7);
        assert_eq!(events.last().unwrap().seq, last_seq);
        assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
        let next = store
            .append_event(
                EventKind::Registry(RegistryEvent::Down),
                Some(&node.id),
                "h is down",
                at(7),
            )
            .unwrap();
        assert!(next.seq > last_seq, "{} after {last_seq}", next.seq);
        drop(store);
        let store = open(dir.path());
        let after = store
            .append_event(
                EventKind::Registry(RegistryEvent::Up),
                Some(&node.id),
                "h is up",
                at(8),
            )
            .unwrap();
        assert!(after.seq > next.seq);
        assert_eq!(
            store
                .events(Some(last_seq), 10)
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            [next.seq, after.seq]
        );
    }

    #[test]
    fn a_second_open_of_a_used_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _store = open(dir.path());
        let err = Store::open(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("locked by another process"),
            "{err}"
        );
    }

    #[test]
    fn events_paginate_and_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for i in 0..5 {
            store
                .append_event(
                    EventKind::Registry(RegistryEvent::Up),
                    None,
                    &format!("e{i}"),
                    at(i),
                )
                .unwrap();
        }
        let page: Vec<String> = store
            .events(Some(1), 2)
            .unwrap()
            .into_iter()
            .map(|e| e.message)
            .collect();
        assert_eq!(page, ["e1", "e2"]);
        assert!(store.events(Some(5), 10).unwrap().is_empty());
        assert!(store.events(Some(u64::MAX), 10).unwrap().is_empty());

        // Pretend the log is long: trimming keeps the newest MAX_EVENTS.
        store
            .table(EVENT_SEQ)
            .insert(SEQ_KEY, (MAX_EVENTS + 3).to_be_bytes())
            .unwrap();
        store.trim_events().unwrap();
        let left: Vec<u64> = store
            .events(None, 10)
            .unwrap()
            .into_iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(left, [3, 4, 5]);
    }

    fn big_token(i: usize) -> TokenRecord {
        let mut t = token(&format!("{i:016x}"), "s", at(i as u64));
        t.labels.insert("padding".into(), "x".repeat(4096));
        t
    }

    /// Writes tokens until the store refuses; returns how many were acknowledged and the error.
    fn write_until_error(store: &Store, start: usize) -> (usize, StoreError) {
        for i in start..start + 100_000 {
            if let Err(e) = store.create_token(&big_token(i)) {
                return (i - start, e);
            }
        }
        panic!("100000 tokens fit on a tiny disk");
    }

    /// The first `n` big tokens are all there, each with its TokenCreated event (one transaction).
    fn assert_tokens(store: &Store, n: usize) {
        let tokens = store.tokens().unwrap();
        let ids: Vec<&str> = tokens.iter().map(|t| t.id.as_str()).collect();
        let want: Vec<String> = (0..n).map(|i| format!("{i:016x}")).collect();
        assert_eq!(ids, want);
        assert!(tokens.iter().all(|t| t.labels["padding"].len() == 4096));
        let created: Vec<String> = store
            .events(None, usize::MAX)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == EventKind::Registry(RegistryEvent::TokenCreated))
            .map(|e| e.message)
            .collect();
        let want: Vec<String> = want
            .iter()
            .map(|id| format!("join token {id} created"))
            .collect();
        assert_eq!(created, want);
    }

    #[test]
    fn full_disk_is_refused_before_sled_meets_it() {
        let fs = require!(Tmpfs::new("48m"));
        let db = fs.path().join("db");
        let store = Store::open(&db).unwrap();
        let before = 10;
        for i in 0..before {
            store.create_token(&big_token(i)).unwrap();
        }
        let filler = fs.fill(FREE_SPACE_RESERVE + 2 * 1024 * 1024).unwrap();
        let (more, err) = write_until_error(&store, before);
        let acknowledged = before + more;
        eprintln!("guarded store: {more} more tokens after filling, then: {err}");
        let StoreError::Db(msg) = &err else {
            panic!("expected Db, got {err:?}")
        };
        assert!(
            msg.starts_with("disk full: ") && msg.contains("no space for writes"),
            "{msg}"
        );
        assert!(msg.contains(&db.display().to_string()), "{msg}");
        // Reads still work, and all writes are refused while the disk is full.
        assert_tokens(&store, acknowledged);
        assert!(matches!(store.put_meta("k", b"v"), Err(StoreError::Db(_))));
        assert!(matches!(
            store.append_event(EventKind::Registry(RegistryEvent::Up), None, "x", at(0)),
            Err(StoreError::Db(_))
        ));
        assert!(matches!(
            store.revoke_token("0000000000000000", at(0)),
            Err(StoreError::Db(_))
        ));

        // A restart on the full disk can still read everything.
        drop(store);
        let store = Store::open(&db).unwrap();
        assert_tokens(&store, acknowledged);

        // Freeing space makes the store writable again, without a restart.
        std::fs::remove_file(&filler).unwrap();
        store.create_token(&big_token(acknowledged)).unwrap();
        drop(store);
        let store = Store::open(&db).unwrap();
        assert_tokens(&store, acknowledged + 1);
    }

    /// What sled 0.34 itself does on ENOSPC, with the store's guard off: the write that meets it
    /// fails with a clear error, nothing panics, and every acknowledged write survives a restart.
    /// (sled then refuses all writes until reopened, even once space is freed; hence the guard.)
    #[test]
    fn full_disk_without_the_guard_errors_and_keeps_acknowledged_writes() {
        let fs = require!(Tmpfs::new("16m"));
        let db = fs.path().join("db");
        let store = Store::open_with_reserve(&db, 0).unwrap();
        let before = 10;
        for i in 0..before {
            store.create_token(&big_token(i)).unwrap();
        }
        let filler = fs.fill(1024 * 1024).unwrap();
        let (more, err) = write_until_error(&store, before);
        let acknowledged = before + more;
        eprintln!("unguarded store: {more} more tokens after filling, then: {err}");
        let StoreError::Db(msg) = &err else {
            panic!("expected Db, got {err:?}")
        };
        assert!(
            msg.starts_with("I/O error: No space left on device"),
            "{msg}"
        );
        assert!(
            store.tokens().unwrap().len() >= acknowledged,
            "reads still work"
        );
        std::fs::remove_file(&filler).unwrap();
        eprintln!(
            "unguarded store, write after freeing space: {:?}",
            store.create_token(&big_token(acknowledged + 1)).err()
        );
        drop(store);

        let store = Store::open(&db).unwrap();
        eprintln!(
            "unguarded store, after reopen: {} tokens, {acknowledged} acknowledged",
            store.tokens().unwrap().len()
        );
        assert_tokens(&store, acknowledged);
        store.create_token(&big_token(acknowledged)).unwrap();
    }

    #[test]
    fn opening_on_a_full_disk_fails_cleanly_and_recovers() {
        let fs = require!(Tmpfs::new("16m"));
        let db = fs.path().join("db");
        let store = Store::open(&db).unwrap();
        for i in 0..10 {
            store.create_token(&big_token(i)).unwrap();
        }
        drop(store);
        let filler = fs.fill(0).unwrap();
        let err = Store::open(&db).unwrap_err();
        eprintln!("open on a full disk: {err}");
        let StoreError::Db(msg) = &err else {
            panic!("expected Db, got {err:?}")
        };
        assert!(msg.contains("No space left on device"), "{msg}");
        std::fs::remove_file(&filler).unwrap();
        let store = Store::open(&db).unwrap();
        assert_tokens(&store, 10);
    }

    /// sled 0.34 takes a leftover `snap.*.generating` (an interrupted snapshot write) for the
    /// newest snapshot and refuses to open; the store removes such files first.
    #[test]
    fn an_interrupted_snapshot_does_not_block_opening() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.create_token(&token("t", "s", T0)).unwrap();
        drop(store);
        let leftover = dir.path().join("snap.FFFFFFFFFFFFFFFF.generating");
        std::fs::write(&leftover, b"half a snapsh").unwrap();

        // Raw sled fails on it (retrying while a previous handle of this process still holds the
        // lock).
        let deadline = Instant::now() + Duration::from_secs(5);
        let raw = loop {
            match sled::Config::new().path(dir.path()).open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => break other,
            }
        };
        assert!(
            matches!(raw, Err(sled::Error::Corruption { .. })),
            "sled 0.34 no longer trips on it: {raw:?}"
        );
        drop(raw);

        let store = open(dir.path());
        assert_eq!(store.tokens().unwrap().len(), 1);
        assert!(!leftover.exists());
    }
}
