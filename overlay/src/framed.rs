//! Typed messages over QUIC streams, one length-delimited postcard frame each.

use serde::{de::DeserializeOwned, Serialize};
use shoal_proto::{decode_frame, encode_frame, FrameError, FRAME_HEADER_LEN, MAX_FRAME_LEN};

/// Why a message could not be sent or received.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer sent a frame we cannot accept (too large, malformed).
    #[error("bad frame from peer: {0}")]
    Frame(#[from] FrameError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended mid-frame")]
    Truncated,
    /// Reading failed (connection lost, reset by the peer).
    #[error("read failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing failed (connection lost, stopped by the peer).
    #[error("write failed: {0}")]
    Write(#[from] quinn::WriteError),
}

/// Sends one message as a frame.
pub async fn send_msg<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), TransportError> {
    let frame = encode_frame(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Bytes reserved for a frame body before any of it has arrived. Most frames (heartbeats, acks)
/// fit.
const INITIAL_BODY: usize = 4096;

/// A frame whose header has arrived and whose body is arriving.
///
/// The buffer grows with the bytes that actually arrive, never with the length the peer announced:
/// a peer that announces [`MAX_FRAME_LEN`] and then sends nothing (or trickles) makes us hold what
/// it sent, not a megabyte. The buffer's capacity stays within twice the bytes received, plus
/// [`INITIAL_BODY`].
#[derive(Debug)]
struct PartialFrame {
    buf: Vec<u8>,
    /// Header and body.
    total: usize,
}

impl PartialFrame {
    /// Checks the announced length against [`MAX_FRAME_LEN`] before anything is reserved.
    fn new(header: [u8; FRAME_HEADER_LEN]) -> Result<Self, FrameError> {
        let len = u32::from_be_bytes(header) as usize;
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        let mut buf = Vec::with_capacity(FRAME_HEADER_LEN + len.min(INITIAL_BODY));
        buf.extend_from_slice(&header);
        Ok(Self {
            buf,
            total: FRAME_HEADER_LEN + len,
        })
    }

    /// Body bytes still to come.
    fn missing(&self) -> usize {
        self.total - self.buf.len()
    }

    /// Appends arrived bytes (at most [`PartialFrame::missing`]; the rest belongs to the next
    /// frame).
    fn push(&mut self, bytes: &[u8]) {
        let take = bytes.len().min(self.missing());
        self.buf.extend_from_slice(&bytes[..take]);
    }

    fn decode<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        decode_frame(&self.buf).map(|(msg, _)| msg)
    }
}

/// Receives one message; `Ok(None)` when the peer finished the stream cleanly between frames.
///
/// The announced length is checked against [`MAX_FRAME_LEN`] before the body is buffered, and the
/// body is buffered as it arrives (see [`PartialFrame`]).
///
/// Not cancel-safe: dropped before it completes (a `select!` that took another branch), it loses
/// what it had read of the frame, and the stream is out of step from then on. A loop that waits for
/// other things too reads with a [`FrameReader`], or in a task of its own.
pub async fn recv_msg<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<T>, TransportError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(TransportError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let mut frame = PartialFrame::new(header)?;
    while frame.missing() > 0 {
        // Never more than the frame still needs: the rest of the stream stays with quinn for the
        // next call.
        match recv.read_chunk(frame.missing(), true).await? {
            Some(chunk) => frame.push(&chunk.bytes),
            None => return Err(TransportError::Truncated),
        }
    }
    Ok(Some(frame.decode()?))
}

/// Reads frames from one stream, keeping a partly received frame between calls, so that
/// [`FrameReader::recv`] is cancel-safe: dropped before it completes, it has lost nothing, and the
/// next call goes on where it stopped. Same limits and growth as [`recv_msg`].
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    body: Option<PartialFrame>,
}

