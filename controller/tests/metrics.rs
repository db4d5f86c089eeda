//! Monitoring as an operator meets it: the real `shoal-controller serve --metrics` binary with real
//! agents, `/metrics` checked by `promtool` and read back with a Prometheus parser against what
//! `shoalctl nodes list -o json` shows, a removed node's series gone at the next scrape,
//! `/healthz` and `/readyz` on both listeners without credentials (and `/readyz` failing when etcd
//! loses its quorum), `shoalctl report --exit-code` and `shoalctl version` as the binary runs
//! them, and the alert rules through `promtool check rules` and `promtool test rules`.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{eventually, harness::Agent};
use shoal_api::nodes::NodeView;
use shoal_testkit::{cmd, require, skip, EtcdCluster};

/// Deadline for a controller to start and answer.
const START: Duration = Duration::from_secs(30);
/// Deadline for agents to enrol and come up, and for the fleet to be seen changing.
const FLEET: Duration = Duration::from_secs(30);

/// The real controller binary, killed when dropped.
struct Controller {
    child: std::sync::Mutex<Child>,
    data: tempfile::TempDir,
    api: SocketAddr,
    quic: SocketAddr,
    metrics: SocketAddr,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

impl Controller {
    /// `shoal-controller serve --metrics` on loopback ports, with `extra` arguments.
    fn start(extra: &[&str]) -> Controller {
        let data = tempfile::tempdir().unwrap();
        let (api, quic, metrics) = (free_tcp(), free_udp(), free_tcp());
        let log = std::fs::File::create(data.path().join("controller.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_shoal-controller"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .args(["--listen", &quic.to_string()])
            .args(["--api", &api.to_string()])
            .args(["--metrics", &metrics.to_string()])
            .args(extra)
            .env("RUST_LOG", "info,quinn=warn,sled=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Controller {
            child: std::sync::Mutex::new(child),
            data,
            api,
            quic,
            metrics,
        }
    }

    fn conf(&self) -> PathBuf {
        self.data.path().join("data/admin.conf")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("controller.log")).unwrap_or_default()
    }

    /// `shoalctl --config admin.conf ARGS`: exit code and stdout.
    fn shoalctl(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(shoalctl_bin())
            .arg("--config")
            .arg(self.conf())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8(out.stdout).unwrap(),
        )
    }

    fn shoalctl_ok(&self, args: &[&str]) -> String {
        let (code, out) = self.shoalctl(args);
        assert_eq!(code, 0, "shoalctl {args:?}: {out}");
        out
    }

    /// `GET http://METRICS/path`: status and body.
    fn get(&self, path: &str) -> (u16, String) {
        get_plain(&format!("http://{}{path}", self.metrics))
    }

    /// `GET https://API/path` without credentials, trusting the fleet CA (curl, as a probe would).
    fn get_api(&self, path: &str) -> (u16, String) {
        let out = cmd::output(
            Command::new("curl")
                .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
                .arg("--cacert")
                .arg(self.data.path().join("data/ca.crt"))
                .arg(format!("https://{}{path}", self.api)),
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.trim().parse().unwrap(), body.to_owned())
    }

    /// Waits until `/readyz` answers 200 on the metrics listener.
    async fn wait_ready(&self) {
        eventually(START, "the controller is ready", || async {
            if let Ok(Some(status)) = self.child.lock().unwrap().try_wait() {
                panic!("the controller exited ({status}): {}", self.log());
            }
            let url = format!("http://{}/readyz", self.metrics);
            let got = tokio::task::spawn_blocking(move || try_get(&url))
                .await
                .unwrap();
            matches!(got, Some((200, _))).then_some(())
        })
        .await;
    }

