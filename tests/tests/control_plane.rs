//! The control plane end to end, as an operator sees it through `shoalctl`: a controller and agents
//! as real processes, each in its own network namespace on one LAN. The controller runs with a 1 s
//! heartbeat and marks a node down after 3 missed heartbeats, so every wait below is a few seconds
//! at most.
//!
//! Needs root (skips with a reason otherwise, fails under CI) and the binaries: `cargo build
//! --workspace --bins`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use shoal_tests::events::{self as event, kinds};
use shoal_tests::fleet::{as_array, brief, has_mac, node_id, parse_time};
use shoal_tests::process::describe_status;
use shoal_tests::{consistently, eventually, require_host_tests, Fleet, FleetConfig, OrPanic};

/// Slack on top of the configured down window (heartbeat × down-after) for a 2-core machine under
/// load.
const DOWN_SLACK: Duration = Duration::from_secs(4);
/// Deadline for an agent to (re)connect and be reported "up".
const UP_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for agents to notice that the controller died (`kill -9`: no QUIC close reaches them)
/// and to reconnect to its successor. The successor keeps the QUIC stateless-reset key, so an
/// agent's next packet is answered with a reset and it reconnects within a heartbeat or two;
/// missing this deadline usually means the agents sat out QUIC's 30 s idle timeout instead.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline for a refused agent to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

fn str_field<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    v[key]
        .as_str()
        .filter(|s| !s.is_empty())
        .with_context(|| format!("`{key}` should be a non-empty string in {v}"))
}

fn u64_field(v: &Value, key: &str) -> Result<u64> {
    v[key]
        .as_u64()
        .with_context(|| format!("`{key}` should be an unsigned integer in {v}"))
}

fn find<'a>(nodes: &'a [Value], id: &str) -> Option<&'a Value> {
    nodes.iter().find(|n| node_id(n).is_ok_and(|i| i == id))
}

/// (a) Every agent enrolled and is up, and its node carries the inventory of the host it runs on.
fn check_registration(fleet: &Fleet) -> Result<()> {
    // Inventory and health may arrive a moment after the node is up.
    eventually(
        Duration::from_secs(15),
        "3 nodes with inventory and health",
        || {
            let nodes = fleet.nodes()?;
            ensure!(nodes.len() == 3, "expected 3 nodes, got {}", brief(&nodes));
            let mut ids: Vec<String> = nodes.iter().map(node_id).collect::<Result<_>>()?;
            ids.sort();
            ids.dedup();
            ensure!(ids.len() == 3, "node ids are not unique: {}", brief(&nodes));
            for (i, agent) in fleet.agents().iter().enumerate() {
                let node = fleet.node_of(i, &nodes).with_context(|| {
                    format!("no node for {} in {}", agent.hostname, brief(&nodes))
                })?;
                let ctx = || format!("node of {}: {node:#}", agent.hostname);
                ensure!(
                    node["status"] == "up",
                    "status is {}, not \"up\"",
                    node["status"]
                );
                ensure!(
                    str_field(node, "hostname")? == agent.hostname,
                    "top-level hostname; {}",
                    ctx()
                );
                str_field(node, "agent_version").with_context(ctx)?;
                str_field(node, "hardware_id").with_context(ctx)?;
                ensure!(
                    node["labels"].is_object(),
                    "labels should be an object; {}",
                    ctx()
                );
                parse_time(str_field(node, "last_seen")?).with_context(ctx)?;
                let inv = &node["inventory"];
                ensure!(inv.is_object(), "no inventory yet; {}", ctx());
                ensure!(
                    str_field(inv, "hostname")? == agent.hostname,
                    "inventory.hostname; {}",
                    ctx()
                );
                for key in ["os", "kernel", "arch"] {
                    str_field(inv, key).with_context(ctx)?;
                }
                ensure!(
                    u64_field(inv, "cpu_cores")? > 0,
                    "inventory.cpu_cores; {}",
                    ctx()
                );
                ensure!(
                    u64_field(inv, "memory_bytes")? > 0,
                    "inventory.memory_bytes; {}",
                    ctx()
                );
                ensure!(
                    inv["disks"].is_array(),
                    "inventory.disks should be an array; {}",
                    ctx()
                );
                let nics = inv["nics"]
                    .as_array()
                    .with_context(|| format!("inventory.nics; {}", ctx()))?;
                ensure!(
                    nics.iter().any(|n| n["name"] == agent.iface.as_str()),
                    "inventory.nics lacks {} ({}); {}",
                    agent.iface,
                    agent.mac,
                    ctx()
                );
                ensure!(
                    has_mac(node, &agent.mac),
                    "inventory.nics lacks MAC {}; {}",
                    agent.mac,
                    ctx()
                );
                let health = &node["health"];
                ensure!(health.is_object(), "no health report yet; {}", ctx());
                ensure!(
                    u64_field(health, "memory_total_bytes")? > 0,
                    "health.memory_total_bytes; {}",
                    ctx()
                );
            }
            Ok(())
        },
    )?;

    // `nodes show` agrees with `nodes list`; the tables name every host.
    let id = fleet.node_id(0)?;
    let shown = fleet.ctl_json(&["nodes", "show", &id])?;
    ensure!(node_id(&shown)? == id, "`nodes show {id}` showed {shown}");
    let table = fleet.ctl_ok(&["nodes", "list"])?;
    for a in fleet.agents() {
        ensure!(
            table.contains(&a.hostname),
            "`nodes list` table lacks {}:\n{table}",
            a.hostname
        );
    }
    Ok(())
}

