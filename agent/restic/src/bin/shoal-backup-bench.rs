//! Measures restic run directly against the same runs through shoal-restic, and prints figures.
//!
//! `shoal-backup-bench [--dir DIR] [--repeat N] [--keep]` builds a 1 GiB tree of 10,000 files
//! (log-uniform sizes, incompressible content from a fixed seed) under DIR (default: a fresh
//! directory in /dev/shm, a tmpfs, or the temp dir), then, per repeat and with fresh repositories:
//! a first backup and an incremental one after changing 1% of the files (restic run directly, and
//! through [`Restic::backup`], each into its own repository), a restore of the whole snapshot
//! (both ways), and verification (`verify_sample` of 64 files and `check
//! --read-data-subset=1/7`). It prints medians over the repeats, shoal's overhead against direct,
//! and peak RSS of the restic children and of itself.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use shoal_restic::{record_hashes, sample_files, BackupSpec, Repo, Restic};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const FILES: usize = 10_000;
const TOTAL: u64 = 1 << 30;
const PASSWORD: &str = "bench";
/// The tree's content is the same on every run.
const SEED: u64 = 0x5140_a1b0;

struct Args {
    dir: Option<PathBuf>,
    repeat: usize,
    keep: bool,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args {
        dir: None,
        repeat: 1,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dir" => args.dir = Some(it.next().ok_or("--dir needs a value")?.into()),
            "--repeat" => args.repeat = it.next().ok_or("--repeat needs a value")?.parse()?,
            "--keep" => args.keep = true,
            "-h" | "--help" => {
                println!("usage: shoal-backup-bench [--dir DIR] [--repeat N] [--keep]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    if args.repeat == 0 {
        return Err("--repeat must be at least 1".into());
    }
    Ok(args)
}

/// File sizes: log-uniform from 512 B to 4 MiB, scaled so that they add up to [`TOTAL`].
fn sizes(rng: &mut impl Rng) -> Vec<u64> {
    let (lo, hi) = ((512f64).ln(), ((4u64 << 20) as f64).ln());
    let raw: Vec<f64> = (0..FILES).map(|_| rng.random_range(lo..hi).exp()).collect();
    let sum: f64 = raw.iter().sum();
    let mut sizes: Vec<u64> = raw
        .iter()
        .map(|s| (s * TOTAL as f64 / sum) as u64)
        .collect();
    let short = TOTAL - sizes.iter().sum::<u64>();
    sizes[0] += short;
    sizes
}

fn file_path(tree: &Path, i: usize) -> PathBuf {
    tree.join(format!("d{:02}", i % 100))
        .join(format!("f{i:05}"))
}

fn write_random(path: &Path, len: u64, rng: &mut impl RngCore) -> std::io::Result<()> {
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
    rng.fill_bytes(&mut buf);
    std::fs::write(path, buf)
}

fn build_tree(tree: &Path) -> Result<Vec<u64>, BoxError> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    let sizes = sizes(&mut rng);
    for d in 0..100 {
        std::fs::create_dir_all(tree.join(format!("d{d:02}")))?;
    }
    for (i, &len) in sizes.iter().enumerate() {
        write_random(&file_path(tree, i), len, &mut rng)?;
    }
    Ok(sizes)
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-backup-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<(), BoxError> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

/// The times of one repeat.
#[derive(Default, Clone)]
struct Times {
    direct_first: Duration,
    shoal_first: Duration,
    direct_incr: Duration,
    shoal_incr: Duration,
    direct_restore: Duration,
    shoal_restore: Duration,
    ls_sample_hash: Duration,
    verify_sample: Duration,
    check_subset: Duration,
    sample_bytes: u64,
}

fn direct(restic: &Restic, repo: &Repo, cache: &Path, args: &[&str]) -> Result<Duration, BoxError> {
    let start = Instant::now();
    let status = Command::new(&restic.binary)
        .env("RESTIC_REPOSITORY", &repo.url)
        .env("RESTIC_PASSWORD", &repo.password)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()?;
    let took = start.elapsed();
    if !status.success() {
        return Err(format!("restic {args:?}: {status}").into());
    }
    Ok(took)
}

/// Rewrites 1% of the files (every 100th, starting at `offset`) with new content of the same size.
fn change_one_percent(tree: &Path, sizes: &[u64], round: u64) -> Result<(), BoxError> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED ^ (round + 1));
    for i in (usize::try_from(round % 100).unwrap_or(0)..sizes.len()).step_by(100) {
        write_random(&file_path(tree, i), sizes[i], &mut rng)?;
    }
    Ok(())
}

