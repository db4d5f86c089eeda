//! Observing the controller from outside: `/metrics` (Prometheus), `/healthz` and `/readyz`.
//!
//! - [`serve`]: the metrics listener (`shoal-controller serve --metrics IP:PORT`), plain HTTP without
//!   authentication, for a scraper on a trusted network. It answers `/metrics`, `/healthz` and
//!   `/readyz`; the admin API answers the last two as well, without its bearer token.
//! - [`snapshot`]: what a scrape reads — the same reads `shoalctl nodes list`, `drives list`,
//!   `overlay paths`, `backup list` and `upgrade status` use — taken at scrape time, so a removed
//!   node's series are simply not there at the next scrape (no long-lived gauges to leak).
//! - [`render`]: the snapshot in the Prometheus/OpenMetrics text format (`prometheus-client`), a
//!   pure function, so its output is tested and benchmarked without a controller.
//! - [`health`]: liveness and readiness.
//!
//! [`Observe`] holds the little state this needs that no domain keeps: whether the controller is
//! serving, enrolment counters, and the last rendering (a scrape within [`RENDER_REUSE`] of the
//! previous one gets the same text, so no client can make the controller render more often).

#[doc(hidden)]
pub mod bench;
pub mod health;
pub mod render;
pub mod snapshot;

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::{header::CONTENT_TYPE, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use shoal_proto::RejectCode;
use tracing::{info, warn};

use crate::{
    api::{API_HEADER_TIMEOUT, API_MAX_HEADERS, API_MAX_HEAD_BYTES},
    http::Ctl,
    server::ServeError,
};

/// How long one rendering of `/metrics` is reused for further scrapes.
pub const RENDER_REUSE: Duration = Duration::from_secs(1);

/// The content type of `/metrics` (what `prometheus-client` writes: OpenMetrics text, which
/// Prometheus asks for and parses natively).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Enrolment outcomes, by the refusal code an agent got (index: [`REFUSAL_CODES`]).
const REFUSAL_CODES: [(RejectCode, &str); 13] = [
    (RejectCode::Version, "version"),
    (RejectCode::TokenUnknown, "token_unknown"),
    (RejectCode::TokenExpired, "token_expired"),
    (RejectCode::TokenUsedUp, "token_used_up"),
    (RejectCode::TokenRevoked, "token_revoked"),
    (RejectCode::NodeRevoked, "node_revoked"),
    (RejectCode::Protocol, "protocol"),
    (RejectCode::BadRequest, "bad_request"),
    (RejectCode::Unavailable, "unavailable"),
    (RejectCode::IdentityInUse, "identity_in_use"),
    (RejectCode::AwaitingApproval, "awaiting_approval"),
    (RejectCode::CertificateRefused, "certificate_refused"),
    // Kept last: a code added to the protocol later is counted here until it gets a name.
    (RejectCode::Protocol, "other"),
];

/// The observing state of one controller (see the module docs).
#[derive(Debug, Default)]
pub struct Observe {
    serving: AtomicBool,
    enrolled: AtomicU64,
    refused: [AtomicU64; REFUSAL_CODES.len()],
    last: tokio::sync::Mutex<Option<(Instant, render::Rendered)>>,
}

/// Enrolments since the controller started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnrolmentCounts {
    /// Certificates issued to enrolling agents.
    pub enrolled: u64,
    /// Refusals by reason (`token_expired`, `identity_in_use`...), every reason listed.
    pub refused: Vec<(&'static str, u64)>,
}

impl Observe {
    /// Whether `server::run` is serving (set once its endpoints are up, cleared as it stops).
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    /// Called by `server::run`.
    pub(crate) fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Relaxed);
    }

    /// Counts one enrolment: `None` when it got a certificate, else the refusal's code.
    pub(crate) fn enrolment(&self, refused: Option<RejectCode>) {
        match refused {
            None => self.enrolled.fetch_add(1, Ordering::Relaxed),
            Some(code) => {
                let i = REFUSAL_CODES[..REFUSAL_CODES.len() - 1]
                    .iter()
                    .position(|(c, _)| *c == code)
                    .unwrap_or(REFUSAL_CODES.len() - 1);
                self.refused[i].fetch_add(1, Ordering::Relaxed)
            }
        };
    }

    /// The enrolment counters now.
    pub fn enrolments(&self) -> EnrolmentCounts {
        EnrolmentCounts {
            enrolled: self.enrolled.load(Ordering::Relaxed),
            refused: REFUSAL_CODES
                .iter()
                .zip(&self.refused)
                .map(|((_, name), n)| (*name, n.load(Ordering::Relaxed)))
                .collect(),
        }
    }
}

/// Starts serving `/metrics`, `/healthz` and `/readyz` on `listener` (plain HTTP, no
/// authentication); returns the handle that stops it. The request head has the admin API's bounds.
pub fn serve(
    controller: Ctl,
    listener: std::net::TcpListener,
) -> Result<axum_server::Handle, ServeError> {
    let local = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let handle = axum_server::Handle::new();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .merge(health::routes())
        .with_state(controller);
    let mut server = axum_server::from_tcp(listener).handle(handle.clone());
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(API_HEADER_TIMEOUT)
        .max_headers(API_MAX_HEADERS)
        .max_buf_size(API_MAX_HEAD_BYTES);
    info!(metrics = %local, "metrics listener up (/metrics, /healthz, /readyz)");
    tokio::spawn(async move {
        if let Err(e) = server.serve(app.into_make_service()).await {
            warn!(cause = %e, "metrics listener stopped");
        }
    });
    Ok(handle)
}

/// `GET /metrics`.
async fn metrics(State(ctl): State<Ctl>) -> Response {
    match render_cached(&ctl).await {
        Ok(text) => {
            let pieces = text.chunks().to_vec();
            let body = axum::body::Body::from_stream(futures_util::stream::iter(
                pieces.into_iter().map(Ok::<_, std::convert::Infallible>),
            ));
            ([(CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response()
        }
        Err(why) => {
            warn!(cause = %why, "metrics scrape failed");
            (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
        }
    }
}

/// The metrics text, rendered now or within [`RENDER_REUSE`]; one rendering at a time.
pub async fn render_cached(ctl: &Ctl) -> Result<render::Rendered, String> {
    let mut last = ctl.observe.last.lock().await;
    if let Some((at, text)) = last.as_ref() {
        if at.elapsed() < RENDER_REUSE {
            return Ok(text.clone());
        }
    }
    let c = ctl.clone();
    let text = tokio::task::spawn_blocking(move || {
        let snap = snapshot::take(&c).map_err(|e| e.1)?;
        Ok::<_, String>(render::render(snap))
    })
    .await
    .map_err(|e| format!("metrics rendering failed: {e}"))??;
    *last = Some((Instant::now(), text.clone()));
    Ok(text)
}
