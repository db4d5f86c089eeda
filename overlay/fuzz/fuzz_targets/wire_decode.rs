//! Untrusted datagrams from one peer, in any order and at any pace, through decode and one
//! reassembler: never panics, never holds more than its bounds, never yields a frame outside the
//! Ethernet size limits; and any frame we encode reassembles to itself.
//!
//! Input: records of `[time step in 10 ms units][length u16 LE][that many bytes]`; the last record
//! takes what is left.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use shoal_overlay::wire::{
    decode, encode, Reassembler, ReassemblyConfig, ETHERNET_HEADER_LEN, MAX_ETHERNET_FRAME,
};
use shoal_proto::NetworkId;

const MAX_IN_PROGRESS: usize = 4;

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut now = start;
    let mut peer = Reassembler::new(ReassemblyConfig { max_in_progress: MAX_IN_PROGRESS, ..Default::default() });
    let mut next_id = 0u16;
    let mut rest = data;
    while let Some((&[step, l0, l1], tail)) = rest.split_first_chunk::<3>() {
        let len = usize::from(u16::from_le_bytes([l0, l1])).min(tail.len());
        let (datagram, tail) = tail.split_at(len);
        rest = tail;
        now += Duration::from_millis(u64::from(step) * 10);

        // Arbitrary bytes as a received datagram.
        let decoded = decode(datagram);
        match peer.receive(now, datagram) {
            Ok(Some(frame)) => {
                assert!((ETHERNET_HEADER_LEN..=MAX_ETHERNET_FRAME).contains(&frame.frame.len()));
            }
            Ok(None) => assert!(decoded.is_ok()),
            Err(e) => assert!(!e.reason().is_empty()),
        }
        assert!(peer.in_progress() <= MAX_IN_PROGRESS);
        assert!(peer.buffered_bytes() <= MAX_IN_PROGRESS * MAX_ETHERNET_FRAME);

        // The same bytes as a frame we send: whatever encodes comes back whole, in order or
        // reversed.
        let max_datagram = usize::from(step) * 8;
        if let Ok(datagrams) = encode(NetworkId(7), datagram, max_datagram, &mut next_id) {
            assert!(datagrams.iter().all(|d| d.len() <= max_datagram));
            let mut fresh = Reassembler::default();
            let mut out = Vec::new();
            let ordered: Box<dyn Iterator<Item = _>> =
                if step % 2 == 0 { Box::new(datagrams.iter()) } else { Box::new(datagrams.iter().rev()) };
            for d in ordered {
                if let Some(frame) = fresh.receive(now, d).expect("our own datagram decodes") {
                    assert_eq!(frame.network, NetworkId(7));
                    out.push(frame.frame.into_owned());
                }
            }
            assert_eq!(out, [datagram]);
        }
    }
    peer.expire(now + Duration::from_secs(60));
    assert_eq!((peer.in_progress(), peer.buffered_bytes()), (0, 0));
});
