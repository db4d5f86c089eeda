//! `shoal-loadgen`: simulates N agents against a running controller over real QUIC + TLS sessions.
//!
//! 1. Creates one join token with `--uses N` through the admin API.
//! 2. Enrols N simulated agents (P-256 key, CSR, pinned-CA TLS, Hello + Enrol, waits for Enrolled).
//! 3. Reconnects all N with mutual TLS (their fresh node certificates), sends Hello and a small
//!    inventory.
//! 4. Holds: every agent sends Health every `--heartbeat` for `--hold`.
//!
//! Connections share `--endpoints` quinn client endpoints (one UDP socket each). The controller is
//! measured from the outside only: with `--controller-pid`, /proc/PID/stat (utime+stime) and
//! /proc/PID/status (VmRSS, VmHWM) are sampled at the start and end of the hold window.
//!
//! With `--overlay` every agent also speaks the protocol-2 overlay session: after Welcome and
//! Inventory it sends `OverlayHello`, keeps the full `Netmap` it gets and applies every
//! `NetmapDelta` to it. The hold is replaced by a convergence measurement: once every agent's map
//! holds every other agent with its endpoints, `--converge-rounds` new agents enrol one after the
//! other, and for each the loadgen reports how long the fleet took to learn about it (see
//! [`converge`]) and how many bytes that cost.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context};
use clap::Parser;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use shoal_api::tokens::CreateToken;
use shoal_controller::api::admin::{AdminClient, AdminConf};
use shoal_overlay::{pki, recv_msg, send_msg, tls};
use shoal_proto::{
    AgentMsg, BlockDevice, BootMode, ControllerMsg, Dmi, EnrolRequest, FilesystemUsage, HardwareId,
    HardwareIdSource, HealthReport, Hello, Inventory, JoinToken, LoadAverage, NatMapping,
    NetInterface, Netmap, NetmapChange, NodeId, OverlayHello, Peer, UnixMillis, SUPPORTED,
};
use tokio::sync::{mpsc, watch, Semaphore};

#[derive(Debug, Parser)]
#[command(
    name = "shoal-loadgen",
    about = "Simulate N shoal agents against a running controller"
)]
struct Cli {
    /// Controller QUIC address; repeatable (several controllers of one cluster): agent i uses
    /// the (i mod count)-th.
    #[arg(long = "controller", required = true)]
    controllers: Vec<SocketAddr>,
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
    /// Controller process id, sampled through /proc at the start and end of the hold; repeatable
    /// (the figures are summed over every controller).
    #[arg(long = "controller-pid")]
    controller_pids: Vec<u32>,
    /// An etcd member's metrics URL (`http://HOST:2379/metrics`): the store's writes (puts,
    /// deletes, transactions) during the hold are read from it.
    #[arg(long)]
    etcd_metrics: Option<String>,
    /// Worker threads of the loadgen runtime (default: tokio's default, one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Speak the overlay session (protocol 2) and measure netmap convergence instead of holding.
    #[arg(long)]
    overlay: bool,
    /// With --overlay: how many new members to enrol, one at a time, once the fleet's netmaps
    /// settled.
    #[arg(long, default_value_t = 5)]
    converge_rounds: usize,
    /// With --overlay: how long to wait for the initial netmaps to settle, and for each round to
    /// converge.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    converge_timeout: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(t) = cli.threads {
        rt.worker_threads(t);
    }
    let result = rt
        .build()
        .context("tokio runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-loadgen: {e:#}");
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

fn create_token(conf: &AdminConf, uses: u32) -> anyhow::Result<String> {
    let req = CreateToken {
        ttl_secs: Some(24 * 3600),
        max_uses: Some(uses),
        labels: Default::default(),
    };
    Ok(AdminClient::new(conf)?
        .create_token(&req)
        .context("token create")?
        .token)
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
            mac: Some(format!(
                "02:00:{:02x}:{:02x}:{:02x}:{:02x}",
                (i >> 24) & 0xff,
                (i >> 16) & 0xff,
                (i >> 8) & 0xff,
                i & 0xff
            )),
            permanent_mac: true,
            speed_mbps: Some(1000),
            up: true,
            addresses: vec![
                format!(
                    "10.{}.{}.{}/16",
                    (i >> 16) & 0xff,
                    (i >> 8) & 0xff,
                    i & 0xff
                ),
                "fe80::1/64".into(),
            ],
        }],
        dmi: Dmi {
            vendor: Some("QEMU".into()),
            product: Some("Standard PC (Q35 + ICH9, 2009)".into()),
            serial: None,
            uuid: None,
        },
        boot_mode: BootMode::Uefi,
    }
}

