//! The overlay end to end, as an operator sees it: real agents with real TAP devices (`shoal0`),
//! each host in its own network namespace, NAT routers in between (iptables MASQUERADE for
//! endpoint-independent mapping, with `--to-ports` for one that changes the port, `--random-fully`
//! for endpoint-dependent), checked with ping,
//! arping, broadcasts, a TCP flow, `shoalctl overlay paths` and `shoalctl overlay counters`.
//!
//! Needs root (skips with a reason otherwise, fails under CI) and the binaries: `cargo build
//! --workspace --bins`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use shoal_tests::netns::{ipv4_of as tap_addr, run_in, NatMode};
use shoal_tests::{eventually, require_host_tests, Fleet, FleetConfig, OrPanic};

/// Deadline for agents to get their netmap and bring their TAP device up.
const TAP_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for a path to come up (direct attempts back off to 15 s between rounds).
const PATH_TIMEOUT: Duration = Duration::from_secs(40);
/// The overlay's default MTU.
const OVERLAY_MTU: usize = 1380;

/// Runs a command in a namespace (30 s deadline); its stdout, or an error with its output.
fn in_ns(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    run_in(ns, program, args, Duration::from_secs(30))
}

fn ping(ns: &str, to: Ipv4Addr) -> Result<String> {
    in_ns(ns, "ping", &["-c", "1", "-W", "1", &to.to_string()])
}

/// A fleet whose controller sits on the public LAN and whose agents sit behind NATs of `mode` (or
/// on the LAN itself with `None`).
fn fleet(agents: usize, mode: Option<NatMode>) -> Result<Fleet> {
    let mut fleet = Fleet::start(FleetConfig {
        wait_up: false,
        ..FleetConfig::fast().agents(0)
    })?;
    let token = fleet.create_token(&["--ttl", "1h", "--uses", &agents.to_string()])?;
    for _ in 0..agents {
        match mode {
            Some(mode) => fleet.add_agent_behind_nat(&token, mode)?,
            None => fleet.add_agent(&token)?,
        };
    }
    fleet.wait_all_up(Duration::from_secs(60))?;
    Ok(fleet)
}

/// Each agent's `shoal0` address, once all have one.
fn tap_addrs(fleet: &Fleet) -> Result<Vec<Ipv4Addr>> {
    eventually(
        TAP_TIMEOUT,
        "every agent has shoal0 with an address",
        || {
            fleet
                .agents()
                .iter()
                .map(|a| tap_addr(&a.netns, "shoal0"))
                .collect()
        },
    )
}

/// `shoalctl overlay paths -o json`.
fn paths(fleet: &Fleet) -> Result<Vec<Value>> {
    let v = fleet.ctl_json(&["overlay", "paths"])?;
    v.as_array()
        .cloned()
        .with_context(|| format!("overlay paths is not an array: {v}"))
}

/// Waits until both directions between agents `i` and `j` report a path of `kind`.
fn wait_path(
    fleet: &Fleet,
    i: usize,
    j: usize,
    kind: &str,
    timeout: Duration,
) -> Result<Vec<Value>> {
    let (a, b) = (fleet.node_id(i)?, fleet.node_id(j)?);
    eventually(
        timeout,
        &format!(
            "a {kind} path between agents {} and {} both ways",
            i + 1,
            j + 1
        ),
        || {
            let all = paths(fleet)?;
            let found: Vec<Value> = all
                .iter()
                .filter(|p| {
                    (p["from"] == a.as_str() && p["to"] == b.as_str())
                        || (p["from"] == b.as_str() && p["to"] == a.as_str())
                })
                .cloned()
                .collect();
            ensure!(
                found.len() == 2 && found.iter().all(|p| p["kind"] == kind),
                "paths between {a} and {b}: {found:?}"
            );
            Ok(found)
        },
    )
}

/// Waits until both directions between agents `i` and `j` are relayed and say why in `shoalctl
/// overlay paths -o json` (`relay_reason`): `i_to_j` on `i`'s report, `j_to_i` on `j`'s.
fn wait_relay_reasons(
    fleet: &Fleet,
    i: usize,
    j: usize,
    (i_to_j, j_to_i): (&str, &str),
    timeout: Duration,
) -> Result<Vec<Value>> {
    let (a, b) = (fleet.node_id(i)?, fleet.node_id(j)?);
    eventually(
        timeout,
        &format!(
            "agents {} and {} relayed because {i_to_j} / {j_to_i}",
            i + 1,
            j + 1
        ),
        || {
            let all = paths(fleet)?;
            let find = |from: &str, to: &str| {
                all.iter()
                    .find(|p| p["from"] == from && p["to"] == to)
                    .cloned()
            };
            let (ab, ba) = (find(&a, &b), find(&b, &a));
            let ok = |p: &Option<Value>, reason: &str| {
                p.as_ref()
                    .is_some_and(|p| p["kind"] == "relay" && p["relay_reason"] == reason)
            };
            ensure!(
                ok(&ab, i_to_j) && ok(&ba, j_to_i),
                "paths between {a} and {b}: {ab:?} {ba:?}"
            );
            Ok(vec![ab.unwrap_or_default(), ba.unwrap_or_default()])
        },
    )
}

/// [`wait_relay_reasons`] with the same reason both ways.
fn wait_relay_reason(
    fleet: &Fleet,
    i: usize,
    j: usize,
    reason: &str,
    timeout: Duration,
) -> Result<Vec<Value>> {
    wait_relay_reasons(fleet, i, j, (reason, reason), timeout)
}

/// A TCP echo flow from namespace `from` to `to_addr:port` (server in namespace `to`), one small
/// message every 50 ms, each echo checked. It counts round trips and remembers the first error.
struct TcpFlow {
    stop: Arc<AtomicBool>,
    round_trips: Arc<AtomicU64>,
    worst_gap_ms: Arc<AtomicU64>,
    client: Option<std::thread::JoinHandle<Result<()>>>,
}

