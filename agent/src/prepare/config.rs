//! Where drives are mounted and where devices are found: [`PrepareConfig`].

use std::{path::PathBuf, time::Duration};

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
