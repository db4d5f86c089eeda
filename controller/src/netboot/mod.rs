//! Netboot: DHCP (full or proxy), TFTP for iPXE, HTTP for per-machine iPXE scripts and images, the
//! signed image store, and the machines seen on the netboot network.
//!
//! - [`dhcp`] and [`tftp`] are sans-IO cores; [`serve`] here runs them on sockets bound to the netboot
//!   interface.
//! - [`http`] serves `GET /boot/<mac>.ipxe` (mints a single-use join token for that boot) and
//!   `GET /images/<version>/<file>` over plain HTTP on the netboot interface.
//! - [`images`] keeps signed images; [`machines`] the machine table, leases and image assignments.
//! - [`api`] adds the admin API routes (`/v1/images`, `/v1/machines`, `/v1/nodes/{id}/image`).
//!
//! The image store and the machine table exist whether or not the servers run, so images can be
//! added before netboot is switched on.

pub mod api;
pub mod dhcp;
pub mod http;
pub mod images;
pub mod machines;
pub mod tftp;
pub mod view;

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{net::UdpSocket, sync::Semaphore, task::JoinHandle};
use tracing::{debug, info, info_span, warn, Instrument};

use self::{
    dhcp::{Admission, DhcpConfig, DhcpMode, DhcpServer, Destination, LeaseChange, Leases},
    images::ImageStore,
    machines::{AdmissionPolicy, MachineStore, OuiTable},
};
use crate::{
    server::{now_ms, Controller},
    store::{Store, StoreError},
};

/// Netboot settings. Every field has a documented default ([`NetbootConfig::default`]).
#[derive(Debug, Clone)]
pub struct NetbootConfig {
    /// Interface the DHCP, TFTP and HTTP servers run on; default none (servers off).
    pub interface: Option<String>,
    /// Full DHCP server with a range, or proxyDHCP; default proxy.
    pub dhcp: DhcpMode,
    /// TCP port of the boot HTTP server on the interface's address; default 7442.
    pub http_port: u16,
    /// Directory served over TFTP; default `/usr/lib/ipxe` (Debian's `ipxe` package).
    pub tftp_root: PathBuf,
    /// iPXE binaries per architecture; default `undionly.kpxe` (BIOS) and `snponly.efi` (UEFI).
    pub boot_files: dhcp::BootFiles,
    /// Trusted image signing keys (files with 64 hex characters); default none.
    pub image_keys: Vec<PathBuf>,
    /// New PXE clients boot at once or wait for an operator; default admit all.
    pub admission: AdmissionPolicy,
    /// Lifetime of the single-use join token in each boot script; default 10 minutes.
    pub boot_token_ttl: Duration,
    /// Gateway handed out in full DHCP mode; default none.
    pub router: Option<Ipv4Addr>,
    /// DNS servers handed out in full DHCP mode; default none.
    pub dns: Vec<Ipv4Addr>,
    /// DHCP lease time in full mode; default 1 hour.
    pub lease_time: Duration,
    /// The IEEE OUI list; default `/usr/share/ieee-data/oui.txt` (Debian's `ieee-data`).
    pub oui_file: PathBuf,
}

impl Default for NetbootConfig {
    fn default() -> Self {
        Self {
            interface: None,
            dhcp: DhcpMode::Proxy,
            http_port: 7442,
            tftp_root: PathBuf::from("/usr/lib/ipxe"),
            boot_files: dhcp::BootFiles::default(),
            image_keys: Vec::new(),
            admission: AdmissionPolicy::AdmitAll,
            boot_token_ttl: Duration::from_secs(600),
            router: None,
            dns: Vec::new(),
            lease_time: Duration::from_secs(3600),
            oui_file: PathBuf::from(machines::OUI_FILE),
        }
    }
}

