//! Drives end to end with loop devices, as an operator sees them through `shoalctl drives`: a real
//! agent (in its own network namespace) with `--drive-match` admitting this test's loop devices,
//! the controller's policy, and the kernel's block uevents.
//!
//! - a blank drive is prepared once the policy says `prepare` and mounted by UUID (seen in the
//!   agent's mount namespace, and written through);
//! - a drive holding ext4 is `has-data` and stays byte-for-byte untouched, also against `drives
//!   prepare` without `--force` and with a wrong serial;
//! - a drive attached while the agent runs is seen within seconds (uevent) and prepared;
//! - a prepared drive whose medium vanishes (capacity drops to 0, as when a card is pulled from a
//!   reader) becomes `missing`, its mount is detached, and the event is raised;
//! - loop devices say plainly that they have no SMART.
//!
//! Needs root, `losetup`, `mkfs.ext4` and `sfdisk` (skips with a reason otherwise, fails under CI).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use shoal_tests::testkit::{cmd, require, skip, Missing, Tmpfs};
use shoal_tests::{eventually, require_host_tests, Fleet, FleetConfig, OrPanic};

/// Loop device numbers this test owns: far above what `losetup -f` hands out elsewhere.
const BLANK: u32 = 240;
const DATA: u32 = 241;
const HOT: u32 = 242;
/// Exactly this test's devices: the other test of this file runs at the same time with loop243.
const DRIVE_MATCH: &str = "loop24[0-2]";
const IMAGE_BYTES: u64 = 96 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);

/// A loop device over a sparse file, detached on drop.
struct Loop {
    number: u32,
    file: PathBuf,
}

impl Loop {
    fn attach(number: u32, file: &Path) -> Result<Loop> {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(format!("/dev/loop{number}"))
            .output();
        cmd::run(
            Command::new("losetup")
                .arg("-P")
                .arg(format!("/dev/loop{number}"))
                .arg(file),
        )?;
        Ok(Loop {
            number,
            file: file.to_owned(),
        })
    }

    fn name(&self) -> String {
        format!("loop{}", self.number)
    }

    fn dev(&self) -> String {
        format!("/dev/loop{}", self.number)
    }

    /// The medium goes away under whatever holds the device: the backing file is emptied and the
    /// loop device's capacity re-read, which drops it to 0 sectors with a `change` uevent.
    fn pull(&self) -> Result<()> {
        std::fs::File::options()
            .write(true)
            .open(&self.file)?
            .set_len(0)?;
        cmd::run(Command::new("losetup").arg("-c").arg(self.dev()))?;
        Ok(())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(self.dev()).status();
    }
}

fn image(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::File::create(&path)?.set_len(IMAGE_BYTES)?;
    Ok(path)
}

fn sha256(path: &Path) -> Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(path)?)))
}

/// `shoalctl drives list -o json`, the entry of one device.
fn drive(fleet: &Fleet, device: &str) -> Result<Value> {
    let list = fleet.ctl_json(&["drives", "list"])?;
    let list = list
        .as_array()
        .with_context(|| format!("drives list is not an array: {list}"))?;
    list.iter()
        .find(|d| d["device"] == device)
        .cloned()
        .with_context(|| format!("{device} not in drives list: {list:?}"))
}

fn wait_state(fleet: &Fleet, device: &str, state: &str) -> Result<Value> {
    eventually(TIMEOUT, &format!("{device} is {state}"), || {
        let d = drive(fleet, device)?;
        ensure!(
            d["state"] == state,
            "{device} is {} ({})",
            d["state"],
            d["state_detail"]
        );
        Ok(d)
    })
}

/// The agent's mounts, from its own mount namespace (`ip netns exec` gives it one).
fn agent_mounts(pid: u32) -> Result<String> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).context("agent mountinfo")
}

