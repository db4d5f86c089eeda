//! WireGuard devices of overlay networks (issue 17): their records, addresses from the network's
//! IPAM (shared with the nodes: `Work::used_addresses` in `networks.rs`), each network's gateway key, and the
//! admin routes `/v1/wireguard/{network}/peers…`.
//!
//! Changes run like every overlay change: under the overlay lock, worked out from reads after the
//! overlay version and committed in one transaction only if the version is unchanged (so two
//! controllers on one etcd never hand out one address twice). The network's gateway key is made
//! with its first device; it never leaves the controller except to the network's gateway
//! agents. A device's private key is never here.
//!
//! (v9) Gateway agents say so (`AgentMsg::WireGuardGateway`); every v9 agent is then told its
//! networks' devices and gateways, and gateways the key and which of them is active
//! (`ControllerMsg::WireGuard`, decided by `shoal_controller_core::wireguard::map_for`), again on
//! every device, gateway or membership change ([`Controller::wireguard_changed`]).
//!
//! One active gateway per network for the whole fleet: the choice is a record in the shared store
//! (`wg_active`), settled by a transaction that re-reads it (compare-and-swap), so every controller
//! tells its gateway agents the same one and a restarted controller keeps it. Each controller
//! decides from the gateways connected to it and those its peers said they hold
//! (`MeshMsg::WireGuardGateways`); after changing the record it tells the others
//! (`MeshMsg::WireGuardChanged`, also sent after a device is added or removed), who read it again and tell their own gateway agents
//! (`shoal_controller_core::wireguard::decide_active` has the rules).
//!
//! Trees: `wg_devices` (network id ‖ name → [`DeviceRecord`]), `wg_gateways` (network id →
//! [`GatewayRecord`]), `wg_active` (network id → [`ActiveGateway`]).

use axum::{
    extract::{Path, State},
    routing::{delete, get},
    Json, Router,
};
use shoal_api::wireguard::{AddPeer, AddedPeer, PeerView};
use shoal_controller_core::networks::free_address;
use shoal_controller_core::selector::valid_name;
use shoal_controller_core::time::rfc3339_ms as rfc3339;
use shoal_controller_core::wireguard::{
    decide_active, map_for, ActiveGateway, DeviceRecord, FleetGateways, GatewayRecord,
    WireGuardSite,
};
use shoal_proto::{ControllerMsg, NetworkId, NodeId, UnixMillis, WireGuardMap};
use shoal_wireguard::Key;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tracing::info;

use super::networks::{NetworkError, Work};
use crate::cluster::mesh::wire::MeshMsg;
use crate::http::{blocking, Ctl, HttpError};
use crate::server::{now_ms, Controller};
use crate::store::Table;
use crate::store::WG_GATEWAYS;
use crate::store::{decode, EventKind, OverlayEvent, Scan, Store, StoreError, WG_DEVICES};

/// Each network's active gateway, fleet-wide: network id (big-endian u32) → [`ActiveGateway`].
pub(crate) const WG_ACTIVE: &str = "wg_active";
const ACTIVE: Table<ActiveGateway> = Table::new(WG_ACTIVE);

/// Key of a device record: network id (big-endian) ‖ name.
pub(super) fn device_key(network: NetworkId, name: &str) -> Vec<u8> {
    let mut key = network.0.to_be_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    key
}

