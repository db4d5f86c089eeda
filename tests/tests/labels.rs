//! Labels and selectors as an operator uses them: `shoalctl nodes label` (by hostname) moves a node
//! into and out of an overlay network whose selector has several terms, live — ping over the
//! overlay starts and stops working — and drive policies, budgets and windows select by
//! multi-term selectors and follow label changes at once; `nodes list -l` filters.
//!
//! Needs root (skips with a reason otherwise, fails under CI) and the binaries: `cargo build
//! --workspace --bins`.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use shoal_tests::netns::{ipv4_of as tap_addr, run_in};
use shoal_tests::{events, eventually, require_host_tests, Fleet, FleetConfig, OrPanic};

/// Deadline for agents to get a netmap change and bring a TAP device up or down.
const TAP_TIMEOUT: Duration = Duration::from_secs(30);

fn ping(ns: &str, to: Ipv4Addr) -> Result<String> {
    run_in(
        ns,
        "ping",
        &["-c", "1", "-W", "1", &to.to_string()],
        Duration::from_secs(30),
    )
}

fn fleet(agents: usize) -> Result<Fleet> {
    let mut fleet = Fleet::start(FleetConfig {
        wait_up: false,
        ..FleetConfig::fast().agents(0)
    })?;
    let token = fleet.create_token(&["--ttl", "1h", "--uses", &agents.to_string()])?;
    for _ in 0..agents {
        fleet.add_agent(&token)?;
    }
    fleet.wait_all_up(Duration::from_secs(60))?;
    Ok(fleet)
}

