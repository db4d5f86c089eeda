//! Following and waiting: `events -f`, `upgrade|maintenance status -w`, and `--wait` on
//! `upgrade start`, `maintenance run` and `backup run`, with the exit codes scripts read.
//!
//! All of it polls the admin API (the client is blocking and one-shot; the API has no push), at
//! most once a second per command.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::mpsc::{self, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::Context;
use shoal_api::{
    backups::{BackupStatusView, Queued},
    events::EventView,
    maintenance::RolloutView,
    AdminClient,
};

use crate::{maint, output::Out, progress::StatusLine};

/// How often a wait or a watch asks the controller again.
const POLL: Duration = Duration::from_secs(1);

/// How many events one page of `events` asks for (the API's own cap is 10 000).
const EVENTS_PAGE: u32 = 1000;

/// An awaited operation that ended without succeeding. Its exit code is documented in the
/// operators' guide ("Scripting shoalctl"): 3 failed, 4 paused, 5 timed out. Every other error
/// exits 1 and a usage error 2.
#[derive(Debug)]
pub enum Unsuccessful {
    /// The run finished but not as asked: nodes failed, it was aborted, a backup failed.
    Failed(String),
    /// The run paused and waits for an operator (`resume`, `retry`, `abort`).
    Paused(String),
    /// `--timeout` passed before the run finished; it goes on.
    TimedOut(String),
}

impl Unsuccessful {
    /// The process exit code.
    pub fn code(&self) -> u8 {
        match self {
            Unsuccessful::Failed(_) => 3,
            Unsuccessful::Paused(_) => 4,
            Unsuccessful::TimedOut(_) => 5,
        }
    }
}

impl std::fmt::Display for Unsuccessful {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unsuccessful::Failed(m) | Unsuccessful::Paused(m) | Unsuccessful::TimedOut(m) => {
                f.write_str(m)
            }
        }
    }
}

impl std::error::Error for Unsuccessful {}

/// `--wait` and `--timeout`.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// Wait until the run finishes, then print it; exit 3 if it failed, 4 if it paused, 5 on
    /// --timeout.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: stop waiting after this long (exit 5; the run goes on).
    #[arg(long, value_parser = humantime::parse_duration, requires = "wait")]
    pub timeout: Option<Duration>,
}

impl WaitArgs {
    fn deadline(&self) -> Option<Instant> {
        self.timeout.map(|t| Instant::now() + t)
    }
}

/// Ctrl-C as a channel, so a follow or watch loop ends between polls and exits 0.
fn interrupts() -> anyhow::Result<mpsc::Receiver<()>> {
    let (tx, rx) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })?;
    Ok(rx)
}

/// Sleeps `d` unless interrupted first; whether to go on.
fn pause_unless_interrupted(rx: &mpsc::Receiver<()>, d: Duration) -> bool {
    matches!(rx.recv_timeout(d), Err(RecvTimeoutError::Timeout))
}

// ---------------------------------------------------------------------------------------------
// events
// ---------------------------------------------------------------------------------------------

fn events_after(client: &AdminClient, after: Option<u64>) -> anyhow::Result<Vec<EventView>> {
    let path = match after {
        Some(a) => format!("/v1/events?after={a}&limit={EVENTS_PAGE}"),
        None => format!("/v1/events?limit={EVENTS_PAGE}"),
    };
    Ok(client.get(&path)?)
}

/// One event as a `--follow` line: fixed columns, since later lines cannot widen earlier ones.
fn event_line(seq: &str, at: &str, kind: &str, node: &str, message: &str) -> String {
    format!("{seq:<7} {at:<20}  {kind:<26} {node:<18} {message}")
        .trim_end()
        .to_owned()
}

fn print_events_following(events: &[EventView], out: &Out) -> anyhow::Result<()> {
    for e in events {
        if out.is_json() {
            // One object per line, so a reader can act on each as it comes.
            println!("{}", serde_json::to_string(e)?);
        } else {
            say!(
                "{}",
                event_line(
                    &e.seq.to_string(),
                    &e.at,
                    &e.kind,
                    e.node.as_deref().unwrap_or(""),
                    &e.message
                )
            );
        }
    }
    Ok(())
}

/// The nodes a `-l` selector matches, for events: looked up again when an event names a node not
/// in the set (it may have enrolled or been labelled since), at most once per poll.
struct EventFilter<'a> {
    selector: Option<&'a str>,
    nodes: Option<BTreeSet<String>>,
}

