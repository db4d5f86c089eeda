//! The partition and settle steps: a GPT with shoal's one partition written and read back, the
//! kernel made to read it (`BLKRRPART`, or `BLKPG` where it parses no GPT), the partition awaited
//! in sysfs and `/dev`, and checked to be the one written before mkfs.

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use gpt::{disk::LogicalBlockSize, mbr::ProtectiveMBR, partition_types, GptConfig, GptError};
use nix::errno::Errno;
use tracing::{debug, info};

use super::{
    device::{device_size, ioctl, node_matches, read_at, wait_node, POLL},
    error::{list, PrepareError},
    job::{Job, Step},
    layout::{to_usize, Span, MIB, PARTITION_NAME},
    preflight::find_tool,
};
use crate::{
    blank,
    blockdev::partition_name,
    sysfs::{self, DevNumber},
};

impl Job<'_> {
    /// Writes the GPT through the exclusive descriptor and has the kernel read it; the partition's
    /// name and the GPT's disk GUID.
    pub(super) fn partition(
        &self,
        file: &mut File,
        size: u64,
        sector: u64,
        span: Span,
    ) -> Result<(String, String), PrepareError> {
        let disk = self.disk.to_owned();
        let disk_guid =
            write_gpt(file, size, sector, span).map_err(|reason| PrepareError::Gpt {
                disk: disk.clone(),
                reason,
            })?;
        let part = partition_name(&disk, 1);
        self.reread(file, &part, span)?;
        Ok((part, disk_guid))
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

    /// Waits for the partition in sysfs and its node in `/dev` (making the node if devtmpfs does
    /// not).
    ///
    /// Closing the descriptor we wrote through makes udevd (where it runs) re-read the partition
    /// table itself, removing and adding the partition again; `udevadm settle` waits for that to be
    /// over before mkfs. A kernel that does not parse GPTs drops the partition in that re-read, so
    /// it is added again with `BLKPG`.
    pub(super) fn settle(&self, part: &str, span: Span) -> Result<PathBuf, PrepareError> {
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
    pub(super) fn verify_partition(
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

/// Whether a GPT header (the 92 bytes at LBA 1 or in the last LBA) has the shape shoal writes, or
/// is no GPT header at all: 128-byte entries, at most 128 of them. The `gpt` crate panics on other
/// entry sizes and walks whatever count a header claims, so other tables are not handed to it (no
/// shoal drive has one).
pub(super) fn gpt_header_shape_ok(header: &[u8]) -> bool {
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

/// Whether both GPT headers of a disk are safe to give the `gpt` crate ([`gpt_header_shape_ok`]).
pub(super) fn gpt_shape_ok(file: &File, sector: u64) -> io::Result<bool> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
