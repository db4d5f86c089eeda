//! Scheduled disaster-recovery backups: at each firing of `--dr-schedule` the controller takes its
//! encrypted archive ([`super::snapshot_archive`]), writes it with restic to the backup target
//! `--dr-target` (repository `<target url>/shoal-controller`), keeps the newest `--dr-keep`,
//! and proves the one it wrote: restores it from the repository into a scratch directory, decrypts
//! it and opens the store ([`super::verify_archive`]). Each run is an event, and a failed run is a
//! line in the fleet report until a run succeeds.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use shoal_controller_core::backups::{short_id, BackupEvent, Schedule};
use shoal_proto::UnixMillis;
use shoal_restic::{BackupSpec, Filter, Repo, Restic, Retention, SftpAccess};
use tracing::{info, warn};

use crate::server::{now_ms, Controller};

/// The repository name under the target (beside the nodes' own).
pub const DR_REPOSITORY: &str = "shoal-controller";
/// The tag of the controller's snapshots.
pub const DR_TAG: &str = "shoal-controller-dr";
const LAST_DUE_META: &str = "dr_schedule_last_due";
const LAST_RUN_META: &str = "dr_schedule_last_run";

/// `--dr-*`: where and when the controller backs itself up.
#[derive(Debug, Clone)]
pub struct DrScheduleConfig {
    /// The backup target (`shoalctl backup target add`).
    pub target: String,
    /// Five-field cron (default `@daily`).
    pub schedule: String,
    /// Time zone of the schedule (default UTC).
    pub tz: String,
    /// The archive's passphrase (read from `--dr-passphrase-file` at start).
    pub passphrase: String,
    /// Archives kept in the repository (default 7).
    pub keep: u32,
}

/// How the last scheduled run went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrRun {
    /// When it ended.
    pub at: UnixMillis,
    /// The snapshot written, if one was.
    pub snapshot: Option<String>,
    /// The archive's size.
    pub bytes: u64,
    /// Nodes the verified restore held.
    pub verified_nodes: Option<usize>,
    /// What failed.
    pub error: Option<String>,
}

impl Controller {
    /// The last scheduled DR run, if any.
    pub(crate) fn last_dr_run(&self) -> Option<DrRun> {
        self.store
            .get_meta(LAST_RUN_META)
            .ok()
            .flatten()
            .and_then(|b| postcard::from_bytes(&b).ok())
    }
}

