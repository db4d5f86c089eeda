//! Tests of the whole job against real loop devices, mkfs and mounts (they need root), and of
//! names refused before any I/O.

use std::{
    fs::{self, File},
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use nix::mount::{MntFlags, MsFlags};
use shoal_proto::{Filesystem, PreparedDrive};
use shoal_testkit::{cmd, require, skip, wait, Missing, Tmpfs};

use super::{
    device::{logical_block_size, make_node},
    layout::MIB,
    preflight::find_tool,
    *,
};
use crate::{
    blank::Signature,
    mountinfo::{mounted, read_mountinfo, MountEntry},
    sysfs::{self, DevNumber},
};

#[test]
fn bad_names_are_refused_before_any_io() {
    assert!(matches!(
        probe(Path::new("/dev"), "../etc/passwd"),
        Err(ProbeError::BadName { .. })
    ));
    let cfg = PrepareConfig {
        sys_block: PathBuf::from("/nonexistent"),
        ..PrepareConfig::default()
    };
    let mut steps = Vec::new();
    let r = prepare(&cfg, "sda/../sdb", None, Filesystem::Ext4, None, &mut |s| {
        steps.push(s)
    });
    assert!(matches!(r, Err(PrepareError::BadName { .. })), "{r:?}");
    assert!(steps.is_empty());
    let r = prepare(&cfg, "sdz", None, Filesystem::Ext4, None, &mut |s| {
        steps.push(s)
    });
    assert!(matches!(r, Err(PrepareError::NoSuchDisk { .. })), "{r:?}");
    assert_eq!(steps, [Step::Preflight]);
    let out = restore(&cfg, &["sdz".to_owned(), "a/b".to_owned()]);
    assert!(
        matches!(
            out.as_slice(),
            [
                Err(RestoreError::NoSuchDisk { .. }),
                Err(RestoreError::BadName { .. })
            ]
        ),
        "{out:?}"
    );
}

// -----------------------------------------------------------------------------------------
// Host tests: real loop devices, mkfs and mounts. They need root.

/// What the host tests need: root, loop devices, `losetup` and `mkfs.ext4`.
fn host() -> Result<(), Missing> {
    skip::root()?;
    if !Path::new("/dev/loop-control").exists() {
        return Err(Missing::new("no loop devices (/dev/loop-control)"));
    }
    skip::tool("losetup", "mount")?;
    skip::tool("mkfs.ext4", "e2fsprogs")?;
    Ok(())
}

/// Runs `tool` (found where prepare finds it) with `args`; its stdout.
fn sh(tool: &str, args: &[&str]) -> String {
    cmd::run(Command::new(find_tool(tool).unwrap_or_else(|| PathBuf::from(tool))).args(args))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// A loop device over a sparse file in a temporary directory, with partition scanning (`-P`).
/// Dropping it unmounts everything under the directory and detaches the device (if it is still
/// ours: a detached number may have been reused by another test).
struct Loop {
    name: String,
    backing: PathBuf,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Loop {
    fn new(mib: u64) -> Loop {
        Loop::with_sectors(mib, 512)
    }

    fn with_sectors(mib: u64, sector: u64) -> Loop {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = fs::canonicalize(tmp.path()).expect("canonical tempdir");
        let backing = dir.join("disk.img");
        File::create(&backing)
            .and_then(|f| f.set_len(mib * MIB))
            .expect("backing file");
        let path = backing.to_str().expect("utf-8 path");
        // Two tests attaching at once can race for the same free device; try again.
        let dev = wait::eventually(Duration::from_secs(3), "losetup to attach", || {
            cmd::run(Command::new(find_tool("losetup").expect("losetup")).args([
                "-P",
                "-f",
                "--show",
                "--sector-size",
                &sector.to_string(),
                path,
            ]))
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
        let name = dev.trim().trim_start_matches("/dev/").to_owned();
        Loop {
            name,
            backing,
            dir,
            _tmp: tmp,
        }
    }

    fn dev(&self) -> String {
        format!("/dev/{}", self.name)
    }

    /// The serial number of a loop device: its backing file.
    fn serial(&self) -> String {
        sysfs::read_attr(
            &PathBuf::from("/sys/block")
                .join(&self.name)
                .join("loop/backing_file"),
        )
        .expect("backing_file")
    }

    fn cfg(&self) -> PrepareConfig {
        PrepareConfig {
            mount_root: self.dir.join("drives"),
            settle_timeout: Duration::from_secs(20),
            ..PrepareConfig::default()
        }
    }

    fn sha256(&self) -> String {
        let out = sh("sha256sum", &[self.backing.to_str().expect("utf-8")]);
        out.split_whitespace()
            .next()
            .expect("sha256sum output")
            .to_owned()
    }

    fn detach(&self) {
        if sysfs::read_attr(
            &PathBuf::from("/sys/block")
                .join(&self.name)
                .join("loop/backing_file"),
        )
        .as_deref()
            == self.backing.to_str()
        {
            let _ = cmd::run(
                Command::new(find_tool("losetup").expect("losetup")).args(["-d", &self.dev()]),
            );
        }
    }

    /// Entries under the mount root (mount points left behind).
    fn mount_root_entries(&self) -> Vec<String> {
        fs::read_dir(self.dir.join("drives"))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Ok(mounts) = read_mountinfo() {
            for m in mounts
                .iter()
                .rev()
                .filter(|m| m.mount_point.starts_with(&self.dir))
            {
                let _ = nix::mount::umount2(&m.mount_point, MntFlags::MNT_DETACH);
            }
        }
        self.detach();
    }
}

fn mount_entry(mount_point: &str) -> Option<MountEntry> {
    read_mountinfo()
        .expect("mountinfo")
        .into_iter()
        .find(|m| m.mount_point == Path::new(mount_point))
}

/// The GPT as sfdisk reads it, and the filesystem as blkid reads it: one partition named shoal
/// of type Linux filesystem data from sector 2048, holding `fstype` with our UUID and label.
fn assert_layout(lo: &Loop, p: &PreparedDrive, fstype: &str, size_mib: u64) {
    assert_layout_sectors(lo, p, fstype, size_mib, 512);
}

fn assert_layout_sectors(lo: &Loop, p: &PreparedDrive, fstype: &str, size_mib: u64, sector: u64) {
    let per_mib = MIB / sector;
    let json: serde_json::Value =
        serde_json::from_str(&sh("sfdisk", &["--json", &lo.dev()])).expect("sfdisk json");
    let table = &json["partitiontable"];
    assert_eq!(table["label"], "gpt", "{json}");
    let parts = table["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), 1, "{json}");
    assert_eq!(table["sectorsize"], sector, "{json}");
    assert_eq!(parts[0]["start"], per_mib, "{json}");
    assert_eq!(parts[0]["size"], (size_mib - 2) * per_mib, "{json}");
    assert_eq!(parts[0]["name"], "shoal", "{json}");
    assert_eq!(
        parts[0]["type"], "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
        "{json}"
    );
    let blkid = sh(
        "blkid",
        &["-p", "-o", "export", &format!("/dev/{}", p.partition)],
    );
    let tag = |k: &str| {
        blkid
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::to_owned)
    };
    assert_eq!(tag("TYPE").as_deref(), Some(fstype), "{blkid}");
    assert_eq!(tag("UUID").as_deref(), Some(p.fs_uuid.as_str()), "{blkid}");
    assert_eq!(tag("LABEL").as_deref(), Some(p.label.as_str()), "{blkid}");
    assert_eq!(tag("PART_ENTRY_NAME").as_deref(), Some("shoal"), "{blkid}");
    // blkid counts 512-byte sectors whatever the drive's.
    assert_eq!(tag("PART_ENTRY_OFFSET").as_deref(), Some("2048"), "{blkid}");
}

#[test]
fn a_blank_drive_is_prepared_with_ext4_and_mounted_by_uuid() {
    require!(host());
    let lo = Loop::new(128);
    let cfg = lo.cfg();
    let serial = lo.serial();
    assert_eq!(probe(&cfg.dev_dir, &lo.name).expect("probe"), vec![]);
    let mut steps = Vec::new();
    let p = prepare(
        &cfg,
        &lo.name,
        Some(&serial),
        Filesystem::Ext4,
        None,
        &mut |s| steps.push(s),
    )
    .expect("prepared");
    use Step::*;
    assert_eq!(
        steps,
        [Preflight, Open, Probe, Partition, Settle, Mkfs, Mount]
    );
    assert_eq!(p.partition, format!("{}p1", lo.name));
    assert_eq!(p.filesystem, Filesystem::Ext4);
    assert_eq!(
        Path::new(&p.mount_point),
        lo.dir.join("drives").join(&p.fs_uuid)
    );
    assert_eq!(p.label, fs_label(Some(&serial), &p.fs_uuid));
    let m = mount_entry(&p.mount_point).expect("mounted at <root>/<uuid>");
    assert_eq!(
        (m.fstype.as_str(), m.source.as_str()),
        ("ext4", format!("/dev/{}", p.partition).as_str())
    );
    assert!(mounted(Path::new(&p.mount_point)));
    assert_layout(&lo, &p, "ext4", 128);
    // It is usable, and now it is not blank.
    fs::write(Path::new(&p.mount_point).join("hello"), b"shoal")
        .expect("write to the new filesystem");
    assert!(probe(&cfg.dev_dir, &lo.name)
        .expect("probe")
        .contains(&Signature::Gpt));
    // Preparing it again is refused by the kernel: its partition is mounted.
    let again = prepare(
        &cfg,
        &lo.name,
        Some(&serial),
        Filesystem::Ext4,
        Some(&serial),
        &mut |_| {},
    );
    assert!(matches!(again, Err(PrepareError::Busy { .. })), "{again:?}");
    assert_eq!(
        lo.mount_root_entries(),
        vec![p.fs_uuid.clone()],
        "the refused attempt left no mount point"
    );
}

#[test]
fn a_blank_drive_is_prepared_with_xfs_without_devtmpfs() {
    require!(host());
    require!(skip::tool("mkfs.xfs", "xfsprogs"));
    // XFS wants 300 MB at least. An empty private /dev stands for a /dev without devtmpfs:
    // prepare must make the disk's and the partition's nodes itself.
    let lo = Loop::new(320);
    let dev_dir = lo.dir.join("dev");
    fs::create_dir(&dev_dir).expect("dev dir");
    let cfg = PrepareConfig {
        dev_dir: dev_dir.clone(),
        ..lo.cfg()
    };
    let p = prepare(&cfg, &lo.name, None, Filesystem::Xfs, None, &mut |_| {}).expect("prepared");
    assert_eq!(p.filesystem, Filesystem::Xfs);
    assert_eq!(
        p.label,
        fs_label(None, &p.fs_uuid),
        "a serial-less drive is labelled from its UUID"
    );
    assert!(p.label.len() <= 12);
    let node = dev_dir.join(&p.partition);
    assert!(fs::metadata(&node)
        .expect("partition node made")
        .file_type()
        .is_block_device());
    let m = mount_entry(&p.mount_point).expect("mounted");
    assert_eq!(
        (m.fstype.as_str(), m.source.as_str()),
        ("xfs", node.to_str().expect("utf-8"))
    );
    assert_layout(&lo, &p, "xfs", 320);
}

#[test]
fn a_4k_sector_drive_gets_its_gpt_in_4k_sectors() {
    require!(host());
    let lo = Loop::with_sectors(64, 4096);
    assert_eq!(
        logical_block_size(Path::new("/sys/block"), &lo.name),
        Ok(4096)
    );
    let p = prepare(
        &lo.cfg(),
        &lo.name,
        None,
        Filesystem::Ext4,
        None,
        &mut |_| {},
    )
    .expect("prepared");
    assert!(mounted(Path::new(&p.mount_point)));
    assert_layout_sectors(&lo, &p, "ext4", 64, 4096);
}

#[test]
fn a_stale_device_node_is_refused() {
    require!(host());
    // A static /dev whose node for this name is some other device.
    let lo = Loop::new(64);
    let before = lo.sha256();
    let dev_dir = lo.dir.join("dev");
    fs::create_dir(&dev_dir).expect("dev dir");
    let stale = DevNumber {
        major: 7,
        minor: 1000,
    };
    make_node(&dev_dir.join(&lo.name), stale).expect("stale node");
    let cfg = PrepareConfig {
        dev_dir,
        ..lo.cfg()
    };
    let r = prepare(&cfg, &lo.name, None, Filesystem::Ext4, None, &mut |_| {});
    assert!(matches!(r, Err(PrepareError::DeviceNode { .. })), "{r:?}");
    let out = restore(&cfg, std::slice::from_ref(&lo.name));
    assert!(
        matches!(out.as_slice(), [Err(RestoreError::Read { .. })]),
        "{out:?}"
    );
    assert_eq!(lo.mount_root_entries(), Vec::<String>::new());
    assert_eq!(lo.sha256(), before);
}

#[test]
fn a_drive_with_data_is_refused_untouched_unless_forced_with_its_serial() {
    require!(host());
    let lo = Loop::new(64);
    sh("mkfs.ext4", &["-F", "-q", &lo.dev()]);
    let cfg = lo.cfg();
    let serial = lo.serial();
    let before = lo.sha256();
    assert!(probe(&cfg.dev_dir, &lo.name)
        .expect("probe")
        .contains(&Signature::Ext));

    let r = prepare(
        &cfg,
        &lo.name,
        Some(&serial),
        Filesystem::Ext4,
        None,
        &mut |_| {},
    );
    match r {
        Err(PrepareError::HasData { signatures }) => {
            assert!(signatures.contains(&Signature::Ext), "{signatures:?}")
        }
        other => panic!("expected HasData, got {other:?}"),
    }
    assert_eq!(lo.sha256(), before, "refused: not a byte changed");

    let r = prepare(
        &cfg,
        &lo.name,
        Some(&serial),
        Filesystem::Ext4,
        Some("not-its-serial"),
        &mut |_| {},
    );
    match r {
        Err(e @ PrepareError::WrongSerial { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("not-its-serial") && text.contains(&serial),
                "{text}"
            );
        }
        other => panic!("expected WrongSerial, got {other:?}"),
    }
    assert_eq!(lo.sha256(), before, "wrong serial: not a byte changed");

    let r = prepare(
        &cfg,
        &lo.name,
        None,
        Filesystem::Ext4,
        Some(&serial),
        &mut |_| {},
    );
    assert!(matches!(r, Err(PrepareError::NoSerial { .. })), "{r:?}");
    assert_eq!(lo.sha256(), before, "no serial: not a byte changed");
    assert_eq!(
        lo.mount_root_entries(),
        Vec::<String>::new(),
        "refusals leave no mount points"
    );

    let mut steps = Vec::new();
    let p = prepare(
        &cfg,
        &lo.name,
        Some(&serial),
        Filesystem::Ext4,
        Some(&serial),
        &mut |s| steps.push(s),
    )
    .expect("forced with the right serial");
    assert!(steps.contains(&Step::Wipe));
    assert!(mounted(Path::new(&p.mount_point)));
    assert_layout(&lo, &p, "ext4", 64);
}

#[test]
fn a_mounted_drive_is_busy_and_untouched() {
    require!(host());
    let lo = Loop::new(64);
    sh("mkfs.ext4", &["-F", "-q", &lo.dev()]);
    let before = lo.sha256();
    let at = lo.dir.join("mnt");
    fs::create_dir(&at).expect("mount dir");
    nix::mount::mount(
        Some(lo.dev().as_str()),
        &at,
        Some("ext4"),
        MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .expect("mount");
    let cfg = lo.cfg();
    let serial = lo.serial();
    for force in [None, Some(serial.as_str())] {
        let r = prepare(
            &cfg,
            &lo.name,
            Some(&serial),
            Filesystem::Ext4,
            force,
            &mut |_| {},
        );
        assert!(matches!(r, Err(PrepareError::Busy { .. })), "{r:?}");
    }
    nix::mount::umount2(&at, MntFlags::empty()).expect("umount");
    assert_eq!(lo.sha256(), before, "not a byte changed");
    assert_eq!(lo.mount_root_entries(), Vec::<String>::new());
}

#[test]
fn a_full_or_read_only_mount_root_is_refused_before_the_drive_is_touched() {
    require!(host());
    let lo = Loop::new(64);
    let before = lo.sha256();
    let serial = lo.serial();

    // Full: a 1 MiB tmpfs filled with a file.
    let full_fs = Tmpfs::mount_at("tmpfs", &lo.dir.join("full"), "size=1m").expect("tmpfs");
    let full = full_fs.path().to_owned();
    let filler = full_fs.fill(0).expect("fill the tmpfs");
    for root in [full.clone(), full.join("drives")] {
        let cfg = PrepareConfig {
            mount_root: root.clone(),
            ..lo.cfg()
        };
        let mut steps = Vec::new();
        let r = prepare(
            &cfg,
            &lo.name,
            Some(&serial),
            Filesystem::Ext4,
            None,
            &mut |s| steps.push(s),
        );
        assert!(
            matches!(r, Err(PrepareError::MountRootFull { .. })),
            "{}: {r:?}",
            root.display()
        );
        assert_eq!(steps, [Step::Preflight]);
    }
    let left: Vec<_> = fs::read_dir(&full)
        .expect("read")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        [filler.file_name().expect("a file name")],
        "no mount point left behind"
    );

    // Read-only: a tmpfs mounted read-only, as the root and as the parent of a root to be made.
    let ro_fs = Tmpfs::mount_at("tmpfs", &lo.dir.join("ro"), "size=1m,ro").expect("tmpfs");
    let ro = ro_fs.path().to_owned();
    for root in [ro.clone(), ro.join("drives")] {
        let cfg = PrepareConfig {
            mount_root: root.clone(),
            ..lo.cfg()
        };
        let r = prepare(
            &cfg,
            &lo.name,
            Some(&serial),
            Filesystem::Ext4,
            None,
            &mut |_| {},
        );
        assert!(
            matches!(r, Err(PrepareError::MountRootReadOnly { .. })),
            "{}: {r:?}",
            root.display()
        );
    }

    assert_eq!(
        probe(Path::new("/dev"), &lo.name).expect("probe"),
        vec![],
        "the drive is still blank"
    );
    assert_eq!(lo.sha256(), before, "not a byte written");
}

#[test]
fn a_drive_vanishing_before_mkfs_stops_the_prepare_and_cleans_up() {
    require!(host());
    let lo = Loop::new(64);
    let cfg = lo.cfg();
    let r = prepare(&cfg, &lo.name, None, Filesystem::Ext4, None, &mut |step| {
        if step == Step::Mkfs {
            lo.detach();
        }
    });
    assert!(
        matches!(r, Err(PrepareError::Vanished { step: Step::Mkfs })),
        "{r:?}"
    );
    assert_eq!(
        lo.mount_root_entries(),
        Vec::<String>::new(),
        "the mount point was removed"
    );
}

#[test]
fn restore_mounts_prepared_drives_again_and_twice_is_fine() {
    require!(host());
    let lo = Loop::new(64);
    let cfg = lo.cfg();
    let p = prepare(
        &cfg,
        &lo.name,
        Some(&lo.serial()),
        Filesystem::Ext4,
        None,
        &mut |_| {},
    )
    .expect("prepared");
    fs::write(Path::new(&p.mount_point).join("kept"), b"across restarts").expect("write");
    nix::mount::umount2(Path::new(&p.mount_point), MntFlags::empty()).expect("umount");
    assert!(!mounted(Path::new(&p.mount_point)));
    // As at boot on a kernel that did not read the GPT itself: the partition is not known to
    // it.
    sh("delpart", &[&lo.dev(), "1"]);
    assert!(!Path::new("/sys/block")
        .join(&lo.name)
        .join(&p.partition)
        .exists());

    let disks = [lo.name.clone()];
    for round in 0..2 {
        let out = restore(&cfg, &disks);
        assert_eq!(out.len(), 1, "round {round}: {out:?}");
        match &out[0] {
            Ok(back) => assert_eq!(back, &p, "round {round}"),
            Err(e) => panic!("round {round}: {e}"),
        }
        let entries: Vec<_> = read_mountinfo()
            .expect("mountinfo")
            .into_iter()
            .filter(|m| m.mount_point == Path::new(&p.mount_point))
            .collect();
        assert_eq!(entries.len(), 1, "round {round}: mounted once: {entries:?}");
    }
    let kept = fs::read(Path::new(&p.mount_point).join("kept")).expect("the file is there again");
    assert_eq!(kept, b"across restarts");

    // A blank disk and a disk with data are not shoal drives: nothing to restore.
    let blank = Loop::new(64);
    let data = Loop::new(64);
    sh("mkfs.ext4", &["-F", "-q", &data.dev()]);
    let out = restore(&cfg, &[blank.name.clone(), data.name.clone()]);
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn detach_lazily_unmounts_and_removes_the_mount_point() {
    require!(host());
    let lo = Loop::new(64);
    let cfg = lo.cfg();
    let p = prepare(&cfg, &lo.name, None, Filesystem::Ext4, None, &mut |_| {}).expect("prepared");
    // An open file on it does not stop a lazy unmount.
    let open = File::create(Path::new(&p.mount_point).join("busy")).expect("open file");
    detach(&p).expect("detach");
    assert!(!mounted(Path::new(&p.mount_point)));
    assert!(!Path::new(&p.mount_point).exists(), "mount point removed");
    drop(open);
    detach(&p).expect("detaching again is fine");
}
