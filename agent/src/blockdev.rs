//! The agent's one model of the machine's disks: `/sys/block` read into [`BlockDevice`]s, the
//! operator's [`DriveMatch`] of which are drives, and the kernel's uevents that say when a disk
//! comes or goes.
//!
//! - [`scan_disks`] and [`read_block_device`] read a sysfs tree whose root is passed in (tests use a
//!   fake tree) with the readers of [`crate::sysfs`]; every unreadable attribute is `None` (or
//!   `false`, or size 0), never a panic. The drive report ([`scan`]: the disks [`DriveMatch`]
//!   admits) and the inventory's disk list (its own rule, in `inventory.rs`) both come from it.
//! - [`parse_uevent`] is the sans-IO core of hot-add: one kernel uevent datagram in, a typed
//!   [`Uevent`] or a typed [`UeventError`] out.
//! - [`UeventSocket`] is its thin async shell: a `NETLINK_KOBJECT_UEVENT` socket in the kernel's
//!   multicast group, so it works without udevd (netbooted busybox images have none).
//!
//! What the kernel sends (6.18, captured on a test VM; the fixtures in the tests are these bytes):
//! a new disk is `add` of subsystem `block`, devtype `disk`; a disk going away is `remove`. A loop
//! device that already exists (the kernel pre-creates `loop0`–`loop7`) sends only `change` when a
//! file is attached or detached, with its size going from 0 to the file's size and back, so a drive
//! manager rescans the device on `change` too. An [`UeventRecvError::Overrun`] means events were
//! lost: rescan everything.

use std::{
    fs, io,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    sys::socket::{self, sockopt, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType},
};
use tokio::io::{unix::AsyncFd, Interest};
use tracing::{debug, warn};

use crate::sysfs;

// ---------------------------------------------------------------------------------------------
// Which devices are drives

/// Kernel-name prefixes that are not physical disks: loop, RAM disks, zram, device-mapper, md
/// RAID, optical, floppy, network block devices, ZFS zvols, Ceph RBD.
const NOT_PHYSICAL_PREFIXES: &[&str] = &[
    "loop", "ram", "zram", "dm-", "md", "sr", "fd", "nbd", "zd", "rbd",
];

/// Which whole-disk block devices count as drives.
///
/// Default: physical disks only. Names starting `loop`, `ram`, `zram`, `dm-`, `md`, `sr`, `fd`,
/// `nbd`, `zd` or `rbd` are excluded, and so are the eMMC hardware partitions `mmcblk*boot*` and
/// `mmcblk*rpmb`. The operator's `--drive-match GLOB` patterns add names: a device whose kernel
/// name matches one is admitted even if the default excludes it (`loop*` for test rigs). A device
/// of size 0 (a card reader without a card, a detached loop device) is never a drive.
#[derive(Debug, Clone, Default)]
pub struct DriveMatch {
    extra: Vec<glob::Pattern>,
}

impl DriveMatch {
    /// The default rule plus the operator's `--drive-match` patterns (globs on the kernel name,
    /// such as `loop*` or `sd[b-d]`).
    pub fn new(extra: &[String]) -> Result<Self, BlockdevError> {
        let extra = extra
            .iter()
            .map(|pattern| {
                if pattern.is_empty() {
                    return Err(BlockdevError::EmptyPattern);
                }
                glob::Pattern::new(pattern).map_err(|source| BlockdevError::BadPattern {
                    pattern: pattern.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { extra })
    }

    /// Whether the whole-disk device `name` (kernel name, as in `/sys/block`) of `size_bytes` is a
    /// drive.
    pub fn admits(&self, name: &str, size_bytes: u64) -> bool {
        if size_bytes == 0 || name.is_empty() {
            return false;
        }
        self.extra.iter().any(|p| p.matches(name)) || is_physical_name(name)
    }
}

/// The default rule: not one of the virtual or special kinds of block device.
fn is_physical_name(name: &str) -> bool {
    if NOT_PHYSICAL_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return false;
    }
    // eMMC boot and RPMB areas: `mmcblk0boot0`, `mmcblk0boot1`, `mmcblk0rpmb`.
    if let Some(rest) = name.strip_prefix("mmcblk") {
        if rest.contains("boot") || rest.ends_with("rpmb") {
            return false;
        }
    }
    true
}

/// Errors of this module's configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlockdevError {
    /// A `--drive-match` pattern is not a valid glob.
    #[error("--drive-match {pattern:?} is not a valid glob: {source}")]
    BadPattern {
        /// The pattern as given.
        pattern: String,
        /// What glob found wrong with it.
        #[source]
        source: glob::PatternError,
    },
    /// A `--drive-match` pattern is empty (it would match no device name).
    #[error("--drive-match pattern is empty")]
    EmptyPattern,
}

/// `sdb` + 1 → `sdb1`; a disk name ending in a digit gets a `p` between (`nvme0n1p1`, `mmcblk0p1`,
/// `loop3p1`), as the kernel names partitions.
pub fn partition_name(disk: &str, n: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{n}")
    } else {
        format!("{disk}{n}")
    }
}

// ---------------------------------------------------------------------------------------------
// /sys/block

pub use crate::sysfs::DevNumber;

/// One whole-disk block device as `/sys/block/<name>` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// Kernel name, the entry in `/sys/block` (`sda`, `nvme0n1`, `loop3`). A `/` in the device
    /// path is `!` here, as in sysfs (`cciss!c0d0`).
    pub name: String,
    /// Device number from `dev`; `None` when unreadable.
    pub dev: Option<DevNumber>,
    /// Size in bytes (`size` counts 512-byte sectors whatever the logical block size); 0 when
    /// unreadable.
    pub size_bytes: u64,
    /// `device/model`, trimmed; `None` when absent or blank.
    pub model: Option<String>,
    /// The first of `device/serial` (NVMe, mmc), `serial` (virtio), the SCSI unit serial VPD page
    /// (`device/vpd_pg80`), `device/wwid` / `wwid`, and for loop devices `loop/backing_file`.
    pub serial: Option<String>,
    /// `removable` is 1 (false when unreadable).
    pub removable: bool,
    /// `ro` is 1 (false when unreadable).
    pub read_only: bool,
    /// `queue/rotational` is 1: a spinning disk (false when unreadable).
    pub rotational: bool,
    /// It has a `device` link to the hardware (or virtio device) beneath it; device-mapper, md,
    /// loop, zram and network block devices have none, as they sit on other disks or on memory.
    pub has_device: bool,
    /// Partitions (child directories holding a `partition` file), in partition-number order.
    pub partitions: Vec<String>,
    /// Devices stacked on this one (`holders/`: device-mapper, md), sorted.
    pub holders: Vec<String>,
}

impl BlockDevice {
    /// The device node, `/dev/<name>` with `!` turned back into `/`.
    pub fn dev_path(&self) -> PathBuf {
        Path::new("/dev").join(self.name.replace('!', "/"))
    }
}

/// Every drive in `sys_block` (normally `/sys/block`) that `matcher` admits, sorted by name: the
/// disks of [`scan_disks`] that [`DriveMatch::admits`].
pub fn scan(sys_block: &Path, matcher: &DriveMatch) -> Vec<BlockDevice> {
    scan_disks(sys_block)
        .into_iter()
        .filter(|dev| matcher.admits(&dev.name, dev.size_bytes))
        .collect()
}

/// Every whole-disk device in `sys_block` (normally `/sys/block`), sorted by name, whatever its
/// kind or size: the one scan of the machine's disks, which the drive report ([`scan`]) and the
/// inventory each filter by their own rule. Hidden disks (the per-path devices of multipath NVMe,
/// which have no device node) are skipped. An unreadable `sys_block` is logged and gives an empty
/// list.
pub fn scan_disks(sys_block: &Path) -> Vec<BlockDevice> {
    let entries = match fs::read_dir(sys_block) {
        Ok(entries) => entries,
        Err(err) => {
            warn!(path = %sys_block.display(), cause = %err, "cannot list block devices");
            return Vec::new();
        }
    };
    let mut disks: Vec<BlockDevice> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter_map(|name| read_block_device(sys_block, &name))
        .collect();
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    disks
}

