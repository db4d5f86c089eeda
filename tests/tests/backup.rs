//! Backups end to end: a controller and two agents, each in its namespace, back up real data with
//! restic to two real targets in namespaces of their own — an S3 object store (Garage) and an sftp
//! server (Debian's sshd) — and every backup is proven restorable.
//!
//! One fleet, in order: both nodes back up to both targets and verify; a changed file is restored
//! in its old and its new version; retention keeps exactly the newest two; a damaged pack on one
//! target fails verification there and only there, visibly in `backup list` and `report`; a target
//! that is down fails its run while the other succeeds; a run killed with its node leaves the
//! repository usable and the next run clears the stale lock and succeeds.

use std::{path::Path, time::Duration};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use shoal_tests::{
    backup_servers::{self, S3Server, SftpServer},
    fleet::{Fleet, FleetConfig},
    require_host_tests,
    testkit::require,
    wait::eventually,
    OrPanic,
};

const PASSWORD: &str = "correct horse battery staple";

fn rows(fleet: &Fleet) -> Result<Vec<Value>> {
    let v = fleet.ctl_json(&["backup", "list"])?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn row<'a>(rows: &'a [Value], node: &str, target: &str) -> Option<&'a Value> {
    rows.iter()
        .find(|r| r["node"] == node && r["target"] == target)
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// Waits until every (node, target) has a last task newer than `before` (its id differs), and
/// returns the rows.
fn wait_task_done(
    fleet: &Fleet,
    nodes: &[&str],
    before: &[(String, String)],
    what: &str,
) -> Result<Vec<Value>> {
    eventually(Duration::from_secs(180), what, || {
        let rows = rows(fleet)?;
        for n in nodes {
            let r = rows
                .iter()
                .find(|r| r["node"] == *n)
                .context("no row for node")?;
            ensure!(
                r["running"].is_null(),
                "{n} still running: {}",
                r["running"]
            );
            let task = s(&r["last_task"]["task"]);
            ensure!(!task.is_empty(), "{n}: no task finished yet");
            ensure!(
                !before.iter().any(|(bn, bt)| bn == *n && *bt == task),
                "{n}: no new task yet"
            );
        }
        Ok(rows)
    })
}

fn last_tasks(fleet: &Fleet) -> Result<Vec<(String, String)>> {
    Ok(rows(fleet)?
        .iter()
        .map(|r| (s(&r["node"]), s(&r["last_task"]["task"])))
        .collect())
}

/// `n` files of 48 MiB of random bytes, `prefix-0`..: work that takes restic a while.
fn random_files(dir: &Path, prefix: &str, n: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for i in 0..n {
        let mut f = std::fs::File::create(dir.join(format!("{prefix}-{i}")))?;
        let mut urandom = std::fs::File::open("/dev/urandom")?;
        std::io::copy(&mut std::io::Read::take(&mut urandom, 48 << 20), &mut f)?;
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| path.display().to_string())
}

/// Overwrites a stretch in the middle of every pack of a restic repository on disk.
fn damage_packs(repo: &Path) -> Result<usize> {
    let mut n = 0;
    for sub in std::fs::read_dir(repo.join("data")).context("data dir")? {
        for pack in std::fs::read_dir(sub?.path())? {
            let path = pack?.path();
            let mut bytes = std::fs::read(&path)?;
            let mid = bytes.len() / 2;
            for b in bytes.iter_mut().skip(mid).take(64) {
                *b ^= 0x5a;
            }
            std::fs::write(&path, bytes)?;
            n += 1;
        }
    }
    Ok(n)
}

