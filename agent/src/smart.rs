//! SMART: turn `smartctl --json -a <device>` output and its exit status into a [`SmartReport`].
//!
//! The core is sans-IO: [`parse_smartctl`] takes the bytes smartctl printed and the status it exited
//! with. The thin shell [`read_smart`] runs smartctl with a deadline and turns every way that can go
//! wrong (missing binary, timeout, killed, unparsable) into a [`SmartOutcome`] for the controller.
//!
//! smartctl's JSON is parsed with serde into structs that name only the fields used here, every one
//! optional, so that fields added or dropped between smartctl versions do not break the parse (see
//! `docs/dependencies.md` for why no smartctl crate is used). smartctl 7.0 and later emit JSON.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use shoal_proto::{
    AtaPredictors, DriveProtocol, NvmePredictors, ScsiPredictors, SmartExitStatus, SmartOutcome, SmartPredictors,
    SmartReport,
};
use tracing::debug;

/// How the agent runs smartctl.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmartConfig {
    /// The smartctl binary. Default `smartctl`, looked up on `PATH`.
    pub smartctl: PathBuf,
    /// How long one `smartctl -a` may take before it is killed. Default 30 s: a healthy drive answers in
    /// well under a second, a sick one can stall for the drive's own command timeouts.
    pub timeout: Duration,
}

impl Default for SmartConfig {
    fn default() -> Self {
        Self { smartctl: PathBuf::from("smartctl"), timeout: Duration::from_secs(30) }
    }
}

/// Run `smartctl --json -a <device>` and say what it found. Never fails: a problem is an outcome.
pub async fn read_smart(config: &SmartConfig, device: &str) -> SmartOutcome {
    let mut command = tokio::process::Command::new(&config.smartctl);
    command.args(["--json", "-a", device]).stdin(std::process::Stdio::null()).kill_on_drop(true);
    let output = match tokio::time::timeout(config.timeout, command.output()).await {
        Err(_) => {
            return SmartOutcome::Failed {
                reason: format!("smartctl did not answer within {}", humantime::format_duration(config.timeout)),
            }
        }
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::NotFound => {
            return SmartOutcome::Failed {
                reason: format!("{} not found: install smartmontools", config.smartctl.display()),
            }
        }
        Ok(Err(err)) => {
            return SmartOutcome::Failed { reason: format!("could not run {}: {err}", config.smartctl.display()) }
        }
        Ok(Ok(output)) => output,
    };
    let Some(code) = output.status.code() else {
        return SmartOutcome::Failed { reason: format!("smartctl was killed ({})", output.status) };
    };
    let result = parse_smartctl(&output.stdout, code);
    if let Err(err) = &result {
        debug!(device, exit_status = code, cause = %err, "no SMART report");
    }
    outcome(result)
}

/// The device path to run smartctl on for a whole-disk block device, or why it has no SMART.
///
/// Paravirtual and virtual devices (virtio-blk `vd*`, Xen `xvd*`, loop, ram, zram, nbd, rbd, md, dm)
/// have no SMART: the agent says so without running smartctl. Everything else (`sd*`, `hd*`, `nvme*`,
/// `mmcblk*`…) is tried; smartctl itself then says whether it can read it.
pub fn smart_target(name: &str) -> Result<String, String> {
    const VIRTUAL: &[(&str, &str)] = &[
        ("vd", "virtio-blk"),
        ("xvd", "Xen virtual disk"),
        ("loop", "loop device"),
        ("ram", "RAM disk"),
        ("zram", "compressed RAM disk"),
        ("nbd", "network block device"),
        ("rbd", "Ceph RBD"),
        ("md", "md RAID array (SMART is on its members)"),
        ("dm-", "device-mapper volume (SMART is on its members)"),
    ];
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(format!("{name:?} is not a block device name"));
    }
    match VIRTUAL.iter().find(|(prefix, _)| name.starts_with(prefix)) {
        Some((_, what)) => Err(format!("{what} has no SMART")),
        None => Ok(format!("/dev/{name}")),
    }
}

/// The outcome the controller is told for a parse result.
pub fn outcome(result: Result<SmartReport, SmartError>) -> SmartOutcome {
    match result {
        Ok(report) => SmartOutcome::Report(report),
        Err(SmartError::NoSmart { reason }) => SmartOutcome::NoSmart { reason },
        Err(err) => SmartOutcome::Failed { reason: err.to_string() },
    }
}

