//! `shoalctl window …`, `shoalctl budget …`, `shoalctl upgrade …` and `shoalctl maintenance …`.

use std::time::Duration;

use clap::Subcommand;
use shoal_api::{
    maintenance::{
        BudgetView, CreateWindow, RetryNode, RolloutView, SetBudget, StartRollout, WindowView,
    },
    AdminClient,
};
use shoal_proto::MaintenanceAction;

use super::{watch, Out};

#[derive(Debug, Subcommand)]
pub enum WindowCmd {
    /// Create a maintenance window: each time the schedule fires, it opens for DURATION.
    ///
    /// The schedule is five-field cron (MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK), read in --tz:
    /// `30 2 * * SAT`, `0 1 * * MON-FRI`, `0 2 1-7 * +SAT` (first Saturday), `@daily`.
    Create {
        /// Name: 1 to 31 of a-z, 0-9 and '-'.
        name: String,
        /// Five-field cron schedule (quote it).
        #[arg(long)]
        schedule: String,
        /// How long each opening lasts: 90m, 4h, 1d (1 minute to 7 days).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
        /// IANA time zone the schedule is read in (default UTC).
        #[arg(long)]
        tz: Option<String>,
        /// The nodes this window is for, a label selector (`role=db,zone in (a,b)`).
        #[arg(long)]
        selector: Option<String>,
    },
    /// Windows, whether each is open, and its current or next opening.
    List {},
    /// Delete a window (refused while an unfinished rollout uses it).
    #[command(alias = "remove")]
    Delete {
        /// Name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BudgetCmd {
    /// Set the disruption budget of a label group: at most N of its nodes unavailable at once, for
    /// every rollout and maintenance action.
    Set {
        /// A label selector (`role=db`, `role=db,zone in (a,b)`).
        #[arg(long)]
        selector: String,
        /// N (at least 1).
        #[arg(long)]
        max_unavailable: u32,
    },
    /// Budgets and how many nodes each group has.
    List {},
    /// Delete a budget.
    #[command(alias = "remove")]
    Delete {
        /// A label selector (`role=db`, `role=db,zone in (a,b)`).
        #[arg(long)]
        selector: String,
    },
}

/// Agent or image version.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct What {
    /// Agent release version.
    #[arg(long)]
    agent: Option<String>,
    /// Netboot image version.
    #[arg(long)]
    image: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum UpgradeCmd {
    /// Start a rolling upgrade of the nodes the selector matches (now).
    Start {
        #[command(flatten)]
        what: What,
        /// A label selector (`role=db`, `role=db,zone in (a,b)`).
        #[arg(long)]
        selector: String,
        /// N: never more than this many of the rollout's nodes unavailable at once.
        #[arg(long, default_value_t = 1)]
        max_unavailable: u32,
        /// Start nodes only while this window is open (default: at once).
        #[arg(long)]
        window: Option<String>,
        /// K: pause after this many failures (the failed nodes are rolled back).
        #[arg(long, default_value_t = 1)]
        max_failures: u32,
        /// How long a node has to come back healthy on the new version (default 15m).
        #[arg(long, value_parser = humantime::parse_duration)]
        deadline: Option<Duration>,
        /// Agent rollouts: let nodes go to an older version than they run. Without it, agents
        /// (protocol 5) refuse a downgrade and the node fails as refused, unchanged.
        #[arg(long)]
        allow_downgrade: bool,
        #[command(flatten)]
        wait: watch::WaitArgs,
    },
    #[command(flatten)]
    Rollout(RolloutCmd),
}

/// The action of `maintenance run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ActionName {
    /// Reboot each node (the agent's --reboot-command, kexec or reboot(2)); done when it is back.
    Reboot,
    /// Start a short SMART self-test on every drive with SMART (drives without are skipped).
    SmartTest,
    /// Run a program the agents allow (--allow-exec PATH), given after `--`.
    Exec,
}

/// When a maintenance run starts nodes.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct When {
    /// Start nodes only while this window is open.
    #[arg(long)]
    window: Option<String>,
    /// Start at once.
    #[arg(long)]
    now: bool,
}

