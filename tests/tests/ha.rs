//! Controller high availability on a real etcd cluster: three etcd members and three controllers,
//! each in its own network namespace, killed and cut off the way a machine or a switch port fails.
//!
//! Needs root and `/usr/bin/etcd` (Debian `etcd-server`, installed by `scripts/deps`); skips with a
//! reason otherwise, fails under CI.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use shoal_tests::fleet::as_array;
use shoal_tests::ha::{HaConfig, HaFleet, ETCD};
use shoal_tests::netns::{holds_address, ipv4_of as tap_addr, run_in};
use shoal_tests::{eventually, require_host_tests, OrPanic};

/// The lease TTL the controllers run with (the default).
const LEASE_TTL: Duration = Duration::from_secs(2);

fn etcd_installed() -> Result<(), shoal_testkit::skip::Missing> {
    shoal_testkit::skip::Missing::check(
        (!std::path::Path::new(ETCD).is_file())
            .then(|| format!("{ETCD} is missing (Debian etcd-server; scripts/deps installs it)")),
    )
}

/// The time of the first log line of `log` after `after` that contains `needle`.
fn logged_at(log: &str, needle: &str, after: SystemTime) -> Option<SystemTime> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            let stamp = l.split_whitespace().next()?;
            humantime::parse_rfc3339_weak(stamp.trim_end_matches('Z'))
                .ok()
                .or_else(|| humantime::parse_rfc3339(stamp).ok())
        })
        .find(|t| *t >= after)
}

#[test]
fn one_controller_leads_and_another_takes_over_when_it_dies() {
    require_host_tests!();
    shoal_testkit::require!(etcd_installed());
    let mut fleet = HaFleet::start(HaConfig::default()).or_panic();
    let (leader, _) = fleet
        .wait_leader(0, None, Duration::from_secs(20))
        .or_panic();
    // Every controller sees the same three controllers, one leader, and a healthy etcd.
    for i in 0..3 {
        eventually(Duration::from_secs(10), "three controllers listed", || {
            let view = fleet.controllers_view(i)?;
            ensure!(view["store"] == "etcd", "{view}");
            let list = as_array(view["controllers"].clone(), "controllers")?;
            ensure!(list.len() == 3, "{} controllers: {view}", list.len());
            let etcd = as_array(view["etcd"].clone(), "etcd")?;
            ensure!(
                etcd.len() == 3 && etcd.iter().all(|e| e["healthy"] == true),
                "etcd: {view}"
            );
            ensure!(
                fleet.leader(i)? == leader,
                "controller {i} names another leader"
            );
            Ok(())
        })
        .or_panic();
    }
    // A write through a follower lands in the one store.
    let follower = (leader + 1) % 3;
    fleet
        .ctl_ok(follower, &["token", "create", "--ttl", "1h"])
        .or_panic();
    let tokens = fleet.ctl_json(leader, &["token", "list"]).or_panic();
    assert_eq!(as_array(tokens, "tokens").or_panic().len(), 1);

    // kill -9 the leader: no lease revocation, so the others wait out its lease.
    let killed_at = Instant::now();
    fleet.controllers[leader].proc.kill().or_panic();
    let (new_leader, took) = fleet
        .wait_leader(follower, Some(leader), Duration::from_secs(15))
        .or_panic();
    let failover = killed_at.elapsed();
    eprintln!("leader killed -> new leader seen after {failover:?} (poll {took:?})");
    assert_ne!(new_leader, leader);
    assert!(
        failover < LEASE_TTL + Duration::from_secs(3),
        "failover took {failover:?}"
    );
    eventually(
        Duration::from_secs(10),
        "the dead leader to leave the list",
        || {
            let view = fleet.controllers_view(new_leader)?;
            let list = as_array(view["controllers"].clone(), "controllers")?;
            ensure!(list.len() == 2, "{view}");
            Ok(())
        },
    )
    .or_panic();

    // It comes back as a follower: the leader stays.
    fleet.controllers[leader].proc.restart().or_panic();
    eventually(Duration::from_secs(30), "three controllers again", || {
        let view = fleet.controllers_view(leader)?;
        let list = as_array(view["controllers"].clone(), "controllers")?;
        ensure!(list.len() == 3, "{view}");
        ensure!(fleet.leader(leader)? == new_leader, "{view}");
        Ok(())
    })
    .or_panic();

    // A clean stop revokes the lease: the next leader does not wait for its TTL.
    let stopped_at = Instant::now();
    fleet.controllers[new_leader]
        .proc
        .stop(Duration::from_secs(10))
        .or_panic();
    let (third, _) = fleet
        .wait_leader(leader, Some(new_leader), Duration::from_secs(10))
        .or_panic();
    eprintln!(
        "leader stopped -> controller {third} leads after {:?}",
        stopped_at.elapsed()
    );
}

