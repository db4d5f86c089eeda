//! The mkfs step: the filesystem made with shoal's UUID and label, and superblocks read back to
//! tell which filesystem a partition holds.

use std::{
    fs::File,
    io::{self, Read},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use shoal_proto::Filesystem;
use tracing::{debug, warn};

use super::{
    device::{device_size, read_at},
    error::PrepareError,
    layout::{format_uuid, to_usize},
};

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

/// The filesystem a partition's superblock describes.
pub(super) fn read_identity(path: &Path) -> io::Result<Option<FsIdentity>> {
    let file = File::open(path)?;
    let size = device_size(&file)?;
    let head = read_at(&file, 0, to_usize(size.min(4096)))?;
    Ok(fs_identity(&head))
}

/// Runs mkfs with our UUID and label, killing it at `timeout`.
pub(super) fn run_mkfs(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
