//! Bounds-checked primitives for message payloads.
//!
//! Every length read from the wire is checked against the bytes that are
//! actually left in the payload before anything is allocated, so a payload
//! can never make the decoder allocate more than its own size.

use super::error::PayloadError;

/// Reads little-endian primitives from one payload.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], PayloadError> {
        if self.buf.len() < n {
            return Err(PayloadError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], PayloadError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, PayloadError> {
        Ok(self.take(1, what)?[0])
    }

    pub(crate) fn bool(&mut self, what: &'static str) -> Result<bool, PayloadError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(PayloadError::Invalid(what)),
        }
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, PayloadError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, PayloadError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32, PayloadError> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, PayloadError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn i64(&mut self, what: &'static str) -> Result<i64, PayloadError> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn fixed<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], PayloadError> {
        self.array(what)
    }

    /// A `u32` length followed by that many bytes.
    pub(crate) fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], PayloadError> {
        let len = self.u32(what)? as usize;
        self.take(len, what)
    }

    pub(crate) fn string(&mut self, what: &'static str) -> Result<String, PayloadError> {
        let raw = self.bytes(what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| PayloadError::Invalid(what))
    }

    /// A `u32` element count. Each element takes at least `min_elem` bytes,
    /// so a count that cannot fit in what is left is rejected up front.
    pub(crate) fn count(
        &mut self,
        min_elem: usize,
        what: &'static str,
    ) -> Result<usize, PayloadError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_elem) > self.buf.len() {
            return Err(PayloadError::Truncated(what));
        }
        Ok(n)
    }

    /// True when nothing is left (for optional trailing fields).
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The rest of the payload, as raw data.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Fails when bytes are left over: a payload must be exactly one message.
    pub(crate) fn finish(self) -> Result<(), PayloadError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(PayloadError::TrailingBytes(self.buf.len()))
        }
    }
}

/// Appends little-endian primitives to a payload.
pub(crate) struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        Writer { out }
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    pub(crate) fn bool(&mut self, v: bool) {
        self.out.push(u8::from(v));
    }

    pub(crate) fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn i32(&mut self, v: i32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn i64(&mut self, v: i64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn raw(&mut self, v: &[u8]) {
        self.out.extend_from_slice(v);
    }

    /// Lengths above `u32::MAX` never reach here: the frame limit is far
    /// smaller and is checked by the encoder before the frame is sent.
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.out.extend_from_slice(v);
    }

    pub(crate) fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
}
