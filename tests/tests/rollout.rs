//! Rolling agent upgrades end to end (issue 6), as an operator drives and sees them: a real
//! `shoal-controller serve` and four real agents, each in its own network namespace and each
//! running its own copy of `shoal-agent` from an install directory of its own (an update replaces
//! that file), driven only with `shoalctl` and checked against `shoalctl upgrade status`, `nodes
//! list`, `release status` and the event log.
//!
//! Versions are the built agent ("old") and copies with the version slot patched
//! ([`shoal_tests::releases`]), signed with a key made by `openssl` and uploaded with `shoalctl
//! release add`.
//!
//! Every agent runs an operator's health check (`--update-check`), which a new version must pass
//! before its health deadline or it rolls itself back. The check refuses the broken build, and also
//! refuses any version on a host while the test holds a *gate* file for that version and host: that
//! is how the test keeps a node in flight at a chosen moment (to see old and new agents side by
//! side, and to kill the controller while a node is mid-upgrade) without sleeping or racing the
//! rollout.
//!
//! One flow, in steps (each asserted on its own):
//! 1. old → new over the four with `--max-unavailable 1`: all succeed and report the new version;
//!    mid-way old and new agents coexist, all connected; the event log, replayed, never has two
//!    nodes unavailable at once and shows the nodes taken one after another.
//! 2. A broken release (its health check fails) with `--max-failures 1`: the first node fails its
//!    check and is rolled back (runs the new version again), the rollout pauses with the reason, no
//!    other node is touched; a later rollout of the broken release skips that node (its failure is
//!    remembered).
//! 3. A rollout with `--window` outside the window waits (status says so; nothing starts over
//!    several driver ticks); the controller restarted with its rollout clock moved into the window
//!    (`--rollout-clock-offset`, a hidden test hook) carries it out.
//! 4. The controller killed (SIGKILL) mid-rollout, one node done and the next in flight, and
//!    started again on the same data dir: the rollout resumes from its stored state and completes,
//!    and the event log still never has two nodes unavailable at once.
//!
//! The controller runs with `--rollout-tick 1s` (hidden; default 5 s) so the driver's passes are
//! quick. Needs root and `openssl` (skips with a reason otherwise, fails under CI).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use shoal_tests::events as event;
use shoal_tests::fleet::parse_time;
use shoal_tests::releases::{add_releases, install_dir, stripped, update_status, ReleaseKey};
use shoal_tests::testkit::{require, skip};
use shoal_tests::{consistently, eventually, require_host_tests, Fleet, FleetConfig, OrPanic};

const AGENTS: usize = 4;
const NEW: &str = "2.0.0-new";
const BROKEN: &str = "2.0.1-broken";
const NIGHTLY: &str = "2.1.0-nightly";
const LABEL: &str = "role=worker";
/// The controller's rollout driver tick (`--rollout-tick`).
const TICK: Duration = Duration::from_secs(1);
/// How long a new agent version has to pass its checks (`--update-health-deadline`): longer than
/// any gate is held, short enough that the broken release is rolled back quickly.
const HEALTH_DEADLINE: Duration = Duration::from_secs(20);
const TIMEOUT: Duration = Duration::from_secs(60);

/// The operator's health check: fails for the broken build, and for version V on host H while the
/// gate file `GATES/V-H` exists. The agent runs it with `SHOAL_AGENT_VERSION` set, in its own UTS
/// namespace (so the hostname is the agent's).
const CHECK: &str = r#"#!/bin/sh
v="$SHOAL_AGENT_VERSION"
h="$(cat /proc/sys/kernel/hostname)"
if [ "$v" = "BROKEN" ]; then echo "this build is broken" >&2; exit 1; fi
if [ -e "GATES/$v-$h" ]; then echo "held by the test's gate" >&2; exit 1; fi
exit 0
"#;

