//! (v9) How an agent's overlay datapath moves frames: which TAP offloads are in use (or why none),
//! how many queues each TAP device has, and how well reads, writes and datagram receives batch.
//! Operators read it in `shoalctl overlay counters` to tell the fast path from the fallback.

use serde::{Deserialize, Serialize};

use crate::NetworkId;

/// (v9) The datapath report, sent with every path report once both sides speak 9.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathReport {
    /// One entry per TAP device (one per overlay network the node is in).
    pub taps: Vec<TapDatapath>,
    /// Batches of peer datagrams taken at one wake-up of a connection reader, since start.
    pub rx_batches: u64,
    /// Datagrams in those batches: `rx_datagrams / rx_batches` is the mean batch.
    pub rx_datagrams: u64,
}

/// (v9) One TAP device's path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapDatapath {
    /// The network the device belongs to.
    pub network: NetworkId,
    /// The device's name (`shoal0`).
    pub device: String,
    /// Offloads in use, by kernel name: `csum`, `tso4`, `tso6`, `uso4`, `uso6`. Empty: plain
    /// frames, and `fallback` says why.
    pub offloads: Vec<String>,
    /// Why the device runs without offloads: `disabled` (the agent's `--overlay-no-offload`) or
    /// `refused: <the kernel's error>`. `None` when offloads are on.
    pub fallback: Option<String>,
    /// TAP queues the agent reads.
    pub queues: u16,
    /// TAP reads since the device came up.
    pub reads: u64,
    /// Frames those reads brought (a TSO super-frame counts as the frames it is split into).
    pub read_frames: u64,
    /// TAP writes since the device came up.
    pub writes: u64,
    /// Frames those writes carried (a coalesced super-frame counts as the frames merged into it).
    pub write_frames: u64,
}

impl TapDatapath {
    /// Mean frames per TAP read, if there was one.
    pub fn frames_per_read(&self) -> Option<f64> {
        (self.reads > 0).then(|| self.read_frames as f64 / self.reads as f64)
    }

    /// Mean frames per TAP write, if there was one.
    pub fn frames_per_write(&self) -> Option<f64> {
        (self.writes > 0).then(|| self.write_frames as f64 / self.writes as f64)
    }
}

impl DatapathReport {
    /// Mean datagrams per receive batch, if there was one.
    pub fn datagrams_per_batch(&self) -> Option<f64> {
        (self.rx_batches > 0).then(|| self.rx_datagrams as f64 / self.rx_batches as f64)
    }
}
