//! Controller disaster recovery end to end, as an operator lives it: a controller and two real
//! agents (each in its own network namespace), a second overlay network and a finished maintenance
//! run; `shoalctl controller backup` while the fleet runs; the controller stopped and its data dir
//! destroyed; `shoal-controller restore` into a new dir; the controller started on it at the same
//! address.
//!
//! - the same agents come back `up` under the same node ids, with the same overlay addresses, and
//!   none enrols again (no `enrolled` or `reenrolled` event after the restore: agents reconnect with
//!   the certificates they hold, which chain to the restored CA);
//! - the networks, the maintenance run and the event log before the backup are intact, and the
//!   old `admin.conf` credential still works (the restored one is byte-for-byte the same);
//! - a wrong passphrase and a truncated file are refused by name, and the target dir is left
//!   absent (or empty, when it existed empty).
//!
//! Needs root (skips with a reason otherwise, fails under CI).

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use shoal_tests::{eventually, fleet::parse_time, require_host_tests, Fleet, FleetConfig, OrPanic};

const TIMEOUT: Duration = Duration::from_secs(60);
const PASSPHRASE: &str = "a long and memorable passphrase";

#[test]
fn a_controller_restored_from_its_backup_is_the_same_fleet() {
    require_host_tests!();
    scenario().or_panic();
}

/// Node id → address in `network`.
fn addresses(fleet: &Fleet, network: &str) -> Result<BTreeMap<String, String>> {
    let detail = fleet.ctl_json(&["network", "show", network])?;
    detail["members"]
        .as_array()
        .context("members")?
        .iter()
        .map(|m| {
            Ok((
                m["node"].as_str().context("node")?.to_owned(),
                m["address"].as_str().context("address")?.to_owned(),
            ))
        })
        .collect()
}

fn enrolments(events: &[Value]) -> usize {
    events
        .iter()
        .filter(|e| e["kind"] == "enrolled" || e["kind"] == "reenrolled")
        .count()
}

