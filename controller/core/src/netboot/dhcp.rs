//! The DHCP side of netboot, sans-IO: parse a request, decide the answer, encode it.
//!
//! Two modes ([`DhcpMode`]):
//! - **Full**: the controller is the network's DHCP server for a range of addresses. It answers
//!   every client (netbooted nodes need an address again once Linux runs), and adds boot
//!   information for PXE clients. Leases are kept in a [`Leases`] table the shell persists.
//! - **Proxy** (PXE proxyDHCP): another server hands out addresses; the controller answers only PXE
//!   clients, with boot information and no address (`yiaddr` 0.0.0.0), on port 67 and on port 4011.
//!
//! The boot file depends on who asks: iPXE (user class `iPXE`) gets the HTTP URL of its per-machine
//! script, so it chainloads instead of loading iPXE again in a loop; other PXE firmware gets an
//! iPXE binary over TFTP chosen by its architecture (option 93): BIOS `undionly.kpxe`, UEFI x86-64
//! `snponly.efi` (see [`BootFiles`]). An architecture without an iPXE binary gets no boot answer.
//!
//! Time is passed in as wall-clock [`UnixMillis`] (leases outlive restarts).

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
};

use dhcproto::{
    v4::{self, DhcpOption, Message, MessageType, Opcode, OptionCode},
    Decodable, Decoder, Encodable,
};
use serde::{Deserialize, Serialize};
use shoal_proto::UnixMillis;

/// The DHCP server port.
pub const SERVER_PORT: u16 = 67;
/// The DHCP client port.
pub const CLIENT_PORT: u16 = 68;
/// The PXE boot-server port, where PXE clients ask a proxyDHCP server directly.
pub const PXE_PORT: u16 = 4011;

/// How long an offered address stays reserved for the client it was offered to.
pub const OFFER_HOLD_MS: u64 = 60_000;

pub use shoal_api::netboot::Mac;

/// Why a packet could not be handled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DhcpError {
    /// The bytes are not a DHCP message.
    #[error("malformed DHCP packet: {0}")]
    Malformed(String),
    /// The message is a BOOTP reply or carries no DHCP message type.
    #[error("not a DHCP request")]
    NotRequest,
    /// The hardware address is not a 6-byte Ethernet address.
    #[error("unsupported hardware address (type {htype}, length {hlen})")]
    UnsupportedHardware {
        /// `htype`.
        htype: u8,
        /// `hlen`.
        hlen: u8,
    },
    /// Text that should be a MAC address is not one.
    #[error("{0:?} is not a MAC address")]
    BadMac(String),
    /// An address range is empty, reversed, or wider than a /16.
    #[error("bad DHCP range {0}")]
    BadRange(String),
}

/// Client system architecture (DHCP option 93, RFC 4578 and the IANA registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// 0: x86 BIOS.
    Bios,
    /// 7 or 9: x86-64 UEFI.
    UefiX64,
    /// Anything else, with its number.
    Other(u16),
}

impl Arch {
    fn from_code(code: u16) -> Arch {
        match code {
            0 => Arch::Bios,
            7 | 9 => Arch::UefiX64,
            n => Arch::Other(n),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arch::Bios => f.write_str("x86 bios"),
            Arch::UefiX64 => f.write_str("x86-64 uefi"),
            Arch::Other(n) => write!(f, "unknown ({n})"),
        }
    }
}

/// What a request says, decoded once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// DHCP message type.
    pub kind: RequestKind,
    /// Transaction id.
    pub xid: u32,
    /// The client's hardware address.
    pub mac: Mac,
    /// `ciaddr`.
    pub ciaddr: Ipv4Addr,
    /// `giaddr` (relay agent), 0.0.0.0 when none.
    pub giaddr: Ipv4Addr,
    /// The broadcast flag.
    pub broadcast: bool,
    /// Option 50.
    pub requested_ip: Option<Ipv4Addr>,
    /// Option 54.
    pub server_id: Option<Ipv4Addr>,
    /// Option 60 starts with `PXEClient`.
    pub pxe: bool,
    /// Option 77 is `iPXE`: the client already is iPXE.
    pub ipxe: bool,
    /// Option 93, when present.
    pub arch: Option<Arch>,
    /// Option 97 (client machine identifier, the firmware's UUID), when present.
    pub machine_uuid: Option<Vec<u8>>,
    /// Option 60 as text, for logs.
    pub vendor_class: Option<String>,
}

/// The DHCP message types a server acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// DHCPDISCOVER.
    Discover,
    /// DHCPREQUEST.
    Request,
    /// DHCPDECLINE.
    Decline,
    /// DHCPRELEASE.
    Release,
    /// DHCPINFORM.
    Inform,
}

/// The fixed BOOTP header, up to and including the magic cookie.
const HEADER_LEN: usize = 240;
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];

/// The options the server reads, with the lengths it accepts.
fn option_len_ok(code: u8, len: usize) -> Option<bool> {
    Some(match code {
        53 => len == 1,                          // message type
        50 | 54 => len == 4,                     // requested address, server identifier
        57 => len == 2,                          // maximum message size
        93 => len >= 2 && len & 1 == 0,          // client architectures (u16 each)
        12 | 55 | 60 | 61 | 77 | 97 => len >= 1, // host name, parameter list, classes, ids
        _ => return None,
    })
}

