//! `shoal-ha-bench`: controller high availability, measured and attacked, on a real three-member
//! etcd cluster and three controllers, each in its own network namespace ([`HaFleet`]).
//!
//! - `failover --runs N [--agents A]`: N times, kill -9 the leader and time until another
//!   controller logs that it leads (its drivers run again); and kill -9 a controller holding
//!   agents and time until every one of them is `up` on another controller. Prints p50/p99/max.
//! - `faults --rounds R [--seed S]`: a Jepsen-style run. A writer creates join tokens (each with
//!   a unique label) and overlay networks through randomly chosen controllers while, for R rounds,
//!   a controller is killed, an etcd member is killed, or a controller is cut off from etcd, and
//!   then healed. Afterwards: every acknowledged write is present; the event log has no gap;
//!   leadership terms, read from the controllers' logs (and the harness's kill times), never
//!   overlap — no two controllers led at once, so nothing was written by a deposed leader that
//!   the fence did not refuse. Exits non-zero on any violation.
//!
//! Needs root, `/usr/bin/etcd` and the fleet binaries (`cargo build --release --workspace --bins`,
//! then `target/release/shoal-ha-bench …`).

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use shoal_tests::eventually;
use shoal_tests::fleet::as_array;
use shoal_tests::ha::{HaConfig, HaFleet};
use shoal_tests::process::output_with_timeout;

const USAGE: &str = "\
usage: shoal-ha-bench failover [--runs N] [--agents A]
       shoal-ha-bench faults [--rounds R] [--seed S]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: u64| -> Result<u64> {
        match args.iter().position(|a| a == name) {
            Some(i) => args
                .get(i + 1)
                .context(format!("{name} needs a value"))?
                .parse()
                .context(format!("{name} takes a number")),
            None => Ok(default),
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("failover") => {
            (|| failover(flag("--runs", 10)? as usize, flag("--agents", 3)? as usize))()
        }
        Some("faults") => (|| faults(flag("--rounds", 20)? as usize, flag("--seed", 1)?))(),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-ha-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn percentiles(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "no samples".into();
    }
    v.sort();
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    format!(
        "n={} p50 {:.2} s, p99 {:.2} s, max {:.2} s",
        v.len(),
        at(0.5).as_secs_f64(),
        at(0.99).as_secs_f64(),
        v[v.len() - 1].as_secs_f64()
    )
}

/// The time of the first line of `log` at or after `after` that contains `needle`.
fn logged_at(log: &str, needle: &str, after: SystemTime) -> Option<SystemTime> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            humantime::parse_rfc3339_weak(l.split_whitespace().next()?.trim_end_matches('Z')).ok()
        })
        .find(|t| *t >= after)
}

fn failover(runs: usize, agents: usize) -> Result<()> {
    let mut fleet = HaFleet::start(HaConfig {
        agents,
        ..HaConfig::default()
    })?;
    let mut leader_times = Vec::new();
    let mut agent_times = Vec::new();
    for run in 0..runs {
        // The leader, killed.
        let asked = fleet.any_running_controller()?;
        let (leader, _) = fleet.wait_leader(asked, None, Duration::from_secs(30))?;
        let killed = SystemTime::now();
        fleet.controllers[leader].proc.kill()?;
        let other = (0..fleet.controllers.len())
            .find(|&i| i != leader)
            .context("one controller")?;
        let (next, _) = fleet.wait_leader(other, Some(leader), Duration::from_secs(30))?;
        let started = eventually(Duration::from_secs(10), "the new leader's log line", || {
            logged_at(
                &fleet.controllers[next].proc.log(),
                "leading: the leader's work starts",
                killed,
            )
            .context("not yet")
        })?;
        let took = started.duration_since(killed).unwrap_or_default();
        println!(
            "run {run}: leader killed -> controller {next} leads after {:.2} s",
            took.as_secs_f64()
        );
        leader_times.push(took);
        fleet.controllers[leader].proc.restart()?;
        fleet.wait_controller_ready(leader)?;
        // A controller that holds agents, killed.
        if agents > 0 {
            // Every agent settled (up, its controller known) before the next kill.
            let nodes = eventually(
                Duration::from_secs(30),
                "every node up on a controller",
                || {
                    let nodes = as_array(fleet.ctl_json(next, &["nodes", "list"])?, "nodes")?;
                    ensure!(
                        nodes.len() == agents
                            && nodes
                                .iter()
                                .all(|n| n["status"] == "up" && n["controller"].is_string()),
                        "not yet"
                    );
                    Ok(nodes)
                },
            )?;
            let victim_id = nodes
                .iter()
                .filter_map(|n| n["controller"].as_str())
                .next()
                .context("no node names its controller")?
                .to_owned();
            let victim = fleet.index_of(&victim_id).context("victim")?;
            let moved: BTreeSet<String> = nodes
                .iter()
                .filter(|n| n["controller"].as_str() == Some(victim_id.as_str()))
                .filter_map(|n| n["id"].as_str().map(str::to_owned))
                .collect();
            let asked = (0..fleet.controllers.len())
                .find(|&i| i != victim)
                .unwrap_or(0);
            let killed = Instant::now();
            fleet.controllers[victim].proc.kill()?;
            eventually(
                Duration::from_secs(60),
                "the dead controller's agents up elsewhere",
                || {
                    let nodes = as_array(fleet.ctl_json(asked, &["nodes", "list"])?, "nodes")?;
                    for n in nodes
                        .iter()
                        .filter(|n| moved.contains(n["id"].as_str().unwrap_or("")))
                    {
                        ensure!(
                            n["status"] == "up"
                                && n["connected"] == true
                                && n["controller"].as_str().is_some_and(|c| c != victim_id),
                            "{} not up elsewhere yet",
                            n["id"]
                        );
                    }
                    Ok(())
                },
            )?;
            let took = killed.elapsed();
            println!(
                "run {run}: controller {victim} killed with {} agents -> all up elsewhere after {:.2} s",
                moved.len(),
                took.as_secs_f64()
            );
            agent_times.push(took);
            fleet.controllers[victim].proc.restart()?;
            fleet.wait_controller_ready(victim)?;
        }
    }
    println!(
        "leader killed -> new leader's drivers running: {}",
        percentiles(leader_times)
    );
    if agents > 0 {
        println!(
            "controller killed -> its agents up on another: {}",
            percentiles(agent_times)
        );
    }
    Ok(())
}

