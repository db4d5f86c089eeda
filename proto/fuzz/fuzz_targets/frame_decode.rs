//! Untrusted bytes from the network as one frame of either direction: never panics, and whatever
//! decodes re-encodes to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_proto::{decode_frame, encode_frame, AgentMsg, ControllerMsg};

fuzz_target!(|data: &[u8]| {
    if let Ok((msg, used)) = decode_frame::<AgentMsg>(data) {
        assert!(used <= data.len());
        let again = encode_frame(&msg).expect("a decoded message re-encodes");
        let (back, _) = decode_frame::<AgentMsg>(&again).expect("re-encoded frame decodes");
        assert_eq!(format!("{msg:?}"), format!("{back:?}"));
    }
    let _ = decode_frame::<ControllerMsg>(data);
});
