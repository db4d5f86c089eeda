//! The messages on an agent's control stream.
//!
//! One QUIC connection per agent, one bidirectional control stream on it, opened by the agent. The
//! agent speaks first with [`Hello`]; the controller answers [`ControllerMsg::Welcome`] or
//! [`ControllerMsg::Reject`]. Without a client certificate the only thing an agent may then do is
//! [`AgentMsg::Enrol`]; with one it reports inventory and health and renews its certificate.
//!
//! (v4) Release downloads do not use the control stream: the agent opens a second bidirectional
//! stream, sends one [`FetchRelease`] frame and reads [`FetchReply`] frames until the controller
//! finishes the stream. A binary of tens of MiB would otherwise hold up heartbeats behind it (QUIC
//! orders bytes within a stream, not across streams), and a failed download would break the
//! session.

use serde::{Deserialize, Serialize};

use std::net::SocketAddr;

use crate::{
    BackupProgress, BackupResult, BackupTask, BootReport, DatapathReport, DriveCommand,
    DriveCommandResult, DrivePolicy, DriveReport, HardwareId, HealthReport, Inventory,
    MaintenanceResult, MaintenanceStep, Netmap, NetmapDelta, NodeId, OverlayHello, PathReport,
    PathReportV8, PeerIndex, Punch, SignedRelease, UnixMillis, UpdateReport, VersionRange,
};

/// Agent to controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMsg {
    /// First message on the control stream.
    Hello(Hello),
    /// Ask for a node certificate with a join token (unauthenticated connections only).
    Enrol(EnrolRequest),
    /// Ask for a fresh certificate for the same node (authenticated connections only).
    Renew(RenewRequest),
    /// The machine's hardware; sent after Welcome and whenever it changes.
    Inventory(Inventory),
    /// Periodic health; also the heartbeat the controller's liveness tracking counts.
    Health(HealthReport),
    /// (v2) The agent takes part in the overlay: its cached netmap version, local endpoints, NAT
    /// type.
    Overlay(OverlayHello),
    /// (v2) Periodic report of peer paths and datapath counters.
    Paths(PathReport),
    /// (v2) Ask the controller to have a peer open a direct path towards this node now.
    Punch(Punch),
    /// (v3) The machine's drives: contents, preparation state and SMART. Sent whole on every
    /// change.
    Drives(DriveReport),
    /// (v3) How a [`ControllerMsg::DriveCommand`] ended.
    DriveCommandResult(DriveCommandResult),
    /// (v4) The agent took [`ControllerMsg::UpdateAgent`] for this version and is fetching it (it
    /// may still refuse it after the download; the following [`AgentMsg::UpdateReport`] says).
    UpdateAck {
        /// The version offered.
        version: String,
    },
    /// (v4) What the agent booted and how its last update went; sent after every Welcome and
    /// whenever it changes.
    UpdateReport(UpdateReport),
    /// (v4) The agent took [`ControllerMsg::Reboot`] and is about to reboot this way (`kexec -e`,
    /// `reboot(2)`, or the operator's `--reboot-command`). Nothing follows on this session.
    RebootAck {
        /// How the agent reboots, for the operator.
        method: String,
    },
    /// (v4) The agent will not reboot (`--no-remote-reboot`, or the reboot could not start).
    RebootRefused {
        /// Operator-facing reason.
        reason: String,
    },
    /// (v4) How a [`ControllerMsg::Maintenance`] step ended.
    MaintenanceResult(MaintenanceResult),
    /// (v4) What the agent booted and how its health checks went; sent on every session after the
    /// first heartbeat and whenever the checks' outcome changes.
    BootReport(BootReport),
    /// (v5) Replace the node's key: a certificate for a new key, with proof of the old one.
    /// Answered by [`ControllerMsg::Renewed`] (a certificate for the new key) or a reject.
    RotateKey(RotateKeyRequest),
    /// (v6) Where a running [`ControllerMsg::BackupTask`] is; at most every few seconds.
    BackupProgress(BackupProgress),
    /// (v6) How a [`ControllerMsg::BackupTask`] ended, per target. Sent again on every session
    /// until [`ControllerMsg::BackupAck`] arrives.
    BackupResult(BackupResult),
    /// (v8) [`AgentMsg::Paths`] with why each relayed path is relayed; sent instead of it once
    /// both sides speak 8.
    PathsV8(PathReportV8),
    /// (v9) This agent runs a WireGuard gateway on this address (`--wireguard-gateway`); sent
    /// after Welcome.
    WireGuardGateway(crate::WireGuardGatewayHello),
    /// (v9) How the overlay datapath moves frames (offloads, queues, batching); sent with every
    /// path report.
    Datapath(DatapathReport),
}

