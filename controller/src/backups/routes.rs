//! The admin API's routes for backup targets, jobs, runs, restores and their state.

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    routing::{delete, get, post},
    Json, Router,
};
use serde::Deserialize;
use shoal_api::{
    backups::{
        BackupStatusView, CreateJob, CreateTarget, JobView, Queued, RestoreOutcome, RestoreQueued,
        RestoreRequest, RunRequest, SnapshotView, TargetView, TaskView,
    },
    report::BackupAttention,
};
use shoal_controller_core::{
    backups::{check_target_url, verify_problems, Job, JobSpec, NodeJobState, OwedKind},
    registry::NodeRecord,
    selector::{valid_name, Selector},
    time::rfc3339_ms as rfc3339,
};
use shoal_proto::{Retention, UnixMillis, MAX_TARGET_ENV};
use tracing::info;

use super::{secrets::TargetSecrets, store::TargetRecord};
use crate::{
    http::{blocking, not_found, Ctl, HttpError},
    server::{now_ms, Controller},
};
use shoal_controller_core::backups::BackupEvent;

/// This domain's admin routes (the router adds authentication).
pub fn routes() -> Router<Ctl> {
    Router::new()
        .route("/v1/backups", get(list_status))
        .route("/v1/backups/targets", get(list_targets).post(create_target))
        .route("/v1/backups/targets/{name}", delete(delete_target))
        .route("/v1/backups/jobs", get(list_jobs).post(create_job))
        .route("/v1/backups/jobs/{name}", delete(delete_job))
        .route("/v1/backups/jobs/{name}/run", post(run_job))
        .route("/v1/backups/jobs/{name}/verify", post(verify_job))
        .route("/v1/backups/jobs/{name}/restore", post(restore_job))
}

fn bad(msg: impl Into<String>) -> HttpError {
    HttpError(StatusCode::BAD_REQUEST, msg.into())
}

/// A node by id, or by hostname when exactly one node has it.
pub(crate) fn resolve_node(ctl: &Ctl, name: &str) -> Result<NodeRecord, HttpError> {
    let nodes = ctl.store.nodes()?;
    if let Some(n) = nodes.iter().find(|n| n.id.0 == name) {
        return Ok(n.clone());
    }
    let by_host: Vec<&NodeRecord> = nodes.iter().filter(|n| n.hostname == name).collect();
    match by_host.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(not_found(&format!("node {name:?}"))),
        _ => Err(bad(format!(
            "hostname {name:?} is not unique: name the node by id"
        ))),
    }
}

fn log(ctl: &Ctl, message: &str) -> Result<(), HttpError> {
    info!("{message}");
    ctl.store.append_event(
        BackupEvent::BackupConfigChanged.into(),
        None,
        message,
        now_ms(),
    )?;
    Ok(())
}

