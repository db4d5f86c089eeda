//! Rollout planner tests: scenarios first, then random fleets checked against the invariants.

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::*;
use crate::windows::AlwaysOpen;

const T0: UnixMillis = UnixMillis(1_800_000_000_000);
const OLD: &str = "0.1.0";
const NEW: &str = "0.2.0";

fn n(s: &str) -> NodeId {
    NodeId(s.into())
}

fn at(secs: u64) -> UnixMillis {
    UnixMillis(T0.0 + secs * 1000)
}

fn node(labels: &[(&str, &str)]) -> Observed {
    Observed {
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        up: true,
        healthy: true,
        version: Some(OLD.into()),
        busy: false,
    }
}

fn fleet(nodes: &[(&str, &[(&str, &str)])]) -> Fleet {
    nodes
        .iter()
        .map(|(id, labels)| (n(id), node(labels)))
        .collect()
}

fn workers(count: usize) -> Fleet {
    (0..count)
        .map(|i| (n(&format!("w{i}")), node(&[("role", "worker")])))
        .collect()
}

fn spec(max_unavailable: u32, max_failures: u32) -> RolloutSpec {
    RolloutSpec {
        max_unavailable,
        max_failures,
        ..RolloutSpec::new(Target::Agent(NEW.into()))
    }
}

fn rollout(spec: RolloutSpec, fleet: &Fleet) -> Rollout {
    Rollout::new("r1", spec, fleet.keys().cloned(), &BTreeSet::new(), T0).expect("valid rollout")
}

fn begun(actions: &[Action]) -> Vec<NodeId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::BeginUpgrade { node, .. } => Some(node.clone()),
            _ => None,
        })
        .collect()
}

fn rolled_back(actions: &[Action]) -> Vec<NodeId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::RollBack { node, .. } => Some(node.clone()),
            _ => None,
        })
        .collect()
}

/// The node went down for its update, then reports the new version healthy; the fleet sees it.
fn upgraded(r: &mut Rollout, f: &mut Fleet, id: &str, now: UnixMillis) -> Vec<Action> {
    let o = f.get_mut(&n(id)).expect("in fleet");
    o.version = Some(NEW.into());
    o.up = true;
    r.handle(
        Event::Reported {
            node: n(id),
            version: NEW.into(),
            health: ReportedHealth::Healthy,
        },
        now,
    )
}

#[test]
fn zero_limits_and_empty_rollouts_are_refused() {
    let f = workers(2);
    let none = BTreeSet::new();
    assert_eq!(
        Rollout::new("r", spec(0, 1), f.keys().cloned(), &none, T0),
        Err(RolloutError::ZeroLimit("max_unavailable"))
    );
    assert_eq!(
        Rollout::new("r", spec(1, 0), f.keys().cloned(), &none, T0),
        Err(RolloutError::ZeroLimit("max_failures"))
    );
    assert_eq!(
        Rollout::new("r", spec(1, 1), Vec::new(), &none, T0),
        Err(RolloutError::NoNodes)
    );
}

#[test]
fn one_at_a_time_in_order_until_done() {
    let mut f = workers(3);
    let mut r = rollout(spec(1, 1), &f);
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(0))), vec![n("w0")]);
    assert_eq!(
        r.poll(&f, &[], &AlwaysOpen, at(1)),
        vec![],
        "w0 is in flight: N=1 is used"
    );
    assert_eq!(r.waiting(), &[Waiting::MaxUnavailable { unavailable: 1 }]);
    // Still reporting the old version before the swap is not news.
    r.handle(Event::Acknowledged { node: n("w0") }, at(2));
    r.handle(
        Event::Reported {
            node: n("w0"),
            version: OLD.into(),
            health: ReportedHealth::Healthy,
        },
        at(3),
    );
    assert_eq!(r.phase(&n("w0")).map(NodePhase::as_str), Some("upgrading"));
    upgraded(&mut r, &mut f, "w0", at(10));
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(10))), vec![n("w1")]);
    upgraded(&mut r, &mut f, "w1", at(20));
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(20))), vec![n("w2")]);
    upgraded(&mut r, &mut f, "w2", at(30));
    let done = r.poll(&f, &[], &AlwaysOpen, at(30));
    assert_eq!(
        done,
        vec![Action::Done {
            succeeded: 3,
            failed: 0,
            skipped: 0
        }]
    );
    assert!(r.is_finished());
    assert_eq!(
        r.progress(),
        Progress {
            total: 3,
            succeeded: 3,
            ..Progress::default()
        }
    );
    assert_eq!(
        r.poll(&f, &[], &AlwaysOpen, at(31)),
        vec![],
        "done is reported once"
    );
}