/// Controller to agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControllerMsg {
    /// The handshake succeeded.
    Welcome(Welcome),
    /// The request was refused; the connection closes after this.
    Reject(Reject),
    /// Enrolment succeeded.
    Enrolled(Enrolled),
    /// Renewal succeeded.
    Renewed(Renewed),
    /// The node was removed from the fleet; its certificate will not be accepted again.
    Revoked {
        /// Operator-facing reason.
        reason: String,
    },
    /// (v2) The address this connection comes from as the controller sees it, and the node's relay
    /// index.
    Observed(Observed),
    /// (v2) A full netmap: the agent's cached one was missing or too old.
    Netmap(Netmap),
    /// (v2) Changes to the agent's netmap.
    NetmapDelta(NetmapDelta),
    /// (v2) A peer is opening a direct path towards this node: open one towards it too, now.
    Punch(Punch),
    /// (v3) The node's drive policy; sent after Welcome and whenever it changes.
    DrivePolicy(DrivePolicy),
    /// (v3) Prepare a drive or start a self-test; answered by [`AgentMsg::DriveCommandResult`].
    DriveCommand(DriveCommand),
    /// (v4) Install this signed agent release. The agent verifies it with its own trusted release
    /// key, answers [`AgentMsg::UpdateAck`] or an [`AgentMsg::UpdateReport`] with the refusal,
    /// fetches the binary on a second stream ([`FetchRelease`]), swaps and re-executes.
    UpdateAgent {
        /// The version asked for; the signed manifest must say the same.
        version: String,
        /// The manifest, its signature and the signing key's id (about 400 bytes: never the
        /// binary).
        release: SignedRelease,
    },
    /// (v4) Go back to the binary kept from the last update (`<exe>.prev`), if there is one.
    RevertAgent {
        /// Operator-facing reason, logged by the agent.
        reason: String,
    },
    /// (v4) Reboot the machine now (to netboot its newly assigned image). The agent answers
    /// [`AgentMsg::RebootAck`] before it reboots, or [`AgentMsg::RebootRefused`].
    Reboot {
        /// Operator-facing reason, logged by the agent.
        reason: String,
        /// Use `kexec -e` when a kexec kernel is loaded (faster: skips firmware); otherwise, or
        /// when false, a full reboot.
        prefer_kexec: bool,
    },
    /// (v4) Do one step of a maintenance run (pre-hook, action, post-hook); answered by
    /// [`AgentMsg::MaintenanceResult`].
    Maintenance(MaintenanceStep),
    /// (v4) Sent just before [`ControllerMsg::Reboot`] with `prefer_kexec`: the kernel, initramfs
    /// and command line of the image assigned to the node, for the agent to load with
    /// `kexec_file_load(2)` and boot without going through firmware and iPXE.
    KexecImage(KexecImage),
    /// (v5) Generate a new key and rotate to it ([`AgentMsg::RotateKey`]): a certificate of this
    /// node's current key was revoked, or an operator asked.
    RotateKey {
        /// Operator-facing reason, logged by the agent.
        reason: String,
    },
    /// (v5) [`ControllerMsg::UpdateAgent`] with the rollout's permission to go to an older version;
    /// without it the agent refuses a downgrade.
    UpdateOffer(UpdateOffer),
    /// (v5) [`ControllerMsg::KexecImage`] with the image's signed manifest: the agent verifies it
    /// with its own image key and takes hashes and command line from it, never from the controller.
    SignedKexecImage(SignedKexecImage),
    /// (v6) Run a backup, verification or restore; answered by [`AgentMsg::BackupResult`].
    BackupTask(BackupTask),
    /// (v6) The controller stored the result of this task: the agent may forget it.
    BackupAck {
        /// The task.
        task: String,
    },
    /// (v7) Every live controller of the fleet, the sender first: where the agent may go when this
    /// one fails. Sent after Welcome and whenever the set changes; never empty.
    ControllerSet(ControllerSet),
    /// (v9) The WireGuard devices and gateways of the agent's networks, with the gateway key for
    /// the networks it is a gateway of. Sent after Welcome and on every change.
    WireGuard(crate::WireGuardMap),
}

