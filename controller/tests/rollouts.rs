//! Tier-2 rollout tests: a real controller on loopback (QUIC + TLS, port 0, the rollout driver task
//! running) with hand-driven nodes that enrol for real and say their agent version in their Hello,
//! and a fake upgrader: `begin` makes the node close its connection and come back a moment later on
//! the target version (or never, for a node that never returns). What is checked is what an
//! operator sees: the admin API's rollout view and the event log.

#![allow(clippy::unwrap_used)]

mod common;
use common::{consistently, eventually, harness::*};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use shoal_api::events::EventView;
use shoal_api::maintenance::{CreateWindow, RolloutView, StartRollout, WindowView};
use shoal_api::tokens::CreateToken;
use shoal_controller::{
    maintenance::NodeUpgrader, maintenance::RolloutClock, maintenance::TargetKind,
    maintenance::UpgradeError, server::ControllerConfig,
};
use shoal_controller_core::rollout::Target;
use shoal_overlay::{pki, recv_msg, send_msg, tls};
use shoal_proto::{
    AgentMsg, CheckResult, ControllerMsg, EnrolRequest, HardwareId, HardwareIdSource, Hello,
    NodeId, UpdateReport, SUPPORTED,
};
use tokio::sync::watch;

const OLD: &str = "1.0.0";
const NEW: &str = "1.1.0";

/// What each node should run: `None` = down (rebooting, or never coming back).
type Wanted = Arc<Mutex<HashMap<NodeId, watch::Sender<Option<String>>>>>;

/// Sends nodes away and (unless stuck) back on the target after `away`.
#[derive(Debug)]
struct FakeUpgrader {
    wanted: Wanted,
    stuck: BTreeSet<NodeId>,
    away: Duration,
}

impl NodeUpgrader for FakeUpgrader {
    fn begin(&self, node: &NodeId, target: &Target) -> Result<(), UpgradeError> {
        let tx = self
            .wanted
            .lock()
            .unwrap()
            .get(node)
            .cloned()
            .ok_or_else(|| UpgradeError::NotConnected(node.clone()))?;
        tx.send_replace(None);
        if !self.stuck.contains(node) {
            let (away, version) = (self.away, target.version().to_owned());
            std::thread::spawn(move || {
                std::thread::sleep(away);
                tx.send_replace(Some(version));
            });
        }
        Ok(())
    }

    fn roll_back(
        &self,
        node: &NodeId,
        to: Option<&str>,
        _target: &Target,
    ) -> Result<(), UpgradeError> {
        let tx = self
            .wanted
            .lock()
            .unwrap()
            .get(node)
            .cloned()
            .ok_or_else(|| UpgradeError::NotConnected(node.clone()))?;
        tx.send_replace(Some(to.unwrap_or(OLD).to_owned()));
        Ok(())
    }
}

/// An in-process controller whose agent rollouts go to a [`FakeUpgrader`].
struct Fleet {
    ctl: Ctl,
    upgrader: Arc<FakeUpgrader>,
    /// The rollout driver's clock (test hook).
    clock: RolloutClock,
}

/// The controller's configuration here: a quick rollout driver on `clock`.
fn config(clock: &RolloutClock) -> impl FnOnce(&mut ControllerConfig) {
    let clock = clock.clone();
    move |config| {
        config.rollout_tick = Duration::from_millis(100);
        config.rollout_clock = clock;
    }
}