#[test]
fn four_agents_roll_one_at_a_time_roll_back_broken_releases_wait_for_windows_and_survive_a_restart()
{
    require_host_tests!();
    require!(skip::tool("openssl", "openssl"));
    let started = Instant::now();
    let work = tempfile::Builder::new()
        .prefix("shoal-rollout-")
        .tempdir()
        .expect("a temporary directory");
    let mut t = Test::start(work.path()).or_panic();
    let result = t.run();
    if result.is_err() {
        // The fleet prints every log when it drops during a panic.
        for e in t.fleet.events().unwrap_or_default() {
            eprintln!("{} {} {} {}", e["seq"], e["kind"], e["node"], e["message"]);
        }
    }
    result.or_panic();
    println!("rollout host test took {:.1?}", started.elapsed());
}

/// A controller restart while the node in flight is still *downloading* the release breaks the
/// download stream with the connection. That is not a failure of the release: the agent keeps the
/// verified offer, reports nothing, and resumes the download from the bytes it has on its next
/// session; the restarted controller carries on with the acknowledged node, and the rollout
/// finishes with every node upgraded. (It used to settle as "download truncated", fail the node and
/// pause the rollout.) The main test kills the controller while a node is past its download (held
/// in its health check).
#[test]
fn a_controller_restart_during_a_download_does_not_fail_the_node() {
    require_host_tests!();
    require!(skip::tool("openssl", "openssl"));
    let work = tempfile::Builder::new()
        .prefix("shoal-rollout-")
        .tempdir()
        .expect("a temporary directory");
    let mut t = Test::start(work.path()).or_panic();
    t.restart_during_download().or_panic();
}

struct Test {
    fleet: Fleet,
    gates: PathBuf,
    old: String,
    key: ReleaseKey,
    work: PathBuf,
}

