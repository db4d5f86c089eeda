//! What the controller knows about every node's drives, as a sans-IO core: the latest
//! [`DriveReport`] per node, each drive's SMART history and verdict, the events a new report gives
//! rise to, the JSON views, and the checks a drive command must pass before it is sent. No store,
//! no clock, no network: times come in as arguments, and `shoal_controller::drives::hub` persists what this
//! returns.
//!
//! Rules:
//! - A report replaces the node's previous one whole (the agent always sends all its drives).
//! - Drives are compared by kernel name. The same name with another serial number is another drive:
//!   the old one is removed and the new one appeared.
//! - A SMART sample is recorded only when a drive's `smart_at` is newer than the last sample
//!   recorded for that drive, so the snapshots an agent sends on other changes do not repeat
//!   samples.
//! - The verdict of a drive is the verdict of its latest sample. When the latest read failed (or
//!   has not happened since a restart of the agent), the verdict of the last good sample still
//!   counts: a failing drive whose smartctl times out is still failing.
//! - A prepared drive that vanishes (reported `missing`, or gone from the report) is an alarm.
//! - A node has at most [`MAX_HISTORIES_PER_NODE`] drive histories: past that, the histories of
//!   drives not in its latest report go, those sampled longest ago first.

use crate::drives::DriveEvent;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_proto::{
    Drive, DriveAction, DriveReport, DriveState, NodeId, PreparedDrive, SelfTestKind,
    SelfTestStatus, SmartOutcome, SmartPredictors, UnixMillis,
};

use crate::drives::{drive_key, DriveHistory, HistoryConfig, SmartSample, Verdict, VerdictConfig};
use crate::events::EventKind;
use crate::time::rfc3339_ms as rfc3339;
use shoal_api::drives::DriveView;
use shoal_api::drives::SelfTestView;
use shoal_api::drives::SmartView;
use shoal_api::drives::StateDetail;

/// A node's latest drive report as the controller keeps it (sled tree `drive_reports`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReport {
    /// When the controller received it (its own clock).
    pub received_at: UnixMillis,
    /// The report.
    pub report: DriveReport,
}

/// One SMART sample as the controller keeps it (sled tree `drive_samples`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSample {
    /// Kernel name of the drive when the sample was taken (`sdb`).
    pub device: String,
    /// The sample.
    pub sample: SmartSample,
}

/// A sample [`FleetDrives::ingest`] recorded, for the shell to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSample {
    /// The drive's history key ([`drive_key`]).
    pub key: String,
    /// What to store.
    pub stored: StoredSample,
    /// The oldest sample the history keeps for this drive now: older stored ones can go.
    pub keep_from: UnixMillis,
}

/// The latest verdict of one drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    /// Kernel name of the drive at its latest sample.
    pub device: String,
    /// Its serial number, as SMART reported it.
    pub serial: Option<String>,
    /// The verdict.
    pub verdict: Verdict,
    /// When the sample was taken (agent clock).
    pub sample_at: UnixMillis,
}

/// Something that happened to a drive, found by comparing two reports (or by a new verdict).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DriveChange {
    /// A drive the node did not report before.
    Appeared {
        /// Kernel name.
        device: String,
        /// Model.
        model: Option<String>,
        /// Serial number.
        serial: Option<String>,
        /// Size in bytes.
        size_bytes: u64,
        /// What it holds.
        state: DriveState,
    },
    /// A prepared drive that was missing is back.
    Returned {
        /// Kernel name.
        device: String,
        /// Serial number.
        serial: Option<String>,
        /// Its filesystem and mount.
        prepared: PreparedDrive,
    },
    /// A drive is no longer reported.
    Removed {
        /// Kernel name.
        device: String,
        /// Serial number.
        serial: Option<String>,
        /// Its last state (`blank`, `has-data`, `missing`, ...).
        last_state: &'static str,
    },
    /// The agent prepared a drive: partitioned, formatted and mounted.
    Prepared {
        /// Kernel name.
        device: String,
        /// Serial number.
        serial: Option<String>,
        /// Its filesystem and mount.
        prepared: PreparedDrive,
    },
    /// Preparing a drive failed.
    PrepareFailed {
        /// Kernel name.
        device: String,
        /// Serial number.
        serial: Option<String>,
        /// What failed.
        reason: String,
    },
    /// A prepared drive vanished; its mount was detached. An alarm.
    Missing {
        /// Kernel name.
        device: String,
        /// Serial number.
        serial: Option<String>,
        /// Its filesystem and former mount.
        prepared: PreparedDrive,
    },
    /// A drive's SMART verdict changed level.
    VerdictChanged {
        /// Kernel name.
        device: String,
        /// Serial number.
        serial: Option<String>,
        /// The previous level (`ok`, `warning`, `failing`); `None` for the drive's first verdict.
        from: Option<&'static str>,
        /// The new verdict, with its reasons.
        to: Verdict,
    },
    /// A SMART self-test ended.
    SelfTestCompleted {
        /// Kernel name.
        device: String,
        /// Serial number.
        serial: Option<String>,
        /// Short or long, when the drive says.
        kind: Option<SelfTestKind>,
        /// Whether it passed.
        passed: bool,
        /// The drive's words for the result.
        result: String,
    },
}

impl DriveChange {
    /// The event log's kind for it.
    pub fn kind(&self) -> EventKind {
        match self {
            DriveChange::Appeared { .. } | DriveChange::Returned { .. } => {
                EventKind::Drives(DriveEvent::Appeared)
            }
            DriveChange::Removed { .. } => EventKind::Drives(DriveEvent::Removed),
            DriveChange::Prepared { .. } => EventKind::Drives(DriveEvent::Prepared),
            DriveChange::PrepareFailed { .. } => EventKind::Drives(DriveEvent::PrepareFailed),
            DriveChange::Missing { .. } => EventKind::Drives(DriveEvent::Missing),
            DriveChange::VerdictChanged { .. } => EventKind::Drives(DriveEvent::VerdictChanged),
            DriveChange::SelfTestCompleted { .. } => {
                EventKind::Drives(DriveEvent::SelfTestCompleted)
            }
        }
    }

    /// Whether an operator must act: a prepared drive went missing, a drive is failing, or a
    /// self-test failed. The shell logs these at `warn`.
    pub fn is_alarm(&self) -> bool {
        match self {
            DriveChange::Missing { .. } | DriveChange::PrepareFailed { .. } => true,
            DriveChange::VerdictChanged { to, .. } => !matches!(to, Verdict::Ok),
            DriveChange::SelfTestCompleted { passed, .. } => !passed,
            _ => false,
        }
    }

    /// The drive's kernel name.
    pub fn device(&self) -> &str {
        match self {
            DriveChange::Appeared { device, .. }
            | DriveChange::Returned { device, .. }
            | DriveChange::Removed { device, .. }
            | DriveChange::Prepared { device, .. }
            | DriveChange::PrepareFailed { device, .. }
            | DriveChange::Missing { device, .. }
            | DriveChange::VerdictChanged { device, .. }
            | DriveChange::SelfTestCompleted { device, .. } => device,
        }
    }
}

fn serial_text(serial: &Option<String>) -> String {
    match serial {
        Some(s) => format!(" (serial {s})"),
        None => String::new(),
    }
}

