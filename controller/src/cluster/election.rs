//! The election task: this controller's etcd lease, its membership record on that lease, the
//! campaign for the leader key, and the local deadline that ends leadership when etcd stops
//! answering (the decisions are [`shoal_controller_core::leadership`]'s).
//!
//! One loop per lease: grant it, write the membership record on it, keep it alive every quarter
//! TTL, campaign (a transaction that creates the leader key on our lease only if it does not
//! exist), and every tick read the membership and the leader key. When the lease is lost — etcd
//! says it expired, the keep-alive stream broke, or no acknowledgement came in time — leadership
//! ends at once and the loop starts over with a new lease. A clean shutdown revokes the lease, so
//! the leader key goes at once and another controller takes over without waiting for the TTL.

use std::{
    collections::VecDeque,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use shoal_controller_core::leadership::{Change, Leadership};
use tokio::time::{sleep, sleep_until, timeout};
use tracing::{debug, info, warn};

use super::{Cluster, LeaderView, MemberRecord};
use crate::store::backend::Fence;

/// How the election runs. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// The etcd key prefix of this fleet (default `/shoal/`, the store's).
    pub prefix: String,
    /// The lease's TTL: a dead leader is replaced after about this long (default 2 s; etcd raises
    /// it to its minimum, 1.5 × its election timeout).
    pub lease_ttl: Duration,
    /// Taken off every leadership deadline for clock-rate differences (default 300 ms).
    pub margin: Duration,
    /// How long one etcd request may take (default 1 s).
    pub request_timeout: Duration,
    /// How often the membership record is rewritten with the agent count (default 2 s).
    pub record_interval: Duration,
}

impl ElectionConfig {
    /// Defaults for a key prefix.
    pub fn new(prefix: String) -> ElectionConfig {
        ElectionConfig {
            prefix,
            lease_ttl: Duration::from_secs(2),
            margin: Duration::from_millis(300),
            request_timeout: Duration::from_secs(1),
            record_interval: Duration::from_secs(2),
        }
    }

    /// The leader key.
    pub fn leader_key(&self) -> Vec<u8> {
        format!("{}cluster/leader", self.prefix).into_bytes()
    }

    /// The prefix of every membership record.
    pub fn members_prefix(&self) -> Vec<u8> {
        format!("{}cluster/controllers/", self.prefix).into_bytes()
    }

    fn member_key(&self, id: &str) -> Vec<u8> {
        let mut k = self.members_prefix();
        k.extend_from_slice(id.as_bytes());
        k
    }
}

/// What the election needs from the controller it runs for.
pub(crate) trait ElectionHost: Send + Sync + 'static {
    /// The cluster state to update.
    fn cluster(&self) -> &Cluster;
    /// This controller's membership record as of now (agent count, time).
    fn member_record(&self) -> MemberRecord;
}

type EtcdResult<T> = Result<T, String>;

async fn bounded<T>(
    limit: Duration,
    what: &str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> EtcdResult<T> {
    match timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer from etcd within {limit:?}")),
    }
}

/// Runs the election until `shutdown` resolves; then revokes the lease.
pub(crate) async fn run(
    host: Arc<dyn ElectionHost>,
    client: Client,
    config: ElectionConfig,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut leadership = Leadership::new(config.lease_ttl, config.margin);
    loop {
        let mut term = Term {
            host: host.clone(),
            client: client.clone(),
            config: config.clone(),
            lease: None,
        };
        tokio::select! {
            why = term.run(&mut leadership) => {
                apply(&*host, &config, leadership.lease_lost(&why), None);
                host.cluster().set_leader(LeaderView::default());
                warn!(cause = %why, "etcd lease lost; taking a new one");
                sleep(Duration::from_millis(250)).await;
            }
            _ = &mut shutdown => {
                apply(&*host, &config, leadership.lease_lost("controller shutting down"), None);
                if let Some(lease) = term.lease {
                    let mut c = client.clone();
                    match bounded(config.request_timeout, "revoke the lease", c.lease_revoke(lease)).await {
                        Ok(_) => info!("lease revoked: leadership and membership released"),
                        Err(e) => warn!(cause = %e, "could not revoke the lease; it expires by itself"),
                    }
                }
                return;
            }
        }
    }
}

