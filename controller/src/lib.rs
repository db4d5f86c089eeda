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
pub mod drive_hub;
pub mod event_log;
pub mod fleet_drives;
pub mod fuzzing;
pub mod identity;
pub mod maintenance;
pub mod netboot;
pub mod networks;
pub mod overlay_hub;
pub mod release_api;
pub mod release_store;
pub mod releases;
pub mod report;
pub mod server;
pub mod store;
pub mod view;

// The pure cores, under the paths the shell has always used for them.
pub use shoal_controller_core::{
    coordinator, drive_policy, drives, enrolment, liveness, rollout, session, windows,
};
