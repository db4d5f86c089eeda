//! Length-delimited postcard frames: a 4-byte big-endian length, then the postcard body.
//!
//! The length is checked against [`MAX_FRAME_LEN`] before anything is allocated, so a peer cannot
//! make us reserve memory by announcing a huge frame.

use serde::{de::DeserializeOwned, Serialize};

/// Bytes in the length prefix.
pub const FRAME_HEADER_LEN: usize = 4;
/// Largest body accepted or sent (1 MiB): an inventory of a large storage server fits many times
/// over.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// More bytes are needed; `needed` is the total length of the frame once known, else the
    /// header.
    #[error("incomplete frame: {have} of {needed} bytes")]
    Incomplete {
        /// Bytes available.
        have: usize,
        /// Bytes needed for the frame (header included).
        needed: usize,
    },
    /// The announced body is larger than [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced body length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body is not a valid message.
    #[error("malformed frame body: {0}")]
    Malformed(#[from] postcard::Error),
    /// The body decoded but left bytes over: the peer and we disagree about the message layout.
    #[error("frame body has {0} trailing bytes")]
    TrailingBytes(usize),
}

/// Encodes `msg` as one frame.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(msg, vec![0u8; FRAME_HEADER_LEN])?;
    let len = out.len() - FRAME_HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    out[..FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Reads the body length from a frame header, checking the limit.
fn body_len(buf: &[u8]) -> Result<usize, FrameError> {
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else {
        return Err(FrameError::Incomplete {
            have: buf.len(),
            needed: FRAME_HEADER_LEN,
        });
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(len)
}

/// Decodes one frame from the start of `buf`; returns the message and the bytes it used.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<(T, usize), FrameError> {
    let len = body_len(buf)?;
    let total = FRAME_HEADER_LEN + len;
    let Some(body) = buf.get(FRAME_HEADER_LEN..total) else {
        return Err(FrameError::Incomplete {
            have: buf.len(),
            needed: total,
        });
    };
    let (msg, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok((msg, total))
}

/// Accumulates stream bytes and yields whole frames; the shell feeds it whatever the socket
/// returned.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// How many more bytes the next frame needs before [`FrameDecoder::next_frame`] can yield it;
    /// errors when the announced length is over the limit, before anything is buffered for it.
    pub fn wanted(&self) -> Result<usize, FrameError> {
        match body_len(&self.buf) {
            Ok(len) => Ok((FRAME_HEADER_LEN + len).saturating_sub(self.buf.len())),
            Err(FrameError::Incomplete { have, needed }) => Ok(needed - have),
            Err(e) => Err(e),
        }
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match decode_frame(&self.buf) {
            Ok((msg, used)) => {
                self.buf.drain(..used);
                Ok(Some(msg))
            }
            Err(FrameError::Incomplete { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentMsg, HealthReport};

    fn sample() -> AgentMsg {
        AgentMsg::Health(HealthReport {
            uptime_secs: 42,
            cpu_percent: 3.5,
            ..Default::default()
        })
    }

    #[test]
    fn round_trip() {
        let bytes = encode_frame(&sample()).unwrap();
        let (back, used): (AgentMsg, usize) = decode_frame(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back, sample());
    }

    #[test]
    fn every_truncation_is_incomplete_not_an_error() {
        let bytes = encode_frame(&sample()).unwrap();
        for cut in 0..bytes.len() {
            match decode_frame::<AgentMsg>(&bytes[..cut]) {
                Err(FrameError::Incomplete { have, .. }) => assert_eq!(have, cut),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        let header = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(
            decode_frame::<AgentMsg>(&header),
            Err(FrameError::TooLarge { .. })
        ));
        let mut dec = FrameDecoder::new();
        dec.extend(&header);
        assert!(matches!(dec.wanted(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn garbage_body_is_malformed() {
        let mut bytes = vec![0, 0, 0, 3];
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            decode_frame::<AgentMsg>(&bytes),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode_frame(&sample()).unwrap();
        bytes.push(0);
        let len = (bytes.len() - FRAME_HEADER_LEN) as u32;
        bytes[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            decode_frame::<AgentMsg>(&bytes),
            Err(FrameError::TrailingBytes(1))
        ));
    }

    #[test]
    fn decoder_yields_frames_split_anywhere() {
        let mut stream = encode_frame(&sample()).unwrap();
        stream.extend(encode_frame(&AgentMsg::Inventory(Default::default())).unwrap());
        for split in 0..stream.len() {
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            for chunk in [&stream[..split], &stream[split..]] {
                dec.extend(chunk);
                while let Some(m) = dec.next_frame::<AgentMsg>().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got.len(), 2, "split at {split}");
        }
    }

    /// The fuzz targets' property on deterministic mutations of valid frames, so CI exercises it
    /// without a fuzzer: decoding untrusted bytes never panics, and what decodes round-trips.
    #[test]
    fn mutated_frames_never_panic_and_round_trip() {
        use crate::{ControllerMsg, Inventory, NetInterface};
        let mut seeds = vec![
            encode_frame(&sample()).unwrap(),
            encode_frame(&AgentMsg::Inventory(Inventory {
                hostname: "h".into(),
                nics: vec![NetInterface {
                    name: "eth0".into(),
                    mac: Some("02:00:00:00:00:01".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }))
            .unwrap(),
            encode_frame(&ControllerMsg::Revoked { reason: "x".into() }).unwrap(),
        ];
        use rand::{rngs::StdRng, RngCore, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        let mut rand = move || rng.next_u64();
        for i in 0..30_000 {
            let mut bytes = seeds[i % seeds.len()].clone();
            match rand() % 4 {
                0 => {
                    let at = rand() as usize % bytes.len();
                    bytes[at] ^= 1 << (rand() % 8);
                }
                1 => bytes.truncate(rand() as usize % bytes.len()),
                2 => {
                    let at =
                        FRAME_HEADER_LEN + rand() as usize % (bytes.len() - FRAME_HEADER_LEN + 1);
                    bytes.insert(at.min(bytes.len()), rand() as u8);
                    let len = (bytes.len() - FRAME_HEADER_LEN) as u32;
                    bytes[..4].copy_from_slice(&len.to_be_bytes());
                }
                _ => bytes
                    .iter_mut()
                    .skip(FRAME_HEADER_LEN)
                    .for_each(|b| *b = rand() as u8),
            }
            if let Ok((msg, _)) = decode_frame::<AgentMsg>(&bytes) {
                let again = encode_frame(&msg).unwrap();
                let back = decode_frame::<AgentMsg>(&again).unwrap().0;
                assert_eq!(
                    format!("{back:?}"),
                    format!("{msg:?}"),
                    "NaN-safe comparison"
                );
                if seeds.len() < 64 {
                    seeds.push(again);
                }
            }
            let _ = decode_frame::<ControllerMsg>(&bytes);
        }
    }
}
