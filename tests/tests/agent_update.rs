//! Agent self-updates end to end, as an operator sees them through `shoalctl release` and the event
//! log: a controller with `--release-key` and real agents (each in its own network namespace, each
//! running a copy of `shoal-agent` from an install directory of its own, since an update replaces
//! that file).
//!
//! The "new version" is the same agent binary with its version slot patched
//! (`shoal_agent::version`): a different file (different hash, signed separately) that reports a
//! different version, made without a second cargo build, which in another target directory would
//! rebuild every dependency.
//!
//! - a release with a bad signature is refused, the agent stays and says so;
//! - a truncated download is refused, the agent stays and says so;
//! - a good release is installed: the node runs and reports the new version, its checks passed,
//!   `.prev` holds the old binary, and old and new agents work side by side;
//! - a full disk during the swap (the install dir is a tiny tmpfs): the agent stays and reports
//!   why;
//! - a new version that never passes its health check (`--update-check`) is rolled back by the
//!   agent itself at the deadline, and the old binary reports the failed attempt;
//! - `shoalctl upgrade start --agent` rolls a release over all three, one at a time: the healthy
//!   ones succeed on their reports, the one whose disk is too small is failed as refused and stays;
//! - a downgrade (back to 0.9.0-good) rolled out without `--allow-downgrade` is refused by the
//!   agents themselves, which stay on their version and say why; the same rollout with
//!   `--allow-downgrade` takes them down a version (the refusal for lack of permission is not held
//!   against them).
//!
//! Needs root and `openssl` (skips with a reason otherwise, fails under CI).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use shoal_tests::events as event;
use shoal_tests::releases::{add_releases, install_dir, update_status as status, ReleaseKey};
use shoal_tests::testkit::{require, skip, Tmpfs};
use shoal_tests::{eventually, require_host_tests, Fleet, FleetConfig, OrPanic};

const TIMEOUT: Duration = Duration::from_secs(60);
const HEALTH_DEADLINE: &str = "15s";

/// Waits until the node's report says it attempted `version` and shows a failure containing
/// `needle`.
fn wait_failure(fleet: &Fleet, node: &str, version: &str, needle: &str) -> Result<Value> {
    eventually!(
        TIMEOUT,
        &format!("{node} reports the failed update to {version} ({needle})"),
        || {
            let s = status(fleet, node)?;
            let r = &s["report"];
            ensure!(r["attempted"] == version, "not yet: {s}");
            let failure = s["failure"].as_str().unwrap_or_default();
            ensure!(
                failure.contains(needle),
                "failure is {failure:?}, want {needle:?}: {s}"
            );
            Ok(s)
        }
    )
}

fn has_event(fleet: &Fleet, kind: &str, node: &str, needle: &str) -> Result<()> {
    let events = fleet.events()?;
    ensure!(
        events
            .iter()
            .any(|e| event::is(e, kind, node) && event::message(e).contains(needle)),
        "no {kind} event for {node} containing {needle:?}"
    );
    Ok(())
}

/// Waits until the current rollout has finished; its status.
fn finished(fleet: &Fleet, what: &str) -> Result<Value> {
    eventually!(TIMEOUT * 2, &format!("the rollout {what} finishes"), || {
        let r = fleet.ctl_json(&["upgrade", "status"])?;
        ensure!(r["finished"] == true, "not yet: {r}");
        Ok(r)
    })
}

#[test]
fn agents_update_themselves_refuse_bad_releases_and_roll_back_unhealthy_ones() {
    require_host_tests!();
    require!(skip::tool("openssl", "openssl"));
    scenario().or_panic();
}

