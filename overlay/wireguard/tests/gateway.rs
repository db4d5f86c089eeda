//! The gateway with real WireGuard clients (boringtun's noise core playing the device side, as a
//! stock client would) on loopback UDP: handshake, packets both ways as frames on the segment,
//! proxy ARP, removal, and the handshake rate limit.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use shoal_proto::MacAddr;
use shoal_wireguard::run::{run, Segment, Served};
use shoal_wireguard::{Device, Gateway, GatewayConfig, Key, Output};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

const GW_MAC: MacAddr = MacAddr([2, 0x5e, 0, 0, 0, 1]);
const NODE_MAC: MacAddr = MacAddr([2, 0x5e, 0, 0, 0, 2]);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 2);
const DEADLINE: Duration = Duration::from_secs(5);

fn icmp(src: Ipv4Addr, dst: Ipv4Addr, id: u8) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[8, 0, 0, 0, 0, id, 0, 1]);
    p
}

fn frame(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = dst.0.to_vec();
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&NODE_MAC.0);
    arp.extend_from_slice(&NODE_IP.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target.octets());
    frame(MacAddr::BROADCAST, NODE_MAC, 0x0806, &arp)
}

/// A device: its tunnel to the gateway and its own UDP socket.
struct Client {
    tunn: Tunn,
    socket: UdpSocket,
    gateway: SocketAddr,
    address: Ipv4Addr,
    public: Key,
}

impl Client {
    async fn new(gateway_public: Key, gateway: SocketAddr, address: Ipv4Addr) -> Client {
        let private = Key::generate_private();
        let tunn = Tunn::new(
            StaticSecret::from(private.0),
            PublicKey::from(gateway_public.0),
            None,
            None,
            7,
            None,
        );
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        Client {
            tunn,
            socket,
            gateway,
            address,
            public: private.public(),
        }
    }

    fn device(&self) -> Device {
        Device {
            public_key: self.public,
            address: self.address,
        }
    }

    async fn send(&mut self, packet: &[u8]) {
        let mut buf = vec![0u8; 2048];
        if let TunnResult::WriteToNetwork(d) = self.tunn.encapsulate(packet, &mut buf) {
            self.socket.send_to(d, self.gateway).await.expect("send");
        }
    }

    /// Handles datagrams from the gateway until one carries an IP packet, answering handshakes
    /// on the way.
    async fn receive_packet(&mut self) -> Vec<u8> {
        let mut datagram = vec![0u8; 2048];
        let mut buf = vec![0u8; 2048];
        loop {
            let (len, from) = tokio::time::timeout(DEADLINE, self.socket.recv_from(&mut datagram))
                .await
                .expect("a datagram from the gateway within the deadline")
                .expect("recv");
            let mut input = &datagram[..len];
            loop {
                match self.tunn.decapsulate(Some(from.ip()), input, &mut buf) {
                    TunnResult::WriteToNetwork(d) => {
                        self.socket.send_to(d, from).await.expect("send");
                        input = &[];
                    }
                    TunnResult::WriteToTunnelV4(p, _) => return p.to_vec(),
                    _ => break,
                }
            }
        }
    }
}

struct Harness {
    addr: SocketAddr,
    public: Key,
    served: watch::Sender<Served>,
    to_segment: mpsc::Receiver<Vec<u8>>,
    from_segment: mpsc::Sender<Vec<u8>>,
    _stop: oneshot::Sender<()>,
}

impl Harness {
    async fn start() -> Harness {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        let gateway = Gateway::new(GatewayConfig::default(), Key::generate_private(), GW_MAC);
        let public = gateway.public_key();
        let (served, served_rx) = watch::channel(Served {
            devices: vec![],
            neighbours: vec![(NODE_IP, NODE_MAC)],
            broadcast: Some(Ipv4Addr::new(10, 90, 255, 255)),
        });
        let (to_tx, to_segment) = mpsc::channel(64);
        let (from_segment, from_rx) = mpsc::channel(64);
        let (stop, stopped) = oneshot::channel();
        let segment = Segment {
            to_segment: to_tx,
            from_segment: from_rx,
        };
        tokio::spawn(run(socket, gateway, served_rx, segment, async {
            let _ = stopped.await;
        }));
        Harness {
            addr,
            public,
            served,
            to_segment,
            from_segment,
            _stop: stop,
        }
    }