fn repo_at(dir: &Path) -> Repo {
    Repo::new(dir.to_string_lossy(), PASSWORD)
}

async fn one_round(base: &Path, tree: &Path, sizes: &[u64], round: u64) -> Result<Times, BoxError> {
    let mut t = Times::default();
    let work = base.join(format!("round-{round}"));
    std::fs::create_dir_all(&work)?;
    let direct_cache = work.join("cache-direct");
    let direct_restic = Restic {
        cache_dir: Some(direct_cache.clone()),
        ..Restic::default()
    };
    let shoal = Restic {
        cache_dir: Some(work.join("cache-shoal")),
        ..Restic::default()
    };
    let direct_repo = repo_at(&work.join("repo-direct"));
    let shoal_repo = repo_at(&work.join("repo-shoal"));
    direct_restic.ensure_initialized(&direct_repo).await?;
    shoal.ensure_initialized(&shoal_repo).await?;

    let tree_arg = tree.to_string_lossy().into_owned();
    let backup_args = [
        "backup", "--json", "--host", "bench", "--tag", "bench", "--", &tree_arg,
    ];
    let spec = BackupSpec {
        paths: vec![tree.to_path_buf()],
        host: Some("bench".into()),
        tags: vec!["bench".into()],
        ..BackupSpec::default()
    };
    // Alternate which side goes first, so neither always gets a warmer machine.
    let shoal_first = round % 2 == 1;
    let shoal_backup = |label: &'static str| {
        let shoal = shoal.clone();
        let repo = shoal_repo.clone();
        let spec = spec.clone();
        async move {
            let start = Instant::now();
            let mut reports = 0u32;
            let s = shoal.backup(&repo, &spec, |_| reports += 1).await?;
            let took = start.elapsed();
            eprintln!(
                "  shoal {label}: {:.2}s, {} files, {} MiB added, {reports} progress reports",
                took.as_secs_f64(),
                s.total_files_processed,
                s.data_added >> 20
            );
            Ok::<_, BoxError>((took, s.snapshot_id))
        }
    };
    let (df, (sf, _)) = if shoal_first {
        let s = shoal_backup("first").await?;
        (
            direct(&direct_restic, &direct_repo, &direct_cache, &backup_args)?,
            s,
        )
    } else {
        let d = direct(&direct_restic, &direct_repo, &direct_cache, &backup_args)?;
        (d, shoal_backup("first").await?)
    };
    t.direct_first = df;
    t.shoal_first = sf;
    eprintln!("  direct first: {:.2}s", df.as_secs_f64());

    change_one_percent(tree, sizes, round)?;
    let (di, (si, snapshot)) = if shoal_first {
        let s = shoal_backup("incremental").await?;
        (
            direct(&direct_restic, &direct_repo, &direct_cache, &backup_args)?,
            s,
        )
    } else {
        let d = direct(&direct_restic, &direct_repo, &direct_cache, &backup_args)?;
        (d, shoal_backup("incremental").await?)
    };
    t.direct_incr = di;
    t.shoal_incr = si;
    eprintln!("  direct incremental: {:.2}s", di.as_secs_f64());

    // Restore of the whole snapshot.
    let direct_target = work.join("restore-direct");
    let direct_target_arg = direct_target.to_string_lossy().into_owned();
    t.direct_restore = direct(
        &direct_restic,
        &direct_repo,
        &direct_cache,
        &["restore", "latest", "--target", &direct_target_arg],
    )?;
    std::fs::remove_dir_all(&direct_target)?;
    let shoal_target = work.join("restore-shoal");
    let start = Instant::now();
    shoal
        .restore(&shoal_repo, &snapshot, &[], &shoal_target)
        .await?;
    t.shoal_restore = start.elapsed();
    std::fs::remove_dir_all(&shoal_target)?;
    eprintln!(
        "  restore: direct {:.2}s, shoal {:.2}s",
        t.direct_restore.as_secs_f64(),
        t.shoal_restore.as_secs_f64()
    );

    // Verification, as the agent runs it after a backup.
    let start = Instant::now();
    let entries = shoal.ls(&shoal_repo, &snapshot).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED ^ 0xfeed ^ round);
    let sample = sample_files(&entries, 64, &mut rng);
    let hashes = record_hashes(&sample).await;
    t.ls_sample_hash = start.elapsed();
    let start = Instant::now();
    let v = shoal
        .verify_sample(&shoal_repo, &snapshot, &hashes, &work.join("scratch"))
        .await?;
    t.verify_sample = start.elapsed();
    t.sample_bytes = v.bytes;
    if !v.ok() || v.checked != 64 {
        return Err(format!(
            "verification failed: {} checked, {:?}",
            v.checked, v.mismatches
        )
        .into());
    }
    let start = Instant::now();
    let check = shoal.check(&shoal_repo, Some((1, 7))).await?;
    t.check_subset = start.elapsed();
    if !check.ok {
        return Err(format!("check failed: {:?}", check.errors).into());
    }
    eprintln!(
        "  verify: ls+sample+hash {:.2}s, verify_sample(64) {:.2}s, check 1/7 {:.2}s",
        t.ls_sample_hash.as_secs_f64(),
        t.verify_sample.as_secs_f64(),
        t.check_subset.as_secs_f64()
    );
    std::fs::remove_dir_all(&work)?;
    Ok(t)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn children_max_rss_kib() -> i64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map(|u| u.max_rss())
        .unwrap_or(-1)
}

