//! The distributed [`Backend`]: every table in one etcd cluster, shared by several controllers.
//!
//! Layout: the value of `key` in table `t` is etcd key `{prefix}t/{t}/{key}` ([`EtcdConfig::prefix`],
//! `/shoal/` by default); table names never contain `/`, so a table's keys are one etcd range.
//!
//! The [`Backend`] API is synchronous; the etcd client is async. The backend owns a runtime on a
//! thread of its own: a call hands its request to that runtime and waits for the answer on a
//! channel with a deadline, so it works from plain threads, from a tokio worker of another runtime
//! and from a current-thread test runtime alike (it never enters a runtime, so never
//! `block_on`s inside one). Every request has [`EtcdConfig::request_timeout`].
//!
//! - Reads are linearizable. When that fails because etcd has no quorum (no leader, timeouts), the
//!   read is answered by a serializable read of a member that still runs — possibly stale, but the
//!   controller keeps answering — and the backend remembers for [`QUORUM_LOST_FOR`] that quorum is
//!   gone (an election is not: "no leader" is asked again until the request timeout): reads go
//!   straight to serializable, and writes fail at once with
//!   [`StoreError::Unavailable`]. After that the next request tries etcd normally again, so
//!   recovery needs nothing from anyone.
//! - Transactions are optimistic, like etcd's own STM (serializable isolation): the body reads
//!   through a view (all reads of one attempt at the revision of its first read, so it sees one
//!   snapshot; every key's `mod_revision` recorded, 0 when absent) and buffers its writes; the
//!   commit is one etcd transaction whose compares say that no key read has changed. A failed
//!   compare runs the body again.
//! - A batch, a put and a delete are one etcd transaction each. etcd caps the operations of one
//!   transaction (`--max-txn-ops`, 128 by default): shoal needs etcd started with
//!   `--max-txn-ops 4096` and never sends more than [`MAX_BATCH_OPS`] writes in one; callers that
//!   need no atomicity (event trims, pruning, import) split larger deletions themselves.
//! - Fencing: a write made while a [`Fence`] is current ([`super::backend::fenced`]) carries the
//!   compare "the fence key still has its create revision"; when that compare fails nothing is
//!   written and the write fails with [`StoreError::Fenced`] — never retried.
//! - `flush` does nothing: a committed etcd transaction is durable on a quorum.

use std::{
    cell::{Cell, RefCell},
    collections::{BTreeMap, HashMap, VecDeque},
    future::Future,
    ops::Bound,
    sync::{mpsc, Mutex},
    time::{Duration, Instant},
};

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, GetResponse, SortOrder, SortTarget, Txn as EtcdTxnReq,
    TxnOp, TxnOpResponse,
};
use tracing::{debug, info, warn};

use super::{
    backend::{
        current_fence, Backend, Batch, Entries, Entry, Fence, Scan, TableDump, TxBody, TxFail, Txn,
    },
    StoreError, MAX_BATCH_OPS,
};
use crate::etcd::{self, EtcdConfig};

/// Keys per page of a scan.
const PAGE: i64 = 1000;

/// How long after a request found etcd without quorum reads go straight to serializable and
/// writes fail without trying.
pub const QUORUM_LOST_FOR: Duration = Duration::from_secs(3);

/// How long to wait before asking again while etcd elects a leader.
const ELECTION_RETRY: Duration = Duration::from_millis(100);

/// Writes per etcd transaction when importing (no atomicity promised), and bytes.
const IMPORT_OPS: usize = 1000;
const IMPORT_BYTES: usize = 1 << 20;

/// Why one request failed.
#[derive(Debug)]
enum Failure {
    /// No answer in time, no connection, no leader: quorum may be gone.
    Unavailable(String),
    /// The member could not be reached (gRPC UNAVAILABLE, a transport error): the request was not
    /// processed, so it may go again — the balanced channel then picks another member.
    NotSent(String),
    /// The revision asked for was compacted away.
    Compacted,
    /// Anything else, already a store error.
    Other(StoreError),
}

