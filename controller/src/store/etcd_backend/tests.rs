//! The etcd backend against real etcd members ([`EtcdCluster`]); each test skips without etcd.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Barrier,
    },
    time::{Duration, Instant},
};

use shoal_testkit::{eventually, require, EtcdCluster};

use super::*;
use crate::store::backend::{contract, fenced};

static PREFIXES: AtomicU64 = AtomicU64::new(0);

/// A configuration for `cluster` under a prefix no other test uses.
pub(crate) fn config(cluster: &EtcdCluster) -> EtcdConfig {
    EtcdConfig {
        endpoints: cluster.endpoints(),
        prefix: format!(
            "/shoal-test-{}-{}/",
            std::process::id(),
            PREFIXES.fetch_add(1, Ordering::SeqCst)
        ),
        request_timeout: Duration::from_secs(1),
        ..Default::default()
    }
}

fn counter(b: &EtcdBackend) -> u64 {
    let v = b.get("contract_a", b"counter").unwrap().unwrap_or_default();
    u64::from_be_bytes(v.as_slice().try_into().unwrap_or([0; 8]))
}

fn increment(b: &EtcdBackend) -> Result<(), TxFail> {
    b.transact(&["contract_a"], &|tx| {
        let n = match tx.get("contract_a", b"counter")? {
            Some(v) => u64::from_be_bytes(v.as_slice().try_into().expect("8 bytes")),
            None => 0,
        };
        tx.put("contract_a", b"counter", &(n + 1).to_be_bytes())
    })
}

#[test]
fn etcd_keeps_the_storage_contract() {
    let cluster = require!(EtcdCluster::start(1));
    let backend = EtcdBackend::connect(&config(&cluster)).unwrap();
    contract::run(Arc::new(backend));
}

