//! The backup scheduler: every tick (and at once when an operator asks for a run), each node a
//! job selects that owes a task and can take it gets one. A task in flight is sent again whenever
//! its node reconnects, with the same id, until its result arrives.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use shoal_controller_core::backups::{InFlight, Job, NodeJobState, OwedKind, RestoreRequest};
use shoal_proto::{
    BackupProgress, BackupTask, ControllerMsg, NodeId, TargetAccess, TaskKind, TaskTarget,
    UnixMillis, BACKUP_PROTOCOL,
};
use tracing::{debug, info, warn};

use super::{
    secrets::{SecretBox, SecretError},
    store::TargetRecord,
};
use crate::{
    server::{now_ms, Controller},
    store::StoreError,
};

/// The backup domain's live parts.
pub(crate) struct Backups {
    /// Seals target secrets.
    pub(crate) secrets: SecretBox,
    /// The latest progress of each running task, by node and task id (memory only).
    pub(crate) progress: Mutex<HashMap<(NodeId, String), (BackupProgress, UnixMillis)>>,
    /// Wakes the scheduler (an operator asked for a run, a node connected).
    pub(crate) wake: tokio::sync::Notify,
}

impl std::fmt::Debug for Backups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backups").finish_non_exhaustive()
    }
}

impl Backups {
    /// Opens the secrets key in `data_dir`.
    pub(crate) fn open(data_dir: &std::path::Path) -> Result<Backups, SecretError> {
        Ok(Backups {
            secrets: SecretBox::open(data_dir)?,
            progress: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
        })
    }
}

/// Why a task could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TaskError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("target {0:?} does not exist")]
    NoTarget(String),
}

/// A new task id.
pub(crate) fn new_task_id(now: UnixMillis) -> String {
    format!("b{:x}{:04x}", now.0, rand::random::<u16>())
}

/// Runs the scheduler until the process ends.
pub(crate) async fn run_scheduler(controller: Arc<Controller>, tick: Duration) {
    loop {
        let c = controller.clone();
        // The leader's work: skipped on a follower, fenced on the leader.
        let _ =
            tokio::task::spawn_blocking(move || c.cluster.as_leader(|| c.backup_pass(now_ms())))
                .await;
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = controller.backups.wake.notified() => {}
        }
    }
}

impl Controller {
    /// The sealed access of a target.
    pub(crate) fn target_access(&self, record: &TargetRecord) -> Result<TargetAccess, SecretError> {
        let secrets = self.backups.secrets.unseal(&record.name, &record.sealed)?;
        Ok(TargetAccess {
            name: record.name.clone(),
            url: record.url.clone(),
            password: secrets.password,
            env: secrets.env,
            ssh_key: secrets.ssh_key,
            ssh_known_hosts: record.ssh_known_hosts.clone(),
        })
    }

    /// The task for an in-flight record.
    fn build_task(
        &self,
        job: &Job,
        state: &NodeJobState,
        flight: &InFlight,
    ) -> Result<BackupTask, TaskError> {
        let record = job.record();
        let (kind, names): (TaskKind, Vec<String>) = match (&flight.restore, flight.kind.as_str()) {
            (Some(r), _) => (
                TaskKind::Restore {
                    snapshot: r.snapshot.clone(),
                    include: r.include.clone(),
                    to: r.to.clone(),
                },
                vec![r.target.clone()],
            ),
            (None, "verify") => (TaskKind::Verify, record.targets.clone()),
            (None, _) => (TaskKind::Backup, record.targets.clone()),
        };
        let mut targets = vec![];
        for name in names {
            let t = self
                .store
                .backup_target(&name)?
                .ok_or_else(|| TaskError::NoTarget(name.clone()))?;
            targets.push(TaskTarget {
                access: self.target_access(&t)?,
                check_subset: job.check_subset(state, &name),
                verify: state.targets.get(&name).and_then(|t| t.sample.clone()),
            });
        }
        Ok(BackupTask {
            id: flight.task.clone(),
            job: record.name.clone(),
            kind,
            paths: record.paths.clone(),
            excludes: record.excludes.clone(),
            retention: record.retention.clone(),
            sample_files: record.sample_files,
            targets,
        })
    }

    /// Whether a rollout has the node in flight (upgrading, rebooting, in maintenance).
    fn in_maintenance(
        &self,
        rollouts: &[shoal_controller_core::rollout::Rollout],
        node: &NodeId,
    ) -> bool {
        rollouts
            .iter()
            .any(|r| r.nodes().get(node).is_some_and(|p| p.in_flight()))
    }

    /// One scheduling pass.
    pub(crate) fn backup_pass(&self, now: UnixMillis) {
        if let Err(e) = self.try_backup_pass(now) {
            warn!(cause = %e, "backup scheduling pass failed; next try at the next tick");
        }
    }

