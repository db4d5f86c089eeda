//! shoalctl as an operator meets it before any controller answers: its version, and what it says
//! when the credentials are missing or unreadable. (The commands against a live controller are run
//! by the controller's in-process tests and the host tests.) Having an integration test here also
//! makes `cargo test` build the `shoalctl` binary that those tests run.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn shoalctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoalctl"))
        .env_remove("SHOAL_CONFIG")
        .args(args)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn version_names_the_program() {
    let out = shoalctl(&["--version"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("shoalctl {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn without_credentials_it_says_where_to_find_them() {
    let out = shoalctl(&["nodes", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        "shoalctl: no admin credentials: pass --config DATA_DIR/admin.conf or set SHOAL_CONFIG"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn unreadable_credentials_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("admin.conf");
    let out = shoalctl(&["--config", missing.to_str().unwrap(), "report"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with(&format!("shoalctl: {}: ", missing.display())),
        "{}",
        stderr(&out)
    );

    std::fs::write(&missing, "api = [").unwrap();
    let out = shoalctl(&["--config", missing.to_str().unwrap(), "report"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is not a shoal admin configuration"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn version_prints_its_own_even_without_a_controller() {
    let out = shoalctl(&["version"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(out.stdout.clone()).unwrap(),
        format!("shoalctl {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert!(
        stderr(&out).contains("no admin credentials"),
        "{}",
        stderr(&out)
    );
    let out = shoalctl(&["version", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["client"], env!("CARGO_PKG_VERSION"));
    assert!(json["server"].is_null());
    assert!(json["error"]
        .as_str()
        .unwrap()
        .contains("no admin credentials"));
}