/// Scans longer than a page come back whole, in order, both ways, with bounds.
#[test]
fn scans_page_through_large_tables() {
    let cluster = require!(EtcdCluster::start(1));
    let b = EtcdBackend::connect(&config(&cluster)).unwrap();
    let n = 2500u32;
    let keys: Vec<Vec<u8>> = (0..n).map(|i| i.to_be_bytes().to_vec()).collect();
    b.import(
        "big",
        &keys
            .iter()
            .map(|k| (k.clone(), k.clone()))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let all: Vec<Vec<u8>> = b
        .scan("big", Scan::all())
        .unwrap()
        .map(|e| e.unwrap().0)
        .collect();
    assert_eq!(all, keys);
    let rev: Vec<Vec<u8>> = b
        .scan("big", Scan::all().rev())
        .unwrap()
        .map(|e| e.unwrap().0)
        .collect();
    assert_eq!(rev, keys.iter().rev().cloned().collect::<Vec<_>>());
    let some = b
        .scan(
            "big",
            Scan::between(1000u32.to_be_bytes(), 2200u32.to_be_bytes()).rev(),
        )
        .unwrap()
        .map(|e| e.unwrap().0)
        .collect::<Vec<_>>();
    assert_eq!(some.len(), 1200);
    assert_eq!(some[0], 2199u32.to_be_bytes().to_vec());
    let dump = b.export().unwrap();
    assert_eq!(dump.len(), 1);
    assert_eq!(dump[0].entries.len(), n as usize);
}

/// Two controllers (two backends, each its own connections) on a 3-member cluster increment one
/// counter concurrently: no increment is lost.
#[test]
fn two_controllers_lose_no_increment() {
    let cluster = require!(EtcdCluster::start(3));
    let cfg = config(&cluster);
    let a = Arc::new(EtcdBackend::connect(&cfg).unwrap());
    let b = Arc::new(EtcdBackend::connect(&cfg).unwrap());
    const EACH: u64 = 40;
    let start = Arc::new(Barrier::new(4));
    let handles: Vec<_> = [a.clone(), a.clone(), b.clone(), b.clone()]
        .into_iter()
        .map(|backend| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..EACH {
                    increment(&backend).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(counter(&a), 4 * EACH);
    assert_eq!(counter(&b), 4 * EACH);
}

/// A fence key created by "the leader" with etcdctl-like raw puts through the client.
fn put_raw(b: &EtcdBackend, key: &[u8], value: &[u8]) -> i64 {
    let mut kv = b.client().kv_client();
    let (key, value) = (key.to_vec(), value.to_vec());
    let handle = b.runtime();
    let (tx, rx) = std::sync::mpsc::channel();
    handle.spawn(async move {
        let r = kv.put(key, value, None).await;
        let _ = tx.send(r.map(|r| r.header().map(|h| h.revision()).unwrap_or(0)));
    });
    rx.recv().unwrap().unwrap()
}

fn delete_raw(b: &EtcdBackend, key: &[u8]) {
    let mut kv = b.client().kv_client();
    let key = key.to_vec();
    let (tx, rx) = std::sync::mpsc::channel();
    b.runtime().spawn(async move {
        let _ = tx.send(kv.delete(key, None).await.map(|_| ()));
    });
    rx.recv().unwrap().unwrap()
}

#[test]
fn fenced_writes_land_only_while_the_fence_holds() {
    let cluster = require!(EtcdCluster::start(1));
    let cfg = config(&cluster);
    let b = EtcdBackend::connect(&cfg).unwrap();
    let key = format!("{}election/leader", cfg.prefix).into_bytes();
    let rev = put_raw(&b, &key, b"me");
    let mine = Fence {
        key: key.clone(),
        revision: rev,
    };
    fenced(&mine, || {
        b.put("t", b"k", b"1").unwrap();
        b.write_batch("t", &Batch::deleting([b"k".to_vec()]))
            .unwrap();
        increment(&b).unwrap();
    });
    assert_eq!(b.get("t", b"k").unwrap(), None);
    assert_eq!(counter(&b), 1);

    // Another leader: the key was deleted and created again.
    delete_raw(&b, &key);
    let theirs = put_raw(&b, &key, b"them");
    assert_ne!(theirs, rev);
    fenced(&mine, || {
        let e = b.put("t", b"k", b"2").unwrap_err();
        assert!(
            matches!(&e, StoreError::Fenced(m) if m.contains("nothing was written")),
            "{e}"
        );
        assert!(
            e.to_string().starts_with("this controller no longer leads"),
            "{e}"
        );
        assert!(matches!(
            b.delete("contract_a", b"counter"),
            Err(StoreError::Fenced(_))
        ));
        let mut batch = Batch::default();
        batch.insert(b"k".to_vec(), b"3".to_vec());
        assert!(matches!(
            b.write_batch("t", &batch),
            Err(StoreError::Fenced(_))
        ));
        assert!(matches!(
            increment(&b),
            Err(TxFail::Storage(StoreError::Fenced(_)))
        ));
    });
    assert_eq!(b.get("t", b"k").unwrap(), None, "nothing written");
    assert_eq!(counter(&b), 1, "nothing written");
    assert_eq!(current_fence(), None, "the fence ends with fenced()");

    // The fence key gone altogether.
    delete_raw(&b, &key);
    let gone = fenced(
        &Fence {
            key: key.clone(),
            revision: theirs,
        },
        || b.put("t", b"k", b"4"),
    );
    assert!(
        matches!(&gone, Err(StoreError::Fenced(m)) if m.contains("is gone")),
        "{gone:?}"
    );
    // Unfenced writes are not affected.
    b.put("t", b"k", b"5").unwrap();
}

/// Quorum lost (two of three members killed): reads still answer, writes fail fast with a clear
/// message, and once the members are back writes succeed again on the same backend.
#[test]
fn quorum_loss_keeps_reads_refuses_writes_and_recovers() {
    let mut cluster = require!(EtcdCluster::start(3));
    let cfg = config(&cluster);
    let b = EtcdBackend::connect(&cfg).unwrap();
    b.put("t", b"k", b"before").unwrap();
    // A linearizable read through member 0 alone returns once member 0 has applied the write, so
    // the member that stays up holds it (a commit needs only two of three members).
    let only_0 = EtcdBackend::connect(&EtcdConfig {
        endpoints: vec![cluster.endpoint(0)],
        ..cfg.clone()
    })
    .unwrap();
    assert_eq!(
        only_0.get("t", b"k").unwrap().as_deref(),
        Some(&b"before"[..])
    );
    drop(only_0);
    cluster.kill(1);
    cluster.kill(2);

    let first = Instant::now();
    let e = eventually(
        Duration::from_secs(10),
        "a write refused for lost quorum",
        || match b.put("t", b"w", b"x") {
            Err(e @ StoreError::Unavailable(_)) => Ok(e),
            other => anyhow::bail!("write: {other:?}"),
        },
    )
    .unwrap();
    eprintln!("first refusal after {:?}: {e}", first.elapsed());
    let msg = e.to_string();
    assert!(msg.starts_with("etcd unavailable at "), "{msg}");
    assert!(
        msg.contains("writes are refused until quorum returns"),
        "{msg}"
    );
    assert!(msg.contains(&cluster.endpoint(0)), "{msg}");

    // Within QUORUM_LOST_FOR of that refusal, writes do not wait for etcd.
    let t = Instant::now();
    let put = b.put("t", b"w", b"y");
    assert!(matches!(put, Err(StoreError::Unavailable(_))), "{put:?}");
    let inc = increment(&b);
    assert!(
        matches!(inc, Err(TxFail::Storage(StoreError::Unavailable(_)))),
        "{inc:?}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "writes fail fast: {:?}",
        t.elapsed()
    );

    let t = Instant::now();
    assert_eq!(b.get("t", b"k").unwrap().as_deref(), Some(&b"before"[..]));
    let scanned = b.scan("t", Scan::all()).unwrap().count();
    assert!(scanned >= 1);
    eprintln!("stale read and scan took {:?}", t.elapsed());

    cluster.restart(1).unwrap();
    cluster.restart(2).unwrap();
    let t = Instant::now();
    eventually(Duration::from_secs(15), "writes succeed again", || {
        b.put("t", b"w", b"after").map_err(anyhow::Error::from)
    })
    .unwrap();
    eprintln!("writes back {:?} after the members restarted", t.elapsed());
    assert_eq!(b.get("t", b"w").unwrap().as_deref(), Some(&b"after"[..]));
}

/// The backend works from inside a current-thread tokio runtime and from a worker of a
/// multi-thread one (it never blocks on a runtime it is called from).
#[test]
fn works_inside_other_runtimes() {
    let cluster = require!(EtcdCluster::start(1));
    let b = Arc::new(EtcdBackend::connect(&config(&cluster)).unwrap());
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    current.block_on(async {
        b.put("t", b"a", b"1").unwrap();
        assert_eq!(b.get("t", b"a").unwrap().as_deref(), Some(&b"1"[..]));
    });
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let b2 = b.clone();
    multi
        .block_on(async move {
            tokio::spawn(async move {
                increment(&b2).unwrap();
                assert_eq!(counter(&b2), 1);
            })
            .await
        })
        .unwrap();
    // Connecting inside a runtime works too, and dropping the backend there does not panic.
    let cfg = config(&cluster);
    current.block_on(async move {
        let inner = EtcdBackend::connect(&cfg).unwrap();
        inner.put("t", b"b", b"2").unwrap();
        drop(inner);
    });
}

/// Called from a `#[tokio::test]` (a current-thread runtime), blocking calls still answer: the
/// requests run on the backend's own runtime thread.
#[tokio::test]
async fn works_from_a_current_thread_tokio_test() {
    let cluster = require!(EtcdCluster::start(1));
    let b = EtcdBackend::connect(&config(&cluster)).unwrap();
    b.put("t", b"k", b"v").unwrap();
    increment(&b).unwrap();
    assert_eq!(b.scan("t", Scan::all()).unwrap().count(), 1);
    assert_eq!(counter(&b), 1);
}
