//! The store's side of node identity: key bindings, issued certificates and their revocation,
//! one-time re-enrolments, pending claims, and pruning what has lapsed. The rules are in
//! [`shoal_controller_core::enrolment`]; this module only reads and writes.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `identities` | node id | [`IdentityRecord`] |
//! | `certs` | serial (hex) | [`CertRecord`] |
//! | `revoked_certs` | serial (hex) | [`RevokedCert`] |
//! | `token_uses` | token id, 0, key hash | [`TokenUse`] |
//! | `token_bindings` | token id | [`super::TokenBinding`] |
//! | `reenrol_grants` | node id | [`ReenrolGrant`] |
//! | `pending_enrolments` | request id | [`PendingEnrolment`] |

use crate::store::RegistryEvent;
use serde::{Deserialize, Serialize};
use shoal_proto::{NodeId, UnixMillis};

use super::store::{
    CERTS, IDENTITIES, NODES, PENDING_ENROLMENTS, REENROL_GRANTS, REVOKED_CERTS, TOKENS,
    TOKEN_BINDINGS, TOKEN_USES,
};
use crate::store::{
    abort, decode, delete_keys, encode, EventKind, Scan, Store, StoreError, Table, TxError, EVENTS,
};
use shoal_controller_core::enrolment::{
    check_certificate, CertVerdict, IdentityRecord, KeyHash, PendingEnrolment, PendingState,
    Presented, ReenrolGrant, TokenUse, PENDING_TTL_MS,
};
use shoal_controller_core::registry::{TokenRecord, TokenState};

/// `identities`, typed.
const IDENTITY_RECORDS: Table<IdentityRecord> = Table::new(IDENTITIES);
/// `pending_enrolments`, typed.
const PENDING_RECORDS: Table<PendingEnrolment> = Table::new(PENDING_ENROLMENTS);

/// A certificate the CA issued (tree `certs`), kept until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    /// The node it names.
    pub node: NodeId,
    /// The key it certifies.
    pub key: KeyHash,
    /// When it was issued.
    pub issued_at: UnixMillis,
    /// When it expires.
    pub not_after: UnixMillis,
}

/// A revoked certificate (tree `revoked_certs`), kept until the certificate would have expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCert {
    /// The node it names.
    pub node: NodeId,
    /// When it was revoked.
    pub revoked_at: UnixMillis,
    /// When it expires (after which TLS refuses it anyway).
    pub not_after: UnixMillis,
    /// The operator's reason.
    pub reason: String,
}

/// A lapsed per-boot token is kept this long (replays of a lost reply), a general one a day (the
/// operator sees it in `token list`).
const BOUND_TOKEN_RETENTION_MS: u64 = 10 * 60 * 1000;
const TOKEN_RETENTION_MS: u64 = 24 * 3600 * 1000;

/// What [`Store::prune`] deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Tokens (with their uses and bindings).
    pub tokens: usize,
    /// Pending requests that lapsed.
    pub pending: usize,
    /// Re-enrolment grants that lapsed.
    pub grants: usize,
    /// Expired certificate and revocation records.
    pub certs: usize,
}

