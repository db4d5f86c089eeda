//! A highly available fleet: an etcd cluster (each member in a namespace of its own), several
//! controllers on it (each in its own namespace), and agents that know every controller — all on
//! one LAN, with `shoalctl` pointed at any controller.
//!
//! The first controller creates the fleet (CA, admin credential, secrets key); the others get those
//! files copied into their data dirs before they start, as the operators' guide says.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use tempfile::TempDir;

use crate::bins::Bins;
use crate::fleet::{as_array, API_PORT, CONTROLLER_PORT, CTL_TIMEOUT, KEEP_ENV};
use crate::netns::Topology;
use crate::process::{describe_status, dump_logs, output_with_timeout, Proc, ProcSpec};
use crate::wait::{abort, eventually};

const LAN: &str = "lan";
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
/// The etcd binary (Debian `etcd-server`).
pub const ETCD: &str = "/usr/bin/etcd";

/// How an [`HaFleet`] is set up.
#[derive(Debug, Clone)]
pub struct HaConfig {
    /// etcd members (default 3).
    pub etcd_members: usize,
    /// Controllers (default 3).
    pub controllers: usize,
    /// Agents (default 0), each told every controller.
    pub agents: usize,
    /// Extra `serve` arguments for every controller.
    pub controller_args: Vec<String>,
    /// Extra agent arguments.
    pub agent_args: Vec<String>,
    /// Deadline for start-up steps (default 60 s).
    pub startup_timeout: Duration,
}

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig {
            etcd_members: 3,
            controllers: 3,
            agents: 0,
            controller_args: vec![
                "--heartbeat-interval".into(),
                "1s".into(),
                "--down-after".into(),
                "3".into(),
            ],
            agent_args: vec!["--health-interval".into(), "1s".into()],
            startup_timeout: Duration::from_secs(60),
        }
    }
}

/// One etcd member.
#[derive(Debug)]
pub struct EtcdMember {
    /// Its name (`e<i>`).
    pub name: String,
    /// Its namespace.
    pub netns: String,
    /// Its address.
    pub addr: Ipv4Addr,
    /// The process.
    pub proc: Proc,
}

/// One controller.
#[derive(Debug)]
pub struct HaController {
    /// Host name in the topology (`ctl-<i>`).
    pub host: String,
    /// Its namespace.
    pub netns: String,
    /// Its address.
    pub addr: Ipv4Addr,
    /// `--data-dir`.
    pub data_dir: PathBuf,
    /// An admin.conf pointed at this controller's API.
    pub admin_conf: PathBuf,
    /// The process.
    pub proc: Proc,
}

/// One agent.
#[derive(Debug)]
pub struct HaAgent {
    /// Host name (`agent-<n>`).
    pub hostname: String,
    /// Its namespace.
    pub netns: String,
    /// Its address.
    pub addr: Ipv4Addr,
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// The process.
    pub proc: Proc,
}

/// etcd members, controllers and agents on one LAN. `Drop` kills every process and prints every
/// log if the thread is panicking.
#[derive(Debug)]
pub struct HaFleet {
    cfg: HaConfig,
    bins: Bins,
    topo: Topology,
    /// The etcd members.
    pub etcd: Vec<EtcdMember>,
    /// The controllers.
    pub controllers: Vec<HaController>,
    /// The agents.
    pub agents: Vec<HaAgent>,
    dir: Option<TempDir>,
}

impl HaFleet {
    /// Starts the etcd cluster, the controllers (the first alone, the others with its shared
    /// files) and the agents, and waits until every controller answers and every agent is up.
    pub fn start(cfg: HaConfig) -> Result<HaFleet> {
        let bins = Bins::locate()?;
        let dir = tempfile::Builder::new()
            .prefix("shoal-ha-")
            .tempdir()
            .context("tempdir")?;
        let mut topo = Topology::new()?;
        topo.add_lan(LAN, "10.78.1.0/24")?;
        let mut fleet = HaFleet {
            cfg,
            bins,
            topo,
            etcd: Vec::new(),
            controllers: Vec::new(),
            agents: Vec::new(),
            dir: Some(dir),
        };
        match fleet.boot() {
            Ok(()) => Ok(fleet),
            Err(e) => {
                fleet.dump_logs();
                Err(e)
            }
        }
    }

    fn logs(&self) -> PathBuf {
        self.dir().join("logs")
    }

