//! Mounting: the mount step of [`prepare`](super::prepare) (by the UUID just made), [`restore`]
//! (mount `shoal` partitions again when the agent starts or a drive appears), and [`detach`] (a
//! vanished drive's mount, lazily).

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    time::Instant,
};

use gpt::{disk::LogicalBlockSize, partition_types, GptConfig, GptError};
use nix::{
    errno::Errno,
    mount::{MntFlags, MsFlags},
};
use shoal_proto::{Filesystem, PreparedDrive};
use tracing::{debug, info, warn};

use super::{
    config::PrepareConfig,
    device::{disk_node, ioctl, logical_block_size, wait_node, POLL},
    error::{DetachError, PrepareError, RestoreError},
    job::Job,
    layout::{valid_disk_name, Span, PARTITION_NAME},
    mkfs::read_identity,
    partition::gpt_shape_ok,
};
use crate::{
    blockdev::partition_name,
    mountinfo::{read_mountinfo, MountEntry},
    sysfs::{self, DevNumber},
};

impl Job<'_> {
    /// Mounts the new partition at the mount point preflight made, once its superblock shows the
    /// filesystem just made.
    pub(super) fn mount(
        &mut self,
        part: String,
        part_path: &Path,
        filesystem: Filesystem,
        fs_uuid: String,
        mount_point: PathBuf,
    ) -> Result<PreparedDrive, PrepareError> {
        let disk = self.disk.to_owned();
        let changed = |reason: String| PrepareError::Changed {
            disk: disk.clone(),
            reason,
        };
        let identity = read_identity(part_path)
            .map_err(|e| changed(format!("cannot read the new filesystem: {e}")))?
            .filter(|id| id.filesystem == filesystem && id.uuid == fs_uuid)
            .ok_or_else(|| {
                changed(format!(
                    "no {filesystem} filesystem with UUID {fs_uuid} on {part}"
                ))
            })?;
        nix::mount::mount(
            Some(part_path),
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
}

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

/// Removes a mount point directory if it is empty; anything else stays.
pub(super) fn remove_empty_dir(path: &Path) -> io::Result<()> {
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
