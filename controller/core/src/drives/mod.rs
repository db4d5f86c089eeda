//! Drive health verdicts from SMART history.
//!
//! The controller keeps each drive's recent [`SmartSample`]s. [`verdict`] judges the latest one
//! against that history: a drive whose reallocated or pending sector count is climbing gets a
//! `warning` before its own overall-health check says FAILED. This module is a sans-IO core: no
//! store, no clock; samples carry the time they were taken.
//!
//! Rules, in order of severity:
//! - **failing**: the drive's overall-health self-assessment failed (or smartctl's "disk failing"
//!   exit bit is set); an NVMe critical warning bit is set; NVMe available spare is below the
//!   drive's own threshold (or [`VerdictConfig::min_available_spare_percent`] when it reports
//!   none).
//! - **warning**: a failure counter rose within the history window (ATA 5 reallocated, 197 pending,
//!   198 offline-uncorrectable; NVMe media errors; SCSI grown defects and uncorrected read/write
//!   errors); NVMe percentage used at or above [`VerdictConfig::wear_warning_percent`]; temperature
//!   above [`VerdictConfig::max_temperature_celsius`]; smartctl's "prefail attribute at or below
//!   threshold" exit bit.
//!
//! A counter "rose" when the latest value is above the lowest value the same drive reported in the
//! history given. That includes a rise since the previous sample, and keeps the warning up for as
//! long as the rise stays within the window the caller keeps, so one report interval cannot hide
//! it. A counter that falls back (pending sectors remapped or rewritten) clears the warning. The
//! first sample of a drive has nothing to compare with, so counters alone cannot warn on it.

pub mod fleet;
pub mod policy;

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use shoal_proto::{NodeId, SmartPredictors, SmartReport, UnixMillis};

/// Thresholds for drive verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerdictConfig {
    /// A drive hotter than this (°C) gets a warning. Default 60, the upper operating limit most HDD
    /// data sheets give; NVMe drives throttle around 70–80 and report that as a critical warning.
    pub max_temperature_celsius: i32,
    /// NVMe percentage used at or above this gets a warning. Default 90.
    pub wear_warning_percent: u8,
    /// NVMe available spare below this (percent) is failing when the drive reports no threshold of
    /// its own. Default 10, the threshold most drives report.
    pub min_available_spare_percent: u8,
}

impl Default for VerdictConfig {
    fn default() -> Self {
        Self {
            max_temperature_celsius: 60,
            wear_warning_percent: 90,
            min_available_spare_percent: shoal_proto::DEFAULT_SPARE_THRESHOLD_PERCENT,
        }
    }
}

/// One SMART report as the controller received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmartSample {
    /// When the agent took it.
    pub at: UnixMillis,
    /// What smartctl said.
    pub report: SmartReport,
}

/// A failure counter the verdict watches for a rise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Counter {
    /// ATA attribute 5, `Reallocated_Sector_Ct`.
    Reallocated,
    /// ATA attribute 197, `Current_Pending_Sector`.
    Pending,
    /// ATA attribute 198, `Offline_Uncorrectable`.
    OfflineUncorrectable,
    /// NVMe media and data integrity errors.
    MediaErrors,
    /// SCSI grown defect list.
    GrownDefects,
    /// SCSI uncorrected read errors.
    ReadUncorrected,
    /// SCSI uncorrected write errors.
    WriteUncorrected,
}

impl std::fmt::Display for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Counter::Reallocated => "reallocated sectors (ATA 5)",
            Counter::Pending => "pending sectors (ATA 197)",
            Counter::OfflineUncorrectable => "offline uncorrectable sectors (ATA 198)",
            Counter::MediaErrors => "NVMe media errors",
            Counter::GrownDefects => "SCSI grown defects",
            Counter::ReadUncorrected => "SCSI uncorrected read errors",
            Counter::WriteUncorrected => "SCSI uncorrected write errors",
        })
    }
}

