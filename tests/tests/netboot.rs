//! Netboot end to end: diskless qemu VMs (TCG) on a bridge in a network namespace boot the shoal
//! image from the controller and enrol. BIOS (iPXE option ROM → HTTP script), UEFI (OVMF → TFTP
//! ipxe.efi → HTTP script), and proxyDHCP beside dnsmasq as the network's DHCP server.
//!
//! Needs root, qemu-system-x86, ipxe-qemu, ipxe, ovmf, linux-image-amd64, busybox-static,
//! smartmontools, dnsmasq, cpio, zstd (scripts/deps). Each VM boot takes 1–3 minutes under TCG.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use shoal_tests::netboot::{token_from_console, DhcpSetup, Firmware, NetbootLab};
use shoal_tests::process::output_with_timeout;
use shoal_tests::{eventually, require_netboot};

/// Deadline from VM start to the node being up.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// The node's inventory matches the VM: 2 cores, 512 MiB, its MAC, DMI vendor QEMU, the image's OS.
fn check_inventory(node: &Value, mac: &str, version: &str, boot_mode: &str) -> Result<()> {
    let inv = &node["inventory"];
    ensure!(
        inv["cpu_cores"] == 2,
        "cpu_cores {} (VM has 2)",
        inv["cpu_cores"]
    );
    let mem = inv["memory_bytes"].as_u64().unwrap_or(0);
    ensure!(
        (400 << 20..=512 << 20).contains(&mem),
        "memory {mem} bytes (VM has 512 MiB)"
    );
    ensure!(
        inv["dmi"]["vendor"] == "QEMU",
        "DMI vendor {}",
        inv["dmi"]["vendor"]
    );
    ensure!(
        inv["boot_mode"] == boot_mode,
        "boot mode {} (expected {boot_mode})",
        inv["boot_mode"]
    );
    ensure!(
        inv["os"].as_str().is_some_and(|o| o.contains(version)),
        "os {} does not name image {version}",
        inv["os"]
    );
    ensure!(
        node["labels"]["netboot.image"] == version,
        "labels {}",
        node["labels"]
    );
    ensure!(
        node["labels"]["netboot.mac"]
            .as_str()
            .is_some_and(|m| m.eq_ignore_ascii_case(mac)),
        "labels {}",
        node["labels"]
    );
    Ok(())
}

/// Which boot stages the serial console shows (iPXE banner, Linux, the image's init starting the
/// agent).
fn stage_times(lab: &NetbootLab, vm: usize) -> String {
    let log = lab.vms[vm].log();
    let has = |s: &str| if log.contains(s) { "yes" } else { "no" };
    format!(
        "ipxe={} kernel={} agent={}",
        has("iPXE"),
        has("Linux version"),
        has("agent starting")
    )
}

fn boot_and_check(
    lab: &mut NetbootLab,
    firmware: Firmware,
    mac: &str,
    boot_mode: &str,
) -> Result<Value> {
    let started = Instant::now();
    let vm = lab.start_vm(&format!("vm-{boot_mode}"), firmware, mac)?;
    let node = lab.wait_node_up(mac, BOOT_TIMEOUT)?;
    println!(
        "FIGURE netboot {boot_mode}: VM start to up in {:.1?} ({})",
        started.elapsed(),
        stage_times(lab, vm)
    );
    let version = lab.image.version.clone();
    // Inventory and labels may trail the up transition by a report.
    eventually(Duration::from_secs(20), "inventory matching the VM", || {
        let nodes = lab.ctl_list(&["nodes", "list"])?;
        let n = nodes
            .iter()
            .find(|n| n["id"] == node["id"])
            .context("node vanished")?;
        check_inventory(n, mac, &version, boot_mode)
    })?;
    // The machine table knows it, with its architecture and node.
    let machines = lab.ctl_list(&["machines", "list"])?;
    let m = machines
        .iter()
        .find(|m| {
            m["mac"]
                .as_str()
                .is_some_and(|x| x.eq_ignore_ascii_case(mac))
        })
        .context("machine not listed")?;
    ensure!(
        m["node"] == node["id"],
        "machine {m} not linked to node {}",
        node["id"]
    );
    ensure!(m["last_image"] == version.as_str(), "machine {m}");
    Ok(node)
}

