//! Untrusted backup content (what a decrypted archive holds): decoding never panics nor allocates
//! beyond the input, and whatever decodes passed every check and encodes again to the same archive.
//! The age layer in front of it is age's own (fuzzed upstream); `fuzz_decode` is the content parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    shoal_controller::dr::archive::fuzz_decode(data);
});