impl Store {
    /// A network's WireGuard devices, by name.
    pub fn wg_devices(&self, network: NetworkId) -> Result<Vec<DeviceRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .table(WG_DEVICES)
            .scan(Scan::prefix(network.0.to_be_bytes()))
        {
            let (key, value) = item?;
            out.push(decode(WG_DEVICES, &key, &value)?);
        }
        Ok(out)
    }

    /// A network's gateway record, once it has had a device.
    pub fn wg_gateway(&self, network: NetworkId) -> Result<Option<GatewayRecord>, StoreError> {
        let key = network.0.to_be_bytes();
        match self.table(WG_GATEWAYS).get(&key[..])? {
            Some(bytes) => Ok(Some(decode(WG_GATEWAYS, &key, &bytes)?)),
            None => Ok(None),
        }
    }

    /// A network's active gateway record, if one was ever chosen.
    pub fn wg_active(&self, network: NetworkId) -> Result<Option<ActiveGateway>, StoreError> {
        self.get(&ACTIVE, network.0.to_be_bytes())
    }

    /// Settles a network's active gateway: `decide` is given the stored record inside a
    /// transaction and its answer is written if it differs (compare-and-swap: a record another
    /// controller wrote meanwhile makes the transaction run again with it). Returns the record
    /// now stored and whether this call wrote it.
    pub fn settle_wg_active(
        &self,
        network: NetworkId,
        decide: impl Fn(Option<&ActiveGateway>) -> Option<ActiveGateway>,
    ) -> Result<(Option<ActiveGateway>, bool), StoreError> {
        let key = network.0.to_be_bytes();
        self.transaction(&[WG_ACTIVE], |tx| {
            let stored = tx.get(&ACTIVE, &key)?;
            match decide(stored.as_ref()) {
                Some(want) if stored.as_ref() != Some(&want) => {
                    tx.put(&ACTIVE, &key, &want)?;
                    Ok((Some(want), true))
                }
                _ => Ok((stored, false)),
            }
        })
    }

    /// Adds a device with the lowest free address of the network; makes the network's gateway key
    /// with its first device. `endpoint` replaces the network's endpoint when given (the first
    /// device needs one).
    pub fn add_wg_device(
        &self,
        network: &str,
        name: &str,
        public_key: Key,
        endpoint: Option<&str>,
        now: UnixMillis,
    ) -> Result<(DeviceRecord, GatewayRecord), NetworkError> {
        if !valid_name(name) {
            return Err(NetworkError::BadWireguard(format!(
                "device name {name:?} is not allowed: use 1 to 31 of a-z, 0-9 and '-', not starting with '-'"
            )));
        }
        if let Some(e) = endpoint {
            shoal_wireguard::keys::check_endpoint(e).map_err(|_| {
                NetworkError::BadWireguard(format!(
                    "endpoint {e:?} is not HOST:PORT (the address clients send to)"
                ))
            })?;
        }
        self.overlay_retry(|| {
            let _guard = self.overlay_guard();
            let mut work = Work::new(self)?;
            let net = work.by_name(network)?;
            let devices = work.devices(net.id)?;
            if devices.contains_key(name) {
                return Err(NetworkError::DeviceTaken {
                    network: network.to_owned(),
                    name: name.to_owned(),
                });
            }
            if let Some(other) = devices.values().find(|d| d.public_key == public_key.0) {
                return Err(NetworkError::KeyTaken {
                    network: network.to_owned(),
                    other: other.name.clone(),
                });
            }
            let used = work.used_addresses(net.id)?;
            let address =
                free_address(net.subnet(), &used).ok_or_else(|| NetworkError::SubnetFull {
                    network: net.name.clone(),
                    subnet: net.subnet(),
                })?;
            let gateway = match (self.wg_gateway(net.id)?, endpoint) {
                (Some(g), None) => g,
                (Some(g), Some(e)) => GatewayRecord {
                    endpoint: e.to_owned(),
                    ..g
                },
                (None, Some(e)) => GatewayRecord {
                    network: net.id,
                    private_key: Key::generate_private().0,
                    endpoint: e.to_owned(),
                },
                (None, None) => return Err(NetworkError::NoEndpoint(network.to_owned())),
            };
            let device = DeviceRecord {
                network: net.id,
                name: name.to_owned(),
                public_key: public_key.0,
                address,
                created_at: now,
            };
            work.devices(net.id)?
                .insert(name.to_owned(), device.clone());
            work.plan
                .devices
                .insert((net.id, name.to_owned()), Some(device.clone()));
            work.plan.gateways.insert(net.id, Some(gateway.clone()));
            work.event(
                EventKind::Overlay(OverlayEvent::NetworkChanged),
                None,
                format!("WireGuard device {name} added to network {network} as {address}"),
            );
            work.commit(now)?;
            info!(network, device = name, %address, "WireGuard device added");
            Ok((device, gateway.clone()))
        })
    }

    /// Removes a device; returns its record.
    pub fn remove_wg_device(
        &self,
        network: &str,
        name: &str,
        now: UnixMillis,
    ) -> Result<DeviceRecord, NetworkError> {
        self.overlay_retry(|| {
            let _guard = self.overlay_guard();
            let mut work = Work::new(self)?;
            let net = work.by_name(network)?;
            let device =
                work.devices(net.id)?
                    .remove(name)
                    .ok_or_else(|| NetworkError::UnknownDevice {
                        network: network.to_owned(),
                        name: name.to_owned(),
                    })?;
            work.plan.devices.insert((net.id, name.to_owned()), None);
            work.event(
                EventKind::Overlay(OverlayEvent::NetworkChanged),
                None,
                format!(
                    "WireGuard device {name} ({}) removed from network {network}",
                    device.address
                ),
            );
            work.commit(now)?;
            info!(network, device = name, "WireGuard device removed");
            Ok(device)
        })
    }
}

