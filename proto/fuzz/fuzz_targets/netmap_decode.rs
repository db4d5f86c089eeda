//! Untrusted postcard bytes as netmaps, deltas and controller messages, and deltas applied to a
//! decoded map: never panics; a delta either applies whole (reaching its `to_version`) or leaves
//! the map untouched.
//!
//! Input: `[flags][split][map bytes ..split][delta bytes ..]`, with deltas decoded back to back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_proto::{ControllerMsg, Netmap, NetmapDelta};

fn apply(map: &mut Netmap, delta: &NetmapDelta, force_version: bool) {
    if force_version {
        // Reach the change-applying code, not only the version check.
        map.version = delta.from_version;
    }
    let before = map.clone();
    match map.apply(delta) {
        Ok(()) => {
            assert_eq!(map.version, delta.to_version);
            assert_eq!(map.valid_until, delta.valid_until);
            let mut ids: Vec<_> = map.peers.iter().map(|p| &p.node).collect();
            ids.sort();
            ids.dedup();
            assert!(ids.len() <= before.peers.len() + delta.changes.len());
        }
        Err(gap) => {
            assert_eq!(*map, before);
            assert_eq!((gap.have, gap.delta_from), (before.version, delta.from_version));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(ControllerMsg::NetmapDelta(delta)) = postcard::from_bytes::<ControllerMsg>(data) {
        apply(&mut Netmap::default(), &delta, true);
    }
    let Some((&[flags, split], body)) = data.split_first_chunk::<2>() else { return };
    let (map_bytes, mut delta_bytes) = body.split_at(usize::from(split).min(body.len()));
    let mut map = match postcard::from_bytes::<ControllerMsg>(map_bytes) {
        Ok(ControllerMsg::Netmap(map)) => map,
        _ => postcard::from_bytes::<Netmap>(map_bytes).unwrap_or_default(),
    };
    let mut round = 0u32;
    while let Ok((delta, rest)) = postcard::take_from_bytes::<NetmapDelta>(delta_bytes) {
        if rest.len() == delta_bytes.len() {
            break;
        }
        apply(&mut map, &delta, flags >> (round % 8) & 1 == 1);
        delta_bytes = rest;
        round += 1;
    }
});
