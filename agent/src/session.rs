//! The agent's side of a control session, as a state machine with time passed in.
//!
//! The shell opens the connection, sends what [`AgentSession::start`] returns, feeds every
//! [`ControllerMsg`] to [`AgentSession::handle`], and calls [`AgentSession::handle_timeout`] at
//! [`AgentSession::poll_timeout`]. Outputs ask it to send, to collect health or inventory (I/O the
//! session does not do), to renew, or say how the session ended. Each kind of controller message
//! the shell acts on is its own [`Output`] variant, so the shell matches them exhaustively (as
//! quinn-proto's `Event`): the session decides what the negotiated protocol allows, the shell only
//! carries it out.

use std::time::{Duration, Instant};

use shoal_proto::{
    AgentMsg, ControllerMsg, ControllerSet, DriveCommand, DrivePolicy, EnrolRequest, Enrolled,
    Hello, KexecImage, MaintenanceStep, Netmap, NetmapDelta, Observed, Punch, Reject, Renewed,
    SignedKexecImage, UnixMillis, UpdateOffer, Welcome,
};

/// What the shell must do: one variant per kind of work, so the shell's match is exhaustive.
// Outputs live for one loop turn; boxing the large variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this message (Hello, Enrol).
    Send(AgentMsg),
    /// Collect a health report and send it.
    SendHealth,
    /// Collect the inventory and send it if it changed since the last one sent (always, the first
    /// time).
    SendInventory {
        /// Send even if unchanged (first report on a connection).
        force: bool,
    },
    /// Generate a CSR with the node key and send a Renew.
    Renew,
    /// Store the renewed certificate.
    StoreRenewed(Renewed),
    /// (protocol 5) The controller asks for a key rotation: generate a new key, sign the rotation
    /// with the current one and send `RotateKey`.
    Rotate {
        /// The controller's reason, for the log.
        reason: String,
    },
    /// (protocol 5) The certificate for the new key: store it with the new key (the session then
    /// ends, and the next connection uses the new key).
    StoreRotated(Renewed),
    /// (protocol 2) The controller speaks overlay: start or resume it and send `OverlayHello`.
    StartOverlay,
    /// (protocol 2) The address the controller sees this node's socket at, and maybe a port to
    /// probe the NAT's mapping with.
    Observed(Observed),
    /// (protocol 2) A whole netmap for the overlay.
    Netmap(Netmap),
    /// (protocol 2) Changes to the cached netmap.
    NetmapDelta(NetmapDelta),
    /// (protocol 2) A peer wants to reach this node: punch towards it.
    Punch(Punch),
    /// (protocol 2) Collect a path report and send it.
    SendPaths,
    /// (protocol 3) The controller speaks drives: send the current drive report.
    SendDrives,
    /// (protocol 3) The controller's drive policy, for the drive manager.
    DrivePolicy(DrivePolicy),
    /// (protocol 3) An operator's drive command, for the drive manager.
    DriveCommand(DriveCommand),
    /// (protocol 4) The controller speaks updates: send the current update report.
    SendUpdateReport,
    /// (protocol 4) An offer of another agent version. A v4 `UpdateAgent` arrives here as an
    /// offer without downgrade permission; a v5 `UpdateOffer` carries its own.
    UpdateOffer(UpdateOffer),
    /// (protocol 4) Go back to the previous binary.
    RevertAgent {
        /// The controller's reason, for the log.
        reason: String,
    },
    /// (protocol 4) Reboot (acknowledge or refuse first).
    Reboot {
        /// The controller's reason, for the log.
        reason: String,
        /// Kexec into a named or loaded kernel where allowed.
        prefer_kexec: bool,
    },
    /// (protocol 4) A maintenance step.
    MaintenanceStep(MaintenanceStep),
    /// (protocol 6) Run a backup task (or answer it again if it ran).
    BackupTask(shoal_proto::BackupTask),
    /// (protocol 6) The controller stored this task's result.
    BackupAck {
        /// The task.
        task: String,
    },
    /// (protocol 6) Send the backup results the controller has not acknowledged.
    SendBackupResults,
    /// (protocol 4) An unsigned image named for the next reboot.
    KexecImage(KexecImage),
    /// (protocol 5) A signed image named for the next reboot.
    SignedKexecImage(SignedKexecImage),
    /// (protocol 7) The fleet's controllers: keep them to fail over to.
    ControllerSet(ControllerSet),
    /// (protocol 9) Say whether this agent runs a WireGuard gateway (sent after Welcome).
    StartWireGuard,
    /// (protocol 9) The WireGuard devices and gateways of this node's networks.
    WireGuard(shoal_proto::WireGuardMap),
    /// The session is over.
    End(End),
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// Enrolment succeeded: store the credentials and reconnect with them.
    Enrolled(Enrolled),
    /// The controller refused.
    Rejected(Reject),
    /// The node was removed.
    Revoked(String),
    /// The controller broke the protocol.
    Protocol(String),
    /// The node rotated to a new key: reconnect with it.
    Rotated,
}