fn health(uptime: u64) -> HealthReport {
    HealthReport {
        at: now_ms(),
        uptime_secs: uptime,
        load: LoadAverage {
            one: 0.15,
            five: 0.10,
            fifteen: 0.05,
        },
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

fn overlay_hello(i: usize) -> OverlayHello {
    // A made-up LAN address per agent: peers get it as a second endpoint, as a real agent's
    // interface address.
    let local = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 7000));
    OverlayHello {
        netmap_version: None,
        local_endpoints: vec![local],
        nat: NatMapping::EndpointIndependent,
    }
}

fn hello(i: usize) -> Hello {
    Hello {
        protocol: SUPPORTED,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        hardware_id: HardwareId {
            source: HardwareIdSource::Override,
            value: format!("loadgen-{i}"),
        },
    }
}

/// What one enrolment yields.
struct Creds {
    node_id: NodeId,
    key_der: Vec<u8>,
    cert_der: Vec<u8>,
    ca_der: Vec<u8>,
    /// Just before Enrol was sent.
    enrol_sent: Instant,
    /// When Enrolled arrived.
    enrolled_at: Instant,
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
    let conn = endpoint
        .connect_with(config, controller, tls::controller_server_name())?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send_msg(&mut send, &AgentMsg::Hello(hello(i))).await?;
    match recv_msg::<ControllerMsg>(&mut recv).await? {
        Some(ControllerMsg::Welcome(_)) => {}
        other => bail!("expected Welcome, got {other:?}"),
    }
    let req = EnrolRequest {
        token: token.to_owned(),
        csr_der,
        hostname: format!("loadgen-{i}"),
    };
    let enrol_sent = Instant::now();
    send_msg(&mut send, &AgentMsg::Enrol(req)).await?;
    let enrolled = match recv_msg::<ControllerMsg>(&mut recv).await? {
        Some(ControllerMsg::Enrolled(e)) => e,
        other => bail!("expected Enrolled, got {other:?}"),
    };
    let enrolled_at = Instant::now();
    conn.close(0u32.into(), b"enrolled");
    Ok(Creds {
        node_id: enrolled.node_id,
        key_der: key.serialize_der(),
        cert_der: enrolled.cert_der,
        ca_der: enrolled.ca_der,
        enrol_sent,
        enrolled_at,
    })
}

#[derive(Default)]
struct Counters {
    heartbeats: AtomicU64,
    session_errors: AtomicU64,
}

/// Where and how often a simulated agent talks.
#[derive(Debug, Clone, Copy)]
struct Timing {
    controller: SocketAddr,
    keep_alive: Duration,
    heartbeat: Duration,
}

/// What overlay sessions tell the measuring task, each stamped when the message was read.
#[derive(Debug)]
enum OverlayEvent {
    /// The agent sent its OverlayHello.
    HelloSent { agent: usize, at: Instant },
    /// The agent's full netmap arrived: its postcard size (the `ControllerMsg`, without the 4-byte
    /// frame header).
    Netmap {
        agent: usize,
        at: Instant,
        bytes: usize,
        peers: usize,
    },
    /// A netmap or delta carried a record of a node that was not in the fleet when the loadgen
    /// started.
    NewPeer {
        agent: usize,
        peer: NodeId,
        at: Instant,
        bytes: usize,
        changes: usize,
        usable: bool,
        full: bool,
    },
}

/// Overlay counters and per-agent progress, shared by every session and read by [`converge`].
struct OverlayShared {
    /// Nodes enrolled in phase 1: deltas about them are only counted, never reported one by one.
    initial: HashSet<NodeId>,
    events: mpsc::UnboundedSender<OverlayEvent>,
    observed: AtomicU64,
    netmaps: AtomicU64,
    deltas: AtomicU64,
    delta_bytes: AtomicU64,
    gaps: AtomicU64,
    unexpected: AtomicU64,
    /// Per agent index: peers in its map, and peers in it with at least one endpoint.
    peers: Vec<AtomicUsize>,
    reachable: Vec<AtomicUsize>,
}

