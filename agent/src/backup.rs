//! Backup tasks: run a [`BackupTask`] with restic (through `shoal-restic`) on every target it
//! names, one after the other, and turn what happened into a [`BackupResult`]. A target that fails
//! does not stop the next one.
//!
//! Per target, a backup task: opens (or creates) the node's repository, removes stale locks of
//! dead runs, backs up, forgets and prunes by the retention rules, samples files of the new
//! snapshot and hashes them, restores the sample into a scratch directory and compares, reads the
//! check subset the controller named, and lists the snapshots. A verification task does the last
//! three for the snapshot and hashes the controller kept. A restore task restores into a directory
//! that must be absent or empty (a restore never overwrites anything on the node).
//!
//! Results are kept in the state directory ([`ResultBook`]) until the controller acknowledges
//! them, so a result outlives a lost connection and a controller restart.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use shoal_proto::{
    bounded_lines, BackupProgress, BackupResult, BackupStats, BackupTask, FileHash, SnapshotInfo,
    TargetAccess, TargetResult, TaskKind, TaskTarget, UnixMillis, VerifyStats, MAX_BACKUP_ERRORS,
    MAX_REPORTED_SNAPSHOTS, MAX_SAMPLE_FILES,
};
use shoal_restic::{BackupSpec, Filter, Repo, Restic, Retention};
use tracing::{info, warn};

/// How often progress is reported while a backup runs.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// The longest line kept from an error.
const MAX_LINE: usize = 1024;

/// How the agent runs backups.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// The restic program (default `restic` on `$PATH`).
    pub restic: PathBuf,
    /// Where restore verification restores its sample, and where SSH keys are written for a run
    /// (default `<state dir>/backup`).
    pub work_dir: PathBuf,
    /// restic's cache (default `<state dir>/backup/cache`).
    pub cache_dir: PathBuf,
    /// The longest one restic command may run (default 24 h).
    pub timeout: Duration,
    /// Directories a restore may write under (`--allow-restore-to`; default `<state dir>/restore`).
    /// A restore anywhere else is refused: writing files where the controller says is running
    /// code of its choosing (a missing `/root/.ssh`, a systemd drop-in directory).
    pub restore_roots: Vec<PathBuf>,
}

impl BackupConfig {
    /// Defaults under `state_dir`.
    pub fn new(state_dir: &Path) -> BackupConfig {
        let work_dir = state_dir.join("backup");
        BackupConfig {
            restic: PathBuf::from("restic"),
            cache_dir: work_dir.join("cache"),
            work_dir,
            timeout: Duration::from_secs(24 * 3600),
            restore_roots: vec![state_dir.join("restore")],
        }
    }

    fn restic(&self) -> Restic {
        Restic {
            binary: self.restic.clone(),
            cache_dir: Some(self.cache_dir.clone()),
            timeout: Some(self.timeout),
        }
    }
}

