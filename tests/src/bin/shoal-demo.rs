//! `shoal-demo`: the main job on embedded defaults, on one machine. Builds a LAN of network
//! namespaces, starts a controller and three agents (each in its own namespace, with its own
//! address and hostname), waits until all three are up, and prints `shoalctl nodes list` and
//! `shoalctl report`. Then it keeps the fleet running until Ctrl-C (or exits at once with
//! `--exit`), and removes every namespace it made.
//!
//! Needs root (network namespaces) and the binaries next to it: `cargo build --workspace --bins`.

use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};
use shoal_tests::{Fleet, FleetConfig};

const USAGE: &str = "\
usage: shoal-demo [--exit] [--agents N]

Starts a controller and N (default 3) agents, each in its own network namespace on one LAN
(10.77.1.0/24, inside the namespaces only), waits until every agent is up, and prints
`shoalctl nodes list` and `shoalctl report`.

  --exit        print and exit instead of running until Ctrl-C
  --agents N    number of agents (1..=50, default 3)
  -h, --help    this text

Needs root. Binaries are taken from the directory of shoal-demo, or from $SHOAL_BIN_DIR.";

#[derive(Debug)]
struct Args {
    exit: bool,
    agents: usize,
}

fn parse_args() -> Result<Option<Args>> {
    let mut args = Args {
        exit: false,
        agents: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--exit" => args.exit = true,
            "--agents" => {
                let n = it.next().context("--agents needs a number")?;
                args.agents = n.parse().with_context(|| format!("--agents {n:?}"))?;
                if !(1..=50).contains(&args.agents) {
                    bail!("--agents must be 1..=50");
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    Ok(Some(args))
}

/// Blocks SIGINT and SIGTERM in every thread (child processes start with an empty mask again) and
/// turns them into messages on the returned channel, so that the fleet is torn down in order.
fn signals() -> Result<mpsc::Receiver<Signal>> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("cannot block SIGINT/SIGTERM")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(sig) = set.wait() {
            if tx.send(sig).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

fn section(title: &str, body: &str) {
    println!("\n$ {title}\n{}", body.trim_end());
}

fn run(args: Args) -> Result<()> {
    let signals = signals()?;
    if let Some(reason) = shoal_tests::host_tests_unavailable() {
        bail!("shoal-demo cannot run here: {reason}");
    }
    let cfg = FleetConfig {
        machine_id_prefix: "demo".into(),
        ..FleetConfig::embedded_defaults().agents(args.agents)
    };
    println!(
        "shoal-demo: starting a controller and {} agents on LAN {} (each in its own network namespace)…",
        cfg.agents, cfg.subnet
    );
    let mut fleet = Fleet::start(cfg)?;
    let result = show_and_wait(&mut fleet, &args, &signals);
    if result.is_err() {
        fleet.dump_logs();
    }
    result
    // `fleet` drops here: processes killed, namespaces deleted.
}

fn show_and_wait(fleet: &mut Fleet, args: &Args, signals: &mpsc::Receiver<Signal>) -> Result<()> {
    if let Ok(sig) = signals.try_recv() {
        println!("shoal-demo: {sig} received during start-up; cleaning up");
        return Ok(());
    }
    println!(
        "controller: namespace {}, QUIC {}, admin API {}",
        fleet.controller_ns(),
        fleet.controller_addr(),
        fleet.api_addr()
    );
    for a in fleet.agents() {
        println!(
            "{}: namespace {}, address {}, machine id {}, {} {}",
            a.hostname, a.netns, a.addr, a.machine_id, a.iface, a.mac
        );
    }
    println!("all {} agents are up.", fleet.agents().len());
    section("shoalctl nodes list", &fleet.ctl_ok(&["nodes", "list"])?);
    section("shoalctl report", &fleet.ctl_ok(&["report"])?);
    // Every agent reports this host's disks (they share it): state, SMART, or why it cannot say.
    section("shoalctl drives list", &fleet.ctl_ok(&["drives", "list"])?);
    show_overlay(fleet)?;
    if args.exit {
        println!("\nshoal-demo: --exit given; cleaning up");
        return Ok(());
    }
    println!(
        "\nThe fleet keeps running. Try, in another terminal:\n  ip netns exec {} {} --config {} nodes list\n\
         Press Ctrl-C to stop and remove the namespaces.",
        fleet.controller_ns(),
        fleet.bins().ctl.display(),
        fleet.admin_conf().display()
    );
    loop {
        match signals.recv_timeout(Duration::from_secs(1)) {
            Ok(sig) => {
                println!(
                    "\nshoal-demo: {sig} received; stopping the fleet and removing its namespaces"
                );
                return Ok(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                fleet
                    .controller()
                    .ensure_running()
                    .context("the controller stopped")?;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("signal thread ended"),
        }
    }
}

/// Waits until every pair of agents reports an overlay path, then shows networks, paths and a ping
/// across the overlay (from the first agent to the second one's `shoal0` address).
fn show_overlay(fleet: &Fleet) -> Result<()> {
    let n = fleet.agents().len();
    if n < 2 {
        return Ok(());
    }
    let want = n * (n - 1);
    shoal_tests::eventually(
        Duration::from_secs(60),
        "every pair of agents to report an overlay path",
        || {
            let paths = fleet.ctl_json(&["overlay", "paths"])?;
            let got = paths.as_array().map_or(0, Vec::len);
            anyhow::ensure!(got == want, "{got} of {want} paths reported");
            Ok(())
        },
    )?;
    section(
        "shoalctl network list",
        &fleet.ctl_ok(&["network", "list"])?,
    );
    section(
        "shoalctl overlay paths",
        &fleet.ctl_ok(&["overlay", "paths"])?,
    );
    let nodes = fleet.nodes()?;
    let target = fleet
        .node_of(1, &nodes)
        .and_then(|node| node["overlay"][0]["address"].as_str().map(str::to_owned))
        .context("agent-2 has no overlay address")?;
    let from = &fleet.agents()[0];
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &from.netns,
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            &target,
        ])
        .output()
        .context("ping")?;
    section(
        &format!(
            "ip netns exec {} ping -c 3 {target}   # {} -> agent-2 over shoal0",
            from.netns, from.hostname
        ),
        &String::from_utf8_lossy(&out.stdout),
    );
    anyhow::ensure!(
        out.status.success(),
        "the ping over the overlay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-demo: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => {
            println!("shoal-demo: done; namespaces removed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shoal-demo: error: {e:?}");
            ExitCode::FAILURE
        }
    }
}
