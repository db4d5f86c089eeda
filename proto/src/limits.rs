//! The bounds on everything an agent sends, in one place, and the check the controller runs on each
//! [`AgentMsg`] before acting on it.
//!
//! A frame is already bounded by [`crate::MAX_FRAME_LEN`] (1 MiB) before it is decoded; these
//! bounds are about what the controller then keeps, shows and works on. Every list and every string
//! an agent sends has one, and every message kind has an encoded-size bound ([`max_encoded_len`]),
//! which also bounds the product of nested lists (4096 interfaces with 1024 addresses each would
//! pass the count bounds, not the size bound).
//!
//! The numbers leave real machines far inside: a 256-core server with 60 drives sends an inventory
//! of about 4 KiB and a drive report (SMART included) of about 15 KiB; a Kubernetes node with 500
//! veth interfaces an inventory of about 34 KiB (see the test
//! `large_real_machines_are_well_inside`). An agent over a bound is not a machine we failed to
//! imagine but one that is broken or hostile: its message is refused whole, with the field and the
//! limit named, and nothing of it is stored, so what the controller knew about the node before
//! stays as it was.
//!
//! | what | bound |
//! |---|---|
//! | names: versions, interface/disk/partition names, models, serials, firmware, fs types, addresses, check names, labels | [`MAX_NAME_LEN`] bytes |
//! | hostnames (`Enrol`, `Inventory`) | [`MAX_HOSTNAME_LEN`] bytes |
//! | node ids named by the agent (`Punch`, `Paths`) | [`MAX_NODE_ID_LEN`] bytes |
//! | the hardware id value (`Hello`) | [`MAX_HARDWARE_ID_LEN`] bytes |
//! | paths: mount points, devices, SMART device paths | [`MAX_PATH_LEN`] bytes |
//! | free text: reasons, details, command results, step outputs | [`MAX_TEXT_LEN`] bytes |
//! | the join token | [`MAX_TOKEN_LEN`] bytes |
//! | certificate signing requests | [`MAX_CSR_LEN`] bytes |
//! | key-rotation signatures | [`MAX_SIGNATURE_LEN`] bytes |
//! | inventory disks, interfaces | [`MAX_DISKS`], [`MAX_NICS`] |
//! | addresses of one interface | [`MAX_NIC_ADDRESSES`] |
//! | filesystems in a health report | [`MAX_FILESYSTEMS`] |
//! | overlay endpoints (`Overlay`, `Punch`) | [`MAX_OVERLAY_ENDPOINTS`] |
//! | peer paths in a path report | [`MAX_PATHS`] |
//! | drop reasons in a path report | [`MAX_DROP_REASONS`] |
//! | drives in a drive report | [`MAX_DRIVES`], each kernel name once |
//! | signatures found on one drive | [`MAX_DRIVE_SIGNATURES`] |
//! | health checks in an update or boot report | [`MAX_CHECKS`] |
//! | backup results: targets, snapshots, paths, sampled files, error lines | [`MAX_JOB_TARGETS`], [`MAX_REPORTED_SNAPSHOTS`], [`MAX_BACKUP_PATHS`], [`MAX_SAMPLE_FILES`], [`MAX_BACKUP_ERRORS`] |
//! | (v9) TAP devices in a datapath report, offload names per device | [`MAX_DATAPATH_TAPS`], [`MAX_TAP_OFFLOADS`] |
//! | the whole message, per kind | [`max_encoded_len`] |
//!
//! One bound goes the other way: the agent keeps the controller set a controller announces (v7) in
//! its state dir and dials every entry, so it checks [`check_controller_set`] ([`MAX_CONTROLLERS`]
//! entries, ids of [`MAX_CONTROLLER_ID_LEN`] bytes) before it keeps one. Likewise a WireGuard map
//! (v9) passes [`check_wireguard_map`] before the agent applies it.
//!
//! Agent-supplied text may hold anything valid UTF-8 does, terminal control characters included:
//! the controller stores it as sent, and `shoalctl` is the one that prints it safely.

use crate::{
    AgentMsg, BackupResult, BootReport, CheckResult, ControllerSet, Drive, DriveReport, DriveState,
    HealthReport, Inventory, MaintenanceResult, PathReport, PreparedDrive, SelfTestStatus,
    SmartOutcome, StepOutcome, UpdateFailure, UpdateReport, MAX_BACKUP_ERRORS, MAX_BACKUP_PATHS,
    MAX_FRAME_LEN, MAX_JOB_TARGETS, MAX_REPORTED_SNAPSHOTS, MAX_SAMPLE_FILES,
};

/// Short names and identifiers: versions, interface, disk and partition names, models, serial
/// numbers, firmware, filesystem types and UUIDs, addresses in CIDR form, health check names. Real
/// ones are under 64 bytes (IFNAMSIZ is 16, ATA models 40, serials 20).
pub const MAX_NAME_LEN: usize = 256;
/// A hostname: 255 bytes, the DNS limit for a name (Linux allows 64).
pub const MAX_HOSTNAME_LEN: usize = 255;
/// A node id the agent names (a peer in `Punch` and `Paths`); the controller's are 11 bytes.
pub const MAX_NODE_ID_LEN: usize = 64;
/// The value of a hardware id: a UUID, a machine id, a MAC, or the operator's `--machine-id`.
pub const MAX_HARDWARE_ID_LEN: usize = 256;
/// A path: mount points, device paths, NFS sources. Linux's PATH_MAX.
pub const MAX_PATH_LEN: usize = 4096;
/// Operator-facing free text: reasons, details, drive command results, maintenance step outputs
/// (the agent sends at most [`crate::MAX_STEP_OUTPUT`] bytes of output there, plus its own words).
pub const MAX_TEXT_LEN: usize = 8192;
/// A join token (`shoal1.<id>.<secret>.<ca>` is 121 bytes), with room for stray whitespace.
pub const MAX_TOKEN_LEN: usize = 256;
/// A certificate signing request (DER): a P-256 one is about 300 bytes, an RSA-4096 one 1.2 KiB.
pub const MAX_CSR_LEN: usize = 16 * 1024;
/// A key-rotation signature: ECDSA P-256 in ASN.1 DER is at most 72 bytes.
pub const MAX_SIGNATURE_LEN: usize = 1024;
/// Block devices in an inventory (a host with multipath SAN LUNs sees one per path).
pub const MAX_DISKS: usize = 4096;
/// Network interfaces in an inventory (a Kubernetes node has one veth per pod, a few hundred).
pub const MAX_NICS: usize = 4096;
/// Addresses of one interface.
pub const MAX_NIC_ADDRESSES: usize = 1024;
/// Filesystems in a health report (one per storage device or network export).
pub const MAX_FILESYSTEMS: usize = 4096;
/// Overlay endpoints an agent announces (its up IPv4 interface addresses); peers try each, so this
/// stays small.
pub const MAX_OVERLAY_ENDPOINTS: usize = 64;
/// Peer paths in one path report: one per peer, so this bounds the fleet an agent can report on.
pub const MAX_PATHS: usize = 16_384;
/// Distinct drop reasons in a path report's counters (the agent has about ten).
pub const MAX_DROP_REASONS: usize = 64;
/// Drives in one drive report (a 60-bay storage server sends 60; the controller keeps a SMART
/// history per drive).
pub const MAX_DRIVES: usize = 1024;
/// Signatures found on one drive (`gpt`, `ext4`, ...).
pub const MAX_DRIVE_SIGNATURES: usize = 64;
/// Health checks in one update or boot report.
pub const MAX_CHECKS: usize = 256;
/// (v7) Controllers in an announced controller set: a fleet runs three or five.
pub const MAX_CONTROLLERS: usize = 16;
/// (v7) A controller's id in an announced controller set.
pub const MAX_CONTROLLER_ID_LEN: usize = 64;
/// (v9) TAP devices in a datapath report: one per overlay network the node is in.
pub const MAX_DATAPATH_TAPS: usize = 256;
/// (v9) Offload names of one TAP device (there are five: csum, tso4, tso6, uso4, uso6).
pub const MAX_TAP_OFFLOADS: usize = 16;

