//! Agent releases: checking uploads against the release keys ([`verify`]), the release store
//! ([`store`]), offering updates to agents and taking their reports ([`updates`]), and the admin
//! routes ([`routes`]).

pub mod messages;
pub mod routes;
pub mod store;
pub mod updates;
pub mod verify;
