//! What a machine is: hardware and OS inventory read from procfs, sysfs and `/etc`, and the
//! machine's stable hardware identity.
//!
//! Every reader takes its roots from [`SysRoots`] so tests can point it at a fixture tree. Parsers
//! are pure functions over `&str`; the file reading around them is thin. Nothing here panics on
//! what the system says: a missing or unreadable file becomes `None`, an empty list or an empty
//! string.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nix::sys::socket::SockaddrStorage;
use shoal_proto::{
    BlockDevice, BootMode, Dmi, HardwareId, HardwareIdSource, Inventory, NetInterface,
};
use tracing::warn;

use crate::{
    blockdev,
    sysfs::{read_attr, read_text},
};

/// Where the agent finds the kernel's and the OS's view of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysRoots {
    /// sysfs. Default `/sys`.
    pub sys: PathBuf,
    /// procfs. Default `/proc`.
    pub proc: PathBuf,
    /// The configuration directory holding `os-release` and `machine-id`. Default `/etc`.
    pub etc: PathBuf,
}

impl Default for SysRoots {
    fn default() -> Self {
        Self {
            sys: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
            etc: PathBuf::from("/etc"),
        }
    }
}

/// Collects the machine's inventory. Never fails: what cannot be read is left empty.
///
/// Disks and NICs are sorted by name so that an unchanged machine yields an equal `Inventory`.
pub fn collect_inventory(roots: &SysRoots) -> Inventory {
    let cpu = read_text(&roots.proc.join("cpuinfo"))
        .map(|text| parse_cpuinfo(&text))
        .unwrap_or_default();
    let (cpu_model, cpu_cores) = cpu_with_fallback(roots, cpu.model, cpu.logical);
    let memory_bytes = read_text(&roots.proc.join("meminfo"))
        .and_then(|text| crate::health::parse_meminfo(&text).total_bytes)
        .unwrap_or(0);
    Inventory {
        hostname: hostname(),
        os: os_name(roots),
        kernel: read_attr(&roots.proc.join("sys/kernel/osrelease")).unwrap_or_default(),
        arch: std::env::consts::ARCH.to_owned(),
        cpu_model,
        cpu_cores,
        cpu_physical_cores: cpu.physical,
        memory_bytes,
        disks: collect_disks(&roots.sys),
        // Addresses always come from the running kernel; sysfs has none.
        nics: collect_nics(&roots.sys, &interface_addresses()),
        dmi: collect_dmi(&roots.sys),
        boot_mode: if roots.sys.join("firmware/efi").exists() {
            BootMode::Uefi
        } else {
            BootMode::Bios
        },
    }
}

/// The machine's stable identity, strongest source first: the override, the DMI system UUID,
/// `/etc/machine-id`, then the lowest permanent MAC among `nics`. `None` if none of them is usable.
///
/// Firmware placeholder UUIDs (all zeros, all `f`, well-known vendor defaults) are skipped because
/// many machines share them. Note that `product_uuid` is readable only by root, so an unprivileged
/// agent falls through to `machine-id`.
pub fn hardware_id(
    override_id: Option<&str>,
    roots: &SysRoots,
    nics: &[NetInterface],
) -> Option<HardwareId> {
    let id = |source, value: String| Some(HardwareId { source, value });
    if let Some(value) = override_id.map(str::trim).filter(|v| !v.is_empty()) {
        return id(HardwareIdSource::Override, value.to_lowercase());
    }
    if let Some(uuid) = read_attr(&roots.sys.join("class/dmi/id/product_uuid"))
        .map(|u| u.to_lowercase())
        .filter(|u| is_usable_dmi_uuid(u))
    {
        return id(HardwareIdSource::DmiUuid, uuid);
    }
    if let Some(machine_id) = read_attr(&roots.etc.join("machine-id"))
        .map(|m| m.to_lowercase())
        .filter(|m| is_valid_machine_id(m))
    {
        return id(HardwareIdSource::MachineId, machine_id);
    }
    nics.iter()
        .filter(|nic| nic.permanent_mac)
        .filter_map(|nic| nic.mac.as_deref())
        .min()
        .and_then(|mac| id(HardwareIdSource::Mac, mac.to_owned()))
}

// ---------------------------------------------------------------------------------------------
// OS, kernel, CPU