fn own_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

async fn run(args: Args) -> Result<(), BoxError> {
    let restic = Restic::default();
    let version = restic.version().await?;
    let base = match &args.dir {
        Some(d) => d.clone(),
        None => {
            let shm = Path::new("/dev/shm");
            let root = if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            };
            root.join(format!("shoal-backup-bench-{}", std::process::id()))
        }
    };
    let tree = base.join("tree");
    eprintln!("building 1 GiB in {FILES} files under {}", tree.display());
    let start = Instant::now();
    let sizes = build_tree(&tree)?;
    eprintln!("  built in {:.1}s", start.elapsed().as_secs_f64());

    let mut rounds = Vec::new();
    let mut rss_after_backups = 0;
    for round in 0..args.repeat {
        eprintln!("round {} of {}", round + 1, args.repeat);
        let t = one_round(&base, &tree, &sizes, round as u64).await?;
        if round == 0 {
            rss_after_backups = children_max_rss_kib();
        }
        rounds.push(t);
    }
    let children_rss = children_max_rss_kib();
    let own = own_hwm_kib();
    if !args.keep {
        std::fs::remove_dir_all(&base)?;
    }

    let m = |f: fn(&Times) -> Duration| median(rounds.iter().map(f).collect());
    let pct = |shoal: Duration, direct: Duration| {
        (shoal.as_secs_f64() / direct.as_secs_f64() - 1.0) * 100.0
    };
    let (df, sf) = (m(|t| t.direct_first), m(|t| t.shoal_first));
    let (di, si) = (m(|t| t.direct_incr), m(|t| t.shoal_incr));
    let (dr, sr) = (m(|t| t.direct_restore), m(|t| t.shoal_restore));
    let secs = |d: Duration| d.as_secs_f64();
    println!(
        "{}; tree: {FILES} files, 1 GiB, dir {}",
        version.text,
        base.display()
    );
    println!("medians over {} round(s)", args.repeat);
    println!("| step | direct restic | shoal-restic | shoal overhead |");
    println!("|---|---|---|---|");
    println!(
        "| first backup (1 GiB) | {:.2} s | {:.2} s | {:+.1} % |",
        secs(df),
        secs(sf),
        pct(sf, df)
    );
    println!(
        "| incremental backup (1% changed) | {:.2} s | {:.2} s | {:+.1} % |",
        secs(di),
        secs(si),
        pct(si, di)
    );
    println!(
        "| restore whole snapshot | {:.2} s | {:.2} s | {:+.1} % |",
        secs(dr),
        secs(sr),
        pct(sr, dr)
    );
    println!(
        "| ls + sample 64 + hash live files | | {:.2} s | |",
        secs(m(|t| t.ls_sample_hash))
    );
    println!(
        "| verify_sample (64 files, {} MiB) | | {:.2} s | |",
        rounds[0].sample_bytes >> 20,
        secs(m(|t| t.verify_sample))
    );
    println!(
        "| check --read-data-subset=1/7 | | {:.2} s | |",
        secs(m(|t| t.check_subset))
    );
    println!(
        "peak RSS: restic children {} MiB (after the first round's backups and restores: {} MiB), \
         bench process (VmHWM) {} MiB",
        children_rss / 1024,
        rss_after_backups / 1024,
        own / 1024
    );
    for (i, t) in rounds.iter().enumerate() {
        println!(
            "round {}: first {:.2}/{:.2} s, incremental {:.2}/{:.2} s, restore {:.2}/{:.2} s \
             (direct/shoal)",
            i + 1,
            secs(t.direct_first),
            secs(t.shoal_first),
            secs(t.direct_incr),
            secs(t.shoal_incr),
            secs(t.direct_restore),
            secs(t.shoal_restore)
        );
    }
    Ok(())
}
