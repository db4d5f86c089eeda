//! Drive health values: what an agent learns from `smartctl` about one drive.
//!
//! These are plain values shared by the agent (which parses `smartctl --json` into them) and the
//! controller (which keeps their history and judges a verdict). Protocol 3 carries them in
//! `AgentMsg::Drives` as a [`DriveReport`].
//!
//! Counters are raw values as the drive reports them; `None` means the drive did not report the
//! value, which is different from a reported zero.

use serde::{Deserialize, Serialize};

use crate::UnixMillis;

/// The command set smartctl talked to the drive with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriveProtocol {
    /// ATA / SATA, also behind a SAT or USB bridge.
    Ata,
    /// NVMe.
    Nvme,
    /// SCSI / SAS.
    Scsi,
}

impl std::fmt::Display for DriveProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DriveProtocol::Ata => "ATA",
            DriveProtocol::Nvme => "NVMe",
            DriveProtocol::Scsi => "SCSI",
        })
    }
}

/// smartctl's exit status, a bit mask (smartctl(8), "RETURN VALUES").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SmartExitStatus(pub u8);

impl SmartExitStatus {
    /// Bit 0: the command line did not parse, or the device type could not be detected.
    pub fn command_line_error(self) -> bool {
        self.0 & 0x01 != 0
    }
    /// Bit 1: the device could not be opened (missing, permission, or a low-power mode).
    pub fn open_failed(self) -> bool {
        self.0 & 0x02 != 0
    }
    /// Bit 2: some SMART or other command to the disk failed, or a checksum in its data was wrong.
    pub fn smart_command_failed(self) -> bool {
        self.0 & 0x04 != 0
    }
    /// Bit 3: the SMART status check returned "DISK FAILING".
    pub fn disk_failing(self) -> bool {
        self.0 & 0x08 != 0
    }
    /// Bit 4: some prefail attributes are at or below their threshold.
    pub fn prefail_below_threshold(self) -> bool {
        self.0 & 0x10 != 0
    }
    /// Bit 5: the status is OK, but usage or prefail attributes were at or below threshold in the
    /// past.
    pub fn past_below_threshold(self) -> bool {
        self.0 & 0x20 != 0
    }
    /// Bit 6: the device's error log has records.
    pub fn error_log_has_errors(self) -> bool {
        self.0 & 0x40 != 0
    }
    /// Bit 7: the device's self-test log has records of errors.
    pub fn self_test_errors(self) -> bool {
        self.0 & 0x80 != 0
    }
}

/// The ATA attributes that predict failure (raw values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AtaPredictors {
    /// Attribute 5, `Reallocated_Sector_Ct`.
    pub reallocated_sectors: Option<u64>,
    /// Attribute 187, `Reported_Uncorrect`.
    pub reported_uncorrectable: Option<u64>,
    /// Attribute 188, `Command_Timeout` (the raw value packs vendor-specific counters).
    pub command_timeouts: Option<u64>,
    /// Attribute 197, `Current_Pending_Sector`.
    pub pending_sectors: Option<u64>,
    /// Attribute 198, `Offline_Uncorrectable`.
    pub offline_uncorrectable: Option<u64>,
}

/// The NVMe SMART / health log values that predict failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NvmePredictors {
    /// Critical warning bit field; any bit set is a failure the controller itself declares.
    pub critical_warning: Option<u8>,
    /// Unrecovered data integrity errors over the drive's life.
    pub media_errors: Option<u64>,
    /// Vendor estimate of life used, percent; may exceed 100.
    pub percentage_used: Option<u8>,
    /// Remaining spare capacity, percent.
    pub available_spare: Option<u8>,
    /// The spare percentage below which the drive itself raises a critical warning.
    pub available_spare_threshold: Option<u8>,
}

