//! In-process tests of the maintenance shell: a real controller (store, admin API, rollout driver
//! pass) with fake nodes (connections registered without QUIC, versions written as an agent's Hello
//! would) and a fake upgrader that records what it is asked. The driver is stepped by calling
//! [`Controller::rollout_tick`], and time is the injected [`RolloutClock`], so no test sleeps.

#![allow(clippy::unwrap_used)]

use crate::store::MaintenanceEvent;
use std::{collections::HashMap, path::Path};

use super::*;
use crate::{
    api::admin::{AdminClient, AdminClientError, AdminConf, ADMIN_CONF_FILE},
    server::ControllerConfig,
    store::Event as LogEvent,
};
use shoal_api::maintenance::{
    BudgetView, CreateWindow, RolloutView, SetBudget, StartRollout, WindowView,
};

const OLD: &str = "1.0.0";
const NEW: &str = "1.1.0";

/// Records every command; the test decides what the nodes do.
#[derive(Debug, Default)]
struct FakeUpgrader {
    begins: Mutex<Vec<NodeId>>,
    rollbacks: Mutex<Vec<(NodeId, Option<String>)>>,
}

impl NodeUpgrader for FakeUpgrader {
    fn begin(&self, node: &NodeId, _target: &Target) -> Result<(), UpgradeError> {
        lock(&self.begins).push(node.clone());
        Ok(())
    }
    fn roll_back(
        &self,
        node: &NodeId,
        to: Option<&str>,
        _target: &Target,
    ) -> Result<(), UpgradeError> {
        lock(&self.rollbacks).push((node.clone(), to.map(str::to_owned)));
        Ok(())
    }
}

impl FakeUpgrader {
    fn begins(&self) -> Vec<NodeId> {
        lock(&self.begins).clone()
    }
    fn rollbacks(&self) -> Vec<(NodeId, Option<String>)> {
        lock(&self.rollbacks).clone()
    }
}

/// A controller with fake nodes.
struct Fixture {
    ctl: Arc<Controller>,
    fake: Arc<FakeUpgrader>,
    conns: HashMap<NodeId, u64>,
}

impl Fixture {
    fn open(dir: &Path, clock: RolloutClock) -> Fixture {
        let mut config = ControllerConfig::for_tests(dir.to_owned());
        config.rollout_clock = clock;
        let ctl = Controller::open(config, "127.0.0.1:1".parse().unwrap()).unwrap();
        let fake = Arc::new(FakeUpgrader::default());
        ctl.set_upgrader(TargetKind::Agent, fake.clone());
        Fixture {
            ctl,
            fake,
            conns: HashMap::new(),
        }
    }

    /// Enrols `count` nodes with these labels, connected, on the old version.
    fn nodes(&mut self, prefix: &str, count: usize, labels: &[(&str, &str)]) -> Vec<NodeId> {
        (0..count)
            .map(|i| {
                let id = crate::test_support::enrol_for_tests(
                    &self.ctl.store,
                    &format!("{prefix}{i}"),
                    labels,
                    now_ms(),
                );
                self.come_back(&id, OLD);
                id
            })
            .collect()
    }

    /// The node's connection closes (it reboots, re-execs, or dies).
    fn go_down(&mut self, node: &NodeId) {
        if let Some(conn) = self.conns.remove(node) {
            self.ctl.end_fake_connection(node, conn);
        }
    }

    /// The node connects again, saying `version` in its Hello.
    fn come_back(&mut self, node: &NodeId, version: &str) {
        self.go_down(node);
        self.ctl
            .store
            .update_node(node, |r| r.agent_version = version.to_owned())
            .unwrap();
        let (conn, _rx) = self.ctl.fake_connection(node, 3);
        self.conns.insert(node.clone(), conn);
    }

    fn start(
        &self,
        selector: &str,
        max_unavailable: u32,
        max_failures: u32,
        window: Option<&str>,
        deadline: Duration,
    ) -> Rollout {
        self.ctl
            .start_rollout(StartRequest {
                target: Target::Agent(NEW.into()),
                selector: Some(parse_selector(selector).unwrap()),
                max_unavailable,
                max_failures,
                window: window.map(str::to_owned),
                upgrade_deadline: Some(deadline),
                allow_downgrade: false,
            })
            .unwrap()
    }

    fn tick(&self) -> Rollout {
        self.ctl.rollout_tick();
        self.ctl.maint.rollout("current").unwrap()
    }

