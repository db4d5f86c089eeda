//! The gateway's tokio shell: one UDP socket, the segment as two channels, the device list as a
//! watch. It performs what [`Gateway`] returns and decides nothing itself.

use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use shoal_proto::MacAddr;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::gateway::{Device, Gateway, Output};

/// How often tunnel timers run.
const TICK: Duration = Duration::from_millis(250);

/// What the gateway serves on its network, as the controller last said (devices) and as the
/// netmap says (the members it can address).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Served {
    /// The network's WireGuard devices.
    pub devices: Vec<Device>,
    /// Every member's overlay address and MAC.
    pub neighbours: Vec<(Ipv4Addr, MacAddr)>,
    /// The network's broadcast address.
    pub broadcast: Option<Ipv4Addr>,
}

/// The segment as the gateway sees it: frames it puts on the network, frames seen there.
#[derive(Debug)]
pub struct Segment {
    /// Frames onto the network (bounded: a full channel drops the frame, like a full NIC queue).
    pub to_segment: mpsc::Sender<Vec<u8>>,
    /// Frames from the network.
    pub from_segment: mpsc::Receiver<Vec<u8>>,
}

/// Runs the gateway on a bound `socket` until `shutdown` completes or the segment closes.
pub async fn run(
    socket: UdpSocket,
    mut gateway: Gateway,
    mut served: watch::Receiver<Served>,
    mut segment: Segment,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 65_535];
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    apply(&mut gateway, &served.borrow_and_update());
    tracing::info!(
        listen = %socket.local_addr()?,
        public_key = %gateway.public_key(),
        devices = gateway.device_count(),
        "WireGuard gateway up"
    );
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            received = socket.recv_from(&mut buf) => match received {
                Ok((len, from)) => gateway.datagram(from, &buf[..len], &mut out),
                // ICMP errors from a device that went away surface here; the socket is fine.
                Err(e) => tracing::debug!(error = %e, "WireGuard socket receive"),
            },
            frame = segment.from_segment.recv() => match frame {
                Some(frame) => gateway.frame(&frame, &mut out),
                None => return Ok(()),
            },
            changed = served.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                apply(&mut gateway, &served.borrow_and_update());
            }
            _ = tick.tick() => gateway.tick(&mut out),
        }
        for output in out.drain(..) {
            match output {
                Output::Datagram(to, datagram) => {
                    if let Err(e) = socket.send_to(&datagram, to).await {
                        tracing::debug!(to = %to, error = %e, "WireGuard send");
                    }
                }
                Output::Frame(frame) => {
                    let _ = segment.to_segment.try_send(frame);
                }
            }
        }
    }
}

fn apply(gateway: &mut Gateway, served: &Served) {
    gateway.set_devices(&served.devices);
    gateway
        .bridge_mut()
        .set_neighbours(served.neighbours.iter().copied(), served.broadcast);
}
