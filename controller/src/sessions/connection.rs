//! One agent connection, from the QUIC handshake to its close: the connection limits, the
//! certificate check before registration, the sans-IO [`Session`] driven by the connection's frames,
//! and the dispatch of each session action to the domain that handles it.

use crate::connections::{
    bump, close_code, forget_connection, ConnCtx, ConnHandle, PerAddressSlot, Revoke,
};
use crate::server::{now_ms, Controller};
use crate::{backups, drives, maintenance, overlay, registry, releases};
use std::{sync::Arc, time::Duration};

use shoal_overlay::{pki, send_msg, tls, FrameReader};
use shoal_proto::{AgentMsg, ControllerMsg, RejectCode, UnixMillis, CLUSTER_PROTOCOL, SUPPORTED};
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

use shoal_controller_core::enrolment::CertVerdict;
use shoal_controller_core::session::{Action, CloseKind, Session, SessionConfig};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("handshake: {0}")]
    Connect(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Transport(#[from] shoal_overlay::TransportError),
    #[error("no control stream within the hello timeout")]
    HelloTimeout,
    #[error("enrolment did not finish within its deadline")]
    EnrolmentTimeout,
    #[error("the agent did not read what it was sent")]
    SlowConsumer,
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

pub(crate) async fn handle_connection(
    controller: Arc<Controller>,
    incoming: quinn::Incoming,
    handshake: tokio::sync::OwnedSemaphorePermit,
    unauthenticated: Arc<tokio::sync::Semaphore>,
) -> Result<(), ConnError> {
    let conn = incoming.await?;
    drop(handshake);
    if tls::negotiated_alpn(&conn).as_deref() == Some(tls::MESH_ALPN) {
        if controller.cluster.is_clustered() {
            crate::cluster::mesh::serve(controller, conn).await;
        } else {
            conn.close(close_code::PROTOCOL.into(), b"not part of a cluster");
        }
        return Ok(());
    }
    let remote = conn.remote_address().to_string();
    let cert =
        match tls::peer_chain(&conn).and_then(|chain| chain.first().map(|c| pki::cert_info(c))) {
            None => None,
            Some(Ok(info)) => Some(info),
            Some(Err(e)) => {
                conn.close(
                    close_code::REVOKED.into(),
                    format!("unusable certificate: {e}").as_bytes(),
                );
                return Ok(());
            }
        };
    let node = cert.as_ref().map(|c| c.node_id.clone());
    // Enrolments are counted and bounded in time; a node that proved its key is not.
    let _unauthenticated = match &cert {
        Some(_) => None,
        None => {
            let ip = conn.remote_address().ip();
            let slot = unauthenticated.try_acquire_owned().ok().and_then(|permit| {
                PerAddressSlot::take(
                    &controller,
                    ip,
                    controller.config.max_unauthenticated_per_address,
                )
                .map(|slot| (permit, slot))
            });
            if slot.is_none() {
                debug!(%remote, "too many unauthenticated connections (overall or from this address): closed at once");
                bump(&controller.conn_stats.unauthenticated_refused);
                conn.close(
                    close_code::BUSY.into(),
                    b"too many enrolments in progress; retry later",
                );
                return Ok(());
            }
            slot
        }
    };
    let enrolment_deadline = tokio::time::Instant::now() + controller.config.enrolment_deadline;
    // One deadline for the stream and the Hello on it together.
    let hello_deadline = tokio::time::Instant::now() + controller.config.hello_timeout;
    let (mut send, recv) = match tokio::time::timeout_at(hello_deadline, conn.accept_bi()).await {
        Ok(r) => r?,
        Err(_) => {
            conn.close(close_code::PROTOCOL.into(), b"no control stream");
            return Err(ConnError::HelloTimeout);
        }
    };
    // Read with a FrameReader: the connection loop select!s over the read and other wake-ups, and a
    // plain recv_msg would lose the part of a frame it had read when another branch won.
    let mut recv = FrameReader::new(recv);
    let mut session = Session::new(
        SessionConfig {
            supported: SUPPORTED,
            heartbeat_interval_ms: controller.config.heartbeat_interval.as_millis() as u64,
        },
        node.clone(),
    );

    let (revoke_tx, mut revoke_rx) = mpsc::unbounded_channel();
    let (overlay_tx, mut overlay_rx) =
        crate::connections::queue::node_queue(controller.config.node_queue_capacity);
    let mut conn_id = None;
    let mut must_rotate = false;
    if let Some(info) = &cert {
        let id = &info.node_id;
        // The certificate chains to the fleet CA and TLS proved its key; it must also be the key
        // the node is bound to, with a serial nobody revoked. Checked before the connection is
        // registered: a connection never displaces the node's live one before it has proven the
        // node's key.
        let c = controller.clone();
        let (node_id, key, serial, remote_text) = (
            id.clone(),
            info.key_sha256,
            info.serial.clone(),
            remote.clone(),
        );
        let not_after = UnixMillis((info.not_after_unix.max(0) as u64).saturating_mul(1000));
        let verdict = tokio::task::spawn_blocking(move || {
            c.store
                .check_connection(&node_id, &key, &serial, not_after, now_ms(), &remote_text)
        })
        .await
        .map_err(|e| ConnError::Store(crate::store::StoreError::Db(e.to_string())))??;
        let refusal = match verdict {
            CertVerdict::Accept { identity, .. } => {
                must_rotate = identity.must_rotate;
                None
            }
            CertVerdict::Removed => Some((RejectCode::NodeRevoked, format!("node {id} was removed from the fleet"))),
            CertVerdict::Revoked => Some((
                RejectCode::CertificateRefused,
                format!("certificate {} of node {id} was revoked by an operator", info.serial),
            )),
            CertVerdict::WrongKey => Some((
                RejectCode::CertificateRefused,
                format!("this certificate's key is not the key node {id} is bound to (re-enrolled elsewhere, or a copied certificate)"),
            )),
        };
        if let Some((code, message)) = refusal {
            info!(node = %id, %remote, ?code, %message, "refused a node certificate");
            refuse_after_hello(
                &conn,
                &mut send,
                &mut recv,
                &mut session,
                hello_deadline,
                code,
                message,
            )
            .await;
            return Ok(());
        }
        let cid = {
            let mut live = controller.live();
            live.next_conn_id += 1;
            let cid = live.next_conn_id;
            let handle = ConnHandle {
                conn_id: cid,
                revoke: revoke_tx,
                tx: overlay_tx.clone(),
                serial: crate::registry::identity_store::normal_serial(&info.serial),
                leaving: false,
                protocol: None,
                drive_policy: None,
                boot: None,
            };
            if let Some(old) = live.conns.insert(id.clone(), handle) {
                debug!(node = %id, old = old.conn_id, "replacing older connection");
                let _ = old.revoke.send(Revoke::Replaced);
            }
            cid
        };
        conn_id = Some(cid);
        // A removal that landed between the check and the registration did not find this connection
        // to revoke: look once more now that it is registered.
        let c = controller.clone();
        let lookup = id.clone();
        let exists = tokio::task::spawn_blocking(move || c.store.node(&lookup))
            .await
            .ok()
            .transpose()?
            .flatten()
            .is_some();
        if !exists {
            forget_connection(&controller, id, cid);
            let message = format!("node {id} was removed from the fleet");
            refuse_after_hello(
                &conn,
                &mut send,
                &mut recv,
                &mut session,
                hello_deadline,
                RejectCode::NodeRevoked,
                message,
            )
            .await;
            info!(node = %id, "refused a removed node");
            return Ok(());
        }
    }

    let mut ctx = ConnCtx {
        conn: conn.clone(),
        conn_id: conn_id.unwrap_or(0),
        node_key: cert.as_ref().map(|c| c.key_sha256),
        cert_der: tls::peer_chain(&conn).and_then(|chain| chain.first().map(|c| c.to_vec())),
        must_rotate,
        remote,
        overlay_tx,
        relay: None,
    };
    let driven = drive(
        &controller,
        &mut ctx,
        &mut send,
        &mut recv,
        &mut session,
        &mut revoke_rx,
        &mut overlay_rx,
        hello_deadline,
    );
    let result = if cert.is_some() {
        driven.await
    } else {
        match tokio::time::timeout_at(enrolment_deadline, driven).await {
            Ok(r) => r,
            Err(_) => {
                bump(&controller.conn_stats.enrolment_timeouts);
                conn.close(close_code::PROTOCOL.into(), b"enrolment took too long");
                Err(ConnError::EnrolmentTimeout)
            }
        }
    };
    if let Some(relay) = ctx.relay.take() {
        relay.abort();
    }
    if matches!(result, Err(ConnError::SlowConsumer)) {
        bump(&controller.conn_stats.slow_consumers);
    }
    if let (Some(id), Some(cid)) = (&node, conn_id) {
        controller.overlay.disconnected(id, cid);
        forget_connection(&controller, id, cid);
        controller.wireguard_disconnected(id, cid);
        // After forgetting it: a command sent from now on finds no connection and fails at once.
        controller.drives.connection_closed(id, cid);
    }
    result
}

/// Refuses a connection with `code` once its Hello has said which protocol it speaks, so the agent
/// gets a code it knows (older agents get the nearest older code); without a Hello in time, just
/// closes.
pub(crate) async fn refuse_after_hello(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut FrameReader,
    session: &mut Session,
    hello_deadline: tokio::time::Instant,
    code: RejectCode,
    message: String,
) {
    let protocol = match tokio::time::timeout_at(hello_deadline, recv.recv::<AgentMsg>()).await {
        Ok(Ok(Some(AgentMsg::Hello(hello)))) => {
            shoal_proto::negotiate(SUPPORTED, hello.protocol).unwrap_or(hello.protocol.max)
        }
        _ => {
            conn.close(close_code::PROTOCOL.into(), message.as_bytes());
            return;
        }
    };
    for action in session.refused(code.for_protocol(protocol), message) {
        if !matches!(
            apply(
                conn,
                send,
                action,
                REFUSAL_SEND_TIMEOUT,
                &tokio::sync::Notify::new()
            )
            .await,
            Ok(false)
        ) {
            break;
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn drive(
    controller: &Arc<Controller>,
    ctx: &mut ConnCtx,
    send: &mut quinn::SendStream,
    recv: &mut FrameReader,
    session: &mut Session,
    revoke_rx: &mut mpsc::UnboundedReceiver<Revoke>,
    overlay_rx: &mut crate::connections::queue::NodeRx,
    hello_deadline: tokio::time::Instant,
) -> Result<(), ConnError> {
    let conn = ctx.conn.clone();
    let conn = &conn;
    let hello_deadline = tokio::time::sleep_until(hello_deadline);
    tokio::pin!(hello_deadline);
    let overflow = overlay_rx.overflow_signal();
    // (v7) The controller set, sent once the session is up and again on every change.
    let mut endpoints = controller.cluster.agent_endpoints();
    let mut announcing = false;
    loop {
        let actions = tokio::select! {
            msg = recv.recv::<AgentMsg>() => match msg {
                Ok(Some(msg)) => session.handle(now_ms(), msg),
                Ok(None) => return Ok(()),
                Err(shoal_overlay::TransportError::Read(_)) => return Ok(()),
                Err(e) => {
                    warn!(node = ?session.node(), cause = %e, "closing connection after a bad frame");
                    conn.close(close_code::PROTOCOL.into(), e.to_string().as_bytes());
                    return Err(e.into());
                }
            },
            reason = revoke_rx.recv() => match reason {
                Some(Revoke::Replaced) => {
                    conn.close(close_code::REPLACED.into(), b"replaced by a newer connection");
                    return Ok(());
                }
                Some(Revoke::Removed(r)) => session.revoked(&r),
                Some(Revoke::CertificateRefused(r)) => {
                    let code = RejectCode::CertificateRefused.for_protocol(session.version().unwrap_or(1));
                    session.refused(code, r)
                }
                None => return Ok(()),
            },
            _ = &mut hello_deadline, if session.version().is_none() => {
                conn.close(close_code::PROTOCOL.into(), b"no Hello");
                return Err(ConnError::HelloTimeout);
            }
            Some(msg) = overlay_rx.recv() => vec![Action::Send(msg)],
            _ = overflow.notified() => {
                warn!(node = ?session.node(), "closing a connection whose agent does not read what it is sent (queue full)");
                conn.close(close_code::BUSY.into(), b"too many messages queued: the agent does not read");
                return Err(ConnError::SlowConsumer);
            }
            // (v4) Release downloads come on further streams of an authenticated connection.
            stream = conn.accept_bi(), if session.version() >= Some(crate::releases::updates::UPDATE_PROTOCOL) && session.node().is_some() => {
                let Ok((s, r)) = stream else { return Ok(()) };
                if let Some(node) = session.node().cloned() {
                    tokio::spawn(crate::releases::updates::serve_fetch(controller.clone(), node, s, r).in_current_span());
                }
                vec![]
            }
            changed = endpoints.changed(), if announcing => match changed {
                Ok(()) => announcement(&mut endpoints),
                // The cluster is gone with the controller: nothing more to announce.
                Err(_) => {
                    announcing = false;
                    vec![]
                }
            },
        };
        for action in actions {
            let connected = matches!(action, Action::Connected { .. });
            let mut follow_up = perform(controller, ctx, session, action).await;
            if connected
                && session.node().is_some()
                && session.version() >= Some(CLUSTER_PROTOCOL)
                && !session.is_closed()
            {
                announcing = true;
                follow_up.extend(announcement(&mut endpoints));
            }
            for a in follow_up {
                if apply(conn, send, a, controller.config.send_timeout, &overflow).await? {
                    return Ok(());
                }
            }
        }
    }
}

/// The current controller set as a message, if there is one to announce; marks it seen.
fn announcement(
    endpoints: &mut tokio::sync::watch::Receiver<Vec<crate::cluster::AgentEndpoint>>,
) -> Vec<Action> {
    let set = super::announce::controller_set(&endpoints.borrow_and_update());
    set.map(|s| Action::Send(ControllerMsg::ControllerSet(s)))
        .into_iter()
        .collect()
}

/// A refusal is the last thing a connection gets: it need not wait long for a reader.
pub(crate) const REFUSAL_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends or closes; returns whether the connection was closed. A write that does not finish within
/// `send_timeout`, or during which the connection's queue overflows, closes the connection.
pub(crate) async fn apply(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    action: Action,
    send_timeout: Duration,
    overflow: &tokio::sync::Notify,
) -> Result<bool, ConnError> {
    match action {
        Action::Send(msg) => {
            let stuck = tokio::select! {
                sent = tokio::time::timeout(send_timeout, send_msg(send, &msg)) => match sent {
                    Ok(sent) => {
                        sent?;
                        None
                    }
                    Err(_) => Some("a write did not finish in time"),
                },
                _ = overflow.notified() => Some("its queue filled while a write waited"),
            };
            if let Some(why) = stuck {
                warn!(%why, "closing a connection whose agent stopped reading");
                conn.close(close_code::BUSY.into(), b"the agent does not read");
                return Err(ConnError::SlowConsumer);
            }
            Ok(false)
        }
        Action::Close(kind, reason) => {
            let code = match kind {
                CloseKind::Done => close_code::DONE,
                CloseKind::Refused => close_code::PROTOCOL,
                CloseKind::Revoked => close_code::REVOKED,
            };
            let _ = send.finish();
            // Let the last message reach the agent before the close frame overtakes it.
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            conn.close(code.into(), reason.as_bytes());
            Ok(true)
        }
        other => {
            warn!(action = ?other, "unexpected action left for the transport");
            Ok(false)
        }
    }
}

/// Performs registry work for an action; returns transport actions (send/close).
pub(crate) async fn perform(
    controller: &Arc<Controller>,
    ctx: &mut ConnCtx,
    session: &mut Session,
    action: Action,
) -> Vec<Action> {
    match action {
        Action::Send(_) | Action::Close(..) => vec![action],
        Action::Enrol { request, hello } => {
            registry::messages::enrol(controller, ctx, session, request, hello).await
        }
        Action::Renew(req) => registry::messages::renew(controller, ctx, session, req).await,
        Action::RotateKey(req) => {
            registry::messages::rotate_key(controller, ctx, session, req).await
        }
        Action::Connected { hello } => {
            let out = registry::messages::connected(controller, ctx, session, hello).await;
            if let Some(node) = session.node().cloned() {
                let protocol = session.version();
                maintenance::messages::connected(controller, &node, protocol).await;
                drives::messages::connected(controller, &node, ctx.conn_id, protocol).await;
                backups::messages::connected(controller, &node, protocol).await;
                if protocol >= Some(shoal_proto::WIREGUARD_PROTOCOL) {
                    controller.wireguard_changed();
                }
            }
            out
        }
        Action::Inventory(inv) => registry::messages::inventory(controller, session, inv).await,
        Action::Health(h) => registry::messages::health(controller, session, h).await,
        Action::Overlay(hello) => overlay::messages::hello(controller, ctx, session, hello).await,
        Action::Paths(report) => overlay::messages::paths(controller, ctx, session, report).await,
        Action::Punch(p) => overlay::messages::punch(controller, session, p).await,
        Action::Drives(report) => drives::messages::report(controller, session, report).await,
        Action::DriveCommandResult(result) => {
            drives::messages::command_result(controller, session, result).await
        }
        Action::UpdateAck { version } => {
            releases::messages::update_ack(controller, session, version).await
        }
        Action::RebootAnswer(answer) => {
            maintenance::messages::reboot_answer(controller, ctx, session, answer).await
        }
        Action::MaintenanceResult(result) => {
            maintenance::messages::maintenance_result(controller, session, result).await
        }
        Action::UpdateReport(report) => {
            releases::messages::update_report(controller, session, report).await
        }
        Action::BootReport(report) => {
            maintenance::messages::boot_report(controller, ctx, session, report).await
        }
        Action::BackupProgress(p) => backups::messages::progress(controller, session, p),
        Action::BackupResult(r) => backups::messages::result(controller, session, r).await,
        Action::WireGuardGateway(listen) => {
            if let Some(node) = session.node() {
                controller.wireguard_gateway(node, ctx.conn_id, listen);
            }
            vec![]
        }
        Action::Datapath(d) => overlay::messages::datapath(controller, session, d),
    }
}
