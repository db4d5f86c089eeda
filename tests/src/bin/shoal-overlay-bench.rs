//! `shoal-overlay-bench`: the overlay datapath benchmark. Two agents on one LAN (a bridge with veth
//! pairs, each host in its own network namespace: the "veth underlay"), and in one run:
//!
//! - ping RTT (`ping -c N -i 0.05 -q`, avg and mdev) and iperf3 TCP throughput with 1 and 4 streams
//!   from agent 1 to agent 2, over (a) the underlay addresses, (b) shoal's overlay (`shoal0`), and
//!   (c) a userspace WireGuard tunnel made with boringtun-cli and `wg` (wireguard-tools);
//! - CPU per gigabit: utime + stime (from `/proc/<pid>/stat`) of the two tunnel processes (the
//!   agents, or the two boringtun-cli processes) across each iperf3 run, divided by the gigabits
//!   received;
//! - the outer QUIC congestion controller against inner TCP: the overlay runs again with the agents
//!   started with `--overlay-cc newreno` and `--overlay-cc bbr` (a fresh fleet each), clean and
//!   with random loss (default 1%) of the packets arriving on agent 2's LAN interface, next to the
//!   underlay and boringtun under the same loss. The loss is an iptables `statistic --mode random`
//!   DROP rule in agent 2's INPUT chain rather than netem, which this kernel lacks (`sch_netem`);
//!   for random loss in one direction (the data direction, agent 1 -> agent 2) the two are
//!   equivalent.
//! - the relay path (`--relay MBIT,…`): for each per-pair budget a fresh fleet whose controller runs
//!   with `--relay-pair-mbit MBIT`; direct UDP between the two agents' LAN addresses is dropped
//!   (iptables OUTPUT rules in each agent's namespace; the controller stays reachable) until
//!   `shoalctl overlay paths` says `relay` both ways, then ping and iperf3 (1 and 4 streams) over
//!   shoal0 through the controller, with the controller's CPU per Gbit next to the agents', the
//!   relay's refusal counters (`GET /v1/refusals`) across each run, and the latency of `shoalctl
//!   nodes list` while the pair pushes (the controller's own service under relay load).
//!
//! Needs root, `iperf3`, `ping`, `ss` (iproute2), `iptables`, and for the WireGuard row `wg`
//! (wireguard-tools) and boringtun-cli (`cargo install boringtun-cli --locked --root
//! target/bench-tools`). A missing WireGuard tool prints a SKIP line for that row. Exits non-zero
//! only when the setup fails (no root, a fleet that does not come up, no direct path); a
//! measurement that fails shows as FAILED in the table.
//!
//! The figures in docs/performance.md need release binaries: `cargo build --release --workspace
//! --bins`, then `target/release/shoal-overlay-bench` (the fleet binaries are taken from the
//! directory the bench runs from, or from `$SHOAL_BIN_DIR`).

use shoal_tests::netns::{ipv4_of as tap_addr, run_in as in_ns};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use shoal_tests::process::output_with_timeout;
use shoal_tests::{eventually, Fleet, FleetConfig, Proc, ProcSpec};

const USAGE: &str = "\
usage: shoal-overlay-bench [--time SECS] [--pings N] [--cc LIST] [--loss PCT]... [--no-loss]
                           [--boringtun PATH] [--no-boringtun] [--agent-arg ARG]...
                           [--controller-arg ARG]... [--relay MBIT,...] [--only-relay]

Starts a controller and two agents, each in its own network namespace on one veth/bridge LAN, and
measures ping RTT and iperf3 TCP throughput (1 and 4 streams) from agent 1 to agent 2 over the
underlay, over shoal's overlay (shoal0) and over boringtun (userspace WireGuard); then repeats the
overlay runs for each outer congestion controller, clean and under each random loss rate.

  --time SECS       length of each iperf3 run (default 10)
  --pings N         pings per RTT figure, 50 ms apart (default 50)
  --cc LIST         comma-separated --overlay-cc values to compare (default cubic,newreno,bbr);
                    the first is the one of the main comparison
  --loss PCT        also measure with PCT % of the packets arriving at agent 2 dropped at random
                    (iptables statistic; repeatable; default 1)
  --no-loss         no runs with loss
  --boringtun PATH  the boringtun-cli binary (default: target/bench-tools/bin/boringtun-cli next to
                    this binary's target dir, then $PATH)
  --no-boringtun    skip the WireGuard row
  --agent-arg ARG   append ARG to every agent's command line (repeatable; e.g. --agent-arg
                    --threads --agent-arg 2), to compare agent settings with one build
  --controller-arg ARG
                    append ARG to the controller's command line (repeatable)
  --relay MBIT,...  also measure the relay path: per value a fresh fleet whose controller runs with
                    --relay-pair-mbit MBIT, direct UDP between the agents blocked (the relay's
                    per-sender budget, 16 MiB/s = 134 Mbit/s, still applies above it); the value
                    `unbounded` raises both budgets to 100000 Mbit/s (--relay-sender-mbit too)
  --only-relay      only the relay runs (default: --relay 64,unbounded)
  -h, --help        this text

Needs root. Fleet binaries come from the directory of this binary, or from $SHOAL_BIN_DIR; build them
with `cargo build --release --workspace --bins` for meaningful figures.";

/// Deadline for agents to bring `shoal0` up.
const TAP_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for the direct path between the two agents.
const PATH_TIMEOUT: Duration = Duration::from_secs(40);
/// iperf3's port in agent 2's namespace.
const IPERF_PORT: u16 = 5201;
/// WireGuard's UDP port on both sides.
const WG_PORT: u16 = 51820;
/// WireGuard's MTU, as wg-quick picks it over a 1500-byte underlay.
const WG_MTU: u32 = 1420;

#[derive(Debug, Clone)]
struct Args {
    time: u32,
    pings: u32,
    ccs: Vec<String>,
    loss: Vec<f64>,
    boringtun: Option<PathBuf>,
    no_boringtun: bool,
    agent_args: Vec<String>,
    controller_args: Vec<String>,
    /// The controller's budgets of each relay run.
    relay: Vec<RelayBudget>,
    only_relay: bool,
}

