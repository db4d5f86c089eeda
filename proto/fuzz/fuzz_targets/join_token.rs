//! Operator-pasted text as a join token: never panics; what parses prints back to the same token.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_proto::JoinToken;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(token) = text.parse::<JoinToken>() {
            assert_eq!(token.to_string().parse::<JoinToken>().ok(), Some(token));
        }
    }
});
