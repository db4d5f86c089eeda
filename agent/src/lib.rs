//! shoal's node agent: enrolment, inventory, health, and the control session with the controller.
//!
//! Architecture Invariant: the agent never depends on controller code; it knows the controller only
//! through `shoal-proto` messages.

pub mod backoff;
pub mod backup;
pub mod blank;
pub mod blockdev;
pub mod checks;
pub mod controllers;
pub mod daemon;
pub mod drives;
pub mod health;
pub mod inventory;
pub mod launch;
pub mod maintenance;
pub mod mountinfo;
pub mod overlay;
pub mod prepare;
pub mod reboot;
pub mod release;
pub mod session;
pub mod smart;
pub mod state;
pub mod sysfs;
pub mod update;
pub mod updater;
pub mod version;
pub mod wireguard;
