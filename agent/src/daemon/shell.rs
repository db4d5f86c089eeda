//! One control connection: connect (enrolling when there is no valid certificate), run the
//! [`AgentSession`] on it, and dispatch its [`Output`]s and the [`ShellEvent`]s that arrive from
//! outside the stream to the module that carries each out.

use std::{
    net::SocketAddr,
    time::{Instant, SystemTime},
};

use shoal_overlay::{node::NodeEvent, pki, recv_msg, send_msg, tls};
use shoal_proto::{
    AgentMsg, ControllerMsg, EnrolRequest, Hello, JoinToken, MaintenanceStep, StepOutcome,
    UnixMillis, UpdateFailure,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    backup::BackupState, credentials::key_der, drives::DrivesState, maintenance::MaintState,
    overlay::OverlayState, reports::Reports, update::Updates, AgentConfig, AgentError,
};
use crate::{
    controllers::ControllerBook,
    drives::DriveEvent,
    overlay as ov,
    reboot::{NamedImage, RebootMethod},
    session::{AgentSession, End, Mode, Output, Timing},
    state::{Credentials, StateDir},
};

/// Wall-clock now, for reports and certificate lifetimes.
pub(crate) fn now_ms() -> UnixMillis {
    UnixMillis(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

/// Why one connection attempt ended without a session outcome.
#[derive(Debug, thiserror::Error)]
pub(super) enum AttemptError {
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Transport(#[from] shoal_overlay::TransportError),
    #[error("the controller closed the control stream")]
    StreamClosed,
    /// While enrolling: this controller's CA is not the one the token pins (another one may be).
    #[error("not the controller that issued this join token: {0}")]
    WrongController(String),
    #[error(transparent)]
    Fatal(#[from] AgentError),
}

/// How an attempt ended, and whether its session got as far as running (which resets the
/// reconnect backoff).
pub(super) type Attempt = Result<(End, bool), (AttemptError, bool)>;

/// Things that happen outside the control stream but need it.
#[derive(Debug)]
pub(super) enum ShellEvent {
    /// The overlay wants a peer to punch towards us.
    Node(NodeEvent),
    /// The NAT probe finished.
    Probed {
        main: SocketAddr,
        result: Result<SocketAddr, String>,
    },
    /// The drive manager reports.
    Drives(DriveEvent),
    /// A release download and install ended.
    Update {
        /// The version.
        version: String,
        /// Installed (re-execute now), or why not.
        result: Result<(), UpdateFailure>,
    },
    /// An acknowledged reboot did not happen.
    RebootFailed(String),
    /// A maintenance step's work ended.
    Maintenance {
        /// The step.
        step: MaintenanceStep,
        /// How.
        outcome: StepOutcome,
    },
    /// A backup task reports progress.
    BackupProgress(shoal_proto::BackupProgress),
    /// A backup task ended.
    BackupDone(Box<shoal_proto::BackupResult>),
    /// A reboot request is prepared (a kexec image loaded, or not): acknowledge it, then reboot.
    RebootReady {
        /// How.
        method: RebootMethod,
        /// The acknowledgement's text.
        ack: String,
    },
}

/// What the agent keeps across connections, and what the current connection negotiated.
pub(super) struct Shell<'a> {
    pub(super) config: &'a AgentConfig,
    pub(super) state: &'a StateDir,
    /// Where tasks report [`ShellEvent`]s.
    pub(super) events: mpsc::UnboundedSender<ShellEvent>,
    /// The negotiated protocol of the current session (0 before Welcome): what it can decode.
    pub(super) protocol: u16,
    /// Whether the current session speaks protocol 4 (update messages).
    pub(super) updates: bool,
    /// The current control connection (release downloads open a stream on it).
    pub(super) conn: Option<quinn::Connection>,
    /// Health, inventory and boot reports.
    pub(super) reports: Reports,
    /// The overlay; it outlives control connections.
    pub(super) overlay: OverlayState,
    /// The drive manager.
    pub(super) drives: DrivesState,
    /// Maintenance steps: what was done, what runs.
    pub(super) maint: MaintState,
    /// Self-updates.
    pub(super) update: Updates,
    /// Backup tasks and their kept results.
    pub(super) backups: BackupState,
    /// The image the controller named for kexec at the next reboot, as the agent judged it
    /// ([`crate::reboot::check_image`]); taken by that reboot.
    pub(super) kexec: Option<NamedImage>,
    /// The known controllers and which to dial next.
    pub(super) controllers: ControllerBook,
    /// The controller of the current (or last) connection.
    pub(super) current: SocketAddr,
}

impl Shell<'_> {
    /// One connection to `controller`: enrol if there is no valid certificate, else run as the
    /// node.
    pub(super) async fn attempt(
        &mut self,
        controller: SocketAddr,
        endpoint: &quinn::Endpoint,
        hello: &Hello,
        token: Option<&JoinToken>,
        events: &mut mpsc::UnboundedReceiver<ShellEvent>,
    ) -> Attempt {
        let fatal = |e: AgentError| (AttemptError::Fatal(e), false);
        self.current = controller;
        let keep_alive = self.config.control_keep_alive;
        let creds = self.state.load().map_err(|e| fatal(e.into()))?;
        // A certificate that expires within a minute is as good as none.
        let creds = creds.filter(|c| c.not_after.0 > now_ms().0 + 60_000);
        let (client_config, mode, key_pem) = match &creds {
            Some(c) => {
                let key = key_der(&c.key_pem).map_err(fatal)?;
                let cfg = tls::node_client_config(&c.ca_der, &c.cert_der, key, keep_alive)
                    .map_err(|e| fatal(AgentError::Tls(e.to_string())))?;
                (
                    cfg,
                    Mode::Node {
                        cert_not_after: c.not_after,
                    },
                    c.key_pem.clone(),
                )
            }
            None => {
                let token = token
                    .ok_or_else(|| fatal(AgentError::NoToken(self.config.state_dir.clone())))?;
                // The same key for every attempt until one succeeds: a lost `Enrolled` is answered
                // again for the same key without spending the token, and an operator's approval is
                // for this key.
                let key_pem = self.state.enrolment_key().map_err(|e| fatal(e.into()))?;
                let key = rcgen::KeyPair::from_pem(&key_pem)
                    .map_err(|e| fatal(AgentError::Tls(e.to_string())))?;
                let csr_der =
                    pki::make_csr(&key).map_err(|e| fatal(AgentError::Tls(e.to_string())))?;
                let cfg = tls::enrol_client_config(token.ca_sha256, keep_alive)
                    .map_err(|e| fatal(AgentError::Tls(e.to_string())))?;
                let hostname = nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default();
                info!(token = %token.id, "enrolling");
                (
                    cfg,
                    Mode::Enrol(EnrolRequest {
                        token: token.to_string(),
                        csr_der,
                        hostname,
                    }),
                    key.serialize_pem(),
                )
            }
        };
        let enrolling = matches!(mode, Mode::Enrol(_));
        // A short idle timeout: a controller that died without a close frame is given up within it.
        let mut client_config = client_config;
        client_config.transport_config(std::sync::Arc::new(tls::control_transport_with_idle(
            Some(keep_alive),
            self.config.control_idle_timeout,
        )));
        let only_controller = self.controllers.candidates().len() == 1;
        let conn = endpoint
            .connect_with(client_config, controller, tls::controller_server_name())
            .map_err(|e| (e.into(), false))?
            .await
            .map_err(|e| match e {
                // While enrolling, a failed certificate check means the token's CA hash does not
                // match this controller: a wrong token or a wrong address, which retrying cannot
                // fix when it is the only controller the agent knows.
                quinn::ConnectionError::TransportError(t)
                    if enrolling && (0x100..0x200).contains(&u64::from(t.code)) =>
                {
                    if only_controller {
                        fatal(AgentError::WrongController(t.reason))
                    } else {
                        (AttemptError::WrongController(t.reason), false)
                    }
                }
                other => (other.into(), false),
            })?;
        self.overlay
            .endpoint
            .control
            .send_replace(Some(conn.clone()));
        let relay_in = tokio::spawn(ov::relay_in(
            conn.clone(),
            self.overlay.endpoint.injector.clone(),
        ));
        let result = self
            .drive(&conn, hello, mode, &key_pem, creds.as_ref(), events)
            .await;
        relay_in.abort();
        self.overlay.endpoint.control.send_replace(None);
        conn.close(0u32.into(), b"");
        result
    }

    /// Runs the session on `conn` until it ends or the connection fails.
    async fn drive(
        &mut self,
        conn: &quinn::Connection,
        hello: &Hello,
        mode: Mode,
        key_pem: &str,
        creds: Option<&Credentials>,
        events: &mut mpsc::UnboundedReceiver<ShellEvent>,
    ) -> Attempt {
        self.conn = Some(conn.clone());
        self.protocol = 0;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| (e.into(), false))?;
        // Reading happens in its own task: a frame read is not cancel-safe, and the loop below
        // wakes for timers.
        let (tx, mut rx) = mpsc::channel::<Result<ControllerMsg, AttemptError>>(8);
        let reader = tokio::spawn(async move {
            let mut recv = recv;
            loop {
                let item = match recv_msg::<ControllerMsg>(&mut recv).await {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => Err(AttemptError::StreamClosed),
                    Err(e) => Err(e.into()),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
        });
        let mut session = AgentSession::new(
            hello.clone(),
            mode,
            Timing {
                health_interval: self.config.health_interval,
                inventory_interval: self.config.inventory_interval,
                paths_interval: self.config.paths_interval,
            },
        );
        let mut outputs = session.start();
        self.reports.boot.new_session();
        let result = loop {
            self.updates = session.speaks_updates();
            let protocol = session.welcome().map_or(0, |w| w.protocol);
            if protocol != 0 && self.protocol == 0 {
                self.session_up(protocol);
            }
            self.protocol = protocol;
            match self.perform(&mut send, outputs, key_pem, creds).await {
                Ok(Some(end)) => break Ok(end),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            let deadline = session.poll_timeout().map(tokio::time::Instant::from_std);
            outputs = tokio::select! {
                item = rx.recv() => match item {
                    Some(Ok(msg)) => session.handle(Instant::now(), now_ms(), msg),
                    Some(Err(e)) => break Err(e),
                    None => break Err(AttemptError::StreamClosed),
                },
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    session.handle_timeout(Instant::now())
                }
                Some(event) = events.recv() => match self.shell_event(event, session.is_ready(), session.speaks_drives()) {
                    Some(msg) => vec![Output::Send(msg)],
                    None => vec![],
                },
            };
        };
        reader.abort();
        let ready = session.is_ready();
        match result {
            Ok(end) => Ok((end, ready)),
            Err(e) => Err((e, ready)),
        }
    }

    /// Carries out session outputs; returns the end of the session if one was reached.
    async fn perform(
        &mut self,
        send: &mut quinn::SendStream,
        outputs: Vec<Output>,
        key_pem: &str,
        creds: Option<&Credentials>,
    ) -> Result<Option<End>, AttemptError> {
        for output in outputs {
            let reply = match output {
                Output::Send(msg) => Some(msg),
                Output::SendHealth => {
                    self.send_health(send).await?;
                    None
                }
                Output::SendInventory { force } => {
                    self.send_inventory(send, force).await?;
                    None
                }
                Output::Renew => {
                    self.renew(send, key_pem).await?;
                    None
                }
                Output::StoreRenewed(r) => {
                    self.store_renewed(r, creds)?;
                    None
                }
                Output::Rotate { reason } => {
                    self.rotate(send, reason, key_pem, creds).await?;
                    None
                }
                Output::StoreRotated(r) => {
                    self.store_rotated(r, creds)?;
                    None
                }
                Output::StartOverlay => {
                    self.start_overlay(send, creds).await?;
                    None
                }
                Output::Observed(o) => self.observed(o, creds),
                Output::Netmap(map) => {
                    self.netmap(map);
                    None
                }
                Output::NetmapDelta(delta) => self.netmap_delta(delta),
                Output::Punch(p) => {
                    self.punch(p);
                    None
                }
                Output::SendPaths => {
                    self.send_paths(send).await?;
                    None
                }
                Output::SendDrives => self.drive_report(),
                Output::DrivePolicy(policy) => {
                    self.drive_policy(policy);
                    None
                }
                Output::DriveCommand(command) => self.drive_command(command),
                Output::SendUpdateReport => {
                    self.send_update_report(send).await?;
                    None
                }
                Output::UpdateOffer(offer) => self.update_offer(offer),
                Output::RevertAgent { reason } => {
                    self.revert_agent(reason);
                    None
                }
                Output::Reboot {
                    reason,
                    prefer_kexec,
                } => {
                    self.reboot(send, reason, prefer_kexec).await?;
                    None
                }
                Output::MaintenanceStep(step) => self.maintenance_step(step),
                Output::BackupTask(task) => self.backup_task(task),
                Output::BackupAck { task } => {
                    self.backups.book().acknowledged(&task);
                    None
                }
                Output::SendBackupResults => {
                    self.send_backup_results(send).await?;
                    None
                }
                Output::KexecImage(image) => {
                    self.unsigned_image(image);
                    None
                }
                Output::SignedKexecImage(image) => {
                    self.signed_image(image, creds);
                    None
                }
                Output::ControllerSet(set) => {
                    self.controller_set(set);
                    None
                }
                Output::StartWireGuard => self.config.wireguard_gateway.map(|listen| {
                    AgentMsg::WireGuardGateway(shoal_proto::WireGuardGatewayHello { listen })
                }),
                Output::WireGuard(map) => {
                    self.wireguard_map(map);
                    None
                }
                Output::End(End::Enrolled(e)) => {
                    self.store_enrolled(&e, key_pem)?;
                    return Ok(Some(End::Enrolled(e)));
                }
                Output::End(end) => return Ok(Some(end)),
            };
            if let Some(msg) = reply {
                send_msg(send, &msg).await?;
            }
        }
        Ok(None)
    }

    /// The Welcome arrived: this controller works, and leads the next round.
    fn session_up(&mut self, protocol: u16) {
        let controller = self.current;
        let id = self.controllers.id_of(controller).unwrap_or("-");
        info!(controller = %controller, controller_id = id, protocol, "session up");
        if self.controllers.up(controller) {
            self.keep_controllers();
        }
    }

    /// (v7) The controller announced the fleet's controllers: keep them for failover.
    fn controller_set(&mut self, set: shoal_proto::ControllerSet) {
        let announced: Vec<String> = set.controllers.iter().map(|c| c.addr.to_string()).collect();
        match self.controllers.announced(set) {
            Ok(true) => {
                info!(controller = %self.current, announced = ?announced, "controller set changed");
                self.keep_controllers();
            }
            Ok(false) => {}
            Err(e) => warn!(controller = %self.current, cause = %e, "controller set ignored"),
        }
    }

    fn keep_controllers(&self) {
        if let Err(e) = self.state.save_controllers(&self.controllers.kept()) {
            warn!(cause = %e, "could not keep the controller set; it is kept in memory only");
        }
    }

    /// Turns an event from outside the control stream into a message for the controller, if any.
    fn shell_event(&mut self, event: ShellEvent, ready: bool, drives: bool) -> Option<AgentMsg> {
        match event {
            ShellEvent::Node(event) => self.node_event(event, ready),
            ShellEvent::Probed { main, result } => self.probed(main, result, ready),
            ShellEvent::Drives(event) => self.drive_event(event, ready, drives),
            ShellEvent::Update { version, result } => self.update_ended(version, result, ready),
            ShellEvent::RebootFailed(reason) => self.reboot_failed(reason, ready),
            ShellEvent::Maintenance { step, outcome } => {
                self.maintenance_done(step, outcome, ready)
            }
            ShellEvent::RebootReady { method, ack } => self.reboot_ready(method, ack, ready),
            ShellEvent::BackupProgress(p) => self.backup_progress(p, ready),
            ShellEvent::BackupDone(result) => self.backup_done(*result, ready),
        }
    }
}
