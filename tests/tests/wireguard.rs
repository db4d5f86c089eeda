//! WireGuard access with a stock client: `wireguard-go` and `wg` (Debian's wireguard-go and
//! wireguard-tools) in their own namespace behind a NAT, talking to shoal's gateway
//! (`shoal-wireguard`, boringtun's noise core) on a public LAN. The gateway's segment is a real TAP
//! device whose kernel side holds an overlay address (10.90.0.2): the kernel ARPs for the device
//! and the gateway answers, so ping and iperf3 both ways run over the real bridge.
//!
//! Needs root (skips with a reason otherwise, fails under CI), `wireguard-go`, `wg` and `iperf3`
//! (scripts/deps).
//!
//! Not covered yet (docs/operators-guide.md, "WireGuard access"): the gateway inside the agent,
//! devices from `shoalctl wireguard peer add`, and failover between gateways.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use shoal_proto::MacAddr;
use shoal_tests::netns::{run_in, NatMode};
use shoal_tests::testkit::skip::tool;
use shoal_tests::{eventually, require_host_tests, Topology};
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
    fn start(ns: &str, listen: SocketAddr, tap: &str) -> Result<GatewayHost> {
        let path = std::path::Path::new("/run/netns").join(ns);
        let file = std::fs::File::open(&path).context("namespace")?;
        let gateway = Gateway::new(
            GatewayConfig::default(),
            Key::generate_private(),
            GATEWAY_MAC,
        );
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
                    let device = tun_rs::DeviceBuilder::new()
                        .name(&tap)
                        .layer(tun_rs::Layer::L2)
                        .ipv4(TAP_ADDR, 16, None)
                        .mtu(1380)
                        .build_async()?;
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

fn test_body(wireguard_go: &std::path::Path) -> Result<()> {
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

    let gateway = GatewayHost::start(&gw_ns, SocketAddr::from((gw_addr, PORT)), "shoal0")?;
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
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("wg.conf");
    let setconf: String = config
        .render()
        .lines()
        .filter(|l| !l.starts_with("Address"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&conf, setconf)?;

    let iface = format!("wg{}", std::process::id() % 100_000);
    let _client = KillOnDrop(
        std::process::Command::new("ip")
            .args(["netns", "exec", &phone_ns])
            .arg(wireguard_go)
            .args(["-f", &iface])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("wireguard-go")?,
    );
    eventually!(Duration::from_secs(10), "wireguard-go's interface", || {
        in_ns(&phone_ns, "ip", &["link", "show", &iface])
    })?;
    in_ns(
        &phone_ns,
        "wg",
        &["setconf", &iface, &conf.to_string_lossy()],
    )?;
    in_ns(
        &phone_ns,
        "ip",
        &["addr", "add", &format!("{DEVICE_ADDR}/32"), "dev", &iface],
    )?;
    in_ns(&phone_ns, "ip", &["link", "set", &iface, "up"])?;
    in_ns(
        &phone_ns,
        "ip",
        &["route", "add", "10.90.0.0/16", "dev", &iface],
    )?;

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
