//! The controller's drive shell: the [`FleetDrives`] behind a lock, its persistence, drive policies
//! in the store and their delivery to agents, and drive commands waiting for the agent's answer.
//!
//! Trees:
//!
//! | tree | key | value |
//! |---|---|---|
//! | `drive_reports` | node id | [`StoredReport`]: the node's latest report |
//! | `drive_samples` | node id ‖ 0 ‖ history key ‖ 0 ‖ sample time (big-endian u64 ms) | [`StoredSample`] |
//! | `drive_policies` | [`PolicyTarget::key`] | [`PolicyRecord`] |
//!
//! A report, its new samples, the samples they push out of the history window, and the report's
//! events are written in one sled transaction, in the order the node sent its reports. At start the
//! samples are replayed through the history to restore each drive's verdict, and those outside the
//! window (or of nodes no longer in the fleet) are deleted.
//!
//! Policies reach agents through each connection's queue ([`crate::server`]'s `ConnHandle`): right
//! after a v3 agent's `Hello`, and whenever its effective policy changes (a policy set or deleted,
//! or its labels changed at re-enrolment). The last policy sent is kept per connection, so an agent
//! only gets a policy when it differs; v1 and v2 agents never get one.

use crate::store::DriveEvent;
use shoal_proto::DRIVES_PROTOCOL;
use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use shoal_proto::{
    ControllerMsg, DriveCommand, DriveCommandResult, DrivePolicy, DriveReport, NodeId,
    SelfTestKind, UnixMillis,
};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::{
    server::Controller, store::decode, store::encode, store::EventKind, store::RawTable,
    store::Scan, store::Store, store::StoreError, store::EVENTS,
};
use shoal_api::drives::DriveCommandView;
use shoal_api::drives::DriveView;
use shoal_controller_core::drives::drive_key;
use shoal_controller_core::drives::fleet::{
    check_prepare, check_self_test, CommandError, DriveChange, FleetDrives, FleetDrivesConfig,
    PrepareRequest, StoredReport, StoredSample,
};
use shoal_controller_core::drives::policy::{resolve, PolicyRecord, PolicySource, PolicyTarget};
use shoal_controller_core::registry::NodeRecord;

const DRIVE_REPORTS: &str = "drive_reports";
const DRIVE_SAMPLES: &str = "drive_samples";
const DRIVE_POLICIES: &str = "drive_policies";

/// Why a policy change was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No node in the fleet has this id.
    #[error("no node {0} in the fleet")]
    UnknownNode(NodeId),
    /// The selector does not parse.
    #[error(transparent)]
    BadSelector(#[from] shoal_controller_core::selector::SelectorError),
    /// The mode is not `report`, `approve` or `prepare`.
    #[error("{0}")]
    BadMode(String),
    /// The filesystem is not `ext4` or `xfs`.
    #[error("{0}")]
    BadFilesystem(String),
    /// Neither or both of node and selector were given.
    #[error("name exactly one of --node ID and --selector SELECTOR")]
    Target,
    /// There is no policy for this node or selector.
    #[error("there is no drive policy for {0}")]
    NoPolicy(PolicyTarget),
}

/// How a command sent to an agent ended, as the waiting request sees it.
#[derive(Debug)]
enum Outcome {
    /// The agent answered.
    Done(Result<String, String>),
    /// The connection the command went out on closed first.
    Closed,
}

#[derive(Debug)]
struct Pending {
    node: NodeId,
    conn_id: u64,
    tx: oneshot::Sender<Outcome>,
}

/// What an operator asks of a drive.
#[derive(Debug, Clone)]
pub enum DriveRequest {
    /// `drives prepare`.
    Prepare(PrepareRequest),
    /// `drives test`.
    SelfTest(SelfTestKind),
}

