//! TAP offloads, sans-IO: what an `IFF_VNET_HDR` TAP device hands over and accepts.
//!
//! With offloads on, every read from the TAP starts with a virtio-net header and may carry a TCP
//! super-frame of up to 64 KiB (TSO) or a frame whose checksum is left to the receiver
//! (`NEEDS_CSUM`). [`Segmenter`] turns one such read into ordinary MTU-sized Ethernet frames with
//! complete checksums, which is all that crosses the wire, so a peer with offloads off sees the same
//! frames as before. On the way out, [`Coalescer`] merges the TCP segments of one flow received in a
//! batch into one super-frame with a GSO virtio-net header, so the kernel takes a batch in a few
//! writes instead of one per frame.
//!
//! The TCP/IP work (splitting with header and checksum fixes, coalescing rules) is tun-rs's port of
//! wireguard-go's `tun/offload_linux.go`, written for TUN devices (IP packets). This module adds the
//! Ethernet framing around it: the link header is taken off before and put back after, and the
//! virtio-net header's offsets, which on a TAP count from the start of the Ethernet frame, are moved
//! by its length.

use tun_rs::{GROTable, VirtioNetHdr, VIRTIO_NET_HDR_LEN};

/// Bytes of the virtio-net header in front of every TAP read and write with offloads on.
pub const VNET_HDR_LEN: usize = VIRTIO_NET_HDR_LEN;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` is left to finish.
const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
const GSO_NONE: u8 = 0;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETH_LEN: usize = 14;
const VLAN_ETH_LEN: usize = 18;
/// Segments one super-frame may be split into. The kernel's TSO limit (64 KiB) over the smallest
/// sensible MSS stays far below; a header claiming more is refused rather than allocated for.
pub const MAX_SEGMENTS: usize = 1024;
/// Frames one [`Coalescer`] batch holds before it must be written.
pub const MAX_BATCH: usize = 64;
/// Room in front of each coalescer buffer: a virtio-net header, then the Ethernet header.
const HEADROOM: usize = VNET_HDR_LEN + ETH_LEN;
/// Value put in the gso_type byte of a buffer's header slot before coalescing; tun-rs writes a real
/// header (type 0, 1, 4 or 5) into every buffer that is to be written and none into the segments it
/// merged, so the marker tells which buffers to write.
const UNWRITTEN: u8 = 0xff;

/// Why a TAP read could not be turned into frames.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OffloadError {
    /// The read is shorter than a virtio-net header and an Ethernet header.
    #[error("TAP read of {len} bytes is shorter than its headers")]
    TooShort {
        /// Bytes read.
        len: usize,
    },
    /// A GSO super-frame that does not carry IPv4 or IPv6 (optionally in one VLAN tag).
    #[error("GSO frame is not IP")]
    NotIp,
    /// The virtio-net header's offsets do not fit the frame.
    #[error("virtio-net header does not fit the frame")]
    BadHeader,
    /// The super-frame would split into more than [`MAX_SEGMENTS`] frames.
    #[error("GSO frame would split into {segments} frames")]
    TooManySegments {
        /// Segments it would need.
        segments: usize,
    },
    /// tun-rs refused to split or coalesce (its message).
    #[error("offload: {0}")]
    Offload(#[from] std::io::Error),
}

impl OffloadError {
    /// The drop reason counted for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            OffloadError::TooShort { .. } => "offload_short",
            OffloadError::NotIp => "offload_not_ip",
            OffloadError::BadHeader | OffloadError::TooManySegments { .. } => "offload_bad_header",
            OffloadError::Offload(_) => "offload_error",
        }
    }
}

/// Length of the link header and whether IPv6 follows, for an IP frame (untagged or one VLAN tag).
fn ip_link_header(frame: &[u8]) -> Option<(usize, bool)> {
    let ethertype = |at: usize| Some(u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?));
    let (len, inner) = match ethertype(12)? {
        ETHERTYPE_VLAN => (VLAN_ETH_LEN, ethertype(16)?),
        t => (ETH_LEN, t),
    };
    match inner {
        ETHERTYPE_IPV4 => Some((len, false)),
        ETHERTYPE_IPV6 => Some((len, true)),
        _ => None,
    }
}

/// Completes a partial checksum (`NEEDS_CSUM`): the field at `at` holds the pseudo-header sum; the
/// checksum covers everything from `start`.
fn finish_checksum(frame: &mut [u8], start: usize, at: usize) {
    let initial = u16::from_be_bytes([frame[at], frame[at + 1]]);
    frame[at..at + 2].fill(0);
    let sum = tun_rs::checksum(&frame[start..], u64::from(initial));
    frame[at..at + 2].copy_from_slice(&(!sum).to_be_bytes());
}

/// Splits TAP reads (virtio-net header + frame) into plain frames. Keeps its buffers between
/// reads, so a steady stream allocates nothing.
#[derive(Debug, Default)]
pub struct Segmenter {
    out: Vec<Vec<u8>>,
    sizes: Vec<usize>,
}

impl Segmenter {
    /// Turns one TAP read into frames with complete checksums, passing each to `frame` in order;
    /// returns how many. `read` is modified (checksums are finished in place).
    pub fn split(
        &mut self,
        read: &mut [u8],
        mut frame: impl FnMut(&[u8]),
    ) -> Result<usize, OffloadError> {
        if read.len() < VNET_HDR_LEN + ETH_LEN {
            return Err(OffloadError::TooShort { len: read.len() });
        }
        let hdr = VirtioNetHdr::decode(&read[..VNET_HDR_LEN])?;
        let whole = &mut read[VNET_HDR_LEN..];
        if hdr.gso_type == GSO_NONE {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                let at = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset);
                if at + 2 > whole.len() {
                    return Err(OffloadError::BadHeader);
                }
                finish_checksum(whole, usize::from(hdr.csum_start), at);
            }
            frame(whole);
            return Ok(1);
        }
        let (link, is_v6) = ip_link_header(whole).ok_or(OffloadError::NotIp)?;
        let l2 = link as u16;
        if hdr.csum_start < l2 || hdr.hdr_len < l2 || usize::from(hdr.hdr_len) > whole.len() {
            return Err(OffloadError::BadHeader);
        }
        if hdr.gso_size == 0 {
            return Err(OffloadError::BadHeader);
        }
        let ip_hdr = VirtioNetHdr {
            hdr_len: hdr.hdr_len - l2,
            csum_start: hdr.csum_start - l2,
            ..hdr
        };
        let payload = whole.len() - usize::from(hdr.hdr_len);
        let gso_size = usize::from(hdr.gso_size);
        let segments = payload.div_ceil(gso_size).max(1);
        if segments > MAX_SEGMENTS {
            return Err(OffloadError::TooManySegments { segments });
        }
        let seg_len = usize::from(hdr.hdr_len) + payload.min(gso_size);
        if self.out.len() < segments {
            self.out.resize_with(segments, Vec::new);
            self.sizes.resize(segments, 0);
        }
        for b in &mut self.out[..segments] {
            if b.len() < seg_len {
                b.resize(seg_len, 0);
            }
        }
        let (link_hdr, ip) = whole.split_at_mut(link);
        let n = tun_rs::gso_split(
            ip,
            ip_hdr,
            &mut self.out[..segments],
            &mut self.sizes[..segments],
            link,
            is_v6,
        )?;
        for (b, size) in self.out[..n].iter_mut().zip(&self.sizes[..n]) {
            b[..link].copy_from_slice(link_hdr);
            frame(&b[..link + size]);
        }
        Ok(n)
    }
}

/// Gathers frames bound for one TAP device and writes TCP segments of one flow as one super-frame.
///
/// Only untagged IP frames sharing one Ethernet header are coalesced together (the TCP/IP rules
/// cannot see the link header); [`Coalescer::push`] says when a frame must wait for the next batch.
pub struct Coalescer {
    bufs: Vec<Vec<u8>>,
    used: usize,
    eth: [u8; ETH_LEN],
    gro: GROTable,
    /// Indices of the buffers the last flush writes.
    ready: Vec<usize>,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("used", &self.used)
            .finish_non_exhaustive()
    }
}

impl Default for Coalescer {
    fn default() -> Self {
        Self {
            bufs: Vec::new(),
            used: 0,
            eth: [0; ETH_LEN],
            gro: GROTable::new(),
            ready: Vec::new(),
        }
    }
}

/// What [`Coalescer::push`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Taken into the batch.
    Taken,
    /// Not a candidate (not untagged IP): write it on its own, with [`PLAIN_HDR`] in front.
    Alone,
    /// The batch is full or holds another Ethernet header: write the batch, then push again.
    Full,
}

/// The virtio-net header of a frame written as it is (no GSO, checksum complete).
pub const PLAIN_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

impl Coalescer {
    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.used
    }

    /// True when no frame waits.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Adds a frame to the batch (see [`Push`]).
    pub fn push(&mut self, frame: &[u8]) -> Push {
        if frame.len() <= ETH_LEN
            || !matches!(ip_link_header(frame), Some((ETH_LEN, _)))
            || !matches!(frame[ETH_LEN] >> 4, 4 | 6)
        {
            return Push::Alone;
        }
        if self.used == MAX_BATCH || (self.used > 0 && frame[..ETH_LEN] != self.eth) {
            return Push::Full;
        }
        if self.used == 0 {
            self.eth.copy_from_slice(&frame[..ETH_LEN]);
        }
        if self.bufs.len() == self.used {
            // Room for a whole super-frame: tun-rs coalesces into a buffer only within its
            // capacity. Pages are touched only as far as frames reach, so an idle or light peer
            // costs little; a bulk flow's batch can hold up to MAX_BATCH * 64 KiB.
            self.bufs
                .push(Vec::with_capacity(HEADROOM + usize::from(u16::MAX)));
        }
        let b = &mut self.bufs[self.used];
        b.clear();
        b.resize(HEADROOM, 0);
        b[ETH_LEN + 1] = UNWRITTEN;
        b.extend_from_slice(&frame[ETH_LEN..]);
        self.used += 1;
        Push::Taken
    }

    /// Coalesces the batch and returns the TAP writes (virtio-net header + frame) it makes, in
    /// order; empties the batch (also on error, when the batch is lost).
    pub fn flush(&mut self) -> Result<impl Iterator<Item = &[u8]>, OffloadError> {
        let used = std::mem::take(&mut self.used);
        self.ready.clear();
        let bufs = &mut self.bufs[..used];
        if used > 0 {
            self.gro.apply_gro(bufs, HEADROOM, false)?;
        }
        for (i, b) in bufs.iter_mut().enumerate() {
            // tun-rs wrote the header just in front of the IP packet, where the Ethernet header
            // goes: move it to the front, with its offsets counting the Ethernet header too.
            if b[ETH_LEN + 1] == UNWRITTEN {
                continue;
            }
            let mut hdr = VirtioNetHdr::decode(&b[ETH_LEN..HEADROOM])?;
            if hdr.gso_type != GSO_NONE || hdr.flags & F_NEEDS_CSUM != 0 {
                hdr.hdr_len += ETH_LEN as u16;
                hdr.csum_start += ETH_LEN as u16;
            }
            hdr.encode(&mut b[..VNET_HDR_LEN])?;
            b[VNET_HDR_LEN..HEADROOM].copy_from_slice(&self.eth);
            self.ready.push(i);
        }
        let bufs = &self.bufs;
        Ok(self.ready.iter().map(move |&i| bufs[i].as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
    const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

    /// RFC 1071 sum of `data` starting from `initial`, folded, not inverted.
    fn sum(data: &[u8], initial: u32) -> u16 {
        let mut s = initial;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from(c[0]) << 8
            };
            s += u32::from(w);
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    /// An IPv4/TCP segment with valid checksums.
    fn tcp4(seq: u32, payload: &[u8], flags: u8) -> Vec<u8> {
        let total = 20 + 20 + payload.len();
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        let c = !sum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&7u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&65000u16.to_be_bytes());
        tcp.extend_from_slice(payload);
        let pseudo = pseudo4(&ip, tcp.len());
        let c = !sum(&tcp, pseudo);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(&tcp);
        ip
    }

    fn pseudo4(ip: &[u8], l4_len: usize) -> u32 {
        u32::from(sum(&ip[12..20], 0)) + 6 + l4_len as u32
    }

    fn frame4(seq: u32, payload: &[u8], flags: u8) -> Vec<u8> {
        let mut f = eth(MAC_B, MAC_A, ETHERTYPE_IPV4);
        f.extend_from_slice(&tcp4(seq, payload, flags));
        f
    }

    fn tcp_valid(frame: &[u8]) -> bool {
        let ip = &frame[ETH_LEN..];
        let ihl = usize::from(ip[0] & 0xf) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        sum(&ip[..ihl], 0) == 0xffff
            && total == ip.len()
            && sum(&ip[ihl..], pseudo4(ip, ip.len() - ihl)) == 0xffff
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    const PSH_ACK: u8 = 0x18;
    const ACK: u8 = 0x10;

    /// A TSO read as the kernel hands it over: one big segment with only the pseudo-header sum in
    /// the TCP checksum field.
    fn tso_read(data: &[u8], mss: u16) -> Vec<u8> {
        let mut f = frame4(1000, data, PSH_ACK);
        let ip_start = ETH_LEN;
        let tcp_at = ip_start + 20;
        let l4 = f.len() - tcp_at;
        let pseudo = sum(&[], pseudo4(&f[ip_start..], l4));
        f[tcp_at + 16..tcp_at + 18].copy_from_slice(&pseudo.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: tun_rs::VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: (ETH_LEN + 40) as u16,
            gso_size: mss,
            csum_start: (ETH_LEN + 20) as u16,
            csum_offset: 16,
        };
        let mut read = vec![0; VNET_HDR_LEN];
        hdr.encode(&mut read).unwrap();
        read.extend_from_slice(&f);
        read
    }

    #[test]
    fn splits_a_tso_superframe_into_valid_segments() {
        let data = payload(5000);
        let mut read = tso_read(&data, 1340);
        let mut seg = Segmenter::default();
        let mut frames = Vec::new();
        let n = seg.split(&mut read, |f| frames.push(f.to_vec())).unwrap();
        assert_eq!(n, 4);
        let mut got = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(
                &f[..12],
                &[MAC_B, MAC_A].concat()[..],
                "Ethernet header kept"
            );
            assert!(tcp_valid(f), "segment {i} has valid IP and TCP checksums");
            let seq = u32::from_be_bytes(f[ETH_LEN + 24..ETH_LEN + 28].try_into().unwrap());
            assert_eq!(seq, 1000 + (i as u32) * 1340);
            assert!(f.len() <= ETH_LEN + 40 + 1340);
            got.extend_from_slice(&f[ETH_LEN + 40..]);
        }
        assert_eq!(got, data);
    }

    #[test]
    fn finishes_a_partial_checksum_of_a_plain_frame() {
        let mut f = frame4(5, &payload(100), PSH_ACK);
        let good = f.clone();
        let l4 = f.len() - ETH_LEN - 20;
        let pseudo = sum(&[], pseudo4(&f[ETH_LEN..], l4));
        f[ETH_LEN + 36..ETH_LEN + 38].copy_from_slice(&pseudo.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: (ETH_LEN + 20) as u16,
            csum_offset: 16,
            ..Default::default()
        };
        let mut read = vec![0; VNET_HDR_LEN];
        hdr.encode(&mut read).unwrap();
        read.extend_from_slice(&f);
        let mut out = Vec::new();
        Segmenter::default()
            .split(&mut read, |f| out.push(f.to_vec()))
            .unwrap();
        assert_eq!(out, vec![good]);
    }

    #[test]
    fn refuses_bad_headers() {
        let mut seg = Segmenter::default();
        assert!(matches!(
            seg.split(&mut [0u8; 12], |_| {}),
            Err(OffloadError::TooShort { .. })
        ));
        // GSO over ARP.
        let mut read = tso_read(&payload(3000), 1340);
        read[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(matches!(
            seg.split(&mut read, |_| {}),
            Err(OffloadError::NotIp)
        ));
        // Header length past the end of the frame.
        let mut read = tso_read(&payload(100), 1340);
        read[2..4].copy_from_slice(&4000u16.to_ne_bytes());
        assert!(matches!(
            seg.split(&mut read, |_| {}),
            Err(OffloadError::BadHeader)
        ));
        // An MSS of one byte on 3000 bytes.
        let mut read = tso_read(&payload(3000), 1);
        assert!(matches!(
            seg.split(&mut read, |_| {}),
            Err(OffloadError::TooManySegments { .. })
        ));
        // Checksum offset past the end of a plain frame.
        let mut read = tso_read(&payload(10), 1340);
        read[1] = GSO_NONE;
        read[6..8].copy_from_slice(&2000u16.to_ne_bytes());
        assert!(matches!(
            seg.split(&mut read, |_| {}),
            Err(OffloadError::BadHeader)
        ));
    }

    /// Coalesced writes, segmented again the way the kernel would, give back the frames pushed.
    fn flushed(c: &mut Coalescer) -> Vec<Vec<u8>> {
        c.flush().unwrap().map(|w| w.to_vec()).collect()
    }

    #[test]
    fn coalesces_a_flow_and_round_trips_through_the_segmenter() {
        let mut c = Coalescer::default();
        let mut sent = Vec::new();
        for i in 0..10u32 {
            let f = frame4(1000 + i * 1340, &payload(1340), ACK);
            assert_eq!(c.push(&f), Push::Taken);
            sent.push(f);
        }
        let mut writes = flushed(&mut c);
        assert!(c.is_empty());
        assert_eq!(writes.len(), 1, "one flow, in order: one super-frame");
        let hdr = VirtioNetHdr::decode(&writes[0]).unwrap();
        assert_eq!(hdr.gso_type, tun_rs::VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(hdr.gso_size, 1340);
        assert_eq!(usize::from(hdr.csum_start), ETH_LEN + 20);
        assert_eq!(usize::from(hdr.hdr_len), ETH_LEN + 40);
        let mut again = Vec::new();
        Segmenter::default()
            .split(&mut writes[0], |f| again.push(f.to_vec()))
            .unwrap();
        assert_eq!(again.len(), sent.len());
        for (a, s) in again.iter().zip(&sent) {
            assert!(tcp_valid(a));
            assert_eq!(a[ETH_LEN + 40..], s[ETH_LEN + 40..]);
            assert_eq!(a[ETH_LEN + 24..ETH_LEN + 28], s[ETH_LEN + 24..ETH_LEN + 28]);
        }
    }

    #[test]
    fn keeps_non_ip_gaps_and_other_macs_apart() {
        let mut c = Coalescer::default();
        let arp = eth([0xff; 6], MAC_A, 0x0806);
        let mut arp = arp.clone();
        arp.extend_from_slice(&[0u8; 28]);
        assert_eq!(c.push(&arp), Push::Alone);
        assert_eq!(c.push(&frame4(1, &payload(100), ACK)), Push::Taken);
        // A gap in sequence numbers: written apart, but in one batch.
        assert_eq!(c.push(&frame4(5000, &payload(100), ACK)), Push::Taken);
        let mut other = frame4(101, &payload(100), ACK);
        other[..6].copy_from_slice(&MAC_A);
        assert_eq!(c.push(&other), Push::Full);
        let writes = flushed(&mut c);
        assert_eq!(writes.len(), 2);
        for w in &writes {
            assert_eq!(
                w[..VNET_HDR_LEN],
                PLAIN_HDR,
                "single segments go as they are"
            );
            assert!(tcp_valid(&w[VNET_HDR_LEN..]));
        }
        assert_eq!(c.push(&other), Push::Taken);
        for i in 0..MAX_BATCH - 1 {
            assert_eq!(c.push(&other), Push::Taken, "frame {i}");
        }
        assert_eq!(c.push(&other), Push::Full);
    }

    #[test]
    fn a_corrupt_segment_is_not_merged() {
        let mut c = Coalescer::default();
        let a = frame4(1000, &payload(1000), ACK);
        let mut b = frame4(2000, &payload(1000), ACK);
        let last = b.len() - 1;
        b[last] ^= 0xff;
        c.push(&a);
        c.push(&b);
        let writes = flushed(&mut c);
        assert_eq!(writes.len(), 2);
        assert_eq!(
            writes[1][VNET_HDR_LEN..],
            b[..],
            "passed on unchanged for the kernel to drop"
        );
    }

    /// The `tap_offload` fuzz target's property, on deterministic mutations: no TAP read and no
    /// batch of received frames makes the segmenter or the coalescer panic, and every write has a
    /// header.
    #[test]
    fn mutated_reads_and_frames_never_panic() {
        use rand::{rngs::StdRng, RngCore, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0x2545_f491_4f6c_dd1d);
        let mut next = move || rng.next_u64();
        let seeds = [
            tso_read(&payload(5000), 1340),
            tso_read(&payload(200), 100),
            frame4(9, &payload(1340), ACK),
        ];
        let mut seg = Segmenter::default();
        let mut c = Coalescer::default();
        for round in 0..3000 {
            let mut m = seeds[round % seeds.len()].clone();
            for _ in 0..(next() % 6) {
                let at = (next() as usize) % m.len();
                m[at] = next() as u8;
            }
            if next() % 4 == 0 {
                m.truncate((next() as usize) % (m.len() + 1));
            }
            let mut frames = Vec::new();
            let _ = seg.split(&mut m.clone(), |f| frames.push(f.to_vec()));
            frames.push(m);
            for f in &frames {
                if c.push(f) == Push::Full {
                    if let Ok(w) = c.flush() {
                        w.for_each(|w| assert!(w.len() > VNET_HDR_LEN));
                    }
                    c.push(f);
                }
            }
        }
        if let Ok(w) = c.flush() {
            w.for_each(|w| assert!(w.len() > VNET_HDR_LEN));
        };
    }
}
