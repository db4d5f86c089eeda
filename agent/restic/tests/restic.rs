//! shoal-restic against the real restic, with local-path repositories in temp dirs.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use shoal_restic::{
    record_hashes, sample_files, BackupSpec, EntryKind, Error, Filter, Repo, Restic, Retention,
};
use shoal_testkit::{require, skip};

struct Fixture {
    dir: tempfile::TempDir,
    restic: Restic,
    repo: Repo,
}

impl Fixture {
    fn new(binary: PathBuf) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let restic = Restic {
            binary,
            cache_dir: Some(dir.path().join("cache")),
            timeout: Some(Duration::from_secs(300)),
        };
        let repo = Repo::new(dir.path().join("repo").to_string_lossy(), "correct horse");
        Fixture { dir, restic, repo }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn spec(&self, rel: &str) -> BackupSpec {
        BackupSpec {
            paths: vec![self.path(rel)],
            host: Some("node-a".into()),
            tags: vec!["test".into()],
            ..BackupSpec::default()
        }
    }

    async fn init(&self) {
        assert!(self
            .restic
            .ensure_initialized(&self.repo)
            .await
            .expect("init"));
    }

    /// The largest pack under `data/` (the file data; trees go to small packs of their own).
    fn largest_pack(&self) -> PathBuf {
        let mut packs = Vec::new();
        collect_files(&self.path("repo/data"), &mut packs);
        packs
            .into_iter()
            .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .expect("a pack")
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// Overwrites 64 bytes in the middle of `file` (packs are written read-only).
fn damage(file: &Path) {
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let len = std::fs::metadata(file).expect("meta").len();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open pack");
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(len / 2)).expect("seek");
    f.write_all(&[0xA5; 64]).expect("write");
}

fn random_file(path: &Path, len: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, data).expect("write");
}

fn restic() -> Result<PathBuf, skip::Missing> {
    skip::tool("restic", "restic")
}

#[tokio::test]
async fn version_is_0_14_or_later() {
    let fx = Fixture::new(require!(restic()));
    let v = fx.restic.version().await.expect("version");
    assert!(v.number >= (0, 14, 0), "{v:?}");
}

#[tokio::test]
async fn a_missing_binary_is_not_installed() {
    let restic = Restic {
        binary: "/nonexistent/restic".into(),
        ..Restic::default()
    };
    let err = restic.version().await.expect_err("no binary");
    assert!(matches!(err, Error::NotInstalled { .. }), "{err:?}");
    assert!(err.to_string().contains("Debian package `restic`"), "{err}");
}

#[tokio::test]
async fn init_is_idempotent_and_a_wrong_password_is_refused() {
    let fx = Fixture::new(require!(restic()));
    let err = fx
        .restic
        .snapshots(&fx.repo, &Filter::default())
        .await
        .expect_err("no repository yet");
    assert!(matches!(err, Error::RepositoryMissing { .. }), "{err:?}");
    assert!(fx.restic.ensure_initialized(&fx.repo).await.expect("init"));
    assert!(!fx.restic.ensure_initialized(&fx.repo).await.expect("again"));
    let wrong = Repo::new(fx.repo.url.clone(), "battery staple");
    let err = fx
        .restic
        .ensure_initialized(&wrong)
        .await
        .expect_err("wrong password");
    assert!(matches!(err, Error::WrongPassword { .. }), "{err:?}");
    assert!(!err.to_string().contains("battery"), "{err}");
}

#[tokio::test]
async fn an_unreachable_rest_server_is_unreachable_not_missing() {
    let fx = Fixture::new(require!(restic()));
    let repo = Repo::new("rest:http://127.0.0.1:1/fleet/", "pw");
    let err = fx
        .restic
        .ensure_initialized(&repo)
        .await
        .expect_err("nothing listens on port 1");
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
}

