//! shoalctl scripted as an operator's scripts run it: the real binary against a real controller
//! (and real agents) on loopback — `-o json` of mutating commands, `--no-headers`, `-o wide`,
//! singular and plural nouns, `events -f`, `--wait` and its exit codes, `status -w`, a release
//! signed with a `release keygen` key, and contexts that switch between two fleets.
//!
//! Needs the shoalctl binary built (`cargo build -p shoalctl`; see `shoalctl_bin`).

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::mpsc,
};

use common::{eventually, harness::*};
use serde_json::Value;

/// Runs shoalctl with `--config conf` (none: no credentials flag) and a private
/// `XDG_CONFIG_HOME`, so no operator's own contexts file is read.
struct Shoalctl {
    conf: Option<PathBuf>,
    xdg: PathBuf,
}

impl Shoalctl {
    fn new(conf: Option<&Path>, xdg: &Path) -> Shoalctl {
        Shoalctl {
            conf: conf.map(Path::to_owned),
            xdg: xdg.to_owned(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(shoalctl_bin());
        cmd.env_remove("SHOAL_CONFIG")
            .env_remove("SHOAL_CONTEXT")
            .env("XDG_CONFIG_HOME", &self.xdg);
        if let Some(conf) = &self.conf {
            cmd.arg("--config").arg(conf);
        }
        cmd.args(args);
        cmd
    }

    /// Runs it to the end (off the async threads).
    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(args);
        tokio::task::block_in_place(|| cmd.output().unwrap())
    }

    /// Runs it; its stdout, which it must exit 0 with.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "shoalctl {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `ARGS -o json`, parsed.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.ok(&all);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("shoalctl {} printed no JSON ({e}): {text}", all.join(" ")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_commands_print_the_changed_object_as_json_and_tables_script_cleanly() {
    let ctl = Ctl::start().await;
    let xdg = tempfile::tempdir().unwrap();
    let sh = Shoalctl::new(Some(&ctl.admin_conf), xdg.path());

    // Tokens: create, list (both noun forms, no headers), delete (and the old verb).
    let created = sh.json(&["token", "create", "--uses", "3", "--label", "role=db"]);
    let token = created["token"].as_str().unwrap().to_owned();
    let id = token.split('.').nth(1).unwrap().to_owned();
    let other = sh.json(&["tokens", "create"]);
    let listed = sh.ok(&["tokens", "list", "--no-headers"]);
    assert_eq!(listed, sh.ok(&["token", "list", "--no-headers"]));
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(listed.lines().all(|l| !l.starts_with("ID")), "{listed}");
    assert!(listed.contains(&id), "{listed}");
    assert!(sh.ok(&["token", "list"]).starts_with("ID "));
    let deleted = sh.json(&["token", "delete", &id]);
    assert_eq!(deleted["id"], id.as_str());
    assert_eq!(deleted["state"], "revoked", "{deleted}");
    let other_id = other["token"].as_str().unwrap().split('.').nth(1).unwrap();
    assert_eq!(sh.json(&["token", "revoke", other_id])["id"], other_id);

    // Networks.
    let net = sh.json(&["network", "create", "lab", "--subnet", "10.91.0.0/24"]);
    assert_eq!(net["name"], "lab");
    assert_eq!(net["subnet"], "10.91.0.0/24");
    let added = sh.json(&["networks", "add", "lab", "--selector", "role=db"]);
    assert_eq!(added["network"]["selectors"][0], "role=db", "{added}");
    let gone = sh.json(&["network", "delete", "lab"]);
    assert_eq!(gone["network"]["name"], "lab", "{gone}");

    // Windows and budgets: the deleted object as it was.
    let w = sh.json(&[
        "window",
        "create",
        "nightly",
        "--schedule",
        "0 2 * * *",
        "--duration",
        "2h",
    ]);
    assert_eq!(w["name"], "nightly");
    assert_eq!(w["duration_secs"], 7200);
    assert_eq!(
        sh.json(&["windows", "delete", "nightly"])["name"],
        "nightly"
    );
    let b = sh.json(&[
        "budget",
        "set",
        "--selector",
        "role=db",
        "--max-unavailable",
        "2",
    ]);
    assert_eq!(
        (b["selector"].as_str(), b["max_unavailable"].as_u64()),
        (Some("role=db"), Some(2))
    );
    assert_eq!(
        sh.json(&["budgets", "delete", "--selector", "role=db"])["selector"],
        "role=db"
    );

    // Backups: a target and a job, created and deleted.
    let repo = tempfile::tempdir().unwrap();
    let pw = repo.path().join("pw");
    std::fs::write(&pw, "correct horse battery\n").unwrap();
    let url = repo.path().join("repo");
    let t = sh.json(&[
        "backup",
        "target",
        "add",
        "local",
        url.to_str().unwrap(),
        "--password-file",
        pw.to_str().unwrap(),
    ]);
    assert_eq!(t["name"], "local");
    let j = sh.json(&[
        "backups",
        "job",
        "create",
        "etc",
        "--path",
        "/etc/hostname",
        "--schedule",
        "@daily",
        "--target",
        "local",
    ]);
    assert_eq!(j["name"], "etc");
    assert_eq!(j["targets"][0], "local");
    // A target a job uses is not deleted; the refusal names the job.
    let refused = sh.run(&["backup", "target", "delete", "local"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("etc"), "{why}");
    assert_eq!(sh.json(&["backup", "job", "delete", "etc"])["name"], "etc");
    assert_eq!(
        sh.json(&["backup", "target", "delete", "local"])["name"],
        "local"
    );

    // A node removed with `node remove` (the old verb of `delete`): the node as it was.
    let (agent, node) = ctl.agent_up("shoalctl-remove-me").await;
    let table = sh.ok(&["node", "list"]);
    let header = table.lines().next().unwrap();
    assert!(
        header.contains("LAST SEEN") && !header.contains("ENROLLED"),
        "{table}"
    );
    let wide = sh.ok(&["nodes", "list", "-o", "wide"]);
    let wide_header = wide.lines().next().unwrap();
    assert!(
        wide_header.contains(" ENROLLED ")
            && wide_header.contains(" KEY ")
            && wide_header.ends_with(" LABELS"),
        "{wide}"
    );
    let row = table.lines().find(|l| l.starts_with(&node)).unwrap();
    assert!(
        row.split_whitespace()
            .any(|c| c.ends_with('s') && c[..c.len() - 1].parse::<u64>().is_ok()),
        "last seen is an age like 3s: {row}"
    );
    let removed = sh.json(&["node", "remove", &node]);
    assert_eq!(removed["id"], node.as_str());
    assert_eq!(removed["status"], "up", "as it was: {removed}");
    assert!(!sh.ok(&["nodes", "list"]).contains(&node));
    // The removed node's agent is refused from now on; stop it without asking how it fared.
    drop(agent);

    // Events: ages in the table, the time itself in the wide one.
    let events = sh.ok(&["events"]);
    assert!(events.starts_with("SEQ  AGE"), "{events}");
    assert!(sh
        .ok(&["event", "-o", "wide"])
        .lines()
        .next()
        .unwrap()
        .ends_with("AT"));
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_prints_new_events_as_json_lines_and_ends_cleanly_on_ctrl_c() {
    let ctl = Ctl::start().await;
    let xdg = tempfile::tempdir().unwrap();
    let sh = Shoalctl::new(Some(&ctl.admin_conf), xdg.path());
    let last = last_seq(&ctl.admin.events().await);

    let mut child = sh
        .command(&[
            "events",
            "-f",
            "--after",
            &last.to_string(),
            "--interval",
            "200ms",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap());
        }
    });

    sh.ok(&["network", "create", "follow", "--subnet", "10.92.0.0/24"]);
    let seen = eventually(PROMPT, "events -f prints the network_created event", || {
        let got: Vec<String> = lines.try_iter().collect();
        let found = got.into_iter().find_map(|l| {
            let v: Value = serde_json::from_str(&l).expect("each line is one JSON event");
            (v["kind"] == "network_created").then_some(v)
        });
        async move { found }
    })
    .await;
    assert!(seen["seq"].as_u64().unwrap() > last);
    assert!(
        seen["message"].as_str().unwrap().contains("follow"),
        "{seen}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = tokio::task::block_in_place(|| child.wait().unwrap());
    assert_eq!(status.code(), Some(0), "Ctrl-C ends events -f with 0");
    reader.join().unwrap();
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_exits_4_on_a_paused_run_and_3_on_a_failed_backup_and_watch_ends_with_the_run() {
    let ctl = Ctl::start().await;
    let xdg = tempfile::tempdir().unwrap();
    let sh = Shoalctl::new(Some(&ctl.admin_conf), xdg.path());
    let token = sh.json(&["token", "create", "--label", "role=waited"])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let agent = Agent::start(ctl.quic, "shoalctl-wait", token);
    let node = ctl.wait_up("shoalctl-wait").await;

    // The agent allows no program: the node fails, and the run pauses after that one failure.
    let out = sh.run(&[
        "maintenance",
        "run",
        "exec",
        "--selector",
        "role=waited",
        "--now",
        "--wait",
        "--timeout",
        "60s",
        "-o",
        "json",
        "--",
        "/bin/true",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "paused exits 4: {stderr}");
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(run["state"], "paused", "{run}");
    assert_eq!(run["progress"]["failed"], 1, "{run}");
    assert_eq!(run["nodes"][0]["node"], node.as_str());
    assert!(stderr.contains("paused"), "{stderr}");
    assert!(
        !stderr.contains('\r'),
        "no progress line without a terminal: {stderr:?}"
    );

    // `status -w` on a finished run prints it once and returns.
    let rid = run["id"].as_str().unwrap().to_owned();
    let aborted = sh.json(&["maintenance", "abort", &rid]);
    assert_eq!(aborted["id"], rid.as_str());
    assert_eq!(aborted["state"], "aborted");
    let watched = sh.ok(&["maintenance", "status", &rid, "-w", "-o", "json"]);
    let lines: Vec<Value> = watched
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{watched}");
    assert_eq!(lines[0]["state"], "aborted");
    assert_eq!(lines[0]["finished"], true);

    // Without --wait, `maintenance run` prints the started run.
    let started: Value = serde_json::from_str(&sh.ok(&[
        "maintenance",
        "run",
        "exec",
        "--selector",
        "role=waited",
        "--now",
        "-o",
        "json",
        "--",
        "/bin/true",
    ]))
    .unwrap();
    let r2 = started["id"].as_str().unwrap().to_owned();
    assert_ne!(r2, rid);
    assert_eq!(started["nodes"][0]["node"], node.as_str(), "{started}");
    assert_eq!(sh.json(&["maintenance", "abort", &r2])["state"], "aborted");

    // A backup to a repository that cannot be created fails on the node: --wait exits 3.
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "correct horse battery\n").unwrap();
    sh.ok(&[
        "backup",
        "target",
        "add",
        "nowhere",
        "/proc/shoal-no-such-dir/repo",
        "--password-file",
        pw.to_str().unwrap(),
    ]);
    sh.ok(&[
        "backup",
        "job",
        "create",
        "etc",
        "--selector",
        "role=waited",
        "--path",
        "/etc/hostname",
        "--schedule",
        "@yearly",
        "--target",
        "nowhere",
    ]);
    let out = sh.run(&[
        "backup",
        "run",
        "etc",
        "--wait",
        "--timeout",
        "120s",
        "-o",
        "json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a failed backup exits 3: {stderr}"
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["node"], node.as_str());
    assert_eq!(rows[0]["last_task"]["ok"], false, "{rows:?}");
    assert!(stderr.contains("failed on"), "{stderr}");

    agent.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keygen_key_signs_releases_the_controller_accepts_and_only_those() {
    let keys = tempfile::tempdir().unwrap();
    let xdg = tempfile::tempdir().unwrap();
    let local = Shoalctl::new(None, xdg.path());
    let pem = keys.path().join("release.pem");
    let made = local.json(&["release", "keygen", pem.to_str().unwrap()]);
    let public = keys.path().join("release.pub");
    assert_eq!(made["public_key_file"], public.to_str().unwrap());
    let other = keys.path().join("other.pem");
    local.ok(&["release", "keygen", other.to_str().unwrap()]);

    let trusted = public.clone();
    let ctl = Ctl::start_with(move |c| c.release_keys = vec![trusted]).await;
    let sh = Shoalctl::new(Some(&ctl.admin_conf), xdg.path());
    let binary = keys.path().join("shoal-agent");
    std::fs::write(&binary, b"\x7fELF shoal-agent 9.9.9".repeat(1000)).unwrap();
    let added = sh.json(&[
        "release",
        "add",
        binary.to_str().unwrap(),
        "--version",
        "9.9.9",
        "--key",
        pem.to_str().unwrap(),
    ]);
    assert_eq!(added["version"], "9.9.9");
    assert_eq!(added["key_id"], made["key_id"], "{added}");
    let listed = sh.json(&["releases", "list"]);
    assert_eq!(listed[0]["version"], "9.9.9");

    let refused = sh.run(&[
        "release",
        "add",
        binary.to_str().unwrap(),
        "--version",
        "9.9.10",
        "--key",
        other.to_str().unwrap(),
    ]);
    assert_eq!(refused.status.code(), Some(1));
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_switch_between_two_fleets() {
    let a = Ctl::start().await;
    let b = Ctl::start().await;
    let xdg = tempfile::tempdir().unwrap();
    let sh = Shoalctl::new(None, xdg.path());

    let none = sh.run(&["tokens", "list"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&none.stderr).contains("shoalctl config import"));

    let first = sh.json(&[
        "config",
        "import",
        "fleet-a",
        a.admin_conf.to_str().unwrap(),
    ]);
    assert_eq!(first["current"], true, "the first context becomes current");
    let second = sh.json(&[
        "config",
        "import",
        "fleet-b",
        b.admin_conf.to_str().unwrap(),
        "--link",
    ]);
    assert_eq!(second["current"], false);
    assert_eq!(second["source"], b.admin_conf.to_str().unwrap());
    let file = xdg.path().join("shoal").join("config.toml");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600,
        "it holds tokens"
    );
    let again = sh.run(&[
        "config",
        "import",
        "fleet-a",
        b.admin_conf.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(1), "no silent replacement");

    // One token in each fleet, told apart by label.
    sh.ok(&["token", "create", "--label", "fleet=a"]);
    sh.ok(&[
        "--context",
        "fleet-b",
        "token",
        "create",
        "--label",
        "fleet=b",
    ]);
    let labels = |v: Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t["labels"]["fleet"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(labels(sh.json(&["tokens", "list"])), ["a"]);
    assert_eq!(sh.ok(&["config", "current-context"]).trim(), "fleet-a");
    sh.ok(&["config", "use-context", "fleet-b"]);
    assert_eq!(labels(sh.json(&["tokens", "list"])), ["b"]);
    assert_eq!(
        labels(sh.json(&["--context", "fleet-a", "tokens", "list"])),
        ["a"]
    );
    let listed = sh.json(&["config", "get-contexts"]);
    let current: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["current"] == true)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(current, ["fleet-b"]);

    // SHOAL_CONFIG still names a file, over the current context; --config with --context is
    // refused; an unknown context is an error that lists the known ones.
    let mut env = sh.command(&["tokens", "list", "-o", "json"]);
    env.env("SHOAL_CONFIG", &a.admin_conf);
    let out = tokio::task::block_in_place(|| env.output().unwrap());
    assert_eq!(labels(serde_json::from_slice(&out.stdout).unwrap()), ["a"]);
    let both = Shoalctl::new(Some(&a.admin_conf), xdg.path()).run(&[
        "--context",
        "fleet-b",
        "tokens",
        "list",
    ]);
    assert_eq!(both.status.code(), Some(1));
    let unknown = sh.run(&["--context", "nope", "tokens", "list"]);
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("fleet-a, fleet-b"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    sh.ok(&["config", "delete-context", "fleet-b"]);
    assert_eq!(
        sh.json(&["config", "get-contexts"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_and_status_lines_stay_off_a_stderr_that_is_not_a_terminal() {
    // `release add` uploads with progress; into a pipe, stderr stays empty on success.
    let keys = tempfile::tempdir().unwrap();
    let xdg = tempfile::tempdir().unwrap();
    let pem = keys.path().join("k.pem");
    Shoalctl::new(None, xdg.path()).ok(&["release", "keygen", pem.to_str().unwrap()]);
    let public = keys.path().join("k.pub");
    let ctl = Ctl::start_with(move |c| c.release_keys = vec![public]).await;
    let sh = Shoalctl::new(Some(&ctl.admin_conf), xdg.path());
    let binary = keys.path().join("agent");
    std::fs::write(&binary, vec![0x7f; 4 << 20]).unwrap();
    let out = sh.run(&[
        "release",
        "add",
        binary.to_str().unwrap(),
        "--version",
        "1.0.0",
        "--key",
        pem.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("added agent release 1.0.0"));

    // On a terminal (a pseudo-terminal here), the upload shows one status line, redrawn in place
    // and erased at the end; stdout, a pipe, still carries only the result.
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut cmd = sh.command(&[
        "release",
        "add",
        binary.to_str().unwrap(),
        "--version",
        "1.0.1",
        "--key",
        pem.to_str().unwrap(),
    ]);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::from(pty.slave));
    let child = cmd.spawn().unwrap();
    // The child holds the terminal now: the master reads until it exits (EIO on Linux).
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = std::io::Read::read(&mut master, &mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
        seen
    });
    let out = child.wait_with_output().unwrap();
    drop(cmd);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("added agent release 1.0.1"));
    let seen = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    assert!(
        seen.starts_with("\ruploading binary: ") && seen.contains(" of 4.0 MiB ("),
        "{seen:?}"
    );
    // Redrawn in place, never a new line, and erased when done.
    assert!(!seen.contains('\n'), "{seen:?}");
    assert!(seen.ends_with("\r\x1b[K"), "{seen:?}");
    ctl.stop().await;
}

/// `overlay counters` shows how each node's datapath moves frames (protocol 9 datapath reports):
/// the offloads in use or why there are none, and with `-o wide` the TAP queues, frames per TAP
/// read and write and datagrams per receive batch; a node that sent no datapath report shows `-`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_counters_show_each_nodes_datapath() {
    use shoal_proto::{AgentMsg, DatapathReport, NetworkId, PathReport, TapDatapath};
    let ctl = Ctl::start().await;
    let xdg = tempfile::tempdir().unwrap();
    let sh = Shoalctl::new(Some(&ctl.admin_conf), xdg.path());
    let (mut fast, fast_id) = ctl.raw_node("fast").await;
    let (mut plain, plain_id) = ctl.raw_node("plain").await;
    let (mut old, old_id) = ctl.raw_node("old").await;
    let paths = || {
        AgentMsg::PathsV8(
            PathReport {
                paths: vec![],
                counters: Default::default(),
            }
            .into(),
        )
    };
    let tap =
        |offloads: &[&str], fallback: Option<&str>, reads, read_frames, writes, write_frames| {
            TapDatapath {
                network: NetworkId(1),
                device: "shoal0".into(),
                offloads: offloads.iter().map(|o| o.to_string()).collect(),
                fallback: fallback.map(String::from),
                queues: 1,
                reads,
                read_frames,
                writes,
                write_frames,
            }
        };
    fast.send(&paths()).await;
    fast.send(&AgentMsg::Datapath(DatapathReport {
        taps: vec![tap(&["csum", "tso4", "tso6"], None, 100, 4400, 50, 1600)],
        rx_batches: 40,
        rx_datagrams: 1000,
    }))
    .await;
    plain.send(&paths()).await;
    plain
        .send(&AgentMsg::Datapath(DatapathReport {
            taps: vec![tap(&[], Some("disabled"), 7, 7, 5, 5)],
            rx_batches: 0,
            rx_datagrams: 0,
        }))
        .await;
    old.send(&paths()).await;

    let ids = [fast_id.0.clone(), plain_id.0.clone(), old_id.0.clone()];
    let all = eventually(PROMPT, "three nodes' counters, two with datapaths", || {
        let v = sh.json(&["overlay", "counters"]);
        let ready = v.as_array().is_some_and(|a| {
            a.len() == 3 && a.iter().filter(|c| !c["datapath"].is_null()).count() == 2
        });
        async move { ready.then_some(v) }
    })
    .await;
    let of = |id: &str| {
        all.as_array()
            .unwrap()
            .iter()
            .find(|c| c["node"] == id)
            .unwrap()
            .clone()
    };
    let f = of(&ids[0]);
    assert_eq!(f["datapath"]["taps"][0]["offloads"][1], "tso4", "{f}");
    assert_eq!(f["datapath"]["taps"][0]["frames_per_read"], 44.0, "{f}");
    assert_eq!(f["datapath"]["taps"][0]["frames_per_write"], 32.0, "{f}");
    assert_eq!(f["datapath"]["datagrams_per_batch"], 25.0, "{f}");
    let p = of(&ids[1]);
    assert_eq!(p["datapath"]["taps"][0]["fallback"], "disabled", "{p}");
    assert!(p["datapath"]["datagrams_per_batch"].is_null(), "{p}");
    assert!(
        of(&ids[2]).get("datapath").is_none(),
        "an older agent's entry has none"
    );

    let row = |table: &str, id: &str| -> Vec<String> {
        table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no row for {id}: {table}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let table = sh.ok(&["overlay", "counters"]);
    assert!(
        table.lines().next().unwrap().ends_with("OFFLOAD"),
        "{table}"
    );
    assert_eq!(
        row(&table, &ids[0]).last().unwrap(),
        "shoal0:csum,tso4,tso6"
    );
    assert_eq!(row(&table, &ids[1]).last().unwrap(), "shoal0:off(disabled)");
    assert_eq!(row(&table, &ids[2]).last().unwrap(), "-");
    let wide = sh.ok(&["overlay", "counters", "-o", "wide"]);
    let header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header[header.len() - 5..],
        [
            "OFFLOAD",
            "QUEUES",
            "FRAMES/READ",
            "FRAMES/WRITE",
            "DGRAMS/BATCH"
        ],
        "{wide}"
    );
    assert_eq!(
        row(&wide, &ids[0])[row(&wide, &ids[0]).len() - 5..],
        [
            "shoal0:csum,tso4,tso6",
            "shoal0:1",
            "shoal0:44.0",
            "shoal0:32.0",
            "25.0"
        ]
    );
    assert_eq!(
        row(&wide, &ids[1])[row(&wide, &ids[1]).len() - 5..],
        [
            "shoal0:off(disabled)",
            "shoal0:1",
            "shoal0:1.0",
            "shoal0:1.0",
            "-"
        ]
    );
    assert_eq!(
        row(&wide, &ids[2])[row(&wide, &ids[2]).len() - 5..],
        ["-"; 5]
    );
}
