//! The overlay datagram: one Ethernet frame of one network, or one fragment of one, per QUIC
//! datagram.
//!
//! Layout, all integers big-endian:
//!
//! ```text
//! byte 0        high nibble: wire version (1); low nibble: kind (0 = whole frame, 1 = fragment)
//! bytes 1..5    NetworkId (u32)
//! whole frame:  bytes 5..   the Ethernet frame (dst MAC, src MAC, ethertype, payload)
//! fragment:     bytes 5..7  fragment id (u16, per sender, wrapping)
//!               byte 7      index (0-based)
//!               byte 8      count (2..=MAX_FRAGMENTS)
//!               bytes 9..   the chunk (non-empty)
//! ```
//!
//! Fragmentation exists because a QUIC datagram must fit one UDP packet of the path's MTU, while
//! the overlay's TAP MTU is set per network by the operator (usually 1500) and cannot follow each
//! path's MTU. Splitting here keeps the TAP MTU independent of the paths at the cost of reassembly
//! state, which [`Reassembler`] bounds in entries, bytes and time because its input comes from
//! peers.
//!
//! Everything here is sans-IO: bytes in, bytes out, `now` passed in.
//!
//! A datagram carries no length of the whole frame, so a fragment cut short still decodes. That is
//! deliberate: QUIC datagrams are authenticated and delivered whole or not at all, so only the peer
//! itself can send a short fragment, and a peer can send any frame it likes anyway. What matters is
//! that no input makes us panic, allocate without bound, or deliver a frame outside the size
//! limits.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use shoal_proto::NetworkId;

/// The wire version in the high nibble of byte 0.
pub const WIRE_VERSION: u8 = 1;
/// Bytes before the frame in a whole-frame datagram: version/kind and network.
pub const FRAME_HEADER_LEN: usize = 5;
/// Bytes before the chunk in a fragment datagram: version/kind, network, id, index and count.
pub const FRAGMENT_HEADER_LEN: usize = 9;
/// Destination MAC, source MAC and ethertype: the shortest frame worth switching.
pub const ETHERNET_HEADER_LEN: usize = 14;
/// The largest Ethernet frame carried: a 1500-byte overlay MTU plus the 14-byte header and a 4-byte
/// VLAN tag, with headroom. Jumbo frames are not supported on the overlay.
pub const MAX_ETHERNET_FRAME: usize = 1600;
/// The most fragments one frame may be split into; beyond that the path MTU is too small to be
/// useful.
pub const MAX_FRAGMENTS: u8 = 8;

const KIND_FRAME: u8 = 0;
const KIND_FRAGMENT: u8 = 1;

/// Why a datagram could not be decoded, encoded or reassembled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The datagram ends inside its header.
    #[error("datagram truncated inside its header")]
    Truncated,
    /// The datagram was written by a wire version we do not speak.
    #[error("unknown overlay wire version {0}")]
    UnknownVersion(u8),
    /// The datagram's kind nibble is neither whole frame nor fragment.
    #[error("unknown overlay datagram kind {0}")]
    UnknownKind(u8),
    /// The Ethernet frame is shorter than its 14-byte header.
    #[error("ethernet frame of {len} bytes is shorter than its header")]
    FrameTooShort {
        /// Its length.
        len: usize,
    },
    /// The Ethernet frame (whole or reassembled) is longer than [`MAX_ETHERNET_FRAME`].
    #[error("ethernet frame of {len} bytes exceeds the {MAX_ETHERNET_FRAME}-byte limit")]
    FrameTooLong {
        /// Its length (for a reassembly, the length reached when the limit was crossed).
        len: usize,
    },
    /// A fragment's header is inconsistent: index not below count, count outside
    /// 2..=[`MAX_FRAGMENTS`], or an empty chunk.
    #[error("malformed fragment header")]
    BadFragment,
    /// The path's datagram size cannot carry even one byte of a fragment.
    #[error("datagram size {max_datagram} is too small to carry a fragment")]
    DatagramTooSmall {
        /// The size we were given.
        max_datagram: usize,
    },
    /// The frame would need more than [`MAX_FRAGMENTS`] fragments at this datagram size.
    #[error("frame would need {needed} fragments (limit {MAX_FRAGMENTS})")]
    TooManyFragments {
        /// How many it would need.
        needed: usize,
    },
}