/// (v7) The controllers of one fleet as agents reach them: they share the CA and the server name,
/// so an agent's certificate and pinned CA work on every one of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerSet {
    /// At most [`crate::limits::MAX_CONTROLLERS`], the sending controller first.
    pub controllers: Vec<ControllerEndpoint>,
}

/// (v7) One controller's agent endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerEndpoint {
    /// The controller's stable id, at most [`crate::limits::MAX_CONTROLLER_ID_LEN`] bytes.
    pub id: String,
    /// Its QUIC address for agents.
    pub addr: SocketAddr,
}

/// (v5) An agent release offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateOffer {
    /// The version asked for; the signed manifest must say the same.
    pub version: String,
    /// The manifest, its signature and the signing key's id.
    pub release: SignedRelease,
    /// The rollout allows going to a version older than the one running (`--allow-downgrade`).
    pub allow_downgrade: bool,
}

/// (v5) A netboot image to kexec into, as signed by the image's builder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedKexecImage {
    /// The image version; the manifest must say the same.
    pub version: String,
    /// The exact bytes of the image's `manifest.json`.
    pub manifest: Vec<u8>,
    /// The raw 64-byte Ed25519 signature over `manifest` (`manifest.sig`).
    pub signature: Vec<u8>,
    /// The kernel on the controller's boot HTTP server.
    pub kernel_url: String,
    /// The initramfs on the boot HTTP server.
    pub initrd_url: String,
    /// The controller's agent address for the booted image (`shoal.controller=`).
    pub controller: String,
    /// The join token minted for this one boot (`shoal.token=`), bound to this node.
    pub boot_token: String,
}

/// (v5) A key rotation: a request for the new key, signed by the old one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateKeyRequest {
    /// A PKCS#10 certificate signing request (DER) for the new key.
    pub csr_der: Vec<u8>,
    /// The old key's signature (the key the connection's certificate holds, ECDSA P-256 SHA-256,
    /// ASN.1 DER) over [`rotation_message`] of the new key's SubjectPublicKeyInfo.
    pub signature: Vec<u8>,
}

/// What the old key signs in a [`RotateKeyRequest`]: a fixed context string, then the new key's
/// SubjectPublicKeyInfo (DER). The context keeps the signature from meaning anything else.
pub fn rotation_message(node: &NodeId, new_spki_der: &[u8]) -> Vec<u8> {
    let mut m = b"shoal key rotation v1\0".to_vec();
    m.extend_from_slice(node.0.as_bytes());
    m.push(0);
    m.extend_from_slice(new_spki_der);
    m
}

/// (v4) What an agent needs to `kexec` into a netboot image: what the iPXE script would boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KexecImage {
    /// The image version.
    pub version: String,
    /// The kernel on the controller's boot HTTP server (`http://ADDR/images/V/vmlinuz`).
    pub kernel_url: String,
    /// Its SHA-256 (lower-case hex), from the image's signed manifest.
    pub kernel_sha256: String,
    /// The initramfs on the boot HTTP server.
    pub initrd_url: String,
    /// Its SHA-256 (lower-case hex), from the image's signed manifest.
    pub initrd_sha256: String,
    /// The kernel command line, with a join token minted for this one boot.
    pub cmdline: String,
}

