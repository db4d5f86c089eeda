//! The properties the fuzz targets in `controller/fuzz` check, as plain functions over bytes, so
//! that the unit tests below run them on deterministic mutations of valid inputs and CI exercises
//! the same properties without a fuzzer (or a nightly compiler).
//!
//! Each function takes untrusted bytes the way the controller takes them from agents: postcard
//! messages, each behind a one-byte op and a two-byte length ([`encode`] writes that form), and
//! drives one of the controller's handlers with them. A property that does not hold panics. What is
//! checked, by target:
//!
//! - [`session_messages`]: any sequence of decoded [`AgentMsg`]s through a [`Session`] (with and
//!   without a certificate): a message over a bound of [`shoal_proto::limits`] is answered with
//!   exactly a `BadRequest` reject naming the field and a close; nothing reaches the registry
//!   before a Welcome, an unauthenticated session asks only to enrol, a closed session never acts
//!   again.
//! - [`drive_reports`]: drive reports that pass the limits, through [`FleetDrives::ingest`] for two
//!   nodes: every change names a drive of the previous or the new report, the same report twice
//!   changes nothing the second time, the views list the report's drives and serialise, a node's
//!   drive histories stay within their bound, and the drive command checks answer for every drive.
//! - [`coordinator_ops`]: store-legal membership changes interleaved with agents' overlay hellos
//!   (endpoints, NAT, keys from the input, within the limits), subscriptions and disconnections:
//!   every delivery goes to a connected agent as a delta that applies to what that agent holds
//!   without a gap, and afterwards each agent's map equals the coordinator's netmap for it.
//! - [`rollout_events`]: agent-made rollout events (acknowledgements, version reports, refusals,
//!   failures, for nodes in and outside the rollout) with operator commands and polls over a fleet
//!   observed from the input: no node starts unless the rollout runs, a start never takes the
//!   rollout past `max_unavailable`, and the state survives the store's encoding.
//! - [`selector_text`]: any text through the label-selector parser: it answers within its bounds
//!   (longer text is refused before it is read), a selector it accepts prints as canonical text that
//!   parses back to the same selector, survives the store's encoding and JSON, and each term and
//!   its negation (`=`/`!=`, `in`/`notin`, `KEY`/`!KEY`) disagree on every node's labels.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{de::DeserializeOwned, Serialize};
use shoal_proto::{
    limits, AgentMsg, ControllerMsg, DriveReport, Enrolled, MacAddr, NatMapping, Netmap, NetworkId,
    NodeId, OverlayHello, PeerIndex, RejectCode, SelfTestKind, UnixMillis, SUPPORTED,
};

use crate::coordinator::{Coordinator, Subscription};
use crate::rollout::{
    Action as RolloutAction, Command, Event, Fleet, Observed, ReportedHealth, Rollout, RolloutSpec,
    RolloutState, Target,
};
use crate::session::{Action, CloseKind, Session, SessionConfig};
use crate::{
    drives::fleet::{
        check_prepare, check_self_test, FleetDrives, FleetDrivesConfig, PrepareRequest,
    },
    networks::{MembershipChange, NetworkRecord, NetworkSnapshot, OverlaySnapshot},
};

/// What a run exercised, by name (`"refused_over_limit"`, `"delta_applied"`...), so tests can tell
/// a run that checked something from one that only skipped its input.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Seen(pub BTreeMap<&'static str, u64>);

impl Seen {
    fn hit(&mut self, what: &'static str) {
        *self.0.entry(what).or_default() += 1;
    }

    /// How often `what` happened.
    pub fn count(&self, what: &str) -> u64 {
        self.0.get(what).copied().unwrap_or(0)
    }

    /// Adds another run's counts.
    pub fn add(&mut self, other: &Seen) {
        for (k, v) in &other.0 {
            *self.0.entry(k).or_default() += v;
        }
    }
}

/// Untrusted input, read front to back.
#[derive(Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Input over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// The next byte; `None` at the end.
    pub fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(*b)
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// The next length-prefixed postcard value: `None` at the end, `Some(None)` when it does not
    /// decode (the controller would close the connection; the fuzz target goes on).
    pub fn value<T: DeserializeOwned>(&mut self) -> Option<Option<T>> {
        let len = u16::from_be_bytes([self.byte()?, self.byte()?]);
        Some(postcard::from_bytes(self.take(usize::from(len))).ok())
    }
}

/// One op and value in the form [`Input`] reads: `op`, a big-endian u16 length, the postcard bytes.
/// Used to build seeds.
pub fn encode<T: Serialize>(op: u8, value: &T) -> Vec<u8> {
    let body = postcard::to_allocvec(value).unwrap_or_default();
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    let mut out = vec![op];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body[..usize::from(len)]);
    out
}

// ---------------------------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------------------------

