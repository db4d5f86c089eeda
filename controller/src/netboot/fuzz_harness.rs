//! Sessions driven by arbitrary bytes through the netboot handlers, shared by the cargo-fuzz
//! targets (`controller/fuzz/`: `dhcp_handler`, `tftp_transfer`) and the deterministic-mutation
//! tests below, so CI runs the same checks without a nightly toolchain. Each function panics when
//! an invariant breaks.
//!
//! - [`dhcp_session`]: real packets (built with dhcproto, sometimes mutated, then [`dhcp::parse`]d)
//!   from a handful of clients go into a [`DhcpServer`] (full or proxy mode) while time moves; PXE
//!   sightings feed a [`BootTokenGate`] that boot-script requests ask. Checked: the lease indexes
//!   agree, the persisted lease changes replay to exactly the server's table, every lease and offer
//!   is in the range and no offered address is declined or another client's, a decline is accepted
//!   only from its holder or offeree, declines stay capped, no reply parses as a request, proxy
//!   mode hands out no address; the gate mints only for a MAC sighted within the window, never
//!   faster than its bucket allows, and stays within its memory cap.
//! - [`tftp_session`]: a read request (mutated options, any file size) starts a [`tftp::Transfer`];
//!   good and bad ACKs, raw packets and timeouts follow, with [`Slots`] taken and given back.
//!   Checked: every DATA block carries the right bytes, the transfer is done only after the last
//!   block's ACK, retransmissions stop after the configured count, nothing happens after the end,
//!   and slots never exceed their limits.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant},
};

use dhcproto::{
    v4::{DhcpOption, Message, MessageType, Opcode},
    Decodable, Decoder, Encodable,
};
use shoal_proto::UnixMillis;

use super::{
    boot_tokens::{BootTokenGate, GateConfig},
    dhcp::{
        self, Admission, DhcpConfig, DhcpMode, DhcpServer, Lease, LeaseChange, Leases, Mac,
        RequestKind,
    },
    slots::{SlotLimits, Slots},
    tftp::{self, Output, Packet, TransferConfig},
};

/// Reads the input a byte at a time; zeros once it runs out.
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn more(&self) -> bool {
        self.pos < self.data.len()
    }

    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
}

const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const OTHER_SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
const FIRST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

fn client_mac(n: u8) -> Mac {
    Mac([0x02, 0, 0, 0, 0, n % 6])
}

/// What a DHCP session reached, so tests can check the inputs exercise the deep states.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DhcpReached {
    /// Replies.
    pub replies: u64,
    /// Leases granted.
    pub leases: u64,
    /// Declines accepted.
    pub declines: u64,
    /// Boot tokens the gate allowed.
    pub tokens: u64,
    /// Boot tokens the gate refused.
    pub refusals: u64,
}

impl std::ops::AddAssign for DhcpReached {
    fn add_assign(&mut self, o: Self) {
        self.replies += o.replies;
        self.leases += o.leases;
        self.declines += o.declines;
        self.tokens += o.tokens;
        self.refusals += o.refusals;
    }
}