impl DriveRequest {
    fn what(&self) -> &'static str {
        match self {
            DriveRequest::Prepare(_) => "prepare",
            DriveRequest::SelfTest(_) => "self-test",
        }
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct DriveHub {
    store: Store,
    reports: RawTable,
    samples: RawTable,
    policies: RawTable,
    book: Mutex<FleetDrives>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
}

fn sample_prefix(node: &NodeId, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(node.0.len() + key.len() + 10);
    k.extend_from_slice(node.0.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k.push(0);
    k
}

fn sample_key(node: &NodeId, key: &str, at: UnixMillis) -> Vec<u8> {
    let mut k = sample_prefix(node, key);
    k.extend_from_slice(&at.0.to_be_bytes());
    k
}

fn node_of_key(key: &[u8]) -> NodeId {
    let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
    NodeId(String::from_utf8_lossy(&key[..end]).into_owned())
}

impl DriveHub {
    /// Loads reports, samples and policies from the store; deletes samples outside the history
    /// window and records of nodes no longer in the fleet. A record that does not decode is logged
    /// and dropped.
    pub fn open(store: &Store, config: FleetDrivesConfig) -> Result<DriveHub, StoreError> {
        let reports = store.table(DRIVE_REPORTS);
        let samples = store.table(DRIVE_SAMPLES);
        let policies = store.table(DRIVE_POLICIES);
        let known: BTreeSet<NodeId> = store.nodes()?.into_iter().map(|n| n.id).collect();
        let mut drop_reports = Vec::new();
        let mut loaded = Vec::new();
        for item in reports.iter() {
            let (key, value) = item?;
            let node = node_of_key(&key);
            match decode::<StoredReport>(DRIVE_REPORTS, &key, &value) {
                Ok(r) if known.contains(&node) => loaded.push((node, r)),
                Ok(_) => drop_reports.push(key),
                Err(e) => {
                    warn!(node = %node, cause = %e, "dropping an unreadable drive report");
                    drop_reports.push(key);
                }
            }
        }
        let mut drop_samples = Vec::new();
        let mut loaded_samples = Vec::new();
        for item in samples.iter() {
            let (key, value) = item?;
            let node = node_of_key(&key);
            match decode::<StoredSample>(DRIVE_SAMPLES, &key, &value) {
                Ok(s) if known.contains(&node) => {
                    let history_key = drive_key(&s.sample.report);
                    loaded_samples.push((node, history_key, s));
                }
                Ok(_) => drop_samples.push(key.to_vec()),
                Err(e) => {
                    warn!(node = %node, cause = %e, "dropping an unreadable SMART sample");
                    drop_samples.push(key.to_vec());
                }
            }
        }
        let count = loaded_samples.len();
        let (book, stale) = FleetDrives::load(config, loaded, loaded_samples);
        drop_samples.extend(
            stale
                .iter()
                .map(|(node, key, at)| sample_key(node, key, *at)),
        );
        if !(drop_reports.is_empty() && drop_samples.is_empty()) && store.check_space().is_ok() {
            reports.remove_many(drop_reports.clone())?;
            samples.remove_many(drop_samples.clone())?;
        }
        info!(
            samples = count,
            dropped = drop_samples.len(),
            "drive history loaded"
        );
        Ok(DriveHub {
            store: store.clone(),
            reports,
            samples,
            policies,
            book: Mutex::new(book),
            pending: Mutex::new(HashMap::new()),
            // Ids from a previous run must not match this run's commands: start somewhere random.
            next_id: AtomicU64::new(rand::random::<u64>() >> 16),
        })
    }

    fn book(&self) -> MutexGuard<'_, FleetDrives> {
        // The book is only changed by whole `ingest`/`forget` calls: a panic cannot leave it
        // half-done.
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a node's report: updates the book, persists the report, its samples and its events (in
    /// one transaction), and logs the changes (alarms at `warn`). Returns the changes.
    pub fn ingest(
        &self,
        node: &NodeId,
        report: DriveReport,
        now: UnixMillis,
    ) -> Result<Vec<DriveChange>, StoreError> {
        let hostname = self
            .store
            .node(node)?
            .map(|n| n.hostname)
            .unwrap_or_else(|| node.0.clone());
        let mut book = self.book();
        let ingested = book.ingest(node, report, now);
        let stored = book.report(node).cloned();
        // Persisted under the book's lock, so a node's reports reach the store in the order they
        // came.
        let written = self.persist(node, &hostname, stored.as_ref(), &ingested, now);
        drop(book);
        for c in &ingested.changes {
            if c.is_alarm() {
                warn!(node = %node, hostname = %hostname, device = %c.device(), kind = ?c.kind(), "{c}");
            } else {
                info!(node = %node, hostname = %hostname, device = %c.device(), kind = ?c.kind(), "{c}");
            }
        }
        written?;
        Ok(ingested.changes)
    }

    fn persist(
        &self,
        node: &NodeId,
        hostname: &str,
        stored: Option<&StoredReport>,
        ingested: &shoal_controller_core::drives::fleet::Ingested,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        self.store.check_space()?;
        let report = stored.map(|r| encode("drive report", r)).transpose()?;
        let mut inserts = Vec::new();
        let mut removes = Vec::new();
        for key in &ingested.forgotten {
            for item in self.samples.scan_prefix(sample_prefix(node, key)) {
                removes.push(item?.0.to_vec());
            }
        }
        for s in &ingested.samples {
            inserts.push((
                sample_key(node, &s.key, s.stored.sample.at),
                encode("SMART sample", &s.stored)?,
            ));
            let prefix = sample_prefix(node, &s.key);
            for item in self.samples.scan(Scan::between(
                &prefix,
                sample_key(node, &s.key, s.keep_from),
            )) {
                let (k, _) = item?;
                removes.push(k.to_vec());
            }
        }
        let messages: Vec<(EventKind, String)> = ingested
            .changes
            .iter()
            .map(|c| (c.kind(), format!("{hostname}: {c}")))
            .collect();
        let seqs = self
            .store
            .transaction(&[DRIVE_REPORTS, DRIVE_SAMPLES, EVENTS], |tx| {
                let (reports, samples, events) = (
                    tx.table(DRIVE_REPORTS),
                    tx.table(DRIVE_SAMPLES),
                    tx.table(EVENTS),
                );
                {
                    if let Some(r) = &report {
                        reports.insert(node.0.as_bytes(), r.as_slice())?;
                    }
                    for k in &removes {
                        samples.remove(k.as_slice())?;
                    }
                    for (k, v) in &inserts {
                        samples.insert(k.as_slice(), v.as_slice())?;
                    }
                    let mut seqs = Vec::new();
                    for (kind, message) in &messages {
                        seqs.push(
                            self.store
                                .tx_event::<StoreError>(&events, *kind, Some(node), message, now)?
                                .seq,
                        );
                    }
                    Ok(seqs)
                }
            })?;
        for seq in seqs {
            self.store.after_event(seq)?;
        }
        Ok(())
    }

    /// Forgets a node that left the fleet: its report, history and policy.
    pub fn forget(&self, node: &NodeId) -> Result<(), StoreError> {
        self.book().forget(node);
        self.reports.remove(node.0.as_bytes())?;
        let mut prefix = node.0.as_bytes().to_vec();
        prefix.push(0);
        let mut keys = Vec::new();
        for item in self.samples.scan_prefix(&prefix) {
            keys.push(item?.0);
        }
        self.samples.remove_many(keys)?;
        self.policies
            .remove(PolicyTarget::Node(node.clone()).key().as_bytes())?;
        Ok(())
    }

    /// The drive listing (see [`FleetDrives::views`]).
    pub fn views(&self, only: Option<&NodeId>) -> Vec<DriveView> {
        self.book().views(only)
    }

    /// `f` of each SMART sample of the drive a node reports as `device`, oldest first (see
    /// [`FleetDrives::history`]; at most the history's bound per drive). Mapped under the lock,
    /// so a chart copies only the figures it draws.
    pub fn smart_trend<T>(
        &self,
        node: &NodeId,
        device: &str,
        f: impl FnMut(&shoal_controller_core::drives::SmartSample) -> T,
    ) -> Vec<T> {
        self.book()
            .history(node, device)
            .into_iter()
            .map(f)
            .collect()
    }

    /// All stored policies: node policies, then selector policies, each by key.
    pub fn policies(&self) -> Result<Vec<PolicyRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.policies.iter() {
            let (key, value) = item?;
            out.push(decode::<PolicyRecord>(DRIVE_POLICIES, &key, &value)?);
        }
        Ok(out)
    }

    /// Stores a policy (replacing one for the same target) with a `DrivePolicyChanged` event. A
    /// node policy needs the node to exist.
    pub fn set_policy(&self, rec: &PolicyRecord) -> Result<(), PolicyError> {
        if let PolicyTarget::Node(n) = &rec.target {
            if self.store.node(n)?.is_none() {
                return Err(PolicyError::UnknownNode(n.clone()));
            }
        }
        let message = format!(
            "drive policy for {} set: {}, {}",
            rec.target, rec.policy.mode, rec.policy.filesystem
        );
        self.write_policy(&rec.target, Some(rec), &message, rec.set_at)?;
        info!(target = %rec.target, mode = %rec.policy.mode, filesystem = %rec.policy.filesystem, "drive policy set");
        Ok(())
    }

    /// Deletes a policy with a `DrivePolicyChanged` event; returns what it was.
    pub fn delete_policy(
        &self,
        target: &PolicyTarget,
        now: UnixMillis,
    ) -> Result<PolicyRecord, PolicyError> {
        let old = match self.policies.get(target.key().as_bytes())? {
            Some(bytes) => decode::<PolicyRecord>(DRIVE_POLICIES, target.key().as_bytes(), &bytes)?,
            None => return Err(PolicyError::NoPolicy(target.clone())),
        };
        self.write_policy(
            target,
            None,
            &format!("drive policy for {target} deleted"),
            now,
        )?;
        info!(target = %target, "drive policy deleted");
        Ok(old)
    }

    fn write_policy(
        &self,
        target: &PolicyTarget,
        rec: Option<&PolicyRecord>,
        message: &str,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        self.store.check_space()?;
        let key = target.key();
        let value = rec.map(|r| encode("drive policy", r)).transpose()?;
        let node = match target {
            PolicyTarget::Node(n) => Some(n.clone()),
            PolicyTarget::Selector(..) => None,
        };
        let event = self.store.transaction(&[DRIVE_POLICIES, EVENTS], |tx| {
            let (policies, events) = (tx.table(DRIVE_POLICIES), tx.table(EVENTS));
            {
                match &value {
                    Some(v) => policies.insert(key.as_bytes(), v.as_slice())?,
                    None => {
                        policies.remove(key.as_bytes())?;
                    }
                };
                let e = self.store.tx_event::<StoreError>(
                    &events,
                    EventKind::Drives(DriveEvent::PolicyChanged),
                    node.as_ref(),
                    message,
                    now,
                )?;
                policies.flush();
                Ok(e)
            }
        })?;
        self.store.after_event(event.seq)
    }

    /// A fresh command id.
    fn next_command_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Waits for command `id`, sent on connection `conn_id` of `node`.
    fn expect(&self, id: u64, node: &NodeId, conn_id: u64) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.pending().insert(
            id,
            Pending {
                node: node.clone(),
                conn_id,
                tx,
            },
        );
        rx
    }

