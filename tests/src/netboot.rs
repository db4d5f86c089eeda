//! Netboot host tests: a controller serving DHCP/TFTP/HTTP on a LAN, and diskless qemu VMs (TCG)
//! whose NIC is a tap on that LAN's bridge.
//!
//! [`NetbootLab::start`] builds the image once per test process (`images/build.sh` with the test's
//! agent binary and a throw-away signing key), starts the controller with netboot on, and adds the
//! image. [`VmOptions`] gives a VM more than its NIC: a q35 machine, emulated NVMe drives, empty
//! PCIe root ports to hot-plug drives into ([`NvmeDrive::hot_plug`]) and a QMP socket
//! ([`crate::qmp`]).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::fleet::as_array;
use crate::netns::Topology;
use crate::process::{output_with_timeout, Proc, ProcSpec};
use crate::qmp::Qmp;
use crate::{eventually, Bins};

/// Deadline for one shoalctl call.
const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// Firmware of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS with the iPXE option ROM of Debian's `ipxe-qemu`.
    Bios,
    /// OVMF (Debian's `ovmf`), which PXE-boots iPXE over TFTP.
    Uefi,
}

/// An emulated NVMe drive: one controller with one namespace, backed by a raw image file.
#[derive(Debug, Clone)]
pub struct NvmeDrive {
    /// qemu id of the controller device; the backing block node is `<id>-file` / `<id>-raw`.
    pub id: String,
    /// The raw image file (its size is the drive's).
    pub image: PathBuf,
    /// The serial number the guest sees (up to 20 characters).
    pub serial: String,
}

impl NvmeDrive {
    /// A drive `id` with `serial`, backed by `image`.
    pub fn new(id: &str, image: impl Into<PathBuf>, serial: &str) -> NvmeDrive {
        NvmeDrive {
            id: id.into(),
            image: image.into(),
            serial: serial.into(),
        }
    }

    /// Hot-plugs this drive into a running VM's empty PCIe root port `port` (one of
    /// [`VmOptions::hotplug_ports`]): `blockdev-add` of the file and a raw format node on it, then
    /// `device_add` of an NVMe controller on that node.
    pub fn hot_plug(&self, qmp: &mut Qmp, port: &str) -> Result<()> {
        let (file, raw) = (format!("{}-file", self.id), format!("{}-raw", self.id));
        qmp.execute(
            "blockdev-add",
            json!({ "node-name": file, "driver": "file", "filename": self.image }),
        )?;
        qmp.execute(
            "blockdev-add",
            json!({ "node-name": raw, "driver": "raw", "file": file }),
        )?;
        qmp.execute(
            "device_add",
            json!({ "driver": "nvme", "id": self.id, "drive": raw, "serial": self.serial, "bus": port }),
        )?;
        Ok(())
    }
}

/// What a VM has beyond its NIC. The default is the plain diskless VM: qemu's default machine
/// (i440fx), no drives, no hot-plug ports, no QMP.
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    /// `-machine` type, e.g. `q35`; `None` (the default) for qemu's default, `pc`.
    pub machine: Option<String>,
    /// NVMe drives present from power-on. Default none.
    pub nvme: Vec<NvmeDrive>,
    /// Ids of empty `pcie-root-port`s to hot-plug into, on `pcie.0` (needs `machine` q35). Default
    /// none.
    pub hotplug_ports: Vec<String>,
    /// Path for a QMP unix socket (`-qmp unix:PATH,server,nowait`); connect with [`Qmp::connect`].
    /// Default none.
    pub qmp: Option<PathBuf>,
}

impl VmOptions {
    fn qemu_args(&self) -> Result<Vec<String>> {
        let mut args = Vec::new();
        if let Some(m) = &self.machine {
            args.extend(["-machine".into(), m.clone()]);
        }
        for d in &self.nvme {
            ensure!(
                d.image.is_file(),
                "NVMe image {} does not exist",
                d.image.display()
            );
            args.push("-drive".into());
            args.push(format!(
                "file={},if=none,id={}-raw,format=raw",
                d.image.display(),
                d.id
            ));
            args.push("-device".into());
            args.push(format!(
                "nvme,drive={}-raw,serial={},id={}",
                d.id, d.serial, d.id
            ));
        }
        if !self.hotplug_ports.is_empty() {
            ensure!(
                self.machine
                    .as_deref()
                    .is_some_and(|m| m.starts_with("q35")),
                "PCIe root ports need -machine q35"
            );
        }
        for (i, port) in self.hotplug_ports.iter().enumerate() {
            // Chassis/slot pairs must be unique per port; start at 1 (0 is the root complex).
            args.push("-device".into());
            args.push(format!(
                "pcie-root-port,id={port},bus=pcie.0,chassis={n},slot={n}",
                n = i + 1
            ));
        }
        if let Some(path) = &self.qmp {
            args.push("-qmp".into());
            args.push(format!("unix:{},server,nowait", path.display()));
        }
        Ok(args)
    }
}

