//! Drives: every node's drive report and SMART history with their verdicts ([`fleet`], sans-IO),
//! and the hub that stores them, pushes drive policies and runs drive commands ([`hub`]).

pub mod hub;
pub mod messages;
pub mod routes;
