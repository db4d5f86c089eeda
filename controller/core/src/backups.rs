//! Backup jobs: what a job is, when a node owes a backup or a verification, what a result changes,
//! and what the fleet report says about a job. Sans-IO: every question takes `now`.
//!
//! # Scheduling
//! A job has a backup schedule and a verification schedule (five-field cron in a time zone, the
//! language of maintenance windows). For each node the job selects, the controller keeps the latest
//! firing it has *satisfied* (a task for it finished, well or not). A node owes a task when a
//! firing later than that is in the past: a node that was down, in maintenance or outside the job's
//! window at the firing owes it until it can run it, once (missed firings are caught up by one run,
//! not one run each). The state is in the store, so this survives a controller restart.
//!
//! # Verification
//! Every backup task verifies the snapshot it made; verification tasks verify the newest snapshot
//! of each target on their own schedule. Each verification reads the next `K/N` of the repository's
//! data (`N` = the job's check period in verifications, default 7, so daily verification reads
//! every pack within a week).

use std::{collections::BTreeMap, time::Duration};

use croner::Cron;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};
use shoal_proto::{
    BackupResult, BackupStats, Retention, SnapshotInfo, SnapshotSample, UnixMillis, VerifyStats,
    MAX_BACKUP_PATHS, MAX_JOB_TARGETS, MAX_SAMPLE_FILES,
};

use crate::{
    selector::{parse_selector, valid_name, Selector, SelectorError},
    windows::{parse_schedule, parse_tz, WindowError},
};

crate::event_kinds! {
    /// What backups log.
    pub enum BackupEvent {
        /// A target, a job or a controller backup setting was created or deleted.
        BackupConfigChanged => "backup_config_changed",
        /// A backup finished on a target (with its snapshot and bytes added).
        BackupSucceeded => "backup_succeeded",
        /// A backup or verification could not run on a target, or a task could not start.
        BackupFailed => "backup_failed",
        /// A restore verification passed.
        BackupVerified => "backup_verified",
        /// A restore verification found damage: sampled files that did not restore intact or a
        /// failed repository check.
        BackupVerifyFailed => "backup_verify_failed",
        /// A restore ended (restored or not).
        BackupRestored => "backup_restored",
    }
}

/// How old the newest passed verification of a job may get before the report names it.
pub const DEFAULT_VERIFY_MAX_AGE: Duration = Duration::from_secs(26 * 3600);
/// Verifications over which every pack is read once.
pub const DEFAULT_CHECK_PERIOD: u32 = 7;
/// Files sampled for restore verification.
pub const DEFAULT_SAMPLE_FILES: u32 = 32;
/// When verification runs unless `--verify-schedule` says otherwise.
pub const DEFAULT_VERIFY_SCHEDULE: &str = "@daily";
/// How many firings [`Schedule::latest_due`] walks before it settles for `now`.
const MAX_WALK: usize = 20_000;

/// Why a job or target definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackupDefError {
    /// A name does not fit `[a-z0-9][a-z0-9-]{0,30}`.
    #[error("name {0:?} is not allowed: use 1 to 31 of a-z, 0-9 and '-', not starting with '-'")]
    BadName(String),
    /// A schedule or time zone is not valid.
    #[error(transparent)]
    Schedule(#[from] WindowError),
    /// The selector does not parse.
    #[error(transparent)]
    BadSelector(#[from] SelectorError),
    /// No path, or a path that is not absolute.
    #[error("{0}")]
    BadPath(String),
    /// No target, too many, or one named twice.
    #[error("{0}")]
    BadTargets(String),
    /// A number out of range.
    #[error("{0}")]
    OutOfRange(String),
    /// The URL is not one of restic's repository forms.
    #[error("{0}")]
    BadUrl(String),
}

/// A five-field cron schedule read in a time zone.
#[derive(Clone)]
pub struct Schedule {
    cron: Cron,
    tz: TimeZone,
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedule").finish_non_exhaustive()
    }
}

impl Schedule {
    /// Parses `spec` in time zone `tz`.
    pub fn new(spec: &str, tz: &str) -> Result<Schedule, WindowError> {
        Ok(Schedule {
            cron: parse_schedule(spec)?,
            tz: parse_tz(tz)?,
        })
    }