/// The runtime thread: stops when the backend is dropped.
struct Runtime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Runtime {
    fn start() -> Result<Runtime, StoreError> {
        let (handle_tx, handle_rx) = mpsc::sync_channel(1);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("shoal-etcd".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                // Runs every request spawned on the handle until the backend is dropped.
                let _ = rt.block_on(stopped);
            })
            .map_err(|e| StoreError::Db(format!("cannot start the etcd client thread: {e}")))?;
        let handle = handle_rx
            .recv()
            .map_err(|_| StoreError::Db("the etcd client thread died".into()))?
            .map_err(|e| StoreError::Db(format!("cannot start the etcd client runtime: {e}")))?;
        Ok(Runtime {
            handle,
            stop: Some(stop),
        })
    }
}

/// A range request, built into etcd's options on the runtime thread.
#[derive(Debug, Clone)]
struct Range {
    key: Vec<u8>,
    /// Exclusive end; `None` reads the one key.
    end: Option<Vec<u8>>,
    limit: i64,
    descend: bool,
    revision: i64,
}

impl Range {
    fn one(key: Vec<u8>) -> Range {
        Range {
            key,
            end: None,
            limit: 0,
            descend: false,
            revision: 0,
        }
    }

    fn options(&self, serializable: bool) -> GetOptions {
        let mut o = GetOptions::new();
        if let Some(end) = &self.end {
            o = o.with_range(end.clone());
        }
        if self.limit > 0 {
            o = o.with_limit(self.limit);
        }
        if self.descend {
            o = o.with_sort(SortTarget::Key, SortOrder::Descend);
        }
        if self.revision > 0 {
            o = o.with_revision(self.revision);
        }
        if serializable {
            o = o.with_serializable();
        }
        o
    }
}

/// etcd, as a [`Backend`].
pub struct EtcdBackend {
    config: EtcdConfig,
    /// For writes and linearizable reads; asks for a leader, so a member cut off from its quorum
    /// refuses at once instead of waiting out the timeout.
    client: Client,
    /// For serializable reads while quorum is gone: a member without a leader must still answer.
    stale: Client,
    /// Until when quorum counts as lost.
    quorum_lost_until: Mutex<Option<Instant>>,
    runtime: Runtime,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("endpoints", &self.config.endpoints)
            .field("prefix", &self.config.prefix)
            .finish_non_exhaustive()
    }
}

fn unavailable_message(config: &EtcdConfig, cause: &str) -> String {
    format!(
        "etcd unavailable at {}: {cause}; writes are refused until quorum returns",
        config.endpoints_text()
    )
}

/// Sorts a client error into what the backend does about it.
fn classify(e: etcd_client::Error) -> Failure {
    use etcd_client::Error as E;
    match &e {
        E::GRpcStatus(status) => {
            let msg = status.message();
            if msg.contains("database space exceeded") || msg.contains("NOSPACE") {
                return Failure::Other(StoreError::Db(format!(
                    "etcd is out of space: {msg}; compact and defragment etcd or raise its \
                     --quota-backend-bytes, then `etcdctl alarm disarm`"
                )));
            }
            if msg.contains("has been compacted") {
                return Failure::Compacted;
            }
            if msg.contains("request is too large") {
                return Failure::Other(StoreError::Db(format!(
                    "etcd refused a request: {msg} (etcd's --max-request-bytes, 1.5 MiB by default)"
                )));
            }
            if msg.contains("too many operations in txn") {
                return Failure::Other(StoreError::Db(format!(
                    "etcd refused a transaction: {msg}; start etcd with --max-txn-ops {MAX_BATCH_OPS} or more"
                )));
            }
            if i32::from(status.code()) == 14 {
                return Failure::NotSent(msg.to_owned());
            }
            // gRPC's CANCELLED (1) and DEADLINE_EXCEEDED (4).
            let transient = matches!(i32::from(status.code()), 1 | 4)
                || [
                    "no leader",
                    "leader changed",
                    "timed out",
                    "future revision",
                    "not capable",
                    "too many requests",
                ]
                .iter()
                .any(|m| msg.contains(m));
            if transient {
                Failure::Unavailable(msg.to_owned())
            } else {
                Failure::Other(StoreError::Db(format!("etcd: {e}")))
            }
        }
        E::TransportError(_) => Failure::NotSent(e.to_string()),
        E::IoError(_) => Failure::Unavailable(e.to_string()),
        _ => Failure::Other(StoreError::Db(format!("etcd: {e}"))),
    }
}

