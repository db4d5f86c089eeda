//! The properties the fuzz targets check (overlay/fuzz `wireguard_bridge`), written once here so
//! the unit tests run them with deterministic mutations too.
//!
//! Untrusted bytes through the bridge: frames from the segment (any member) and packets from a
//! device (decrypted, but the device is not trusted). Never panics; a device packet that is bridged
//! always carries the device's own source address and the gateway's MAC; an answered ARP is always
//! for a device's address and names the gateway's MAC.
//!
//! Input: records of `[direction][length u16 LE][that many bytes]`; the last takes what is left.

use std::net::Ipv4Addr;

use shoal_proto::MacAddr;

use crate::bridge::{Bridge, FromDevice, FromSegment};

const GW: MacAddr = MacAddr([2, 0x5e, 0, 0, 0, 1]);
const DEVICE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const OTHER_DEVICE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);

/// Runs `data` as records through a bridge and checks the properties above (panics if one fails).
pub fn bridge_records(data: &[u8]) {
    let mut bridge = Bridge::new(GW);
    bridge.set_devices([DEVICE, OTHER_DEVICE]);
    bridge.set_neighbours(
        [(Ipv4Addr::new(10, 0, 0, 2), MacAddr([2, 0x5e, 0, 0, 0, 2]))],
        Some(Ipv4Addr::new(10, 0, 0, 255)),
    );
    let mut rest = data;
    while rest.len() >= 3 {
        let from_device = rest[0] & 1 == 1;
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]]));
        let body = &rest[3..];
        let (record, next) = body.split_at(len.min(body.len()));
        rest = next;
        if from_device {
            if let Ok(FromDevice::Segment(frame)) = bridge.from_device(DEVICE, record) {
                assert_eq!(frame[6..12], GW.0);
                assert_eq!(frame[14 + 12..14 + 16], DEVICE.octets());
            }
        } else {
            match bridge.from_segment(record) {
                FromSegment::Reply(reply) => {
                    let target = Ipv4Addr::from([reply[28], reply[29], reply[30], reply[31]]);
                    assert!(target == DEVICE || target == OTHER_DEVICE);
                    assert_eq!(reply[22..28], GW.0);
                }
                FromSegment::ToDevice { device, packet } => {
                    assert!(device == DEVICE || device == OTHER_DEVICE);
                    assert!(packet.len() <= record.len());
                }
                FromSegment::NotForDevices => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(direction: u8, bytes: &[u8]) -> Vec<u8> {
        let mut r = vec![direction];
        r.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        r.extend_from_slice(bytes);
        r
    }

    #[test]
    fn mutated_frames_and_packets_keep_the_properties() {
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&[2, 0x5e, 0, 0, 0, 2, 8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&[
            2, 0x5e, 0, 0, 0, 2, 10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 10, 0, 0, 10,
        ]);
        let mut ip = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 10, 10, 0, 0, 2,
        ];
        ip.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0]);
        let mut to_device = GW.0.to_vec();
        to_device.extend_from_slice(&[2, 0x5e, 0, 0, 0, 2, 8, 0]);
        to_device.extend_from_slice(&ip);
        to_device[14 + 12..14 + 20].copy_from_slice(&[10, 0, 0, 2, 10, 0, 0, 11]);
        let seeds = [record(0, &arp), record(1, &ip), record(0, &to_device)];
        // Seeded, so every run makes the same mutations.
        use rand::{rngs::StdRng, RngCore, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0x2545_f491_4f6c_dd1d);
        let mut next = move || rng.next_u64();
        for seed in &seeds {
            bridge_records(seed);
            for _ in 0..5000 {
                let mut input = seed.clone();
                for _ in 0..(next() % 4 + 1) {
                    let at = (next() as usize) % input.len();
                    match next() % 3 {
                        0 => input[at] = next() as u8,
                        1 => input.truncate(at.max(1)),
                        _ => input[at] ^= 1 << (next() % 8),
                    }
                }
                bridge_records(&input);
            }
        }
    }
}
