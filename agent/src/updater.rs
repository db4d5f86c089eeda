//! The agent's self-update shell around the pure pieces in [`crate::release`] (verification) and
//! [`crate::update`] (what to do at start, after checks, at the deadline).
//!
//! Files: `STATE_DIR/update.json` (the [`UpdateState`]), `STATE_DIR/agent.download` (the download,
//! verified while it streams), and beside the executable a uniquely named exclusive temporary copy
//! (`.<name>.<random>.tmp`, about to be renamed over it) and `<name>.prev` (the previous binary, a
//! hard link kept until the next update). The copy is made next to the executable so the final
//! `rename` is atomic (same filesystem) and a full disk shows up while writing the copy, before
//! anything was changed.

use std::{
    fs,
    io::Write,
    os::unix::{
        fs::{DirBuilderExt, OpenOptionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use shoal_overlay::{pki::TempFile, recv_msg, send_msg};
use shoal_proto::{
    FetchRelease, FetchReply, ReleaseManifest, SignedRelease, UnixMillis, UpdateFailure,
    UpdateReport,
};
use tracing::{error, info, warn};

use crate::{
    daemon::now_ms,
    release::{current_target, verify_release, BinaryCheck, ReleaseKey},
    update::{self, DownloadEnd, FetchStep, Step, UpdatePolicy, UpdateState},
};

/// How the agent updates itself. Every field has a documented default.
#[derive(Debug, Clone, Default)]
pub struct UpdaterConfig {
    /// The trusted release public key (`--release-key`). Default none: every offer is refused with
    /// [`UpdateFailure::NoTrustedKey`].
    pub release_key: Option<ReleaseKey>,
    /// The executable to replace (default: the running one, `/proc/self/exe`, resolved at start).
    pub exe: Option<PathBuf>,
    /// Health deadline and allowed starts (default [`UpdatePolicy::default`]: 2 min, 3 starts).
    pub policy: UpdatePolicy,
    /// A program run as an extra health check (`--health-check`, alias `--update-check`): of a new
    /// version here, and of every boot in the boot report ([`crate::checks`]); exit 0 passes.
    /// Default none.
    pub check_command: Option<PathBuf>,
}

/// Files of the updater.
#[derive(Debug, Clone)]
pub struct UpdatePaths {
    /// The executable.
    pub exe: PathBuf,
    /// `update.json`.
    pub record: PathBuf,
    /// The download.
    pub download: PathBuf,
}

impl UpdatePaths {
    /// The paths for a state dir and executable.
    pub fn new(state_dir: &Path, exe: PathBuf) -> UpdatePaths {
        UpdatePaths {
            exe,
            record: state_dir.join("update.json"),
            download: state_dir.join("agent.download"),
        }
    }

    /// `<exe>.prev`.
    pub fn prev(&self) -> PathBuf {
        sibling(&self.exe, "", ".prev")
    }
}

fn sibling(exe: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "shoal-agent".into());
    exe.with_file_name(format!("{prefix}{name}{suffix}"))
}

/// Reads `update.json`; a missing or unreadable record is no record (logged).
pub fn load_record(path: &Path) -> Option<UpdateState> {
    match fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(path = %path.display(), cause = %e, "unreadable update record ignored");
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            warn!(path = %path.display(), cause = %e, "update record unreadable");
            None
        }
    }
}

/// Writes `update.json` atomically, like every file in the state dir
/// ([`shoal_overlay::pki::write_private_file`]).
pub fn save_record(path: &Path, state: &UpdateState) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    shoal_overlay::pki::write_private_file(path, &bytes, 0o600)
}

fn install_error(what: &str, path: &Path, e: std::io::Error) -> UpdateFailure {
    UpdateFailure::Install(format!("{what} {}: {e}", path.display()))
}

