//! Host tests of the harness itself (no shoal binaries needed): namespaces, LANs, cutting hosts
//! off, processes inside namespaces, teardown, and NAT routers (mapping modes, blocking UDP between
//! two NATs).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use shoal_tests::netns::{list_namespaces, namespace_pids, NatMode};
use shoal_tests::{consistently, eventually, require_host_tests, OrPanic, ProcSpec, Topology};

fn two_hosts() -> Result<Topology> {
    let mut t = Topology::new()?;
    t.add_lan("lan", "10.77.9.0/24")?;
    for h in ["h1", "h2"] {
        t.add_host(h)?;
        t.connect(h, "lan")?;
    }
    Ok(t)
}

/// Connects from `from` to a listener of `to` (a TCP round trip through the bridge).
fn round_trip(t: &Topology, listener: &TcpListener, from: &str, to_addr: SocketAddr) -> Result<()> {
    let stream = t
        .host(from)?
        .netns()
        .enter(|| TcpStream::connect_timeout(&to_addr, Duration::from_millis(500)))??;
    let mut stream = stream;
    stream.write_all(b"ping")?;
    let (mut accepted, peer) = listener.accept()?;
    ensure!(
        peer.ip() == t.host(from)?.addr()?,
        "peer {peer} is not {from}"
    );
    let mut buf = [0u8; 4];
    accepted.read_exact(&mut buf)?;
    ensure!(&buf == b"ping");
    Ok(())
}

#[test]
fn lan_connects_hosts_cut_isolates_and_teardown_leaves_nothing() {
    require_host_tests!();
    let t = two_hosts().or_panic();
    let names = t.namespaces();
    assert_eq!(names.len(), 3, "{names:?}");
    let present = list_namespaces();
    for n in &names {
        assert!(
            n.starts_with("shl-") && present.contains(n),
            "{n} missing from {present:?}"
        );
    }
    let h1 = t.host("h1").or_panic();
    let h2 = t.host("h2").or_panic();
    assert_eq!(h1.addr().or_panic().to_string(), "10.77.9.1");
    assert_eq!(h2.addr().or_panic().to_string(), "10.77.9.2");
    assert_eq!(h1.ifaces()[0].name, "eth0");
    assert_eq!(h1.ifaces()[0].mac.len(), 17, "{}", h1.ifaces()[0].mac);
    assert_ne!(h1.ifaces()[0].mac, h2.ifaces()[0].mac);
    // The root namespace does not have the hosts' addresses.
    let root = shoal_tests::netns::ip(&["-4", "addr"]).or_panic();
    assert!(
        !root.contains("10.77.9."),
        "root namespace got a test address:\n{root}"
    );

    let to = SocketAddr::from((h2.addr().or_panic(), 7000));
    let listener = h2
        .netns()
        .enter(|| TcpListener::bind(to))
        .or_panic()
        .or_panic_io();
    round_trip(&t, &listener, "h1", to)
        .context("h1 -> h2")
        .or_panic();

    // Cut h1 off: h1 can no longer reach h2; restore: it can again.
    t.cut("h1", "lan").or_panic();
    let cut = h1
        .netns()
        .enter(|| TcpStream::connect_timeout(&to, Duration::from_millis(700)))
        .or_panic();
    assert!(cut.is_err(), "h1 reached h2 while cut off");
    t.restore("h1", "lan").or_panic();
    eventually(
        Duration::from_secs(10),
        "h1 to reach h2 again after restore",
        || round_trip(&t, &listener, "h1", to),
    )
    .or_panic();

    // A process left running inside a namespace does not keep it alive past teardown.
    let dir = tempfile::tempdir().or_panic_io();
    let sleeper = ProcSpec::new("sleeper", "sleep", dir.path())
        .netns(h2.ns_name())
        .arg("1000")
        .spawn()
        .or_panic();
    let pid = sleeper.pid().expect("running");
    eventually(
        Duration::from_secs(10),
        "the sleeper to be inside h2",
        || {
            ensure!(namespace_pids(h2.ns_name()).contains(&(pid as i32)));
            Ok(())
        },
    )
    .or_panic();
    std::mem::forget(sleeper); // as if the test had lost track of it
    drop(listener);
    drop(t);
    let left = list_namespaces();
    for n in &names {
        assert!(
            !left.contains(n),
            "{n} still exists after teardown: {left:?}"
        );
    }
    // The process was SIGKILLed by the teardown; it is our (unreaped) child, so it is a zombie at
    // most.
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        state.is_empty() || state.contains(") Z "),
        "sleeper still alive: {state}"
    );
}