/// The one device `name` in `sys_block`, whether or not it is a drive. `name` may come from a
/// uevent: a `/` in it is read as sysfs's `!`. `None` when there is no such device, the name is not
/// a plain file name, or the disk is hidden.
pub fn read_block_device(sys_block: &Path, name: &str) -> Option<BlockDevice> {
    let name = name.replace('/', "!");
    if name.is_empty() || name == "." || name == ".." || name.contains('\0') {
        return None;
    }
    let dir = sys_block.join(&name);
    if !dir.is_dir() || sysfs::flag(&dir, "hidden") {
        return None;
    }
    // `size` counts 512-byte sectors whatever the device's logical block size.
    let sectors = sysfs::read_u64(&dir.join("size")).unwrap_or(0);
    Some(BlockDevice {
        dev: DevNumber::read(&dir),
        size_bytes: sectors.saturating_mul(512),
        model: sysfs::read_utf8_attr(&dir.join("device/model")),
        serial: disk_serial(&dir),
        removable: sysfs::flag(&dir, "removable"),
        read_only: sysfs::flag(&dir, "ro"),
        rotational: sysfs::flag(&dir, "queue/rotational"),
        has_device: dir.join("device").exists(),
        partitions: partitions(&dir),
        holders: sysfs::sorted_entries(&dir.join("holders")),
        name,
    })
}

/// A disk's serial number from its `/sys/block/<name>` directory; see [`BlockDevice::serial`] for
/// the order.
pub fn disk_serial(dir: &Path) -> Option<String> {
    let read = |file: &str| sysfs::read_utf8_attr(&dir.join(file));
    read("device/serial")
        .or_else(|| read("serial"))
        .or_else(|| {
            fs::read(dir.join("device/vpd_pg80"))
                .ok()
                .and_then(|p| vpd_pg80_serial(&p))
        })
        .or_else(|| read("device/wwid"))
        .or_else(|| read("wwid"))
        .or_else(|| read("loop/backing_file"))
}

/// The Unit Serial Number VPD page (SPC-4 7.8.18): a 4-byte header (byte 1 the page code 0x80,
/// bytes 2..4 the big-endian length), then the serial in ASCII, often padded with spaces or NULs.
fn vpd_pg80_serial(page: &[u8]) -> Option<String> {
    let header = page.get(..4)?;
    if header[1] != 0x80 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let body = page.get(4..4 + len).or_else(|| page.get(4..))?;
    let text = std::str::from_utf8(body).ok()?;
    let serial = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!serial.is_empty()).then(|| serial.to_owned())
}

/// Child directories with a `partition` file, ordered by that number.
fn partitions(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, String)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let number = sysfs::read_attr(&entry.path().join("partition"))?;
            let name = entry.file_name().into_string().ok()?;
            Some((number.parse().unwrap_or(u64::MAX), name))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, name)| name).collect()
}

// ---------------------------------------------------------------------------------------------
// Uevents: the sans-IO parser

/// The largest uevent accepted. The kernel's own limit is far below it (a 2 KiB environment plus
/// the `ACTION@DEVPATH` header).
pub const MAX_UEVENT_LEN: usize = 8 * 1024;

/// What happened to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UeventAction {
    /// A device appeared.
    Add,
    /// A device went away.
    Remove,
    /// A device changed: media inserted or removed, a loop device attached or detached, a resize.
    Change,
    /// Anything else (`move`, `online`, `offline`, `bind`, `unbind`).
    Other(String),
}

impl UeventAction {
    fn from_kernel(s: &str) -> Self {
        match s {
            "add" => Self::Add,
            "remove" => Self::Remove,
            "change" => Self::Change,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// One kernel uevent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// `ACTION`.
    pub action: UeventAction,
    /// `DEVPATH`, under `/sys` (`/devices/virtual/block/loop0`).
    pub devpath: String,
    /// `SUBSYSTEM` (`block`, `bdi`, `usb`, …).
    pub subsystem: String,
    /// `DEVNAME`, the node under `/dev` (`sda`, `loop0`); `None` for devices without one.
    pub devname: Option<String>,
    /// `DEVTYPE` (`disk`, `partition`, …).
    pub devtype: Option<String>,
    /// `SEQNUM`, rising by one per kernel event: a gap means events were missed.
    pub seqnum: Option<u64>,
    /// `MAJOR`:`MINOR`, when both are present.
    pub dev: Option<DevNumber>,
}

impl Uevent {
    /// The kernel name of the whole disk this event is about (`DEVNAME` when the subsystem is
    /// `block` and the devtype `disk`), or `None` for partitions and other devices.
    pub fn block_disk(&self) -> Option<&str> {
        if self.subsystem == "block" && self.devtype.as_deref() == Some("disk") {
            self.devname.as_deref()
        } else {
            None
        }
    }
}

/// Why a datagram is not a kernel uevent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UeventError {
    /// Longer than [`MAX_UEVENT_LEN`].
    #[error("uevent of {len} bytes exceeds the {MAX_UEVENT_LEN}-byte limit")]
    Oversized {
        /// Its length (at least the limit plus one when the receive buffer truncated it).
        len: usize,
    },
    /// A message in libudev's format (udevd's rebroadcast, beginning `libudev\0`), not the
    /// kernel's.
    #[error("libudev-format message (from udevd), not a kernel uevent")]
    Libudev,
    /// The first field is not `ACTION@DEVPATH`.
    #[error("uevent header has no '@' between action and devpath")]
    NoSeparator,
    /// A field the parser needs is not UTF-8.
    #[error("uevent field {field} is not UTF-8")]
    NotUtf8 {
        /// The field.
        field: &'static str,
    },
    /// A field the parser needs is absent or empty.
    #[error("uevent has no {field}")]
    Missing {
        /// The field.
        field: &'static str,
    },
    /// The `ACTION=` or `DEVPATH=` field disagrees with the `ACTION@DEVPATH` header.
    #[error("uevent {field} disagrees with its header")]
    Mismatch {
        /// The field.
        field: &'static str,
    },
    /// A numeric field is not a number.
    #[error("uevent field {field} is not a number")]
    BadNumber {
        /// The field.
        field: &'static str,
    },
}

/// Parse one datagram of the kernel's uevent netlink format: `ACTION@DEVPATH\0` followed by
/// `KEY=VALUE\0` fields. Unknown fields and fields without `=` are ignored; the fields used
/// (`ACTION`, `DEVPATH`, `SUBSYSTEM`, `DEVNAME`, `DEVTYPE`, `SEQNUM`, `MAJOR`, `MINOR`) are
/// checked.
pub fn parse_uevent(buf: &[u8]) -> Result<Uevent, UeventError> {
    if buf.len() > MAX_UEVENT_LEN {
        return Err(UeventError::Oversized { len: buf.len() });
    }
    if buf.starts_with(b"libudev\0") {
        return Err(UeventError::Libudev);
    }
    let mut fields = buf.split(|&b| b == 0);
    let header = fields.next().unwrap_or_default();
    let at = header
        .iter()
        .position(|&b| b == b'@')
        .ok_or(UeventError::NoSeparator)?;
    let header_action = utf8("ACTION", &header[..at])?;
    let header_devpath = utf8("DEVPATH", &header[at + 1..])?;

    let mut raw = RawFields::default();
    for field in fields {
        let Some(eq) = field.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (key, value) = (&field[..eq], &field[eq + 1..]);
        let slot = match key {
            b"ACTION" => &mut raw.action,
            b"DEVPATH" => &mut raw.devpath,
            b"SUBSYSTEM" => &mut raw.subsystem,
            b"DEVNAME" => &mut raw.devname,
            b"DEVTYPE" => &mut raw.devtype,
            b"SEQNUM" => &mut raw.seqnum,
            b"MAJOR" => &mut raw.major,
            b"MINOR" => &mut raw.minor,
            _ => continue,
        };
        // The kernel never repeats a key; if something does, the first one counts.
        slot.get_or_insert(value);
    }

    let action = agreeing("ACTION", header_action, raw.action)?;
    let devpath = agreeing("DEVPATH", header_devpath, raw.devpath)?;
    let subsystem =
        optional("SUBSYSTEM", raw.subsystem)?.ok_or(UeventError::Missing { field: "SUBSYSTEM" })?;
    let major = number::<u32>("MAJOR", raw.major)?;
    let minor = number::<u32>("MINOR", raw.minor)?;
    Ok(Uevent {
        action: UeventAction::from_kernel(action),
        devpath: devpath.to_owned(),
        subsystem: subsystem.to_owned(),
        devname: optional("DEVNAME", raw.devname)?.map(str::to_owned),
        devtype: optional("DEVTYPE", raw.devtype)?.map(str::to_owned),
        seqnum: number("SEQNUM", raw.seqnum)?,
        dev: major
            .zip(minor)
            .map(|(major, minor)| DevNumber { major, minor }),
    })
}

/// The values of the fields the parser reads, as they came.
#[derive(Default)]
struct RawFields<'a> {
    action: Option<&'a [u8]>,
    devpath: Option<&'a [u8]>,
    subsystem: Option<&'a [u8]>,
    devname: Option<&'a [u8]>,
    devtype: Option<&'a [u8]>,
    seqnum: Option<&'a [u8]>,
    major: Option<&'a [u8]>,
    minor: Option<&'a [u8]>,
}

