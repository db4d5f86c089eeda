//! `GET /v1/version`: what the answering controller runs (`shoalctl version`).

use serde::{Deserialize, Serialize};

/// The route.
pub const VERSION_PATH: &str = "/v1/version";

/// `GET /v1/version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionView {
    /// The controller's release (its crate version).
    pub version: String,
    /// The agent protocol versions it speaks, lowest and highest.
    pub protocol_min: u16,
    /// See `protocol_min`.
    pub protocol_max: u16,
    /// `embedded` (sled in the data dir) or `etcd`.
    pub store: String,
    /// The controller's id (several controllers share one etcd cluster).
    pub controller: String,
}