fn scenario() -> Result<()> {
    let work = tempfile::Builder::new().prefix("shoal-update-").tempdir()?;
    let w = work.path();
    let release_key = ReleaseKey::generate(w)?;
    let public_hex = release_key.public_hex.clone();

    let bins = shoal_tests::bins::Bins::locate()?;
    let original = bins.agent.clone();
    let check = w.join("check.sh");
    // The health check an operator might add; this one refuses the version built to be bad.
    std::fs::write(&check, "#!/bin/sh\nif [ \"$SHOAL_AGENT_VERSION\" = 0.9.3-bad ]; then echo 'this build is broken' >&2; exit 1; fi\n")?;
    std::fs::set_permissions(&check, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;

    let mut cfg = FleetConfig::fast().agents(0);
    cfg.wait_up = false;
    cfg.controller_args = vec![
        "--release-key".into(),
        release_key.public_file.display().to_string(),
    ];
    let mut fleet = Fleet::start(cfg)?;
    let token = fleet.create_token(&["--ttl", "1h", "--uses", "3", "--label", "pool=update"])?;
    let common = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--no-drives",
            "--release-key",
            &public_hex,
            "--update-health-deadline",
            HEALTH_DEADLINE,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    // Agent 1: a normal install dir. Agent 2: its install dir is a tmpfs with room for one binary
    // only. Agent 3: runs an extra health check the bad build fails.
    let exe1 = install_dir(&original, &w.join("a1"))?;
    fleet.config_mut().agent_program = Some(exe1.clone());
    fleet.config_mut().agent_args = common(&[]);
    fleet.add_agent(&token)?;
    let size = std::fs::metadata(&original)?.len();
    let _tmpfs = Tmpfs::mount_at(
        "tmpfs",
        &w.join("a2"),
        &format!("size={}", size + (1 << 20)),
    )?;
    let exe2 = install_dir(&original, &w.join("a2"))?;
    fleet.config_mut().agent_program = Some(exe2.clone());
    fleet.add_agent(&token)?;
    let exe3 = install_dir(&original, &w.join("a3"))?;
    fleet.config_mut().agent_program = Some(exe3.clone());
    fleet.config_mut().agent_args = common(&["--update-check", &check.display().to_string()]);
    fleet.add_agent(&token)?;
    fleet.wait_all_up(TIMEOUT)?;
    let (n1, n2, n3) = (fleet.node_id(0)?, fleet.node_id(1)?, fleet.node_id(2)?);
    let old_version = status(&fleet, &n1)?["report"]["running"]
        .as_str()
        .context("running")?
        .to_owned();

    // Releases: each version its own patched binary, signed here.
    add_releases(
        &fleet,
        &original,
        &release_key,
        &[
            "0.9.0-good",
            "0.9.1-trunc",
            "0.9.2-badsig",
            "0.9.3-bad",
            "0.9.4-roll",
        ],
        w,
    )?;
    let list = fleet.ctl_json(&["release", "list"])?;
    let target = list[0]["target"].as_str().context("target")?.to_owned();
    ensure!(list.as_array().map(Vec::len) == Some(5), "{list}");
    // Damage two stored releases the way a disk or a person might.
    let stored = |v: &str, f: &str| {
        fleet
            .data_dir()
            .join("releases")
            .join(v)
            .join(&target)
            .join(f)
    };
    let mut sig = std::fs::read(stored("0.9.2-badsig", "manifest.sig"))?;
    sig[10] ^= 0x55;
    std::fs::write(stored("0.9.2-badsig", "manifest.sig"), sig)?;
    let trunc = stored("0.9.1-trunc", "agent");
    std::fs::File::options()
        .write(true)
        .open(&trunc)?
        .set_len(size / 2)?;

    // Bad signature: refused before any download; the agent stays.
    fleet.ctl_ok(&["release", "offer", &n1, "--version", "0.9.2-badsig"])?;
    let s = wait_failure(&fleet, &n1, "0.9.2-badsig", "signature does not verify")?;
    ensure!(s["report"]["running"] == old_version.as_str(), "{s}");
    has_event(&fleet, "agent_update_failed", &n1, "0.9.2-badsig")?;

    // Truncated download: refused after it; the agent stays.
    fleet.ctl_ok(&["release", "offer", &n1, "--version", "0.9.1-trunc"])?;
    let s = wait_failure(&fleet, &n1, "0.9.1-trunc", "download truncated")?;
    ensure!(s["report"]["running"] == old_version.as_str(), "{s}");
    ensure!(
        std::fs::read(&exe1)? == std::fs::read(&original)?,
        "the executable must be untouched"
    );

    // A good release: installed, re-executed, healthy, reported.
    fleet.ctl_ok(&["release", "offer", &n1, "--version", "0.9.0-good"])?;
    let s = eventually!(
        TIMEOUT,
        "agent 1 runs 0.9.0-good and its checks passed",
        || {
            let s = status(&fleet, &n1)?;
            let r = &s["report"];
            ensure!(
                r["running"] == "0.9.0-good" && r["failure"].is_null(),
                "not yet: {s}"
            );
            let checks = r["checks"].as_array().context("checks")?;
            ensure!(
                !checks.is_empty() && checks.iter().all(|c| c["passed"] == true),
                "checks: {s}"
            );
            Ok(s)
        }
    )?;
    ensure!(s["report"]["attempts"] == 1, "one start: {s}");
    has_event(&fleet, "agent_update_succeeded", &n1, "0.9.0-good")?;
    ensure!(
        std::fs::read(w.join("a1/shoal-agent.prev"))? == std::fs::read(&original)?,
        "the old binary is kept as .prev"
    );
    let node = fleet
        .nodes()?
        .into_iter()
        .find(|n| n["id"] == n1.as_str())
        .context("node 1")?;
    ensure!(node["agent_version"] == "0.9.0-good", "{node}");

    // Disk full during the swap: the copy beside the executable does not fit.
    fleet.ctl_ok(&["release", "offer", &n2, "--version", "0.9.0-good"])?;
    let s = wait_failure(&fleet, &n2, "0.9.0-good", "No space left on device")?;
    ensure!(s["report"]["running"] == old_version.as_str(), "{s}");
    ensure!(
        std::fs::read(&exe2)? == std::fs::read(&original)?,
        "the executable must be untouched"
    );

    // A new version that never becomes healthy: rolled back by the agent at the deadline.
    fleet.ctl_ok(&["release", "offer", &n3, "--version", "0.9.3-bad"])?;
    let s = eventually!(
        TIMEOUT + Duration::from_secs(30),
        "agent 3 rolled back from 0.9.3-bad",
        || {
            let s = status(&fleet, &n3)?;
            let r = &s["report"];
            ensure!(
                r["attempted"] == "0.9.3-bad" && r["running"] == old_version.as_str(),
                "not yet: {s}"
            );
            ensure!(
                s["failure"]
                    .as_str()
                    .is_some_and(|f| f.contains("rolled back")),
                "not yet: {s}"
            );
            Ok(s)
        }
    )?;
    let checks = s["report"]["checks"].as_array().context("checks")?;
    ensure!(
        checks
            .iter()
            .any(|c| c["passed"] == false
                && c["detail"].as_str().is_some_and(|d| d.contains("broken"))),
        "{s}"
    );
    ensure!(s["report"]["attempts"].as_u64() >= Some(1), "{s}");
    has_event(&fleet, "agent_update_rolled_back", &n3, "0.9.3-bad")?;
    ensure!(
        std::fs::read(&exe3)? == std::fs::read(&original)?,
        "the original binary is back"
    );

    // Old and new versions side by side, all up.
    fleet.wait_all_up(TIMEOUT)?;
    let versions: Vec<String> = fleet
        .nodes()?
        .iter()
        .map(|n| n["agent_version"].as_str().unwrap_or_default().to_owned())
        .collect();
    ensure!(
        versions.contains(&"0.9.0-good".to_owned()) && versions.contains(&old_version),
        "{versions:?}"
    );
    fleet.check_running()?;

    // A rolling upgrade of all three through the same path: agents 1 and 3 update and pass their
    // checks; agent 2's disk is still too small, so it refuses and stays (failed, nothing to roll
    // back).
    let out = fleet.ctl_ok(&[
        "upgrade",
        "start",
        "--agent",
        "0.9.4-roll",
        "--selector",
        "pool=update",
        "--max-unavailable",
        "1",
        "--max-failures",
        "3",
    ])?;
    println!("{out}");
    let r = eventually!(TIMEOUT * 2, "the rollout of 0.9.4-roll finishes", || {
        let r = fleet.ctl_json(&["upgrade", "status"])?;
        ensure!(r["finished"] == true, "not yet: {r}");
        Ok(r)
    })?;
    let phase = |n: &str| -> Result<Value> {
        r["nodes"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["node"] == n).cloned())
            .with_context(|| format!("{n} in {r}"))
    };
    for n in [&n1, &n3] {
        ensure!(phase(n)?["phase"] == "succeeded", "{n}: {r}");
        has_event(&fleet, "node_upgrade_succeeded", n, "")?;
    }
    let p2 = phase(&n2)?;
    ensure!(
        p2["phase"] == "failed"
            && p2["detail"]
                .as_str()
                .is_some_and(|d| d.contains("No space left")),
        "{p2}"
    );
    ensure!(
        std::fs::read(&exe2)? == std::fs::read(&original)?,
        "agent 2's executable must be untouched"
    );
    fleet.wait_all_up(TIMEOUT)?;
    let nodes = fleet.nodes()?;
    let version_of = |n: &str| {
        nodes
            .iter()
            .find(|x| x["id"] == n)
            .map(|x| x["agent_version"].clone())
            .unwrap_or_default()
    };
    ensure!(
        version_of(&n1) == "0.9.4-roll" && version_of(&n3) == "0.9.4-roll",
        "{nodes:?}"
    );
    ensure!(version_of(&n2) == old_version.as_str(), "{nodes:?}");
    println!("{}", fleet.ctl_ok(&["upgrade", "status"])?);

    // Back down to 0.9.0-good without permission: agents 1 and 3 refuse (their version is newer)
    // and stay on 0.9.4-roll; agent 2's disk is still too small.
    fleet.ctl_ok(&[
        "upgrade",
        "start",
        "--agent",
        "0.9.0-good",
        "--selector",
        "pool=update",
        "--max-failures",
        "5",
    ])?;
    let r = finished(&fleet, "of 0.9.0-good without --allow-downgrade")?;
    let detail = |r: &Value, n: &str| -> Result<(String, String)> {
        let p = r["nodes"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["node"] == n).cloned())
            .with_context(|| format!("{n} in {r}"))?;
        Ok((
            p["phase"].as_str().unwrap_or_default().to_owned(),
            p["detail"].as_str().unwrap_or_default().to_owned(),
        ))
    };
    for n in [&n1, &n3] {
        let (phase, why) = detail(&r, n)?;
        ensure!(
            phase == "failed"
                && why.contains("refused to downgrade from 0.9.4-roll to 0.9.0-good")
                && why.contains("--allow-downgrade"),
            "{n}: {phase} {why}"
        );
        let s = status(&fleet, n)?;
        ensure!(
            s["report"]["running"] == "0.9.4-roll"
                && s["failure"]
                    .as_str()
                    .is_some_and(|f| f.contains("refused to downgrade")),
            "{s}"
        );
        has_event(&fleet, "agent_update_failed", n, "refused to downgrade")?;
    }
    fleet.wait_all_up(TIMEOUT)?;
    let nodes = fleet.nodes()?;
    let version_of = |n: &str| {
        nodes
            .iter()
            .find(|x| x["id"] == n)
            .map(|x| x["agent_version"].clone())
            .unwrap_or_default()
    };
    ensure!(
        version_of(&n1) == "0.9.4-roll" && version_of(&n3) == "0.9.4-roll",
        "the nodes stay on their version: {nodes:?}"
    );

    // With --allow-downgrade they go down a version.
    let out = fleet.ctl_ok(&[
        "upgrade",
        "start",
        "--agent",
        "0.9.0-good",
        "--selector",
        "pool=update",
        "--max-failures",
        "5",
        "--allow-downgrade",
    ])?;
    println!("{out}");
    let r = finished(&fleet, "of 0.9.0-good with --allow-downgrade")?;
    println!("{}", fleet.ctl_ok(&["upgrade", "status"])?);
    for n in [&n1, &n3] {
        let (phase, why) = detail(&r, n)?;
        ensure!(phase == "succeeded", "{n}: {phase} {why}");
    }
    let (phase, why) = detail(&r, &n2)?;
    ensure!(
        phase == "skipped",
        "agent 2 failed 0.9.0-good for another reason (its disk) and stays skipped: {phase} {why}"
    );
    fleet.wait_all_up(TIMEOUT)?;
    let nodes = fleet.nodes()?;
    let version_of = |n: &str| {
        nodes
            .iter()
            .find(|x| x["id"] == n)
            .map(|x| x["agent_version"].clone())
            .unwrap_or_default()
    };
    ensure!(
        version_of(&n1) == "0.9.0-good" && version_of(&n3) == "0.9.0-good",
        "down a version: {nodes:?}"
    );
    ensure!(version_of(&n2) == old_version.as_str(), "{nodes:?}");
    println!("{}", fleet.ctl_ok(&["release", "status"])?);
    for e in fleet.events()?.iter().filter(|e| {
        e["kind"]
            .as_str()
            .is_some_and(|k| k.starts_with("agent_update") || k == "release_added")
    }) {
        println!("{} {}", e["kind"], e["message"]);
    }
    Ok(())
}
