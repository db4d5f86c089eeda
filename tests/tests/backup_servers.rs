//! Host tests of the backup targets the backup tests run (`shoal_tests::backup_servers`): a real
//! S3 object store and a real sftp server, each in a namespace of its own, reached by restic from a
//! third namespace over the test LAN. Each target takes a backup and gives it back, goes down (restic
//! fails and says why) and comes back with its data.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use shoal_tests::backup_servers::{self, Restic, S3Server, SftpServer};
use shoal_tests::testkit::require;
use shoal_tests::{require_host_tests, OrPanic, Topology};

const PASSWORD: &str = "correct horse battery staple";

/// A LAN with the target host `server` and the restic host `client`.
fn lan() -> Result<Topology> {
    let mut t = Topology::new()?;
    t.add_lan("lan", "10.77.41.0/24")?;
    for h in ["server", "client"] {
        t.add_host(h)?;
        t.connect(h, "lan")?;
    }
    Ok(t)
}

/// Files to back up: a small text file and a larger random-ish one in a subdirectory.
fn source_tree(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir.join("sub"))?;
    std::fs::write(dir.join("hello.txt"), "hello from a node\n")?;
    let big: Vec<u8> = (0u32..600_000)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("sub/data.bin"), big)?;
    Ok(())
}

/// `a` and `b` hold the same files with the same contents.
fn same_tree(a: &Path, b: &Path) -> Result<()> {
    for rel in ["hello.txt", "sub/data.bin"] {
        let x = std::fs::read(a.join(rel)).with_context(|| format!("{}", a.join(rel).display()))?;
        let y = std::fs::read(b.join(rel)).with_context(|| format!("{}", b.join(rel).display()))?;
        ensure!(x == y, "{rel} differs after restore");
    }
    Ok(())
}

/// init, backup, snapshots, check with all data read, restore and compare.
fn round_trip(restic: &Restic, work: &Path) -> Result<()> {
    let src = work.join("src");
    source_tree(&src)?;
    let out = restic.run(&["init"])?;
    ensure!(out.contains("created restic repository"), "init: {out}");
    restic.run(&["backup", "--host", "node-1", src.to_str().context("path")?])?;
    let snaps = restic.snapshots()?;
    ensure!(snaps.len() == 1, "one snapshot expected: {snaps:?}");
    ensure!(snaps[0]["hostname"] == "node-1", "{:?}", snaps[0]);
    let check = restic.run(&["check", "--read-data"])?;
    ensure!(check.contains("no errors were found"), "check: {check}");
    let target = work.join("restored");
    restic.run(&[
        "restore",
        "latest",
        "--target",
        target.to_str().context("path")?,
    ])?;
    // restic restores the absolute path under the target.
    let restored = target.join(src.strip_prefix("/").context("absolute")?);
    same_tree(&src, &restored)
}

/// restic fails against a stopped target, and its message says it could not connect (one of
/// `expect`).
fn fails_while_down(restic: &Restic, expect: &[&str]) -> Result<()> {
    let out = restic.output(&["snapshots"])?;
    let text = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "snapshots succeeded against a stopped target"
    );
    ensure!(
        expect.iter().any(|e| text.contains(e)),
        "restic's error names none of {expect:?}: {text}"
    );
    Ok(())
}

#[test]
fn restic_backs_up_to_s3_and_survives_the_server_restarting() {
    require_host_tests!();
    require!(backup_servers::restic());
    let t = lan().or_panic();
    let work = tempfile::tempdir().expect("tempdir");
    let server = t.host("server").or_panic();
    let client = t.host("client").or_panic();
    let mut s3 = require!(S3Server::start(
        server.netns(),
        server.addr().or_panic(),
        &work.path().join("s3-data"),
    ));
    let restic = require!(Restic::new(
        client.netns(),
        &s3.url("backups/node-1"),
        PASSWORD,
        &work.path().join("cache"),
    ))
    .envs(s3.env());

    round_trip(&restic, work.path()).or_panic();
    let blocks = walk_files(s3.data_dir());
    assert!(
        !blocks.is_empty(),
        "no object data under {}",
        s3.data_dir().display()
    );

    s3.stop().or_panic();
    fails_while_down(&restic, &["connection refused"]).or_panic();
    s3.start_again().or_panic();
    let snaps = restic.snapshots().or_panic();
    assert_eq!(
        snaps.len(),
        1,
        "the snapshot survived the restart: {snaps:?}"
    );
    // Pruning lists every pack (the S3 server must list keys recursively, as restic asks).
    std::fs::write(work.path().join("src/new.txt"), "after the restart\n").expect("write");
    let src = work.path().join("src");
    restic
        .run(&["backup", "--host", "node-1", src.to_str().expect("path")])
        .or_panic();
    let pruned = restic
        .run(&["forget", "--keep-last", "1", "--prune"])
        .or_panic();
    assert!(pruned.contains("remove 1 snapshots"), "{pruned}");
    let check = restic.run(&["check", "--read-data"]).or_panic();
    assert!(check.contains("no errors were found"), "{check}");
}