/// A replayed per-boot token is refused: a second agent presenting the VM's token cannot enrol.
fn replayed_token_is_refused(lab: &mut NetbootLab, vm: usize) -> Result<()> {
    let token = token_from_console(&lab.vms[vm])?;
    let state = lab.dir.path().join("replay-state");
    let out = output_with_timeout(
        lab.in_controller_ns(&lab.bins.agent.to_string_lossy())
            .arg("--controller")
            .arg(format!("{}:7440", lab.controller_ip))
            .arg("--token")
            .arg(&token)
            .arg("--state-dir")
            .arg(&state)
            .arg("--machine-id")
            .arg("replay-attacker"),
        Duration::from_secs(60),
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2),
        "replayed token: agent exit {:?}: {stderr}",
        out.status
    );
    ensure!(
        stderr.contains("used"),
        "replayed token refused for another reason: {stderr}"
    );
    Ok(())
}

/// TFTP refuses path traversal and serves the iPXE binaries; HTTP survives a client that stops
/// mid-transfer; a tampered image is refused. The boot servers are reached from a host on the LAN:
/// they are bound to the netboot interface.
fn faults(lab: &mut NetbootLab) -> Result<()> {
    let ip = lab.controller_ip;
    let tmp = lab.dir.path().to_owned();
    let curl = |args: &[&str]| -> Result<std::process::Output> {
        output_with_timeout(
            lab.in_client_ns("curl").args(["-s", "-S"]).args(args),
            Duration::from_secs(60),
        )
    };
    let got = tmp.join("undionly.kpxe");
    let out = curl(&[
        "--tftp-blksize",
        "1400",
        "-o",
        &got.to_string_lossy(),
        &format!("tftp://{ip}/undionly.kpxe"),
    ])?;
    ensure!(
        out.status.success(),
        "TFTP download failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        std::fs::read(&got)? == std::fs::read("/usr/lib/ipxe/undionly.kpxe")?,
        "TFTP served different bytes"
    );
    for bad in [
        "../../../../etc/passwd",
        "/../etc/shadow",
        "..%2f..%2fetc/passwd",
    ] {
        let out = curl(&[
            "--path-as-is",
            "-o",
            "/dev/null",
            &format!("tftp://{ip}/{bad}"),
        ])?;
        ensure!(!out.status.success(), "TFTP served {bad}");
    }
    // A client that stops mid-transfer, then a full download still works.
    let url = format!("http://{ip}:7442/images/{}/initrd.img", lab.image.version);
    let _ = curl(&[
        "--limit-rate",
        "100k",
        "--max-time",
        "1",
        "-o",
        "/dev/null",
        &url,
    ])?;
    let out = curl(&["-o", &tmp.join("initrd").to_string_lossy(), &url])?;
    ensure!(
        out.status.success(),
        "HTTP download failed after an aborted one"
    );
    ensure!(
        std::fs::read(tmp.join("initrd"))? == std::fs::read(lab.image.dir.join("initrd.img"))?,
        "HTTP served different bytes"
    );

    // A tampered copy of the image (renamed version, so the signature no longer matches) is
    // refused.
    let bad = tmp.join("bad-image");
    std::fs::create_dir_all(&bad)?;
    for f in ["vmlinuz", "initrd.img", "manifest.json", "manifest.sig"] {
        std::fs::copy(lab.image.dir.join(f), bad.join(f))?;
    }
    let manifest =
        std::fs::read_to_string(bad.join("manifest.json"))?.replace(&lab.image.version, "evil-1");
    std::fs::write(bad.join("manifest.json"), manifest)?;
    let out = lab.ctl(&["image", "add", &bad.to_string_lossy()])?;
    ensure!(!out.status.success(), "a tampered image was accepted");
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("signature"),
        "refusal: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let images = lab.ctl_list(&["image", "list"])?;
    ensure!(images.len() == 1, "images: {images:?}");
    Ok(())
}

#[test]
fn bios_vm_netboots_with_full_dhcp_and_enrols() {
    require_netboot!(Firmware::Bios);
    let mut lab = NetbootLab::start(11, DhcpSetup::Full).expect("lab");
    println!("FIGURE image build {:.1?}", lab.image.build_time);
    lab.run(|lab| {
        faults(lab)?;
        let mac = "52:54:00:4e:42:01";
        let node = boot_and_check(lab, Firmware::Bios, mac, "bios")?;
        replayed_token_is_refused(lab, 0)?;
        // Reboot: the machine keeps its node record (hardware identity).
        lab.vms[0].kill()?;
        lab.vms.clear();
        let started = Instant::now();
        lab.start_vm("vm-bios-again", Firmware::Bios, mac)?;
        eventually(BOOT_TIMEOUT, "the rebooted VM to enrol again", || {
            let nodes = lab.ctl_list(&["nodes", "list"])?;
            let events = lab.ctl_list(&["events"])?;
            ensure!(
                events.iter().any(|e| e["kind"] == "reenrolled"),
                "no re-enrolment yet"
            );
            ensure!(
                nodes.len() == 1,
                "expected the same single node, got {}",
                nodes.len()
            );
            ensure!(nodes[0]["id"] == node["id"], "node id changed");
            ensure!(nodes[0]["status"] == "up", "node is {}", nodes[0]["status"]);
            Ok(())
        })?;
        println!(
            "FIGURE netboot bios reboot: VM start to up in {:.1?}",
            started.elapsed()
        );
        Ok(())
    });
}