fn hostname() -> String {
    match nix::unistd::gethostname() {
        Ok(name) => name.to_string_lossy().into_owned(),
        Err(err) => {
            warn!(cause = %err, "cannot read hostname");
            String::new()
        }
    }
}

/// The OS name from `etc/os-release`, or `usr/lib/os-release` beside `etc` as os-release(5) says.
fn os_name(roots: &SysRoots) -> String {
    let fallback = roots.etc.parent().map(|p| p.join("usr/lib/os-release"));
    read_text(&roots.etc.join("os-release"))
        .or_else(|| fallback.and_then(|p| read_text(&p)))
        .map(|text| parse_os_release(&text))
        .unwrap_or_default()
}

/// `PRETTY_NAME`, else `NAME VERSION_ID`, else `NAME`; empty if the file names nothing.
fn parse_os_release(text: &str) -> String {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            fields.insert(key.trim(), unquote_shell(value.trim()));
        }
    }
    let get = |key: &str| {
        fields
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    if let Some(pretty) = get("PRETTY_NAME") {
        return pretty.to_owned();
    }
    match (get("NAME"), get("VERSION_ID")) {
        (Some(name), Some(version)) => format!("{name} {version}"),
        (Some(name), None) => name.to_owned(),
        _ => String::new(),
    }
}

/// Strips the shell-style quoting os-release allows: `"..."` with backslash escapes, or `'...'`.
pub(crate) fn unquote_shell(value: &str) -> String {
    if let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                if let Some(escaped) = chars.next() {
                    out.push(escaped);
                }
            } else {
                out.push(c);
            }
        }
        return out;
    }
    if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        return inner.to_owned();
    }
    value.to_owned()
}

/// What `/proc/cpuinfo` says about the CPUs.
#[derive(Debug, Default, PartialEq, Eq)]
struct CpuInfo {
    model: Option<String>,
    logical: u32,
    physical: Option<u32>,
}

fn parse_cpuinfo(text: &str) -> CpuInfo {
    let fields = || {
        text.lines().filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            Some((key.trim(), value.trim()))
        })
    };
    // x86 and most others say "model name"; the rest are what older ARM, MIPS, POWER and RISC-V
    // kernels use instead. aarch64 has none of them and falls back to sysinfo.
    let model = ["model name", "Processor", "cpu model", "cpu", "uarch"]
        .iter()
        .find_map(|wanted| {
            fields()
                .find(|(key, value)| key == wanted && !value.is_empty())
                .map(|(_, value)| value.to_owned())
        });
    let logical = fields().filter(|(key, _)| *key == "processor").count();

    // A core is a (package, core) pair; hyperthreads share one. Blocks are separated by blank
    // lines.
    let mut cores = BTreeSet::new();
    let (mut package, mut core) = (None, None);
    for line in text.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if let Some(core) = core.take() {
                cores.insert((package.take().unwrap_or("0"), core));
            }
            package = None;
            continue;
        }
        match line.split_once(':').map(|(k, v)| (k.trim(), v.trim())) {
            Some(("physical id", value)) => package = Some(value),
            Some(("core id", value)) => core = Some(value),
            _ => {}
        }
    }
    CpuInfo {
        model,
        logical: u32::try_from(logical).unwrap_or(u32::MAX),
        physical: (!cores.is_empty()).then(|| u32::try_from(cores.len()).unwrap_or(u32::MAX)),
    }
}

/// Fills a model or core count procfs did not give from sysinfo, but only when reading the real
/// `/proc`: against a fixture it would mix in the test machine.
fn cpu_with_fallback(roots: &SysRoots, model: Option<String>, logical: u32) -> (String, u32) {
    if (model.is_some() && logical > 0) || roots.proc != Path::new("/proc") {
        return (model.unwrap_or_default(), logical);
    }
    use sysinfo::{CpuRefreshKind, RefreshKind, System};
    let system =
        System::new_with_specifics(RefreshKind::nothing().with_cpu(CpuRefreshKind::nothing()));
    let model = model
        .or_else(|| {
            system
                .cpus()
                .first()
                .map(|cpu| cpu.brand().trim().to_owned())
        })
        .unwrap_or_default();
    let logical = if logical > 0 {
        logical
    } else {
        u32::try_from(system.cpus().len()).unwrap_or(u32::MAX)
    };
    (model, logical)
}

// ---------------------------------------------------------------------------------------------
// Block devices

