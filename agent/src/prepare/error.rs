//! Why probing, preparing, restoring or detaching a drive did not happen, each error naming what
//! the operator needs to know.

use std::{io, path::PathBuf, time::Duration};

use nix::errno::Errno;

use super::job::Step;
use crate::blank::Signature;

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

pub(super) fn list(signatures: &[Signature]) -> String {
    signatures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