#[test]
fn uefi_vm_netboots_over_tftp_and_enrols() {
    require_netboot!(Firmware::Uefi);
    let mut lab = NetbootLab::start(12, DhcpSetup::Full).expect("lab");
    lab.run(|lab| {
        boot_and_check(lab, Firmware::Uefi, "52:54:00:4e:42:02", "uefi")?;
        ensure!(
            lab.controller.log().contains("TFTP transfer done"),
            "UEFI boot did not load iPXE over TFTP"
        );
        let machines = lab.ctl_list(&["machines", "list"])?;
        ensure!(
            machines.iter().any(|m| m["arch"] == "x86-64 uefi"),
            "machines: {machines:?}"
        );
        Ok(())
    });
}

#[test]
fn proxy_dhcp_beside_dnsmasq() {
    require_netboot!(Firmware::Bios);
    let mut lab = NetbootLab::start(13, DhcpSetup::ProxyWithDnsmasq).expect("lab");
    lab.run(|lab| {
        let node = boot_and_check(lab, Firmware::Bios, "52:54:00:4e:42:03", "bios")?;
        // The address came from dnsmasq's range, not from the controller.
        let addrs: Vec<String> = node["inventory"]["nics"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|n| n["addresses"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        ensure!(
            addrs
                .iter()
                .any(|a| a.starts_with("10.78.13.1") && !a.starts_with("10.78.13.1/")),
            "addresses {addrs:?}"
        );
        let leases =
            std::fs::read_to_string(lab.dir.path().join("dnsmasq.leases")).unwrap_or_default();
        ensure!(
            leases.contains("52:54:00:4e:42:03"),
            "dnsmasq has no lease for the VM: {leases}"
        );
        Ok(())
    });
}

/// A MAC that never PXE-booted gets no boot token from its iPXE script; once it sends a PXE
/// DHCPDISCOVER on the netboot LAN, the same request gets a script with a token bound to it. What
/// reaches the netboot address over the controller's other interface is not served: neither a
/// DISCOVER (no sighting) nor an HTTP request.
#[test]
fn boot_token_only_after_a_pxe_boot_on_the_netboot_lan() {
    require_netboot!(Firmware::Bios);
    let mut lab = NetbootLab::start(14, DhcpSetup::Full).expect("lab");
    lab.run(|lab| {
        let mac = "52:54:00:4e:42:04";
        let path = "/boot/52-54-00-4e-42-04.ipxe";
        let script = lab.client_http_get(path)?;
        ensure!(
            script.contains(&format!("no PXE boot from {mac} seen")),
            "refusal expected: {script}"
        );
        ensure!(
            !script.contains("shoal.token="),
            "a token for a MAC that never PXE-booted: {script}"
        );
        ensure!(
            lab.ctl_list(&["token", "list"])?.is_empty(),
            "a token was minted"
        );

        // Not from the netboot interface: no sighting, and no boot HTTP answer.
        ensure!(
            lab.outsider_http_get(path).is_err(),
            "the boot HTTP server answered on another interface"
        );
        lab.outsider_pxe_discover(mac)?;
        let script = lab.client_http_get(path)?;
        ensure!(
            !script.contains("shoal.token="),
            "a DISCOVER from another interface counted as a PXE boot: {script}"
        );

        ensure!(
            lab.client_pxe_discover(mac)?,
            "no DHCPOFFER for the PXE DISCOVER"
        );
        let script = lab.client_http_get(path)?;
        ensure!(
            script.contains("shoal.token=") && script.contains("kernel http://"),
            "no token after a PXE boot: {script}"
        );
        let events = lab.ctl_list(&["events"])?;
        ensure!(
            events.iter().any(|e| e["message"]
                .as_str()
                .is_some_and(|m| m.contains("boot token") && m.contains(mac))),
            "no boot token bound to {mac} in the events: {events:?}"
        );
        ensure!(
            lab.controller.log().contains("boot script refused"),
            "refusals are not logged"
        );
        Ok(())
    });
}