/// (b) A killed agent is "down" within the window (not at once), shows in the report (f) and events
/// (g), and is "up" again under the same id when restarted.
fn check_down_and_back(fleet: &mut Fleet) -> Result<()> {
    let victim = 1;
    let id = fleet.node_id(victim)?;
    let window = fleet.config().down_window();
    let killed_at = Instant::now();
    fleet.agent(victim).proc.kill()?;
    let took = eventually(
        window + DOWN_SLACK,
        "the killed agent's node to be \"down\"",
        || {
            let nodes = fleet.nodes()?;
            let node = find(&nodes, &id)
                .with_context(|| format!("node {id} vanished: {}", brief(&nodes)))?;
            ensure!(node["status"] == "down", "node {id} is {}", node["status"]);
            Ok(killed_at.elapsed())
        },
    )?;
    eprintln!(
        "node {id} was marked down {took:.1?} after its agent was killed (window {window:?})"
    );
    let heartbeat = window / fleet.config().down_after.unwrap_or(3);
    ensure!(
        took >= heartbeat,
        "node {id} was marked down {took:?} after its agent died: sooner than one heartbeat ({heartbeat:?}), \
         so not by missed heartbeats"
    );
    // The others are unaffected.
    let nodes = fleet.nodes()?;
    ensure!(nodes.len() == 3, "expected 3 nodes: {}", brief(&nodes));
    for i in [0, 2] {
        let n = fleet.node_of(i, &nodes).context("node missing")?;
        ensure!(
            n["status"] == "up",
            "{} should still be up: {}",
            fleet.agents()[i].hostname,
            brief(&nodes)
        );
    }

    // (f) The report lists the down node under attention, with a reason starting with "down".
    let report = fleet.report()?;
    ensure!(
        u64_field(&report, "total")? == 3,
        "report total: {report:#}"
    );
    ensure!(
        report["by_status"]["down"] == 1,
        "report by_status: {report:#}"
    );
    ensure!(
        report["by_status"]["up"] == 2,
        "report by_status: {report:#}"
    );
    parse_time(str_field(&report, "generated_at")?)?;
    let attention = report["attention"]
        .as_array()
        .context("report.attention should be an array")?;
    let entry = attention
        .iter()
        .find(|e| node_id(e).is_ok_and(|i| i == id))
        .with_context(|| format!("down node {id} is not under attention: {report:#}"))?;
    ensure!(entry["status"] == "down", "attention entry: {entry}");
    ensure!(
        entry["hostname"] == fleet.agents()[victim].hostname.as_str(),
        "attention entry: {entry}"
    );
    let reasons = entry["reasons"]
        .as_array()
        .context("attention reasons should be an array")?;
    ensure!(
        reasons
            .iter()
            .any(|r| r.as_str().is_some_and(|r| r.starts_with("down"))),
        "no reason starting with \"down\" in {entry}"
    );
    let table = fleet.ctl_ok(&["report"])?;
    let victim_name = &fleet.agents()[victim].hostname;
    ensure!(
        table.contains(victim_name) || table.contains(&id),
        "`report` table does not name {victim_name}:\n{table}"
    );

    // Back up under the same id, without a duplicate node.
    fleet.agent(victim).proc.restart()?;
    eventually(
        UP_TIMEOUT,
        "the restarted agent's node to be \"up\" again",
        || {
            fleet
                .agent(victim)
                .proc
                .ensure_running()
                .map_err(|e| shoal_tests::abort(format!("{e:#}")))?;
            let nodes = fleet.nodes()?;
            ensure!(
                nodes.len() == 3,
                "expected 3 nodes (no duplicate): {}",
                brief(&nodes)
            );
            let node = find(&nodes, &id)
                .with_context(|| format!("node {id} is gone: {}", brief(&nodes)))?;
            ensure!(node["status"] == "up", "node {id} is {}", node["status"]);
            Ok(())
        },
    )?;

    // (g) The event log tells the story: enrolled, up, down, up again.
    let events = fleet.events()?;
    let k = kinds(&events);
    ensure!(
        k.iter().filter(|k| **k == "enrolled").count() >= 3,
        "fewer than 3 \"enrolled\" events: {k:?}"
    );
    let of_victim: Vec<&Value> = events
        .iter()
        .filter(|e| e["node"].as_str() == Some(id.as_str()))
        .collect();
    let seq_of = |kind: &str| -> Vec<u64> {
        of_victim
            .iter()
            .filter(|e| e["kind"] == kind)
            .filter_map(|e| e["seq"].as_u64())
            .collect()
    };
    let (enrolled, ups, downs) = (seq_of("enrolled"), seq_of("up"), seq_of("down"));
    ensure!(
        !enrolled.is_empty() && !ups.is_empty() && !downs.is_empty(),
        "events of node {id}: {of_victim:#?}"
    );
    let down = downs[0];
    ensure!(
        ups.iter().any(|s| *s < down),
        "no \"up\" before \"down\" for node {id}: {of_victim:#?}"
    );
    ensure!(
        ups.iter().any(|s| *s > down),
        "no \"up\" after \"down\" for node {id}: {of_victim:#?}"
    );
    for e in &events {
        parse_time(str_field(e, "at")?).with_context(|| format!("event {e}"))?;
    }
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    ensure!(
        seqs.len() == events.len(),
        "every event needs a numeric seq: {events:#?}"
    );
    let mut sorted = seqs.clone();
    sorted.sort();
    sorted.dedup();
    ensure!(
        sorted.len() == seqs.len(),
        "event seqs are not unique: {seqs:?}"
    );
    Ok(())
}

