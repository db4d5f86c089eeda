//! Drive health values: what an agent learns from `smartctl` about one drive.
//!
//! These are plain values shared by the agent (which parses `smartctl --json` into them) and the
//! controller (which keeps their history and judges a verdict). Protocol 3 carries them in
//! `AgentMsg::Drives` as a [`DriveReport`].
//!
//! Counters are raw values as the drive reports them; `None` means the drive did not report the value,
//! which is different from a reported zero.

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
    /// Bit 5: the status is OK, but usage or prefail attributes were at or below threshold in the past.
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
}

/// What the agent learned about one drive's SMART.
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
    /// SMART could not be read this time: smartctl missing, timed out, could not open the device, or
    /// printed something unparsable.
    Failed {
        /// What went wrong, for the operator.
        reason: String,
    },
}

/// One drive in a [`DriveReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveSmart {
    /// Kernel name of the block device (`sda`, `nvme0n1`), as in the inventory's disks.
    pub name: String,
    /// What SMART said.
    pub outcome: SmartOutcome,
}

/// (v3) The SMART state of a machine's drives.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DriveReport {
    /// When the agent read them.
    pub at: UnixMillis,
    /// One entry per whole-disk block device the agent looked at.
    pub drives: Vec<DriveSmart>,
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
            predictors: SmartPredictors::Nvme(NvmePredictors { critical_warning: Some(0), ..Default::default() }),
        };
        let bytes = postcard::to_stdvec(&report).expect("encode");
        let back: SmartReport = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back, report);
    }

    #[test]
    fn drives_message_is_appended_after_the_v2_variants() {
        use crate::{AgentMsg, Punch};
        // postcard writes the variant index first: v1/v2 indices must not move.
        let punch = postcard::to_stdvec(&AgentMsg::Punch(Punch { peer: crate::NodeId("n".into()), endpoints: vec![] }))
            .expect("encode");
        assert_eq!(punch[0], 7);
        let report = DriveReport {
            at: UnixMillis(5),
            drives: vec![
                DriveSmart { name: "vda".into(), outcome: SmartOutcome::NoSmart { reason: "virtio".into() } },
                DriveSmart { name: "sda".into(), outcome: SmartOutcome::Failed { reason: "timed out".into() } },
            ],
        };
        let bytes = postcard::to_stdvec(&AgentMsg::Drives(report.clone())).expect("encode");
        assert_eq!(bytes[0], 8);
        assert_eq!(postcard::from_bytes::<AgentMsg>(&bytes).expect("decode"), AgentMsg::Drives(report));
    }
}
