//! Signed agent releases and agent updates: `/v1/releases…`, `/v1/nodes/{id}/agent-update`,
//! `/v1/agent-updates`.

use serde::{Deserialize, Serialize};
use shoal_proto::UpdateReport;

/// A stored release, as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseView {
    /// Agent version.
    pub version: String,
    /// Target triple.
    pub target: String,
    /// Binary size in bytes.
    pub size: u64,
    /// Binary SHA-256.
    pub sha256: String,
    /// Signing key id.
    pub key_id: String,
    /// When it was signed (RFC 3339).
    pub created_at: String,
}

/// Body of `POST /v1/nodes/{id}/agent-update`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OfferUpdate {
    /// The release version to install.
    pub version: String,
}

/// One node's update facts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentUpdateView {
    /// The node.
    pub node: String,
    /// The version last offered.
    pub offered: Option<String>,
    /// The version the agent acknowledged last.
    pub acknowledged: Option<String>,
    /// The agent's latest report.
    pub report: Option<UpdateReport>,
    /// The report's failure as text (the report holds it as a value).
    pub failure: Option<String>,
}

/// File names inside a release, as uploaded to `/v1/releases/{version}/{target}/files/{name}` and
/// kept in the controller's release store: the agent binary.
pub const BINARY: &str = "agent";
/// The manifest exactly as signed.
pub const MANIFEST: &str = "manifest.json";
/// The raw 64-byte signature.
pub const SIGNATURE: &str = "manifest.sig";
