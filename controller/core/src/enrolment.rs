//! Where an enrolment is decided: who may get a certificate for which node. Pure: the store gathers
//! the facts inside its transaction, [`decide`] answers, the store writes what the answer says.
//!
//! Identity is the node's key, not its hardware id. The hardware id a machine reports only says
//! which record it *claims*; a claim onto an existing record needs proof bound to that record:
//! - the record's own key (the machine kept its key; its certificate merely expired);
//! - a per-boot token the controller minted for that machine (bound to the MAC the node was
//!   netbooted from, or to the node itself for a kexec);
//! - an operator's decision: a one-time re-enrolment armed with `shoalctl nodes reenrol NODE`, or
//!   the approval of this very request (same key) listed by `shoalctl nodes pending`.
//!
//! A general join token creates new nodes only. While the claimed node holds a live session, every
//! claim of its identity is refused, so a second machine can never knock the real one off.
//!
//! Enrolment is idempotent for the same key: a machine whose `Enrolled` reply was lost retries with
//! the same key and the same token and gets a certificate for the same node, without spending
//! another use.

use serde::{Deserialize, Serialize};
use shoal_proto::{HardwareId, NodeId, UnixMillis};

use crate::registry::{EnrolRefusal, NodeRecord, TokenBinding, TokenRecord, TokenState};

/// SHA-256 of a SubjectPublicKeyInfo (DER): what binds a record to a key, and what overlay peers
/// check.
pub type KeyHash = [u8; 32];

/// The label a node netbooted through a MAC-bound boot token carries: the MAC it booted from.
pub const NETBOOT_MAC_LABEL: &str = "netboot.mac";

/// The key a node record is bound to (tree `identities`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRecord {
    /// The key every connection and renewal must prove.
    pub key: KeyHash,
    /// A key the node rotated to (`RotateKey`) but has not connected with yet; both are accepted
    /// until it does, so a rotation whose reply was lost does not lock the node out.
    pub next_key: Option<KeyHash>,
    /// A certificate of `key` was revoked: the node must rotate to a new key on its next session.
    pub must_rotate: bool,
    /// When `key` was bound.
    pub bound_at: UnixMillis,
}

impl IdentityRecord {
    /// A record bound to `key` at `now`.
    pub fn new(key: KeyHash, now: UnixMillis) -> Self {
        IdentityRecord {
            key,
            next_key: None,
            must_rotate: false,
            bound_at: now,
        }
    }

    /// Whether `key` may authenticate as this node.
    pub fn accepts(&self, key: &KeyHash) -> bool {
        self.key == *key || self.next_key.as_ref() == Some(key)
    }
}

/// One use of a token by one key (tree `token_uses`): replays of the same enrolment are answered
/// from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    /// The node the use enrolled.
    pub node: NodeId,
    /// When.
    pub at: UnixMillis,
}

/// A one-time re-enrolment an operator armed for a node (tree `reenrol_grants`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReenrolGrant {
    /// When it was armed.
    pub armed_at: UnixMillis,
    /// When it lapses unused.
    pub expires_at: UnixMillis,
}

/// What an operator decided about a pending claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingState {
    /// Nobody decided yet.
    Waiting,
    /// Approved: the next attempt with the same key re-enrols onto the node.
    Approved,
    /// Denied: attempts with this key are refused for good.
    Denied,
}

/// A claim of an existing node without proof, waiting for an operator (tree `pending_enrolments`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingEnrolment {
    /// Short id for `shoalctl nodes approve|deny`: derived from node and key, so retries refresh
    /// one request instead of adding new ones.
    pub id: String,
    /// The node claimed.
    pub node: NodeId,
    /// The key that would be bound.
    pub key: KeyHash,
    /// The hardware id the machine reported.
    pub hardware_id: HardwareId,
    /// The hostname it reported.
    pub hostname: String,
    /// The token it presented.
    pub token_id: String,
    /// Where its connection came from.
    pub remote: String,
    /// First and latest attempt.
    pub first_seen: UnixMillis,
    /// Latest attempt.
    pub last_seen: UnixMillis,
    /// Attempts so far.
    pub attempts: u32,
    /// The operator's decision.
    pub state: PendingState,
}

/// The id of the pending request for `key` claiming `node`.
pub fn pending_id(node: &NodeId, key: &KeyHash) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(node.0.as_bytes());
    h.update([0]);
    h.update(key);
    hex::encode(&h.finalize()[..6])
}