impl WireError {
    /// A stable snake_case label for drop counters and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            WireError::Truncated => "truncated",
            WireError::UnknownVersion(_) => "unknown_version",
            WireError::UnknownKind(_) => "unknown_kind",
            WireError::FrameTooShort { .. } => "frame_too_short",
            WireError::FrameTooLong { .. } => "frame_too_long",
            WireError::BadFragment => "bad_fragment",
            WireError::DatagramTooSmall { .. } => "datagram_too_small",
            WireError::TooManyFragments { .. } => "too_many_fragments",
        }
    }
}

/// A decoded datagram, borrowing from the received bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// A whole Ethernet frame, already checked against the size limits.
    Frame {
        /// The network it belongs to.
        network: NetworkId,
        /// The frame.
        frame: &'a [u8],
    },
    /// One piece of a frame; feed it to the sender's [`Reassembler`].
    Fragment {
        /// The network it belongs to.
        network: NetworkId,
        /// The sender's fragment id, shared by all pieces of one frame.
        id: u16,
        /// Which piece, below `count`.
        index: u8,
        /// How many pieces the frame has.
        count: u8,
        /// This piece's bytes (non-empty).
        chunk: &'a [u8],
    },
}

fn check_frame_len(len: usize) -> Result<(), WireError> {
    if len < ETHERNET_HEADER_LEN {
        Err(WireError::FrameTooShort { len })
    } else if len > MAX_ETHERNET_FRAME {
        Err(WireError::FrameTooLong { len })
    } else {
        Ok(())
    }
}

fn check_fragment(index: u8, count: u8, chunk: &[u8]) -> Result<(), WireError> {
    if !(2..=MAX_FRAGMENTS).contains(&count) || index >= count || chunk.is_empty() {
        Err(WireError::BadFragment)
    } else {
        Ok(())
    }
}

/// Encodes `frame` of `network` into as few datagrams of at most `max_datagram` bytes as possible.
///
/// A frame that fits goes whole. Otherwise it is split into the fewest fragments that fit, of sizes
/// differing by at most one byte (so no runt last fragment), under a fresh id taken from
/// `next_fragment_id`, which is advanced (wrapping) only when a frame is fragmented. The datagrams
/// share one allocation. The datapath uses [`encode_into`], which reuses a buffer across frames.
pub fn encode(
    network: NetworkId,
    frame: &[u8],
    max_datagram: usize,
    next_fragment_id: &mut u16,
) -> Result<Vec<Bytes>, WireError> {
    let mut buf = BytesMut::new();
    let mut out = Vec::with_capacity(1);
    encode_into(
        network,
        frame,
        max_datagram,
        next_fragment_id,
        &mut buf,
        |d| out.push(d),
    )?;
    Ok(out)
}

