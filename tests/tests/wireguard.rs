//! WireGuard access with a stock client: `wireguard-go` and `wg` (Debian's wireguard-go and
//! wireguard-tools) in their own namespace behind a NAT, talking to shoal's gateway
//! (`shoal-wireguard`, boringtun's noise core) on a public LAN. The gateway's segment is a real TAP
//! device whose kernel side holds an overlay address (10.90.0.2): the kernel ARPs for the device
//! and the gateway answers, so ping and iperf3 both ways run over the real bridge.
//!
//! Needs root (skips with a reason otherwise, fails under CI), `wireguard-go`, `wg` and `iperf3`
//! (scripts/deps).
//!
//! Failover: two gateways with one shared key behind one floating endpoint, bridged onto one
//! segment; the first dies, the floating address moves, and the client carries on through the
//! second without a configuration change.
//!
//! With real agents (`devices_added_with_shoalctl_are_served_by_gateway_agents`): a controller,
//! two agents run with `--wireguard-gateway FLOATING:51820` and one plain agent; a device added
//! with `shoalctl wireguard peer add` (its configuration used as printed) reaches the plain agent
//! through the active gateway, keeps going when that agent is killed (the controller names the
//! other, which takes the floating address; the killed agent, restarted, stays a standby and drops
//! the address its crash left), and is cut off within 2 s of `peer remove`. The active gateway's
//! own node reaches the device too, and the device it (the switch delivers between the node's TAP
//! and its gateway, which speaks with its own MAC); after the failover the plain agent's neighbour
//! entry for the device names the new gateway's MAC, and the new gateway's node reaches it.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use shoal_proto::MacAddr;
use shoal_tests::netns::{holds_address, run_in, NatMode};
use shoal_tests::testkit::skip::tool;
use shoal_tests::{eventually, require_host_tests, Fleet, FleetConfig, Topology};
use shoal_wireguard::keys::ClientConfig;
use shoal_wireguard::run::{run, Segment, Served};
use shoal_wireguard::{Device, Gateway, GatewayConfig, Key};
use tokio::sync::{mpsc, oneshot, watch};

const TAP_ADDR: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 2);
const DEVICE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 10);
/// The gateway's MAC on the segment: not the TAP's own (the TAP's kernel side is a member).
const GATEWAY_MAC: MacAddr = MacAddr([0x02, 0x5e, 0, 0, 0, 1]);
const PORT: u16 = 51820;

fn in_ns(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    run_in(ns, program, args, Duration::from_secs(30))
}