fn utf8<'a>(field: &'static str, bytes: &'a [u8]) -> Result<&'a str, UeventError> {
    std::str::from_utf8(bytes).map_err(|_| UeventError::NotUtf8 { field })
}

/// A field's value, `None` when absent or empty.
fn optional<'a>(
    field: &'static str,
    value: Option<&'a [u8]>,
) -> Result<Option<&'a str>, UeventError> {
    match value {
        None | Some([]) => Ok(None),
        Some(bytes) => utf8(field, bytes).map(Some),
    }
}

/// The header's value, checked against the `KEY=` field when there is one; never empty.
fn agreeing<'a>(
    field: &'static str,
    header: &'a str,
    value: Option<&'a [u8]>,
) -> Result<&'a str, UeventError> {
    let from_field = optional(field, value)?;
    match from_field {
        Some(v) if !header.is_empty() && v != header => Err(UeventError::Mismatch { field }),
        Some(v) => Ok(v),
        None if header.is_empty() => Err(UeventError::Missing { field }),
        None => Ok(header),
    }
}

fn number<T: std::str::FromStr>(
    field: &'static str,
    value: Option<&[u8]>,
) -> Result<Option<T>, UeventError> {
    optional(field, value)?
        .map(|s| s.parse().map_err(|_| UeventError::BadNumber { field }))
        .transpose()
}

// ---------------------------------------------------------------------------------------------
// Uevents: the socket

/// The kernel's uevent multicast group. Group 2 is udevd's rebroadcast, which needs udevd.
const KERNEL_GROUP: u32 = 1;

/// The receive buffer [`UeventSocket::bind`] asks for, so that a burst of events (a disk shelf
/// powering up, `udevadm trigger`) does not overflow it while the agent is busy. The kernel doubles
/// the number, and a queued uevent takes about 830 bytes of it (measured on Linux 6.18), so this
/// holds about 10,000 events.
pub const RECEIVE_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Why [`UeventSocket::recv`] returned no event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UeventRecvError {
    /// The receive buffer overflowed (`ENOBUFS`) and events were lost: rescan `/sys/block`. The
    /// socket stays usable.
    #[error("uevent receive buffer overflowed: events were lost")]
    Overrun,
    /// Any other socket error.
    #[error("uevent socket: {0}")]
    Io(#[from] io::Error),
}

/// A `NETLINK_KOBJECT_UEVENT` socket bound to the kernel's multicast group, read with tokio.
#[derive(Debug)]
pub struct UeventSocket {
    fd: AsyncFd<OwnedFd>,
}

impl UeventSocket {
    /// Open the socket with a [`RECEIVE_BUFFER_BYTES`] receive buffer. Needs no privilege (the
    /// buffer is then capped by `net.core.rmem_max`).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime with I/O enabled, as tokio's own sockets do.
    pub fn bind() -> io::Result<Self> {
        Self::bind_with_receive_buffer(RECEIVE_BUFFER_BYTES)
    }

    /// [`bind`](Self::bind) with a receive buffer of `bytes` (the kernel doubles it for its
    /// bookkeeping and enforces a minimum).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime with I/O enabled.
    pub fn bind_with_receive_buffer(bytes: usize) -> io::Result<Self> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        // SO_RCVBUFFORCE passes net.core.rmem_max but needs CAP_NET_ADMIN; SO_RCVBUF does not.
        if let Err(forced) = socket::setsockopt(&fd, sockopt::RcvBufForce, &bytes) {
            if let Err(err) = socket::setsockopt(&fd, sockopt::RcvBuf, &bytes) {
                warn!(bytes, forced = %forced, cause = %err, "cannot raise the uevent receive buffer");
            } else {
                debug!(bytes, forced = %forced, "uevent receive buffer capped by net.core.rmem_max");
            }
        }
        // Port id 0: the kernel picks one.
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP))?;
        Ok(Self { fd: register(fd)? })
    }

    /// The next kernel uevent. Datagrams not sent by the kernel (netlink port id not 0) are
    /// dropped, unparsable ones skipped, both with a debug log. (Sending to this socket at all
    /// needs `CAP_NET_ADMIN`; with `CAP_SYS_ADMIN` a process can also have the kernel broadcast an
    /// event of its own making, which carries port id 0.) Cancel-safe: an event is either returned
    /// or left in the socket.
    pub async fn recv(&self) -> Result<Uevent, UeventRecvError> {
        loop {
            let mut guard = self.fd.readable().await?;
            // One byte more than the limit, so that an oversized datagram is seen as such.
            let mut buf = [0u8; MAX_UEVENT_LEN + 1];
            let received = guard.try_io(|fd| {
                socket::recvfrom::<NetlinkAddr>(fd.as_raw_fd(), &mut buf).map_err(io::Error::from)
            });
            let (len, from) = match received {
                Err(_would_block) => continue,
                Ok(Err(err)) if err.raw_os_error() == Some(Errno::ENOBUFS as i32) => {
                    return Err(UeventRecvError::Overrun)
                }
                Ok(Err(err)) if err.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(err)) => return Err(err.into()),
                Ok(Ok(received)) => received,
            };
            let sender = from.map(|addr| addr.pid());
            if sender != Some(0) {
                debug!(sender = ?sender, len, "dropping a uevent not sent by the kernel");
                continue;
            }
            match parse_uevent(&buf[..len]) {
                Ok(event) => return Ok(event),
                Err(err) => debug!(len, cause = %err, "skipping an unparsable uevent"),
            }
        }
    }
}

