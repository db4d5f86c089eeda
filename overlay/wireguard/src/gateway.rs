//! The WireGuard side of a gateway: one static key, one boringtun [`Tunn`] per device, datagrams in
//! and out. No sockets here: [`Gateway::datagram`], [`Gateway::frame`] and [`Gateway::tick`] return
//! what to send; `run.rs` owns the socket and the segment.
//!
//! Handshakes are bounded before any expensive work: every datagram first passes boringtun's shared
//! [`RateLimiter`] (MAC1 check, then a cookie reply instead of a Diffie-Hellman once more than
//! [`GatewayConfig::handshakes_per_second`] arrive in a second), and only then is an initiation
//! opened to find which device it claims to be. Datagrams for no known device are dropped without a
//! reply. A removed device's tunnel is dropped at once ([`Gateway::set_devices`]), so the next
//! datagram it sends finds nothing.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use shoal_proto::MacAddr;

use crate::bridge::{Bridge, FromDevice, FromSegment};
use crate::keys::Key;

/// After this long without a handshake a device's session here is over (WireGuard's
/// REJECT_AFTER_TIME, 180 s).
const SESSION_GONE: std::time::Duration = std::time::Duration::from_secs(180);

/// Room for the largest datagram plus WireGuard's overhead.
const BUF_LEN: usize = 65_535 + 64;

/// The gateway's limits. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Handshake messages per second, over all sources, beyond which initiators must prove their
    /// address with a cookie first. Default 100: a device handshakes every two minutes.
    pub handshakes_per_second: u64,
    /// Most devices per gateway; the rest of a longer list is ignored and logged. Default 4096.
    pub max_devices: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            handshakes_per_second: 100,
            max_devices: 4096,
        }
    }
}

/// One device the gateway serves: its WireGuard public key and its overlay address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Device {
    /// The device's public key.
    pub public_key: Key,
    /// Its address on the overlay network.
    pub address: Ipv4Addr,
}

/// What the shell must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// Send this datagram to this address.
    Datagram(SocketAddr, Vec<u8>),
    /// Put this frame onto the overlay segment.
    Frame(Vec<u8>),
}

/// Datagram and frame counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GatewayCounters {
    /// Datagrams refused before reaching a device's tunnel (bad MAC, unknown device, malformed).
    pub datagrams_refused: u64,
    /// Cookie replies sent because handshakes came faster than the limit.
    pub cookies_sent: u64,
    /// Packets from devices put on the segment (or passed to another device).
    pub packets_from_devices: u64,
    /// Packets from the segment sent to devices.
    pub packets_to_devices: u64,
}

struct Peer {
    tunn: Tunn,
    device: Device,
    /// Where the device was last heard from (it roams; WireGuard follows it).
    endpoint: Option<SocketAddr>,
}

