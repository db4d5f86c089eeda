//! Drives end to end in a VM: a netbooted qemu VM (TCG, q35) running the agent with an emulated
//! NVMe drive. The drive's SMART data (qemu emulates the NVMe SMART / health log) reaches `shoalctl
//! drives list`; NVMe drives hot-plugged through QMP `device_add` into PCIe root ports are seen and
//! handled by the node's drive policy: with `prepare`, a blank one is partitioned, formatted and
//! mounted under the agent's drive root, and one that holds a filesystem is left alone, byte for
//! byte.
//!
//! Needs root and what the netboot tests need (tests/tests/netboot.rs), plus e2fsprogs on the host.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use shoal_tests::netboot::{DhcpSetup, Firmware, NetbootLab, NvmeDrive, VmOptions};
use shoal_tests::process::output_with_timeout;
use shoal_tests::qmp::Qmp;
use shoal_tests::{consistently, eventually, require_netboot};

/// Deadline from VM start to the node being up.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Deadline for the boot drive's first SMART report to reach `drives list`.
const SMART_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline from `device_add` to the policy's outcome in `drives list`.
const HOTPLUG_TIMEOUT: Duration = Duration::from_secs(60);
/// Size of every emulated drive.
const DRIVE_BYTES: u64 = 64 << 20;
/// Where the agent mounts the drives it prepares (its default `--drive-mount-root`).
const DRIVE_ROOT: &str = "/var/lib/shoal/drives";

/// A sparse raw image of [`DRIVE_BYTES`], all zeroes: a blank drive.
fn blank_image(path: &Path) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(DRIVE_BYTES)?;
    Ok(())
}

/// A raw image holding an ext4 filesystem with one file in it: a drive with data on it.
fn data_image(path: &Path, scratch: &Path) -> Result<()> {
    blank_image(path)?;
    let content = scratch.join("data-drive-content");
    std::fs::create_dir_all(&content)?;
    std::fs::write(
        content.join("precious.txt"),
        "data that must survive a hot-plug\n",
    )?;
    let out = output_with_timeout(
        std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "precious", "-d"])
            .arg(&content)
            .arg(path),
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "mkfs.ext4 {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `drives list` entries of `node`.
fn drives(lab: &NetbootLab, node: &str) -> Result<Vec<Value>> {
    Ok(lab
        .ctl_list(&["drives", "list"])?
        .into_iter()
        .filter(|d| d["node"] == node)
        .collect())
}

/// The entry of `node`'s drive with `serial`, or an error listing what there is.
fn drive_with_serial(lab: &NetbootLab, node: &str, serial: &str) -> Result<Value> {
    let all = drives(lab, node)?;
    match all
        .iter()
        .find(|d| d["serial"].as_str().is_some_and(|s| s.trim() == serial))
    {
        Some(d) => Ok(d.clone()),
        None => bail!(
            "no drive with serial {serial} on node {node}; drives: {}",
            brief(&all)
        ),
    }
}