#[test]
fn restic_backs_up_over_sftp_and_survives_the_server_restarting() {
    require_host_tests!();
    require!(backup_servers::restic());
    let t = lan().or_panic();
    let work = tempfile::tempdir().expect("tempdir");
    let server = t.host("server").or_panic();
    let client = t.host("client").or_panic();
    let root = work.path().join("sftp-root");
    let mut sftp = require!(SftpServer::start(
        server.netns(),
        server.addr().or_panic(),
        &root,
    ));
    // What an agent does with the key it receives as a secret.
    let options = sftp
        .write_client_files(&work.path().join("client"))
        .or_panic();
    let repo = root.join("node-1");
    let restic = require!(Restic::new(
        client.netns(),
        &sftp.url(&repo),
        PASSWORD,
        &work.path().join("cache"),
    ))
    .options(options);

    round_trip(&restic, work.path()).or_panic();
    assert!(
        repo.join("config").is_file(),
        "the repository is under the served root"
    );
    assert!(
        sftp.log().contains("Accepted publickey for root"),
        "{}",
        sftp.log()
    );

    sftp.stop().or_panic();
    // ssh's own "Connection refused" is relayed by restic as it comes, so it may miss the exit;
    // restic's fatal error is always there.
    fails_while_down(
        &restic,
        &["Connection refused", "unable to start the sftp session"],
    )
    .or_panic();
    sftp.start_again().or_panic();
    let snaps = restic.snapshots().or_panic();
    assert_eq!(
        snaps.len(),
        1,
        "the snapshot survived the restart: {snaps:?}"
    );
}

/// Every file under `dir`, recursively.
/// Nodes that back up to one new S3 target for the first time at once each create their repository
/// in a bucket that does not exist yet: restic's `init` creates the bucket, and racing `init`s can
/// fail on it. `ensure_initialized` looks again and every node gets its repository.
#[test]
fn nodes_initialising_at_once_under_a_new_bucket_all_get_their_repositories() {
    require_host_tests!();
    let program = require!(backup_servers::restic());
    let t = lan().or_panic();
    let work = tempfile::tempdir().expect("tempdir");
    let server = t.host("server").or_panic();
    let client = t.host("client").or_panic();
    let s3 = require!(S3Server::start(
        server.netns(),
        server.addr().or_panic(),
        &work.path().join("s3-data"),
    ));
    // shoal_restic runs its program as given: a wrapper puts restic in the client's namespace.
    let wrapper = work.path().join("restic-in-client");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n",
            client.netns().name(),
            program.display()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // A few rounds, each on a bucket of its own: the race is a matter of timing.
    for round in 0..3 {
        let base = shoal_restic::Repo {
            env: s3.env(),
            ..shoal_restic::Repo::new(s3.url(&format!("fresh-{round}")), PASSWORD)
        };
        let nodes: Vec<_> = (0..4)
            .map(|i| {
                let repo = shoal_restic::Repo::for_node(&base, &format!("node-{i}")).expect("repo");
                let restic = shoal_restic::Restic {
                    binary: wrapper.clone(),
                    cache_dir: Some(work.path().join(format!("cache-{round}-{i}"))),
                    timeout: Some(std::time::Duration::from_secs(120)),
                };
                (restic, repo)
            })
            .collect();
        let results = rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for (restic, repo) in nodes.clone() {
                set.spawn(async move { (restic.ensure_initialized(&repo).await, repo.url) });
            }
            set.join_all().await
        });
        for (result, url) in results {
            match result {
                Ok(created) => assert!(created, "round {round}: {url} was there already"),
                Err(e) => panic!("round {round}, {url}: {e}"),
            }
        }
        // Every repository opens now: a second call finds it.
        for (restic, repo) in &nodes {
            let created = rt.block_on(restic.ensure_initialized(repo));
            assert!(matches!(created, Ok(false)), "{}: {created:?}", repo.url);
        }
    }
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
