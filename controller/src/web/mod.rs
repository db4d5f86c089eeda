//! The web view: server-rendered HTML pages of the fleet under `/ui/` on the admin API's HTTPS
//! listener, for people with the admin credential. No JavaScript: forms, links and inline SVG.
//!
//! - `session.rs`: the login exchanges the admin token (checked as the API checks its bearer
//!   token: SHA-256, constant-time comparison) for a session cookie; sessions are bounded in
//!   number and lifetime, and kept as digests.
//! - `pages.rs`: the pages, each built from the admin API's own handlers, so a page shows what
//!   `shoalctl … -o json` shows.
//! - `layout.rs` (page shell, stylesheet, badges) and `chart.rs` (SVG trend charts).
//!
//! Every `/ui/` page but the login form redirects to it without a live session. Bodies are
//! bounded ([`MAX_FORM_BYTES`]); every page is sent with a content security policy that allows no
//! script and loads nothing from elsewhere.

mod chart;
mod layout;
mod pages;
pub mod session;

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{DefaultBodyLimit, Request, State},
    http::{
        header::{
            CACHE_CONTROL, CONTENT_SECURITY_POLICY, COOKIE, LOCATION, REFERRER_POLICY, SET_COOKIE,
            X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
        },
        HeaderMap, HeaderValue, StatusCode,
    },
    middleware::{self, Next},
    response::{Html, IntoResponse, Response},
    routing::{get, post},
    Form, Router,
};
use serde::Deserialize;
use shoal_overlay::pki;
use tracing::info;

use crate::http::Ctl;
use session::{SessionConfig, Sessions};

/// The largest request body the web view reads (the login form: a 64-character token).
pub const MAX_FORM_BYTES: usize = 4 * 1024;

/// What the pages need: the controller, and the sessions.
#[derive(Debug, Clone)]
pub struct WebState {
    ctl: Ctl,
    sessions: Arc<Sessions>,
}

/// The web view's routes, mounted beside the admin API's (outside its bearer authentication:
/// these check the session cookie instead).
pub fn routes(ctl: Ctl) -> Router<Ctl> {
    routes_with(ctl, SessionConfig::default())
}

/// [`routes`] with its own session bounds.
pub fn routes_with(ctl: Ctl, config: SessionConfig) -> Router<Ctl> {
    let state = WebState {
        ctl,
        sessions: Arc::new(Sessions::new(config)),
    };
    let pages = Router::new()
        .route("/ui/", get(pages::overview))
        .route("/ui/nodes", get(pages::nodes_page))
        .route("/ui/nodes/{id}", get(pages::node_page))
        .route("/ui/drives", get(pages::drives_page))
        .route("/ui/drives/{node}/{device}", get(pages::drive_page))
        .route("/ui/overlay", get(pages::overlay_page))
        .route("/ui/rollouts", get(pages::rollouts_page))
        .route("/ui/backups", get(pages::backups_page))
        .route("/ui/events", get(pages::events_page))
        .route("/ui/{*rest}", get(pages::not_found))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_session,
        ));
    Router::new()
        .route("/ui", get(|| async { see_other("/ui/") }))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/logout", post(logout))
        .merge(pages)
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
        .layer(middleware::map_response(security_headers))
        .with_state(state)
}

/// A 303 to `to`: after a form, the browser follows with a GET.
fn see_other(to: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(LOCATION, to)]).into_response()
}

fn presented_session(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(session::cookie_value)
}

/// Lets a request with a live session through; sends any other to the login form.
async fn require_session(State(web): State<WebState>, req: Request, next: Next) -> Response {
    match presented_session(req.headers()) {
        Some(id) if web.sessions.check(id, Instant::now()) => next.run(req).await,
        _ => see_other("/ui/login"),
    }
}

async fn login_form() -> Html<String> {
    Html(layout::login(None).into_string())
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

impl std::fmt::Debug for LoginForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginForm { token: <redacted> }")
    }
}

/// `POST /ui/login`: the admin token for a session cookie.
async fn login(State(web): State<WebState>, Form(form): Form<LoginForm>) -> Response {
    let presented = pki::sha256(form.token.trim().as_bytes());
    if !crate::api::admin::digest_eq(&presented, &web.ctl.admin_token_sha256) {
        info!("web view login refused: not the admin token");
        return (
            StatusCode::UNAUTHORIZED,
            Html(layout::login(Some("That is not the admin token.")).into_string()),
        )
            .into_response();
    }
    let id = web.sessions.create(Instant::now());
    info!(sessions = web.sessions.count(), "web view login");
    let cookie = session::set_cookie(&id, web.sessions.config().lifetime);
    let mut resp = see_other("/ui/");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(SET_COOKIE, v);
    }
    resp
}

