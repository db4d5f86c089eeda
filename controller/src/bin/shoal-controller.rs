//! `shoal-controller serve`: the fleet controller.

#[path = "shoal-controller/etcd.rs"]
mod etcd;
#[path = "shoal-controller/migrate.rs"]
mod migrate;
#[path = "shoal-controller/netboot.rs"]
mod netboot;
#[path = "shoal-controller/restore.rs"]
mod restore;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal_cmdline::LogFormat;
use shoal_controller::{server, server::Controller, server::ControllerConfig};
use shoal_controller_core::networks::{Subnet, MAX_MTU, MIN_MTU};

#[derive(Debug, Parser)]
#[command(name = "shoal-controller", version, about = "shoal fleet controller")]
struct Cli {
    /// Log lines on stderr as text or as one JSON object per line.
    #[arg(long, value_enum, default_value_t, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// The config file `serve` reads when `--config` is not given, if it exists.
const DEFAULT_CONFIG: &str = "/etc/shoal/controller.toml";

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller.
    Serve(Box<ServeArgs>),
    /// Restore a backup (`shoalctl controller backup`) into a new data dir, all or nothing: a wrong
    /// passphrase or a damaged file is refused and writes nothing.
    Restore(restore::RestoreArgs),
    /// Copy a stopped controller's store into etcd (for several controllers sharing it), and
    /// verify the copy. Refuses when the etcd prefix already holds data.
    Migrate(migrate::MigrateArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// A TOML file of `serve` flags: `flag-name = value` (or `flag_name`), a list for a repeatable
    /// flag, true for a switch. Flags on the command line (and their environment variables) win.
    /// Default /etc/shoal/controller.toml when it exists; '' for none.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory: store, CA, admin.conf.
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: PathBuf,
    /// UDP address for agents (QUIC).
    #[arg(long, default_value = "0.0.0.0:7440")]
    listen: SocketAddr,
    /// TCP address of the admin API (HTTPS).
    #[arg(long, default_value = "127.0.0.1:7441")]
    api: SocketAddr,
    /// A DNS name or IP address remote `shoalctl`s reach the admin API by, put in its
    /// certificate (repeatable; localhost and the loopback addresses are always in it).
    #[arg(long = "api-name", value_name = "NAME", value_parser = parse_api_name)]
    api_names: Vec<String>,
    /// TCP address to serve /metrics (Prometheus), /healthz and /readyz on, over plain HTTP
    /// without authentication: for a scraper on a trusted network. Off by default.
    #[arg(long, value_name = "IP:PORT")]
    metrics: Option<SocketAddr>,
    /// Interval at which agents report health (their heartbeat).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Missed heartbeats before a node is down.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    down_after: u32,
    /// Lifetime of node certificates (agents renew at two thirds).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
    /// Subnet of the `default` overlay network every node joins. Used when the network is created
    /// (first start); later starts keep the stored subnet and warn if this differs.
    #[arg(long, default_value = "10.90.0.0/16")]
    overlay_subnet: Subnet,
    /// TAP MTU of the `default` overlay network, and of networks created without `--mtu`.
    #[arg(long, default_value_t = 1380, value_parser = clap::value_parser!(u16).range(i64::from(MIN_MTU)..=i64::from(MAX_MTU)))]
    overlay_mtu: u16,
    /// Second UDP address agents measure their NAT's mapping against (default: the --listen port +
    /// 1).
    #[arg(long)]
    probe_listen: Option<std::net::SocketAddr>,
    /// Where agents reach this controller, as announced to agents and other controllers when
    /// several share one etcd cluster (default: the --listen address, unless it is a wildcard).
    #[arg(long, value_name = "ADDR")]
    advertise: Option<std::net::SocketAddr>,
    /// Leader lease TTL on etcd: a dead leader is replaced after about this long (etcd raises it
    /// to its minimum, 1.5 × its election timeout).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration, hide = true)]
    election_ttl: std::time::Duration,
    /// How long agents may use a cached netmap without hearing from the controller.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    netmap_validity: std::time::Duration,
    /// Relayed traffic from one node to one peer, Mbit/s (a token bucket per pair with a quarter
    /// second of burst), so one relayed pair cannot take the relay from the others.
    #[arg(long, default_value_t = 64.0, value_parser = parse_relay_mbit)]
    relay_pair_mbit: f64,
    /// Relayed traffic from one node to all its peers, Mbit/s, with its packet rate scaled along
    /// (default: 16 MiB/s, 134 Mbit/s, and 16 384 packets/s); for measuring the relay's capacity.
    #[arg(long, value_parser = parse_relay_mbit)]
    relay_sender_mbit: Option<f64>,
    /// Trusted agent release public key (a file with 64 hex characters, the `.pub` of the key
    /// `shoalctl release add --key` signs with); repeatable. Without one no release can be added.
    #[arg(long = "release-key", value_name = "FILE")]
    release_keys: Vec<PathBuf>,
    /// Back the controller itself up on a schedule to this backup target (`shoalctl backup
    /// target add`), into `<target url>/shoal-controller`, verifying each archive by restoring it.
    #[arg(long, value_name = "TARGET", requires = "dr_passphrase_file")]
    dr_target: Option<String>,
    /// When to back the controller up (five-field cron, read in --dr-tz).
    #[arg(long, default_value = "@daily")]
    dr_schedule: String,
    /// Time zone of --dr-schedule.
    #[arg(long, default_value = "UTC")]
    dr_tz: String,
    /// The scheduled archives' passphrase (first line of the file; at least 12 characters).
    #[arg(long, value_name = "FILE")]
    dr_passphrase_file: Option<PathBuf>,
    /// Scheduled archives kept in the target.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
    dr_keep: u32,
    /// QUIC handshakes in progress at once; more are refused.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_handshakes: u32,
    /// Unauthenticated (enrolment) connections open at once; more are closed and their agents
    /// retry.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    max_unauthenticated: u32,
    /// Of those, how many one remote address may hold (nodes behind one NAT share an address).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    max_unauthenticated_per_address: u32,
    /// How long an enrolment connection may stay open in all.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    enrolment_deadline: Duration,
    /// How often the rollout driver polls unfinished rollouts when nothing wakes it
    /// (`ControllerConfig::rollout_tick`). Hidden: a tuning knob for tests; the default suits
    /// production.
    #[arg(long, hide = true, default_value = "5s", value_parser = parse_tick)]
    rollout_tick: Duration,
    /// How often the backup scheduler looks for owed backups and verifications when nothing wakes
    /// it (`ControllerConfig::backup_tick`). Hidden: a tuning knob for tests.
    #[arg(long, hide = true, default_value = "5s", value_parser = parse_tick)]
    backup_tick: Duration,
    /// **Test hook**, hidden: moves the rollout driver's "now" by this many seconds (may be
    /// negative), e.g. into a maintenance window, by `ControllerConfig::rollout_clock.set_offset`.
    /// Only the maintenance code reads that clock (the rollout driver, `window list`, the times of
    /// rollout, window and budget events); liveness, certificates and everything else keep the wall
    /// clock. 0 (the default) in production.
    #[arg(
        long,
        hide = true,
        default_value_t = 0,
        allow_negative_numbers = true,
        value_name = "SECONDS"
    )]
    rollout_clock_offset: i64,
    #[command(flatten)]
    netboot: netboot::NetbootArgs,
    #[command(flatten)]
    etcd: etcd::EtcdArgs,
}

