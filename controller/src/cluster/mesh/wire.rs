//! What controllers of one cluster say to each other, as postcard frames on the one stream of a
//! mesh connection (`shoal-mesh`), dialer to acceptor.

use serde::{Deserialize, Serialize};
use shoal_controller_core::rollout;
use shoal_proto::{BootReport, ControllerMsg, NodeId, UpdateReport};

/// The mesh protocol's version; a controller refuses a peer that speaks another.
pub const MESH_VERSION: u16 = 1;

/// Most node presences in one frame (a full snapshot is sent in several).
pub const MAX_PRESENCE_PER_FRAME: usize = 256;

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
    RolloutEvent(rollout::Event),
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
