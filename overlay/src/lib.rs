//! shoal's transport layer: QUIC endpoints with the fleet's PKI, and framed control streams.
//!
//! For now this crate holds what agent and controller share to talk to each other: TLS
//! configurations (mutual TLS with controller-issued node certificates, and the CA-pinned
//! configuration an agent uses before it has one), key and CSR helpers, and length-delimited
//! message streams over QUIC. The L2 overlay (switch, paths, NAT traversal, relay) will grow here
//! too.
//!
//! Architecture Invariant: no agent or controller logic lives here; this crate only moves bytes and
//! checks identities.

pub mod framed;
pub mod node;
pub mod observed;
pub mod offload;
pub mod paths;
pub mod pki;
pub mod relay_socket;
pub mod switch;
pub mod tls;
pub mod udp_buffers;
pub mod wire;

pub use framed::{recv_msg, send_msg, FrameReader, TransportError};
