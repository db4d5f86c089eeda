//! Value types shared by agent, controller and shoalctl.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct UnixMillis(pub u64);

/// A node's identity in the fleet, assigned by the controller at first enrolment and kept for life.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a machine's identity came from, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HardwareIdSource {
    /// Given on the command line (`--machine-id`), for several agents on one host.
    Override,
    /// SMBIOS/DMI system UUID.
    DmiUuid,
    /// `/etc/machine-id`.
    MachineId,
    /// The lowest permanent MAC address.
    Mac,
}

/// A machine's stable identity, the key that keeps a re-enrolling machine on its old record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HardwareId {
    /// Where it came from.
    pub source: HardwareIdSource,
    /// The value, normalised to lower case.
    pub value: String,
}

impl std::fmt::Display for HardwareId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match self.source {
            HardwareIdSource::Override => "override",
            HardwareIdSource::DmiUuid => "dmi-uuid",
            HardwareIdSource::MachineId => "machine-id",
            HardwareIdSource::Mac => "mac",
        };
        write!(f, "{source}:{}", self.value)
    }
}

/// Firmware the machine booted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootMode {
    /// Legacy BIOS.
    #[default]
    Bios,
    /// UEFI (`/sys/firmware/efi` exists).
    Uefi,
}

/// DMI/SMBIOS identification; fields are `None` where firmware leaves them empty or unreadable.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Dmi {
    /// `sys_vendor`.
    pub vendor: Option<String>,
    /// `product_name`.
    pub product: Option<String>,
    /// `product_serial`.
    pub serial: Option<String>,
    /// `product_uuid`.
    pub uuid: Option<String>,
}

/// One block device from `/sys/block`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BlockDevice {
    /// Kernel name (`sda`, `nvme0n1`).
    pub name: String,
    /// Model string.
    pub model: Option<String>,
    /// Serial number.
    pub serial: Option<String>,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Spinning disk (`queue/rotational`).
    pub rotational: bool,
    /// Removable media.
    pub removable: bool,
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetInterface {
    /// Interface name.
    pub name: String,
    /// Current MAC address, lower case, colon separated.
    pub mac: Option<String>,
    /// Whether the MAC is the burnt-in one (`addr_assign_type` 0).
    pub permanent_mac: bool,
    /// Link speed in Mb/s when the link is up and the driver reports it.
    pub speed_mbps: Option<u32>,
    /// Operational state is up.
    pub up: bool,
    /// Addresses in CIDR form (`192.0.2.4/24`, `fe80::1/64`).
    pub addresses: Vec<String>,
}

/// What a machine is: sent on connect and when it changes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Inventory {
    /// Hostname.
    pub hostname: String,
    /// OS name and version (`Debian GNU/Linux 12`).
    pub os: String,
    /// Kernel release.
    pub kernel: String,
    /// CPU architecture (`x86_64`).
    pub arch: String,
    /// CPU model string.
    pub cpu_model: String,
    /// Logical CPUs.
    pub cpu_cores: u32,
    /// Physical cores, when known.
    pub cpu_physical_cores: Option<u32>,
    /// Installed memory in bytes.
    pub memory_bytes: u64,
    /// Block devices (not partitions, loop or ram devices).
    pub disks: Vec<BlockDevice>,
    /// Network interfaces (loopback excluded).
    pub nics: Vec<NetInterface>,
    /// DMI identification.
    pub dmi: Dmi,
    /// Firmware boot mode.
    pub boot_mode: BootMode,
}

/// Usage of one mounted filesystem.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FilesystemUsage {
    /// Mount point.
    pub mount: String,
    /// Source device.
    pub device: String,
    /// Filesystem type.
    pub fs_type: String,
    /// Size in bytes.
    pub total_bytes: u64,
    /// Bytes available to unprivileged users.
    pub available_bytes: u64,
}

impl FilesystemUsage {
    /// Percentage of the filesystem in use, as `df` counts it.
    pub fn used_percent(&self) -> f64 {
        if self.total_bytes == 0 {
            return 0.0;
        }
        let used = self.total_bytes.saturating_sub(self.available_bytes);
        used as f64 * 100.0 / self.total_bytes as f64
    }
}

/// Load averages.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LoadAverage {
    /// One minute.
    pub one: f64,
    /// Five minutes.
    pub five: f64,
    /// Fifteen minutes.
    pub fifteen: f64,
}

/// A periodic health report; also the heartbeat.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HealthReport {
    /// When the agent took it.
    pub at: UnixMillis,
    /// Seconds since boot.
    pub uptime_secs: u64,
    /// Load averages.
    pub load: LoadAverage,
    /// CPU use over the last interval, 0–100 across all CPUs.
    pub cpu_percent: f32,
    /// Total memory.
    pub memory_total_bytes: u64,
    /// Memory available for new work (`MemAvailable`).
    pub memory_available_bytes: u64,
    /// Total swap.
    pub swap_total_bytes: u64,
    /// Swap in use.
    pub swap_used_bytes: u64,
    /// PSI `some avg10` for memory (percent of time some task stalled on memory), where the kernel
    /// has it.
    pub memory_pressure_avg10: Option<f32>,
    /// Mounted filesystems backed by storage (no proc, sysfs, tmpfs...).
    pub filesystems: Vec<FilesystemUsage>,
}

impl HealthReport {
    /// Percentage of memory in use (not available).
    pub fn memory_used_percent(&self) -> f64 {
        if self.memory_total_bytes == 0 {
            return 0.0;
        }
        let used = self
            .memory_total_bytes
            .saturating_sub(self.memory_available_bytes);
        used as f64 * 100.0 / self.memory_total_bytes as f64
    }
}
