//! The registry's records: join tokens, nodes, and why an enrolment is refused. Plain data that the
//! store keeps and the enrolment rules ([`crate::enrolment`]) judge.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_proto::{HardwareId, HealthReport, Inventory, NodeId, UnixMillis};

/// Why an enrolment was refused; each is something the operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnrolRefusal {
    /// No token has this id, or the secret does not match (the two are deliberately
    /// indistinguishable).
    #[error("unknown join token (mistyped, or issued by another controller)")]
    TokenUnknown,
    /// The token's time to live has passed.
    #[error("join token {id} expired at {at}")]
    TokenExpired {
        /// The token's id.
        id: String,
        /// When it expired, RFC 3339 UTC.
        at: String,
    },
    /// The token's uses are spent.
    #[error("join token {id} has been used {uses} times, its limit")]
    TokenUsedUp {
        /// The token's id.
        id: String,
        /// How many times it was used.
        uses: u32,
    },
    /// An operator revoked the token.
    #[error("join token {id} was revoked")]
    TokenRevoked {
        /// The token's id.
        id: String,
    },
    /// The machine was removed after the token was created.
    #[error("this machine ({hardware_id}) was removed from the fleet; create a new token to admit it again")]
    NodeRemoved {
        /// The machine's hardware id, as displayed.
        hardware_id: String,
    },
    /// The machine claims a node that holds a live session.
    #[error("node {node} is connected right now: its identity cannot be claimed while it holds a live session")]
    IdentityInUse {
        /// The node claimed.
        node: NodeId,
    },
    /// The machine claims an existing node without proof bound to it: an operator must decide.
    #[error(
        "this machine claims node {node}, which is enrolled with another key; an operator must approve the \
         claim (`shoalctl nodes approve {request}`) or arm a re-enrolment (`shoalctl nodes reenrol {node}`)"
    )]
    AwaitingApproval {
        /// The node claimed.
        node: NodeId,
        /// The pending request's id.
        request: String,
    },
    /// Too many claims are waiting for an operator; this one was not recorded.
    #[error("too many enrolment requests wait for an operator ({pending}); try again later")]
    TooManyPending {
        /// How many wait.
        pending: usize,
    },
    /// An operator denied this machine's claim.
    #[error("an operator denied this machine's claim to node {node}")]
    ClaimDenied {
        /// The node claimed.
        node: NodeId,
    },
    /// A per-boot token minted for another node.
    #[error("this boot token was minted for node {node}, not for this machine")]
    TokenForAnotherMachine {
        /// The node it is for.
        node: NodeId,
    },
}

/// A join token as stored: only the hash of its secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public identifier (16 hex).
    pub id: String,
    /// SHA-256 of the secret part.
    pub secret_sha256: [u8; 32],
    /// When it was created; removals newer than this are not undone by it.
    pub created_at: UnixMillis,
    /// When it stops working; `None` for never.
    pub expires_at: Option<UnixMillis>,
    /// How many enrolments it allows; `None` for unlimited.
    pub max_uses: Option<u32>,
    /// How many enrolments it has made.
    pub uses: u32,
    /// When an operator revoked it.
    pub revoked_at: Option<UnixMillis>,
    /// Labels given to nodes that enrol with it.
    pub labels: BTreeMap<String, String>,
}

/// What a per-boot token is bound to: the proof it carries that the machine using it is one node. A
/// bound token may re-enrol onto an existing record only when the record is the one it is bound to
/// (a general token never may). Kept in `token_bindings` beside the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenBinding {
    /// Minted by the boot HTTP server for a MAC the DHCP server saw PXE-boot moments before
    /// (lower-case `aa:bb:cc:dd:ee:ff`): re-enrols only a node netbooted from that MAC.
    Mac(String),
    /// Minted by the controller for one node's kexec into a new image: re-enrols only that node.
    Node(NodeId),
}

/// Whether a token can enrol, as of some moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    /// It can enrol.
    Valid,
    /// Its time to live has passed.
    Expired,
    /// Its uses are spent.
    UsedUp,
    /// It was revoked.
    Revoked,
}

impl TokenRecord {
    /// The token's state at `now`; revocation outranks expiry, which outranks exhaustion.
    pub fn state(&self, now: UnixMillis) -> TokenState {
        if self.revoked_at.is_some() {
            TokenState::Revoked
        } else if self.expires_at.is_some_and(|at| now >= at) {
            TokenState::Expired
        } else if self.max_uses.is_some_and(|max| self.uses >= max) {
            TokenState::UsedUp
        } else {
            TokenState::Valid
        }
    }
}

/// Whether the controller currently considers a node alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Connected and reporting.
    Up,
    /// Not connected, or silent too long.
    Down,
}

/// Everything the controller keeps about one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's identity, kept for life.
    pub id: NodeId,
    /// The machine's identity; re-enrolment with the same one keeps this record.
    pub hardware_id: HardwareId,
    /// Hostname, as last reported.
    pub hostname: String,
    /// Operator labels: from the join token (merged on re-enrolment) and `shoalctl nodes label`.
    pub labels: BTreeMap<String, String>,
    /// The agent's software version, as last reported (empty until the agent's first session).
    pub agent_version: String,
    /// When the node first enrolled.
    pub enrolled_at: UnixMillis,
    /// Up or down.
    pub status: NodeStatus,
    /// Last contact.
    pub last_seen: Option<UnixMillis>,
    /// Latest inventory.
    pub inventory: Option<Inventory>,
    /// When the inventory arrived.
    pub inventory_at: Option<UnixMillis>,
    /// Latest health report.
    pub health: Option<HealthReport>,
}

crate::event_kinds! {
    /// What the registry logs: enrolments, liveness, removals, tokens and identity.
    pub enum RegistryEvent {
        /// A new node enrolled.
        Enrolled => "enrolled",
        /// A known machine enrolled again and kept its node.
        Reenrolled => "reenrolled",
        /// A node came up.
        Up => "up",
        /// A node went down.
        Down => "down",
        /// A node was removed.
        Removed => "removed",
        /// A join token was created.
        TokenCreated => "token_created",
        /// A join token was revoked.
        TokenRevoked => "token_revoked",
        /// A machine claimed a node's identity and was refused (the node holds a live session, or
        /// an operator denied the claim).
        ClaimRefused => "claim_refused",
        /// A machine claims an existing node without proof: the request waits for an operator.
        EnrolmentPending => "enrolment_pending",
        /// An operator approved a pending claim.
        EnrolmentApproved => "enrolment_approved",
        /// An operator denied a pending claim.
        EnrolmentDenied => "enrolment_denied",
        /// An operator armed a one-time re-enrolment of a node.
        ReenrolArmed => "reenrol_armed",
        /// An operator revoked a node certificate by its serial.
        CertificateRevoked => "certificate_revoked",
        /// A connection presented a node certificate that is not accepted (wrong key, revoked
        /// serial).
        CertificateRefused => "certificate_refused",
        /// A node rotated to a new key.
        KeyRotated => "key_rotated",
        /// An operator changed a node's labels (`shoalctl nodes label`).
        LabelsChanged => "labels_changed",
    }
}