/// The operator-facing description of a state, with its detail.
pub fn state_text(state: &DriveState) -> String {
    match state {
        DriveState::HasData { signatures } => format!("has-data ({})", signatures.join(", ")),
        DriveState::Prepared(p) => format!(
            "prepared: {} {} on {}",
            p.partition, p.filesystem, p.mount_point
        ),
        DriveState::Missing(p) => format!(
            "missing: was {} {} on {}",
            p.partition, p.filesystem, p.mount_point
        ),
        DriveState::PrepareFailed { reason } => format!("prepare-failed: {reason}"),
        DriveState::Unreadable { reason } => format!("unreadable: {reason}"),
        other => other.as_str().to_owned(),
    }
}

impl std::fmt::Display for DriveChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DriveChange::Appeared { device, model, serial, size_bytes, state } => write!(
                f,
                "drive {device} appeared: {}{}, {} bytes, {}",
                model.as_deref().unwrap_or("unknown model"),
                serial_text(serial),
                size_bytes,
                state_text(state)
            ),
            DriveChange::Returned { device, serial, prepared } => write!(
                f,
                "prepared drive {device}{} is back: {prepared}",
                serial_text(serial),
            ),
            DriveChange::Removed { device, serial, last_state } => {
                write!(f, "drive {device}{} removed (was {last_state})", serial_text(serial))
            }
            DriveChange::Prepared { device, serial, prepared } => write!(
                f,
                "drive {device}{} prepared: {prepared}",
                serial_text(serial),
            ),
            DriveChange::PrepareFailed { device, serial, reason } => {
                write!(f, "preparing drive {device}{} failed: {reason}", serial_text(serial))
            }
            DriveChange::Missing { device, serial, prepared } => write!(
                f,
                "PREPARED DRIVE MISSING: {device}{} vanished; it held {prepared}, and the mount was detached",
                serial_text(serial),
            ),
            DriveChange::VerdictChanged { device, serial, from, to } => {
                write!(f, "drive {device}{} SMART verdict {} -> {}", serial_text(serial), from.unwrap_or("unknown"), to.as_str())?;
                let reasons: Vec<String> = to.reasons().iter().map(ToString::to_string).collect();
                if !reasons.is_empty() {
                    write!(f, ": {}", reasons.join("; "))?;
                }
                Ok(())
            }
            DriveChange::SelfTestCompleted { device, serial, kind, passed, result } => write!(
                f,
                "drive {device}{} {}self-test {}: {result}",
                serial_text(serial),
                kind.map(|k| format!("{k} ")).unwrap_or_default(),
                if *passed { "passed" } else { "FAILED" }
            ),
        }
    }
}

fn self_test(drive: &Drive) -> Option<&SelfTestStatus> {
    match &drive.smart {
        Some(SmartOutcome::Report(r)) => r.self_test.as_ref(),
        _ => None,
    }
}

fn has_smart_report(drive: &Drive) -> bool {
    matches!(drive.smart, Some(SmartOutcome::Report(_)))
}

/// Whether the self-test state went from `before` to a newly completed test.
fn newly_completed(before: &Drive, after: &Drive) -> Option<(Option<SelfTestKind>, bool, String)> {
    let Some(SelfTestStatus::Completed {
        kind,
        passed,
        result,
        ..
    }) = self_test(after)
    else {
        return None;
    };
    // Without a SMART report before, the log's newest entry may be years old: not news.
    if !has_smart_report(before) {
        return None;
    }
    match self_test(before) {
        Some(SelfTestStatus::Completed { .. }) if self_test(before) == self_test(after) => None,
        _ => Some((*kind, *passed, result.clone())),
    }
}

/// The changes from `prev` (the node's previous report, `None` before its first) to `next`, in the
/// order of `next`'s drives, then the drives that left. Verdicts are not compared here (see
/// [`FleetDrives::ingest`]).
pub fn diff(prev: Option<&DriveReport>, next: &DriveReport) -> Vec<DriveChange> {
    let mut out = Vec::new();
    let before: BTreeMap<&str, &Drive> = prev
        .map(|p| p.drives.iter().map(|d| (d.name.as_str(), d)).collect())
        .unwrap_or_default();
    let mut seen = Vec::new();
    for d in &next.drives {
        let device = d.name.clone();
        let serial = d.serial.clone();
        let old = before
            .get(d.name.as_str())
            .copied()
            .filter(|old| same_drive(old, d));
        if let Some(old) = before.get(d.name.as_str()).copied() {
            if old.serial != d.serial && old.serial.is_some() && d.serial.is_some() {
                out.push(gone(old));
            }
        }
        seen.push(d.name.as_str());
        let Some(old) = old else {
            match &d.state {
                DriveState::Missing(p) => out.push(DriveChange::Missing {
                    device,
                    serial,
                    prepared: p.clone(),
                }),
                state => out.push(DriveChange::Appeared {
                    device,
                    model: d.model.clone(),
                    serial,
                    size_bytes: d.size_bytes,
                    state: state.clone(),
                }),
            }
            continue;
        };
        match (&old.state, &d.state) {
            (DriveState::Missing(_), DriveState::Missing(_)) => {}
            (_, DriveState::Missing(p)) => out.push(DriveChange::Missing {
                device: device.clone(),
                serial: serial.clone(),
                prepared: p.clone(),
            }),
            (DriveState::Missing(_), DriveState::Prepared(p)) => out.push(DriveChange::Returned {
                device: device.clone(),
                serial: serial.clone(),
                prepared: p.clone(),
            }),
            (DriveState::Prepared(_), DriveState::Prepared(_)) => {}
            (_, DriveState::Prepared(p)) => out.push(DriveChange::Prepared {
                device: device.clone(),
                serial: serial.clone(),
                prepared: p.clone(),
            }),
            (DriveState::PrepareFailed { reason: a }, DriveState::PrepareFailed { reason: b })
                if a == b => {}
            (_, DriveState::PrepareFailed { reason }) => out.push(DriveChange::PrepareFailed {
                device: device.clone(),
                serial: serial.clone(),
                reason: reason.clone(),
            }),
            _ => {}
        }
        if let Some((kind, passed, result)) = newly_completed(old, d) {
            out.push(DriveChange::SelfTestCompleted {
                device,
                serial,
                kind,
                passed,
                result,
            });
        }
    }
    for (name, old) in &before {
        if !seen.contains(name) {
            out.push(gone(old));
        }
    }
    out
}

/// What it means that `old` is no longer reported.
fn gone(old: &Drive) -> DriveChange {
    let device = old.name.clone();
    let serial = old.serial.clone();
    match &old.state {
        // The agent reports a vanished prepared drive as missing; one that is simply gone from the
        // report (an agent restarted without its state, a changed --drive-match) is just as
        // missing.
        DriveState::Prepared(p) => DriveChange::Missing {
            device,
            serial,
            prepared: p.clone(),
        },
        state => DriveChange::Removed {
            device,
            serial,
            last_state: state.as_str(),
        },
    }
}

/// Two entries with one kernel name are the same drive unless both have serials and they differ.
fn same_drive(a: &Drive, b: &Drive) -> bool {
    match (&a.serial, &b.serial) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    }
}

/// What one report changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ingested {
    /// Events to log, in order.
    pub changes: Vec<DriveChange>,
    /// SMART samples to persist.
    pub samples: Vec<NewSample>,
    /// History keys of drives forgotten to stay within [`MAX_HISTORIES_PER_NODE`]: their stored
    /// samples can go.
    pub forgotten: Vec<String>,
}

/// The most drive histories kept for one node: twice the drives one report may hold
/// ([`shoal_proto::limits::MAX_DRIVES`]), so drives that come and go (a swapped disk, a USB stick)
/// keep their history for a while. Without it, a node that reports new serial numbers in every
/// report would grow the histories and the stored samples without end.
pub const MAX_HISTORIES_PER_NODE: usize = 2 * shoal_proto::limits::MAX_DRIVES;

