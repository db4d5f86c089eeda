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
pub async fn send_msg<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), TransportError> {
    let frame = encode_frame(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Receives one message; `Ok(None)` when the peer finished the stream cleanly between frames.
///
/// The announced length is checked against [`MAX_FRAME_LEN`] before the body is buffered.
pub async fn recv_msg<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> Result<Option<T>, TransportError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(TransportError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len, max: MAX_FRAME_LEN }.into());
    }
    let mut frame = vec![0u8; FRAME_HEADER_LEN + len];
    frame[..FRAME_HEADER_LEN].copy_from_slice(&header);
    match recv.read_exact(&mut frame[FRAME_HEADER_LEN..]).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(TransportError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let (msg, _) = decode_frame(&frame)?;
    Ok(Some(msg))
}
