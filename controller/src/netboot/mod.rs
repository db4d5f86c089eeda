//! Netboot: DHCP (full or proxy), TFTP for iPXE, HTTP for per-machine iPXE scripts and images, the
//! signed image store, and the machines seen on the netboot network.
//!
//! - [`dhcp`] and [`tftp`] are sans-IO cores; [`serve`] here runs them on sockets bound to the
//!   netboot interface.
//! - [`http`] serves `GET /boot/<mac>.ipxe` (mints a single-use join token for that boot, only for
//!   a MAC the DHCP server just saw PXE-boot: [`boot_tokens`]) and `GET /images/<version>/<file>`
//!   over plain HTTP on the netboot interface, with header, idle and connection limits.
//! - [`images`] keeps signed images; [`machines`] the machine table, leases and image assignments.
//! - [`slots`] counts TFTP transfers and HTTP connections per client address and overall.
//! - [`routes`] adds the admin API routes (`/v1/images`, `/v1/machines`, `/v1/nodes/{id}/image`).
//!
//! Every socket is bound to the netboot interface (`SO_BINDTODEVICE`), not only to its address: a
//! packet that reaches the address over another interface (or loopback) is not served, so a DHCP
//! sighting and a boot script request both come from the netboot LAN.
//!
//! The image store and the machine table exist whether or not the servers run, so images can be
//! added before netboot is switched on.

pub mod routes;
pub use shoal_controller_core::netboot::{boot_tokens, dhcp, slots, tftp};
#[doc(hidden)]
pub mod fuzz_harness;
pub mod http;
pub mod images;
pub mod machines;

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{net::UdpSocket, task::JoinHandle};
use tracing::{debug, info, info_span, warn, Instrument};

use self::{
    boot_tokens::{BootTokenGate, GateConfig},
    dhcp::{Admission, Destination, DhcpConfig, DhcpMode, DhcpServer, LeaseChange, Leases},
    images::ImageStore,
    machines::{AdmissionPolicy, MachineStore, OuiTable},
    slots::{SharedSlots, SlotLimits},
};
use crate::{server::now_ms, server::Controller, store::Store, store::StoreError};

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
    /// When a boot script may mint a token: the sighting window (default 2 minutes), the rate
    /// (default a burst of 64, then one a second) and the MACs remembered (default 4096);
    /// [`GateConfig`].
    pub boot_tokens: GateConfig,
    /// Rows of the machine table; default [`machines::DEFAULT_MAX_MACHINES`] (10,000).
    pub max_machines: usize,
    /// Boot HTTP server limits; default [`http::HttpLimits::default`] (headers within 10 s, idle 30
    /// s, 256 connections, 8 per client address).
    pub http: http::HttpLimits,
    /// TFTP transfers at once; default 64 over all clients, 4 per client address.
    pub tftp_slots: SlotLimits,
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
            boot_tokens: GateConfig::default(),
            max_machines: machines::DEFAULT_MAX_MACHINES,
            http: http::HttpLimits::default(),
            tftp_slots: DEFAULT_TFTP_SLOTS,
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
    /// PXE sightings, outstanding boot tokens and the minting rate (in memory).
    gate: std::sync::Mutex<BootTokenGate>,
}

impl Netboot {
    /// Opens the image store (`DATA_DIR/images`) and the machine trees.
    pub fn open(
        config: NetbootConfig,
        data_dir: &Path,
        store: &Store,
    ) -> Result<Netboot, NetbootError> {
        let keys = config
            .image_keys
            .iter()
            .map(|p| images::read_key(p))
            .collect::<Result<Vec<_>, _>>()?;
        let images = ImageStore::open(data_dir.join("images"), keys)?;
        let machines = MachineStore::open(store, config.max_machines)?;
        let oui = if config.interface.is_some() {
            OuiTable::load(&config.oui_file)
        } else {
            OuiTable::default()
        };
        let gate = std::sync::Mutex::new(BootTokenGate::new(config.boot_tokens, Instant::now()));
        Ok(Netboot {
            config,
            images,
            machines,
            oui,
            boot: std::sync::OnceLock::new(),
            gate,
        })
    }

    /// The boot-token gate. Held only for in-memory decisions, never across I/O.
    pub(crate) fn gate(&self) -> std::sync::MutexGuard<'_, BootTokenGate> {
        // Its maps stay usable whatever panicked while holding the lock.
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The netboot interface's IPv4 address and netmask.
    pub fn interface_addr(&self) -> Result<Option<(Ipv4Addr, Ipv4Addr)>, NetbootError> {
        let Some(iface) = &self.config.interface else {
            return Ok(None);
        };
        interface_ipv4(iface).map(Some)
    }
}

