//! What the admin API returns: JSON views of the registry, shared by the server and `shoalctl`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_proto::{BootReport, HealthReport, Inventory};

/// RFC 3339 UTC text for a Unix time in milliseconds. Agents send times too (SMART reads, reports):
/// one past year 9999, which RFC 3339 cannot write, is shown as milliseconds instead of failing the
/// whole view.
pub fn rfc3339(ms: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    match std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms)) {
        Some(t) if write!(out, "{}", humantime::format_rfc3339_seconds(t)).is_ok() => out,
        _ => format!("{ms} ms after the Unix epoch"),
    }
}

/// A node as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Hostname.
    pub hostname: String,
    /// `up` or `down`.
    pub status: String,
    /// Whether a control connection is open right now.
    pub connected: bool,
    /// Agent software version.
    pub agent_version: String,
    /// Last heartbeat (RFC 3339).
    pub last_seen: Option<String>,
    /// Last heartbeat (Unix ms).
    pub last_seen_unix_ms: Option<u64>,
    /// When the node first enrolled (RFC 3339).
    pub enrolled_at: String,
    /// The hardware identity that keeps the record across re-enrolments.
    pub hardware_id: String,
    /// Labels from the join token.
    pub labels: BTreeMap<String, String>,
    /// Last reported inventory.
    pub inventory: Option<Inventory>,
    /// Last reported health.
    pub health: Option<HealthReport>,
    /// The node's overlay addresses, one per network it is a member of.
    #[serde(default)]
    pub overlay: Vec<OverlayAddressView>,
    /// The connected agent's boot report (protocol 4): boot id, netboot image, health checks.
    #[serde(default)]
    pub boot: Option<BootReport>,
    /// Fingerprint of the key the node is bound to (first 8 bytes of its SPKI SHA-256, hex).
    #[serde(default)]
    pub key: Option<String>,
}

/// A node's address on one overlay network.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OverlayAddressView {
    /// Network name.
    pub network: String,
    /// Network id (as carried in overlay datagrams).
    pub network_id: u32,
    /// The node's MAC there.
    pub mac: String,
    /// The node's IPv4 address there.
    pub address: String,
    /// The subnet's prefix length.
    pub prefix_len: u8,
}

/// An overlay network as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkView {
    /// Network id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Subnet, CIDR.
    pub subnet: String,
    /// TAP MTU.
    pub mtu: u16,
    /// Label selectors (`KEY=VALUE`); nodes matching any are members.
    pub selectors: Vec<String>,
    /// Number of members.
    pub members: usize,
    /// Creation time (RFC 3339).
    pub created_at: String,
}

/// A member of an overlay network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// Node id.
    pub node: String,
    /// Hostname (empty if the node is gone).
    pub hostname: String,
    /// MAC on the network.
    pub mac: String,
    /// IPv4 address on the network.
    pub address: String,
    /// Added by an operator.
    pub explicit: bool,
    /// A selector matches its labels.
    pub via_selector: bool,
}

/// One network with its members (`GET /v1/networks/{name}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDetail {
    /// The network.
    pub network: NetworkView,
    /// Its members, by address.
    pub members: Vec<MemberView>,
}

/// Request body of `POST /v1/networks`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CreateNetwork {
    /// Name, `[a-z0-9][a-z0-9-]{0,30}`.
    pub name: String,
    /// Subnet, CIDR (`10.91.0.0/24`).
    pub subnet: String,
    /// TAP MTU; none means the default network's.
    pub mtu: Option<u16>,
}

/// Who to add or remove (`/v1/networks/{name}/members`): exactly one of the two.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MemberSpec {
    /// A node id.
    pub node: Option<String>,
    /// A label selector, `KEY=VALUE`.
    pub selector: Option<String>,
}

/// What a network change did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkUpdate {
    /// The network after the change.
    pub network: NetworkView,
    /// Members that joined.
    pub joined: Vec<MemberView>,
    /// Node ids that left.
    pub left: Vec<String>,
}

/// A join token as listed (never the secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenView {
    /// Token id.
    pub id: String,
    /// `valid`, `expired`, `used_up` or `revoked`.
    pub state: String,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Expiry (RFC 3339), if any.
    pub expires_at: Option<String>,
    /// Uses so far.
    pub uses: u32,
    /// Use limit, if any.
    pub max_uses: Option<u32>,
    /// Labels given to nodes that enrol with it.
    pub labels: BTreeMap<String, String>,
}

/// Request body of `POST /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CreateToken {
    /// Time to live in seconds; none means no expiry.
    pub ttl_secs: Option<u64>,
    /// Use limit; none means unlimited.
    pub max_uses: Option<u32>,
    /// Labels for nodes that enrol with it.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Response of `POST /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreatedToken {
    /// The join token to paste into agents.
    pub token: String,
    /// Its listing.
    pub info: TokenView,
}