/// See the module docs. The input is selector text (as UTF-8, lossily, the way a query string
/// reaches the parser).
pub fn selector_text(data: &[u8]) -> Seen {
    use crate::selector::{
        parse_selector, Selector, SelectorError, Term, MAX_SELECTOR_LEN, MAX_TERMS,
    };
    let mut seen = Seen::default();
    let text = String::from_utf8_lossy(data);
    let selector = match parse_selector(&text) {
        Ok(s) => s,
        Err(SelectorError::TooLong { len }) => {
            assert!(len > MAX_SELECTOR_LEN, "refused {len} bytes as too long");
            seen.hit("too_long");
            return seen;
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            seen.hit("refused");
            return seen;
        }
    };
    seen.hit("parsed");
    assert!(!selector.terms().is_empty() && selector.terms().len() <= MAX_TERMS);
    let canonical = selector.to_string();
    assert_eq!(
        parse_selector(&canonical).as_ref(),
        Ok(&selector),
        "canonical text {canonical:?} of {text:?} parses back"
    );
    let stored = postcard::to_allocvec(&selector).expect("encodes");
    assert_eq!(
        postcard::from_bytes::<Selector>(&stored).expect("decodes"),
        selector
    );
    let json = serde_json::to_string(&selector).expect("json");
    assert_eq!(
        serde_json::from_str::<Selector>(&json).expect("json decodes"),
        selector
    );
    // Labels made of the selector's own keys and values, one set per term, and none.
    let mut fleets: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
    for t in selector.terms() {
        let value = match t {
            Term::Equals(_, v) | Term::NotEquals(_, v) => v.clone(),
            Term::In(_, vs) | Term::NotIn(_, vs) => vs.iter().next().cloned().unwrap_or_default(),
            Term::Exists(_) | Term::NotExists(_) => String::new(),
        };
        let mut labels = fleets.last().cloned().unwrap_or_default();
        labels.insert(t.key().to_owned(), value);
        fleets.push(labels);
    }
    for labels in &fleets {
        let all = selector.terms().iter().all(|t| t.matches(labels));
        assert_eq!(selector.matches(labels), all);
        for t in selector.terms() {
            let negation = match t.clone() {
                Term::Equals(k, v) => Term::NotEquals(k, v),
                Term::NotEquals(k, v) => Term::Equals(k, v),
                Term::Exists(k) => Term::NotExists(k),
                Term::NotExists(k) => Term::Exists(k),
                Term::In(k, vs) => Term::NotIn(k, vs),
                Term::NotIn(k, vs) => Term::In(k, vs),
            };
            assert_ne!(
                t.matches(labels),
                negation.matches(labels),
                "{t} and its negation"
            );
        }
        seen.hit(if selector.matches(labels) {
            "matched"
        } else {
            "not_matched"
        });
    }
    seen
}

// ---------------------------------------------------------------------------------------------
// Session
// ---------------------------------------------------------------------------------------------

/// See the module docs. The first byte chooses a session with a certificate (odd) or without; every
/// later record is an op byte (unused) and an [`AgentMsg`].
pub fn session_messages(data: &[u8]) -> Seen {
    let mut seen = Seen::default();
    let mut input = Input::new(data);
    let authenticated = input.byte().is_none_or(|b| b & 1 == 1);
    let node = authenticated.then(|| NodeId("n0000000001".into()));
    let mut s = Session::new(
        SessionConfig {
            supported: SUPPORTED,
            heartbeat_interval_ms: 10_000,
        },
        node.clone(),
    );
    let (mut welcomed, mut closed) = (false, false);
    let mut t = 0u64;
    while input.byte().is_some() {
        let Some(next) = input.value::<AgentMsg>() else {
            break;
        };
        let Some(msg) = next else { continue };
        t += 1;
        let within = limits::check(&msg);
        let is_hello = matches!(msg, AgentMsg::Hello(_));
        let actions = s.handle(UnixMillis(t), msg);
        if closed {
            assert!(actions.is_empty(), "a closed session acted: {actions:?}");
            continue;
        }
        if let Err(e) = &within {
            match &actions[..] {
                [Action::Send(ControllerMsg::Reject(r)), Action::Close(CloseKind::Refused, _)]
                    if r.code == RejectCode::BadRequest && r.message.contains(&e.field) =>
                {
                    seen.hit("refused_over_limit")
                }
                other => panic!("over a limit ({e}) but answered {other:?}"),
            }
        }
        let mut enrol = false;
        for a in &actions {
            match a {
                Action::Send(ControllerMsg::Welcome(w)) => {
                    assert!(
                        is_hello && !welcomed,
                        "Welcome to {w:?} without a first Hello"
                    );
                    assert_eq!(w.node_id, node);
                    welcomed = true;
                }
                Action::Send(ControllerMsg::Reject(_)) => {}
                Action::Send(other) => {
                    panic!("the session itself sends only Welcome and Reject, not {other:?}")
                }
                Action::Close(..) => closed = true,
                Action::Enrol { .. } => {
                    assert!(
                        !authenticated && welcomed,
                        "an enrolment on a session with a certificate or before Welcome"
                    );
                    enrol = true;
                    seen.hit("enrol");
                }
                other => {
                    assert!(
                        authenticated && welcomed,
                        "{other:?} reached the registry without an authenticated Hello"
                    );
                    seen.hit("registry_action");
                }
            }
        }
        if closed {
            assert!(s.is_closed());
        }
        if enrol {
            // The registry answers at once, one way or the other; either ends the session.
            let answer = if t & 1 == 0 {
                let e = Enrolled {
                    node_id: NodeId("n2".into()),
                    cert_der: vec![],
                    ca_der: vec![],
                    not_after: UnixMillis(t),
                };
                s.enrolled(e)
            } else {
                s.refused(RejectCode::TokenUnknown, "unknown token")
            };
            assert!(answer.iter().any(|a| matches!(a, Action::Close(..))) && s.is_closed());
            closed = true;
        }
    }
    seen
}

