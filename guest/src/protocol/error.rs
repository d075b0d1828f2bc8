//! Errors of the wire protocol itself (framing and payload decoding).

use super::RequestId;

/// Why a payload could not be decoded into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload truncated while reading {0}")]
    Truncated(&'static str),
    #[error("invalid value for {0}")]
    Invalid(&'static str),
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
}

/// A frame that could not be turned into a message. Every variant but
/// [`DecodeError::Io`] leaves the stream at the next frame boundary, so the
/// receiver can answer with an error reply and keep the connection.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("request {id}: frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { id: RequestId, len: u32, max: u32 },
    #[error("request {id}: unsupported frame version {version}")]
    UnsupportedVersion { id: RequestId, version: u8 },
    #[error("request {id}: unknown message kind {kind:#04x}")]
    UnknownKind { id: RequestId, kind: u8 },
    #[error("request {id}: bad {kind} message: {source}")]
    BadPayload {
        id: RequestId,
        kind: &'static str,
        #[source]
        source: PayloadError,
    },
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
}

impl DecodeError {
    /// The request the broken frame belonged to, when the header was readable.
    pub fn request_id(&self) -> Option<RequestId> {
        match self {
            DecodeError::TooLarge { id, .. }
            | DecodeError::UnsupportedVersion { id, .. }
            | DecodeError::UnknownKind { id, .. }
            | DecodeError::BadPayload { id, .. } => Some(*id),
            DecodeError::Io(_) => None,
        }
    }
}

/// A message that cannot be put on the wire.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("message of {len} bytes exceeds the frame limit of {max} bytes")]
    TooLarge { len: usize, max: u32 },
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
}