/// Bounds on pending requests: an attacker with a valid token cannot grow the table without limit.
pub const MAX_PENDING: usize = 128;
/// At most this many pending requests claim one node.
pub const MAX_PENDING_PER_NODE: usize = 8;
/// A pending request lapses this long after its latest attempt.
pub const PENDING_TTL_MS: u64 = 3600 * 1000;

/// The existing record a claim is about (found through the hardware id the machine reported).
#[derive(Debug, Clone, Copy)]
pub struct Existing<'a> {
    /// The record.
    pub node: &'a NodeRecord,
    /// The key it is bound to (none for a record enrolled before keys were bound that has not
    /// connected since).
    pub identity: Option<&'a IdentityRecord>,
    /// Whether the node holds a live control session now.
    pub live: bool,
    /// An armed one-time re-enrolment, if any (expired ones included: [`decide`] checks).
    pub grant: Option<&'a ReenrolGrant>,
    /// The pending request for this claim (same node, same key), if one exists.
    pub pending: Option<&'a PendingEnrolment>,
}

/// Everything [`decide`] weighs.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// The controller's clock.
    pub now: UnixMillis,
    /// The key the request's CSR holds.
    pub key: &'a KeyHash,
    /// The hardware id the machine reported.
    pub hardware_id: &'a HardwareId,
    /// The token presented; its secret has already been checked.
    pub token: &'a TokenRecord,
    /// What the token is bound to, if it is a per-boot token.
    pub binding: Option<&'a TokenBinding>,
    /// An earlier use of this token by this key.
    pub prior_use: Option<&'a TokenUse>,
    /// When this hardware id was removed from the fleet, if it was.
    pub removed_hw_at: Option<UnixMillis>,
    /// The record the hardware id maps to, if any.
    pub existing: Option<Existing<'a>>,
}

/// How a claim onto an existing record was proven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// The machine holds the key the record is bound to.
    SameKey,
    /// A boot token minted for the MAC the node was netbooted from.
    BootTokenForMac,
    /// A boot token minted for this node (kexec into a new image).
    BootTokenForNode,
    /// An operator armed a one-time re-enrolment (`shoalctl nodes reenrol`).
    OperatorGrant,
    /// An operator approved this request (`shoalctl nodes approve`).
    Approved,
}

impl Proof {
    /// For event messages.
    pub fn describe(self) -> &'static str {
        match self {
            Proof::SameKey => "with its own key",
            Proof::BootTokenForMac => "with a boot token for its MAC",
            Proof::BootTokenForNode => "with a boot token minted for it",
            Proof::OperatorGrant => "as armed by an operator",
            Proof::Approved => "as approved by an operator",
        }
    }
}

/// What to do with an enrolment request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The same key already enrolled with this token: answer again for that node, spend nothing.
    Replay(NodeId),
    /// Create a new node bound to the key.
    Create,
    /// Bind the existing record to the key.
    Reenrol(Proof),
    /// Record (or refresh) a pending request and tell the machine to wait for an operator.
    Pending,
    /// Refuse.
    Refuse(EnrolRefusal),
}

