//! Bounds on the fleet's event log, as a sans-IO core the store consults: how many events about one
//! node the log takes ([`EventBudget`]), how long one event's message may be ([`cap_message`]). How
//! many events and bytes the log keeps is the store's trimming ([`crate::store::MAX_EVENTS`],
//! [`crate::store::MAX_EVENT_BYTES`]).
//!
//! Why a budget per node: many events are caused by what a node reports (a drive appearing and
//! vanishing, a machine claiming a node's identity, a reboot refused...). A node that makes the
//! controller log such events in a loop would otherwise push every other node's events out of the
//! log. Each (node, kind) pair has a token bucket: [`EventBudgetConfig::burst`] events at once,
//! then one per [`EventBudgetConfig::refill_ms`]. Events over it are not written; they are counted,
//! and one [`crate::store::EventKind::Log(LogEvent::EventsSuppressed)`] event says how many were left out and
//! when, as soon as the pair has budget again (at its next event, or when the store is asked to
//! flush summaries). A summary needs a new suppression, which needs an empty bucket: summaries
//! cannot flood either.
//!
//! Events without a node (tokens, networks, releases) are made by operators and are not budgeted.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
};

use shoal_proto::{NodeId, UnixMillis};

use crate::store::EventKind;

/// The longest event message stored, in bytes; longer ones are cut (on a character boundary) and
/// end with `…`. Messages quote what agents report (drive models, reasons, step outputs).
pub const MAX_EVENT_MESSAGE: usize = 4096;

/// A message cut to [`MAX_EVENT_MESSAGE`] bytes.
pub fn cap_message(message: &str) -> Cow<'_, str> {
    if message.len() <= MAX_EVENT_MESSAGE {
        return Cow::Borrowed(message);
    }
    const MARK: &str = "…";
    let mut end = MAX_EVENT_MESSAGE - MARK.len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}{MARK}", &message[..end]))
}

/// How many events about one node, of one kind, the log takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventBudgetConfig {
    /// Events at once (default 128: a storage server's first drive report announces 60 drives).
    pub burst: u32,
    /// Then one event per this many milliseconds (default 60 000: one a minute).
    pub refill_ms: u64,
}

impl Default for EventBudgetConfig {
    fn default() -> Self {
        Self {
            burst: 128,
            refill_ms: 60_000,
        }
    }
}

/// Events about one node of one kind that were not written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    /// The node.
    pub node: NodeId,
    /// The kind.
    pub kind: EventKind,
    /// How many.
    pub count: u64,
    /// When the first and the last of them happened.
    pub from: UnixMillis,
    /// See `from`.
    pub to: UnixMillis,
}

impl Suppressed {
    /// The summary event's message.
    pub fn message(&self, config: &EventBudgetConfig) -> String {
        let kind = serde_json::to_value(self.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        format!(
            "{} {kind} event(s) about this node were not logged between {} and {}: more than {} at once, then more than one every {} s",
            self.count,
            shoal_controller_core::time::rfc3339_ms(self.from.0),
            shoal_controller_core::time::rfc3339_ms(self.to.0),
            config.burst,
            config.refill_ms / 1000
        )
    }
}

/// What to do with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Write the event (false: it was counted for a later summary).
    pub write: bool,
    /// Write this summary first.
    pub summary: Option<Suppressed>,
}

#[derive(Debug, Clone)]
struct Bucket {
    tokens: u64,
    refilled_at: UnixMillis,
    suppressed: u64,
    first: UnixMillis,
    last: UnixMillis,
}

/// The per-(node, kind) token buckets. Entries that are full and owe no summary are dropped when
/// the map grows, so its size follows the nodes that were active lately, not every node ever seen.
#[derive(Debug)]
pub struct EventBudget {
    config: EventBudgetConfig,
    buckets: HashMap<(NodeId, EventKind), Bucket>,
    /// Pairs with suppressed events not yet summarised.
    pending: HashSet<(NodeId, EventKind)>,
    prune_at: usize,
}

const PRUNE_AT_LEAST: usize = 4096;

