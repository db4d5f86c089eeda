//! Overlay networks kept by the controller: networks, their members and selectors, address (IPAM)
//! and MAC assignment, each node's [`PeerIndex`] and public-key hash, and the netmap epoch counter.
//!
//! Rules:
//! - The `default` network is created (id 1) on the first start with `serve --overlay-subnet`;
//!   every admitted node is a member. Started later with another subnet, the controller logs a
//!   warning and keeps the stored one (members' addresses would all change); a different
//!   `--overlay-mtu` is applied. `default` cannot be deleted and its members cannot be changed by
//!   hand.
//! - A node is a member of a network because an operator added it (`explicit`), because one of the
//!   network's selectors (label selectors, any of them) matches its labels (`via_selector`), or
//!   both; a node whose labels change joins and leaves at once (`join_networks`).
//!   Removing a node that is there through a selector is refused with the selector named: remove
//!   the selector first (there is no per-node exclusion list). Removing a selector drops the
//!   members that were there only through it.
//! - Subnets of different networks may not overlap (a node on two overlapping networks could not
//!   tell which TAP device a destination is on).
//! - IPAM: a member gets the lowest free host address of the subnet (not the network or broadcast
//!   address); it keeps it while it is a member, across controller restarts. Leaving frees it; a
//!   node added again may get another address.
//! - MAC: `02:5e:` (locally administered, unicast) and four bytes of SHA-256(network id ‖ node id),
//!   hashed again with a counter on a collision within the network; kept while a member.
//! - Network ids and peer indexes come from counters and are never reused.
//!
//! Every change runs under the store's overlay lock (IPAM scans a network's members, which a
//! transaction cannot) and writes all its records and its event in one transaction, flushed before
//! returning. Controllers sharing one store (etcd) do not share that lock: a change reads the
//! overlay version (`overlay_counters/overlay_version`) before it reads anything else, and its
//! transaction commits only if the version is unchanged (and bumps it); otherwise the change is
//! worked out again. So addresses, network ids and peer indexes stay unique across controllers.
//!
//! Trees: `networks` (network id, big-endian u32 → [`NetworkRecord`]), `net_members` (network id ‖
//! node id → [`MemberRecord`]), `peer_indexes` (node id → [`PeerIndex`]), `node_keys` (node id →
//! SHA-256 of its public key), `overlay_counters` (name → u32).

use crate::store::OverlayEvent;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use shoal_proto::{MacAddr, NetworkId, NodeId, PeerIndex, UnixMillis};
use tracing::{debug, info, warn};

use shoal_controller_core::networks::{
    free_address, free_mac, reconcile, MemberRecord, MembershipChange, NetworkRecord,
    NetworkSnapshot, NodeOverlay, OverlaySnapshot, Reconciled, Subnet, SubnetError,
    DEFAULT_NETWORK, DEFAULT_OVERLAY_MTU, MAX_MTU, MIN_MTU,
};
use shoal_controller_core::selector::{valid_name, Selector, SelectorError};

use crate::{
    registry::store::NODES, server::Controller, store::abort, store::decode, store::encode,
    store::EventKind, store::Scan, store::Store, store::StoreError, store::TxError, store::EVENTS,
    store::NETWORKS, store::NET_MEMBERS, store::NODE_KEYS, store::OVERLAY_COUNTERS,
    store::PEER_INDEXES, store::WG_DEVICES, store::WG_GATEWAYS,
};
use shoal_controller_core::registry::NodeRecord;
use shoal_controller_core::wireguard::{DeviceRecord, GatewayRecord};

const NEXT_NETWORK_ID: &str = "next_network_id";
const NEXT_PEER_INDEX: &str = "next_peer_index";
const NETMAP_EPOCH: &str = "netmap_epoch";
/// Bumped by every overlay change (u64): a change is worked out from scans (which a transaction
/// cannot make) after reading it, and commits only if it is unchanged, so two controllers never
/// hand out one address, network id or peer index twice.
const OVERLAY_VERSION: &str = "overlay_version";
/// How often an overlay change is worked out again after other controllers' changes got in first.
const OVERLAY_RETRIES: usize = 32;

/// Why a network change was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetworkError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Other controllers changed the overlay every time this change was worked out.
    #[error("the overlay kept changing under this change (other controllers); try again")]
    Concurrent,
    /// No network has this name.
    #[error("no network named {0:?}")]
    UnknownNetwork(String),
    /// No node in the fleet has this id.
    #[error("no node {0} in the fleet")]
    UnknownNode(NodeId),
    /// The name does not fit `[a-z0-9][a-z0-9-]{0,30}`.
    #[error(
        "network name {0:?} is not allowed: use 1 to 31 of a-z, 0-9 and '-', not starting with '-'"
    )]
    BadName(String),
    /// The subnet is malformed.
    #[error(transparent)]
    BadSubnet(#[from] SubnetError),
    /// The MTU is out of range.
    #[error("MTU {0} is out of range: use {MIN_MTU} to {MAX_MTU}")]
    BadMtu(u16),
    /// Another network's subnet shares addresses with this one.
    #[error("subnet {subnet} overlaps network {other} ({other_subnet}); overlay subnets must not overlap")]
    Overlap {
        /// The subnet asked for.
        subnet: Subnet,
        /// The network it overlaps.
        other: String,
        /// That network's subnet.
        other_subnet: Subnet,
    },
    /// A network already has this name.
    #[error("a network named {0:?} already exists")]
    NameTaken(String),
    /// Every host address of the subnet is assigned.
    #[error("network {network} is full: every address of {subnet} is assigned")]
    SubnetFull {
        /// The network.
        network: String,
        /// Its subnet.
        subnet: Subnet,
    },
    /// `default` cannot be deleted.
    #[error("the default network cannot be deleted")]
    DefaultUndeletable,
    /// `default`'s members and selectors are not operator-managed.
    #[error("every node is a member of the default network; its members and selectors cannot be changed")]
    DefaultFixed,
    /// The selector does not parse.
    #[error(transparent)]
    BadSelector(#[from] SelectorError),
    /// The network has no such selector.
    #[error("network {network} has no selector {selector}")]
    UnknownSelector {
        /// The network.
        network: String,
        /// The selector, canonical text.
        selector: String,
    },
    /// The node is not a member.
    #[error("node {node} is not a member of network {network}")]
    NotMember {
        /// The network.
        network: String,
        /// The node.
        node: NodeId,
    },
    /// The node is a member through a selector, so removing it by hand would not last.
    #[error(
        "node {node} is a member of network {network} through selector {selectors}; remove the selector (or \
         change the node's labels) instead"
    )]
    ThroughSelector {
        /// The network.
        network: String,
        /// The node.
        node: NodeId,
        /// The matching selectors, canonical text, separated by `; `.
        selectors: String,
    },
    /// The network already has a WireGuard device of this name.
    #[error("network {network} already has a WireGuard device named {name:?}")]
    DeviceTaken {
        /// The network.
        network: String,
        /// The device.
        name: String,
    },
    /// Another device of the network has this public key.
    #[error("WireGuard device {other:?} of network {network} already has this public key")]
    KeyTaken {
        /// The network.
        network: String,
        /// The device that has it.
        other: String,
    },
    /// The network has no WireGuard device of this name.
    #[error("network {network} has no WireGuard device named {name:?}")]
    UnknownDevice {
        /// The network.
        network: String,
        /// The device.
        name: String,
    },
    /// Not a WireGuard public key, or not a usable endpoint.
    #[error("{0}")]
    BadWireguard(String),
    /// The network's first device needs the endpoint clients send to.
    #[error("network {0} has no WireGuard endpoint yet: give --endpoint HOST:PORT (the gateways' floating address)")]
    NoEndpoint(String),
}

fn member_key(network: NetworkId, node: &NodeId) -> Vec<u8> {
    let mut key = network.0.to_be_bytes().to_vec();
    key.extend_from_slice(node.0.as_bytes());
    key
}