/// A host cut off the network (its agent still running) is "down" within the window, and "up" again
/// under the same id once its cable is back, without anyone restarting the agent.
fn check_partition(fleet: &mut Fleet) -> Result<()> {
    let victim = 2;
    let id = fleet.node_id(victim)?;
    let window = fleet.config().down_window();
    fleet.cut_agent(victim)?;
    let cut_at = Instant::now();
    eventually(
        window + DOWN_SLACK,
        "the cut-off node to be \"down\"",
        || {
            ensure!(
                status_of(fleet, &id)? == "down",
                "node {id} is not down yet"
            );
            Ok(())
        },
    )?;
    eprintln!("cut-off node {id} was down after {:.1?}", cut_at.elapsed());
    fleet.restore_agent(victim)?;
    let restored_at = Instant::now();
    eventually(
        UP_TIMEOUT,
        "the node to be \"up\" again once reconnected",
        || {
            fleet
                .agent(victim)
                .proc
                .ensure_running()
                .map_err(|e| shoal_tests::abort(format!("{e:#}")))?;
            ensure!(status_of(fleet, &id)? == "up", "node {id} is not up yet");
            let nodes = fleet.nodes()?;
            ensure!(nodes.len() == 3, "expected 3 nodes: {}", brief(&nodes));
            Ok(())
        },
    )?;
    eprintln!(
        "node {id} was up {:.1?} after its network came back",
        restored_at.elapsed()
    );
    Ok(())
}

