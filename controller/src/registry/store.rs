//! The registry's tables: join tokens, nodes, hardware ids, removals, and the one transaction that
//! enrols a machine (the decision is `shoal_controller_core::enrolment::decide`). Identity tables
//! (keys, certificates, grants, pending claims) are in [`super::identity_store`].
//!
//! | table | key | value |
//! |---|---|---|
//! | `tokens` | token id | [`TokenRecord`] |
//! | `token_bindings` | token id | [`TokenBinding`] |
//! | `token_uses` | token id, 0, key hash | `TokenUse` |
//! | `nodes` | node id | [`NodeRecord`] |
//! | `hwid` | hardware id display text (`dmi-uuid:…`) | node id |
//! | `removed_nodes` | node id | [`UnixMillis`] of removal |
//! | `removed_hw` | hardware id display text | [`UnixMillis`] of removal |

use std::fmt;

use sha2::{Digest, Sha256};
use shoal_proto::{HardwareId, NodeId, UnixMillis};

use crate::store::{
    abort, decode, encode, rfc3339, EventKind, RegistryEvent, Scan, Store, StoreError, Table,
    TxError, EVENTS,
};
use shoal_controller_core::{
    enrolment::{
        self, Claim, Decision, Existing, IdentityRecord, KeyHash, PendingEnrolment, PendingState,
        Proof, ReenrolGrant, TokenUse,
    },
    labels::{self, LabelChange, LabelChangeError, LabelEdit},
    registry::{EnrolRefusal, NodeRecord, NodeStatus, TokenBinding, TokenRecord},
};

/// Why a label change did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabelsError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The change breaks a rule ([`labels::apply`]).
    #[error(transparent)]
    Refused(LabelChangeError),
}

pub(crate) const TOKENS: &str = "tokens";
pub(crate) const TOKEN_BINDINGS: &str = "token_bindings";
pub(crate) const TOKEN_USES: &str = "token_uses";
pub(crate) const IDENTITIES: &str = "identities";
pub(crate) const REENROL_GRANTS: &str = "reenrol_grants";
pub(crate) const PENDING_ENROLMENTS: &str = "pending_enrolments";
pub(crate) const CERTS: &str = "certs";
pub(crate) const REVOKED_CERTS: &str = "revoked_certs";
pub(crate) const NODES: &str = "nodes";
pub(crate) const HWID: &str = "hwid";
pub(crate) const REMOVED_NODES: &str = "removed_nodes";
pub(crate) const REMOVED_HW: &str = "removed_hw";
/// `tokens`, typed.
pub(crate) const TOKEN_RECORDS: Table<TokenRecord> = Table::new(TOKENS);
/// `token_bindings`, typed.
pub(crate) const TOKEN_BINDING_RECORDS: Table<TokenBinding> = Table::new(TOKEN_BINDINGS);
/// `nodes`, typed.
pub(crate) const NODE_RECORDS: Table<NodeRecord> = Table::new(NODES);
/// `removed_nodes`, typed: when each node id was removed.
pub(crate) const REMOVALS: Table<UnixMillis> = Table::new(REMOVED_NODES);
/// Why [`Store::enrol`] did not enrol.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    /// The request was refused.
    #[error(transparent)]
    Refused(#[from] EnrolRefusal),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The inputs of [`Store::enrol`].
pub struct EnrolParams<'a> {
    /// The join token's id.
    pub token_id: &'a str,
    /// The join token's secret.
    pub secret: &'a str,
    /// The machine's identity.
    pub hardware_id: &'a HardwareId,
    /// The machine's hostname.
    pub hostname: &'a str,
    /// The controller's clock.
    pub now: UnixMillis,
    /// SHA-256 of the SubjectPublicKeyInfo in the request's CSR: the key the node will be bound to.
    pub key: &'a KeyHash,
    /// Where the request came from, for the operator.
    pub remote: &'a str,
    /// Whether a node holds a live control session now (asked inside the transaction).
    pub is_live: &'a dyn Fn(&NodeId) -> bool,
}

impl fmt::Debug for EnrolParams<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrolParams")
            .field("token_id", &self.token_id)
            .field("secret", &"<redacted>")
            .field("hardware_id", &self.hardware_id)
            .field("hostname", &self.hostname)
            .field("now", &self.now)
            .field("key", &hex::encode(self.key))
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// The outcome of a successful [`Store::enrol`].
#[derive(Debug, Clone, PartialEq)]
pub struct Enrolment {
    /// The node's record as stored.
    pub node: NodeRecord,
    /// Whether the node was created (false: a known machine kept its record).
    pub new: bool,
    /// How a re-enrolment onto an existing record was proven.
    pub proof: Option<Proof>,
    /// A repeat of an enrolment already made with the same token and key: nothing was written.
    pub replay: bool,
}