/// Records to write in one transaction.
#[derive(Default)]
pub(super) struct Plan {
    networks: BTreeMap<NetworkId, Option<NetworkRecord>>,
    members: BTreeMap<(NetworkId, NodeId), Option<MemberRecord>>,
    counters: BTreeMap<&'static str, u32>,
    peers: BTreeMap<NodeId, Option<PeerIndex>>,
    /// Nodes whose key record goes (they left the fleet).
    drop_keys: BTreeSet<NodeId>,
    /// Nodes that must still exist when the transaction commits.
    require_nodes: BTreeSet<NodeId>,
    events: Vec<(EventKind, Option<NodeId>, String)>,
    changes: Vec<MembershipChange>,
    /// WireGuard devices (`super::wireguard`).
    pub(super) devices: BTreeMap<(NetworkId, String), Option<DeviceRecord>>,
    /// Networks' WireGuard gateway records.
    pub(super) gateways: BTreeMap<NetworkId, Option<GatewayRecord>>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.networks.is_empty()
            && self.members.is_empty()
            && self.counters.is_empty()
            && self.peers.is_empty()
            && self.drop_keys.is_empty()
            && self.events.is_empty()
            && self.devices.is_empty()
            && self.gateways.is_empty()
    }
}

/// An overlay change being worked out under the overlay lock: reads the store, keeps what it
/// changes in memory (so later steps see earlier ones) and in a [`Plan`].
pub(super) struct Work<'a> {
    store: &'a Store,
    /// [`OVERLAY_VERSION`] when the work started, before anything was read.
    version: u64,
    networks: BTreeMap<NetworkId, NetworkRecord>,
    /// Members of the networks loaded so far.
    members: HashMap<NetworkId, BTreeMap<NodeId, MemberRecord>>,
    /// WireGuard devices of the networks loaded so far, by name.
    devices: HashMap<NetworkId, BTreeMap<String, DeviceRecord>>,
    pub(super) plan: Plan,
}

impl<'a> Work<'a> {
    pub(super) fn new(store: &'a Store) -> Result<Work<'a>, StoreError> {
        let version = store.overlay_version()?;
        let networks = store.networks()?.into_iter().map(|n| (n.id, n)).collect();
        Ok(Work {
            store,
            version,
            networks,
            members: HashMap::new(),
            devices: HashMap::new(),
            plan: Plan::default(),
        })
    }

    pub(super) fn by_name(&self, name: &str) -> Result<NetworkRecord, NetworkError> {
        self.networks
            .values()
            .find(|n| n.name == name)
            .cloned()
            .ok_or_else(|| NetworkError::UnknownNetwork(name.to_owned()))
    }

    pub(super) fn members(
        &mut self,
        network: NetworkId,
    ) -> Result<&mut BTreeMap<NodeId, MemberRecord>, StoreError> {
        if !self.members.contains_key(&network) {
            let loaded = self
                .store
                .members(network)?
                .into_iter()
                .map(|m| (m.node.clone(), m))
                .collect();
            self.members.insert(network, loaded);
        }
        Ok(self.members.entry(network).or_default())
    }

    /// The network's WireGuard devices (as planned so far), by name.
    pub(super) fn devices(
        &mut self,
        network: NetworkId,
    ) -> Result<&mut BTreeMap<String, DeviceRecord>, StoreError> {
        if !self.devices.contains_key(&network) {
            let loaded = self
                .store
                .wg_devices(network)?
                .into_iter()
                .map(|d| (d.name.clone(), d))
                .collect();
            self.devices.insert(network, loaded);
        }
        Ok(self.devices.entry(network).or_default())
    }

    /// Addresses of the network that members and devices hold: IPAM hands out none of them.
    pub(super) fn used_addresses(
        &mut self,
        network: NetworkId,
    ) -> Result<BTreeSet<u32>, StoreError> {
        let mut used: BTreeSet<u32> = self
            .members(network)?
            .values()
            .map(|m| u32::from(m.address))
            .collect();
        used.extend(
            self.devices(network)?
                .values()
                .map(|d| u32::from(d.address)),
        );
        Ok(used)
    }

    fn counter(&self, name: &'static str) -> Result<u32, StoreError> {
        match self.plan.counters.get(name) {
            Some(v) => Ok(*v),
            None => self.store.counter(name),
        }
    }

    /// The node's peer index, planning its allocation if it has none.
    fn peer_index(&mut self, node: &NodeId) -> Result<PeerIndex, StoreError> {
        if let Some(Some(index)) = self.plan.peers.get(node) {
            return Ok(*index);
        }
        if let Some(index) = self.store.stored_peer_index(node)? {
            return Ok(index);
        }
        // Indexes start at 1; 0 is left for "none" on the wire.
        let index = PeerIndex(self.counter(NEXT_PEER_INDEX)?.max(1));
        self.plan
            .counters
            .insert(NEXT_PEER_INDEX, index.0.saturating_add(1));
        self.plan.peers.insert(node.clone(), Some(index));
        Ok(index)
    }

    fn put_member(&mut self, m: MemberRecord) -> Result<(), StoreError> {
        self.plan
            .members
            .insert((m.network, m.node.clone()), Some(m.clone()));
        self.members(m.network)?.insert(m.node.clone(), m);
        Ok(())
    }

    /// Adds `node` with a fresh address and MAC.
    fn join(
        &mut self,
        network: NetworkId,
        node: &NodeId,
        explicit: bool,
        via_selector: bool,
    ) -> Result<MemberRecord, NetworkError> {
        let rec = self
            .networks
            .get(&network)
            .cloned()
            .ok_or_else(|| NetworkError::UnknownNetwork(network.0.to_string()))?;
        let used = self.used_addresses(network)?;
        let members = self.members(network)?;
        let address =
            free_address(rec.subnet(), &used).ok_or_else(|| NetworkError::SubnetFull {
                network: rec.name.clone(),
                subnet: rec.subnet(),
            })?;
        let macs: BTreeSet<MacAddr> = members.values().map(|m| m.mac).collect();
        let mac = free_mac(network, node, &macs);
        let member = MemberRecord {
            network,
            node: node.clone(),
            mac,
            address,
            explicit,
            via_selector,
        };
        self.put_member(member.clone())?;
        self.peer_index(node)?;
        self.plan.require_nodes.insert(node.clone());
        self.plan.changes.push(MembershipChange::Joined {
            network,
            node: node.clone(),
            mac,
            address,
        });
        debug!(network = %rec.name, node = %node, %address, %mac, "overlay member joins");
        Ok(member)
    }

    fn leave(&mut self, network: NetworkId, node: &NodeId) -> Result<(), StoreError> {
        if self.members(network)?.remove(node).is_some() {
            self.plan.members.insert((network, node.clone()), None);
            self.plan.changes.push(MembershipChange::Left {
                network,
                node: node.clone(),
            });
        }
        Ok(())
    }

    /// Brings one node's memberships in line with its labels: `default` always, selector networks
    /// while a selector matches, explicit ones kept.
    fn reconcile(&mut self, node: &NodeRecord) -> Result<(), NetworkError> {
        let networks: Vec<NetworkRecord> = self.networks.values().cloned().collect();
        for net in networks {
            let current = self.members(net.id)?.get(&node.id).cloned();
            match (reconcile(&net, &node.labels, current.as_ref()), current) {
                (Reconciled::Keep, _) => {}
                (Reconciled::Join { via_selector }, _) => {
                    self.join(net.id, &node.id, false, via_selector)?;
                }
                (Reconciled::Update { via_selector }, Some(m)) => {
                    self.put_member(MemberRecord { via_selector, ..m })?;
                }
                (Reconciled::Update { .. }, None) => {}
                (Reconciled::Leave, _) => self.leave(net.id, &node.id)?,
            }
        }
        // Every node gets a peer index, even one in no network yet.
        self.peer_index(&node.id)?;
        Ok(())
    }

    pub(super) fn event(&mut self, kind: EventKind, node: Option<&NodeId>, message: String) {
        self.plan.events.push((kind, node.cloned(), message));
    }

    pub(super) fn commit(self, now: UnixMillis) -> Result<Vec<MembershipChange>, NetworkError> {
        self.store.commit(self.plan, self.version, now)
    }
}

fn no_such_node(id: &NodeId) -> NetworkError {
    NetworkError::UnknownNode(id.clone())
}

impl Store {
    pub(super) fn overlay_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded value is (): a panic while holding it left nothing inconsistent in memory.
        self.inner
            .overlay_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn overlay_version(&self) -> Result<u64, StoreError> {
        match self.table(OVERLAY_COUNTERS).get(OVERLAY_VERSION)? {
            Some(bytes) => decode(OVERLAY_COUNTERS, OVERLAY_VERSION.as_bytes(), &bytes),
            None => Ok(0),
        }
    }