#[tokio::test]
async fn backup_change_backup_restores_both_versions() {
    let fx = Fixture::new(require!(restic()));
    fx.init().await;
    std::fs::create_dir_all(fx.path("src/sub")).expect("mkdir");
    std::fs::write(fx.path("src/sub/file.txt"), "version one\n").expect("write");
    std::fs::write(fx.path("src/skip.tmp"), "excluded\n").expect("write");
    random_file(&fx.path("src/blob"), 300_000, 1);
    let mut spec = fx.spec("src");
    spec.excludes = vec!["*.tmp".into()];

    let mut reports = 0;
    let first = fx
        .restic
        .backup(&fx.repo, &spec, |_| reports += 1)
        .await
        .expect("first backup");
    assert_eq!(first.files_new, 2, "{first:?}");
    assert!(first.data_added > 300_000, "{first:?}");
    assert!(first.warnings.is_empty());

    std::fs::write(fx.path("src/sub/file.txt"), "version two, longer\n").expect("write");
    let second = fx
        .restic
        .backup(&fx.repo, &spec, |_| {})
        .await
        .expect("second backup");
    assert_eq!(
        (second.files_changed, second.files_unmodified),
        (1, 1),
        "{second:?}"
    );

    let snaps = fx
        .restic
        .snapshots(
            &fx.repo,
            &Filter {
                host: Some("node-a".into()),
                tag: Some("test".into()),
            },
        )
        .await
        .expect("snapshots");
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[0].short_id, first.snapshot_id);
    assert_eq!(snaps[1].short_id, second.snapshot_id);
    assert_eq!(snaps[0].paths, [fx.path("src").to_string_lossy()]);
    let other_host = Filter {
        host: Some("node-b".into()),
        tag: None,
    };
    assert!(fx
        .restic
        .snapshots(&fx.repo, &other_host)
        .await
        .expect("snapshots")
        .is_empty());

    let entries = fx
        .restic
        .ls(&fx.repo, &first.snapshot_id)
        .await
        .expect("ls");
    let file = fx.path("src/sub/file.txt").to_string_lossy().into_owned();
    assert!(entries
        .iter()
        .any(|e| e.path == file && e.kind == EntryKind::File && e.size == 12));
    assert!(!entries.iter().any(|e| e.path.ends_with("skip.tmp")));

    for (snap, want) in [
        (&first.snapshot_id, "version one\n"),
        (&second.snapshot_id, "version two, longer\n"),
    ] {
        let target = fx.path(&format!("restore-{snap}"));
        fx.restic
            .restore(&fx.repo, snap, &[], &target)
            .await
            .expect("restore");
        let restored = target.join(file.trim_start_matches('/'));
        assert_eq!(std::fs::read_to_string(restored).expect("restored"), want);
    }
}

#[tokio::test]
async fn forget_keep_last_one_removes_exactly_the_older_snapshot() {
    let fx = Fixture::new(require!(restic()));
    fx.init().await;
    std::fs::create_dir_all(fx.path("src")).expect("mkdir");
    std::fs::write(fx.path("src/a"), "1").expect("write");
    let spec = fx.spec("src");
    let old = fx.restic.backup(&fx.repo, &spec, |_| {}).await.expect("1");
    std::fs::write(fx.path("src/a"), "2").expect("write");
    let new = fx.restic.backup(&fx.repo, &spec, |_| {}).await.expect("2");

    let err = fx
        .restic
        .forget(&fx.repo, &Retention::default(), &Filter::default(), false)
        .await
        .expect_err("empty policy");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");

    let keep_last = Retention {
        keep_last: 1,
        ..Retention::default()
    };
    let outcome = fx
        .restic
        .forget(&fx.repo, &keep_last, &Filter::default(), true)
        .await
        .expect("forget");
    assert_eq!(outcome.kept.len(), 1);
    assert_eq!(outcome.removed.len(), 1);
    assert!(outcome.kept[0].starts_with(&new.snapshot_id), "{outcome:?}");
    assert!(
        outcome.removed[0].starts_with(&old.snapshot_id),
        "{outcome:?}"
    );
    let left = fx
        .restic
        .snapshots(&fx.repo, &Filter::default())
        .await
        .expect("snapshots");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].short_id, new.snapshot_id);
}

#[tokio::test]
async fn check_passes_then_finds_a_damaged_pack() {
    let fx = Fixture::new(require!(restic()));
    fx.init().await;
    random_file(&fx.path("src/big"), 3 << 20, 2);
    fx.restic
        .backup(&fx.repo, &fx.spec("src"), |_| {})
        .await
        .expect("backup");
    let clean = fx
        .restic
        .check(&fx.repo, Some((1, 1)))
        .await
        .expect("check");
    assert!(clean.ok && clean.errors.is_empty(), "{clean:?}");

    damage(&fx.largest_pack());
    let structure = fx.restic.check(&fx.repo, None).await.expect("check");
    assert!(
        structure.ok,
        "without reading data the damage is invisible: {structure:?}"
    );
    let read = fx
        .restic
        .check(&fx.repo, Some((1, 1)))
        .await
        .expect("check");
    assert!(!read.ok, "{read:?}");
    assert!(
        read.errors.iter().any(|e| e.contains("does not match")),
        "{read:?}"
    );
}

