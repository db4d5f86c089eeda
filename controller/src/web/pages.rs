//! The pages. Each reads the fleet through the admin API's own handlers (the same reads
//! `shoalctl` makes, so the page and `shoalctl … -o json` show the same thing) and renders HTML.
//! Rows carry `data-*` attributes with the ids they show, for the browser test and for anyone
//! scripting against the page.

use std::collections::BTreeMap;

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    response::{Html, IntoResponse, Response},
    Json,
};
use maud::{html, Markup};
use shoal_api::{
    backups::BackupStatusView, drives::DriveView, events::EventView, nodes::NodeView,
    overlay::PathView, report::FleetReport,
};
use shoal_controller_core::drives::{counters, SmartSample};
use shoal_controller_core::time::rfc3339_ms;
use shoal_proto::{NodeId, SmartPredictors};

use super::{chart, layout, WebState};
use crate::{
    backups::routes::StatusQuery,
    drives::routes::DriveQuery,
    http::{blocking, HttpError},
    registry::routes::NodesQuery,
    server::now_ms,
};

/// Recent events on the overview.
const OVERVIEW_EVENTS: usize = 12;
/// Events on the events page.
const EVENTS_PAGE: usize = 200;

/// A page that could not be rendered: the admin API's error, as a page.
#[derive(Debug)]
pub struct PageError(HttpError);

impl From<HttpError> for PageError {
    fn from(e: HttpError) -> Self {
        PageError(e)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let HttpError(status, message) = self.0;
        let body = layout::page(
            status.canonical_reason().unwrap_or("Error"),
            "",
            &rfc3339_ms(now_ms().0),
            html! {
                h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                div.panel { p { (message) } p { a href="/ui/" { "Back to the overview" } } }
            },
        );
        (status, Html(body.into_string())).into_response()
    }
}

type Page = Result<Html<String>, PageError>;

fn render(title: &str, active: &str, body: Markup) -> Page {
    Ok(Html(
        layout::page(title, active, &rfc3339_ms(now_ms().0), body).into_string(),
    ))
}

/// What every page needs to name nodes: hostnames by id.
fn hostnames(nodes: &[NodeView]) -> BTreeMap<String, String> {
    nodes
        .iter()
        .map(|n| (n.id.clone(), n.hostname.clone()))
        .collect()
}

fn node_link(id: &str, names: &BTreeMap<String, String>) -> Markup {
    html! {
        a href=(format!("/ui/nodes/{}", path_segment(id))) {
            (names.get(id).map(String::as_str).unwrap_or(id))
        }
    }
}

/// A value for a URL path segment: ids and device names are `[A-Za-z0-9._-]`, anything else is
/// percent-encoded so a node-supplied name cannot reach into the path or query.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn nodes(ctl: &crate::http::Ctl) -> Result<Vec<NodeView>, HttpError> {
    let all = Query(NodesQuery { selector: None });
    Ok(crate::registry::routes::list_nodes(State(ctl.clone()), all)
        .await?
        .0)
}

async fn drives(ctl: &crate::http::Ctl, node: Option<String>) -> Result<Vec<DriveView>, HttpError> {
    let Json(d) =
        crate::drives::routes::list_drives(State(ctl.clone()), Query(DriveQuery { node })).await?;
    Ok(d)
}

async fn backups(
    ctl: &crate::http::Ctl,
    node: Option<String>,
) -> Result<Vec<BackupStatusView>, HttpError> {
    let Json(b) = crate::backups::routes::list_status(
        State(ctl.clone()),
        Query(StatusQuery { job: None, node }),
    )
    .await?;
    Ok(b)
}

async fn recent_events(ctl: &crate::http::Ctl, n: usize) -> Result<Vec<EventView>, HttpError> {
    let ctl = ctl.clone();
    blocking(move || {
        Ok(ctl
            .store
            .recent_events(n)?
            .into_iter()
            .map(crate::registry::routes::event_view)
            .collect())
    })
    .await
}

