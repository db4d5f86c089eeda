//! Image upgrades that really reboot: a netbooted qemu VM (TCG, BIOS/iPXE) runs image `test-1`;
//! `shoalctl upgrade start --image test-2` assigns the new image, names its kernel, initramfs and
//! command line to the agent and asks it to reboot; the agent loads them with `kexec_file_load(2)`
//! and kexecs (no firmware, no iPXE), the node re-enrols on `test-2` and its boot report says
//! healthy → the node `succeeded`, the rollout `done`. Then `test-rogue`, an image signed by a key
//! the node does not hold (the controller trusts both keys, the node only the lab key baked into
//! its image): the agent refuses to kexec into it and refuses the reboot too, so the node stays up
//! (same boot id, still connected) and its upgrade fails with the reason, its `test-2` assignment
//! restored without a reboot. Then `test-3` (kexec again), built with a health check that always
//! fails ("v3 broken on purpose") and with `--no-kexec` for its agent: the VM boots it, its agent
//! reports the failing check, the node is not healthy at the deadline, so the controller fails it,
//! restores the `test-2` assignment and reboots it again — this time a full `reboot(2)`: qemu
//! resets, iPXE netboots again and fetches the controller's current assignment; the VM comes back
//! on `test-2`, healthy, and the rollout is paused with the reason.
//!
//! Needs root and what the netboot tests need (tests/tests/netboot.rs).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::Value;
use shoal_tests::netboot::{extra_image, image_signed_by, DhcpSetup, Firmware, NetbootLab};
use shoal_tests::{eventually, require_netboot};

/// Deadline from VM start to the node being up on its first boot.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const MAC: &str = "52:54:00:4e:42:21";

/// `nodes show ID -o json`.
fn node(lab: &NetbootLab, id: &str) -> Result<Value> {
    Ok(serde_json::from_str(
        &lab.ctl_ok(&["nodes", "show", id, "-o", "json"])?,
    )?)
}

/// The node's boot report when it is connected, on `image`, with every check passed (`healthy`) or
/// with a failed one (`!healthy`); its boot id.
fn boot_report_on(lab: &NetbootLab, id: &str, image: &str, healthy: bool) -> Result<String> {
    let n = node(lab, id)?;
    let boot = &n["boot"];
    ensure!(
        n["connected"] == true && !boot.is_null(),
        "no boot report on a live connection yet (connected {})",
        n["connected"]
    );
    ensure!(
        boot["image"] == image,
        "boot report is about image {} (waiting for {image})",
        boot["image"]
    );
    let checks = boot["checks"].as_array().cloned().unwrap_or_default();
    let all_passed = !checks.is_empty() && checks.iter().all(|c| c["passed"] == true);
    ensure!(
        all_passed == healthy,
        "boot report on {image}: checks {checks:?}"
    );
    ensure!(
        n["inventory"]["os"]
            .as_str()
            .is_some_and(|o| o.ends_with(image)),
        "inventory os {}",
        n["inventory"]["os"]
    );
    Ok(boot["boot_id"].as_str().unwrap_or_default().to_owned())
}

/// `upgrade status ID -o json`.
fn rollout(lab: &NetbootLab, id: &str) -> Result<Value> {
    Ok(serde_json::from_str(
        &lab.ctl_ok(&["upgrade", "status", id, "-o", "json"])?,
    )?)
}

