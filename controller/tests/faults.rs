//! Tier-2 fault tests: a real controller on loopback (QUIC + TLS, port 0) faced with misbehaving
//! clients, bad requests and a full disk. Every test checks what the misbehaving peer sees, and
//! that the controller keeps serving a well-behaved agent afterwards.

#![allow(clippy::unwrap_used)]

mod common;
use common::{consistently, eventually, harness::*};
use shoal_testkit::{require, Tmpfs};
use std::time::Duration;

use shoal_agent::daemon;
use shoal_controller::{registry::ca::Ca, server};
use shoal_overlay::{pki, recv_msg, send_msg, tls};
use shoal_proto::{
    AgentMsg, ControllerMsg, EnrolRequest, NodeId, RejectCode, RenewRequest, VersionRange,
    MAX_FRAME_LEN, SUPPORTED,
};

// ---------------------------------------------------------------------------------------------
// Malformed frames
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_control_stream_closes_only_that_connection() {
    let ctl = Ctl::start().await;
    let (agent, node) = ctl.agent_up("faults-garbage-good").await;

    // A well-sized frame whose body is not a message.
    let mut raw = Raw::enrolment(&ctl).await;
    raw.send
        .write_all(&[0, 0, 0, 6, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa])
        .await
        .unwrap();
    let reason = raw.expect_protocol_close().await;
    assert!(reason.contains("bad frame"), "close reason: {reason}");

    // Text where a frame header belongs (someone pointing an HTTP client at the port).
    let mut raw = Raw::enrolment(&ctl).await;
    raw.send
        .write_all(b"GET / HTTP/1.1\r\nHost: controller\r\n\r\n")
        .await
        .unwrap();
    let reason = raw.expect_protocol_close().await;
    assert!(reason.contains("bad frame"), "close reason: {reason}");

    ctl.assert_still_serving("faults-garbage-good", &node).await;
    agent.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_frame_closes_the_connection() {
    let ctl = Ctl::start().await;
    let (agent, node) = ctl.agent_up("faults-trunc-good").await;

    let mut raw = Raw::enrolment(&ctl).await;
    let mut bytes = 100u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[7u8; 10]);
    raw.send.write_all(&bytes).await.unwrap();
    raw.send.finish().unwrap();
    let reason = raw.expect_protocol_close().await;
    assert!(reason.contains("ended mid-frame"), "close reason: {reason}");

    ctl.assert_still_serving("faults-trunc-good", &node).await;
    agent.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_header_closes_at_once_without_waiting_for_the_body() {
    let ctl = Ctl::start().await;
    let (agent, node) = ctl.agent_up("faults-huge-good").await;

    for announced in [MAX_FRAME_LEN as u32 + 1, u32::MAX] {
        let mut raw = Raw::enrolment(&ctl).await;
        // Only the header: the stream stays open and no body follows. Were the controller waiting
        // for the body, the connection would stay open until the hello timeout (10 s), past PROMPT.
        raw.send.write_all(&announced.to_be_bytes()).await.unwrap();
        let started = std::time::Instant::now();
        let reason = raw.expect_protocol_close().await;
        assert!(reason.contains("exceeds"), "close reason: {reason}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "closed only after {:?}",
            started.elapsed()
        );
    }

    ctl.assert_still_serving("faults-huge-good", &node).await;
    agent.stop().await;
    ctl.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Protocol
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_versions_newer_only_rejected_overlapping_accepted() {
    let ctl = Ctl::start().await;
    let (agent, node) = ctl.agent_up("faults-version-good").await;

    // An agent that only speaks versions newer than the controller's.
    let mut raw = Raw::enrolment(&ctl).await;
    let too_new = VersionRange {
        min: SUPPORTED.max + 1,
        max: SUPPORTED.max + 3,
    };
    let reject = raw
        .hello(too_new)
        .await
        .expect_err("a newer-only agent is refused");
    assert_eq!(reject.code, RejectCode::Version, "{reject}");
    // The agent prints this: it must tell the operator that it is the controller that is too old.
    assert!(
        reject.message.contains("upgrade the controller"),
        "{}",
        reject.message
    );
    raw.closed().await;

    // And the other way round: an agent that only speaks versions older than the controller's.
    if SUPPORTED.min > 0 {
        let mut raw = Raw::enrolment(&ctl).await;
        let too_old = VersionRange {
            min: 0,
            max: SUPPORTED.min - 1,
        };
        let reject = raw
            .hello(too_old)
            .await
            .expect_err("an older-only agent is refused");
        assert_eq!(reject.code, RejectCode::Version, "{reject}");
        assert!(
            reject.message.contains("upgrade the agent"),
            "{}",
            reject.message
        );
        raw.closed().await;
    }

    // A newer agent that still speaks the controller's newest version is accepted at that version.
    let mut raw = Raw::enrolment(&ctl).await;
    let newer = VersionRange {
        min: SUPPORTED.max,
        max: SUPPORTED.max + 5,
    };
    let welcome = raw
        .hello(newer)
        .await
        .expect("a newer agent that overlaps is welcomed");
    assert_eq!(welcome.protocol, SUPPORTED.max);
    assert_eq!(welcome.node_id, None);

    ctl.assert_still_serving("faults-version-good", &node).await;
    agent.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_on_unauthenticated_connections_are_rejected() {
    let ctl = Ctl::start().await;
    let (agent, node) = ctl.agent_up("faults-order-good").await;

    // Inventory before Hello.
    let mut raw = Raw::enrolment(&ctl).await;
    raw.send(&AgentMsg::Inventory(Default::default())).await;
    let r = raw.expect_reject().await;
    assert_eq!(r.code, RejectCode::Protocol, "{r}");
    assert!(r.message.contains("Hello"), "{r}");
    raw.closed().await;

    // Health on a connection without a node certificate, after a good Hello.
    let mut raw = Raw::enrolment(&ctl).await;
    raw.hello(SUPPORTED).await.unwrap();
    raw.send(&AgentMsg::Health(Default::default())).await;
    let r = raw.expect_reject().await;
    assert_eq!(r.code, RejectCode::Protocol, "{r}");
    assert!(r.message.contains("Enrol"), "{r}");
    raw.closed().await;

    // Renew without a certificate.
    let mut raw = Raw::enrolment(&ctl).await;
    raw.hello(SUPPORTED).await.unwrap();
    let key = pki::generate_key().unwrap();
    raw.send(&AgentMsg::Renew(RenewRequest {
        csr_der: pki::make_csr(&key).unwrap(),
    }))
    .await;
    assert_eq!(raw.expect_reject().await.code, RejectCode::Protocol);

    ctl.assert_still_serving("faults-order-good", &node).await;
    agent.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_csr_is_refused_without_spending_the_token() {
    let ctl = Ctl::start().await;
    let token = ctl.admin.create_token(Some(1)).await;

    let mut raw = Raw::enrolment(&ctl).await;
    raw.hello(SUPPORTED).await.unwrap();
    raw.send(&AgentMsg::Enrol(EnrolRequest {
        token: token.clone(),
        csr_der: vec![0x30, 0x03, 1, 2, 3],
        hostname: "x".into(),
    }))
    .await;
    let r = raw.expect_reject().await;
    assert_eq!(r.code, RejectCode::BadRequest, "{r}");
    assert!(r.message.contains("signing request"), "{r}");
    raw.closed().await;

    let id = token.split('.').nth(1).unwrap().to_owned();
    let t = ctl
        .admin
        .tokens()
        .await
        .into_iter()
        .find(|t| t.id == id)
        .unwrap();
    assert_eq!((t.uses, t.state.as_str()), (0, "valid"), "{t:?}");
    assert!(
        ctl.admin.nodes().await.is_empty(),
        "a refused enrolment left a node behind"
    );

    // The single use is still there for a real agent.
    let agent = Agent::start(ctl.quic, "faults-csr-good", token);
    let node = ctl.wait_up("faults-csr-good").await;
    let t = ctl
        .admin
        .tokens()
        .await
        .into_iter()
        .find(|t| t.id == id)
        .unwrap();
    assert_eq!((t.uses, t.state.as_str()), (1, "used_up"), "{t:?}");

    ctl.assert_still_serving("faults-csr-good", &node).await;
    agent.stop().await;
    ctl.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_is_refused() {
    let ctl = Ctl::start().await;
    let (agent, node) = ctl.agent_up("faults-otherca-good").await;

    // A node certificate for the good node's id, signed by some other fleet's CA.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Ca::load_or_create(other_dir.path()).unwrap();
    let key = pki::generate_key().unwrap();
    let (cert, _) = other
        .issue_node_cert(
            &pki::make_csr(&key).unwrap(),
            &NodeId(node.clone()),
            server::now_ms(),
            Duration::from_secs(3600),
        )
        .unwrap();
    let cfg =
        tls::node_client_config(&ctl.ca_der, &cert, key_der(&key), Duration::from_secs(5)).unwrap();
    match connect(ctl.quic, cfg).await {
        Err(e) => {
            eprintln!("foreign certificate: handshake failed: {e}");
            assert!(
                !e.contains("timed out"),
                "handshake should fail, not hang: {e}"
            );
        }
        Ok((_endpoint, conn)) => {
            // TLS 1.3: the client may finish its side before the server has checked the client
            // certificate. The controller must then close without ever answering.
            let answer = async {
                let (mut send, mut recv) = conn.open_bi().await?;
                send_msg(&mut send, &hello_msg(SUPPORTED, "faults-impostor")).await?;
                Ok::<_, anyhow::Error>(recv_msg::<ControllerMsg>(&mut recv).await?)
            };
            let answer = tokio::time::timeout(PROMPT, answer)
                .await
                .expect("refused promptly");
            assert!(
                answer.is_err(),
                "a foreign certificate got an answer: {answer:?}"
            );
            let why = tokio::time::timeout(PROMPT, conn.closed()).await.unwrap();
            eprintln!("foreign certificate: closed after the client's handshake: {why}");
            assert!(
                matches!(
                    why,
                    quinn::ConnectionError::TransportError(_)
                        | quinn::ConnectionError::ConnectionClosed(_)
                ),
                "expected a TLS failure, got {why:?}"
            );
        }
    }

    ctl.assert_still_serving("faults-otherca-good", &node).await;
    agent.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_issues_a_fresh_certificate_for_the_same_node() {
    let ttl = Duration::from_secs(90);
    let dir = tempfile::tempdir().unwrap();
    let ctl = Ctl::start_in(dir.path().to_owned(), |c| c.cert_ttl = ttl).await;
    let (agent, good) = ctl.agent_up("faults-renew-good").await;

    let key = pki::generate_key().unwrap();
    let token = ctl.admin.create_token(Some(1)).await;
    let enrolled = Raw::enrolment(&ctl)
        .await
        .enrol(&token, &key)
        .await
        .expect("raw enrolment");
    assert_eq!(
        pki::cert_info(&enrolled.cert_der).unwrap().node_id,
        enrolled.node_id
    );

    let mut raw = Raw::node(&ctl, &enrolled.cert_der, &key).await;
    let welcome = raw
        .hello(SUPPORTED)
        .await
        .expect("node connection welcomed");
    assert_eq!(welcome.node_id.as_ref(), Some(&enrolled.node_id));
    // A protocol-3 node gets its drive policy right after Welcome: the default, with no policy set.
    match raw.recv().await {
        Ok(Some(ControllerMsg::DrivePolicy(p))) => {
            assert_eq!(p, shoal_proto::DrivePolicy::default())
        }
        other => panic!("expected DrivePolicy, got {other:?}"),
    }
    raw.send(&AgentMsg::Renew(RenewRequest {
        csr_der: pki::make_csr(&key).unwrap(),
    }))
    .await;
    let renewed = match raw.recv().await {
        Ok(Some(ControllerMsg::Renewed(r))) => r,
        other => panic!("expected Renewed, got {other:?}"),
    };
    let info = pki::cert_info(&renewed.cert_der).unwrap();
    assert_eq!(info.node_id, enrolled.node_id);
    assert_ne!(
        info.serial,
        pki::cert_info(&enrolled.cert_der).unwrap().serial,
        "a new certificate"
    );
    let now = server::now_ms().0;
    assert!(
        renewed.not_after.0 > now + 60_000
            && renewed.not_after.0 <= now + ttl.as_millis() as u64 + 1_000,
        "not_after {} is not about {ttl:?} from now ({now})",
        renewed.not_after.0
    );
    assert_eq!(info.not_after_unix as u64, renewed.not_after.0 / 1000);
    // A bad CSR on renewal is a BadRequest, not a crash.
    raw.send(&AgentMsg::Renew(RenewRequest {
        csr_der: vec![1, 2, 3],
    }))
    .await;
    assert_eq!(raw.expect_reject().await.code, RejectCode::BadRequest);
    drop(raw);

    // The renewed certificate authenticates as the same node.
    let mut raw = Raw::node(&ctl, &renewed.cert_der, &key).await;
    let welcome = raw
        .hello(SUPPORTED)
        .await
        .expect("renewed certificate welcomed");
    assert_eq!(welcome.node_id.as_ref(), Some(&enrolled.node_id));
    eventually(PROMPT, "renewed node listed as connected", || async {
        ctl.admin
            .nodes()
            .await
            .into_iter()
            .find(|n| n.id == enrolled.node_id.0 && n.connected)
            .map(|_| ())
    })
    .await;

    ctl.assert_still_serving("faults-renew-good", &good).await;
    agent.stop().await;
    ctl.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Full disk
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_refuses_enrolment_transiently_and_recovers() {
    // Skips without permission to mount, or fails where tests must run (the rule).
    let fs = require!(Tmpfs::new("40m"));
    let data = fs.path().join("data");
    let ctl = Ctl::start_in(data.clone(), |_| {}).await;
    let (agent, node) = ctl.agent_up("faults-disk-good").await;
    let token = ctl.admin.create_token(None).await;

    // Leave less than the store's 8 MiB reserve.
    let filler_path = fs.fill(4 * 1024 * 1024).unwrap();
    let free = fs.free_bytes().unwrap();
    assert!(free < 8 * 1024 * 1024, "free: {free}");

    // What an enrolling agent sees.
    let key = pki::generate_key().unwrap();
    let r = Raw::enrolment(&ctl)
        .await
        .enrol(&token, &key)
        .await
        .expect_err("no enrolment on a full disk");
    assert_eq!(r.code, RejectCode::Unavailable, "{r}");
    assert!(r.code.is_transient());
    assert!(
        r.message.contains("disk full") && r.message.contains("space"),
        "{r}"
    );

    // A real agent meanwhile keeps retrying instead of giving up.
    let late = Agent::start(ctl.quic, "faults-disk-late", token);
    // Several retries at 100..500 ms backoff.
    consistently(
        Duration::from_millis(1500),
        "the late agent neither enrols on a full disk nor gives up on a transient refusal",
        || async {
            ctl.admin
                .node_by_machine("faults-disk-late")
                .await
                .is_none()
                && !late.task.as_ref().unwrap().is_finished()
        },
    )
    .await;
    // The fleet stays visible and the enrolled node stays listed.
    let listed = ctl.admin.nodes().await;
    assert!(
        listed.iter().any(|n| n.id == node),
        "enrolled node not listed: {listed:?}"
    );

    std::fs::remove_file(&filler_path).unwrap();
    let late_node = ctl.wait_up("faults-disk-late").await;
    assert_ne!(late_node, node);

    ctl.assert_still_serving("faults-disk-good", &node).await;
    late.stop().await;
    agent.stop().await;
    ctl.stop().await;
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_for_another_controller_makes_the_agent_stop_with_a_clear_error() {
    let ctl = Ctl::start().await;
    let (good, node) = ctl.agent_up("good").await;
    // A well-formed token whose CA hash names some other fleet's CA.
    let token: shoal_proto::JoinToken = ctl.admin.create_token(None).await.parse().unwrap();
    let foreign = shoal_proto::JoinToken {
        ca_sha256: [0x5a; 32],
        ..token
    };
    let mut agent = Agent::start(ctl.quic, "stranger", foreign.to_string());
    let task = agent.task.take().unwrap();
    let result = tokio::time::timeout(AGENT_UP, task)
        .await
        .expect("agent gives up promptly")
        .unwrap();
    match result {
        Err(daemon::AgentError::WrongController(msg)) => assert!(msg.contains("CA"), "{msg}"),
        other => panic!("expected WrongController, got {other:?}"),
    }
    assert!(ctl.admin.node_by_machine("stranger").await.is_none());
    ctl.assert_still_serving("good", &node).await;
    good.stop().await;
    ctl.stop().await;
}
