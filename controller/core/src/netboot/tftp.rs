//! A read-only TFTP server core, sans-IO: RFC 1350 with the option extension (RFC 2347), `blksize`
//! (RFC 2348) and `tsize` (RFC 2349).
//!
//! [`parse`] decodes packets; [`resolve`] maps a requested name to a file under the root and
//! refuses anything that could leave it; [`Transfer`] sends one file in lock step, with `now`
//! passed in for retransmission and giving up on a client that stops answering.

use std::{
    path::{Component, Path, PathBuf},
    time::{Duration, Instant},
};

/// The TFTP port.
pub const PORT: u16 = 69;
/// The block size without options.
pub const DEFAULT_BLKSIZE: usize = 512;
/// The largest block size granted (keeps a block within a 1500-byte Ethernet frame).
pub const MAX_BLKSIZE: usize = 1468;
/// The smallest block size RFC 2348 allows.
const MIN_BLKSIZE: usize = 8;

/// A TFTP error code (RFC 1350).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// 0: not defined, see the message.
    Undefined = 0,
    /// 1: file not found.
    NotFound = 1,
    /// 2: access violation.
    AccessViolation = 2,
    /// 4: illegal TFTP operation.
    IllegalOperation = 4,
    /// 8: option negotiation refused (RFC 2347).
    BadOption = 8,
}

/// Why a packet or request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TftpError {
    /// The packet is shorter than its opcode and fields need.
    #[error("truncated TFTP packet")]
    Truncated,
    /// The opcode is not 1 to 6.
    #[error("unknown TFTP opcode {0}")]
    BadOpcode(u16),
    /// A string field is not terminated or not UTF-8.
    #[error("malformed TFTP string field")]
    BadString,
    /// The requested path is absolute after normalising, has `..`, or is otherwise outside the
    /// root.
    #[error("path {0:?} is outside the TFTP root")]
    Traversal(String),
    /// Only reads are served.
    #[error("TFTP writes are not allowed")]
    WriteRefused,
    /// The transfer mode is not `octet` or `netascii`.
    #[error("unsupported TFTP mode {0:?}")]
    BadMode(String),
}

/// A decoded TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Read request: file name, mode, options (name lower-cased, value).
    Rrq {
        /// Requested file name.
        filename: String,
        /// Transfer mode.
        mode: String,
        /// Options, names lower case.
        options: Vec<(String, String)>,
    },
    /// Write request (refused).
    Wrq {
        /// Requested file name.
        filename: String,
    },
    /// A data block.
    Data {
        /// Block number.
        block: u16,
        /// Payload.
        data: Vec<u8>,
    },
    /// Acknowledgement of a block (0 acknowledges an OACK).
    Ack {
        /// Block number.
        block: u16,
    },
    /// An error; ends the transfer.
    Error {
        /// Code.
        code: u16,
        /// Text.
        message: String,
    },
    /// Option acknowledgement.
    Oack {
        /// Accepted options.
        options: Vec<(String, String)>,
    },
}

fn u16_at(b: &[u8], i: usize) -> Result<u16, TftpError> {
    match b.get(i..i + 2) {
        Some(s) => Ok(u16::from_be_bytes([s[0], s[1]])),
        None => Err(TftpError::Truncated),
    }
}

/// Splits NUL-terminated strings.
fn strings(b: &[u8]) -> Result<Vec<String>, TftpError> {
    if b.is_empty() {
        return Ok(Vec::new());
    }
    if b.last() != Some(&0) {
        return Err(TftpError::BadString);
    }
    b[..b.len() - 1]
        .split(|c| *c == 0)
        .map(|s| {
            std::str::from_utf8(s)
                .map(str::to_owned)
                .map_err(|_| TftpError::BadString)
        })
        .collect()
}

fn pairs(rest: &[String]) -> Vec<(String, String)> {
    rest.chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].to_ascii_lowercase(), c[1].clone()))
        .collect()
}

