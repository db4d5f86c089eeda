//! The agent's async shell: connects, enrols when it must, drives the control session, reconnects
//! with backoff after any loss.

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use rustls_pki_types::PrivateKeyDer;
use shoal_overlay::{
    node::{NodeCommand, NodeConfig, NodeEvent, OverlayNode},
    pki, recv_msg, send_msg,
    tls::{self, PeerTls},
};
use shoal_proto::{
    AgentMsg, ControllerMsg, EnrolRequest, Hello, Inventory, JoinToken, NatMapping, OverlayHello,
    Punch, Reject, RejectCode, RenewRequest, UnixMillis, SUPPORTED,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{
    backoff::Backoff,
    drives::{DriveEvent, DriveInput, DrivesConfig},
    health::HealthCollector,
    inventory::{self, SysRoots},
    maintenance::{self as maint, Decision, MaintenanceBook, MaintenanceConfig, Work},
    overlay::{self as ov, AgentEndpoint, DeltaOutcome, NetmapCache},
    reboot::{self, RebootConfig},
    session::{AgentSession, End, Mode, Output, Timing},
    state::{Credentials, StateDir, StateError},
    updater::{self, Updater, UpdaterConfig},
};

/// How the agent runs. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Controller's QUIC address. Required.
    pub controller: SocketAddr,
    /// Join token; needed only while the agent has no valid certificate.
    pub token: Option<String>,
    /// State dir for key and certificates. Required.
    pub state_dir: PathBuf,
    /// Identity override for several agents on one host (default: hardware identity).
    pub machine_id: Option<String>,
    /// Health report interval override (default: what the controller says, 10 s by default).
    pub health_interval: Option<Duration>,
    /// How often inventory is re-read to spot changes (default 60 s).
    pub inventory_interval: Duration,
    /// First reconnect delay (default 500 ms), doubling up to `backoff_max` (default 30 s).
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Where /sys, /proc and /etc are (default: the real ones).
    pub roots: SysRoots,
    /// UDP port for the controller connection and overlay peers (default 0: the port kept in the
    /// state dir, or a random one the first time).
    pub overlay_port: u16,
    /// How often overlay paths are reported to the controller (default 5 s).
    pub paths_interval: Duration,
    /// Overlay datapath settings other than the node id (TAP prefix, timing; see `NodeConfig`).
    pub overlay: NodeConfig,
    /// Whether the node joins the overlay (default true). Off, the agent creates no TAP device and
    /// never sends `OverlayHello`, so the controller sends it no netmap.
    pub overlay_enabled: bool,
    /// The drive manager's settings; `None` turns it off (`--no-drives`). Default: on, physical
    /// disks.
    pub drives: Option<DrivesConfig>,
    /// Self-update settings (default: no trusted release key, so every update is refused).
    pub update: UpdaterConfig,
    /// Remote reboot settings (default: allowed; kexec when loaded, else `reboot(2)`).
    pub reboot: RebootConfig,
    /// Maintenance actions: allowed programs, hooks, timeout (default: no program allowed, no
    /// hooks, 30 min).
    pub maintenance: MaintenanceConfig,
}