/// Drives a DHCP server and a boot-token gate with `data`; panics on a broken invariant.
pub fn dhcp_session(data: &[u8]) -> DhcpReached {
    let mut reached = DhcpReached::default();
    let mut input = Input { data, pos: 0 };
    let mode_byte = input.u8();
    let range = u32::from(mode_byte % 16) + 1;
    let last = Ipv4Addr::from(u32::from(FIRST) + range - 1);
    let mode = if mode_byte & 0x80 == 0 {
        DhcpMode::Full { first: FIRST, last }
    } else {
        DhcpMode::Proxy
    };
    let proxy = mode == DhcpMode::Proxy;
    let in_range = |ip: Ipv4Addr| (u32::from(FIRST)..=u32::from(last)).contains(&u32::from(ip));
    let mut server = DhcpServer::new(
        DhcpConfig::new(
            mode,
            SERVER,
            Ipv4Addr::new(255, 255, 255, 0),
            "http://192.0.2.1:7442".into(),
        ),
        Leases::default(),
    );
    let gate_config = GateConfig {
        sighting_window: Duration::from_secs(120),
        max_macs: 4,
        burst: 3,
        refill_every: Duration::from_secs(10),
    };
    let t0 = Instant::now();
    let mut gate = BootTokenGate::new(gate_config, t0);
    let mut now_ms = 1_000_000u64;
    let mut elapsed = Duration::ZERO;
    // What the shell would have persisted, replayed.
    let mut disk: BTreeMap<Mac, Lease> = BTreeMap::new();
    let mut last_sighting: HashMap<Mac, Duration> = HashMap::new();
    let mut minted: Vec<Duration> = Vec::new();
    let mut minted_for: HashMap<Mac, Vec<String>> = HashMap::new();

    while input.more() {
        let op = input.u8();
        match op % 8 {
            6 => {
                let step = Duration::from_secs(u64::from(input.u8()) * 10);
                elapsed += step;
                now_ms += step.as_millis() as u64;
            }
            7 => {
                // A boot script request.
                let mac = client_mac(input.u8());
                let t = t0 + elapsed;
                if gate.admit(&mac, t).is_err() {
                    reached.refusals += 1;
                } else {
                    reached.tokens += 1;
                    let seen = last_sighting.get(&mac).copied();
                    assert!(
                        seen.is_some_and(|s| elapsed - s <= gate_config.sighting_window),
                        "token for {mac} without a sighting in the window (last {seen:?}, now {elapsed:?})"
                    );
                    minted.push(elapsed);
                    let allowed = u64::from(gate_config.burst)
                        + (elapsed.as_secs() / gate_config.refill_every.as_secs());
                    assert!(
                        minted.len() as u64 <= allowed,
                        "{} tokens by {elapsed:?}, the bucket allows {allowed}",
                        minted.len()
                    );
                    let id = format!("t{}", minted.len());
                    let replaced = gate.minted(mac, id.clone());
                    if let Some(old) = replaced {
                        assert!(
                            minted_for.get(&mac).is_some_and(|ids| ids.contains(&old)),
                            "{mac} replaced {old}, not one of its tokens"
                        );
                    }
                    minted_for.entry(mac).or_default().push(id);
                }
                assert!(
                    gate.sightings() <= gate_config.max_macs
                        && gate.outstanding_len() <= gate_config.max_macs
                );
            }
            _ => {
                let Some((req, port, admission)) = packet(&mut input) else {
                    continue;
                };
                let now = UnixMillis(now_ms);
                if dhcp::is_boot_sighting(&req) {
                    gate.saw_pxe_boot(req.mac, t0 + elapsed);
                    last_sighting.insert(req.mac, elapsed);
                }
                let held_before = server.leases().get(&req.mac).map(|l| l.ip);
                let offered_before = req
                    .requested_ip
                    .and_then(|ip| server.leases().offered_to(ip, now));
                let reply = server.handle(now, port, &req, admission);
                server
                    .leases()
                    .check_invariants()
                    .unwrap_or_else(|e| panic!("lease table: {e}"));
                assert!(server.leases().declined_len() <= dhcp::MAX_DECLINED);
                assert!(server.leases().offered_len() <= range as usize);
                let Some(reply) = reply else { continue };
                reached.replies += 1;
                if proxy {
                    assert!(reply.leases.is_empty(), "proxyDHCP changed leases");
                }
                for change in &reply.leases {
                    match change {
                        LeaseChange::Put(l) => {
                            assert_eq!(l.mac, req.mac, "a lease for another client");
                            assert!(in_range(l.ip), "lease {} outside the range", l.ip);
                            assert!(l.expires > now);
                            disk.insert(l.mac, l.clone());
                            reached.leases += 1;
                        }
                        LeaseChange::Delete(m) => {
                            disk.remove(m);
                        }
                    }
                }
                let table: BTreeMap<Mac, Lease> =
                    server.leases().iter().map(|l| (l.mac, l.clone())).collect();
                assert_eq!(
                    disk, table,
                    "persisted lease changes do not replay to the table"
                );
                if req.kind == RequestKind::Decline {
                    let ip = req
                        .requested_ip
                        .expect("an accepted decline names an address");
                    assert!(in_range(ip), "decline of {ip}, outside the range, accepted");
                    assert!(
                        held_before == Some(ip) || offered_before == Some(req.mac),
                        "{} declined {ip}, which it neither held nor was offered",
                        req.mac
                    );
                    assert!(server.leases().is_declined(ip, now));
                    reached.declines += 1;
                }
                if reply.bytes.is_empty() {
                    continue;
                }
                assert!(
                    dhcp::parse(&reply.bytes).is_err(),
                    "a reply parses as a request"
                );
                let msg =
                    Message::decode(&mut Decoder::new(&reply.bytes)).expect("our reply decodes");
                let yiaddr = msg.yiaddr();
                if proxy {
                    assert!(yiaddr.is_unspecified(), "proxyDHCP handed out {yiaddr}");
                } else if msg.opts().msg_type() == Some(MessageType::Offer) {
                    assert!(in_range(yiaddr), "offer of {yiaddr} outside the range");
                    assert!(
                        !server.leases().is_declined(yiaddr, now),
                        "offer of declined {yiaddr}"
                    );
                    if let Some(l) = server.leases().by_ip(yiaddr) {
                        assert!(
                            l.mac == req.mac || l.expires <= now,
                            "offer of {yiaddr}, leased to {}",
                            l.mac
                        );
                    }
                }
            }
        }
    }
    reached
}