fn events_table(events: &[EventView], names: &BTreeMap<String, String>) -> Markup {
    html! {
        @if events.is_empty() {
            p.muted { "No events." }
        } @else {
            table {
                thead { tr { th.num { "#" } th { "At" } th { "Kind" } th { "Node" } th { "Message" } } }
                tbody {
                    @for e in events {
                        tr data-seq=(e.seq) {
                            td.num.muted { (e.seq) }
                            td.mono.muted { (e.at) }
                            td { span.chip { (e.kind) } }
                            td { @if let Some(n) = &e.node { (node_link(n, names)) } }
                            td { (e.message) }
                        }
                    }
                }
            }
        }
    }
}

fn reasons(list: &[String]) -> Markup {
    html! {
        @if list.len() == 1 { (list[0]) }
        @else if !list.is_empty() { ul.reasons { @for r in list { li { (r) } } } }
    }
}

fn rollout_bar(p: &shoal_api::maintenance::Progress) -> Markup {
    layout::stacked_bar(
        p.total,
        &[
            (p.succeeded, "ok", "succeeded"),
            (p.in_flight, "info", "in flight"),
            (p.failed, "bad", "failed"),
            (p.skipped, "muted", "skipped"),
            (p.pending, "warn", "pending"),
        ],
    )
}