/// Thresholds and history bounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetDrivesConfig {
    /// Verdict thresholds (defaults: [`VerdictConfig::default`]).
    pub verdict: VerdictConfig,
    /// How much history to keep (defaults: 7 days, 2016 samples per drive).
    pub history: HistoryConfig,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct FleetDrives {
    config: FleetDrivesConfig,
    reports: BTreeMap<NodeId, StoredReport>,
    history: DriveHistory,
    /// The latest verdict per node and drive history key.
    judged: BTreeMap<(NodeId, String), Judged>,
}

/// Samples that loading found outside the history window, for the shell to delete.
pub type Stale = Vec<(NodeId, String, UnixMillis)>;

impl FleetDrives {
    /// The fleet's drives as the store holds them: the latest reports, and samples (any order) that
    /// are replayed through the history to restore each drive's verdict. Returns the samples the
    /// history did not keep (older than the window or beyond the bound).
    pub fn load(
        config: FleetDrivesConfig,
        reports: Vec<(NodeId, StoredReport)>,
        samples: Vec<(NodeId, String, StoredSample)>,
    ) -> (FleetDrives, Stale) {
        let mut book = FleetDrives {
            config,
            reports: reports.into_iter().collect(),
            history: DriveHistory::new(config.history),
            judged: BTreeMap::new(),
        };
        let mut by_drive: BTreeMap<(NodeId, String), Vec<StoredSample>> = BTreeMap::new();
        for (node, key, s) in samples {
            by_drive.entry((node, key)).or_default().push(s);
        }
        let mut stale = Vec::new();
        for ((node, key), mut samples) in by_drive {
            samples.sort_by_key(|s| s.sample.at);
            let all: Vec<UnixMillis> = samples.iter().map(|s| s.sample.at).collect();
            for s in samples {
                book.judge(&node, &key, s);
            }
            let kept: Vec<UnixMillis> = book.history.samples(&node, &key).map(|s| s.at).collect();
            stale.extend(
                all.into_iter()
                    .filter(|at| !kept.contains(at))
                    .map(|at| (node.clone(), key.clone(), at)),
            );
        }
        (book, stale)
    }

    /// Records a sample and returns the drive's previous and new verdicts.
    fn judge(
        &mut self,
        node: &NodeId,
        key: &str,
        stored: StoredSample,
    ) -> (Option<Verdict>, Verdict) {
        let verdict = self
            .history
            .record(node, stored.sample.clone(), &self.config.verdict);
        let judged = Judged {
            device: stored.device,
            serial: stored.sample.report.serial.clone(),
            verdict: verdict.clone(),
            sample_at: stored.sample.at,
        };
        let before = self
            .judged
            .insert((node.clone(), key.to_owned()), judged)
            .map(|j| j.verdict);
        (before, verdict)
    }

    /// Takes a node's new report: returns the events it gives rise to and the samples to persist.
    pub fn ingest(
        &mut self,
        node: &NodeId,
        report: DriveReport,
        received_at: UnixMillis,
    ) -> Ingested {
        let prev = self.reports.get(node).map(|s| &s.report);
        let mut changes = diff(prev, &report);
        let mut samples = Vec::new();
        for d in &report.drives {
            let (Some(SmartOutcome::Report(r)), Some(at)) = (&d.smart, d.smart_at) else {
                continue;
            };
            let key = drive_key(r);
            let last = self
                .judged
                .get(&(node.clone(), key.clone()))
                .map(|j| j.sample_at);
            if last.is_some_and(|last| at <= last) {
                continue;
            }
            let stored = StoredSample {
                device: d.name.clone(),
                sample: SmartSample {
                    at,
                    report: r.clone(),
                },
            };
            let (before, after) = self.judge(node, &key, stored.clone());
            let from = before.as_ref().map(Verdict::as_str);
            if from != Some(after.as_str()) && !(from.is_none() && after == Verdict::Ok) {
                changes.push(DriveChange::VerdictChanged {
                    device: d.name.clone(),
                    serial: d.serial.clone(),
                    from,
                    to: after,
                });
            }
            let keep_from = self
                .history
                .samples(node, &key)
                .next()
                .map(|s| s.at)
                .unwrap_or(at);
            samples.push(NewSample {
                key,
                stored,
                keep_from,
            });
        }
        let forgotten = self.trim_histories(node, &report);
        self.reports.insert(
            node.clone(),
            StoredReport {
                received_at,
                report,
            },
        );
        Ingested {
            changes,
            samples,
            forgotten,
        }
    }

    /// Drops the histories of drives not in `report`, oldest latest sample first, until the node
    /// has at most [`MAX_HISTORIES_PER_NODE`]; returns their keys.
    fn trim_histories(&mut self, node: &NodeId, report: &DriveReport) -> Vec<String> {
        let mine: Vec<(UnixMillis, String)> = self
            .judged
            .range((node.clone(), String::new())..)
            .take_while(|((n, _), _)| n == node)
            .map(|((_, key), j)| (j.sample_at, key.clone()))
            .collect();
        let Some(excess) = mine
            .len()
            .checked_sub(MAX_HISTORIES_PER_NODE)
            .filter(|e| *e > 0)
        else {
            return vec![];
        };
        let current: std::collections::BTreeSet<String> = report
            .drives
            .iter()
            .filter_map(|d| match &d.smart {
                Some(SmartOutcome::Report(r)) => Some(drive_key(r)),
                _ => None,
            })
            .collect();
        let mut gone: Vec<(UnixMillis, String)> = mine
            .into_iter()
            .filter(|(_, key)| !current.contains(key))
            .collect();
        gone.sort();
        gone.truncate(excess);
        gone.into_iter()
            .map(|(_, key)| {
                self.judged.remove(&(node.clone(), key.clone()));
                self.history.forget_drive(node, &key);
                key
            })
            .collect()
    }

    /// Drive histories kept for a node.
    pub fn history_count(&self, node: &NodeId) -> usize {
        self.judged
            .range((node.clone(), String::new())..)
            .take_while(|((n, _), _)| n == node)
            .count()
    }

    /// Forgets a node that left the fleet.
    pub fn forget(&mut self, node: &NodeId) {
        self.reports.remove(node);
        self.history.forget_node(node);
        self.judged.retain(|(n, _), _| n != node);
    }

    /// A node's latest report.
    pub fn report(&self, node: &NodeId) -> Option<&StoredReport> {
        self.reports.get(node)
    }

    /// One drive of a node's latest report.
    pub fn drive(&self, node: &NodeId, device: &str) -> Option<&Drive> {
        self.reports
            .get(node)?
            .report
            .drives
            .iter()
            .find(|d| d.name == device)
    }

    /// The latest verdict that applies to a drive: its current SMART report's, or, when the latest
    /// read failed, the last one judged for the same device and serial.
    pub fn verdict(&self, node: &NodeId, drive: &Drive) -> Option<&Judged> {
        self.judged_entry(node, drive).map(|(_, j)| j)
    }

    /// The history key and verdict that apply to a drive (see [`FleetDrives::verdict`]).
    fn judged_entry(&self, node: &NodeId, drive: &Drive) -> Option<(&str, &Judged)> {
        if let Some(SmartOutcome::Report(r)) = &drive.smart {
            return self
                .judged
                .get_key_value(&(node.clone(), drive_key(r)))
                .map(|((_, key), j)| (key.as_str(), j));
        }
        self.judged
            .iter()
            .filter(|((n, _), j)| {
                n == node
                    && j.device == drive.name
                    && (drive.serial.is_none() || j.serial == drive.serial)
            })
            .max_by_key(|(_, j)| j.sample_at)
            .map(|((_, key), j)| (key.as_str(), j))
    }