/// Where the DHCP addresses come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhcpSetup {
    /// The controller is the DHCP server (`--dhcp-range`).
    Full,
    /// dnsmasq on a router host hands out addresses; the controller runs `--proxy-dhcp`.
    ProxyWithDnsmasq,
}

/// Files the netboot tests need that are not ours: why they are missing, or `None`.
pub fn netboot_unavailable(firmware: Firmware) -> Option<String> {
    let mut needs = vec![
        ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
        ("/usr/lib/ipxe/qemu/efi-virtio.rom", "ipxe-qemu"),
        ("/usr/lib/ipxe/undionly.kpxe", "ipxe"),
        ("/usr/bin/busybox", "busybox-static"),
        ("/usr/sbin/smartctl", "smartmontools"),
        ("/sbin/mke2fs", "e2fsprogs"),
        ("/sbin/mkfs.xfs", "xfsprogs"),
        ("/usr/bin/zstd", "zstd"),
        ("/usr/bin/cpio", "cpio"),
        ("/dev/net/tun", "(the tun device)"),
    ];
    if firmware == Firmware::Uefi {
        needs.push(("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"));
    }
    for (path, package) in needs {
        if !Path::new(path).exists() {
            return Some(format!(
                "{path} is missing: install {package} (scripts/deps)"
            ));
        }
    }
    if !glob_exists("/boot", "vmlinuz-") {
        return Some("no /boot/vmlinuz-*: install linux-image-amd64 (scripts/deps)".into());
    }
    None
}

fn glob_exists(dir: &str, prefix: &str) -> bool {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
        })
        .unwrap_or(false)
}

/// A built image: its directory and the public key that signed it.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The image directory.
    pub dir: PathBuf,
    /// The signing key's `.pub` file.
    pub key_pub: PathBuf,
    /// The version.
    pub version: String,
    /// How long build.sh took.
    pub build_time: Duration,
}

/// Builds the test image once per process.
pub fn image(bins: &Bins) -> Result<BuiltImage> {
    static IMAGE: OnceLock<std::result::Result<BuiltImage, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| build_image(bins).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("building the netboot image: {e}"))
}

fn build_image(bins: &Bins) -> Result<BuiltImage> {
    build_image_as(bins, "test-1", None, "")
}

/// Builds one more image, `version`, with the same agent binary and signing key as [`image`] (so
/// the lab's controller accepts it), optionally with a health check program baked in
/// (`images/build.sh --health-check`) and extra agent arguments (`--agent-args`). Each call runs
/// `images/build.sh` once (15–20 s).
pub fn extra_image(
    bins: &Bins,
    version: &str,
    health_check: Option<&Path>,
    agent_args: &str,
) -> Result<BuiltImage> {
    image(bins)?;
    build_image_as(bins, version, health_check, agent_args)
}

/// Builds image `version` signed by another key than [`image`]'s: `key` (a PEM; generated by
/// `images/build.sh` if absent, its `.pub` beside it). Nodes running the lab's images do not hold
/// it; start the lab with [`NetbootLab::start_with_keys`] for the controller to accept the image.
pub fn image_signed_by(bins: &Bins, version: &str, key: &Path) -> Result<BuiltImage> {
    build_image_with(bins, version, None, "", key)
}

fn build_image_as(
    bins: &Bins,
    version: &str,
    health_check: Option<&Path>,
    agent_args: &str,
) -> Result<BuiltImage> {
    let key = std::env::temp_dir()
        .join(format!("shoal-netboot-image-{}", std::process::id()))
        .join("key.pem");
    build_image_with(bins, version, health_check, agent_args, &key)
}