/// Copies the header and only the options the server reads (with valid lengths), dropping the rest.
///
/// dhcproto 0.14 decodes every option it knows, and some decoders trust the length byte: a
/// `RapidCommit` (80) or `ClientFQDN` (81) of the wrong length trips a `debug_assert!` and a
/// zero-length `BulkLeaseQueryStatusCode` (151) underflows. Options the server never reads are
/// therefore never handed to it; an option split across several entries (RFC 3396) is kept only if
/// each entry's length is valid on its own. Option overload (52) is dropped too, so `sname`/`file`
/// stay opaque.
fn sanitize(bytes: &[u8]) -> Result<Vec<u8>, DhcpError> {
    if bytes.len() < HEADER_LEN {
        return Err(DhcpError::Malformed(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[236..HEADER_LEN] != MAGIC_COOKIE {
        return Err(DhcpError::Malformed("no DHCP magic cookie".into()));
    }
    let mut out = bytes[..HEADER_LEN].to_vec();
    let mut i = HEADER_LEN;
    while i < bytes.len() {
        let code = bytes[i];
        match code {
            0 => i += 1,
            255 => break,
            _ => {
                let Some(&len) = bytes.get(i + 1) else { break };
                let len = usize::from(len);
                let Some(entry) = bytes.get(i..i + 2 + len) else {
                    return Err(DhcpError::Malformed(format!(
                        "option {code} runs past the end of the packet"
                    )));
                };
                if option_len_ok(code, len) == Some(true) {
                    out.extend_from_slice(entry);
                }
                i += 2 + len;
            }
        }
    }
    out.push(255);
    Ok(out)
}

/// Parses a request. Never panics, whatever the bytes.
pub fn parse(bytes: &[u8]) -> Result<Request, DhcpError> {
    let clean = sanitize(bytes)?;
    let msg = Message::decode(&mut Decoder::new(&clean))
        .map_err(|e| DhcpError::Malformed(e.to_string()))?;
    if msg.opcode() != Opcode::BootRequest {
        return Err(DhcpError::NotRequest);
    }
    let htype: u8 = msg.htype().into();
    if htype != 1 || msg.hlen() != 6 {
        return Err(DhcpError::UnsupportedHardware {
            htype,
            hlen: msg.hlen(),
        });
    }
    let mac = Mac(msg
        .chaddr()
        .get(..6)
        .and_then(|s| s.try_into().ok())
        .ok_or(DhcpError::UnsupportedHardware {
            htype,
            hlen: msg.hlen(),
        })?);
    let kind = match msg.opts().msg_type() {
        Some(MessageType::Discover) => RequestKind::Discover,
        Some(MessageType::Request) => RequestKind::Request,
        Some(MessageType::Decline) => RequestKind::Decline,
        Some(MessageType::Release) => RequestKind::Release,
        Some(MessageType::Inform) => RequestKind::Inform,
        _ => return Err(DhcpError::NotRequest),
    };
    let opts = msg.opts();
    let vendor_class = match opts.get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(v)) => Some(String::from_utf8_lossy(v).into_owned()),
        _ => None,
    };
    let ipxe = match opts.get(OptionCode::UserClass) {
        // RFC 3004 encodes length-prefixed items; iPXE sends the bare string "iPXE". Accept both.
        Some(DhcpOption::UserClass(v)) => v == b"iPXE" || v.windows(4).any(|w| w == b"iPXE"),
        _ => false,
    };
    let arch = match opts.get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => Some(Arch::from_code(u16::from(*a))),
        _ => None,
    };
    Ok(Request {
        kind,
        xid: msg.xid(),
        mac,
        ciaddr: msg.ciaddr(),
        giaddr: msg.giaddr(),
        broadcast: msg.flags().broadcast(),
        requested_ip: match opts.get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        },
        server_id: match opts.get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        },
        pxe: vendor_class
            .as_deref()
            .is_some_and(|v| v.starts_with("PXEClient")),
        ipxe,
        arch,
        machine_uuid: match opts.get(OptionCode::ClientMachineIdentifier) {
            Some(DhcpOption::ClientMachineIdentifier(v)) => Some(v.clone()),
            _ => None,
        },
        vendor_class,
    })
}

/// Full server or proxyDHCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhcpMode {
    /// Hand out addresses from `first..=last`.
    Full {
        /// First address of the range.
        first: Ipv4Addr,
        /// Last address of the range.
        last: Ipv4Addr,
    },
    /// Answer PXE clients with boot information only.
    Proxy,
}

/// Parses `FIRST-LAST` into a full-server mode.
pub fn parse_range(s: &str) -> Result<DhcpMode, DhcpError> {
    let bad = || DhcpError::BadRange(s.to_owned());
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let first: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
    let last: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
    let (f, l) = (u32::from(first), u32::from(last));
    if l < f || l - f > 65_535 {
        return Err(bad());
    }
    Ok(DhcpMode::Full { first, last })
}

/// The iPXE binaries offered over TFTP, by architecture. Defaults: `undionly.kpxe` for BIOS,
/// `snponly.efi` for UEFI (it drives the NIC through the firmware's own network driver, so it works
/// on any NIC the firmware can PXE-boot from; Debian's `ipxe.efi` is a symlink to `/boot/ipxe.efi`,
/// outside the TFTP root, and is refused unless copied into a `--tftp-root` of your own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// For option 93 = 0.
    pub bios: String,
    /// For option 93 = 7 or 9.
    pub uefi_x64: String,
}

impl Default for BootFiles {
    fn default() -> Self {
        Self {
            bios: "undionly.kpxe".into(),
            uefi_x64: "snponly.efi".into(),
        }
    }
}

/// The DHCP server's settings. Every field is documented with its default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    /// Full or proxy. No default.
    pub mode: DhcpMode,
    /// The controller's address on the netboot interface: server identifier, TFTP server. No
    /// default.
    pub server_ip: Ipv4Addr,
    /// The netboot interface's netmask (full mode). No default.
    pub netmask: Ipv4Addr,
    /// Default gateway handed to clients (full mode); default none.
    pub router: Option<Ipv4Addr>,
    /// DNS servers handed to clients (full mode); default none.
    pub dns: Vec<Ipv4Addr>,
    /// Lease time (full mode); default 1 hour.
    pub lease_secs: u32,
    /// Base URL of the netboot HTTP server, e.g. `http://192.0.2.1:7442`. No default.
    pub http_base: String,
    /// iPXE binaries per architecture; default [`BootFiles::default`].
    pub boot_files: BootFiles,
}

impl DhcpConfig {
    /// Defaults for the given mode and addresses.
    pub fn new(mode: DhcpMode, server_ip: Ipv4Addr, netmask: Ipv4Addr, http_base: String) -> Self {
        Self {
            mode,
            server_ip,
            netmask,
            router: None,
            dns: Vec::new(),
            lease_secs: 3600,
            http_base,
            boot_files: BootFiles::default(),
        }
    }
}

/// One address lease, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The client.
    pub mac: Mac,
    /// Its address.
    pub ip: Ipv4Addr,
    /// When the lease ends.
    pub expires: UnixMillis,
}

/// Leases by client, indexed by client and by address. The shell loads it from the store at start
/// and writes back what [`Reply::leases`] says changed.
///
/// Memory is bounded by the range: a lease, an offer and a decline each name an address, an address
/// has at most one of each, and a client at most one lease (a client whose expired lease's address
/// is given to another loses it). Declines are also capped at [`MAX_DECLINED`] and pruned once
/// over.
#[derive(Debug, Clone, Default)]
pub struct Leases {
    by_mac: BTreeMap<Mac, Lease>,
    /// The client whose lease names each address.
    by_ip: BTreeMap<Ipv4Addr, Mac>,
    /// Addresses offered but not yet requested: (client, until).
    offered: BTreeMap<Ipv4Addr, (Mac, UnixMillis)>,
    /// Addresses a client declined (in use by someone else), until when.
    declined: BTreeMap<Ipv4Addr, UnixMillis>,
}

