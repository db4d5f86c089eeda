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
//! Sans-IO parts (names, label, geometry, superblock parsing, the probe's windows) are plain
//! functions over bytes; the shell around them is blocking I/O, for `spawn_blocking`.
//!
//! One module per step of [`prepare`] (`job` runs them in order): `preflight`, `open`, `probe`
//! (also [`probe`] on its own), `partition` (and settle), `mkfs`, `mount` (also [`restore`] and
//! [`detach`]); beside them `layout` (sans-IO names and geometry), `device` (the drive in sysfs
//! and `/dev`, the partition ioctls), `config` and `error`.

mod config;
mod device;
mod error;
mod job;
mod layout;
mod mkfs;
mod mount;
mod open;
mod partition;
mod preflight;
mod probe;
#[cfg(test)]
mod tests;

pub use config::PrepareConfig;
pub use error::{DetachError, PrepareError, ProbeError, RestoreError};
pub use job::{prepare, Step};
pub use layout::{fs_label, valid_disk_name, PARTITION_NAME};
pub use mkfs::{fs_identity, FsIdentity};
pub use mount::{detach, restore};
pub use probe::probe;