/// Why a drive is not `ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Reason {
    /// The drive's overall-health self-assessment failed.
    HealthCheckFailed,
    /// NVMe critical warning bits are set.
    CriticalWarning {
        /// The bit field as the drive reports it.
        bits: u8,
    },
    /// NVMe available spare is below its threshold.
    SpareBelowThreshold {
        /// Available spare, percent.
        spare: u8,
        /// The threshold, percent.
        threshold: u8,
    },
    /// A failure counter rose within the history window.
    CounterRose {
        /// Which counter.
        counter: Counter,
        /// The lowest value in the window.
        from: u64,
        /// The latest value.
        to: u64,
    },
    /// NVMe percentage used is at or above the warning level.
    WornOut {
        /// Percentage used (may exceed 100).
        percentage_used: u8,
    },
    /// The drive is hotter than the configured limit.
    TooHot {
        /// Current temperature, °C.
        celsius: i32,
        /// The limit, °C.
        limit: i32,
    },
    /// smartctl found a prefail attribute at or below its threshold (exit bit 4).
    PrefailAttributeAtThreshold,
}

/// NVMe critical warning bits, in the NVMe base specification's order.
const CRITICAL_WARNING_BITS: [&str; 6] = [
    "spare below threshold",
    "temperature out of range",
    "reliability degraded",
    "media read-only",
    "volatile memory backup failed",
    "persistent memory region read-only",
];

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::HealthCheckFailed => f.write_str("overall health self-assessment FAILED"),
            Reason::CriticalWarning { bits } => {
                let names: Vec<&str> = CRITICAL_WARNING_BITS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| bits & (1 << i) != 0)
                    .map(|(_, name)| *name)
                    .collect();
                if names.is_empty() {
                    write!(f, "NVMe critical warning 0x{bits:02x}")
                } else {
                    write!(
                        f,
                        "NVMe critical warning 0x{bits:02x}: {}",
                        names.join(", ")
                    )
                }
            }
            Reason::SpareBelowThreshold { spare, threshold } => {
                write!(f, "available spare {spare}% below threshold {threshold}%")
            }
            Reason::CounterRose { counter, from, to } => {
                write!(
                    f,
                    "{counter} rose by {} ({from} -> {to})",
                    to.saturating_sub(*from)
                )
            }
            Reason::WornOut { percentage_used } => {
                write!(f, "{percentage_used}% of rated life used")
            }
            Reason::TooHot { celsius, limit } => {
                write!(f, "temperature {celsius} °C above limit {limit} °C")
            }
            Reason::PrefailAttributeAtThreshold => {
                f.write_str("a prefail attribute is at or below its threshold")
            }
        }
    }
}

/// A drive's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "verdict", content = "reasons")]
pub enum Verdict {
    /// Nothing to report.
    Ok,
    /// Watch it: something is degrading.
    Warning(Vec<Reason>),
    /// Replace it. The reasons list the failing ones first, then any warnings.
    Failing(Vec<Reason>),
}

impl Verdict {
    /// `ok`, `warning` or `failing`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warning(_) => "warning",
            Verdict::Failing(_) => "failing",
        }
    }

    /// The reasons (empty for `ok`).
    pub fn reasons(&self) -> &[Reason] {
        match self {
            Verdict::Ok => &[],
            Verdict::Warning(r) | Verdict::Failing(r) => r,
        }
    }
}

