//! The agent's async shell: connects, enrols when it must, drives the control session, reconnects
//! with backoff after any loss.
//!
//! - `run`: start-up and the reconnect loop ([`run`]).
//! - `shell`: one connection: connect, run the session, dispatch each output and event.
//! - `credentials`: store an enrolment, renew, rotate the key.
//! - `reports`: health (and the checks a heartbeat sets off) and inventory.
//! - `overlay`: the datapath, netmaps, punching, the NAT probe, path reports.
//! - `drives`: the drive manager's inputs and reports.
//! - `update`: the updater: offers, downloads, installs, reverts, reports.
//! - `reboot`: named kexec images and reboot requests.
//! - `maintenance`: maintenance steps.
//! - `backup`: backup tasks and their kept results.
//! - `wireguard`: (v9) the WireGuard gateway in the agent and the floating endpoint.

mod backup;
mod config;
mod credentials;
mod drives;
mod maintenance;
mod overlay;
mod reboot;
mod reports;
mod run;
mod shell;
mod update;
mod wireguard;

pub use config::{AgentConfig, AgentError};
pub use run::run;
pub(crate) use shell::now_ms;
