//! The values restic operations take and return, and the parsing of restic 0.14's JSON into them.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

/// What to back up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupSpec {
    /// Files and directories to back up. Relative paths are made absolute first, so that the
    /// snapshot's paths are the live paths (restic stores a relative path as given).
    pub paths: Vec<PathBuf>,
    /// Exclude patterns (restic `--exclude` globs).
    pub excludes: Vec<String>,
    /// The host recorded in the snapshot (`--host`); `None` is restic's default, the hostname.
    pub host: Option<String>,
    /// Tags recorded in the snapshot.
    pub tags: Vec<String>,
}

/// A progress report during a backup (restic's `status` messages).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct Progress {
    /// Fraction done, 0.0 to 1.0.
    #[serde(default)]
    pub percent_done: f64,
    /// Files found so far.
    #[serde(default)]
    pub total_files: u64,
    /// Files processed so far.
    #[serde(default)]
    pub files_done: u64,
    /// Bytes found so far.
    #[serde(default)]
    pub total_bytes: u64,
    /// Bytes processed so far.
    #[serde(default)]
    pub bytes_done: u64,
    /// Errors so far.
    #[serde(default)]
    pub error_count: u64,
    /// Files being read now.
    #[serde(default)]
    pub current_files: Vec<String>,
}

/// The outcome of a backup (restic's `summary` message, and the errors it reported).
#[derive(Debug, Clone, PartialEq)]
pub struct BackupSummary {
    /// The new snapshot's id. restic 0.14 reports the *short* id (8 hex digits) here; every
    /// command accepts it.
    pub snapshot_id: String,
    /// Files that were not in the parent snapshot.
    pub files_new: u64,
    /// Files that changed since the parent snapshot.
    pub files_changed: u64,
    /// Files unchanged since the parent snapshot.
    pub files_unmodified: u64,
    /// Directories that were not in the parent snapshot.
    pub dirs_new: u64,
    /// Bytes added to the repository (after deduplication, before compression).
    pub data_added: u64,
    /// Files processed.
    pub total_files_processed: u64,
    /// Bytes processed.
    pub total_bytes_processed: u64,
    /// How long restic took, by its own clock.
    pub duration: Duration,
    /// Files restic could not read (exit code 3: the snapshot was made without them), at most
    /// [`MAX_WARNINGS`](crate::MAX_WARNINGS).
    pub warnings: Vec<BackupWarning>,
    /// Warnings beyond the ones kept in `warnings`.
    pub warnings_dropped: usize,
}

/// A file restic could not back up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupWarning {
    /// The path.
    pub item: String,
    /// What restic was doing (`archival`, `scan`, …).
    pub during: String,
    /// The error.
    pub message: String,
}

/// A snapshot in the repository.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Snapshot {
    /// The full id.
    pub id: String,
    /// The short id (8 hex digits).
    pub short_id: String,
    /// When it was taken, RFC 3339 as restic wrote it.
    pub time: String,
    /// The host recorded in it.
    pub hostname: String,
    /// The paths it holds.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Its tags.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub tags: Vec<String>,
}

/// A retention policy for `forget`: the snapshots each rule selects are kept, the rest removed.
/// A rule of 0 is not set. All zero is refused: restic would keep everything, and a policy that
/// says nothing is surely a mistake.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep the last n snapshots.
    pub keep_last: u32,
    /// Keep the last snapshot of each of the last n days.
    pub keep_daily: u32,
    /// Keep the last snapshot of each of the last n weeks.
    pub keep_weekly: u32,
    /// Keep the last snapshot of each of the last n months.
    pub keep_monthly: u32,
}

impl Retention {
    /// Whether no rule is set.
    pub fn is_empty(&self) -> bool {
        self.keep_last == 0
            && self.keep_daily == 0
            && self.keep_weekly == 0
            && self.keep_monthly == 0
    }
}

/// Which snapshots an operation considers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only snapshots of this host.
    pub host: Option<String>,
    /// Only snapshots with this tag.
    pub tag: Option<String>,
}

/// What `forget` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForgetOutcome {
    /// Full ids of the snapshots kept.
    pub kept: Vec<String>,
    /// Full ids of the snapshots removed.
    pub removed: Vec<String>,
}

