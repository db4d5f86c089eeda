//! [`EtcdCluster`]: real etcd members for tests, started by the test and killed on drop.
//!
//! Each member runs `/usr/bin/etcd` (Debian `etcd-server`) with its own data directory (on
//! `/dev/shm` when there is one: etcd fsyncs every commit, which tmpfs makes free), short raft
//! timings (`--heartbeat-interval 100 --election-timeout 1000`) and `--max-txn-ops 4096`, the
//! limit shoal's store documents. By default every member listens on loopback on free ports; a
//! host test can instead give each member an address and a command prefix
//! (`ip netns exec NS`) with [`EtcdCluster::start_with`], so members live in network namespaces.
//!
//! Starting waits until every member answers `etcdctl endpoint health`; [`EtcdCluster::kill`]
//! and [`EtcdCluster::restart`] take one member down and up (its data directory kept).

use std::{
    ffi::OsString,
    fs::File,
    net::{IpAddr, Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{cmd, skip, wait::eventually};

/// How long starting (or restarting) waits for members to report healthy.
pub const HEALTHY_WITHIN: Duration = Duration::from_secs(20);

/// Where and how one member runs.
#[derive(Debug, Clone)]
pub struct EtcdMemberSpec {
    /// The address it listens on for clients and peers. Default: 127.0.0.1.
    pub ip: IpAddr,
    /// Its client port; `None` picks a free loopback port. Default: `None`.
    pub client_port: Option<u16>,
    /// Its peer port; `None` picks a free loopback port. Default: `None`.
    pub peer_port: Option<u16>,
    /// Words put before `etcd` (e.g. `["ip", "netns", "exec", "ns1"]`). Default: none.
    pub command_prefix: Vec<OsString>,
}

impl Default for EtcdMemberSpec {
    fn default() -> Self {
        EtcdMemberSpec {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            client_port: None,
            peer_port: None,
            command_prefix: Vec::new(),
        }
    }
}

struct Member {
    name: String,
    ip: IpAddr,
    client_port: u16,
    peer_port: u16,
    prefix: Vec<OsString>,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn client_url(&self) -> String {
        url(self.ip, self.client_port)
    }

    fn peer_url(&self) -> String {
        url(self.ip, self.peer_port)
    }
}

fn url(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("http://{v4}:{port}"),
        IpAddr::V6(v6) => format!("http://[{v6}]:{port}"),
    }
}

/// A running etcd cluster of real members; every member is killed when it is dropped.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

impl EtcdCluster {
    /// Starts `members` members on loopback and waits until all are healthy. Without `etcd` the
    /// error holds a [`skip::Missing`], so `require!(EtcdCluster::start(1))` skips.
    pub fn start(members: usize) -> Result<EtcdCluster> {
        EtcdCluster::start_with(vec![EtcdMemberSpec::default(); members])
    }

    /// Starts one member per spec and waits until all are healthy.
    pub fn start_with(specs: Vec<EtcdMemberSpec>) -> Result<EtcdCluster> {
        skip::tool("etcd", "etcd-server")?;
        skip::tool("etcdctl", "etcd-client")?;
        if specs.is_empty() {
            bail!("an etcd cluster needs at least one member");
        }
        let base = if Path::new("/dev/shm").is_dir() {
            tempfile::Builder::new()
                .prefix("shoal-etcd-")
                .tempdir_in("/dev/shm")
        } else {
            tempfile::Builder::new().prefix("shoal-etcd-").tempdir()
        }
        .context("creating the etcd members' directory")?;
        let mut members = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let name = format!("m{i}");
            members.push(Member {
                data_dir: base.path().join(&name),
                log: base.path().join(format!("{name}.log")),
                name,
                ip: spec.ip,
                client_port: match spec.client_port {
                    Some(p) => p,
                    None => free_port()?,
                },
                peer_port: match spec.peer_port {
                    Some(p) => p,
                    None => free_port()?,
                },
                prefix: spec.command_prefix,
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "shoal-test-{}-{}",
            std::process::id(),
            base.path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            token,
            _dir: base,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i)?;
        }
        cluster.wait_healthy(HEALTHY_WITHIN)?;
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let mut words: Vec<OsString> = m.prefix.clone();
        words.push("etcd".into());
        let mut command = Command::new(&words[0]);
        command
            .args(&words[1..])
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(m.client_url())
            .arg("--advertise-client-urls")
            .arg(m.client_url())
            .arg("--listen-peer-urls")
            .arg(m.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(m.peer_url())
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--initial-cluster-state")
            .arg("new")
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--max-txn-ops", "4096"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null());
        let log = File::options()
            .create(true)
            .append(true)
            .open(&m.log)
            .with_context(|| format!("opening {}", m.log.display()))?;
        command.stdout(log.try_clone()?).stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("starting etcd member {}: {command:?}", m.name))?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Every member's client URL (`http://127.0.0.1:PORT`), killed members included.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].client_url()
    }

    /// How many members the cluster has.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether it has no members (never: starting needs one).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Kills member `i` (SIGKILL) and reaps it; its data directory stays for [`EtcdCluster::restart`].
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data directory and waits until it answers health checks
    /// (which needs a quorum of members running).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i)?;
        let endpoint = self.endpoint(i);
        eventually(
            HEALTHY_WITHIN,
            &format!("etcd member {i} at {endpoint} healthy"),
            || self.check_member(i),
        )
        .with_context(|| self.log_tail(i))
    }

    /// Waits until every running member reports healthy.
    pub fn wait_healthy(&mut self, within: Duration) -> Result<()> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                continue;
            }
            let endpoint = self.endpoint(i);
            eventually(
                within,
                &format!("etcd member {i} at {endpoint} healthy"),
                || self.check_member(i),
            )
            .with_context(|| self.log_tail(i))?;
        }
        Ok(())
    }

    fn check_member(&self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let mut words: Vec<OsString> = m.prefix.clone();
        words.push("etcdctl".into());
        let mut command = Command::new(&words[0]);
        command
            .args(&words[1..])
            .env("ETCDCTL_API", "3")
            .args(["--command-timeout", "1s", "--endpoints"])
            .arg(m.client_url())
            .args(["endpoint", "health"]);
        let out = cmd::output_with_timeout(&mut command, Duration::from_secs(3))?;
        cmd::check(&format!("{command:?}"), &out)
    }

    fn log_tail(&self, i: usize) -> String {
        let m = &self.members[i];
        let text = std::fs::read_to_string(&m.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("etcd member {} log ({}):\n{tail}", m.name, m.log.display())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
