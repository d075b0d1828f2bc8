//! The host–guest wire protocol, shared by the guest agent and the host.
//!
//! - [`frame`]: the only code that parses bytes (framing and payloads,
//!   through the bounds-checked `wire` primitives); it yields [`Message`]s.
//! - [`message`]: the validated message types.
//! - [`flow`]: per-request credit windows, so neither side ever buffers more
//!   than [`INITIAL_WINDOW`] bytes of a stream.
//! - [`client`]: the host side: one [`Client`] per connection.
//!
//! Conversation rules:
//! - The host picks a request id for every request; ids of live requests on
//!   one connection must be distinct. Every frame of a request carries it,
//!   so frames of concurrent requests interleave freely.
//! - Every request ends with exactly one terminal reply: `Exited`, `Ok`,
//!   `WriteDone`, `ReadDone`, `HelloReply`, `Reseeded` or `Error`.
//! - Data streams (`Stdin`, `FileData`, `Stdout`/`Stderr`) are credit based:
//!   the sender may have at most [`INITIAL_WINDOW`] bytes unacknowledged per
//!   request and direction; the receiver returns `Credit` as it consumes.
//!   Sending beyond the credit is a `FlowControl` error for that request.

pub mod client;
pub mod error;
pub mod flow;
pub mod frame;
pub mod message;
mod wire;

pub use client::{
    BoundedOutput, Client, ClientError, ExecHandle, ExecResult, OutputEvent, MAX_COLLECTED,
};
pub use error::{DecodeError, EncodeError, PayloadError};
pub use frame::{encode, write_message, FrameDecoder, FrameReader, HEADER_LEN};
pub use message::*;

/// Identifies a request on one connection; chosen by the host.
pub type RequestId = u64;

/// The protocol version this build speaks (frame header byte 0).
pub const PROTOCOL_VERSION: u8 = 1;

/// The largest payload a frame may carry.
pub const MAX_PAYLOAD: u32 = 1 << 20;

/// The largest data chunk either side puts in one frame.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// Credit each side starts with, per request and direction.
/// A window bounds memory per stream: 64 concurrent execs hold at most
/// 16 MiB of buffered output on the host and of stdin in the guest.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