/// Parses a packet. Never panics, whatever the bytes.
pub fn parse(b: &[u8]) -> Result<Packet, TftpError> {
    let op = u16_at(b, 0)?;
    let body = &b[2..];
    match op {
        1 | 2 => {
            let s = strings(body)?;
            if s.len() < 2 {
                return Err(TftpError::Truncated);
            }
            if op == 2 {
                return Ok(Packet::Wrq {
                    filename: s[0].clone(),
                });
            }
            Ok(Packet::Rrq {
                filename: s[0].clone(),
                mode: s[1].to_ascii_lowercase(),
                options: pairs(&s[2..]),
            })
        }
        3 => Ok(Packet::Data {
            block: u16_at(b, 2)?,
            data: b[4.min(b.len())..].to_vec(),
        }),
        4 => Ok(Packet::Ack {
            block: u16_at(b, 2)?,
        }),
        5 => {
            let code = u16_at(b, 2)?;
            let message = strings(&b[4..])
                .ok()
                .and_then(|s| s.into_iter().next())
                .unwrap_or_default();
            Ok(Packet::Error { code, message })
        }
        6 => Ok(Packet::Oack {
            options: pairs(&strings(body)?),
        }),
        n => Err(TftpError::BadOpcode(n)),
    }
}

/// Encodes a packet.
pub fn encode(p: &Packet) -> Vec<u8> {
    let mut out = Vec::new();
    let put_str = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    };
    match p {
        Packet::Rrq {
            filename,
            mode,
            options,
        } => {
            out.extend_from_slice(&1u16.to_be_bytes());
            put_str(&mut out, filename);
            put_str(&mut out, mode);
            for (k, v) in options {
                put_str(&mut out, k);
                put_str(&mut out, v);
            }
        }
        Packet::Wrq { filename } => {
            out.extend_from_slice(&2u16.to_be_bytes());
            put_str(&mut out, filename);
            put_str(&mut out, "octet");
        }
        Packet::Data { block, data } => {
            out.extend_from_slice(&3u16.to_be_bytes());
            out.extend_from_slice(&block.to_be_bytes());
            out.extend_from_slice(data);
        }
        Packet::Ack { block } => {
            out.extend_from_slice(&4u16.to_be_bytes());
            out.extend_from_slice(&block.to_be_bytes());
        }
        Packet::Error { code, message } => {
            out.extend_from_slice(&5u16.to_be_bytes());
            out.extend_from_slice(&code.to_be_bytes());
            put_str(&mut out, message);
        }
        Packet::Oack { options } => {
            out.extend_from_slice(&6u16.to_be_bytes());
            for (k, v) in options {
                put_str(&mut out, k);
                put_str(&mut out, v);
            }
        }
    }
    out
}

/// An error packet.
pub fn error_packet(code: ErrorCode, message: &str) -> Vec<u8> {
    encode(&Packet::Error {
        code: code as u16,
        message: message.to_owned(),
    })
}

/// Maps a requested name to a path under `root`, refusing any name that could leave it: `..`
/// components, and (after dropping leading slashes, which PXE firmware often sends) anything that
/// is not a plain relative path. Backslashes count as separators (some firmware sends DOS paths).
/// The shell must still refuse symlinks that point outside the root (it canonicalises before
/// opening).
pub fn resolve(root: &Path, name: &str) -> Result<PathBuf, TftpError> {
    let refuse = || TftpError::Traversal(name.to_owned());
    let normal = name.replace('\\', "/");
    let relative = normal.trim_start_matches('/');
    if relative.is_empty() || relative.contains('\0') {
        return Err(refuse());
    }
    let mut out = root.to_path_buf();
    for c in Path::new(relative).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(refuse())
            }
        }
    }
    Ok(out)
}

/// Transfer settings. Defaults: 1 s between retransmissions, 5 retransmissions, then give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferConfig {
    /// Wait for an ACK before sending again (default 1 s).
    pub retransmit_after: Duration,
    /// Retransmissions of one packet before the client is considered gone (default 5).
    pub max_retries: u32,
}