#[test]
fn nodes_down_for_other_reasons_count_against_max_unavailable() {
    let mut f = workers(4);
    f.get_mut(&n("w3")).expect("w3").up = false;
    let mut r = rollout(spec(2, 1), &f);
    // w3 is down already: only one more may go.
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(0))), vec![n("w0")]);
    assert!(
        r.waiting()
            .contains(&Waiting::MaxUnavailable { unavailable: 2 }),
        "{:?}",
        r.waiting()
    );
    // A busy (in maintenance) or unhealthy node counts too.
    let mut f = workers(3);
    f.get_mut(&n("w1")).expect("w1").busy = true;
    f.get_mut(&n("w2")).expect("w2").healthy = false;
    let mut r = rollout(spec(2, 1), &f);
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(0))), vec![]);
    // With room, a down pending node is waited for, not started.
    let mut r = rollout(spec(4, 1), &f);
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(0))), vec![n("w0")]);
    assert!(
        r.waiting().contains(&Waiting::NodesUnavailable {
            nodes: vec![n("w1"), n("w2")]
        }),
        "{:?}",
        r.waiting()
    );
}

#[test]
fn an_etcd_budget_keeps_one_member_down_at_a_time_across_the_fleet() {
    let mut f = fleet(&[
        ("e1", &[("role", "etcd")]),
        ("e2", &[("role", "etcd")]),
        ("e3", &[("role", "etcd")]),
        ("w1", &[("role", "worker")]),
        ("w2", &[("role", "worker")]),
    ]);
    let budgets = [Budget {
        selector: Selector::equals("role", "etcd"),
        max_unavailable: 1,
    }];
    let mut r = rollout(spec(5, 1), &f);
    assert_eq!(
        begun(&r.poll(&f, &budgets, &AlwaysOpen, at(0))),
        vec![n("e1"), n("w1"), n("w2")]
    );
    assert!(r.waiting().contains(&Waiting::Budget {
        selector: "role=etcd".into(),
        unavailable: 1,
        max: 1
    }));
    upgraded(&mut r, &mut f, "e1", at(10));
    assert_eq!(
        begun(&r.poll(&f, &budgets, &AlwaysOpen, at(10))),
        vec![n("e2")]
    );

    // An etcd member outside the rollout that is down uses the budget up.
    let mut f = fleet(&[
        ("e1", &[("role", "etcd")]),
        ("e2", &[("role", "etcd")]),
        ("e9", &[("role", "etcd")]),
    ]);
    f.get_mut(&n("e9")).expect("e9").up = false;
    let mut r =
        Rollout::new("r", spec(3, 1), [n("e1"), n("e2")], &BTreeSet::new(), T0).expect("valid");
    assert_eq!(begun(&r.poll(&f, &budgets, &AlwaysOpen, at(0))), vec![]);
    f.get_mut(&n("e9")).expect("e9").up = true;
    assert_eq!(
        begun(&r.poll(&f, &budgets, &AlwaysOpen, at(1))),
        vec![n("e1")]
    );
}

#[test]
fn no_node_starts_while_the_window_is_closed_but_nodes_in_flight_finish() {
    let mut f = workers(3);
    let open = std::cell::Cell::new(true);
    let window = |t: UnixMillis| open.get().then_some(UnixMillis(t.0 + 3_600_000));
    let mut r = rollout(spec(1, 1), &f);
    assert_eq!(begun(&r.poll(&f, &[], &window, at(0))), vec![n("w0")]);
    open.set(false);
    // The node in flight finishes after the window ended.
    upgraded(&mut r, &mut f, "w0", at(100));
    assert_eq!(r.poll(&f, &[], &window, at(100)), vec![]);
    assert_eq!(r.waiting(), &[Waiting::WindowClosed]);
    assert_eq!(r.phase(&n("w0")).map(NodePhase::as_str), Some("succeeded"));
    assert_eq!(
        *r.state(),
        RolloutState::Running,
        "a closed window is not a pause"
    );
    // The next window opens: on with the rest.
    open.set(true);
    assert_eq!(begun(&r.poll(&f, &[], &window, at(90_000))), vec![n("w1")]);
}

#[test]
fn a_node_is_not_started_when_the_window_closes_too_soon() {
    let f = workers(1);
    let mut s = spec(1, 1);
    s.min_window_left = Duration::from_secs(600);
    let mut r = rollout(s, &f);
    let window = |_at: UnixMillis| Some(at(300));
    assert_eq!(r.poll(&f, &[], &window, at(0)), vec![]);
    assert_eq!(
        r.waiting(),
        &[Waiting::WindowClosing { closes_at: at(300) }]
    );
    let window = |_at: UnixMillis| Some(at(600));
    assert_eq!(begun(&r.poll(&f, &[], &window, at(0))), vec![n("w0")]);
}