#[test]
fn a_leader_cut_off_from_etcd_stops_leading_within_its_lease() {
    require_host_tests!();
    shoal_testkit::require!(etcd_installed());
    let mut fleet = HaFleet::start(HaConfig::default()).or_panic();
    let (leader, _) = fleet
        .wait_leader(0, None, Duration::from_secs(20))
        .or_panic();
    let other = (leader + 1) % 3;
    let cut_at = SystemTime::now();
    fleet.partition_from_etcd(leader).or_panic();
    // It says so, within its lease.
    let stopped = eventually(
        Duration::from_secs(10),
        "the cut-off leader to step down",
        || {
            logged_at(
                &fleet.controllers[leader].proc.log(),
                "no longer leading",
                cut_at,
            )
            .context("not yet")
        },
    )
    .or_panic();
    let after = stopped.duration_since(cut_at).unwrap_or_default();
    eprintln!("cut off from etcd -> stopped leading after {after:?}");
    assert!(
        after <= LEASE_TTL,
        "stepped down after {after:?}, lease {LEASE_TTL:?}"
    );
    // Another leads — only after the old leader stopped: never two at once.
    let (new_leader, _) = fleet
        .wait_leader(other, Some(leader), Duration::from_secs(15))
        .or_panic();
    let id = fleet.controller_id(new_leader).or_panic();
    let started = logged_at(
        &fleet.controllers[new_leader].proc.log(),
        "leading: the leader's work starts",
        cut_at,
    )
    .unwrap_or_else(|| panic!("controller {id} did not log that it leads"));
    assert!(
        started >= stopped,
        "the new leader started at {started:?}, before the old one stopped at {stopped:?}"
    );
    // The cut-off controller refuses writes with a clear error and still answers its API.
    let out = fleet
        .ctl(leader, &["token", "create", "--ttl", "1h"])
        .or_panic();
    assert!(!out.status.success(), "a write went through without etcd");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("etcd"), "unclear error: {err}");
    // Healed, it follows.
    fleet.heal_from_etcd(leader).or_panic();
    eventually(
        Duration::from_secs(20),
        "the healed controller to follow",
        || {
            ensure!(fleet.leader(leader)? == new_leader, "another leader");
            let view = fleet.controllers_view(leader)?;
            ensure!(
                as_array(view["controllers"].clone(), "controllers")?.len() == 3,
                "{view}"
            );
            fleet.ctl_ok(leader, &["token", "create", "--ttl", "1h"])?;
            Ok(())
        },
    )
    .or_panic();
}

