//! Install and run (issue 16): the two Debian packages on a fresh Debian system booted with
//! systemd (`systemd-nspawn`, a `debootstrap` rootfs cached under the target dir), as an operator
//! would: `dpkg -i`, the controller's unit starts by itself as its own user, the agent's unit waits
//! for its config file, a refused agent is not restarted (exit 2), and configured with a DNS name
//! and a token file it enrols and runs from its own copy of the executable. Along the way: the
//! units pass `systemd-analyze verify`, the config files' keys reach the daemons (the agent logs
//! JSON), and a `shoalctl` reaching the admin API by a name in its certificate (`api-name`) works
//! while one using a name not in it is refused.
//!
//! The packages are the debug binaries `cargo build --workspace --bins` made, packaged by
//! `scripts/package --dev`. Needs root, systemd-nspawn (systemd-container), debootstrap and
//! cargo-deb (scripts/deps); the first run downloads a minimal Debian from the mirror apt uses.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use shoal_tests::container::{cached_rootfs, Machine};
use shoal_tests::testkit::{cmd, consistently, require, skip};
use shoal_tests::{eventually, OrPanic};

const TIMEOUT: Duration = Duration::from_secs(60);
const ADMIN: &str = "/var/lib/shoal-controller/admin.conf";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// `systemctl show -p PROP --value UNIT`.
fn show(m: &Machine, unit: &str, prop: &str) -> Result<String> {
    Ok(m.sh(&format!("systemctl show -p {prop} --value {unit}"))?
        .trim()
        .to_owned())
}

#[test]
fn the_packages_install_on_fresh_debian_and_their_units_enrol_an_agent() {
    require!(skip::root());
    require!(skip::tool("systemd-nspawn", "systemd-container"));
    require!(skip::tool("debootstrap", "debootstrap"));
    require!(skip::tool("nsenter", "util-linux"));
    require!(skip::tool(
        "cargo-deb",
        "cargo-deb (scripts/deps: cargo install)"
    ));
    scenario().or_panic();
}

fn scenario() -> Result<()> {
    // The packages, from the binaries of this build.
    let out = cmd::run(Command::new(workspace().join("scripts/package")).arg("--dev"))?;
    let debs: std::collections::BTreeSet<PathBuf> = out
        .lines()
        .filter(|l| l.ends_with(".deb"))
        .map(|l| workspace().join(l.trim()))
        .collect();
    ensure!(debs.len() == 2, "scripts/package made {debs:?}");

    let cache = target_dir().join("install-test");
    let rootfs = cached_rootfs(&cache)?;
    let name = format!("shoal-install-{}", std::process::id());
    let m = Machine::boot(&rootfs, &cache.join(&name), &name)?;
    let result = in_machine(&m, &debs);
    if result.is_err() {
        // What the units said, before the container and its journal go away.
        let journal = m.sh_output("journalctl -b --no-pager -u shoal-controller -u shoal-agent");
        if let Ok(out) = journal {
            eprintln!("journal:\n{}", String::from_utf8_lossy(&out.stdout));
        }
    }
    result
}

