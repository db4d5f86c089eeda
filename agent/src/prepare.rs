//! Preparing a drive for shoal (a GPT with one partition, a filesystem, a mount by filesystem
//! UUID), and mounting prepared drives again when the agent starts.
//!
//! The rule this module exists to keep: **shoal never writes over a drive that holds data.**
//! [`prepare`] keeps it like this:
//!
//! - Nothing is written until every check has passed: the mkfs tool exists, the mount point could
//!   be made, the drive opened exclusively, and the probe found nothing (or the operator forced it
//!   with the drive's serial number).
//! - The drive is opened `O_EXCL`: the kernel refuses while the drive or one of its partitions is
//!   mounted, or held by md or device-mapper. The probe and every write go through that descriptor.
//! - The probe ([`probe`]) looks where [`blank::signatures`] looks, at both ends of the device, and
//!   also where partitions start (1 MiB, where ours will start, with the end ours will have; and
//!   sector 63, where DOS partitioning put them). A drive whose partition table alone was wiped
//!   (`wipefs /dev/sdX`) still shows the filesystem of its first partition, and is refused.
//! - The drive's identity is checked before every step: its `/sys/block` entry must still exist
//!   with a non-zero size and the same `diskseq` (a number the kernel gives each disk it attaches),
//!   so a drive pulled and another plugged in under the same name is noticed before the next step.
//! - Before mkfs, the partition must be the one just written (start and size in sysfs, the GPT's
//!   random disk GUID read back from the disk, the device node's number) and blank. Before the
//!   mount, its superblock must carry the filesystem UUID just generated.
//!
//! Where udev runs, the whole disk carries the BSD lock udev honours while it is written, and
//! `udevadm settle` waits out udev's own re-read of the table (set off by closing the written disk)
//! before the partition is checked and formatted.
//!
//! Prepared drives are recognised by their GPT partition name, [`PARTITION_NAME`], and mounted at
//! `<mount root>/<filesystem UUID>` ([`restore`]). Nothing here depends on udev: the filesystem
//! UUID is read from the superblock, device nodes missing from `/dev` (no devtmpfs) are made from
//! sysfs, and a kernel that does not parse GPTs itself is told about the partition with `BLKPG`.
//!
//! Sans-IO parts (names, label, geometry, superblock and mountinfo parsing, the probe's windows)
//! are plain functions over bytes; the shell around them is blocking I/O, for `spawn_blocking`.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom},
    os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use gpt::{disk::LogicalBlockSize, mbr::ProtectiveMBR, partition_types, GptConfig, GptError};
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
    mount::{MntFlags, MsFlags},
    sys::{
        stat::{self, Mode, SFlag},
        statvfs::{statvfs, FsFlags},
    },
};
use shoal_proto::{Filesystem, PreparedDrive};
use tracing::{debug, info, warn};

use crate::{
    blank::{self, Signature},
    blockdev::partition_name,
    mountinfo::{read_mountinfo, MountEntry},
    sysfs::{self, DevNumber},
};

/// The GPT partition name that marks a partition as shoal's.
pub const PARTITION_NAME: &str = "shoal";

const MIB: u64 = 1 << 20;
/// Where DOS partitioning started the first partition: sector 63.
const DOS_START: usize = 63 * 512;
/// How long to wait for devtmpfs to make a partition's node once sysfs shows it, before making it.
const NODE_GRACE: Duration = Duration::from_secs(1);
/// How often waits poll.
const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------
// Configuration and errors

/// Where drives are mounted and where devices are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareConfig {
    /// Prepared drives are mounted at `<mount_root>/<filesystem UUID>`. Default
    /// `/var/lib/shoal/drives`.
    pub mount_root: PathBuf,
    /// Device nodes. Default `/dev`.
    pub dev_dir: PathBuf,
    /// The kernel's block devices in sysfs. Default `/sys/block`.
    pub sys_block: PathBuf,
    /// How long mkfs may run before it is killed. Default 10 minutes.
    pub mkfs_timeout: Duration,
    /// How long to wait for the kernel to show a new partition (and, when the kernel is busy, to
    /// accept the new partition table). Default 10 seconds.
    pub settle_timeout: Duration,
}

impl Default for PrepareConfig {
    fn default() -> Self {
        Self {
            mount_root: PathBuf::from("/var/lib/shoal/drives"),
            dev_dir: PathBuf::from("/dev"),
            sys_block: PathBuf::from("/sys/block"),
            mkfs_timeout: Duration::from_secs(600),
            settle_timeout: Duration::from_secs(10),
        }
    }
}

/// A step of [`prepare`], in the order they run. The observer is told of each before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Step {
    /// Checks that write nothing to the drive: mkfs tool, sector size, UUID, mount point.
    Preflight,
    /// Opening the drive exclusively.
    Open,
    /// Reading what is on the drive, and checking a `force_serial`.
    Probe,
    /// Zeroing the places signatures live (only when forced over data).
    Wipe,
    /// Writing the GPT and having the kernel read it.
    Partition,
    /// Waiting for the partition to show in sysfs and `/dev`.
    Settle,
    /// Making the filesystem.
    Mkfs,
    /// Mounting it by UUID.
    Mount,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Preflight => "preflight",
            Step::Open => "open",
            Step::Probe => "probe",
            Step::Wipe => "wipe",
            Step::Partition => "partition",
            Step::Settle => "settle",
            Step::Mkfs => "mkfs",
            Step::Mount => "mount",
        })
    }
}

/// Why [`probe`] could not tell what is on a drive.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// The name is not a kernel block device name (it must not contain `/`).
    #[error("{disk:?} is not a block device name")]
    BadName {
        /// The name given.
        disk: String,
    },
    /// The device could not be opened.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The device node.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Its size or its first and last blocks could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The device node.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Why [`prepare`] did not prepare a drive. The preflight errors (mkfs tool, sector size, mount
/// root), `Busy`, `HasData`, `NoSerial` and `WrongSerial` all come before anything is written to
/// the drive; so does `Vanished` at any step up to and including [`Step::Wipe`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrepareError {
    /// The name is not a kernel block device name.
    #[error("{disk:?} is not a block device name")]
    BadName {
        /// The name given.
        disk: String,
    },
    /// There is no such whole disk in `/sys/block` (or it has no medium: size 0).
    #[error("there is no disk {disk} (or it has no medium)")]
    NoSuchDisk {
        /// The name given.
        disk: String,
    },
    /// The drive went away (or was replaced by another under the same name) before `step`.
    #[error("the drive vanished before the {step} step")]
    Vanished {
        /// The step that was about to run.
        step: Step,
    },
    /// `mkfs.ext4` / `mkfs.xfs` is not installed.
    #[error("{tool} is not installed (e2fsprogs for ext4, xfsprogs for xfs)")]
    MkfsMissing {
        /// The tool looked for.
        tool: String,
    },
    /// The drive's logical sector size could not be read, or is neither 512 nor 4096 bytes.
    #[error("cannot use the sector size of {disk}: {reason}")]
    SectorSize {
        /// The drive.
        disk: String,
        /// What was wrong.
        reason: String,
    },
    /// The filesystem holding the mount root has no space left.
    #[error("no space left for a mount point in {}", path.display())]
    MountRootFull {
        /// The mount root.
        path: PathBuf,
    },
    /// The filesystem holding the mount root is read-only.
    #[error("cannot make a mount point in {}: read-only filesystem", path.display())]
    MountRootReadOnly {
        /// The mount root.
        path: PathBuf,
    },
    /// The mount point could not be made for another reason.
    #[error("cannot make a mount point in {}: {source}", path.display())]
    MountRoot {
        /// The path that could not be made or read.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The drive is in use: it or a partition is mounted, or it is part of an md array or a
    /// device-mapper device (the kernel refused to open it exclusively).
    #[error("{disk} is in use (mounted, or part of a RAID array or device-mapper device)")]
    Busy {
        /// The drive.
        disk: String,
    },
    /// The device node could not be opened.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The device node.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A device node is not the device sysfs describes (a stale node in a static `/dev`), or could
    /// not be made.
    #[error("device node {}: {reason}", path.display())]
    DeviceNode {
        /// The node.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The drive could not be read.
    #[error("cannot read {disk}: {source}")]
    Read {
        /// The drive.
        disk: String,
        /// Why.
        source: io::Error,
    },
    /// The drive is too small for a 1 MiB-aligned partition.
    #[error("{disk} is too small to prepare ({size} bytes)")]
    TooSmall {
        /// The drive.
        disk: String,
        /// Its size in bytes.
        size: u64,
    },
    /// The drive is not blank, and the operator did not force it. Nothing was written.
    #[error("the drive holds data ({}); it is prepared only when forced with its serial number", list(.signatures))]
    HasData {
        /// What was found.
        signatures: Vec<Signature>,
    },
    /// Forcing was asked for, but the drive reports no serial number, so it can never be forced.
    #[error("{disk} has no serial number, so it cannot be forced")]
    NoSerial {
        /// The drive.
        disk: String,
    },
    /// Forcing was asked for with a serial number that is not the drive's.
    #[error("the serial number given ({given:?}) is not {disk}'s ({serial:?}); refusing")]
    WrongSerial {
        /// The drive.
        disk: String,
        /// The drive's serial number.
        serial: String,
        /// The serial number the operator gave.
        given: String,
    },
    /// Writing to the drive failed (zeroing, or flushing).
    #[error("writing {disk} failed during {step}: {source}")]
    Write {
        /// The drive.
        disk: String,
        /// The step.
        step: Step,
        /// Why.
        source: io::Error,
    },
    /// Zeroing the signatures of a forced drive did not leave it blank.
    #[error("{disk} still shows {} after zeroing", list(.signatures))]
    WipeIncomplete {
        /// The drive.
        disk: String,
        /// What is still found.
        signatures: Vec<Signature>,
    },
    /// Writing or reading back the GPT failed.
    #[error("partition table of {disk}: {reason}")]
    Gpt {
        /// The drive.
        disk: String,
        /// What failed.
        reason: String,
    },
    /// The kernel would not take the new partition table (a loop device needs `losetup -P`).
    #[error("the kernel would not read the new partition table of {disk}: {source}")]
    Reread {
        /// The drive.
        disk: String,
        /// The ioctl's error.
        source: Errno,
    },
    /// The new partition did not show in sysfs and `/dev` in time.
    #[error("partition {partition} did not appear within {timeout:?}")]
    Settle {
        /// The partition.
        partition: String,
        /// How long it was waited for.
        timeout: Duration,
    },
    /// Something is not what was just written (partition geometry, GPT disk GUID, filesystem UUID),
    /// or the new partition is not blank: the drive changed under us, so nothing more is done.
    #[error("{disk} changed while being prepared: {reason}")]
    Changed {
        /// The drive.
        disk: String,
        /// What did not match.
        reason: String,
    },
    /// mkfs could not be started or waited for.
    #[error("cannot run {tool}: {source}")]
    MkfsSpawn {
        /// The tool.
        tool: String,
        /// Why.
        source: io::Error,
    },
    /// mkfs failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Mkfs {
        /// The tool.
        tool: String,
        /// Its exit status.
        status: String,
        /// The end of what it printed on stderr.
        stderr: String,
    },
    /// mkfs ran longer than `mkfs_timeout` and was killed.
    #[error("{tool} did not finish within {timeout:?} and was killed")]
    MkfsTimeout {
        /// The tool.
        tool: String,
        /// The limit.
        timeout: Duration,
    },
    /// mount(2) failed.
    #[error("cannot mount {partition} at {}: {source}", mount_point.display())]
    Mount {
        /// The partition.
        partition: String,
        /// Where.
        mount_point: PathBuf,
        /// The error.
        source: Errno,
    },
}