    fn abandon(&self, id: u64) {
        self.pending().remove(&id);
    }

    /// An agent answered a command.
    pub fn command_result(&self, node: &NodeId, result: DriveCommandResult) {
        let mut pending = self.pending();
        match pending.get(&result.id) {
            Some(p) if &p.node == node => {
                if let Some(p) = pending.remove(&result.id) {
                    let _ = p.tx.send(Outcome::Done(result.result));
                }
            }
            Some(p) => {
                warn!(node = %node, id = result.id, expected = %p.node, "drive command result from the wrong node ignored")
            }
            None => info!(
                node = %node,
                id = result.id,
                result = ?result.result,
                "result of a drive command nobody waits for (timed out, or sent before a restart)"
            ),
        }
    }

    /// A connection closed: commands sent on it will not be answered.
    pub fn connection_closed(&self, node: &NodeId, conn_id: u64) {
        let mut pending = self.pending();
        let ids: Vec<u64> = pending
            .iter()
            .filter(|(_, p)| &p.node == node && p.conn_id == conn_id)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(p) = pending.remove(&id) {
                debug!(node = %node, id, "drive command lost with its connection");
                let _ = p.tx.send(Outcome::Closed);
            }
        }
    }
}

impl Controller {
    /// A node's effective drive policy and its source, from the store.
    pub(crate) fn effective_drive_policy(
        &self,
        node: &NodeRecord,
        policies: &[PolicyRecord],
    ) -> (DrivePolicy, PolicySource) {
        resolve(&node.id, &node.labels, policies)
    }

