//! The snapshot as Prometheus text (OpenMetrics, written by `prometheus-client`): pure.
//!
//! Per-node series carry only the node id (`node`); `shoal_node_info` joins it to the hostname and
//! agent version, the Prometheus way, which keeps a 10,000-node scrape small. Names follow the
//! Prometheus convention: snake_case, base units as suffixes (`_seconds`, `_bytes`), `_total` on
//! counters. Every family is listed, with no samples when there is nothing to count.

use std::{collections::BTreeMap, fmt};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, EncodeLabelValue,
        LabelValueEncoder, NoLabelSet,
    },
    metrics::MetricType,
    registry::{Registry, Unit},
};

use super::snapshot::{BackupRow, Snapshot};

/// A label value, escaped as the text format requires (prometheus-client writes values as given):
/// agent-supplied text — hostnames, drive models and serials — may hold quotes, backslashes and
/// newlines, and must not be able to end its label and write series of its own.
#[derive(Debug, Clone, Copy)]
struct Esc<'a>(&'a str);

impl EncodeLabelValue for Esc<'_> {
    fn encode(&self, enc: &mut LabelValueEncoder) -> fmt::Result {
        use fmt::Write;
        for c in self.0.chars() {
            match c {
                '\\' => enc.write_str("\\\\")?,
                '"' => enc.write_str("\\\"")?,
                '\n' => enc.write_str("\\n")?,
                c => enc.write_char(c)?,
            }
        }
        Ok(())
    }
}

fn row(b: &BackupRow) -> [(&'static str, Esc<'_>); 3] {
    [
        ("job", Esc(&b.job)),
        ("node", Esc(&b.node)),
        ("target", Esc(&b.target)),
    ]
}

/// Bytes in one piece of a [`Rendered`] text.
const CHUNK: usize = 64 * 1024;

/// A rendering: the text in pieces of about 64 KiB, served as they are. One buffer grown by
/// doubling would peak at twice a large fleet's text (and copy it on every growth).
#[derive(Debug, Clone, Default)]
pub struct Rendered {
    chunks: Vec<bytes::Bytes>,
    len: usize,
}

impl Rendered {
    /// Bytes of text.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no text.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, in order.
    pub fn chunks(&self) -> &[bytes::Bytes] {
        &self.chunks
    }