/// What a commit came to.
enum Commit {
    Done,
    /// A compare on a key read failed: run the body again.
    Conflict,
}

impl EtcdBackend {
    /// Connects to the cluster `config` names and checks that a member answers (a read, which
    /// a member without quorum answers too).
    pub fn connect(config: &EtcdConfig) -> Result<EtcdBackend, StoreError> {
        config
            .validate()
            .map_err(|e| StoreError::Db(e.to_string()))?;
        let runtime = Runtime::start()?;
        let options = config
            .connect_options()
            .map_err(|e| StoreError::Db(e.to_string()))?;
        let make = |options: etcd_client::ConnectOptions| {
            let config = config.clone();
            let (tx, rx) = mpsc::sync_channel(1);
            runtime.handle.spawn(async move {
                let _ = tx.send(etcd::connect_with(&config, options).await);
            });
            rx.recv()
                .map_err(|_| StoreError::Db("the etcd client thread died".into()))?
                .map_err(|e| StoreError::Db(e.to_string()))
        };
        let client = make(options.clone().with_require_leader(true))?;
        let stale = make(options)?;
        let backend = EtcdBackend {
            config: config.clone(),
            client,
            stale,
            quorum_lost_until: Mutex::new(None),
            runtime,
        };
        let probe = backend.table_prefix("meta");
        backend.read(Range::one(probe))?;
        info!(endpoints = %config.endpoints_text(), prefix = %config.prefix, "store on etcd");
        Ok(backend)
    }