/// Whole disks from `sys/block` ([`blockdev::scan_disks`], the scan the drive report uses too),
/// without loop, ram and zram devices, without virtual devices (device-mapper, md, nbd: they have
/// no `device` link and duplicate the disks beneath them), and without empty drives (size 0: an
/// optical or card reader with no medium).
///
/// This rule differs from the drive report's ([`blockdev::DriveMatch`]) on purpose: the inventory
/// says what hardware the machine has, so optical drives with a medium, floppies and eMMC boot
/// areas are listed, and `--drive-match` (which admits loop devices to the drive manager on test
/// rigs) does not apply.
fn collect_disks(sys: &Path) -> Vec<BlockDevice> {
    blockdev::scan_disks(&sys.join("block"))
        .into_iter()
        .filter(is_inventory_disk)
        .map(|disk| BlockDevice {
            name: disk.name,
            model: disk.model,
            serial: disk.serial,
            size_bytes: disk.size_bytes,
            rotational: disk.rotational,
            removable: disk.removable,
        })
        .collect()
}

fn is_inventory_disk(disk: &blockdev::BlockDevice) -> bool {
    !["loop", "ram", "zram"]
        .iter()
        .any(|p| disk.name.starts_with(p))
        && disk.has_device
        && disk.size_bytes > 0
}

// ---------------------------------------------------------------------------------------------
// Network interfaces

/// Interfaces from `sys/class/net` except `lo`, with `addresses` looked up by name.
fn collect_nics(sys: &Path, addresses: &HashMap<String, Vec<String>>) -> Vec<NetInterface> {
    let net = sys.join("class/net");
    let entries = match fs::read_dir(&net) {
        Ok(entries) => entries,
        Err(err) => {
            warn!(path = %net.display(), cause = %err, "cannot list network interfaces");
            return Vec::new();
        }
    };
    let mut nics: Vec<NetInterface> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name != "lo")
        .map(|name| {
            let dir = net.join(&name);
            read_nic(
                &dir,
                name.clone(),
                addresses.get(&name).cloned().unwrap_or_default(),
            )
        })
        .collect();
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    nics
}

fn read_nic(dir: &Path, name: String, addresses: Vec<String>) -> NetInterface {
    let operstate = read_attr(&dir.join("operstate"));
    // tun/tap and some virtual drivers never report an operstate; carrier is the truth there.
    // Reading `carrier` or `speed` fails with EINVAL while the interface is down, hence `None`.
    let up = match operstate.as_deref() {
        Some("up") => true,
        Some("unknown") => read_attr(&dir.join("carrier")).as_deref() == Some("1"),
        _ => false,
    };
    NetInterface {
        name,
        mac: read_attr(&dir.join("address")).and_then(|a| parse_mac(&a)),
        permanent_mac: read_attr(&dir.join("addr_assign_type")).as_deref() == Some("0"),
        speed_mbps: read_attr(&dir.join("speed")).and_then(|s| parse_speed(&s)),
        up,
        addresses,
    }
}

/// A 6-byte MAC in lower case; `None` for all zeros (no address) and for other hardware address
/// forms (tunnels show their IPv4 address there, InfiniBand 20 bytes).
fn parse_mac(text: &str) -> Option<String> {
    let mac = text.trim().to_lowercase();
    let octets: Vec<&str> = mac.split(':').collect();
    let well_formed = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()));
    (well_formed && octets.iter().any(|o| *o != "00")).then_some(mac)
}

/// Link speed in Mb/s; the kernel writes -1 (or `u32::MAX`) when it does not know.
fn parse_speed(text: &str) -> Option<u32> {
    let speed: i64 = text.trim().parse().ok()?;
    u32::try_from(speed)
        .ok()
        .filter(|s| *s > 0 && *s != u32::MAX)
}

/// Addresses of every interface in CIDR form, from the running kernel.
fn interface_addresses() -> HashMap<String, Vec<String>> {
    let mut by_name: HashMap<String, Vec<String>> = HashMap::new();
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => {
            for ifaddr in addrs {
                if let Some(cidr) = ifaddr
                    .address
                    .as_ref()
                    .and_then(|a| cidr(a, ifaddr.netmask.as_ref()))
                {
                    by_name.entry(ifaddr.interface_name).or_default().push(cidr);
                }
            }
        }
        Err(err) => warn!(cause = %err, "cannot list interface addresses"),
    }
    by_name
}

