//! Tier-2 tests of the bounds on what nodes and clients send: a real controller on loopback (QUIC +
//! TLS, port 0), a real agent (`shoal_agent::daemon::run`) kept up beside hand-driven clients that
//! send over-limit messages, trickle frames and spam events. Every test checks what the misbehaving
//! client sees, that the controller kept nothing of what it refused, and that the good agent is
//! still served afterwards.

#![allow(clippy::unwrap_used)]

mod common;
use common::eventually;
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use shoal_agent::daemon::{self, AgentConfig};
use shoal_controller::{
    admin::{AdminClient, AdminConf, ADMIN_CONF_FILE},
    ca,
    server::{self, close_code, Controller, ControllerConfig},
    view::{CreateToken, EventView, NodeView, TokenView},
};
use shoal_overlay::{pki, recv_msg, send_msg, tls};
use shoal_proto::{
    limits, AgentMsg, ControllerMsg, Drive, DriveReport, DriveState, EnrolRequest, Enrolled,
    HardwareId, HardwareIdSource, Hello, Inventory, NatMapping, NetInterface, NodeId, OverlayHello,
    Reject, RejectCode, UnixMillis, MAX_FRAME_LEN, SUPPORTED,
};
use tokio::{sync::oneshot, task::JoinHandle};

/// Deadline for anything that should happen "at once" on loopback.
const PROMPT: Duration = Duration::from_secs(5);
/// Deadline for an agent to enrol and come up.
const AGENT_UP: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Harness (the same shape as faults.rs': controller, real agent, hand-driven connections)
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Admin {
    client: AdminClient,
}

impl Admin {
    async fn get<T: serde::de::DeserializeOwned + Send + 'static>(&self, path: &str) -> T {
        let client = self.client.clone();
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || client.get(&path).unwrap())
            .await
            .unwrap()
    }

    async fn create_token(&self, max_uses: Option<u32>) -> String {
        let client = self.client.clone();
        let body = CreateToken {
            ttl_secs: Some(3600),
            max_uses,
            ..Default::default()
        };
        tokio::task::spawn_blocking(move || client.create_token(&body).unwrap().token)
            .await
            .unwrap()
    }

    async fn nodes(&self) -> Vec<NodeView> {
        self.get("/v1/nodes").await
    }

    async fn node(&self, id: &NodeId) -> NodeView {
        self.get(&format!("/v1/nodes/{id}")).await
    }

    async fn events(&self) -> Vec<EventView> {
        self.get("/v1/events?limit=10000").await
    }
}

struct Ctl {
    quic: SocketAddr,
    admin: Admin,
    admin_conf: PathBuf,
    ca_der: Vec<u8>,
    ca_sha256: [u8; 32],
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), server::ServeError>>>,
    _data: tempfile::TempDir,
}