/// The first IPv4 address and netmask of an interface.
pub fn interface_ipv4(iface: &str) -> Result<(Ipv4Addr, Ipv4Addr), NetbootError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| NetbootError::Socket {
        what: "getifaddrs".into(),
        source: e.into(),
    })?;
    for a in addrs {
        if a.interface_name != iface {
            continue;
        }
        let ip = a
            .address
            .as_ref()
            .and_then(|s| s.as_sockaddr_in())
            .map(|s| s.ip());
        let mask = a
            .netmask
            .as_ref()
            .and_then(|s| s.as_sockaddr_in())
            .map(|s| s.ip());
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

/// TFTP transfers at once: 64 over all clients, 4 per client address (a PXE client needs one; a
/// retransmitted request may briefly start a second).
pub const DEFAULT_TFTP_SLOTS: SlotLimits = SlotLimits {
    total: 64,
    per_client: 4,
};

/// A UDP socket on `addr`, bound to `iface` (`SO_BINDTODEVICE`), so it never sees a packet that
/// arrived on another interface.
fn udp_socket(
    what: &str,
    addr: SocketAddrV4,
    iface: Option<&str>,
) -> Result<UdpSocket, NetbootError> {
    let err = |source| NetbootError::Socket {
        what: format!("{what} ({addr})"),
        source,
    };
    let std = std::net::UdpSocket::bind(addr).map_err(err)?;
    std.set_broadcast(true).map_err(err)?;
    std.set_nonblocking(true).map_err(err)?;
    let sock = UdpSocket::from_std(std).map_err(err)?;
    if let Some(iface) = iface {
        sock.bind_device(Some(iface.as_bytes())).map_err(err)?;
    }
    Ok(sock)
}

/// The boot HTTP listener on `addr`, bound to `iface` before its address.
fn tcp_listener(addr: SocketAddr, iface: &str) -> Result<tokio::net::TcpListener, NetbootError> {
    let err = |source| NetbootError::Socket {
        what: format!("HTTP ({addr})"),
        source,
    };
    let sock = tokio::net::TcpSocket::new_v4().map_err(err)?;
    sock.set_reuseaddr(true).map_err(err)?;
    sock.bind_device(Some(iface.as_bytes())).map_err(err)?;
    sock.bind(addr).map_err(err)?;
    sock.listen(1024).map_err(err)
}

/// Starts DHCP, TFTP and HTTP on the netboot interface, if one is configured. `agent_port` is the
/// controller's QUIC port, put in the kernel command line together with the interface's address.
pub async fn serve(
    controller: Arc<Controller>,
    agent_port: u16,
) -> Result<Option<Servers>, NetbootError> {
    let nb = &controller.netboot;
    let Some(iface) = nb.config.interface.clone() else {
        return Ok(None);
    };
    let (ip, mask) = interface_ipv4(&iface)?;
    let http_addr = SocketAddr::from((ip, nb.config.http_port));
    let http_base = format!("http://{http_addr}");

    let mut dhcp_config = DhcpConfig::new(nb.config.dhcp.clone(), ip, mask, http_base.clone());
    dhcp_config.router = nb.config.router;
    dhcp_config.dns = nb.config.dns.clone();
    dhcp_config.lease_secs = nb
        .config
        .lease_time
        .as_secs()
        .clamp(60, u64::from(u32::MAX)) as u32;
    dhcp_config.boot_files = nb.config.boot_files.clone();
    let machines = nb.machines.clone();
    let leases = tokio::task::spawn_blocking(move || machines.leases())
        .await
        .map_err(|e| NetbootError::Store(StoreError::Db(e.to_string())))??;
    let server = DhcpServer::new(dhcp_config, Leases::new(leases));

    let dhcp67 = udp_socket(
        "DHCP",
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, dhcp::SERVER_PORT),
        Some(&iface),
    )?;
    let dhcp4011 = udp_socket(
        "PXE",
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, dhcp::PXE_PORT),
        Some(&iface),
    )?;
    let tftp = udp_socket("TFTP", SocketAddrV4::new(ip, tftp::PORT), Some(&iface))?;
    let http = tcp_listener(http_addr, &iface)?;
    let boot = http::BootContext {
        controller_addr: SocketAddr::from((ip, agent_port)),
        http_base,
    };
    let _ = nb.boot.set(boot.clone());
    info!(interface = %iface, address = %ip, mode = ?nb.config.dhcp, http = %http_addr, tftp_root = %nb.config.tftp_root.display(), "netboot servers running");
    let tftp_server = TftpServer {
        root: nb.config.tftp_root.clone(),
        ip,
        iface: Some(iface.clone()),
        slots: nb.config.tftp_slots,
    };
    let tasks = vec![
        tokio::spawn(
            dhcp_loop(controller.clone(), server, dhcp67, dhcp4011).instrument(info_span!("dhcp")),
        ),
        tokio::spawn(tftp_server.run(tftp).instrument(info_span!("tftp"))),
        tokio::spawn(http::run(controller.clone(), boot, http).instrument(info_span!("boot_http"))),
    ];
    Ok(Some(Servers { tasks }))
}