fn parse_args() -> Result<Option<Args>> {
    let mut args = Args {
        time: 10,
        pings: 50,
        ccs: vec!["cubic".into(), "newreno".into(), "bbr".into()],
        loss: vec![1.0],
        boringtun: None,
        no_boringtun: false,
        agent_args: Vec::new(),
        controller_args: Vec::new(),
        relay: Vec::new(),
        only_relay: false,
    };
    let mut loss_given = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--time" => {
                let v = value("--time")?;
                args.time = v.parse().with_context(|| format!("--time {v:?}"))?;
                ensure!((1..=600).contains(&args.time), "--time must be 1..=600");
            }
            "--pings" => {
                let v = value("--pings")?;
                args.pings = v.parse().with_context(|| format!("--pings {v:?}"))?;
                ensure!(
                    (1..=10_000).contains(&args.pings),
                    "--pings must be 1..=10000"
                );
            }
            "--cc" => {
                let v = value("--cc")?;
                args.ccs = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                ensure!(!args.ccs.is_empty(), "--cc needs at least one controller");
            }
            "--loss" => {
                if !loss_given {
                    args.loss.clear();
                    loss_given = true;
                }
                let v = value("--loss")?;
                let pct: f64 = v.parse().with_context(|| format!("--loss {v:?}"))?;
                ensure!(
                    pct > 0.0 && pct < 100.0,
                    "--loss must be between 0 and 100 (percent)"
                );
                args.loss.push(pct);
            }
            "--no-loss" => {
                args.loss.clear();
                loss_given = true;
            }
            "--boringtun" => args.boringtun = Some(PathBuf::from(value("--boringtun")?)),
            "--no-boringtun" => args.no_boringtun = true,
            "--agent-arg" => args.agent_args.push(value("--agent-arg")?),
            "--controller-arg" => args.controller_args.push(value("--controller-arg")?),
            "--relay" => {
                let v = value("--relay")?;
                for b in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    if b == "unbounded" {
                        args.relay.push(RelayBudget::UNBOUNDED);
                        continue;
                    }
                    let mbit: f64 = b.parse().with_context(|| format!("--relay {b:?}"))?;
                    // The controller's own floor (one datagram per quarter second of burst).
                    ensure!(
                        mbit.is_finite() && mbit >= 0.05,
                        "--relay budgets must be at least 0.05 Mbit/s"
                    );
                    args.relay.push(RelayBudget {
                        pair: mbit,
                        sender: None,
                    });
                }
                ensure!(!args.relay.is_empty(), "--relay needs at least one budget");
            }
            "--only-relay" => args.only_relay = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    if args.only_relay && args.relay.is_empty() {
        args.relay = vec![
            RelayBudget {
                pair: 64.0,
                sender: None,
            },
            RelayBudget::UNBOUNDED,
        ];
    }
    Ok(Some(args))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-overlay-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-overlay-bench: setup failed: {e:?}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Measurements

/// `ping -q` summary.
#[derive(Debug, Clone, Copy)]
struct PingStats {
    avg_ms: f64,
    mdev_ms: f64,
    loss_pct: f64,
}

/// One iperf3 run.
#[derive(Debug, Clone, Copy)]
struct IperfStats {
    /// Receiver-side goodput.
    gbps: f64,
    /// Bytes the receiver got.
    bytes: u64,
    /// Sender's TCP retransmits.
    retransmits: u64,
    /// CPU seconds (utime + stime) of the tunnel processes across the run, if there are any.
    cpu_s: Option<f64>,
    /// CPU seconds of the relaying controller across the run, on relayed paths.
    relay_cpu_s: Option<f64>,
}

impl IperfStats {
    fn cpu_per_gbit(&self) -> Option<f64> {
        per_gbit(self.cpu_s, self.bytes)
    }

    fn relay_cpu_per_gbit(&self) -> Option<f64> {
        per_gbit(self.relay_cpu_s, self.bytes)
    }
}

/// CPU seconds per gigabit received.
fn per_gbit(cpu_s: Option<f64>, bytes: u64) -> Option<f64> {
    let gbit = bytes as f64 * 8.0 / 1e9;
    cpu_s.filter(|_| gbit > 0.0).map(|c| c / gbit)
}

type Measured<T> = std::result::Result<T, String>;

/// One row: a path (and condition) with its RTT and two throughput runs.
#[derive(Debug)]
struct Row {
    label: String,
    ping: Measured<PingStats>,
    p1: Measured<IperfStats>,
    p4: Measured<IperfStats>,
}

/// A measurement's result with its error chain as text.
fn m<T>(r: Result<T>) -> Measured<T> {
    r.map_err(|e| format!("{e:#}"))
}

fn ping(ns: &str, to: Ipv4Addr, count: u32) -> Result<PingStats> {
    // Warm-up: neighbour resolution, and for the overlay the switch's MAC learning.
    in_ns(
        ns,
        "ping",
        &["-c", "3", "-i", "0.05", "-W", "1", "-q", &to.to_string()],
        Duration::from_secs(10),
    )?;
    let timeout = Duration::from_secs(u64::from(count) / 10 + 20);
    let out = in_ns(
        ns,
        "ping",
        &[
            "-c",
            &count.to_string(),
            "-i",
            "0.05",
            "-W",
            "1",
            "-q",
            &to.to_string(),
        ],
        timeout,
    )?;
    parse_ping(&out)
}

/// Parses `… 2% packet loss …` and `rtt min/avg/max/mdev = 0.035/0.052/0.103/0.012 ms`.
fn parse_ping(out: &str) -> Result<PingStats> {
    let loss_pct = out
        .split(',')
        .find(|p| p.contains("packet loss"))
        .and_then(|p| p.trim().split('%').next())
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no packet loss figure in ping output: {out}"))?;
    let line = out
        .lines()
        .find(|l| l.starts_with("rtt") || l.starts_with("round-trip"))
        .with_context(|| format!("no rtt line in ping output: {out}"))?;
    let nums: Vec<f64> = line
        .split('=')
        .nth(1)
        .map(|v| {
            // ping appends ", pipe N" when several echoes were outstanding at once.
            v.split(',')
                .next()
                .unwrap_or_default()
                .trim()
                .trim_end_matches("ms")
                .trim()
                .split('/')
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    ensure!(nums.len() == 4, "unexpected rtt line {line:?}");
    Ok(PingStats {
        avg_ms: nums[1],
        mdev_ms: nums[3],
        loss_pct,
    })
}

/// utime + stime of `pid` (all its threads), in seconds.
fn cpu_seconds(pid: u32, ticks_per_s: f64) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may contain spaces) start at field 3 (state); utime is 14,
    // stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/pid/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<f64> {
        Ok(f.get(i - 3)
            .context("short /proc/pid/stat")?
            .parse::<u64>()? as f64)
    };
    Ok((field(14)? + field(15)?) / ticks_per_s)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

struct Bench {
    args: Args,
    ticks: f64,
}

impl Bench {
    fn total_cpu(&self, pids: &[u32]) -> Result<f64> {
        pids.iter().map(|p| cpu_seconds(*p, self.ticks)).sum()
    }