fn build_image_with(
    bins: &Bins,
    version: &str,
    health_check: Option<&Path>,
    agent_args: &str,
    key: &Path,
) -> Result<BuiltImage> {
    let base = std::env::temp_dir().join(format!("shoal-netboot-image-{}", std::process::id()));
    let dir = if version == "test-1" {
        base.join("image")
    } else {
        base.join(format!("image-{version}"))
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build.sh");
    let start = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .arg("--out")
        .arg(&dir)
        .arg("--version")
        .arg(version)
        .arg("--agent")
        .arg(&bins.agent)
        .arg("--key")
        .arg(key);
    if let Some(check) = health_check {
        cmd.arg("--health-check").arg(check);
    }
    if !agent_args.is_empty() {
        cmd.arg("--agent-args").arg(agent_args);
    }
    let out = output_with_timeout(&mut cmd, Duration::from_secs(300))?;
    ensure!(
        out.status.success(),
        "images/build.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(BuiltImage {
        dir,
        key_pub: key.with_extension("pub"),
        version: version.to_owned(),
        build_time: start.elapsed(),
    })
}

/// A controller with netboot on a LAN, and VMs on it.
#[derive(Debug)]
pub struct NetbootLab {
    /// Temporary directory (data dir, logs, VM files).
    pub dir: tempfile::TempDir,
    /// The binaries.
    pub bins: Bins,
    /// The image.
    pub image: BuiltImage,
    /// The controller.
    pub controller: Proc,
    /// Its namespace.
    pub controller_ns: String,
    /// Its address on the LAN.
    pub controller_ip: Ipv4Addr,
    /// dnsmasq, in proxy setups.
    pub dnsmasq: Option<Proc>,
    /// A plain host on the LAN (no DHCP, a static address) to reach the boot servers from: they
    /// answer only on the netboot interface, not from the controller's own namespace.
    pub client_ns: String,
    /// The client's interface on the LAN.
    pub client_iface: String,
    /// Running VMs.
    pub vms: Vec<Proc>,
    /// Taps created so far (names stay unique after VMs are dropped).
    taps: usize,
    // Dropped last: processes first, then the namespaces.
    topo: Topology,
}

impl NetbootLab {
    /// Starts the controller on LAN `10.78.<n>.0/24` and adds the image.
    pub fn start(subnet_octet: u8, setup: DhcpSetup) -> Result<NetbootLab> {
        NetbootLab::start_with_keys(subnet_octet, setup, &[])
    }

