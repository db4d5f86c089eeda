//! The controller's decisions, as pure code: who may enrol as which node, when a node is down, what a
//! rollout does next and whether a window is open, which address and MAC a network member gets, what
//! netmap each agent is sent, how a drive is judged and which policy applies, what the DHCP and TFTP
//! servers answer.
//!
//! Every core is sans-IO (quinn-proto's rule): inputs are plain values and time is passed in; outputs
//! are values the controller's shell (`shoal-controller`) performs. This crate cannot do I/O: it does
//! not depend on sled, tokio, quinn or axum, so the compiler, not a comment, keeps it pure.

pub mod backups;
pub mod coordinator;
pub mod drives;
pub mod enrolment;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod labels;
pub mod leadership;
pub mod liveness;
pub mod netboot;
pub mod networks;
pub mod registry;
pub mod releases;
pub mod report;
pub mod rollout;
pub mod selector;
pub mod session;
pub mod time;
pub mod windows;
pub mod wireguard;