    /// Firings strictly after `from`.
    fn firings_after(&self, from: UnixMillis) -> impl Iterator<Item = UnixMillis> + '_ {
        let start = i64::try_from(from.0)
            .ok()
            .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
            .map(|ts| ts.to_zoned(self.tz.clone()));
        start
            .into_iter()
            .flat_map(move |z| self.cron.iter_after(z))
            .map_while(|z| {
                u64::try_from(z.timestamp().as_millisecond())
                    .ok()
                    .map(UnixMillis)
            })
    }

    /// The first firing after `after`.
    pub fn next_after(&self, after: UnixMillis) -> Option<UnixMillis> {
        self.firings_after(after).next()
    }

    /// The latest firing in `(after, now]`, if any: what a node owes. A schedule that fired more
    /// than a few thousand times since `after` is owed as of `now`.
    pub fn latest_due(&self, after: UnixMillis, now: UnixMillis) -> Option<UnixMillis> {
        let mut latest = None;
        for (i, t) in self.firings_after(after).enumerate() {
            if t > now {
                return latest;
            }
            if i >= MAX_WALK {
                return Some(now);
            }
            latest = Some(t);
        }
        latest
    }
}

/// A backup job as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job's name.
    pub name: String,
    /// Which nodes (a label selector, in the compatible stored form of [`crate::selector`]);
    /// `None` selects every node.
    pub selector: Option<Selector>,
    /// What to back up (absolute paths).
    pub paths: Vec<String>,
    /// restic `--exclude` patterns.
    pub excludes: Vec<String>,
    /// When to back up.
    pub schedule: String,
    /// When to verify, besides after every backup.
    pub verify_schedule: String,
    /// The IANA time zone both schedules are read in.
    pub tz: String,
    /// Where to write, in order.
    pub targets: Vec<String>,
    /// Keep rules.
    pub retention: Retention,
    /// A maintenance window outside which the job does not start.
    pub window: Option<String>,
    /// How old the newest passed verification may get (seconds).
    pub verify_max_age_secs: u64,
    /// Verifications over which every pack is read.
    pub check_period: u32,
    /// Files sampled per verification.
    pub sample_files: u32,
    /// When the job was created: nothing before it is owed.
    pub created_at: UnixMillis,
}

/// A job with its schedules parsed.
#[derive(Debug, Clone)]
pub struct Job {
    record: JobRecord,
    backup: Schedule,
    verify: Schedule,
}

/// What `backup job create` asks for, before validation.
#[derive(Debug, Clone, Default)]
pub struct JobSpec {
    /// Name.
    pub name: String,
    /// A label selector ([`crate::selector`]).
    pub selector: Option<String>,
    /// Paths.
    pub paths: Vec<String>,
    /// Excludes.
    pub excludes: Vec<String>,
    /// Backup schedule.
    pub schedule: String,
    /// Verification schedule (default [`DEFAULT_VERIFY_SCHEDULE`]).
    pub verify_schedule: Option<String>,
    /// Time zone (default UTC).
    pub tz: Option<String>,
    /// Targets.
    pub targets: Vec<String>,
    /// Retention.
    pub retention: Retention,
    /// Window.
    pub window: Option<String>,
    /// Verification age limit (default [`DEFAULT_VERIFY_MAX_AGE`]).
    pub verify_max_age: Option<Duration>,
    /// Check period (default [`DEFAULT_CHECK_PERIOD`]).
    pub check_period: Option<u32>,
    /// Sample size (default [`DEFAULT_SAMPLE_FILES`]).
    pub sample_files: Option<u32>,
}

impl Job {
    /// Validates a new job.
    pub fn new(spec: JobSpec, now: UnixMillis) -> Result<Job, BackupDefError> {
        let selector = spec.selector.as_deref().map(parse_selector).transpose()?;
        Job::from_record(JobRecord {
            name: spec.name,
            selector,
            paths: spec.paths,
            excludes: spec.excludes,
            schedule: spec.schedule.trim().to_owned(),
            verify_schedule: spec
                .verify_schedule
                .unwrap_or_else(|| DEFAULT_VERIFY_SCHEDULE.to_owned())
                .trim()
                .to_owned(),
            tz: spec
                .tz
                .unwrap_or_else(|| "UTC".to_owned())
                .trim()
                .to_owned(),
            targets: spec.targets,
            retention: spec.retention,
            window: spec.window,
            verify_max_age_secs: spec
                .verify_max_age
                .unwrap_or(DEFAULT_VERIFY_MAX_AGE)
                .as_secs(),
            check_period: spec.check_period.unwrap_or(DEFAULT_CHECK_PERIOD),
            sample_files: spec.sample_files.unwrap_or(DEFAULT_SAMPLE_FILES),
            created_at: now,
        })
    }

