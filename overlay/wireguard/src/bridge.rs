//! The bridge between WireGuard devices (IP packets) and an overlay network's L2 segment (Ethernet
//! frames), sans-IO: frames and packets are byte slices, outputs are returned.
//!
//! The gateway stands in for its devices on the segment the way a proxy-ARP router does:
//!
//! - An ARP request for a device's address is answered with the gateway's own MAC (in the agent,
//!   `shoal_overlay::switch::gateway_mac` of its node's MAC on the network, not the TAP device's,
//!   so the node's own kernel is a member like the others), so every member sends the device's
//!   traffic to the gateway.
//! - An IPv4 frame addressed to the gateway's MAC whose destination is a device becomes that
//!   device's packet.
//! - A device's IPv4 packet becomes a frame from the gateway's MAC to the destination's MAC, which
//!   the netmap gives for every member ([`Bridge::set_neighbours`]); a packet to another device of
//!   this gateway goes straight to it; broadcast and multicast go to the broadcast MAC.
//!
//! A device may only send from its own address (the server-side AllowedIPs rule); anything else is
//! dropped and counted. Devices get IPv4 addresses only (the controller's IPAM is IPv4), so there
//! are no IPv6 neighbour solicitations to answer.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use shoal_proto::MacAddr;

const ETHERNET_HEADER_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ARP_LEN: usize = 28;
const IPV4_MIN_HEADER: usize = 20;

/// Why the bridge dropped a frame or a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum BridgeDrop {
    /// Cut short or not the protocol its header claims.
    Malformed,
    /// From a device, not IPv4 (devices have IPv4 addresses only).
    NotIpv4,
    /// From a device, a source address other than its own.
    SpoofedSource,
    /// From a device, to an address no member or device of the network holds.
    UnknownDestination,
}

impl BridgeDrop {
    /// A snake_case label for counters and logs.
    pub fn label(self) -> &'static str {
        match self {
            BridgeDrop::Malformed => "malformed",
            BridgeDrop::NotIpv4 => "not_ipv4",
            BridgeDrop::SpoofedSource => "spoofed_source",
            BridgeDrop::UnknownDestination => "unknown_destination",
        }
    }
}

/// What a frame from the segment means for the gateway.
#[derive(Debug, PartialEq, Eq)]
pub enum FromSegment<'a> {
    /// Send this frame back onto the segment (an ARP reply for a device's address).
    Reply(Vec<u8>),
    /// The IPv4 packet inside is for the device with this address.
    ToDevice {
        /// The device's overlay address.
        device: Ipv4Addr,
        /// The IP packet (the frame's payload).
        packet: &'a [u8],
    },
    /// Not for any device (the gateway's own traffic, other members' traffic, other protocols).
    NotForDevices,
}

/// Where a device's packet goes.
#[derive(Debug, PartialEq, Eq)]
pub enum FromDevice {
    /// Onto the segment, as this Ethernet frame.
    Segment(Vec<u8>),
    /// To another device of this gateway, as is.
    Device(Ipv4Addr),
}

/// The bridge for one network.
#[derive(Debug, Clone)]
pub struct Bridge {
    gateway_mac: MacAddr,
    /// Device address → nothing yet (the shell maps it to the device's tunnel).
    devices: std::collections::BTreeSet<Ipv4Addr>,
    /// Member address → its MAC, from the netmap.
    neighbours: HashMap<Ipv4Addr, MacAddr>,
    /// The network's broadcast address.
    broadcast: Option<Ipv4Addr>,
    drops: BTreeMap<BridgeDrop, u64>,
}

impl Bridge {
    /// A bridge that speaks on the segment as `gateway_mac`.
    pub fn new(gateway_mac: MacAddr) -> Bridge {
        Bridge {
            gateway_mac,
            devices: Default::default(),
            neighbours: HashMap::new(),
            broadcast: None,
            drops: BTreeMap::new(),
        }
    }

    /// The devices this gateway answers for (replaces the previous set).
    pub fn set_devices(&mut self, devices: impl IntoIterator<Item = Ipv4Addr>) {
        self.devices = devices.into_iter().collect();
    }

