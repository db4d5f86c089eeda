//! The agent's side of the overlay that is not datapath: the shared UDP socket and its relay pumps,
//! the netmap (applying deltas, caching it on disk), local endpoints, and NAT mapping detection.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use shoal_overlay::{
    recv_msg,
    relay_socket::{parse_relay_datagram, relay_datagram, RelayInjector, RelaySocket},
    tls,
};
use shoal_proto::{ControllerMsg, NatMapping, Netmap, NetmapDelta, NetmapGap, UnixMillis};
use tokio::sync::watch;
use tracing::{debug, warn};

const NETMAP_FILE: &str = "netmap.bin";
const PORT_FILE: &str = "overlay.port";

/// The agent's endpoint and the relay plumbing around it.
#[derive(Debug)]
pub struct AgentEndpoint {
    /// The quinn endpoint every connection uses.
    pub endpoint: quinn::Endpoint,
    /// The control connection the relay goes through, when there is one.
    pub control: watch::Sender<Option<quinn::Connection>>,
    /// Where relayed packets from the controller go in.
    pub injector: RelayInjector,
    /// The bound UDP port.
    pub port: u16,
}

/// Binds the agent's one UDP socket. The port is kept in the state dir: after a restart the agent's
/// NAT mapping, and so the endpoint its peers have cached, stays the same, which lets peers reach a
/// restarted agent even while the controller is down. `port` overrides it; 0 means "the kept one,
/// or a random one the first time".
pub fn bind_endpoint(state_dir: &Path, ipv6: bool, port: u16) -> std::io::Result<AgentEndpoint> {
    let kept = std::fs::read_to_string(state_dir.join(PORT_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok());
    let ip: IpAddr = if ipv6 {
        IpAddr::from([0u16; 8])
    } else {
        IpAddr::from([0u8; 4])
    };
    let socket = match (port, kept) {
        (0, Some(p)) => std::net::UdpSocket::bind((ip, p)).or_else(|e| {
            warn!(port = p, cause = %e, "the kept overlay port is taken; using a new one (peers learn it from the controller)");
            std::net::UdpSocket::bind((ip, 0))
        })?,
        (p, _) => std::net::UdpSocket::bind((ip, p))?,
    };
    let port = socket.local_addr()?.port();
    if kept != Some(port) {
        shoal_overlay::pki::write_private_file(
            &state_dir.join(PORT_FILE),
            format!("{port}\n").as_bytes(),
            0o600,
        )?;
    }
    let (socket, channels, _stats) = RelaySocket::wrap(socket)?;
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let (control, control_rx) = watch::channel(None::<quinn::Connection>);
    tokio::spawn(relay_out(channels.outbound, control_rx));
    Ok(AgentEndpoint {
        endpoint,
        control,
        injector: channels.injector,
        port,
    })
}

/// Packets quinn addressed to relay addresses go out as datagrams on the control connection.
async fn relay_out(
    mut outbound: tokio::sync::mpsc::Receiver<shoal_overlay::relay_socket::RelayPacket>,
    control: watch::Receiver<Option<quinn::Connection>>,
) {
    while let Some(p) = outbound.recv().await {
        let conn = control.borrow().clone();
        match conn {
            Some(conn) => {
                if let Err(e) = conn.send_datagram(relay_datagram(p.to, &p.packet)) {
                    debug!(cause = %e, "relay datagram not sent");
                }
            }
            None => debug!("no control connection: relay packet dropped"),
        }
    }
}

/// Relayed packets arriving on the control connection go into the socket until the connection ends.
pub async fn relay_in(conn: quinn::Connection, injector: RelayInjector) {
    while let Ok(d) = conn.read_datagram().await {
        match parse_relay_datagram(&d) {
            Some((from, packet)) => {
                if !injector.inject(from, packet) {
                    debug!("relay inbound queue full: packet dropped");
                }
            }
            None => debug!(len = d.len(), "runt relay datagram dropped"),
        }
    }
}

/// The agent's netmap and its on-disk copy.
#[derive(Debug)]
pub struct NetmapCache {
    path: PathBuf,
    current: Option<Netmap>,
}

/// What became of a delta.
#[derive(Debug, PartialEq)]
pub enum DeltaOutcome {
    /// Applied; here is the new map.
    Applied,
    /// It does not follow the map the agent has: ask for a full one.
    Gap(NetmapGap),
}

impl NetmapCache {
    /// Loads the cached netmap if it is still valid at `now`.
    pub fn load(state_dir: &Path, now: UnixMillis) -> NetmapCache {
        let path = state_dir.join(NETMAP_FILE);
        let current = match std::fs::read(&path) {
            Ok(bytes) => match postcard::from_bytes::<Netmap>(&bytes) {
                Ok(map) if map.valid_until.0 > now.0 => Some(map),
                Ok(map) => {
                    warn!(
                        valid_until = map.valid_until.0,
                        "cached netmap has expired; waiting for the controller"
                    );
                    None
                }
                Err(e) => {
                    warn!(path = %path.display(), cause = %e, "cached netmap is unreadable; ignoring it");
                    None
                }
            },
            Err(_) => None,
        };
        NetmapCache { path, current }
    }

    /// The current map.
    pub fn get(&self) -> Option<&Netmap> {
        self.current.as_ref()
    }

    /// Its version, for OverlayHello.
    pub fn version(&self) -> Option<u64> {
        self.current.as_ref().map(|m| m.version)
    }

    /// Replaces the map with a full one from the controller.
    pub fn replace(&mut self, map: Netmap) {
        self.current = Some(map);
        self.save();
    }

    /// Applies a delta.
    pub fn apply(&mut self, delta: &NetmapDelta) -> DeltaOutcome {
        let Some(map) = self.current.as_mut() else {
            return DeltaOutcome::Gap(NetmapGap {
                have: 0,
                delta_from: delta.from_version,
            });
        };
        match map.apply(delta) {
            Ok(()) => {
                self.save();
                DeltaOutcome::Applied
            }
            Err(gap) => DeltaOutcome::Gap(gap),
        }
    }

    /// Forgets the map (the node was removed).
    pub fn clear(&mut self) {
        self.current = None;
        let _ = std::fs::remove_file(&self.path);
    }

    fn save(&self) {
        let Some(map) = &self.current else { return };
        let result = postcard::to_allocvec(map)
            .map_err(std::io::Error::other)
            .and_then(|bytes| shoal_overlay::pki::write_private_file(&self.path, &bytes, 0o600));
        if let Err(e) = result {
            warn!(path = %self.path.display(), cause = %e, "could not cache the netmap");
        }
    }
}

/// The machine's addresses peers on the same LAN could use, with the agent's port: every IPv4
/// address of an interface that is up, except loopback and the overlay's own TAP devices (the
/// overlay must never be carried over itself).
pub fn local_endpoints(port: u16, tap_prefix: &str) -> Vec<SocketAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return vec![];
    };
    let mut out: Vec<SocketAddr> = addrs
        .filter(|a| !a.interface_name.starts_with(tap_prefix))
        .filter(|a| a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP))
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())))
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Classifies the NAT from the address the controller saw on its main port and on its probe port.
pub fn classify_nat(
    main: SocketAddr,
    probe: Option<SocketAddr>,
    local: &[SocketAddr],
) -> NatMapping {
    if local.contains(&main) {
        return NatMapping::None;
    }
    match probe {
        None => NatMapping::Unknown,
        Some(p) if p == main => NatMapping::EndpointIndependent,
        Some(_) => NatMapping::EndpointDependent,
    }
}