impl Default for TransferConfig {
    fn default() -> Self {
        Self {
            retransmit_after: Duration::from_secs(1),
            max_retries: 5,
        }
    }
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send these bytes to the client.
    Send(Vec<u8>),
    /// Nothing to do (a duplicate or stray packet).
    Nothing,
    /// The transfer is complete.
    Done,
    /// The transfer ended without success; send the bytes (an error packet) if any.
    Failed {
        /// Error packet for the client, if one should go out.
        packet: Option<Vec<u8>>,
        /// Why, for logs.
        reason: String,
    },
}

/// One file being sent.
#[derive(Debug)]
pub struct Transfer {
    data: Vec<u8>,
    blksize: usize,
    /// The block waiting for its ACK, counted from 1 without wrapping (0 while an OACK waits).
    current: u64,
    /// The last packet sent, for retransmission.
    last: Vec<u8>,
    deadline: Instant,
    retries: u32,
    config: TransferConfig,
    done: bool,
}

impl Transfer {
    /// Starts sending `data` for a read request with `options`; returns the transfer and the first
    /// packet (an OACK when the client asked for options this server knows, else block 1).
    pub fn start(
        now: Instant,
        data: Vec<u8>,
        options: &[(String, String)],
        config: TransferConfig,
    ) -> (Transfer, Vec<u8>) {
        let mut accepted = Vec::new();
        let mut blksize = DEFAULT_BLKSIZE;
        for (k, v) in options {
            match k.as_str() {
                "blksize" => {
                    if let Ok(n) = v.parse::<usize>() {
                        if n >= MIN_BLKSIZE {
                            blksize = n.min(MAX_BLKSIZE);
                            accepted.push(("blksize".to_owned(), blksize.to_string()));
                        }
                    }
                }
                "tsize" => accepted.push(("tsize".to_owned(), data.len().to_string())),
                _ => {} // unknown options are ignored (RFC 2347)
            }
        }
        let mut t = Transfer {
            data,
            blksize,
            current: 0,
            last: Vec::new(),
            deadline: now + config.retransmit_after,
            retries: 0,
            config,
            done: false,
        };
        let first = if accepted.is_empty() {
            t.current = 1;
            t.block_packet(1)
        } else {
            encode(&Packet::Oack { options: accepted })
        };
        t.last = first.clone();
        (t, first)
    }

    fn blocks(&self) -> u64 {
        // A file that is a multiple of the block size ends with an empty block.
        (self.data.len() / self.blksize) as u64 + 1
    }

    fn block_packet(&self, n: u64) -> Vec<u8> {
        let start = ((n - 1) as usize)
            .saturating_mul(self.blksize)
            .min(self.data.len());
        let end = start.saturating_add(self.blksize).min(self.data.len());
        encode(&Packet::Data {
            block: n as u16,
            data: self.data[start..end].to_vec(),
        })
    }

    /// The negotiated block size.
    pub fn blksize(&self) -> usize {
        self.blksize
    }

    /// Handles a packet from the client.
    pub fn handle(&mut self, now: Instant, bytes: &[u8]) -> Output {
        if self.done {
            return Output::Nothing;
        }
        match parse(bytes) {
            Ok(Packet::Ack { block }) => {
                // Block numbers wrap at 65536 (files over 32 MiB at 512-byte blocks).
                if block != self.current as u16 {
                    return Output::Nothing; // duplicate or stale ACK: the timer resends if needed
                }
                if self.current == self.blocks() {
                    self.done = true;
                    return Output::Done;
                }
                self.current += 1;
                self.retries = 0;
                self.deadline = now + self.config.retransmit_after;
                self.last = self.block_packet(self.current);
                Output::Send(self.last.clone())
            }
            Ok(Packet::Error { code, message }) => {
                self.done = true;
                Output::Failed {
                    packet: None,
                    reason: format!("client sent error {code}: {message}"),
                }
            }
            Ok(_) => {
                self.done = true;
                Output::Failed {
                    packet: Some(error_packet(
                        ErrorCode::IllegalOperation,
                        "unexpected packet",
                    )),
                    reason: "unexpected packet during transfer".into(),
                }
            }
            Err(e) => {
                self.done = true;
                Output::Failed {
                    packet: Some(error_packet(ErrorCode::IllegalOperation, &e.to_string())),
                    reason: e.to_string(),
                }
            }
        }
    }