#[test]
fn processes_run_inside_their_namespace_with_their_own_hostname() {
    require_host_tests!();
    let t = two_hosts().or_panic();
    let h1 = t.host("h1").or_panic();
    let dir = tempfile::tempdir().or_panic_io();
    let mut p = ProcSpec::new("probe", "sh", dir.path())
        .netns(h1.ns_name())
        .hostname("probe-host")
        .args(["-c", "echo host=$(cat /proc/sys/kernel/hostname); ip -4 -o addr show dev eth0; exec sleep 1000"])
        .spawn()
        .or_panic();
    eventually(Duration::from_secs(10), "the probe's output", || {
        let log = p.log();
        ensure!(log.contains("host=probe-host"), "log so far:\n{log}");
        ensure!(log.contains("10.77.9.1/24"), "log so far:\n{log}");
        Ok(())
    })
    .or_panic();
    // The hostname change stayed inside the probe's UTS namespace.
    let ours = std::fs::read_to_string("/proc/sys/kernel/hostname").or_panic_io();
    assert_ne!(ours.trim(), "probe-host");
    // Signals reach the program itself (not a wrapper): SIGTERM ends `sleep`.
    let pid = p.pid().expect("running");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).or_panic_io();
    assert_eq!(comm.trim(), "sleep");
    let status = p.stop(Duration::from_secs(5)).or_panic();
    assert_eq!(
        shoal_tests::process::describe_status(&status),
        "killed by SIGTERM"
    );
}

trait OrPanicIo<T> {
    fn or_panic_io(self) -> T;
}

impl<T> OrPanicIo<T> for std::io::Result<T> {
    #[track_caller]
    fn or_panic_io(self) -> T {
        self.unwrap_or_else(|e| panic!("{e}"))
    }
}

// ---- NAT routers
// -------------------------------------------------------------------------------------------

/// `wan` (198.51.100.0/24) with `ctl` and `srv` on it, and two NAT routers `nat-a` / `nat-b` (modes
/// as given) with one host each behind them: `a` on 10.1.0.0/24, `b` on 10.2.0.0/24.
fn natted(mode_a: NatMode, mode_b: NatMode) -> Result<Topology> {
    let mut t = Topology::new()?;
    t.add_lan("wan", "198.51.100.0/24")?;
    for h in ["ctl", "srv"] {
        t.add_host(h)?;
        t.connect(h, "wan")?;
    }
    t.add_nat_router("nat-a", "wan", "lan-a", "10.1.0.0/24", mode_a)?;
    t.add_nat_router("nat-b", "wan", "lan-b", "10.2.0.0/24", mode_b)?;
    t.add_host("a")?;
    t.connect("a", "lan-a")?;
    t.add_host("b")?;
    t.connect("b", "lan-b")?;
    Ok(t)
}

/// A UDP socket bound to `addr` (port 0: any) inside `host`, with a short read timeout.
fn udp(t: &Topology, host: &str, addr: SocketAddr) -> Result<UdpSocket> {
    let sock = t.host(host)?.netns().enter(|| UdpSocket::bind(addr))??;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(sock)
}

/// Waits (≤ 200 ms) for `msg` at `at` (skipping leftovers of earlier rounds); returns its source.
fn receive(at: &UdpSocket, msg: &[u8]) -> Result<SocketAddr> {
    let mut buf = [0u8; 64];
    loop {
        let (n, src) = at.recv_from(&mut buf).with_context(|| {
            format!(
                "{:?} did not receive {:?}",
                at.local_addr(),
                String::from_utf8_lossy(msg)
            )
        })?;
        if &buf[..n] == msg {
            return Ok(src);
        }
    }
}

/// Sends `msg` from `from` to `to`, and waits (≤ 200 ms) for it at `at`; returns the source `at`
/// saw.
fn exchange(from: &UdpSocket, to: SocketAddr, at: &UdpSocket, msg: &[u8]) -> Result<SocketAddr> {
    from.send_to(msg, to)?;
    receive(at, msg)
}