    /// Parses a stored job.
    pub fn from_record(record: JobRecord) -> Result<Job, BackupDefError> {
        if !valid_name(&record.name) {
            return Err(BackupDefError::BadName(record.name));
        }
        if record.paths.is_empty() {
            return Err(BackupDefError::BadPath(
                "a job needs at least one --path".into(),
            ));
        }
        if record.paths.len() > MAX_BACKUP_PATHS || record.excludes.len() > MAX_BACKUP_PATHS {
            return Err(BackupDefError::BadPath(format!(
                "at most {MAX_BACKUP_PATHS} paths and {MAX_BACKUP_PATHS} excludes"
            )));
        }
        if let Some(p) = record
            .paths
            .iter()
            .find(|p| !p.starts_with('/') || p.contains('\0'))
        {
            return Err(BackupDefError::BadPath(format!(
                "path {p:?} is not absolute"
            )));
        }
        if record.targets.is_empty() || record.targets.len() > MAX_JOB_TARGETS {
            return Err(BackupDefError::BadTargets(format!(
                "a job writes to 1 to {MAX_JOB_TARGETS} targets"
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &record.targets {
            if !seen.insert(t) {
                return Err(BackupDefError::BadTargets(format!(
                    "target {t:?} is named twice"
                )));
            }
        }
        if !(1..=366).contains(&record.check_period) {
            return Err(BackupDefError::OutOfRange(
                "--check-period is 1 to 366".into(),
            ));
        }
        if record.sample_files as usize > MAX_SAMPLE_FILES {
            return Err(BackupDefError::OutOfRange(format!(
                "--sample-files is at most {MAX_SAMPLE_FILES}"
            )));
        }
        if record.verify_max_age_secs < 60 {
            return Err(BackupDefError::OutOfRange(
                "--verify-max-age is at least 1m".into(),
            ));
        }
        let backup = Schedule::new(&record.schedule, &record.tz)?;
        let verify = Schedule::new(&record.verify_schedule, &record.tz)?;
        Ok(Job {
            record,
            backup,
            verify,
        })
    }

    /// The record to store.
    pub fn record(&self) -> &JobRecord {
        &self.record
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.record.name
    }

    /// Whether the job selects a node with these labels.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.record
            .selector
            .as_ref()
            .is_none_or(|s| s.matches(labels))
    }

    /// The backup schedule.
    pub fn backup_schedule(&self) -> &Schedule {
        &self.backup
    }

    /// What a node owes now, given its state: a backup first, then a verification. `None` while a
    /// task is in flight or nothing is owed.
    pub fn owed(&self, state: &NodeJobState, now: UnixMillis) -> Option<Owed> {
        if state.in_flight.is_some() {
            return None;
        }
        if state.pending_restore.is_some() {
            return Some(Owed {
                kind: OwedKind::Restore,
                due: now,
                requested: true,
            });
        }
        if let Some(kind) = state.requested.first() {
            return Some(Owed {
                kind: *kind,
                due: now,
                requested: true,
            });
        }
        let since = |satisfied: Option<UnixMillis>| satisfied.unwrap_or(self.record.created_at);
        if let Some(due) = self.backup.latest_due(since(state.backup_satisfied), now) {
            return Some(Owed {
                kind: OwedKind::Backup,
                due,
                requested: false,
            });
        }
        // Verifying needs something to verify.
        let has_snapshot = state.targets.values().any(|t| t.sample.is_some());
        if has_snapshot {
            if let Some(due) = self.verify.latest_due(since(state.verify_satisfied), now) {
                return Some(Owed {
                    kind: OwedKind::Verify,
                    due,
                    requested: false,
                });
            }
        }
        None
    }

    /// What the fleet report says about this job on one node: one line per problem.
    pub fn attention(&self, state: &NodeJobState, now: UnixMillis) -> Vec<String> {
        let max_age = self.record.verify_max_age_secs.saturating_mul(1000);
        let mut lines = vec![];
        for target in &self.record.targets {
            let t = state.targets.get(target);
            if let Some(err) = t.and_then(|t| t.last_error.as_ref()) {
                lines.push(format!(
                    "target {target}: {} failed: {}",
                    err.task_kind, err.message
                ));
            }
            match t.and_then(|t| t.last_verify.as_ref()) {
                Some(v) if !v.stats.passed() => lines.push(format!(
                    "target {target}: verification of snapshot {} failed: {}",
                    short_id(&v.stats.snapshot),
                    verify_problems(&v.stats)
                )),
                Some(v) if now.0.saturating_sub(v.at.0) > max_age => lines.push(format!(
                    "target {target}: last verified restore is {} old (limit {})",
                    age_text(now.0.saturating_sub(v.at.0)),
                    age_text(max_age)
                )),
                Some(_) => {}
                // A job younger than its limit has not had the chance yet.
                None if now.0.saturating_sub(self.record.created_at.0) > max_age => lines.push(
                    format!("target {target}: never verified (job is older than the limit)"),
                ),
                None => {}
            }
        }
        lines
    }

    /// The `check --read-data-subset` for the next verification of `target` on this node.
    pub fn check_subset(&self, state: &NodeJobState, target: &str) -> (u32, u32) {
        let n = self.record.check_period.max(1);
        let k = state.targets.get(target).map_or(0, |t| t.check_cursor) % n;
        (k + 1, n)
    }
}

/// What is wrong with a verification, in a line.
pub fn verify_problems(v: &VerifyStats) -> String {
    let mut parts = vec![];
    if !v.mismatches.is_empty() {
        parts.push(format!(
            "{} of {} sampled files did not restore intact ({})",
            v.mismatches.len(),
            v.files_checked,
            v.mismatches.first().map(String::as_str).unwrap_or_default()
        ));
    }
    if !v.check_ok || !v.check_errors.is_empty() {
        parts.push(format!(
            "repository check of data subset {}/{} failed ({})",
            v.check_subset.0,
            v.check_subset.1,
            v.check_errors
                .first()
                .map(String::as_str)
                .unwrap_or("no detail")
        ));
    }
    parts.join("; ")
}

/// The first eight characters of a snapshot id, as restic shows it.
pub fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// `3d4h`, `5h12m`, `40m`, `12s`.
pub fn age_text(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m) = (s / 86_400, (s / 3600) % 24, (s / 60) % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m")
    } else {
        format!("{s}s")
    }
}

/// What a node owes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OwedKind {
    /// Back up (and verify).
    Backup,
    /// Verify.
    Verify,
    /// Restore ([`NodeJobState::pending_restore`]).
    Restore,
}

/// A task a node owes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owed {
    /// What.
    pub kind: OwedKind,
    /// The firing it satisfies (`now` for a request).
    pub due: UnixMillis,
    /// An operator asked for it (`backup run`, `backup verify`).
    pub requested: bool,
}

