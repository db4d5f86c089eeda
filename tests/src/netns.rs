//! Network namespaces and the topologies built from them.
//!
//! Every namespace this harness creates is named `shl-<pid>-<n>-<role>`: `<pid>` is the test
//! process, `<n>` a per-process counter, so parallel tests (threads or processes) never collide,
//! and a later run can tell a namespace left behind by a process that died (its pid is gone) and
//! sweep it. Interfaces are created directly inside the namespaces (never in the root namespace),
//! so their names only have to be unique per namespace and stay within the kernel's 15-character
//! limit.
//!
//! NAT routers ([`Topology::add_nat_router`]) are hosts with one leg on a "public" LAN and one on a
//! private LAN they create and serve as gateway for; hosts later connected to that private LAN get
//! a default route through it. [`NatMode`] picks the mapping behaviour, and
//! [`Topology::block_udp_between`] cuts direct UDP between two routers mid-flow while both still
//! reach everything else.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use shoal_testkit::cmd::run;

/// Prefix of every namespace the harness creates.
pub const PREFIX: &str = "shl-";

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// A short id unique among all live test processes: `<pid>-<counter>`.
pub fn unique_id() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `ip ARGS…` in the root namespace.
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Names of all network namespaces in `/run/netns`.
pub fn list_namespaces() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Pids of the processes inside namespace `name` (`ip netns pids`).
pub fn namespace_pids(name: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs every process in namespace `name` and waits (≤ 5 s) until none is left.
fn kill_namespace_processes(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = namespace_pids(name);
        if pids.is_empty() || Instant::now() >= deadline {
            return;
        }
        for pid in pids {
            // The process may exit on its own meanwhile; ESRCH is fine.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn delete_namespace(name: &str) {
    kill_namespace_processes(name);
    let _ = Command::new("ip")
        .args(["netns", "delete", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Deletes namespaces left behind by test processes that no longer exist (killed before their
/// `Drop` ran). Runs once per process, before the first namespace is created.
pub fn sweep_stale_namespaces() {
    SWEEP.call_once(|| {
        let me = std::process::id().to_string();
        for name in list_namespaces() {
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            let Some(pid) = rest.split('-').next() else {
                continue;
            };
            if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
                continue;
            }
            if !Path::new("/proc").join(pid).exists() {
                eprintln!("[shoal-tests] deleting stale namespace {name} (its test process {pid} is gone)");
                delete_namespace(&name);
            }
        }
    });
}

/// A network namespace this harness created; `Drop` kills every process inside it and deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` with `lo` up.
    pub fn create(name: &str) -> Result<Self> {
        sweep_stale_namespaces();
        ip(&["netns", "add", name])
            .with_context(|| format!("cannot create network namespace {name}"))?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside this namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `program ARGS…` inside the namespace; an error unless it exits 0. Returns stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        run(self.command(program).args(args))
    }

    /// Pids of the processes inside the namespace.
    pub fn pids(&self) -> Vec<i32> {
        namespace_pids(&self.name)
    }

    /// Runs `f` on a thread that has entered this namespace, so the sockets `f` opens live in it
    /// (and keep living in it when handed back to other threads).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        enter(&self.name, f)
    }

    /// `link show dev IFACE` as JSON.
    fn link_json(&self, iface: &str) -> Result<serde_json::Value> {
        let text = self.ip(&["-j", "link", "show", "dev", iface])?;
        let v: serde_json::Value = serde_json::from_str(&text).context("ip -j link output")?;
        v.get(0)
            .cloned()
            .ok_or_else(|| anyhow!("no link {iface} in {}", self.name))
    }

    /// The MAC address of `iface` inside this namespace (lower-case `aa:bb:…`).
    pub fn mac(&self, iface: &str) -> Result<String> {
        let link = self.link_json(iface)?;
        link["address"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{iface} in {} has no address: {link}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_namespace(&self.name);
    }
}

/// Runs `f` on a thread that has entered namespace `name` ([`Netns::enter`], for a namespace known
/// by name only).
pub fn enter<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = Path::new("/run/netns").join(name);
    let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("cannot enter network namespace {}", path.display()))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("thread inside namespace panicked"))?
    })
}