/// How long a declined address is kept out of offers.
pub const DECLINE_HOLD_MS: u64 = 10 * 60_000;
/// At most this many declined addresses are remembered; the one whose hold ends first goes first.
pub const MAX_DECLINED: usize = 256;

impl Leases {
    /// A table holding `leases`. Of two leases naming one address, the one that ends later wins.
    pub fn new(leases: impl IntoIterator<Item = Lease>) -> Self {
        let mut t = Self::default();
        let mut all: Vec<Lease> = leases.into_iter().collect();
        all.sort_by_key(|l| l.expires);
        for l in all {
            t.insert(l);
        }
        t
    }

    /// The lease of a client.
    pub fn get(&self, mac: &Mac) -> Option<&Lease> {
        self.by_mac.get(mac)
    }

    /// The lease naming an address.
    pub fn by_ip(&self, ip: Ipv4Addr) -> Option<&Lease> {
        self.by_ip.get(&ip).and_then(|m| self.by_mac.get(m))
    }

    /// All leases.
    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.by_mac.values()
    }

    /// Number of leases.
    pub fn len(&self) -> usize {
        self.by_mac.len()
    }

    /// Whether there is no lease.
    pub fn is_empty(&self) -> bool {
        self.by_mac.is_empty()
    }

    /// Addresses remembered as declined (some may be past their hold).
    pub fn declined_len(&self) -> usize {
        self.declined.len()
    }

    /// Addresses remembered as offered (some may be past their hold).
    pub fn offered_len(&self) -> usize {
        self.offered.len()
    }

    /// The client `ip` is offered to at `now`, if any.
    pub fn offered_to(&self, ip: Ipv4Addr, now: UnixMillis) -> Option<Mac> {
        self.offered
            .get(&ip)
            .filter(|(_, until)| *until > now)
            .map(|(m, _)| *m)
    }

    /// Whether `ip` is declined at `now`.
    pub fn is_declined(&self, ip: Ipv4Addr, now: UnixMillis) -> bool {
        self.declined.get(&ip).is_some_and(|until| *until > now)
    }

    /// Checks that both indexes say the same; for tests and the fuzz target.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.by_mac.len() != self.by_ip.len() {
            return Err(format!(
                "{} leases by client, {} by address",
                self.by_mac.len(),
                self.by_ip.len()
            ));
        }
        for (ip, mac) in &self.by_ip {
            match self.by_mac.get(mac) {
                Some(l) if l.ip == *ip && l.mac == *mac => {}
                other => return Err(format!("{ip} indexed to {mac}, whose lease is {other:?}")),
            }
        }
        if self.declined.len() > MAX_DECLINED {
            return Err(format!("{} declined addresses", self.declined.len()));
        }
        Ok(())
    }

    /// Stores a lease; returns what to persist: the lease, and the deletion of another client's
    /// lease that named the same address (it had expired, or the address would not have been free).
    fn insert(&mut self, lease: Lease) -> Vec<LeaseChange> {
        let mut changes = Vec::new();
        if let Some(old) = self.by_mac.get(&lease.mac) {
            if old.ip != lease.ip && self.by_ip.get(&old.ip) == Some(&lease.mac) {
                self.by_ip.remove(&old.ip);
            }
        }
        if let Some(other) = self.by_ip.insert(lease.ip, lease.mac) {
            if other != lease.mac {
                self.by_mac.remove(&other);
                changes.push(LeaseChange::Delete(other));
            }
        }
        self.by_mac.insert(lease.mac, lease.clone());
        changes.push(LeaseChange::Put(lease));
        changes
    }

    /// Removes a client's lease.
    fn remove(&mut self, mac: &Mac) -> Option<Lease> {
        let lease = self.by_mac.remove(mac)?;
        if self.by_ip.get(&lease.ip) == Some(mac) {
            self.by_ip.remove(&lease.ip);
        }
        Some(lease)
    }

    /// Forgets offers and declines whose hold is over.
    fn prune(&mut self, now: UnixMillis) {
        self.offered.retain(|_, (_, until)| *until > now);
        self.declined.retain(|_, until| *until > now);
    }

    /// Keeps `ip` out of offers until `until`; at the cap, the decline that ends first is dropped.
    fn decline(&mut self, ip: Ipv4Addr, until: UnixMillis) {
        if !self.declined.contains_key(&ip) && self.declined.len() >= MAX_DECLINED {
            if let Some(first) = self
                .declined
                .iter()
                .min_by_key(|(_, u)| **u)
                .map(|(ip, _)| *ip)
            {
                self.declined.remove(&first);
            }
        }
        self.declined.insert(ip, until);
    }

    fn holder(&self, ip: Ipv4Addr, now: UnixMillis) -> Option<Mac> {
        if let Some((mac, until)) = self.offered.get(&ip) {
            if *until > now {
                return Some(*mac);
            }
        }
        self.by_ip(ip).filter(|l| l.expires > now).map(|l| l.mac)
    }

    fn free_for(&self, ip: Ipv4Addr, mac: Mac, now: UnixMillis) -> bool {
        if self.is_declined(ip, now) {
            return false;
        }
        self.holder(ip, now).is_none_or(|m| m == mac)
    }

    /// Picks an address for `mac`: its lease, the one it asks for, or the lowest free one. One pass
    /// over the range with indexed lookups: O(range × log leases).
    fn pick(
        &self,
        mac: Mac,
        wanted: Option<Ipv4Addr>,
        first: Ipv4Addr,
        last: Ipv4Addr,
        now: UnixMillis,
    ) -> Option<Ipv4Addr> {
        let in_range = |ip: Ipv4Addr| (u32::from(first)..=u32::from(last)).contains(&u32::from(ip));
        if let Some(l) = self.by_mac.get(&mac) {
            if in_range(l.ip) && self.free_for(l.ip, mac, now) {
                return Some(l.ip);
            }
        }
        if let Some(ip) = wanted.filter(|ip| in_range(*ip) && self.free_for(*ip, mac, now)) {
            return Some(ip);
        }
        // Expired leases of other clients are reused only when nothing else is free.
        let mut reusable = None;
        for ip in (u32::from(first)..=u32::from(last)).map(Ipv4Addr::from) {
            if !self.free_for(ip, mac, now) {
                continue;
            }
            if self.by_ip.get(&ip).is_none_or(|m| *m == mac) {
                return Some(ip);
            }
            reusable = reusable.or(Some(ip));
        }
        reusable
    }
}

/// Where a reply goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// 255.255.255.255:68 on the netboot interface.
    Broadcast,
    /// A unicast address and port.
    Unicast(SocketAddrV4),
}