    /// A v3 agent's session is ready: send it its drive policy (blocking: reads the store).
    pub(crate) fn send_drive_policy_on_connect(&self, node: &NodeId, conn_id: u64) {
        let policy = match (self.store.node(node), self.drives.policies()) {
            (Ok(Some(rec)), Ok(policies)) => self.effective_drive_policy(&rec, &policies),
            (Ok(None), _) => return,
            (Err(e), _) | (_, Err(e)) => {
                warn!(node = %node, cause = %e, "drive policy unavailable; the agent keeps its last one until the next change");
                return;
            }
        };
        let mut live = self.live();
        let Some(conn) = live.conns.get_mut(node).filter(|c| c.conn_id == conn_id) else {
            return;
        };
        // A push that raced this one already sent the newer policy.
        if conn.drive_policy.is_none() {
            conn.drive_policy = Some(policy.0);
            let _ = conn.tx.send(ControllerMsg::DrivePolicy(policy.0));
            info!(node = %node, mode = %policy.0.mode, filesystem = %policy.0.filesystem, source = %policy.1, "drive policy sent");
        }
    }

    /// Drive policies (`only`: `None`), or the labels of the nodes of `only`, changed here: every
    /// agent concerned gets its effective policy, here and — told over the mesh — on the other
    /// controllers, which hold the other agents' sessions (blocking: reads the store).
    pub(crate) fn drive_policies_changed(&self, only: Option<&[NodeId]>) {
        self.push_drive_policies(only);
        self.mesh
            .broadcast(crate::cluster::mesh::wire::MeshMsg::DrivePolicies {
                only: only.map(<[NodeId]>::to_vec),
            });
    }