/// An IPv4 subnet such as `10.77.1.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// The network address.
    pub network: Ipv4Addr,
    /// Prefix length (8..=30).
    pub len: u8,
}

impl Subnet {
    /// Parses `a.b.c.d/len`; host bits must be zero.
    pub fn parse(s: &str) -> Result<Self> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| anyhow!("subnet {s:?} lacks /len"))?;
        let network: Ipv4Addr = addr.parse().with_context(|| format!("subnet {s:?}"))?;
        let len: u8 = len.parse().with_context(|| format!("subnet {s:?}"))?;
        ensure!(
            (8..=30).contains(&len),
            "subnet {s:?}: prefix length must be 8..=30"
        );
        let mask = u32::MAX << (32 - len);
        ensure!(
            u32::from(network) & !mask == 0,
            "subnet {s:?} has host bits set"
        );
        Ok(Subnet { network, len })
    }

    /// The `n`-th host address (1-based); an error past the last usable address.
    pub fn host(&self, n: u32) -> Result<Ipv4Addr> {
        let size = 1u32 << (32 - self.len);
        ensure!(n >= 1 && n < size - 1, "subnet {self} has no host #{n}");
        Ok(Ipv4Addr::from(u32::from(self.network) + n))
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

/// One interface of a host, attached to a LAN.
#[derive(Debug, Clone)]
pub struct Iface {
    /// Name inside the host's namespace (`eth0`, `eth1`, …).
    pub name: String,
    /// The LAN it is plugged into.
    pub lan: String,
    /// Its IPv4 address.
    pub addr: Ipv4Addr,
    /// Its subnet.
    pub subnet: Subnet,
    /// Its MAC address.
    pub mac: String,
    /// The peer end of the veth, a port of the LAN's bridge (inside the LAN's namespace).
    pub bridge_port: String,
}

/// A host: a namespace with interfaces on LANs.
#[derive(Debug)]
pub struct Host {
    name: String,
    netns: Netns,
    ifaces: Vec<Iface>,
}

impl Host {
    /// The host's name within its topology.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The namespace's name.
    pub fn ns_name(&self) -> &str {
        self.netns.name()
    }

    /// Its interfaces, in the order they were connected.
    pub fn ifaces(&self) -> &[Iface] {
        &self.ifaces
    }

    /// Its interface on `lan`.
    pub fn iface_on(&self, lan: &str) -> Result<&Iface> {
        self.ifaces
            .iter()
            .find(|i| i.lan == lan)
            .ok_or_else(|| anyhow!("host {} is not on LAN {lan}", self.name))
    }

    /// The address of its first interface.
    pub fn addr(&self) -> Result<Ipv4Addr> {
        self.ifaces
            .first()
            .map(|i| i.addr)
            .ok_or_else(|| anyhow!("host {} has no interface", self.name))
    }
}

/// A LAN: a bridge `br0` inside its own namespace; hosts attach by veth pairs.
#[derive(Debug)]
pub struct Lan {
    name: String,
    netns: Netns,
    subnet: Subnet,
    next_host: u32,
    gateway: Option<Ipv4Addr>,
}

impl Lan {
    /// The LAN's namespace (holding the bridge).
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Its subnet.
    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The router serving this LAN (a private LAN made by [`Topology::add_nat_router`]): hosts
    /// connected to the LAN get a default route through it.
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.gateway
    }
}