    /// Runs `change` (which works out an overlay change and commits it) again while other
    /// controllers' changes get in between its reads and its commit.
    pub(super) fn overlay_retry<T>(
        &self,
        change: impl Fn() -> Result<T, NetworkError>,
    ) -> Result<T, NetworkError> {
        for attempt in 1..=OVERLAY_RETRIES {
            match change() {
                Err(NetworkError::Concurrent) => {
                    debug!(
                        attempt,
                        "the overlay changed meanwhile; working the change out again"
                    )
                }
                other => return other,
            }
        }
        Err(NetworkError::Concurrent)
    }

    fn counter(&self, name: &str) -> Result<u32, StoreError> {
        match self.table(OVERLAY_COUNTERS).get(name)? {
            Some(bytes) => decode(OVERLAY_COUNTERS, name.as_bytes(), &bytes),
            None => Ok(1),
        }
    }

    fn stored_peer_index(&self, node: &NodeId) -> Result<Option<PeerIndex>, StoreError> {
        match self.table(PEER_INDEXES).get(node.0.as_bytes())? {
            Some(bytes) => Ok(Some(decode(PEER_INDEXES, node.0.as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    /// Writes a plan in one transaction (with its events), flushed; returns its changes.
    fn commit(
        &self,
        plan: Plan,
        version: u64,
        now: UnixMillis,
    ) -> Result<Vec<MembershipChange>, NetworkError> {
        if plan.is_empty() {
            return Ok(plan.changes);
        }
        self.check_space()?;
        let mut networks = Vec::new();
        for (id, rec) in &plan.networks {
            networks.push((
                id.0.to_be_bytes(),
                rec.as_ref().map(|r| encode("network", r)).transpose()?,
            ));
        }
        let mut members = Vec::new();
        for ((net, node), rec) in &plan.members {
            members.push((
                member_key(*net, node),
                rec.as_ref().map(|r| encode("member", r)).transpose()?,
            ));
        }
        let mut counters = Vec::new();
        for (name, value) in &plan.counters {
            counters.push((*name, encode("counter", value)?));
        }
        let mut peers = Vec::new();
        for (node, index) in &plan.peers {
            peers.push((
                node.0.as_bytes(),
                index
                    .as_ref()
                    .map(|i| encode("peer index", i))
                    .transpose()?,
            ));
        }
        let mut devices = Vec::new();
        for ((net, name), rec) in &plan.devices {
            devices.push((
                super::wireguard::device_key(*net, name),
                rec.as_ref()
                    .map(|r| encode("wireguard device", r))
                    .transpose()?,
            ));
        }
        let mut gateways = Vec::new();
        for (net, rec) in &plan.gateways {
            gateways.push((
                net.0.to_be_bytes(),
                rec.as_ref()
                    .map(|r| encode("wireguard gateway", r))
                    .transpose()?,
            ));
        }
        let tables = [
            NODES,
            NETWORKS,
            NET_MEMBERS,
            PEER_INDEXES,
            NODE_KEYS,
            OVERLAY_COUNTERS,
            EVENTS,
            WG_DEVICES,
            WG_GATEWAYS,
            super::wireguard::WG_ACTIVE,
        ];
        let seqs = self.transaction(&tables, |tx| {
            let [
                nodes,
                nets,
                mems,
                peer_tree,
                keys,
                ctrs,
                events,
                wg_devices,
                wg_gateways,
                wg_active,
            ] = tables.map(|t| tx.table(t));
            {
                let current: u64 = match ctrs.get(OVERLAY_VERSION)? {
                    Some(b) => {
                        decode(OVERLAY_COUNTERS, OVERLAY_VERSION.as_bytes(), &b).map_err(abort)?
                    }
                    None => 0,
                };
                if current != version {
                    return Err(TxError::Abort(NetworkError::Concurrent));
                }
                ctrs.insert(
                    OVERLAY_VERSION,
                    encode("counter", &current.saturating_add(1)).map_err(abort)?,
                )?;
                for node in &plan.require_nodes {
                    if nodes.get(node.0.as_bytes())?.is_none() {
                        return Err(TxError::Abort(no_such_node(node)));
                    }
                }
                for (key, value) in &networks {
                    match value {
                        Some(v) => nets.insert(&key[..], v.as_slice())?,
                        None => {
                            nets.remove(&key[..])?;
                        }
                    };
                }
                for (key, value) in &members {
                    match value {
                        Some(v) => mems.insert(key.as_slice(), v.as_slice())?,
                        None => {
                            mems.remove(key.as_slice())?;
                        }
                    };
                }
                for (name, value) in &counters {
                    ctrs.insert(*name, value.as_slice())?;
                }
                for (key, value) in &peers {
                    match value {
                        Some(v) => peer_tree.insert(*key, v.as_slice())?,
                        None => {
                            peer_tree.remove(*key)?;
                        }
                    };
                }
                for node in &plan.drop_keys {
                    keys.remove(node.0.as_bytes())?;
                }
                for (key, value) in &devices {
                    match value {
                        Some(v) => wg_devices.insert(key.as_slice(), v.as_slice())?,
                        None => {
                            wg_devices.remove(key.as_slice())?;
                        }
                    };
                }
                for (key, value) in &gateways {
                    match value {
                        Some(v) => wg_gateways.insert(&key[..], v.as_slice())?,
                        None => {
                            // The network is gone: so is the choice of its active gateway.
                            wg_gateways.remove(&key[..])?;
                            wg_active.remove(&key[..])?;
                        }
                    };
                }
                let mut seqs = Vec::new();
                for (kind, node, message) in &plan.events {
                    seqs.push(
                        self.tx_event::<NetworkError>(&events, *kind, node.as_ref(), message, now)?
                            .seq,
                    );
                }
                nets.flush();
                Ok(seqs)
            }
        })?;
        for seq in seqs {
            self.after_event(seq)?;
        }
        Ok(plan.changes)
    }

    /// All networks, by id.
    pub fn networks(&self) -> Result<Vec<NetworkRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.table(NETWORKS).scan(Scan::all()) {
            let (key, value) = item?;
            out.push(decode::<NetworkRecord>(NETWORKS, &key, &value)?);
        }
        Ok(out)
    }

    /// The network with this name.
    pub fn network_by_name(&self, name: &str) -> Result<Option<NetworkRecord>, StoreError> {
        Ok(self.networks()?.into_iter().find(|n| n.name == name))
    }

    /// A network's members, by node id.
    pub fn members(&self, network: NetworkId) -> Result<Vec<MemberRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .table(NET_MEMBERS)
            .scan(Scan::prefix(network.0.to_be_bytes()))
        {
            let (key, value) = item?;
            out.push(decode::<MemberRecord>(NET_MEMBERS, &key, &value)?);
        }
        Ok(out)
    }

    /// Every membership, grouped by node (networks in id order).
    pub fn memberships_by_node(&self) -> Result<BTreeMap<NodeId, Vec<MemberRecord>>, StoreError> {
        let mut out: BTreeMap<NodeId, Vec<MemberRecord>> = BTreeMap::new();
        for item in self.table(NET_MEMBERS).scan(Scan::all()) {
            let (key, value) = item?;
            let m: MemberRecord = decode(NET_MEMBERS, &key, &value)?;
            out.entry(m.node.clone()).or_default().push(m);
        }
        Ok(out)
    }

    /// Creates the `default` network on first start (and records a NetworkCreated event). Later
    /// starts keep its stored subnet (warning when `subnet` differs: every address would change)
    /// and apply a changed `mtu`. Then brings every node's memberships in line (nodes enrolled
    /// before networks existed join, memberships of nodes removed without leaving — a crash in
    /// between — are dropped); a node that cannot join (a full subnet) is logged and skipped.
    pub fn ensure_default_network(
        &self,
        subnet: Subnet,
        mtu: u16,
    ) -> Result<NetworkRecord, StoreError> {
        for _ in 0..OVERLAY_RETRIES {
            if let Some(rec) = self.ensure_default_network_once(subnet, mtu)? {
                return Ok(rec);
            }
        }
        Err(StoreError::Db(NetworkError::Concurrent.to_string()))
    }

    /// One attempt of [`Store::ensure_default_network`]; `None` when another controller changed
    /// the overlay meanwhile.
    fn ensure_default_network_once(
        &self,
        subnet: Subnet,
        mtu: u16,
    ) -> Result<Option<NetworkRecord>, StoreError> {
        let _guard = self.overlay_guard();
        let now = crate::server::now_ms();
        let mut work = Work::new(self)?;
        let default = match work.by_name(DEFAULT_NETWORK) {
            Ok(mut rec) => {
                if rec.subnet() != subnet {
                    warn!(
                        stored = %rec.subnet(), configured = %subnet,
                        "the default overlay network keeps its stored subnet; --overlay-subnet applies only on first start"
                    );
                }
                if rec.mtu != mtu {
                    info!(
                        from = rec.mtu,
                        to = mtu,
                        "default overlay network MTU changed"
                    );
                    rec.mtu = mtu;
                    work.plan.networks.insert(rec.id, Some(rec.clone()));
                    work.networks.insert(rec.id, rec.clone());
                }
                rec
            }
            Err(_) => {
                let id = NetworkId(work.counter(NEXT_NETWORK_ID)?.max(1));
                work.plan
                    .counters
                    .insert(NEXT_NETWORK_ID, id.0.saturating_add(1));
                let rec = NetworkRecord {
                    id,
                    name: DEFAULT_NETWORK.to_owned(),
                    subnet: subnet.addr(),
                    prefix_len: subnet.prefix_len(),
                    mtu,
                    selectors: Vec::new(),
                    created_at: now,
                };
                work.plan.networks.insert(id, Some(rec.clone()));
                work.networks.insert(id, rec.clone());
                work.event(
                    EventKind::Overlay(OverlayEvent::NetworkCreated),
                    None,
                    format!("network default ({subnet}, MTU {mtu}) created"),
                );
                info!(network = %rec.name, id = id.0, %subnet, mtu, "default overlay network created");
                rec
            }
        };
        let nodes = self.nodes()?;
        let known: BTreeSet<&NodeId> = nodes.iter().map(|n| &n.id).collect();
        let network_ids: Vec<NetworkId> = work.networks.keys().copied().collect();
        for id in network_ids {
            let orphans: Vec<NodeId> = work
                .members(id)?
                .keys()
                .filter(|n| !known.contains(n))
                .cloned()
                .collect();
            for node in orphans {
                warn!(node = %node, network = id.0, "dropping the overlay membership of a node no longer in the fleet");
                work.leave(id, &node)?;
            }
        }
        // Peer indexes and key hashes of such nodes go too.
        for table in [PEER_INDEXES, NODE_KEYS] {
            for item in self.table(table).scan(Scan::all()) {
                let (key, _) = item?;
                let node = NodeId(String::from_utf8_lossy(&key).into_owned());
                if !known.contains(&node) {
                    work.plan.peers.insert(node.clone(), None);
                    work.plan.drop_keys.insert(node);
                }
            }
        }
        for node in &nodes {
            match work.reconcile(node) {
                Ok(()) => {}
                Err(NetworkError::Store(e)) => return Err(e),
                Err(e) => {
                    warn!(node = %node.id, cause = %e, "node cannot join its overlay networks")
                }
            }
        }
        match work.commit(now) {
            Ok(changes) => {
                if !changes.is_empty() {
                    info!(
                        changes = changes.len(),
                        "overlay memberships brought up to date"
                    );
                }
                Ok(Some(default))
            }
            Err(NetworkError::Store(e)) => Err(e),
            Err(NetworkError::Concurrent) => Ok(None),
            // A node removed while we worked: nothing is written; the next start tries again.
            Err(e) => {
                warn!(cause = %e, "could not bring overlay memberships up to date");
                Ok(Some(default))
            }
        }
    }

    /// Creates a network (MTU defaulting to the default network's) and adds no members; returns it.
    pub fn create_network(
        &self,
        name: &str,
        subnet: Subnet,
        mtu: Option<u16>,
        now: UnixMillis,
    ) -> Result<(NetworkRecord, Vec<MembershipChange>), NetworkError> {
        if !valid_name(name) {
            return Err(NetworkError::BadName(name.to_owned()));
        }
        self.overlay_retry(|| {
            let _guard = self.overlay_guard();
            let mut work = Work::new(self)?;
            if work.networks.values().any(|n| n.name == name) {
                return Err(NetworkError::NameTaken(name.to_owned()));
            }
            if let Some(other) = work
                .networks
                .values()
                .find(|n| n.subnet().overlaps(&subnet))
            {
                return Err(NetworkError::Overlap {
                    subnet,
                    other: other.name.clone(),
                    other_subnet: other.subnet(),
                });
            }
            let default_mtu = work
                .networks
                .values()
                .find(|n| n.is_default())
                .map_or(DEFAULT_OVERLAY_MTU, |n| n.mtu);
            let mtu = mtu.unwrap_or(default_mtu);
            if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
                return Err(NetworkError::BadMtu(mtu));
            }
            let id = NetworkId(work.counter(NEXT_NETWORK_ID)?.max(1));
            work.plan
                .counters
                .insert(NEXT_NETWORK_ID, id.0.saturating_add(1));
            let rec = NetworkRecord {
                id,
                name: name.to_owned(),
                subnet: subnet.addr(),
                prefix_len: subnet.prefix_len(),
                mtu,
                selectors: Vec::new(),
                created_at: now,
            };
            work.plan.networks.insert(id, Some(rec.clone()));
            work.plan
                .changes
                .push(MembershipChange::NetworkCreated(rec.clone()));
            work.event(
                EventKind::Overlay(OverlayEvent::NetworkCreated),
                None,
                format!("network {name} ({subnet}, MTU {mtu}) created"),
            );
            let changes = work.commit(now)?;
            info!(network = %name, id = id.0, %subnet, mtu, "overlay network created");
            Ok((rec, changes))
        })
    }

    /// Deletes a network (not `default`) and all its memberships; returns the deleted record.
    pub fn delete_network(
        &self,
        name: &str,
        now: UnixMillis,
    ) -> Result<(NetworkRecord, Vec<MembershipChange>), NetworkError> {
        self.overlay_retry(|| {
            let _guard = self.overlay_guard();
            let mut work = Work::new(self)?;
            let rec = work.by_name(name)?;
            if rec.is_default() {
                return Err(NetworkError::DefaultUndeletable);
            }
            let members: Vec<NodeId> = work.members(rec.id)?.keys().cloned().collect();
            for node in &members {
                work.leave(rec.id, node)?;
            }
            let devices: Vec<String> = work.devices(rec.id)?.keys().cloned().collect();
            for device in devices {
                work.plan.devices.insert((rec.id, device), None);
            }
            work.plan.gateways.insert(rec.id, None);
            work.plan.networks.insert(rec.id, None);
            work.plan
                .changes
                .push(MembershipChange::NetworkDeleted(rec.id));
            work.event(
                EventKind::Overlay(OverlayEvent::NetworkDeleted),
                None,
                format!("network {name} deleted; {} members left it", members.len()),
            );
            let changes = work.commit(now)?;
            info!(network = %name, id = rec.id.0, members = members.len(), "overlay network deleted");
            Ok((rec, changes))
        })
    }

    /// Adds a node to a network by hand. Already a member: marks it explicit, no change.
    pub fn add_member(
        &self,
        name: &str,
        node: &NodeId,
        now: UnixMillis,
    ) -> Result<(MemberRecord, Vec<MembershipChange>), NetworkError> {
        self.overlay_retry(|| {
            let _guard = self.overlay_guard();
            let mut work = Work::new(self)?;
            let rec = work.by_name(name)?;
            if rec.is_default() {
                return Err(NetworkError::DefaultFixed);
            }
            let node_rec = self.node(node)?.ok_or_else(|| no_such_node(node))?;
            let member = match work.members(rec.id)?.get(node).cloned() {
                Some(m) if m.explicit => return Ok((m, Vec::new())),
                Some(m) => {
                    let m = MemberRecord {
                        explicit: true,
                        ..m
                    };
                    work.put_member(m.clone())?;
                    m
                }
                None => {
                    let m = work.join(rec.id, node, true, rec.selects(&node_rec.labels))?;
                    let msg = format!(
                        "{} joined network {name} as {} ({})",
                        node_rec.hostname, m.address, m.mac
                    );
                    work.event(
                        EventKind::Overlay(OverlayEvent::NetworkChanged),
                        Some(node),
                        msg,
                    );
                    m
                }
            };
            let changes = work.commit(now)?;
            info!(network = %name, node = %node, address = %member.address, "node added to overlay network");
            Ok((member, changes))
        })
    }

    /// Removes a node added by hand. Refused (with the selector named) while a selector keeps it
    /// there.
    pub fn remove_member(
        &self,
        name: &str,
        node: &NodeId,
        now: UnixMillis,
    ) -> Result<Vec<MembershipChange>, NetworkError> {
        self.overlay_retry(|| {
            let _guard = self.overlay_guard();
            let mut work = Work::new(self)?;
            let rec = work.by_name(name)?;
            if rec.is_default() {
                return Err(NetworkError::DefaultFixed);
            }
            let Some(member) = work.members(rec.id)?.get(node).cloned() else {
                return Err(NetworkError::NotMember {
                    network: name.to_owned(),
                    node: node.clone(),
                });
            };
            if member.via_selector {
                let labels = self.node(node)?.map(|n| n.labels).unwrap_or_default();
                let selectors: Vec<String> = rec
                    .selectors
                    .iter()
                    .filter(|s| s.matches(&labels))
                    .map(Selector::to_string)
                    .collect();
                return Err(NetworkError::ThroughSelector {
                    network: name.to_owned(),
                    node: node.clone(),
                    selectors: selectors.join("; "),
                });
            }
            work.leave(rec.id, node)?;
            let hostname = self
                .node(node)?
                .map_or_else(|| node.0.clone(), |n| n.hostname);
            work.event(
                EventKind::Overlay(OverlayEvent::NetworkChanged),
                Some(node),
                format!("{hostname} left network {name}"),
            );
            let changes = work.commit(now)?;
            info!(network = %name, node = %node, "node removed from overlay network");
            Ok(changes)
        })
    }

    /// Adds a selector and, at once, every node whose labels it matches. Adding a selector the
    /// network already has changes nothing.
    pub fn add_selector(
        &self,
        name: &str,
        selector: &Selector,
        now: UnixMillis,
    ) -> Result<Vec<MembershipChange>, NetworkError> {
        self.overlay_retry(|| {
            let _guard = self.overlay_guard();
            let mut work = Work::new(self)?;
            let mut rec = work.by_name(name)?;
            if rec.is_default() {
                return Err(NetworkError::DefaultFixed);
            }
            if rec.selectors.contains(selector) {
                return Ok(Vec::new());
            }
            rec.selectors.push(selector.clone());
            work.plan.networks.insert(rec.id, Some(rec.clone()));
            work.networks.insert(rec.id, rec.clone());
            let mut joined = 0usize;
            for node in self.nodes()? {
                if !selector.matches(&node.labels) {
                    continue;
                }
                match work.members(rec.id)?.get(&node.id).cloned() {
                    Some(m) if m.via_selector => {}
                    Some(m) => work.put_member(MemberRecord {
                        via_selector: true,
                        ..m
                    })?,
                    None => {
                        work.join(rec.id, &node.id, false, true)?;
                        joined += 1;
                    }
                }
            }
            let text = selector.to_string();
            work.event(
                EventKind::Overlay(OverlayEvent::NetworkChanged),
                None,
                format!("selector {text} added to network {name}; {joined} nodes joined"),
            );
            let changes = work.commit(now)?;
            info!(network = %name, selector = %text, joined, "overlay network selector added");
            Ok(changes)
        })
    }

    /// Removes a selector and the members that were there only through it.
    pub fn remove_selector(
        &self,
        name: &str,
        selector: &Selector,
        now: UnixMillis,
    ) -> Result<Vec<MembershipChange>, NetworkError> {
        self.overlay_retry(|| {
            let _guard = self.overlay_guard();
            let mut work = Work::new(self)?;
            let mut rec = work.by_name(name)?;
            if rec.is_default() {
                return Err(NetworkError::DefaultFixed);
            }
            if !rec.selectors.contains(selector) {
                return Err(NetworkError::UnknownSelector {
                    network: name.to_owned(),
                    selector: selector.to_string(),
                });
            }
            rec.selectors.retain(|s| s != selector);
            work.plan.networks.insert(rec.id, Some(rec.clone()));
            work.networks.insert(rec.id, rec.clone());
            let selected: Vec<MemberRecord> = work
                .members(rec.id)?
                .values()
                .filter(|m| m.via_selector)
                .cloned()
                .collect();
            let mut left = 0usize;
            for m in selected {
                let labels = self.node(&m.node)?.map(|n| n.labels).unwrap_or_default();
                if rec.selects(&labels) {
                    continue;
                }
                if m.explicit {
                    work.put_member(MemberRecord {
                        via_selector: false,
                        ..m
                    })?;
                } else {
                    work.leave(rec.id, &m.node)?;
                    left += 1;
                }
            }
            let text = selector.to_string();
            work.event(
                EventKind::Overlay(OverlayEvent::NetworkChanged),
                None,
                format!("selector {text} removed from network {name}; {left} nodes left"),
            );
            let changes = work.commit(now)?;
            info!(network = %name, selector = %text, left, "overlay network selector removed");
            Ok(changes)
        })
    }

    /// Brings a node's memberships in line with its labels, after (re-)enrolment or a label
    /// change: it joins `default` and every network with a matching selector, leaves the ones no
    /// selector (or operator) keeps it in, and gets its peer index.
    pub fn join_networks(&self, node: &NodeId) -> Result<Vec<MembershipChange>, NetworkError> {
        self.overlay_retry(|| {
            let _guard = self.overlay_guard();
            let rec = self.node(node)?.ok_or_else(|| no_such_node(node))?;
            let mut work = Work::new(self)?;
            work.reconcile(&rec)?;
            work.commit(crate::server::now_ms())
        })
    }

    /// Drops every membership of a node leaving the fleet (freeing its addresses), and its peer
    /// index and key records. No event: the node's removal has one.
    pub fn leave_all_networks(&self, node: &NodeId) -> Result<Vec<MembershipChange>, NetworkError> {
        self.overlay_retry(|| {
            let _guard = self.overlay_guard();
            let mut work = Work::new(self)?;
            let ids: Vec<NetworkId> = work.networks.keys().copied().collect();
            for id in ids {
                work.leave(id, node)?;
            }
            if self.stored_peer_index(node)?.is_some() {
                work.plan.peers.insert(node.clone(), None);
            }
            work.plan.drop_keys.insert(node.clone());
            work.commit(crate::server::now_ms())
        })
    }

    /// The node's peer index, allocated (never reused) if it has none yet.
    pub fn peer_index(&self, node: &NodeId) -> Result<PeerIndex, NetworkError> {
        if let Some(index) = self.stored_peer_index(node)? {
            return Ok(index);
        }
        self.overlay_retry(|| {
            let _guard = self.overlay_guard();
            let mut work = Work::new(self)?;
            let index = work.peer_index(node)?;
            work.plan.require_nodes.insert(node.clone());
            work.commit(crate::server::now_ms())?;
            Ok(index)
        })
    }

    /// Records the SHA-256 of a node's public key; writes only when it changed. Returns whether it
    /// did.
    pub fn set_node_key(&self, node: &NodeId, key_sha256: [u8; 32]) -> Result<bool, StoreError> {
        if self.node_key(node)? == Some(key_sha256) {
            return Ok(false);
        }
        self.check_space()?;
        self.table(NODE_KEYS)
            .insert(node.0.as_bytes(), &key_sha256[..])?;
        self.flush()?;
        Ok(true)
    }

    /// The SHA-256 of a node's public key, if recorded.
    pub fn node_key(&self, node: &NodeId) -> Result<Option<[u8; 32]>, StoreError> {
        match self.table(NODE_KEYS).get(node.0.as_bytes())? {
            Some(bytes) => {
                <[u8; 32]>::try_from(bytes.as_ref())
                    .map(Some)
                    .map_err(|_| StoreError::Corrupt {
                        key: format!("{NODE_KEYS}/{}", node.0),
                        cause: format!("{} bytes, expected 32", bytes.len()),
                    })
            }
            None => Ok(None),
        }
    }

    /// Increments and returns the persisted netmap epoch (1 on the first call ever).
    pub fn next_netmap_epoch(&self) -> Result<u32, StoreError> {
        let _guard = self.overlay_guard();
        self.check_space()?;
        // Read and bumped in one transaction: other controllers bump it too.
        self.transaction(&[OVERLAY_COUNTERS], |tx| {
            let ctrs = tx.table(OVERLAY_COUNTERS);
            let epoch = match ctrs.get(NETMAP_EPOCH)? {
                Some(bytes) => decode::<u32>(OVERLAY_COUNTERS, NETMAP_EPOCH.as_bytes(), &bytes)
                    .map_err(abort)?
                    .saturating_add(1),
                None => 1,
            };
            ctrs.insert(NETMAP_EPOCH, encode("counter", &epoch).map_err(abort)?)?;
            ctrs.flush();
            Ok::<_, TxError<StoreError>>(epoch)
        })
    }

    /// All networks with their members, and every node's peer index and key hash.
    pub fn overlay_snapshot(&self) -> Result<OverlaySnapshot, StoreError> {
        let _guard = self.overlay_guard();
        let mut snapshot = OverlaySnapshot::default();
        for network in self.networks()? {
            let members = self.members(network.id)?;
            snapshot.networks.push(NetworkSnapshot { network, members });
        }
        for item in self.table(PEER_INDEXES).scan(Scan::all()) {
            let (key, value) = item?;
            let index: PeerIndex = decode(PEER_INDEXES, &key, &value)?;
            let node = NodeId(String::from_utf8_lossy(&key).into_owned());
            let key_sha256 = self.node_key(&node)?;
            snapshot
                .nodes
                .insert(node, NodeOverlay { index, key_sha256 });
        }
        Ok(snapshot)
    }
}

impl Controller {
    /// Called after every change of overlay membership: connected agents get their netmap deltas.
    pub(crate) fn membership_changed(&self, changes: Vec<MembershipChange>) {
        if !changes.is_empty() {
            debug!(changes = changes.len(), "overlay membership changed");
            self.overlay.membership_changed(&self.store, &changes);
            // A member joining or leaving a network with WireGuard devices changes its map.
            self.wireguard_resync();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use shoal_proto::{HardwareId, HardwareIdSource};

    use super::*;
    use crate::registry::store::EnrolParams;
    use crate::test_support::enrol_for_tests;
    use sha2::{Digest, Sha256};
    use shoal_controller_core::networks::{mac_for, DEFAULT_OVERLAY_SUBNET};
    use shoal_controller_core::registry::TokenRecord;
    use std::net::Ipv4Addr;

    const T0: UnixMillis = UnixMillis(1_700_000_000_000);

    fn open(dir: &Path) -> Store {
        let store = Store::open(dir).unwrap();
        store
            .ensure_default_network(DEFAULT_OVERLAY_SUBNET, DEFAULT_OVERLAY_MTU)
            .unwrap();
        store
    }

    fn subnet(s: &str) -> Subnet {
        s.parse().unwrap()
    }

    fn enrol(store: &Store, machine: &str, labels: &[(&str, &str)]) -> NodeId {
        enrol_for_tests(store, machine, labels, T0)
    }

    fn member(store: &Store, network: &str, node: &NodeId) -> Option<MemberRecord> {
        let net = store.network_by_name(network).unwrap().unwrap();
        store
            .members(net.id)
            .unwrap()
            .into_iter()
            .find(|m| m.node == *node)
    }

    fn addr(store: &Store, network: &str, node: &NodeId) -> Ipv4Addr {
        member(store, network, node).unwrap().address
    }

    fn names(store: &Store, network: &str) -> Vec<NodeId> {
        let net = store.network_by_name(network).unwrap().unwrap();
        store
            .members(net.id)
            .unwrap()
            .into_iter()
            .map(|m| m.node)
            .collect()
    }

    #[test]
    fn subnets_parse_and_overlap() {
        assert_eq!(subnet("10.90.0.0/16").to_string(), "10.90.0.0/16");
        assert!(matches!(
            "10.90.0.1/16".parse::<Subnet>(),
            Err(SubnetError::HostBits { .. })
        ));
        assert!(matches!(
            "10.0.0.0/31".parse::<Subnet>(),
            Err(SubnetError::PrefixLen(31))
        ));
        assert!(matches!(
            "10.0.0.0".parse::<Subnet>(),
            Err(SubnetError::Syntax(_))
        ));
        assert!(subnet("10.0.0.0/8").overlaps(&subnet("10.5.0.0/24")));
        assert!(subnet("10.5.0.0/24").overlaps(&subnet("10.0.0.0/8")));
        assert!(!subnet("10.5.0.0/24").overlaps(&subnet("10.5.1.0/24")));
        assert_eq!(
            subnet("10.5.0.0/30").hosts(),
            (
                u32::from(Ipv4Addr::new(10, 5, 0, 1)),
                u32::from(Ipv4Addr::new(10, 5, 0, 2))
            )
        );
    }

    #[test]
    fn default_network_is_created_once_and_keeps_its_subnet() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let first = store.network_by_name(DEFAULT_NETWORK).unwrap().unwrap();
        assert_eq!(
            (first.id, first.subnet(), first.mtu),
            (NetworkId(1), DEFAULT_OVERLAY_SUBNET, 1380)
        );
        let again = store
            .ensure_default_network(subnet("10.77.0.0/24"), 1300)
            .unwrap();
        assert_eq!(
            (again.id, again.subnet(), again.mtu),
            (NetworkId(1), DEFAULT_OVERLAY_SUBNET, 1300)
        );
        assert_eq!(store.networks().unwrap().len(), 1);
        let created = store
            .events(None, 100)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == EventKind::Overlay(OverlayEvent::NetworkCreated))
            .count();
        assert_eq!(created, 1);
        assert!(matches!(
            store.delete_network(DEFAULT_NETWORK, T0),
            Err(NetworkError::DefaultUndeletable)
        ));
    }

    #[test]
    fn enrolled_nodes_join_default_with_distinct_stable_addresses_and_macs() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, ma, mb) = {
            let store = open(dir.path());
            let a = enrol(&store, "a", &[]);
            let b = enrol(&store, "b", &[]);
            let (ra, rb) = (
                member(&store, "default", &a).unwrap(),
                member(&store, "default", &b).unwrap(),
            );
            assert_eq!(ra.address, Ipv4Addr::new(10, 90, 0, 1));
            assert_eq!(rb.address, Ipv4Addr::new(10, 90, 0, 2));
            assert_ne!(ra.mac, rb.mac);
            for m in [ra.mac, rb.mac] {
                assert_eq!(&m.0[..2], &[0x02, 0x5e]);
                assert!(!m.is_group());
            }
            // Re-enrolment keeps the memberships.
            assert!(store.join_networks(&a).unwrap().is_empty());
            (a, b, ra, rb)
        };
        let store = open(dir.path());
        assert_eq!(member(&store, "default", &a).unwrap(), ma);
        assert_eq!(member(&store, "default", &b).unwrap(), mb);
        let snap = store.overlay_snapshot().unwrap();
        assert_eq!(snap.networks.len(), 1);
        assert_eq!(snap.networks[0].members.len(), 2);
        assert_ne!(snap.nodes[&a].index, snap.nodes[&b].index);
        assert_eq!(snap.nodes[&a].key_sha256, None);
    }