/// The SCSI values that predict failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ScsiPredictors {
    /// Entries in the grown defect list (blocks reallocated since manufacture).
    pub grown_defects: Option<u64>,
    /// Uncorrected read errors.
    pub read_uncorrected: Option<u64>,
    /// Uncorrected write errors.
    pub write_uncorrected: Option<u64>,
}

/// The failure predictors of one drive, by protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmartPredictors {
    /// An ATA drive's attributes.
    Ata(AtaPredictors),
    /// An NVMe drive's health log.
    Nvme(NvmePredictors),
    /// A SCSI drive's logs.
    Scsi(ScsiPredictors),
}

/// What smartctl reported about one drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmartReport {
    /// The device path smartctl opened (`/dev/sda`, `/dev/nvme0`).
    pub device: String,
    /// Command set.
    pub protocol: DriveProtocol,
    /// Model name.
    pub model: Option<String>,
    /// Serial number.
    pub serial: Option<String>,
    /// Firmware version (SCSI: the product revision).
    pub firmware: Option<String>,
    /// User capacity in bytes.
    pub capacity_bytes: Option<u64>,
    /// Current temperature, degrees Celsius.
    pub temperature_celsius: Option<i32>,
    /// Power-on hours.
    pub power_on_hours: Option<u64>,
    /// The drive's overall health self-assessment; `None` when it was not read.
    pub health_passed: Option<bool>,
    /// smartctl's exit status bits.
    pub exit_status: SmartExitStatus,
    /// Failure predictors.
    pub predictors: SmartPredictors,
    /// The self-test running now, or the newest one in the drive's log; `None` when the log is
    /// empty or the drive has none.
    pub self_test: Option<SelfTestStatus>,
}

/// The NVMe available-spare threshold (percent) used when a drive reports none: what most drives
/// report.
pub const DEFAULT_SPARE_THRESHOLD_PERCENT: u8 = 10;

impl SmartReport {
    /// The drive's own verdict is FAILED: its overall-health self-assessment failed, or smartctl
    /// set its "disk failing" exit bit.
    pub fn health_failed(&self) -> bool {
        self.health_passed == Some(false) || self.exit_status.disk_failing()
    }

    /// NVMe critical warning bits, when any is set.
    pub fn critical_warning(&self) -> Option<u8> {
        match &self.predictors {
            SmartPredictors::Nvme(n) => n.critical_warning.filter(|b| *b != 0),
            _ => None,
        }
    }

    /// NVMe available spare below its threshold, as `(spare, threshold)`. The threshold is the
    /// drive's own, or `fallback_threshold` when the drive reports 0 (none). A drive reporting both
    /// spare and threshold as 0 has not filled the fields in (qemu's emulated NVMe does this):
    /// nothing is judged, and the drive's critical-warning bit 0 still speaks for a real spare
    /// shortage.
    pub fn spare_below_threshold(&self, fallback_threshold: u8) -> Option<(u8, u8)> {
        let SmartPredictors::Nvme(n) = &self.predictors else {
            return None;
        };
        let spare = n.available_spare?;
        let reported = n.available_spare_threshold.filter(|t| *t > 0);
        if spare == 0 && reported.is_none() {
            return None;
        }
        let threshold = reported.unwrap_or(fallback_threshold);
        (spare < threshold).then_some((spare, threshold))
    }
}

/// What the agent learned about one drive's SMART.
// A handful per node, moved rarely: boxing the report would buy nothing but indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmartOutcome {
    /// smartctl read the drive.
    Report(SmartReport),
    /// The device has no SMART (virtio, loop, or the drive says SMART is unavailable).
    NoSmart {
        /// Why, in smartctl's words where it gave some.
        reason: String,
    },
    /// SMART could not be read this time: smartctl missing, timed out, could not open the device,
    /// or printed something unparsable.
    Failed {
        /// What went wrong, for the operator.
        reason: String,
    },
}

/// A SMART self-test's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelfTestKind {
    /// A few minutes: electrical and mechanical checks, a read scan of part of the surface.
    Short,
    /// Extended: a read scan of the whole surface; hours on a large HDD.
    Long,
}

