//! What the admin API returns: JSON views of the registry, shared by the server and `shoalctl`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_proto::{HealthReport, Inventory};

/// RFC 3339 UTC text for a Unix time in milliseconds.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

/// A node as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Hostname.
    pub hostname: String,
    /// `up` or `down`.
    pub status: String,
    /// Whether a control connection is open right now.
    pub connected: bool,
    /// Agent software version.
    pub agent_version: String,
    /// Last heartbeat (RFC 3339).
    pub last_seen: Option<String>,
    /// Last heartbeat (Unix ms).
    pub last_seen_unix_ms: Option<u64>,
    /// When the node first enrolled (RFC 3339).
    pub enrolled_at: String,
    /// The hardware identity that keeps the record across re-enrolments.
    pub hardware_id: String,
    /// Labels from the join token.
    pub labels: BTreeMap<String, String>,
    /// Last reported inventory.
    pub inventory: Option<Inventory>,
    /// Last reported health.
    pub health: Option<HealthReport>,
}

/// A join token as listed (never the secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenView {
    /// Token id.
    pub id: String,
    /// `valid`, `expired`, `used_up` or `revoked`.
    pub state: String,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Expiry (RFC 3339), if any.
    pub expires_at: Option<String>,
    /// Uses so far.
    pub uses: u32,
    /// Use limit, if any.
    pub max_uses: Option<u32>,
    /// Labels given to nodes that enrol with it.
    pub labels: BTreeMap<String, String>,
}

/// Request body of `POST /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CreateToken {
    /// Time to live in seconds; none means no expiry.
    pub ttl_secs: Option<u64>,
    /// Use limit; none means unlimited.
    pub max_uses: Option<u32>,
    /// Labels for nodes that enrol with it.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Response of `POST /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreatedToken {
    /// The join token to paste into agents.
    pub token: String,
    /// Its listing.
    pub info: TokenView,
}

/// An event as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    /// Sequence number, increasing.
    pub seq: u64,
    /// When (RFC 3339).
    pub at: String,
    /// What kind (`enrolled`, `up`, `down`, `removed`, ...).
    pub kind: String,
    /// The node concerned.
    pub node: Option<String>,
    /// Human-readable detail.
    pub message: String,
}

/// An API error body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}
