//! Framing: `[payload length: u32 LE][fd count: u8][bincode payload]`.
//!
//! This module owns the byte format of one frame and its limits: the length
//! is checked against the maximum *before* anything is allocated, and the
//! payload decoder is bounded too, so no input can make either end allocate
//! without limit. It must never do I/O.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Bytes before the payload.
pub const HEADER_BYTES: usize = 5;
/// Default limit on a frame's payload.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 8 << 20;
/// No configuration may raise the frame limit above this.
pub const HARD_MAX_FRAME_BYTES: u32 = 64 << 20;
/// Most file descriptors one frame may carry.
pub const MAX_FDS_PER_FRAME: u8 = 4;

const DECODE_LIMIT: usize = HARD_MAX_FRAME_BYTES as usize;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Why a frame could not be read, written or understood.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: u64, max: u32 },
    #[error("frame declares {declared} file descriptors; at most {MAX_FDS_PER_FRAME} allowed")]
    TooManyFds { declared: u8 },
    #[error("frame declares {declared} file descriptors but {received} arrived")]
    FdMismatch { declared: usize, received: usize },
    /// Descriptors arrived that no frame declared (or more than a frame may
    /// carry, or the kernel had to drop some): all of them were closed.
    #[error("{count} file descriptors arrived that no frame declared")]
    StrayFds { count: usize },
    #[error("undecodable frame: {0}")]
    Decode(String),
    #[error("cannot encode frame: {0}")]
    Encode(String),
    #[error("connection closed mid-frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// The parsed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: u32,
    pub fds: u8,
}

/// Parses and checks a header against `max` payload bytes.
pub fn parse_header(bytes: &[u8; HEADER_BYTES], max: u32) -> Result<FrameHeader, FrameError> {
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if len > max {
        return Err(FrameError::TooLarge { len: len as u64, max });
    }
    if bytes[4] > MAX_FDS_PER_FRAME {
        return Err(FrameError::TooManyFds { declared: bytes[4] });
    }
    Ok(FrameHeader { len, fds: bytes[4] })
}

/// Appends one whole frame (header and payload) for `msg` to `out`.
pub fn encode_into<T: Serialize>(msg: &T, fds: u8, max: u32, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_BYTES]);
    if let Err(e) = bincode::serde::encode_into_std_write(msg, out, config()) {
        out.truncate(start);
        return Err(FrameError::Encode(e.to_string()));
    }
    let len = (out.len() - start - HEADER_BYTES) as u64;
    if len > max as u64 {
        out.truncate(start);
        return Err(FrameError::TooLarge { len, max });
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4] = fds;
    Ok(())
}

/// One whole frame for `msg`.
pub fn encode<T: Serialize>(msg: &T, fds: u8, max: u32) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(64);
    encode_into(msg, fds, max, &mut out)?;
    Ok(out)
}

/// Decodes a payload; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (value, used) =
        bincode::serde::decode_from_slice(payload, config()).map_err(|e| FrameError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::Decode(format!("{} trailing bytes", payload.len() - used)));
    }
    Ok(value)
}
