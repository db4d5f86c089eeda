//! The overlay as the shell sees it: the datapath started from the cached netmap or when a session
//! speaks overlay (protocol 2), netmaps and punch requests passed on, the NAT's mapping measured
//! with the controller's probe port, and path reports.

use std::{net::SocketAddr, time::Duration};

use shoal_overlay::{
    node::{NodeCommand, NodeEvent, OverlayNode},
    send_msg,
    tls::{self, PeerTls},
};
use shoal_proto::{AgentMsg, NatMapping, Netmap, NetmapDelta, Observed, OverlayHello, Punch};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{
    credentials::key_der,
    shell::{AttemptError, Shell, ShellEvent},
    AgentConfig, AgentError,
};
use crate::{
    overlay::{self as ov, AgentEndpoint, DeltaOutcome, NetmapCache},
    state::Credentials,
};

/// The overlay's state in the shell: it outlives control connections.
pub(super) struct OverlayState {
    /// The one UDP socket's endpoint, shared with the control connection.
    pub(super) endpoint: AgentEndpoint,
    /// The netmap last received, kept in the state dir.
    pub(super) cache: NetmapCache,
    node: Option<OverlayNode>,
    observed: Option<SocketAddr>,
    nat: NatMapping,
    /// Where peers saw this node that nothing else shows.
    peer_observed: ov::PeerObserved,
    /// (v9) WireGuard devices, gateways, and this agent's gateway.
    pub(super) wireguard: super::wireguard::WireGuardState,
}

impl OverlayState {
    /// The overlay before its datapath starts.
    pub(super) fn new(endpoint: AgentEndpoint, cache: NetmapCache) -> OverlayState {
        OverlayState {
            endpoint,
            cache,
            node: None,
            observed: None,
            nat: NatMapping::Unknown,
            peer_observed: ov::PeerObserved::default(),
            wireguard: Default::default(),
        }
    }

    /// The running datapath, if any.
    pub(super) fn node(&self) -> Option<&OverlayNode> {
        self.node.as_ref()
    }

    /// Starts the datapath if it is not running; its events go to `events`.
    pub(super) fn ensure_node(
        &mut self,
        config: &AgentConfig,
        creds: &Credentials,
        events: &mpsc::UnboundedSender<ShellEvent>,
    ) {
        if self.node.is_some() {
            return;
        }
        let tls = match key_der(&creds.key_pem).and_then(|key| {
            PeerTls::new(&creds.ca_der, &creds.cert_der, key)
                .map_err(|e| AgentError::Tls(e.to_string()))
        }) {
            Ok(t) => t,
            Err(e) => {
                warn!(cause = %e, "overlay not started");
                return;
            }
        };
        let mut node_config = config.overlay.clone();
        node_config.me = creds.node_id.clone();
        let (node, mut node_events) =
            OverlayNode::spawn(self.endpoint.endpoint.clone(), tls, node_config);
        node.command(NodeCommand::Nat(self.nat));
        let forward = events.clone();
        tokio::spawn(async move {
            while let Some(e) = node_events.recv().await {
                if forward.send(ShellEvent::Node(e)).is_err() {
                    return;
                }
            }
        });
        self.node = Some(node);
    }

    /// Hands the cached netmap to the datapath.
    pub(super) fn push_netmap(&self) {
        if let (Some(node), Some(map)) = (&self.node, self.cache.get()) {
            node.command(NodeCommand::Netmap(map.clone()));
        }
    }

    /// (v9) Applies the WireGuard map to the datapath with the current netmap.
    pub(super) fn apply_wireguard(&mut self, listen: Option<SocketAddr>) {
        self.wireguard
            .apply(listen, self.node.as_ref(), self.cache.get());
    }

    /// `OverlayHello`: asks for the netmap (`full`, or changes since the cached version).
    fn hello(&self, config: &AgentConfig, full: bool) -> AgentMsg {
        AgentMsg::Overlay(OverlayHello {
            netmap_version: if full { None } else { self.cache.version() },
            local_endpoints: self.peer_observed.with_local(ov::local_endpoints(
                self.endpoint.port,
                &config.overlay.tap_prefix,
            )),
            nat: self.nat,
        })
    }
}

