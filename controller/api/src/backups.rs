//! Backup targets, jobs, runs, snapshots and their verification (`/v1/backups/...`).

use serde::{Deserialize, Serialize};

/// `POST /v1/backups/targets`. The password, environment and SSH key are stored encrypted and
/// never returned.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateTarget {
    /// Name, `[a-z0-9][a-z0-9-]{0,30}`.
    pub name: String,
    /// Repository URL in restic's forms: `/path`, `sftp:user@host:/path`, `rest:http://...`,
    /// `s3:http(s)://host:port/bucket`. Each node writes to `<url>/<node id>`.
    pub url: String,
    /// The repository password.
    pub password: String,
    /// Environment for restic (credentials: `AWS_ACCESS_KEY_ID=...`).
    pub env: Vec<(String, String)>,
    /// For `sftp:`: the SSH private key the agents log in with.
    pub ssh_key: Option<String>,
    /// For `sftp:`: the server's `known_hosts` lines (required with `sftp:`).
    pub ssh_known_hosts: Option<String>,
}

/// A target as listed: no secrets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetView {
    /// Name.
    pub name: String,
    /// Base URL.
    pub url: String,
    /// Names of the environment entries (values are secret).
    pub env_keys: Vec<String>,
    /// Whether an SSH key is stored.
    pub ssh_key: bool,
    /// Jobs that write to it.
    pub jobs: Vec<String>,
    /// When it was added (RFC 3339).
    pub created_at: String,
}

/// `POST /v1/backups/jobs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateJob {
    /// Name.
    pub name: String,
    /// A label selector (`role=db,zone in (a,b)`); none selects every node.
    pub selector: Option<String>,
    /// Absolute paths to back up.
    pub paths: Vec<String>,
    /// Exclude patterns.
    pub excludes: Vec<String>,
    /// Backup schedule, five-field cron.
    pub schedule: String,
    /// Verification schedule (default `@daily`).
    pub verify_schedule: Option<String>,
    /// Time zone (default UTC).
    pub tz: Option<String>,
    /// Targets, in order.
    pub targets: Vec<String>,
    /// Keep rules.
    pub keep_last: Option<u32>,
    /// Keep rules.
    pub keep_daily: Option<u32>,
    /// Keep rules.
    pub keep_weekly: Option<u32>,
    /// Keep rules.
    pub keep_monthly: Option<u32>,
    /// A maintenance window the job starts only inside of.
    pub window: Option<String>,
    /// Oldest acceptable verified restore, seconds (default 26 h).
    pub verify_max_age_secs: Option<u64>,
    /// Verifications over which every pack is read (default 7).
    pub check_period: Option<u32>,
    /// Files sampled per verification (default 32).
    pub sample_files: Option<u32>,
}

/// A job as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobView {
    /// Name.
    pub name: String,
    /// Selector.
    pub selector: Option<String>,
    /// Paths.
    pub paths: Vec<String>,
    /// Excludes.
    pub excludes: Vec<String>,
    /// Backup schedule.
    pub schedule: String,
    /// Verification schedule.
    pub verify_schedule: String,
    /// Time zone.
    pub tz: String,
    /// Targets.
    pub targets: Vec<String>,
    /// Keep rules as text (`daily=7 weekly=4`), `all` when none.
    pub retention: String,
    /// Window.
    pub window: Option<String>,
    /// Verification age limit, seconds.
    pub verify_max_age_secs: u64,
    /// Check period.
    pub check_period: u32,
    /// Nodes the job selects now.
    pub nodes: usize,
    /// The next backup firing (RFC 3339).
    pub next_run: Option<String>,
}

/// `POST /v1/backups/jobs/{job}/run` and `/verify`: which nodes (all the job selects when none).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunRequest {
    /// One node (id or hostname).
    pub node: Option<String>,
}

/// What a run or verify request queued.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Queued {
    /// Node ids.
    pub nodes: Vec<String>,
}

/// `POST /v1/backups/jobs/{job}/restore`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RestoreRequest {
    /// The node (id or hostname).
    pub node: String,
    /// The target (default the job's first).
    pub target: Option<String>,
    /// Snapshot id or prefix (default the newest).
    pub snapshot: Option<String>,
    /// Paths to restore (default everything).
    pub include: Vec<String>,
    /// Directory on the node.
    pub to: String,
}

/// A restore queued.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreQueued {
    /// The node id.
    pub node: String,
    /// The task id to wait for.
    pub task: String,
}

/// One node, job and target: `backup list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupStatusView {
    /// Job.
    pub job: String,
    /// Node id.
    pub node: String,
    /// Hostname.
    pub hostname: String,
    /// Target.
    pub target: String,
    /// The last successful backup's snapshot.
    pub last_snapshot: Option<String>,
    /// When it finished (RFC 3339).
    pub last_backup_at: Option<String>,
    /// Bytes it added.
    pub last_bytes_added: Option<u64>,
    /// Files it read.
    pub last_files: Option<u64>,
    /// How long it took, ms.
    pub last_duration_ms: Option<u64>,
    /// Stale locks of dead runs it removed first.
    pub last_stale_locks_cleared: Option<u32>,
    /// Snapshots its retention rules removed.
    pub last_forgotten: Vec<String>,
    /// The last failure on this target (cleared by a success).
    pub last_error: Option<String>,
    /// `passed`, `failed` or `never`.
    pub verification: String,
    /// When the last verification finished (RFC 3339).
    pub verified_at: Option<String>,
    /// The snapshot it verified.
    pub verified_snapshot: Option<String>,
    /// Files restored and compared.
    pub verified_files: Option<u32>,
    /// The check subset read, `K/N`.
    pub check_subset: Option<String>,
    /// What failed.
    pub verify_problems: Option<String>,
    /// When every pack had last been read.
    pub full_read_at: Option<String>,
    /// The repository's snapshots (newest last).
    pub snapshots: Vec<SnapshotView>,
    /// A task in flight: `backup b12 since ...`.
    pub running: Option<String>,
    /// Progress of the task in flight, if reported.
    pub progress: Option<String>,
    /// The last task: id, kind, ok.
    pub last_task: Option<TaskView>,
}

/// A snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotView {
    /// Id.
    pub id: String,
    /// When (RFC 3339).
    pub time: String,
    /// Paths.
    pub paths: Vec<String>,
}

/// The last task on a node and job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskView {
    /// Id.
    pub task: String,
    /// `backup`, `verify`, `restore`.
    pub kind: String,
    /// Finished at (RFC 3339).
    pub finished_at: String,
    /// Every target succeeded.
    pub ok: bool,
    /// For a restore: the outcome per target.
    pub restore: Vec<RestoreOutcome>,
}

/// How a restore went on a target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreOutcome {
    /// Target.
    pub target: String,
    /// The snapshot restored.
    pub snapshot: Option<String>,
    /// Why not.
    pub error: Option<String>,
}