/// Writes lease changes, in order, on a blocking thread; on disk when this returns.
async fn persist_leases(machines: &MachineStore, changes: &[LeaseChange]) {
    let machines = machines.clone();
    let changes = changes.to_vec();
    let written = tokio::task::spawn_blocking(move || {
        for c in &changes {
            let (mac, result) = match c {
                LeaseChange::Put(l) => (l.mac, machines.put_lease(l)),
                LeaseChange::Delete(mac) => (*mac, machines.delete_lease(mac)),
            };
            if let Err(e) = result {
                warn!(%mac, cause = %e, "could not persist lease change");
            }
        }
    })
    .await;
    if let Err(e) = written {
        warn!(cause = %e, "lease writer failed");
    }
}

/// Records a PXE client in the machine table (a blocking thread) and decides its admission.
async fn admit_pxe_client(
    controller: &Controller,
    req: &dhcp::Request,
    now: shoal_proto::UnixMillis,
    full_warned: &mut Option<Instant>,
) -> Admission {
    let policy = controller.netboot.config.admission;
    let machines = controller.netboot.machines.clone();
    let (mac, arch) = (req.mac, req.arch);
    let seen =
        tokio::task::spawn_blocking(move || machines.seen(mac, arch, true, policy, now)).await;
    match seen {
        Ok(Ok(Some(m))) if m.admitted => Admission::Admit,
        Ok(Ok(Some(_))) => {
            info!(%mac, "PXE client held until an operator admits it");
            Admission::Hold
        }
        Ok(Ok(None)) => {
            // Not recorded: the table is full. The policy still decides whether it boots.
            if full_warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                *full_warned = Some(Instant::now());
                let ms = &controller.netboot.machines;
                warn!(%mac, max_machines = ms.max_machines(), not_recorded = ms.not_recorded(), "machine table full: new PXE clients are not recorded");
            }
            if policy == AdmissionPolicy::AdmitAll {
                Admission::Admit
            } else {
                Admission::Hold
            }
        }
        Ok(Err(e)) => {
            warn!(%mac, cause = %e, "cannot record machine; not booting it");
            Admission::Hold
        }
        Err(e) => {
            warn!(%mac, cause = %e, "machine recorder failed; not booting it");
            Admission::Hold
        }
    }
}