/// What the controller observed about an overlay-capable agent's connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// The source address of the connection (the agent's reflexive address behind NAT).
    pub address: SocketAddr,
    /// The node's relay index.
    pub index: PeerIndex,
    /// A second controller port to measure the NAT's mapping behaviour against, if the controller
    /// has one.
    pub probe_port: Option<u16>,
}

/// The agent's opening message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol versions the agent speaks.
    pub protocol: VersionRange,
    /// The agent's software version (`CARGO_PKG_VERSION`).
    pub agent_version: String,
    /// The machine's stable identity.
    pub hardware_id: HardwareId,
}

/// The controller's answer to a good Hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The version this session talks.
    pub protocol: u16,
    /// The controller's software version.
    pub controller_version: String,
    /// The node this connection is authenticated as; `None` on an unauthenticated (enrolment)
    /// connection.
    pub node_id: Option<NodeId>,
    /// How often the controller expects a health report.
    pub heartbeat_interval_ms: u64,
    /// The controller's clock, for the agent to notice gross skew.
    pub now: UnixMillis,
}

/// A join token and the key the certificate should bind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrolRequest {
    /// The join token as the operator pasted it.
    pub token: String,
    /// A PKCS#10 certificate signing request (DER) for the agent's own key.
    pub csr_der: Vec<u8>,
    /// The hostname, for the operator's listing before inventory arrives.
    pub hostname: String,
}

/// Renew the certificate of the already authenticated node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenewRequest {
    /// A PKCS#10 certificate signing request (DER).
    pub csr_der: Vec<u8>,
}

/// A freshly issued node certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enrolled {
    /// The node's stable identity.
    pub node_id: NodeId,
    /// The node certificate (DER).
    pub cert_der: Vec<u8>,
    /// The fleet CA certificate (DER): the only root the agent trusts from now on.
    pub ca_der: Vec<u8>,
    /// When the certificate expires.
    pub not_after: UnixMillis,
}

/// A renewed node certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Renewed {
    /// The node certificate (DER).
    pub cert_der: Vec<u8>,
    /// When it expires.
    pub not_after: UnixMillis,
}

/// A refusal, with a code for programs and a message for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    /// What kind of refusal.
    pub code: RejectCode,
    /// What the agent prints.
    pub message: String,
}

/// Kinds of refusal. New codes are only ever appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    /// No common protocol version.
    Version,
    /// The token is not known (mistyped, or from another controller).
    TokenUnknown,
    /// The token's time to live has passed.
    TokenExpired,
    /// The token's uses are spent.
    TokenUsedUp,
    /// The token was revoked by an operator.
    TokenRevoked,
    /// This node (certificate or hardware) was removed from the fleet.
    NodeRevoked,
    /// The message is not allowed in this state (e.g. inventory before authentication).
    Protocol,
    /// The request was malformed (e.g. an unparsable CSR).
    BadRequest,
    /// The controller could not complete the request (e.g. its disk is full); retry later.
    Unavailable,
    /// (v5) The node this machine claims to be holds a live session: the claim is refused while it
    /// does (retry later; a rebooted machine's old session ends within the idle timeout).
    IdentityInUse,
    /// (v5) The machine claims an existing node without proof bound to it: an operator must approve
    /// the request (`shoalctl nodes pending`, `nodes approve`) or arm it (`nodes reenrol`). Retry
    /// later with the same key.
    AwaitingApproval,
    /// (v5) The certificate is not accepted: its key is not the node's, or its serial was revoked.
    /// The agent forgets it and enrols again.
    CertificateRefused,
}