impl Test {
    fn start(w: &Path) -> Result<Test> {
        let key = ReleaseKey::generate(w)?;
        let gates = w.join("gates");
        std::fs::create_dir_all(&gates)?;
        let check = w.join("gate-check");
        let script = CHECK
            .replace("BROKEN", BROKEN)
            .replace("GATES", &gates.display().to_string());
        std::fs::write(&check, script)?;
        std::fs::set_permissions(&check, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;

        let mut cfg = FleetConfig::fast().agents(0);
        cfg.wait_up = false;
        cfg.controller_args = vec![
            "--release-key".into(),
            key.public_file.display().to_string(),
            "--rollout-tick".into(),
            humantime::format_duration(TICK).to_string(),
        ];
        cfg.agent_args = [
            "--no-drives",
            "--release-key",
            &key.public_hex,
            "--update-health-deadline",
            &humantime::format_duration(HEALTH_DEADLINE).to_string(),
            "--update-check",
            &check.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut fleet = Fleet::start(cfg)?;
        let token = fleet.create_token(&[
            "--ttl",
            "1h",
            "--uses",
            &AGENTS.to_string(),
            "--label",
            LABEL,
        ])?;
        let original = fleet.bins().agent.clone();
        for i in 1..=AGENTS {
            // Each agent its own copy, which its updates replace.
            fleet.config_mut().agent_program =
                Some(install_dir(&original, &w.join(format!("install-{i}")))?);
            fleet.add_agent(&token)?;
        }
        fleet.wait_all_up(TIMEOUT)?;
        let old = fleet.nodes()?[0]["agent_version"]
            .as_str()
            .context("agent_version")?
            .to_owned();
        ensure!(
            ![NEW, BROKEN, NIGHTLY].contains(&old.as_str()),
            "the built agent reports {old}"
        );
        // Releases are stripped (as shipped; a quarter of the debug build's size, so downloads are
        // quick).
        add_releases(
            &fleet,
            &stripped(&original, w)?,
            &key,
            &[NEW, BROKEN, NIGHTLY],
            w,
        )?;
        Ok(Test {
            fleet,
            gates,
            old,
            key,
            work: w.to_owned(),
        })
    }

    fn run(&mut self) -> Result<()> {
        let timer = Instant::now();
        self.upgrade_one_at_a_time()
            .context("step 1: old -> new, one at a time")?;
        println!("step 1 done after {:.1?}", timer.elapsed());
        self.broken_release_is_rolled_back_and_pauses()
            .context("step 2: a broken release")?;
        println!("step 2 done after {:.1?}", timer.elapsed());
        self.window_waits_then_restart_resumes()
            .context("steps 3 and 4: window, clock, restart")?;
        println!("steps 3 and 4 done after {:.1?}", timer.elapsed());
        let events = self.fleet.events()?;
        ensure!(
            max_unavailable(&events, None) <= 1,
            "two nodes unavailable at once somewhere in the log"
        );
        Ok(())
    }

    /// Step 1.
    fn upgrade_one_at_a_time(&mut self) -> Result<()> {
        self.hold_all(NEW)?;
        let r1 = self.start_rollout(&[
            "--agent",
            NEW,
            "--max-unavailable",
            "1",
            "--max-failures",
            "1",
            "--deadline",
            "2m",
        ])?;
        // The first node updates and is held in its checks; let it pass, and hold the next one.
        let first = self.wait_held(&r1, NEW, &[])?;
        self.release(NEW, &first)?;
        let second = self.wait_held(&r1, NEW, std::slice::from_ref(&first.node))?;
        // Mid-rollout: old and new agents side by side, every one connected.
        let (old, fleet) = (self.old.clone(), &self.fleet);
        eventually!(TIMEOUT, "old and new agents side by side, all up", || {
            let nodes = fleet.nodes()?;
            ensure!(
                nodes.len() == AGENTS && nodes.iter().all(|n| n["status"] == "up"),
                "not all up: {}",
                brief(&nodes)
            );
            let on = |v: &str| nodes.iter().filter(|n| n["agent_version"] == v).count();
            ensure!(
                on(NEW) == 2 && on(&old) == 2,
                "want 2 on {NEW} and 2 on {old}: {}",
                brief(&nodes)
            );
            Ok(())
        })?;
        let s = self.status(&r1)?;
        ensure!(s["state"] == "running", "{s}");
        let p = &s["progress"];
        ensure!(
            p["succeeded"] == 1 && p["in_flight"] == 1 && p["pending"] == 2,
            "one done, one in flight, two waiting: {s}"
        );
        ensure!(
            phase_of(&s, &first.node)? == "succeeded" && phase_of(&s, &second.node)? == "upgrading",
            "{s}"
        );
        ensure!(
            s["waiting"].as_array().is_some_and(|w| w
                .iter()
                .any(|w| w.as_str().is_some_and(|w| w.contains("max-unavailable")))),
            "the others wait for max-unavailable: {s}"
        );
        println!("{}", self.fleet.ctl_ok(&["upgrade", "status", &r1])?);
        self.release_all()?;

        let done = self.wait_finished(&r1)?;
        ensure!(
            done["state"] == "done" && done["progress"]["succeeded"] == AGENTS,
            "{done}"
        );
        self.fleet.wait_all_up(TIMEOUT)?;
        for n in self.fleet.nodes()? {
            ensure!(n["agent_version"] == NEW, "every node reports {NEW}: {n}");
        }
        let events = self.fleet.events()?;
        ensure!(
            max_unavailable(&events, Some(&r1)) == 1,
            "never two nodes unavailable at once"
        );
        let taken = one_after_another(&events, &r1)?;
        ensure!(
            taken.len() == AGENTS,
            "each node taken down once: {taken:?}"
        );
        ensure!(
            taken[0] == first.node && taken[1] == second.node,
            "{taken:?}"
        );
        Ok(())
    }

    /// Step 2.
    fn broken_release_is_rolled_back_and_pauses(&mut self) -> Result<()> {
        let r2 = self.start_rollout(&[
            "--agent",
            BROKEN,
            "--max-unavailable",
            "1",
            "--max-failures",
            "1",
            "--deadline",
            "2m",
        ])?;
        let fleet = &self.fleet;
        // The agent rolls itself back at its health deadline and reports why.
        let paused = eventually!(
            TIMEOUT + HEALTH_DEADLINE,
            "the rollout of the broken release pauses",
            || {
                let s = fleet.ctl_json(&["upgrade", "status", &r2])?;
                ensure!(s["state"] == "paused", "not yet: {}", s["state"]);
                Ok(s)
            }
        )?;
        println!("{}", fleet.ctl_ok(&["upgrade", "status", &r2])?);
        let nodes = paused["nodes"].as_array().context("nodes")?;
        let failed: Vec<&Value> = nodes.iter().filter(|n| n["phase"] == "failed").collect();
        let [bad] = failed[..] else {
            bail!("exactly one node failed: {paused}")
        };
        let bad_id = bad["node"].as_str().context("node")?.to_owned();
        let reason = paused["reason"].as_str().unwrap_or_default();
        ensure!(
            reason.contains("1 node(s) failed")
                && reason.contains(&bad_id)
                && reason.contains("check:gate-check"),
            "the pause says which node failed which check: {reason:?}"
        );
        let detail = bad["detail"].as_str().unwrap_or_default();
        ensure!(detail.contains("rolled back"), "{detail}");
        ensure!(
            nodes.iter().filter(|n| n["phase"] == "pending").count() == AGENTS - 1,
            "nothing else started: {paused}"
        );

        // Rolled back: back on the new version (the agent's own roll-back), connected, and it says
        // why.
        eventually!(
            TIMEOUT,
            "the broken node runs the previous version again",
            || {
                let n = fleet
                    .nodes()?
                    .into_iter()
                    .find(|n| n["id"] == bad_id.as_str())
                    .context("node")?;
                ensure!(
                    n["agent_version"] == NEW && n["status"] == "up",
                    "not yet: {n}"
                );
                let u = update_status(fleet, &bad_id)?;
                ensure!(
                    u["report"]["attempted"] == BROKEN && u["report"]["running"] == NEW,
                    "{u}"
                );
                let checks = u["report"]["checks"].as_array().context("checks")?;
                ensure!(
                    checks.iter().any(|c| c["passed"] == false
                        && c["detail"].as_str().is_some_and(|d| d.contains("broken"))),
                    "{u}"
                );
                Ok(())
            }
        )?;

        // No other node is touched, over several driver ticks.
        consistently(
            TICK * 4,
            "no other node is offered the broken release",
            || {
                let s = fleet.ctl_json(&["upgrade", "status", &r2])?;
                ensure!(
                    s["state"] == "paused" && s["progress"]["pending"] == AGENTS - 1,
                    "{s}"
                );
                Ok(())
            },
        )?;
        let events = fleet.events()?;
        let ours = rollout_events(&events, &r2);
        let kinds: Vec<(&str, &str)> = ours
            .iter()
            .map(|e| (event::kind(e), event::node(e)))
            .collect();
        ensure!(
            kinds
                == [
                    ("node_upgrade_started", bad_id.as_str()),
                    ("node_upgrade_failed", bad_id.as_str()),
                    ("node_rolled_back", bad_id.as_str()),
                ],
            "only the broken node was taken down, failed and rolled back: {kinds:?}"
        );
        ensure!(
            events.iter().any(|e| event::kind(e) == "rollout_paused"
                && event::message(e).starts_with(&format!("rollout {r2} paused"))),
            "a rollout_paused event"
        );
        let offered: BTreeSet<&str> = events
            .iter()
            .filter(|e| {
                e["kind"] == "agent_update_offered"
                    && e["message"].as_str().is_some_and(|m| m.contains(BROKEN))
            })
            .filter_map(|e| e["node"].as_str())
            .collect();
        ensure!(
            offered == BTreeSet::from([bad_id.as_str()]),
            "the broken release went to one node only: {offered:?}"
        );
        for n in fleet.nodes()? {
            ensure!(n["agent_version"] == NEW && n["status"] == "up", "{n}");
        }

        // The operator gives up on it; a new rollout of the same release skips the node where it
        // failed. It is given a window that is closed now, so that it starts nothing while we look.
        fleet.ctl_ok(&["upgrade", "abort", &r2])?;
        ensure!(
            self.status(&r2)?["finished"] == true,
            "aborted with nothing in flight: finished"
        );
        self.create_closed_window()?;
        let r3 = self.start_rollout(&[
            "--agent",
            BROKEN,
            "--window",
            "nightly",
            "--max-unavailable",
            "1",
        ])?;
        let s = self.status(&r3)?;
        ensure!(phase_of(&s, &bad_id)? == "skipped", "{s}");
        let skipped = s["nodes"]
            .as_array()
            .and_then(|l| l.iter().find(|n| n["node"] == bad_id.as_str()))
            .context("node")?;
        ensure!(
            skipped["detail"]
                .as_str()
                .is_some_and(|d| d.contains("failed here before")),
            "{skipped}"
        );
        ensure!(
            s["progress"]["pending"] == AGENTS - 1 && s["progress"]["skipped"] == 1,
            "{s}"
        );
        self.fleet.ctl_ok(&["upgrade", "abort", &r3])?;
        ensure!(self.status(&r3)?["finished"] == true, "r3 finished");
        Ok(())
    }

    /// Steps 3 and 4.
    fn window_waits_then_restart_resumes(&mut self) -> Result<()> {
        self.hold_all(NIGHTLY)?;
        let r4 = self.start_rollout(&[
            "--agent",
            NIGHTLY,
            "--window",
            "nightly",
            "--max-unavailable",
            "1",
            "--max-failures",
            "1",
            "--deadline",
            "2m",
        ])?;
        let fleet = &self.fleet;

        // Step 3: outside its window it waits, and says so.
        eventually!(TIMEOUT, "the rollout says it waits for its window", || {
            let s = fleet.ctl_json(&["upgrade", "status", &r4])?;
            ensure!(
                s["waiting"]
                    .as_array()
                    .is_some_and(|w| w.iter().any(|w| w == "window closed")),
                "{s}"
            );
            Ok(())
        })?;
        consistently(
            TICK * 4,
            "nothing starts while the window is closed (several driver ticks)",
            || {
                let s = fleet.ctl_json(&["upgrade", "status", &r4])?;
                ensure!(
                    s["state"] == "running" && s["progress"]["pending"] == AGENTS,
                    "{s}"
                );
                Ok(())
            },
        )?;
        ensure!(
            rollout_events(&fleet.events()?, &r4).is_empty(),
            "no node taken down outside the window"
        );
        println!("{}", fleet.ctl_ok(&["upgrade", "status", &r4])?);

        // Restart the controller (SIGKILL) with its rollout clock moved one minute into the window.
        let window = self.window()?;
        let opens = parse_time(window["opens_at"].as_str().context("opens_at")?)?;
        let offset = opens
            .duration_since(SystemTime::now())
            .context("the window opens in the future")?
            + Duration::from_secs(60);
        println!("restarting the controller with its rollout clock {offset:?} ahead");
        self.fleet.controller().restart_with_args([
            "--rollout-clock-offset".to_owned(),
            offset.as_secs().to_string(),
        ])?;
        self.fleet.wait_controller_ready()?;
        let w = self.window()?;
        ensure!(
            w["open"] == true,
            "the window is open on the controller's moved clock: {w}"
        );

        // Step 4: the rollout runs; kill the controller while the second node is in flight.
        let first = self.wait_held(&r4, NIGHTLY, &[])?;
        self.release(NIGHTLY, &first)?;
        let second = self.wait_held(&r4, NIGHTLY, std::slice::from_ref(&first.node))?;
        println!(
            "killing the controller while {} ({}) is mid-upgrade",
            second.node, second.hostname
        );
        self.fleet.controller().kill()?;
        self.fleet.controller().restart()?;
        self.fleet.wait_controller_ready()?;
        let s = self.status(&r4)?;
        ensure!(s["state"] == "running", "{s}");
        ensure!(
            phase_of(&s, &first.node)? == "succeeded" && phase_of(&s, &second.node)? == "upgrading",
            "resumed where it was: {s}"
        );
        ensure!(s["progress"]["pending"] == AGENTS - 2, "{s}");
        self.release_all()?;

        let done = self.wait_finished(&r4)?;
        println!("{}", self.fleet.ctl_ok(&["upgrade", "status", &r4])?);
        ensure!(
            done["state"] == "done" && done["progress"]["succeeded"] == AGENTS,
            "{done}"
        );
        self.fleet.wait_all_up(TIMEOUT)?;
        for n in self.fleet.nodes()? {
            ensure!(
                n["agent_version"] == NIGHTLY,
                "every node reports {NIGHTLY}: {n}"
            );
        }
        let events = self.fleet.events()?;
        let taken = one_after_another(&events, &r4)?;
        ensure!(
            taken.len() == AGENTS,
            "each node taken down exactly once across the restarts: {taken:?}"
        );
        ensure!(
            max_unavailable(&events, Some(&r4)) == 1,
            "never two nodes unavailable at once"
        );
        ensure!(
            self.fleet.controller().starts() == 3,
            "the controller was started three times"
        );
        Ok(())
    }

    /// See [`a_controller_restart_during_a_download_does_not_fail_the_node`]. The release is the
    /// unstripped build (four times the size), so that its download takes long enough to be caught.
    fn restart_during_download(&mut self) -> Result<()> {
        let big = "2.0.2-unstripped";
        let original = self.fleet.bins().agent.clone();
        let key = self.key.clone();
        add_releases(&self.fleet, &original, &key, &[big], &self.work)?;
        let r1 = self.start_rollout(&[
            "--agent",
            big,
            "--max-unavailable",
            "1",
            "--max-failures",
            "1",
            "--deadline",
            "5m",
        ])?;
        let fleet = &self.fleet;
        let node = eventually!(TIMEOUT, "a node downloading the release", || {
            let s = fleet.ctl_json(&["upgrade", "status", &r1])?;
            let n = s["nodes"]
                .as_array()
                .context("nodes")?
                .iter()
                .find(|n| n["phase"] == "upgrading")
                .context("none in flight yet")?
                .clone();
            let node = n["node"].as_str().context("node")?.to_owned();
            let u = update_status(fleet, &node)?;
            ensure!(
                u["acknowledged"] == big && u["report"]["running"] != big,
                "not downloading: {u}"
            );
            Ok(node)
        })?;
        println!("killing the controller while {node} downloads {big}");
        self.fleet.controller().kill()?;
        self.fleet.controller().restart()?;
        self.fleet.wait_controller_ready()?;
        let done = eventually!(
            TIMEOUT * 4,
            &format!("rollout {r1} finishes or pauses"),
            || {
                let s = self.status(&r1)?;
                ensure!(
                    s["finished"] == true || s["state"] == "paused",
                    "not yet: {}",
                    s["progress"]
                );
                Ok(s)
            }
        )?;
        println!("{}", self.fleet.ctl_ok(&["upgrade", "status", &r1])?);
        // Where it resumed (unless the kill landed just after the last byte).
        let host = self
            .fleet
            .nodes()?
            .into_iter()
            .find(|n| n["id"] == node.as_str())
            .and_then(|n| n["hostname"].as_str().map(str::to_owned));
        if let Some(agent) = self
            .fleet
            .agents()
            .iter()
            .find(|a| Some(&a.hostname) == host.as_ref())
        {
            for line in agent
                .proc
                .log()
                .lines()
                .filter(|l| l.contains("resuming") || l.contains("broken off"))
            {
                println!("{}: {line}", agent.hostname);
            }
        }
        ensure!(
            done["state"] == "done" && done["progress"]["succeeded"] == AGENTS,
            "the restart failed the download: {done}"
        );
        Ok(())
    }

    // ---------------------------------------------------------------------------------------------

    /// `upgrade start … --selector role=worker`; the new rollout's id.
    fn start_rollout(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["upgrade", "start", "--selector", LABEL];
        all.extend_from_slice(args);
        let out = self.fleet.ctl_ok(&all)?;
        println!("{}", out.trim());
        let id = out
            .strip_prefix("started rollout ")
            .and_then(|r| r.split(':').next())
            .with_context(|| format!("no rollout id in {out:?}"))?;
        ensure!(out.contains(&format!("on {AGENTS} node(s)")), "{out}");
        Ok(id.to_owned())
    }

    fn status(&self, id: &str) -> Result<Value> {
        self.fleet.ctl_json(&["upgrade", "status", id])
    }

    fn wait_finished(&self, id: &str) -> Result<Value> {
        eventually!(TIMEOUT * 2, &format!("rollout {id} finishes"), || {
            let s = self.status(id)?;
            ensure!(s["finished"] == true, "not yet: {}", s["progress"]);
            Ok(s)
        })
    }

    /// Holds `version` on every agent's host: its check fails until [`Test::release`].
    fn hold_all(&self, version: &str) -> Result<()> {
        for a in self.fleet.agents() {
            std::fs::write(self.gates.join(format!("{version}-{}", a.hostname)), b"")?;
        }
        Ok(())
    }

    fn release(&self, version: &str, node: &Held) -> Result<()> {
        std::fs::remove_file(self.gates.join(format!("{version}-{}", node.hostname)))
            .context("removing a gate")
    }

    fn release_all(&self) -> Result<()> {
        for e in std::fs::read_dir(&self.gates)? {
            std::fs::remove_file(e?.path())?;
        }
        Ok(())
    }

    /// Waits until a node of rollout `id` (not in `except`) is in flight, runs `version`, is
    /// connected, and is held in its checks by its gate; that node.
    fn wait_held(&self, id: &str, version: &str, except: &[String]) -> Result<Held> {
        let fleet = &self.fleet;
        eventually!(
            TIMEOUT,
            &format!("a node of {id} on {version}, held in its health check"),
            || {
                let s = fleet.ctl_json(&["upgrade", "status", id])?;
                let in_flight: Vec<&Value> = s["nodes"]
                    .as_array()
                    .context("nodes")?
                    .iter()
                    .filter(|n| {
                        n["phase"] == "upgrading" && !except.iter().any(|x| n["node"] == x.as_str())
                    })
                    .collect();
                let [n] = in_flight[..] else {
                    bail!("want one node in flight: {}", s["nodes"])
                };
                let node = n["node"].as_str().context("node")?.to_owned();
                let u = update_status(fleet, &node)?;
                let r = &u["report"];
                ensure!(
                    r["running"] == version,
                    "{node} does not run {version} yet: {u}"
                );
                let held = r["checks"].as_array().is_some_and(|c| {
                    c.iter().any(|c| {
                        c["passed"] == false
                            && c["detail"].as_str().is_some_and(|d| d.contains("held"))
                    })
                });
                ensure!(held, "{node} not held yet: {u}");
                let rec = fleet
                    .nodes()?
                    .into_iter()
                    .find(|x| x["id"] == node.as_str())
                    .context("node record")?;
                ensure!(
                    rec["status"] == "up" && rec["agent_version"] == version,
                    "{rec}"
                );
                Ok(Held {
                    node,
                    hostname: rec["hostname"].as_str().context("hostname")?.to_owned(),
                })
            }
        )
    }

    /// A daily window that is closed now: it opens twelve hours from the current hour, for an hour.
    fn create_closed_window(&self) -> Result<()> {
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_secs();
        let hour = (secs / 3600 + 12) % 24;
        self.fleet.ctl_ok(&[
            "window",
            "create",
            "nightly",
            "--schedule",
            &format!("0 {hour} * * *"),
            "--duration",
            "1h",
            "--tz",
            "UTC",
        ])?;
        let w = self.window()?;
        ensure!(w["open"] == false, "{w}");
        Ok(())
    }

    fn window(&self) -> Result<Value> {
        let all = self.fleet.ctl_json(&["window", "list"])?;
        all.as_array()
            .and_then(|l| l.iter().find(|w| w["name"] == "nightly").cloned())
            .with_context(|| format!("no window nightly: {all}"))
    }
}

/// A node held in its health check.
#[derive(Debug, Clone)]
struct Held {
    node: String,
    hostname: String,
}

fn brief(nodes: &[Value]) -> String {
    nodes
        .iter()
        .map(|n| format!("{} {} {} ", n["hostname"], n["status"], n["agent_version"]))
        .collect()
}

fn phase_of(status: &Value, node: &str) -> Result<String> {
    let n = status["nodes"]
        .as_array()
        .and_then(|l| l.iter().find(|n| n["node"] == node))
        .with_context(|| format!("{node} not in {status}"))?;
    Ok(n["phase"].as_str().unwrap_or_default().to_owned())
}

/// The node events of rollout `id` (their messages start `rollout ID: `), in log order.
fn rollout_events<'a>(events: &'a [Value], id: &str) -> Vec<&'a Value> {
    let prefix = format!("rollout {id}: ");
    events
        .iter()
        .filter(|e| {
            let kind = event::kind(e);
            kind.starts_with("node_upgrade_") || kind == "node_rolled_back"
        })
        .filter(|e| event::message(e).starts_with(&prefix))
        .collect()
}