impl EventBudget {
    /// Full buckets for everyone.
    pub fn new(config: EventBudgetConfig) -> Self {
        Self {
            config,
            buckets: HashMap::new(),
            pending: HashSet::new(),
            prune_at: PRUNE_AT_LEAST,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EventBudgetConfig {
        &self.config
    }

    fn refill(config: &EventBudgetConfig, b: &mut Bucket, now: UnixMillis) {
        let burst = u64::from(config.burst);
        // A clock that went back restarts the interval instead of freezing the bucket until it
        // catches up.
        if now < b.refilled_at || b.tokens >= burst {
            b.refilled_at = now;
            return;
        }
        let gained = (now.0 - b.refilled_at.0) / config.refill_ms.max(1);
        if gained > 0 {
            b.tokens = (b.tokens + gained).min(burst);
            b.refilled_at = if b.tokens >= burst {
                now
            } else {
                UnixMillis(b.refilled_at.0 + gained * config.refill_ms.max(1))
            };
        }
    }

    fn take_summary(&mut self, key: &(NodeId, EventKind)) -> Option<Suppressed> {
        let b = self.buckets.get_mut(key)?;
        if b.suppressed == 0 {
            return None;
        }
        let s = Suppressed {
            node: key.0.clone(),
            kind: key.1,
            count: b.suppressed,
            from: b.first,
            to: b.last,
        };
        b.suppressed = 0;
        self.pending.remove(key);
        Some(s)
    }

    /// Takes one event about `node` at `now`.
    pub fn admit(&mut self, node: &NodeId, kind: EventKind, now: UnixMillis) -> Decision {
        let key = (node.clone(), kind);
        let config = self.config;
        let b = self.buckets.entry(key.clone()).or_insert_with(|| Bucket {
            tokens: u64::from(config.burst),
            refilled_at: now,
            suppressed: 0,
            first: now,
            last: now,
        });
        Self::refill(&config, b, now);
        let decision = if b.tokens > 0 {
            b.tokens -= 1;
            Decision {
                write: true,
                summary: self.take_summary(&key),
            }
        } else {
            if b.suppressed == 0 {
                b.first = now;
                self.pending.insert(key);
            }
            b.suppressed += 1;
            b.last = now;
            Decision {
                write: false,
                summary: None,
            }
        };
        if self.buckets.len() > self.prune_at {
            self.prune(now);
        }
        decision
    }

    /// Summaries of pairs that have budget again (their flood stopped for at least one refill
    /// interval) and have not had another event since.
    pub fn due(&mut self, now: UnixMillis) -> Vec<Suppressed> {
        let config = self.config;
        let ready: Vec<(NodeId, EventKind)> = self
            .pending
            .iter()
            .filter(|k| {
                self.buckets.get_mut(*k).is_some_and(|b| {
                    Self::refill(&config, b, now);
                    b.tokens > 0
                })
            })
            .cloned()
            .collect();
        let mut out: Vec<Suppressed> = ready.iter().filter_map(|k| self.take_summary(k)).collect();
        out.sort_by(|a, b| (a.from, &a.node).cmp(&(b.from, &b.node)));
        out
    }

    fn prune(&mut self, now: UnixMillis) {
        let (config, burst) = (self.config, u64::from(self.config.burst));
        self.buckets.retain(|_, b| {
            Self::refill(&config, b, now);
            b.suppressed > 0 || b.tokens < burst
        });
        self.prune_at = (self.buckets.len() * 2).max(PRUNE_AT_LEAST);
    }

    /// Pairs tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DriveEvent, LogEvent, MaintenanceEvent, RegistryEvent, Store};

    fn n(i: u32) -> NodeId {
        NodeId(format!("n{i:010}"))
    }

    fn small() -> EventBudgetConfig {
        EventBudgetConfig {
            burst: 3,
            refill_ms: 1000,
        }
    }

    #[test]
    fn a_burst_passes_then_one_per_interval_and_the_rest_is_summarised_once() {
        let mut b = EventBudget::new(small());
        let k = EventKind::Drives(DriveEvent::Appeared);
        let writes: Vec<bool> = (0..10)
            .map(|i| b.admit(&n(1), k, UnixMillis(i)).write)
            .collect();
        assert_eq!(
            writes,
            [true, true, true, false, false, false, false, false, false, false]
        );
        // Another node and another kind of the same node have their own budgets.
        assert!(b.admit(&n(2), k, UnixMillis(10)).write);
        assert!(
            b.admit(
                &n(1),
                EventKind::Drives(DriveEvent::Removed),
                UnixMillis(10)
            )
            .write
        );
        // Not due before one interval has passed.
        assert!(b.due(UnixMillis(500)).is_empty());
        // The next event after a refill carries the summary of the 7 left out.
        let d = b.admit(&n(1), k, UnixMillis(1000));
        assert!(d.write);
        assert_eq!(
            d.summary,
            Some(Suppressed {
                node: n(1),
                kind: k,
                count: 7,
                from: UnixMillis(3),
                to: UnixMillis(9)
            })
        );
        assert!(d
            .summary
            .unwrap()
            .message(&small())
            .starts_with("7 drive_appeared event(s)"));
        assert!(
            !b.admit(&n(1), k, UnixMillis(1001)).write,
            "the refill was spent"
        );
        assert_eq!(
            b.admit(&n(1), k, UnixMillis(2001)).summary.map(|s| s.count),
            Some(1)
        );
    }

    #[test]
    fn a_flood_that_stops_is_summarised_when_due() {
        let mut b = EventBudget::new(small());
        for i in 0..100 {
            b.admit(
                &n(1),
                EventKind::Registry(RegistryEvent::Reenrolled),
                UnixMillis(i),
            );
        }
        let due = b.due(UnixMillis(1000));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].count, 97);
        assert!(b.due(UnixMillis(5000)).is_empty(), "once");
    }