    fn try_backup_pass(&self, now: UnixMillis) -> Result<(), TaskError> {
        let jobs = self.store.backup_jobs()?;
        if jobs.is_empty() {
            return Ok(());
        }
        let nodes = self.store.nodes()?;
        let rollouts = self.maint.rollouts()?;
        let window_now = self.maint.clock().now();
        let windows: BTreeMap<String, shoal_controller_core::windows::Window> = self
            .maint
            .windows()?
            .into_iter()
            .map(|w| (w.name().to_owned(), w))
            .collect();
        let mut connected: HashMap<NodeId, u16> = self
            .mesh
            .remote_all()
            .into_iter()
            .map(|(n, r)| (n, r.presence.protocol.unwrap_or(0)))
            .collect();
        connected.extend(
            self.live()
                .conns
                .iter()
                .filter(|(_, c)| !c.leaving)
                .map(|(n, c)| (n.clone(), c.protocol.unwrap_or(0))),
        );
        for record in jobs {
            let job = match Job::from_record(record) {
                Ok(j) => j,
                Err(e) => {
                    warn!(cause = %e, "stored backup job does not parse; skipped");
                    continue;
                }
            };
            let window_open = match &job.record().window {
                None => true,
                Some(w) => windows
                    .get(w)
                    .is_some_and(|w| w.is_open(window_now).is_some()),
            };
            for node in nodes.iter().filter(|n| job.selects(&n.labels)) {
                if connected.get(&node.id).is_none_or(|p| *p < BACKUP_PROTOCOL) {
                    continue;
                }
                let state = self.store.backup_state(job.name(), &node.id)?;
                let Some(owed) = job.owed(&state, now) else {
                    continue;
                };
                if !owed.may_start(window_open, self.in_maintenance(&rollouts, &node.id)) {
                    continue;
                }
                self.dispatch(&job, &node.id, now)?;
            }
        }
        Ok(())
    }

    /// Claims what the node owes as in flight (re-deciding inside the transaction, so two passes
    /// never send two tasks) and sends it.
    fn dispatch(&self, job: &Job, node: &NodeId, now: UnixMillis) -> Result<(), TaskError> {
        let flight = self.store.update_backup_state(job.name(), node, |state| {
            let owed = job.owed(state, now)?;
            let (task, kind, restore) = match owed.kind {
                OwedKind::Restore => {
                    let (task, r) = state.pending_restore.take()?;
                    (task, "restore", Some(r))
                }
                OwedKind::Backup => (new_task_id(now), "backup", None),
                OwedKind::Verify => (new_task_id(now), "verify", None),
            };
            let flight = InFlight {
                task,
                kind: kind.to_owned(),
                due: (!owed.requested).then_some(owed.due),
                requested: owed.requested,
                sent_at: now,
                restore,
            };
            state.in_flight = Some(flight.clone());
            Some((flight, state.clone()))
        })?;
        let Some((flight, state)) = flight else {
            return Ok(());
        };
        match self.build_task(job, &state, &flight) {
            Ok(task) => {
                info!(node = %node, job = %job.name(), task = %task.id, kind = task.kind.name(), "backup task sent");
                if let Err(e) = self.send_to(node, ControllerMsg::BackupTask(task), BACKUP_PROTOCOL)
                {
                    debug!(node = %node, cause = %e, "backup task not sent now; it is sent again when the node reconnects");
                }
            }
            Err(e) => {
                // Not sendable (a secret that does not open): end the task as failed so the job
                // does not wedge, and say why.
                warn!(node = %node, job = %job.name(), cause = %e, "backup task could not be built");
                let result = shoal_proto::BackupResult {
                    task: flight.task.clone(),
                    job: job.name().to_owned(),
                    kind: flight.kind.clone(),
                    started_at: now,
                    finished_at: now,
                    targets: vec![],
                    error: Some(format!("the controller could not build the task: {e}")),
                };
                self.backup_result(node, result);
            }
        }
        Ok(())
    }

    /// A node connected: send again every task it has in flight.
    pub(crate) fn backup_reconnected(&self, node: &NodeId) {
        let resend = || -> Result<(), TaskError> {
            for record in self.store.backup_jobs()? {
                let Ok(job) = Job::from_record(record) else {
                    continue;
                };
                let state = self.store.backup_state(job.name(), node)?;
                if let Some(flight) = &state.in_flight {
                    let task = self.build_task(&job, &state, flight)?;
                    info!(node = %node, job = %job.name(), task = %task.id, "backup task sent again after reconnect");
                    let _ = self.send_to(node, ControllerMsg::BackupTask(task), BACKUP_PROTOCOL);
                }
            }
            Ok(())
        };
        if let Err(e) = resend() {
            warn!(node = %node, cause = %e, "could not send in-flight backup tasks again");
        }
        self.backups.wake.notify_one();
    }

    /// An operator asked for a backup or verification now on these nodes.
    pub(crate) fn request_backup_run(
        &self,
        job: &str,
        nodes: &[NodeId],
        kind: OwedKind,
    ) -> Result<(), StoreError> {
        for node in nodes {
            self.store.update_backup_state(job, node, |s| {
                if !s.requested.contains(&kind) {
                    s.requested.push(kind);
                }
            })?;
        }
        self.backups.wake.notify_one();
        Ok(())
    }

    /// An operator asked for a restore; returns the task id.
    pub(crate) fn request_restore(
        &self,
        job: &str,
        node: &NodeId,
        request: RestoreRequest,
        now: UnixMillis,
    ) -> Result<String, StoreError> {
        let task = new_task_id(now);
        self.store.update_backup_state(job, node, |s| {
            s.pending_restore = Some((task.clone(), request.clone()));
        })?;
        self.backups.wake.notify_one();
        Ok(task)
    }
}