impl TcpFlow {
    fn start(fleet: &Fleet, from: usize, to: usize, to_addr: Ipv4Addr) -> Result<TcpFlow> {
        let server_host = fleet.agents()[to].hostname.clone();
        let client_host = fleet.agents()[from].hostname.clone();
        let listener = fleet
            .topology()
            .host(&server_host)?
            .netns()
            .enter(|| TcpListener::bind((to_addr, 0)))??;
        let port = listener.local_addr()?.port();
        std::thread::spawn(move || -> Result<()> {
            let (mut s, _) = listener.accept()?;
            let mut buf = [0u8; 64];
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                s.write_all(&buf[..n])?;
            }
        });
        let stream = fleet.topology().host(&client_host)?.netns().enter(|| {
            TcpStream::connect_timeout(&SocketAddr::from((to_addr, port)), Duration::from_secs(5))
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let round_trips = Arc::new(AtomicU64::new(0));
        let worst_gap_ms = Arc::new(AtomicU64::new(0));
        let (st, rt, gap) = (stop.clone(), round_trips.clone(), worst_gap_ms.clone());
        let client = std::thread::spawn(move || -> Result<()> {
            let mut s = stream;
            // Long enough for a path to die and be replaced; TCP retransmits meanwhile.
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut last = Instant::now();
            let mut i = 0u64;
            while !st.load(Ordering::Relaxed) {
                let msg = format!("{i:016}");
                s.write_all(msg.as_bytes())?;
                let mut back = [0u8; 16];
                s.read_exact(&mut back).context("echo")?;
                ensure!(back == msg.as_bytes(), "echo mismatch");
                let now = Instant::now();
                gap.fetch_max((now - last).as_millis() as u64, Ordering::Relaxed);
                last = now;
                rt.fetch_add(1, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        });
        Ok(TcpFlow {
            stop,
            round_trips,
            worst_gap_ms,
            client: Some(client),
        })
    }

    fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Waits for `n` more round trips.
    fn advances(&self, n: u64, timeout: Duration) -> Result<()> {
        let start = self.round_trips();
        eventually(timeout, &format!("{n} more TCP round trips"), || {
            ensure!(
                !self.client.as_ref().is_some_and(|c| c.is_finished()),
                "the TCP flow broke"
            );
            ensure!(
                self.round_trips() >= start + n,
                "{} round trips so far",
                self.round_trips() - start
            );
            Ok(())
        })
    }

    fn finish(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(c) = self.client.take() {
            c.join()
                .map_err(|_| anyhow::anyhow!("TCP client panicked"))??;
        }
        Ok(self.worst_gap_ms.load(Ordering::Relaxed))
    }
}

#[test]
fn agents_on_a_lan_ping_over_the_overlay_at_full_mtu_and_direct() {
    require_host_tests!();
    let fleet = fleet(2, None).or_panic();
    let addrs = tap_addrs(&fleet).or_panic();
    let (a, b) = (
        fleet.agents()[0].netns.clone(),
        fleet.agents()[1].netns.clone(),
    );
    eventually(
        Duration::from_secs(20),
        "a pings b over the overlay",
        || ping(&a, addrs[1]),
    )
    .or_panic();
    eventually(
        Duration::from_secs(20),
        "b pings a over the overlay",
        || ping(&b, addrs[0]),
    )
    .or_panic();
    // The largest packet the MTU allows, with Don't Fragment: nothing is dropped for size.
    let size = (OVERLAY_MTU - 28).to_string();
    eventually(
        Duration::from_secs(10),
        "a full-MTU ping with DF set",
        || {
            in_ns(
                &a,
                "ping",
                &[
                    "-c",
                    "2",
                    "-W",
                    "1",
                    "-M",
                    "do",
                    "-s",
                    &size,
                    &addrs[1].to_string(),
                ],
            )
        },
    )
    .or_panic();
    // IPv6 link-local works as on any Ethernet.
    let ll = in_ns(
        &b,
        "ip",
        &["-6", "-o", "addr", "show", "dev", "shoal0", "scope", "link"],
    )
    .or_panic();
    let ll = ll
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|c| c.split('/').next())
        .map(str::to_owned);
    let ll = ll.expect("shoal0 has an IPv6 link-local address");
    eventually(Duration::from_secs(10), "an IPv6 link-local ping", || {
        in_ns(
            &a,
            "ping",
            &["-6", "-c", "1", "-W", "1", &format!("{ll}%shoal0")],
        )
    })
    .or_panic();
    wait_path(&fleet, 0, 1, "direct", PATH_TIMEOUT).or_panic();
}

#[test]
fn behind_endpoint_independent_nats_peers_connect_directly() {
    require_host_tests!();
    let fleet = fleet(3, Some(NatMode::EndpointIndependent)).or_panic();
    let addrs = tap_addrs(&fleet).or_panic();
    let ns: Vec<String> = fleet.agents().iter().map(|a| a.netns.clone()).collect();
    eventually(Duration::from_secs(20), "agent 1 pings agent 2", || {
        ping(&ns[0], addrs[1])
    })
    .or_panic();
    eventually(Duration::from_secs(10), "agent 1 arpings agent 2", || {
        in_ns(
            &ns[0],
            "arping",
            &["-c", "1", "-w", "2", "-i", "shoal0", &addrs[1].to_string()],
        )
    })
    .or_panic();
    // A broadcast from agent 1 reaches agents 2 and 3.
    let receivers: Vec<UdpSocket> = (1..3)
        .map(|i| {
            let s = fleet
                .topology()
                .host(&fleet.agents()[i].hostname)?
                .netns()
                .enter(|| UdpSocket::bind(("0.0.0.0", 47001)))??;
            s.set_read_timeout(Some(Duration::from_millis(300)))?;
            Ok(s)
        })
        .collect::<Result<_>>()
        .or_panic();
    let sender = fleet
        .topology()
        .host(&fleet.agents()[0].hostname)
        .or_panic()
        .netns()
        .enter(|| UdpSocket::bind((addrs[0], 0)))
        .or_panic()
        .expect("a UDP socket on shoal0");
    sender.set_broadcast(true).expect("SO_BROADCAST");
    let broadcast = Ipv4Addr::from(u32::from(addrs[0]) | 0xffff);
    for (i, r) in receivers.iter().enumerate() {
        eventually(
            Duration::from_secs(10),
            &format!("agent {} receives the broadcast", i + 2),
            || {
                sender.send_to(b"hello, everyone", (broadcast, 47001))?;
                let mut buf = [0u8; 64];
                let (n, from) = r.recv_from(&mut buf)?;
                ensure!(
                    &buf[..n] == b"hello, everyone" && from.ip() == addrs[0],
                    "got {:?} from {from}",
                    &buf[..n]
                );
                Ok(())
            },
        )
        .or_panic();
    }
    let found = wait_path(&fleet, 0, 1, "direct", PATH_TIMEOUT).or_panic();
    for p in &found {
        assert!(p["rtt_ms"].as_f64().is_some(), "rtt_ms in {p}");
        assert!(
            p["tx_bytes"].as_u64().is_some_and(|b| b > 0),
            "bytes sent in {p}"
        );
        assert!(
            p["rx_bytes"].as_u64().is_some_and(|b| b > 0),
            "bytes received in {p}"
        );
    }
}

#[test]
fn behind_endpoint_dependent_nats_peers_talk_through_the_relay() {
    require_host_tests!();
    let fleet = fleet(2, Some(NatMode::EndpointDependent)).or_panic();
    let addrs = tap_addrs(&fleet).or_panic();
    let a = fleet.agents()[0].netns.clone();
    eventually(
        Duration::from_secs(20),
        "a pings b through the relay",
        || ping(&a, addrs[1]),
    )
    .or_panic();
    let size = (OVERLAY_MTU - 28).to_string();
    in_ns(
        &a,
        "ping",
        &[
            "-c",
            "3",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            &size,
            &addrs[1].to_string(),
        ],
    )
    .or_panic();
    wait_path(&fleet, 0, 1, "relay", PATH_TIMEOUT).or_panic();
    // Both NATs were measured endpoint-dependent with the probe port, and punching timed out.
    wait_relay_reason(&fleet, 0, 1, "both_endpoint_dependent", PATH_TIMEOUT).or_panic();
    let table = fleet.ctl_ok(&["overlay", "paths"]).or_panic();
    assert!(
        table.contains("RELAYED BECAUSE") && table.contains("both_endpoint_dependent"),
        "{table}"
    );
    // Relay loss: 10% of the controller's UDP packets dropped each way. The relayed connection
    // recovers what QUIC must (handshakes, keep-alives); a TCP flow inside retransmits its own and
    // keeps going.
    let flow = TcpFlow::start(&fleet, 0, 1, addrs[1]).or_panic();
    flow.advances(10, Duration::from_secs(10)).or_panic();
    let lossy = |op: &str| -> Result<()> {
        for chain in ["INPUT", "OUTPUT"] {
            let rule = [
                op,
                chain,
                "-p",
                "udp",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.1",
                "-j",
                "DROP",
            ];
            in_ns(fleet.controller_ns(), "iptables", &rule)?;
        }
        Ok(())
    };
    lossy("-A").or_panic();
    flow.advances(40, Duration::from_secs(30)).or_panic();
    lossy("-D").or_panic();
    flow.advances(10, Duration::from_secs(10)).or_panic();
    flow.finish().or_panic();
}

#[test]
fn a_tcp_flow_survives_direct_to_relay_and_back() {
    require_host_tests!();
    let fleet = fleet(2, Some(NatMode::EndpointIndependent)).or_panic();
    let addrs = tap_addrs(&fleet).or_panic();
    eventually(Duration::from_secs(20), "a pings b", || {
        ping(&fleet.agents()[0].netns, addrs[1])
    })
    .or_panic();
    wait_path(&fleet, 0, 1, "direct", PATH_TIMEOUT).or_panic();
    let flow = TcpFlow::start(&fleet, 0, 1, addrs[1]).or_panic();
    flow.advances(20, Duration::from_secs(10)).or_panic();
    fleet
        .topology()
        .block_udp_between("nat-1", "nat-2")
        .or_panic();
    wait_path(&fleet, 0, 1, "relay", PATH_TIMEOUT).or_panic();
    // Neither NAT maps per destination, yet the direct attempts time out: UDP is blocked.
    wait_relay_reason(&fleet, 0, 1, "udp_blocked", PATH_TIMEOUT).or_panic();
    flow.advances(20, Duration::from_secs(20)).or_panic();
    fleet
        .topology()
        .unblock_udp_between("nat-1", "nat-2")
        .or_panic();
    wait_path(&fleet, 0, 1, "direct", PATH_TIMEOUT).or_panic();
    flow.advances(20, Duration::from_secs(20)).or_panic();
    let worst_gap = flow.finish().or_panic();
    eprintln!("longest pause of the TCP flow across both moves: {worst_gap} ms");
}

/// The NAT matrix on one topology, so that it costs one fleet start: agents 1 and 2 behind one
/// endpoint-independent NAT (`nat-1`: two nodes behind the same NAT), agent 3 behind another
/// (`nat-3`), agents 4 and 5 behind endpoint-dependent ones (`nat-4`, `nat-5`), agents 6 and 7
/// behind NATs of their own inside `lan-3` (nested, no hairpin), agent 8 behind an
/// endpoint-independent NAT that changes the port (`nat-8`). Wherever a direct
/// path is possible it is up within 10 s of the agents' TAP devices, and it is kept; where it is
/// not, the relay carries the pair and `shoalctl overlay paths` says which NAT behaviour blocked
/// it. Then, with a TCP flow on the 1–3 pair: both NATs lose their mappings mid-flow (conntrack
/// flushed); nat-1 rebinds agent 1 to another port; and the path through them shrinks to a
/// 1280-byte MTU. The flow goes on, full-size pings with Don't Fragment still pass, and the pair
/// is direct again after each.
#[test]
fn nat_matrix_direct_wherever_possible_within_ten_seconds_and_the_relay_says_why() {
    require_host_tests!();
    const DIRECT: Duration = Duration::from_secs(10);
    let mut fleet = Fleet::start(FleetConfig {
        wait_up: false,
        ..FleetConfig::fast().agents(0)
    })
    .or_panic();
    let token = fleet
        .create_token(&["--ttl", "1h", "--uses", "8"])
        .or_panic();
    fleet
        .add_agent_behind_nat(&token, NatMode::EndpointIndependent)
        .or_panic(); // agent 1, nat-1
    fleet.add_agent_on(&token, "lan-1").or_panic(); // agent 2, beside agent 1
    for mode in [
        NatMode::EndpointIndependent, // agent 3, nat-3
        NatMode::EndpointDependent,   // agent 4, nat-4
        NatMode::EndpointDependent,   // agent 5, nat-5
    ] {
        fleet.add_agent_behind_nat(&token, mode).or_panic();
    }
    // Agents 6 and 7 each behind a NAT of their own inside lan-3, so behind nat-3 too: the
    // controller sees both at nat-3's address, which nat-3 does not hairpin, and their LAN
    // addresses are private to each.
    for n in [6, 7] {
        let lan = format!("lan-{n}");
        fleet
            .topology_mut()
            .add_nat_router(
                &format!("nat-{n}"),
                "lan-3",
                &lan,
                &format!("10.200.{n}.0/24"),
                NatMode::EndpointIndependent,
            )
            .or_panic();
        fleet.add_agent_on(&token, &lan).or_panic();
    }
    // Agent 8 behind an endpoint-independent NAT that changes the port (nat-8).
    fleet
        .add_agent_behind_nat(&token, NatMode::EndpointIndependentPortChanging)
        .or_panic();
    fleet.wait_all_up(Duration::from_secs(60)).or_panic();
    let addrs = tap_addrs(&fleet).or_panic();
    // Direct where it can be: behind the same NAT (over the LAN), and across two
    // endpoint-independent NATs.
    wait_path(&fleet, 0, 1, "direct", DIRECT).or_panic();
    wait_path(&fleet, 0, 2, "direct", DIRECT).or_panic();
    wait_path(&fleet, 1, 2, "direct", DIRECT).or_panic();
    // Endpoint-dependent on one side: its packets come from a port the other NAT never sent to,
    // and the other side's go to a port that was only ever mapped for the controller.
    wait_relay_reasons(
        &fleet,
        2,
        3,
        ("peer_endpoint_dependent", "local_endpoint_dependent"),
        PATH_TIMEOUT,
    )
    .or_panic();
    // On both sides.
    wait_relay_reason(&fleet, 3, 4, "both_endpoint_dependent", PATH_TIMEOUT).or_panic();
    // A port-changing endpoint-independent NAT is as good as a port-preserving one: agent 8 is
    // reached directly at the port its NAT chose (never the one it bound), from either kind.
    wait_path(&fleet, 7, 0, "direct", DIRECT).or_panic();
    wait_path(&fleet, 7, 2, "direct", DIRECT).or_panic();
    let n8 = fleet.node_id(7).or_panic();
    let all = paths(&fleet).or_panic();
    let p = all
        .iter()
        .find(|p| p["from"] == fleet.node_id(0).or_panic().as_str() && p["to"] == n8.as_str())
        .expect("a path from agent 1 to agent 8");
    let port = p["remote"]
        .as_str()
        .and_then(|r| r.parse::<std::net::SocketAddr>().ok())
        .map(|r| r.port());
    assert!(
        port.is_some_and(|p| (20000..=20999).contains(&p)),
        "agent 8 reached at nat-8's chosen port: {p}"
    );
    wait_relay_reasons(
        &fleet,
        7,
        3,
        ("peer_endpoint_dependent", "local_endpoint_dependent"),
        PATH_TIMEOUT,
    )
    .or_panic();
    // Double NAT: agent 3 sees agents 6 and 7 at their NATs' lan-3 addresses and tells them; they
    // tell the fleet, and punch to each other there. Only peer-observed addresses make this
    // direct.
    wait_path(&fleet, 5, 6, "direct", PATH_TIMEOUT).or_panic();
    let (n6, n7) = (fleet.node_id(5).or_panic(), fleet.node_id(6).or_panic());
    let all = paths(&fleet).or_panic();
    let p = all
        .iter()
        .find(|p| p["from"] == n6.as_str() && p["to"] == n7.as_str())
        .expect("a path from agent 6 to agent 7");
    assert!(
        p["remote"]
            .as_str()
            .is_some_and(|r| r.starts_with("10.200.3.")),
        "agent 7 reached at its NAT's lan-3 address: {p}"
    );
    // Traffic flows on every kind of path.
    for (from, to) in [(0, 1), (0, 2), (2, 3), (3, 4), (7, 0)] {
        eventually(
            Duration::from_secs(10),
            &format!("agent {} pings agent {}", from + 1, to + 1),
            || ping(&fleet.agents()[from].netns, addrs[to]),
        )
        .or_panic();
    }
    // Direct paths are kept: still direct after the relay's linger and several report rounds.
    shoal_tests::consistently(
        Duration::from_secs(12),
        "the direct pairs stay direct",
        || {
            for (i, j) in [(0, 1), (0, 2)] {
                wait_path(&fleet, i, j, "direct", Duration::from_secs(1))?;
            }
            Ok(())
        },
    )
    .or_panic();

    // Both NATs forget their mappings mid-flow.
    let flow = TcpFlow::start(&fleet, 0, 2, addrs[2]).or_panic();
    flow.advances(10, Duration::from_secs(10)).or_panic();
    let router_ns = |name: &str| -> String {
        fleet
            .topology()
            .host(name)
            .map(|h| h.ns_name().to_owned())
            .or_panic()
    };
    for nat in ["nat-1", "nat-3"] {
        in_ns(&router_ns(nat), "conntrack", &["-F"]).or_panic();
    }
    flow.advances(20, Duration::from_secs(20)).or_panic();
    wait_path(&fleet, 0, 2, "direct", DIRECT).or_panic();

    // nat-1 rebinds agent 1 to another public port (and keeps it for every destination: a
    // port-changing endpoint-independent NAT). Connections agent 1 opened follow it (QUIC
    // migration); the controller notices on agent 1's next report and gives its peers the new
    // address, so a path that died with the old mapping is punched again to the new one.
    let agent1 = shoal_tests::netns::ipv4_of(&fleet.agents()[0].netns, "eth0").or_panic();
    let wan1 = fleet
        .topology()
        .router("nat-1")
        .or_panic()
        .wan()
        .name
        .clone();
    in_ns(
        &router_ns("nat-1"),
        "iptables",
        &[
            "-t",
            "nat",
            "-I",
            "POSTROUTING",
            "1",
            "-s",
            &agent1.to_string(),
            "-o",
            &wan1,
            "-p",
            "udp",
            "-j",
            "MASQUERADE",
            "--to-ports",
            "40000",
        ],
    )
    .or_panic();
    in_ns(&router_ns("nat-1"), "conntrack", &["-F"]).or_panic();
    flow.advances(20, Duration::from_secs(30)).or_panic();
    let (n1, n3) = (fleet.node_id(0).or_panic(), fleet.node_id(2).or_panic());
    eventually(
        Duration::from_secs(20),
        "agent 3 reaches agent 1 directly at its new port",
        || {
            wait_path(&fleet, 0, 2, "direct", Duration::from_secs(1))?;
            let all = paths(&fleet)?;
            let p = all
                .iter()
                .find(|p| p["from"] == n3.as_str() && p["to"] == n1.as_str())
                .context("no path from agent 3 to agent 1")?;
            ensure!(
                p["remote"].as_str().is_some_and(|r| r.ends_with(":40000")),
                "{p}"
            );
            Ok(())
        },
    )
    .or_panic();

    // The path between them shrinks to a 1280-byte MTU (both routers' WAN links).
    for nat in ["nat-1", "nat-3"] {
        let wan = fleet.topology().router(nat).or_panic().wan().name.clone();
        in_ns(&router_ns(nat), "ip", &["link", "set", &wan, "mtu", "1280"]).or_panic();
    }
    flow.advances(20, Duration::from_secs(30)).or_panic();
    let size = (OVERLAY_MTU - 28).to_string();
    eventually(
        Duration::from_secs(20),
        "a full-MTU ping with DF set over the shrunken path",
        || {
            in_ns(
                &fleet.agents()[0].netns,
                "ping",
                &[
                    "-c",
                    "2",
                    "-W",
                    "1",
                    "-M",
                    "do",
                    "-s",
                    &size,
                    &addrs[2].to_string(),
                ],
            )
        },
    )
    .or_panic();
    wait_path(&fleet, 0, 2, "direct", DIRECT).or_panic();
    let worst_gap = flow.finish().or_panic();
    eprintln!(
        "longest pause of the TCP flow across the rebinding and the MTU drop: {worst_gap} ms"
    );
}

#[test]
fn with_the_controller_down_peers_keep_talking_and_a_restarted_agent_rejoins_from_its_cache() {
    require_host_tests!();
    let mut fleet = fleet(2, Some(NatMode::EndpointIndependent)).or_panic();
    let addrs = tap_addrs(&fleet).or_panic();
    let (a, b) = (
        fleet.agents()[0].netns.clone(),
        fleet.agents()[1].netns.clone(),
    );
    eventually(Duration::from_secs(20), "a pings b", || ping(&a, addrs[1])).or_panic();
    wait_path(&fleet, 0, 1, "direct", PATH_TIMEOUT).or_panic();
    fleet.controller().kill().or_panic();
    // Established direct paths carry on: every ping for 8 s gets through.
    shoal_tests::consistently(
        Duration::from_secs(8),
        "a keeps pinging b with the controller down",
        || ping(&a, addrs[1]).map(drop),
    )
    .or_panic();
    // A restarted agent finds its peers from its cached netmap, on the UDP port it kept.
    fleet.agent(1).proc.restart().or_panic();
    eventually(
        Duration::from_secs(40),
        "the restarted agent is reachable again",
        || ping(&a, addrs[1]),
    )
    .or_panic();
    eventually(Duration::from_secs(10), "and reaches its peer", || {
        ping(&b, addrs[0])
    })
    .or_panic();
    assert_eq!(
        tap_addr(&b, "shoal0").or_panic(),
        addrs[1],
        "the same overlay address from the cache"
    );
}

#[test]
fn removed_members_are_cut_off_within_two_seconds_and_networks_stay_apart() {
    require_host_tests!();
    let fleet = fleet(3, None).or_panic();
    let addrs = tap_addrs(&fleet).or_panic();
    let ns: Vec<String> = fleet.agents().iter().map(|a| a.netns.clone()).collect();
    let ids: Vec<String> = (0..3)
        .map(|i| fleet.node_id(i))
        .collect::<Result<_>>()
        .or_panic();
    // A second network with agents 1 and 2 only: their `shoal1` devices.
    fleet
        .ctl_ok(&["network", "create", "lab", "--subnet", "10.91.0.0/24"])
        .or_panic();
    for id in &ids[..2] {
        fleet
            .ctl_ok(&["network", "add", "lab", "--node", id])
            .or_panic();
    }
    let lab: Vec<Ipv4Addr> = eventually(TAP_TIMEOUT, "agents 1 and 2 have shoal1", || {
        ns[..2].iter().map(|n| tap_addr(n, "shoal1")).collect()
    })
    .or_panic();
    eventually(
        Duration::from_secs(20),
        "agent 1 pings agent 2 on lab",
        || ping(&ns[0], lab[1]),
    )
    .or_panic();
    assert!(tap_addr(&ns[2], "shoal1").is_err(), "agent 3 is not on lab");
    // A broadcast on lab reaches agent 2 and never agent 3 (which is only on default).
    let listen = |i: usize| -> UdpSocket {
        let s = fleet
            .topology()
            .host(&fleet.agents()[i].hostname)
            .or_panic()
            .netns()
            .enter(|| UdpSocket::bind(("0.0.0.0", 47002)))
            .or_panic()
            .expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        s
    };
    let (at_2, at_3) = (listen(1), listen(2));
    let sender = fleet
        .topology()
        .host(&fleet.agents()[0].hostname)
        .or_panic()
        .netns()
        .enter(|| UdpSocket::bind((lab[0], 0)))
        .or_panic()
        .expect("bind");
    sender.set_broadcast(true).expect("SO_BROADCAST");
    eventually(
        Duration::from_secs(10),
        "agent 2 receives the lab broadcast",
        || {
            sender.send_to(b"lab only", ("10.91.0.255", 47002))?;
            let mut buf = [0u8; 16];
            let (n, _) = at_2.recv_from(&mut buf)?;
            ensure!(&buf[..n] == b"lab only");
            Ok(())
        },
    )
    .or_panic();
    let mut buf = [0u8; 16];
    for _ in 0..5 {
        sender
            .send_to(b"lab only", ("10.91.0.255", 47002))
            .expect("send");
        if let Ok((n, from)) = at_3.recv_from(&mut buf) {
            panic!(
                "agent 3 received {:?} from {from}, but it is not on lab",
                &buf[..n]
            );
        }
    }
    // Removed from lab: unreachable there within 2 s, still reachable on default.
    fleet
        .ctl_ok(&["network", "remove", "lab", "--node", &ids[1]])
        .or_panic();
    let removed = Instant::now();
    eventually(Duration::from_secs(2), "agent 2 unreachable on lab", || {
        ensure!(ping(&ns[0], lab[1]).is_err(), "still answers");
        Ok(())
    })
    .or_panic();
    eprintln!(
        "cut off from lab {} ms after `network remove` returned",
        removed.elapsed().as_millis()
    );
    ping(&ns[0], addrs[1]).or_panic();
    // Removed from the fleet: unreachable within 2 s.
    fleet.ctl_ok(&["nodes", "remove", &ids[2]]).or_panic();
    let removed = Instant::now();
    eventually(Duration::from_secs(2), "agent 3 unreachable", || {
        ensure!(ping(&ns[0], addrs[2]).is_err(), "still answers");
        Ok(())
    })
    .or_panic();
    eprintln!(
        "removed node cut off {} ms after `nodes remove` returned",
        removed.elapsed().as_millis()
    );
    shoal_tests::consistently(Duration::from_secs(3), "agent 3 stays unreachable", || {
        ensure!(ping(&ns[0], addrs[2]).is_err(), "answers again");
        Ok(())
    })
    .or_panic();
}

/// `node`'s count of frames dropped for `reason`, from `shoalctl overlay counters -o json`; an
/// error until the node has reported.
fn dropped(fleet: &Fleet, node: &str, reason: &str) -> Result<u64> {
    let all = fleet.ctl_json(&["overlay", "counters"])?;
    let mine = all
        .as_array()
        .and_then(|a| a.iter().find(|c| c["node"] == node))
        .with_context(|| format!("no counters from {node} yet: {all}"))?;
    Ok(mine["dropped"][reason].as_u64().unwrap_or(0))
}

/// Waits until `node`'s `reason` count passes `before`; the new count.
fn drops_rise(fleet: &Fleet, node: &str, reason: &str, before: u64) -> Result<u64> {
    eventually(
        Duration::from_secs(30),
        &format!("{node} counts {reason} drops"),
        || {
            let now = dropped(fleet, node, reason)?;
            ensure!(now > before, "{reason}: still {now}");
            Ok(now)
        },
    )
}

/// The MAC of `dev` in namespace `ns`.
fn mac_of(ns: &str, dev: &str) -> Result<String> {
    let out = in_ns(ns, "ip", &["-o", "link", "show", "dev", dev])?;
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("no MAC on {dev} in {ns}: {out}"))
}

/// The IPv6 link-local address of `dev` in namespace `ns`.
fn link_local_of(ns: &str, dev: &str) -> Result<String> {
    let out = in_ns(
        ns,
        "ip",
        &["-6", "-o", "addr", "show", "dev", dev, "scope", "link"],
    )?;
    out.split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|c| c.split('/').next())
        .map(str::to_owned)
        .with_context(|| format!("no link-local address on {dev} in {ns}: {out}"))
}

