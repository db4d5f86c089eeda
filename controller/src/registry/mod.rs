//! The registry: who is in the fleet. Enrolment (the rules are `shoal_controller_core::enrolment`),
//! node identity bound to keys, certificates and their revocation, and the fleet CA.

pub mod ca;
pub mod enrol;
pub mod identity;
pub mod identity_store;
pub mod labels;
pub mod messages;
pub mod routes;
pub mod store;