    /// Every node begun since the last call goes down, and (unless listed in `stuck`) comes back on
    /// the target.
    fn nodes_do_their_update(&mut self, seen: &mut usize, stuck: &[NodeId]) {
        let begins = self.fake.begins();
        for node in &begins[*seen..] {
            self.go_down(node);
            if !stuck.contains(node) {
                self.come_back(node, NEW);
            }
        }
        *seen = begins.len();
    }

    fn events(&self) -> Vec<LogEvent> {
        self.ctl.store.events(None, 100_000).unwrap()
    }
}

/// The most rollout nodes down at once, replayed from the event log: a node is down from its
/// `node_upgrade_started` until `node_upgrade_succeeded` or `node_rolled_back`.
fn max_down_at_once(events: &[LogEvent]) -> usize {
    let mut down = BTreeSet::new();
    let mut max = 0;
    for e in events {
        match e.kind {
            EventKind::Maintenance(MaintenanceEvent::NodeUpgradeStarted) => {
                down.insert(e.node.clone().unwrap());
            }
            EventKind::Maintenance(MaintenanceEvent::NodeUpgradeSucceeded)
            | EventKind::Maintenance(MaintenanceEvent::NodeRolledBack) => {
                down.remove(&e.node.clone().unwrap());
            }
            _ => {}
        }
        max = max.max(down.len());
    }
    max
}

fn kinds(events: &[LogEvent], kind: EventKind) -> Vec<&LogEvent> {
    events.iter().filter(|e| e.kind == kind).collect()
}

#[test]
fn four_nodes_one_at_a_time_as_the_event_log_shows() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = Fixture::open(dir.path(), RolloutClock::default());
    let mut nodes = f.nodes("w", 4, &[("role", "worker")]);
    nodes.sort();
    let other = f.nodes("db", 1, &[("role", "db")]);
    f.start("role=worker", 1, 1, None, Duration::from_secs(900));
    let mut seen = 0;
    let mut last = None;
    for _ in 0..20 {
        let r = f.tick();
        // The node told to update has not gone down yet: still one in flight.
        assert!(r.progress().in_flight <= 1, "{:?}", r.progress());
        f.nodes_do_their_update(&mut seen, &[]);
        if r.is_finished() {
            last = Some(r);
            break;
        }
    }
    let r = last.expect("the rollout finished");
    assert_eq!(r.progress().succeeded, 4, "{r:?}");
    let mut begun = f.fake.begins();
    begun.sort();
    assert_eq!(begun, nodes, "each worker begun once, the db node never");
    assert!(!begun.contains(&other[0]));
    let events = f.events();
    assert_eq!(
        kinds(
            &events,
            EventKind::Maintenance(MaintenanceEvent::NodeUpgradeStarted)
        )
        .len(),
        4
    );
    assert_eq!(
        kinds(
            &events,
            EventKind::Maintenance(MaintenanceEvent::NodeUpgradeSucceeded)
        )
        .len(),
        4
    );
    assert_eq!(max_down_at_once(&events), 1, "never two nodes down at once");
    let done = kinds(
        &events,
        EventKind::Maintenance(MaintenanceEvent::RolloutDone),
    );
    assert!(
        done.len() == 1 && done[0].message.contains("4 succeeded"),
        "{done:?}"
    );
}

#[test]
fn a_budget_holds_a_rollout_with_a_larger_max_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = Fixture::open(dir.path(), RolloutClock::default());
    let etcd = f.nodes("e", 3, &[("role", "etcd")]);
    f.ctl.maint.set_budget("role=etcd", 1, now_ms()).unwrap();
    // One etcd node is already down for another reason: the budget is used up.
    f.go_down(&etcd[2]);
    f.start("role=etcd", 3, 1, None, Duration::from_secs(900));
    let r = f.tick();
    assert!(f.fake.begins().is_empty(), "budget full: {:?}", r.waiting());
    assert!(
        r.waiting()
            .iter()
            .any(|w| matches!(w, shoal_controller_core::rollout::Waiting::Budget { .. })),
        "{:?}",
        r.waiting()
    );
    f.come_back(&etcd[2], OLD);
    let mut seen = 0;
    for _ in 0..20 {
        let r = f.tick();
        f.nodes_do_their_update(&mut seen, &[]);
        if r.is_finished() {
            break;
        }
    }
    assert_eq!(f.fake.begins().len(), 3);
    assert_eq!(
        max_down_at_once(&f.events()),
        1,
        "the budget allowed one etcd node at a time"
    );
}