/// Judge the `latest` sample of a drive against its earlier samples (`history`, any order; samples
/// of other drives in it are ignored).
pub fn verdict(history: &[SmartSample], latest: &SmartSample, config: &VerdictConfig) -> Verdict {
    let report = &latest.report;
    let mut failing = Vec::new();
    let mut warning = Vec::new();

    if report.health_failed() {
        failing.push(Reason::HealthCheckFailed);
    }
    if report.exit_status.prefail_below_threshold() {
        warning.push(Reason::PrefailAttributeAtThreshold);
    }
    if let Some(bits) = report.critical_warning() {
        failing.push(Reason::CriticalWarning { bits });
    }
    if let Some((spare, threshold)) =
        report.spare_below_threshold(config.min_available_spare_percent)
    {
        failing.push(Reason::SpareBelowThreshold { spare, threshold });
    }
    if let SmartPredictors::Nvme(nvme) = &report.predictors {
        if let Some(used) = nvme
            .percentage_used
            .filter(|u| *u >= config.wear_warning_percent)
        {
            warning.push(Reason::WornOut {
                percentage_used: used,
            });
        }
    }

    let earlier: Vec<&SmartReport> = history
        .iter()
        .map(|s| &s.report)
        .filter(|r| same_drive(r, report))
        .collect();
    for (counter, to) in counters(&report.predictors) {
        let from = earlier
            .iter()
            .filter_map(|r| counter_value(&r.predictors, counter))
            .min();
        if let Some(from) = from.filter(|from| to > *from) {
            warning.push(Reason::CounterRose { counter, from, to });
        }
    }

    if let Some(celsius) = report
        .temperature_celsius
        .filter(|c| *c > config.max_temperature_celsius)
    {
        warning.push(Reason::TooHot {
            celsius,
            limit: config.max_temperature_celsius,
        });
    }

    if !failing.is_empty() {
        failing.extend(warning);
        Verdict::Failing(failing)
    } else if !warning.is_empty() {
        Verdict::Warning(warning)
    } else {
        Verdict::Ok
    }
}

/// How much SMART history the controller keeps per drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Samples older than this (relative to the newest) are dropped. Default 7 days: a rise is
    /// reported for a week, long enough for an operator to see it at a weekly look.
    pub window_ms: u64,
    /// At most this many samples per drive, oldest dropped first. Default 2016 (one per 5 min for a
    /// week).
    pub max_samples: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            window_ms: 7 * 24 * 3_600_000,
            max_samples: 2016,
        }
    }
}

/// The SMART history of every drive in the fleet, kept in memory; sans-IO (times come from
/// samples).
#[derive(Debug, Default)]
pub struct DriveHistory {
    config: HistoryConfig,
    drives: BTreeMap<(NodeId, String), VecDeque<SmartSample>>,
}

impl DriveHistory {
    /// An empty history.
    pub fn new(config: HistoryConfig) -> Self {
        Self {
            config,
            drives: BTreeMap::new(),
        }
    }

    /// Record a node's sample and judge it against the same drive's earlier samples in the window.
    pub fn record(
        &mut self,
        node: &NodeId,
        sample: SmartSample,
        config: &VerdictConfig,
    ) -> Verdict {
        let samples = self
            .drives
            .entry((node.clone(), drive_key(&sample.report)))
            .or_default();
        let oldest = sample.at.0.saturating_sub(self.config.window_ms);
        // Samples "newer" than this one can only come from an agent clock that jumped back: drop
        // them with the expired ones, so the history stays in time order.
        samples.retain(|s| s.at.0 >= oldest && s.at <= sample.at);
        let v = verdict(samples.make_contiguous(), &sample, config);
        samples.push_back(sample);
        while samples.len() > self.config.max_samples.max(1) {
            samples.pop_front();
        }
        v
    }

    /// The samples kept for one drive of a node (by serial, or device path when it has none),
    /// oldest first.
    pub fn samples(&self, node: &NodeId, key: &str) -> impl Iterator<Item = &SmartSample> {
        self.drives
            .get(&(node.clone(), key.to_owned()))
            .into_iter()
            .flatten()
    }

    /// Forget one drive's history.
    pub fn forget_drive(&mut self, node: &NodeId, key: &str) {
        self.drives.remove(&(node.clone(), key.to_owned()));
    }

    /// Forget a removed node's drives.
    pub fn forget_node(&mut self, node: &NodeId) {
        self.drives.retain(|(n, _), _| n != node);
    }

    /// Drives with history.
    pub fn drive_count(&self) -> usize {
        self.drives.len()
    }
}

/// The key a drive's history is kept under: `serial:<model>/<serial>`, or `device:<path>` without a
/// serial.
pub fn drive_key(report: &SmartReport) -> String {
    match &report.serial {
        Some(serial) => format!("serial:{}/{serial}", report.model.as_deref().unwrap_or("")),
        None => format!("device:{}", report.device),
    }
}