/// Decides an enrolment request. The order matters: replays first (a lost reply must not cost the
/// machine its token), then the token, removals, the token's binding, and the claim.
pub fn decide(c: &Claim) -> Decision {
    if let (Some(prior), Some(e)) = (c.prior_use, &c.existing) {
        let same_node = e.node.id == prior.node && e.identity.is_some_and(|i| i.accepts(c.key));
        if same_node && c.token.revoked_at.is_none() {
            return Decision::Replay(prior.node.clone());
        }
    }
    match c.token.state(c.now) {
        TokenState::Valid => {}
        TokenState::Revoked => {
            return Decision::Refuse(EnrolRefusal::TokenRevoked {
                id: c.token.id.clone(),
            })
        }
        TokenState::Expired => {
            let at = c
                .token
                .expires_at
                .map(crate::time::rfc3339)
                .unwrap_or_default();
            return Decision::Refuse(EnrolRefusal::TokenExpired {
                id: c.token.id.clone(),
                at,
            });
        }
        TokenState::UsedUp => {
            return Decision::Refuse(EnrolRefusal::TokenUsedUp {
                id: c.token.id.clone(),
                uses: c.token.uses,
            })
        }
    }
    if c.removed_hw_at
        .is_some_and(|removed| removed >= c.token.created_at)
    {
        return Decision::Refuse(EnrolRefusal::NodeRemoved {
            hardware_id: c.hardware_id.to_string(),
        });
    }
    if let Some(TokenBinding::Node(bound)) = c.binding {
        if c.existing.is_none_or(|e| e.node.id != *bound) {
            return Decision::Refuse(EnrolRefusal::TokenForAnotherMachine {
                node: bound.clone(),
            });
        }
    }
    let Some(e) = c.existing else {
        return Decision::Create;
    };
    if e.identity.is_some_and(|i| i.accepts(c.key)) {
        return Decision::Reenrol(Proof::SameKey);
    }
    // An operator's denial holds whether or not the node is connected.
    if e.pending.is_some_and(|p| p.state == PendingState::Denied) {
        return Decision::Refuse(EnrolRefusal::ClaimDenied {
            node: e.node.id.clone(),
        });
    }
    if e.live {
        return Decision::Refuse(EnrolRefusal::IdentityInUse {
            node: e.node.id.clone(),
        });
    }
    match c.binding {
        Some(TokenBinding::Node(_)) => return Decision::Reenrol(Proof::BootTokenForNode),
        Some(TokenBinding::Mac(mac)) if e.node.labels.get(NETBOOT_MAC_LABEL) == Some(mac) => {
            return Decision::Reenrol(Proof::BootTokenForMac)
        }
        _ => {}
    }
    if e.grant.is_some_and(|g| c.now < g.expires_at) {
        return Decision::Reenrol(Proof::OperatorGrant);
    }
    if e.pending.is_some_and(|p| p.state == PendingState::Approved) {
        return Decision::Reenrol(Proof::Approved);
    }
    Decision::Pending
}

/// What a certificate presented on a connection is, for [`check_certificate`].
#[derive(Debug, Clone, Copy)]
pub struct Presented<'a> {
    /// The key it holds.
    pub key: &'a KeyHash,
    /// Whether its serial was revoked.
    pub serial_revoked: bool,
}

/// Whether a connection's certificate may act as its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertVerdict {
    /// Yes.
    Accept {
        /// The key the record is bound to after this connection (promotes a rotated key, binds a
        /// record that had none).
        identity: IdentityRecord,
        /// Whether the record changed and must be written.
        changed: bool,
    },
    /// The node is not in the fleet (removed).
    Removed,
    /// The certificate's serial was revoked.
    Revoked,
    /// The certificate's key is not the node's.
    WrongKey,
}