    /// Whether nothing at all is stored under the prefix (tables or anything else).
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        let prefix = self.config.prefix.as_bytes().to_vec();
        let end = prefix_end(&prefix);
        let response = self.read(Range {
            key: prefix,
            end: Some(end),
            limit: 1,
            descend: false,
            revision: 0,
        })?;
        Ok(response.kvs().is_empty())
    }

    /// The client (for election and leases: the same connections as the store's). Requests on it
    /// must run on [`EtcdBackend::runtime`].
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The runtime that drives [`EtcdBackend::client`].
    pub fn runtime(&self) -> tokio::runtime::Handle {
        self.runtime.handle.clone()
    }

    /// The configuration it was connected with.
    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    fn table_prefix(&self, table: &str) -> Vec<u8> {
        format!("{}t/{table}/", self.config.prefix).into_bytes()
    }

    fn full_key(&self, table: &str, key: &[u8]) -> Vec<u8> {
        let mut k = self.table_prefix(table);
        k.extend_from_slice(key);
        k
    }

    /// Runs `fut` on the runtime thread and waits for it, at most the request timeout.
    fn call<T, F>(&self, fut: F) -> Result<T, Failure>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let timeout = self.config.request_timeout;
        let (tx, rx) = mpsc::sync_channel(1);
        self.runtime.handle.spawn(async move {
            let _ = tx.send(tokio::time::timeout(timeout, fut).await);
        });
        match rx.recv_timeout(timeout + Duration::from_millis(500)) {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(classify(e)),
            Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Timeout) => Err(Failure::Unavailable(
                format!("no answer within {timeout:?}"),
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Failure::Unavailable(
                "the etcd client thread stopped".into(),
            )),
        }
    }

    /// [`EtcdBackend::call`] on the leader-requiring client, again while the member answers "no
    /// leader" (it refused before doing anything, so trying again is safe), until the request
    /// timeout: an election after a member restart is not a lost quorum. Other failures are not
    /// retried: a write whose answer was lost may have landed.
    fn call_leader<T, F, Fut>(&self, make: F) -> Result<T, Failure>
    where
        T: Send + 'static,
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let deadline = Instant::now() + self.config.request_timeout;
        loop {
            match self.call(make(self.client.clone())) {
                Err(Failure::Unavailable(cause))
                    if cause.contains("no leader")
                        && Instant::now() + ELECTION_RETRY < deadline =>
                {
                    std::thread::sleep(ELECTION_RETRY);
                }
                // A member that is down: another one may answer.
                Err(Failure::NotSent(_)) if Instant::now() + ELECTION_RETRY < deadline => {
                    std::thread::sleep(ELECTION_RETRY);
                }
                Err(Failure::NotSent(cause)) => return Err(Failure::Unavailable(cause)),
                other => return other,
            }
        }
    }

    fn quorum_lost(&self) -> bool {
        let mut until = self
            .quorum_lost_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match *until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *until = None;
                false
            }
            None => false,
        }
    }

    fn mark_quorum_lost(&self, cause: &str) {
        let mut until = self
            .quorum_lost_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if until.is_none() {
            warn!(endpoints = %self.config.endpoints_text(), cause, "etcd has no quorum: serving stale reads, refusing writes");
        }
        *until = Some(Instant::now() + QUORUM_LOST_FOR);
    }

    fn unavailable(&self, cause: &str) -> StoreError {
        StoreError::Unavailable(unavailable_message(&self.config, cause))
    }

    fn failure(&self, f: Failure) -> StoreError {
        match f {
            Failure::Unavailable(cause) | Failure::NotSent(cause) => self.unavailable(&cause),
            Failure::Compacted => {
                StoreError::Db("etcd compacted the revision a read needed; try again".into())
            }
            Failure::Other(e) => e,
        }
    }

    /// One range read: linearizable, or serializable from any member that answers while quorum
    /// is gone.
    fn read_raw(&self, range: Range) -> Result<GetResponse, Failure> {
        if !self.quorum_lost() {
            let attempt = |client: Client| {
                let r = range.clone();
                let mut kv = client.kv_client();
                async move { kv.get(r.key.clone(), Some(r.options(false))).await }
            };
            match self.call_leader(attempt) {
                Err(Failure::Unavailable(cause)) => self.mark_quorum_lost(&cause),
                other => return other,
            }
        }
        // A balanced channel may first pick a member that is down (refused at once on a dead
        // host, or timed out): try again, twice per member, within one request timeout.
        let mut last = String::new();
        let deadline = Instant::now() + self.config.request_timeout;
        for _ in 0..2 * self.config.endpoints.len().max(1) {
            if Instant::now() >= deadline && !last.is_empty() {
                break;
            }
            let mut kv = self.stale.kv_client();
            let r = range.clone();
            match self.call(async move { kv.get(r.key.clone(), Some(r.options(true))).await }) {
                Err(Failure::Unavailable(cause) | Failure::NotSent(cause)) => last = cause,
                other => return other,
            }
        }
        Err(Failure::Unavailable(format!("no member answers: {last}")))
    }

    /// A read at a revision a linearizable read already returned: that revision's data cannot
    /// change, so any member that has applied it may answer (serializable, no round of the
    /// leader with its quorum). A member behind it, or any other failure, falls back to
    /// [`EtcdBackend::read_raw`].
    fn read_at_known_revision(&self, range: Range) -> Result<GetResponse, Failure> {
        debug_assert!(range.revision > 0);
        let mut kv = self.client.kv_client();
        let r = range.clone();
        match self.call(async move { kv.get(r.key.clone(), Some(r.options(true))).await }) {
            Ok(response) => Ok(response),
            Err(Failure::Compacted) => Err(Failure::Compacted),
            Err(_) => self.read_raw(range),
        }
    }

    fn read(&self, range: Range) -> Result<GetResponse, StoreError> {
        self.read_raw(range).map_err(|f| self.failure(f))
    }

    /// Commits `ops` if every compare holds, fenced by the current fence.
    fn commit(
        &self,
        mut compares: Vec<Compare>,
        ops: Vec<TxnOp>,
        fence: Option<&Fence>,
    ) -> Result<Commit, StoreError> {
        if self.quorum_lost() {
            return Err(self.unavailable("quorum was lost moments ago"));
        }
        let mut otherwise = Vec::new();
        if let Some(f) = fence {
            compares.push(Compare::create_revision(
                f.key.clone(),
                CompareOp::Equal,
                f.revision,
            ));
            // Tells a lost fence from a read conflict.
            otherwise.push(TxnOp::get(f.key.clone(), None));
        }
        // The client's builder wants when, then, else in this order.
        let txn = EtcdTxnReq::new()
            .when(compares)
            .and_then(ops)
            .or_else(otherwise);
        let attempt = |client: Client| {
            let txn = txn.clone();
            let mut kv = client.kv_client();
            async move { kv.txn(txn).await }
        };
        let response = match self.call_leader(attempt) {
            Ok(r) => r,
            Err(Failure::Unavailable(cause)) => {
                self.mark_quorum_lost(&cause);
                return Err(self.unavailable(&cause));
            }
            Err(f) => return Err(self.failure(f)),
        };
        if response.succeeded() {
            return Ok(Commit::Done);
        }
        if let Some(f) = fence {
            let held = response.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.create_revision())),
                _ => None,
            });
            match held {
                Some(Some(rev)) if rev == f.revision => {}
                Some(now) => {
                    let what = match now {
                        Some(rev) => format!("has create revision {rev}"),
                        None => "is gone".to_owned(),
                    };
                    warn!(fence = %String::from_utf8_lossy(&f.key), expected = f.revision, "a fenced write was refused");
                    return Err(StoreError::Fenced(format!(
                        "the leadership key {} {what}, not {}; nothing was written",
                        String::from_utf8_lossy(&f.key),
                        f.revision
                    )));
                }
                None => {
                    return Err(StoreError::Db(
                        "etcd answered a failed fenced transaction without the fence key".into(),
                    ))
                }
            }
        }
        Ok(Commit::Conflict)
    }

    /// Commits writes that compare nothing (put, delete, batch, import chunk).
    fn commit_blind(&self, ops: Vec<TxnOp>) -> Result<(), StoreError> {
        match self.commit(Vec::new(), ops, current_fence().as_ref())? {
            Commit::Done => Ok(()),
            Commit::Conflict => Err(StoreError::Db(
                "etcd refused a transaction without compares".into(),
            )),
        }
    }

    /// The etcd range `[lo, hi)` of table `table` that `scan` selects.
    fn bounds(&self, table: &str, scan: &Scan) -> (Vec<u8>, Vec<u8>) {
        let base = self.table_prefix(table);
        let with = |k: &[u8], zero: bool| {
            let mut v = base.clone();
            v.extend_from_slice(k);
            if zero {
                v.push(0);
            }
            v
        };
        let lo = match &scan.start {
            Bound::Included(k) => with(k, false),
            Bound::Excluded(k) => with(k, true),
            Bound::Unbounded => base.clone(),
        };
        let hi = match &scan.end {
            Bound::Included(k) => with(k, true),
            Bound::Excluded(k) => with(k, false),
            Bound::Unbounded => prefix_end(&base),
        };
        (lo, hi)
    }
}