/// Normalised serial text: lower-case hex without separators.
pub fn normal_serial(serial: &str) -> String {
    serial
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

impl Store {
    /// The key a node is bound to.
    pub fn identity(&self, node: &NodeId) -> Result<Option<IdentityRecord>, StoreError> {
        self.get(&IDENTITY_RECORDS, node.0.as_bytes())
    }

    /// Whether a serial was revoked.
    pub fn cert_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        self.table(REVOKED_CERTS)
            .contains_key(normal_serial(serial).as_bytes())
    }

    /// Checks a connection's certificate ([`check_certificate`]) and writes what the verdict
    /// changes: a promoted rotation, or the first binding of a record from before keys were bound.
    /// A refusal is logged as an event. The node lock serialises this with enrolment.
    pub fn check_connection(
        &self,
        node: &NodeId,
        key: &KeyHash,
        serial: &str,
        not_after: UnixMillis,
        now: UnixMillis,
        remote: &str,
    ) -> Result<CertVerdict, StoreError> {
        let _guard = self.lock_nodes();
        let serial = normal_serial(serial);
        // Decided and written in one transaction: another controller may change the binding.
        let (verdict, identity) = self.transaction(&[NODES, IDENTITIES, REVOKED_CERTS], |tx| {
            let exists = tx.table(NODES).get(node.0.as_bytes())?.is_some();
            let identity = tx.get(&IDENTITY_RECORDS, node.0.as_bytes())?;
            let serial_revoked = tx.table(REVOKED_CERTS).get(serial.as_bytes())?.is_some();
            let verdict = check_certificate(
                exists,
                identity.as_ref(),
                Presented {
                    key,
                    serial_revoked,
                },
                now,
            );
            if let CertVerdict::Accept {
                identity: bound,
                changed: true,
            } = &verdict
            {
                self.check_space().map_err(abort)?;
                tx.put(&IDENTITY_RECORDS, node.0.as_bytes(), bound)?;
            }
            Ok::<_, TxError<StoreError>>((verdict, identity))
        })?;
        match &verdict {
            CertVerdict::Accept {
                identity: bound,
                changed,
            } => {
                if *changed {
                    match identity {
                        Some(old) if old.key != bound.key => {
                            let message =
                                format!("connected with its rotated key {}", short_key(&bound.key));
                            self.append_event(
                                EventKind::Registry(RegistryEvent::KeyRotated),
                                Some(node),
                                &message,
                                now,
                            )?;
                        }
                        _ => {}
                    }
                }
                // Certificates issued before serials were recorded are learnt on first sight.
                if !self.table(CERTS).contains_key(serial.as_bytes())? {
                    self.check_space()?;
                    let rec = CertRecord {
                        node: node.clone(),
                        key: *key,
                        issued_at: now,
                        not_after,
                    };
                    self.table(CERTS)
                        .insert(serial.as_bytes(), encode("cert", &rec)?)?;
                }
            }
            CertVerdict::WrongKey | CertVerdict::Revoked => {
                let why = if matches!(verdict, CertVerdict::Revoked) {
                    format!("its serial {serial} was revoked")
                } else {
                    format!("its key {} is not the node's", short_key(key))
                };
                let message = format!("a connection from {remote} presented a certificate of this node and was refused: {why}");
                self.append_event(
                    EventKind::Registry(RegistryEvent::CertificateRefused),
                    Some(node),
                    &message,
                    now,
                )?;
            }
            CertVerdict::Removed => {}
        }
        Ok(verdict)
    }

    /// Records a certificate the CA just issued; on disk when this returns, before it is sent.
    pub fn record_cert(&self, serial: &str, rec: &CertRecord) -> Result<(), StoreError> {
        self.check_space()?;
        self.table(CERTS)
            .insert(normal_serial(serial).as_bytes(), encode("cert", rec)?)?;
        self.flush()
    }

    /// A node's unexpired certificates, newest first, each with its revocation if any.
    pub fn certs_of(
        &self,
        node: &NodeId,
    ) -> Result<Vec<(String, CertRecord, Option<RevokedCert>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.table(CERTS).scan(Scan::all()) {
            let (k, v) = item?;
            let rec: CertRecord = decode(CERTS, &k, &v)?;
            if rec.node != *node {
                continue;
            }
            let revoked = match self.table(REVOKED_CERTS).get(&k)? {
                Some(b) => Some(decode::<RevokedCert>(REVOKED_CERTS, &k, &b)?),
                None => None,
            };
            out.push((String::from_utf8_lossy(&k).into_owned(), rec, revoked));
        }
        out.sort_by_key(|c| std::cmp::Reverse(c.1.issued_at));
        Ok(out)
    }

    /// Revokes a certificate by serial, with an event, in one transaction. When the certificate
    /// holds the node's current key, the node must also rotate to a new key (a copy of that key may
    /// be out there). `None` when no unexpired certificate has this serial. Revoking twice changes
    /// nothing.
    pub fn revoke_cert(
        &self,
        serial: &str,
        reason: &str,
        now: UnixMillis,
    ) -> Result<Option<(CertRecord, bool)>, StoreError> {
        self.check_space()?;
        let serial = normal_serial(serial);
        let _guard = self.lock_nodes();
        let Some(bytes) = self.table(CERTS).get(serial.as_bytes())? else {
            return Ok(None);
        };
        let rec: CertRecord = decode(CERTS, serial.as_bytes(), &bytes)?;
        let result = self.transaction(&[REVOKED_CERTS, IDENTITIES, EVENTS], |tx| {
            let (revoked, identities, events) = (
                tx.table(REVOKED_CERTS),
                tx.table(IDENTITIES),
                tx.table(EVENTS),
            );
            if revoked.get(serial.as_bytes())?.is_some() {
                return Ok((false, None));
            }
            let entry = RevokedCert {
                node: rec.node.clone(),
                revoked_at: now,
                not_after: rec.not_after,
                reason: reason.to_owned(),
            };
            revoked.insert(
                serial.as_bytes(),
                encode("revoked cert", &entry).map_err(abort)?,
            )?;
            let mut current = false;
            if let Some(b) = identities.get(rec.node.0.as_bytes())? {
                let mut identity: IdentityRecord =
                    decode(IDENTITIES, rec.node.0.as_bytes(), &b).map_err(abort)?;
                if identity.accepts(&rec.key) {
                    current = true;
                    identity.must_rotate = true;
                    identity.next_key = identity.next_key.filter(|k| *k != rec.key);
                    identities.insert(
                        rec.node.0.as_bytes(),
                        encode("identity", &identity).map_err(abort)?,
                    )?;
                }
            }
            let mut message = format!("certificate {serial} revoked: {reason}");
            if current {
                message.push_str(
                    "; it holds the node's current key, so the node must rotate to a new one",
                );
            }
            let event = self.tx_event::<StoreError>(
                &events,
                EventKind::Registry(RegistryEvent::CertificateRevoked),
                Some(&rec.node),
                &message,
                now,
            )?;
            revoked.flush();
            Ok((current, Some(event.seq)))
        })?;
        if let (_, Some(seq)) = result {
            self.after_event(seq)?;
        }
        Ok(Some((rec, result.0)))
    }

    /// Marks a node as having to rotate its key on its next session (`shoalctl nodes rotate-key`).
    pub fn require_rotation(&self, node: &NodeId, now: UnixMillis) -> Result<bool, StoreError> {
        let _guard = self.lock_nodes();
        self.check_space()?;
        let found = self.transaction(&[IDENTITIES], |tx| {
            let Some(mut identity) = tx.get(&IDENTITY_RECORDS, node.0.as_bytes())? else {
                return Ok::<_, TxError<StoreError>>(false);
            };
            identity.must_rotate = true;
            tx.put(&IDENTITY_RECORDS, node.0.as_bytes(), &identity)?;
            tx.table(IDENTITIES).flush();
            Ok(true)
        })?;
        if !found {
            return Ok(false);
        }
        self.append_event(
            EventKind::Registry(RegistryEvent::KeyRotated),
            Some(node),
            "an operator asked the node to rotate its key",
            now,
        )?;
        Ok(true)
    }

    /// A key rotation the old key signed: `new_key` becomes the node's next key (both are accepted
    /// until the node connects with the new one) and the rotation demand is met. Idempotent for the
    /// same key.
    pub fn begin_rotation(
        &self,
        node: &NodeId,
        new_key: &KeyHash,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        let _guard = self.lock_nodes();
        self.check_space()?;
        // Read and written in one transaction: another controller may change the binding.
        let changed = self.transaction(&[IDENTITIES], |tx| {
            let Some(mut identity) = tx.get(&IDENTITY_RECORDS, node.0.as_bytes())? else {
                return Err(TxError::Abort(StoreError::Db(format!(
                    "node {node} has no key binding"
                ))));
            };
            if identity.next_key == Some(*new_key) && !identity.must_rotate {
                return Ok(None);
            }
            let forced = identity.must_rotate;
            identity.next_key = Some(*new_key);
            identity.must_rotate = false;
            tx.put(&IDENTITY_RECORDS, node.0.as_bytes(), &identity)?;
            tx.table(IDENTITIES).flush();
            Ok(Some((identity, forced)))
        })?;
        let Some((identity, forced)) = changed else {
            return Ok(());
        };
        let message = format!(
            "rotating from key {} to {}{}",
            short_key(&identity.key),
            short_key(new_key),
            if forced {
                " (a certificate of its old key was revoked, or an operator asked)"
            } else {
                ""
            }
        );
        self.append_event(
            EventKind::Registry(RegistryEvent::KeyRotated),
            Some(node),
            &message,
            now,
        )?;
        Ok(())
    }

    /// Arms a one-time re-enrolment of `node` until `expires_at`, with an event. `false` if no such
    /// node.
    pub fn arm_reenrol(
        &self,
        node: &NodeId,
        expires_at: UnixMillis,
        now: UnixMillis,
    ) -> Result<bool, StoreError> {
        self.check_space()?;
        let _guard = self.lock_nodes();
        let grant = ReenrolGrant {
            armed_at: now,
            expires_at,
        };
        let bytes = encode("grant", &grant)?;
        let message = format!(
            "one re-enrolment armed until {}: the next machine that claims this node with a valid token gets it (unless the node is connected)",
            crate::store::rfc3339(expires_at)
        );
        // The node is looked up in the transaction: another controller may remove it.
        let seq = self.transaction(&[NODES, REENROL_GRANTS, EVENTS], |tx| {
            let (grants, events) = (tx.table(REENROL_GRANTS), tx.table(EVENTS));
            if tx.table(NODES).get(node.0.as_bytes())?.is_none() {
                return Ok(None);
            }
            {
                grants.insert(node.0.as_bytes(), bytes.as_slice())?;
                let e = self.tx_event::<StoreError>(
                    &events,
                    EventKind::Registry(RegistryEvent::ReenrolArmed),
                    Some(node),
                    &message,
                    now,
                )?;
                grants.flush();
                Ok(Some(e.seq))
            }
        })?;
        let Some(seq) = seq else {
            return Ok(false);
        };
        self.after_event(seq)?;
        Ok(true)
    }

    /// Every pending claim, oldest first.
    pub fn pending_enrolments(&self) -> Result<Vec<PendingEnrolment>, StoreError> {
        let mut out = Vec::new();
        for item in self.records(&PENDING_RECORDS, Scan::all())? {
            out.push(item?.1);
        }
        out.sort_by_key(|p| p.first_seen);
        Ok(out)
    }

    /// Approves or denies a pending claim, with an event. `None` if no request has this id.
    pub fn decide_pending(
        &self,
        id: &str,
        approve: bool,
        now: UnixMillis,
    ) -> Result<Option<PendingEnrolment>, StoreError> {
        self.check_space()?;
        let _guard = self.lock_nodes();
        let (kind, verb) = if approve {
            (
                EventKind::Registry(RegistryEvent::EnrolmentApproved),
                "approved",
            )
        } else {
            (
                EventKind::Registry(RegistryEvent::EnrolmentDenied),
                "denied",
            )
        };
        // Read and written in one transaction: an enrolment attempt (on any controller) may
        // update the request meanwhile.
        let result = self.transaction(&[PENDING_ENROLMENTS, EVENTS], |tx| {
            let (pending, events) = (tx.table(PENDING_ENROLMENTS), tx.table(EVENTS));
            let Some(b) = pending.get(id.as_bytes())? else {
                return Ok(None);
            };
            let mut request: PendingEnrolment =
                decode(PENDING_ENROLMENTS, id.as_bytes(), &b).map_err(abort)?;
            request.state = if approve {
                PendingState::Approved
            } else {
                PendingState::Denied
            };
            // A decision keeps the request for its lifetime from now: the machine retries within it.
            request.last_seen = now;
            let bytes = encode("pending enrolment", &request).map_err(abort)?;
            let message = format!(
                "an operator {verb} the claim {id} of {} ({}) from {}, key {}",
                request.hostname,
                request.hardware_id,
                request.remote,
                short_key(&request.key)
            );
            pending.insert(id.as_bytes(), bytes.as_slice())?;
            let e =
                self.tx_event::<StoreError>(&events, kind, Some(&request.node), &message, now)?;
            pending.flush();
            Ok(Some((request, e.seq)))
        })?;
        let Some((request, seq)) = result else {
            return Ok(None);
        };
        self.after_event(seq)?;
        Ok(Some(request))
    }

    /// Deletes what has lapsed: tokens that stopped working (per-boot ones 10 minutes after,
    /// general ones a day after) with their uses and bindings, pending requests an hour after their
    /// last attempt, unused re-enrolment grants, and certificate and revocation records of expired
    /// certificates.
    pub fn prune(&self, now: UnixMillis) -> Result<Pruned, StoreError> {
        let mut pruned = Pruned::default();
        let _guard = self.lock_nodes();
        let mut last_use: std::collections::HashMap<String, UnixMillis> =
            std::collections::HashMap::new();
        for item in self.table(TOKEN_USES).scan(Scan::all()) {
            let (k, v) = item?;
            let Some(end) = k.iter().position(|b| *b == 0) else {
                continue;
            };
            let token = String::from_utf8_lossy(&k[..end]).into_owned();
            let u: TokenUse = decode(TOKEN_USES, &k, &v)?;
            let e = last_use.entry(token).or_insert(u.at);
            *e = (*e).max(u.at);
        }
        let mut batch_tokens = Vec::new();
        let mut batch_bindings = Vec::new();
        let mut batch_uses = Vec::new();
        for item in self.table(TOKENS).scan(Scan::all()) {
            let (k, v) = item?;
            let rec: TokenRecord = decode(TOKENS, &k, &v)?;
            let bound = self.table(TOKEN_BINDINGS).contains_key(&k)?;
            let retention = if bound {
                BOUND_TOKEN_RETENTION_MS
            } else {
                TOKEN_RETENTION_MS
            };
            let stopped = match rec.state(now) {
                TokenState::Valid => None,
                TokenState::Revoked => rec.revoked_at,
                TokenState::Expired => rec.expires_at,
                TokenState::UsedUp => {
                    Some(last_use.get(&rec.id).copied().unwrap_or(rec.created_at))
                }
            };
            if stopped.is_some_and(|at| now.0 >= at.0.saturating_add(retention)) {
                batch_tokens.push(k.clone());
                batch_bindings.push(k.clone());
                let mut prefix = k.to_vec();
                prefix.push(0);
                for u in self.table(TOKEN_USES).scan(Scan::prefix(&prefix)) {
                    batch_uses.push(u?.0);
                }
                pruned.tokens += 1;
            }
        }
        // Uses and bindings whose token is gone already (a crash between batches) go too.
        for item in self.table(TOKEN_BINDINGS).scan(Scan::all()) {
            let (k, _) = item?;
            if !self.table(TOKENS).contains_key(&k)? {
                batch_bindings.push(k);
            }
        }
        if pruned.tokens > 0 {
            self.check_space()?;
        }
        // No atomicity needed: a crash part-way leaves uses and bindings the next prune deletes.
        let backend = self.backend();
        delete_keys(backend, TOKEN_USES, batch_uses)?;
        delete_keys(backend, TOKEN_BINDINGS, batch_bindings)?;
        delete_keys(backend, TOKENS, batch_tokens)?;
        for p in self.pending_enrolments()? {
            if now.0 >= p.last_seen.0.saturating_add(PENDING_TTL_MS) {
                self.table(PENDING_ENROLMENTS).remove(p.id.as_bytes())?;
                pruned.pending += 1;
            }
        }
        for item in self.table(REENROL_GRANTS).scan(Scan::all()) {
            let (k, v) = item?;
            let g: ReenrolGrant = decode(REENROL_GRANTS, &k, &v)?;
            if now >= g.expires_at {
                self.table(REENROL_GRANTS).remove(k)?;
                pruned.grants += 1;
            }
        }
        for item in self.table(CERTS).scan(Scan::all()) {
            let (k, v) = item?;
            let c: CertRecord = decode(CERTS, &k, &v)?;
            if now >= c.not_after {
                self.table(CERTS).remove(&k)?;
                self.table(REVOKED_CERTS).remove(&k)?;
                pruned.certs += 1;
            }
        }
        for item in self.table(REVOKED_CERTS).scan(Scan::all()) {
            let (k, v) = item?;
            let r: RevokedCert = decode(REVOKED_CERTS, &k, &v)?;
            if now >= r.not_after {
                self.table(REVOKED_CERTS).remove(&k)?;
            }
        }
        if pruned != Pruned::default() {
            self.flush()?;
        }
        Ok(pruned)
    }
}

/// A key hash as operators see it: the first 8 bytes, hex.
pub fn short_key(key: &KeyHash) -> String {
    hex::encode(&key[..8])
}
