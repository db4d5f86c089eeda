//! The restic operations: one method of [`Restic`] per command shoal uses.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::runner::{classify, Call};
use crate::types::{
    BackupLine, BackupSpec, BackupSummary, CheckOutcome, Entry, Filter, ForgetGroup, ForgetOutcome,
    LockFile, LockInfo, LsLine, Progress, Retention, Snapshot,
};
use crate::{parse_rfc3339, Repo, Restic, Version, MAX_ENTRIES, MAX_WARNINGS};

/// The age after which restic 0.14 considers any lock stale, whoever holds it
/// (`StaleLockTimeout`); a running restic refreshes its locks every 5 minutes.
pub const STALE_LOCK_AGE: Duration = Duration::from_secs(30 * 60);

/// The longest JSON document accepted from `snapshots --json` and `forget --json` (one line each).
const MAX_DOCUMENT: usize = 64 << 20;

impl Restic {
    /// restic's version (`restic version`); [`Error::NotInstalled`] when it cannot be started.
    pub async fn version(&self) -> Result<Version> {
        let out = self.output(None, &Call::new(["version"]), 4096).await?;
        let text = String::from_utf8_lossy(&out).trim().to_string();
        let parse_error = || Error::Parse {
            command: "version".into(),
            detail: format!("unexpected output {text:?}"),
        };
        let number = text
            .strip_prefix("restic ")
            .and_then(|rest| rest.split_whitespace().next())
            .ok_or_else(parse_error)?;
        let mut parts = number.split(['.', '-']).map(|p| p.parse::<u32>().ok());
        let (Some(Some(major)), Some(Some(minor)), Some(Some(patch))) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(parse_error());
        };
        Ok(Version {
            number: (major, minor, patch),
            text,
        })
    }

    /// Opens `repo`, creating it when (and only when) it does not exist: `Ok(true)` when it was
    /// created, `Ok(false)` when it was there. A wrong password is [`Error::WrongPassword`] and an
    /// unreachable backend [`Error::Unreachable`]; neither ever leads to `init`.
    ///
    /// Several nodes may initialise their repositories under one new target at once: `init` then
    /// fails on whatever another node created in the meantime (the repository, or on S3 the bucket
    /// that `init` creates), and is tried again after the repository is looked at once more.
    pub async fn ensure_initialized(&self, repo: &Repo) -> Result<bool> {
        const ATTEMPTS: usize = 3;
        let mut attempt = 1;
        loop {
            match self.open(repo).await {
                Ok(()) => return Ok(false),
                Err(Error::RepositoryMissing { .. }) => {}
                Err(e) => return Err(e),
            }
            tracing::info!(repo = %repo.redacted_url(), attempt, "initialising restic repository");
            match self.output(Some(repo), &Call::new(["init"]), 1 << 16).await {
                Ok(_) => return Ok(true),
                Err(Error::Failed { stderr_tail, .. })
                    if attempt < ATTEMPTS && lost_init_race(&stderr_tail) =>
                {
                    tracing::info!(repo = %repo.redacted_url(), detail = %stderr_tail.trim(), "init raced another; looking again");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens the repository and decrypts its config: the cheapest proof that it exists and the
    /// password is right.
    async fn open(&self, repo: &Repo) -> Result<()> {
        let call = Call::new(["cat", "config", "--no-lock"]);
        self.output(Some(repo), &call, 1 << 16).await.map(|_| ())
    }

    /// Every lock in the repository (`list locks` and `cat lock ID`, without taking a lock).
    pub async fn locks(&self, repo: &Repo) -> Result<Vec<LockInfo>> {
        let ids = self
            .output(
                Some(repo),
                &Call::new(["list", "locks", "--no-lock"]),
                1 << 20,
            )
            .await?;
        let ids = String::from_utf8_lossy(&ids).into_owned();
        let mut locks = Vec::new();
        for id in ids.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let call = Call::new(["cat", "lock", id, "--no-lock"]);
            let raw = match self.output(Some(repo), &call, 1 << 16).await {
                Ok(raw) => raw,
                // Removed between the listing and now: its holder finished.
                Err(Error::Failed { .. }) => continue,
                Err(e) => return Err(e),
            };
            let lock: LockFile = serde_json::from_slice(&raw).map_err(|e| Error::Parse {
                command: "cat lock".into(),
                detail: e.to_string(),
            })?;
            locks.push(LockInfo {
                id: id.to_string(),
                time: parse_rfc3339(&lock.time),
                hostname: lock.hostname,
                username: lock.username,
                pid: lock.pid,
                exclusive: lock.exclusive,
            });
        }
        Ok(locks)
    }

    /// The locks restic 0.14 would remove with `unlock`: older than [`STALE_LOCK_AGE`], or held
    /// by a process of this host that no longer exists. A lock of another host is stale only by
    /// age (restic cannot see that host's processes).
    pub async fn stale_locks(&self, repo: &Repo) -> Result<Vec<LockInfo>> {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok());
        let now = SystemTime::now();
        Ok(self
            .locks(repo)
            .await?
            .into_iter()
            .filter(|l| is_stale(l, host.as_deref(), now))
            .collect())
    }

    /// Removes stale locks with restic's own `unlock` (never `--remove-all`, so a live run's
    /// lock stays) and returns how many locks went away.
    pub async fn unlock_stale(&self, repo: &Repo) -> Result<usize> {
        let before: Vec<String> = self.locks(repo).await?.into_iter().map(|l| l.id).collect();
        if before.is_empty() {
            return Ok(0);
        }
        self.output(Some(repo), &Call::new(["unlock"]), 1 << 16)
            .await?;
        let after: Vec<String> = self.locks(repo).await?.into_iter().map(|l| l.id).collect();
        let removed = before.iter().filter(|id| !after.contains(id)).count();
        tracing::info!(repo = %repo.redacted_url(), removed, "removed stale restic locks");
        Ok(removed)
    }

    /// Backs up `spec`, calling `progress` with restic's status reports; returns the summary.
    /// Exit code 3 (the snapshot was made but some files could not be read) is a success with
    /// [`BackupSummary::warnings`].
    pub async fn backup(
        &self,
        repo: &Repo,
        spec: &BackupSpec,
        mut progress: impl FnMut(Progress) + Send,
    ) -> Result<BackupSummary> {
        if spec.paths.is_empty() {
            return Err(Error::InvalidArgument(
                "a backup needs at least one path".into(),
            ));
        }
        let mut call = Call::new(["backup", "--json"]);
        for exclude in &spec.excludes {
            call = call.arg("--exclude").arg(exclude);
        }
        if let Some(host) = &spec.host {
            call = call.arg("--host").arg(host);
        }
        for tag in &spec.tags {
            if tag.is_empty() || tag.contains(',') {
                return Err(Error::InvalidArgument(format!(
                    "tag {tag:?} is empty or has a comma"
                )));
            }
            call = call.arg("--tag").arg(tag);
        }
        call = call.arg("--");
        for path in &spec.paths {
            let abs = std::path::absolute(path)
                .map_err(|e| Error::io(format!("making {} absolute", path.display()), e))?;
            call = call.arg(abs);
        }
        call.env.push(("RESTIC_PROGRESS_FPS", "1".into()));
        let command = call.describe();

        let mut summary = None;
        let mut warnings = Vec::new();
        let mut dropped = 0usize;
        let mut stderr_warnings = Vec::new();
        let mut stderr_dropped = 0usize;
        let finished = self
            .spawn(
                Some(repo),
                &call,
                &mut |line| {
                    match serde_json::from_slice::<BackupLine>(line) {
                        Ok(BackupLine::Status(p)) => progress(p),
                        Ok(BackupLine::Summary(s)) => summary = Some(s),
                        Ok(BackupLine::Error(e)) => {
                            keep(&mut warnings, &mut dropped, e.into_warning());
                        }
                        Ok(BackupLine::Other) => {}
                        Err(e) => tracing::debug!(
                            error = %e,
                            line = %String::from_utf8_lossy(line),
                            "ignoring a line of restic backup output"
                        ),
                    }
                    Ok(())
                },
                // restic 0.14 writes its JSON error messages to stderr.
                &mut |line| {
                    if line.first() == Some(&b'{') {
                        if let Ok(BackupLine::Error(e)) = serde_json::from_slice(line) {
                            keep(&mut stderr_warnings, &mut stderr_dropped, e.into_warning());
                        }
                    }
                },
            )
            .await?;
        for w in stderr_warnings {
            keep(&mut warnings, &mut dropped, w);
        }
        dropped += stderr_dropped;
        match finished.code {
            Some(0) | Some(3) => {}
            _ => return Err(classify(Some(repo), &call, &finished)),
        }
        let summary = summary.ok_or_else(|| Error::Parse {
            command,
            detail: "restic finished without a summary".into(),
        })?;
        let summary = summary.into_summary(warnings, dropped);
        if finished.code == Some(3) {
            tracing::warn!(
                snapshot = %summary.snapshot_id,
                unreadable = summary.warnings.len() + summary.warnings_dropped,
                "backup made without some unreadable files"
            );
        }
        Ok(summary)
    }

    /// The snapshots, optionally only those of a host and/or with a tag.
    pub async fn snapshots(&self, repo: &Repo, filter: &Filter) -> Result<Vec<Snapshot>> {
        let call = with_filter(Call::new(["snapshots", "--json"]), filter).max_line(MAX_DOCUMENT);
        let out = self.output(Some(repo), &call, MAX_DOCUMENT).await?;
        parse_document(&out, "snapshots")
    }

    /// Applies `retention` to the snapshots `filter` selects, grouped by host and tags; with
    /// `prune`, also removes the data no snapshot needs any more. An empty policy is refused
    /// ([`Error::InvalidArgument`]) before restic runs.
    pub async fn forget(
        &self,
        repo: &Repo,
        retention: &Retention,
        filter: &Filter,
        prune: bool,
    ) -> Result<ForgetOutcome> {
        if retention.is_empty() {
            return Err(Error::InvalidArgument(
                "an empty retention policy: refusing to run forget".into(),
            ));
        }
        let mut call = Call::new(["forget", "--json", "--group-by", "host,tags"]);
        for (flag, n) in [
            ("--keep-last", retention.keep_last),
            ("--keep-daily", retention.keep_daily),
            ("--keep-weekly", retention.keep_weekly),
            ("--keep-monthly", retention.keep_monthly),
        ] {
            if n > 0 {
                call = call.arg(flag).arg(n.to_string());
            }
        }
        call = with_filter(call, filter).max_line(MAX_DOCUMENT);
        if prune {
            call = call.arg("--prune");
        }
        let out = self.output(Some(repo), &call, MAX_DOCUMENT).await?;
        // With --prune, prune's text follows the JSON document.
        let doc = out
            .split(|&b| b == b'\n')
            .find(|l| l.first() == Some(&b'['))
            .unwrap_or_default();
        let groups: Vec<ForgetGroup> = if doc.is_empty() {
            Vec::new()
        } else {
            parse_document(doc, "forget")?
        };
        let mut outcome = ForgetOutcome::default();
        for g in groups {
            outcome.kept.extend(g.keep.into_iter().map(|s| s.id));
            outcome.removed.extend(g.remove.into_iter().map(|s| s.id));
        }
        Ok(outcome)
    }

    /// The entries of `snapshot` (an id, short id or `latest`), at most [`MAX_ENTRIES`].
    pub async fn ls(&self, repo: &Repo, snapshot: &str) -> Result<Vec<Entry>> {
        let call = Call::new(["ls", "--json", snapshot]);
        let mut entries = Vec::new();
        self.run(Some(repo), &call, &mut |line| {
            let parsed: LsLine = serde_json::from_slice(line).map_err(|e| Error::Parse {
                command: "ls".into(),
                detail: e.to_string(),
            })?;
            if parsed.struct_type == "node" {
                if entries.len() >= MAX_ENTRIES {
                    return Err(Error::Parse {
                        command: "ls".into(),
                        detail: format!("more than {MAX_ENTRIES} entries"),
                    });
                }
                entries.push(parsed.into_entry());
            }
            Ok(())
        })
        .await?;
        Ok(entries)
    }

    /// Restores `snapshot` into `target`; with `includes`, only those paths (exact snapshot paths,
    /// not patterns). Any file restic could not restore makes it fail.
    pub async fn restore(
        &self,
        repo: &Repo,
        snapshot: &str,
        includes: &[String],
        target: &Path,
    ) -> Result<()> {
        let (call, finished, file_errors) = self
            .restore_reporting(repo, snapshot, includes, target)
            .await?;
        if finished.success() && file_errors.is_empty() {
            Ok(())
        } else {
            Err(classify(Some(repo), &call, &finished))
        }
    }

    /// Restores and returns restic's per-file errors (`ignoring error for PATH: WHY`) instead of
    /// failing on them; other failures are errors.
    pub(crate) async fn restore_reporting(
        &self,
        repo: &Repo,
        snapshot: &str,
        includes: &[String],
        target: &Path,
    ) -> Result<(Call, crate::runner::Finished, Vec<(String, String)>)> {
        let mut call = Call::new(["restore", snapshot, "--target"]).arg(target);
        for include in includes {
            call = call.arg("--include").arg(escape_pattern(include));
        }
        let mut file_errors = Vec::new();
        let finished = self
            .spawn(Some(repo), &call, &mut |_| Ok(()), &mut |line| {
                let line = String::from_utf8_lossy(line);
                if let Some(rest) = line.strip_prefix("ignoring error for ") {
                    if let Some((path, why)) = rest.rsplit_once(": ") {
                        if file_errors.len() < MAX_WARNINGS {
                            file_errors.push((path.to_string(), why.to_string()));
                        }
                    }
                }
            })
            .await?;
        let per_file_only =
            finished.code == Some(1) && finished.stderr_tail.contains("Fatal: There were");
        if !finished.success() && !per_file_only {
            return Err(classify(Some(repo), &call, &finished));
        }
        Ok((call, finished, file_errors))
    }

    /// Checks the repository's structure and, with `subset = Some((k, n))`, reads the k-th of n
    /// groups of packs (`--read-data-subset=k/n`). Damage is `Ok` with `ok == false` and restic's
    /// error lines; only a check that could not run is an `Err`.
    pub async fn check(&self, repo: &Repo, subset: Option<(u32, u32)>) -> Result<CheckOutcome> {
        let mut call = Call::new(["check"]);
        if let Some((k, n)) = subset {
            if k == 0 || n == 0 || k > n {
                return Err(Error::InvalidArgument(format!(
                    "read-data-subset {k}/{n}: need 1 <= k <= n"
                )));
            }
            call = call.arg(format!("--read-data-subset={k}/{n}"));
        }
        let mut outcome = CheckOutcome::default();
        let mut notes_dropped = 0;
        let (mut out_errors, mut out_dropped) = (Vec::new(), 0);
        let (mut err_errors, mut err_dropped) = (Vec::new(), 0);
        let finished = self
            .spawn(
                Some(repo),
                &call,
                &mut |line| {
                    let line = String::from_utf8_lossy(line);
                    let line = line.trim();
                    if line.contains("not referenced in any index")
                        || line.contains("additional files were found")
                    {
                        keep(&mut outcome.notes, &mut notes_dropped, line.to_string());
                    } else if line.starts_with("error") || line.contains("Pack ID does not match") {
                        keep(&mut out_errors, &mut out_dropped, line.to_string());
                    }
                    Ok(())
                },
                &mut |line| {
                    let line = String::from_utf8_lossy(line);
                    let line = line.trim();
                    let chatter = line.is_empty()
                        || line.starts_with("using temporary cache")
                        || line.starts_with("create exclusive lock")
                        || line.starts_with("Fatal: repository contains errors");
                    if !chatter {
                        keep(&mut err_errors, &mut err_dropped, line.to_string());
                    }
                },
            )
            .await?;
        let mut errors_dropped = out_dropped + err_dropped;
        for line in out_errors.into_iter().chain(err_errors) {
            keep(&mut outcome.errors, &mut errors_dropped, line);
        }
        if finished.success() {
            outcome.ok = true;
            outcome.errors.clear();
            return Ok(outcome);
        }
        if finished.stderr_tail.contains("repository contains errors") {
            if errors_dropped > 0 {
                outcome
                    .errors
                    .push(format!("… and {errors_dropped} more error lines"));
            }
            return Ok(outcome);
        }
        Err(classify(Some(repo), &call, &finished))
    }
}

fn is_stale(lock: &LockInfo, host: Option<&str>, now: SystemTime) -> bool {
    let old = lock
        .time
        .and_then(|t| now.duration_since(t).ok())
        .is_some_and(|age| age > STALE_LOCK_AGE);
    if old {
        return true;
    }
    if host != Some(lock.hostname.as_str()) {
        return false;
    }
    let Ok(pid) = i32::try_from(lock.pid) else {
        return false;
    };
    // restic's processExists: signal 0 to the pid; any error means gone.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()
}

/// Whether a failed `init` lost a race: another node created the repository, or (on S3) the
/// bucket `init` creates, between the look and the `init`.
fn lost_init_race(stderr: &str) -> bool {
    let lower = stderr.to_ascii_lowercase();
    [
        "already",
        "bucketalreadyownedbyyou",
        "bucketalreadyexists",
        "operationaborted",
    ]
    .iter()
    .any(|m| lower.contains(m))
}

fn keep<T>(list: &mut Vec<T>, dropped: &mut usize, item: T) {
    if list.len() < MAX_WARNINGS {
        list.push(item);
    } else {
        *dropped += 1;
    }
}

fn with_filter(mut call: Call, filter: &Filter) -> Call {
    if let Some(host) = &filter.host {
        call = call.arg("--host").arg(host);
    }
    if let Some(tag) = &filter.tag {
        call = call.arg("--tag").arg(tag);
    }
    call
}

fn parse_document<T: serde::de::DeserializeOwned>(out: &[u8], command: &str) -> Result<T> {
    serde_json::from_slice(out).map_err(|e| Error::Parse {
        command: command.into(),
        detail: e.to_string(),
    })
}

/// A path as a restic include pattern that matches only itself (restic matches each component
/// with Go's `filepath.Match`, where `\` escapes `*`, `?`, `[` and `\`).
fn escape_pattern(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[allow(dead_code)]
fn _assert_send(r: &Restic, repo: &Repo, spec: &BackupSpec) {
    fn send<T: Send>(_: T) {}
    send(r.backup(repo, spec, |_| {}));
    send(r.check(repo, None));
    send(r.restore(repo, "latest", &[], Path::new("/")));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_escaped() {
        assert_eq!(escape_pattern("/a/b.txt"), "/a/b.txt");
        assert_eq!(escape_pattern("/a/*[x]?\\"), "/a/\\*\\[x\\]\\?\\\\");
    }

    #[test]
    fn staleness_follows_restic() {
        let now = SystemTime::now();
        let lock = |host: &str, pid: u32, age: u64| LockInfo {
            id: "x".into(),
            time: Some(now - Duration::from_secs(age)),
            hostname: host.into(),
            username: "root".into(),
            pid,
            exclusive: false,
        };
        let me = std::process::id();
        assert!(!is_stale(&lock("here", me, 60), Some("here"), now));
        assert!(is_stale(&lock("here", me, 31 * 60), Some("here"), now));
        assert!(!is_stale(
            &lock("there", 999_999_999, 60),
            Some("here"),
            now
        ));
        assert!(is_stale(&lock("there", 1, 31 * 60), Some("here"), now));
        // pid_max is at most 2^22: this pid cannot be alive.
        assert!(is_stale(&lock("here", 999_999_999, 60), Some("here"), now));
    }

    #[test]
    fn empty_retention_is_empty() {
        assert!(Retention::default().is_empty());
        assert!(!Retention {
            keep_daily: 7,
            ..Retention::default()
        }
        .is_empty());
    }
}