/// An event as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    /// Sequence number, increasing.
    pub seq: u64,
    /// When (RFC 3339).
    pub at: String,
    /// What kind (`enrolled`, `up`, `down`, `removed`, ...).
    pub kind: String,
    /// The node concerned.
    pub node: Option<String>,
    /// Human-readable detail.
    pub message: String,
}

/// An API error body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}

/// One direction of an overlay path, as the sending agent last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathView {
    /// The reporting node.
    pub from: String,
    /// The peer.
    pub to: String,
    /// `direct` or `relay`.
    pub kind: String,
    /// The peer's UDP address (direct paths).
    pub remote: Option<String>,
    /// Smoothed round-trip time of the path, milliseconds.
    pub rtt_ms: f64,
    /// Bytes of overlay frames `from` sent to `to`.
    pub tx_bytes: u64,
    /// Bytes of overlay frames `from` received from `to`.
    pub rx_bytes: u64,
    /// When `from` reported it (RFC 3339).
    pub reported_at: String,
}

/// One node's datapath counters, as last reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverlayCountersView {
    /// The node.
    pub node: String,
    /// Frames sent to one peer.
    pub forwarded: u64,
    /// Frames sent to several peers (broadcast, multicast, unknown unicast).
    pub flooded: u64,
    /// Frames received from peers and written to a TAP device.
    pub delivered: u64,
    /// Frames dropped, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// When it was reported (RFC 3339).
    pub reported_at: String,
}

/// One drive as `GET /v1/drives` (and `shoalctl drives list -o json`) lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriveView {
    /// Node id.
    pub node: String,
    /// Kernel name (`sdb`, `nvme1n1`, `loop3`).
    pub device: String,
    /// Serial number, if the drive has one.
    pub serial: Option<String>,
    /// Model, if known.
    pub model: Option<String>,
    /// Size in bytes.
    pub size_bytes: u64,
    /// `blank`, `awaiting-approval`, `has-data`, `preparing`, `prepared`, `missing`,
    /// `prepare-failed` or `unreadable`.
    pub state: String,
    /// What goes with the state: `signatures` (has-data); `partition`, `filesystem`, `fs_uuid`,
    /// `label`, `mount_point` (prepared, missing); `reason` (prepare-failed, unreadable); null for
    /// the others.
    pub state_detail: Option<StateDetail>,
    /// SMART: verdict, latest read, self-test.
    pub smart: SmartView,
    /// When the controller received the node's latest drive report (RFC 3339).
    pub updated_at: String,
}

/// The detail of a drive's state; only the fields that apply to the state are present.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StateDetail {
    /// has-data: what was found (`gpt`, `ext4`, `LVM2 physical volume`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signatures: Option<Vec<String>>,
    /// prepared, missing: the partition (`sdb1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// prepared, missing: `ext4` or `xfs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    /// prepared, missing: the filesystem UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_uuid: Option<String>,
    /// prepared, missing: the filesystem label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// prepared, missing: where it is (was) mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<String>,
    /// prepare-failed, unreadable: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A drive's SMART as the controller judges it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SmartView {
    /// `ok`, `warning`, `failing`, or `unknown` (no SMART, or never read successfully). When the
    /// latest read failed, the verdict of the last good read.
    pub verdict: String,
    /// Why the verdict is not `ok`, one sentence each.
    pub reasons: Vec<String>,
    /// The latest read: `report` (smartctl read the drive), `no-smart` (the device has none:
    /// virtio, loop...), `failed` (smartctl missing, timed out, unparsable), `pending` (not read
    /// yet).
    pub status: String,
    /// Why, for `no-smart` and `failed`.
    pub reason: Option<String>,
    /// `ata`, `nvme` or `scsi` (status `report`).
    pub protocol: Option<String>,
    /// Current temperature, °C.
    pub temperature_celsius: Option<i32>,
    /// Power-on hours.
    pub power_on_hours: Option<u64>,
    /// The drive's overall-health self-assessment.
    pub health_passed: Option<bool>,
    /// The raw failure predictors: ATA `reallocated_sectors`, `reported_uncorrectable`,
    /// `command_timeouts`, `pending_sectors`, `offline_uncorrectable`; NVMe `critical_warning`,
    /// `media_errors`, `percentage_used`, `available_spare`, `available_spare_threshold`; SCSI
    /// `grown_defects`, `read_uncorrected`, `write_uncorrected`.
    pub predictors: Option<serde_json::Value>,
    /// The running self-test, or the newest one in the drive's log.
    pub self_test: Option<SelfTestView>,
    /// When SMART was read (RFC 3339, the agent's clock).
    pub at: Option<String>,
}