fn in_machine(m: &Machine, debs: &std::collections::BTreeSet<PathBuf>) -> Result<()> {
    for deb in debs {
        std::fs::copy(
            deb,
            m.root().join("root").join(deb.file_name().context("name")?),
        )?;
    }
    // Names for the controller, as DNS would give them (the container's own /etc/hosts).
    m.sh("echo '127.0.0.1 shoal.fleet.test' >> /etc/hosts; echo '127.0.0.1 other.fleet.test' >> /etc/hosts")?;

    // Install: the controller starts by itself, as its own user; the agent waits for its config.
    m.sh("dpkg -i /root/shoal-controller_*.deb /root/shoal-agent_*.deb")?;
    eventually(TIMEOUT, "the controller's unit and admin.conf", || {
        ensure!(show(m, "shoal-controller", "ActiveState")? == "active");
        m.sh(&format!("test -s {ADMIN}"))?;
        Ok(())
    })?;
    let pid = show(m, "shoal-controller", "MainPID")?;
    let owner = m.sh(&format!(
        "stat -c '%U' /proc/{pid} /var/lib/shoal-controller {ADMIN}; stat -c '%a' /var/lib/shoal-controller {ADMIN}"
    ))?;
    ensure!(
        owner.split_whitespace().collect::<Vec<_>>()
            == [
                "shoal-controller",
                "shoal-controller",
                "shoal-controller",
                "700",
                "600"
            ],
        "the controller runs as its own user and its data dir is its alone: {owner}"
    );
    ensure!(m.sh("systemctl is-enabled shoal-agent")?.trim() == "enabled");
    ensure!(
        show(m, "shoal-agent", "ActiveState")? == "inactive",
        "the agent does not start without /etc/shoal/agent.toml"
    );
    let verify = m.sh_output(
        "systemd-analyze verify /lib/systemd/system/shoal-controller.service /lib/systemd/system/shoal-agent.service",
    )?;
    ensure!(
        verify.status.success() && !String::from_utf8_lossy(&verify.stderr).contains("shoal"),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    // The admin API by a name in its certificate (api-name in the config file); a name not in it
    // is refused by shoalctl's certificate check.
    m.write(
        "/etc/shoal/controller.toml",
        "api = \"0.0.0.0:7441\"\napi-name = [\"shoal.fleet.test\"]\n",
    )?;
    m.sh("systemctl restart shoal-controller")?;
    let ctl = format!("shoalctl --config {ADMIN} --api https://shoal.fleet.test:7441");
    let token = eventually(TIMEOUT, "a join token through the API's name", || {
        m.sh(&format!("{ctl} token create --uses 1"))
    })?;
    let token = token.trim();
    let wrong = m.sh_output(&format!(
        "shoalctl --config {ADMIN} --api other.fleet.test:7441 nodes list"
    ))?;
    let said = String::from_utf8_lossy(&wrong.stderr).to_lowercase();
    ensure!(
        !wrong.status.success() && said.contains("certificate"),
        "a name not in the API's certificate must be refused by the certificate check: {said}"
    );

    // A refused agent (a malformed token) stops with exit 2, and the unit does not restart it.
    m.write(
        "/etc/shoal/agent.toml",
        "controller = \"shoal.fleet.test:7440\"\nno-drives = true\nlog_format = \"json\"\n\
         token = \"not-a-token\"\n",
    )?;
    m.sh("systemctl start shoal-agent")?;
    eventually(TIMEOUT, "the refused agent to stop", || {
        ensure!(show(m, "shoal-agent", "ActiveState")? == "failed");
        Ok(())
    })?;
    ensure!(show(m, "shoal-agent", "ExecMainStatus")? == "2");
    consistently(Duration::from_secs(7), "no restart after exit 2", || {
        ensure!(show(m, "shoal-agent", "NRestarts")? == "0");
        ensure!(show(m, "shoal-agent", "ActiveState")? == "failed");
        Ok(())
    })?;

    // With the operator's token in a file, it enrols, by the controller's DNS name.
    m.write("/etc/shoal/agent.token", &format!("{token}\n"))?;
    m.sh("chmod 600 /etc/shoal/agent.token")?;
    m.write(
        "/etc/shoal/agent.toml",
        "controller = [\"shoal.fleet.test:7440\"]\ntoken-file = \"/etc/shoal/agent.token\"\n\
         no-drives = true\nlog_format = \"json\"\n",
    )?;
    m.sh("systemctl reset-failed shoal-agent; systemctl start shoal-agent")?;
    let node = eventually(TIMEOUT, "the agent enrolled and up", || {
        let nodes: Value =
            serde_json::from_str(&m.sh(&format!("{ctl} nodes list --output json"))?)?;
        let node = nodes
            .as_array()
            .and_then(|a| a.first())
            .cloned()
            .context("no node yet")?;
        ensure!(
            node["connected"] == true && node["status"] == "up",
            "{node}"
        );
        Ok(node)
    })?;
    eprintln!("enrolled: {}", node["id"]);

    // It runs from its own copy of the executable, which self-updates replace; dpkg's stays.
    let pid = show(m, "shoal-agent", "MainPID")?;
    let exe = m.sh(&format!("readlink /proc/{pid}/exe"))?;
    ensure!(
        exe.trim() == "/var/lib/shoal-agent/bin/shoal-agent",
        "agent runs {exe}"
    );
    m.sh("cmp /usr/bin/shoal-agent /var/lib/shoal-agent/bin/shoal-agent")?;
    let verify = m.sh("dpkg --verify shoal-agent shoal-controller || true")?;
    ensure!(
        !verify.contains("/usr/bin"),
        "dpkg's files are untouched: {verify}"
    );

    // The config file's log_format reached it: its journal lines are JSON objects.
    let journal = m.sh("journalctl -u shoal-agent -o cat --no-pager")?;
    let json = journal
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "agent starting")
        .with_context(|| format!("no JSON 'agent starting' line in the journal:\n{journal}"))?;
    ensure!(json["level"] == "INFO", "{json}");
    Ok(())
}