fn now_ms() -> UnixMillis {
    UnixMillis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

fn line(text: impl std::fmt::Display) -> String {
    let mut s = text.to_string();
    if s.len() > MAX_LINE {
        let mut end = MAX_LINE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The tag that marks a job's snapshots.
pub fn job_tag(job: &str) -> String {
    format!("shoal-job={job}")
}

/// Runs `task` for node `node`; `progress` gets a report at most every [`PROGRESS_INTERVAL`].
pub async fn run_task(
    config: &BackupConfig,
    node: &str,
    task: &BackupTask,
    progress: impl Fn(BackupProgress) + Send + Sync,
) -> BackupResult {
    let started_at = now_ms();
    let restic = config.restic();
    let mut result = BackupResult {
        task: task.id.clone(),
        job: task.job.clone(),
        kind: task.kind.name().to_owned(),
        started_at,
        finished_at: started_at,
        targets: vec![],
        error: None,
    };
    if let Err(e) = restic.version().await {
        result.error = Some(line(e));
        result.finished_at = now_ms();
        return result;
    }
    for target in &task.targets {
        let mut out = TargetResult {
            target: target.access.name.clone(),
            ..Default::default()
        };
        let span = tracing::info_span!("backup", task = %task.id, job = %task.job, target = %target.access.name);
        let _enter = span.enter();
        match Access::prepare(config, node, &task.id, &target.access).await {
            Err(e) => out.error = Some(format!("setup: {e}")),
            Ok(access) => {
                let run = TargetRun {
                    restic: &restic,
                    config,
                    node,
                    task,
                    target,
                    repo: &access.repo,
                    progress: &progress,
                };
                run.run(&mut out).await;
                access.cleanup().await;
            }
        }
        if let Some(e) = &out.error {
            warn!(task = %task.id, target = %out.target, cause = %e, "backup target failed");
        }
        result.targets.push(out);
    }
    result.finished_at = now_ms();
    result
}

/// A target's repository for this node, with the files an sftp target needs for the run.
struct Access {
    repo: Repo,
    sftp: Option<shoal_restic::SftpAccess>,
}

impl Access {
    async fn prepare(
        config: &BackupConfig,
        node: &str,
        task: &str,
        access: &TargetAccess,
    ) -> Result<Access, String> {
        let base = Repo {
            url: access.url.clone(),
            password: access.password.clone(),
            env: access.env.clone(),
            options: vec![],
        };
        let mut repo = Repo::for_node(&base, node).map_err(|e| e.to_string())?;
        let sftp = shoal_restic::SftpAccess::prepare(
            &mut repo,
            access.ssh_key.as_deref(),
            access.ssh_known_hosts.as_deref(),
            &config.work_dir.join(format!("ssh-{task}")),
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok(Access { repo, sftp })
    }

    async fn cleanup(self) {
        if let Some(s) = self.sftp {
            s.cleanup().await;
        }
    }
}

struct TargetRun<'a, P> {
    restic: &'a Restic,
    config: &'a BackupConfig,
    node: &'a str,
    task: &'a BackupTask,
    target: &'a TaskTarget,
    repo: &'a Repo,
    progress: &'a P,
}

impl<P: Fn(BackupProgress) + Send + Sync> TargetRun<'_, P> {
    fn report(&self, phase: &str, files: (u64, u64), bytes: (u64, u64)) {
        (self.progress)(BackupProgress {
            task: self.task.id.clone(),
            target: self.target.access.name.clone(),
            phase: phase.to_owned(),
            files_done: files.0,
            total_files: files.1,
            bytes_done: bytes.0,
            total_bytes: bytes.1,
        });
    }

    fn filter(&self) -> Filter {
        Filter {
            host: Some(self.node.to_owned()),
            tag: Some(job_tag(&self.task.job)),
        }
    }

    async fn run(&self, out: &mut TargetResult) {
        let outcome = match &self.task.kind {
            TaskKind::Backup => self.backup(out).await,
            TaskKind::Verify => self.verify_newest(out).await,
            TaskKind::Restore {
                snapshot,
                include,
                to,
            } => self.restore(out, snapshot.as_deref(), include, to).await,
        };
        if let Err(e) = outcome {
            out.error = Some(line(e));
        }
        // What the repository holds now, whatever happened (unless it cannot be reached).
        if out.error.is_none() || out.backup.is_some() {
            match self.restic.snapshots(self.repo, &self.filter()).await {
                Ok(mut list) => {
                    list.sort_by(|a, b| a.time.cmp(&b.time));
                    let skip = list.len().saturating_sub(MAX_REPORTED_SNAPSHOTS);
                    out.snapshots = list
                        .into_iter()
                        .skip(skip)
                        .map(|s| SnapshotInfo {
                            time: shoal_restic::parse_rfc3339(&s.time)
                                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                                .map_or(UnixMillis(0), |d| UnixMillis(d.as_millis() as u64)),
                            id: s.id,
                            paths: s
                                .paths
                                .into_iter()
                                .take(shoal_proto::MAX_BACKUP_PATHS)
                                .collect(),
                        })
                        .collect();
                }
                Err(e) => warn!(cause = %e, "could not list snapshots"),
            }
        }
    }

    async fn backup(&self, out: &mut TargetResult) -> Result<(), String> {
        let started = Instant::now();
        self.report("open", (0, 0), (0, 0));
        self.restic
            .ensure_initialized(self.repo)
            .await
            .map_err(|e| format!("backup: {e}"))?;
        let stale_locks_cleared = self
            .restic
            .unlock_stale(self.repo)
            .await
            .map_err(|e| format!("backup: clearing stale locks: {e}"))?;
        let spec = BackupSpec {
            paths: self.task.paths.iter().map(PathBuf::from).collect(),
            excludes: self.task.excludes.clone(),
            host: Some(self.node.to_owned()),
            tags: vec![job_tag(&self.task.job)],
        };
        let last = std::sync::Mutex::new(Instant::now());
        let summary = self
            .restic
            .backup(self.repo, &spec, |p| {
                let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed() >= PROGRESS_INTERVAL {
                    *last = Instant::now();
                    self.report(
                        "backup",
                        (p.files_done, p.total_files),
                        (p.bytes_done, p.total_bytes),
                    );
                }
            })
            .await
            .map_err(|e| format!("backup: {e}"))?;
        info!(snapshot = %summary.snapshot_id, added = summary.data_added, files = summary.total_files_processed, "backup done");
        let mut stats = BackupStats {
            snapshot: summary.snapshot_id.clone(),
            files_new: summary.files_new,
            files_changed: summary.files_changed,
            files_unmodified: summary.files_unmodified,
            files_processed: summary.total_files_processed,
            bytes_processed: summary.total_bytes_processed,
            bytes_added: summary.data_added,
            duration_ms: started.elapsed().as_millis() as u64,
            warnings: bounded_lines(
                summary
                    .warnings
                    .iter()
                    .map(|w| format!("{}: {} ({})", w.item, w.message, w.during))
                    .collect(),
                MAX_BACKUP_ERRORS,
                MAX_LINE,
            ),
            stale_locks_cleared: u32::try_from(stale_locks_cleared).unwrap_or(u32::MAX),
            forgotten: vec![],
            samples: vec![],
        };
        // The snapshot exists from here on: report it even if what follows fails.
        out.backup = Some(stats.clone());
        // Sample right away, before files change further.
        let entries = self
            .restic
            .ls(self.repo, &summary.snapshot_id)
            .await
            .map_err(|e| format!("sampling the snapshot: {e}"))?;
        let n = (self.task.sample_files as usize).min(MAX_SAMPLE_FILES);
        let sample = shoal_restic::sample_files(&entries, n, &mut rand::rng());
        drop(entries);
        let hashes = shoal_restic::record_hashes(&sample).await;
        stats.samples = hashes.iter().filter_map(to_proto_hash).collect();
        let retention = Retention {
            keep_last: self.task.retention.keep_last.unwrap_or(0),
            keep_daily: self.task.retention.keep_daily.unwrap_or(0),
            keep_weekly: self.task.retention.keep_weekly.unwrap_or(0),
            keep_monthly: self.task.retention.keep_monthly.unwrap_or(0),
        };
        if !retention.is_empty() {
            self.report("forget", (0, 0), (0, 0));
            match self
                .restic
                .forget(self.repo, &retention, &self.filter(), true)
                .await
            {
                Ok(f) => stats.forgotten = bounded_lines(f.removed, MAX_BACKUP_ERRORS, MAX_LINE),
                Err(e) => {
                    out.backup = Some(stats);
                    return Err(format!("retention: {e}"));
                }
            }
        }
        out.backup = Some(stats);
        let verify = self.verify(&summary.snapshot_id, &hashes).await?;
        out.verify = Some(verify);
        Ok(())
    }

    async fn verify_newest(&self, out: &mut TargetResult) -> Result<(), String> {
        let (snapshot, hashes) = match &self.target.verify {
            Some(s) => (
                s.snapshot.clone(),
                s.files
                    .iter()
                    .map(|f| shoal_restic::FileHash {
                        path: f.path.clone(),
                        size: f.size,
                        sha256: hex::encode(f.sha256),
                    })
                    .collect::<Vec<_>>(),
            ),
            None => return Err("verify: no snapshot recorded for this target yet".into()),
        };
        out.verify = Some(self.verify(&snapshot, &hashes).await?);
        Ok(())
    }

    async fn verify(
        &self,
        snapshot: &str,
        hashes: &[shoal_restic::FileHash],
    ) -> Result<VerifyStats, String> {
        let started = Instant::now();
        self.report("verify", (0, hashes.len() as u64), (0, 0));
        let mut stats = VerifyStats {
            snapshot: snapshot.to_owned(),
            check_subset: self.target.check_subset,
            ..Default::default()
        };
        let scratch = self.config.work_dir.join("scratch");
        match self
            .restic
            .verify_sample(self.repo, snapshot, hashes, &scratch)
            .await
        {
            Ok(v) => {
                stats.files_checked = u32::try_from(v.checked).unwrap_or(u32::MAX);
                stats.bytes_checked = v.bytes;
                stats.mismatches = bounded_lines(
                    v.mismatches
                        .iter()
                        .map(|m| format!("{}: {}", m.path, m.why))
                        .collect(),
                    MAX_BACKUP_ERRORS,
                    MAX_LINE,
                );
            }
            Err(e) => {
                stats.mismatches = vec![line(format!("the sample could not be restored: {e}"))];
            }
        }
        self.report("check", (0, 0), (0, 0));
        let (k, n) = self.target.check_subset;
        let subset = (n > 0 && (1..=n).contains(&k)).then_some((k, n));
        match self.restic.check(self.repo, subset).await {
            Ok(c) => {
                stats.check_ok = c.ok;
                stats.check_errors = bounded_lines(c.errors, MAX_BACKUP_ERRORS, MAX_LINE);
            }
            Err(e) => {
                stats.check_ok = false;
                stats.check_errors = vec![line(format!("check could not run: {e}"))];
            }
        }
        stats.duration_ms = started.elapsed().as_millis() as u64;
        info!(
            snapshot,
            checked = stats.files_checked,
            passed = stats.passed(),
            "verification done"
        );
        Ok(stats)
    }

    async fn restore(
        &self,
        out: &mut TargetResult,
        snapshot: Option<&str>,
        include: &[String],
        to: &str,
    ) -> Result<(), String> {
        let to = Path::new(to);
        check_restore_destination(to, &self.config.restore_roots)
            .map_err(|e| format!("restore: {e}"))?;
        match std::fs::read_dir(to) {
            Ok(mut d) => {
                if d.next().is_some() {
                    return Err(format!(
                        "restore: {} is not empty (a restore never overwrites files)",
                        to.display()
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("restore: {}: {e}", to.display())),
        }
        let snapshots = self
            .restic
            .snapshots(self.repo, &self.filter())
            .await
            .map_err(|e| format!("restore: {e}"))?;
        let chosen = match snapshot {
            Some(want) => snapshots
                .iter()
                .find(|s| s.id.starts_with(want) || s.short_id == want)
                .ok_or_else(|| format!("restore: no snapshot {want:?} of this node and job"))?,
            None => snapshots
                .iter()
                .max_by(|a, b| a.time.cmp(&b.time))
                .ok_or("restore: this node and job have no snapshot on this target")?,
        };
        self.report("restore", (0, 0), (0, 0));
        self.restic
            .restore(self.repo, &chosen.id, include, to)
            .await
            .map_err(|e| format!("restore: {e}"))?;
        info!(snapshot = %chosen.id, to = %to.display(), "restored");
        out.restored = Some(chosen.id.clone());
        Ok(())
    }
}

/// Whether a restore may write to `to`: absolute, no `..`, and under one of `roots` even after
/// following the symlinks of the part of it that exists.
pub fn check_restore_destination(to: &Path, roots: &[PathBuf]) -> Result<(), String> {
    use std::path::Component;
    if !to.is_absolute() || to.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!(
            "{} is not an absolute path without '..'",
            to.display()
        ));
    }
    let mut existing = to;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    let real =
        std::fs::canonicalize(existing).map_err(|e| format!("{}: {e}", existing.display()))?;
    let rest = to.strip_prefix(existing).unwrap_or(Path::new(""));
    let real = real.join(rest);
    let allowed = roots.iter().any(|root| {
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.clone());
        real.starts_with(&root)
    });
    if allowed {
        Ok(())
    } else {
        Err(format!(
            "{} is outside the directories this agent restores into ({}; agent flag --allow-restore-to)",
            to.display(),
            roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
        ))
    }
}

fn to_proto_hash(h: &shoal_restic::FileHash) -> Option<FileHash> {
    let bytes = hex::decode(&h.sha256).ok()?;
    Some(FileHash {
        path: h.path.clone(),
        size: h.size,
        sha256: bytes.try_into().ok()?,
    })
}

/// Results kept until the controller acknowledges them (`<state dir>/backup/results/<task>`), and
/// the tasks running now.
#[derive(Debug)]
pub struct ResultBook {
    dir: PathBuf,
    kept: BTreeMap<String, BackupResult>,
    running: std::collections::BTreeSet<String>,
}

/// What to do with a task the controller sent.
#[derive(Debug, PartialEq)]
pub enum TaskDecision {
    /// Start it.
    Start,
    /// It is running: nothing.
    Running,
    /// It finished: send the kept result again.
    Finished(Box<BackupResult>),
}

impl ResultBook {
    /// Loads kept results from `dir` (unreadable files are dropped with a warning).
    pub fn load(dir: PathBuf) -> ResultBook {
        let mut kept = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let path = e.path();
                match std::fs::read(&path)
                    .ok()
                    .and_then(|b| postcard::from_bytes::<BackupResult>(&b).ok())
                {
                    Some(r) => {
                        kept.insert(r.task.clone(), r);
                    }
                    None => {
                        warn!(file = %path.display(), "dropping an unreadable kept backup result");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        ResultBook {
            dir,
            kept,
            running: Default::default(),
        }
    }

    /// Decides about a task the controller sent (again).
    pub fn offer(&mut self, task: &str) -> TaskDecision {
        if self.running.contains(task) {
            return TaskDecision::Running;
        }
        if let Some(r) = self.kept.get(task) {
            return TaskDecision::Finished(Box::new(r.clone()));
        }
        self.running.insert(task.to_owned());
        TaskDecision::Start
    }

    /// A task ended: keep its result (on disk too) until acknowledged.
    pub fn finished(&mut self, result: &BackupResult) {
        self.running.remove(&result.task);
        if !is_safe_name(&result.task) {
            return;
        }
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.dir)?;
            let tmp = self.dir.join(format!(".{}.tmp", result.task));
            let bytes = postcard::to_stdvec(result).map_err(std::io::Error::other)?;
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, self.dir.join(&result.task))
        };
        if let Err(e) = write() {
            warn!(task = %result.task, cause = %e, "could not keep the backup result on disk; it is kept in memory");
        }
        self.kept.insert(result.task.clone(), result.clone());
    }

    /// The controller stored the result.
    pub fn acknowledged(&mut self, task: &str) {
        if self.kept.remove(task).is_some() && is_safe_name(task) {
            let _ = std::fs::remove_file(self.dir.join(task));
        }
    }

    /// Results not acknowledged yet, to send on a new session.
    pub fn unacknowledged(&self) -> Vec<BackupResult> {
        self.kept.values().cloned().collect()
    }
}

fn is_safe_name(task: &str) -> bool {
    !task.is_empty()
        && task.len() <= 64
        && task
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(task: &str) -> BackupResult {
        BackupResult {
            task: task.into(),
            job: "j".into(),
            kind: "backup".into(),
            started_at: UnixMillis(1),
            finished_at: UnixMillis(2),
            targets: vec![],
            error: None,
        }
    }

    #[test]
    fn restores_go_only_under_the_allowed_directories() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().join("restore");
        std::fs::create_dir_all(&root).expect("root");
        let roots = vec![root.clone()];
        assert!(check_restore_destination(&root.join("new/deeper"), &roots).is_ok());
        assert!(check_restore_destination(&root, &roots).is_ok());
        assert!(check_restore_destination(Path::new("/root/.ssh"), &roots).is_err());
        assert!(check_restore_destination(&root.join("../escape"), &roots).is_err());
        assert!(check_restore_destination(Path::new("relative"), &roots).is_err());
        // A symlink inside the root that points out of it does not let a restore out.
        std::os::unix::fs::symlink("/etc", root.join("link")).expect("symlink");
        assert!(check_restore_destination(&root.join("link/systemd"), &roots).is_err());
    }

    #[test]
    fn a_result_is_kept_across_restarts_until_acknowledged() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut book = ResultBook::load(dir.path().join("results"));
        assert_eq!(book.offer("b1"), TaskDecision::Start);
        assert_eq!(
            book.offer("b1"),
            TaskDecision::Running,
            "a repeat while running"
        );
        book.finished(&result("b1"));
        let mut again = ResultBook::load(dir.path().join("results"));
        assert_eq!(again.unacknowledged(), vec![result("b1")]);
        assert_eq!(
            again.offer("b1"),
            TaskDecision::Finished(Box::new(result("b1")))
        );
        again.acknowledged("b1");
        assert!(ResultBook::load(dir.path().join("results"))
            .unacknowledged()
            .is_empty());
        // A task id that is not a file name is run but never written to disk.
        let mut book = ResultBook::load(dir.path().join("results"));
        assert_eq!(book.offer("../x"), TaskDecision::Start);
        book.finished(&result("../x"));
        assert!(!dir.path().join("x").exists());
    }
}
