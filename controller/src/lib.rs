//! shoal's controller: registry, CA, store, the agents' QUIC endpoint, the admin API, and
//! `shoalctl`.
//!
//! Architecture Invariant: the controller never depends on agent code; it knows agents only through
//! `shoal-proto` messages.

pub mod admin;
pub mod agent_updates;
pub mod api;
pub mod ca;
pub mod conn_queue;
pub mod coordinator;
pub mod drive_hub;
pub mod drive_policy;
pub mod drives;
pub mod enrolment;
pub mod event_log;
pub mod fleet_drives;
pub mod fuzzing;
pub mod identity;
pub mod liveness;
pub mod maintenance;
pub mod netboot;
pub mod networks;
pub mod overlay_hub;
pub mod release_api;
pub mod release_store;
pub mod releases;
pub mod report;
pub mod rollout;
pub mod server;
pub mod session;
pub mod store;
pub mod view;
pub mod windows;