/// What this session is for.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Enrol with this request.
    Enrol(EnrolRequest),
    /// Run as an enrolled node whose certificate expires at `cert_not_after`.
    Node {
        /// Certificate expiry.
        cert_not_after: UnixMillis,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    AwaitWelcome,
    AwaitEnrolled,
    Ready,
    Ended,
}

/// Timing knobs.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Health interval when the controller does not say (it always does).
    pub health_interval: Option<Duration>,
    /// How often inventory is re-checked for changes.
    pub inventory_interval: Duration,
    /// How often overlay paths are reported (protocol 2).
    pub paths_interval: Duration,
}

/// One control session.
#[derive(Debug)]
pub struct AgentSession {
    hello: Hello,
    mode: Mode,
    timing: Timing,
    state: State,
    health_interval: Duration,
    next_health: Option<Instant>,
    next_inventory: Option<Instant>,
    next_paths: Option<Instant>,
    renew_at: Option<Instant>,
    renewing: bool,
    rotating: bool,
    welcome: Option<Welcome>,
}

impl AgentSession {
    /// A session that will open with `hello`.
    pub fn new(hello: Hello, mode: Mode, timing: Timing) -> Self {
        let health_interval = timing.health_interval.unwrap_or(Duration::from_secs(10));
        Self {
            hello,
            mode,
            timing,
            state: State::AwaitWelcome,
            health_interval,
            next_health: None,
            next_inventory: None,
            next_paths: None,
            renew_at: None,
            renewing: false,
            rotating: false,
            welcome: None,
        }
    }

    /// The first messages to send.
    pub fn start(&mut self) -> Vec<Output> {
        vec![Output::Send(AgentMsg::Hello(self.hello.clone()))]
    }

    /// The controller's Welcome, once received.
    pub fn welcome(&self) -> Option<&Welcome> {
        self.welcome.as_ref()
    }

    /// Whether the session reached its running state (used to reset reconnect backoff).
    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    fn end(&mut self, end: End) -> Vec<Output> {
        self.state = State::Ended;
        vec![Output::End(end)]
    }

    /// When renewal is due: two thirds into the certificate's remaining life as seen at `now`.
    fn schedule_renewal(&mut self, now: Instant, wall_now: UnixMillis, not_after: UnixMillis) {
        let remaining = Duration::from_millis(not_after.0.saturating_sub(wall_now.0));
        self.renew_at = Some(now + remaining * 2 / 3);
    }