#[test]
fn k_failures_pause_and_every_failed_node_is_rolled_back() {
    let mut f = workers(5);
    let mut r = rollout(spec(2, 2), &f);
    assert_eq!(
        begun(&r.poll(&f, &[], &AlwaysOpen, at(0))),
        vec![n("w0"), n("w1")]
    );
    // w0 comes up on the new version with a failed check: roll it back, one failure of two.
    let a = r.handle(
        Event::Reported {
            node: n("w0"),
            version: NEW.into(),
            health: ReportedHealth::Failed(vec!["overlay".into()]),
        },
        at(10),
    );
    assert_eq!(
        a,
        vec![Action::RollBack {
            node: n("w0"),
            to: Some(OLD.into()),
            target: Target::Agent(NEW.into())
        }]
    );
    assert_eq!(*r.state(), RolloutState::Running);
    // w0 is still unavailable while rolling back: nothing new.
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(11))), vec![]);
    // Back on the old version: settled as failed, rolled back.
    r.handle(
        Event::Reported {
            node: n("w0"),
            version: OLD.into(),
            health: ReportedHealth::Healthy,
        },
        at(20),
    );
    assert!(matches!(
        r.phase(&n("w0")),
        Some(NodePhase::Failed {
            rolled_back: true,
            ..
        })
    ));
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(20))), vec![n("w2")]);
    // w1 refuses (say, disk full during the swap): nothing to roll back, second failure: pause.
    let a = r.handle(
        Event::Refused {
            node: n("w1"),
            reason: "installing the new binary failed: disk full".into(),
        },
        at(30),
    );
    assert_eq!(rolled_back(&a), vec![]);
    let Some(Action::Paused {
        reason: PauseReason::TooManyFailures { failed },
    }) = a.first()
    else {
        panic!("expected a pause, got {a:?}")
    };
    assert_eq!(
        failed.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        vec![n("w0"), n("w1")]
    );
    assert!(r.state().clone() != RolloutState::Running);
    let reason = match r.state() {
        RolloutState::Paused { reason, .. } => reason.to_string(),
        other => panic!("{other:?}"),
    };
    assert!(
        reason.contains("disk full") && reason.contains("overlay"),
        "{reason}"
    );
    // Paused: w2 in flight finishes, nothing new starts.
    upgraded(&mut r, &mut f, "w2", at(40));
    assert_eq!(r.poll(&f, &[], &AlwaysOpen, at(40)), vec![]);
    assert_eq!(r.failed_nodes(), BTreeSet::from([n("w0"), n("w1")]));
    // Resume: the failure count starts over; failed nodes are not tried again.
    r.command(Command::Resume, at(50)).expect("resume");
    assert_eq!(
        begun(&r.poll(&f, &[], &AlwaysOpen, at(50))),
        vec![n("w3"), n("w4")]
    );
}

#[test]
fn a_node_that_never_returns_is_rolled_back_then_left_for_an_operator() {
    let mut f = workers(2);
    let mut s = spec(1, 3);
    s.upgrade_deadline = Duration::from_secs(600);
    s.rollback_deadline = Duration::from_secs(300);
    let mut r = rollout(s, &f);
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(0))), vec![n("w0")]);
    f.get_mut(&n("w0")).expect("w0").up = false;
    assert_eq!(r.poll_timeout(), Some(at(600)));
    assert_eq!(r.poll(&f, &[], &AlwaysOpen, at(599)), vec![]);
    let a = r.poll(&f, &[], &AlwaysOpen, at(600));
    assert_eq!(rolled_back(&a), vec![n("w0")]);
    assert!(matches!(
        r.phase(&n("w0")),
        Some(NodePhase::RollingBack {
            failure: Failure::Deadline,
            ..
        })
    ));
    assert_eq!(r.poll_timeout(), Some(at(900)));
    r.poll(&f, &[], &AlwaysOpen, at(900));
    assert!(matches!(
        r.phase(&n("w0")),
        Some(NodePhase::Failed {
            rolled_back: false,
            ..
        })
    ));
    // Still down, so still unavailable: w1 waits (N=1) rather than take a second node down.
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(901))), vec![]);
    f.get_mut(&n("w0")).expect("w0").up = true;
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(902))), vec![n("w1")]);
}