    /// One iperf3 TCP run from namespace `ns` to `to` with `streams` parallel streams; CPU of
    /// `pids` (and of the relaying controller `relay`, if any) around it.
    fn iperf(
        &self,
        ns: &str,
        to: Ipv4Addr,
        streams: u32,
        pids: &[u32],
        relay: Option<u32>,
    ) -> Result<IperfStats> {
        let time = self.args.time.to_string();
        let streams_s = streams.to_string();
        let port = IPERF_PORT.to_string();
        let cmd_args = [
            "-c",
            &to.to_string(),
            "-p",
            &port,
            "-t",
            &time,
            "-P",
            &streams_s,
            "-J",
        ];
        let timeout = Duration::from_secs(u64::from(self.args.time) + 40);
        // The server takes one test at a time and needs a moment between tests: retry while it is
        // busy.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let before = self.total_cpu(pids)?;
            let relay_before = relay.map(|p| cpu_seconds(p, self.ticks)).transpose()?;
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns, "iperf3"]).args(cmd_args);
            let out = output_with_timeout(&mut cmd, timeout)?;
            let after = self.total_cpu(pids)?;
            let relay_after = relay.map(|p| cpu_seconds(p, self.ticks)).transpose()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let json: Value = serde_json::from_str(&text).with_context(|| {
                format!(
                    "iperf3 printed no JSON ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
            if let Some(err) = json["error"].as_str() {
                if err.contains("busy") && attempt < 20 {
                    std::thread::sleep(Duration::from_millis(250));
                    continue;
                }
                bail!("iperf3: {err}");
            }
            let end = &json["end"];
            let bytes = end["sum_received"]["bytes"]
                .as_u64()
                .context("no end.sum_received.bytes")?;
            let gbps = end["sum_received"]["bits_per_second"]
                .as_f64()
                .context("no end.sum_received.bits_per_second")?
                / 1e9;
            let retransmits = end["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
            let cpu_s = (!pids.is_empty()).then_some(after - before);
            let relay_cpu_s = relay_before.zip(relay_after).map(|(b, a)| a - b);
            return Ok(IperfStats {
                gbps,
                bytes,
                retransmits,
                cpu_s,
                relay_cpu_s,
            });
        }
    }

    /// Ping and both iperf3 runs over one path.
    fn row(&self, label: impl Into<String>, ns: &str, to: Ipv4Addr, pids: &[u32]) -> Row {
        let label = label.into();
        eprintln!(
            "[bench] {label}: ping {to}, iperf3 -P 1 and -P 4 for {} s each…",
            self.args.time
        );
        let row = Row {
            label,
            ping: m(ping(ns, to, self.args.pings)),
            p1: m(self.iperf(ns, to, 1, pids, None)),
            p4: m(self.iperf(ns, to, 4, pids, None)),
        };
        eprintln!("[bench]   {}", brief_row(&row));
        row
    }

    /// [`Bench::row`] with `pct` % of the packets arriving on interface `at.1` in namespace `at.0`
    /// dropped.
    fn lossy_row(
        &self,
        label: String,
        at: (&str, &str),
        pct: f64,
        ns: &str,
        to: Ipv4Addr,
        pids: &[u32],
    ) -> Row {
        let _loss = match loss(at.0, at.1, pct) {
            Ok(n) => n,
            Err(e) => {
                let err = format!("loss rule: {e:#}");
                return Row {
                    label,
                    ping: Err(err.clone()),
                    p1: Err(err.clone()),
                    p4: Err(err),
                };
            }
        };
        self.row(label, ns, to, pids)
    }
}

/// An iptables rule inserted at the top of its chain in a namespace, removed on drop.
struct Rule {
    ns: String,
    rule: Vec<String>,
}

impl Rule {
    /// `iptables -I CHAIN ARGS…` in `ns`; `rule` starts with the chain.
    fn insert(ns: &str, rule: Vec<String>) -> Result<Rule> {
        let mut args = vec!["-w", "-I"];
        args.extend(rule.iter().map(String::as_str));
        in_ns(ns, "iptables", &args, Duration::from_secs(10))?;
        Ok(Rule {
            ns: ns.into(),
            rule,
        })
    }
}

impl Drop for Rule {
    fn drop(&mut self) {
        let mut args = vec!["-w", "-D"];
        args.extend(self.rule.iter().map(String::as_str));
        let _ = in_ns(&self.ns, "iptables", &args, Duration::from_secs(10));
    }
}

/// Random loss of the packets arriving on an interface: an iptables DROP rule with `statistic
/// --mode random` at the top of the INPUT chain of a namespace, removed on drop.
fn loss(ns: &str, iface: &str, pct: f64) -> Result<Rule> {
    let probability = format!("{:.4}", pct / 100.0);
    let rule: Vec<String> = [
        "INPUT",
        "-i",
        iface,
        "-m",
        "statistic",
        "--mode",
        "random",
        "--probability",
        &probability,
        "-j",
        "DROP",
    ]
    .map(String::from)
    .to_vec();
    Rule::insert(ns, rule)
}

// ---------------------------------------------------------------------------------------------------
// Fleets

/// A running two-agent fleet with its overlay addresses and an iperf3 server in agent 2's
/// namespace.
struct TwoAgents {
    fleet: Fleet,
    ns: [String; 2],
    lan: [Ipv4Addr; 2],
    iface: [String; 2],
    overlay: [Ipv4Addr; 2],
    agent_pids: Vec<u32>,
    controller_pid: u32,
    _iperf_server: Proc,
}

impl TwoAgents {
    fn start(cc: &str, extra: &[String], controller_args: &[String]) -> Result<TwoAgents> {
        eprintln!("[bench] starting a controller {controller_args:?} and 2 agents with --overlay-cc {cc} {extra:?}…");
        let mut agent_args = vec!["--overlay-cc".into(), cc.into()];
        agent_args.extend_from_slice(extra);
        let cfg = FleetConfig {
            machine_id_prefix: "bench".into(),
            agent_args,
            controller_args: controller_args.to_vec(),
            ..FleetConfig::fast().agents(2)
        };
        let mut fleet = Fleet::start(cfg)?;
        let controller_pid = fleet.controller().pid().context("controller not running")?;
        let agents = fleet.agents();
        let ns = [agents[0].netns.clone(), agents[1].netns.clone()];
        let lan = [agents[0].addr, agents[1].addr];
        let iface = [agents[0].iface.clone(), agents[1].iface.clone()];
        let overlay = eventually(
            TAP_TIMEOUT,
            "both agents have shoal0 with an IPv4 address",
            || Ok([tap_addr(&ns[0], "shoal0")?, tap_addr(&ns[1], "shoal0")?]),
        )?;
        wait_path(&fleet, "direct")?;
        let agent_pids = agents
            .iter()
            .map(|a| a.proc.pid().context("agent not running"))
            .collect::<Result<Vec<_>>>()?;
        let iperf_server = ProcSpec::new("iperf3-server", "iperf3", fleet.dir().join("logs"))
            .netns(&ns[1])
            .args(["-s", "-p", &IPERF_PORT.to_string()])
            .spawn()?;
        eventually(
            Duration::from_secs(10),
            "the iperf3 server to listen",
            || {
                let out = in_ns(
                    &ns[1],
                    "ss",
                    &["-Hltn", &format!("sport = :{IPERF_PORT}")],
                    Duration::from_secs(5),
                )?;
                ensure!(!out.trim().is_empty(), "not listening yet");
                Ok(())
            },
        )?;
        // The overlay answers before measuring.
        eventually(
            Duration::from_secs(20),
            "agent 1 pings agent 2 over shoal0",
            || {
                in_ns(
                    &ns[0],
                    "ping",
                    &["-c", "1", "-W", "1", &overlay[1].to_string()],
                    Duration::from_secs(5),
                )
            },
        )?;
        eprintln!(
            "[bench] fleet up: agent 1 {} (shoal0 {}), agent 2 {} (shoal0 {}), direct path",
            lan[0], overlay[0], lan[1], overlay[1]
        );
        Ok(TwoAgents {
            fleet,
            ns,
            lan,
            iface,
            overlay,
            agent_pids,
            controller_pid,
            _iperf_server: iperf_server,
        })
    }

    /// An error if the controller or an agent died during the measurements.
    fn check(&mut self) -> Result<()> {
        self.fleet.check_running()
    }
}

/// Waits until `shoalctl overlay paths` reports a path of `kind` (`direct`, `relay`) between agents
/// 1 and 2, both ways.
fn wait_path(fleet: &Fleet, kind: &str) -> Result<()> {
    let (a, b) = (fleet.node_id(0)?, fleet.node_id(1)?);
    eventually(
        PATH_TIMEOUT,
        &format!("a {kind} path between agents 1 and 2 both ways"),
        || {
            let v = fleet.ctl_json(&["overlay", "paths"])?;
            let all = v
                .as_array()
                .with_context(|| format!("overlay paths is not an array: {v}"))?;
            let found: Vec<&Value> = all
                .iter()
                .filter(|p| {
                    (p["from"] == a.as_str() && p["to"] == b.as_str())
                        || (p["from"] == b.as_str() && p["to"] == a.as_str())
                })
                .collect();
            ensure!(
                found.len() == 2 && found.iter().all(|p| p["kind"] == kind),
                "paths between {a} and {b}: {found:?}"
            );
            Ok(())
        },
    )
}

// ---------------------------------------------------------------------------------------------------
// The relay path

/// The relay's default per-sender byte budget (`OverlayLimits::relay_bytes`: 16 MiB/s), in Mbit/s:
/// above it a larger per-pair budget changes nothing.
const RELAY_SENDER_MBIT: f64 = 16.0 * 1024.0 * 1024.0 * 8.0 / 1e6;

/// The relay budgets of one relay run.
#[derive(Debug, Clone, Copy)]
struct RelayBudget {
    /// `--relay-pair-mbit`.
    pair: f64,
    /// `--relay-sender-mbit`, if not the default.
    sender: Option<f64>,
}

impl RelayBudget {
    /// Far above what one machine relays: what the relay carries when nothing bounds it.
    const UNBOUNDED: RelayBudget = RelayBudget {
        pair: 100_000.0,
        sender: Some(100_000.0),
    };

    /// The rate that binds: the pair's or the sender's budget.
    fn bound(&self) -> f64 {
        self.pair.min(self.sender.unwrap_or(RELAY_SENDER_MBIT))
    }

    fn bounded(&self) -> bool {
        self.bound() < RelayBudget::UNBOUNDED.pair
    }
}

impl std::fmt::Display for RelayBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.sender {
            None => write!(f, "pair {}", self.pair),
            Some(s) => write!(f, "pair {}, sender {s}", self.pair),
        }
    }
}
/// Pause between two `shoalctl nodes list` samples.
const CTL_SAMPLE_GAP: Duration = Duration::from_millis(200);

