//! The controller's side of one agent's control stream, as a state machine with no I/O.
//!
//! The shell reads [`AgentMsg`]s and feeds them to [`Session::handle`]; the session answers with
//! [`Action`]s: messages to send, requests for the registry (enrol, renew, inventory, health), and
//! when to close. What the session enforces: every message within [`shoal_proto::limits`], Hello
//! first and once, a common protocol version, enrolment only without a certificate, everything else
//! only with one.

use std::sync::atomic::{AtomicU64, Ordering};

use shoal_proto::{
    limits, negotiate, AgentMsg, ControllerMsg, EnrolRequest, Hello, Inventory, NodeId, Reject,
    RejectCode, RenewRequest, UnixMillis, VersionError, VersionRange, Welcome,
};

/// Messages refused for a bound of [`shoal_proto::limits`] since the process started, on every
/// session.
static OVER_LIMIT_REFUSALS: AtomicU64 = AtomicU64::new(0);

/// How many agent messages were refused for being over a bound of [`shoal_proto::limits`] since the
/// process started (`shoal_agent_messages_over_limit_total`).
pub fn over_limit_refusals() -> u64 {
    OVER_LIMIT_REFUSALS.load(Ordering::Relaxed)
}

/// What the shell must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this message.
    Send(ControllerMsg),
    /// Enrol with the registry and answer with [`Session::enrolled`] or a reject.
    Enrol {
        /// The request.
        request: EnrolRequest,
        /// The agent's Hello (hardware identity, version).
        hello: Hello,
    },
    /// Issue a new certificate for the authenticated node.
    Renew(RenewRequest),
    /// The node (re)connected: record its agent version and count it as alive.
    Connected {
        /// Its Hello.
        hello: Hello,
    },
    /// Store the node's inventory.
    Inventory(Inventory),
    /// Record a health report (and heartbeat).
    Health(shoal_proto::HealthReport),
    /// (v2) The node joins the overlay: send it the observed address and its netmap.
    Overlay(shoal_proto::OverlayHello),
    /// (v2) Record the node's path report (v8: with relay reasons; empty before).
    Paths(shoal_proto::PathReportV8),
    /// (v2) Forward a punch request to the named peer.
    Punch(shoal_proto::Punch),
    /// (v3) Record the node's drives and their SMART.
    Drives(shoal_proto::DriveReport),
    /// (v3) A drive command ended.
    DriveCommandResult(shoal_proto::DriveCommandResult),
    /// (v4) The agent took an update offer and is fetching the release.
    UpdateAck {
        /// The version it took.
        version: String,
    },
    /// (v4) The agent's update report: record it and tell whoever waits (the rollout driver).
    UpdateReport(shoal_proto::UpdateReport),
    /// (v4) The agent's answer to [`ControllerMsg::Reboot`]: `Ok(method)` it reboots now,
    /// `Err(reason)` it refused.
    RebootAnswer(Result<String, String>),
    /// (v4) How a maintenance step ended.
    MaintenanceResult(shoal_proto::MaintenanceResult),
    /// (v4) What the node booted and how its health checks went: keep it with the connection.
    BootReport(shoal_proto::BootReport),
    /// (v5) Rotate the node's key: check the old key's signature, issue a certificate for the new
    /// one.
    RotateKey(shoal_proto::RotateKeyRequest),
    /// (v6) Where a backup task is.
    BackupProgress(shoal_proto::BackupProgress),
    /// (v6) How a backup task ended: store it, then acknowledge it.
    BackupResult(shoal_proto::BackupResult),
    /// (v9) The agent runs a WireGuard gateway listening here.
    WireGuardGateway(std::net::SocketAddr),
    /// (v9) Keep the node's datapath report with its live overlay state.
    Datapath(shoal_proto::DatapathReport),
    /// Close the connection, after sending anything queued before it.
    Close(CloseKind, String),
}

/// Why a session closes; the shell maps it to a QUIC application close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// The session did its job (enrolment finished).
    Done,
    /// The request was refused or the agent broke the protocol.
    Refused,
    /// The node was removed from the fleet.
    Revoked,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    AwaitHello,
    /// Unauthenticated, version agreed: only Enrol is allowed, once.
    AwaitEnrol(Hello),
    /// Enrol forwarded to the registry.
    Enrolling,
    /// Authenticated and running.
    Ready,
    Closed,
}