/// `POST /ui/logout`: ends the session and removes the cookie.
async fn logout(State(web): State<WebState>, headers: HeaderMap) -> Response {
    if let Some(id) = presented_session(&headers) {
        web.sessions.end(id);
    }
    let mut resp = see_other("/ui/login");
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie()) {
        resp.headers_mut().insert(SET_COOKIE, v);
    }
    resp
}

/// No script, nothing loaded from elsewhere, no framing, nothing cached or sent on as a referrer.
async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{
        api::admin::{AdminConf, ADMIN_CONF_FILE},
        server::{now_ms, Controller, ControllerConfig},
    };
    use shoal_proto::{
        AtaPredictors, Drive, DriveProtocol, DriveReport, DriveState, SmartExitStatus,
        SmartOutcome, SmartPredictors, SmartReport, UnixMillis,
    };

    struct Web {
        _rt: tokio::runtime::Runtime,
        ctl: Ctl,
        handle: axum_server::Handle,
        http: ureq::Agent,
        base: String,
        token: String,
    }

    /// A controller serving the admin API (and so the web view) on loopback, and an HTTPS client
    /// that trusts its CA, follows no redirects and keeps no cookies.
    fn serve(dir: &std::path::Path) -> Web {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config = ControllerConfig::for_tests(dir.to_owned());
        let ctl = Controller::open(config, listener.local_addr().unwrap()).unwrap();
        let handle = {
            let _enter = rt.enter();
            crate::api::serve(ctl.clone(), listener).unwrap()
        };
        let conf = AdminConf::read(&dir.join(ADMIN_CONF_FILE)).unwrap();
        let ca = pem::parse(&conf.ca).unwrap();
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![
                ureq::tls::Certificate::from_der(ca.contents()).to_owned(),
            ])))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let http = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .new_agent();
        Web {
            _rt: rt,
            ctl,
            handle,
            http,
            base: conf.api.trim_end_matches('/').to_owned(),
            token: conf.token,
        }
    }

    impl Web {
        /// GET with an optional session cookie: status, Location, body.
        fn get(&self, path: &str, session: Option<&str>) -> (u16, String, String) {
            let mut req = self.http.get(format!("{}{path}", self.base));
            if let Some(s) = session {
                req = req.header("cookie", format!("other=1; {}={s}", session::COOKIE));
            }
            let mut resp = req.call().unwrap();
            let location = header(&resp, "location");
            let body = resp.body_mut().read_to_string().unwrap();
            (resp.status().as_u16(), location, body)
        }

        /// POST a form body: status, Location, Set-Cookie, body.
        fn post(&self, path: &str, body: &str, session: Option<&str>) -> (u16, String, String) {
            let mut req = self
                .http
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/x-www-form-urlencoded");
            if let Some(s) = session {
                req = req.header("cookie", format!("{}={s}", session::COOKIE));
            }
            let resp = req.send(body).unwrap();
            (
                resp.status().as_u16(),
                header(&resp, "location"),
                header(&resp, "set-cookie"),
            )
        }
    }

    fn header<B>(resp: &axum::http::Response<B>, name: &str) -> String {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }

    fn smart(temperature: i32, reallocated: u64) -> SmartOutcome {
        SmartOutcome::Report(SmartReport {
            device: "/dev/sdb".into(),
            protocol: DriveProtocol::Ata,
            model: Some("Disk <i>".into()),
            serial: Some("S1".into()),
            firmware: None,
            capacity_bytes: None,
            temperature_celsius: Some(temperature),
            power_on_hours: Some(5),
            health_passed: Some(true),
            exit_status: SmartExitStatus(0),
            predictors: SmartPredictors::Ata(AtaPredictors {
                reallocated_sectors: Some(reallocated),
                pending_sectors: Some(0),
                ..Default::default()
            }),
            self_test: None,
        })
    }

    #[test]
    fn pages_need_a_session_that_only_the_admin_token_opens() {
        let dir = tempfile::tempdir().unwrap();
        let web = serve(dir.path());
        let node = crate::test_support::enrol_for_tests(
            &web.ctl.store,
            "<script>alert(1)</script>",
            &[("rack", "<img src=x>")],
            now_ms(),
        );

        // Without a session every page sends the browser to the login form.
        for path in ["/ui/", "/ui/nodes", &format!("/ui/nodes/{node}"), "/ui/x/y"] {
            let (status, location, _) = web.get(path, None);
            assert_eq!((status, location.as_str()), (303, "/ui/login"), "{path}");
        }
        assert_eq!(web.get("/ui", None).1, "/ui/");
        let (status, _, body) = web.get("/ui/login", None);
        assert!(status == 200 && body.contains("name=\"token\""), "{body}");
        // Neither a made-up session nor the admin token itself is a session.
        assert_eq!(web.get("/ui/", Some("0123abcd")).0, 303);
        assert_eq!(web.get("/ui/", Some(&web.token)).0, 303);

        // A wrong token gets no cookie; an oversized body is refused before it is read.
        let (status, _, cookie) = web.post("/ui/login", "token=wrong", None);
        assert_eq!((status, cookie.as_str()), (401, ""));
        let big = format!("token={}", "a".repeat(MAX_FORM_BYTES));
        assert_eq!(web.post("/ui/login", &big, None).0, 413);
        assert_eq!(web.post("/ui/login", "nonsense", None).0, 422);

        let (status, location, cookie) =
            web.post("/ui/login", &format!("token={}", web.token), None);
        assert_eq!((status, location.as_str()), (303, "/ui/"));
        for attr in [
            "HttpOnly",
            "Secure",
            "SameSite=Strict",
            "Path=/ui",
            "Max-Age=43200",
        ] {
            assert!(cookie.contains(attr), "{cookie}");
        }
        let id = session::cookie_value(&cookie).unwrap().to_owned();
        assert!(!cookie.contains(&web.token), "the cookie is not the token");

        let (status, _, body) = web.get("/ui/", Some(&id));
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("Fleet overview"));
        let (status, _, body) = web.get("/ui/nodes", Some(&id));
        assert_eq!(status, 200);
        assert!(body.contains(&format!("data-node=\"{node}\"")), "{body}");
        // Node-supplied text is escaped wherever it shows.
        assert!(
            !body.contains("<script>alert") && !body.contains("<img src=x>"),
            "{body}"
        );
        assert!(body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(body.contains("rack=&lt;img src=x&gt;"));
        // The nodes page takes the API's selector, and its errors.
        let (status, _, body) = web.get("/ui/nodes?selector=rack%3Dother", Some(&id));
        assert!(status == 200 && !body.contains("data-node=\"n"), "{body}");
        assert_eq!(web.get("/ui/nodes?selector=a%3D%3D%3Db", Some(&id)).0, 400);
        let (status, _, body) = web.get(&format!("/ui/nodes/{node}"), Some(&id));
        assert_eq!(status, 200, "{body}");
        assert_eq!(web.get("/ui/nodes/n404", Some(&id)).0, 404);
        assert_eq!(web.get("/ui/nope", Some(&id)).0, 404);
        // The session opens pages, not the admin API.
        assert_eq!(web.get("/v1/nodes", Some(&id)).0, 401);

        // Logging out ends the session on the controller, not only in the browser.
        let (status, location, cookie) = web.post("/ui/logout", "", Some(&id));
        assert_eq!((status, location.as_str()), (303, "/ui/login"));
        assert!(cookie.contains("Max-Age=0"), "{cookie}");
        assert_eq!(web.get("/ui/", Some(&id)).0, 303);
        web.handle.shutdown();
    }

    #[test]
    fn a_drive_page_charts_its_smart_history() {
        let dir = tempfile::tempdir().unwrap();
        let web = serve(dir.path());
        let node = crate::test_support::enrol_for_tests(&web.ctl.store, "a", &[], now_ms());
        for (i, (temp, realloc)) in [(31, 0), (35, 0), (42, 8)].into_iter().enumerate() {
            let at = UnixMillis(1_000_000 + i as u64 * 60_000);
            let report = DriveReport {
                at,
                drives: vec![Drive {
                    name: "sdb".into(),
                    model: Some("Disk <i>".into()),
                    serial: Some("S1".into()),
                    size_bytes: 1 << 30,
                    removable: false,
                    state: DriveState::Blank,
                    smart: Some(smart(temp, realloc)),
                    smart_at: Some(at),
                }],
            };
            web.ctl.drives.ingest(&node, report, now_ms()).unwrap();
        }
        let (_, _, cookie) = web.post("/ui/login", &format!("token={}", web.token), None);
        let id = session::cookie_value(&cookie).unwrap().to_owned();
        let (status, _, body) = web.get(&format!("/ui/drives/{node}/sdb"), Some(&id));
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("3 samples"), "{body}");
        assert!(
            body.contains("Temperature") && body.contains("42 °C"),
            "{body}"
        );
        assert!(body.contains("reallocated sectors (ATA 5)"), "{body}");
        assert!(
            body.contains("rose by 8 (0 -&gt; 8)"),
            "the verdict's reason: {body}"
        );
        assert_eq!(
            body.matches("<path class=\"line warn\"").count(),
            3,
            "{body}"
        );
        assert!(!body.contains("<i>"), "{body}");
        let (status, _, body) = web.get("/ui/drives", Some(&id));
        assert_eq!(status, 200);
        assert!(body.contains("svg class=\"spark\""), "{body}");
        assert_eq!(web.get(&format!("/ui/drives/{node}/sdz"), Some(&id)).0, 404);
        web.handle.shutdown();
    }
}