/// How a NAT router maps a private host's UDP source address to a public one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatMode {
    /// `MASQUERADE`: a socket keeps one public mapping (Linux keeps the source port when it is
    /// free) for every destination, so a peer can reach it at the address a third party observed
    /// ("full cone" mapping with address-and-port-dependent filtering, like most home routers).
    EndpointIndependent,
    /// `MASQUERADE --to-ports 20000-20999` for UDP: like [`NatMode::EndpointIndependent`], one
    /// public mapping per socket for every destination, but never on the socket's own port
    /// (Linux takes the lowest port of the range whose tuple is free, and a tuple towards another
    /// destination is always free): peers must use the port someone observed, never the one the
    /// host bound. Meant for a router with one host behind it; several hosts would share ports.
    EndpointIndependentPortChanging,
    /// `MASQUERADE --random-fully`: every new destination gets a new random public port
    /// ("symmetric" NAT); an observed address is useless to other peers, so hole punching needs a
    /// relay or port prediction.
    EndpointDependent,
}

/// A NAT router made by [`Topology::add_nat_router`]; also a [`Host`] of the topology under the
/// same name.
#[derive(Debug, Clone)]
pub struct Router {
    name: String,
    mode: NatMode,
    wan: Iface,
    lan: Iface,
}

impl Router {
    /// Its name (also its host name in the topology).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its mapping behaviour.
    pub fn mode(&self) -> NatMode {
        self.mode
    }

    /// Its interface on the public LAN; `wan().addr` is the address its NATed traffic comes from.
    pub fn wan(&self) -> &Iface {
        &self.wan
    }

    /// Its interface on the private LAN it serves; `lan().addr` is that LAN's gateway.
    pub fn lan(&self) -> &Iface {
        &self.lan
    }

    /// The address NATed traffic comes from: [`Router::wan`]'s.
    pub fn wan_addr(&self) -> Ipv4Addr {
        self.wan.addr
    }
}

/// A set of namespaces (hosts and LANs) torn down together on `Drop`: processes inside are killed,
/// then the namespaces deleted. Addresses exist only inside these namespaces; the root namespace is
/// never touched.
#[derive(Debug)]
pub struct Topology {
    id: String,
    // Hosts before LANs: fields drop in declaration order.
    hosts: BTreeMap<String, Host>,
    lans: BTreeMap<String, Lan>,
    routers: BTreeMap<String, Router>,
}

/// Host and LAN names: short, so that `p-<name>` fits an interface name.
fn check_name(kind: &str, name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= IFNAME_MAX - 2
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
        "{kind} name {name:?} must be 1..={} characters of [A-Za-z0-9-]",
        IFNAME_MAX - 2
    );
    Ok(())
}

impl Topology {
    /// An empty topology with a fresh unique id.
    pub fn new() -> Result<Self> {
        Ok(Topology {
            id: unique_id(),
            hosts: BTreeMap::new(),
            lans: BTreeMap::new(),
            routers: BTreeMap::new(),
        })
    }