/// Replaces the executable with the verified download: copy beside it, fsync, chmod 0755, write the
/// `Trying` record, keep the old binary as `.prev` (hard link), rename, fsync the directory. Any
/// failure before the rename leaves the executable untouched (and the partial copy removed).
pub fn install(paths: &UpdatePaths, trying: &UpdateState) -> Result<(), UpdateFailure> {
    let result = (|| {
        let mut src = open_nofollow(&paths.download)
            .map_err(|e| install_error("opening", &paths.download, e))?;
        // The copy is an exclusive, uniquely named file beside the executable, removed on any
        // failure.
        let mut new = TempFile::new_beside(&paths.exe, 0o755)
            .map_err(|e| install_error("creating a file beside", &paths.exe, e))?;
        let new_path = new.path().to_owned();
        std::io::copy(&mut src, new.file()).map_err(|e| install_error("writing", &new_path, e))?;
        new.file()
            .sync_all()
            .map_err(|e| install_error("syncing", &new_path, e))?;
        save_record(&paths.record, trying)
            .map_err(|e| install_error("writing", &paths.record, e))?;
        keep_as(&paths.exe, &paths.prev())
            .map_err(|e| install_error("keeping the previous binary as", &paths.prev(), e))?;
        new.persist(&paths.exe)
            .map_err(|e| install_error("renaming over", &paths.exe, e))
    })();
    let _ = fs::remove_file(&paths.download);
    result
}

/// Puts a copy of `src` (the packaged binary, [`crate::launch`]) at the executable, keeping the one
/// there, if any, as `.prev`: copy beside it, fsync, rename, as [`install`] does. No record is
/// written: this is no update the agent verified, and [`Updater::boot`] settles a record about
/// another version at the next start.
pub fn place(src: &Path, paths: &UpdatePaths) -> std::io::Result<()> {
    let mut from = fs::File::open(src)?;
    if let Some(dir) = paths.exe.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
    }
    let mut new = TempFile::new_beside(&paths.exe, 0o755)?;
    std::io::copy(&mut from, new.file())?;
    new.file().sync_all()?;
    if fs::symlink_metadata(&paths.exe).is_ok() {
        keep_as(&paths.exe, &paths.prev())?;
    }
    new.persist(&paths.exe)
}