    /// [`NetbootLab::start`] with more image keys the controller trusts (`--image-key`) beside the
    /// lab image's.
    pub fn start_with_keys(
        subnet_octet: u8,
        setup: DhcpSetup,
        extra_image_keys: &[PathBuf],
    ) -> Result<NetbootLab> {
        let bins = Bins::locate()?;
        let image = image(&bins)?;
        let dir = tempfile::Builder::new()
            .prefix("shoal-netboot-")
            .tempdir()?;
        let logs = dir.path().join("logs");
        let mut topo = Topology::new()?;
        let subnet = format!("10.78.{subnet_octet}.0/24");
        topo.add_lan("boot", &subnet)?;
        topo.add_host("ctl")?;
        let iface = topo.connect("ctl", "boot")?;
        let controller_ns = topo.host("ctl")?.ns_name().to_string();
        topo.add_host("client")?;
        let client_iface = topo.connect("client", "boot")?.name;
        let client_ns = topo.host("client")?.ns_name().to_string();
        // A second network on the controller, with a host routed to the netboot address through it:
        // what reaches that address over another interface must not be served.
        topo.add_lan("outside", &format!("10.79.{subnet_octet}.0/24"))?;
        let ctl_outside = topo.connect("ctl", "outside")?;
        topo.add_host("outsider")?;
        topo.connect("outsider", "outside")?;
        topo.host("outsider")?.netns().ip(&[
            "route",
            "add",
            &subnet,
            "via",
            &ctl_outside.addr.to_string(),
        ])?;
        let mut dnsmasq = None;
        if setup == DhcpSetup::ProxyWithDnsmasq {
            topo.add_host("router")?;
            let r = topo.connect("router", "boot")?;
            let range =
                format!("10.78.{subnet_octet}.100,10.78.{subnet_octet}.150,255.255.255.0,1h");
            dnsmasq = Some(
                ProcSpec::new("dnsmasq", "/usr/sbin/dnsmasq", &logs)
                    .netns(topo.host("router")?.ns_name())
                    .args([
                        "--keep-in-foreground",
                        "--no-daemon",
                        "--port=0",
                        "--log-dhcp",
                        "--no-resolv",
                        "--no-hosts",
                    ])
                    .arg(format!("--interface={}", r.name))
                    .arg("--bind-interfaces")
                    .arg(format!("--dhcp-range={range}"))
                    .arg(format!(
                        "--dhcp-leasefile={}",
                        dir.path().join("dnsmasq.leases").display()
                    ))
                    .arg("--conf-file=/dev/null")
                    .spawn()?,
            );
        }
        let data_dir = dir.path().join("controller");
        std::fs::create_dir_all(&data_dir)?;
        let mut spec = ProcSpec::new("controller", &bins.controller, &logs)
            .netns(&controller_ns)
            .env("RUST_BACKTRACE", "1")
            .args(["serve", "--heartbeat-interval", "2s"])
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen")
            .arg(format!("{}:7440", iface.addr))
            .arg("--api")
            .arg(format!("{}:7441", iface.addr))
            .arg("--netboot-interface")
            .arg(&iface.name)
            .arg("--image-key")
            .arg(&image.key_pub);
        for key in extra_image_keys {
            spec = spec.arg("--image-key").arg(key);
        }
        spec = match setup {
            DhcpSetup::Full => spec
                .arg("--dhcp-range")
                .arg(format!("10.78.{subnet_octet}.100-10.78.{subnet_octet}.150")),
            DhcpSetup::ProxyWithDnsmasq => spec.arg("--proxy-dhcp"),
        };
        let controller = spec.spawn()?;
        let mut lab = NetbootLab {
            dir,
            bins,
            image,
            controller,
            controller_ns,
            controller_ip: iface.addr,
            dnsmasq,
            client_ns,
            client_iface,
            vms: Vec::new(),
            taps: 0,
            topo,
        };
        let result = lab.ready();
        if result.is_err() {
            lab.dump_logs();
        }
        result.map(|()| lab)
    }

    fn ready(&mut self) -> Result<()> {
        eventually(
            Duration::from_secs(30),
            "the controller's admin API",
            || {
                if let Err(e) = self.controller.ensure_running() {
                    return Err(crate::abort(format!("{e:#}")));
                }
                self.ctl_ok(&["nodes", "list", "-o", "json"]).map(drop)
            },
        )?;
        let dir = self.image.dir.to_string_lossy().into_owned();
        self.ctl_ok(&["image", "add", &dir])?;
        Ok(())
    }

    /// The admin credential file.
    pub fn admin_conf(&self) -> PathBuf {
        self.dir.path().join("controller/admin.conf")
    }

