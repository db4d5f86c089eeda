//! `shoal-metrics-bench`: what one `/metrics` scrape costs for a large fleet.
//!
//! 1. Rendering: a snapshot of `--nodes` nodes, each with `--drives` drives (ATA predictors),
//!    `--paths` overlay paths and one backup job on `--targets` targets, plus a few rollouts,
//!    rendered by the controller's renderer (`observe::render`): time, output size, and the
//!    process's peak memory while rendering.
//! 2. Reading: a real controller whose store holds `--nodes` enrolled nodes, and the snapshot a
//!    scrape takes of it (`observe::snapshot::take`: the reads `nodes list` makes, and the rest).
//!
//! Goals: under 100 ms and 10 MB for 10,000 nodes. Run it in release mode:
//! `cargo run --release -p shoal-controller --bin shoal-metrics-bench`.

use std::{process::ExitCode, time::Instant};

use anyhow::Context;
use clap::Parser;
use shoal_api::{
    drives::{DriveView, SmartView},
    maintenance::{Progress, RolloutView},
    overlay::PathView,
};
use shoal_controller::observe::{
    render::render,
    snapshot::{self, BackupRow, NodeRow, Snapshot},
    EnrolmentCounts,
};

#[derive(Debug, Parser)]
#[command(name = "shoal-metrics-bench", about = "cost of one /metrics scrape")]
struct Cli {
    /// Nodes in the fleet.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Drives per node.
    #[arg(long, default_value_t = 2)]
    drives: usize,
    /// Overlay paths reported per node (one direction each).
    #[arg(long, default_value_t = 4)]
    paths: usize,
    /// Targets of the one backup job every node runs.
    #[arg(long, default_value_t = 1)]
    targets: usize,
    /// Renderings to time (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Skip part 2 (the controller with its store).
    #[arg(long)]
    render_only: bool,
    /// Write the last rendering of part 1 to this file (to see what a scrape holds).
    #[arg(long)]
    write: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-metrics-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `VmRSS` and `VmHWM` of this process, bytes.
fn memory() -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/self/status"))?;
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed")?
            .parse()?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time this thread has used (on a loaded machine wall time says more about the load).
fn thread_cpu() -> std::time::Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .unwrap_or_else(|_| nix::sys::time::TimeSpec::new(0, 0));
    std::time::Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

/// Resets the peak (`VmHWM`) to the current RSS, so the next reading is this phase's peak.
fn reset_peak() -> anyhow::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("resetting the peak RSS")
}

/// Removes the bench's data dir at the end.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn node_id(i: usize) -> String {
    // As the registry makes them: `n` and 10 hex digits.
    format!(
        "n{:010x}",
        (i as u64).wrapping_mul(0x9e37_79b9) & 0xff_ffff_ffff
    )
}