/// Static facts the session needs.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Versions this controller speaks.
    pub supported: VersionRange,
    /// Heartbeat interval told to agents.
    pub heartbeat_interval_ms: u64,
}

/// One agent's control session.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    node: Option<NodeId>,
    state: State,
    version: Option<u16>,
}

impl Session {
    /// A session for a connection authenticated as `node` (from its certificate), or `None` when
    /// the peer presented no certificate.
    pub fn new(config: SessionConfig, node: Option<NodeId>) -> Self {
        Self {
            config,
            node,
            state: State::AwaitHello,
            version: None,
        }
    }

    /// The negotiated protocol version, once agreed.
    pub fn version(&self) -> Option<u16> {
        self.version
    }

    /// The authenticated node.
    pub fn node(&self) -> Option<&NodeId> {
        self.node.as_ref()
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    fn reject(&mut self, code: RejectCode, message: impl Into<String>) -> Vec<Action> {
        let message = message.into();
        self.state = State::Closed;
        let kind = if code == RejectCode::NodeRevoked {
            CloseKind::Revoked
        } else {
            CloseKind::Refused
        };
        vec![
            Action::Send(ControllerMsg::Reject(Reject {
                code,
                message: message.clone(),
            })),
            Action::Close(kind, message),
        ]
    }

    /// Handles one message from the agent.
    pub fn handle(&mut self, now: UnixMillis, msg: AgentMsg) -> Vec<Action> {
        // Refused before anything acts on it, so nothing of it is stored: what the controller knew
        // about the node stays as it was.
        if self.state != State::Closed {
            if let Err(e) = limits::check(&msg) {
                OVER_LIMIT_REFUSALS.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = ?self.node, field = %e.field, actual = e.actual, limit = e.limit, "agent message over a limit refused");
                return self.reject(RejectCode::BadRequest, format!("message refused: {e}"));
            }
        }
        match (std::mem::replace(&mut self.state, State::Closed), msg) {
            (State::Closed, _) => vec![],
            (State::AwaitHello, AgentMsg::Hello(hello)) => {
                let version = match negotiate(self.config.supported, hello.protocol) {
                    Ok(v) => v,
                    Err(e) => {
                        // The agent prints this message, so "this side"/"the peer" from the version
                        // error would point at the wrong machine: name the side to upgrade.
                        let ours = format!(
                            "controller {} speaks protocol {}",
                            env!("CARGO_PKG_VERSION"),
                            self.config.supported
                        );
                        let message = match e {
                            VersionError::PeerTooNew { peer, .. } => {
                                format!("{ours}; this agent speaks only the newer {peer}: upgrade the controller")
                            }
                            VersionError::PeerTooOld { peer, .. } => {
                                format!("{ours}; this agent speaks only the older {peer}: upgrade the agent")
                            }
                            other => format!("{ours}: {other}"),
                        };
                        return self.reject(RejectCode::Version, message);
                    }
                };
                self.version = Some(version);
                let welcome = ControllerMsg::Welcome(Welcome {
                    protocol: version,
                    controller_version: env!("CARGO_PKG_VERSION").to_owned(),
                    node_id: self.node.clone(),
                    heartbeat_interval_ms: self.config.heartbeat_interval_ms,
                    now,
                });
                if self.node.is_some() {
                    self.state = State::Ready;
                    vec![Action::Send(welcome), Action::Connected { hello }]
                } else {
                    self.state = State::AwaitEnrol(hello);
                    vec![Action::Send(welcome)]
                }
            }
            (State::AwaitHello, _) => {
                self.reject(RejectCode::Protocol, "the first message must be Hello")
            }
            (State::AwaitEnrol(hello), AgentMsg::Enrol(request)) => {
                self.state = State::Enrolling;
                vec![Action::Enrol { request, hello }]
            }
            (State::AwaitEnrol(_), _) => self.reject(
                RejectCode::Protocol,
                "without a node certificate the only allowed request is Enrol",
            ),
            (State::Enrolling, _) => self.reject(
                RejectCode::Protocol,
                "no messages are allowed while enrolment is pending",
            ),
            (State::Ready, msg) => {
                self.state = State::Ready;
                match msg {
                    AgentMsg::Inventory(inv) => vec![Action::Inventory(inv)],
                    AgentMsg::Health(h) => vec![Action::Health(h)],
                    AgentMsg::Renew(r) => vec![Action::Renew(r)],
                    // Overlay messages exist from protocol 2: a v1 session sending them is
                    // confused.
                    AgentMsg::Overlay(_) | AgentMsg::Paths(_) | AgentMsg::Punch(_)
                        if self.version < Some(2) =>
                    {
                        self.reject(RejectCode::Protocol, "overlay messages need protocol 2")
                    }
                    AgentMsg::Overlay(o) => vec![Action::Overlay(o)],
                    AgentMsg::Paths(report) => vec![Action::Paths(report.into())],
                    AgentMsg::PathsV8(_) if self.version < Some(8) => {
                        self.reject(RejectCode::Protocol, "relay reasons need protocol 8")
                    }
                    AgentMsg::PathsV8(p) => vec![Action::Paths(p)],
                    AgentMsg::Punch(p) => vec![Action::Punch(p)],
                    // Drive reports exist from protocol 3.
                    AgentMsg::Drives(_) | AgentMsg::DriveCommandResult(_)
                        if self.version < Some(3) =>
                    {
                        self.reject(RejectCode::Protocol, "drive messages need protocol 3")
                    }
                    AgentMsg::Drives(d) => vec![Action::Drives(d)],
                    AgentMsg::DriveCommandResult(r) => vec![Action::DriveCommandResult(r)],
                    // Update messages exist from protocol 4.
                    AgentMsg::UpdateAck { .. }
                    | AgentMsg::UpdateReport(_)
                    | AgentMsg::RebootAck { .. }
                    | AgentMsg::RebootRefused { .. }
                    | AgentMsg::MaintenanceResult(_)
                    | AgentMsg::BootReport(_)
                        if self.version < Some(4) =>
                    {
                        self.reject(
                            RejectCode::Protocol,
                            "update and reboot messages need protocol 4",
                        )
                    }
                    AgentMsg::RebootAck { method } => vec![Action::RebootAnswer(Ok(method))],
                    AgentMsg::RebootRefused { reason } => vec![Action::RebootAnswer(Err(reason))],
                    AgentMsg::UpdateAck { version } => vec![Action::UpdateAck { version }],
                    AgentMsg::UpdateReport(r) => vec![Action::UpdateReport(r)],
                    AgentMsg::MaintenanceResult(r) => vec![Action::MaintenanceResult(r)],
                    AgentMsg::BootReport(r) => vec![Action::BootReport(r)],
                    AgentMsg::RotateKey(_) if self.version < Some(5) => {
                        self.reject(RejectCode::Protocol, "key rotation needs protocol 5")
                    }
                    AgentMsg::RotateKey(r) => vec![Action::RotateKey(r)],
                    AgentMsg::BackupProgress(_) | AgentMsg::BackupResult(_)
                        if self.version < Some(6) =>
                    {
                        self.reject(RejectCode::Protocol, "backup messages need protocol 6")
                    }
                    AgentMsg::BackupProgress(p) => vec![Action::BackupProgress(p)],
                    AgentMsg::BackupResult(r) => vec![Action::BackupResult(r)],
                    AgentMsg::WireGuardGateway(_) if self.version < Some(9) => {
                        self.reject(RejectCode::Protocol, "WireGuard gateways need protocol 9")
                    }
                    AgentMsg::WireGuardGateway(g) => vec![Action::WireGuardGateway(g.listen)],
                    AgentMsg::Datapath(_) if self.version < Some(9) => {
                        self.reject(RejectCode::Protocol, "datapath reports need protocol 9")
                    }
                    AgentMsg::Datapath(d) => vec![Action::Datapath(d)],
                    AgentMsg::Hello(_) => self.reject(RejectCode::Protocol, "Hello sent twice"),
                    AgentMsg::Enrol(_) => self.reject(
                        RejectCode::Protocol,
                        "already enrolled: renew instead of enrolling",
                    ),
                }
            }
        }
    }