#[test]
fn a_member_spoofing_another_members_addresses_is_dropped_and_counted_while_real_traffic_flows() {
    require_host_tests!();
    let fleet = fleet(3, None).or_panic();
    let addrs = tap_addrs(&fleet).or_panic();
    let ns: Vec<String> = fleet.agents().iter().map(|a| a.netns.clone()).collect();
    let ids: Vec<String> = (0..3)
        .map(|i| fleet.node_id(i))
        .collect::<Result<_>>()
        .or_panic();
    // Agent 1 attacks, agent 2 is the victim whose addresses it claims, agent 3 receives.
    let (attacker, victim, receiver) = (&ns[0], &ns[1], &ns[2]);
    let (victim_ip, receiver_ip) = (addrs[1].to_string(), addrs[2]);
    for (from, to) in [(0, 2), (1, 2), (2, 1), (0, 1)] {
        eventually(
            Duration::from_secs(20),
            &format!("agent {} pings agent {}", from + 1, to + 1),
            || ping(&ns[from], addrs[to]),
        )
        .or_panic();
    }
    let (attacker_mac, victim_mac) = (
        mac_of(attacker, "shoal0").or_panic(),
        mac_of(victim, "shoal0").or_panic(),
    );
    // The link-local address is the EUI-64 of the controller-assigned MAC: what peers accept.
    let victim_ll = link_local_of(victim, "shoal0").or_panic();
    let m: Vec<u8> = victim_mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("hex"))
        .collect();
    let eui64 = std::net::Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 2,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ]);
    assert_eq!(
        victim_ll
            .parse::<std::net::Ipv6Addr>()
            .expect("an IPv6 address"),
        eui64,
        "shoal0's link-local"
    );
    let receiver_ll = link_local_of(receiver, "shoal0").or_panic();
    eventually(Duration::from_secs(10), "a genuine link-local ping", || {
        in_ns(
            attacker,
            "ping",
            &["-6", "-c", "1", "-W", "1", &format!("{receiver_ll}%shoal0")],
        )
    })
    .or_panic();
    let before = |reason: &str| {
        eventually(
            Duration::from_secs(30),
            "the receiver's first counters",
            || dropped(&fleet, &ids[2], reason),
        )
        .or_panic()
    };
    let neighbour_of_victim = || {
        in_ns(
            receiver,
            "ip",
            &["neigh", "show", &victim_ip, "dev", "shoal0"],
        )
        .or_panic()
    };
    assert!(
        neighbour_of_victim().contains(&victim_mac),
        "the receiver knows the victim's MAC: {}",
        neighbour_of_victim()
    );

    // ARP in the victim's name: unsolicited announcements and requests with its address as sender.
    // (arping exits non-zero when nothing answers, which is the point.)
    let arp_before = before("spoofed_arp");
    let victim_arp_before = dropped(&fleet, &ids[1], "spoofed_arp").unwrap_or(0);
    let _ = in_ns(
        attacker,
        "arping",
        &[
            "-U", "-S", &victim_ip, "-i", "shoal0", "-c", "3", "-w", "3", &victim_ip,
        ],
    );
    let _ = in_ns(
        attacker,
        "arping",
        &[
            "-S",
            &victim_ip,
            "-i",
            "shoal0",
            "-c",
            "3",
            "-w",
            "3",
            &receiver_ip.to_string(),
        ],
    );
    let arp_after = drops_rise(&fleet, &ids[2], "spoofed_arp", arp_before).or_panic();
    drops_rise(&fleet, &ids[1], "spoofed_arp", victim_arp_before).or_panic();
    eprintln!("receiver's spoofed_arp: {arp_before} -> {arp_after}");
    let neighbour = neighbour_of_victim();
    assert!(
        !neighbour.contains(&attacker_mac),
        "the receiver's ARP cache now points the victim's address at the attacker: {neighbour}"
    );

    // IPv4 in the victim's name: its address added to the attacker's shoal0, datagrams sent from
    // it.
    in_ns(
        attacker,
        "ip",
        &["addr", "add", &format!("{victim_ip}/32"), "dev", "shoal0"],
    )
    .or_panic();
    let ipv4_before = before("spoofed_ipv4");
    let host = |i: usize| {
        fleet
            .topology()
            .host(&fleet.agents()[i].hostname)
            .or_panic()
            .netns()
    };
    let listener = host(2)
        .enter(|| UdpSocket::bind((receiver_ip, 0)))
        .or_panic()
        .expect("a UDP socket on shoal0");
    listener
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let to = listener.local_addr().expect("bound");
    let spoofer = host(0)
        .enter(|| UdpSocket::bind((addrs[1], 0)))
        .or_panic()
        .expect("a socket on the victim's address");
    let genuine = host(0)
        .enter(|| UdpSocket::bind((addrs[0], 0)))
        .or_panic()
        .expect("a socket on the attacker's own address");
    eventually(Duration::from_secs(10), "the attacker's genuine datagram arrives, the spoofed one never", || {
        spoofer.send_to(b"spoofed", to)?;
        genuine.send_to(b"genuine", to)?;
        let mut buf = [0u8; 16];
        loop {
            let (n, from) = listener.recv_from(&mut buf)?;
            assert_ne!(&buf[..n], b"spoofed", "a datagram from the victim's address, sent by the attacker, arrived from {from}");
            if &buf[..n] == b"genuine" {
                ensure!(from.ip() == addrs[0], "genuine datagram from {from}");
                return Ok(());
            }
        }
    })
    .or_panic();
    let ipv4_after = drops_rise(&fleet, &ids[2], "spoofed_ipv4", ipv4_before).or_panic();
    eprintln!("receiver's spoofed_ipv4: {ipv4_before} -> {ipv4_after}");

    // IPv6 from the victim's link-local address.
    in_ns(
        attacker,
        "ip",
        &[
            "-6",
            "addr",
            "add",
            &format!("{victim_ll}/64"),
            "dev",
            "shoal0",
            "nodad",
        ],
    )
    .or_panic();
    let ipv6_before = before("spoofed_ipv6");
    let link = in_ns(attacker, "ip", &["-o", "link", "show", "dev", "shoal0"]).or_panic();
    let scope: u32 = link
        .split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .expect("shoal0's interface index");
    let v6 = |a: &str| std::net::SocketAddrV6::new(a.parse().expect("IPv6"), 0, 0, scope);
    let spoofer = host(0)
        .enter(|| UdpSocket::bind(v6(&victim_ll)))
        .or_panic()
        .expect("a socket on the victim's link-local");
    let mut to_receiver = v6(&receiver_ll);
    to_receiver.set_port(47003);
    for _ in 0..3 {
        spoofer.send_to(b"spoofed", to_receiver).expect("send");
    }
    let ipv6_after = drops_rise(&fleet, &ids[2], "spoofed_ipv6", ipv6_before).or_panic();
    eprintln!("receiver's spoofed_ipv6: {ipv6_before} -> {ipv6_after}");

    // An 802.1Q-tagged frame would carry its inner packet past the checks: the tag is refused.
    let tagged_before = before("vlan_tagged");
    let _ = in_ns(
        attacker,
        "arping",
        &[
            "-V",
            "5",
            "-i",
            "shoal0",
            "-c",
            "3",
            "-w",
            "3",
            &receiver_ip.to_string(),
        ],
    );
    drops_rise(&fleet, &ids[2], "vlan_tagged", tagged_before).or_panic();

    // Genuine traffic between all three kept flowing, and still does.
    for (from, to) in [(0, 2), (1, 2), (2, 1)] {
        ping(&ns[from], addrs[to]).or_panic();
    }
    assert!(
        neighbour_of_victim().contains(&victim_mac),
        "the receiver still reaches the victim at its own MAC"
    );
}