impl Ctl {
    async fn start(tweak: impl FnOnce(&mut ControllerConfig)) -> Ctl {
        let data = tempfile::tempdir().unwrap();
        let mut config = ControllerConfig::new(data.path().to_owned());
        tweak(&mut config);
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let quic = udp.local_addr().unwrap();
        let api = tcp.local_addr().unwrap();
        let controller = tokio::task::spawn_blocking(move || Controller::open(config, api))
            .await
            .unwrap()
            .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(controller, udp, tcp, async {
            let _ = stopped.await;
        }));
        let admin_conf = data.path().join(ADMIN_CONF_FILE);
        let conf = AdminConf::read(&admin_conf).unwrap();
        let ca_der =
            ca::pem_to_der(&std::fs::read_to_string(data.path().join(ca::CA_CERT_FILE)).unwrap())
                .unwrap();
        let ca_sha256 = pki::sha256(&ca_der);
        let admin = Admin {
            client: AdminClient::new(&conf).unwrap(),
        };
        let ctl = Ctl {
            quic,
            admin,
            admin_conf,
            ca_der,
            ca_sha256,
            stop: Some(stop),
            task: Some(task),
            _data: data,
        };
        eventually(PROMPT, "admin API answers", || {
            let client = ctl.admin.client.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    client.get::<Vec<NodeView>>("/v1/nodes").ok().map(|_| ())
                })
                .await
                .unwrap()
            }
        })
        .await;
        ctl
    }

    async fn stop(mut self) {
        let task = self.task.take().unwrap();
        assert!(!task.is_finished(), "the controller stopped on its own");
        let _ = self.stop.take().unwrap().send(());
        let result = tokio::time::timeout(PROMPT, task)
            .await
            .expect("controller shuts down")
            .expect("controller task");
        result.expect("controller ran without error");
    }

    /// A real agent, enrolled and up; returns it and its node id.
    async fn agent_up(&self, machine_id: &str) -> (Agent, String) {
        let token = self.admin.create_token(None).await;
        let agent = Agent::start(self.quic, machine_id, token);
        let hw = format!("override:{machine_id}");
        let node = eventually(
            AGENT_UP,
            &format!("agent {machine_id} enrolled, up and connected"),
            || async {
                self.admin
                    .nodes()
                    .await
                    .into_iter()
                    .find(|n| n.hardware_id == hw && n.status == "up" && n.connected)
                    .map(|n| n.id)
            },
        )
        .await;
        (agent, node)
    }

    /// The controller still runs and the good agent is up, connected, and heartbeating: its
    /// last-seen time moves on after `since`.
    async fn assert_still_serving(&self, node: &str, since: Option<u64>) {
        assert!(
            !self.task.as_ref().unwrap().is_finished(),
            "the controller stopped"
        );
        let id = NodeId(node.to_owned());
        let n = self.admin.node(&id).await;
        assert!(
            n.status == "up" && n.connected,
            "good node not up and connected: {n:?}"
        );
        if let Some(since) = since {
            eventually(
                Duration::from_secs(30),
                "the good agent's heartbeat is still taken",
                || async {
                    self.admin
                        .node(&id)
                        .await
                        .last_seen_unix_ms
                        .filter(|t| *t > since)
                        .map(|_| ())
                },
            )
            .await;
        }
        let mut raw = Raw::enrolment(self).await;
        raw.hello().await.expect("a new connection gets a Welcome");
    }

    /// Enrols a fresh key with a single-use token and opens its authenticated session (Hello done).
    async fn raw_node(&self, machine: &str) -> (Raw, NodeId) {
        let key = pki::generate_key().unwrap();
        let token = self.admin.create_token(Some(1)).await;
        let mut raw = Raw::enrolment(self).await;
        raw.hello_as(machine).await.unwrap();
        let csr_der = pki::make_csr(&key).unwrap();
        raw.send(&AgentMsg::Enrol(EnrolRequest {
            token,
            csr_der,
            hostname: machine.into(),
        }))
        .await;
        let enrolled: Enrolled = match raw.recv().await {
            Ok(Some(ControllerMsg::Enrolled(e))) => e,
            other => panic!("expected Enrolled, got {other:?}"),
        };
        let cfg = tls::node_client_config(
            &self.ca_der,
            &enrolled.cert_der,
            pki::tls_key(&key),
            Duration::from_secs(5),
        )
        .unwrap();
        let mut raw = Raw::connect(self.quic, cfg).await;
        let welcome = raw.hello_as(machine).await.unwrap();
        assert_eq!(welcome.as_ref(), Some(&enrolled.node_id));
        (raw, enrolled.node_id)
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

struct Agent {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), daemon::AgentError>>>,
    _state: tempfile::TempDir,
}

