//! The in-process controller harness shared by the tier-2 tests that drive a real controller with
//! real agents and hand-driven clients: [`Ctl`] (a controller on loopback, port 0), [`Agent`] (a
//! real `shoal_agent::daemon::run`), [`Raw`] (one hand-driven QUIC connection) and [`Admin`] (the
//! admin API as shoalctl uses it).

#![allow(dead_code, clippy::unwrap_used)]

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use rustls_pki_types::PrivateKeyDer;
use shoal_agent::daemon::{self, AgentConfig};
use shoal_controller::{
    admin::{AdminClient, AdminConf, ADMIN_CONF_FILE},
    ca,
    server::{self, close_code, Controller, ControllerConfig},
    view::{CreateToken, NodeView, TokenView},
};
use shoal_overlay::{pki, recv_msg, send_msg, tls};
use shoal_proto::{
    AgentMsg, ControllerMsg, EnrolRequest, Enrolled, HardwareId, HardwareIdSource, Hello, Reject,
    VersionRange, Welcome, SUPPORTED,
};
use tokio::{sync::oneshot, task::JoinHandle};

use super::common::eventually;

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

    pub async fn tokens(&self) -> Vec<TokenView> {
        self.get("/v1/tokens").await
    }
}

/// A controller running in this process.
pub struct Ctl {
    pub quic: SocketAddr,
    pub admin: Admin,
    pub ca_der: Vec<u8>,
    pub ca_sha256: [u8; 32],
    pub stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<Result<(), server::ServeError>>>,
    pub _data: Option<tempfile::TempDir>,
}

impl Ctl {
    pub async fn start() -> Ctl {
        let dir = tempfile::tempdir().unwrap();
        let mut ctl = Ctl::start_in(dir.path().to_owned(), |_| {}).await;
        ctl._data = Some(dir);
        ctl
    }

    pub async fn start_in(data_dir: PathBuf, tweak: impl FnOnce(&mut ControllerConfig)) -> Ctl {
        let mut config = ControllerConfig::new(data_dir.clone());
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
        let conf = AdminConf::read(&data_dir.join(ADMIN_CONF_FILE)).unwrap();
        let ca_der =
            ca::pem_to_der(&std::fs::read_to_string(data_dir.join(ca::CA_CERT_FILE)).unwrap())
                .unwrap();
        let ca_sha256 = pki::sha256(&ca_der);
        let ctl = Ctl {
            quic,
            admin: Admin::new(&conf),
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

    /// Stops the controller and checks it shut down cleanly (it did not crash meanwhile).
    pub async fn stop(mut self) {
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
