//! `shoal-agent`: the node daemon.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::Parser;
use shoal_agent::{
    blockdev::DriveMatch,
    daemon::{self, AgentConfig, AgentError},
    drives::DrivesConfig,
};

#[derive(Debug, Parser)]
#[command(name = "shoal-agent", version, about = "shoal node agent")]
struct Cli {
    /// Controller address (QUIC/UDP), IP:PORT.
    #[arg(long, env = "SHOAL_CONTROLLER")]
    controller: SocketAddr,
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
    /// Outer congestion controller of overlay peer connections: cubic, newreno or bbr.
    #[arg(long, default_value = "cubic")]
    overlay_cc: shoal_overlay::tls::Congestion,
    /// Do not manage drives (no SMART, no hot-add handling).
    #[arg(long)]
    no_drives: bool,
    /// Also count block devices whose kernel name matches GLOB as drives (repeatable; e.g. 'loop*').
    /// By default only physical disks are drives: no loop, ram, zram, dm, md.
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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,quinn=warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-agent: {e:#}");
            match e.downcast_ref::<AgentError>() {
                Some(AgentError::Refused(_) | AgentError::NoToken(_) | AgentError::BadToken(_) | AgentError::WrongController(_)) => {
                    ExitCode::from(2)
                }
                Some(AgentError::Revoked(_)) => ExitCode::from(3),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = AgentConfig::new(cli.controller, cli.state_dir);
    config.token = match (cli.token, cli.token_file) {
        (Some(t), _) => Some(t),
        (None, Some(path)) => Some(
            std::fs::read_to_string(&path).with_context(|| format!("reading token file {}", path.display()))?.trim().to_owned(),
        ),
        (None, None) => None,
    };
    config.machine_id = cli.machine_id;
    config.health_interval = cli.health_interval;
    config.overlay_port = cli.overlay_port;
    config.overlay.congestion = cli.overlay_cc;
    config.overlay_enabled = !cli.no_overlay;
    config.drives = if cli.no_drives {
        None
    } else {
        let mut drives =
            DrivesConfig { matcher: DriveMatch::new(&cli.drive_match).context("--drive-match")?, ..Default::default() };
        drives.prepare.mount_root = cli.drive_mount_root;
        drives.smart.smartctl = cli.smartctl;
        drives.timing.smart_interval = cli.smart_interval;
        Some(drives)
    };
    // One thread: the agent's work is a few messages a minute, and idle memory matters on small nodes.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
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
