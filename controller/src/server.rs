//! The controller's async shell: the QUIC endpoint for agents, the admin API, and the liveness
//! sweep.
//!
//! [`run`] takes bound sockets and a shutdown future (the mini-redis pattern), so tests bind port 0
//! and stop the controller cleanly.

use crate::store::RegistryEvent;
use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use shoal_overlay::{pki, send_msg, tls, FrameReader};
use shoal_proto::{
    AgentMsg, ControllerMsg, Enrolled, HealthReport, JoinToken, NodeId, RejectCode, Renewed,
    UnixMillis, SUPPORTED,
};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::{
    api::admin::{self, AdminConf, ADMIN_CONF_FILE},
    drives::hub::DriveHub,
    overlay::hub::{self, OverlayHub},
    registry::ca::Ca,
    store::{CertRecord, EnrolError, EnrolParams, EventKind, NodeStatus, Store},
};
use shoal_controller_core::drives::fleet::FleetDrivesConfig;
use shoal_controller_core::enrolment::CertVerdict;
use shoal_controller_core::liveness::{Liveness, Transition};
use shoal_controller_core::session::{Action, CloseKind, Session, SessionConfig};

/// QUIC application close codes.
pub mod close_code {
    /// Normal end (enrolment finished, shutdown).
    pub const DONE: u32 = 0;
    /// The agent broke the protocol (bad frame, wrong order) or its request was refused.
    pub const PROTOCOL: u32 = 1;
    /// The node was removed or its certificate is not accepted.
    pub const REVOKED: u32 = 2;
    /// A newer connection from the same node replaced this one.
    pub const REPLACED: u32 = 3;
    /// The controller is at a connection limit, or this connection did not read what it was sent;
    /// retry later.
    pub const BUSY: u32 = 4;
}

/// How the controller runs. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Data directory: store, CA, admin.conf. No default: required.
    pub data_dir: PathBuf,
    /// Interval at which agents send health reports (default 10 s).
    pub heartbeat_interval: Duration,
    /// Missed heartbeats before a node is down (default 3).
    pub down_after: u32,
    /// Lifetime of node certificates; agents renew at two thirds (default 24 h).
    pub cert_ttl: Duration,
    /// Time an agent has to send Hello after connecting (default 10 s).
    pub hello_timeout: Duration,
    /// How often live state (last seen, health) is written to the store (default 30 s).
    pub checkpoint_interval: Duration,
    /// Subnet of the `default` overlay network, used when it is created on first start; later
    /// starts keep the stored one (default 10.90.0.0/16).
    pub overlay_subnet: crate::overlay::networks::Subnet,
    /// TAP MTU of the `default` overlay network, and of new networks created without one (default
    /// 1380).
    pub overlay_mtu: u16,
    /// How long an agent may use its cached netmap without hearing from the controller (default 24
    /// h).
    pub netmap_validity: Duration,
    /// Second UDP address agents measure their NAT's mapping against (default: the agents' port
    /// plus one, on the same IP; a random port if that is taken).
    pub probe_listen: Option<SocketAddr>,
    /// Netboot servers and the image store (default: servers off, no trusted image key).
    pub netboot: crate::netboot::NetbootConfig,
    /// SMART verdict thresholds and how much SMART history is kept (default:
    /// [`FleetDrivesConfig::default`]: 60 °C, 90 % NVMe wear, 10 % spare; 7 days, at most 2016
    /// samples per drive).
    pub drives: FleetDrivesConfig,
    /// How long `drives prepare` waits for the agent's answer (default 10 min).
    pub drive_prepare_timeout: Duration,
    /// How long `drives test` waits for the agent to start the self-test (default 60 s).
    pub drive_self_test_timeout: Duration,
    /// How often the rollout driver polls unfinished rollouts when nothing wakes it (default 5 s).
    pub rollout_tick: Duration,
    /// The rollout driver's clock (default: the wall clock). A test hook: see
    /// [`crate::maintenance::RolloutClock`].
    pub rollout_clock: crate::maintenance::RolloutClock,
    /// Trusted agent release keys (files with 64 hex characters, `--release-key`); uploads signed
    /// by none of them are refused. Default none: no release can be added.
    pub release_keys: Vec<PathBuf>,
    /// QUIC handshakes in progress at once; further connection attempts are refused (default 1024).
    pub max_handshakes: usize,
    /// Handshakes in progress above which a client whose address is not validated yet must first
    /// answer a QUIC Retry (default 64): a flood from spoofed addresses then costs nothing.
    pub retry_above: usize,
    /// Unauthenticated (enrolment) connections open at once; further ones are closed at once and
    /// the agent retries (default 256). Authenticated nodes are not counted.
    pub max_unauthenticated: usize,
    /// Of those, how many one remote address may hold (default 32): one machine cannot take every
    /// enrolment slot. Nodes behind one NAT share an address; raise it for large NATed sites.
    pub max_unauthenticated_per_address: usize,
    /// How long an unauthenticated connection may stay open in all (default 30 s).
    pub enrolment_deadline: Duration,
    /// How long one write to an agent may take before the agent counts as not reading (default 30
    /// s).
    pub send_timeout: Duration,
    /// Messages queued for one connection before its agent counts as not reading (default
    /// [`crate::connections::queue::NODE_QUEUE_CAPACITY`]).
    pub node_queue_capacity: usize,
}

impl ControllerConfig {
    /// Defaults for a data dir, with the small overlay subnet the unit tests use.
    #[cfg(test)]
    pub(crate) fn for_tests(data_dir: PathBuf) -> Self {
        let mut config = ControllerConfig::new(data_dir);
        config.overlay_subnet = "10.70.0.0/24".parse().expect("subnet");
        config
    }

