//! The protocol version and the rule for mixed-version fleets.
//!
//! Each side announces the range of versions it speaks; the pair talks the highest version both
//! speak. A release always keeps speaking the previous version (`SUPPORTED.min == PROTOCOL_VERSION
//! - 1` once there is one), because a rolling upgrade is a fleet of adjacent versions.
//!
//! Compatibility rule for postcard (which is not self-describing): a message's payload never
//! changes once released. A new version adds new enum variants at the end, and a sender only sends
//! what the negotiated version knows.

use serde::{Deserialize, Serialize};

/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 9;

/// The first version with the overlay (netmaps, punches, path reports, relaying).
pub const OVERLAY_PROTOCOL: u16 = 2;
/// The first version with drive reports, policies and commands.
pub const DRIVES_PROTOCOL: u16 = 3;
/// The first version with agent updates, reboots, maintenance steps and boot reports.
pub const UPDATES_PROTOCOL: u16 = 4;
/// The first version with key rotation and signed kexec images.
pub const KEY_ROTATION_PROTOCOL: u16 = 5;
/// The first version with backup tasks.
pub const BACKUP_PROTOCOL: u16 = 6;
/// The first version with the controller set (several controllers, one fleet).
pub const CLUSTER_PROTOCOL: u16 = 7;
/// The first version with relay reasons in path reports (`AgentMsg::PathsV8`).
pub const RELAY_REASONS_PROTOCOL: u16 = 8;
/// The first version with WireGuard gateways (`AgentMsg::WireGuardGateway`,
/// `ControllerMsg::WireGuard`).
pub const WIREGUARD_PROTOCOL: u16 = 9;
/// The first version with datapath reports (`AgentMsg::Datapath`).
pub const DATAPATH_PROTOCOL: u16 = 9;

/// Every version this build speaks.
pub const SUPPORTED: VersionRange = VersionRange {
    min: 1,
    max: PROTOCOL_VERSION,
};

/// What each protocol version added, newest last (date, version, change).
pub const PROTOCOL_HISTORY: &[(&str, u16, &str)] = &[
    (
        "2026-11-23",
        1,
        "initial: Hello/Welcome version handshake, token enrolment with CSR, certificate renewal, \
         inventory, health reports as heartbeats, revocation notice",
    ),
    (
        "2026-11-23",
        2,
        "overlay: OverlayHello, Observed (reflexive address, relay index, NAT probe port), Netmap and \
         NetmapDelta, Punch, PathReport; relay datagrams on the control connection",
    ),
    (
        "2026-11-23",
        3,
        "drives: AgentMsg::Drives (DriveReport: every drive's contents state, preparation and SMART, \
         sent whole on change), DriveCommandResult; ControllerMsg::DrivePolicy, DriveCommand (prepare, \
         self-test)",
    ),
    (
        "2026-11-23",
        4,
        "agent updates: ControllerMsg::UpdateAgent (signed release offer: manifest, signature, key id), \
         RevertAgent; AgentMsg::UpdateAck, UpdateReport (booted version, attempts, checks, failure); \
         release download on a second bidirectional stream: FetchRelease, then FetchReply::Chunk frames \
         of at most 256 KiB until the stream ends; ControllerMsg::Reboot (reason, prefer_kexec) answered \
         by AgentMsg::RebootAck (method) or RebootRefused (reason), for netboot image rollouts; \
         maintenance runs: ControllerMsg::Maintenance (MaintenanceStep: run, action reboot | smart-test | \
         exec argv, step cordon | act | uncordon) answered by AgentMsg::MaintenanceResult (run, step, \
         outcome done | failed | rebooting, text at most 4 KiB); \
         AgentMsg::BootReport (boot id, netboot image, health checks) after the first heartbeat of \
         every session and when the checks' outcome changes; ControllerMsg::KexecImage (kernel and \
         initramfs URLs and SHA-256, command line) before a Reboot that prefers kexec",
    ),
    (
        "2026-12-02",
        5,
        "trust: RejectCode::IdentityInUse, AwaitingApproval, CertificateRefused (older agents get \
         Unavailable / NodeRevoked); AgentMsg::RotateKey (CSR for a new key signed by the old one) \
         answered by Renewed; ControllerMsg::RotateKey (asks the node to rotate); \
         ControllerMsg::UpdateOffer (UpdateAgent with allow_downgrade: agents refuse older versions \
         without it); ControllerMsg::SignedKexecImage (the image's signed manifest, URLs, controller \
         address and boot token: the agent verifies the manifest with its own image key and builds \
         the command line itself)",
    ),
    (
        "2026-12-07",
        6,
        "backups: ControllerMsg::BackupTask (id, job, kind backup | verify | restore, paths, excludes, \
         retention, sample size, targets with their access and check subset) answered by \
         AgentMsg::BackupResult (per target: error, backup stats with sampled file hashes, verify \
         stats, snapshots) and preceded by AgentMsg::BackupProgress; ControllerMsg::BackupAck lets \
         the agent forget a result it keeps until then",
    ),
    (
        "2026-12-07",
        7,
        "controller cluster: ControllerMsg::ControllerSet (every live controller's agent endpoint, \
         id and address, the sending controller first; at most 16, ids at most 64 bytes) after \
         Welcome and whenever the set changes; agents keep it and fail over to another controller",
    ),
    (
        "2026-12-07",
        8,
        "relay reasons: AgentMsg::PathsV8 (PathReportV8: the v2 PathReport and, per relayed path, \
         a RelayReason: trying, no candidates, endpoint-dependent NAT on both sides, this side or \
         the peer's, UDP blocked, punch timed out, refused) sent instead of AgentMsg::Paths",
    ),
    (
        "2026-12-07",
        9,
        "WireGuard gateways and datapath reports: AgentMsg::WireGuardGateway (the gateway's UDP \
         listen address) after Welcome; ControllerMsg::WireGuard (WireGuardMap: per network of the \
         agent with devices, each device's public key and address, the gateway members, and for a \
         gateway the network's gateway private key and whether it is the active gateway) after \
         Welcome and on every change; AgentMsg::Datapath (DatapathReport: per TAP device the \
         offloads in use or why none, queues, reads and writes with the frames they carried; peer \
         datagram receive batches) sent with every path report",
    ),
];

