//! Fleet set-up for `shoal-metrics-bench` (not an API: hidden from the docs).

use std::path::Path;

use shoal_controller_core::registry::TokenRecord;
use shoal_proto::{HardwareId, HardwareIdSource, UnixMillis};

use crate::{registry::store::EnrolParams, server::now_ms, store::Store};

/// Why the bench's fleet could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The data dir could not be made.
    #[error("data dir: {0}")]
    Io(#[from] std::io::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// An enrolment was refused.
    #[error("enrolling {0}: {1}")]
    Enrol(String, String),
}

/// Enrols `nodes` nodes (one token, the registry's own enrolment transaction) into the embedded
/// store of the controller data dir `data`, as a controller would.
pub fn enrol_nodes(data: &Path, nodes: usize) -> Result<(), SetupError> {
    shoal_overlay::pki::ensure_private_dir(data)?;
    let store = Store::open(&data.join("store"))?;
    let now: UnixMillis = now_ms();
    store.create_token(&TokenRecord {
        id: "bench".into(),
        secret_sha256: shoal_overlay::pki::sha256(b"bench-secret"),
        created_at: now,
        expires_at: None,
        max_uses: None,
        uses: 0,
        revoked_at: None,
        labels: [("role".to_owned(), "bench".to_owned())].into(),
    })?;
    for i in 0..nodes {
        let machine = format!("bench-{i:05}");
        store
            .enrol(&EnrolParams {
                token_id: "bench",
                secret: "bench-secret",
                hardware_id: &HardwareId {
                    source: HardwareIdSource::DmiUuid,
                    value: machine.clone(),
                },
                hostname: &machine,
                now,
                key: &shoal_overlay::pki::sha256(machine.as_bytes()),
                remote: "bench",
                is_live: &|_| false,
            })
            .map_err(|e| SetupError::Enrol(machine.clone(), e.to_string()))?;
    }
    store.flush()?;
    Ok(())
}
