//! A tmpfs mounted for one test and unmounted when dropped: a small filesystem a test can fill,
//! run out of inodes on, or remount read-only, without touching the machine's disks.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

use crate::cmd;
use crate::skip::Missing;

/// A mounted tmpfs; `Drop` unmounts it (lazily if something still holds it).
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
    /// The mount point when [`Tmpfs::new`] made it; removed after the unmount.
    _dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// A tmpfs of `size` (mount's syntax: `40m`, `65536`) on a new temporary directory.
    ///
    /// Where this process may not mount (not root / no `CAP_SYS_ADMIN`) the error is a
    /// [`Missing`] capability, so `require!(Tmpfs::new(..))` skips or fails by the rule; any other
    /// failure is a plain error.
    pub fn new(size: &str) -> Result<Tmpfs> {
        let dir = tempfile::tempdir().context("a directory to mount a tmpfs on")?;
        let mut fs = Tmpfs::mount_at("tmpfs", dir.path(), &format!("size={size}"))?;
        fs._dir = Some(dir);
        Ok(fs)
    }

    /// Mounts a tmpfs named `source` (what `/proc/mounts` shows) at `dir`, created if missing,
    /// with mount `options` (`size=64k,nr_inodes=16`). Errors as for [`Tmpfs::new`].
    pub fn mount_at(source: &str, dir: &Path, options: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, source])
            .arg(dir)
            .output()
            .context("cannot run mount")?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if ["ermission denied", "not permitted", "must be superuser"]
                .iter()
                .any(|s| stderr.contains(s))
            {
                return Err(Missing::new(format!(
                    "cannot mount a tmpfs (needs root / CAP_SYS_ADMIN): {}",
                    stderr.trim()
                ))
                .into());
            }
            bail!(
                "mount tmpfs at {} failed ({}): {}",
                dir.display(),
                cmd::describe_status(&out.status),
                stderr.trim()
            );
        }
        Ok(Tmpfs {
            path: dir.to_owned(),
            _dir: None,
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remounts with `options` added (`ro`, `rw`).
    pub fn remount(&self, options: &str) -> Result<()> {
        cmd::run(
            Command::new("mount")
                .args(["-o", &format!("remount,{options}")])
                .arg(&self.path),
        )?;
        Ok(())
    }

    /// Bytes an unprivileged writer can still write.
    pub fn free_bytes(&self) -> Result<u64> {
        let st = nix::sys::statvfs::statvfs(&self.path)
            .with_context(|| format!("statvfs {}", self.path.display()))?;
        #[allow(clippy::useless_conversion)] // the field types differ between targets
        let free = u64::from(st.blocks_available()) * u64::from(st.fragment_size());
        Ok(free)
    }

    /// Writes a file that takes all but `leave` bytes of the free space (written out, since tmpfs
    /// allocates pages on write, not on `set_len`); its path, to remove when space should come
    /// back.
    pub fn fill(&self, leave: u64) -> Result<PathBuf> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = self
            .path
            .join(format!("filler-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        let len = self.free_bytes()?.saturating_sub(leave);
        let mut file =
            File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let chunk = vec![0xa5u8; 1 << 20];
        let mut written = 0u64;
        while written < len {
            let n =
                usize::try_from(len - written).map_or(chunk.len(), |left| left.min(chunk.len()));
            file.write_all(&chunk[..n])
                .with_context(|| format!("filling {}", path.display()))?;
            written += n as u64;
        }
        file.sync_all()?;
        Ok(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Whatever ran on it (a store, a daemon) may release its files a moment after the test
        // let go, or a failed test left them open: detach lazily then, so no mount outlives the
        // test.
        let unmounted = Command::new("umount")
            .arg(&self.path)
            .output()
            .is_ok_and(|o| o.status.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.path).output();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::require;

    #[test]
    fn mounts_fills_remounts_and_unmounts() {
        let fs = require!(Tmpfs::new("1m"));
        let path = fs.path().to_owned();
        let free = fs.free_bytes().expect("statvfs");
        assert!(free > 0 && free <= 1 << 20, "{free}");
        let big = vec![0u8; 2 << 20];
        assert!(
            std::fs::write(path.join("big"), big).is_err(),
            "a 1 MiB tmpfs takes no 2 MiB"
        );
        std::fs::remove_file(path.join("big")).expect("remove the partial file");
        let filler = fs.fill(64 << 10).expect("fills");
        let left = fs.free_bytes().expect("statvfs");
        assert!(left <= 64 << 10, "{left} bytes left");
        std::fs::remove_file(filler).expect("remove the filler");
        fs.remount("ro").expect("remount ro");
        assert!(std::fs::write(path.join("another"), b"x").is_err());
        drop(fs);
        assert!(!path.exists(), "the mount point is removed with it");
    }
}
