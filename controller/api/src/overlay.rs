//! The overlay datapath as the agents report it: `GET /v1/overlay/paths` and
//! `GET /v1/overlay/counters`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One direction of an overlay path, as the sending agent last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathView {
    /// The reporting node.
    pub from: String,
    /// The peer.
    pub to: String,
    /// `direct` or `relay`.
    pub kind: String,
    /// The peer's UDP address (direct paths).
    pub remote: Option<String>,
    /// Smoothed round-trip time of the path, milliseconds.
    pub rtt_ms: f64,
    /// Bytes of overlay frames `from` sent to `to`.
    pub tx_bytes: u64,
    /// Bytes of overlay frames `from` received from `to`.
    pub rx_bytes: u64,
    /// When `from` reported it (RFC 3339).
    pub reported_at: String,
    /// Why a relayed path is relayed (`both_endpoint_dependent`, `udp_blocked`, ...: see
    /// `shoal_proto::RelayReason::label`), where the agent said (protocol 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_reason: Option<String>,
}

/// One node's datapath counters, as last reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverlayCountersView {
    /// The node.
    pub node: String,
    /// Frames sent to one peer.
    pub forwarded: u64,
    /// Frames sent to several peers (broadcast, multicast, unknown unicast).
    pub flooded: u64,
    /// Frames received from peers and written to a TAP device.
    pub delivered: u64,
    /// Frames dropped, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// When it was reported (RFC 3339).
    pub reported_at: String,
}