    /// The unique id embedded in every namespace name.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn ns_name(&self, role: &str) -> String {
        format!("{PREFIX}{}-{role}", self.id)
    }

    /// Adds a LAN named `name` with subnet `subnet` (e.g. `10.77.1.0/24`).
    pub fn add_lan(&mut self, name: &str, subnet: &str) -> Result<&Lan> {
        check_name("LAN", name)?;
        ensure!(!self.lans.contains_key(name), "LAN {name} exists");
        let subnet = Subnet::parse(subnet)?;
        let netns = Netns::create(&self.ns_name(&format!("l{name}")))?;
        netns.ip(&["link", "add", "br0", "type", "bridge"])?;
        netns.ip(&["link", "set", "br0", "up"])?;
        let lan = Lan {
            name: name.to_string(),
            netns,
            subnet,
            next_host: 1,
            gateway: None,
        };
        Ok(self.lans.entry(name.to_string()).or_insert(lan))
    }

    /// Adds a host (a namespace with only `lo`).
    pub fn add_host(&mut self, name: &str) -> Result<&Host> {
        check_name("host", name)?;
        ensure!(!self.hosts.contains_key(name), "host {name} exists");
        let netns = Netns::create(&self.ns_name(name))?;
        let host = Host {
            name: name.to_string(),
            netns,
            ifaces: Vec::new(),
        };
        Ok(self.hosts.entry(name.to_string()).or_insert(host))
    }

    /// Plugs `host` into `lan` with the LAN's next free address; returns the new interface.
    pub fn connect(&mut self, host: &str, lan: &str) -> Result<Iface> {
        let l = self
            .lans
            .get_mut(lan)
            .ok_or_else(|| anyhow!("no LAN {lan}"))?;
        let addr = l.subnet.host(l.next_host)?;
        l.next_host += 1;
        self.connect_with_addr(host, lan, addr)
    }

    /// Plugs `host` into `lan` with address `addr`; returns the new interface. When the LAN has a
    /// [gateway](Lan::gateway) (other than `host` itself) and `host` has no default route yet, a
    /// default route through the gateway is added, so a host behind a NAT router reaches the public
    /// LAN.
    pub fn connect_with_addr(&mut self, host: &str, lan: &str, addr: Ipv4Addr) -> Result<Iface> {
        let l = self.lans.get(lan).ok_or_else(|| anyhow!("no LAN {lan}"))?;
        let h = self
            .hosts
            .get(host)
            .ok_or_else(|| anyhow!("no host {host}"))?;
        ensure!(
            h.iface_on(lan).is_err(),
            "host {host} is already on LAN {lan}"
        );
        let iface = format!("eth{}", h.ifaces.len());
        let port = format!("p-{host}");
        l.netns.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            &iface,
            "netns",
            h.netns.name(),
        ])?;
        l.netns.ip(&["link", "set", &port, "master", "br0", "up"])?;
        let cidr = format!("{addr}/{}", l.subnet.len);
        h.netns.ip(&["addr", "add", &cidr, "dev", &iface])?;
        h.netns.ip(&["link", "set", &iface, "up"])?;
        if let Some(gw) = l.gateway.filter(|gw| *gw != addr) {
            if h.netns
                .ip(&["-4", "route", "show", "default"])?
                .trim()
                .is_empty()
            {
                h.netns.ip(&[
                    "route",
                    "add",
                    "default",
                    "via",
                    &gw.to_string(),
                    "dev",
                    &iface,
                ])?;
            }
        }
        let mac = h.netns.mac(&iface)?;
        let new = Iface {
            name: iface,
            lan: lan.to_string(),
            addr,
            subnet: l.subnet,
            mac,
            bridge_port: port,
        };
        let h = self
            .hosts
            .get_mut(host)
            .ok_or_else(|| anyhow!("no host {host}"))?;
        h.ifaces.push(new.clone());
        Ok(new)
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> Result<&Host> {
        self.hosts
            .get(name)
            .ok_or_else(|| anyhow!("no host {name}"))
    }

    /// The LAN named `name`.
    pub fn lan(&self, name: &str) -> Result<&Lan> {
        self.lans.get(name).ok_or_else(|| anyhow!("no LAN {name}"))
    }

    /// Names of all namespaces of this topology.
    pub fn namespaces(&self) -> Vec<String> {
        self.hosts
            .values()
            .map(|h| h.ns_name().to_string())
            .chain(self.lans.values().map(|l| l.netns.name().to_string()))
            .collect()
    }

    fn bridge_port(&self, host: &str, lan: &str) -> Result<(&Lan, String)> {
        let h = self.host(host)?;
        let port = h.iface_on(lan)?.bridge_port.clone();
        Ok((self.lan(lan)?, port))
    }

    /// Cuts `host` off `lan`, as if its cable were pulled: the bridge side of its veth goes down.
    pub fn cut(&self, host: &str, lan: &str) -> Result<()> {
        let (l, port) = self.bridge_port(host, lan)?;
        l.netns.ip(&["link", "set", &port, "down"])?;
        Ok(())
    }

    /// Undoes [`Topology::cut`].
    pub fn restore(&self, host: &str, lan: &str) -> Result<()> {
        let (l, port) = self.bridge_port(host, lan)?;
        l.netns.ip(&["link", "set", &port, "up"])?;
        Ok(())
    }

    /// Adds a NAT router `name`: a host plugged into the existing (public) LAN `wan_lan` with that
    /// LAN's next free address, and into a new private LAN `lan_name` (`lan_subnet`) as its first
    /// address and gateway. IPv4 forwarding is on, and traffic leaving through the WAN interface is
    /// masqueraded as `mode` says. Hosts connected to `lan_name` afterwards get a default route
    /// through the router.
    ///
    /// Like a home router, it drops unsolicited UDP addressed to itself on its WAN side (`INPUT`
    /// filter). Besides being realistic, this matters for hole punching: a punch packet that
    /// arrives before the router has the matching mapping is dropped before its conntrack entry is
    /// confirmed, so it cannot hold the reply tuple and push the private host's later mapping onto
    /// another port.
    pub fn add_nat_router(
        &mut self,
        name: &str,
        wan_lan: &str,
        lan_name: &str,
        lan_subnet: &str,
        mode: NatMode,
    ) -> Result<&Router> {
        ensure!(
            self.lans.contains_key(wan_lan),
            "no LAN {wan_lan} for router {name}"
        );
        ensure!(!self.lans.contains_key(lan_name), "LAN {lan_name} exists");
        self.add_host(name)?;
        let wan = self.connect(name, wan_lan)?;
        self.add_lan(lan_name, lan_subnet)?;
        let lan = self.connect(name, lan_name)?;
        let l = self
            .lans
            .get_mut(lan_name)
            .ok_or_else(|| anyhow!("no LAN {lan_name}"))?;
        l.gateway = Some(lan.addr);
        let h = self.host(name)?;
        h.netns()
            .enter(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))?
            .with_context(|| format!("cannot turn on IPv4 forwarding in router {name}"))?;
        let mut masquerade = vec![
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            &wan.name,
            "-j",
            "MASQUERADE",
        ];
        if mode == NatMode::EndpointDependent {
            masquerade.push("--random-fully");
        }
        iptables(h.netns(), &masquerade)
            .with_context(|| format!("cannot install the NAT rule in router {name}"))?;
        if mode == NatMode::EndpointIndependentPortChanging {
            // Ahead of the general rule: `--to-ports` needs a protocol.
            iptables(
                h.netns(),
                &[
                    "-t",
                    "nat",
                    "-I",
                    "POSTROUTING",
                    "1",
                    "-o",
                    &wan.name,
                    "-p",
                    "udp",
                    "-j",
                    "MASQUERADE",
                    "--to-ports",
                    "20000-20999",
                ],
            )
            .with_context(|| format!("cannot install the port-changing rule in router {name}"))?;
        }
        iptables(
            h.netns(),
            &["-A", "INPUT", "-i", &wan.name, "-p", "udp", "-j", "DROP"],
        )?;
        let router = Router {
            name: name.to_string(),
            mode,
            wan,
            lan,
        };
        Ok(self.routers.entry(name.to_string()).or_insert(router))
    }

    /// The NAT router named `name`.
    pub fn router(&self, name: &str) -> Result<&Router> {
        self.routers
            .get(name)
            .ok_or_else(|| anyhow!("no NAT router {name}"))
    }

    /// The `FORWARD` rules that drop UDP between router `from` and router `other`'s WAN address, in
    /// both directions (to it, leaving `from`; from it, entering `from`'s private LAN).
    fn block_rules(&self, from: &str, other: &str) -> Result<(&Netns, [Vec<String>; 2])> {
        let peer = self.router(other)?.wan_addr().to_string();
        let ns = self.host(self.router(from)?.name())?.netns();
        let rule = |dir: &str| -> Vec<String> {
            [dir, &peer, "-p", "udp", "-j", "DROP"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        };
        Ok((ns, [rule("-d"), rule("-s")]))
    }

    /// Drops all UDP between routers `router_a` and `router_b` (both directions, in both routers'
    /// `FORWARD` chains), as if a firewall between them started filtering it. Each still reaches
    /// every other address, e.g. a controller on the public LAN. Their NAT mappings (conntrack
    /// entries) are kept, so after [`Topology::unblock_udp_between`] a flow resumes on the same
    /// public ports. Idempotent.
    pub fn block_udp_between(&self, router_a: &str, router_b: &str) -> Result<()> {
        for (from, other) in [(router_a, router_b), (router_b, router_a)] {
            let (ns, rules) = self.block_rules(from, other)?;
            for rule in rules {
                let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
                let check: Vec<&str> = ["-C", "FORWARD"]
                    .into_iter()
                    .chain(rule.iter().copied())
                    .collect();
                if iptables(ns, &check).is_err() {
                    let insert: Vec<&str> = ["-I", "FORWARD"]
                        .into_iter()
                        .chain(rule.iter().copied())
                        .collect();
                    iptables(ns, &insert)
                        .with_context(|| format!("cannot block UDP in router {from}"))?;
                }
            }
        }
        Ok(())
    }

    /// Undoes [`Topology::block_udp_between`]. Idempotent.
    pub fn unblock_udp_between(&self, router_a: &str, router_b: &str) -> Result<()> {
        for (from, other) in [(router_a, router_b), (router_b, router_a)] {
            let (ns, rules) = self.block_rules(from, other)?;
            for rule in rules {
                let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
                let delete: Vec<&str> = ["-D", "FORWARD"]
                    .into_iter()
                    .chain(rule.iter().copied())
                    .collect();
                // `-D` fails once no copy of the rule is left.
                while iptables(ns, &delete).is_ok() {}
            }
        }
        Ok(())
    }
}

