//! Tier-2 tests of the controller's connection limits: a real controller on loopback (QUIC + TLS,
//! port 0) against clients that hold connections open, never finish enrolling, stall handshakes or
//! stop reading. Each test checks what the hostile client sees, that the refusal is counted (`GET
//! /v1/refusals`), and that a good agent keeps being served.

#![allow(clippy::unwrap_used)]

mod common;
use common::{eventually, harness::*};

use std::{sync::Arc, time::Duration};

use shoal_api::drives::SetDrivePolicy;
use shoal_api::refusals::RefusalsView;
use shoal_controller::connections::close_code;
use shoal_overlay::{pki, tls};
use shoal_proto::SUPPORTED;

async fn refusals(ctl: &Ctl) -> RefusalsView {
    ctl.admin.get("/v1/refusals").await
}

fn closed_with(e: &quinn::ConnectionError, code: u32) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == code.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_capped_and_enrolments_have_a_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Ctl::start_in(dir.path().to_owned(), |c| {
        c.max_unauthenticated = 3;
        c.enrolment_deadline = Duration::from_secs(3);
    })
    .await;
    let (agent, node) = ctl.agent_up("limits-unauth-good").await;
    // An enrolled node, to show that authenticated connections are not counted.
    let key = pki::generate_key().unwrap();
    let token = ctl.admin.create_token(Some(1)).await;
    let raw = eventually(PROMPT, "room for an enrolment", || {
        Raw::try_enrolment_stream(&ctl)
    })
    .await;
    let enrolled = raw
        .enrol_as(&token, &key, "limits-unauth-node")
        .await
        .unwrap();

    // Three connections that say Hello and then nothing: the limit.
    let mut held = Vec::new();
    // (Enrolment connections that just ended may hold their place for a moment: retry until in.)
    for _ in 0..3 {
        held.push(
            eventually(PROMPT, "an enrolment connection within the limit", || {
                Raw::try_enrolment(&ctl)
            })
            .await,
        );
    }
    // The fourth is closed at once, with the code that says "retry later".
    let cfg = tls::enrol_client_config(ctl.ca_sha256, Duration::from_secs(5)).unwrap();
    let (_endpoint, fourth) = connect(ctl.quic, cfg).await.unwrap();
    let why = tokio::time::timeout(PROMPT, fourth.closed())
        .await
        .expect("closed at once");
    assert!(closed_with(&why, close_code::BUSY), "{why:?}");
    assert!(refusals(&ctl).await.connections.unauthenticated_refused >= 1);
    // A node with a certificate still gets in.
    let mut node_conn = Raw::node(&ctl, &enrolled.cert_der, &key).await;
    node_conn
        .hello(SUPPORTED)
        .await
        .expect("authenticated connections are not capped");

    // The held ones reach their deadline and are closed; the room is free again.
    for raw in &held {
        let why = tokio::time::timeout(Duration::from_secs(10), raw.conn.closed())
            .await
            .expect("closed at the deadline");
        assert!(closed_with(&why, close_code::PROTOCOL), "{why:?}");
    }
    assert!(refusals(&ctl).await.connections.enrolment_timeouts >= 3);
    ctl.assert_still_serving("limits-unauth-good", &node).await;
    agent.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_enrolment_slot() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Ctl::start_in(dir.path().to_owned(), |c| {
        c.max_unauthenticated = 10;
        c.max_unauthenticated_per_address = 2;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            eventually(
                PROMPT,
                "an enrolment connection within the address's share",
                || Raw::try_enrolment(&ctl),
            )
            .await,
        );
    }
    let cfg = || tls::enrol_client_config(ctl.ca_sha256, Duration::from_secs(5)).unwrap();
    let (_e, third) = connect(ctl.quic, cfg()).await.unwrap();
    let why = tokio::time::timeout(PROMPT, third.closed())
        .await
        .expect("closed at once");
    assert!(closed_with(&why, close_code::BUSY), "{why:?}");
    // Another machine (another loopback address) still gets in.
    let (endpoint, other) = connect_from("127.0.0.2:0".parse().unwrap(), ctl.quic, cfg())
        .await
        .unwrap();
    let mut other = Raw::open(endpoint, other).await;
    other
        .hello(SUPPORTED)
        .await
        .expect("another address is not held to the first one's share");
    drop(held);
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_clients_must_validate_their_address_and_still_get_in() {
    let dir = tempfile::tempdir().unwrap();
    // Every handshake counts as load: every client gets a Retry first.
    let ctl = Ctl::start_in(dir.path().to_owned(), |c| c.retry_above = 0).await;
    let (agent, node) = ctl.agent_up("limits-retry-good").await;
    let counted = refusals(&ctl).await.connections.retried;
    assert!(
        counted >= 2,
        "the agent's enrolment and node connections were both retried: {counted}"
    );
    ctl.assert_still_serving("limits-retry-good", &node).await;
    agent.stop().await;
    ctl.stop().await;
}