#[test]
fn a_version_that_failed_on_a_node_is_not_pushed_again_without_a_retry() {
    let f = workers(3);
    let failed_before = BTreeSet::from([n("w0")]);
    let mut r =
        Rollout::new("r", spec(3, 1), f.keys().cloned(), &failed_before, T0).expect("valid");
    assert_eq!(
        begun(&r.poll(&f, &[], &AlwaysOpen, at(0))),
        vec![n("w1"), n("w2")]
    );
    assert_eq!(
        r.phase(&n("w0")),
        Some(&NodePhase::Skipped {
            reason: SkipReason::FailedBefore
        })
    );
    assert!(matches!(
        r.command(Command::Retry(n("w1")), at(1)),
        Err(RolloutError::NotRetryable { .. })
    ));
    assert!(matches!(
        r.command(Command::Retry(n("zz")), at(1)),
        Err(RolloutError::UnknownNode(_))
    ));
    r.command(Command::Retry(n("w0")), at(1)).expect("retry");
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(2))), vec![n("w0")]);
}

#[test]
fn nodes_already_on_the_target_or_gone_settle_without_work() {
    let mut f = workers(3);
    f.get_mut(&n("w0")).expect("w0").version = Some(NEW.into());
    let mut r = rollout(spec(1, 1), &f);
    f.remove(&n("w1"));
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(0))), vec![n("w2")]);
    assert_eq!(
        r.phase(&n("w0")),
        Some(&NodePhase::Succeeded {
            at: at(0),
            already: true
        })
    );
    assert_eq!(
        r.phase(&n("w1")),
        Some(&NodePhase::Skipped {
            reason: SkipReason::Removed
        })
    );
}

#[test]
fn pause_resume_and_abort() {
    let mut f = workers(3);
    let mut r = rollout(spec(1, 1), &f);
    assert_eq!(
        r.command(Command::Pause, at(0)).expect("pause"),
        vec![Action::Paused {
            reason: PauseReason::Operator
        }]
    );
    assert_eq!(r.poll(&f, &[], &AlwaysOpen, at(1)), vec![]);
    r.command(Command::Resume, at(2)).expect("resume");
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(3))), vec![n("w0")]);
    r.command(Command::Abort, at(4)).expect("abort");
    assert!(!r.is_finished(), "w0 is still in flight");
    assert!(matches!(
        r.command(Command::Resume, at(5)),
        Err(RolloutError::BadState { .. })
    ));
    upgraded(&mut r, &mut f, "w0", at(6));
    assert_eq!(r.poll(&f, &[], &AlwaysOpen, at(6)), vec![]);
    assert!(r.is_finished());
    assert_eq!(r.phase(&n("w1")), Some(&NodePhase::Pending));
}

#[test]
fn a_restarted_controller_resumes_exactly_and_resends_what_may_be_lost() {
    let mut f = workers(3);
    let mut r = rollout(spec(2, 1), &f);
    r.poll(&f, &[], &AlwaysOpen, at(0));
    r.handle(Event::Acknowledged { node: n("w0") }, at(1));
    let stored = postcard::to_allocvec(&r).expect("encode");
    let mut back: Rollout = postcard::from_bytes(&stored).expect("decode");
    assert_eq!(back, r);
    // w1 never acknowledged: its begin command may be lost. w0's is not resent.
    assert_eq!(
        back.resend_after_restart(),
        vec![Action::BeginUpgrade {
            node: n("w1"),
            target: Target::Agent(NEW.into())
        }]
    );
    // Both copies go on identically.
    upgraded(&mut r, &mut f.clone(), "w0", at(5));
    upgraded(&mut back, &mut f, "w0", at(5));
    assert_eq!(
        r.poll(&f, &[], &AlwaysOpen, at(5)),
        back.poll(&f, &[], &AlwaysOpen, at(5))
    );
    assert_eq!(r, back);
    // JSON too, for the admin API's status.
    let json = serde_json::to_string(&back).expect("json");
    assert!(json.contains("\"upgrading\""), "{json}");
}

// --- Random fleets -----------------------------------------------------------------------------

/// How a node behaves when told to upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Succeeds,
    FailsChecks,
    Refuses,
    NeverReturns,
}

#[derive(Debug, Clone)]
struct SimNode {
    behaviour: Behaviour,
    /// When the node next reports, and what.
    due: Option<(UnixMillis, Event)>,
    /// Down for reasons of its own.
    outage: bool,
    /// In the rollout's hands: down while upgrading or rolling back.
    rebooting: bool,
    version: String,
}

struct Sim {
    rng: StdRng,
    fleet: Fleet,
    nodes: BTreeMap<NodeId, SimNode>,
    budgets: Vec<Budget>,
    targets: BTreeSet<NodeId>,
    failed_before: BTreeSet<NodeId>,
}

