//! (v6) Backups: the controller hands an agent a [`BackupTask`] (back up and verify, verify only,
//! or restore) for one job and every target the job names; the agent runs it with restic, reports
//! [`BackupProgress`] while it runs and one [`BackupResult`] with an outcome per target at the end.
//!
//! Value types only. Scheduling lives in the controller, running restic in the agent.
//!
//! Rules:
//! - A task is identified by its `id`. The controller sends it again on every reconnect until it
//!   has the result; an agent that is running that task ignores the repeat, and one that finished
//!   it answers the kept result again. The agent keeps a result (in its state directory) until
//!   [`crate::ControllerMsg::BackupAck`] for it arrives, so a result outlives a controller restart
//!   and an agent restart.
//! - Targets are independent: one that fails gets [`TargetResult::error`] and the others still run.
//! - Every node has its own repository under a target's URL (`<url>/<node id>`): locks, pruning and
//!   damage never cross nodes.
//! - Everything here is bounded by the constants below; [`crate::limits`] checks them on receipt.
//! - Enums are externally tagged (postcard cannot decode internally tagged ones).

use serde::{Deserialize, Serialize};

use crate::UnixMillis;

/// Paths (or exclude patterns) one job names.
pub const MAX_BACKUP_PATHS: usize = 64;
/// Targets one job writes to.
pub const MAX_JOB_TARGETS: usize = 8;
/// Files sampled per verification, with their hashes.
pub const MAX_SAMPLE_FILES: usize = 64;
/// Snapshots reported per target (the newest ones).
pub const MAX_REPORTED_SNAPSHOTS: usize = 256;
/// Error or warning lines kept per target result.
pub const MAX_BACKUP_ERRORS: usize = 32;
/// Environment entries (credentials) of one target.
pub const MAX_TARGET_ENV: usize = 32;

/// Keep rules applied after every backup (`restic forget --prune`). A rule left `None` keeps
/// nothing by it; a policy with no rule at all keeps every snapshot (nothing is forgotten).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// The newest N snapshots.
    pub keep_last: Option<u32>,
    /// The newest snapshot of each of the last N days that have one.
    pub keep_daily: Option<u32>,
    /// ... of each of the last N weeks.
    pub keep_weekly: Option<u32>,
    /// ... of each of the last N months.
    pub keep_monthly: Option<u32>,
}

impl Retention {
    /// Whether no rule is set (then nothing is forgotten).
    pub fn keeps_everything(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
    }
}

/// A repository as the agent needs it: sent only to agents whose jobs use it, only inside a task.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetAccess {
    /// The target's name (`offsite`).
    pub name: String,
    /// The base repository URL in restic's forms (a local path, `sftp:`, `rest:`, `s3:`); the
    /// agent appends its node id.
    pub url: String,
    /// The repository password.
    pub password: String,
    /// Environment for restic (`AWS_ACCESS_KEY_ID`, ...).
    pub env: Vec<(String, String)>,
    /// An SSH private key (OpenSSH format) for `sftp:` targets; the agent writes it to a private
    /// file for the run and points `ssh -i` at it.
    pub ssh_key: Option<String>,
    /// `known_hosts` lines for the sftp server (without them an sftp target is refused: the agent
    /// never accepts an unknown host key).
    pub ssh_known_hosts: Option<String>,
}

impl std::fmt::Debug for TargetAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetAccess")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("password", &"<redacted>")
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("ssh_key", &self.ssh_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A file and its SHA-256 as it was backed up: restore verification restores it and compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHash {
    /// Absolute path on the node, as in the snapshot.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the contents.
    pub sha256: [u8; 32],
}

/// What a task does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Back up, forget by the retention rules, then verify the new snapshot.
    Backup,
    /// Verify the newest snapshot of each target against its recorded hashes, and read the
    /// target's check subset.
    Verify,
    /// Restore onto the node.
    Restore {
        /// The snapshot (an id or its short form); `None` is the newest.
        snapshot: Option<String>,
        /// Paths to restore (restic `--include`); empty is everything.
        include: Vec<String>,
        /// The directory to restore into (created; must be empty or absent).
        to: String,
    },
}

impl TaskKind {
    /// `backup`, `verify`, `restore`.
    pub fn name(&self) -> &'static str {
        match self {
            TaskKind::Backup => "backup",
            TaskKind::Verify => "verify",
            TaskKind::Restore { .. } => "restore",
        }
    }
}

/// One target of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTarget {
    /// How to reach the repository.
    pub access: TargetAccess,
    /// The part of the repository's data to read in this verification (`restic check
    /// --read-data-subset=K/N`): the controller turns K so that N verifications read every pack.
    pub check_subset: (u32, u32),
    /// For [`TaskKind::Verify`]: the snapshot to verify and the hashes recorded when it was taken.
    pub verify: Option<SnapshotSample>,
}

/// A snapshot and the sample of files recorded when it was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSample {
    /// The snapshot id.
    pub snapshot: String,
    /// The recorded files.
    pub files: Vec<FileHash>,
}

/// (v6) Controller to agent: run this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupTask {
    /// Unique per task (`b42`).
    pub id: String,
    /// The job.
    pub job: String,
    /// What to do.
    pub kind: TaskKind,
    /// Directories and files to back up.
    pub paths: Vec<String>,
    /// Exclude patterns (restic `--exclude`).
    pub excludes: Vec<String>,
    /// Keep rules for after the backup.
    pub retention: Retention,
    /// Files to sample for restore verification.
    pub sample_files: u32,
    /// The targets, in the job's order.
    pub targets: Vec<TaskTarget>,
}