    /// Sends every connected v3 agent (or those of `only`) its effective drive policy if it changed
    /// since the last one it got (blocking: reads the store).
    pub(crate) fn push_drive_policies(&self, only: Option<&[NodeId]>) {
        let targets: Vec<NodeId> = {
            let live = self.live();
            live.conns
                .iter()
                .filter(|(n, c)| {
                    c.protocol.is_some_and(|v| v >= DRIVES_PROTOCOL)
                        && only.is_none_or(|o| o.contains(n))
                })
                .map(|(n, _)| n.clone())
                .collect()
        };
        if targets.is_empty() {
            return;
        }
        let policies = match self.drives.policies() {
            Ok(p) => p,
            Err(e) => {
                warn!(cause = %e, "drive policies unavailable; agents keep their last ones");
                return;
            }
        };
        for node in targets {
            let rec = match self.store.node(&node) {
                Ok(Some(rec)) => rec,
                Ok(None) => continue,
                Err(e) => {
                    warn!(node = %node, cause = %e, "node unavailable; its agent keeps its last drive policy");
                    continue;
                }
            };
            let (policy, source) = self.effective_drive_policy(&rec, &policies);
            let mut live = self.live();
            let Some(conn) = live
                .conns
                .get_mut(&node)
                .filter(|c| c.protocol.is_some_and(|v| v >= DRIVES_PROTOCOL))
            else {
                continue;
            };
            if conn.drive_policy != Some(policy) {
                conn.drive_policy = Some(policy);
                let _ = conn.tx.send(ControllerMsg::DrivePolicy(policy));
                info!(node = %node, mode = %policy.mode, filesystem = %policy.filesystem, source = %source, "drive policy sent");
            }
        }
    }

