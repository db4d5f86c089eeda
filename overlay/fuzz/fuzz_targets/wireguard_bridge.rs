//! Untrusted bytes through the WireGuard gateway's bridge; the properties are in
//! `shoal_wireguard::fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_wireguard::fuzzing::bridge_records(data));
