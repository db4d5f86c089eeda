//! TAP-device crates compared by measurement: `tun-rs` (its tokio API, which shoal uses, and its
//! sync API) against `tun-tap` (a sync wrapper).
//!
//! Run as root: `cargo bench -p shoal-overlay --bench tap_crates` (env `TAPBENCH_SECS`, default 3,
//! is the length of each case). Everything happens inside a fresh network namespace
//! `shl-<pid>-tapbench` that the process enters on its main thread before it starts any other
//! thread, and deletes at the end (the host-test harness sweeps one left behind by a killed run).
//! Without root it prints why and exits 0, or fails where host tests are required
//! (`SHOAL_REQUIRE_HOST_TESTS` or `CI`: shoal-testkit's skip rule).
//!
//! Per crate, one TAP device `tapb0` (L2, no packet information, MAC 02:00:00:00:00:01, MTU 1500,
//! 10.99.0.1/24, up), a permanent neighbour entry 10.99.0.2 → 02:00:00:00:00:02 (so the kernel
//! never ARPs), and IPv6 off (no stray router solicitations). Then:
//!
//! - **read**: a blaster thread sends UDP datagrams to 10.99.0.2:9000 from a socket as fast as the
//!   kernel takes them; the kernel routes them into the TAP; the crate's reader counts the Ethernet
//!   frames it receives (only IPv4/UDP to port 9000 count). The TAP's queue drops what the reader
//!   does not keep up with, so frames/s is the reader's throughput.
//! - **write**: the crate writes one prebuilt Ethernet/IPv4/UDP frame (valid IPv4 and UDP
//!   checksums) from 10.99.0.2:9002 to 10.99.0.1:9001 over and over; a UDP socket bound on
//!   10.99.0.1:9001 counts what the kernel delivers.
//!
//! CPU is `getrusage(RUSAGE_THREAD)` of the crate's thread (the tokio runtime is current-thread on
//! that thread, so it covers the runtime too) and `getrusage(RUSAGE_SELF)` of the process (which
//! also includes the blaster or the counting receiver). On the write path the crate's thread is
//! charged for the kernel's whole receive path (tun → IP → UDP → socket queue), which runs in the
//! writer's system call.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::socket::{setsockopt, sockopt};
use shoal_testkit::{cmd, skip};

const TAP: &str = "tapb0";
const TAP_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const PEER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const TAP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const BLAST_PORT: u16 = 9000;
const SINK_PORT: u16 = 9001;
const WRITER_SRC_PORT: u16 = 9002;
const PAYLOADS: [usize; 2] = [1400, 64];
/// Ethernet + IPv4 + UDP headers.
const HEADERS: usize = 14 + 20 + 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    RsAsync,
    RsSync,
    Tap,
}

impl Api {
    fn label(self) -> &'static str {
        match self {
            Api::RsAsync => "tun-rs 2.8 async (tokio)",
            Api::RsSync => "tun-rs 2.8 sync",
            Api::Tap => "tun-tap 0.1 (sync)",
        }
    }
}

/// An open TAP device of one of the crates.
enum Dev {
    /// The device is registered with this (current-thread) runtime's reactor, so it is driven by
    /// it.
    RsAsync(tun_rs::AsyncDevice, tokio::runtime::Runtime),
    RsSync(tun_rs::SyncDevice),
    Tap(tun_tap::Iface),
}

#[derive(Debug, Clone, Copy)]
enum Path {
    Read,
    Write,
}

#[derive(Debug)]
struct Sample {
    api: Api,
    path: Path,
    payload: usize,
    secs: f64,
    /// Frames the crate read (read path) or wrote (write path).
    frames: u64,
    /// Write path: datagrams the kernel delivered to the sink socket. Read path: datagrams the
    /// blaster sent.
    other_side: u64,
    thread_cpu: f64,
    process_cpu: f64,
}

fn cpu_secs(who: UsageWho) -> f64 {
    match getrusage(who) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => f64::NAN,
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    cmd::run(Command::new(program).args(args))
        .map(drop)
        .map_err(|e| format!("{e:#}"))
}

/// The namespace the benchmark runs in; deleted on drop.
struct Namespace(String);

