//! A fleet: one controller and N agents, each in its own network namespace on one LAN, driven with
//! `shoalctl`.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use tempfile::TempDir;

use crate::bins::Bins;
use crate::netns::{NatMode, Topology};
use crate::process::{describe_status, dump_logs, output_with_timeout, Proc, ProcSpec};
use crate::wait::{abort, eventually};

/// UDP port of the controller's QUIC endpoint.
pub const CONTROLLER_PORT: u16 = 7440;
/// TCP port of the controller's admin API (HTTPS).
pub const API_PORT: u16 = 7441;
/// How long one `shoalctl` invocation may take before it is killed.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(30);
/// Environment variable: when set (non-empty), a fleet's temporary directory (data dirs, logs) is
/// kept.
pub const KEEP_ENV: &str = "SHOAL_KEEP_LOGS";

const LAN: &str = "lan";
const CONTROLLER_HOST: &str = "controller";

/// How a [`Fleet`] is set up. Every field has a default (see [`FleetConfig::fast`]).
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Agents started (and, with `wait_up`, awaited) by [`Fleet::start`]. Default 3.
    pub agents: usize,
    /// The LAN's subnet; the controller gets `.1`, agents the following addresses. Default
    /// `10.77.1.0/24`. Subnets of different fleets may overlap: each LAN lives in namespaces of its
    /// own.
    pub subnet: String,
    /// `--heartbeat-interval` for the controller, or `None` for its built-in default. Default `1s`.
    pub heartbeat_interval: Option<String>,
    /// `--down-after` for the controller, or `None` for its built-in default. Default 3.
    pub down_after: Option<u32>,
    /// `--health-interval` for agents, or `None` for their built-in default. Default `1s`.
    pub health_interval: Option<String>,
    /// Prefix of agents' machine ids: `<prefix>-agent-<n>`. Default `test`.
    pub machine_id_prefix: String,
    /// Whether [`Fleet::start`] waits until every agent's node is "up". Default true.
    pub wait_up: bool,
    /// Deadline for the controller to answer and for the agents to come up. Default 60 s.
    pub startup_timeout: Duration,
    /// Extra arguments appended to every agent's command line (e.g. `--overlay-cc bbr`). Default
    /// none.
    pub agent_args: Vec<String>,
    /// Extra arguments appended to the controller's `serve` command line (e.g. `--release-key F`).
    /// Default none.
    pub controller_args: Vec<String>,
    /// The agent executable to run instead of the located `shoal-agent` (e.g. a copy an update may
    /// replace). Default none.
    pub agent_program: Option<PathBuf>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self::fast()
    }
}

impl FleetConfig {
    /// Three agents, short intervals (heartbeat 1 s, down after 3 missed, health every 1 s).
    pub fn fast() -> Self {
        FleetConfig {
            agents: 3,
            subnet: "10.77.1.0/24".into(),
            heartbeat_interval: Some("1s".into()),
            down_after: Some(3),
            health_interval: Some("1s".into()),
            machine_id_prefix: "test".into(),
            wait_up: true,
            startup_timeout: Duration::from_secs(60),
            agent_args: Vec::new(),
            controller_args: Vec::new(),
            agent_program: None,
        }
    }

    /// Three agents on the binaries' built-in defaults (no timing flags).
    pub fn embedded_defaults() -> Self {
        FleetConfig {
            heartbeat_interval: None,
            down_after: None,
            health_interval: None,
            ..Self::fast()
        }
    }

    /// With `n` agents started by [`Fleet::start`].
    pub fn agents(mut self, n: usize) -> Self {
        self.agents = n;
        self
    }

    /// The time after which a silent node must be "down": heartbeat × down-after (defaults 1 s ×
    /// 3).
    pub fn down_window(&self) -> Duration {
        let hb = self
            .heartbeat_interval
            .as_deref()
            .and_then(|s| humantime::parse_duration(s).ok())
            .unwrap_or(Duration::from_secs(1));
        hb * self.down_after.unwrap_or(3)
    }
}