    /// The fleet's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(TempDir::path)
            .unwrap_or(Path::new("/nonexistent"))
    }

    fn boot(&mut self) -> Result<()> {
        let n = self.cfg.etcd_members;
        let mut cluster = Vec::new();
        for i in 0..n {
            let host = format!("etcd-{i}");
            self.topo.add_host(&host)?;
            let addr = Ipv4Addr::new(10, 78, 1, 11 + i as u8);
            self.topo.connect_with_addr(&host, LAN, addr)?;
            cluster.push(format!("e{i}=http://{addr}:{ETCD_PEER_PORT}"));
        }
        let cluster = cluster.join(",");
        for i in 0..n {
            let host = format!("etcd-{i}");
            let netns = self.topo.host(&host)?.ns_name().to_string();
            let addr = Ipv4Addr::new(10, 78, 1, 11 + i as u8);
            let data = self.dir().join(&host);
            let proc = ProcSpec::new(&host, ETCD, self.logs())
                .netns(&netns)
                .args([
                    "--name".to_string(),
                    format!("e{i}"),
                    "--data-dir".into(),
                    data.display().to_string(),
                    "--listen-client-urls".into(),
                    format!("http://{addr}:{ETCD_CLIENT_PORT}"),
                    "--advertise-client-urls".into(),
                    format!("http://{addr}:{ETCD_CLIENT_PORT}"),
                    "--listen-peer-urls".into(),
                    format!("http://{addr}:{ETCD_PEER_PORT}"),
                    "--initial-advertise-peer-urls".into(),
                    format!("http://{addr}:{ETCD_PEER_PORT}"),
                    "--initial-cluster".into(),
                    cluster.clone(),
                    "--initial-cluster-state".into(),
                    "new".into(),
                    "--initial-cluster-token".into(),
                    "shoal-ha-test".into(),
                    "--heartbeat-interval".into(),
                    "100".into(),
                    "--election-timeout".into(),
                    "1000".into(),
                    "--max-txn-ops".into(),
                    "4096".into(),
                    "--logger".into(),
                    "zap".into(),
                    "--log-level".into(),
                    "warn".into(),
                ])
                .spawn()?;
            self.etcd.push(EtcdMember {
                name: format!("e{i}"),
                netns,
                addr,
                proc,
            });
        }
        for i in 0..self.cfg.controllers {
            self.add_controller(i)?;
            if i == 0 {
                self.wait_controller_ready(0)?;
            }
        }
        for i in 1..self.cfg.controllers {
            self.wait_controller_ready(i)?;
        }
        if self.cfg.agents > 0 {
            let token = self.ctl_ok(
                0,
                &[
                    "token",
                    "create",
                    "--ttl",
                    "1h",
                    "--uses",
                    &self.cfg.agents.to_string(),
                ],
            )?;
            for _ in 0..self.cfg.agents {
                self.add_agent(token.trim())?;
            }
            self.wait_agents_up(self.cfg.startup_timeout)?;
        }
        Ok(())
    }

    /// `--etcd-endpoints` for controllers.
    pub fn etcd_endpoints(&self) -> String {
        self.etcd
            .iter()
            .map(|m| format!("http://{}:{ETCD_CLIENT_PORT}", m.addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn add_controller(&mut self, i: usize) -> Result<()> {
        let host = format!("ctl-{i}");
        self.topo.add_host(&host)?;
        let addr = Ipv4Addr::new(10, 78, 1, 1 + i as u8);
        self.topo.connect_with_addr(&host, LAN, addr)?;
        let netns = self.topo.host(&host)?.ns_name().to_string();
        let data_dir = self.dir().join(&host);
        std::fs::create_dir_all(&data_dir)?;
        if i > 0 {
            // Joining the fleet: the shared files come from the first controller.
            let first = &self.controllers[0].data_dir;
            for f in ["ca.crt", "ca.key", "backup-secrets.key", "admin.conf"] {
                std::fs::copy(first.join(f), data_dir.join(f))
                    .with_context(|| format!("copy {f} to {}", data_dir.display()))?;
            }
        }
        let proc = ProcSpec::new(&host, &self.bins.controller, self.logs())
            .netns(&netns)
            .env("RUST_BACKTRACE", "1")
            .env("RUST_LOG", "info,shoal_controller::cluster=debug")
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen")
            .arg(SocketAddr::from((addr, CONTROLLER_PORT)).to_string())
            .arg("--api")
            .arg(SocketAddr::from((addr, API_PORT)).to_string())
            .arg("--etcd-endpoints")
            .arg(self.etcd_endpoints())
            .args(&self.cfg.controller_args)
            .spawn()?;
        let admin_conf = self.dir().join(format!("admin-{host}.conf"));
        self.controllers.push(HaController {
            host,
            netns,
            addr,
            data_dir,
            admin_conf,
            proc,
        });
        Ok(())
    }

    /// Writes controller `i`'s admin.conf (the fleet's credential, its own API address).
    fn write_admin_conf(&self, i: usize) -> Result<()> {
        let c = &self.controllers[i];
        let source = self.controllers[0].data_dir.join("admin.conf");
        let text = std::fs::read_to_string(&source)
            .with_context(|| format!("read {}", source.display()))?;
        let api = format!("https://{}", SocketAddr::from((c.addr, API_PORT)));
        let mut out = String::new();
        for line in text.lines() {
            if line.trim_start().starts_with("api") {
                out.push_str(&format!("api = \"{api}\"\n"));
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        std::fs::write(&c.admin_conf, out)?;
        Ok(())
    }

    /// Waits until controller `i` answers `shoalctl controllers list`.
    pub fn wait_controller_ready(&mut self, i: usize) -> Result<()> {
        let timeout = self.cfg.startup_timeout;
        let conf = self.controllers[0].data_dir.join("admin.conf");
        eventually(timeout, "the controller's admin API to answer", || {
            if let Err(e) = self.controllers[i].proc.ensure_running() {
                return Err(abort(format!("{e:#}")));
            }
            ensure!(conf.is_file(), "{} does not exist yet", conf.display());
            self.write_admin_conf(i)?;
            self.ctl_ok(i, &["controllers", "list", "-o", "json"])
                .map(drop)
        })
    }

    /// Adds an agent host and starts an agent told every controller, starting at a different one
    /// per agent: the agents spread over the controllers as a fleet's would.
    pub fn add_agent(&mut self, token: &str) -> Result<usize> {
        let k = self.controllers.len();
        let first = self.agents.len() % k.max(1);
        let all: Vec<usize> = (0..k).map(|j| (first + j) % k).collect();
        self.add_agent_to(token, &all)
    }

    /// Adds an agent host and starts an agent told only the controllers `controllers` (its
    /// session stays on the first while it lives; it may learn the others from the cluster).
    pub fn add_agent_to(&mut self, token: &str, controllers: &[usize]) -> Result<usize> {
        let number = self.agents.len() + 1;
        let hostname = format!("agent-{number}");
        self.topo.add_host(&hostname)?;
        // Fixed addresses above the controllers' and etcd's: the LAN's automatic ones start at .1,
        // which the first controller has.
        let iface = self.topo.connect_with_addr(
            &hostname,
            LAN,
            Ipv4Addr::new(10, 78, 1, 100 + number as u8),
        )?;
        let netns = self.topo.host(&hostname)?.ns_name().to_string();
        let state_dir = self.dir().join(&hostname);
        std::fs::create_dir_all(&state_dir)?;
        let mut spec = ProcSpec::new(&hostname, &self.bins.agent, self.logs())
            .netns(&netns)
            .hostname(&hostname)
            .env("RUST_BACKTRACE", "1");
        for c in controllers.iter().map(|&i| &self.controllers[i]) {
            spec = spec
                .arg("--controller")
                .arg(SocketAddr::from((c.addr, CONTROLLER_PORT)).to_string());
        }
        let proc = spec
            .arg("--token")
            .arg(token)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--machine-id")
            .arg(format!("ha-agent-{number}"))
            .args(&self.cfg.agent_args)
            .spawn()?;
        self.agents.push(HaAgent {
            hostname,
            netns,
            addr: iface.addr,
            state_dir,
            proc,
        });
        Ok(self.agents.len() - 1)
    }

    /// `shoalctl` against controller `i`.
    pub fn ctl(&self, i: usize, args: &[&str]) -> Result<Output> {
        let c = &self.controllers[i];
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &c.netns])
            .arg(&self.bins.ctl)
            .arg("--config")
            .arg(&c.admin_conf)
            .args(args);
        output_with_timeout(&mut cmd, CTL_TIMEOUT)
    }

    /// [`HaFleet::ctl`], an error unless it exits 0; stdout.
    pub fn ctl_ok(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = self.ctl(i, args)?;
        if !out.status.success() {
            bail!(
                "`shoalctl {}` on {} failed ({}): {}{}",
                args.join(" "),
                self.controllers[i].host,
                describe_status(&out.status),
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `shoalctl ARGS… -o json` against controller `i`, parsed.
    pub fn ctl_json(&self, i: usize, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.ctl_ok(i, &all)?;
        serde_json::from_str(&text).with_context(|| format!("invalid JSON: {text}"))
    }

    /// `shoalctl controllers list` from controller `i`.
    pub fn controllers_view(&self, i: usize) -> Result<Value> {
        self.ctl_json(i, &["controllers", "list"])
    }

    /// The leading controller's index, as controller `asked` sees it (an error while none leads).
    pub fn leader(&self, asked: usize) -> Result<usize> {
        let view = self.controllers_view(asked)?;
        let list = as_array(view["controllers"].clone(), "controllers")?;
        let leaders: Vec<&str> = list
            .iter()
            .filter(|c| c["leader"].as_bool() == Some(true))
            .filter_map(|c| c["id"].as_str())
            .collect();
        ensure!(leaders.len() == 1, "leaders: {leaders:?} in {view}");
        let id = leaders[0];
        self.index_of(id)
            .with_context(|| format!("leader {id} is no controller of this fleet"))
    }

    /// The index of the controller whose id is `id`.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.controllers.iter().position(|c| {
            std::fs::read_to_string(c.data_dir.join("controller.id"))
                .map(|s| s.trim() == id)
                .unwrap_or(false)
        })
    }

    /// Controller `i`'s id.
    pub fn controller_id(&self, i: usize) -> Result<String> {
        Ok(
            std::fs::read_to_string(self.controllers[i].data_dir.join("controller.id"))?
                .trim()
                .to_owned(),
        )
    }

    /// Waits until controller `asked` sees exactly one leader among the running controllers;
    /// returns it and how long it took.
    pub fn wait_leader(
        &mut self,
        asked: usize,
        not: Option<usize>,
        timeout: Duration,
    ) -> Result<(usize, Duration)> {
        let start = Instant::now();
        let mut found = None;
        eventually(timeout, "one controller to lead", || {
            let l = self.leader(asked)?;
            ensure!(Some(l) != not, "controller {l} still leads");
            found = Some(l);
            Ok(())
        })?;
        Ok((found.unwrap_or(0), start.elapsed()))
    }

    /// Waits until every running agent's node is up.
    pub fn wait_agents_up(&mut self, timeout: Duration) -> Result<()> {
        let expected = self.agents.len();
        let ctl = self.any_running_controller()?;
        eventually(timeout, "every agent's node to be up", || {
            let nodes = as_array(self.ctl_json(ctl, &["nodes", "list"])?, "nodes")?;
            let up = nodes
                .iter()
                .filter(|n| n["status"].as_str() == Some("up"))
                .count();
            ensure!(up == expected, "{up} of {expected} up");
            Ok(())
        })
    }

    /// The index of a controller whose process runs.
    pub fn any_running_controller(&mut self) -> Result<usize> {
        (0..self.controllers.len())
            .find(|&i| self.controllers[i].proc.is_running())
            .context("no controller runs")
    }

    /// Cuts controller `i` off from every etcd member (both ways), leaving agents and operators
    /// able to reach it.
    pub fn partition_from_etcd(&self, i: usize) -> Result<()> {
        let c = &self.controllers[i];
        for m in &self.etcd {
            for chain in [["OUTPUT", "-d"], ["INPUT", "-s"]] {
                run_ok(&[
                    "ip",
                    "netns",
                    "exec",
                    &c.netns,
                    "iptables",
                    "-I",
                    chain[0],
                    chain[1],
                    &m.addr.to_string(),
                    "-j",
                    "DROP",
                ])?;
            }
        }
        Ok(())
    }

    /// Undoes [`HaFleet::partition_from_etcd`].
    pub fn heal_from_etcd(&self, i: usize) -> Result<()> {
        let c = &self.controllers[i];
        for m in &self.etcd {
            for chain in [["OUTPUT", "-d"], ["INPUT", "-s"]] {
                run_ok(&[
                    "ip",
                    "netns",
                    "exec",
                    &c.netns,
                    "iptables",
                    "-D",
                    chain[0],
                    chain[1],
                    &m.addr.to_string(),
                    "-j",
                    "DROP",
                ])?;
            }
        }
        Ok(())
    }

    /// Prints every log.
    pub fn dump_logs(&self) {
        let mut logs: Vec<(&str, &Path)> = Vec::new();
        for m in &self.etcd {
            logs.push((m.proc.name(), m.proc.log_path()));
        }
        for c in &self.controllers {
            logs.push((c.proc.name(), c.proc.log_path()));
        }
        for a in &self.agents {
            logs.push((a.proc.name(), a.proc.log_path()));
        }
        dump_logs(logs);
    }
}

fn run_ok(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("run {}", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Drop for HaFleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for a in &mut self.agents {
            let _ = a.proc.kill();
        }
        for c in &mut self.controllers {
            let _ = c.proc.kill();
        }
        for m in &mut self.etcd {
            let _ = m.proc.kill();
        }
        if std::env::var_os(KEEP_ENV).is_some_and(|v| !v.is_empty()) {
            if let Some(dir) = self.dir.take() {
                eprintln!("keeping {}", dir.keep().display());
            }
        }
    }
}
