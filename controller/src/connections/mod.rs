//! The agents' connections: the bounded queue other tasks use to reach a node ([`queue`]).

pub mod queue;
