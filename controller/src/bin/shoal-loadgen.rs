//! `shoal-loadgen`: simulates N agents against a running controller over real QUIC + TLS sessions.
//!
//! 1. Creates one join token with `--uses N` through the admin API.
//! 2. Enrols N simulated agents (P-256 key, CSR, pinned-CA TLS, Hello + Enrol, waits for Enrolled).
//! 3. Reconnects all N with mutual TLS (their fresh node certificates), sends Hello and a small inventory.
//! 4. Holds: every agent sends Health every `--heartbeat` for `--hold`.
//!
//! Connections share `--endpoints` quinn client endpoints (one UDP socket each). The controller is
//! measured from the outside only: with `--controller-pid`, /proc/PID/stat (utime+stime) and
//! /proc/PID/status (VmRSS, VmHWM) are sampled at the start and end of the hold window.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context};
use clap::Parser;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use shoal_controller::{
    admin::{AdminClient, AdminConf},
    view::CreateToken,
};
use shoal_overlay::{pki, recv_msg, send_msg, tls};
use shoal_proto::{
    AgentMsg, BlockDevice, BootMode, ControllerMsg, Dmi, EnrolRequest, FilesystemUsage, HardwareId, HardwareIdSource,
    HealthReport, Hello, Inventory, JoinToken, LoadAverage, NetInterface, UnixMillis, SUPPORTED,
};
use tokio::sync::{watch, Semaphore};

#[derive(Debug, Parser)]
#[command(name = "shoal-loadgen", about = "Simulate N shoal agents against a running controller")]
struct Cli {
    /// Controller QUIC address.
    #[arg(long)]
    controller: SocketAddr,
    /// Admin credentials (DATA_DIR/admin.conf), to create the join token.
    #[arg(long)]
    admin_conf: PathBuf,
    /// Number of simulated agents.
    #[arg(long)]
    agents: usize,
    /// Enrolments (and later mTLS connects) in flight at once; default: all at once.
    #[arg(long)]
    enrol_concurrency: Option<usize>,
    /// How long to hold all sessions open, heartbeating.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Health report interval per agent.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// QUIC keep-alive per connection (the real agent uses 5 s).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    keep_alive: Duration,
    /// Client UDP endpoints to spread connections over; default: ceil(N / 500).
    #[arg(long)]
    endpoints: Option<usize>,
    /// Controller process id, sampled through /proc at the start and end of the hold.
    #[arg(long)]
    controller_pid: Option<u32>,
    /// Worker threads of the loadgen runtime (default: tokio's default, one per CPU).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(t) = cli.threads {
        rt.worker_threads(t);
    }
    let result = rt.build().context("tokio runtime").and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn now_ms() -> UnixMillis {
    UnixMillis(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0))
}

fn create_token(conf: &AdminConf, uses: u32) -> anyhow::Result<String> {
    let req = CreateToken { ttl_secs: Some(24 * 3600), max_uses: Some(uses), labels: Default::default() };
    Ok(AdminClient::new(conf)?.create_token(&req).context("token create")?.token)
}