/// [`encode`], writing the datagrams into `buf` and handing each to `out` as it is cut off.
///
/// The datagrams are split off `buf` (`BytesMut::split` + `freeze`), so frames encoded into one
/// buffer share its allocation: a caller that reserves room for a whole TAP read once (see
/// [`BytesMut::reserve`], which reuses the allocation in place once every datagram cut from it has
/// been dropped) pays no allocation per frame. Nothing is written or handed out on error.
pub fn encode_into(
    network: NetworkId,
    frame: &[u8],
    max_datagram: usize,
    next_fragment_id: &mut u16,
    buf: &mut BytesMut,
    mut out: impl FnMut(Bytes),
) -> Result<(), WireError> {
    check_frame_len(frame.len())?;
    let network = network.0.to_be_bytes();
    if FRAME_HEADER_LEN + frame.len() <= max_datagram {
        buf.reserve(FRAME_HEADER_LEN + frame.len());
        buf.put_u8(WIRE_VERSION << 4 | KIND_FRAME);
        buf.put_slice(&network);
        buf.put_slice(frame);
        out(buf.split().freeze());
        return Ok(());
    }
    let capacity = max_datagram.saturating_sub(FRAGMENT_HEADER_LEN);
    if capacity == 0 {
        return Err(WireError::DatagramTooSmall { max_datagram });
    }
    // At least 2, since the frame did not fit whole and a fragment carries less than a whole
    // datagram.
    let count = frame.len().div_ceil(capacity);
    let count_u8 = match u8::try_from(count) {
        Ok(c) if c <= MAX_FRAGMENTS => c,
        _ => return Err(WireError::TooManyFragments { needed: count }),
    };
    let id = *next_fragment_id;
    *next_fragment_id = id.wrapping_add(1);
    // The first `longer` chunks get one extra byte; every chunk is non-empty because count <= len.
    let base = frame.len() / count;
    let longer = frame.len() % count;
    buf.reserve(count * FRAGMENT_HEADER_LEN + frame.len());
    let mut rest = frame;
    for index in 0..count_u8 {
        let len = base + usize::from(usize::from(index) < longer);
        let (chunk, tail) = rest.split_at(len.min(rest.len()));
        rest = tail;
        buf.put_u8(WIRE_VERSION << 4 | KIND_FRAGMENT);
        buf.put_slice(&network);
        buf.put_u16(id);
        buf.put_u8(index);
        buf.put_u8(count_u8);
        buf.put_slice(chunk);
        out(buf.split().freeze());
    }
    debug_assert!(rest.is_empty());
    Ok(())
}

/// Decodes one received datagram. Checks everything that can be checked without other datagrams:
/// header, version, kind, whole-frame size limits and fragment header consistency.
pub fn decode(datagram: &[u8]) -> Result<Datagram<'_>, WireError> {
    let Some((&[first, n0, n1, n2, n3], rest)) = datagram.split_first_chunk::<FRAME_HEADER_LEN>()
    else {
        return Err(WireError::Truncated);
    };
    let version = first >> 4;
    if version != WIRE_VERSION {
        return Err(WireError::UnknownVersion(version));
    }
    let network = NetworkId(u32::from_be_bytes([n0, n1, n2, n3]));
    match first & 0x0f {
        KIND_FRAME => {
            check_frame_len(rest.len())?;
            Ok(Datagram::Frame {
                network,
                frame: rest,
            })
        }
        KIND_FRAGMENT => {
            let Some((&[i0, i1, index, count], chunk)) = rest.split_first_chunk::<4>() else {
                return Err(WireError::Truncated);
            };
            check_fragment(index, count, chunk)?;
            Ok(Datagram::Fragment {
                network,
                id: u16::from_be_bytes([i0, i1]),
                index,
                count,
                chunk,
            })
        }
        kind => Err(WireError::UnknownKind(kind)),
    }
}

/// A whole Ethernet frame out of [`Reassembler::receive`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFrame<'a> {
    /// The network it belongs to; the frame must only ever be handled as part of this network.
    pub network: NetworkId,
    /// The frame: borrowed from the datagram when it came whole, owned when reassembled.
    pub frame: Cow<'a, [u8]>,
}

/// Limits of one [`Reassembler`].
#[derive(Debug, Clone)]
pub struct ReassemblyConfig {
    /// Frames in progress at once; a new one beyond this evicts the oldest. Default 16: a peer
    /// rarely has more than a few fragmented frames in flight, as fragments of one frame are sent
    /// back to back.
    pub max_in_progress: usize,
    /// How long an incomplete frame is kept. Default 1 s: far above any path's reordering window,
    /// and short enough that a lost fragment does not pin memory or collide with a reused id.
    pub timeout: Duration,
}

impl Default for ReassemblyConfig {
    fn default() -> Self {
        ReassemblyConfig {
            max_in_progress: 16,
            timeout: Duration::from_secs(1),
        }
    }
}

/// What a [`Reassembler`] has done, for observability.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReassemblyCounters {
    /// Frames completed and returned.
    pub completed: u64,
    /// Incomplete frames dropped because their timeout passed.
    pub expired: u64,
    /// Incomplete frames dropped to make room for a newer one.
    pub evicted: u64,
    /// Fragments ignored because the same piece had already arrived.
    pub duplicates: u64,
    /// Incomplete frames discarded because a fragment contradicted them (another count, or other
    /// bytes for a piece already held): the sender reused the id, so the old pieces are stale.
    pub resets: u64,
}

