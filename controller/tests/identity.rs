//! Tier-2 tests of node identity: a real controller on loopback (QUIC + TLS, port 0), real agents
//! and hand-driven clients. A node is its key: a valid join token never takes over a node, a live
//! node keeps its session against every claim, certificates are bound to the key the node enrolled
//! with, revocation by serial holds, and an operator's decision is the only way onto an existing
//! record without proof bound to it.

#![allow(clippy::unwrap_used)]

mod common;
use common::{eventually, harness::*};

use std::sync::Arc;

use serde_json::Value;
use shoal_api::{
    events::EventView,
    identity::{CertView, PendingView, ReenrolRequest, RevokeCertRequest, RevokedCertView},
};
use shoal_overlay::{pki, tls};
use shoal_proto::{AgentMsg, ControllerMsg, RejectCode, RenewRequest, RotateKeyRequest, SUPPORTED};

async fn pending(ctl: &Ctl) -> Vec<PendingView> {
    ctl.admin.get("/v1/enrolments/pending").await
}

fn key_print(key: &rcgen::KeyPair) -> String {
    use rcgen::PublicKeyData;
    hex::encode(&pki::sha256(&key.subject_public_key_info())[..8])
}

/// Connects with a node certificate and says Hello; the Welcome, or the Reject.
async fn node_hello(
    ctl: &Ctl,
    cert: &[u8],
    key: &rcgen::KeyPair,
) -> Result<(Raw, shoal_proto::Welcome), shoal_proto::Reject> {
    let mut raw = Raw::node(ctl, cert, key).await;
    let w = raw.hello(SUPPORTED).await?;
    Ok((raw, w))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_with_a_valid_token_gets_no_certificate_for_a_live_node_and_the_node_keeps_its_session(
) {
    let ctl = Ctl::start().await;
    let (agent, node) = ctl.agent_up("id-victim").await;
    let before = last_seq(&ctl.admin.events().await);

    // The impostor knows the victim's hardware id and holds a perfectly valid token.
    let token = ctl.admin.create_token(None).await;
    for _ in 0..5 {
        let key = pki::generate_key().unwrap();
        let refused = Raw::enrolment(&ctl)
            .await
            .enrol_as(&token, &key, "id-victim")
            .await
            .expect_err("no certificate for the impostor");
        assert_eq!(refused.code, RejectCode::IdentityInUse, "{refused}");
        assert!(refused.message.contains(&node), "{}", refused.message);
    }
    assert_eq!(
        ctl.admin.token_uses(&token).await.unwrap(),
        0,
        "refusals spend no use"
    );
    let claims = ctl.admin.events_of("claim_refused", &node).await;
    assert!(!claims.is_empty(), "the claims are logged as events");
    assert!(
        claims[0].message.contains("127.0.0.1"),
        "the event says where the claim came from: {}",
        claims[0].message
    );

    // The victim never lost its session: no down/up, no replacement, still the same node.
    let after: Vec<EventView> = ctl
        .admin
        .events()
        .await
        .into_iter()
        .filter(|e| e.seq > before && about(e, &node))
        .collect();
    assert!(
        after.iter().all(|e| e.kind == "claim_refused"),
        "only refusals happened to the node: {after:?}"
    );
    ctl.assert_still_serving("id-victim", &node).await;
    agent.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_certificate_without_its_key_is_refused() {
    let ctl = Ctl::start().await;
    let (agent, good) = ctl.agent_up("id-stolen-good").await;
    let key = pki::generate_key().unwrap();
    let token = ctl.admin.create_token(Some(1)).await;
    let enrolled = Raw::enrolment(&ctl)
        .await
        .enrol_as(&token, &key, "id-stolen")
        .await
        .unwrap();
    // The thief has the certificate (public: it crosses the wire in every handshake) but not the
    // key.
    let thief = pki::generate_key().unwrap();
    let cfg = stolen_cert_config(&ctl.ca_der, &enrolled.cert_der, &thief);
    match connect(ctl.quic, cfg).await {
        Err(e) => assert!(
            !e.contains("timed out"),
            "the handshake fails, it does not hang: {e}"
        ),
        Ok((_endpoint, conn)) => {
            // TLS 1.3 lets the client finish first; the controller then closes without answering.
            let answer = async {
                let (mut send, mut recv) = conn.open_bi().await?;
                shoal_overlay::send_msg(&mut send, &hello_msg(SUPPORTED, "id-stolen")).await?;
                Ok::<_, anyhow::Error>(shoal_overlay::recv_msg::<ControllerMsg>(&mut recv).await?)
            };
            let answer = tokio::time::timeout(PROMPT, answer)
                .await
                .expect("refused promptly");
            assert!(
                answer.is_err(),
                "a certificate without its key got an answer: {answer:?}"
            );
        }
    }
    // The rightful holder is still welcome.
    let (_raw, w) = node_hello(&ctl, &enrolled.cert_der, &key)
        .await
        .expect("the key's holder connects");
    assert_eq!(w.node_id, Some(enrolled.node_id));
    ctl.assert_still_serving("id-stolen-good", &good).await;
    agent.stop().await;
    ctl.stop().await;
}

/// A client configuration that presents `cert` but signs with `key` (which does not match it):
/// rustls's own builder refuses such a pair, so the resolver hands it over as is.
fn stolen_cert_config(ca_der: &[u8], cert: &[u8], key: &rcgen::KeyPair) -> quinn::ClientConfig {
    #[derive(Debug)]
    struct Stolen(Arc<rustls::sign::CertifiedKey>);
    impl rustls::client::ResolvesClientCert for Stolen {
        fn resolve(
            &self,
            _: &[&[u8]],
            _: &[rustls::SignatureScheme],
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }
        fn has_certs(&self) -> bool {
            true
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let signing = provider
        .key_provider
        .load_private_key(key_der(key))
        .unwrap();
    let certified = rustls::sign::CertifiedKey::new(
        vec![rustls_pki_types::CertificateDer::from(cert.to_vec())],
        signing,
    );
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(ca_der.to_vec()))
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(Stolen(Arc::new(certified))));
    config.alpn_protocols = vec![tls::CONTROL_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(config).unwrap();
    quinn::ClientConfig::new(Arc::new(quic))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_enrolment_reply_is_answered_again_for_the_same_key_without_spending_the_token() {
    let ctl = Ctl::start().await;
    let token = ctl.admin.create_token(Some(1)).await;
    let key = pki::generate_key().unwrap();
    // The first reply "never arrives": the machine retries with the same key and token.
    let first = Raw::enrolment(&ctl)
        .await
        .enrol_as(&token, &key, "id-lost-reply")
        .await
        .unwrap();
    let again = Raw::enrolment(&ctl)
        .await
        .enrol_as(&token, &key, "id-lost-reply")
        .await
        .expect("the same key is answered again");
    assert_eq!(again.node_id, first.node_id);
    assert_ne!(
        pki::cert_info(&again.cert_der).unwrap().serial,
        pki::cert_info(&first.cert_der).unwrap().serial
    );
    assert_eq!(
        ctl.admin.token_uses(&token).await.unwrap(),
        1,
        "one use for one enrolment"
    );
    let enrolled = ctl.admin.events_of("enrolled", &first.node_id.0).await;
    assert_eq!(enrolled.len(), 1, "one enrolment event: {enrolled:?}");
    // Another key cannot ride on the spent token.
    let other = pki::generate_key().unwrap();
    let refused = Raw::enrolment(&ctl)
        .await
        .enrol_as(&token, &other, "id-lost-reply-2")
        .await
        .expect_err("used up");
    assert_eq!(refused.code, RejectCode::TokenUsedUp, "{refused}");
    // Both certificates are the node's and work.
    node_hello(&ctl, &again.cert_der, &key)
        .await
        .expect("the replayed certificate works");
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_without_proof_waits_for_an_operator_who_approves_or_denies_it() {
    let ctl = Ctl::start().await;
    let (k1, k2, k3) = (
        pki::generate_key().unwrap(),
        pki::generate_key().unwrap(),
        pki::generate_key().unwrap(),
    );
    let token = ctl.admin.create_token(None).await;
    let original = Raw::enrolment(&ctl)
        .await
        .enrol_as(&token, &k1, "id-pending")
        .await
        .unwrap();
    let node = original.node_id.0.clone();

    // Offline now; a machine with the same hardware id and a new key claims it with a valid token.
    let refused = Raw::enrolment(&ctl)
        .await
        .enrol_as(&token, &k2, "id-pending")
        .await
        .expect_err("no takeover");
    assert_eq!(refused.code, RejectCode::AwaitingApproval, "{refused}");
    let listed = pending(&ctl).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let request = listed[0].clone();
    assert_eq!(
        (
            request.node.as_str(),
            request.key.as_str(),
            request.state.as_str()
        ),
        (node.as_str(), key_print(&k2).as_str(), "waiting")
    );
    assert!(
        refused.message.contains(&request.id),
        "the agent is told what to ask for: {}",
        refused.message
    );
    // Retries refresh the same request rather than adding new ones.
    Raw::enrolment(&ctl)
        .await
        .enrol_as(&token, &k2, "id-pending")
        .await
        .expect_err("still waiting");
    let listed = pending(&ctl).await;
    assert_eq!((listed.len(), listed[0].attempts), (1, 2), "{listed:?}");
    assert_eq!(
        ctl.admin.events_of("enrolment_pending", &node).await.len(),
        1
    );

    let approved: PendingView = ctl
        .admin
        .post(
            &format!("/v1/enrolments/pending/{}/approve", request.id),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(approved.state, "approved");
    let back = Raw::enrolment(&ctl)
        .await
        .enrol_as(&token, &k2, "id-pending")
        .await
        .expect("approved claim re-enrols");
    assert_eq!(back.node_id.0, node, "onto the same record");
    let view: shoal_api::nodes::NodeView = ctl.admin.get(&format!("/v1/nodes/{node}")).await;
    assert_eq!(
        view.key.as_deref(),
        Some(key_print(&k2).as_str()),
        "the record is bound to the new key"
    );
    assert!(pending(&ctl).await.is_empty(), "an approval is used once");
    // The old key's certificate no longer works.
    let r = node_hello(&ctl, &original.cert_der, &k1)
        .await
        .expect_err("old key refused");
    assert_eq!(r.code, RejectCode::CertificateRefused, "{r}");
    assert!(!ctl
        .admin
        .events_of("certificate_refused", &node)
        .await
        .is_empty());

    // Another claim, denied: refused for good.
    let refused = Raw::enrolment(&ctl)
        .await
        .enrol_as(&token, &k3, "id-pending")
        .await
        .expect_err("waits");
    assert_eq!(refused.code, RejectCode::AwaitingApproval);
    let id = pending(&ctl)
        .await
        .into_iter()
        .find(|p| p.key == key_print(&k3))
        .unwrap()
        .id;
    let denied: PendingView = ctl
        .admin
        .post(
            &format!("/v1/enrolments/pending/{id}/deny"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(denied.state, "denied");
    let refused = Raw::enrolment(&ctl)
        .await
        .enrol_as(&token, &k3, "id-pending")
        .await
        .expect_err("denied");
    assert_eq!(refused.code, RejectCode::NodeRevoked, "{refused}");
    assert!(refused.message.contains("denied"), "{}", refused.message);
    // The rightful key still works.
    node_hello(&ctl, &back.cert_der, &k2)
        .await
        .expect("approved key connects");
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_armed_reenrolment_admits_one_claim_and_never_against_a_live_node() {
    let ctl = Ctl::start().await;
    let token = ctl.admin.create_token(None).await;
    let (k1, k2, k3) = (
        pki::generate_key().unwrap(),
        pki::generate_key().unwrap(),
        pki::generate_key().unwrap(),
    );
    let original = Raw::enrolment(&ctl)
        .await
        .enrol_as(&token, &k1, "id-armed")
        .await
        .unwrap();
    let node = original.node_id.0.clone();

    // While the node is connected, even an armed re-enrolment does not let a claim through.
    let (live, _) = node_hello(&ctl, &original.cert_der, &k1).await.unwrap();
    ctl.admin
        .post_no_content(
            &format!("/v1/nodes/{node}/reenrol"),
            ReenrolRequest {
                ttl_secs: Some(600),
            },
        )
        .await;
    let refused = Raw::enrolment(&ctl)
        .await
        .enrol_as(&token, &k2, "id-armed")
        .await
        .expect_err("node is live");
    assert_eq!(refused.code, RejectCode::IdentityInUse, "{refused}");
    drop(live);
    eventually(PROMPT * 2, "the node's connection is gone", || async {
        (!ctl
            .admin
            .get::<shoal_api::nodes::NodeView>(&format!("/v1/nodes/{node}"))
            .await
            .connected)
            .then_some(())
    })
    .await;

    let back = Raw::enrolment(&ctl)
        .await
        .enrol_as(&token, &k2, "id-armed")
        .await
        .expect("armed re-enrolment admits the claim");
    assert_eq!(back.node_id.0, node);
    let reenrolled = ctl.admin.events_of("reenrolled", &node).await;
    assert!(
        reenrolled
            .last()
            .unwrap()
            .message
            .contains("armed by an operator"),
        "{reenrolled:?}"
    );
    // Used once: the next claim waits for an operator.
    let refused = Raw::enrolment(&ctl)
        .await
        .enrol_as(&token, &k3, "id-armed")
        .await
        .expect_err("grant used up");
    assert_eq!(refused.code, RejectCode::AwaitingApproval, "{refused}");
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_keep_the_key_and_rotations_need_the_old_keys_signature() {
    let ctl = Ctl::start().await;
    let token = ctl.admin.create_token(Some(1)).await;
    let (k1, k2) = (pki::generate_key().unwrap(), pki::generate_key().unwrap());
    let enrolled = Raw::enrolment(&ctl)
        .await
        .enrol_as(&token, &k1, "id-rotate")
        .await
        .unwrap();
    let node = enrolled.node_id.clone();

    // A renewal for another key is refused: a copied certificate cannot be renewed onto the thief's
    // key.
    let (mut raw, _) = node_hello(&ctl, &enrolled.cert_der, &k1).await.unwrap();
    raw.send(&AgentMsg::Renew(RenewRequest {
        csr_der: pki::make_csr(&k2).unwrap(),
    }))
    .await;
    let r = raw
        .recv_until(|m| match m {
            ControllerMsg::Reject(r) => Some(r),
            _ => None,
        })
        .await;
    assert_eq!(r.code, RejectCode::BadRequest, "{r}");

    // A rotation the new key signs for itself proves nothing.
    let csr = pki::make_csr(&k2).unwrap();
    let spki = pki::csr_spki(&csr).unwrap();
    let (mut raw, _) = node_hello(&ctl, &enrolled.cert_der, &k1).await.unwrap();
    let forged = pki::sign_rotation(&k2, &node, &spki).unwrap();
    raw.send(&AgentMsg::RotateKey(RotateKeyRequest {
        csr_der: csr.clone(),
        signature: forged,
    }))
    .await;
    let r = raw
        .recv_until(|m| match m {
            ControllerMsg::Reject(r) => Some(r),
            _ => None,
        })
        .await;
    assert_eq!(r.code, RejectCode::BadRequest, "{r}");

    // Signed by the old key: a certificate for the new key.
    let (mut raw, _) = node_hello(&ctl, &enrolled.cert_der, &k1).await.unwrap();
    let signature = pki::sign_rotation(&k1, &node, &spki).unwrap();
    raw.send(&AgentMsg::RotateKey(RotateKeyRequest {
        csr_der: csr,
        signature,
    }))
    .await;
    let renewed = raw
        .recv_until(|m| match m {
            ControllerMsg::Renewed(r) => Some(r),
            ControllerMsg::Reject(r) => panic!("rotation refused: {r}"),
            _ => None,
        })
        .await;
    assert_eq!(
        pki::cert_info(&renewed.cert_der).unwrap().key_sha256,
        pki::sha256(&spki)
    );
    drop(raw);
    // Until the new key is used both work (a lost reply must not lock the node out); once it is,
    // the old key is refused.
    node_hello(&ctl, &enrolled.cert_der, &k1)
        .await
        .expect("old key still accepted before the new one is used");
    let (_raw, w) = node_hello(&ctl, &renewed.cert_der, &k2)
        .await
        .expect("new key accepted");
    assert_eq!(w.node_id, Some(node.clone()));
    let r = node_hello(&ctl, &enrolled.cert_der, &k1)
        .await
        .expect_err("old key refused after the rotation");
    assert_eq!(r.code, RejectCode::CertificateRefused, "{r}");
    assert!(!ctl.admin.events_of("key_rotated", &node.0).await.is_empty());
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_serial_is_refused_and_a_revoked_current_key_is_rotated_away() {
    let ctl = Ctl::start().await;
    let token = ctl.admin.create_token(Some(1)).await;
    let k1 = pki::generate_key().unwrap();
    let enrolled = Raw::enrolment(&ctl)
        .await
        .enrol_as(&token, &k1, "id-revoke")
        .await
        .unwrap();
    let node = enrolled.node_id.clone();
    // A second certificate for the same key, by renewal.
    let (mut raw, _) = node_hello(&ctl, &enrolled.cert_der, &k1).await.unwrap();
    raw.send(&AgentMsg::Renew(RenewRequest {
        csr_der: pki::make_csr(&k1).unwrap(),
    }))
    .await;
    let second = raw
        .recv_until(|m| match m {
            ControllerMsg::Renewed(r) => Some(r),
            _ => None,
        })
        .await;
    drop(raw);
    let certs: Vec<CertView> = ctl
        .admin
        .get(&format!("/v1/nodes/{}/certificates", node.0))
        .await;
    assert_eq!(certs.len(), 2, "{certs:?}");
    let old_serial = pki::cert_info(&enrolled.cert_der).unwrap().serial;
    assert!(certs
        .iter()
        .any(|c| c.serial == old_serial && c.current_key && c.revoked_at.is_none()));

    // Connected with the second certificate, the first (same key: a copy may be out there) is
    // revoked: the node is asked to rotate at once.
    let (mut live, _) = node_hello(&ctl, &second.cert_der, &k1).await.unwrap();
    let done: RevokedCertView = ctl
        .admin
        .post(
            &format!("/v1/certificates/{old_serial}/revoke"),
            RevokeCertRequest {
                reason: Some("laptop stolen".into()),
            },
        )
        .await;
    assert!(
        done.rotation_required && done.closed_connections == 0,
        "{done:?}"
    );
    live.recv_until(|m| matches!(m, ControllerMsg::RotateKey { .. }).then_some(()))
        .await;
    let k2 = pki::generate_key().unwrap();
    let csr = pki::make_csr(&k2).unwrap();
    let signature = pki::sign_rotation(&k1, &node, &pki::csr_spki(&csr).unwrap()).unwrap();
    live.send(&AgentMsg::RotateKey(RotateKeyRequest {
        csr_der: csr,
        signature,
    }))
    .await;
    let rotated = live
        .recv_until(|m| match m {
            ControllerMsg::Renewed(r) => Some(r),
            _ => None,
        })
        .await;
    drop(live);
    // The revoked serial is refused on every connection from now on.
    let r = node_hello(&ctl, &enrolled.cert_der, &k1)
        .await
        .expect_err("revoked serial");
    assert_eq!(r.code, RejectCode::CertificateRefused, "{r}");
    assert!(r.message.contains("revoked"), "{}", r.message);
    let (_raw, _) = node_hello(&ctl, &rotated.cert_der, &k2)
        .await
        .expect("rotated key works");
    // Revoking the certificate a connection is using closes that connection at once.
    let (mut live, _) = node_hello(&ctl, &rotated.cert_der, &k2).await.unwrap();
    let serial = pki::cert_info(&rotated.cert_der).unwrap().serial;
    let done: RevokedCertView = ctl
        .admin
        .post(
            &format!("/v1/certificates/{serial}/revoke"),
            RevokeCertRequest::default(),
        )
        .await;
    assert_eq!(done.closed_connections, 1, "{done:?}");
    let r = live
        .recv_until(|m| match m {
            ControllerMsg::Reject(r) => Some(r),
            _ => None,
        })
        .await;
    assert_eq!(r.code, RejectCode::CertificateRefused, "{r}");
    let revoked: Vec<Value> = of_kind(&ctl.admin.events().await, "certificate_revoked")
        .map(|e| Value::String(e.message.clone()))
        .collect();
    assert_eq!(revoked.len(), 2, "{revoked:?}");
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_rotates_its_key_on_request_and_stays_the_same_node() {
    let ctl = Ctl::start().await;
    let (agent, node) = ctl.agent_up("id-agent-rotate").await;
    let before: shoal_api::nodes::NodeView = ctl.admin.get(&format!("/v1/nodes/{node}")).await;
    ctl.admin
        .post_no_content(
            &format!("/v1/nodes/{node}/rotate-key"),
            serde_json::json!({}),
        )
        .await;
    let after = eventually(
        AGENT_UP,
        "the agent rotated and reconnected with its new key",
        || async {
            let n: shoal_api::nodes::NodeView = ctl.admin.get(&format!("/v1/nodes/{node}")).await;
            (n.key != before.key && n.connected).then_some(n)
        },
    )
    .await;
    assert_eq!(after.id, node);
    let certs: Vec<CertView> = ctl
        .admin
        .get(&format!("/v1/nodes/{node}/certificates"))
        .await;
    assert!(
        certs.iter().any(|c| c.current_key) && certs.iter().any(|c| !c.current_key),
        "old and new key: {certs:?}"
    );
    ctl.assert_still_serving("id-agent-rotate", &node).await;
    agent.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_whose_only_certificate_is_revoked_asks_to_be_readmitted() {
    let ctl = Ctl::start().await;
    let (agent, node) = ctl.agent_up("id-agent-revoked").await;
    let certs: Vec<CertView> = ctl
        .admin
        .get(&format!("/v1/nodes/{node}/certificates"))
        .await;
    let serial = certs[0].serial.clone();
    let _: RevokedCertView = ctl
        .admin
        .post(
            &format!("/v1/certificates/{serial}/revoke"),
            RevokeCertRequest::default(),
        )
        .await;
    // It drops the refused certificate and enrols again with its token and a new key: that is a
    // claim of its old record without proof, which waits for an operator.
    let request = eventually(AGENT_UP, "the agent's new claim is pending", || async {
        pending(&ctl).await.into_iter().find(|p| p.node == node)
    })
    .await;
    let _: PendingView = ctl
        .admin
        .post(
            &format!("/v1/enrolments/pending/{}/approve", request.id),
            serde_json::json!({}),
        )
        .await;
    let back = ctl.wait_up("id-agent-revoked").await;
    assert_eq!(back, node, "readmitted as the same node");
    agent.stop().await;
    ctl.stop().await;
}