async fn dhcp_loop(
    controller: Arc<Controller>,
    mut server: DhcpServer,
    s67: UdpSocket,
    s4011: UdpSocket,
) {
    let mut b67 = vec![0u8; 1500];
    let mut b4011 = vec![0u8; 1500];
    let mut full_warned = None;
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
        let bytes = if port == dhcp::SERVER_PORT {
            &b67[..len]
        } else {
            &b4011[..len]
        };
        let req = match dhcp::parse(bytes) {
            Ok(r) => r,
            Err(e) => {
                debug!(%from, cause = %e, "ignoring DHCP packet");
                continue;
            }
        };
        if !controller.cluster.is_leader() {
            // One DHCP server per LAN: the leader's. Followers keep TFTP and HTTP.
            continue;
        }
        let now = now_ms();
        if dhcp::is_boot_sighting(&req) {
            // The socket is bound to the netboot interface: this MAC is PXE-booting on that LAN
            // now.
            controller
                .netboot
                .gate()
                .saw_pxe_boot(req.mac, Instant::now());
        }
        let admission = if req.pxe {
            admit_pxe_client(&controller, &req, now, &mut full_warned).await
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
        // A lease is on disk before the client hears of it.
        if !reply.leases.is_empty() {
            persist_leases(&controller.netboot.machines, &reply.leases).await;
        }
        if reply.bytes.is_empty() {
            info!(mac = %req.mac, kind = ?req.kind, answer = %reply.summary, "DHCP");
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

/// The TFTP server's shell: the root it serves, the address and interface its transfer sockets use,
/// and its transfer slots ([`slots`]: a request beyond them gets an error packet).
#[derive(Debug, Clone)]
pub struct TftpServer {
    /// Directory served.
    pub root: PathBuf,
    /// Address transfer sockets bind to.
    pub ip: Ipv4Addr,
    /// Interface transfer sockets bind to; `None` for none (tests on loopback).
    pub iface: Option<String>,
    /// Transfers at once, overall and per client address.
    pub slots: SlotLimits,
}

impl TftpServer {
    /// Serves read requests arriving on `sock` until the task is aborted.
    pub async fn run(self, sock: UdpSocket) {
        let slots = SharedSlots::new(self.slots);
        let root = self.root.clone();
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
                        tftp::TftpError::Traversal(_) | tftp::TftpError::WriteRefused => {
                            tftp::ErrorCode::AccessViolation
                        }
                        _ => tftp::ErrorCode::IllegalOperation,
                    };
                    refuse(code, e.to_string()).await;
                    continue;
                }
            };
            // Symlinks must not lead out of the root either.
            let inside = std::fs::canonicalize(&path)
                .ok()
                .filter(|p| p.starts_with(&canonical_root));
            let Some(file) = inside else {
                info!(%from, path = %path.display(), "TFTP file not found");
                refuse(tftp::ErrorCode::NotFound, "file not found".into()).await;
                continue;
            };
            let slot = match slots.acquire(from.ip()) {
                Ok(s) => s,
                Err(e) => {
                    warn!(%from, cause = %e, in_use = slots.in_use(), "TFTP request refused");
                    refuse(tftp::ErrorCode::Undefined, e.to_string()).await;
                    continue;
                }
            };
            let (ip, iface) = (self.ip, self.iface.clone());
            tokio::spawn(
                async move {
                    let _slot = slot;
                    match tokio::fs::read(&file).await {
                        Ok(data) => {
                            send_file(ip, iface.as_deref(), from, data, &options, &file).await
                        }
                        Err(e) => {
                            warn!(file = %file.display(), cause = %e, "cannot read TFTP file")
                        }
                    }
                }
                .instrument(info_span!("tftp_transfer", %from)),
            );
        }
    }
}