#[derive(Debug)]
struct InProgress {
    network: NetworkId,
    id: u16,
    count: u8,
    started: Instant,
    chunks: [Option<Box<[u8]>>; MAX_FRAGMENTS as usize],
    received: u8,
    bytes: usize,
}

impl InProgress {
    fn new(network: NetworkId, id: u16, count: u8, started: Instant) -> Self {
        InProgress {
            network,
            id,
            count,
            started,
            chunks: Default::default(),
            received: 0,
            bytes: 0,
        }
    }
}

/// Puts fragmented frames back together; one per peer connection, since fragment ids are per
/// sender.
///
/// Bounded because its input is untrusted: at most `max_in_progress` frames at once (the oldest is
/// evicted), each refused once it exceeds [`MAX_ETHERNET_FRAME`] bytes (so buffered bytes never
/// exceed `max_in_progress` × [`MAX_ETHERNET_FRAME`]), and each dropped `timeout` after its first
/// fragment.
#[derive(Debug)]
pub struct Reassembler {
    config: ReassemblyConfig,
    in_progress: Vec<InProgress>,
    counters: ReassemblyCounters,
}

impl Default for Reassembler {
    fn default() -> Self {
        Reassembler::new(ReassemblyConfig::default())
    }
}

impl Reassembler {
    /// A reassembler with these limits (a `max_in_progress` of 0 is treated as 1).
    pub fn new(config: ReassemblyConfig) -> Self {
        let config = ReassemblyConfig {
            max_in_progress: config.max_in_progress.max(1),
            ..config
        };
        Reassembler {
            in_progress: Vec::with_capacity(config.max_in_progress),
            config,
            counters: Default::default(),
        }
    }