/// Replays the event log (of one rollout, or all): a node is unavailable from
/// `node_upgrade_started` until `node_upgrade_succeeded` or `node_rolled_back`. The most
/// unavailable at once.
fn max_unavailable(events: &[Value], id: Option<&str>) -> usize {
    let mut down = BTreeSet::new();
    let mut max = 0;
    let mut last_seq = 0;
    for e in events {
        let seq = event::seq(e);
        assert!(seq > last_seq, "the event log is in order");
        last_seq = seq;
        if let Some(id) = id {
            if !event::message(e).starts_with(&format!("rollout {id}: ")) {
                continue;
            }
        }
        let node = event::node(e).to_owned();
        match event::kind(e) {
            "node_upgrade_started" => {
                down.insert(node);
            }
            "node_upgrade_succeeded" | "node_rolled_back" => {
                down.remove(&node);
            }
            _ => {}
        }
        max = max.max(down.len());
    }
    max
}

/// The nodes of rollout `id` in the order they were taken down, after checking from the log that
/// each was taken down once and was back before the next one was taken down.
fn one_after_another(events: &[Value], id: &str) -> Result<Vec<String>> {
    let mut order = Vec::new();
    let mut open: Option<(String, u64)> = None;
    let mut spans: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for e in rollout_events(events, id) {
        let (kind, node, seq) = (event::kind(e), event::node(e).to_owned(), event::seq(e));
        match kind {
            "node_upgrade_started" => {
                if let Some((other, _)) = &open {
                    bail!("{node} taken down (seq {seq}) while {other} was still away");
                }
                ensure!(!spans.contains_key(&node), "{node} taken down twice");
                open = Some((node.clone(), seq));
                order.push(node);
            }
            "node_upgrade_succeeded" | "node_rolled_back" => {
                let Some((n, from)) = open.take() else {
                    bail!("{node} back (seq {seq}) without being taken down")
                };
                ensure!(n == node, "{node} back while {n} was away");
                spans.insert(node, (from, seq));
            }
            _ => {}
        }
    }
    ensure!(open.is_none(), "{open:?} never came back");
    Ok(order)
}