/// `iptables -w ARGS…` inside `ns` (`-w`: wait for the xtables lock, which is shared by all
/// namespaces).
fn iptables(ns: &Netns, args: &[&str]) -> Result<String> {
    let mut all = vec!["-w"];
    all.extend_from_slice(args);
    ns.exec("iptables", &all)
}

/// Runs `program args…` in namespace `ns` with a deadline; its stdout, or an error with its output.
pub fn run_in(ns: &str, program: &str, args: &[&str], timeout: Duration) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]).args(args);
    let out = shoal_testkit::cmd::output_with_timeout(&mut cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "`{program} {}` in {ns} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The IPv4 address of interface `dev` in namespace `ns` (e.g. an agent's `shoal0`).
pub fn ipv4_of(ns: &str, dev: &str) -> Result<Ipv4Addr> {
    let out = run_in(
        ns,
        "ip",
        &["-4", "-o", "addr", "show", "dev", dev],
        Duration::from_secs(5),
    )?;
    let addr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .with_context(|| format!("no IPv4 address on {dev} in {ns}: {out}"))?;
    Ok(addr.parse()?)
}

/// Whether namespace `ns` has `address` on any of its interfaces (a floating address, say).
pub fn holds_address(ns: &str, address: Ipv4Addr) -> bool {
    run_in(
        ns,
        "ip",
        &["-o", "addr", "show", "to", &format!("{address}/32")],
        Duration::from_secs(10),
    )
    .is_ok_and(|out| !out.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_hosts() {
        let s = Subnet::parse("10.77.3.0/24").expect("parses");
        assert_eq!(s.host(1).expect("host 1"), Ipv4Addr::new(10, 77, 3, 1));
        assert_eq!(
            s.host(254).expect("host 254"),
            Ipv4Addr::new(10, 77, 3, 254)
        );
        assert!(s.host(255).is_err());
        assert!(s.host(0).is_err());
        assert!(Subnet::parse("10.77.3.1/24").is_err());
        assert!(Subnet::parse("10.77.3.0").is_err());
        assert_eq!(s.to_string(), "10.77.3.0/24");
    }

    #[test]
    fn ids_are_unique_and_names_short() {
        let a = unique_id();
        let b = unique_id();
        assert_ne!(a, b);
        assert!(a.starts_with(&std::process::id().to_string()));
        assert!(check_name("host", "agent-10").is_ok());
        assert!(check_name("host", "a-name-too-long").is_err());
        assert!(check_name("host", "bad name").is_err());
        assert!(format!("p-{}", "abcdefghijklm").len() <= IFNAME_MAX);
    }
}