/// What `upgrade` and `maintenance` share: a maintenance run is a rollout whose target is an
/// action.
#[derive(Debug, Subcommand)]
pub enum RolloutCmd {
    /// A rollout's or maintenance run's progress and every node's state (default: the current one).
    Status {
        /// Rollout id (r1, r2, ...).
        id: Option<String>,
        /// Watch: print the status again each time it changes, until the rollout finishes or
        /// Ctrl-C (with -o json, one object per line).
        #[arg(short, long)]
        watch: bool,
        /// Only the rows of the nodes this label selector matches (the counts stay the
        /// rollout's).
        #[arg(short = 'l', long = "selector")]
        selector: Option<String>,
    },
    /// Every rollout and maintenance run, one line each.
    List {},
    /// Start no new node; nodes in flight finish.
    Pause {
        /// Rollout id (default: the current rollout).
        id: Option<String>,
    },
    /// Start nodes again; the failure count starts over.
    Resume {
        /// Rollout id (default: the current rollout).
        id: Option<String>,
    },
    /// Stop for good; nodes in flight finish.
    Abort {
        /// Rollout id (default: the current rollout).
        id: Option<String>,
    },
    /// Try a failed (or skipped) node again (for an upgrade: forgets that the version failed on
    /// it).
    Retry {
        /// Node id or hostname.
        node: String,
        /// Rollout id (default: the current rollout).
        #[arg(long)]
        rollout: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum MaintenanceCmd {
    /// Run a maintenance action on the nodes the selector matches, a few at a time: each node goes
    /// cordoned (the agent's --pre-hook) → in-maintenance (the action) → up (--post-hook).
    ///
    /// `shoalctl maintenance run exec --selector role=db --now -- /usr/local/bin/compact --fast`
    Run {
        /// reboot, smart-test or exec.
        #[arg(value_enum)]
        action: ActionName,
        /// A label selector (`role=db`, `role=db,zone in (a,b)`).
        #[arg(long)]
        selector: String,
        #[command(flatten)]
        when: When,
        /// N: never more than this many of the run's nodes unavailable at once (disruption budgets
        /// apply on top).
        #[arg(long, default_value_t = 1)]
        max_unavailable: u32,
        /// K: pause after this many failed nodes.
        #[arg(long, default_value_t = 1)]
        max_failures: u32,
        /// How long a node has from its pre-hook until it is up again (default 45m).
        #[arg(long, value_parser = humantime::parse_duration)]
        deadline: Option<Duration>,
        /// For exec: the program (absolute path, allowed on the agents) and its arguments.
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
        #[command(flatten)]
        wait: watch::WaitArgs,
    },
    #[command(flatten)]
    Rollout(RolloutCmd),
}

/// The action a `maintenance run` asks for.
pub fn action_of(name: ActionName, command: Vec<String>) -> anyhow::Result<MaintenanceAction> {
    match (name, command.is_empty()) {
        (ActionName::Exec, true) => anyhow::bail!(
            "exec needs the command after `--`: maintenance run exec … -- /usr/local/bin/x ARGS"
        ),
        (ActionName::Exec, false) => {
            anyhow::ensure!(command[0].starts_with('/'), "{} is not an absolute path; agents run only programs they allow with --allow-exec PATH", command[0]);
            Ok(MaintenanceAction::Exec { argv: command })
        }
        (_, false) => anyhow::bail!("only exec takes a command after `--`"),
        (ActionName::Reboot, true) => Ok(MaintenanceAction::Reboot),
        (ActionName::SmartTest, true) => Ok(MaintenanceAction::SmartTest),
    }
}

pub fn maintenance(client: &AdminClient, cmd: MaintenanceCmd, out: &Out) -> anyhow::Result<()> {
    let cmd = match cmd {
        MaintenanceCmd::Run {
            action,
            selector,
            when,
            max_unavailable,
            max_failures,
            deadline,
            command,
            wait,
        } => {
            let req = StartRollout {
                action: Some(action_of(action, command)?),
                selector: Some(selector),
                max_unavailable: Some(max_unavailable),
                max_failures: Some(max_failures),
                window: if when.now { None } else { when.window },
                deadline_secs: deadline.map(|d| d.as_secs().max(1)),
                ..StartRollout::default()
            };
            let r: RolloutView = client.post("/v1/rollouts", &req)?;
            if wait.wait {
                return watch::wait_rollout(client, r, &wait, out);
            }
            return out.show(&r, || {
                say!(
                    "started maintenance run {}: {} on {} node(s)",
                    r.id,
                    r.target,
                    r.progress.total
                )
            });
        }
        MaintenanceCmd::Rollout(cmd) => cmd,
    };
    rollout(client, cmd, out)
}

pub fn window(client: &AdminClient, cmd: WindowCmd, out: &Out) -> anyhow::Result<()> {
    match cmd {
        WindowCmd::Create {
            name,
            schedule,
            duration,
            tz,
            selector,
        } => {
            let req = CreateWindow {
                name,
                schedule,
                duration_secs: duration.as_secs(),
                tz,
                selector,
            };
            let w: WindowView = client.post("/v1/windows", &req)?;
            out.show(&w, || {
                say!("created window {} ({}); {}", w.name, w.tz, next_text(&w))
            })?;
        }
        WindowCmd::List {} => {
            let all: Vec<WindowView> = client.get("/v1/windows")?;
            out.show(&all, || {
                out.table(
                    &["NAME", "SCHEDULE", "DURATION", "TZ", "SELECTOR", "STATE"],
                    all.iter().map(|w| {
                        vec![
                            w.name.clone(),
                            w.schedule.clone(),
                            humantime::format_duration(Duration::from_secs(w.duration_secs))
                                .to_string(),
                            w.tz.clone(),
                            w.selector.clone().unwrap_or_else(|| "-".into()),
                            next_text(w),
                        ]
                    }),
                );
            })?
        }
        WindowCmd::Delete { name } => {
            // The API answers 204: the JSON is the window as it was.
            let all: Vec<WindowView> = client.get("/v1/windows")?;
            let gone = all.into_iter().find(|w| w.name == name);
            client.delete::<serde_json::Value>(&format!("/v1/windows/{name}"))?;
            out.show(&gone, || say!("deleted window {name}"))?;
        }
    }
    Ok(())
}

fn next_text(w: &WindowView) -> String {
    match (w.open, &w.opens_at, &w.closes_at) {
        (true, _, Some(c)) => format!("open until {c}"),
        (false, Some(o), Some(c)) => format!("opens {o} until {c}"),
        _ => "never opens again".into(),
    }
}

pub fn budget(client: &AdminClient, cmd: BudgetCmd, out: &Out) -> anyhow::Result<()> {
    match cmd {
        BudgetCmd::Set {
            selector,
            max_unavailable,
        } => {
            let b: BudgetView = client.post(
                "/v1/budgets",
                &SetBudget {
                    selector,
                    max_unavailable,
                },
            )?;
            out.show(&b, || {
                say!(
                    "budget {}: at most {} of {} node(s) unavailable",
                    b.selector,
                    b.max_unavailable,
                    b.nodes
                )
            })?;
        }
        BudgetCmd::List {} => {
            let all: Vec<BudgetView> = client.get("/v1/budgets")?;
            out.show(&all, || {
                out.table(
                    &["SELECTOR", "MAX UNAVAILABLE", "NODES"],
                    all.iter().map(|b| {
                        vec![
                            b.selector.clone(),
                            b.max_unavailable.to_string(),
                            b.nodes.to_string(),
                        ]
                    }),
                );
            })?
        }
        BudgetCmd::Delete { selector } => {
            let all: Vec<BudgetView> = client.get("/v1/budgets")?;
            let gone = all.into_iter().find(|b| b.selector == selector);
            client.delete_budget(&selector)?;
            out.show(&gone, || say!("deleted budget {selector}"))?;
        }
    }
    Ok(())
}

/// `[######....] 6/10 succeeded, 1 in flight, 1 failed`.
pub fn progress_bar(r: &RolloutView) -> String {
    const WIDTH: u32 = 20;
    let p = &r.progress;
    let done = p.succeeded + p.failed + p.skipped;
    let filled = (done * WIDTH).checked_div(p.total).unwrap_or(0).min(WIDTH) as usize;
    let mut s = format!(
        "[{}{}] {}/{} succeeded",
        "#".repeat(filled),
        ".".repeat(WIDTH as usize - filled),
        p.succeeded,
        p.total
    );
    for (n, what) in [
        (p.in_flight, "in flight"),
        (p.failed, "failed"),
        (p.skipped, "skipped"),
        (p.pending, "pending"),
    ] {
        if n > 0 {
            s.push_str(&format!(", {n} {what}"));
        }
    }
    s
}

/// A rollout as `status` prints it.
pub fn print_status(r: &RolloutView, out: &Out) {
    say!(
        "{} {}: {} on {}, {}{}",
        if r.target.starts_with("action ") {
            "maintenance run"
        } else {
            "rollout"
        },
        r.id,
        r.target,
        r.selector.as_deref().unwrap_or("all nodes"),
        r.state,
        r.reason
            .as_ref()
            .map(|x| format!(" ({x})"))
            .unwrap_or_default()
    );
    say!(
        "max unavailable {}, pause after {} failure(s), {}{}",
        r.max_unavailable,
        r.max_failures,
        r.window
            .as_ref()
            .map(|w| format!("window {w}"))
            .unwrap_or_else(|| "no window".into()),
        if r.allow_downgrade {
            ", downgrades allowed"
        } else {
            ""
        }
    );
    say!("{}", progress_bar(r));
    for w in &r.waiting {
        say!("waiting: {w}");
    }
    say!();
    out.table_wide(
        &["NODE", "HOSTNAME", "STATE", "SINCE", "DEADLINE", "DETAIL"],
        &["SINCE AT", "DEADLINE AT"],
        r.nodes.iter().map(|n| {
            vec![
                n.node.clone(),
                n.hostname.clone().unwrap_or_else(|| "-".into()),
                match &n.step {
                    Some(step) => format!("{}: {step}", n.phase),
                    None => n.phase.clone(),
                },
                out.age_or(n.since.as_deref(), "-"),
                out.age_or(n.deadline.as_deref(), "-"),
                n.detail
                    .clone()
                    .or_else(|| n.output.clone())
                    .unwrap_or_default(),
                n.since.clone().unwrap_or_else(|| "-".into()),
                n.deadline.clone().unwrap_or_else(|| "-".into()),
            ]
        }),
    );
}

pub fn upgrade(client: &AdminClient, cmd: UpgradeCmd, out: &Out) -> anyhow::Result<()> {
    match cmd {
        UpgradeCmd::Start {
            what,
            selector,
            max_unavailable,
            window,
            max_failures,
            deadline,
            allow_downgrade,
            wait,
        } => {
            let req = StartRollout {
                agent: what.agent,
                image: what.image,
                action: None,
                selector: Some(selector),
                max_unavailable: Some(max_unavailable),
                max_failures: Some(max_failures),
                window,
                deadline_secs: deadline.map(|d| d.as_secs().max(1)),
                allow_downgrade,
            };
            let r: RolloutView = client.post("/v1/rollouts", &req)?;
            if wait.wait {
                return watch::wait_rollout(client, r, &wait, out);
            }
            out.show(&r, || {
                say!(
                    "started rollout {}: {} on {} node(s)",
                    r.id,
                    r.target,
                    r.progress.total
                )
            })?;
        }
        UpgradeCmd::Rollout(cmd) => return rollout(client, cmd, out),
    }
    Ok(())
}

/// The commands rollouts and maintenance runs share.
pub fn rollout(client: &AdminClient, cmd: RolloutCmd, out: &Out) -> anyhow::Result<()> {
    let id = |id: Option<String>| id.unwrap_or_else(|| "current".into());
    let said = |r: RolloutView| out.show(&r, || say!("rollout {} is {}", r.id, r.state));
    match cmd {
        RolloutCmd::Status {
            id: which,
            watch,
            selector,
        } => {
            let nodes = crate::nodes::matching(client, selector.as_deref())?;
            if watch {
                watch::watch_rollout(client, &id(which), &nodes, out)?
            } else {
                let r = watch::rollout(client, &id(which), &nodes)?;
                out.show(&r, || print_status(&r, out))?
            }
        }
        RolloutCmd::List {} => {
            let all: Vec<RolloutView> = client.get("/v1/rollouts")?;
            out.show(&all, || {
                out.table_wide(
                    &["ID", "TARGET", "SELECTOR", "STATE", "AGE", "PROGRESS"],
                    &["CREATED AT", "REASON"],
                    all.iter().map(|r| {
                        vec![
                            r.id.clone(),
                            r.target.clone(),
                            r.selector.clone().unwrap_or_else(|| "-".into()),
                            r.state.clone(),
                            out.age(&r.created_at),
                            progress_bar(r),
                            r.created_at.clone(),
                            r.reason.clone().unwrap_or_else(|| "-".into()),
                        ]
                    }),
                );
            })?
        }
        RolloutCmd::Pause { id: which } => said(client.post(
            &format!("/v1/rollouts/{}/pause", id(which)),
            &serde_json::json!({}),
        )?)?,
        RolloutCmd::Resume { id: which } => said(client.post(
            &format!("/v1/rollouts/{}/resume", id(which)),
            &serde_json::json!({}),
        )?)?,
        RolloutCmd::Abort { id: which } => said(client.post(
            &format!("/v1/rollouts/{}/abort", id(which)),
            &serde_json::json!({}),
        )?)?,
        RolloutCmd::Retry { node, rollout } => {
            let node = crate::nodes::resolve(client, &node)?;
            let r: RolloutView = client.post(
                &format!("/v1/rollouts/{}/retry", id(rollout)),
                &RetryNode { node: node.clone() },
            )?;
            out.show(&r, || {
                say!("rollout {}: {node} will be tried again ({})", r.id, r.state)
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use shoal_api::maintenance::Progress;

    use super::*;

    fn view(p: Progress) -> RolloutView {
        RolloutView {
            id: "r1".into(),
            target: "agent 1.1.0".into(),
            state: "running".into(),
            reason: None,
            finished: false,
            created_at: String::new(),
            selector: None,
            window: None,
            max_unavailable: 1,
            max_failures: 1,
            allow_downgrade: false,
            progress: p,
            waiting: Vec::new(),
            nodes: Vec::new(),
        }
    }

    #[test]
    fn maintenance_actions_take_a_command_only_for_exec() {
        assert_eq!(
            action_of(ActionName::Reboot, vec![]).unwrap(),
            MaintenanceAction::Reboot
        );
        assert!(action_of(ActionName::Reboot, vec!["/x".into()]).is_err());
        assert!(action_of(ActionName::Exec, vec![])
            .unwrap_err()
            .to_string()
            .contains("--"));
        assert!(action_of(ActionName::Exec, vec!["x".into()])
            .unwrap_err()
            .to_string()
            .contains("absolute"));
        let exec = action_of(ActionName::Exec, vec!["/bin/x".into(), "-v".into()]).unwrap();
        assert_eq!(
            exec,
            MaintenanceAction::Exec {
                argv: vec!["/bin/x".into(), "-v".into()]
            }
        );
    }

    #[test]
    fn the_progress_bar_counts_settled_nodes_and_says_the_rest() {
        let p = Progress {
            total: 10,
            pending: 3,
            in_flight: 1,
            succeeded: 5,
            failed: 1,
            skipped: 0,
        };
        assert_eq!(
            progress_bar(&view(p)),
            "[############........] 5/10 succeeded, 1 in flight, 1 failed, 3 pending"
        );
        let done = Progress {
            total: 4,
            succeeded: 4,
            ..Progress::default()
        };
        assert_eq!(
            progress_bar(&view(done)),
            "[####################] 4/4 succeeded"
        );
        assert_eq!(
            progress_bar(&view(Progress::default())),
            "[....................] 0/0 succeeded"
        );
    }
}