impl AgentConfig {
    /// Defaults for a controller address and state dir.
    pub fn new(controller: SocketAddr, state_dir: PathBuf) -> Self {
        Self {
            controller,
            token: None,
            state_dir,
            machine_id: None,
            health_interval: None,
            inventory_interval: Duration::from_secs(60),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            roots: SysRoots::default(),
            overlay_port: 0,
            paths_interval: Duration::from_secs(5),
            overlay: NodeConfig::new(shoal_proto::NodeId(String::new())),
            overlay_enabled: true,
            drives: Some(DrivesConfig::default()),
            update: UpdaterConfig::default(),
            reboot: RebootConfig::default(),
            maintenance: MaintenanceConfig::default(),
        }
    }
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The controller refused enrolment for good (bad, expired, used-up or revoked token...).
    #[error("the controller refused this agent: {0}")]
    Refused(Reject),
    /// The controller no longer accepts this node's certificate, and there is no token to enrol
    /// again.
    #[error("the controller refuses this node's certificate: {0}; an operator must admit it again (shoalctl nodes reenrol) and the agent needs a join token")]
    CertificateRefused(String),
    /// This node was removed from the fleet.
    #[error("this node was removed from the fleet: {0}; an operator must admit it again with a new join token")]
    Revoked(String),
    /// The controller's certificate does not match the CA hash in the join token.
    #[error("the controller at the given address is not the one that issued this join token: {0}")]
    WrongController(String),
    /// No certificate and no token to get one.
    #[error("no valid certificate in {0} and no join token given (--token or --token-file)")]
    NoToken(PathBuf),
    /// The token is not a join token.
    #[error("invalid join token: {0}")]
    BadToken(#[from] shoal_proto::TokenFormatError),
    /// No stable machine identity could be found.
    #[error(
        "no hardware identity found (no DMI UUID, machine-id or permanent MAC); pass --machine-id"
    )]
    NoIdentity,
    /// The state dir is unusable.
    #[error(transparent)]
    State(#[from] StateError),
    /// Keys or TLS could not be set up.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The UDP socket could not be opened.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// A setting is not usable (e.g. an `--allow-exec` path that does not exist).
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// How long a health check program may run before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an acknowledged reboot waits, for the acknowledgement to reach the controller.
const REBOOT_GRACE: Duration = Duration::from_secs(1);

/// Wall-clock now, for reports and certificate lifetimes.
pub(crate) fn now_ms() -> UnixMillis {
    UnixMillis(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

/// Why one connection attempt ended without a session outcome.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Transport(#[from] shoal_overlay::TransportError),
    #[error("the controller closed the control stream")]
    StreamClosed,
    #[error(transparent)]
    Fatal(#[from] AgentError),
}

/// The longest wait between attempts while an enrolment waits for an operator.
const APPROVAL_RETRY: Duration = Duration::from_secs(5);

/// Runs the agent until `shutdown` resolves or the controller refuses it for good.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    tokio::pin!(shutdown);
    let state = StateDir::open(&config.state_dir)?;
    let token: Option<JoinToken> = config.token.as_deref().map(str::parse).transpose()?;
    let roots = config.roots.clone();
    let first_inventory = tokio::task::spawn_blocking(move || inventory::collect_inventory(&roots))
        .await
        .map_err(|e| AgentError::Tls(e.to_string()))?;
    let hardware_id = inventory::hardware_id(
        config.machine_id.as_deref(),
        &config.roots,
        &first_inventory.nics,
    )
    .ok_or(AgentError::NoIdentity)?;
    info!(hardware_id = %hardware_id, controller = %config.controller, "agent starting");
    let version = crate::version::agent_version();
    // Before anything else: a start after an update is counted (or rolled back) first.
    let updater = Updater::boot(config.update.clone(), &config.state_dir, &version);
    let update_deadline = updater.deadline();
    let updater = Arc::new(Mutex::new(updater));
    if let Some(deadline) = update_deadline {
        // The deadline holds whether or not the controller is reachable: a new version that cannot
        // connect is rolled back all the same.
        let updater = updater.clone();
        tokio::spawn(async move {
            let wait = deadline.0.saturating_sub(now_ms().0);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let _ = lock(&updater).timeout();
        });
    }
    let hello = Hello {
        protocol: SUPPORTED,
        agent_version: version,
        hardware_id,
    };
    let allow_exec = config
        .maintenance
        .canonical_allow()
        .map_err(AgentError::Config)?;

    let agent_endpoint = ov::bind_endpoint(
        &config.state_dir,
        config.controller.is_ipv6(),
        config.overlay_port,
    )?;
    let endpoint = agent_endpoint.endpoint.clone();
    info!(
        port = agent_endpoint.port,
        "UDP socket bound (controller and overlay peers)"
    );
    let mut backoff = Backoff::new(config.backoff_base, config.backoff_max);
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    // The drive manager outlives control connections: hot-adds, missing drives and policy `prepare`
    // are handled while the controller is away too.
    let drive_inputs = config.drives.clone().map(|mut drives| {
        drives
            .policy_cache
            .get_or_insert_with(|| config.state_dir.join("drive-policy.json"));
        let (input_tx, input_rx) = mpsc::unbounded_channel();
        let (drive_tx, mut drive_rx) = mpsc::unbounded_channel();
        tokio::spawn(crate::drives::run(drives, input_rx, drive_tx));
        let events = events_tx.clone();
        tokio::spawn(async move {
            while let Some(event) = drive_rx.recv().await {
                if events.send(ShellEvent::Drives(event)).is_err() {
                    return;
                }
            }
        });
        input_tx
    });
    let boot = crate::checks::BootHealth::load(
        &config.roots,
        &config.maintenance.boot_id_file,
        config.update.check_command.clone(),
    );
    info!(image = ?boot.image(), "boot facts read");
    let mut shell = Shell {
        maint: MaintState {
            book: MaintenanceBook::new(maint::load_record(&config.state_dir)),
            allow: allow_exec,
            smart: None,
            next_id: 0,
        },
        updater,
        boot,
        kexec: None,
        protocol: 0,
        conn: None,
        updates: false,
        fetch_conns: tokio::sync::watch::Sender::new(None),
        config: &config,
        state: &state,
        health: Some(HealthCollector::new(config.roots.clone())),
        last_inventory: None,
        drives: DrivesState {
            inputs: drive_inputs,
            last: None,
        },
        overlay: OverlayState {
            cache: NetmapCache::load(&config.state_dir, now_ms()),
            endpoint: agent_endpoint,
            node: None,
            observed: None,
            nat: NatMapping::Unknown,
            events: events_tx,
        },
    };
    // With a certificate and a cached netmap the overlay starts before the controller answers:
    // peers are reachable even while the controller is down.
    if let Some(creds) = state
        .load()?
        .filter(|c| c.not_after.0 > now_ms().0 && config.overlay_enabled)
    {
        if shell.overlay.cache.get().is_some() {
            info!("starting the overlay from the cached netmap");
            shell.overlay.ensure_node(&config, &creds);
            shell.overlay.push_netmap();
        }
    }

    loop {
        let attempt = shell.attempt(&endpoint, &hello, token.as_ref(), &mut events_rx);
        let outcome = tokio::select! {
            r = attempt => r,
            _ = &mut shutdown => {
                endpoint.close(0u32.into(), b"agent shutting down");
                let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
                return Ok(());
            }
        };
        let delay = match outcome {
            Ok((End::Enrolled(_), _)) => {
                backoff.reset();
                continue;
            }
            Ok((End::Rejected(r), _)) if r.code == RejectCode::NodeRevoked => {
                shell.overlay.cache.clear();
                state.forget_certificate()?;
                return Err(AgentError::Revoked(r.message));
            }
            Ok((End::Revoked(reason), _)) => {
                shell.overlay.cache.clear();
                state.forget_certificate()?;
                return Err(AgentError::Revoked(reason));
            }
            Ok((End::Rotated, _)) => {
                backoff.reset();
                continue;
            }
            // The controller no longer accepts this certificate (revoked, or the node was
            // re-enrolled with another key): drop it and its key; with a token, enrol again (which
            // an operator may have to approve).
            Ok((End::Rejected(r), _)) if r.code == RejectCode::CertificateRefused => {
                warn!(reason = %r.message, "the controller refuses this node's certificate; forgetting it");
                shell.overlay.cache.clear();
                state.forget_credentials()?;
                if token.is_none() {
                    return Err(AgentError::CertificateRefused(r.message));
                }
                backoff.next_delay(rand::random::<f64>())
            }
            // Waiting for an operator (or for a claimed node's session to lapse): retry often
            // enough that an approval takes effect within seconds, whatever the backoff has grown
            // to.
            Ok((End::Rejected(r), _))
                if matches!(
                    r.code,
                    RejectCode::AwaitingApproval | RejectCode::IdentityInUse
                ) =>
            {
                warn!(reason = %r.message, "enrolment waits; retrying");
                backoff
                    .next_delay(rand::random::<f64>())
                    .min(APPROVAL_RETRY)
            }
            // Token and version refusals are final: retrying cannot help until an operator acts.
            Ok((End::Rejected(r), _)) if r.code.is_final_for_agent() => {
                return Err(AgentError::Refused(r));
            }
            Ok((end, was_ready)) => {
                warn!(outcome = ?end, "session ended");
                if was_ready {
                    backoff.reset();
                }
                backoff.next_delay(rand::random::<f64>())
            }
            Err((AttemptError::Fatal(e), _)) => return Err(e),
            Err((e, was_ready)) => {
                if was_ready {
                    backoff.reset();
                }
                let d = backoff.next_delay(rand::random::<f64>());
                warn!(cause = %e, retry_in = ?d, "controller unreachable");
                d
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut shutdown => return Ok(()),
        }
    }
}

fn lock(updater: &Mutex<Updater>) -> std::sync::MutexGuard<'_, Updater> {
    updater.lock().unwrap_or_else(|p| p.into_inner())
}

struct Shell<'a> {
    /// Maintenance steps: what was done, what runs.
    maint: MaintState,
    /// Self-update state, shared with the health-deadline task.
    updater: Arc<Mutex<Updater>>,
    /// What this machine booted and its health checks, reported on every v4 session.
    boot: crate::checks::BootHealth,
    /// The image the controller named for kexec at the next reboot, as the agent judged it
    /// ([`reboot::check_image`]); taken by that reboot.
    kexec: Option<reboot::NamedImage>,
    /// The negotiated protocol of the current session (0 before Welcome): what it can decode.
    protocol: u16,
    /// The current control connection (release downloads open a stream on it).
    conn: Option<quinn::Connection>,
    /// Whether the current session speaks protocol 4 (update messages).
    updates: bool,
    /// The connection of each v4 session once it is established: a release download broken off with
    /// its connection resumes on the next one ([`updater::fetch`]).
    fetch_conns: tokio::sync::watch::Sender<Option<quinn::Connection>>,
    config: &'a AgentConfig,
    state: &'a StateDir,
    health: Option<HealthCollector>,
    last_inventory: Option<Inventory>,
    drives: DrivesState,
    overlay: OverlayState,
}

/// The drive manager as the shell sees it.
struct DrivesState {
    /// Policy and commands go here; `None` when the drive manager is off.
    inputs: Option<mpsc::UnboundedSender<DriveInput>>,
    /// The newest drive report, sent again on every new connection.
    last: Option<shoal_proto::DriveReport>,
}

/// Maintenance as the shell sees it.
struct MaintState {
    book: MaintenanceBook,
    /// `--allow-exec`, canonicalised at start.
    allow: Vec<PathBuf>,
    /// A SMART self-test step waiting for the drive manager's answers.
    smart: Option<PendingSmart>,
    /// Counter for the drive command ids of self-tests.
    next_id: u64,
}

/// Drive command ids of maintenance self-tests have this bit set (the controller's ids are small
/// counters), so their answers are kept from the controller.
const MAINT_DRIVE_ID: u64 = 1 << 62;

/// Self-tests started for a step, waiting for the drive manager to say whether each started.
struct PendingSmart {
    step: shoal_proto::MaintenanceStep,
    /// Command id → device.
    waiting: std::collections::BTreeMap<u64, String>,
    started: Vec<String>,
    failed: Vec<String>,
    skipped: Vec<String>,
}

impl PendingSmart {
    fn outcome(&self) -> shoal_proto::StepOutcome {
        let skipped = if self.skipped.is_empty() {
            String::new()
        } else {
            format!("; skipped (no SMART): {}", self.skipped.join(", "))
        };
        let text = if self.started.is_empty() && self.failed.is_empty() {
            format!("no drives with SMART{skipped}")
        } else {
            format!(
                "short self-test started on {}{skipped}",
                if self.started.is_empty() {
                    "none".to_owned()
                } else {
                    self.started.join(", ")
                }
            )
        };
        if self.failed.is_empty() {
            shoal_proto::StepOutcome::Done(shoal_proto::output_tail(
                &text,
                shoal_proto::MAX_STEP_OUTPUT,
            ))
        } else {
            shoal_proto::StepOutcome::Failed(shoal_proto::output_tail(
                &format!(
                    "self-test could not start: {}; {text}",
                    self.failed.join("; ")
                ),
                shoal_proto::MAX_STEP_OUTPUT,
            ))
        }
    }
}

/// Things that happen outside the control stream but need it.
#[derive(Debug)]
enum ShellEvent {
    /// The overlay wants a peer to punch towards us.
    Node(NodeEvent),
    /// The NAT probe finished.
    Probed {
        main: SocketAddr,
        result: Result<SocketAddr, String>,
    },
    /// The drive manager reports.
    Drives(DriveEvent),
    /// A release download and install ended.
    Update {
        /// The version.
        version: String,
        /// Installed (re-execute now), or why not.
        result: Result<(), shoal_proto::UpdateFailure>,
    },
    /// An acknowledged reboot did not happen.
    RebootFailed(String),
    /// A maintenance step's work ended.
    Maintenance {
        /// The step.
        step: shoal_proto::MaintenanceStep,
        /// How.
        outcome: shoal_proto::StepOutcome,
    },
    /// A reboot request is prepared (a kexec image loaded, or not): acknowledge it, then reboot.
    RebootReady {
        /// How.
        method: reboot::RebootMethod,
        /// The acknowledgement's text.
        ack: String,
    },
}

/// The overlay's state in the shell: it outlives control connections.
struct OverlayState {
    endpoint: AgentEndpoint,
    cache: NetmapCache,
    node: Option<OverlayNode>,
    observed: Option<SocketAddr>,
    nat: NatMapping,
    events: mpsc::UnboundedSender<ShellEvent>,
}

impl OverlayState {
    /// Starts the datapath if it is not running.
    fn ensure_node(&mut self, config: &AgentConfig, creds: &Credentials) {
        if self.node.is_some() {
            return;
        }
        let tls = match key_der(&creds.key_pem).and_then(|key| {
            PeerTls::new(&creds.ca_der, &creds.cert_der, key)
                .map_err(|e| AgentError::Tls(e.to_string()))
        }) {
            Ok(t) => t,
            Err(e) => {
                warn!(cause = %e, "overlay not started");
                return;
            }
        };
        let mut node_config = config.overlay.clone();
        node_config.me = creds.node_id.clone();
        let (node, mut events) =
            OverlayNode::spawn(self.endpoint.endpoint.clone(), tls, node_config);
        let forward = self.events.clone();
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                if forward.send(ShellEvent::Node(e)).is_err() {
                    return;
                }
            }
        });
        self.node = Some(node);
    }

    fn push_netmap(&self) {
        if let (Some(node), Some(map)) = (&self.node, self.cache.get()) {
            node.command(NodeCommand::Netmap(map.clone()));
        }
    }

    fn hello(&self, config: &AgentConfig, full: bool) -> AgentMsg {
        AgentMsg::Overlay(OverlayHello {
            netmap_version: if full { None } else { self.cache.version() },
            local_endpoints: ov::local_endpoints(self.endpoint.port, &config.overlay.tap_prefix),
            nat: self.nat,
        })
    }
}