/// `GET /ui/`: the fleet at a glance.
pub async fn overview(State(web): State<WebState>) -> Page {
    let ctl = &web.ctl;
    let Json(report): Json<FleetReport> = crate::api::fleet_report(State(ctl.clone())).await?;
    let names = hostnames(&nodes(ctl).await?);
    let Json(rollouts) = crate::maintenance::routes::list_rollouts(State(ctl.clone())).await?;
    let running: Vec<_> = rollouts.iter().filter(|r| !r.finished).collect();
    let unverified: Vec<BackupStatusView> = backups(ctl, None)
        .await?
        .into_iter()
        .filter(|b| b.verification != "passed")
        .collect();
    let events = recent_events(ctl, OVERVIEW_EVENTS).await?;
    let count = |s: &str| report.by_status.get(s).copied().unwrap_or(0);
    let verdict = |v: &str| report.drives.by_verdict.get(v).copied().unwrap_or(0);
    let drive_attention = report.drives.attention.len() + report.drives.missing.len();
    let tone = |n: usize, bad: &'static str| if n == 0 { "ok" } else { bad };
    render(
        "Overview",
        "/ui/",
        html! {
            h1 { "Fleet overview" }
            div.grid #stats {
                (layout::stat("Nodes", report.total, "info", Some("/ui/nodes"), "stat-total"))
                (layout::stat("Up", count("up"), "ok", Some("/ui/nodes"), "stat-up"))
                (layout::stat("Down", count("down"), tone(count("down"), "bad"), Some("/ui/nodes"), "stat-down"))
                (layout::stat("Need attention", report.attention.len(), tone(report.attention.len(), "warn"), None, "stat-attention"))
                (layout::stat("Drives needing attention", drive_attention, tone(drive_attention, "bad"), Some("/ui/drives"), "stat-drives"))
                (layout::stat("Rollouts in progress", running.len(), if running.is_empty() { "" } else { "info" }, Some("/ui/rollouts"), "stat-rollouts"))
                (layout::stat("Backups not verified", unverified.len(), tone(unverified.len(), "warn"), Some("/ui/backups"), "stat-backups"))
            }
            div.cols {
                div.panel #attention {
                    h2 { "Nodes needing attention" }
                    @if report.attention.is_empty() { p.muted { "Every node is healthy." } }
                    @else {
                        table {
                            thead { tr { th { "Node" } th { "Status" } th { "Why" } } }
                            tbody {
                                @for a in &report.attention {
                                    tr data-node=(a.id) {
                                        td { (node_link(&a.id, &names)) }
                                        td.status { (layout::badge(&a.status)) }
                                        td { (reasons(&a.reasons)) }
                                    }
                                }
                            }
                        }
                    }
                }
                div.panel #drive-attention {
                    h2 { "Drives needing attention" }
                    p.legend {
                        i.s-ok {} "ok " (verdict("ok"))
                        i.s-warn {} "warning " (verdict("warning"))
                        i.s-bad {} "failing " (verdict("failing"))
                        i.s-muted {} "unknown " (verdict("unknown"))
                    }
                    @if drive_attention == 0 { p.muted { "No drive needs attention." } }
                    @else {
                        table {
                            thead { tr { th { "Node" } th { "Drive" } th { "Model" } th { "Verdict" } th { "Why" } } }
                            tbody {
                                @for d in report.drives.attention.iter().chain(&report.drives.missing) {
                                    tr data-node=(d.node) data-device=(d.device) {
                                        td { (node_link(&d.node, &names)) }
                                        td { a href=(format!("/ui/drives/{}/{}", path_segment(&d.node), path_segment(&d.device))) { (d.device) } }
                                        td { (d.model.as_deref().unwrap_or("")) }
                                        td.verdict { (layout::badge(&d.verdict)) }
                                        td { (reasons(&d.reasons)) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            div.cols {
                div.panel #running-rollouts {
                    h2 { "Rollouts in progress" }
                    @if running.is_empty() { p.muted { "None." } }
                    @for r in &running {
                        div data-rollout=(r.id) style="margin-bottom:10px" {
                            div { a href="/ui/rollouts" { (r.id) } " " (r.target) " " (layout::badge(&r.state)) }
                            (rollout_bar(&r.progress))
                        }
                    }
                }
                div.panel #unverified-backups {
                    h2 { "Backups not verified" }
                    @if unverified.is_empty() { p.muted { "Every backup's latest verification passed." } }
                    @else {
                        table {
                            thead { tr { th { "Job" } th { "Node" } th { "Target" } th { "Verification" } th { "Problem" } } }
                            tbody {
                                @for b in &unverified {
                                    tr data-job=(b.job) data-node=(b.node) {
                                        td { (b.job) }
                                        td { (node_link(&b.node, &names)) }
                                        td { (b.target) }
                                        td.verification { (layout::badge(&b.verification)) }
                                        td { (b.verify_problems.as_deref().or(b.last_error.as_deref()).unwrap_or("")) }
                                    }
                                }
                            }
                        }
                    }
                    @if !report.backups.is_empty() {
                        h2 style="margin-top:12px" { "Backup jobs needing attention" }
                        ul.reasons {
                            @for a in &report.backups {
                                li { (a.job) " on " (a.hostname) ": " (a.reasons.join("; ")) }
                            }
                        }
                    }
                }
            }
            div.panel #recent-events {
                h2 { "Recent events " a.muted href="/ui/events" style="font-weight:400" { "(all)" } }
                (events_table(&events, &names))
            }
        },
    )
}

/// `GET /ui/nodes`, or `/ui/nodes?selector=KEY=VALUE` for the nodes a selector matches (as
/// `shoalctl nodes list -l`).
pub async fn nodes_page(State(web): State<WebState>, Query(q): Query<NodesQuery>) -> Page {
    let selector = q.selector.clone();
    let Json(list) = crate::registry::routes::list_nodes(State(web.ctl.clone()), Query(q)).await?;
    let now = now_ms().0;
    render(
        "Nodes",
        "/ui/nodes",
        html! {
            h1 {
                "Nodes"
                small {
                    (list.len())
                    @if let Some(sel) = &selector { " matching " span.mono { (sel) } } @else { " in the fleet" }
                }
            }
            div.panel {
                table #nodes {
                    thead { tr {
                        th { "Hostname" } th { "Id" } th { "Status" } th.num { "Heartbeat" }
                        th { "Controller" } th { "Labels" } th { "Agent" } th { "Image" }
                    } }
                    tbody {
                        @for n in &list {
                            tr data-node=(n.id) {
                                td { a href=(format!("/ui/nodes/{}", path_segment(&n.id))) { (n.hostname) } }
                                td.mono.muted { (n.id) }
                                td.status { (layout::badge(&n.status)) }
                                td.num.heartbeat {
                                    @match n.last_seen_unix_ms {
                                        Some(t) => { (layout::ago(now, t)) " ago" }
                                        None => span.muted { "never" },
                                    }
                                }
                                td { (n.controller.as_deref().unwrap_or("—")) }
                                td { @for (k, v) in &n.labels { span.chip { (k) "=" (v) } } }
                                td.mono { (n.agent_version) }
                                td.mono { (n.boot.as_ref().and_then(|b| b.image.as_deref()).unwrap_or("—")) }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// `GET /ui/nodes/{id}`.
pub async fn node_page(State(web): State<WebState>, Path(id): Path<String>) -> Page {
    let ctl = &web.ctl;
    let Json(n) = crate::registry::routes::show_node(State(ctl.clone()), Path(id.clone())).await?;
    let names = hostnames(&nodes(ctl).await?);
    let node_drives = drives(ctl, Some(id.clone())).await?;
    let Json(all_paths) = crate::overlay::routes::overlay_paths(State(ctl.clone())).await;
    let paths: Vec<PathView> = all_paths.into_iter().filter(|p| p.from == n.id).collect();
    let node_backups = backups(ctl, Some(id.clone())).await?;
    let now = now_ms().0;
    render(
        &n.hostname,
        "/ui/nodes",
        html! {
            h1 #node data-node=(n.id) { (n.hostname) " " span.status { (layout::badge(&n.status)) } small.mono { (n.id) } }
            div.cols {
                div.panel {
                    h2 { "Node" }
                    dl.facts {
                        dt { "Heartbeat" } dd { @match n.last_seen_unix_ms { Some(t) => { (layout::ago(now, t)) " ago (" (n.last_seen.as_deref().unwrap_or("")) ")" } None => "never" } }
                        dt { "Connected" } dd { (if n.connected { "yes" } else { "no" }) }
                        dt { "Controller" } dd { (n.controller.as_deref().unwrap_or("—")) }
                        dt { "Agent" } dd.mono { (n.agent_version) }
                        dt { "Image" } dd.mono { (n.boot.as_ref().and_then(|b| b.image.as_deref()).unwrap_or("—")) }
                        dt { "Enrolled" } dd { (n.enrolled_at) }
                        dt { "Key" } dd.mono { (n.key.as_deref().unwrap_or("—")) }
                        dt { "Hardware id" } dd.mono { (n.hardware_id) }
                        dt { "Labels" } dd { @for (k, v) in &n.labels { span.chip { (k) "=" (v) } } }
                        @if let Some(b) = &n.boot {
                            dt { "Boot checks" } dd {
                                @if b.checks.is_empty() { span.muted { "none" } }
                                @for c in &b.checks {
                                    span.chip { (c.name) " " (layout::badge(if c.passed { "passed" } else { "failed" })) }
                                }
                            }
                        }
                    }
                }
                div.panel {
                    h2 { "Inventory" }
                    @match &n.inventory {
                        None => p.muted { "Not reported yet." },
                        Some(inv) => dl.facts {
                            dt { "System" } dd { (inv.dmi.vendor.as_deref().unwrap_or("")) " " (inv.dmi.product.as_deref().unwrap_or("")) }
                            dt { "OS" } dd { (inv.os) }
                            dt { "Kernel" } dd.mono { (inv.kernel) " (" (inv.arch) ")" }
                            dt { "CPU" } dd { (inv.cpu_model) " · " (inv.cpu_cores) " threads" }
                            dt { "Memory" } dd { (layout::bytes(inv.memory_bytes)) }
                            dt { "Boot mode" } dd { (format!("{:?}", inv.boot_mode).to_uppercase()) }
                            dt { "Disks" } dd { @for d in &inv.disks { span.chip { (d.name) " " (layout::bytes(d.size_bytes)) } } }
                            dt { "Interfaces" } dd {
                                @for nic in &inv.nics {
                                    span.chip { (nic.name) " " (nic.addresses.join(" ")) }
                                }
                            }
                        },
                    }
                }
            }
            div.panel {
                h2 { "Health" }
                @match &n.health {
                    None => p.muted { "No health report yet." },
                    Some(h) => {
                        div.grid {
                            (layout::stat_text("Load (1/5/15 min)", &format!("{:.2} {:.2} {:.2}", h.load.one, h.load.five, h.load.fifteen)))
                            (layout::stat_text("CPU", &format!("{:.0}%", h.cpu_percent)))
                            (layout::stat_text("Memory used", &format!("{:.0}%", h.memory_used_percent())))
                            (layout::stat_text("Uptime", &layout::duration(std::time::Duration::from_secs(h.uptime_secs))))
                            (layout::stat_text("Reported", &format!("{} ago", layout::ago(now, h.at.0))))
                        }
                        table {
                            thead { tr { th { "Mount" } th { "Device" } th { "Type" } th.num { "Size" } th { "Used" } } }
                            tbody {
                                @for fs in &h.filesystems {
                                    tr {
                                        td.mono { (fs.mount) } td.mono.muted { (fs.device) } td { (fs.fs_type) }
                                        td.num { (layout::bytes(fs.total_bytes)) }
                                        td { (layout::usage_bar(fs.used_percent())) span.legend { (format!("{:.0}%", fs.used_percent())) } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            div.panel {
                h2 { "Drives" }
                (drives_table(ctl, &node_drives, &names, false))
            }
            div.cols {
                div.panel {
                    h2 { "Overlay" }
                    table {
                        thead { tr { th { "Network" } th { "Address" } th { "MAC" } } }
                        tbody { @for o in &n.overlay { tr { td { (o.network) } td.mono { (o.address) "/" (o.prefix_len) } td.mono.muted { (o.mac) } } } }
                    }
                    h2 style="margin-top:12px" { "Paths from this node" }
                    (paths_table(&paths, &names))
                }
                div.panel {
                    h2 { "Backups" }
                    (backups_table(&node_backups, &names))
                }
            }
        },
    )
}

fn paths_table(paths: &[PathView], names: &BTreeMap<String, String>) -> Markup {
    html! {
        @if paths.is_empty() { p.muted { "No paths reported." } }
        @else {
            table {
                thead { tr {
                    th { "From" } th { "To" } th { "Kind" } th { "Remote" } th.num { "RTT" }
                    th.num { "Sent" } th.num { "Received" } th { "Reported" }
                } }
                tbody {
                    @for p in paths {
                        tr data-from=(p.from) data-to=(p.to) {
                            td { (node_link(&p.from, names)) }
                            td { (node_link(&p.to, names)) }
                            td.kind { (layout::badge(&p.kind)) }
                            td.mono.muted { (p.remote.as_deref().unwrap_or("via controller")) }
                            td.num { (format!("{:.2} ms", p.rtt_ms)) }
                            td.num { (layout::bytes(p.tx_bytes)) }
                            td.num { (layout::bytes(p.rx_bytes)) }
                            td.mono.muted { (p.reported_at) }
                        }
                    }
                }
            }
        }
    }
}

fn backups_table(list: &[BackupStatusView], names: &BTreeMap<String, String>) -> Markup {
    html! {
        @if list.is_empty() { p.muted { "No backup jobs select this fleet's nodes." } }
        @else {
            table {
                thead { tr {
                    th { "Job" } th { "Node" } th { "Target" } th { "Last backup" } th.num { "Added" }
                    th { "Verification" } th { "Verified" } th { "Running" } th { "Problem" }
                } }
                tbody {
                    @for b in list {
                        tr data-job=(b.job) data-node=(b.node) data-target=(b.target) {
                            td { (b.job) }
                            td { (node_link(&b.node, names)) }
                            td { (b.target) }
                            td.mono.muted { (b.last_backup_at.as_deref().unwrap_or("never")) }
                            td.num { (b.last_bytes_added.map(layout::bytes).unwrap_or_default()) }
                            td.verification { (layout::badge(&b.verification)) }
                            td.mono.muted { (b.verified_at.as_deref().unwrap_or("")) }
                            td { (b.progress.as_deref().or(b.running.as_deref()).unwrap_or("")) }
                            td { (b.verify_problems.as_deref().or(b.last_error.as_deref()).unwrap_or("")) }
                        }
                    }
                }
            }
        }
    }
}

/// The figures a drive's trend charts draw from one SMART sample.
#[derive(Debug, Clone, Default)]
struct Figures {
    at: u64,
    temperature: Option<i32>,
    counters: Vec<(String, u64)>,
    percentage_used: Option<u8>,
    available_spare: Option<u8>,
}

fn figures(s: &SmartSample) -> Figures {
    let (percentage_used, available_spare) = match &s.report.predictors {
        SmartPredictors::Nvme(n) => (n.percentage_used, n.available_spare),
        _ => (None, None),
    };
    Figures {
        at: s.at.0,
        temperature: s.report.temperature_celsius,
        counters: counters(&s.report.predictors)
            .into_iter()
            .map(|(c, v)| (c.to_string(), v))
            .collect(),
        percentage_used,
        available_spare,
    }
}

fn temperatures(ctl: &crate::http::Ctl, d: &DriveView) -> Vec<(u64, f64)> {
    ctl.drives
        .smart_trend(&NodeId(d.node.clone()), &d.device, |s| {
            s.report.temperature_celsius.map(|t| (s.at.0, f64::from(t)))
        })
        .into_iter()
        .flatten()
        .collect()
}

fn drives_table(
    ctl: &crate::http::Ctl,
    list: &[DriveView],
    names: &BTreeMap<String, String>,
    with_node: bool,
) -> Markup {
    html! {
        @if list.is_empty() { p.muted { "No drives reported." } }
        @else {
            table.drives {
                thead { tr {
                    @if with_node { th { "Node" } }
                    th { "Drive" } th { "Model" } th { "Serial" } th.num { "Size" } th { "State" }
                    th { "SMART" } th.num { "Temp" } th { "Temperature trend" } th { "Why" }
                } }
                tbody {
                    @for d in list {
                        @let temps = temperatures(ctl, d);
                        tr data-node=(d.node) data-device=(d.device) {
                            @if with_node { td { (node_link(&d.node, names)) } }
                            td { a href=(format!("/ui/drives/{}/{}", path_segment(&d.node), path_segment(&d.device))) { (d.device) } }
                            td { (d.model.as_deref().unwrap_or("")) }
                            td.mono.muted { (d.serial.as_deref().unwrap_or("")) }
                            td.num { (layout::bytes(d.size_bytes)) }
                            td.state { (layout::badge(&d.state)) }
                            td.verdict { (layout::badge(&d.smart.verdict)) }
                            td.num { @if let Some(t) = d.smart.temperature_celsius { (t) " °C" } }
                            td { (chart::sparkline(&temps, layout::tone(&d.smart.verdict))) }
                            td {
                                (reasons(&d.smart.reasons))
                                @if d.smart.reasons.is_empty() {
                                    @if let Some(r) = &d.smart.reason { span.muted { (r) } }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `GET /ui/drives`.
pub async fn drives_page(State(web): State<WebState>) -> Page {
    let list = drives(&web.ctl, None).await?;
    let names = hostnames(&nodes(&web.ctl).await?);
    render(
        "Drives",
        "/ui/drives",
        html! {
            h1 { "Drives" small { (list.len()) " reported" } }
            div.panel { (drives_table(&web.ctl, &list, &names, true)) }
        },
    )
}

/// `GET /ui/drives/{node}/{device}`: one drive with its SMART trends.
pub async fn drive_page(
    State(web): State<WebState>,
    Path((node, device)): Path<(String, String)>,
) -> Page {
    let ctl = &web.ctl;
    let list = drives(ctl, Some(node.clone())).await?;
    let d = list
        .iter()
        .find(|d| d.device == device)
        .ok_or_else(|| crate::http::not_found(&format!("drive {device} of node {node}")))?;
    let names = hostnames(&nodes(ctl).await?);
    let history = ctl
        .drives
        .smart_trend(&NodeId(node.clone()), &device, figures);
    let class = layout::tone(&d.smart.verdict);
    let series = |f: &dyn Fn(&Figures) -> Option<f64>| -> Vec<(u64, f64)> {
        history
            .iter()
            .filter_map(|h| f(h).map(|v| (h.at, v)))
            .collect()
    };
    let counter_names: Vec<String> = history
        .last()
        .map(|h| h.counters.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    let window = match (history.first(), history.last()) {
        (Some(a), Some(b)) => layout::ago(b.at, a.at),
        _ => String::new(),
    };
    render(
        &format!(
            "{} {}",
            names.get(&node).map(String::as_str).unwrap_or(&node),
            device
        ),
        "/ui/drives",
        html! {
            h1 #drive data-node=(d.node) data-device=(d.device) {
                (node_link(&d.node, &names)) " / " (d.device) " "
                span.verdict { (layout::badge(&d.smart.verdict)) }
                small { (d.model.as_deref().unwrap_or("")) " " (d.serial.as_deref().unwrap_or("")) }
            }
            div.cols {
                div.panel {
                    h2 { "Drive" }
                    dl.facts {
                        dt { "State" } dd { (layout::badge(&d.state)) }
                        dt { "Size" } dd { (layout::bytes(d.size_bytes)) }
                        dt { "SMART read" } dd { (d.smart.status) @if let Some(r) = &d.smart.reason { " — " (r) } }
                        dt { "Protocol" } dd { (d.smart.protocol.as_deref().unwrap_or("—")) }
                        dt { "Power-on" } dd { @if let Some(h) = d.smart.power_on_hours { (h) " h" } }
                        dt { "Health check" } dd { @match d.smart.health_passed { Some(true) => (layout::badge("passed")), Some(false) => (layout::badge("failed")), None => "—" } }
                        @if let Some(t) = &d.smart.self_test {
                            dt { "Self-test" } dd { (layout::badge(&t.state)) " " (t.kind.as_deref().unwrap_or("")) " " (t.result.as_deref().unwrap_or("")) }
                        }
                        dt { "Read at" } dd.mono { (d.smart.at.as_deref().unwrap_or("—")) }
                        dt { "History" } dd { (history.len()) " samples" @if !window.is_empty() { " over " (window) } }
                    }
                }
                div.panel {
                    h2 { "Verdict" }
                    @if d.smart.reasons.is_empty() { p.muted { "Nothing to report." } }
                    @else { (reasons(&d.smart.reasons)) }
                }
            }
            div.cols #charts {
                div.panel { (chart::line_chart("Temperature", "°C", &series(&|f| f.temperature.map(f64::from)), class)) }
                @for name in &counter_names {
                    div.panel {
                        (chart::line_chart(name, "", &series(&|f| f.counters.iter().find(|(n, _)| n == name).map(|(_, v)| *v as f64)), class))
                    }
                }
                @if history.iter().any(|h| h.percentage_used.is_some()) {
                    div.panel { (chart::line_chart("NVMe percentage used", "%", &series(&|f| f.percentage_used.map(f64::from)), class)) }
                }
                @if history.iter().any(|h| h.available_spare.is_some()) {
                    div.panel { (chart::line_chart("NVMe available spare", "%", &series(&|f| f.available_spare.map(f64::from)), class)) }
                }
            }
        },
    )
}

/// `GET /ui/overlay`.
pub async fn overlay_page(State(web): State<WebState>) -> Page {
    let ctl = &web.ctl;
    let names = hostnames(&nodes(ctl).await?);
    let Json(paths) = crate::overlay::routes::overlay_paths(State(ctl.clone())).await;
    let Json(counters) = crate::overlay::routes::overlay_counters(State(ctl.clone())).await;
    let direct = paths.iter().filter(|p| p.kind == "direct").count();
    render(
        "Overlay",
        "/ui/overlay",
        html! {
            h1 { "Overlay" }
            div.grid {
                (layout::stat("Paths", paths.len(), "info", None, "stat-paths"))
                (layout::stat("Direct", direct, "ok", None, "stat-direct"))
                (layout::stat("Relayed", paths.len() - direct, if paths.len() == direct { "" } else { "warn" }, None, "stat-relayed"))
            }
            div.panel #paths { h2 { "Paths" } (paths_table(&paths, &names)) }
            div.panel #counters {
                h2 { "Datapath counters" }
                table {
                    thead { tr { th { "Node" } th.num { "Forwarded" } th.num { "Flooded" } th.num { "Delivered" } th { "Dropped" } th { "Reported" } } }
                    tbody {
                        @for c in &counters {
                            tr data-node=(c.node) {
                                td { (node_link(&c.node, &names)) }
                                td.num { (c.forwarded) } td.num { (c.flooded) } td.num { (c.delivered) }
                                td { @for (why, n) in &c.dropped { span.chip { (why) " " (n) } } }
                                td.mono.muted { (c.reported_at) }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// `GET /ui/rollouts`.
pub async fn rollouts_page(State(web): State<WebState>) -> Page {
    let Json(rollouts) = crate::maintenance::routes::list_rollouts(State(web.ctl.clone())).await?;
    render(
        "Rollouts",
        "/ui/rollouts",
        html! {
            h1 { "Rollouts" small { (rollouts.len()) " in the store" } }
            @if rollouts.is_empty() { div.panel { p.muted { "No rollouts yet." } } }
            @for r in rollouts.iter().rev() {
                div.panel data-rollout=(r.id) {
                    h2 { (r.id) " · " (r.target) " " span.state { (layout::badge(&r.state)) } }
                    p.muted style="margin:0 0 8px" {
                        "started " (r.created_at)
                        @if let Some(s) = &r.selector { " · selector " (s) }
                        @if let Some(w) = &r.window { " · window " (w) }
                        " · max unavailable " (r.max_unavailable) " · max failures " (r.max_failures)
                        @if let Some(reason) = &r.reason { " · " (reason) }
                    }
                    (rollout_bar(&r.progress))
                    @if !r.waiting.is_empty() { ul.reasons.muted { @for w in &r.waiting { li { (w) } } } }
                    details style="margin-top:8px" open[!r.finished] {
                        summary { (r.nodes.len()) " nodes" }
                        table {
                            thead { tr { th { "Node" } th { "Phase" } th { "Step" } th { "Since" } th { "Detail" } } }
                            tbody {
                                @for n in &r.nodes {
                                    tr data-node=(n.node) {
                                        td { a href=(format!("/ui/nodes/{}", path_segment(&n.node))) { (n.hostname.as_deref().unwrap_or(&n.node)) } }
                                        td.phase { (layout::badge(&n.phase)) }
                                        td { (n.step.as_deref().unwrap_or("")) }
                                        td.mono.muted { (n.since.as_deref().unwrap_or("")) }
                                        td { (n.detail.as_deref().unwrap_or("")) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// `GET /ui/backups`.
pub async fn backups_page(State(web): State<WebState>) -> Page {
    let list = backups(&web.ctl, None).await?;
    let names = hostnames(&nodes(&web.ctl).await?);
    let passed = list.iter().filter(|b| b.verification == "passed").count();
    render(
        "Backups",
        "/ui/backups",
        html! {
            h1 { "Backups" }
            div.grid {
                (layout::stat("Job × node × target", list.len(), "info", None, "stat-backup-rows"))
                (layout::stat("Verified", passed, "ok", None, "stat-verified"))
                (layout::stat("Not verified", list.len() - passed, if passed == list.len() { "ok" } else { "warn" }, None, "stat-unverified"))
            }
            div.panel #backups { (backups_table(&list, &names)) }
        },
    )
}

/// `GET /ui/events`.
pub async fn events_page(State(web): State<WebState>) -> Page {
    let events = recent_events(&web.ctl, EVENTS_PAGE).await?;
    let names = hostnames(&nodes(&web.ctl).await?);
    render(
        "Events",
        "/ui/events",
        html! {
            h1 { "Events" small { "the newest " (events.len()) ", newest first" } }
            div.panel #events { (events_table(&events, &names)) }
        },
    )
}

/// Any other path under `/ui/`.
pub async fn not_found() -> PageError {
    PageError(HttpError(StatusCode::NOT_FOUND, "No such page.".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_cannot_leave_their_segment() {
        assert_eq!(path_segment("n12"), "n12");
        assert_eq!(path_segment("nvme0n1"), "nvme0n1");
        assert_eq!(path_segment("../x?y=1#"), "..%2Fx%3Fy%3D1%23");
        assert_eq!(path_segment("a\"b<"), "a%22b%3C");
    }
}