/// One agent of a fleet: its host (namespace), identity and process.
#[derive(Debug)]
pub struct Agent {
    /// 1-based number, as in its names.
    pub number: usize,
    /// Host name in the topology, and the hostname the agent sees (`agent-<n>`).
    pub hostname: String,
    /// Its namespace.
    pub netns: String,
    /// `--machine-id`.
    pub machine_id: String,
    /// Its address on the LAN.
    pub addr: Ipv4Addr,
    /// Its interface on the LAN (inside its namespace).
    pub iface: String,
    /// That interface's MAC.
    pub mac: String,
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// The agent process.
    pub proc: Proc,
}

/// A controller and its agents, each in a namespace of its own on one LAN. `Drop` kills every
/// process, prints all logs if the thread is panicking, and deletes the namespaces.
#[derive(Debug)]
pub struct Fleet {
    cfg: FleetConfig,
    bins: Bins,
    agents: Vec<Agent>,
    controller: Proc,
    controller_ns: String,
    controller_addr: Ipv4Addr,
    data_dir: PathBuf,
    ctl_log: PathBuf,
    topo: Topology,
    dir: Option<TempDir>,
    dump_on_drop: bool,
}

impl Fleet {
    /// Builds the LAN, starts the controller and waits until its admin API answers, then starts
    /// `cfg.agents` agents with one join token and (if `cfg.wait_up`) waits until all are "up".
    /// On failure every log is printed before the error is returned.
    pub fn start(cfg: FleetConfig) -> Result<Fleet> {
        let bins = Bins::locate()?;
        let dir = tempfile::Builder::new()
            .prefix("shoal-test-")
            .tempdir()
            .context("tempdir")?;
        let mut topo = Topology::new()?;
        topo.add_lan(LAN, &cfg.subnet)?;
        topo.add_host(CONTROLLER_HOST)?;
        let iface = topo.connect(CONTROLLER_HOST, LAN)?;
        let controller_ns = topo.host(CONTROLLER_HOST)?.ns_name().to_string();
        let data_dir = dir.path().join("controller");
        std::fs::create_dir_all(&data_dir)?;
        let mut spec = ProcSpec::new("controller", &bins.controller, dir.path().join("logs"))
            .netns(&controller_ns)
            .env("RUST_BACKTRACE", "1")
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen")
            .arg(SocketAddr::from((iface.addr, CONTROLLER_PORT)).to_string())
            .arg("--api")
            .arg(SocketAddr::from((iface.addr, API_PORT)).to_string());
        if let Some(hb) = &cfg.heartbeat_interval {
            spec = spec.arg("--heartbeat-interval").arg(hb);
        }
        if let Some(n) = cfg.down_after {
            spec = spec.arg("--down-after").arg(n.to_string());
        }
        spec = spec.args(&cfg.controller_args);
        let controller = spec.spawn()?;
        let mut fleet = Fleet {
            ctl_log: dir.path().join("logs").join("shoalctl.log"),
            cfg,
            bins,
            agents: Vec::new(),
            controller,
            controller_ns,
            controller_addr: iface.addr,
            data_dir,
            topo,
            dir: Some(dir),
            dump_on_drop: false,
        };
        match fleet.boot() {
            Ok(()) => Ok(fleet),
            Err(e) => {
                fleet.dump_on_drop = true;
                Err(e)
            }
        }
    }

    fn boot(&mut self) -> Result<()> {
        self.wait_controller_ready()?;
        if self.cfg.agents > 0 {
            let token =
                self.create_token(&["--ttl", "1h", "--uses", &self.cfg.agents.to_string()])?;
            for _ in 0..self.cfg.agents {
                self.add_agent(&token)?;
            }
            if self.cfg.wait_up {
                self.wait_all_up(self.cfg.startup_timeout)?;
            }
        }
        Ok(())
    }

    /// The configuration, to change how agents added from now on start (`agent_program`,
    /// `agent_args`).
    pub fn config_mut(&mut self) -> &mut FleetConfig {
        &mut self.cfg
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &FleetConfig {
        &self.cfg
    }

    /// The binaries it runs.
    pub fn bins(&self) -> &Bins {
        &self.bins
    }

    /// The topology (to cut hosts off, add hosts…).
    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// The topology, to add hosts (servers the agents reach) to the fleet's LAN.
    pub fn topology_mut(&mut self) -> &mut Topology {
        &mut self.topo
    }

    /// The name of the fleet's LAN in [`Fleet::topology`].
    pub fn lan_name(&self) -> &'static str {
        LAN
    }