type Attempt = Result<(End, bool), (AttemptError, bool)>;

impl Shell<'_> {
    /// One connection: enrol if there is no valid certificate, else run as the node.
    async fn attempt(
        &mut self,
        endpoint: &quinn::Endpoint,
        hello: &Hello,
        token: Option<&JoinToken>,
        events: &mut mpsc::UnboundedReceiver<ShellEvent>,
    ) -> Attempt {
        let fatal = |e: AgentError| (AttemptError::Fatal(e), false);
        let keep_alive = Duration::from_secs(5);
        let creds = self.state.load().map_err(|e| fatal(e.into()))?;
        // A certificate that expires within a minute is as good as none.
        let creds = creds.filter(|c| c.not_after.0 > now_ms().0 + 60_000);
        let (client_config, mode, key_pem) = match &creds {
            Some(c) => {
                let key = key_der(&c.key_pem).map_err(fatal)?;
                let cfg = tls::node_client_config(&c.ca_der, &c.cert_der, key, keep_alive)
                    .map_err(|e| fatal(AgentError::Tls(e.to_string())))?;
                (
                    cfg,
                    Mode::Node {
                        cert_not_after: c.not_after,
                    },
                    c.key_pem.clone(),
                )
            }
            None => {
                let token = token
                    .ok_or_else(|| fatal(AgentError::NoToken(self.config.state_dir.clone())))?;
                // The same key for every attempt until one succeeds: a lost `Enrolled` is answered
                // again for the same key without spending the token, and an operator's approval is
                // for this key.
                let key_pem = self.state.enrolment_key().map_err(|e| fatal(e.into()))?;
                let key = rcgen::KeyPair::from_pem(&key_pem)
                    .map_err(|e| fatal(AgentError::Tls(e.to_string())))?;
                let csr_der =
                    pki::make_csr(&key).map_err(|e| fatal(AgentError::Tls(e.to_string())))?;
                let cfg = tls::enrol_client_config(token.ca_sha256, keep_alive)
                    .map_err(|e| fatal(AgentError::Tls(e.to_string())))?;
                let hostname = nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default();
                info!(token = %token.id, "enrolling");
                (
                    cfg,
                    Mode::Enrol(EnrolRequest {
                        token: token.to_string(),
                        csr_der,
                        hostname,
                    }),
                    key.serialize_pem(),
                )
            }
        };
        let enrolling = matches!(mode, Mode::Enrol(_));
        let conn = endpoint
            .connect_with(
                client_config,
                self.config.controller,
                tls::controller_server_name(),
            )
            .map_err(|e| (e.into(), false))?
            .await
            .map_err(|e| match e {
                // While enrolling, a failed certificate check means the token's CA hash does not
                // match this controller: a wrong token or a wrong address, which retrying cannot
                // fix.
                quinn::ConnectionError::TransportError(t)
                    if enrolling && (0x100..0x200).contains(&u64::from(t.code)) =>
                {
                    fatal(AgentError::WrongController(t.reason))
                }
                other => (other.into(), false),
            })?;
        self.overlay
            .endpoint
            .control
            .send_replace(Some(conn.clone()));
        let relay_in = tokio::spawn(ov::relay_in(
            conn.clone(),
            self.overlay.endpoint.injector.clone(),
        ));
        let result = self
            .drive(&conn, hello, mode, &key_pem, creds.as_ref(), events)
            .await;
        relay_in.abort();
        self.overlay.endpoint.control.send_replace(None);
        conn.close(0u32.into(), b"");
        result
    }

    async fn drive(
        &mut self,
        conn: &quinn::Connection,
        hello: &Hello,
        mode: Mode,
        key_pem: &str,
        creds: Option<&Credentials>,
        events: &mut mpsc::UnboundedReceiver<ShellEvent>,
    ) -> Attempt {
        self.conn = Some(conn.clone());
        let (mut send, recv) = conn.open_bi().await.map_err(|e| (e.into(), false))?;
        // Reading happens in its own task: a frame read is not cancel-safe, and the loop below
        // wakes for timers.
        let (tx, mut rx) = mpsc::channel::<Result<ControllerMsg, AttemptError>>(8);
        let reader = tokio::spawn(async move {
            let mut recv = recv;
            loop {
                let item = match recv_msg::<ControllerMsg>(&mut recv).await {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => Err(AttemptError::StreamClosed),
                    Err(e) => Err(e.into()),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
        });
        let mut session = AgentSession::new(
            hello.clone(),
            mode,
            Timing {
                health_interval: self.config.health_interval,
                inventory_interval: self.config.inventory_interval,
                paths_interval: self.config.paths_interval,
            },
        );
        let mut outputs = session.start();
        self.boot.new_session();
        let result = loop {
            self.updates = session.speaks_updates();
            self.protocol = session.welcome().map_or(0, |w| w.protocol);
            match self.perform(&mut send, outputs, key_pem, creds).await {
                Ok(Some(end)) => break Ok(end),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            let deadline = session.poll_timeout().map(tokio::time::Instant::from_std);
            outputs = tokio::select! {
                item = rx.recv() => match item {
                    Some(Ok(msg)) => session.handle(Instant::now(), now_ms(), msg),
                    Some(Err(e)) => break Err(e),
                    None => break Err(AttemptError::StreamClosed),
                },
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    session.handle_timeout(Instant::now())
                }
                Some(event) = events.recv() => match self.shell_event(event, session.is_ready(), session.speaks_drives()) {
                    Some(msg) => vec![Output::Send(msg)],
                    None => vec![],
                },
            };
        };
        reader.abort();
        let ready = session.is_ready();
        match result {
            Ok(end) => Ok((end, ready)),
            Err(e) => Err((e, ready)),
        }
    }

    /// Turns an event from outside the control stream into a message for the controller, if any.
    fn shell_event(&mut self, event: ShellEvent, ready: bool, drives: bool) -> Option<AgentMsg> {
        match event {
            ShellEvent::Update {
                version,
                result: Ok(()),
            } => {
                let exe = lock(&self.updater).paths().exe.clone();
                info!(version = %version, "update installed");
                let e = updater::reexec(&exe);
                let report = lock(&self.updater).failed(
                    &version,
                    shoal_proto::UpdateFailure::Install(format!(
                        "re-executing {}: {e}",
                        exe.display()
                    )),
                );
                (ready && self.updates).then(|| self.update_report(report))
            }
            ShellEvent::Update {
                version,
                result: Err(failure),
            } => {
                let report = lock(&self.updater).failed(&version, failure);
                (ready && self.updates).then(|| self.update_report(report))
            }
            ShellEvent::RebootFailed(reason) => {
                warn!(%reason, "the reboot did not happen");
                (ready && self.updates).then_some(AgentMsg::RebootRefused { reason })
            }
            ShellEvent::RebootReady { method, ack } => {
                warn!(%ack, "rebooting");
                spawn_reboot(
                    self.overlay.events.clone(),
                    method,
                    ShellEvent::RebootFailed,
                );
                (ready && self.updates).then_some(AgentMsg::RebootAck { method: ack })
            }
            ShellEvent::Drives(DriveEvent::Report(report)) => {
                self.drives.last = Some(report.clone());
                (ready && drives).then_some(AgentMsg::Drives(report))
            }
            ShellEvent::Maintenance { step, outcome } => {
                self.maintenance_done(step, outcome, ready)
            }
            ShellEvent::Drives(DriveEvent::Answer(answer)) if answer.id & MAINT_DRIVE_ID != 0 => {
                let pending = self.maint.smart.as_mut()?;
                let device = pending.waiting.remove(&answer.id)?;
                match answer.result {
                    Ok(_) => pending.started.push(device),
                    Err(e) => pending.failed.push(format!("{device}: {e}")),
                }
                if !pending.waiting.is_empty() {
                    return None;
                }
                let pending = self.maint.smart.take()?;
                self.maintenance_done(pending.step.clone(), pending.outcome(), ready)
            }
            ShellEvent::Drives(DriveEvent::Answer(answer)) => {
                if !(ready && drives) {
                    warn!(id = answer.id, "a drive command ended while the controller was away; its result is not delivered");
                }
                (ready && drives).then_some(AgentMsg::DriveCommandResult(answer))
            }
            ShellEvent::Node(NodeEvent::RequestPunch(peer)) => {
                ready.then_some(AgentMsg::Punch(Punch {
                    peer,
                    endpoints: vec![],
                }))
            }
            ShellEvent::Probed { main, result } => {
                let probe = match result {
                    Ok(addr) => Some(addr),
                    Err(e) => {
                        warn!(cause = %e, "NAT probe failed; mapping behaviour unknown");
                        None
                    }
                };
                let local = ov::local_endpoints(
                    self.overlay.endpoint.port,
                    &self.config.overlay.tap_prefix,
                );
                let nat = ov::classify_nat(main, probe, &local);
                if nat == self.overlay.nat || !ready {
                    return None;
                }
                info!(?nat, observed = %main, "NAT mapping measured");
                self.overlay.nat = nat;
                Some(self.overlay.hello(self.config, false))
            }
        }
    }

    /// The controller's view of this node's address: measures the NAT's mapping with its probe
    /// port (the answer comes as [`ShellEvent::Probed`]); the message to send back, if any.
    fn observed(
        &mut self,
        o: shoal_proto::Observed,
        creds: Option<&Credentials>,
    ) -> Option<AgentMsg> {
        self.overlay.observed = Some(o.address);
        match (o.probe_port, creds) {
            (Some(port), Some(c)) => {
                let probe = SocketAddr::new(self.config.controller.ip(), port);
                let client = key_der(&c.key_pem).and_then(|k| {
                    tls::node_client_config(&c.ca_der, &c.cert_der, k, Duration::from_secs(5))
                        .map_err(|e| AgentError::Tls(e.to_string()))
                });
                let endpoint = self.overlay.endpoint.endpoint.clone();
                let events = self.overlay.events.clone();
                let main = o.address;
                tokio::spawn(async move {
                    let result = match client {
                        Ok(client) => ov::probe_observed(&endpoint, client, probe).await,
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = events.send(ShellEvent::Probed { main, result });
                });
                None
            }
            _ => self.shell_event(
                ShellEvent::Probed {
                    main: o.address,
                    result: Err("the controller has no probe port".into()),
                },
                true,
                false,
            ),
        }
    }

    /// A whole netmap: cached and handed to the datapath.
    fn netmap(&mut self, map: shoal_proto::Netmap) {
        info!(
            version = map.version,
            networks = map.networks.len(),
            peers = map.peers.len(),
            "netmap received"
        );
        self.overlay.cache.replace(map);
        self.overlay.push_netmap();
    }

    /// Netmap changes: applied to the cache, or a full netmap asked for when they do not follow on.
    fn netmap_delta(&mut self, delta: shoal_proto::NetmapDelta) -> Option<AgentMsg> {
        match self.overlay.cache.apply(&delta) {
            DeltaOutcome::Applied => {
                debug!(
                    version = delta.to_version,
                    changes = delta.changes.len(),
                    "netmap updated"
                );
                self.overlay.push_netmap();
                None
            }
            DeltaOutcome::Gap(gap) => {
                warn!(%gap, "netmap out of step; asking for a full one");
                Some(self.overlay.hello(self.config, true))
            }
        }
    }

    /// Runs the boot health checks off the async thread (a check program that hangs for more than
    /// [`CHECK_TIMEOUT`] counts as failed); the report to send, if any.
    async fn boot_checks(&mut self) -> Option<shoal_proto::BootReport> {
        let program = self.boot.program.clone();
        let image = self.boot.image().unwrap_or_default().to_owned();
        let job = tokio::task::spawn_blocking(move || {
            let version = crate::version::agent_version();
            crate::checks::run(
                program.as_deref(),
                &[
                    ("SHOAL_CHECK", "boot"),
                    ("SHOAL_AGENT_VERSION", &version),
                    ("SHOAL_IMAGE", &image),
                ],
            )
        });
        let checks = match tokio::time::timeout(CHECK_TIMEOUT, job).await {
            Ok(Ok(checks)) => checks,
            Ok(Err(e)) => {
                warn!(cause = %e, "boot checks failed to run");
                return None;
            }
            Err(_) => {
                let mut checks = crate::checks::run(None, &[]);
                let name = self
                    .boot
                    .program
                    .as_deref()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                checks.push(shoal_proto::CheckResult {
                    name: format!("check:{name}"),
                    passed: false,
                    detail: Some(format!("still running after {CHECK_TIMEOUT:?}")),
                });
                checks
            }
        };
        let report = self.boot.checked(checks, Instant::now())?;
        let failed: Vec<&str> = report
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name.as_str())
            .collect();
        if failed.is_empty() {
            info!(image = ?report.image, "boot checks passed");
        } else {
            warn!(image = ?report.image, ?failed, "boot checks failed; running them again every {:?}", self.boot.retry);
        }
        Some(report)
    }

    /// Carries out session outputs; returns the end of the session if one was reached.
    async fn perform(
        &mut self,
        send: &mut quinn::SendStream,
        outputs: Vec<Output>,
        key_pem: &str,
        creds: Option<&Credentials>,
    ) -> Result<Option<End>, AttemptError> {
        for output in outputs {
            match output {
                Output::Send(msg) => send_msg(send, &msg).await?,
                Output::SendHealth => {
                    // statvfs on a hung network mount blocks: collect off the async thread, with a
                    // deadline.
                    let mut collector = self
                        .health
                        .take()
                        .unwrap_or_else(|| HealthCollector::new(self.config.roots.clone()));
                    let job = tokio::task::spawn_blocking(move || {
                        let report = collector.collect(now_ms());
                        (collector, report)
                    });
                    match tokio::time::timeout(Duration::from_secs(5), job).await {
                        Ok(Ok((collector, report))) => {
                            self.health = Some(collector);
                            send_msg(send, &AgentMsg::Health(report)).await?;
                            // The heartbeat went out on an established session: a new version's
                            // checks.
                            let updater = self.updater.clone();
                            let changed = tokio::task::spawn_blocking(move || {
                                lock(&updater).heartbeat_sent()
                            })
                            .await
                            .ok()
                            .flatten();
                            if let Some(report) = changed.filter(|_| self.updates) {
                                send_msg(send, &self.update_report(report)).await?;
                            }
                            if self.updates && self.boot.due(Instant::now()) {
                                if let Some(report) = self.boot_checks().await {
                                    send_msg(send, &AgentMsg::BootReport(report)).await?;
                                }
                            }
                        }
                        Ok(Err(e)) => warn!(cause = %e, "health collection failed"),
                        // The stuck collector stays with its thread; the next report uses a fresh
                        // one.
                        Err(_) => warn!(
                            "health collection took over 5 s (a hung mount?); skipped this report"
                        ),
                    }
                }
                Output::SendInventory { force } => {
                    let roots = self.config.roots.clone();
                    let inv =
                        tokio::task::spawn_blocking(move || inventory::collect_inventory(&roots))
                            .await
                            .map_err(|e| AgentError::Tls(e.to_string()))?;
                    if force || self.last_inventory.as_ref() != Some(&inv) {
                        if !force {
                            info!("inventory changed; reporting");
                        }
                        send_msg(send, &AgentMsg::Inventory(inv.clone())).await?;
                        self.last_inventory = Some(inv);
                    }
                }
                Output::Renew => {
                    let key = rcgen::KeyPair::from_pem(key_pem)
                        .map_err(|e| AgentError::Tls(e.to_string()))?;
                    let csr_der =
                        pki::make_csr(&key).map_err(|e| AgentError::Tls(e.to_string()))?;
                    info!("renewing certificate");
                    send_msg(send, &AgentMsg::Renew(RenewRequest { csr_der })).await?;
                }
                Output::Rotate { reason } => {
                    let Some(c) = creds else { continue };
                    warn!(%reason, "the controller asks this node to rotate its key");
                    let old = rcgen::KeyPair::from_pem(key_pem)
                        .map_err(|e| AgentError::Tls(e.to_string()))?;
                    let new_pem = self.state.rotation_key().map_err(AgentError::from)?;
                    let new = rcgen::KeyPair::from_pem(&new_pem)
                        .map_err(|e| AgentError::Tls(e.to_string()))?;
                    let csr_der =
                        pki::make_csr(&new).map_err(|e| AgentError::Tls(e.to_string()))?;
                    let new_spki =
                        pki::csr_spki(&csr_der).map_err(|e| AgentError::Tls(e.to_string()))?;
                    let signature = pki::sign_rotation(&old, &c.node_id, &new_spki)
                        .map_err(|e| AgentError::Tls(e.to_string()))?;
                    send_msg(
                        send,
                        &AgentMsg::RotateKey(shoal_proto::RotateKeyRequest { csr_der, signature }),
                    )
                    .await?;
                }
                Output::StoreRotated(r) => {
                    if let Some(c) = creds {
                        let key_pem = self.state.rotation_key().map_err(AgentError::from)?;
                        let rotated = Credentials {
                            key_pem,
                            cert_der: r.cert_der,
                            not_after: r.not_after,
                            ..c.clone()
                        };
                        self.state
                            .save_rotated(&rotated)
                            .map_err(AgentError::from)?;
                        info!(
                            not_after = r.not_after.0,
                            "key rotated; reconnecting with the new key"
                        );
                    }
                }
                Output::StoreRenewed(r) => {
                    if let Some(c) = creds {
                        let mut renewed = c.clone();
                        renewed.cert_der = r.cert_der;
                        renewed.not_after = r.not_after;
                        self.state.save(&renewed).map_err(AgentError::from)?;
                        info!(not_after = r.not_after.0, "certificate renewed");
                        if let Some(node) = &self.overlay.node {
                            match key_der(&renewed.key_pem).and_then(|k| {
                                PeerTls::new(&renewed.ca_der, &renewed.cert_der, k)
                                    .map_err(|e| AgentError::Tls(e.to_string()))
                            }) {
                                Ok(tls) => {
                                    node.command(NodeCommand::Tls(tls));
                                }
                                Err(e) => warn!(cause = %e, "overlay keeps the old certificate"),
                            }
                        }
                    }
                }
                Output::StartOverlay => {
                    if let Some(c) = creds.filter(|_| self.config.overlay_enabled) {
                        self.overlay.ensure_node(self.config, c);
                        send_msg(send, &self.overlay.hello(self.config, false)).await?;
                    }
                }
                Output::Observed(o) => {
                    if let Some(reply) = self.observed(o, creds) {
                        send_msg(send, &reply).await?;
                    }
                }
                Output::Netmap(map) => self.netmap(map),
                Output::NetmapDelta(delta) => {
                    if let Some(reply) = self.netmap_delta(delta) {
                        send_msg(send, &reply).await?;
                    }
                }
                Output::Punch(p) => {
                    if let Some(node) = &self.overlay.node {
                        node.command(NodeCommand::Punch(p));
                    }
                }
                Output::SendDrives => {
                    if let Some(report) = &self.drives.last {
                        send_msg(send, &AgentMsg::Drives(report.clone())).await?;
                    }
                }
                Output::DrivePolicy(policy) => {
                    if let Some(tx) = &self.drives.inputs {
                        let _ = tx.send(DriveInput::Policy(policy));
                    }
                }
                Output::DriveCommand(c) => match &self.drives.inputs {
                    Some(tx) => {
                        let _ = tx.send(DriveInput::Command(c));
                    }
                    None => {
                        let answer = shoal_proto::DriveCommandResult {
                            id: c.id,
                            result: Err(
                                "the drive manager is off on this node (--no-drives)".into()
                            ),
                        };
                        send_msg(send, &AgentMsg::DriveCommandResult(answer)).await?;
                    }
                },
                Output::SendUpdateReport => {
                    let report = lock(&self.updater).report();
                    send_msg(send, &self.update_report(report)).await?;
                    self.fetch_conns.send_replace(self.conn.clone());
                }
                Output::UpdateOffer(offer) => {
                    if let Some(msg) =
                        self.update_offer(offer.version, &offer.release, offer.allow_downgrade)
                    {
                        send_msg(send, &msg).await?;
                    }
                }
                Output::RevertAgent { reason } => {
                    let paths = lock(&self.updater).paths().clone();
                    warn!(%reason, "the controller asks to revert to the previous binary");
                    match updater::restore_prev(&paths) {
                        Ok(true) => {
                            let e = updater::reexec(&paths.exe);
                            warn!(cause = %e, "could not re-execute the previous binary");
                        }
                        Ok(false) => warn!("no previous binary to revert to"),
                        Err(e) => warn!(cause = %e, "could not restore the previous binary"),
                    }
                }
                Output::KexecImage(image) => {
                    // Unsigned (a v4 controller): nothing this node can verify, so no kexec into
                    // it.
                    info!(image = %image.version, "the controller names an unsigned image for the next reboot; it will be a full reboot");
                    self.kexec = Some(reboot::NamedImage::Untrusted {
                        version: image.version,
                        why: "unsigned (KexecImage)",
                    });
                }
                Output::SignedKexecImage(image) => {
                    let ca = creds.map(|c| pki::sha256(&c.ca_der));
                    let named = reboot::check_image(&image, &self.config.reboot.image_keys, ca);
                    match &named {
                        reboot::NamedImage::Verified(_) => {
                            info!(image = %image.version, "the image named for the next reboot verified with this node's image key")
                        }
                        reboot::NamedImage::Refused { reason, .. } => {
                            warn!(image = %image.version, %reason, "the image named for the next reboot is refused; the reboot will be too")
                        }
                        reboot::NamedImage::Untrusted { why, .. } => {
                            info!(image = %image.version, why, "no kexec into the image named for the next reboot; it will be a full reboot")
                        }
                    }
                    self.kexec = Some(named);
                }
                Output::Reboot {
                    reason,
                    prefer_kexec,
                } => {
                    // One named image per reboot: a later request without one does not reuse it.
                    let named = self.kexec.take();
                    match reboot::decide(&self.config.reboot, prefer_kexec, named.as_ref()) {
                        Err(refusal) => {
                            warn!(%reason, %refusal, "the controller asks to reboot; refused");
                            send_msg(send, &AgentMsg::RebootRefused { reason: refusal }).await?;
                        }
                        Ok(method @ reboot::RebootMethod::KexecImage(_)) => {
                            // Load first (seconds), off the session loop; acknowledge with what
                            // will really happen (kexec, or the full reboot if loading failed).
                            warn!(%reason, %method, "the controller asks to reboot; loading the image first");
                            let events = self.overlay.events.clone();
                            let dir = self.config.reboot.kexec_dir.clone();
                            tokio::spawn(async move {
                                let (method, ack) = tokio::task::spawn_blocking(move || {
                                    reboot::prepare(method, &dir)
                                })
                                .await
                                .unwrap_or_else(|e| {
                                    (
                                        reboot::RebootMethod::Syscall,
                                        format!("reboot(2) (loading the image failed: {e})"),
                                    )
                                });
                                let _ = events.send(ShellEvent::RebootReady { method, ack });
                            });
                        }
                        Ok(method) => {
                            warn!(%reason, %method, "the controller asks to reboot; rebooting");
                            send_msg(
                                send,
                                &AgentMsg::RebootAck {
                                    method: method.to_string(),
                                },
                            )
                            .await?;
                            spawn_reboot(
                                self.overlay.events.clone(),
                                method,
                                ShellEvent::RebootFailed,
                            );
                        }
                    }
                }
                Output::MaintenanceStep(step) => {
                    if let Some(msg) = self.maintenance_step(step) {
                        send_msg(send, &msg).await?;
                    }
                }
                Output::SendPaths => {
                    let report = match &self.overlay.node {
                        Some(node) => node.report().await,
                        None => None,
                    };
                    if let Some(report) = report {
                        send_msg(send, &AgentMsg::Paths(report)).await?;
                    }
                }
                Output::End(End::Enrolled(e)) => {
                    let creds = Credentials {
                        key_pem: key_pem.to_owned(),
                        cert_der: e.cert_der.clone(),
                        ca_der: e.ca_der.clone(),
                        node_id: e.node_id.clone(),
                        not_after: e.not_after,
                    };
                    self.state.save_enrolled(&creds).map_err(AgentError::from)?;
                    info!(node = %e.node_id, "enrolled");
                    return Ok(Some(End::Enrolled(e)));
                }
                Output::End(end) => return Ok(Some(end)),
            }
        }
        Ok(None)
    }
}

impl Shell<'_> {
    /// A maintenance step from the controller: answered at once (done before, no hook, refused), or
    /// started (its answer comes as [`ShellEvent::Maintenance`]).
    fn maintenance_step(&mut self, step: shoal_proto::MaintenanceStep) -> Option<AgentMsg> {
        use shoal_proto::StepOutcome;
        let config = &self.config.maintenance;
        let boot_id = maint::read_boot_id(&config.boot_id_file);
        let exec_allowed = match &step.action {
            shoal_proto::MaintenanceAction::Exec { argv } => {
                let canonical = argv.first().and_then(|p| std::fs::canonicalize(p).ok());
                maint::check_exec(argv, canonical.as_deref(), &self.maint.allow)
            }
            _ => Ok(()),
        };
        let work = match self
            .maint
            .book
            .decide(&step, config, exec_allowed, &boot_id)
        {
            Decision::Ignore => {
                debug!(run = %step.run, step = step.step.as_str(), "maintenance step already running");
                return None;
            }
            Decision::Answer(outcome) => {
                self.store_reboot_record();
                info!(run = %step.run, step = step.step.as_str(), outcome = ?outcome, "maintenance step answered from the record");
                return Some(result_msg(&step, outcome));
            }
            Decision::Run(work) => work,
        };
        info!(run = %step.run, step = step.step.as_str(), action = %step.action, "maintenance step");
        let events = self.overlay.events.clone();
        match work {
            Work::Hook { command, .. } => {
                let config = config.clone();
                tokio::spawn(async move {
                    let outcome = maint::hook_step(&config, &command, &step).await;
                    let _ = events.send(ShellEvent::Maintenance { step, outcome });
                });
                None
            }
            Work::Exec(argv) => {
                let (config, allow) = (config.clone(), self.maint.allow.clone());
                tokio::spawn(async move {
                    let outcome = maint::exec_step(&config, &allow, &argv, &step).await;
                    let _ = events.send(ShellEvent::Maintenance { step, outcome });
                });
                None
            }
            Work::SmartTest => {
                let mut pending = PendingSmart {
                    step: step.clone(),
                    waiting: Default::default(),
                    started: vec![],
                    failed: vec![],
                    skipped: vec![],
                };
                let Some(inputs) = self.drives.inputs.clone() else {
                    return self.maintenance_done(
                        step,
                        StepOutcome::Done(
                            "no drives with SMART (the drive manager is off: --no-drives)".into(),
                        ),
                        true,
                    );
                };
                for drive in self.drives.last.iter().flat_map(|r| r.drives.iter()) {
                    match &drive.smart {
                        Some(shoal_proto::SmartOutcome::Report(_)) => {
                            self.maint.next_id += 1;
                            let id = MAINT_DRIVE_ID | self.maint.next_id;
                            pending.waiting.insert(id, drive.name.clone());
                            let cmd = shoal_proto::DriveCommand {
                                id,
                                device: drive.name.clone(),
                                action: shoal_proto::DriveAction::SelfTest(
                                    shoal_proto::SelfTestKind::Short,
                                ),
                            };
                            let _ = inputs.send(DriveInput::Command(cmd));
                        }
                        _ => pending.skipped.push(drive.name.clone()),
                    }
                }
                if pending.waiting.is_empty() {
                    let outcome = pending.outcome();
                    return self.maintenance_done(step, outcome, true);
                }
                self.maint.smart = Some(pending);
                None
            }
            Work::Reboot => {
                // A maintenance reboot is a full one (firmware, the real boot path), not kexec.
                let method = match reboot::decide(&self.config.reboot, false, None) {
                    Ok(m) => m,
                    Err(refusal) => {
                        return self.maintenance_done(step, StepOutcome::Failed(refusal), true)
                    }
                };
                let record = maint::RebootRecord {
                    run: step.run.clone(),
                    boot_id,
                };
                if let Err(e) = maint::store_record(&self.config.state_dir, Some(&record)) {
                    return self.maintenance_done(
                        step,
                        StepOutcome::Failed(format!(
                            "cannot record the reboot in the state dir: {e}"
                        )),
                        true,
                    );
                }
                self.maint.book.rebooting(record);
                warn!(run = %step.run, %method, "maintenance reboot");
                let answer = result_msg(&step, StepOutcome::Rebooting(method.to_string()));
                spawn_reboot(events, method, move |e| ShellEvent::Maintenance {
                    step,
                    outcome: StepOutcome::Failed(format!("the reboot did not happen: {e}")),
                });
                Some(answer)
            }
        }
    }

    /// A step's work ended: remember it, answer if the session can carry it (otherwise the
    /// controller repeats the step on the next connection).
    fn maintenance_done(
        &mut self,
        step: shoal_proto::MaintenanceStep,
        outcome: shoal_proto::StepOutcome,
        ready: bool,
    ) -> Option<AgentMsg> {
        self.maint.book.finished(&step.run, step.step, &outcome);
        self.store_reboot_record();
        info!(run = %step.run, step = step.step.as_str(), outcome = ?outcome, "maintenance step ended");
        (ready && self.updates).then(|| result_msg(&step, outcome))
    }

    fn store_reboot_record(&self) {
        if let Err(e) = maint::store_record(&self.config.state_dir, self.maint.book.reboot_record())
        {
            warn!(cause = %e, "cannot update the maintenance reboot record");
        }
    }
}