/// One request built from the input: parsed from real bytes, sometimes mutated first.
fn packet(input: &mut Input<'_>) -> Option<(dhcp::Request, u16, Admission)> {
    let mac = client_mac(input.u8());
    let kind = [
        MessageType::Discover,
        MessageType::Request,
        MessageType::Decline,
        MessageType::Release,
        MessageType::Inform,
    ][usize::from(input.u8() % 5)];
    let flags = input.u8();
    // .8 to .31: some below the range (it starts at .10), some above it.
    let ip = |b: u8| Ipv4Addr::new(192, 0, 2, 8 + b % 24);
    let requested = ip(input.u8());
    let ciaddr = ip(input.u8());
    let arch = input.u8();
    let mut m = Message::new_with_id(
        u32::from(input.u16()),
        if flags & 0x20 != 0 {
            ciaddr
        } else {
            Ipv4Addr::UNSPECIFIED
        },
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac.0,
    );
    m.set_opcode(Opcode::BootRequest);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    if flags & 0x01 != 0 {
        m.opts_mut().insert(DhcpOption::ClassIdentifier(
            b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
        ));
    }
    if flags & 0x02 != 0 {
        m.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
    }
    if flags & 0x04 != 0 {
        m.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(requested));
    }
    match flags >> 6 {
        1 => m.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER)),
        2 => m
            .opts_mut()
            .insert(DhcpOption::ServerIdentifier(OTHER_SERVER)),
        _ => None,
    };
    if arch < 16 {
        m.opts_mut()
            .insert(DhcpOption::ClientSystemArchitecture(u16::from(arch).into()));
    }
    let mut bytes = m.to_vec().ok()?;
    if flags & 0x08 != 0 {
        // One mutated byte anywhere: the parser decides what survives.
        let at = usize::from(input.u16()) % bytes.len();
        bytes[at] = input.u8();
    }
    let req = dhcp::parse(&bytes).ok()?;
    let port = if flags & 0x10 != 0 {
        dhcp::PXE_PORT
    } else {
        dhcp::SERVER_PORT
    };
    let admission = if arch & 0x80 != 0 {
        Admission::Hold
    } else {
        Admission::Admit
    };
    Some((req, port, admission))
}

/// How a TFTP session ended, so tests can check the inputs reach both ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TftpReached {
    /// Transfers completed.
    pub done: u64,
    /// Transfers that failed.
    pub failed: u64,
    /// Data blocks sent.
    pub blocks: u64,
}

impl std::ops::AddAssign for TftpReached {
    fn add_assign(&mut self, o: Self) {
        self.done += o.done;
        self.failed += o.failed;
        self.blocks += o.blocks;
    }
}