// ---------------------------------------------------------------------------------------------
// Drives
// ---------------------------------------------------------------------------------------------

/// See the module docs. Each record: a byte whose low bit picks the node, and a [`DriveReport`].
pub fn drive_reports(data: &[u8]) -> Seen {
    let mut seen = Seen::default();
    let (mut book, _) = FleetDrives::load(FleetDrivesConfig::default(), vec![], vec![]);
    let nodes = [NodeId("n1".into()), NodeId("n2".into())];
    let mut input = Input::new(data);
    let mut t = 1_700_000_000_000u64;
    while let Some(b) = input.byte() {
        let node = &nodes[usize::from(b & 1)];
        let Some(next) = input.value::<DriveReport>() else {
            break;
        };
        let Some(report) = next else { continue };
        // The session refuses a report over the limits: it never reaches the book.
        let msg = AgentMsg::Drives(report);
        if limits::check(&msg).is_err() {
            seen.hit("over_limit");
            continue;
        }
        let AgentMsg::Drives(report) = msg else {
            unreachable!()
        };
        seen.hit("ingested");
        t += 60_000;
        let before = book.report(node).map(|r| r.report.clone());
        let ingested = book.ingest(node, report.clone(), UnixMillis(t));
        for c in &ingested.changes {
            let device = c.device();
            let known = |r: &DriveReport| r.drives.iter().any(|d| d.name == device);
            assert!(
                known(&report) || before.as_ref().is_some_and(known),
                "{c:?} names no drive of either report"
            );
            let _ = (c.kind(), c.is_alarm(), c.to_string());
            seen.hit("change");
        }
        if !ingested.samples.is_empty() {
            seen.hit("samples");
        }
        let again = book.ingest(node, report.clone(), UnixMillis(t + 1));
        assert!(
            again.changes.is_empty() && again.samples.is_empty(),
            "the same report twice: {:?}",
            again.changes
        );
        let views = book.views(Some(node));
        assert_eq!(views.len(), report.drives.len());
        assert!(book.history_count(node) <= crate::drives::fleet::MAX_HISTORIES_PER_NODE);
        assert!(serde_json::to_string(&views).is_ok());
        for d in &report.drives {
            let verdict = book.verdict(node, d).map(|j| j.verdict.clone());
            let force = PrepareRequest {
                force: true,
                serial: d.serial.clone(),
                filesystem: None,
            };
            let _ = check_prepare(d, verdict.as_ref(), &PrepareRequest::default());
            let _ = check_prepare(d, verdict.as_ref(), &force);
            let _ = check_self_test(d, SelfTestKind::Short);
        }
    }
    seen
}

// ---------------------------------------------------------------------------------------------
// Overlay coordinator
// ---------------------------------------------------------------------------------------------

const NODES: usize = 4;

fn network(id: u32) -> NetworkRecord {
    NetworkRecord {
        id: NetworkId(id),
        name: format!("net{id}"),
        subnet: [10, 90 + id as u8, 0, 0].into(),
        prefix_len: 24,
        mtu: 1380,
        selectors: vec![],
        created_at: UnixMillis(0),
    }
}

/// A netmap's content: versions are global (a change elsewhere moves the coordinator's on without a
/// delta to this agent), validity is time.
fn sorted(mut m: Netmap) -> Netmap {
    m.version = 0;
    m.networks.sort_by_key(|n| n.id);
    m.peers.sort_by(|a, b| a.node.cmp(&b.node));
    for p in &mut m.peers {
        p.networks.sort_by_key(|n| n.id);
    }
    m.valid_until = UnixMillis(0);
    m
}