    /// The controller's QUIC address.
    pub fn controller_addr(&self) -> SocketAddr {
        SocketAddr::from((self.controller_addr, CONTROLLER_PORT))
    }

    /// The controller's admin API address.
    pub fn api_addr(&self) -> SocketAddr {
        SocketAddr::from((self.controller_addr, API_PORT))
    }

    /// The controller's `--data-dir`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Points the controller at another data dir from its next (re)start on (a restored backup);
    /// [`Fleet::admin_conf`] follows.
    pub fn use_data_dir(&mut self, dir: PathBuf) {
        self.controller
            .set_arg("--data-dir", &dir.display().to_string());
        self.data_dir = dir;
    }

    /// `<data-dir>/admin.conf`, written by the controller on first start.
    pub fn admin_conf(&self) -> PathBuf {
        self.data_dir.join("admin.conf")
    }

    /// The namespace the controller (and `shoalctl`) runs in.
    pub fn controller_ns(&self) -> &str {
        &self.controller_ns
    }

    /// The controller process (to kill, restart…).
    pub fn controller(&mut self) -> &mut Proc {
        &mut self.controller
    }

    /// The agents, in the order they were added.
    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    /// Agent `i` (0-based index into [`Fleet::agents`]).
    pub fn agent(&mut self, i: usize) -> &mut Agent {
        &mut self.agents[i]
    }

