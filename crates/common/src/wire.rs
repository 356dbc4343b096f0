//! Reading and writing [`touchgate_proto`] frames on async streams.

use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use touchgate_proto::{FRAME_HEADER_LEN, FrameError, MAX_FRAME_LEN, decode, encode, frame_len};

/// Errors reading a frame.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream ended or failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    /// The frame was invalid.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads one frame; `Ok(None)` when the stream ended cleanly before a new frame.
pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<T>, WireError> {
    read_frame_limited(r, MAX_FRAME_LEN).await
}

/// [`read_frame`] with a smaller size limit (frames from a peer that has not signed in, stream
/// headers). Memory grows with the bytes that actually arrive, not with the length a header
/// announces, so a peer that announces large frames and sends nothing costs almost nothing.
pub async fn read_frame_limited<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<T>, WireError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = frame_len(header, max.min(MAX_FRAME_LEN))?;
    let mut body = Vec::with_capacity(len.min(4096));
    r.take(len as u64).read_to_end(&mut body).await?;
    if body.len() < len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(Some(decode(&body)?))
}

/// Writes one frame.
pub async fn write_frame<T: Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &T,
) -> std::io::Result<()> {
    w.write_all(&encode(msg)).await
}