/// Why netboot could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetbootError {
    /// The image store or a key failed.
    #[error(transparent)]
    Image(#[from] images::ImageError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The netboot interface has no IPv4 address, or does not exist.
    #[error("netboot interface {0}: no IPv4 address (is it up and addressed?)")]
    NoAddress(String),
    /// A socket could not be opened.
    #[error("netboot {what}: {source}")]
    Socket {
        /// Which socket.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Netboot state shared by the servers and the admin API.
#[derive(Debug)]
pub struct Netboot {
    pub(crate) config: NetbootConfig,
    pub(crate) images: ImageStore,
    pub(crate) machines: MachineStore,
    pub(crate) oui: OuiTable,
    /// What the boot scripts point at, once the servers run (for kexec instructions).
    pub(crate) boot: std::sync::OnceLock<http::BootContext>,
}

impl Netboot {
    /// Opens the image store (`DATA_DIR/images`) and the machine trees.
    pub fn open(config: NetbootConfig, data_dir: &Path, store: &Store) -> Result<Netboot, NetbootError> {
        let keys = config.image_keys.iter().map(|p| images::read_key(p)).collect::<Result<Vec<_>, _>>()?;
        let images = ImageStore::open(data_dir.join("images"), keys)?;
        let machines = MachineStore::open(store)?;
        let oui = if config.interface.is_some() { OuiTable::load(&config.oui_file) } else { OuiTable::default() };
        Ok(Netboot { config, images, machines, oui, boot: std::sync::OnceLock::new() })
    }

    /// The netboot interface's IPv4 address and netmask.
    pub fn interface_addr(&self) -> Result<Option<(Ipv4Addr, Ipv4Addr)>, NetbootError> {
        let Some(iface) = &self.config.interface else { return Ok(None) };
        interface_ipv4(iface).map(Some)
    }
}

/// The first IPv4 address and netmask of an interface.
pub fn interface_ipv4(iface: &str) -> Result<(Ipv4Addr, Ipv4Addr), NetbootError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| NetbootError::Socket { what: "getifaddrs".into(), source: e.into() })?;
    for a in addrs {
        if a.interface_name != iface {
            continue;
        }
        let ip = a.address.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip());
        let mask = a.netmask.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip());
        if let (Some(ip), Some(mask)) = (ip, mask) {
            return Ok((ip, mask));
        }
    }
    Err(NetbootError::NoAddress(iface.to_owned()))
}

/// The running netboot servers.
#[derive(Debug)]
pub struct Servers {
    tasks: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Stops every server.
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

fn udp_socket(what: &str, addr: SocketAddrV4, iface: Option<&str>) -> Result<UdpSocket, NetbootError> {
    let err = |source| NetbootError::Socket { what: format!("{what} ({addr})"), source };
    let std = std::net::UdpSocket::bind(addr).map_err(err)?;
    std.set_broadcast(true).map_err(err)?;
    std.set_nonblocking(true).map_err(err)?;
    let sock = UdpSocket::from_std(std).map_err(err)?;
    if let Some(iface) = iface {
        sock.bind_device(Some(iface.as_bytes())).map_err(err)?;
    }
    Ok(sock)
}

/// Starts DHCP, TFTP and HTTP on the netboot interface, if one is configured. `agent_port` is the
/// controller's QUIC port, put in the kernel command line together with the interface's address.
pub async fn serve(controller: Arc<Controller>, agent_port: u16) -> Result<Option<Servers>, NetbootError> {
    let nb = &controller.netboot;
    let Some(iface) = nb.config.interface.clone() else { return Ok(None) };
    let (ip, mask) = interface_ipv4(&iface)?;
    let http_addr = SocketAddr::from((ip, nb.config.http_port));
    let http_base = format!("http://{http_addr}");

    let mut dhcp_config = DhcpConfig::new(nb.config.dhcp.clone(), ip, mask, http_base.clone());
    dhcp_config.router = nb.config.router;
    dhcp_config.dns = nb.config.dns.clone();
    dhcp_config.lease_secs = nb.config.lease_time.as_secs().clamp(60, u64::from(u32::MAX)) as u32;
    dhcp_config.boot_files = nb.config.boot_files.clone();
    let server = DhcpServer::new(dhcp_config, Leases::new(nb.machines.leases()?));

    let dhcp67 = udp_socket("DHCP", SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, dhcp::SERVER_PORT), Some(&iface))?;
    let dhcp4011 = udp_socket("PXE", SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, dhcp::PXE_PORT), Some(&iface))?;
    let tftp = udp_socket("TFTP", SocketAddrV4::new(ip, tftp::PORT), None)?;
    let http = tokio::net::TcpListener::bind(http_addr)
        .await
        .map_err(|source| NetbootError::Socket { what: format!("HTTP ({http_addr})"), source })?;
    let boot = http::BootContext { controller_addr: SocketAddr::from((ip, agent_port)), http_base };
    let _ = nb.boot.set(boot.clone());
    info!(interface = %iface, address = %ip, mode = ?nb.config.dhcp, http = %http_addr, tftp_root = %nb.config.tftp_root.display(), "netboot servers running");
    let tasks = vec![
        tokio::spawn(dhcp_loop(controller.clone(), server, dhcp67, dhcp4011).instrument(info_span!("dhcp"))),
        tokio::spawn(tftp_loop(nb.config.tftp_root.clone(), ip, tftp).instrument(info_span!("tftp"))),
        tokio::spawn(http::run(controller.clone(), boot, http).instrument(info_span!("boot_http"))),
    ];
    Ok(Some(Servers { tasks }))
}