    /// The per-fleet temporary directory (data dirs, state dirs, logs).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(TempDir::path)
            .unwrap_or(Path::new("/nonexistent"))
    }

    /// Waits until `admin.conf` exists and `shoalctl nodes list` succeeds; aborts if the controller
    /// exits.
    pub fn wait_controller_ready(&mut self) -> Result<()> {
        let timeout = self.cfg.startup_timeout;
        eventually(
            timeout,
            "the controller's admin API to answer `shoalctl nodes list`",
            || {
                if let Err(e) = self.controller.ensure_running() {
                    return Err(abort(format!("{e:#}")));
                }
                ensure!(
                    self.admin_conf().is_file(),
                    "{} does not exist yet",
                    self.admin_conf().display()
                );
                self.ctl_ok(&["nodes", "list", "-o", "json"]).map(drop)
            },
        )
    }

    /// Runs `shoalctl --config <admin.conf> ARGS…` inside the controller's namespace.
    pub fn ctl(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.controller_ns])
            .arg(&self.bins.ctl)
            .arg("--config")
            .arg(self.admin_conf())
            .args(args);
        let out = output_with_timeout(&mut cmd, CTL_TIMEOUT);
        self.log_ctl(args, &out);
        out
    }

    fn log_ctl(&self, args: &[&str], out: &Result<Output>) {
        let Ok(mut f) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.ctl_log)
        else {
            return;
        };
        let stamp = humantime::format_rfc3339_millis(SystemTime::now());
        let _ = match out {
            Ok(o) => writeln!(
                f,
                "{stamp} $ shoalctl {}\n  -> {}\n  stdout: {}\n  stderr: {}",
                args.join(" "),
                describe_status(&o.status),
                truncate(&String::from_utf8_lossy(&o.stdout), 1500),
                truncate(&String::from_utf8_lossy(&o.stderr), 1500),
            ),
            Err(e) => writeln!(
                f,
                "{stamp} $ shoalctl {}\n  -> error: {e:#}",
                args.join(" ")
            ),
        };
    }

    /// [`Fleet::ctl`], an error unless it exits 0 (with its stderr); stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctl(args)?;
        if !out.status.success() {
            bail!(
                "`shoalctl {}` failed ({}): {}{}",
                args.join(" "),
                describe_status(&out.status),
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `shoalctl ARGS… -o json`, parsed.
    pub fn ctl_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.ctl_ok(&all)?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "`shoalctl {}` printed invalid JSON: {}",
                all.join(" "),
                truncate(&text, 2000)
            )
        })
    }

    /// `GET <path>` on the admin API, for routes `shoalctl` has no command for (`/v1/refusals`):
    /// `curl` inside the controller's namespace with admin.conf's token and CA, as an operator
    /// would script it; the JSON answer.
    pub fn api_json(&self, path: &str) -> Result<Value> {
        let conf = self.admin_conf();
        let text = std::fs::read_to_string(&conf)
            .with_context(|| format!("cannot read {}", conf.display()))?;
        let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name));
        let token = field("token = ")
            .map(|t| t.trim().trim_matches('"'))
            .with_context(|| format!("no token in {}", conf.display()))?;
        let api = field("api = ")
            .map(|t| t.trim().trim_matches('"'))
            .with_context(|| format!("no api in {}", conf.display()))?;
        // The CA is a TOML multi-line basic string; a PEM needs only its \r and \n escapes undone.
        let ca = text
            .split_once("ca = \"\"\"")
            .and_then(|(_, rest)| rest.split_once("\"\"\""))
            .map(|(pem, _)| pem.trim_start().replace("\\r", "").replace("\\n", "\n"))
            .with_context(|| format!("no ca in {}", conf.display()))?;
        let ca_file = self.dir().join("api-ca.pem");
        std::fs::write(&ca_file, ca)?;
        let mut cmd = std::process::Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.controller_ns,
            "curl",
            "-sS",
            "--fail",
        ])
        .arg("--cacert")
        .arg(&ca_file)
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("{api}{path}"));
        let out = output_with_timeout(&mut cmd, CTL_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "curl {api}{path} failed ({}): {}",
            describe_status(&out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "GET {path} returned invalid JSON: {}",
                truncate(&String::from_utf8_lossy(&out.stdout), 2000)
            )
        })
    }

    /// `shoalctl nodes list -o json`.
    pub fn nodes(&self) -> Result<Vec<Value>> {
        as_array(self.ctl_json(&["nodes", "list"])?, "nodes list")
    }

    /// The whole event log, oldest first: `shoalctl events -o json`, then `--after SEQ` for the
    /// next page until one comes back empty (the API returns at most 1000 events per call).
    pub fn events(&self) -> Result<Vec<Value>> {
        let mut all = as_array(self.ctl_json(&["events"])?, "events")?;
        while let Some(last) = all.last().and_then(|e| e["seq"].as_u64()) {
            let page = as_array(
                self.ctl_json(&["events", "--after", &last.to_string()])?,
                "events",
            )?;
            if page.is_empty() {
                break;
            }
            all.extend(page);
        }
        Ok(all)
    }

    /// `shoalctl report -o json`.
    pub fn report(&self) -> Result<Value> {
        self.ctl_json(&["report"])
    }

    /// `shoalctl token create ARGS…`: the token (stdout must be exactly one non-empty line).
    pub fn create_token(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["token", "create"];
        all.extend_from_slice(args);
        let out = self.ctl_ok(&all)?;
        let token = out.trim();
        ensure!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "`shoalctl {}` should print only the token, printed {out:?}",
            all.join(" ")
        );
        Ok(token.to_string())
    }

    /// Adds a host on the LAN and starts an agent there with `token`; the agent's index.
    pub fn add_agent(&mut self, token: &str) -> Result<usize> {
        self.add_agent_on(token, LAN)
    }

    /// Adds an agent behind a NAT router of its own (`nat-<n>`, private LAN `lan-<n>`,
    /// 10.200.n.0/24) whose public side is on the fleet's LAN, where the controller is.
    pub fn add_agent_behind_nat(&mut self, token: &str, mode: NatMode) -> Result<usize> {
        let number = self.agents.len() + 1;
        let (router, lan) = (format!("nat-{number}"), format!("lan-{number}"));
        self.topo
            .add_nat_router(&router, LAN, &lan, &format!("10.200.{number}.0/24"), mode)?;
        self.add_agent_on(token, &lan)
    }

    /// Adds an agent on LAN `lan` of the topology.
    pub fn add_agent_on(&mut self, token: &str, lan: &str) -> Result<usize> {
        self.add_agent_as(token, lan, None)
    }

    /// Adds an agent on the fleet's LAN, in a host of its own, that claims `machine_id` (another
    /// agent's, for an impostor).
    pub fn add_agent_claiming(&mut self, token: &str, machine_id: &str) -> Result<usize> {
        self.add_agent_as(token, LAN, Some(machine_id))
    }

    fn add_agent_as(&mut self, token: &str, lan: &str, claimed: Option<&str>) -> Result<usize> {
        let number = self.agents.len() + 1;
        let hostname = format!("agent-{number}");
        self.topo.add_host(&hostname)?;
        let iface = self.topo.connect(&hostname, lan)?;
        let netns = self.topo.host(&hostname)?.ns_name().to_string();
        let state_dir = self.dir().join(&hostname);
        std::fs::create_dir_all(&state_dir)?;
        let machine_id = claimed
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}-agent-{number}", self.cfg.machine_id_prefix));
        let program = self
            .cfg
            .agent_program
            .clone()
            .unwrap_or_else(|| self.bins.agent.clone());
        let mut spec = ProcSpec::new(&hostname, &program, self.dir().join("logs"))
            .netns(&netns)
            .hostname(&hostname)
            .env("RUST_BACKTRACE", "1")
            .arg("--controller")
            .arg(self.controller_addr().to_string())
            .arg("--token")
            .arg(token)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--machine-id")
            .arg(&machine_id);
        if let Some(h) = &self.cfg.health_interval {
            spec = spec.arg("--health-interval").arg(h);
        }
        spec = spec.args(&self.cfg.agent_args);
        let proc = spec.spawn()?;
        self.agents.push(Agent {
            number,
            hostname,
            netns,
            machine_id,
            addr: iface.addr,
            iface: iface.name,
            mac: iface.mac,
            state_dir,
            proc,
        });
        Ok(self.agents.len() - 1)
    }

    /// The node of agent `i` in `nodes`: the one with its hostname or with its MAC among its NICs.
    pub fn node_of<'a>(&self, i: usize, nodes: &'a [Value]) -> Option<&'a Value> {
        let a = &self.agents[i];
        nodes
            .iter()
            .find(|n| n["hostname"].as_str() == Some(a.hostname.as_str()) || has_mac(n, &a.mac))
    }

    /// The id of agent `i`'s node (an error while it has none).
    pub fn node_id(&self, i: usize) -> Result<String> {
        let nodes = self.nodes()?;
        let node = self.node_of(i, &nodes).ok_or_else(|| {
            anyhow!(
                "no node for {} in {}",
                self.agents[i].hostname,
                brief(&nodes)
            )
        })?;
        node_id(node)
    }

    /// Waits until every agent whose process is running has an "up" node; aborts if the controller
    /// or an agent exits.
    pub fn wait_all_up(&mut self, timeout: Duration) -> Result<()> {
        eventually(timeout, "every agent's node to be \"up\"", || {
            self.check_running().map_err(|e| abort(format!("{e:#}")))?;
            let nodes = self.nodes()?;
            for i in 0..self.agents.len() {
                let a = &self.agents[i];
                match self.node_of(i, &nodes) {
                    Some(n) if n["status"] == "up" => {}
                    Some(n) => bail!(
                        "{}'s node is {}: {}",
                        a.hostname,
                        n["status"],
                        brief(&nodes)
                    ),
                    None => bail!("{} has no node yet: {}", a.hostname, brief(&nodes)),
                }
            }
            Ok(())
        })
    }

    /// Cuts agent `i`'s host off the LAN (its cable pulled); the process keeps running.
    pub fn cut_agent(&self, i: usize) -> Result<()> {
        self.topo.cut(&self.agents[i].hostname, LAN)
    }

    /// Plugs agent `i`'s host back in.
    pub fn restore_agent(&self, i: usize) -> Result<()> {
        self.topo.restore(&self.agents[i].hostname, LAN)
    }

    /// An error if the controller or any agent has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.controller.ensure_running()?;
        for a in &mut self.agents {
            a.proc.ensure_running()?;
        }
        Ok(())
    }

    /// Prints every log (controller, agents, shoalctl invocations) to stderr.
    pub fn dump_logs(&self) {
        let mut logs: Vec<(&str, &Path)> =
            vec![(self.controller.name(), self.controller.log_path())];
        logs.extend(
            self.agents
                .iter()
                .map(|a| (a.proc.name(), a.proc.log_path())),
        );
        logs.push(("shoalctl invocations", &self.ctl_log));
        dump_logs(logs);
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.proc.kill();
        }
        let _ = self.controller.kill();
        if std::thread::panicking() || self.dump_on_drop {
            self.dump_logs();
        }
        let keep = std::env::var_os(KEEP_ENV).is_some_and(|v| !v.is_empty());
        if keep || std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let path = dir.keep();
                eprintln!("[shoal-tests] fleet files kept in {}", path.display());
            }
        }
        // Then the fields drop: processes (already dead), the topology (namespaces), the directory.
    }
}