impl Shell<'_> {
    /// The session speaks overlay: starts the datapath (unless `--no-overlay`) and says hello.
    pub(super) async fn start_overlay(
        &mut self,
        send: &mut quinn::SendStream,
        creds: Option<&Credentials>,
    ) -> Result<(), AttemptError> {
        if let Some(c) = creds.filter(|_| self.config.overlay_enabled) {
            self.overlay.ensure_node(self.config, c, &self.events);
            send_msg(send, &self.overlay.hello(self.config, false)).await?;
        }
        Ok(())
    }

    /// The controller's view of this node's address: measures the NAT's mapping with its probe
    /// port (the answer comes as [`ShellEvent::Probed`]); the message to send back, if any.
    pub(super) fn observed(
        &mut self,
        o: Observed,
        creds: Option<&Credentials>,
    ) -> Option<AgentMsg> {
        self.overlay.observed = Some(o.address);
        match (o.probe_port, creds) {
            (Some(port), Some(c)) => {
                let probe = SocketAddr::new(self.current.ip(), port);
                let client = key_der(&c.key_pem).and_then(|k| {
                    tls::node_client_config(&c.ca_der, &c.cert_der, k, Duration::from_secs(5))
                        .map_err(|e| AgentError::Tls(e.to_string()))
                });
                let endpoint = self.overlay.endpoint.endpoint.clone();
                let events = self.events.clone();
                let main = o.address;
                tokio::spawn(async move {
                    let result = match client {
                        Ok(client) => ov::probe_observed(&endpoint, client, probe).await,
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = events.send(ShellEvent::Probed { main, result });
                });
                None
            }
            _ => self.probed(
                o.address,
                Err("the controller has no probe port".into()),
                true,
            ),
        }
    }

    /// The NAT probe ended: a changed mapping is told to the controller.
    pub(super) fn probed(
        &mut self,
        main: SocketAddr,
        result: Result<SocketAddr, String>,
        ready: bool,
    ) -> Option<AgentMsg> {
        let probe = match result {
            Ok(addr) => Some(addr),
            Err(e) => {
                warn!(cause = %e, "NAT probe failed; mapping behaviour unknown");
                None
            }
        };
        let local =
            ov::local_endpoints(self.overlay.endpoint.port, &self.config.overlay.tap_prefix);
        let nat = ov::classify_nat(main, probe, &local);
        if nat == self.overlay.nat || !ready {
            return None;
        }
        info!(?nat, observed = %main, "NAT mapping measured");
        self.overlay.nat = nat;
        if let Some(node) = &self.overlay.node {
            node.command(NodeCommand::Nat(nat));
        }
        Some(self.overlay.hello(self.config, false))
    }

    /// A whole netmap: cached and handed to the datapath.
    pub(super) fn netmap(&mut self, map: Netmap) {
        info!(
            version = map.version,
            networks = map.networks.len(),
            peers = map.peers.len(),
            "netmap received"
        );
        self.overlay.cache.replace(map);
        self.overlay.push_netmap();
        self.overlay.apply_wireguard(self.config.wireguard_gateway);
    }

    /// (v9) The controller's WireGuard map: checked against its bounds, then applied.
    pub(super) fn wireguard_map(&mut self, map: shoal_proto::WireGuardMap) {
        if let Err(e) = shoal_proto::limits::check_wireguard_map(&map) {
            warn!(cause = %e, "WireGuard map refused; the previous one stays");
            return;
        }
        info!(networks = map.networks.len(), "WireGuard map received");
        self.overlay.wireguard.set_map(map);
        self.overlay.apply_wireguard(self.config.wireguard_gateway);
    }

    /// Netmap changes: applied to the cache, or a full netmap asked for when they do not follow on.
    pub(super) fn netmap_delta(&mut self, delta: NetmapDelta) -> Option<AgentMsg> {
        match self.overlay.cache.apply(&delta) {
            DeltaOutcome::Applied => {
                debug!(
                    version = delta.to_version,
                    changes = delta.changes.len(),
                    "netmap updated"
                );
                self.overlay.push_netmap();
                self.overlay.apply_wireguard(self.config.wireguard_gateway);
                None
            }
            DeltaOutcome::Gap(gap) => {
                warn!(%gap, "netmap out of step; asking for a full one");
                Some(self.overlay.hello(self.config, true))
            }
        }
    }

    /// A peer wants to reach this node: the datapath punches towards it.
    pub(super) fn punch(&self, punch: Punch) {
        if let Some(node) = &self.overlay.node {
            node.command(NodeCommand::Punch(punch));
        }
    }

    /// The datapath wants a peer to punch towards this node: ask through the controller.
    pub(super) fn node_event(&mut self, event: NodeEvent, ready: bool) -> Option<AgentMsg> {
        match event {
            NodeEvent::RequestPunch(peer) => ready.then_some(AgentMsg::Punch(Punch {
                peer,
                endpoints: vec![],
            })),
            NodeEvent::Observed { peer, addr } => {
                let local = ov::local_endpoints(
                    self.overlay.endpoint.port,
                    &self.config.overlay.tap_prefix,
                );
                let new = self
                    .overlay
                    .peer_observed
                    .learn(addr, self.overlay.observed, &local);
                if !new {
                    return None;
                }
                info!(peer = %peer, %addr, "a peer sees this node at an address the controller does not; told to the fleet");
                // Without an overlay session it goes with the next hello.
                (ready && self.protocol >= shoal_proto::OVERLAY_PROTOCOL)
                    .then(|| self.overlay.hello(self.config, false))
            }
        }
    }

    /// Sends the datapath's path report, if it runs.
    pub(super) async fn send_paths(
        &mut self,
        send: &mut quinn::SendStream,
    ) -> Result<(), AttemptError> {
        let report = match &self.overlay.node {
            Some(node) => node.report().await,
            None => None,
        };
        if let Some(report) = report {
            // Relay reasons go only to a controller that can decode them.
            let msg = if self.protocol >= shoal_proto::RELAY_REASONS_PROTOCOL {
                AgentMsg::PathsV8(report)
            } else {
                AgentMsg::Paths(report.report)
            };
            send_msg(send, &msg).await?;
        }
        // (v9) With it, how the datapath moves frames, for `shoalctl overlay counters`.
        if self.protocol >= shoal_proto::DATAPATH_PROTOCOL {
            if let Some(report) = match &self.overlay.node {
                Some(node) => node.datapath().await,
                None => None,
            } {
                send_msg(send, &AgentMsg::Datapath(report)).await?;
            }
        }
        Ok(())
    }
}
