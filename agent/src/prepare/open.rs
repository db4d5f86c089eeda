//! The open step: the whole disk opened `O_EXCL` (the kernel refuses while it or a partition is
//! mounted or held by md or device-mapper) and locked against udev, through a node that is the
//! device sysfs describes.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
    sys::stat,
};

use super::{device::disk_node, error::PrepareError, job::Job};
use crate::sysfs::DevNumber;

impl Job<'_> {
    /// Opens the drive exclusively and locks it; every later read and write of the whole disk goes
    /// through this descriptor.
    pub(super) fn open(&self) -> Result<Flock<File>, PrepareError> {
        let disk = self.disk.to_owned();
        let cfg = self.cfg;
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
        let file = self.lock(file)?;
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
        Ok(file)
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
}
