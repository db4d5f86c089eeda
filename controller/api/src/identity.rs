//! Node identity: pending claims, re-enrolment, certificates and their revocation
//! (`/v1/enrolments/pending…`, `/v1/nodes/{id}/reenrol|rotate-key|certificates`,
//! `/v1/certificates/{serial}/revoke`).

use serde::{Deserialize, Serialize};

/// A claim of an existing node waiting for an operator (`shoalctl nodes pending`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingView {
    /// Request id, for `nodes approve|deny`.
    pub id: String,
    /// The node claimed.
    pub node: String,
    /// The claimed node's hostname, as stored.
    pub node_hostname: String,
    /// The hostname the claiming machine reported.
    pub hostname: String,
    /// The hardware id it reported.
    pub hardware_id: String,
    /// Fingerprint of the key it would bind (first 8 bytes of the SPKI SHA-256, hex).
    pub key: String,
    /// The token it presented.
    pub token: String,
    /// Where it connected from.
    pub remote: String,
    /// First attempt (RFC 3339).
    pub first_seen: String,
    /// Latest attempt (RFC 3339).
    pub last_seen: String,
    /// Attempts so far.
    pub attempts: u32,
    /// `waiting`, `approved` or `denied`.
    pub state: String,
}

/// One certificate issued to a node (`shoalctl certs list NODE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertView {
    /// Serial, hex.
    pub serial: String,
    /// When it was issued (RFC 3339).
    pub issued_at: String,
    /// When it expires (RFC 3339).
    pub not_after: String,
    /// Fingerprint of its key.
    pub key: String,
    /// Whether its key is the one the node is bound to now.
    pub current_key: bool,
    /// When it was revoked (RFC 3339), if it was.
    pub revoked_at: Option<String>,
    /// Why, if it was.
    pub revoked_reason: Option<String>,
}

/// `POST /v1/nodes/{id}/reenrol`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReenrolRequest {
    /// How long the re-enrolment stays armed, seconds (default 1 hour).
    pub ttl_secs: Option<u64>,
}

/// `POST /v1/certificates/{serial}/revoke`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RevokeCertRequest {
    /// The operator's reason, kept with the revocation.
    pub reason: Option<String>,
}

/// What `POST /v1/certificates/{serial}/revoke` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCertView {
    /// The certificate.
    pub serial: String,
    /// Its node.
    pub node: String,
    /// It held the node's current key: the node was asked to rotate (or must, on its next session).
    pub rotation_required: bool,
    /// Connections that used it and were closed.
    pub closed_connections: usize,
}