async fn create_target(
    State(ctl): State<Ctl>,
    Json(req): Json<CreateTarget>,
) -> Result<(StatusCode, Json<TargetView>), HttpError> {
    blocking(move || {
        if !valid_name(&req.name) {
            return Err(bad(format!(
                "target name {:?} is not allowed: use 1 to 31 of a-z, 0-9 and '-', not starting with '-'",
                req.name
            )));
        }
        check_target_url(&req.url).map_err(|e| bad(e.to_string()))?;
        if req.password.is_empty() || req.password.len() > 1024 {
            return Err(bad("a target needs a repository password (--password-file), at most 1 KiB"));
        }
        if req.env.len() > MAX_TARGET_ENV
            || req.env.iter().any(|(k, v)| {
                k.is_empty()
                    || k.len() > 128
                    || v.len() > 4096
                    || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
        {
            return Err(bad(format!(
                "--env takes at most {MAX_TARGET_ENV} KEY=VALUE entries with KEY of A-Z, 0-9 and _"
            )));
        }
        if req.env.iter().any(|(k, _)| k.starts_with("RESTIC_")) {
            return Err(bad("RESTIC_* variables are set by the agent; give the password with --password-file"));
        }
        let sftp = req.url.starts_with("sftp:");
        if sftp && req.ssh_known_hosts.as_deref().is_none_or(|k| k.trim().is_empty()) {
            return Err(bad(
                "an sftp: target needs --ssh-known-hosts FILE: agents never accept an unknown host key",
            ));
        }
        if !sftp && (req.ssh_key.is_some() || req.ssh_known_hosts.is_some()) {
            return Err(bad("--ssh-key and --ssh-known-hosts are for sftp: targets"));
        }
        if req.ssh_key.as_ref().is_some_and(|k| k.len() > 16 * 1024)
            || req.ssh_known_hosts.as_ref().is_some_and(|k| k.len() > 64 * 1024)
        {
            return Err(bad("the SSH key or known_hosts file is too large"));
        }
        let secrets = TargetSecrets {
            password: req.password.clone(),
            env: req.env.clone(),
            ssh_key: req.ssh_key.clone(),
        };
        let record = TargetRecord {
            name: req.name.clone(),
            url: req.url.clone(),
            sealed: ctl
                .backups
                .secrets
                .seal(&req.name, &secrets)
                .map_err(|e| HttpError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
            env_keys: req.env.iter().map(|(k, _)| k.clone()).collect(),
            has_ssh_key: req.ssh_key.is_some(),
            ssh_known_hosts: req.ssh_known_hosts.clone(),
            created_at: now_ms(),
        };
        if !ctl.store.add_backup_target(&record)? {
            return Err(HttpError(
                StatusCode::CONFLICT,
                format!("target {:?} exists", req.name),
            ));
        }
        log(&ctl, &format!("backup target {} added ({})", record.name, record.url))?;
        Ok((StatusCode::CREATED, Json(target_view(&record, &[]))))
    })
    .await
}

fn target_view(t: &TargetRecord, jobs: &[shoal_controller_core::backups::JobRecord]) -> TargetView {
    TargetView {
        name: t.name.clone(),
        url: t.url.clone(),
        env_keys: t.env_keys.clone(),
        ssh_key: t.has_ssh_key,
        jobs: jobs
            .iter()
            .filter(|j| j.targets.contains(&t.name))
            .map(|j| j.name.clone())
            .collect(),
        created_at: rfc3339(t.created_at.0),
    }
}

async fn list_targets(State(ctl): State<Ctl>) -> Result<Json<Vec<TargetView>>, HttpError> {
    blocking(move || {
        let jobs = ctl.store.backup_jobs()?;
        Ok(Json(
            ctl.store
                .backup_targets()?
                .iter()
                .map(|t| target_view(t, &jobs))
                .collect(),
        ))
    })
    .await
}

async fn delete_target(
    State(ctl): State<Ctl>,
    Path(name): Path<String>,
) -> Result<Json<TargetView>, HttpError> {
    blocking(move || match ctl.store.delete_backup_target(&name)? {
        Err(jobs) => Err(HttpError(
            StatusCode::CONFLICT,
            format!(
                "target {name:?} is used by job(s) {}: delete them first",
                jobs.join(", ")
            ),
        )),
        Ok(None) => Err(not_found(&format!("target {name:?}"))),
        Ok(Some(t)) => {
            log(&ctl, &format!("backup target {name} deleted"))?;
            Ok(Json(target_view(&t, &[])))
        }
    })
    .await
}

fn retention_text(r: &Retention) -> String {
    let parts: Vec<String> = [
        ("last", r.keep_last),
        ("daily", r.keep_daily),
        ("weekly", r.keep_weekly),
        ("monthly", r.keep_monthly),
    ]
    .iter()
    .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
    .collect();
    if parts.is_empty() {
        "all".into()
    } else {
        parts.join(" ")
    }
}

fn job_view(job: &Job, nodes: &[NodeRecord], now: UnixMillis) -> JobView {
    let r = job.record();
    JobView {
        name: r.name.clone(),
        selector: r.selector.as_ref().map(Selector::to_string),
        paths: r.paths.clone(),
        excludes: r.excludes.clone(),
        schedule: r.schedule.clone(),
        verify_schedule: r.verify_schedule.clone(),
        tz: r.tz.clone(),
        targets: r.targets.clone(),
        retention: retention_text(&r.retention),
        window: r.window.clone(),
        verify_max_age_secs: r.verify_max_age_secs,
        check_period: r.check_period,
        nodes: nodes.iter().filter(|n| job.selects(&n.labels)).count(),
        next_run: job.backup_schedule().next_after(now).map(|t| rfc3339(t.0)),
    }
}

async fn create_job(
    State(ctl): State<Ctl>,
    Json(req): Json<CreateJob>,
) -> Result<(StatusCode, Json<JobView>), HttpError> {
    blocking(move || {
        let now = now_ms();
        let job = Job::new(
            JobSpec {
                name: req.name.clone(),
                selector: req.selector.clone(),
                paths: req.paths.clone(),
                excludes: req.excludes.clone(),
                schedule: req.schedule.clone(),
                verify_schedule: req.verify_schedule.clone(),
                tz: req.tz.clone(),
                targets: req.targets.clone(),
                retention: Retention {
                    keep_last: req.keep_last,
                    keep_daily: req.keep_daily,
                    keep_weekly: req.keep_weekly,
                    keep_monthly: req.keep_monthly,
                },
                window: req.window.clone(),
                verify_max_age: req.verify_max_age_secs.map(std::time::Duration::from_secs),
                check_period: req.check_period,
                sample_files: req.sample_files,
            },
            now,
        )
        .map_err(|e| bad(e.to_string()))?;
        if let Some(w) = &job.record().window {
            if ctl.maint.window(w)?.is_none() {
                return Err(bad(format!(
                    "window {w:?} does not exist (shoalctl window list)"
                )));
            }
        }
        match ctl.store.add_backup_job(job.record())? {
            Err(target) => {
                return Err(bad(format!(
                    "target {target:?} does not exist (shoalctl backup target list)"
                )))
            }
            Ok(false) => {
                return Err(HttpError(
                    StatusCode::CONFLICT,
                    format!("job {:?} exists", req.name),
                ))
            }
            Ok(true) => {}
        }
        log(
            &ctl,
            &format!(
                "backup job {} created: {} to {} on {}",
                job.name(),
                job.record().paths.join(" "),
                job.record().targets.join(", "),
                job.record().schedule
            ),
        )?;
        let nodes = ctl.store.nodes()?;
        Ok((StatusCode::CREATED, Json(job_view(&job, &nodes, now))))
    })
    .await
}

async fn list_jobs(State(ctl): State<Ctl>) -> Result<Json<Vec<JobView>>, HttpError> {
    blocking(move || {
        let nodes = ctl.store.nodes()?;
        let now = now_ms();
        Ok(Json(
            ctl.store
                .backup_jobs()?
                .into_iter()
                .filter_map(|r| Job::from_record(r).ok())
                .map(|j| job_view(&j, &nodes, now))
                .collect(),
        ))
    })
    .await
}

async fn delete_job(
    State(ctl): State<Ctl>,
    Path(name): Path<String>,
) -> Result<Json<JobView>, HttpError> {
    blocking(move || {
        let Some(record) = ctl.store.delete_backup_job(&name)? else {
            return Err(not_found(&format!("job {name:?}")));
        };
        log(
            &ctl,
            &format!("backup job {name} deleted (its snapshots stay in the targets)"),
        )?;
        let job = Job::from_record(record).map_err(|e| bad(e.to_string()))?;
        Ok(Json(job_view(&job, &[], now_ms())))
    })
    .await
}

fn job_or_404(ctl: &Ctl, name: &str) -> Result<Job, HttpError> {
    let record = ctl
        .store
        .backup_job(name)?
        .ok_or_else(|| not_found(&format!("job {name:?}")))?;
    Job::from_record(record).map_err(|e| bad(e.to_string()))
}

/// The nodes a run request names: one (which the job must select) or all the job selects.
fn run_nodes(ctl: &Ctl, job: &Job, node: Option<&str>) -> Result<Vec<NodeRecord>, HttpError> {
    match node {
        Some(n) => {
            let node = resolve_node(ctl, n)?;
            if !job.selects(&node.labels) {
                return Err(bad(format!(
                    "job {} does not select node {} ({})",
                    job.name(),
                    node.hostname,
                    node.id
                )));
            }
            Ok(vec![node])
        }
        None => Ok(ctl
            .store
            .nodes()?
            .into_iter()
            .filter(|n| job.selects(&n.labels))
            .collect()),
    }
}

async fn run_or_verify(
    ctl: Ctl,
    name: String,
    req: RunRequest,
    kind: OwedKind,
) -> Result<Json<Queued>, HttpError> {
    blocking(move || {
        let job = job_or_404(&ctl, &name)?;
        let nodes = run_nodes(&ctl, &job, req.node.as_deref())?;
        let ids: Vec<_> = nodes.iter().map(|n| n.id.clone()).collect();
        ctl.request_backup_run(&name, &ids, kind)?;
        Ok(Json(Queued {
            nodes: ids.into_iter().map(|n| n.0).collect(),
        }))
    })
    .await
}

async fn run_job(
    State(ctl): State<Ctl>,
    Path(name): Path<String>,
    Json(req): Json<RunRequest>,
) -> Result<Json<Queued>, HttpError> {
    run_or_verify(ctl, name, req, OwedKind::Backup).await
}

async fn verify_job(
    State(ctl): State<Ctl>,
    Path(name): Path<String>,
    Json(req): Json<RunRequest>,
) -> Result<Json<Queued>, HttpError> {
    run_or_verify(ctl, name, req, OwedKind::Verify).await
}

async fn restore_job(
    State(ctl): State<Ctl>,
    Path(name): Path<String>,
    Json(req): Json<RestoreRequest>,
) -> Result<Json<RestoreQueued>, HttpError> {
    blocking(move || {
        let job = job_or_404(&ctl, &name)?;
        let node = run_nodes(&ctl, &job, Some(&req.node))?.remove(0);
        let target = match &req.target {
            Some(t) if job.record().targets.contains(t) => t.clone(),
            Some(t) => return Err(bad(format!("job {name} does not write to target {t:?}"))),
            None => job.record().targets[0].clone(),
        };
        if !req.to.starts_with('/') || req.to.len() > 4096 {
            return Err(bad("--to must be an absolute directory on the node"));
        }
        if req.include.iter().any(|p| !p.starts_with('/')) {
            return Err(bad("--path must be absolute"));
        }
        let task = ctl.request_restore(
            &name,
            &node.id,
            shoal_controller_core::backups::RestoreRequest {
                target,
                snapshot: req.snapshot.clone(),
                include: req.include.clone(),
                to: req.to.clone(),
            },
            now_ms(),
        )?;
        Ok(Json(RestoreQueued {
            node: node.id.0,
            task,
        }))
    })
    .await
}

#[derive(Debug, Deserialize)]
pub(crate) struct StatusQuery {
    pub(crate) job: Option<String>,
    pub(crate) node: Option<String>,
}

pub(crate) async fn list_status(
    State(ctl): State<Ctl>,
    Query(q): Query<StatusQuery>,
) -> Result<Json<Vec<BackupStatusView>>, HttpError> {
    blocking(move || {
        let node_filter = q
            .node
            .as_deref()
            .map(|n| resolve_node(&ctl, n))
            .transpose()?;
        let jobs = match &q.job {
            Some(j) => vec![job_or_404(&ctl, j)?],
            None => ctl
                .store
                .backup_jobs()?
                .into_iter()
                .filter_map(|r| Job::from_record(r).ok())
                .collect(),
        };
        let nodes = ctl.store.nodes()?;
        let progress = ctl
            .backups
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out = vec![];
        for job in &jobs {
            for node in nodes.iter().filter(|n| job.selects(&n.labels)) {
                if node_filter.as_ref().is_some_and(|f| f.id != node.id) {
                    continue;
                }
                let state = ctl.store.backup_state(job.name(), &node.id)?;
                for target in &job.record().targets {
                    let t = state.targets.get(target).cloned().unwrap_or_default();
                    let running = state
                        .in_flight
                        .as_ref()
                        .map(|f| format!("{} {} since {}", f.kind, f.task, rfc3339(f.sent_at.0)));
                    let progress = state.in_flight.as_ref().and_then(|f| {
                        progress
                            .get(&(node.id.clone(), f.task.clone()))
                            .and_then(|(p, _)| {
                                (p.target == *target).then(|| {
                                    format!(
                                        "{}: {}/{} files, {}/{} bytes",
                                        p.phase,
                                        p.files_done,
                                        p.total_files,
                                        p.bytes_done,
                                        p.total_bytes
                                    )
                                })
                            })
                    });
                    let verify = t.last_verify.as_ref();
                    out.push(BackupStatusView {
                        job: job.name().to_owned(),
                        node: node.id.0.clone(),
                        hostname: node.hostname.clone(),
                        target: target.clone(),
                        last_snapshot: t.last_backup.as_ref().map(|b| b.stats.snapshot.clone()),
                        last_backup_at: t.last_backup.as_ref().map(|b| rfc3339(b.at.0)),
                        last_bytes_added: t.last_backup.as_ref().map(|b| b.stats.bytes_added),
                        last_files: t.last_backup.as_ref().map(|b| b.stats.files_processed),
                        last_duration_ms: t.last_backup.as_ref().map(|b| b.stats.duration_ms),
                        last_stale_locks_cleared: t
                            .last_backup
                            .as_ref()
                            .map(|b| b.stats.stale_locks_cleared),
                        last_forgotten: t
                            .last_backup
                            .as_ref()
                            .map(|b| b.stats.forgotten.clone())
                            .unwrap_or_default(),
                        last_error: t.last_error.as_ref().map(|e| {
                            format!("{} at {}: {}", e.task_kind, rfc3339(e.at.0), e.message)
                        }),
                        verification: match verify {
                            None => "never".into(),
                            Some(v) if v.stats.passed() => "passed".into(),
                            Some(_) => "failed".into(),
                        },
                        verified_at: verify.map(|v| rfc3339(v.at.0)),
                        verified_snapshot: verify.map(|v| v.stats.snapshot.clone()),
                        verified_files: verify.map(|v| v.stats.files_checked),
                        check_subset: verify.map(|v| {
                            format!("{}/{}", v.stats.check_subset.0, v.stats.check_subset.1)
                        }),
                        verify_problems: verify
                            .filter(|v| !v.stats.passed())
                            .map(|v| verify_problems(&v.stats)),
                        full_read_at: t.full_read_at.map(|a| rfc3339(a.0)),
                        snapshots: t
                            .snapshots
                            .iter()
                            .map(|s| SnapshotView {
                                id: s.id.clone(),
                                time: rfc3339(s.time.0),
                                paths: s.paths.clone(),
                            })
                            .collect(),
                        running,
                        progress,
                        last_task: state.last_task.as_ref().map(|l| TaskView {
                            task: l.task.clone(),
                            kind: l.kind.clone(),
                            finished_at: rfc3339(l.finished_at.0),
                            ok: l.ok,
                            restore: l
                                .restored
                                .iter()
                                .map(|(target, o)| RestoreOutcome {
                                    target: target.clone(),
                                    snapshot: o.as_ref().ok().cloned(),
                                    error: o.as_ref().err().cloned(),
                                })
                                .collect(),
                        }),
                    });
                }
            }
        }
        Ok(Json(out))
    })
    .await
}

/// A job and its state on every node it selects.
pub(crate) type JobStates<'n> = (Job, Vec<(&'n NodeRecord, NodeJobState)>);

/// Every job's state on every node it selects (the report and the metrics read it).
pub(crate) fn job_states<'n>(
    ctl: &Controller,
    nodes: &'n [NodeRecord],
) -> Result<Vec<JobStates<'n>>, HttpError> {
    let mut out = vec![];
    for record in ctl.store.backup_jobs()? {
        let Ok(job) = Job::from_record(record) else {
            continue;
        };
        let mut states = vec![];
        for node in nodes.iter().filter(|n| job.selects(&n.labels)) {
            states.push((node, ctl.store.backup_state(job.name(), &node.id)?));
        }
        out.push((job, states));
    }
    Ok(out)
}

/// The report's backup lines: each job on each node with a problem.
pub(crate) fn attention(
    ctl: &Ctl,
    nodes: &[NodeRecord],
) -> Result<Vec<BackupAttention>, HttpError> {
    let now = now_ms();
    let mut out = vec![];
    for (job, states) in job_states(ctl, nodes)? {
        for (node, state) in states {
            let reasons = job.attention(&state, now);
            if !reasons.is_empty() {
                out.push(BackupAttention {
                    job: job.name().to_owned(),
                    node: node.id.0.clone(),
                    hostname: node.hostname.clone(),
                    reasons,
                });
            }
        }
    }
    Ok(out)
}
