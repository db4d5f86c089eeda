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
    /// Rollouts and maintenance runs that need an operator: paused (by an operator or after too
    /// many failures), or running with failed nodes (absent in reports of older controllers).
    #[serde(default)]
    pub rollouts: Vec<RolloutAttention>,
}

/// `shoalctl report --exit-code`: the exit status when something needs attention is
/// [`EXIT_ATTENTION`] plus one bit per kind, so a script can tell which.
pub const EXIT_ATTENTION: u8 = 16;
/// Bit: a node needs attention (down, stale, filesystem full, memory pressure).
pub const EXIT_NODES: u8 = 1;
/// Bit: a drive's SMART verdict is warning or failing, or a prepared drive is missing.
pub const EXIT_DRIVES: u8 = 2;
/// Bit: a backup job on a node failed, its verification failed, or its verified restore is too old.
pub const EXIT_BACKUPS: u8 = 4;
/// Bit: a rollout or maintenance run is paused, or running with failed nodes.
pub const EXIT_ROLLOUTS: u8 = 8;

impl FleetReport {
    /// The exit status of `shoalctl report --exit-code`: 0 when nothing needs attention, else
    /// [`EXIT_ATTENTION`] with the bits of every kind that does (17 to 31; 1 and 2 stay the CLI's
    /// own errors and usage errors).
    pub fn exit_code(&self) -> u8 {
        let mut bits = 0;
        if !self.attention.is_empty() {
            bits |= EXIT_NODES;
        }
        if !self.drives.attention.is_empty() || !self.drives.missing.is_empty() {
            bits |= EXIT_DRIVES;
        }
        if !self.backups.is_empty() {
            bits |= EXIT_BACKUPS;
        }
        if !self.rollouts.is_empty() {
            bits |= EXIT_ROLLOUTS;
        }
        if bits == 0 {
            0
        } else {
            EXIT_ATTENTION | bits
        }
    }
}

/// One rollout or maintenance run that needs attention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutAttention {
    /// Rollout id (`r1`, ...).
    pub id: String,
    /// What it rolls out (`agent 1.2.0`, `image 2026.11.1`, `maintenance reboot`...).
    pub target: String,
    /// `running` or `paused`.
    pub state: String,
    /// Nodes that failed.
    pub failed: u32,
    /// Why it is here: the pause reason, or the failed nodes.
    pub reason: String,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> FleetReport {
        FleetReport {
            generated_at: String::new(),
            total: 1,
            by_status: BTreeMap::new(),
            attention: vec![],
            drives: DriveHealth::default(),
            backups: vec![],
            rollouts: vec![],
        }
    }

    fn drive(verdict: &str) -> DriveAttention {
        DriveAttention {
            node: "n1".into(),
            hostname: "a".into(),
            device: "sda".into(),
            serial: None,
            model: None,
            size_bytes: 0,
            verdict: verdict.into(),
            reasons: vec![],
        }
    }

    #[test]
    fn the_exit_code_has_a_bit_per_kind_of_attention() {
        let mut r = report();
        assert_eq!(r.exit_code(), 0);
        // Drives waiting for approval need no attention.
        r.drives.awaiting_approval.push(drive("ok"));
        assert_eq!(r.exit_code(), 0);
        r.attention.push(Attention {
            id: "n1".into(),
            hostname: "a".into(),
            status: "down".into(),
            reasons: vec!["down: never reported".into()],
        });
        assert_eq!(r.exit_code(), 17);
        r.attention.clear();
        r.drives.missing.push(drive("unknown"));
        assert_eq!(r.exit_code(), 18);
        r.drives.missing.clear();
        r.drives.attention.push(drive("warning"));
        r.backups.push(BackupAttention {
            job: "home".into(),
            node: "n1".into(),
            hostname: "a".into(),
            reasons: vec!["target nas: never verified".into()],
        });
        assert_eq!(r.exit_code(), 22);
        r.rollouts.push(RolloutAttention {
            id: "r1".into(),
            target: "agent 1.2.0".into(),
            state: "paused".into(),
            failed: 1,
            reason: "paused by an operator".into(),
        });
        assert_eq!(r.exit_code(), 30);
        r.attention = vec![Attention {
            id: "n1".into(),
            hostname: "a".into(),
            status: "up".into(),
            reasons: vec!["stale report: no health report yet".into()],
        }];
        assert_eq!(r.exit_code(), 31);
    }

    #[test]
    fn reports_of_older_controllers_decode() {
        let mut json = serde_json::to_value(report()).unwrap_or_default();
        if let Some(o) = json.as_object_mut() {
            o.remove("rollouts");
        }
        let back: Result<FleetReport, _> = serde_json::from_value(json);
        assert_eq!(back.map(|r| r.rollouts.len()).ok(), Some(0));
    }
}