impl Owed {
    /// Whether the task may start now. A scheduled task waits while the job's window is closed
    /// or the node is in maintenance (a rollout has it in flight), and is caught up once both
    /// allow; one an operator asked for (`backup run`, `verify`, `restore`) starts at once.
    pub fn may_start(&self, window_open: bool, in_maintenance: bool) -> bool {
        self.requested || (window_open && !in_maintenance)
    }
}

/// A task sent and not yet answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// The task id.
    pub task: String,
    /// `backup`, `verify` or `restore`.
    pub kind: String,
    /// The firing it satisfies, for scheduled tasks.
    pub due: Option<UnixMillis>,
    /// Whether it came from [`NodeJobState::requested`].
    pub requested: bool,
    /// When it was first sent.
    pub sent_at: UnixMillis,
    /// For a restore: what the agent is asked (kept to send it again on reconnect).
    pub restore: Option<RestoreRequest>,
}

/// A restore an operator asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreRequest {
    /// The target to restore from.
    pub target: String,
    /// Snapshot, `None` for the newest.
    pub snapshot: Option<String>,
    /// Paths to restore.
    pub include: Vec<String>,
    /// Where to.
    pub to: String,
}

/// The last failure on a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetError {
    /// When.
    pub at: UnixMillis,
    /// `backup` or `verify`.
    pub task_kind: String,
    /// Why.
    pub message: String,
}

/// A backup that succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRecord {
    /// When it finished.
    pub at: UnixMillis,
    /// What it wrote.
    pub stats: BackupStats,
}

/// A verification that ran (passed or not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRecord {
    /// When it finished.
    pub at: UnixMillis,
    /// What it found.
    pub stats: VerifyStats,
}

/// One node's state of one job on one target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetState {
    /// The last successful backup.
    pub last_backup: Option<BackupRecord>,
    /// The last failure; cleared by the next success of the same kind.
    pub last_error: Option<TargetError>,
    /// The last verification.
    pub last_verify: Option<VerifyRecord>,
    /// The newest snapshot and its recorded file hashes: what the next verification checks.
    pub sample: Option<SnapshotSample>,
    /// The repository's snapshots of this node and job, as last reported.
    pub snapshots: Vec<SnapshotInfo>,
    /// Verifications done: the next reads subset `cursor % N + 1`.
    pub check_cursor: u32,
    /// When subset N/N was last read: every pack had been read by then.
    pub full_read_at: Option<UnixMillis>,
}