/// Checks a certificate of `node` on a new connection: the record exists, the serial is not
/// revoked, and the key is the record's. A record from before keys were bound takes the key of its
/// first connection (the certificate chains to the fleet CA and TLS proved the key).
pub fn check_certificate(
    exists: bool,
    identity: Option<&IdentityRecord>,
    cert: Presented,
    now: UnixMillis,
) -> CertVerdict {
    if !exists {
        return CertVerdict::Removed;
    }
    if cert.serial_revoked {
        return CertVerdict::Revoked;
    }
    match identity {
        None => CertVerdict::Accept {
            identity: IdentityRecord::new(*cert.key, now),
            changed: true,
        },
        Some(i) if i.key == *cert.key => CertVerdict::Accept {
            identity: i.clone(),
            changed: false,
        },
        Some(i) if i.next_key.as_ref() == Some(cert.key) => CertVerdict::Accept {
            identity: IdentityRecord::new(*cert.key, now),
            changed: true,
        },
        Some(_) => CertVerdict::WrongKey,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::NodeStatus;
    use shoal_proto::HardwareIdSource;
    use std::collections::BTreeMap;

    const NOW: UnixMillis = UnixMillis(1_000_000);

    fn token() -> TokenRecord {
        TokenRecord {
            id: "t1".into(),
            secret_sha256: [0; 32],
            created_at: UnixMillis(10),
            expires_at: None,
            max_uses: Some(1),
            uses: 0,
            revoked_at: None,
            labels: BTreeMap::new(),
        }
    }

    fn node(labels: &[(&str, &str)]) -> NodeRecord {
        NodeRecord {
            id: NodeId("n1".into()),
            hardware_id: HardwareId {
                source: HardwareIdSource::MachineId,
                value: "m1".into(),
            },
            hostname: "h".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            agent_version: String::new(),
            enrolled_at: UnixMillis(1),
            status: NodeStatus::Down,
            last_seen: None,
            inventory: None,
            inventory_at: None,
            health: None,
        }
    }

    fn existing<'a>(n: &'a NodeRecord, identity: Option<&'a IdentityRecord>) -> Existing<'a> {
        Existing {
            node: n,
            identity,
            live: false,
            grant: None,
            pending: None,
        }
    }

    static HW: HardwareId = HardwareId {
        source: HardwareIdSource::MachineId,
        value: String::new(),
    };

    fn claim<'a>(
        key: &'a KeyHash,
        token: &'a TokenRecord,
        existing: Option<Existing<'a>>,
    ) -> Claim<'a> {
        Claim {
            now: NOW,
            key,
            hardware_id: &HW,
            token,
            binding: None,
            prior_use: None,
            removed_hw_at: None,
            existing,
        }
    }

    #[test]
    fn a_general_token_creates_but_never_takes_over() {
        let (t, n) = (token(), node(&[]));
        let bound = IdentityRecord::new([1; 32], UnixMillis(1));
        assert_eq!(decide(&claim(&[2; 32], &t, None)), Decision::Create);
        assert_eq!(
            decide(&claim(&[2; 32], &t, Some(existing(&n, Some(&bound))))),
            Decision::Pending
        );
        assert_eq!(
            decide(&claim(&[2; 32], &t, Some(existing(&n, None)))),
            Decision::Pending,
            "an unbound old record too"
        );
        assert_eq!(
            decide(&claim(&[1; 32], &t, Some(existing(&n, Some(&bound))))),
            Decision::Reenrol(Proof::SameKey)
        );
    }

    #[test]
    fn a_live_node_keeps_its_identity_whatever_the_proof() {
        let (t, n) = (token(), node(&[(NETBOOT_MAC_LABEL, "52:54:00:00:00:01")]));
        let bound = IdentityRecord::new([1; 32], UnixMillis(1));
        let grant = ReenrolGrant {
            armed_at: UnixMillis(1),
            expires_at: UnixMillis(u64::MAX),
        };
        let mac = TokenBinding::Mac("52:54:00:00:00:01".into());
        let mut e = existing(&n, Some(&bound));
        e.live = true;
        e.grant = Some(&grant);
        let mut c = claim(&[2; 32], &t, Some(e));
        c.binding = Some(&mac);
        assert_eq!(
            decide(&c),
            Decision::Refuse(EnrolRefusal::IdentityInUse { node: n.id.clone() })
        );
    }

    #[test]
    fn boot_tokens_prove_only_their_own_machine() {
        let (t, n) = (token(), node(&[(NETBOOT_MAC_LABEL, "52:54:00:00:00:01")]));
        let bound = IdentityRecord::new([1; 32], UnixMillis(1));
        let right = TokenBinding::Mac("52:54:00:00:00:01".into());
        let wrong = TokenBinding::Mac("52:54:00:00:00:02".into());
        let for_node = TokenBinding::Node(n.id.clone());
        let for_other = TokenBinding::Node(NodeId("n2".into()));
        let with = |b: &TokenBinding| {
            let mut c = claim(&[2; 32], &t, Some(existing(&n, Some(&bound))));
            c.binding = Some(b);
            decide(&c)
        };
        assert_eq!(with(&right), Decision::Reenrol(Proof::BootTokenForMac));
        assert_eq!(
            with(&wrong),
            Decision::Pending,
            "another MAC's boot token is no proof for this node"
        );
        assert_eq!(with(&for_node), Decision::Reenrol(Proof::BootTokenForNode));
        assert_eq!(
            with(&for_other),
            Decision::Refuse(EnrolRefusal::TokenForAnotherMachine {
                node: NodeId("n2".into())
            })
        );
        let mut c = claim(&[2; 32], &t, None);
        c.binding = Some(&for_node);
        assert!(
            matches!(
                decide(&c),
                Decision::Refuse(EnrolRefusal::TokenForAnotherMachine { .. })
            ),
            "no record: still not this token's"
        );
        c.binding = Some(&right);
        assert_eq!(
            decide(&c),
            Decision::Create,
            "a first netboot creates its node"
        );
    }

    #[test]
    fn operator_decisions() {
        let (t, n) = (token(), node(&[]));
        let bound = IdentityRecord::new([1; 32], UnixMillis(1));
        let armed = ReenrolGrant {
            armed_at: UnixMillis(1),
            expires_at: UnixMillis(NOW.0 + 1),
        };
        let lapsed = ReenrolGrant {
            armed_at: UnixMillis(1),
            expires_at: NOW,
        };
        let mut pending = PendingEnrolment {
            id: pending_id(&n.id, &[2; 32]),
            node: n.id.clone(),
            key: [2; 32],
            hardware_id: n.hardware_id.clone(),
            hostname: "h".into(),
            token_id: "t1".into(),
            remote: "192.0.2.1:1".into(),
            first_seen: UnixMillis(1),
            last_seen: UnixMillis(1),
            attempts: 1,
            state: PendingState::Waiting,
        };
        let run = |grant: Option<&ReenrolGrant>, pending: Option<&PendingEnrolment>| {
            let mut e = existing(&n, Some(&bound));
            e.grant = grant;
            e.pending = pending;
            decide(&claim(&[2; 32], &t, Some(e)))
        };
        assert_eq!(
            run(Some(&armed), None),
            Decision::Reenrol(Proof::OperatorGrant)
        );
        assert_eq!(
            run(Some(&lapsed), None),
            Decision::Pending,
            "a lapsed grant proves nothing"
        );
        assert_eq!(run(None, Some(&pending)), Decision::Pending);
        pending.state = PendingState::Approved;
        assert_eq!(
            run(None, Some(&pending)),
            Decision::Reenrol(Proof::Approved)
        );
        pending.state = PendingState::Denied;
        assert_eq!(
            run(Some(&armed), Some(&pending)),
            Decision::Refuse(EnrolRefusal::ClaimDenied { node: n.id.clone() })
        );
    }

    #[test]
    fn a_replay_with_the_same_key_costs_nothing_but_needs_the_key() {
        let mut t = token();
        t.uses = 1; // used up by the first attempt, whose reply was lost
        let n = node(&[]);
        let bound = IdentityRecord::new([1; 32], UnixMillis(1));
        let prior = TokenUse {
            node: n.id.clone(),
            at: UnixMillis(5),
        };
        let mut c = claim(&[1; 32], &t, Some(existing(&n, Some(&bound))));
        c.prior_use = Some(&prior);
        assert_eq!(decide(&c), Decision::Replay(n.id.clone()));
        let other = [3; 32];
        c.key = &other;
        assert!(
            matches!(
                decide(&c),
                Decision::Refuse(EnrolRefusal::TokenUsedUp { .. })
            ),
            "another key is no replay"
        );
        let mut revoked = t.clone();
        revoked.revoked_at = Some(UnixMillis(6));
        let c = Claim {
            key: &[1; 32],
            token: &revoked,
            ..c
        };
        assert!(matches!(
            decide(&c),
            Decision::Refuse(EnrolRefusal::TokenRevoked { .. })
        ));
    }

    #[test]
    fn removed_hardware_needs_a_newer_token() {
        let t = token();
        let mut c = claim(&[2; 32], &t, None);
        c.removed_hw_at = Some(UnixMillis(10));
        assert!(matches!(
            decide(&c),
            Decision::Refuse(EnrolRefusal::NodeRemoved { .. })
        ));
        c.removed_hw_at = Some(UnixMillis(9));
        assert_eq!(decide(&c), Decision::Create);
    }

    #[test]
    fn certificates_must_hold_the_bound_key_and_a_live_serial() {
        let bound = IdentityRecord {
            key: [1; 32],
            next_key: Some([2; 32]),
            must_rotate: false,
            bound_at: UnixMillis(1),
        };
        let cert = |key: &'static KeyHash, serial_revoked| Presented {
            key,
            serial_revoked,
        };
        assert_eq!(
            check_certificate(false, Some(&bound), cert(&[1; 32], false), NOW),
            CertVerdict::Removed
        );
        assert_eq!(
            check_certificate(true, Some(&bound), cert(&[1; 32], true), NOW),
            CertVerdict::Revoked
        );
        assert_eq!(
            check_certificate(true, Some(&bound), cert(&[3; 32], false), NOW),
            CertVerdict::WrongKey
        );
        assert_eq!(
            check_certificate(true, Some(&bound), cert(&[1; 32], false), NOW),
            CertVerdict::Accept {
                identity: bound.clone(),
                changed: false
            }
        );
        assert_eq!(
            check_certificate(true, Some(&bound), cert(&[2; 32], false), NOW),
            CertVerdict::Accept {
                identity: IdentityRecord::new([2; 32], NOW),
                changed: true
            },
            "the first connection with the rotated key promotes it and drops the old one"
        );
        assert_eq!(
            check_certificate(true, None, cert(&[4; 32], false), NOW),
            CertVerdict::Accept {
                identity: IdentityRecord::new([4; 32], NOW),
                changed: true
            },
            "a record from before keys were bound takes its first connection's key"
        );
    }
}