#[test]
fn a_node_that_never_returns_pauses_the_rollout_and_is_rolled_back_and_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let clock = RolloutClock::default();
    let mut f = Fixture::open(dir.path(), clock.clone());
    let nodes = f.nodes("w", 3, &[("role", "worker")]);
    f.start("role=worker", 1, 1, None, Duration::from_secs(60));
    let mut seen = 0;
    let r = f.tick();
    let first = f.fake.begins()[0].clone();
    f.nodes_do_their_update(&mut seen, std::slice::from_ref(&first));
    assert_eq!(r.progress().in_flight, 1);
    // Nothing more starts while it is away.
    f.tick();
    assert_eq!(f.fake.begins().len(), 1);
    // Its deadline passes: failed, rolled back, and K=1 pauses the rollout.
    clock.set_offset(61_000);
    let r = f.tick();
    assert!(
        matches!(r.state(), RolloutState::Paused { .. }),
        "{:?}",
        r.state()
    );
    assert_eq!(
        f.fake.rollbacks(),
        vec![(first.clone(), Some(OLD.to_owned()))]
    );
    let events = f.events();
    let paused = kinds(
        &events,
        EventKind::Maintenance(MaintenanceEvent::RolloutPaused),
    );
    assert!(
        paused.len() == 1 && paused[0].message.contains("1 node(s) failed"),
        "{paused:?}"
    );
    assert_eq!(
        kinds(
            &events,
            EventKind::Maintenance(MaintenanceEvent::NodeUpgradeFailed)
        )
        .len(),
        1
    );
    // It comes back on its old version: rolled back.
    f.come_back(&first, OLD);
    let r = f.tick();
    assert!(
        matches!(
            r.phase(&first),
            Some(NodePhase::Failed {
                rolled_back: true,
                ..
            })
        ),
        "{:?}",
        r.phase(&first)
    );
    assert_eq!(
        kinds(
            &f.events(),
            EventKind::Maintenance(MaintenanceEvent::NodeRolledBack)
        )
        .len(),
        1
    );
    assert_eq!(f.fake.begins().len(), 1, "paused: nothing else started");
    // Remembered: a later rollout of the same version skips it.
    f.ctl.rollout_command("current", Command::Abort).unwrap();
    f.tick();
    let again = f.start("role=worker", 1, 1, None, Duration::from_secs(60));
    assert!(matches!(
        again.phase(&first),
        Some(NodePhase::Skipped { .. })
    ));
    assert_eq!(f.ctl.maint.failed_versions().unwrap().len(), 1);
    // Until an explicit retry.
    let r = f
        .ctl
        .rollout_command(again.id(), Command::Retry(first.clone()))
        .unwrap();
    assert_eq!(r.phase(&first), Some(&NodePhase::Pending));
    assert!(f.ctl.maint.failed_versions().unwrap().is_empty());
    for _ in 0..20 {
        let r = f.tick();
        f.nodes_do_their_update(&mut seen, &[]);
        if r.is_finished() {
            assert_eq!(r.progress().succeeded, 3, "{:?}", r.progress());
            break;
        }
    }
    assert!(f.fake.begins().iter().filter(|n| **n == first).count() == 2);
    assert_eq!(nodes.len(), 3);
}