/// The first key after every key that starts with `prefix` (never empty: prefixes end in `/`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A scan, a page at a time, every page at the revision of the first.
struct Pages<'a> {
    backend: &'a EtcdBackend,
    lo: Vec<u8>,
    hi: Vec<u8>,
    reverse: bool,
    /// Bytes to strip from each key (the table prefix).
    strip: usize,
    revision: i64,
    buf: VecDeque<(Vec<u8>, Vec<u8>)>,
    done: bool,
}

impl Pages<'_> {
    fn fill(&mut self) -> Result<(), StoreError> {
        if self.lo >= self.hi {
            self.done = true;
            return Ok(());
        }
        let mut response = self.backend.read(Range {
            key: self.lo.clone(),
            end: Some(self.hi.clone()),
            limit: PAGE,
            descend: self.reverse,
            revision: self.revision,
        })?;
        if self.revision == 0 {
            self.revision = response.header().map(|h| h.revision()).unwrap_or(0);
        }
        let more = response.more();
        let kvs = response.take_kvs();
        match kvs.last() {
            Some(last) if more => {
                if self.reverse {
                    self.hi = last.key().to_vec();
                } else {
                    self.lo = last.key().to_vec();
                    self.lo.push(0);
                }
            }
            _ => self.done = true,
        }
        for kv in kvs {
            let (k, v) = kv.into_key_value();
            let key = k.get(self.strip..).unwrap_or_default().to_vec();
            self.buf.push_back((key, v));
        }
        Ok(())
    }
}