/// Why [`restore`] could not mount a drive (or could not tell whether it is one of shoal's).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The name is not a kernel block device name.
    #[error("{disk:?} is not a block device name")]
    BadName {
        /// The name given.
        disk: String,
    },
    /// There is no such whole disk in `/sys/block`.
    #[error("there is no disk {disk}")]
    NoSuchDisk {
        /// The name given.
        disk: String,
    },
    /// `/proc/self/mountinfo` could not be read.
    #[error("cannot read the mount table: {source}")]
    MountTable {
        /// Why.
        source: io::Error,
    },
    /// The disk's sector size or partition table could not be read.
    #[error("cannot read the partition table of {disk}: {reason}")]
    Read {
        /// The disk.
        disk: String,
        /// Why.
        reason: String,
    },
    /// A shoal partition could not be made known to the kernel, or its device node is wrong.
    #[error("shoal partition {partition}: {reason}")]
    Partition {
        /// The partition.
        partition: String,
        /// What failed.
        reason: String,
    },
    /// A shoal partition holds no ext4 or XFS filesystem (a prepare that failed before mkfs).
    #[error("shoal partition {partition} holds no ext4 or XFS filesystem")]
    NoFilesystem {
        /// The partition.
        partition: String,
    },
    /// The mount point could not be made.
    #[error("cannot make mount point {}: {source}", mount_point.display())]
    MountPoint {
        /// The mount point.
        mount_point: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Another device is mounted where this drive belongs (two drives with one filesystem UUID?).
    #[error("{} is taken by {by}, not {partition}", mount_point.display())]
    MountPointTaken {
        /// The partition.
        partition: String,
        /// The mount point.
        mount_point: PathBuf,
        /// What is mounted there.
        by: String,
    },
    /// mount(2) failed.
    #[error("cannot mount {partition} at {}: {source}", mount_point.display())]
    Mount {
        /// The partition.
        partition: String,
        /// Where.
        mount_point: PathBuf,
        /// The error.
        source: Errno,
    },
}

/// Why [`detach`] could not remove a vanished drive's mount.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DetachError {
    /// umount2 failed for a reason other than "not mounted".
    #[error("cannot unmount {}: {source}", mount_point.display())]
    Unmount {
        /// The mount point.
        mount_point: PathBuf,
        /// The error.
        source: Errno,
    },
    /// The (empty) mount point could not be removed.
    #[error("cannot remove {}: {source}", mount_point.display())]
    RemoveDir {
        /// The mount point.
        mount_point: PathBuf,
        /// Why.
        source: io::Error,
    },
}

fn list(signatures: &[Signature]) -> String {
    signatures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Sans-IO core

/// A kernel block device name that names a node directly in `/dev`: ASCII letters, digits, `-`, `_`
/// and `.`, not starting with `.`.
pub fn valid_disk_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The filesystem label: `shoal-` and the last 6 letters and digits of the serial number, or of the
/// filesystem UUID for a drive without one. At most 12 characters, XFS's limit.
pub fn fs_label(serial: Option<&str>, fs_uuid: &str) -> String {
    fn last6(s: &str) -> String {
        let alnum: Vec<char> = s.chars().filter(char::is_ascii_alphanumeric).collect();
        alnum[alnum.len().saturating_sub(6)..].iter().collect()
    }
    let tail = serial
        .map(last6)
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| last6(fs_uuid));
    format!("shoal-{tail}")
}

/// 16 bytes as a UUID in the usual lowercase hyphenated form.
fn format_uuid(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A random (version 4) UUID.
fn new_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    format_uuid(&b)
}

/// Byte range of a partition, `end` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u64,
    end: u64,
}

impl Span {
    fn len(self) -> u64 {
        self.end - self.start
    }
}

/// Where shoal's one partition goes on a device of `size` bytes with `sector`-byte logical blocks:
/// from 1 MiB to the end of the last usable LBA (before the backup GPT) rounded down to a MiB.
/// `None` when that leaves less than a MiB or the sector size is not 512 or 4096.
fn partition_span(size: u64, sector: u64) -> Option<Span> {
    if sector != 512 && sector != 4096 {
        return None;
    }
    let lbas = size / sector;
    // The backup header is the last LBA; the backup entry array (128 × 128 bytes) is just before
    // it.
    let last_usable = lbas.checked_sub(2 + 16384u64.div_ceil(sector))?;
    let end = (last_usable + 1) * sector / MIB * MIB;
    (end >= 2 * MIB).then_some(Span { start: MIB, end })
}

/// The partition spans for either sector size (the probe does not know which one the drive has).
fn candidate_spans(size: u64) -> Vec<Span> {
    let mut spans: Vec<Span> = [512, 4096]
        .iter()
        .filter_map(|s| partition_span(size, *s))
        .collect();
    spans.dedup();
    spans
}

/// Every signature on a device of `size` bytes, reading through `read(offset, len)`: at both ends
/// of the device, at sector 63 (DOS partitions), and where shoal's partition will be (its first MiB
/// and its last, for either sector size). Sorted, without duplicates; empty means blank.
fn scan(
    size: u64,
    read: &mut dyn FnMut(u64, usize) -> io::Result<Vec<u8>>,
) -> io::Result<Vec<Signature>> {
    let head_len = size.min(2 * MIB);
    let head = read(0, to_usize(head_len))?;
    let tail_len = size.min(MIB);
    let tail = read(size - tail_len, to_usize(tail_len))?;
    let mut found = blank::signatures(&head, &tail, size);
    if let Some(dos) = head.get(DOS_START..) {
        found.extend(blank::signatures(dos, &[], size - DOS_START as u64));
    }
    if let Some(part_head) = head.get(to_usize(MIB)..) {
        for span in candidate_spans(size) {
            let part_tail = read(span.end - MIB, to_usize(MIB))?;
            found.extend(blank::signatures(part_head, &part_tail, span.len()));
        }
    }
    found.sort();
    found.dedup();
    Ok(found)
}

/// The ranges a forced prepare zeroes: everything [`scan`] reads.
fn wipe_ranges(size: u64) -> Vec<(u64, u64)> {
    let mut ranges = vec![
        (0, size.min(2 * MIB)),
        (size - size.min(MIB), size.min(MIB)),
    ];
    ranges.extend(
        candidate_spans(size)
            .into_iter()
            .map(|s| (s.end - MIB, MIB)),
    );
    ranges
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// What a superblock says about a filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsIdentity {
    /// ext4 (also ext2/3, which the ext4 driver mounts) or XFS.
    pub filesystem: Filesystem,
    /// The filesystem UUID, lowercase hyphenated.
    pub uuid: String,
    /// The label, empty when none.
    pub label: String,
}