impl Sim {
    fn new(seed: u64, outages: bool) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let count = rng.random_range(3..25);
        let mut fleet = Fleet::new();
        let mut nodes = BTreeMap::new();
        for i in 0..count {
            let role = ["etcd", "worker", "worker", "storage"][rng.random_range(0..4)];
            let zone = ["a", "b", "c"][rng.random_range(0..3)];
            let mut o = node(&[("role", role), ("zone", zone)]);
            if outages && rng.random_bool(0.1) {
                o.up = false;
            }
            let behaviour = match rng.random_range(0..10) {
                0 => Behaviour::FailsChecks,
                1 => Behaviour::Refuses,
                2 => Behaviour::NeverReturns,
                _ => Behaviour::Succeeds,
            };
            let id = n(&format!("n{i:02}"));
            nodes.insert(
                id.clone(),
                SimNode {
                    behaviour,
                    due: None,
                    outage: !o.up,
                    rebooting: false,
                    version: OLD.into(),
                },
            );
            fleet.insert(id, o);
        }
        let budgets = vec![
            Budget {
                selector: Selector::equals("role", "etcd"),
                max_unavailable: 1,
            },
            Budget {
                selector: Selector::equals("zone", "a"),
                max_unavailable: rng.random_range(1..4),
            },
        ];
        let targets: BTreeSet<NodeId> = fleet
            .keys()
            .filter(|_| rng.random_bool(0.8))
            .cloned()
            .collect();
        let failed_before = targets
            .iter()
            .filter(|_| rng.random_bool(0.1))
            .cloned()
            .collect();
        Sim {
            rng,
            fleet,
            nodes,
            budgets,
            targets,
            failed_before,
        }
    }

    fn observe(&mut self) {
        for (id, s) in &self.nodes {
            let o = self.fleet.get_mut(id).expect("in fleet");
            o.up = !s.outage && !s.rebooting;
            o.version = Some(s.version.clone());
        }
    }

    /// Carries out the planner's actions on the simulated nodes.
    fn act(&mut self, actions: &[Action], now: UnixMillis) {
        for a in actions {
            match a {
                Action::BeginUpgrade { node, .. } => {
                    let delay = self.rng.random_range(30..400) * 1000;
                    let s = self.nodes.get_mut(node).expect("known");
                    let when = UnixMillis(now.0 + delay);
                    s.rebooting = s.behaviour != Behaviour::Refuses;
                    s.due = match s.behaviour {
                        Behaviour::Succeeds => Some((
                            when,
                            Event::Reported {
                                node: node.clone(),
                                version: NEW.into(),
                                health: ReportedHealth::Healthy,
                            },
                        )),
                        Behaviour::FailsChecks => Some((
                            when,
                            Event::Reported {
                                node: node.clone(),
                                version: NEW.into(),
                                health: ReportedHealth::Failed(vec!["disk".into()]),
                            },
                        )),
                        Behaviour::Refuses => Some((
                            when,
                            Event::Refused {
                                node: node.clone(),
                                reason: "bad signature".into(),
                            },
                        )),
                        Behaviour::NeverReturns => None,
                    };
                }
                Action::RollBack { node, to, .. } => {
                    let delay = self.rng.random_range(30..200) * 1000;
                    let s = self.nodes.get_mut(node).expect("known");
                    s.rebooting = true;
                    let version = to.clone().unwrap_or_else(|| OLD.into());
                    s.due = Some((
                        UnixMillis(now.0 + delay),
                        Event::Reported {
                            node: node.clone(),
                            version,
                            health: ReportedHealth::Healthy,
                        },
                    ));
                }
                Action::Paused { .. } | Action::Done { .. } => {}
            }
        }
    }

    /// Events due by `now`, applied to the simulated nodes.
    fn due_events(&mut self, now: UnixMillis) -> Vec<Event> {
        let mut out = Vec::new();
        for s in self.nodes.values_mut() {
            if let Some((when, event)) = s.due.clone() {
                if when <= now {
                    s.due = None;
                    s.rebooting = false;
                    if let Event::Reported { version, .. } = &event {
                        s.version = version.clone();
                    }
                    out.push(event);
                }
            }
        }
        out
    }

    /// Unavailable nodes among `nodes` as the planner must count them.
    fn unavailable(&self, r: &Rollout, nodes: impl Iterator<Item = NodeId>) -> u32 {
        nodes
            .filter(|id| {
                let o = &self.fleet[id];
                !o.up || !o.healthy || o.busy || r.phase(id).is_some_and(NodePhase::in_flight)
            })
            .count() as u32
    }
}