    /// `shoalctl ARGS` in the controller's namespace.
    pub fn ctl(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.controller_ns])
            .arg(&self.bins.ctl)
            .arg("--config")
            .arg(self.admin_conf())
            .args(args);
        output_with_timeout(&mut cmd, CTL_TIMEOUT)
    }

    /// `shoalctl ARGS`, which must succeed; its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctl(args)?;
        ensure!(
            out.status.success(),
            "shoalctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `shoalctl ARGS -o json`, parsed as an array.
    pub fn ctl_list(&self, args: &[&str]) -> Result<Vec<Value>> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let v: Value = serde_json::from_str(&self.ctl_ok(&a)?)?;
        as_array(v, &args.join(" "))
    }

    /// A command in the controller's namespace.
    pub fn in_controller_ns(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.controller_ns, program]);
        cmd
    }

    /// A command in the LAN client's namespace.
    pub fn in_client_ns(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.client_ns, program]);
        cmd
    }

    /// `GET path` from the boot HTTP server, from the LAN client: the response body.
    pub fn client_http_get(&self, path: &str) -> Result<String> {
        let to = SocketAddr::from((self.controller_ip, 7442));
        self.topo
            .host("client")?
            .netns()
            .enter(|| http_get(to, path))?
    }

    /// `GET path` from the boot HTTP server's address, from a host on another network of the
    /// controller (so the connection arrives on an interface that is not the netboot interface).
    pub fn outsider_http_get(&self, path: &str) -> Result<String> {
        let to = SocketAddr::from((self.controller_ip, 7442));
        self.topo
            .host("outsider")?
            .netns()
            .enter(|| http_get(to, path))?
    }

    /// Broadcasts a PXE DHCPDISCOVER for `mac` from the LAN client, as firmware does, and waits up
    /// to 10 s for the controller's OFFER; whether one came.
    pub fn client_pxe_discover(&self, mac: &str) -> Result<bool> {
        let mac = parse_mac(mac)?;
        let iface = self.client_iface.clone();
        self.topo
            .host("client")?
            .netns()
            .enter(move || -> Result<bool> {
                let sock = UdpSocket::bind("0.0.0.0:68").context("binding the DHCP client port")?;
                sock.set_broadcast(true)?;
                nix::sys::socket::setsockopt(
                    &sock,
                    nix::sys::socket::sockopt::BindToDevice,
                    &std::ffi::OsString::from(&iface),
                )
                .context("SO_BINDTODEVICE")?;
                let xid = 0x5e0a_0001;
                sock.send_to(&pxe_discover(mac, xid), "255.255.255.255:67")
                    .context("sending DHCPDISCOVER")?;
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut buf = [0u8; 1500];
                while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                    sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                    match sock.recv_from(&mut buf) {
                        Ok((n, _)) if is_offer(&buf[..n], xid, mac) => return Ok(true),
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            break
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(false)
            })?
    }

    /// Sends the same PXE DHCPDISCOVER, unicast to the controller's netboot address, from the host
    /// on the controller's other network (it arrives on the other interface).
    pub fn outsider_pxe_discover(&self, mac: &str) -> Result<()> {
        let mac = parse_mac(mac)?;
        let to = SocketAddr::from((self.controller_ip, 67));
        self.topo
            .host("outsider")?
            .netns()
            .enter(move || -> Result<()> {
                let sock = UdpSocket::bind("0.0.0.0:68")?;
                sock.send_to(&pxe_discover(mac, 0x5e0a_0002), to)?;
                Ok(())
            })?
    }

    /// Starts a diskless VM with one virtio NIC on the LAN; returns its index in
    /// [`NetbootLab::vms`].
    pub fn start_vm(&mut self, name: &str, firmware: Firmware, mac: &str) -> Result<usize> {
        self.start_vm_with(name, firmware, mac, &VmOptions::default())
    }

    /// Starts a VM with one virtio NIC on the LAN and what `options` add; returns its index in
    /// [`NetbootLab::vms`].
    pub fn start_vm_with(
        &mut self,
        name: &str,
        firmware: Firmware,
        mac: &str,
        options: &VmOptions,
    ) -> Result<usize> {
        let extra = options.qemu_args()?;
        let lan_ns = self.topo.lan("boot")?.netns().name().to_string();
        let tap = format!("tap{}", self.taps);
        self.taps += 1;
        let lan = self.topo.lan("boot")?.netns();
        lan.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        lan.ip(&["link", "set", &tap, "master", "br0", "up"])?;
        let mut spec = ProcSpec::new(
            name,
            "/usr/bin/qemu-system-x86_64",
            self.dir.path().join("logs"),
        )
        .netns(&lan_ns)
        .args([
            "-accel", "tcg", "-m", "512", "-smp", "2", "-display", "none", "-serial", "stdio",
            "-monitor", "none",
        ])
        .args([
            "-uuid",
            "5ba1ab1e-0000-4000-8000-00000000000a",
            "-boot",
            "n",
        ])
        .arg("-netdev")
        .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
        .arg("-device")
        // UEFI: no iPXE option ROM, so OVMF's own PXE client loads ipxe.efi over TFTP, as real
        // UEFI firmware does; BIOS: SeaBIOS boots through the NIC's iPXE ROM.
        .arg(format!(
            "virtio-net-pci,netdev=n0,mac={mac}{}",
            if firmware == Firmware::Uefi {
                ",romfile="
            } else {
                ""
            }
        ));
        if firmware == Firmware::Uefi {
            let vars = self.dir.path().join(format!("{name}-vars.fd"));
            std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars)
                .context("copying OVMF_VARS_4M.fd")?;
            spec = spec
                .args([
                    "-drive",
                    "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                ])
                .arg("-drive")
                .arg(format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    vars.display()
                ));
        }
        spec = spec.args(extra);
        self.vms.push(spec.spawn()?);
        Ok(self.vms.len() - 1)
    }

    /// Waits until a node with `mac` is up with an inventory; returns the node.
    pub fn wait_node_up(&mut self, mac: &str, timeout: Duration) -> Result<Value> {
        eventually(
            timeout,
            &format!("a node with MAC {mac} up in `nodes list`"),
            || {
                self.controller
                    .ensure_running()
                    .map_err(|e| crate::abort(format!("{e:#}")))?;
                for vm in &mut self.vms {
                    if !vm.is_running() {
                        return Err(crate::abort(format!("VM {} exited", vm.name())));
                    }
                }
                let nodes = self.ctl_list(&["nodes", "list"])?;
                let node = nodes
                    .into_iter()
                    .find(|n| crate::fleet::has_mac(n, mac))
                    .ok_or_else(|| anyhow!("no node with {mac} yet"))?;
                ensure!(
                    node["status"] == "up",
                    "node {} is {}",
                    node["id"],
                    node["status"]
                );
                Ok(node)
            },
        )
    }

    /// Runs a test's scenario; on error prints every log of the lab, then panics with the error
    /// chain.
    pub fn run(&mut self, scenario: impl FnOnce(&mut NetbootLab) -> anyhow::Result<()>) {
        if let Err(e) = scenario(self) {
            self.dump_logs();
            panic!("{e:#}");
        }
    }

    /// Prints the logs of every process.
    pub fn dump_logs(&self) {
        let mut logs: Vec<(&str, &Path)> = vec![("controller", self.controller.log_path())];
        if let Some(d) = &self.dnsmasq {
            logs.push(("dnsmasq", d.log_path()));
        }
        for vm in &self.vms {
            logs.push((vm.name(), vm.log_path()));
        }
        crate::process::dump_logs(logs);
    }
}