/// Kinds of the node's events after `seq`, oldest first, with their messages.
fn events_since(lab: &NetbootLab, node: &str, seq: u64) -> Result<Vec<(String, String)>> {
    let mut evs: Vec<Value> = lab
        .ctl_list(&["events"])?
        .into_iter()
        .filter(|e| {
            e["seq"].as_u64().unwrap_or(0) > seq && (e["node"] == node || e["node"].is_null())
        })
        .collect();
    evs.sort_by_key(|e| e["seq"].as_u64().unwrap_or(0));
    Ok(evs
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or("").to_owned(),
                e["message"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect())
}

fn last_seq(lab: &NetbootLab) -> Result<u64> {
    Ok(lab
        .ctl_list(&["events"])?
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap_or(0))
}

/// `kinds` appear in this order in `events` (others may come between).
fn in_order(events: &[(String, String)], kinds: &[&str]) -> Result<()> {
    let mut rest = events.iter();
    for k in kinds {
        rest.find(|(kind, _)| kind == k)
            .ok_or_else(|| anyhow!("event {k} missing or out of order in {events:#?}"))?;
    }
    Ok(())
}

/// Starts a rollout of `image` on the VM's node; its id.
fn start(lab: &NetbootLab, image: &str, deadline: Duration) -> Result<String> {
    let selector = format!("netboot.mac={MAC}");
    let deadline = format!("{}s", deadline.as_secs());
    let out = lab.ctl_ok(&[
        "upgrade",
        "start",
        "--image",
        image,
        "--selector",
        &selector,
        "--max-unavailable",
        "1",
        "--max-failures",
        "1",
        "--deadline",
        &deadline,
    ])?;
    println!("{}", out.trim());
    let list = lab.ctl_list(&["upgrade", "list"])?;
    let r = list
        .iter()
        .rfind(|r| r["target"] == format!("image {image}"))
        .context("rollout not listed")?;
    Ok(r["id"].as_str().unwrap_or_default().to_owned())
}

fn write_check(path: &Path) -> Result<()> {
    std::fs::write(path, "#!/bin/sh\necho 'v3 broken on purpose' >&2\nexit 1\n")?;
    Ok(())
}

#[test]
fn image_upgrade_reboots_into_v2_and_rolls_back_from_a_broken_v3() {
    require_netboot!(Firmware::Bios);
    // Built first: the controller must trust its key from the start, beside the lab's own.
    let bins = shoal_tests::bins::Bins::locate().expect("binaries");
    // Beside the lab key, in the per-process image directory.
    let rogue_key = std::env::temp_dir()
        .join(format!("shoal-netboot-image-{}", std::process::id()))
        .join("rogue.pem");
    let rogue = image_signed_by(&bins, "test-rogue", &rogue_key).expect("rogue image");
    let mut lab =
        NetbootLab::start_with_keys(21, DhcpSetup::Full, std::slice::from_ref(&rogue.key_pub))
            .expect("lab");
    println!("FIGURE image build test-1 {:.1?}", lab.image.build_time);
    lab.run(|lab| {
        // Two more images from the same agent binary and key; test-3's health check always fails.
        let check = lab.dir.path().join("v3-health-check");
        write_check(&check)?;
        let v2 = extra_image(&lab.bins, "test-2", None, "")?;
        let v3 = extra_image(&lab.bins, "test-3", Some(&check), "--no-kexec")?;
        println!(
            "FIGURE image build test-2 {:.1?}, test-3 {:.1?}",
            v2.build_time, v3.build_time
        );
        for img in [&v2, &v3, &rogue] {
            lab.ctl_ok(&["image", "add", &img.dir.to_string_lossy()])?;
            // The controller keeps its own copy; the build output is not needed any more.
            let _ = std::fs::remove_dir_all(&img.dir);
        }

        // First boot, on test-1 (the lab's default image).
        let started = Instant::now();
        lab.start_vm("vm-upgrade", Firmware::Bios, MAC)?;
        let n = lab.wait_node_up(MAC, BOOT_TIMEOUT)?;
        let id = n["id"].as_str().context("node id")?.to_owned();
        let boot1 = eventually(
            Duration::from_secs(60),
            "a healthy boot report on test-1",
            || boot_report_on(lab, &id, "test-1", true),
        )?;
        let first_boot = started.elapsed();
        println!("FIGURE image upgrade: VM start to healthy on test-1 in {first_boot:.1?}");
        // Long enough for a reboot under TCG on a loaded machine, short enough to bound the test.
        let deadline = (first_boot * 2 + Duration::from_secs(30))
            .clamp(Duration::from_secs(120), Duration::from_secs(300));
        println!("FIGURE image upgrade: per-node deadline {deadline:?}");

        // test-1 → test-2: a real reboot, a new boot, healthy.
        let seq = last_seq(lab)?;
        let started = Instant::now();
        let r2 = start(lab, "test-2", deadline)?;
        let boot2 = eventually(
            deadline + Duration::from_secs(30),
            "the VM healthy on test-2",
            || {
                lab.controller
                    .ensure_running()
                    .map_err(|e| shoal_tests::abort(format!("{e:#}")))?;
                boot_report_on(lab, &id, "test-2", true)
            },
        )?;
        ensure!(
            boot2 != boot1,
            "the boot id did not change: the VM did not reboot"
        );
        eventually(Duration::from_secs(30), "rollout done", || {
            let r = rollout(lab, &r2)?;
            ensure!(
                r["state"] == "done",
                "rollout {r2} is {}: {}",
                r["state"],
                r["nodes"]
            );
            ensure!(
                r["nodes"][0]["phase"] == "succeeded",
                "node {}",
                r["nodes"][0]
            );
            Ok(())
        })?;
        println!(
            "FIGURE image upgrade: test-1 to test-2 (request, kexec, healthy) in {:.1?}",
            started.elapsed()
        );
        let evs = events_since(lab, &id, seq)?;
        ensure!(
            evs.iter()
                .any(|(k, m)| k == "node_rebooting" && m.contains("kexec into image test-2")),
            "not a kexec: {evs:#?}"
        );
        in_order(
            &evs,
            &[
                "rollout_started",
                "node_upgrade_started",
                "node_reboot_requested",
                "node_rebooting",
                "reenrolled",
                "node_boot_report",
                "node_upgrade_succeeded",
                "rollout_done",
            ],
        )?;
        // kexec: the kernel started again, the firmware and iPXE did not.
        let console = lab.vms[0].log();
        ensure!(
            console.matches("Linux version").count() == 2,
            "kernel starts: {}",
            console.matches("Linux version").count()
        );
        let scripts = lab.controller.log().matches("boot script served").count();
        ensure!(scripts == 1, "iPXE fetched {scripts} boot scripts");

        // test-2 → test-rogue, signed by a key the controller trusts but the node does not hold:
        // the agent refuses the image and the reboot, the node stays up, its upgrade fails with the
        // reason.
        let seq = last_seq(lab)?;
        let started = Instant::now();
        let rr = start(lab, "test-rogue", deadline)?;
        let r = eventually(
            Duration::from_secs(90),
            "the rogue image refused and the node failed with the reason",
            || {
                lab.controller
                    .ensure_running()
                    .map_err(|e| shoal_tests::abort(format!("{e:#}")))?;
                let r = rollout(lab, &rr)?;
                let node = &r["nodes"][0];
                ensure!(node["phase"] == "failed", "node {node}");
                let detail = node["detail"].as_str().unwrap_or_default();
                ensure!(
                    detail.contains("image test-rogue refused")
                        && detail.contains("does not verify"),
                    "detail {detail}"
                );
                ensure!(detail.contains("rolled back"), "detail {detail}");
                Ok(r)
            },
        )?;
        println!(
            "FIGURE image upgrade: test-rogue refused and the node failed in {:.1?}: {}",
            started.elapsed(),
            r["nodes"][0]["detail"]
        );
        let still = boot_report_on(lab, &id, "test-2", true)?;
        ensure!(
            still == boot2,
            "the node rebooted ({boot2} → {still}): it must stay up"
        );
        let evs = events_since(lab, &id, seq)?;
        for (k, m) in &evs {
            println!("event {k}: {m}");
        }
        in_order(
            &evs,
            &[
                "rollout_started",
                "node_upgrade_started",
                "node_reboot_requested",
                "node_reboot_refused",
                "node_upgrade_failed",
                "node_rolled_back",
            ],
        )?;
        ensure!(
            evs.iter().any(|(k, m)| k == "node_reboot_refused"
                && m.contains("image test-rogue refused")
                && m.contains("--image-key")),
            "no refusal naming the image key: {evs:#?}"
        );
        ensure!(
            !evs.iter()
                .any(|(k, _)| k == "node_rebooting" || k == "reenrolled"),
            "the node went down: {evs:#?}"
        );
        let scripts = lab.controller.log().matches("boot script served").count();
        ensure!(
            scripts == 1,
            "iPXE fetched {scripts} boot scripts: the node must not have rebooted"
        );
        ensure!(
            lab.vms[0].log().matches("Linux version").count() == 2,
            "the kernel started again"
        );
        lab.ctl_ok(&["upgrade", "abort", &rr])?;

        // test-2 → test-3, which never becomes healthy: failed at the deadline, rolled back to
        // test-2.
        let seq = last_seq(lab)?;
        let started = Instant::now();
        let r3 = start(lab, "test-3", deadline)?;
        eventually(
            deadline + Duration::from_secs(30),
            "the VM on test-3 reporting its failing check",
            || boot_report_on(lab, &id, "test-3", false),
        )?;
        println!(
            "FIGURE image upgrade: test-2 to test-3 booted (unhealthy) in {:.1?}",
            started.elapsed()
        );
        let n3 = node(lab, &id)?;
        let failed = n3["boot"]["checks"].as_array().cloned().unwrap_or_default();
        ensure!(
            failed.iter().any(|c| c["name"] == "check:health-check"
                && c["passed"] == false
                && c["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("v3 broken on purpose"))),
            "checks {failed:?}"
        );
        let boot4 = eventually(
            deadline * 2 + Duration::from_secs(60),
            "the VM back on test-2, healthy",
            || {
                lab.controller
                    .ensure_running()
                    .map_err(|e| shoal_tests::abort(format!("{e:#}")))?;
                boot_report_on(lab, &id, "test-2", true)
            },
        )?;
        ensure!(boot4 != boot2, "the VM did not reboot for the roll-back");
        eventually(
            Duration::from_secs(30),
            "the node failed (rolled back) and the rollout paused",
            || {
                let r = rollout(lab, &r3)?;
                let node = &r["nodes"][0];
                ensure!(node["phase"] == "failed", "node {node}");
                ensure!(
                    node["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("rolled back")),
                    "node {node}"
                );
                ensure!(
                    r["state"] == "paused",
                    "rollout {r3} is {} ({})",
                    r["state"],
                    r["reason"]
                );
                println!(
                    "rollout {r3}: {} ({}); node: {}",
                    r["state"], r["reason"], node["detail"]
                );
                Ok(())
            },
        )?;
        println!(
            "FIGURE image upgrade: test-3 failed and rolled back to test-2 in {:.1?}",
            started.elapsed()
        );
        let evs = events_since(lab, &id, seq)?;
        for (k, m) in &evs {
            println!("event {k}: {m}");
        }
        in_order(
            &evs,
            &[
                "rollout_started",
                "node_upgrade_started",
                "node_reboot_requested",
                "node_rebooting",
                "node_boot_report",
                "node_upgrade_failed",
                "node_reboot_requested",
                "node_rebooting",
                "node_rolled_back",
            ],
        )?;
        ensure!(
            evs.iter().any(|(k, m)| k == "node_boot_report"
                && m.contains("image test-3")
                && m.contains("checks failed")),
            "no failing test-3 boot report event"
        );
        ensure!(
            evs.iter().any(|(k, _)| k == "rollout_paused"),
            "rollout not paused"
        );
        let reboots: Vec<&str> = evs
            .iter()
            .filter(|(k, _)| k == "node_rebooting")
            .map(|(_, m)| m.as_str())
            .collect();
        ensure!(
            reboots.len() == 2
                && reboots[0].contains("kexec into image test-3")
                && reboots[1].contains("reboot(2)"),
            "reboots {reboots:?}"
        );
        // The roll-back was a full reboot: firmware, iPXE fetching the restored assignment, the
        // kernel.
        let console = lab.vms[0].log();
        let scripts = lab.controller.log().matches("boot script served").count();
        ensure!(
            scripts == 2,
            "iPXE fetched {scripts} boot scripts (expected a second one after the reset)"
        );
        ensure!(
            console.matches("Linux version").count() == 4,
            "kernel starts: {}",
            console.matches("Linux version").count()
        );
        let machines = lab.ctl_list(&["machines", "list"])?;
        let m = machines
            .iter()
            .find(|m| {
                m["mac"]
                    .as_str()
                    .is_some_and(|x| x.eq_ignore_ascii_case(MAC))
            })
            .context("machine")?;
        println!("machine: {m}");
        ensure!(
            m["last_image"] == "test-2",
            "machine last booted {}",
            m["last_image"]
        );
        let shown = lab.ctl_ok(&["nodes", "show", &id])?;
        println!("{shown}");
        ensure!(
            shown.contains("shoal netboot image test-2")
                && shown.contains("boot checks:   healthy"),
            "nodes show: {shown}"
        );
        Ok(())
    });
}
