//! The controller's async shell: the QUIC endpoint for agents, the admin API, and the liveness
//! sweep.
//!
//! [`run`] takes bound sockets and a shutdown future (the mini-redis pattern), so tests bind port 0
//! and stop the controller cleanly.

use crate::connections::{bump, close_code, ConnStats, LiveNode, LiveState, Revoke};
use crate::sessions::handle_connection;
use crate::store::RegistryEvent;
use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use shoal_overlay::{pki, tls};
use shoal_proto::{NodeId, UnixMillis};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::{
    api::admin::{self, AdminConf, ADMIN_CONF_FILE},
    drives::hub::DriveHub,
    overlay::hub::{self, OverlayHub},
    registry::ca::Ca,
    store::EventKind,
    store::Store,
};
use shoal_controller_core::drives::fleet::FleetDrivesConfig;
use shoal_controller_core::liveness::{Liveness, Transition};
use shoal_controller_core::registry::NodeStatus;

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
    /// How often live state (last seen, health) is written to the store (default 30 s; on etcd,
    /// [`ETCD_CHECKPOINT_INTERVAL`]: there the store is shared and liveness stays in memory).
    pub checkpoint_interval: Duration,
    /// Subnet of the `default` overlay network, used when it is created on first start; later
    /// starts keep the stored one (default 10.90.0.0/16).
    pub overlay_subnet: shoal_controller_core::networks::Subnet,
    /// TAP MTU of the `default` overlay network, and of new networks created without one (default
    /// 1380).
    pub overlay_mtu: u16,
    /// How long an agent may use its cached netmap without hearing from the controller (default 24
    /// h).
    pub netmap_validity: Duration,
    /// Relayed traffic from one node to one peer, megabits per second, with a burst of a
    /// quarter second (default 64: `OverlayLimits::relay_pair_bytes`).
    pub relay_pair_mbit: f64,
    /// Relayed traffic from one node to all its peers, megabits per second, packets scaled with it
    /// (default none: `OverlayLimits::relay_bytes`, 16 MiB/s = 134 Mbit/s).
    pub relay_sender_mbit: Option<f64>,
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
    /// How often the backup scheduler looks for owed backups and verifications when nothing wakes
    /// it (default 5 s).
    pub backup_tick: Duration,
    /// Scheduled disaster-recovery backups of the controller to a backup target (default none).
    pub dr_schedule: Option<crate::dr::schedule::DrScheduleConfig>,
    /// The rollout driver's clock (default: the wall clock). A test hook: see
    /// [`crate::maintenance::RolloutClock`].
    pub rollout_clock: crate::maintenance::RolloutClock,
    /// The etcd cluster the store lives in, shared with other controllers (`--etcd-endpoints`;
    /// default none: the embedded store in the data dir, one controller).
    pub etcd: Option<crate::etcd::EtcdConfig>,
    /// Where agents reach this controller, as announced to them and to the other controllers
    /// (`--advertise`; default: the agents' QUIC address when it is not a wildcard).
    pub advertise: Option<SocketAddr>,
    /// Leader election on etcd: lease TTL and timing (default [`crate::cluster::election::ElectionConfig::new`]).
    pub election_ttl: Duration,
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
    /// Extra names of the admin API's certificate (`--api-name`, DNS names and IP addresses), so
    /// a remote `shoalctl` can verify it by the name it dials (default none: `localhost`, the
    /// loopback addresses and the API's bound address).
    pub api_names: Vec<String>,
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
            overlay_subnet: shoal_controller_core::networks::DEFAULT_OVERLAY_SUBNET,
            overlay_mtu: shoal_controller_core::networks::DEFAULT_OVERLAY_MTU,
            netmap_validity: Duration::from_secs(24 * 3600),
            relay_pair_mbit: 64.0,
            relay_sender_mbit: None,
            probe_listen: None,
            netboot: crate::netboot::NetbootConfig::default(),
            drives: FleetDrivesConfig::default(),
            drive_prepare_timeout: crate::drives::hub::DEFAULT_PREPARE_TIMEOUT,
            drive_self_test_timeout: crate::drives::hub::DEFAULT_SELF_TEST_TIMEOUT,
            rollout_tick: Duration::from_secs(5),
            backup_tick: Duration::from_secs(5),
            dr_schedule: None,
            rollout_clock: crate::maintenance::RolloutClock::default(),
            release_keys: Vec::new(),
            etcd: None,
            advertise: None,
            election_ttl: Duration::from_secs(2),
            api_names: Vec::new(),
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
    /// This controller's shared files (CA, secrets key) are not the fleet's.
    #[error(transparent)]
    Join(#[from] crate::cluster::JoinError),
    /// The backup secrets key could not be opened.
    #[error(transparent)]
    BackupSecrets(#[from] crate::backups::secrets::SecretError),
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
    /// Backup targets' secrets, task progress, the scheduler's wake-up.
    pub(crate) backups: crate::backups::Backups,
    /// The other controllers on the same etcd cluster, and who leads.
    pub(crate) cluster: crate::cluster::Cluster,
    /// Links to the other controllers: their agents' presence, messages for them.
    pub(crate) mesh: crate::cluster::mesh::Mesh,
    /// The latest agent update facts per node (see `agent_updates`).
    pub(crate) agent_updates: Mutex<HashMap<NodeId, crate::releases::updates::AgentUpdate>>,
    pub(crate) update_notices:
        tokio::sync::broadcast::Sender<crate::releases::updates::UpdateNotice>,
    /// What the connection limits refused.
    pub(crate) conn_stats: ConnStats,
    /// Serving or not, enrolment counters, the last `/metrics` rendering.
    pub(crate) observe: crate::observe::Observe,
    /// Unauthenticated connections open per remote address.
    pub(crate) unauthenticated_by_address: Mutex<HashMap<IpAddr, usize>>,
    /// Liveness changes go through one worker so they reach the store in the order they happened.
    pub(crate) transitions: mpsc::UnboundedSender<Vec<Transition>>,
    /// (v9) Connected WireGuard gateway agents and the maps agents were told.
    pub(crate) wireguard: crate::overlay::wireguard::Gateways,
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
        let store = match &config.etcd {
            Some(etcd) => open_etcd_store(&config, etcd)?,
            None => {
                let store = Store::open(&config.data_dir.join("store"))?;
                store.ensure_default_network(config.overlay_subnet, config.overlay_mtu)?;
                store
            }
        };
        let mut limits = crate::overlay::hub::OverlayLimits::default()
            .with_relay_pair_mbit(config.relay_pair_mbit);
        if let Some(mbit) = config.relay_sender_mbit {
            limits = limits.with_relay_sender_mbit(mbit);
        }
        let overlay = Arc::new(OverlayHub::open_with_limits(
            &store,
            config.netmap_validity,
            limits,
        )?);
        let drives = DriveHub::open(&store, config.drives)?;
        // Several controllers on one store are one fleet: one CA, one secrets key.
        let joined = match config.etcd {
            Some(_) => crate::cluster::check_shared_files(&store, &config.data_dir)?,
            None => true,
        };
        let maint = crate::maintenance::Maintenance::open(&store, config.rollout_clock.clone())?;
        let ca = Ca::load_or_create(&config.data_dir)?;
        let admin_token_sha256 = ensure_admin_conf(&config, &store, &ca, api_addr)?;
        let id = crate::cluster::load_or_create_id(&config.data_dir)
            .map_err(|e| ServeError::DataDir(config.data_dir.clone(), e))?;
        let mut liveness = Liveness::new(config.heartbeat_interval, config.down_after);
        let mut nodes = HashMap::new();
        let start = Instant::now();
        let clustered = config.etcd.is_some();
        for n in store.nodes()? {
            // Clustered, a node is assumed up (and written down if it does not come back) only by
            // the controller that held its session.
            let ours = !clustered
                || store
                    .table(crate::cluster::liveness::NODE_SESSIONS)
                    .get(n.id.0.as_bytes())?
                    .is_none_or(|owner| owner == id.as_bytes());
            if n.status == NodeStatus::Up && ours {
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
        let backups = crate::backups::Backups::open(&config.data_dir)?;
        if !joined {
            crate::cluster::record_shared_files(&store, &config.data_dir)?;
        }
        let cluster = match config.etcd {
            Some(_) => crate::cluster::Cluster::clustered(id),
            None => crate::cluster::Cluster::single(id),
        };
        let (transitions, transitions_rx) = mpsc::unbounded_channel();
        let controller = Arc::new(Controller {
            releases,
            backups,
            cluster,
            mesh: crate::cluster::mesh::Mesh::new(
                ca.derive_secret(crate::cluster::mesh::wire::PROOF_LABEL),
            ),
            agent_updates: Mutex::new(HashMap::new()),
            update_notices: tokio::sync::broadcast::channel(256).0,
            conn_stats: ConnStats::default(),
            observe: crate::observe::Observe::default(),
            unauthenticated_by_address: Mutex::new(HashMap::new()),
            netboot,
            transitions,
            transitions_rx: Mutex::new(Some(transitions_rx)),
            wireguard: Default::default(),
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
        self.node_removed(id);
        if removed.is_some() {
            // Its session may be on another controller of the cluster.
            self.mesh
                .broadcast(crate::cluster::mesh::wire::MeshMsg::NodeRemoved { node: id.clone() });
        }
        if removed.is_some() {
            info!(node = %id, "node removed");
        }
        Ok(removed.is_some())
    }

    /// Forgets a removed node's liveness and ends its session here, if it has one.
    pub(crate) fn node_removed(&self, id: &NodeId) {
        let mut live = self.live();
        live.liveness.forget(id);
        live.nodes.remove(id);
        if let Some(conn) = live.conns.remove(id) {
            let _ = conn.revoke.send(Revoke::Removed(
                "removed from the fleet by an operator".into(),
            ));
        }
    }

    fn apply_transitions(&self, transitions: Vec<Transition>) {
        for t in transitions {
            let id = t.node();
            let (status, kind) = match t {
                Transition::Up(_) => (NodeStatus::Up, EventKind::Registry(RegistryEvent::Up)),
                Transition::Down(_) => (NodeStatus::Down, EventKind::Registry(RegistryEvent::Down)),
            };
            match status {
                NodeStatus::Up => self.claim_session(id),
                // Another controller holds the session now: it is not ours to write down.
                _ if !self.may_write_down(id) => continue,
                _ => {}
            }
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
                rec.health = n.health.clone();
            }) {
                warn!(node = %id, cause = %e, "checkpoint failed");
            }
        }
    }
}

/// How often a controller on etcd writes its agents' last-seen times and health: one write per
/// node per interval, so 10,000 agents cost etcd about 11 writes a second. Liveness itself never
/// waits for it (up/down are written when they change, and the mesh shares the rest).
pub const ETCD_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(15 * 60);

/// How long a controller starting on etcd waits for it to have a quorum (etcd and the controllers
/// often start together at boot).
const ETCD_START_WAIT: Duration = Duration::from_secs(120);

/// Opens the store on etcd, waiting (up to [`ETCD_START_WAIT`]) while etcd has no quorum yet.
fn open_etcd_store(
    config: &ControllerConfig,
    etcd: &crate::etcd::EtcdConfig,
) -> Result<Store, ServeError> {
    let deadline = Instant::now() + ETCD_START_WAIT;
    loop {
        let attempt = Store::open_etcd(etcd, &config.data_dir).and_then(|store| {
            store.ensure_default_network(config.overlay_subnet, config.overlay_mtu)?;
            Ok(store)
        });
        match attempt {
            Err(crate::store::StoreError::Unavailable(why)) if Instant::now() < deadline => {
                warn!(cause = %why, "waiting for etcd to have a quorum");
                std::thread::sleep(Duration::from_secs(1));
            }
            other => return Ok(other?),
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
    if let (Some(stored), true) = (stored, config.etcd.is_some()) {
        // Several controllers share one admin credential: a controller that lacks admin.conf (or
        // holds another) must not replace the fleet's.
        match AdminConf::read(&path) {
            Ok(conf) if admin::digest_eq(&pki::sha256(conf.token.as_bytes()), &stored) => {}
            _ => {
                warn!(path = %path.display(), "admin.conf here is missing or not the fleet's: the fleet's admin credential stays; copy admin.conf from another controller (and set its api line to this controller) to use shoalctl here")
            }
        }
        return Ok(stored);
    }
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
    info!(quic = %quic_addr, api = %api_addr, ca = %hex::encode(controller.ca.sha256()), controller = %controller.cluster.id, "controller running");
    let advertised = controller.config.advertise.unwrap_or(quic_addr);
    let api_ip = if api_addr.ip().is_unspecified() {
        advertised.ip()
    } else {
        api_addr.ip()
    };
    controller.cluster.set_local(
        advertised,
        format!("https://{}", SocketAddr::new(api_ip, api_addr.port())),
        now_ms().0,
    );
    let (stop_election, election_stopped) = tokio::sync::oneshot::channel::<()>();
    let election = match &controller.config.etcd {
        Some(etcd) => {
            let client = crate::etcd::connect(etcd)
                .await
                .map_err(|e| ServeError::Store(crate::store::StoreError::Db(e.to_string())))?;
            let mut cfg = crate::cluster::election::ElectionConfig::new(etcd.prefix.clone());
            cfg.lease_ttl = controller.config.election_ttl;
            let host: Arc<dyn crate::cluster::election::ElectionHost> = controller.clone();
            Some(tokio::spawn(crate::cluster::election::run(
                host,
                client,
                cfg,
                async move {
                    let _ = election_stopped.await;
                },
            )))
        }
        None => None,
    };

    let sweeper = tokio::spawn(sweep(controller.clone()));
    let rollouts = tokio::spawn(crate::maintenance::run_driver(
        controller.clone(),
        controller.config.rollout_tick,
    ));
    let agent_notices = tokio::spawn(crate::maintenance::agent::forward_agent_updates(
        controller.clone(),
    ));
    let dr = controller.config.dr_schedule.clone().and_then(|cfg| {
        match shoal_controller_core::backups::Schedule::new(&cfg.schedule, &cfg.tz) {
            Ok(schedule) => Some(tokio::spawn(crate::dr::schedule::run(
                controller.clone(),
                cfg,
                schedule,
            ))),
            Err(e) => {
                warn!(cause = %e, "controller backup schedule refused; no scheduled backups");
                None
            }
        }
    });
    let mesh = controller.cluster.is_clustered().then(|| {
        tokio::spawn(crate::cluster::mesh::run(
            controller.clone(),
            endpoint.clone(),
        ))
    });
    let backups = tokio::spawn(crate::backups::run_scheduler(
        controller.clone(),
        controller.config.backup_tick,
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
    controller.observe.set_serving(true);
    tokio::select! {
        _ = accept => {}
        _ = shutdown => info!("shutting down"),
    }
    controller.observe.set_serving(false);
    if let Some(election) = election {
        // Revoking the lease hands leadership over at once instead of after its TTL.
        let _ = stop_election.send(());
        let _ = tokio::time::timeout(Duration::from_secs(2), election).await;
    }
    sweeper.abort();
    if let Some(mesh) = mesh {
        mesh.abort();
    }
    rollouts.abort();
    agent_notices.abort();
    backups.abort();
    if let Some(dr) = dr {
        dr.abort();
    }
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
    let orphans = Arc::new(Mutex::new(crate::cluster::liveness::OrphanSweep::default()));
    let mut last_orphan_pass = Instant::now();
    loop {
        tick.tick().await;
        if controller.cluster.is_clustered() && last_orphan_pass.elapsed() >= Duration::from_secs(2)
        {
            last_orphan_pass = Instant::now();
            let (c, orphans) = (controller.clone(), orphans.clone());
            let _ = tokio::task::spawn_blocking(move || {
                let mut sweep = orphans.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(Err(e)) = c.cluster.as_leader(|| sweep.pass(&c, Instant::now())) {
                    warn!(cause = %e, "orphaned-node sweep failed; next pass in a second");
                }
            })
            .await;
        }
        if last_prune.is_none_or(|t| t.elapsed() >= crate::registry::identity::PRUNE_INTERVAL) {
            last_prune = Some(Instant::now());
            let c = controller.clone();
            match tokio::task::spawn_blocking(move || {
                // A flood of events that stopped gets its summary within a minute, not at the next
                // event.
                if let Err(e) = c.store.flush_suppressed_events(now_ms()) {
                    warn!(cause = %e, "could not write the summaries of suppressed events");
                }
                // Pruning is the leader's: once per fleet, fenced.
                c.cluster
                    .as_leader(|| c.store.prune(now_ms()))
                    .unwrap_or_else(|| Ok(Default::default()))
            })
            .await
            {
                Ok(Ok(p)) if p != crate::registry::identity_store::Pruned::default() => {
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
        let interval = match controller.config.etcd {
            Some(_) => controller
                .config
                .checkpoint_interval
                .max(ETCD_CHECKPOINT_INTERVAL),
            None => controller.config.checkpoint_interval,
        };
        if last_checkpoint.elapsed() >= interval {
            last_checkpoint = Instant::now();
            let c = controller.clone();
            let _ = tokio::task::spawn_blocking(move || c.checkpoint()).await;
        }
    }
}

impl Controller {
    /// This controller's membership record as of now.
    pub(crate) fn member_record(&self) -> crate::cluster::MemberRecord {
        let (agent_addr, api, started_ms) = self.cluster.local();
        crate::cluster::MemberRecord {
            id: self.cluster.id.clone(),
            agent_addr,
            api,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_ms,
            agents: self.live().conns.len() as u64,
            updated_ms: now_ms().0,
        }
    }
}

impl crate::cluster::election::ElectionHost for Controller {
    fn cluster(&self) -> &crate::cluster::Cluster {
        &self.cluster
    }

    fn member_record(&self) -> crate::cluster::MemberRecord {
        Controller::member_record(self)
    }
}