    /// Checks a drive command, sends it to the node's agent and waits for its answer.
    pub(crate) async fn drive_command(
        self: &Arc<Self>,
        node: NodeId,
        device: String,
        request: DriveRequest,
    ) -> Result<DriveCommandView, CommandError> {
        let what = request.what();
        let c = self.clone();
        let n = node.clone();
        let known = tokio::task::spawn_blocking(move || c.store.node(&n))
            .await
            .map_err(|e| CommandError::Store(e.to_string()))?
            .map_err(|e| CommandError::Store(e.to_string()))?;
        if known.is_none() {
            return Err(CommandError::UnknownNode(node));
        }
        let conn_id = {
            let live = self.live();
            let conn = live
                .conns
                .get(&node)
                .ok_or_else(|| CommandError::NotConnected(node.clone()))?;
            match conn.protocol {
                None => return Err(CommandError::NotConnected(node)),
                Some(v) if v < DRIVES_PROTOCOL => {
                    return Err(CommandError::OldProtocol { node, version: v })
                }
                Some(_) => conn.conn_id,
            }
        };
        let action = {
            let book = self.drives.book();
            let report = book
                .report(&node)
                .ok_or_else(|| CommandError::NoReport(node.clone()))?;
            let Some(drive) = report.report.drives.iter().find(|d| d.name == device) else {
                let names: Vec<&str> = report
                    .report
                    .drives
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect();
                let known = if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                };
                return Err(CommandError::UnknownDrive {
                    node,
                    device,
                    known,
                });
            };
            match &request {
                DriveRequest::Prepare(req) => {
                    check_prepare(drive, book.verdict(&node, drive).map(|j| &j.verdict), req)?
                }
                DriveRequest::SelfTest(kind) => check_self_test(drive, *kind)?,
            }
        };
        let id = self.drives.next_command_id();
        let rx = self.drives.expect(id, &node, conn_id);
        let sent = {
            // Registered before this check: a connection that closes after it fails the command.
            let live = self.live();
            match live.conns.get(&node).filter(|c| c.conn_id == conn_id) {
                Some(conn) => conn
                    .tx
                    .send(ControllerMsg::DriveCommand(DriveCommand {
                        id,
                        device: device.clone(),
                        action: action.clone(),
                    }))
                    .is_ok(),
                None => false,
            }
        };
        if !sent {
            self.drives.abandon(id);
            return Err(CommandError::Disconnected { node, device, what });
        }
        info!(node = %node, device = %device, id, action = ?action, "drive command sent");
        let timeout = match request {
            DriveRequest::Prepare(_) => self.config.drive_prepare_timeout,
            DriveRequest::SelfTest(_) => self.config.drive_self_test_timeout,
        };
        let outcome = tokio::time::timeout(timeout, rx).await;
        let result = match outcome {
            Err(_) => {
                self.drives.abandon(id);
                warn!(node = %node, device = %device, id, timeout = ?timeout, "drive command not answered in time");
                Err(CommandError::Timeout {
                    node,
                    device,
                    what,
                    secs: timeout.as_secs(),
                })
            }
            Ok(Err(_)) | Ok(Ok(Outcome::Closed)) => {
                Err(CommandError::Disconnected { node, device, what })
            }
            Ok(Ok(Outcome::Done(Ok(message)))) => {
                info!(node = %node, device = %device, id, %message, "drive command done");
                Ok(DriveCommandView {
                    node: node.0,
                    device,
                    action: what.to_owned(),
                    id,
                    message,
                })
            }
            Ok(Ok(Outcome::Done(Err(message)))) => {
                warn!(node = %node, device = %device, id, %message, "drive command failed on the node");
                Err(CommandError::Agent {
                    node,
                    device,
                    what,
                    message,
                })
            }
        };
        result
    }
}

/// How long to wait for a command's answer by default: preparing a large drive (mkfs) can take
/// minutes.
pub const DEFAULT_PREPARE_TIMEOUT: Duration = Duration::from_secs(600);