/// Carries out a leadership change: publishes the fence (or its absence) and logs it.
fn apply(
    host: &dyn ElectionHost,
    config: &ElectionConfig,
    change: Option<Change>,
    leader: Option<String>,
) {
    let cluster = host.cluster();
    match change {
        Some(Change::StartLeading { revision }) => {
            info!(controller = %cluster.id, revision, "leading: the leader's work starts");
            cluster.set_leader(LeaderView {
                fence: Some(Fence {
                    key: config.leader_key(),
                    revision,
                }),
                leader: Some(cluster.id.clone()),
            });
        }
        Some(Change::StopLeading { reason }) => {
            warn!(controller = %cluster.id, %reason, "no longer leading: the leader's work stops");
            cluster.set_leader(LeaderView {
                fence: None,
                leader,
            });
        }
        None => {
            if let Some(leader) = leader {
                let view = cluster.leader();
                if view.fence.is_none() && view.leader.as_deref() != Some(&leader) {
                    info!(leader = %leader, "following");
                    cluster.set_leader(LeaderView {
                        fence: None,
                        leader: Some(leader),
                    });
                }
            }
        }
    }
}

/// One lease's life.
struct Term {
    host: Arc<dyn ElectionHost>,
    client: Client,
    config: ElectionConfig,
    lease: Option<i64>,
}