/// Why smartctl's output gave no report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SmartError {
    /// The output is not smartctl JSON (truncated, empty, or smartctl too old to print JSON).
    #[error("smartctl output is not valid JSON: {cause}")]
    Malformed {
        /// The parser's complaint.
        cause: String,
    },
    /// The exit status is not one a process can have (negative, or above 255).
    #[error("smartctl exit status {0} is out of range")]
    BadExitStatus(i32),
    /// smartctl could not open the device (exit bit 1): missing, no permission, or asleep.
    #[error("smartctl could not open the device: {message}")]
    OpenFailed {
        /// smartctl's own message.
        message: String,
    },
    /// smartctl refused the command line (exit bit 0) for a reason other than an unknown device type.
    #[error("smartctl refused the command: {message}")]
    CommandFailed {
        /// smartctl's own message.
        message: String,
    },
    /// The device has no SMART: smartctl cannot tell its type (virtio, loop, …) or the device says
    /// SMART is unavailable.
    #[error("no SMART: {reason}")]
    NoSmart {
        /// Why, in smartctl's words where it gave some.
        reason: String,
    },
}

/// smartctl's exit bits 0 (command line) and 1 (open).
const FATAL_BITS: u8 = 0x03;

/// Parse the stdout of `smartctl --json -a <device>` and the status it exited with.
pub fn parse_smartctl(json: &[u8], exit_status: i32) -> Result<SmartReport, SmartError> {
    let exit = u8::try_from(exit_status).map_err(|_| SmartError::BadExitStatus(exit_status))?;
    let exit = SmartExitStatus(exit);
    let out: Output = match serde_json::from_slice(json) {
        Ok(out) => out,
        // With a fatal exit bit, the exit status alone says what happened.
        Err(_) if exit.0 & FATAL_BITS != 0 => Output::default(),
        Err(err) => return Err(SmartError::Malformed { cause: err.to_string() }),
    };
    let message = out.first_error().unwrap_or_else(|| "no message from smartctl".to_owned());
    if exit.open_failed() {
        return Err(SmartError::OpenFailed { message });
    }
    if exit.command_line_error() {
        if message.contains("Unable to detect device type") {
            return Err(SmartError::NoSmart { reason: message });
        }
        return Err(SmartError::CommandFailed { message });
    }
    if let Some(false) = out.smart_support.as_ref().and_then(SmartSupport::available) {
        return Err(SmartError::NoSmart { reason: "the device reports SMART as unavailable".to_owned() });
    }
    let device = out.device.unwrap_or_default();
    let protocol = match device.protocol.as_deref() {
        Some("ATA") => DriveProtocol::Ata,
        Some("NVMe") => DriveProtocol::Nvme,
        Some("SCSI") => DriveProtocol::Scsi,
        Some(other) => {
            return Err(SmartError::NoSmart { reason: format!("smartctl does not read SMART over {other:?}") });
        }
        None => return Err(SmartError::Malformed { cause: "no device.protocol in smartctl output".to_owned() }),
    };
    let predictors = match protocol {
        DriveProtocol::Ata => SmartPredictors::Ata(ata_predictors(out.ata_smart_attributes.as_ref())),
        DriveProtocol::Nvme => SmartPredictors::Nvme(nvme_predictors(out.nvme_smart_health_information_log.as_ref())),
        DriveProtocol::Scsi => SmartPredictors::Scsi(ScsiPredictors {
            grown_defects: out.scsi_grown_defect_list,
            read_uncorrected: out.scsi_error_counter_log.as_ref().and_then(|l| l.read.as_ref()?.total_uncorrected_errors),
            write_uncorrected: out.scsi_error_counter_log.as_ref().and_then(|l| l.write.as_ref()?.total_uncorrected_errors),
        }),
    };
    let temperature_celsius = out
        .temperature
        .and_then(|t| t.current)
        .or_else(|| out.nvme_smart_health_information_log.as_ref().and_then(|l| l.temperature))
        .and_then(|t| i32::try_from(t).ok());
    let power_on_hours = out
        .power_on_time
        .and_then(|p| p.hours)
        .or_else(|| out.nvme_smart_health_information_log.as_ref().and_then(|l| l.power_on_hours));
    let firmware = out.firmware_version.or(if protocol == DriveProtocol::Scsi { out.revision } else { None });
    Ok(SmartReport {
        device: device.name.unwrap_or_default(),
        protocol,
        model: out.model_name.or(out.product).map(|s| s.trim().to_owned()),
        serial: out.serial_number.map(|s| s.trim().to_owned()),
        firmware: firmware.map(|s| s.trim().to_owned()),
        capacity_bytes: out.user_capacity.and_then(|c| c.bytes).or(out.nvme_total_capacity),
        temperature_celsius,
        power_on_hours,
        health_passed: out.smart_status.and_then(|s| s.passed),
        exit_status: exit,
        self_test: None,
        predictors,
    })
}

