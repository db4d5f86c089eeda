//! Several controllers, one fleet: the controllers that share one etcd cluster, which of them leads,
//! and the set of agent endpoints every controller tells its agents.
//!
//! With the embedded store there is one controller and it always leads; the set it tells agents is
//! empty (agents keep the `--controller` addresses they were given).
//!
//! On etcd (`election.rs`), every controller holds one lease; its membership record
//! (`{prefix}cluster/controllers/{id}`) lives on that lease, and so does the leader key
//! (`{prefix}cluster/leader`) while it leads. The leader's work runs through
//! [`Cluster::as_leader`]: only while this controller leads, and with every store write fenced on
//! the leader key's create revision ([`crate::store::backend::Fence`]).

pub mod election;
pub(crate) mod liveness;
pub(crate) mod mesh;
pub mod routes;

use std::{net::SocketAddr, sync::Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// A controller's QUIC endpoint for agents, as the cluster announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEndpoint {
    /// The controller's id (stable across restarts).
    pub id: String,
    /// Where agents reach it.
    pub addr: SocketAddr,
}

/// A controller's record in etcd, kept on its lease (gone within the lease's TTL of its death).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The controller's id.
    pub id: String,
    /// Where agents reach it (QUIC).
    pub agent_addr: SocketAddr,
    /// Its admin API (`https://…`).
    pub api: String,
    /// Its version.
    pub version: String,
    /// When it started (ms since the epoch).
    pub started_ms: u64,
    /// Agents connected to it when it last wrote the record.
    pub agents: u64,
    /// When it last wrote the record (ms since the epoch).
    pub updated_ms: u64,
}

/// Who leads, as this controller sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaderView {
    /// This controller leads, fenced on this: the leader key and its create revision.
    pub fence: Option<crate::store::backend::Fence>,
    /// The leading controller's id, when known.
    pub leader: Option<String>,
}

/// What this controller knows of the cluster it belongs to.
#[derive(Debug)]
pub(crate) struct Cluster {
    /// This controller's id.
    pub(crate) id: String,
    /// On etcd (several controllers possible) or on its own.
    clustered: bool,
    endpoints: watch::Sender<Vec<AgentEndpoint>>,
    leader: watch::Sender<LeaderView>,
    /// The member records last read from etcd.
    members: Mutex<Vec<MemberRecord>>,
    /// Where agents and operators reach this controller, and when it started serving.
    local: Mutex<(SocketAddr, String, u64)>,
}

impl Cluster {
    /// A controller on its own (the embedded store): it always leads.
    pub(crate) fn single(id: String) -> Cluster {
        Cluster {
            leader: watch::channel(LeaderView {
                fence: None,
                leader: Some(id.clone()),
            })
            .0,
            id,
            clustered: false,
            endpoints: watch::channel(Vec::new()).0,
            members: Mutex::new(Vec::new()),
            local: Mutex::new((SocketAddr::from(([0, 0, 0, 0], 0)), String::new(), 0)),
        }
    }

    /// A controller on etcd: a follower until its election task wins.
    pub(crate) fn clustered(id: String) -> Cluster {
        Cluster {
            id,
            clustered: true,
            endpoints: watch::channel(Vec::new()).0,
            leader: watch::channel(LeaderView::default()).0,
            members: Mutex::new(Vec::new()),
            local: Mutex::new((SocketAddr::from(([0, 0, 0, 0], 0)), String::new(), 0)),
        }
    }

    /// Whether this controller shares its store with others (etcd).
    pub(crate) fn is_clustered(&self) -> bool {
        self.clustered
    }

    /// Every live controller's agent endpoint, this one's first; empty for a controller on its own.
    /// Changes as controllers join and leave.
    pub(crate) fn agent_endpoints(&self) -> watch::Receiver<Vec<AgentEndpoint>> {
        self.endpoints.subscribe()
    }

    /// Replaces the announced agent endpoints alone (in-process tests of agent failover, which run
    /// without etcd).
    pub(crate) fn set_agent_endpoints(&self, endpoints: Vec<AgentEndpoint>) {
        self.endpoints.send_if_modified(|current| {
            let changed = *current != endpoints;
            *current = endpoints;
            changed
        });
    }

    /// Replaces the membership as read from etcd: the records and the announced agent endpoints.
    pub(crate) fn set_members(&self, mut members: Vec<MemberRecord>) {
        members.sort_by(|a, b| (a.id != self.id, &a.id).cmp(&(b.id != self.id, &b.id)));
        let endpoints: Vec<AgentEndpoint> = members
            .iter()
            .filter(|m| !m.agent_addr.ip().is_unspecified() && m.agent_addr.port() != 0)
            .map(|m| AgentEndpoint {
                id: m.id.clone(),
                addr: m.agent_addr,
            })
            .collect();
        *self.members.lock().unwrap_or_else(|p| p.into_inner()) = members;
        self.set_agent_endpoints(endpoints);
    }

