//! The drive as the kernel shows it: its sysfs entry (still there, still the same disk, its sector
//! size), its device nodes (checked against sysfs, made where there is no devtmpfs), reads at an
//! offset, and the partition ioctls.

use std::{
    fs::{self, File},
    io::{self, Seek, SeekFrom},
    os::unix::fs::{FileExt, FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::sys::stat::{self, Mode, SFlag};
use tracing::info;

use crate::sysfs::{self, DevNumber};

/// How long to wait for devtmpfs to make a partition's node once sysfs shows it, before making it.
pub(super) const NODE_GRACE: Duration = Duration::from_secs(1);
/// How often waits poll.
pub(super) const POLL: Duration = Duration::from_millis(20);

/// The disk as sysfs shows it now: `None` when it is gone or has no medium (size 0).
pub(super) fn presence(sys_block: &Path, disk: &str) -> Option<Option<u64>> {
    let dir = sys_block.join(disk);
    let size = sysfs::read_u64(&dir.join("size"))?;
    (size > 0).then(|| sysfs::read_u64(&dir.join("diskseq")))
}

pub(super) fn logical_block_size(sys_block: &Path, disk: &str) -> Result<u64, String> {
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

pub(super) fn device_size(file: &File) -> io::Result<u64> {
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

pub(super) fn read_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Whether a device node is the device sysfs numbers `devnum`.
pub(super) fn node_matches(path: &Path, devnum: DevNumber) -> io::Result<Result<(), String>> {
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
pub(super) fn make_node(path: &Path, devnum: DevNumber) -> Result<(), String> {
    let dev = stat::makedev(u64::from(devnum.major), u64::from(devnum.minor));
    stat::mknod(path, SFlag::S_IFBLK, Mode::from_bits_truncate(0o600), dev)
        .map_err(|e| format!("mknod: {e}"))?;
    info!(node = %path.display(), major = devnum.major, minor = devnum.minor, "made a device node (no devtmpfs)");
    Ok(())
}

/// The node of whole disk `disk`, checked against sysfs's device number; made when missing (a
/// `/dev` without devtmpfs).
pub(super) fn disk_node(sys_block: &Path, dev_dir: &Path, disk: &str) -> Result<PathBuf, String> {
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
pub(super) fn wait_node(
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

/// The ioctls nix has no safe wrapper for: `BLKRRPART` (re-read the partition table) and `BLKPG`
/// (add one partition). Each call passes a borrowed descriptor and, for `BLKPG`, pointers to locals
/// that outlive the call.
#[allow(unsafe_code)]
pub(super) mod ioctl {
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
    pub(in crate::prepare) struct BlkpgIoctlArg {
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
    pub(in crate::prepare) fn reread_partitions(fd: BorrowedFd<'_>) -> nix::Result<()> {
        // SAFETY: BLKRRPART takes no argument; `fd` is open for the duration of the call.
        unsafe { blkrrpart(fd.as_raw_fd()) }.map(drop)
    }

    /// Tells the kernel about partition `pno` of the whole disk `fd`: `length` bytes from `start`.
    pub(in crate::prepare) fn add_partition(
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