/// Drops direct UDP between the two agents: an OUTPUT rule in each agent's namespace for UDP to
/// the other agent's LAN address. The controller stays reachable, so the pair falls back to the
/// controller's relay.
fn block_direct(two: &TwoAgents) -> Result<[Rule; 2]> {
    let rule = |i: usize| {
        let other = two.lan[1 - i].to_string();
        let rule = ["OUTPUT", "-p", "udp", "-d", &other, "-j", "DROP"]
            .map(String::from)
            .to_vec();
        Rule::insert(&two.ns[i], rule)
    };
    Ok([rule(0)?, rule(1)?])
}

/// The relay's refusal counters (`GET /v1/refusals`, `overlay`).
#[derive(Debug, Clone, Copy)]
struct RelayRefusals {
    /// Beyond the pair's budget (`relay_pair_rate_limited`).
    pair: u64,
    /// Beyond the sender's budget (`relay_rate_limited`).
    sender: u64,
}

fn relay_refusals(fleet: &Fleet) -> Result<RelayRefusals> {
    let v = fleet.api_json("/v1/refusals")?;
    let count = |name: &str| {
        v["overlay"][name]
            .as_u64()
            .with_context(|| format!("no overlay.{name} in /v1/refusals: {v}"))
    };
    Ok(RelayRefusals {
        pair: count("relay_pair_rate_limited")?,
        sender: count("relay_rate_limited")?,
    })
}

/// Wall-clock times of `shoalctl nodes list` calls.
#[derive(Debug, Clone, Copy)]
struct Latency {
    median_ms: f64,
    max_ms: f64,
    samples: usize,
}

/// How to run `shoalctl` against the fleet from another thread.
struct Ctl {
    bin: PathBuf,
    ns: String,
    conf: PathBuf,
}

impl Ctl {
    fn of(fleet: &Fleet) -> Ctl {
        Ctl {
            bin: fleet.bins().ctl.clone(),
            ns: fleet.controller_ns().to_owned(),
            conf: fleet.admin_conf(),
        }
    }

    /// One `shoalctl nodes list -o json`, timed.
    fn nodes_list(&self) -> Result<Duration> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(&self.bin)
            .arg("--config")
            .arg(&self.conf)
            .args(["nodes", "list", "-o", "json"]);
        let start = std::time::Instant::now();
        let out = output_with_timeout(&mut cmd, Duration::from_secs(30))?;
        let took = start.elapsed();
        ensure!(
            out.status.success(),
            "shoalctl nodes list failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(took)
    }

    /// `nodes list` every [`CTL_SAMPLE_GAP`]: `n` times, or until `stop` is set (at least once).
    fn sample(&self, n: usize, stop: &std::sync::atomic::AtomicBool) -> Result<Latency> {
        use std::sync::atomic::Ordering;
        let mut ms = Vec::new();
        while ms.len() < n && (ms.is_empty() || !stop.load(Ordering::Relaxed)) {
            ms.push(self.nodes_list()?.as_secs_f64() * 1e3);
            std::thread::sleep(CTL_SAMPLE_GAP);
        }
        ms.sort_by(f64::total_cmp);
        Ok(Latency {
            median_ms: ms[ms.len() / 2],
            max_ms: ms[ms.len() - 1],
            samples: ms.len(),
        })
    }
}

/// One iperf3 run over the relay, with what the controller did meanwhile.
#[derive(Debug)]
struct RelayRun {
    streams: u32,
    iperf: Measured<IperfStats>,
    /// Refusals during the run.
    refused: Measured<RelayRefusals>,
    /// `shoalctl nodes list` during the run.
    ctl: Measured<Latency>,
}

/// One relay budget's figures.
#[derive(Debug)]
struct RelayRow {
    budget: RelayBudget,
    /// Load average before and after the measurements.
    load: (String, String),
    ping: Measured<PingStats>,
    /// `shoalctl nodes list` before any load.
    idle_ctl: Measured<Latency>,
    runs: Vec<RelayRun>,
}