    fn serve(&self, devices: Vec<Device>) {
        self.served.send_modify(|s| s.devices = devices);
    }

    async fn next_frame(&mut self) -> Vec<u8> {
        tokio::time::timeout(DEADLINE, self.to_segment.recv())
            .await
            .expect("a frame on the segment within the deadline")
            .expect("gateway running")
    }
}

#[tokio::test]
async fn a_device_reaches_the_segment_and_the_segment_reaches_it() {
    let mut h = Harness::start().await;
    let device_ip = Ipv4Addr::new(10, 90, 0, 10);
    let mut client = Client::new(h.public, h.addr, device_ip).await;
    h.serve(vec![client.device()]);

    // The first packet starts the handshake; boringtun sends it once the session is up.
    client.send(&icmp(device_ip, NODE_IP, 1)).await;
    let mut datagram = vec![0u8; 2048];
    let (len, from) = tokio::time::timeout(DEADLINE, client.socket.recv_from(&mut datagram))
        .await
        .expect("handshake response")
        .expect("recv");
    let mut buf = vec![0u8; 2048];
    let mut input = &datagram[..len];
    while let TunnResult::WriteToNetwork(d) =
        client.tunn.decapsulate(Some(from.ip()), input, &mut buf)
    {
        client.socket.send_to(d, from).await.expect("send");
        input = &[];
    }
    // First the announcement that the device's address is at the gateway, then its packet.
    let announce = h.next_frame().await;
    assert_eq!(&announce[..6], &MacAddr::BROADCAST.0);
    assert_eq!(&announce[12..14], &[8, 6]);
    assert_eq!(&announce[14 + 8..14 + 14], &GW_MAC.0);
    assert_eq!(&announce[14 + 14..14 + 18], &device_ip.octets());
    let f = h.next_frame().await;
    assert_eq!(
        f,
        frame(NODE_MAC, GW_MAC, 0x0800, &icmp(device_ip, NODE_IP, 1))
    );

    // A member asks who has the device's address: the gateway.
    h.from_segment
        .send(arp_request(device_ip))
        .await
        .expect("send");
    let reply = h.next_frame().await;
    assert_eq!(&reply[12..14], &[8, 6]);
    assert_eq!(&reply[14 + 8..14 + 14], &GW_MAC.0);

    // The member's reply to the gateway's MAC reaches the device, decrypted by its own tunnel.
    let answer = icmp(NODE_IP, device_ip, 2);
    h.from_segment
        .send(frame(GW_MAC, NODE_MAC, 0x0800, &answer))
        .await
        .expect("send");
    assert_eq!(client.receive_packet().await, answer);
}

#[tokio::test]
async fn a_removed_device_is_cut_off_at_once() {
    let mut h = Harness::start().await;
    let (a_ip, b_ip) = (Ipv4Addr::new(10, 90, 0, 10), Ipv4Addr::new(10, 90, 0, 11));
    let mut a = Client::new(h.public, h.addr, a_ip).await;
    let mut b = Client::new(h.public, h.addr, b_ip).await;
    h.serve(vec![a.device(), b.device()]);
    for (client, ip) in [(&mut a, a_ip), (&mut b, b_ip)] {
        client.send(&icmp(ip, NODE_IP, 1)).await;
        // Completes the handshake (the response carries no packet; wait for the frame instead).
        let mut datagram = vec![0u8; 2048];
        let (len, from) = client.socket.recv_from(&mut datagram).await.expect("recv");
        let mut buf = vec![0u8; 2048];
        let mut input = &datagram[..len];
        while let TunnResult::WriteToNetwork(d) =
            client.tunn.decapsulate(Some(from.ip()), input, &mut buf)
        {
            client.socket.send_to(d, from).await.expect("send");
            input = &[];
        }
        let announce = h.next_frame().await;
        assert_eq!(&announce[14 + 14..14 + 18], &ip.octets());
        assert_eq!(&h.next_frame().await[14..], &icmp(ip, NODE_IP, 1)[..]);
    }

    h.serve(vec![b.device()]);
    // The gateway has taken the change once it stops answering ARP for a's address (frames are
    // handled in order, so b's reply arriving first means a's request went unanswered).
    tokio::time::timeout(DEADLINE, async {
        loop {
            h.from_segment.send(arp_request(a_ip)).await.expect("send");
            h.from_segment.send(arp_request(b_ip)).await.expect("send");
            let first = h.next_frame().await;
            if first[14 + 14..14 + 18] == b_ip.octets() {
                break;
            }
            h.next_frame().await;
        }
    })
    .await
    .expect("the gateway takes the removal within the deadline");
    a.send(&icmp(a_ip, NODE_IP, 2)).await;
    b.send(&icmp(b_ip, NODE_IP, 2)).await;
    // One socket, in order: if a's packet had passed, its frame would come first.
    assert_eq!(&h.next_frame().await[14..], &icmp(b_ip, NODE_IP, 2)[..]);
}