/// A lease change the shell must persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseChange {
    /// Store (replace) this lease.
    Put(Lease),
    /// Delete the lease of this client.
    Delete(Mac),
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The encoded DHCP message.
    pub bytes: Vec<u8>,
    /// Where to send it.
    pub to: Destination,
    /// Lease changes to persist, in order, before the reply is sent.
    pub leases: Vec<LeaseChange>,
    /// What the reply is, for logs (`offer 192.0.2.10 boot undionly.kpxe`).
    pub summary: String,
}

/// What the shell tells the core about a PXE client before it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Boot it.
    Admit,
    /// Do not answer its boot request (it is held until an operator admits it).
    Hold,
}

/// The boot file for a PXE client, or why there is none.
pub fn boot_file(config: &DhcpConfig, req: &Request) -> Result<String, Arch> {
    if req.ipxe {
        return Ok(format!(
            "{}/boot/{}.ipxe",
            config.http_base,
            req.mac.dashed()
        ));
    }
    match req.arch.unwrap_or(Arch::Bios) {
        Arch::Bios => Ok(config.boot_files.bios.clone()),
        Arch::UefiX64 => Ok(config.boot_files.uefi_x64.clone()),
        other => Err(other),
    }
}

/// Whether a request is a machine PXE-booting: a PXE or iPXE client's DISCOVER, REQUEST or INFORM
/// (not a DECLINE or RELEASE). The shell records these as sightings, the proof
/// [`super::boot_tokens`] asks for before a boot token is minted for the MAC.
pub fn is_boot_sighting(req: &Request) -> bool {
    (req.pxe || req.ipxe)
        && matches!(
            req.kind,
            RequestKind::Discover | RequestKind::Request | RequestKind::Inform
        )
}

/// The sans-IO DHCP server.
#[derive(Debug)]
pub struct DhcpServer {
    config: DhcpConfig,
    leases: Leases,
}

impl DhcpServer {
    /// A server with the given leases.
    pub fn new(config: DhcpConfig, leases: Leases) -> Self {
        Self { config, leases }
    }

    /// The configuration.
    pub fn config(&self) -> &DhcpConfig {
        &self.config
    }

    /// The lease table.
    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// Answers a request that arrived on `port` (67 or 4011). `admission` is consulted for PXE
    /// clients only. Returns `None` when the request gets no answer.
    pub fn handle(
        &mut self,
        now: UnixMillis,
        port: u16,
        req: &Request,
        admission: Admission,
    ) -> Option<Reply> {
        let boot = if req.pxe && admission == Admission::Admit {
            Some(boot_file(&self.config, req))
        } else {
            None
        };
        // An unknown architecture gets no boot answer; in full mode it still gets an address.
        let boot = match boot {
            Some(Ok(file)) => Some(file),
            _ => None,
        };
        match self.config.mode.clone() {
            DhcpMode::Proxy => self.proxy(port, req, boot?),
            DhcpMode::Full { first, last } => {
                if req.pxe && admission == Admission::Hold {
                    return None;
                }
                self.full(now, req, boot, first, last)
            }
        }
    }

    fn proxy(&self, port: u16, req: &Request, boot: String) -> Option<Reply> {
        let (kind, to) = match (req.kind, port) {
            (RequestKind::Discover, SERVER_PORT) => (MessageType::Offer, Destination::Broadcast),
            // A PXE client asking the boot server directly, from its own address.
            (RequestKind::Request | RequestKind::Inform, PXE_PORT)
                if !req.ciaddr.is_unspecified() =>
            {
                (
                    MessageType::Ack,
                    Destination::Unicast(SocketAddrV4::new(req.ciaddr, CLIENT_PORT)),
                )
            }
            (RequestKind::Request | RequestKind::Inform, PXE_PORT) => {
                (MessageType::Ack, Destination::Broadcast)
            }
            // Everything else is the real DHCP server's business.
            _ => return None,
        };
        let mut msg = self.base(req, kind, Ipv4Addr::UNSPECIFIED);
        self.add_boot(&mut msg, &boot);
        let summary = format!("proxy {kind:?} boot {boot}");
        Some(Reply {
            bytes: encode(&msg)?,
            to,
            leases: Vec::new(),
            summary,
        })
    }