/// Sends `len` bytes of a fixed pseudo-random stream over TCP from agent `from` to `to_addr`
/// (a listener in agent `to`'s namespace) and checks that the receiver got exactly those bytes.
fn bulk_tcp(fleet: &Fleet, from: usize, to: usize, to_addr: Ipv4Addr, len: usize) -> Result<()> {
    use sha2::{Digest, Sha256};
    let server_host = fleet.agents()[to].hostname.clone();
    let client_host = fleet.agents()[from].hostname.clone();
    let listener = fleet
        .topology()
        .host(&server_host)?
        .netns()
        .enter(|| TcpListener::bind((to_addr, 0)))??;
    let port = listener.local_addr()?.port();
    let server = std::thread::spawn(move || -> Result<(usize, Vec<u8>)> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let (mut n, mut hash, mut buf) = (0, Sha256::new(), vec![0u8; 1 << 16]);
        loop {
            let got = s.read(&mut buf).context("bulk receive")?;
            if got == 0 {
                return Ok((n, hash.finalize().to_vec()));
            }
            hash.update(&buf[..got]);
            n += got;
        }
    });
    let mut s = fleet.topology().host(&client_host)?.netns().enter(|| {
        TcpStream::connect_timeout(&SocketAddr::from((to_addr, port)), Duration::from_secs(5))
    })??;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let (mut hash, mut rng, mut chunk) = (
        Sha256::new(),
        <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x9e37_79b9_7f4a_7c15),
        vec![0; 1 << 16],
    );
    let mut left = len;
    while left > 0 {
        rand::RngCore::fill_bytes(&mut rng, &mut chunk);
        // Odd-sized writes, so segments do not line up with the MSS.
        let n = left.min(chunk.len() - (left % 977));
        s.write_all(&chunk[..n]).context("bulk send")?;
        hash.update(&chunk[..n]);
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let (got, digest) = server
        .join()
        .map_err(|_| anyhow::anyhow!("bulk receiver panicked"))??;
    ensure!(got == len, "received {got} of {len} bytes");
    ensure!(
        digest == hash.finalize().to_vec(),
        "received bytes differ from those sent"
    );
    Ok(())
}