fn status_of(fleet: &Fleet, id: &str) -> Result<String> {
    let nodes = fleet.nodes()?;
    let node = find(&nodes, id).with_context(|| format!("node {id} is gone: {}", brief(&nodes)))?;
    Ok(node["status"].as_str().unwrap_or_default().to_string())
}

#[test]
fn agents_enrol_with_inventory_and_go_down_and_back_up_under_the_same_id() {
    require_host_tests!();
    let mut fleet = Fleet::start(FleetConfig::fast()).or_panic();
    check_registration(&fleet)
        .context("(a) registration")
        .or_panic();
    check_down_and_back(&mut fleet)
        .context("(b) down and back")
        .or_panic();
    check_partition(&mut fleet)
        .context("(b') network partition")
        .or_panic();
}

/// (c) After `kill -9` and a restart on the same data dir, the controller still knows every node,
/// and the agents reconnect by themselves (their `last_seen` moves past the restart).
fn check_controller_restart(fleet: &mut Fleet) -> Result<()> {
    let before: BTreeMap<String, String> = (0..3)
        .map(|i| Ok((fleet.agents()[i].hostname.clone(), fleet.node_id(i)?)))
        .collect::<Result<_>>()?;
    fleet.controller().kill()?;
    let restarted_at = SystemTime::now();
    fleet.controller().restart()?;
    fleet.wait_controller_ready()?;
    let restarted = Instant::now();
    eventually(
        RECONNECT_TIMEOUT,
        "every agent to reconnect to the restarted controller",
        || {
            fleet
                .check_running()
                .map_err(|e| shoal_tests::abort(format!("{e:#}")))?;
            let nodes = fleet.nodes()?;
            ensure!(
                nodes.len() == 3,
                "expected the same 3 nodes: {}",
                brief(&nodes)
            );
            for (hostname, id) in &before {
                let node = find(&nodes, id).with_context(|| {
                    format!("{hostname}'s node {id} is gone: {}", brief(&nodes))
                })?;
                ensure!(
                    node["status"] == "up",
                    "{hostname}'s node {id} is {}",
                    node["status"]
                );
                let seen = parse_time(str_field(node, "last_seen")?)?;
                let ago = restarted_at.duration_since(seen).unwrap_or_default();
                ensure!(
                    seen >= restarted_at,
                    "{hostname}'s node {id} was last seen {} before the restart: not reconnected",
                    humantime::format_duration(ago)
                );
            }
            Ok(())
        },
    )?;
    eprintln!(
        "agents reconnected {:.1?} after the controller restarted",
        restarted.elapsed()
    );
    Ok(())
}

/// Words an agent's log may use when the controller no longer accepts it.
const REFUSAL_WORDS: &[&str] = &[
    "revok",
    "remov",
    "refus",
    "reject",
    "denied",
    "forbidden",
    "unknown node",
];