impl OverlayShared {
    /// Applies one controller message to agent `agent`'s map (`reach`: its peers with endpoints)
    /// and reports what [`converge`] measures.
    fn handle(
        &self,
        agent: usize,
        map: &mut Option<Netmap>,
        reach: &mut HashSet<NodeId>,
        msg: ControllerMsg,
        at: Instant,
    ) {
        let new_peer = |p: &Peer| !self.initial.contains(&p.node);
        let usable = |p: &Peer| !p.endpoints.is_empty() && p.key_sha256 != [0; 32];
        match msg {
            ControllerMsg::Observed(_) => {
                self.observed.fetch_add(1, Ordering::Relaxed);
            }
            ControllerMsg::Netmap(m) => {
                self.netmaps.fetch_add(1, Ordering::Relaxed);
                let bytes = postcard::to_allocvec(&ControllerMsg::Netmap(m.clone()))
                    .map(|v| v.len())
                    .unwrap_or(0);
                let _ = self.events.send(OverlayEvent::Netmap {
                    agent,
                    at,
                    bytes,
                    peers: m.peers.len(),
                });
                for p in m.peers.iter().filter(|p| new_peer(p)) {
                    let _ = self.events.send(OverlayEvent::NewPeer {
                        agent,
                        peer: p.node.clone(),
                        at,
                        bytes,
                        changes: m.peers.len(),
                        usable: usable(p),
                        full: true,
                    });
                }
                *reach = m
                    .peers
                    .iter()
                    .filter(|p| !p.endpoints.is_empty())
                    .map(|p| p.node.clone())
                    .collect();
                *map = Some(m);
            }
            ControllerMsg::NetmapDelta(d) => {
                self.deltas.fetch_add(1, Ordering::Relaxed);
                let Some(m) = map.as_mut() else {
                    // The hub promises the full netmap first.
                    self.unexpected.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                if let Err(gap) = m.apply(&d) {
                    self.gaps.fetch_add(1, Ordering::Relaxed);
                    eprintln!("agent {agent}: {gap}");
                    return;
                }
                let bytes = postcard::to_allocvec(&ControllerMsg::NetmapDelta(d.clone()))
                    .map(|v| v.len())
                    .unwrap_or(0);
                self.delta_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                for c in &d.changes {
                    match c {
                        NetmapChange::Peer(p) => {
                            if p.endpoints.is_empty() {
                                reach.remove(&p.node);
                            } else {
                                reach.insert(p.node.clone());
                            }
                            if new_peer(p) {
                                let _ = self.events.send(OverlayEvent::NewPeer {
                                    agent,
                                    peer: p.node.clone(),
                                    at,
                                    bytes,
                                    changes: d.changes.len(),
                                    usable: usable(p),
                                    full: false,
                                });
                            }
                        }
                        NetmapChange::PeerGone(n) => {
                            reach.remove(n);
                        }
                        _ => {}
                    }
                }
            }
            _ => {
                self.unexpected.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if let Some(m) = map {
            self.peers[agent].store(m.peers.len(), Ordering::Relaxed);
            self.reachable[agent].store(reach.len(), Ordering::Relaxed);
        }
    }
}

/// One enrolled agent's mTLS session; reports `Ok(())` on `ready` once Hello + Inventory (+
/// OverlayHello) are through, then heartbeats until `stop` flips. With `overlay`, it also keeps its
/// netmap.
#[allow(clippy::too_many_arguments)]
async fn node_session(
    i: usize,
    endpoint: quinn::Endpoint,
    creds: Creds,
    Timing {
        controller,
        keep_alive,
        heartbeat,
    }: Timing,
    ready: mpsc::UnboundedSender<Result<(), String>>,
    mut stop: watch::Receiver<bool>,
    counters: Arc<Counters>,
    overlay: Option<Arc<OverlayShared>>,
) {
    let connected = async {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(creds.key_der));
        let config = tls::node_client_config(&creds.ca_der, &creds.cert_der, key, keep_alive)?;
        let conn = endpoint
            .connect_with(config, controller, tls::controller_server_name())?
            .await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send_msg(&mut send, &AgentMsg::Hello(hello(i))).await?;
        match recv_msg::<ControllerMsg>(&mut recv).await? {
            Some(ControllerMsg::Welcome(w)) if w.node_id.is_some() => {
                if overlay.is_some() && w.protocol < 2 {
                    bail!(
                        "the controller chose protocol {}; the overlay needs 2",
                        w.protocol
                    );
                }
            }
            other => bail!("expected an authenticated Welcome, got {other:?}"),
        }
        send_msg(&mut send, &AgentMsg::Inventory(inventory(i))).await?;
        if let Some(o) = &overlay {
            send_msg(&mut send, &AgentMsg::Overlay(overlay_hello(i))).await?;
            let _ = o.events.send(OverlayEvent::HelloSent {
                agent: i,
                at: Instant::now(),
            });
        }
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
    // One reader for the whole session, never cancelled mid-frame: it ends only with the stream.
    let mut reader = Box::pin(async {
        let mut map = None;
        let mut reach = HashSet::new();
        loop {
            let msg = recv_msg::<ControllerMsg>(&mut recv).await;
            let at = Instant::now();
            match (msg, &overlay) {
                // Without the overlay, what the controller says (drive policy, the controllers of
                // a cluster, …) is a real agent's work; the loadgen only keeps its session.
                (Ok(Some(msg)), None)
                    if !matches!(
                        msg,
                        ControllerMsg::Revoked { .. } | ControllerMsg::Reject(_)
                    ) =>
                {
                    continue
                }
                (Ok(Some(msg)), Some(o))
                    if !matches!(
                        msg,
                        ControllerMsg::Revoked { .. } | ControllerMsg::Reject(_)
                    ) =>
                {
                    o.handle(i, &mut map, &mut reach, msg, at)
                }
                (other, _) => return other,
            }
        }
    });
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

/// Every pid's sample, summed (CPU ticks and memory), taken at the first one's instant.
fn sample_all(pids: &[u32]) -> anyhow::Result<Option<ProcSample>> {
    let mut total: Option<ProcSample> = None;
    for pid in pids {
        let s = sample(*pid)?;
        total = Some(match total {
            None => s,
            Some(t) => ProcSample {
                at: t.at,
                cpu_ticks: t.cpu_ticks + s.cpu_ticks,
                rss_kib: t.rss_kib + s.rss_kib,
                hwm_kib: t.hwm_kib + s.hwm_kib,
            },
        });
    }
    Ok(total)
}

/// etcd's count of writes so far (`etcd_mvcc_put_total` + `etcd_mvcc_delete_total` +
/// `etcd_mvcc_txn_total`), from its metrics page.
fn etcd_writes(url: &str) -> anyhow::Result<f64> {
    let body = ureq::get(url)
        .call()
        .with_context(|| format!("GET {url}"))?
        .body_mut()
        .read_to_string()?;
    let mut total = 0.0;
    for line in body.lines() {
        for name in [
            "etcd_mvcc_put_total",
            "etcd_mvcc_delete_total",
            "etcd_mvcc_txn_total",
        ] {
            if let Some(rest) = line.strip_prefix(name) {
                if let Some(v) = rest
                    .split_whitespace()
                    .last()
                    .and_then(|v| v.parse::<f64>().ok())
                {
                    total += v;
                }
            }
        }
    }
    Ok(total)
}

fn sample(pid: u32) -> anyhow::Result<ProcSample> {
    let at = Instant::now();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15 (1-based).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
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
    Ok(ProcSample {
        at,
        cpu_ticks: utime + stime,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// A client endpoint on its own UDP socket with large kernel buffers (capped by net.core.rmem_max),
/// so that the loadgen's sockets are not where packets are dropped.
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    let n = cli.agents;
    if n == 0 {
        bail!("--agents must be at least 1");
    }
    let conf = AdminConf::read(&cli.admin_conf)?;
    let rounds = if cli.overlay { cli.converge_rounds } else { 0 };
    let uses = u32::try_from(n + rounds).context("--agents too large")?;
    let token = tokio::task::spawn_blocking(move || create_token(&conf, uses)).await??;
    let parsed: JoinToken = token
        .parse()
        .context("the controller returned an unparsable token")?;
    let endpoints_n = cli.endpoints.unwrap_or(n.div_ceil(500)).max(1);
    let controllers = cli.controllers.clone();
    let controller_of = |i: usize| controllers[i % controllers.len()];
    let bind: SocketAddr = if controllers[0].is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()?;
    let endpoints = (0..endpoints_n)
        .map(|_| client_endpoint(bind))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let concurrency = cli.enrol_concurrency.unwrap_or(n).max(1);
    println!(
        "loadgen: {n} agents -> {} ({endpoints_n} client endpoints, concurrency {concurrency}, heartbeat {:?}, {})",
        controllers
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(" + "),
        cli.heartbeat,
        if cli.overlay { format!("overlay, {rounds} convergence rounds") } else { format!("hold {:?}", cli.hold) }
    );

    // Phase 1: enrolment.
    let enrol_config = tls::enrol_client_config(parsed.ca_sha256, cli.keep_alive)?;
    let sem = Arc::new(Semaphore::new(concurrency));
    let token = Arc::new(token);
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (ep, cfg, sem, token, controller) = (
            endpoints[i % endpoints_n].clone(),
            enrol_config.clone(),
            sem.clone(),
            token.clone(),
            controller_of(i),
        );
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let r = tokio::time::timeout(
                Duration::from_secs(120),
                enrol_one(i, &ep, cfg, controller, &token),
            )
            .await;
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
    let pct = |v: &[Duration], p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "enrol: {} of {n} enrolled in {:.2} s (first connect to last Enrolled), {enrol_errors} errors; completion p50 {:.2} s, p99 {:.2} s",
        n - enrol_errors,
        last_ok.as_secs_f64(),
        pct(&lat, 0.5).as_secs_f64(),
        pct(&lat, 0.99).as_secs_f64()
    );

    // Phase 2: mutual-TLS sessions.
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let overlay = cli.overlay.then(|| {
        Arc::new(OverlayShared {
            initial: creds.iter().flatten().map(|c| c.node_id.clone()).collect(),
            events: events_tx,
            observed: AtomicU64::new(0),
            netmaps: AtomicU64::new(0),
            deltas: AtomicU64::new(0),
            delta_bytes: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
            peers: (0..n + rounds).map(|_| AtomicUsize::new(0)).collect(),
            reachable: (0..n + rounds).map(|_| AtomicUsize::new(0)).collect(),
        })
    });
    let cpu_connect = sample_all(&cli.controller_pids)?;
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
        let (ep, ready, stop, counters, sem, overlay) = (
            endpoints[i % endpoints_n].clone(),
            ready_tx.clone(),
            stop_rx.clone(),
            counters.clone(),
            sem.clone(),
            overlay.clone(),
        );
        let timing = Timing {
            controller: controller_of(i),
            keep_alive: cli.keep_alive,
            heartbeat: cli.heartbeat,
        };
        sessions.spawn(async move {
            // The permit only bounds connects in flight; it is released once the session is up.
            let permit = sem.acquire_owned().await;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let session = tokio::spawn(node_session(i, ep, c, timing, tx, stop, counters, overlay));
            let r = rx
                .recv()
                .await
                .unwrap_or_else(|| Err("session task ended".into()));
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
        "connect: {connected} of {expected} connected with mTLS (Hello + Welcome + Inventory{}) in {:.2} s, {connect_errors} errors",
        if cli.overlay { " + OverlayHello" } else { "" },
        t1.elapsed().as_secs_f64()
    );

    if let Some(shared) = overlay {
        // Phase 3 (overlay): settle, then convergence rounds.
        let timing = Timing {
            controller: controllers[0],
            keep_alive: cli.keep_alive,
            heartbeat: cli.heartbeat,
        };
        let mut ctx = Converge {
            cli: &cli,
            n,
            connected,
            t_connect: t1,
            cpu_connect,
            shared,
            events: events_rx,
            got: Collected::default(),
            endpoints: &endpoints,
            enrol_config: enrol_config.clone(),
            token: token.clone(),
            timing,
            stop: stop_rx.clone(),
            counters: counters.clone(),
            sessions: &mut sessions,
        };
        let result = converge(&mut ctx).await;
        let _ = stop_tx.send(true);
        while sessions.join_next().await.is_some() {}
        for ep in &endpoints {
            ep.close(0u32.into(), b"loadgen done");
        }
        return result;
    }

    // Phase 3: hold.
    let start = sample_all(&cli.controller_pids)?;
    let etcd_start = match &cli.etcd_metrics {
        Some(url) => Some(etcd_writes(url)?),
        None => None,
    };
    let hb0 = counters.heartbeats.load(Ordering::Relaxed);
    let hold_start = Instant::now();
    let mut max_rss = start.map(|s| s.rss_kib).unwrap_or(0);
    while hold_start.elapsed() < cli.hold {
        tokio::time::sleep(
            Duration::from_secs(1).min(cli.hold.saturating_sub(hold_start.elapsed())),
        )
        .await;
        if let Ok(Some(s)) = sample_all(&cli.controller_pids) {
            max_rss = max_rss.max(s.rss_kib);
        }
    }
    let end = sample_all(&cli.controller_pids)?;
    let etcd_end = match &cli.etcd_metrics {
        Some(url) => Some(etcd_writes(url)?),
        None => None,
    };
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
            "controller pid(s) {:?}: CPU {:.2} s over {wall:.1} s = {:.1} % of one core; VmRSS {:.1} MiB at start, {:.1} MiB at end, max sampled {:.1} MiB; VmHWM (peak RSS over its life) {:.1} MiB",
            cli.controller_pids,
            cpu_s,
            cpu_s * 100.0 / wall,
            a.rss_kib as f64 / 1024.0,
            b.rss_kib as f64 / 1024.0,
            max_rss as f64 / 1024.0,
            b.hwm_kib as f64 / 1024.0,
        );
    }
    if let (Some(a), Some(b)) = (etcd_start, etcd_end) {
        let writes = b - a;
        println!(
            "etcd: {writes:.0} writes (puts + deletes + transactions) during the hold = {:.2}/s; {:.5} per agent per second",
            writes / held,
            writes / held / connected.max(1) as f64
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

/// How one agent learnt about one new member.
#[derive(Debug, Clone)]
struct PeerSeen {
    /// The first netmap or delta that held a record of it.
    first: Instant,
    /// The first record with an endpoint and its key: from then on the agent could open a path to
    /// it.
    usable: Option<Instant>,
    /// Size (postcard `ControllerMsg`) and change count of every delta that carried a record of it.
    deltas: Vec<(usize, usize)>,
}

/// Every overlay event so far.
#[derive(Debug, Default)]
struct Collected {
    hello_sent: HashMap<usize, Instant>,
    /// Agent → when its full netmap came, its size and peer count.
    netmap: HashMap<usize, (Instant, usize, usize)>,
    /// New member → agent → what that agent saw of it.
    seen: HashMap<NodeId, HashMap<usize, PeerSeen>>,
}

impl Collected {
    fn absorb(&mut self, ev: OverlayEvent) {
        match ev {
            OverlayEvent::HelloSent { agent, at } => {
                self.hello_sent.insert(agent, at);
            }
            OverlayEvent::Netmap {
                agent,
                at,
                bytes,
                peers,
            } => {
                self.netmap.entry(agent).or_insert((at, bytes, peers));
            }
            OverlayEvent::NewPeer {
                agent,
                peer,
                at,
                bytes,
                changes,
                usable,
                full,
            } => {
                let s = self
                    .seen
                    .entry(peer)
                    .or_default()
                    .entry(agent)
                    .or_insert(PeerSeen {
                        first: at,
                        usable: None,
                        deltas: Vec::new(),
                    });
                if usable && s.usable.is_none() {
                    s.usable = Some(at);
                }
                if !full {
                    s.deltas.push((bytes, changes));
                }
            }
        }
    }
}

/// What the convergence phase works with.
struct Converge<'a> {
    cli: &'a Cli,
    n: usize,
    connected: usize,
    /// When phase 2 (mTLS connects) started, and the controller's CPU then.
    t_connect: Instant,
    cpu_connect: Option<ProcSample>,
    shared: Arc<OverlayShared>,
    events: mpsc::UnboundedReceiver<OverlayEvent>,
    got: Collected,
    endpoints: &'a [quinn::Endpoint],
    enrol_config: quinn::ClientConfig,
    token: Arc<String>,
    timing: Timing,
    stop: watch::Receiver<bool>,
    counters: Arc<Counters>,
    sessions: &'a mut tokio::task::JoinSet<()>,
}

impl Converge<'_> {
    /// Absorbs events until `done` holds or `deadline` passes; returns whether `done` held.
    async fn wait(
        &mut self,
        deadline: Instant,
        mut done: impl FnMut(&Collected, &OverlayShared) -> bool,
    ) -> bool {
        loop {
            while let Ok(ev) = self.events.try_recv() {
                self.got.absorb(ev);
            }
            if done(&self.got, &self.shared) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // Progress in the shared counters (not events) is polled every 20 ms.
            match tokio::time::timeout(left.min(Duration::from_millis(20)), self.events.recv())
                .await
            {
                Ok(Some(ev)) => self.got.absorb(ev),
                Ok(None) => return done(&self.got, &self.shared),
                Err(_) => {}
            }
        }
    }

    /// Waits until no delta has arrived anywhere for `quiet`.
    async fn quiesce(&mut self, quiet: Duration) {
        let mut last = self.shared.deltas.load(Ordering::Relaxed);
        let mut since = Instant::now();
        while since.elapsed() < quiet {
            tokio::time::sleep(Duration::from_millis(20)).await;
            while let Ok(ev) = self.events.try_recv() {
                self.got.absorb(ev);
            }
            let now = self.shared.deltas.load(Ordering::Relaxed);
            if now != last {
                last = now;
                since = Instant::now();
            }
        }
    }

    fn cpu_line(&self, a: Option<ProcSample>, b: Option<ProcSample>) -> String {
        match (a, b) {
            (Some(a), Some(b)) => {
                let cpu_s = (b.cpu_ticks - a.cpu_ticks) as f64 / clk_tck();
                let wall = (b.at - a.at).as_secs_f64();
                format!("controller CPU {cpu_s:.2} s over {wall:.2} s ({:.0} % of one core), VmRSS {:.1} MiB", cpu_s * 100.0 / wall, b.rss_kib as f64 / 1024.0)
            }
            _ => "controller CPU not sampled (no --controller-pid)".into(),
        }
    }

    fn sample(&self) -> Option<ProcSample> {
        sample_all(&self.cli.controller_pids).ok().flatten()
    }
}

/// Milliseconds from `from` to `to`, negative if `to` came first.
fn ms(from: Instant, to: Instant) -> f64 {
    if to >= from {
        (to - from).as_secs_f64() * 1e3
    } else {
        -((from - to).as_secs_f64() * 1e3)
    }
}

fn pct_f(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

fn dist(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct_f(&v, 0.5),
        pct_f(&v, 0.99),
        pct_f(&v, 1.0)
    )
}

/// Phase 3 with `--overlay`.
///
/// 1. Settle: wait until every connected agent holds its full netmap and every other connected
///    agent in it with an endpoint, then until no delta has arrived for a second.
/// 2. Each round enrols one new agent (fresh key and CSR, same token), connects it with mTLS and
///    sends its OverlayHello, and waits until every agent that had a netmap before the round holds
///    a *usable* record of it (an endpoint and its key). Reported per round, over those agents:
///    - *first record*: from Enrol sent (and from Enrolled received, negative when the existing
///      agents heard before the newcomer itself) to the first delta naming the newcomer. The
///      controller joins the newcomer to `default` during enrolment, before it has endpoints or a
///      key.
///    - *usable record*: from the newcomer's OverlayHello sent to the first record with an
///      endpoint and key. This is what a datapath needs.
///    - total: Enrol sent to the last agent's usable record.
///    - bytes: the newcomer's full netmap, and the deltas each existing agent received about it.
async fn converge(c: &mut Converge<'_>) -> anyhow::Result<()> {
    let timeout = c.cli.converge_timeout;
    let connected = c.connected;
    let settled = c
        .wait(Instant::now() + timeout, |got, sh| {
            got.netmap.len() >= connected
                && got
                    .netmap
                    .keys()
                    .all(|a| sh.reachable[*a].load(Ordering::Relaxed) + 1 >= connected)
        })
        .await;
    let t_settled = Instant::now();
    let cpu_settled = c.sample();
    let sh = c.shared.clone();
    if !settled {
        let short = c
            .got
            .netmap
            .keys()
            .filter(|a| sh.reachable[**a].load(Ordering::Relaxed) + 1 < connected)
            .count();
        bail!(
            "netmaps did not settle within {timeout:?}: {} of {connected} agents have a netmap, {short} of them miss peers",
            c.got.netmap.len()
        );
    }
    let mut sizes: Vec<f64> = c.got.netmap.values().map(|(_, b, _)| *b as f64).collect();
    sizes.sort_by(f64::total_cmp);
    println!(
        "settle: {connected} agents hold all {} peers with endpoints {:.2} s after the first mTLS connect; {} deltas ({:.1} MiB) so far; first full netmaps {:.0}..{:.0} B; {}",
        connected - 1,
        (t_settled - c.t_connect).as_secs_f64(),
        sh.deltas.load(Ordering::Relaxed),
        sh.delta_bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
        pct_f(&sizes, 0.0),
        pct_f(&sizes, 1.0),
        c.cpu_line(c.cpu_connect, cpu_settled),
    );
    c.quiesce(Duration::from_secs(1)).await;

    let mut cpu_total = 0.0;
    let mut wall_total = 0.0;
    for r in 0..c.cli.converge_rounds {
        let idx = c.n + r;
        let mut watchers: Vec<usize> = c.got.netmap.keys().copied().collect();
        watchers.sort_unstable();
        let deltas0 = sh.deltas.load(Ordering::Relaxed);
        let cpu0 = c.sample();
        let ep = c.endpoints[idx % c.endpoints.len()].clone();
        let creds = tokio::time::timeout(
            Duration::from_secs(120),
            enrol_one(
                idx,
                &ep,
                c.enrol_config.clone(),
                c.timing.controller,
                &c.token,
            ),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after 120 s")))
        .with_context(|| format!("round {r}: enrolling the new member"))?;
        let (id, enrol_sent, enrolled_at) =
            (creds.node_id.clone(), creds.enrol_sent, creds.enrolled_at);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (timing, stop, counters, overlay) = (
            c.timing,
            c.stop.clone(),
            c.counters.clone(),
            Some(sh.clone()),
        );
        c.sessions.spawn(node_session(
            idx, ep, creds, timing, tx, stop, counters, overlay,
        ));
        match rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => bail!("round {r}: the new member's mTLS session failed: {e}"),
            None => bail!("round {r}: the new member's session ended"),
        }
        let deadline = Instant::now() + timeout;
        let w = watchers.clone();
        let idc = id.clone();
        let done = c
            .wait(deadline, move |got, _| {
                got.netmap.contains_key(&idx)
                    && got.seen.get(&idc).is_some_and(|s| {
                        w.iter()
                            .all(|a| s.get(a).is_some_and(|p| p.usable.is_some()))
                    })
            })
            .await;
        let cpu1 = c.sample();
        if !done {
            let have = c.got.seen.get(&id).map(|s| {
                watchers
                    .iter()
                    .filter(|a| s.get(a).is_some_and(|p| p.usable.is_some()))
                    .count()
            });
            bail!(
                "round {r}: {} of {} agents hold a usable record of {id} after {timeout:?}",
                have.unwrap_or(0),
                watchers.len()
            );
        }
        let seen = &c.got.seen[&id];
        let hello_at = c.got.hello_sent[&idx];
        let (nm_at, nm_bytes, nm_peers) = c.got.netmap[&idx];
        let per: Vec<&PeerSeen> = watchers.iter().map(|a| &seen[a]).collect();
        let last_usable = per
            .iter()
            .filter_map(|p| p.usable)
            .max()
            .unwrap_or(hello_at);
        let first_from_enrol: Vec<f64> = per.iter().map(|p| ms(enrol_sent, p.first)).collect();
        let first_from_enrolled: Vec<f64> = per.iter().map(|p| ms(enrolled_at, p.first)).collect();
        let usable_from_hello: Vec<f64> = per
            .iter()
            .filter_map(|p| p.usable)
            .map(|u| ms(hello_at, u))
            .collect();
        let mut n_deltas: Vec<usize> = per.iter().map(|p| p.deltas.len()).collect();
        n_deltas.sort_unstable();
        let mut d_bytes: Vec<f64> = per
            .iter()
            .flat_map(|p| p.deltas.iter().map(|(b, _)| *b as f64))
            .collect();
        d_bytes.sort_by(f64::total_cmp);
        let mut d_changes: Vec<usize> = per
            .iter()
            .flat_map(|p| p.deltas.iter().map(|(_, ch)| *ch))
            .collect();
        d_changes.sort_unstable();
        let per_agent_bytes: Vec<f64> = per
            .iter()
            .map(|p| p.deltas.iter().map(|(b, _)| *b as f64).sum())
            .collect();
        let fleet_bytes: f64 = per_agent_bytes.iter().sum();
        println!(
            "round {r}: new member {id} (agent {idx}), {} existing agents watching",
            watchers.len()
        );
        println!(
            "  enrolment: Enrol sent -> Enrolled {:.1} ms; Enrolled -> OverlayHello sent {:.1} ms (mTLS connect, Hello, Inventory); OverlayHello -> its full netmap {:.1} ms",
            ms(enrol_sent, enrolled_at),
            ms(enrolled_at, hello_at),
            ms(hello_at, nm_at)
        );
        println!(
            "  first record at existing agents, from Enrol sent:     {}",
            dist(first_from_enrol)
        );
        println!(
            "  first record at existing agents, from Enrolled:       {}",
            dist(first_from_enrolled)
        );
        println!(
            "  usable record (endpoint + key), from OverlayHello:    {}",
            dist(usable_from_hello)
        );
        println!(
            "  total convergence: Enrol sent -> last agent usable {:.1} ms; OverlayHello -> last agent usable {:.1} ms",
            ms(enrol_sent, last_usable),
            ms(hello_at, last_usable)
        );
        println!(
            "  bytes: newcomer's full netmap {nm_bytes} B ({nm_peers} peers, {:.0} B/peer); per existing agent {}..{} deltas naming it, each {:.0}..{:.0} B ({}..{} changes), {:.0} B per agent, {:.1} KiB fleet-wide; {} deltas in all during the round",
            nm_bytes as f64 / nm_peers.max(1) as f64,
            n_deltas.first().copied().unwrap_or(0),
            n_deltas.last().copied().unwrap_or(0),
            pct_f(&d_bytes, 0.0),
            pct_f(&d_bytes, 1.0),
            d_changes.first().copied().unwrap_or(0),
            d_changes.last().copied().unwrap_or(0),
            fleet_bytes / per.len().max(1) as f64,
            fleet_bytes / 1024.0,
            sh.deltas.load(Ordering::Relaxed) - deltas0,
        );
        println!("  {}", c.cpu_line(cpu0, cpu1));
        if let (Some(a), Some(b)) = (cpu0, cpu1) {
            cpu_total += (b.cpu_ticks - a.cpu_ticks) as f64 / clk_tck();
            wall_total += (b.at - a.at).as_secs_f64();
        }
        c.quiesce(Duration::from_millis(500)).await;
    }
    if wall_total > 0.0 {
        println!(
            "rounds: controller CPU {cpu_total:.2} s over {wall_total:.2} s of rounds ({:.0} % of one core)",
            cpu_total * 100.0 / wall_total
        );
    }
    println!(
        "overlay messages: {} Observed, {} full netmaps, {} deltas ({:.1} MiB), {} gaps, {} unexpected; {} sessions lost",
        sh.observed.load(Ordering::Relaxed),
        sh.netmaps.load(Ordering::Relaxed),
        sh.deltas.load(Ordering::Relaxed),
        sh.delta_bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
        sh.gaps.load(Ordering::Relaxed),
        sh.unexpected.load(Ordering::Relaxed),
        c.counters.session_errors.load(Ordering::Relaxed),
    );
    if sh.gaps.load(Ordering::Relaxed) > 0 || sh.unexpected.load(Ordering::Relaxed) > 0 {
        bail!("netmap gaps or unexpected messages");
    }
    Ok(())
}