/// `fd` under tokio's reactor, for reading.
///
/// `unsafe` because since tokio 1.54 the safe constructors of `AsyncFd` are deprecated as unsound
/// for an arbitrary `AsRawFd` (tokio-rs/tokio#8587), and the replacement is an `unsafe fn` whose
/// contract an `OwnedFd` meets by construction. Neither nix nor tokio has a safe way to watch a
/// netlink socket.
#[allow(unsafe_code)]
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is an open descriptor that stays open until it is dropped, which happens
    // only with the `AsyncFd` that owns it, and its `as_raw_fd` always returns that descriptor.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    // -----------------------------------------------------------------------------------------
    // DriveMatch and partition names

    const GIB: u64 = 1 << 30;

    #[test]
    fn default_match_admits_physical_disks_only() {
        let m = DriveMatch::default();
        for name in [
            "sda", "sdab", "nvme0n1", "vda", "xvda", "hda", "mmcblk0", "mmcblk1",
        ] {
            assert!(m.admits(name, GIB), "{name} is a drive");
            assert!(!m.admits(name, 0), "{name} of size 0 is not a drive");
        }
        for name in [
            "loop0",
            "loop12",
            "ram0",
            "zram0",
            "dm-0",
            "md0",
            "md127",
            "sr0",
            "fd0",
            "nbd3",
            "zd16",
            "rbd0",
            "mmcblk0boot0",
            "mmcblk0boot1",
            "mmcblk0rpmb",
            "mmcblk12rpmb",
            "",
        ] {
            assert!(!m.admits(name, GIB), "{name} is not a drive by default");
        }
    }

    #[test]
    fn drive_match_patterns_add_names_but_never_empty_devices() {
        let m = DriveMatch::new(&["loop*".into(), "nbd[0-1]".into()]).expect("valid patterns");
        assert!(m.admits("loop3", GIB));
        assert!(m.admits("nbd1", GIB));
        assert!(!m.admits("nbd2", GIB));
        assert!(!m.admits("loop3", 0));
        assert!(!m.admits("zram0", GIB));
        assert!(
            m.admits("sda", GIB),
            "patterns add to the default, they do not replace it"
        );
        let err = DriveMatch::new(&["sd[".into()]).expect_err("unclosed bracket");
        assert!(
            matches!(&err, BlockdevError::BadPattern { pattern, .. } if pattern == "sd["),
            "{err}"
        );
        assert!(err.to_string().contains("sd["), "{err}");
        assert!(matches!(
            DriveMatch::new(&[String::new()]),
            Err(BlockdevError::EmptyPattern)
        ));
    }

    #[test]
    fn partition_names_follow_the_kernel() {
        assert_eq!(partition_name("sdb", 1), "sdb1");
        assert_eq!(partition_name("sdab", 12), "sdab12");
        assert_eq!(partition_name("vda", 2), "vda2");
        assert_eq!(partition_name("nvme0n1", 1), "nvme0n1p1");
        assert_eq!(partition_name("loop3", 1), "loop3p1");
        assert_eq!(partition_name("mmcblk0", 3), "mmcblk0p3");
    }

    // -----------------------------------------------------------------------------------------
    // /sys/block from a fixture tree

    struct SysBlock(TempDir);

    impl SysBlock {
        fn new() -> Self {
            Self(TempDir::new().expect("tempdir"))
        }

        fn path(&self) -> &Path {
            self.0.path()
        }

        fn write(&self, rel: &str, contents: impl AsRef<[u8]>) {
            let path = self.0.path().join(rel);
            fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
            fs::write(path, contents).expect("write");
        }

        fn mkdir(&self, rel: &str) {
            fs::create_dir_all(self.0.path().join(rel)).expect("mkdir");
        }

        /// A disk with `size` (sectors) and `dev`, `ro`, `removable` as the kernel always has them.
        fn disk(&self, name: &str, sectors: &str, dev: &str, files: &[(&str, &[u8])]) {
            self.write(&format!("{name}/size"), format!("{sectors}\n"));
            self.write(&format!("{name}/dev"), format!("{dev}\n"));
            self.write(&format!("{name}/ro"), "0\n");
            self.write(&format!("{name}/removable"), "0\n");
            self.write(&format!("{name}/hidden"), "0\n");
            self.mkdir(&format!("{name}/holders"));
            for (file, contents) in files {
                self.write(&format!("{name}/{file}"), contents);
            }
        }

        fn partition(&self, disk: &str, n: u32) {
            let name = partition_name(disk, n);
            self.write(&format!("{disk}/{name}/partition"), format!("{n}\n"));
            self.write(&format!("{disk}/{name}/size"), "2048\n");
        }
    }

    /// A tree with one of each kind of device the agent meets.
    fn fixture() -> SysBlock {
        let f = SysBlock::new();
        // NVMe: serial and model on the controller (`device`), padded; three partitions, the
        // tenth sorting after the second; a device-mapper volume on top.
        f.disk(
            "nvme0n1",
            "1000215216",
            "259:0",
            &[
                (
                    "device/model",
                    b"Samsung SSD 980 PRO 1TB                 \n",
                ),
                ("device/serial", b"  S5GXNF0R123456X  \n"),
                ("wwid", b"eui.002538b111b2c3d4\n"),
                ("holders/dm-0", b""),
            ],
        );
        for n in [1, 2, 10] {
            f.partition("nvme0n1", n);
        }
        // SATA behind libata: serial only in the VPD page (4-byte header, space-padded ASCII).
        f.disk(
            "sda",
            "3907029168",
            "8:0",
            &[
                ("device/model", b"ST2000DM008-2FR1\n"),
                ("device/vpd_pg80", b"\x00\x80\x00\x14        ZFL1ABCD"),
                ("device/wwid", b"naa.5000c500a1b2c3d4\n"),
            ],
        );
        // USB stick: VPD page padded with NULs, read-only and removable.
        f.disk(
            "sdb",
            "60437492",
            "8:16",
            &[
                ("device/model", b"Cruzer Blade    \n"),
                (
                    "device/vpd_pg80",
                    b"\x00\x80\x00\x104C530001\0\0\0\0\0\0\0\0",
                ),
                ("ro", b"1\n"),
                ("removable", b"1\n"),
            ],
        );
        // Card reader without a card.
        f.disk(
            "sdc",
            "0",
            "8:32",
            &[("removable", b"1\n"), ("device/model", b"SD/MMC\n")],
        );
        // SCSI disk with only a WWID.
        f.disk(
            "sdd",
            "2048",
            "8:48",
            &[("device/wwid", b"naa.600508b1001c\n")],
        );
        // virtio: serial on the disk itself.
        f.disk("vda", "20971520", "253:0", &[("serial", b"disk-serial\n")]);
        // eMMC with its boot areas.
        f.disk(
            "mmcblk0",
            "30535680",
            "179:0",
            &[("device/serial", b"0x1a2b3c4d\n")],
        );
        f.disk(
            "mmcblk0boot0",
            "8192",
            "179:8",
            &[("device/serial", b"0x1a2b3c4d\n")],
        );
        f.disk("mmcblk0rpmb", "8192", "179:24", &[]);
        // Loop devices: one attached, one idle (size 0).
        f.disk(
            "loop0",
            "32768",
            "7:0",
            &[("loop/backing_file", b"/var/tmp/disk0.img\n")],
        );
        f.disk("loop1", "0", "7:1", &[]);
        f.disk("zram0", "8388608", "252:0", &[]);
        f.disk("dm-0", "1000000000", "254:0", &[]);
        // A hidden multipath NVMe path.
        f.disk("nvme0c0n1", "1000215216", "259:5", &[("hidden", b"1\n")]);
        f
    }

    fn names(devices: &[BlockDevice]) -> Vec<&str> {
        devices.iter().map(|d| d.name.as_str()).collect()
    }

    #[test]
    fn scan_reads_every_attribute_of_every_drive() {
        let f = fixture();
        let drives = scan(f.path(), &DriveMatch::default());
        assert_eq!(
            names(&drives),
            ["mmcblk0", "nvme0n1", "sda", "sdb", "sdd", "vda"]
        );

        let nvme = &drives[1];
        assert_eq!(
            *nvme,
            BlockDevice {
                name: "nvme0n1".into(),
                dev: Some(DevNumber {
                    major: 259,
                    minor: 0
                }),
                size_bytes: 1000215216 * 512,
                model: Some("Samsung SSD 980 PRO 1TB".into()),
                serial: Some("S5GXNF0R123456X".into()),
                removable: false,
                read_only: false,
                rotational: false,
                has_device: true,
                partitions: vec!["nvme0n1p1".into(), "nvme0n1p2".into(), "nvme0n1p10".into()],
                holders: vec!["dm-0".into()],
            }
        );
        assert_eq!(nvme.dev_path(), Path::new("/dev/nvme0n1"));
        assert_eq!(nvme.dev.map(|d| d.to_string()).as_deref(), Some("259:0"));

        let sda = &drives[2];
        assert_eq!(
            sda.serial.as_deref(),
            Some("ZFL1ABCD"),
            "VPD page 0x80 before the WWID"
        );
        assert_eq!(sda.model.as_deref(), Some("ST2000DM008-2FR1"));
        assert!(sda.partitions.is_empty() && sda.holders.is_empty());

        let sdb = &drives[3];
        assert_eq!(sdb.serial.as_deref(), Some("4C530001"));
        assert!(sdb.read_only && sdb.removable);

        assert_eq!(drives[4].serial.as_deref(), Some("naa.600508b1001c"));
        assert_eq!(drives[4].model, None);
        assert_eq!(drives[5].serial.as_deref(), Some("disk-serial"));
        assert_eq!(drives[0].serial.as_deref(), Some("0x1a2b3c4d"));
    }

    #[test]
    fn drive_match_patterns_admit_loop_devices_with_their_backing_file_as_serial() {
        let f = fixture();
        let m = DriveMatch::new(&["loop*".into(), "mmcblk0boot*".into()]).expect("valid");
        let drives = scan(f.path(), &m);
        assert_eq!(
            names(&drives),
            [
                "loop0",
                "mmcblk0",
                "mmcblk0boot0",
                "nvme0n1",
                "sda",
                "sdb",
                "sdd",
                "vda"
            ],
            "loop1 is empty, zram0 and dm-0 are not matched, nvme0c0n1 is hidden"
        );
        assert_eq!(drives[0].serial.as_deref(), Some("/var/tmp/disk0.img"));
        assert_eq!(drives[0].size_bytes, 16 << 20);
    }

    #[test]
    fn read_block_device_reads_one_device_whether_or_not_it_is_a_drive() {
        let f = fixture();
        let sdc = read_block_device(f.path(), "sdc").expect("exists");
        assert_eq!(sdc.size_bytes, 0);
        assert!(sdc.removable);
        assert_eq!(
            read_block_device(f.path(), "zram0").map(|d| d.size_bytes),
            Some(8388608 * 512)
        );
        assert_eq!(read_block_device(f.path(), "nvme0c0n1"), None, "hidden");
        for bad in ["sdq", "", ".", "..", "../sda", "sda/../sda", "nul\0"] {
            assert_eq!(read_block_device(f.path(), bad), None, "{bad:?}");
        }
        // A uevent's DEVNAME has `/` where sysfs has `!`.
        f.disk("cciss!c0d0", "2048", "104:0", &[]);
        let cciss = read_block_device(f.path(), "cciss/c0d0").expect("exists");
        assert_eq!(cciss.name, "cciss!c0d0");
        assert_eq!(cciss.dev_path(), Path::new("/dev/cciss/c0d0"));
    }

    #[test]
    fn unreadable_or_garbled_attributes_are_none_never_a_panic() {
        let f = SysBlock::new();
        // Nothing but the directory.
        f.mkdir("sdx");
        // Garbage everywhere; `size` a directory, `device/model` not UTF-8.
        f.write("sdy/size", "lots\n");
        f.write("sdy/dev", "8\n");
        f.write("sdy/ro", "yes\n");
        f.write("sdy/device/model", b"\xff\xfe\n");
        f.write("sdy/device/serial", "   \n");
        f.write("sdy/device/vpd_pg80", b"\x00\x83\x00\x04ABCD");
        f.write("sdy/holders", "not a directory");
        f.mkdir("sdz/size");
        f.write("sdz/dev", "8:x\n");
        f.write("sdz/device/vpd_pg80", b"\x00\x80");
        f.write("sdz/sdz1/partition", "one\n");
        // A stray file in /sys/block is not a device.
        f.write("stray", "");

        let sdx = read_block_device(f.path(), "sdx").expect("exists");
        assert_eq!(
            sdx,
            BlockDevice {
                name: "sdx".into(),
                dev: None,
                size_bytes: 0,
                model: None,
                serial: None,
                removable: false,
                read_only: false,
                rotational: false,
                has_device: false,
                partitions: vec![],
                holders: vec![],
            }
        );
        let sdy = read_block_device(f.path(), "sdy").expect("exists");
        assert_eq!((sdy.size_bytes, sdy.dev, sdy.read_only), (0, None, false));
        assert_eq!(
            (sdy.model, sdy.serial),
            (None, None),
            "wrong VPD page code, blank serial"
        );
        assert!(sdy.holders.is_empty());
        let sdz = read_block_device(f.path(), "sdz").expect("exists");
        assert_eq!((sdz.size_bytes, sdz.dev, sdz.serial), (0, None, None));
        assert_eq!(sdz.partitions, ["sdz1"]);
        assert_eq!(read_block_device(f.path(), "stray"), None);

        let everything = DriveMatch::new(&["*".into()]).expect("valid");
        assert!(scan(f.path(), &everything).is_empty(), "all of size 0");
        assert!(scan(&f.path().join("missing"), &everything).is_empty());
    }

    #[test]
    fn vpd_page_80_serials() {
        assert_eq!(
            vpd_pg80_serial(b"\x00\x80\x00\x08 ABC123 ").as_deref(),
            Some("ABC123")
        );
        // Length past the end of the page: the rest of the page.
        assert_eq!(
            vpd_pg80_serial(b"\x00\x80\x00\xffABC").as_deref(),
            Some("ABC")
        );
        // Length shorter than the page: only that much.
        assert_eq!(
            vpd_pg80_serial(b"\x00\x80\x00\x02ABCD").as_deref(),
            Some("AB")
        );
        assert_eq!(vpd_pg80_serial(b"\x00\x80\x00\x04\0\0\0\0"), None);
        assert_eq!(vpd_pg80_serial(b"\x00\x80\x00"), None);
        assert_eq!(vpd_pg80_serial(b""), None);
        assert_eq!(
            vpd_pg80_serial(b"\x00\x83\x00\x04ABCD"),
            None,
            "another VPD page"
        );
        assert_eq!(
            vpd_pg80_serial(b"\x00\x80\x00\x04    "),
            None,
            "all padding"
        );
        assert_eq!(vpd_pg80_serial(b"\x00\x80\x00\x02\xff\xfe"), None);
    }

    // -----------------------------------------------------------------------------------------
    // Uevent parsing: real kernel datagrams

    // Captured from a NETLINK_KOBJECT_UEVENT socket in group 1 on Linux 6.18 (Firecracker VM,
    // util-linux 2.38.1, no udevd), sender port id 0:
    //   `losetup --show /dev/loop77 f` (util-linux creates the device with LOOP_CTL_ADD):
    const BDI_ADD: &[u8] = b"add@/devices/virtual/bdi/7:77\0ACTION=add\0DEVPATH=/devices/virtual/bdi/7:77\0SUBSYSTEM=bdi\0SEQNUM=23561\0";
    const LOOP_ADD: &[u8] = b"add@/devices/virtual/block/loop77\0ACTION=add\0DEVPATH=/devices/virtual/block/loop77\0SUBSYSTEM=block\0MAJOR=7\0MINOR=77\0DEVNAME=loop77\0DEVTYPE=disk\0DISKSEQ=15\0SEQNUM=23562\0";
    const LOOP_ATTACH: &[u8] = b"change@/devices/virtual/block/loop77\0ACTION=change\0DEVPATH=/devices/virtual/block/loop77\0SUBSYSTEM=block\0MAJOR=7\0MINOR=77\0DEVNAME=loop77\0DEVTYPE=disk\0DISKSEQ=16\0SEQNUM=23563\0";
    //   `losetup -d /dev/loop77` (the second of the two `change`s):
    const LOOP_DETACH: &[u8] = b"change@/devices/virtual/block/loop77\0ACTION=change\0DEVPATH=/devices/virtual/block/loop77\0SUBSYSTEM=block\0DISK_MEDIA_CHANGE=1\0MAJOR=7\0MINOR=77\0DEVNAME=loop77\0DEVTYPE=disk\0DISKSEQ=16\0SEQNUM=23565\0";
    //   `echo change > /sys/block/loop78/uevent` (a synthetic event):
    const LOOP_SYNTH: &[u8] = b"change@/devices/virtual/block/loop78\0ACTION=change\0DEVPATH=/devices/virtual/block/loop78\0SUBSYSTEM=block\0SYNTH_UUID=0\0MAJOR=7\0MINOR=78\0DEVNAME=loop78\0DEVTYPE=disk\0DISKSEQ=21\0SEQNUM=23603\0";
    //   ioctl(LOOP_CTL_REMOVE, 77):
    const BDI_REMOVE: &[u8] = b"remove@/devices/virtual/bdi/7:77\0ACTION=remove\0DEVPATH=/devices/virtual/bdi/7:77\0SUBSYSTEM=bdi\0SEQNUM=23566\0";
    const LOOP_REMOVE: &[u8] = b"remove@/devices/virtual/block/loop77\0ACTION=remove\0DEVPATH=/devices/virtual/block/loop77\0SUBSYSTEM=block\0MAJOR=7\0MINOR=77\0DEVNAME=loop77\0DEVTYPE=disk\0DISKSEQ=17\0SEQNUM=23567\0";
    //   `losetup -f --show f` took the pre-created, idle loop0: no `add`, only `change`.
    const LOOP0_ATTACH: &[u8] = b"change@/devices/virtual/block/loop0\0ACTION=change\0DEVPATH=/devices/virtual/block/loop0\0SUBSYSTEM=block\0MAJOR=7\0MINOR=0\0DEVNAME=loop0\0DEVTYPE=disk\0DISKSEQ=13\0SEQNUM=23558\0";
    // Not captured: that kernel has no partition table parsers. Written in the same format from
    // the kernel's `part_uevent` (PARTN, PARTNAME) for a partition of a hot-added SATA disk.
    const PARTITION_ADD: &[u8] = b"add@/devices/pci0000:00/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0/block/sdb/sdb1\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0/block/sdb/sdb1\0SUBSYSTEM=block\0MAJOR=8\0MINOR=17\0DEVNAME=sdb1\0DEVTYPE=partition\0DISKSEQ=9\0PARTN=1\0PARTNAME=data\0SEQNUM=4120\0";

    const REAL: &[&[u8]] = &[
        BDI_ADD,
        LOOP_ADD,
        LOOP_ATTACH,
        LOOP_DETACH,
        LOOP_SYNTH,
        BDI_REMOVE,
        LOOP_REMOVE,
        LOOP0_ATTACH,
        PARTITION_ADD,
    ];

    fn loop_event(action: UeventAction, seqnum: u64) -> Uevent {
        Uevent {
            action,
            devpath: "/devices/virtual/block/loop77".into(),
            subsystem: "block".into(),
            devname: Some("loop77".into()),
            devtype: Some("disk".into()),
            seqnum: Some(seqnum),
            dev: Some(DevNumber {
                major: 7,
                minor: 77,
            }),
        }
    }

    #[test]
    fn kernel_uevents_for_a_loop_disk() {
        assert_eq!(
            parse_uevent(LOOP_ADD),
            Ok(loop_event(UeventAction::Add, 23562))
        );
        assert_eq!(
            parse_uevent(LOOP_ATTACH),
            Ok(loop_event(UeventAction::Change, 23563))
        );
        assert_eq!(
            parse_uevent(LOOP_DETACH),
            Ok(loop_event(UeventAction::Change, 23565))
        );
        assert_eq!(
            parse_uevent(LOOP_REMOVE),
            Ok(loop_event(UeventAction::Remove, 23567))
        );
        for bytes in [LOOP_ADD, LOOP_ATTACH, LOOP_DETACH, LOOP_REMOVE] {
            assert_eq!(
                parse_uevent(bytes).expect("parses").block_disk(),
                Some("loop77")
            );
        }
        let synth = parse_uevent(LOOP_SYNTH).expect("parses");
        assert_eq!(
            (&synth.action, synth.block_disk()),
            (&UeventAction::Change, Some("loop78"))
        );
        let loop0 = parse_uevent(LOOP0_ATTACH).expect("parses");
        assert_eq!(
            (&loop0.action, loop0.block_disk()),
            (&UeventAction::Change, Some("loop0"))
        );
    }

    #[test]
    fn uevents_that_are_not_about_a_disk() {
        let bdi = parse_uevent(BDI_ADD).expect("parses");
        assert_eq!(
            bdi,
            Uevent {
                action: UeventAction::Add,
                devpath: "/devices/virtual/bdi/7:77".into(),
                subsystem: "bdi".into(),
                devname: None,
                devtype: None,
                seqnum: Some(23561),
                dev: None,
            }
        );
        assert_eq!(bdi.block_disk(), None);
        assert_eq!(
            parse_uevent(BDI_REMOVE).expect("parses").action,
            UeventAction::Remove
        );
        let part = parse_uevent(PARTITION_ADD).expect("parses");
        assert_eq!(part.devname.as_deref(), Some("sdb1"));
        assert_eq!(part.devtype.as_deref(), Some("partition"));
        assert_eq!(
            part.dev,
            Some(DevNumber {
                major: 8,
                minor: 17
            })
        );
        assert_eq!(part.block_disk(), None, "a partition is not a disk");
        let other = parse_uevent(b"offline@/devices/system/cpu/cpu1\0ACTION=offline\0DEVPATH=/devices/system/cpu/cpu1\0SUBSYSTEM=cpu\0SEQNUM=7\0")
            .expect("parses");
        assert_eq!(other.action, UeventAction::Other("offline".into()));
    }

    #[test]
    fn uevent_format_edge_cases_that_still_parse() {
        // No trailing NUL, fields without `=`, unknown and non-UTF-8 fields the parser does not
        // use.
        let ev = parse_uevent(
            b"add@/devices/x\0junk\0ODD=\xff\xfe\0SUBSYSTEM=block\0DEVNAME=x\0DEVTYPE=disk",
        )
        .expect("parses");
        assert_eq!(ev.block_disk(), Some("x"));
        assert_eq!(ev.seqnum, None);
        // Header alone supplies ACTION and DEVPATH.
        let ev = parse_uevent(b"remove@/devices/y\0SUBSYSTEM=block\0").expect("parses");
        assert_eq!(
            (ev.action, ev.devpath.as_str()),
            (UeventAction::Remove, "/devices/y")
        );
        // Empty optional fields are absent; only MAJOR without MINOR is no device number.
        let ev = parse_uevent(b"add@/d\0SUBSYSTEM=block\0DEVNAME=\0MAJOR=8\0").expect("parses");
        assert_eq!((ev.devname, ev.dev), (None, None));
        // Exactly at the size limit.
        let mut big = b"change@/d\0SUBSYSTEM=block\0X=".to_vec();
        big.resize(MAX_UEVENT_LEN, b'a');
        assert!(parse_uevent(&big).is_ok());
    }

    #[test]
    fn malformed_uevents_are_typed_errors() {
        use UeventError::*;
        let cases: &[(&[u8], UeventError)] = &[
            (b"", NoSeparator),
            (b"\0\0\0", NoSeparator),
            (b"add /devices/x\0SUBSYSTEM=block\0", NoSeparator),
            (b"libudev\0\xfe\xed\xca\xfe\x28\0\0\0", Libudev),
            (
                b"@/devices/x\0SUBSYSTEM=block\0",
                Missing { field: "ACTION" },
            ),
            (b"add@\0SUBSYSTEM=block\0", Missing { field: "DEVPATH" }),
            (
                b"add@/devices/x\0ACTION=add\0",
                Missing { field: "SUBSYSTEM" },
            ),
            (
                b"add@/devices/x\0SUBSYSTEM=\0",
                Missing { field: "SUBSYSTEM" },
            ),
            (
                b"a\xffd@/devices/x\0SUBSYSTEM=block\0",
                NotUtf8 { field: "ACTION" },
            ),
            (
                b"add@/dev\xc3ces/x\0SUBSYSTEM=block\0",
                NotUtf8 { field: "DEVPATH" },
            ),
            (
                b"add@/x\0SUBSYSTEM=bl\xffck\0",
                NotUtf8 { field: "SUBSYSTEM" },
            ),
            (
                b"add@/x\0SUBSYSTEM=block\0DEVNAME=sd\xff\0",
                NotUtf8 { field: "DEVNAME" },
            ),
            (
                b"add@/x\0SUBSYSTEM=block\0ACTION=remove\0",
                Mismatch { field: "ACTION" },
            ),
            (
                b"add@/x\0SUBSYSTEM=block\0DEVPATH=/y\0",
                Mismatch { field: "DEVPATH" },
            ),
            (
                b"add@/x\0SUBSYSTEM=block\0SEQNUM=12a\0",
                BadNumber { field: "SEQNUM" },
            ),
            (
                b"add@/x\0SUBSYSTEM=block\0SEQNUM=-1\0",
                BadNumber { field: "SEQNUM" },
            ),
            (
                b"add@/x\0SUBSYSTEM=block\0MAJOR=99999999999\0MINOR=1\0",
                BadNumber { field: "MAJOR" },
            ),
            (
                b"add@/x\0SUBSYSTEM=block\0MAJOR=8\0MINOR=\xff\0",
                NotUtf8 { field: "MINOR" },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                parse_uevent(bytes).as_ref(),
                Err(want),
                "{}",
                bytes.escape_ascii()
            );
        }
        let mut big = LOOP_ADD.to_vec();
        big.resize(MAX_UEVENT_LEN + 1, 0);
        assert_eq!(
            parse_uevent(&big),
            Err(Oversized {
                len: MAX_UEVENT_LEN + 1
            })
        );
        assert!(Oversized { len: 9000 }.to_string().contains("9000"));
    }

    /// What the fuzz target checks, on 20,000 deterministic mutations of the real datagrams, so CI
    /// (which has no nightly compiler) runs it too.
    #[test]
    fn mutated_uevents_never_panic() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        let mut next = move |bound: usize| rng.random_range(0..bound.max(1));
        let mut parsed = 0;
        for i in 0..20_000 {
            let mut bytes = REAL[i % REAL.len()].to_vec();
            for _ in 0..=next(4) {
                let at = next(bytes.len() + 1);
                match next(6) {
                    0 => bytes.insert(at, [0, b'@', b'=', 0xff, b'a'][next(5)]),
                    1 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    2 if at < bytes.len() => bytes[at] ^= 1 << next(8),
                    3 => bytes.truncate(at),
                    4 => {
                        let chunk = bytes[at..]
                            .iter()
                            .take(next(64))
                            .copied()
                            .collect::<Vec<_>>();
                        bytes.splice(at..at, chunk);
                    }
                    _ if at < bytes.len() => bytes[at] = 0,
                    _ => bytes.push(0),
                }
            }
            if let Ok(ev) = parse_uevent(&bytes) {
                parsed += 1;
                assert!(!ev.devpath.is_empty() && !ev.subsystem.is_empty());
                assert_ne!(ev.action, UeventAction::Other(String::new()));
                if ev.block_disk().is_some() {
                    assert_eq!(ev.subsystem, "block");
                }
            }
        }
        assert!(
            parsed > 1000,
            "mutations should often keep a datagram valid ({parsed})"
        );
    }

    // -----------------------------------------------------------------------------------------
    // Host tests: the real kernel. They need root (loop devices, writing uevent files).

    mod host {
        use std::{
            process::Command,
            sync::atomic::{AtomicU32, Ordering},
            time::Duration,
        };

        use nix::sys::socket::MsgFlags;
        use shoal_testkit::{cmd, require, skip, wait, wait_async, Missing};
        use tokio::time::Instant;

        use super::*;

        const DEADLINE: Duration = Duration::from_secs(5);

        /// What these tests need: root (loop devices, uevent files) and `losetup`.
        fn host() -> Result<(), Missing> {
            skip::root()?;
            skip::tool("losetup", "mount")?;
            Ok(())
        }

        // LOOP_CTL_REMOVE from <linux/loop.h>: deletes an unbound loop device, which is the only
        // way to make the kernel send `remove` for one (losetup has no option for it). nix has the
        // ioctl macro but calling what it generates is unsafe, hence the allow on the caller.
        nix::ioctl_write_int_bad!(loop_ctl_remove, 0x4C81);

        /// A 16 MiB file attached to a loop device; detached (and the device deleted, when this
        /// test created it) on drop, even after a failed assertion.
        struct Loop {
            name: String,
            number: u32,
            created: bool,
            attached: bool,
            file: tempfile::NamedTempFile,
        }

        fn backing_file() -> tempfile::NamedTempFile {
            let file = tempfile::NamedTempFile::new().expect("temp file");
            file.as_file().set_len(16 << 20).expect("set_len");
            file
        }

        fn losetup_command() -> Command {
            Command::new(skip::find_program("losetup").unwrap_or_else(|| "losetup".into()))
        }

        fn losetup(args: &[&str]) -> String {
            let out = cmd::run(losetup_command().args(args)).unwrap_or_else(|e| panic!("{e:#}"));
            out.trim().to_owned()
        }

        impl Loop {
            /// A loop device that does not exist yet, so the kernel adds it: util-linux's losetup
            /// creates `/dev/loopN` with LOOP_CTL_ADD when it is missing.
            fn create() -> Self {
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let mut number =
                    2000 + std::process::id() % 4000 * 8 + NEXT.fetch_add(1, Ordering::Relaxed);
                while Path::new(&format!("/sys/block/loop{number}")).exists()
                    || Path::new(&format!("/dev/loop{number}")).exists()
                {
                    number += 1;
                }
                let file = backing_file();
                let path = file.path().to_str().expect("UTF-8 temp path").to_owned();
                let shown = losetup(&["--show", &format!("/dev/loop{number}"), &path]);
                assert_eq!(shown, format!("/dev/loop{number}"));
                Self {
                    name: format!("loop{number}"),
                    number,
                    created: true,
                    attached: true,
                    file,
                }
            }

            /// The brief's way: `losetup -f --show`, whichever device the kernel hands out.
            fn find_free() -> Self {
                let file = backing_file();
                let path = file.path().to_str().expect("UTF-8 temp path").to_owned();
                let shown = losetup(&["-f", "--show", &path]);
                let name = shown.trim_start_matches("/dev/").to_owned();
                let number = name
                    .trim_start_matches("loop")
                    .parse()
                    .expect("a loop device");
                Self {
                    name,
                    number,
                    created: false,
                    attached: true,
                    file,
                }
            }

            fn detach(&mut self) {
                losetup(&["-d", &format!("/dev/{}", self.name)]);
                self.attached = false;
            }

            /// Delete the (detached) device. The kernel may hold it busy for a moment after the
            /// detach; retried until the deadline.
            #[allow(unsafe_code)]
            fn remove(&mut self) -> anyhow::Result<()> {
                let control = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/loop-control")?;
                let number = i32::try_from(self.number)?;
                wait::eventually(DEADLINE, "the kernel to let the loop device go", || {
                    // SAFETY: an int-argument ioctl on a file we own; no memory is passed.
                    match unsafe { loop_ctl_remove(control.as_raw_fd(), number) } {
                        Ok(_) => Ok(()),
                        Err(Errno::EBUSY) => Err(anyhow::anyhow!("LOOP_CTL_REMOVE: busy")),
                        Err(err) => Err(wait::abort(format!("LOOP_CTL_REMOVE: {err}"))),
                    }
                })?;
                self.created = false;
                Ok(())
            }

            fn backing_path(&self) -> String {
                let path = fs::canonicalize(self.file.path()).expect("canonical path");
                path.to_str().expect("UTF-8").to_owned()
            }
        }

        impl Drop for Loop {
            fn drop(&mut self) {
                if self.attached {
                    let _ =
                        cmd::run(losetup_command().args(["-d", &format!("/dev/{}", self.name)]));
                }
                if self.created {
                    let _ = self.remove();
                }
            }
        }

        /// The next uevent about the whole disk `name`, within the deadline.
        async fn next_for(sock: &UeventSocket, name: &str, deadline: Instant) -> Uevent {
            loop {
                match tokio::time::timeout_at(deadline, sock.recv()).await {
                    Err(_) => panic!("no uevent for {name} within {DEADLINE:?}"),
                    Ok(Err(err)) => panic!("uevent socket: {err}"),
                    Ok(Ok(ev)) if ev.block_disk() == Some(name) => return ev,
                    Ok(Ok(_)) => {}
                }
            }
        }

        /// Polls `scan` until `check` holds or the deadline passes; each scan that does not
        /// satisfy it (and differs from the one before) is printed, so a failure shows them.
        async fn eventually_scanned(
            matcher: &DriveMatch,
            what: &str,
            check: impl Fn(&[BlockDevice]) -> bool,
        ) {
            let mut last = String::new();
            wait_async::eventually(DEADLINE, what, || {
                let drives = scan(Path::new("/sys/block"), matcher);
                let done = check(&drives);
                let scanned = format!("{drives:?}");
                if !done && scanned != last {
                    println!("not yet {what}; scanned {scanned}");
                    last = scanned;
                }
                std::future::ready(done.then_some(()))
            })
            .await;
        }

        #[tokio::test]
        async fn loop_disk_added_changed_and_removed_is_seen_in_uevents_and_scan() {
            require!(host());
            let sock = UeventSocket::bind().expect("bind uevent socket");
            let mut dev = Loop::create();
            let name = dev.name.clone();

            let add = next_for(&sock, &name, Instant::now() + DEADLINE).await;
            assert_eq!(add.action, UeventAction::Add, "{add:?}");
            assert_eq!(add.devpath, format!("/devices/virtual/block/{name}"));
            assert_eq!(
                add.dev,
                Some(DevNumber {
                    major: 7,
                    minor: dev.number
                })
            );
            assert!(add.seqnum.is_some());
            // Attaching the file changes the device's size: `change`.
            let attach = next_for(&sock, &name, Instant::now() + DEADLINE).await;
            assert_eq!(attach.action, UeventAction::Change, "{attach:?}");
            assert!(attach.seqnum > add.seqnum);

            // Not a drive by default; one with `--drive-match loop*`, its backing file as serial.
            let physical = scan(Path::new("/sys/block"), &DriveMatch::default());
            assert!(physical.iter().all(|d| d.name != name), "{physical:?}");
            let loops = DriveMatch::new(&["loop*".into()]).expect("valid");
            let found = scan(Path::new("/sys/block"), &loops);
            let drive = found
                .iter()
                .find(|d| d.name == name)
                .expect("scan finds the loop device");
            assert_eq!(drive.size_bytes, 16 << 20);
            assert_eq!(drive.serial, Some(dev.backing_path()));
            assert_eq!(drive.dev, add.dev);
            assert_eq!(drive.dev_path(), Path::new("/dev").join(&name));
            assert!(!drive.read_only && !drive.removable);
            assert!(drive.partitions.is_empty() && drive.holders.is_empty());

            // Detaching: `change`, and the device (still there, size 0) is no longer a drive.
            dev.detach();
            let detach = next_for(&sock, &name, Instant::now() + DEADLINE).await;
            assert_eq!(detach.action, UeventAction::Change, "{detach:?}");
            eventually_scanned(&loops, "detached loop device is no drive", |d| {
                d.iter().all(|d| d.name != name)
            })
            .await;
            assert_eq!(
                read_block_device(Path::new("/sys/block"), &name).map(|d| d.size_bytes),
                Some(0)
            );

            // Deleting the device: `remove`.
            dev.remove().expect("LOOP_CTL_REMOVE");
            let deadline = Instant::now() + DEADLINE;
            loop {
                let ev = next_for(&sock, &name, deadline).await;
                if ev.action == UeventAction::Remove {
                    assert_eq!(ev.devpath, format!("/devices/virtual/block/{name}"));
                    break;
                }
                assert_eq!(ev.action, UeventAction::Change, "{ev:?}");
            }
            assert_eq!(read_block_device(Path::new("/sys/block"), &name), None);
        }

        /// `losetup -f` hands out an idle device the kernel made at boot when there is one: the
        /// kernel then says `change`, not `add`. A drive manager must look at `change` too.
        #[tokio::test]
        async fn losetup_find_free_shows_up_as_add_or_change() {
            require!(host());
            let sock = UeventSocket::bind().expect("bind uevent socket");
            let mut dev = Loop::find_free();
            let name = dev.name.clone();
            let ev = next_for(&sock, &name, Instant::now() + DEADLINE).await;
            assert!(
                matches!(ev.action, UeventAction::Add | UeventAction::Change),
                "{ev:?}"
            );
            println!("losetup -f gave {name}: first uevent {:?}", ev.action);
            let loops = DriveMatch::new(&["loop*".into()]).expect("valid");
            let serial = dev.backing_path();
            eventually_scanned(&loops, "attached loop device is a drive", |d| {
                d.iter()
                    .any(|d| d.name == name && d.serial.as_deref() == Some(serial.as_str()))
            })
            .await;
            dev.detach();
            let ev = next_for(&sock, &name, Instant::now() + DEADLINE).await;
            assert_eq!(ev.action, UeventAction::Change, "{ev:?}");
        }

        /// Only the kernel's datagrams count: one forged by a (root) process is dropped.
        #[tokio::test]
        async fn uevents_not_from_the_kernel_are_dropped() {
            require!(host());
            // The device first, so that its own uevents come before the socket exists.
            let dev = Loop::create();
            let sock = UeventSocket::bind().expect("bind uevent socket");
            let ours: NetlinkAddr = socket::getsockname(sock.fd.as_raw_fd()).expect("getsockname");
            let forger = socket::socket(
                AddressFamily::Netlink,
                SockType::Datagram,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::NetlinkKObjectUEvent,
            )
            .expect("socket");
            let forged = b"add@/devices/virtual/block/forged0\0ACTION=add\0DEVPATH=/devices/virtual/block/forged0\0SUBSYSTEM=block\0DEVNAME=forged0\0DEVTYPE=disk\0SEQNUM=1\0";
            let dest = NetlinkAddr::new(ours.pid(), 0);
            socket::sendto(forger.as_raw_fd(), forged, &dest, MsgFlags::empty()).expect("sendto");
            fs::write(format!("/sys/block/{}/uevent", dev.name), "change")
                .expect("trigger a uevent");
            let deadline = Instant::now() + DEADLINE;
            loop {
                let ev = match tokio::time::timeout_at(deadline, sock.recv()).await {
                    Err(_) => panic!("no synthetic change for {} within {DEADLINE:?}", dev.name),
                    Ok(result) => result.expect("recv"),
                };
                assert_ne!(
                    ev.devname.as_deref(),
                    Some("forged0"),
                    "forged uevent accepted: {ev:?}"
                );
                if ev.block_disk() == Some(dev.name.as_str()) && ev.action == UeventAction::Change {
                    break;
                }
            }
        }

        /// A receive buffer that overflows surfaces as `Overrun`, once, and the socket keeps
        /// working.
        #[tokio::test]
        async fn overflow_is_reported_as_overrun() {
            require!(host());
            let sock = UeventSocket::bind_with_receive_buffer(0).expect("bind uevent socket");
            let dev = Loop::create();
            let uevent = format!("/sys/block/{}/uevent", dev.name);
            for _ in 0..100 {
                fs::write(&uevent, "change").expect("trigger a uevent");
            }
            let first = tokio::time::timeout(DEADLINE, sock.recv())
                .await
                .expect("an answer within the deadline");
            assert!(matches!(first, Err(UeventRecvError::Overrun)), "{first:?}");
            // Still usable: drain what was queued, then a new event arrives.
            fs::write(&uevent, "change").expect("trigger a uevent");
            let deadline = Instant::now() + DEADLINE;
            loop {
                match tokio::time::timeout_at(deadline, sock.recv()).await {
                    Err(_) => panic!("no uevent after the overrun within {DEADLINE:?}"),
                    Ok(Ok(ev)) if ev.block_disk() == Some(dev.name.as_str()) => break,
                    Ok(Ok(_) | Err(UeventRecvError::Overrun)) => {}
                    Ok(Err(err)) => panic!("uevent socket: {err}"),
                }
            }
        }
    }
}