/// Opens a file for reading without following a symlink at its name.
fn open_nofollow(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// Puts a copy of `from` at `to`, atomically: a hard link under a unique temporary name (or, where
/// the layout forbids links, a copy into an exclusive temporary file), renamed over `to`.
fn keep_as(from: &Path, to: &Path) -> std::io::Result<()> {
    let tmp = TempFile::new_beside(to, 0o755)?;
    // link(2) never overwrites: it needs the name free, so the temporary file makes way.
    let name = tmp.path().to_owned();
    fs::remove_file(&name)?;
    match fs::hard_link(from, &name) {
        Ok(()) => {
            let renamed = fs::rename(&name, to);
            if renamed.is_err() {
                let _ = fs::remove_file(&name);
            }
            renamed?;
            if let Some(dir) = to.parent() {
                let _ = fs::File::open(dir).and_then(|d| d.sync_all());
            }
            drop(tmp);
            Ok(())
        }
        Err(e) => {
            // Another filesystem layout (the executable is a bind mount of one file): copy instead.
            warn!(cause = %e, from = %from.display(), "could not hard-link; copying");
            let mut copy = TempFile::new_beside(to, 0o755)?;
            std::io::copy(&mut open_nofollow(from)?, copy.file())?;
            copy.persist(to)
        }
    }
}

/// Puts `.prev` back over the executable (rename, atomic). Returns whether there was one.
pub fn restore_prev(paths: &UpdatePaths) -> std::io::Result<bool> {
    let prev = paths.prev();
    if fs::symlink_metadata(&prev).is_err() {
        return Ok(false);
    }
    // `.prev` stays too (the restored binary is a link of it), for a later manual revert.
    keep_as(&prev, &paths.exe)?;
    Ok(true)
}

/// Replaces this process with the executable, same arguments (and environment). Returns only on
/// failure.
pub fn reexec(exe: &Path) -> std::io::Error {
    info!(exe = %exe.display(), "re-executing");
    std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .exec()
}

/// Rolls back: restores `.prev`, records the state, re-executes. Returns only if that failed.
pub fn roll_back(paths: &UpdatePaths, state: &UpdateState) {
    warn!(state = ?state, "new agent version not healthy: rolling back to the previous binary");
    if let Err(e) = save_record(&paths.record, state) {
        warn!(cause = %e, "could not record the roll-back");
    }
    match restore_prev(paths) {
        Ok(true) => {
            let e = reexec(&paths.exe);
            error!(cause = %e, "could not re-execute the previous binary");
        }
        Ok(false) => error!(prev = %paths.prev().display(), "no previous binary to roll back to"),
        Err(e) => error!(cause = %e, "could not restore the previous binary"),
    }
}

/// The updater's state in the agent.
#[derive(Debug)]
pub struct Updater {
    config: UpdaterConfig,
    paths: UpdatePaths,
    running: String,
    state: Option<UpdateState>,
    /// An offer being fetched or installed.
    busy: Option<String>,
}

impl Updater {
    /// Reads the record and settles what the start means ([`update::on_start`]): counts the
    /// attempt, or records the outcome of the last update, or rolls back at once (then this does
    /// not return).
    pub fn boot(config: UpdaterConfig, state_dir: &Path, running: &str) -> Updater {
        let exe = config
            .exe
            .clone()
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_else(|| PathBuf::from("shoal-agent"));
        let paths = UpdatePaths::new(state_dir, exe);
        let mut state = load_record(&paths.record);
        match update::on_start(state.clone(), running, now_ms(), &config.policy) {
            Step::Nothing => {}
            Step::Check { state: s, deadline } => {
                info!(
                    version = running,
                    deadline = deadline.0,
                    "started after an update: checking health"
                );
                if let Err(e) = save_record(&paths.record, &s) {
                    warn!(cause = %e, "could not count this start");
                }
                state = Some(s);
            }
            Step::Settle(s) => {
                info!(state = ?s, "last update settled");
                if let Err(e) = save_record(&paths.record, &s) {
                    warn!(cause = %e, "could not record the update's outcome");
                }
                state = Some(s);
            }
            Step::RollBack(s) => {
                roll_back(&paths, &s);
                state = Some(s);
            }
        }
        Updater {
            config,
            paths,
            running: running.to_owned(),
            state,
            busy: None,
        }
    }

    /// The report for the controller.
    pub fn report(&self) -> UpdateReport {
        update::report(self.state.as_ref(), &self.running)
    }

    /// The health deadline while a new version is being checked.
    pub fn deadline(&self) -> Option<UnixMillis> {
        match &self.state {
            Some(UpdateState::Trying {
                attempted,
                deadline,
                ..
            }) if *attempted == self.running => Some(*deadline),
            _ => None,
        }
    }

    /// The files.
    pub fn paths(&self) -> &UpdatePaths {
        &self.paths
    }

    /// Runs the health checks after a heartbeat went out on an established session; returns a
    /// report to send when the state changed. Rolls back (and does not return) when past the
    /// deadline.
    pub fn heartbeat_sent(&mut self) -> Option<UpdateReport> {
        let state = self.state.clone().filter(|_| self.deadline().is_some())?;
        let previous = match &state {
            UpdateState::Trying { previous, .. } => previous.clone(),
            _ => String::new(),
        };
        let env = [
            ("SHOAL_CHECK", "update"),
            ("SHOAL_AGENT_VERSION", self.running.as_str()),
            ("SHOAL_AGENT_PREVIOUS", previous.as_str()),
        ];
        let checks = crate::checks::run(self.config.check_command.as_deref(), &env);
        let step = update::on_checks(state, checks, now_ms());
        self.apply(step)
    }

    /// At the deadline.
    pub fn timeout(&mut self) -> Option<UpdateReport> {
        let state = self.state.clone()?;
        let step = update::on_timeout(state, now_ms());
        self.apply(step)
    }

    fn apply(&mut self, step: Step) -> Option<UpdateReport> {
        match step {
            Step::Check { state, .. } => {
                let changed = self.state.as_ref() != Some(&state);
                let _ = save_record(&self.paths.record, &state);
                self.state = Some(state);
                changed.then(|| self.report())
            }
            Step::Settle(state) => {
                info!(state = ?state, "update settled");
                if let Err(e) = save_record(&self.paths.record, &state) {
                    warn!(cause = %e, "could not record the update's outcome");
                }
                self.state = Some(state);
                Some(self.report())
            }
            Step::RollBack(state) => {
                roll_back(&self.paths, &state);
                self.state = Some(state);
                Some(self.report())
            }
            _ => None,
        }
    }

    /// Checks an offer: key, signature, target, version, and that it is not older than the running
    /// version unless `allow_downgrade` ([`update::check_downgrade`]; a v4 `UpdateAgent` never
    /// allows it). `Ok` means acknowledge it (and fetch it, for [`Offer::Fetch`]); `Err` is the
    /// report to send instead (a refusal, or the state as it is when the offer changes nothing).
    pub fn offer(
        &mut self,
        version: &str,
        release: &SignedRelease,
        allow_downgrade: bool,
    ) -> Result<Offer, Box<UpdateReport>> {
        if let Some(v) = &self.busy {
            if v == version {
                // A repeat (the controller restarted before it stored the acknowledgement): the
                // download carries on, on this session if the last one broke it off.
                info!(version, "update already being fetched; acknowledged again");
                return Ok(Offer::InProgress);
            }
            info!(busy = %v, offered = version, "update already in progress; offer ignored");
            return Err(Box::new(self.report()));
        }
        if version == self.running {
            info!(version, "offered the running version; nothing to do");
            let state = update::offered_running(self.state.take(), &self.running);
            if state.is_none() {
                if let Err(e) = fs::remove_file(&self.paths.record) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        warn!(cause = %e, "could not remove the update record");
                    }
                }
            }
            self.state = state;
            return Err(Box::new(self.report()));
        }
        let verified = verify_release(
            release,
            self.config.release_key.as_ref(),
            &current_target(),
            Some(version),
        )
        .and_then(|m| {
            update::check_downgrade(&self.running, &m.version, allow_downgrade).map(|()| m)
        });
        match verified {
            Ok(m) => {
                info!(version, size = m.size, "update offered; fetching");
                self.busy = Some(version.to_owned());
                Ok(Offer::Fetch(m))
            }
            Err(failure) => Err(Box::new(self.failed(version, failure))),
        }
    }

    /// The limits for the new version and its download.
    pub fn policy(&self) -> UpdatePolicy {
        self.config.policy
    }

    /// Records that an update to `version` failed before the swap; the agent stays as it is.
    pub fn failed(&mut self, version: &str, failure: UpdateFailure) -> UpdateReport {
        warn!(version, cause = %failure, "update refused; staying on {}", self.running);
        self.busy = None;
        let state = UpdateState::install_failed(version, &self.running, failure);
        // A full disk may refuse even this: the report still goes out from memory.
        if let Err(e) = save_record(&self.paths.record, &state) {
            warn!(cause = %e, "could not record the failed update");
        }
        self.state = Some(state);
        self.report()
    }

    /// The `Trying` record to write before the swap.
    pub fn trying(&self, version: &str) -> UpdateState {
        UpdateState::trying(version, &self.running, now_ms(), &self.config.policy)
    }
}