    #[test]
    fn a_sustained_flood_writes_at_most_the_burst_plus_the_refill_rate_and_summaries_stay_rare() {
        let mut b = EventBudget::new(EventBudgetConfig::default());
        let mut written = 0u64;
        let mut summaries = 0u64;
        let mut summarised = 0u64;
        // One event every 100 ms for an hour.
        for t in (0..3_600_000u64).step_by(100) {
            let d = b.admit(
                &n(1),
                EventKind::Drives(DriveEvent::Appeared),
                UnixMillis(t),
            );
            written += u64::from(d.write);
            if let Some(s) = d.summary {
                summaries += 1;
                summarised += s.count;
            }
        }
        assert_eq!(written, 128 + 59, "burst, then one a minute");
        assert!(summaries <= 60, "{summaries}");
        let pending: u64 = b
            .due(UnixMillis(u64::MAX / 2))
            .iter()
            .map(|s| s.count)
            .sum();
        assert_eq!(
            written + summarised + pending,
            36_000,
            "every event is written or counted"
        );
    }

    #[test]
    fn clocks_going_back_do_not_freeze_a_bucket_and_idle_pairs_are_pruned() {
        let mut b = EventBudget::new(small());
        for i in 0..5 {
            b.admit(
                &n(1),
                EventKind::Registry(RegistryEvent::Up),
                UnixMillis(10_000_000 + i),
            );
        }
        // The clock jumps back an hour: one interval later there is budget again.
        assert!(b
            .admit(
                &n(1),
                EventKind::Registry(RegistryEvent::Up),
                UnixMillis(10_000_000 - 3_600_000)
            )
            .summary
            .is_none());
        assert!(
            b.admit(
                &n(1),
                EventKind::Registry(RegistryEvent::Up),
                UnixMillis(10_000_000 - 3_600_000 + 1000)
            )
            .write
        );

        let mut b = EventBudget::new(small());
        for i in 0..20_000 {
            b.admit(
                &n(i),
                EventKind::Registry(RegistryEvent::Up),
                UnixMillis(u64::from(i)),
            );
        }
        // One event each spent one token; a second later every bucket is full again and dropped on
        // prune.
        assert!(b.tracked() <= 2 * PRUNE_AT_LEAST + 1, "{}", b.tracked());
    }