/// The largest encoding (postcard, without the frame header) accepted for a message of this kind.
///
/// Reports that the controller keeps per node (inventory, health, drives) get 512 KiB; a path
/// report, whose length grows with the fleet, the whole frame; requests and answers a few KiB to 64
/// KiB.
pub fn max_encoded_len(msg: &AgentMsg) -> usize {
    const KIB: usize = 1024;
    match msg {
        AgentMsg::Hello(_) => 4 * KIB,
        AgentMsg::Enrol(_) | AgentMsg::Renew(_) | AgentMsg::RotateKey(_) => 32 * KIB,
        AgentMsg::Inventory(_) | AgentMsg::Health(_) | AgentMsg::Drives(_) => 512 * KIB,
        AgentMsg::Overlay(_) | AgentMsg::Punch(_) => 4 * KIB,
        AgentMsg::Paths(_) | AgentMsg::PathsV8(_) => MAX_FRAME_LEN,
        AgentMsg::UpdateAck { .. } => KIB,
        AgentMsg::DriveCommandResult(_)
        | AgentMsg::RebootAck { .. }
        | AgentMsg::RebootRefused { .. }
        | AgentMsg::MaintenanceResult(_) => 16 * KIB,
        AgentMsg::UpdateReport(_) | AgentMsg::BootReport(_) => 64 * KIB,
        AgentMsg::BackupProgress(_) => 4 * KIB,
        AgentMsg::BackupResult(_) => 512 * KIB,
        AgentMsg::WireGuardGateway(_) => KIB,
        AgentMsg::Datapath(_) => 64 * KIB,
    }
}

/// The name of a message's kind, as field paths in [`LimitError`] start with it.
pub fn kind_name(msg: &AgentMsg) -> &'static str {
    match msg {
        AgentMsg::Hello(_) => "hello",
        AgentMsg::Enrol(_) => "enrol",
        AgentMsg::Renew(_) => "renew",
        AgentMsg::Inventory(_) => "inventory",
        AgentMsg::Health(_) => "health",
        AgentMsg::Overlay(_) => "overlay",
        AgentMsg::Paths(_) => "paths",
        AgentMsg::Punch(_) => "punch",
        AgentMsg::Drives(_) => "drives",
        AgentMsg::DriveCommandResult(_) => "drive_command_result",
        AgentMsg::UpdateAck { .. } => "update_ack",
        AgentMsg::UpdateReport(_) => "update_report",
        AgentMsg::RebootAck { .. } => "reboot_ack",
        AgentMsg::RebootRefused { .. } => "reboot_refused",
        AgentMsg::MaintenanceResult(_) => "maintenance_result",
        AgentMsg::BootReport(_) => "boot_report",
        AgentMsg::RotateKey(_) => "rotate_key",
        AgentMsg::BackupProgress(_) => "backup_progress",
        AgentMsg::BackupResult(_) => "backup_result",
        AgentMsg::PathsV8(_) => "paths_v8",
        AgentMsg::WireGuardGateway(_) => "wireguard_gateway",
        AgentMsg::Datapath(_) => "datapath",
    }
}

/// What a bound counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A string's or a byte string's length in bytes, or a message's encoded length.
    Bytes,
    /// A list's number of entries.
    Items,
    /// How often a key occurs in a list whose entries the controller tells apart by it (a drive's
    /// kernel name in a drive report): once.
    Occurrences,
}

impl Unit {
    fn phrase(self, actual: usize) -> String {
        match self {
            Unit::Bytes => format!("is {actual} bytes"),
            Unit::Items => format!("has {actual} entries"),
            Unit::Occurrences => format!("occurs {actual} times"),
        }
    }
}

/// A message over one of the bounds: which field, how big it is, and the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {}, over the limit of {limit}", .unit.phrase(*.actual))]
pub struct LimitError {
    /// The field, as a path from the message kind: `inventory.nics[3].addresses`, or the kind alone
    /// (`inventory`) for the encoded-size bound.
    pub field: String,
    /// Its size.
    pub actual: usize,
    /// The bound.
    pub limit: usize,
    /// What both count.
    pub unit: Unit,
}

type Checked = Result<(), LimitError>;

fn bytes(actual: usize, limit: usize, field: impl FnOnce() -> String) -> Checked {
    if actual > limit {
        return Err(LimitError {
            field: field(),
            actual,
            limit,
            unit: Unit::Bytes,
        });
    }
    Ok(())
}

fn text(value: &str, limit: usize, field: impl FnOnce() -> String) -> Checked {
    bytes(value.len(), limit, field)
}

fn opt_text(value: &Option<String>, limit: usize, field: impl FnOnce() -> String) -> Checked {
    value.as_deref().map_or(Ok(()), |v| text(v, limit, field))
}

fn items(actual: usize, limit: usize, field: impl FnOnce() -> String) -> Checked {
    if actual > limit {
        return Err(LimitError {
            field: field(),
            actual,
            limit,
            unit: Unit::Items,
        });
    }
    Ok(())
}

/// Checks one message against every bound: its encoded size first, then each list and string. The
/// first violation found is returned.
pub fn check(msg: &AgentMsg) -> Checked {
    let kind = kind_name(msg);
    // The serializer cannot fail on these types (no maps with non-string keys, no unsized
    // sequences); should it, the message counts as over its bound.
    let len = postcard::experimental::serialized_size(msg).unwrap_or(usize::MAX);
    bytes(len, max_encoded_len(msg), || kind.to_owned())?;
    let f = |name: &str| format!("{kind}.{name}");
    match msg {
        AgentMsg::Hello(h) => {
            text(&h.agent_version, MAX_NAME_LEN, || f("agent_version"))?;
            text(&h.hardware_id.value, MAX_HARDWARE_ID_LEN, || {
                f("hardware_id")
            })
        }
        AgentMsg::Enrol(e) => {
            text(&e.token, MAX_TOKEN_LEN, || f("token"))?;
            bytes(e.csr_der.len(), MAX_CSR_LEN, || f("csr_der"))?;
            text(&e.hostname, MAX_HOSTNAME_LEN, || f("hostname"))
        }
        AgentMsg::Renew(r) => bytes(r.csr_der.len(), MAX_CSR_LEN, || f("csr_der")),
        AgentMsg::RotateKey(r) => {
            bytes(r.csr_der.len(), MAX_CSR_LEN, || f("csr_der"))?;
            bytes(r.signature.len(), MAX_SIGNATURE_LEN, || f("signature"))
        }
        AgentMsg::Inventory(inv) => inventory(inv),
        AgentMsg::Health(h) => health(h),
        AgentMsg::Overlay(o) => items(o.local_endpoints.len(), MAX_OVERLAY_ENDPOINTS, || {
            f("local_endpoints")
        }),
        AgentMsg::Paths(p) => paths(p),
        AgentMsg::PathsV8(p) => {
            paths(&p.report)?;
            // One reason per path at most.
            items(p.relayed.len(), p.report.paths.len(), || f("relayed"))?;
            for (i, r) in p.relayed.iter().enumerate() {
                text(&r.peer.0, MAX_NODE_ID_LEN, || {
                    format!("{kind}.relayed[{i}].peer")
                })?;
            }
            Ok(())
        }
        AgentMsg::Punch(p) => {
            text(&p.peer.0, MAX_NODE_ID_LEN, || f("peer"))?;
            items(p.endpoints.len(), MAX_OVERLAY_ENDPOINTS, || f("endpoints"))
        }
        AgentMsg::Drives(d) => drives(d),
        AgentMsg::DriveCommandResult(r) => match &r.result {
            Ok(t) | Err(t) => text(t, MAX_TEXT_LEN, || f("result")),
        },
        AgentMsg::UpdateAck { version } => text(version, MAX_NAME_LEN, || f("version")),
        AgentMsg::UpdateReport(r) => update_report(r),
        AgentMsg::RebootAck { method } => text(method, MAX_TEXT_LEN, || f("method")),
        AgentMsg::RebootRefused { reason } => text(reason, MAX_TEXT_LEN, || f("reason")),
        AgentMsg::MaintenanceResult(r) => maintenance_result(r),
        AgentMsg::BootReport(r) => boot_report(r),
        AgentMsg::BackupProgress(p) => {
            text(&p.task, MAX_NAME_LEN, || f("task"))?;
            text(&p.target, MAX_NAME_LEN, || f("target"))?;
            text(&p.phase, MAX_NAME_LEN, || f("phase"))
        }
        AgentMsg::BackupResult(r) => backup_result(r),
        // A socket address: the size bound is all there is.
        AgentMsg::WireGuardGateway(_) => Ok(()),
        AgentMsg::Datapath(d) => datapath(d),
    }
}

