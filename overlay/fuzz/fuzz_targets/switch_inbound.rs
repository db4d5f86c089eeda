//! Untrusted frames from peers through the switch's ingress path, with a netmap: never panics,
//! every frame is either delivered or counted as dropped, and a delivered frame carries only its
//! sender's controller-assigned addresses wherever a receiver learns addresses from (source MAC,
//! ARP sender, IPv4 source, IPv6 source, a neighbour advertisement's target). The same bytes read
//! from our own TAP never panic either.
//!
//! Input: records of `[sender][time step in 10 ms units][length u16 LE][that many bytes]`; the
//! sender byte picks one of three members or a stranger (low 2 bits) and the network (bit 2). The
//! last record takes what is left.
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use shoal_overlay::switch::{ipv6_link_local, Inbound, Member, Switch, SwitchConfig};
use shoal_proto::{MacAddr, NetworkId, NetworkMembership, NodeId};

const NET: NetworkId = NetworkId(1);
const OTHER: NetworkId = NetworkId(2);

fn mac(last: u8) -> MacAddr {
    MacAddr([0x02, 0x5e, 0, 0, 0, last])
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, last)
}

/// The oracle, written apart from `check_addresses`.
fn assert_only_own_addresses(f: &[u8], mac: MacAddr, address: Ipv4Addr) {
    assert_eq!(f[6..12], mac.0, "source MAC");
    let at = |r: std::ops::Range<usize>| f.get(r).expect("a delivered frame holds its headers");
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0806 => {
            assert_eq!(at(22..28), mac.0);
            let spa = at(28..32);
            assert!(spa == address.octets() || (spa == [0; 4] && at(38..42) == address.octets()));
        }
        0x0800 => assert_eq!(at(26..30), address.octets()),
        0x86dd => {
            let ll = ipv6_link_local(mac).octets();
            let src = at(22..38);
            assert!(src == ll || src == Ipv6Addr::UNSPECIFIED.octets());
            if at(20..21) == [58] && f.get(54) == Some(&136) {
                assert_eq!(at(62..78), ll, "neighbour advertisement target");
            }
        }
        other => panic!("delivered ethertype {other:#06x}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut now = start;
    let mut s = Switch::new(SwitchConfig { flood_burst: 64, flood_rate_per_peer: 100, ..Default::default() });
    let own = |id: NetworkId, last: u8| NetworkMembership {
        id,
        name: format!("net{}", id.0),
        subnet: Ipv4Addr::new(10, 0, 0, 0),
        prefix_len: 24,
        mac: mac(last),
        address: ip(last),
        mtu: 1380,
    };
    let members = [("a", 2u8), ("b", 3), ("c", 4)];
    s.set_network(&own(NET, 1), members.iter().map(|(n, i)| Member { node: NodeId((*n).into()), mac: mac(*i), address: ip(*i) }))
        .expect("a valid netmap");
    // On the other network only a is a member, with other addresses.
    s.set_network(&own(OTHER, 11), [Member { node: NodeId("a".into()), mac: mac(12), address: ip(12) }]).expect("valid");
    let mut inbound = 0u64;
    let mut rest = data;
    while let Some((&[who, step, l0, l1], tail)) = rest.split_first_chunk::<4>() {
        let len = usize::from(u16::from_le_bytes([l0, l1])).min(tail.len());
        let (frame, tail) = tail.split_at(len);
        rest = tail;
        now += Duration::from_millis(u64::from(step) * 10);
        let network = if who & 4 == 0 { NET } else { OTHER };
        // b and c are no members of OTHER: their frames there must all be dropped.
        let (name, last) = match (who & 3, network) {
            (3, _) => ("stranger", 9),
            (0, OTHER) => ("a", 12),
            (i, _) => members[usize::from(i)],
        };
        let from = NodeId(name.into());
        inbound += 1;
        if s.inbound(now, &from, network, frame) == Inbound::Deliver {
            assert!(name != "stranger" && (network == NET || name == "a"), "{name} is no member");
            assert_only_own_addresses(frame, mac(last), ip(last));
        }
        let _ = s.outbound(now, network, frame);
    }
    let dropped: u64 = s.inbound_drops().map(|(_, n)| n).sum();
    assert_eq!(dropped + s.counters().delivered, inbound, "every frame is delivered or counted");
});