    #[test]
    fn messages_are_capped_on_a_character_boundary() {
        assert_eq!(cap_message("short"), "short");
        let long = "é".repeat(MAX_EVENT_MESSAGE);
        let capped = cap_message(&long);
        assert!(
            capped.len() <= MAX_EVENT_MESSAGE && capped.ends_with('…'),
            "{}",
            capped.len()
        );
        let exact = "a".repeat(MAX_EVENT_MESSAGE);
        assert_eq!(cap_message(&exact).len(), MAX_EVENT_MESSAGE);
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    fn stored_bytes(store: &Store) -> u64 {
        store
            .table(crate::store::EVENTS)
            .iter()
            .map(|e| e.unwrap().1.len() as u64)
            .sum()
    }

    #[test]
    fn the_store_drops_a_nodes_flood_keeps_others_and_summarises() {
        let (_dir, store) = store();
        store.configure_event_budget(small());
        for i in 0..50 {
            store
                .append_event(
                    EventKind::Drives(DriveEvent::Appeared),
                    Some(&n(1)),
                    &format!("flap {i}"),
                    UnixMillis(i),
                )
                .unwrap();
        }
        store
            .append_event(
                EventKind::Drives(DriveEvent::Appeared),
                Some(&n(2)),
                "another node",
                UnixMillis(50),
            )
            .unwrap();
        store
            .append_event(
                EventKind::Registry(RegistryEvent::TokenCreated),
                None,
                "no node: not budgeted",
                UnixMillis(50),
            )
            .unwrap();
        let all = store.events(None, 1000).unwrap();
        assert_eq!(all.iter().filter(|e| e.node == Some(n(1))).count(), 3);
        assert!(all.iter().any(|e| e.node == Some(n(2))));
        // A flush after the interval writes the summary.
        assert_eq!(store.flush_suppressed_events(UnixMillis(2000)).unwrap(), 1);
        let last = store.events(None, 1000).unwrap().pop().unwrap();
        assert_eq!(
            (last.kind, last.node.as_ref()),
            (EventKind::Log(LogEvent::EventsSuppressed), Some(&n(1)))
        );
        assert!(
            last.message.starts_with("47 drive_appeared event(s)"),
            "{}",
            last.message
        );
        // Inside a transaction (the drive hub's path) the budget holds too.
        for i in 0..10 {
            let e = store
                .transaction(&[crate::store::EVENTS], |tx| {
                    store.tx_event::<crate::store::StoreError>(
                        &tx.table(crate::store::EVENTS),
                        EventKind::Drives(DriveEvent::Removed),
                        Some(&n(3)),
                        "tx",
                        UnixMillis(3000 + i),
                    )
                })
                .unwrap();
            assert_eq!(
                e.seq == 0,
                i >= 3,
                "event {i}: suppressed ones are not written (seq 0)"
            );
            store.after_event(e.seq).unwrap();
        }
    }

    #[test]
    fn long_messages_are_stored_capped() {
        let (_dir, store) = store();
        let e = store
            .append_event(
                EventKind::Maintenance(MaintenanceEvent::NodeMaintenanceFailed),
                Some(&n(1)),
                &"x".repeat(100_000),
                UnixMillis(1),
            )
            .unwrap();
        assert!(e.message.len() <= MAX_EVENT_MESSAGE);
        assert_eq!(store.events(None, 1).unwrap()[0].message, e.message);
    }

    #[test]
    fn the_log_is_trimmed_by_bytes_as_well_as_by_count() {
        let (_dir, store) = store();
        store.configure_event_budget(EventBudgetConfig {
            burst: u32::MAX,
            refill_ms: 1,
        });
        store.set_event_byte_limit(200 * 1024);
        let message = "m".repeat(MAX_EVENT_MESSAGE);
        for i in 0..400 {
            store
                .append_event(
                    EventKind::Maintenance(MaintenanceEvent::NodeMaintenanceFailed),
                    Some(&n(1)),
                    &message,
                    UnixMillis(i),
                )
                .unwrap();
        }
        let kept = store.events(None, 10_000).unwrap();
        let bytes = stored_bytes(&store);
        assert!(
            bytes <= 200 * 1024 + 2 * (MAX_EVENT_MESSAGE as u64 + 64),
            "{bytes} bytes kept"
        );
        assert!(kept.len() >= 30 && kept.len() < 60, "{} kept", kept.len());
        assert_eq!(kept.last().unwrap().seq, 400, "the newest are kept");
        assert_eq!(
            store
                .inner
                .event_bytes
                .load(std::sync::atomic::Ordering::SeqCst),
            bytes,
            "the running count is exact"
        );
        // Reopening counts the bytes again from what is on disk.
        let dir = _dir;
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store
                .inner
                .event_bytes
                .load(std::sync::atomic::Ordering::SeqCst),
            stored_bytes(&store)
        );
    }
}
