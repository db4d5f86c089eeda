//! The admin API: HTTPS (axum + rustls), bearer-token authenticated, JSON in and out. Each domain
//! brings its routes (`<domain>/routes.rs`); this module puts them behind authentication and the
//! request limits, and serves the fleet report and the refusal counters, which span domains.

pub mod admin;

use std::{net::IpAddr, sync::Arc};

use axum::{
    extract::{Request, State},
    http::{header::AUTHORIZATION, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use shoal_overlay::pki;
use tracing::warn;

use crate::{
    http::{blocking, Ctl, HttpError},
    server::{now_ms, ServeError},
};
use shoal_controller_core::report::{FleetReport, ReportThresholds};

/// How long a client has to send a request head (and how long an idle keep-alive connection lives).
pub const API_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most header fields in one request.
pub const API_MAX_HEADERS: usize = 64;

/// hyper's read buffer, which bounds a request head (bodies stream through it).
pub const API_MAX_HEAD_BYTES: usize = 64 * 1024;

/// Starts serving the admin API on `listener`; returns the handle that stops it.
pub fn serve(
    controller: Ctl,
    listener: std::net::TcpListener,
) -> Result<axum_server::Handle, ServeError> {
    let local = listener.local_addr()?;
    let mut ips: Vec<IpAddr> = vec![
        IpAddr::from([127, 0, 0, 1]),
        IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
    ];
    if !local.ip().is_unspecified() && !ips.contains(&local.ip()) {
        ips.push(local.ip());
    }
    let mut names = vec![
        pki::CONTROLLER_SERVER_NAME.to_owned(),
        "localhost".to_owned(),
    ];
    // `--api-name`: what remote clients dial (checked at start: a DNS name or an IP address).
    for name in &controller.config.api_names {
        match name.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) if !names.contains(name) => names.push(name.clone()),
            Err(_) => {}
        }
    }
    let (chain, key) = controller.ca.issue_server_cert(&names, &ips)?;
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(shoal_overlay::tls::TlsError::from)?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(shoal_overlay::tls::TlsError::from)?;
    let mut tls = tls;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    listener.set_nonblocking(true)?;
    let handle = axum_server::Handle::new();
    let app = router(controller);
    let mut server = axum_server::from_tcp_rustls(
        listener,
        axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls)),
    )
    .handle(handle.clone());
    // A client that trickles its request head, or parks an idle keep-alive connection, is cut off
    // (hyper applies the header timeout to idle keep-alive connections too); TLS handshakes have
    // axum-server's 10 s limit.
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(API_HEADER_TIMEOUT)
        .max_headers(API_MAX_HEADERS)
        .max_buf_size(API_MAX_HEAD_BYTES);
    tokio::spawn(async move {
        if let Err(e) = server.serve(app.into_make_service()).await {
            warn!(cause = %e, "admin API stopped");
        }
    });
    Ok(handle)
}

/// The API's routes, behind bearer authentication.
pub fn router(controller: Ctl) -> Router {
    Router::new()
        .route("/v1/report", get(fleet_report))
        .route("/v1/refusals", get(refusals))
        .merge(crate::registry::routes::routes())
        .merge(crate::overlay::routes::routes())
        .merge(crate::overlay::wireguard::routes())
        .merge(crate::drives::routes::routes())
        .merge(crate::netboot::routes::routes())
        .merge(crate::maintenance::routes::routes())
        .merge(crate::releases::routes::routes())
        .merge(crate::backups::routes::routes())
        .merge(crate::registry::identity::routes())
        .merge(crate::dr::routes::routes())
        .merge(crate::cluster::routes::routes())
        .route(shoal_api::version::VERSION_PATH, get(version))
        .layer(middleware::from_fn_with_state(
            controller.clone(),
            authenticate,
        ))
        .merge(crate::web::routes(controller.clone()))
        // Probes carry no credentials: added after the authentication layer, which they skip.
        .merge(crate::observe::health::routes())
        .with_state(controller)
}