/// (v9) The WireGuard gateway agents connected to this controller, and what each v9 agent was last
/// told. Those connected to other controllers of a cluster are what the mesh heard
/// ([`crate::cluster::mesh::Mesh::remote_gateways`]).
#[derive(Debug, Default)]
pub(crate) struct Gateways {
    state: Mutex<GatewaysState>,
    /// One sync at a time, so maps reach an agent in the order they were computed.
    sync: Mutex<()>,
}

#[derive(Debug, Default)]
struct GatewaysState {
    /// Gateway node → (its connection, its listen address).
    gateways: BTreeMap<NodeId, (u64, SocketAddr)>,
    /// The map last queued to each agent's connection.
    sent: HashMap<NodeId, WireGuardMap>,
    /// Each network's active gateway as last settled (for the log: it names changes).
    active: BTreeMap<NetworkId, NodeId>,
}

impl Gateways {
    fn state(&self) -> std::sync::MutexGuard<'_, GatewaysState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Controller {
    /// (v9) `node`'s agent, on connection `conn_id`, runs a gateway on `listen`.
    pub(crate) fn wireguard_gateway(
        self: &Arc<Self>,
        node: &NodeId,
        conn_id: u64,
        listen: SocketAddr,
    ) {
        info!(node = %node, %listen, "WireGuard gateway connected");
        self.wireguard
            .state()
            .gateways
            .insert(node.clone(), (conn_id, listen));
        self.wireguard_changed();
    }

    /// A connection ended: a gateway on it is gone (another becomes active), and the next
    /// connection of the node is told its map afresh.
    pub(crate) fn wireguard_disconnected(self: &Arc<Self>, node: &NodeId, conn_id: u64) {
        let was_gateway = {
            let mut st = self.wireguard.state();
            st.sent.remove(node);
            if st.gateways.get(node).is_some_and(|(c, _)| *c == conn_id) {
                st.gateways.remove(node);
                true
            } else {
                false
            }
        };
        if was_gateway {
            info!(node = %node, "WireGuard gateway disconnected");
            self.wireguard_changed();
        }
    }