/// A node's `id` as a string.
pub fn node_id(node: &Value) -> Result<String> {
    match &node["id"] {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => bail!("node has no id: {other} in {node}"),
    }
}

/// Whether `node.inventory.nics` has a NIC with MAC `mac` (case-insensitive).
pub fn has_mac(node: &Value, mac: &str) -> bool {
    node["inventory"]["nics"].as_array().is_some_and(|nics| {
        nics.iter().any(|n| {
            n["mac"]
                .as_str()
                .is_some_and(|m| m.eq_ignore_ascii_case(mac))
        })
    })
}

/// A JSON array's elements, or an error naming what was expected.
pub fn as_array(v: Value, what: &str) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        other => bail!(
            "`{what}` should be a JSON array, got {}",
            truncate(&other.to_string(), 2000)
        ),
    }
}

/// A one-line summary of nodes: `[id hostname status, …]`.
pub fn brief(nodes: &[Value]) -> String {
    let items: Vec<String> = nodes
        .iter()
        .map(|n| format!("{} {} {}", n["id"], n["hostname"], n["status"]))
        .collect();
    format!("[{}]", items.join(", "))
}

/// Parses an RFC 3339 timestamp (`Z` or a numeric offset, optional fraction).
pub fn parse_time(s: &str) -> Result<SystemTime> {
    let s = s.trim();
    let bad = || anyhow!("not an RFC 3339 timestamp: {s:?}");
    if let Some(rest) = s.strip_suffix('Z').or_else(|| s.strip_suffix('z')) {
        return humantime::parse_rfc3339_weak(rest).map_err(|_| bad());
    }
    // Offset ±HH:MM after the time.
    ensure!(s.len() > 6, bad());
    let (base, off) = s.split_at(s.len() - 6);
    let sign = match off.as_bytes()[0] {
        b'+' => 1i64,
        b'-' => -1i64,
        _ => return Err(bad()),
    };
    let hh: i64 = off[1..3].parse().map_err(|_| bad())?;
    let mm: i64 = off[4..6].parse().map_err(|_| bad())?;
    let local = humantime::parse_rfc3339_weak(base).map_err(|_| bad())?;
    let shift = Duration::from_secs(u64::try_from((hh * 60 + mm) * 60).map_err(|_| bad())?);
    Ok(if sign > 0 {
        local - shift
    } else {
        local + shift
    })
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} bytes]", &s[..end], s.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_timestamps() {
        let z = parse_time("2026-11-23T10:00:00Z").expect("Z");
        assert_eq!(
            parse_time("2026-11-23T10:00:00.250Z").expect("fraction"),
            z + Duration::from_millis(250)
        );
        assert_eq!(parse_time("2026-11-23T11:00:00+01:00").expect("+01:00"), z);
        assert_eq!(parse_time("2026-11-23T09:30:00-00:30").expect("-00:30"), z);
        assert_eq!(parse_time("2026-11-23T10:00:00+00:00").expect("+00:00"), z);
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn finds_nodes_by_mac() {
        let n = json!({"id": "n1", "inventory": {"nics": [{"name": "eth0", "mac": "AA:bb:cc:dd:ee:ff"}]}});
        assert!(has_mac(&n, "aa:bb:cc:dd:ee:ff"));
        assert!(!has_mac(&n, "aa:bb:cc:dd:ee:00"));
        assert!(!has_mac(&json!({"inventory": null}), "aa:bb:cc:dd:ee:ff"));
        assert_eq!(node_id(&n).expect("id"), "n1");
        assert_eq!(brief(&[n]), r#"["n1" null null]"#);
    }

    #[test]
    fn down_window_follows_flags() {
        assert_eq!(FleetConfig::fast().down_window(), Duration::from_secs(3));
        let c = FleetConfig {
            heartbeat_interval: Some("500ms".into()),
            down_after: Some(4),
            ..FleetConfig::fast()
        };
        assert_eq!(c.down_window(), Duration::from_secs(2));
    }
}