    #[test]
    fn lowest_free_address_is_reused_and_a_full_subnet_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store
            .create_network("tiny", subnet("192.168.50.0/30"), None, T0)
            .unwrap();
        let (a, b, c) = (
            enrol(&store, "a", &[]),
            enrol(&store, "b", &[]),
            enrol(&store, "c", &[]),
        );
        store.add_member("tiny", &a, T0).unwrap();
        store.add_member("tiny", &b, T0).unwrap();
        let err = store.add_member("tiny", &c, T0).unwrap_err();
        assert!(matches!(err, NetworkError::SubnetFull { .. }), "{err}");
        assert!(err.to_string().contains("192.168.50.0/30"), "{err}");
        assert_eq!(member(&store, "tiny", &c), None, "a refusal writes nothing");
        store.remove_member("tiny", &a, T0).unwrap();
        let (m, changes) = store.add_member("tiny", &c, T0).unwrap();
        assert_eq!(
            m.address,
            Ipv4Addr::new(192, 168, 50, 1),
            "the freed lowest address"
        );
        assert_eq!(
            changes,
            [MembershipChange::Joined {
                network: m.network,
                node: c.clone(),
                mac: m.mac,
                address: m.address
            }]
        );
        assert!(matches!(
            store.remove_member("tiny", &a, T0),
            Err(NetworkError::NotMember { .. })
        ));
        assert!(matches!(
            store.add_member("default", &a, T0),
            Err(NetworkError::DefaultFixed)
        ));
        assert!(matches!(
            store.add_member("nope", &a, T0),
            Err(NetworkError::UnknownNetwork(_))
        ));
        assert!(matches!(
            store.add_member("tiny", &NodeId("n0".into()), T0),
            Err(NetworkError::UnknownNode(_))
        ));
    }