/// One node's state of one job, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeJobState {
    /// The latest backup firing satisfied.
    pub backup_satisfied: Option<UnixMillis>,
    /// The latest verification firing satisfied.
    pub verify_satisfied: Option<UnixMillis>,
    /// Runs an operator asked for, oldest first.
    pub requested: Vec<OwedKind>,
    /// A restore an operator asked for, with its task id (known in advance so they can wait).
    pub pending_restore: Option<(String, RestoreRequest)>,
    /// The task sent and not answered.
    pub in_flight: Option<InFlight>,
    /// Per target.
    pub targets: BTreeMap<String, TargetState>,
    /// The last task's outcome, for `backup list`.
    pub last_task: Option<TaskSummary>,
}

/// How the last task ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSummary {
    /// The task.
    pub task: String,
    /// `backup`, `verify`, `restore`.
    pub kind: String,
    /// When it ended.
    pub finished_at: UnixMillis,
    /// Whether every target succeeded.
    pub ok: bool,
    /// For a restore: per target, the snapshot restored or why not.
    pub restored: Vec<(String, Result<String, String>)>,
}

/// What a result meant, for the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A backup was made.
    BackedUp {
        /// Target.
        target: String,
        /// Snapshot.
        snapshot: String,
        /// Bytes added.
        bytes_added: u64,
    },
    /// A verification passed.
    Verified {
        /// Target.
        target: String,
        /// Snapshot.
        snapshot: String,
        /// Files compared.
        files: u32,
        /// Check subset.
        subset: (u32, u32),
    },
    /// A verification found damage.
    VerifyFailed {
        /// Target.
        target: String,
        /// Snapshot.
        snapshot: String,
        /// What.
        problems: String,
    },
    /// A target failed.
    TargetFailed {
        /// Target.
        target: String,
        /// Why.
        message: String,
    },
    /// A restore ended.
    Restored {
        /// Target.
        target: String,
        /// Snapshot, or why not.
        outcome: Result<String, String>,
    },
    /// The task could not run at all.
    TaskFailed {
        /// Why.
        message: String,
    },
}