impl Bench {
    /// A fresh fleet whose controller relays within `budget`; direct UDP between
    /// the agents blocked; ping and iperf3 1 and 4 streams over the relay.
    fn relay_row(&self, budget: RelayBudget) -> Result<RelayRow> {
        let mut controller_args = self.args.controller_args.clone();
        controller_args.extend(["--relay-pair-mbit".into(), budget.pair.to_string()]);
        if let Some(s) = budget.sender {
            controller_args.extend(["--relay-sender-mbit".into(), s.to_string()]);
        }
        let mut two = TwoAgents::start(&self.args.ccs[0], &self.args.agent_args, &controller_args)?;
        let _blocked = block_direct(&two)?;
        wait_path(&two.fleet, "relay")?;
        eprintln!(
            "[bench] relay budget {budget} Mbit/s: direct UDP blocked, the pair is relayed both ways"
        );
        let load_before = load_average();
        let ns = two.ns[0].clone();
        let to = two.overlay[1];
        let ctl = Ctl::of(&two.fleet);
        let never = std::sync::atomic::AtomicBool::new(false);
        let idle_ctl = m(ctl.sample(10, &never));
        let ping = m(ping(&ns, to, self.args.pings));
        let mut runs = Vec::new();
        for streams in [1, 4] {
            let before = relay_refusals(&two.fleet);
            let stop = std::sync::atomic::AtomicBool::new(false);
            let (iperf, ctl_lat) = std::thread::scope(|s| {
                let sampler = s.spawn(|| ctl.sample(usize::MAX, &stop));
                let r = self.iperf(&ns, to, streams, &two.agent_pids, Some(two.controller_pid));
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let lat = sampler
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("the shoalctl sampler panicked")));
                (r, lat)
            });
            let refused = before.and_then(|b| {
                let a = relay_refusals(&two.fleet)?;
                Ok(RelayRefusals {
                    pair: a.pair - b.pair,
                    sender: a.sender - b.sender,
                })
            });
            let run = RelayRun {
                streams,
                iperf: m(iperf),
                refused: m(refused),
                ctl: m(ctl_lat),
            };
            eprintln!("[bench]   {}", brief_relay_run(budget, &run));
            runs.push(run);
        }
        // Still relayed at the end: the figures are the relay's.
        wait_path(&two.fleet, "relay")?;
        two.check()?;
        Ok(RelayRow {
            budget,
            load: (load_before, load_average()),
            ping,
            idle_ctl,
            runs,
        })
    }
}

fn fmt_latency(l: &Measured<Latency>) -> String {
    match l {
        Ok(l) => format!("{:.0} / {:.0} ({})", l.median_ms, l.max_ms, l.samples),
        Err(_) => "FAILED".into(),
    }
}

fn brief_relay_run(budget: RelayBudget, r: &RelayRun) -> String {
    let goodput = r
        .iperf
        .as_ref()
        .map_or("FAILED".into(), |s| format!("{:.1} Mbit/s", s.gbps * 1e3));
    let refused = r.refused.as_ref().map_or("?".into(), |c| {
        format!("{} pair / {} sender", c.pair, c.sender)
    });
    format!(
        "budget {budget} Mbit/s, {} stream(s): {goodput}; refused {refused}; shoalctl nodes list {} ms",
        r.streams,
        fmt_latency(&r.ctl)
    )
}

fn relay_table(rows: &[Measured<RelayRow>], budgets: &[RelayBudget]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| budget Mbit/s | RTT avg ± mdev (ms) | streams | goodput Mbit/s | / budget | retr | agents CPU s/Gbit | controller CPU s/Gbit | refused: pair / sender | `nodes list` ms under load (median / max (n)) | `nodes list` ms idle |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for (row, budget) in rows.iter().zip(budgets) {
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                let _ = writeln!(s, "| {budget} | FAILED: {e} |||||||||");
                continue;
            }
        };
        for run in &row.runs {
            let (goodput, share, retr, cpu, relay_cpu) = match &run.iperf {
                Ok(i) => (
                    format!("{:.1}", i.gbps * 1e3),
                    if row.budget.bounded() {
                        format!("{:.2}", i.gbps * 1e3 / row.budget.bound())
                    } else {
                        "—".into()
                    },
                    i.retransmits.to_string(),
                    i.cpu_per_gbit().map_or("—".into(), |c| format!("{c:.2}")),
                    i.relay_cpu_per_gbit()
                        .map_or("—".into(), |c| format!("{c:.2}")),
                ),
                Err(_) => ("FAILED".into(), "".into(), "".into(), "".into(), "".into()),
            };
            let refused = run
                .refused
                .as_ref()
                .map_or("FAILED".into(), |c| format!("{} / {}", c.pair, c.sender));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {goodput} | {share} | {retr} | {cpu} | {relay_cpu} | {refused} | {} | {} |",
                row.budget,
                fmt_ping(&row.ping),
                run.streams,
                fmt_latency(&run.ctl),
                fmt_latency(&row.idle_ctl),
            );
        }
    }
    s
}