fn mount_point(d: &Value) -> Result<String> {
    d["state_detail"]["mount_point"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no mount point in {}", d["state_detail"]))
}

#[test]
fn loop_drives_are_prepared_left_alone_hot_added_and_missed() {
    require_host_tests!();
    require!(tools());
    scenario().or_panic();
}

/// The tools these tests drive, or the first one missing.
fn tools() -> Result<(), Missing> {
    skip::tool("losetup", "mount")?;
    skip::tool("mkfs.ext4", "e2fsprogs")?;
    skip::tool("sfdisk", "fdisk")?;
    Ok(())
}

fn scenario() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let blank = Loop::attach(BLANK, &image(dir.path(), "blank.img")?)?;
    let data_file = image(dir.path(), "data.img")?;
    cmd::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "keepme"])
            .arg(&data_file),
    )?;
    let data = Loop::attach(DATA, &data_file)?;
    let data_sha = sha256(&data_file)?;
    let mount_root = dir.path().join("drives");

    let mut fleet = Fleet::start(FleetConfig {
        agent_args: vec![
            "--drive-match".into(),
            DRIVE_MATCH.into(),
            "--drive-mount-root".into(),
            mount_root.display().to_string(),
        ],
        ..FleetConfig::fast().agents(1)
    })?;
    let result = (|| -> Result<()> {
        let node = fleet.node_id(0)?;
        let pid = fleet.agent(0).proc.pid().context("agent pid")?;

        // Policy report (the default): both are seen and described, neither is touched.
        let d = wait_state(&fleet, &blank.name(), "blank")?;
        ensure!(d["node"] == node.as_str(), "node of {d}");
        ensure!(
            d["smart"]["status"] == "no-smart",
            "loop SMART: {}",
            d["smart"]
        );
        ensure!(
            d["smart"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("loop")),
            "reason: {}",
            d["smart"]
        );
        ensure!(
            d["serial"]
                .as_str()
                .is_some_and(|s| s.ends_with("blank.img")),
            "serial: {d}"
        );
        let d = wait_state(&fleet, &data.name(), "has-data")?;
        ensure!(
            d["state_detail"].to_string().contains("ext"),
            "signatures: {}",
            d["state_detail"]
        );
        let table = fleet.ctl_ok(&["drives", "list"])?;
        ensure!(
            table.contains("no SMART"),
            "the table says plainly there is no SMART:\n{table}"
        );

        // Without --force, and with a wrong serial, a drive with data is refused.
        let refused = fleet.ctl(&["drives", "prepare", &node, &data.name()])?;
        ensure!(
            !refused.status.success(),
            "prepare of a has-data drive succeeded"
        );
        let refused = fleet.ctl(&[
            "drives",
            "prepare",
            &node,
            &data.name(),
            "--force",
            "--serial",
            "WRONG",
        ])?;
        ensure!(
            !refused.status.success(),
            "prepare with a wrong serial succeeded"
        );

        // Policy prepare: the blank drive is prepared and mounted by UUID.
        fleet.ctl_ok(&[
            "drives", "policy", "set", "--node", &node, "prepare", "--fs", "ext4",
        ])?;
        let d = wait_state(&fleet, &blank.name(), "prepared")?;
        let mount = mount_point(&d)?;
        let uuid = d["state_detail"]["fs_uuid"]
            .as_str()
            .context("fs_uuid")?
            .to_owned();
        ensure!(
            mount == mount_root.join(&uuid).display().to_string(),
            "mounted at {mount}, not under the root by UUID"
        );
        let mounts = agent_mounts(pid)?;
        ensure!(
            mounts.contains(&format!(" {mount} ")),
            "{mount} not in the agent's mounts:\n{mounts}"
        );
        std::fs::write(format!("/proc/{pid}/root{mount}/written-by-test"), b"hello")?;
        let gpt = cmd::run(Command::new("sfdisk").arg("--json").arg(blank.dev()))?;
        ensure!(
            gpt.contains("\"gpt\"") && gpt.contains("\"start\": 2048"),
            "partition table: {gpt}"
        );

        // Hot-add: seen through the uevent and prepared.
        let hot = Loop::attach(HOT, &image(dir.path(), "hot.img")?)?;
        let d = wait_state(&fleet, &hot.name(), "prepared")?;
        ensure!(
            agent_mounts(pid)?.contains(&format!(" {} ", mount_point(&d)?)),
            "hot-added drive not mounted"
        );

        // The data drive was never written.
        wait_state(&fleet, &data.name(), "has-data")?;
        ensure!(
            sha256(&data_file)? == data_sha,
            "the drive holding data was modified"
        );

        // The prepared drive's medium goes away: missing, mount detached, event raised.
        blank.pull()?;
        let d = wait_state(&fleet, &blank.name(), "missing")?;
        ensure!(
            mount_point(&d)? == mount,
            "missing drive names its mount: {d}"
        );
        eventually(TIMEOUT, "the vanished drive's mount is detached", || {
            let mounts = agent_mounts(pid)?;
            ensure!(
                !mounts.contains(&format!(" {mount} ")),
                "still mounted:\n{mounts}"
            );
            Ok(())
        })?;
        let events = fleet.events()?;
        ensure!(events.iter().any(|e| e.to_string().contains("missing") && e.to_string().contains(&blank.name())), "no missing event: {events:?}");

        let report = fleet.report()?;
        ensure!(
            report.to_string().contains(&blank.name()),
            "report does not mention the missing drive: {report}"
        );
        drop(hot);
        Ok(())
    })();
    if result.is_err() {
        fleet.dump_logs();
    }
    if sha256(&data_file)? != data_sha {
        bail!("the drive holding data was modified");
    }
    result
}