#[test]
fn losing_etcd_members_costs_writes_only_without_quorum_and_all_recovers() {
    require_host_tests!();
    shoal_testkit::require!(etcd_installed());
    let mut fleet = HaFleet::start(HaConfig {
        agents: 2,
        ..HaConfig::default()
    })
    .or_panic();
    fleet
        .wait_leader(0, None, Duration::from_secs(20))
        .or_panic();
    // One member down: nothing noticeable.
    fleet.etcd[2].proc.kill().or_panic();
    for i in 0..3 {
        fleet
            .ctl_ok(i, &["token", "create", "--ttl", "1h"])
            .or_panic();
    }
    fleet.wait_agents_up(Duration::from_secs(10)).or_panic();
    fleet
        .wait_leader(0, None, Duration::from_secs(10))
        .or_panic();
    // Two down: no quorum. Reads answer, writes are refused with a clear error.
    fleet.etcd[1].proc.kill().or_panic();
    let lost_at = Instant::now();
    eventually(Duration::from_secs(15), "writes to be refused", || {
        let out = fleet.ctl(0, &["token", "create", "--ttl", "1h"])?;
        ensure!(!out.status.success(), "a write went through without quorum");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        ensure!(err.contains("etcd"), "unclear error: {err}");
        Ok(())
    })
    .or_panic();
    for i in 0..3 {
        let nodes = fleet.ctl_json(i, &["nodes", "list"]).or_panic();
        assert_eq!(
            as_array(nodes, "nodes").or_panic().len(),
            2,
            "reads answer on {i}"
        );
    }
    eprintln!(
        "quorum lost; reads answered, writes refused ({:?})",
        lost_at.elapsed()
    );
    // Agents keep their sessions: the controllers do not drop them for a store outage.
    for a in &mut fleet.agents {
        assert!(a.proc.is_running(), "{} exited", a.hostname);
    }
    // Quorum back: writes succeed again, by themselves.
    fleet.etcd[1].proc.restart().or_panic();
    fleet.etcd[2].proc.restart().or_panic();
    let back = Instant::now();
    eventually(Duration::from_secs(30), "writes to succeed again", || {
        for i in 0..3 {
            fleet.ctl_ok(i, &["token", "create", "--ttl", "1h"])?;
        }
        Ok(())
    })
    .or_panic();
    eprintln!(
        "quorum back -> writes on every controller after {:?}",
        back.elapsed()
    );
    fleet
        .wait_leader(0, None, Duration::from_secs(15))
        .or_panic();
    fleet.wait_agents_up(Duration::from_secs(15)).or_panic();
}

fn script(path: &std::path::Path, body: &str) -> Result<()> {
    std::fs::write(path, format!("#!/bin/sh\n{body}"))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(())
}