/// A gateway for one overlay network.
pub struct Gateway {
    config: GatewayConfig,
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
    peers: HashMap<u32, Peer>,
    by_key: HashMap<Key, u32>,
    by_address: HashMap<Ipv4Addr, u32>,
    next_index: u32,
    bridge: Bridge,
    counters: GatewayCounters,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("public", &Key(self.public.to_bytes()))
            .field("devices", &self.peers.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway with the network's gateway key, speaking on the segment as `mac`.
    pub fn new(config: GatewayConfig, private_key: Key, mac: MacAddr) -> Gateway {
        let secret = StaticSecret::from(private_key.0);
        let public = PublicKey::from(&secret);
        // Each handshake message passes the shared limiter twice (here, then inside its tunnel).
        let limiter = Arc::new(RateLimiter::new(
            &public,
            config.handshakes_per_second.saturating_mul(2),
        ));
        Gateway {
            config,
            secret,
            public,
            limiter,
            peers: HashMap::new(),
            by_key: HashMap::new(),
            by_address: HashMap::new(),
            next_index: 1,
            bridge: Bridge::new(mac),
            counters: GatewayCounters::default(),
            buf: vec![0; BUF_LEN],
        }
    }

    /// The gateway's public key (what clients list as their peer).
    pub fn public_key(&self) -> Key {
        Key(self.public.to_bytes())
    }

    /// Counters so far.
    pub fn counters(&self) -> GatewayCounters {
        self.counters
    }

    /// The bridge (its drop counters, its neighbours).
    pub fn bridge_mut(&mut self) -> &mut Bridge {
        &mut self.bridge
    }

    /// The devices to serve, replacing the previous set: a device that stays keeps its session; one
    /// that is gone loses it at once.
    pub fn set_devices(&mut self, devices: &[Device]) {
        let wanted: HashMap<Key, Device> = devices
            .iter()
            .take(self.config.max_devices)
            .map(|d| (d.public_key, *d))
            .collect();
        if devices.len() > self.config.max_devices {
            tracing::warn!(
                devices = devices.len(),
                max = self.config.max_devices,
                "more WireGuard devices than this gateway serves; the rest are ignored"
            );
        }
        let gone: Vec<u32> = self
            .peers
            .iter()
            .filter(|(_, p)| wanted.get(&p.device.public_key) != Some(&p.device))
            .map(|(i, _)| *i)
            .collect();
        for index in gone {
            if let Some(p) = self.peers.remove(&index) {
                self.by_key.remove(&p.device.public_key);
                self.by_address.remove(&p.device.address);
                tracing::info!(device = %p.device.address, "WireGuard device removed");
            }
        }
        for device in wanted.values() {
            if self.by_key.contains_key(&device.public_key) {
                continue;
            }
            let index = self.next_index;
            // boringtun keeps 24 bits of the index (the low 8 count sessions).
            self.next_index = (self.next_index % 0x00ff_ffff) + 1;
            let tunn = Tunn::new(
                self.secret.clone(),
                PublicKey::from(device.public_key.0),
                None,
                None,
                index,
                Some(Arc::clone(&self.limiter)),
            );
            self.peers.insert(
                index,
                Peer {
                    tunn,
                    device: *device,
                    endpoint: None,
                },
            );
            self.by_key.insert(device.public_key, index);
            self.by_address.insert(device.address, index);
        }
        self.refresh_bridge();
    }

    /// The bridge answers for the devices whose session is on this gateway: with several gateways
    /// on one segment, only the one a device is connected to claims its address.
    fn refresh_bridge(&mut self) {
        let connected: Vec<Ipv4Addr> = self
            .peers
            .values()
            .filter(|p| p.endpoint.is_some())
            .map(|p| p.device.address)
            .collect();
        self.bridge.set_devices(connected);
    }

    /// The device with this public key's last endpoint, if it has been heard from.
    pub fn endpoint_of(&self, key: &Key) -> Option<SocketAddr> {
        self.peers.get(self.by_key.get(key)?)?.endpoint
    }

    /// A datagram from the gateway's UDP socket (untrusted bytes from anyone).
    pub fn datagram(&mut self, from: SocketAddr, datagram: &[u8], out: &mut Vec<Output>) {
        let index = {
            let packet = match self
                .limiter
                .verify_packet(Some(from.ip()), datagram, &mut self.buf)
            {
                Ok(packet) => packet,
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    self.counters.cookies_sent += 1;
                    out.push(Output::Datagram(from, cookie.to_vec()));
                    return;
                }
                Err(_) => {
                    self.counters.datagrams_refused += 1;
                    return;
                }
            };
            match packet {
                Packet::HandshakeInit(p) => parse_handshake_anon(&self.secret, &self.public, &p)
                    .ok()
                    .and_then(|h| self.by_key.get(&Key(h.peer_static_public)).copied()),
                Packet::HandshakeResponse(p) => Some(p.receiver_idx >> 8),
                Packet::PacketCookieReply(p) => Some(p.receiver_idx >> 8),
                Packet::PacketData(p) => Some(p.receiver_idx >> 8),
            }
        };
        let Some(peer) = index.and_then(|i| self.peers.get_mut(&i)) else {
            self.counters.datagrams_refused += 1;
            return;
        };
        let mut from_device = None;
        match peer
            .tunn
            .decapsulate(Some(from.ip()), datagram, &mut self.buf)
        {
            TunnResult::Done => {}
            TunnResult::Err(e) => {
                tracing::debug!(device = %peer.device.address, error = ?e, "WireGuard datagram refused");
                self.counters.datagrams_refused += 1;
                return;
            }
            TunnResult::WriteToNetwork(reply) => {
                out.push(Output::Datagram(from, reply.to_vec()));
                // A completed handshake may release packets queued while it ran.
                while let TunnResult::WriteToNetwork(queued) =
                    peer.tunn.decapsulate(None, &[], &mut self.buf)
                {
                    out.push(Output::Datagram(from, queued.to_vec()));
                }
            }
            TunnResult::WriteToTunnelV4(packet, _) => from_device = Some(packet.to_vec()),
            TunnResult::WriteToTunnelV6(..) => {
                self.counters.datagrams_refused += 1;
                return;
            }
        }
        // Authenticated: the device is at `from` now. The first time it reaches this gateway
        // (a new device, or one that failed over from another gateway), members learn that its
        // address is at this gateway's MAC.
        let first_contact = peer.endpoint.is_none();
        peer.endpoint = Some(from);
        let device = peer.device.address;
        if first_contact {
            self.refresh_bridge();
            out.push(Output::Frame(self.bridge.announce(device)));
        }
        if let Some(packet) = from_device {
            self.device_packet(device, &packet, out);
        }
    }