/// Whether two reports are of the same physical drive: the serial when both have one, else the
/// device path. A replaced drive in the same slot starts a fresh history.
fn same_drive(a: &SmartReport, b: &SmartReport) -> bool {
    if a.protocol != b.protocol {
        return false;
    }
    match (&a.serial, &b.serial) {
        (Some(x), Some(y)) => x == y && a.model == b.model,
        _ => a.device == b.device,
    }
}

/// The watched counters a report has, with their values (the verdict's rises, and the web view's
/// trend charts).
pub fn counters(p: &SmartPredictors) -> Vec<(Counter, u64)> {
    use Counter::*;
    let all: &[Counter] = match p {
        SmartPredictors::Ata(_) => &[Reallocated, Pending, OfflineUncorrectable],
        SmartPredictors::Nvme(_) => &[MediaErrors],
        SmartPredictors::Scsi(_) => &[GrownDefects, ReadUncorrected, WriteUncorrected],
    };
    all.iter()
        .filter_map(|c| Some((*c, counter_value(p, *c)?)))
        .collect()
}

fn counter_value(p: &SmartPredictors, counter: Counter) -> Option<u64> {
    match (p, counter) {
        (SmartPredictors::Ata(a), Counter::Reallocated) => a.reallocated_sectors,
        (SmartPredictors::Ata(a), Counter::Pending) => a.pending_sectors,
        (SmartPredictors::Ata(a), Counter::OfflineUncorrectable) => a.offline_uncorrectable,
        (SmartPredictors::Nvme(n), Counter::MediaErrors) => n.media_errors,
        (SmartPredictors::Scsi(s), Counter::GrownDefects) => s.grown_defects,
        (SmartPredictors::Scsi(s), Counter::ReadUncorrected) => s.read_uncorrected,
        (SmartPredictors::Scsi(s), Counter::WriteUncorrected) => s.write_uncorrected,
        _ => None,
    }
}