impl Iterator for Pages<'_> {
    type Item = Result<Entry, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.buf.pop_front() {
                return Some(Ok(e));
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.fill() {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}

/// A key a transaction read.
struct Read {
    value: Option<Vec<u8>>,
    /// Its `mod_revision` then (0 when absent): the commit compares it.
    mod_revision: i64,
}

/// One attempt of a transaction: reads through to etcd at one revision, writes buffered.
struct EtcdTxn<'a> {
    backend: &'a EtcdBackend,
    tables: &'a [&'static str],
    /// The revision every read of this attempt is made at (the first read's).
    revision: Cell<i64>,
    /// Each key read, with what it held.
    reads: RefCell<HashMap<Vec<u8>, Read>>,
    /// Each key written, with its new value (`None`: deleted).
    writes: RefCell<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl EtcdTxn<'_> {
    fn key(&self, table: &'static str, key: &[u8]) -> Result<Vec<u8>, TxFail> {
        if !self.tables.contains(&table) {
            return Err(TxFail::Storage(StoreError::Db(format!(
                "table {table} is not part of this transaction"
            ))));
        }
        Ok(self.backend.full_key(table, key))
    }
}

impl Txn for EtcdTxn<'_> {
    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, TxFail> {
        let full = self.key(table, key)?;
        if let Some(w) = self.writes.borrow().get(&full) {
            return Ok(w.clone());
        }
        if let Some(read) = self.reads.borrow().get(&full) {
            return Ok(read.value.clone());
        }
        let mut range = Range::one(full.clone());
        range.revision = self.revision.get();
        // The attempt's first read is linearizable and fixes its revision; the others read that
        // revision's data, which no longer changes, from whichever member answers first.
        let read = if range.revision > 0 {
            self.backend.read_at_known_revision(range)
        } else {
            self.backend.read_raw(range)
        };
        let response = match read {
            Ok(r) => r,
            Err(Failure::Compacted) => return Err(TxFail::Conflict),
            Err(f) => return Err(TxFail::Storage(self.backend.failure(f))),
        };
        if self.revision.get() == 0 {
            self.revision
                .set(response.header().map(|h| h.revision()).unwrap_or(0));
        }
        let (value, mod_revision) = match response.kvs().first() {
            Some(kv) => (Some(kv.value().to_vec()), kv.mod_revision()),
            None => (None, 0),
        };
        self.reads.borrow_mut().insert(
            full,
            Read {
                value: value.clone(),
                mod_revision,
            },
        );
        Ok(value)
    }

    fn put(&self, table: &'static str, key: &[u8], value: &[u8]) -> Result<(), TxFail> {
        let full = self.key(table, key)?;
        self.writes.borrow_mut().insert(full, Some(value.to_vec()));
        Ok(())
    }

    fn delete(&self, table: &'static str, key: &[u8]) -> Result<(), TxFail> {
        let full = self.key(table, key)?;
        self.writes.borrow_mut().insert(full, None);
        Ok(())
    }

    fn flush_on_commit(&self) {
        // Every etcd commit is durable on a quorum.
    }
}

fn op(key: Vec<u8>, value: Option<Vec<u8>>) -> TxnOp {
    match value {
        Some(v) => TxnOp::put(key, v, None),
        None => TxnOp::delete(key, None),
    }
}

