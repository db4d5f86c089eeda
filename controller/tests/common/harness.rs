//! The in-process controller harness shared by the tier-2 tests that drive a real controller with
//! real agents and hand-driven clients: [`Ctl`] (a controller on loopback, port 0), [`Agent`] (a
//! real `shoal_agent::daemon::run`), [`Raw`] (one hand-driven QUIC connection), [`Admin`] (the
//! admin API as shoalctl uses it) and filters over its event log.

#![allow(clippy::unwrap_used)]

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use rustls_pki_types::PrivateKeyDer;
use shoal_agent::daemon::{self, AgentConfig};
use shoal_api::events::EventView;
use shoal_api::nodes::NodeView;
use shoal_api::tokens::CreateToken;
use shoal_api::tokens::TokenView;
use shoal_controller::{
    api::admin::{AdminClient, AdminConf, ADMIN_CONF_FILE},
    connections::close_code,
    registry::ca,
    server,
    server::Controller,
    server::ControllerConfig,
};
use shoal_overlay::{pki, recv_msg, send_msg, tls};
use shoal_proto::{
    AgentMsg, ControllerMsg, EnrolRequest, Enrolled, HardwareId, HardwareIdSource, Hello, NodeId,
    Reject, VersionRange, Welcome, SUPPORTED,
};
use tokio::{sync::oneshot, task::JoinHandle};

use super::eventually;

/// Deadline for anything that should happen "at once" on loopback.
pub const PROMPT: Duration = Duration::from_secs(5);
/// Deadline for an agent to enrol and come up.
pub const AGENT_UP: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// The admin API, as shoalctl talks to it.
#[derive(Clone)]
pub struct Admin {
    pub client: AdminClient,
}

impl Admin {
    pub fn new(conf: &AdminConf) -> Admin {
        Admin {
            client: AdminClient::new(conf).unwrap(),
        }
    }