/// What the enrolment transaction decided (refusals that carry an event still commit).
enum TxOutcome {
    Enrolled(Box<Enrolment>, Option<u64>),
    Refused(EnrolRefusal, Option<u64>),
}

/// Key of `token_uses`: token id, 0, key hash.
fn token_use_key(token_id: &str, key: &KeyHash) -> Vec<u8> {
    let mut k = token_id.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(key);
    k
}

/// Compares two hashes in time independent of where they differ.
fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn new_node_id() -> NodeId {
    let n: u64 = rand::random::<u64>() & 0xff_ffff_ffff;
    NodeId(format!("n{n:010x}"))
}

impl Store {
    /// Stores a new token (replacing one with the same id) and logs a `TokenCreated` event, in one
    /// transaction; on disk when this returns.
    pub fn create_token(&self, rec: &TokenRecord) -> Result<(), StoreError> {
        let mut message = format!("join token {} created", rec.id);
        if let Some(at) = rec.expires_at {
            message.push_str(&format!(", expires {}", rfc3339(at)));
        }
        if let Some(max) = rec.max_uses {
            message.push_str(&format!(", at most {max} uses"));
        }
        self.store_token(rec, None, &message)
    }

    /// Stores a per-boot token with what it is bound to, and logs a `TokenCreated` event, in one
    /// transaction; on disk when this returns.
    pub fn create_bound_token(
        &self,
        rec: &TokenRecord,
        binding: &TokenBinding,
    ) -> Result<(), StoreError> {
        let message = match binding {
            TokenBinding::Mac(mac) => format!("boot token {} created for {mac}", rec.id),
            TokenBinding::Node(node) => format!("boot token {} created for node {node}", rec.id),
        };
        self.store_token(rec, Some(binding), &message)
    }

    /// Writes a token, its binding if any, and its `TokenCreated` event in one flushed transaction.
    fn store_token(
        &self,
        rec: &TokenRecord,
        binding: Option<&TokenBinding>,
        message: &str,
    ) -> Result<(), StoreError> {
        self.check_space()?;
        let bytes = encode("token", rec)?;
        let bound = binding.map(|b| encode("token binding", b)).transpose()?;
        let event = self.transaction(&[TOKENS, TOKEN_BINDINGS, EVENTS], |tx| {
            let tokens = tx.table(TOKENS);
            tokens.insert(rec.id.as_bytes(), bytes.as_slice())?;
            if let Some(bound) = &bound {
                tx.table(TOKEN_BINDINGS)
                    .insert(rec.id.as_bytes(), bound.as_slice())?;
            }
            let event = self.tx_event::<StoreError>(
                &tx.table(EVENTS),
                EventKind::Registry(RegistryEvent::TokenCreated),
                None,
                message,
                rec.created_at,
            )?;
            tokens.flush();
            Ok(event)
        })?;
        self.after_event(event.seq)
    }

    /// What a token is bound to, if it is a per-boot token.
    pub fn token_binding(&self, id: &str) -> Result<Option<TokenBinding>, StoreError> {
        self.get(&TOKEN_BINDING_RECORDS, id)
    }

    /// All tokens, oldest first.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.records(&TOKEN_RECORDS, Scan::all())? {
            out.push(item?.1);
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    /// Revokes a token and logs a `TokenRevoked` event, in one transaction; on disk when this
    /// returns. `None` if no token has this id; revoking a revoked token changes nothing and
    /// returns it.
    pub fn revoke_token(
        &self,
        id: &str,
        now: UnixMillis,
    ) -> Result<Option<TokenRecord>, StoreError> {
        self.check_space()?;
        let message = format!("join token {id} revoked");
        let result = self.transaction(&[TOKENS, EVENTS], |tx| {
            let (tokens, events) = (tx.table(TOKENS), tx.table(EVENTS));
            {
                let Some(mut rec) = tx.get(&TOKEN_RECORDS, id.as_bytes())? else {
                    return Ok(None);
                };
                if rec.revoked_at.is_some() {
                    return Ok(Some((rec, None)));
                }
                rec.revoked_at = Some(now);
                tx.put(&TOKEN_RECORDS, id.as_bytes(), &rec)?;
                let event = self.tx_event::<StoreError>(
                    &events,
                    EventKind::Registry(RegistryEvent::TokenRevoked),
                    None,
                    &message,
                    now,
                )?;
                tokens.flush();
                Ok(Some((rec, Some(event.seq))))
            }
        })?;
        match result {
            None => Ok(None),
            Some((rec, seq)) => {
                if let Some(seq) = seq {
                    self.after_event(seq)?;
                }
                Ok(Some(rec))
            }
        }
    }