async fn dhcp_loop(controller: Arc<Controller>, mut server: DhcpServer, s67: UdpSocket, s4011: UdpSocket) {
    let mut b67 = vec![0u8; 1500];
    let mut b4011 = vec![0u8; 1500];
    loop {
        let (port, len, from, sock) = tokio::select! {
            r = s67.recv_from(&mut b67) => match r {
                Ok((n, from)) => (dhcp::SERVER_PORT, n, from, &s67),
                Err(e) => { warn!(cause = %e, "DHCP receive failed"); continue; }
            },
            r = s4011.recv_from(&mut b4011) => match r {
                Ok((n, from)) => (dhcp::PXE_PORT, n, from, &s4011),
                Err(e) => { warn!(cause = %e, "PXE receive failed"); continue; }
            },
        };
        let bytes = if port == dhcp::SERVER_PORT { &b67[..len] } else { &b4011[..len] };
        let req = match dhcp::parse(bytes) {
            Ok(r) => r,
            Err(e) => {
                debug!(%from, cause = %e, "ignoring DHCP packet");
                continue;
            }
        };
        let now = now_ms();
        let admission = if req.pxe {
            match controller.netboot.machines.seen(req.mac, req.arch, true, controller.netboot.config.admission, now) {
                Ok(m) if m.admitted => Admission::Admit,
                Ok(_) => {
                    info!(mac = %req.mac, "PXE client held until an operator admits it");
                    Admission::Hold
                }
                Err(e) => {
                    warn!(mac = %req.mac, cause = %e, "cannot record machine; not booting it");
                    Admission::Hold
                }
            }
        } else {
            Admission::Admit
        };
        if req.pxe && admission == Admission::Admit {
            if let Err(arch) = dhcp::boot_file(server.config(), &req) {
                warn!(mac = %req.mac, arch = %arch, "no iPXE binary for this architecture; not booting it");
            }
        }
        let Some(reply) = server.handle(now, port, &req, admission) else {
            debug!(mac = %req.mac, kind = ?req.kind, "no DHCP answer");
            continue;
        };
        match &reply.lease {
            Some(LeaseChange::Put(l)) => {
                if let Err(e) = controller.netboot.machines.put_lease(l) {
                    warn!(mac = %l.mac, cause = %e, "could not persist lease");
                }
            }
            Some(LeaseChange::Delete(mac)) => {
                if let Err(e) = controller.netboot.machines.delete_lease(mac) {
                    warn!(mac = %mac, cause = %e, "could not delete lease");
                }
            }
            None => {}
        }
        if reply.bytes.is_empty() {
            continue;
        }
        let to = match reply.to {
            Destination::Broadcast => SocketAddr::from((Ipv4Addr::BROADCAST, dhcp::CLIENT_PORT)),
            // A PXE boot-server answer goes back to where the request came from.
            Destination::Unicast(_) if port == dhcp::PXE_PORT => from,
            Destination::Unicast(a) => SocketAddr::V4(a),
        };
        info!(mac = %req.mac, pxe = req.pxe, ipxe = req.ipxe, arch = ?req.arch, answer = %reply.summary, "DHCP");
        if let Err(e) = sock.send_to(&reply.bytes, to).await {
            warn!(%to, cause = %e, "DHCP send failed");
        }
    }
}

/// At most this many TFTP transfers run at once; further requests get an error packet.
const MAX_TFTP_TRANSFERS: usize = 64;