    /// Handles a controller message. `wall_now` is the wall clock, for certificate lifetimes.
    pub fn handle(
        &mut self,
        now: Instant,
        wall_now: UnixMillis,
        msg: ControllerMsg,
    ) -> Vec<Output> {
        // What the negotiated protocol carries (the overlay runs from Welcome on, from protocol 2).
        let overlay = self.next_paths.is_some();
        let (drives, updates, trust) = (
            self.speaks_drives(),
            self.speaks_updates(),
            self.speaks_trust(),
        );
        match (&self.state, msg) {
            (State::Ended, _) => vec![],
            (_, ControllerMsg::Reject(r)) => self.end(End::Rejected(r)),
            (_, ControllerMsg::Revoked { reason }) => self.end(End::Revoked(reason)),
            (State::AwaitWelcome, ControllerMsg::Welcome(w)) => {
                if w.heartbeat_interval_ms > 0 && self.timing.health_interval.is_none() {
                    self.health_interval = Duration::from_millis(w.heartbeat_interval_ms);
                }
                self.welcome = Some(w);
                match self.mode.clone() {
                    Mode::Enrol(req) => {
                        self.state = State::AwaitEnrolled;
                        vec![Output::Send(AgentMsg::Enrol(req))]
                    }
                    Mode::Node { cert_not_after } => {
                        self.state = State::Ready;
                        self.schedule_renewal(now, wall_now, cert_not_after);
                        self.next_health = Some(now + self.health_interval);
                        self.next_inventory = Some(now + self.timing.inventory_interval);
                        let overlay = self.welcome.as_ref().is_some_and(|w| w.protocol >= 2);
                        let mut out =
                            vec![Output::SendInventory { force: true }, Output::SendHealth];
                        if overlay {
                            self.next_paths = Some(now + self.timing.paths_interval);
                            out.push(Output::StartOverlay);
                        }
                        if self.speaks_drives() {
                            out.push(Output::SendDrives);
                        }
                        if self.speaks_updates() {
                            out.push(Output::SendUpdateReport);
                        }
                        if self.speaks_backups() {
                            out.push(Output::SendBackupResults);
                        }
                        if self.speaks_wireguard() {
                            out.push(Output::StartWireGuard);
                        }
                        out
                    }
                }
            }
            (State::AwaitEnrolled, ControllerMsg::Enrolled(e)) => self.end(End::Enrolled(e)),
            (State::Ready, ControllerMsg::Observed(o)) if overlay => vec![Output::Observed(o)],
            (State::Ready, ControllerMsg::Netmap(m)) if overlay => vec![Output::Netmap(m)],
            (State::Ready, ControllerMsg::NetmapDelta(d)) if overlay => {
                vec![Output::NetmapDelta(d)]
            }
            (State::Ready, ControllerMsg::Punch(p)) if overlay => vec![Output::Punch(p)],
            (State::Ready, ControllerMsg::DrivePolicy(p)) if drives => {
                vec![Output::DrivePolicy(p)]
            }
            (State::Ready, ControllerMsg::DriveCommand(c)) if drives => {
                vec![Output::DriveCommand(c)]
            }
            (State::Ready, ControllerMsg::UpdateAgent { version, release }) if updates => {
                // A v4 offer carries no downgrade permission.
                vec![Output::UpdateOffer(UpdateOffer {
                    version,
                    release,
                    allow_downgrade: false,
                })]
            }
            (State::Ready, ControllerMsg::RevertAgent { reason }) if updates => {
                vec![Output::RevertAgent { reason }]
            }
            (
                State::Ready,
                ControllerMsg::Reboot {
                    reason,
                    prefer_kexec,
                },
            ) if updates => vec![Output::Reboot {
                reason,
                prefer_kexec,
            }],
            (State::Ready, ControllerMsg::Maintenance(step)) if updates => {
                vec![Output::MaintenanceStep(step)]
            }
            (State::Ready, ControllerMsg::KexecImage(image)) if updates => {
                vec![Output::KexecImage(image)]
            }
            (State::Ready, ControllerMsg::UpdateOffer(offer)) if trust => {
                vec![Output::UpdateOffer(offer)]
            }
            (State::Ready, ControllerMsg::SignedKexecImage(image)) if trust => {
                vec![Output::SignedKexecImage(image)]
            }
            (State::Ready, ControllerMsg::BackupTask(task)) if self.speaks_backups() => {
                vec![Output::BackupTask(task)]
            }
            (State::Ready, ControllerMsg::BackupAck { task }) if self.speaks_backups() => {
                vec![Output::BackupAck { task }]
            }
            (State::Ready, ControllerMsg::ControllerSet(set)) if self.speaks_cluster() => {
                vec![Output::ControllerSet(set)]
            }
            (State::Ready, ControllerMsg::WireGuard(map)) if self.speaks_wireguard() => {
                vec![Output::WireGuard(map)]
            }
            (State::Ready, ControllerMsg::RotateKey { reason }) if self.speaks_trust() => {
                if self.rotating {
                    return vec![];
                }
                self.rotating = true;
                vec![Output::Rotate { reason }]
            }
            (State::Ready, ControllerMsg::Renewed(r)) if self.renewing => {
                self.renewing = false;
                self.schedule_renewal(now, wall_now, r.not_after);
                vec![Output::StoreRenewed(r)]
            }
            // Answers come in request order: a renewal asked for before the rotation is answered
            // first.
            (State::Ready, ControllerMsg::Renewed(r)) if self.rotating => {
                self.rotating = false;
                let mut out = vec![Output::StoreRotated(r)];
                out.extend(self.end(End::Rotated));
                out
            }
            (_, other) => self.end(End::Protocol(format!(
                "unexpected message from the controller: {other:?}"
            ))),
        }
    }