/// A client whose handshake stalls for `stall` inside its own certificate check, on a runtime of
/// its own (the stall blocks the thread), so the controller holds the handshake open meanwhile. The
/// receiver hears once the stall has begun.
fn stalled_handshake(
    ctl: &Ctl,
    stall: Duration,
) -> (std::thread::JoinHandle<()>, std::sync::mpsc::Receiver<()>) {
    #[derive(Debug)]
    struct Stall(
        Duration,
        Arc<rustls::crypto::CryptoProvider>,
        std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    );
    impl rustls::client::danger::ServerCertVerifier for Stall {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            let _ = self.2.lock().unwrap().send(());
            std::thread::sleep(self.0);
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.1.signature_verification_algorithms.supported_schemes()
        }
    }
    let addr = ctl.quic;
    let (began, stalling) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Stall(
                    stall,
                    provider,
                    std::sync::Mutex::new(began),
                )))
                .with_no_client_auth();
            config.alpn_protocols = vec![tls::CONTROL_ALPN.to_vec()];
            let quic = quinn::crypto::rustls::QuicClientConfig::try_from(config).unwrap();
            let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            let connecting = endpoint
                .connect_with(
                    quinn::ClientConfig::new(Arc::new(quic)),
                    addr,
                    tls::controller_server_name(),
                )
                .unwrap();
            let _ = connecting.await;
        });
    });
    (thread, stalling)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_beyond_the_limit_are_refused_until_one_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Ctl::start_in(dir.path().to_owned(), |c| {
        c.max_handshakes = 1;
        c.retry_above = usize::MAX;
    })
    .await;
    let (agent, node) = ctl.agent_up("limits-handshake-good").await;
    let (stalled, stalling) = stalled_handshake(&ctl, Duration::from_secs(8));
    tokio::task::spawn_blocking(move || stalling.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the handshake stalls");
    // While it stalls, the one handshake slot is taken: a new client is refused.
    let refused = eventually(
        Duration::from_secs(6),
        "a handshake is refused at the limit",
        || async {
            let cfg = tls::enrol_client_config(ctl.ca_sha256, Duration::from_secs(5)).unwrap();
            match connect(ctl.quic, cfg).await {
                Err(e) if e.contains("refused") => Some(e),
                other => {
                    eprintln!("not refused: {:?}", other.map(|_| ()));
                    None
                }
            }
        },
    )
    .await;
    eprintln!("at the handshake limit: {refused}");
    assert!(refusals(&ctl).await.connections.handshakes_refused >= 1);
    stalled.join().unwrap();
    // The slot is free again.
    ctl.assert_still_serving("limits-handshake-good", &node)
        .await;
    agent.stop().await;
    ctl.stop().await;
}

/// A node connection whose client never reads its control stream and grants the controller only a
/// tiny flow-control window, so the controller's writes block after a few hundred bytes.
async fn non_reading_node(ctl: &Ctl, machine: &str) -> (Raw, String) {
    let key = pki::generate_key().unwrap();
    let token = ctl.admin.create_token(Some(1)).await;
    let enrolled = Raw::enrolment(ctl)
        .await
        .enrol_as(&token, &key, machine)
        .await
        .unwrap();
    let mut cfg = tls::node_client_config(
        &ctl.ca_der,
        &enrolled.cert_der,
        key_der(&key),
        Duration::from_secs(1),
    )
    .unwrap();
    let mut transport = tls::control_transport(Some(Duration::from_secs(1)));
    transport
        .stream_receive_window(512u32.into())
        .receive_window(2048u32.into());
    cfg.transport_config(Arc::new(transport));
    let (endpoint, conn) = connect(ctl.quic, cfg).await.unwrap();
    let mut raw = Raw::open(endpoint, conn).await;
    raw.hello_as(SUPPORTED, machine).await.expect("welcomed");
    (raw, enrolled.node_id.0)
}

/// Changes the node's drive policy back and forth: each change is a message queued for it.
async fn push_policies(ctl: &Ctl, node: &str, count: usize, until_closed: &quinn::Connection) {
    for i in 0..count {
        if until_closed.close_reason().is_some() {
            return;
        }
        let mode = if i % 2 == 0 { "approve" } else { "report" };
        let req = SetDrivePolicy {
            node: Some(node.to_owned()),
            selector: None,
            mode: mode.into(),
            filesystem: None,
        };
        let client = ctl.admin.client.clone();
        tokio::task::spawn_blocking(move || client.set_drive_policy(&req).unwrap())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_reading_is_cut_off_when_its_queue_fills() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Ctl::start_in(dir.path().to_owned(), |c| {
        c.node_queue_capacity = 8;
        c.send_timeout = Duration::from_secs(120);
    })
    .await;
    let (agent, good) = ctl.agent_up("limits-queue-good").await;
    let (raw, node) = non_reading_node(&ctl, "limits-queue-slow").await;
    push_policies(&ctl, &node, 2000, &raw.conn).await;
    let why = tokio::time::timeout(PROMPT, raw.conn.closed())
        .await
        .expect("the non-reading node is cut off");
    assert!(closed_with(&why, close_code::BUSY), "{why:?}");
    assert!(refusals(&ctl).await.connections.slow_consumers >= 1);
    ctl.assert_still_serving("limits-queue-good", &good).await;
    agent.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_reading_is_cut_off_when_a_write_does_not_finish() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Ctl::start_in(dir.path().to_owned(), |c| {
        c.send_timeout = Duration::from_secs(2)
    })
    .await;
    let (agent, good) = ctl.agent_up("limits-write-good").await;
    let (raw, node) = non_reading_node(&ctl, "limits-write-slow").await;
    // Enough to fill the small window, then stop: the queue stays far from full.
    push_policies(&ctl, &node, 200, &raw.conn).await;
    let why = tokio::time::timeout(Duration::from_secs(10), raw.conn.closed())
        .await
        .expect("cut off at the send timeout");
    assert!(closed_with(&why, close_code::BUSY), "{why:?}");
    assert!(refusals(&ctl).await.connections.slow_consumers >= 1);
    // A node that reads is unaffected: its policy changes arrive.
    ctl.assert_still_serving("limits-write-good", &good).await;
    agent.stop().await;
    ctl.stop().await;
}