impl Shell<'_> {
    /// An update report as the current session can decode it
    /// ([`shoal_proto::UpdateReport::for_protocol`]).
    fn update_report(&self, report: shoal_proto::UpdateReport) -> AgentMsg {
        AgentMsg::UpdateReport(report.for_protocol(self.protocol))
    }

    /// An offer of `version` (v4 `UpdateAgent` or v5 `UpdateOffer`): verified, acknowledged and
    /// fetched in the background (installed when complete), or refused; the message to answer with.
    fn update_offer(
        &mut self,
        version: String,
        release: &shoal_proto::SignedRelease,
        allow_downgrade: bool,
    ) -> Option<AgentMsg> {
        let offer = lock(&self.updater).offer(&version, release, allow_downgrade);
        match (offer, self.conn.clone()) {
            (Ok(updater::Offer::InProgress), _) => Some(AgentMsg::UpdateAck { version }),
            (Ok(updater::Offer::Fetch(manifest)), Some(conn)) => {
                let ack = AgentMsg::UpdateAck {
                    version: version.clone(),
                };
                let (paths, policy) = {
                    let u = lock(&self.updater);
                    (u.paths().clone(), u.policy())
                };
                let shared = self.updater.clone();
                let events = self.overlay.events.clone();
                self.fetch_conns.send_replace(Some(conn));
                let conns = self.fetch_conns.subscribe();
                tokio::spawn(async move {
                    let result = match updater::fetch(conns, &paths, &manifest, &policy).await {
                        Ok(()) => {
                            // The health deadline runs from the install, not from the offer: a
                            // slow download must not use up the new version's time to pass its
                            // checks (it was rolled back at its first start, no check run).
                            let trying = lock(&shared).trying(&version);
                            tokio::task::spawn_blocking(move || updater::install(&paths, &trying))
                                .await
                                .unwrap_or_else(|e| {
                                    Err(shoal_proto::UpdateFailure::Install(e.to_string()))
                                })
                        }
                        Err(e) => {
                            let _ = std::fs::remove_file(&paths.download);
                            Err(e)
                        }
                    };
                    let _ = events.send(ShellEvent::Update { version, result });
                });
                Some(ack)
            }
            (Ok(updater::Offer::Fetch(_)), None) => {
                let report = lock(&self.updater).failed(
                    &version,
                    shoal_proto::UpdateFailure::Install("no connection to fetch on".into()),
                );
                Some(self.update_report(report))
            }
            (Err(report), _) => Some(self.update_report(*report)),
        }
    }
}