/// What a random run went through, so the suite can check it was not vacuous.
#[derive(Debug, Default)]
struct Stats {
    started: u32,
    rolled_back: u32,
    refused: u32,
    pauses: u32,
    restarts: u32,
    window_waits: u32,
    budget_waits: u32,
    finished: u32,
}

/// Runs random fleets through rollouts, checking the invariants at every step.
fn run_random(seed: u64, outages: bool, stats: &mut Stats) {
    let mut sim = Sim::new(seed, outages);
    if sim.targets.is_empty() {
        return;
    }
    let mut s = spec(sim.rng.random_range(1..4), sim.rng.random_range(1..4));
    s.upgrade_deadline = Duration::from_secs(600);
    s.rollback_deadline = Duration::from_secs(300);
    let (n_max, k_max) = (s.max_unavailable, s.max_failures);
    let mut r =
        Rollout::new("r", s, sim.targets.iter().cloned(), &sim.failed_before, T0).expect("valid");
    // The window: open for 20 minutes of every hour.
    let window = |t: UnixMillis| {
        let hour = t.0 / 3_600_000;
        (t.0 % 3_600_000 < 1_200_000).then_some(UnixMillis(hour * 3_600_000 + 1_200_000))
    };
    let mut started: BTreeMap<NodeId, u32> = BTreeMap::new();
    let mut rollbacks: BTreeMap<NodeId, u32> = BTreeMap::new();
    let mut pauses = 0;
    for step in 0..2000u64 {
        let now = at(step * 30);
        // Nodes come and go for reasons of their own.
        if outages && sim.rng.random_bool(0.05) {
            let i = sim.rng.random_range(0..sim.nodes.len());
            if let Some(s) = sim.nodes.values_mut().nth(i) {
                s.outage = !s.outage;
            }
        }
        for event in sim.due_events(now) {
            let actions = r.handle(event, now);
            sim.act(&actions, now);
            for a in &actions {
                match a {
                    Action::RollBack { node, .. } => {
                        *rollbacks.entry(node.clone()).or_default() += 1
                    }
                    Action::Paused { .. } => pauses += 1,
                    _ => {}
                }
            }
        }
        sim.observe();
        let was_running = *r.state() == RolloutState::Running;
        let actions = r.poll(&sim.fleet, &sim.budgets, &window, now);
        let starts = begun(&actions);
        if !starts.is_empty() {
            assert!(
                was_running,
                "seed {seed}: a node was started while {:?}",
                r.state()
            );
            assert!(
                window(now).is_some(),
                "seed {seed}: started {starts:?} with the window closed"
            );
            // Counting the nodes just started, no limit is exceeded.
            let u = sim.unavailable(&r, sim.targets.iter().cloned());
            assert!(
                u <= n_max,
                "seed {seed} step {step}: {u} unavailable > N={n_max} after starting {starts:?}"
            );
            for b in &sim.budgets {
                let group = sim
                    .fleet
                    .iter()
                    .filter(|(_, o)| b.selector.matches(&o.labels))
                    .map(|(id, _)| id.clone());
                let started_here = starts
                    .iter()
                    .any(|id| b.selector.matches(&sim.fleet[id].labels));
                let u = sim.unavailable(&r, group);
                assert!(
                    !started_here || u <= b.max_unavailable,
                    "seed {seed} step {step}: budget {:?} exceeded ({u}) after starting {starts:?}",
                    b.selector
                );
            }
            for id in &starts {
                assert!(
                    !sim.failed_before.contains(id),
                    "seed {seed}: {id} failed before and was started"
                );
                *started.entry(id.clone()).or_default() += 1;
            }
        }
        if !outages {
            // Nothing else takes nodes down: the limit holds at every instant.
            let u = sim.unavailable(&r, sim.targets.iter().cloned());
            assert!(
                u <= n_max,
                "seed {seed} step {step}: {u} unavailable > N={n_max}"
            );
        }
        for a in &actions {
            match a {
                Action::RollBack { node, .. } => *rollbacks.entry(node.clone()).or_default() += 1,
                Action::Paused { .. } => pauses += 1,
                _ => {}
            }
        }
        sim.act(&actions, now);
        // Every so often the controller restarts: the state goes through the store's encoding.
        if sim.rng.random_bool(0.02) {
            let bytes = postcard::to_allocvec(&r).expect("encode");
            let back: Rollout = postcard::from_bytes(&bytes).expect("decode");
            assert_eq!(back, r, "seed {seed}: state changed through encoding");
            r = back;
            stats.restarts += 1;
        }
        stats.window_waits += u32::from(r.waiting().contains(&Waiting::WindowClosed));
        stats.budget_waits += u32::from(
            r.waiting()
                .iter()
                .any(|w| matches!(w, Waiting::Budget { .. })),
        );
        // The operator resumes a paused rollout now and then.
        if matches!(r.state(), RolloutState::Paused { .. }) && sim.rng.random_bool(0.01) {
            r.command(Command::Resume, now).expect("resume");
        }
        if r.is_finished() {
            break;
        }
    }
    // Each node was started at most once (no retries here) and rolled back at most once.
    assert!(
        started.values().all(|c| *c == 1),
        "seed {seed}: {started:?}"
    );
    assert!(
        rollbacks.values().all(|c| *c == 1),
        "seed {seed}: {rollbacks:?}"
    );
    for (id, phase) in r.nodes() {
        let b = sim.nodes[id].behaviour;
        match phase {
            NodePhase::Succeeded { already: false, .. } => {
                assert_eq!(b, Behaviour::Succeeds, "seed {seed}: {id}")
            }
            NodePhase::Failed {
                failure: Failure::Refused { .. },
                ..
            } => {
                assert_eq!(b, Behaviour::Refuses, "seed {seed}: {id}");
                assert!(
                    !rollbacks.contains_key(id),
                    "seed {seed}: refused {id} needs no roll-back"
                );
            }
            NodePhase::Failed { .. } => {
                assert!(
                    matches!(b, Behaviour::FailsChecks | Behaviour::NeverReturns),
                    "seed {seed}: {id} {b:?}"
                );
                assert_eq!(
                    rollbacks.get(id),
                    Some(&1),
                    "seed {seed}: failed {id} was not rolled back"
                );
            }
            _ => {}
        }
    }
    stats.started += started.len() as u32;
    stats.rolled_back += rollbacks.len() as u32;
    stats.refused += r
        .nodes()
        .values()
        .filter(|p| {
            matches!(
                p,
                NodePhase::Failed {
                    failure: Failure::Refused { .. },
                    ..
                }
            )
        })
        .count() as u32;
    stats.pauses += pauses;
    stats.finished += u32::from(r.is_finished());
    let failed = r.progress().failed;
    if failed >= k_max {
        assert!(
            pauses >= 1,
            "seed {seed}: {failed} failures with K={k_max} and no pause"
        );
    }
    if !outages && failed == 0 {
        assert!(
            r.is_finished(),
            "seed {seed}: an all-good rollout did not finish: {:?}",
            r.progress()
        );
    }
}