/// TAP offloads (TSO super-frames split before the wire, received TCP segments coalesced into
/// super-frames for the kernel) keep every byte intact, and a node with offloads and one without
/// (`--overlay-no-offload`) interoperate: the wire carries plain frames either way.
#[test]
fn bulk_tcp_is_intact_between_an_agent_with_tap_offloads_and_one_without() {
    require_host_tests!();
    let mut fleet = Fleet::start(FleetConfig {
        wait_up: false,
        ..FleetConfig::fast().agents(0)
    })
    .or_panic();
    let token = fleet
        .create_token(&["--ttl", "1h", "--uses", "2"])
        .or_panic();
    fleet.add_agent(&token).or_panic();
    fleet
        .config_mut()
        .agent_args
        .push("--overlay-no-offload".into());
    fleet.add_agent(&token).or_panic();
    fleet.wait_all_up(Duration::from_secs(60)).or_panic();
    let addrs = tap_addrs(&fleet).or_panic();
    eventually(Duration::from_secs(20), "a pings b", || {
        ping(&fleet.agents()[0].netns, addrs[1])
    })
    .or_panic();
    let offload_of = |i: usize| {
        let log = fleet.agents()[i].proc.log();
        log.lines()
            .find(|l| l.contains("TAP device up"))
            .map(|l| l.contains("offload=true"))
    };
    assert_eq!(
        offload_of(0),
        Some(true),
        "agent 1 runs its TAP with offloads"
    );
    assert_eq!(offload_of(1), Some(false), "agent 2 runs its TAP without");
    for (from, to) in [(0, 1), (1, 0)] {
        bulk_tcp(&fleet, from, to, addrs[to], 48 << 20)
            .with_context(|| format!("agent {} to agent {}", from + 1, to + 1))
            .or_panic();
    }
    // The operator sees which path each node runs (protocol 9 datapath reports): offloads and
    // super-frame reads on agent 1, plain frames and why on agent 2.
    let (with, without) = (fleet.node_id(0).or_panic(), fleet.node_id(1).or_panic());
    let (a, b) = eventually(
        Duration::from_secs(30),
        "both agents report their datapath after the bulk transfer",
        || {
            let all = fleet.ctl_json(&["overlay", "counters"])?;
            let tap = |node: &str| -> Result<Value> {
                let c = all
                    .as_array()
                    .and_then(|a| a.iter().find(|c| c["node"] == node))
                    .with_context(|| format!("no counters from {node} yet: {all}"))?;
                let t = &c["datapath"]["taps"][0];
                ensure!(
                    t["reads"].as_u64().unwrap_or(0) > 100,
                    "{node}: no report of the bulk transfer yet: {c}"
                );
                Ok(t.clone())
            };
            Ok((tap(&with)?, tap(&without)?))
        },
    )
    .or_panic();
    assert_eq!(a["device"], "shoal0");
    assert_eq!(a["offloads"][1], "tso4", "{a}");
    assert!(a["fallback"].is_null(), "{a}");
    assert_eq!(a["queues"], 1);
    let per_read = a["frames_per_read"].as_f64().unwrap_or(0.0);
    assert!(per_read > 1.5, "TSO reads carry several frames: {a}");
    assert_eq!(b["offloads"], serde_json::json!([]), "{b}");
    assert_eq!(b["fallback"], "disabled", "{b}");
    assert_eq!(b["frames_per_read"].as_f64(), Some(1.0), "{b}");
    assert_eq!(b["frames_per_write"].as_f64(), Some(1.0), "{b}");
    let table = fleet
        .ctl_ok(&["overlay", "counters", "-o", "wide"])
        .or_panic();
    let row = |node: &str| {
        table
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap_or_else(|| panic!("no row for {node}: {table}"))
            .to_owned()
    };
    assert!(
        table.contains("OFFLOAD") && table.contains("FRAMES/READ"),
        "{table}"
    );
    assert!(row(&with).contains("shoal0:csum,tso4,tso6"), "{table}");
    assert!(row(&without).contains("shoal0:off(disabled)"), "{table}");
    assert!(row(&without).contains("shoal0:1.0"), "{table}");
}

