//! The TFTP transfer handler: a read request with options from the input starts a transfer of a
//! file of any size; good and bad ACKs, raw packets and timeouts follow, with transfer slots taken
//! and given back. `netboot::fuzz_harness::tftp_session` checks every block's bytes, that the
//! transfer ends only after the last ACK, bounded retransmissions, silence after the end, and the
//! slot limits; it also runs in CI as a deterministic-mutation unit test.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_controller::netboot::fuzz_harness;

fuzz_target!(|data: &[u8]| {
    fuzz_harness::tftp_session(data);
});