impl Namespace {
    fn create_and_enter() -> Result<Namespace, String> {
        let name = format!("shl-{}-tapbench", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = Namespace(name);
        let file = File::open(format!("/run/netns/{}", ns.0)).map_err(|e| e.to_string())?;
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))?;
        run("ip", &["link", "set", "lo", "up"])?;
        // /proc/sys/net is per namespace: this turns IPv6 off only in ours.
        for f in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
        }
        Ok(ns)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "delete", &self.0]);
    }
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn open(api: Api) -> Result<Dev, String> {
    let dev = match api {
        Api::RsAsync | Api::RsSync => {
            let builder = tun_rs::DeviceBuilder::new()
                .name(TAP)
                .layer(tun_rs::Layer::L2)
                .mac_addr(TAP_MAC)
                .mtu(1500)
                .ipv4(TAP_ADDR, 24u8, None);
            if api == Api::RsAsync {
                let rt = current_thread_runtime();
                let dev = {
                    let _guard = rt.enter();
                    builder.build_async().map_err(|e| format!("tun-rs: {e}"))?
                };
                Dev::RsAsync(dev, rt)
            } else {
                Dev::RsSync(builder.build_sync().map_err(|e| format!("tun-rs: {e}"))?)
            }
        }
        Api::Tap => {
            let iface = tun_tap::Iface::without_packet_info(TAP, tun_tap::Mode::Tap)
                .map_err(|e| format!("tun-tap: {e}"))?;
            let mac = mac_str(TAP_MAC);
            run(
                "ip",
                &["link", "set", "dev", TAP, "address", &mac, "mtu", "1500"],
            )?;
            run("ip", &["addr", "add", "10.99.0.1/24", "dev", TAP])?;
            run("ip", &["link", "set", "dev", TAP, "up"])?;
            Dev::Tap(iface)
        }
    };
    let peer = PEER_ADDR.to_string();
    let mac = mac_str(PEER_MAC);
    run(
        "ip",
        &[
            "neigh",
            "replace",
            &peer,
            "lladdr",
            &mac,
            "dev",
            TAP,
            "nud",
            "permanent",
        ],
    )?;
    Ok(dev)
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in chunks {
        let mut it = chunk.chunks_exact(2);
        for w in &mut it {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [b] = it.remainder() {
            sum += u32::from(*b) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4/UDP frame from the fake peer 10.99.0.2:9002 to 10.99.0.1:9001, checksums filled
/// in.
fn build_frame(payload: usize) -> Vec<u8> {
    let udp_len = 8 + payload;
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&TAP_MAC);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&PEER_ADDR.octets());
    ip[16..20].copy_from_slice(&TAP_ADDR.octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let data: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    let mut udp = [0u8; 8];
    udp[0..2].copy_from_slice(&WRITER_SRC_PORT.to_be_bytes());
    udp[2..4].copy_from_slice(&SINK_PORT.to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&PEER_ADDR.octets());
    pseudo[4..8].copy_from_slice(&TAP_ADDR.octets());
    pseudo[9] = 17;
    pseudo[10..12].copy_from_slice(&(udp_len as u16).to_be_bytes());
    let c = match checksum(&[&pseudo, &udp, &data]) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&udp);
    f.extend_from_slice(&data);
    f
}

/// Whether `frame` is one of the blaster's: IPv4, UDP, destination port 9000.
fn is_blast(frame: &[u8]) -> bool {
    frame.len() >= HEADERS
        && frame[12..14] == [0x08, 0x00]
        && frame[23] == 17
        && frame[36..38] == BLAST_PORT.to_be_bytes()
}

/// Counts frames until `secs` elapsed; `recv` is the crate's blocking read. Returns (frames,
/// bytes).
fn read_loop_sync(secs: f64, mut recv: impl FnMut(&mut [u8]) -> io::Result<usize>) -> (u64, u64) {
    let mut buf = vec![0u8; 2048];
    let (mut frames, mut bytes) = (0u64, 0u64);
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    loop {
        match recv(&mut buf) {
            Ok(n) if is_blast(&buf[..n]) => {
                frames += 1;
                bytes += n as u64;
            }
            Ok(_) => {}
            Err(e) => panic!("read: {e}"),
        }
        if frames & 63 == 0 && start.elapsed() >= limit {
            return (frames, bytes);
        }
    }
}

fn write_loop_sync(
    secs: f64,
    frame: &[u8],
    mut send: impl FnMut(&[u8]) -> io::Result<usize>,
) -> u64 {
    let mut frames = 0u64;
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    loop {
        for _ in 0..64 {
            match send(frame) {
                Ok(_) => frames += 1,
                Err(e) => panic!("write: {e}"),
            }
        }
        if start.elapsed() >= limit {
            return frames;
        }
    }
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs the crate side of one case on a thread of its own; returns (frames, thread CPU seconds).
fn crate_side(
    dev: Arc<Dev>,
    path: Path,
    payload: usize,
    secs: f64,
) -> thread::JoinHandle<(u64, f64)> {
    thread::spawn(move || {
        let frame = build_frame(payload);
        let cpu0 = cpu_secs(UsageWho::RUSAGE_THREAD);
        let frames = match (&*dev, path) {
            (Dev::RsSync(d), Path::Read) => read_loop_sync(secs, |b| d.recv(b)).0,
            (Dev::Tap(d), Path::Read) => read_loop_sync(secs, |b| d.recv(b)).0,
            (Dev::RsSync(d), Path::Write) => write_loop_sync(secs, &frame, |b| d.send(b)),
            (Dev::Tap(d), Path::Write) => write_loop_sync(secs, &frame, |b| d.send(b)),
            (Dev::RsAsync(d, rt), Path::Read) => rt.block_on(async {
                let mut buf = vec![0u8; 2048];
                let mut frames = 0u64;
                let start = Instant::now();
                let limit = Duration::from_secs_f64(secs);
                loop {
                    let n = d.recv(&mut buf).await.expect("async read");
                    if is_blast(&buf[..n]) {
                        frames += 1;
                    }
                    if frames & 63 == 0 && start.elapsed() >= limit {
                        return frames;
                    }
                }
            }),
            (Dev::RsAsync(d, rt), Path::Write) => rt.block_on(async {
                let mut frames = 0u64;
                let start = Instant::now();
                let limit = Duration::from_secs_f64(secs);
                loop {
                    for _ in 0..64 {
                        d.send(&frame).await.expect("async write");
                        frames += 1;
                    }
                    if start.elapsed() >= limit {
                        return frames;
                    }
                }
            }),
        };
        (frames, cpu_secs(UsageWho::RUSAGE_THREAD) - cpu0)
    })
}

fn big_buffers(sock: &UdpSocket) {
    let _ = setsockopt(sock, sockopt::RcvBuf, &(8 << 20));
    let _ = setsockopt(sock, sockopt::SndBuf, &(8 << 20));
}

fn run_case(dev: &Arc<Dev>, api: Api, path: Path, payload: usize, secs: f64) -> Sample {
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    // The kernel side: a blaster (read path) or a counting sink (write path).
    let kernel_side = {
        let stop = stop.clone();
        let counter = counter.clone();
        match path {
            Path::Read => {
                let sock = UdpSocket::bind((TAP_ADDR, 0)).expect("bind blaster");
                big_buffers(&sock);
                sock.connect(SocketAddr::from((PEER_ADDR, BLAST_PORT)))
                    .expect("connect blaster");
                thread::spawn(move || {
                    let data = vec![0x5au8; payload];
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..32 {
                            if sock.send(&data).is_ok() {
                                n += 1;
                            }
                        }
                    }
                    counter.store(n, Ordering::Relaxed);
                })
            }
            Path::Write => {
                let sock = UdpSocket::bind((TAP_ADDR, SINK_PORT)).expect("bind sink");
                big_buffers(&sock);
                sock.set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("timeout");
                thread::spawn(move || {
                    let mut buf = vec![0u8; 2048];
                    let mut n = 0u64;
                    loop {
                        match sock.recv(&mut buf) {
                            Ok(_) => n += 1,
                            // Timed out: done once the writer stopped and the queue is drained.
                            Err(_) if stop.load(Ordering::Relaxed) => break,
                            Err(_) => {}
                        }
                    }
                    counter.store(n, Ordering::Relaxed);
                })
            }
        }
    };
    // A stuck reader would block forever: a watchdog ends the process instead.
    let done = Arc::new(AtomicBool::new(false));
    {
        let done = done.clone();
        let deadline = Duration::from_secs_f64(secs) + Duration::from_secs(20);
        thread::spawn(move || {
            let start = Instant::now();
            while !done.load(Ordering::Relaxed) {
                if start.elapsed() > deadline {
                    eprintln!(
                        "tap_crates: {} {path:?} {payload} B is stuck; giving up",
                        api.label()
                    );
                    let _ = run(
                        "ip",
                        &[
                            "netns",
                            "delete",
                            &format!("shl-{}-tapbench", std::process::id()),
                        ],
                    );
                    std::process::exit(1);
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
    }
    let proc0 = cpu_secs(UsageWho::RUSAGE_SELF);
    let start = Instant::now();
    let (frames, thread_cpu) = crate_side(dev.clone(), path, payload, secs)
        .join()
        .expect("crate thread panicked");
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    kernel_side.join().expect("kernel-side thread panicked");
    done.store(true, Ordering::Relaxed);
    let process_cpu = cpu_secs(UsageWho::RUSAGE_SELF) - proc0;
    Sample {
        api,
        path,
        payload,
        secs: elapsed,
        frames,
        other_side: counter.load(Ordering::Relaxed),
        thread_cpu,
        process_cpu,
    }
}

fn print_table(samples: &[Sample]) {
    println!();
    println!("| crate / API | path | UDP payload | frame B | frames/s | MB/s (frames) | other side/s | thread CPU s per Mframe | thread CPU s per Gbit | process CPU s per Mframe |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for s in samples {
        let frame_len = (HEADERS + s.payload) as f64;
        let fps = s.frames as f64 / s.secs;
        let mbps = fps * frame_len / 1e6;
        let gbit = s.frames as f64 * frame_len * 8.0 / 1e9;
        let mframes = s.frames as f64 / 1e6;
        let other = match s.path {
            Path::Read => format!("{:.0} sent", s.other_side as f64 / s.secs),
            Path::Write => format!("{:.0} delivered", s.other_side as f64 / s.secs),
        };
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.1} | {} | {:.2} | {:.3} | {:.2} |",
            s.api.label(),
            match s.path {
                Path::Read => "read (kernel → crate)",
                Path::Write => "write (crate → kernel)",
            },
            s.payload,
            frame_len,
            fps,
            mbps,
            other,
            s.thread_cpu / mframes,
            s.thread_cpu / gbit,
            s.process_cpu / mframes,
        );
    }
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing special but must not
    // take long.
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    // It creates a network namespace and TAP devices.
    if let Err(missing) = skip::root() {
        skip::skip("tap_crates", &missing);
        return ExitCode::SUCCESS;
    }
    let secs: f64 = std::env::var("TAPBENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let ns = match Namespace::create_and_enter() {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("tap_crates: cannot set up the namespace: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("tap_crates: namespace {}, {secs} s per case", ns.0);
    let mut samples = Vec::new();
    for api in [Api::RsAsync, Api::RsSync, Api::Tap] {
        let dev = match open(api) {
            Ok(d) => Arc::new(d),
            Err(e) => {
                eprintln!("tap_crates: {}: {e}", api.label());
                return ExitCode::FAILURE;
            }
        };
        for path in [Path::Read, Path::Write] {
            for payload in PAYLOADS {
                let s = run_case(&dev, api, path, payload, secs);
                eprintln!("  {s:?}");
                samples.push(s);
            }
        }
        drop(dev);
        // The device goes away with its last descriptor; wait so the next crate can take the name.
        let t = Instant::now();
        // (`/sys/class/net` shows the namespace sysfs was mounted in, not ours: ask `ip`.)
        while run("ip", &["link", "show", "dev", TAP]).is_ok()
            && t.elapsed() < Duration::from_secs(5)
        {
            thread::sleep(Duration::from_millis(20));
        }
    }
    print_table(&samples);
    drop(ns);
    ExitCode::SUCCESS
}