/// Where `sock` (inside a NATed host) appears to come from, as seen by `observer` on the WAN.
fn mapped(sock: &UdpSocket, observer: &UdpSocket) -> Result<SocketAddr> {
    let to = observer.local_addr()?;
    eventually(
        Duration::from_secs(10),
        "the observer to see the host",
        || exchange(sock, to, observer, b"who am i"),
    )
}

#[test]
fn hosts_behind_nat_reach_the_wan_from_the_routers_address() {
    require_host_tests!();
    let t = natted(NatMode::EndpointIndependent, NatMode::EndpointIndependent).or_panic();
    let ctl_addr = t.host("ctl").or_panic().addr().or_panic();
    let ctl = udp(&t, "ctl", SocketAddr::from((ctl_addr, 7000))).or_panic();
    for (host, router) in [("a", "nat-a"), ("b", "nat-b")] {
        let r = t.router(router).or_panic();
        assert_eq!(r.mode(), NatMode::EndpointIndependent);
        let private = t.host(host).or_panic().addr().or_panic();
        assert_eq!(private, r.lan().subnet.host(2).or_panic(), "{host}");
        assert_eq!(t.lan(&r.lan().lan).or_panic().gateway(), Some(r.lan().addr));
        let sock = udp(&t, host, SocketAddr::from((private, 0))).or_panic();
        let seen = mapped(&sock, &ctl)
            .with_context(|| format!("{host} -> ctl"))
            .or_panic();
        assert_eq!(
            seen.ip(),
            r.wan_addr(),
            "ctl saw {host} as {seen}, not from {router}'s WAN address"
        );
        // The WAN host cannot reach the private address directly (no route to it).
        let direct = t
            .host("ctl")
            .or_panic()
            .netns()
            .enter(|| {
                TcpStream::connect_timeout(
                    &SocketAddr::from((private, 22)),
                    Duration::from_millis(300),
                )
            })
            .or_panic();
        assert!(direct.is_err(), "ctl reached {host}'s private address");
    }
    // The private addresses never show up outside their LANs: the WAN hosts have no route to them.
    let routes = t
        .host("ctl")
        .or_panic()
        .netns()
        .ip(&["-4", "route"])
        .or_panic();
    assert!(
        !routes.contains("10.1.") && !routes.contains("10.2."),
        "{routes}"
    );
}

#[test]
fn nat_modes_map_ports_independently_or_per_destination() {
    require_host_tests!();
    let t = natted(NatMode::EndpointIndependent, NatMode::EndpointDependent).or_panic();
    let listeners: Vec<UdpSocket> = ["ctl", "srv"]
        .iter()
        .map(|h| udp(&t, h, SocketAddr::from((t.host(h)?.addr()?, 7000))))
        .collect::<Result<_>>()
        .or_panic();
    for (host, router, same) in [("a", "nat-a", true), ("b", "nat-b", false)] {
        let private = t.host(host).or_panic().addr().or_panic();
        let sock = udp(&t, host, SocketAddr::from((private, 0))).or_panic();
        let seen: Vec<SocketAddr> = listeners
            .iter()
            .map(|l| mapped(&sock, l))
            .collect::<Result<_>>()
            .with_context(|| format!("{host} -> WAN listeners"))
            .or_panic();
        let wan = t.router(router).or_panic().wan_addr();
        assert!(seen.iter().all(|s| s.ip() == wan), "{host}: {seen:?}");
        if same {
            assert_eq!(
                seen[0].port(),
                seen[1].port(),
                "{router} (EIM) mapped per destination: {seen:?}"
            );
        } else {
            assert_ne!(
                seen[0].port(),
                seen[1].port(),
                "{router} (EDM) kept one mapping: {seen:?}"
            );
        }
        // A mapping is stable towards one destination.
        assert_eq!(mapped(&sock, &listeners[0]).or_panic(), seen[0]);
    }
}

