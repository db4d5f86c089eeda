//! Join tokens: `GET/POST /v1/tokens`, `DELETE /v1/tokens/{id}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
