//! Controller failover (issue 15): controllers that share one CA and one fleet, and a real agent
//! that knows several of them. A killed controller sends nothing (no close frame), so it is played
//! by a UDP relay in front of it that stops forwarding: the agent must notice by itself, and be up
//! on another controller within 10 s.
//!
//! Two controllers cannot share a store in one process yet (the etcd store comes separately), so
//! the second controller's data dir is a copy of the first's, taken after the node enrolled: the
//! same CA, the same node records.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::{
    eventually,
    harness::{Ctl, Raw, AGENT_UP, PROMPT},
};
use shoal_agent::daemon::{self, AgentConfig, AgentError};
use shoal_controller::cluster::AgentEndpoint;
use shoal_overlay::{pki, recv_msg};
use shoal_proto::{AgentMsg, ControllerMsg, ControllerSet, EnrolRequest, VersionRange, SUPPORTED};
use tokio::{net::UdpSocket, sync::oneshot, task::JoinHandle};

/// The test goal: a killed controller's agents are up on another one within this.
const FAILOVER: Duration = Duration::from_secs(10);

/// A real agent daemon on a state dir the test keeps.
struct Agent {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), AgentError>>,
}

impl Agent {
    fn start(
        controllers: &[SocketAddr],
        state: &Path,
        machine: &str,
        token: Option<String>,
    ) -> Agent {
        let mut config = AgentConfig::new(controllers[0], state.to_owned());
        config.controllers = controllers.iter().map(|&a| a.into()).collect();
        config.overlay_enabled = false;
        config.drives = None;
        config.token = token;
        config.machine_id = Some(machine.to_owned());
        config.backoff_base = Duration::from_millis(100);
        config.backoff_max = Duration::from_millis(500);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon::run(config, async {
            let _ = stopped.await;
        }));
        Agent {
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        assert!(!self.task.is_finished(), "the agent gave up");
        let _ = self.stop.take().unwrap().send(());
        let r = tokio::time::timeout(PROMPT, &mut self.task)
            .await
            .expect("agent shuts down")
            .unwrap();
        r.expect("agent ran without error");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A UDP relay in front of a controller; `kill` makes it drop everything both ways, which is what
/// agents see of a controller host that died.
struct Relay {
    addr: SocketAddr,
    dead: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        back.connect(upstream).await.unwrap();
        let addr = front.local_addr().unwrap();
        let dead = Arc::new(AtomicBool::new(false));
        let d = dead.clone();
        let task = tokio::spawn(async move {
            let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
            let mut client = None;
            loop {
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut a) => {
                        client = Some(from);
                        if !d.load(Ordering::Relaxed) {
                            let _ = back.send(&a[..n]).await;
                        }
                    }
                    Ok(n) = back.recv(&mut b) => {
                        if let (Some(c), false) = (client, d.load(Ordering::Relaxed)) {
                            let _ = front.send_to(&b[..n], c).await;
                        }
                    }
                }
            }
        });
        Relay { addr, dead, task }
    }

    fn kill(&self) {
        self.dead.store(true, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Whether `machine` is up and connected on `ctl`.
async fn up_on(ctl: &Ctl, machine: &str) -> Option<()> {
    ctl.admin
        .node_by_machine(machine)
        .await
        .filter(|n| n.status == "up" && n.connected)
        .map(|_| ())
}

/// Two controllers of one fleet (A, and B on a copy of A's data dir) with `machine` enrolled in
/// both, and the agent's state dir holding its certificate.
async fn fleet_of_two(root: &Path, machine: &str) -> (Ctl, Ctl, PathBuf) {
    let (dir_a, dir_b, state) = (root.join("a"), root.join("b"), root.join("agent"));
    let first = Ctl::start_in(dir_a.clone(), |_| {}).await;
    let token = first.admin.create_token(None).await;
    let agent = Agent::start(&[first.quic], &state, machine, Some(token));
    first.wait_up(machine).await;
    agent.stop().await;
    first.stop().await;
    copy_dir(&dir_a, &dir_b);
    let a = Ctl::start_in(dir_a, |_| {}).await;
    let b = Ctl::start_in(dir_b, |_| {}).await;
    assert_eq!(a.ca_sha256, b.ca_sha256, "one CA");
    (a, b, state)
}

/// Kills the controller behind `relay` and waits until `machine` is up on `to`; the time it took.
async fn kill_and_fail_over(relay: &Relay, to: &Ctl, machine: &str) -> Duration {
    relay.kill();
    let killed = Instant::now();
    eventually(
        FAILOVER,
        &format!("{machine} up on the other controller after the kill"),
        || up_on(to, machine),
    )
    .await;
    let took = killed.elapsed();
    println!("{machine}: up on the other controller {took:?} after the kill");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_controllers_agent_is_up_on_another_within_ten_seconds() {
    let root = tempfile::tempdir().unwrap();
    let machine = "failover-configured";
    let (a, b, state) = fleet_of_two(root.path(), machine).await;
    let relay = Relay::start(a.quic).await;
    let agent = Agent::start(&[relay.addr, b.quic], &state, machine, None);
    eventually(AGENT_UP, "the agent up on A, its first controller", || {
        up_on(&a, machine)
    })
    .await;
    let took = kill_and_fail_over(&relay, &b, machine).await;
    assert!(took < FAILOVER, "{took:?}");
    agent.stop().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_controller_is_kept_and_taken_over_to_though_never_configured() {
    let root = tempfile::tempdir().unwrap();
    let machine = "failover-announced";
    let (a, b, state) = fleet_of_two(root.path(), machine).await;
    let relay = Relay::start(a.quic).await;
    // The agent knows only A.
    let agent = Agent::start(&[relay.addr], &state, machine, None);
    eventually(AGENT_UP, "the agent up on A", || up_on(&a, machine)).await;
    // The cluster learns of B: A tells its agents.
    a.controller().announce_agent_endpoints(vec![
        AgentEndpoint {
            id: "ctl-a".into(),
            addr: relay.addr,
        },
        AgentEndpoint {
            id: "ctl-b".into(),
            addr: b.quic,
        },
    ]);
    let kept = state.join("controllers.json");
    let b_addr = b.quic.to_string();
    eventually(PROMPT, "the agent keeps the announced set", || {
        let kept = kept.clone();
        let b_addr = b_addr.clone();
        async move {
            std::fs::read_to_string(&kept)
                .ok()
                .filter(|t| t.contains(&b_addr) && t.contains("ctl-b"))
                .map(|_| ())
        }
    })
    .await;
    let took = kill_and_fail_over(&relay, &b, machine).await;
    assert!(took < FAILOVER, "{took:?}");
    // Restarted with only the dead controller configured, it goes back to B from what it kept.
    agent.stop().await;
    eventually(PROMPT, "B saw the agent go", || async {
        b.admin
            .node_by_machine(machine)
            .await
            .filter(|n| !n.connected)
            .map(|_| ())
    })
    .await;
    let restarted = Instant::now();
    let agent = Agent::start(&[relay.addr], &state, machine, None);
    eventually(FAILOVER, "the restarted agent up on B", || {
        up_on(&b, machine)
    })
    .await;
    println!(
        "{machine}: restarted with only the dead controller configured, up on B after {:?}",
        restarted.elapsed()
    );
    agent.stop().await;
    a.stop().await;
    b.stop().await;
}

fn endpoints(ports: &[u16]) -> Vec<AgentEndpoint> {
    ports
        .iter()
        .map(|p| AgentEndpoint {
            id: format!("ctl-{p}"),
            addr: SocketAddr::from(([127, 0, 0, 1], *p)),
        })
        .collect()
}

/// The next controller set on `raw` within `wait`, skipping what else the controller sends.
async fn next_set(raw: &mut Raw, wait: Duration) -> Option<ControllerSet> {
    let read = async {
        loop {
            match recv_msg::<ControllerMsg>(&mut raw.recv).await {
                Ok(Some(ControllerMsg::ControllerSet(set))) => return Some(set),
                Ok(Some(_)) => {}
                _ => return None,
            }
        }
    };
    tokio::time::timeout(wait, read).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v7_sessions_get_the_controller_set_and_its_changes_and_v6_sessions_never() {
    let ctl = Ctl::start().await;
    ctl.controller()
        .announce_agent_endpoints(endpoints(&[7001, 7002]));
    // One node key, enrolled once; a v7 and a v6 session with it.
    let key = pki::generate_key().unwrap();
    let token = ctl.admin.create_token(Some(1)).await;
    let mut raw = Raw::enrolment(&ctl).await;
    raw.hello_as(SUPPORTED, "set-node").await.unwrap();
    raw.send(&AgentMsg::Enrol(EnrolRequest {
        token,
        csr_der: pki::make_csr(&key).unwrap(),
        hostname: "set-node".into(),
    }))
    .await;
    let enrolled = raw
        .recv_until(|m| match m {
            ControllerMsg::Enrolled(e) => Some(e),
            _ => None,
        })
        .await;

    let mut v7 = Raw::node(&ctl, &enrolled.cert_der, &key).await;
    // The newest protocol: 7 or later carries the set.
    assert_eq!(
        v7.hello_as(SUPPORTED, "set-node").await.unwrap().protocol,
        SUPPORTED.max
    );
    let set = next_set(&mut v7, PROMPT)
        .await
        .expect("the set after Welcome");
    assert_eq!(set.controllers.len(), 2);
    assert_eq!(set.controllers[0].id, "ctl-7001", "the sender first");
    ctl.controller()
        .announce_agent_endpoints(endpoints(&[7001, 7002, 7003]));
    let set = next_set(&mut v7, PROMPT).await.expect("the changed set");
    assert_eq!(set.controllers.len(), 3);
    drop(v7);

    let v6_range = VersionRange { min: 1, max: 6 };
    let mut v6 = Raw::node(&ctl, &enrolled.cert_der, &key).await;
    assert_eq!(v6.hello_as(v6_range, "set-node").await.unwrap().protocol, 6);
    ctl.controller()
        .announce_agent_endpoints(endpoints(&[7001, 7004]));
    // Whatever else a v6 session gets within this window, the set is not among it.
    assert_eq!(next_set(&mut v6, Duration::from_millis(1500)).await, None);
    assert!(v6.conn.close_reason().is_none(), "the v6 session goes on");
    ctl.stop().await;
}