impl std::fmt::Display for SelfTestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SelfTestKind::Short => "short",
            SelfTestKind::Long => "long",
        })
    }
}

/// The drive's self-test state, from its self-test log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelfTestStatus {
    /// A self-test is running now.
    Running {
        /// Its kind, when the drive says.
        kind: Option<SelfTestKind>,
        /// How much is left, percent, when the drive says.
        remaining_percent: Option<u8>,
    },
    /// The newest entry of the self-test log.
    Completed {
        /// Its kind, when it was a short or long test.
        kind: Option<SelfTestKind>,
        /// Whether it passed.
        passed: bool,
        /// The drive's words for the result ("Completed without error", "Completed: read failure").
        result: String,
        /// Power-on hours when it ended.
        power_on_hours: Option<u64>,
    },
}

/// The filesystem a prepared drive gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filesystem {
    /// ext4 (`mkfs.ext4`, e2fsprogs).
    #[default]
    Ext4,
    /// XFS (`mkfs.xfs`, xfsprogs).
    Xfs,
}

impl Filesystem {
    /// The name `mount(2)` and `mkfs.<name>` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Xfs => "xfs",
        }
    }
}

impl std::fmt::Display for Filesystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Filesystem {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ext4" => Ok(Filesystem::Ext4),
            "xfs" => Ok(Filesystem::Xfs),
            other => Err(format!("unsupported filesystem {other:?}: ext4 or xfs")),
        }
    }
}

/// A drive shoal prepared: one GPT partition holding one filesystem, mounted by its UUID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedDrive {
    /// Kernel name of the partition (`sdb1`, `nvme1n1p1`).
    pub partition: String,
    /// Its filesystem.
    pub filesystem: Filesystem,
    /// The filesystem's UUID, which the mount is made by.
    pub fs_uuid: String,
    /// The filesystem's label.
    pub label: String,
    /// Where it is (or was) mounted.
    pub mount_point: String,
}

impl std::fmt::Display for PreparedDrive {
    /// `sdb1 ext4 (UUID …, label shoal-…) on /var/lib/shoal/drives/…`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} (UUID {}, label {}) on {}",
            self.partition, self.filesystem, self.fs_uuid, self.label, self.mount_point
        )
    }
}

/// What a drive holds as the agent found it, and what the agent did with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriveState {
    /// No partition table, filesystem, volume or RAID signature anywhere the agent probes.
    Blank,
    /// Blank, and the node's policy is `approve`: waiting for `shoalctl drives prepare`.
    AwaitingApproval,
    /// Something is on it. shoal never writes it unless told to with `--force` and its serial
    /// number.
    HasData {
        /// What was found ("gpt", "ext4", "LVM2 physical volume"...).
        signatures: Vec<String>,
    },
    /// Being partitioned, formatted and mounted now.
    Preparing,
    /// Prepared by shoal and mounted.
    Prepared(PreparedDrive),
    /// A prepared drive that disappeared; its mount was detached.
    Missing(PreparedDrive),
    /// Preparing failed; nothing further is attempted until the operator asks again.
    PrepareFailed {
        /// What failed, for the operator.
        reason: String,
    },
    /// The agent could not read the drive's first and last blocks, so it cannot tell whether it is
    /// blank.
    Unreadable {
        /// Why.
        reason: String,
    },
}

impl DriveState {
    /// The operator-facing name: `blank`, `awaiting-approval`, `has-data`, `preparing`, `prepared`,
    /// `missing`, `prepare-failed`, `unreadable`.
    pub fn as_str(&self) -> &'static str {
        match self {
            DriveState::Blank => "blank",
            DriveState::AwaitingApproval => "awaiting-approval",
            DriveState::HasData { .. } => "has-data",
            DriveState::Preparing => "preparing",
            DriveState::Prepared(_) => "prepared",
            DriveState::Missing(_) => "missing",
            DriveState::PrepareFailed { .. } => "prepare-failed",
            DriveState::Unreadable { .. } => "unreadable",
        }
    }
}