impl Backend for EtcdBackend {
    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let mut response = self.read(Range::one(self.full_key(table, key)))?;
        Ok(response
            .take_kvs()
            .into_iter()
            .next()
            .map(|kv| kv.into_key_value().1))
    }

    fn scan(&self, table: &'static str, scan: Scan) -> Result<Entries<'_>, StoreError> {
        let (lo, hi) = self.bounds(table, &scan);
        let mut pages = Pages {
            backend: self,
            lo,
            hi,
            reverse: scan.reverse,
            strip: self.table_prefix(table).len(),
            revision: 0,
            buf: VecDeque::new(),
            done: false,
        };
        // The first page now, so a failure to start is this call's error.
        pages.fill()?;
        Ok(Box::new(pages))
    }

    fn put(&self, table: &'static str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.commit_blind(vec![op(self.full_key(table, key), Some(value.to_vec()))])
    }

    fn delete(&self, table: &'static str, key: &[u8]) -> Result<(), StoreError> {
        self.commit_blind(vec![op(self.full_key(table, key), None)])
    }

    fn write_batch(&self, table: &'static str, batch: &Batch) -> Result<(), StoreError> {
        // etcd refuses a transaction that names a key twice: later entries win.
        let mut last: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for (k, v) in &batch.ops {
            last.insert(self.full_key(table, k), v.clone());
        }
        if last.is_empty() {
            return Ok(());
        }
        if last.len() > MAX_BATCH_OPS {
            return Err(StoreError::Db(format!(
                "a batch of {} writes to {table} is more than the {MAX_BATCH_OPS} one etcd transaction takes",
                last.len()
            )));
        }
        self.commit_blind(last.into_iter().map(|(k, v)| op(k, v)).collect())
    }

    fn transact(&self, tables: &[&'static str], body: &TxBody<'_>) -> Result<(), TxFail> {
        let fence = current_fence();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if attempt > 3 {
                // Several controllers on one hot key: spread the retries out.
                let ms = rand::random_range(0..u64::from(attempt.min(20)) * 2);
                std::thread::sleep(Duration::from_millis(ms));
            }
            let txn = EtcdTxn {
                backend: self,
                tables,
                revision: Cell::new(0),
                reads: RefCell::new(HashMap::new()),
                writes: RefCell::new(BTreeMap::new()),
            };
            match body(&txn) {
                Ok(()) => {}
                Err(TxFail::Conflict) => continue,
                Err(other) => return Err(other),
            }
            let writes = txn.writes.into_inner();
            if writes.is_empty() {
                // Read only: what it read was one snapshot; nothing to commit.
                return Ok(());
            }
            if writes.len() > MAX_BATCH_OPS {
                return Err(TxFail::Storage(StoreError::Db(format!(
                    "a transaction of {} writes is more than the {MAX_BATCH_OPS} one etcd transaction takes",
                    writes.len()
                ))));
            }
            let compares = txn
                .reads
                .into_inner()
                .into_iter()
                .map(|(k, read)| Compare::mod_revision(k, CompareOp::Equal, read.mod_revision))
                .collect();
            let ops = writes.into_iter().map(|(k, v)| op(k, v)).collect();
            match self
                .commit(compares, ops, fence.as_ref())
                .map_err(TxFail::Storage)?
            {
                Commit::Done => return Ok(()),
                Commit::Conflict => {
                    debug!(attempt, "etcd transaction conflict; running the body again");
                }
            }
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn export(&self) -> Result<Vec<TableDump>, StoreError> {
        let base = format!("{}t/", self.config.prefix).into_bytes();
        let pages = Pages {
            backend: self,
            lo: base.clone(),
            hi: prefix_end(&base),
            reverse: false,
            strip: base.len(),
            revision: 0,
            buf: VecDeque::new(),
            done: false,
        };
        let mut out: Vec<TableDump> = Vec::new();
        for item in pages {
            let (rest, value) = item?;
            let Some(slash) = rest.iter().position(|b| *b == b'/') else {
                return Err(StoreError::Db(format!(
                    "etcd key {} under the store's prefix is not in a table",
                    String::from_utf8_lossy(&rest)
                )));
            };
            let name = std::str::from_utf8(&rest[..slash]).map_err(|_| {
                StoreError::Db(format!(
                    "table name {} is not UTF-8",
                    hex::encode(&rest[..slash])
                ))
            })?;
            let key = rest[slash + 1..].to_vec();
            match out.last_mut() {
                Some(t) if t.name == name => t.entries.push((key, value)),
                _ => out.push(TableDump {
                    name: name.to_owned(),
                    entries: vec![(key, value)],
                }),
            }
        }
        Ok(out)
    }

    fn import(&self, name: &str, entries: &[Entry]) -> Result<(), StoreError> {
        // No atomicity promised: chunks within etcd's transaction and request limits.
        let mut ops = Vec::new();
        let mut bytes = 0usize;
        for (k, v) in entries {
            let size = k.len() + v.len() + name.len() + self.config.prefix.len() + 16;
            if !ops.is_empty() && (ops.len() >= IMPORT_OPS || bytes + size > IMPORT_BYTES) {
                self.commit_blind(std::mem::take(&mut ops))?;
                bytes = 0;
            }
            ops.push(op(self.full_key(name, k), Some(v.clone())));
            bytes += size;
        }
        if !ops.is_empty() {
            self.commit_blind(ops)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(super) mod tests;
