//! The fleet health report: nodes by status, every node that needs attention with the reasons, and
//! drive health (drives per SMART verdict, warning and failing drives with their reasons, missing
//! prepared drives, drives awaiting approval).

use std::{collections::BTreeMap, time::Duration};

use shoal_api::{drives::DriveView, maintenance::RolloutView, nodes::NodeView};

/// Thresholds for "needs attention".
#[derive(Debug, Clone)]
pub struct ReportThresholds {
    /// A filesystem fuller than this (percent) needs attention.
    pub filesystem_percent: f64,
    /// Memory in use above this (percent) is pressure.
    pub memory_percent: f64,
    /// PSI memory `some avg10` above this (percent) is pressure.
    pub memory_psi_avg10: f32,
    /// An up node whose last health report is older than this is stale.
    pub stale_after: Duration,
}

impl ReportThresholds {
    /// Defaults for a heartbeat interval: 90 % full, 90 % memory or 10 % PSI, stale after three
    /// intervals.
    pub fn for_interval(heartbeat: Duration) -> Self {
        Self {
            filesystem_percent: 90.0,
            memory_percent: 90.0,
            memory_psi_avg10: 10.0,
            stale_after: heartbeat * 3,
        }
    }
}

/// The report's shapes, shared with `shoalctl`.
pub use shoal_api::report::{
    Attention, DriveAttention, DriveHealth, FleetReport, RolloutAttention,
};

/// The rollouts and maintenance runs that need an operator: every paused one (an operator paused
/// it, or `max_failures` nodes failed), and every running one with failed nodes. Finished ones
/// (done, aborted) never do: their failures were reported while they ran.
pub fn rollout_attention(rollouts: &[RolloutView]) -> Vec<RolloutAttention> {
    rollouts
        .iter()
        .filter(|r| {
            !r.finished && (r.state == "paused" || (r.state == "running" && r.progress.failed > 0))
        })
        .map(|r| RolloutAttention {
            id: r.id.clone(),
            target: r.target.clone(),
            state: r.state.clone(),
            failed: r.progress.failed,
            reason: r.reason.clone().unwrap_or_else(|| {
                let failed: Vec<&str> = r
                    .nodes
                    .iter()
                    .filter(|n| n.phase == "failed")
                    .map(|n| n.hostname.as_deref().unwrap_or(n.node.as_str()))
                    .collect();
                format!("{} node(s) failed: {}", failed.len(), failed.join(", "))
            }),
        })
        .collect()
}

/// Drive health from the drive listing.
pub fn drive_health(drives: &[DriveView], hostnames: &BTreeMap<&str, &str>) -> DriveHealth {
    let mut health = DriveHealth {
        by_verdict: ["ok", "warning", "failing", "unknown"]
            .into_iter()
            .map(|v| (v.to_owned(), 0))
            .collect(),
        ..Default::default()
    };
    let entry = |d: &DriveView, reasons: Vec<String>| DriveAttention {
        node: d.node.clone(),
        hostname: hostnames
            .get(d.node.as_str())
            .map(|h| h.to_string())
            .unwrap_or_default(),
        device: d.device.clone(),
        serial: d.serial.clone(),
        model: d.model.clone(),
        size_bytes: d.size_bytes,
        verdict: d.smart.verdict.clone(),
        reasons,
    };
    for d in drives {
        *health
            .by_verdict
            .entry(d.smart.verdict.clone())
            .or_default() += 1;
        if matches!(d.smart.verdict.as_str(), "warning" | "failing") {
            health.attention.push(entry(d, d.smart.reasons.clone()));
        }
        match d.state.as_str() {
            "missing" => {
                let was = d.state_detail.as_ref().map(|s| {
                    format!(
                        "prepared drive vanished: {} {} (UUID {}) was mounted on {}",
                        s.partition.as_deref().unwrap_or("?"),
                        s.filesystem.as_deref().unwrap_or("?"),
                        s.fs_uuid.as_deref().unwrap_or("?"),
                        s.mount_point.as_deref().unwrap_or("?")
                    )
                });
                health.missing.push(entry(d, was.into_iter().collect()));
            }
            "awaiting-approval" => health.awaiting_approval.push(entry(d, Vec::new())),
            _ => {}
        }
    }
    // Failing first; otherwise as listed (by node).
    health.attention.sort_by_key(|a| a.verdict != "failing");
    health
}