/// (v9) Networks in a WireGuard map (one per network the agent is a member of).
pub const MAX_WIREGUARD_NETWORKS: usize = 256;
/// (v9) WireGuard devices per network (a gateway's `GatewayConfig::max_devices` default).
pub const MAX_WIREGUARD_DEVICES: usize = 4096;
/// (v9) Gateway members per network.
pub const MAX_WIREGUARD_GATEWAYS: usize = 64;

/// (v9) Checks a WireGuard map an agent was told against [`MAX_WIREGUARD_NETWORKS`],
/// [`MAX_WIREGUARD_DEVICES`], [`MAX_WIREGUARD_GATEWAYS`] and [`MAX_NODE_ID_LEN`], before the agent
/// applies it (a map over a bound is refused whole; the previous one stays).
pub fn check_wireguard_map(map: &crate::WireGuardMap) -> Checked {
    items(map.networks.len(), MAX_WIREGUARD_NETWORKS, || {
        "wireguard.networks".into()
    })?;
    for (i, n) in map.networks.iter().enumerate() {
        items(n.devices.len(), MAX_WIREGUARD_DEVICES, || {
            format!("wireguard.networks[{i}].devices")
        })?;
        items(n.gateways.len(), MAX_WIREGUARD_GATEWAYS, || {
            format!("wireguard.networks[{i}].gateways")
        })?;
        for (j, g) in n.gateways.iter().enumerate() {
            text(&g.0, MAX_NODE_ID_LEN, || {
                format!("wireguard.networks[{i}].gateways[{j}]")
            })?;
        }
    }
    Ok(())
}

fn datapath(d: &crate::DatapathReport) -> Checked {
    items(d.taps.len(), MAX_DATAPATH_TAPS, || "datapath.taps".into())?;
    for (i, t) in d.taps.iter().enumerate() {
        let f = |name: &str| format!("datapath.taps[{i}].{name}");
        text(&t.device, MAX_NAME_LEN, || f("device"))?;
        items(t.offloads.len(), MAX_TAP_OFFLOADS, || f("offloads"))?;
        for (j, o) in t.offloads.iter().enumerate() {
            text(o, MAX_NAME_LEN, || f(&format!("offloads[{j}]")))?;
        }
        opt_text(&t.fallback, MAX_TEXT_LEN, || f("fallback"))?;
    }
    Ok(())
}

/// (v7) Checks a controller set an agent was told against [`MAX_CONTROLLERS`] and
/// [`MAX_CONTROLLER_ID_LEN`], before the agent keeps it.
pub fn check_controller_set(set: &ControllerSet) -> Checked {
    items(set.controllers.len(), MAX_CONTROLLERS, || {
        "controller_set.controllers".into()
    })?;
    for (i, c) in set.controllers.iter().enumerate() {
        text(&c.id, MAX_CONTROLLER_ID_LEN, || {
            format!("controller_set.controllers[{i}].id")
        })?;
    }
    Ok(())
}

fn backup_result(r: &BackupResult) -> Checked {
    let f = |name: &str| format!("backup_result.{name}");
    text(&r.task, MAX_NAME_LEN, || f("task"))?;
    text(&r.job, MAX_NAME_LEN, || f("job"))?;
    text(&r.kind, MAX_NAME_LEN, || f("kind"))?;
    opt_text(&r.error, MAX_TEXT_LEN, || f("error"))?;
    items(r.targets.len(), MAX_JOB_TARGETS, || f("targets"))?;
    let lines = |v: &[String], name: &str| -> Checked {
        items(v.len(), MAX_BACKUP_ERRORS, || f(name))?;
        v.iter().try_for_each(|l| text(l, MAX_TEXT_LEN, || f(name)))
    };
    for t in &r.targets {
        text(&t.target, MAX_NAME_LEN, || f("targets.target"))?;
        opt_text(&t.error, MAX_TEXT_LEN, || f("targets.error"))?;
        opt_text(&t.restored, MAX_NAME_LEN, || f("targets.restored"))?;
        items(t.snapshots.len(), MAX_REPORTED_SNAPSHOTS, || {
            f("targets.snapshots")
        })?;
        for s in &t.snapshots {
            text(&s.id, MAX_NAME_LEN, || f("targets.snapshots.id"))?;
            items(s.paths.len(), MAX_BACKUP_PATHS, || {
                f("targets.snapshots.paths")
            })?;
            s.paths
                .iter()
                .try_for_each(|p| text(p, MAX_PATH_LEN, || f("targets.snapshots.paths")))?;
        }
        if let Some(b) = &t.backup {
            text(&b.snapshot, MAX_NAME_LEN, || f("targets.backup.snapshot"))?;
            lines(&b.warnings, "targets.backup.warnings")?;
            lines(&b.forgotten, "targets.backup.forgotten")?;
            items(b.samples.len(), MAX_SAMPLE_FILES, || {
                f("targets.backup.samples")
            })?;
            b.samples.iter().try_for_each(|s| {
                text(&s.path, MAX_PATH_LEN, || f("targets.backup.samples.path"))
            })?;
        }
        if let Some(v) = &t.verify {
            text(&v.snapshot, MAX_NAME_LEN, || f("targets.verify.snapshot"))?;
            lines(&v.mismatches, "targets.verify.mismatches")?;
            lines(&v.check_errors, "targets.verify.check_errors")?;
        }
    }
    Ok(())
}

fn inventory(inv: &Inventory) -> Checked {
    let f = |name: &str| format!("inventory.{name}");
    text(&inv.hostname, MAX_HOSTNAME_LEN, || f("hostname"))?;
    for (name, value) in [
        ("os", &inv.os),
        ("kernel", &inv.kernel),
        ("arch", &inv.arch),
        ("cpu_model", &inv.cpu_model),
    ] {
        text(value, MAX_NAME_LEN, || f(name))?;
    }
    let dmi = &inv.dmi;
    for (name, value) in [
        ("dmi.vendor", &dmi.vendor),
        ("dmi.product", &dmi.product),
        ("dmi.serial", &dmi.serial),
        ("dmi.uuid", &dmi.uuid),
    ] {
        opt_text(value, MAX_NAME_LEN, || f(name))?;
    }
    items(inv.disks.len(), MAX_DISKS, || f("disks"))?;
    for (i, d) in inv.disks.iter().enumerate() {
        text(&d.name, MAX_NAME_LEN, || f(&format!("disks[{i}].name")))?;
        opt_text(&d.model, MAX_NAME_LEN, || f(&format!("disks[{i}].model")))?;
        opt_text(&d.serial, MAX_NAME_LEN, || f(&format!("disks[{i}].serial")))?;
    }
    items(inv.nics.len(), MAX_NICS, || f("nics"))?;
    for (i, n) in inv.nics.iter().enumerate() {
        text(&n.name, MAX_NAME_LEN, || f(&format!("nics[{i}].name")))?;
        opt_text(&n.mac, MAX_NAME_LEN, || f(&format!("nics[{i}].mac")))?;
        items(n.addresses.len(), MAX_NIC_ADDRESSES, || {
            f(&format!("nics[{i}].addresses"))
        })?;
        for (j, a) in n.addresses.iter().enumerate() {
            text(a, MAX_NAME_LEN, || f(&format!("nics[{i}].addresses[{j}]")))?;
        }
    }
    Ok(())
}