/// The gateway, running on a thread inside the gateway's namespace: a TAP device for the segment
/// and a UDP socket on the public LAN.
struct GatewayHost {
    served: watch::Sender<Served>,
    public_key: Key,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl GatewayHost {
    /// A gateway with `key` and `mac`; `tap_addr` is given to the TAP's kernel side (else the
    /// TAP is left without an address, for a bridge).
    fn start(
        ns: &str,
        listen: SocketAddr,
        tap: &str,
        key: Key,
        mac: MacAddr,
        tap_addr: Option<Ipv4Addr>,
    ) -> Result<GatewayHost> {
        let path = std::path::Path::new("/run/netns").join(ns);
        let file = std::fs::File::open(&path).context("namespace")?;
        let gateway = Gateway::new(GatewayConfig::default(), key, mac);
        let public_key = gateway.public_key();
        let (served, served_rx) = watch::channel(Served::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<Result<()>>();
        let tap = tap.to_owned();
        let thread = std::thread::spawn(move || -> Result<()> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let setup = async {
                    let mut builder = tun_rs::DeviceBuilder::new()
                        .name(&tap)
                        .layer(tun_rs::Layer::L2)
                        .mtu(1380);
                    if let Some(addr) = tap_addr {
                        builder = builder.ipv4(addr, 16, None);
                    }
                    let device = builder.build_async()?;
                    let socket = tokio::net::UdpSocket::bind(listen).await?;
                    anyhow::Ok((device, socket))
                };
                let (device, socket) = match setup.await {
                    Ok(v) => {
                        let _ = ready_tx.send(Ok(()));
                        v
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return Ok(());
                    }
                };
                let device = std::sync::Arc::new(device);
                let (to_tx, mut to_segment) = mpsc::channel::<Vec<u8>>(256);
                let (from_tx, from_segment) = mpsc::channel::<Vec<u8>>(256);
                let writer = device.clone();
                tokio::spawn(async move {
                    while let Some(frame) = to_segment.recv().await {
                        let _ = writer.send(&frame).await;
                    }
                });
                let reader = device.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok(n) = reader.recv(&mut buf).await {
                        if from_tx.send(buf[..n].to_vec()).await.is_err() {
                            break;
                        }
                    }
                });
                let segment = Segment {
                    to_segment: to_tx,
                    from_segment,
                };
                run(socket, gateway, served_rx, segment, async {
                    let _ = stopped.await;
                })
                .await?;
                anyhow::Ok(())
            })
        });
        ready
            .recv_timeout(Duration::from_secs(10))
            .context("gateway setup")??;
        Ok(GatewayHost {
            served,
            public_key,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for GatewayHost {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A child process killed when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_stock_wireguard_client_behind_a_nat_reaches_the_overlay_and_is_cut_off_on_removal() {
    require_host_tests!();
    let wireguard_go = shoal_tests::testkit::require!(tool("wireguard-go", "wireguard-go"));
    shoal_tests::testkit::require!(tool("wg", "wireguard-tools"));
    shoal_tests::testkit::require!(tool("iperf3", "iperf3"));
    test_body(&wireguard_go).expect("WireGuard access");
}

/// The two tests run one at a time: each starts a userspace WireGuard client and pushes traffic
/// through it, and on two shared cores one would starve the other's timers.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn test_body(wireguard_go: &std::path::Path) -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut topo = Topology::new()?;
    topo.add_lan("pub", "10.77.0.0/24")?;
    topo.add_host("gw")?;
    let gw_addr = topo.connect("gw", "pub")?.addr;
    topo.add_nat_router(
        "nat",
        "pub",
        "home",
        "10.78.0.0/24",
        NatMode::EndpointIndependent,
    )?;
    topo.add_host("phone")?;
    topo.connect("phone", "home")?;
    let gw_ns = topo.host("gw")?.ns_name().to_owned();
    let phone_ns = topo.host("phone")?.ns_name().to_owned();

    let gateway = GatewayHost::start(
        &gw_ns,
        SocketAddr::from((gw_addr, PORT)),
        "shoal0",
        Key::generate_private(),
        GATEWAY_MAC,
        Some(TAP_ADDR),
    )?;
    let tap_mac: MacAddr = topo
        .host("gw")?
        .netns()
        .mac("shoal0")?
        .parse()
        .context("TAP MAC")?;

    // The device's configuration, as `shoalctl wireguard peer add` prints it; the stock client
    // reads it (`wg setconf` takes all but wg-quick's Address line).
    let private = Key::generate_private();
    let config = ClientConfig {
        private_key: Some(private),
        address: DEVICE_ADDR,
        gateway_public_key: gateway.public_key,
        endpoint: format!("{gw_addr}:{PORT}"),
        allowed_ips: "10.90.0.0/16".into(),
    };

    let _client = start_client(&phone_ns, wireguard_go, &config.render())?;

    gateway.served.send_replace(Served {
        devices: vec![Device {
            public_key: private.public(),
            address: DEVICE_ADDR,
        }],
        neighbours: vec![(TAP_ADDR, tap_mac)],
        broadcast: Some(Ipv4Addr::new(10, 90, 255, 255)),
    });

    // The device reaches the overlay address, and the overlay host reaches the device.
    let tap = TAP_ADDR.to_string();
    let device = DEVICE_ADDR.to_string();
    eventually!(Duration::from_secs(10), "device pings the overlay", || {
        in_ns(&phone_ns, "ping", &["-c", "1", "-W", "1", &tap])
    })?;
    in_ns(
        &gw_ns,
        "ping",
        &["-c", "3", "-i", "0.2", "-W", "1", &device],
    )?;

    // iperf3 both ways through the bridge.
    let _server = KillOnDrop(
        std::process::Command::new("ip")
            .args(["netns", "exec", &gw_ns, "iperf3", "-s", "-B", &tap])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let bits = |json: &str, key: &str| -> Result<f64> {
        let v: serde_json::Value = serde_json::from_str(json)?;
        v["end"][key]["bits_per_second"]
            .as_f64()
            .with_context(|| format!("no {key} in iperf3's output: {}", json))
    };
    // The server may still be starting: retry until it answers.
    let up = eventually!(Duration::from_secs(10), "iperf3 device → overlay", || {
        bits(
            &in_ns(&phone_ns, "iperf3", &["-c", &tap, "-t", "2", "-J"])?,
            "sum_received",
        )
    })?;
    let down = bits(
        &in_ns(&phone_ns, "iperf3", &["-c", &tap, "-t", "2", "-R", "-J"])?,
        "sum_received",
    )?;
    println!(
        "iperf3 through the gateway (debug build): up {:.0} Mbit/s, down {:.0} Mbit/s",
        up / 1e6,
        down / 1e6
    );
    anyhow::ensure!(up > 0.0 && down > 0.0, "no iperf3 traffic");

    // Removal: the device is cut off within 2 s.
    gateway.served.send_modify(|s| s.devices.clear());
    eventually!(Duration::from_secs(2), "removed device cut off", || {
        match in_ns(&phone_ns, "ping", &["-c", "1", "-W", "0.3", &tap]) {
            Ok(_) => anyhow::bail!("still reaches the overlay"),
            Err(_) => Ok(()),
        }
    })?;
    // And stays cut off.
    anyhow::ensure!(
        in_ns(
            &phone_ns,
            "ping",
            &["-c", "2", "-i", "0.3", "-W", "1", &tap]
        )
        .is_err(),
        "a removed device reached the overlay again"
    );
    Ok(())
}

/// wireguard-go on `wg<pid>` in `ns`, configured from the wg-quick configuration `config`, with
/// the device's address and a route to the overlay.
fn start_client(ns: &str, wireguard_go: &std::path::Path, config: &str) -> Result<KillOnDrop> {
    start_client_as(ns, wireguard_go, config, DEVICE_ADDR, "10.90.0.0/16")
}

/// [`start_client`] with the device's address and the route to its network.
fn start_client_as(
    ns: &str,
    wireguard_go: &std::path::Path,
    config: &str,
    address: Ipv4Addr,
    route: &str,
) -> Result<KillOnDrop> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let phone_ns = ns;
    // Unique per test: wireguard-go's control socket is /var/run/wireguard/IFACE.sock, shared by
    // every namespace.
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let iface = format!("wg{}x{n}", std::process::id() % 100_000);
    let client = KillOnDrop(
        std::process::Command::new("ip")
            .args(["netns", "exec", phone_ns])
            .arg(wireguard_go)
            .args(["-f", &iface])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("wireguard-go")?,
    );
    eventually!(Duration::from_secs(10), "wireguard-go's interface", || {
        in_ns(phone_ns, "ip", &["link", "show", &iface])
    })?;
    // `wg setconf` takes all of it but wg-quick's Address line, applied below.
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("wg.conf");
    let setconf: String = config
        .lines()
        .filter(|l| !l.starts_with("Address"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&conf, setconf)?;
    in_ns(
        phone_ns,
        "wg",
        &["setconf", &iface, &conf.to_string_lossy()],
    )?;
    in_ns(
        phone_ns,
        "ip",
        &["addr", "add", &format!("{address}/32"), "dev", &iface],
    )?;
    in_ns(phone_ns, "ip", &["link", "set", &iface, "up"])?;
    in_ns(phone_ns, "ip", &["route", "add", route, "dev", &iface])?;

    Ok(client)
}

#[test]
fn a_client_fails_over_to_another_gateway_without_a_config_change() {
    require_host_tests!();
    let wireguard_go = shoal_tests::testkit::require!(tool("wireguard-go", "wireguard-go"));
    shoal_tests::testkit::require!(tool("wg", "wireguard-tools"));
    shoal_tests::testkit::require!(tool("arping", "arping"));
    failover_body(&wireguard_go).expect("WireGuard failover");
}

/// Puts `tap` and the host's interface on LAN `seg` into one bridge, so the gateway's frames reach
/// that LAN.
fn bridge_onto(ns: &str, tap: &str, seg_iface: &str) -> Result<()> {
    in_ns(ns, "ip", &["addr", "flush", "dev", seg_iface])?;
    in_ns(ns, "ip", &["link", "add", "br0", "type", "bridge"])?;
    for port in [tap, seg_iface] {
        in_ns(ns, "ip", &["link", "set", port, "master", "br0"])?;
        in_ns(ns, "ip", &["link", "set", port, "up"])?;
    }
    in_ns(ns, "ip", &["link", "set", "br0", "up"])?;
    Ok(())
}

fn failover_body(wireguard_go: &std::path::Path) -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let floating = Ipv4Addr::new(10, 77, 0, 100);
    let mut topo = Topology::new()?;
    topo.add_lan("pub", "10.77.0.0/24")?;
    topo.add_lan("seg", "10.90.0.0/16")?;
    let mut gws = Vec::new();
    for name in ["gw1", "gw2"] {
        topo.add_host(name)?;
        let public = topo.connect(name, "pub")?;
        let seg = topo.connect(name, "seg")?;
        let ns = topo.host(name)?.ns_name().to_owned();
        // Both gateways bind the floating address; only the one holding it receives.
        topo.host(name)?
            .netns()
            .enter(|| std::fs::write("/proc/sys/net/ipv4/ip_nonlocal_bind", "1"))??;
        gws.push((ns, public.name.clone(), seg.name.clone()));
    }
    topo.add_host("node")?;
    topo.connect_with_addr("node", "seg", TAP_ADDR)?;
    topo.add_nat_router(
        "nat",
        "pub",
        "home",
        "10.78.0.0/24",
        NatMode::EndpointIndependent,
    )?;
    topo.add_host("phone")?;
    topo.connect("phone", "home")?;
    let node_ns = topo.host("node")?.ns_name().to_owned();
    let phone_ns = topo.host("phone")?.ns_name().to_owned();
    let node_mac: MacAddr = topo
        .host("node")?
        .netns()
        .mac(&topo.host("node")?.iface_on("seg")?.name)?
        .parse()
        .context("node MAC")?;

    // One key for both gateways (the network's gateway key); each speaks with its own MAC, as
    // each agent's TAP has its own.
    let key = Key::generate_private();
    let listen = SocketAddr::from((floating, PORT));
    let private = Key::generate_private();
    let served = Served {
        devices: vec![Device {
            public_key: private.public(),
            address: DEVICE_ADDR,
        }],
        neighbours: vec![(TAP_ADDR, node_mac)],
        broadcast: Some(Ipv4Addr::new(10, 90, 255, 255)),
    };
    let macs = [GATEWAY_MAC, MacAddr([0x02, 0x5e, 0, 0, 0, 3])];
    let mut gateways = Vec::new();
    for ((ns, _, seg), mac) in gws.iter().zip(macs) {
        let g = GatewayHost::start(ns, listen, "shoal0", key, mac, None)?;
        g.served.send_replace(served.clone());
        bridge_onto(ns, "shoal0", seg)?;
        gateways.push(Some(g));
    }
    let (gw1_ns, gw1_pub, _) = &gws[0];
    let (gw2_ns, gw2_pub, _) = &gws[1];
    in_ns(
        gw1_ns,
        "ip",
        &["addr", "add", &format!("{floating}/24"), "dev", gw1_pub],
    )?;

    let config = ClientConfig {
        private_key: Some(private),
        address: DEVICE_ADDR,
        gateway_public_key: key.public(),
        endpoint: listen.to_string(),
        allowed_ips: "10.90.0.0/16".into(),
    };
    let _client = start_client(&phone_ns, wireguard_go, &config.render())?;

    let node = TAP_ADDR.to_string();
    eventually!(
        Duration::from_secs(10),
        "device pings the node via gw1",
        || { in_ns(&phone_ns, "ping", &["-c", "1", "-W", "1", &node]) }
    )?;
    in_ns(
        &node_ns,
        "ping",
        &["-c", "2", "-i", "0.2", "-W", "1", &DEVICE_ADDR.to_string()],
    )?;

    // gw1 dies; the floating address moves to gw2 (as keepalived would), announced on the LAN.
    drop(gateways[0].take());
    in_ns(
        gw1_ns,
        "ip",
        &["addr", "del", &format!("{floating}/24"), "dev", gw1_pub],
    )?;
    in_ns(
        gw2_ns,
        "ip",
        &["addr", "add", &format!("{floating}/24"), "dev", gw2_pub],
    )?;
    in_ns(
        gw2_ns,
        "arping",
        // Unsolicited ARP (Habets' arping): the NAT router's cache points at gw2 at once. No one
        // answers, so it exits 1.
        &[
            "-U",
            "-S",
            &floating.to_string(),
            "-i",
            gw2_pub,
            "-c",
            "2",
            "-w",
            "1",
            &floating.to_string(),
        ],
    )
    .ok();
    let moved = std::time::Instant::now();

    // The client's configuration is untouched: WireGuard handshakes again (its packets go
    // unanswered), reaches gw2 with the same key, and traffic resumes both ways.
    eventually!(
        Duration::from_secs(40),
        "device pings the node via gw2",
        || { in_ns(&phone_ns, "ping", &["-c", "1", "-W", "1", &node]) }
    )?;
    println!(
        "traffic resumed through gw2 {:.1?} after the failover",
        moved.elapsed()
    );
    in_ns(
        &node_ns,
        "ping",
        &["-c", "2", "-i", "0.2", "-W", "1", &DEVICE_ADDR.to_string()],
    )?;
    Ok(())
}

#[test]
fn devices_added_with_shoalctl_are_served_by_gateway_agents() {
    require_host_tests!();
    let wireguard_go = shoal_tests::testkit::require!(tool("wireguard-go", "wireguard-go"));
    shoal_tests::testkit::require!(tool("wg", "wireguard-tools"));
    shoal_tests::testkit::require!(tool("iperf3", "iperf3"));
    agents_body(&wireguard_go).expect("WireGuard through agents");
}

/// The value of `key = value` in a wg-quick configuration.
fn conf_value<'a>(conf: &'a str, key: &str) -> Result<&'a str> {
    conf.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim())
        .with_context(|| format!("no {key} in the configuration:\n{conf}"))
}

