//! (v9) The WireGuard gateway inside the agent (`--wireguard-gateway LISTEN`): performs what
//! [`crate::wireguard::plan`] decides from the controller's WireGuard map and the netmap.
//!
//! - Every member's switch learns who may speak for each network's devices.
//! - A gateway runs `shoal_wireguard`'s gateway on a UDP socket bound to LISTEN (with
//!   `IP_FREEBIND`, so every gateway binds the floating address whether it holds it or not),
//!   bridged into the overlay switch as the network's local port: no second TAP device.
//! - The active gateway adds the floating address to the interface that routes to it and announces
//!   it (unsolicited ARP); a demoted one removes it.
//!
//! The gateway key lives in memory only (in the map and the running gateway).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;

use shoal_overlay::node::OverlayNode;
use shoal_proto::{MacAddr, Netmap, NetworkId, WireGuardMap};
use shoal_wireguard::run::{run, Segment, Served};
use shoal_wireguard::{Gateway, GatewayConfig, Key};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::wireguard::{plan, Serve};

/// Frames queued between the gateway and the switch, each way (a full queue drops, like a NIC's).
const PORT_QUEUE: usize = 1024;

/// The WireGuard side of the agent; it outlives control connections.
#[derive(Default)]
pub(super) struct WireGuardState {
    /// The map last received (holds the gateway key: never logged).
    map: Option<WireGuardMap>,
    running: Option<Running>,
    /// The floating address this agent holds, and on which interface.
    floating: Option<(IpAddr, String)>,
    /// Whether a floating address left on an interface by an earlier run was looked for.
    stale_checked: bool,
}

struct Running {
    network: NetworkId,
    key: Key,
    mac: MacAddr,
    served: watch::Sender<Served>,
    stop: Option<oneshot::Sender<()>>,
    pump: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.pump.abort();
    }
}

/// An agent that stops (SIGTERM, an update's restart) lets go of the floating address, so the
/// next gateway the controller names is the only host answering for it. (A killed agent cannot:
/// its restart removes it as a standby, and the new active's gratuitous ARP has moved the LAN.)
impl Drop for WireGuardState {
    fn drop(&mut self) {
        if let Some((ip, dev)) = self.floating.take() {
            match ip_cmd(&["addr", "del", &host(ip), "dev", &dev]) {
                Ok(_) => {
                    info!(address = %ip, device = %dev, "floating WireGuard address released (agent stopping)")
                }
                Err(e) => {
                    warn!(address = %ip, device = %dev, cause = %e, "could not release the floating WireGuard address")
                }
            }
        }
    }
}

impl WireGuardState {
    /// A new map from the controller (already checked against its bounds).
    pub(super) fn set_map(&mut self, map: WireGuardMap) {
        self.map = Some(map);
    }

    /// Applies the last map to the datapath, as the current netmap shows it; called on every map
    /// and every netmap change (neighbours, this node's MAC).
    pub(super) fn apply(
        &mut self,
        listen: Option<SocketAddr>,
        node: Option<&OverlayNode>,
        netmap: Option<&Netmap>,
    ) {
        let (Some(map), Some(node), Some(netmap)) = (&self.map, node, netmap) else {
            return;
        };
        let plan = plan(map, netmap, listen.is_some());
        for (network, bridging) in plan.bridging {
            node.set_bridging(network, bridging);
        }
        for network in &plan.unserved {
            warn!(
                network = network.0,
                "this agent is a WireGuard gateway of several networks; one UDP port serves one, so this one is not served here"
            );
        }
        match (plan.serve, listen) {
            (Some(serve), Some(listen)) => {
                let active = serve.active;
                self.serve(node, serve, listen);
                self.hold_floating(listen.ip(), active && self.running.is_some());
            }
            _ => {
                self.stop(node);
                self.hold_floating(IpAddr::from([0, 0, 0, 0]), false);
            }
        }
    }

    fn stop(&mut self, node: &OverlayNode) {
        if let Some(r) = self.running.take() {
            node.detach_port(r.network);
            info!(network = r.network.0, "WireGuard gateway stopped");
        }
    }