    /// Something WireGuard agents are told about changed (devices, gateways, memberships, a v9
    /// agent connected): recompute every v9 agent's map, in the background, and queue those that
    /// differ from what the agent was last told.
    pub(crate) fn wireguard_changed(self: &Arc<Self>) {
        let c = self.clone();
        let sync = move || {
            if let Err(e) = c.wireguard_sync() {
                tracing::warn!(cause = %e, "WireGuard maps not sent");
            }
        };
        // Store reads: off the async threads when there are any.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(sync)),
            Err(_) => sync(),
        }
    }

    /// [`Controller::wireguard_changed`] on the calling thread (callers already doing store work).
    pub(crate) fn wireguard_resync(&self) {
        if let Err(e) = self.wireguard_sync() {
            tracing::warn!(cause = %e, "WireGuard maps not sent");
        }
    }

    fn wireguard_sync(&self) -> Result<(), StoreError> {
        let _one = self
            .wireguard
            .sync
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut sites = BTreeMap::new();
        for net in self.store.networks()? {
            let Some(gateway) = self.store.wg_gateway(net.id)? else {
                continue;
            };
            sites.insert(
                net.id,
                WireGuardSite {
                    gateway,
                    devices: self.store.wg_devices(net.id)?,
                    members: self
                        .store
                        .members(net.id)?
                        .into_iter()
                        .map(|m| m.node)
                        .collect(),
                },
            );
        }
        // Agents that speak 9, with their connection and queue.
        let targets: Vec<(NodeId, u64, crate::connections::queue::NodeTx)> = self
            .live()
            .conns
            .iter()
            .filter(|(_, h)| h.protocol >= Some(shoal_proto::WIREGUARD_PROTOCOL))
            .map(|(n, h)| (n.clone(), h.conn_id, h.tx.clone()))
            .collect();
        let local: BTreeSet<NodeId> = {
            let mut st = self.wireguard.state();
            // A gateway counts while the connection that announced it is the node's live one.
            st.gateways
                .retain(|node, (conn, _)| targets.iter().any(|(n, c, _)| n == node && c == conn));
            st.gateways.keys().cloned().collect()
        };
        self.mesh.publish_gateways(local.iter().cloned().collect());
        let fleet = self.fleet_gateways(&local);
        // Settled in the shared store (no state lock held: on etcd these are network round trips).
        let mut active = BTreeMap::new();
        let mut wrote = false;
        for id in sites.keys() {
            let stored = self.store.wg_active(*id)?;
            let want = decide_active(*id, &sites, &fleet, stored.as_ref());
            let record = if want != stored {
                match self
                    .store
                    .settle_wg_active(*id, |stored| decide_active(*id, &sites, &fleet, stored))
                {
                    Ok((record, written)) => {
                        wrote |= written;
                        record
                    }
                    // Agents are still told what the store holds; the next change retries.
                    Err(e) => {
                        tracing::warn!(network = id.0, cause = %e, "active WireGuard gateway not written");
                        stored
                    }
                }
            } else {
                stored
            };
            if let Some(r) = record {
                active.insert(*id, r.node);
            }
        }
        if wrote {
            self.mesh.broadcast(MeshMsg::WireGuardChanged);
        }
        let gateways: BTreeSet<NodeId> = fleet.connected.keys().cloned().collect();
        let mut st = self.wireguard.state();
        for (network, node) in &active {
            if st.active.get(network) != Some(node) {
                info!(network = network.0, gateway = %node, controller = %fleet.connected.get(node).map_or("-", String::as_str), "active WireGuard gateway");
            }
        }
        st.active = active.clone();
        for (node, _, tx) in targets {
            // Only gateways connected here are given a role; the list of a network's gateways
            // names every controller's.
            let map = map_for(&node, &sites, &gateways, &active);
            let unchanged = match st.sent.get(&node) {
                Some(sent) => *sent == map,
                None => map.networks.is_empty(),
            };
            if unchanged {
                continue;
            }
            tracing::debug!(node = %node, networks = map.networks.len(), "WireGuard map queued");
            if tx.send(ControllerMsg::WireGuard(map.clone())).is_ok() {
                st.sent.insert(node, map);
            }
        }
        Ok(())
    }

    /// Where the fleet's gateway agents are connected, as this controller knows it: its own
    /// (`local`), and those its mesh peers said they hold.
    fn fleet_gateways(&self, local: &BTreeSet<NodeId>) -> FleetGateways {
        let me = self.cluster.id.clone();
        let mut fleet = FleetGateways {
            me: me.clone(),
            heard: [me.clone()].into(),
            live: None,
            connected: BTreeMap::new(),
        };
        for (peer, nodes) in self.mesh.remote_gateways() {
            for n in nodes {
                fleet.connected.insert(n, peer.clone());
            }
            fleet.heard.insert(peer);
        }
        // Our own sessions win over what a peer said of a node before it moved here.
        for n in local {
            fleet.connected.insert(n.clone(), me.clone());
        }
        let members = self.cluster.members();
        fleet.live = if !self.cluster.is_clustered() {
            Some([me].into())
        } else if members.is_empty() {
            None
        } else {
            Some(members.into_iter().map(|m| m.id).collect())
        };
        fleet
    }
}

/// This domain's admin routes (the router adds authentication).
pub fn routes() -> Router<Ctl> {
    Router::new()
        .route(
            "/v1/wireguard/{network}/peers",
            get(list_peers).post(add_peer),
        )
        .route("/v1/wireguard/{network}/peers/{name}", delete(remove_peer))
}

fn peer_view(network: &str, d: &DeviceRecord) -> PeerView {
    PeerView {
        name: d.name.clone(),
        network: network.to_owned(),
        address: d.address.to_string(),
        public_key: Key(d.public_key).to_string(),
        created_at: rfc3339(d.created_at.0),
    }
}

