//! The agent's one UDP socket, extended with the relay.
//!
//! Every QUIC connection an agent has — to the controller and to each peer — runs on one quinn
//! endpoint over one UDP socket, so the address the controller observes is the address peers can
//! use. A peer that cannot be reached directly is reached through the controller instead: quinn
//! sends to a *relay address* (`240.0.0.0/4`, reserved and never routed, so no real endpoint can
//! collide), this socket hands those packets to the shell, which wraps them as datagrams on the
//! control connection, and the controller passes them on to the peer's control connection. The
//! peer's socket presents them to its quinn endpoint as if they came from the relay address of the
//! sender. The relayed packets are the peers' own QUIC packets, so the relay sees only ciphertext
//! and cannot forge anything: it is just another (slow, reliable-enough) path.
//!
//! Relay datagram layout on the control connection: a 4-byte big-endian [`PeerIndex`] (the
//! destination when sent by an agent, the source when sent by the controller), then the packet.

use std::{
    fmt,
    io::{self, IoSliceMut},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use quinn::{
    udp::{RecvMeta, Transmit},
    AsyncUdpSocket, UdpPoller,
};
use shoal_proto::PeerIndex;
use tokio::sync::mpsc;

/// Bytes of relay header in front of each relayed packet.
pub const RELAY_HEADER_LEN: usize = 4;

const RELAY_NET: u32 = 0xF000_0000;
const RELAY_PORT: u16 = 1;

/// The relay address standing for a peer.
pub fn relay_addr(index: PeerIndex) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::from(RELAY_NET | (index.0 & 0x0FFF_FFFF))),
        RELAY_PORT,
    )
}

/// The peer a relay address stands for; `None` for real addresses.
pub fn relay_index(addr: SocketAddr) -> Option<PeerIndex> {
    let v4 = match addr.ip() {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => v6.to_ipv4_mapped()?,
    };
    let bits = u32::from(v4);
    (bits & 0xF000_0000 == RELAY_NET && addr.port() == RELAY_PORT)
        .then_some(PeerIndex(bits & 0x0FFF_FFFF))
}

/// Prefixes `packet` with the relay header for `index`.
pub fn relay_datagram(index: PeerIndex, packet: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(RELAY_HEADER_LEN + packet.len());
    v.extend_from_slice(&index.0.to_be_bytes());
    v.extend_from_slice(packet);
    Bytes::from(v)
}

/// Splits a relay datagram into its index and packet; `None` if it is too short to carry one.
pub fn parse_relay_datagram(datagram: &Bytes) -> Option<(PeerIndex, Bytes)> {
    let header: [u8; RELAY_HEADER_LEN] = datagram.get(..RELAY_HEADER_LEN)?.try_into().ok()?;
    let packet = datagram.slice(RELAY_HEADER_LEN..);
    (!packet.is_empty()).then_some((PeerIndex(u32::from_be_bytes(header)), packet))
}

/// A packet quinn wants relayed.
#[derive(Debug, Clone)]
pub struct RelayPacket {
    /// The destination peer.
    pub to: PeerIndex,
    /// The QUIC packet.
    pub packet: Bytes,
}

/// Counters of the relay side of the socket.
#[derive(Debug, Default)]
pub struct RelaySocketStats {
    /// Packets handed to the shell for relaying.
    pub sent: AtomicU64,
    /// Packets dropped because the shell's queue was full (QUIC retransmits what matters).
    pub send_dropped: AtomicU64,
    /// Relayed packets delivered to quinn.
    pub received: AtomicU64,
    /// Relayed packets dropped because they did not fit quinn's receive buffer.
    pub receive_dropped: AtomicU64,
}

/// The shell's side of a [`RelaySocket`]: packets to relay come out of `outbound`; relayed packets
/// go in with [`RelayInjector::inject`].
#[derive(Debug)]
pub struct RelayChannels {
    /// Packets quinn sent to relay addresses.
    pub outbound: mpsc::Receiver<RelayPacket>,
    /// Where relayed packets from the controller go in.
    pub injector: RelayInjector,
}

/// Feeds relayed packets into the socket.
#[derive(Debug, Clone)]
pub struct RelayInjector {
    tx: mpsc::Sender<(PeerIndex, Bytes)>,
}

impl RelayInjector {
    /// Delivers a packet relayed from peer `from`; drops it (returning false) if quinn is not
    /// keeping up.
    pub fn inject(&self, from: PeerIndex, packet: Bytes) -> bool {
        self.tx.try_send((from, packet)).is_ok()
    }
}