    fn full(
        &mut self,
        now: UnixMillis,
        req: &Request,
        boot: Option<String>,
        first: Ipv4Addr,
        last: Ipv4Addr,
    ) -> Option<Reply> {
        let lease_ms = u64::from(self.config.lease_secs) * 1000;
        let in_range = |ip: Ipv4Addr| (u32::from(first)..=u32::from(last)).contains(&u32::from(ip));
        match req.kind {
            RequestKind::Discover => {
                self.leases.prune(now);
                let ip = self
                    .leases
                    .pick(req.mac, req.requested_ip, first, last, now)?;
                self.leases
                    .offered
                    .insert(ip, (req.mac, UnixMillis(now.0 + OFFER_HOLD_MS)));
                let mut msg = self.base(req, MessageType::Offer, ip);
                self.add_lease_options(&mut msg);
                if let Some(b) = &boot {
                    self.add_boot(&mut msg, b);
                }
                let summary = format!(
                    "offer {ip}{}",
                    boot.as_deref()
                        .map(|b| format!(" boot {b}"))
                        .unwrap_or_default()
                );
                Some(Reply {
                    bytes: encode(&msg)?,
                    to: self.destination(req),
                    leases: Vec::new(),
                    summary,
                })
            }
            RequestKind::Request => {
                if req.server_id.is_some_and(|s| s != self.config.server_ip) {
                    // The client took another server's offer.
                    self.leases.offered.retain(|_, (m, _)| *m != req.mac);
                    return None;
                }
                let wanted = req
                    .requested_ip
                    .or((!req.ciaddr.is_unspecified()).then_some(req.ciaddr))?;
                let in_range = in_range(wanted);
                if !in_range || !self.leases.free_for(wanted, req.mac, now) {
                    if req.server_id.is_none() && !in_range {
                        // INIT-REBOOT for an address we don't manage: stay silent (RFC 2131 4.3.2).
                        return None;
                    }
                    let mut msg = self.base(req, MessageType::Nak, Ipv4Addr::UNSPECIFIED);
                    msg.set_flags(msg.flags().set_broadcast());
                    return Some(Reply {
                        bytes: encode(&msg)?,
                        to: Destination::Broadcast,
                        leases: Vec::new(),
                        summary: format!("nak {wanted}"),
                    });
                }
                self.leases.offered.remove(&wanted);
                let lease = Lease {
                    mac: req.mac,
                    ip: wanted,
                    expires: UnixMillis(now.0.saturating_add(lease_ms)),
                };
                let changes = self.leases.insert(lease);
                let mut msg = self.base(req, MessageType::Ack, wanted);
                self.add_lease_options(&mut msg);
                if let Some(b) = &boot {
                    self.add_boot(&mut msg, b);
                }
                let summary = format!(
                    "ack {wanted}{}",
                    boot.as_deref()
                        .map(|b| format!(" boot {b}"))
                        .unwrap_or_default()
                );
                Some(Reply {
                    bytes: encode(&msg)?,
                    to: self.destination(req),
                    leases: changes,
                    summary,
                })
            }
            RequestKind::Release => {
                let held = self
                    .leases
                    .by_mac
                    .get(&req.mac)
                    .is_some_and(|l| l.ip == req.ciaddr);
                if held && req.server_id.is_none_or(|s| s == self.config.server_ip) {
                    self.leases.remove(&req.mac);
                    // Nothing is sent for a release; the empty reply carries only the lease change.
                    return Some(Reply {
                        bytes: Vec::new(),
                        to: Destination::Broadcast,
                        leases: vec![LeaseChange::Delete(req.mac)],
                        summary: "release".into(),
                    });
                }
                None
            }
            RequestKind::Decline => {
                // Only an address of our range, declined to us, by the client that holds it or was
                // offered it: anyone else's decline would take addresses out of the range for free.
                let ip = req.requested_ip.filter(|ip| in_range(*ip))?;
                if req.server_id.is_some_and(|s| s != self.config.server_ip) {
                    return None;
                }
                let offered = self
                    .leases
                    .offered
                    .get(&ip)
                    .is_some_and(|(m, until)| *m == req.mac && *until > now);
                let leased = self.leases.get(&req.mac).is_some_and(|l| l.ip == ip);
                if !offered && !leased {
                    return None;
                }
                self.leases.prune(now);
                self.leases
                    .decline(ip, UnixMillis(now.0.saturating_add(DECLINE_HOLD_MS)));
                self.leases.offered.remove(&ip);
                let leases = if leased {
                    self.leases.remove(&req.mac);
                    vec![LeaseChange::Delete(req.mac)]
                } else {
                    Vec::new()
                };
                Some(Reply {
                    bytes: Vec::new(),
                    to: Destination::Broadcast,
                    leases,
                    summary: format!("decline {ip}"),
                })
            }
            RequestKind::Inform => {
                if req.ciaddr.is_unspecified() {
                    return None;
                }
                let mut msg = self.base(req, MessageType::Ack, Ipv4Addr::UNSPECIFIED);
                msg.set_ciaddr(req.ciaddr);
                self.add_lease_options(&mut msg);
                msg.opts_mut().remove(OptionCode::AddressLeaseTime);
                if let Some(b) = &boot {
                    self.add_boot(&mut msg, b);
                }
                Some(Reply {
                    bytes: encode(&msg)?,
                    to: Destination::Unicast(SocketAddrV4::new(req.ciaddr, CLIENT_PORT)),
                    leases: Vec::new(),
                    summary: "inform".into(),
                })
            }
        }
    }

    fn destination(&self, req: &Request) -> Destination {
        if !req.giaddr.is_unspecified() {
            Destination::Unicast(SocketAddrV4::new(req.giaddr, SERVER_PORT))
        } else if !req.ciaddr.is_unspecified() {
            Destination::Unicast(SocketAddrV4::new(req.ciaddr, CLIENT_PORT))
        } else {
            // Clients without an address cannot take unicast before ARP knows them; broadcast
            // always works.
            Destination::Broadcast
        }
    }

    fn base(&self, req: &Request, kind: MessageType, yiaddr: Ipv4Addr) -> Message {
        let mut msg = Message::new_with_id(
            req.xid,
            Ipv4Addr::UNSPECIFIED,
            yiaddr,
            Ipv4Addr::UNSPECIFIED,
            req.giaddr,
            &req.mac.0,
        );
        msg.set_opcode(Opcode::BootReply);
        if req.broadcast {
            msg.set_flags(v4::Flags::default().set_broadcast());
        }
        msg.opts_mut().insert(DhcpOption::MessageType(kind));
        msg.opts_mut()
            .insert(DhcpOption::ServerIdentifier(self.config.server_ip));
        msg
    }

    fn add_lease_options(&self, msg: &mut Message) {
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::AddressLeaseTime(self.config.lease_secs));
        opts.insert(DhcpOption::Renewal(self.config.lease_secs / 2));
        opts.insert(DhcpOption::Rebinding(self.config.lease_secs / 8 * 7));
        opts.insert(DhcpOption::SubnetMask(self.config.netmask));
        if let Some(r) = self.config.router {
            opts.insert(DhcpOption::Router(vec![r]));
        }
        if !self.config.dns.is_empty() {
            opts.insert(DhcpOption::DomainNameServer(self.config.dns.clone()));
        }
    }

    fn add_boot(&self, msg: &mut Message, file: &str) {
        msg.set_siaddr(self.config.server_ip);
        msg.set_fname_str(file);
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
        // PXE vendor options: discovery control (6) = 8, "boot the file in this answer, no boot
        // server discovery"; then the end marker.
        opts.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
        opts.insert(DhcpOption::BootfileName(file.as_bytes().to_vec()));
        opts.insert(DhcpOption::TFTPServerName(
            self.config.server_ip.to_string().into_bytes(),
        ));
    }
}