fn main() -> ExitCode {
    let command = <Cli as clap::CommandFactory>::command();
    let args = match shoal_cmdline::expand_config_file(
        &command,
        std::env::args_os().collect(),
        Path::new(DEFAULT_CONFIG),
    ) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("shoal-controller: {e}");
            // As clap's own usage errors.
            return ExitCode::from(2);
        }
    };
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&command.get_matches_from(args))
    {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    shoal_cmdline::init_logging(cli.log_format, "info,quinn=warn,sled=warn");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let args = match cli.command {
        Command::Serve(args) => *args,
        Command::Restore(args) => return restore::restore(args),
        Command::Migrate(args) => return migrate::migrate(args),
    };
    if args.cert_ttl < Duration::from_secs(60) {
        anyhow::bail!("--cert-ttl must be at least 1m");
    }
    let mut config = ControllerConfig::new(args.data_dir.clone());
    config.heartbeat_interval = args.heartbeat_interval;
    config.down_after = args.down_after;
    config.cert_ttl = args.cert_ttl;
    config.overlay_subnet = args.overlay_subnet;
    config.overlay_mtu = args.overlay_mtu;
    config.probe_listen = args.probe_listen;
    config.advertise = args.advertise;
    config.election_ttl = args.election_ttl;
    config.netmap_validity = args.netmap_validity;
    config.relay_pair_mbit = args.relay_pair_mbit;
    config.relay_sender_mbit = args.relay_sender_mbit;
    config.netboot = args.netboot.config()?;
    config.release_keys = args.release_keys.clone();
    config.api_names = args.api_names.clone();
    config.max_handshakes = args.max_handshakes as usize;
    config.max_unauthenticated = args.max_unauthenticated as usize;
    config.max_unauthenticated_per_address = args.max_unauthenticated_per_address as usize;
    config.enrolment_deadline = args.enrolment_deadline;
    config.rollout_tick = args.rollout_tick;
    config.backup_tick = args.backup_tick;
    config.etcd = args.etcd.config()?;
    if let (Some(target), Some(file)) = (&args.dr_target, &args.dr_passphrase_file) {
        let passphrase = std::fs::read_to_string(file)
            .with_context(|| format!("reading --dr-passphrase-file {}", file.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        shoal_api::dr::check_passphrase(&passphrase)
            .map_err(|e| anyhow::anyhow!("--dr-passphrase-file: {e}"))?;
        shoal_controller_core::backups::Schedule::new(&args.dr_schedule, &args.dr_tz)
            .map_err(|e| anyhow::anyhow!("--dr-schedule: {e}"))?;
        config.dr_schedule = Some(shoal_controller::dr::schedule::DrScheduleConfig {
            target: target.clone(),
            schedule: args.dr_schedule.clone(),
            tz: args.dr_tz.clone(),
            passphrase,
            keep: args.dr_keep,
        });
    }
    if args.rollout_clock_offset != 0 {
        tracing::warn!(
            seconds = args.rollout_clock_offset,
            "test hook: the rollout driver's clock is offset"
        );
        config
            .rollout_clock
            .set_offset(args.rollout_clock_offset.saturating_mul(1000));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let controller = Controller::open(config, args.api)
            .with_context(|| format!("opening data dir {}", args.data_dir.display()))?;
        let quic = std::net::UdpSocket::bind(args.listen)
            .with_context(|| format!("binding {} (UDP)", args.listen))?;
        // The controller relays peer traffic on this socket: bursts as large as a direct path's.
        shoal_overlay::udp_buffers::size_socket_buffers(&quic);
        let api = std::net::TcpListener::bind(args.api)
            .with_context(|| format!("binding {} (TCP)", args.api))?;
        let metrics = match args.metrics {
            Some(addr) => {
                let listener = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("binding --metrics {addr} (TCP)"))?;
                Some(shoal_controller::observe::serve(
                    controller.clone(),
                    listener,
                )?)
            }
            None => None,
        };
        server::run(controller, quic, api, shutdown_signal()).await?;
        if let Some(m) = metrics {
            m.graceful_shutdown(Some(Duration::from_secs(2)));
        }
        Ok(())
    })
}

