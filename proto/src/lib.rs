//! Wire messages between `shoal-agent` and `shoal-controller`, their framing, and the protocol
//! version.
//!
//! Architecture Invariant: this crate does no I/O. It turns bytes into typed messages and back, and
//! decides whether two protocol versions can talk; sockets, clocks and files live elsewhere.

mod backup;
mod datapath;
mod drives;
mod frame;
mod image;
pub mod limits;
mod maintenance;
mod msg;
mod netmap;
mod release;
mod token;
mod types;
mod version;
mod wireguard;

pub use backup::*;
pub use datapath::*;
pub use drives::*;
pub use frame::{
    decode_frame, encode_frame, FrameDecoder, FrameError, FRAME_HEADER_LEN, MAX_FRAME_LEN,
};
pub use image::*;
pub use maintenance::*;
pub use msg::*;
pub use netmap::*;
pub use release::*;
pub use token::{JoinToken, TokenFormatError};
pub use types::*;
pub use version::{
    negotiate, VersionError, VersionRange, BACKUP_PROTOCOL, CLUSTER_PROTOCOL, DATAPATH_PROTOCOL,
    DRIVES_PROTOCOL, KEY_ROTATION_PROTOCOL, OVERLAY_PROTOCOL, PROTOCOL_HISTORY, PROTOCOL_VERSION,
    RELAY_REASONS_PROTOCOL, SUPPORTED, UPDATES_PROTOCOL, WIREGUARD_PROTOCOL,
};
pub use wireguard::*;