/// The runs exercised what they claim to: starts, roll-backs, refusals, pauses, restarts, closed
/// windows and full budgets all happened, and at least `min_finished` rollouts finished (nodes down
/// for their own reasons hold a rollout back, so with outages fewer finish).
fn assert_not_vacuous(stats: &Stats, runs: u32, min_finished: u32) {
    assert!(stats.started > runs, "{stats:?}");
    assert!(
        stats.rolled_back > 0 && stats.refused > 0 && stats.pauses > 0,
        "{stats:?}"
    );
    assert!(
        stats.restarts > 0 && stats.window_waits > 0 && stats.budget_waits > 0,
        "{stats:?}"
    );
    assert!(stats.finished >= min_finished, "{stats:?}");
}

#[test]
fn random_fleets_keep_every_invariant() {
    let mut stats = Stats::default();
    for seed in 0..150 {
        run_random(seed, false, &mut stats);
    }
    assert_not_vacuous(&stats, 150, 100);
}

#[test]
fn random_fleets_with_outages_never_start_a_node_past_a_limit() {
    let mut stats = Stats::default();
    for seed in 1000..1150 {
        run_random(seed, true, &mut stats);
    }
    assert_not_vacuous(&stats, 150, 30);
}

fn action_spec(max_unavailable: u32, max_failures: u32) -> RolloutSpec {
    let target = Target::Action(MaintenanceAction::Exec {
        argv: vec!["/usr/local/bin/fix".into()],
    });
    RolloutSpec {
        max_unavailable,
        max_failures,
        ..RolloutSpec::new(target)
    }
}

