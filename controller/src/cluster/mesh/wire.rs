//! What controllers of one cluster say to each other, as postcard frames on the one stream of a
//! mesh connection (`shoal-mesh`), dialer to acceptor.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_controller_core::{coordinator::Subscription, networks::MembershipChange};
use shoal_proto::{BootReport, ControllerMsg, NodeId, PeerIndex, UpdateReport};

/// The mesh protocol's version; a controller refuses a peer that speaks another.
pub const MESH_VERSION: u16 = 1;

/// Most node presences in one frame (a full snapshot is sent in several).
pub const MAX_PRESENCE_PER_FRAME: usize = 256;

/// Most overlay subscriptions in one frame (each is at most about 500 bytes).
pub const MAX_SUBSCRIPTIONS_PER_FRAME: usize = 64;

/// Most membership changes in one frame.
pub const MAX_MEMBERSHIP_CHANGES_PER_FRAME: usize = 128;

/// Most WireGuard gateways one controller says it holds (what it holds beyond is left out, with a
/// warning).
pub const MAX_GATEWAYS_PER_FRAME: usize = 4096;

/// The label of the secret a dialer proves it holds ([`crate::registry::ca::Ca::derive_secret`]).
pub const PROOF_LABEL: &str = "shoal mesh v1";

/// One message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MeshMsg {
    /// First on every connection.
    Hello {
        /// [`MESH_VERSION`].
        version: u16,
        /// The dialer's controller id.
        id: String,
        /// The secret derived from the fleet CA's key.
        proof: [u8; 32],
    },
    /// The nodes connected to the dialer: with `reset`, everything it had said before is replaced.
    Presence {
        /// Replace, rather than amend.
        reset: bool,
        /// Connected nodes, new or changed.
        up: Vec<NodePresence>,
        /// Nodes no longer connected.
        gone: Vec<NodeId>,
    },
    /// Queue `msg` on `node`'s session, which the acceptor holds.
    Deliver {
        /// The node.
        node: NodeId,
        /// The protocol the message needs.
        min_protocol: u16,
        /// The message.
        msg: ControllerMsg,
    },
    /// News from an agent for the rollouts, for the leader (the acceptor) to apply.
    /// News from agents waits in the rollout inbox (in the store): the leader (the acceptor)
    /// applies it now rather than at its next tick.
    RolloutNews,
    /// A certificate was revoked: end the node's session if it presented it (or ask the node to
    /// rotate its key when it was its current one).
    CertificateRevoked {
        /// The node.
        node: NodeId,
        /// The revoked certificate's serial.
        serial: String,
        /// Why.
        reason: String,
        /// Whether it was the node's current key.
        current: bool,
    },
    /// The node was removed from the fleet: end its session.
    NodeRemoved {
        /// The node.
        node: NodeId,
    },
    /// The dialer's agents' overlay subscriptions, for the acceptor's coordinator (remote
    /// subscribers there): with `reset`, everything it said before is said again from here on.
    OverlaySubscriptions {
        /// The dialer is saying them all again (its first frame on a link).
        reset: bool,
        /// Subscriptions, new or changed.
        up: Vec<Subscription>,
        /// Nodes whose session on the dialer ended.
        left: Vec<NodeId>,
    },
    /// Overlay membership changes the dialer made (already in the shared store).
    OverlayMembership(Vec<MembershipChange>),
    /// A node's overlay key changed on the dialer (already in the shared store).
    OverlayKey {
        /// The node.
        node: NodeId,
        /// SHA-256 of its key, or [`shoal_proto::KEY_WITHDRAWN`].
        key: [u8; 32],
    },
    /// Drive policies, or the labels they select by, changed on the dialer (already in the shared
    /// store): send the acceptor's agents their effective policy again — these nodes' only, or
    /// every agent's when `None`.
    DrivePolicies {
        /// The nodes whose labels changed; `None`: the policies themselves changed.
        only: Option<Vec<NodeId>>,
    },
    /// The WireGuard gateway agents connected to the dialer, all of them (replacing what it said
    /// before; at most [`MAX_GATEWAYS_PER_FRAME`]): first on every link, then on each change. A
    /// peer that never said it (an older release) is not known to hold any. Added after
    /// `DrivePolicies`; older controllers skip it.
    WireGuardGateways(Vec<NodeId>),
    /// The dialer changed WireGuard state in the shared store (a device added or removed, or a
    /// network's active gateway): read it again and tell this controller's agents.
    WireGuardChanged,
}

/// Bytes before the packet in a relayed datagram on a mesh link: destination and source relay
/// indexes.
pub const RELAY_HEADER_LEN: usize = 8;

/// A relayed packet as it crosses a mesh link (a QUIC datagram, dialer to acceptor): `to` is
/// connected to the acceptor, `from` to the dialer.
pub fn relay_datagram(to: PeerIndex, from: PeerIndex, packet: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(RELAY_HEADER_LEN + packet.len());
    v.extend_from_slice(&to.0.to_be_bytes());
    v.extend_from_slice(&from.0.to_be_bytes());
    v.extend_from_slice(packet);
    Bytes::from(v)
}

/// Splits a mesh relay datagram into (to, from, packet); `None` if it carries no packet.
pub fn parse_relay_datagram(d: &Bytes) -> Option<(PeerIndex, PeerIndex, Bytes)> {
    let to: [u8; 4] = d.get(..4)?.try_into().ok()?;
    let from: [u8; 4] = d.get(4..RELAY_HEADER_LEN)?.try_into().ok()?;
    let packet = d.slice(RELAY_HEADER_LEN..);
    (!packet.is_empty()).then_some((
        PeerIndex(u32::from_be_bytes(to)),
        PeerIndex(u32::from_be_bytes(from)),
        packet,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_datagrams_round_trip_and_runts_are_refused() {
        let d = relay_datagram(PeerIndex(7), PeerIndex(0x0102_0304), b"quic");
        assert_eq!(
            parse_relay_datagram(&d),
            Some((
                PeerIndex(7),
                PeerIndex(0x0102_0304),
                Bytes::from_static(b"quic")
            ))
        );
        assert_eq!(parse_relay_datagram(&d.slice(..8)), None);
        assert_eq!(parse_relay_datagram(&d.slice(..5)), None);
    }
}

/// A node connected to a controller, as the leader's drivers need to see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePresence {
    /// The node.
    pub node: NodeId,
    /// Its session's protocol, once its Hello was accepted.
    pub protocol: Option<u16>,
    /// Its latest boot report on this session.
    pub boot: Option<BootReport>,
    /// Its latest agent update report.
    pub update: Option<UpdateReport>,
    /// Heard from within two heartbeats, and not leaving after a reboot: the session holds the
    /// node's identity against a re-enrolment elsewhere.
    pub live: bool,
}