#[test]
fn a_closed_window_waits_and_one_that_ends_mid_rollout_starts_no_new_node() {
    let dir = tempfile::tempdir().unwrap();
    let clock = RolloutClock::default();
    let mut f = Fixture::open(dir.path(), clock.clone());
    f.nodes("w", 3, &[("role", "worker")]);
    let at = |s: &str| UnixMillis(s.parse::<jiff::Timestamp>().unwrap().as_millisecond() as u64);
    clock.set_now(at("2030-01-07T01:00:00Z"));
    let w = Window::new(
        "nightly",
        "0 2 * * *",
        Duration::from_secs(3600),
        Some("UTC"),
        None,
    )
    .unwrap();
    f.ctl.maint.create_window(&w, clock.now()).unwrap();
    f.start(
        "role=worker",
        1,
        1,
        Some("nightly"),
        Duration::from_secs(4 * 3600),
    );
    let r = f.tick();
    assert!(f.fake.begins().is_empty(), "window closed");
    assert_eq!(
        r.waiting(),
        &[shoal_controller_core::rollout::Waiting::WindowClosed]
    );
    // Deleting the window is refused while the rollout uses it.
    assert!(matches!(
        f.ctl.maint.delete_window("nightly", clock.now()),
        Err(MaintError::WindowInUse { .. })
    ));

    let mut seen = 0;
    clock.set_now(at("2030-01-07T02:00:00Z"));
    f.tick();
    assert_eq!(f.fake.begins().len(), 1, "opened: one node starts");
    f.nodes_do_their_update(&mut seen, &[]);
    clock.set_now(at("2030-01-07T02:59:00Z"));
    f.tick();
    assert_eq!(f.fake.begins().len(), 2, "still open: the next starts");
    f.nodes_do_their_update(&mut seen, &[]);
    // The window closes with the second node in flight: it finishes, the third waits.
    clock.set_now(at("2030-01-07T03:00:30Z"));
    let r = f.tick();
    assert_eq!(r.progress().succeeded, 2);
    assert_eq!(f.fake.begins().len(), 2, "closed: no new node");
    assert_eq!(
        r.waiting(),
        &[shoal_controller_core::rollout::Waiting::WindowClosed]
    );
    // The next night it continues.
    clock.set_now(at("2030-01-08T02:00:10Z"));
    f.tick();
    f.nodes_do_their_update(&mut seen, &[]);
    let r = f.tick();
    assert!(
        r.is_finished() && r.progress().succeeded == 3,
        "{:?}",
        r.progress()
    );
    // Every start happened inside the window (event times are the driver's clock).
    for e in kinds(
        &f.events(),
        EventKind::Maintenance(MaintenanceEvent::NodeUpgradeStarted),
    ) {
        assert!(
            w.is_open(e.at).is_some(),
            "started outside the window: {e:?}"
        );
    }
}

#[test]
fn a_controller_restart_mid_rollout_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, first) = {
        let mut f = Fixture::open(dir.path(), RolloutClock::default());
        let nodes = f.nodes("w", 3, &[("role", "worker")]);
        f.start("role=worker", 1, 1, None, Duration::from_secs(900));
        f.tick();
        let first = f.fake.begins()[0].clone();
        // The controller stops before the node acknowledged (or did anything).
        (nodes, first)
    };
    let mut f = Fixture::open(dir.path(), RolloutClock::default());
    for n in &nodes {
        f.come_back(n, OLD);
    }
    let r = f.tick();
    assert!(
        matches!(r.phase(&first), Some(NodePhase::Upgrading { .. })),
        "resumed in flight: {:?}",
        r.phase(&first)
    );
    assert_eq!(
        f.fake.begins(),
        vec![first.clone()],
        "the unacknowledged begin was sent again, and nothing else started"
    );
    let mut seen = 0;
    for _ in 0..20 {
        f.nodes_do_their_update(&mut seen, &[]);
        let r = f.tick();
        if r.is_finished() {
            assert_eq!(r.progress().succeeded, 3);
            break;
        }
    }
    assert!(f.ctl.maint.rollout("current").unwrap().is_finished());
    assert_eq!(max_down_at_once(&f.events()), 1);
    assert_eq!(
        kinds(
            &f.events(),
            EventKind::Maintenance(MaintenanceEvent::NodeUpgradeStarted)
        )
        .len(),
        3,
        "each node started once across the restart"
    );
}