    /// The registry enrolled the agent: send the certificate and end the enrolment connection (the
    /// agent reconnects with its certificate).
    pub fn enrolled(&mut self, enrolled: shoal_proto::Enrolled) -> Vec<Action> {
        self.state = State::Closed;
        vec![
            Action::Send(ControllerMsg::Enrolled(enrolled)),
            Action::Close(CloseKind::Done, "enrolled".into()),
        ]
    }

    /// The registry refused the request.
    pub fn refused(&mut self, code: RejectCode, message: impl Into<String>) -> Vec<Action> {
        self.reject(code, message)
    }

    /// The node was removed while connected.
    pub fn revoked(&mut self, reason: &str) -> Vec<Action> {
        self.state = State::Closed;
        vec![
            Action::Send(ControllerMsg::Revoked {
                reason: reason.to_owned(),
            }),
            Action::Close(CloseKind::Revoked, reason.to_owned()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{HardwareId, HardwareIdSource, HealthReport, SUPPORTED};

    fn config() -> SessionConfig {
        SessionConfig {
            supported: SUPPORTED,
            heartbeat_interval_ms: 10_000,
        }
    }

    fn hello(min: u16, max: u16) -> AgentMsg {
        AgentMsg::Hello(Hello {
            protocol: VersionRange { min, max },
            agent_version: "test".into(),
            hardware_id: HardwareId {
                source: HardwareIdSource::Override,
                value: "m1".into(),
            },
        })
    }

    fn enrol() -> AgentMsg {
        AgentMsg::Enrol(EnrolRequest {
            token: "t".into(),
            csr_der: vec![1],
            hostname: "h".into(),
        })
    }

    fn rejected(actions: &[Action]) -> Option<RejectCode> {
        actions.iter().find_map(|a| match a {
            Action::Send(ControllerMsg::Reject(r)) => Some(r.code),
            _ => None,
        })
    }

    #[test]
    fn authenticated_session_reports_after_welcome() {
        let mut s = Session::new(config(), Some(NodeId("n1".into())));
        let a = s.handle(UnixMillis(1), hello(SUPPORTED.min, SUPPORTED.max));
        assert!(
            matches!(&a[0], Action::Send(ControllerMsg::Welcome(w)) if w.node_id == Some(NodeId("n1".into())))
        );
        assert!(matches!(&a[1], Action::Connected { .. }));
        let a = s.handle(UnixMillis(2), AgentMsg::Health(HealthReport::default()));
        assert!(matches!(&a[..], [Action::Health(_)]));
        assert_eq!(
            rejected(&s.handle(UnixMillis(3), enrol())),
            Some(RejectCode::Protocol)
        );
        assert!(s.is_closed());
    }

    #[test]
    fn unauthenticated_session_may_only_enrol_once() {
        let mut s = Session::new(config(), None);
        s.handle(UnixMillis(1), hello(SUPPORTED.min, SUPPORTED.max));
        assert_eq!(
            rejected(&s.handle(UnixMillis(2), AgentMsg::Health(HealthReport::default()))),
            Some(RejectCode::Protocol)
        );

        let mut s = Session::new(config(), None);
        s.handle(UnixMillis(1), hello(SUPPORTED.min, SUPPORTED.max));
        assert!(matches!(
            &s.handle(UnixMillis(2), enrol())[..],
            [Action::Enrol { .. }]
        ));
        assert_eq!(
            rejected(&s.handle(UnixMillis(3), enrol())),
            Some(RejectCode::Protocol)
        );
    }

    #[test]
    fn drive_reports_need_protocol_3() {
        let drives = || AgentMsg::Drives(shoal_proto::DriveReport::default());
        // A v2 agent (or a v3 agent downgraded to 2) must not send them.
        let mut s = Session::new(config(), Some(NodeId("n1".into())));
        s.handle(UnixMillis(1), hello(1, 2));
        assert_eq!(s.version(), Some(2));
        assert_eq!(
            rejected(&s.handle(UnixMillis(2), drives())),
            Some(RejectCode::Protocol)
        );

        let mut s = Session::new(config(), Some(NodeId("n1".into())));
        s.handle(UnixMillis(1), hello(1, 3));
        assert_eq!(s.version(), Some(3));
        assert!(matches!(
            &s.handle(UnixMillis(2), drives())[..],
            [Action::Drives(_)]
        ));
    }

    #[test]
    fn update_messages_need_protocol_4_and_v3_agents_still_talk() {
        let report = || {
            AgentMsg::UpdateReport(shoal_proto::UpdateReport {
                running: "0.1.0".into(),
                attempted: None,
                attempts: 0,
                checks: vec![],
                failure: None,
            })
        };
        let mut s = Session::new(config(), Some(NodeId("n1".into())));
        s.handle(UnixMillis(1), hello(1, 3));
        assert_eq!(
            s.version(),
            Some(3),
            "a v3 agent talks v3 with a v4 controller"
        );
        assert!(matches!(
            &s.handle(UnixMillis(2), AgentMsg::Drives(Default::default()))[..],
            [Action::Drives(_)]
        ));
        assert_eq!(
            rejected(&s.handle(UnixMillis(3), report())),
            Some(RejectCode::Protocol)
        );
        let mut s = Session::new(config(), Some(NodeId("n1".into())));
        s.handle(UnixMillis(1), hello(1, 3));
        let refused = s.handle(
            UnixMillis(2),
            AgentMsg::RebootRefused {
                reason: "no".into(),
            },
        );
        assert_eq!(
            rejected(&refused),
            Some(RejectCode::Protocol),
            "a v3 session has no reboot answers"
        );

        let mut s = Session::new(config(), Some(NodeId("n1".into())));
        s.handle(UnixMillis(1), hello(1, 4));
        assert_eq!(s.version(), Some(4));
        assert!(matches!(
            &s.handle(UnixMillis(2), report())[..],
            [Action::UpdateReport(_)]
        ));
        let ack = s.handle(
            UnixMillis(3),
            AgentMsg::UpdateAck {
                version: "0.2.0".into(),
            },
        );
        assert_eq!(
            ack,
            vec![Action::UpdateAck {
                version: "0.2.0".into()
            }]
        );
        let ack = s.handle(
            UnixMillis(4),
            AgentMsg::RebootAck {
                method: "kexec -e".into(),
            },
        );
        assert_eq!(ack, vec![Action::RebootAnswer(Ok("kexec -e".into()))]);
        let no = s.handle(
            UnixMillis(5),
            AgentMsg::RebootRefused {
                reason: "--no-remote-reboot".into(),
            },
        );
        assert_eq!(
            no,
            vec![Action::RebootAnswer(Err("--no-remote-reboot".into()))]
        );
    }

    #[test]
    fn hello_must_come_first() {
        let mut s = Session::new(config(), Some(NodeId("n1".into())));
        assert_eq!(
            rejected(&s.handle(UnixMillis(1), AgentMsg::Inventory(Default::default()))),
            Some(RejectCode::Protocol)
        );
        assert!(
            s.handle(UnixMillis(2), hello(1, 1)).is_empty(),
            "closed sessions ignore input"
        );
    }

    #[test]
    fn incompatible_versions_are_rejected_with_a_reason_and_newer_peers_downgrade() {
        let mut s = Session::new(config(), None);
        let a = s.handle(UnixMillis(1), hello(SUPPORTED.max + 1, SUPPORTED.max + 2));
        assert_eq!(rejected(&a), Some(RejectCode::Version));
        let Action::Send(ControllerMsg::Reject(r)) = &a[0] else {
            panic!()
        };
        assert!(
            r.message.contains("upgrade the controller"),
            "{}",
            r.message
        );

        let mut s = Session::new(config(), None);
        let a = s.handle(UnixMillis(1), hello(SUPPORTED.max, SUPPORTED.max + 1));
        assert!(
            matches!(&a[0], Action::Send(ControllerMsg::Welcome(w)) if w.protocol == SUPPORTED.max)
        );
    }

    #[test]
    fn messages_over_a_limit_are_refused_naming_the_field_in_every_state() {
        let big_inventory = || {
            AgentMsg::Inventory(Inventory {
                nics: vec![Default::default(); limits::MAX_NICS + 1],
                ..Default::default()
            })
        };
        let before = over_limit_refusals();
        // Ready: the report is refused whole and the session ends; an inventory at the bound is
        // taken.
        let mut s = Session::new(config(), Some(NodeId("n1".into())));
        s.handle(UnixMillis(1), hello(SUPPORTED.min, SUPPORTED.max));
        let at = AgentMsg::Inventory(Inventory {
            nics: vec![Default::default(); limits::MAX_NICS],
            ..Default::default()
        });
        assert!(matches!(
            &s.handle(UnixMillis(2), at)[..],
            [Action::Inventory(_)]
        ));
        let a = s.handle(UnixMillis(3), big_inventory());
        assert_eq!(rejected(&a), Some(RejectCode::BadRequest));
        let Action::Send(ControllerMsg::Reject(r)) = &a[0] else {
            panic!("{a:?}")
        };
        assert!(
            r.message.contains("inventory.nics")
                && r.message.contains(&limits::MAX_NICS.to_string()),
            "{}",
            r.message
        );
        assert!(matches!(&a[1], Action::Close(CloseKind::Refused, _)));
        assert!(
            !a.iter().any(|x| matches!(x, Action::Inventory(_))),
            "nothing of it reaches the registry"
        );
        assert!(s.is_closed());

        // Before Hello, and an Enrol on an unauthenticated session.
        let mut s = Session::new(config(), None);
        let long_hello = AgentMsg::Hello(Hello {
            protocol: SUPPORTED,
            agent_version: "v".repeat(limits::MAX_NAME_LEN + 1),
            hardware_id: HardwareId {
                source: HardwareIdSource::Override,
                value: "m1".into(),
            },
        });
        assert_eq!(
            rejected(&s.handle(UnixMillis(1), long_hello)),
            Some(RejectCode::BadRequest)
        );
        let mut s = Session::new(config(), None);
        s.handle(UnixMillis(1), hello(SUPPORTED.min, SUPPORTED.max));
        let enrol = AgentMsg::Enrol(EnrolRequest {
            token: "t".into(),
            csr_der: vec![0; limits::MAX_CSR_LEN + 1],
            hostname: "h".into(),
        });
        let a = s.handle(UnixMillis(2), enrol);
        assert_eq!(rejected(&a), Some(RejectCode::BadRequest));
        assert!(!a.iter().any(|x| matches!(x, Action::Enrol { .. })));
        assert!(over_limit_refusals() >= before + 3, "counted");
    }

    #[test]
    fn relay_reasons_need_protocol_8_and_v2_reports_still_count() {
        let report = || shoal_proto::PathReport {
            paths: vec![],
            counters: Default::default(),
        };
        let v8 = || AgentMsg::PathsV8(report().into());
        let mut s = Session::new(config(), Some(NodeId("n1".into())));
        s.handle(UnixMillis(1), hello(1, 7));
        assert!(matches!(
            &s.handle(UnixMillis(2), AgentMsg::Paths(report()))[..],
            [Action::Paths(p)] if p.relayed.is_empty()
        ));
        assert_eq!(
            rejected(&s.handle(UnixMillis(3), v8())),
            Some(RejectCode::Protocol)
        );

        let mut s = Session::new(config(), Some(NodeId("n1".into())));
        s.handle(UnixMillis(1), hello(1, 8));
        assert!(matches!(
            &s.handle(UnixMillis(2), v8())[..],
            [Action::Paths(_)]
        ));
    }

    #[test]
    fn wireguard_gateways_need_protocol_9() {
        let gw = || {
            AgentMsg::WireGuardGateway(shoal_proto::WireGuardGatewayHello {
                listen: std::net::SocketAddr::from(([192, 0, 2, 1], 51820)),
            })
        };
        let mut s = Session::new(config(), Some(NodeId("n1".into())));
        s.handle(UnixMillis(1), hello(1, 8));
        assert_eq!(
            rejected(&s.handle(UnixMillis(2), gw())),
            Some(RejectCode::Protocol)
        );
        let mut s = Session::new(config(), Some(NodeId("n1".into())));
        s.handle(UnixMillis(1), hello(1, 9));
        assert!(matches!(
            &s.handle(UnixMillis(2), gw())[..],
            [Action::WireGuardGateway(a)] if a.port() == 51820
        ));
    }

    #[test]
    fn datapath_reports_need_protocol_9() {
        let report = || AgentMsg::Datapath(shoal_proto::DatapathReport::default());
        let mut s = Session::new(config(), Some(NodeId("n1".into())));
        s.handle(UnixMillis(1), hello(1, 8));
        assert_eq!(
            rejected(&s.handle(UnixMillis(2), report())),
            Some(RejectCode::Protocol)
        );
        let mut s = Session::new(config(), Some(NodeId("n1".into())));
        s.handle(UnixMillis(1), hello(1, 9));
        assert!(matches!(
            &s.handle(UnixMillis(2), report())[..],
            [Action::Datapath(_)]
        ));
    }

    #[test]
    fn revocation_tells_the_agent_then_closes() {
        let mut s = Session::new(config(), Some(NodeId("n1".into())));
        s.handle(UnixMillis(1), hello(1, 1));
        let a = s.revoked("removed by operator");
        assert!(matches!(&a[0], Action::Send(ControllerMsg::Revoked { .. })));
        assert!(matches!(&a[1], Action::Close(CloseKind::Revoked, _)));
        assert!(s.is_closed());
    }
}