/// (d) A removed node disappears, its agent is refused and says so, and the node does not come
/// back.
fn check_removal(fleet: &mut Fleet) -> Result<()> {
    let victim = 0;
    let id = fleet.node_id(victim)?;
    fleet.ctl_ok(&["nodes", "remove", &id])?;
    eventually(
        Duration::from_secs(10),
        "the removed node to disappear from `nodes list`",
        || {
            let nodes = fleet.nodes()?;
            ensure!(
                find(&nodes, &id).is_none(),
                "node {id} is still listed: {}",
                brief(&nodes)
            );
            ensure!(nodes.len() == 2, "expected 2 nodes: {}", brief(&nodes));
            Ok(())
        },
    )?;
    eventually(
        Duration::from_secs(15),
        "the removed node's agent to log that it was refused",
        || {
            let log = fleet.agent(victim).proc.log_since_start().to_lowercase();
            ensure!(
                REFUSAL_WORDS.iter().any(|w| log.contains(w)),
                "the agent's log mentions none of {REFUSAL_WORDS:?}"
            );
            Ok(())
        },
    )?;
    // It stays gone: no node with that id, nor a new one for that host, for several heartbeats.
    consistently(
        Duration::from_secs(5),
        "the removed node to stay absent",
        || {
            let nodes = fleet.nodes()?;
            ensure!(
                find(&nodes, &id).is_none(),
                "node {id} came back: {}",
                brief(&nodes)
            );
            ensure!(
                fleet.node_of(victim, &nodes).is_none(),
                "the removed agent enrolled again: {}",
                brief(&nodes)
            );
            ensure!(nodes.len() == 2, "expected 2 nodes: {}", brief(&nodes));
            Ok(())
        },
    )?;
    let events = fleet.events()?;
    ensure!(
        events.iter().any(|e| event::is(e, "removed", &id)),
        "no \"removed\" event for node {id}: {:?}",
        kinds(&events)
    );
    Ok(())
}

#[test]
fn controller_restart_keeps_nodes_and_removed_nodes_stay_removed() {
    require_host_tests!();
    let mut fleet = Fleet::start(FleetConfig::fast()).or_panic();
    check_controller_restart(&mut fleet)
        .context("(c) controller restart")
        .or_panic();
    check_removal(&mut fleet)
        .context("(d) node removal")
        .or_panic();
}

/// Waits for agent `i` to exit and checks it was refused: exit code 2 and one of `words` in its
/// log.
fn check_refused(fleet: &mut Fleet, i: usize, words: &[&str]) -> Result<()> {
    let agent = fleet.agent(i);
    let status = agent
        .proc
        .wait_exit(EXIT_TIMEOUT)
        .with_context(|| format!("{} should exit when its token is refused", agent.hostname))?;
    let log = agent.proc.log();
    ensure!(
        status.code() == Some(2),
        "{} exited with {}, not exit code 2; its log:\n{log}",
        agent.hostname,
        describe_status(&status)
    );
    let lower = log.to_lowercase();
    if !words.iter().any(|w| lower.contains(w)) {
        bail!(
            "{}'s log mentions none of {words:?}:\n{log}",
            agent.hostname
        );
    }
    Ok(())
}

/// The entry of `token list -o json` whose labels include `test=<tag>`.
fn token_tagged(fleet: &Fleet, tag: &str) -> Result<Value> {
    let tokens = as_array(fleet.ctl_json(&["token", "list"])?, "token list")?;
    tokens
        .into_iter()
        .find(|t| t["labels"]["test"] == tag)
        .with_context(|| format!("no token labelled test={tag} in `token list`"))
}

/// Waits until the token labelled `test=<tag>` is in `state`.
fn wait_token_state(fleet: &Fleet, tag: &str, state: &str) -> Result<()> {
    let desc = format!("token test={tag} to be {state:?} in `token list`");
    eventually(Duration::from_secs(10), &desc, || {
        let t = token_tagged(fleet, tag)?;
        ensure!(t["state"] == state, "token: {t}");
        Ok(())
    })
}