    /// The network's members (address → MAC, from the netmap) and its broadcast address.
    pub fn set_neighbours(
        &mut self,
        neighbours: impl IntoIterator<Item = (Ipv4Addr, MacAddr)>,
        broadcast: Option<Ipv4Addr>,
    ) {
        self.neighbours = neighbours.into_iter().collect();
        self.broadcast = broadcast;
    }

    /// Drops so far, by reason.
    pub fn drops(&self) -> impl Iterator<Item = (BridgeDrop, u64)> + '_ {
        self.drops.iter().map(|(r, n)| (*r, *n))
    }

    fn drop(&mut self, reason: BridgeDrop) -> BridgeDrop {
        *self.drops.entry(reason).or_default() += 1;
        reason
    }

    /// A frame seen on the segment (bytes from any member: parsed with every length checked).
    pub fn from_segment<'a>(&mut self, frame: &'a [u8]) -> FromSegment<'a> {
        let Some(ethertype) = be16(frame, 12) else {
            return FromSegment::NotForDevices;
        };
        let payload = &frame[ETHERNET_HEADER_LEN..];
        match ethertype {
            ETHERTYPE_ARP => self.arp(payload),
            ETHERTYPE_IPV4 => {
                if frame[..6] != self.gateway_mac.0 {
                    return FromSegment::NotForDevices;
                }
                match ipv4_addresses(payload) {
                    Some((_, dst, len)) if self.devices.contains(&dst) => FromSegment::ToDevice {
                        device: dst,
                        packet: &payload[..len],
                    },
                    _ => FromSegment::NotForDevices,
                }
            }
            _ => FromSegment::NotForDevices,
        }
    }

    /// An ARP request (Ethernet/IPv4, RFC 826) for a device's address gets a reply naming the
    /// gateway's MAC.
    fn arp<'a>(&mut self, arp: &[u8]) -> FromSegment<'a> {
        if arp.len() < ARP_LEN || arp[..8] != [0, 1, 8, 0, 6, 4, 0, 1] {
            return FromSegment::NotForDevices;
        }
        let sha: [u8; 6] = arp[8..14].try_into().unwrap_or_default();
        let spa: [u8; 4] = arp[14..18].try_into().unwrap_or_default();
        let tpa: [u8; 4] = arp[24..28].try_into().unwrap_or_default();
        if !self.devices.contains(&Ipv4Addr::from(tpa)) {
            return FromSegment::NotForDevices;
        }
        let mut reply = Vec::with_capacity(ETHERNET_HEADER_LEN + ARP_LEN);
        reply.extend_from_slice(&sha);
        reply.extend_from_slice(&self.gateway_mac.0);
        reply.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        reply.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        reply.extend_from_slice(&self.gateway_mac.0);
        reply.extend_from_slice(&tpa);
        reply.extend_from_slice(&sha);
        reply.extend_from_slice(&spa);
        FromSegment::Reply(reply)
    }

    /// A gratuitous ARP saying the device is now at this gateway's MAC, so members that had it at
    /// another gateway's switch at once (failover).
    pub fn announce(&self, device: Ipv4Addr) -> Vec<u8> {
        gratuitous_arp(self.gateway_mac, device)
    }

    /// A packet the device at `device` sent (already decrypted and authenticated as that device).
    pub fn from_device(
        &mut self,
        device: Ipv4Addr,
        packet: &[u8],
    ) -> Result<FromDevice, BridgeDrop> {
        if packet.first().map(|b| b >> 4) != Some(4) {
            return Err(self.drop(BridgeDrop::NotIpv4));
        }
        let Some((src, dst, len)) = ipv4_addresses(packet) else {
            return Err(self.drop(BridgeDrop::Malformed));
        };
        if src != device {
            return Err(self.drop(BridgeDrop::SpoofedSource));
        }
        if self.devices.contains(&dst) {
            return Ok(FromDevice::Device(dst));
        }
        let dst_mac = if dst.is_broadcast() || dst.is_multicast() || Some(dst) == self.broadcast {
            MacAddr::BROADCAST
        } else if let Some(mac) = self.neighbours.get(&dst) {
            *mac
        } else {
            return Err(self.drop(BridgeDrop::UnknownDestination));
        };
        let mut frame = Vec::with_capacity(ETHERNET_HEADER_LEN + len);
        frame.extend_from_slice(&dst_mac.0);
        frame.extend_from_slice(&self.gateway_mac.0);
        frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        frame.extend_from_slice(&packet[..len]);
        Ok(FromDevice::Segment(frame))
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Source, destination and total length of an IPv4 packet whose header and total length fit in
/// `ip` (trailing Ethernet padding is not part of the packet).
fn ipv4_addresses(ip: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, usize)> {
    if ip.len() < IPV4_MIN_HEADER || ip[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(be16(ip, 2)?);
    if header_len < IPV4_MIN_HEADER || total < header_len || total > ip.len() {
        return None;
    }
    let src: [u8; 4] = ip[12..16].try_into().ok()?;
    let dst: [u8; 4] = ip[16..20].try_into().ok()?;
    Some((Ipv4Addr::from(src), Ipv4Addr::from(dst), total))
}

/// A gratuitous ARP frame (RFC 5227 announcement: a broadcast request with sender and target both
/// `ip`) saying `ip` is at `mac`.
pub fn gratuitous_arp(mac: MacAddr, ip: Ipv4Addr) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETHERNET_HEADER_LEN + ARP_LEN);
    frame.extend_from_slice(&MacAddr::BROADCAST.0);
    frame.extend_from_slice(&mac.0);
    frame.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&mac.0);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&ip.octets());
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: MacAddr = MacAddr([2, 0x5e, 0, 0, 0, 1]);
    const NODE: MacAddr = MacAddr([2, 0x5e, 0, 0, 0, 2]);
    const DEVICE: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 10);
    const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 2);

    /// A minimal IPv4 packet (ICMP echo header only), with `pad` bytes of trailing garbage.
    pub(crate) fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, pad: usize) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0]);
        p.extend(std::iter::repeat_n(0xee, pad));
        p
    }

    fn frame(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = dst.0.to_vec();
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn arp_request(sha: MacAddr, spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.extend_from_slice(&sha.0);
        a.extend_from_slice(&spa.octets());
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&tpa.octets());
        frame(MacAddr::BROADCAST, sha, ETHERTYPE_ARP, &a)
    }

    fn bridge() -> Bridge {
        let mut b = Bridge::new(GW);
        b.set_devices([DEVICE]);
        b.set_neighbours([(NODE_IP, NODE)], Some(Ipv4Addr::new(10, 90, 255, 255)));
        b
    }

    #[test]
    fn arp_for_a_device_is_answered_with_the_gateway_mac() {
        let mut b = bridge();
        let FromSegment::Reply(reply) = b.from_segment(&arp_request(NODE, NODE_IP, DEVICE)) else {
            panic!("no reply");
        };
        assert_eq!(&reply[..6], &NODE.0, "to the asker");
        assert_eq!(&reply[6..12], &GW.0, "from the gateway");
        let arp = &reply[14..];
        assert_eq!(&arp[6..8], &[0, 2], "a reply");
        assert_eq!(
            &arp[8..14],
            &GW.0,
            "the device's address is at the gateway's MAC"
        );
        assert_eq!(&arp[14..18], &DEVICE.octets());
        assert_eq!(&arp[18..24], &NODE.0);
        assert_eq!(&arp[24..28], &NODE_IP.octets());
    }

    #[test]
    fn an_announcement_is_a_broadcast_arp_naming_the_gateway_for_the_device() {
        let b = bridge();
        let f = b.announce(DEVICE);
        assert_eq!(&f[..6], &MacAddr::BROADCAST.0);
        assert_eq!(&f[6..12], &GW.0);
        assert_eq!(&f[12..14], &[8, 6]);
        let arp = &f[14..];
        assert_eq!(&arp[..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&arp[8..14], &GW.0);
        assert_eq!(&arp[14..18], &DEVICE.octets());
        assert_eq!(&arp[24..28], &DEVICE.octets());
    }

    #[test]
    fn arp_for_other_addresses_and_arp_replies_are_left_alone() {
        let mut b = bridge();
        let other = arp_request(NODE, NODE_IP, Ipv4Addr::new(10, 90, 0, 11));
        assert_eq!(b.from_segment(&other), FromSegment::NotForDevices);
        let mut reply = arp_request(NODE, NODE_IP, DEVICE);
        reply[14 + 7] = 2;
        assert_eq!(b.from_segment(&reply), FromSegment::NotForDevices);
    }

    #[test]
    fn ipv4_to_the_gateway_mac_for_a_device_reaches_it_without_padding() {
        let mut b = bridge();
        let packet = ipv4(NODE_IP, DEVICE, 0);
        let f = frame(GW, NODE, ETHERTYPE_IPV4, &ipv4(NODE_IP, DEVICE, 18));
        assert_eq!(
            b.from_segment(&f),
            FromSegment::ToDevice {
                device: DEVICE,
                packet: &packet
            }
        );
        // Another MAC, or another address: not the device's.
        let f = frame(NODE, NODE, ETHERTYPE_IPV4, &packet);
        assert_eq!(b.from_segment(&f), FromSegment::NotForDevices);
        let f = frame(GW, NODE, ETHERTYPE_IPV4, &ipv4(NODE_IP, NODE_IP, 0));
        assert_eq!(b.from_segment(&f), FromSegment::NotForDevices);
    }

    #[test]
    fn a_device_packet_becomes_a_frame_to_the_member_mac() {
        let mut b = bridge();
        let packet = ipv4(DEVICE, NODE_IP, 0);
        let Ok(FromDevice::Segment(f)) = b.from_device(DEVICE, &packet) else {
            panic!("not bridged");
        };
        assert_eq!(f, frame(NODE, GW, ETHERTYPE_IPV4, &packet));
        let bcast = ipv4(DEVICE, Ipv4Addr::new(10, 90, 255, 255), 0);
        let Ok(FromDevice::Segment(f)) = b.from_device(DEVICE, &bcast) else {
            panic!("not bridged");
        };
        assert_eq!(&f[..6], &MacAddr::BROADCAST.0);
    }

    #[test]
    fn device_packets_are_held_to_their_own_source_and_known_destinations() {
        let mut b = bridge();
        let spoofed = ipv4(Ipv4Addr::new(10, 90, 0, 99), NODE_IP, 0);
        assert_eq!(
            b.from_device(DEVICE, &spoofed),
            Err(BridgeDrop::SpoofedSource)
        );
        let unknown = ipv4(DEVICE, Ipv4Addr::new(10, 90, 0, 77), 0);
        assert_eq!(
            b.from_device(DEVICE, &unknown),
            Err(BridgeDrop::UnknownDestination)
        );
        assert_eq!(b.from_device(DEVICE, &[0x60; 40]), Err(BridgeDrop::NotIpv4));
        let mut short = ipv4(DEVICE, NODE_IP, 0);
        short[3] = 200;
        assert_eq!(b.from_device(DEVICE, &short), Err(BridgeDrop::Malformed));
        let counted: Vec<_> = b.drops().map(|(r, n)| (r.label(), n)).collect();
        assert_eq!(counted.len(), 4);
        assert!(counted.iter().all(|(_, n)| *n == 1));
    }

    #[test]
    fn packets_between_devices_of_one_gateway_stay_there() {
        let mut b = bridge();
        let other = Ipv4Addr::new(10, 90, 0, 11);
        b.set_devices([DEVICE, other]);
        assert_eq!(
            b.from_device(DEVICE, &ipv4(DEVICE, other, 0)),
            Ok(FromDevice::Device(other))
        );
    }

    #[test]
    fn short_and_garbage_frames_are_not_for_devices() {
        let mut b = bridge();
        for len in 0..80 {
            let junk = vec![0x08; len];
            let _ = b.from_segment(&junk);
            let _ = b.from_device(DEVICE, &junk);
        }
    }
}