/// How long to wait for a self-test to be started by default.
pub const DEFAULT_SELF_TEST_TIMEOUT: Duration = Duration::from_secs(60);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use shoal_controller_core::drives::{HistoryConfig, VerdictConfig};
    use shoal_proto::{
        AtaPredictors, Drive, DriveProtocol, DriveState, SmartExitStatus, SmartOutcome,
        SmartPredictors, SmartReport,
    };

    const H: u64 = 3_600_000;

    fn sdb(pending: u64, hours: u64) -> Drive {
        Drive {
            name: "sdb".into(),
            model: Some("Disk".into()),
            serial: Some("S1".into()),
            size_bytes: 1 << 30,
            removable: false,
            state: DriveState::Blank,
            smart: Some(SmartOutcome::Report(SmartReport {
                device: "/dev/sdb".into(),
                protocol: DriveProtocol::Ata,
                model: Some("Disk".into()),
                serial: Some("S1".into()),
                firmware: None,
                capacity_bytes: None,
                temperature_celsius: Some(30),
                power_on_hours: Some(hours),
                health_passed: Some(true),
                exit_status: SmartExitStatus(0),
                predictors: SmartPredictors::Ata(AtaPredictors {
                    pending_sectors: Some(pending),
                    ..Default::default()
                }),
                self_test: None,
            })),
            smart_at: Some(UnixMillis(hours * H)),
        }
    }

    fn config() -> FleetDrivesConfig {
        FleetDrivesConfig {
            verdict: VerdictConfig::default(),
            history: HistoryConfig {
                window_ms: 10 * H,
                max_samples: 100,
            },
        }
    }

    fn stored_samples(store: &Store) -> usize {
        store.table(DRIVE_SAMPLES).len()
    }

    #[test]
    fn stored_samples_of_forgotten_histories_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let node = crate::test_support::enrol_for_tests(&store, "m1", &[], UnixMillis(1));
        let hub = DriveHub::open(&store, config()).unwrap();
        // 256 drives with new serial numbers in every report.
        for round in 0..12u64 {
            let drives = (0..256)
                .map(|k| {
                    let mut d = sdb(0, round + 1);
                    d.name = format!("sd{k}");
                    let serial = format!("R{round}-{k}");
                    d.serial = Some(serial.clone());
                    if let Some(SmartOutcome::Report(r)) = &mut d.smart {
                        r.serial = Some(serial);
                    }
                    d
                })
                .collect();
            hub.ingest(
                &node,
                DriveReport {
                    at: UnixMillis((round + 1) * H),
                    drives,
                },
                UnixMillis(round),
            )
            .unwrap();
        }
        let max = shoal_controller_core::drives::fleet::MAX_HISTORIES_PER_NODE;
        assert_eq!(hub.book().history_count(&node), max);
        assert_eq!(
            stored_samples(&store),
            max,
            "one sample per kept history, none of the forgotten ones"
        );
    }

    #[test]
    fn reports_and_history_survive_a_restart_trimmed_to_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let node = crate::test_support::enrol_for_tests(&store, "m1", &[], UnixMillis(1));
        let hub = DriveHub::open(&store, config()).unwrap();
        for hour in 1..=5 {
            hub.ingest(
                &node,
                DriveReport {
                    at: UnixMillis(hour * H),
                    drives: vec![sdb(0, hour)],
                },
                UnixMillis(hour),
            )
            .unwrap();
        }
        // The same SMART read again (another change): no sample.
        hub.ingest(
            &node,
            DriveReport {
                at: UnixMillis(6 * H),
                drives: vec![sdb(0, 5)],
            },
            UnixMillis(6),
        )
        .unwrap();
        assert_eq!(stored_samples(&store), 5);
        let changes = hub
            .ingest(
                &node,
                DriveReport {
                    at: UnixMillis(12 * H),
                    drives: vec![sdb(3, 12)],
                },
                UnixMillis(12),
            )
            .unwrap();
        assert_eq!(
            changes.iter().map(DriveChange::kind).collect::<Vec<_>>(),
            [EventKind::Drives(DriveEvent::VerdictChanged)]
        );
        // Hour 1 left the 10-hour window (hour 2 is at its edge and stays).
        assert_eq!(stored_samples(&store), 5);
        let events: Vec<(EventKind, String)> = store
            .events(None, 100)
            .unwrap()
            .into_iter()
            .map(|e| (e.kind, e.message))
            .collect();
        assert!(
            events.contains(&(
                EventKind::Drives(DriveEvent::Appeared),
                "m1: drive sdb appeared: Disk (serial S1), 1073741824 bytes, blank".into()
            )),
            "{events:?}"
        );
        assert!(
            events
                .iter()
                .any(|(k, m)| *k == EventKind::Drives(DriveEvent::VerdictChanged)
                    && m.contains("ok -> warning")),
            "{events:?}"
        );
        drop(hub);
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        let hub = DriveHub::open(&store, config()).unwrap();
        let views = hub.views(None);
        assert_eq!(views.len(), 1);
        assert_eq!(
            (
                views[0].smart.verdict.as_str(),
                views[0].updated_at.as_str()
            ),
            (
                "warning",
                shoal_controller_core::time::rfc3339_ms(12).as_str()
            )
        );
        assert_eq!(hub.book().sample_count(&node, "serial:Disk/S1"), 5);
        // No spurious events after the restart: the same report again changes nothing.
        assert!(hub
            .ingest(
                &node,
                DriveReport {
                    at: UnixMillis(13 * H),
                    drives: vec![sdb(3, 12)]
                },
                UnixMillis(13)
            )
            .unwrap()
            .is_empty());

        // A shorter window at the next start drops what falls outside it, from the store too.
        drop(hub);
        let short = FleetDrivesConfig {
            history: HistoryConfig {
                window_ms: 2 * H,
                max_samples: 100,
            },
            ..config()
        };
        let hub = DriveHub::open(&store, short).unwrap();
        assert_eq!(stored_samples(&store), 1);
        assert_eq!(hub.views(None)[0].smart.verdict, "ok");

        // A removed node's drives are forgotten.
        hub.forget(&node).unwrap();
        assert!(hub.views(None).is_empty());
        assert_eq!(stored_samples(&store), 0);
    }

    #[test]
    fn records_of_removed_nodes_are_dropped_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let node = crate::test_support::enrol_for_tests(&store, "m1", &[], UnixMillis(1));
        let hub = DriveHub::open(&store, config()).unwrap();
        hub.ingest(
            &node,
            DriveReport {
                at: UnixMillis(H),
                drives: vec![sdb(0, 1)],
            },
            UnixMillis(1),
        )
        .unwrap();
        drop(hub);
        // Removed while the hub was not told (a crash in between).
        store.remove_node(&node, UnixMillis(2)).unwrap();
        let hub = DriveHub::open(&store, config()).unwrap();
        assert!(hub.views(None).is_empty());
        assert_eq!(stored_samples(&store), 0);
        assert_eq!(store.table(DRIVE_REPORTS).len(), 0);
    }

    #[test]
    fn policies_round_trip_with_events() {
        use shoal_proto::{DrivePolicyMode, Filesystem};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let node =
            crate::test_support::enrol_for_tests(&store, "m1", &[("role", "db")], UnixMillis(1));
        let hub = DriveHub::open(&store, config()).unwrap();
        let policy = DrivePolicy {
            mode: DrivePolicyMode::Approve,
            filesystem: Filesystem::Xfs,
        };
        let sel = PolicyTarget::Selector(shoal_controller_core::selector::Selector::equals(
            "role", "db",
        ));
        hub.set_policy(&PolicyRecord {
            target: sel.clone(),
            policy,
            set_at: UnixMillis(2),
        })
        .unwrap();
        let ghost = PolicyTarget::Node(NodeId("n404".into()));
        assert!(matches!(
            hub.set_policy(&PolicyRecord {
                target: ghost.clone(),
                policy,
                set_at: UnixMillis(2)
            }),
            Err(PolicyError::UnknownNode(_))
        ));
        hub.set_policy(&PolicyRecord {
            target: PolicyTarget::Node(node.clone()),
            policy: DrivePolicy::default(),
            set_at: UnixMillis(3),
        })
        .unwrap();
        let all = hub.policies().unwrap();
        assert_eq!(
            all.iter().map(|p| p.target.clone()).collect::<Vec<_>>(),
            [PolicyTarget::Node(node.clone()), sel.clone()]
        );
        assert_eq!(
            hub.delete_policy(&sel, UnixMillis(4)).unwrap().policy,
            policy
        );
        assert!(matches!(
            hub.delete_policy(&sel, UnixMillis(4)),
            Err(PolicyError::NoPolicy(_))
        ));
        let msgs: Vec<String> = store
            .events(None, 100)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == EventKind::Drives(DriveEvent::PolicyChanged))
            .map(|e| e.message)
            .collect();
        assert_eq!(
            msgs,
            [
                "drive policy for selector role=db set: approve, xfs".to_owned(),
                format!("drive policy for node {node} set: report, ext4"),
                "drive policy for selector role=db deleted".to_owned(),
            ]
        );
    }
}