#[tokio::test]
async fn verify_sample_passes_then_detects_a_tampered_pack() {
    let fx = Fixture::new(require!(restic()));
    fx.init().await;
    random_file(&fx.path("src/big"), 3 << 20, 3);
    for i in 0..20 {
        random_file(
            &fx.path(&format!("src/small/{i}")),
            1000 + i * 10,
            100 + i as u64,
        );
    }
    let summary = fx
        .restic
        .backup(&fx.repo, &fx.spec("src"), |_| {})
        .await
        .expect("backup");
    let entries = fx
        .restic
        .ls(&fx.repo, &summary.snapshot_id)
        .await
        .expect("ls");
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut sample = sample_files(&entries, 5, &mut rng);
    let big = entries
        .iter()
        .find(|e| e.path.ends_with("/src/big"))
        .expect("big")
        .clone();
    sample.retain(|e| e.path != big.path);
    sample.push(big.clone());
    let hashes = record_hashes(&sample).await;
    assert_eq!(hashes.len(), sample.len());

    let scratch = fx.path("scratch");
    let good = fx
        .restic
        .verify_sample(&fx.repo, &summary.snapshot_id, &hashes, &scratch)
        .await
        .expect("verify");
    assert!(good.ok(), "{good:?}");
    assert_eq!(good.checked, hashes.len());
    assert!(good.bytes >= 3 << 20);
    assert_eq!(std::fs::read_dir(&scratch).expect("scratch").count(), 0);

    damage(&fx.largest_pack());
    let bad = fx
        .restic
        .verify_sample(&fx.repo, &summary.snapshot_id, &hashes, &scratch)
        .await
        .expect("verify runs");
    assert!(bad.mismatches.iter().any(|m| m.path == big.path), "{bad:?}");
    assert_eq!(std::fs::read_dir(&scratch).expect("scratch").count(), 0);
}

#[tokio::test]
async fn a_killed_backup_leaves_a_stale_lock_that_unlock_stale_removes() {
    let fx = Fixture::new(require!(restic()));
    fx.init().await;
    for i in 0..128 {
        random_file(&fx.path(&format!("src/{i}")), 4 << 20, 1000 + i);
    }
    let spec = fx.spec("src");
    let restic = fx.restic.clone();
    let repo = fx.repo.clone();
    let run = tokio::spawn(async move { restic.backup(&repo, &spec, |_| {}).await });

    // The backup's lock names restic's pid: that is the child to kill.
    let deadline = Instant::now() + Duration::from_secs(30);
    let lock = loop {
        let locks = fx.restic.locks(&fx.repo).await.expect("locks");
        if let Some(lock) = locks.into_iter().next() {
            break lock;
        }
        assert!(Instant::now() < deadline, "no lock appeared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Frozen at once, so that a fast machine cannot finish the backup before it is killed.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(lock.pid).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("stop the backup");
    assert!(!lock.exclusive);
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", lock.pid)).expect("comm");
    assert_eq!(comm.trim(), "restic");
    assert!(
        fx.restic
            .stale_locks(&fx.repo)
            .await
            .expect("stale")
            .is_empty(),
        "a live run's lock is not stale"
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill");
    let err = run.await.expect("join").expect_err("killed");
    assert!(
        matches!(err, Error::Failed { code: None, .. }),
        "killed by a signal: {err:?}"
    );

    let stale = fx.restic.stale_locks(&fx.repo).await.expect("stale");
    assert_eq!(stale.len(), 1, "{stale:?}");
    assert_eq!(stale[0].pid, lock.pid);
    assert_eq!(fx.restic.unlock_stale(&fx.repo).await.expect("unlock"), 1);
    assert!(fx.restic.locks(&fx.repo).await.expect("locks").is_empty());
    assert_eq!(fx.restic.unlock_stale(&fx.repo).await.expect("unlock"), 0);
    let summary = fx
        .restic
        .backup(&fx.repo, &fx.spec("src"), |_| {})
        .await
        .expect("a new backup succeeds");
    assert_eq!(summary.total_files_processed, 128);
    let check = fx.restic.check(&fx.repo, None).await.expect("check");
    assert!(check.ok, "{check:?}");
}

/// Exit code 3: restic made the snapshot without an unreadable file. As root every file is
/// readable, so restic runs as `nobody` through a wrapper script (still the real restic).
#[tokio::test]
async fn unreadable_files_are_warnings_not_failures() {
    let real = require!(restic());
    require!(skip::root());
    let setpriv = require!(skip::tool("setpriv", "util-linux"));
    let fx = Fixture::new(real.clone());
    let wrapper = fx.path("restic-as-nobody");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} --reuid=65534 --regid=65534 --clear-groups {} \"$@\"\n",
            setpriv.display(),
            real.display()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let restic = Restic {
        binary: wrapper,
        ..fx.restic.clone()
    };
    std::fs::create_dir_all(fx.path("src")).expect("mkdir");
    std::fs::write(fx.path("src/open"), "readable").expect("write");
    std::fs::write(fx.path("src/secret"), "unreadable").expect("write");
    std::fs::set_permissions(fx.path("src"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::fs::set_permissions(
        fx.path("src/secret"),
        std::fs::Permissions::from_mode(0o000),
    )
    .expect("chmod");
    assert!(restic.ensure_initialized(&fx.repo).await.expect("init"));
    let summary = restic
        .backup(&fx.repo, &fx.spec("src"), |_| {})
        .await
        .expect("exit 3 is a success");
    assert_eq!(summary.total_files_processed, 1);
    assert_eq!(summary.warnings.len(), 1, "{summary:?}");
    assert!(summary.warnings[0].item.ends_with("/src/secret"));
    assert!(
        summary.warnings[0].message.contains("ermission denied"),
        "{summary:?}"
    );
}