/// See the module docs. Each record is an op byte: `0` a node gets a peer index and maybe a key,
/// `1` it joins a network, `2` it leaves one, `3` its agent connects with an [`OverlayHello`] (the
/// next value) and the address in the next bytes, `4` its agent disconnects, `5` it is removed from
/// the fleet, `6` another controller (of two) says it holds the node's session (newer or older
/// than what is known, at the address in the next byte), `7` that controller says the session
/// ended, or says all its sessions again. Ops the store could not produce (joining twice, leaving a
/// network one is not in) are skipped. Nothing is ever delivered to a node that is not connected
/// here.
pub fn coordinator_ops(data: &[u8]) -> Seen {
    let mut seen = Seen::default();
    let snapshot = OverlaySnapshot {
        networks: (1..=2)
            .map(|id| NetworkSnapshot {
                network: network(id),
                members: vec![],
            })
            .collect(),
        nodes: BTreeMap::new(),
    };
    let mut c = Coordinator::new(7, snapshot, std::time::Duration::from_secs(3600));
    let id = |i: usize| NodeId(format!("n{i}"));
    let mut known: BTreeSet<usize> = BTreeSet::new();
    let mut member: BTreeSet<(usize, u32)> = BTreeSet::new();
    let mut agents: HashMap<NodeId, Netmap> = HashMap::new();
    let mut input = Input::new(data);
    let mut t = 0u64;
    while let Some(op) = input.byte() {
        let Some(arg) = input.byte() else { break };
        let i = usize::from(arg) % NODES;
        let net = u32::from(arg >> 7) + 1;
        t += 1;
        let now = UnixMillis(t);
        // A removed node's connection still gets what was queued for it before it is closed.
        let mut removed = None;
        let deliveries = match op % 8 {
            0 => {
                let key = (arg & 0x40 != 0).then_some([arg >> 2; 32]);
                known.insert(i);
                c.node_known(&id(i), PeerIndex(i as u32 + 1), key, now)
            }
            1 if known.contains(&i) && !member.contains(&(i, net)) => {
                member.insert((i, net));
                let mac = MacAddr([2, 0x5e, 0, 0, net as u8, i as u8]);
                let address = [10, 90 + net as u8, 0, i as u8 + 1].into();
                c.apply(
                    &[MembershipChange::Joined {
                        network: NetworkId(net),
                        node: id(i),
                        mac,
                        address,
                    }],
                    now,
                )
            }
            2 if member.remove(&(i, net)) => c.apply(
                &[MembershipChange::Left {
                    network: NetworkId(net),
                    node: id(i),
                }],
                now,
            ),
            3 if known.contains(&i) => {
                let Some(hello) = input.value::<OverlayHello>() else {
                    break;
                };
                let mut hello = hello.unwrap_or(OverlayHello {
                    netmap_version: None,
                    local_endpoints: vec![],
                    nat: NatMapping::Unknown,
                });
                if limits::check(&AgentMsg::Overlay(hello.clone())).is_err() {
                    seen.hit("over_limit");
                    continue; // refused by the session
                }
                // An honest cache: the agent names the version it holds, if any.
                hello.netmap_version = agents.get(&id(i)).map(|m| m.version);
                let observed = std::net::SocketAddr::from((
                    [192, 0, 2, input.byte().unwrap_or(1)],
                    u16::from(arg) + 1000,
                ));
                let key = (arg & 0x20 != 0).then_some([arg; 32]);
                let (first, deliveries) = c.subscribe(&id(i), key, observed, &hello, now);
                match first {
                    ControllerMsg::Netmap(m) => {
                        agents.insert(id(i), m);
                    }
                    ControllerMsg::NetmapDelta(d) => {
                        let held = agents
                            .get_mut(&id(i))
                            .expect("an empty delta only to an agent that holds the version");
                        assert!(
                            d.changes.is_empty() && d.from_version == held.version,
                            "{d:?}"
                        );
                        held.apply(&d).expect("renewal applies");
                    }
                    other => panic!("subscribe answered {other:?}"),
                }
                deliveries
            }
            4 => {
                let d = c.unsubscribe(&id(i), now);
                agents.remove(&id(i));
                d
            }
            5 if known.remove(&i) => {
                // Removal: the store drops its memberships first, then the coordinator forgets it.
                let left: Vec<MembershipChange> = member
                    .iter()
                    .filter(|(n, _)| *n == i)
                    .map(|(_, net)| MembershipChange::Left {
                        network: NetworkId(*net),
                        node: id(i),
                    })
                    .collect();
                member.retain(|(n, _)| *n != i);
                let d = c.apply(&left, now);
                c.forget(&id(i));
                removed = Some(id(i));
                d
            }
            6 if known.contains(&i) => {
                let controller = format!("ctl{}", (arg >> 6) & 1);
                let since = if arg & 0x20 != 0 {
                    t
                } else {
                    t.saturating_sub(5)
                };
                let observed = std::net::SocketAddr::from((
                    [198, 51, 100, input.byte().unwrap_or(1)],
                    u16::from(arg) + 2000,
                ));
                let sub = Subscription {
                    node: id(i),
                    index: PeerIndex(i as u32 + 1),
                    key: [arg; 32],
                    observed,
                    local_endpoints: vec![observed, "224.0.0.1:1".parse().unwrap_or(observed)],
                    nat: NatMapping::EndpointIndependent,
                    since: UnixMillis(since),
                };
                let (taken, d) = c.subscribe_remote(&controller, sub, now);
                if taken {
                    seen.hit("remote_taken");
                }
                d
            }
            7 => {
                let controller = format!("ctl{}", (arg >> 6) & 1);
                if arg & 0x20 != 0 {
                    c.unsubscribe_remote(&controller, &id(i));
                } else {
                    c.reset_remote(&controller);
                }
                vec![]
            }
            _ => continue,
        };
        for (to, msg) in deliveries {
            let ControllerMsg::NetmapDelta(d) = msg else {
                panic!("deliveries are deltas: {msg:?}")
            };
            let map = agents
                .get_mut(&to)
                .unwrap_or_else(|| panic!("a delta for {to}, which is not connected"));
            map.apply(&d)
                .unwrap_or_else(|gap| panic!("a delta for {to} does not apply: {gap}"));
            seen.hit("delta_applied");
        }
        if let Some(gone) = removed {
            agents.remove(&gone);
        }
        for (node, map) in &agents {
            assert_eq!(
                sorted(map.clone()),
                sorted(c.netmap(node, now)),
                "{node}'s map drifted from the coordinator's"
            );
            if !map.peers.is_empty() {
                seen.hit("map_with_peers_checked");
            }
        }
    }
    seen
}