impl EventFilter<'_> {
    /// `events` without the ones about nodes the selector does not match (and without the
    /// fleet-wide ones, which are about no node) when there is a selector.
    fn apply(
        &mut self,
        client: &AdminClient,
        events: Vec<EventView>,
    ) -> anyhow::Result<Vec<EventView>> {
        let Some(selector) = self.selector else {
            return Ok(events);
        };
        let unknown = |nodes: &Option<BTreeSet<String>>| {
            events.iter().any(|e| {
                e.node
                    .as_ref()
                    .is_some_and(|n| !nodes.as_ref().is_some_and(|s| s.contains(n)))
            })
        };
        if unknown(&self.nodes) {
            self.nodes = crate::nodes::matching(client, Some(selector))?;
        }
        Ok(events
            .into_iter()
            .filter(|e| {
                e.node
                    .as_deref()
                    .is_some_and(|n| crate::nodes::keep(&self.nodes, n))
            })
            .collect())
    }
}

/// `shoalctl events [--after SEQ] [-f] [-l SELECTOR]`.
pub fn events(
    client: &AdminClient,
    after: Option<u64>,
    follow: bool,
    interval: Duration,
    selector: Option<&str>,
    out: &Out,
) -> anyhow::Result<()> {
    let mut filter = EventFilter {
        selector,
        nodes: None,
    };
    if !follow {
        let events = filter.apply(client, events_after(client, after)?)?;
        return out.show(&events, || {
            out.table_wide(
                &["SEQ", "AGE", "KIND", "NODE", "MESSAGE"],
                &["AT"],
                events.iter().map(|e| {
                    vec![
                        e.seq.to_string(),
                        out.age(&e.at),
                        e.kind.clone(),
                        e.node.clone().unwrap_or_default(),
                        e.message.clone(),
                        e.at.clone(),
                    ]
                }),
            )
        });
    }
    anyhow::ensure!(
        interval >= Duration::from_millis(100),
        "--interval must be at least 100ms"
    );
    let stop = interrupts()?;
    if !out.is_json() && !out.no_headers {
        println!("{}", event_line("SEQ", "AT", "KIND", "NODE", "MESSAGE"));
    }
    let mut last = after;
    loop {
        // Pages until the log is read to its end, then wait for more.
        loop {
            let page = events_after(client, last)?;
            let (Some(end), full) = (
                page.last().map(|e| e.seq),
                page.len() >= EVENTS_PAGE as usize,
            ) else {
                break;
            };
            print_events_following(&filter.apply(client, page)?, out)?;
            last = Some(end);
            if !full {
                break;
            }
        }
        if !pause_unless_interrupted(&stop, interval) {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// rollouts and maintenance runs
// ---------------------------------------------------------------------------------------------

/// Rollout `id`; with a filter, only the rows of the nodes it keeps.
pub fn rollout(
    client: &AdminClient,
    id: &str,
    nodes: &Option<BTreeSet<String>>,
) -> anyhow::Result<RolloutView> {
    let mut r: RolloutView = client
        .get(&format!("/v1/rollouts/{id}"))
        .context("no rollout to show")?;
    r.nodes.retain(|n| crate::nodes::keep(nodes, &n.node));
    r.waiting.retain(|n| crate::nodes::keep(nodes, n));
    Ok(r)
}

/// `status -w`: the status now, then again each time it changes, until the rollout finishes or
/// Ctrl-C. With -o json, one object per line.
pub fn watch_rollout(
    client: &AdminClient,
    id: &str,
    nodes: &Option<BTreeSet<String>>,
    out: &Out,
) -> anyhow::Result<()> {
    let stop = interrupts()?;
    let mut shown: Option<String> = None;
    loop {
        let r = rollout(client, id, nodes)?;
        let json = serde_json::to_string(&r)?;
        if shown.as_ref() != Some(&json) {
            if out.is_json() {
                println!("{json}");
            } else {
                if shown.is_some() {
                    println!();
                }
                maint::print_status(&r, out);
            }
            shown = Some(json);
        }
        if r.finished || !pause_unless_interrupted(&stop, POLL) {
            return Ok(());
        }
    }
}

/// `--wait` on `upgrade start` and `maintenance run`: polls until the rollout finishes or pauses,
/// prints it as `status` would, and says how it ended.
pub fn wait_rollout(
    client: &AdminClient,
    started: RolloutView,
    wait: &WaitArgs,
    out: &Out,
) -> anyhow::Result<()> {
    let deadline = wait.deadline();
    let mut line = StatusLine::new();
    let mut r = started;
    let timed_out = loop {
        if r.finished || r.state == "paused" {
            break false;
        }
        line.set(&format!(
            "{} {}: {}",
            r.id,
            r.state,
            maint::progress_bar(&r)
        ));
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break true;
        }
        std::thread::sleep(POLL);
        r = rollout(client, &r.id, &None)?;
    };
    line.clear();
    out.show(&r, || maint::print_status(&r, out))?;
    if timed_out {
        return Err(Unsuccessful::TimedOut(format!(
            "{} is still {} after {}",
            r.id,
            r.state,
            humantime::format_duration(wait.timeout.unwrap_or_default())
        ))
        .into());
    }
    rollout_outcome(&r)
}

/// How a settled rollout ended, for the exit code.
fn rollout_outcome(r: &RolloutView) -> anyhow::Result<()> {
    let why = r
        .reason
        .as_deref()
        .map(|x| format!(": {x}"))
        .unwrap_or_default();
    match r.state.as_str() {
        "paused" => Err(Unsuccessful::Paused(format!("{} paused{why}", r.id)).into()),
        "aborted" => Err(Unsuccessful::Failed(format!("{} was aborted", r.id)).into()),
        _ if r.progress.failed > 0 => Err(Unsuccessful::Failed(format!(
            "{} finished with {} failed node(s)",
            r.id, r.progress.failed
        ))
        .into()),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// backups
// ---------------------------------------------------------------------------------------------

fn backup_rows(client: &AdminClient, job: &str) -> anyhow::Result<Vec<BackupStatusView>> {
    Ok(client.get(&format!("/v1/backups?job={job}"))?)
}

/// Each node's last finished task of `job` (before a run is queued).
pub fn last_backup_tasks(
    client: &AdminClient,
    job: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    Ok(backup_rows(client, job)?
        .into_iter()
        .filter_map(|s| Some((s.node, s.last_task?.task)))
        .collect())
}

/// The backup task a node finished since `before`, if any.
fn finished_since<'a>(
    rows: &'a [BackupStatusView],
    node: &str,
    before: &BTreeMap<String, String>,
) -> Option<&'a shoal_api::backups::TaskView> {
    rows.iter()
        .filter(|s| s.node == node && s.running.is_none())
        .filter_map(|s| s.last_task.as_ref())
        .find(|t| t.kind == "backup" && before.get(node) != Some(&t.task))
}

/// `backup run --wait`: polls until every queued node finished a backup task of the job, prints
/// their rows, and fails (exit 3) if one failed.
pub fn wait_backup(
    client: &AdminClient,
    job: &str,
    queued: &Queued,
    before: &BTreeMap<String, String>,
    wait: &WaitArgs,
    out: &Out,
) -> anyhow::Result<()> {
    let deadline = wait.deadline();
    let mut line = StatusLine::new();
    let (rows, timed_out) = loop {
        let rows = backup_rows(client, job)?;
        let done = queued
            .nodes
            .iter()
            .filter(|n| finished_since(&rows, n, before).is_some())
            .count();
        if done == queued.nodes.len() {
            break (rows, false);
        }
        line.set(&format!(
            "backup of {job}: {done}/{} node(s) done",
            queued.nodes.len()
        ));
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break (rows, true);
        }
        std::thread::sleep(POLL);
    };
    line.clear();
    let mine: Vec<&BackupStatusView> = rows
        .iter()
        .filter(|s| queued.nodes.contains(&s.node))
        .collect();
    let failed: Vec<&str> = queued
        .nodes
        .iter()
        .filter(|n| finished_since(&rows, n, before).is_some_and(|t| !t.ok))
        .map(String::as_str)
        .collect();
    out.show(&mine, || {
        for n in &queued.nodes {
            let host = mine
                .iter()
                .find(|s| &s.node == n)
                .map(|s| s.hostname.as_str())
                .unwrap_or(n);
            let said = match finished_since(&rows, n, before) {
                None => "not finished".to_owned(),
                Some(t) if t.ok => format!("ok ({})", t.task),
                Some(t) => {
                    let errors: Vec<String> = mine
                        .iter()
                        .filter(|s| &s.node == n)
                        .filter_map(|s| s.last_error.as_ref().map(|e| format!("{}: {e}", s.target)))
                        .collect();
                    format!("FAILED ({}): {}", t.task, errors.join("; "))
                }
            };
            say!("backup of job {job} on {host}: {said}");
        }
    })?;
    if timed_out {
        return Err(Unsuccessful::TimedOut(format!(
            "backup of job {job} not finished on every node after {}",
            humantime::format_duration(wait.timeout.unwrap_or_default())
        ))
        .into());
    }
    if !failed.is_empty() {
        return Err(Unsuccessful::Failed(format!(
            "backup of job {job} failed on {}",
            failed.join(", ")
        ))
        .into());
    }
    Ok(())
}