fn restore(
    fleet: &Fleet,
    from: &Path,
    to: &Path,
    passphrase: &Path,
) -> Result<std::process::Output> {
    let out = Command::new(&fleet.bins().controller)
        .arg("restore")
        .arg("--from")
        .arg(from)
        .arg("--data-dir")
        .arg(to)
        .arg("--passphrase-file")
        .arg(passphrase)
        .output()?;
    println!(
        "$ shoal-controller restore --from {} --data-dir {}\n{}{}",
        from.display(),
        to.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

fn empty_or_absent(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

fn scenario() -> Result<()> {
    let mut cfg = FleetConfig::fast().agents(0);
    cfg.wait_up = false;
    let mut fleet = Fleet::start(cfg)?;
    let token = fleet.create_token(&["--ttl", "1h", "--uses", "2", "--label", "pool=dr"])?;
    for _ in 0..2 {
        fleet.add_agent(&token)?;
    }
    fleet.wait_all_up(TIMEOUT)?;
    let ids: Vec<String> = (0..2).map(|i| fleet.node_id(i)).collect::<Result<_>>()?;

    // A second network with both nodes, and a maintenance run that finishes (SMART self-tests on
    // nodes without readable SMART: nothing to test is a success).
    fleet.ctl_ok(&["network", "create", "lab", "--subnet", "10.91.0.0/24"])?;
    for id in &ids {
        fleet.ctl_ok(&["network", "add", "lab", "--node", id])?;
    }
    let out = fleet.ctl_ok(&[
        "maintenance",
        "run",
        "smart-test",
        "--selector",
        "pool=dr",
        "--now",
        "--max-unavailable",
        "2",
    ])?;
    println!("{}", out.trim());
    let run = out
        .split_whitespace()
        .nth(3)
        .map(|s| s.trim_end_matches(':').to_owned())
        .context("run id")?;
    let run_before = eventually(TIMEOUT, "the maintenance run finishes", || {
        let r = fleet.ctl_json(&["maintenance", "status", &run])?;
        ensure!(r["finished"] == true, "not yet: {r}");
        Ok(r)
    })?;
    let default_before = addresses(&fleet, "default")?;
    let lab_before = addresses(&fleet, "lab")?;
    ensure!(
        lab_before.len() == 2 && default_before.len() == 2,
        "{lab_before:?} {default_before:?}"
    );
    let admin_conf = std::fs::read(fleet.admin_conf())?;

    // The backup, while the fleet runs.
    let work = fleet.dir().to_owned();
    let pass = work.join("passphrase");
    std::fs::write(&pass, format!("{PASSPHRASE}\n"))?;
    // A backup target (its password sealed in the store) and a job, to find again after the
    // restore.
    let data = work.join("node-data");
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("a.txt"), "kept\n")?;
    let repo = work.join("restic-repos");
    fleet.ctl_ok(&[
        "backup",
        "target",
        "add",
        "local",
        &repo.display().to_string(),
        "--password-file",
        &pass.display().to_string(),
    ])?;
    fleet.ctl_ok(&[
        "backup",
        "job",
        "create",
        "home",
        "--path",
        &data.display().to_string(),
        "--schedule",
        "0 3 * * *",
        "--target",
        "local",
    ])?;
    let backup = work.join("controller.age");
    let said = fleet.ctl_ok(&[
        "controller",
        "backup",
        "--out",
        &backup.display().to_string(),
        "--passphrase-file",
        &pass.display().to_string(),
    ])?;
    println!("{}", said.trim());
    ensure!(fleet.nodes()?.len() == 2, "the controller keeps serving");
    let short = work.join("short");
    std::fs::write(&short, "too short\n")?;
    let refused = fleet.ctl(&[
        "controller",
        "backup",
        "--out",
        &work.join("never.age").display().to_string(),
        "--passphrase-file",
        &short.display().to_string(),
    ])?;
    ensure!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("at least 12"),
        "a short passphrase is refused: {refused:?}"
    );
    ensure!(!work.join("never.age").exists());
    let events_before = fleet.events()?;
    let last_seq = events_before
        .last()
        .and_then(|e| e["seq"].as_u64())
        .context("events")?;
    let enrolled_before = enrolments(&events_before);
    ensure!(enrolled_before == 2, "two enrolments: {events_before:?}");

    // The disaster.
    fleet.controller().stop(Duration::from_secs(5))?;
    std::fs::remove_dir_all(fleet.data_dir())?;
    let new_dir = work.join("controller-restored");

    // A wrong passphrase and a truncated file are refused and write nothing.
    let wrong = work.join("wrong");
    std::fs::write(&wrong, "not the right passphrase\n")?;
    let out = restore(&fleet, &backup, &new_dir, &wrong)?;
    ensure!(!out.status.success(), "a wrong passphrase is refused");
    ensure!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"));
    ensure!(!new_dir.exists(), "nothing written");
    let bytes = std::fs::read(&backup)?;
    let truncated = work.join("truncated.age");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3])?;
    std::fs::create_dir(&new_dir)?;
    let out = restore(&fleet, &truncated, &new_dir, &pass)?;
    ensure!(!out.status.success(), "a truncated file is refused");
    ensure!(String::from_utf8_lossy(&out.stderr).contains("damaged or truncated"));
    ensure!(
        empty_or_absent(&new_dir),
        "nothing written into the empty dir"
    );

    // The restore, and the controller on it at the same address.
    let out = restore(&fleet, &backup, &new_dir, &pass)?;
    ensure!(out.status.success(), "the restore succeeds");
    ensure!(String::from_utf8_lossy(&out.stdout).contains("2 nodes"));
    ensure!(
        std::fs::read(new_dir.join("admin.conf"))? == admin_conf,
        "the same admin credential"
    );
    let restarted_at = SystemTime::now();
    fleet.use_data_dir(new_dir);
    fleet.controller().restart()?;
    fleet.wait_controller_ready()?;

    eventually(
        TIMEOUT,
        "both agents reconnect to the restored controller",
        || {
            let nodes = fleet.nodes()?;
            ensure!(nodes.len() == 2, "two nodes: {nodes:?}");
            for id in &ids {
                let n = nodes
                    .iter()
                    .find(|n| n["id"] == id.as_str())
                    .with_context(|| format!("node {id} is gone"))?;
                ensure!(n["status"] == "up", "{id} is {}", n["status"]);
                let seen = parse_time(n["last_seen"].as_str().context("last_seen")?)?;
                ensure!(seen >= restarted_at, "{id} has not reconnected yet");
            }
            Ok(())
        },
    )?;
    ensure!(
        addresses(&fleet, "default")? == default_before,
        "default addresses kept"
    );
    ensure!(
        addresses(&fleet, "lab")? == lab_before,
        "lab addresses kept"
    );
    // The backup job is intact, and its target's sealed password still opens: a backup runs.
    let jobs = fleet.ctl_json(&["backup", "job", "list"])?;
    ensure!(
        jobs.to_string().contains("\"home\""),
        "backup job kept: {jobs}"
    );
    fleet.ctl_ok(&["backup", "run", "home"])?;
    eventually(
        Duration::from_secs(120),
        "both nodes back up after the restore",
        || {
            let rows = fleet.ctl_json(&["backup", "list"])?;
            let rows = rows.as_array().cloned().unwrap_or_default();
            ensure!(rows.len() == 2, "{rows:?}");
            for r in &rows {
                ensure!(
                    r["last_error"].is_null() && !r["last_snapshot"].is_null(),
                    "{r}"
                );
                ensure!(r["verification"] == "passed", "{r}");
            }
            Ok(())
        },
    )?;
    let run_after = fleet.ctl_json(&["maintenance", "status", &run])?;
    ensure!(
        run_after["finished"] == true && run_after["nodes"] == run_before["nodes"],
        "the maintenance run is intact: {run_before} vs {run_after}"
    );
    let events = fleet.events()?;
    ensure!(
        events.iter().any(|e| e["seq"].as_u64() == Some(last_seq)),
        "the event log before the backup is kept"
    );
    let after: Vec<&Value> = events
        .iter()
        .filter(|e| e["seq"].as_u64().is_some_and(|s| s > last_seq))
        .collect();
    ensure!(
        enrolments(&events) == enrolled_before,
        "no agent enrolled again: {after:?}"
    );
    println!(
        "restored: {} nodes up with the same ids and addresses; {} events since the backup, none an enrolment",
        ids.len(),
        after.len()
    );
    Ok(())
}