/// One drive in a [`DriveReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    /// Kernel name of the whole-disk block device (`sda`, `nvme0n1`), as in the inventory's disks.
    pub name: String,
    /// Model, from sysfs (SMART's model is in `smart`).
    pub model: Option<String>,
    /// Serial number, from sysfs or SMART.
    pub serial: Option<String>,
    /// Size in bytes.
    pub size_bytes: u64,
    /// The kernel marks the device removable (USB sticks, card readers).
    pub removable: bool,
    /// What it holds.
    pub state: DriveState,
    /// What SMART said at `smart_at`; `None` until the first read.
    pub smart: Option<SmartOutcome>,
    /// When SMART was last read.
    pub smart_at: Option<UnixMillis>,
}

/// (v3) All of a machine's drives: sent whole whenever one changes and after every SMART read.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DriveReport {
    /// When the agent assembled it.
    pub at: UnixMillis,
    /// One entry per drive the agent's drive match admits, plus prepared drives that went missing.
    pub drives: Vec<Drive>,
}

/// What a node does with a drive that appears.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum DrivePolicyMode {
    /// Report it, nothing else. The default.
    #[default]
    Report,
    /// Wait for `shoalctl drives prepare NODE DEVICE`.
    Approve,
    /// Prepare it at once if, and only if, it is blank and its SMART is not failing.
    Prepare,
}

impl DrivePolicyMode {
    /// `report`, `approve`, `prepare`.
    pub fn as_str(self) -> &'static str {
        match self {
            DrivePolicyMode::Report => "report",
            DrivePolicyMode::Approve => "approve",
            DrivePolicyMode::Prepare => "prepare",
        }
    }
}

impl std::fmt::Display for DrivePolicyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DrivePolicyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "report" => Ok(DrivePolicyMode::Report),
            "approve" => Ok(DrivePolicyMode::Approve),
            "prepare" => Ok(DrivePolicyMode::Prepare),
            other => Err(format!(
                "unknown drive policy {other:?}: report, approve or prepare"
            )),
        }
    }
}

/// (v3) A node's drive policy, sent after Welcome and whenever it changes; the agent keeps the last
/// one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DrivePolicy {
    /// What to do with a new drive.
    pub mode: DrivePolicyMode,
    /// The filesystem prepared drives get.
    pub filesystem: Filesystem,
}

/// What the controller asks an agent to do with one drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriveAction {
    /// Prepare it. A drive that is not blank is refused unless `force_serial` equals its serial
    /// number.
    Prepare {
        /// The operator's `--force --serial`.
        force_serial: Option<String>,
        /// The filesystem; the node's policy's when `None`.
        filesystem: Option<Filesystem>,
    },
    /// Start a SMART self-test.
    SelfTest(SelfTestKind),
}

/// (v3) A command for one drive; answered by [`DriveCommandResult`] with the same id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveCommand {
    /// Chosen by the controller, echoed in the result.
    pub id: u64,
    /// Kernel name of the drive (`sdb`).
    pub device: String,
    /// What to do.
    pub action: DriveAction,
}