/// `--api-name`: an IP address, or a DNS name (lowercased).
fn parse_api_name(s: &str) -> Result<String, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(ip.to_string());
    }
    shoal_cmdline::dns_name(s)
        .ok_or_else(|| format!("{s:?} is neither an IP address nor a DNS name"))
}

/// `--rollout-tick`: a humantime duration of at least 100 ms (a zero interval would spin).
fn parse_tick(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(100) {
        return Err("must be at least 100ms".into());
    }
    Ok(d)
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

/// `--relay-pair-mbit`, `--relay-sender-mbit`: a positive, finite rate that leaves room for one
/// full packet of burst.
fn parse_relay_mbit(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of megabits per second"))?;
    // A quarter second of burst must hold one relayed datagram (about 1500 bytes): 0.05 Mbit/s.
    if !v.is_finite() || v < 0.05 {
        return Err(format!(
            "{s} Mbit/s: a relay rate must be at least 0.05 Mbit/s"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::Cli;

    #[test]
    fn every_serve_flag_can_be_set_from_the_config_file() {
        let cmd = <Cli as clap::CommandFactory>::command();
        let checked = shoal_cmdline::testing::check_every_flag_from_file(&cmd, Some("serve"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(checked > 40, "only {checked} flags");
    }

    #[test]
    fn api_names_are_ip_addresses_or_dns_names() {
        assert_eq!(
            super::parse_api_name("Shoal.Example.org").as_deref(),
            Ok("shoal.example.org")
        );
        assert_eq!(super::parse_api_name("10.0.0.1").as_deref(), Ok("10.0.0.1"));
        assert!(super::parse_api_name("https://x").is_err());
    }

    #[test]
    fn the_relay_pair_rate_is_a_usable_number() {
        assert_eq!(super::parse_relay_mbit("64"), Ok(64.0));
        for bad in ["0", "-1", "NaN", "inf", "lots"] {
            let err = super::parse_relay_mbit(bad).unwrap_err();
            assert!(
                err.contains("megabits") || err.contains("at least"),
                "{bad}: {err}"
            );
        }
    }
}
