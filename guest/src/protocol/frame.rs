//! Framing: the one place that turns bytes into [`Message`]s and back.
//!
//! A frame is a 16-byte little-endian header followed by its payload:
//!
//! ```text
//! 0       1      2          4                 12           16
//! | version | kind | flags=0 | request id (u64) | len (u32) | payload (len bytes)
//! ```
//!
//! A header announcing more than the decoder's maximum payload is answered
//! with [`DecodeError::TooLarge`] *before* anything is allocated, and the
//! payload is then skipped without being buffered, so the stream stays in
//! sync and the connection can go on. Unknown versions, unknown kinds and
//! non-zero flags are skipped the same way. The decoder therefore never
//! holds more than `HEADER_LEN + max_payload` bytes.

use std::io::{self, Read, Write};

use super::error::{DecodeError, EncodeError, PayloadError};
use super::message::{kind_name, Body, Message};
use super::{MAX_PAYLOAD, PROTOCOL_VERSION};

/// Size of a frame header.
pub const HEADER_LEN: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Header {
    version: u8,
    kind: u8,
    flags: u16,
    id: u64,
    len: u32,
}

impl Header {
    fn parse(b: &[u8; HEADER_LEN]) -> Header {
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[4..12]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&b[12..16]);
        Header {
            version: b[0],
            kind: b[1],
            flags: u16::from_le_bytes([b[2], b[3]]),
            id: u64::from_le_bytes(id),
            len: u32::from_le_bytes(len),
        }
    }
}

enum State {
    /// Collecting the header; holds how many bytes are already in `header`.
    Header(usize),
    /// Collecting a payload of `header.len` bytes.
    Payload(Header, Vec<u8>),
    /// Discarding this many payload bytes of a rejected frame.
    Skip(u64),
}

/// Incremental decoder: feed it whatever bytes arrived, take out frames.
pub struct FrameDecoder {
    max_payload: u32,
    header: [u8; HEADER_LEN],
    state: State,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder with the protocol's limit, [`MAX_PAYLOAD`].
    pub fn new() -> Self {
        Self::with_max_payload(MAX_PAYLOAD)
    }

    /// A decoder with a smaller (or, for tests, any) payload limit.
    pub fn with_max_payload(max_payload: u32) -> Self {
        FrameDecoder {
            max_payload,
            header: [0; HEADER_LEN],
            state: State::Header(0),
        }
    }

    /// True when the decoder is between frames (a clean place to stop).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Header(0))
    }

    /// Bytes currently buffered (for tests of the memory bound).
    pub fn buffered(&self) -> usize {
        match &self.state {
            State::Header(n) => *n,
            State::Payload(_, buf) => HEADER_LEN + buf.capacity(),
            State::Skip(_) => 0,
        }
    }

    /// Consumes bytes from the front of `input` and returns the next frame,
    /// or `None` once `input` is used up without completing one. Call it
    /// again until it returns `None`.
    pub fn decode(&mut self, input: &mut &[u8]) -> Option<Result<Message, DecodeError>> {
        loop {
            match &mut self.state {
                State::Header(have) => {
                    let n = (HEADER_LEN - *have).min(input.len());
                    self.header[*have..*have + n].copy_from_slice(&input[..n]);
                    *input = &input[n..];
                    *have += n;
                    if *have < HEADER_LEN {
                        return None;
                    }
                    let h = Header::parse(&self.header);
                    if let Some(err) = self.reject(&h) {
                        self.state = State::Skip(u64::from(h.len));
                        return Some(Err(err));
                    }
                    // Bounded by `max_payload`, checked in `reject`.
                    self.state = State::Payload(h, Vec::with_capacity(h.len as usize));
                }
                State::Payload(h, buf) => {
                    let want = h.len as usize - buf.len();
                    let n = want.min(input.len());
                    buf.extend_from_slice(&input[..n]);
                    *input = &input[n..];
                    if buf.len() < h.len as usize {
                        return None;
                    }
                    let h = *h;
                    let State::Payload(_, payload) =
                        std::mem::replace(&mut self.state, State::Header(0))
                    else {
                        unreachable!("state was just matched as Payload");
                    };
                    return Some(finish(h, &payload));
                }
                State::Skip(left) => {
                    let n = (*left).min(input.len() as u64);
                    *input = &input[n as usize..];
                    *left -= n;
                    if *left > 0 {
                        return None;
                    }
                    self.state = State::Header(0);
                }
            }
        }
    }

    /// Why a frame must be skipped, judged from its header alone.
    fn reject(&self, h: &Header) -> Option<DecodeError> {
        if h.len > self.max_payload {
            return Some(DecodeError::TooLarge {
                id: h.id,
                len: h.len,
                max: self.max_payload,
            });
        }
        if h.version != PROTOCOL_VERSION {
            return Some(DecodeError::UnsupportedVersion {
                id: h.id,
                version: h.version,
            });
        }
        let Some(kind) = kind_name(h.kind) else {
            return Some(DecodeError::UnknownKind {
                id: h.id,
                kind: h.kind,
            });
        };
        if h.flags != 0 {
            return Some(DecodeError::BadPayload {
                id: h.id,
                kind,
                source: PayloadError::Invalid("header flags (must be 0)"),
            });
        }
        None
    }
}