async fn send_file(
    ip: Ipv4Addr,
    iface: Option<&str>,
    to: SocketAddr,
    data: Vec<u8>,
    options: &[(String, String)],
    file: &Path,
) {
    // Each transfer has its own port (its TID, RFC 1350), on the netboot interface too.
    let sock = match udp_socket("TFTP transfer", SocketAddrV4::new(ip, 0), iface) {
        Ok(s) => s,
        Err(e) => return warn!(cause = %e, "cannot open a TFTP transfer socket"),
    };
    if let Err(e) = sock.connect(to).await {
        return warn!(cause = %e, "cannot address TFTP client");
    }
    let size = data.len();
    let started = Instant::now();
    let (mut transfer, first) =
        tftp::Transfer::start(started, data, options, tftp::TransferConfig::default());
    info!(file = %file.display(), size, blksize = transfer.blksize(), "TFTP transfer started");
    let _ = sock.send(&first).await;
    let mut buf = vec![0u8; 1500];
    loop {
        let Some(deadline) = transfer.poll_timeout() else {
            return;
        };
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
    let iface = controller
        .netboot
        .config
        .interface
        .clone()
        .ok_or_else(|| NetbootError::NoAddress("(none configured)".into()))?;
    let sock = udp_socket(
        "Wake-on-LAN",
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        Some(&iface),
    )?;
    let packet = machines::magic_packet(mac);
    for port in [9u16, 7] {
        sock.send_to(&packet, SocketAddr::from((Ipv4Addr::BROADCAST, port)))
            .await
            .map_err(|source| NetbootError::Socket {
                what: "Wake-on-LAN send".into(),
                source,
            })?;
    }
    info!(%mac, interface = %iface, "sent Wake-on-LAN packet");
    Ok(())
}

#[cfg(test)]
mod tests {
    use shoal_testkit::wait_async;

    use super::*;
    use tftp::Packet;

    /// The first packet a read request from a fresh socket on `from` gets: the packet and its
    /// sender.
    async fn read_request(server: SocketAddr, from: Ipv4Addr) -> (UdpSocket, Packet, SocketAddr) {
        let sock = UdpSocket::bind((from, 0)).await.expect("client socket");
        let rrq = tftp::encode(&Packet::Rrq {
            filename: "undionly.kpxe".into(),
            mode: "octet".into(),
            options: vec![],
        });
        sock.send_to(&rrq, server).await.expect("send");
        let mut buf = vec![0u8; 1500];
        let (n, sender) = tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf))
            .await
            .expect("an answer")
            .expect("recv");
        let packet = tftp::parse(&buf[..n]).expect("answer parses");
        (sock, packet, sender)
    }

    fn refusal(p: &Packet) -> Option<&str> {
        match p {
            Packet::Error { message, .. } => Some(message),
            _ => None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tftp_transfers_are_capped_per_client_and_overall_and_good_clients_finish() {
        let root = tempfile::tempdir().expect("tempdir");
        let file: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(root.path().join("undionly.kpxe"), &file).expect("write");
        let sock = udp_socket("TFTP", SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), None)
            .expect("server socket");
        let server = sock.local_addr().expect("addr");
        let tftp = TftpServer {
            root: root.path().to_owned(),
            ip: Ipv4Addr::LOCALHOST,
            iface: None,
            slots: SlotLimits {
                total: 3,
                per_client: 2,
            },
        };
        let task = tokio::spawn(tftp.run(sock));
        let (a, b, c) = (
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::new(127, 0, 0, 2),
            Ipv4Addr::new(127, 0, 0, 3),
        );

        // Client A gets two transfers (it does not acknowledge, so they hold their slots)...
        let (a1, p1, a1_tid) = read_request(server, a).await;
        let (_a2, p2, _) = read_request(server, a).await;
        assert!(
            matches!(p1, Packet::Data { block: 1, .. })
                && matches!(p2, Packet::Data { block: 1, .. }),
            "{p1:?} {p2:?}"
        );
        // ...and no third: its share is two.
        let (_, p3, from) = read_request(server, a).await;
        assert_eq!(
            refusal(&p3),
            Some("this client already holds its 2 slots"),
            "{p3:?}"
        );
        assert_eq!(
            from, server,
            "refused by the server port, no transfer started"
        );
        // B still gets the last slot, C finds none left.
        let (b_sock, pb, b_tid) = read_request(server, b).await;
        let Packet::Data { block: 1, data } = pb else {
            panic!("B refused: {pb:?}")
        };
        let (_, pc, _) = read_request(server, c).await;
        assert_eq!(
            refusal(&pc),
            Some("server busy: all 3 slots are in use"),
            "{pc:?}"
        );

        // B, a good client, downloads the whole file.
        let mut got = data;
        let mut block = 1u16;
        let mut buf = vec![0u8; 1500];
        loop {
            b_sock
                .send_to(&tftp::encode(&Packet::Ack { block }), b_tid)
                .await
                .expect("ack");
            let (n, _) = tokio::time::timeout(Duration::from_secs(10), b_sock.recv_from(&mut buf))
                .await
                .expect("next block")
                .expect("recv");
            match tftp::parse(&buf[..n]).expect("parses") {
                Packet::Data { block: n, data } if n == block + 1 => {
                    block = n;
                    let last = data.len() < tftp::DEFAULT_BLKSIZE;
                    got.extend(data);
                    if last {
                        b_sock
                            .send_to(&tftp::encode(&Packet::Ack { block }), b_tid)
                            .await
                            .expect("ack");
                        break;
                    }
                }
                Packet::Data { .. } => {} // a retransmission
                other => panic!("B got {other:?}"),
            }
        }
        assert_eq!(got, file, "B got the file");

        // A abandons one transfer (an error packet to its port): its slot is free again.
        a1.send_to(
            &tftp::encode(&Packet::Error {
                code: 0,
                message: "bye".into(),
            }),
            a1_tid,
        )
        .await
        .expect("error");
        wait_async::eventually(
            Duration::from_secs(5),
            "A to be served again after giving a slot back",
            || async move {
                let (_, p, _) = read_request(server, a).await;
                matches!(p, Packet::Data { block: 1, .. }).then_some(())
            },
        )
        .await;
        task.abort();
    }
}