/// The relay runs, one fleet per budget, and their report.
fn relay_report(bench: &Bench) -> String {
    let budgets = &bench.args.relay;
    let rows: Vec<Measured<RelayRow>> = budgets.iter().map(|&b| m(bench.relay_row(b))).collect();
    let mut out = format!(
        "\n## Relay path (direct UDP between the agents blocked; agent 1 -> controller -> agent 2; iperf3 -t {}; `/ budget` = goodput over the binding budget, the pair's or the sender's (default {RELAY_SENDER_MBIT:.0} Mbit/s))\n\n",
        bench.args.time
    );
    out.push_str(&relay_table(&rows, budgets));
    out.push('\n');
    for row in rows.iter().flatten() {
        let _ = writeln!(
            out,
            "load average, budget {}: {} before, {} after",
            row.budget, row.load.0, row.load.1
        );
    }
    for row in rows.iter().flatten() {
        let bound = row.budget.bound();
        for run in &row.runs {
            let Ok(i) = &run.iperf else { continue };
            let mbit = i.gbps * 1e3;
            if !row.budget.bounded() {
                let _ = writeln!(
                    out,
                    "relay, budget {}, {} stream(s): {mbit:.1} Mbit/s: what the relay carries unbounded",
                    row.budget, run.streams
                );
                continue;
            }
            let whose = if row.budget.pair <= bound {
                "pair"
            } else {
                "sender"
            };
            // 5 % for iperf3's accounting against a token bucket that starts full.
            let verdict = if mbit <= bound * 1.05 {
                format!("the {whose}'s budget holds")
            } else {
                format!("ABOVE the {whose}'s budget")
            };
            let _ = writeln!(
                out,
                "relay, budget {}, {} stream(s): {mbit:.1} Mbit/s of {bound:.1} ({:.0} %): {verdict}",
                row.budget,
                run.streams,
                100.0 * mbit / bound
            );
        }
    }
    for (row, budget) in rows.iter().zip(budgets) {
        if let Err(e) = row {
            let _ = writeln!(out, "FAILED relay run with budget {budget}: {e}");
        }
        if let Ok(r) = row {
            for run in &r.runs {
                for (what, e) in [
                    ("iperf3", run.iperf.as_ref().err()),
                    ("refusals", run.refused.as_ref().err()),
                    ("shoalctl", run.ctl.as_ref().err()),
                ] {
                    if let Some(e) = e {
                        let _ = writeln!(
                            out,
                            "FAILED relay budget {budget}, {} stream(s), {what}: {e}",
                            run.streams
                        );
                    }
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------
// boringtun

/// Two boringtun-cli processes, one per agent namespace, with a tunnel between them.
struct Boringtun {
    procs: Vec<Proc>,
    names: [String; 2],
    addrs: [Ipv4Addr; 2],
}

impl Boringtun {
    fn pids(&self) -> Vec<u32> {
        self.procs.iter().filter_map(Proc::pid).collect()
    }
}

impl Drop for Boringtun {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
        }
        for n in &self.names {
            let _ = std::fs::remove_file(uapi_socket(n));
        }
    }
}

fn uapi_socket(iface: &str) -> PathBuf {
    Path::new("/var/run/wireguard").join(format!("{iface}.sock"))
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// boringtun-cli: `--boringtun`, else `<target>/bench-tools/bin/boringtun-cli` (the target dir
/// being the parent of this binary's profile dir), else `$PATH`.
fn find_boringtun(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        ensure!(p.is_file(), "--boringtun {} does not exist", p.display());
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe()?;
    let in_target = exe
        .parent()
        .and_then(Path::parent)
        .map(|t| t.join("bench-tools/bin/boringtun-cli"));
    if let Some(p) = in_target.filter(|p| p.is_file()) {
        return Ok(p);
    }
    on_path("boringtun-cli").ok_or_else(|| {
        anyhow!("boringtun-cli not found: `cargo install boringtun-cli --locked --root target/bench-tools`, or put it on $PATH, or --boringtun PATH")
    })
}

fn wg(stdin: Option<&str>, args: &[&str]) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run `wg` (Debian package wireguard-tools; run scripts/deps)")?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .context("wg stdin")?
            .write_all(input.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "`wg {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn start_boringtun(two: &TwoAgents, bin: &Path) -> Result<Boringtun> {
    ensure!(
        on_path("wg").is_some(),
        "`wg` not found (Debian package wireguard-tools; run scripts/deps)"
    );
    let dir = two.fleet.dir().join("wireguard");
    std::fs::create_dir_all(&dir)?;
    // The UAPI sockets live in /var/run/wireguard, shared by every namespace: names unique per run.
    let id = std::process::id();
    let names = [format!("wgb{id}a"), format!("wgb{id}b")];
    let addrs = [
        Ipv4Addr::new(192, 168, 213, 1),
        Ipv4Addr::new(192, 168, 213, 2),
    ];
    let mut bt = Boringtun {
        procs: Vec::new(),
        names: names.clone(),
        addrs,
    };
    let mut keys = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let private = wg(None, &["genkey"])?;
        let public = wg(Some(&private), &["pubkey"])?;
        let key_file = dir.join(format!("{name}.key"));
        std::fs::write(&key_file, format!("{private}\n"))?;
        keys.push((key_file, public));
        let proc = ProcSpec::new(
            &format!("boringtun-{}", i + 1),
            bin,
            two.fleet.dir().join("logs"),
        )
        .netns(&two.ns[i])
        .args([name.as_str(), "--foreground", "--disable-drop-privileges"])
        .spawn()?;
        bt.procs.push(proc);
    }
    for (i, name) in names.iter().enumerate() {
        let proc = &mut bt.procs[i];
        eventually(
            Duration::from_secs(10),
            &format!("boringtun to create {name} and its UAPI socket"),
            || {
                if let Err(e) = proc.ensure_running() {
                    return Err(shoal_tests::abort(format!("{e:#}")));
                }
                ensure!(
                    uapi_socket(name).exists(),
                    "{} does not exist yet",
                    uapi_socket(name).display()
                );
                in_ns(
                    &two.ns[i],
                    "ip",
                    &["link", "show", "dev", name],
                    Duration::from_secs(5),
                )
                .map(drop)
            },
        )?;
    }
    for i in 0..2 {
        let other = 1 - i;
        let endpoint = format!("{}:{WG_PORT}", two.lan[other]);
        let allowed = format!("{}/32", addrs[other]);
        let key_file = keys[i].0.to_string_lossy().into_owned();
        let port = WG_PORT.to_string();
        in_ns(
            &two.ns[i],
            "wg",
            &[
                "set",
                &names[i],
                "private-key",
                &key_file,
                "listen-port",
                &port,
                "peer",
                &keys[other].1,
                "endpoint",
                &endpoint,
                "allowed-ips",
                &allowed,
            ],
            Duration::from_secs(10),
        )?;
        in_ns(
            &two.ns[i],
            "ip",
            &["addr", "add", &format!("{}/24", addrs[i]), "dev", &names[i]],
            Duration::from_secs(5),
        )?;
        in_ns(
            &two.ns[i],
            "ip",
            &[
                "link",
                "set",
                "dev",
                &names[i],
                "mtu",
                &WG_MTU.to_string(),
                "up",
            ],
            Duration::from_secs(5),
        )?;
    }
    eventually(
        Duration::from_secs(20),
        "agent 1 pings agent 2 over WireGuard",
        || {
            in_ns(
                &two.ns[0],
                "ping",
                &["-c", "1", "-W", "1", &addrs[1].to_string()],
                Duration::from_secs(5),
            )
        },
    )?;
    eprintln!(
        "[bench] boringtun tunnel up: {} ({}) <-> {} ({})",
        names[0], addrs[0], names[1], addrs[1]
    );
    Ok(bt)
}

// ---------------------------------------------------------------------------------------------------
// Output

fn fmt_ping(p: &Measured<PingStats>) -> String {
    match p {
        Ok(p) if p.loss_pct > 0.0 => {
            format!("{:.3} ± {:.3} ({}% lost)", p.avg_ms, p.mdev_ms, p.loss_pct)
        }
        Ok(p) => format!("{:.3} ± {:.3}", p.avg_ms, p.mdev_ms),
        Err(_) => "FAILED".into(),
    }
}

fn fmt_iperf(r: &Measured<IperfStats>) -> (String, String, String) {
    match r {
        Ok(s) => (
            format!("{:.3}", s.gbps),
            s.retransmits.to_string(),
            s.cpu_per_gbit().map_or("—".into(), |c| format!("{c:.2}")),
        ),
        Err(_) => ("FAILED".into(), "".into(), "".into()),
    }
}

fn brief_row(r: &Row) -> String {
    let (g1, _, c1) = fmt_iperf(&r.p1);
    let (g4, _, c4) = fmt_iperf(&r.p4);
    format!("rtt {} ms; 1 stream {g1} Gbit/s (cpu {c1} s/Gbit); 4 streams {g4} Gbit/s (cpu {c4} s/Gbit)", fmt_ping(&r.ping))
}

fn table(rows: &[&Row], underlay_rtt: Option<f64>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| path | RTT avg ± mdev (ms) | added RTT (ms) | 1 stream Gbit/s | retr | CPU s/Gbit | 4 streams Gbit/s | retr | CPU s/Gbit |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let added = match (&r.ping, underlay_rtt) {
            (Ok(p), Some(u)) => format!("{:+.3}", p.avg_ms - u),
            _ => "—".into(),
        };
        let (g1, r1, c1) = fmt_iperf(&r.p1);
        let (g4, r4, c4) = fmt_iperf(&r.p4);
        let _ = writeln!(
            s,
            "| {} | {} | {added} | {g1} | {r1} | {c1} | {g4} | {r4} | {c4} |",
            r.label,
            fmt_ping(&r.ping)
        );
    }
    s
}

fn failures(rows: &[&Row]) -> String {
    let mut s = String::new();
    for r in rows {
        for (what, e) in [
            ("ping", r.ping.as_ref().err()),
            ("iperf3 -P 1", r.p1.as_ref().err()),
            ("iperf3 -P 4", r.p4.as_ref().err()),
        ] {
            if let Some(e) = e {
                let _ = writeln!(s, "FAILED {} {what}: {e}", r.label);
            }
        }
    }
    s
}

fn gbps(r: &Measured<IperfStats>) -> Option<f64> {
    r.as_ref().ok().map(|s| s.gbps)
}

/// The issue-17 goals as ratios within this one run: overlay against boringtun and the underlay
/// measured on the same fleet minutes apart, so the machine's load cancels out as far as it can.
fn goal_ratios(main_rows: &[Row], impaired_rows: &[Row], main_cc: &str) -> String {
    let mut out = String::from("\n## Goals as ratios (this run)\n\n");
    let (underlay, overlay, bt) = (&main_rows[0], &main_rows[1], main_rows.get(2));
    let ratio = |o: Option<f64>, b: Option<f64>| match (o, b) {
        (Some(o), Some(b)) if b > 0.0 => Some(o / b),
        _ => None,
    };
    let mut line = |what: &str, value: Option<f64>, goal: &str, met: Option<bool>| {
        let v = value.map_or("—".into(), |v| format!("{v:.2}"));
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        let _ = writeln!(out, "{what}: {v} (goal {goal}: {verdict})");
    };
    let bt_p1 = bt.and_then(|b| gbps(&b.p1));
    let r = ratio(gbps(&overlay.p1), bt_p1);
    line(
        "1 stream, overlay / boringtun",
        r,
        ">= 5",
        r.map(|r| r >= 5.0),
    );
    let r = ratio(gbps(&overlay.p1), gbps(&underlay.p1));
    line(
        "1 stream, overlay / underlay",
        r,
        ">= 0.33",
        r.map(|r| r >= 1.0 / 3.0),
    );
    let r = ratio(gbps(&overlay.p4), gbps(&overlay.p1));
    line(
        "overlay, 4 streams / 1 stream",
        r,
        "> 1 (scales)",
        r.map(|r| r > 1.0),
    );
    let r = ratio(gbps(&overlay.p4), bt.and_then(|b| gbps(&b.p4)));
    line(
        "4 streams, overlay / boringtun",
        r,
        "ahead",
        r.map(|r| r > 1.0),
    );
    let added = |row: &Row| match (&row.ping, &underlay.ping) {
        (Ok(p), Ok(u)) => Some(p.avg_ms - u.avg_ms),
        _ => None,
    };
    let (ao, ab) = (added(overlay), bt.and_then(added));
    let r = ratio(ao, ab);
    line(
        "added RTT, overlay / boringtun",
        r,
        "<= 1",
        r.map(|r| r <= 1.0),
    );
    let lossy = |prefix: &str| {
        impaired_rows
            .iter()
            .find(|r| r.label.starts_with(prefix))
            .and_then(|r| gbps(&r.p1))
    };
    let ol = ratio(
        lossy(&format!("shoal overlay ({main_cc}), loss")),
        gbps(&overlay.p1),
    );
    let bl = ratio(lossy("boringtun, loss"), bt_p1);
    line(
        "overlay under loss / clean, 1 stream",
        ol,
        "no collapse (>= 0.5)",
        ol.map(|r| r >= 0.5),
    );
    line(
        "boringtun under loss / clean, 1 stream",
        bl,
        "reference",
        None,
    );
    let r = ratio(
        lossy(&format!("shoal overlay ({main_cc}), loss")),
        lossy("boringtun, loss"),
    );
    line(
        "1 stream under loss, overlay / boringtun",
        r,
        "ahead",
        r.map(|r| r > 1.0),
    );
    let cpu = |r: &Measured<IperfStats>| r.as_ref().ok().and_then(|s| s.cpu_per_gbit());
    let r = ratio(cpu(&overlay.p1), bt.and_then(|b| cpu(&b.p1)));
    let _ = writeln!(
        out,
        "CPU per Gbit, 1 stream: overlay {} s, boringtun {} s, ratio {}",
        cpu(&overlay.p1).map_or("—".into(), |v| format!("{v:.2}")),
        bt.and_then(|b| cpu(&b.p1))
            .map_or("—".into(), |v| format!("{v:.2}")),
        r.map_or("—".into(), |v| format!("{v:.2}"))
    );
    out
}

// ---------------------------------------------------------------------------------------------------

fn run(args: &Args) -> Result<()> {
    if let Some(reason) = shoal_tests::host_tests_unavailable() {
        bail!("cannot run here: {reason}");
    }
    for tool in ["iperf3", "ping", "ss", "iptables"] {
        ensure!(
            on_path(tool).is_some()
                || Path::new("/usr/sbin").join(tool).is_file()
                || Path::new("/sbin").join(tool).is_file(),
            "`{tool}` is missing; run scripts/deps"
        );
    }
    let bins = shoal_tests::Bins::locate()?;
    let started = SystemTime::now();
    let bench = Bench {
        args: args.clone(),
        ticks: clock_ticks(),
    };
    println!(
        "shoal-overlay-bench {} (load average {}): binaries {}; iperf3 -t {} ; ping -c {} -i 0.05; CC {:?}; loss {:?} %; agent args {:?}",
        humantime::format_rfc3339_seconds(started),
        load_average(),
        bins.dir.display(),
        args.time,
        args.pings,
        args.ccs,
        args.loss,
        args.agent_args
    );
    if bins.dir.components().any(|c| c.as_os_str() == "debug") {
        println!("WARNING: debug binaries ({}); build with `cargo build --release --workspace --bins` and run target/release/shoal-overlay-bench", bins.dir.display());
    }

    if !args.relay.is_empty() {
        println!(
            "relay budgets {:?}; controller args {:?}",
            args.relay, args.controller_args
        );
    }
    if args.only_relay {
        print!("{}", relay_report(&bench));
        print_total_time(started);
        return Ok(());
    }

    let main_cc = args.ccs[0].clone();
    let mut two = TwoAgents::start(&main_cc, &args.agent_args, &args.controller_args)?;
    let a_ns = two.ns[0].clone();

    // WireGuard first, so a setup problem shows before the long runs.
    let boringtun = if args.no_boringtun {
        println!("SKIP boringtun: --no-boringtun");
        None
    } else {
        match find_boringtun(args.boringtun.as_deref())
            .and_then(|bin| start_boringtun(&two, &bin).map(|b| (bin, b)))
        {
            Ok((bin, b)) => {
                println!("boringtun: {}", bin.display());
                Some(b)
            }
            Err(e) => {
                println!("SKIP boringtun: {e:#}");
                None
            }
        }
    };

    let mut main_rows = Vec::new();
    main_rows.push(bench.row("underlay (veth + bridge)", &a_ns, two.lan[1], &[]));
    main_rows.push(bench.row(
        format!("shoal overlay ({main_cc})"),
        &a_ns,
        two.overlay[1],
        &two.agent_pids,
    ));
    if let Some(bt) = &boringtun {
        main_rows.push(bench.row("boringtun (WireGuard)", &a_ns, bt.addrs[1], &bt.pids()));
    }
    two.check()?;

    // Lossy runs on the same fleet: underlay, overlay (main CC) and boringtun under each loss rate.
    let mut impaired_rows = Vec::new();
    let at = (two.ns[1].clone(), two.iface[1].clone());
    let at = (at.0.as_str(), at.1.as_str());
    for &pct in &args.loss {
        impaired_rows.push(bench.lossy_row(
            format!("underlay, loss {pct}%"),
            at,
            pct,
            &a_ns,
            two.lan[1],
            &[],
        ));
        impaired_rows.push(bench.lossy_row(
            format!("shoal overlay ({main_cc}), loss {pct}%"),
            at,
            pct,
            &a_ns,
            two.overlay[1],
            &two.agent_pids,
        ));
        if let Some(bt) = &boringtun {
            impaired_rows.push(bench.lossy_row(
                format!("boringtun, loss {pct}%"),
                at,
                pct,
                &a_ns,
                bt.addrs[1],
                &bt.pids(),
            ));
        }
    }
    two.check()?;
    drop(boringtun);
    drop(two);

    // The other congestion controllers, each on a fresh fleet.
    let mut cc_rows: Vec<(String, Vec<Row>)> = Vec::new();
    for cc in args.ccs.iter().skip(1) {
        let mut two = TwoAgents::start(cc, &args.agent_args, &args.controller_args)?;
        let ns = two.ns[0].clone();
        let mut rows = vec![bench.row(
            format!("shoal overlay ({cc})"),
            &ns,
            two.overlay[1],
            &two.agent_pids,
        )];
        let at = (two.ns[1].as_str(), two.iface[1].as_str());
        for &pct in &args.loss {
            rows.push(bench.lossy_row(
                format!("shoal overlay ({cc}), loss {pct}%"),
                at,
                pct,
                &ns,
                two.overlay[1],
                &two.agent_pids,
            ));
        }
        two.check()?;
        cc_rows.push((cc.clone(), rows));
    }

    // ------------------------------------------------------------------ report
    let underlay_rtt = main_rows[0].ping.as_ref().ok().map(|p| p.avg_ms);
    println!("\n## Clean underlay (agent 1 -> agent 2, iperf3 -t {}; CPU = utime+stime of both tunnel processes per Gbit received)\n", args.time);
    print!(
        "{}",
        table(&main_rows.iter().collect::<Vec<_>>(), underlay_rtt)
    );
    if !impaired_rows.is_empty() {
        println!("\n## Random loss of the packets arriving at agent 2 (data direction)\n");
        print!(
            "{}",
            table(&impaired_rows.iter().collect::<Vec<_>>(), underlay_rtt)
        );
    }

    // CC comparison: the main CC's rows come from the main fleet.
    let mut by_cc: Vec<(String, Vec<&Row>)> = Vec::new();
    let main_overlay: Vec<&Row> = std::iter::once(&main_rows[1])
        .chain(
            impaired_rows
                .iter()
                .filter(|r| r.label.starts_with(&format!("shoal overlay ({main_cc})"))),
        )
        .collect();
    by_cc.push((main_cc.clone(), main_overlay));
    for (cc, rows) in &cc_rows {
        by_cc.push((cc.clone(), rows.iter().collect()));
    }
    println!("\n## Outer congestion controller (overlay goodput, Gbit/s)\n");
    let mut header = String::from("| --overlay-cc | clean 1 stream | clean 4 streams |");
    let mut sep = String::from("|---|---|---|");
    for pct in &args.loss {
        let _ = write!(header, " loss {pct}% 1 stream | loss {pct}% 4 streams |");
        sep.push_str("---|---|");
    }
    header.push_str(" RTT (ms) | geo-mean |");
    sep.push_str("---|---|");
    println!("{header}\n{sep}");
    let mut best: Option<(String, f64)> = None;
    for (cc, rows) in &by_cc {
        let mut line = format!("| {cc} |");
        let mut vals = Vec::new();
        for r in rows {
            for v in [gbps(&r.p1), gbps(&r.p4)] {
                match v {
                    Some(g) => {
                        let _ = write!(line, " {g:.3} |");
                        vals.push(g);
                    }
                    None => line.push_str(" FAILED |"),
                }
            }
        }
        let rtt = rows.first().map_or("—".into(), |r| fmt_ping(&r.ping));
        let complete = vals.len() == rows.len() * 2 && vals.iter().all(|v| *v > 0.0);
        let geo =
            complete.then(|| (vals.iter().map(|v| v.ln()).sum::<f64>() / vals.len() as f64).exp());
        let _ = write!(
            line,
            " {rtt} | {} |",
            geo.map_or("—".into(), |g| format!("{g:.3}"))
        );
        println!("{line}");
        if let Some(g) = geo {
            if best.as_ref().is_none_or(|(_, b)| g > *b) {
                best = Some((cc.clone(), g));
            }
        }
    }

    let all: Vec<&Row> = main_rows
        .iter()
        .chain(&impaired_rows)
        .chain(cc_rows.iter().flat_map(|(_, r)| r))
        .collect();
    let failed = failures(&all);
    if !failed.is_empty() {
        println!("\n{failed}");
    }

    println!("\n## Summary\n");
    let overlay = &main_rows[1];
    if let (Some(u), Ok(o)) = (underlay_rtt, &overlay.ping) {
        let added = o.avg_ms - u;
        println!(
            "added RTT of the overlay: {added:.3} ms (target < 0.1 ms: {})",
            if added < 0.1 { "met" } else { "NOT met" }
        );
    }
    match main_rows.get(2) {
        Some(bt) => {
            if let (Ok(u), Ok(b)) = (&bt.ping, &main_rows[0].ping) {
                println!("added RTT of boringtun: {:.3} ms", u.avg_ms - b.avg_ms);
            }
            for (what, o, b) in [
                ("1 stream", gbps(&overlay.p1), gbps(&bt.p1)),
                ("4 streams", gbps(&overlay.p4), gbps(&bt.p4)),
            ] {
                if let (Some(o), Some(b)) = (o, b) {
                    println!(
                        "throughput, {what}: overlay {o:.3} Gbit/s vs boringtun {b:.3} Gbit/s = {:.2}x (target: ahead of boringtun: {})",
                        o / b,
                        if o > b { "met" } else { "NOT met" }
                    );
                }
            }
        }
        None => println!("boringtun: skipped (see the SKIP line above)"),
    }
    if let Some((cc, g)) = best {
        println!("best outer congestion controller by geometric mean of all overlay runs: {cc} ({g:.3} Gbit/s)");
    }
    print!("{}", goal_ratios(&main_rows, &impaired_rows, &main_cc));
    if !args.relay.is_empty() {
        print!("{}", relay_report(&bench));
    }
    print_total_time(started);
    Ok(())
}

fn print_total_time(started: SystemTime) {
    let elapsed = SystemTime::now()
        .duration_since(started)
        .unwrap_or_default();
    println!(
        "total time {}",
        humantime::format_duration(Duration::from_secs(elapsed.as_secs()))
    );
}

/// The first three fields of /proc/loadavg.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