impl NodeJobState {
    /// Folds a task's result into the state; returns what it meant. A result for a task that is not
    /// the one in flight (a late repeat) still updates the targets, so nothing the agent did is
    /// lost, but does not satisfy anything.
    pub fn apply(&mut self, result: &BackupResult, now: UnixMillis) -> Vec<Finding> {
        // The same result twice (the agent sends what it keeps on every session until the
        // acknowledgement arrives, and answers a repeated task with it): once is enough.
        if self
            .last_task
            .as_ref()
            .is_some_and(|t| t.task == result.task)
        {
            return vec![];
        }
        let mut findings = vec![];
        let current = self
            .in_flight
            .as_ref()
            .filter(|f| f.task == result.task)
            .cloned();
        if let Some(flight) = &current {
            self.in_flight = None;
            if flight.requested {
                if let Some(pos) = self.requested.iter().position(|k| match k {
                    OwedKind::Backup => flight.kind == "backup",
                    OwedKind::Verify => flight.kind == "verify",
                    OwedKind::Restore => false,
                }) {
                    self.requested.remove(pos);
                }
            }
            if let Some(due) = flight.due {
                match flight.kind.as_str() {
                    "backup" => {
                        self.backup_satisfied =
                            Some(self.backup_satisfied.map_or(due, |s| s.max(due)));
                        // A backup verifies too.
                        self.verify_satisfied =
                            Some(self.verify_satisfied.map_or(due, |s| s.max(due)));
                    }
                    "verify" => {
                        self.verify_satisfied =
                            Some(self.verify_satisfied.map_or(due, |s| s.max(due)));
                    }
                    _ => {}
                }
            }
        }
        if let Some(message) = &result.error {
            findings.push(Finding::TaskFailed {
                message: message.clone(),
            });
        }
        for t in &result.targets {
            let state = self.targets.entry(t.target.clone()).or_default();
            if !t.snapshots.is_empty() || t.backup.is_some() {
                state.snapshots = t.snapshots.clone();
            }
            if let Some(b) = &t.backup {
                state.last_backup = Some(BackupRecord {
                    at: result.finished_at,
                    stats: b.clone(),
                });
                if !b.samples.is_empty() || state.sample.is_none() {
                    state.sample = Some(SnapshotSample {
                        snapshot: b.snapshot.clone(),
                        files: b.samples.clone(),
                    });
                }
                findings.push(Finding::BackedUp {
                    target: t.target.clone(),
                    snapshot: b.snapshot.clone(),
                    bytes_added: b.bytes_added,
                });
            }
            if let Some(v) = &t.verify {
                state.check_cursor = state.check_cursor.wrapping_add(1);
                if v.check_subset.0 == v.check_subset.1 && v.check_ok {
                    state.full_read_at = Some(now);
                }
                state.last_verify = Some(VerifyRecord {
                    at: result.finished_at,
                    stats: v.clone(),
                });
                if v.passed() {
                    findings.push(Finding::Verified {
                        target: t.target.clone(),
                        snapshot: v.snapshot.clone(),
                        files: v.files_checked,
                        subset: v.check_subset,
                    });
                } else {
                    findings.push(Finding::VerifyFailed {
                        target: t.target.clone(),
                        snapshot: v.snapshot.clone(),
                        problems: verify_problems(v),
                    });
                }
            }
            if result.kind == "restore" {
                continue;
            }
            match &t.error {
                Some(message) => {
                    state.last_error = Some(TargetError {
                        at: result.finished_at,
                        task_kind: result.kind.clone(),
                        message: message.clone(),
                    });
                    findings.push(Finding::TargetFailed {
                        target: t.target.clone(),
                        message: message.clone(),
                    });
                }
                None => state.last_error = None,
            }
        }
        let summary = TaskSummary {
            task: result.task.clone(),
            kind: result.kind.clone(),
            finished_at: result.finished_at,
            ok: result.error.is_none() && result.targets.iter().all(|t| t.error.is_none()),
            restored: if result.kind == "restore" {
                result
                    .targets
                    .iter()
                    .map(|t| {
                        let outcome = match (&t.restored, &t.error) {
                            (_, Some(e)) => Err(e.clone()),
                            (Some(s), None) => Ok(s.clone()),
                            (None, None) => Err("nothing restored".into()),
                        };
                        (t.target.clone(), outcome)
                    })
                    .collect()
            } else {
                vec![]
            },
        };
        for (target, outcome) in &summary.restored {
            findings.push(Finding::Restored {
                target: target.clone(),
                outcome: outcome.clone(),
            });
        }
        self.last_task = Some(summary);
        findings
    }
}

