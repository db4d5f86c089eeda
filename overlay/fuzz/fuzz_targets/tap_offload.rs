//! A TAP read with offloads (virtio-net header + frame) as the kernel might hand it over, and a
//! batch of received frames: neither may panic, and every frame the segmenter emits must be a frame
//! the coalescer takes or passes on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_overlay::offload::{Coalescer, Push, Segmenter};

fuzz_target!(|data: &[u8]| {
    let mut read = data.to_vec();
    let mut frames = Vec::new();
    let _ = Segmenter::default().split(&mut read, |f| frames.push(f.to_vec()));
    // Also feed the raw input, cut at arbitrary points, as received frames.
    frames.extend(data.chunks(97).map(<[u8]>::to_vec));
    let mut c = Coalescer::default();
    for f in &frames {
        if c.push(f) == Push::Full {
            if let Ok(writes) = c.flush() {
                for w in writes {
                    assert!(w.len() >= shoal_overlay::offload::VNET_HDR_LEN);
                }
            }
            c.push(f);
        }
    }
    if let Ok(writes) = c.flush() {
        writes.for_each(drop);
    };
});
