//! The fleet health report: nodes by status, and every node that needs attention with the reasons.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::view::NodeView;

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
    /// Defaults for a heartbeat interval: 90 % full, 90 % memory or 10 % PSI, stale after three intervals.
    pub fn for_interval(heartbeat: Duration) -> Self {
        Self { filesystem_percent: 90.0, memory_percent: 90.0, memory_psi_avg10: 10.0, stale_after: heartbeat * 3 }
    }
}

/// One node that needs attention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attention {
    /// Node id.
    pub id: String,
    /// Hostname.
    pub hostname: String,
    /// `up` or `down`.
    pub status: String,
    /// Why, each a short sentence starting with its kind (`down`, `filesystem`, `memory pressure`, `stale report`).
    pub reasons: Vec<String>,
}

/// The fleet report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetReport {
    /// When it was made (RFC 3339).
    pub generated_at: String,
    /// Nodes in the fleet.
    pub total: usize,
    /// Count per status.
    pub by_status: BTreeMap<String, usize>,
    /// Nodes that need attention.
    pub attention: Vec<Attention>,
}

fn ago(now_ms: u64, then_ms: u64) -> String {
    let secs = now_ms.saturating_sub(then_ms) / 1000;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// Builds the report from node views at `now_ms`.
pub fn build(nodes: &[NodeView], now_ms: u64, t: &ReportThresholds) -> FleetReport {
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
                let psi_text = h.memory_pressure_avg10.map(|p| format!(", PSI some avg10 {p:.1}%")).unwrap_or_default();
                reasons.push(format!("memory pressure: {mem:.0}% in use{psi_text}"));
            }
            if n.status == "up" && now_ms.saturating_sub(h.at.0) > t.stale_after.as_millis() as u64 {
                reasons.push(format!("stale report: last health report {} ago", ago(now_ms, h.at.0)));
            }
        } else if n.status == "up" {
            reasons.push("stale report: no health report yet".to_owned());
        }
        if !reasons.is_empty() {
            attention.push(Attention { id: n.id.clone(), hostname: n.hostname.clone(), status: n.status.clone(), reasons });
        }
    }
    FleetReport {
        generated_at: crate::view::rfc3339(now_ms),
        total: nodes.len(),
        by_status,
        attention,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{FilesystemUsage, HealthReport, UnixMillis};

    fn node(id: &str, status: &str, health: Option<HealthReport>) -> NodeView {
        NodeView { id: id.into(), hostname: format!("host-{id}"), status: status.into(), last_seen_unix_ms: Some(1_000), health, ..Default::default() }
    }

    fn healthy(at: u64) -> HealthReport {
        HealthReport {
            at: UnixMillis(at),
            memory_total_bytes: 100,
            memory_available_bytes: 50,
            filesystems: vec![FilesystemUsage { mount: "/".into(), total_bytes: 100, available_bytes: 50, ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn healthy_fleet_needs_no_attention() {
        let r = build(&[node("a", "up", Some(healthy(9_000)))], 10_000, &ReportThresholds::for_interval(Duration::from_secs(10)));
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
        let r = build(&nodes, 100_000, &t);
        assert_eq!(r.by_status["down"], 1);
        let reasons: Vec<_> = r.attention.iter().map(|a| (a.id.as_str(), a.reasons[0].clone())).collect();
        assert!(reasons[0].1.starts_with("down"), "{reasons:?}");
        assert_eq!(reasons[1].1, "filesystem / 95% full");
        assert!(reasons[2].1.starts_with("memory pressure: 98%"), "{reasons:?}");
        assert!(reasons[3].1.starts_with("stale report"), "{reasons:?}");
        assert_eq!(r.attention.len(), 4);
    }
}