async fn tftp_loop(root: PathBuf, ip: Ipv4Addr, sock: UdpSocket) {
    let limit = Arc::new(Semaphore::new(MAX_TFTP_TRANSFERS));
    let canonical_root = std::fs::canonicalize(&root).unwrap_or(root.clone());
    let mut buf = vec![0u8; 1500];
    loop {
        let (len, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                warn!(cause = %e, "TFTP receive failed");
                continue;
            }
        };
        let refuse = |code, msg: String| {
            let sock = &sock;
            async move {
                let _ = sock.send_to(&tftp::error_packet(code, &msg), from).await;
            }
        };
        let packet = match tftp::parse(&buf[..len]) {
            Ok(p) => p,
            Err(e) => {
                debug!(%from, cause = %e, "ignoring TFTP packet");
                refuse(tftp::ErrorCode::IllegalOperation, e.to_string()).await;
                continue;
            }
        };
        let (path, options) = match tftp::check_request(&root, &packet) {
            Ok(r) => r,
            Err(e) => {
                warn!(%from, cause = %e, "TFTP request refused");
                let code = match e {
                    tftp::TftpError::Traversal(_) | tftp::TftpError::WriteRefused => tftp::ErrorCode::AccessViolation,
                    _ => tftp::ErrorCode::IllegalOperation,
                };
                refuse(code, e.to_string()).await;
                continue;
            }
        };
        // Symlinks must not lead out of the root either.
        let inside = std::fs::canonicalize(&path).ok().filter(|p| p.starts_with(&canonical_root));
        let Some(file) = inside else {
            info!(%from, path = %path.display(), "TFTP file not found");
            refuse(tftp::ErrorCode::NotFound, "file not found".into()).await;
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            refuse(tftp::ErrorCode::Undefined, "server busy".into()).await;
            continue;
        };
        tokio::spawn(
            async move {
                let _permit = permit;
                match tokio::fs::read(&file).await {
                    Ok(data) => send_file(ip, from, data, &options, &file).await,
                    Err(e) => warn!(file = %file.display(), cause = %e, "cannot read TFTP file"),
                }
            }
            .instrument(info_span!("tftp_transfer", %from)),
        );
    }
}

async fn send_file(ip: Ipv4Addr, to: SocketAddr, data: Vec<u8>, options: &[(String, String)], file: &Path) {
    // Each transfer has its own port (its TID, RFC 1350).
    let sock = match UdpSocket::bind(SocketAddr::from((ip, 0))).await {
        Ok(s) => s,
        Err(e) => return warn!(cause = %e, "cannot open a TFTP transfer socket"),
    };
    if let Err(e) = sock.connect(to).await {
        return warn!(cause = %e, "cannot address TFTP client");
    }
    let size = data.len();
    let started = Instant::now();
    let (mut transfer, first) = tftp::Transfer::start(started, data, options, tftp::TransferConfig::default());
    info!(file = %file.display(), size, blksize = transfer.blksize(), "TFTP transfer started");
    let _ = sock.send(&first).await;
    let mut buf = vec![0u8; 1500];
    loop {
        let Some(deadline) = transfer.poll_timeout() else { return };
        let output = tokio::select! {
            r = sock.recv(&mut buf) => match r {
                Ok(n) => transfer.handle(Instant::now(), &buf[..n]),
                // ICMP port unreachable from a client that went away.
                Err(e) => tftp::Output::Failed { packet: None, reason: e.to_string() },
            },
            _ = tokio::time::sleep_until(deadline.into()) => transfer.handle_timeout(Instant::now()),
        };
        match output {
            tftp::Output::Send(p) => {
                let _ = sock.send(&p).await;
            }
            tftp::Output::Nothing => {}
            tftp::Output::Done => {
                info!(file = %file.display(), size, elapsed_ms = started.elapsed().as_millis() as u64, "TFTP transfer done");
                return;
            }
            tftp::Output::Failed { packet, reason } => {
                if let Some(p) = packet {
                    let _ = sock.send(&p).await;
                }
                warn!(file = %file.display(), %reason, "TFTP transfer abandoned");
                return;
            }
        }
    }
}

/// Sends a Wake-on-LAN magic packet for `mac` as a broadcast on the netboot interface.
pub async fn wake(controller: &Controller, mac: &dhcp::Mac) -> Result<(), NetbootError> {
    let iface = controller.netboot.config.interface.clone().ok_or_else(|| NetbootError::NoAddress("(none configured)".into()))?;
    let sock = udp_socket("Wake-on-LAN", SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), Some(&iface))?;
    let packet = machines::magic_packet(mac);
    for port in [9u16, 7] {
        sock.send_to(&packet, SocketAddr::from((Ipv4Addr::BROADCAST, port)))
            .await
            .map_err(|source| NetbootError::Socket { what: "Wake-on-LAN send".into(), source })?;
    }
    info!(%mac, interface = %iface, "sent Wake-on-LAN packet");
    Ok(())
}
