//! The fleet health report (`GET /v1/report`): nodes by status, every node that needs attention
//! with the reasons, and drive health. The controller's `report` module builds it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One node that needs attention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attention {
    /// Node id.
    pub id: String,
    /// Hostname.
    pub hostname: String,
    /// `up` or `down`.
    pub status: String,
    /// Why, each a short sentence starting with its kind (`down`, `filesystem`, `memory pressure`,
    /// `stale report`).
    pub reasons: Vec<String>,
}

/// The fleet report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetReport {
    /// When it was made (RFC 3339).
    pub generated_at: String,
    /// Nodes in the fleet.
    pub total: usize,
    /// Count per status.
    pub by_status: BTreeMap<String, usize>,
    /// Nodes that need attention.
    pub attention: Vec<Attention>,
    /// Drive health (absent in reports of controllers before drives).
    #[serde(default)]
    pub drives: DriveHealth,
    /// Backup jobs that need attention on some node: a failed target, a failed or stale
    /// verification (absent in reports of controllers before backups).
    #[serde(default)]
    pub backups: Vec<BackupAttention>,
}

/// One job on one node that needs attention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupAttention {
    /// The job.
    pub job: String,
    /// Node id.
    pub node: String,
    /// Hostname.
    pub hostname: String,
    /// Why, one line per target problem.
    pub reasons: Vec<String>,
}

/// Drive health across the fleet.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DriveHealth {
    /// Drives per SMART verdict: `ok`, `warning`, `failing`, `unknown` (no SMART, or not read yet).
    pub by_verdict: BTreeMap<String, usize>,
    /// Drives whose verdict is `failing` or `warning` (failing first), with the reasons.
    pub attention: Vec<DriveAttention>,
    /// Prepared drives that vanished (state `missing`).
    pub missing: Vec<DriveAttention>,
    /// Blank drives waiting for `shoalctl drives prepare` (state `awaiting-approval`).
    pub awaiting_approval: Vec<DriveAttention>,
}

/// One drive in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriveAttention {
    /// Node id.
    pub node: String,
    /// Hostname.
    pub hostname: String,
    /// Kernel name.
    pub device: String,
    /// Serial number.
    pub serial: Option<String>,
    /// Model.
    pub model: Option<String>,
    /// Size in bytes.
    pub size_bytes: u64,
    /// SMART verdict.
    pub verdict: String,
    /// Why it is here: the verdict's reasons, or where a missing drive was mounted.
    pub reasons: Vec<String>,
}
