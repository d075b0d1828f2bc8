//! The spool: one anonymous file holding every file's bytes while the tree is built.
//!
//! Why a file and not memory: images run to gigabytes. Why anonymous (`O_TMPFILE`, or
//! created and unlinked at once where that is missing): nothing from the input ever gets a
//! name on the host, and the space is returned when the build ends, however it ends.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

const CHUNK: usize = 64 * 1024;

/// Where one file's bytes are in the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// Why an append failed: the reader (the input), the spool (the host), or the size.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("reading the input: {0}")]
    Read(io::Error),
    #[error("writing the spool file: {0}")]
    Write(io::Error),
    #[error("more than {limit} bytes")]
    TooLarge { limit: u64 },
}

/// Why a copy out of the spool failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("reading the spool file: {0}")]
    Spool(io::Error),
    #[error("writing the output: {0}")]
    Out(io::Error),
}

#[derive(Debug)]
pub struct Spool {
    file: File,
    len: u64,
}

impl Spool {
    /// An anonymous spool file in `dir`.
    pub fn new_in(dir: &Path) -> io::Result<Self> {
        Ok(Self {
            file: tempfile::tempfile_in(dir)?,
            len: 0,
        })
    }

    /// Bytes spooled so far.
    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Copies `reader` to the end of the spool, refusing it if it has more than `limit`
    /// bytes. Reads at most `limit + 1` bytes, so an endless or lying reader costs no more
    /// than the limit; a refused append leaves the spool as it was.
    pub fn append(&mut self, reader: &mut dyn Read, limit: u64) -> Result<Extent, AppendError> {
        let offset = self.len;
        match self.copy_in(reader, limit) {
            Ok(len) if len <= limit => {
                self.len = offset.saturating_add(len);
                Ok(Extent { offset, len })
            }
            result => {
                // Give the space back; the bytes past `len` are never read.
                let _ = self.file.set_len(offset);
                Err(result.err().unwrap_or(AppendError::TooLarge { limit }))
            }
        }
    }

    /// Appends bytes we already hold (e.g. the guest agent).
    pub fn append_bytes(&mut self, bytes: &[u8]) -> Result<Extent, AppendError> {
        let mut reader = bytes;
        self.append(&mut reader, bytes.len() as u64)
    }

    fn copy_in(&mut self, reader: &mut dyn Read, limit: u64) -> Result<u64, AppendError> {
        let mut reader = reader.take(limit.saturating_add(1));
        let mut buf = vec![0u8; CHUNK];
        let mut copied: u64 = 0;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(copied),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(AppendError::Read(e)),
            };
            let at = self.len.saturating_add(copied);
            self.file
                .write_all_at(&buf[..n], at)
                .map_err(AppendError::Write)?;
            copied = copied.saturating_add(n as u64);
        }
    }

    /// Writes one extent's bytes to `out`.
    pub fn copy_to(&self, extent: Extent, out: &mut dyn Write) -> Result<(), CopyError> {
        let mut buf = vec![0u8; CHUNK];
        let mut done: u64 = 0;
        while done < extent.len {
            let want = usize::try_from(extent.len - done)
                .unwrap_or(CHUNK)
                .min(CHUNK);
            let n = self.read_chunk(extent.offset.saturating_add(done), &mut buf[..want])?;
            out.write_all(&buf[..n]).map_err(CopyError::Out)?;
            done = done.saturating_add(n as u64);
        }
        Ok(())
    }

    /// One extent's bytes in memory, if it has at most `max` of them (small files only,
    /// e.g. /etc/passwd).
    pub fn read(&self, extent: Extent, max: u64) -> Result<Option<Vec<u8>>, CopyError> {
        if extent.len > max {
            return Ok(None);
        }
        let mut out = Vec::new();
        self.copy_to(extent, &mut out)?;
        Ok(Some(out))
    }

    fn read_chunk(&self, at: u64, buf: &mut [u8]) -> Result<usize, CopyError> {
        loop {
            match self.file.read_at(buf, at) {
                // We wrote these bytes; if they are gone, someone truncated our file.
                Ok(0) => {
                    return Err(CopyError::Spool(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the spool file is shorter than what was written to it",
                    )))
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CopyError::Spool(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spool() -> Spool {
        Spool::new_in(&std::env::temp_dir()).unwrap()
    }

    /// A reader that never ends.
    struct Endless;
    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            buf.fill(7);
            Ok(buf.len())
        }
    }

    #[test]
    fn an_oversized_or_endless_reader_is_refused_and_rolled_back() {
        let mut s = spool();
        let first = s.append_bytes(b"keep").unwrap();
        assert!(matches!(
            s.append(&mut Endless, 100_000),
            Err(AppendError::TooLarge { limit: 100_000 })
        ));
        assert!(matches!(
            s.append(&mut &b"12345"[..], 4),
            Err(AppendError::TooLarge { limit: 4 })
        ));
        assert_eq!(s.len, 4);
        assert_eq!(s.file.metadata().unwrap().len(), 4);
        let mut out = Vec::new();
        s.copy_to(first, &mut out).unwrap();
        assert_eq!(out, b"keep");
    }

    #[test]
    fn extents_round_trip() {
        let mut s = spool();
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let a = s.append_bytes(b"hello").unwrap();
        let b = s.append(&mut big.as_slice(), big.len() as u64).unwrap();
        let empty = s.append_bytes(b"").unwrap();
        assert_eq!(a, Extent { offset: 0, len: 5 });
        assert_eq!(b.offset, 5);
        assert_eq!(empty.len, 0);
        let mut out = Vec::new();
        s.copy_to(b, &mut out).unwrap();
        assert_eq!(out, big);
        assert_eq!(s.read(a, 5).unwrap().unwrap(), b"hello");
        assert_eq!(s.read(a, 4).unwrap(), None);
    }

    #[test]
    fn reading_past_the_end_is_an_error_not_a_hang() {
        let s = spool();
        let mut out = Vec::new();
        let bogus = Extent { offset: 0, len: 10 };
        assert!(matches!(
            s.copy_to(bogus, &mut out),
            Err(CopyError::Spool(_))
        ));
    }
}