    /// The SMART history of the drive a node reports as `device`, oldest first: the samples the
    /// verdict was judged against (at most [`HistoryConfig::max_samples`], within its window).
    /// When the drive's latest read failed, the history of the last drive judged on that device.
    pub fn history(&self, node: &NodeId, device: &str) -> Vec<&SmartSample> {
        let Some(drive) = self.drive(node, device) else {
            return Vec::new();
        };
        match self.judged_entry(node, drive) {
            Some((key, _)) => self.history.samples(node, key).collect(),
            None => Vec::new(),
        }
    }

    /// How many samples the history keeps for a drive.
    pub fn sample_count(&self, node: &NodeId, key: &str) -> usize {
        self.history.samples(node, key).count()
    }

    /// The drive listing: every drive of every node (or of `only`), by node then as reported.
    pub fn views(&self, only: Option<&NodeId>) -> Vec<DriveView> {
        let mut out = Vec::new();
        for (node, stored) in &self.reports {
            if only.is_some_and(|o| o != node) {
                continue;
            }
            for d in &stored.report.drives {
                out.push(drive_view(
                    node,
                    d,
                    self.verdict(node, d).map(|j| &j.verdict),
                    stored.received_at,
                ));
            }
        }
        out
    }
}

fn state_detail(state: &DriveState) -> Option<StateDetail> {
    let prepared = |p: &PreparedDrive| StateDetail {
        partition: Some(p.partition.clone()),
        filesystem: Some(p.filesystem.as_str().to_owned()),
        fs_uuid: Some(p.fs_uuid.clone()),
        label: Some(p.label.clone()),
        mount_point: Some(p.mount_point.clone()),
        ..Default::default()
    };
    match state {
        DriveState::HasData { signatures } => Some(StateDetail {
            signatures: Some(signatures.clone()),
            ..Default::default()
        }),
        DriveState::Prepared(p) | DriveState::Missing(p) => Some(prepared(p)),
        DriveState::PrepareFailed { reason } | DriveState::Unreadable { reason } => {
            Some(StateDetail {
                reason: Some(reason.clone()),
                ..Default::default()
            })
        }
        _ => None,
    }
}

fn predictors_json(p: &SmartPredictors) -> serde_json::Value {
    let v = match p {
        SmartPredictors::Ata(a) => serde_json::to_value(a),
        SmartPredictors::Nvme(n) => serde_json::to_value(n),
        SmartPredictors::Scsi(s) => serde_json::to_value(s),
    };
    v.unwrap_or(serde_json::Value::Null)
}

fn self_test_view(s: &SelfTestStatus) -> SelfTestView {
    match s {
        SelfTestStatus::Running {
            kind,
            remaining_percent,
        } => SelfTestView {
            state: "running".into(),
            kind: kind.map(|k| k.to_string()),
            remaining_percent: *remaining_percent,
            result: None,
            power_on_hours: None,
        },
        SelfTestStatus::Completed {
            kind,
            passed,
            result,
            power_on_hours,
        } => SelfTestView {
            state: if *passed { "passed" } else { "failed" }.into(),
            kind: kind.map(|k| k.to_string()),
            remaining_percent: None,
            result: Some(result.clone()),
            power_on_hours: *power_on_hours,
        },
    }
}

/// A drive's SMART view: the verdict applying to it (see [`FleetDrives::verdict`]) and its latest
/// read.
fn smart_view(d: &Drive, verdict: Option<&Verdict>) -> SmartView {
    let mut v = SmartView {
        verdict: verdict.map(|v| v.as_str()).unwrap_or("unknown").to_owned(),
        reasons: verdict
            .map(|v| v.reasons().iter().map(ToString::to_string).collect())
            .unwrap_or_default(),
        status: "pending".into(),
        at: d.smart_at.map(|t| rfc3339(t.0)),
        ..Default::default()
    };
    match &d.smart {
        None => {}
        Some(SmartOutcome::NoSmart { reason }) => {
            v.status = "no-smart".into();
            v.reason = Some(reason.clone());
        }
        Some(SmartOutcome::Failed { reason }) => {
            v.status = "failed".into();
            v.reason = Some(reason.clone());
        }
        Some(SmartOutcome::Report(r)) => {
            v.status = "report".into();
            v.protocol = serde_json::to_value(r.protocol)
                .ok()
                .and_then(|p| p.as_str().map(str::to_owned));
            v.temperature_celsius = r.temperature_celsius;
            v.power_on_hours = r.power_on_hours;
            v.health_passed = r.health_passed;
            v.predictors = Some(predictors_json(&r.predictors));
            v.self_test = r.self_test.as_ref().map(self_test_view);
        }
    }
    v
}

/// One drive as `GET /v1/drives` lists it.
pub fn drive_view(
    node: &NodeId,
    d: &Drive,
    verdict: Option<&Verdict>,
    received_at: UnixMillis,
) -> DriveView {
    DriveView {
        node: node.0.clone(),
        device: d.name.clone(),
        serial: d.serial.clone(),
        model: d.model.clone(),
        size_bytes: d.size_bytes,
        state: d.state.as_str().to_owned(),
        state_detail: state_detail(&d.state),
        smart: smart_view(d, verdict),
        updated_at: rfc3339(received_at.0),
    }
}

/// What an operator asks `drives prepare` to do (shared with `shoalctl`).
pub use shoal_api::drives::PrepareRequest;