/// The agents (by index) whose namespace holds `address`.
fn holders(fleet: &Fleet, gateways: &[usize], address: Ipv4Addr) -> Vec<usize> {
    gateways
        .iter()
        .copied()
        .filter(|i| holds_address(&fleet.agents()[*i].netns, address))
        .collect()
}

/// The MAC the gateway on `agent`'s node speaks with: derived from its TAP device's.
fn gateway_mac_of(fleet: &Fleet, agent: usize) -> Result<MacAddr> {
    let tap = in_ns(
        &fleet.agents()[agent].netns,
        "cat",
        &["/sys/class/net/shoal0/address"],
    )?;
    let tap: MacAddr = tap.trim().parse().context("shoal0's MAC")?;
    Ok(shoal_overlay::switch::gateway_mac(tap))
}

fn agents_body(wireguard_go: &std::path::Path) -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut fleet = Fleet::start(FleetConfig {
        wait_up: false,
        ..FleetConfig::fast().agents(0)
    })?;
    // The floating endpoint, on the fleet's LAN (10.77.1.0/24), held by no host yet.
    let floating = Ipv4Addr::new(10, 77, 1, 100);
    let listen = SocketAddr::from((floating, PORT)).to_string();
    let token = fleet.create_token(&["--ttl", "1h", "--uses", "3"])?;
    fleet.config_mut().agent_args = vec!["--wireguard-gateway".into(), listen.clone()];
    let gateways = [fleet.add_agent(&token)?, fleet.add_agent(&token)?];
    fleet.config_mut().agent_args.clear();
    let plain = fleet.add_agent(&token)?;
    fleet.wait_all_up(Duration::from_secs(60))?;
    let lan = fleet.lan_name();
    fleet.topology_mut().add_nat_router(
        "nat",
        lan,
        "home",
        "10.78.0.0/24",
        NatMode::EndpointIndependent,
    )?;
    fleet.topology_mut().add_host("phone")?;
    fleet.topology_mut().connect("phone", "home")?;
    let phone_ns = fleet.topology().host("phone")?.ns_name().to_owned();
    let plain_ns = fleet.agents()[plain].netns.clone();
    let plain_addr = eventually!(Duration::from_secs(30), "the plain agent's shoal0", || {
        shoal_tests::netns::ipv4_of(&plain_ns, "shoal0")
    })?;

    // The device, as an operator adds it; its configuration is used as printed.
    let added = fleet.ctl_json(&[
        "wireguard",
        "peer",
        "add",
        "phone",
        "--network",
        "default",
        "--endpoint",
        &listen,
    ])?;
    let printed = added["config"]
        .as_str()
        .with_context(|| format!("no config in {added}"))?
        .to_owned();
    let address: Ipv4Addr = conf_value(&printed, "Address")?
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .context("the device's address")?;
    let route = conf_value(&printed, "AllowedIPs")?.to_owned();
    anyhow::ensure!(conf_value(&printed, "Endpoint")? == listen, "{printed}");
    let _client = start_client_as(&phone_ns, wireguard_go, &printed, address, &route)?;

    // One gateway (the controller's choice) holds the floating address.
    let active = eventually!(
        Duration::from_secs(30),
        "one gateway agent holds the floating address",
        || {
            let held = holders(&fleet, &gateways, floating);
            anyhow::ensure!(held.len() == 1, "held by {held:?}");
            Ok(held[0])
        }
    )?;
    let plain_text = plain_addr.to_string();
    let device = address.to_string();
    eventually!(
        Duration::from_secs(30),
        "the device pings the plain agent through the gateway",
        || in_ns(&phone_ns, "ping", &["-c", "1", "-W", "1", &plain_text])
    )?;
    eventually!(
        Duration::from_secs(10),
        "the plain agent pings the device",
        || in_ns(&plain_ns, "ping", &["-c", "1", "-W", "1", &device])
    )?;
    // The active gateway's own node reaches the device through its own TAP device, and the
    // device reaches it: the gateway speaks with its own MAC, not its node's TAP device's.
    let active_ns = fleet.agents()[active].netns.clone();
    let active_addr = shoal_tests::netns::ipv4_of(&active_ns, "shoal0")?.to_string();
    eventually!(
        Duration::from_secs(10),
        "the active gateway's node pings the device",
        || in_ns(&active_ns, "ping", &["-c", "1", "-W", "1", &device])
    )?;
    eventually!(
        Duration::from_secs(10),
        "the device pings the active gateway's node",
        || in_ns(&phone_ns, "ping", &["-c", "1", "-W", "1", &active_addr])
    )?;
    let neighbour_names = |ns: &str, mac: MacAddr| -> Result<()> {
        let neigh = in_ns(ns, "ip", &["neigh", "show", &device, "dev", "shoal0"])?;
        anyhow::ensure!(neigh.contains(&mac.to_string()), "{neigh}");
        Ok(())
    };
    neighbour_names(&plain_ns, gateway_mac_of(&fleet, active)?)?;
    neighbour_names(&active_ns, gateway_mac_of(&fleet, active)?)?;

    // iperf3 both ways between the device and the plain agent, through the gateway agent.
    let _server = KillOnDrop(
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &plain_ns,
                "iperf3",
                "-s",
                "-B",
                &plain_text,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let bits = |json: &str| -> Result<f64> {
        let v: serde_json::Value = serde_json::from_str(json)?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| format!("no sum_received in iperf3's output: {json}"))
    };
    let up = eventually!(Duration::from_secs(10), "iperf3 device → agent", || {
        bits(&in_ns(
            &phone_ns,
            "iperf3",
            &["-c", &plain_text, "-t", "2", "-J"],
        )?)
    })?;
    let down = bits(&in_ns(
        &phone_ns,
        "iperf3",
        &["-c", &plain_text, "-t", "2", "-R", "-J"],
    )?)?;
    println!(
        "iperf3 device ↔ plain agent through a gateway agent: up {:.0} Mbit/s, down {:.0} Mbit/s",
        up / 1e6,
        down / 1e6
    );
    anyhow::ensure!(up > 0.0 && down > 0.0, "no iperf3 traffic");

    // The active gateway agent dies: the controller names the other, which takes the floating
    // address and announces it; the client, untouched, handshakes again and carries on.
    fleet.agent(active).proc.kill()?;
    let killed = std::time::Instant::now();
    let other = gateways
        .iter()
        .copied()
        .find(|g| *g != active)
        .context("two gateways")?;
    eventually!(
        Duration::from_secs(30),
        "the other gateway agent takes the floating address",
        || {
            anyhow::ensure!(
                holders(&fleet, &[other], floating) == vec![other],
                "not yet"
            );
            Ok(())
        }
    )?;
    // Its gratuitous ARP has pointed the home router at it already, long before the client's
    // next handshake (the router's old entry named the dead gateway's MAC).
    let other_mac = in_ns(
        &fleet.agents()[other].netns,
        "cat",
        &["/sys/class/net/eth0/address"],
    )?;
    let router_ns = fleet.topology().host("nat")?.ns_name().to_owned();
    eventually!(
        Duration::from_secs(3),
        "the home router's neighbour entry for the floating address names the new gateway",
        || {
            let neigh = in_ns(&router_ns, "ip", &["neigh", "show", &floating.to_string()])?;
            anyhow::ensure!(neigh.contains(other_mac.trim()), "{neigh}");
            Ok(())
        }
    )?;
    eventually!(
        Duration::from_secs(60),
        "the device pings the plain agent through the other gateway",
        || in_ns(&phone_ns, "ping", &["-c", "1", "-W", "1", &plain_text])
    )?;
    println!(
        "traffic resumed through the other gateway agent {:.1?} after the kill",
        killed.elapsed()
    );
    // The new gateway's gratuitous ARP has moved the plain agent's entry for the device to its MAC.
    let other_gateway_mac = gateway_mac_of(&fleet, other)?;
    eventually!(
        Duration::from_secs(5),
        "the plain agent's neighbour entry for the device names the new gateway",
        || neighbour_names(&plain_ns, other_gateway_mac)
    )?;
    let other_ns = fleet.agents()[other].netns.clone();
    eventually!(
        Duration::from_secs(10),
        "the new active gateway's node pings the device",
        || in_ns(&other_ns, "ping", &["-c", "1", "-W", "1", &device])
    )?;
    eventually!(
        Duration::from_secs(10),
        "the plain agent pings the device again",
        || in_ns(&plain_ns, "ping", &["-c", "1", "-W", "1", &device])
    )?;

    // The killed agent comes back: it is told it is a standby (the active gateway stays where it
    // is, so the device is not moved again) and lets go of the address its crash left behind.
    fleet.agent(active).proc.restart()?;
    eventually!(
        Duration::from_secs(30),
        "only the active gateway holds the floating address after the other restarts",
        || {
            let held = holders(&fleet, &gateways, floating);
            anyhow::ensure!(held == vec![other], "held by {held:?}");
            Ok(())
        }
    )?;
    in_ns(
        &phone_ns,
        "ping",
        &["-c", "2", "-i", "0.3", "-W", "1", &plain_text],
    )?;

    // The active gateway is stopped the way systemd stops it (SIGTERM): it lets go of the address
    // as it exits, and the restarted one takes over — a second failover, in the other direction.
    fleet.agent(other).proc.stop(Duration::from_secs(10))?;
    let held = holders(&fleet, &[other], floating);
    anyhow::ensure!(
        held.is_empty(),
        "a stopped gateway still holds the floating address"
    );
    eventually!(
        Duration::from_secs(30),
        "the restarted gateway agent takes the floating address",
        || {
            let held = holders(&fleet, &gateways, floating);
            anyhow::ensure!(held == vec![active], "held by {held:?}");
            Ok(())
        }
    )?;
    eventually!(
        Duration::from_secs(60),
        "the device pings the plain agent through the restarted gateway",
        || in_ns(&phone_ns, "ping", &["-c", "1", "-W", "1", &plain_text])
    )?;

    // Removal cuts the device off within 2 s.
    fleet.ctl_ok(&[
        "wireguard",
        "peer",
        "remove",
        "phone",
        "--network",
        "default",
    ])?;
    eventually!(Duration::from_secs(2), "removed device cut off", || {
        match in_ns(&phone_ns, "ping", &["-c", "1", "-W", "0.3", &plain_text]) {
            Ok(_) => anyhow::bail!("still reaches the agent"),
            Err(_) => Ok(()),
        }
    })?;
    anyhow::ensure!(
        in_ns(
            &phone_ns,
            "ping",
            &["-c", "2", "-i", "0.3", "-W", "1", &plain_text]
        )
        .is_err(),
        "a removed device reached the overlay again"
    );
    Ok(())
}

