//! Maintenance actions end to end, as an operator sees them through `shoalctl maintenance` and the
//! event log: a controller and three real agents (each in its own network namespace) with pre/post
//! hooks that log to a file per node, an allowed script, a stand-in reboot command and a boot id
//! file.
//!
//! - `exec` of an allowed script runs on every node, one at a time (max-unavailable 1): each node's
//!   log says pre, action, post, and the event log never has two nodes between `node_cordoned` and
//!   `node_up` at once;
//! - `exec` of a path no agent allows is refused by every node, naming `--allow-exec`; nothing
//!   runs, not even a hook;
//! - a failing pre-hook refuses the node (its post-hook runs to undo the drain) and the run pauses
//!   after max-failures 1, the other nodes untouched; abort ends it;
//! - `smart-test` on agents whose drives have no readable SMART succeeds with "no drives with
//!   SMART";
//! - `reboot` with a stand-in `--reboot-command` that changes the node's boot id file and stops the
//!   agent (the test starts it again, as the machine's init would): each node goes cordoned →
//!   rebooting → up once it reconnects from its "new boot".
//!
//! Needs root (skips with a reason otherwise, fails under CI).

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use shoal_tests::events as event;
use shoal_tests::{eventually, require_host_tests, Fleet, FleetConfig, OrPanic};

const TIMEOUT: Duration = Duration::from_secs(45);

#[test]
fn maintenance_runs_walk_nodes_through_hooks_actions_and_reboots_within_limits() {
    require_host_tests!();
    scenario().or_panic();
}

fn script(path: &Path, body: &str) -> Result<()> {
    std::fs::write(path, format!("#!/bin/sh\n{body}"))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(())
}

/// Starts a run; its id.
fn run(fleet: &Fleet, args: &[&str]) -> Result<String> {
    let mut all = vec!["maintenance", "run"];
    all.extend_from_slice(args);
    let out = fleet.ctl_ok(&all)?;
    println!("{}", out.trim());
    out.split_whitespace()
        .nth(3)
        .map(|s| s.trim_end_matches(':').to_owned())
        .context("run id")
}

/// `maintenance status ID -o json` once `finished` (or, with `paused`, once paused).
fn wait_run(
    fleet: &Fleet,
    id: &str,
    paused: bool,
    mut each: impl FnMut() -> Result<()>,
) -> Result<Value> {
    eventually!(TIMEOUT * 2, &format!("maintenance run {id} ends"), || {
        each()?;
        let r = fleet.ctl_json(&["maintenance", "status", id])?;
        let over = if paused {
            r["state"] == "paused"
        } else {
            r["finished"] == true
        };
        ensure!(over, "not yet: {r}");
        Ok(r)
    })
}

fn node_entry<'a>(r: &'a Value, node: &str) -> Result<&'a Value> {
    r["nodes"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["node"] == node))
        .with_context(|| format!("{node} in {r}"))
}

fn events_of(fleet: &Fleet, run: &str) -> Result<Vec<Value>> {
    let needle = format!("run {run}:");
    Ok(fleet
        .events()?
        .into_iter()
        .filter(|e| e["message"].as_str().is_some_and(|m| m.contains(&needle)))
        .collect())
}