    #[test]
    fn create_refuses_overlaps_taken_names_and_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (rec, changes) = store
            .create_network("lab", subnet("10.91.0.0/24"), Some(9000), T0)
            .unwrap();
        assert_eq!((rec.id, rec.mtu), (NetworkId(2), 9000));
        assert_eq!(changes, [MembershipChange::NetworkCreated(rec.clone())]);
        let err = store
            .create_network("lab2", subnet("10.90.128.0/24"), None, T0)
            .unwrap_err();
        assert!(
            matches!(&err, NetworkError::Overlap { other, .. } if other == "default"),
            "{err}"
        );
        assert!(matches!(
            store.create_network("lab", subnet("10.92.0.0/24"), None, T0),
            Err(NetworkError::NameTaken(_))
        ));
        assert!(matches!(
            store.create_network("Lab", subnet("10.92.0.0/24"), None, T0),
            Err(NetworkError::BadName(_))
        ));
        assert!(matches!(
            store.create_network("-x", subnet("10.92.0.0/24"), None, T0),
            Err(NetworkError::BadName(_))
        ));
        assert!(matches!(
            store.create_network("x", subnet("10.92.0.0/24"), Some(100), T0),
            Err(NetworkError::BadMtu(100))
        ));
        let (rec, _) = store
            .create_network("x", subnet("10.92.0.0/24"), None, T0)
            .unwrap();
        assert_eq!(
            (rec.id, rec.mtu),
            (NetworkId(3), 1380),
            "MTU from default, ids counting on"
        );
    }

    #[test]
    fn a_label_change_moves_the_node_in_and_out_of_selected_networks() {
        use shoal_controller_core::labels::LabelChange;
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store
            .create_network("db", subnet("10.91.0.0/24"), None, T0)
            .unwrap();
        let multi: Selector = "role=db,zone in (a,b)".parse().unwrap();
        store.add_selector("db", &multi, T0).unwrap();
        let n = enrol(&store, "n1", &[("role", "db")]);
        assert!(member(&store, "db", &n).is_none(), "no zone yet");
        let label = |set: &[(&str, &str)], remove: &[&str]| {
            let change = LabelChange {
                set: set
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                remove: remove.iter().map(|k| k.to_string()).collect(),
                overwrite: true,
            };
            store.change_labels(&n, &change, T0).unwrap().unwrap();
            store.join_networks(&n).unwrap()
        };
        let changes = label(&[("zone", "b")], &[]);
        assert!(
            matches!(changes.as_slice(), [MembershipChange::Joined { node, .. }] if *node == n),
            "{changes:?}"
        );
        assert!(member(&store, "db", &n).unwrap().via_selector);
        let changes = label(&[], &["zone"]);
        assert!(
            matches!(changes.as_slice(), [MembershipChange::Left { node, .. }] if *node == n),
            "{changes:?}"
        );
        assert!(member(&store, "db", &n).is_none());
        assert!(member(&store, "default", &n).is_some(), "default stays");
    }

    /// A fleet upgraded in place: the `networks` table holds a record written before multi-term
    /// selectors, its selectors as `(key, value)` pairs.
    #[test]
    fn a_network_record_of_the_old_encoding_keeps_working() {
        #[derive(serde::Serialize)]
        struct OldNetworkRecord {
            id: NetworkId,
            name: String,
            subnet: Ipv4Addr,
            prefix_len: u8,
            mtu: u16,
            selectors: Vec<(String, String)>,
            created_at: UnixMillis,
        }
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let old = OldNetworkRecord {
            id: NetworkId(7),
            name: "legacy".into(),
            subnet: Ipv4Addr::new(10, 77, 0, 0),
            prefix_len: 24,
            mtu: 1380,
            selectors: vec![("role".into(), "db".into())],
            created_at: T0,
        };
        let bytes = postcard::to_allocvec(&old).unwrap();
        store
            .table(NETWORKS)
            .insert(&7u32.to_be_bytes()[..], bytes.as_slice())
            .unwrap();
        let rec = store.network_by_name("legacy").unwrap().unwrap();
        assert_eq!(rec.selectors, vec![Selector::equals("role", "db")]);
        let n = enrol(&store, "n1", &[("role", "db")]);
        assert!(member(&store, "legacy", &n).unwrap().via_selector);
        // Selectors are added and removed beside the old one, and the old one by its text.
        let multi: Selector = "role=db,!spot".parse().unwrap();
        store.add_selector("legacy", &multi, T0).unwrap();
        store
            .remove_selector("legacy", &"role=db".parse().unwrap(), T0)
            .unwrap();
        assert!(
            member(&store, "legacy", &n).unwrap().via_selector,
            "multi still matches"
        );
        let rec = store.network_by_name("legacy").unwrap().unwrap();
        assert_eq!(rec.selectors, vec![multi]);
    }

    #[test]
    fn selectors_add_matching_nodes_now_and_later_and_removal_drops_only_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store
            .create_network("storage", subnet("10.91.0.0/24"), None, T0)
            .unwrap();
        let s1 = enrol(&store, "s1", &[("role", "storage")]);
        let web = enrol(&store, "web", &[("role", "web")]);
        let both = enrol(&store, "both", &[("role", "storage")]);
        store.add_member("storage", &both, T0).unwrap();
        store.add_member("storage", &web, T0).unwrap();

        let changes = store
            .add_selector("storage", &Selector::equals("role", "storage"), T0)
            .unwrap();
        assert_eq!(
            changes.len(),
            1,
            "only s1 joins; both was already a member: {changes:?}"
        );
        assert!(store
            .add_selector("storage", &Selector::equals("role", "storage"), T0)
            .unwrap()
            .is_empty());
        let s2 = enrol(&store, "s2", &[("role", "storage")]);
        assert!(
            member(&store, "storage", &s2).unwrap().via_selector,
            "a later enrolment joins too"
        );
        let m = member(&store, "storage", &both).unwrap();
        assert!(m.explicit && m.via_selector);

        let err = store.remove_member("storage", &s1, T0).unwrap_err();
        assert!(
            matches!(err, NetworkError::ThroughSelector { .. })
                && err.to_string().contains("role=storage"),
            "{err}"
        );
        assert!(matches!(
            store.remove_selector("storage", &Selector::equals("role", "nope"), T0),
            Err(NetworkError::UnknownSelector { .. })
        ));

        let changes = store
            .remove_selector("storage", &Selector::equals("role", "storage"), T0)
            .unwrap();
        let mut left: Vec<NodeId> = changes
            .iter()
            .filter_map(|c| match c {
                MembershipChange::Left { node, .. } => Some(node.clone()),
                _ => None,
            })
            .collect();
        left.sort();
        let mut want = vec![s1, s2];
        want.sort();
        assert_eq!(left, want);
        let mut kept = names(&store, "storage");
        kept.sort();
        let mut want = vec![both.clone(), web];
        want.sort();
        assert_eq!(kept, want);
        assert!(!member(&store, "storage", &both).unwrap().via_selector);
        assert!(store
            .network_by_name("storage")
            .unwrap()
            .unwrap()
            .selectors
            .is_empty());
        assert!(store
            .events(None, 100)
            .unwrap()
            .iter()
            .any(|e| e.message.contains("selector role=storage removed")));
    }

    #[test]
    fn deleting_a_network_drops_its_members() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (lab, _) = store
            .create_network("lab", subnet("10.91.0.0/24"), None, T0)
            .unwrap();
        let a = enrol(&store, "a", &[]);
        store.add_member("lab", &a, T0).unwrap();
        let (_, changes) = store.delete_network("lab", T0).unwrap();
        assert_eq!(
            changes,
            [
                MembershipChange::Left {
                    network: lab.id,
                    node: a.clone()
                },
                MembershipChange::NetworkDeleted(lab.id)
            ]
        );
        assert!(store.network_by_name("lab").unwrap().is_none());
        assert!(store.members(lab.id).unwrap().is_empty());
        assert!(member(&store, "default", &a).is_some());
        let (again, _) = store
            .create_network("lab", subnet("10.91.0.0/24"), None, T0)
            .unwrap();
        assert_ne!(again.id, lab.id, "network ids are not reused");
    }

    #[test]
    fn removed_nodes_free_their_addresses_and_peer_indexes_are_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = enrol(&store, "a", &[]);
        let b = enrol(&store, "b", &[]);
        let ia = store.peer_index(&a).unwrap();
        assert_eq!(store.peer_index(&a).unwrap(), ia, "stable");
        assert!(store.set_node_key(&a, [7; 32]).unwrap());
        assert!(
            !store.set_node_key(&a, [7; 32]).unwrap(),
            "unchanged: not written"
        );
        assert_eq!(store.node_key(&a).unwrap(), Some([7; 32]));

        store.remove_node(&a, T0).unwrap();
        let changes = store.leave_all_networks(&a).unwrap();
        assert_eq!(
            changes,
            [MembershipChange::Left {
                network: NetworkId(1),
                node: a.clone()
            }]
        );
        assert_eq!(store.node_key(&a).unwrap(), None);
        assert!(!store.overlay_snapshot().unwrap().nodes.contains_key(&a));
        assert!(matches!(
            store.peer_index(&a),
            Err(NetworkError::UnknownNode(_))
        ));
        let c = enrol(&store, "c", &[]);
        assert_eq!(
            addr(&store, "default", &c),
            Ipv4Addr::new(10, 90, 0, 1),
            "a's address is free again"
        );
        let ic = store.peer_index(&c).unwrap();
        assert!(
            ic.0 > store.peer_index(&b).unwrap().0 && ic != ia,
            "{ic:?} after {ia:?}"
        );
    }

    #[test]
    fn a_restart_repairs_memberships() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            let store = Store::open(dir.path()).unwrap();
            // Nodes enrolled before networks existed, and one removed without leaving (a crash).
            let a = enrol_without_networks(&store, "a");
            let b = enrol_without_networks(&store, "b");
            store
                .ensure_default_network(DEFAULT_OVERLAY_SUBNET, DEFAULT_OVERLAY_MTU)
                .unwrap();
            store.remove_node(&b, T0).unwrap();
            (a, b)
        };
        let store = open(dir.path());
        assert_eq!(names(&store, "default"), [a]);
        assert!(!store.overlay_snapshot().unwrap().nodes.contains_key(&b));
    }

    fn enrol_without_networks(store: &Store, machine: &str) -> NodeId {
        let id = format!("tok-{machine}");
        store
            .create_token(&TokenRecord {
                id: id.clone(),
                secret_sha256: Sha256::digest(b"s").into(),
                created_at: T0,
                expires_at: None,
                max_uses: None,
                uses: 0,
                revoked_at: None,
                labels: BTreeMap::new(),
            })
            .unwrap();
        let hw = HardwareId {
            source: HardwareIdSource::DmiUuid,
            value: machine.to_owned(),
        };
        store
            .enrol(&EnrolParams {
                token_id: &id,
                secret: "s",
                hardware_id: &hw,
                hostname: machine,
                now: T0,
                key: &shoal_overlay::pki::sha256(machine.as_bytes()),
                remote: "test",
                is_live: &|_| false,
            })
            .unwrap()
            .node
            .id
    }

    #[test]
    fn netmap_epoch_rises_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            assert_eq!(store.next_netmap_epoch().unwrap(), 1);
            assert_eq!(store.next_netmap_epoch().unwrap(), 2);
        }
        let store = open(dir.path());
        assert_eq!(store.next_netmap_epoch().unwrap(), 3);
    }

    #[test]
    fn macs_are_rerolled_on_collision() {
        let node = NodeId("n0000000001".into());
        assert_eq!(
            mac_for(NetworkId(1), &node, 0),
            mac_for(NetworkId(1), &node, 0)
        );
        assert_ne!(
            mac_for(NetworkId(1), &node, 0),
            mac_for(NetworkId(1), &node, 1)
        );
        assert_ne!(
            mac_for(NetworkId(1), &node, 0),
            mac_for(NetworkId(2), &node, 0)
        );
    }
}