/// An accepted offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// Verified: acknowledge it and fetch it ([`fetch`]).
    Fetch(ReleaseManifest),
    /// The same version is already being fetched: acknowledge it again, nothing more.
    InProgress,
}

/// Fetches a verified release into `paths.download`, across control connections: each attempt runs
/// on the newest connection `conns` holds that is still open (the shell publishes each v4 session's
/// connection there), and [`update::on_download_end`] decides after each one. A download broken off
/// because the connection went away resumes on the next session from the bytes kept, at most
/// [`UpdatePolicy::max_download_sessions`] sessions in all; nothing is reported meanwhile. `Ok`
/// means downloaded, size and hash verified, and fsynced.
pub async fn fetch(
    mut conns: tokio::sync::watch::Receiver<Option<quinn::Connection>>,
    paths: &UpdatePaths,
    manifest: &ReleaseManifest,
    policy: &UpdatePolicy,
) -> Result<(), UpdateFailure> {
    let mut sessions = 0u32;
    loop {
        let conn = loop {
            let open = conns
                .borrow_and_update()
                .clone()
                .filter(|c| c.close_reason().is_none());
            if let Some(c) = open {
                break c;
            }
            if conns.changed().await.is_err() {
                return Err(UpdateFailure::Install(
                    "download: the agent is shutting down".into(),
                ));
            }
        };
        sessions += 1;
        let end = download(&conn, paths, manifest, sessions > 1).await;
        match update::on_download_end(sessions, end.clone(), policy) {
            FetchStep::Install => return Ok(()),
            FetchStep::Fail(failure) => return Err(failure),
            FetchStep::Retry => {
                if let DownloadEnd::ConnectionLost { received, cause } = end {
                    warn!(version = %manifest.version, received, sessions, %cause, "release download broken off by the lost connection; resuming on the next session");
                }
                // Wait for another connection (this one is closed, so the filter above skips it).
            }
        }
    }
}