/// `state_detail` as text: a string as it is, anything else (a prepared drive's mount) as JSON.
fn detail_text(detail: &Value) -> String {
    match detail {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One line per drive: device, serial, state, detail, SMART status and verdict.
fn brief(drives: &[Value]) -> String {
    let items: Vec<String> = drives
        .iter()
        .map(|d| {
            format!(
                "{} serial={} state={} ({}) smart={}/{}",
                d["device"],
                d["serial"],
                d["state"],
                d["state_detail"],
                d["smart"]["status"],
                d["smart"]["verdict"]
            )
        })
        .collect();
    format!("[{}]", items.join("; "))
}

/// The drive is `device`, with qemu's model and the image's size, and a SMART report read over NVMe
/// that the controller judged `ok`.
fn check_nvme_with_smart(d: &Value, device: &str) -> Result<()> {
    ensure!(
        d["device"] == device,
        "device {} (expected {device}): {d}",
        d["device"]
    );
    let smart = &d["smart"];
    ensure!(
        smart["status"] == "report",
        "SMART status {} ({}), expected report: {d}",
        smart["status"],
        smart["reason"]
    );
    ensure!(
        smart["protocol"]
            .as_str()
            .is_some_and(|p| p.eq_ignore_ascii_case("nvme")),
        "SMART protocol {}, expected NVMe: {d}",
        smart["protocol"]
    );
    // A fresh emulated drive is healthy: qemu's unfilled spare fields (0/0) must not read as
    // failing.
    ensure!(
        smart["verdict"] == "ok",
        "SMART verdict {} ({}), expected ok: {d}",
        smart["verdict"],
        smart["reasons"]
    );
    // qemu's emulated NVMe reports its temperature (default 323 K) in the SMART / health log.
    ensure!(
        smart["temperature_celsius"].is_i64(),
        "no temperature in the SMART report: {d}"
    );
    ensure!(
        d["size_bytes"] == DRIVE_BYTES,
        "size {} (the image is {DRIVE_BYTES} bytes): {d}",
        d["size_bytes"]
    );
    ensure!(
        d["model"].as_str().is_some_and(|m| m.contains("QEMU")),
        "model {}: {d}",
        d["model"]
    );
    Ok(())
}

/// The preparation reached the disk: the image holds a GPT (header at LBA 1, 512-byte sectors as
/// qemu's NVMe has) whose first partition holds an ext4 superblock (magic 0xEF53 at byte 1024 +
/// 56).
fn check_gpt_with_ext4(image: &Path) -> Result<()> {
    let bytes = std::fs::read(image)?;
    ensure!(
        bytes.len() >= 4096 && &bytes[512..520] == b"EFI PART",
        "{} has no GPT header at LBA 1",
        image.display()
    );
    let entries_lba = u64::from_le_bytes(bytes[512 + 72..512 + 80].try_into()?);
    let entry = usize::try_from(entries_lba * 512)?;
    let first_lba = u64::from_le_bytes(
        bytes
            .get(entry + 32..entry + 40)
            .context("GPT entries past the end")?
            .try_into()?,
    );
    let sb = usize::try_from(first_lba * 512)? + 1024;
    let magic = bytes
        .get(sb + 56..sb + 58)
        .context("partition past the end of the image")?;
    ensure!(
        magic == [0x53, 0xef],
        "the GPT's first partition (LBA {first_lba}) holds no ext4 superblock"
    );
    Ok(())
}

#[test]
fn nvme_smart_and_hot_plugged_drives_in_a_vm() {
    require_netboot!(Firmware::Bios);
    let mut lab = NetbootLab::start(14, DhcpSetup::Full).expect("lab");
    lab.run(|lab| {
        let dir = lab.dir.path().to_owned();
        let boot_image = dir.join("nvme0.img");
        let blank_hot = dir.join("nvme1.img");
        let data_hot = dir.join("nvme2.img");
        blank_image(&boot_image)?;
        blank_image(&blank_hot)?;
        data_image(&data_hot, &dir)?;
        let data_before = std::fs::read(&data_hot)?;

        let qmp_path = dir.join("vm.qmp");
        let options = VmOptions {
            machine: Some("q35".into()),
            nvme: vec![NvmeDrive::new("nvme0", &boot_image, "SHOALNVME0")],
            hotplug_ports: vec!["hp1".into(), "hp2".into()],
            qmp: Some(qmp_path.clone()),
        };
        let mac = "52:54:00:4e:44:01";
        let started = Instant::now();
        let vm = lab.start_vm_with("vm-drives", Firmware::Bios, mac, &options)?;
        let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(30))?;
        let status = qmp.execute("query-status", Value::Null)?;
        ensure!(status["status"] == "running", "VM status {status}");
        let node = lab.wait_node_up(mac, BOOT_TIMEOUT)?;
        let node_id = node["id"].as_str().context("node without id")?.to_string();
        println!(
            "FIGURE drives vm: VM start to up in {:.1?}",
            started.elapsed()
        );
        ensure!(
            lab.vms[vm].log().contains("nvme nvme0"),
            "the guest kernel did not log the boot NVMe drive"
        );

        // The boot drive and its SMART data.
        let t = Instant::now();
        let d = eventually(
            SMART_TIMEOUT,
            "the boot NVMe drive's SMART report in `drives list`",
            || {
                let d = drive_with_serial(lab, &node_id, "SHOALNVME0")?;
                check_nvme_with_smart(&d, "nvme0n1")?;
                Ok(d)
            },
        )?;
        println!(
            "FIGURE drives vm: boot drive's SMART report listed {:.1?} after up: verdict {} {}",
            t.elapsed(),
            d["smart"]["verdict"],
            d["smart"]["reasons"]
        );

        // A self-test request gets a plain answer from the drive's node: started, or why not
        // (smartctl 7.3 does not run NVMe self-tests, and says nothing about it: shoal says "not
        // supported").
        let out = lab.ctl(&["drives", "test", &node_id, "nvme0n1", "--short"])?;
        let answer = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("drives test nvme0n1 --short: {}", answer.trim());
        ensure!(
            (out.status.success() && answer.contains("started"))
                || (!out.status.success() && answer.contains("not supported")),
            "drives test answered: {answer}"
        );

        lab.ctl_ok(&[
            "drives", "policy", "set", "--node", &node_id, "prepare", "--fs", "ext4",
        ])?;

        // A blank drive, hot-plugged: prepared and mounted under the drive root.
        let blank = NvmeDrive::new("nvme1", &blank_hot, "SHOALNVME1");
        let t = Instant::now();
        blank.hot_plug(&mut qmp, "hp1")?;
        let d = eventually(
            HOTPLUG_TIMEOUT,
            "the hot-plugged blank drive prepared",
            || {
                let d = drive_with_serial(lab, &node_id, "SHOALNVME1")?;
                ensure!(d["device"] == "nvme1n1", "device {}: {d}", d["device"]);
                ensure!(
                    d["state"] == "prepared",
                    "state {} ({}): {d}",
                    d["state"],
                    d["state_detail"]
                );
                Ok(d)
            },
        )?;
        println!(
            "FIGURE drives vm: blank NVMe device_add to prepared in {:.1?}",
            t.elapsed()
        );
        let mount = match &d["state_detail"] {
            Value::Object(o) => o
                .get("mount_point")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            other => detail_text(other),
        };
        ensure!(
            mount.contains(&format!("{DRIVE_ROOT}/")),
            "prepared, but state_detail {} names no mount under {DRIVE_ROOT}",
            d["state_detail"]
        );
        eventually(
            SMART_TIMEOUT,
            "the hot-plugged drive's SMART report",
            || check_nvme_with_smart(&drive_with_serial(lab, &node_id, "SHOALNVME1")?, "nvme1n1"),
        )?;
        check_gpt_with_ext4(&blank_hot)?;

        // A drive with a filesystem on it, hot-plugged: has-data, and left untouched.
        let data = NvmeDrive::new("nvme2", &data_hot, "SHOALNVME2");
        let t = Instant::now();
        data.hot_plug(&mut qmp, "hp2")?;
        eventually(
            HOTPLUG_TIMEOUT,
            "the hot-plugged drive with data seen as has-data",
            || {
                let d = drive_with_serial(lab, &node_id, "SHOALNVME2")?;
                ensure!(d["device"] == "nvme2n1", "device {}: {d}", d["device"]);
                ensure!(
                    d["state"] == "has-data",
                    "state {} ({}): {d}",
                    d["state"],
                    d["state_detail"]
                );
                ensure!(
                    detail_text(&d["state_detail"])
                        .to_lowercase()
                        .contains("ext"),
                    "has-data, but state_detail {} does not name the ext4 filesystem",
                    d["state_detail"]
                );
                Ok(())
            },
        )?;
        println!(
            "FIGURE drives vm: NVMe with data device_add to has-data in {:.1?}",
            t.elapsed()
        );
        consistently(
            Duration::from_secs(10),
            "the drive with data staying has-data under the prepare policy",
            || {
                let d = drive_with_serial(lab, &node_id, "SHOALNVME2")?;
                ensure!(
                    d["state"] == "has-data",
                    "state {} ({})",
                    d["state"],
                    d["state_detail"]
                );
                Ok(())
            },
        )?;
        ensure!(
            std::fs::read(&data_hot)? == data_before,
            "the drive with data was written to"
        );

        println!("drives of {node_id}: {}", brief(&drives(lab, &node_id)?));
        let events: Vec<&Value> = qmp
            .events()
            .iter()
            .filter(|e| e["event"] == "DEVICE_DELETED")
            .collect();
        ensure!(events.is_empty(), "qemu deleted devices: {events:?}");
        Ok(())
    });
}