/// Runs the schedule until the process ends.
pub(crate) async fn run(controller: Arc<Controller>, config: DrScheduleConfig, schedule: Schedule) {
    let restic = Restic {
        cache_dir: Some(controller.config.data_dir.join("dr-work").join("cache")),
        timeout: Some(Duration::from_secs(6 * 3600)),
        ..Restic::default()
    };
    loop {
        if !controller.cluster.is_leader() {
            // The leader's work: one archive per fleet.
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let now = now_ms();
        let last = controller
            .store
            .get_meta(LAST_DUE_META)
            .ok()
            .flatten()
            .and_then(|b| b.try_into().ok().map(u64::from_be_bytes))
            .map(UnixMillis);
        let last = match last {
            Some(l) => l,
            None => {
                // Nothing is owed from before the schedule existed.
                let _ = controller
                    .store
                    .put_meta(LAST_DUE_META, &now.0.to_be_bytes());
                now
            }
        };
        if let Some(due) = schedule.latest_due(last, now) {
            let outcome = run_once(&controller, &config, &restic).await;
            record(&controller, &config, outcome);
            let _ = controller
                .store
                .put_meta(LAST_DUE_META, &due.0.to_be_bytes());
        }
        let next = schedule
            .next_after(now_ms())
            .map_or(60_000, |t| t.0.saturating_sub(now_ms().0));
        tokio::time::sleep(Duration::from_millis(next.clamp(200, 60_000))).await;
    }
}

fn record(
    controller: &Controller,
    config: &DrScheduleConfig,
    outcome: Result<DrRun, (DrRun, String)>,
) {
    let (run, kind, message) = match outcome {
        Ok(run) => {
            let message = format!(
                "controller backup written to {} (snapshot {}, {} bytes) and verified: it restores and opens with {} nodes",
                config.target,
                run.snapshot.as_deref().map(short_id).unwrap_or("?"),
                run.bytes,
                run.verified_nodes.unwrap_or(0)
            );
            (run, BackupEvent::BackupVerified, message)
        }
        Err((run, why)) => {
            let message = format!("controller backup to {} failed: {why}", config.target);
            (run, BackupEvent::BackupFailed, message)
        }
    };
    if run.error.is_some() {
        warn!(target = %config.target, "{message}");
    } else {
        info!(target = %config.target, "{message}");
    }
    if let Ok(bytes) = postcard::to_stdvec(&run) {
        let _ = controller.store.put_meta(LAST_RUN_META, &bytes);
    }
    if let Err(e) = controller
        .store
        .append_event(kind.into(), None, &message, now_ms())
    {
        warn!(cause = %e, "controller backup event not logged");
    }
}

async fn run_once(
    controller: &Arc<Controller>,
    config: &DrScheduleConfig,
    restic: &Restic,
) -> Result<DrRun, (DrRun, String)> {
    let work = controller.config.data_dir.join("dr-work");
    let mut run = DrRun {
        at: now_ms(),
        snapshot: None,
        bytes: 0,
        verified_nodes: None,
        error: None,
    };
    let result = attempt(controller, config, restic, &work, &mut run).await;
    let _ = tokio::fs::remove_dir_all(work.join("staging")).await;
    let _ = tokio::fs::remove_dir_all(work.join("verify")).await;
    run.at = now_ms();
    match result {
        Ok(()) => Ok(run),
        Err(e) => {
            run.error = Some(e.clone());
            Err((run, e))
        }
    }
}

fn private_dir(dir: &Path) -> Result<(), String> {
    shoal_overlay::pki::ensure_private_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

async fn attempt(
    controller: &Arc<Controller>,
    config: &DrScheduleConfig,
    restic: &Restic,
    work: &Path,
    run: &mut DrRun,
) -> Result<(), String> {
    // 1. The archive, staged in a private file.
    let c = controller.clone();
    let pass = config.passphrase.clone();
    let bytes = tokio::task::spawn_blocking(move || super::snapshot_archive(&c, &pass))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("snapshot: {e}"))?;
    run.bytes = bytes.len() as u64;
    let staging = work.join("staging");
    private_dir(&staging)?;
    let file: PathBuf = staging.join("controller.shoaldr");
    tokio::fs::write(&file, &bytes)
        .await
        .map_err(|e| format!("{}: {e}", file.display()))?;

    // 2. The target's repository for the controller.
    let c = controller.clone();
    let name = config.target.clone();
    let access = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let record = c
            .store
            .backup_target(&name)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!("target {name:?} does not exist (shoalctl backup target add)")
            })?;
        c.target_access(&record).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    let base = Repo {
        url: access.url.clone(),
        password: access.password.clone(),
        env: access.env.clone(),
        options: vec![],
    };
    let mut repo = Repo::for_node(&base, DR_REPOSITORY).map_err(|e| e.to_string())?;
    let sftp = SftpAccess::prepare(
        &mut repo,
        access.ssh_key.as_deref(),
        access.ssh_known_hosts.as_deref(),
        &work.join("ssh"),
    )
    .await
    .map_err(|e| e.to_string())?;
    let result = write_and_verify(restic, &repo, &file, &bytes, config, work, run).await;
    if let Some(s) = sftp {
        s.cleanup().await;
    }
    result
}

async fn write_and_verify(
    restic: &Restic,
    repo: &Repo,
    file: &Path,
    bytes: &[u8],
    config: &DrScheduleConfig,
    work: &Path,
    run: &mut DrRun,
) -> Result<(), String> {
    restic
        .ensure_initialized(repo)
        .await
        .map_err(|e| e.to_string())?;
    restic.unlock_stale(repo).await.map_err(|e| e.to_string())?;
    let spec = BackupSpec {
        paths: vec![file.to_owned()],
        excludes: vec![],
        host: Some(DR_REPOSITORY.to_owned()),
        tags: vec![DR_TAG.to_owned()],
    };
    let summary = restic
        .backup(repo, &spec, |_| {})
        .await
        .map_err(|e| format!("backup: {e}"))?;
    run.snapshot = Some(summary.snapshot_id.clone());
    let filter = Filter {
        host: Some(DR_REPOSITORY.to_owned()),
        tag: Some(DR_TAG.to_owned()),
    };
    restic
        .forget(
            repo,
            &Retention {
                keep_last: config.keep.max(1),
                ..Default::default()
            },
            &filter,
            true,
        )
        .await
        .map_err(|e| format!("retention: {e}"))?;
    // Prove it: what the repository gives back decrypts and opens as a controller.
    let verify = work.join("verify");
    let _ = tokio::fs::remove_dir_all(&verify).await;
    private_dir(&verify)?;
    let restored_root = verify.join("restored");
    restic
        .restore(
            repo,
            &summary.snapshot_id,
            &[file.to_string_lossy().into_owned()],
            &restored_root,
        )
        .await
        .map_err(|e| format!("restore for verification: {e}"))?;
    let restored = restored_root.join(file.strip_prefix("/").unwrap_or(file));
    let back = tokio::fs::read(&restored)
        .await
        .map_err(|e| format!("the restored archive {}: {e}", restored.display()))?;
    if back != bytes {
        return Err("the restored archive differs from the one written".into());
    }
    let pass = config.passphrase.clone();
    let scratch = verify.join("data");
    let report = tokio::task::spawn_blocking(move || super::verify_archive(&back, &pass, &scratch))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("the restored archive does not open: {e}"))?;
    run.verified_nodes = Some(report.nodes);
    Ok(())
}