    /// Records where agents (`agent_addr`) and operators (`api`) reach this controller, as it starts
    /// serving.
    pub(crate) fn set_local(&self, agent_addr: SocketAddr, api: String, started_ms: u64) {
        *self.local.lock().unwrap_or_else(|p| p.into_inner()) = (agent_addr, api, started_ms);
    }

    /// What [`Cluster::set_local`] recorded.
    pub(crate) fn local(&self) -> (SocketAddr, String, u64) {
        self.local.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The member records last read from etcd (empty on its own).
    pub(crate) fn members(&self) -> Vec<MemberRecord> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Who leads now.
    pub(crate) fn leader(&self) -> LeaderView {
        self.leader.borrow().clone()
    }

    pub(crate) fn set_leader(&self, view: LeaderView) {
        self.leader.send_if_modified(|current| {
            let changed = *current != view;
            *current = view;
            changed
        });
    }

    /// Whether this controller leads now.
    pub(crate) fn is_leader(&self) -> bool {
        !self.clustered || self.leader.borrow().fence.is_some()
    }

    /// Runs `work` (blocking) if this controller leads, with every store write it makes fenced on
    /// this leadership: a write after another controller took over fails
    /// ([`crate::store::StoreError::Fenced`]) and changes nothing. `None` when not leading.
    pub(crate) fn as_leader<T>(&self, work: impl FnOnce() -> T) -> Option<T> {
        if !self.clustered {
            return Some(work());
        }
        let fence = self.leader.borrow().fence.clone()?;
        Some(crate::store::backend::fenced(&fence, work))
    }
}

/// This controller's id: kept in `controller.id` in the data dir, made from the host name and a
/// random suffix on first start.
pub(crate) fn load_or_create_id(data_dir: &std::path::Path) -> std::io::Result<String> {
    let path = data_dir.join("controller.id");
    match std::fs::read_to_string(&path) {
        Ok(s) if valid_id(s.trim()) => return Ok(s.trim().to_owned()),
        Ok(s) => {
            return Err(std::io::Error::other(format!(
                "{} holds {:?}, not a controller id (1–63 characters of a-z, 0-9, '-')",
                path.display(),
                s.trim()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let host: String = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(48)
        .collect();
    let host = host.trim_matches('-');
    let suffix = hex::encode(rand::random::<[u8; 3]>());
    let id = if host.is_empty() {
        format!("controller-{suffix}")
    } else {
        format!("{host}-{suffix}")
    };
    shoal_overlay::pki::write_private_file(&path, format!("{id}\n").as_bytes(), 0o600)?;
    Ok(id)
}

fn valid_id(id: &str) -> bool {
    (1..=63).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The files every controller of one fleet must hold the same copy of: the CA (one fleet, one CA)
/// and the key backup targets' secrets are sealed with. A controller joining a cluster gets them
/// copied from another controller's data dir (operators' guide, "Several controllers").
pub const SHARED_FILES: [&str; 3] = [
    crate::registry::ca::CA_CERT_FILE,
    crate::registry::ca::CA_KEY_FILE,
    crate::backups::secrets::SECRETS_KEY_FILE,
];

const SHARED_FILES_META: &str = "cluster_shared_files_sha256";

/// Why this controller cannot join the fleet in its store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// A file the fleet shares is missing here while the store already belongs to a fleet.
    #[error("{file} is missing from {dir}, and the store already belongs to a fleet: copy ca.crt, ca.key, backup-secrets.key and admin.conf from another controller's data dir into it (a new CA would split the fleet)")]
    Missing {
        /// The file.
        file: &'static str,
        /// The data dir.
        dir: String,
    },
    /// A file the fleet shares differs from the fleet's.
    #[error("{file} in {dir} is not the fleet's (its SHA-256 differs from the one in the store): copy it from another controller's data dir")]
    Differs {
        /// The file.
        file: &'static str,
        /// The data dir.
        dir: String,
    },
    /// Reading a file or the store failed.
    #[error("checking the fleet's shared files: {0}")]
    Io(String),
}

/// Before the controller creates anything in `data_dir`: when the store already records the
/// fleet's shared files, they must be here and the same; when it records none (the first
/// controller), `Ok(false)`: create them, then call [`record_shared_files`].
pub(crate) fn check_shared_files(
    store: &crate::store::Store,
    data_dir: &std::path::Path,
) -> Result<bool, JoinError> {
    let Some(stored) = store
        .get_meta(SHARED_FILES_META)
        .map_err(|e| JoinError::Io(e.to_string()))?
    else {
        return Ok(false);
    };
    let dir = data_dir.display().to_string();
    let digests = shared_digests(data_dir, &dir)?;
    for (i, file) in SHARED_FILES.iter().enumerate() {
        if stored.get(i * 32..(i + 1) * 32) != Some(&digests[i * 32..(i + 1) * 32]) {
            return Err(JoinError::Differs {
                file,
                dir: dir.clone(),
            });
        }
    }
    Ok(true)
}

/// Records the digests of the shared files in the store (the first controller of a fleet).
pub(crate) fn record_shared_files(
    store: &crate::store::Store,
    data_dir: &std::path::Path,
) -> Result<(), JoinError> {
    let dir = data_dir.display().to_string();
    let digests = shared_digests(data_dir, &dir)?;
    store
        .put_meta(SHARED_FILES_META, &digests)
        .map_err(|e| JoinError::Io(e.to_string()))?;
    // Two first controllers racing on an empty store: the last write wins, and the other finds
    // its files differ here and stops.
    check_shared_files(store, data_dir).map(|_| ())
}

fn shared_digests(data_dir: &std::path::Path, dir: &str) -> Result<Vec<u8>, JoinError> {
    let mut out = Vec::with_capacity(32 * SHARED_FILES.len());
    for file in SHARED_FILES {
        match std::fs::read(data_dir.join(file)) {
            Ok(bytes) => out.extend_from_slice(&shoal_overlay::pki::sha256(&bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(JoinError::Missing {
                    file,
                    dir: dir.to_owned(),
                })
            }
            Err(e) => return Err(JoinError::Io(format!("{file}: {e}"))),
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fleet_files(dir: &std::path::Path) {
        crate::registry::ca::Ca::load_or_create(dir).unwrap();
        crate::backups::secrets::SecretBox::open(dir).unwrap();
    }

    #[test]
    fn a_controller_joins_only_with_the_fleets_shared_files() {
        let first = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&first.path().join("store")).unwrap();
        fleet_files(first.path());
        // The first controller: nothing recorded yet, then its files are the fleet's.
        assert!(!check_shared_files(&store, first.path()).unwrap());
        record_shared_files(&store, first.path()).unwrap();
        assert!(check_shared_files(&store, first.path()).unwrap());

        // A joiner with copies of the fleet's files is one of it.
        let joiner = tempfile::tempdir().unwrap();
        for f in SHARED_FILES {
            std::fs::copy(first.path().join(f), joiner.path().join(f)).unwrap();
        }
        assert!(check_shared_files(&store, joiner.path()).unwrap());

        // One without them must not mint a CA of its own.
        let bare = tempfile::tempdir().unwrap();
        let e = check_shared_files(&store, bare.path()).unwrap_err();
        assert!(
            matches!(e, JoinError::Missing { file: "ca.crt", .. }),
            "{e}"
        );

        // One with another CA (or secrets key) is refused, naming the file.
        let other = tempfile::tempdir().unwrap();
        fleet_files(other.path());
        let e = check_shared_files(&store, other.path()).unwrap_err();
        assert!(
            matches!(e, JoinError::Differs { file: "ca.crt", .. }),
            "{e}"
        );
        std::fs::copy(first.path().join("ca.crt"), other.path().join("ca.crt")).unwrap();
        std::fs::copy(first.path().join("ca.key"), other.path().join("ca.key")).unwrap();
        let e = check_shared_files(&store, other.path()).unwrap_err();
        assert!(
            matches!(
                e,
                JoinError::Differs {
                    file: "backup-secrets.key",
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("copy it from another controller"),
            "{e}"
        );
    }

    #[test]
    fn a_controller_keeps_its_id_and_refuses_a_garbled_one() {
        let dir = tempfile::tempdir().unwrap();
        let id = load_or_create_id(dir.path()).unwrap();
        assert!(valid_id(&id), "{id}");
        assert_eq!(
            load_or_create_id(dir.path()).unwrap(),
            id,
            "stable across starts"
        );
        std::fs::write(dir.path().join("controller.id"), "Not An/Id\n").unwrap();
        assert!(load_or_create_id(dir.path()).is_err());
    }

    #[test]
    fn the_announced_set_puts_this_controller_first_and_leaves_out_wildcards() {
        let c = Cluster::clustered("b".into());
        let rec = |id: &str, addr: &str| MemberRecord {
            id: id.into(),
            agent_addr: addr.parse().unwrap(),
            api: String::new(),
            version: String::new(),
            started_ms: 0,
            agents: 0,
            updated_ms: 0,
        };
        c.set_members(vec![
            rec("a", "10.0.0.1:7440"),
            rec("c", "0.0.0.0:7440"),
            rec("b", "10.0.0.2:7440"),
        ]);
        let set: Vec<String> = c
            .agent_endpoints()
            .borrow()
            .iter()
            .map(|e| e.id.clone())
            .collect();
        assert_eq!(set, vec!["b", "a"]);
        assert!(
            !c.is_leader(),
            "a clustered controller follows until it wins"
        );
        assert!(Cluster::single("x".into()).is_leader());
        assert!(
            c.as_leader(|| ()).is_none(),
            "no leader's work on a follower"
        );
    }
}