fn inventory(i: usize) -> Inventory {
    Inventory {
        hostname: format!("loadgen-{i}"),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        kernel: "6.1.0-28-amd64".into(),
        arch: "x86_64".into(),
        cpu_model: "Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz".into(),
        cpu_cores: 8,
        cpu_physical_cores: Some(4),
        memory_bytes: 16 << 30,
        disks: vec![BlockDevice {
            name: "nvme0n1".into(),
            model: Some("Samsung SSD 980 500GB".into()),
            serial: Some(format!("S64DNF0R{i:08}")),
            size_bytes: 500_107_862_016,
            rotational: false,
            removable: false,
        }],
        nics: vec![NetInterface {
            name: "eth0".into(),
            mac: Some(format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", (i >> 24) & 0xff, (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff)),
            permanent_mac: true,
            speed_mbps: Some(1000),
            up: true,
            addresses: vec![format!("10.{}.{}.{}/16", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff), "fe80::1/64".into()],
        }],
        dmi: Dmi { vendor: Some("QEMU".into()), product: Some("Standard PC (Q35 + ICH9, 2009)".into()), serial: None, uuid: None },
        boot_mode: BootMode::Uefi,
    }
}

fn health(uptime: u64) -> HealthReport {
    HealthReport {
        at: now_ms(),
        uptime_secs: uptime,
        load: LoadAverage { one: 0.15, five: 0.10, fifteen: 0.05 },
        cpu_percent: 2.5,
        memory_total_bytes: 16 << 30,
        memory_available_bytes: 12 << 30,
        swap_total_bytes: 0,
        swap_used_bytes: 0,
        memory_pressure_avg10: Some(0.0),
        filesystems: vec![FilesystemUsage {
            mount: "/".into(),
            device: "/dev/nvme0n1p2".into(),
            fs_type: "ext4".into(),
            total_bytes: 490 << 30,
            available_bytes: 300 << 30,
        }],
    }
}

fn hello(i: usize) -> Hello {
    Hello {
        protocol: SUPPORTED,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        hardware_id: HardwareId { source: HardwareIdSource::Override, value: format!("loadgen-{i}") },
    }
}

/// What one enrolment yields.
struct Creds {
    key_der: Vec<u8>,
    cert_der: Vec<u8>,
    ca_der: Vec<u8>,
}

async fn enrol_one(
    i: usize,
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    controller: SocketAddr,
    token: &str,
) -> anyhow::Result<Creds> {
    let key = pki::generate_key()?;
    let csr_der = pki::make_csr(&key)?;
    let conn = endpoint.connect_with(config, controller, tls::controller_server_name())?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send_msg(&mut send, &AgentMsg::Hello(hello(i))).await?;
    match recv_msg::<ControllerMsg>(&mut recv).await? {
        Some(ControllerMsg::Welcome(_)) => {}
        other => bail!("expected Welcome, got {other:?}"),
    }
    let req = EnrolRequest { token: token.to_owned(), csr_der, hostname: format!("loadgen-{i}") };
    send_msg(&mut send, &AgentMsg::Enrol(req)).await?;
    let enrolled = match recv_msg::<ControllerMsg>(&mut recv).await? {
        Some(ControllerMsg::Enrolled(e)) => e,
        other => bail!("expected Enrolled, got {other:?}"),
    };
    conn.close(0u32.into(), b"enrolled");
    Ok(Creds { key_der: key.serialize_der(), cert_der: enrolled.cert_der, ca_der: enrolled.ca_der })
}

#[derive(Default)]
struct Counters {
    heartbeats: AtomicU64,
    session_errors: AtomicU64,
}

/// One enrolled agent's mTLS session; reports `Ok(())` on `ready` once Hello + Inventory are through,
/// then heartbeats until `stop` flips.
/// Where and how often a simulated agent talks.
#[derive(Debug, Clone, Copy)]
struct Timing {
    controller: SocketAddr,
    keep_alive: Duration,
    heartbeat: Duration,
}

async fn node_session(
    i: usize,
    endpoint: quinn::Endpoint,
    creds: Creds,
    Timing { controller, keep_alive, heartbeat }: Timing,
    ready: tokio::sync::mpsc::UnboundedSender<Result<(), String>>,
    mut stop: watch::Receiver<bool>,
    counters: Arc<Counters>,
) {
    let connected = async {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(creds.key_der));
        let config = tls::node_client_config(&creds.ca_der, &creds.cert_der, key, keep_alive)?;
        let conn = endpoint.connect_with(config, controller, tls::controller_server_name())?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send_msg(&mut send, &AgentMsg::Hello(hello(i))).await?;
        match recv_msg::<ControllerMsg>(&mut recv).await? {
            Some(ControllerMsg::Welcome(w)) if w.node_id.is_some() => {}
            other => bail!("expected an authenticated Welcome, got {other:?}"),
        }
        send_msg(&mut send, &AgentMsg::Inventory(inventory(i))).await?;
        anyhow::Ok((conn, send, recv))
    }
    .await;
    let (conn, mut send, mut recv) = match connected {
        Ok(c) => {
            let _ = ready.send(Ok(()));
            c
        }
        Err(e) => {
            let _ = ready.send(Err(format!("{e:#}")));
            return;
        }
    };
    drop(ready);
    // Spread heartbeats evenly over the interval, as real agents started at different times are.
    let offset = heartbeat.mul_f64(rand::random::<f64>());
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut reader = Box::pin(recv_msg::<ControllerMsg>(&mut recv));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let h = health(3600 + started.elapsed().as_secs());
                if let Err(e) = send_msg(&mut send, &AgentMsg::Health(h)).await {
                    counters.session_errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("agent {i}: heartbeat failed: {e}");
                    return;
                }
                counters.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            msg = &mut reader => {
                counters.session_errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("agent {i}: controller ended the session: {msg:?}");
                return;
            }
            _ = stop.changed() => break,
        }
    }
    drop(reader);
    let _ = send.finish();
    conn.close(0u32.into(), b"loadgen done");
}