/// Why a drive command was refused or did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// No node in the fleet has this id.
    #[error("no node {0} in the fleet")]
    UnknownNode(NodeId),
    /// The node has no control connection now.
    #[error("node {0} is not connected; drive commands need a connected agent")]
    NotConnected(NodeId),
    /// The node's agent speaks a protocol without drive commands.
    #[error(
        "node {node} speaks protocol {version}; drive commands need protocol 3 (upgrade the agent)"
    )]
    OldProtocol {
        /// The node.
        node: NodeId,
        /// The negotiated version.
        version: u16,
    },
    /// The node has not reported drives yet.
    #[error("node {0} has not reported its drives yet")]
    NoReport(NodeId),
    /// The drive is not in the node's latest report.
    #[error("node {node} reports no drive {device} (it reports: {known})")]
    UnknownDrive {
        /// The node.
        node: NodeId,
        /// The device asked for.
        device: String,
        /// The drives it does report, comma-separated (or `none`).
        known: String,
    },
    /// The drive's SMART verdict is failing: shoal never prepares it.
    #[error(
        "refusing to prepare {device}: its SMART verdict is failing ({reasons}); replace the drive"
    )]
    Failing {
        /// The drive.
        device: String,
        /// Why it is failing.
        reasons: String,
    },
    /// The drive holds data and the operator did not force it with its serial.
    #[error(
        "refusing to prepare {device}: it holds data ({signatures}); to erase it, run again with --force --serial {serial}"
    )]
    HasData {
        /// The drive.
        device: String,
        /// What is on it.
        signatures: String,
        /// Its serial number, or a placeholder when it has none.
        serial: String,
    },
    /// The drive holds data and has no serial number, so it cannot be forced.
    #[error("refusing to prepare {device}: it holds data ({signatures}) and reports no serial number to confirm --force with")]
    NoSerial {
        /// The drive.
        device: String,
        /// What is on it.
        signatures: String,
    },
    /// `--serial` does not match the drive's serial number.
    #[error("refusing to prepare {device}: --serial {given} does not match its serial number {actual}; it holds {signatures}")]
    SerialMismatch {
        /// The drive.
        device: String,
        /// What the operator gave.
        given: String,
        /// The drive's serial number.
        actual: String,
        /// What is on it.
        signatures: String,
    },
    /// `--force` without `--serial`, or the other way round.
    #[error("--force needs --serial SERIAL (the drive's serial number), and --serial is only used with --force")]
    ForceNeedsSerial,
    /// The drive is prepared already.
    #[error("{device} is already prepared: {detail}")]
    AlreadyPrepared {
        /// The drive.
        device: String,
        /// Its filesystem and mount point.
        detail: String,
    },
    /// The drive is being prepared now.
    #[error("{device} is being prepared now")]
    Preparing {
        /// The drive.
        device: String,
    },
    /// The drive is a prepared drive that vanished.
    #[error("{device} is missing (a prepared drive that vanished); reconnect it or replace it")]
    Missing {
        /// The drive.
        device: String,
    },
    /// The agent could not read the drive, so cannot tell whether it is blank.
    #[error("refusing to prepare {device}: the agent cannot read it ({reason})")]
    Unreadable {
        /// The drive.
        device: String,
        /// Why.
        reason: String,
    },
    /// A self-test was asked of a drive without SMART.
    #[error("{device} has no SMART ({reason}); it cannot run a self-test")]
    NoSmart {
        /// The drive.
        device: String,
        /// Why, as the agent said.
        reason: String,
    },
    /// The node did not answer in time.
    #[error("node {node} did not answer the {what} command for {device} within {secs} s; check `shoalctl drives list`")]
    Timeout {
        /// The node.
        node: NodeId,
        /// The drive.
        device: String,
        /// `prepare` or `self-test`.
        what: &'static str,
        /// How long the controller waited.
        secs: u64,
    },
    /// The node's connection closed before it answered.
    #[error(
        "the connection to node {node} closed before it answered the {what} command for {device}; it may or may not \
         have run: check `shoalctl drives list`"
    )]
    Disconnected {
        /// The node.
        node: NodeId,
        /// The drive.
        device: String,
        /// `prepare` or `self-test`.
        what: &'static str,
    },
    /// The controller's store failed while checking the request.
    #[error("controller storage: {0}")]
    Store(String),
    /// The agent tried and failed, or refused.
    #[error("node {node} could not {what} {device}: {message}")]
    Agent {
        /// The node.
        node: NodeId,
        /// The drive.
        device: String,
        /// `prepare` or `self-test`.
        what: &'static str,
        /// The agent's words.
        message: String,
    },
}

/// The prepare action to send for `drive`, or why not. `verdict` is the verdict applying to the
/// drive ([`FleetDrives::verdict`]).
pub fn check_prepare(
    drive: &Drive,
    verdict: Option<&Verdict>,
    req: &PrepareRequest,
) -> Result<DriveAction, CommandError> {
    let device = drive.name.clone();
    if req.force != req.serial.is_some() {
        return Err(CommandError::ForceNeedsSerial);
    }
    if let Some(Verdict::Failing(reasons)) = verdict {
        let reasons = reasons
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Err(CommandError::Failing { device, reasons });
    }
    match &drive.state {
        DriveState::Blank | DriveState::AwaitingApproval | DriveState::PrepareFailed { .. } => {}
        DriveState::HasData { signatures } => {
            let signatures = signatures.join(", ");
            let Some(actual) = drive.serial.clone() else {
                return Err(CommandError::NoSerial { device, signatures });
            };
            match &req.serial {
                None => {
                    return Err(CommandError::HasData {
                        device,
                        signatures,
                        serial: actual,
                    })
                }
                Some(given) if given.trim() != actual.trim() => {
                    return Err(CommandError::SerialMismatch {
                        device,
                        given: given.clone(),
                        actual,
                        signatures,
                    })
                }
                Some(_) => {}
            }
        }
        DriveState::Prepared(p) => {
            return Err(CommandError::AlreadyPrepared {
                device,
                detail: p.to_string(),
            })
        }
        DriveState::Preparing => return Err(CommandError::Preparing { device }),
        DriveState::Missing(_) => return Err(CommandError::Missing { device }),
        DriveState::Unreadable { reason } => {
            return Err(CommandError::Unreadable {
                device,
                reason: reason.clone(),
            })
        }
    }
    Ok(DriveAction::Prepare {
        force_serial: if req.force { req.serial.clone() } else { None },
        filesystem: req.filesystem,
    })
}

