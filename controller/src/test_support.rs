//! Helpers shared by the controller's unit tests (the integration tests in `controller/tests/` have
//! their own harness, `controller/tests/common`).

use shoal_proto::{NodeId, UnixMillis};

use crate::store::Store;

/// Creates a token with these labels and enrols a machine with it, joining its networks like the
/// controller does (tests of this module and of the API).
#[allow(clippy::unwrap_used)]
pub(crate) fn enrol_for_tests(
    store: &Store,
    machine: &str,
    labels: &[(&str, &str)],
    now: UnixMillis,
) -> NodeId {
    use crate::registry::store::EnrolParams;
    use shoal_controller_core::registry::TokenRecord;
    use shoal_proto::{HardwareId, HardwareIdSource};
    let id = format!("tok-{machine}");
    store
        .create_token(&TokenRecord {
            id: id.clone(),
            secret_sha256: shoal_overlay::pki::sha256(b"s"),
            created_at: now,
            expires_at: None,
            max_uses: None,
            uses: 0,
            revoked_at: None,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
        .unwrap();
    let hw = HardwareId {
        source: HardwareIdSource::DmiUuid,
        value: machine.to_owned(),
    };
    let node = store
        .enrol(&EnrolParams {
            token_id: &id,
            secret: "s",
            hardware_id: &hw,
            hostname: machine,
            now,
            key: &shoal_overlay::pki::sha256(machine.as_bytes()),
            remote: "test",
            is_live: &|_| false,
        })
        .unwrap()
        .node
        .id;
    store.join_networks(&node).unwrap();
    node
}
