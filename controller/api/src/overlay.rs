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
    /// How the node's datapath moves frames, where its agent said (protocol 9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datapath: Option<DatapathView>,
}

/// How one node's datapath moves frames (protocol 9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatapathView {
    /// One entry per TAP device.
    pub taps: Vec<TapView>,
    /// Peer datagram receive batches since the agent started.
    pub rx_batches: u64,
    /// Datagrams in those batches.
    pub rx_datagrams: u64,
    /// Mean datagrams per receive batch (none before the first).
    pub datagrams_per_batch: Option<f64>,
    /// When it was reported (RFC 3339).
    pub reported_at: String,
}

/// One TAP device's datapath.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TapView {
    /// The network's id.
    pub network: u32,
    /// The device (`shoal0`).
    pub device: String,
    /// Offloads in use: `csum`, `tso4`, `tso6`, `uso4`, `uso6`; empty for plain frames.
    pub offloads: Vec<String>,
    /// Why there are none: `disabled` (`--overlay-no-offload`) or `refused: <kernel error>`.
    pub fallback: Option<String>,
    /// TAP queues read.
    pub queues: u16,
    /// TAP reads, and the frames they brought.
    pub reads: u64,
    /// Frames read (a TSO super-frame counts as the frames it is split into).
    pub read_frames: u64,
    /// Mean frames per read (none before the first).
    pub frames_per_read: Option<f64>,
    /// TAP writes.
    pub writes: u64,
    /// Frames written (a coalesced super-frame counts as the frames merged into it).
    pub write_frames: u64,
    /// Mean frames per write (none before the first).
    pub frames_per_write: Option<f64>,
}