    /// When [`Transfer::handle_timeout`] must run next, `None` once finished.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.done).then_some(self.deadline)
    }

    /// Retransmits the last packet, or gives up after [`TransferConfig::max_retries`].
    pub fn handle_timeout(&mut self, now: Instant) -> Output {
        if self.done || now < self.deadline {
            return Output::Nothing;
        }
        if self.retries >= self.config.max_retries {
            self.done = true;
            return Output::Failed {
                packet: Some(error_packet(ErrorCode::Undefined, "timed out")),
                reason: format!(
                    "no acknowledgement for block {} after {} retransmissions",
                    self.current, self.retries
                ),
            };
        }
        self.retries += 1;
        self.deadline = now + self.config.retransmit_after;
        Output::Send(self.last.clone())
    }
}

/// Checks a read request: only octet/netascii reads, a name inside the root.
pub fn check_request(
    root: &Path,
    packet: &Packet,
) -> Result<(PathBuf, Vec<(String, String)>), TftpError> {
    match packet {
        Packet::Rrq {
            filename,
            mode,
            options,
        } => {
            if mode != "octet" && mode != "netascii" {
                return Err(TftpError::BadMode(mode.clone()));
            }
            Ok((resolve(root, filename)?, options.clone()))
        }
        Packet::Wrq { .. } => Err(TftpError::WriteRefused),
        _ => Err(TftpError::BadOpcode(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
        encode(&Packet::Rrq {
            filename: name.into(),
            mode: "octet".into(),
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    fn ack(n: u16) -> Vec<u8> {
        encode(&Packet::Ack { block: n })
    }

    /// Runs a whole transfer as a perfect client; returns the received bytes.
    fn download(data: Vec<u8>, options: &[(&str, &str)]) -> (Vec<u8>, usize) {
        let now = Instant::now();
        let Packet::Rrq { options, .. } = parse(&rrq("f", options)).expect("rrq") else {
            panic!("not rrq")
        };
        let (mut t, first) = Transfer::start(now, data, &options, TransferConfig::default());
        let mut received = Vec::new();
        let mut packet = first;
        let mut packets = 0;
        loop {
            packets += 1;
            let reply = match parse(&packet).expect("server packet") {
                Packet::Oack { .. } => ack(0),
                Packet::Data { block, data } => {
                    received.extend_from_slice(&data);
                    ack(block)
                }
                other => panic!("unexpected {other:?}"),
            };
            match t.handle(now, &reply) {
                Output::Send(p) => packet = p,
                Output::Done => return (received, packets),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn sends_files_with_and_without_options() {
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        assert_eq!(download(data.clone(), &[]).0, data);
        let (got, packets) = download(data.clone(), &[("blksize", "1400"), ("tsize", "0")]);
        assert_eq!(got, data);
        assert_eq!(packets, 1 + 3, "OACK and three blocks");
        // An exact multiple of the block size ends with an empty block.
        let (got, packets) = download(vec![7; 1024], &[]);
        assert_eq!(got.len(), 1024);
        assert_eq!(packets, 3);
        assert_eq!(download(Vec::new(), &[]).0, Vec::<u8>::new());
    }

    #[test]
    fn block_size_is_clamped_and_tsize_reported() {
        let (_, first) = Transfer::start(
            Instant::now(),
            vec![0; 10],
            &[
                ("blksize".into(), "65464".into()),
                ("tsize".into(), "0".into()),
            ],
            TransferConfig::default(),
        );
        let Packet::Oack { options } = parse(&first).expect("oack") else {
            panic!("no oack")
        };
        assert!(options.contains(&("blksize".into(), MAX_BLKSIZE.to_string())));
        assert!(options.contains(&("tsize".into(), "10".into())));
    }

    #[test]
    fn retransmits_then_gives_up_on_a_silent_client() {
        let start = Instant::now();
        let (mut t, first) = Transfer::start(start, vec![1; 2000], &[], TransferConfig::default());
        // A client that acknowledged block 1 and then stopped.
        let Output::Send(second) = t.handle(start, &ack(1)) else {
            panic!("no block 2")
        };
        assert_ne!(first, second);
        assert_eq!(t.handle_timeout(start), Output::Nothing, "not yet due");
        let mut now;
        for _ in 0..5 {
            now = t.poll_timeout().expect("timer");
            assert_eq!(t.handle_timeout(now), Output::Send(second.clone()));
        }
        now = t.poll_timeout().expect("timer");
        assert!(matches!(t.handle_timeout(now), Output::Failed { .. }));
        assert_eq!(t.poll_timeout(), None);
        // Duplicate ACKs are ignored.
        let (mut t, _) = Transfer::start(start, vec![1; 2000], &[], TransferConfig::default());
        assert!(matches!(t.handle(start, &ack(1)), Output::Send(_)));
        assert_eq!(t.handle(start, &ack(1)), Output::Nothing);
    }

    #[test]
    fn path_traversal_is_refused() {
        let root = Path::new("/srv/tftp");
        for bad in [
            "../etc/passwd",
            "/../etc/passwd",
            "a/../../b",
            "..\\..\\windows",
            "",
            "/",
            "a\0b",
            "./../x",
        ] {
            assert!(
                matches!(resolve(root, bad), Err(TftpError::Traversal(_))),
                "{bad:?} accepted"
            );
        }
        assert_eq!(
            resolve(root, "/undionly.kpxe"),
            Ok(PathBuf::from("/srv/tftp/undionly.kpxe"))
        );
        assert_eq!(
            resolve(root, "efi\\ipxe.efi"),
            Ok(PathBuf::from("/srv/tftp/efi/ipxe.efi"))
        );
        assert_eq!(
            resolve(root, "./ipxe.efi"),
            Ok(PathBuf::from("/srv/tftp/ipxe.efi"))
        );
    }

    #[test]
    fn writes_and_odd_modes_are_refused() {
        let root = Path::new("/srv");
        assert_eq!(
            check_request(
                root,
                &parse(&encode(&Packet::Wrq {
                    filename: "x".into()
                }))
                .expect("wrq")
            ),
            Err(TftpError::WriteRefused)
        );
        let mail = Packet::Rrq {
            filename: "x".into(),
            mode: "mail".into(),
            options: vec![],
        };
        assert!(matches!(
            check_request(root, &mail),
            Err(TftpError::BadMode(_))
        ));
    }

    #[test]
    fn malformed_packets_are_errors_not_panics() {
        for bytes in [
            &[][..],
            &[0],
            &[0, 1],
            &[0, 1, b'a'],
            &[0, 9, 0, 0],
            &[0, 4, 1],
            &[0, 1, 0xff, 0, b'o', 0],
        ] {
            assert!(parse(bytes).is_err(), "{bytes:?}");
        }
        let good = rrq("undionly.kpxe", &[("blksize", "1468"), ("tsize", "0")]);
        use rand::{rngs::StdRng, RngCore, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let mut b = good.clone();
            let state = rng.next_u64();
            let len = (state as usize) % (b.len() + 1);
            b.truncate(len);
            if !b.is_empty() {
                let i = (state >> 20) as usize % b.len();
                b[i] = (state >> 40) as u8;
            }
            if let Ok(p) = parse(&b) {
                let _ = check_request(Path::new("/srv"), &p);
                if let Packet::Rrq { options, .. } = p {
                    let (mut t, _) = Transfer::start(
                        Instant::now(),
                        vec![0; 100],
                        &options,
                        TransferConfig::default(),
                    );
                    let _ = t.handle(Instant::now(), &b);
                }
            }
        }
    }
}
