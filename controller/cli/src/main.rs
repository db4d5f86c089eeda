//! `shoalctl`: the operator's command line for the controller's admin API.

// First: its `say!` is used by every module after it.
#[macro_use]
mod printable;
mod backup;
mod cluster;
mod contexts;
mod controller;
mod generate;
mod identity;
mod maint;
mod netboot;
mod nodes;
mod output;
mod progress;
mod release;
mod watch;
mod wireguard;

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use shoal_api::{
    drives::{
        DriveCommandView, DrivePolicies, DrivePolicyView, DriveView, PrepareRequest, SetDrivePolicy,
    },
    networks::{CreateNetwork, MemberSpec, MemberView, NetworkDetail, NetworkUpdate, NetworkView},
    nodes::NodeView,
    overlay::{OverlayCountersView, PathView},
    report::{DriveAttention, FleetReport},
    tokens::{CreateToken, CreatedToken, TokenView},
    version::{VersionView, VERSION_PATH},
    AdminClient, AdminConf,
};

use output::{Out, OutputArgs};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(name = "shoalctl", version, about = "Operate a shoal fleet")]
struct Cli {
    /// Admin credentials written by the controller (DATA_DIR/admin.conf). Without it or
    /// --context: the current context of the shoalctl config file.
    #[arg(long, env = "SHOAL_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// The admin API's address instead of the one in the credentials: https://HOST:PORT or
    /// HOST:PORT, HOST a name or address in the API's certificate (`serve --api-name`).
    #[arg(long, env = "SHOAL_API", global = true, value_name = "URL")]
    api: Option<String>,
    /// A context of the shoalctl config file (~/.config/shoal/config.toml) instead of its current
    /// one.
    #[arg(long, env = "SHOAL_CONTEXT", global = true)]
    context: Option<String>,
    #[command(flatten)]
    out: OutputArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join tokens.
    #[command(subcommand, alias = "tokens")]
    Token(TokenCmd),
    /// Nodes in the fleet.
    #[command(subcommand, alias = "node")]
    Nodes(NodesCmd),
    /// Node certificates: list a node's, revoke one by serial.
    #[command(subcommand, alias = "cert")]
    Certs(identity::CertsCmd),
    /// Overlay networks and their members.
    #[command(subcommand, alias = "networks")]
    Network(NetworkCmd),
    /// Overlay paths and datapath counters, as the agents report them.
    #[command(subcommand)]
    Overlay(OverlayCmd),
    /// WireGuard access: devices that reach an overlay network with a stock WireGuard client.
    #[command(subcommand, alias = "wg")]
    Wireguard(wireguard::WireguardCmd),
    /// Drives: SMART health, preparation of new drives, self-tests, drive policies.
    #[command(subcommand, alias = "drive")]
    Drives(DrivesCmd),
    /// Netboot images.
    #[command(subcommand, alias = "images")]
    Image(netboot::ImageCmd),
    /// Signed agent releases and agent updates; the release signing key.
    #[command(subcommand, alias = "releases")]
    Release(release::ReleaseCmd),
    /// Machines seen on the netboot network.
    #[command(subcommand, alias = "machine")]
    Machines(netboot::MachinesCmd),
    /// Maintenance windows: when disruptive work may start.
    #[command(subcommand, alias = "windows")]
    Window(maint::WindowCmd),
    /// Disruption budgets per label group.
    #[command(subcommand, alias = "budgets")]
    Budget(maint::BudgetCmd),
    /// Rolling upgrades of agents or netboot images.
    #[command(subcommand, alias = "upgrades")]
    Upgrade(maint::UpgradeCmd),
    /// Maintenance actions (reboot, SMART self-tests, allowed commands) rolled over the fleet.
    #[command(subcommand)]
    Maintenance(maint::MaintenanceCmd),
    /// Backups: targets, jobs, runs, verification, snapshots, restores.
    #[command(subcommand, alias = "backups")]
    Backup(backup::BackupCmd),
    /// The controller itself: encrypted backups for disaster recovery.
    #[command(subcommand)]
    Controller(controller::ControllerCmd),
    /// The fleet's controllers (several on one etcd cluster): leader, agents, etcd health.
    #[command(subcommand)]
    Controllers(cluster::ControllersCmd),
    /// Fleet events (enrolled, up, down, removed...).
    #[command(alias = "event")]
    Events {
        /// Only events after this sequence number.
        #[arg(long)]
        after: Option<u64>,
        /// Keep printing new events as they are logged, until interrupted (Ctrl-C). With -o json,
        /// one JSON object per line.
        #[arg(short, long)]
        follow: bool,
        /// How often --follow asks the controller for new events.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        interval: Duration,
        /// Only events about the nodes this label selector matches.
        #[arg(short = 'l', long = "selector")]
        selector: Option<String>,
    },
    /// The fleet health report.
    Report {
        /// Exit with a non-zero status when something needs attention: 16 plus 1 (nodes), 2
        /// (drives), 4 (backups), 8 (rollouts), added up; 0 when nothing does. 1 stays "could
        /// not ask", 2 a usage error.
        #[arg(long)]
        exit_code: bool,
    },
    /// This shoalctl's version and the controller's (when the credentials reach one).
    Version {},
    /// The shoalctl config file: contexts (one per fleet) and the current one.
    #[command(subcommand)]
    Config(contexts::ConfigCmd),
    /// Print a shell completion script: `source <(shoalctl completion bash)`.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write shoalctl's man pages (shoalctl.1 and one per subcommand) into a directory.
    #[command(hide = true)]
    GenerateMan {
        /// The directory (created if absent).
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum OverlayCmd {
    /// Every peer path, per direction: kind (direct or relay), round-trip time, bytes each way.
    Paths {
        /// Only paths reported by the nodes this label selector matches.
        #[arg(short = 'l', long = "selector")]
        selector: Option<String>,
    },
    /// Frames forwarded, flooded, delivered and dropped (by reason), per node.
    Counters {
        /// Only the nodes this label selector matches.
        #[arg(short = 'l', long = "selector")]
        selector: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum DrivesCmd {
    /// One row per drive: node, device, serial, model, size, state, SMART verdict and its reasons.
    List {
        /// Only this node's drives (id or hostname).
        #[arg(long)]
        node: Option<String>,
        /// Only the drives of the nodes this label selector matches.
        #[arg(short = 'l', long = "selector")]
        selector: Option<String>,
    },
    /// Partition, format and mount a drive; waits for the node's answer (up to 10 minutes).
    ///
    /// Allowed on blank, awaiting-approval and prepare-failed drives. A drive that holds data is
    /// erased only with --force and its serial number. A drive whose SMART verdict is failing is
    /// never prepared.
    Prepare {
        /// Node id or hostname.
        node: String,
        /// Kernel name of the drive (sdb, nvme1n1; /dev/ is optional).
        device: String,
        /// Erase a drive that holds data. Needs --serial.
        #[arg(long, requires = "serial")]
        force: bool,
        /// The drive's serial number, as `drives list` shows it, to confirm --force.
        #[arg(long, requires = "force")]
        serial: Option<String>,
        /// Filesystem (default: the node's drive policy's).
        #[arg(long = "fs", value_enum)]
        fs: Option<FsArg>,
    },
    /// Start a SMART self-test; its progress and result show in `drives list`.
    Test {
        /// Node id or hostname.
        node: String,
        /// Kernel name of the drive.
        device: String,
        #[command(flatten)]
        kind: TestKind,
    },
    /// What nodes do with new drives: report (default), approve, or prepare.
    #[command(subcommand)]
    Policy(PolicyCmd),
}

/// Short or long self-test.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct TestKind {
    /// A few minutes: electrical and mechanical checks, a read scan of part of the surface.
    #[arg(long)]
    short: bool,
    /// A read scan of the whole surface; hours on a large HDD.
    #[arg(long)]
    long: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FsArg {
    Ext4,
    Xfs,
}

impl FsArg {
    fn name(self) -> &'static str {
        match self {
            FsArg::Ext4 => "ext4",
            FsArg::Xfs => "xfs",
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PolicyArg {
    /// Report new drives, nothing else.
    Report,
    /// Wait for `shoalctl drives prepare` on each new blank drive.
    Approve,
    /// Prepare new blank drives whose SMART is not failing at once.
    Prepare,
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Set the policy of a node, or of every node a label selector matches.
    ///
    /// A node's own policy wins; else the most cautious of the matching selectors' (report <
    /// approve < prepare); else report, ext4.
    Set {
        #[command(flatten)]
        who: Who,
        /// report, approve or prepare.
        #[arg(value_enum)]
        policy: PolicyArg,
        /// Filesystem of prepared drives (default ext4).
        #[arg(long = "fs", value_enum)]
        fs: Option<FsArg>,
    },
    /// Stored policies, and the policy each node follows.
    List {},
    /// Delete the policy of a node or a selector.
    Delete {
        #[command(flatten)]
        who: Who,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Create a join token; prints only the token (with -o json, the token and its id).
    Create {
        /// Time to live (e.g. 1h, 30m); none means it never expires.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Number of enrolments allowed; none means unlimited.
        #[arg(long)]
        uses: Option<u32>,
        /// Labels for nodes enrolled with it (KEY=VALUE), repeatable; the rules of `nodes label`.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List join tokens.
    List {},
    /// Revoke a join token by id.
    #[command(alias = "revoke")]
    Delete {
        /// Token id (the second field of the token, as listed).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodesCmd {
    /// List nodes.
    List {
        /// Only the nodes this label selector matches: KEY=VALUE, KEY!=VALUE, KEY, !KEY,
        /// KEY in (A,B), KEY notin (A,B), comma-separated (all must hold).
        #[arg(short = 'l', long = "selector")]
        selector: Option<String>,
    },
    /// Set or remove a node's labels: KEY=VALUE sets, KEY- removes. Networks, drive policies,
    /// budgets, windows and backup jobs that select by label follow at once.
    Label {
        /// Node id or hostname.
        node: String,
        /// KEY=VALUE to set, KEY- to remove.
        #[arg(required = true)]
        labels: Vec<String>,
        /// Allow giving a label the node has another value.
        #[arg(long)]
        overwrite: bool,
    },
    /// Show one node.
    Show {
        /// Node id or hostname.
        id: String,
    },
    /// Remove a node: it is disconnected at once and its certificate is refused from then on.
    #[command(alias = "remove")]
    Delete {
        /// Node id or hostname.
        id: String,
    },
    /// Choose the image a node netboots.
    SetImage {
        /// Node id or hostname.
        id: String,
        /// Image version.
        version: String,
    },
    /// Machines that claim an existing node without proof, waiting for an operator.
    Pending {},
    /// Approve a pending claim: the machine's next attempt (same key) re-enrols onto the node.
    Approve {
        /// Request id, from `nodes pending`.
        id: String,
    },
    /// Deny a pending claim: attempts with that key are refused from now on.
    Deny {
        /// Request id, from `nodes pending`.
        id: String,
    },
    /// Arm a one-time re-enrolment: the next machine that claims the node with a valid join token
    /// gets it (a diskless node that lost its key, a reinstalled machine). Refused while the node
    /// is connected.
    Reenrol {
        /// Node id or hostname.
        id: String,
        /// How long it stays armed (default 1h).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Make the node rotate to a new key (now if connected, else on its next session).
    RotateKey {
        /// Node id or hostname.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum NetworkCmd {
    /// Create a network.
    Create {
        /// Name: 1 to 31 of a-z, 0-9 and '-'.
        name: String,
        /// IPv4 subnet, CIDR (e.g. 10.91.0.0/24); must not overlap another network's.
        #[arg(long)]
        subnet: String,
        /// TAP MTU (default: the default network's, from `serve --overlay-mtu`).
        #[arg(long)]
        mtu: Option<u16>,
    },
    /// Add a node, or a label selector and every node it matches (now and later).
    Add {
        /// Network name.
        name: String,
        #[command(flatten)]
        who: Who,
    },
    /// Remove a node added by hand, or a selector and the nodes only it kept in the network.
    Remove {
        /// Network name.
        name: String,
        #[command(flatten)]
        who: Who,
    },
    /// Delete a network and all its memberships (not `default`).
    Delete {
        /// Network name.
        name: String,
    },
    /// List networks.
    List {},
    /// Show a network's members.
    Show {
        /// Network name.
        name: String,
    },
}

/// A node or a label selector.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct Who {
    /// Node id or hostname.
    #[arg(long)]
    node: Option<String>,
    /// Label selector: KEY=VALUE, KEY!=VALUE, KEY, !KEY, KEY in (A,B), KEY notin (A,B),
    /// comma-separated (all must hold).
    #[arg(short = 'l', long)]
    selector: Option<String>,
}

impl Who {
    fn spec(self, client: &AdminClient) -> anyhow::Result<MemberSpec> {
        Ok(MemberSpec {
            node: nodes::resolve_opt(client, self.node)?,
            selector: self.selector,
        })
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("label {s:?} is not KEY=VALUE")),
    }
}

/// `overlay counters` cells from the datapath report: OFFLOAD, then the wide QUEUES, FRAMES/READ,
/// FRAMES/WRITE and DGRAMS/BATCH; one `device:value` per TAP device, `-` from agents before
/// protocol 9.
fn overlay_datapath_cells(d: Option<&shoal_api::overlay::DatapathView>) -> Vec<String> {
    let Some(d) = d else {
        return vec!["-".into(); 5];
    };
    let mean = |m: Option<f64>| m.map_or_else(|| "-".into(), |m| format!("{m:.1}"));
    let per_tap = |cell: &dyn Fn(&shoal_api::overlay::TapView) -> String| {
        let cells: Vec<String> = d
            .taps
            .iter()
            .map(|t| format!("{}:{}", t.device, cell(t)))
            .collect();
        if cells.is_empty() {
            "-".into()
        } else {
            cells.join(" ")
        }
    };
    vec![
        per_tap(&|t| match (&t.fallback, t.offloads.is_empty()) {
            (Some(why), _) => format!("off({why})"),
            (None, true) => "off".into(),
            (None, false) => t.offloads.join(","),
        }),
        per_tap(&|t| t.queues.to_string()),
        per_tap(&|t| mean(t.frames_per_read)),
        per_tap(&|t| mean(t.frames_per_write)),
        mean(d.datagrams_per_batch),
    ]
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // `--config` typed on the command line and `--context` name two credentials: refuse rather
    // than pick one. From the environment, SHOAL_CONFIG yields to an explicit --context.
    let config_typed =
        matches.value_source("config") == Some(clap::parser::ValueSource::CommandLine);
    match run(cli, config_typed) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // API errors quote agent-supplied text (a drive command's answer, a node's reason).
            eprintln!("shoalctl: {}", printable::printable(&format!("{e:#}")));
            match e.downcast_ref::<watch::Unsuccessful>() {
                Some(u) => ExitCode::from(u.code()),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// `--api`: `https://HOST:PORT` as given, or `HOST:PORT` made one; nothing else.
fn api_url(api: &str) -> anyhow::Result<String> {
    let rest = api
        .strip_prefix("https://")
        .unwrap_or(api)
        .trim_end_matches('/');
    let valid = rest.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
    });
    if !valid || api.contains("://") && !api.starts_with("https://") {
        anyhow::bail!("--api {api:?}: expected https://HOST:PORT or HOST:PORT");
    }
    Ok(format!("https://{rest}"))
}

/// `shoalctl version`: the client's version always; the controller's when it answers.
fn version(conf: anyhow::Result<AdminConf>, out: &Out) -> anyhow::Result<u8> {
    #[derive(Serialize)]
    struct Versions<'a> {
        client: &'a str,
        server: Option<&'a VersionView>,
        error: Option<String>,
    }
    let client = env!("CARGO_PKG_VERSION");
    let server =
        conf.and_then(|conf| Ok(AdminClient::new(&conf)?.get::<VersionView>(VERSION_PATH)?));
    let versions = Versions {
        client,
        server: server.as_ref().ok(),
        error: server.as_ref().err().map(|e| format!("{e:#}")),
    };
    out.show(&versions, || {
        say!("shoalctl {client}");
        if let Ok(v) = &server {
            say!(
                "controller {} (agent protocol {}-{}, {} store, id {})",
                v.version,
                v.protocol_min,
                v.protocol_max,
                v.store,
                v.controller
            );
        }
    })?;
    server.map(|_| 0)
}

fn run(cli: Cli, config_typed: bool) -> anyhow::Result<u8> {
    let out = Out::new(&cli.out);
    let out = &out;
    // Commands that need no controller.
    let command = match cli.command {
        Command::Completion { shell } => return generate::completion(shell).map(|()| 0),
        Command::GenerateMan { dir } => return generate::man_pages(&dir).map(|()| 0),
        Command::Config(cmd) => {
            return contexts::config(cmd, cli.context.as_deref(), out).map(|()| 0)
        }
        Command::Release(release::ReleaseCmd::Keygen(k)) => {
            return release::keygen(&k, out).map(|()| 0)
        }
        command => command,
    };
    let conf = (|| {
        let source = contexts::Source::choose(cli.config, config_typed, cli.context)?;
        let mut conf = source.admin_conf()?;
        if let Some(api) = cli.api {
            conf.api = api_url(&api)?;
        }
        anyhow::Ok(conf)
    })();
    if let Command::Version {} = command {
        return version(conf, out);
    }
    let client = AdminClient::new(&conf?)?;
    match command {
        Command::Completion { shell } => generate::completion(shell)?,
        Command::GenerateMan { dir } => generate::man_pages(&dir)?,
        Command::Config(cmd) => contexts::config(cmd, None, out)?,
        Command::Token(TokenCmd::Create { ttl, uses, labels }) => {
            let req = CreateToken {
                ttl_secs: ttl.map(|d| d.as_secs().max(1)),
                max_uses: uses,
                labels: labels.into_iter().collect(),
            };
            let created: CreatedToken = client.create_token(&req)?;
            out.show(&created, || say!("{}", created.token))?;
        }
        Command::Token(TokenCmd::List {}) => {
            let tokens: Vec<TokenView> = client.get("/v1/tokens")?;
            out.show(&tokens, || {
                let rows = tokens.iter().map(|t| {
                    vec![
                        t.id.clone(),
                        t.state.clone(),
                        format!(
                            "{}/{}",
                            t.uses,
                            t.max_uses.map(|m| m.to_string()).unwrap_or("∞".into())
                        ),
                        out.age_or(t.expires_at.as_deref(), "never"),
                        labels_text(&t.labels),
                        t.created_at.clone(),
                        t.expires_at.clone().unwrap_or_else(|| "-".into()),
                    ]
                });
                out.table_wide(
                    &["ID", "STATE", "USES", "EXPIRES", "LABELS"],
                    &["CREATED AT", "EXPIRES AT"],
                    rows,
                );
            })?
        }
        Command::Token(TokenCmd::Delete { id }) => {
            let t: TokenView = client
                .delete(&format!("/v1/tokens/{id}"))?
                .context("empty answer")?;
            out.show(&t, || say!("revoked token {}", t.id))?;
        }
        Command::Nodes(NodesCmd::List { selector }) => {
            let nodes: Vec<NodeView> = client.nodes(selector.as_deref())?;
            out.show(&nodes, || {
                out.table_wide(
                    &[
                        "ID",
                        "HOSTNAME",
                        "STATUS",
                        "LAST SEEN",
                        "AGENT",
                        "CPUS",
                        "MEMORY",
                        "DISKS",
                        "ADDRESS",
                    ],
                    &["ENROLLED", "CONTROLLER", "KEY", "LABELS"],
                    nodes.iter().map(|n| {
                        let mut row = node_row(n, out);
                        row.push(labels_text(&n.labels));
                        row
                    }),
                );
            })?
        }
        Command::Nodes(NodesCmd::Label {
            node,
            labels,
            overwrite,
        }) => {
            let done = nodes::label(&client, &node, &labels, overwrite)?;
            out.show(&done, || {
                if done.changes.is_empty() {
                    say!(
                        "node {} ({}): not labeled, no change",
                        done.hostname,
                        done.node
                    )
                } else {
                    say!(
                        "node {} ({}) labeled: {}",
                        done.hostname,
                        done.node,
                        done.changes.join(", ")
                    )
                }
            })?
        }
        Command::Nodes(NodesCmd::Show { id }) => {
            let id = nodes::resolve(&client, &id)?;
            let node: NodeView = client.get(&format!("/v1/nodes/{id}"))?;
            out.show(&node, || {
                show_node(&node);
            })?
        }
        Command::Nodes(NodesCmd::Delete { id }) => {
            let id = nodes::resolve(&client, &id)?;
            // The API answers 204: the JSON is the node as it was.
            let node: NodeView = client.get(&format!("/v1/nodes/{id}"))?;
            client.delete::<serde_json::Value>(&format!("/v1/nodes/{id}"))?;
            out.show(&node, || say!("removed node {id}"))?;
        }
        Command::Network(cmd) => network(&client, cmd, out)?,
        Command::Wireguard(cmd) => wireguard::wireguard(&client, cmd, out)?,
        Command::Drives(cmd) => drives(&client, cmd, out)?,
        Command::Window(cmd) => maint::window(&client, cmd, out)?,
        Command::Backup(cmd) => backup::backup(&client, cmd, out)?,
        Command::Budget(cmd) => maint::budget(&client, cmd, out)?,
        Command::Upgrade(cmd) => maint::upgrade(&client, cmd, out)?,
        Command::Maintenance(cmd) => maint::maintenance(&client, cmd, out)?,
        Command::Overlay(OverlayCmd::Paths { selector }) => {
            let filter = nodes::matching(&client, selector.as_deref())?;
            let mut paths: Vec<PathView> = client.get("/v1/overlay/paths")?;
            paths.retain(|p| nodes::keep(&filter, &p.from));
            out.show(&paths, || {
                out.table(
                    &[
                        "FROM",
                        "TO",
                        "KIND",
                        "REMOTE",
                        "RTT",
                        "SENT",
                        "RECEIVED",
                        "RELAYED BECAUSE",
                    ],
                    paths.iter().map(|p| {
                        vec![
                            p.from.clone(),
                            p.to.clone(),
                            p.kind.clone(),
                            p.remote.clone().unwrap_or_else(|| "-".into()),
                            format!("{:.2} ms", p.rtt_ms),
                            p.tx_bytes.to_string(),
                            p.rx_bytes.to_string(),
                            p.relay_reason.clone().unwrap_or_else(|| "-".into()),
                        ]
                    }),
                );
            })?
        }
        Command::Overlay(OverlayCmd::Counters { selector }) => {
            let filter = nodes::matching(&client, selector.as_deref())?;
            let mut counters: Vec<OverlayCountersView> = client.get("/v1/overlay/counters")?;
            counters.retain(|c| nodes::keep(&filter, &c.node));
            out.show(&counters, || {
                out.table_wide(
                    &[
                        "NODE",
                        "FORWARDED",
                        "FLOODED",
                        "DELIVERED",
                        "DROPPED",
                        "OFFLOAD",
                    ],
                    &["QUEUES", "FRAMES/READ", "FRAMES/WRITE", "DGRAMS/BATCH"],
                    counters.iter().map(|c| {
                        let dropped = c
                            .dropped
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(" ");
                        let mut row = vec![
                            c.node.clone(),
                            c.forwarded.to_string(),
                            c.flooded.to_string(),
                            c.delivered.to_string(),
                            dropped,
                        ];
                        row.extend(overlay_datapath_cells(c.datapath.as_ref()));
                        row
                    }),
                );
            })?
        }
        Command::Nodes(NodesCmd::SetImage { id, version }) => {
            netboot::set_image(&client, &nodes::resolve(&client, &id)?, &version, out)?
        }
        Command::Nodes(NodesCmd::Pending {}) => identity::pending(&client, out)?,
        Command::Nodes(NodesCmd::Approve { id }) => identity::decide(&client, &id, true, out)?,
        Command::Nodes(NodesCmd::Deny { id }) => identity::decide(&client, &id, false, out)?,
        Command::Nodes(NodesCmd::Reenrol { id, ttl }) => {
            identity::reenrol(&client, &nodes::resolve(&client, &id)?, ttl, out)?
        }
        Command::Nodes(NodesCmd::RotateKey { id }) => {
            identity::rotate_key(&client, &nodes::resolve(&client, &id)?, out)?
        }
        Command::Certs(cmd) => identity::certs(&client, cmd, out)?,
        Command::Image(cmd) => netboot::image(&client, cmd, out)?,
        Command::Release(cmd) => release::release(&client, cmd, out)?,
        Command::Machines(cmd) => netboot::machines(&client, cmd, out)?,
        Command::Controller(cmd) => controller::controller(&client, cmd, out)?,
        Command::Controllers(cmd) => cluster::controllers(&client, cmd, out)?,
        Command::Events {
            after,
            follow,
            interval,
            selector,
        } => watch::events(&client, after, follow, interval, selector.as_deref(), out)?,
        Command::Report { exit_code } => {
            let report: FleetReport = client.get("/v1/report")?;
            out.show(&report, || {
                print_report(&report, out);
            })?;
            if exit_code {
                return Ok(report.exit_code());
            }
        }
        Command::Version { .. } => unreachable!("answered above"),
    }
    Ok(0)
}

fn network(client: &AdminClient, cmd: NetworkCmd, out: &Out) -> anyhow::Result<()> {
    match cmd {
        NetworkCmd::Create { name, subnet, mtu } => {
            let net = client.create_network(&CreateNetwork { name, subnet, mtu })?;
            out.show(&net, || {
                say!(
                    "created network {} ({}, MTU {}, id {})",
                    net.name,
                    net.subnet,
                    net.mtu,
                    net.id
                );
            })?
        }
        NetworkCmd::Add { name, who } => {
            print_update(&client.add_to_network(&name, &who.spec(client)?)?, out)?
        }
        NetworkCmd::Remove { name, who } => {
            print_update(&client.remove_from_network(&name, &who.spec(client)?)?, out)?
        }
        NetworkCmd::Delete { name } => {
            let update = client.delete_network(&name)?;
            out.show(&update, || {
                say!(
                    "deleted network {name}; {} members left it",
                    update.left.len()
                );
            })?
        }
        NetworkCmd::List {} => {
            let networks: Vec<NetworkView> = client.networks()?;
            out.show(&networks, || {
                out.table(
                    &["ID", "NAME", "SUBNET", "MTU", "MEMBERS", "SELECTORS"],
                    networks.iter().map(|n| {
                        vec![
                            n.id.to_string(),
                            n.name.clone(),
                            n.subnet.clone(),
                            n.mtu.to_string(),
                            n.members.to_string(),
                            n.selectors.join(","),
                        ]
                    }),
                );
            })?
        }
        NetworkCmd::Show { name } => {
            let detail: NetworkDetail = client.network(&name)?;
            out.show(&detail, || {
                let n = &detail.network;
                say!(
                    "network {} (id {}): {}, MTU {}",
                    n.name,
                    n.id,
                    n.subnet,
                    n.mtu
                );
                if !n.selectors.is_empty() {
                    say!("selectors: {}", n.selectors.join(","));
                }
                say!();
                out.table(
                    &["NODE", "HOSTNAME", "MAC", "ADDRESS", "VIA"],
                    detail.members.iter().map(member_row),
                );
            })?;
        }
    }
    Ok(())
}

fn drives(client: &AdminClient, cmd: DrivesCmd, out: &Out) -> anyhow::Result<()> {
    match cmd {
        DrivesCmd::List { node, selector } => {
            let node = nodes::resolve_opt(client, node)?;
            let filter = nodes::matching(client, selector.as_deref())?;
            let mut drives = client.drives(node.as_deref())?;
            drives.retain(|d| nodes::keep(&filter, &d.node));
            out.show(&drives, || {
                if drives.is_empty() {
                    say!("no drives reported");
                } else {
                    out.table(
                        &[
                            "NODE", "DEVICE", "SERIAL", "MODEL", "SIZE", "STATE", "VERDICT",
                            "REASONS",
                        ],
                        drives.iter().map(drive_row),
                    );
                }
            })?;
        }
        DrivesCmd::Prepare {
            node,
            device,
            force,
            serial,
            fs,
        } => {
            let req = PrepareRequest {
                force,
                serial,
                filesystem: fs
                    .map(|f| f.name().parse())
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
            };
            let node = nodes::resolve(client, &node)?;
            let device = device.trim_start_matches("/dev/");
            let done = progress::ticking(&format!("preparing {device} on {node}"), || {
                client.prepare_drive(&node, device, &req)
            })?;
            print_command(&done, out)?;
        }
        DrivesCmd::Test { node, device, kind } => {
            let kind = if kind.long { "long" } else { "short" };
            let node = nodes::resolve(client, &node)?;
            let done = client.self_test_drive(&node, device.trim_start_matches("/dev/"), kind)?;
            print_command(&done, out)?;
        }
        DrivesCmd::Policy(PolicyCmd::Set { who, policy, fs }) => {
            let spec = who.spec(client)?;
            let mode = match policy {
                PolicyArg::Report => "report",
                PolicyArg::Approve => "approve",
                PolicyArg::Prepare => "prepare",
            };
            let req = SetDrivePolicy {
                node: spec.node,
                selector: spec.selector,
                mode: mode.into(),
                filesystem: fs.map(|f| f.name().into()),
            };
            let set: DrivePolicyView = client.set_drive_policy(&req)?;
            out.show(&set, || {
                say!(
                    "drive policy for {}: {}, {}",
                    policy_target(&set),
                    set.mode,
                    set.filesystem
                );
            })?
        }
        DrivesCmd::Policy(PolicyCmd::List {}) => {
            let all: DrivePolicies = client.drive_policies()?;
            out.show(&all, || {
                if all.policies.is_empty() {
                    say!("no drive policies: every node reports new drives (report, ext4)");
                } else {
                    out.table(
                        &["FOR", "POLICY", "FS", "SET"],
                        all.policies.iter().map(|p| {
                            vec![
                                policy_target(p),
                                p.mode.clone(),
                                p.filesystem.clone(),
                                p.set_at.clone(),
                            ]
                        }),
                    );
                }
                if !all.effective.is_empty() {
                    say!();
                    out.table(
                        &["NODE", "HOSTNAME", "POLICY", "FS", "FROM"],
                        all.effective.iter().map(|e| {
                            vec![
                                e.node.clone(),
                                e.hostname.clone(),
                                e.mode.clone(),
                                e.filesystem.clone(),
                                e.source.clone(),
                            ]
                        }),
                    );
                }
            })?
        }
        DrivesCmd::Policy(PolicyCmd::Delete { who }) => {
            let gone: DrivePolicyView = client.delete_drive_policy(&who.spec(client)?)?;
            out.show(&gone, || {
                say!(
                    "deleted the drive policy for {} (was {}, {})",
                    policy_target(&gone),
                    gone.mode,
                    gone.filesystem
                );
            })?;
        }
    }
    Ok(())
}

fn policy_target(p: &DrivePolicyView) -> String {
    match (&p.node, &p.selector) {
        (Some(n), _) => format!("node {n}"),
        (_, Some(s)) => format!("selector {s}"),
        _ => "?".into(),
    }
}

fn print_command(done: &DriveCommandView, out: &Out) -> anyhow::Result<()> {
    out.show(done, || {
        say!(
            "{} {} on {}: {}",
            done.action,
            done.device,
            done.node,
            done.message
        );
    })?;
    Ok(())
}

fn drive_row(d: &DriveView) -> Vec<String> {
    let state = match &d.state_detail {
        Some(s) if s.signatures.is_some() => format!(
            "{} ({})",
            d.state,
            s.signatures.as_deref().unwrap_or_default().join(", ")
        ),
        Some(s) if s.mount_point.is_some() => format!(
            "{} ({} {} on {})",
            d.state,
            s.partition.as_deref().unwrap_or("?"),
            s.filesystem.as_deref().unwrap_or("?"),
            s.mount_point.as_deref().unwrap_or("?")
        ),
        Some(s) if s.reason.is_some() => {
            format!("{}: {}", d.state, s.reason.as_deref().unwrap_or_default())
        }
        _ => d.state.clone(),
    };
    let smart = &d.smart;
    let reason = smart.reason.as_deref().unwrap_or("no reason given");
    let verdict = match smart.status.as_str() {
        "no-smart" => format!("no SMART: {reason}"),
        "failed" if smart.verdict == "unknown" => format!("SMART read failed: {reason}"),
        "failed" => format!("{} (latest SMART read failed: {reason})", smart.verdict),
        "pending" if smart.verdict == "unknown" => "SMART not read yet".to_owned(),
        _ => smart.verdict.clone(),
    };
    let mut reasons = smart.reasons.clone();
    if let Some(t) = &smart.self_test {
        let kind = t
            .kind
            .as_deref()
            .map(|k| format!("{k} "))
            .unwrap_or_default();
        reasons.push(match t.state.as_str() {
            "running" => match t.remaining_percent {
                Some(p) => format!("{kind}self-test running, {p}% left"),
                None => format!("{kind}self-test running"),
            },
            state => format!(
                "{kind}self-test {state}: {}",
                t.result.as_deref().unwrap_or("")
            ),
        });
    }
    vec![
        d.node.clone(),
        d.device.clone(),
        d.serial.clone().unwrap_or_else(|| "-".into()),
        d.model.clone().unwrap_or_else(|| "-".into()),
        bytes_text(d.size_bytes),
        state,
        verdict,
        reasons.join("; "),
    ]
}

fn member_row(m: &MemberView) -> Vec<String> {
    let via = match (m.explicit, m.via_selector) {
        (true, true) => "node,selector",
        (true, false) => "node",
        (false, true) => "selector",
        (false, false) => "default",
    };
    vec![
        m.node.clone(),
        m.hostname.clone(),
        m.mac.clone(),
        m.address.clone(),
        via.to_owned(),
    ]
}

fn print_update(update: &NetworkUpdate, out: &Out) -> anyhow::Result<()> {
    out.show(update, || {
        let n = &update.network;
        say!(
            "network {}: {} joined, {} left, {} members",
            n.name,
            update.joined.len(),
            update.left.len(),
            n.members
        );
        for m in &update.joined {
            say!("joined: {} {} {} {}", m.node, m.hostname, m.address, m.mac);
        }
        for id in &update.left {
            say!("left:   {id}");
        }
    })?;
    Ok(())
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn bytes_text(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn node_row(n: &NodeView, out: &Out) -> Vec<String> {
    let inv = n.inventory.as_ref();
    let address = inv
        .and_then(|i| {
            i.nics
                .iter()
                .flat_map(|nic| nic.addresses.iter())
                .find(|a| !a.starts_with("fe80") && a.contains('.'))
                .cloned()
        })
        .unwrap_or_default();
    vec![
        n.id.clone(),
        n.hostname.clone(),
        n.status.clone(),
        out.age_or(n.last_seen.as_deref(), "never"),
        n.agent_version.clone(),
        inv.map(|i| i.cpu_cores.to_string()).unwrap_or_default(),
        inv.map(|i| bytes_text(i.memory_bytes)).unwrap_or_default(),
        inv.map(|i| i.disks.len().to_string()).unwrap_or_default(),
        address,
        out.age(&n.enrolled_at),
        n.controller.clone().unwrap_or_else(|| "-".into()),
        n.key.clone().unwrap_or_else(|| "-".into()),
    ]
}

fn show_node(n: &NodeView) {
    say!("id:            {}", n.id);
    say!("hostname:      {}", n.hostname);
    say!(
        "status:        {}{}",
        n.status,
        if n.connected { " (connected)" } else { "" }
    );
    say!(
        "last seen:     {}",
        n.last_seen.as_deref().unwrap_or("never")
    );
    say!("agent:         {}", n.agent_version);
    say!(
        "key:           {}",
        n.key.as_deref().unwrap_or("not bound yet")
    );
    if let Some(b) = &n.boot {
        let checks: Vec<String> = b
            .checks
            .iter()
            .map(|c| {
                format!(
                    "{} {}{}",
                    c.name,
                    if c.passed { "ok" } else { "FAILED" },
                    c.detail
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                )
            })
            .collect();
        say!(
            "booted:        {} (boot id {})",
            b.image
                .as_deref()
                .map(|i| format!("image {i}"))
                .unwrap_or_else(|| "not a netboot image".into()),
            b.boot_id
        );
        say!(
            "boot checks:   {}: {}",
            if b.healthy() { "healthy" } else { "unhealthy" },
            checks.join(", ")
        );
    }
    say!("enrolled:      {}", n.enrolled_at);
    say!("hardware id:   {}", n.hardware_id);
    if !n.labels.is_empty() {
        say!("labels:        {}", labels_text(&n.labels));
    }
    for o in &n.overlay {
        say!(
            "overlay:       {} {}/{} {}",
            o.network,
            o.address,
            o.prefix_len,
            o.mac
        );
    }
    if let Some(i) = &n.inventory {
        say!("os:            {} (kernel {}, {})", i.os, i.kernel, i.arch);
        say!("cpu:           {} x {}", i.cpu_cores, i.cpu_model);
        say!("memory:        {}", bytes_text(i.memory_bytes));
        say!("boot:          {:?}", i.boot_mode);
        let dmi = [&i.dmi.vendor, &i.dmi.product, &i.dmi.serial]
            .iter()
            .filter_map(|v| v.as_deref())
            .collect::<Vec<_>>()
            .join(" / ");
        if !dmi.is_empty() {
            say!("system:        {dmi}");
        }
        for d in &i.disks {
            say!(
                "disk:          {} {} {} {}{}",
                d.name,
                bytes_text(d.size_bytes),
                d.model.as_deref().unwrap_or("-"),
                d.serial.as_deref().unwrap_or("-"),
                if d.rotational { " (rotational)" } else { "" }
            );
        }
        for nic in &i.nics {
            say!(
                "nic:           {} {} {} {}",
                nic.name,
                nic.mac.as_deref().unwrap_or("-"),
                nic.speed_mbps
                    .map(|s| format!("{s}Mb/s"))
                    .unwrap_or("-".into()),
                nic.addresses.join(" ")
            );
        }
    }
    if let Some(h) = &n.health {
        say!(
            "uptime:        {}",
            humantime::format_duration(Duration::from_secs(h.uptime_secs))
        );
        say!(
            "load:          {:.2} {:.2} {:.2}",
            h.load.one,
            h.load.five,
            h.load.fifteen
        );
        say!("cpu use:       {:.1}%", h.cpu_percent);
        say!(
            "memory use:    {:.1}% of {}",
            h.memory_used_percent(),
            bytes_text(h.memory_total_bytes)
        );
        for fs in &h.filesystems {
            say!(
                "filesystem:    {} {:.0}% of {} ({})",
                fs.mount,
                fs.used_percent(),
                bytes_text(fs.total_bytes),
                fs.fs_type
            );
        }
    }
}

fn print_report(r: &FleetReport, out: &Out) {
    let counts = r
        .by_status
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ");
    say!(
        "fleet report at {}: {} nodes ({counts})",
        r.generated_at,
        r.total
    );
    if r.attention.is_empty() {
        say!("no node needs attention");
    } else {
        say!();
        out.table(
            &["ID", "HOSTNAME", "STATUS", "NEEDS ATTENTION"],
            r.attention.iter().map(|a| {
                vec![
                    a.id.clone(),
                    a.hostname.clone(),
                    a.status.clone(),
                    a.reasons.join("; "),
                ]
            }),
        );
    }
    let d = &r.drives;
    let total: usize = d.by_verdict.values().sum();
    let counts = ["ok", "warning", "failing", "unknown"]
        .iter()
        .map(|v| format!("{} {v}", d.by_verdict.get(*v).copied().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ");
    say!();
    say!(
        "drives: {total} ({counts}); {} missing, {} awaiting approval",
        d.missing.len(),
        d.awaiting_approval.len()
    );
    let row = |kind: &str, a: &DriveAttention| {
        vec![
            kind.to_owned(),
            a.node.clone(),
            a.hostname.clone(),
            a.device.clone(),
            a.serial.clone().unwrap_or_else(|| "-".into()),
            a.reasons.join("; "),
        ]
    };
    let rows: Vec<Vec<String>> = d
        .attention
        .iter()
        .map(|a| row(&a.verdict.to_uppercase(), a))
        .chain(d.missing.iter().map(|a| row("MISSING", a)))
        .chain(
            d.awaiting_approval
                .iter()
                .map(|a| row("AWAITING APPROVAL", a)),
        )
        .collect();
    if !rows.is_empty() {
        say!();
        out.table(
            &["DRIVE", "NODE", "HOSTNAME", "DEVICE", "SERIAL", "WHY"],
            rows.into_iter(),
        );
    }
    say!();
    if r.rollouts.is_empty() {
        say!("rollouts: none needs attention");
    } else {
        say!("rollouts: {} need(s) attention", r.rollouts.len());
        out.table(
            &["ROLLOUT", "TARGET", "STATE", "FAILED", "WHY"],
            r.rollouts.iter().map(|a| {
                vec![
                    a.id.clone(),
                    a.target.clone(),
                    a.state.clone(),
                    a.failed.to_string(),
                    a.reason.clone(),
                ]
            }),
        );
    }
    say!();
    if r.backups.is_empty() {
        say!("backups: no job needs attention");
    } else {
        say!(
            "backups: {} job(s) on nodes need attention",
            r.backups.len()
        );
        out.table(
            &["JOB", "NODE", "HOSTNAME", "WHY"],
            r.backups.iter().map(|b| {
                vec![
                    b.job.clone(),
                    b.node.clone(),
                    b.hostname.clone(),
                    b.reasons.join("; "),
                ]
            }),
        );
    }
}

#[cfg(test)]
mod api_flag_tests {
    use super::api_url;

    #[test]
    fn api_takes_an_https_url_or_host_and_port() {
        assert_eq!(
            api_url("shoal.example.org:7441").expect("ok"),
            "https://shoal.example.org:7441"
        );
        assert_eq!(
            api_url("https://10.0.0.1:7441/").expect("ok"),
            "https://10.0.0.1:7441"
        );
        assert_eq!(
            api_url("https://[::1]:7441").expect("ok"),
            "https://[::1]:7441"
        );
        for bad in [
            "shoal.example.org",
            "http://h:7441",
            "https://h:0",
            "h:port",
            "https://h:1/x",
            ":7441",
        ] {
            let err = api_url(bad).expect_err(bad).to_string();
            assert!(err.contains("expected https://HOST:PORT"), "{err}");
        }
    }
}

#[cfg(test)]
mod definition_tests {
    use clap::CommandFactory;

    /// clap's own checks of the whole command tree: no flag or short option given twice in one
    /// command (flattened groups like the node-or-selector one included), valid defaults.
    #[test]
    fn the_command_tree_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