fn health(h: &HealthReport) -> Checked {
    let f = |name: String| format!("health.filesystems{name}");
    items(h.filesystems.len(), MAX_FILESYSTEMS, || f(String::new()))?;
    for (i, fs) in h.filesystems.iter().enumerate() {
        text(&fs.mount, MAX_PATH_LEN, || f(format!("[{i}].mount")))?;
        text(&fs.device, MAX_PATH_LEN, || f(format!("[{i}].device")))?;
        text(&fs.fs_type, MAX_NAME_LEN, || f(format!("[{i}].fs_type")))?;
    }
    Ok(())
}

fn paths(p: &PathReport) -> Checked {
    items(p.paths.len(), MAX_PATHS, || "paths.paths".into())?;
    for (i, path) in p.paths.iter().enumerate() {
        text(&path.peer.0, MAX_NODE_ID_LEN, || {
            format!("paths.paths[{i}].peer")
        })?;
    }
    items(p.counters.dropped.len(), MAX_DROP_REASONS, || {
        "paths.counters.dropped".into()
    })?;
    for (i, (reason, _)) in p.counters.dropped.iter().enumerate() {
        text(reason, MAX_NAME_LEN, || {
            format!("paths.counters.dropped[{i}]")
        })?;
    }
    Ok(())
}

fn drives(r: &DriveReport) -> Checked {
    items(r.drives.len(), MAX_DRIVES, || "drives.drives".into())?;
    let mut names = std::collections::BTreeSet::new();
    for (i, d) in r.drives.iter().enumerate() {
        drive(d, &|name: &str| format!("drives.drives[{i}].{name}"))?;
        // The controller tells a node's drives apart by kernel name (commands name the device), as
        // the kernel does: a report naming one twice cannot be compared with the next one.
        if !names.insert(d.name.as_str()) {
            let count = r.drives.iter().filter(|x| x.name == d.name).count();
            return Err(LimitError {
                field: format!("drives.drives[{i}].name"),
                actual: count,
                limit: 1,
                unit: Unit::Occurrences,
            });
        }
    }
    Ok(())
}

fn drive(d: &Drive, f: &dyn Fn(&str) -> String) -> Checked {
    text(&d.name, MAX_NAME_LEN, || f("name"))?;
    opt_text(&d.model, MAX_NAME_LEN, || f("model"))?;
    opt_text(&d.serial, MAX_NAME_LEN, || f("serial"))?;
    match &d.state {
        DriveState::Blank | DriveState::AwaitingApproval | DriveState::Preparing => {}
        DriveState::HasData { signatures } => {
            items(signatures.len(), MAX_DRIVE_SIGNATURES, || {
                f("state.signatures")
            })?;
            for (j, s) in signatures.iter().enumerate() {
                text(s, MAX_NAME_LEN, || f(&format!("state.signatures[{j}]")))?;
            }
        }
        DriveState::Prepared(p) | DriveState::Missing(p) => {
            prepared(p, &|name: &str| f(&format!("state.{name}")))?
        }
        DriveState::PrepareFailed { reason } | DriveState::Unreadable { reason } => {
            text(reason, MAX_TEXT_LEN, || f("state.reason"))?;
        }
    }
    match &d.smart {
        None => Ok(()),
        Some(SmartOutcome::NoSmart { reason } | SmartOutcome::Failed { reason }) => {
            text(reason, MAX_TEXT_LEN, || f("smart.reason"))
        }
        Some(SmartOutcome::Report(r)) => {
            text(&r.device, MAX_PATH_LEN, || f("smart.device"))?;
            opt_text(&r.model, MAX_NAME_LEN, || f("smart.model"))?;
            opt_text(&r.serial, MAX_NAME_LEN, || f("smart.serial"))?;
            opt_text(&r.firmware, MAX_NAME_LEN, || f("smart.firmware"))?;
            match &r.self_test {
                Some(SelfTestStatus::Completed { result, .. }) => {
                    text(result, MAX_TEXT_LEN, || f("smart.self_test.result"))
                }
                Some(SelfTestStatus::Running { .. }) | None => Ok(()),
            }
        }
    }
}

fn prepared(p: &PreparedDrive, f: &dyn Fn(&str) -> String) -> Checked {
    text(&p.partition, MAX_NAME_LEN, || f("partition"))?;
    text(&p.fs_uuid, MAX_NAME_LEN, || f("fs_uuid"))?;
    text(&p.label, MAX_NAME_LEN, || f("label"))?;
    text(&p.mount_point, MAX_PATH_LEN, || f("mount_point"))
}

fn checks(list: &[CheckResult], f: &dyn Fn(&str) -> String) -> Checked {
    items(list.len(), MAX_CHECKS, || f("checks"))?;
    for (i, c) in list.iter().enumerate() {
        text(&c.name, MAX_NAME_LEN, || f(&format!("checks[{i}].name")))?;
        opt_text(&c.detail, MAX_TEXT_LEN, || {
            f(&format!("checks[{i}].detail"))
        })?;
    }
    Ok(())
}

fn update_report(r: &UpdateReport) -> Checked {
    let f = |name: &str| format!("update_report.{name}");
    text(&r.running, MAX_NAME_LEN, || f("running"))?;
    opt_text(&r.attempted, MAX_NAME_LEN, || f("attempted"))?;
    checks(&r.checks, &f)?;
    let Some(failure) = &r.failure else {
        return Ok(());
    };
    let name = |v: &str| text(v, MAX_NAME_LEN, || f("failure"));
    match failure {
        UpdateFailure::Malformed(t) | UpdateFailure::Install(t) => {
            text(t, MAX_TEXT_LEN, || f("failure"))
        }
        UpdateFailure::BadSignature { key_id } => name(key_id),
        UpdateFailure::WrongKey {
            signed_by: a,
            trusted: b,
        }
        | UpdateFailure::WrongTarget {
            release: a,
            agent: b,
        }
        | UpdateFailure::VersionMismatch {
            requested: a,
            manifest: b,
        }
        | UpdateFailure::HashMismatch {
            expected: a,
            actual: b,
        }
        | UpdateFailure::Downgrade {
            running: a,
            offered: b,
        } => name(a).and_then(|()| name(b)),
        UpdateFailure::NoTrustedKey
        | UpdateFailure::Truncated { .. }
        | UpdateFailure::Oversize { .. }
        | UpdateFailure::Unhealthy => Ok(()),
    }
}

fn maintenance_result(r: &MaintenanceResult) -> Checked {
    text(&r.run, MAX_NAME_LEN, || "maintenance_result.run".into())?;
    match &r.outcome {
        StepOutcome::Done(t) | StepOutcome::Failed(t) | StepOutcome::Rebooting(t) => {
            text(t, MAX_TEXT_LEN, || "maintenance_result.outcome".into())
        }
    }
}