/// A small deterministic generator (xorshift64*), so a run can be repeated with its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Debug, Clone)]
enum Write {
    Token(u64),
    Network(u64),
}

#[derive(Debug, Default)]
struct Ledger {
    acked: Vec<Write>,
    failed: Vec<Write>,
}

fn faults(rounds: usize, seed: u64) -> Result<()> {
    let mut fleet = HaFleet::start(HaConfig {
        agents: 2,
        ..HaConfig::default()
    })?;
    fleet.wait_leader(0, None, Duration::from_secs(30))?;
    let mut rng = Rng(seed.max(1));
    // The writer runs shoalctl itself, against a random controller each time.
    let targets: Vec<(String, std::path::PathBuf)> = fleet
        .controllers
        .iter()
        .map(|c| (c.netns.clone(), c.admin_conf.clone()))
        .collect();
    let ctl = shoal_tests::bins::Bins::locate()?.ctl;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (ledger, stop) = (ledger.clone(), stop.clone());
        let mut rng = Rng(seed.wrapping_mul(31).max(1));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let (ns, conf) = &targets[rng.below(targets.len() as u64) as usize];
                let (write, args): (Write, Vec<String>) = if n.is_multiple_of(4) {
                    (
                        Write::Network(n),
                        vec![
                            "network".into(),
                            "create".into(),
                            format!("fi-{n}"),
                            "--subnet".into(),
                            format!("10.{}.{}.0/24", 100 + n / 256, n % 256),
                        ],
                    )
                } else {
                    (
                        Write::Token(n),
                        vec![
                            "token".into(),
                            "create".into(),
                            "--ttl".into(),
                            "24h".into(),
                            "--label".into(),
                            format!("fi={n}"),
                        ],
                    )
                };
                let mut cmd = std::process::Command::new("ip");
                cmd.args(["netns", "exec", ns])
                    .arg(&ctl)
                    .arg("--config")
                    .arg(conf)
                    .args(&args);
                let ok = output_with_timeout(&mut cmd, Duration::from_secs(20))
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                let mut l = ledger.lock().unwrap_or_else(|p| p.into_inner());
                if ok {
                    l.acked.push(write);
                } else {
                    l.failed.push(write);
                }
                drop(l);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // Leadership ends at a kill without a log line: remember the kills.
    let mut kills: Vec<(usize, SystemTime)> = Vec::new();
    let started = SystemTime::now();
    let mut counts = [0usize; 3];
    for round in 0..rounds {
        let kind = rng.below(3) as usize;
        counts[kind] += 1;
        let hold = Duration::from_millis(1500 + rng.below(3000));
        match kind {
            0 => {
                let i = rng.below(fleet.controllers.len() as u64) as usize;
                println!("round {round}: kill controller {i} for {hold:?}");
                kills.push((i, SystemTime::now()));
                fleet.controllers[i].proc.kill()?;
                std::thread::sleep(hold);
                fleet.controllers[i].proc.restart()?;
            }
            1 => {
                let j = rng.below(fleet.etcd.len() as u64) as usize;
                println!("round {round}: kill etcd member {j} for {hold:?}");
                fleet.etcd[j].proc.kill()?;
                std::thread::sleep(hold);
                fleet.etcd[j].proc.restart()?;
            }
            _ => {
                let i = rng.below(fleet.controllers.len() as u64) as usize;
                println!("round {round}: cut controller {i} off from etcd for {hold:?}");
                fleet.partition_from_etcd(i)?;
                std::thread::sleep(hold);
                fleet.heal_from_etcd(i)?;
            }
        }
        std::thread::sleep(Duration::from_millis(500 + rng.below(2000)));
    }
    stop.store(true, Ordering::SeqCst);
    let _ = writer.join();
    for i in 0..fleet.controllers.len() {
        fleet.wait_controller_ready(i)?;
    }
    fleet.wait_leader(0, None, Duration::from_secs(30))?;
    let ledger = std::mem::take(&mut *ledger.lock().unwrap_or_else(|p| p.into_inner()));
    let mut violations = Vec::new();

    // 1. Every acknowledged write is there.
    let tokens = as_array(fleet.ctl_json(0, &["token", "list"])?, "tokens")?;
    let token_labels: BTreeSet<u64> = tokens
        .iter()
        .filter_map(|t| t["labels"]["fi"].as_str()?.parse().ok())
        .collect();
    let networks = as_array(fleet.ctl_json(1, &["network", "list"])?, "networks")?;
    let network_names: BTreeSet<String> = networks
        .iter()
        .filter_map(|n| n["name"].as_str().map(str::to_owned))
        .collect();
    let mut present_unacked = 0;
    for w in &ledger.acked {
        let present = match w {
            Write::Token(n) => token_labels.contains(n),
            Write::Network(n) => network_names.contains(&format!("fi-{n}")),
        };
        if !present {
            violations.push(format!("acknowledged write {w:?} is missing"));
        }
    }
    for w in &ledger.failed {
        let present = match w {
            Write::Token(n) => token_labels.contains(n),
            Write::Network(n) => network_names.contains(&format!("fi-{n}")),
        };
        present_unacked += usize::from(present);
    }
    // 2. The event log has no gap.
    let events = all_events(&fleet)?;
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    for pair in seqs.windows(2) {
        if pair[1] != pair[0] + 1 {
            violations.push(format!("event log gap: seq {} then {}", pair[0], pair[1]));
        }
    }
    // 3. Leadership terms never overlap.
    let mut terms: Vec<(SystemTime, SystemTime, usize)> = Vec::new();
    for (i, c) in fleet.controllers.iter().enumerate() {
        let log = c.proc.log();
        let mut open: Option<SystemTime> = None;
        let mut ends: Vec<SystemTime> = kills
            .iter()
            .filter(|(k, _)| *k == i)
            .map(|(_, t)| *t)
            .collect();
        for line in log.lines() {
            let Some(t) = line
                .split_whitespace()
                .next()
                .and_then(|s| humantime::parse_rfc3339_weak(s.trim_end_matches('Z')).ok())
            else {
                continue;
            };
            if t < started {
                continue;
            }
            if line.contains("leading: the leader's work starts") {
                open = Some(t);
            } else if line.contains("no longer leading") {
                if let Some(s) = open.take() {
                    terms.push((s, t, i));
                }
            }
            // A kill ends a term without a line: close it at the kill.
            while let Some(k) = ends.first().copied() {
                if k <= t {
                    ends.remove(0);
                    if let Some(s) = open.take() {
                        if k >= s {
                            terms.push((s, k, i));
                        }
                    }
                } else {
                    break;
                }
            }
        }
        if let Some(s) = open {
            terms.push((s, SystemTime::now(), i));
        }
    }
    terms.sort();
    for pair in terms.windows(2) {
        if pair[1].0 < pair[0].1 {
            violations.push(format!(
                "controllers {} and {} led at once ({:?} .. {:?} overlaps {:?})",
                pair[0].2, pair[1].2, pair[0].0, pair[0].1, pair[1].0
            ));
        }
    }
    println!(
        "faults: {rounds} rounds (controller killed {}, etcd member killed {}, controller cut off from etcd {}), seed {seed}",
        counts[0], counts[1], counts[2]
    );
    println!(
        "writes: {} acknowledged, all checked; {} refused or timed out ({} of them landed anyway); {} events, {} leadership terms",
        ledger.acked.len(),
        ledger.failed.len(),
        present_unacked,
        seqs.len(),
        terms.len()
    );
    if violations.is_empty() {
        println!("result: no acknowledged write lost, no event-log gap, no two leaders at once");
        Ok(())
    } else {
        for v in &violations {
            println!("VIOLATION: {v}");
        }
        bail!("{} violations", violations.len())
    }
}

fn all_events(fleet: &HaFleet) -> Result<Vec<Value>> {
    let mut all = as_array(fleet.ctl_json(0, &["events"])?, "events")?;
    while let Some(last) = all.last().and_then(|e| e["seq"].as_u64()) {
        let page = as_array(
            fleet.ctl_json(0, &["events", "--after", &last.to_string()])?,
            "events",
        )?;
        if page.is_empty() {
            break;
        }
        all.extend(page);
    }
    Ok(all)
}
