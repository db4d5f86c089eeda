//! `shoalctl`: the operator's command line for the controller's admin API.

// First: its `say!` is used by every module after it.
#[macro_use]
mod printable;
mod backup;
mod cluster;
mod controller;
mod identity;
mod maint;
mod netboot;
mod release;

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use shoal_api::{
    drives::{
        DriveCommandView, DrivePolicies, DrivePolicyView, DriveView, PrepareRequest, SetDrivePolicy,
    },
    events::EventView,
    networks::{CreateNetwork, MemberSpec, MemberView, NetworkDetail, NetworkUpdate, NetworkView},
    nodes::NodeView,
    overlay::{OverlayCountersView, PathView},
    report::{DriveAttention, FleetReport},
    tokens::{CreateToken, CreatedToken, TokenView},
    version::{VersionView, VERSION_PATH},
    AdminClient, AdminConf,
};

#[derive(Debug, Parser)]
#[command(name = "shoalctl", version, about = "Operate a shoal fleet")]
struct Cli {
    /// Admin credentials written by the controller (DATA_DIR/admin.conf).
    #[arg(long, env = "SHOAL_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Nodes in the fleet.
    #[command(subcommand)]
    Nodes(NodesCmd),
    /// Node certificates: list a node's, revoke one by serial.
    #[command(subcommand)]
    Certs(identity::CertsCmd),
    /// Overlay networks and their members.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Overlay paths and datapath counters, as the agents report them.
    #[command(subcommand)]
    Overlay(OverlayCmd),
    /// Drives: SMART health, preparation of new drives, self-tests, drive policies.
    #[command(subcommand)]
    Drives(DrivesCmd),
    /// Netboot images.
    #[command(subcommand)]
    Image(netboot::ImageCmd),
    /// Signed agent releases and agent updates.
    #[command(subcommand)]
    Release(release::ReleaseCmd),
    /// Machines seen on the netboot network.
    #[command(subcommand)]
    Machines(netboot::MachinesCmd),
    /// Maintenance windows: when disruptive work may start.
    #[command(subcommand)]
    Window(maint::WindowCmd),
    /// Disruption budgets per label group.
    #[command(subcommand)]
    Budget(maint::BudgetCmd),
    /// Rolling upgrades of agents or netboot images.
    #[command(subcommand)]
    Upgrade(maint::UpgradeCmd),
    /// Maintenance actions (reboot, SMART self-tests, allowed commands) rolled over the fleet.
    #[command(subcommand)]
    Maintenance(maint::MaintenanceCmd),
    /// Backups: targets, jobs, runs, verification, snapshots, restores.
    #[command(subcommand)]
    Backup(backup::BackupCmd),
    /// The controller itself: encrypted backups for disaster recovery.
    #[command(subcommand)]
    Controller(controller::ControllerCmd),
    /// The fleet's controllers (several on one etcd cluster): leader, agents, etcd health.
    #[command(subcommand)]
    Controllers(cluster::ControllersCmd),
    /// Fleet events (enrolled, up, down, removed...).
    Events {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
        /// Only events after this sequence number.
        #[arg(long)]
        after: Option<u64>,
    },
    /// The fleet health report.
    Report {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
        /// Exit with a non-zero status when something needs attention: 16 plus 1 (nodes), 2
        /// (drives), 4 (backups), 8 (rollouts), added up; 0 when nothing does. 1 stays "could
        /// not ask", 2 a usage error.
        #[arg(long)]
        exit_code: bool,
    },
    /// This shoalctl's version and the controller's (when the credentials reach one).
    Version {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum OverlayCmd {
    /// Every peer path, per direction: kind (direct or relay), round-trip time, bytes each way.
    Paths {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Frames forwarded, flooded, delivered and dropped (by reason), per node.
    Counters {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum DrivesCmd {
    /// One row per drive: node, device, serial, model, size, state, SMART verdict and its reasons.
    List {
        /// Only this node's drives.
        #[arg(long)]
        node: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Partition, format and mount a drive; waits for the node's answer (up to 10 minutes).
    ///
    /// Allowed on blank, awaiting-approval and prepare-failed drives. A drive that holds data is
    /// erased only with --force and its serial number. A drive whose SMART verdict is failing is
    /// never prepared.
    Prepare {
        /// Node id.
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
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Start a SMART self-test; its progress and result show in `drives list`.
    Test {
        /// Node id.
        node: String,
        /// Kernel name of the drive.
        device: String,
        #[command(flatten)]
        kind: TestKind,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
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
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Stored policies, and the policy each node follows.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete the policy of a node or a selector.
    Delete {
        #[command(flatten)]
        who: Who,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Create a join token; prints only the token.
    Create {
        /// Time to live (e.g. 1h, 30m); none means it never expires.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Number of enrolments allowed; none means unlimited.
        #[arg(long)]
        uses: Option<u32>,
        /// Labels for nodes enrolled with it (KEY=VALUE), repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List join tokens.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke a join token by id.
    Revoke {
        /// Token id (the second field of the token, as listed).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodesCmd {
    /// List nodes.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one node.
    Show {
        /// Node id.
        id: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Remove a node: it is disconnected at once and its certificate is refused from then on.
    Remove {
        /// Node id.
        id: String,
    },
    /// Choose the image a node netboots.
    SetImage {
        /// Node id.
        id: String,
        /// Image version.
        version: String,
    },
    /// Machines that claim an existing node without proof, waiting for an operator.
    Pending {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
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
        /// Node id.
        id: String,
        /// How long it stays armed (default 1h).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Make the node rotate to a new key (now if connected, else on its next session).
    RotateKey {
        /// Node id.
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
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Add a node, or a label selector and every node it matches (now and later).
    Add {
        /// Network name.
        name: String,
        #[command(flatten)]
        who: Who,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Remove a node added by hand, or a selector and the nodes only it kept in the network.
    Remove {
        /// Network name.
        name: String,
        #[command(flatten)]
        who: Who,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a network and all its memberships (not `default`).
    Delete {
        /// Network name.
        name: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// List networks.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show a network's members.
    Show {
        /// Network name.
        name: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

/// A node or a label selector.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct Who {
    /// Node id.
    #[arg(long)]
    node: Option<String>,
    /// Label selector KEY=VALUE.
    #[arg(long, value_parser = parse_label)]
    selector: Option<(String, String)>,
}

impl Who {
    fn spec(self) -> MemberSpec {
        MemberSpec {
            node: self.node,
            selector: self.selector.map(|(k, v)| format!("{k}={v}")),
        }
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("label {s:?} is not KEY=VALUE")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // API errors quote agent-supplied text (a drive command's answer, a node's reason).
            eprintln!("shoalctl: {}", printable::printable(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// JSON as the API sent it: agent-supplied text stays faithful (C0 controls come out as `\u001b`).
fn print_json(v: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `shoalctl version`: the client's version always; the controller's when it answers.
fn version(config: Option<&std::path::Path>, output: Output) -> anyhow::Result<u8> {
    let client = env!("CARGO_PKG_VERSION");
    let server = || -> anyhow::Result<VersionView> {
        let Some(path) = config else {
            bail!("no admin credentials: pass --config DATA_DIR/admin.conf or set SHOAL_CONFIG");
        };
        let conf = AdminConf::read(path)?;
        Ok(AdminClient::new(&conf)?.get(VERSION_PATH)?)
    };
    let server = server();
    match output {
        Output::Json => {
            #[derive(Serialize)]
            struct Versions<'a> {
                client: &'a str,
                server: Option<&'a VersionView>,
                error: Option<String>,
            }
            print_json(&Versions {
                client,
                server: server.as_ref().ok(),
                error: server.as_ref().err().map(|e| format!("{e:#}")),
            })?;
        }
        Output::Table => {
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
        }
    }
    server.map(|_| 0)
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    if let Command::Version { output } = cli.command {
        return version(cli.config.as_deref(), output);
    }
    let Some(path) = cli.config else {
        bail!("no admin credentials: pass --config DATA_DIR/admin.conf or set SHOAL_CONFIG");
    };
    let conf = AdminConf::read(&path)?;
    let client = AdminClient::new(&conf)?;
    match cli.command {
        Command::Token(TokenCmd::Create { ttl, uses, labels }) => {
            let req = CreateToken {
                ttl_secs: ttl.map(|d| d.as_secs().max(1)),
                max_uses: uses,
                labels: labels.into_iter().collect(),
            };
            let created: CreatedToken = client.create_token(&req)?;
            say!("{}", created.token);
        }
        Command::Token(TokenCmd::List { output }) => {
            let tokens: Vec<TokenView> = client.get("/v1/tokens")?;
            match output {
                Output::Json => print_json(&tokens)?,
                Output::Table => {
                    let rows = tokens.iter().map(|t| {
                        vec![
                            t.id.clone(),
                            t.state.clone(),
                            format!(
                                "{}/{}",
                                t.uses,
                                t.max_uses.map(|m| m.to_string()).unwrap_or("∞".into())
                            ),
                            t.expires_at.clone().unwrap_or("never".into()),
                            labels_text(&t.labels),
                        ]
                    });
                    table(&["ID", "STATE", "USES", "EXPIRES", "LABELS"], rows);
                }
            }
        }
        Command::Token(TokenCmd::Revoke { id }) => {
            let t: TokenView = client
                .delete(&format!("/v1/tokens/{id}"))?
                .context("empty answer")?;
            say!("revoked token {}", t.id);
        }
        Command::Nodes(NodesCmd::List { output }) => {
            let nodes: Vec<NodeView> = client.get("/v1/nodes")?;
            match output {
                Output::Json => print_json(&nodes)?,
                Output::Table => table(
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
                    nodes.iter().map(node_row),
                ),
            }
        }
        Command::Nodes(NodesCmd::Show { id, output }) => {
            let node: NodeView = client.get(&format!("/v1/nodes/{id}"))?;
            match output {
                Output::Json => print_json(&node)?,
                Output::Table => show_node(&node),
            }
        }
        Command::Nodes(NodesCmd::Remove { id }) => {
            client.delete::<serde_json::Value>(&format!("/v1/nodes/{id}"))?;
            say!("removed node {id}");
        }
        Command::Network(cmd) => network(&client, cmd)?,
        Command::Drives(cmd) => drives(&client, cmd)?,
        Command::Window(cmd) => maint::window(&client, cmd)?,
        Command::Backup(cmd) => backup::backup(&client, cmd)?,
        Command::Budget(cmd) => maint::budget(&client, cmd)?,
        Command::Upgrade(cmd) => maint::upgrade(&client, cmd)?,
        Command::Maintenance(cmd) => maint::maintenance(&client, cmd)?,
        Command::Overlay(OverlayCmd::Paths { output }) => {
            let paths: Vec<PathView> = client.get("/v1/overlay/paths")?;
            match output {
                Output::Json => print_json(&paths)?,
                Output::Table => table(
                    &["FROM", "TO", "KIND", "REMOTE", "RTT", "SENT", "RECEIVED"],
                    paths.iter().map(|p| {
                        vec![
                            p.from.clone(),
                            p.to.clone(),
                            p.kind.clone(),
                            p.remote.clone().unwrap_or_else(|| "-".into()),
                            format!("{:.2} ms", p.rtt_ms),
                            p.tx_bytes.to_string(),
                            p.rx_bytes.to_string(),
                        ]
                    }),
                ),
            }
        }
        Command::Overlay(OverlayCmd::Counters { output }) => {
            let counters: Vec<OverlayCountersView> = client.get("/v1/overlay/counters")?;
            match output {
                Output::Json => print_json(&counters)?,
                Output::Table => table(
                    &["NODE", "FORWARDED", "FLOODED", "DELIVERED", "DROPPED"],
                    counters.iter().map(|c| {
                        let dropped = c
                            .dropped
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(" ");
                        vec![
                            c.node.clone(),
                            c.forwarded.to_string(),
                            c.flooded.to_string(),
                            c.delivered.to_string(),
                            dropped,
                        ]
                    }),
                ),
            }
        }
        Command::Nodes(NodesCmd::SetImage { id, version }) => {
            netboot::set_image(&client, &id, &version)?
        }
        Command::Nodes(NodesCmd::Pending { output }) => identity::pending(&client, output)?,
        Command::Nodes(NodesCmd::Approve { id }) => identity::decide(&client, &id, true)?,
        Command::Nodes(NodesCmd::Deny { id }) => identity::decide(&client, &id, false)?,
        Command::Nodes(NodesCmd::Reenrol { id, ttl }) => identity::reenrol(&client, &id, ttl)?,
        Command::Nodes(NodesCmd::RotateKey { id }) => identity::rotate_key(&client, &id)?,
        Command::Certs(cmd) => identity::certs(&client, cmd)?,
        Command::Image(cmd) => netboot::image(&client, cmd)?,
        Command::Release(cmd) => release::release(&client, cmd)?,
        Command::Machines(cmd) => netboot::machines(&client, cmd)?,
        Command::Controller(cmd) => controller::controller(&client, cmd)?,
        Command::Controllers(cmd) => cluster::controllers(&client, cmd)?,
        Command::Events { output, after } => {
            let path = match after {
                Some(a) => format!("/v1/events?after={a}"),
                None => "/v1/events".to_owned(),
            };
            let events: Vec<EventView> = client.get(&path)?;
            match output {
                Output::Json => print_json(&events)?,
                Output::Table => table(
                    &["SEQ", "AT", "KIND", "NODE", "MESSAGE"],
                    events.iter().map(|e| {
                        vec![
                            e.seq.to_string(),
                            e.at.clone(),
                            e.kind.clone(),
                            e.node.clone().unwrap_or_default(),
                            e.message.clone(),
                        ]
                    }),
                ),
            }
        }
        Command::Report { output, exit_code } => {
            let report: FleetReport = client.get("/v1/report")?;
            match output {
                Output::Json => print_json(&report)?,
                Output::Table => print_report(&report),
            }
            if exit_code {
                return Ok(report.exit_code());
            }
        }
        Command::Version { .. } => unreachable!("answered above"),
    }
    Ok(0)
}

fn network(client: &AdminClient, cmd: NetworkCmd) -> anyhow::Result<()> {
    match cmd {
        NetworkCmd::Create {
            name,
            subnet,
            mtu,
            output,
        } => {
            let net = client.create_network(&CreateNetwork { name, subnet, mtu })?;
            match output {
                Output::Json => print_json(&net)?,
                Output::Table => say!(
                    "created network {} ({}, MTU {}, id {})",
                    net.name,
                    net.subnet,
                    net.mtu,
                    net.id
                ),
            }
        }
        NetworkCmd::Add { name, who, output } => {
            print_update(&client.add_to_network(&name, &who.spec())?, output)?
        }
        NetworkCmd::Remove { name, who, output } => {
            print_update(&client.remove_from_network(&name, &who.spec())?, output)?
        }
        NetworkCmd::Delete { name, output } => {
            let update = client.delete_network(&name)?;
            match output {
                Output::Json => print_json(&update)?,
                Output::Table => say!(
                    "deleted network {name}; {} members left it",
                    update.left.len()
                ),
            }
        }
        NetworkCmd::List { output } => {
            let networks: Vec<NetworkView> = client.networks()?;
            match output {
                Output::Json => print_json(&networks)?,
                Output::Table => table(
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
                ),
            }
        }
        NetworkCmd::Show { name, output } => {
            let detail: NetworkDetail = client.network(&name)?;
            match output {
                Output::Json => print_json(&detail)?,
                Output::Table => {
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
                    table(
                        &["NODE", "HOSTNAME", "MAC", "ADDRESS", "VIA"],
                        detail.members.iter().map(member_row),
                    );
                }
            }
        }
    }
    Ok(())
}

fn drives(client: &AdminClient, cmd: DrivesCmd) -> anyhow::Result<()> {
    match cmd {
        DrivesCmd::List { node, output } => {
            let drives = client.drives(node.as_deref())?;
            match output {
                Output::Json => print_json(&drives)?,
                Output::Table if drives.is_empty() => say!("no drives reported"),
                Output::Table => table(
                    &[
                        "NODE", "DEVICE", "SERIAL", "MODEL", "SIZE", "STATE", "VERDICT", "REASONS",
                    ],
                    drives.iter().map(drive_row),
                ),
            }
        }
        DrivesCmd::Prepare {
            node,
            device,
            force,
            serial,
            fs,
            output,
        } => {
            let req = PrepareRequest {
                force,
                serial,
                filesystem: fs
                    .map(|f| f.name().parse())
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
            };
            let done = client.prepare_drive(&node, device.trim_start_matches("/dev/"), &req)?;
            print_command(&done, output)?;
        }
        DrivesCmd::Test {
            node,
            device,
            kind,
            output,
        } => {
            let kind = if kind.long { "long" } else { "short" };
            let done = client.self_test_drive(&node, device.trim_start_matches("/dev/"), kind)?;
            print_command(&done, output)?;
        }
        DrivesCmd::Policy(PolicyCmd::Set {
            who,
            policy,
            fs,
            output,
        }) => {
            let spec = who.spec();
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
            match output {
                Output::Json => print_json(&set)?,
                Output::Table => say!(
                    "drive policy for {}: {}, {}",
                    policy_target(&set),
                    set.mode,
                    set.filesystem
                ),
            }
        }
        DrivesCmd::Policy(PolicyCmd::List { output }) => {
            let all: DrivePolicies = client.drive_policies()?;
            match output {
                Output::Json => print_json(&all)?,
                Output::Table => {
                    if all.policies.is_empty() {
                        say!("no drive policies: every node reports new drives (report, ext4)");
                    } else {
                        table(
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
                        table(
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
                }
            }
        }
        DrivesCmd::Policy(PolicyCmd::Delete { who, output }) => {
            let gone: DrivePolicyView = client.delete_drive_policy(&who.spec())?;
            match output {
                Output::Json => print_json(&gone)?,
                Output::Table => say!(
                    "deleted the drive policy for {} (was {}, {})",
                    policy_target(&gone),
                    gone.mode,
                    gone.filesystem
                ),
            }
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

fn print_command(done: &DriveCommandView, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(done)?,
        Output::Table => say!(
            "{} {} on {}: {}",
            done.action,
            done.device,
            done.node,
            done.message
        ),
    }
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

fn print_update(update: &NetworkUpdate, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(update)?,
        Output::Table => {
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
        }
    }
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

fn node_row(n: &NodeView) -> Vec<String> {
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
        n.last_seen.clone().unwrap_or("never".into()),
        n.agent_version.clone(),
        inv.map(|i| i.cpu_cores.to_string()).unwrap_or_default(),
        inv.map(|i| bytes_text(i.memory_bytes)).unwrap_or_default(),
        inv.map(|i| i.disks.len().to_string()).unwrap_or_default(),
        address,
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

fn print_report(r: &FleetReport) {
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
        table(
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
        table(
            &["DRIVE", "NODE", "HOSTNAME", "DEVICE", "SERIAL", "WHY"],
            rows.into_iter(),
        );
    }
    say!();
    if r.rollouts.is_empty() {
        say!("rollouts: none needs attention");
    } else {
        say!("rollouts: {} need(s) attention", r.rollouts.len());
        table(
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
        table(
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

/// Prints aligned columns. Every cell goes through [`printable::printable`] before widths are
/// taken.
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows
        .map(|row| {
            row.iter()
                .map(|c| printable::printable(c).into_owned())
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = *w));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}
