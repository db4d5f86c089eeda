//! A fresh Debian system booted with systemd, for the install test: a minimal rootfs made with
//! `debootstrap` from the mirror apt uses (cached under the target dir, so only the first run
//! downloads), copied per test and booted with `systemd-nspawn -b` in a network namespace of its own
//! (only loopback). Commands run inside with `nsenter` into the container's init.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use shoal_testkit::{cmd, eventually};

/// The Debian packages the rootfs gets beyond `minbase`: systemd as init.
const INCLUDE: &str = "systemd,systemd-sysv,dbus";

/// `(mirror, suite)` of the host's Debian: the first main-archive source apt uses (deb822 or
/// one-line format), and the release codename; `deb.debian.org` when none is found.
pub fn host_mirror() -> Result<(String, String)> {
    let os = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    let suite = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_owned())
        .filter(|s| !s.is_empty())
        .context("no VERSION_CODENAME in /etc/os-release (not Debian?)")?;
    let mut sources = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        sources.extend(more);
    }
    for path in sources {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            let uri = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|w| w.contains("://"))
            } else {
                None
            };
            if let Some(uri) = uri.filter(|u| u.trim_end_matches('/').ends_with("/debian")) {
                return Ok((uri.to_owned(), suite));
            }
        }
    }
    Ok(("http://deb.debian.org/debian".to_owned(), suite))
}

/// The cached rootfs `cache/<suite>`, made with debootstrap if missing (into a temporary
/// directory renamed when complete, so an interrupted run leaves no half rootfs behind).
pub fn cached_rootfs(cache: &Path) -> Result<PathBuf> {
    let (mirror, suite) = host_mirror()?;
    let root = cache.join(&suite);
    if root.join("usr/lib/systemd/systemd").exists() {
        return Ok(root);
    }
    std::fs::create_dir_all(cache)?;
    let tmp = cache.join(format!("{suite}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    eprintln!(
        "debootstrap {suite} from {mirror} into {} (first run only)",
        root.display()
    );
    let out = cmd::output_with_timeout(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={INCLUDE}"), &suite])
            .arg(&tmp)
            .arg(&mirror),
        Duration::from_secs(1200),
    )?;
    cmd::check("debootstrap", &out)?;
    std::fs::rename(&tmp, &root)?;
    Ok(root)
}

/// A booted container. Dropping it powers it off (and kills it if that hangs) and removes its
/// root.
#[derive(Debug)]
pub struct Machine {
    nspawn: Child,
    init: u32,
    root: PathBuf,
    name: String,
}

impl Machine {
    /// Copies `rootfs` to `root` and boots it: own network namespace (loopback only), `/dev/net/tun`
    /// bound in. Waits until systemd says the system is up.
    pub fn boot(rootfs: &Path, root: &Path, name: &str) -> Result<Machine> {
        if root.exists() {
            std::fs::remove_dir_all(root)?;
        }
        cmd::run(
            Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(rootfs)
                .arg(root),
        )?;
        // A stale propagation dir of an earlier run with this name makes nspawn refuse to start.
        let _ = std::fs::remove_dir_all(Path::new("/run/systemd/nspawn/propagate").join(name));
        let log = std::fs::File::create(root.with_extension("console.log"))?;
        let nspawn = Command::new("systemd-nspawn")
            .args([
                "--quiet",
                "--register=no",
                "--keep-unit",
                "--private-network",
            ])
            .arg(format!("--machine={name}"))
            .arg("--bind=/dev/net/tun")
            .arg("--console=pipe")
            .arg("-D")
            .arg(root)
            .arg("-b")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting systemd-nspawn")?;
        let mut machine = Machine {
            init: 0,
            nspawn,
            root: root.to_owned(),
            name: name.to_owned(),
        };
        let nspawn_pid = machine.nspawn.id();
        machine.init = eventually(Duration::from_secs(30), "the container's init", || {
            if let Ok(Some(status)) = machine.nspawn.try_wait() {
                return Err(shoal_testkit::abort(format!(
                    "systemd-nspawn exited ({status}): see {}",
                    machine.root.with_extension("console.log").display()
                )));
            }
            // nspawn's child is the container's PID 1 (systemd).
            let children =
                std::fs::read_to_string(format!("/proc/{nspawn_pid}/task/{nspawn_pid}/children"))?;
            let pid: u32 = children
                .split_whitespace()
                .next()
                .context("no child yet")?
                .parse()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))?;
            ensure!(comm.trim() == "systemd", "PID 1 is still {comm:?}");
            Ok(pid)
        })?;
        eventually(Duration::from_secs(60), "the container's boot", || {
            let state = machine.sh("systemctl is-system-running || true")?;
            match state.trim() {
                "running" => Ok(()),
                // Units of the minimal system that fail in a container (none so far) do not stop
                // the test; it says which.
                "degraded" => {
                    let failed = machine.sh("systemctl --failed --no-legend --plain || true")?;
                    eprintln!("container booted degraded: {}", failed.trim());
                    Ok(())
                }
                other => bail!("system is {other}"),
            }
        })?;
        Ok(machine)
    }

    /// The container's root directory as the host sees it.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Runs `script` with `sh -c` inside the container (all its namespaces, its root); its stdout,
    /// or an error with its output unless it exits 0.
    pub fn sh(&self, script: &str) -> Result<String> {
        let out = self.sh_output(script)?;
        cmd::check(&format!("in {}: {script}", self.name), &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// [`Machine::sh`] with the exit status the caller's to judge.
    pub fn sh_output(&self, script: &str) -> Result<std::process::Output> {
        cmd::output_with_timeout(
            Command::new("nsenter")
                .arg("-t")
                .arg(self.init.to_string())
                .args(["-a", "/usr/bin/env", "-i"])
                .arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
                .args(["/bin/sh", "-c", script]),
            Duration::from_secs(120),
        )
    }

    /// Writes a file inside the container (as the host, through its root).
    pub fn write(&self, path: &str, content: &str) -> Result<()> {
        let host = self.root.join(path.trim_start_matches('/'));
        std::fs::write(&host, content).with_context(|| format!("writing {}", host.display()))
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.sh_output("systemctl poweroff --no-block");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Ok(None) = self.nspawn.try_wait() {
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        let _ = std::fs::remove_dir_all(&self.root);
        let _ =
            std::fs::remove_dir_all(Path::new("/run/systemd/nspawn/propagate").join(&self.name));
        // The console log stays only when the test failed.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(self.root.with_extension("console.log"));
        }
    }
}
