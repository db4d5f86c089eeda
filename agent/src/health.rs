//! Periodic health: load, CPU, memory, memory pressure and filesystem usage.
//!
//! Memory, pressure and mounts are parsed from procfs by pure functions so they can be tested with
//! fixture text; sysinfo supplies only what needs state between samples (CPU usage) plus uptime and
//! load. The `System` is created empty and only its CPU part is ever refreshed, which keeps the
//! agent's resident memory small.

use std::collections::{HashMap, HashSet};

use shoal_proto::{FilesystemUsage, HealthReport, LoadAverage, UnixMillis};
use sysinfo::System;
use tracing::debug;

use crate::{inventory::SysRoots, mountinfo::unescape_octal, sysfs::read_text};

/// Takes health reports; keeps the CPU counters of the previous sample to compute usage between
/// calls.
#[derive(Debug)]
pub struct HealthCollector {
    system: System,
    roots: SysRoots,
}

impl HealthCollector {
    /// A collector reading procfs under `roots.proc`. Takes no sample yet.
    pub fn new(roots: SysRoots) -> Self {
        Self {
            // Not `new_all`: that loads every process and would cost megabytes of resident memory.
            system: System::new(),
            roots,
        }
    }

    /// Takes a report stamped `now`. CPU usage covers the time since the previous call (the first
    /// call has no previous sample and may report 0). Never fails: unreadable sources give zeros,
    /// `None` or an empty list.
    pub fn collect(&mut self, now: UnixMillis) -> HealthReport {
        self.system.refresh_cpu_usage();
        let cpu = self.system.global_cpu_usage();
        let load = System::load_average();
        let proc = &self.roots.proc;
        let mem = read_text(&proc.join("meminfo"))
            .map(|text| parse_meminfo(&text))
            .unwrap_or_default();
        let swap_total = mem.swap_total_bytes.unwrap_or(0);
        let mounts = read_text(&proc.join("self/mounts"))
            .or_else(|| read_text(&proc.join("mounts")))
            .map(|text| parse_mounts(&text))
            .unwrap_or_default();
        HealthReport {
            at: now,
            uptime_secs: System::uptime(),
            load: LoadAverage {
                one: load.one,
                five: load.five,
                fifteen: load.fifteen,
            },
            cpu_percent: if cpu.is_finite() {
                cpu.clamp(0.0, 100.0)
            } else {
                0.0
            },
            memory_total_bytes: mem.total_bytes.unwrap_or(0),
            memory_available_bytes: mem.available_bytes.unwrap_or(0),
            swap_total_bytes: swap_total,
            swap_used_bytes: swap_total.saturating_sub(mem.swap_free_bytes.unwrap_or(0)),
            memory_pressure_avg10: read_text(&proc.join("pressure/memory"))
                .and_then(|text| parse_pressure_some_avg10(&text)),
            filesystems: mounts.iter().filter_map(filesystem_usage).collect(),
        }
    }
}

/// The `/proc/meminfo` lines the agent uses, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MemInfo {
    pub(crate) total_bytes: Option<u64>,
    pub(crate) available_bytes: Option<u64>,
    pub(crate) swap_total_bytes: Option<u64>,
    pub(crate) swap_free_bytes: Option<u64>,
}

/// Parses `/proc/meminfo` (`Key:   1234 kB` lines).
pub(crate) fn parse_meminfo(text: &str) -> MemInfo {
    let fields: HashMap<&str, u64> = text
        .lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            let mut words = rest.split_whitespace();
            let value: u64 = words.next()?.parse().ok()?;
            // Every size line is in kB (KiB); HugePages_* counts have no unit.
            let bytes = match words.next() {
                Some("kB") => value.saturating_mul(1024),
                _ => value,
            };
            Some((key.trim(), bytes))
        })
        .collect();
    let get = |key| fields.get(key).copied();
    // MemAvailable appeared in Linux 3.14; before it, free + page cache is the usual estimate.
    let available = get("MemAvailable").or_else(|| {
        let free = get("MemFree")?;
        Some(free + get("Buffers").unwrap_or(0) + get("Cached").unwrap_or(0))
    });
    MemInfo {
        total_bytes: get("MemTotal"),
        available_bytes: available,
        swap_total_bytes: get("SwapTotal"),
        swap_free_bytes: get("SwapFree"),
    }
}

/// `avg10` of the `some` line of a PSI file (`some avg10=1.23 avg60=...`).
fn parse_pressure_some_avg10(text: &str) -> Option<f32> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("some"))?;
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("avg10="))?;
    value.parse().ok().filter(|v: &f32| v.is_finite())
}

/// One line of `/proc/self/mounts`, unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    device: String,
    mount: String,
    fs_type: String,
}