fn ata_predictors(attributes: Option<&AtaAttributes>) -> AtaPredictors {
    let raw = |id: u8| {
        attributes?.table.iter().find(|a| a.id == Some(u64::from(id))).and_then(|a| a.raw.as_ref()?.value)
    };
    AtaPredictors {
        reallocated_sectors: raw(5),
        reported_uncorrectable: raw(187),
        command_timeouts: raw(188),
        pending_sectors: raw(197),
        offline_uncorrectable: raw(198),
    }
}

fn nvme_predictors(log: Option<&NvmeLog>) -> NvmePredictors {
    let Some(log) = log else { return NvmePredictors::default() };
    let byte = |v: Option<u64>| v.and_then(|v| u8::try_from(v).ok());
    NvmePredictors {
        critical_warning: byte(log.critical_warning),
        media_errors: log.media_errors,
        percentage_used: byte(log.percentage_used),
        available_spare: byte(log.available_spare),
        available_spare_threshold: byte(log.available_spare_threshold),
    }
}

// --- smartctl JSON, only the fields read above, each optional ---

#[derive(Debug, Default, Deserialize)]
struct Output {
    smartctl: Option<Smartctl>,
    device: Option<Device>,
    model_name: Option<String>,
    /// SCSI: the product name when there is no model name.
    product: Option<String>,
    /// SCSI: the product revision, which is the firmware version.
    revision: Option<String>,
    serial_number: Option<String>,
    firmware_version: Option<String>,
    user_capacity: Option<Capacity>,
    nvme_total_capacity: Option<u64>,
    /// An object `{available, enabled}` in current smartctl; kept loose because its shape changed.
    smart_support: Option<SmartSupport>,
    smart_status: Option<SmartStatusJson>,
    temperature: Option<Temperature>,
    power_on_time: Option<PowerOnTime>,
    ata_smart_attributes: Option<AtaAttributes>,
    nvme_smart_health_information_log: Option<NvmeLog>,
    scsi_grown_defect_list: Option<u64>,
    scsi_error_counter_log: Option<ScsiErrorLog>,
}

impl Output {
    fn first_error(&self) -> Option<String> {
        let messages = &self.smartctl.as_ref()?.messages;
        let error = messages.iter().find(|m| m.severity.as_deref() == Some("error")).or(messages.first())?;
        error.string.clone()
    }
}

#[derive(Debug, Default, Deserialize)]
struct Smartctl {
    #[serde(default)]
    messages: Vec<Message>,
}

