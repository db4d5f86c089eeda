//! The overlay end to end: real agents with real TAP devices, each host in its own network namespace.
//!
//! Needs root (skips with a reason otherwise, fails under CI) and the binaries: `cargo build --workspace --bins`.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use shoal_tests::{eventually, require_host_tests, Fleet, FleetConfig, OrPanic};

/// Deadline for agents to get their netmap and bring their TAP device up.
const TAP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a command in a namespace; its stdout, or an error with its stderr.
fn in_ns(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(["netns", "exec", ns, program]).args(args).output()?;
    if !out.status.success() {
        bail!("`{program} {}` in {ns} failed: {}{}", args.join(" "), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The IPv4 address of `dev` in namespace `ns`.
fn tap_addr(ns: &str, dev: &str) -> Result<Ipv4Addr> {
    let out = in_ns(ns, "ip", &["-4", "-o", "addr", "show", "dev", dev])?;
    let addr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .with_context(|| format!("no IPv4 address on {dev} in {ns}: {out}"))?;
    Ok(addr.parse()?)
}

fn ping(ns: &str, to: Ipv4Addr) -> Result<String> {
    in_ns(ns, "ping", &["-c", "1", "-W", "1", &to.to_string()])
}

#[test]
fn two_agents_on_a_lan_ping_over_the_overlay() {
    require_host_tests!();
    let fleet = Fleet::start(FleetConfig::fast().agents(2)).or_panic();
    let a = fleet.agents()[0].netns.clone();
    let b = fleet.agents()[1].netns.clone();
    let (addr_a, addr_b) = eventually(TAP_TIMEOUT, "both agents have shoal0 with an address", || {
        Ok((tap_addr(&a, "shoal0")?, tap_addr(&b, "shoal0")?))
    })
    .or_panic();
    assert_ne!(addr_a, addr_b);
    eventually(Duration::from_secs(std::env::var("OVDBG").map(|_| 300).unwrap_or(20)), "a pings b over the overlay", || ping(&a, addr_b)).or_panic();
    eventually(Duration::from_secs(20), "b pings a over the overlay", || ping(&b, addr_a)).or_panic();
}
