//! Untrusted bytes arriving in arbitrary chunks through the streaming decoder: never panics, never
//! buffers past one frame's limit without reporting it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_proto::{AgentMsg, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let chunk = usize::from(split).max(1);
    let mut dec = FrameDecoder::new();
    for piece in rest.chunks(chunk) {
        if dec.wanted().is_err() {
            return;
        }
        dec.extend(piece);
        loop {
            match dec.next::<AgentMsg>() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