#[derive(Debug, Deserialize)]
struct Message {
    string: Option<String>,
    severity: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Device {
    name: Option<String>,
    protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Capacity {
    bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SmartSupport {
    Object { available: Option<bool> },
    Bool(bool),
}

impl SmartSupport {
    fn available(&self) -> Option<bool> {
        match self {
            SmartSupport::Object { available } => *available,
            SmartSupport::Bool(b) => Some(*b),
        }
    }
}

#[derive(Debug, Deserialize)]
struct SmartStatusJson {
    passed: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Temperature {
    current: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct PowerOnTime {
    hours: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct AtaAttributes {
    #[serde(default)]
    table: Vec<AtaAttribute>,
}

#[derive(Debug, Deserialize)]
struct AtaAttribute {
    id: Option<u64>,
    raw: Option<RawValue>,
}

#[derive(Debug, Deserialize)]
struct RawValue {
    value: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct NvmeLog {
    critical_warning: Option<u64>,
    temperature: Option<i64>,
    available_spare: Option<u64>,
    available_spare_threshold: Option<u64>,
    percentage_used: Option<u64>,
    power_on_hours: Option<u64>,
    media_errors: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct ScsiErrorLog {
    read: Option<ScsiErrorCounters>,
    write: Option<ScsiErrorCounters>,
}

#[derive(Debug, Deserialize)]
struct ScsiErrorCounters {
    total_uncorrected_errors: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/smart/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
    }

    fn ata(report: &SmartReport) -> AtaPredictors {
        match report.predictors {
            SmartPredictors::Ata(p) => p,
            other => panic!("expected ATA predictors, got {other:?}"),
        }
    }

    fn nvme(report: &SmartReport) -> NvmePredictors {
        match report.predictors {
            SmartPredictors::Nvme(p) => p,
            other => panic!("expected NVMe predictors, got {other:?}"),
        }
    }

    #[test]
    fn healthy_ata_hdd() {
        let r = parse_smartctl(&fixture("ata-hdd-healthy.json"), 0).expect("parse");
        assert_eq!(r.device, "/dev/sda");
        assert_eq!(r.protocol, DriveProtocol::Ata);
        assert_eq!(r.model.as_deref(), Some("ST2000DM006-2DM164"));
        assert_eq!(r.capacity_bytes, Some(2_000_398_934_016));
        assert_eq!(r.temperature_celsius, Some(26));
        assert_eq!(r.power_on_hours, Some(19073));
        assert_eq!(r.health_passed, Some(true));
        assert!(r.serial.is_some() && r.firmware.is_some());
        let p = ata(&r);
        assert_eq!(p.reallocated_sectors, Some(0));
        assert_eq!(p.reported_uncorrectable, Some(0));
        assert_eq!(p.command_timeouts, Some(1));
        assert_eq!(p.pending_sectors, Some(0));
        assert_eq!(p.offline_uncorrectable, Some(0));
    }

    #[test]
    fn healthy_ata_ssd_lacks_some_attributes() {
        let r = parse_smartctl(&fixture("ata-ssd-healthy.json"), 0).expect("parse");
        assert_eq!(r.model.as_deref(), Some("Samsung SSD 850 EVO M.2 250GB"));
        assert_eq!(r.temperature_celsius, Some(25));
        let p = ata(&r);
        assert_eq!(p.reallocated_sectors, Some(0));
        assert_eq!(p.reported_uncorrectable, Some(0));
        // This SSD has no 188/197/198: absent, not zero.
        assert_eq!(p.pending_sectors, None);
        assert_eq!(p.offline_uncorrectable, None);
    }

    #[test]
    fn failing_ata_reports_verdict_counters_and_exit_bits() {
        let r = parse_smartctl(&fixture("ata-failing.json"), 216).expect("parse");
        assert_eq!(r.health_passed, Some(false));
        assert_eq!(r.model.as_deref(), Some("Hitachi HDS721050DLE630"));
        assert_eq!(r.serial.as_deref(), Some("MSK423Y20S3HBC"));
        assert_eq!(r.firmware.as_deref(), Some("MS1OA650"));
        assert_eq!(r.power_on_hours, Some(65592));
        let p = ata(&r);
        assert_eq!(p.reallocated_sectors, Some(1975));
        assert_eq!(p.pending_sectors, Some(8));
        assert_eq!(p.offline_uncorrectable, Some(0));
        assert_eq!(p.reported_uncorrectable, None);
        assert!(r.exit_status.disk_failing());
        assert!(r.exit_status.prefail_below_threshold());
        assert!(r.exit_status.error_log_has_errors() && r.exit_status.self_test_errors());
    }

    #[test]
    fn healthy_nvme() {
        let r = parse_smartctl(&fixture("nvme-healthy.json"), 0).expect("parse");
        assert_eq!(r.protocol, DriveProtocol::Nvme);
        assert_eq!(r.device, "/dev/nvme0");
        assert_eq!(r.model.as_deref(), Some("WDS100T1X0E-00AFY0"));
        assert_eq!(r.capacity_bytes, Some(1_000_204_886_016));
        assert_eq!(r.temperature_celsius, Some(37));
        assert_eq!(r.power_on_hours, Some(10531));
        assert_eq!(r.health_passed, Some(true));
        let p = nvme(&r);
        assert_eq!(p.critical_warning, Some(0));
        assert_eq!(p.media_errors, Some(0));
        assert_eq!(p.percentage_used, Some(0));
        assert_eq!(p.available_spare, Some(100));
        assert_eq!(p.available_spare_threshold, Some(10));
    }

    #[test]
    fn nvme_with_media_errors_and_sensor_array() {
        // The health log also holds `temperature_sensors`, an array: it must not break the parse.
        let r = parse_smartctl(&fixture("nvme-media-errors.json"), 0).expect("parse");
        assert_eq!(r.model.as_deref(), Some("Samsung SSD 970 EVO 500GB"));
        let p = nvme(&r);
        assert_eq!(p.media_errors, Some(7));
        assert_eq!(p.percentage_used, Some(3));
        assert_eq!(p.available_spare, Some(99));
    }

    #[test]
    fn nvme_critical_warning_is_read() {
        // Synthetic variant of a real output: a drive whose spare fell below threshold (bit 0).
        let json = String::from_utf8(fixture("nvme-media-errors.json")).expect("utf-8")
            .replace("\"critical_warning\": 0", "\"critical_warning\": 1")
            .replace("\"available_spare\": 99", "\"available_spare\": 5");
        let r = parse_smartctl(json.as_bytes(), 0).expect("parse");
        assert_eq!(nvme(&r).critical_warning, Some(1));
        assert_eq!(nvme(&r).available_spare, Some(5));
    }

    #[test]
    fn scsi_without_smartctl_section() {
        let r = parse_smartctl(&fixture("scsi-healthy.json"), 0).expect("parse");
        assert_eq!(r.protocol, DriveProtocol::Scsi);
        assert_eq!(r.model.as_deref(), Some("SEAGATE ST4000NM0043"));
        assert_eq!(r.firmware.as_deref(), Some("MS03"));
        assert_eq!(r.capacity_bytes, Some(4_000_787_030_016));
        assert_eq!(r.temperature_celsius, Some(34));
        assert_eq!(r.power_on_hours, Some(43549));
        assert_eq!(r.health_passed, Some(true));
        assert_eq!(
            r.predictors,
            SmartPredictors::Scsi(ScsiPredictors {
                grown_defects: Some(56),
                read_uncorrected: Some(0),
                write_uncorrected: Some(0)
            })
        );
    }

    #[test]
    fn virtio_and_loop_say_no_smart() {
        for name in ["virtio-no-smart.json", "loop-no-smart.json"] {
            let err = parse_smartctl(&fixture(name), 1).expect_err(name);
            assert!(matches!(err, SmartError::NoSmart { .. }), "{name}: {err:?}");
            assert!(err.to_string().contains("Unable to detect device type"), "{err}");
        }
    }

    #[test]
    fn open_failures_keep_smartctls_message() {
        let err = parse_smartctl(&fixture("permission-denied.json"), 2).expect_err("open");
        assert_eq!(
            err,
            SmartError::OpenFailed { message: "Smartctl open device: /dev/sda failed: Permission denied".into() }
        );
        let err = parse_smartctl(&fixture("open-failed.json"), 2).expect_err("open");
        assert!(err.to_string().contains("No such device"), "{err}");
    }

    #[test]
    fn fatal_exit_bit_wins_over_unparsable_output() {
        assert!(matches!(parse_smartctl(b"", 2), Err(SmartError::OpenFailed { .. })));
        assert!(matches!(parse_smartctl(b"garbage", 1), Err(SmartError::CommandFailed { .. })));
    }

    #[test]
    fn malformed_json_is_its_own_error() {
        let mut truncated = fixture("ata-hdd-healthy.json");
        truncated.truncate(truncated.len() / 2);
        for bad in [&b""[..], b"not json", &truncated, b"[1,2]", b"{\"device\": 5}"] {
            let err = parse_smartctl(bad, 0).expect_err("malformed");
            assert!(matches!(err, SmartError::Malformed { .. }), "{err:?}");
        }
        // Valid JSON without a protocol cannot be classified.
        assert!(matches!(parse_smartctl(b"{}", 0), Err(SmartError::Malformed { .. })));
    }

    #[test]
    fn smart_unavailable_says_so() {
        for support in [r#"{"available": false}"#, "false"] {
            let json = format!(
                r#"{{"device": {{"name": "/dev/sdz", "protocol": "ATA"}}, "smart_support": {support}}}"#
            );
            let err = parse_smartctl(json.as_bytes(), 4).expect_err("no smart");
            assert!(matches!(err, SmartError::NoSmart { .. }), "{err:?}");
        }
    }

    #[test]
    fn out_of_range_exit_status_is_refused() {
        assert_eq!(parse_smartctl(b"{}", -1), Err(SmartError::BadExitStatus(-1)));
        assert_eq!(parse_smartctl(b"{}", 256), Err(SmartError::BadExitStatus(256)));
    }

    /// A stand-in smartctl: a shell script that prints a fixture and exits with `code`.
    fn fake_smartctl(dir: &std::path::Path, body: &str) -> SmartConfig {
        use std::os::unix::fs::PermissionsExt;
        // A fresh name per script: rewriting a file another test may be executing risks ETXTBSY.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("smartctl-{n}"));
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        SmartConfig { smartctl: path, timeout: Duration::from_secs(10) }
    }

    fn fixture_path(name: &str) -> String {
        format!("{}/tests/fixtures/smart/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    #[tokio::test]
    async fn read_smart_runs_smartctl_and_keeps_its_exit_bits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = fake_smartctl(dir.path(), &format!("cat {}\nexit 216", fixture_path("ata-failing.json")));
        let SmartOutcome::Report(r) = read_smart(&config, "/dev/sdc").await else { panic!("expected a report") };
        assert_eq!(r.health_passed, Some(false));
        assert!(r.exit_status.disk_failing());
    }

    #[tokio::test]
    async fn read_smart_says_no_smart_for_virtio() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = fake_smartctl(dir.path(), &format!("cat {}\nexit 1", fixture_path("virtio-no-smart.json")));
        assert!(matches!(read_smart(&config, "/dev/vda").await, SmartOutcome::NoSmart { .. }));
    }

    #[tokio::test]
    async fn read_smart_reports_missing_slow_and_killed_smartctl() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = SmartConfig { smartctl: dir.path().join("nope"), ..SmartConfig::default() };
        let SmartOutcome::Failed { reason } = read_smart(&missing, "/dev/sda").await else { panic!() };
        assert!(reason.contains("install smartmontools"), "{reason}");

        let mut slow = fake_smartctl(dir.path(), "exec sleep 30");
        slow.timeout = Duration::from_millis(200);
        let SmartOutcome::Failed { reason } = read_smart(&slow, "/dev/sda").await else { panic!() };
        assert!(reason.contains("did not answer within 200ms"), "{reason}");

        let killed = fake_smartctl(dir.path(), "kill -9 $$");
        let SmartOutcome::Failed { reason } = read_smart(&killed, "/dev/sda").await else { panic!() };
        assert!(reason.contains("killed"), "{reason}");

        let garbage = fake_smartctl(dir.path(), "echo '{\"truncated\": '");
        let SmartOutcome::Failed { reason } = read_smart(&garbage, "/dev/sda").await else { panic!() };
        assert!(reason.contains("not valid JSON"), "{reason}");
    }

    #[test]
    fn smart_targets_skip_virtual_devices_plainly() {
        assert_eq!(smart_target("sda").as_deref(), Ok("/dev/sda"));
        assert_eq!(smart_target("nvme0n1").as_deref(), Ok("/dev/nvme0n1"));
        assert_eq!(smart_target("vda"), Err("virtio-blk has no SMART".to_owned()));
        assert_eq!(smart_target("loop0"), Err("loop device has no SMART".to_owned()));
        assert!(smart_target("md127").is_err_and(|r| r.contains("members")));
        assert!(smart_target("dm-0").is_err());
        assert!(smart_target("zram0").is_err());
        for bad in ["", "../sda", "sda/queue", "."] {
            assert!(smart_target(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn outcomes_keep_no_smart_apart_from_failures() {
        assert!(matches!(outcome(Err(SmartError::NoSmart { reason: "x".into() })), SmartOutcome::NoSmart { .. }));
        let SmartOutcome::Failed { reason } = outcome(Err(SmartError::OpenFailed { message: "denied".into() })) else {
            panic!()
        };
        assert_eq!(reason, "smartctl could not open the device: denied");
    }

    #[test]
    fn smart_command_failure_still_reports_what_was_read() {
        let r = parse_smartctl(&fixture("ata-hdd-healthy.json"), 4).expect("parse");
        assert!(r.exit_status.smart_command_failed());
        assert_eq!(r.health_passed, Some(true));
    }
}
