//! shoal's WireGuard gateway: devices that cannot run the agent (a phone, a laptop, a NAS) reach an
//! overlay network through a stock WireGuard client.
//!
//! - [`bridge`] (sans-IO): a device's IP packets as Ethernet frames on the network's segment and
//!   back, with proxy-ARP answers for device addresses.
//! - [`gateway`]: boringtun's noise core (handshakes, sessions, the cookie rate limiter) per device,
//!   datagrams in and out, no sockets.
//! - [`run`]: the tokio shell — one UDP socket, frames to and from the segment over channels.
//! - [`keys`]: x25519 keys in `wg`'s base64, and the client configuration a device is given.
//!
//! Architecture Invariant: nothing here knows the agent, the controller or the overlay's datapath;
//! the gateway sees frames of one network through two channels.

pub mod bridge;
pub mod fuzzing;
pub mod gateway;
pub mod keys;
pub mod run;

pub use gateway::{Device, Gateway, GatewayConfig, GatewayCounters, Output};
pub use keys::{ClientConfig, Key};