impl Agent {
    fn start(controller: SocketAddr, machine_id: &str, token: String) -> Agent {
        let state = tempfile::tempdir().unwrap();
        let mut config = AgentConfig::new(controller, state.path().to_owned());
        config.overlay_enabled = false;
        config.token = Some(token);
        config.machine_id = Some(machine_id.to_owned());
        config.backoff_base = Duration::from_millis(100);
        config.backoff_max = Duration::from_millis(500);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon::run(config, async {
            let _ = stopped.await;
        }));
        Agent {
            stop: Some(stop),
            task: Some(task),
            _state: state,
        }
    }

    async fn stop(mut self) {
        let task = self.task.take().unwrap();
        assert!(!task.is_finished(), "agent gave up: {:?}", task.await);
        let _ = self.stop.take().unwrap().send(());
        let r = tokio::time::timeout(PROMPT, task)
            .await
            .expect("agent shuts down")
            .unwrap();
        r.expect("agent ran without error");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A hand-driven client connection with one control stream.
struct Raw {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Raw {
    async fn connect(addr: SocketAddr, config: quinn::ClientConfig) -> Raw {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = endpoint
            .connect_with(config, addr, tls::controller_server_name())
            .unwrap();
        let conn = tokio::time::timeout(PROMPT, connecting)
            .await
            .expect("handshake in time")
            .unwrap();
        let (send, recv) = tokio::time::timeout(PROMPT, conn.open_bi())
            .await
            .unwrap()
            .unwrap();
        Raw {
            _endpoint: endpoint,
            conn,
            send,
            recv,
        }
    }

    async fn enrolment(ctl: &Ctl) -> Raw {
        Raw::connect(
            ctl.quic,
            tls::enrol_client_config(ctl.ca_sha256, Duration::from_secs(5)).unwrap(),
        )
        .await
    }

    async fn send(&mut self, msg: &AgentMsg) {
        send_msg(&mut self.send, msg).await.unwrap();
    }

    async fn recv(&mut self) -> Result<Option<ControllerMsg>, shoal_overlay::TransportError> {
        tokio::time::timeout(PROMPT, recv_msg::<ControllerMsg>(&mut self.recv))
            .await
            .expect("controller answers promptly")
    }

    async fn hello_as(&mut self, machine: &str) -> Result<Option<NodeId>, Reject> {
        self.send(&AgentMsg::Hello(Hello {
            protocol: SUPPORTED,
            agent_version: "bounds-test".into(),
            hardware_id: HardwareId {
                source: HardwareIdSource::Override,
                value: machine.into(),
            },
        }))
        .await;
        match self.recv().await {
            Ok(Some(ControllerMsg::Welcome(w))) => Ok(w.node_id),
            Ok(Some(ControllerMsg::Reject(r))) => Err(r),
            other => panic!("expected Welcome or Reject, got {other:?}"),
        }
    }

    async fn hello(&mut self) -> Result<Option<NodeId>, Reject> {
        self.hello_as("bounds-raw").await
    }

    /// The next Reject, skipping what the controller sends a node on its own (drive policy...).
    async fn expect_reject(&mut self) -> Reject {
        loop {
            match self.recv().await {
                Ok(Some(ControllerMsg::Reject(r))) => return r,
                Ok(Some(_)) => continue,
                other => panic!("expected a Reject, got {other:?}"),
            }
        }
    }

    /// Waits for the controller to close with the protocol code; returns the reason.
    async fn expect_protocol_close(&self) -> String {
        match tokio::time::timeout(PROMPT, self.conn.closed())
            .await
            .expect("controller closes promptly")
        {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(
                    c.error_code,
                    close_code::PROTOCOL.into(),
                    "close code: {c:?}"
                );
                String::from_utf8_lossy(&c.reason).into_owned()
            }
            other => panic!("expected an application close by the controller, got {other:?}"),
        }
    }
}

fn inventory(hostname: &str, nics: usize) -> AgentMsg {
    AgentMsg::Inventory(Inventory {
        hostname: hostname.into(),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        cpu_cores: 8,
        nics: (0..nics)
            .map(|i| NetInterface {
                name: format!("veth{i}"),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
}

fn drive(name: &str, model: &str) -> Drive {
    Drive {
        name: name.into(),
        model: Some(model.into()),
        serial: Some(format!("S-{name}")),
        size_bytes: 1 << 40,
        removable: false,
        state: DriveState::Blank,
        smart: None,
        smart_at: None,
    }
}

fn drives(list: Vec<Drive>) -> AgentMsg {
    AgentMsg::Drives(DriveReport {
        at: UnixMillis(1),
        drives: list,
    })
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_messages_are_refused_with_the_reason_and_nothing_of_them_is_kept() {
    let ctl = Ctl::start(|_| {}).await;
    let (agent, good) = ctl.agent_up("bounds-limits-good").await;

    // An enrolled node reports a good inventory, then one with an interface too many.
    let (mut raw, id) = ctl.raw_node("bounds-limits-raw").await;
    raw.send(&inventory("raw-host", 3)).await;
    eventually(PROMPT, "the good inventory is stored", || async {
        ctl.admin
            .node(&id)
            .await
            .inventory
            .filter(|i| i.nics.len() == 3)
            .map(|_| ())
    })
    .await;
    raw.send(&inventory("raw-host-2", limits::MAX_NICS + 1))
        .await;
    let r = raw.expect_reject().await;
    assert_eq!(r.code, RejectCode::BadRequest, "{r}");
    assert!(
        r.message.contains("inventory.nics") && r.message.contains(&limits::MAX_NICS.to_string()),
        "the reason names the field and the limit: {r}"
    );
    let reason = raw.expect_protocol_close().await;
    assert!(reason.contains("inventory.nics"), "close reason: {reason}");
    let n = ctl.admin.node(&id).await;
    assert_eq!(
        (n.hostname.as_str(), n.inventory.map(|i| i.nics.len())),
        ("raw-host", Some(3)),
        "the node's good state is kept"
    );

    // A drive report over the drive bound, on a fresh session of the same node.
    let (mut raw, _) = ctl.raw_node("bounds-limits-raw2").await;
    raw.send(&drives(vec![drive("sda", "m"); limits::MAX_DRIVES + 1]))
        .await;
    let r = raw.expect_reject().await;
    assert!(
        r.code == RejectCode::BadRequest && r.message.contains("drives.drives"),
        "{r}"
    );

    // Overlay endpoints over the bound.
    let (mut raw, _) = ctl.raw_node("bounds-limits-raw3").await;
    let endpoints = vec!["192.0.2.1:7000".parse().unwrap(); limits::MAX_OVERLAY_ENDPOINTS + 1];
    raw.send(&AgentMsg::Overlay(OverlayHello {
        netmap_version: None,
        local_endpoints: endpoints,
        nat: NatMapping::Unknown,
    }))
    .await;
    let r = raw.expect_reject().await;
    assert!(r.message.contains("overlay.local_endpoints"), "{r}");

    // An enrolment whose hostname is over the bound is refused before the token is spent.
    let token = ctl.admin.create_token(Some(1)).await;
    let mut raw = Raw::enrolment(&ctl).await;
    raw.hello().await.unwrap();
    let key = pki::generate_key().unwrap();
    let hostname = "h".repeat(limits::MAX_HOSTNAME_LEN + 1);
    raw.send(&AgentMsg::Enrol(EnrolRequest {
        token: token.clone(),
        csr_der: pki::make_csr(&key).unwrap(),
        hostname,
    }))
    .await;
    let r = raw.expect_reject().await;
    assert!(
        r.code == RejectCode::BadRequest && r.message.contains("enrol.hostname"),
        "{r}"
    );
    let token_id = token.split('.').nth(1).unwrap().to_owned();
    let tokens: Vec<TokenView> = ctl.admin.get("/v1/tokens").await;
    assert_eq!(
        tokens.iter().find(|t| t.id == token_id).map(|t| t.uses),
        Some(0),
        "the token was not spent"
    );

    let since = ctl
        .admin
        .node(&NodeId(good.clone()))
        .await
        .last_seen_unix_ms;
    ctl.assert_still_serving(&good, since).await;
    agent.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_megabyte_frames_do_not_stop_the_good_agent() {
    let ctl = Ctl::start(|c| c.hello_timeout = Duration::from_secs(2)).await;
    let (agent, good) = ctl.agent_up("bounds-trickle-good").await;

    // Unauthenticated clients announce a 1 MiB frame and send a byte at a time; an enrolled node
    // does the same after its Hello (no hello deadline protects that one).
    let mut trickling = Vec::new();
    for _ in 0..20 {
        let mut raw = Raw::enrolment(&ctl).await;
        raw.send
            .write_all(&(MAX_FRAME_LEN as u32).to_be_bytes())
            .await
            .unwrap();
        trickling.push(raw);
    }
    let (mut node_raw, _) = ctl.raw_node("bounds-trickle-raw").await;
    node_raw
        .send
        .write_all(&(MAX_FRAME_LEN as u32).to_be_bytes())
        .await
        .unwrap();
    for _ in 0..10 {
        for raw in trickling.iter_mut().chain(std::iter::once(&mut node_raw)) {
            let _ = raw.send.write_all(&[0]).await;
        }
        assert!(
            ctl.admin.node(&NodeId(good.clone())).await.connected,
            "the good agent stays connected meanwhile"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The unauthenticated ones never sent a Hello: closed at the hello deadline.
    for raw in &trickling {
        let reason = raw.expect_protocol_close().await;
        assert!(
            reason.contains("Hello") || reason.contains("control stream"),
            "{reason}"
        );
    }
    let since = ctl
        .admin
        .node(&NodeId(good.clone()))
        .await
        .last_seen_unix_ms;
    ctl.assert_still_serving(&good, since).await;
    agent.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_flapping_a_drive_does_not_flood_the_event_log() {
    let ctl = Ctl::start(|_| {}).await;
    let (agent, good) = ctl.agent_up("bounds-events-good").await;
    let (mut raw, id) = ctl.raw_node("bounds-events-raw").await;

    let flaps = 200;
    for i in 0..flaps {
        raw.send(&drives(vec![drive("sda", "m"), drive("sdb", "m")]))
            .await;
        raw.send(&drives(vec![drive("sda", "m")])).await;
        if i % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // A last report with a third drive: once it is taken, every flap before it was logged or
    // suppressed.
    raw.send(&drives(vec![drive("sda", "m"), drive("sdc", "m")]))
        .await;
    eventually(
        Duration::from_secs(30),
        "the last drive report is taken",
        || async {
            let list: Vec<shoal_controller::view::DriveView> =
                ctl.admin.get(&format!("/v1/drives?node={id}")).await;
            list.iter().any(|d| d.device == "sdc").then_some(())
        },
    )
    .await;
    assert!(
        raw.conn.close_reason().is_none(),
        "the node's session is not closed for reporting"
    );
    let events = ctl.admin.events().await;
    let of = |kind: &str| {
        events
            .iter()
            .filter(|e| e.node.as_deref() == Some(id.0.as_str()) && e.kind == kind)
            .count()
    };
    // 200 appearances and 200 removals of sdb, plus sda's and sdc's appearances.
    assert!(
        of("drive_appeared") <= 128 + 1,
        "{} drive_appeared events",
        of("drive_appeared")
    );
    assert!(
        of("drive_removed") <= 128 + 1,
        "{} drive_removed events",
        of("drive_removed")
    );
    assert!(
        of("drive_appeared") >= 100,
        "events within the budget are logged: {}",
        of("drive_appeared")
    );
    // The good node's own events are still there and it is still served.
    assert!(
        events
            .iter()
            .any(|e| e.node.as_deref() == Some(good.as_str()) && e.kind == "up"),
        "the good node's events are kept"
    );
    let since = ctl
        .admin
        .node(&NodeId(good.clone()))
        .await
        .last_seen_unix_ms;
    ctl.assert_still_serving(&good, since).await;
    agent.stop().await;
    ctl.stop().await;
}

/// The real shoalctl binary. It is its own package (`controller/cli`), so cargo gives this one no
/// `CARGO_BIN_EXE_shoalctl`: it is found in the target dir above this test's `deps/` (or in
/// `$SHOAL_BIN_DIR`), where `cargo build --workspace --bins`, `cargo build -p shoalctl` or
/// `cargo test -p shoalctl` put it.
fn shoalctl_bin() -> PathBuf {
    let dir = match std::env::var_os("SHOAL_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().unwrap();
            exe.parent()
                .and_then(|deps| deps.parent())
                .unwrap()
                .to_owned()
        }
    };
    let bin = dir.join("shoalctl");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p shoalctl` first",
        bin.display()
    );
    bin
}

/// Runs the real shoalctl binary.
fn shoalctl(conf: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(shoalctl_bin())
        .arg("--config")
        .arg(conf)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shoalctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoalctl_prints_agent_supplied_text_without_terminal_controls() {
    let ctl = Ctl::start(|_| {}).await;
    let (agent, good) = ctl.agent_up("bounds-ctl-good").await;
    let (mut raw, id) = ctl.raw_node("bounds-ctl-raw").await;
    let title = "\x1b]0;pwn\x07";
    let clear = "\x1b[2J";
    let hostname = format!("evil{title}{clear}");
    raw.send(&inventory(&hostname, 1)).await;
    raw.send(&drives(vec![drive(
        "sdz",
        &format!("model{clear}\u{202e}gpj.exe"),
    )]))
    .await;
    eventually(PROMPT, "inventory and drives stored", || async {
        let list: Vec<shoal_controller::view::DriveView> =
            ctl.admin.get(&format!("/v1/drives?node={id}")).await;
        (ctl.admin.node(&id).await.hostname == hostname && !list.is_empty()).then_some(())
    })
    .await;
    // The store keeps the text faithfully.
    assert_eq!(
        ctl.admin.node(&id).await.inventory.unwrap().hostname,
        hostname
    );

    let conf = ctl.admin_conf.clone();
    let node = id.0.clone();
    let outputs = tokio::task::spawn_blocking(move || {
        [
            vec!["nodes", "list"],
            vec!["nodes", "show", node.as_str()],
            vec!["drives", "list"],
            vec!["events"],
            vec!["report"],
        ]
        .iter()
        .map(|args| (args.join(" "), shoalctl(&conf, args)))
        .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (args, out) in &outputs {
        assert!(
            !out.contains('\x1b') && !out.contains('\x07') && !out.contains('\u{202e}'),
            "shoalctl {args} printed a control character: {out:?}"
        );
    }
    let text = |args: &str| &outputs.iter().find(|(a, _)| a == args).unwrap().1;
    assert!(
        text("nodes list").contains("evil\\x1b]0;pwn\\x07\\x1b[2J"),
        "{}",
        text("nodes list")
    );
    assert!(
        text(&format!("nodes show {id}")).contains("hostname:      evil\\x1b]0;pwn\\x07"),
        "{}",
        text(&format!("nodes show {id}"))
    );
    assert!(
        text("drives list").contains("model\\x1b[2J\\u{202e}gpj.exe"),
        "{}",
        text("drives list")
    );
    assert!(
        text("events").contains("evil\\x1b]0;pwn"),
        "the drive event quotes the hostname: {}",
        text("events")
    );

    // JSON stays faithful: the same bytes, JSON-escaped.
    let conf = ctl.admin_conf.clone();
    let json =
        tokio::task::spawn_blocking(move || shoalctl(&conf, &["nodes", "list", "-o", "json"]))
            .await
            .unwrap();
    let nodes: Vec<NodeView> = serde_json::from_str(&json).unwrap();
    assert!(nodes.iter().any(|n| n.hostname == hostname), "{json}");
    assert!(json.contains("\\u001b]0;pwn\\u0007"), "{json}");

    let since = ctl
        .admin
        .node(&NodeId(good.clone()))
        .await
        .last_seen_unix_ms;
    ctl.assert_still_serving(&good, since).await;
    agent.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_arriving_in_pieces_is_taken_whole_while_the_controller_sends_to_the_node() {
    let ctl = Ctl::start(|_| {}).await;
    let (mut raw, id) = ctl.raw_node("bounds-slow-frame").await;
    // A 30 KiB inventory written in 1 KiB pieces; between pieces an operator changes the node's
    // drive policy, so the controller has a message for the node while the frame is half read.
    let frame = shoal_proto::encode_frame(&inventory("slow-host", 1000)).unwrap();
    for (i, piece) in frame.chunks(1024).enumerate() {
        raw.send.write_all(piece).await.unwrap();
        let client = ctl.admin.client.clone();
        let req = shoal_controller::view::SetDrivePolicy {
            node: Some(id.0.clone()),
            selector: None,
            mode: if i % 2 == 0 { "approve" } else { "report" }.into(),
            filesystem: None,
        };
        tokio::task::spawn_blocking(move || client.set_drive_policy(&req).unwrap())
            .await
            .unwrap();
    }
    eventually(
        PROMPT,
        "the slowly sent inventory is stored whole",
        || async {
            ctl.admin
                .node(&id)
                .await
                .inventory
                .filter(|i| i.nics.len() == 1000)
                .map(|_| ())
        },
    )
    .await;
    assert!(
        raw.conn.close_reason().is_none(),
        "the node's connection was closed: {:?}",
        raw.conn.close_reason()
    );
    ctl.stop().await;
}
