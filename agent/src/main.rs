//! `shoal-agent`: the node daemon.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use clap::Parser;
use shoal_agent::{
    blockdev::DriveMatch,
    controllers::ControllerAddr,
    daemon::{self, AgentConfig, AgentError},
    drives::DrivesConfig,
};
use shoal_cmdline::LogFormat;

/// The config file read when `--config` is not given, if it exists.
const DEFAULT_CONFIG: &str = "/etc/shoal/agent.toml";

/// Exit status of a final stop: a refusal retrying cannot fix, or a bad flag or config file (as
/// clap's own usage errors). The package's unit does not restart on it.
const EXIT_REFUSED: u8 = 2;
/// Exit status of a node that was removed (or whose certificate is refused, without a token).
const EXIT_REMOVED: u8 = 3;

#[derive(Debug, Parser)]
#[command(name = "shoal-agent", version, about = "shoal node agent")]
struct Cli {
    /// A TOML file of flags: `flag-name = value` (or `flag_name`), a list for a repeatable flag,
    /// true for a switch. Flags on the command line (and their environment variables) win. Default
    /// /etc/shoal/agent.toml when it exists; '' for none.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log lines on stderr as text or as one JSON object per line.
    #[arg(long, value_enum, default_value_t)]
    log_format: LogFormat,
    /// Run from this executable, which self-updates replace (the package sets
    /// /var/lib/shoal-agent/bin/shoal-agent; dpkg's /usr/bin/shoal-agent is never written): the
    /// started binary puts itself there when that copy is missing or not newer, then re-executes
    /// it. Default: the running executable is the one self-updates replace.
    #[arg(long, value_name = "PATH")]
    exe: Option<PathBuf>,
    /// Controller address (QUIC/UDP): IP:PORT or NAME:PORT (a DNS name, resolved before every
    /// connection attempt); repeatable (the environment variable takes a comma-separated list).
    /// The agent also keeps the controllers its controller announces and fails over between all
    /// of them.
    #[arg(long, env = "SHOAL_CONTROLLER", value_delimiter = ',', required = true)]
    controller: Vec<ControllerAddr>,
    /// Join token (needed only until the agent has a certificate).
    #[arg(long, env = "SHOAL_TOKEN", conflicts_with = "token_file")]
    token: Option<String>,
    /// File holding the join token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// State dir for the node key and certificates.
    #[arg(long, env = "SHOAL_STATE_DIR", default_value = "/var/lib/shoal-agent")]
    state_dir: PathBuf,
    /// Identity override, for several agents on one host.
    #[arg(long)]
    machine_id: Option<String>,
    /// Health report interval (default: the controller's heartbeat interval).
    #[arg(long, value_parser = humantime::parse_duration)]
    health_interval: Option<Duration>,
    /// UDP port for the controller connection and overlay peers (default: the one kept in the state
    /// dir, random the first time).
    #[arg(long, default_value_t = 0)]
    overlay_port: u16,
    /// Do not join the overlay (no TAP device, no peer connections).
    #[arg(long)]
    no_overlay: bool,
    /// Run a WireGuard gateway on this UDP address (IP:PORT): the floating endpoint of the
    /// networks' WireGuard devices, bound by every gateway whether it holds the address or not.
    /// The controller gives the gateway its network's key and devices, and names the active
    /// gateway, which adds the address to the interface routing to it (see the operators' guide).
    #[arg(long, value_name = "LISTEN")]
    wireguard_gateway: Option<std::net::SocketAddr>,
    /// Outer congestion controller of overlay peer connections: cubic, newreno or bbr.
    #[arg(long, default_value = "cubic")]
    overlay_cc: shoal_overlay::tls::Congestion,
    /// Open overlay TAP devices without offloads (no virtio-net header, no TSO/GRO super-frames):
    /// one frame per read and write, as before offloads existed.
    #[arg(long)]
    overlay_no_offload: bool,
    /// Runtime worker threads (1..=16). 1, the default, runs the agent on one thread (smallest
    /// idle memory); more let the overlay's TAP readers, peer connections and TAP writers run on
    /// several cores at once, which measured slower on a 2-core machine (docs/performance.md,
    /// "Where the time goes after offloads").
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    threads: u16,
    /// Do not manage drives (no SMART, no hot-add handling).
    #[arg(long)]
    no_drives: bool,
    /// Also count block devices whose kernel name matches GLOB as drives (repeatable; e.g.
    /// 'loop*'). By default only physical disks are drives: no loop, ram, zram, dm, md.
    #[arg(long = "drive-match", value_name = "GLOB")]
    drive_match: Vec<String>,
    /// Where prepared drives are mounted, each at DIR/<filesystem UUID>.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/shoal/drives")]
    drive_mount_root: PathBuf,
    /// The smartctl binary (smartmontools).
    #[arg(long, value_name = "PATH", default_value = "smartctl")]
    smartctl: PathBuf,
    /// How often each drive's SMART is read.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30m")]
    smart_interval: Duration,
    /// The trusted release public key: 64 hex characters, or a file holding them (the `.pub` of the
    /// release signing key). Without it the agent refuses every update.
    #[arg(long, value_name = "HEX_OR_FILE")]
    release_key: Option<String>,
    /// How long a new agent version has to pass its health checks before the previous binary is
    /// restored.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2m")]
    update_health_deadline: Duration,
    /// Starts of a new version allowed (crashes count) before the previous binary is restored.
    #[arg(long, default_value_t = 3)]
    update_max_starts: u32,
    /// A program run as an extra health check, exit 0 passes: after every start (the boot report
    /// the controller's image rollouts wait for; failing checks are re-run every 10 s) and after an
    /// agent update. Gets SHOAL_CHECK (boot or update), SHOAL_AGENT_VERSION, SHOAL_IMAGE,
    /// SHOAL_AGENT_PREVIOUS. `--update-check` is the old name.
    #[arg(long = "health-check", alias = "update-check", value_name = "PATH")]
    health_check: Option<PathBuf>,
    /// A shell command run when the controller asks this node to reboot, instead of `kexec -e`
    /// (used when a kexec kernel is loaded) or the reboot(2) syscall after sync.
    #[arg(long, value_name = "CMD")]
    reboot_command: Option<String>,
    /// Refuse the controller's reboot requests (an image rollout then fails this node at its
    /// deadline and restores its previous image assignment).
    #[arg(long)]
    no_remote_reboot: bool,
    /// A program `shoalctl maintenance run exec` may run on this node (absolute path, compared
    /// after resolving symlinks; repeatable). Without any, every exec is refused.
    #[arg(long = "allow-exec", value_name = "PATH")]
    allow_exec: Vec<PathBuf>,
    /// A shell command run before every maintenance action (e.g. drain the node); exit 0 passes,
    /// otherwise the node refuses the action and runs --post-hook. Sees SHOAL_MAINTENANCE_ACTION,
    /// SHOAL_MAINTENANCE_RUN and SHOAL_MAINTENANCE_STEP.
    #[arg(long, value_name = "CMD")]
    pre_hook: Option<String>,
    /// A shell command run after every maintenance action, and after a failed one or pre-hook (e.g.
    /// uncordon the node).
    #[arg(long, value_name = "CMD")]
    post_hook: Option<String>,
    /// How long a maintenance hook or exec may run before it is killed.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30m")]
    maintenance_timeout: Duration,
    /// The restic program backup tasks run (Debian package `restic`).
    #[arg(long, value_name = "PATH", default_value = "restic")]
    restic: PathBuf,
    /// A directory `shoalctl backup restore --to` may write under (repeatable; default
    /// STATE_DIR/restore). Restores anywhere else are refused.
    #[arg(long = "allow-restore-to", value_name = "DIR")]
    allow_restore_to: Vec<PathBuf>,
    /// The longest one restic command of a backup task may run before it is killed.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    backup_timeout: Duration,
    /// Where the boot id is read, to tell a reboot from an agent restart (tests point it at a file
    /// their stand-in --reboot-command changes).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/proc/sys/kernel/random/boot_id"
    )]
    boot_id_file: PathBuf,
    /// A public key netboot images must be signed with for this node to kexec into them (the `.pub`
    /// of 64 hex characters `images/build.sh` writes, the one the controller's `--image-key` takes;
    /// repeatable). An image the controller names that none verifies is refused, and so is the
    /// reboot into it: the node stays up. Without any, the agent never kexecs a controller-named
    /// image and reboots fully instead (through firmware and netboot).
    #[arg(long = "image-key", value_name = "FILE")]
    image_key: Vec<PathBuf>,
    /// Never kexec when the controller asks for a reboot (always the full reboot through firmware),
    /// e.g. on hardware whose devices do not survive a kexec.
    #[arg(long)]
    no_kexec: bool,
}

