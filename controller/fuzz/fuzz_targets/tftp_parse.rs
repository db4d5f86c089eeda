//! Untrusted TFTP packets: parsing never panics, a parsed packet re-encodes to itself, no accepted
//! read request resolves outside the root, and a transfer fed the bytes never panics.
#![no_main]

use std::{path::Path, time::Instant};

use libfuzzer_sys::fuzz_target;
use shoal_controller::netboot::tftp::{self, Packet};

fuzz_target!(|data: &[u8]| {
    let Ok(p) = tftp::parse(data) else { return };
    if !matches!(p, Packet::Error { .. } | Packet::Wrq { .. }) {
        let again = tftp::parse(&tftp::encode(&p)).expect("re-encoded packet parses");
        assert_eq!(again, p);
    }
    let root = Path::new("/srv/tftp");
    if let Ok((path, options)) = tftp::check_request(root, &p) {
        assert!(path.starts_with(root));
        assert!(!path.components().any(|c| matches!(c, std::path::Component::ParentDir)));
        let now = Instant::now();
        let (mut t, _) = tftp::Transfer::start(now, vec![0; 3000], &options, tftp::TransferConfig::default());
        let _ = t.handle(now, data);
        let _ = t.handle_timeout(now);
    }
});
