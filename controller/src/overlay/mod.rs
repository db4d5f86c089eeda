//! Overlay networks: the store's networks, members, addresses and keys ([`networks`]), and the hub
//! that runs the netmap coordinator, relays between nodes and takes their path reports ([`hub`]).

pub mod hub;
pub mod messages;
pub mod networks;
pub mod routes;
pub mod wireguard;
