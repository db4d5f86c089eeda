//! `shoalctl`: the operator's command line for the controller's admin API.

#[path = "shoalctl/netboot.rs"]
mod netboot;

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use shoal_controller::{
    admin::{AdminClient, AdminConf},
    report::FleetReport,
    view::{CreateToken, CreatedToken, EventView, NodeView, TokenView},
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
    /// Netboot images.
    #[command(subcommand)]
    Image(netboot::ImageCmd),
    /// Machines seen on the netboot network.
    #[command(subcommand)]
    Machines(netboot::MachinesCmd),
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoalctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(v: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Some(path) = cli.config else {
        bail!("no admin credentials: pass --config DATA_DIR/admin.conf or set SHOAL_CONFIG");
    };
    let conf = AdminConf::read(&path)?;
    let client = AdminClient::new(&conf)?;
    match cli.command {
        Command::Token(TokenCmd::Create { ttl, uses, labels }) => {
            let req = CreateToken { ttl_secs: ttl.map(|d| d.as_secs().max(1)), max_uses: uses, labels: labels.into_iter().collect() };
            let created: CreatedToken = client.create_token(&req)?;
            println!("{}", created.token);
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
                            format!("{}/{}", t.uses, t.max_uses.map(|m| m.to_string()).unwrap_or("∞".into())),
                            t.expires_at.clone().unwrap_or("never".into()),
                            labels_text(&t.labels),
                        ]
                    });
                    table(&["ID", "STATE", "USES", "EXPIRES", "LABELS"], rows);
                }
            }
        }
        Command::Token(TokenCmd::Revoke { id }) => {
            let t: TokenView = client.delete(&format!("/v1/tokens/{id}"))?.context("empty answer")?;
            println!("revoked token {}", t.id);
        }
        Command::Nodes(NodesCmd::List { output }) => {
            let nodes: Vec<NodeView> = client.get("/v1/nodes")?;
            match output {
                Output::Json => print_json(&nodes)?,
                Output::Table => table(&["ID", "HOSTNAME", "STATUS", "LAST SEEN", "AGENT", "CPUS", "MEMORY", "DISKS", "ADDRESS"], nodes.iter().map(node_row)),
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
            println!("removed node {id}");
        }
        Command::Nodes(NodesCmd::SetImage { id, version }) => netboot::set_image(&client, &id, &version)?,
        Command::Image(cmd) => netboot::image(&client, cmd)?,
        Command::Machines(cmd) => netboot::machines(&client, cmd)?,
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
                    events.iter().map(|e| vec![e.seq.to_string(), e.at.clone(), e.kind.clone(), e.node.clone().unwrap_or_default(), e.message.clone()]),
                ),
            }
        }
        Command::Report { output } => {
            let report: FleetReport = client.get("/v1/report")?;
            match output {
                Output::Json => print_json(&report)?,
                Output::Table => print_report(&report),
            }
        }
    }
    Ok(())
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
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
        .and_then(|i| i.nics.iter().flat_map(|nic| nic.addresses.iter()).find(|a| !a.starts_with("fe80") && a.contains('.')).cloned())
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
    println!("id:            {}", n.id);
    println!("hostname:      {}", n.hostname);
    println!("status:        {}{}", n.status, if n.connected { " (connected)" } else { "" });
    println!("last seen:     {}", n.last_seen.as_deref().unwrap_or("never"));
    println!("agent:         {}", n.agent_version);
    println!("enrolled:      {}", n.enrolled_at);
    println!("hardware id:   {}", n.hardware_id);
    if !n.labels.is_empty() {
        println!("labels:        {}", labels_text(&n.labels));
    }
    if let Some(i) = &n.inventory {
        println!("os:            {} (kernel {}, {})", i.os, i.kernel, i.arch);
        println!("cpu:           {} x {}", i.cpu_cores, i.cpu_model);
        println!("memory:        {}", bytes_text(i.memory_bytes));
        println!("boot:          {:?}", i.boot_mode);
        let dmi = [&i.dmi.vendor, &i.dmi.product, &i.dmi.serial].iter().filter_map(|v| v.as_deref()).collect::<Vec<_>>().join(" / ");
        if !dmi.is_empty() {
            println!("system:        {dmi}");
        }
        for d in &i.disks {
            println!(
                "disk:          {} {} {} {}{}",
                d.name,
                bytes_text(d.size_bytes),
                d.model.as_deref().unwrap_or("-"),
                d.serial.as_deref().unwrap_or("-"),
                if d.rotational { " (rotational)" } else { "" }
            );
        }
        for nic in &i.nics {
            println!(
                "nic:           {} {} {} {}",
                nic.name,
                nic.mac.as_deref().unwrap_or("-"),
                nic.speed_mbps.map(|s| format!("{s}Mb/s")).unwrap_or("-".into()),
                nic.addresses.join(" ")
            );
        }
    }
    if let Some(h) = &n.health {
        println!("uptime:        {}", humantime::format_duration(Duration::from_secs(h.uptime_secs)));
        println!("load:          {:.2} {:.2} {:.2}", h.load.one, h.load.five, h.load.fifteen);
        println!("cpu use:       {:.1}%", h.cpu_percent);
        println!("memory use:    {:.1}% of {}", h.memory_used_percent(), bytes_text(h.memory_total_bytes));
        for fs in &h.filesystems {
            println!("filesystem:    {} {:.0}% of {} ({})", fs.mount, fs.used_percent(), bytes_text(fs.total_bytes), fs.fs_type);
        }
    }
}

fn print_report(r: &FleetReport) {
    let counts = r.by_status.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ");
    println!("fleet report at {}: {} nodes ({counts})", r.generated_at, r.total);
    if r.attention.is_empty() {
        println!("no node needs attention");
        return;
    }
    println!();
    table(
        &["ID", "HOSTNAME", "STATUS", "NEEDS ATTENTION"],
        r.attention.iter().map(|a| vec![a.id.clone(), a.hostname.clone(), a.status.clone(), a.reasons.join("; ")]),
    );
}

fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
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
