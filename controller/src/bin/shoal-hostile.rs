//! `shoal-hostile`: hostile clients against a running controller over real QUIC + TLS, the
//! controller's memory (and data dir) sampled over time, and a good agent measured alongside.
//!
//! One `--mode` per run, with `--clients` attackers for `--duration`, then `--after` more of
//! sampling once they left:
//!
//! | mode | what each client does |
//! |---|---|
//! | `idle` | nothing: the baseline (only the good agent runs) |
//! | `silent` | completes the QUIC/TLS handshake without a certificate and never sends Hello; reconnects when closed |
//! | `trickle` | unauthenticated: announces a 1 MiB frame, then sends `--trickle-bytes` every `--trickle-every`; reconnects when closed |
//! | `trickle-enrolled` | the same from an enrolled node after its Hello (no hello deadline applies) |
//! | `oversize` | an enrolled node sends over-limit messages (inventory, path, drive and health reports), reconnecting after each refusal |
//! | `no-read` | an enrolled node joins the overlay and never reads; one more node changes its endpoints every `--churn-every`, so the controller has a netmap delta for each of them every time |
//! | `events` | an enrolled node flaps a drive (appears, disappears) every `--report-every` |
//! | `serials` | an enrolled node reports 64 drives with new serial numbers and SMART every `--report-every` |
//!
//! The good agent is enrolled like a real one; every `--probe-every` it sends a health report and a
//! certificate renewal and times the renewal's round trip (the controller fully serves a request on
//! its session), and every 5 s it times a fresh connection's handshake + Hello → Welcome.
//!
//! With `--controller-pid`, VmRSS and CPU come from `/proc/PID`; with `--data-dir`, the bytes of
//! the controller's data directory. A line per `--print-every` shows the series; the summary at the
//! end gives start (just before the attack), peak, end of the attack and end of `--after`, and the
//! event log's length by kind (read through the admin API), with what its `events_suppressed`
//! summaries count.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use shoal_api::events::EventView;
use shoal_api::tokens::CreateToken;
use shoal_controller::api::admin::{AdminClient, AdminConf};
use shoal_overlay::{pki, recv_msg, send_msg, tls};
use shoal_proto::{
    limits, AgentMsg, ControllerMsg, Drive, DriveProtocol, DriveReport, DriveState, EnrolRequest,
    FilesystemUsage, HardwareId, HardwareIdSource, HealthReport, Hello, Inventory, JoinToken,
    NatMapping, NetInterface, NodeId, OverlayCounters, OverlayHello, PathInfo, PathKind,
    PathReport, RenewRequest, SmartExitStatus, SmartOutcome, SmartPredictors, SmartReport,
    UnixMillis, MAX_FRAME_LEN, SUPPORTED,
};
use tokio::sync::{watch, Semaphore};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Idle,
    Silent,
    Trickle,
    TrickleEnrolled,
    Oversize,
    NoRead,
    Events,
    Serials,
}

