//! The backup domain's tables: targets (secrets sealed), jobs, and per node and job the schedule
//! state and results ([`NodeJobState`]).

use serde::{Deserialize, Serialize};
use shoal_controller_core::backups::{JobRecord, NodeJobState};
use shoal_proto::{NodeId, UnixMillis};

use crate::store::{Scan, Store, StoreError, Table};

pub(crate) const BACKUP_TARGETS: &str = "backup_targets";
pub(crate) const BACKUP_JOBS: &str = "backup_jobs";
pub(crate) const BACKUP_STATE: &str = "backup_state";

const TARGETS: Table<TargetRecord> = Table::new(BACKUP_TARGETS);
const JOBS: Table<JobRecord> = Table::new(BACKUP_JOBS);
const STATES: Table<NodeJobState> = Table::new(BACKUP_STATE);

/// A target as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// Name.
    pub name: String,
    /// Base URL.
    pub url: String,
    /// [`super::secrets::TargetSecrets`], sealed.
    pub sealed: Vec<u8>,
    /// Names of the environment entries.
    pub env_keys: Vec<String>,
    /// Whether an SSH key is sealed in.
    pub has_ssh_key: bool,
    /// `known_hosts` lines (public).
    pub ssh_known_hosts: Option<String>,
    /// When added.
    pub created_at: UnixMillis,
}

fn state_key(job: &str, node: &NodeId) -> Vec<u8> {
    let mut k = job.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(node.0.as_bytes());
    k
}

impl Store {
    /// Every target, by name.
    pub(crate) fn backup_targets(&self) -> Result<Vec<TargetRecord>, StoreError> {
        self.records(&TARGETS, Scan::all())?
            .map(|r| r.map(|(_, v)| v))
            .collect()
    }

    /// The target called `name`.
    pub(crate) fn backup_target(&self, name: &str) -> Result<Option<TargetRecord>, StoreError> {
        self.get(&TARGETS, name)
    }

    /// Adds a target; `false` if the name is taken.
    pub(crate) fn add_backup_target(&self, target: &TargetRecord) -> Result<bool, StoreError> {
        self.check_space()?;
        self.transaction(&[BACKUP_TARGETS], |tx| {
            if tx.get(&TARGETS, target.name.as_bytes())?.is_some() {
                return Ok(false);
            }
            tx.put(&TARGETS, target.name.as_bytes(), target)?;
            Ok(true)
        })
    }

    /// Deletes a target no job uses: `Err(jobs)` names the jobs that still do.
    pub(crate) fn delete_backup_target(
        &self,
        name: &str,
    ) -> Result<Result<Option<TargetRecord>, Vec<String>>, StoreError> {
        // The jobs are scanned before the transaction: a transaction cannot scan, and a scan of
        // a table inside one waits on the transaction itself (sled) for ever. A job created
        // between the two with this target fails its runs with "unknown target", loudly.
        let users: Vec<String> = self
            .backup_jobs()?
            .into_iter()
            .filter(|j| j.targets.iter().any(|t| t == name))
            .map(|j| j.name)
            .collect();
        if !users.is_empty() {
            return Ok(Err(users));
        }
        self.transaction(&[BACKUP_TARGETS], |tx| {
            let old = tx.get(&TARGETS, name.as_bytes())?;
            tx.table(BACKUP_TARGETS).remove(name.as_bytes())?;
            Ok(Ok(old))
        })
    }

    /// Every job.
    pub(crate) fn backup_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.records(&JOBS, Scan::all())?
            .map(|r| r.map(|(_, v)| v))
            .collect()
    }

    /// The job called `name`.
    pub(crate) fn backup_job(&self, name: &str) -> Result<Option<JobRecord>, StoreError> {
        self.get(&JOBS, name)
    }

    /// Adds a job whose targets exist: `Ok(false)` if the name is taken, `Err(name)` for a missing
    /// target.
    pub(crate) fn add_backup_job(
        &self,
        job: &JobRecord,
    ) -> Result<Result<bool, String>, StoreError> {
        self.check_space()?;
        self.transaction(&[BACKUP_TARGETS, BACKUP_JOBS], |tx| {
            for t in &job.targets {
                if tx.get(&TARGETS, t.as_bytes())?.is_none() {
                    return Ok(Err(t.clone()));
                }
            }
            if tx.get(&JOBS, job.name.as_bytes())?.is_some() {
                return Ok(Ok(false));
            }
            tx.put(&JOBS, job.name.as_bytes(), job)?;
            Ok(Ok(true))
        })
    }

    /// Deletes a job and its per-node state.
    pub(crate) fn delete_backup_job(&self, name: &str) -> Result<Option<JobRecord>, StoreError> {
        let old = self.get(&JOBS, name)?;
        let mut prefix = name.as_bytes().to_vec();
        prefix.push(0);
        let keys: Vec<Vec<u8>> = self
            .table(BACKUP_STATE)
            .scan_prefix(&prefix)
            .filter_map(|r| r.ok().map(|(k, _)| k))
            .collect();
        let states = self.table(BACKUP_STATE);
        for k in keys {
            states.remove(&k)?;
        }
        self.table(BACKUP_JOBS).remove(name)?;
        Ok(old)
    }

    /// A node's state of a job (default when none yet).
    pub(crate) fn backup_state(
        &self,
        job: &str,
        node: &NodeId,
    ) -> Result<NodeJobState, StoreError> {
        Ok(self.get(&STATES, state_key(job, node))?.unwrap_or_default())
    }

    /// Changes a node's state of a job atomically; returns what `f` returned.
    pub(crate) fn update_backup_state<T>(
        &self,
        job: &str,
        node: &NodeId,
        f: impl Fn(&mut NodeJobState) -> T,
    ) -> Result<T, StoreError> {
        self.check_space()?;
        let key = state_key(job, node);
        self.transaction(&[BACKUP_STATE], |tx| {
            let mut state = tx.get(&STATES, &key)?.unwrap_or_default();
            let out = f(&mut state);
            tx.put(&STATES, &key, &state)?;
            tx.table(BACKUP_STATE).flush();
            Ok(out)
        })
    }

    /// Forgets a removed node's backup state.
    pub(crate) fn forget_backup_node(&self, node: &NodeId) -> Result<(), StoreError> {
        for job in self.backup_jobs()? {
            self.table(BACKUP_STATE)
                .remove(state_key(&job.name, node))?;
        }
        Ok(())
    }
}