fn main() -> ExitCode {
    // The reported version may come from the patched version slot (see shoal_agent::version).
    let version: &'static str = Box::leak(shoal_agent::version::agent_version().into_boxed_str());
    let command = <Cli as clap::CommandFactory>::command().version(version);
    let args = match shoal_cmdline::expand_config_file(
        &command,
        std::env::args_os().collect(),
        Path::new(DEFAULT_CONFIG),
    ) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("shoal-agent: {e}");
            return ExitCode::from(EXIT_REFUSED);
        }
    };
    let matches = command.get_matches_from(args);
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    shoal_cmdline::init_logging(cli.log_format, "info,quinn=warn");
    if let Some(exe) = &cli.exe {
        // Before anything else: the packaged binary hands over to the copy self-updates replace.
        if let Err(e) = shoal_agent::launch::ensure(exe, &cli.state_dir, version) {
            eprintln!("shoal-agent: {e}");
            return ExitCode::FAILURE;
        }
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-agent: {e:#}");
            match e.downcast_ref::<AgentError>() {
                Some(
                    AgentError::Refused(_)
                    | AgentError::NoToken(_)
                    | AgentError::BadToken(_)
                    | AgentError::WrongController(_),
                ) => ExitCode::from(EXIT_REFUSED),
                Some(AgentError::Revoked(_) | AgentError::CertificateRefused(_)) => {
                    ExitCode::from(EXIT_REMOVED)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut controllers = cli.controller.into_iter();
    let first = controllers.next().context("--controller is required")?;
    let mut config = AgentConfig::new(first, cli.state_dir);
    config.controllers.extend(controllers);
    config.update.exe = cli.exe;
    config.token = match (cli.token, cli.token_file) {
        (Some(t), _) => Some(t),
        (None, Some(path)) => Some(
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading token file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    config.machine_id = cli.machine_id;
    config.health_interval = cli.health_interval;
    config.overlay_port = cli.overlay_port;
    config.overlay.congestion = cli.overlay_cc;
    config.overlay.tap_offload = !cli.overlay_no_offload;
    config.overlay_enabled = !cli.no_overlay;
    if cli.wireguard_gateway.is_some() && cli.no_overlay {
        anyhow::bail!("--wireguard-gateway needs the overlay (drop --no-overlay)");
    }
    config.wireguard_gateway = cli.wireguard_gateway;
    config.drives = if cli.no_drives {
        None
    } else {
        let mut drives = DrivesConfig {
            matcher: DriveMatch::new(&cli.drive_match).context("--drive-match")?,
            ..Default::default()
        };
        drives.prepare.mount_root = cli.drive_mount_root;
        drives.smart.smartctl = cli.smartctl;
        drives.timing.smart_interval = cli.smart_interval;
        Some(drives)
    };
    config.update.release_key = match cli.release_key {
        None => None,
        Some(text) => {
            let text =
                if text.trim().len() == 64 && text.trim().bytes().all(|b| b.is_ascii_hexdigit()) {
                    text
                } else {
                    std::fs::read_to_string(&text)
                        .with_context(|| format!("reading release key file {text}"))?
                };
            Some(shoal_agent::release::ReleaseKey::parse(&text).context("--release-key")?)
        }
    };
    config.update.policy = shoal_agent::update::UpdatePolicy {
        health_deadline: cli.update_health_deadline,
        max_attempts: cli.update_max_starts,
        ..Default::default()
    };
    config.backup.restic = cli.restic;
    config.backup.timeout = cli.backup_timeout;
    if !cli.allow_restore_to.is_empty() {
        config.backup.restore_roots = cli.allow_restore_to;
    }
    config.update.check_command = cli.health_check;
    config.reboot.command = cli.reboot_command;
    config.reboot.allowed = !cli.no_remote_reboot;
    config.maintenance = shoal_agent::maintenance::MaintenanceConfig {
        allow_exec: cli.allow_exec,
        pre_hook: cli.pre_hook,
        post_hook: cli.post_hook,
        timeout: cli.maintenance_timeout,
        boot_id_file: cli.boot_id_file,
    };
    config
        .maintenance
        .canonical_allow()
        .map_err(anyhow::Error::msg)?;
    config.reboot.kexec = !cli.no_kexec;
    config.reboot.image_keys = cli
        .image_key
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading image key file {}", path.display()))?;
            shoal_agent::release::ImageKey::parse(&text)
                .with_context(|| format!("--image-key {}", path.display()))
        })
        .collect::<anyhow::Result<_>>()?;
    // One thread by default: the agent's control work is a few messages a minute, and idle memory
    // matters on small nodes; `--threads` trades memory for overlay throughput.
    let runtime = match cli.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(n))
            .enable_all()
            .build()?,
    };
    runtime.block_on(daemon::run(config, shutdown_signal()))?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;

    #[test]
    fn every_flag_can_be_set_from_the_config_file() {
        let cmd = <Cli as clap::CommandFactory>::command();
        let checked = shoal_cmdline::testing::check_every_flag_from_file(&cmd, None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(checked > 30, "only {checked} flags");
    }
}