async fn add_peer(
    State(ctl): State<Ctl>,
    Path(network): Path<String>,
    Json(req): Json<AddPeer>,
) -> Result<Json<AddedPeer>, HttpError> {
    let key: Key = req
        .public_key
        .parse()
        .map_err(|e: shoal_wireguard::keys::KeyParseError| {
            HttpError::from(NetworkError::BadWireguard(e.to_string()))
        })?;
    blocking(move || {
        let (device, gateway) =
            ctl.store
                .add_wg_device(&network, &req.name, key, req.endpoint.as_deref(), now_ms())?;
        ctl.wireguard_changed();
        ctl.mesh.broadcast(MeshMsg::WireGuardChanged);
        let net = ctl
            .store
            .network_by_name(&network)?
            .ok_or_else(|| HttpError::from(NetworkError::UnknownNetwork(network.clone())))?;
        Ok(Json(AddedPeer {
            peer: peer_view(&network, &device),
            gateway_public_key: Key(gateway.private_key).public().to_string(),
            endpoint: gateway.endpoint,
            allowed_ips: net.subnet().to_string(),
        }))
    })
    .await
}

async fn list_peers(
    State(ctl): State<Ctl>,
    Path(network): Path<String>,
) -> Result<Json<Vec<PeerView>>, HttpError> {
    blocking(move || {
        let net = ctl
            .store
            .network_by_name(&network)?
            .ok_or_else(|| HttpError::from(NetworkError::UnknownNetwork(network.clone())))?;
        let mut devices = ctl.store.wg_devices(net.id)?;
        devices.sort_by_key(|d| d.address);
        Ok(Json(
            devices.iter().map(|d| peer_view(&network, d)).collect(),
        ))
    })
    .await
}