    pub async fn get<T: serde::de::DeserializeOwned + Send + 'static>(&self, path: &str) -> T {
        let client = self.client.clone();
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || client.get(&path).unwrap())
            .await
            .unwrap()
    }

    pub async fn create_token(&self, max_uses: Option<u32>) -> String {
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

    /// Whether the admin API answers yet.
    pub async fn answers(&self) -> Option<()> {
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || {
            client.get::<Vec<NodeView>>("/v1/nodes").ok().map(|_| ())
        })
        .await
        .unwrap()
    }

    pub async fn nodes(&self) -> Vec<NodeView> {
        self.get("/v1/nodes").await
    }

    pub async fn node_by_machine(&self, machine_id: &str) -> Option<NodeView> {
        let hw = format!("override:{machine_id}");
        self.nodes().await.into_iter().find(|n| n.hardware_id == hw)
    }

    pub async fn node(&self, id: &NodeId) -> NodeView {
        self.get(&format!("/v1/nodes/{id}")).await
    }

    pub async fn tokens(&self) -> Vec<TokenView> {
        self.get("/v1/tokens").await
    }

    /// How often the join token `token` (the secret as created) was used; `None` if not listed.
    pub async fn token_uses(&self, token: &str) -> Option<u32> {
        let id = token.split('.').nth(1).unwrap().to_owned();
        self.tokens()
            .await
            .into_iter()
            .find(|t| t.id == id)
            .map(|t| t.uses)
    }

    pub async fn post<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        path: &str,
        body: impl serde::Serialize + Send + 'static,
    ) -> T {
        let client = self.client.clone();
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || client.post(&path, &body).unwrap())
            .await
            .unwrap()
    }

    pub async fn post_no_content(&self, path: &str, body: impl serde::Serialize + Send + 'static) {
        let client = self.client.clone();
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || client.post_no_content(&path, &body).unwrap())
            .await
            .unwrap()
    }

    /// The whole event log, oldest first.
    pub async fn events(&self) -> Vec<EventView> {
        self.get("/v1/events?limit=10000").await
    }

    /// The events of `kind` about `node`, oldest first.
    pub async fn events_of(&self, kind: &str, node: &str) -> Vec<EventView> {
        self.events()
            .await
            .into_iter()
            .filter(|e| is_event(e, kind, node))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Event filters (over the admin API's event view)
// ---------------------------------------------------------------------------------------------

/// Whether `e` is of `kind` and about `node`.
pub fn is_event(e: &EventView, kind: &str, node: &str) -> bool {
    e.kind == kind && about(e, node)
}

/// Whether `e` is about `node`.
pub fn about(e: &EventView, node: &str) -> bool {
    e.node.as_deref() == Some(node)
}

/// The events of `kind` in `events`, about any node.
pub fn of_kind<'a>(events: &'a [EventView], kind: &'a str) -> impl Iterator<Item = &'a EventView> {
    events.iter().filter(move |e| e.kind == kind)
}

/// The sequence number of the newest event, 0 for an empty log.
pub fn last_seq(events: &[EventView]) -> u64 {
    events.last().map(|e| e.seq).unwrap_or(0)
}

/// A controller running in this process.
pub struct Ctl {
    pub quic: SocketAddr,
    pub api: SocketAddr,
    pub admin: Admin,
    pub admin_conf: PathBuf,
    pub data_dir: PathBuf,
    /// The running controller, for tests that change it from outside the API; let go when it
    /// stops, so its store can be opened again.
    controller: Option<Arc<Controller>>,
    pub ca_der: Vec<u8>,
    pub ca_sha256: [u8; 32],
    pub stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<Result<(), server::ServeError>>>,
    pub _data: Option<tempfile::TempDir>,
}

impl Ctl {
    /// A controller with the default configuration in a temporary data directory.
    pub async fn start() -> Ctl {
        Ctl::start_with(|_| {}).await
    }

    /// A controller in a temporary data directory, its configuration changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut ControllerConfig)) -> Ctl {
        let dir = tempfile::tempdir().unwrap();
        let mut ctl = Ctl::start_in(dir.path().to_owned(), tweak).await;
        ctl._data = Some(dir);
        ctl
    }

    /// A controller on data directory `data_dir` (kept by the caller), on fresh loopback ports.
    pub async fn start_in(data_dir: PathBuf, tweak: impl FnOnce(&mut ControllerConfig)) -> Ctl {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Ctl::start_on(data_dir, udp, tcp, tweak, |_| {}).await
    }

    /// Opens a controller on `data_dir`, lets `before_run` change it before it serves (install a
    /// test executor before the rollout driver's first pass), and runs it on these sockets until
    /// the admin API answers.
    pub async fn start_on(
        data_dir: PathBuf,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
        tweak: impl FnOnce(&mut ControllerConfig),
        before_run: impl FnOnce(&Arc<Controller>),
    ) -> Ctl {
        let mut config = ControllerConfig::new(data_dir.clone());
        tweak(&mut config);
        let quic = udp.local_addr().unwrap();
        let api = tcp.local_addr().unwrap();
        let controller = tokio::task::spawn_blocking(move || Controller::open(config, api))
            .await
            .unwrap()
            .unwrap();
        before_run(&controller);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(controller.clone(), udp, tcp, async {
            let _ = stopped.await;
        }));
        let admin_conf = data_dir.join(ADMIN_CONF_FILE);
        let conf = AdminConf::read(&admin_conf).unwrap();
        let ca_der =
            ca::pem_to_der(&std::fs::read_to_string(data_dir.join(ca::CA_CERT_FILE)).unwrap())
                .unwrap();
        let ca_sha256 = pki::sha256(&ca_der);
        let ctl = Ctl {
            quic,
            api,
            admin: Admin::new(&conf),
            admin_conf,
            data_dir,
            controller: Some(controller),
            ca_der,
            ca_sha256,
            stop: Some(stop),
            task: Some(task),
            _data: None,
        };
        // The admin API answers once run() is serving.
        eventually(PROMPT, "admin API answers", || ctl.admin.answers()).await;
        ctl
    }

    /// Stops the controller (checking it shut down cleanly) and starts it again on the same data
    /// directory and ports, with `tweak` and `before_run` as for [`Ctl::start_on`].
    pub async fn restart(
        &mut self,
        tweak: impl FnOnce(&mut ControllerConfig),
        before_run: impl FnOnce(&Arc<Controller>),
    ) {
        self.shut_down().await;
        // The old endpoint's driver lets go of the sockets a moment after run() returns.
        let (quic, api) = (self.quic, self.api);
        let udp = eventually(PROMPT, "the QUIC port is free again", || async move {
            std::net::UdpSocket::bind(quic).ok()
        })
        .await;
        let tcp = eventually(PROMPT, "the API port is free again", || async move {
            std::net::TcpListener::bind(api).ok()
        })
        .await;
        let mut next = Ctl::start_on(self.data_dir.clone(), udp, tcp, tweak, before_run).await;
        next._data = self._data.take();
        *self = next;
    }

    /// Stops the controller and checks it shut down cleanly (it did not crash meanwhile).
    pub async fn stop(mut self) {
        self.shut_down().await;
    }

    /// The running controller.
    pub fn controller(&self) -> &Arc<Controller> {
        self.controller.as_ref().expect("the controller runs")
    }

    async fn shut_down(&mut self) {
        self.controller = None;
        let task = self.task.take().unwrap();
        assert!(!task.is_finished(), "the controller stopped on its own");
        let _ = self.stop.take().unwrap().send(());
        let result = tokio::time::timeout(PROMPT, task)
            .await
            .expect("controller shuts down")
            .expect("controller task");
        result.expect("controller ran without error");
    }

    /// Starts a real agent with a fresh token.
    pub async fn agent(&self, machine_id: &str) -> Agent {
        let token = self.admin.create_token(None).await;
        Agent::start(self.quic, machine_id, token)
    }

    /// A real agent enrolled and up; returns it and its node id.
    pub async fn agent_up(&self, machine_id: &str) -> (Agent, String) {
        let agent = self.agent(machine_id).await;
        let node = self.wait_up(machine_id).await;
        (agent, node)
    }

    pub async fn wait_up(&self, machine_id: &str) -> String {
        eventually(
            AGENT_UP,
            &format!("agent {machine_id} enrolled, up and connected"),
            || async {
                self.admin
                    .node_by_machine(machine_id)
                    .await
                    .filter(|n| n.status == "up" && n.connected)
                    .map(|n| n.id)
            },
        )
        .await
    }

    /// What must hold after every fault: the controller still runs, the good agent is still up and
    /// connected, and a new connection still gets a Welcome.
    pub async fn assert_still_serving(&self, machine_id: &str, node: &str) {
        assert!(
            !self.task.as_ref().unwrap().is_finished(),
            "the controller stopped"
        );
        let n = self
            .admin
            .node_by_machine(machine_id)
            .await
            .expect("good node still listed");
        assert_eq!(n.id, node);
        assert!(
            n.status == "up" && n.connected,
            "good node not up and connected after the fault: {n:?}"
        );
        let mut raw = Raw::enrolment(self).await;
        let welcome = raw
            .hello(SUPPORTED)
            .await
            .expect("new connection gets a Welcome");
        assert_eq!(welcome.protocol, SUPPORTED.max);
        // And the good agent is still connected after all that.
        let n = self.admin.node_by_machine(machine_id).await.unwrap();
        assert!(n.connected, "good node dropped: {n:?}");
    }

    /// The controller still runs and the good agent (node `node`) is up, connected and, with
    /// `since` (its last-seen time before the fault), heartbeating: its last-seen time moves on.
    /// A new connection still gets a Welcome.
    pub async fn assert_node_still_served(&self, node: &str, since: Option<u64>) {
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
        raw.hello(SUPPORTED)
            .await
            .expect("a new connection gets a Welcome");
    }

    /// Enrols a fresh key as `machine` with a single-use token and opens its authenticated
    /// session (Hello done); the connection and the node's id.
    pub async fn raw_node(&self, machine: &str) -> (Raw, NodeId) {
        let key = pki::generate_key().unwrap();
        let token = self.admin.create_token(Some(1)).await;
        let mut raw = Raw::enrolment(self).await;
        raw.hello_as(SUPPORTED, machine).await.unwrap();
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
        let mut raw = Raw::node(self, &enrolled.cert_der, &key).await;
        let welcome = raw.hello_as(SUPPORTED, machine).await.unwrap();
        assert_eq!(welcome.node_id.as_ref(), Some(&enrolled.node_id));
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

/// A real agent daemon.
pub struct Agent {
    pub stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<Result<(), daemon::AgentError>>>,
    pub _state: tempfile::TempDir,
}

impl Agent {
    pub fn start(controller: SocketAddr, machine_id: &str, token: String) -> Agent {
        let state = tempfile::tempdir().unwrap();
        let mut config = AgentConfig::new(controller, state.path().to_owned());
        // In-process agents share the test's network namespace: no TAP devices there.
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

    /// Checks the agent is still running (it did not give up), then stops it.
    pub async fn stop(mut self) {
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
#[derive(Debug)]
pub struct Raw {
    pub _endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

pub fn hello_msg(protocol: VersionRange, machine: &str) -> AgentMsg {
    AgentMsg::Hello(Hello {
        protocol,
        agent_version: "faults-test".into(),
        hardware_id: HardwareId {
            source: HardwareIdSource::Override,
            value: machine.into(),
        },
    })
}

pub fn key_der(key: &rcgen::KeyPair) -> PrivateKeyDer<'static> {
    pki::tls_key(key)
}

pub async fn connect(
    addr: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    connect_from("127.0.0.1:0".parse().unwrap(), addr, config).await
}

/// [`connect`] from a chosen local address (another loopback address is another client).
pub async fn connect_from(
    local: SocketAddr,
    addr: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    let endpoint = quinn::Endpoint::client(local).unwrap();
    let connecting = endpoint
        .connect_with(config, addr, tls::controller_server_name())
        .map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(PROMPT, connecting)
        .await
        .map_err(|_| "handshake timed out".to_owned())?;
    let conn = conn.map_err(|e| e.to_string())?;
    Ok((endpoint, conn))
}

impl Raw {
    /// An unauthenticated (enrolment) connection.
    pub async fn enrolment(ctl: &Ctl) -> Raw {
        let cfg = tls::enrol_client_config(ctl.ca_sha256, Duration::from_secs(5)).unwrap();
        let (endpoint, conn) = connect(ctl.quic, cfg).await.unwrap();
        Raw::open(endpoint, conn).await
    }

    /// An unauthenticated connection that got its Welcome, or `None` if the controller closed it
    /// first (at a connection limit).
    pub async fn try_enrolment(ctl: &Ctl) -> Option<Raw> {
        let mut raw = Raw::try_enrolment_stream(ctl).await?;
        raw.send(&hello_msg(SUPPORTED, "faults-raw")).await;
        match tokio::time::timeout(PROMPT, recv_msg::<ControllerMsg>(&mut raw.recv)).await {
            Ok(Ok(Some(ControllerMsg::Welcome(_)))) => Some(raw),
            _ => None,
        }
    }

    /// An unauthenticated connection with its control stream open (nothing sent yet), or `None` if
    /// the controller closed it first.
    pub async fn try_enrolment_stream(ctl: &Ctl) -> Option<Raw> {
        let cfg = tls::enrol_client_config(ctl.ca_sha256, Duration::from_secs(5)).unwrap();
        let (endpoint, conn) = connect(ctl.quic, cfg).await.ok()?;
        let (send, recv) = tokio::time::timeout(PROMPT, conn.open_bi())
            .await
            .ok()?
            .ok()?;
        Some(Raw {
            _endpoint: endpoint,
            conn,
            send,
            recv,
        })
    }

    /// A connection authenticated with a node certificate.
    pub async fn node(ctl: &Ctl, cert_der: &[u8], key: &rcgen::KeyPair) -> Raw {
        let cfg =
            tls::node_client_config(&ctl.ca_der, cert_der, key_der(key), Duration::from_secs(5))
                .unwrap();
        let (endpoint, conn) = connect(ctl.quic, cfg).await.unwrap();
        Raw::open(endpoint, conn).await
    }

    pub async fn open(endpoint: quinn::Endpoint, conn: quinn::Connection) -> Raw {
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

    pub async fn send(&mut self, msg: &AgentMsg) {
        send_msg(&mut self.send, msg).await.unwrap();
    }

    pub async fn recv(&mut self) -> Result<Option<ControllerMsg>, shoal_overlay::TransportError> {
        tokio::time::timeout(PROMPT, recv_msg::<ControllerMsg>(&mut self.recv))
            .await
            .expect("controller answers promptly")
    }

    /// Sends Hello; returns the Welcome, or the Reject as an error.
    pub async fn hello(&mut self, protocol: VersionRange) -> Result<Welcome, Reject> {
        self.hello_as(protocol, "faults-raw").await
    }

    /// Sends Hello claiming hardware id `override:{machine}`; returns the Welcome, or the Reject.
    pub async fn hello_as(
        &mut self,
        protocol: VersionRange,
        machine: &str,
    ) -> Result<Welcome, Reject> {
        self.send(&hello_msg(protocol, machine)).await;
        match self.recv().await {
            Ok(Some(ControllerMsg::Welcome(w))) => Ok(w),
            Ok(Some(ControllerMsg::Reject(r))) => Err(r),
            other => panic!("expected Welcome or Reject, got {other:?}"),
        }
    }

    pub async fn expect_reject(&mut self) -> Reject {
        match self.recv().await {
            Ok(Some(ControllerMsg::Reject(r))) => r,
            other => panic!("expected a Reject, got {other:?}"),
        }
    }

    /// Reads until a message `pick` accepts, skipping what the controller sends a node on its own
    /// (drive policy and the like).
    pub async fn recv_until<T>(&mut self, mut pick: impl FnMut(ControllerMsg) -> Option<T>) -> T {
        loop {
            match self.recv().await {
                Ok(Some(m)) => {
                    if let Some(t) = pick(m) {
                        return t;
                    }
                }
                other => panic!("connection ended while waiting: {other:?}"),
            }
        }
    }

    /// The next Reject, skipping what the controller sends a node on its own.
    pub async fn next_reject(&mut self) -> Reject {
        self.recv_until(|m| match m {
            ControllerMsg::Reject(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Waits for the controller to close the connection; returns why.
    pub async fn closed(&self) -> quinn::ConnectionError {
        tokio::time::timeout(PROMPT, self.conn.closed())
            .await
            .expect("controller closes the connection promptly")
    }

    pub async fn expect_protocol_close(&self) -> String {
        match self.closed().await {
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

    /// Enrols a fresh key over this (unauthenticated) connection.
    pub async fn enrol(self, token: &str, key: &rcgen::KeyPair) -> Result<Enrolled, Reject> {
        self.enrol_as(token, key, "faults-raw").await
    }

    /// Enrols `key` claiming hardware id `override:{machine}`.
    pub async fn enrol_as(
        mut self,
        token: &str,
        key: &rcgen::KeyPair,
        machine: &str,
    ) -> Result<Enrolled, Reject> {
        self.hello_as(SUPPORTED, machine).await?;
        let csr_der = pki::make_csr(key).unwrap();
        self.send(&AgentMsg::Enrol(EnrolRequest {
            token: token.into(),
            csr_der,
            hostname: format!("{machine}-host"),
        }))
        .await;
        match self.recv().await {
            Ok(Some(ControllerMsg::Enrolled(e))) => Ok(e),
            Ok(Some(ControllerMsg::Reject(r))) => Err(r),
            other => panic!("expected Enrolled or Reject, got {other:?}"),
        }
    }
}

/// The real shoalctl binary. It is its own package (`controller/cli`), so cargo gives this one no
/// `CARGO_BIN_EXE_shoalctl`: it is found in the target dir above this test's `deps/` (or in
/// `$SHOAL_BIN_DIR`), where `cargo build --workspace --bins`, `cargo build -p shoalctl` or
/// `cargo test -p shoalctl` put it.
pub fn shoalctl_bin() -> std::path::PathBuf {
    let dir = match std::env::var_os("SHOAL_BIN_DIR") {
        Some(dir) => std::path::PathBuf::from(dir),
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