fn boot_report(r: &BootReport) -> Checked {
    let f = |name: &str| format!("boot_report.{name}");
    text(&r.boot_id, MAX_NAME_LEN, || f("boot_id"))?;
    opt_text(&r.image, MAX_NAME_LEN, || f("image"))?;
    checks(&r.checks, &f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        BlockDevice, DriveCommandResult, EnrolRequest, FilesystemUsage, HardwareId,
        HardwareIdSource, Hello, NatMapping, NetInterface, NodeId, OverlayCounters, OverlayHello,
        PathInfo, PathKind, Punch, RenewRequest, RotateKeyRequest, SmartExitStatus,
        SmartPredictors, SmartReport, StepKind, UnixMillis, VersionRange,
    };
    use std::net::SocketAddr;

    fn s(n: usize) -> String {
        "a".repeat(n)
    }

    /// Asserts `make(limit)` passes and `make(limit + 1)` is refused naming `field`.
    fn at_and_over(limit: usize, field: &str, make: impl Fn(usize) -> AgentMsg) {
        let at = make(limit);
        assert_eq!(check(&at), Ok(()), "{field} at its limit {limit}");
        let err = check(&make(limit + 1)).expect_err(field);
        assert_eq!(
            (err.field.as_str(), err.actual, err.limit),
            (field, limit + 1, limit),
            "{err}"
        );
        assert!(
            err.to_string().contains(field) && err.to_string().contains(&limit.to_string()),
            "{err}"
        );
    }

    fn hello(version: String, hw: String) -> AgentMsg {
        AgentMsg::Hello(Hello {
            protocol: VersionRange { min: 1, max: 5 },
            agent_version: version,
            hardware_id: HardwareId {
                source: HardwareIdSource::Override,
                value: hw,
            },
        })
    }

    fn inventory_with(f: impl FnOnce(&mut Inventory)) -> AgentMsg {
        let mut inv = Inventory {
            hostname: "h".into(),
            ..Default::default()
        };
        f(&mut inv);
        AgentMsg::Inventory(inv)
    }

    fn drive(name: &str) -> Drive {
        Drive {
            name: name.into(),
            model: Some("ST12000NM0008-2H3101".into()),
            serial: Some("ZHZ0AB12".into()),
            size_bytes: 12 << 40,
            removable: false,
            state: DriveState::Prepared(PreparedDrive {
                partition: format!("{name}1"),
                filesystem: crate::Filesystem::Xfs,
                fs_uuid: "0b7c1f34-2a3e-4f0e-9a55-3d7c5e0c6a11".into(),
                label: "shoal-ZHZ0AB12".into(),
                mount_point: "/var/lib/shoal/drives/ZHZ0AB12".into(),
            }),
            smart: Some(SmartOutcome::Report(SmartReport {
                device: format!("/dev/{name}"),
                protocol: crate::DriveProtocol::Ata,
                model: Some("ST12000NM0008-2H3101".into()),
                serial: Some("ZHZ0AB12".into()),
                firmware: Some("SN02".into()),
                capacity_bytes: Some(12 << 40),
                temperature_celsius: Some(34),
                power_on_hours: Some(31_000),
                health_passed: Some(true),
                exit_status: SmartExitStatus(0),
                predictors: SmartPredictors::Ata(Default::default()),
                self_test: Some(SelfTestStatus::Completed {
                    kind: Some(crate::SelfTestKind::Short),
                    passed: true,
                    result: "Completed without error".into(),
                    power_on_hours: Some(30_990),
                }),
            })),
            smart_at: Some(UnixMillis(1)),
        }
    }

    #[test]
    fn hello_enrol_renew_and_rotation_fields_are_bounded() {
        at_and_over(MAX_NAME_LEN, "hello.agent_version", |n| {
            hello(s(n), "m".into())
        });
        at_and_over(MAX_HARDWARE_ID_LEN, "hello.hardware_id", |n| {
            hello("0.1.0".into(), s(n))
        });
        let enrol = |token: usize, csr: usize, host: usize| {
            AgentMsg::Enrol(EnrolRequest {
                token: s(token),
                csr_der: vec![0; csr],
                hostname: s(host),
            })
        };
        at_and_over(MAX_TOKEN_LEN, "enrol.token", |n| enrol(n, 300, 10));
        at_and_over(MAX_CSR_LEN, "enrol.csr_der", |n| enrol(121, n, 10));
        at_and_over(MAX_HOSTNAME_LEN, "enrol.hostname", |n| enrol(121, 300, n));
        at_and_over(MAX_CSR_LEN, "renew.csr_der", |n| {
            AgentMsg::Renew(RenewRequest {
                csr_der: vec![0; n],
            })
        });
        let rotate = |csr: usize, sig: usize| {
            AgentMsg::RotateKey(RotateKeyRequest {
                csr_der: vec![0; csr],
                signature: vec![0; sig],
            })
        };
        at_and_over(MAX_CSR_LEN, "rotate_key.csr_der", |n| rotate(n, 72));
        at_and_over(MAX_SIGNATURE_LEN, "rotate_key.signature", |n| {
            rotate(300, n)
        });
    }

    #[test]
    fn every_inventory_list_and_text_is_bounded() {
        at_and_over(MAX_HOSTNAME_LEN, "inventory.hostname", |n| {
            inventory_with(|i| i.hostname = s(n))
        });
        at_and_over(MAX_NAME_LEN, "inventory.os", |n| {
            inventory_with(|i| i.os = s(n))
        });
        at_and_over(MAX_NAME_LEN, "inventory.kernel", |n| {
            inventory_with(|i| i.kernel = s(n))
        });
        at_and_over(MAX_NAME_LEN, "inventory.arch", |n| {
            inventory_with(|i| i.arch = s(n))
        });
        at_and_over(MAX_NAME_LEN, "inventory.cpu_model", |n| {
            inventory_with(|i| i.cpu_model = s(n))
        });
        at_and_over(MAX_NAME_LEN, "inventory.dmi.vendor", |n| {
            inventory_with(|i| i.dmi.vendor = Some(s(n)))
        });
        at_and_over(MAX_NAME_LEN, "inventory.dmi.product", |n| {
            inventory_with(|i| i.dmi.product = Some(s(n)))
        });
        at_and_over(MAX_NAME_LEN, "inventory.dmi.serial", |n| {
            inventory_with(|i| i.dmi.serial = Some(s(n)))
        });
        at_and_over(MAX_NAME_LEN, "inventory.dmi.uuid", |n| {
            inventory_with(|i| i.dmi.uuid = Some(s(n)))
        });
        let disk = |name: String| BlockDevice {
            name,
            ..Default::default()
        };
        at_and_over(MAX_DISKS, "inventory.disks", |n| {
            inventory_with(|i| i.disks = (0..n).map(|_| disk("sda".into())).collect())
        });
        at_and_over(MAX_NAME_LEN, "inventory.disks[1].name", |n| {
            inventory_with(|i| i.disks = vec![disk("sda".into()), disk(s(n))])
        });
        at_and_over(MAX_NAME_LEN, "inventory.disks[0].model", |n| {
            inventory_with(|i| {
                i.disks = vec![BlockDevice {
                    model: Some(s(n)),
                    ..disk("sda".into())
                }]
            })
        });
        at_and_over(MAX_NAME_LEN, "inventory.disks[0].serial", |n| {
            inventory_with(|i| {
                i.disks = vec![BlockDevice {
                    serial: Some(s(n)),
                    ..disk("sda".into())
                }]
            })
        });
        let nic = |name: String, addresses: Vec<String>| NetInterface {
            name,
            addresses,
            ..Default::default()
        };
        at_and_over(MAX_NICS, "inventory.nics", |n| {
            inventory_with(|i| i.nics = (0..n).map(|_| nic("veth0".into(), vec![])).collect())
        });
        at_and_over(MAX_NAME_LEN, "inventory.nics[0].name", |n| {
            inventory_with(|i| i.nics = vec![nic(s(n), vec![])])
        });
        at_and_over(MAX_NAME_LEN, "inventory.nics[0].mac", |n| {
            inventory_with(|i| {
                i.nics = vec![NetInterface {
                    mac: Some(s(n)),
                    ..nic("eth0".into(), vec![])
                }]
            })
        });
        at_and_over(MAX_NIC_ADDRESSES, "inventory.nics[0].addresses", |n| {
            inventory_with(|i| i.nics = vec![nic("eth0".into(), vec!["10.0.0.1/24".into(); n])])
        });
        at_and_over(MAX_NAME_LEN, "inventory.nics[0].addresses[1]", |n| {
            inventory_with(|i| i.nics = vec![nic("eth0".into(), vec!["10.0.0.1/24".into(), s(n)])])
        });
    }

    #[test]
    fn nested_lists_are_bounded_by_the_encoded_size() {
        // Each count is within its bound; together they are 4096 x 1024 addresses.
        let inv = inventory_with(|i| {
            i.nics = (0..MAX_NICS)
                .map(|k| NetInterface {
                    name: format!("veth{k}"),
                    addresses: vec!["fe80::1/64".into(); 64],
                    ..Default::default()
                })
                .collect()
        });
        let err = check(&inv).expect_err("too big");
        assert_eq!(
            (err.field.as_str(), err.limit, err.unit),
            ("inventory", 512 * 1024, Unit::Bytes),
            "{err}"
        );
        assert!(err.to_string().starts_with("inventory is "), "{err}");
    }

    #[test]
    fn health_paths_punch_and_overlay_lists_are_bounded() {
        let fs = |mount: String, device: String, fs_type: String| FilesystemUsage {
            mount,
            device,
            fs_type,
            total_bytes: 1,
            available_bytes: 1,
        };
        let health = |filesystems: Vec<FilesystemUsage>| {
            AgentMsg::Health(HealthReport {
                filesystems,
                ..Default::default()
            })
        };
        at_and_over(MAX_FILESYSTEMS, "health.filesystems", |n| {
            health(vec![fs("/".into(), "/dev/sda1".into(), "ext4".into()); n])
        });
        at_and_over(MAX_PATH_LEN, "health.filesystems[0].mount", |n| {
            health(vec![fs(s(n), "/dev/sda1".into(), "ext4".into())])
        });
        at_and_over(MAX_PATH_LEN, "health.filesystems[0].device", |n| {
            health(vec![fs("/".into(), s(n), "ext4".into())])
        });
        at_and_over(MAX_NAME_LEN, "health.filesystems[0].fs_type", |n| {
            health(vec![fs("/".into(), "/dev/sda1".into(), s(n))])
        });

        let ep: SocketAddr = "192.0.2.1:7000".parse().unwrap();
        at_and_over(MAX_OVERLAY_ENDPOINTS, "overlay.local_endpoints", |n| {
            AgentMsg::Overlay(OverlayHello {
                netmap_version: None,
                local_endpoints: vec![ep; n],
                nat: NatMapping::Unknown,
            })
        });
        at_and_over(MAX_NODE_ID_LEN, "punch.peer", |n| {
            AgentMsg::Punch(Punch {
                peer: NodeId(s(n)),
                endpoints: vec![],
            })
        });
        at_and_over(MAX_OVERLAY_ENDPOINTS, "punch.endpoints", |n| {
            AgentMsg::Punch(Punch {
                peer: NodeId("n1".into()),
                endpoints: vec![ep; n],
            })
        });

        let path = |peer: String| PathInfo {
            peer: NodeId(peer),
            kind: PathKind::Direct,
            remote: Some(ep),
            rtt_ms: 1.0,
            tx_bytes: 1,
            rx_bytes: 1,
        };
        let report = |paths: Vec<PathInfo>, dropped: Vec<(String, u64)>| {
            AgentMsg::Paths(PathReport {
                paths,
                counters: OverlayCounters {
                    dropped,
                    ..Default::default()
                },
            })
        };
        at_and_over(MAX_PATHS, "paths.paths", |n| {
            report(vec![path("n0123456789".into()); n], vec![])
        });
        at_and_over(MAX_NODE_ID_LEN, "paths.paths[0].peer", |n| {
            report(vec![path(s(n))], vec![])
        });
        at_and_over(MAX_DROP_REASONS, "paths.counters.dropped", |n| {
            report(vec![], vec![("storm".into(), 1); n])
        });
        at_and_over(MAX_NAME_LEN, "paths.counters.dropped[0]", |n| {
            report(vec![], vec![(s(n), 1)])
        });
    }

    #[test]
    fn drive_reports_bound_drives_and_every_nested_field() {
        let report = |drives: Vec<Drive>| {
            AgentMsg::Drives(DriveReport {
                at: UnixMillis(1),
                drives,
            })
        };
        let with = |f: &dyn Fn(&mut Drive)| {
            let mut d = drive("sda");
            f(&mut d);
            report(vec![d])
        };
        // Many drives with full SMART fit; the count bound is reached before the size bound.
        at_and_over(MAX_DRIVES, "drives.drives", |n| {
            report((0..n).map(|k| drive(&format!("sd{k}"))).collect())
        });
        // A kernel name twice is refused: the controller tells drives apart by it.
        let err =
            check(&report(vec![drive("sda"), drive("sdb"), drive("sda")])).expect_err("duplicate");
        assert_eq!(
            (err.field.as_str(), err.actual, err.limit, err.unit),
            ("drives.drives[2].name", 2, 1, Unit::Occurrences)
        );
        assert_eq!(
            err.to_string(),
            "drives.drives[2].name occurs 2 times, over the limit of 1"
        );
        at_and_over(MAX_NAME_LEN, "drives.drives[0].name", |n| {
            with(&|d| d.name = s(n))
        });
        at_and_over(MAX_NAME_LEN, "drives.drives[0].model", |n| {
            with(&|d| d.model = Some(s(n)))
        });
        at_and_over(MAX_NAME_LEN, "drives.drives[0].serial", |n| {
            with(&|d| d.serial = Some(s(n)))
        });
        at_and_over(
            MAX_DRIVE_SIGNATURES,
            "drives.drives[0].state.signatures",
            |n| {
                with(&|d| {
                    d.state = DriveState::HasData {
                        signatures: vec!["gpt".into(); n],
                    }
                })
            },
        );
        at_and_over(MAX_NAME_LEN, "drives.drives[0].state.signatures[0]", |n| {
            with(&|d| {
                d.state = DriveState::HasData {
                    signatures: vec![s(n)],
                }
            })
        });
        at_and_over(MAX_TEXT_LEN, "drives.drives[0].state.reason", |n| {
            with(&|d| d.state = DriveState::PrepareFailed { reason: s(n) })
        });
        at_and_over(MAX_TEXT_LEN, "drives.drives[0].state.reason", |n| {
            with(&|d| d.state = DriveState::Unreadable { reason: s(n) })
        });
        let prep = |f: &dyn Fn(&mut PreparedDrive), missing: bool| {
            with(&|d| {
                let DriveState::Prepared(mut p) = drive("sda").state else {
                    unreachable!()
                };
                f(&mut p);
                d.state = if missing {
                    DriveState::Missing(p)
                } else {
                    DriveState::Prepared(p)
                };
            })
        };
        at_and_over(MAX_NAME_LEN, "drives.drives[0].state.partition", |n| {
            prep(&|p| p.partition = s(n), false)
        });
        at_and_over(MAX_NAME_LEN, "drives.drives[0].state.fs_uuid", |n| {
            prep(&|p| p.fs_uuid = s(n), true)
        });
        at_and_over(MAX_NAME_LEN, "drives.drives[0].state.label", |n| {
            prep(&|p| p.label = s(n), false)
        });
        at_and_over(MAX_PATH_LEN, "drives.drives[0].state.mount_point", |n| {
            prep(&|p| p.mount_point = s(n), true)
        });
        at_and_over(MAX_TEXT_LEN, "drives.drives[0].smart.reason", |n| {
            with(&|d| d.smart = Some(SmartOutcome::NoSmart { reason: s(n) }))
        });
        at_and_over(MAX_TEXT_LEN, "drives.drives[0].smart.reason", |n| {
            with(&|d| d.smart = Some(SmartOutcome::Failed { reason: s(n) }))
        });
        let smart = |f: &dyn Fn(&mut SmartReport)| {
            with(&|d| {
                let Some(SmartOutcome::Report(mut r)) = drive("sda").smart else {
                    unreachable!()
                };
                f(&mut r);
                d.smart = Some(SmartOutcome::Report(r));
            })
        };
        at_and_over(MAX_PATH_LEN, "drives.drives[0].smart.device", |n| {
            smart(&|r| r.device = s(n))
        });
        at_and_over(MAX_NAME_LEN, "drives.drives[0].smart.model", |n| {
            smart(&|r| r.model = Some(s(n)))
        });
        at_and_over(MAX_NAME_LEN, "drives.drives[0].smart.serial", |n| {
            smart(&|r| r.serial = Some(s(n)))
        });
        at_and_over(MAX_NAME_LEN, "drives.drives[0].smart.firmware", |n| {
            smart(&|r| r.firmware = Some(s(n)))
        });
        at_and_over(
            MAX_TEXT_LEN,
            "drives.drives[0].smart.self_test.result",
            |n| {
                smart(&|r| {
                    r.self_test = Some(SelfTestStatus::Completed {
                        kind: None,
                        passed: false,
                        result: s(n),
                        power_on_hours: None,
                    })
                })
            },
        );
        // The size bound holds the whole report: MAX_DRIVES drives with every text at its limit do
        // not fit.
        let fat: Vec<Drive> = (0..MAX_DRIVES).map(with_long_texts).collect();
        assert_eq!(
            check(&report(fat)).map_err(|e| e.field),
            Err("drives".to_owned())
        );
    }

    fn with_long_texts(k: usize) -> Drive {
        let mut d = drive(&format!("sd{k}"));
        d.model = Some(s(MAX_NAME_LEN));
        d.serial = Some(s(MAX_NAME_LEN));
        d
    }

    #[test]
    fn answers_and_reports_are_bounded() {
        let result = |r: Result<String, String>| {
            AgentMsg::DriveCommandResult(DriveCommandResult { id: 1, result: r })
        };
        at_and_over(MAX_TEXT_LEN, "drive_command_result.result", |n| {
            result(Ok(s(n)))
        });
        at_and_over(MAX_TEXT_LEN, "drive_command_result.result", |n| {
            result(Err(s(n)))
        });
        at_and_over(MAX_NAME_LEN, "update_ack.version", |n| {
            AgentMsg::UpdateAck { version: s(n) }
        });
        at_and_over(MAX_TEXT_LEN, "reboot_ack.method", |n| AgentMsg::RebootAck {
            method: s(n),
        });
        at_and_over(MAX_TEXT_LEN, "reboot_refused.reason", |n| {
            AgentMsg::RebootRefused { reason: s(n) }
        });

        let update = |f: &dyn Fn(&mut UpdateReport)| {
            let mut r = UpdateReport {
                running: "0.1.0".into(),
                attempted: Some("0.2.0".into()),
                attempts: 1,
                checks: vec![],
                failure: None,
            };
            f(&mut r);
            AgentMsg::UpdateReport(r)
        };
        let check_result = |name: String, detail: Option<String>| CheckResult {
            name,
            passed: false,
            detail,
        };
        at_and_over(MAX_NAME_LEN, "update_report.running", |n| {
            update(&|r| r.running = s(n))
        });
        at_and_over(MAX_NAME_LEN, "update_report.attempted", |n| {
            update(&|r| r.attempted = Some(s(n)))
        });
        at_and_over(MAX_CHECKS, "update_report.checks", |n| {
            update(&|r| r.checks = vec![check_result("session".into(), None); n])
        });
        at_and_over(MAX_NAME_LEN, "update_report.checks[0].name", |n| {
            update(&|r| r.checks = vec![check_result(s(n), None)])
        });
        at_and_over(MAX_TEXT_LEN, "update_report.checks[0].detail", |n| {
            update(&|r| r.checks = vec![check_result("x".into(), Some(s(n)))])
        });
        at_and_over(MAX_TEXT_LEN, "update_report.failure", |n| {
            update(&|r| r.failure = Some(UpdateFailure::Malformed(s(n))))
        });
        at_and_over(MAX_TEXT_LEN, "update_report.failure", |n| {
            update(&|r| r.failure = Some(UpdateFailure::Install(s(n))))
        });
        at_and_over(MAX_NAME_LEN, "update_report.failure", |n| {
            update(&|r| {
                r.failure = Some(UpdateFailure::WrongTarget {
                    release: "x86_64".into(),
                    agent: s(n),
                })
            })
        });
        at_and_over(MAX_NAME_LEN, "update_report.failure", |n| {
            update(&|r| r.failure = Some(UpdateFailure::BadSignature { key_id: s(n) }))
        });

        let step = |run: String, outcome: StepOutcome| {
            AgentMsg::MaintenanceResult(MaintenanceResult {
                run,
                step: StepKind::Act,
                outcome,
            })
        };
        at_and_over(MAX_NAME_LEN, "maintenance_result.run", |n| {
            step(s(n), StepOutcome::Done(String::new()))
        });
        at_and_over(MAX_TEXT_LEN, "maintenance_result.outcome", |n| {
            step("r1".into(), StepOutcome::Failed(s(n)))
        });
        // What the agent sends for the longest output (output_tail of MAX_STEP_OUTPUT, with its
        // words around it) is well inside.
        let tail = crate::output_tail(&"é".repeat(10_000), crate::MAX_STEP_OUTPUT);
        assert_eq!(
            check(&step(
                "r1".into(),
                StepOutcome::Failed(format!("/usr/local/bin/hook exited with 1: {tail}"))
            )),
            Ok(())
        );

        let boot = |f: &dyn Fn(&mut BootReport)| {
            let mut r = BootReport {
                boot_id: "b".into(),
                image: Some("v1".into()),
                checks: vec![],
            };
            f(&mut r);
            AgentMsg::BootReport(r)
        };
        at_and_over(MAX_NAME_LEN, "boot_report.boot_id", |n| {
            boot(&|r| r.boot_id = s(n))
        });
        at_and_over(MAX_NAME_LEN, "boot_report.image", |n| {
            boot(&|r| r.image = Some(s(n)))
        });
        at_and_over(MAX_CHECKS, "boot_report.checks", |n| {
            boot(&|r| r.checks = vec![check_result("heartbeat".into(), None); n])
        });
        at_and_over(MAX_TEXT_LEN, "boot_report.checks[2].detail", |n| {
            boot(&|r| {
                r.checks = vec![
                    check_result("a".into(), None),
                    check_result("b".into(), None),
                    check_result("c".into(), Some(s(n))),
                ]
            })
        });
    }

    /// What real machines send stays far inside: a 256-core storage server with 60 drives and a
    /// Kubernetes node with 500 interfaces.
    #[test]
    fn large_real_machines_are_well_inside() {
        let server = inventory_with(|i| {
            i.cpu_cores = 256;
            i.cpu_model = "AMD EPYC 9754 128-Core Processor".into();
            i.os = "Debian GNU/Linux 12 (bookworm)".into();
            i.disks = (0..60)
                .map(|k| BlockDevice {
                    name: format!("sd{k}"),
                    model: Some("ST12000NM0008-2H3101".into()),
                    serial: Some(format!("ZHZ0{k:04}")),
                    size_bytes: 12 << 40,
                    rotational: true,
                    removable: false,
                })
                .collect();
            i.nics = (0..8)
                .map(|k| NetInterface {
                    name: format!("ens{k}f0"),
                    mac: Some("b8:ce:f6:00:00:01".into()),
                    addresses: vec![
                        "192.0.2.10/24".into(),
                        "2001:db8::10/64".into(),
                        "fe80::1/64".into(),
                    ],
                    ..Default::default()
                })
                .collect();
        });
        let k8s = inventory_with(|i| {
            i.nics = (0..500)
                .map(|k| NetInterface {
                    name: format!("cali{k:011x}"),
                    mac: Some("ee:ee:ee:ee:ee:ee".into()),
                    up: true,
                    addresses: vec!["fe80::ecee:eeff:feee:eeee/64".into()],
                    ..Default::default()
                })
                .collect();
        });
        let drives = AgentMsg::Drives(DriveReport {
            at: UnixMillis(1),
            drives: (0..60).map(|k| drive(&format!("sd{k}"))).collect(),
        });
        for (what, msg) in [
            ("storage server inventory", server),
            ("k8s node inventory", k8s),
            ("60-drive report", drives),
        ] {
            let len = postcard::experimental::serialized_size(&msg).unwrap();
            assert_eq!(check(&msg), Ok(()), "{what}");
            assert!(
                len * 8 < max_encoded_len(&msg),
                "{what}: {len} bytes is not well inside {}",
                max_encoded_len(&msg)
            );
        }
    }

    #[test]
    fn every_kind_has_a_size_bound_within_the_frame() {
        let msgs = [
            hello("v".into(), "m".into()),
            AgentMsg::Renew(RenewRequest { csr_der: vec![] }),
            AgentMsg::Paths(PathReport {
                paths: vec![],
                counters: Default::default(),
            }),
            AgentMsg::UpdateAck {
                version: "1".into(),
            },
        ];
        for m in &msgs {
            assert!(max_encoded_len(m) <= MAX_FRAME_LEN, "{}", kind_name(m));
            assert_eq!(check(m), Ok(()));
        }
    }

    #[test]
    fn wireguard_maps_are_bounded() {
        use crate::{
            NetworkId, NodeId, WireGuardDevice, WireGuardGatewayHello, WireGuardMap,
            WireGuardNetwork,
        };
        let network = |devices: usize, gateways: usize, id_len: usize| WireGuardNetwork {
            network: NetworkId(1),
            devices: (0..devices)
                .map(|k| WireGuardDevice {
                    public_key: [7; 32],
                    address: std::net::Ipv4Addr::from(0x0a5a_0000 + k as u32),
                })
                .collect(),
            gateways: (0..gateways).map(|_| NodeId(s(id_len))).collect(),
            role: None,
        };
        let map = |networks: Vec<WireGuardNetwork>| WireGuardMap { networks };
        let full = map(vec![network(
            MAX_WIREGUARD_DEVICES,
            MAX_WIREGUARD_GATEWAYS,
            MAX_NODE_ID_LEN,
        )]);
        assert_eq!(check_wireguard_map(&full), Ok(()));
        // The largest network fits in a frame.
        crate::encode_frame(&crate::ControllerMsg::WireGuard(full)).expect("fits");
        let err =
            check_wireguard_map(&map(vec![network(MAX_WIREGUARD_DEVICES + 1, 1, 1)])).unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.actual, err.limit),
            (
                "wireguard.networks[0].devices",
                MAX_WIREGUARD_DEVICES + 1,
                MAX_WIREGUARD_DEVICES
            )
        );
        let err =
            check_wireguard_map(&map(vec![network(1, MAX_WIREGUARD_GATEWAYS + 1, 1)])).unwrap_err();
        assert_eq!(err.field, "wireguard.networks[0].gateways");
        let err = check_wireguard_map(&map(vec![network(1, 1, MAX_NODE_ID_LEN + 1)])).unwrap_err();
        assert_eq!(err.field, "wireguard.networks[0].gateways[0]");
        let err = check_wireguard_map(&map((0..=MAX_WIREGUARD_NETWORKS)
            .map(|_| network(0, 0, 1))
            .collect()))
        .unwrap_err();
        assert_eq!(err.field, "wireguard.networks");
        // The agent's announcement is a socket address under its size bound.
        let hello = AgentMsg::WireGuardGateway(WireGuardGatewayHello {
            listen: SocketAddr::from(([192, 0, 2, 1], 51820)),
        });
        assert_eq!(check(&hello), Ok(()));
        assert_eq!(kind_name(&hello), "wireguard_gateway");
    }

    #[test]
    fn datapath_reports_bound_devices_offloads_and_text() {
        use crate::{DatapathReport, NetworkId, TapDatapath};
        let tap = |device: String, offloads: Vec<String>, fallback: Option<String>| TapDatapath {
            network: NetworkId(1),
            device,
            offloads,
            fallback,
            queues: 1,
            reads: u64::MAX,
            read_frames: u64::MAX,
            writes: u64::MAX,
            write_frames: u64::MAX,
        };
        let report = |taps: Vec<TapDatapath>| {
            AgentMsg::Datapath(DatapathReport {
                taps,
                rx_batches: u64::MAX,
                rx_datagrams: u64::MAX,
            })
        };
        let plain = || tap("shoal0".into(), vec!["tso4".into(); 5], None);
        at_and_over(MAX_DATAPATH_TAPS, "datapath.taps", |n| {
            report(vec![plain(); n])
        });
        at_and_over(MAX_NAME_LEN, "datapath.taps[0].device", |n| {
            report(vec![tap(s(n), vec![], None)])
        });
        at_and_over(MAX_TAP_OFFLOADS, "datapath.taps[0].offloads", |n| {
            report(vec![tap("shoal0".into(), vec!["csum".into(); n], None)])
        });
        at_and_over(MAX_NAME_LEN, "datapath.taps[0].offloads[0]", |n| {
            report(vec![tap("shoal0".into(), vec![s(n)], None)])
        });
        at_and_over(MAX_TEXT_LEN, "datapath.taps[0].fallback", |n| {
            report(vec![tap("shoal0".into(), vec![], Some(s(n)))])
        });
        // Every device at its longest fallback would pass the item bounds; the size bound stops it.
        let err = check(&report(vec![
            tap(
                "shoal0".into(),
                vec![],
                Some(s(MAX_TEXT_LEN))
            );
            MAX_DATAPATH_TAPS
        ]))
        .unwrap_err();
        assert_eq!(err.field, "datapath");
    }

    #[test]
    fn controller_sets_are_bounded() {
        use crate::{ControllerEndpoint, ControllerSet};
        let set = |n: usize, id_len: usize| ControllerSet {
            controllers: (0..n)
                .map(|k| ControllerEndpoint {
                    id: s(id_len),
                    addr: SocketAddr::from(([192, 0, 2, 1], 7440 + k as u16)),
                })
                .collect(),
        };
        assert_eq!(
            check_controller_set(&set(MAX_CONTROLLERS, MAX_CONTROLLER_ID_LEN)),
            Ok(())
        );
        let err = check_controller_set(&set(MAX_CONTROLLERS + 1, 1)).unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.actual, err.limit),
            (
                "controller_set.controllers",
                MAX_CONTROLLERS + 1,
                MAX_CONTROLLERS
            )
        );
        let err = check_controller_set(&set(2, MAX_CONTROLLER_ID_LEN + 1)).unwrap_err();
        assert_eq!(err.field, "controller_set.controllers[0].id");
        // The largest honest set is a small frame.
        let frame = crate::encode_frame(&crate::ControllerMsg::ControllerSet(set(
            MAX_CONTROLLERS,
            MAX_CONTROLLER_ID_LEN,
        )))
        .expect("fits");
        assert!(frame.len() < 2048, "{} bytes", frame.len());
    }

    #[test]
    fn backup_results_are_bounded() {
        use crate::{BackupResult, BackupStats, FileHash, SnapshotInfo, TargetResult, VerifyStats};
        let target = |name: &str| TargetResult {
            target: name.into(),
            backup: Some(BackupStats {
                snapshot: "a".repeat(64),
                warnings: vec!["w".into(); MAX_BACKUP_ERRORS],
                samples: vec![
                    FileHash {
                        path: "/srv/data/file".into(),
                        size: 1,
                        sha256: [0; 32],
                    };
                    MAX_SAMPLE_FILES
                ],
                ..Default::default()
            }),
            verify: Some(VerifyStats::default()),
            snapshots: vec![
                SnapshotInfo {
                    id: "b".repeat(64),
                    time: UnixMillis(0),
                    paths: vec!["/srv/data".into()],
                };
                MAX_REPORTED_SNAPSHOTS
            ],
            ..Default::default()
        };
        let good = BackupResult {
            task: "b1".into(),
            job: "home".into(),
            kind: "backup".into(),
            started_at: UnixMillis(0),
            finished_at: UnixMillis(0),
            targets: (0..MAX_JOB_TARGETS)
                .map(|i| target(&format!("t{i}")))
                .collect(),
            error: None,
        };
        assert_eq!(
            check(&AgentMsg::BackupResult(good.clone())),
            Ok(()),
            "the largest honest result"
        );
        let mut too_many = good.clone();
        too_many.targets.push(target("extra"));
        assert!(check(&AgentMsg::BackupResult(too_many)).is_err());
        let mut long_error = good.clone();
        long_error.targets[0].error = Some("e".repeat(MAX_TEXT_LEN + 1));
        assert!(check(&AgentMsg::BackupResult(long_error)).is_err());
        let mut many_samples = good.clone();
        if let Some(b) = many_samples.targets[0].backup.as_mut() {
            b.samples.push(b.samples[0].clone());
        }
        assert!(check(&AgentMsg::BackupResult(many_samples)).is_err());
        let mut many_lines = good;
        if let Some(v) = many_lines.targets[1].verify.as_mut() {
            v.mismatches = vec!["m".into(); MAX_BACKUP_ERRORS + 1];
        }
        assert!(check(&AgentMsg::BackupResult(many_lines)).is_err());
        let progress = crate::BackupProgress {
            task: "t".repeat(MAX_NAME_LEN + 1),
            target: "s3".into(),
            phase: "backup".into(),
            files_done: 0,
            bytes_done: 0,
            total_files: 0,
            total_bytes: 0,
        };
        assert!(check(&AgentMsg::BackupProgress(progress)).is_err());
    }
}
