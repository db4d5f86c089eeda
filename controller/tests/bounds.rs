//! Tier-2 tests of the bounds on what nodes and clients send: a real controller on loopback (QUIC +
//! TLS, port 0), a real agent (`shoal_agent::daemon::run`) kept up beside hand-driven clients that
//! send over-limit messages, trickle frames and spam events. Every test checks what the misbehaving
//! client sees, that the controller kept nothing of what it refused, and that the good agent is
//! still served afterwards.

#![allow(clippy::unwrap_used)]

mod common;
use common::{eventually, harness::*};
use std::time::Duration;

use shoal_api::nodes::NodeView;
use shoal_overlay::pki;
use shoal_proto::{
    limits, AgentMsg, Drive, DriveReport, DriveState, EnrolRequest, Inventory, NatMapping,
    NetInterface, NodeId, OverlayHello, RejectCode, UnixMillis, MAX_FRAME_LEN, SUPPORTED,
};

fn inventory(hostname: &str, nics: usize) -> AgentMsg {
    AgentMsg::Inventory(Inventory {
        hostname: hostname.into(),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        cpu_cores: 8,
        nics: (0..nics)
            .map(|i| NetInterface {
                name: format!("veth{i}"),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
}

fn drive(name: &str, model: &str) -> Drive {
    Drive {
        name: name.into(),
        model: Some(model.into()),
        serial: Some(format!("S-{name}")),
        size_bytes: 1 << 40,
        removable: false,
        state: DriveState::Blank,
        smart: None,
        smart_at: None,
    }
}

fn drives(list: Vec<Drive>) -> AgentMsg {
    AgentMsg::Drives(DriveReport {
        at: UnixMillis(1),
        drives: list,
    })
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_messages_are_refused_with_the_reason_and_nothing_of_them_is_kept() {
    let ctl = Ctl::start().await;
    let (agent, good) = ctl.agent_up("bounds-limits-good").await;

    // An enrolled node reports a good inventory, then one with an interface too many.
    let (mut raw, id) = ctl.raw_node("bounds-limits-raw").await;
    raw.send(&inventory("raw-host", 3)).await;
    eventually(PROMPT, "the good inventory is stored", || async {
        ctl.admin
            .node(&id)
            .await
            .inventory
            .filter(|i| i.nics.len() == 3)
            .map(|_| ())
    })
    .await;
    raw.send(&inventory("raw-host-2", limits::MAX_NICS + 1))
        .await;
    let r = raw.next_reject().await;
    assert_eq!(r.code, RejectCode::BadRequest, "{r}");
    assert!(
        r.message.contains("inventory.nics") && r.message.contains(&limits::MAX_NICS.to_string()),
        "the reason names the field and the limit: {r}"
    );
    let reason = raw.expect_protocol_close().await;
    assert!(reason.contains("inventory.nics"), "close reason: {reason}");
    let n = ctl.admin.node(&id).await;
    assert_eq!(
        (n.hostname.as_str(), n.inventory.map(|i| i.nics.len())),
        ("raw-host", Some(3)),
        "the node's good state is kept"
    );

    // A drive report over the drive bound, on a fresh session of the same node.
    let (mut raw, _) = ctl.raw_node("bounds-limits-raw2").await;
    raw.send(&drives(vec![drive("sda", "m"); limits::MAX_DRIVES + 1]))
        .await;
    let r = raw.next_reject().await;
    assert!(
        r.code == RejectCode::BadRequest && r.message.contains("drives.drives"),
        "{r}"
    );

    // Overlay endpoints over the bound.
    let (mut raw, _) = ctl.raw_node("bounds-limits-raw3").await;
    let endpoints = vec!["192.0.2.1:7000".parse().unwrap(); limits::MAX_OVERLAY_ENDPOINTS + 1];
    raw.send(&AgentMsg::Overlay(OverlayHello {
        netmap_version: None,
        local_endpoints: endpoints,
        nat: NatMapping::Unknown,
    }))
    .await;
    let r = raw.next_reject().await;
    assert!(r.message.contains("overlay.local_endpoints"), "{r}");

    // An enrolment whose hostname is over the bound is refused before the token is spent.
    let token = ctl.admin.create_token(Some(1)).await;
    let mut raw = Raw::enrolment(&ctl).await;
    raw.hello(SUPPORTED).await.unwrap();
    let key = pki::generate_key().unwrap();
    let hostname = "h".repeat(limits::MAX_HOSTNAME_LEN + 1);
    raw.send(&AgentMsg::Enrol(EnrolRequest {
        token: token.clone(),
        csr_der: pki::make_csr(&key).unwrap(),
        hostname,
    }))
    .await;
    let r = raw.next_reject().await;
    assert!(
        r.code == RejectCode::BadRequest && r.message.contains("enrol.hostname"),
        "{r}"
    );
    assert_eq!(
        ctl.admin.token_uses(&token).await,
        Some(0),
        "the token was not spent"
    );

    let since = ctl
        .admin
        .node(&NodeId(good.clone()))
        .await
        .last_seen_unix_ms;
    ctl.assert_node_still_served(&good, since).await;
    agent.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_megabyte_frames_do_not_stop_the_good_agent() {
    let ctl = Ctl::start_with(|c| c.hello_timeout = Duration::from_secs(2)).await;
    let (agent, good) = ctl.agent_up("bounds-trickle-good").await;

    // Unauthenticated clients announce a 1 MiB frame and send a byte at a time; an enrolled node
    // does the same after its Hello (no hello deadline protects that one).
    let mut trickling = Vec::new();
    for _ in 0..20 {
        let mut raw = Raw::enrolment(&ctl).await;
        raw.send
            .write_all(&(MAX_FRAME_LEN as u32).to_be_bytes())
            .await
            .unwrap();
        trickling.push(raw);
    }
    let (mut node_raw, _) = ctl.raw_node("bounds-trickle-raw").await;
    node_raw
        .send
        .write_all(&(MAX_FRAME_LEN as u32).to_be_bytes())
        .await
        .unwrap();
    for _ in 0..10 {
        for raw in trickling.iter_mut().chain(std::iter::once(&mut node_raw)) {
            let _ = raw.send.write_all(&[0]).await;
        }
        assert!(
            ctl.admin.node(&NodeId(good.clone())).await.connected,
            "the good agent stays connected meanwhile"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The unauthenticated ones never sent a Hello: closed at the hello deadline.
    for raw in &trickling {
        let reason = raw.expect_protocol_close().await;
        assert!(
            reason.contains("Hello") || reason.contains("control stream"),
            "{reason}"
        );
    }
    let since = ctl
        .admin
        .node(&NodeId(good.clone()))
        .await
        .last_seen_unix_ms;
    ctl.assert_node_still_served(&good, since).await;
    agent.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_flapping_a_drive_does_not_flood_the_event_log() {
    let ctl = Ctl::start().await;
    let (agent, good) = ctl.agent_up("bounds-events-good").await;
    let (mut raw, id) = ctl.raw_node("bounds-events-raw").await;

    let flaps = 200;
    for i in 0..flaps {
        raw.send(&drives(vec![drive("sda", "m"), drive("sdb", "m")]))
            .await;
        raw.send(&drives(vec![drive("sda", "m")])).await;
        if i % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // A last report with a third drive: once it is taken, every flap before it was logged or
    // suppressed.
    raw.send(&drives(vec![drive("sda", "m"), drive("sdc", "m")]))
        .await;
    eventually(
        Duration::from_secs(30),
        "the last drive report is taken",
        || async {
            let list: Vec<shoal_api::drives::DriveView> =
                ctl.admin.get(&format!("/v1/drives?node={id}")).await;
            list.iter().any(|d| d.device == "sdc").then_some(())
        },
    )
    .await;
    assert!(
        raw.conn.close_reason().is_none(),
        "the node's session is not closed for reporting"
    );
    let events = ctl.admin.events().await;
    let of = |kind: &str| events.iter().filter(|e| is_event(e, kind, &id.0)).count();
    // 200 appearances and 200 removals of sdb, plus sda's and sdc's appearances.
    assert!(
        of("drive_appeared") <= 128 + 1,
        "{} drive_appeared events",
        of("drive_appeared")
    );
    assert!(
        of("drive_removed") <= 128 + 1,
        "{} drive_removed events",
        of("drive_removed")
    );
    assert!(
        of("drive_appeared") >= 100,
        "events within the budget are logged: {}",
        of("drive_appeared")
    );
    // The good node's own events are still there and it is still served.
    assert!(
        events.iter().any(|e| is_event(e, "up", &good)),
        "the good node's events are kept"
    );
    let since = ctl
        .admin
        .node(&NodeId(good.clone()))
        .await
        .last_seen_unix_ms;
    ctl.assert_node_still_served(&good, since).await;
    agent.stop().await;
    ctl.stop().await;
}

/// Runs the real shoalctl binary; its output, which must be UTF-8.
fn shoalctl(conf: &std::path::Path, args: &[&str]) -> String {
    let out = shoal_testkit::cmd::output(
        std::process::Command::new(shoalctl_bin())
            .arg("--config")
            .arg(conf)
            .args(args),
    )
    .unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoalctl_prints_agent_supplied_text_without_terminal_controls() {
    let ctl = Ctl::start().await;
    let (agent, good) = ctl.agent_up("bounds-ctl-good").await;
    let (mut raw, id) = ctl.raw_node("bounds-ctl-raw").await;
    let title = "\x1b]0;pwn\x07";
    let clear = "\x1b[2J";
    let hostname = format!("evil{title}{clear}");
    raw.send(&inventory(&hostname, 1)).await;
    raw.send(&drives(vec![drive(
        "sdz",
        &format!("model{clear}\u{202e}gpj.exe"),
    )]))
    .await;
    eventually(PROMPT, "inventory and drives stored", || async {
        let list: Vec<shoal_api::drives::DriveView> =
            ctl.admin.get(&format!("/v1/drives?node={id}")).await;
        (ctl.admin.node(&id).await.hostname == hostname && !list.is_empty()).then_some(())
    })
    .await;
    // The store keeps the text faithfully.
    assert_eq!(
        ctl.admin.node(&id).await.inventory.unwrap().hostname,
        hostname
    );

    let conf = ctl.admin_conf.clone();
    let node = id.0.clone();
    let outputs = tokio::task::spawn_blocking(move || {
        [
            vec!["nodes", "list"],
            vec!["nodes", "show", node.as_str()],
            vec!["drives", "list"],
            vec!["events"],
            vec!["report"],
        ]
        .iter()
        .map(|args| (args.join(" "), shoalctl(&conf, args)))
        .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (args, out) in &outputs {
        assert!(
            !out.contains('\x1b') && !out.contains('\x07') && !out.contains('\u{202e}'),
            "shoalctl {args} printed a control character: {out:?}"
        );
    }
    let text = |args: &str| &outputs.iter().find(|(a, _)| a == args).unwrap().1;
    assert!(
        text("nodes list").contains("evil\\x1b]0;pwn\\x07\\x1b[2J"),
        "{}",
        text("nodes list")
    );
    assert!(
        text(&format!("nodes show {id}")).contains("hostname:      evil\\x1b]0;pwn\\x07"),
        "{}",
        text(&format!("nodes show {id}"))
    );
    assert!(
        text("drives list").contains("model\\x1b[2J\\u{202e}gpj.exe"),
        "{}",
        text("drives list")
    );
    assert!(
        text("events").contains("evil\\x1b]0;pwn"),
        "the drive event quotes the hostname: {}",
        text("events")
    );

    // JSON stays faithful: the same bytes, JSON-escaped.
    let conf = ctl.admin_conf.clone();
    let json =
        tokio::task::spawn_blocking(move || shoalctl(&conf, &["nodes", "list", "-o", "json"]))
            .await
            .unwrap();
    let nodes: Vec<NodeView> = serde_json::from_str(&json).unwrap();
    assert!(nodes.iter().any(|n| n.hostname == hostname), "{json}");
    assert!(json.contains("\\u001b]0;pwn\\u0007"), "{json}");

    let since = ctl
        .admin
        .node(&NodeId(good.clone()))
        .await
        .last_seen_unix_ms;
    ctl.assert_node_still_served(&good, since).await;
    agent.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_arriving_in_pieces_is_taken_whole_while_the_controller_sends_to_the_node() {
    let ctl = Ctl::start().await;
    let (mut raw, id) = ctl.raw_node("bounds-slow-frame").await;
    // A 30 KiB inventory written in 1 KiB pieces; between pieces an operator changes the node's
    // drive policy, so the controller has a message for the node while the frame is half read.
    let frame = shoal_proto::encode_frame(&inventory("slow-host", 1000)).unwrap();
    for (i, piece) in frame.chunks(1024).enumerate() {
        raw.send.write_all(piece).await.unwrap();
        let client = ctl.admin.client.clone();
        let req = shoal_api::drives::SetDrivePolicy {
            node: Some(id.0.clone()),
            selector: None,
            mode: if i % 2 == 0 { "approve" } else { "report" }.into(),
            filesystem: None,
        };
        tokio::task::spawn_blocking(move || client.set_drive_policy(&req).unwrap())
            .await
            .unwrap();
    }
    eventually(
        PROMPT,
        "the slowly sent inventory is stored whole",
        || async {
            ctl.admin
                .node(&id)
                .await
                .inventory
                .filter(|i| i.nics.len() == 1000)
                .map(|_| ())
        },
    )
    .await;
    assert!(
        raw.conn.close_reason().is_none(),
        "the node's connection was closed: {:?}",
        raw.conn.close_reason()
    );
    ctl.stop().await;
}