/// `GET path` over HTTP/1.0 to `to`: the body of a 200 response.
fn http_get(to: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10))
        .with_context(|| format!("connecting to {to}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP response: {out:?}"))?;
    ensure!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "GET {path}: {head}"
    );
    Ok(body.to_owned())
}

fn parse_mac(mac: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("MAC {mac}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow!("MAC {mac} is not 6 bytes"))
}

/// A PXE BIOS client's DHCPDISCOVER (RFC 2131 header, options 53, 60 `PXEClient…`, 93 = 0), written
/// out by hand so the test does not share the controller's DHCP library.
pub fn pxe_discover(mac: [u8; 6], xid: u32) -> Vec<u8> {
    let mut p = vec![0u8; 240];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // Ethernet
    p[2] = 6;
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    p[10] = 0x80; // broadcast flag: the client has no address yet
    p[28..34].copy_from_slice(&mac);
    p[236..240].copy_from_slice(&[99, 130, 83, 99]);
    p.extend_from_slice(&[53, 1, 1]);
    let class = b"PXEClient:Arch:00000:UNDI:002001";
    p.extend_from_slice(&[60, class.len() as u8]);
    p.extend_from_slice(class);
    p.extend_from_slice(&[93, 2, 0, 0]);
    p.push(255);
    p
}

/// Whether `p` is a DHCPOFFER (BOOTREPLY, option 53 = 2) for `xid` and `mac`.
fn is_offer(p: &[u8], xid: u32, mac: [u8; 6]) -> bool {
    if p.len() < 240
        || p[0] != 2
        || p[4..8] != xid.to_be_bytes()
        || p[28..34] != mac
        || p[236..240] != [99, 130, 83, 99]
    {
        return false;
    }
    let mut i = 240;
    while i + 1 < p.len() {
        match p[i] {
            0 => i += 1,
            255 => return false,
            53 => return p.get(i + 2) == Some(&2),
            _ => i += 2 + usize::from(p[i + 1]),
        }
    }
    false
}

/// Parses the join token from the kernel command line the VM printed on its console.
pub fn token_from_console(vm: &Proc) -> Result<String> {
    let log = vm.log();
    let start = log
        .find("shoal.token=")
        .ok_or_else(|| anyhow!("no shoal.token= on the console"))?;
    let token: String = log[start + "shoal.token=".len()..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    if token.is_empty() {
        bail!("empty shoal.token= on the console");
    }
    Ok(token)
}