    /// Whether the negotiated protocol carries drive messages (3 and later).
    pub fn speaks_drives(&self) -> bool {
        self.welcome.as_ref().is_some_and(|w| w.protocol >= 3)
    }

    /// Whether the negotiated protocol carries backup tasks (6 and later).
    pub fn speaks_backups(&self) -> bool {
        self.welcome
            .as_ref()
            .is_some_and(|w| w.protocol >= shoal_proto::BACKUP_PROTOCOL)
    }

    /// Whether the negotiated protocol carries the controller set (7 and later).
    pub fn speaks_cluster(&self) -> bool {
        self.welcome
            .as_ref()
            .is_some_and(|w| w.protocol >= shoal_proto::CLUSTER_PROTOCOL)
    }

    /// Whether the negotiated protocol carries WireGuard gateways (9 and later).
    pub fn speaks_wireguard(&self) -> bool {
        self.welcome
            .as_ref()
            .is_some_and(|w| w.protocol >= shoal_proto::WIREGUARD_PROTOCOL)
    }

    /// Whether the negotiated protocol carries update messages (4 and later).
    pub fn speaks_updates(&self) -> bool {
        self.welcome.as_ref().is_some_and(|w| w.protocol >= 4)
    }

    /// Whether the negotiated protocol carries key rotation, downgrade permission and signed kexec
    /// images (5 and later).
    pub fn speaks_trust(&self) -> bool {
        self.welcome.as_ref().is_some_and(|w| w.protocol >= 5)
    }

