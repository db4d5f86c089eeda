//! What the controller's bounds refused since it started: `GET /v1/refusals`.

use serde::{Deserialize, Serialize};

/// `GET /v1/refusals`: what the controller's bounds refused since it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalsView {
    /// Connection limits.
    pub connections: ConnCounters,
    /// What nodes sent the overlay hub beyond its bounds.
    pub overlay: HubCounters,
}

/// What the connection limits refused since the controller started (`GET /v1/refusals`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnCounters {
    /// Clients sent a QUIC Retry (address validation) because many handshakes were in progress.
    pub retried: u64,
    /// Connection attempts refused at the handshake limit.
    pub handshakes_refused: u64,
    /// Unauthenticated connections closed at the limit.
    pub unauthenticated_refused: u64,
    /// Unauthenticated connections closed at their enrolment deadline.
    pub enrolment_timeouts: u64,
    /// Connections closed because the agent did not read (queue full or a write timed out).
    pub slow_consumers: u64,
}

/// Counts of what the hub refused, since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubCounters {
    /// `OverlayHello`s beyond a connection's rate.
    pub hellos_refused: u64,
    /// Punch requests between nodes that share no network.
    pub punches_unshared: u64,
    /// Punch requests beyond the pair's or the node's rate.
    pub punches_rate_limited: u64,
    /// Path reports beyond a node's rate.
    pub reports_refused: u64,
    /// Entries left out of path reports (paths to non-peers or repeated, bad or surplus drop
    /// reasons).
    pub report_entries_refused: u64,
    /// Relayed packets beyond the sender's packet or byte rate.
    pub relay_rate_limited: u64,
    /// Relayed packets between nodes that share no network.
    pub relay_unshared: u64,
    /// Relayed packets to a relay index no connected node has, or too short to carry one.
    pub relay_no_target: u64,
    /// Punch requests for a node on another controller that could not be passed to it (no mesh
    /// link to that controller now).
    #[serde(default)]
    pub punches_undelivered: u64,
    /// Relayed packets for a node on another controller that could not be sent there (no mesh
    /// link now, or larger than the link carries), or that came from one with a source this
    /// controller does not know.
    #[serde(default)]
    pub relay_mesh_dropped: u64,
    /// Relayed packets beyond the budget of their pair (sender and destination), within the
    /// sender's own.
    #[serde(default)]
    pub relay_pair_rate_limited: u64,
}
