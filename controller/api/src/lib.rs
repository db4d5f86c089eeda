//! The admin API's vocabulary: every JSON shape the controller's HTTPS admin API takes or returns,
//! one module per domain, and (feature `client`) the blocking client with its credential file.
//!
//! Both sides use these types: the controller's routes serialize them, `shoalctl` and the tests
//! deserialize them, so a field cannot drift between server and client.
//!
//! Architecture Invariant: this crate is plain data. It never depends on the controller, the
//! store, tokio, quinn or axum; without features it does no I/O. The `client` feature adds the
//! HTTPS client (ureq, rustls with ring) and reading `admin.conf`; the `signing` feature adds
//! release signing (ring). A crate that only needs the types links neither.

pub mod backups;
pub mod cluster;
pub mod dr;
pub mod drives;
pub mod error;
pub mod events;
pub mod identity;
pub mod maintenance;
pub mod netboot;
pub mod networks;
pub mod nodes;
pub mod overlay;
pub mod refusals;
pub mod releases;
pub mod report;
pub mod tokens;
pub mod version;
pub mod wireguard;

#[cfg(feature = "client")]
pub mod admin_conf;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "client")]
pub mod contexts;
#[cfg(feature = "signing")]
pub mod signing;

#[cfg(feature = "client")]
pub use admin_conf::{AdminConf, AdminConfError, ADMIN_CONF_FILE};
#[cfg(feature = "client")]
pub use client::{AdminClient, AdminClientError};