#[test]
fn an_action_succeeds_when_the_node_is_back_and_a_failed_one_runs_its_post_hook() {
    let f = workers(3);
    // Observed versions never complete an action: every node is started, none is "already" done.
    let mut r = rollout(action_spec(1, 2), &f);
    let target = r.spec().target.clone();
    assert_eq!(target.to_string(), "action exec /usr/local/bin/fix");
    assert!(!target.remembers_failures());
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(0))), vec![n("w0")]);
    r.handle(
        Event::Reported {
            node: n("w0"),
            version: target.version().into(),
            health: ReportedHealth::Healthy,
        },
        at(5),
    );
    assert!(matches!(
        r.phase(&n("w0")),
        Some(NodePhase::Succeeded { already: false, .. })
    ));
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(5))), vec![n("w1")]);
    // The action fails on w1: it is "rolled back" (the executor runs the post-hook), then restored.
    let a = r.handle(
        Event::Failed {
            node: n("w1"),
            reason: "exit status 3".into(),
        },
        at(6),
    );
    assert_eq!(
        a,
        vec![Action::RollBack {
            node: n("w1"),
            to: Some(OLD.into()),
            target: target.clone()
        }]
    );
    assert_eq!(
        begun(&r.poll(&f, &[], &AlwaysOpen, at(7))),
        vec![],
        "w1 is unavailable until restored"
    );
    r.handle(Event::Restored { node: n("w1") }, at(8));
    match r.phase(&n("w1")) {
        Some(NodePhase::Failed {
            rolled_back: true,
            failure,
            ..
        }) => assert_eq!(failure.to_string(), "failed: exit status 3"),
        other => panic!("{other:?}"),
    }
    // A refusal (pre-hook failed) settles at once, with nothing to roll back; two failures pause.
    assert_eq!(begun(&r.poll(&f, &[], &AlwaysOpen, at(9))), vec![n("w2")]);
    let a = r.handle(
        Event::Refused {
            node: n("w2"),
            reason: "pre-hook failed".into(),
        },
        at(10),
    );
    assert!(matches!(a.as_slice(), [Action::Paused { .. }]), "{a:?}");
    // Events for nodes not in flight change nothing.
    let before = r.clone();
    r.handle(
        Event::Failed {
            node: n("w0"),
            reason: "late".into(),
        },
        at(11),
    );
    r.handle(Event::Restored { node: n("w2") }, at(11));
    assert_eq!(r, before);
}

#[test]
fn an_action_run_honours_budgets_and_busy_nodes() {
    let mut f = fleet(&[
        ("e1", &[("role", "etcd")]),
        ("e2", &[("role", "etcd")]),
        ("e3", &[("role", "etcd")]),
        ("w1", &[("role", "worker")]),
    ]);
    f.get_mut(&n("w1")).expect("w1").busy = true;
    let budgets = [Budget {
        selector: Selector::equals("role", "etcd"),
        max_unavailable: 1,
    }];
    let mut r = rollout(action_spec(3, 1), &f);
    assert_eq!(
        begun(&r.poll(&f, &budgets, &AlwaysOpen, at(0))),
        vec![n("e1")],
        "one etcd member; w1 is busy elsewhere"
    );
    assert!(r.waiting().contains(&Waiting::Budget {
        selector: "role=etcd".into(),
        unavailable: 1,
        max: 1
    }));
    assert!(r.waiting().contains(&Waiting::NodesUnavailable {
        nodes: vec![n("w1")]
    }));
    let target = r.spec().target.version().to_owned();
    r.handle(
        Event::Reported {
            node: n("e1"),
            version: target,
            health: ReportedHealth::Healthy,
        },
        at(1),
    );
    f.get_mut(&n("w1")).expect("w1").busy = false;
    assert_eq!(
        begun(&r.poll(&f, &budgets, &AlwaysOpen, at(2))),
        vec![n("e2"), n("w1")]
    );
}

#[test]
fn rollouts_stored_before_the_downgrade_permission_still_decode() {
    let mut r = Rollout::new(
        "r1",
        RolloutSpec::new(Target::Agent(NEW.into())),
        [n("a"), n("b")],
        &BTreeSet::new(),
        at(0),
    )
    .unwrap();
    let _ = r.poll(&fleet(&[("a", &[]), ("b", &[])]), &[], &AlwaysOpen, at(1));
    // The bytes a controller wrote before `allow_downgrade` existed.
    let v1 = RolloutV1 {
        id: r.id.clone(),
        spec: r.spec.clone(),
        created_at: r.created_at,
        state: r.state.clone(),
        nodes: r.nodes.clone(),
        recent_failures: r.recent_failures.clone(),
        waiting: r.waiting.clone(),
    };
    let old = postcard::to_allocvec(&v1).unwrap();
    assert_eq!(
        Rollout::from_stored(&old).unwrap(),
        r,
        "read as a rollout that allows no downgrade"
    );
    let allowing = r.clone().allowing_downgrade(true);
    let new = postcard::to_allocvec(&allowing).unwrap();
    assert_eq!(Rollout::from_stored(&new).unwrap(), allowing);
    assert!(Rollout::from_stored(&new).unwrap().allow_downgrade());
    assert!(
        Rollout::from_stored(&new[..new.len() / 2]).is_err(),
        "a torn record is still an error"
    );
}
