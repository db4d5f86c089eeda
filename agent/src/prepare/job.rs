//! [`prepare`]: the job that takes a drive through its [`Step`]s, in order, each in its own module
//! (preflight, open, probe and wipe, partition and settle, mkfs, mount). Before each step the disk
//! must still be the one preflight saw.

use std::path::PathBuf;

use shoal_proto::{Filesystem, PreparedDrive};
use tracing::{debug, info, warn};

use super::{
    config::PrepareConfig, device::presence, error::PrepareError, layout::valid_disk_name,
    mkfs::run_mkfs, mount::remove_empty_dir,
};

/// A step of [`prepare`], in the order they run. The observer is told of each before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Step {
    /// Checks that write nothing to the drive: mkfs tool, sector size, UUID, mount point.
    Preflight,
    /// Opening the drive exclusively.
    Open,
    /// Reading what is on the drive, and checking a `force_serial`.
    Probe,
    /// Zeroing the places signatures live (only when forced over data).
    Wipe,
    /// Writing the GPT and having the kernel read it.
    Partition,
    /// Waiting for the partition to show in sysfs and `/dev`.
    Settle,
    /// Making the filesystem.
    Mkfs,
    /// Mounting it by UUID.
    Mount,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Preflight => "preflight",
            Step::Open => "open",
            Step::Probe => "probe",
            Step::Wipe => "wipe",
            Step::Partition => "partition",
            Step::Settle => "settle",
            Step::Mkfs => "mkfs",
            Step::Mount => "mount",
        })
    }
}

/// Prepares drive `disk` (a whole disk, `sdb`): one GPT partition named [`PARTITION_NAME`] from
/// 1 MiB to the end, `filesystem` on it with a new random UUID and a label from `serial`
/// ([`fs_label`]), mounted at `<mount_root>/<UUID>`.
///
/// A drive that is not blank (see [`probe`]) is refused with [`PrepareError::HasData`], unless
/// `force_serial` equals `serial`; then the places signatures live are zeroed first. A drive
/// without a serial number can never be forced. `observer` is called before each [`Step`].
///
/// Blocking: mkfs can take minutes. On an error after the mount point was made, it is removed.
pub fn prepare(
    cfg: &PrepareConfig,
    disk: &str,
    serial: Option<&str>,
    filesystem: Filesystem,
    force_serial: Option<&str>,
    observer: &mut dyn FnMut(Step),
) -> Result<PreparedDrive, PrepareError> {
    let span = tracing::info_span!("prepare", disk, %filesystem, forced = force_serial.is_some());
    let _entered = span.enter();
    let mut job = Job {
        cfg,
        disk,
        diskseq: None,
        observer,
        mount_point: None,
    };
    let result = job.run(serial, filesystem, force_serial);
    match &result {
        Ok(p) => {
            info!(partition = %p.partition, uuid = %p.fs_uuid, label = %p.label, mount = %p.mount_point, "drive prepared")
        }
        Err(e) => {
            warn!(cause = %e, "drive not prepared");
            if let Some(mp) = job.mount_point.take() {
                if let Err(e) = remove_empty_dir(&mp) {
                    warn!(path = %mp.display(), cause = %e, "could not remove the mount point");
                }
            }
        }
    }
    result
}

/// One preparation: the drive, what preflight saw of it, and what to clean up on failure. Each
/// step's module adds its methods.
pub(super) struct Job<'a> {
    pub(super) cfg: &'a PrepareConfig,
    pub(super) disk: &'a str,
    /// The disk's `diskseq` when preflight began (`None` on kernels without it).
    pub(super) diskseq: Option<u64>,
    pub(super) observer: &'a mut dyn FnMut(Step),
    /// The mount point this job made, to remove on failure.
    pub(super) mount_point: Option<PathBuf>,
}

impl Job<'_> {
    /// Tells the observer, then checks the disk is still there and still the same disk.
    pub(super) fn step(&mut self, step: Step) -> Result<(), PrepareError> {
        (self.observer)(step);
        debug!(%step, "step");
        self.still_there(step)
    }

    /// Checks the disk is still there with the `diskseq` preflight saw.
    pub(super) fn still_there(&self, step: Step) -> Result<(), PrepareError> {
        match presence(&self.cfg.sys_block, self.disk) {
            Some(seq) if seq == self.diskseq => Ok(()),
            _ => Err(PrepareError::Vanished { step }),
        }
    }

    /// The steps, in order.
    fn run(
        &mut self,
        serial: Option<&str>,
        filesystem: Filesystem,
        force_serial: Option<&str>,
    ) -> Result<PreparedDrive, PrepareError> {
        if !valid_disk_name(self.disk) {
            return Err(PrepareError::BadName {
                disk: self.disk.to_owned(),
            });
        }

        // Preflight: nothing here touches the drive.
        let plan = self.preflight(serial, filesystem)?;

        // Open exclusively: the kernel refuses a mounted or held drive.
        self.step(Step::Open)?;
        let mut file = self.open()?;

        // Probe through the same descriptor.
        self.step(Step::Probe)?;
        let (size, span) = self.probe_and_wipe(&file, plan.sector, serial, force_serial)?;

        // Partition: GPT through the exclusive descriptor, then the kernel re-reads it.
        self.step(Step::Partition)?;
        let (part, disk_guid) = self.partition(&mut file, size, plan.sector, span)?;
        drop(file); // unlocks; and mkfs must be able to open the partition exclusively

        self.step(Step::Settle)?;
        let part_path = self.settle(&part, span)?;

        self.step(Step::Mkfs)?;
        self.verify_partition(&part, &part_path, span, plan.sector, &disk_guid)?;
        run_mkfs(
            &plan.tool,
            filesystem,
            &plan.label,
            &plan.fs_uuid,
            &part_path,
            self.cfg.mkfs_timeout,
        )?;

        // Mount by UUID: the partition's superblock must carry the UUID just made.
        self.step(Step::Mount)?;
        self.mount(part, &part_path, filesystem, plan.fs_uuid, plan.mount_point)
    }
}