#[test]
fn endpoint_independent_nats_preserve_or_change_the_port_but_keep_one_mapping() {
    require_host_tests!();
    let t = natted(
        NatMode::EndpointIndependentPortChanging,
        NatMode::EndpointIndependent,
    )
    .or_panic();
    let listeners: Vec<UdpSocket> = ["ctl", "srv"]
        .iter()
        .map(|h| udp(&t, h, SocketAddr::from((t.host(h)?.addr()?, 7000))))
        .collect::<Result<_>>()
        .or_panic();
    for (host, preserving) in [("a", false), ("b", true)] {
        let private = t.host(host).or_panic().addr().or_panic();
        let sock = udp(&t, host, SocketAddr::from((private, 0))).or_panic();
        let local = sock.local_addr().or_panic_io().port();
        let seen: Vec<SocketAddr> = listeners
            .iter()
            .map(|l| mapped(&sock, l))
            .collect::<Result<_>>()
            .or_panic();
        assert_eq!(
            seen[0], seen[1],
            "{host}: one mapping for every destination"
        );
        if preserving {
            assert_eq!(seen[0].port(), local, "{host}: the port is kept");
        } else {
            assert!(
                (20000..=20999).contains(&seen[0].port()) && seen[0].port() != local,
                "{host}: mapped from port {local} to {}",
                seen[0]
            );
        }
    }
}

#[test]
fn udp_between_nats_is_hole_punched_blocked_and_unblocked() {
    require_host_tests!();
    let t = natted(NatMode::EndpointIndependent, NatMode::EndpointIndependent).or_panic();
    let ctl_addr = t.host("ctl").or_panic().addr().or_panic();
    let ctl = udp(&t, "ctl", SocketAddr::from((ctl_addr, 7000))).or_panic();
    let sa = udp(
        &t,
        "a",
        SocketAddr::from((t.host("a").or_panic().addr().or_panic(), 0)),
    )
    .or_panic();
    let sb = udp(
        &t,
        "b",
        SocketAddr::from((t.host("b").or_panic().addr().or_panic(), 0)),
    )
    .or_panic();
    // Each learns its public address from the "controller", as the agents will.
    let ma = mapped(&sa, &ctl).or_panic();
    let mb = mapped(&sb, &ctl).or_panic();
    assert_eq!(ma.ip(), t.router("nat-a").or_panic().wan_addr());
    assert_eq!(mb.ip(), t.router("nat-b").or_panic().wan_addr());

    // One round of hole punching: both send to the other's mapped address, then both listen. (Until
    // both routers have a mapping for the pair, the first packet is dropped by the other router.)
    let punch = |tag: &str| -> (Result<SocketAddr>, Result<SocketAddr>) {
        let (to_b, to_a) = (format!("{tag} a->b"), format!("{tag} b->a"));
        let sent = sa
            .send_to(to_b.as_bytes(), mb)
            .and_then(|_| sb.send_to(to_a.as_bytes(), ma));
        if let Err(e) = sent {
            return (Err(e.into()), Err(anyhow::anyhow!("not sent")));
        }
        (receive(&sb, to_b.as_bytes()), receive(&sa, to_a.as_bytes()))
    };
    let both_ways = |tag: &str| -> Result<()> {
        let (at_b, at_a) = punch(tag);
        let (from_a, from_b) = (at_b?, at_a?);
        ensure!(from_a == ma, "b saw a as {from_a}, expected {ma}");
        ensure!(from_b == mb, "a saw b as {from_b}, expected {mb}");
        Ok(())
    };
    let neither_way = |tag: &str| -> Result<()> {
        let (at_b, at_a) = punch(tag);
        ensure!(at_b.is_err(), "a reached b while blocked");
        ensure!(at_a.is_err(), "b reached a while blocked");
        Ok(())
    };
    let mut round = 0u32;
    let mut next = || {
        round += 1;
        format!("#{round}")
    };
    eventually(
        Duration::from_secs(10),
        "the hole punch to connect a and b",
        || both_ways(&next()),
    )
    .or_panic();

    t.block_udp_between("nat-a", "nat-b").or_panic();
    t.block_udp_between("nat-a", "nat-b").or_panic(); // idempotent
    consistently(
        Duration::from_secs(2),
        "UDP between the NATs to stay blocked",
        || neither_way(&next()),
    )
    .or_panic();
    // Both still reach the controller, from the same mappings.
    assert_eq!(mapped(&sa, &ctl).or_panic(), ma);
    assert_eq!(mapped(&sb, &ctl).or_panic(), mb);

    t.unblock_udp_between("nat-a", "nat-b").or_panic();
    t.unblock_udp_between("nat-b", "nat-a").or_panic(); // idempotent, either order
    eventually(
        Duration::from_secs(10),
        "a and b to talk again after unblocking",
        || both_ways(&next()),
    )
    .or_panic();
}