/// The relay's per-pair budget (`shoal-controller --relay-pair-mbit`) holds a relayed pair to its
/// rate, so one pair pushing as fast as it can cannot take the relay from the sender's other
/// pairs, and the operator sees the drops in `GET /v1/refusals`. Three agents on one LAN with
/// direct UDP between them blocked, so every pair is relayed; agent 1 sends bulk TCP to agent 2
/// while it pings agent 3. Unicast to a known MAC goes to that one member over the relay too: the
/// bulk transfer's frames are forwarded, not flooded.
#[test]
fn a_relayed_pair_is_held_to_its_budget_and_the_senders_other_pair_keeps_its_service() {
    require_host_tests!();
    // Well below what the relay carries even from debug builds, so that the bound is what limits.
    const BUDGET_MBIT: f64 = 4.0;
    const PUSH: Duration = Duration::from_secs(6);
    let fleet = Fleet::start(FleetConfig {
        controller_args: vec!["--relay-pair-mbit".into(), BUDGET_MBIT.to_string()],
        ..FleetConfig::fast().agents(3)
    })
    .or_panic();
    let agents = fleet.agents();
    let ns: Vec<String> = agents.iter().map(|a| a.netns.clone()).collect();
    for (i, a) in agents.iter().enumerate() {
        for (j, b) in agents.iter().enumerate() {
            if i != j {
                let to = b.addr.to_string();
                in_ns(
                    &a.netns,
                    "iptables",
                    &["-w", "-I", "OUTPUT", "-p", "udp", "-d", &to, "-j", "DROP"],
                )
                .or_panic();
            }
        }
    }
    let addrs = tap_addrs(&fleet).or_panic();
    wait_path(&fleet, 0, 1, "relay", PATH_TIMEOUT).or_panic();
    wait_path(&fleet, 0, 2, "relay", PATH_TIMEOUT).or_panic();
    for to in [1, 2] {
        eventually(
            Duration::from_secs(20),
            &format!("agent 1 pings agent {} through the relay", to + 1),
            || ping(&ns[0], addrs[to]),
        )
        .or_panic();
    }
    let refused = || -> Result<u64> {
        let v = fleet.api_json("/v1/refusals")?;
        v["overlay"]["relay_pair_rate_limited"]
            .as_u64()
            .with_context(|| format!("no overlay.relay_pair_rate_limited: {v}"))
    };
    let sender = fleet.node_id(0).or_panic();
    let frames = |field: &str| -> Result<u64> {
        let all = fleet.ctl_json(&["overlay", "counters"])?;
        all.as_array()
            .and_then(|a| a.iter().find(|c| c["node"] == sender.as_str()))
            .and_then(|c| c[field].as_u64())
            .with_context(|| format!("no {field} counter from {sender} yet: {all}"))
    };
    let refused_before = refused().or_panic();
    let (forwarded_before, flooded_before) =
        eventually(Duration::from_secs(30), "agent 1's first counters", || {
            Ok((frames("forwarded")?, frames("flooded")?))
        })
        .or_panic();

    // Agent 3 answers 20 pings from agent 1 sent while agent 1 pushes to agent 2.
    let pinger = {
        let (ns, to) = (ns[0].clone(), addrs[2].to_string());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            run_in(
                &ns,
                "ping",
                &["-c", "20", "-i", "0.2", "-W", "2", "-q", &to],
                Duration::from_secs(30),
            )
        })
    };
    let (bytes, took) = push_tcp(&fleet, 0, 1, addrs[1], PUSH).or_panic();
    let pings = pinger
        .join()
        .expect("the pinger thread")
        .unwrap_or_else(|e| format!("{e:#}"));
    let mbit = bytes as f64 * 8.0 / took.as_secs_f64() / 1e6;
    eprintln!(
        "relayed pair with a {BUDGET_MBIT} Mbit/s budget: {bytes} bytes in {took:?} = {mbit:.2} Mbit/s; agent 1 -> 3 meanwhile: {}",
        pings.lines().rev().take(2).collect::<Vec<_>>().join(" | ")
    );
    // The bucket starts full (a quarter second of burst), and the receiver counts until the
    // sender's last buffered bytes arrive: a quarter over the rate is the margin.
    assert!(
        mbit <= BUDGET_MBIT * 1.25,
        "the pair got {mbit:.2} Mbit/s through the relay, over its {BUDGET_MBIT} Mbit/s budget"
    );
    assert!(
        mbit >= BUDGET_MBIT * 0.25,
        "the pair got only {mbit:.2} Mbit/s of its {BUDGET_MBIT} Mbit/s budget"
    );
    let lost: f64 = pings
        .split(',')
        .find(|p| p.contains("packet loss"))
        .and_then(|p| p.trim().split('%').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(100.0);
    assert!(
        lost <= 5.0,
        "agent 1's other relayed pair lost {lost}% of its pings while the first pushed: {pings}"
    );
    let refused_after = refused().or_panic();
    assert!(
        refused_after > refused_before,
        "/v1/refusals counts no relay_pair_rate_limited drops ({refused_before} before)"
    );
    // Known unicast over the relay: thousands of frames forwarded to agent 2, a handful flooded
    // (ARP, neighbour discovery).
    let (forwarded, flooded) = eventually(
        Duration::from_secs(30),
        "agent 1 reports the bulk transfer's frames",
        || {
            let forwarded = frames("forwarded")? - forwarded_before;
            ensure!(forwarded >= 1000, "{forwarded} frames forwarded so far");
            Ok((forwarded, frames("flooded")? - flooded_before))
        },
    )
    .or_panic();
    assert!(
        flooded < 50,
        "{flooded} frames flooded next to {forwarded} forwarded: unicast to a known MAC was flooded"
    );
    // The controller's own service: the admin API answers under relay load.
    fleet.ctl_ok(&["nodes", "list"]).or_panic();
}