fn ago(now_ms: u64, then_ms: u64) -> String {
    let secs = now_ms.saturating_sub(then_ms) / 1000;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// Builds the report from node and drive views at `now_ms`.
pub fn build(
    nodes: &[NodeView],
    drives: &[DriveView],
    now_ms: u64,
    t: &ReportThresholds,
) -> FleetReport {
    let mut by_status = BTreeMap::from([("up".to_owned(), 0), ("down".to_owned(), 0)]);
    let mut attention = Vec::new();
    for n in nodes {
        *by_status.entry(n.status.clone()).or_default() += 1;
        let mut reasons = Vec::new();
        if n.status == "down" {
            reasons.push(match n.last_seen_unix_ms {
                Some(seen) => format!("down: last seen {} ago", ago(now_ms, seen)),
                None => "down: never reported".to_owned(),
            });
        }
        if let Some(h) = &n.health {
            for fs in &h.filesystems {
                let pct = fs.used_percent();
                if pct > t.filesystem_percent {
                    reasons.push(format!("filesystem {} {:.0}% full", fs.mount, pct));
                }
            }
            let mem = h.memory_used_percent();
            let psi = h.memory_pressure_avg10.unwrap_or(0.0);
            if mem > t.memory_percent || psi > t.memory_psi_avg10 {
                let psi_text = h
                    .memory_pressure_avg10
                    .map(|p| format!(", PSI some avg10 {p:.1}%"))
                    .unwrap_or_default();
                reasons.push(format!("memory pressure: {mem:.0}% in use{psi_text}"));
            }
            if n.status == "up" && now_ms.saturating_sub(h.at.0) > t.stale_after.as_millis() as u64
            {
                reasons.push(format!(
                    "stale report: last health report {} ago",
                    ago(now_ms, h.at.0)
                ));
            }
        } else if n.status == "up" {
            reasons.push("stale report: no health report yet".to_owned());
        }
        if !reasons.is_empty() {
            attention.push(Attention {
                id: n.id.clone(),
                hostname: n.hostname.clone(),
                status: n.status.clone(),
                reasons,
            });
        }
    }
    let hostnames: BTreeMap<&str, &str> = nodes
        .iter()
        .map(|n| (n.id.as_str(), n.hostname.as_str()))
        .collect();
    FleetReport {
        generated_at: crate::time::rfc3339_ms(now_ms),
        total: nodes.len(),
        by_status,
        attention,
        drives: drive_health(drives, &hostnames),
        backups: vec![],
        rollouts: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{FilesystemUsage, HealthReport, UnixMillis};

    fn node(id: &str, status: &str, health: Option<HealthReport>) -> NodeView {
        NodeView {
            id: id.into(),
            hostname: format!("host-{id}"),
            status: status.into(),
            last_seen_unix_ms: Some(1_000),
            health,
            ..Default::default()
        }
    }

    fn healthy(at: u64) -> HealthReport {
        HealthReport {
            at: UnixMillis(at),
            memory_total_bytes: 100,
            memory_available_bytes: 50,
            filesystems: vec![FilesystemUsage {
                mount: "/".into(),
                total_bytes: 100,
                available_bytes: 50,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn healthy_fleet_needs_no_attention() {
        let r = build(
            &[node("a", "up", Some(healthy(9_000)))],
            &[],
            10_000,
            &ReportThresholds::for_interval(Duration::from_secs(10)),
        );
        assert_eq!(r.by_status["up"], 1);
        assert!(r.attention.is_empty(), "{r:?}");
    }

    #[test]
    fn each_reason_is_reported() {
        let t = ReportThresholds::for_interval(Duration::from_secs(10));
        let mut full = healthy(99_000);
        full.filesystems[0].available_bytes = 5;
        let mut pressed = healthy(99_000);
        pressed.memory_available_bytes = 2;
        let nodes = [
            node("down", "down", Some(healthy(1_000))),
            node("full", "up", Some(full)),
            node("mem", "up", Some(pressed)),
            node("stale", "up", Some(healthy(1_000))),
        ];
        let r = build(&nodes, &[], 100_000, &t);
        assert_eq!(r.by_status["down"], 1);
        let reasons: Vec<_> = r
            .attention
            .iter()
            .map(|a| (a.id.as_str(), a.reasons[0].clone()))
            .collect();
        assert!(reasons[0].1.starts_with("down"), "{reasons:?}");
        assert_eq!(reasons[1].1, "filesystem / 95% full");
        assert!(
            reasons[2].1.starts_with("memory pressure: 98%"),
            "{reasons:?}"
        );
        assert!(reasons[3].1.starts_with("stale report"), "{reasons:?}");
        assert_eq!(r.attention.len(), 4);
    }

    fn drive(node: &str, device: &str, state: &str, verdict: &str, reasons: &[&str]) -> DriveView {
        DriveView {
            node: node.into(),
            device: device.into(),
            serial: Some(format!("S-{device}")),
            model: None,
            size_bytes: 1 << 30,
            state: state.into(),
            state_detail: (state == "missing").then(|| shoal_api::drives::StateDetail {
                partition: Some(format!("{device}1")),
                filesystem: Some("xfs".into()),
                fs_uuid: Some("u-9".into()),
                mount_point: Some("/var/lib/shoal/drives/u-9".into()),
                ..Default::default()
            }),
            smart: shoal_api::drives::SmartView {
                verdict: verdict.into(),
                reasons: reasons.iter().map(|r| r.to_string()).collect(),
                ..Default::default()
            },
            updated_at: String::new(),
        }
    }

    #[test]
    fn drive_health_counts_verdicts_and_lists_what_needs_a_look() {
        let t = ReportThresholds::for_interval(Duration::from_secs(10));
        let drives = [
            drive("a", "sda", "has-data", "ok", &[]),
            drive(
                "a",
                "sdb",
                "prepared",
                "warning",
                &["pending sectors (ATA 197) rose by 8 (0 -> 8)"],
            ),
            drive("a", "sdc", "missing", "unknown", &[]),
            drive(
                "b",
                "nvme0n1",
                "awaiting-approval",
                "failing",
                &["overall health self-assessment FAILED"],
            ),
            drive("b", "vda", "blank", "unknown", &[]),
        ];
        let r = build(
            &[
                node("a", "up", Some(healthy(99_000))),
                node("b", "up", Some(healthy(99_000))),
            ],
            &drives,
            100_000,
            &t,
        );
        let d = &r.drives;
        assert_eq!(
            d.by_verdict,
            BTreeMap::from([
                ("ok".into(), 1),
                ("warning".into(), 1),
                ("failing".into(), 1),
                ("unknown".into(), 2)
            ])
        );
        assert_eq!(
            d.attention
                .iter()
                .map(|a| (a.device.as_str(), a.verdict.as_str(), a.hostname.as_str()))
                .collect::<Vec<_>>(),
            [
                ("nvme0n1", "failing", "host-b"),
                ("sdb", "warning", "host-a")
            ]
        );
        assert_eq!(
            d.attention[1].reasons,
            ["pending sectors (ATA 197) rose by 8 (0 -> 8)"]
        );
        assert_eq!(d.missing.len(), 1);
        assert_eq!(d.missing[0].reasons, ["prepared drive vanished: sdc1 xfs (UUID u-9) was mounted on /var/lib/shoal/drives/u-9"]);
        assert_eq!(
            d.awaiting_approval
                .iter()
                .map(|a| a.device.as_str())
                .collect::<Vec<_>>(),
            ["nvme0n1"]
        );
        // Older clients' reports (without drives) still decode, and new ones keep the old keys.
        let json = serde_json::to_value(&r).unwrap();
        for key in ["generated_at", "total", "by_status", "attention", "drives"] {
            assert!(json.get(key).is_some(), "{key}");
        }
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("drives");
        let back: FleetReport = serde_json::from_value(old).unwrap();
        assert_eq!(back.drives, DriveHealth::default());
    }

    fn rollout(id: &str, state: &str, finished: bool, phases: &[&str]) -> RolloutView {
        RolloutView {
            id: id.into(),
            target: "agent 1.2.0".into(),
            state: state.into(),
            reason: (state == "paused").then(|| "paused by an operator".to_owned()),
            finished,
            created_at: String::new(),
            selector: None,
            window: None,
            max_unavailable: 1,
            max_failures: 2,
            allow_downgrade: false,
            progress: shoal_api::maintenance::Progress {
                total: phases.len() as u32,
                failed: phases.iter().filter(|p| **p == "failed").count() as u32,
                ..Default::default()
            },
            waiting: vec![],
            nodes: phases
                .iter()
                .enumerate()
                .map(|(i, p)| shoal_api::maintenance::RolloutNodeView {
                    node: format!("n{i}"),
                    hostname: Some(format!("host-{i}")),
                    phase: (*p).into(),
                    since: None,
                    deadline: None,
                    detail: None,
                    step: None,
                    output: None,
                })
                .collect(),
        }
    }

    #[test]
    fn paused_rollouts_and_running_ones_with_failures_need_attention() {
        let rollouts = [
            rollout("r1", "done", true, &["succeeded", "failed"]),
            rollout("r2", "aborted", true, &["failed"]),
            rollout("r3", "running", false, &["succeeded", "upgrading"]),
            rollout("r4", "running", false, &["failed", "pending"]),
            rollout("r5", "paused", false, &["pending"]),
        ];
        let a = rollout_attention(&rollouts);
        assert_eq!(
            a.iter()
                .map(|r| (r.id.as_str(), r.failed, r.reason.as_str()))
                .collect::<Vec<_>>(),
            [
                ("r4", 1, "1 node(s) failed: host-0"),
                ("r5", 0, "paused by an operator")
            ]
        );
    }
}