    /// Defaults for a data dir.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            heartbeat_interval: Duration::from_secs(10),
            down_after: 3,
            cert_ttl: Duration::from_secs(24 * 3600),
            hello_timeout: Duration::from_secs(10),
            checkpoint_interval: Duration::from_secs(30),
            overlay_subnet: crate::overlay::networks::DEFAULT_OVERLAY_SUBNET,
            overlay_mtu: crate::overlay::networks::DEFAULT_OVERLAY_MTU,
            netmap_validity: Duration::from_secs(24 * 3600),
            probe_listen: None,
            netboot: crate::netboot::NetbootConfig::default(),
            drives: FleetDrivesConfig::default(),
            drive_prepare_timeout: crate::drives::hub::DEFAULT_PREPARE_TIMEOUT,
            drive_self_test_timeout: crate::drives::hub::DEFAULT_SELF_TEST_TIMEOUT,
            rollout_tick: Duration::from_secs(5),
            rollout_clock: crate::maintenance::RolloutClock::default(),
            release_keys: Vec::new(),
            max_handshakes: 1024,
            retry_above: 64,
            max_unauthenticated: 256,
            max_unauthenticated_per_address: 32,
            enrolment_deadline: Duration::from_secs(30),
            send_timeout: Duration::from_secs(30),
            node_queue_capacity: crate::connections::queue::NODE_QUEUE_CAPACITY,
        }
    }
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The data dir is unusable.
    #[error("data dir {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The CA could not be loaded or created.
    #[error(transparent)]
    Ca(#[from] crate::registry::ca::CaError),
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The admin credential file could not be handled.
    #[error(transparent)]
    AdminConf(#[from] admin::AdminConfError),
    /// A socket failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// Netboot (image store, netboot interface) could not start.
    #[error(transparent)]
    Netboot(#[from] crate::netboot::NetbootError),
    /// The release store or a release key could not be opened.
    #[error("agent releases: {0}")]
    Releases(String),
}

/// Wall-clock now.
pub fn now_ms() -> UnixMillis {
    UnixMillis(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

pub use shoal_api::refusals::ConnCounters;

#[derive(Debug, Default)]
pub(crate) struct ConnStats {
    retried: std::sync::atomic::AtomicU64,
    handshakes_refused: std::sync::atomic::AtomicU64,
    unauthenticated_refused: std::sync::atomic::AtomicU64,
    enrolment_timeouts: std::sync::atomic::AtomicU64,
    slow_consumers: std::sync::atomic::AtomicU64,
}

fn bump(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

impl ConnStats {
    pub(crate) fn snapshot(&self) -> ConnCounters {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        ConnCounters {
            retried: get(&self.retried),
            handshakes_refused: get(&self.handshakes_refused),
            unauthenticated_refused: get(&self.unauthenticated_refused),
            enrolment_timeouts: get(&self.enrolment_timeouts),
            slow_consumers: get(&self.slow_consumers),
        }
    }
}

/// One unauthenticated connection's share of its address's allowance; given back on drop. The map
/// holds only addresses with connections open, so it is bounded by the overall cap.
struct PerAddressSlot {
    controller: Arc<Controller>,
    ip: IpAddr,
}

impl PerAddressSlot {
    fn take(controller: &Arc<Controller>, ip: IpAddr, max: usize) -> Option<PerAddressSlot> {
        let mut counts = controller
            .unauthenticated_by_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PerAddressSlot {
            controller: controller.clone(),
            ip,
        })
    }
}

impl Drop for PerAddressSlot {
    fn drop(&mut self) {
        let mut counts = self
            .controller
            .unauthenticated_by_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// What the controller holds in memory about a node between checkpoints.
#[derive(Debug, Default, Clone)]
pub(crate) struct LiveNode {
    pub last_seen: Option<UnixMillis>,
    pub health: Option<HealthReport>,
    pub dirty: bool,
}

/// Why another task ends a node's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Revoke {
    /// A newer connection that proved the node's key replaced this one.
    Replaced,
    /// The node was removed from the fleet (the agent forgets its certificate and stops).
    Removed(String),
    /// The certificate this connection presented is no longer accepted (its serial was revoked).
    CertificateRefused(String),
}

/// A node's open control connection, as other tasks (the API, other connections) reach it.
#[derive(Debug)]
pub(crate) struct ConnHandle {
    pub conn_id: u64,
    /// Ends the connection.
    pub revoke: mpsc::UnboundedSender<Revoke>,
    /// The serial of the certificate the connection presented (normalised hex).
    pub serial: String,
    /// The agent acknowledged a reboot: the session is ending, so it no longer holds the node's
    /// identity against the node's own re-enrolment after the reboot.
    pub leaving: bool,
    /// Queues a message to the agent; the connection's task sends it in order.
    pub tx: crate::connections::queue::NodeTx,
    /// The negotiated protocol version, once the agent's Hello was accepted. Nothing newer than it
    /// is ever queued: v1/v2 agents get no v3 messages.
    pub protocol: Option<u16>,
    /// The drive policy last sent on this connection (v3).
    pub drive_policy: Option<shoal_proto::DrivePolicy>,
    /// The agent's latest boot report on this connection (v4): what it booted and its health
    /// checks. Kept with the connection, so it is always about the boot that is connected now.
    pub boot: Option<shoal_proto::BootReport>,
}

#[derive(Debug)]
pub(crate) struct LiveState {
    pub liveness: Liveness,
    pub nodes: HashMap<NodeId, LiveNode>,
    pub(crate) conns: HashMap<NodeId, ConnHandle>,
    next_conn_id: u64,
}

/// Shared controller state, used by the agent endpoint and the admin API.
#[derive(Debug)]
pub struct Controller {
    pub(crate) store: Store,
    pub(crate) ca: Ca,
    pub(crate) config: ControllerConfig,
    pub(crate) live: Mutex<LiveState>,
    pub(crate) admin_token_sha256: [u8; 32],
    /// The overlay coordinator, relay and path reports.
    pub(crate) overlay: Arc<OverlayHub>,
    /// Drive reports, SMART history and verdicts, drive policies and commands.
    pub(crate) drives: DriveHub,
    pub(crate) netboot: crate::netboot::Netboot,
    /// Windows, budgets, rollouts.
    pub(crate) maint: crate::maintenance::Maintenance,
    /// Signed agent releases.
    pub(crate) releases: crate::releases::store::ReleaseStore,
    /// The latest agent update facts per node (see `agent_updates`).
    pub(crate) agent_updates: Mutex<HashMap<NodeId, crate::releases::updates::AgentUpdate>>,
    pub(crate) update_notices:
        tokio::sync::broadcast::Sender<crate::releases::updates::UpdateNotice>,
    /// What the connection limits refused.
    pub(crate) conn_stats: ConnStats,
    /// Unauthenticated connections open per remote address.
    unauthenticated_by_address: Mutex<HashMap<IpAddr, usize>>,
    /// Liveness changes go through one worker so they reach the store in the order they happened.
    transitions: mpsc::UnboundedSender<Vec<Transition>>,
    transitions_rx: Mutex<Option<mpsc::UnboundedReceiver<Vec<Transition>>>>,
}

const ADMIN_TOKEN_META: &str = "admin_token_sha256";
const RESET_KEY_META: &str = "quic_stateless_reset_key";

impl Controller {
    /// Opens the data dir: store, CA, admin credential.
    pub fn open(
        config: ControllerConfig,
        api_addr: SocketAddr,
    ) -> Result<Arc<Controller>, ServeError> {
        // 0700, and tightened at every start: the store, the CA key and admin.conf are the
        // controller's alone.
        shoal_overlay::pki::ensure_private_dir(&config.data_dir)
            .map_err(|e| ServeError::DataDir(config.data_dir.clone(), e))?;
        let store = Store::open(&config.data_dir.join("store"))?;
        store.ensure_default_network(config.overlay_subnet, config.overlay_mtu)?;
        let overlay = Arc::new(OverlayHub::open(&store, config.netmap_validity)?);
        let drives = DriveHub::open(&store, config.drives)?;
        let maint = crate::maintenance::Maintenance::open(&store, config.rollout_clock.clone())?;
        let ca = Ca::load_or_create(&config.data_dir)?;
        let admin_token_sha256 = ensure_admin_conf(&config, &store, &ca, api_addr)?;
        let mut liveness = Liveness::new(config.heartbeat_interval, config.down_after);
        let mut nodes = HashMap::new();
        let start = Instant::now();
        for n in store.nodes()? {
            if n.status == NodeStatus::Up {
                liveness.assume_up(n.id.clone(), start);
            }
            nodes.insert(
                n.id.clone(),
                LiveNode {
                    last_seen: n.last_seen,
                    health: n.health.clone(),
                    dirty: false,
                },
            );
        }
        let netboot =
            crate::netboot::Netboot::open(config.netboot.clone(), &config.data_dir, &store)?;
        let release_keys = config
            .release_keys
            .iter()
            .map(|p| {
                crate::netboot::images::read_key(p).map_err(|e| ServeError::Releases(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let releases = crate::releases::store::ReleaseStore::open(
            config.data_dir.join("releases"),
            release_keys,
        )
        .map_err(|e| ServeError::Releases(e.to_string()))?;
        let (transitions, transitions_rx) = mpsc::unbounded_channel();
        let controller = Arc::new(Controller {
            releases,
            agent_updates: Mutex::new(HashMap::new()),
            update_notices: tokio::sync::broadcast::channel(256).0,
            conn_stats: ConnStats::default(),
            unauthenticated_by_address: Mutex::new(HashMap::new()),
            netboot,
            transitions,
            transitions_rx: Mutex::new(Some(transitions_rx)),
            store,
            ca,
            config,
            live: Mutex::new(LiveState {
                liveness,
                nodes,
                conns: HashMap::new(),
                next_conn_id: 0,
            }),
            admin_token_sha256,
            overlay,
            drives,
            maint,
        });
        controller.install_agent_upgrader();
        controller.install_agent_rebooter();
        controller.install_action_runner();
        Ok(controller)
    }

    /// The QUIC stateless-reset key, kept in the store: after a restart the controller can still
    /// reset its predecessor's connections, so agents notice at their next packet instead of after
    /// the idle timeout.
    fn reset_key(&self) -> Result<ring::hmac::Key, crate::store::StoreError> {
        let secret = match self.store.get_meta(RESET_KEY_META)? {
            Some(k) if k.len() == 32 => k,
            _ => {
                let k = rand::random::<[u8; 32]>().to_vec();
                self.store.put_meta(RESET_KEY_META, &k)?;
                k
            }
        };
        Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret))
    }

    pub(crate) fn live(&self) -> std::sync::MutexGuard<'_, LiveState> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // more than losing the controller: recover the guard.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a node currently has an open control connection.
    pub(crate) fn is_connected(&self, id: &NodeId) -> bool {
        self.live().conns.contains_key(id)
    }

    /// Removes a node: store, liveness, and its open connection at once.
    pub fn remove_node(&self, id: &NodeId) -> Result<bool, crate::store::StoreError> {
        let removed = self.store.remove_node(id, now_ms())?;
        if removed.is_some() {
            // A failure here leaves memberships that the next start drops (ensure_default_network).
            match self.store.leave_all_networks(id) {
                Ok(changes) => self.membership_changed(changes),
                Err(e) => {
                    warn!(node = %id, cause = %e, "could not drop the removed node's overlay memberships")
                }
            }
            self.overlay.forget(id);
            if let Err(e) = self.drives.forget(id) {
                warn!(node = %id, cause = %e, "could not drop the removed node's drive records; the next start drops them");
            }
        }
        let mut live = self.live();
        live.liveness.forget(id);
        live.nodes.remove(id);
        if let Some(conn) = live.conns.remove(id) {
            let _ = conn.revoke.send(Revoke::Removed(
                "removed from the fleet by an operator".into(),
            ));
        }
        if removed.is_some() {
            info!(node = %id, "node removed");
        }
        Ok(removed.is_some())
    }

    fn apply_transitions(&self, transitions: Vec<Transition>) {
        for t in transitions {
            let id = t.node();
            let (status, kind) = match t {
                Transition::Up(_) => (NodeStatus::Up, EventKind::Registry(RegistryEvent::Up)),
                Transition::Down(_) => (NodeStatus::Down, EventKind::Registry(RegistryEvent::Down)),
            };
            let last_seen = self.live().nodes.get(id).and_then(|n| n.last_seen);
            let result = self.store.update_node(id, |n| {
                n.status = status;
                if last_seen.is_some() {
                    n.last_seen = last_seen;
                }
            });
            match result {
                Ok(Some(n)) => {
                    let msg = match kind {
                        EventKind::Registry(RegistryEvent::Up) => format!("{} is up", n.hostname),
                        _ => format!(
                            "{} is down: no heartbeat for {:?}",
                            n.hostname,
                            self.live().liveness.window()
                        ),
                    };
                    info!(node = %id, status = ?status, "liveness changed");
                    if let Err(e) = self.store.append_event(kind, Some(id), &msg, now_ms()) {
                        warn!(node = %id, cause = %e, "could not record liveness event");
                    }
                }
                Ok(None) => {}
                Err(e) => warn!(node = %id, cause = %e, "could not record liveness change"),
            }
        }
    }

    /// Writes last-seen times and health reports gathered since the last checkpoint.
    pub fn checkpoint(&self) {
        let dirty: Vec<(NodeId, LiveNode)> = {
            let mut live = self.live();
            live.nodes
                .iter_mut()
                .filter(|(_, n)| n.dirty)
                .map(|(id, n)| {
                    n.dirty = false;
                    (id.clone(), n.clone())
                })
                .collect()
        };
        for (id, n) in dirty {
            if let Err(e) = self.store.update_node(&id, |rec| {
                rec.last_seen = n.last_seen;
                rec.health = n.health;
            }) {
                warn!(node = %id, cause = %e, "checkpoint failed");
            }
        }
    }
}

fn ensure_admin_conf(
    config: &ControllerConfig,
    store: &Store,
    ca: &Ca,
    api_addr: SocketAddr,
) -> Result<[u8; 32], ServeError> {
    let path = config.data_dir.join(ADMIN_CONF_FILE);
    let api_ip = if api_addr.ip().is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        api_addr.ip()
    };
    let api = format!("https://{}", SocketAddr::new(api_ip, api_addr.port()));
    let stored = store
        .get_meta(ADMIN_TOKEN_META)?
        .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok());
    if let (Some(stored), Ok(mut conf)) = (stored, AdminConf::read(&path)) {
        if admin::digest_eq(&pki::sha256(conf.token.as_bytes()), &stored) {
            if conf.api != api || conf.ca != ca.cert_pem() {
                conf.api = api;
                conf.ca = ca.cert_pem();
                admin::write_admin_conf(&path, &conf)?;
            }
            return Ok(stored);
        }
    }
    // First start, or the operator deleted admin.conf to get a fresh credential: the old token
    // stops working.
    let token = admin::new_admin_token();
    let hash = pki::sha256(token.as_bytes());
    store.put_meta(ADMIN_TOKEN_META, &hash)?;
    let conf = AdminConf {
        api,
        token,
        ca: ca.cert_pem(),
    };
    admin::write_admin_conf(&path, &conf)?;
    info!(path = %path.display(), "wrote admin credentials");
    Ok(hash)
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    controller: Arc<Controller>,
    quic_socket: std::net::UdpSocket,
    api_listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let quic_addr = quic_socket.local_addr()?;
    enlarge_socket_buffers(&quic_socket);
    let api_addr = api_listener.local_addr()?;
    let (chain, key) = controller
        .ca
        .issue_server_cert(&[pki::CONTROLLER_SERVER_NAME.to_owned()], &[])?;
    let server_config = tls::controller_server_config(controller.ca.cert_der(), chain, key)?;
    let reset_key = controller.reset_key()?;
    // Connection ids must validate after a restart too, or the new process drops the old
    // connections' packets silently instead of resetting them: derive the id generator's key from
    // the same secret.
    let tag = ring::hmac::sign(&reset_key, b"shoal connection id key");
    let cid_key = u64::from_be_bytes(tag.as_ref()[..8].try_into().unwrap_or([0; 8]));
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(server_config.clone()),
        quic_socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let probe = bind_probe(&controller, quic_addr, server_config);
    let api = crate::api::serve(controller.clone(), api_listener)?;
    let netboot = crate::netboot::serve(controller.clone(), quic_addr.port()).await?;
    info!(quic = %quic_addr, api = %api_addr, ca = %hex::encode(controller.ca.sha256()), "controller running");

    let sweeper = tokio::spawn(sweep(controller.clone()));
    let rollouts = tokio::spawn(crate::maintenance::run_driver(
        controller.clone(),
        controller.config.rollout_tick,
    ));
    let agent_notices = tokio::spawn(crate::maintenance::agent::forward_agent_updates(
        controller.clone(),
    ));
    let recorder = controller
        .transitions_rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .map(|rx| tokio::spawn(record_transitions(controller.clone(), rx)));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(
        controller.config.max_handshakes,
    ));
    let unauthenticated = Arc::new(tokio::sync::Semaphore::new(
        controller.config.max_unauthenticated,
    ));
    let accept = async {
        while let Some(incoming) = endpoint.accept().await {
            let in_flight = controller.config.max_handshakes - handshakes.available_permits();
            if in_flight >= controller.config.retry_above
                && !incoming.remote_address_validated()
                && incoming.may_retry()
            {
                debug!(remote = %incoming.remote_address(), in_flight, "under load: address validation (Retry) first");
                bump(&controller.conn_stats.retried);
                let _ = incoming.retry();
                continue;
            }
            let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
                debug!(remote = %incoming.remote_address(), "handshake limit reached: connection refused");
                bump(&controller.conn_stats.handshakes_refused);
                incoming.refuse();
                continue;
            };
            let controller = controller.clone();
            let unauthenticated = unauthenticated.clone();
            let remote = incoming.remote_address();
            tokio::spawn(
                async move {
                    if let Err(e) =
                        handle_connection(controller, incoming, handshake, unauthenticated).await
                    {
                        debug!(cause = %e, "connection ended with error");
                    }
                }
                .instrument(info_span!("agent", %remote)),
            );
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = shutdown => info!("shutting down"),
    }
    sweeper.abort();
    rollouts.abort();
    agent_notices.abort();
    if let Some((probe_endpoint, task)) = probe {
        probe_endpoint.close(close_code::DONE.into(), b"controller shutting down");
        task.abort();
    }
    if let Some(n) = netboot {
        n.stop();
    }
    if let Some(r) = recorder {
        r.abort();
    }
    endpoint.close(close_code::DONE.into(), b"controller shutting down");
    api.graceful_shutdown(Some(Duration::from_secs(2)));
    controller.checkpoint();
    controller.store.flush()?;
    // Give the close frames a moment to leave so agents reconnect promptly instead of timing out.
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(())
}

/// Binds the NAT probe port (see [`overlay_hub::serve_probe`]); without one agents report their NAT
/// mapping as unknown, which only costs them the faster choice of the relay for symmetric NATs.
fn bind_probe(
    controller: &Arc<Controller>,
    quic_addr: SocketAddr,
    server_config: quinn::ServerConfig,
) -> Option<(quinn::Endpoint, tokio::task::JoinHandle<()>)> {
    let wanted = controller
        .config
        .probe_listen
        .unwrap_or_else(|| hub::default_probe_addr(quic_addr));
    let socket = std::net::UdpSocket::bind(wanted)
        .or_else(|e| {
            if controller.config.probe_listen.is_some() {
                return Err(e);
            }
            std::net::UdpSocket::bind(SocketAddr::new(quic_addr.ip(), 0))
        })
        .and_then(|s| {
            quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                Some(server_config),
                s,
                Arc::new(quinn::TokioRuntime),
            )
        });
    match socket {
        Ok(endpoint) => {
            let port = endpoint.local_addr().ok().map(|a| a.port());
            info!(port = ?port, "NAT probe port listening");
            controller.overlay.set_probe_port(port);
            let task = tokio::spawn(hub::serve_probe(endpoint.clone()));
            Some((endpoint, task))
        }
        Err(e) => {
            warn!(addr = %wanted, cause = %e, "no NAT probe port; agents will not learn their NAT's mapping behaviour");
            controller.overlay.set_probe_port(None);
            None
        }
    }
}

/// Kernel buffer asked for the agents' UDP socket, each way. Every agent's packets arrive on this
/// one socket: with the default (about 208 KiB, some 90 full-size datagrams on loopback) a burst of
/// handshakes (a thousand agents enrolling, or reconnecting after a controller restart) overflows
/// it, the kernel drops Initial packets, and each handshake waits for a retransmission timeout.
/// Linux caps the value at `net.core.rmem_max` / `wmem_max`.
const QUIC_SOCKET_BUFFER: usize = 8 << 20;

fn enlarge_socket_buffers(socket: &std::net::UdpSocket) {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    if let Err(e) = setsockopt(socket, sockopt::RcvBuf, &QUIC_SOCKET_BUFFER) {
        warn!(cause = %e, "could not enlarge the UDP receive buffer");
    }
    if let Err(e) = setsockopt(socket, sockopt::SndBuf, &QUIC_SOCKET_BUFFER) {
        warn!(cause = %e, "could not enlarge the UDP send buffer");
    }
    debug!(
        rcvbuf = ?getsockopt(socket, sockopt::RcvBuf),
        sndbuf = ?getsockopt(socket, sockopt::SndBuf),
        "QUIC socket buffers"
    );
}

async fn record_transitions(
    controller: Arc<Controller>,
    mut rx: mpsc::UnboundedReceiver<Vec<Transition>>,
) {
    while let Some(batch) = rx.recv().await {
        let c = controller.clone();
        let _ = tokio::task::spawn_blocking(move || c.apply_transitions(batch)).await;
    }
}

async fn sweep(controller: Arc<Controller>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_checkpoint = Instant::now();
    let mut last_prune: Option<Instant> = None;
    loop {
        tick.tick().await;
        if last_prune.is_none_or(|t| t.elapsed() >= crate::registry::identity::PRUNE_INTERVAL) {
            last_prune = Some(Instant::now());
            let c = controller.clone();
            match tokio::task::spawn_blocking(move || {
                // A flood of events that stopped gets its summary within a minute, not at the next
                // event.
                if let Err(e) = c.store.flush_suppressed_events(now_ms()) {
                    warn!(cause = %e, "could not write the summaries of suppressed events");
                }
                c.store.prune(now_ms())
            })
            .await
            {
                Ok(Ok(p)) if p != crate::store::Pruned::default() => {
                    debug!(pruned = ?p, "pruned lapsed tokens and identity records")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    warn!(cause = %e, "pruning lapsed tokens failed; next try in a minute")
                }
                Err(e) => warn!(cause = %e, "pruning task failed"),
            }
        }
        let transitions = controller.live().liveness.poll(Instant::now());
        if !transitions.is_empty() {
            let _ = controller.transitions.send(transitions);
        }
        if last_checkpoint.elapsed() >= controller.config.checkpoint_interval {
            last_checkpoint = Instant::now();
            let c = controller.clone();
            let _ = tokio::task::spawn_blocking(move || c.checkpoint()).await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("handshake: {0}")]
    Connect(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Transport(#[from] shoal_overlay::TransportError),
    #[error("no control stream within the hello timeout")]
    HelloTimeout,
    #[error("enrolment did not finish within its deadline")]
    EnrolmentTimeout,
    #[error("the agent did not read what it was sent")]
    SlowConsumer,
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

async fn handle_connection(
    controller: Arc<Controller>,
    incoming: quinn::Incoming,
    handshake: tokio::sync::OwnedSemaphorePermit,
    unauthenticated: Arc<tokio::sync::Semaphore>,
) -> Result<(), ConnError> {
    let conn = incoming.await?;
    drop(handshake);
    let remote = conn.remote_address().to_string();
    let cert =
        match tls::peer_chain(&conn).and_then(|chain| chain.first().map(|c| pki::cert_info(c))) {
            None => None,
            Some(Ok(info)) => Some(info),
            Some(Err(e)) => {
                conn.close(
                    close_code::REVOKED.into(),
                    format!("unusable certificate: {e}").as_bytes(),
                );
                return Ok(());
            }
        };
    let node = cert.as_ref().map(|c| c.node_id.clone());
    // Enrolments are counted and bounded in time; a node that proved its key is not.
    let _unauthenticated = match &cert {
        Some(_) => None,
        None => {
            let ip = conn.remote_address().ip();
            let slot = unauthenticated.try_acquire_owned().ok().and_then(|permit| {
                PerAddressSlot::take(
                    &controller,
                    ip,
                    controller.config.max_unauthenticated_per_address,
                )
                .map(|slot| (permit, slot))
            });
            if slot.is_none() {
                debug!(%remote, "too many unauthenticated connections (overall or from this address): closed at once");
                bump(&controller.conn_stats.unauthenticated_refused);
                conn.close(
                    close_code::BUSY.into(),
                    b"too many enrolments in progress; retry later",
                );
                return Ok(());
            }
            slot
        }
    };
    let enrolment_deadline = tokio::time::Instant::now() + controller.config.enrolment_deadline;
    // One deadline for the stream and the Hello on it together.
    let hello_deadline = tokio::time::Instant::now() + controller.config.hello_timeout;
    let (mut send, recv) = match tokio::time::timeout_at(hello_deadline, conn.accept_bi()).await {
        Ok(r) => r?,
        Err(_) => {
            conn.close(close_code::PROTOCOL.into(), b"no control stream");
            return Err(ConnError::HelloTimeout);
        }
    };
    // Read with a FrameReader: the connection loop select!s over the read and other wake-ups, and a
    // plain recv_msg would lose the part of a frame it had read when another branch won.
    let mut recv = FrameReader::new(recv);
    let mut session = Session::new(
        SessionConfig {
            supported: SUPPORTED,
            heartbeat_interval_ms: controller.config.heartbeat_interval.as_millis() as u64,
        },
        node.clone(),
    );

    let (revoke_tx, mut revoke_rx) = mpsc::unbounded_channel();
    let (overlay_tx, mut overlay_rx) =
        crate::connections::queue::node_queue(controller.config.node_queue_capacity);
    let mut conn_id = None;
    let mut must_rotate = false;
    if let Some(info) = &cert {
        let id = &info.node_id;
        // The certificate chains to the fleet CA and TLS proved its key; it must also be the key
        // the node is bound to, with a serial nobody revoked. Checked before the connection is
        // registered: a connection never displaces the node's live one before it has proven the
        // node's key.
        let c = controller.clone();
        let (node_id, key, serial, remote_text) = (
            id.clone(),
            info.key_sha256,
            info.serial.clone(),
            remote.clone(),
        );
        let not_after = UnixMillis((info.not_after_unix.max(0) as u64).saturating_mul(1000));
        let verdict = tokio::task::spawn_blocking(move || {
            c.store
                .check_connection(&node_id, &key, &serial, not_after, now_ms(), &remote_text)
        })
        .await
        .map_err(|e| ConnError::Store(crate::store::StoreError::Db(e.to_string())))??;
        let refusal = match verdict {
            CertVerdict::Accept { identity, .. } => {
                must_rotate = identity.must_rotate;
                None
            }
            CertVerdict::Removed => Some((RejectCode::NodeRevoked, format!("node {id} was removed from the fleet"))),
            CertVerdict::Revoked => Some((
                RejectCode::CertificateRefused,
                format!("certificate {} of node {id} was revoked by an operator", info.serial),
            )),
            CertVerdict::WrongKey => Some((
                RejectCode::CertificateRefused,
                format!("this certificate's key is not the key node {id} is bound to (re-enrolled elsewhere, or a copied certificate)"),
            )),
        };
        if let Some((code, message)) = refusal {
            info!(node = %id, %remote, ?code, %message, "refused a node certificate");
            refuse_after_hello(
                &conn,
                &mut send,
                &mut recv,
                &mut session,
                hello_deadline,
                code,
                message,
            )
            .await;
            return Ok(());
        }
        let cid = {
            let mut live = controller.live();
            live.next_conn_id += 1;
            let cid = live.next_conn_id;
            let handle = ConnHandle {
                conn_id: cid,
                revoke: revoke_tx,
                tx: overlay_tx.clone(),
                serial: crate::store::normal_serial(&info.serial),
                leaving: false,
                protocol: None,
                drive_policy: None,
                boot: None,
            };
            if let Some(old) = live.conns.insert(id.clone(), handle) {
                debug!(node = %id, old = old.conn_id, "replacing older connection");
                let _ = old.revoke.send(Revoke::Replaced);
            }
            cid
        };
        conn_id = Some(cid);
        // A removal that landed between the check and the registration did not find this connection
        // to revoke: look once more now that it is registered.
        let c = controller.clone();
        let lookup = id.clone();
        let exists = tokio::task::spawn_blocking(move || c.store.node(&lookup))
            .await
            .ok()
            .transpose()?
            .flatten()
            .is_some();
        if !exists {
            forget_connection(&controller, id, cid);
            let message = format!("node {id} was removed from the fleet");
            refuse_after_hello(
                &conn,
                &mut send,
                &mut recv,
                &mut session,
                hello_deadline,
                RejectCode::NodeRevoked,
                message,
            )
            .await;
            info!(node = %id, "refused a removed node");
            return Ok(());
        }
    }

    let mut ctx = ConnCtx {
        conn: conn.clone(),
        conn_id: conn_id.unwrap_or(0),
        node_key: cert.as_ref().map(|c| c.key_sha256),
        cert_der: tls::peer_chain(&conn).and_then(|chain| chain.first().map(|c| c.to_vec())),
        must_rotate,
        remote,
        overlay_tx,
        relay: None,
    };
    let driven = drive(
        &controller,
        &mut ctx,
        &mut send,
        &mut recv,
        &mut session,
        &mut revoke_rx,
        &mut overlay_rx,
        hello_deadline,
    );
    let result = if cert.is_some() {
        driven.await
    } else {
        match tokio::time::timeout_at(enrolment_deadline, driven).await {
            Ok(r) => r,
            Err(_) => {
                bump(&controller.conn_stats.enrolment_timeouts);
                conn.close(close_code::PROTOCOL.into(), b"enrolment took too long");
                Err(ConnError::EnrolmentTimeout)
            }
        }
    };
    if let Some(relay) = ctx.relay.take() {
        relay.abort();
    }
    if matches!(result, Err(ConnError::SlowConsumer)) {
        bump(&controller.conn_stats.slow_consumers);
    }
    if let (Some(id), Some(cid)) = (&node, conn_id) {
        controller.overlay.disconnected(id, cid);
        forget_connection(&controller, id, cid);
        // After forgetting it: a command sent from now on finds no connection and fails at once.
        controller.drives.connection_closed(id, cid);
    }
    result
}

/// Refuses a connection with `code` once its Hello has said which protocol it speaks, so the agent
/// gets a code it knows (older agents get the nearest older code); without a Hello in time, just
/// closes.
async fn refuse_after_hello(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut FrameReader,
    session: &mut Session,
    hello_deadline: tokio::time::Instant,
    code: RejectCode,
    message: String,
) {
    let protocol = match tokio::time::timeout_at(hello_deadline, recv.recv::<AgentMsg>()).await {
        Ok(Ok(Some(AgentMsg::Hello(hello)))) => {
            shoal_proto::negotiate(SUPPORTED, hello.protocol).unwrap_or(hello.protocol.max)
        }
        _ => {
            conn.close(close_code::PROTOCOL.into(), message.as_bytes());
            return;
        }
    };
    for action in session.refused(code.for_protocol(protocol), message) {
        if !matches!(
            apply(
                conn,
                send,
                action,
                REFUSAL_SEND_TIMEOUT,
                &tokio::sync::Notify::new()
            )
            .await,
            Ok(false)
        ) {
            break;
        }
    }
}

#[cfg(test)]
impl Controller {
    /// Registers a connection without QUIC, as a v`protocol` agent after its Hello; returns its id
    /// and the queue of what the controller sends it.
    pub(crate) fn fake_connection(
        &self,
        node: &NodeId,
        protocol: u16,
    ) -> (u64, crate::connections::queue::NodeRx) {
        let (tx, rx) =
            crate::connections::queue::node_queue(crate::connections::queue::NODE_QUEUE_CAPACITY);
        let (revoke, _) = mpsc::unbounded_channel();
        let mut live = self.live();
        live.next_conn_id += 1;
        let conn_id = live.next_conn_id;
        live.conns.insert(
            node.clone(),
            ConnHandle {
                conn_id,
                revoke,
                tx,
                serial: String::new(),
                leaving: false,
                protocol: Some(protocol),
                drive_policy: None,
                boot: None,
            },
        );
        (conn_id, rx)
    }

    /// Ends a connection registered by [`Controller::fake_connection`] the way a real one ends.
    pub(crate) fn end_fake_connection(&self, node: &NodeId, conn_id: u64) {
        forget_connection(self, node, conn_id);
        self.drives.connection_closed(node, conn_id);
    }
}

/// Drops a node's connection handle, unless a newer connection has replaced it.
fn forget_connection(controller: &Controller, id: &NodeId, conn_id: u64) {
    let mut live = controller.live();
    if live.conns.get(id).map(|c| c.conn_id) == Some(conn_id) {
        live.conns.remove(id);
    }
}

/// What a connection's actions need besides the session.
struct ConnCtx {
    conn: quinn::Connection,
    conn_id: u64,
    /// SHA-256 of the node certificate's public key.
    node_key: Option<[u8; 32]>,
    /// The node certificate the connection presented (DER): its key signs key rotations.
    cert_der: Option<Vec<u8>>,
    /// A certificate of the node's key was revoked: ask the agent to rotate once its Hello is in.
    must_rotate: bool,
    /// The peer's address, for the operator.
    remote: String,
    /// Netmap deltas, punch requests, drive policies and drive commands for this agent, queued by
    /// other connections and the API.
    overlay_tx: crate::connections::queue::NodeTx,
    /// The task relaying this agent's datagrams, once it joined the overlay.
    relay: Option<tokio::task::JoinHandle<()>>,
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    controller: &Arc<Controller>,
    ctx: &mut ConnCtx,
    send: &mut quinn::SendStream,
    recv: &mut FrameReader,
    session: &mut Session,
    revoke_rx: &mut mpsc::UnboundedReceiver<Revoke>,
    overlay_rx: &mut crate::connections::queue::NodeRx,
    hello_deadline: tokio::time::Instant,
) -> Result<(), ConnError> {
    let conn = ctx.conn.clone();
    let conn = &conn;
    let hello_deadline = tokio::time::sleep_until(hello_deadline);
    tokio::pin!(hello_deadline);
    let overflow = overlay_rx.overflow_signal();
    loop {
        let actions = tokio::select! {
            msg = recv.recv::<AgentMsg>() => match msg {
                Ok(Some(msg)) => session.handle(now_ms(), msg),
                Ok(None) => return Ok(()),
                Err(shoal_overlay::TransportError::Read(_)) => return Ok(()),
                Err(e) => {
                    warn!(node = ?session.node(), cause = %e, "closing connection after a bad frame");
                    conn.close(close_code::PROTOCOL.into(), e.to_string().as_bytes());
                    return Err(e.into());
                }
            },
            reason = revoke_rx.recv() => match reason {
                Some(Revoke::Replaced) => {
                    conn.close(close_code::REPLACED.into(), b"replaced by a newer connection");
                    return Ok(());
                }
                Some(Revoke::Removed(r)) => session.revoked(&r),
                Some(Revoke::CertificateRefused(r)) => {
                    let code = RejectCode::CertificateRefused.for_protocol(session.version().unwrap_or(1));
                    session.refused(code, r)
                }
                None => return Ok(()),
            },
            _ = &mut hello_deadline, if session.version().is_none() => {
                conn.close(close_code::PROTOCOL.into(), b"no Hello");
                return Err(ConnError::HelloTimeout);
            }
            Some(msg) = overlay_rx.recv() => vec![Action::Send(msg)],
            _ = overflow.notified() => {
                warn!(node = ?session.node(), "closing a connection whose agent does not read what it is sent (queue full)");
                conn.close(close_code::BUSY.into(), b"too many messages queued: the agent does not read");
                return Err(ConnError::SlowConsumer);
            }
            // (v4) Release downloads come on further streams of an authenticated connection.
            stream = conn.accept_bi(), if session.version() >= Some(crate::releases::updates::UPDATE_PROTOCOL) && session.node().is_some() => {
                let Ok((s, r)) = stream else { return Ok(()) };
                if let Some(node) = session.node().cloned() {
                    tokio::spawn(crate::releases::updates::serve_fetch(controller.clone(), node, s, r).in_current_span());
                }
                vec![]
            }
        };
        for action in actions {
            let follow_up = perform(controller, ctx, session, action).await;
            for a in follow_up {
                if apply(conn, send, a, controller.config.send_timeout, &overflow).await? {
                    return Ok(());
                }
            }
        }
    }
}

/// A refusal is the last thing a connection gets: it need not wait long for a reader.
const REFUSAL_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends or closes; returns whether the connection was closed. A write that does not finish within
/// `send_timeout`, or during which the connection's queue overflows, closes the connection.
async fn apply(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    action: Action,
    send_timeout: Duration,
    overflow: &tokio::sync::Notify,
) -> Result<bool, ConnError> {
    match action {
        Action::Send(msg) => {
            let stuck = tokio::select! {
                sent = tokio::time::timeout(send_timeout, send_msg(send, &msg)) => match sent {
                    Ok(sent) => {
                        sent?;
                        None
                    }
                    Err(_) => Some("a write did not finish in time"),
                },
                _ = overflow.notified() => Some("its queue filled while a write waited"),
            };
            if let Some(why) = stuck {
                warn!(%why, "closing a connection whose agent stopped reading");
                conn.close(close_code::BUSY.into(), b"the agent does not read");
                return Err(ConnError::SlowConsumer);
            }
            Ok(false)
        }
        Action::Close(kind, reason) => {
            let code = match kind {
                CloseKind::Done => close_code::DONE,
                CloseKind::Refused => close_code::PROTOCOL,
                CloseKind::Revoked => close_code::REVOKED,
            };
            let _ = send.finish();
            // Let the last message reach the agent before the close frame overtakes it.
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            conn.close(code.into(), reason.as_bytes());
            Ok(true)
        }
        other => {
            warn!(action = ?other, "unexpected action left for the transport");
            Ok(false)
        }
    }
}

/// Performs registry work for an action; returns transport actions (send/close).
async fn perform(
    controller: &Arc<Controller>,
    ctx: &mut ConnCtx,
    session: &mut Session,
    action: Action,
) -> Vec<Action> {
    match action {
        Action::Send(_) | Action::Close(..) => vec![action],
        Action::Enrol { request, hello } => {
            let c = controller.clone();
            let remote = ctx.remote.clone();
            let outcome =
                tokio::task::spawn_blocking(move || enrol(&c, &request, &hello, &remote)).await;
            match outcome {
                Ok(Ok(enrolled)) => session.enrolled(enrolled),
                Ok(Err((code, message))) => {
                    info!(code = ?code, %message, "enrolment refused");
                    session.refused(code.for_protocol(session.version().unwrap_or(1)), message)
                }
                Err(e) => {
                    session.refused(RejectCode::Unavailable, format!("controller error: {e}"))
                }
            }
        }
        Action::Renew(req) => {
            let (Some(node), Some(bound)) = (session.node().cloned(), ctx.node_key) else {
                return vec![];
            };
            // A renewal is for the key this connection proved, which is the node's; a new key needs
            // a rotation signed by the old one.
            match pki::csr_spki(&req.csr_der).map(|spki| pki::sha256(&spki)) {
                Ok(key) if key == bound => {}
                Ok(_) => {
                    return session.refused(
                        RejectCode::BadRequest,
                        "a renewal must be for the node's own key: rotate keys with RotateKey",
                    );
                }
                Err(e) => {
                    return session.refused(
                        RejectCode::BadRequest,
                        format!("invalid certificate signing request: {e}"),
                    )
                }
            }
            let c = controller.clone();
            let n = node.clone();
            match tokio::task::spawn_blocking(move || issue_cert(&c, &req.csr_der, &n, bound)).await
            {
                Ok(Ok((cert_der, not_after))) => {
                    info!(node = %node, "certificate renewed");
                    vec![Action::Send(ControllerMsg::Renewed(Renewed {
                        cert_der,
                        not_after,
                    }))]
                }
                Ok(Err((code, message))) => session.refused(code, message),
                Err(e) => {
                    session.refused(RejectCode::Unavailable, format!("controller error: {e}"))
                }
            }
        }
        Action::RotateKey(req) => {
            let (Some(node), Some(old_cert)) = (session.node().cloned(), ctx.cert_der.clone())
            else {
                return vec![];
            };
            let c = controller.clone();
            let n = node.clone();
            match tokio::task::spawn_blocking(move || rotate_key(&c, &n, &old_cert, &req)).await {
                Ok(Ok((cert_der, not_after))) => {
                    info!(node = %node, "key rotated: certificate issued for the new key");
                    ctx.must_rotate = false;
                    vec![Action::Send(ControllerMsg::Renewed(Renewed {
                        cert_der,
                        not_after,
                    }))]
                }
                Ok(Err((code, message))) => {
                    warn!(node = %node, %message, "key rotation refused");
                    session.refused(code, message)
                }
                Err(e) => {
                    session.refused(RejectCode::Unavailable, format!("controller error: {e}"))
                }
            }
        }
        Action::Connected { hello } => {
            let Some(node) = session.node().cloned() else {
                return vec![];
            };
            let version = hello.agent_version.clone();
            let c = controller.clone();
            let n = node.clone();
            let _ = tokio::task::spawn_blocking(move || {
                c.store.update_node(&n, |rec| {
                    if rec.agent_version != version {
                        rec.agent_version = version;
                    }
                })
            })
            .await;
            info!(node = %node, agent_version = %hello.agent_version, protocol = ?session.version(), "agent connected");
            heartbeat(controller, &node, None);
            let version = session.version();
            if let Some(conn) = controller
                .live()
                .conns
                .get_mut(&node)
                .filter(|c| c.conn_id == ctx.conn_id)
            {
                conn.protocol = version;
            }
            if version.is_some_and(|v| v >= crate::releases::updates::UPDATE_PROTOCOL) {
                let c = controller.clone();
                let n = node.clone();
                let _ = tokio::task::spawn_blocking(move || c.maintenance_reconnected(&n)).await;
            }
            if version.is_some_and(|v| v >= 3) {
                let c = controller.clone();
                let conn_id = ctx.conn_id;
                let n = node.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    c.send_drive_policy_on_connect(&n, conn_id)
                })
                .await;
            }
            if ctx.must_rotate {
                if version >= Some(5) {
                    info!(node = %node, "asking the node to rotate its key");
                    let reason =
                        "a certificate of this node's key was revoked, or an operator asked"
                            .to_owned();
                    return vec![Action::Send(ControllerMsg::RotateKey { reason })];
                }
                warn!(node = %node, "a certificate of this node's key was revoked, but its agent is too old to rotate keys (protocol 5)");
            }
            vec![]
        }
        Action::Inventory(inv) => {
            let Some(node) = session.node().cloned() else {
                return vec![];
            };
            let c = controller.clone();
            let n = node.clone();
            let result = tokio::task::spawn_blocking(move || {
                c.store.update_node(&n, |rec| {
                    if !inv.hostname.is_empty() {
                        rec.hostname = inv.hostname.clone();
                    }
                    rec.inventory = Some(inv);
                    rec.inventory_at = Some(now_ms());
                })
            })
            .await;
            match result {
                Ok(Ok(_)) => debug!(node = %node, "inventory stored"),
                Ok(Err(e)) => warn!(node = %node, cause = %e, "could not store inventory"),
                Err(e) => warn!(node = %node, cause = %e, "inventory task failed"),
            }
            vec![]
        }
        Action::Health(h) => {
            if let Some(node) = session.node().cloned() {
                heartbeat(controller, &node, Some(h));
            }
            vec![]
        }
        Action::Overlay(hello) => {
            let (Some(node), Some(key)) = (session.node().cloned(), ctx.node_key) else {
                return vec![];
            };
            // A node whose key must rotate away (a certificate of it was revoked) is not vouched
            // for to its peers with that key.
            let key = if ctx.must_rotate {
                shoal_proto::KEY_WITHDRAWN
            } else {
                key
            };
            let c = controller.clone();
            let n = node.clone();
            let index = tokio::task::spawn_blocking(move || {
                c.store.set_node_key(&n, key).map_err(|e| e.to_string())?;
                c.store.peer_index(&n).map_err(|e| e.to_string())
            })
            .await;
            let index = match index {
                Ok(Ok(i)) => i,
                Ok(Err(e)) => {
                    warn!(node = %node, cause = %e, "overlay state unavailable; the agent will retry on its next connection");
                    return vec![];
                }
                Err(_) => return vec![],
            };
            let msgs = controller.overlay.hello(
                &node,
                ctx.conn_id,
                &ctx.conn,
                &ctx.overlay_tx,
                index,
                key,
                &hello,
            );
            if ctx.relay.is_none() {
                ctx.relay = Some(tokio::spawn(controller.overlay.clone().relay(
                    node.clone(),
                    index,
                    ctx.conn.clone(),
                )));
                info!(node = %node, index = index.0, observed = %ctx.conn.remote_address(), nat = ?hello.nat, "agent joined the overlay");
            }
            msgs.into_iter().map(Action::Send).collect()
        }
        Action::Paths(report) => {
            if let Some(node) = session.node() {
                controller.overlay.paths_reported(node, report);
            }
            vec![]
        }
        Action::Punch(p) => {
            if let Some(node) = session.node() {
                controller.overlay.punch(node, &p);
            }
            vec![]
        }
        Action::Drives(report) => {
            let Some(node) = session.node().cloned() else {
                return vec![];
            };
            debug!(node = %node, drives = report.drives.len(), "drive report received");
            let c = controller.clone();
            let n = node.clone();
            match tokio::task::spawn_blocking(move || c.drives.ingest(&n, report, now_ms())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    warn!(node = %node, cause = %e, "drive report kept in memory only: the store failed")
                }
                Err(e) => warn!(node = %node, cause = %e, "drive report task failed"),
            }
            vec![]
        }
        Action::DriveCommandResult(result) => {
            if let Some(node) = session.node() {
                controller.drives.command_result(node, result);
            }
            vec![]
        }
        Action::UpdateAck { version } => {
            if let Some(node) = session.node() {
                controller.update_acknowledged(node, version);
            }
            vec![]
        }
        Action::RebootAnswer(answer) => {
            if let Some(node) = session.node().cloned() {
                if answer.is_ok() {
                    // The node's own re-enrolment after the reboot must not be refused as a claim
                    // of a live node while this session winds down.
                    if let Some(conn) = controller
                        .live()
                        .conns
                        .get_mut(&node)
                        .filter(|c| c.conn_id == ctx.conn_id)
                    {
                        conn.leaving = true;
                    }
                }
                let c = controller.clone();
                let _ = tokio::task::spawn_blocking(move || c.reboot_answered(&node, answer)).await;
            }
            vec![]
        }
        Action::MaintenanceResult(result) => {
            if let Some(node) = session.node().cloned() {
                let c = controller.clone();
                let _ =
                    tokio::task::spawn_blocking(move || c.maintenance_result(&node, result)).await;
            }
            vec![]
        }
        Action::UpdateReport(report) => {
            if let Some(node) = session.node().cloned() {
                let c = controller.clone();
                let _ = tokio::task::spawn_blocking(move || c.update_reported(&node, report)).await;
            }
            vec![]
        }
        Action::BootReport(report) => {
            if let Some(node) = session.node().cloned() {
                let c = controller.clone();
                let conn_id = ctx.conn_id;
                let _ =
                    tokio::task::spawn_blocking(move || c.boot_reported(&node, conn_id, report))
                        .await;
            }
            vec![]
        }
    }
}

fn heartbeat(controller: &Arc<Controller>, node: &NodeId, health: Option<HealthReport>) {
    let transition = {
        let mut live = controller.live();
        let entry = live.nodes.entry(node.clone()).or_default();
        entry.last_seen = Some(now_ms());
        entry.dirty = true;
        if health.is_some() {
            entry.health = health;
        }
        live.liveness.heartbeat(node, Instant::now())
    };
    if let Some(t) = transition {
        let _ = controller.transitions.send(vec![t]);
    }
}

/// Issues a certificate for `key`'s CSR and records its serial before it is handed out.
fn issue_cert(
    controller: &Controller,
    csr_der: &[u8],
    node: &NodeId,
    key: [u8; 32],
) -> Result<(Vec<u8>, UnixMillis), (RejectCode, String)> {
    let now = now_ms();
    let (cert_der, not_after) = controller
        .ca
        .issue_node_cert(csr_der, node, now, controller.config.cert_ttl)
        .map_err(|e| (RejectCode::BadRequest, e.to_string()))?;
    let serial = pki::cert_info(&cert_der)
        .map_err(|e| (RejectCode::Unavailable, e.to_string()))?
        .serial;
    controller
        .store
        .record_cert(
            &serial,
            &CertRecord {
                node: node.clone(),
                key,
                issued_at: now,
                not_after,
            },
        )
        .map_err(|e| {
            (
                RejectCode::Unavailable,
                format!("controller storage failed: {e}"),
            )
        })?;
    Ok((cert_der, not_after))
}

/// A key rotation: the old key (the one this connection's certificate holds) signed the new key;
/// the new key becomes the node's next key and gets a certificate.
fn rotate_key(
    controller: &Controller,
    node: &NodeId,
    old_cert: &[u8],
    req: &shoal_proto::RotateKeyRequest,
) -> Result<(Vec<u8>, UnixMillis), (RejectCode, String)> {
    let bad = |m: String| (RejectCode::BadRequest, m);
    let new_spki = pki::csr_spki(&req.csr_der)
        .map_err(|e| bad(format!("invalid certificate signing request: {e}")))?;
    let old_spki = pki::cert_spki(old_cert).map_err(|e| bad(e.to_string()))?;
    if !pki::verify_rotation(&old_spki, node, &new_spki, &req.signature) {
        return Err(bad(
            "the key rotation is not signed by the node's current key".into(),
        ));
    }
    let new_key = pki::sha256(&new_spki);
    if new_key == pki::sha256(&old_spki) {
        return Err(bad("a rotation needs a new key".into()));
    }
    controller
        .store
        .begin_rotation(node, &new_key, now_ms())
        .map_err(|e| {
            (
                RejectCode::Unavailable,
                format!("controller storage failed: {e}"),
            )
        })?;
    issue_cert(controller, &req.csr_der, node, new_key)
}

fn enrol(
    controller: &Controller,
    request: &shoal_proto::EnrolRequest,
    hello: &shoal_proto::Hello,
    remote: &str,
) -> Result<Enrolled, (RejectCode, String)> {
    let token: JoinToken = request
        .token
        .parse()
        .map_err(|e: shoal_proto::TokenFormatError| (RejectCode::TokenUnknown, e.to_string()))?;
    if token.ca_sha256 != controller.ca.sha256() {
        return Err((
            RejectCode::TokenUnknown,
            "the join token was issued by another controller".into(),
        ));
    }
    // Check the request before spending a token use on it; its key is what the node will be bound
    // to.
    let key = pki::csr_spki(&request.csr_der)
        .map(|spki| pki::sha256(&spki))
        .map_err(|e| {
            (
                RejectCode::BadRequest,
                format!("invalid certificate signing request: {e}"),
            )
        })?;
    let now = now_ms();
    // Live: a connection is open and the node was heard from within two heartbeats. A machine that
    // crashed and rebooted must not wait out QUIC's idle timeout on its dead connection.
    let recent = controller.config.heartbeat_interval.as_millis() as u64 * 2;
    let is_live = |n: &NodeId| {
        let live = controller.live();
        let heard = live
            .nodes
            .get(n)
            .and_then(|l| l.last_seen)
            .is_some_and(|t| now.0.saturating_sub(t.0) <= recent);
        heard && live.conns.get(n).is_some_and(|c| !c.leaving)
    };
    let enrolment = controller
        .store
        .enrol(&EnrolParams {
            token_id: &token.id,
            secret: &token.secret,
            hardware_id: &hello.hardware_id,
            hostname: &request.hostname,
            now,
            key: &key,
            remote,
            is_live: &is_live,
        })
        .map_err(|e| match e {
            EnrolError::Refused(r) => {
                use crate::store::EnrolRefusal as R;
                let code = match r {
                    R::TokenUnknown | R::TokenForAnotherMachine { .. } => RejectCode::TokenUnknown,
                    R::TokenExpired { .. } => RejectCode::TokenExpired,
                    R::TokenUsedUp { .. } => RejectCode::TokenUsedUp,
                    R::TokenRevoked { .. } => RejectCode::TokenRevoked,
                    R::NodeRemoved { .. } | R::ClaimDenied { .. } => RejectCode::NodeRevoked,
                    R::IdentityInUse { .. } => RejectCode::IdentityInUse,
                    R::AwaitingApproval { .. } => RejectCode::AwaitingApproval,
                    R::TooManyPending { .. } => RejectCode::Unavailable,
                    #[allow(unreachable_patterns)]
                    _ => RejectCode::TokenUnknown,
                };
                if matches!(r, R::IdentityInUse { .. } | R::ClaimDenied { .. } | R::TokenForAnotherMachine { .. }) {
                    warn!(%remote, hardware_id = %hello.hardware_id, refusal = %r, "refused a claim of a node's identity");
                }
                (code, r.to_string())
            }
            EnrolError::Store(e) => (RejectCode::Unavailable, format!("controller storage failed: {e}")),
        })?;
    let node = enrolment.node;
    if !enrolment.replay {
        match controller.store.join_networks(&node.id) {
            Ok(changes) => controller.membership_changed(changes),
            Err(e) => {
                warn!(node = %node.id, cause = %e, "enrolled node could not join its overlay networks")
            }
        }
        // Re-enrolment merges the token's labels: a connected agent's drive policy may follow them.
        controller.push_drive_policies(Some(std::slice::from_ref(&node.id)));
        if enrolment.proof.is_some() {
            // Peers must stop trusting the key the record had before.
            if let Err(e) = controller
                .overlay
                .key_changed(&controller.store, &node.id, key)
            {
                warn!(node = %node.id, cause = %e, "could not tell the overlay the re-enrolled node's new key");
            }
        }
    }
    let (cert_der, not_after) = issue_cert(controller, &request.csr_der, &node.id, key)?;
    info!(
        node = %node.id, hostname = %node.hostname, hardware_id = %node.hardware_id, new = enrolment.new,
        proof = ?enrolment.proof, replay = enrolment.replay, "node enrolled"
    );
    Ok(Enrolled {
        node_id: node.id,
        cert_der,
        ca_der: controller.ca.cert_der().to_vec(),
        not_after,
    })
}
