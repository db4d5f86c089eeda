//! The DHCP server's handler, not only its parser: a session of real packets from a handful of
//! clients, built from the input (some mutated before parsing), goes through the sans-IO server in
//! full or proxy mode while time moves, with PXE sightings feeding the boot-token gate. The
//! invariants (leases indexed consistently and replayable from their persisted changes, offers and
//! declines only inside the range and from the right client, declines capped, tokens only for
//! sighted MACs at the bucket's rate) are checked by `netboot::fuzz_harness::dhcp_session`, which
//! also runs in CI as a deterministic-mutation unit test.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_controller::netboot::fuzz_harness;

fuzz_target!(|data: &[u8]| {
    fuzz_harness::dhcp_session(data);
});