#[derive(Debug, Clone, Copy)]
struct ProcSample {
    at: Instant,
    cpu_ticks: u64,
    rss_kib: u64,
    hwm_kib: u64,
}

fn clk_tck() -> f64 {
    // Linux reports utime/stime in USER_HZ (sysconf(_SC_CLK_TCK)), which is 100 on every mainstream
    // architecture; `getconf CLK_TCK` confirms it on the measuring machine.
    100.0
}

fn sample(pid: u32) -> anyhow::Result<ProcSample> {
    let at = Instant::now();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15 (1-based).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample { at, cpu_ticks: utime + stime, rss_kib: kib("VmRSS:"), hwm_kib: kib("VmHWM:") })
}

/// A client endpoint on its own UDP socket with large kernel buffers (capped by net.core.rmem_max), so
/// that the loadgen's sockets are not where packets are dropped.
fn client_endpoint(bind: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    use nix::sys::socket::{setsockopt, sockopt};
    let socket = std::net::UdpSocket::bind(bind)?;
    setsockopt(&socket, sockopt::RcvBuf, &(8usize << 20))?;
    setsockopt(&socket, sockopt::SndBuf, &(8usize << 20))?;
    Ok(quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, Arc::new(quinn::TokioRuntime))?)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let n = cli.agents;
    if n == 0 {
        bail!("--agents must be at least 1");
    }
    let conf = AdminConf::read(&cli.admin_conf)?;
    let uses = u32::try_from(n).context("--agents too large")?;
    let token = tokio::task::spawn_blocking(move || create_token(&conf, uses)).await??;
    let parsed: JoinToken = token.parse().context("the controller returned an unparsable token")?;
    let endpoints_n = cli.endpoints.unwrap_or(n.div_ceil(500)).max(1);
    let bind: SocketAddr = if cli.controller.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse()?;
    let endpoints = (0..endpoints_n).map(|_| client_endpoint(bind)).collect::<anyhow::Result<Vec<_>>>()?;
    let concurrency = cli.enrol_concurrency.unwrap_or(n).max(1);
    println!(
        "loadgen: {n} agents -> {} ({endpoints_n} client endpoints, concurrency {concurrency}, heartbeat {:?}, hold {:?})",
        cli.controller, cli.heartbeat, cli.hold
    );

    // Phase 1: enrolment.
    let enrol_config = tls::enrol_client_config(parsed.ca_sha256, cli.keep_alive)?;
    let sem = Arc::new(Semaphore::new(concurrency));
    let token = Arc::new(token);
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (ep, cfg, sem, token, controller) =
            (endpoints[i % endpoints_n].clone(), enrol_config.clone(), sem.clone(), token.clone(), cli.controller);
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let r = tokio::time::timeout(Duration::from_secs(120), enrol_one(i, &ep, cfg, controller, &token)).await;
            let r = r.unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after 120 s")));
            (i, r, t0.elapsed())
        });
    }
    let mut creds: Vec<Option<Creds>> = (0..n).map(|_| None).collect();
    let mut enrol_errors = 0usize;
    let mut last_ok = Duration::ZERO;
    let mut lat: Vec<Duration> = Vec::with_capacity(n);
    let mut shown = 0;
    while let Some(joined) = tasks.join_next().await {
        let (i, r, at) = joined?;
        match r {
            Ok(c) => {
                creds[i] = Some(c);
                last_ok = last_ok.max(at);
                lat.push(at);
            }
            Err(e) => {
                enrol_errors += 1;
                if shown < 10 {
                    shown += 1;
                    eprintln!("agent {i}: enrolment failed: {e:#}");
                }
            }
        }
    }
    lat.sort();
    let pct = |v: &[Duration], p: f64| v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default();
    println!(
        "enrol: {} of {n} enrolled in {:.2} s (first connect to last Enrolled), {enrol_errors} errors; completion p50 {:.2} s, p99 {:.2} s",
        n - enrol_errors,
        last_ok.as_secs_f64(),
        pct(&lat, 0.5).as_secs_f64(),
        pct(&lat, 0.99).as_secs_f64()
    );

    // Phase 2: mutual-TLS sessions.
    let counters = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    let sem = Arc::new(Semaphore::new(concurrency));
    let t1 = Instant::now();
    let mut sessions = tokio::task::JoinSet::new();
    let mut expected = 0usize;
    for (i, c) in creds.into_iter().enumerate() {
        let Some(c) = c else { continue };
        expected += 1;
        let (ep, ready, stop, counters, sem) =
            (endpoints[i % endpoints_n].clone(), ready_tx.clone(), stop_rx.clone(), counters.clone(), sem.clone());
        let timing = Timing { controller: cli.controller, keep_alive: cli.keep_alive, heartbeat: cli.heartbeat };
        sessions.spawn(async move {
            // The permit only bounds connects in flight; it is released once the session is up.
            let permit = sem.acquire_owned().await;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let session = tokio::spawn(node_session(i, ep, c, timing, tx, stop, counters));
            let r = rx.recv().await.unwrap_or_else(|| Err("session task ended".into()));
            drop(permit);
            let _ = ready.send(r);
            let _ = session.await;
        });
    }
    drop(ready_tx);
    let mut connect_errors = 0usize;
    let mut connected = 0usize;
    let mut shown = 0;
    while connected + connect_errors < expected {
        match ready_rx.recv().await {
            Some(Ok(())) => connected += 1,
            Some(Err(e)) => {
                connect_errors += 1;
                if shown < 10 {
                    shown += 1;
                    eprintln!("mTLS connect failed: {e}");
                }
            }
            None => break,
        }
    }
    println!(
        "connect: {connected} of {expected} connected with mTLS (Hello + Welcome + Inventory) in {:.2} s, {connect_errors} errors",
        t1.elapsed().as_secs_f64()
    );

    // Phase 3: hold.
    let start = cli.controller_pid.map(sample).transpose()?;
    let hb0 = counters.heartbeats.load(Ordering::Relaxed);
    let hold_start = Instant::now();
    let mut max_rss = start.map(|s| s.rss_kib).unwrap_or(0);
    while hold_start.elapsed() < cli.hold {
        tokio::time::sleep(Duration::from_secs(1).min(cli.hold.saturating_sub(hold_start.elapsed()))).await;
        if let Some(pid) = cli.controller_pid {
            if let Ok(s) = sample(pid) {
                max_rss = max_rss.max(s.rss_kib);
            }
        }
    }
    let end = cli.controller_pid.map(sample).transpose()?;
    let hb = counters.heartbeats.load(Ordering::Relaxed) - hb0;
    let held = hold_start.elapsed().as_secs_f64();
    println!(
        "hold: {held:.1} s with {connected} sessions, {hb} heartbeats sent ({:.0}/s), {} sessions lost",
        hb as f64 / held,
        counters.session_errors.load(Ordering::Relaxed)
    );
    if let (Some(a), Some(b)) = (start, end) {
        let cpu_s = (b.cpu_ticks - a.cpu_ticks) as f64 / clk_tck();
        let wall = (b.at - a.at).as_secs_f64();
        println!(
            "controller pid {}: CPU {:.2} s over {wall:.1} s = {:.1} % of one core; VmRSS {:.1} MiB at start, {:.1} MiB at end, max sampled {:.1} MiB; VmHWM (peak RSS over its life) {:.1} MiB",
            cli.controller_pid.unwrap_or(0),
            cpu_s,
            cpu_s * 100.0 / wall,
            a.rss_kib as f64 / 1024.0,
            b.rss_kib as f64 / 1024.0,
            max_rss as f64 / 1024.0,
            b.hwm_kib as f64 / 1024.0,
        );
    }
    let _ = stop_tx.send(true);
    while sessions.join_next().await.is_some() {}
    for ep in &endpoints {
        ep.close(0u32.into(), b"loadgen done");
    }
    for ep in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    }
    Ok(())
}