impl Mode {
    fn enrolled(self) -> bool {
        matches!(
            self,
            Mode::TrickleEnrolled | Mode::Oversize | Mode::NoRead | Mode::Events | Mode::Serials
        )
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "shoal-hostile",
    about = "Hostile clients against a running controller, with its memory sampled"
)]
struct Cli {
    /// Controller QUIC address.
    #[arg(long)]
    controller: SocketAddr,
    /// Admin credentials (DATA_DIR/admin.conf), to create the join token.
    #[arg(long)]
    admin_conf: PathBuf,
    /// What the hostile clients do.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Hostile clients.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Local address of the good agent's socket (e.g. 127.0.0.2:0, so it is another machine than
    /// the attackers as far as per-address limits go); default: the attackers' wildcard.
    #[arg(long)]
    good_bind: Option<SocketAddr>,
    /// How long they keep at it.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How long to keep sampling after they stopped.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    after: Duration,
    /// Controller process id: VmRSS and CPU are sampled from /proc.
    #[arg(long)]
    controller_pid: Option<u32>,
    /// The controller's data directory: its size is sampled.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Sampling interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    sample_every: Duration,
    /// Interval of the printed series.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    print_every: Duration,
    /// The good agent's health + renewal interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    probe_every: Duration,
    /// trickle modes: interval between writes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    trickle_every: Duration,
    /// trickle modes: bytes per write.
    #[arg(long, default_value_t = 1)]
    trickle_bytes: usize,
    /// no-read: interval between the churning node's endpoint changes.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    churn_every: Duration,
    /// events, serials: interval between one client's drive reports.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    report_every: Duration,
    /// Enrolments in flight at once (enrolled modes enrol every client before the attack starts).
    #[arg(long, default_value_t = 200)]
    enrol_concurrency: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-hostile: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn now_ms() -> UnixMillis {
    UnixMillis(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

/// Where to connect and how.
#[derive(Clone)]
struct Target {
    controller: SocketAddr,
    enrol: quinn::ClientConfig,
    token: Arc<String>,
    /// Random per run, so hardware ids never claim a previous run's nodes.
    run: u64,
}

/// An enrolled identity.
struct Creds {
    machine: String,
    key_der: Vec<u8>,
    cert_der: Vec<u8>,
    ca_der: Vec<u8>,
}

struct Session {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

fn hello(machine: &str) -> AgentMsg {
    AgentMsg::Hello(Hello {
        protocol: SUPPORTED,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        hardware_id: HardwareId {
            source: HardwareIdSource::Override,
            value: machine.to_owned(),
        },
    })
}

async fn open(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    target: &Target,
    machine: &str,
) -> anyhow::Result<Session> {
    let conn = endpoint
        .connect_with(config, target.controller, tls::controller_server_name())?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send_msg(&mut send, &hello(machine)).await?;
    match recv_msg::<ControllerMsg>(&mut recv).await? {
        Some(ControllerMsg::Welcome(_)) => Ok(Session { conn, send, recv }),
        other => bail!("expected Welcome, got {other:?}"),
    }
}

async fn enrol(
    endpoint: &quinn::Endpoint,
    target: &Target,
    machine: String,
) -> anyhow::Result<Creds> {
    let key = pki::generate_key()?;
    let mut s = open(endpoint, target.enrol.clone(), target, &machine).await?;
    let req = EnrolRequest {
        token: target.token.to_string(),
        csr_der: pki::make_csr(&key)?,
        hostname: machine.clone(),
    };
    send_msg(&mut s.send, &AgentMsg::Enrol(req)).await?;
    let enrolled = match recv_msg::<ControllerMsg>(&mut s.recv).await? {
        Some(ControllerMsg::Enrolled(e)) => e,
        other => bail!("expected Enrolled, got {other:?}"),
    };
    s.conn.close(0u32.into(), b"enrolled");
    Ok(Creds {
        machine,
        key_der: key.serialize_der(),
        cert_der: enrolled.cert_der,
        ca_der: enrolled.ca_der,
    })
}

async fn node_session(
    endpoint: &quinn::Endpoint,
    target: &Target,
    creds: &Creds,
) -> anyhow::Result<Session> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(creds.key_der.clone()));
    let config =
        tls::node_client_config(&creds.ca_der, &creds.cert_der, key, Duration::from_secs(5))?;
    open(endpoint, config, target, &creds.machine).await
}

fn client_endpoint(bind: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    use nix::sys::socket::{setsockopt, sockopt};
    let socket = std::net::UdpSocket::bind(bind)?;
    setsockopt(&socket, sockopt::RcvBuf, &(8usize << 20))?;
    setsockopt(&socket, sockopt::SndBuf, &(8usize << 20))?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

// ---------------------------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    cpu_ticks: u64,
    data_bytes: Option<u64>,
}

fn proc_sample(pid: u32) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // utime and stime are fields 14 and 15, counted after the parenthesised command name.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11).context("no utime")?.parse::<u64>()?
        + fields.get(12).context("no stime")?.parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((rss, ticks))
}

/// USER_HZ, in which /proc reports CPU time (100 on every mainstream architecture).
const CLK_TCK: f64 = 100.0;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

fn dist(v: &Mutex<Vec<Duration>>) -> String {
    let mut v = v.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if v.is_empty() {
        return "none".into();
    }
    v.sort();
    format!(
        "{} samples, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        v.len(),
        pct(&v, 0.5).as_secs_f64() * 1e3,
        pct(&v, 0.99).as_secs_f64() * 1e3,
        pct(&v, 1.0).as_secs_f64() * 1e3
    )
}

/// What the good agent saw.
#[derive(Default)]
struct Good {
    renew: Mutex<Vec<Duration>>,
    hello: Mutex<Vec<Duration>>,
    failures: AtomicU64,
    reconnects: AtomicU64,
}

/// What the attackers did.
#[derive(Default)]
struct Attack {
    connections: AtomicU64,
    connect_failures: AtomicU64,
    closed_by_controller: AtomicU64,
    messages: AtomicU64,
    bytes: AtomicU64,
    refusals: AtomicU64,
}

// ---------------------------------------------------------------------------------------------
// The good agent
// ---------------------------------------------------------------------------------------------

async fn good_agent(
    endpoint: quinn::Endpoint,
    target: Target,
    creds: Creds,
    every: Duration,
    good: Arc<Good>,
    mut stop: watch::Receiver<bool>,
) {
    let key = match rcgen::KeyPair::try_from(creds.key_der.as_slice()) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("good agent: key: {e}");
            return;
        }
    };
    let csr = match pki::make_csr(&key) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("good agent: csr: {e}");
            return;
        }
    };
    let mut session: Option<Session> = None;
    let mut tick = tokio::time::interval(every);
    let mut uptime = 0;
    while !*stop.borrow() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        if session.is_none() {
            match tokio::time::timeout(
                Duration::from_secs(10),
                node_session(&endpoint, &target, &creds),
            )
            .await
            {
                Ok(Ok(s)) => session = Some(s),
                _ => {
                    good.failures.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            good.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        let Some(s) = session.as_mut() else { continue };
        uptime += 1;
        let round = async {
            send_msg(
                &mut s.send,
                &AgentMsg::Health(HealthReport {
                    at: now_ms(),
                    uptime_secs: uptime,
                    ..Default::default()
                }),
            )
            .await?;
            let t = Instant::now();
            send_msg(
                &mut s.send,
                &AgentMsg::Renew(RenewRequest {
                    csr_der: csr.clone(),
                }),
            )
            .await?;
            loop {
                match recv_msg::<ControllerMsg>(&mut s.recv).await? {
                    Some(ControllerMsg::Renewed(_)) => return Ok::<_, anyhow::Error>(t.elapsed()),
                    Some(ControllerMsg::Reject(r)) => bail!("renewal refused: {r}"),
                    Some(_) => continue,
                    None => bail!("stream ended"),
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), round).await {
            Ok(Ok(d)) => good.renew.lock().unwrap_or_else(|p| p.into_inner()).push(d),
            other => {
                eprintln!("good agent: round trip failed: {other:?}");
                good.failures.fetch_add(1, Ordering::Relaxed);
                session = None;
            }
        }
    }
}

/// Every 5 s: a fresh unauthenticated connection's handshake and Hello → Welcome.
async fn hello_probe(
    endpoint: quinn::Endpoint,
    target: Target,
    good: Arc<Good>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    while !*stop.borrow() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let t = Instant::now();
        match tokio::time::timeout(
            Duration::from_secs(10),
            open(&endpoint, target.enrol.clone(), &target, "hostile-probe"),
        )
        .await
        {
            Ok(Ok(s)) => {
                good.hello
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(t.elapsed());
                s.conn.close(0u32.into(), b"probe done");
            }
            other => {
                eprintln!("hello probe failed: {:?}", other.map(|r| r.map(|_| ())));
                good.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attackers
// ---------------------------------------------------------------------------------------------

/// What one attacker needs.
struct Ctx {
    endpoint: quinn::Endpoint,
    target: Target,
    attack: Arc<Attack>,
    stop: watch::Receiver<bool>,
    cli: Arc<Cli>,
    msgs: Arc<Vec<AgentMsg>>,
}

impl Ctx {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn count(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits until the controller closes `conn` or the run ends; counts the first.
    async fn hold(&mut self, conn: &quinn::Connection) {
        tokio::select! {
            _ = conn.closed() => self.count(&self.attack.closed_by_controller),
            _ = self.stop.changed() => {}
        }
    }

    /// Writes the header of a 1 MiB frame, then the body a few bytes at a time until closed or
    /// stopped.
    async fn trickle(&mut self, conn: &quinn::Connection, send: &mut quinn::SendStream) {
        if send
            .write_all(&(MAX_FRAME_LEN as u32).to_be_bytes())
            .await
            .is_err()
        {
            return;
        }
        let chunk = vec![0u8; self.cli.trickle_bytes.max(1)];
        let mut sent = 0usize;
        let mut tick = tokio::time::interval(self.cli.trickle_every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = conn.closed() => {
                    self.count(&self.attack.closed_by_controller);
                    return;
                }
                _ = self.stop.changed() => return,
            }
            // Never complete the frame.
            let n = chunk.len().min(MAX_FRAME_LEN - 1 - sent);
            if n == 0 {
                continue;
            }
            if send.write_all(&chunk[..n]).await.is_err() {
                self.count(&self.attack.closed_by_controller);
                return;
            }
            sent += n;
            self.attack.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

async fn attacker(mut ctx: Ctx, i: usize, creds: Option<Creds>) {
    let mode = ctx.cli.mode;
    let mut round = 0u64;
    while !ctx.stopped() {
        round += 1;
        match (mode, &creds) {
            (Mode::Idle, _) => return,
            (Mode::Silent, _) => {
                let connecting = match ctx.endpoint.connect_with(
                    ctx.target.enrol.clone(),
                    ctx.target.controller,
                    tls::controller_server_name(),
                ) {
                    Ok(c) => c,
                    Err(_) => return,
                };
                match connecting.await {
                    Ok(conn) => {
                        ctx.count(&ctx.attack.connections);
                        ctx.hold(&conn).await;
                    }
                    Err(_) => ctx.count(&ctx.attack.connect_failures),
                }
            }
            (Mode::Trickle, _) => {
                let r = async {
                    let conn = ctx
                        .endpoint
                        .connect_with(
                            ctx.target.enrol.clone(),
                            ctx.target.controller,
                            tls::controller_server_name(),
                        )?
                        .await?;
                    let (send, _recv) = conn.open_bi().await?;
                    Ok::<_, anyhow::Error>((conn, send))
                };
                match r.await {
                    Ok((conn, mut send)) => {
                        ctx.count(&ctx.attack.connections);
                        ctx.trickle(&conn, &mut send).await;
                    }
                    Err(_) => ctx.count(&ctx.attack.connect_failures),
                }
            }
            (_, None) => return,
            (Mode::TrickleEnrolled, Some(c)) => {
                match node_session(&ctx.endpoint, &ctx.target, c).await {
                    Ok(mut s) => {
                        ctx.count(&ctx.attack.connections);
                        ctx.trickle(&s.conn.clone(), &mut s.send).await;
                    }
                    Err(_) => ctx.count(&ctx.attack.connect_failures),
                }
            }
            (Mode::Oversize, Some(c)) => match node_session(&ctx.endpoint, &ctx.target, c).await {
                Ok(mut s) => {
                    ctx.count(&ctx.attack.connections);
                    let msg = &ctx.msgs[(i + round as usize) % ctx.msgs.len()];
                    if send_msg(&mut s.send, msg).await.is_ok() {
                        ctx.count(&ctx.attack.messages);
                        let refused = async {
                            while let Ok(Some(m)) = recv_msg::<ControllerMsg>(&mut s.recv).await {
                                if matches!(m, ControllerMsg::Reject(_)) {
                                    return true;
                                }
                            }
                            false
                        };
                        if tokio::time::timeout(Duration::from_secs(10), refused)
                            .await
                            .unwrap_or(false)
                        {
                            ctx.count(&ctx.attack.refusals);
                        }
                    }
                    s.conn.close(0u32.into(), b"");
                }
                Err(_) => ctx.count(&ctx.attack.connect_failures),
            },
            (Mode::NoRead, Some(c)) => match node_session(&ctx.endpoint, &ctx.target, c).await {
                Ok(mut s) => {
                    ctx.count(&ctx.attack.connections);
                    let local = SocketAddr::from(([10, 77, (i >> 8) as u8, i as u8], 7000));
                    let ov = AgentMsg::Overlay(OverlayHello {
                        netmap_version: None,
                        local_endpoints: vec![local],
                        nat: NatMapping::EndpointIndependent,
                    });
                    if send_msg(&mut s.send, &ov).await.is_ok() {
                        // And never read again: the receive stream stays open, unread.
                        ctx.hold(&s.conn).await;
                    }
                }
                Err(_) => ctx.count(&ctx.attack.connect_failures),
            },
            (Mode::Events | Mode::Serials, Some(c)) => {
                match node_session(&ctx.endpoint, &ctx.target, c).await {
                    Ok(mut s) => {
                        ctx.count(&ctx.attack.connections);
                        let mut tick = tokio::time::interval(ctx.cli.report_every);
                        let mut k = 0u64;
                        loop {
                            tokio::select! {
                                _ = tick.tick() => {}
                                _ = s.conn.closed() => {
                                    ctx.count(&ctx.attack.closed_by_controller);
                                    break;
                                }
                                _ = ctx.stop.changed() => break,
                            }
                            k += 1;
                            let msg = if mode == Mode::Events {
                                flap(k)
                            } else {
                                fresh_serials(i, k)
                            };
                            if send_msg(&mut s.send, &msg).await.is_err() {
                                break;
                            }
                            ctx.count(&ctx.attack.messages);
                        }
                    }
                    Err(_) => ctx.count(&ctx.attack.connect_failures),
                }
            }
        }
        if ctx.stopped() {
            break;
        }
        // Reconnect at once, as an attacker would (a short pause keeps a failing connect from
        // spinning).
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The churning node of `no-read`: a new local endpoint every `every`, each a netmap change for
/// every overlay member.
async fn churn(
    endpoint: quinn::Endpoint,
    target: Target,
    creds: Creds,
    every: Duration,
    attack: Arc<Attack>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(s) = node_session(&endpoint, &target, &creds).await else {
        eprintln!("churn node: no session");
        return;
    };
    let Session {
        conn,
        mut send,
        mut recv,
    } = s;
    // It reads everything, so its own queue stays empty.
    let reader = tokio::spawn(async move {
        while let Ok(Some(_)) = recv_msg::<ControllerMsg>(&mut recv).await {}
    });
    let mut tick = tokio::time::interval(every);
    let mut port = 10_000u16;
    while !*stop.borrow() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        port = port.wrapping_add(1).max(10_000);
        let ov = AgentMsg::Overlay(OverlayHello {
            netmap_version: None,
            local_endpoints: vec![SocketAddr::from(([10, 78, 0, 1], port))],
            nat: NatMapping::EndpointIndependent,
        });
        if send_msg(&mut send, &ov).await.is_err() {
            eprintln!("churn node: session lost");
            break;
        }
        attack.messages.fetch_add(1, Ordering::Relaxed);
    }
    reader.abort();
    conn.close(0u32.into(), b"done");
}

fn blank(name: &str, serial: String) -> Drive {
    Drive {
        name: name.into(),
        model: Some("HOSTILE".into()),
        serial: Some(serial),
        size_bytes: 1 << 40,
        removable: false,
        state: DriveState::Blank,
        smart: None,
        smart_at: None,
    }
}

/// `events`: sdb appears in odd reports and is gone in even ones.
fn flap(k: u64) -> AgentMsg {
    let mut drives = vec![blank("sda", "A".into())];
    if k % 2 == 1 {
        drives.push(blank("sdb", "B".into()));
    }
    AgentMsg::Drives(DriveReport {
        at: now_ms(),
        drives,
    })
}

/// `serials`: 64 drives with serial numbers never seen before, each with a fresh SMART read.
fn fresh_serials(i: usize, k: u64) -> AgentMsg {
    let at = now_ms();
    let drives = (0..64)
        .map(|d| {
            let serial = format!("H{i}-{k}-{d}");
            let mut drive = blank(&format!("sd{d}"), serial.clone());
            drive.smart = Some(SmartOutcome::Report(SmartReport {
                device: format!("/dev/sd{d}"),
                protocol: DriveProtocol::Ata,
                model: Some("HOSTILE".into()),
                serial: Some(serial),
                firmware: Some("1".into()),
                capacity_bytes: Some(1 << 40),
                temperature_celsius: Some(30),
                power_on_hours: Some(k),
                health_passed: Some(true),
                exit_status: SmartExitStatus(0),
                predictors: SmartPredictors::Ata(Default::default()),
                self_test: None,
            }));
            drive.smart_at = Some(at);
            drive
        })
        .collect();
    AgentMsg::Drives(DriveReport { at, drives })
}

/// `oversize`: one message over each of several bounds, the largest near the frame limit.
fn oversize_messages() -> Vec<AgentMsg> {
    let nics = (0..=limits::MAX_NICS)
        .map(|i| NetInterface {
            name: format!("veth{i}"),
            ..Default::default()
        })
        .collect();
    let path = PathInfo {
        peer: NodeId("n0123456789".into()),
        kind: PathKind::Relay,
        remote: None,
        rtt_ms: 1.0,
        tx_bytes: 1,
        rx_bytes: 1,
    };
    let fs = FilesystemUsage {
        mount: "/".repeat(200),
        device: "/dev/sda1".into(),
        fs_type: "ext4".into(),
        total_bytes: 1,
        available_bytes: 1,
    };
    vec![
        AgentMsg::Inventory(Inventory {
            hostname: "hostile".into(),
            nics,
            ..Default::default()
        }),
        AgentMsg::Paths(PathReport {
            paths: vec![path; limits::MAX_PATHS + 1],
            counters: OverlayCounters::default(),
        }),
        AgentMsg::Drives(DriveReport {
            at: now_ms(),
            drives: vec![blank("sda", "S".into()); limits::MAX_DRIVES + 1],
        }),
        AgentMsg::Health(HealthReport {
            filesystems: vec![fs; 3000],
            ..Default::default()
        }),
    ]
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cli = Arc::new(cli);
    let conf = AdminConf::read(&cli.admin_conf)?;
    let uses = u32::try_from(cli.clients + 2).context("--clients too large")?;
    let token = tokio::task::spawn_blocking(move || {
        let req = CreateToken {
            ttl_secs: Some(24 * 3600),
            max_uses: Some(uses),
            labels: Default::default(),
        };
        AdminClient::new(&conf)?
            .create_token(&req)
            .map(|t| t.token)
            .context("token create")
    })
    .await??;
    let parsed: JoinToken = token
        .parse()
        .context("the controller returned an unparsable token")?;
    let target = Target {
        controller: cli.controller,
        enrol: tls::enrol_client_config(parsed.ca_sha256, Duration::from_secs(5))?,
        token: Arc::new(token),
        run: rand::random::<u64>() & 0xffff_ffff,
    };
    let bind: SocketAddr = if cli.controller.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()?;
    let endpoints = (0..cli.clients.div_ceil(500).max(1))
        .map(|_| client_endpoint(bind))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let good_endpoint = client_endpoint(cli.good_bind.unwrap_or(bind))?;
    println!(
        "hostile: mode {:?}, {} clients -> {} for {:?} (then {:?} of sampling), {} client endpoints",
        cli.mode,
        cli.clients,
        cli.controller,
        cli.duration,
        cli.after,
        endpoints.len()
    );

    let (stop_tx, stop) = watch::channel(false);
    let good = Arc::new(Good::default());
    let good_creds = enrol(
        &good_endpoint,
        &target,
        format!("hostile-good-{:x}", target.run),
    )
    .await
    .context("enrolling the good agent")?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(good_agent(
        good_endpoint.clone(),
        target.clone(),
        good_creds,
        cli.probe_every,
        good.clone(),
        stop.clone(),
    ));
    tasks.spawn(hello_probe(
        good_endpoint.clone(),
        target.clone(),
        good.clone(),
        stop.clone(),
    ));

    // Enrolled modes enrol every client first: the attack, not the enrolment, is measured.
    let mut creds: Vec<Option<Creds>> = (0..cli.clients).map(|_| None).collect();
    if cli.mode.enrolled() {
        let t = Instant::now();
        let sem = Arc::new(Semaphore::new(cli.enrol_concurrency.max(1)));
        let mut enrolling = tokio::task::JoinSet::new();
        for i in 0..cli.clients {
            let (ep, target, sem) = (
                endpoints[i % endpoints.len()].clone(),
                target.clone(),
                sem.clone(),
            );
            enrolling.spawn(async move {
                let _permit = sem.acquire_owned().await;
                (
                    i,
                    enrol(&ep, &target, format!("hostile-{:x}-{i}", target.run)).await,
                )
            });
        }
        let mut failed = 0;
        while let Some(r) = enrolling.join_next().await {
            match r? {
                (i, Ok(c)) => creds[i] = Some(c),
                (i, Err(e)) => {
                    failed += 1;
                    if failed <= 3 {
                        eprintln!("client {i}: enrolment failed: {e:#}");
                    }
                }
            }
        }
        println!(
            "enrolled {} hostile nodes in {:.1} s ({failed} failed)",
            cli.clients - failed,
            t.elapsed().as_secs_f64()
        );
    }
    let churn_creds = if cli.mode == Mode::NoRead {
        Some(
            enrol(
                &endpoints[0],
                &target,
                format!("hostile-churn-{:x}", target.run),
            )
            .await
            .context("enrolling the churn node")?,
        )
    } else {
        None
    };

    // Settle, then sample from just before the attack.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = Instant::now();
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let sampler = {
        let (samples, cli) = (samples.clone(), cli.clone());
        let total = cli.duration + cli.after;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(cli.sample_every);
            loop {
                tick.tick().await;
                let at = t0.elapsed();
                let (rss_kib, cpu_ticks) = cli
                    .controller_pid
                    .and_then(|p| proc_sample(p).ok())
                    .unwrap_or((0, 0));
                let data_bytes = cli
                    .data_dir
                    .as_deref()
                    .map(shoal_controller::observe::snapshot::dir_bytes);
                samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Sample {
                        at,
                        rss_kib,
                        cpu_ticks,
                        data_bytes,
                    });
                if at >= total {
                    break;
                }
            }
        })
    };

    let attack = Arc::new(Attack::default());
    let msgs = Arc::new(if cli.mode == Mode::Oversize {
        oversize_messages()
    } else {
        Vec::new()
    });
    let mut attackers = tokio::task::JoinSet::new();
    for (i, c) in creds.into_iter().enumerate() {
        let ctx = Ctx {
            endpoint: endpoints[i % endpoints.len()].clone(),
            target: target.clone(),
            attack: attack.clone(),
            stop: stop.clone(),
            cli: cli.clone(),
            msgs: msgs.clone(),
        };
        attackers.spawn(attacker(ctx, i, c));
    }
    if let Some(c) = churn_creds {
        attackers.spawn(churn(
            endpoints[0].clone(),
            target.clone(),
            c,
            cli.churn_every,
            attack.clone(),
            stop.clone(),
        ));
    }

    // Print the series as it goes.
    let mut printed = 0;
    let mut print_tick = tokio::time::interval(cli.print_every);
    while t0.elapsed() < cli.duration {
        print_tick.tick().await;
        printed = print_new(&samples, printed, &attack);
    }
    let _ = stop_tx.send(true);
    // Attackers close their connections; the good agent goes on through --after.
    attackers.abort_all();
    while attackers.join_next().await.is_some() {}
    for ep in &endpoints {
        ep.close(0u32.into(), b"hostile done");
    }
    println!("attack stopped at {:.1} s", t0.elapsed().as_secs_f64());
    while t0.elapsed() < cli.duration + cli.after {
        print_tick.tick().await;
        printed = print_new(&samples, printed, &attack);
    }
    let _ = sampler.await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    print_new(&samples, printed, &attack);
    summary(
        &cli,
        &samples.lock().unwrap_or_else(|p| p.into_inner()),
        &attack,
        &good,
    );
    let conf = AdminConf::read(&cli.admin_conf)?;
    match tokio::task::spawn_blocking(move || event_log(&conf)).await? {
        Ok(line) => println!("{line}"),
        Err(e) => println!("event log: not read: {e:#}"),
    }
    good_endpoint.close(0u32.into(), b"hostile done");
    Ok(())
}

/// The event log's length by kind, and what its `events_suppressed` summaries count.
fn event_log(conf: &AdminConf) -> anyhow::Result<String> {
    let client = AdminClient::new(conf)?;
    let mut by_kind: std::collections::BTreeMap<String, u64> = Default::default();
    let (mut total, mut summarised) = (0u64, 0u64);
    let mut after = None;
    loop {
        let path = match after {
            Some(a) => format!("/v1/events?limit=10000&after={a}"),
            None => "/v1/events?limit=10000".to_owned(),
        };
        let page: Vec<EventView> = client.get(&path)?;
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        for e in &page {
            total += 1;
            *by_kind.entry(e.kind.clone()).or_default() += 1;
            if e.kind == "events_suppressed" {
                summarised += e
                    .message
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    let kinds: Vec<String> = by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
    Ok(format!("event log: {total} events ({}); the events_suppressed ones account for {summarised} left out", kinds.join(", ")))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn print_new(samples: &Mutex<Vec<Sample>>, from: usize, attack: &Attack) -> usize {
    let s = samples.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(last) = s.last().filter(|_| s.len() > from) {
        println!(
            "t={:>5.1}s rss {:>7.1} MiB{} | connections {} closed {} messages {} refused {} bytes {}",
            last.at.as_secs_f64(),
            mib(last.rss_kib),
            last.data_bytes.map(|b| format!(" data {:.1} MiB", b as f64 / (1 << 20) as f64)).unwrap_or_default(),
            attack.connections.load(Ordering::Relaxed),
            attack.closed_by_controller.load(Ordering::Relaxed),
            attack.messages.load(Ordering::Relaxed),
            attack.refusals.load(Ordering::Relaxed),
            attack.bytes.load(Ordering::Relaxed),
        );
    }
    s.len()
}

fn summary(cli: &Cli, samples: &[Sample], attack: &Attack, good: &Good) {
    let during: Vec<&Sample> = samples.iter().filter(|s| s.at <= cli.duration).collect();
    let (Some(first), Some(end), Some(last)) = (samples.first(), during.last(), samples.last())
    else {
        println!("no samples");
        return;
    };
    let peak = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    println!(
        "attack: {} connections ({} failed to connect), {} closed by the controller, {} messages sent, {} refused, {} trickled bytes",
        attack.connections.load(Ordering::Relaxed),
        attack.connect_failures.load(Ordering::Relaxed),
        attack.closed_by_controller.load(Ordering::Relaxed),
        attack.messages.load(Ordering::Relaxed),
        attack.refusals.load(Ordering::Relaxed),
        attack.bytes.load(Ordering::Relaxed),
    );
    if cli.controller_pid.is_some() {
        let cpu = (end.cpu_ticks.saturating_sub(first.cpu_ticks)) as f64 / CLK_TCK;
        let wall = (end.at - first.at).as_secs_f64().max(1e-3);
        println!(
            "controller: VmRSS {:.1} MiB before, peak {:.1} MiB, {:.1} MiB at the end of the attack, {:.1} MiB after {:?}; CPU {:.1} s over {:.1} s of attack = {:.0} % of one core",
            mib(first.rss_kib),
            mib(peak),
            mib(end.rss_kib),
            mib(last.rss_kib),
            cli.after,
            cpu,
            wall,
            cpu * 100.0 / wall
        );
    }
    if let (Some(a), Some(b), Some(c)) = (first.data_bytes, end.data_bytes, last.data_bytes) {
        let m = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "data dir: {:.1} MiB before, {:.1} MiB at the end of the attack, {:.1} MiB after",
            m(a),
            m(b),
            m(c)
        );
    }
    println!(
        "good agent: renew round trip {}; new connection + Hello -> Welcome {}",
        dist(&good.renew),
        dist(&good.hello)
    );
    println!(
        "good agent: {} failures, {} sessions opened",
        good.failures.load(Ordering::Relaxed),
        good.reconnects.load(Ordering::Relaxed)
    );
}