/// Reads an ext2/3/4 or XFS superblock from the first 2 KiB (or more) of a partition: ext's at byte
/// 1024 (magic at +0x38, `s_uuid` at +0x68, `s_volume_name` at +0x78), XFS's at byte 0 (`XFSB`,
/// `sb_uuid` at 32, `sb_fname` at 108). `None` for anything else, or a nil UUID.
pub fn fs_identity(sb: &[u8]) -> Option<FsIdentity> {
    let field = |off: usize, len: usize| sb.get(off..off + len);
    let (filesystem, uuid, label) = if field(1024 + 0x38, 2) == Some(&[0x53, 0xef]) {
        (
            Filesystem::Ext4,
            field(1024 + 0x68, 16)?,
            field(1024 + 0x78, 16)?,
        )
    } else if field(0, 4) == Some(b"XFSB") {
        (Filesystem::Xfs, field(32, 16)?, field(108, 12)?)
    } else {
        return None;
    };
    let uuid: [u8; 16] = uuid.try_into().ok()?;
    if uuid == [0; 16] {
        return None;
    }
    let label = label.split(|b| *b == 0).next().unwrap_or_default();
    Some(FsIdentity {
        filesystem,
        uuid: format_uuid(&uuid),
        label: String::from_utf8_lossy(label).into_owned(),
    })
}