/// `address/prefix`, the prefix counted from the netmask (host-length when there is none).
/// Link-layer entries are not IP addresses and give `None`.
fn cidr(address: &SockaddrStorage, netmask: Option<&SockaddrStorage>) -> Option<String> {
    let (ip, prefix) = if let Some(v4) = address.as_sockaddr_in() {
        let prefix = netmask
            .and_then(|m| m.as_sockaddr_in())
            .map_or(32, |m| m.ip().to_bits().count_ones());
        (IpAddr::V4(v4.ip()), prefix)
    } else if let Some(v6) = address.as_sockaddr_in6() {
        let prefix = netmask
            .and_then(|m| m.as_sockaddr_in6())
            .map_or(128, |m| m.ip().to_bits().count_ones());
        (IpAddr::V6(v6.ip()), prefix)
    } else {
        return None;
    };
    Some(format!("{ip}/{prefix}"))
}

// ---------------------------------------------------------------------------------------------
// DMI and identity

fn collect_dmi(sys: &Path) -> Dmi {
    let dir = sys.join("class/dmi/id");
    let field = |file: &str| read_attr(&dir.join(file)).filter(|v| !is_dmi_placeholder(v));
    Dmi {
        vendor: field("sys_vendor"),
        product: field("product_name"),
        serial: field("product_serial"),
        // Filler (all zeros, all `f`) counts as unset. Vendor-default UUIDs stay visible so an
        // operator can see why the identity came from elsewhere; `hardware_id` rejects them.
        uuid: field("product_uuid").map(|u| u.to_lowercase()),
    }
}

/// Strings firmware vendors leave in unset DMI fields.
fn is_dmi_placeholder(value: &str) -> bool {
    const PLACEHOLDERS: &[&str] = &[
        "to be filled by o.e.m.",
        "default string",
        "system serial number",
        "system product name",
        "system manufacturer",
        "system version",
        "chassis serial number",
        "not specified",
        "not applicable",
        "not available",
        "none",
        "n/a",
        "unknown",
        "oem",
        "o.e.m.",
        "0123456789",
        "123456789",
    ];
    let lower = value.trim().to_lowercase();
    // One repeated character ("00000000", "ffff-ffff", "....") is filler too.
    let mut significant = lower.chars().filter(|c| !matches!(c, '-' | ' ' | ':'));
    let first = significant.next();
    let repeated = first.is_none_or(|first| significant.all(|c| c == first));
    repeated || PLACEHOLDERS.contains(&lower.as_str())
}

/// A DMI UUID is a usable identity if it is a well-formed UUID that is not one of the values many
/// boards ship with.
fn is_usable_dmi_uuid(uuid: &str) -> bool {
    const KNOWN_BOGUS: &[&str] = &[
        // AMI BIOS default, shipped on many Gigabyte and Supermicro boards, in both byte orders.
        "03000200-0400-0500-0006-000700080009",
        "00020003-0004-0005-0006-000700080009",
        "12345678-1234-5678-90ab-cddeefaabbcc",
    ];
    let hex: String = uuid.chars().filter(|c| *c != '-').collect();
    hex.len() == 32
        && hex.chars().all(|c| c.is_ascii_hexdigit())
        && !is_dmi_placeholder(&hex)
        && !KNOWN_BOGUS.contains(&uuid)
}

/// machine-id(5): 32 lower-case hex digits. systemd writes "uninitialized" before first boot
/// completes; zeros are what a template image may carry.
fn is_valid_machine_id(id: &str) -> bool {
    id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()) && id.chars().any(|c| c != '0')
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    /// A fixture tree with `sys`, `proc` and `etc` under one temporary directory.
    struct Fixture {
        dir: TempDir,
        roots: SysRoots,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let roots = SysRoots {
                sys: dir.path().join("sys"),
                proc: dir.path().join("proc"),
                etc: dir.path().join("etc"),
            };
            Self { dir, roots }
        }

        fn write(&self, rel: &str, contents: impl AsRef<[u8]>) {
            let path = self.dir.path().join(rel);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(path, contents).expect("write");
        }

        fn mkdir(&self, rel: &str) {
            fs::create_dir_all(self.dir.path().join(rel)).expect("mkdir");
        }

        fn disk(&self, name: &str, sectors: &str, files: &[(&str, &str)]) {
            self.mkdir(&format!("sys/block/{name}/device"));
            self.write(&format!("sys/block/{name}/size"), sectors);
            for (file, contents) in files {
                self.write(&format!("sys/block/{name}/{file}"), contents);
            }
        }

        fn nic(&self, name: &str, files: &[(&str, &str)]) {
            self.mkdir(&format!("sys/class/net/{name}"));
            for (file, contents) in files {
                self.write(&format!("sys/class/net/{name}/{file}"), contents);
            }
        }
    }

    const CPUINFO_X86: &str = "\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU E5-2620 v4 @ 2.10GHz
