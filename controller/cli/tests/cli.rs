//! shoalctl as an operator meets it before any controller answers: its version, what it says
//! when the credentials are missing or unreadable, its completion scripts and man pages, and
//! `release keygen`. (The commands against a live controller are run
//! by the controller's in-process tests and the host tests.) Having an integration test here also
//! makes `cargo test` build the `shoalctl` binary that those tests run.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn shoalctl(args: &[&str]) -> Output {
    // A config home of its own: an operator's contexts file is not read.
    let xdg = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_shoalctl"))
        .env_remove("SHOAL_CONFIG")
        .env_remove("SHOAL_CONTEXT")
        .env("XDG_CONFIG_HOME", xdg.path())
        .args(args)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
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
        "shoalctl: no admin credentials: pass --config DATA_DIR/admin.conf or set SHOAL_CONFIG, \
         or add a context: shoalctl config import NAME DATA_DIR/admin.conf"
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
fn completion_scripts_generate_and_bash_accepts_its_own() {
    for shell in ["bash", "zsh", "fish"] {
        let out = shoalctl(&["completion", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        assert!(script.contains("shoalctl"), "{shell}");
        assert!(
            script.contains("use-context"),
            "{shell}: subcommands are completed"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let bash = dir.path().join("shoalctl.bash");
    std::fs::write(&bash, shoalctl(&["completion", "bash"]).stdout).unwrap();
    let checked = Command::new("bash").arg("-n").arg(&bash).output().unwrap();
    assert!(checked.status.success(), "{}", stderr(&checked));
    // Sourced, it completes `shoalctl nod` to `nodes` (and the alias `node`).
    let probe = format!(
        "source {}; COMP_WORDS=(shoalctl nod); COMP_CWORD=1; COMP_LINE='shoalctl nod'; \
         COMP_POINT=${{#COMP_LINE}}; _shoalctl shoalctl nod shoalctl; echo \"${{COMPREPLY[@]}}\"",
        bash.display()
    );
    let completed = Command::new("bash").arg("-c").arg(&probe).output().unwrap();
    assert!(
        stdout(&completed).split_whitespace().any(|w| w == "nodes"),
        "{}{}",
        stdout(&completed),
        stderr(&completed)
    );
    let bad = shoalctl(&["completion", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2), "a usage error");
}

#[test]
fn man_pages_are_written_for_the_program_and_each_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man1");
    let out = shoalctl(&["generate-man", man.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let top = std::fs::read_to_string(man.join("shoalctl.1")).unwrap();
    assert!(
        top.starts_with(".ie") || top.contains(".TH shoalctl"),
        "{}",
        &top[..200.min(top.len())]
    );
    assert!(top.contains("Operate a shoal fleet"));
    for page in [
        "shoalctl-nodes-list.1",
        "shoalctl-events.1",
        "shoalctl-config-use-context.1",
    ] {
        let text =
            std::fs::read_to_string(man.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}");
    }
    let events = std::fs::read_to_string(man.join("shoalctl-events.1")).unwrap();
    assert!(events.contains("follow"), "options are documented");
}

#[test]
fn keygen_writes_openssls_key_form_privately_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("release.pem");
    let out = shoalctl(&["release", "keygen", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let public = dir.path().join("release.pub");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    let hex = std::fs::read_to_string(&public).unwrap();
    assert!(
        hex.trim().len() == 64 && hex.trim().bytes().all(|b| b.is_ascii_hexdigit()),
        "{hex}"
    );

    // OpenSSL reads the key and derives the same public key (the operators' guide's recipe).
    let der = Command::new("openssl")
        .args(["pkey", "-in"])
        .arg(&key)
        .args(["-pubout", "-outform", "DER"])
        .output()
        .unwrap();
    assert!(der.status.success(), "{}", stderr(&der));
    let raw: String = der.stdout[der.stdout.len() - 32..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(raw, hex.trim());

    let before = std::fs::read(&key).unwrap();
    let again = shoalctl(&["release", "keygen", key.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("refusing to overwrite"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read(&key).unwrap(), before, "the key is untouched");
    // Only the public file there: still refused, and no private key is left behind.
    let lone = dir.path().join("lone.pem");
    std::fs::write(dir.path().join("lone.pub"), "x").unwrap();
    assert_eq!(
        shoalctl(&["release", "keygen", lone.to_str().unwrap()])
            .status
            .code(),
        Some(1)
    );
    assert!(!lone.exists());
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