/// Bulk TCP from agent `from` to `to_addr` (agent `to`) as fast as it goes for `push`: the bytes
/// agent `to` received and the time from the first byte sent to the last received.
fn push_tcp(
    fleet: &Fleet,
    from: usize,
    to: usize,
    to_addr: Ipv4Addr,
    push: Duration,
) -> Result<(u64, Duration)> {
    let server_host = fleet.agents()[to].hostname.clone();
    let client_host = fleet.agents()[from].hostname.clone();
    let listener = fleet
        .topology()
        .host(&server_host)?
        .netns()
        .enter(|| TcpListener::bind((to_addr, 0)))??;
    let port = listener.local_addr()?.port();
    let server = std::thread::spawn(move || -> Result<(u64, Instant)> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let (mut n, mut buf) = (0u64, vec![0u8; 1 << 16]);
        loop {
            let got = s.read(&mut buf).context("bulk receive")?;
            if got == 0 {
                return Ok((n, Instant::now()));
            }
            n += got as u64;
        }
    });
    let mut s = fleet.topology().host(&client_host)?.netns().enter(|| {
        TcpStream::connect_timeout(&SocketAddr::from((to_addr, port)), Duration::from_secs(5))
    })??;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let chunk = vec![0x5au8; 16 << 10];
    let start = Instant::now();
    while start.elapsed() < push {
        s.write_all(&chunk).context("bulk send")?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let (got, end) = server
        .join()
        .map_err(|_| anyhow::anyhow!("bulk receiver panicked"))??;
    Ok((got, end - start))
}