fn api_status<T: fmt::Debug>(r: Result<T, AdminClientError>) -> (u16, String) {
    match r {
        Err(AdminClientError::Api { status, message }) => (status, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[test]
fn windows_budgets_and_rollouts_over_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = ControllerConfig::for_tests(dir.path().to_owned());
    let ctl = Controller::open(config, listener.local_addr().unwrap()).unwrap();
    let handle = {
        let _enter = rt.enter();
        crate::api::serve(ctl.clone(), listener).unwrap()
    };
    let client =
        AdminClient::new(&AdminConf::read(&dir.path().join(ADMIN_CONF_FILE)).unwrap()).unwrap();
    let window = |name: &str, schedule: &str, secs: u64, tz: Option<&str>| CreateWindow {
        name: name.into(),
        schedule: schedule.into(),
        duration_secs: secs,
        tz: tz.map(str::to_owned),
        selector: None,
    };
    let (code, msg) = api_status(
        client.post::<WindowView>("/v1/windows", &window("w", "0 25 * * *", 3600, None)),
    );
    assert!(
        code == 400 && msg.contains("not valid cron"),
        "{code} {msg}"
    );
    let (code, msg) = api_status(client.post::<WindowView>(
        "/v1/windows",
        &window("w", "0 2 * * *", 3600, Some("Mars/Olympus")),
    ));
    assert!(
        code == 400 && msg.contains("unknown time zone"),
        "{code} {msg}"
    );
    let (code, msg) =
        api_status(client.post::<WindowView>("/v1/windows", &window("w", "0 2 * * *", 10, None)));
    assert!(code == 400 && msg.contains("out of range"), "{code} {msg}");
    let (code, msg) = api_status(
        client.post::<WindowView>("/v1/windows", &window("w", "0 0 30 2 *", 3600, None)),
    );
    assert!(code == 400 && msg.contains("never fires"), "{code} {msg}");
    let w: WindowView = client
        .post(
            "/v1/windows",
            &window("nightly", "30 2 * * SAT", 4 * 3600, Some("Europe/Berlin")),
        )
        .unwrap();
    assert!(w.opens_at.is_some() && w.tz == "Europe/Berlin");
    assert_eq!(
        api_status(
            client.post::<WindowView>("/v1/windows", &window("nightly", "@daily", 3600, None))
        )
        .0,
        409
    );
    let all: Vec<WindowView> = client.get("/v1/windows").unwrap();
    assert_eq!(
        all.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
        ["nightly"]
    );

    crate::test_support::enrol_for_tests(&ctl.store, "e0", &[("role", "etcd")], now_ms());
    let b: BudgetView = client
        .post(
            "/v1/budgets",
            &SetBudget {
                selector: "role=etcd".into(),
                max_unavailable: 1,
            },
        )
        .unwrap();
    assert_eq!(
        (b.selector.as_str(), b.max_unavailable, b.nodes),
        ("role=etcd", 1, 1)
    );
    assert_eq!(
        api_status(client.post::<BudgetView>(
            "/v1/budgets",
            &SetBudget {
                selector: "role in ()".into(),
                max_unavailable: 1
            }
        ))
        .0,
        400
    );
    assert_eq!(
        api_status(client.post::<BudgetView>(
            "/v1/budgets",
            &SetBudget {
                selector: "a=b".into(),
                max_unavailable: 0
            }
        ))
        .0,
        400
    );
    let list: Vec<BudgetView> = client.get("/v1/budgets").unwrap();
    assert_eq!(list.len(), 1);

    // Image rollouts are installed (the agent path's rebooter); an image not in the store is
    // refused.
    let start = StartRollout {
        image: Some("2030.1".into()),
        selector: Some("role=etcd".into()),
        ..Default::default()
    };
    let (code, msg) = api_status(client.post::<RolloutView>("/v1/rollouts", &start));
    assert!(code == 400 && msg.contains("2030.1"), "{code} {msg}");
    ctl.set_upgrader(TargetKind::Agent, Arc::new(FakeUpgrader::default()));
    let both = StartRollout {
        agent: Some("1".into()),
        image: Some("2".into()),
        ..Default::default()
    };
    assert_eq!(
        api_status(client.post::<RolloutView>("/v1/rollouts", &both)).0,
        400
    );
    let start = StartRollout {
        agent: Some(NEW.into()),
        selector: Some("role=etcd".into()),
        window: Some("nightly".into()),
        ..Default::default()
    };
    let r: RolloutView = client.post("/v1/rollouts", &start).unwrap();
    assert_eq!(
        (r.id.as_str(), r.state.as_str(), r.progress.total),
        ("r1", "running", 1)
    );
    assert_eq!(
        api_status(client.delete::<serde_json::Value>("/v1/windows/nightly")).0,
        409
    );
    let r: RolloutView = client
        .post("/v1/rollouts/current/pause", &serde_json::json!({}))
        .unwrap();
    assert_eq!(r.state, "paused");
    let r: RolloutView = client
        .post("/v1/rollouts/r1/abort", &serde_json::json!({}))
        .unwrap();
    assert!(r.state == "aborted" && r.finished);
    assert_eq!(
        api_status(client.post::<RolloutView>("/v1/rollouts/r1/resume", &serde_json::json!({}))).0,
        409
    );
    assert_eq!(
        api_status(client.get::<RolloutView>("/v1/rollouts/r9")).0,
        404
    );
    client
        .delete::<serde_json::Value>("/v1/windows/nightly")
        .unwrap();
    client
        .delete::<serde_json::Value>("/v1/budgets/role=etcd")
        .unwrap();
    assert_eq!(
        api_status(client.delete::<serde_json::Value>("/v1/budgets/role=etcd")).0,
        404
    );
    let kinds: Vec<String> = ctl
        .store
        .events(None, 1000)
        .unwrap()
        .iter()
        .map(|e| e.kind.name().to_owned())
        .collect();
    for k in [
        "window_created",
        "budget_set",
        "rollout_started",
        "rollout_paused",
        "rollout_aborted",
        "window_deleted",
        "budget_deleted",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }
    handle.shutdown();
}

#[test]
fn node_events_from_the_agent_path_drive_the_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = Fixture::open(dir.path(), RolloutClock::default());
    f.nodes("w", 3, &[("role", "worker")]);
    f.start("role=worker", 1, 2, None, Duration::from_secs(900));
    f.tick();
    let a = f.fake.begins()[0].clone();
    f.ctl
        .rollout_event(Event::Acknowledged { node: a.clone() })
        .unwrap();
    let r = f.ctl.maint.rollout("current").unwrap();
    assert!(matches!(
        r.phase(&a),
        Some(NodePhase::Upgrading {
            acknowledged: true,
            ..
        })
    ));
    assert!(
        r.resend_after_restart().is_empty(),
        "an acknowledged begin is not repeated after a restart"
    );
    // Its checks fail on the new version: failed and rolled back (K=2: not paused yet).
    f.ctl
        .rollout_event(Event::Reported {
            node: a.clone(),
            version: NEW.into(),
            health: ReportedHealth::Failed(vec!["overlay".into()]),
        })
        .unwrap();
    assert_eq!(f.fake.rollbacks(), vec![(a.clone(), Some(OLD.to_owned()))]);
    let r = f.tick();
    assert_eq!(r.state(), &RolloutState::Running);
    // The next node refuses (bad signature): failed without a roll-back, and K=2 pauses.
    let b = f.fake.begins()[1].clone();
    f.ctl
        .rollout_event(Event::Refused {
            node: b.clone(),
            reason: "bad signature".into(),
        })
        .unwrap();
    let r = f.ctl.maint.rollout("current").unwrap();
    assert!(
        matches!(
            r.phase(&b),
            Some(NodePhase::Failed {
                rolled_back: true,
                ..
            })
        ),
        "{:?}",
        r.phase(&b)
    );
    assert!(matches!(r.state(), RolloutState::Paused { .. }));
    assert_eq!(
        f.fake.rollbacks().len(),
        1,
        "nothing to roll back on a refusal"
    );
    let failed: Vec<String> = kinds(
        &f.events(),
        EventKind::Maintenance(MaintenanceEvent::NodeUpgradeFailed),
    )
    .iter()
    .map(|e| e.message.clone())
    .collect();
    assert!(
        failed[0].contains("health checks failed: overlay")
            && failed[1].contains("refused: bad signature"),
        "{failed:?}"
    );
}

#[test]
fn a_node_that_refuses_to_reboot_is_failed_and_rolled_back_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = Fixture::open(dir.path(), RolloutClock::default());
    f.nodes("w", 2, &[("role", "worker")]);
    f.start("role=worker", 1, 1, None, Duration::from_secs(900));
    f.tick();
    let a = f.fake.begins()[0].clone();
    f.ctl.reboot_answered(
        &a,
        Err("remote reboots are disabled on this node (--no-remote-reboot)".into()),
    );
    let r = f.ctl.maint.rollout("current").unwrap();
    assert!(
        matches!(r.phase(&a), Some(NodePhase::RollingBack { .. })),
        "{:?}",
        r.phase(&a)
    );
    assert_eq!(
        f.fake.rollbacks(),
        vec![(a.clone(), Some(OLD.to_owned()))],
        "rolled back without waiting for the deadline"
    );
    assert!(matches!(r.state(), RolloutState::Paused { .. }));
    // It never left its version: the next pass settles it as rolled back.
    let r = f.tick();
    assert!(
        matches!(
            r.phase(&a),
            Some(NodePhase::Failed {
                rolled_back: true,
                ..
            })
        ),
        "{:?}",
        r.phase(&a)
    );
    let failed: Vec<String> = kinds(
        &f.events(),
        EventKind::Maintenance(MaintenanceEvent::NodeUpgradeFailed),
    )
    .iter()
    .map(|e| e.message.clone())
    .collect();
    assert!(
        failed[0].contains("refused to reboot: remote reboots are disabled"),
        "{failed:?}"
    );
}