/// An inclusive range of protocol versions a peer speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    /// Oldest version spoken.
    pub min: u16,
    /// Newest version spoken.
    pub max: u16,
}

impl std::fmt::Display for VersionRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..={}", self.min, self.max)
        }
    }
}

/// Why two peers cannot talk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VersionError {
    /// The peer only speaks versions older than anything we speak.
    #[error(
        "peer speaks protocol {peer}, which is older than this side's {local}: upgrade the peer"
    )]
    PeerTooOld {
        /// Our range.
        local: VersionRange,
        /// The peer's range.
        peer: VersionRange,
    },
    /// The peer only speaks versions newer than anything we speak.
    #[error(
        "peer speaks protocol {peer}, which is newer than this side's {local}: upgrade this side"
    )]
    PeerTooNew {
        /// Our range.
        local: VersionRange,
        /// The peer's range.
        peer: VersionRange,
    },
    /// The peer announced an empty range.
    #[error("peer announced an empty protocol range {0}")]
    Invalid(VersionRange),
}

/// The version two peers talk: the newest both speak.
pub fn negotiate(local: VersionRange, peer: VersionRange) -> Result<u16, VersionError> {
    if peer.min > peer.max {
        return Err(VersionError::Invalid(peer));
    }
    if peer.max < local.min {
        return Err(VersionError::PeerTooOld { local, peer });
    }
    if peer.min > local.max {
        return Err(VersionError::PeerTooNew { local, peer });
    }
    Ok(local.max.min(peer.max))
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn r(min: u16, max: u16) -> VersionRange {
        VersionRange { min, max }
    }

    #[test]
    fn same_version_talks_it() {
        assert_eq!(negotiate(r(1, 2), r(1, 2)), Ok(2));
    }

    #[test]
    fn adjacent_versions_talk_the_older() {
        // An upgraded controller (2, still speaking 1) and an old agent (1 only).
        assert_eq!(negotiate(r(1, 2), r(1, 1)), Ok(1));
        // An upgraded agent talking to an old controller.
        assert_eq!(negotiate(r(1, 1), r(1, 2)), Ok(1));
    }

    #[test]
    fn too_old_and_too_new_are_refused_with_direction() {
        let err = negotiate(r(3, 4), r(1, 2)).unwrap_err();
        assert!(matches!(err, VersionError::PeerTooOld { .. }));
        assert!(err.to_string().contains("upgrade the peer"), "{err}");
        let err = negotiate(r(1, 2), r(3, 4)).unwrap_err();
        assert!(matches!(err, VersionError::PeerTooNew { .. }));
        assert!(err.to_string().contains("upgrade this side"), "{err}");
    }

    #[test]
    fn empty_range_is_refused() {
        assert_eq!(
            negotiate(r(1, 1), r(2, 1)),
            Err(VersionError::Invalid(r(2, 1)))
        );
    }

    #[test]
    fn history_ends_at_current_version() {
        let last = PROTOCOL_HISTORY.last().map(|(_, v, _)| *v);
        assert_eq!(last, Some(PROTOCOL_VERSION));
        const { assert!(SUPPORTED.min <= SUPPORTED.max) };
    }
}