fn scenario() -> Result<()> {
    let work = tempfile::Builder::new().prefix("shoal-maint-").tempdir()?;
    let w = work.path();
    let mark = w.join("mark.sh");
    // The allowed program: logs to the node's file (the agents' hostnames are agent-N).
    script(
        &mark,
        &format!(
            "echo \"action $1\" >> '{}'/log-$(hostname)\nsleep 0.5\n",
            w.display()
        ),
    )?;
    let fail_pre = w.join("fail-pre");

    let mut cfg = FleetConfig::fast().agents(0);
    cfg.wait_up = false;
    let mut fleet = Fleet::start(cfg)?;
    let token = fleet.create_token(&["--ttl", "1h", "--uses", "3", "--label", "pool=maint"])?;
    for n in 1..=3 {
        let log = w.join(format!("log-agent-{n}"));
        let boot = w.join(format!("boot-{n}"));
        std::fs::write(&boot, format!("boot-{n}-first\n"))?;
        let pre = format!(
            "if [ -e '{f}' ]; then echo pre-failed >> '{l}'; echo 'drain timed out' >&2; exit 1; fi; echo \"pre $SHOAL_MAINTENANCE_ACTION $SHOAL_MAINTENANCE_RUN\" >> '{l}'",
            f = fail_pre.display(),
            l = log.display()
        );
        let post = format!("echo post >> '{}'", log.display());
        // The stand-in reboot: a new boot id, then the agent stops (the test plays init and starts
        // it).
        let reboot = format!(
            "echo boot-{n}-$(date +%s%N) > '{}'; kill -TERM $PPID",
            boot.display()
        );
        let args = [
            "--smartctl",
            "/bin/false",
            "--allow-exec",
            &mark.display().to_string(),
            "--pre-hook",
            &pre,
            "--post-hook",
            &post,
            "--boot-id-file",
            &boot.display().to_string(),
            "--reboot-command",
            &reboot,
            "--maintenance-timeout",
            "20s",
        ];
        fleet.config_mut().agent_args = args.iter().map(|s| s.to_string()).collect();
        fleet.add_agent(&token)?;
    }
    fleet.wait_all_up(TIMEOUT)?;
    let ids: Vec<String> = (0..3).map(|i| fleet.node_id(i)).collect::<Result<_>>()?;
    let log =
        |n: usize| std::fs::read_to_string(w.join(format!("log-agent-{n}"))).unwrap_or_default();

    // 1. An allowed exec, one node at a time.
    let r1 = run(
        &fleet,
        &[
            "exec",
            "--selector",
            "pool=maint",
            "--now",
            "--max-unavailable",
            "1",
            "--",
            &mark.display().to_string(),
            "hello",
        ],
    )?;
    let r = wait_run(&fleet, &r1, false, || Ok(()))?;
    println!("{}", fleet.ctl_ok(&["maintenance", "status", &r1])?);
    ensure!(
        r["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("action exec")),
        "{r}"
    );
    for (i, id) in ids.iter().enumerate() {
        let e = node_entry(&r, id)?;
        ensure!(e["phase"] == "succeeded" && e["step"] == "up", "{e}");
        ensure!(
            log(i + 1) == format!("pre exec {r1}\naction hello\npost\n"),
            "agent-{}: {:?}",
            i + 1,
            log(i + 1)
        );
    }
    let mut open = std::collections::BTreeSet::new();
    let mut seen = 0;
    for e in events_of(&fleet, &r1)? {
        let node = e["node"].as_str().unwrap_or_default().to_owned();
        match e["kind"].as_str() {
            Some("node_cordoned") => {
                open.insert(node);
                seen += 1;
                ensure!(
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
    ensure!(
        seen == 3 && open.is_empty(),
        "cordoned {seen}, still open {open:?}"
    );

    // 2. A program no agent allows: refused before any hook, nothing runs.
    let forbidden = w.join("forbidden");
    let r2 = run(
        &fleet,
        &[
            "exec",
            "--selector",
            "pool=maint",
            "--now",
            "--max-unavailable",
            "3",
            "--max-failures",
            "5",
            "--",
            "/usr/bin/touch",
            &forbidden.display().to_string(),
        ],
    )?;
    let r = wait_run(&fleet, &r2, false, || Ok(()))?;
    for id in &ids {
        let e = node_entry(&r, id)?;
        ensure!(
            e["phase"] == "failed"
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("--allow-exec")),
            "{e}"
        );
    }
    ensure!(!forbidden.exists(), "the forbidden command ran");
    for n in 1..=3 {
        ensure!(
            !log(n).contains(&r2),
            "a hook ran for the refused run on agent-{n}: {}",
            log(n)
        );
    }

    // 3. The pre-hook fails everywhere: the first node is refused (its post-hook undoes the drain),
    //    the run pauses after one failure, the others are untouched.
    std::fs::write(&fail_pre, "")?;
    let before: Vec<String> = (1..=3).map(log).collect();
    let r3 = run(
        &fleet,
        &[
            "exec",
            "--selector",
            "pool=maint",
            "--now",
            "--max-failures",
            "1",
            "--",
            &mark.display().to_string(),
            "never",
        ],
    )?;
    let r = wait_run(&fleet, &r3, true, || Ok(()))?;
    println!("{}", fleet.ctl_ok(&["maintenance", "status", &r3])?);
    ensure!(
        r["reason"]
            .as_str()
            .is_some_and(|x| x.contains("drain timed out")),
        "{r}"
    );
    ensure!(
        r["progress"]["failed"] == 1 && r["progress"]["pending"] == 2,
        "{r}"
    );
    let changed: Vec<usize> = (1..=3).filter(|n| log(*n) != before[n - 1]).collect();
    ensure!(changed.len() == 1, "only one node was touched: {changed:?}");
    let grew = &log(changed[0])[before[changed[0] - 1].len()..];
    ensure!(
        grew == "pre-failed\npost\n",
        "the failed node ran: {grew:?}"
    );
    fleet.ctl_ok(&["maintenance", "abort", &r3])?;
    wait_run(&fleet, &r3, false, || Ok(()))?;
    std::fs::remove_file(&fail_pre)?;

    // 4. SMART self-tests on nodes without readable SMART: nothing to test is a success.
    let r4 = run(
        &fleet,
        &[
            "smart-test",
            "--selector",
            "pool=maint",
            "--now",
            "--max-unavailable",
            "3",
        ],
    )?;
    let r = wait_run(&fleet, &r4, false, || Ok(()))?;
    for id in &ids {
        let e = node_entry(&r, id)?;
        ensure!(e["phase"] == "succeeded", "{e}");
        ensure!(
            events_of(&fleet, &r4)?
                .iter()
                .any(|x| x["kind"] == "node_up"
                    && x["node"] == id.as_str()
                    && x["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("no drives with SMART"))),
            "{id}"
        );
    }

    // 5. Reboots, one at a time: the stand-in stops the agent; the test starts it again, as init
    //    would.
    let r5 = run(
        &fleet,
        &[
            "reboot",
            "--selector",
            "pool=maint",
            "--now",
            "--max-unavailable",
            "1",
        ],
    )?;
    let mut restarts = 0;
    let r = eventually!(TIMEOUT * 3, &format!("maintenance run {r5} ends"), || {
        for i in 0..3 {
            let a = fleet.agent(i);
            if !a.proc.is_running() {
                a.proc.restart()?;
                restarts += 1;
            }
        }
        let r = fleet.ctl_json(&["maintenance", "status", &r5])?;
        ensure!(r["finished"] == true, "not yet: {r}");
        Ok(r)
    })?;
    println!("{}", fleet.ctl_ok(&["maintenance", "status", &r5])?);
    ensure!(restarts == 3, "{restarts} agent restarts");
    for (i, id) in ids.iter().enumerate() {
        let e = node_entry(&r, id)?;
        ensure!(e["phase"] == "succeeded" && e["step"] == "up", "{e}");
        ensure!(
            e["output"]
                .as_str()
                .is_some_and(|o| o.contains("rebooted (boot")),
            "{e}"
        );
        let boot = std::fs::read_to_string(w.join(format!("boot-{}", i + 1)))?;
        ensure!(!boot.contains("first"), "agent-{} boot id unchanged", i + 1);
    }
    let events = events_of(&fleet, &r5)?;
    let mut open = std::collections::BTreeSet::new();
    for e in &events {
        let node = e["node"].as_str().unwrap_or_default().to_owned();
        match e["kind"].as_str() {
            Some("node_cordoned") => {
                open.insert(node);
                ensure!(open.len() <= 1, "two nodes rebooting at once: {open:?}");
            }
            Some("node_up") => {
                open.remove(&node);
            }
            _ => {}
        }
    }
    for id in &ids {
        for kind in [
            "node_cordoned",
            "node_in_maintenance",
            "node_rebooting",
            "node_up",
        ] {
            ensure!(
                events.iter().any(|e| event::is(e, kind, id)),
                "no {kind} for {id}"
            );
        }
    }
    fleet.wait_all_up(TIMEOUT)?;
    fleet.check_running()?;
    Ok(())
}
