//! The preflight step: the checks that write nothing to the drive (it is there, the mkfs tool is
//! installed, its sector size is usable) and the mount point, made under a mount root that is
//! neither full nor read-only.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    sys::statvfs::{statvfs, FsFlags},
};
use shoal_proto::Filesystem;

use super::{
    device::{logical_block_size, presence},
    error::PrepareError,
    job::{Job, Step},
    layout::{fs_label, new_uuid},
};

/// What preflight settled: the tool, the sector size, the new filesystem's identity and where it
/// will be mounted.
pub(super) struct Plan {
    /// `mkfs.ext4` or `mkfs.xfs`.
    pub(super) tool: PathBuf,
    /// The drive's logical sector size (512 or 4096).
    pub(super) sector: u64,
    /// The new filesystem's UUID.
    pub(super) fs_uuid: String,
    /// Its label ([`fs_label`]).
    pub(super) label: String,
    /// `<mount root>/<UUID>`, made by this job.
    pub(super) mount_point: PathBuf,
}

impl Job<'_> {
    /// Remembers the disk's `diskseq`, finds the mkfs tool, reads the sector size, and makes the
    /// mount point.
    pub(super) fn preflight(
        &mut self,
        serial: Option<&str>,
        filesystem: Filesystem,
    ) -> Result<Plan, PrepareError> {
        let disk = self.disk.to_owned();
        let cfg = self.cfg;
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
        Ok(Plan {
            tool,
            sector,
            fs_uuid,
            label,
            mount_point,
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
}

/// `mkfs.ext4` or `mkfs.xfs` on `PATH`, or in the sbin directories a non-root `PATH` lacks.
pub(super) fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
}