/// The storage-backed filesystems in a mounts table: each device once, at its first mount point,
/// leaving out mount points hidden by a later mount on top of them (`statvfs` would see the upper
/// one).
fn parse_mounts(text: &str) -> Vec<Mount> {
    let all: Vec<Mount> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some(Mount {
                device: unescape(fields.next()?),
                mount: unescape(fields.next()?),
                fs_type: fields.next()?.to_owned(),
            })
        })
        .collect();
    let last_at: HashMap<&str, usize> = all
        .iter()
        .enumerate()
        .map(|(i, m)| (m.mount.as_str(), i))
        .collect();
    let mut seen_devices = HashSet::new();
    all.iter()
        .enumerate()
        .filter(|(i, m)| last_at.get(m.mount.as_str()) == Some(i))
        .map(|(_, m)| m)
        .filter(|m| is_storage(&m.device, &m.fs_type))
        .filter(|m| seen_devices.insert(m.device.clone()))
        .cloned()
        .collect()
}

/// A mounts-table field with the kernel's octal escapes undone.
fn unescape(field: &str) -> String {
    String::from_utf8_lossy(&unescape_octal(field)).into_owned()
}

/// Whether a mount holds data on a disk or a file server, as opposed to a kernel view (proc,
/// sysfs, cgroup), memory (tmpfs), a union of other mounts (overlay) or a read-only image that is
/// always full (squashfs snaps, ISOs).
fn is_storage(device: &str, fs_type: &str) -> bool {
    const IMAGES: &[&str] = &["squashfs", "iso9660", "erofs", "udf"];
    const STORAGE: &[&str] = &[
        "ext2", "ext3", "ext4", "xfs", "btrfs", "bcachefs", "zfs", "vfat", "exfat", "ntfs",
        "ntfs3", "f2fs", "jfs", "reiserfs", "nfs", "nfs4", "cifs", "smb3", "ceph", "lustre",
        "gfs2", "ocfs2", "fuseblk",
    ];
    if IMAGES.contains(&fs_type) {
        return false;
    }
    // Network and pooled filesystems (nfs, zfs) have no /dev source; pseudo filesystems on a
    // /dev path (devtmpfs is "devtmpfs", tmpfs "tmpfs") never start with it.
    STORAGE.contains(&fs_type) || (device.starts_with("/dev/") && !fs_type.contains("tmpfs"))
}

