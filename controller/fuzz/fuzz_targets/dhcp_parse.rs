//! Untrusted DHCP packets: parsing never panics, and whatever parses is answered (full and proxy
//! mode, both ports) without panicking.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use shoal_controller_core::netboot::dhcp::{self, Admission, DhcpConfig, DhcpMode, DhcpServer, Leases};
use shoal_proto::UnixMillis;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = dhcp::parse(data) else { return };
    let mask = Ipv4Addr::new(255, 255, 255, 0);
    let server = Ipv4Addr::new(192, 0, 2, 1);
    let full = DhcpMode::Full { first: Ipv4Addr::new(192, 0, 2, 10), last: Ipv4Addr::new(192, 0, 2, 20) };
    for mode in [full, DhcpMode::Proxy] {
        let mut s = DhcpServer::new(DhcpConfig::new(mode, server, mask, "http://192.0.2.1:7442".into()), Leases::default());
        for port in [dhcp::SERVER_PORT, dhcp::PXE_PORT] {
            for admission in [Admission::Admit, Admission::Hold] {
                if let Some(reply) = s.handle(UnixMillis(1), port, &req, admission) {
                    if !reply.bytes.is_empty() {
                        // Our own replies are BOOTREPLYs: they parse as DHCP, but not as requests.
                        assert!(dhcp::parse(&reply.bytes).is_err());
                    }
                }
            }
        }
    }
});