/// Asks the controller's probe port which address it sees for this endpoint.
pub async fn probe_observed(
    endpoint: &quinn::Endpoint,
    client: quinn::ClientConfig,
    probe: SocketAddr,
) -> Result<SocketAddr, String> {
    let attempt = async {
        let conn = endpoint
            .connect_with(client, probe, tls::controller_server_name())
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let mut recv = conn.accept_uni().await.map_err(|e| e.to_string())?;
        let msg = recv_msg::<ControllerMsg>(&mut recv)
            .await
            .map_err(|e| e.to_string())?;
        conn.close(0u32.into(), b"");
        match msg {
            Some(ControllerMsg::Observed(o)) => Ok(o.address),
            other => Err(format!("unexpected probe answer: {other:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .map_err(|_| "probe timed out".to_owned())?
}

/// Addresses peers saw this node at on direct paths that neither its interfaces nor the
/// controller show (behind two layers of NAT, say): sent with its local endpoints, so other peers
/// attempt them too. At most [`PeerObserved::MAX`], newest kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerObserved(Vec<SocketAddr>);

impl PeerObserved {
    /// The most kept: each is a handshake per round for every peer, and a peer could tell lies.
    pub const MAX: usize = 4;

    /// A peer saw this node at `addr`; true if that is a new candidate (worth a new hello).
    pub fn learn(
        &mut self,
        addr: SocketAddr,
        controller_seen: Option<SocketAddr>,
        local: &[SocketAddr],
    ) -> bool {
        if Some(addr) == controller_seen || local.contains(&addr) || self.0.contains(&addr) {
            return false;
        }
        if self.0.len() == Self::MAX {
            self.0.remove(0);
        }
        self.0.push(addr);
        true
    }

    /// `local` followed by the learnt addresses it lacks.
    pub fn with_local(&self, mut local: Vec<SocketAddr>) -> Vec<SocketAddr> {
        for a in &self.0 {
            if !local.contains(a) {
                local.push(*a);
            }
        }
        local
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn peer_observed_addresses_are_new_candidates_only_and_bounded() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let controller = Some(a("203.0.113.1:4000"));
        let local = [a("10.0.0.5:4000")];
        let mut seen = PeerObserved::default();
        assert!(
            !seen.learn(a("203.0.113.1:4000"), controller, &local),
            "the controller's"
        );
        assert!(
            !seen.learn(a("10.0.0.5:4000"), controller, &local),
            "a local one"
        );
        assert!(seen.learn(a("100.64.0.9:4000"), controller, &local));
        assert!(
            !seen.learn(a("100.64.0.9:4000"), controller, &local),
            "known"
        );
        for port in 1..=PeerObserved::MAX as u16 {
            assert!(seen.learn(
                SocketAddr::from(([100, 64, 0, 9], port)),
                controller,
                &local
            ));
        }
        let all = seen.with_local(local.to_vec());
        assert_eq!(all.len(), 1 + PeerObserved::MAX);
        assert_eq!(all[0], local[0]);
        assert!(
            !all.contains(&a("100.64.0.9:4000")),
            "the oldest went first"
        );
    }

    use super::*;
    use shoal_proto::{NetmapChange, NetworkId, NetworkMembership};

    #[test]
    fn nat_is_classified_from_the_two_observations() {
        let local: Vec<SocketAddr> = vec!["10.0.0.2:5000".parse().unwrap()];
        let main: SocketAddr = "198.51.100.7:5000".parse().unwrap();
        assert_eq!(
            classify_nat(local[0], Some(local[0]), &local),
            NatMapping::None
        );
        assert_eq!(
            classify_nat(main, Some(main), &local),
            NatMapping::EndpointIndependent
        );
        assert_eq!(
            classify_nat(main, Some("198.51.100.7:6001".parse().unwrap()), &local),
            NatMapping::EndpointDependent
        );
        assert_eq!(classify_nat(main, None, &local), NatMapping::Unknown);
    }

    #[test]
    fn cache_survives_a_restart_until_it_expires_and_gaps_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = NetmapCache::load(dir.path(), UnixMillis(0));
        assert!(cache.get().is_none());
        let map = Netmap {
            version: 7,
            valid_until: UnixMillis(1_000),
            ..Default::default()
        };
        cache.replace(map);
        let net = NetworkMembership {
            id: NetworkId(1),
            name: "default".into(),
            subnet: "10.90.0.0".parse().unwrap(),
            prefix_len: 16,
            mac: "02:5e:00:00:00:01".parse().unwrap(),
            address: "10.90.0.1".parse().unwrap(),
            mtu: 1380,
        };
        let delta = NetmapDelta {
            from_version: 7,
            to_version: 9,
            valid_until: UnixMillis(2_000),
            changes: vec![NetmapChange::Network(net.clone())],
        };
        assert_eq!(cache.apply(&delta), DeltaOutcome::Applied);
        assert!(matches!(cache.apply(&delta), DeltaOutcome::Gap(_)));
        let reloaded = NetmapCache::load(dir.path(), UnixMillis(1_500));
        assert_eq!(
            reloaded.get().map(|m| (m.version, m.networks.clone())),
            Some((9, vec![net]))
        );
        assert!(
            NetmapCache::load(dir.path(), UnixMillis(2_000))
                .get()
                .is_none(),
            "expired"
        );
        std::fs::write(dir.path().join(NETMAP_FILE), b"\xff\xff garbage").unwrap();
        assert!(
            NetmapCache::load(dir.path(), UnixMillis(0)).get().is_none(),
            "corrupt cache is ignored"
        );
    }
}
