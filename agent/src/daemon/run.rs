//! The daemon's loop: start-up (identity, the updater's start count, the UDP socket, the drive
//! manager, the overlay from its cached netmap), then one connection after another, with backoff,
//! until shutdown or a refusal that retrying cannot fix.

use std::{
    future::Future,
    net::SocketAddr,
    time::{Duration, Instant},
};

use shoal_proto::{Hello, JoinToken, RejectCode, SUPPORTED};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    drives::DrivesState,
    maintenance::MaintState,
    overlay::OverlayState,
    reports::Reports,
    shell::{now_ms, AttemptError, Shell},
    update::Updates,
    AgentConfig, AgentError,
};
use crate::{
    backoff::Backoff,
    controllers::{ControllerAddr, ControllerBook, Pace},
    inventory,
    maintenance::{self as maint, MaintenanceBook},
    overlay::{self as ov, NetmapCache},
    session::End,
    state::StateDir,
};

/// The longest wait between attempts while an enrolment waits for an operator.
const APPROVAL_RETRY: Duration = Duration::from_secs(5);

/// How long one DNS lookup of a controller's name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the agent until `shutdown` resolves or the controller refuses it for good.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    tokio::pin!(shutdown);
    if config.controllers.is_empty() {
        return Err(AgentError::NoController);
    }
    let names = config
        .controllers
        .iter()
        .any(|c| matches!(c, ControllerAddr::Name { .. }));
    let state = StateDir::open(&config.state_dir)?;
    let token: Option<JoinToken> = config.token.as_deref().map(str::parse).transpose()?;
    let roots = config.roots.clone();
    let first_inventory = tokio::task::spawn_blocking(move || inventory::collect_inventory(&roots))
        .await
        .map_err(|e| AgentError::Tls(e.to_string()))?;
    let hardware_id = inventory::hardware_id(
        config.machine_id.as_deref(),
        &config.roots,
        &first_inventory.nics,
    )
    .ok_or(AgentError::NoIdentity)?;
    info!(hardware_id = %hardware_id, controllers = ?config.controllers, "agent starting");
    let version = crate::version::agent_version();
    // Before anything else: a start after an update is counted (or rolled back) first.
    let update = Updates::boot(&config, &version);
    let hello = Hello {
        protocol: SUPPORTED,
        agent_version: version,
        hardware_id,
    };
    let allow_exec = config
        .maintenance
        .canonical_allow()
        .map_err(AgentError::Config)?;

    let mut backoff = Backoff::new(config.backoff_base, config.backoff_max);
    // Names are looked up now, and again before every attempt; until one resolves there is no
    // controller to dial (nor a socket family to pick).
    let mut resolved = resolve(&config.controllers).await;
    while resolved.is_empty() {
        let delay = backoff.next_delay(rand::random::<f64>());
        warn!(controllers = ?config.controllers, retry_in = ?delay, "no controller address resolves yet");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut shutdown => return Ok(()),
        }
        resolved = resolve(&config.controllers).await;
    }
    backoff.reset();
    let first = resolved[0];
    // The socket's family is the first controller's; the others must share it.
    let agent_endpoint =
        ov::bind_endpoint(&config.state_dir, first.is_ipv6(), config.overlay_port)?;
    let endpoint = agent_endpoint.endpoint.clone();
    info!(
        port = agent_endpoint.port,
        "UDP socket bound (controller and overlay peers)"
    );
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let drives = DrivesState::start(&config, &events_tx);
    let boot = crate::checks::BootHealth::load(
        &config.roots,
        &config.maintenance.boot_id_file,
        config.update.check_command.clone(),
    );
    info!(image = ?boot.image(), "boot facts read");
    let mut shell = Shell {
        config: &config,
        state: &state,
        events: events_tx,
        protocol: 0,
        updates: false,
        conn: None,
        reports: Reports::new(&config, boot),
        overlay: OverlayState::new(
            agent_endpoint,
            NetmapCache::load(&config.state_dir, now_ms()),
        ),
        drives,
        maint: MaintState::new(
            MaintenanceBook::new(maint::load_record(&config.state_dir)),
            allow_exec,
        ),
        update,
        backups: super::backup::BackupState::new(config.backup.clone()),
        kexec: None,
        controllers: ControllerBook::new(resolved, state.load_controllers(), first.is_ipv6()),
        current: first,
    };
    // With a certificate and a cached netmap the overlay starts before the controller answers:
    // peers are reachable even while the controller is down.
    if let Some(creds) = state
        .load()?
        .filter(|c| c.not_after.0 > now_ms().0 && config.overlay_enabled)
    {
        if shell.overlay.cache.get().is_some() {
            info!("starting the overlay from the cached netmap");
            shell.overlay.ensure_node(&config, &creds, &shell.events);
            shell.overlay.push_netmap();
        }
    }

    loop {
        if names {
            tokio::select! {
                addrs = resolve(&config.controllers) => shell.controllers.set_configured(addrs),
                _ = &mut shutdown => return Ok(()),
            }
        }
        let controller = shell.controllers.next(Instant::now());
        let attempt = shell.attempt(
            controller,
            &endpoint,
            &hello,
            token.as_ref(),
            &mut events_rx,
        );
        let outcome = tokio::select! {
            r = attempt => r,
            _ = &mut shutdown => {
                endpoint.close(0u32.into(), b"agent shutting down");
                let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
                return Ok(());
            }
        };
        let delay = match outcome {
            Ok((End::Enrolled(_), _)) => {
                backoff.reset();
                continue;
            }
            Ok((End::Rejected(r), _)) if r.code == RejectCode::NodeRevoked => {
                shell.overlay.cache.clear();
                state.forget_certificate()?;
                return Err(AgentError::Revoked(r.message));
            }
            Ok((End::Revoked(reason), _)) => {
                shell.overlay.cache.clear();
                state.forget_certificate()?;
                return Err(AgentError::Revoked(reason));
            }
            Ok((End::Rotated, _)) => {
                backoff.reset();
                continue;
            }
            // The controller no longer accepts this certificate (revoked, or the node was
            // re-enrolled with another key): drop it and its key; with a token, enrol again (which
            // an operator may have to approve).
            Ok((End::Rejected(r), _)) if r.code == RejectCode::CertificateRefused => {
                warn!(reason = %r.message, "the controller refuses this node's certificate; forgetting it");
                shell.overlay.cache.clear();
                state.forget_credentials()?;
                if token.is_none() {
                    return Err(AgentError::CertificateRefused(r.message));
                }
                backoff.next_delay(rand::random::<f64>())
            }
            // Waiting for an operator (or for a claimed node's session to lapse): retry often
            // enough that an approval takes effect within seconds, whatever the backoff has grown
            // to.
            Ok((End::Rejected(r), _))
                if matches!(
                    r.code,
                    RejectCode::AwaitingApproval | RejectCode::IdentityInUse
                ) =>
            {
                warn!(reason = %r.message, "enrolment waits; retrying");
                backoff
                    .next_delay(rand::random::<f64>())
                    .min(APPROVAL_RETRY)
            }
            // Token and version refusals are final: retrying cannot help until an operator acts.
            Ok((End::Rejected(r), _)) if r.code.is_final_for_agent() => {
                return Err(AgentError::Refused(r));
            }
            // The session ended or never started: try the next controller at once, and back off
            // only once every known controller failed in this round.
            Ok((end, was_ready)) => {
                if was_ready {
                    backoff.reset();
                }
                let d = next_delay(&mut shell.controllers, controller, &mut backoff);
                warn!(controller = %controller, outcome = ?end, retry_in = ?d, "session ended");
                d
            }
            Err((AttemptError::Fatal(e), _)) => return Err(e),
            Err((e, was_ready)) => {
                if was_ready {
                    backoff.reset();
                }
                let d = next_delay(&mut shell.controllers, controller, &mut backoff);
                warn!(controller = %controller, cause = %e, retry_in = ?d, "controller unreachable");
                d
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut shutdown => return Ok(()),
        }
    }
}

/// The configured controllers' addresses now: IP addresses as given, names looked up (a failed
/// lookup is logged and skipped; the caller keeps what it had).
async fn resolve(configured: &[ControllerAddr]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for c in configured {
        match c {
            ControllerAddr::Ip(a) => out.push(*a),
            ControllerAddr::Name { host, port } => {
                let lookup = tokio::net::lookup_host((host.as_str(), *port));
                match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                    Ok(Ok(addrs)) => out.extend(addrs),
                    Ok(Err(e)) => {
                        warn!(controller = %c, cause = %e, "cannot resolve the controller's name")
                    }
                    Err(_) => {
                        warn!(controller = %c, timeout = ?RESOLVE_TIMEOUT, "resolving the controller's name timed out")
                    }
                }
            }
        }
    }
    out
}

/// How long to wait after `controller` failed: nothing while another controller is left in this
/// round, the backoff after a full round.
fn next_delay(
    book: &mut ControllerBook,
    controller: std::net::SocketAddr,
    backoff: &mut Backoff,
) -> Duration {
    match book.failed(controller, Instant::now()) {
        Pace::Now => Duration::ZERO,
        Pace::Backoff => backoff.next_delay(rand::random::<f64>()),
    }
}