impl Fleet {
    async fn start(
        stuck: impl Fn(usize) -> bool,
        count: usize,
        deadline_ms: u64,
    ) -> (Fleet, Vec<NodeId>) {
        let clock = RolloutClock::default();
        let ctl = Ctl::start_with(config(&clock)).await;
        let wanted: Wanted = Arc::default();
        let token = {
            let client = ctl.admin.client.clone();
            let labels = BTreeMap::from([("role".to_owned(), "worker".to_owned())]);
            tokio::task::spawn_blocking(move || {
                client
                    .create_token(&CreateToken {
                        ttl_secs: Some(3600),
                        max_uses: None,
                        labels,
                    })
                    .unwrap()
                    .token
            })
            .await
            .unwrap()
        };
        let mut nodes = Vec::new();
        let mut stuck_nodes = BTreeSet::new();
        for i in 0..count {
            let node =
                fake_node(ctl.quic, &ctl.ca_der, &token, &format!("roll-{i}"), &wanted).await;
            if stuck(i) {
                stuck_nodes.insert(node.clone());
            }
            nodes.push(node);
        }
        let upgrader = Arc::new(FakeUpgrader {
            wanted: wanted.clone(),
            stuck: stuck_nodes,
            away: Duration::from_millis(deadline_ms.min(300)),
        });
        ctl.controller()
            .set_upgrader(TargetKind::Agent, upgrader.clone());
        let fleet = Fleet {
            ctl,
            upgrader,
            clock,
        };
        for n in &nodes {
            fleet.wait_connected(n).await;
        }
        (fleet, nodes)
    }

    /// Stops the controller and starts it again on the same data directory and ports.
    async fn restart(&mut self) {
        let upgrader = self.upgrader.clone();
        // Installed before the driver's first pass (`open` installs the real agent executor).
        self.ctl
            .restart(config(&self.clock), |controller| {
                controller.set_upgrader(TargetKind::Agent, upgrader)
            })
            .await;
    }

    async fn wait_connected(&self, node: &NodeId) {
        eventually(PROMPT, &format!("{node} connected"), || async {
            let nodes = self.ctl.admin.nodes().await;
            nodes
                .iter()
                .any(|n| n.id == node.0 && n.connected)
                .then_some(())
        })
        .await;
    }

    async fn get<T: serde::de::DeserializeOwned + Send + 'static>(&self, path: &str) -> T {
        self.ctl.admin.get(path).await
    }

    async fn post<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> T {
        self.ctl.admin.post(path, body).await
    }

    async fn events(&self) -> Vec<EventView> {
        self.ctl.admin.events().await
    }

    async fn stop(self) {
        self.ctl.stop().await;
    }
}

/// Enrols a node for real, then keeps it connected with whatever version it is told to run.
async fn fake_node(
    quic: SocketAddr,
    ca_der: &[u8],
    token: &str,
    machine: &str,
    wanted: &Wanted,
) -> NodeId {
    let key = pki::generate_key().unwrap();
    let ca_sha = pki::sha256(ca_der);
    let cfg = tls::enrol_client_config(ca_sha, Duration::from_secs(5)).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(cfg, quic, tls::controller_server_name())
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let machine = machine.to_owned();
    let hello = move |version: &str| {
        AgentMsg::Hello(Hello {
            protocol: SUPPORTED,
            agent_version: version.to_owned(),
            hardware_id: HardwareId {
                source: HardwareIdSource::Override,
                value: machine.clone(),
            },
        })
    };
    send_msg(&mut send, &hello(OLD)).await.unwrap();
    let _welcome: Option<ControllerMsg> = recv_msg(&mut recv).await.unwrap();
    let csr_der = pki::make_csr(&key).unwrap();
    send_msg(
        &mut send,
        &AgentMsg::Enrol(EnrolRequest {
            token: token.to_owned(),
            csr_der,
            hostname: "roll".to_owned(),
        }),
    )
    .await
    .unwrap();
    let enrolled = match recv_msg::<ControllerMsg>(&mut recv).await.unwrap() {
        Some(ControllerMsg::Enrolled(e)) => e,
        other => panic!("expected Enrolled, got {other:?}"),
    };
    conn.close(0u32.into(), b"enrolled");
    let (tx, mut rx) = watch::channel(Some(OLD.to_owned()));
    wanted.lock().unwrap().insert(enrolled.node_id.clone(), tx);
    let ca_der = ca_der.to_vec();
    let cert = enrolled.cert_der.clone();
    tokio::spawn(async move {
        loop {
            let version = rx.borrow_and_update().clone();
            if let Some(version) = version {
                // Connect (again and again while the controller is away: it may be restarting).
                let cfg = tls::node_client_config(
                    &ca_der,
                    &cert,
                    pki::tls_key(&key),
                    Duration::from_secs(5),
                )
                .unwrap();
                let Ok(connecting) =
                    endpoint.connect_with(cfg, quic, tls::controller_server_name())
                else {
                    return;
                };
                let connected = async {
                    let conn = connecting.await.ok()?;
                    let (mut send, mut recv) = conn.open_bi().await.ok()?;
                    send_msg(&mut send, &hello(&version)).await.ok()?;
                    // A protocol-4 agent reports its update state after Welcome; the driver takes
                    // its health from it.
                    let _welcome: ControllerMsg = recv_msg(&mut recv).await.ok()??;
                    send_msg(&mut send, &AgentMsg::UpdateReport(update_report(&version)))
                        .await
                        .ok()?;
                    Some((conn, send, recv))
                };
                let Some((conn, _send, mut recv)) = connected.await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                // Read (and ignore) what the controller sends until told to change.
                loop {
                    tokio::select! {
                        changed = rx.changed() => {
                            if changed.is_err() { return; }
                            break;
                        }
                        msg = recv_msg::<ControllerMsg>(&mut recv) => {
                            if !matches!(msg, Ok(Some(_))) { break; }
                        }
                    }
                }
                conn.close(0u32.into(), b"restarting");
            } else if rx.changed().await.is_err() {
                return;
            }
        }
    });
    enrolled.node_id
}