/// (v6) Agent to controller, at most every few seconds while a task runs: where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupProgress {
    /// The task.
    pub task: String,
    /// The target being written.
    pub target: String,
    /// What is being done (`backup`, `forget`, `verify`, `check`, `restore`).
    pub phase: String,
    /// Files done so far.
    pub files_done: u64,
    /// Bytes done so far.
    pub bytes_done: u64,
    /// Files in all, when known.
    pub total_files: u64,
    /// Bytes in all, when known.
    pub total_bytes: u64,
}

/// A snapshot in a repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The full id.
    pub id: String,
    /// When it was taken.
    pub time: UnixMillis,
    /// The paths it holds.
    pub paths: Vec<String>,
}

/// What a backup wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStats {
    /// The new snapshot.
    pub snapshot: String,
    /// Files new since the parent snapshot.
    pub files_new: u64,
    /// Files changed.
    pub files_changed: u64,
    /// Files unchanged.
    pub files_unmodified: u64,
    /// Files read in all.
    pub files_processed: u64,
    /// Bytes read in all.
    pub bytes_processed: u64,
    /// Bytes added to the repository.
    pub bytes_added: u64,
    /// How long the backup took.
    pub duration_ms: u64,
    /// Files that could not be read (the snapshot is complete without them).
    pub warnings: Vec<String>,
    /// Stale locks of dead runs removed before the backup.
    pub stale_locks_cleared: u32,
    /// Snapshots removed by the retention rules.
    pub forgotten: Vec<String>,
    /// The files sampled for verification, hashed right after the backup.
    pub samples: Vec<FileHash>,
}

/// What a verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyStats {
    /// The snapshot verified.
    pub snapshot: String,
    /// Files restored into a scratch directory and compared.
    pub files_checked: u32,
    /// Their bytes.
    pub bytes_checked: u64,
    /// Files that did not restore or did not match, with why.
    pub mismatches: Vec<String>,
    /// The part of the repository's data read (`K/N`).
    pub check_subset: (u32, u32),
    /// Whether the repository check passed.
    pub check_ok: bool,
    /// The check's complaints.
    pub check_errors: Vec<String>,
    /// How long verification took.
    pub duration_ms: u64,
}

impl VerifyStats {
    /// Whether everything checked out.
    pub fn passed(&self) -> bool {
        self.mismatches.is_empty() && self.check_ok && self.check_errors.is_empty()
    }
}

/// How a task went on one target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetResult {
    /// The target.
    pub target: String,
    /// What failed and why, if anything did (the phase names what: `backup: ...`).
    pub error: Option<String>,
    /// The backup, if one was made.
    pub backup: Option<BackupStats>,
    /// The verification, if one ran.
    pub verify: Option<VerifyStats>,
    /// For a restore: the snapshot restored.
    pub restored: Option<String>,
    /// The repository's snapshots of this node and job afterwards, newest last (bounded).
    pub snapshots: Vec<SnapshotInfo>,
}

/// (v6) Agent to controller: how a task ended, per target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupResult {
    /// The task.
    pub task: String,
    /// The job.
    pub job: String,
    /// `backup`, `verify` or `restore`.
    pub kind: String,
    /// When the task started on the agent.
    pub started_at: UnixMillis,
    /// When it ended.
    pub finished_at: UnixMillis,
    /// One per target, in the task's order. Empty with `error` set when nothing could start.
    pub targets: Vec<TargetResult>,
    /// Why the task as a whole could not run (no restic, a bad path).
    pub error: Option<String>,
}

/// The first `max` items of `items`, plus a line saying how many were left out.
pub fn bounded_lines(mut items: Vec<String>, max: usize, max_len: usize) -> Vec<String> {
    let total = items.len();
    items.truncate(max.saturating_sub(1).max(1).min(total));
    for item in &mut items {
        if item.len() > max_len {
            let mut end = max_len;
            while !item.is_char_boundary(end) {
                end -= 1;
            }
            item.truncate(end);
        }
    }
    if total > items.len() {
        items.push(format!("... and {} more", total - items.len()));
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_lines_keeps_the_count() {
        let lines: Vec<String> = (0..100).map(|i| format!("line {i}")).collect();
        let b = bounded_lines(lines, 10, 4);
        assert_eq!(b.len(), 10);
        assert_eq!(b[0], "line");
        assert_eq!(b[9], "... and 91 more");
        assert_eq!(
            bounded_lines(vec!["a".into()], 10, 10),
            vec!["a".to_owned()]
        );
        assert!(bounded_lines(vec![], 10, 10).is_empty());
    }

    #[test]
    fn secrets_are_not_in_debug_output() {
        let t = TargetAccess {
            name: "s3".into(),
            url: "s3:http://x/b".into(),
            password: "hunter2".into(),
            env: vec![("AWS_SECRET_ACCESS_KEY".into(), "topsecret".into())],
            ssh_key: Some("-----BEGIN".into()),
            ssh_known_hosts: None,
        };
        let d = format!("{t:?}");
        assert!(
            !d.contains("hunter2") && !d.contains("topsecret") && !d.contains("BEGIN"),
            "{d}"
        );
    }
}