#[test]
fn two_agents_back_up_to_s3_and_sftp_and_every_backup_is_proven_restorable() {
    require_host_tests!();
    require!(backup_servers::restic());
    let mut cfg = FleetConfig::fast().agents(2);
    // The controller backs itself up to the sftp target every minute, keeping two.
    let dr_dir = tempfile::tempdir().context("tmp").or_panic();
    let dr_pass = dr_dir.path().join("dr-passphrase");
    std::fs::write(&dr_pass, "a long controller passphrase\n")
        .context("write")
        .or_panic();
    cfg.controller_args = vec![
        "--backup-tick".into(),
        "1s".into(),
        "--dr-target".into(),
        "nas".into(),
        "--dr-schedule".into(),
        "* * * * *".into(),
        "--dr-keep".into(),
        "2".into(),
        "--dr-passphrase-file".into(),
        dr_pass.display().to_string(),
    ];
    // Restores in this test go under /tmp (the fleet's directory).
    cfg.agent_args = vec!["--allow-restore-to".into(), "/tmp".into()];
    let mut fleet = Fleet::start(cfg).or_panic();
    let work = fleet.dir().join("backup-test");
    std::fs::create_dir_all(&work)
        .context("work dir")
        .or_panic();

    // The targets, each on a host of its own on the fleet's LAN.
    let lan = fleet.lan_name();
    let topo = fleet.topology_mut();
    topo.add_host("s3").or_panic();
    let s3_if = topo.connect("s3", lan).or_panic();
    topo.add_host("nas").or_panic();
    let nas_if = topo.connect("nas", lan).or_panic();
    let s3_ns = topo.host("s3").or_panic().netns();
    let nas_ns = topo.host("nas").or_panic().netns();
    let mut s3 = require!(S3Server::start(s3_ns, s3_if.addr, &work.join("s3-data")));
    let nas_root = work.join("nas");
    let mut nas = require!(SftpServer::start(nas_ns, nas_if.addr, &nas_root));
    scenario(&mut fleet, &mut s3, &mut nas, &work, &nas_root).or_panic();
}