/// What a healthy agent running `version` reports: after an update to it, its checks passed.
fn update_report(version: &str) -> UpdateReport {
    UpdateReport {
        running: version.to_owned(),
        attempted: (version != OLD).then(|| version.to_owned()),
        attempts: 1,
        checks: vec![CheckResult {
            name: "session".into(),
            passed: true,
            detail: None,
        }],
        failure: None,
    }
}

/// The most rollout nodes down at once, replayed from the event log.
fn max_down_at_once(events: &[EventView]) -> usize {
    let mut down = BTreeSet::new();
    let mut max = 0;
    for e in events {
        match e.kind.as_str() {
            "node_upgrade_started" => {
                down.insert(e.node.clone());
            }
            "node_upgrade_succeeded" | "node_rolled_back" => {
                down.remove(&e.node);
            }
            _ => {}
        }
        max = max.max(down.len());
    }
    max
}

fn start(max_unavailable: u32, max_failures: u32, deadline_secs: u64) -> serde_json::Value {
    serde_json::to_value(StartRollout {
        agent: Some(NEW.into()),
        selector: Some("role=worker".into()),
        max_unavailable: Some(max_unavailable),
        max_failures: Some(max_failures),
        deadline_secs: Some(deadline_secs),
        ..Default::default()
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_upgrade_one_at_a_time_over_quic() {
    let (fleet, nodes) = Fleet::start(|_| false, 4, 300).await;
    let r: RolloutView = fleet.post("/v1/rollouts", start(1, 1, 60)).await;
    assert_eq!(r.progress.total, 4);
    let done: RolloutView = eventually(Duration::from_secs(30), "the rollout finishes", || async {
        let r: RolloutView = fleet.get("/v1/rollouts/current").await;
        r.finished.then_some(r)
    })
    .await;
    assert_eq!(
        (done.state.as_str(), done.progress.succeeded),
        ("done", 4),
        "{done:?}"
    );
    let nodes_api = fleet.ctl.admin.nodes().await;
    for n in &nodes {
        let v = nodes_api.iter().find(|x| x.id == n.0).unwrap();
        assert_eq!(v.agent_version, NEW, "{n} on the new version");
    }
    let events = fleet.events().await;
    assert_eq!(of_kind(&events, "node_upgrade_started").count(), 4);
    assert_eq!(
        max_down_at_once(&events),
        1,
        "never two nodes down at once: {events:#?}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_returns_pauses_the_rollout_and_is_rolled_back() {
    // The first node to be started never comes back on its own (it is stuck); with K=1 its deadline
    // pauses the rollout, it is rolled back, and no other node is touched.
    let (fleet, _nodes) = Fleet::start(|_| true, 3, 300).await;
    let _: RolloutView = fleet.post("/v1/rollouts", start(1, 1, 2)).await;
    let paused: RolloutView = eventually(Duration::from_secs(20), "the rollout pauses", || async {
        let r: RolloutView = fleet.get("/v1/rollouts/current").await;
        (r.state == "paused").then_some(r)
    })
    .await;
    assert!(
        paused
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("1 node(s) failed"),
        "{paused:?}"
    );
    let failed: RolloutView = eventually(
        Duration::from_secs(20),
        "the failed node is rolled back",
        || async {
            let r: RolloutView = fleet.get("/v1/rollouts/current").await;
            r.nodes.iter().any(|n| n.phase == "failed").then_some(r)
        },
    )
    .await;
    assert_eq!(
        failed.progress.pending, 2,
        "nothing else started: {failed:?}"
    );
    let events = fleet.events().await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e.kind.as_str())
        .filter(|k| k.starts_with("node_") || k.starts_with("rollout_"))
        .collect();
    assert_eq!(
        kinds,
        [
            "rollout_started",
            "node_upgrade_started",
            "node_upgrade_failed",
            "rollout_paused",
            "node_rolled_back"
        ],
        "{events:#?}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restart_mid_rollout_resumes_it() {
    let (mut fleet, nodes) = Fleet::start(|_| false, 3, 300).await;
    let _: RolloutView = fleet.post("/v1/rollouts", start(1, 1, 60)).await;
    // Restart as soon as the first node was taken down, while it is away.
    eventually(PROMPT, "a node taken down", || async {
        of_kind(&fleet.events().await, "node_upgrade_started")
            .next()
            .map(|_| ())
    })
    .await;
    fleet.restart().await;
    let done: RolloutView = eventually(
        Duration::from_secs(30),
        "the rollout finishes after the restart",
        || async {
            let r: RolloutView = fleet.get("/v1/rollouts/current").await;
            r.finished.then_some(r)
        },
    )
    .await;
    assert_eq!(
        (done.state.as_str(), done.progress.succeeded),
        ("done", 3),
        "{done:?}"
    );
    let events = fleet.events().await;
    for n in &nodes {
        let started = events
            .iter()
            .filter(|e| is_event(e, "node_upgrade_started", &n.0))
            .count();
        assert_eq!(started, 1, "{n} started once across the restart");
    }
    assert_eq!(
        max_down_at_once(&events),
        1,
        "never two nodes down at once: {events:#?}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_outside_its_window_waits_until_it_opens() {
    let (fleet, _nodes) = Fleet::start(|_| false, 3, 300).await;
    let at = |s: &str| {
        shoal_proto::UnixMillis(s.parse::<jiff::Timestamp>().unwrap().as_millisecond() as u64)
    };
    fleet.clock.set_now(at("2030-03-04T01:00:00Z"));
    let window = CreateWindow {
        name: "nightly".into(),
        schedule: "0 2 * * *".into(),
        duration_secs: 3600,
        tz: Some("UTC".into()),
        selector: None,
    };
    let w: WindowView = fleet
        .post("/v1/windows", serde_json::to_value(window).unwrap())
        .await;
    assert!(
        !w.open && w.opens_at.as_deref() == Some("2030-03-04T02:00:00Z"),
        "{w:?}"
    );
    let mut req = start(1, 1, 60);
    req["window"] = "nightly".into();
    let _: RolloutView = fleet.post("/v1/rollouts", req).await;
    let waiting: RolloutView = eventually(
        PROMPT,
        "the rollout says it waits for its window",
        || async {
            let r: RolloutView = fleet.get("/v1/rollouts/current").await;
            r.waiting.iter().any(|w| w == "window closed").then_some(r)
        },
    )
    .await;
    assert_eq!(waiting.progress.pending, 3);
    // Many driver ticks later, still nothing started.
    consistently(
        Duration::from_millis(500),
        "nothing starts outside the window",
        || async {
            of_kind(&fleet.events().await, "node_upgrade_started")
                .next()
                .is_none()
        },
    )
    .await;
    fleet.clock.set_now(at("2030-03-04T02:00:00Z"));
    let done: RolloutView = eventually(
        Duration::from_secs(30),
        "the rollout runs once the window opens",
        || async {
            let r: RolloutView = fleet.get("/v1/rollouts/current").await;
            r.finished.then_some(r)
        },
    )
    .await;
    assert_eq!(done.progress.succeeded, 3);
    fleet.stop().await;
}