    /// Enrols a machine, as [`enrolment::decide`] rules, in ONE transaction over the token, its
    /// uses, the node and its key binding, the hardware-id index, removals, grants, pending
    /// requests and the event log; flushes before returning. The secret is compared in constant
    /// time first. A created node gets the id "n" + 10 random hex digits; a re-enrolled one keeps
    /// its record (id and `enrolled_at`; hostname updated; labels merged from the token, the
    /// token's winning) and is bound to the new key. A replay (same token, same key) spends nothing
    /// and writes nothing. Refusals that the operator must hear of (a claim of a live node, a
    /// pending request) are written with their event before the refusal is returned.
    pub fn enrol(&self, p: &EnrolParams) -> Result<Enrolment, EnrolError> {
        self.check_space()?;
        let secret_sha256: [u8; 32] = Sha256::digest(p.secret.as_bytes()).into();
        let hw_key = p.hardware_id.to_string();
        let nodes_guard = self.lock_nodes();
        // Read under the node lock, which every writer of pending requests holds: the caps need a
        // scan, which a sled transaction cannot do.
        let pending_all = self.pending_enrolments()?;
        let use_key = token_use_key(p.token_id, p.key);
        let binding = self.token_binding(p.token_id)?;
        let tables = [
            TOKENS,
            NODES,
            HWID,
            REMOVED_NODES,
            REMOVED_HW,
            EVENTS,
            IDENTITIES,
            TOKEN_USES,
            REENROL_GRANTS,
            PENDING_ENROLMENTS,
        ];
        let outcome = self.transaction(&tables, |tx| {
            let [tokens, nodes, hwid, removed_nodes, removed_hw, events, identities, token_uses, grants, pendings] =
                tables.map(|t| tx.table(t));
            {
                let Some(bytes) = tokens.get(p.token_id.as_bytes())? else {
                    return Ok(TxOutcome::Refused(EnrolRefusal::TokenUnknown, None));
                };
                let mut token: TokenRecord = decode(TOKENS, p.token_id.as_bytes(), &bytes).map_err(abort)?;
                if !hashes_equal(&token.secret_sha256, &secret_sha256) {
                    return Ok(TxOutcome::Refused(EnrolRefusal::TokenUnknown, None));
                }
                let prior_use: Option<TokenUse> = match token_uses.get(&use_key)? {
                    Some(b) => Some(decode(TOKEN_USES, &use_key, &b).map_err(abort)?),
                    None => None,
                };
                let removed_hw_at: Option<UnixMillis> = match removed_hw.get(hw_key.as_bytes())? {
                    Some(b) => Some(decode(REMOVED_HW, hw_key.as_bytes(), &b).map_err(abort)?),
                    None => None,
                };
                let record = match hwid.get(hw_key.as_bytes())? {
                    Some(id_bytes) => match nodes.get(&id_bytes)? {
                        Some(bytes) => Some(decode::<NodeRecord>(NODES, &id_bytes, &bytes).map_err(abort)?),
                        None => None, // a dangling index entry: treat the machine as new
                    },
                    None => None,
                };
                let identity: Option<IdentityRecord> = match &record {
                    Some(n) => match identities.get(n.id.0.as_bytes())? {
                        Some(b) => Some(decode(IDENTITIES, n.id.0.as_bytes(), &b).map_err(abort)?),
                        None => None,
                    },
                    None => None,
                };
                let grant: Option<ReenrolGrant> = match &record {
                    Some(n) => match grants.get(n.id.0.as_bytes())? {
                        Some(b) => Some(decode(REENROL_GRANTS, n.id.0.as_bytes(), &b).map_err(abort)?),
                        None => None,
                    },
                    None => None,
                };
                // The request itself is read in the transaction (another controller may have
                // counted an attempt); the scan outside only feeds the caps.
                let pending: Option<PendingEnrolment> = match &record {
                    Some(n) => {
                        let id = enrolment::pending_id(&n.id, p.key);
                        match pendings.get(id.as_bytes())? {
                            Some(b) => Some(decode(PENDING_ENROLMENTS, id.as_bytes(), &b).map_err(abort)?),
                            None => None,
                        }
                    }
                    None => None,
                };
                let existing = record.as_ref().map(|n| Existing {
                    node: n,
                    identity: identity.as_ref(),
                    live: (p.is_live)(&n.id),
                    grant: grant.as_ref(),
                    pending: pending.as_ref(),
                });
                let decision = enrolment::decide(&Claim {
                    now: p.now,
                    key: p.key,
                    hardware_id: p.hardware_id,
                    token: &token,
                    binding: binding.as_ref(),
                    prior_use: prior_use.as_ref(),
                    removed_hw_at,
                    existing,
                });
                let (node, new, proof) = match decision {
                    Decision::Replay(_) => {
                        let node = record.clone().ok_or_else(|| abort(StoreError::Db("replayed node vanished".into())))?;
                        return Ok(TxOutcome::Enrolled(Box::new(Enrolment { node, new: false, proof: None, replay: true }), None));
                    }
                    Decision::Refuse(r) => {
                        // A claim of a live node is an attack or a clash the operator must hear of.
                        let seq = match &r {
                            EnrolRefusal::IdentityInUse { node } | EnrolRefusal::ClaimDenied { node } => {
                                let message = format!(
                                    "{} ({hw_key}) from {} claimed this node's identity with join token {} and was refused: {r}",
                                    p.hostname, p.remote, token.id
                                );
                                Some(self.tx_event::<EnrolError>(&events, EventKind::Registry(RegistryEvent::ClaimRefused), Some(node), &message, p.now)?.seq)
                            }
                            _ => None,
                        };
                        return Ok(TxOutcome::Refused(r, seq));
                    }
                    Decision::Pending => {
                        let Some(n) = &record else { return Err(abort(StoreError::Db("pending without a record".into()))) };
                        let id = enrolment::pending_id(&n.id, p.key);
                        let mut request = match pending {
                            Some(q) => q,
                            None => {
                                let for_node = pending_all.iter().filter(|q| q.node == n.id).count();
                                if pending_all.len() >= enrolment::MAX_PENDING || for_node >= enrolment::MAX_PENDING_PER_NODE {
                                    return Ok(TxOutcome::Refused(EnrolRefusal::TooManyPending { pending: pending_all.len() }, None));
                                }
                                PendingEnrolment {
                                    id: id.clone(),
                                    node: n.id.clone(),
                                    key: *p.key,
                                    hardware_id: p.hardware_id.clone(),
                                    hostname: p.hostname.to_owned(),
                                    token_id: token.id.clone(),
                                    remote: p.remote.to_owned(),
                                    first_seen: p.now,
                                    last_seen: p.now,
                                    attempts: 0,
                                    state: PendingState::Waiting,
                                }
                            }
                        };
                        let first = request.attempts == 0;
                        request.attempts = request.attempts.saturating_add(1);
                        request.last_seen = p.now;
                        request.remote = p.remote.to_owned();
                        pendings.insert(id.as_bytes(), encode("pending enrolment", &request).map_err(abort)?)?;
                        let seq = if first {
                            let message = format!(
                                "{} ({hw_key}) from {} claims this node with join token {} and a new key: pending request {id} waits for `shoalctl nodes approve {id}`",
                                p.hostname, p.remote, token.id
                            );
                            Some(self.tx_event::<EnrolError>(&events, EventKind::Registry(RegistryEvent::EnrolmentPending), Some(&n.id), &message, p.now)?.seq)
                        } else {
                            None
                        };
                        return Ok(TxOutcome::Refused(EnrolRefusal::AwaitingApproval { node: n.id.clone(), request: id }, seq));
                    }
                    Decision::Create => {
                        let mut id = new_node_id();
                        let mut attempts = 0;
                        while nodes.get(id.0.as_bytes())?.is_some() || removed_nodes.get(id.0.as_bytes())?.is_some() {
                            attempts += 1;
                            if attempts > 64 {
                                return Err(abort(StoreError::Db("cannot find an unused node id".into())));
                            }
                            id = new_node_id();
                        }
                        let node = NodeRecord {
                            id,
                            hardware_id: p.hardware_id.clone(),
                            hostname: p.hostname.to_owned(),
                            labels: token.labels.clone(),
                            agent_version: String::new(),
                            enrolled_at: p.now,
                            status: NodeStatus::Down,
                            last_seen: Some(p.now),
                            inventory: None,
                            inventory_at: None,
                            health: None,
                        };
                        (node, true, None)
                    }
                    Decision::Reenrol(proof) => {
                        let Some(mut node) = record.clone() else {
                            return Err(abort(StoreError::Db("re-enrolment without a record".into())));
                        };
                        node.hostname = p.hostname.to_owned();
                        node.hardware_id = p.hardware_id.clone();
                        node.last_seen = Some(p.now);
                        for (k, v) in &token.labels {
                            node.labels.insert(k.clone(), v.clone());
                        }
                        match proof {
                            Proof::OperatorGrant => {
                                grants.remove(node.id.0.as_bytes())?;
                            }
                            Proof::Approved => {
                                pendings.remove(enrolment::pending_id(&node.id, p.key).as_bytes())?;
                            }
                            _ => {}
                        }
                        (node, false, Some(proof))
                    }
                };
                if removed_hw_at.is_some() {
                    // Admitted by a token created after the removal: the removal no longer applies
                    // to the machine.
                    removed_hw.remove(hw_key.as_bytes())?;
                }
                token.uses = token.uses.saturating_add(1);
                tokens.insert(p.token_id.as_bytes(), encode("token", &token).map_err(abort)?)?;
                token_uses.insert(use_key.as_slice(), encode("token use", &TokenUse { node: node.id.clone(), at: p.now }).map_err(abort)?)?;
                nodes.insert(node.id.0.as_bytes(), encode("node", &node).map_err(abort)?)?;
                hwid.insert(hw_key.as_bytes(), node.id.0.as_bytes())?;
                identities.insert(node.id.0.as_bytes(), encode("identity", &IdentityRecord::new(*p.key, p.now)).map_err(abort)?)?;
                let message = match proof {
                    None => format!("{} ({hw_key}) enrolled with join token {}", p.hostname, token.id),
                    Some(proof) => format!("{} ({hw_key}) re-enrolled {} with join token {}", p.hostname, proof.describe(), token.id),
                };
                let kind = if new { EventKind::Registry(RegistryEvent::Enrolled) } else { EventKind::Registry(RegistryEvent::Reenrolled) };
                let event = self.tx_event::<EnrolError>(&events, kind, Some(&node.id), &message, p.now)?;
                tokens.flush();
                Ok(TxOutcome::Enrolled(Box::new(Enrolment { node, new, proof, replay: false }), Some(event.seq)))
            }
        })?;
        drop(nodes_guard);
        match outcome {
            TxOutcome::Enrolled(enrolment, seq) => {
                if let Some(seq) = seq {
                    self.after_event(seq)?;
                }
                Ok(*enrolment)
            }
            TxOutcome::Refused(r, seq) => {
                if let Some(seq) = seq {
                    self.flush()?;
                    self.after_event(seq)?;
                }
                Err(EnrolError::Refused(r))
            }
        }
    }

