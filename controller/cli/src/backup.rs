//! `shoalctl backup …`: targets, jobs, runs, verification, snapshots and restores.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Subcommand;
use shoal_api::{
    backups::{
        BackupStatusView, CreateJob, CreateTarget, JobView, Queued, RestoreQueued, RestoreRequest,
        RunRequest, TargetView,
    },
    AdminClient,
};

use super::{parse_label, print_json, table, Output};

#[derive(Debug, Subcommand)]
pub enum BackupCmd {
    /// Repositories jobs write to.
    #[command(subcommand)]
    Target(TargetCmd),
    /// What to back up, when, where, and how long to keep it.
    #[command(subcommand)]
    Job(JobCmd),
    /// Back up now (every node the job selects, or one).
    Run {
        /// The job.
        job: String,
        /// Only this node (id or hostname).
        #[arg(long)]
        node: Option<String>,
    },
    /// Prove the newest snapshots restorable now: restore a sample and compare, and read the next
    /// part of each repository's data.
    Verify {
        /// The job.
        job: String,
        /// Only this node (id or hostname).
        #[arg(long)]
        node: Option<String>,
    },
    /// Snapshots per node and target, with their verification state.
    List {
        /// Only this job.
        job: Option<String>,
        /// Only this node (id or hostname).
        #[arg(long)]
        node: Option<String>,
        /// Only the nodes this label selector matches.
        #[arg(short = 'l', long = "selector")]
        selector: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Restore a snapshot onto the node, into a directory, and wait for the outcome.
    Restore {
        /// The job.
        job: String,
        /// The node (id or hostname).
        #[arg(long)]
        node: String,
        /// The target to restore from (default the job's first).
        #[arg(long)]
        target: Option<String>,
        /// Snapshot id or prefix (default the newest).
        #[arg(long)]
        snapshot: Option<String>,
        /// Restore only this path (repeatable; default everything).
        #[arg(long = "path")]
        paths: Vec<String>,
        /// Directory on the node to restore into (absent or empty).
        #[arg(long)]
        to: String,
        /// How long to wait for the node.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30m")]
        timeout: Duration,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum TargetCmd {
    /// Add a repository: a local path, sftp:user@host:/path, rest:http(s)://host:port/path or
    /// s3:http(s)://host:port/bucket. Each node writes to URL/<node id>. The password,
    /// credentials and SSH key are kept encrypted and sent only to agents whose jobs use the
    /// target.
    Add {
        /// Name: 1 to 31 of a-z, 0-9 and '-'.
        name: String,
        /// Repository URL.
        url: String,
        /// File holding the repository password (first line).
        #[arg(long)]
        password_file: PathBuf,
        /// Credentials for restic, KEY=VALUE (AWS_ACCESS_KEY_ID=..., repeatable).
        #[arg(long = "env", value_parser = parse_label)]
        env: Vec<(String, String)>,
        /// sftp: the SSH private key agents log in with.
        #[arg(long)]
        ssh_key: Option<PathBuf>,
        /// sftp: known_hosts lines for the server (required for sftp:).
        #[arg(long)]
        ssh_known_hosts: Option<PathBuf>,
    },
    /// Targets (no secrets shown).
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a target no job uses (its repositories stay where they are).
    Delete {
        /// Name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// Create a job. The schedule is five-field cron read in --tz (`0 2 * * *`, `@daily`). A node
    /// that is down, in maintenance or outside --window when the schedule fires is caught up once
    /// it can run.
    Create(Box<JobCreate>),
    /// Jobs.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a job (its snapshots stay in the targets).
    Delete {
        /// Name.
        name: String,
    },
}

/// `backup job create`.
#[derive(Debug, clap::Args)]
pub struct JobCreate {
    /// Name: 1 to 31 of a-z, 0-9 and '-'.
    name: String,
    /// The nodes to back up, a label selector (`role=db,zone in (a,b)`; default every node).
    #[arg(long)]
    selector: Option<String>,
    /// Absolute path to back up (repeatable).
    #[arg(long = "path", required = true)]
    paths: Vec<String>,
    /// Exclude pattern, restic --exclude (repeatable).
    #[arg(long = "exclude")]
    excludes: Vec<String>,
    /// When to back up.
    #[arg(long)]
    schedule: String,
    /// When to verify besides after each backup (default @daily).
    #[arg(long)]
    verify_schedule: Option<String>,
    /// IANA time zone of both schedules (default UTC).
    #[arg(long)]
    tz: Option<String>,
    /// Target to write to (repeatable: every one gets every backup).
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// Keep the newest N snapshots.
    #[arg(long)]
    keep_last: Option<u32>,
    /// Keep one snapshot for each of the last N days.
    #[arg(long)]
    keep_daily: Option<u32>,
    /// ... weeks.
    #[arg(long)]
    keep_weekly: Option<u32>,
    /// ... months.
    #[arg(long)]
    keep_monthly: Option<u32>,
    /// A maintenance window outside which scheduled runs do not start.
    #[arg(long)]
    window: Option<String>,
    /// Report the job when its newest passed verification is older than this (default 26h).
    #[arg(long, value_parser = humantime::parse_duration)]
    verify_max_age: Option<Duration>,
    /// Verifications over which every pack is read once (default 7).
    #[arg(long)]
    check_period: Option<u32>,
    /// Files restored and compared per verification (default 32, at most 64).
    #[arg(long)]
    sample_files: Option<u32>,
}

fn read_text(path: &PathBuf, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {what} {}", path.display()))
}

pub fn backup(client: &AdminClient, cmd: BackupCmd) -> anyhow::Result<()> {
    match cmd {
        BackupCmd::Target(cmd) => target(client, cmd),
        BackupCmd::Job(cmd) => job(client, cmd),
        BackupCmd::Run { job, node } => {
            let q: Queued =
                client.post(&format!("/v1/backups/jobs/{job}/run"), &RunRequest { node })?;
            say!(
                "backup of job {job} queued on {} node(s): {}",
                q.nodes.len(),
                q.nodes.join(", ")
            );
            Ok(())
        }
        BackupCmd::Verify { job, node } => {
            let q: Queued = client.post(
                &format!("/v1/backups/jobs/{job}/verify"),
                &RunRequest { node },
            )?;
            say!(
                "verification of job {job} queued on {} node(s): {}",
                q.nodes.len(),
                q.nodes.join(", ")
            );
            Ok(())
        }
        BackupCmd::List {
            job,
            node,
            selector,
            output,
        } => {
            let filter = crate::nodes::matching(client, selector.as_deref())?;
            let mut path = "/v1/backups".to_owned();
            let mut sep = '?';
            for (k, v) in [("job", &job), ("node", &node)] {
                if let Some(v) = v {
                    path.push_str(&format!("{sep}{k}={v}"));
                    sep = '&';
                }
            }
            let mut all: Vec<BackupStatusView> = client.get(&path)?;
            all.retain(|s| crate::nodes::keep(&filter, &s.node));
            match output {
                Output::Json => print_json(&all)?,
                Output::Table => table(
                    &[
                        "JOB",
                        "NODE",
                        "TARGET",
                        "SNAPSHOTS",
                        "LAST BACKUP",
                        "VERIFIED",
                        "PROBLEM",
                    ],
                    all.iter().map(|s| {
                        vec![
                            s.job.clone(),
                            s.hostname.clone(),
                            s.target.clone(),
                            s.snapshots.len().to_string(),
                            match (&s.last_snapshot, &s.last_backup_at) {
                                (Some(id), Some(at)) => format!("{} {at}", &id[..id.len().min(8)]),
                                _ => "-".into(),
                            },
                            match &s.verified_at {
                                Some(at) => format!("{} {at}", s.verification),
                                None => s.verification.clone(),
                            },
                            s.running
                                .clone()
                                .map(|r| format!("running: {r}"))
                                .or_else(|| s.verify_problems.clone())
                                .or_else(|| s.last_error.clone())
                                .unwrap_or_else(|| "-".into()),
                        ]
                    }),
                ),
            }
            Ok(())
        }
        BackupCmd::Restore {
            job,
            node,
            target,
            snapshot,
            paths,
            to,
            timeout,
            output,
        } => {
            let q: RestoreQueued = client.post(
                &format!("/v1/backups/jobs/{job}/restore"),
                &RestoreRequest {
                    node,
                    target,
                    snapshot,
                    include: paths,
                    to,
                },
            )?;
            eprintln!("restore {} queued on node {}; waiting", q.task, q.node);
            let deadline = Instant::now() + timeout;
            loop {
                let all: Vec<BackupStatusView> =
                    client.get(&format!("/v1/backups?job={job}&node={}", q.node))?;
                if let Some(task) = all
                    .iter()
                    .filter_map(|s| s.last_task.as_ref())
                    .find(|t| t.task == q.task)
                {
                    match output {
                        Output::Json => print_json(task)?,
                        Output::Table => {
                            for r in &task.restore {
                                match (&r.snapshot, &r.error) {
                                    (Some(s), None) => {
                                        say!("restored snapshot {s} from {}", r.target)
                                    }
                                    (_, e) => say!(
                                        "restore from {} failed: {}",
                                        r.target,
                                        e.clone().unwrap_or_default()
                                    ),
                                }
                            }
                        }
                    }
                    if !task.ok {
                        bail!("restore {} failed", q.task);
                    }
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    bail!(
                        "restore {} did not finish within {}",
                        q.task,
                        humantime::format_duration(timeout)
                    );
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

fn target(client: &AdminClient, cmd: TargetCmd) -> anyhow::Result<()> {
    match cmd {
        TargetCmd::Add {
            name,
            url,
            password_file,
            env,
            ssh_key,
            ssh_known_hosts,
        } => {
            let password = read_text(&password_file, "password file")?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            if password.is_empty() {
                bail!("the password file {} is empty", password_file.display());
            }
            let req = CreateTarget {
                name,
                url,
                password,
                env,
                ssh_key: ssh_key.map(|p| read_text(&p, "SSH key")).transpose()?,
                ssh_known_hosts: ssh_known_hosts
                    .map(|p| read_text(&p, "known_hosts file"))
                    .transpose()?,
            };
            let t: TargetView = client.post("/v1/backups/targets", &req)?;
            say!("added backup target {} ({})", t.name, t.url);
        }
        TargetCmd::List { output } => {
            let all: Vec<TargetView> = client.get("/v1/backups/targets")?;
            match output {
                Output::Json => print_json(&all)?,
                Output::Table => table(
                    &["NAME", "URL", "CREDENTIALS", "JOBS"],
                    all.iter().map(|t| {
                        let mut creds = t.env_keys.clone();
                        if t.ssh_key {
                            creds.push("ssh key".into());
                        }
                        vec![
                            t.name.clone(),
                            t.url.clone(),
                            if creds.is_empty() {
                                "-".into()
                            } else {
                                creds.join(",")
                            },
                            if t.jobs.is_empty() {
                                "-".into()
                            } else {
                                t.jobs.join(",")
                            },
                        ]
                    }),
                ),
            }
        }
        TargetCmd::Delete { name } => {
            client.delete::<serde_json::Value>(&format!("/v1/backups/targets/{name}"))?;
            say!("deleted backup target {name}");
        }
    }
    Ok(())
}

fn job(client: &AdminClient, cmd: JobCmd) -> anyhow::Result<()> {
    match cmd {
        JobCmd::Create(create) => {
            let JobCreate {
                name,
                selector,
                paths,
                excludes,
                schedule,
                verify_schedule,
                tz,
                targets,
                keep_last,
                keep_daily,
                keep_weekly,
                keep_monthly,
                window,
                verify_max_age,
                check_period,
                sample_files,
            } = *create;
            let req = CreateJob {
                name,
                selector,
                paths,
                excludes,
                schedule,
                verify_schedule,
                tz,
                targets,
                keep_last,
                keep_daily,
                keep_weekly,
                keep_monthly,
                window,
                verify_max_age_secs: verify_max_age.map(|d| d.as_secs()),
                check_period,
                sample_files,
            };
            let j: JobView = client.post("/v1/backups/jobs", &req)?;
            say!(
                "created backup job {} on {} node(s); next run {}",
                j.name,
                j.nodes,
                j.next_run.unwrap_or_else(|| "never".into())
            );
        }
        JobCmd::List { output } => {
            let all: Vec<JobView> = client.get("/v1/backups/jobs")?;
            match output {
                Output::Json => print_json(&all)?,
                Output::Table => table(
                    &[
                        "NAME", "SELECTOR", "PATHS", "SCHEDULE", "TARGETS", "KEEP", "NODES",
                        "NEXT RUN",
                    ],
                    all.iter().map(|j| {
                        vec![
                            j.name.clone(),
                            j.selector.clone().unwrap_or_else(|| "-".into()),
                            j.paths.join(","),
                            format!("{} ({})", j.schedule, j.tz),
                            j.targets.join(","),
                            j.retention.clone(),
                            j.nodes.to_string(),
                            j.next_run.clone().unwrap_or_else(|| "never".into()),
                        ]
                    }),
                ),
            }
        }
        JobCmd::Delete { name } => {
            client.delete::<serde_json::Value>(&format!("/v1/backups/jobs/{name}"))?;
            say!("deleted backup job {name}");
        }
    }
    Ok(())
}