fn encode(msg: &Message) -> Option<Vec<u8>> {
    msg.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    fn config(mode: DhcpMode) -> DhcpConfig {
        DhcpConfig::new(
            mode,
            SERVER,
            Ipv4Addr::new(255, 255, 255, 0),
            "http://192.0.2.1:7442".into(),
        )
    }

    fn full() -> DhcpServer {
        DhcpServer::new(
            config(DhcpMode::Full {
                first: Ipv4Addr::new(192, 0, 2, 10),
                last: Ipv4Addr::new(192, 0, 2, 12),
            }),
            Leases::default(),
        )
    }

    struct Client {
        mac: Mac,
        arch: Option<u16>,
        pxe: bool,
        ipxe: bool,
    }

    fn client(mac: Mac) -> Client {
        Client {
            mac,
            arch: Some(0),
            pxe: true,
            ipxe: false,
        }
    }

    impl Client {
        fn msg(&self, kind: MessageType) -> Message {
            let mut m = Message::new_with_id(
                7,
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::UNSPECIFIED,
                &self.mac.0,
            );
            m.opts_mut().insert(DhcpOption::MessageType(kind));
            if self.pxe {
                m.opts_mut().insert(DhcpOption::ClassIdentifier(
                    b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
                ));
            }
            if let Some(a) = self.arch {
                m.opts_mut()
                    .insert(DhcpOption::ClientSystemArchitecture(a.into()));
            }
            if self.ipxe {
                m.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
            }
            m
        }
        fn req(&self, kind: MessageType, f: impl FnOnce(&mut Message)) -> Request {
            let mut m = self.msg(kind);
            f(&mut m);
            parse(&m.to_vec().expect("encode")).expect("parse")
        }
    }

    fn decode(r: &Reply) -> Message {
        Message::decode(&mut Decoder::new(&r.bytes)).expect("reply decodes")
    }

    fn fname(m: &Message) -> String {
        String::from_utf8_lossy(m.fname().unwrap_or_default())
            .trim_end_matches('\0')
            .to_owned()
    }

    const NOW: UnixMillis = UnixMillis(1_000_000);

    #[test]
    fn full_mode_offers_then_acks_with_the_boot_file_by_architecture() {
        let mut s = full();
        let c = client(MAC);
        let offer = s
            .handle(
                NOW,
                SERVER_PORT,
                &c.req(MessageType::Discover, |_| {}),
                Admission::Admit,
            )
            .expect("offer");
        let m = decode(&offer);
        assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(m.yiaddr(), Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(m.siaddr(), SERVER);
        assert_eq!(fname(&m), "undionly.kpxe");
        assert_eq!(offer.to, Destination::Broadcast);
        let ack = s
            .handle(
                NOW,
                SERVER_PORT,
                &c.req(MessageType::Request, |m| {
                    m.opts_mut()
                        .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(192, 0, 2, 10)));
                    m.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
                }),
                Admission::Admit,
            )
            .expect("ack");
        assert_eq!(decode(&ack).opts().msg_type(), Some(MessageType::Ack));
        assert!(
            matches!(ack.leases.as_slice(), [LeaseChange::Put(Lease { ip, .. })] if *ip == Ipv4Addr::new(192, 0, 2, 10))
        );

        let uefi = Client {
            arch: Some(7),
            ..client(Mac([2, 0, 0, 0, 0, 1]))
        };
        let offer = s
            .handle(
                NOW,
                SERVER_PORT,
                &uefi.req(MessageType::Discover, |_| {}),
                Admission::Admit,
            )
            .expect("offer");
        assert_eq!(fname(&decode(&offer)), "snponly.efi");
        assert_eq!(
            decode(&offer).yiaddr(),
            Ipv4Addr::new(192, 0, 2, 11),
            "the first client's address is leased"
        );
    }

    #[test]
    fn ipxe_is_sent_to_its_http_script_instead_of_looping() {
        let mut s = full();
        let c = Client {
            ipxe: true,
            ..client(MAC)
        };
        let offer = s
            .handle(
                NOW,
                SERVER_PORT,
                &c.req(MessageType::Discover, |_| {}),
                Admission::Admit,
            )
            .expect("offer");
        assert_eq!(
            fname(&decode(&offer)),
            "http://192.0.2.1:7442/boot/52-54-00-12-34-56.ipxe"
        );
    }

    #[test]
    fn unknown_architecture_gets_an_address_but_no_boot_file() {
        let mut s = full();
        let c = Client {
            arch: Some(11),
            ..client(MAC)
        }; // ARM 64-bit UEFI: no iPXE binary configured
        let offer = s
            .handle(
                NOW,
                SERVER_PORT,
                &c.req(MessageType::Discover, |_| {}),
                Admission::Admit,
            )
            .expect("offer");
        let m = decode(&offer);
        assert_eq!(m.yiaddr(), Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(fname(&m), "");
        assert!(m.opts().get(OptionCode::BootfileName).is_none());
        let mut p = DhcpServer::new(config(DhcpMode::Proxy), Leases::default());
        assert!(p
            .handle(
                NOW,
                SERVER_PORT,
                &c.req(MessageType::Discover, |_| {}),
                Admission::Admit
            )
            .is_none());
        assert_eq!(
            boot_file(p.config(), &c.req(MessageType::Discover, |_| {})),
            Err(Arch::Other(11))
        );
    }

    #[test]
    fn held_pxe_clients_get_no_answer_but_plain_clients_do() {
        let mut s = full();
        assert!(s
            .handle(
                NOW,
                SERVER_PORT,
                &client(MAC).req(MessageType::Discover, |_| {}),
                Admission::Hold
            )
            .is_none());
        let plain = Client {
            pxe: false,
            arch: None,
            ..client(MAC)
        };
        let offer = s
            .handle(
                NOW,
                SERVER_PORT,
                &plain.req(MessageType::Discover, |_| {}),
                Admission::Hold,
            )
            .expect("offer");
        assert_eq!(fname(&decode(&offer)), "");
    }

    #[test]
    fn range_exhaustion_and_lease_reuse() {
        let mut s = full();
        for i in 0..3u8 {
            let c = client(Mac([2, 0, 0, 0, 0, i]));
            let ip = Ipv4Addr::new(192, 0, 2, 10 + i);
            s.handle(
                NOW,
                SERVER_PORT,
                &c.req(MessageType::Request, |m| {
                    m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
                }),
                Admission::Admit,
            )
            .expect("ack");
        }
        let late = client(Mac([2, 0, 0, 0, 0, 9]));
        assert!(
            s.handle(
                NOW,
                SERVER_PORT,
                &late.req(MessageType::Discover, |_| {}),
                Admission::Admit
            )
            .is_none(),
            "range full"
        );
        // The same client asking again gets its own address back.
        let again = s
            .handle(
                NOW,
                SERVER_PORT,
                &client(Mac([2, 0, 0, 0, 0, 1])).req(MessageType::Discover, |_| {}),
                Admission::Admit,
            )
            .expect("offer");
        assert_eq!(decode(&again).yiaddr(), Ipv4Addr::new(192, 0, 2, 11));
        // After the leases expire (1 h), a new client gets one.
        let later = UnixMillis(NOW.0 + 3_600_001);
        assert!(s
            .handle(
                later,
                SERVER_PORT,
                &late.req(MessageType::Discover, |_| {}),
                Admission::Admit
            )
            .is_some());
    }

    #[test]
    fn request_for_a_taken_address_is_refused_and_other_servers_offers_are_left_alone() {
        let mut s = full();
        let a = client(Mac([2, 0, 0, 0, 0, 1]));
        let b = client(Mac([2, 0, 0, 0, 0, 2]));
        let ip = Ipv4Addr::new(192, 0, 2, 10);
        s.handle(
            NOW,
            SERVER_PORT,
            &a.req(MessageType::Request, |m| {
                m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
            }),
            Admission::Admit,
        )
        .expect("ack");
        let nak = s
            .handle(
                NOW,
                SERVER_PORT,
                &b.req(MessageType::Request, |m| {
                    m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
                    m.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
                }),
                Admission::Admit,
            )
            .expect("nak");
        assert_eq!(decode(&nak).opts().msg_type(), Some(MessageType::Nak));
        let other = s.handle(
            NOW,
            SERVER_PORT,
            &b.req(MessageType::Request, |m| {
                m.opts_mut()
                    .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(192, 0, 2, 11)));
                m.opts_mut()
                    .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(192, 0, 2, 254)));
            }),
            Admission::Admit,
        );
        assert!(other.is_none());
    }

    #[test]
    fn release_deletes_the_lease() {
        let mut s = full();
        let c = client(MAC);
        let ip = Ipv4Addr::new(192, 0, 2, 10);
        s.handle(
            NOW,
            SERVER_PORT,
            &c.req(MessageType::Request, |m| {
                m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
            }),
            Admission::Admit,
        );
        let r = s.handle(
            NOW,
            SERVER_PORT,
            &c.req(MessageType::Release, |m| {
                m.set_ciaddr(ip);
            }),
            Admission::Admit,
        );
        assert_eq!(r.map(|r| r.leases), Some(vec![LeaseChange::Delete(MAC)]));
        assert!(s.leases().get(&MAC).is_none());
    }

    fn request_ip(s: &mut DhcpServer, c: &Client, ip: Ipv4Addr, now: UnixMillis) -> Option<Reply> {
        s.handle(
            now,
            SERVER_PORT,
            &c.req(MessageType::Request, |m| {
                m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
            }),
            Admission::Admit,
        )
    }

    fn decline(s: &mut DhcpServer, c: &Client, ip: Ipv4Addr, now: UnixMillis) -> Option<Reply> {
        s.handle(
            now,
            SERVER_PORT,
            &c.req(MessageType::Decline, |m| {
                m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
                m.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
            }),
            Admission::Admit,
        )
    }

    #[test]
    fn declines_outside_the_range_or_from_another_client_are_ignored() {
        let mut s = full();
        let (a, b) = (
            client(Mac([2, 0, 0, 0, 0, 1])),
            client(Mac([2, 0, 0, 0, 0, 2])),
        );
        let ip = Ipv4Addr::new(192, 0, 2, 10);
        request_ip(&mut s, &a, ip, NOW).expect("ack");
        // Outside the range: nothing remembered, whoever asks.
        for outside in [
            Ipv4Addr::new(192, 0, 2, 9),
            Ipv4Addr::new(192, 0, 2, 13),
            Ipv4Addr::new(10, 0, 0, 1),
        ] {
            assert!(decline(&mut s, &a, outside, NOW).is_none(), "{outside}");
        }
        // B neither holds nor was offered .10: its decline changes nothing.
        assert!(decline(&mut s, &b, ip, NOW).is_none());
        assert_eq!(s.leases().declined_len(), 0);
        assert_eq!(
            s.leases().get(&a.mac).map(|l| l.ip),
            Some(ip),
            "A keeps its lease"
        );
        // A decline meant for another server is not ours either.
        let other = s.handle(
            NOW,
            SERVER_PORT,
            &a.req(MessageType::Decline, |m| {
                m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
                m.opts_mut()
                    .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(192, 0, 2, 254)));
            }),
            Admission::Admit,
        );
        assert!(other.is_none());
        assert_eq!(s.leases().declined_len(), 0);
        // A lease from before the range changed, outside it now: its holder's decline is still
        // ignored.
        let old = Lease {
            mac: b.mac,
            ip: Ipv4Addr::new(192, 0, 2, 200),
            expires: UnixMillis(NOW.0 + 60_000),
        };
        let mut s = DhcpServer::new(s.config().clone(), Leases::new([old.clone()]));
        assert!(decline(&mut s, &b, old.ip, NOW).is_none());
        assert_eq!(
            (s.leases().declined_len(), s.leases().get(&b.mac)),
            (0, Some(&old))
        );
    }

    #[test]
    fn a_holders_decline_drops_its_lease_and_keeps_the_address_out_until_the_hold_ends() {
        let mut s = full();
        let (a, b) = (
            client(Mac([2, 0, 0, 0, 0, 1])),
            client(Mac([2, 0, 0, 0, 0, 2])),
        );
        let ip = Ipv4Addr::new(192, 0, 2, 10);
        request_ip(&mut s, &a, ip, NOW).expect("ack");
        let r = decline(&mut s, &a, ip, NOW).expect("decline accepted");
        assert_eq!(r.leases, vec![LeaseChange::Delete(a.mac)]);
        assert!(s.leases().get(&a.mac).is_none());
        // Nobody is offered .10 while it is declined, not even A.
        let offer = s
            .handle(
                NOW,
                SERVER_PORT,
                &b.req(MessageType::Discover, |_| {}),
                Admission::Admit,
            )
            .expect("offer");
        assert_eq!(decode(&offer).yiaddr(), Ipv4Addr::new(192, 0, 2, 11));
        // The offeree may decline an offered address too.
        let r = decline(&mut s, &b, Ipv4Addr::new(192, 0, 2, 11), NOW).expect("offeree's decline");
        assert!(r.leases.is_empty());
        assert_eq!(s.leases().declined_len(), 2);
        // After the hold, the declines are pruned and .10 is offered again.
        let later = UnixMillis(NOW.0 + DECLINE_HOLD_MS + 1);
        let offer = s
            .handle(
                later,
                SERVER_PORT,
                &a.req(MessageType::Discover, |_| {}),
                Admission::Admit,
            )
            .expect("offer");
        assert_eq!(decode(&offer).yiaddr(), ip);
        assert_eq!(s.leases().declined_len(), 0, "pruned");
    }

    #[test]
    fn declined_addresses_are_capped() {
        // A /20 range: more addresses than MAX_DECLINED.
        let (first, last) = (Ipv4Addr::new(10, 1, 0, 0), Ipv4Addr::new(10, 1, 15, 255));
        let mut s = DhcpServer::new(config(DhcpMode::Full { first, last }), Leases::default());
        for i in 0..(MAX_DECLINED as u32 + 100) {
            let ip = Ipv4Addr::from(u32::from(first) + i);
            let c = client(Mac([2, 0, 0, 1, (i >> 8) as u8, i as u8]));
            let now = UnixMillis(NOW.0 + u64::from(i));
            request_ip(&mut s, &c, ip, now).expect("ack");
            decline(&mut s, &c, ip, now).expect("decline");
            assert!(s.leases().declined_len() <= MAX_DECLINED);
        }
        assert_eq!(s.leases().declined_len(), MAX_DECLINED);
        let now = UnixMillis(NOW.0 + MAX_DECLINED as u64 + 100);
        assert!(
            !s.leases().is_declined(first, now),
            "the oldest decline went first"
        );
        assert!(s.leases().is_declined(
            Ipv4Addr::from(u32::from(first) + MAX_DECLINED as u32 + 99),
            now
        ));
        s.leases().check_invariants().expect("indexes agree");
    }

    #[test]
    fn an_expired_lease_given_to_another_client_is_deleted_with_it() {
        let mut s = full();
        let (a, b, c) = (
            client(Mac([2, 0, 0, 0, 0, 1])),
            client(Mac([2, 0, 0, 0, 0, 2])),
            client(Mac([2, 0, 0, 0, 0, 3])),
        );
        for (cl, ip) in [(&a, 10), (&b, 11), (&c, 12)] {
            request_ip(&mut s, cl, Ipv4Addr::new(192, 0, 2, ip), NOW).expect("ack");
        }
        let later = UnixMillis(NOW.0 + 3_600_001);
        let d = client(Mac([2, 0, 0, 0, 0, 4]));
        let r = request_ip(&mut s, &d, Ipv4Addr::new(192, 0, 2, 11), later).expect("ack");
        assert_eq!(
            r.leases[0],
            LeaseChange::Delete(b.mac),
            "B's stale lease goes to disk as a deletion"
        );
        assert!(matches!(r.leases[1], LeaseChange::Put(Lease { mac, .. }) if mac == d.mac));
        assert_eq!(s.leases().len(), 3);
        assert_eq!(
            s.leases()
                .by_ip(Ipv4Addr::new(192, 0, 2, 11))
                .map(|l| l.mac),
            Some(d.mac)
        );
        s.leases().check_invariants().expect("indexes agree");
        // Loading two leases for one address keeps the one that ends later.
        let t = Leases::new([
            Lease {
                mac: a.mac,
                ip: Ipv4Addr::new(192, 0, 2, 10),
                expires: UnixMillis(9),
            },
            Lease {
                mac: b.mac,
                ip: Ipv4Addr::new(192, 0, 2, 10),
                expires: UnixMillis(5),
            },
        ]);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.by_ip(Ipv4Addr::new(192, 0, 2, 10)).map(|l| l.mac),
            Some(a.mac)
        );
    }

    #[test]
    fn boot_sightings_are_pxe_or_ipxe_discover_request_inform() {
        let pxe = client(MAC);
        let plain = Client {
            pxe: false,
            arch: None,
            ..client(MAC)
        };
        let ipxe_only = Client {
            pxe: false,
            ipxe: true,
            ..client(MAC)
        };
        assert!(is_boot_sighting(&pxe.req(MessageType::Discover, |_| {})));
        assert!(is_boot_sighting(&pxe.req(MessageType::Request, |_| {})));
        assert!(is_boot_sighting(
            &ipxe_only.req(MessageType::Discover, |_| {})
        ));
        assert!(
            !is_boot_sighting(&plain.req(MessageType::Discover, |_| {})),
            "an OS's DHCP client is no PXE boot"
        );
        assert!(!is_boot_sighting(&pxe.req(MessageType::Decline, |_| {})));
        assert!(!is_boot_sighting(&pxe.req(MessageType::Release, |_| {})));
    }

    #[test]
    fn proxy_mode_answers_only_pxe_clients_and_gives_no_address() {
        let mut s = DhcpServer::new(config(DhcpMode::Proxy), Leases::default());
        let plain = Client {
            pxe: false,
            arch: None,
            ..client(MAC)
        };
        assert!(s
            .handle(
                NOW,
                SERVER_PORT,
                &plain.req(MessageType::Discover, |_| {}),
                Admission::Admit
            )
            .is_none());
        let offer = s
            .handle(
                NOW,
                SERVER_PORT,
                &client(MAC).req(MessageType::Discover, |_| {}),
                Admission::Admit,
            )
            .expect("offer");
        let m = decode(&offer);
        assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(fname(&m), "undionly.kpxe");
        assert!(
            matches!(m.opts().get(OptionCode::ClassIdentifier), Some(DhcpOption::ClassIdentifier(v)) if v == b"PXEClient")
        );
        // A REQUEST on port 67 belongs to the real server.
        assert!(s
            .handle(
                NOW,
                SERVER_PORT,
                &client(MAC).req(MessageType::Request, |_| {}),
                Admission::Admit
            )
            .is_none());
        // On port 4011 the proxy answers, to the client's address.
        let ack = s
            .handle(
                NOW,
                PXE_PORT,
                &client(MAC).req(MessageType::Request, |m| {
                    m.set_ciaddr(Ipv4Addr::new(192, 0, 2, 50));
                }),
                Admission::Admit,
            )
            .expect("ack");
        assert_eq!(
            ack.to,
            Destination::Unicast(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 50), CLIENT_PORT))
        );
    }

    #[test]
    fn malformed_packets_are_errors_not_panics() {
        assert!(parse(&[]).is_err());
        assert!(parse(&[1; 10]).is_err());
        let good = client(MAC)
            .msg(MessageType::Discover)
            .to_vec()
            .expect("encode");
        for cut in 0..good.len() {
            let _ = parse(&good[..cut]);
        }
        // Deterministic mutations of a valid packet.
        use rand::{rngs::StdRng, RngCore, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0x2545_f491_4f6c_dd1d);
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..4 {
                let state = rng.next_u64();
                let i = (state as usize) % bytes.len();
                bytes[i] = (state >> 32) as u8;
            }
            if let Ok(req) = parse(&bytes) {
                let mut s = full();
                let _ = s.handle(NOW, SERVER_PORT, &req, Admission::Admit);
                let mut p = DhcpServer::new(config(DhcpMode::Proxy), Leases::default());
                let _ = p.handle(NOW, PXE_PORT, &req, Admission::Admit);
            }
        }
        // Options dhcproto 0.14 would trip over are dropped before it sees them.
        let mut tricky = good.clone();
        tricky.pop(); // end marker
        tricky.extend_from_slice(&[80, 1, 0, 81, 1, 0, 151, 0, 94, 0, 255]);
        assert!(parse(&tricky).is_ok());
        // A reply (BOOTREPLY) is not a request.
        let mut reply = client(MAC).msg(MessageType::Offer);
        reply.set_opcode(Opcode::BootReply);
        assert_eq!(
            parse(&reply.to_vec().expect("encode")),
            Err(DhcpError::NotRequest)
        );
    }

    #[test]
    fn ranges_and_macs_parse() {
        assert!(parse_range("10.0.0.10-10.0.0.20").is_ok());
        assert!(parse_range("10.0.0.20-10.0.0.10").is_err());
        assert!(parse_range("10.0.0.1").is_err());
        assert_eq!("52-54-00-12-34-56".parse::<Mac>(), Ok(MAC));
        assert_eq!("52:54:00:12:34:56".parse::<Mac>(), Ok(MAC));
        assert!("52:54:00".parse::<Mac>().is_err());
        assert_eq!(MAC.dashed(), "52-54-00-12-34-56");
    }
}