impl RejectCode {
    /// Whether retrying the same request later can succeed.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            RejectCode::Unavailable | RejectCode::IdentityInUse | RejectCode::AwaitingApproval
        )
    }

    /// The code to send on a session of `protocol`: codes newer than it become the nearest code
    /// that peer knows and treats the same way (retry, or forget the certificate).
    pub fn for_protocol(self, protocol: u16) -> RejectCode {
        match self {
            RejectCode::IdentityInUse | RejectCode::AwaitingApproval if protocol < 5 => {
                RejectCode::Unavailable
            }
            RejectCode::CertificateRefused if protocol < 5 => RejectCode::NodeRevoked,
            other => other,
        }
    }

    /// Whether an agent should stop rather than retry: the token or the version is wrong, and only
    /// an operator can change that. (A removed node is handled apart: it also forgets its
    /// certificate.)
    pub fn is_final_for_agent(self) -> bool {
        matches!(
            self,
            RejectCode::Version
                | RejectCode::TokenUnknown
                | RejectCode::TokenExpired
                | RejectCode::TokenUsedUp
                | RejectCode::TokenRevoked
        )
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// (v4) Largest `bytes` of one [`ReleaseChunk`]: 256 KiB, well below [`crate::MAX_FRAME_LEN`] (1
/// MiB).
pub const MAX_RELEASE_CHUNK: usize = 256 * 1024;

/// (v4) The only frame an agent sends on a release download stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRelease {
    /// The release version.
    pub version: String,
    /// The target triple (the manifest's `target`).
    pub target: String,
    /// Byte offset to start at (non-zero to resume a broken download).
    pub offset: u64,
}

/// (v4) The controller's frames on a release download stream; the stream's end is the end of the
/// binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchReply {
    /// The next bytes of the binary.
    Chunk(ReleaseChunk),
    /// The controller cannot serve the release (unknown version, unreadable file); the stream ends.
    Error(String),
}