/// The kind of a snapshot entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Something else (device, fifo, socket), as restic names it.
    Other(String),
}

/// An entry of a snapshot (`ls --json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The path inside the snapshot; for a backup of absolute paths, the live path.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
    /// Size in bytes (0 for non-files).
    pub size: u64,
    /// Modification time, `None` when restic's timestamp could not be read.
    pub mtime: Option<SystemTime>,
}

/// A lock in the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    /// The lock file's id.
    pub id: String,
    /// When the lock was created or last refreshed (restic refreshes every 5 minutes).
    pub time: Option<SystemTime>,
    /// The host that holds it.
    pub hostname: String,
    /// The user that holds it.
    pub username: String,
    /// The process that holds it.
    pub pid: u32,
    /// Whether it is exclusive (check, prune) or shared (backup, restore).
    pub exclusive: bool,
}

/// What `check` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckOutcome {
    /// No errors.
    pub ok: bool,
    /// The error lines, at most [`MAX_WARNINGS`](crate::MAX_WARNINGS).
    pub errors: Vec<String>,
    /// Non-fatal remarks (unreferenced packs a killed run left, which `prune` removes).
    pub notes: Vec<String>,
}

/// A file's content as recorded right after backup, for restore verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHash {
    /// The path (in the snapshot and live).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content, lowercase hex.
    pub sha256: String,
}

/// The result of restoring a sample and comparing it with the recorded hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SampleVerification {
    /// Files compared.
    pub checked: usize,
    /// Bytes compared.
    pub bytes: u64,
    /// Files that were missing or different.
    pub mismatches: Vec<Mismatch>,
}