// ---------------------------------------------------------------------------------------------
// Rollout planner
// ---------------------------------------------------------------------------------------------

/// See the module docs. The first bytes give `max_unavailable` and `max_failures`; then each record
/// is an op byte: `0..=4` an agent event about node `arg % 8` (nodes 6 and 7 are not in the
/// rollout), `5` an operator command, `6` a poll over the fleet whose availability bits are the
/// next byte, `7` a restart through the store's encoding.
pub fn rollout_events(data: &[u8]) -> Seen {
    let mut seen = Seen::default();
    let mut input = Input::new(data);
    let n_max = u32::from(input.byte().unwrap_or(0) % 3) + 1;
    let k_max = u32::from(input.byte().unwrap_or(0) % 3) + 1;
    let mut spec = RolloutSpec::new(Target::Agent("2.0".into()));
    spec.max_unavailable = n_max;
    spec.max_failures = k_max;
    let id = |i: u8| NodeId(format!("n{i}"));
    let Ok(mut r) = Rollout::new("r1", spec, (0..6).map(id), &BTreeSet::new(), UnixMillis(0))
    else {
        return seen;
    };
    let versions = ["1.0", "2.0", "", "2.0\u{1b}[2J"];
    let mut fleet: Fleet = (0..8)
        .map(|i| {
            (
                id(i),
                Observed {
                    up: true,
                    healthy: true,
                    version: Some("1.0".into()),
                    ..Default::default()
                },
            )
        })
        .collect();
    let mut t = 0u64;
    while let Some(op) = input.byte() {
        let Some(arg) = input.byte() else { break };
        t += 30_000;
        let now = UnixMillis(t);
        let node = id(arg % 8);
        let version = versions[usize::from(arg >> 3) % versions.len()].to_owned();
        let health = match arg >> 5 {
            0..=3 => ReportedHealth::Healthy,
            4 | 5 => ReportedHealth::Checking,
            _ => ReportedHealth::Failed(vec!["check:x".into()]),
        };
        match op % 8 {
            0 => drop(r.handle(Event::Acknowledged { node }, now)),
            1 => {
                fleet.entry(node.clone()).or_default().version = Some(version.clone());
                drop(r.handle(
                    Event::Reported {
                        node,
                        version,
                        health,
                    },
                    now,
                ));
            }
            2 => drop(r.handle(
                Event::Refused {
                    node,
                    reason: version,
                },
                now,
            )),
            3 => drop(r.handle(
                Event::Failed {
                    node,
                    reason: version,
                },
                now,
            )),
            4 => drop(r.handle(Event::Restored { node }, now)),
            5 => {
                let cmd = match arg % 4 {
                    0 => Command::Pause,
                    1 => Command::Resume,
                    2 => Command::Abort,
                    _ => Command::Retry(node),
                };
                let _ = r.command(cmd, now);
            }
            6 => {
                let bits = input.byte().unwrap_or(0xff);
                for (i, o) in fleet.values_mut().enumerate() {
                    o.up = bits & (1 << i) != 0;
                }
                let running = *r.state() == RolloutState::Running;
                let actions = r.poll(&fleet, &[], &crate::windows::AlwaysOpen, now);
                let starts: Vec<&NodeId> = actions
                    .iter()
                    .filter_map(|a| {
                        if let RolloutAction::BeginUpgrade { node, .. } = a {
                            Some(node)
                        } else {
                            None
                        }
                    })
                    .collect();
                if !starts.is_empty() {
                    assert!(running, "started {starts:?} while {:?}", r.state());
                    let unavailable = r
                        .nodes()
                        .iter()
                        .filter(|(n, p)| {
                            p.in_flight()
                                || !fleet.get(*n).is_some_and(|o| o.up && o.healthy && !o.busy)
                        })
                        .count() as u32;
                    assert!(
                        unavailable <= n_max,
                        "{unavailable} unavailable > {n_max} after starting {starts:?}"
                    );
                    seen.hit("started");
                }
                for a in &actions {
                    if let RolloutAction::Done { .. } = a {
                        assert!(
                            r.nodes().values().all(|p| p.settled()),
                            "done with nodes unsettled: {:?}",
                            r.nodes()
                        );
                        seen.hit("done");
                    }
                }
            }
            _ => {
                let bytes = postcard::to_allocvec(&r).expect("a rollout encodes");
                let back: Rollout = postcard::from_bytes(&bytes).expect("and decodes");
                assert_eq!(back, r);
                r = back;
                seen.hit("restarted");
            }
        }
    }
    if r.nodes()
        .values()
        .any(|p| matches!(p, crate::rollout::NodePhase::Succeeded { .. }))
    {
        seen.hit("succeeded");
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{
        Drive, DriveProtocol, DriveState, EnrolRequest, HardwareId, HardwareIdSource, HealthReport,
        Hello, Inventory, NetInterface, SmartExitStatus, SmartOutcome, SmartPredictors,
        SmartReport, VersionRange,
    };

    /// Deterministic mutations of `seeds` (bit flips, truncation, insertion, splicing), `rounds` of
    /// them, each run through `property`; mutants that still run become seeds.
    fn mutate_and_run(seeds: Vec<Vec<u8>>, rounds: usize, property: fn(&[u8]) -> Seen) -> Seen {
        let mut total = Seen::default();
        let mut pool = seeds;
        use rand::{rngs::StdRng, RngCore, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0x2545_f491_4f6c_dd1d);
        let mut rand = move || rng.next_u64();
        for seed in &pool {
            total.add(&property(seed));
        }
        for i in 0..rounds {
            let mut bytes = pool[i % pool.len()].clone();
            let n = bytes.len().max(1);
            match rand() % 5 {
                0 if !bytes.is_empty() => {
                    let at = rand() as usize % n;
                    bytes[at] ^= 1 << (rand() % 8);
                }
                1 => bytes.truncate(rand() as usize % n),
                2 => {
                    let at = rand() as usize % (bytes.len() + 1);
                    bytes.insert(at, rand() as u8);
                }
                3 => {
                    let other = &pool[rand() as usize % pool.len()];
                    let cut = rand() as usize % (other.len() + 1);
                    bytes.extend_from_slice(&other[cut..]);
                }
                _ if !bytes.is_empty() => {
                    let at = rand() as usize % n;
                    bytes[at] = rand() as u8;
                }
                _ => {}
            }
            total.add(&property(&bytes));
            if pool.len() < 256 && rand() % 4 == 0 {
                pool.push(bytes);
            }
        }
        total
    }

    pub(crate) fn selector_seeds() -> Vec<Vec<u8>> {
        [
            "role=db",
            "role==db,zone!=a",
            "gpu,!spot",
            "zone in (a,b,c),rack notin (r1)",
            "example.com/tier=gold,netboot.mac=52:54:00:00:00:01",
            "role=",
            "a in (x), b notin (y) , !c",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect()
    }

    #[test]
    fn selector_text_property_holds_on_mutations() {
        let seen = mutate_and_run(selector_seeds(), 20_000, selector_text);
        assert!(seen.count("parsed") > 1_000, "{seen:?}");
        assert!(seen.count("refused") > 1_000, "{seen:?}");
        assert!(
            seen.count("matched") > 0 && seen.count("not_matched") > 0,
            "{seen:?}"
        );
        let long = vec![b'a'; crate::selector::MAX_SELECTOR_LEN + 1];
        assert_eq!(selector_text(&long).count("too_long"), 1);
    }

    fn hello(machine: &str) -> AgentMsg {
        AgentMsg::Hello(Hello {
            protocol: VersionRange {
                min: 1,
                max: SUPPORTED.max,
            },
            agent_version: "0.1.0".into(),
            hardware_id: HardwareId {
                source: HardwareIdSource::Override,
                value: machine.into(),
            },
        })
    }

    fn drive(name: &str, serial: &str, smart_at: u64) -> Drive {
        Drive {
            name: name.into(),
            model: Some("M".into()),
            serial: Some(serial.into()),
            size_bytes: 1 << 40,
            removable: false,
            state: DriveState::Blank,
            smart: Some(SmartOutcome::Report(SmartReport {
                device: format!("/dev/{name}"),
                protocol: DriveProtocol::Ata,
                model: Some("M".into()),
                serial: Some(serial.into()),
                firmware: None,
                capacity_bytes: Some(1 << 40),
                temperature_celsius: Some(30),
                power_on_hours: Some(smart_at),
                health_passed: Some(true),
                exit_status: SmartExitStatus(0),
                predictors: SmartPredictors::Ata(Default::default()),
                self_test: None,
            })),
            smart_at: Some(UnixMillis(smart_at)),
        }
    }

    pub(crate) fn session_seeds() -> Vec<Vec<u8>> {
        let inventory = AgentMsg::Inventory(Inventory {
            hostname: "h".into(),
            nics: vec![NetInterface {
                name: "eth0".into(),
                addresses: vec!["10.0.0.1/24".into()],
                ..Default::default()
            }],
            ..Default::default()
        });
        let over = AgentMsg::Inventory(Inventory {
            nics: vec![Default::default(); limits::MAX_NICS + 1],
            ..Default::default()
        });
        let enrol = AgentMsg::Enrol(EnrolRequest {
            token: "t".into(),
            csr_der: vec![0x30, 1, 2],
            hostname: "h".into(),
        });
        let mut authed = vec![1u8];
        for m in [
            hello("m"),
            inventory.clone(),
            AgentMsg::Health(HealthReport::default()),
            AgentMsg::Drives(DriveReport::default()),
            over,
        ] {
            authed.extend(encode(0, &m));
        }
        let mut unauthed = vec![0u8];
        for m in [hello("m"), enrol, inventory] {
            unauthed.extend(encode(0, &m));
        }
        let mut long_hello = vec![1u8];
        let AgentMsg::Hello(mut h) = hello("m") else {
            unreachable!()
        };
        h.agent_version = "v".repeat(limits::MAX_NAME_LEN + 1);
        long_hello.extend(encode(0, &AgentMsg::Hello(h)));
        let mut punch = vec![1u8];
        punch.extend(encode(0, &hello("m")));
        punch.extend(encode(
            0,
            &AgentMsg::Punch(shoal_proto::Punch {
                peer: NodeId("n".repeat(65)),
                endpoints: vec![],
            }),
        ));
        vec![authed, unauthed, long_hello, punch]
    }

    pub(crate) fn drive_seeds() -> Vec<Vec<u8>> {
        let r1 = DriveReport {
            at: UnixMillis(1),
            drives: vec![drive("sda", "A", 10), drive("sdb", "B", 10)],
        };
        let r2 = DriveReport {
            at: UnixMillis(2),
            drives: vec![drive("sda", "A", 20), drive("sdb", "C", 20)],
        };
        let r3 = DriveReport {
            at: UnixMillis(3),
            drives: vec![drive("sda", "A", 30)],
        };
        let mut s = Vec::new();
        for (node, r) in [(0u8, &r1), (1, &r1), (0, &r2), (0, &r3), (1, &r3)] {
            s.extend(encode(node, r));
        }
        vec![s]
    }

    pub(crate) fn coordinator_seeds() -> Vec<Vec<u8>> {
        let hello = OverlayHello {
            netmap_version: None,
            local_endpoints: vec!["10.0.0.9:7000".parse().unwrap()],
            nat: NatMapping::EndpointIndependent,
        };
        let mut s = Vec::new();
        // Three nodes known, joined to network 1, two to network 2, connecting, one leaving, one
        // removed.
        for i in 0..3u8 {
            s.extend([0, i | 0x40]);
            s.extend([1, i]);
        }
        s.extend([1, 0x80 | 1, 1, 0x80 | 2]);
        for i in 0..3u8 {
            s.extend([3, i | 0x20]);
            s.extend(&encode(0, &hello)[1..]);
            s.push(i + 1);
        }
        s.extend([2, 0x80 | 1, 4, 2, 5, 0, 0, 3]);
        // Other controllers' agents: newer, older, moved on from here, gone, reset.
        s.extend([
            6,
            0x20 | 1,
            7,
            6,
            0x40 | 0x20 | 3,
            8,
            6,
            1,
            9,
            6,
            0x20 | 2,
            10,
        ]);
        s.extend([7, 0x20 | 1, 4, 1, 6, 0x40 | 0x20 | 1, 11, 7, 0x40]);
        vec![s]
    }

    pub(crate) fn rollout_seeds() -> Vec<Vec<u8>> {
        // N=2, K=1; polls with everyone up, acknowledgements and healthy 2.0 reports, a failure, a
        // pause and resume, restarts.
        let mut s = vec![1u8, 0];
        for round in 0..3u8 {
            s.extend([6, 0, 0xff]);
            for i in 0..6u8 {
                s.extend([0, i, 1, i | (1 << 3)]);
            }
            s.extend([3, 2 + round, 7, 0, 5, 0, 5, 1]);
        }
        vec![s]
    }

    #[test]
    fn seeds_hold_their_properties_and_are_not_vacuous() {
        let s: Vec<Seen> = session_seeds()
            .iter()
            .map(|s| session_messages(s))
            .collect();
        assert!(
            s[0].count("registry_action") >= 3 && s[0].count("refused_over_limit") == 1,
            "{s:?}"
        );
        assert_eq!(s[1].count("enrol"), 1, "{s:?}");
        assert!(
            s[2].count("refused_over_limit") == 1 && s[3].count("refused_over_limit") == 1,
            "{s:?}"
        );
        let d = drive_reports(&drive_seeds()[0]);
        assert!(
            d.count("ingested") == 5 && d.count("change") >= 4 && d.count("samples") >= 3,
            "{d:?}"
        );
        let c = coordinator_ops(&coordinator_seeds()[0]);
        assert!(
            c.count("delta_applied") >= 3 && c.count("map_with_peers_checked") >= 3,
            "{c:?}"
        );
        let r = rollout_events(&rollout_seeds()[0]);
        assert!(
            r.count("started") >= 1
                && r.count("done") == 1
                && r.count("restarted") >= 2
                && r.count("succeeded") == 1,
            "{r:?}"
        );
    }

    /// What `cargo fuzz run drive_reports` found: a report naming one kernel name twice made the
    /// same report produce a removal and an appearance every time. Such a report is now over a
    /// limit.
    #[test]
    fn a_drive_report_naming_a_device_twice_is_refused() {
        let seen = drive_reports(include_bytes!(
            "../../fuzz/seeds/drive_reports/regression-duplicate-name"
        ));
        assert!(seen.count("over_limit") >= 1, "{seen:?}");
    }

    /// Also found by `cargo fuzz run drive_reports`: a SMART read dated after year 9999 (the
    /// agent's clock) made formatting the drive views panic, which failed `GET /v1/drives` for the
    /// whole fleet.
    #[test]
    fn a_drive_read_dated_after_year_9999_is_shown_not_fatal() {
        let seen = drive_reports(include_bytes!(
            "../../fuzz/seeds/drive_reports/regression-year-10000"
        ));
        assert!(seen.count("ingested") >= 1, "{seen:?}");
        assert_eq!(
            crate::time::rfc3339_ms(u64::MAX),
            "18446744073709551615 ms after the Unix epoch"
        );
        assert_eq!(
            crate::time::rfc3339_ms(253_402_300_799_000),
            "9999-12-31T23:59:59Z"
        );
    }

    #[test]
    fn mutated_session_messages_hold() {
        let seen = mutate_and_run(session_seeds(), 4000, session_messages);
        assert!(
            seen.count("registry_action") > 100
                && seen.count("refused_over_limit") > 100
                && seen.count("enrol") > 100,
            "{seen:?}"
        );
    }

    #[test]
    fn mutated_drive_reports_hold() {
        let seen = mutate_and_run(drive_seeds(), 2000, drive_reports);
        assert!(
            seen.count("ingested") > 1000 && seen.count("change") > 1000,
            "{seen:?}"
        );
    }

    #[test]
    fn mutated_coordinator_ops_hold() {
        let seen = mutate_and_run(coordinator_seeds(), 3000, coordinator_ops);
        assert!(
            seen.count("delta_applied") > 1000
                && seen.count("map_with_peers_checked") > 1000
                && seen.count("remote_taken") > 100,
            "{seen:?}"
        );
    }

    #[test]
    fn mutated_rollout_events_hold() {
        let seen = mutate_and_run(rollout_seeds(), 3000, rollout_events);
        assert!(
            seen.count("started") > 1000 && seen.count("restarted") > 100,
            "{seen:?}"
        );
    }

    /// Writes the seeds as corpus files for `cargo fuzz` into `controller/fuzz/seeds` (run by hand:
    /// `SHOAL_FUZZ_CORPUS=$PWD/controller/fuzz/seeds cargo test -p shoal-controller --lib
    /// write_fuzz_corpus -- --ignored`).
    #[test]
    #[ignore = "writes files; run by hand to refresh the fuzz corpus"]
    fn write_fuzz_corpus() {
        let Some(dir) = std::env::var_os("SHOAL_FUZZ_CORPUS") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        for (target, seeds) in [
            ("session_messages", session_seeds()),
            ("drive_reports", drive_seeds()),
            ("coordinator_ops", coordinator_seeds()),
            ("rollout_events", rollout_seeds()),
            ("selector_text", selector_seeds()),
        ] {
            std::fs::create_dir_all(dir.join(target)).unwrap();
            for (i, s) in seeds.iter().enumerate() {
                std::fs::write(dir.join(target).join(format!("seed-{i}")), s).unwrap();
            }
        }
    }
}