#[tokio::test]
async fn handshakes_beyond_the_limit_get_a_cookie_instead() {
    let config = GatewayConfig {
        handshakes_per_second: 1,
        ..GatewayConfig::default()
    };
    let mut gateway = Gateway::new(config, Key::generate_private(), GW_MAC);
    let mut devices = vec![];
    let mut tunnels = vec![];
    for i in 0..4u8 {
        let private = Key::generate_private();
        devices.push(Device {
            public_key: private.public(),
            address: Ipv4Addr::new(10, 90, 0, 10 + i),
        });
        tunnels.push(Tunn::new(
            StaticSecret::from(private.0),
            PublicKey::from(gateway.public_key().0),
            None,
            None,
            u32::from(i),
            None,
        ));
    }
    gateway.set_devices(&devices);
    let from: SocketAddr = "192.0.2.1:40000".parse().expect("addr");
    let mut kinds = vec![];
    for tunn in &mut tunnels {
        let mut buf = vec![0u8; 2048];
        let TunnResult::WriteToNetwork(init) = tunn.encapsulate(&[], &mut buf) else {
            panic!("no handshake initiation");
        };
        let mut out = vec![];
        gateway.datagram(from, init, &mut out);
        // (An accepted handshake also announces the device on the segment.)
        let Some(Output::Datagram(to, reply)) = out.first() else {
            panic!("expected a datagram, got {out:?}");
        };
        assert_eq!(*to, from);
        kinds.push(reply[0]);
    }
    // 2 = handshake response, 3 = cookie reply: past the limit, no Diffie-Hellman for strangers.
    assert_eq!(kinds, [2, 3, 3, 3]);
    assert_eq!(gateway.counters().cookies_sent, 3);

    // Garbage and unknown keys get nothing back.
    let mut out = vec![];
    gateway.datagram(from, &[1, 0, 0, 0, 9, 9], &mut out);
    gateway.datagram(from, &[], &mut out);
    assert!(out.is_empty());
}

#[test]
fn a_gateway_claims_only_the_devices_connected_to_it() {
    let mut gateway = Gateway::new(GatewayConfig::default(), Key::generate_private(), GW_MAC);
    let private = Key::generate_private();
    let device_ip = Ipv4Addr::new(10, 90, 0, 10);
    gateway.set_devices(&[Device {
        public_key: private.public(),
        address: device_ip,
    }]);
    // Served but not connected here (it may be on another gateway of the segment): no answer.
    let mut out = vec![];
    gateway.frame(&arp_request(device_ip), &mut out);
    assert!(out.is_empty(), "{out:?}");

    let mut tunn = Tunn::new(
        StaticSecret::from(private.0),
        PublicKey::from(gateway.public_key().0),
        None,
        None,
        1,
        None,
    );
    let mut buf = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(init) = tunn.encapsulate(&[], &mut buf) else {
        panic!("no handshake initiation");
    };
    let from: SocketAddr = "192.0.2.1:40000".parse().expect("addr");
    gateway.datagram(from, init, &mut out);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Frame(f) if f[..6] == MacAddr::BROADCAST.0)),
        "connecting announces the device: {out:?}"
    );
    out.clear();
    gateway.frame(&arp_request(device_ip), &mut out);
    let [Output::Frame(reply)] = &out[..] else {
        panic!("no ARP reply: {out:?}");
    };
    assert_eq!(&reply[14 + 8..14 + 14], &GW_MAC.0);
}
