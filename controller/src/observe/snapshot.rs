//! What one scrape reads, through the same reads as the admin API's listings, at scrape time.

use std::collections::BTreeMap;

use shoal_api::{
    drives::DriveView, maintenance::RolloutView, overlay::PathView, refusals::RefusalsView,
};
use shoal_controller_core::registry::NodeStatus;
use shoal_proto::NodeId;

use crate::{
    http::HttpError,
    observe::EnrolmentCounts,
    server::{now_ms, Controller},
};

/// Everything `/metrics` shows, as plain data (rendered by [`super::render::render`]).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// When it was taken (Unix ms): ages are measured from it.
    pub now_ms: u64,
    /// The controller's release.
    pub version: String,
    /// The agent protocol versions it speaks.
    pub protocol: (u16, u16),
    /// `embedded` or `etcd`.
    pub store: &'static str,
    /// Bytes the embedded store takes on disk (none on etcd, whose size etcd reports).
    pub store_bytes: Option<u64>,
    /// This controller's id.
    pub controller: String,
    /// Whether this controller leads (always, alone).
    pub leader: bool,
    /// `nodes list`, the columns `/metrics` shows.
    pub nodes: Vec<NodeRow>,
    /// `drives list`.
    pub drives: Vec<DriveView>,
    /// `overlay paths`.
    pub paths: Vec<PathView>,
    /// `upgrade status` / `maintenance status`, every rollout and run.
    pub rollouts: Vec<RolloutView>,
    /// Backup jobs: name and the oldest acceptable verified restore, seconds.
    pub backup_jobs: Vec<(String, u64)>,
    /// `backup list`: one row per job, node and target.
    pub backups: Vec<BackupRow>,
    /// Enrolments since start.
    pub enrolments: EnrolmentCounts,
    /// What the bounds refused since start (`GET /v1/refusals`).
    pub refusals: Option<RefusalsView>,
}

/// One node: what `nodes list` shows of it that `/metrics` exports. Read straight from the node
/// records and the live state, without the rest of a node's view (inventory, health, identity,
/// overlay addresses), which a scrape does not need and which made it several times slower.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRow {
    /// Node id.
    pub id: String,
    /// Its hostname.
    pub hostname: String,
    /// Its agent's release.
    pub agent_version: String,
    /// Whether heartbeats arrive (`up` in `nodes list`).
    pub up: bool,
    /// Whether its control connection is open, here or on another controller.
    pub connected: bool,
    /// When it was last heard from (Unix ms).
    pub last_seen_ms: Option<u64>,
}

/// One job on one node and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRow {
    /// Job.
    pub job: String,
    /// Node id.
    pub node: String,
    /// Target.
    pub target: String,
    /// When the last successful backup finished (Unix ms).
    pub last_backup_ms: Option<u64>,
    /// When the last verification finished (Unix ms).
    pub verified_ms: Option<u64>,
    /// `passed`, `failed` or `never`.
    pub verification: &'static str,
    /// Problems the fleet report lists for this job on this node (all targets).
    pub problems: usize,
}

/// Takes the snapshot (blocking: store reads).
pub fn take(ctl: &Controller) -> Result<Snapshot, HttpError> {
    let now = now_ms();
    let records = ctl.store.nodes()?;
    let nodes = {
        let live = ctl.live();
        records
            .iter()
            .map(|r| NodeRow {
                id: r.id.0.clone(),
                hostname: r.hostname.clone(),
                agent_version: r.agent_version.clone(),
                up: r.status == NodeStatus::Up,
                connected: ctl.is_connected_with(&live, &r.id),
                last_seen_ms: live
                    .nodes
                    .get(&r.id)
                    .and_then(|l| l.last_seen)
                    .or(r.last_seen)
                    .map(|t| t.0),
            })
            .collect()
    };
    let hostnames: BTreeMap<NodeId, String> = records
        .iter()
        .map(|n| (n.id.clone(), n.hostname.clone()))
        .collect();
    let rollouts = ctl
        .maint
        .rollouts()?
        .iter()
        .map(|r| crate::maintenance::routes::rollout_view(r, &hostnames))
        .collect();
    let mut backups = Vec::new();
    let mut backup_jobs = Vec::new();
    for (job, states) in crate::backups::routes::job_states(ctl, &records)? {
        backup_jobs.push((job.name().to_owned(), job.record().verify_max_age_secs));
        for (node, state) in states {
            let problems = job.attention(&state, now).len();
            for target in &job.record().targets {
                let t = state.targets.get(target);
                let verify = t.and_then(|t| t.last_verify.as_ref());
                backups.push(BackupRow {
                    job: job.name().to_owned(),
                    node: node.id.0.clone(),
                    target: target.clone(),
                    last_backup_ms: t.and_then(|t| t.last_backup.as_ref()).map(|b| b.at.0),
                    verified_ms: verify.map(|v| v.at.0),
                    verification: match verify {
                        None => "never",
                        Some(v) if v.stats.passed() => "passed",
                        Some(_) => "failed",
                    },
                    problems,
                });
            }
        }
    }
    Ok(Snapshot {
        now_ms: now.0,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol: (shoal_proto::SUPPORTED.min, shoal_proto::SUPPORTED.max),
        store: store_kind(ctl),
        store_bytes: match ctl.config.etcd {
            Some(_) => None,
            None => Some(dir_bytes(&ctl.config.data_dir.join("store"))),
        },
        controller: ctl.cluster.id.clone(),
        leader: ctl.cluster.is_leader(),
        nodes,
        drives: ctl.drives.views(None),
        paths: crate::overlay::routes::path_views(ctl),
        rollouts,
        backup_jobs,
        backups,
        enrolments: ctl.observe.enrolments(),
        refusals: Some(RefusalsView {
            connections: ctl.conn_stats.snapshot(),
            overlay: ctl.overlay.counters(),
        }),
    })
}

/// `embedded` or `etcd`.
pub fn store_kind(ctl: &Controller) -> &'static str {
    match ctl.config.etcd {
        Some(_) => "etcd",
        None => "embedded",
    }
}

/// Bytes of the files under `dir` (sled's files: a few, not nested deeply).
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