/// `GET /v1/version`: what this controller runs.
async fn version(State(ctl): State<Ctl>) -> Json<shoal_api::version::VersionView> {
    Json(shoal_api::version::VersionView {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol_min: shoal_proto::SUPPORTED.min,
        protocol_max: shoal_proto::SUPPORTED.max,
        store: crate::observe::snapshot::store_kind(&ctl).to_owned(),
        controller: ctl.cluster.id.clone(),
    })
}

async fn authenticate(State(ctl): State<Ctl>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| pki::sha256(t.trim().as_bytes()));
    match presented {
        Some(hash) if crate::api::admin::digest_eq(&hash, &ctl.admin_token_sha256) => {
            next.run(req).await
        }
        Some(_) => {
            HttpError(StatusCode::UNAUTHORIZED, "invalid admin credentials".into()).into_response()
        }
        None => HttpError(
            StatusCode::UNAUTHORIZED,
            "admin credentials required (shoalctl --config DATA_DIR/admin.conf)".into(),
        )
        .into_response(),
    }
}

/// What the controller's limits refused since it started: connections, and what nodes sent the
/// overlay hub.
async fn refusals(State(ctl): State<Ctl>) -> Json<shoal_api::refusals::RefusalsView> {
    Json(shoal_api::refusals::RefusalsView {
        connections: ctl.conn_stats.snapshot(),
        overlay: ctl.overlay.counters(),
    })
}