    /// `/metrics`, checked by promtool, parsed.
    async fn scrape(&self) -> Scrape {
        let url = format!("http://{}/metrics", self.metrics);
        let (status, text) = tokio::task::spawn_blocking(move || get_plain(&url))
            .await
            .unwrap();
        assert_eq!(status, 200, "{text}");
        promtool_check_metrics(&text);
        Scrape::parse(text)
    }
}

/// The shoalctl binary (its own package: see `bounds.rs`).
fn shoalctl_bin() -> PathBuf {
    let dir = match std::env::var_os("SHOAL_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::current_exe()
            .unwrap()
            .parent()
            .and_then(|deps| deps.parent())
            .unwrap()
            .to_owned(),
    };
    let bin = dir.join("shoalctl");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p shoalctl` first",
        bin.display()
    );
    bin
}

fn try_get(url: &str) -> Option<(u16, String)> {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build(),
    );
    let mut resp = agent.get(url).call().ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.body_mut().read_to_string().ok()?))
}

fn get_plain(url: &str) -> (u16, String) {
    try_get(url).unwrap_or_else(|| panic!("GET {url} failed"))
}

/// `promtool check metrics` on the text: it must parse (lint findings are printed, not fatal).
fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool reads the Prometheus 0.0.4 text format, where a counter's family and sample names
    // agree; in OpenMetrics the samples add `_total`, so promtool sees them as families without
    // help. That is the one finding allowed: a parse error or any other lint finding fails.
    let unexpected: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            !(l.ends_with(" no help text")
                && l.split_whitespace()
                    .next()
                    .is_some_and(|m| m.ends_with("_total")))
        })
        .collect();
    assert!(
        unexpected.is_empty() && matches!(out.status.code(), Some(0 | 3)),
        "promtool check metrics ({}): {report}\n{text}",
        out.status
    );
}

/// `/metrics` read back with `prometheus-parse`.
struct Scrape {
    text: String,
    samples: Vec<prometheus_parse::Sample>,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let parsed = prometheus_parse::Scrape::parse(lines).unwrap();
        Scrape {
            text,
            samples: parsed.samples,
        }
    }

    /// The value of the one sample of `metric` whose labels include `labels`.
    fn value(&self, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .collect();
        assert!(found.len() <= 1, "{metric} {labels:?}: {found:?}");
        found.first().copied()
    }

    fn has(&self, metric: &str, labels: &[(&str, &str)]) -> bool {
        self.value(metric, labels).is_some()
    }

    /// Samples that name `node` in any label.
    fn about(&self, node: &str) -> Vec<String> {
        self.samples
            .iter()
            .filter(|s| s.labels.values().any(|v| v == node))
            .map(|s| format!("{} {:?}", s.metric, s.labels))
            .collect()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_fleet_as_shoalctl_shows_it() {
    require!(skip::tool("promtool", "prometheus"));
    require!(skip::tool("curl", "curl"));
    let ctl = Controller::start(&["--heartbeat-interval", "1s", "--down-after", "3"]);
    ctl.wait_ready().await;

    // Probes need no credentials, on both listeners.
    assert_eq!(ctl.get("/healthz"), (200, "ok\n".into()));
    assert_eq!(ctl.get("/readyz"), (200, "ok\n".into()));
    assert_eq!(ctl.get_api("/healthz"), (200, "ok\n".into()));
    assert_eq!(ctl.get_api("/readyz"), (200, "ok\n".into()));
    // Everything else on the admin API still does.
    assert_eq!(ctl.get_api("/v1/nodes").0, 401);
    assert_eq!(ctl.get("/v1/nodes").0, 404);

    // Two real agents, and one with a revoked token.
    let token = |ctl: &Controller| {
        ctl.shoalctl_ok(&["token", "create", "--uses", "1"])
            .trim()
            .to_owned()
    };
    let a = Agent::start(ctl.quic, "metrics-a", token(&ctl));
    let b = Agent::start(ctl.quic, "metrics-b", token(&ctl));
    let revoked = token(&ctl);
    ctl.shoalctl_ok(&["token", "revoke", revoked.split('.').nth(1).unwrap()]);
    let bad = Agent::start(ctl.quic, "metrics-bad", revoked);
    let ctl_ref = &ctl;
    let nodes = eventually(FLEET, "both agents up", || async move {
        let nodes = tokio::task::spawn_blocking({
            let conf = ctl_ref.conf();
            move || {
                let out = Command::new(shoalctl_bin())
                    .arg("--config")
                    .arg(conf)
                    .args(["nodes", "list", "-o", "json"])
                    .output()
                    .unwrap();
                serde_json::from_slice::<Vec<NodeView>>(&out.stdout).unwrap()
            }
        })
        .await
        .unwrap();
        (nodes.len() == 2 && nodes.iter().all(|n| n.status == "up" && n.connected)).then_some(nodes)
    })
    .await;

    // What /metrics says is what `nodes list` says.
    let m = eventually(FLEET, "the refused enrolment is counted", || async {
        let m = ctl.scrape().await;
        (m.value(
            "shoal_enrolment_refusals_total",
            &[("reason", "token_revoked")],
        )? >= 1.0)
            .then_some(m)
    })
    .await;
    let listed_at = now_ms();
    assert_eq!(m.value("shoal_nodes", &[("status", "up")]), Some(2.0));
    assert_eq!(m.value("shoal_nodes", &[("status", "down")]), Some(0.0));
    assert_eq!(m.value("shoal_enrolments_total", &[]), Some(2.0));
    assert_eq!(
        m.value(
            "shoal_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert_eq!(m.value("shoal_controller_leader", &[]), Some(1.0));
    assert!(
        m.value("shoal_store_size_bytes", &[("store", "embedded")])
            .unwrap()
            > 0.0
    );
    for n in &nodes {
        let id = n.id.as_str();
        assert_eq!(
            m.value(
                "shoal_node_info",
                &[
                    ("node", id),
                    ("hostname", &n.hostname),
                    ("agent_version", &n.agent_version)
                ]
            ),
            Some(1.0),
            "{}",
            m.text
        );
        assert_eq!(m.value("shoal_node_up", &[("node", id)]), Some(1.0));
        // Heartbeats come every second; the age is measured from the scrape.
        let age = m
            .value("shoal_node_heartbeat_age_seconds", &[("node", id)])
            .unwrap();
        let listed_age = (listed_at - n.last_seen_unix_ms.unwrap()) as f64 / 1000.0;
        assert!(
            (0.0..10.0).contains(&age) && listed_age < 15.0,
            "{id}: heartbeat age {age} s (nodes list: {listed_age} s ago)"
        );
    }
    // Families with nothing to count are listed, with zero counts where they count.
    assert_eq!(
        m.value("shoal_rollouts", &[("kind", "agent"), ("state", "paused")]),
        Some(0.0)
    );
    assert_eq!(
        m.value("shoal_maintenance_runs", &[("state", "running")]),
        Some(0.0)
    );
    assert!(m.text.contains("# TYPE shoal_backup_age_seconds gauge"));
    assert!(m.text.ends_with("# EOF\n"));

    // shoalctl version: the client's and the server's.
    let out = ctl.shoalctl_ok(&["version"]);
    let v = env!("CARGO_PKG_VERSION");
    assert!(
        out.starts_with(&format!("shoalctl {v}\ncontroller {v} (agent protocol ")),
        "{out}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ctl.shoalctl_ok(&["version", "-o", "json"])).unwrap();
    assert_eq!(json["client"], v);
    assert_eq!(json["server"]["version"], v);
    assert_eq!(json["server"]["store"], "embedded");

    // The report's exit code says what the report says.
    let report = |ctl: &Controller| {
        let (code, _) = ctl.shoalctl(&["report", "--exit-code"]);
        let json: shoal_api::report::FleetReport =
            serde_json::from_str(&ctl.shoalctl_ok(&["report", "-o", "json"])).unwrap();
        (code, json)
    };
    let (code, r) = report(&ctl);
    assert_eq!(code, i32::from(r.exit_code()), "{r:?}");
    assert!(r.drives.attention.is_empty() && r.backups.is_empty() && r.rollouts.is_empty());
    if r.attention.is_empty() {
        assert_eq!(code, 0);
    } else {
        // This machine's own disks or memory may be short; then the nodes bit, and only it.
        assert_eq!(code, 17, "{:?}", r.attention);
    }

    // b is removed: its series are gone at the next scrape.
    let b_id = nodes
        .iter()
        .find(|n| n.hardware_id == "override:metrics-b")
        .unwrap()
        .id
        .clone();
    let a_id = nodes.iter().find(|n| n.id != b_id).unwrap().id.clone();
    assert!(!m.about(&b_id).is_empty());
    b.stop().await;
    ctl.shoalctl_ok(&["nodes", "remove", &b_id]);
    let m = eventually(FLEET, "the removed node's series are gone", || async {
        let m = ctl.scrape().await;
        m.about(&b_id).is_empty().then_some(m)
    })
    .await;
    assert_eq!(m.value("shoal_nodes", &[("status", "up")]), Some(1.0));
    assert!(m.has("shoal_node_up", &[("node", &a_id)]));

    // a stops: it goes down, in the metrics and in the report's exit code.
    a.stop().await;
    let m = eventually(FLEET, "a is down in the metrics", || async {
        let m = ctl.scrape().await;
        (m.value("shoal_node_up", &[("node", &a_id)])? == 0.0).then_some(m)
    })
    .await;
    assert_eq!(m.value("shoal_nodes", &[("status", "down")]), Some(1.0));
    assert_eq!(m.value("shoal_nodes_connected", &[]), Some(0.0));
    let (code, r) = report(&ctl);
    assert_eq!(code, 17, "{r:?}");
    assert!(
        r.attention[0].reasons[0].starts_with("down: last seen"),
        "{r:?}"
    );
    drop(bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_etcd_has_no_quorum() {
    let mut etcd = require!(EtcdCluster::start(1));
    let endpoints = etcd.endpoints().join(",");
    let ctl = Controller::start(&["--etcd-endpoints", &endpoints]);
    ctl.wait_ready().await;
    assert_eq!(ctl.get("/readyz"), (200, "ok\n".into()));
    let m = ctl.scrape_unchecked().await;
    assert!(m.contains("shoal_build_info{"), "{m}");

    etcd.kill(0);
    let why = eventually(FLEET, "/readyz fails without etcd", || async {
        let url = format!("http://{}/readyz", ctl.metrics);
        let (status, body) = tokio::task::spawn_blocking(move || get_plain(&url))
            .await
            .unwrap();
        (status == 503).then_some(body)
    })
    .await;
    assert!(why.starts_with("not ready: "), "{why}");
    // The process is alive all the same.
    assert_eq!(ctl.get("/healthz"), (200, "ok\n".into()));
    assert_eq!(ctl.get_api("/readyz").0, 503);

    etcd.restart(0).unwrap();
    eventually(FLEET, "/readyz recovers with etcd", || async {
        let url = format!("http://{}/readyz", ctl.metrics);
        let (status, _) = tokio::task::spawn_blocking(move || get_plain(&url))
            .await
            .unwrap();
        (status == 200).then_some(())
    })
    .await;
}

impl Controller {
    /// `/metrics` as text, not checked (the etcd test only needs it to answer).
    async fn scrape_unchecked(&self) -> String {
        let url = format!("http://{}/metrics", self.metrics);
        let (status, text) = tokio::task::spawn_blocking(move || get_plain(&url))
            .await
            .unwrap();
        assert_eq!(status, 200, "{text}");
        text
    }
}

/// The packaged alert rules are valid, and fire on the series `/metrics` exports (unit tests in
/// `tests/prometheus/shoal-alerts.test.yml`).
#[test]
fn alert_rules_pass_promtool() {
    require!(skip::tool("promtool", "prometheus"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = dir.join("packaging/prometheus/shoal-alerts.yml");
    let out = cmd::run(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(&rules),
    )
    .unwrap();
    assert!(out.contains("SUCCESS: 7 rules found"), "{out}");
    let out = cmd::run(
        Command::new("promtool")
            .current_dir(dir.join("tests/prometheus"))
            .args(["test", "rules", "shoal-alerts.test.yml"]),
    )
    .unwrap();
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Every alert's expression names only series `/metrics` exports.
#[test]
fn alert_rules_use_exported_series() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = std::fs::read_to_string(dir.join("packaging/prometheus/shoal-alerts.yml")).unwrap();
    let render = std::fs::read_to_string(dir.join("src/observe/render.rs")).unwrap();
    let mut used = BTreeMap::new();
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("shoal_") {
            *used.entry(word.to_owned()).or_insert(0) += 1;
        }
    }
    assert!(used.len() >= 6, "{used:?}");
    for name in used.keys() {
        // The renderer writes the name without its unit suffix, which prometheus-client adds.
        let base = name
            .trim_end_matches("_seconds")
            .trim_end_matches("_bytes")
            .trim_end_matches("_total");
        assert!(
            render.contains(&format!("\"{base}\"")),
            "{name} is not exported by src/observe/render.rs"
        );
    }
}