/// (v3) How a [`DriveCommand`] ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveCommandResult {
    /// The command's id.
    pub id: u64,
    /// What was done, or why not, for the operator.
    pub result: Result<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_bits_decode_individually() {
        let s = SmartExitStatus(216); // 0b1101_1000
        assert!(!s.command_line_error() && !s.open_failed() && !s.smart_command_failed());
        assert!(s.disk_failing() && s.prefail_below_threshold() && !s.past_below_threshold());
        assert!(s.error_log_has_errors() && s.self_test_errors());
        assert!(SmartExitStatus(1).command_line_error());
        assert!(SmartExitStatus(2).open_failed());
        assert!(SmartExitStatus(4).smart_command_failed());
        assert!(SmartExitStatus(32).past_below_threshold());
    }

    #[test]
    fn spare_is_judged_against_the_drives_threshold_and_unfilled_fields_are_not_judged() {
        let nvme = |spare, threshold| SmartReport {
            device: "/dev/nvme0".into(),
            protocol: DriveProtocol::Nvme,
            model: None,
            serial: None,
            firmware: None,
            capacity_bytes: None,
            temperature_celsius: None,
            power_on_hours: None,
            health_passed: Some(true),
            exit_status: SmartExitStatus(0),
            predictors: SmartPredictors::Nvme(NvmePredictors {
                available_spare: Some(spare),
                available_spare_threshold: Some(threshold),
                ..Default::default()
            }),
            self_test: None,
        };
        assert_eq!(
            nvme(4, 5).spare_below_threshold(10),
            Some((4, 5)),
            "the drive's own threshold"
        );
        assert_eq!(nvme(6, 5).spare_below_threshold(10), None);
        assert_eq!(
            nvme(7, 0).spare_below_threshold(10),
            Some((7, 10)),
            "no threshold reported: the fallback"
        );
        assert_eq!(
            nvme(0, 0).spare_below_threshold(10),
            None,
            "qemu leaves both at 0"
        );
        assert!(!nvme(0, 0).health_failed() && nvme(0, 0).critical_warning().is_none());
    }

    #[test]
    fn report_round_trips_through_postcard() {
        let report = SmartReport {
            device: "/dev/nvme0".into(),
            protocol: DriveProtocol::Nvme,
            model: Some("m".into()),
            serial: None,
            firmware: None,
            capacity_bytes: Some(1),
            temperature_celsius: Some(-3),
            power_on_hours: Some(10),
            health_passed: Some(true),
            exit_status: SmartExitStatus(0),
            predictors: SmartPredictors::Nvme(NvmePredictors {
                critical_warning: Some(0),
                ..Default::default()
            }),
            self_test: Some(SelfTestStatus::Running {
                kind: Some(SelfTestKind::Short),
                remaining_percent: Some(90),
            }),
        };
        let bytes = postcard::to_stdvec(&report).expect("encode");
        let back: SmartReport = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back, report);
    }

    #[test]
    fn drives_message_is_appended_after_the_v2_variants() {
        use crate::{AgentMsg, Punch};
        // postcard writes the variant index first: v1/v2 indices must not move.
        let punch = postcard::to_stdvec(&AgentMsg::Punch(Punch {
            peer: crate::NodeId("n".into()),
            endpoints: vec![],
        }))
        .expect("encode");
        assert_eq!(punch[0], 7);
        let report = DriveReport {
            at: UnixMillis(5),
            drives: vec![
                Drive {
                    name: "vda".into(),
                    model: None,
                    serial: None,
                    size_bytes: 1 << 30,
                    removable: false,
                    state: DriveState::HasData {
                        signatures: vec!["gpt".into()],
                    },
                    smart: Some(SmartOutcome::NoSmart {
                        reason: "virtio".into(),
                    }),
                    smart_at: Some(UnixMillis(4)),
                },
                Drive {
                    name: "sda".into(),
                    model: Some("m".into()),
                    serial: Some("s".into()),
                    size_bytes: 1 << 40,
                    removable: false,
                    state: DriveState::Blank,
                    smart: Some(SmartOutcome::Failed {
                        reason: "timed out".into(),
                    }),
                    smart_at: None,
                },
            ],
        };
        let bytes = postcard::to_stdvec(&AgentMsg::Drives(report.clone())).expect("encode");
        assert_eq!(bytes[0], 8);
        assert_eq!(
            postcard::from_bytes::<AgentMsg>(&bytes).expect("decode"),
            AgentMsg::Drives(report)
        );
    }
}