pub(crate) async fn fleet_report(State(ctl): State<Ctl>) -> Result<Json<FleetReport>, HttpError> {
    blocking(move || {
        let nodes = crate::registry::routes::all_nodes(&ctl)?;
        let drives = ctl.drives.views(None);
        let t = ReportThresholds::for_interval(ctl.config.heartbeat_interval);
        let records = ctl.store.nodes()?;
        let mut report = shoal_controller_core::report::build(&nodes, &drives, now_ms().0, &t);
        report.backups = crate::backups::routes::attention(&ctl, &records)?;
        let hostnames = records
            .iter()
            .map(|n| (n.id.clone(), n.hostname.clone()))
            .collect();
        let rollouts: Vec<_> = ctl
            .maint
            .rollouts()?
            .iter()
            .map(|r| crate::maintenance::routes::rollout_view(r, &hostnames))
            .collect();
        report.rollouts = shoal_controller_core::report::rollout_attention(&rollouts);
        if let (Some(cfg), Some(run)) = (&ctl.config.dr_schedule, ctl.last_dr_run()) {
            if let Some(error) = run.error {
                report.backups.push(shoal_api::report::BackupAttention {
                    job: "controller-backup".into(),
                    node: "controller".into(),
                    hostname: "controller".into(),
                    reasons: vec![format!(
                        "scheduled controller backup to {} failed: {error}",
                        cfg.target
                    )],
                });
            }
        }
        Ok(Json(report))
    })
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{
        api::admin::{AdminClient, AdminClientError, AdminConf, ADMIN_CONF_FILE},
        server::Controller,
        server::ControllerConfig,
    };
    use shoal_api::{
        drives::SetDrivePolicy,
        networks::{CreateNetwork, MemberSpec},
        nodes::NodeView,
    };
    use shoal_controller_core::drives::fleet::PrepareRequest;
    use shoal_proto::{NodeId, UnixMillis};

    fn enrol(ctl: &Controller, machine: &str, labels: &[(&str, &str)]) -> NodeId {
        crate::test_support::enrol_for_tests(&ctl.store, machine, labels, now_ms())
    }

    fn status<T: std::fmt::Debug>(r: Result<T, AdminClientError>) -> (u16, String) {
        match r {
            Err(AdminClientError::Api { status, message }) => (status, message),
            other => panic!("expected an API error, got {other:?}"),
        }
    }

    fn spec(node: Option<&NodeId>, selector: Option<&str>) -> MemberSpec {
        MemberSpec {
            node: node.map(|n| n.0.clone()),
            selector: selector.map(str::to_owned),
        }
    }

    /// A one-worker runtime for a test that serves the admin API.
    fn api_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A controller in `dir` serving its admin API on loopback, and a client of it (inside the
    /// caller's runtime).
    fn api_controller(dir: &std::path::Path) -> (Ctl, axum_server::Handle, AdminClient) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config = ControllerConfig::for_tests(dir.to_owned());
        let ctl = Controller::open(config, listener.local_addr().unwrap()).unwrap();
        let handle = serve(ctl.clone(), listener).unwrap();
        let client =
            AdminClient::new(&AdminConf::read(&dir.join(ADMIN_CONF_FILE)).unwrap()).unwrap();
        (ctl, handle, client)
    }

    #[test]
    fn labels_over_the_admin_api_apply_at_once() {
        use shoal_api::nodes::LabelNode;
        let (dir, rt) = (tempfile::tempdir().unwrap(), api_runtime());
        let _enter = rt.enter();
        let (ctl, handle, client) = api_controller(dir.path());
        let a = enrol(&ctl, "a", &[("role", "db")]);
        let b = enrol(&ctl, "b", &[]);
        client
            .create_network(&CreateNetwork {
                name: "lab".into(),
                subnet: "10.71.0.0/24".into(),
                mtu: None,
            })
            .unwrap();
        client
            .add_to_network("lab", &spec(None, Some("zone in (a), role=db")))
            .unwrap();
        let members = |client: &AdminClient| -> Vec<String> {
            let mut m: Vec<String> = client
                .network("lab")
                .unwrap()
                .members
                .into_iter()
                .map(|m| m.node)
                .collect();
            m.sort();
            m
        };
        assert!(members(&client).is_empty());
        let label = |node: &NodeId, set: &[(&str, &str)], remove: &[&str], overwrite: bool| {
            client.label_node(
                &node.0,
                &LabelNode {
                    set: set
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    remove: remove.iter().map(|k| k.to_string()).collect(),
                    overwrite,
                },
            )
        };
        let done = label(&b, &[("role", "db"), ("zone", "a")], &[], false).unwrap();
        assert_eq!(done.changes, ["role=db added", "zone=a added"]);
        assert_eq!(members(&client), vec![b.0.clone()]);
        // kubectl's rules, each with its status and reason; nothing is applied.
        let (code, msg) = status(label(&b, &[("zone", "b")], &[], false));
        assert_eq!(
            (code, msg.as_str()),
            (
                409,
                "node already has zone=a; pass --overwrite to change it"
            )
        );
        let (code, msg) = status(label(&b, &[("bad key", "x")], &[], true));
        assert!(
            code == 400 && msg.contains("label key \"bad key\""),
            "{msg}"
        );
        let (code, msg) = status(label(&b, &[("netboot.mac", "x")], &[], true));
        assert!(
            code == 400 && msg.contains("set by the controller"),
            "{msg}"
        );
        assert_eq!(
            status(label(&NodeId("n0".into()), &[("a", "b")], &[], true)).0,
            404
        );
        assert_eq!(
            label(&b, &[("zone", "a")], &[], false)
                .unwrap()
                .changes
                .len(),
            0
        );
        // The filter is the same selector code.
        let ids = |sel: &str| -> Vec<String> {
            let mut v: Vec<String> = client
                .nodes(Some(sel))
                .unwrap()
                .into_iter()
                .map(|n| n.id)
                .collect();
            v.sort();
            v
        };
        let mut both = vec![a.0.clone(), b.0.clone()];
        both.sort();
        assert_eq!(ids("role=db"), both);
        assert_eq!(ids("role=db,zone notin (a)"), vec![a.0.clone()]);
        assert_eq!(ids("!zone"), vec![a.0.clone()]);
        let (code, msg) = status(client.nodes(Some("zone in (a")));
        assert!(code == 400 && msg.contains("found end of input"), "{msg}");
        // Out of the set: the node leaves at once; the events name each change.
        let done = label(&b, &[("zone", "b")], &[], true).unwrap();
        assert_eq!(done.changes, ["zone=b (was a)"]);
        assert!(members(&client).is_empty());
        let events: Vec<String> = ctl
            .store
            .events(None, 1000)
            .unwrap()
            .into_iter()
            .filter(|e| e.node.as_ref() == Some(&b) && e.kind.name() == "labels_changed")
            .map(|e| e.message)
            .collect();
        assert_eq!(
            events,
            [
                "labels of b changed: role=db added, zone=a added",
                "labels of b changed: zone=b (was a)"
            ]
        );
        handle.shutdown();
    }

    #[test]
    fn networks_over_the_admin_api() {
        let (dir, rt) = (tempfile::tempdir().unwrap(), api_runtime());
        let _enter = rt.enter();
        let (ctl, handle, client) = api_controller(dir.path());

        let a = enrol(&ctl, "a", &[("role", "db")]);
        let b = enrol(&ctl, "b", &[]);
        let lab = client
            .create_network(&CreateNetwork {
                name: "lab".into(),
                subnet: "10.71.0.0/24".into(),
                mtu: None,
            })
            .unwrap();
        assert_eq!((lab.id, lab.mtu, lab.members), (2, 1380, 0));
        let list = client.networks().unwrap();
        assert_eq!(
            list.iter()
                .map(|n| (n.name.as_str(), n.subnet.as_str(), n.members))
                .collect::<Vec<_>>(),
            [("default", "10.70.0.0/24", 2), ("lab", "10.71.0.0/24", 0)]
        );

        let create = |name: &str, subnet: &str| {
            client.create_network(&CreateNetwork {
                name: name.into(),
                subnet: subnet.into(),
                mtu: None,
            })
        };
        assert_eq!(status(create("x", "10.72.0.0")).0, 400);
        let (code, msg) = status(create("x", "10.70.0.128/25"));
        assert!(
            code == 409 && msg.contains("overlaps network default"),
            "{code} {msg}"
        );
        assert_eq!(status(create("lab", "10.73.0.0/24")).0, 409);
        assert_eq!(status(client.network("nope")).0, 404);
        assert_eq!(
            status(client.add_to_network("lab", &spec(Some(&NodeId("n0".into())), None))).0,
            404
        );
        assert_eq!(
            status(client.add_to_network("lab", &spec(None, None))).0,
            400
        );
        assert_eq!(
            status(client.add_to_network("lab", &spec(None, Some("role in ()")))).0,
            400
        );
        assert_eq!(status(client.delete_network("default")).0, 409);

        let up = client.add_to_network("lab", &spec(Some(&b), None)).unwrap();
        assert_eq!(
            up.joined
                .iter()
                .map(|m| (m.node.as_str(), m.address.as_str()))
                .collect::<Vec<_>>(),
            [(b.0.as_str(), "10.71.0.1")]
        );
        let up = client
            .add_to_network("lab", &spec(None, Some("role=db")))
            .unwrap();
        assert_eq!(
            (
                up.joined.len(),
                up.network.members,
                up.network.selectors.clone()
            ),
            (1, 2, vec!["role=db".to_owned()])
        );
        assert_eq!(
            status(client.remove_from_network("lab", &spec(Some(&a), None))).0,
            409
        );

        let detail = client.network("lab").unwrap();
        assert_eq!(
            detail
                .members
                .iter()
                .map(|m| m.hostname.as_str())
                .collect::<Vec<_>>(),
            ["b", "a"]
        );
        let nodes: Vec<NodeView> = client.get("/v1/nodes").unwrap();
        let node_a = nodes.iter().find(|n| n.id == a.0).unwrap();
        assert_eq!(
            node_a
                .overlay
                .iter()
                .map(|o| (
                    o.network.as_str(),
                    o.network_id,
                    o.address.as_str(),
                    o.prefix_len
                ))
                .collect::<Vec<_>>(),
            [("default", 1, "10.70.0.1", 24), ("lab", 2, "10.71.0.2", 24)]
        );
        let shown: NodeView = client.get(&format!("/v1/nodes/{}", a.0)).unwrap();
        assert_eq!(shown.overlay, node_a.overlay);

        let up = client
            .remove_from_network("lab", &spec(None, Some("role=db")))
            .unwrap();
        assert_eq!(up.left, std::slice::from_ref(&a.0));
        let gone = client.delete_network("lab").unwrap();
        assert_eq!(gone.left, std::slice::from_ref(&b.0));
        assert_eq!(client.networks().unwrap().len(), 1);

        // Removing a node frees its default-network address.
        assert!(ctl.remove_node(&a).unwrap());
        let detail = client.network("default").unwrap();
        assert_eq!(
            detail
                .members
                .iter()
                .map(|m| m.node.as_str())
                .collect::<Vec<_>>(),
            [b.0.as_str()]
        );
        handle.shutdown();
    }

    /// A controller with its admin API on loopback, and a client for it.
    fn api(
        dir: &std::path::Path,
        prepare_timeout: std::time::Duration,
    ) -> (
        tokio::runtime::Runtime,
        Ctl,
        axum_server::Handle,
        AdminClient,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut config = ControllerConfig::for_tests(dir.to_owned());
        config.drive_prepare_timeout = prepare_timeout;
        let ctl = Controller::open(config, listener.local_addr().unwrap()).unwrap();
        let handle = {
            let _enter = rt.enter();
            serve(ctl.clone(), listener).unwrap()
        };
        let client =
            AdminClient::new(&AdminConf::read(&dir.join(ADMIN_CONF_FILE)).unwrap()).unwrap();
        (rt, ctl, handle, client)
    }

    fn policies_sent(rx: &mut crate::connections::queue::NodeRx) -> Vec<shoal_proto::DrivePolicy> {
        let mut out = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            match msg {
                shoal_proto::ControllerMsg::DrivePolicy(p) => out.push(p),
                other => panic!("unexpected message {other:?}"),
            }
        }
        out
    }

    fn policy_req(
        node: Option<&NodeId>,
        selector: Option<&str>,
        mode: &str,
        fs: Option<&str>,
    ) -> SetDrivePolicy {
        SetDrivePolicy {
            node: node.map(|n| n.0.clone()),
            selector: selector.map(str::to_owned),
            mode: mode.into(),
            filesystem: fs.map(str::to_owned),
        }
    }

    #[test]
    fn drive_policies_reach_v3_agents_only_and_only_when_they_change() {
        use shoal_proto::{DrivePolicy, DrivePolicyMode as Mode, Filesystem};
        let dir = tempfile::tempdir().unwrap();
        let (_rt, ctl, handle, client) = api(dir.path(), std::time::Duration::from_secs(5));
        let a = enrol(&ctl, "a", &[("role", "db")]);
        let b = enrol(&ctl, "b", &[("role", "db")]);
        let (a_conn, mut a_rx) = ctl.fake_connection(&a, 3);
        let (_, mut b_rx) = ctl.fake_connection(&b, 2);
        // Right after the session is ready, a v3 agent gets its policy: the default.
        ctl.send_drive_policy_on_connect(&a, a_conn);
        assert_eq!(policies_sent(&mut a_rx), [DrivePolicy::default()]);

        let set = client
            .set_drive_policy(&policy_req(None, Some("role=db"), "approve", Some("xfs")))
            .unwrap();
        assert_eq!(
            (
                set.selector.as_deref(),
                set.mode.as_str(),
                set.filesystem.as_str()
            ),
            (Some("role=db"), "approve", "xfs")
        );
        let approve = DrivePolicy {
            mode: Mode::Approve,
            filesystem: Filesystem::Xfs,
        };
        assert_eq!(policies_sent(&mut a_rx), [approve]);
        // A bolder selector policy does not override the more cautious one.
        client
            .set_drive_policy(&policy_req(None, Some("role=db"), "approve", Some("xfs")))
            .unwrap();
        let rack = enrol(&ctl, "c", &[]);
        client
            .set_drive_policy(&policy_req(Some(&rack), None, "prepare", None))
            .unwrap();
        assert_eq!(
            policies_sent(&mut a_rx),
            [],
            "unchanged policies are not sent again"
        );
        client
            .set_drive_policy(&policy_req(Some(&a), None, "prepare", None))
            .unwrap();
        assert_eq!(
            policies_sent(&mut a_rx),
            [DrivePolicy {
                mode: Mode::Prepare,
                filesystem: Filesystem::Ext4
            }]
        );

        let all = client.drive_policies().unwrap();
        assert_eq!(all.policies.len(), 3);
        let eff: Vec<(String, String, String)> = all
            .effective
            .iter()
            .map(|e| (e.hostname.clone(), e.mode.clone(), e.source.clone()))
            .collect();
        assert!(
            eff.contains(&("a".into(), "prepare".into(), "node".into())),
            "{eff:?}"
        );
        assert!(
            eff.contains(&("b".into(), "approve".into(), "selector role=db".into())),
            "{eff:?}"
        );
        assert!(
            eff.contains(&("c".into(), "prepare".into(), "node".into())),
            "{eff:?}"
        );

        let gone = client.delete_drive_policy(&spec(Some(&a), None)).unwrap();
        assert_eq!(gone.mode, "prepare");
        assert_eq!(policies_sent(&mut a_rx), [approve]);
        assert_eq!(
            status(client.delete_drive_policy(&spec(Some(&a), None))).0,
            404
        );
        assert_eq!(
            status(client.set_drive_policy(&policy_req(None, Some("role in ()"), "approve", None)))
                .0,
            400
        );
        assert_eq!(
            status(client.set_drive_policy(&policy_req(None, None, "approve", None))).0,
            400
        );
        assert_eq!(
            status(client.set_drive_policy(&policy_req(None, Some("k=v"), "erase", None))).0,
            400
        );
        assert_eq!(
            status(client.set_drive_policy(&policy_req(
                None,
                Some("k=v"),
                "report",
                Some("btrfs")
            )))
            .0,
            400
        );
        assert_eq!(
            status(client.set_drive_policy(&policy_req(
                Some(&NodeId("n404".into())),
                None,
                "report",
                None
            )))
            .0,
            404
        );
        client
            .delete_drive_policy(&spec(None, Some("role=db")))
            .unwrap();
        assert_eq!(policies_sent(&mut a_rx), [DrivePolicy::default()]);

        // The v2 agent never got anything.
        assert!(b_rx.try_recv().is_err());
        handle.shutdown();
    }

    fn smart(health: bool) -> shoal_proto::SmartOutcome {
        shoal_proto::SmartOutcome::Report(shoal_proto::SmartReport {
            device: "/dev/x".into(),
            protocol: shoal_proto::DriveProtocol::Ata,
            model: Some("Disk".into()),
            serial: Some(format!("S-{health}")),
            firmware: None,
            capacity_bytes: None,
            temperature_celsius: Some(30),
            power_on_hours: Some(5),
            health_passed: Some(health),
            exit_status: shoal_proto::SmartExitStatus(0),
            predictors: shoal_proto::SmartPredictors::Ata(Default::default()),
            self_test: None,
        })
    }

    fn drive(
        name: &str,
        serial: &str,
        state: shoal_proto::DriveState,
        smart: Option<shoal_proto::SmartOutcome>,
    ) -> shoal_proto::Drive {
        shoal_proto::Drive {
            name: name.into(),
            model: Some("Disk".into()),
            serial: Some(serial.into()),
            size_bytes: 1 << 30,
            removable: false,
            state,
            smart_at: smart.as_ref().map(|_| UnixMillis(1000)),
            smart,
        }
    }

    /// Answers drive commands like an agent: `answer` decides the result, `None` stays silent.
    fn fake_agent(
        ctl: Ctl,
        node: NodeId,
        mut rx: crate::connections::queue::NodeRx,
        answer: impl Fn(&shoal_proto::DriveCommand) -> Option<Result<String, String>> + Send + 'static,
    ) -> std::sync::Arc<std::sync::Mutex<Vec<shoal_proto::DriveCommand>>> {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                if let shoal_proto::ControllerMsg::DriveCommand(cmd) = msg {
                    record.lock().unwrap().push(cmd.clone());
                    if let Some(result) = answer(&cmd) {
                        ctl.drives.command_result(
                            &node,
                            shoal_proto::DriveCommandResult { id: cmd.id, result },
                        );
                    }
                }
            }
        });
        seen
    }

    #[test]
    fn drive_commands_are_checked_sent_and_answered() {
        use shoal_proto::{DriveAction, DriveReport, DriveState, Filesystem, SelfTestKind};
        let dir = tempfile::tempdir().unwrap();
        let (rt, ctl, handle, client) = api(dir.path(), std::time::Duration::from_millis(500));
        let a = enrol(&ctl, "a", &[]);
        let old = enrol(&ctl, "old", &[]);
        let away = enrol(&ctl, "away", &[]);
        let prepare = |node: &NodeId, device: &str, force: bool, serial: Option<&str>| {
            let req = PrepareRequest {
                force,
                serial: serial.map(str::to_owned),
                filesystem: Some(Filesystem::Xfs),
            };
            client.prepare_drive(&node.0, device, &req)
        };

        assert_eq!(
            status(prepare(&NodeId("n404".into()), "sdb", false, None)),
            (404, "no node n404 in the fleet".into())
        );
        let (code, msg) = status(prepare(&away, "sdb", false, None));
        assert!(
            code == 409 && msg.contains("is not connected"),
            "{code} {msg}"
        );
        let _ = ctl.fake_connection(&old, 2);
        let (code, msg) = status(prepare(&old, "sdb", false, None));
        assert!(
            code == 409 && msg.contains("speaks protocol 2; drive commands need protocol 3"),
            "{code} {msg}"
        );
        let (a_conn, a_rx) = ctl.fake_connection(&a, 3);
        let (code, msg) = status(prepare(&a, "sdb", false, None));
        assert!(
            code == 409 && msg.contains("has not reported its drives yet"),
            "{code} {msg}"
        );

        let report = DriveReport {
            at: UnixMillis(1000),
            drives: vec![
                drive(
                    "sdb",
                    "WD-1",
                    DriveState::HasData {
                        signatures: vec!["gpt".into(), "ext4".into()],
                    },
                    None,
                ),
                drive("sdc", "S-false", DriveState::Blank, Some(smart(false))),
                drive(
                    "sdd",
                    "S-true",
                    DriveState::AwaitingApproval,
                    Some(smart(true)),
                ),
                drive(
                    "loop0",
                    "L",
                    DriveState::Blank,
                    Some(shoal_proto::SmartOutcome::NoSmart {
                        reason: "loop device has no SMART".into(),
                    }),
                ),
            ],
        };
        ctl.drives.ingest(&a, report, now_ms()).unwrap();
        let listed = client.drives(Some(&a.0)).unwrap();
        assert_eq!(
            listed
                .iter()
                .map(|d| (
                    d.device.as_str(),
                    d.state.as_str(),
                    d.smart.verdict.as_str()
                ))
                .collect::<Vec<_>>(),
            [
                ("sdb", "has-data", "unknown"),
                ("sdc", "blank", "failing"),
                ("sdd", "awaiting-approval", "ok"),
                ("loop0", "blank", "unknown")
            ]
        );
        assert_eq!(status(client.drives(Some("n404"))).0, 404);

        let seen = {
            let _enter = rt.enter();
            fake_agent(ctl.clone(), a.clone(), a_rx, |cmd| {
                match (cmd.device.as_str(), &cmd.action) {
                    ("sdd", DriveAction::Prepare { .. }) => {
                        Some(Err("mkfs.xfs: command not found".into()))
                    }
                    ("sdb", DriveAction::Prepare { .. }) => Some(Ok(
                        "sdb prepared: sdb1 xfs mounted on /var/lib/shoal/drives/u".into(),
                    )),
                    ("sdd", DriveAction::SelfTest(_)) => Some(Ok("short self-test started".into())),
                    _ => None,
                }
            })
        };
        let (code, msg) = status(prepare(&a, "sdx", false, None));
        assert!(
            code == 404 && msg.contains("reports no drive sdx (it reports: sdb, sdc, sdd, loop0)"),
            "{code} {msg}"
        );
        let (code, msg) = status(prepare(&a, "sdb", false, None));
        assert_eq!(code, 409);
        assert_eq!(msg, "refusing to prepare sdb: it holds data (gpt, ext4); to erase it, run again with --force --serial WD-1");
        let (code, msg) = status(prepare(&a, "sdb", true, Some("WD-2")));
        assert!(
            code == 409 && msg.contains("does not match its serial number WD-1"),
            "{code} {msg}"
        );
        assert_eq!(status(prepare(&a, "sdb", true, None)).0, 400);
        let (code, msg) = status(prepare(&a, "sdc", false, None));
        assert!(
            code == 409
                && msg.contains(
                    "its SMART verdict is failing (overall health self-assessment FAILED)"
                ),
            "{code} {msg}"
        );
        assert!(
            seen.lock().unwrap().is_empty(),
            "nothing refused reached the agent"
        );

        let done = prepare(&a, "/dev/sdb", true, Some("WD-1")).unwrap();
        assert_eq!(
            (done.device.as_str(), done.action.as_str()),
            ("sdb", "prepare")
        );
        assert!(done.message.starts_with("sdb prepared"), "{}", done.message);
        assert_eq!(
            seen.lock().unwrap().last().map(|c| c.action.clone()),
            Some(DriveAction::Prepare {
                force_serial: Some("WD-1".into()),
                filesystem: Some(Filesystem::Xfs)
            })
        );
        let (code, msg) = status(prepare(&a, "sdd", false, None));
        assert_eq!(
            (code, msg.as_str()),
            (
                502,
                format!("node {a} could not prepare sdd: mkfs.xfs: command not found").as_str()
            )
        );

        let started = client.self_test_drive(&a.0, "sdd", "short").unwrap();
        assert_eq!(
            (started.action.as_str(), started.message.as_str()),
            ("self-test", "short self-test started")
        );
        assert_eq!(
            seen.lock().unwrap().last().map(|c| c.action.clone()),
            Some(DriveAction::SelfTest(SelfTestKind::Short))
        );
        let (code, msg) = status(client.self_test_drive(&a.0, "loop0", "short"));
        assert!(
            code == 409 && msg.contains("loop0 has no SMART (loop device has no SMART)"),
            "{code} {msg}"
        );
        assert_eq!(status(client.self_test_drive(&a.0, "sdd", "medium")).0, 400);

        // The agent stays silent: the request times out.
        let (code, msg) = status(prepare(&a, "loop0", false, None));
        assert!(
            code == 504 && msg.contains("did not answer the prepare command for loop0"),
            "{code} {msg}"
        );

        // The connection drops while the agent works on it.
        let c = ctl.clone();
        let n = a.clone();
        let dropper = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(150));
            c.end_fake_connection(&n, a_conn);
        });
        let (code, msg) = status(prepare(&a, "loop0", false, None));
        dropper.join().unwrap();
        assert!(
            code == 503 && msg.contains("closed before it answered the prepare command for loop0"),
            "{code} {msg}"
        );
        let (code, msg) = status(prepare(&a, "sdd", false, None));
        assert!(
            code == 409 && msg.contains("is not connected"),
            "{code} {msg}"
        );
        handle.shutdown();
    }
}
