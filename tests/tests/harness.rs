//! Host tests of the harness itself (no shoal binaries needed): namespaces, LANs, cutting hosts off,
//! processes inside namespaces, and teardown.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use shoal_tests::netns::{list_namespaces, namespace_pids};
use shoal_tests::{eventually, require_host_tests, OrPanic, ProcSpec, Topology};

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
    // The process was SIGKILLed by the teardown; it is our (unreaped) child, so it is a zombie at most.
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
