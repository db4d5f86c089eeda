//! How the agent runs ([`AgentConfig`], every field with its default) and why it stops
//! ([`AgentError`]).

use std::{path::PathBuf, time::Duration};

use shoal_overlay::node::NodeConfig;
use shoal_proto::Reject;

use crate::{
    controllers::ControllerAddr, drives::DrivesConfig, inventory::SysRoots,
    maintenance::MaintenanceConfig, reboot::RebootConfig, state::StateError,
    updater::UpdaterConfig,
};

/// How the agent runs. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The controllers' QUIC addresses (`--controller`, repeatable): at least one; the first is the
    /// one a new agent tries first. DNS names are resolved before every connection attempt. The
    /// agent adds the set its controller announces (protocol 7) and fails over between all of
    /// them.
    pub controllers: Vec<ControllerAddr>,
    /// Keep-alive interval of the control connection (default 1 s): holds NAT mappings and lets a
    /// dead controller be noticed within `control_idle_timeout`.
    pub control_keep_alive: Duration,
    /// How long a silent control connection lives (default 4 s): a controller that died without a
    /// word is given up after this, and the agent moves to another one.
    pub control_idle_timeout: Duration,
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
    /// How backup tasks run restic (default: `restic` on `$PATH`, work files under the state dir).
    pub backup: crate::backup::BackupConfig,
    /// (v9) Run a WireGuard gateway on this UDP address (`--wireguard-gateway`): the network's
    /// floating endpoint, bound by every gateway of it (default: none).
    pub wireguard_gateway: Option<std::net::SocketAddr>,
}

impl AgentConfig {
    /// Defaults for one controller address and a state dir (push more onto `controllers`).
    pub fn new(controller: impl Into<ControllerAddr>, state_dir: PathBuf) -> Self {
        let backup = crate::backup::BackupConfig::new(&state_dir);
        Self {
            controllers: vec![controller.into()],
            control_keep_alive: Duration::from_secs(1),
            control_idle_timeout: Duration::from_secs(4),
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
            backup,
            wireguard_gateway: None,
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
    /// The controller's certificate does not match the CA hash in the join token (the agent's only
    /// controller; with several, such a controller is skipped).
    #[error("the controller at the given address is not the one that issued this join token: {0}")]
    WrongController(String),
    /// No controller address was given.
    #[error("no controller address given (--controller)")]
    NoController,
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