physical id\t: 0
core id\t\t: 0
cpu cores\t: 2

processor\t: 1
model name\t: Intel(R) Xeon(R) CPU E5-2620 v4 @ 2.10GHz
physical id\t: 0
core id\t\t: 1

processor\t: 2
model name\t: Intel(R) Xeon(R) CPU E5-2620 v4 @ 2.10GHz
physical id\t: 0
core id\t\t: 0

processor\t: 3
model name\t: Intel(R) Xeon(R) CPU E5-2620 v4 @ 2.10GHz
physical id\t: 1
core id\t\t: 0
";

    #[test]
    fn cpuinfo_counts_threads_and_cores() {
        let cpu = parse_cpuinfo(CPUINFO_X86);
        assert_eq!(
            cpu.model.as_deref(),
            Some("Intel(R) Xeon(R) CPU E5-2620 v4 @ 2.10GHz")
        );
        assert_eq!(cpu.logical, 4);
        // (0,0) twice is a hyperthread pair; (1,0) is a core on the second package.
        assert_eq!(cpu.physical, Some(3));
    }

    #[test]
    fn cpuinfo_without_topology_has_no_physical_count() {
        let aarch64 = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n\n\
                       processor\t: 1\nBogoMIPS\t: 50.00\n";
        let cpu = parse_cpuinfo(aarch64);
        assert_eq!(
            cpu,
            CpuInfo {
                model: None,
                logical: 2,
                physical: None
            }
        );

        let power = "processor\t: 0\ncpu\t\t: POWER9 (raw), altivec supported\n";
        assert_eq!(
            parse_cpuinfo(power).model.as_deref(),
            Some("POWER9 (raw), altivec supported")
        );
        assert_eq!(parse_cpuinfo(""), CpuInfo::default());
    }

    #[test]
    fn os_release_prefers_pretty_name() {
        let text = "NAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n";
        assert_eq!(parse_os_release(text), "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(
            parse_os_release("# comment\nNAME='Alpine Linux'\nVERSION_ID=3.20.1\n"),
            "Alpine Linux 3.20.1"
        );
        assert_eq!(parse_os_release("NAME=\"Say \\\"hi\\\"\"\n"), "Say \"hi\"");
        assert_eq!(parse_os_release("PRETTY_NAME=\"\"\nNAME=Arch\n"), "Arch");
        assert_eq!(parse_os_release("garbage\n"), "");
    }

    #[test]
    fn os_release_falls_back_to_usr_lib() {
        let f = Fixture::new();
        f.write("usr/lib/os-release", "PRETTY_NAME=\"Fedora Linux 40\"\n");
        assert_eq!(os_name(&f.roots), "Fedora Linux 40");
        f.write("etc/os-release", "PRETTY_NAME=\"Ubuntu 24.04 LTS\"\n");
        assert_eq!(os_name(&f.roots), "Ubuntu 24.04 LTS");
    }

    #[test]
    fn inventory_from_fixture_tree() {
        let f = Fixture::new();
        f.write("proc/cpuinfo", CPUINFO_X86);
        f.write(
            "proc/meminfo",
            "MemTotal:       16318264 kB\nMemFree:  1 kB\n",
        );
        f.write("proc/sys/kernel/osrelease", "6.1.0-18-amd64\n");
        f.write(
            "etc/os-release",
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
        );
        f.write("sys/class/dmi/id/sys_vendor", "Supermicro\n");
        f.write("sys/class/dmi/id/product_name", "To be filled by O.E.M.\n");
        f.write("sys/class/dmi/id/product_serial", "0123456789\n");
        f.write(
            "sys/class/dmi/id/product_uuid",
            "4C4C4544-0035-3010-8030-B4C04F4D4B31\n",
        );
        f.mkdir("sys/firmware/efi");
        f.disk("sda", "3907029168", &[("queue/rotational", "1\n")]);

        let inv = collect_inventory(&f.roots);
        assert_eq!(inv.os, "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(inv.kernel, "6.1.0-18-amd64");
        assert_eq!(inv.arch, std::env::consts::ARCH);
        assert_eq!(inv.cpu_model, "Intel(R) Xeon(R) CPU E5-2620 v4 @ 2.10GHz");
        assert_eq!((inv.cpu_cores, inv.cpu_physical_cores), (4, Some(3)));
        assert_eq!(inv.memory_bytes, 16318264 * 1024);
        assert_eq!(inv.disks.len(), 1);
        assert!(inv.nics.is_empty());
        assert_eq!(
            inv.dmi,
            Dmi {
                vendor: Some("Supermicro".into()),
                product: None,
                serial: None,
                uuid: Some("4c4c4544-0035-3010-8030-b4c04f4d4b31".into()),
            }
        );
        assert_eq!(inv.boot_mode, BootMode::Uefi);
        assert!(!inv.hostname.is_empty());
    }

    #[test]
    fn empty_tree_gives_empty_inventory_without_panicking() {
        let f = Fixture::new();
        let inv = collect_inventory(&f.roots);
        assert_eq!(inv.os, "");
        assert_eq!(inv.kernel, "");
        assert_eq!(inv.cpu_model, "");
        assert_eq!(
            (inv.cpu_cores, inv.cpu_physical_cores, inv.memory_bytes),
            (0, None, 0)
        );
        assert!(inv.disks.is_empty() && inv.nics.is_empty());
        assert_eq!(inv.dmi, Dmi::default());
        assert_eq!(inv.boot_mode, BootMode::Bios);
        assert_eq!(hardware_id(None, &f.roots, &inv.nics), None);
    }

    #[test]
    fn disks_skip_virtual_and_empty_devices() {
        let f = Fixture::new();
        f.disk(
            "nvme0n1",
            "1000215216",
            &[
                ("queue/rotational", "0\n"),
                ("removable", "0\n"),
                ("device/model", "Samsung SSD 980 PRO 1TB                 \n"),
                ("device/serial", "  S5GXNF0R123456X  \n"),
            ],
        );
        f.disk(
            "sda",
            "3907029168",
            &[
                ("queue/rotational", "1\n"),
                ("device/model", "ST2000DM008-2FR1\n"),
            ],
        );
        // SATA: serial only in the VPD page; 4-byte header, then the padded ASCII serial.
        f.write(
            "sys/block/sda/device/vpd_pg80",
            b"\x00\x80\x00\x14        ZFL1ABCD",
        );
        f.disk("sdb", "0", &[("removable", "1\n")]);
        f.disk("vda", "20971520", &[("serial", "disk-serial\n")]);
        f.disk(
            "sdc",
            "2048",
            &[
                ("removable", "1\n"),
                ("device/model", "\n"),
                ("wwid", "naa.5000c500a1b2c3d4\n"),
            ],
        );
        f.disk("loop0", "2048", &[]);
        f.disk("zram0", "2048", &[]);
        f.disk("ram0", "2048", &[]);
        // Virtual: no `device` link.
        f.write("sys/block/dm-0/size", "2048");
        f.write("sys/block/md0/size", "2048");
        f.disk("nvme0c0n1", "2048", &[("hidden", "1\n")]);
        f.disk("sdz", "not a number", &[]);

        let disks = collect_disks(&f.roots.sys);
        let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["nvme0n1", "sda", "sdc", "vda"]);
        assert_eq!(
            disks[0],
            BlockDevice {
                name: "nvme0n1".into(),
                model: Some("Samsung SSD 980 PRO 1TB".into()),
                serial: Some("S5GXNF0R123456X".into()),
                size_bytes: 1000215216 * 512,
                rotational: false,
                removable: false,
            }
        );
        assert!(disks[1].rotational);
        assert_eq!(disks[1].serial.as_deref(), Some("ZFL1ABCD"));
        assert_eq!(disks[2].model, None);
        assert_eq!(disks[2].serial.as_deref(), Some("naa.5000c500a1b2c3d4"));
        assert!(disks[2].removable);
        assert_eq!(disks[3].serial.as_deref(), Some("disk-serial"));
    }

    #[test]
    fn nics_from_sysfs() {
        let f = Fixture::new();
        f.nic(
            "lo",
            &[
                ("address", "00:00:00:00:00:00\n"),
                ("operstate", "unknown\n"),
            ],
        );
        f.nic(
            "eno1",
            &[
                ("address", "3C:EC:EF:01:02:03\n"),
                ("addr_assign_type", "0\n"),
                ("speed", "1000\n"),
                ("operstate", "up\n"),
            ],
        );
        // Link down: the kernel answers EINVAL for speed and carrier; missing files stand in.
        f.nic(
            "eno2",
            &[
                ("address", "3c:ec:ef:01:02:04\n"),
                ("addr_assign_type", "0\n"),
                ("operstate", "down\n"),
            ],
        );
        // Up but the driver does not know the speed.
        f.nic(
            "eth0",
            &[
                ("address", "02:fc:00:00:00:01\n"),
                ("addr_assign_type", "1\n"),
                ("speed", "-1\n"),
                ("operstate", "up\n"),
            ],
        );
        f.nic(
            "tun0",
            &[
                ("address", "\n"),
                ("operstate", "unknown\n"),
                ("carrier", "1\n"),
            ],
        );
        f.nic("tap1", &[("operstate", "unknown\n"), ("carrier", "0\n")]);
        f.nic(
            "sit0",
            &[("address", "00:00:00:00\n"), ("addr_assign_type", "0\n")],
        );

        let addrs = HashMap::from([(
            "eno1".to_owned(),
            vec!["192.0.2.4/24".to_owned(), "fe80::1/64".to_owned()],
        )]);
        let nics = collect_nics(&f.roots.sys, &addrs);
        let names: Vec<&str> = nics.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["eno1", "eno2", "eth0", "sit0", "tap1", "tun0"]);
        assert_eq!(
            nics[0],
            NetInterface {
                name: "eno1".into(),
                mac: Some("3c:ec:ef:01:02:03".into()),
                permanent_mac: true,
                speed_mbps: Some(1000),
                up: true,
                addresses: vec!["192.0.2.4/24".into(), "fe80::1/64".into()],
            }
        );
        assert_eq!((nics[1].speed_mbps, nics[1].up), (None, false));
        assert_eq!(
            (nics[2].speed_mbps, nics[2].up, nics[2].permanent_mac),
            (None, true, false)
        );
        assert_eq!(nics[3].mac, None);
        assert!(!nics[4].up);
        assert_eq!((nics[5].mac.as_deref(), nics[5].up), (None, true));
    }

    #[test]
    fn mac_and_speed_parsers() {
        assert_eq!(
            parse_mac("AA:bb:CC:00:11:22\n").as_deref(),
            Some("aa:bb:cc:00:11:22")
        );
        assert_eq!(parse_mac("00:00:00:00:00:00"), None);
        assert_eq!(parse_mac(""), None);
        assert_eq!(parse_mac("c0:00:02:01"), None);
        assert_eq!(parse_mac("zz:00:00:00:00:01"), None);
        assert_eq!(parse_speed("25000\n"), Some(25000));
        assert_eq!(parse_speed("-1"), None);
        assert_eq!(parse_speed("0"), None);
        assert_eq!(parse_speed("4294967295"), None);
        assert_eq!(parse_speed("fast"), None);
    }

    #[test]
    fn cidr_counts_netmask_bits() {
        use std::net::{SocketAddrV4, SocketAddrV6};
        let v4 = |ip: &str| SockaddrStorage::from(SocketAddrV4::new(ip.parse().expect("ip"), 0));
        let v6 =
            |ip: &str| SockaddrStorage::from(SocketAddrV6::new(ip.parse().expect("ip"), 0, 0, 0));
        assert_eq!(
            cidr(&v4("192.0.2.4"), Some(&v4("255.255.255.0"))).as_deref(),
            Some("192.0.2.4/24")
        );
        assert_eq!(cidr(&v4("10.1.2.3"), None).as_deref(), Some("10.1.2.3/32"));
        assert_eq!(
            cidr(&v6("fe80::1"), Some(&v6("ffff:ffff:ffff:ffff::"))).as_deref(),
            Some("fe80::1/64")
        );
    }

    #[test]
    fn real_interfaces_have_addresses_in_cidr_form() {
        // The loopback always has one; every entry must parse back as address/prefix.
        let addrs = interface_addresses();
        let lo = addrs.get("lo").expect("lo has addresses");
        assert!(lo.iter().any(|a| a == "127.0.0.1/8"), "{lo:?}");
        for cidr in addrs.values().flatten() {
            let (ip, prefix) = cidr.split_once('/').expect("has prefix");
            assert!(ip.parse::<IpAddr>().is_ok(), "{cidr}");
            assert!(prefix.parse::<u8>().is_ok_and(|p| p <= 128), "{cidr}");
        }
    }

    #[test]
    fn dmi_placeholders() {
        for bogus in [
            "To Be Filled By O.E.M.",
            "Default string",
            "System Serial Number",
            "Not Specified",
            "0000000000",
            "   ",
            "N/A",
        ] {
            assert!(is_dmi_placeholder(bogus), "{bogus}");
        }
        for real in ["Dell Inc.", "PowerEdge R640", "CZ12345678", "QEMU"] {
            assert!(!is_dmi_placeholder(real), "{real}");
        }
    }

    fn nic(name: &str, mac: Option<&str>, permanent: bool) -> NetInterface {
        NetInterface {
            name: name.into(),
            mac: mac.map(Into::into),
            permanent_mac: permanent,
            ..NetInterface::default()
        }
    }

    #[test]
    fn hardware_id_prefers_each_source_in_turn() {
        let f = Fixture::new();
        let nics = [
            nic("eth1", Some("52:54:00:bb:00:01"), true),
            nic("eth0", Some("52:54:00:aa:00:01"), true),
            nic("br0", Some("02:00:00:00:00:01"), false),
            nic("tun0", None, true),
        ];
        let want = |source, value: &str| {
            Some(HardwareId {
                source,
                value: value.into(),
            })
        };

        assert_eq!(
            hardware_id(None, &f.roots, &nics),
            want(HardwareIdSource::Mac, "52:54:00:aa:00:01")
        );

        f.write("etc/machine-id", "3D1219C7C4C5404AAA1F6D2A48ADFDA4\n");
        assert_eq!(
            hardware_id(None, &f.roots, &nics),
            want(
                HardwareIdSource::MachineId,
                "3d1219c7c4c5404aaa1f6d2a48adfda4"
            )
        );

        f.write(
            "sys/class/dmi/id/product_uuid",
            "4C4C4544-0035-3010-8030-B4C04F4D4B31\n",
        );
        assert_eq!(
            hardware_id(None, &f.roots, &nics),
            want(
                HardwareIdSource::DmiUuid,
                "4c4c4544-0035-3010-8030-b4c04f4d4b31"
            )
        );

        assert_eq!(
            hardware_id(Some(" Node-A \n"), &f.roots, &nics),
            want(HardwareIdSource::Override, "node-a")
        );
        // A blank override is no override.
        assert_eq!(
            hardware_id(Some("  "), &f.roots, &nics).map(|id| id.source),
            Some(HardwareIdSource::DmiUuid)
        );
    }

    #[test]
    fn hardware_id_skips_bogus_dmi_uuids_and_machine_ids() {
        let f = Fixture::new();
        f.write("etc/machine-id", "0123456789abcdef0123456789abcdef\n");
        for bogus in [
            "00000000-0000-0000-0000-000000000000",
            "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF",
            "03000200-0400-0500-0006-000700080009",
            "Not Settable",
            "",
        ] {
            f.write("sys/class/dmi/id/product_uuid", bogus);
            assert_eq!(
                hardware_id(None, &f.roots, &[]).map(|id| id.source),
                Some(HardwareIdSource::MachineId),
                "{bogus:?}"
            );
        }

        let nics = [nic("eth0", Some("52:54:00:aa:00:01"), true)];
        for bogus in [
            "uninitialized\n",
            "00000000000000000000000000000000",
            "abc",
            "",
        ] {
            f.write("etc/machine-id", bogus);
            assert_eq!(
                hardware_id(None, &f.roots, &nics).map(|id| id.source),
                Some(HardwareIdSource::Mac),
                "{bogus:?}"
            );
        }

        // Only randomised or absent MACs: nothing left.
        let nics = [
            nic("eth0", Some("02:00:00:00:00:01"), false),
            nic("tun0", None, true),
        ];
        assert_eq!(hardware_id(None, &f.roots, &nics), None);
    }

    #[test]
    fn real_machine_inventory_is_sane() {
        let inv = collect_inventory(&SysRoots::default());
        assert!(inv.cpu_cores > 0);
        assert!(!inv.cpu_model.is_empty());
        assert!(inv.memory_bytes > 0);
        assert!(!inv.kernel.is_empty());
        assert!(inv.nics.iter().all(|n| n.name != "lo"));
    }
}