impl Term {
    /// Runs until the lease is lost; returns why.
    async fn run(&mut self, leadership: &mut Leadership) -> String {
        let cfg = self.config.clone();
        let ttl_secs = cfg.lease_ttl.as_secs().max(1) as i64;
        let sent = Instant::now();
        let grant = match bounded(
            cfg.request_timeout,
            "grant a lease",
            self.client.lease_grant(ttl_secs, None),
        )
        .await
        {
            Ok(g) => g,
            Err(e) => return e,
        };
        let lease = grant.id();
        self.lease = Some(lease);
        let ttl = Duration::from_secs(grant.ttl().max(1) as u64);
        leadership.lease_granted(sent, ttl);
        debug!(lease, ?ttl, "lease granted");
        let (mut keeper, mut acks) = match bounded(
            cfg.request_timeout,
            "start the lease's keep-alive",
            self.client.lease_keep_alive(lease),
        )
        .await
        {
            Ok(k) => k,
            Err(e) => return e,
        };
        if let Err(e) = self.write_record(lease).await {
            return e;
        }
        let mut pending: VecDeque<Instant> = VecDeque::new();
        let mut tick = tokio::time::interval(ttl / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_record = Instant::now();
        loop {
            let deadline = leadership
                .next_deadline()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + ttl);
            tokio::select! {
                _ = tick.tick() => {
                    if !leadership.lease_alive(Instant::now()) {
                        return format!("no keep-alive acknowledged within the lease's {ttl:?}");
                    }
                    pending.push_back(Instant::now());
                    if pending.len() > 64 {
                        pending.pop_front();
                    }
                    // Nothing here may hold the loop past the leadership deadline: an etcd that
                    // does not answer must not keep a leader leading.
                    let work = async {
                        keeper.keep_alive().await.map_err(|e| format!("keep-alive: {e}"))?;
                        if let Err(e) = self.step(lease, leadership).await {
                            debug!(cause = %e, "election step failed; next tick");
                        }
                        if last_record.elapsed() >= cfg.record_interval {
                            last_record = Instant::now();
                            if let Err(e) = self.write_record(lease).await {
                                debug!(cause = %e, "membership record not rewritten; next time");
                            }
                        }
                        Ok::<(), String>(())
                    };
                    match tokio::time::timeout_at(deadline, work).await {
                        Ok(Err(e)) => return e,
                        Ok(Ok(())) => {}
                        Err(_) => {}
                    }
                    let change = leadership.poll(Instant::now());
                    apply(&*self.host, &cfg, change, None);
                }
                ack = acks.message() => {
                    let now = Instant::now();
                    match ack {
                        Ok(Some(ack)) => {
                            let sent = pending.pop_front().unwrap_or(now);
                            let left = Duration::from_secs(ack.ttl().max(0) as u64);
                            let change = leadership.keep_alive_acked(sent, left, now);
                            if left.is_zero() {
                                apply(&*self.host, &cfg, change, None);
                                return "etcd reports the lease expired".into();
                            }
                            apply(&*self.host, &cfg, change, None);
                        }
                        Ok(None) | Err(_) => {
                            // The member behind the stream went away: open another stream for
                            // the same lease (another member answers) while the lease lives.
                            let why = match ack {
                                Err(e) => format!("keep-alive stream: {e}"),
                                _ => "etcd closed the keep-alive stream".into(),
                            };
                            debug!(cause = %why, "reopening the lease's keep-alive stream");
                            let reopen = self.client.lease_keep_alive(lease);
                            match tokio::time::timeout_at(deadline, reopen).await {
                                Ok(Ok((k, a))) => {
                                    keeper = k;
                                    acks = a;
                                    pending.clear();
                                }
                                _ if leadership.lease_alive(Instant::now()) => {
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                                _ => return why,
                            }
                        }
                    }
                }
                _ = sleep_until(deadline) => {
                    let change = leadership.poll(Instant::now());
                    apply(&*self.host, &cfg, change, None);
                }
            }
        }
    }

    /// Writes this controller's membership record on the lease.
    async fn write_record(&mut self, lease: i64) -> EtcdResult<()> {
        let record = self.host.member_record();
        let value = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
        let key = self.config.member_key(&record.id);
        bounded(
            self.config.request_timeout,
            "write the membership record",
            self.client
                .put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await
        .map(|_| ())
    }

    /// Campaigns (or checks the leader key still is ours) and reads the membership. A read while
    /// someone holds the leader key; a transaction only when it is free.
    async fn step(&mut self, lease: i64, leadership: &mut Leadership) -> EtcdResult<()> {
        let cfg = self.config.clone();
        let key = cfg.leader_key();
        let held = bounded(
            cfg.request_timeout,
            "read the leader key",
            self.client.get(key.clone(), None),
        )
        .await?;
        if let Some(kv) = held.kvs().first() {
            let now = Instant::now();
            if kv.lease() == lease {
                let change = leadership.won(kv.create_revision(), now);
                apply(&*self.host, &cfg, change, None);
            } else {
                let leader = String::from_utf8_lossy(kv.value()).into_owned();
                let change = leadership.not_leader(&format!("controller {leader} leads"));
                apply(&*self.host, &cfg, change, Some(leader));
            }
            return self.read_members().await;
        }
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                self.host.cluster().id.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = bounded(cfg.request_timeout, "campaign", self.client.txn(txn)).await?;
        let now = Instant::now();
        if resp.succeeded() {
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            let change = leadership.won(revision, now);
            apply(&*self.host, &cfg, change, None);
        } else {
            let holder = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            });
            match holder {
                Some(kv) if kv.lease() == lease => {
                    let change = leadership.won(kv.create_revision(), now);
                    apply(&*self.host, &cfg, change, None);
                }
                Some(kv) => {
                    let leader = String::from_utf8_lossy(kv.value()).into_owned();
                    let change = leadership.not_leader(&format!("controller {leader} leads"));
                    apply(&*self.host, &cfg, change, Some(leader));
                }
                None => {
                    let change = leadership.not_leader("the leader key vanished");
                    apply(&*self.host, &cfg, change, None);
                }
            }
        }
        self.read_members().await
    }

    /// Reads every membership record into the cluster state.
    async fn read_members(&mut self) -> EtcdResult<()> {
        let cfg = &self.config;
        let members = bounded(
            cfg.request_timeout,
            "read the membership",
            self.client
                .get(cfg.members_prefix(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let records: Vec<MemberRecord> = members
            .kvs()
            .iter()
            .filter_map(|kv| match serde_json::from_slice(kv.value()) {
                Ok(r) => Some(r),
                Err(e) => {
                    warn!(key = %String::from_utf8_lossy(kv.key()), cause = %e, "unreadable membership record ignored");
                    None
                }
            })
            .collect();
        self.host.cluster().set_members(records);
        Ok(())
    }
}
