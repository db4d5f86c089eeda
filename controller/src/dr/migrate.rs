//! `shoal-controller migrate`: a stopped controller's sled store copied into etcd, for the move to
//! several controllers sharing one etcd cluster.
//!
//! The controller must be stopped: it holds sled's lock, so opening the store fails clearly while
//! it runs. The etcd prefix must be empty (a second migration would mix two stores); every table is
//! copied ([`Backend::export`] → [`Backend::import`]) and then read back from etcd and compared
//! table by table (entry count and a SHA-256 over the entries). The data dir is left as it was;
//! its CA and admin credential stay where they are.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{
    etcd::EtcdConfig,
    store::{Backend, EtcdBackend, SledBackend, StoreError, TableDump},
};

/// Why a migration did not happen, or did not verify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The data dir has no store.
    #[error("{0} holds no store (is it a controller's data dir?)")]
    NoStore(PathBuf),
    /// The etcd prefix already holds data.
    #[error(
        "etcd at {endpoints} already holds data under {prefix}: migrating would mix two stores. \
         To start over, delete it: ETCDCTL_API=3 etcdctl --endpoints {endpoints} del --prefix {prefix}"
    )]
    NotEmpty {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// The prefix.
        prefix: String,
    },
    /// Reading the sled store or writing etcd failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// What etcd holds after the copy differs from the sled store.
    #[error("verification failed: {0}; etcd holds a partial copy under the prefix, delete it before trying again")]
    Mismatch(String),
}

/// One table as copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSummary {
    /// The table.
    pub name: String,
    /// Its entries.
    pub entries: usize,
    /// SHA-256 over its entries (each key and value length-prefixed), hex.
    pub sha256: String,
}

/// What a migration moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// Every table that held data, by name, as verified in etcd.
    pub tables: Vec<TableSummary>,
}

impl MigrateReport {
    /// Entries over all tables.
    pub fn entries(&self) -> usize {
        self.tables.iter().map(|t| t.entries).sum()
    }
}

fn summarise(dump: &[TableDump]) -> Vec<TableSummary> {
    dump.iter()
        .map(|t| {
            let mut h = Sha256::new();
            for (k, v) in &t.entries {
                h.update((k.len() as u64).to_be_bytes());
                h.update(k);
                h.update((v.len() as u64).to_be_bytes());
                h.update(v);
            }
            TableSummary {
                name: t.name.clone(),
                entries: t.entries.len(),
                sha256: hex::encode(h.finalize()),
            }
        })
        .collect()
}

/// Copies the sled store of the stopped controller in `data_dir` into the etcd cluster `etcd`
/// names, and verifies the copy.
pub fn migrate_to_etcd(data_dir: &Path, etcd: &EtcdConfig) -> Result<MigrateReport, MigrateError> {
    let store_dir = data_dir.join("store");
    if !store_dir.join("db").is_file() {
        return Err(MigrateError::NoStore(data_dir.to_owned()));
    }
    let sled = SledBackend::open(&store_dir)?;
    let target = EtcdBackend::connect(etcd)?;
    if !target.is_empty()? {
        return Err(MigrateError::NotEmpty {
            endpoints: etcd.endpoints_text(),
            prefix: etcd.prefix.clone(),
        });
    }
    let dump = sled.export()?;
    for table in &dump {
        target.import(&table.name, &table.entries)?;
        tracing::info!(table = %table.name, entries = table.entries.len(), "table copied to etcd");
    }
    let want = summarise(&dump);
    let got = summarise(&target.export()?);
    if want != got {
        let mut diffs = Vec::new();
        for w in &want {
            match got.iter().find(|g| g.name == w.name) {
                None => diffs.push(format!("table {} is missing", w.name)),
                Some(g) if g != w => diffs.push(format!(
                    "table {}: {} entries in sled, {} in etcd, or different contents",
                    w.name, w.entries, g.entries
                )),
                Some(_) => {}
            }
        }
        for g in &got {
            if !want.iter().any(|w| w.name == g.name) {
                diffs.push(format!("table {} is in etcd only", g.name));
            }
        }
        return Err(MigrateError::Mismatch(diffs.join("; ")));
    }
    Ok(MigrateReport { tables: got })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use shoal_controller_core::registry::TokenRecord;
    use shoal_testkit::{require, EtcdCluster};

    use super::*;
    use crate::store::{EventKind, RegistryEvent, Store};

    #[test]
    fn a_sled_store_moves_to_etcd_whole_and_only_once() {
        let cluster = require!(EtcdCluster::start(1));
        let dir = tempfile::tempdir().unwrap();
        let token = TokenRecord {
            id: "t1".into(),
            secret_sha256: [7; 32],
            created_at: shoal_proto::UnixMillis(5),
            expires_at: None,
            max_uses: None,
            uses: 0,
            revoked_at: None,
            labels: Default::default(),
        };
        {
            let store = Store::open(&dir.path().join("store")).unwrap();
            store.put_meta("ca_cert", b"cert").unwrap();
            store.create_token(&token).unwrap();
            for i in 0..30 {
                store
                    .append_event(
                        EventKind::Registry(RegistryEvent::Up),
                        None,
                        &format!("e{i}"),
                        shoal_proto::UnixMillis(i),
                    )
                    .unwrap();
            }
            // A running controller holds the lock: migrating fails clearly.
            let config = crate::store::test_etcd_config(&cluster);
            let err = migrate_to_etcd(dir.path(), &config).unwrap_err();
            assert!(
                err.to_string().contains("locked by another process"),
                "{err}"
            );
        }
        let config = crate::store::test_etcd_config(&cluster);
        let report = migrate_to_etcd(dir.path(), &config).unwrap();
        assert!(report
            .tables
            .iter()
            .any(|t| t.name == "event_log" && t.entries == 31));
        let on_etcd = Store::open_etcd(&config, dir.path()).unwrap();
        assert_eq!(
            on_etcd.get_meta("ca_cert").unwrap().as_deref(),
            Some(&b"cert"[..])
        );
        assert_eq!(on_etcd.tokens().unwrap(), vec![token]);
        let events = on_etcd.events(None, usize::MAX).unwrap();
        assert_eq!(events.len(), 31);
        let next = on_etcd
            .append_event(
                EventKind::Registry(RegistryEvent::Down),
                None,
                "after",
                shoal_proto::UnixMillis(99),
            )
            .unwrap();
        assert_eq!(next.seq, events.last().unwrap().seq + 1);

        let again = migrate_to_etcd(dir.path(), &config).unwrap_err();
        assert!(matches!(again, MigrateError::NotEmpty { .. }), "{again}");
        assert!(again.to_string().contains("etcdctl"), "{again}");
    }
}