crate::event_kinds! {
    /// What drives log.
    pub enum DriveEvent {
        /// A node reported a drive it did not report before (or a missing prepared drive came
        /// back).
        Appeared => "drive_appeared",
        /// A drive is no longer reported.
        Removed => "drive_removed",
        /// A node prepared a drive (partitioned, formatted, mounted).
        Prepared => "drive_prepared",
        /// Preparing a drive failed.
        PrepareFailed => "drive_prepare_failed",
        /// A prepared drive vanished: an alarm.
        Missing => "drive_missing",
        /// A drive's SMART verdict changed level (ok, warning, failing).
        VerdictChanged => "drive_verdict_changed",
        /// A drive's SMART self-test ended (passed or failed).
        SelfTestCompleted => "drive_self_test_completed",
        /// An operator set or deleted a drive policy.
        PolicyChanged => "drive_policy_changed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{
        AtaPredictors, DriveProtocol, NvmePredictors, ScsiPredictors, SmartExitStatus,
    };

    fn report(predictors: SmartPredictors) -> SmartReport {
        let protocol = match predictors {
            SmartPredictors::Ata(_) => DriveProtocol::Ata,
            SmartPredictors::Nvme(_) => DriveProtocol::Nvme,
            SmartPredictors::Scsi(_) => DriveProtocol::Scsi,
        };
        SmartReport {
            device: "/dev/sda".into(),
            protocol,
            model: Some("model".into()),
            serial: Some("SERIAL1".into()),
            firmware: Some("fw".into()),
            capacity_bytes: Some(1 << 40),
            temperature_celsius: Some(35),
            power_on_hours: Some(1000),
            health_passed: Some(true),
            exit_status: SmartExitStatus(0),
            predictors,
            self_test: None,
        }
    }

    fn ata(reallocated: u64, pending: u64, offline: u64) -> SmartPredictors {
        SmartPredictors::Ata(AtaPredictors {
            reallocated_sectors: Some(reallocated),
            reported_uncorrectable: Some(0),
            command_timeouts: Some(0),
            pending_sectors: Some(pending),
            offline_uncorrectable: Some(offline),
        })
    }

    fn nvme(critical: u8, media: u64, used: u8, spare: u8) -> SmartPredictors {
        SmartPredictors::Nvme(NvmePredictors {
            critical_warning: Some(critical),
            media_errors: Some(media),
            percentage_used: Some(used),
            available_spare: Some(spare),
            available_spare_threshold: Some(10),
        })
    }

    fn sample(hours: u64, report: SmartReport) -> SmartSample {
        SmartSample {
            at: UnixMillis(hours * 3_600_000),
            report,
        }
    }

    fn judge(history: &[SmartSample], latest: &SmartSample) -> Verdict {
        verdict(history, latest, &VerdictConfig::default())
    }

    #[test]
    fn healthy_drive_is_ok() {
        let s = sample(0, report(ata(0, 0, 0)));
        assert_eq!(judge(&[], &s), Verdict::Ok);
        let s = sample(0, report(nvme(0, 0, 3, 100)));
        assert_eq!(judge(&[], &s), Verdict::Ok);
    }

    #[test]
    fn rising_pending_count_turns_ok_into_warning_before_the_drive_fails() {
        let mut history = Vec::new();
        let first = sample(0, report(ata(0, 0, 0)));
        assert_eq!(judge(&history, &first), Verdict::Ok);
        history.push(first);

        let second = sample(1, report(ata(0, 8, 0)));
        let v = judge(&history, &second);
        assert_eq!(
            v,
            Verdict::Warning(vec![Reason::CounterRose {
                counter: Counter::Pending,
                from: 0,
                to: 8
            }])
        );
        assert_eq!(
            v.reasons()[0].to_string(),
            "pending sectors (ATA 197) rose by 8 (0 -> 8)"
        );
        history.push(second);

        // Still 8 an hour later: the rise is within the window, so the warning stays.
        let third = sample(2, report(ata(0, 8, 0)));
        assert_eq!(judge(&history, &third).as_str(), "warning");
        history.push(third);

        // The drive's own check is still PASSED while reallocations climb too.
        let fourth = sample(3, report(ata(24, 16, 2)));
        let v = judge(&history, &fourth);
        assert_eq!(
            v,
            Verdict::Warning(vec![
                Reason::CounterRose {
                    counter: Counter::Reallocated,
                    from: 0,
                    to: 24
                },
                Reason::CounterRose {
                    counter: Counter::Pending,
                    from: 0,
                    to: 16
                },
                Reason::CounterRose {
                    counter: Counter::OfflineUncorrectable,
                    from: 0,
                    to: 2
                },
            ])
        );
    }

    #[test]
    fn stable_nonzero_counts_and_falling_counts_are_ok() {
        let history = [
            sample(0, report(ata(5, 3, 0))),
            sample(1, report(ata(5, 3, 0))),
        ];
        assert_eq!(
            judge(&history, &sample(2, report(ata(5, 3, 0)))),
            Verdict::Ok
        );
        // Pending sectors rewritten successfully: the count falls.
        assert_eq!(
            judge(&history, &sample(2, report(ata(5, 0, 0)))),
            Verdict::Ok
        );
        // A rise that left the window (history trimmed by the caller) no longer warns.
        let window = [sample(1, report(ata(9, 3, 0)))];
        assert_eq!(
            judge(&window, &sample(2, report(ata(9, 3, 0)))),
            Verdict::Ok
        );
    }

    #[test]
    fn another_drive_in_the_same_slot_is_not_compared() {
        let old = sample(0, report(ata(0, 0, 0)));
        let mut replacement = report(ata(3, 0, 0));
        replacement.serial = Some("SERIAL2".into());
        assert_eq!(judge(&[old], &sample(1, replacement)), Verdict::Ok);
    }

    #[test]
    fn failed_self_assessment_is_failing_and_keeps_warnings() {
        let history = [sample(0, report(ata(1000, 0, 0)))];
        let mut r = report(ata(1975, 8, 0));
        r.health_passed = Some(false);
        r.exit_status = SmartExitStatus(216);
        let v = judge(&history, &sample(1, r));
        assert_eq!(
            v,
            Verdict::Failing(vec![
                Reason::HealthCheckFailed,
                Reason::PrefailAttributeAtThreshold,
                Reason::CounterRose {
                    counter: Counter::Reallocated,
                    from: 1000,
                    to: 1975
                },
                Reason::CounterRose {
                    counter: Counter::Pending,
                    from: 0,
                    to: 8
                },
            ])
        );
        assert_eq!(v.as_str(), "failing");
    }

    #[test]
    fn disk_failing_exit_bit_alone_is_failing() {
        let mut r = report(ata(0, 0, 0));
        r.health_passed = None;
        r.exit_status = SmartExitStatus(0x08);
        assert_eq!(
            judge(&[], &sample(0, r)),
            Verdict::Failing(vec![Reason::HealthCheckFailed])
        );
    }

    #[test]
    fn nvme_critical_warning_and_low_spare_are_failing() {
        let v = judge(&[], &sample(0, report(nvme(0x01, 0, 20, 5))));
        assert_eq!(
            v,
            Verdict::Failing(vec![
                Reason::CriticalWarning { bits: 1 },
                Reason::SpareBelowThreshold {
                    spare: 5,
                    threshold: 10
                },
            ])
        );
        assert_eq!(
            v.reasons()[0].to_string(),
            "NVMe critical warning 0x01: spare below threshold"
        );
        let v = judge(&[], &sample(0, report(nvme(0x0c, 0, 20, 100))));
        assert_eq!(
            v.reasons()[0].to_string(),
            "NVMe critical warning 0x0c: reliability degraded, media read-only"
        );
    }

    #[test]
    fn spare_falls_back_to_configured_threshold_when_drive_reports_none() {
        let SmartPredictors::Nvme(mut p) = nvme(0, 0, 0, 7) else {
            unreachable!()
        };
        p.available_spare_threshold = None;
        let s = sample(0, report(SmartPredictors::Nvme(p)));
        assert_eq!(
            judge(&[], &s),
            Verdict::Failing(vec![Reason::SpareBelowThreshold {
                spare: 7,
                threshold: 10
            }])
        );
        let lenient = VerdictConfig {
            min_available_spare_percent: 5,
            ..Default::default()
        };
        assert_eq!(verdict(&[], &s, &lenient), Verdict::Ok);
    }

    #[test]
    fn an_nvme_drive_that_leaves_spare_and_threshold_at_zero_is_not_failing() {
        // qemu's emulated NVMe reports available_spare 0 and threshold 0: unfilled, not exhausted.
        let SmartPredictors::Nvme(mut p) = nvme(0, 0, 0, 0) else {
            unreachable!()
        };
        p.available_spare_threshold = Some(0);
        assert_eq!(
            judge(&[], &sample(0, report(SmartPredictors::Nvme(p)))),
            Verdict::Ok
        );
    }

    #[test]
    fn nvme_wear_and_media_errors_warn() {
        let history = [sample(0, report(nvme(0, 0, 89, 100)))];
        let v = judge(&history, &sample(1, report(nvme(0, 7, 90, 100))));
        assert_eq!(
            v,
            Verdict::Warning(vec![
                Reason::WornOut {
                    percentage_used: 90
                },
                Reason::CounterRose {
                    counter: Counter::MediaErrors,
                    from: 0,
                    to: 7
                },
            ])
        );
        assert_eq!(
            judge(&[], &sample(1, report(nvme(0, 0, 89, 100)))),
            Verdict::Ok
        );
    }

    #[test]
    fn temperature_above_configured_limit_warns() {
        let mut r = report(ata(0, 0, 0));
        r.temperature_celsius = Some(61);
        let s = sample(0, r);
        assert_eq!(
            judge(&[], &s),
            Verdict::Warning(vec![Reason::TooHot {
                celsius: 61,
                limit: 60
            }])
        );
        let cool_room = VerdictConfig {
            max_temperature_celsius: 65,
            ..Default::default()
        };
        assert_eq!(verdict(&[], &s, &cool_room), Verdict::Ok);
    }

    #[test]
    fn scsi_grown_defects_rising_warns() {
        let scsi = |g| {
            SmartPredictors::Scsi(ScsiPredictors {
                grown_defects: Some(g),
                read_uncorrected: Some(0),
                write_uncorrected: Some(0),
            })
        };
        let history = [sample(0, report(scsi(56)))];
        assert_eq!(judge(&history, &sample(1, report(scsi(56)))), Verdict::Ok);
        assert_eq!(
            judge(&history, &sample(1, report(scsi(60)))),
            Verdict::Warning(vec![Reason::CounterRose {
                counter: Counter::GrownDefects,
                from: 56,
                to: 60
            }])
        );
    }

    #[test]
    fn verdict_serializes_for_the_admin_api() {
        let v = Verdict::Warning(vec![Reason::CounterRose {
            counter: Counter::Pending,
            from: 0,
            to: 8,
        }]);
        let json = serde_json::to_value(&v).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"verdict": "warning", "reasons": [{"kind": "counter_rose", "counter": "pending", "from": 0, "to": 8}]})
        );
        assert_eq!(
            serde_json::to_value(Verdict::Ok).expect("json"),
            serde_json::json!({"verdict": "ok"})
        );
    }

    #[test]
    fn history_turns_a_rise_into_a_warning_that_lasts_the_window() {
        let node = NodeId("n1".into());
        let cfg = VerdictConfig::default();
        let mut h = DriveHistory::new(HistoryConfig {
            window_ms: 24 * 3_600_000,
            max_samples: 100,
        });
        assert_eq!(
            h.record(&node, sample(0, report(ata(0, 0, 0))), &cfg),
            Verdict::Ok
        );
        assert_eq!(
            h.record(&node, sample(1, report(ata(0, 0, 0))), &cfg),
            Verdict::Ok
        );
        let v = h.record(&node, sample(2, report(ata(0, 4, 0))), &cfg);
        assert_eq!(
            v,
            Verdict::Warning(vec![Reason::CounterRose {
                counter: Counter::Pending,
                from: 0,
                to: 4
            }])
        );
        // Flat at 4 for the rest of the day: still a warning.
        assert_eq!(
            h.record(&node, sample(20, report(ata(0, 4, 0))), &cfg)
                .as_str(),
            "warning"
        );
        // A day after the last zero left the window, the drive is judged on its new level.
        assert_eq!(
            h.record(&node, sample(27, report(ata(0, 4, 0))), &cfg),
            Verdict::Ok
        );
        assert_eq!(h.drive_count(), 1);
    }

    #[test]
    fn history_is_per_node_and_per_drive_and_bounded() {
        let cfg = VerdictConfig::default();
        let mut h = DriveHistory::new(HistoryConfig {
            window_ms: u64::MAX,
            max_samples: 3,
        });
        let (a, b) = (NodeId("a".into()), NodeId("b".into()));
        h.record(&a, sample(0, report(ata(0, 0, 0))), &cfg);
        // Node b's drive with the same serial is not node a's drive.
        assert_eq!(
            h.record(&b, sample(1, report(ata(9, 0, 0))), &cfg),
            Verdict::Ok
        );
        // A replacement drive in node a is judged on its own.
        let mut other = report(ata(9, 0, 0));
        other.serial = Some("SERIAL2".into());
        assert_eq!(h.record(&a, sample(1, other), &cfg), Verdict::Ok);
        for hour in 2..10 {
            h.record(&a, sample(hour, report(ata(0, 0, 0))), &cfg);
        }
        let key = drive_key(&report(ata(0, 0, 0)));
        assert_eq!(key, "serial:model/SERIAL1");
        assert_eq!(h.samples(&a, &key).count(), 3);
        h.forget_node(&a);
        assert_eq!(h.samples(&a, &key).count(), 0);
        assert_eq!(h.drive_count(), 1);
    }
}