    fn device_packet(&mut self, device: Ipv4Addr, packet: &[u8], out: &mut Vec<Output>) {
        match self.bridge.from_device(device, packet) {
            Ok(FromDevice::Segment(frame)) => {
                self.counters.packets_from_devices += 1;
                out.push(Output::Frame(frame));
            }
            Ok(FromDevice::Device(other)) => {
                self.counters.packets_from_devices += 1;
                self.send_to_device(other, packet, out);
            }
            Err(reason) => {
                tracing::debug!(device = %device, reason = reason.label(), "device packet dropped");
            }
        }
    }

    /// A frame from the overlay segment.
    pub fn frame(&mut self, frame: &[u8], out: &mut Vec<Output>) {
        match self.bridge.from_segment(frame) {
            FromSegment::Reply(reply) => out.push(Output::Frame(reply)),
            FromSegment::ToDevice { device, packet } => self.send_to_device(device, packet, out),
            FromSegment::NotForDevices => {}
        }
    }

    fn send_to_device(&mut self, device: Ipv4Addr, packet: &[u8], out: &mut Vec<Output>) {
        let Some(peer) = self
            .by_address
            .get(&device)
            .and_then(|i| self.peers.get_mut(i))
        else {
            return;
        };
        // Until the device has handshaked once, the gateway does not know where it is: only
        // devices initiate (they sit behind NATs), so the packet is dropped.
        let Some(endpoint) = peer.endpoint else {
            return;
        };
        if let TunnResult::WriteToNetwork(datagram) = peer.tunn.encapsulate(packet, &mut self.buf) {
            self.counters.packets_to_devices += 1;
            out.push(Output::Datagram(endpoint, datagram.to_vec()));
        }
    }

    /// Timers: call about every 250 ms. Resets the handshake counter once a second and runs each
    /// tunnel's keepalive, rekey and expiry timers.
    pub fn tick(&mut self, out: &mut Vec<Output>) {
        self.limiter.reset_count();
        // A device that has not handshaked here for longer than WireGuard lets a session live
        // (it rekeys every 2 minutes while in use) has moved on, to another gateway or away: stop
        // claiming its address.
        let mut moved_on = false;
        for peer in self.peers.values_mut() {
            if peer.endpoint.is_some()
                && peer
                    .tunn
                    .time_since_last_handshake()
                    .is_some_and(|t| t > SESSION_GONE)
            {
                peer.endpoint = None;
                moved_on = true;
            }
        }
        if moved_on {
            self.refresh_bridge();
        }
        for peer in self.peers.values_mut() {
            if let (TunnResult::WriteToNetwork(d), Some(endpoint)) =
                (peer.tunn.update_timers(&mut self.buf), peer.endpoint)
            {
                out.push(Output::Datagram(endpoint, d.to_vec()));
            }
        }
    }

    /// How many devices it serves.
    pub fn device_count(&self) -> usize {
        self.peers.len()
    }
}