/// (e) Expired, used-up and revoked tokens are refused: the agent exits with code 2 and says why,
/// and no node is created for it. The node that did enrol carries its token's labels.
fn check_tokens(fleet: &mut Fleet) -> Result<()> {
    let short = fleet.create_token(&["--ttl", "1s", "--uses", "5", "--label", "test=short"])?;
    let once = fleet.create_token(&[
        "--ttl",
        "1h",
        "--uses",
        "1",
        "--label",
        "test=once",
        "--label",
        "rack=r7",
    ])?;
    let revoked = fleet.create_token(&["--ttl", "1h", "--label", "test=revoked"])?;
    ensure!(
        short != once && once != revoked && short != revoked,
        "token creations printed the same token twice"
    );
    let revoked_id = str_field(&token_tagged(fleet, "revoked")?, "id")?.to_string();
    fleet.ctl_ok(&["token", "revoke", &revoked_id])?;
    wait_token_state(fleet, "revoked", "revoked")?;

    let first = fleet.add_agent(&once)?;
    fleet
        .wait_all_up(UP_TIMEOUT)
        .context("the first user of a one-use token should enrol")?;
    wait_token_state(fleet, "once", "used_up")?;
    wait_token_state(fleet, "short", "expired")?;

    let expired = fleet.add_agent(&short)?;
    let used_up = fleet.add_agent(&once)?;
    let was_revoked = fleet.add_agent(&revoked)?;
    check_refused(fleet, expired, &["expired"]).context("agent with an expired token")?;
    check_refused(fleet, used_up, &["used"]).context("agent with a used-up token")?;
    check_refused(fleet, was_revoked, &["revoked"]).context("agent with a revoked token")?;

    let nodes = fleet.nodes()?;
    ensure!(
        nodes.len() == 1,
        "only the first agent should have a node: {}",
        brief(&nodes)
    );
    let node = fleet
        .node_of(first, &nodes)
        .context("the first agent's node is missing")?;
    ensure!(
        node["status"] == "up",
        "the first agent's node is {}",
        node["status"]
    );
    ensure!(
        node["labels"]["rack"] == "r7",
        "the node should carry its token's labels: {node:#}"
    );
    let events = fleet.events()?;
    let k = kinds(&events);
    ensure!(
        k.iter().filter(|k| **k == "token_created").count() >= 3 && k.contains(&"token_revoked"),
        "events should record token creation and revocation: {k:?}"
    );
    Ok(())
}

#[test]
fn expired_used_up_and_revoked_tokens_are_refused() {
    require_host_tests!();
    let mut fleet = Fleet::start(FleetConfig::fast().agents(0)).or_panic();
    check_tokens(&mut fleet)
        .context("(e) join tokens")
        .or_panic();
}

/// The node's events since `after` (by seq).
fn node_events_after(fleet: &Fleet, node: &str, after: u64) -> Result<Vec<Value>> {
    Ok(event::of_node_after(fleet.events()?, node, after))
}