/// One download attempt on a new stream of `conn`, into `paths.download`, checking size and hash as
/// it streams (an overlong download stops at once), then fsync. With `resume`, the bytes already in
/// the file are hashed again and the fetch starts after them (`FetchRelease::offset`); without it,
/// or when the file is unusable, from 0. A stream or request that fails while `conn` is closed is
/// [`DownloadEnd::ConnectionLost`]; a stream that ends (cleanly, or with an error) while the
/// connection is alive ends the download, and the size and hash check says whether it is complete.
pub async fn download(
    conn: &quinn::Connection,
    paths: &UpdatePaths,
    manifest: &ReleaseManifest,
    resume: bool,
) -> DownloadEnd {
    let fetch = |e: &dyn std::fmt::Display| UpdateFailure::Install(format!("download: {e}"));
    let (path, m) = (paths.download.clone(), manifest.clone());
    let opened = tokio::task::spawn_blocking(move || open_download(&path, &m, resume)).await;
    let (mut file, mut check) = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(failure)) => return DownloadEnd::Failed(failure),
        Err(e) => return DownloadEnd::Failed(fetch(&e)),
    };
    let lost = |check: &BinaryCheck, e: &dyn std::fmt::Display| {
        conn.close_reason()
            .map(|reason| DownloadEnd::ConnectionLost {
                received: check.received(),
                cause: format!("{e} ({reason})"),
            })
    };
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return lost(&check, &e).unwrap_or_else(|| DownloadEnd::Failed(fetch(&e))),
    };
    let req = FetchRelease {
        version: manifest.version.clone(),
        target: manifest.target.clone(),
        offset: check.received(),
    };
    if check.received() > 0 {
        info!(version = %manifest.version, offset = check.received(), "resuming the release download");
    }
    if let Err(e) = send_msg(&mut send, &req).await {
        return lost(&check, &e).unwrap_or_else(|| DownloadEnd::Failed(fetch(&e)));
    }
    let _ = send.finish();
    loop {
        let reply =
            tokio::time::timeout(Duration::from_secs(60), recv_msg::<FetchReply>(&mut recv)).await;
        match reply {
            Ok(Ok(Some(FetchReply::Chunk(chunk)))) => {
                if chunk.offset != check.received() {
                    return DownloadEnd::Failed(fetch(&format!(
                        "chunk at {} while expecting {}",
                        chunk.offset,
                        check.received()
                    )));
                }
                if let Err(failure) = check.update(&chunk.bytes) {
                    return DownloadEnd::Failed(failure);
                }
                if let Err(e) = file.write_all(&chunk.bytes) {
                    return DownloadEnd::Failed(install_error("writing", &paths.download, e));
                }
            }
            Ok(Ok(Some(FetchReply::Error(e)))) => {
                return DownloadEnd::Failed(fetch(&format!("the controller says: {e}")))
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                // The connection went away (a controller restart, an outage): not the release's
                // fault.
                if let Some(end) = lost(&check, &e) {
                    return end;
                }
                // The stream alone broke off: a short download, the size check below says how
                // short.
                warn!(cause = %e, received = check.received(), "release download broke off");
                break;
            }
            Err(_) => {
                warn!(
                    received = check.received(),
                    "release download stalled for 60 s"
                );
                break;
            }
        }
    }
    if let Err(e) = file.sync_all() {
        return DownloadEnd::Failed(install_error("syncing", &paths.download, e));
    }
    match check.finish() {
        Ok(()) => DownloadEnd::Complete,
        Err(failure) => DownloadEnd::Failed(failure),
    }
}