/// Checks a repository URL is one of restic's forms shoal supports, without secrets in it.
pub fn check_target_url(url: &str) -> Result<(), BackupDefError> {
    let bad = |why: &str| {
        Err(BackupDefError::BadUrl(format!(
            "repository URL {url:?}: {why}"
        )))
    };
    if url.is_empty() || url.len() > 1024 || url.chars().any(char::is_control) {
        return bad("empty, too long or with control characters");
    }
    if url.starts_with('/') {
        return Ok(());
    }
    let Some((scheme, rest)) = url.split_once(':') else {
        return bad("use a local path (/srv/restic), sftp:, rest:http(s)://, or s3:http(s)://");
    };
    match scheme {
        "sftp" if !rest.is_empty() => Ok(()),
        "rest" | "s3" if rest.starts_with("http://") || rest.starts_with("https://") => {
            // Credentials belong in --env (kept encrypted), not in the URL (shown in lists).
            let authority = rest
                .split("://")
                .nth(1)
                .unwrap_or("")
                .split('/')
                .next()
                .unwrap_or("");
            if authority.contains('@') {
                return bad("put credentials in --env, not in the URL");
            }
            Ok(())
        }
        "rest" | "s3" => bad("give the server as http(s)://host:port/..."),
        _ => bad("use a local path (/srv/restic), sftp:, rest:http(s)://, or s3:http(s)://"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{TargetResult, VerifyStats};

    const H: u64 = 3_600_000;
    // 2026-12-07T00:00:00Z
    const DAY0: u64 = 1_796_601_600_000;

    fn job(schedule: &str) -> Job {
        Job::new(
            JobSpec {
                name: "home".into(),
                paths: vec!["/home".into()],
                schedule: schedule.into(),
                targets: vec!["a".into(), "b".into()],
                ..Default::default()
            },
            UnixMillis(DAY0),
        )
        .expect("job")
    }

    fn result(task: &str, kind: &str, targets: Vec<TargetResult>, at: u64) -> BackupResult {
        BackupResult {
            task: task.into(),
            job: "home".into(),
            kind: kind.into(),
            started_at: UnixMillis(at),
            finished_at: UnixMillis(at),
            targets,
            error: None,
        }
    }

    fn flight(task: &str, kind: &str, due: u64) -> InFlight {
        InFlight {
            task: task.into(),
            kind: kind.into(),
            due: Some(UnixMillis(due)),
            requested: false,
            sent_at: UnixMillis(due),
            restore: None,
        }
    }

    #[test]
    fn the_latest_missed_firing_is_owed_once() {
        let j = job("0 2 * * *");
        let mut s = NodeJobState::default();
        assert_eq!(j.owed(&s, UnixMillis(DAY0 + H)), None);
        // The node was down for three days: one backup, for the latest firing.
        let owed = j
            .owed(&s, UnixMillis(DAY0 + 3 * 24 * H + 5 * H))
            .expect("owed");
        assert_eq!(owed.kind, OwedKind::Backup);
        assert_eq!(owed.due, UnixMillis(DAY0 + 3 * 24 * H + 2 * H));
        s.in_flight = Some(flight("t1", "backup", owed.due.0));
        assert_eq!(
            j.owed(&s, UnixMillis(DAY0 + 3 * 24 * H + 5 * H)),
            None,
            "in flight"
        );
        s.apply(
            &result("t1", "backup", vec![], DAY0 + 3 * 24 * H + 6 * H),
            UnixMillis(0),
        );
        assert_eq!(s.in_flight, None);
        assert_eq!(j.owed(&s, UnixMillis(DAY0 + 3 * 24 * H + 7 * H)), None);
        assert!(j.owed(&s, UnixMillis(DAY0 + 4 * 24 * H + 2 * H)).is_some());
    }

    #[test]
    fn verification_is_owed_on_its_own_schedule_once_there_is_a_snapshot() {
        let j = job("0 2 * * 0"); // weekly backups (Sundays), daily verification
        let mut s = NodeJobState::default();
        let t = UnixMillis(DAY0 + 24 * H + H);
        assert_eq!(j.owed(&s, t), None, "nothing to verify yet");
        s.targets.entry("a".into()).or_default().sample = Some(SnapshotSample {
            snapshot: "abc".into(),
            files: vec![],
        });
        let owed = j.owed(&s, t).expect("verify owed");
        assert_eq!(
            (owed.kind, owed.due),
            (OwedKind::Verify, UnixMillis(DAY0 + 24 * H))
        );
    }

    #[test]
    fn scheduled_work_waits_for_the_window_and_maintenance_and_requests_do_not() {
        let scheduled = Owed {
            kind: OwedKind::Backup,
            due: UnixMillis(0),
            requested: false,
        };
        assert!(scheduled.may_start(true, false));
        assert!(!scheduled.may_start(false, false), "window closed");
        assert!(!scheduled.may_start(true, true), "in maintenance");
        let asked = Owed {
            requested: true,
            ..scheduled
        };
        assert!(asked.may_start(false, true));
        // What was owed while it had to wait is still owed afterwards (once).
        let j = job("0 2 * * *");
        let s = NodeJobState::default();
        let late = UnixMillis(DAY0 + 24 * H + 9 * H);
        assert_eq!(
            j.owed(&s, late).map(|o| o.due),
            Some(UnixMillis(DAY0 + 24 * H + 2 * H))
        );
    }

    #[test]
    fn requests_come_first() {
        let j = job("0 2 * * *");
        let mut s = NodeJobState {
            requested: vec![OwedKind::Verify],
            ..Default::default()
        };
        let owed = j.owed(&s, UnixMillis(DAY0 + 5 * H)).expect("owed");
        assert!(owed.requested && owed.kind == OwedKind::Verify);
        s.in_flight = Some(InFlight {
            requested: true,
            due: None,
            ..flight("t2", "verify", 0)
        });
        s.apply(&result("t2", "verify", vec![], DAY0 + 5 * H), UnixMillis(0));
        assert!(s.requested.is_empty());
        assert_eq!(s.verify_satisfied, None, "a request satisfies no firing");
    }

    #[test]
    fn one_target_failing_is_named_and_the_other_is_not() {
        let j = job("0 2 * * *");
        let mut s = NodeJobState::default();
        let verify = |subset| VerifyStats {
            snapshot: "0123456789".into(),
            files_checked: 5,
            check_subset: subset,
            check_ok: true,
            ..Default::default()
        };
        let ok = TargetResult {
            target: "a".into(),
            backup: Some(BackupStats {
                snapshot: "0123456789".into(),
                ..Default::default()
            }),
            verify: Some(verify((1, 7))),
            ..Default::default()
        };
        let failed = TargetResult {
            target: "b".into(),
            error: Some("backup: connection refused".into()),
            ..Default::default()
        };
        let now = DAY0 + 3 * H;
        let findings = s.apply(
            &result("t", "backup", vec![ok, failed], now),
            UnixMillis(now),
        );
        assert_eq!(findings.len(), 3, "{findings:?}");
        let lines = j.attention(&s, UnixMillis(now));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("target b") && lines[0].contains("connection refused"));
        // The good target's verification ages past the limit.
        let later = UnixMillis(now + 27 * H);
        let lines = j.attention(&s, later);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("target a") && l.contains("old")),
            "{lines:?}"
        );
        assert!(lines
            .iter()
            .any(|l| l.contains("target b") && l.contains("never verified")));
        // A damaged pack.
        let damaged = TargetResult {
            target: "a".into(),
            verify: Some(VerifyStats {
                check_ok: false,
                check_errors: vec!["pack 1f2e: hash mismatch".into()],
                ..verify((2, 7))
            }),
            ..Default::default()
        };
        s.apply(
            &result("t3", "verify", vec![damaged], now + H),
            UnixMillis(now + H),
        );
        let lines = j.attention(&s, UnixMillis(now + H));
        assert!(
            lines.iter().any(|l| l.contains("target a")
                && l.contains("2/7")
                && l.contains("hash mismatch")),
            "{lines:?}"
        );
        assert_eq!(j.check_subset(&s, "a"), (3, 7));
    }

    #[test]
    fn the_check_subset_turns_over_the_period() {
        let j = job("@daily");
        let mut s = NodeJobState::default();
        let mut seen = vec![];
        for i in 0..8 {
            let subset = j.check_subset(&s, "a");
            seen.push(subset.0);
            let v = TargetResult {
                target: "a".into(),
                verify: Some(VerifyStats {
                    check_subset: subset,
                    check_ok: true,
                    ..Default::default()
                }),
                ..Default::default()
            };
            s.apply(
                &result(&format!("t{i}"), "verify", vec![v], DAY0),
                UnixMillis(DAY0 + i),
            );
        }
        assert_eq!(seen, vec![1, 2, 3, 4, 5, 6, 7, 1]);
        assert_eq!(s.targets["a"].full_read_at, Some(UnixMillis(DAY0 + 6)));
    }

    #[test]
    fn definitions_are_checked() {
        let base = JobSpec {
            name: "home".into(),
            paths: vec!["/home".into()],
            schedule: "@daily".into(),
            targets: vec!["a".into()],
            ..Default::default()
        };
        let now = UnixMillis(DAY0);
        assert!(Job::new(base.clone(), now).is_ok());
        let bad = [
            JobSpec {
                name: "Home!".into(),
                ..base.clone()
            },
            JobSpec {
                paths: vec![],
                ..base.clone()
            },
            JobSpec {
                paths: vec!["relative".into()],
                ..base.clone()
            },
            JobSpec {
                schedule: "often".into(),
                ..base.clone()
            },
            JobSpec {
                tz: Some("Mars/Olympus".into()),
                ..base.clone()
            },
            JobSpec {
                targets: vec![],
                ..base.clone()
            },
            JobSpec {
                targets: vec!["a".into(), "a".into()],
                ..base.clone()
            },
            JobSpec {
                selector: Some("nope in ()".into()),
                ..base.clone()
            },
            JobSpec {
                check_period: Some(0),
                ..base.clone()
            },
            JobSpec {
                sample_files: Some(10_000),
                ..base.clone()
            },
        ];
        for spec in bad {
            assert!(Job::new(spec.clone(), now).is_err(), "{spec:?}");
        }
        for ok in [
            "/srv/restic",
            "sftp:backup@10.0.0.5:/srv/r",
            "rest:http://h:8000/",
            "s3:http://h:9000/bucket",
        ] {
            assert_eq!(check_target_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "relative/path",
            "ftp:x",
            "s3:h/bucket",
            "s3:http://key:secret@h/b",
            "rest:https://u:p@h/",
        ] {
            assert!(check_target_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_minutely_schedule_after_a_long_outage_is_owed_as_of_now() {
        let s = Schedule::new("* * * * *", "UTC").expect("schedule");
        let now = UnixMillis(DAY0 + 30 * 24 * H);
        assert_eq!(s.latest_due(UnixMillis(DAY0), now), Some(now));
        assert_eq!(
            s.latest_due(UnixMillis(DAY0), UnixMillis(DAY0 + 90_000)),
            Some(UnixMillis(DAY0 + 60_000))
        );
    }
}