    /// The text in one string (tests, the bench).
    pub fn to_text(&self) -> String {
        let bytes: Vec<u8> = self.chunks.iter().flat_map(|c| c.iter().copied()).collect();
        // Only `str`s were written, and pieces end between them.
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Writes into [`Rendered`] pieces.
struct ChunkWriter {
    out: Rendered,
    piece: Vec<u8>,
}

impl ChunkWriter {
    fn seal(&mut self) {
        if !self.piece.is_empty() {
            let piece = std::mem::replace(&mut self.piece, Vec::with_capacity(CHUNK));
            self.out.len += piece.len();
            self.out.chunks.push(piece.into());
        }
    }
}

impl fmt::Write for ChunkWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.piece.len() + s.len() > CHUNK {
            self.seal();
        }
        self.piece.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Renders `snapshot` (text ending in `# EOF`).
pub fn render(snapshot: Snapshot) -> Rendered {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut out = ChunkWriter {
        out: Rendered::default(),
        piece: Vec::with_capacity(CHUNK),
    };
    // Writing into memory cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out.seal();
    out.out
}

/// One gauge family: `rows` are (labels, value).
/// How many of `values` are each of `keys` (every key present, at 0 when none is; other values
/// are not counted), so a state with no member still has its series.
fn tally<const N: usize>(
    keys: [&'static str; N],
    values: impl Iterator<Item = impl AsRef<str>>,
) -> [(&'static str, u64); N] {
    let mut counts = keys.map(|k| (k, 0u64));
    for v in values {
        if let Some(c) = counts.iter_mut().find(|(k, _)| *k == v.as_ref()) {
            c.1 += 1;
        }
    }
    counts
}

fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in rows {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// One counter family (`_total` is added to the name).
fn counters<L: EncodeLabelSet, V: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, value) in rows {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, V, u64>(&value, None)?;
    }
    Ok(())
}

/// Seconds from `then_ms` to `now_ms` (0 for a time in the future: the agents' clocks drift).
fn age(now_ms: u64, then_ms: u64) -> f64 {
    now_ms.saturating_sub(then_ms) as f64 / 1000.0
}

/// A counters struct's fields (`ConnCounters`, `HubCounters`) as (snake_case name, value), so a
/// field added there shows here without a change.
fn fields(value: &impl serde::Serialize) -> Vec<(String, u64)> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter_map(|(k, v)| v.as_u64().map(|v| (k, v)))
            .collect(),
        _ => Vec::new(),
    }
}

/// Upper bounds of the path RTT histogram, seconds (the last is `+Inf`).
const RTT_BUCKETS: [f64; 12] = [
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    f64::MAX,
];

const VERDICTS: [&str; 4] = ["ok", "warning", "failing", "unknown"];
const ROLLOUT_STATES: [&str; 4] = ["running", "paused", "aborted", "done"];

/// What a rollout rolls out: `agent`, `image`, or `action` (a maintenance run).
fn rollout_kind(target: &str) -> &str {
    target.split_once(' ').map_or(target, |(kind, _)| kind)
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = self;
        let now = s.now_ms;
        let (pmin, pmax) = (s.protocol.0.to_string(), s.protocol.1.to_string());
        gauges(
            &mut enc,
            "shoal_build_info",
            "The controller's release and the agent protocol versions it speaks (always 1).",
            None,
            [(
                [
                    ("version", Esc(s.version.as_str())),
                    ("protocol_min", Esc(pmin.as_str())),
                    ("protocol_max", Esc(pmax.as_str())),
                ],
                1u32,
            )],
        )?;
        gauges(
            &mut enc,
            "shoal_controller_leader",
            "1 when this controller leads (runs rollouts, backups schedules, pruning).",
            None,
            [(
                [("controller", Esc(s.controller.as_str()))],
                u32::from(s.leader),
            )],
        )?;
        gauges(
            &mut enc,
            "shoal_store_size",
            "Bytes the embedded store takes on disk (absent on etcd: see etcd's own metrics).",
            Some(&Unit::Bytes),
            s.store_bytes.map(|b| ([("store", Esc(s.store))], b)),
        )?;

        // Nodes.
        let by_status = tally(
            ["up", "down"],
            s.nodes.iter().map(|n| if n.up { "up" } else { "down" }),
        );
        gauges(
            &mut enc,
            "shoal_nodes",
            "Nodes in the fleet by status.",
            None,
            by_status.map(|(status, n)| ([("status", Esc(status))], n)),
        )?;
        enc.encode_descriptor(
            "shoal_nodes_connected",
            "Nodes whose control connection is open (to this controller or another).",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&(s.nodes.iter().filter(|n| n.connected).count() as u64))?;
        gauges(
            &mut enc,
            "shoal_node_info",
            "One per node (always 1): its hostname and agent version, to join on `node`.",
            None,
            s.nodes.iter().map(|n| {
                (
                    [
                        ("node", Esc(n.id.as_str())),
                        ("hostname", Esc(n.hostname.as_str())),
                        ("agent_version", Esc(n.agent_version.as_str())),
                    ],
                    1u32,
                )
            }),
        )?;
        gauges(
            &mut enc,
            "shoal_node_up",
            "1 when the node is up (heartbeats arrive), 0 when it is down.",
            None,
            s.nodes
                .iter()
                .map(|n| ([("node", Esc(n.id.as_str()))], u32::from(n.up))),
        )?;
        gauges(
            &mut enc,
            "shoal_node_heartbeat_age",
            "Seconds since the node's last heartbeat (absent for a node never heard from).",
            Some(&Unit::Seconds),
            s.nodes.iter().filter_map(|n| {
                n.last_seen_ms
                    .map(|t| ([("node", Esc(n.id.as_str()))], age(now, t)))
            }),
        )?;

        // Drives.
        let by_verdict = tally(VERDICTS, s.drives.iter().map(|d| d.smart.verdict.as_str()));
        gauges(
            &mut enc,
            "shoal_drives",
            "Drives in the fleet by SMART verdict.",
            None,
            by_verdict.map(|(verdict, n)| ([("verdict", Esc(verdict))], n)),
        )?;
        gauges(
            &mut enc,
            "shoal_drive_info",
            "One per drive (always 1): serial, model and state (blank, prepared, missing...).",
            None,
            s.drives.iter().map(|d| {
                (
                    [
                        ("node", Esc(d.node.as_str())),
                        ("device", Esc(d.device.as_str())),
                        ("serial", Esc(d.serial.as_deref().unwrap_or(""))),
                        ("model", Esc(d.model.as_deref().unwrap_or(""))),
                        ("state", Esc(d.state.as_str())),
                    ],
                    1u32,
                )
            }),
        )?;
        gauges(
            &mut enc,
            "shoal_drive_smart_verdict",
            "One per drive whose SMART verdict is not ok (always 1), labelled with it: warning, \
             failing, unknown. A drive without one is ok (shoal_drives counts them).",
            None,
            s.drives
                .iter()
                .filter(|d| d.smart.verdict != "ok")
                .map(|d| {
                    (
                        [
                            ("node", Esc(d.node.as_str())),
                            ("device", Esc(d.device.as_str())),
                            ("verdict", Esc(d.smart.verdict.as_str())),
                        ],
                        1u32,
                    )
                }),
        )?;
        gauges(
            &mut enc,
            "shoal_drive_temperature",
            "The drive's temperature at its last SMART read.",
            Some(&Unit::Celsius),
            s.drives.iter().filter_map(|d| {
                d.smart.temperature_celsius.map(|t| {
                    (
                        [
                            ("node", Esc(d.node.as_str())),
                            ("device", Esc(d.device.as_str())),
                        ],
                        i64::from(t),
                    )
                })
            }),
        )?;
        let predictors = s.drives.iter().flat_map(|d| {
            let map = d.smart.predictors.as_ref().and_then(|p| p.as_object());
            // Zero is what a healthy drive reads on every predictor: only counts above it are
            // series, which keeps a large fleet's scrape small (absent means 0).
            map.into_iter().flatten().filter_map(move |(name, v)| {
                v.as_f64().filter(|v| *v != 0.0).map(|v| {
                    (
                        [
                            ("node", Esc(d.node.as_str())),
                            ("device", Esc(d.device.as_str())),
                            ("predictor", Esc(name.as_str())),
                        ],
                        v,
                    )
                })
            })
        });
        gauges(
            &mut enc,
            "shoal_drive_smart_predictor",
            "The raw SMART failure predictors of the last read that are not 0 (ATA \
             reallocated_sectors, pending_sectors...; NVMe media_errors, percentage_used...; SCSI \
             grown_defects...); a predictor at 0 has no series.",
            None,
            predictors,
        )?;

        // Overlay paths, per direction as the sending node reported them.
        let by_kind = tally(["direct", "relay"], s.paths.iter().map(|p| p.kind.as_str()));
        gauges(
            &mut enc,
            "shoal_overlay_paths",
            "Overlay paths (one per direction) by kind.",
            None,
            by_kind.map(|(kind, n)| ([("kind", Esc(kind))], n)),
        )?;
        // Per path, a fleet of n nodes has O(n²) series: paths are summed per node, their RTTs
        // go into one histogram per kind, and only relayed paths — the ones to act on — are
        // listed one by one.
        {
            let mut rtt = enc.encode_descriptor(
                "shoal_overlay_path_rtt",
                "Smoothed round-trip times of the fleet's paths, by kind: direct or relay.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for kind in ["direct", "relay"] {
                let mut buckets = RTT_BUCKETS.map(|le| (le, 0u64));
                let (mut sum, mut count) = (0.0, 0u64);
                for p in s.paths.iter().filter(|p| p.kind == kind) {
                    let secs = p.rtt_ms / 1000.0;
                    sum += secs;
                    count += 1;
                    if let Some(b) = buckets.iter_mut().find(|(le, _)| secs <= *le) {
                        b.1 += 1;
                    }
                }
                rtt.encode_family(&[("kind", Esc(kind))])?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        let mut per_node: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for p in &s.paths {
            let n = per_node.entry(p.from.as_str()).or_default();
            n.0 = n.0.saturating_add(p.tx_bytes);
            n.1 = n.1.saturating_add(p.rx_bytes);
        }
        counters(
            &mut enc,
            "shoal_overlay_node_sent",
            "Bytes of overlay frames the node sent, over all its current paths (a path that \
             goes away takes its bytes with it: a reset to `rate()`).",
            Some(&Unit::Bytes),
            per_node
                .iter()
                .map(|(node, (tx, _))| ([("node", Esc(node))], *tx)),
        )?;
        counters(
            &mut enc,
            "shoal_overlay_node_received",
            "Bytes of overlay frames the node received, over all its current paths.",
            Some(&Unit::Bytes),
            per_node
                .iter()
                .map(|(node, (_, rx))| ([("node", Esc(node))], *rx)),
        )?;
        gauges(
            &mut enc,
            "shoal_overlay_relayed_path_rtt",
            "Smoothed round-trip time of each path that goes through a relay (`from` sends), \
             labelled with why it is relayed (`both_endpoint_dependent`, `udp_blocked`...; \
             `unknown` from agents older than protocol 8).",
            Some(&Unit::Seconds),
            s.paths.iter().filter(|p| p.kind == "relay").map(|p| {
                (
                    [
                        ("from", Esc(&p.from)),
                        ("to", Esc(&p.to)),
                        (
                            "reason",
                            Esc(p.relay_reason.as_deref().unwrap_or("unknown")),
                        ),
                    ],
                    p.rtt_ms / 1000.0,
                )
            }),
        )?;

        // Rollouts and maintenance runs.
        let count = |kinds: &[&str], state: &str| {
            s.rollouts
                .iter()
                .filter(|r| kinds.contains(&rollout_kind(&r.target)) && r.state == state)
                .count() as u64
        };
        gauges(
            &mut enc,
            "shoal_rollouts",
            "Rollouts of agent releases and netboot images by kind and state.",
            None,
            ["agent", "image"].into_iter().flat_map(|kind| {
                ROLLOUT_STATES.map(|state| {
                    (
                        [("kind", Esc(kind)), ("state", Esc(state))],
                        count(&[kind], state),
                    )
                })
            }),
        )?;
        gauges(
            &mut enc,
            "shoal_maintenance_runs",
            "Maintenance runs (reboots, SMART self-tests, allowed commands) by state.",
            None,
            ROLLOUT_STATES.map(|state| ([("state", Esc(state))], count(&["action"], state))),
        )?;
        let unfinished = || s.rollouts.iter().filter(|r| !r.finished);
        gauges(
            &mut enc,
            "shoal_rollout_state",
            "One per unfinished rollout or run (always 1), labelled with its state.",
            None,
            unfinished().map(|r| {
                (
                    [
                        ("rollout", Esc(r.id.as_str())),
                        ("kind", Esc(rollout_kind(&r.target))),
                        ("target", Esc(r.target.as_str())),
                        ("state", Esc(r.state.as_str())),
                    ],
                    1u32,
                )
            }),
        )?;
        gauges(
            &mut enc,
            "shoal_rollout_failed_nodes",
            "Nodes that failed in an unfinished rollout or run.",
            None,
            unfinished().map(|r| ([("rollout", Esc(r.id.as_str()))], r.progress.failed)),
        )?;

        // Backups.
        let by_result = tally(
            ["passed", "failed", "never"],
            s.backups.iter().map(|b| b.verification),
        );
        gauges(
            &mut enc,
            "shoal_backups",
            "Backups (a job on a node to a target) by the result of their last verification.",
            None,
            by_result.map(|(result, n)| ([("result", Esc(result))], n)),
        )?;
        gauges(
            &mut enc,
            "shoal_backup_job_verify_max_age",
            "The oldest verified restore a backup job accepts.",
            Some(&Unit::Seconds),
            s.backup_jobs
                .iter()
                .map(|(job, secs)| ([("job", Esc(job.as_str()))], *secs)),
        )?;
        gauges(
            &mut enc,
            "shoal_backup_age",
            "Seconds since the last successful backup of a job on a node to a target.",
            Some(&Unit::Seconds),
            s.backups
                .iter()
                .filter_map(|b| b.last_backup_ms.map(|t| (row(b), age(now, t)))),
        )?;
        gauges(
            &mut enc,
            "shoal_backup_verification_age",
            "Seconds since the last verification (a restore of a sample, and a check) finished.",
            Some(&Unit::Seconds),
            s.backups
                .iter()
                .filter_map(|b| b.verified_ms.map(|t| (row(b), age(now, t)))),
        )?;
        gauges(
            &mut enc,
            "shoal_backup_verification",
            "One per job, node and target whose last verification did not pass (always 1), \
             labelled with the result: failed or never. One without a series passed \
             (shoal_backups counts them).",
            None,
            s.backups
                .iter()
                .filter(|b| b.verification != "passed")
                .map(|b| {
                    (
                        [
                            ("job", Esc(b.job.as_str())),
                            ("node", Esc(b.node.as_str())),
                            ("target", Esc(b.target.as_str())),
                            ("result", Esc(b.verification)),
                        ],
                        1u32,
                    )
                }),
        )?;
        let mut problems: Vec<(&str, &str, usize)> = s
            .backups
            .iter()
            .map(|b| (b.job.as_str(), b.node.as_str(), b.problems))
            .collect();
        problems.dedup();
        gauges(
            &mut enc,
            "shoal_backup_problems",
            "Problems `shoalctl report` lists for a job on a node (failed backups or \
             verifications, a verified restore older than the job allows), when there are any.",
            None,
            problems
                .into_iter()
                .filter(|(_, _, n)| *n > 0)
                .map(|(job, node, n)| ([("job", Esc(job)), ("node", Esc(node))], n as u64)),
        )?;

        // Counters since the controller started.
        enc.encode_descriptor(
            "shoal_enrolments",
            "Enrolments that got a certificate.",
            None,
            MetricType::Counter,
        )?
        .encode_counter::<NoLabelSet, u64, u64>(&s.enrolments.enrolled, None)?;
        counters(
            &mut enc,
            "shoal_enrolment_refusals",
            "Enrolments refused, by reason.",
            None,
            s.enrolments
                .refused
                .iter()
                .map(|(reason, n)| ([("reason", Esc(reason))], *n)),
        )?;
        let (conn, hub) = match &s.refusals {
            Some(r) => (fields(&r.connections), fields(&r.overlay)),
            None => (Vec::new(), Vec::new()),
        };
        counters(
            &mut enc,
            "shoal_connection_refusals",
            "Agent connections the controller's limits refused or closed, by reason.",
            None,
            conn.iter()
                .map(|(reason, n)| ([("reason", Esc(reason.as_str()))], *n)),
        )?;
        counters(
            &mut enc,
            "shoal_overlay_refusals",
            "What nodes sent the overlay hub beyond its bounds, by kind.",
            None,
            hub.iter()
                .map(|(reason, n)| ([("reason", Esc(reason.as_str()))], *n)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::observe::{
        snapshot::{BackupRow, NodeRow},
        EnrolmentCounts,
    };
    use shoal_api::{
        drives::{DriveView, SmartView},
        maintenance::{Progress, RolloutView},
        overlay::PathView,
    };

    fn node(id: &str, status: &str, seen: Option<u64>) -> NodeRow {
        NodeRow {
            id: id.into(),
            hostname: format!("host-{id}"),
            up: status == "up",
            connected: status == "up",
            agent_version: "1.2.0".into(),
            last_seen_ms: seen,
        }
    }

    fn drive(node: &str, device: &str, verdict: &str) -> DriveView {
        DriveView {
            node: node.into(),
            device: device.into(),
            serial: Some(format!("S-{device}")),
            model: None,
            size_bytes: 1 << 30,
            state: "prepared".into(),
            state_detail: None,
            smart: SmartView {
                verdict: verdict.into(),
                temperature_celsius: Some(41),
                predictors: Some(serde_json::json!({
                    "reallocated_sectors": 3, "pending_sectors": 0, "command_timeouts": null
                })),
                ..Default::default()
            },
            updated_at: String::new(),
        }
    }

    fn path(from: &str, to: &str, kind: &str) -> PathView {
        PathView {
            from: from.into(),
            to: to.into(),
            kind: kind.into(),
            remote: None,
            rtt_ms: 2.5,
            tx_bytes: 1000,
            rx_bytes: 2000,
            reported_at: String::new(),
            relay_reason: None,
        }
    }

    fn rollout(id: &str, target: &str, state: &str, finished: bool, failed: u32) -> RolloutView {
        RolloutView {
            id: id.into(),
            target: target.into(),
            state: state.into(),
            reason: None,
            finished,
            created_at: String::new(),
            selector: None,
            window: None,
            max_unavailable: 1,
            max_failures: 1,
            allow_downgrade: false,
            progress: Progress {
                failed,
                ..Default::default()
            },
            waiting: vec![],
            nodes: vec![],
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            now_ms: 100_000,
            version: "9.9.9".into(),
            protocol: (1, 7),
            store: "embedded",
            store_bytes: Some(4096),
            controller: "c-1".into(),
            leader: true,
            nodes: vec![
                node("n1", "up", Some(98_500)),
                node("n2", "down", Some(40_000)),
                node("n3", "up", None),
            ],
            drives: vec![drive("n1", "sda", "ok"), drive("n2", "sdb", "failing")],
            paths: vec![
                path("n1", "n2", "direct"),
                PathView {
                    relay_reason: Some("udp_blocked".into()),
                    ..path("n2", "n1", "relay")
                },
            ],
            rollouts: vec![
                rollout("r1", "agent 1.2.0", "done", true, 0),
                rollout("r2", "image 2026.1", "paused", false, 2),
                rollout("r3", "action reboot", "running", false, 0),
            ],
            backup_jobs: vec![("home".into(), 93_600)],
            backups: vec![
                BackupRow {
                    job: "home".into(),
                    node: "n1".into(),
                    target: "nas".into(),
                    last_backup_ms: Some(40_000),
                    verified_ms: Some(70_000),
                    verification: "passed",
                    problems: 0,
                },
                BackupRow {
                    job: "home".into(),
                    node: "n1".into(),
                    target: "s3".into(),
                    last_backup_ms: None,
                    verified_ms: None,
                    verification: "never",
                    problems: 0,
                },
                BackupRow {
                    job: "home".into(),
                    node: "n2".into(),
                    target: "nas".into(),
                    last_backup_ms: Some(1_000),
                    verified_ms: Some(2_000),
                    verification: "failed",
                    problems: 1,
                },
            ],
            enrolments: EnrolmentCounts {
                enrolled: 3,
                refused: vec![("token_expired", 2), ("identity_in_use", 0)],
            },
            refusals: Some(shoal_api::refusals::RefusalsView {
                connections: shoal_api::refusals::ConnCounters {
                    slow_consumers: 4,
                    ..Default::default()
                },
                overlay: Default::default(),
            }),
        }
    }

    /// The sample lines of `text` (no comments).
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn every_series_has_its_value_and_units() {
        let text = render(snapshot()).to_text();
        let got = samples(&text);
        for want in [
            r#"shoal_build_info{version="9.9.9",protocol_min="1",protocol_max="7"} 1"#,
            r#"shoal_controller_leader{controller="c-1"} 1"#,
            r#"shoal_store_size_bytes{store="embedded"} 4096"#,
            r#"shoal_nodes{status="up"} 2"#,
            r#"shoal_nodes{status="down"} 1"#,
            r#"shoal_node_info{node="n1",hostname="host-n1",agent_version="1.2.0"} 1"#,
            r#"shoal_node_up{node="n2"} 0"#,
            r#"shoal_nodes_connected 2"#,
            r#"shoal_node_heartbeat_age_seconds{node="n1"} 1.5"#,
            r#"shoal_node_heartbeat_age_seconds{node="n2"} 60.0"#,
            r#"shoal_drives{verdict="failing"} 1"#,
            r#"shoal_drives{verdict="warning"} 0"#,
            r#"shoal_drive_info{node="n1",device="sda",serial="S-sda",model="",state="prepared"} 1"#,
            r#"shoal_drive_smart_verdict{node="n2",device="sdb",verdict="failing"} 1"#,
            r#"shoal_drive_temperature_celsius{node="n1",device="sda"} 41"#,
            r#"shoal_drive_smart_predictor{node="n1",device="sda",predictor="reallocated_sectors"} 3.0"#,
            r#"shoal_overlay_paths{kind="direct"} 1"#,
            r#"shoal_overlay_path_rtt_seconds_count{kind="direct"} 1"#,
            r#"shoal_overlay_path_rtt_seconds_bucket{le="0.0025",kind="relay"} 1"#,
            r#"shoal_overlay_path_rtt_seconds_bucket{le="0.001",kind="relay"} 0"#,
            r#"shoal_overlay_path_rtt_seconds_bucket{le="+Inf",kind="direct"} 1"#,
            r#"shoal_overlay_node_sent_bytes_total{node="n1"} 1000"#,
            r#"shoal_overlay_node_received_bytes_total{node="n1"} 2000"#,
            r#"shoal_overlay_relayed_path_rtt_seconds{from="n2",to="n1",reason="udp_blocked"} 0.0025"#,
            r#"shoal_rollouts{kind="agent",state="done"} 1"#,
            r#"shoal_rollouts{kind="image",state="paused"} 1"#,
            r#"shoal_rollouts{kind="agent",state="running"} 0"#,
            r#"shoal_maintenance_runs{state="running"} 1"#,
            r#"shoal_rollout_state{rollout="r2",kind="image",target="image 2026.1",state="paused"} 1"#,
            r#"shoal_rollout_failed_nodes{rollout="r2"} 2"#,
            r#"shoal_backup_job_verify_max_age_seconds{job="home"} 93600"#,
            r#"shoal_backup_age_seconds{job="home",node="n1",target="nas"} 60.0"#,
            r#"shoal_backup_verification_age_seconds{job="home",node="n2",target="nas"} 98.0"#,
            r#"shoal_backup_verification{job="home",node="n1",target="s3",result="never"} 1"#,
            r#"shoal_backup_verification{job="home",node="n2",target="nas",result="failed"} 1"#,
            r#"shoal_backups{result="passed"} 1"#,
            r#"shoal_backups{result="never"} 1"#,
            r#"shoal_backup_problems{job="home",node="n2"} 1"#,
            r#"shoal_enrolments_total 3"#,
            r#"shoal_enrolment_refusals_total{reason="token_expired"} 2"#,
            r#"shoal_connection_refusals_total{reason="slow_consumers"} 4"#,
        ] {
            assert!(got.contains(&want), "missing {want}\n{text}");
        }
        // A node never heard from has no age; a finished rollout no state; an absent predictor no
        // sample; one problems line per job and node.
        assert!(!text.contains(r#"heartbeat_age_seconds{node="n3"}"#));
        assert!(!text.contains(r#"rollout="r1""#));
        assert!(!text.contains("command_timeouts"));
        // A predictor at 0 has no series; a direct path is not listed by itself.
        assert!(!text.contains(r#"predictor="pending_sectors""#));
        assert!(!text.contains(r#"relayed_path_rtt_seconds{from="n1""#));
        // Healthy objects have no state series of their own: the counts by state cover them.
        assert!(!text.contains(r#"shoal_backup_problems{job="home",node="n1"}"#));
        assert!(!samples(&text)
            .iter()
            .any(|l| l.starts_with("shoal_backup_verification{") && l.contains("passed")));
        assert!(!text.contains(r#"shoal_drive_smart_verdict{node="n1""#));
        assert!(text.contains("# TYPE shoal_overlay_node_sent_bytes counter\n"));
        assert!(text.contains("# TYPE shoal_overlay_path_rtt_seconds histogram\n"));
        assert!(text.contains("# UNIT shoal_node_heartbeat_age_seconds seconds\n"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_removed_node_leaves_no_series() {
        let mut snap = snapshot();
        let gone = |s: &str| s.contains("\"n2\"");
        snap.nodes.retain(|n| n.id != "n2");
        snap.drives.retain(|d| d.node != "n2");
        snap.paths.retain(|p| p.from != "n2" && p.to != "n2");
        snap.backups.retain(|b| b.node != "n2");
        let text = render(snap).to_text();
        assert!(samples(&text).iter().all(|l| !gone(l)), "{text}");
        assert!(samples(&text).contains(&r#"shoal_nodes{status="down"} 0"#));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut snap = snapshot();
        snap.nodes[0].hostname = "evil\"} 1\nshoal_fake 9".into();
        let text = render(snap).to_text();
        assert!(!text.lines().any(|l| l.starts_with("shoal_fake")), "{text}");
    }
}