/// Whether a GPT header (the 92 bytes at LBA 1 or in the last LBA) has the shape shoal writes, or
/// is no GPT header at all: 128-byte entries, at most 128 of them. The `gpt` crate panics on other
/// entry sizes and walks whatever count a header claims, so other tables are not handed to it (no
/// shoal drive has one).
fn gpt_header_shape_ok(header: &[u8]) -> bool {
    if header.get(..8) != Some(b"EFI PART") {
        return true;
    }
    let word = |off: usize| {
        header
            .get(off..off + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    matches!((word(80), word(84)), (Some(count), Some(128)) if count <= 128)
}

// ---------------------------------------------------------------------------------------------
// I/O helpers

/// The disk as sysfs shows it now: `None` when it is gone or has no medium (size 0).
fn presence(sys_block: &Path, disk: &str) -> Option<Option<u64>> {
    let dir = sys_block.join(disk);
    let size = sysfs::read_u64(&dir.join("size"))?;
    (size > 0).then(|| sysfs::read_u64(&dir.join("diskseq")))
}

fn logical_block_size(sys_block: &Path, disk: &str) -> Result<u64, String> {
    let path = sys_block.join(disk).join("queue/logical_block_size");
    let size = sysfs::read_u64(&path).ok_or_else(|| format!("cannot read {}", path.display()))?;
    if size == 512 || size == 4096 {
        Ok(size)
    } else {
        Err(format!(
            "{size}-byte sectors (only 512 and 4096 are supported)"
        ))
    }
}

fn device_size(file: &File) -> io::Result<u64> {
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

fn read_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Whether a device node is the device sysfs numbers `devnum`.
fn node_matches(path: &Path, devnum: DevNumber) -> io::Result<Result<(), String>> {
    let meta = fs::metadata(path)?;
    if !meta.file_type().is_block_device() {
        return Ok(Err("not a block device".to_owned()));
    }
    let rdev = meta.rdev();
    let found = (stat::major(rdev), stat::minor(rdev));
    if found == (u64::from(devnum.major), u64::from(devnum.minor)) {
        Ok(Ok(()))
    } else {
        Ok(Err(format!(
            "is device {}:{}, but sysfs says {devnum}",
            found.0, found.1
        )))
    }
}

/// Makes the block device node `path` for `devnum` (for a `/dev` without devtmpfs).
fn make_node(path: &Path, devnum: DevNumber) -> Result<(), String> {
    let dev = stat::makedev(u64::from(devnum.major), u64::from(devnum.minor));
    stat::mknod(path, SFlag::S_IFBLK, Mode::from_bits_truncate(0o600), dev)
        .map_err(|e| format!("mknod: {e}"))?;
    info!(node = %path.display(), major = devnum.major, minor = devnum.minor, "made a device node (no devtmpfs)");
    Ok(())
}

/// The node of whole disk `disk`, checked against sysfs's device number; made when missing (a
/// `/dev` without devtmpfs).
fn disk_node(sys_block: &Path, dev_dir: &Path, disk: &str) -> Result<PathBuf, String> {
    let node = dev_dir.join(disk);
    let devnum = DevNumber::read(&sys_block.join(disk))
        .ok_or_else(|| "sysfs has no device number for it".to_owned())?;
    match node_matches(&node, devnum) {
        Ok(result) => result.map(|()| node),
        Err(e) if e.kind() == io::ErrorKind::NotFound => make_node(&node, devnum).map(|()| node),
        Err(e) => Err(e.to_string()),
    }
}

/// Waits for the device node of a partition sysfs shows as `devnum`; after [`NODE_GRACE`] (or at
/// `deadline`) without one, makes it. A node with other numbers is an error, never replaced.
fn wait_node(
    path: &Path,
    devnum: DevNumber,
    since: Instant,
    deadline: Instant,
) -> Result<bool, String> {
    match node_matches(path, devnum) {
        Ok(Ok(())) => Ok(true),
        Ok(Err(reason)) => Err(reason),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if since.elapsed() >= NODE_GRACE || Instant::now() >= deadline {
                make_node(path, devnum)?;
                Ok(true)
            } else {
                Ok(false)
            }
        }
        Err(e) => Err(e.to_string()),
    }
}

/// `mkfs.ext4` or `mkfs.xfs` on `PATH`, or in the sbin directories a non-root `PATH` lacks.
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
}

/// The filesystem a partition's superblock describes.
fn read_identity(path: &Path) -> io::Result<Option<FsIdentity>> {
    let file = File::open(path)?;
    let size = device_size(&file)?;
    let head = read_at(&file, 0, to_usize(size.min(4096)))?;
    Ok(fs_identity(&head))
}

/// Removes a mount point directory if it is empty; anything else stays.
fn remove_empty_dir(path: &Path) -> io::Result<()> {
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e)
            if e.raw_os_error() == Some(Errno::ENOTEMPTY as i32)
                || e.raw_os_error() == Some(Errno::EBUSY as i32) =>
        {
            warn!(path = %path.display(), cause = %e, "mount point left in place");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The ioctls nix has no safe wrapper for: `BLKRRPART` (re-read the partition table) and `BLKPG`
/// (add one partition). Each call passes a borrowed descriptor and, for `BLKPG`, pointers to locals
/// that outlive the call.
#[allow(unsafe_code)]
mod ioctl {
    use std::os::fd::{AsRawFd, BorrowedFd};

    nix::ioctl_none!(blkrrpart, 0x12, 95);
    nix::ioctl_write_ptr_bad!(blkpg, nix::request_code_none!(0x12, 105), BlkpgIoctlArg);

    /// `struct blkpg_partition` (linux/blkpg.h).
    #[repr(C)]
    struct BlkpgPartition {
        start: i64,
        length: i64,
        pno: i32,
        devname: [u8; 64],
        volname: [u8; 64],
    }

    /// `struct blkpg_ioctl_arg` (linux/blkpg.h).
    #[repr(C)]
    pub(super) struct BlkpgIoctlArg {
        op: i32,
        flags: i32,
        datalen: i32,
        data: *mut std::ffi::c_void,
    }

    const BLKPG_ADD_PARTITION: i32 = 1;

    // The sizes the kernel's structs have on 64-bit targets.
    #[cfg(target_pointer_width = "64")]
    const _: () = assert!(
        std::mem::size_of::<BlkpgPartition>() == 152 && std::mem::size_of::<BlkpgIoctlArg>() == 24
    );

    /// Has the kernel re-read the partition table of the whole disk `fd`.
    pub(super) fn reread_partitions(fd: BorrowedFd<'_>) -> nix::Result<()> {
        // SAFETY: BLKRRPART takes no argument; `fd` is open for the duration of the call.
        unsafe { blkrrpart(fd.as_raw_fd()) }.map(drop)
    }

    /// Tells the kernel about partition `pno` of the whole disk `fd`: `length` bytes from `start`.
    pub(super) fn add_partition(
        fd: BorrowedFd<'_>,
        pno: i32,
        start: i64,
        length: i64,
    ) -> nix::Result<()> {
        let mut part = BlkpgPartition {
            start,
            length,
            pno,
            devname: [0; 64],
            volname: [0; 64],
        };
        let arg = BlkpgIoctlArg {
            op: BLKPG_ADD_PARTITION,
            flags: 0,
            datalen: std::mem::size_of::<BlkpgPartition>() as i32,
            data: std::ptr::addr_of_mut!(part).cast(),
        };
        // SAFETY: `arg` and the `part` it points to are laid out as in linux/blkpg.h (`repr(C)`)
        // and live until the call returns; the kernel only copies them in. `fd` is open for the
        // call.
        unsafe { blkpg(fd.as_raw_fd(), &arg) }.map(drop)
    }
}

// ---------------------------------------------------------------------------------------------
// probe

/// What is on drive `disk` (`<dev_dir>/<disk>`): every signature [`blank::signatures`] finds at
/// either end of the device, or at the start or end of where a partition would be (1 MiB, and
/// sector 63). Empty means blank. Opens the device read-only and writes nothing.
pub fn probe(dev_dir: &Path, disk: &str) -> Result<Vec<Signature>, ProbeError> {
    if !valid_disk_name(disk) {
        return Err(ProbeError::BadName {
            disk: disk.to_owned(),
        });
    }
    let path = dev_dir.join(disk);
    let file = File::open(&path).map_err(|source| ProbeError::Open {
        path: path.clone(),
        source,
    })?;
    let read = |source| ProbeError::Read {
        path: path.clone(),
        source,
    };
    let size = device_size(&file).map_err(read)?;
    scan(size, &mut |off, len| read_at(&file, off, len)).map_err(read)
}

// ---------------------------------------------------------------------------------------------
// prepare

/// Prepares drive `disk` (a whole disk, `sdb`): one GPT partition named [`PARTITION_NAME`] from
/// 1 MiB to the end, `filesystem` on it with a new random UUID and a label from `serial`
/// ([`fs_label`]), mounted at `<mount_root>/<UUID>`.
///
/// A drive that is not blank (see [`probe`]) is refused with [`PrepareError::HasData`], unless
/// `force_serial` equals `serial`; then the places signatures live are zeroed first. A drive
/// without a serial number can never be forced. `observer` is called before each [`Step`].
///
/// Blocking: mkfs can take minutes. On an error after the mount point was made, it is removed.
pub fn prepare(
    cfg: &PrepareConfig,
    disk: &str,
    serial: Option<&str>,
    filesystem: Filesystem,
    force_serial: Option<&str>,
    observer: &mut dyn FnMut(Step),
) -> Result<PreparedDrive, PrepareError> {
    let span = tracing::info_span!("prepare", disk, %filesystem, forced = force_serial.is_some());
    let _entered = span.enter();
    let mut job = Job {
        cfg,
        disk,
        diskseq: None,
        observer,
        mount_point: None,
    };
    let result = job.run(serial, filesystem, force_serial);
    match &result {
        Ok(p) => {
            info!(partition = %p.partition, uuid = %p.fs_uuid, label = %p.label, mount = %p.mount_point, "drive prepared")
        }
        Err(e) => {
            warn!(cause = %e, "drive not prepared");
            if let Some(mp) = job.mount_point.take() {
                if let Err(e) = remove_empty_dir(&mp) {
                    warn!(path = %mp.display(), cause = %e, "could not remove the mount point");
                }
            }
        }
    }
    result
}

struct Job<'a> {
    cfg: &'a PrepareConfig,
    disk: &'a str,
    /// The disk's `diskseq` when preflight began (`None` on kernels without it).
    diskseq: Option<u64>,
    observer: &'a mut dyn FnMut(Step),
    /// The mount point this job made, to remove on failure.
    mount_point: Option<PathBuf>,
}

impl Job<'_> {
    /// Tells the observer, then checks the disk is still there and still the same disk.
    fn step(&mut self, step: Step) -> Result<(), PrepareError> {
        (self.observer)(step);
        debug!(%step, "step");
        self.still_there(step)
    }

    fn still_there(&self, step: Step) -> Result<(), PrepareError> {
        match presence(&self.cfg.sys_block, self.disk) {
            Some(seq) if seq == self.diskseq => Ok(()),
            _ => Err(PrepareError::Vanished { step }),
        }
    }

    fn run(
        &mut self,
        serial: Option<&str>,
        filesystem: Filesystem,
        force_serial: Option<&str>,
    ) -> Result<PreparedDrive, PrepareError> {
        let disk = self.disk.to_owned();
        let cfg = self.cfg;
        if !valid_disk_name(&disk) {
            return Err(PrepareError::BadName { disk });
        }

        // Preflight: nothing here touches the drive.
        (self.observer)(Step::Preflight);
        self.diskseq = presence(&cfg.sys_block, &disk)
            .ok_or_else(|| PrepareError::NoSuchDisk { disk: disk.clone() })?;
        let tool_name = format!("mkfs.{}", filesystem.as_str());
        let tool = find_tool(&tool_name).ok_or_else(|| PrepareError::MkfsMissing {
            tool: tool_name.clone(),
        })?;
        let sector = logical_block_size(&cfg.sys_block, &disk).map_err(|reason| {
            PrepareError::SectorSize {
                disk: disk.clone(),
                reason,
            }
        })?;
        let fs_uuid = new_uuid();
        let label = fs_label(serial, &fs_uuid);
        let mount_point = self.make_mount_point(&fs_uuid)?;

        // Open exclusively: the kernel refuses a mounted or held drive.
        self.step(Step::Open)?;
        let dev_path = cfg.dev_dir.join(&disk);
        disk_node(&cfg.sys_block, &cfg.dev_dir, &disk).map_err(|reason| {
            PrepareError::DeviceNode {
                path: dev_path.clone(),
                reason,
            }
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_EXCL)
            .open(&dev_path)
            .map_err(|source| match source.raw_os_error() {
                Some(code) if code == Errno::EBUSY as i32 => {
                    PrepareError::Busy { disk: disk.clone() }
                }
                _ => PrepareError::Open {
                    path: dev_path.clone(),
                    source,
                },
            })?;
        let mut file = self.lock(file)?;
        // The node checked before the open could have been swapped since; check what was opened.
        let devnum = DevNumber::read(&cfg.sys_block.join(&disk)).map(|d| (d.major, d.minor));
        let opened = file
            .metadata()
            .map(|m| (stat::major(m.rdev()), stat::minor(m.rdev())));
        match (devnum, opened) {
            (Some((major, minor)), Ok(found)) if found == (u64::from(major), u64::from(minor)) => {}
            (devnum, opened) => {
                let reason = format!("opened {opened:?}, sysfs says {devnum:?}");
                return Err(PrepareError::DeviceNode {
                    path: dev_path,
                    reason,
                });
            }
        }

        // Probe through the same descriptor.
        self.step(Step::Probe)?;
        let read_err = |source| PrepareError::Read {
            disk: disk.clone(),
            source,
        };
        let size = device_size(&file).map_err(read_err)?;
        let span = partition_span(size, sector).ok_or_else(|| PrepareError::TooSmall {
            disk: disk.clone(),
            size,
        })?;
        let found = scan(size, &mut |off, len| read_at(&file, off, len)).map_err(read_err)?;
        if let Some(given) = force_serial {
            let Some(serial) = serial.map(str::trim).filter(|s| !s.is_empty()) else {
                return Err(PrepareError::NoSerial { disk: disk.clone() });
            };
            if given.trim() != serial {
                return Err(PrepareError::WrongSerial {
                    disk: disk.clone(),
                    serial: serial.to_owned(),
                    given: given.to_owned(),
                });
            }
        }
        if !found.is_empty() {
            if force_serial.is_none() {
                return Err(PrepareError::HasData { signatures: found });
            }
            warn!(signatures = %list(&found), "forced with the drive's serial number: zeroing its signatures");
            self.step(Step::Wipe)?;
            let write_err = |source| PrepareError::Write {
                disk: disk.clone(),
                step: Step::Wipe,
                source,
            };
            for (offset, len) in wipe_ranges(size) {
                file.write_all_at(&vec![0; to_usize(len)], offset)
                    .map_err(write_err)?;
            }
            file.sync_all().map_err(write_err)?;
            let left = scan(size, &mut |off, len| read_at(&file, off, len)).map_err(read_err)?;
            if !left.is_empty() {
                return Err(PrepareError::WipeIncomplete {
                    disk: disk.clone(),
                    signatures: left,
                });
            }
        }

        // Partition: GPT through the exclusive descriptor, then the kernel re-reads it.
        self.step(Step::Partition)?;
        let disk_guid =
            write_gpt(&mut file, size, sector, span).map_err(|reason| PrepareError::Gpt {
                disk: disk.clone(),
                reason,
            })?;
        let part = partition_name(&disk, 1);
        self.reread(&file, &part, span)?;
        drop(file); // unlocks; and mkfs must be able to open the partition exclusively

        self.step(Step::Settle)?;
        let part_path = self.settle(&part, span)?;

        self.step(Step::Mkfs)?;
        self.verify_partition(&part, &part_path, span, sector, &disk_guid)?;
        run_mkfs(
            &tool,
            filesystem,
            &label,
            &fs_uuid,
            &part_path,
            cfg.mkfs_timeout,
        )?;

        // Mount by UUID: the partition's superblock must carry the UUID just made.
        self.step(Step::Mount)?;
        let changed = |reason: String| PrepareError::Changed {
            disk: disk.clone(),
            reason,
        };
        let identity = read_identity(&part_path)
            .map_err(|e| changed(format!("cannot read the new filesystem: {e}")))?
            .filter(|id| id.filesystem == filesystem && id.uuid == fs_uuid)
            .ok_or_else(|| {
                changed(format!(
                    "no {filesystem} filesystem with UUID {fs_uuid} on {part}"
                ))
            })?;
        nix::mount::mount(
            Some(&part_path),
            &mount_point,
            Some(filesystem.as_str()),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(|source| PrepareError::Mount {
            partition: part.clone(),
            mount_point: mount_point.clone(),
            source,
        })?;
        self.mount_point = None; // mounted: no longer ours to clean up
        Ok(PreparedDrive {
            partition: part,
            filesystem,
            fs_uuid,
            label: identity.label,
            mount_point: mount_point.to_string_lossy().into_owned(),
        })
    }

    /// Makes `<mount_root>/<uuid>`, refusing a full or read-only mount root.
    fn make_mount_point(&mut self, fs_uuid: &str) -> Result<PathBuf, PrepareError> {
        let root = &self.cfg.mount_root;
        let classify =
            |path: &Path, source: io::Error| match source.raw_os_error().map(Errno::from_raw) {
                Some(Errno::ENOSPC | Errno::EDQUOT) => PrepareError::MountRootFull {
                    path: path.to_owned(),
                },
                Some(Errno::EROFS) => PrepareError::MountRootReadOnly {
                    path: path.to_owned(),
                },
                _ => PrepareError::MountRoot {
                    path: path.to_owned(),
                    source,
                },
            };
        // The filesystem the mount root is (or will be) on, checked before anything is made on it.
        // A directory takes no blocks on some filesystems (tmpfs), so mkdir alone misses a full
        // one.
        let existing = root
            .ancestors()
            .find(|p| !p.as_os_str().is_empty() && p.exists())
            .unwrap_or(Path::new("."));
        let vfs = statvfs(existing).map_err(|e| classify(existing, e.into()))?;
        if vfs.flags().contains(FsFlags::ST_RDONLY) {
            return Err(PrepareError::MountRootReadOnly { path: root.clone() });
        }
        if vfs.blocks_free() == 0 {
            return Err(PrepareError::MountRootFull { path: root.clone() });
        }
        fs::create_dir_all(root).map_err(|e| classify(root, e))?;
        let root = fs::canonicalize(root).map_err(|e| classify(root, e))?;
        let mount_point = root.join(fs_uuid);
        if mount_point.to_str().is_none() {
            let source = io::Error::new(io::ErrorKind::InvalidInput, "the path is not UTF-8");
            return Err(PrepareError::MountRoot { path: root, source });
        }
        fs::create_dir(&mount_point).map_err(|e| classify(&mount_point, e))?;
        self.mount_point = Some(mount_point.clone());
        Ok(mount_point)
    }

    /// Has the kernel re-read the partition table (retrying while it is busy); a kernel that parses
    /// no GPT (built without `CONFIG_EFI_PARTITION`) is told about the partition with `BLKPG`.
    fn reread(&self, file: &File, part: &str, span: Span) -> Result<(), PrepareError> {
        use std::os::fd::AsFd;
        let disk = self.disk;
        let deadline = Instant::now() + self.cfg.settle_timeout;
        loop {
            match ioctl::reread_partitions(file.as_fd()) {
                Ok(()) => break,
                Err(Errno::EBUSY) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(source) => {
                    return Err(PrepareError::Reread {
                        disk: disk.to_owned(),
                        source,
                    })
                }
            }
        }
        if !self.cfg.sys_block.join(disk).join(part).exists() {
            let (start, len) = (i64::try_from(span.start), i64::try_from(span.len()));
            let (Ok(start), Ok(len)) = (start, len) else {
                return Err(PrepareError::Reread {
                    disk: disk.to_owned(),
                    source: Errno::EOVERFLOW,
                });
            };
            ioctl::add_partition(file.as_fd(), 1, start, len).map_err(|source| {
                PrepareError::Reread {
                    disk: disk.to_owned(),
                    source,
                }
            })?;
            info!(
                partition = part,
                "the kernel did not read the GPT (no GPT support built in?); added the partition with BLKPG"
            );
        }
        Ok(())
    }

    /// Takes the BSD lock on the whole disk that udev honours (systemd's "block device locking"):
    /// while it is held, udev neither probes the disk nor re-reads its partition table. Waits up to
    /// `settle_timeout` for udev to let go of a drive it is still probing.
    fn lock(&self, file: File) -> Result<Flock<File>, PrepareError> {
        let deadline = Instant::now() + self.cfg.settle_timeout;
        let mut file = file;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => return Ok(locked),
                Err((f, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    file = f;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err((_, Errno::EWOULDBLOCK)) => {
                    return Err(PrepareError::Busy {
                        disk: self.disk.to_owned(),
                    })
                }
                Err((_, e)) => {
                    let source = io::Error::from(e);
                    return Err(PrepareError::Open {
                        path: self.cfg.dev_dir.join(self.disk),
                        source,
                    });
                }
            }
        }
    }

    /// Waits for the partition in sysfs and its node in `/dev` (making the node if devtmpfs does
    /// not).
    ///
    /// Closing the descriptor we wrote through makes udevd (where it runs) re-read the partition
    /// table itself, removing and adding the partition again; `udevadm settle` waits for that to be
    /// over before mkfs. A kernel that does not parse GPTs drops the partition in that re-read, so
    /// it is added again with `BLKPG`.
    fn settle(&self, part: &str, span: Span) -> Result<PathBuf, PrepareError> {
        use std::os::fd::AsFd;
        let sys_dir = self.cfg.sys_block.join(self.disk).join(part);
        let node = self.cfg.dev_dir.join(part);
        let deadline = Instant::now() + self.cfg.settle_timeout;
        udev_settle(self.cfg.settle_timeout);
        if !sys_dir.exists() {
            self.still_there(Step::Settle)?;
            let disk_node = self.cfg.dev_dir.join(self.disk);
            let file = File::open(&disk_node).map_err(|source| PrepareError::Open {
                path: disk_node,
                source,
            })?;
            let (Ok(start), Ok(len)) = (i64::try_from(span.start), i64::try_from(span.len()))
            else {
                return Err(PrepareError::Reread {
                    disk: self.disk.to_owned(),
                    source: Errno::EOVERFLOW,
                });
            };
            match ioctl::add_partition(file.as_fd(), 1, start, len) {
                Ok(()) => {
                    info!(
                        partition = part,
                        "the partition was gone after udev re-read the table; added it with BLKPG"
                    )
                }
                Err(e) => debug!(partition = part, cause = %e, "BLKPG add after udev settle"),
            }
        }
        let mut seen: Option<Instant> = None;
        loop {
            self.still_there(Step::Settle)?;
            if let Some(devnum) = DevNumber::read(&sys_dir) {
                let since = *seen.get_or_insert_with(Instant::now);
                match wait_node(&node, devnum, since, deadline) {
                    Ok(true) => return Ok(node),
                    Ok(false) => {}
                    Err(reason) => return Err(PrepareError::DeviceNode { path: node, reason }),
                }
            }
            if Instant::now() >= deadline {
                return Err(PrepareError::Settle {
                    partition: part.to_owned(),
                    timeout: self.cfg.settle_timeout,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Before mkfs: the partition is the one just written, on the disk just written, and blank.
    fn verify_partition(
        &self,
        part: &str,
        node: &Path,
        span: Span,
        sector: u64,
        disk_guid: &str,
    ) -> Result<(), PrepareError> {
        let changed = |reason: String| PrepareError::Changed {
            disk: self.disk.to_owned(),
            reason,
        };
        let sys_dir = self.cfg.sys_block.join(self.disk).join(part);
        let start = sysfs::read_u64(&sys_dir.join("start")).map(|s| s * 512);
        let size = sysfs::read_u64(&sys_dir.join("size")).map(|s| s * 512);
        if start != Some(span.start) || size != Some(span.len()) {
            return Err(changed(format!(
                "{part} spans {start:?}+{size:?} bytes, not the {}+{} just written",
                span.start,
                span.len()
            )));
        }
        let devnum = DevNumber::read(&sys_dir);
        let node_ok = match devnum {
            Some(devnum) => node_matches(node, devnum)
                .map_err(|e| e.to_string())
                .and_then(|r| r),
            None => Err("sysfs has no device number for it".to_owned()),
        };
        node_ok.map_err(|reason| PrepareError::DeviceNode {
            path: node.to_owned(),
            reason,
        })?;
        let guid = read_gpt_guid(&self.cfg.dev_dir.join(self.disk), sector)
            .map_err(|e| changed(format!("cannot read back the partition table: {e}")))?;
        if guid != disk_guid {
            return Err(changed(format!(
                "its GPT disk GUID is {guid}, not the {disk_guid} just written"
            )));
        }
        let file = File::open(node)
            .map_err(|e| changed(format!("cannot open {}: {e}", node.display())))?;
        let found = device_size(&file)
            .and_then(|size| {
                let head = read_at(&file, 0, to_usize(size.min(MIB)))?;
                let tail = read_at(&file, size - size.min(MIB), to_usize(size.min(MIB)))?;
                Ok(blank::signatures(&head, &tail, size))
            })
            .map_err(|e| changed(format!("cannot read {}: {e}", node.display())))?;
        if !found.is_empty() {
            return Err(changed(format!(
                "the new partition is not blank: {}",
                list(&found)
            )));
        }
        Ok(())
    }
}

/// Where udevd runs, waits (up to `timeout`) until it has handled the events queued so far.
fn udev_settle(timeout: Duration) {
    if !Path::new("/run/udev/control").exists() {
        return;
    }
    let Some(udevadm) = find_tool("udevadm") else {
        return;
    };
    let status = Command::new(udevadm)
        .arg("settle")
        .arg(format!("--timeout={}", timeout.as_secs().max(1)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => debug!("udev settled"),
        other => debug!(result = ?other, "udevadm settle did not succeed; going on"),
    }
}

/// Writes a protective MBR and a GPT with shoal's one partition at `span`, flushes, and reads it
/// back. Returns the GPT's (random) disk GUID.
fn write_gpt(file: &mut File, size: u64, sector: u64, span: Span) -> Result<String, String> {
    let lb = LogicalBlockSize::try_from(sector).map_err(|e| e.to_string())?;
    let gpt_err = |e: GptError| e.to_string();
    let mut gpt = GptConfig::new()
        .writable(true)
        .logical_block_size(lb)
        .create_from_device(&mut *file, None)
        .map_err(gpt_err)?;
    let last_usable = gpt.primary_header().map_err(|e| e.to_string())?.last_usable;
    let end = (last_usable + 1) * sector / MIB * MIB;
    if end != span.end {
        return Err(format!(
            "the GPT's last usable LBA {last_usable} gives an end at {end}, expected {}",
            span.end
        ));
    }
    let (first, len) = (span.start / sector, span.len() / sector);
    gpt.add_partition_at(PARTITION_NAME, 1, first, len, partition_types::LINUX_FS, 0)
        .map_err(gpt_err)?;
    let guid = gpt.guid().to_string();
    gpt.write_inplace().map_err(gpt_err)?;
    drop(gpt);
    let lbas = u32::try_from(size / sector - 1).unwrap_or(u32::MAX);
    ProtectiveMBR::with_lb_size(lbas)
        .overwrite_lba0(&mut *file)
        .map_err(|e| e.to_string())?;
    file.sync_all().map_err(|e| format!("flush: {e}"))?;

    // Read it back through the same descriptor: both headers valid, our partition in slot 1.
    let back = GptConfig::new()
        .logical_block_size(lb)
        .only_valid_headers(true)
        .open_from_device(&mut *file)
        .map_err(|e| format!("reading it back: {e}"))?;
    let ok = back.guid().to_string() == guid
        && back.partitions().len() == 1
        && back.partitions().get(&1).is_some_and(|p| {
            p.name == PARTITION_NAME
                && p.first_lba == first
                && p.last_lba == first + len - 1
                && p.part_type_guid == partition_types::LINUX_FS
        });
    if !ok {
        return Err("the table read back is not the one written".to_owned());
    }
    debug!(disk_guid = %guid, first_lba = first, last_lba = first + len - 1, sector, "GPT written");
    Ok(guid)
}

/// Whether both GPT headers of a disk are safe to give the `gpt` crate ([`gpt_header_shape_ok`]).
fn gpt_shape_ok(file: &File, sector: u64) -> io::Result<bool> {
    let lbas = device_size(file)? / sector;
    if lbas < 3 {
        return Ok(true); // the crate refuses a disk this small by itself
    }
    for lba in [1, lbas - 1] {
        if !gpt_header_shape_ok(&read_at(file, lba * sector, 92)?) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The disk GUID of the GPT on `path`.
fn read_gpt_guid(path: &Path, sector: u64) -> Result<String, String> {
    let lb = LogicalBlockSize::try_from(sector).map_err(|e| e.to_string())?;
    let file = File::open(path).map_err(|e| e.to_string())?;
    if !gpt_shape_ok(&file, sector).map_err(|e| e.to_string())? {
        return Err("its GPT is not shaped like the one written".to_owned());
    }
    let gpt = GptConfig::new()
        .logical_block_size(lb)
        .open_from_device(&file)
        .map_err(|e| e.to_string())?;
    Ok(gpt.guid().to_string())
}

/// Runs mkfs with our UUID and label, killing it at `timeout`.
fn run_mkfs(
    tool: &Path,
    filesystem: Filesystem,
    label: &str,
    fs_uuid: &str,
    dev: &Path,
    timeout: Duration,
) -> Result<(), PrepareError> {
    let name = tool
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut cmd = Command::new(tool);
    match filesystem {
        Filesystem::Ext4 => cmd.args(["-F", "-q", "-L", label, "-U", fs_uuid]),
        Filesystem::Xfs => cmd
            .args(["-f", "-q", "-L", label, "-m"])
            .arg(format!("uuid={fs_uuid}")),
    };
    cmd.arg(dev)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    debug!(command = ?cmd, "running mkfs");
    let mut child = cmd.spawn().map_err(|source| PrepareError::MkfsSpawn {
        tool: name.clone(),
        source,
    })?;
    let stderr = child.stderr.take();
    // Drained on a thread so a chatty mkfs cannot fill the pipe and stall.
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut s) = stderr {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                warn!(tool = %name, ?timeout, "mkfs timed out; killed");
                return Err(PrepareError::MkfsTimeout {
                    tool: name,
                    timeout,
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(source) => {
                let _ = child.kill();
                return Err(PrepareError::MkfsSpawn { tool: name, source });
            }
        }
    };
    let stderr = reader.join().unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&stderr);
    let text = text.trim();
    let tail: String = text
        .chars()
        .rev()
        .take(2000)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(PrepareError::Mkfs {
        tool: name,
        status: status.to_string(),
        stderr: tail,
    })
}

// ---------------------------------------------------------------------------------------------
// restore, detach

/// Mounts the shoal drives among `disks` (whole-disk names) again: every GPT partition named
/// [`PARTITION_NAME`] of type "Linux filesystem" holding ext4 or XFS is mounted at
/// `<mount_root>/<filesystem UUID>`, unless it is mounted there already (which is success too).
/// A disk without a GPT, or without shoal partitions, gives nothing. Idempotent.
pub fn restore(cfg: &PrepareConfig, disks: &[String]) -> Vec<Result<PreparedDrive, RestoreError>> {
    let mounts = match read_mountinfo() {
        Ok(m) => m,
        Err(source) => return vec![Err(RestoreError::MountTable { source })],
    };
    let mut out = Vec::new();
    for disk in disks {
        restore_disk(cfg, disk, &mounts, &mut out);
    }
    out
}

fn restore_disk(
    cfg: &PrepareConfig,
    disk: &str,
    mounts: &[MountEntry],
    out: &mut Vec<Result<PreparedDrive, RestoreError>>,
) {
    if !valid_disk_name(disk) {
        return out.push(Err(RestoreError::BadName {
            disk: disk.to_owned(),
        }));
    }
    if !cfg.sys_block.join(disk).exists() {
        return out.push(Err(RestoreError::NoSuchDisk {
            disk: disk.to_owned(),
        }));
    }
    let read_err = |reason: String| RestoreError::Read {
        disk: disk.to_owned(),
        reason,
    };
    let sector = match logical_block_size(&cfg.sys_block, disk) {
        Ok(s) => s,
        Err(reason) => return out.push(Err(read_err(reason))),
    };
    let path = match disk_node(&cfg.sys_block, &cfg.dev_dir, disk) {
        Ok(path) => path,
        Err(reason) => {
            return out.push(Err(read_err(format!(
                "{}: {reason}",
                cfg.dev_dir.join(disk).display()
            ))))
        }
    };
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            return out.push(Err(read_err(format!(
                "cannot open {}: {e}",
                path.display()
            ))))
        }
    };
    let Ok(lb) = LogicalBlockSize::try_from(sector) else {
        return;
    };
    match gpt_shape_ok(&file, sector) {
        Ok(true) => {}
        Ok(false) => {
            debug!(disk, "a GPT unlike shoal's: not a shoal drive");
            return;
        }
        Err(e) => return out.push(Err(read_err(e.to_string()))),
    }
    let gpt = match GptConfig::new()
        .logical_block_size(lb)
        .open_from_device(&file)
    {
        Ok(gpt) => gpt,
        Err(GptError::Io(e)) | Err(GptError::Header(gpt::header::HeaderError::Io(e))) => {
            return out.push(Err(read_err(e.to_string())));
        }
        Err(e) => {
            debug!(disk, cause = %e, "no GPT: not a shoal drive");
            return;
        }
    };
    for (&id, p) in gpt.partitions() {
        if p.name != PARTITION_NAME || p.part_type_guid != partition_types::LINUX_FS {
            continue;
        }
        let start = p.first_lba.checked_mul(sector);
        let end = p
            .last_lba
            .checked_add(1)
            .and_then(|l| l.checked_mul(sector));
        match start.zip(end).filter(|(start, end)| start < end) {
            Some((start, end)) => out.push(restore_partition(
                cfg,
                disk,
                &file,
                id,
                Span { start, end },
                mounts,
            )),
            None => out.push(Err(RestoreError::Partition {
                partition: partition_name(disk, id),
                reason: format!(
                    "its GPT entry is out of range (LBAs {}..={})",
                    p.first_lba, p.last_lba
                ),
            })),
        }
    }
}

fn restore_partition(
    cfg: &PrepareConfig,
    disk: &str,
    file: &File,
    id: u32,
    span: Span,
    mounts: &[MountEntry],
) -> Result<PreparedDrive, RestoreError> {
    use std::os::fd::AsFd;
    let part = partition_name(disk, id);
    let fail = |reason: String| RestoreError::Partition {
        partition: part.clone(),
        reason,
    };
    let sys_dir = cfg.sys_block.join(disk).join(&part);
    if sys_dir.exists() {
        let start = sysfs::read_u64(&sys_dir.join("start")).map(|s| s * 512);
        let size = sysfs::read_u64(&sys_dir.join("size")).map(|s| s * 512);
        if start != Some(span.start) || size != Some(span.len()) {
            return Err(fail(format!(
                "the kernel has it at {start:?}+{size:?} bytes, the GPT at {}+{}",
                span.start,
                span.len()
            )));
        }
    } else {
        let (Ok(pno), Ok(start), Ok(len)) = (
            i32::try_from(id),
            i64::try_from(span.start),
            i64::try_from(span.len()),
        ) else {
            return Err(fail("out of range".to_owned()));
        };
        ioctl::add_partition(file.as_fd(), pno, start, len)
            .map_err(|e| fail(format!("BLKPG add: {e}")))?;
        info!(partition = %part, "the kernel had not read the GPT; added the shoal partition with BLKPG");
    }
    // Its node: wait for devtmpfs, or make it.
    let node = cfg.dev_dir.join(&part);
    let deadline = Instant::now() + cfg.settle_timeout;
    let since = Instant::now();
    let devnum = loop {
        match DevNumber::read(&sys_dir) {
            Some(devnum) => match wait_node(&node, devnum, since, deadline) {
                Ok(true) => break devnum,
                Ok(false) => {}
                Err(reason) => return Err(fail(format!("{}: {reason}", node.display()))),
            },
            None if Instant::now() >= deadline => return Err(fail("not in sysfs".to_owned())),
            None => {}
        }
        std::thread::sleep(POLL);
    };
    let identity = read_identity(&node)
        .map_err(|e| fail(format!("cannot read {}: {e}", node.display())))?
        .ok_or_else(|| RestoreError::NoFilesystem {
            partition: part.clone(),
        })?;
    let mount_point = fs::create_dir_all(&cfg.mount_root)
        .and_then(|()| fs::canonicalize(&cfg.mount_root))
        .map(|root| root.join(&identity.uuid))
        .map_err(|source| RestoreError::MountPoint {
            mount_point: cfg.mount_root.clone(),
            source,
        })?;
    let prepared = PreparedDrive {
        partition: part.clone(),
        filesystem: identity.filesystem,
        fs_uuid: identity.uuid.clone(),
        label: identity.label.clone(),
        mount_point: mount_point.to_string_lossy().into_owned(),
    };
    if let Some(m) = mounts.iter().find(|m| m.mount_point == mount_point) {
        if (m.major, m.minor) == (devnum.major, devnum.minor) {
            debug!(partition = %part, mount = %mount_point.display(), "already mounted");
            return Ok(prepared);
        }
        return Err(RestoreError::MountPointTaken {
            partition: part,
            mount_point,
            by: m.source.clone(),
        });
    }
    fs::create_dir_all(&mount_point).map_err(|source| RestoreError::MountPoint {
        mount_point: mount_point.clone(),
        source,
    })?;
    nix::mount::mount(
        Some(&node),
        &mount_point,
        Some(identity.filesystem.as_str()),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|source| RestoreError::Mount {
        partition: part.clone(),
        mount_point: mount_point.clone(),
        source,
    })?;
    info!(partition = %part, uuid = %identity.uuid, mount = %mount_point.display(), "prepared drive mounted");
    Ok(prepared)
}

/// Lazily unmounts (`MNT_DETACH`) a prepared drive that vanished, then removes its mount point if
/// it is empty. Not mounted is fine.
pub fn detach(prepared: &PreparedDrive) -> Result<(), DetachError> {
    let mount_point = PathBuf::from(&prepared.mount_point);
    // More than one mount may be stacked there; each detach removes the top one.
    for _ in 0..16 {
        match nix::mount::umount2(&mount_point, MntFlags::MNT_DETACH) {
            Ok(()) => info!(mount = %mount_point.display(), uuid = %prepared.fs_uuid, "detached"),
            Err(Errno::EINVAL | Errno::ENOENT) => break,
            Err(source) => {
                return Err(DetachError::Unmount {
                    mount_point,
                    source,
                })
            }
        }
    }
    remove_empty_dir(&mount_point).map_err(|source| DetachError::RemoveDir {
        mount_point,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mountinfo::mounted;

    // -----------------------------------------------------------------------------------------
    // Sans-IO

    #[test]
    fn disk_names_and_partition_names() {
        for ok in ["sda", "nvme0n1", "loop3", "mmcblk0", "vd-a_b.c"] {
            assert!(valid_disk_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../sda",
            "sda/..",
            "cciss!c0d0",
            "a b",
            ".hidden",
            &"x".repeat(65),
        ] {
            assert!(!valid_disk_name(bad), "{bad:?}");
        }
        assert_eq!(partition_name("sdb", 1), "sdb1");
        assert_eq!(partition_name("vdaa", 2), "vdaa2");
        assert_eq!(partition_name("nvme0n1", 1), "nvme0n1p1");
        assert_eq!(partition_name("loop3", 1), "loop3p1");
        assert_eq!(partition_name("mmcblk0", 1), "mmcblk0p1");
    }

    #[test]
    fn label_is_the_serial_tail_or_the_uuid_tail_and_fits_xfs() {
        let uuid = "0b5e0c2a-1f3d-4c7e-9a2b-3c4d5e6f7a8b";
        assert_eq!(fs_label(Some("WD-WCC4N7XYZ123"), uuid), "shoal-XYZ123");
        assert_eq!(fs_label(Some("/tmp/.tmpAb/disk.img"), uuid), "shoal-iskimg");
        assert_eq!(fs_label(Some("  A1 "), uuid), "shoal-A1");
        assert_eq!(fs_label(None, uuid), "shoal-6f7a8b");
        assert_eq!(
            fs_label(Some("--"), uuid),
            "shoal-6f7a8b",
            "a serial without letters or digits"
        );
        for serial in [Some("S3Z9NB0K123456789"), None] {
            assert!(fs_label(serial, uuid).len() <= 12);
        }
    }

    #[test]
    fn uuids_are_random_version_4() {
        let a = new_uuid();
        let b = new_uuid();
        assert_ne!(a, b);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(a
            .chars()
            .all(|c| c == '-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert!(parts[2].starts_with('4'));
        assert!(matches!(
            parts[3].chars().next(),
            Some('8' | '9' | 'a' | 'b')
        ));
    }

    #[test]
    fn partition_goes_from_1_mib_to_the_last_usable_mib() {
        // 64 MiB of 512-byte sectors: last usable LBA 131038, so the partition ends at 63 MiB.
        assert_eq!(
            partition_span(64 * MIB, 512),
            Some(Span {
                start: MIB,
                end: 63 * MIB
            })
        );
        assert_eq!(
            partition_span(64 * MIB, 4096),
            Some(Span {
                start: MIB,
                end: 63 * MIB
            })
        );
        // Half a MiB beyond a MiB boundary is room for the backup GPT: the partition ends at the
        // boundary.
        assert_eq!(
            partition_span(64 * MIB + 512 * 1024, 512),
            Some(Span {
                start: MIB,
                end: 64 * MIB
            })
        );
        assert_eq!(
            partition_span(64 * MIB + 16 * 1024, 512),
            Some(Span {
                start: MIB,
                end: 63 * MIB
            })
        );
        assert_eq!(
            partition_span(64 * MIB + 17408, 512),
            Some(Span {
                start: MIB,
                end: 64 * MIB
            })
        );
        assert_eq!(
            partition_span(64 * MIB + 17408, 4096),
            Some(Span {
                start: MIB,
                end: 63 * MIB
            })
        );
        assert_eq!(
            partition_span(3 * MIB, 512),
            Some(Span {
                start: MIB,
                end: 2 * MIB
            })
        );
        assert_eq!(partition_span(2 * MIB, 512), None);
        assert_eq!(partition_span(0, 512), None);
        assert_eq!(partition_span(64 * MIB, 1024), None);
    }

    fn image(size: u64) -> Vec<u8> {
        vec![0; to_usize(size)]
    }

    fn scan_image(img: &[u8]) -> Vec<Signature> {
        scan(img.len() as u64, &mut |off, len| {
            Ok(img[to_usize(off)..to_usize(off) + len].to_vec())
        })
        .expect("scan")
    }

    fn put(img: &mut [u8], at: u64, bytes: &[u8]) {
        img[to_usize(at)..to_usize(at) + bytes.len()].copy_from_slice(bytes);
    }

    #[test]
    fn a_zeroed_device_is_blank() {
        for size in [0, 4096, 3 * MIB, 16 * MIB, 16 * MIB + 12345] {
            assert_eq!(scan_image(&image(size)), vec![], "{size}");
        }
    }

    #[test]
    fn filesystems_of_wiped_partition_tables_are_found() {
        const SIZE: u64 = 16 * MIB;
        // `wipefs /dev/sdX` removes the GPT; the first partition's ext4 at 1 MiB remains.
        let mut img = image(SIZE);
        put(&mut img, MIB + 1080, &[0x53, 0xef]);
        assert!(blank::signatures(
            &img[..blank::HEAD_LEN],
            &img[to_usize(SIZE) - blank::TAIL_LEN..],
            SIZE
        )
        .is_empty());
        assert_eq!(scan_image(&img), vec![Signature::Ext]);
        // A DOS partition at sector 63 holding XFS.
        let mut img = image(SIZE);
        put(&mut img, 63 * 512, b"XFSB");
        assert_eq!(scan_image(&img), vec![Signature::Xfs]);
        // An md 1.0 superblock at the end of a partition where ours would end.
        let mut img = image(SIZE);
        let span = partition_span(SIZE, 512).expect("span");
        put(&mut img, span.end - 8192, &0xa92b_4efc_u32.to_le_bytes());
        assert_eq!(scan_image(&img), vec![Signature::MdRaid]);
        // And what the ends show is still found.
        let mut img = image(SIZE);
        put(&mut img, SIZE - 512, b"EFI PART");
        assert_eq!(scan_image(&img), vec![Signature::Gpt]);
    }

    #[test]
    fn zeroing_the_wipe_ranges_leaves_nothing_the_scan_finds() {
        for size in [16 * MIB, 16 * MIB + 17408, 5 * MIB] {
            let mut img = image(size);
            let span = partition_span(size, 512).expect("span");
            put(&mut img, 510, &[0x55, 0xaa]);
            put(&mut img, 512, b"EFI PART");
            put(&mut img, size - 512, b"EFI PART");
            put(&mut img, 63 * 512, b"XFSB");
            put(&mut img, MIB + 1080, &[0x53, 0xef]);
            put(&mut img, span.end - 8192, &0xa92b_4efc_u32.to_le_bytes());
            assert!(!scan_image(&img).is_empty());
            for (off, len) in wipe_ranges(size) {
                img[to_usize(off)..to_usize(off + len)].fill(0);
            }
            assert_eq!(scan_image(&img), vec![], "{size}");
        }
    }

    #[test]
    fn superblocks_give_type_uuid_and_label() {
        let uuid = [
            0x0b, 0x5e, 0x0c, 0x2a, 0x1f, 0x3d, 0x4c, 0x7e, 0x9a, 0x2b, 0x3c, 0x4d, 0x5e, 0x6f,
            0x7a, 0x8b,
        ];
        let text = "0b5e0c2a-1f3d-4c7e-9a2b-3c4d5e6f7a8b";
        let mut ext = vec![0u8; 4096];
        ext[1024 + 0x38..1024 + 0x3a].copy_from_slice(&[0x53, 0xef]);
        ext[1024 + 0x68..1024 + 0x78].copy_from_slice(&uuid);
        ext[1024 + 0x78..1024 + 0x84].copy_from_slice(b"shoal-ABC123");
        assert_eq!(
            fs_identity(&ext),
            Some(FsIdentity {
                filesystem: Filesystem::Ext4,
                uuid: text.into(),
                label: "shoal-ABC123".into()
            })
        );
        let mut xfs = vec![0u8; 4096];
        xfs[..4].copy_from_slice(b"XFSB");
        xfs[32..48].copy_from_slice(&uuid);
        xfs[108..114].copy_from_slice(b"shoal-");
        assert_eq!(
            fs_identity(&xfs),
            Some(FsIdentity {
                filesystem: Filesystem::Xfs,
                uuid: text.into(),
                label: "shoal-".into()
            })
        );
        // No UUID, nothing recognisable, or too short: none.
        ext[1024 + 0x68..1024 + 0x78].fill(0);
        assert_eq!(fs_identity(&ext), None);
        assert_eq!(fs_identity(&[0u8; 4096]), None);
        assert_eq!(fs_identity(&xfs[..40]), None);
        assert_eq!(fs_identity(&[]), None);
    }

    #[test]
    fn only_gpt_headers_shaped_like_shoals_go_to_the_gpt_crate() {
        let header = |count: u32, size: u32| {
            let mut h = vec![0u8; 92];
            h[..8].copy_from_slice(b"EFI PART");
            h[80..84].copy_from_slice(&count.to_le_bytes());
            h[84..88].copy_from_slice(&size.to_le_bytes());
            h
        };
        assert!(gpt_header_shape_ok(&header(128, 128)));
        assert!(gpt_header_shape_ok(&header(4, 128)));
        assert!(
            !gpt_header_shape_ok(&header(128, 256)),
            "the crate asserts 128-byte entries"
        );
        assert!(!gpt_header_shape_ok(&header(u32::MAX, 128)));
        assert!(
            gpt_header_shape_ok(&[0u8; 92]),
            "no header at all is for the crate to reject"
        );
        assert!(!gpt_header_shape_ok(&header(128, 128)[..84]));
    }

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

    /// Whether host tests can run; prints why not, or fails when SHOAL_REQUIRE_HOST_TESTS=1.
    fn host(test: &str) -> bool {
        let why = if !nix::unistd::geteuid().is_root() {
            Some("not root")
        } else if !Path::new("/dev/loop-control").exists() {
            Some("no loop devices (/dev/loop-control)")
        } else if find_tool("losetup").is_none() || find_tool("mkfs.ext4").is_none() {
            Some("losetup or mkfs.ext4 missing (scripts/deps installs them)")
        } else {
            None
        };
        match why {
            None => true,
            Some(why) if std::env::var("SHOAL_REQUIRE_HOST_TESTS").is_ok_and(|v| v == "1") => {
                panic!("{test}: {why}, and SHOAL_REQUIRE_HOST_TESTS=1")
            }
            Some(why) => {
                println!("skipping {test}: {why}");
                false
            }
        }
    }

    fn sh(tool: &str, args: &[&str]) -> String {
        let out = Command::new(find_tool(tool).unwrap_or_else(|| PathBuf::from(tool)))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
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
            let mut last = String::new();
            for _ in 0..20 {
                let out = Command::new(find_tool("losetup").expect("losetup"))
                    .args([
                        "-P",
                        "-f",
                        "--show",
                        "--sector-size",
                        &sector.to_string(),
                        path,
                    ])
                    .output()
                    .expect("losetup");
                if out.status.success() {
                    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                    let name = dev.trim_start_matches("/dev/").to_owned();
                    return Loop {
                        name,
                        backing,
                        dir,
                        _tmp: tmp,
                    };
                }
                last = String::from_utf8_lossy(&out.stderr).into_owned();
                std::thread::sleep(Duration::from_millis(100));
            }
            panic!("losetup: {last}");
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
                let _ = Command::new(find_tool("losetup").expect("losetup"))
                    .args(["-d", &self.dev()])
                    .status();
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

    fn assert_layout_sectors(
        lo: &Loop,
        p: &PreparedDrive,
        fstype: &str,
        size_mib: u64,
        sector: u64,
    ) {
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
        if !host("a_blank_drive_is_prepared_with_ext4_and_mounted_by_uuid") {
            return;
        }
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
        if !host("a_blank_drive_is_prepared_with_xfs_without_devtmpfs") {
            return;
        }
        if find_tool("mkfs.xfs").is_none() {
            println!("skipping a_blank_drive_is_prepared_with_xfs_without_devtmpfs: mkfs.xfs missing (scripts/deps installs xfsprogs)");
            return;
        }
        // XFS wants 300 MB at least. An empty private /dev stands for a /dev without devtmpfs:
        // prepare must make the disk's and the partition's nodes itself.
        let lo = Loop::new(320);
        let dev_dir = lo.dir.join("dev");
        fs::create_dir(&dev_dir).expect("dev dir");
        let cfg = PrepareConfig {
            dev_dir: dev_dir.clone(),
            ..lo.cfg()
        };
        let p =
            prepare(&cfg, &lo.name, None, Filesystem::Xfs, None, &mut |_| {}).expect("prepared");
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
        if !host("a_4k_sector_drive_gets_its_gpt_in_4k_sectors") {
            return;
        }
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
        if !host("a_stale_device_node_is_refused") {
            return;
        }
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
        if !host("a_drive_with_data_is_refused_untouched_unless_forced_with_its_serial") {
            return;
        }
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
        if !host("a_mounted_drive_is_busy_and_untouched") {
            return;
        }
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
        if !host("a_full_or_read_only_mount_root_is_refused_before_the_drive_is_touched") {
            return;
        }
        let lo = Loop::new(64);
        let before = lo.sha256();
        let serial = lo.serial();
        let tmpfs = |dir: &Path, flags: MsFlags| {
            fs::create_dir(dir).expect("dir");
            nix::mount::mount(Some("tmpfs"), dir, Some("tmpfs"), flags, Some("size=1m"))
                .expect("tmpfs");
        };

        // Full: a 1 MiB tmpfs filled with a file.
        let full = lo.dir.join("full");
        tmpfs(&full, MsFlags::empty());
        let filler = vec![0xa5u8; 64 * 1024];
        let mut f = File::create(full.join("filler")).expect("filler");
        while std::io::Write::write_all(&mut f, &filler).is_ok() {}
        drop(f);
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
        assert_eq!(left, ["filler"], "no mount point left behind");

        // Read-only: a tmpfs mounted read-only, as the root and as the parent of a root to be made.
        let ro = lo.dir.join("ro");
        tmpfs(&ro, MsFlags::MS_RDONLY);
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
        if !host("a_drive_vanishing_before_mkfs_stops_the_prepare_and_cleans_up") {
            return;
        }
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
        if !host("restore_mounts_prepared_drives_again_and_twice_is_fine") {
            return;
        }
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
        let kept =
            fs::read(Path::new(&p.mount_point).join("kept")).expect("the file is there again");
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
        if !host("detach_lazily_unmounts_and_removes_the_mount_point") {
            return;
        }
        let lo = Loop::new(64);
        let cfg = lo.cfg();
        let p =
            prepare(&cfg, &lo.name, None, Filesystem::Ext4, None, &mut |_| {}).expect("prepared");
        // An open file on it does not stop a lazy unmount.
        let open = File::create(Path::new(&p.mount_point).join("busy")).expect("open file");
        detach(&p).expect("detach");
        assert!(!mounted(Path::new(&p.mount_point)));
        assert!(!Path::new(&p.mount_point).exists(), "mount point removed");
        drop(open);
        detach(&p).expect("detaching again is fine");
    }
}