async fn remove_peer(
    State(ctl): State<Ctl>,
    Path((network, name)): Path<(String, String)>,
) -> Result<Json<PeerView>, HttpError> {
    blocking(move || {
        let device = ctl.store.remove_wg_device(&network, &name, now_ms())?;
        // Gateways drop the device's session when they hear this, on every controller.
        ctl.wireguard_changed();
        ctl.mesh.broadcast(MeshMsg::WireGuardChanged);
        Ok(Json(peer_view(&network, &device)))
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use shoal_controller_core::networks::{DEFAULT_OVERLAY_MTU, DEFAULT_OVERLAY_SUBNET};

    use super::*;
    use crate::test_support::enrol_for_tests;

    const T0: UnixMillis = UnixMillis(1_700_000_000_000);

    fn open(dir: &std::path::Path) -> Store {
        let store = Store::open(dir).expect("open");
        store
            .ensure_default_network(DEFAULT_OVERLAY_SUBNET, DEFAULT_OVERLAY_MTU)
            .expect("default network");
        store
    }

    fn key() -> Key {
        Key::generate_private().public()
    }

    #[test]
    fn devices_share_the_networks_ipam_with_nodes_and_keep_their_address() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let a = enrol_for_tests(&store, "a", &[], T0);
        let a_addr = store.members(NetworkId(1)).expect("members")[0].address;
        assert_eq!(a_addr, Ipv4Addr::new(10, 90, 0, 1));

        let (phone, gw) = store
            .add_wg_device("default", "phone", key(), Some("gw.example.net:51820"), T0)
            .expect("add");
        assert_eq!(
            phone.address,
            Ipv4Addr::new(10, 90, 0, 2),
            "next to the node"
        );
        assert_eq!(gw.endpoint, "gw.example.net:51820");
        // A node enrolled after the device does not get the device's address.
        let b = enrol_for_tests(&store, "b", &[], T0);
        let b_addr = store
            .members(NetworkId(1))
            .expect("members")
            .into_iter()
            .find(|m| m.node == b)
            .expect("b is a member")
            .address;
        assert_eq!(b_addr, Ipv4Addr::new(10, 90, 0, 3));
        // The second device reuses the gateway key and endpoint.
        let (laptop, gw2) = store
            .add_wg_device("default", "laptop", key(), None, T0)
            .expect("add");
        assert_eq!(laptop.address, Ipv4Addr::new(10, 90, 0, 4));
        assert_eq!(gw2, gw);
        // Reopened: all still there.
        drop(store);
        let store = open(dir.path());
        let names: Vec<String> = store
            .wg_devices(NetworkId(1))
            .expect("devices")
            .into_iter()
            .map(|d| d.name)
            .collect();
        assert_eq!(names, ["laptop", "phone"]);
        assert_eq!(store.wg_gateway(NetworkId(1)).expect("gw"), Some(gw));
        // Removal frees the address for the next device.
        let removed = store
            .remove_wg_device("default", "phone", T0)
            .expect("remove");
        assert_eq!(removed.address, Ipv4Addr::new(10, 90, 0, 2));
        let (tablet, _) = store
            .add_wg_device("default", "tablet", key(), None, T0)
            .expect("add");
        assert_eq!(tablet.address, Ipv4Addr::new(10, 90, 0, 2));
        let _ = a;
    }

    #[test]
    fn bad_and_conflicting_devices_are_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let k = key();
        let err = store
            .add_wg_device("default", "phone", k, None, T0)
            .expect_err("no endpoint");
        assert!(err.to_string().contains("--endpoint"), "{err}");
        let err = store
            .add_wg_device("default", "Phone!", k, Some("gw:51820"), T0)
            .expect_err("bad name");
        assert!(err.to_string().contains("not allowed"), "{err}");
        let err = store
            .add_wg_device("default", "phone", k, Some("gw"), T0)
            .expect_err("bad endpoint");
        assert!(err.to_string().contains("HOST:PORT"), "{err}");
        // Nothing that could add a line to the client's configuration.
        let err = store
            .add_wg_device("default", "phone", k, Some("gw:1\nPostUp = id:51820"), T0)
            .expect_err("injected line");
        assert!(err.to_string().contains("HOST:PORT"), "{err}");
        let err = store
            .add_wg_device("nope", "phone", k, Some("gw:51820"), T0)
            .expect_err("no network");
        assert!(matches!(err, NetworkError::UnknownNetwork(_)), "{err}");
        store
            .add_wg_device("default", "phone", k, Some("gw:51820"), T0)
            .expect("add");
        assert!(matches!(
            store.add_wg_device("default", "phone", key(), None, T0),
            Err(NetworkError::DeviceTaken { .. })
        ));
        assert!(matches!(
            store.add_wg_device("default", "other", k, None, T0),
            Err(NetworkError::KeyTaken { .. })
        ));
        assert!(matches!(
            store.remove_wg_device("default", "ghost", T0),
            Err(NetworkError::UnknownDevice { .. })
        ));
    }

    #[test]
    fn the_active_gateway_record_is_swapped_only_from_what_is_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let net = NetworkId(1);
        let rec = |n: &str, c: &str| ActiveGateway {
            node: NodeId(n.into()),
            controller: c.into(),
        };
        assert_eq!(store.wg_active(net).expect("read"), None);
        // The first decision is written; deciding alike again writes nothing.
        let first = store
            .settle_wg_active(net, |stored| stored.cloned().or(Some(rec("a", "k1"))))
            .expect("settle");
        assert_eq!(first, (Some(rec("a", "k1")), true));
        let again = store
            .settle_wg_active(net, |stored| stored.cloned().or(Some(rec("b", "k2"))))
            .expect("settle");
        assert_eq!(
            again,
            (Some(rec("a", "k1")), false),
            "decided from the stored record"
        );
        // A decision for none keeps the record; a new one replaces it, and a reopened store has it.
        assert_eq!(
            store.settle_wg_active(net, |_| None).expect("settle"),
            (Some(rec("a", "k1")), false)
        );
        store
            .settle_wg_active(net, |_| Some(rec("b", "k2")))
            .expect("settle");
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.wg_active(net).expect("read"), Some(rec("b", "k2")));
    }

    #[test]
    fn deleting_a_network_drops_its_devices_gateway_key_and_active_gateway() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let subnet = "10.91.0.0/24".parse().expect("subnet");
        let (net, _) = store
            .create_network("lab", subnet, None, T0)
            .expect("create");
        store
            .add_wg_device("lab", "phone", key(), Some("gw:51820"), T0)
            .expect("add");
        let active = ActiveGateway {
            node: NodeId("gw-a".into()),
            controller: "k1".into(),
        };
        store
            .settle_wg_active(net.id, |_| Some(active.clone()))
            .expect("settle");
        store.delete_network("lab", T0).expect("delete");
        assert!(store.wg_devices(net.id).expect("devices").is_empty());
        assert_eq!(store.wg_gateway(net.id).expect("gw"), None);
        // Nothing of the network is left in the store, its active gateway included.
        assert_eq!(store.wg_active(net.id).expect("active"), None);
    }
}