    /// Decodes a datagram and returns the frame it completes, if any: a whole frame is returned
    /// borrowed, without copying; a fragment is passed to [`Reassembler::push`].
    pub fn receive<'a>(
        &mut self,
        now: Instant,
        datagram: &'a [u8],
    ) -> Result<Option<ReceivedFrame<'a>>, WireError> {
        match decode(datagram)? {
            Datagram::Frame { network, frame } => Ok(Some(ReceivedFrame {
                network,
                frame: Cow::Borrowed(frame),
            })),
            Datagram::Fragment {
                network,
                id,
                index,
                count,
                chunk,
            } => Ok(self
                .push(now, network, id, index, count, chunk)?
                .map(|frame| ReceivedFrame {
                    network,
                    frame: Cow::Owned(frame),
                })),
        }
    }

    /// Adds one fragment; returns the whole frame when this was its last missing piece.
    ///
    /// A duplicate piece is ignored. A piece that contradicts what is held for the same network and
    /// id (another count, or other bytes for the same index) means the id was reused, so the stale
    /// pieces are dropped and this one starts afresh. Errors drop the frame in progress, if any.
    pub fn push(
        &mut self,
        now: Instant,
        network: NetworkId,
        id: u16,
        index: u8,
        count: u8,
        chunk: &[u8],
    ) -> Result<Option<Vec<u8>>, WireError> {
        check_fragment(index, count, chunk)?;
        self.expire(now);
        let position = match self
            .in_progress
            .iter()
            .position(|e| e.network == network && e.id == id)
        {
            Some(p) => {
                let entry = &mut self.in_progress[p];
                let held = entry
                    .chunks
                    .get(usize::from(index))
                    .and_then(Option::as_deref);
                if entry.count != count || held.is_some_and(|h| h != chunk) {
                    // Restarted entries move to the back so that the front stays the oldest.
                    self.counters.resets += 1;
                    self.in_progress.remove(p);
                    self.in_progress
                        .push(InProgress::new(network, id, count, now));
                    self.in_progress.len() - 1
                } else if held.is_some() {
                    self.counters.duplicates += 1;
                    return Ok(None);
                } else {
                    p
                }
            }
            None => {
                if self.in_progress.len() >= self.config.max_in_progress {
                    // Entries are appended as they start, so the first is the oldest.
                    self.in_progress.remove(0);
                    self.counters.evicted += 1;
                }
                self.in_progress
                    .push(InProgress::new(network, id, count, now));
                self.in_progress.len() - 1
            }
        };
        let entry = &mut self.in_progress[position];
        let len = entry.bytes + chunk.len();
        if len > MAX_ETHERNET_FRAME {
            self.in_progress.remove(position);
            return Err(WireError::FrameTooLong { len });
        }
        let Some(slot) = entry.chunks.get_mut(usize::from(index)) else {
            return Err(WireError::BadFragment);
        };
        *slot = Some(chunk.into());
        entry.bytes = len;
        entry.received += 1;
        if entry.received < entry.count {
            return Ok(None);
        }
        let entry = self.in_progress.remove(position);
        let mut frame = Vec::with_capacity(entry.bytes);
        for chunk in entry.chunks.iter().take(usize::from(entry.count)).flatten() {
            frame.extend_from_slice(chunk);
        }
        check_frame_len(frame.len())?;
        self.counters.completed += 1;
        Ok(Some(frame))
    }

    /// Drops incomplete frames whose timeout has passed. [`Reassembler::push`] does this itself;
    /// call it from a timer too so an idle peer's leftovers are freed.
    pub fn expire(&mut self, now: Instant) {
        let timeout = self.config.timeout;
        let before = self.in_progress.len();
        self.in_progress
            .retain(|e| now.saturating_duration_since(e.started) < timeout);
        self.counters.expired += (before - self.in_progress.len()) as u64;
    }

    /// When the oldest incomplete frame expires, for the caller's timer.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.in_progress
            .iter()
            .map(|e| e.started + self.config.timeout)
            .min()
    }

    /// Frames currently incomplete.
    pub fn in_progress(&self) -> usize {
        self.in_progress.len()
    }

    /// Bytes currently held for incomplete frames.
    pub fn buffered_bytes(&self) -> usize {
        self.in_progress.iter().map(|e| e.bytes).sum()
    }

    /// What this reassembler has done since it was created.
    pub fn counters(&self) -> ReassemblyCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: NetworkId = NetworkId(0x0102_0304);

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    /// Feeds datagrams through decode and one reassembler; returns every completed frame.
    fn deliver(
        r: &mut Reassembler,
        now: Instant,
        datagrams: &[Bytes],
    ) -> Vec<(NetworkId, Vec<u8>)> {
        datagrams
            .iter()
            .filter_map(|d| {
                r.receive(now, d)
                    .unwrap()
                    .map(|f| (f.network, f.frame.into_owned()))
            })
            .collect()
    }

    #[test]
    fn whole_frames_round_trip() {
        let mut id = 0;
        for len in [14, 60, 1514, 1518, MAX_ETHERNET_FRAME] {
            let f = frame(len);
            let out = encode(NET, &f, 5 + len, &mut id).unwrap();
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].len(), 5 + len);
            assert_eq!(
                decode(&out[0]).unwrap(),
                Datagram::Frame {
                    network: NET,
                    frame: &f
                }
            );
        }
        assert_eq!(id, 0, "whole frames take no fragment id");
    }

    #[test]
    fn fragmented_frames_round_trip_at_realistic_and_tiny_sizes() {
        let mut id = u16::MAX; // also exercises wrapping
        let now = Instant::now();
        for max_datagram in [
            10, 64, 200, 512, 1000, 1180, 1200, 1232, 1252, 1350, 1400, 1452, 1500,
        ] {
            for len in [
                14,
                15,
                100,
                700,
                1199,
                1200,
                1201,
                1396,
                1500,
                1514,
                1518,
                MAX_ETHERNET_FRAME,
            ] {
                let f = frame(len);
                let needed = if 5 + len <= max_datagram {
                    1
                } else {
                    len.div_ceil(max_datagram - 9)
                };
                let out = match encode(NET, &f, max_datagram, &mut id) {
                    Ok(out) => out,
                    Err(WireError::TooManyFragments { needed: n }) => {
                        assert!(
                            n > usize::from(MAX_FRAGMENTS) && n == needed,
                            "{max_datagram} {len}"
                        );
                        continue;
                    }
                    Err(e) => panic!("{max_datagram} {len}: {e}"),
                };
                assert_eq!(out.len(), needed, "fewest fragments: {max_datagram} {len}");
                assert!(out.iter().all(|d| d.len() <= max_datagram));
                let sizes: Vec<usize> = out.iter().map(|d| d.len()).collect();
                assert!(
                    sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
                    "equal-ish: {sizes:?}"
                );
                let mut r = Reassembler::default();
                assert_eq!(deliver(&mut r, now, &out), vec![(NET, f)]);
                assert_eq!(r.in_progress(), 0);
            }
        }
    }

    #[test]
    fn frames_encoded_into_one_buffer_share_its_allocation_and_reuse_it_once_sent() {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let start = buf.as_ptr() as usize;
        let range = start..start + 64 * 1024;
        let mut id = 0;
        let mut sent = Vec::new();
        // A TSO super-frame's worth of MTU frames, then one fragmented frame.
        for _ in 0..40 {
            encode_into(NET, &frame(1394), 1452, &mut id, &mut buf, |d| sent.push(d)).unwrap();
        }
        encode_into(NET, &frame(1514), 1200, &mut id, &mut buf, |d| sent.push(d)).unwrap();
        assert_eq!(sent.len(), 42);
        assert!(sent.iter().all(|d| range.contains(&(d.as_ptr() as usize))));
        let now = Instant::now();
        let mut r = Reassembler::default();
        let frames = deliver(&mut r, now, &sent);
        assert_eq!(frames.len(), 41);
        assert_eq!(frames[40], (NET, frame(1514)));
        // Once every datagram is gone, the next read's reservation reuses the same memory.
        drop(sent);
        buf.reserve(64 * 1024);
        assert_eq!(buf.as_ptr() as usize, start);
        // An error writes nothing.
        let before = buf.len();
        assert!(encode_into(NET, &frame(13), 1200, &mut id, &mut buf, |_| panic!()).is_err());
        assert_eq!(buf.len(), before);
    }

    #[test]
    fn a_1514_byte_frame_over_a_1200_byte_path_is_two_fragments() {
        let mut id = 7;
        let out = encode(NET, &frame(1514), 1200, &mut id).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(id, 8);
        match decode(&out[1]).unwrap() {
            Datagram::Fragment {
                network,
                id,
                index,
                count,
                chunk,
            } => {
                assert_eq!(
                    (network, id, index, count, chunk.len()),
                    (NET, 7, 1, 2, 757)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn out_of_order_fragments_reassemble() {
        let f = frame(1514);
        let mut id = 0;
        let mut out = encode(NET, &f, 300, &mut id).unwrap();
        assert_eq!(out.len(), 6);
        out.reverse();
        out.swap(1, 4);
        let mut r = Reassembler::default();
        assert_eq!(deliver(&mut r, Instant::now(), &out), vec![(NET, f)]);
        assert_eq!(r.counters().completed, 1);
    }

    #[test]
    fn interleaved_frames_and_networks_stay_apart() {
        let (a, b) = (
            frame(1000),
            frame(900).into_iter().rev().collect::<Vec<_>>(),
        );
        let mut id = 5;
        let fa = encode(NET, &a, 400, &mut id).unwrap();
        id = 5; // the same id on another network must not mix
        let fb = encode(NetworkId(9), &b, 400, &mut id).unwrap();
        let mixed: Vec<Bytes> = fa
            .iter()
            .zip(&fb)
            .flat_map(|(x, y)| [x.clone(), y.clone()])
            .collect();
        let mut r = Reassembler::default();
        assert_eq!(
            deliver(&mut r, Instant::now(), &mixed),
            vec![(NET, a), (NetworkId(9), b)]
        );
    }

    #[test]
    fn duplicates_are_ignored() {
        let f = frame(1400);
        let out = encode(NET, &f, 600, &mut 0).unwrap();
        let mut r = Reassembler::default();
        let now = Instant::now();
        let dup = [
            out[0].clone(),
            out[0].clone(),
            out[1].clone(),
            out[0].clone(),
            out[2].clone(),
        ];
        assert_eq!(deliver(&mut r, now, &dup), vec![(NET, f)]);
        assert_eq!(r.counters().duplicates, 2);
        // A duplicate after completion starts a new entry that later expires; it never yields a
        // frame.
        assert_eq!(deliver(&mut r, now, &out[..1]), vec![]);
        r.expire(now + Duration::from_secs(2));
        assert_eq!((r.in_progress(), r.counters().expired), (0, 1));
    }

    #[test]
    fn a_reused_id_with_other_count_or_bytes_resets_the_entry() {
        let now = Instant::now();
        let mut r = Reassembler::default();
        assert_eq!(r.push(now, NET, 1, 0, 3, &[1; 10]).unwrap(), None);
        // Same id, count 2 now: the 3-piece frame is stale.
        assert_eq!(r.push(now, NET, 1, 1, 2, &[2; 10]).unwrap(), None);
        assert_eq!(r.counters().resets, 1);
        // Other bytes for a held piece: stale again.
        assert_eq!(r.push(now, NET, 1, 1, 2, &[3; 10]).unwrap(), None);
        assert_eq!(r.counters().resets, 2);
        let whole = r.push(now, NET, 1, 0, 2, &[4; 10]).unwrap().unwrap();
        assert_eq!(whole, [[4; 10], [3; 10]].concat());
        assert_eq!(r.in_progress(), 0);
    }

    #[test]
    fn incomplete_frames_expire() {
        let t0 = Instant::now();
        let out = encode(NET, &frame(1500), 800, &mut 0).unwrap();
        let mut r = Reassembler::default();
        assert!(r.receive(t0, &out[0]).unwrap().is_none());
        assert_eq!(r.next_timeout(), Some(t0 + Duration::from_secs(1)));
        r.expire(t0 + Duration::from_millis(999));
        assert_eq!(r.in_progress(), 1);
        // The second piece arrives too late: the first has expired, so nothing completes.
        assert!(r
            .receive(t0 + Duration::from_secs(1), &out[1])
            .unwrap()
            .is_none());
        assert_eq!(r.counters().expired, 1);
        assert_eq!(r.in_progress(), 1);
        r.expire(t0 + Duration::from_secs(5));
        assert_eq!(
            (r.in_progress(), r.counters().expired, r.buffered_bytes()),
            (0, 2, 0)
        );
    }

    #[test]
    fn in_progress_frames_are_bounded_and_the_oldest_is_evicted() {
        let t0 = Instant::now();
        let mut r = Reassembler::new(ReassemblyConfig {
            max_in_progress: 4,
            ..Default::default()
        });
        let mut id = 0;
        let frames: Vec<Vec<Bytes>> = (0..10)
            .map(|_| encode(NET, &frame(1600), 1000, &mut id).unwrap())
            .collect();
        for (i, f) in frames.iter().enumerate() {
            assert!(r
                .receive(t0 + Duration::from_millis(i as u64), &f[0])
                .unwrap()
                .is_none());
            assert!(r.in_progress() <= 4);
            assert!(r.buffered_bytes() <= 4 * MAX_ETHERNET_FRAME);
        }
        assert_eq!(r.counters().evicted, 6);
        // The newest four survive; the evicted ones no longer complete.
        assert!(r.receive(t0, &frames[0][1]).unwrap().is_none());
        assert_eq!(
            r.receive(t0, &frames[9][1]).unwrap().map(|f| f.frame.len()),
            Some(1600)
        );
    }

    #[test]
    fn pieces_adding_up_past_the_frame_limit_are_refused() {
        let now = Instant::now();
        let mut r = Reassembler::default();
        let big = vec![0u8; 1000];
        assert_eq!(r.push(now, NET, 1, 0, 3, &big).unwrap(), None);
        assert_eq!(
            r.push(now, NET, 1, 1, 3, &big),
            Err(WireError::FrameTooLong { len: 2000 })
        );
        assert_eq!(r.in_progress(), 0);
        // Pieces that add up to less than an Ethernet header.
        assert_eq!(r.push(now, NET, 2, 0, 2, &[1; 5]).unwrap(), None);
        assert_eq!(
            r.push(now, NET, 2, 1, 2, &[1; 5]),
            Err(WireError::FrameTooShort { len: 10 })
        );
    }

    #[test]
    fn every_prefix_of_a_valid_datagram_is_an_error_or_a_shorter_fragment() {
        let mut id = 0;
        let whole = encode(NET, &frame(100), 1200, &mut id).unwrap().remove(0);
        for cut in 0..whole.len() {
            let got = decode(&whole[..cut]);
            match cut {
                0..=4 => assert_eq!(got, Err(WireError::Truncated)),
                5..=18 => assert_eq!(got, Err(WireError::FrameTooShort { len: cut - 5 })),
                // Any 14 bytes are a valid Ethernet header: a shorter frame is still a frame.
                _ => assert!(
                    matches!(got, Ok(Datagram::Frame { frame, .. }) if frame.len() == cut - 5)
                ),
            }
        }
        let fragment = encode(NET, &frame(1500), 1200, &mut id).unwrap().remove(0);
        for cut in 0..fragment.len() {
            let got = decode(&fragment[..cut]);
            match cut {
                0..=8 => assert_eq!(got, Err(WireError::Truncated), "cut at {cut}"),
                9 => assert_eq!(got, Err(WireError::BadFragment)),
                // Without a total length on the wire, a shorter chunk is still a well-formed
                // fragment.
                _ => assert!(
                    matches!(got, Ok(Datagram::Fragment { chunk, .. }) if chunk.len() == cut - 9)
                ),
            }
        }
    }

    #[test]
    fn wrong_version_kind_and_fragment_headers_are_refused() {
        let good = encode(NET, &frame(60), 1200, &mut 0)
            .unwrap()
            .remove(0)
            .to_vec();
        let mut bad = good.clone();
        bad[0] = 0x20;
        assert_eq!(decode(&bad), Err(WireError::UnknownVersion(2)));
        bad[0] = 0x00;
        assert_eq!(decode(&bad), Err(WireError::UnknownVersion(0)));
        bad[0] = 0x12;
        assert_eq!(decode(&bad), Err(WireError::UnknownKind(2)));
        assert_eq!(decode(&bad).unwrap_err().reason(), "unknown_kind");
        let mut long = good[..5].to_vec();
        long.extend(frame(MAX_ETHERNET_FRAME + 1));
        assert_eq!(
            decode(&long),
            Err(WireError::FrameTooLong {
                len: MAX_ETHERNET_FRAME + 1
            })
        );

        let fragment = |index: u8, count: u8| {
            let mut d = vec![0x11, 0, 0, 0, 1, 0, 9, index, count];
            d.extend([0xaa; 20]);
            d
        };
        assert!(decode(&fragment(1, 2)).is_ok());
        for (index, count) in [(2, 2), (0, 1), (0, 0), (0, MAX_FRAGMENTS + 1), (255, 255)] {
            assert_eq!(
                decode(&fragment(index, count)),
                Err(WireError::BadFragment),
                "{index}/{count}"
            );
        }
        let mut r = Reassembler::default();
        assert_eq!(
            r.push(Instant::now(), NET, 0, 0, 2, &[]),
            Err(WireError::BadFragment)
        );
        assert_eq!(
            r.push(Instant::now(), NET, 0, 3, 3, &[1])
                .unwrap_err()
                .reason(),
            "bad_fragment"
        );
    }

    #[test]
    fn encode_refuses_what_it_cannot_carry() {
        let mut id = 0;
        assert_eq!(
            encode(NET, &frame(13), 1200, &mut id),
            Err(WireError::FrameTooShort { len: 13 })
        );
        assert_eq!(
            encode(NET, &frame(1601), 1200, &mut id),
            Err(WireError::FrameTooLong { len: 1601 })
        );
        assert_eq!(
            encode(NET, &frame(100), 9, &mut id),
            Err(WireError::DatagramTooSmall { max_datagram: 9 })
        );
        assert_eq!(
            encode(NET, &frame(100), 0, &mut id),
            Err(WireError::DatagramTooSmall { max_datagram: 0 })
        );
        assert_eq!(
            encode(NET, &frame(1500), 100, &mut id),
            Err(WireError::TooManyFragments { needed: 17 })
        );
        assert_eq!(id, 0, "refused frames take no id");
    }
}