fn scenario(
    fleet: &mut Fleet,
    s3: &mut S3Server,
    nas: &mut SftpServer,
    work: &Path,
    nas_root: &Path,
) -> Result<()> {
    let pw = work.join("password");
    write(&pw, PASSWORD)?;
    let key = work.join("id");
    std::fs::write(&key, nas.client_key())?;
    let kh = work.join("known_hosts");
    write(&kh, nas.known_hosts())?;
    let env: Vec<String> = s3.env().iter().map(|(k, v)| format!("{k}={v}")).collect();
    let pw_s = pw.to_str().context("path")?;
    let mut add_s3 = vec!["backup", "target", "add", "s3", "", "--password-file", pw_s];
    let s3_url = s3.url("shoal");
    add_s3[4] = &s3_url;
    for e in &env {
        add_s3.extend(["--env", e.as_str()]);
    }
    fleet.ctl_ok(&add_s3)?;
    let nas_url = nas.url(&nas_root.join("repos"));
    fleet.ctl_ok(&[
        "backup",
        "target",
        "add",
        "nas",
        &nas_url,
        "--password-file",
        pw_s,
        "--ssh-key",
        key.to_str().context("path")?,
        "--ssh-known-hosts",
        kh.to_str().context("path")?,
    ])?;
    // sftp without known_hosts is refused: agents never accept an unknown host key.
    let refused = fleet.ctl(&[
        "backup",
        "target",
        "add",
        "bad",
        &nas_url,
        "--password-file",
        pw_s,
    ])?;
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("known-hosts")
    );
    let listed = fleet.ctl_json(&["backup", "target", "list"])?;
    assert!(
        !listed.to_string().contains(PASSWORD),
        "a secret in target list: {listed}"
    );

    // The data both nodes back up (one filesystem: the namespaces share it).
    let data = work.join("data");
    std::fs::create_dir_all(data.join("db"))?;
    write(&data.join("db/users.txt"), "alice\nbob\n")?;
    for i in 0..40 {
        let body: String = (0..2000)
            .map(|j| char::from(b'a' + ((i * 7 + j) % 26) as u8))
            .collect();
        write(&data.join(format!("file-{i}.txt")), &body)?;
    }
    let data_s = data.to_str().context("path")?;
    fleet.ctl_ok(&[
        "backup",
        "job",
        "create",
        "home",
        "--path",
        data_s,
        "--schedule",
        "0 3 * * *",
        "--target",
        "s3",
        "--target",
        "nas",
        "--keep-last",
        "2",
        "--check-period",
        "1",
        "--sample-files",
        "8",
    ])?;
    let n1 = fleet.node_id(0)?;
    let n2 = fleet.node_id(1)?;
    let nodes = [n1.as_str(), n2.as_str()];

    // 1. Both nodes, both targets, verified.
    let before = last_tasks(fleet)?;
    fleet.ctl_ok(&["backup", "run", "home"])?;
    let rows1 = wait_task_done(fleet, &nodes, &before, "first backups")?;
    for n in nodes {
        for t in ["s3", "nas"] {
            let r = row(&rows1, n, t).context("row")?;
            assert!(r["last_error"].is_null(), "{n}/{t}: {r}");
            assert_eq!(r["verification"], "passed", "{n}/{t}: {r}");
            assert!(
                r["verified_files"].as_u64().unwrap_or(0) >= 1,
                "{n}/{t}: {r}"
            );
            assert_eq!(r["check_subset"], "1/1", "{n}/{t}: {r}");
            assert_eq!(
                r["snapshots"].as_array().map(Vec::len),
                Some(1),
                "{n}/{t}: {r}"
            );
        }
    }
    let first = s(&row(&rows1, &n1, "nas").context("row")?["last_snapshot"]);

    // 2. A changed file, backed up again: both versions restore.
    write(&data.join("db/users.txt"), "alice\nbob\ncarol\n")?;
    let before = last_tasks(fleet)?;
    fleet.ctl_ok(&["backup", "run", "home", "--node", "agent-1"])?;
    let rows2 = wait_task_done(fleet, &[&n1], &before, "second backup")?;
    let second = s(&row(&rows2, &n1, "nas").context("row")?["last_snapshot"]);
    assert_ne!(first, second);
    let users = data.join("db/users.txt");
    let users_s = users.to_str().context("path")?;
    for (snap, dir, want) in [
        (&first, "r-old", "alice\nbob\n"),
        (&second, "r-new", "alice\nbob\ncarol\n"),
    ] {
        let to = work.join(dir);
        fleet.ctl_ok(&[
            "backup",
            "restore",
            "home",
            "--node",
            "agent-1",
            "--target",
            "nas",
            "--snapshot",
            snap,
            "--path",
            users_s,
            "--to",
            to.to_str().context("path")?,
            "--timeout",
            "2m",
        ])?;
        let restored = to.join(users.strip_prefix("/")?);
        assert_eq!(std::fs::read_to_string(&restored)?, want);
    }
    // A restore goes only where the agent allows it.
    let refused = fleet.ctl(&[
        "backup",
        "restore",
        "home",
        "--node",
        "agent-1",
        "--to",
        "/root/.ssh-shoal-test",
        "--timeout",
        "2m",
    ])?;
    ensure!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stdout).contains("allow-restore-to"),
        "a restore outside --allow-restore-to: {refused:?}"
    );
    ensure!(!Path::new("/root/.ssh-shoal-test").exists());
    // A restore never overwrites: a non-empty directory is refused.
    let refused = fleet.ctl(&[
        "backup",
        "restore",
        "home",
        "--node",
        "agent-1",
        "--to",
        data_s,
        "--timeout",
        "2m",
    ])?;
    assert!(
        !refused.status.success(),
        "restore into a non-empty dir succeeded"
    );

    // 3. Retention: a third backup leaves exactly the newest two.
    let before = last_tasks(fleet)?;
    fleet.ctl_ok(&["backup", "run", "home", "--node", "agent-1"])?;
    let rows3 = wait_task_done(fleet, &[&n1], &before, "third backup")?;
    for t in ["s3", "nas"] {
        let r = row(&rows3, &n1, t).context("row")?;
        let third = s(&r["last_snapshot"]);
        let ids: Vec<String> = r["snapshots"]
            .as_array()
            .context("array")?
            .iter()
            .map(|x| s(&x["id"]))
            .collect();
        assert_eq!(ids.len(), 2, "{t}: {ids:?}");
        assert!(
            !ids.iter().any(|i| i.starts_with(&first)),
            "{t}: the oldest survived: {ids:?}"
        );
        assert!(
            ids.iter().any(|i| i.starts_with(&third)),
            "{t}: the newest is gone: {ids:?}"
        );
        assert_eq!(
            r["last_forgotten"].as_array().map(Vec::len),
            Some(1),
            "{t}: {r}"
        );
    }

    // 4. A damaged pack on one target: verification fails there, and only there.
    let damaged = damage_packs(&nas_root.join("repos").join(&n1))?;
    assert!(damaged > 0);
    let before = last_tasks(fleet)?;
    fleet.ctl_ok(&["backup", "verify", "home"])?;
    let rows4 = wait_task_done(fleet, &nodes, &before, "verification")?;
    let bad = row(&rows4, &n1, "nas").context("row")?;
    assert_eq!(bad["verification"], "failed", "{bad}");
    for (n, t) in [(&n1, "s3"), (&n2, "nas"), (&n2, "s3")] {
        assert_eq!(
            row(&rows4, n, t).context("row")?["verification"],
            "passed",
            "{n}/{t}"
        );
    }
    let report = fleet.report()?;
    let lines: Vec<Value> = report["backups"]
        .as_array()
        .context("array")?
        .iter()
        .filter(|l| l["job"] == "home")
        .cloned()
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["node"], n1.as_str());
    let why = lines[0]["reasons"].to_string();
    assert!(
        why.contains("target nas") && why.contains("verification"),
        "{why}"
    );
    let text = fleet.ctl_ok(&["report"])?;
    assert!(
        text.contains("home") && text.contains("target nas"),
        "{text}"
    );

    // 5. A target that is down fails its run; the other succeeds.
    s3.stop()?;
    let before = last_tasks(fleet)?;
    fleet.ctl_ok(&["backup", "run", "home", "--node", "agent-2"])?;
    let rows5 = wait_task_done(fleet, &[&n2], &before, "backup with s3 down")?;
    let down = row(&rows5, &n2, "s3").context("row")?;
    assert!(!down["last_error"].is_null(), "{down}");
    let up = row(&rows5, &n2, "nas").context("row")?;
    assert!(up["last_error"].is_null(), "{up}");
    assert_ne!(
        up["last_snapshot"],
        row(&rows4, &n2, "nas").context("row")?["last_snapshot"]
    );
    let report = fleet.report()?;
    assert!(
        report["backups"].to_string().contains("target s3"),
        "{}",
        report["backups"]
    );
    let events = fleet.events()?;
    assert!(events
        .iter()
        .any(|e| e["kind"] == "backup_failed" && e["message"].to_string().contains("s3")));
    s3.start_again()?;

    // 6. A run killed with its node: the repository stays usable, the next run succeeds.
    let big = data.join("big");
    random_files(&big, "blob", 6)?;
    let before = last_tasks(fleet)?;
    fleet.ctl_ok(&["backup", "run", "home", "--node", "agent-2"])?;
    let agent_ns = fleet.agents()[1].netns.clone();
    let restic_in_ns = || {
        shoal_tests::netns::namespace_pids(&agent_ns)
            .into_iter()
            .any(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| {
                        let c = String::from_utf8_lossy(&c).into_owned();
                        c.contains("restic") && c.contains("\0backup\0")
                    })
                    .unwrap_or(false)
            })
    };
    let restic_started = || {
        eventually(
            Duration::from_secs(60),
            "restic backing up on agent-2",
            || {
                ensure!(restic_in_ns(), "no restic backup yet");
                Ok(())
            },
        )
    };
    // Killed while restic holds a lock in the sftp repository (the job's second target): the
    // lock file is on disk there, so the node dies mid-write, not between two commands.
    let nas_locks = nas_root.join("repos").join(&n2).join("locks");
    eventually(
        Duration::from_secs(120),
        "agent-2's backup holding a lock on nas",
        || {
            ensure!(restic_in_ns(), "restic not running");
            let n = std::fs::read_dir(&nas_locks)
                .map(|d| d.count())
                .unwrap_or(0);
            ensure!(n >= 1, "no lock in {}", nas_locks.display());
            Ok(())
        },
    )?;
    // The node dies: every process in its namespace, agent and restic alike, and all are gone
    // (reaped) before it boots again.
    let mut killed = vec![];
    eventually(Duration::from_secs(10), "agent-2's processes gone", || {
        let pids = shoal_tests::netns::namespace_pids(&agent_ns);
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        killed.extend(pids.iter().copied());
        // Gone: no /proc entry, or a zombie of ours (the agent, reaped when it restarts).
        let ours = std::process::id().to_string();
        let gone = |p: &i32| match std::fs::read_to_string(format!("/proc/{p}/stat")) {
            Err(_) => true,
            Ok(stat) => {
                let fields: Vec<&str> = stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                fields.first() == Some(&"Z") && fields.get(1) == Some(&ours.as_str())
            }
        };
        let left: Vec<String> = killed
            .iter()
            .filter(|p| !gone(p))
            .map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default())
            .collect();
        ensure!(left.is_empty(), "still there: {left:?}");
        Ok(())
    })?;
    fleet.agent(1).proc.restart()?;
    let rows6 = wait_task_done(fleet, &[&n2], &before, "backup after the kill")?;
    let cleared: u64 = ["s3", "nas"]
        .iter()
        .map(|t| {
            row(&rows6, &n2, t)
                .and_then(|r| r["last_stale_locks_cleared"].as_u64())
                .unwrap_or(0)
        })
        .sum();
    for t in ["s3", "nas"] {
        let r = row(&rows6, &n2, t).context("row")?;
        assert!(r["last_error"].is_null(), "{t}: {r}");
        assert_eq!(r["verification"], "passed", "{t}: {r}");
    }
    assert!(cleared >= 1, "no stale lock was cleared: {rows6:?}");

    // 6b. The controller goes down while a run is in progress: the node finishes the run, keeps the
    // result, and reports it when the controller is back.
    random_files(&big, "more", 4)?;
    let kept = fleet.agents()[1].state_dir.join("backup").join("results");
    let before = last_tasks(fleet)?;
    fleet.ctl_ok(&["backup", "run", "home", "--node", "agent-2"])?;
    restic_started()?;
    fleet.controller().stop(Duration::from_secs(5))?;
    eventually(
        Duration::from_secs(240),
        "the node finishes the run and keeps its result",
        || {
            let n = std::fs::read_dir(&kept).map(|d| d.count()).unwrap_or(0);
            ensure!(n >= 1, "no kept result in {}", kept.display());
            Ok(())
        },
    )?;
    fleet.controller().restart()?;
    fleet.wait_controller_ready()?;
    let rows6b = wait_task_done(
        fleet,
        &[&n2],
        &before,
        "the result reported after the restart",
    )?;
    for t in ["s3", "nas"] {
        let r = row(&rows6b, &n2, t).context("row")?;
        ensure!(
            r["last_error"].is_null() && r["verification"] == "passed",
            "{t}: {r}"
        );
    }
    eventually(
        Duration::from_secs(30),
        "the acknowledged result forgotten by the node",
        || {
            let n = std::fs::read_dir(&kept).map(|d| d.count()).unwrap_or(0);
            ensure!(n == 0, "{n} results still kept");
            Ok(())
        },
    )?;

    // 7. The controller's own scheduled backup reached the sftp target and was verified.
    eventually(
        Duration::from_secs(150),
        "a verified controller backup",
        || {
            let events = fleet.events()?;
            ensure!(
                events.iter().any(|e| e["kind"] == "backup_verified"
                    && e["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains("controller backup written to nas")),
                "no verified controller backup yet"
            );
            Ok(())
        },
    )?;
    let dr_snapshots = nas_root
        .join("repos")
        .join("shoal-controller")
        .join("snapshots");
    ensure!(
        std::fs::read_dir(&dr_snapshots)?.count() >= 1,
        "no snapshot in {}",
        dr_snapshots.display()
    );
    let report = fleet.report()?;
    ensure!(
        !report["backups"].to_string().contains("controller-backup"),
        "a controller backup failure still reported: {}",
        report["backups"]
    );
    Ok(())
}
