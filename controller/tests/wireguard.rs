//! `shoalctl wireguard peer add|list|remove` as an operator runs it: the real binary against a real
//! controller on loopback. The configuration it prints is read back with `wg`'s key rules: the
//! printed private key's public half is the one the controller stored.
//!
//! Needs the shoalctl binary built (`cargo build -p shoalctl`; see `shoalctl_bin`).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};

use common::harness::*;
use serde_json::Value;
use shoal_wireguard::Key;

fn shoalctl(ctl: &Ctl, xdg: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(shoalctl_bin());
    cmd.env_remove("SHOAL_CONFIG")
        .env_remove("SHOAL_CONTEXT")
        .env("XDG_CONFIG_HOME", xdg)
        .arg("--config")
        .arg(&ctl.admin_conf)
        .args(args);
    tokio::task::block_in_place(|| cmd.output().unwrap())
}

fn json(ctl: &Ctl, xdg: &std::path::Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = shoalctl(ctl, xdg, &all);
    assert!(
        out.status.success(),
        "shoalctl {} failed: {}",
        all.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_are_added_with_a_config_listed_and_removed() {
    let ctl = Ctl::start().await;
    let xdg = tempfile::tempdir().unwrap();
    let xdg = xdg.path();

    // The first device names the endpoint; its key pair is made by shoalctl.
    let added = json(
        &ctl,
        xdg,
        &[
            "wireguard",
            "peer",
            "add",
            "phone",
            "--network",
            "default",
            "--endpoint",
            "gw.example.net:51820",
        ],
    );
    assert_eq!(added["peer"]["name"], "phone");
    assert_eq!(added["peer"]["address"], "10.90.0.1", "{added}");
    assert_eq!(added["allowed_ips"], "10.90.0.0/16");
    let private: Key = added["private_key"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        added["peer"]["public_key"].as_str().unwrap(),
        private.public().to_string(),
        "the controller stored the printed key's public half"
    );
    let config = added["config"].as_str().unwrap();
    assert!(
        config.contains(&format!("PrivateKey = {private}\n")),
        "{config}"
    );
    assert!(config.contains("Address = 10.90.0.1/32\n"), "{config}");
    assert!(config.contains(&format!(
        "PublicKey = {}\n",
        added["gateway_public_key"].as_str().unwrap()
    )));
    assert!(
        config.contains("Endpoint = gw.example.net:51820\n"),
        "{config}"
    );
    assert!(config.contains("AllowedIPs = 10.90.0.0/16\n"), "{config}");

    // A device with its own key: no private key printed, the next address, the same gateway.
    let own = Key::generate_private().public().to_string();
    let laptop = json(
        &ctl,
        xdg,
        &[
            "wg",
            "peer",
            "add",
            "laptop",
            "--network",
            "default",
            "--public-key",
            &own,
        ],
    );
    assert_eq!(laptop["peer"]["address"], "10.90.0.2");
    assert_eq!(laptop["private_key"], Value::Null);
    assert_eq!(laptop["gateway_public_key"], added["gateway_public_key"]);
    assert!(laptop["config"]
        .as_str()
        .unwrap()
        .contains("PrivateKey = <the device's private key>"));

    // The table, for a person (stdout is not a terminal here: no QR code).
    let text = shoalctl(
        &ctl,
        xdg,
        &["wireguard", "peer", "add", "tablet", "--network", "default"],
    );
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("[Interface]") && text.contains("[Peer]"),
        "{text}"
    );
    assert!(!text.contains('█'), "no QR code off a terminal: {text}");

    let listed = json(
        &ctl,
        xdg,
        &["wireguard", "peers", "list", "--network", "default"],
    );
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["phone", "laptop", "tablet"]);

    let gone = json(
        &ctl,
        xdg,
        &[
            "wireguard",
            "peer",
            "remove",
            "phone",
            "--network",
            "default",
        ],
    );
    assert_eq!(gone["address"], "10.90.0.1");
    let listed = json(
        &ctl,
        xdg,
        &["wireguard", "peer", "list", "--network", "default"],
    );
    assert_eq!(listed.as_array().unwrap().len(), 2);

    // Bad input: a clear error and a failing exit.
    for (args, says) in [
        (
            vec![
                "wireguard",
                "peer",
                "add",
                "x",
                "--network",
                "default",
                "--public-key",
                "nope",
            ],
            "not a WireGuard key",
        ),
        (
            vec!["wireguard", "peer", "add", "laptop", "--network", "default"],
            "already has a WireGuard device named",
        ),
        (
            vec!["wireguard", "peer", "add", "x", "--network", "nope"],
            "no network named",
        ),
        (
            vec![
                "wireguard",
                "peer",
                "remove",
                "ghost",
                "--network",
                "default",
            ],
            "no WireGuard device named",
        ),
    ] {
        let out = shoalctl(&ctl, xdg, &args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