/// The self-test action to send for `drive`, or why not: a drive that said it has no SMART cannot
/// run one (a failed or pending read is left to the agent to try).
pub fn check_self_test(drive: &Drive, kind: SelfTestKind) -> Result<DriveAction, CommandError> {
    match &drive.smart {
        Some(SmartOutcome::NoSmart { reason }) => Err(CommandError::NoSmart {
            device: drive.name.clone(),
            reason: reason.clone(),
        }),
        _ => Ok(DriveAction::SelfTest(kind)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::drives::{Counter, Reason};
    use shoal_proto::Filesystem;
    use shoal_proto::{AtaPredictors, DriveProtocol, SmartExitStatus, SmartReport};

    const H: u64 = 3_600_000;

    fn node() -> NodeId {
        NodeId("n1".into())
    }

    fn drive(name: &str, serial: Option<&str>, state: DriveState) -> Drive {
        Drive {
            name: name.into(),
            model: Some("Disk".into()),
            serial: serial.map(str::to_owned),
            size_bytes: 1 << 30,
            removable: false,
            state,
            smart: None,
            smart_at: None,
        }
    }

    fn prepared(partition: &str) -> PreparedDrive {
        PreparedDrive {
            partition: partition.into(),
            filesystem: Filesystem::Ext4,
            fs_uuid: "u-1".into(),
            label: "shoal-1".into(),
            mount_point: "/var/lib/shoal/drives/u-1".into(),
        }
    }

    fn smart(pending: u64, health: bool, self_test: Option<SelfTestStatus>) -> SmartOutcome {
        SmartOutcome::Report(SmartReport {
            device: "/dev/sdb".into(),
            protocol: DriveProtocol::Ata,
            model: Some("Disk".into()),
            serial: Some("S1".into()),
            firmware: None,
            capacity_bytes: Some(1 << 30),
            temperature_celsius: Some(30),
            power_on_hours: Some(100),
            health_passed: Some(health),
            exit_status: SmartExitStatus(0),
            predictors: SmartPredictors::Ata(AtaPredictors {
                reallocated_sectors: Some(0),
                pending_sectors: Some(pending),
                ..Default::default()
            }),
            self_test,
        })
    }

    fn with_smart(mut d: Drive, outcome: SmartOutcome, hours: u64) -> Drive {
        d.smart = Some(outcome);
        d.smart_at = Some(UnixMillis(hours * H));
        d
    }

    fn report(drives: Vec<Drive>) -> DriveReport {
        DriveReport {
            at: UnixMillis(0),
            drives,
        }
    }

    fn kinds(changes: &[DriveChange]) -> Vec<EventKind> {
        changes.iter().map(DriveChange::kind).collect()
    }

    #[test]
    fn a_drives_history_is_its_samples_oldest_first_bounded_and_kept_through_a_failed_read() {
        let mut book = FleetDrives::load(
            FleetDrivesConfig {
                history: HistoryConfig {
                    window_ms: 100 * H,
                    max_samples: 4,
                },
                ..Default::default()
            },
            vec![],
            vec![],
        )
        .0;
        assert!(book.history(&node(), "sdb").is_empty(), "no report yet");
        for hour in 1..=6u64 {
            let d = with_smart(
                drive("sdb", Some("S1"), DriveState::Blank),
                smart(hour, true, None),
                hour,
            );
            book.ingest(&node(), report(vec![d]), UnixMillis(hour * H));
        }
        let pending = |h: Vec<&SmartSample>| -> Vec<(u64, Option<u64>)> {
            h.iter()
                .map(|s| {
                    let SmartPredictors::Ata(a) = &s.report.predictors else {
                        unreachable!()
                    };
                    (s.at.0 / H, a.pending_sectors)
                })
                .collect()
        };
        assert_eq!(
            pending(book.history(&node(), "sdb")),
            [(3, Some(3)), (4, Some(4)), (5, Some(5)), (6, Some(6))],
            "the newest four, oldest first"
        );
        assert!(book.history(&node(), "sdc").is_empty(), "no such drive");
        // The next read fails: the chart still shows the drive's history.
        let mut failed = drive("sdb", Some("S1"), DriveState::Blank);
        failed.smart = Some(SmartOutcome::Failed {
            reason: "smartctl timed out".into(),
        });
        book.ingest(&node(), report(vec![failed]), UnixMillis(7 * H));
        assert_eq!(pending(book.history(&node(), "sdb")).len(), 4);
        book.forget(&node());
        assert!(book.history(&node(), "sdb").is_empty());
    }

    #[test]
    fn a_node_reporting_new_serials_every_time_keeps_a_bounded_history() {
        let mut book = FleetDrives::default();
        // One drive that stays, and 64 drives with serial numbers never seen before in every
        // report.
        let keeper = |round: u64| {
            let SmartOutcome::Report(mut r) = smart(0, true, None) else {
                unreachable!()
            };
            r.serial = Some("KEEP".into());
            with_smart(
                drive("sda", Some("KEEP"), DriveState::Blank),
                SmartOutcome::Report(r),
                round + 1,
            )
        };
        let mut forgotten = 0;
        for round in 0..80u64 {
            let mut drives = vec![keeper(round)];
            drives.extend((0..64).map(|k| {
                let serial = format!("S{round}-{k}");
                let SmartOutcome::Report(mut r) = smart(0, true, None) else {
                    unreachable!()
                };
                r.serial = Some(serial.clone());
                r.device = format!("/dev/sd{k}");
                with_smart(
                    drive(&format!("sd{k}"), Some(&serial), DriveState::Blank),
                    SmartOutcome::Report(r),
                    round + 1,
                )
            }));
            let ingested = book.ingest(&node(), report(drives), UnixMillis(round));
            forgotten += ingested.forgotten.len();
            assert!(
                book.history_count(&node()) <= MAX_HISTORIES_PER_NODE,
                "round {round}: {}",
                book.history_count(&node())
            );
        }
        assert_eq!(book.history_count(&node()), MAX_HISTORIES_PER_NODE);
        assert_eq!(
            forgotten,
            1 + 80 * 64 - MAX_HISTORIES_PER_NODE,
            "every key past the bound was handed back"
        );
        // The drive in every report, and the newest drives, still have their history.
        let SmartOutcome::Report(mut r) = smart(0, true, None) else {
            unreachable!()
        };
        r.serial = Some("KEEP".into());
        assert_eq!(book.sample_count(&node(), &drive_key(&r)), 80);
        r.serial = Some("S79-0".into());
        assert_eq!(book.sample_count(&node(), &drive_key(&r)), 1);
        r.serial = Some("S0-0".into());
        assert_eq!(
            book.sample_count(&node(), &drive_key(&r)),
            0,
            "the oldest went first"
        );
    }

    #[test]
    fn first_report_announces_every_drive_and_a_same_report_nothing() {
        let r = report(vec![
            drive(
                "sda",
                Some("A"),
                DriveState::HasData {
                    signatures: vec!["gpt".into()],
                },
            ),
            drive("sdb", Some("B"), DriveState::Blank),
        ]);
        let changes = diff(None, &r);
        assert_eq!(
            kinds(&changes),
            [
                EventKind::Drives(DriveEvent::Appeared),
                EventKind::Drives(DriveEvent::Appeared)
            ]
        );
        assert_eq!(
            changes[0].to_string(),
            "drive sda appeared: Disk (serial A), 1073741824 bytes, has-data (gpt)"
        );
        assert!(diff(Some(&r), &r).is_empty());
    }

    #[test]
    fn state_transitions_become_events() {
        let blank = report(vec![drive("sdb", Some("B"), DriveState::AwaitingApproval)]);
        let preparing = report(vec![drive("sdb", Some("B"), DriveState::Preparing)]);
        let failed = report(vec![drive(
            "sdb",
            Some("B"),
            DriveState::PrepareFailed {
                reason: "mkfs.xfs not found".into(),
            },
        )]);
        let done = report(vec![drive(
            "sdb",
            Some("B"),
            DriveState::Prepared(prepared("sdb1")),
        )]);
        let missing = report(vec![drive(
            "sdb",
            Some("B"),
            DriveState::Missing(prepared("sdb1")),
        )]);

        assert!(diff(Some(&blank), &preparing).is_empty());
        let c = diff(Some(&preparing), &failed);
        assert_eq!(kinds(&c), [EventKind::Drives(DriveEvent::PrepareFailed)]);
        assert_eq!(
            c[0].to_string(),
            "preparing drive sdb (serial B) failed: mkfs.xfs not found"
        );
        assert!(diff(Some(&failed), &failed).is_empty());
        let c = diff(Some(&preparing), &done);
        assert_eq!(
            c,
            [DriveChange::Prepared {
                device: "sdb".into(),
                serial: Some("B".into()),
                prepared: prepared("sdb1")
            }]
        );
        assert!(!c[0].is_alarm());

        let c = diff(Some(&done), &missing);
        assert_eq!(kinds(&c), [EventKind::Drives(DriveEvent::Missing)]);
        assert!(c[0].is_alarm());
        assert_eq!(
            c[0].to_string(),
            "PREPARED DRIVE MISSING: sdb (serial B) vanished; it held sdb1 ext4 (UUID u-1, label shoal-1) on \
             /var/lib/shoal/drives/u-1, and the mount was detached"
        );
        assert!(diff(Some(&missing), &missing).is_empty());
        let c = diff(Some(&missing), &done);
        assert_eq!(kinds(&c), [EventKind::Drives(DriveEvent::Appeared)]);
        assert!(matches!(c[0], DriveChange::Returned { .. }));
    }

    #[test]
    fn removals_and_replacements() {
        let two = report(vec![
            drive("sdb", Some("B"), DriveState::Blank),
            drive("sdc", Some("C"), DriveState::Prepared(prepared("sdc1"))),
        ]);
        // sdb pulled; sdc vanished from the report entirely: a prepared drive gone is missing.
        let c = diff(Some(&two), &report(vec![]));
        assert_eq!(
            c[0],
            DriveChange::Removed {
                device: "sdb".into(),
                serial: Some("B".into()),
                last_state: "blank"
            }
        );
        assert_eq!(
            kinds(&c),
            [
                EventKind::Drives(DriveEvent::Removed),
                EventKind::Drives(DriveEvent::Missing)
            ]
        );
        assert_eq!(c[0].to_string(), "drive sdb (serial B) removed (was blank)");

        // Another drive in sdb's place: the old one left, a new one came.
        let swapped = report(vec![
            drive("sdb", Some("X"), DriveState::Blank),
            drive("sdc", Some("C"), DriveState::Prepared(prepared("sdc1"))),
        ]);
        let c = diff(Some(&two), &swapped);
        assert_eq!(
            kinds(&c),
            [
                EventKind::Drives(DriveEvent::Removed),
                EventKind::Drives(DriveEvent::Appeared)
            ]
        );

        // A drive that first shows up missing (the agent restarted after it vanished) is raised
        // too.
        let c = diff(
            None,
            &report(vec![drive(
                "sdd",
                Some("D"),
                DriveState::Missing(prepared("sdd1")),
            )]),
        );
        assert_eq!(kinds(&c), [EventKind::Drives(DriveEvent::Missing)]);
    }

    #[test]
    fn self_test_completion_is_reported_once() {
        let running = SelfTestStatus::Running {
            kind: Some(SelfTestKind::Short),
            remaining_percent: Some(60),
        };
        let passed = SelfTestStatus::Completed {
            kind: Some(SelfTestKind::Short),
            passed: true,
            result: "Completed without error".into(),
            power_on_hours: Some(100),
        };
        let failed = SelfTestStatus::Completed {
            kind: Some(SelfTestKind::Long),
            passed: false,
            result: "Completed: read failure".into(),
            power_on_hours: Some(120),
        };
        let at = |st: Option<SelfTestStatus>, h| {
            report(vec![with_smart(
                drive("sdb", Some("S1"), DriveState::Blank),
                smart(0, true, st),
                h,
            )])
        };
        let c = diff(
            Some(&at(Some(running.clone()), 1)),
            &at(Some(passed.clone()), 2),
        );
        assert_eq!(
            c,
            [DriveChange::SelfTestCompleted {
                device: "sdb".into(),
                serial: Some("S1".into()),
                kind: Some(SelfTestKind::Short),
                passed: true,
                result: "Completed without error".into()
            }]
        );
        assert!(!c[0].is_alarm());
        assert!(diff(
            Some(&at(Some(passed.clone()), 2)),
            &at(Some(passed.clone()), 3)
        )
        .is_empty());
        // A test run between two reads (never seen running) still counts once the log's newest
        // entry changes.
        let c = diff(Some(&at(Some(passed.clone()), 3)), &at(Some(failed), 4));
        assert_eq!(
            kinds(&c),
            [EventKind::Drives(DriveEvent::SelfTestCompleted)]
        );
        assert!(c[0].is_alarm());
        assert_eq!(
            c[0].to_string(),
            "drive sdb (serial S1) long self-test FAILED: Completed: read failure"
        );
        // The first SMART read of a drive shows an old log entry: not news.
        let unread = report(vec![drive("sdb", Some("S1"), DriveState::Blank)]);
        assert!(diff(Some(&unread), &at(Some(passed), 1)).is_empty());
    }

    #[test]
    fn verdict_changes_only_on_new_samples_and_level_changes() {
        let mut book = FleetDrives::default();
        let d = |pending, health, h| {
            report(vec![with_smart(
                drive("sdb", Some("S1"), DriveState::Blank),
                smart(pending, health, None),
                h,
            )])
        };
        let i = book.ingest(&node(), d(0, true, 1), UnixMillis(1));
        assert_eq!(kinds(&i.changes), [EventKind::Drives(DriveEvent::Appeared)]);
        assert_eq!(i.samples.len(), 1);
        assert_eq!(i.samples[0].key, "serial:Disk/S1");
        // The same SMART read sent again with another change: no new sample.
        assert!(book
            .ingest(&node(), d(0, true, 1), UnixMillis(2))
            .samples
            .is_empty());
        let i = book.ingest(&node(), d(8, true, 2), UnixMillis(3));
        assert_eq!(i.samples.len(), 1);
        assert_eq!(
            i.changes,
            [DriveChange::VerdictChanged {
                device: "sdb".into(),
                serial: Some("S1".into()),
                from: Some("ok"),
                to: Verdict::Warning(vec![Reason::CounterRose {
                    counter: Counter::Pending,
                    from: 0,
                    to: 8
                }])
            }]
        );
        assert_eq!(i.changes[0].to_string(), "drive sdb (serial S1) SMART verdict ok -> warning: pending sectors (ATA 197) rose by 8 (0 -> 8)");
        // Still warning: no event.
        assert!(book
            .ingest(&node(), d(8, true, 3), UnixMillis(4))
            .changes
            .is_empty());
        let i = book.ingest(&node(), d(8, false, 4), UnixMillis(5));
        assert_eq!(
            kinds(&i.changes),
            [EventKind::Drives(DriveEvent::VerdictChanged)]
        );
        assert!(i.changes[0].is_alarm());
        let drive = book.drive(&node(), "sdb").unwrap().clone();
        assert_eq!(
            book.verdict(&node(), &drive).unwrap().verdict.as_str(),
            "failing"
        );

        // The next read fails: the failing verdict still applies.
        let mut failed = drive.clone();
        failed.smart = Some(SmartOutcome::Failed {
            reason: "smartctl timed out".into(),
        });
        book.ingest(&node(), report(vec![failed.clone()]), UnixMillis(6));
        assert_eq!(
            book.verdict(&node(), &failed).unwrap().verdict.as_str(),
            "failing"
        );
        let v = &book.views(None)[0];
        assert_eq!(
            (v.smart.verdict.as_str(), v.smart.status.as_str()),
            ("failing", "failed")
        );
    }

    #[test]
    fn a_first_verdict_that_is_not_ok_is_an_event() {
        let mut book = FleetDrives::default();
        let i = book.ingest(
            &node(),
            report(vec![with_smart(
                drive("sdb", Some("S1"), DriveState::Blank),
                smart(0, false, None),
                1,
            )]),
            UnixMillis(1),
        );
        assert_eq!(
            kinds(&i.changes),
            [
                EventKind::Drives(DriveEvent::Appeared),
                EventKind::Drives(DriveEvent::VerdictChanged)
            ]
        );
        assert!(i.changes[1]
            .to_string()
            .contains("verdict unknown -> failing: overall health self-assessment FAILED"));
    }

    #[test]
    fn loading_replays_history_and_reports_stale_samples() {
        let config = FleetDrivesConfig {
            history: HistoryConfig {
                window_ms: 24 * H,
                max_samples: 100,
            },
            ..Default::default()
        };
        let sample = |pending, h| StoredSample {
            device: "sdb".into(),
            sample: SmartSample {
                at: UnixMillis(h * H),
                report: match smart(pending, true, None) {
                    SmartOutcome::Report(r) => r,
                    _ => unreachable!(),
                },
            },
        };
        let key = "serial:Disk/S1".to_owned();
        let samples = vec![
            (node(), key.clone(), sample(0, 30)),
            (node(), key.clone(), sample(0, 1)), // older than the window relative to the newest
            (node(), key.clone(), sample(4, 31)),
        ];
        let latest = report(vec![with_smart(
            drive("sdb", Some("S1"), DriveState::Blank),
            smart(4, true, None),
            31,
        )]);
        let (book, stale) = FleetDrives::load(
            config,
            vec![(
                node(),
                StoredReport {
                    received_at: UnixMillis(9),
                    report: latest,
                },
            )],
            samples,
        );
        assert_eq!(stale, [(node(), key.clone(), UnixMillis(H))]);
        assert_eq!(book.sample_count(&node(), &key), 2);
        let v = book.views(None);
        assert_eq!(v[0].smart.verdict, "warning");
        assert_eq!(
            v[0].smart.reasons,
            ["pending sectors (ATA 197) rose by 4 (0 -> 4)"]
        );
        assert_eq!(v[0].updated_at, rfc3339(9));
    }

    #[test]
    fn views_say_plainly_what_they_know() {
        let mut book = FleetDrives::default();
        let mut lo = drive(
            "loop0",
            None,
            DriveState::HasData {
                signatures: vec!["ext4".into()],
            },
        );
        lo.smart = Some(SmartOutcome::NoSmart {
            reason: "loop device has no SMART".into(),
        });
        let done = drive("sdc", Some("C"), DriveState::Prepared(prepared("sdc1")));
        let sdb = with_smart(
            drive("sdb", Some("S1"), DriveState::Blank),
            smart(
                0,
                true,
                Some(SelfTestStatus::Running {
                    kind: Some(SelfTestKind::Long),
                    remaining_percent: Some(90),
                }),
            ),
            1,
        );
        book.ingest(&node(), report(vec![lo, done, sdb]), UnixMillis(1_000));
        let v = book.views(Some(&node()));
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json[0]["smart"]["status"], "no-smart");
        assert_eq!(json[0]["smart"]["verdict"], "unknown");
        assert_eq!(json[0]["smart"]["reason"], "loop device has no SMART");
        assert_eq!(
            json[0]["state_detail"],
            serde_json::json!({"signatures": ["ext4"]})
        );
        assert_eq!(json[1]["state"], "prepared");
        assert_eq!(
            json[1]["state_detail"]["mount_point"],
            "/var/lib/shoal/drives/u-1"
        );
        assert_eq!(json[1]["state_detail"]["fs_uuid"], "u-1");
        assert_eq!(json[1]["state_detail"]["filesystem"], "ext4");
        assert_eq!(json[1]["smart"]["status"], "pending");
        assert_eq!(json[2]["smart"]["verdict"], "ok");
        assert_eq!(json[2]["smart"]["protocol"], "ata");
        assert_eq!(json[2]["smart"]["predictors"]["pending_sectors"], 0);
        assert_eq!(json[2]["smart"]["self_test"]["state"], "running");
        assert_eq!(json[2]["smart"]["self_test"]["remaining_percent"], 90);
        assert_eq!(json[2]["state_detail"], serde_json::Value::Null);
        let keys: Vec<&String> = json[2].as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "device",
                "model",
                "node",
                "serial",
                "size_bytes",
                "smart",
                "state",
                "state_detail",
                "updated_at"
            ]
        );
        let smart_keys: Vec<&String> = json[2]["smart"].as_object().unwrap().keys().collect();
        assert_eq!(
            smart_keys,
            [
                "at",
                "health_passed",
                "power_on_hours",
                "predictors",
                "protocol",
                "reason",
                "reasons",
                "self_test",
                "status",
                "temperature_celsius",
                "verdict"
            ]
        );
        assert!(book.views(Some(&NodeId("other".into()))).is_empty());
    }

    fn prepare(force: bool, serial: Option<&str>) -> PrepareRequest {
        PrepareRequest {
            force,
            serial: serial.map(str::to_owned),
            filesystem: None,
        }
    }

    #[test]
    fn prepare_is_allowed_on_blank_awaiting_and_failed_drives() {
        for state in [
            DriveState::Blank,
            DriveState::AwaitingApproval,
            DriveState::PrepareFailed { reason: "x".into() },
        ] {
            let d = drive("sdb", Some("B"), state);
            assert_eq!(
                check_prepare(
                    &d,
                    Some(&Verdict::Ok),
                    &PrepareRequest {
                        filesystem: Some(Filesystem::Xfs),
                        ..prepare(false, None)
                    }
                ),
                Ok(DriveAction::Prepare {
                    force_serial: None,
                    filesystem: Some(Filesystem::Xfs)
                })
            );
        }
        let warning = Verdict::Warning(vec![Reason::TooHot {
            celsius: 61,
            limit: 60,
        }]);
        assert!(check_prepare(
            &drive("sdb", None, DriveState::Blank),
            Some(&warning),
            &prepare(false, None)
        )
        .is_ok());
    }

    #[test]
    fn a_drive_with_data_needs_force_and_its_serial() {
        let d = drive(
            "sdb",
            Some("WD-123"),
            DriveState::HasData {
                signatures: vec!["gpt".into(), "ext4".into()],
            },
        );
        let e = check_prepare(&d, None, &prepare(false, None)).unwrap_err();
        assert_eq!(e.to_string(), "refusing to prepare sdb: it holds data (gpt, ext4); to erase it, run again with --force --serial WD-123");
        assert_eq!(
            check_prepare(&d, None, &prepare(true, None)),
            Err(CommandError::ForceNeedsSerial)
        );
        assert_eq!(
            check_prepare(&d, None, &prepare(false, Some("WD-123"))),
            Err(CommandError::ForceNeedsSerial)
        );
        let e = check_prepare(&d, None, &prepare(true, Some("WD-124"))).unwrap_err();
        assert!(matches!(e, CommandError::SerialMismatch { .. }));
        assert!(
            e.to_string().contains(
                "--serial WD-124 does not match its serial number WD-123; it holds gpt, ext4"
            ),
            "{e}"
        );
        assert_eq!(
            check_prepare(&d, None, &prepare(true, Some("WD-123"))),
            Ok(DriveAction::Prepare {
                force_serial: Some("WD-123".into()),
                filesystem: None
            })
        );
        let anonymous = drive(
            "loop0",
            None,
            DriveState::HasData {
                signatures: vec!["xfs".into()],
            },
        );
        assert!(matches!(
            check_prepare(&anonymous, None, &prepare(true, Some("x"))),
            Err(CommandError::NoSerial { .. })
        ));
    }

    #[test]
    fn a_failing_drive_is_never_prepared() {
        let failing = Verdict::Failing(vec![Reason::HealthCheckFailed]);
        for state in [
            DriveState::Blank,
            DriveState::AwaitingApproval,
            DriveState::HasData {
                signatures: vec!["gpt".into()],
            },
        ] {
            let d = drive("sdb", Some("B"), state);
            let e = check_prepare(&d, Some(&failing), &prepare(true, Some("B"))).unwrap_err();
            assert_eq!(e.to_string(), "refusing to prepare sdb: its SMART verdict is failing (overall health self-assessment FAILED); replace the drive");
        }
    }

    #[test]
    fn prepared_preparing_missing_and_unreadable_drives_are_refused() {
        let check = |state| {
            check_prepare(
                &drive("sdb", Some("B"), state),
                None,
                &prepare(true, Some("B")),
            )
            .unwrap_err()
        };
        assert!(check(DriveState::Prepared(prepared("sdb1")))
            .to_string()
            .starts_with("sdb is already prepared: sdb1 ext4"));
        assert_eq!(
            check(DriveState::Preparing),
            CommandError::Preparing {
                device: "sdb".into()
            }
        );
        assert_eq!(
            check(DriveState::Missing(prepared("sdb1"))),
            CommandError::Missing {
                device: "sdb".into()
            }
        );
        assert!(matches!(
            check(DriveState::Unreadable {
                reason: "EIO".into()
            }),
            CommandError::Unreadable { .. }
        ));
    }

    #[test]
    fn self_tests_need_smart() {
        let mut d = drive("vda", None, DriveState::Blank);
        assert_eq!(
            check_self_test(&d, SelfTestKind::Short),
            Ok(DriveAction::SelfTest(SelfTestKind::Short))
        );
        d.smart = Some(SmartOutcome::NoSmart {
            reason: "virtio device has no SMART".into(),
        });
        assert_eq!(
            check_self_test(&d, SelfTestKind::Long)
                .unwrap_err()
                .to_string(),
            "vda has no SMART (virtio device has no SMART); it cannot run a self-test"
        );
    }
}