    fn serve(&mut self, node: &OverlayNode, serve: Serve, listen: SocketAddr) {
        if let Some(r) = &self.running {
            if r.network == serve.network && r.key == serve.key && r.mac == serve.mac {
                // Devices removed here lose their session at once (Gateway::set_devices).
                r.served.send_if_modified(|s| {
                    let changed = *s != serve.served;
                    *s = serve.served.clone();
                    changed
                });
                return;
            }
        }
        self.stop(node);
        let socket = match bind_freebind(listen) {
            Ok(s) => s,
            Err(e) => {
                warn!(%listen, cause = %e, "WireGuard gateway not started: cannot bind its UDP port");
                return;
            }
        };
        let gateway = Gateway::new(GatewayConfig::default(), serve.key, serve.mac);
        let (served, served_rx) = watch::channel(serve.served.clone());
        let (to_port, from_segment) = mpsc::channel(PORT_QUEUE);
        let (to_segment, mut from_gateway) = mpsc::channel::<Vec<u8>>(PORT_QUEUE);
        let mut port = node.attach_port(serve.network, to_port);
        let pump = tokio::spawn(async move {
            while let Some(frame) = from_gateway.recv().await {
                port.send(&frame).await;
            }
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let network = serve.network;
        tokio::spawn(async move {
            let segment = Segment {
                to_segment,
                from_segment,
            };
            if let Err(e) = run(socket, gateway, served_rx, segment, async {
                let _ = stopped.await;
            })
            .await
            {
                warn!(network = network.0, cause = %e, "WireGuard gateway stopped");
            }
        });
        info!(network = network.0, %listen, mac = %serve.mac, "WireGuard gateway serving");
        self.running = Some(Running {
            network,
            key: serve.key,
            mac: serve.mac,
            served,
            stop: Some(stop),
            pump,
        });
    }

    /// Adds (`hold`) or removes the floating address.
    fn hold_floating(&mut self, ip: IpAddr, hold: bool) {
        match (&self.floating, hold) {
            (Some((held, _)), true) if *held == ip => {}
            (None, false) if self.stale_checked || ip.is_unspecified() => {}
            (None, false) => {
                // An earlier run (killed while active) may have left it: a standby must not hold it.
                self.stale_checked = true;
                if let Ok(out) = ip_cmd(&["-o", "addr", "show", "to", &host(ip)]) {
                    if let Some(dev) = out.split_whitespace().nth(1) {
                        let dev = dev.trim_end_matches(':').to_owned();
                        match ip_cmd(&["addr", "del", &host(ip), "dev", &dev]) {
                            Ok(_) => {
                                info!(address = %ip, device = %dev, "stale floating WireGuard address removed (not the active gateway)")
                            }
                            Err(e) => {
                                warn!(address = %ip, device = %dev, cause = %e, "could not remove a stale floating WireGuard address")
                            }
                        }
                    }
                }
            }
            (Some((held, dev)), _) => {
                let (held, dev) = (*held, dev.clone());
                if let Err(e) = ip_cmd(&["addr", "del", &host(held), "dev", &dev]) {
                    warn!(address = %held, device = %dev, cause = %e, "could not remove the floating WireGuard address");
                }
                info!(address = %held, device = %dev, "floating WireGuard address released");
                self.floating = None;
                if hold {
                    self.hold_floating(ip, true);
                }
            }
            (None, true) => match take_address(ip) {
                Ok(dev) => {
                    info!(address = %ip, device = %dev, "floating WireGuard address taken (active gateway)");
                    announce(ip, &dev);
                    self.floating = Some((ip, dev));
                }
                Err(e) => {
                    warn!(address = %ip, cause = %e, "could not take the floating WireGuard address")
                }
            },
        }
    }
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    }
}

fn ip_cmd(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Adds `ip` to the interface that routes to it (or finds it already there); returns the
/// interface.
fn take_address(ip: IpAddr) -> Result<String, String> {
    // Already held (an agent restarted while active)?
    let held = ip_cmd(&["-o", "addr", "show", "to", &host(ip)])?;
    if let Some(dev) = held.split_whitespace().nth(1) {
        return Ok(dev.trim_end_matches(':').to_owned());
    }
    let route = ip_cmd(&["-o", "route", "get", &ip.to_string()])?;
    let mut words = route.split_whitespace();
    let dev = words
        .by_ref()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .ok_or_else(|| format!("no interface routes to {ip}"))?
        .to_owned();
    ip_cmd(&["addr", "add", &host(ip), "dev", &dev])?;
    Ok(dev)
}

/// Announces `ip` on `dev` with gratuitous ARP (twice, a second apart, as arping does), so the
/// LAN's router switches to this gateway at once instead of when its neighbour entry goes stale.
/// Sent from the agent itself on a packet socket: no arping needed (busybox's takes other flags).
fn announce(ip: IpAddr, dev: &str) {
    let IpAddr::V4(ip) = ip else {
        return;
    };
    let dev = dev.to_owned();
    tokio::spawn(async move {
        for round in 0..2 {
            if round > 0 {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            if let Err(e) = send_gratuitous_arp(ip, &dev) {
                warn!(address = %ip, device = %dev, cause = %e, "could not announce the floating WireGuard address");
                return;
            }
        }
    });
}

/// One gratuitous ARP for `ip` from `dev`'s MAC, sent on `dev`.
fn send_gratuitous_arp(ip: std::net::Ipv4Addr, dev: &str) -> std::io::Result<()> {
    use nix::libc;
    use nix::sys::socket::SockaddrLike;
    use nix::sys::socket::{sendto, socket, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType};
    let sys = std::path::Path::new("/sys/class/net").join(dev);
    let index: i32 = std::fs::read_to_string(sys.join("ifindex"))?
        .trim()
        .parse()
        .map_err(|_| std::io::Error::other("unreadable ifindex"))?;
    let mac: MacAddr = std::fs::read_to_string(sys.join("address"))?
        .trim()
        .parse()
        .map_err(|_| std::io::Error::other("unreadable MAC address"))?;
    let frame = shoal_wireguard::bridge::gratuitous_arp(mac, ip);
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut sll: libc::sockaddr_ll = empty_sockaddr_ll();
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
    sll.sll_ifindex = index;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&MacAddr::BROADCAST.0);
    #[allow(unsafe_code)]
    // SAFETY: `sll` is a valid, fully initialised sockaddr_ll of the length given.
    let addr = unsafe {
        LinkAddr::from_raw(
            (&sll as *const libc::sockaddr_ll).cast(),
            Some(std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t),
        )
    }
    .ok_or_else(|| std::io::Error::other("bad link address"))?;
    sendto(fd.as_raw_fd(), &frame, &addr, MsgFlags::empty())?;
    Ok(())
}

/// A `sockaddr_ll` with every field zero, to fill in.
fn empty_sockaddr_ll() -> nix::libc::sockaddr_ll {
    nix::libc::sockaddr_ll {
        sll_family: 0,
        sll_protocol: 0,
        sll_ifindex: 0,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    }
}

/// A UDP socket on `addr` with `IP_FREEBIND`: it binds whether or not the address is on this
/// host yet.
fn bind_freebind(addr: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage,
    };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::IpFreebind, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(fd))
}