/// (v4) A piece of a release binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseChunk {
    /// Where `bytes` start in the binary.
    pub offset: u64,
    /// At most [`MAX_RELEASE_CHUNK`] bytes.
    pub bytes: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_release_chunk_fits_in_a_frame() {
        let reply = FetchReply::Chunk(ReleaseChunk {
            offset: u64::MAX,
            bytes: vec![0xff; MAX_RELEASE_CHUNK],
        });
        let frame = crate::encode_frame(&reply).expect("fits");
        assert!(frame.len() < crate::MAX_FRAME_LEN);
        let (back, used) = crate::decode_frame::<FetchReply>(&frame).expect("decodes");
        assert_eq!((back, used), (reply, frame.len()));
    }

    #[test]
    fn v3_messages_keep_their_encoding() {
        // Appending v4 variants must not move the v3 ones: a v3 peer decodes these bytes.
        let health =
            postcard::to_allocvec(&ControllerMsg::Revoked { reason: "x".into() }).expect("encode");
        assert_eq!(health[0], 4, "Revoked is still variant 4");
        let update = postcard::to_allocvec(&AgentMsg::UpdateAck {
            version: "1".into(),
        })
        .expect("encode");
        assert_eq!(
            update[0], 10,
            "UpdateAck comes after DriveCommandResult (9)"
        );
        let offer = ControllerMsg::UpdateAgent {
            version: "0.2.0".into(),
            release: SignedRelease {
                manifest: vec![b'{'; 300],
                signature: vec![0; 64],
                key_id: "0".repeat(16),
            },
        };
        assert_eq!(
            postcard::to_allocvec(&offer).expect("encode")[0],
            11,
            "UpdateAgent comes after DriveCommand (10)"
        );
        let reboot = ControllerMsg::Reboot {
            reason: "image".into(),
            prefer_kexec: true,
        };
        assert_eq!(
            postcard::to_allocvec(&reboot).expect("encode")[0],
            13,
            "Reboot comes after RevertAgent (12)"
        );
        let ack = AgentMsg::RebootAck {
            method: "kexec -e".into(),
        };
        assert_eq!(
            postcard::to_allocvec(&ack).expect("encode")[0],
            12,
            "RebootAck comes after UpdateReport (11)"
        );
        let step = ControllerMsg::Maintenance(MaintenanceStep {
            run: "r1".into(),
            action: crate::MaintenanceAction::Reboot,
            step: crate::StepKind::Act,
        });
        assert_eq!(
            postcard::to_allocvec(&step).expect("encode")[0],
            14,
            "Maintenance comes after Reboot (13)"
        );
        let result = AgentMsg::MaintenanceResult(MaintenanceResult {
            run: "r1".into(),
            step: crate::StepKind::Act,
            outcome: crate::StepOutcome::Done(String::new()),
        });
        assert_eq!(
            postcard::to_allocvec(&result).expect("encode")[0],
            14,
            "MaintenanceResult comes after RebootRefused (13)"
        );
        let kexec = ControllerMsg::KexecImage(KexecImage {
            version: "v".into(),
            kernel_url: String::new(),
            kernel_sha256: String::new(),
            initrd_url: String::new(),
            initrd_sha256: String::new(),
            cmdline: String::new(),
        });
        assert_eq!(
            postcard::to_allocvec(&kexec).expect("encode")[0],
            15,
            "KexecImage comes after Maintenance (14)"
        );
        let boot = AgentMsg::BootReport(BootReport {
            boot_id: "b".into(),
            image: Some("v2".into()),
            checks: vec![],
        });
        assert_eq!(
            postcard::to_allocvec(&boot).expect("encode")[0],
            15,
            "BootReport comes after MaintenanceResult (14)"
        );
    }

    #[test]
    fn controller_set_round_trips_after_the_v6_variants() {
        let set = ControllerMsg::ControllerSet(ControllerSet {
            controllers: vec![
                ControllerEndpoint {
                    id: "ctl-a".into(),
                    addr: "192.0.2.1:7440".parse().expect("addr"),
                },
                ControllerEndpoint {
                    id: "ctl-b".into(),
                    addr: "[2001:db8::2]:7440".parse().expect("addr"),
                },
            ],
        });
        let frame = crate::encode_frame(&set).expect("fits");
        assert_eq!(
            frame[crate::FRAME_HEADER_LEN],
            21,
            "ControllerSet comes after BackupAck (20)"
        );
        let (back, used) = crate::decode_frame::<ControllerMsg>(&frame).expect("decodes");
        assert_eq!((back, used), (set, frame.len()));
        let ack = ControllerMsg::BackupAck { task: "t".into() };
        assert_eq!(postcard::to_allocvec(&ack).expect("encode")[0], 20);
    }

    #[test]
    fn v4_messages_keep_their_encoding_and_v5_codes_map_down() {
        let rotate = AgentMsg::RotateKey(RotateKeyRequest {
            csr_der: vec![1],
            signature: vec![2],
        });
        assert_eq!(
            postcard::to_allocvec(&rotate).expect("encode")[0],
            16,
            "RotateKey comes after BootReport (15)"
        );
        let ask = ControllerMsg::RotateKey { reason: "r".into() };
        assert_eq!(
            postcard::to_allocvec(&ask).expect("encode")[0],
            16,
            "RotateKey comes after KexecImage (15)"
        );
        let code = postcard::to_allocvec(&RejectCode::IdentityInUse).expect("encode");
        assert_eq!(code, vec![9], "IdentityInUse comes after Unavailable (8)");
        assert_eq!(
            RejectCode::IdentityInUse.for_protocol(4),
            RejectCode::Unavailable
        );
        assert_eq!(
            RejectCode::AwaitingApproval.for_protocol(4),
            RejectCode::Unavailable
        );
        assert_eq!(
            RejectCode::CertificateRefused.for_protocol(4),
            RejectCode::NodeRevoked
        );
        assert_eq!(
            RejectCode::CertificateRefused.for_protocol(5),
            RejectCode::CertificateRefused
        );
        assert!(
            RejectCode::AwaitingApproval.is_transient()
                && !RejectCode::AwaitingApproval.is_final_for_agent()
        );
    }
}