fn synthetic(cli: &Cli, now_ms: u64) -> Snapshot {
    let nodes: Vec<NodeRow> = (0..cli.nodes)
        .map(|i| NodeRow {
            id: node_id(i),
            hostname: format!("rack{:02}-node{:05}.example.net", i % 40, i),
            up: i % 97 != 0,
            connected: i % 97 != 0,
            agent_version: "0.1.0".into(),
            last_seen_ms: Some(now_ms - (i as u64 % 10_000)),
        })
        .collect();
    let predictors = serde_json::json!({
        "reallocated_sectors": 0, "reported_uncorrectable": 0, "command_timeouts": 0,
        "pending_sectors": 0, "offline_uncorrectable": 0,
    });
    let drives = nodes
        .iter()
        .flat_map(|n| {
            let predictors = predictors.clone();
            (0..cli.drives).map(move |d| DriveView {
                node: n.id.clone(),
                device: format!("sd{}", (b'a' + d as u8) as char),
                serial: Some(format!("WD-WCC4N{:07}{d}", n.id.len())),
                model: Some("WDC WD40EFRX-68N32N0".into()),
                size_bytes: 4 << 40,
                state: "prepared".into(),
                state_detail: None,
                smart: SmartView {
                    verdict: "ok".into(),
                    temperature_celsius: Some(35),
                    predictors: Some(predictors.clone()),
                    ..Default::default()
                },
                updated_at: String::new(),
            })
        })
        .collect();
    let paths = (0..cli.nodes)
        .flat_map(|i| {
            (1..=cli.paths).map(move |k| PathView {
                from: node_id(i),
                to: node_id((i + k) % cli.nodes.max(1)),
                kind: if k % 4 == 0 { "relay" } else { "direct" }.into(),
                remote: None,
                rtt_ms: 0.4 + k as f64,
                tx_bytes: 123_456_789,
                rx_bytes: 987_654_321,
                reported_at: String::new(),
                relay_reason: None,
            })
        })
        .collect();
    let backups = nodes
        .iter()
        .flat_map(|n| {
            (0..cli.targets).map(move |t| BackupRow {
                job: "nightly".into(),
                node: n.id.clone(),
                target: format!("target-{t}"),
                last_backup_ms: Some(now_ms - 3_600_000),
                verified_ms: Some(now_ms - 7_200_000),
                verification: "passed",
                problems: 0,
            })
        })
        .collect();
    let rollouts = (1..=20)
        .map(|i| RolloutView {
            id: format!("r{i}"),
            target: format!("agent 0.1.{i}"),
            state: if i == 20 { "running" } else { "done" }.into(),
            reason: None,
            finished: i != 20,
            created_at: String::new(),
            selector: None,
            window: None,
            max_unavailable: 1,
            max_failures: 1,
            allow_downgrade: false,
            progress: Progress::default(),
            waiting: vec![],
            nodes: vec![],
        })
        .collect();
    Snapshot {
        now_ms,
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: (1, 7),
        store: "embedded",
        store_bytes: Some(1 << 30),
        controller: "c-bench".into(),
        leader: true,
        nodes,
        drives,
        paths,
        rollouts,
        backup_jobs: vec![("nightly".into(), 93_600)],
        backups,
        enrolments: EnrolmentCounts::default(),
        refusals: None,
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let snap = synthetic(&cli, now_ms);
    println!(
        "fleet: {} nodes, {} drives, {} paths, {} backup rows, {} rollouts",
        snap.nodes.len(),
        snap.drives.len(),
        snap.paths.len(),
        snap.backups.len(),
        snap.rollouts.len()
    );
    let mut times = Vec::new();
    let mut cpu = Vec::new();
    let mut size = 0;
    let mut series = 0;
    let mut peak_extra = 0u64;
    for round in 0..cli.rounds.max(1) {
        let input = snap.clone();
        reset_peak()?;
        let (before, _) = memory()?;
        let (start, start_cpu) = (Instant::now(), thread_cpu());
        let text = render(input);
        let (took, took_cpu) = (start.elapsed(), thread_cpu().saturating_sub(start_cpu));
        let (_, peak) = memory()?;
        peak_extra = peak_extra.max(peak.saturating_sub(before));
        size = text.len();
        let text = text.to_text();
        series = text.lines().filter(|l| !l.starts_with('#')).count();
        times.push(took.as_secs_f64() * 1000.0);
        cpu.push(took_cpu.as_secs_f64() * 1000.0);
        if let (Some(path), true) = (&cli.write, round + 1 == cli.rounds.max(1)) {
            std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
        }
        drop(text);
    }
    times.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    println!(
        "render: median {:.1} ms wall, {:.1} ms CPU (wall min {:.1}, max {:.1}) over {} rounds; output {:.2} MiB, {} series; peak memory while rendering +{:.1} MiB over the snapshot",
        times[times.len() / 2],
        cpu[cpu.len() / 2],
        times[0],
        times[times.len() - 1],
        times.len(),
        mib(size as u64),
        series,
        mib(peak_extra)
    );
    if cli.render_only {
        return Ok(());
    }
    drop(snap);

    // 2. A real controller with the nodes in its store.
    let data = std::env::temp_dir().join(format!("shoal-metrics-bench-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(data.clone());
    let setup = Instant::now();
    shoal_controller::observe::bench::enrol_nodes(&data, cli.nodes)?;
    println!(
        "store: {} nodes enrolled in {:.1} s",
        cli.nodes,
        setup.elapsed().as_secs_f64()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _enter = runtime.enter();
    let config = shoal_controller::server::ControllerConfig::new(data);
    let ctl = shoal_controller::server::Controller::open(config, "127.0.0.1:0".parse()?)?;
    let mut times = Vec::new();
    let mut cpu = Vec::new();
    let mut size = 0;
    let mut peak_extra = 0u64;
    for _ in 0..cli.rounds.max(1) {
        reset_peak()?;
        let (before, _) = memory()?;
        let (start, start_cpu) = (Instant::now(), thread_cpu());
        let snap = snapshot::take(&ctl).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let text = render(snap);
        let (took, took_cpu) = (start.elapsed(), thread_cpu().saturating_sub(start_cpu));
        let (_, peak) = memory()?;
        peak_extra = peak_extra.max(peak.saturating_sub(before));
        size = text.len();
        times.push(took.as_secs_f64() * 1000.0);
        cpu.push(took_cpu.as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    println!(
        "scrape of a controller with {} nodes in its store (snapshot + render): median {:.1} ms wall, {:.1} ms CPU (wall min {:.1}, max {:.1}); output {:.2} MiB; peak memory +{:.1} MiB",
        cli.nodes,
        times[times.len() / 2],
        cpu[cpu.len() / 2],
        times[0],
        times[times.len() - 1],
        mib(size as u64),
        mib(peak_extra)
    );
    Ok(())
}