#[test]
fn a_new_leader_finishes_a_maintenance_run_the_dead_one_started_within_its_budget() {
    require_host_tests!();
    shoal_testkit::require!(etcd_installed());
    let work = tempfile::Builder::new()
        .prefix("shoal-ha-maint-")
        .tempdir()
        .expect("tempdir");
    let w = work.path();
    let mark = w.join("mark.sh");
    // The action: one line per run of it on a node, and slow enough to kill the leader mid-way.
    script(
        &mark,
        &format!(
            "echo \"action $1\" >> '{}'/log-$(hostname)\nsleep 2\n",
            w.display()
        ),
    )
    .or_panic();
    let agents = 4;
    let mut fleet = HaFleet::start(HaConfig {
        agent_args: vec![
            "--health-interval".into(),
            "1s".into(),
            "--smartctl".into(),
            "/bin/false".into(),
            "--allow-exec".into(),
            mark.display().to_string(),
            "--maintenance-timeout".into(),
            "30s".into(),
        ],
        ..HaConfig::default()
    })
    .or_panic();
    let token = fleet
        .ctl_ok(
            0,
            &[
                "token", "create", "--ttl", "1h", "--uses", "4", "--label", "pool=ha",
            ],
        )
        .or_panic();
    for _ in 0..agents {
        fleet.add_agent(token.trim()).or_panic();
    }
    fleet.wait_agents_up(Duration::from_secs(60)).or_panic();
    let (leader, _) = fleet
        .wait_leader(0, None, Duration::from_secs(20))
        .or_panic();
    // The agents are spread over the controllers: the leader must reach some through others.
    eventually(
        Duration::from_secs(15),
        "the leader to see every node, on two controllers or more",
        || {
            let nodes = as_array(fleet.ctl_json(leader, &["nodes", "list"])?, "nodes")?;
            let holders: std::collections::BTreeSet<String> = nodes
                .iter()
                .filter_map(|n| n["controller"].as_str().map(str::to_owned))
                .collect();
            ensure!(
                nodes.iter().all(|n| n["controller"].is_string()) && holders.len() >= 2,
                "holders {holders:?} of {} nodes",
                nodes.len()
            );
            Ok(())
        },
    )
    .or_panic();
    let out = fleet
        .ctl_ok(
            leader,
            &[
                "maintenance",
                "run",
                "exec",
                "--selector",
                "pool=ha",
                "--now",
                "--max-unavailable",
                "1",
                "--",
                &mark.display().to_string(),
                "once",
            ],
        )
        .or_panic();
    let run = out
        .split_whitespace()
        .nth(3)
        .map(|s| s.trim_end_matches(':').to_owned())
        .context("run id")
        .or_panic();
    let actions = || -> usize {
        (1..=agents)
            .map(|n| {
                std::fs::read_to_string(w.join(format!("log-agent-{n}")))
                    .unwrap_or_default()
                    .lines()
                    .count()
            })
            .sum()
    };
    // Kill the leader once the first node is in its action.
    eventually(Duration::from_secs(30), "the first action to start", || {
        ensure!(actions() >= 1, "no action yet");
        Ok(())
    })
    .or_panic();
    fleet.controllers[leader].proc.kill().or_panic();
    let other = (leader + 1) % 3;
    let (new_leader, _) = fleet
        .wait_leader(other, Some(leader), Duration::from_secs(15))
        .or_panic();
    let status = eventually(Duration::from_secs(120), "the run to finish", || {
        let r = fleet.ctl_json(new_leader, &["maintenance", "status", &run])?;
        ensure!(r["finished"] == true, "not yet: {}", r["state"]);
        Ok(r)
    })
    .or_panic();
    for n in as_array(status["nodes"].clone(), "nodes").or_panic() {
        assert_eq!(n["phase"], "succeeded", "{n}");
    }
    // Every node acted on exactly once.
    for n in 1..=agents {
        let log = std::fs::read_to_string(w.join(format!("log-agent-{n}"))).unwrap_or_default();
        assert_eq!(log, "action once\n", "agent-{n}");
    }
    // Never two nodes in maintenance at once, across both leaders.
    let needle = format!("run {run}:");
    let mut open = std::collections::BTreeSet::new();
    let mut cordoned = 0;
    let mut after = None::<u64>;
    loop {
        let mut args = vec!["events".to_string()];
        if let Some(a) = after {
            args.extend(["--after".into(), a.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let page = as_array(fleet.ctl_json(new_leader, &args).or_panic(), "events").or_panic();
        if page.is_empty() {
            break;
        }
        after = page.last().and_then(|e| e["seq"].as_u64());
        for e in page {
            if !e["message"].as_str().is_some_and(|m| m.contains(&needle)) {
                continue;
            }
            let node = e["node"].as_str().unwrap_or_default().to_owned();
            match e["kind"].as_str() {
                Some("node_cordoned") => {
                    open.insert(node);
                    cordoned += 1;
                    assert!(
                        open.len() <= 1,
                        "two nodes in maintenance at once: {open:?}"
                    );
                }
                Some("node_up") => {
                    open.remove(&node);
                }
                _ => {}
            }
        }
    }
    assert_eq!(cordoned, agents, "nodes cordoned");
}

/// `ping -c 1` from namespace `ns`.
fn ping(ns: &str, to: Ipv4Addr) -> Result<String> {
    run_in(
        ns,
        "ping",
        &["-c", "1", "-W", "1", &to.to_string()],
        Duration::from_secs(10),
    )
}

/// Agent `i` may send UDP to the controllers only: no direct overlay path can form with another
/// agent on the LAN, so their traffic takes the relay.
fn only_controllers_over_udp(fleet: &HaFleet, i: usize) -> Result<()> {
    let ns = &fleet.agents[i].netns;
    for c in &fleet.controllers {
        let addr = c.addr.to_string();
        run_in(
            ns,
            "iptables",
            &["-A", "OUTPUT", "-p", "udp", "-d", &addr, "-j", "ACCEPT"],
            Duration::from_secs(10),
        )?;
    }
    run_in(
        ns,
        "iptables",
        &[
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "-d",
            "10.78.1.0/24",
            "-j",
            "DROP",
        ],
        Duration::from_secs(10),
    )?;
    Ok(())
}

/// The overlay paths the agents connected to controller `ctl` reported (each controller keeps its
/// own agents' reports).
fn paths_on(fleet: &HaFleet, ctl: usize) -> Result<Vec<Value>> {
    as_array(fleet.ctl_json(ctl, &["overlay", "paths"])?, "paths")
}

/// Agent `i`'s node record (by its hostname), as controller `ctl` lists it.
fn node_of(fleet: &HaFleet, ctl: usize, i: usize) -> Result<Value> {
    let nodes = as_array(fleet.ctl_json(ctl, &["nodes", "list"])?, "nodes")?;
    nodes
        .into_iter()
        .find(|n| n["hostname"] == fleet.agents[i].hostname.as_str())
        .with_context(|| format!("no node for {}", fleet.agents[i].hostname))
}

/// The index of the controller holding agent `i`'s session, as controller `ctl` sees it.
fn holder_of(fleet: &HaFleet, ctl: usize, i: usize) -> Result<usize> {
    let node = node_of(fleet, ctl, i)?;
    let id = node["controller"]
        .as_str()
        .with_context(|| format!("no controller holds it: {node}"))?;
    fleet
        .index_of(id)
        .with_context(|| format!("{id} is no controller of this fleet"))
}

#[test]
fn agents_on_different_controllers_talk_through_the_relay_and_again_after_one_controller_dies() {
    require_host_tests!();
    shoal_testkit::require!(etcd_installed());
    let mut fleet = HaFleet::start(HaConfig::default()).or_panic();
    fleet
        .wait_leader(0, None, Duration::from_secs(20))
        .or_panic();
    let token = fleet
        .ctl_ok(0, &["token", "create", "--ttl", "1h", "--uses", "2"])
        .or_panic();
    // a on controller 0, b on controller 1; neither can reach the other directly.
    let a = fleet.add_agent_to(token.trim(), &[0]).or_panic();
    only_controllers_over_udp(&fleet, a).or_panic();
    let b = fleet.add_agent_to(token.trim(), &[1]).or_panic();
    only_controllers_over_udp(&fleet, b).or_panic();
    fleet.wait_agents_up(Duration::from_secs(60)).or_panic();
    eventually(
        Duration::from_secs(20),
        "a's session on controller 0, b's on controller 1",
        || {
            ensure!(holder_of(&fleet, 2, a)? == 0, "a is elsewhere");
            ensure!(holder_of(&fleet, 2, b)? == 1, "b is elsewhere");
            Ok(())
        },
    )
    .or_panic();
    let (a_ns, b_ns) = (fleet.agents[a].netns.clone(), fleet.agents[b].netns.clone());
    let addrs: Vec<Ipv4Addr> =
        eventually(Duration::from_secs(30), "both agents have shoal0", || {
            Ok(vec![tap_addr(&a_ns, "shoal0")?, tap_addr(&b_ns, "shoal0")?])
        })
        .or_panic();

    // The relay across controllers: a's packets enter at controller 0, cross the mesh, and leave
    // at controller 1 (and back).
    eventually(
        Duration::from_secs(40),
        "a pings b over the overlay",
        || ping(&a_ns, addrs[1]),
    )
    .or_panic();
    eventually(
        Duration::from_secs(10),
        "b pings a over the overlay",
        || ping(&b_ns, addrs[0]),
    )
    .or_panic();
    let id = |i: usize| -> String {
        node_of(&fleet, 0, i).or_panic()["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let (a_id, b_id) = (id(a), id(b));
    eventually(
        Duration::from_secs(20),
        "relay paths reported on both controllers",
        || {
            for (ctl, from, to) in [(0, &a_id, &b_id), (1, &b_id, &a_id)] {
                let paths = paths_on(&fleet, ctl)?;
                ensure!(
                    paths.iter().any(|p| p["from"] == from.as_str()
                        && p["to"] == to.as_str()
                        && p["kind"] == "relay"),
                    "controller {ctl}: {paths:?}"
                );
            }
            Ok(())
        },
    )
    .or_panic();

    // Drive policies follow labels across controllers: changes made through controller 0 reach b,
    // whose session controller 1 holds.
    let sent_to_b = |mode: &str| {
        let (b_id, mode) = (b_id.clone(), format!("mode={mode}"));
        move |log: &str| {
            log.lines().any(|l| {
                l.contains("drive policy sent") && l.contains(b_id.as_str()) && l.contains(&mode)
            })
        }
    };
    fleet
        .ctl_ok(
            0,
            &["drives", "policy", "set", "-l", "disks=fast", "approve"],
        )
        .or_panic();
    fleet
        .ctl_ok(
            0,
            &["nodes", "label", &fleet.agents[b].hostname, "disks=fast"],
        )
        .or_panic();
    let approve = sent_to_b("approve");
    eventually(Duration::from_secs(10), "b gets the approve policy", || {
        ensure!(
            approve(&fleet.controllers[1].proc.log()),
            "not sent by controller 1"
        );
        Ok(())
    })
    .or_panic();
    let b_host = fleet.agents[b].hostname.clone();
    fleet
        .ctl_ok(
            0,
            &["drives", "policy", "set", "--node", &b_host, "prepare"],
        )
        .or_panic();
    let prepare = sent_to_b("prepare");
    eventually(Duration::from_secs(10), "b gets the prepare policy", || {
        ensure!(
            prepare(&fleet.controllers[1].proc.log()),
            "not sent by controller 1"
        );
        Ok(())
    })
    .or_panic();

    // Controller 1 dies with b's session: b moves to controller 2 (it cannot reach controller 0),
    // and a reaches it again through the relay, now from controller 0 to controller 2.
    let ctl0 = fleet.controllers[0].addr.to_string();
    run_in(
        &b_ns,
        "iptables",
        &["-I", "OUTPUT", "-p", "udp", "-d", &ctl0, "-j", "DROP"],
        Duration::from_secs(10),
    )
    .or_panic();
    fleet.controllers[1].proc.kill().or_panic();
    let killed = Instant::now();
    eventually(
        Duration::from_secs(40),
        "a pings b again after b's controller died",
        || ping(&a_ns, addrs[1]),
    )
    .or_panic();
    eprintln!(
        "b's controller killed -> a reaches b again after {:?}",
        killed.elapsed()
    );
    // The relay carries a's pings as soon as b's new session is up; controller 0 learns who holds
    // b from the mesh's presence news, which may come a moment later.
    eventually(
        Duration::from_secs(10),
        "controller 0 sees b on controller 2",
        || {
            let holder = holder_of(&fleet, 0, b)?;
            ensure!(holder == 2, "b on controller {holder}");
            Ok(())
        },
    )
    .or_panic();
    eventually(
        Duration::from_secs(20),
        "b's relay path reported on controller 2",
        || {
            let paths = paths_on(&fleet, 2)?;
            ensure!(
                paths.iter().any(|p| p["from"] == b_id.as_str()
                    && p["to"] == a_id.as_str()
                    && p["kind"] == "relay"),
                "controller 2: {paths:?}"
            );
            Ok(())
        },
    )
    .or_panic();
    eventually(Duration::from_secs(10), "b pings a again", || {
        ping(&b_ns, addrs[0])
    })
    .or_panic();
}

#[test]
fn a_dead_controllers_agents_are_up_on_another_within_ten_seconds_and_overlay_pings_never_stop() {
    require_host_tests!();
    shoal_testkit::require!(etcd_installed());
    let mut fleet = HaFleet::start(HaConfig::default()).or_panic();
    fleet
        .wait_leader(0, None, Duration::from_secs(20))
        .or_panic();
    let token = fleet
        .ctl_ok(0, &["token", "create", "--ttl", "1h", "--uses", "2"])
        .or_panic();
    // a on controller 0, b on controller 1 (each knows one more, and learns the rest).
    let a = fleet.add_agent_to(token.trim(), &[0, 2]).or_panic();
    let b = fleet.add_agent_to(token.trim(), &[1, 2]).or_panic();
    fleet.wait_agents_up(Duration::from_secs(60)).or_panic();
    eventually(Duration::from_secs(20), "a on controller 0, b on 1", || {
        ensure!(holder_of(&fleet, 2, a)? == 0, "a is elsewhere");
        ensure!(holder_of(&fleet, 2, b)? == 1, "b is elsewhere");
        Ok(())
    })
    .or_panic();
    let (a_ns, b_ns) = (fleet.agents[a].netns.clone(), fleet.agents[b].netns.clone());
    let addrs: Vec<Ipv4Addr> =
        eventually(Duration::from_secs(30), "both agents have shoal0", || {
            Ok(vec![tap_addr(&a_ns, "shoal0")?, tap_addr(&b_ns, "shoal0")?])
        })
        .or_panic();
    let b_id = node_of(&fleet, 0, b).or_panic()["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // A direct path between them, across controllers.
    eventually(Duration::from_secs(40), "a's direct path to b", || {
        ping(&a_ns, addrs[1])?;
        let paths = paths_on(&fleet, 0)?;
        ensure!(
            paths
                .iter()
                .any(|p| p["to"] == b_id.as_str() && p["kind"] == "direct"),
            "{paths:?}"
        );
        Ok(())
    })
    .or_panic();
    // Ping all through the controller's death: 5 per second for 20 s.
    let pinger = std::process::Command::new("ip")
        .args([
            "netns", "exec", &a_ns, "ping", "-i", "0.2", "-c", "100", "-W", "1",
        ])
        .arg(addrs[1].to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ping");
    eventually(Duration::from_secs(5), "pings under way", || {
        ensure!(!paths_on(&fleet, 0)?.is_empty(), "no paths");
        Ok(())
    })
    .or_panic();
    let killed = Instant::now();
    fleet.controllers[1].proc.kill().or_panic();
    eventually(
        Duration::from_secs(10),
        "b up on another controller",
        || {
            let node = node_of(&fleet, 0, b)?;
            let holder = holder_of(&fleet, 0, b)?;
            ensure!(
                holder != 1 && node["status"] == "up" && node["connected"] == true,
                "b: {} on {holder}",
                node["status"]
            );
            Ok(())
        },
    )
    .or_panic();
    let moved = killed.elapsed();
    let out = pinger.wait_with_output().expect("ping output");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let summary = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_default()
        .to_owned();
    eprintln!("b's controller killed -> b up on another after {moved:?}; ping: {summary}");
    assert!(moved < Duration::from_secs(10), "took {moved:?}");
    assert!(
        summary.contains("100 packets transmitted, 100 received"),
        "overlay pings stopped: {summary}"
    );
}

/// The network's active WireGuard gateway as controller `ctl` named it last since it started (its
/// log: `active WireGuard gateway network=1 gateway=ID`).
fn named_active(fleet: &HaFleet, ctl: usize) -> Option<String> {
    fleet.controllers[ctl]
        .proc
        .log_since_start()
        .lines()
        .rev()
        .filter(|l| l.contains("active WireGuard gateway") && l.contains("network=1 "))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("gateway="))
                .map(str::to_owned)
        })
}

/// The agents (by index) whose namespace holds `address`.
fn holding(fleet: &HaFleet, agents: &[usize], address: Ipv4Addr) -> Vec<usize> {
    agents
        .iter()
        .copied()
        .filter(|&i| holds_address(&fleet.agents[i].netns, address))
        .collect()
}

#[test]
fn one_wireguard_gateway_is_active_fleet_wide_and_a_controller_restart_does_not_move_it() {
    require_host_tests!();
    shoal_testkit::require!(etcd_installed());
    let floating = Ipv4Addr::new(10, 78, 1, 250);
    let listen = format!("{floating}:51820");
    let mut cfg = HaConfig {
        etcd_members: 1,
        controllers: 2,
        ..HaConfig::default()
    };
    cfg.agent_args
        .extend(["--wireguard-gateway".to_owned(), listen.clone()]);
    let mut fleet = HaFleet::start(cfg).or_panic();
    fleet
        .wait_leader(0, None, Duration::from_secs(20))
        .or_panic();
    let token = fleet
        .ctl_ok(0, &["token", "create", "--ttl", "1h", "--uses", "2"])
        .or_panic();
    // The device first: each controller then decides as its gateway agent connects (before this
    // change, each named its own and both agents took the floating address).
    fleet
        .ctl_json(
            0,
            &[
                "wireguard",
                "peer",
                "add",
                "phone",
                "--network",
                "default",
                "--endpoint",
                &listen,
            ],
        )
        .or_panic();
    // Gateway agent a only on controller 0, b only on controller 1 (each cannot reach the other
    // controller), so each controller holds one gateway, across restarts too.
    let a = fleet.add_agent_to(token.trim(), &[0]).or_panic();
    let b = fleet.add_agent_to(token.trim(), &[1]).or_panic();
    for (agent, other) in [(a, 1), (b, 0)] {
        let addr = fleet.controllers[other].addr.to_string();
        run_in(
            &fleet.agents[agent].netns,
            "iptables",
            &["-A", "OUTPUT", "-p", "udp", "-d", &addr, "-j", "DROP"],
            Duration::from_secs(10),
        )
        .or_panic();
    }
    fleet.wait_agents_up(Duration::from_secs(60)).or_panic();
    eventually(Duration::from_secs(20), "a on controller 0, b on 1", || {
        ensure!(holder_of(&fleet, 1, a)? == 0, "a is elsewhere");
        ensure!(holder_of(&fleet, 0, b)? == 1, "b is elsewhere");
        Ok(())
    })
    .or_panic();
    let ids: Vec<String> = [a, b]
        .iter()
        .map(|&i| {
            node_of(&fleet, 0, i).or_panic()["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();

    // One holder of the floating address in the fleet, and both controllers name it.
    let agreed = |fleet: &HaFleet, want: usize| -> Result<()> {
        let held = holding(fleet, &[a, b], floating);
        ensure!(
            held == vec![want],
            "the floating address is held by {held:?}"
        );
        for ctl in 0..2 {
            let named = named_active(fleet, ctl);
            ensure!(
                named.as_deref() == Some(ids[want].as_str()),
                "controller {ctl} names {named:?}, not {}",
                ids[want]
            );
        }
        Ok(())
    };
    let active = eventually(
        Duration::from_secs(30),
        "one gateway agent holding the floating address, named by both controllers",
        || {
            let held = holding(&fleet, &[a, b], floating);
            ensure!(held.len() == 1, "the floating address is held by {held:?}");
            agreed(&fleet, held[0])?;
            Ok(held[0])
        },
    )
    .or_panic();
    let standby = if active == a { b } else { a };
    // The two controllers decide separately; it stays one holder while they keep deciding.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(500));
        agreed(&fleet, active).or_panic();
    }

    // The active gateway's agent dies: the other one, on the other controller, takes over.
    fleet.agents[active].proc.kill().or_panic();
    let killed = Instant::now();
    eventually(
        Duration::from_secs(30),
        "the standby gateway, on the other controller, takes the floating address",
        || {
            ensure!(
                holding(&fleet, &[standby], floating) == vec![standby],
                "not held by the standby"
            );
            for ctl in 0..2 {
                let named = named_active(&fleet, ctl);
                ensure!(
                    named.as_deref() == Some(ids[standby].as_str()),
                    "controller {ctl} names {named:?}"
                );
            }
            Ok(())
        },
    )
    .or_panic();
    eprintln!(
        "active gateway agent killed -> the other one holds the address after {:?}",
        killed.elapsed()
    );
    // It comes back (its address left behind by the crash): it stays a standby and drops it.
    fleet.agents[active].proc.restart().or_panic();
    eventually(
        Duration::from_secs(30),
        "only the new active gateway holds the floating address",
        || agreed(&fleet, standby),
    )
    .or_panic();

    // The controller holding the returned gateway (the lowest id) is killed and restarted: it
    // finds the choice in the store and keeps it.
    let ctl = if active == a { 0 } else { 1 };
    fleet.controllers[ctl].proc.restart().or_panic();
    fleet.wait_controller_ready(ctl).or_panic();
    eventually(
        Duration::from_secs(30),
        "the returned gateway back on its restarted controller, which names the same active one",
        || {
            let back = format!("node={}", ids[active]);
            ensure!(
                fleet.controllers[ctl]
                    .proc
                    .log_since_start()
                    .lines()
                    .any(|l| l.contains("WireGuard gateway connected") && l.contains(&back)),
                "the gateway is not back on controller {ctl} yet"
            );
            agreed(&fleet, standby)
        },
    )
    .or_panic();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        agreed(&fleet, standby).or_panic();
    }
}