/// Sizes of one mounted filesystem; `None` if `statvfs` fails (gone, no permission).
// The `u64::from`s are no-ops on 64-bit Linux but not on 32-bit targets, where the counts are u32.
#[allow(clippy::useless_conversion)]
fn filesystem_usage(mount: &Mount) -> Option<FilesystemUsage> {
    let stat = match nix::sys::statvfs::statvfs(mount.mount.as_str()) {
        Ok(stat) => stat,
        Err(err) => {
            debug!(mount = %mount.mount, cause = %err, "statvfs failed");
            return None;
        }
    };
    // statvfs counts blocks in units of the fragment size, not `block_size`.
    let fragment = u64::from(stat.fragment_size());
    Some(FilesystemUsage {
        mount: mount.mount.clone(),
        device: mount.device.clone(),
        fs_type: mount.fs_type.clone(),
        total_bytes: u64::from(stat.blocks()).saturating_mul(fragment),
        available_bytes: u64::from(stat.blocks_available()).saturating_mul(fragment),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{fs, path::Path};

    const MEMINFO: &str = "\
MemTotal:       16318264 kB
MemFree:         1204400 kB
MemAvailable:    9876543 kB
Buffers:          412340 kB
Cached:          7654321 kB
SwapTotal:       2097148 kB
SwapFree:        1048574 kB
HugePages_Total:       0
";

    #[test]
    fn meminfo_in_bytes() {
        assert_eq!(
            parse_meminfo(MEMINFO),
            MemInfo {
                total_bytes: Some(16318264 * 1024),
                available_bytes: Some(9876543 * 1024),
                swap_total_bytes: Some(2097148 * 1024),
                swap_free_bytes: Some(1048574 * 1024),
            }
        );
    }

    #[test]
    fn meminfo_before_memavailable_and_garbage() {
        let old = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 300 kB\n";
        assert_eq!(parse_meminfo(old).available_bytes, Some(420 * 1024));
        assert_eq!(parse_meminfo(""), MemInfo::default());
        assert_eq!(
            parse_meminfo("MemTotal: lots kB\nnonsense\n:\n"),
            MemInfo::default()
        );
    }

    #[test]
    fn pressure_some_avg10() {
        let psi = "some avg10=1.23 avg60=0.50 avg300=0.10 total=123456\n\
                   full avg10=0.40 avg60=0.10 avg300=0.00 total=23456\n";
        assert_eq!(parse_pressure_some_avg10(psi), Some(1.23));
        assert_eq!(parse_pressure_some_avg10("full avg10=0.40\n"), None);
        assert_eq!(parse_pressure_some_avg10("some avg10=x\n"), None);
        assert_eq!(parse_pressure_some_avg10(""), None);
    }

    const MOUNTS: &str = "\
proc /proc proc rw,relatime 0 0
sysfs /sys sysfs rw,relatime 0 0
devtmpfs /dev devtmpfs rw,relatime,size=12334432k 0 0
tmpfs /run tmpfs rw,nosuid,nodev 0 0
/dev/nvme0n1p2 / ext4 rw,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw 0 0
/dev/nvme0n1p1 /boot/efi vfat rw 0 0
/dev/nvme0n1p2 /var/lib/bind ext4 rw 0 0
/dev/sdb1 /srv/my\\040data ext4 rw 0 0
tank/home /home zfs rw,xattr 0 0
nas:/export /mnt/nas nfs4 rw 0 0
overlay /var/lib/docker/overlay2/abc/merged overlay rw 0 0
/dev/loop3 /snap/core/1 squashfs ro 0 0
/dev/sdc1 /mnt/hidden xfs rw 0 0
tmpfs /mnt/hidden tmpfs rw 0 0
short line
";

    #[test]
    fn mounts_keep_storage_once_per_device() {
        let mounts: Vec<(String, String, String)> = parse_mounts(MOUNTS)
            .into_iter()
            .map(|m| (m.device, m.mount, m.fs_type))
            .collect();
        let want = [
            ("/dev/nvme0n1p2", "/", "ext4"),
            ("/dev/nvme0n1p1", "/boot/efi", "vfat"),
            ("/dev/sdb1", "/srv/my data", "ext4"),
            ("tank/home", "/home", "zfs"),
            ("nas:/export", "/mnt/nas", "nfs4"),
        ];
        let want: Vec<(String, String, String)> = want
            .iter()
            .map(|(d, m, t)| (d.to_string(), m.to_string(), t.to_string()))
            .collect();
        assert_eq!(mounts, want);
    }

    #[test]
    fn collect_from_fixture_proc() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data disk");
        fs::create_dir_all(&data).expect("mkdir");
        let proc = dir.path().join("proc");
        fs::create_dir_all(proc.join("self")).expect("mkdir");
        fs::create_dir_all(proc.join("pressure")).expect("mkdir");
        fs::write(proc.join("meminfo"), MEMINFO).expect("write");
        fs::write(
            proc.join("pressure/memory"),
            "some avg10=2.50 avg60=0 avg300=0 total=1\n",
        )
        .expect("write");
        let escaped = data.display().to_string().replace(' ', r"\040");
        let mounts = format!(
            "proc /proc proc rw 0 0\n/dev/sdb1 {escaped} ext4 rw 0 0\n/dev/sdc1 /does/not/exist xfs rw 0 0\n"
        );
        fs::write(proc.join("self/mounts"), mounts).expect("write");

        let roots = SysRoots {
            proc,
            ..SysRoots::default()
        };
        let report = HealthCollector::new(roots).collect(UnixMillis(42));
        assert_eq!(report.at, UnixMillis(42));
        assert_eq!(report.memory_total_bytes, 16318264 * 1024);
        assert_eq!(report.memory_available_bytes, 9876543 * 1024);
        assert_eq!(report.swap_total_bytes, 2097148 * 1024);
        assert_eq!(report.swap_used_bytes, (2097148 - 1048574) * 1024);
        assert_eq!(report.memory_pressure_avg10, Some(2.5));
        // The mount that does not exist is dropped, not reported as zero.
        assert_eq!(report.filesystems.len(), 1);
        let fs = &report.filesystems[0];
        assert_eq!(
            (fs.device.as_str(), fs.fs_type.as_str()),
            ("/dev/sdb1", "ext4")
        );
        assert_eq!(Path::new(&fs.mount), data);
        assert!(fs.total_bytes > 0 && fs.available_bytes <= fs.total_bytes);
    }

    #[test]
    fn collect_from_empty_proc_does_not_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let roots = SysRoots {
            proc: dir.path().to_owned(),
            ..SysRoots::default()
        };
        let report = HealthCollector::new(roots).collect(UnixMillis(1));
        assert_eq!(report.memory_total_bytes, 0);
        assert_eq!(report.memory_pressure_avg10, None);
        assert!(report.filesystems.is_empty());
    }

    #[test]
    fn collect_on_this_machine_is_sane() {
        let mut collector = HealthCollector::new(SysRoots::default());
        let first = collector.collect(UnixMillis(1));
        // Let the CPU counters move so the second sample has an interval to measure.
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let report = collector.collect(UnixMillis(2));
        for r in [&first, &report] {
            assert!(r.uptime_secs > 0);
            assert!(r.memory_total_bytes > 0);
            assert!(r.memory_available_bytes <= r.memory_total_bytes);
            assert!(r.swap_used_bytes <= r.swap_total_bytes);
            assert!((0.0..=100.0).contains(&r.cpu_percent), "{}", r.cpu_percent);
            assert!(r.load.one >= 0.0);
            assert!(
                !r.filesystems.is_empty(),
                "no filesystems in {:?}",
                r.filesystems
            );
            assert!(r.filesystems.iter().all(|f| f.total_bytes > 0));
        }
    }
}