/// Opens the download file: with `resume`, appends to what is there after hashing it again
/// (starting over when it is missing, unreadable or longer than the release); otherwise truncated.
fn open_download(
    path: &Path,
    manifest: &ReleaseManifest,
    resume: bool,
) -> Result<(fs::File, BinaryCheck), UpdateFailure> {
    if resume {
        let kept = (|| -> std::io::Result<Option<(fs::File, BinaryCheck)>> {
            let mut check = BinaryCheck::new(manifest);
            let mut f = open_nofollow(path)?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = std::io::Read::read(&mut f, &mut buf)?;
                if n == 0 {
                    break;
                }
                if check.update(&buf[..n]).is_err() {
                    return Ok(None);
                }
            }
            Ok(Some((
                fs::File::options()
                    .append(true)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(path)?,
                check,
            )))
        })();
        match kept {
            Ok(Some(x)) => return Ok(x),
            Ok(None) => {
                warn!(path = %path.display(), "kept download longer than the release; starting over")
            }
            Err(e) => {
                warn!(path = %path.display(), cause = %e, "kept download unusable; starting over")
            }
        }
    }
    // A fresh download starts from a file created exclusively (the name is fixed so a broken-off
    // download can resume on the next session; the state dir is the agent's alone, 0700).
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(install_error("removing", path, e))
        }
        _ => {}
    }
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| install_error("creating", path, e))?;
    Ok((file, BinaryCheck::new(manifest)))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn paths(dir: &Path) -> UpdatePaths {
        let bin = dir.join("bin");
        fs::create_dir_all(&bin).expect("mkdir");
        fs::write(bin.join("shoal-agent"), b"old binary").expect("write");
        UpdatePaths::new(dir, bin.join("shoal-agent"))
    }

    /// Temporary files left beside the executable.
    fn temp_files(p: &UpdatePaths) -> Vec<String> {
        let dir = p.exe.parent().expect("dir");
        fs::read_dir(dir)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    /// A release of `version` for this target, signed with a fresh key; the key and the envelope.
    fn release(version: &str) -> (ReleaseKey, SignedRelease) {
        use ring::signature::{Ed25519KeyPair, KeyPair};
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
        let key = ReleaseKey::from_bytes(pair.public_key().as_ref().try_into().expect("32 bytes"));
        let manifest = ReleaseManifest {
            format: shoal_proto::RELEASE_MANIFEST_FORMAT,
            version: version.into(),
            sha256: "ab".repeat(32),
            size: 10,
            target: current_target(),
            created_at: UnixMillis(1),
        };
        let bytes = serde_json::to_vec(&manifest).expect("json");
        (
            key,
            SignedRelease {
                signature: pair.sign(&bytes).as_ref().to_vec(),
                manifest: bytes,
                key_id: key.id(),
            },
        )
    }

    #[test]
    fn an_older_version_is_refused_unless_the_offer_allows_a_downgrade() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = paths(dir.path());
        let (key, older) = release("0.9.0");
        let config = UpdaterConfig {
            exe: Some(p.exe.clone()),
            release_key: Some(key),
            ..Default::default()
        };
        let mut u = Updater::boot(config.clone(), dir.path(), "0.9.4");
        let report = u.offer("0.9.0", &older, false).expect_err("refused");
        assert_eq!(
            report.failure,
            Some(UpdateFailure::Downgrade {
                running: "0.9.4".into(),
                offered: "0.9.0".into()
            })
        );
        assert_eq!(
            (report.running.as_str(), report.attempted.as_deref()),
            ("0.9.4", Some("0.9.0")),
            "stays on its version"
        );
        match u.offer("0.9.0", &older, true) {
            Ok(Offer::Fetch(m)) => assert_eq!(m.version, "0.9.0"),
            other => panic!("the permitted downgrade is fetched: {other:?}"),
        }
        // A newer version needs no permission.
        let (key, newer) = release("0.10.0");
        let mut u = Updater::boot(
            UpdaterConfig {
                release_key: Some(key),
                ..config
            },
            dir.path(),
            "0.9.4",
        );
        assert!(matches!(
            u.offer("0.10.0", &newer, false),
            Ok(Offer::Fetch(_))
        ));
    }

    #[test]
    fn install_swaps_keeps_prev_records_trying_and_restore_brings_prev_back() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = paths(dir.path());
        fs::write(&p.download, b"new binary").expect("download");
        let trying = UpdateState::trying("0.2.0", "0.1.0", UnixMillis(1), &UpdatePolicy::default());
        install(&p, &trying).expect("installed");
        assert_eq!(fs::read(&p.exe).expect("exe"), b"new binary");
        assert_eq!(fs::read(p.prev()).expect("prev"), b"old binary");
        assert_eq!(
            fs::metadata(&p.exe).expect("meta").permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(load_record(&p.record), Some(trying));
        assert!(!p.download.exists() && temp_files(&p).is_empty());
        assert!(restore_prev(&p).expect("restored"));
        assert_eq!(fs::read(&p.exe).expect("exe"), b"old binary");
        assert!(p.prev().exists(), "prev stays for a manual revert");
    }

    #[test]
    fn a_failed_install_leaves_the_executable_alone() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = paths(dir.path());
        // No download: the copy fails before anything changes.
        let trying = UpdateState::trying("0.2.0", "0.1.0", UnixMillis(1), &UpdatePolicy::default());
        let err = install(&p, &trying).expect_err("fails");
        assert!(matches!(err, UpdateFailure::Install(_)), "{err}");
        assert_eq!(fs::read(&p.exe).expect("exe"), b"old binary");
        assert!(
            !p.prev().exists() && temp_files(&p).is_empty() && load_record(&p.record).is_none()
        );
    }

    #[test]
    fn without_a_key_every_offer_is_refused_and_reported() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = paths(dir.path());
        let config = UpdaterConfig {
            exe: Some(p.exe.clone()),
            ..Default::default()
        };
        let mut u = Updater::boot(config, dir.path(), "0.1.0");
        assert_eq!(u.report().attempted, None);
        let release = SignedRelease {
            manifest: b"{}".to_vec(),
            signature: vec![0; 64],
            key_id: "00".repeat(8),
        };
        let report = u.offer("0.2.0", &release, false).expect_err("refused");
        assert_eq!(report.failure, Some(UpdateFailure::NoTrustedKey));
        assert_eq!(
            (report.running.as_str(), report.attempted.as_deref()),
            ("0.1.0", Some("0.2.0"))
        );
        // The record survives a restart of the same binary and is still reported.
        let u = Updater::boot(
            UpdaterConfig {
                exe: Some(p.exe.clone()),
                ..Default::default()
            },
            dir.path(),
            "0.1.0",
        );
        assert_eq!(u.report().failure, Some(UpdateFailure::NoTrustedKey));
    }

    #[test]
    fn a_resumed_download_keeps_and_rehashes_the_bytes_it_has() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = paths(dir.path());
        let binary: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let manifest = ReleaseManifest {
            format: shoal_proto::RELEASE_MANIFEST_FORMAT,
            version: "0.2.0".into(),
            sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, &binary).as_ref()),
            size: binary.len() as u64,
            target: current_target(),
            created_at: UnixMillis(1),
        };
        // The first session broke off after 1000 bytes; the next one resumes there and completes.
        fs::write(&p.download, &binary[..1000]).expect("partial");
        let (mut f, mut check) = open_download(&p.download, &manifest, true).expect("open");
        assert_eq!(
            check.received(),
            1000,
            "the next FetchRelease asks from here"
        );
        check.update(&binary[1000..]).expect("rest");
        f.write_all(&binary[1000..]).expect("write");
        check.finish().expect("size and hash of the whole binary");
        assert_eq!(fs::read(&p.download).expect("read"), binary);
        // A kept file longer than the release, or a first attempt: from 0.
        fs::write(&p.download, vec![0u8; 4000]).expect("overlong");
        assert_eq!(
            open_download(&p.download, &manifest, true)
                .expect("open")
                .1
                .received(),
            0
        );
        assert_eq!(
            fs::metadata(&p.download).expect("meta").len(),
            0,
            "started over"
        );
        fs::write(&p.download, &binary[..10]).expect("partial");
        assert_eq!(
            open_download(&p.download, &manifest, false)
                .expect("open")
                .1
                .received(),
            0
        );
    }

    #[test]
    fn an_offer_of_the_running_version_leaves_its_health_check_running() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = paths(dir.path());
        save_record(
            &p.record,
            &UpdateState::trying("0.2.0", "0.1.0", now_ms(), &UpdatePolicy::default()),
        )
        .expect("record");
        let mut u = Updater::boot(
            UpdaterConfig {
                exe: Some(p.exe.clone()),
                ..Default::default()
            },
            dir.path(),
            "0.2.0",
        );
        let before = u.report();
        let release = SignedRelease {
            manifest: b"{}".to_vec(),
            signature: vec![0; 64],
            key_id: "00".repeat(8),
        };
        let again = u
            .offer("0.2.0", &release, false)
            .expect_err("nothing to fetch");
        assert_eq!(*again, before, "the current report, unchanged");
        assert!(u.deadline().is_some(), "still checking");
        assert_eq!(
            u.heartbeat_sent().map(|r| r.checks.len()),
            Some(2),
            "the checks still run and settle it"
        );
    }

    #[test]
    fn a_new_version_counts_its_start_and_passes_its_checks_after_a_heartbeat() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = paths(dir.path());
        let trying = UpdateState::trying("0.2.0", "0.1.0", now_ms(), &UpdatePolicy::default());
        save_record(&p.record, &trying).expect("record");
        let mut u = Updater::boot(
            UpdaterConfig {
                exe: Some(p.exe.clone()),
                ..Default::default()
            },
            dir.path(),
            "0.2.0",
        );
        assert!(u.deadline().is_some());
        assert_eq!(u.report().attempts, 1);
        let report = u.heartbeat_sent().expect("settled");
        assert_eq!(report.failure, None);
        assert_eq!(
            report
                .checks
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["session", "heartbeat"]
        );
        assert!(u.deadline().is_none() && u.heartbeat_sent().is_none());
    }
}
