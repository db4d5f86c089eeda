//! The fleet event log: `GET /v1/events?after=&limit=`.

use serde::{Deserialize, Serialize};

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