fn result_msg(step: &shoal_proto::MaintenanceStep, outcome: shoal_proto::StepOutcome) -> AgentMsg {
    AgentMsg::MaintenanceResult(shoal_proto::MaintenanceResult {
        run: step.run.clone(),
        step: step.step,
        outcome,
    })
}

/// Reboots after [`REBOOT_GRACE`] (for the acknowledgement to leave); a reboot that did not happen
/// comes back as the event `failed` makes of the error ([`ShellEvent::RebootFailed`] for a
/// controller's reboot request, a failed step for a maintenance reboot).
fn spawn_reboot(
    events: mpsc::UnboundedSender<ShellEvent>,
    method: reboot::RebootMethod,
    failed: impl FnOnce(String) -> ShellEvent + Send + 'static,
) {
    tokio::spawn(async move {
        tokio::time::sleep(REBOOT_GRACE).await;
        let result = tokio::task::spawn_blocking(move || reboot::execute(&method))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = result {
            let _ = events.send(failed(e));
        }
    });
}

fn key_der(key_pem: &str) -> Result<PrivateKeyDer<'static>, AgentError> {
    let key =
        rcgen::KeyPair::from_pem(key_pem).map_err(|e| AgentError::Tls(format!("node key: {e}")))?;
    Ok(pki::tls_key(&key))
}