/// Drives a TFTP transfer and transfer slots with `data`; panics on a broken invariant.
pub fn tftp_session(data: &[u8]) -> TftpReached {
    let mut reached = TftpReached::default();
    let mut input = Input { data, pos: 0 };
    let size = usize::from(input.u16() % 6000);
    let file: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut options = Vec::new();
    let o = input.u8();
    if o & 1 != 0 {
        let v = match o >> 4 {
            0 => "0".to_owned(),
            1 => "7".to_owned(),
            2 => "99999999999999999999".to_owned(),
            3 => "-5".to_owned(),
            4 => "x".to_owned(),
            n => (u16::from(n) * u16::from(input.u8())).to_string(),
        };
        options.push(("BlkSize".to_owned(), v));
    }
    if o & 2 != 0 {
        options.push(("tsize".to_owned(), "0".to_owned()));
    }
    if o & 4 != 0 {
        options.push(("windowsize".to_owned(), "4".to_owned()));
    }
    let rrq = tftp::encode(&Packet::Rrq {
        filename: "undionly.kpxe".into(),
        mode: "octet".into(),
        options,
    });
    let Ok(parsed) = tftp::parse(&rrq) else {
        panic!("our own read request does not parse")
    };
    let (_, options) = tftp::check_request(Path::new("/srv/tftp"), &parsed)
        .expect("a plain read request is accepted");
    let config = TransferConfig {
        retransmit_after: Duration::from_secs(1),
        max_retries: 3,
    };
    let t0 = Instant::now();
    let mut now = t0;
    let (mut t, first) = tftp::Transfer::start(now, file.clone(), &options, config);
    let blksize = t.blksize();
    assert!(
        (8..=tftp::MAX_BLKSIZE).contains(&blksize),
        "block size {blksize}"
    );
    let blocks = file.len() / blksize + 1;
    // The block the client last received (0: the OACK, or nothing yet).
    let mut last_block = match tftp::parse(&first) {
        Ok(Packet::Oack { .. }) => 0u16,
        Ok(Packet::Data { block: 1, data }) => {
            assert_eq!(data, file[..blksize.min(file.len())], "block 1");
            1
        }
        other => panic!("first packet {other:?}"),
    };
    let mut acked = 0usize;
    let mut retries = 0u32;
    let mut finished = false;
    let slot_limits = SlotLimits {
        total: 3,
        per_client: 2,
    };
    let mut slots = Slots::new(slot_limits);
    let mut held: Vec<IpAddr> = Vec::new();

    while input.more() {
        let op = input.u8();
        let output = match op % 6 {
            op @ (0 | 1) => {
                // 0: a good client acknowledges what it got; 1: any block number.
                let block = if op == 0 { last_block } else { input.u16() };
                if !finished && block == last_block && usize::from(last_block) == acked + 1 {
                    acked += 1;
                }
                t.handle(now, &tftp::encode(&Packet::Ack { block }))
            }
            2 => {
                let len = usize::from(input.u8() % 16);
                let raw: Vec<u8> = (0..len).map(|_| input.u8()).collect();
                // A raw ACK would move the transfer without our bookkeeping knowing; those are op
                // 1.
                if raw.len() >= 2 && raw[0] == 0 && raw[1] == 4 {
                    continue;
                }
                t.handle(now, &raw)
            }
            3 => {
                now += Duration::from_millis(u64::from(input.u8()) * 20);
                t.handle_timeout(now)
            }
            4 => {
                let client = IpAddr::from([192, 0, 2, input.u8() % 4]);
                let before = (slots.in_use(), slots.held_by(client));
                match slots.acquire(client) {
                    Ok(()) => held.push(client),
                    Err(_) => assert!(
                        before.0 >= slot_limits.total || before.1 >= slot_limits.per_client,
                        "slot refused below the limits"
                    ),
                }
                assert!(
                    slots.in_use() <= slot_limits.total
                        && slots.held_by(client) <= slot_limits.per_client
                );
                continue;
            }
            _ => {
                if !held.is_empty() {
                    let client = held.swap_remove(usize::from(input.u8()) % held.len());
                    slots.release(client);
                }
                assert_eq!(slots.in_use(), held.len());
                continue;
            }
        };
        if finished {
            assert_eq!(output, Output::Nothing, "output after the end");
            continue;
        }
        match output {
            Output::Send(p) => {
                assert!(p.len() <= 4 + tftp::MAX_BLKSIZE);
                match tftp::parse(&p) {
                    Ok(Packet::Data { block, data }) => {
                        let n = usize::from(block);
                        assert!(n >= 1 && n <= blocks, "block {n} of {blocks}");
                        let start = (n - 1) * blksize;
                        assert_eq!(
                            data,
                            file[start..(start + blksize).min(file.len())],
                            "block {n} carries the wrong bytes"
                        );
                        reached.blocks += 1;
                        if block == last_block {
                            retries += 1;
                            assert!(
                                retries <= config.max_retries,
                                "more than {} retransmissions",
                                config.max_retries
                            );
                        } else {
                            assert_eq!(block, last_block.wrapping_add(1), "blocks out of order");
                            retries = 0;
                            last_block = block;
                        }
                    }
                    Ok(Packet::Oack { .. }) => {
                        assert_eq!(last_block, 0, "an OACK after data");
                        retries += 1;
                        assert!(retries <= config.max_retries);
                    }
                    other => panic!("the transfer sent {other:?}"),
                }
            }
            Output::Nothing => {}
            Output::Done => {
                assert_eq!(acked, blocks, "done before the last block was acknowledged");
                finished = true;
                reached.done += 1;
            }
            Output::Failed { packet, .. } => {
                if let Some(p) = packet {
                    assert!(
                        matches!(tftp::parse(&p), Ok(Packet::Error { .. })),
                        "a failure sends an error packet"
                    );
                }
                finished = true;
                reached.failed += 1;
            }
        }
        assert_eq!(
            t.poll_timeout().is_none(),
            finished,
            "a transfer wants a timer exactly while it runs"
        );
    }
    reached
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded, so every run sees the same inputs.
    fn inputs(seed: u64, count: usize, max_len: usize) -> impl Iterator<Item = Vec<u8>> {
        use rand::{rngs::StdRng, RngCore, SeedableRng};
        let mut rng = StdRng::seed_from_u64(seed);
        let mut next = move || rng.next_u64();
        (0..count).map(move |_| {
            let len = (next() as usize) % max_len;
            (0..len).map(|_| (next() >> 24) as u8).collect()
        })
    }

    /// One packet for [`packet`]: client, kind (0 discover, 1 request, 2 decline), flags, requested
    /// address (2 = .10), ciaddr, architecture, xid.
    fn pkt(mac: u8, kind: u8, flags: u8, requested: u8) -> [u8; 8] {
        [mac, kind, flags, requested, 0, 0, 0, 0]
    }

    #[test]
    fn dhcp_handler_keeps_its_invariants_under_deterministic_mutations() {
        // PXE (0x01), requested address (0x04), our server id (0x40).
        let (pxe, req_ours) = (0x01, 0x45);
        let mut lease_decline_token = vec![3u8]; // full mode, range .10-.13
        for p in [
            pkt(1, 0, pxe, 0),
            pkt(1, 1, req_ours, 2),
            pkt(1, 2, req_ours, 2),
            pkt(1, 0, pxe, 0),
        ] {
            lease_decline_token.push(0);
            lease_decline_token.extend(p);
        }
        lease_decline_token.extend([7, 1, 7, 2]);
        let first = dhcp_session(&lease_decline_token);
        assert_eq!(
            (first.leases, first.declines, first.tokens, first.refusals),
            (1, 1, 1, 1),
            "{first:?}"
        );
        let mut total = first;
        for s in inputs(0x2545_f491_4f6c_dd1d, 3000, 400) {
            total += dhcp_session(&s);
        }
        // The random inputs reach every kind of state, not only parse failures.
        assert!(
            total.leases > 100 && total.declines > 0 && total.tokens > 10 && total.refusals > 10,
            "{total:?}"
        );
    }

    #[test]
    fn tftp_transfer_keeps_its_invariants_under_deterministic_mutations() {
        // 1300 bytes at 512-byte blocks (no options): three good ACKs finish it.
        let done = tftp_session(&[0x05, 0x14, 0, 0, 0, 0]);
        assert_eq!(
            done,
            TftpReached {
                done: 1,
                failed: 0,
                blocks: 2
            }
        );
        // A silent client: retransmissions, then it fails.
        let silent = tftp_session(&[0, 200, 0, 3, 60, 3, 60, 3, 60, 3, 60, 3, 60]);
        assert_eq!((silent.done, silent.failed, silent.blocks), (0, 1, 3));
        let mut total = TftpReached::default();
        for s in inputs(0x9e37_79b9_7f4a_7c15, 3000, 300) {
            total += tftp_session(&s);
        }
        assert!(
            total.done > 10 && total.failed > 100 && total.blocks > 1000,
            "{total:?}"
        );
    }
}
