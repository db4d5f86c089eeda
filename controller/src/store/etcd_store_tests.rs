//! The [`Store`] on etcd, shared by two "controllers" (two stores on one etcd prefix): what held
//! in one process only must hold across them.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Barrier},
    thread,
};

use shoal_controller_core::registry::{NodeRecord, NodeStatus};
use shoal_proto::{HardwareId, HardwareIdSource, NodeId, UnixMillis};
use shoal_testkit::{require, EtcdCluster};

use super::{etcd_backend::tests::config, *};
use crate::registry::store::NODES;

fn two_stores(cluster: &EtcdCluster) -> (Store, Store, tempfile::TempDir, EtcdConfig) {
    let cfg = config(cluster);
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open_etcd(&cfg, dir.path()).unwrap();
    let b = Store::open_etcd(&cfg, dir.path()).unwrap();
    (a, b, dir, cfg)
}

/// Runs `f(store, thread)` on two threads per store at once.
fn on_both(a: &Store, b: &Store, f: impl Fn(&Store, usize) + Send + Sync + 'static) {
    let f = Arc::new(f);
    let start = Arc::new(Barrier::new(4));
    let handles: Vec<_> = [a.clone(), a.clone(), b.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(i, store)| {
            let (f, start) = (f.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                f(&store, i)
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

fn node(i: usize) -> NodeRecord {
    NodeRecord {
        id: NodeId(format!("n{i:010x}")),
        hardware_id: HardwareId {
            source: HardwareIdSource::DmiUuid,
            value: format!("machine-{i}"),
        },
        hostname: format!("host{i}"),
        labels: BTreeMap::new(),
        agent_version: String::new(),
        enrolled_at: UnixMillis(1),
        status: NodeStatus::Down,
        last_seen: None,
        inventory: None,
        inventory_at: None,
        health: None,
    }
}

fn put_node(store: &Store, n: &NodeRecord) {
    store
        .table(NODES)
        .insert(n.id.0.as_bytes(), encode("node", n).unwrap())
        .unwrap();
}

#[test]
fn events_from_two_controllers_get_unique_consecutive_seqs() {
    let cluster = require!(EtcdCluster::start(1));
    let (a, b, dir, cfg) = two_stores(&cluster);
    const EACH: usize = 15;
    on_both(&a, &b, |store, t| {
        for i in 0..EACH {
            let e = store
                .append_event(
                    EventKind::Registry(RegistryEvent::Up),
                    None,
                    &format!("t{t} e{i}"),
                    UnixMillis(1000),
                )
                .unwrap();
            assert!(e.seq > 0);
        }
    });
    let events = a.events(None, usize::MAX).unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=(4 * EACH) as u64).collect::<Vec<_>>());
    let messages: BTreeSet<&str> = events.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(messages.len(), 4 * EACH, "no event overwrote another");
    assert_eq!(b.events(None, usize::MAX).unwrap(), events);
    // A third controller that opens later goes on from the counter.
    let c = Store::open_etcd(&cfg, dir.path()).unwrap();
    let next = c
        .append_event(
            EventKind::Registry(RegistryEvent::Down),
            None,
            "c",
            UnixMillis(2000),
        )
        .unwrap();
    assert_eq!(next.seq, (4 * EACH) as u64 + 1);
}

#[test]
fn update_node_from_two_controllers_loses_nothing() {
    let cluster = require!(EtcdCluster::start(1));
    let (a, b, _dir, _) = two_stores(&cluster);
    let n = node(1);
    put_node(&a, &n);
    const EACH: usize = 15;
    let id = n.id.clone();
    on_both(&a, &b, move |store, t| {
        for i in 0..EACH {
            store
                .update_node(&id, |rec| {
                    let count: usize = rec
                        .labels
                        .get("count")
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0);
                    rec.labels.insert("count".into(), (count + 1).to_string());
                    rec.labels.insert(format!("t{t}"), i.to_string());
                })
                .unwrap()
                .unwrap();
        }
    });
    let rec = b.node(&n.id).unwrap().unwrap();
    assert_eq!(rec.labels["count"], (4 * EACH).to_string());
    for t in 0..4 {
        assert_eq!(rec.labels[&format!("t{t}")], (EACH - 1).to_string());
    }
}

#[test]
fn two_controllers_never_hand_out_one_overlay_address_twice() {
    let cluster = require!(EtcdCluster::start(1));
    let (a, b, _dir, _) = two_stores(&cluster);
    let subnet: shoal_controller_core::networks::Subnet = "10.77.0.0/24".parse().unwrap();
    a.create_network("lab", subnet, None, UnixMillis(1))
        .unwrap();
    const EACH: usize = 6;
    for i in 0..4 * EACH {
        put_node(&a, &node(i));
    }
    on_both(&a, &b, |store, t| {
        for i in 0..EACH {
            let n = node(t * EACH + i);
            store.add_member("lab", &n.id, UnixMillis(2)).unwrap();
            store.peer_index(&n.id).unwrap();
        }
    });
    let net = a
        .networks()
        .unwrap()
        .into_iter()
        .find(|n| n.name == "lab")
        .unwrap();
    let members = a.members(net.id).unwrap();
    assert_eq!(members.len(), 4 * EACH);
    let addresses: BTreeSet<_> = members.iter().map(|m| m.address).collect();
    assert_eq!(
        addresses.len(),
        4 * EACH,
        "addresses are unique: {members:?}"
    );
    let mut indexes = BTreeSet::new();
    for i in 0..4 * EACH {
        assert!(indexes.insert(b.peer_index(&node(i).id).unwrap()));
    }
    assert_eq!(
        a.next_netmap_epoch().unwrap() + 1,
        b.next_netmap_epoch().unwrap()
    );
}

#[test]
fn two_controllers_never_give_a_wireguard_device_an_address_a_node_or_device_has() {
    let cluster = require!(EtcdCluster::start(1));
    let (a, b, _dir, _) = two_stores(&cluster);
    let subnet: shoal_controller_core::networks::Subnet = "10.78.0.0/24".parse().unwrap();
    a.create_network("lab", subnet, None, UnixMillis(1))
        .unwrap();
    a.add_wg_device(
        "lab",
        "first",
        shoal_wireguard::Key::generate_private().public(),
        Some("gw:51820"),
        UnixMillis(1),
    )
    .unwrap();
    const EACH: usize = 4;
    for i in 0..4 * EACH {
        put_node(&a, &node(i));
    }
    // Nodes join and devices are added at once, through both controllers.
    on_both(&a, &b, |store, t| {
        for i in 0..EACH {
            let n = node(t * EACH + i);
            store.add_member("lab", &n.id, UnixMillis(2)).unwrap();
            let key = shoal_wireguard::Key::generate_private().public();
            store
                .add_wg_device("lab", &format!("d{t}-{i}"), key, None, UnixMillis(2))
                .unwrap();
        }
    });
    let net = b.network_by_name("lab").unwrap().unwrap();
    let members = b.members(net.id).unwrap();
    let devices = b.wg_devices(net.id).unwrap();
    assert_eq!(members.len(), 4 * EACH);
    assert_eq!(devices.len(), 4 * EACH + 1);
    let addresses: BTreeSet<_> = members
        .iter()
        .map(|m| m.address)
        .chain(devices.iter().map(|d| d.address))
        .collect();
    assert_eq!(addresses.len(), 8 * EACH + 1, "addresses are unique");
}