impl FrameReader {
    /// A reader at a frame boundary of `recv`.
    pub fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            body: None,
        }
    }

    /// The next message; `Ok(None)` when the peer finished the stream cleanly between frames.
    /// Cancel-safe (see the type's docs).
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, TransportError> {
        // Every await is a cancel-safe read_chunk; what it returns is stored before the next await.
        while self.body.is_none() {
            match self
                .recv
                .read_chunk(FRAME_HEADER_LEN - self.header_len, true)
                .await?
            {
                None if self.header_len == 0 => return Ok(None),
                None => return Err(TransportError::Truncated),
                Some(chunk) => {
                    let n = chunk.bytes.len();
                    self.header[self.header_len..self.header_len + n].copy_from_slice(&chunk.bytes);
                    self.header_len += n;
                    if self.header_len == FRAME_HEADER_LEN {
                        self.header_len = 0;
                        self.body = Some(PartialFrame::new(self.header)?);
                    }
                }
            }
        }
        while let Some(frame) = self.body.as_mut().filter(|f| f.missing() > 0) {
            match self.recv.read_chunk(frame.missing(), true).await? {
                Some(chunk) => frame.push(&chunk.bytes),
                None => return Err(TransportError::Truncated),
            }
        }
        let frame = self.body.take().ok_or(TransportError::Truncated)?;
        Ok(Some(frame.decode()?))
    }

    /// The stream, for stopping it.
    pub fn stream(&mut self) -> &mut quinn::RecvStream {
        &mut self.recv
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{AgentMsg, HealthReport};

    fn header(len: usize) -> [u8; FRAME_HEADER_LEN] {
        (len as u32).to_be_bytes()
    }

    #[test]
    fn an_announced_megabyte_reserves_only_what_arrives() {
        let mut f = PartialFrame::new(header(MAX_FRAME_LEN)).unwrap();
        assert!(
            f.buf.capacity() <= FRAME_HEADER_LEN + INITIAL_BODY,
            "{}",
            f.buf.capacity()
        );
        let mut received = 0;
        // Trickle the body in uneven pieces: capacity follows the bytes, not the announced length.
        for piece in [1, 7, 100, 4000, 10_000, 65_536, 300_000]
            .into_iter()
            .cycle()
        {
            let n = piece.min(f.missing());
            f.push(&vec![0u8; n]);
            received += n;
            let cap = f.buf.capacity();
            assert!(
                cap <= 2 * (FRAME_HEADER_LEN + received) + INITIAL_BODY,
                "{cap} bytes reserved after {received} arrived"
            );
            if f.missing() == 0 {
                break;
            }
        }
        assert_eq!(received, MAX_FRAME_LEN);
    }

    #[test]
    fn oversized_announcements_are_refused_before_any_reservation() {
        assert!(matches!(
            PartialFrame::new(header(MAX_FRAME_LEN + 1)),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            PartialFrame::new([0xff; 4]),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn bytes_past_the_frame_are_not_taken_and_the_frame_decodes() {
        let msg = AgentMsg::Health(HealthReport {
            uptime_secs: 7,
            ..Default::default()
        });
        let bytes = encode_frame(&msg).unwrap();
        let mut f = PartialFrame::new(bytes[..4].try_into().unwrap()).unwrap();
        let mut body = bytes[4..].to_vec();
        body.extend_from_slice(b"next frame");
        f.push(&body);
        assert_eq!(f.missing(), 0);
        assert_eq!(f.decode::<AgentMsg>().unwrap(), msg);
    }

    /// A QUIC loopback connection: (server endpoint, client endpoint, client config, server
    /// address).
    fn loopback() -> (
        quinn::Endpoint,
        quinn::Endpoint,
        quinn::ClientConfig,
        std::net::SocketAddr,
    ) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server_params =
            rcgen::CertificateParams::new(vec![crate::tls::controller_server_name().to_owned()])
                .unwrap();
        let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
        let server_config = crate::tls::controller_server_config(
            ca_cert.der(),
            vec![server_cert.der().clone(), ca_cert.der().clone()],
            crate::pki::tls_key(&server_key),
        )
        .unwrap();
        let server =
            quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let client_config = crate::tls::enrol_client_config(
            crate::pki::sha256(ca_cert.der()),
            std::time::Duration::from_secs(5),
        )
        .unwrap();
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        (server, client, client_config, addr)
    }

    fn messages() -> Vec<AgentMsg> {
        (0..3)
            .map(|i| {
                AgentMsg::Health(HealthReport {
                    uptime_secs: i,
                    filesystems: vec![Default::default(); 300],
                    ..Default::default()
                })
            })
            .collect()
    }

    /// The client writes `frames` in 777-byte pieces with pauses, then `tail`, and finishes.
    fn write_slowly(
        client: quinn::Endpoint,
        config: quinn::ClientConfig,
        addr: std::net::SocketAddr,
        frames: Vec<u8>,
        tail: Vec<u8>,
    ) -> tokio::task::JoinHandle<quinn::Connection> {
        use std::time::Duration;
        tokio::spawn(async move {
            let conn = client
                .connect_with(config, addr, crate::tls::controller_server_name())
                .unwrap()
                .await
                .unwrap();
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            for piece in frames.chunks(777) {
                send.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            send.write_all(&tail).await.unwrap();
            send.finish().unwrap();
            let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
            conn
        })
    }

    /// Frames written in pieces with pauses arrive whole, including a stream that ends mid-body.
    #[tokio::test]
    async fn frames_written_in_pieces_arrive_whole_over_quic() {
        let (server, client, config, addr) = loopback();
        let msgs = messages();
        let frames: Vec<u8> = msgs.iter().flat_map(|m| encode_frame(m).unwrap()).collect();
        // Then a frame announcing 1000 bytes with only 10 of them.
        let mut tail = header(1000).to_vec();
        tail.extend_from_slice(&[0; 10]);
        let writer = write_slowly(client, config, addr, frames, tail);
        let conn = server.accept().await.unwrap().await.unwrap();
        let (_send, mut recv) = conn.accept_bi().await.unwrap();
        for m in &msgs {
            assert_eq!(
                recv_msg::<AgentMsg>(&mut recv).await.unwrap().as_ref(),
                Some(m)
            );
        }
        assert!(matches!(
            recv_msg::<AgentMsg>(&mut recv).await,
            Err(TransportError::Truncated)
        ));
        drop(recv);
        let _conn = writer.await.unwrap();
    }

    /// A `select!` that keeps dropping the read for a timer (the controller's connection loop wakes
    /// for queued messages the same way) still gets every frame whole and in order from a
    /// FrameReader.
    #[tokio::test]
    async fn a_frame_reader_survives_being_cancelled_mid_frame() {
        use std::time::Duration;
        let (server, client, config, addr) = loopback();
        let msgs = messages();
        let frames: Vec<u8> = msgs.iter().flat_map(|m| encode_frame(m).unwrap()).collect();
        let writer = write_slowly(client, config, addr, frames, vec![]);
        let conn = server.accept().await.unwrap().await.unwrap();
        let (_send, recv) = conn.accept_bi().await.unwrap();
        let mut reader = FrameReader::new(recv);
        let mut got = Vec::new();
        let mut cancelled = 0;
        let mut tick = tokio::time::interval(Duration::from_micros(300));
        loop {
            tokio::select! {
                m = reader.recv::<AgentMsg>() => match m.unwrap() {
                    Some(m) => got.push(m),
                    None => break,
                },
                _ = tick.tick() => cancelled += 1,
            }
        }
        assert_eq!(got, msgs);
        assert!(cancelled > 10, "the read was cancelled {cancelled} times");
        let _conn = writer.await.unwrap();
    }
}