/// (f) A second machine on the LAN, holding a valid general token and claiming a live node's
/// hardware identity, gets no certificate: every attempt is refused and logged, and the real node
/// keeps its session throughout. When the real node then reboots without its key (a diskless node),
/// its claim and the impostor's both wait for an operator, who approves the real one and denies the
/// impostor.
fn check_impostor(fleet: &mut Fleet) -> Result<()> {
    fleet.wait_all_up(UP_TIMEOUT)?;
    let node = fleet.node_id(0)?;
    let victim_machine = fleet.agents()[0].machine_id.clone();
    let start = event::last_seq(&fleet.events()?);
    let token = fleet.create_token(&["--label", "test=impostor"])?;
    let impostor = fleet.add_agent_claiming(&token, &victim_machine)?;

    eventually!(
        UP_TIMEOUT,
        "the impostor's claims to be refused and logged",
        || {
            let refused: Vec<Value> = node_events_after(fleet, &node, start)?
                .into_iter()
                .filter(|e| e["kind"] == "claim_refused")
                .collect();
            ensure!(
                refused.len() >= 2,
                "claim_refused events so far: {refused:?}"
            );
            Ok(())
        }
    )?;
    // Throughout, the real node stays up on its one connection, and the impostor has nothing.
    consistently(
        Duration::from_secs(6),
        "the real node keeps its session while the impostor retries",
        || {
            let nodes = fleet.nodes()?;
            ensure!(
                nodes.len() == 1,
                "the impostor got a node of its own: {}",
                brief(&nodes)
            );
            let n = &nodes[0];
            ensure!(
                n["id"] == node.as_str() && n["status"] == "up" && n["connected"] == true,
                "the real node: {n}"
            );
            let others: Vec<Value> = node_events_after(fleet, &node, start)?
                .into_iter()
                .filter(|e| e["kind"] != "claim_refused")
                .collect();
            ensure!(
                others.is_empty(),
                "the real node saw more than refusals: {others:?}"
            );
            Ok(())
        },
    )?;
    let certs = as_array(fleet.ctl_json(&["certs", "list", &node])?, "certs list")?;
    ensure!(
        certs.len() == 1,
        "one certificate, the real node's: {certs:?}"
    );
    let impostor_dir = fleet.agents()[impostor].state_dir.clone();
    ensure!(
        !impostor_dir.join("node.crt").exists(),
        "the impostor holds a certificate"
    );
    let log = fleet.agent(impostor).proc.log();
    ensure!(
        log.contains("connected right now"),
        "the impostor is told why; its log:\n{log}"
    );
    let token_info = token_tagged(fleet, "impostor")?;
    ensure!(
        token_info["uses"] == 0,
        "refusals spend no token use: {token_info}"
    );

    // The real node reboots diskless: its state (and key) is gone; it enrols again with a general
    // token.
    let real = fleet.agent(0);
    real.proc.kill()?;
    std::fs::remove_dir_all(&real.state_dir)?;
    std::fs::create_dir_all(&real.state_dir)?;
    let real_addr = real.addr.to_string();
    let impostor_addr = fleet.agents()[impostor].addr.to_string();
    let token2 = fleet.create_token(&["--label", "test=reboot"])?;
    let real = &mut fleet.agent(0).proc;
    real.set_arg("--token", &token2);
    real.restart()?;
    let (real_request, impostor_request) = eventually!(
        UP_TIMEOUT * 2,
        "both claims to wait in `nodes pending`",
        || {
            let pending = as_array(fleet.ctl_json(&["nodes", "pending"])?, "nodes pending")?;
            let from = |addr: &str| {
                pending
                    .iter()
                    .find(|p| {
                        p["remote"]
                            .as_str()
                            .is_some_and(|r| r.starts_with(&format!("{addr}:")))
                    })
                    .cloned()
            };
            match (from(&real_addr), from(&impostor_addr)) {
                (Some(r), Some(i)) => Ok((r, i)),
                _ => bail!("pending: {pending:?}"),
            }
        }
    )?;
    ensure!(real_request["node"] == node.as_str() && impostor_request["node"] == node.as_str());
    let (real_id, impostor_id) = (
        str_field(&real_request, "id")?.to_owned(),
        str_field(&impostor_request, "id")?.to_owned(),
    );
    fleet.ctl_ok(&["nodes", "deny", &impostor_id])?;
    fleet.ctl_ok(&["nodes", "approve", &real_id])?;
    eventually!(UP_TIMEOUT, "the real machine back as its own node", || {
        ensure!(fleet.node_id(0)? == node, "not the same node");
        let nodes = fleet.nodes()?;
        ensure!(
            nodes.len() == 1 && nodes[0]["status"] == "up" && nodes[0]["connected"] == true,
            "{}",
            brief(&nodes)
        );
        Ok(())
    })?;
    let status = fleet
        .agent(impostor)
        .proc
        .wait_exit(EXIT_TIMEOUT)
        .context("the denied impostor stops")?;
    ensure!(
        status.code() == Some(3),
        "the denied impostor exits 3, not {}",
        describe_status(&status)
    );
    let kinds: Vec<String> = node_events_after(fleet, &node, start)?
        .iter()
        .map(|e| event::kind(e).to_owned())
        .collect();
    for k in [
        "enrolment_pending",
        "enrolment_denied",
        "enrolment_approved",
        "reenrolled",
    ] {
        ensure!(kinds.iter().any(|x| x == k), "no {k} event among {kinds:?}");
    }
    Ok(())
}

#[test]
fn an_impostor_with_a_valid_token_gets_no_certificate_and_the_live_node_keeps_its_session() {
    require_host_tests!();
    let mut fleet = Fleet::start(FleetConfig::fast().agents(1)).or_panic();
    check_impostor(&mut fleet)
        .context("(f) impostor")
        .or_panic();
}