/// A UDP socket that also reaches peers through the relay. See the module docs.
pub struct RelaySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    outbound: mpsc::Sender<RelayPacket>,
    inbound: Mutex<mpsc::Receiver<(PeerIndex, Bytes)>>,
    /// Alternates which source `poll_recv` tries first, so neither starves the other.
    relay_first: AtomicBool,
    stats: Arc<RelaySocketStats>,
}

impl fmt::Debug for RelaySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelaySocket")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Packets queued each way between the socket and the shell. Enough for a burst at line rate
/// through the relay; beyond it packets drop like on a congested link.
const RELAY_QUEUE: usize = 1024;

impl RelaySocket {
    /// Wraps a bound UDP socket for tokio, its kernel buffers sized for GSO/GRO bursts.
    pub fn wrap(
        socket: std::net::UdpSocket,
    ) -> io::Result<(Arc<RelaySocket>, RelayChannels, Arc<RelaySocketStats>)> {
        crate::udp_buffers::size_socket_buffers(&socket);
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket)?;
        let (out_tx, out_rx) = mpsc::channel(RELAY_QUEUE);
        let (in_tx, in_rx) = mpsc::channel(RELAY_QUEUE);
        let stats = Arc::new(RelaySocketStats::default());
        let socket = Arc::new(RelaySocket {
            inner,
            outbound: out_tx,
            inbound: Mutex::new(in_rx),
            relay_first: AtomicBool::new(false),
            stats: stats.clone(),
        });
        Ok((
            socket,
            RelayChannels {
                outbound: out_rx,
                injector: RelayInjector { tx: in_tx },
            },
            stats,
        ))
    }

    fn poll_relay(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut inbound = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match inbound.poll_recv(cx) {
                Poll::Ready(Some((from, packet))) => {
                    let (Some(buf), Some(m)) = (bufs.first_mut(), meta.first_mut()) else {
                        return Poll::Ready(Ok(0));
                    };
                    if packet.len() > buf.len() {
                        self.stats.receive_dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    buf[..packet.len()].copy_from_slice(&packet);
                    *m = RecvMeta {
                        addr: relay_addr(from),
                        len: packet.len(),
                        stride: packet.len(),
                        ecn: None,
                        dst_ip: None,
                    };
                    self.stats.received.fetch_add(1, Ordering::Relaxed);
                    return Poll::Ready(Ok(1));
                }
                // The shell went away: nothing more will ever come from the relay.
                Poll::Ready(None) => return Poll::Pending,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncUdpSocket for RelaySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(to) = relay_index(transmit.destination) else {
            return self.inner.try_send(transmit);
        };
        let segment = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for chunk in transmit.contents.chunks(segment) {
            let packet = RelayPacket {
                to,
                packet: Bytes::copy_from_slice(chunk),
            };
            // A full queue is congestion: drop like a router would, quinn's loss recovery copes.
            if self.outbound.try_send(packet).is_ok() {
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
            } else {
                self.stats.send_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let relay_first = !self.relay_first.fetch_xor(true, Ordering::Relaxed);
        if relay_first {
            if let Poll::Ready(r) = self.poll_relay(cx, bufs, meta) {
                return Poll::Ready(r);
            }
            self.inner.poll_recv(cx, bufs, meta)
        } else {
            if let Poll::Ready(r) = self.inner.poll_recv(cx, bufs, meta) {
                return Poll::Ready(r);
            }
            self.poll_relay(cx, bufs, meta)
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_addresses_round_trip_and_real_ones_are_not_relay() {
        for i in [0u32, 1, 77, 0x0FFF_FFFF] {
            assert_eq!(relay_index(relay_addr(PeerIndex(i))), Some(PeerIndex(i)));
        }
        let mapped = SocketAddr::new(
            IpAddr::V6(Ipv4Addr::new(240, 0, 0, 9).to_ipv6_mapped()),
            RELAY_PORT,
        );
        assert_eq!(relay_index(mapped), Some(PeerIndex(9)));
        assert_eq!(relay_index("10.0.0.1:1".parse().unwrap()), None);
        assert_eq!(relay_index("240.0.0.1:443".parse().unwrap()), None);
        assert_eq!(relay_index("[2001:db8::1]:1".parse().unwrap()), None);
    }

    #[test]
    fn relay_datagrams_parse_and_refuse_runts() {
        let d = relay_datagram(PeerIndex(0x0102_0304), b"quic");
        assert_eq!(&d[..4], &[1, 2, 3, 4]);
        assert_eq!(
            parse_relay_datagram(&d),
            Some((PeerIndex(0x0102_0304), Bytes::from_static(b"quic")))
        );
        assert_eq!(
            parse_relay_datagram(&Bytes::from_static(b"\x00\x00\x00\x01")),
            None
        );
        assert_eq!(parse_relay_datagram(&Bytes::from_static(b"\x00\x01")), None);
    }
}