/// A drive's self-test state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SelfTestView {
    /// `running`, `passed` or `failed`.
    pub state: String,
    /// `short` or `long`, when the drive says.
    pub kind: Option<String>,
    /// running: percent left, when the drive says.
    pub remaining_percent: Option<u8>,
    /// passed, failed: the drive's words for the result.
    pub result: Option<String>,
    /// passed, failed: power-on hours when it ended.
    pub power_on_hours: Option<u64>,
}

/// Request body of `POST /v1/drive-policies`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SetDrivePolicy {
    /// A node id (exactly one of `node` and `selector`).
    #[serde(default)]
    pub node: Option<String>,
    /// A label selector, `KEY=VALUE`.
    #[serde(default)]
    pub selector: Option<String>,
    /// `report`, `approve` or `prepare`.
    pub mode: String,
    /// `ext4` or `xfs`; ext4 when absent.
    #[serde(default)]
    pub filesystem: Option<String>,
}

/// A stored drive policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrivePolicyView {
    /// The node it is for, or null for a selector policy.
    pub node: Option<String>,
    /// The label selector it is for (`KEY=VALUE`), or null for a node policy.
    pub selector: Option<String>,
    /// `report`, `approve` or `prepare`.
    pub mode: String,
    /// `ext4` or `xfs`.
    pub filesystem: String,
    /// When it was set (RFC 3339).
    pub set_at: String,
}

/// The policy that applies to one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectivePolicyView {
    /// Node id.
    pub node: String,
    /// Hostname.
    pub hostname: String,
    /// `report`, `approve` or `prepare`.
    pub mode: String,
    /// `ext4` or `xfs`.
    pub filesystem: String,
    /// Where it comes from: `node`, `selector KEY=VALUE`, or `default`.
    pub source: String,
}

/// `GET /v1/drive-policies`: the stored policies and what applies to each node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrivePolicies {
    /// Stored policies, node policies first.
    pub policies: Vec<DrivePolicyView>,
    /// Every node's effective policy.
    pub effective: Vec<EffectivePolicyView>,
}

/// Request body of `POST /v1/drives/{node}/{device}/self-test`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfTestRequest {
    /// `short` or `long`.
    pub kind: String,
}

/// What a drive command did (`POST /v1/drives/{node}/{device}/prepare` and `.../self-test`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveCommandView {
    /// Node id.
    pub node: String,
    /// Kernel name of the drive.
    pub device: String,
    /// `prepare` or `self-test`.
    pub action: String,
    /// The command's id (in the agent's log too).
    pub id: u64,
    /// What the agent says it did.
    pub message: String,
}

/// A claim of an existing node waiting for an operator (`shoalctl nodes pending`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingView {
    /// Request id, for `nodes approve|deny`.
    pub id: String,
    /// The node claimed.
    pub node: String,
    /// The claimed node's hostname, as stored.
    pub node_hostname: String,
    /// The hostname the claiming machine reported.
    pub hostname: String,
    /// The hardware id it reported.
    pub hardware_id: String,
    /// Fingerprint of the key it would bind (first 8 bytes of the SPKI SHA-256, hex).
    pub key: String,
    /// The token it presented.
    pub token: String,
    /// Where it connected from.
    pub remote: String,
    /// First attempt (RFC 3339).
    pub first_seen: String,
    /// Latest attempt (RFC 3339).
    pub last_seen: String,
    /// Attempts so far.
    pub attempts: u32,
    /// `waiting`, `approved` or `denied`.
    pub state: String,
}

/// One certificate issued to a node (`shoalctl certs list NODE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertView {
    /// Serial, hex.
    pub serial: String,
    /// When it was issued (RFC 3339).
    pub issued_at: String,
    /// When it expires (RFC 3339).
    pub not_after: String,
    /// Fingerprint of its key.
    pub key: String,
    /// Whether its key is the one the node is bound to now.
    pub current_key: bool,
    /// When it was revoked (RFC 3339), if it was.
    pub revoked_at: Option<String>,
    /// Why, if it was.
    pub revoked_reason: Option<String>,
}

/// `POST /v1/nodes/{id}/reenrol`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReenrolRequest {
    /// How long the re-enrolment stays armed, seconds (default 1 hour).
    pub ttl_secs: Option<u64>,
}

/// `POST /v1/certificates/{serial}/revoke`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RevokeCertRequest {
    /// The operator's reason, kept with the revocation.
    pub reason: Option<String>,
}

/// What `POST /v1/certificates/{serial}/revoke` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCertView {
    /// The certificate.
    pub serial: String,
    /// Its node.
    pub node: String,
    /// It held the node's current key: the node was asked to rotate (or must, on its next session).
    pub rotation_required: bool,
    /// Connections that used it and were closed.
    pub closed_connections: usize,
}

/// `GET /v1/refusals`: what the controller's bounds refused since it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalsView {
    /// Connection limits.
    pub connections: crate::server::ConnCounters,
    /// What nodes sent the overlay hub beyond its bounds.
    pub overlay: crate::overlay_hub::HubCounters,
}