fn finish(h: Header, payload: &[u8]) -> Result<Message, DecodeError> {
    let kind = kind_name(h.kind).unwrap_or("unknown");
    match Body::decode(h.kind, payload) {
        Ok(Some(body)) => Ok(Message { id: h.id, body }),
        Ok(None) => Err(DecodeError::UnknownKind {
            id: h.id,
            kind: h.kind,
        }),
        Err(source) => Err(DecodeError::BadPayload {
            id: h.id,
            kind,
            source,
        }),
    }
}

/// Appends one encoded frame to `out`. Fails, leaving `out` as it was, when
/// the payload exceeds [`MAX_PAYLOAD`].
pub fn encode(msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    msg.body.encode_payload(out);
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_PAYLOAD as usize {
        out.truncate(start);
        return Err(EncodeError::TooLarge {
            len,
            max: MAX_PAYLOAD,
        });
    }
    let h = &mut out[start..start + HEADER_LEN];
    h[0] = PROTOCOL_VERSION;
    h[1] = msg.body.kind();
    h[2..4].copy_from_slice(&0u16.to_le_bytes());
    h[4..12].copy_from_slice(&msg.id.to_le_bytes());
    // Fits: checked against MAX_PAYLOAD above.
    h[12..16].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Encodes one frame and writes it with a single `write_all`.
pub fn write_message<W: Write + ?Sized>(w: &mut W, msg: &Message) -> Result<(), EncodeError> {
    let mut buf = Vec::with_capacity(HEADER_LEN + 64);
    encode(msg, &mut buf)?;
    w.write_all(&buf)?;
    Ok(())
}

/// Blocking reader over any `Read`, built on [`FrameDecoder`].
pub struct FrameReader<R> {
    inner: R,
    decoder: FrameDecoder,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self::with_decoder(inner, FrameDecoder::new())
    }

    pub fn with_decoder(inner: R, decoder: FrameDecoder) -> Self {
        FrameReader {
            inner,
            decoder,
            buf: vec![0u8; 64 * 1024].into_boxed_slice(),
            pos: 0,
            len: 0,
        }
    }

    /// The next message. `Ok(None)` is a clean end of stream (between
    /// frames). An `Err` other than [`DecodeError::Io`] rejects one frame
    /// only; the next call reads the frame after it.
    pub fn read_message(&mut self) -> Result<Option<Message>, DecodeError> {
        loop {
            if self.pos < self.len {
                let mut input = &self.buf[self.pos..self.len];
                let out = self.decoder.decode(&mut input);
                self.pos = self.len - input.len();
                if let Some(r) = out {
                    return r.map(Some);
                }
                continue;
            }
            self.pos = 0;
            self.len = 0;
            let n = match self.inner.read(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                if self.decoder.is_idle() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "stream ended in the middle of a frame",
                )
                .into());
            }
            self.len = n;
        }
    }
}