/// `shoalctl ARGS…`, expected to fail; its stderr.
fn ctl_fails(fleet: &Fleet, args: &[&str]) -> Result<String> {
    let out = fleet.ctl(args)?;
    ensure!(
        !out.status.success(),
        "`shoalctl {}` succeeded: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The ids `nodes list -l SELECTOR` returns.
fn selected(fleet: &Fleet, selector: &str) -> Result<Vec<String>> {
    let v = fleet.ctl_json(&["nodes", "list", "-l", selector])?;
    let mut ids: Vec<String> = v
        .as_array()
        .context("nodes list is not an array")?
        .iter()
        .filter_map(|n| n["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    Ok(ids)
}

#[test]
fn labelling_a_node_moves_it_into_and_out_of_a_selected_network_live() {
    require_host_tests!();
    let fleet = fleet(2).or_panic();
    let ns: Vec<String> = fleet.agents().iter().map(|a| a.netns.clone()).collect();
    let host: Vec<String> = fleet.agents().iter().map(|a| a.hostname.clone()).collect();
    let ids: Vec<String> = (0..2)
        .map(|i| fleet.node_id(i))
        .collect::<Result<_>>()
        .or_panic();
    fleet
        .ctl_ok(&["network", "create", "lab", "--subnet", "10.91.0.0/24"])
        .or_panic();
    fleet
        .ctl_ok(&[
            "network",
            "add",
            "lab",
            "--selector",
            "role=db,zone in (a,b)",
        ])
        .or_panic();
    // Nodes named by hostname; the first has only one of the labels the selector wants.
    let out = fleet
        .ctl_ok(&["nodes", "label", &host[0], "role=db"])
        .or_panic();
    assert!(out.contains("role=db added"), "{out}");
    fleet
        .ctl_ok(&["nodes", "label", &host[1], "role=db", "zone=b"])
        .or_panic();
    assert!(
        tap_addr(&ns[0], "shoal1").is_err(),
        "agent 1 (no zone) is not on lab"
    );
    fleet
        .ctl_ok(&["nodes", "label", &host[0], "zone=a"])
        .or_panic();
    let lab: Vec<Ipv4Addr> = eventually(TAP_TIMEOUT, "both agents have shoal1", || {
        ns.iter().map(|n| tap_addr(n, "shoal1")).collect()
    })
    .or_panic();
    eventually(
        Duration::from_secs(20),
        "agent 1 pings agent 2 on lab",
        || ping(&ns[0], lab[1]),
    )
    .or_panic();
    assert_eq!(selected(&fleet, "zone in (a,b),role=db").or_panic(), {
        let mut all = ids.clone();
        all.sort();
        all
    });
    assert_eq!(selected(&fleet, "zone=a").or_panic(), vec![ids[0].clone()]);

    // Another value needs --overwrite, as with kubectl; nothing changes without it.
    let err = ctl_fails(&fleet, &["nodes", "label", &host[1], "zone=c"]).or_panic();
    assert!(
        err.contains("already has zone=b") && err.contains("--overwrite"),
        "{err}"
    );
    ping(&ns[0], lab[1]).or_panic();
    let err = ctl_fails(&fleet, &["nodes", "label", &host[1], "bad key=x"]).or_panic();
    assert!(
        err.contains("label key \"bad key\" is not allowed"),
        "{err}"
    );
    let err = ctl_fails(&fleet, &["nodes", "list", "-l", "zone in (a"]).or_panic();
    assert!(err.contains("expected ',' or ')'"), "{err}");

    // Out of the selector's set: agent 2 leaves lab and stops answering there.
    fleet
        .ctl_ok(&["nodes", "label", &ids[1], "zone=c", "--overwrite"])
        .or_panic();
    let changed = Instant::now();
    eventually(TAP_TIMEOUT, "agent 2 unreachable on lab", || {
        ensure!(ping(&ns[0], lab[1]).is_err(), "still answers");
        Ok(())
    })
    .or_panic();
    eprintln!(
        "left lab {} ms after `nodes label` returned",
        changed.elapsed().as_millis()
    );
    eventually(TAP_TIMEOUT, "agent 2's shoal1 is gone", || {
        ensure!(tap_addr(&ns[1], "shoal1").is_err(), "shoal1 still there");
        Ok(())
    })
    .or_panic();
    let events = fleet.events().or_panic();
    let labelled: Vec<&Value> = events
        .iter()
        .filter(|e| events::is(e, "labels_changed", &ids[1]))
        .collect();
    assert_eq!(labelled.len(), 2, "{labelled:?}");
    assert!(
        events::message(labelled[1]).contains("zone=c (was b)"),
        "{labelled:?}"
    );
    // `events -l`: only the events about the nodes the selector matches.
    fleet
        .ctl_ok(&["nodes", "label", &host[0], "pick=me"])
        .or_panic();
    let picked = fleet.ctl_json(&["events", "-l", "pick=me"]).or_panic();
    let picked = picked.as_array().expect("an array");
    assert!(
        picked
            .iter()
            .any(|e| events::is(e, "labels_changed", &ids[0]))
            && picked.iter().all(|e| e["node"] == ids[0].as_str()),
        "{picked:?}"
    );

    // Removing the label and setting it back brings it in again.
    fleet
        .ctl_ok(&["nodes", "label", &host[1], "zone-"])
        .or_panic();
    fleet
        .ctl_ok(&["nodes", "label", &host[1], "zone=a"])
        .or_panic();
    let lab2 = eventually(TAP_TIMEOUT, "agent 2 has shoal1 again", || {
        tap_addr(&ns[1], "shoal1")
    })
    .or_panic();
    eventually(
        Duration::from_secs(20),
        "agent 1 pings agent 2 on lab again",
        || ping(&ns[0], lab2),
    )
    .or_panic();
    let wide = fleet.ctl_ok(&["nodes", "list", "-o", "wide"]).or_panic();
    assert!(
        wide.lines().next().unwrap_or_default().ends_with("LABELS")
            && wide.contains("role=db,zone=a"),
        "{wide}"
    );
}

#[test]
fn drive_policies_budgets_and_windows_select_by_several_terms_and_follow_labels() {
    require_host_tests!();
    let fleet = fleet(2).or_panic();
    let host: Vec<String> = fleet.agents().iter().map(|a| a.hostname.clone()).collect();
    let ids: Vec<String> = (0..2)
        .map(|i| fleet.node_id(i))
        .collect::<Result<_>>()
        .or_panic();
    fleet
        .ctl_ok(&["nodes", "label", &host[0], "role=db", "zone=a"])
        .or_panic();
    fleet
        .ctl_ok(&["nodes", "label", &host[1], "role=db", "zone=b", "spot=yes"])
        .or_panic();

    // A drive policy for db nodes that are not spot instances.
    fleet
        .ctl_ok(&[
            "drives",
            "policy",
            "set",
            "--selector",
            "role=db,!spot",
            "approve",
            "--fs",
            "xfs",
        ])
        .or_panic();
    let effective = |fleet: &Fleet| -> Result<Vec<(String, String)>> {
        let v = fleet.ctl_json(&["drives", "policy", "list"])?;
        let mut out: Vec<(String, String)> = v["effective"]
            .as_array()
            .context("no effective policies")?
            .iter()
            .map(|e| {
                (
                    e["node"].as_str().unwrap_or_default().to_owned(),
                    format!(
                        "{} {}",
                        e["mode"].as_str().unwrap_or_default(),
                        e["source"].as_str().unwrap_or_default()
                    ),
                )
            })
            .collect();
        out.sort();
        Ok(out)
    };
    let mut want = vec![
        (ids[0].clone(), "approve selector role=db,!spot".to_owned()),
        (ids[1].clone(), "report default".to_owned()),
    ];
    want.sort();
    assert_eq!(effective(&fleet).or_panic(), want);
    // No longer a spot instance: the policy applies to it at once.
    fleet
        .ctl_ok(&["nodes", "label", &host[1], "spot-"])
        .or_panic();
    let mut want = vec![
        (ids[0].clone(), "approve selector role=db,!spot".to_owned()),
        (ids[1].clone(), "approve selector role=db,!spot".to_owned()),
    ];
    want.sort();
    assert_eq!(effective(&fleet).or_panic(), want);

    // A budget counts the group its selector names, as labels are now.
    fleet
        .ctl_ok(&[
            "budget",
            "set",
            "--selector",
            "role=db,zone in (a,b)",
            "--max-unavailable",
            "1",
        ])
        .or_panic();
    let budget_nodes = |fleet: &Fleet| -> Result<u64> {
        let v = fleet.ctl_json(&["budget", "list"])?;
        v.as_array()
            .and_then(|a| a.first())
            .and_then(|b| b["nodes"].as_u64())
            .with_context(|| format!("budget list: {v}"))
    };
    assert_eq!(budget_nodes(&fleet).or_panic(), 2);
    fleet
        .ctl_ok(&["nodes", "label", &host[1], "zone=c", "--overwrite"])
        .or_panic();
    assert_eq!(budget_nodes(&fleet).or_panic(), 1);
    // Deleted by its selector text (one path segment, percent-encoded).
    fleet
        .ctl_ok(&["budget", "delete", "--selector", "zone in (b,a),role=db"])
        .or_panic();
    assert_eq!(
        fleet.ctl_json(&["budget", "list"]).or_panic(),
        serde_json::json!([])
    );

    // A window for zone a only: a run over every db node through it is refused, naming the
    // nodes outside the window — which follow the labels.
    fleet
        .ctl_ok(&[
            "window",
            "create",
            "zone-a",
            "--schedule",
            "@daily",
            "--duration",
            "1h",
            "--selector",
            "role=db,zone in (a)",
        ])
        .or_panic();
    let run = [
        "maintenance",
        "run",
        "smart-test",
        "--selector",
        "role=db",
        "--window",
        "zone-a",
    ];
    let err = ctl_fails(&fleet, &run).or_panic();
    assert!(
        err.contains("window zone-a is for role=db,zone in (a)")
            && err.contains(&ids[1])
            && !err.contains(&ids[0]),
        "{err}"
    );
    fleet
        .ctl_ok(&["nodes", "label", &host[0], "zone=b", "--overwrite"])
        .or_panic();
    fleet
        .ctl_ok(&["nodes", "label", &host[1], "zone=a", "--overwrite"])
        .or_panic();
    let err = ctl_fails(&fleet, &run).or_panic();
    assert!(err.contains(&ids[0]) && !err.contains(&ids[1]), "{err}");

    // `maintenance status -l`: the run's rows of the matching nodes only.
    fleet
        .ctl_ok(&[
            "maintenance",
            "run",
            "smart-test",
            "--selector",
            "role=db",
            "--now",
        ])
        .or_panic();
    let all = fleet.ctl_json(&["maintenance", "status"]).or_panic();
    let rows = |v: &Value| -> Vec<String> {
        v["nodes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|n| n["node"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(rows(&all).len(), 2, "{all}");
    let one = fleet
        .ctl_json(&["maintenance", "status", "-l", "zone=b"])
        .or_panic();
    assert_eq!(rows(&one), vec![ids[0].clone()], "{one}");
}