    /// The next time [`AgentSession::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state != State::Ready {
            return None;
        }
        let renew = if self.renewing { None } else { self.renew_at };
        [
            self.next_health,
            self.next_inventory,
            self.next_paths,
            renew,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Does whatever is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if self.state != State::Ready {
            return out;
        }
        if let Some(t) = self.next_health.filter(|t| *t <= now) {
            // Keep the cadence even if the shell woke late, without bursting to catch up.
            self.next_health = Some((t + self.health_interval).max(now + self.health_interval / 2));
            out.push(Output::SendHealth);
        }
        if self.next_inventory.is_some_and(|t| t <= now) {
            self.next_inventory = Some(now + self.timing.inventory_interval);
            out.push(Output::SendInventory { force: false });
        }
        if self.next_paths.is_some_and(|t| t <= now) {
            self.next_paths = Some(now + self.timing.paths_interval);
            out.push(Output::SendPaths);
        }
        if !self.renewing && !self.rotating && self.renew_at.is_some_and(|t| t <= now) {
            self.renewing = true;
            out.push(Output::Renew);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{HardwareId, HardwareIdSource, RejectCode, SUPPORTED};

    fn hello() -> Hello {
        Hello {
            protocol: SUPPORTED,
            agent_version: "t".into(),
            hardware_id: HardwareId {
                source: HardwareIdSource::Override,
                value: "m".into(),
            },
        }
    }

    fn welcome(interval_ms: u64) -> ControllerMsg {
        ControllerMsg::Welcome(Welcome {
            protocol: 1,
            controller_version: "t".into(),
            node_id: None,
            heartbeat_interval_ms: interval_ms,
            now: UnixMillis(0),
        })
    }

    fn timing() -> Timing {
        Timing {
            health_interval: None,
            inventory_interval: Duration::from_secs(60),
            paths_interval: Duration::from_secs(5),
        }
    }

    #[test]
    fn protocol_2_starts_the_overlay_passes_its_messages_on_and_reports_paths() {
        let t0 = Instant::now();
        let mut s = AgentSession::new(
            hello(),
            Mode::Node {
                cert_not_after: UnixMillis(3_600_000),
            },
            timing(),
        );
        s.start();
        let mut w = welcome(10_000);
        if let ControllerMsg::Welcome(w) = &mut w {
            w.protocol = 2;
        }
        let out = s.handle(t0, UnixMillis(0), w);
        assert_eq!(
            out,
            vec![
                Output::SendInventory { force: true },
                Output::SendHealth,
                Output::StartOverlay
            ]
        );
        let punch = ControllerMsg::Punch(shoal_proto::Punch {
            peer: shoal_proto::NodeId("b".into()),
            endpoints: vec![],
        });
        assert_eq!(
            s.handle(t0, UnixMillis(0), punch),
            vec![Output::Punch(shoal_proto::Punch {
                peer: shoal_proto::NodeId("b".into()),
                endpoints: vec![],
            })]
        );
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        assert_eq!(
            s.handle_timeout(t0 + Duration::from_secs(5)),
            vec![Output::SendPaths]
        );
    }

    #[test]
    fn wireguard_maps_are_passed_on_from_protocol_9_and_are_a_protocol_error_before() {
        let map = ControllerMsg::WireGuard(shoal_proto::WireGuardMap::default());
        for (protocol, passed) in [(shoal_proto::WIREGUARD_PROTOCOL, true), (8, false)] {
            let mut s = AgentSession::new(
                hello(),
                Mode::Node {
                    cert_not_after: UnixMillis(3_600_000),
                },
                timing(),
            );
            s.start();
            let mut w = welcome(10_000);
            if let ControllerMsg::Welcome(w) = &mut w {
                w.protocol = protocol;
            }
            let started = s.handle(Instant::now(), UnixMillis(0), w);
            assert_eq!(started.contains(&Output::StartWireGuard), passed);
            let out = s.handle(Instant::now(), UnixMillis(0), map.clone());
            if passed {
                assert_eq!(
                    out,
                    vec![Output::WireGuard(shoal_proto::WireGuardMap::default())]
                );
            } else {
                assert!(
                    matches!(&out[..], [Output::End(End::Protocol(_))]),
                    "{out:?}"
                );
            }
        }
    }

    #[test]
    fn the_controller_set_is_passed_on_from_protocol_7_and_is_a_protocol_error_before() {
        let set = ControllerMsg::ControllerSet(ControllerSet {
            controllers: vec![shoal_proto::ControllerEndpoint {
                id: "b".into(),
                addr: "192.0.2.2:7440".parse().expect("addr"),
            }],
        });
        for (protocol, passed) in [(shoal_proto::CLUSTER_PROTOCOL, true), (6, false)] {
            let mut s = AgentSession::new(
                hello(),
                Mode::Node {
                    cert_not_after: UnixMillis(3_600_000),
                },
                timing(),
            );
            s.start();
            let mut w = welcome(10_000);
            if let ControllerMsg::Welcome(w) = &mut w {
                w.protocol = protocol;
            }
            s.handle(Instant::now(), UnixMillis(0), w);
            let out = s.handle(Instant::now(), UnixMillis(0), set.clone());
            if passed {
                let ControllerMsg::ControllerSet(inner) = set.clone() else {
                    unreachable!()
                };
                assert_eq!(out, vec![Output::ControllerSet(inner)]);
            } else {
                assert!(
                    matches!(&out[..], [Output::End(End::Protocol(_))]),
                    "{out:?}"
                );
            }
        }
    }

    #[test]
    fn overlay_messages_on_a_protocol_1_session_are_protocol_errors() {
        let mut s = AgentSession::new(
            hello(),
            Mode::Node {
                cert_not_after: UnixMillis(3_600_000),
            },
            timing(),
        );
        s.start();
        s.handle(Instant::now(), UnixMillis(0), welcome(10_000));
        let out = s.handle(
            Instant::now(),
            UnixMillis(0),
            ControllerMsg::Netmap(Default::default()),
        );
        assert!(
            matches!(&out[..], [Output::End(End::Protocol(_))]),
            "{out:?}"
        );
    }

    #[test]
    fn enrolment_sends_the_request_after_welcome_and_ends_with_the_certificate() {
        let req = EnrolRequest {
            token: "t".into(),
            csr_der: vec![],
            hostname: "h".into(),
        };
        let mut s = AgentSession::new(hello(), Mode::Enrol(req.clone()), timing());
        assert!(matches!(&s.start()[..], [Output::Send(AgentMsg::Hello(_))]));
        let t0 = Instant::now();
        assert_eq!(
            s.handle(t0, UnixMillis(0), welcome(1000)),
            vec![Output::Send(AgentMsg::Enrol(req))]
        );
        assert_eq!(s.poll_timeout(), None, "no heartbeats while enrolling");
        let enrolled = Enrolled {
            node_id: shoal_proto::NodeId("n".into()),
            cert_der: vec![],
            ca_der: vec![],
            not_after: UnixMillis(9),
        };
        assert_eq!(
            s.handle(t0, UnixMillis(0), ControllerMsg::Enrolled(enrolled.clone())),
            vec![Output::End(End::Enrolled(enrolled))]
        );
    }

    #[test]
    fn node_session_reports_at_the_controllers_interval_and_renews_at_two_thirds() {
        let t0 = Instant::now();
        let hour = UnixMillis(3_600_000);
        let mut s = AgentSession::new(
            hello(),
            Mode::Node {
                cert_not_after: hour,
            },
            timing(),
        );
        s.start();
        let out = s.handle(t0, UnixMillis(0), welcome(1000));
        assert_eq!(
            out,
            vec![Output::SendInventory { force: true }, Output::SendHealth]
        );
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(
            s.handle_timeout(t0 + Duration::from_secs(1)),
            vec![Output::SendHealth]
        );
        let renew_at = t0 + Duration::from_secs(2400);
        let out = s.handle_timeout(renew_at);
        assert!(out.contains(&Output::Renew), "{out:?}");
        assert!(
            !s.handle_timeout(renew_at + Duration::from_secs(1))
                .contains(&Output::Renew),
            "one renewal at a time"
        );
        let renewed = Renewed {
            cert_der: vec![1],
            not_after: UnixMillis(2_400_000 + 3_600_000),
        };
        assert_eq!(
            s.handle(
                renew_at,
                UnixMillis(2_400_000),
                ControllerMsg::Renewed(renewed.clone())
            ),
            vec![Output::StoreRenewed(renewed)]
        );
    }

    #[test]
    fn a_rotation_request_is_taken_once_and_its_certificate_ends_the_session_after_a_pending_renewal(
    ) {
        let t0 = Instant::now();
        let hour = UnixMillis(3_600_000);
        let mut s = AgentSession::new(
            hello(),
            Mode::Node {
                cert_not_after: hour,
            },
            timing(),
        );
        s.start();
        let mut w = welcome(1000);
        if let ControllerMsg::Welcome(w) = &mut w {
            w.protocol = 5;
        }
        s.handle(t0, UnixMillis(0), w);
        let renew_at = t0 + Duration::from_secs(2400);
        assert!(s.handle_timeout(renew_at).contains(&Output::Renew));
        let ask = || ControllerMsg::RotateKey {
            reason: "revoked".into(),
        };
        assert_eq!(
            s.handle(renew_at, UnixMillis(2_400_000), ask()),
            vec![Output::Rotate {
                reason: "revoked".into()
            }]
        );
        assert_eq!(
            s.handle(renew_at, UnixMillis(2_400_000), ask()),
            vec![],
            "a repeated request while rotating is ignored"
        );
        // The renewal asked for first is answered first; then the rotation's certificate ends the
        // session.
        let renewed = Renewed {
            cert_der: vec![1],
            not_after: UnixMillis(9_000_000),
        };
        assert_eq!(
            s.handle(
                renew_at,
                UnixMillis(2_400_000),
                ControllerMsg::Renewed(renewed.clone())
            ),
            vec![Output::StoreRenewed(renewed)]
        );
        let rotated = Renewed {
            cert_der: vec![2],
            not_after: UnixMillis(9_000_000),
        };
        assert_eq!(
            s.handle(
                renew_at,
                UnixMillis(2_400_000),
                ControllerMsg::Renewed(rotated.clone())
            ),
            vec![Output::StoreRotated(rotated), Output::End(End::Rotated)]
        );
    }

    #[test]
    fn a_v4_session_treats_a_rotation_request_as_a_protocol_error() {
        let mut s = AgentSession::new(
            hello(),
            Mode::Node {
                cert_not_after: UnixMillis(3_600_000),
            },
            timing(),
        );
        s.start();
        s.handle(Instant::now(), UnixMillis(0), welcome(1000));
        let out = s.handle(
            Instant::now(),
            UnixMillis(0),
            ControllerMsg::RotateKey { reason: "r".into() },
        );
        assert!(
            matches!(&out[..], [Output::End(End::Protocol(_))]),
            "{out:?}"
        );
    }

    #[test]
    fn reject_and_revocation_end_the_session() {
        let mut s = AgentSession::new(
            hello(),
            Mode::Node {
                cert_not_after: UnixMillis(1),
            },
            timing(),
        );
        let r = Reject {
            code: RejectCode::NodeRevoked,
            message: "gone".into(),
        };
        assert_eq!(
            s.handle(
                Instant::now(),
                UnixMillis(0),
                ControllerMsg::Reject(r.clone())
            ),
            vec![Output::End(End::Rejected(r))]
        );
        assert!(s
            .handle(Instant::now(), UnixMillis(0), welcome(1))
            .is_empty());
        let mut s = AgentSession::new(
            hello(),
            Mode::Node {
                cert_not_after: UnixMillis(1),
            },
            timing(),
        );
        s.handle(Instant::now(), UnixMillis(0), welcome(1));
        let out = s.handle(
            Instant::now(),
            UnixMillis(0),
            ControllerMsg::Revoked {
                reason: "removed".into(),
            },
        );
        assert_eq!(out, vec![Output::End(End::Revoked("removed".into()))]);
    }

    #[test]
    fn protocol_4_reports_updates_and_passes_offers_on_but_protocol_3_does_not() {
        let offer = ControllerMsg::UpdateAgent {
            version: "0.2.0".into(),
            release: shoal_proto::SignedRelease {
                manifest: vec![],
                signature: vec![],
                key_id: String::new(),
            },
        };
        let t0 = Instant::now();
        let mut s = AgentSession::new(
            hello(),
            Mode::Node {
                cert_not_after: UnixMillis(3_600_000),
            },
            timing(),
        );
        let mut w = welcome(10_000);
        if let ControllerMsg::Welcome(w) = &mut w {
            w.protocol = 4;
        }
        let out = s.handle(t0, UnixMillis(0), w);
        assert_eq!(out.last(), Some(&Output::SendUpdateReport), "{out:?}");
        assert_eq!(
            s.handle(t0, UnixMillis(0), offer.clone()),
            vec![Output::UpdateOffer(shoal_proto::UpdateOffer {
                version: "0.2.0".into(),
                release: shoal_proto::SignedRelease {
                    manifest: vec![],
                    signature: vec![],
                    key_id: String::new(),
                },
                allow_downgrade: false,
            })]
        );
        let reboot = ControllerMsg::Reboot {
            reason: "image".into(),
            prefer_kexec: true,
        };
        assert_eq!(
            s.handle(t0, UnixMillis(0), reboot),
            vec![Output::Reboot {
                reason: "image".into(),
                prefer_kexec: true,
            }]
        );
        let step = shoal_proto::MaintenanceStep {
            run: "r1".into(),
            action: shoal_proto::MaintenanceAction::SmartTest,
            step: shoal_proto::StepKind::Cordon,
        };
        assert_eq!(
            s.handle(t0, UnixMillis(0), ControllerMsg::Maintenance(step.clone())),
            vec![Output::MaintenanceStep(step)]
        );
        let mut s = AgentSession::new(
            hello(),
            Mode::Node {
                cert_not_after: UnixMillis(3_600_000),
            },
            timing(),
        );
        let mut w = welcome(10_000);
        if let ControllerMsg::Welcome(w) = &mut w {
            w.protocol = 3;
        }
        assert!(!s
            .handle(t0, UnixMillis(0), w)
            .contains(&Output::SendUpdateReport));
        assert!(matches!(
            &s.handle(t0, UnixMillis(0), offer)[..],
            [Output::End(End::Protocol(_))]
        ));
    }

    #[test]
    fn unexpected_messages_are_protocol_errors() {
        let mut s = AgentSession::new(
            hello(),
            Mode::Node {
                cert_not_after: UnixMillis(1),
            },
            timing(),
        );
        let renewed = Renewed {
            cert_der: vec![],
            not_after: UnixMillis(0),
        };
        assert!(matches!(
            &s.handle(
                Instant::now(),
                UnixMillis(0),
                ControllerMsg::Renewed(renewed)
            )[..],
            [Output::End(End::Protocol(_))]
        ));
    }
}
