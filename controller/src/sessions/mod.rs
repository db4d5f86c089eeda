//! The agents' endpoint: one task per QUIC connection, from the handshake to its close — the
//! connection limits, the certificate check before a node is registered, the sans-IO session
//! (`shoal_controller_core::session`) driven by the connection's frames, and the dispatch of each
//! session action to the domain that handles it. It sits on top of the domains, as `api` does for
//! the admin API: the domains never import it.

mod announce;
mod connection;

pub(crate) use connection::handle_connection;