#[test]
fn a_gateway_of_two_networks_is_active_only_on_the_one_it_serves() {
    require_host_tests!();
    networks_body().expect("the gateways of two networks");
}

/// Two gateway agents, each with its own floating endpoint. The one with the lower node id (the
/// one every network would pick if only membership counted) is a member of lab1 and lab2, so it
/// serves lab1 (one UDP port, one network: the lower id); the other is a member of lab2 only. Each
/// network's endpoint must be held by its own gateway.
fn networks_body() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut fleet = Fleet::start(FleetConfig {
        wait_up: false,
        ..FleetConfig::fast().agents(0)
    })?;
    let floating = [Ipv4Addr::new(10, 77, 1, 101), Ipv4Addr::new(10, 77, 1, 102)];
    let endpoint = |i: usize| SocketAddr::from((floating[i], PORT)).to_string();
    let token = fleet.create_token(&["--ttl", "1h", "--uses", "2"])?;
    let mut gateways = Vec::new();
    for i in 0..2 {
        fleet.config_mut().agent_args = vec!["--wireguard-gateway".into(), endpoint(i)];
        gateways.push(fleet.add_agent(&token)?);
    }
    fleet.config_mut().agent_args.clear();
    fleet.wait_all_up(Duration::from_secs(60))?;
    let ids = [fleet.node_id(gateways[0])?, fleet.node_id(gateways[1])?];
    let (both, lab2_only) = if ids[0] < ids[1] { (0, 1) } else { (1, 0) };

    fleet.ctl_ok(&["network", "create", "lab1", "--subnet", "10.91.0.0/24"])?;
    fleet.ctl_ok(&["network", "create", "lab2", "--subnet", "10.92.0.0/24"])?;
    fleet.ctl_ok(&["network", "add", "lab1", "--node", &ids[both]])?;
    fleet.ctl_ok(&["network", "add", "lab2", "--node", &ids[both]])?;
    fleet.ctl_ok(&["network", "add", "lab2", "--node", &ids[lab2_only]])?;
    for (device, network, gateway) in [("d1", "lab1", both), ("d2", "lab2", lab2_only)] {
        fleet.ctl_json(&[
            "wireguard",
            "peer",
            "add",
            device,
            "--network",
            network,
            "--endpoint",
            &endpoint(gateway),
        ])?;
    }
    let held = |fleet: &Fleet| -> [Vec<usize>; 2] {
        [
            holders(fleet, &gateways, floating[both]),
            holders(fleet, &gateways, floating[lab2_only]),
        ]
    };
    let want = [vec![gateways[both]], vec![gateways[lab2_only]]];
    eventually!(
        Duration::from_secs(30),
        "each network's endpoint held by the gateway that serves it",
        || {
            let now = held(&fleet);
            anyhow::ensure!(now == want, "held: {now:?}, want {want:?}");
            Ok(())
        }
    )?;
    // And it stays so (no flapping between the two decisions).
    std::thread::sleep(Duration::from_secs(3));
    let now = held(&fleet);
    anyhow::ensure!(now == want, "after 3 s held: {now:?}, want {want:?}");
    Ok(())
}