    /// One node's record.
    pub fn node(&self, id: &NodeId) -> Result<Option<NodeRecord>, StoreError> {
        self.get(&NODE_RECORDS, id.0.as_bytes())
    }

    /// The node's hostname for messages, or its id when the record is missing or unreadable.
    pub fn hostname_or_id(&self, id: &NodeId) -> String {
        self.node(id)
            .ok()
            .flatten()
            .map(|n| n.hostname)
            .unwrap_or_else(|| id.0.clone())
    }

    /// All nodes, sorted by hostname, then id.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.records(&NODE_RECORDS, Scan::all())? {
            out.push(item?.1);
        }
        out.sort_by(|a, b| (&a.hostname, &a.id).cmp(&(&b.hostname, &b.id)));
        Ok(out)
    }

    /// Applies `f` to the stored record (if present) and writes it back, in one transaction;
    /// returns the new record. `f` may run more than once (when another writer — another
    /// controller — changed the record meanwhile, it runs again on the new one), so it must only
    /// change the record and not call back into the store. Not flushed: it reaches the disk within
    /// the background flush interval (200 ms). Changes `f` makes to the record's id or hardware id
    /// are ignored.
    pub fn update_node(
        &self,
        id: &NodeId,
        f: impl Fn(&mut NodeRecord),
    ) -> Result<Option<NodeRecord>, StoreError> {
        self.check_space()?;
        let key = id.0.as_bytes();
        self.transaction(&[NODES], |tx| {
            let Some(mut node) = tx.get(&NODE_RECORDS, key)? else {
                return Ok(None);
            };
            let (kept_id, kept_hw) = (node.id.clone(), node.hardware_id.clone());
            f(&mut node);
            node.id = kept_id;
            node.hardware_id = kept_hw;
            tx.put(&NODE_RECORDS, key, &node)?;
            Ok::<_, TxError<StoreError>>(Some(node))
        })
    }

    /// Deletes the node, records its id and hardware id as removed at `now`, appends a Removed
    /// event — one transaction; flushes. `None` if no node has this id.
    pub fn remove_node(
        &self,
        id: &NodeId,
        now: UnixMillis,
    ) -> Result<Option<NodeRecord>, StoreError> {
        self.check_space()?;
        let nodes_guard = self.lock_nodes();
        let now_bytes = encode("time", &now)?;
        let tables = [
            NODES,
            HWID,
            REMOVED_NODES,
            REMOVED_HW,
            EVENTS,
            IDENTITIES,
            REENROL_GRANTS,
        ];
        let result = self.transaction(&tables, |tx| {
            let [nodes, hwid, removed_nodes, removed_hw, events, identities, grants] =
                tables.map(|t| tx.table(t));
            {
                let key = id.0.as_bytes();
                let Some(bytes) = nodes.remove(key)? else {
                    return Ok(None);
                };
                identities.remove(key)?;
                grants.remove(key)?;
                let node: NodeRecord = decode(NODES, key, &bytes).map_err(abort)?;
                let hw_key = node.hardware_id.to_string();
                if hwid.get(hw_key.as_bytes())?.as_deref() == Some(key) {
                    hwid.remove(hw_key.as_bytes())?;
                }
                removed_nodes.insert(key, now_bytes.as_slice())?;
                removed_hw.insert(hw_key.as_bytes(), now_bytes.as_slice())?;
                let message = format!("{} ({hw_key}) removed from the fleet", node.hostname);
                let event = self.tx_event::<StoreError>(
                    &events,
                    EventKind::Registry(RegistryEvent::Removed),
                    Some(id),
                    &message,
                    now,
                )?;
                nodes.flush();
                Ok(Some((node, event.seq)))
            }
        })?;
        drop(nodes_guard);
        match result {
            None => Ok(None),
            Some((node, seq)) => {
                self.after_event(seq)?;
                Ok(Some(node))
            }
        }
    }

    /// Changes a node's labels as [`labels::apply`] rules, with a `labels_changed` event naming
    /// every change, in one transaction; flushed. Returns the record and what changed (nothing
    /// changed: no write, no event). `None` if no node has this id.
    pub fn change_labels(
        &self,
        id: &NodeId,
        change: &LabelChange,
        now: UnixMillis,
    ) -> Result<Option<(NodeRecord, Vec<LabelEdit>)>, LabelsError> {
        self.check_space()?;
        let key = id.0.as_bytes();
        let result = self.transaction(&[NODES, EVENTS], |tx| {
            let events = tx.table(EVENTS);
            let Some(mut node) = tx.get(&NODE_RECORDS, key)? else {
                return Ok(None);
            };
            let edits = labels::apply(&mut node.labels, change)
                .map_err(|e| TxError::Abort(LabelsError::Refused(e)))?;
            if edits.is_empty() {
                return Ok(Some((node, edits, None)));
            }
            tx.put(&NODE_RECORDS, key, &node)?;
            let list: Vec<String> = edits.iter().map(ToString::to_string).collect();
            let message = format!("labels of {} changed: {}", node.hostname, list.join(", "));
            let event = self.tx_event::<LabelsError>(
                &events,
                EventKind::Registry(RegistryEvent::LabelsChanged),
                Some(id),
                &message,
                now,
            )?;
            events.flush();
            Ok(Some((node, edits, Some(event.seq))))
        })?;
        let Some((node, edits, seq)) = result else {
            return Ok(None);
        };
        if let Some(seq) = seq {
            self.after_event(seq)?;
        }
        Ok(Some((node, edits)))
    }

    /// When a node id was removed (so a still-valid certificate for it is refused).
    pub fn removed_at(&self, id: &NodeId) -> Result<Option<UnixMillis>, StoreError> {
        self.get(&REMOVALS, id.0.as_bytes())
    }
}
