//! Drives, drive commands and drive policies: `/v1/drives…` and `/v1/drive-policies`.

use serde::{Deserialize, Serialize};
use shoal_proto::Filesystem;

/// One drive as `GET /v1/drives` (and `shoalctl drives list -o json`) lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriveView {
    /// Node id.
    pub node: String,
    /// Kernel name (`sdb`, `nvme1n1`, `loop3`).
    pub device: String,
    /// Serial number, if the drive has one.
    pub serial: Option<String>,
    /// Model, if known.
    pub model: Option<String>,
    /// Size in bytes.
    pub size_bytes: u64,
    /// `blank`, `awaiting-approval`, `has-data`, `preparing`, `prepared`, `missing`,
    /// `prepare-failed` or `unreadable`.
    pub state: String,
    /// What goes with the state: `signatures` (has-data); `partition`, `filesystem`, `fs_uuid`,
    /// `label`, `mount_point` (prepared, missing); `reason` (prepare-failed, unreadable); null for
    /// the others.
    pub state_detail: Option<StateDetail>,
    /// SMART: verdict, latest read, self-test.
    pub smart: SmartView,
    /// When the controller received the node's latest drive report (RFC 3339).
    pub updated_at: String,
}

/// The detail of a drive's state; only the fields that apply to the state are present.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StateDetail {
    /// has-data: what was found (`gpt`, `ext4`, `LVM2 physical volume`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signatures: Option<Vec<String>>,
    /// prepared, missing: the partition (`sdb1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// prepared, missing: `ext4` or `xfs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    /// prepared, missing: the filesystem UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_uuid: Option<String>,
    /// prepared, missing: the filesystem label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// prepared, missing: where it is (was) mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<String>,
    /// prepare-failed, unreadable: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A drive's SMART as the controller judges it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SmartView {
    /// `ok`, `warning`, `failing`, or `unknown` (no SMART, or never read successfully). When the
    /// latest read failed, the verdict of the last good read.
    pub verdict: String,
    /// Why the verdict is not `ok`, one sentence each.
    pub reasons: Vec<String>,
    /// The latest read: `report` (smartctl read the drive), `no-smart` (the device has none:
    /// virtio, loop...), `failed` (smartctl missing, timed out, unparsable), `pending` (not read
    /// yet).
    pub status: String,
    /// Why, for `no-smart` and `failed`.
    pub reason: Option<String>,
    /// `ata`, `nvme` or `scsi` (status `report`).
    pub protocol: Option<String>,
    /// Current temperature, °C.
    pub temperature_celsius: Option<i32>,
    /// Power-on hours.
    pub power_on_hours: Option<u64>,
    /// The drive's overall-health self-assessment.
    pub health_passed: Option<bool>,
    /// The raw failure predictors: ATA `reallocated_sectors`, `reported_uncorrectable`,
    /// `command_timeouts`, `pending_sectors`, `offline_uncorrectable`; NVMe `critical_warning`,
    /// `media_errors`, `percentage_used`, `available_spare`, `available_spare_threshold`; SCSI
    /// `grown_defects`, `read_uncorrected`, `write_uncorrected`.
    pub predictors: Option<serde_json::Value>,
    /// The running self-test, or the newest one in the drive's log.
    pub self_test: Option<SelfTestView>,
    /// When SMART was read (RFC 3339, the agent's clock).
    pub at: Option<String>,
}

/// A drive's self-test state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SelfTestView {
    /// `running`, `passed` or `failed`.
    pub state: String,
    /// `short` or `long`, when the drive says.
    pub kind: Option<String>,
    /// running: percent left, when the drive says.
    pub remaining_percent: Option<u8>,
    /// passed, failed: the drive's words for the result.
    pub result: Option<String>,
    /// passed, failed: power-on hours when it ended.
    pub power_on_hours: Option<u64>,
}

/// Request body of `POST /v1/drive-policies`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SetDrivePolicy {
    /// A node id (exactly one of `node` and `selector`).
    #[serde(default)]
    pub node: Option<String>,
    /// A label selector (`role=db,zone in (a,b)`).
    #[serde(default)]
    pub selector: Option<String>,
    /// `report`, `approve` or `prepare`.
    pub mode: String,
    /// `ext4` or `xfs`; ext4 when absent.
    #[serde(default)]
    pub filesystem: Option<String>,
}

/// A stored drive policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrivePolicyView {
    /// The node it is for, or null for a selector policy.
    pub node: Option<String>,
    /// The label selector it is for (canonical text), or null for a node policy.
    pub selector: Option<String>,
    /// `report`, `approve` or `prepare`.
    pub mode: String,
    /// `ext4` or `xfs`.
    pub filesystem: String,
    /// When it was set (RFC 3339).
    pub set_at: String,
}

/// The policy that applies to one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectivePolicyView {
    /// Node id.
    pub node: String,
    /// Hostname.
    pub hostname: String,
    /// `report`, `approve` or `prepare`.
    pub mode: String,
    /// `ext4` or `xfs`.
    pub filesystem: String,
    /// Where it comes from: `node`, `selector SELECTOR`, or `default`.
    pub source: String,
}

/// `GET /v1/drive-policies`: the stored policies and what applies to each node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrivePolicies {
    /// Stored policies, node policies first.
    pub policies: Vec<DrivePolicyView>,
    /// Every node's effective policy.
    pub effective: Vec<EffectivePolicyView>,
}

/// Request body of `POST /v1/drives/{node}/{device}/self-test`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfTestRequest {
    /// `short` or `long`.
    pub kind: String,
}

/// What a drive command did (`POST /v1/drives/{node}/{device}/prepare` and `.../self-test`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveCommandView {
    /// Node id.
    pub node: String,
    /// Kernel name of the drive.
    pub device: String,
    /// `prepare` or `self-test`.
    pub action: String,
    /// The command's id (in the agent's log too).
    pub id: u64,
    /// What the agent says it did.
    pub message: String,
}

/// What an operator asks `drives prepare` to do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareRequest {
    /// `--force`: prepare a drive that holds data. Needs `serial`.
    #[serde(default)]
    pub force: bool,
    /// `--serial`: the drive's serial number, which must match for `force` to count.
    #[serde(default)]
    pub serial: Option<String>,
    /// `--fs`: the filesystem; the node's policy's when absent.
    #[serde(default)]
    pub filesystem: Option<Filesystem>,
}