/// A mount root that is full, then read-only: preparing fails with the reason, before anything is
/// written to the drive.
#[test]
fn a_full_or_read_only_mount_root_fails_the_prepare_and_leaves_the_drive_untouched() {
    require_host_tests!();
    require!(tools());
    mount_root_faults().or_panic();
}

fn mount_root_faults() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("drives");
    // Few inodes too: empty directories cost none of `size`, so only inodes can run out for a
    // mkdir.
    let tmpfs = Tmpfs::mount_at("shoal-test-full", &root, "size=64k,nr_inodes=16")?;
    // Fill it: the next mkdir finds no space.
    let _ = std::fs::write(root.join("filler"), vec![0u8; 64 << 10]);
    for i in 0.. {
        if std::fs::create_dir(root.join(format!("d{i}"))).is_err() {
            break;
        }
    }
    let file = image(dir.path(), "victim.img")?;
    let victim = Loop::attach(243, &file)?;
    let before = sha256(&file)?;

    let fleet = Fleet::start(FleetConfig {
        agent_args: vec![
            "--drive-match".into(),
            "loop243".into(),
            "--drive-mount-root".into(),
            root.display().to_string(),
        ],
        ..FleetConfig::fast().agents(1)
    })?;
    let result = (|| -> Result<()> {
        let node = fleet.node_id(0)?;
        wait_state(&fleet, &victim.name(), "blank")?;
        let out = fleet.ctl(&["drives", "prepare", &node, &victim.name()])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success(),
            "prepare on a full mount root succeeded"
        );
        ensure!(
            stderr.contains("full") || stderr.contains("space"),
            "the error names the full mount root: {stderr}"
        );
        let d = wait_state(&fleet, &victim.name(), "prepare-failed")?;
        if sha256(&file)? != before {
            let bytes = std::fs::read(&file)?;
            let nz: Vec<usize> = bytes
                .iter()
                .enumerate()
                .filter(|(_, b)| **b != 0)
                .map(|(i, _)| i)
                .take(8)
                .collect();
            let last = bytes.iter().rposition(|b| *b != 0);
            bail!("the drive was written although the mount root was full: first nonzero {nz:?} last {last:?} len {}: {d}", bytes.len());
        }

        // Read-only: remount, and ask again (prepare-failed may be retried without --force).
        tmpfs.remount("ro")?;
        let out = fleet.ctl(&["drives", "prepare", &node, &victim.name()])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success(),
            "prepare on a read-only mount root succeeded"
        );
        ensure!(
            stderr.contains("read-only"),
            "the error names the read-only mount root: {stderr}"
        );
        ensure!(
            sha256(&file)? == before,
            "the drive was written although the mount root was read-only"
        );
        Ok(())
    })();
    if result.is_err() {
        fleet.dump_logs();
    }
    drop(tmpfs);
    result
}