impl SampleVerification {
    /// Whether every file came back as recorded.
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// A file that did not come back as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The path.
    pub path: String,
    /// What was wrong (missing, size, hash, or restic's error for it).
    pub why: String,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

/// One line of `backup --json` (stdout, and the error lines restic 0.14 writes to stderr).
#[derive(Debug, Deserialize)]
#[serde(tag = "message_type")]
pub(crate) enum BackupLine {
    #[serde(rename = "status")]
    Status(Progress),
    #[serde(rename = "summary")]
    Summary(SummaryLine),
    #[serde(rename = "error")]
    Error(ErrorLine),
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
pub(crate) struct SummaryLine {
    #[serde(default)]
    pub files_new: u64,
    #[serde(default)]
    pub files_changed: u64,
    #[serde(default)]
    pub files_unmodified: u64,
    #[serde(default)]
    pub dirs_new: u64,
    #[serde(default)]
    pub data_added: u64,
    #[serde(default)]
    pub total_files_processed: u64,
    #[serde(default)]
    pub total_bytes_processed: u64,
    #[serde(default)]
    pub total_duration: f64,
    pub snapshot_id: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ErrorLine {
    #[serde(default)]
    pub error: serde_json::Value,
    #[serde(default)]
    pub during: String,
    #[serde(default)]
    pub item: String,
}

impl ErrorLine {
    /// restic 0.14 marshals the Go error value itself: a `*PathError` becomes
    /// `{"Op":"open","Path":"/x","Err":13}`, most others `{}`; later versions write
    /// `{"message": "..."}`.
    pub fn into_warning(self) -> BackupWarning {
        let e = &self.error;
        let message = if let Some(s) = e.as_str() {
            s.to_string()
        } else if let Some(m) = e.get("message").and_then(|m| m.as_str()) {
            m.to_string()
        } else if let (Some(op), Some(errno)) = (
            e.get("Op").and_then(|v| v.as_str()),
            e.get("Err").and_then(|v| v.as_i64()),
        ) {
            let errno = i32::try_from(errno).unwrap_or(0);
            format!("{op}: {}", std::io::Error::from_raw_os_error(errno))
        } else if e.as_object().is_some_and(|o| o.is_empty()) || e.is_null() {
            "unknown error (restic 0.14 does not report its text in JSON)".into()
        } else {
            e.to_string()
        };
        BackupWarning {
            item: self.item,
            during: self.during,
            message,
        }
    }
}

impl SummaryLine {
    pub fn into_summary(self, warnings: Vec<BackupWarning>, dropped: usize) -> BackupSummary {
        BackupSummary {
            snapshot_id: self.snapshot_id,
            files_new: self.files_new,
            files_changed: self.files_changed,
            files_unmodified: self.files_unmodified,
            dirs_new: self.dirs_new,
            data_added: self.data_added,
            total_files_processed: self.total_files_processed,
            total_bytes_processed: self.total_bytes_processed,
            duration: Duration::try_from_secs_f64(self.total_duration).unwrap_or_default(),
            warnings,
            warnings_dropped: dropped,
        }
    }
}

/// One line of `ls --json`: the snapshot first, then its nodes.
#[derive(Debug, Deserialize)]
pub(crate) struct LsLine {
    #[serde(default)]
    pub struct_type: String,
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub mtime: String,
}

impl LsLine {
    pub fn into_entry(self) -> Entry {
        let kind = match self.kind.as_str() {
            "file" => EntryKind::File,
            "dir" => EntryKind::Dir,
            "symlink" => EntryKind::Symlink,
            _ => EntryKind::Other(self.kind),
        };
        Entry {
            path: self.path,
            kind,
            size: self.size,
            mtime: parse_rfc3339(&self.mtime),
        }
    }
}

/// A lock file (`cat lock ID`).
#[derive(Debug, Deserialize)]
pub(crate) struct LockFile {
    pub time: String,
    #[serde(default)]
    pub exclusive: bool,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub pid: u32,
}

/// One group of `forget --json`.
#[derive(Debug, Deserialize)]
pub(crate) struct ForgetGroup {
    #[serde(default, deserialize_with = "null_as_empty_snaps")]
    pub keep: Vec<IdOnly>,
    #[serde(default, deserialize_with = "null_as_empty_snaps")]
    pub remove: Vec<IdOnly>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct IdOnly {
    pub id: String,
}

fn null_as_empty_snaps<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IdOnly>, D::Error> {
    Ok(Option::<Vec<IdOnly>>::deserialize(d)?.unwrap_or_default())
}

/// An RFC 3339 timestamp as Go writes it (`2026-12-07T04:55:30.193924101Z`, or with an offset
/// such as `+01:00`) to a [`SystemTime`]; `None` when it is not one.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let mut i = 19;
    let mut nanos: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() {
            return None;
        }
        let mut padded = digits.chars().take(9).collect::<String>();
        while padded.len() < 9 {
            padded.push('0');
        }
        nanos = padded.parse().ok()?;
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let minutes = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if *sign == b'+' {
                minutes * 60
            } else {
                -minutes * 60
            }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset;
    let nanos = u32::try_from(nanos).ok()?;
    if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs.unsigned_abs(), nanos))
    } else {
        SystemTime::UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))?
            .checked_add(Duration::from_nanos(u64::from(nanos)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_captured_backup_lines() {
        let status = r#"{"message_type":"status","percent_done":1,"total_files":2,"files_done":2,"total_bytes":588898,"bytes_done":588898,"current_files":["/d/a"]}"#;
        match serde_json::from_str::<BackupLine>(status).expect("status") {
            BackupLine::Status(p) => {
                assert_eq!(p.files_done, 2);
                assert_eq!(p.bytes_done, 588_898);
                assert_eq!(p.current_files, ["/d/a"]);
            }
            other => panic!("{other:?}"),
        }
        let summary = r#"{"message_type":"summary","files_new":2,"files_changed":0,"files_unmodified":0,"dirs_new":1,"dirs_changed":0,"dirs_unmodified":0,"data_blobs":2,"tree_blobs":2,"data_added":589944,"total_files_processed":2,"total_bytes_processed":588898,"total_duration":0.230886554,"snapshot_id":"2f49f9f3"}"#;
        match serde_json::from_str::<BackupLine>(summary).expect("summary") {
            BackupLine::Summary(s) => {
                let s = s.into_summary(Vec::new(), 0);
                assert_eq!(s.snapshot_id, "2f49f9f3");
                assert_eq!(s.files_new, 2);
                assert_eq!(s.data_added, 589_944);
                assert_eq!(s.duration, Duration::from_nanos(230_886_554));
            }
            other => panic!("{other:?}"),
        }
        let error = r#"{"message_type":"error","error":{"Op":"open","Path":"/tmp/ry/d/b","Err":13},"during":"archival","item":"/tmp/ry/d/b"}"#;
        match serde_json::from_str::<BackupLine>(error).expect("error") {
            BackupLine::Error(e) => {
                let w = e.into_warning();
                assert_eq!(w.item, "/tmp/ry/d/b");
                assert_eq!(w.during, "archival");
                assert!(w.message.starts_with("open: Permission denied"), "{w:?}");
            }
            other => panic!("{other:?}"),
        }
        let verbose = r#"{"message_type":"verbose_status","action":"new","item":"/x"}"#;
        assert!(matches!(
            serde_json::from_str::<BackupLine>(verbose).expect("other"),
            BackupLine::Other
        ));
    }

    #[test]
    fn parses_captured_snapshots_ls_forget_and_lock() {
        let snaps = r#"[{"time":"2026-12-07T04:55:30.193924101Z","tree":"c3b7","paths":["/tmp/rx/d"],"hostname":"h1","username":"root","tags":["t1"],"id":"2f49f9f381882ee199ad61133ae5eb4747041c0c43b644681aa181caab8a429a","short_id":"2f49f9f3"},{"time":"2026-12-07T04:55:31Z","tree":"c3b7","paths":["/x"],"hostname":"h1","id":"ab","short_id":"ab"}]"#;
        let snaps: Vec<Snapshot> = serde_json::from_str(snaps).expect("snapshots");
        assert_eq!(snaps[0].tags, ["t1"]);
        assert!(snaps[1].tags.is_empty());

        let node = r#"{"name":"a","type":"file","path":"/d/a","uid":0,"gid":0,"size":588895,"mode":420,"permissions":"-rw-r--r--","mtime":"2026-12-07T04:55:30.178585488Z","atime":"2026-12-07T04:55:30.178585488Z","ctime":"2026-12-07T04:55:30.178585488Z","struct_type":"node"}"#;
        let e = serde_json::from_str::<LsLine>(node)
            .expect("node")
            .into_entry();
        assert_eq!(e.kind, EntryKind::File);
        assert_eq!(e.size, 588_895);
        assert_eq!(
            e.mtime,
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_796_619_330, 178_585_488))
        );

        let forget = r#"[{"tags":["t1"],"host":"h1","paths":null,"keep":[{"id":"k1","short_id":"k"}],"remove":[{"id":"r1"},{"id":"r2"}],"reasons":[]},{"keep":[{"id":"k2"}],"remove":null}]"#;
        let groups: Vec<ForgetGroup> = serde_json::from_str(forget).expect("forget");
        assert_eq!(groups[0].remove.len(), 2);
        assert!(groups[1].remove.is_empty());

        let lock = "{\n  \"time\": \"2026-12-07T04:56:05.960686727Z\",\n  \"exclusive\": false,\n  \"hostname\": \"vm\",\n  \"username\": \"root\",\n  \"pid\": 2259\n}";
        let lock: LockFile = serde_json::from_str(lock).expect("lock");
        assert_eq!((lock.pid, lock.exclusive), (2259, false));
    }

    #[test]
    fn rfc3339_with_offsets_and_fractions() {
        let utc = parse_rfc3339("2026-12-07T04:55:30Z").expect("utc");
        assert_eq!(
            parse_rfc3339("2026-12-07T05:55:30+01:00").expect("offset"),
            utc
        );
        assert_eq!(
            parse_rfc3339("2026-12-06T23:55:30-05:00").expect("negative"),
            utc
        );
        assert_eq!(
            parse_rfc3339("1970-01-01T00:00:00.5Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(500))
        );
        assert_eq!(
            parse_rfc3339("2000-02-29T00:00:00Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400))
        );
        for bad in [
            "",
            "2026-12-07",
            "2026-13-07T00:00:00Z",
            "2026-12-07T00:00:00",
            "x",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
