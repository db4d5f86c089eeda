//! Backups: targets (repositories, their secrets sealed at rest), jobs, the scheduler that hands
//! agents tasks, the results and verification state they report, and the admin routes.
//!
//! Decisions (what a node owes, what a result means, what the report says) are
//! `shoal_controller_core::backups`'; this folder stores, sends and logs.

pub(crate) mod messages;
pub(crate) mod routes;
pub(crate) mod scheduler;
pub(crate) mod secrets;
pub(crate) mod store;

pub(crate) use scheduler::{run_scheduler, Backups};
