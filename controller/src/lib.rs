//! shoal's controller: the shell around the pure cores of `shoal-controller-core`. One folder per
//! domain, each owning its store tables, its handlers and its admin API routes:
//!
//! - [`registry`]: enrolment, node identity and certificates (the CA), tokens, liveness.
//! - [`overlay`]: overlay networks (IPAM), the netmap coordinator's shell, the relay.
//! - [`drives`]: drive reports, SMART history and verdicts, drive policies and commands.
//! - [`releases`]: signed agent releases, their store, and agent updates.
//! - [`maintenance`]: windows, budgets, rollouts and maintenance runs, and their driver.
//! - [`netboot`]: DHCP, TFTP and boot HTTP on the netboot interface, images and machines.
//! - [`connections`]: the agents' QUIC connections and the registry other domains send through.
//! - [`api`]: the admin API's router and authentication, and the fleet report.
//! - [`store`]: the storage contract, its sled and etcd implementations, and the event log.
//! - [`etcd`]: where the etcd cluster of a highly available controller is, and connecting to it.
//! - [`dr`]: disaster recovery: the controller in one encrypted file, backup and restore.
//! - [`web`]: the web view: HTML pages of the fleet under `/ui/`, behind a login with the admin
//!   token.
//! - [`observe`]: `/metrics` (Prometheus), `/healthz` and `/readyz`.
//!
//! [`server`] composes them: the controller's configuration, its shared state and `run`.
//!
//! Architecture Invariant: the controller never depends on agent code; it knows agents only through
//! `shoal-proto` messages.

pub mod api;
pub mod backups;
pub mod cluster;
pub mod connections;
pub mod dr;
pub mod drives;
pub mod etcd;
pub mod http;
pub mod maintenance;
pub mod netboot;
pub mod observe;
pub mod overlay;
pub mod registry;
pub mod releases;
pub mod server;
pub mod sessions;
pub mod store;
#[cfg(test)]
pub(crate) mod test_support;
pub mod web;
