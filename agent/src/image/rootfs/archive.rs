//! Tar streams (tarballs and OCI layers) into checked layer entries.
//!
//! Compression is recognised by its magic bytes, never by a file name or media type, and
//! decoded in pure Rust (flate2's Rust backend, ruzstd). What the `tar` crate reads on its
//! own (headers, GNU long names, PAX records, skipped padding) goes through a [`Meter`]:
//! the crate holds long names and PAX records in memory at whatever size the header
//! claims, so each entry's share is capped, and so is the stream's average, which bounds
//! the time a decompression bomb of headers can cost.

use std::cell::Cell;
use std::io::{self, BufRead, BufReader, Cursor, Read, Seek};
use std::path::Path;
use std::rc::Rc;

use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
use tar::EntryType;

use super::path::{check_symlink_target, EntryName, EntryPath};
use super::spool::Spool;
use super::tree::{EntryKind, Layer, Meta};
use super::{open_file, spool_file, After, Budget, RootfsError};

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Most bytes of headers, long names and PAX records for one entry.
const META_PER_ENTRY: u64 = 1 << 20;
/// On average over a stream, at most this much per entry (after a first [`META_PER_ENTRY`]).
const META_AVERAGE: u64 = 8 << 10;

/// The OCI whiteout prefix and opaque-directory marker.
const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const AUFS_META: &[u8] = b".wh..wh.";

/// Whether `.wh.` entries are OCI whiteouts (layers) or plain files (tarballs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    Off,
    Oci,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Plain,
    Gzip,
    Zstd,
}

impl Compression {
    fn name(self) -> &'static str {
        match self {
            Compression::Plain => "uncompressed",
            Compression::Gzip => "gzip-compressed",
            Compression::Zstd => "zstd-compressed",
        }
    }
}

/// Reads a tarball file as one layer, whiteouts off.
pub fn read_tarball(
    path: &Path,
    spool: &mut Spool,
    budget: &mut Budget,
) -> Result<Layer, RootfsError> {
    let file = open_file(path)?;
    read_tar(BufReader::new(file), Whiteouts::Off, spool, budget).map_err(|e| match e {
        RootfsError::Tar {
            compression,
            after: After(None),
            source,
        } => RootfsError::Source {
            path: path.to_owned(),
            problem: format!(
                "not a tar archive ({compression}: {source}); give a tarball as made by `docker export` or `tar -C ROOT -c .`"
            ),
        },
        other => other,
    })
}

/// A reader with its first bytes read and put back in front.
type Sniffed<R> = io::Chain<Cursor<Vec<u8>>, R>;

/// Peeks at the first bytes; returns the compression and a reader that still yields them.
fn sniff<R: Read>(mut reader: R) -> io::Result<(Compression, Sniffed<R>)> {
    let mut head = Vec::with_capacity(ZSTD_MAGIC.len());
    (&mut reader)
        .take(ZSTD_MAGIC.len() as u64)
        .read_to_end(&mut head)?;
    Ok((compression_of(&head), Cursor::new(head).chain(reader)))
}

/// The compression a stream starting with `head` uses, by its magic bytes.
pub fn compression_of(head: &[u8]) -> Compression {
    if head.starts_with(GZIP_MAGIC) {
        Compression::Gzip
    } else if head.starts_with(ZSTD_MAGIC) {
        Compression::Zstd
    } else {
        Compression::Plain
    }
}

fn decoder<'r, R: Read + 'r>(compression: Compression, reader: R) -> Box<dyn Read + 'r> {
    match compression {
        Compression::Plain => Box::new(reader),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(ZstdFrames::new(reader)),
    }
}

/// Reads one tar stream (any compression) into a layer; file bytes go to the spool.
pub fn read_tar<R: Read>(
    reader: R,
    whiteouts: Whiteouts,
    spool: &mut Spool,
    budget: &mut Budget,
) -> Result<Layer, RootfsError> {
    let (compression, reader) = sniff(reader).map_err(|source| RootfsError::Tar {
        compression: Compression::Plain.name(),
        after: After(None),
        source,
    })?;
    let mut metering = Metering::new(compression);
    let mut archive = tar::Archive::new(Metered {
        inner: decoder(compression, reader),
        meter: Rc::clone(&metering.meter),
    });
    let mut entries = archive.entries().map_err(|e| metering.tar_error(e))?;
    let mut reading = Reading {
        whiteouts,
        spool,
        budget,
        layer: Layer::default(),
    };
    while let Some(mut entry) = metering.next(&mut entries)? {
        let raw = entry.path_bytes().into_owned();
        reading.entry(&mut entry, &raw, &metering)?;
        metering.last = Some(EntryName::new(&raw));
    }
    Ok(reading.layer)
}

/// A regular file in a plain tar: where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The name, normalised.
    pub path: EntryPath,
    pub offset: u64,
    pub size: u64,
}

/// Lists the regular files of a plain tar without reading their data (it is seeked
/// over): an oci-archive is read in place, never unpacked. Members whose names are not
/// valid relative paths are left out (nothing could ask for them).
pub fn list_members<R: Read + Seek>(
    reader: R,
    max_entries: u64,
) -> Result<Vec<Member>, RootfsError> {
    let mut metering = Metering::new(Compression::Plain);
    let mut archive = tar::Archive::new(Metered {
        inner: reader,
        meter: Rc::clone(&metering.meter),
    });
    let mut entries = archive
        .entries_with_seek()
        .map_err(|e| metering.tar_error(e))?;
    let mut members = Vec::new();
    while let Some(entry) = metering.next(&mut entries)? {
        let raw = entry.path_bytes().into_owned();
        if metering.entries > max_entries {
            return Err(RootfsError::TooManyEntries {
                entry: EntryName::new(&raw),
                limit: max_entries,
            });
        }
        let is_file = matches!(
            entry.header().entry_type(),
            EntryType::Regular | EntryType::Continuous
        );
        if let (true, Ok(path)) = (is_file, EntryPath::parse(&raw)) {
            members.push(Member {
                path,
                offset: entry.raw_file_position(),
                size: entry.size(),
            });
        }
        metering.last = Some(EntryName::new(&raw));
    }
    Ok(members)
}

/// Bounds what the `tar` crate reads outside file data, entry by entry.
struct Metering {
    meter: Rc<Meter>,
    compression: Compression,
    /// The last entry read, for errors.
    last: Option<EntryName>,
    /// Entries read from this stream so far.
    entries: u64,
    /// Bytes the tar crate has read outside file data so far.
    meta_used: u64,
}

impl Metering {
    fn new(compression: Compression) -> Self {
        Self {
            meter: Rc::new(Meter::default()),
            compression,
            last: None,
            entries: 0,
            meta_used: 0,
        }
    }

    /// The next entry, its headers, long names and PAX records read within the limits.
    fn next<'a, R: Read>(
        &mut self,
        entries: &mut tar::Entries<'a, R>,
    ) -> Result<Option<tar::Entry<'a, R>>, RootfsError> {
        let cap = META_PER_ENTRY
            .saturating_add(META_AVERAGE.saturating_mul(self.entries.saturating_add(1)));
        let allowance = META_PER_ENTRY.min(cap.saturating_sub(self.meta_used));
        let before = self.meter.read.get();
        self.meter.limit.set(before.saturating_add(allowance));
        let next = entries.next();
        self.meta_used = self
            .meta_used
            .saturating_add(self.meter.read.get().saturating_sub(before));
        match next {
            None => Ok(None),
            Some(Ok(entry)) => {
                self.entries = self.entries.saturating_add(1);
                Ok(Some(entry))
            }
            Some(Err(_)) if self.meter.tripped.get() => Err(RootfsError::MetadataTooLarge {
                after: After(self.last.clone()),
                limit: cap.min(META_PER_ENTRY),
            }),
            Some(Err(e)) => Err(self.tar_error(e)),
        }
    }

    fn tar_error(&self, source: io::Error) -> RootfsError {
        RootfsError::Tar {
            compression: self.compression.name(),
            after: After(self.last.clone()),
            source,
        }
    }

    /// Lets exactly `len` bytes of file data through.
    fn allow_data(&self, len: u64) {
        self.meter
            .limit
            .set(self.meter.read.get().saturating_add(len));
    }
}

/// The state of one stream being read into a layer.
struct Reading<'a> {
    whiteouts: Whiteouts,
    spool: &'a mut Spool,
    budget: &'a mut Budget,
    layer: Layer,
}

impl Reading<'_> {
    /// Checks one entry and adds it to the layer.
    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw: &[u8],
        metering: &Metering,
    ) -> Result<(), RootfsError> {
        let name = || EntryName::new(raw);
        self.budget.entry(raw)?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            // Archive-wide defaults (e.g. git archive's commit id), not an entry.
            return Ok(());
        }
        let path = EntryPath::parse(raw).map_err(|problem| RootfsError::BadPath {
            entry: name(),
            problem,
        })?;
        if self.whiteouts == Whiteouts::Oci {
            match whiteout(&path, raw)? {
                None => {}
                Some(Whiteout::Delete(victim)) => {
                    self.layer.push(victim, EntryKind::Whiteout);
                    return Ok(());
                }
                Some(Whiteout::Opaque(dir)) => {
                    self.layer.push(dir, EntryKind::Opaque);
                    return Ok(());
                }
                Some(Whiteout::Nothing) => return Ok(()),
            }
        }
        let meta = meta_of(entry.header(), raw)?;
        let kind = match kind {
            EntryType::Regular | EntryType::Continuous if raw.ends_with(b"/") => {
                // Pre-POSIX tars mark directories with a trailing slash only.
                EntryKind::Dir(meta)
            }
            EntryType::Regular | EntryType::Continuous => self.file(entry, raw, meta, metering)?,
            EntryType::Directory => EntryKind::Dir(meta),
            EntryType::Symlink => self.symlink(entry, raw, &path, meta)?,
            EntryType::Link => self.hard_link(entry, raw)?,
            EntryType::Char => return Err(special(raw, "character device")),
            EntryType::Block => return Err(special(raw, "block device")),
            EntryType::Fifo => return Err(special(raw, "FIFO")),
            EntryType::GNUSparse => {
                return Err(RootfsError::UnsupportedType {
                    entry: name(),
                    kind: "GNU sparse file (re-create the tarball without --sparse)".into(),
                })
            }
            other => {
                return Err(RootfsError::UnsupportedType {
                    entry: name(),
                    kind: format!("{other:?} ({:?})", char::from(other.as_byte())),
                })
            }
        };
        self.layer.push(path, kind);
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw: &[u8],
        meta: Meta,
        metering: &Metering,
    ) -> Result<EntryKind, RootfsError> {
        let declared = entry.size();
        // Exactly the file's bytes get through the meter; `spool_file` checks the claim
        // against the limits before reading any of them.
        metering.allow_data(declared);
        let extent =
            spool_file(self.spool, self.budget, raw, declared, entry).map_err(|e| match e {
                RootfsError::Read { source, .. } => metering.tar_error(source),
                other => other,
            })?;
        if extent.len != declared {
            return Err(RootfsError::Truncated {
                entry: EntryName::new(raw),
                declared,
                got: extent.len,
            });
        }
        Ok(EntryKind::File(meta, extent))
    }

    fn symlink<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        raw: &[u8],
        path: &EntryPath,
        meta: Meta,
    ) -> Result<EntryKind, RootfsError> {
        let target = entry
            .link_name_bytes()
            .map(|t| t.into_owned())
            .unwrap_or_default();
        check_symlink_target(path, &target).map_err(|problem| RootfsError::BadSymlink {
            entry: EntryName::new(raw),
            target: EntryName::new(&target),
            problem,
        })?;
        self.budget.names(raw, target.len())?;
        Ok(EntryKind::Symlink(meta, target.into_boxed_slice()))
    }

    fn hard_link<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        raw: &[u8],
    ) -> Result<EntryKind, RootfsError> {
        let target = entry
            .link_name_bytes()
            .map(|t| t.into_owned())
            .unwrap_or_default();
        let target_path =
            EntryPath::parse(&target).map_err(|problem| RootfsError::BadLinkTarget {
                entry: EntryName::new(raw),
                target: EntryName::new(&target),
                problem,
            })?;
        self.budget.names(raw, target.len())?;
        Ok(EntryKind::HardLink(target_path))
    }
}

/// What an OCI whiteout entry does.
enum Whiteout {
    /// `.wh.NAME`: delete NAME (and its subtree) from the lower layers.
    Delete(EntryPath),
    /// `.wh..wh..opq` in D: delete D's children from the lower layers.
    Opaque(EntryPath),
    /// Other `.wh..wh.` names are aufs bookkeeping: whiteouts of nothing.
    Nothing,
}

/// Whether the entry at `path` is an OCI whiteout, and what it deletes.
fn whiteout(path: &EntryPath, raw: &[u8]) -> Result<Option<Whiteout>, RootfsError> {
    let (Some(parent), Some(file_name)) = (path.parent(), path.file_name()) else {
        return Ok(None);
    };
    if file_name == OPAQUE {
        return Ok(Some(Whiteout::Opaque(parent)));
    }
    if file_name.starts_with(AUFS_META) {
        return Ok(Some(Whiteout::Nothing));
    }
    let Some(victim) = file_name.strip_prefix(WHITEOUT) else {
        return Ok(None);
    };
    // `.wh.` alone, `.wh..` and `.wh...` would name the directory itself or its parent.
    let victim = parent
        .join(victim)
        .map_err(|problem| RootfsError::BadWhiteout {
            entry: EntryName::new(raw),
            problem,
        })?;
    Ok(Some(Whiteout::Delete(victim)))
}

fn special(raw: &[u8], kind: &'static str) -> RootfsError {
    RootfsError::Special {
        entry: EntryName::new(raw),
        kind,
    }
}

/// Permissions, owners and mtime from a tar header (PAX uid/gid already applied by the
/// `tar` crate).
fn meta_of(header: &tar::Header, raw: &[u8]) -> Result<Meta, RootfsError> {
    let bad = |source| RootfsError::BadHeader {
        entry: EntryName::new(raw),
        source,
    };
    let id = |field: &'static str, value: u64| {
        u32::try_from(value).map_err(|_| RootfsError::BadOwner {
            entry: EntryName::new(raw),
            field,
            value,
        })
    };
    let mode = header.mode().map_err(bad)?;
    let uid = id("uid", header.uid().map_err(bad)?)?;
    let gid = id("gid", header.gid().map_err(bad)?)?;
    let mtime = header.mtime().map_err(bad)?;
    Ok(Meta::new(mode, uid, gid, mtime))
}

/// Counts what the `tar` crate reads and stops it at a limit the caller sets per entry.
#[derive(Default)]
struct Meter {
    read: Cell<u64>,
    limit: Cell<u64>,
    tripped: Cell<bool>,
}

struct Metered<R> {
    inner: R,
    meter: Rc<Meter>,
}

/// Seeks (over member data, listing an oci-archive) are not reads: not counted.
impl<R: Seek> Seek for Metered<R> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = self.meter.limit.get().saturating_sub(self.meter.read.get());
        if room == 0 && !buf.is_empty() {
            self.meter.tripped.set(true);
            return Err(io::Error::other("over the metadata limit"));
        }
        let want = usize::try_from(room).unwrap_or(usize::MAX).min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        self.meter
            .read
            .set(self.meter.read.get().saturating_add(n as u64));
        Ok(n)
    }
}

/// A zstd stream of any number of frames, skippable frames skipped (zstd:chunked layers
/// end with one), each frame's checksum checked when it has one.
struct ZstdFrames<R: Read> {
    source: BufReader<R>,
    decoder: FrameDecoder,
    in_frame: bool,
}

impl<R: Read> ZstdFrames<R> {
    fn new(source: R) -> Self {
        Self {
            source: BufReader::new(source),
            // The default window limit (128 MiB) bounds what a frame header can make us
            // allocate.
            decoder: FrameDecoder::new(),
            in_frame: false,
        }
    }

    /// Starts the next frame; `false` at the end of the input.
    fn next_frame(&mut self) -> io::Result<bool> {
        loop {
            if self.source.fill_buf()?.is_empty() {
                return Ok(false);
            }
            match self.decoder.reset(&mut self.source) {
                Ok(()) => return Ok(true),
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped = io::copy(
                        &mut (&mut self.source).take(u64::from(length)),
                        &mut io::sink(),
                    )?;
                    if skipped != u64::from(length) {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "zstd: truncated skippable frame",
                        ));
                    }
                }
                Err(e) => return Err(io::Error::other(format!("zstd: {e}"))),
            }
        }
    }

    fn check_frame_checksum(&self) -> io::Result<()> {
        match (
            self.decoder.get_checksum_from_data(),
            self.decoder.get_calculated_checksum(),
        ) {
            (Some(stored), Some(computed)) if stored != computed => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "zstd: frame checksum mismatch",
            )),
            _ => Ok(()),
        }
    }
}

impl<R: Read> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_frame {
                if !self.next_frame()? {
                    return Ok(0);
                }
                self.in_frame = true;
            }
            if self.decoder.can_collect() > 0 {
                return self.decoder.read(buf);
            }
            if self.decoder.is_finished() {
                self.check_frame_checksum()?;
                self.in_frame = false;
                continue;
            }
            self.decoder
                .decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBlocks(1))
                .map_err(|e| io::Error::other(format!("zstd: {e}")))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use proptest::prelude::*;

    use tar::Header;

    use super::super::test_support::*;
    use super::super::tree::EntryKind;
    use super::super::{PathError, TargetError};
    use super::*;

    /// `sample_tar()` compressed by the zstd CLI (v1.5.4, `zstd -19`, content checksum on):
    /// a decoder other than ruzstd's own encoder made this.
    const SAMPLE_TAR_ZST: &[u8] = &[
        0x28, 0xb5, 0x2f, 0xfd, 0x64, 0x00, 0x17, 0xbd, 0x06, 0x00, 0xa2, 0x48, 0x1b, 0x17, 0x70,
        0xad, 0x03, 0x60, 0x71, 0x50, 0x4d, 0x2d, 0x38, 0x85, 0xf5, 0x3e, 0x74, 0x90, 0x90, 0x84,
        0x50, 0x53, 0x82, 0x55, 0xb1, 0x70, 0x65, 0x11, 0x42, 0xf7, 0xb6, 0x58, 0xde, 0x89, 0x82,
        0x1c, 0xc9, 0xa2, 0x5a, 0x6c, 0x94, 0x8b, 0xd8, 0x93, 0xcb, 0x79, 0xd9, 0x79, 0x41, 0x7c,
        0xcd, 0x01, 0x4f, 0x0a, 0x83, 0x33, 0x33, 0x8c, 0x71, 0x2a, 0xc8, 0x61, 0x54, 0x24, 0x25,
        0xd6, 0xa2, 0xff, 0xff, 0x21, 0x87, 0x51, 0xc0, 0x4d, 0xcc, 0xc1, 0xb6, 0xba, 0x06, 0xef,
        0xfa, 0x6e, 0xc3, 0x3d, 0x0c, 0x9a, 0x32, 0x3e, 0x66, 0x57, 0x6d, 0x3a, 0x0d, 0x82, 0x88,
        0x4d, 0x29, 0xa9, 0x6b, 0xef, 0x32, 0x7a, 0xff, 0x9b, 0xbd, 0x97, 0xae, 0xba, 0xff, 0xaa,
        0x22, 0x02, 0x25, 0x20, 0x00, 0x49, 0x02, 0x49, 0x32, 0xe4, 0x01, 0xff, 0xf1, 0x0a, 0xd8,
        0x07, 0x30, 0xaa, 0x1e, 0x1b, 0x60, 0x75, 0x42, 0x0e, 0x37, 0x13, 0x03, 0x62, 0xc0, 0x8c,
        0x65, 0x54, 0x5d, 0x0d, 0x10, 0xee, 0x02, 0xf0, 0x08, 0xb3, 0x03, 0xda, 0x54, 0x06, 0x20,
        0x07, 0xd8, 0x1d, 0xac, 0x42, 0x02, 0x16, 0xb0, 0x18, 0x54, 0x3c, 0x60, 0x3d, 0x6c, 0x65,
        0x52, 0x33, 0x6e, 0x90, 0x95, 0xfa, 0x83, 0x89, 0xc7, 0x00, 0x24, 0x1d, 0xf5, 0xaa, 0x1c,
        0x8c, 0x6a, 0xba, 0x2b, 0x1c, 0x69, 0xe2, 0x66, 0x56, 0x47, 0x64, 0x40, 0x8a, 0xd0, 0x87,
        0xe2, 0xc0, 0x49, 0x66, 0x63, 0xbc, 0x01, 0x94, 0x00, 0xa6, 0x00, 0xe6, 0x93, 0x71, 0x03,
        0x10, 0x7d, 0x0a, 0x66,
    ];

    fn refused(tarball: Vec<u8>) -> RootfsError {
        build_tar(&tarball, &Limits::default()).unwrap_err()
    }

    /// A tarball with one entry.
    fn one(name: &[u8], kind: EntryType, data: &[u8], link: Option<&[u8]>) -> Vec<u8> {
        let mut t = TarBuilder::new();
        t.entry(name, kind, 0o644, data, link);
        t.finish()
    }

    fn assert_names(err: &RootfsError, name: &str) {
        let text = err.to_string();
        assert!(text.contains(&format!("\"{name}\"")), "{text}");
    }

    #[test]
    fn hostile_paths_are_refused_naming_the_entry() {
        for (name, problem) in [
            ("/etc/passwd", PathError::Absolute),
            ("../escape", PathError::DotDot),
            ("a/../../escape", PathError::DotDot),
            ("./ok/../..", PathError::DotDot),
        ] {
            let err = refused(one(name.as_bytes(), EntryType::Regular, b"x", None));
            assert!(
                matches!(&err, RootfsError::BadPath { problem: p, .. } if *p == problem),
                "{name}: {err}"
            );
            assert_names(&err, name);
        }
        let err = refused(one(b"", EntryType::Regular, b"x", None));
        assert!(
            matches!(
                err,
                RootfsError::BadPath {
                    problem: PathError::Empty,
                    ..
                }
            ),
            "{err}"
        );
        let long = "d/".repeat(2100) + "f";
        let err = refused(one(long.as_bytes(), EntryType::Regular, b"x", None));
        assert!(
            matches!(
                err,
                RootfsError::BadPath {
                    problem: PathError::TooLong(_),
                    ..
                }
            ),
            "{err}"
        );
        // The root may be named ".", "./" or "/"-less; "/" alone is absolute.
        let err = refused(one(b"/", EntryType::Directory, b"", None));
        assert!(
            matches!(
                err,
                RootfsError::BadPath {
                    problem: PathError::Absolute,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn devices_fifos_and_unknown_types_are_refused_naming_them() {
        for (kind, what) in [
            (EntryType::Char, "character device"),
            (EntryType::Block, "block device"),
            (EntryType::Fifo, "FIFO"),
        ] {
            let err = refused(one(b"dev/thing", kind, b"", None));
            assert!(
                matches!(&err, RootfsError::Special { kind, .. } if *kind == what),
                "{err}"
            );
            assert_names(&err, "dev/thing");
        }
        for kind in [
            EntryType::new(b'V'),
            EntryType::new(b'Z'),
            EntryType::new(b'N'),
        ] {
            let err = refused(one(b"odd", kind, b"", None));
            assert!(matches!(err, RootfsError::UnsupportedType { .. }), "{err}");
            assert_names(&err, "odd");
        }
    }

    #[test]
    fn the_symlink_escape_is_refused() {
        let mut t = TarBuilder::new();
        t.symlink("a", "/etc");
        t.file("a/x", b"owned", 0o644);
        let err = refused(t.finish());
        assert!(matches!(err, RootfsError::ParentNotDir { .. }), "{err}");
        assert_names(&err, "a/x");
        // A file in the way is no better.
        let mut t = TarBuilder::new();
        t.file("f", b"", 0o644);
        t.dir("f/d", 0o755);
        assert!(matches!(
            refused(t.finish()),
            RootfsError::ParentNotDir { .. }
        ));
    }

    #[test]
    fn climbing_symlinks_are_refused_and_absolute_ones_kept() {
        let err = refused(one(
            b"usr/lib/x",
            EntryType::Symlink,
            b"",
            Some(b"../../../etc/shadow"),
        ));
        assert!(
            matches!(
                err,
                RootfsError::BadSymlink {
                    problem: TargetError::Escapes,
                    ..
                }
            ),
            "{err}"
        );
        assert_names(&err, "usr/lib/x");
        let err = refused(one(b"empty", EntryType::Symlink, b"", None));
        assert!(
            matches!(
                err,
                RootfsError::BadSymlink {
                    problem: TargetError::Empty,
                    ..
                }
            ),
            "{err}"
        );
        let out = build_tar(
            &one(b"etc", EntryType::Symlink, b"", Some(b"/host/etc")),
            &Limits::default(),
        )
        .unwrap();
        let etc = entries(&out.bytes)
            .map(Result::unwrap)
            .find(|e| e.name == b"etc")
            .unwrap();
        assert_eq!(etc.data, b"/host/etc");
    }

    #[test]
    fn hard_links_must_name_an_earlier_regular_file() {
        let mut t = TarBuilder::new();
        t.hardlink("early", "later");
        t.file("later", b"x", 0o644);
        let err = refused(t.finish());
        assert!(matches!(err, RootfsError::HardLink { .. }), "{err}");
        assert_names(&err, "early");
        let err = refused(one(b"l", EntryType::Link, b"", Some(b"/etc/shadow")));
        assert!(
            matches!(
                err,
                RootfsError::BadLinkTarget {
                    problem: PathError::Absolute,
                    ..
                }
            ),
            "{err}"
        );
        let err = refused(one(b"l", EntryType::Link, b"", Some(b"../x")));
        assert!(
            matches!(
                err,
                RootfsError::BadLinkTarget {
                    problem: PathError::DotDot,
                    ..
                }
            ),
            "{err}"
        );
        let mut t = TarBuilder::new();
        t.symlink("s", "x");
        t.hardlink("l", "s");
        assert!(matches!(refused(t.finish()), RootfsError::HardLink { .. }));
    }

    #[test]
    fn hard_links_round_trip_as_links() {
        let out = build_tar(&sample_tar(), &Limits::default()).unwrap();
        let all: Vec<_> = entries(&out.bytes).map(Result::unwrap).collect();
        let tool = all.iter().find(|e| e.name == b"usr/bin/tool").unwrap();
        let tool2 = all.iter().find(|e| e.name == b"usr/bin/tool2").unwrap();
        assert_eq!(
            (tool.ino, tool.mode, tool.nlink),
            (tool2.ino, tool2.mode, 2)
        );
        assert_eq!(tool.data, b"#!/bin/sh\necho hi\n");
        assert!(tool2.data.is_empty());
        assert_eq!(
            find_file(&out.bytes, "usr/bin/tool2").unwrap(),
            Some(tool.data)
        );
        let names = names_of(&out.bytes);
        assert_eq!(
            names,
            vec![
                ".",
                "bin",
                "dev",
                "dev/console",
                "etc",
                "etc/hostname",
                "init",
                "usr",
                "usr/bin",
                "usr/bin/tool",
                "usr/bin/tool2",
                "usr/share",
                "usr/share/doc",
                "usr/share/doc/README"
            ]
        );
        assert_eq!(out.built.file_bytes, (7 + 18 + 5 + INIT.len()) as u64);
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn zstd(bytes: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(bytes, ruzstd::encoding::CompressionLevel::Fastest)
    }

    #[test]
    fn gzip_and_zstd_give_the_same_archive_as_plain() {
        let plain = sample_tar();
        let expected = build_tar(&plain, &Limits::default()).unwrap().bytes;
        let mut multi_frame = zstd(&plain[..1000]);
        // A skippable frame between the data frames (as zstd:chunked writes).
        multi_frame.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        multi_frame.extend_from_slice(&zstd(&plain[1000..]));
        let mut multi_member = gzip(&plain[..700]);
        multi_member.extend_from_slice(&gzip(&plain[700..]));
        for (what, compressed) in [
            ("gzip", gzip(&plain)),
            ("gzip, two members", multi_member),
            ("zstd", zstd(&plain)),
            ("zstd, three frames", multi_frame),
            ("zstd CLI", SAMPLE_TAR_ZST.to_vec()),
        ] {
            let got = build_tar(&compressed, &Limits::default()).unwrap().bytes;
            assert!(got == expected, "{what}");
        }
    }

    #[test]
    fn a_corrupt_zstd_checksum_is_an_error() {
        let mut good = Vec::new();
        ZstdFrames::new(SAMPLE_TAR_ZST)
            .read_to_end(&mut good)
            .unwrap();
        assert_eq!(good, sample_tar());
        // The checksum is the frame's last 4 bytes. (A tar read stops at its end marker,
        // before them, so this shows for whole streams and frames before the last.)
        let mut bad = SAMPLE_TAR_ZST.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        let err = ZstdFrames::new(bad.as_slice())
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        let trailing = [SAMPLE_TAR_ZST, b"junk"].concat();
        assert!(ZstdFrames::new(trailing.as_slice())
            .read_to_end(&mut Vec::new())
            .is_err());
    }

    #[test]
    fn garbage_is_not_a_tarball() {
        let err = refused(b"this is not a tar archive, just some text that goes on".repeat(20));
        assert!(matches!(err, RootfsError::Source { .. }), "{err}");
        let err = refused(gzip(b"gzip of nothing useful"));
        assert!(err.to_string().contains("gzip"), "{err}");
    }

    #[test]
    fn truncated_data_is_an_error() {
        let tarball = one(b"big", EntryType::Regular, &[7u8; 2000], None);
        let err = refused(tarball[..1500].to_vec());
        assert!(
            matches!(
                err,
                RootfsError::Truncated {
                    declared: 2000,
                    got: 988,
                    ..
                }
            ),
            "{err}"
        );
        assert_names(&err, "big");
    }

    #[test]
    fn limits_are_checked_before_reading() {
        let tiny = |f: fn(&mut Limits)| {
            let mut limits = Limits::default();
            f(&mut limits);
            limits
        };
        let mut t = TarBuilder::new();
        for i in 0..5 {
            t.file(&format!("f{i}"), &[1u8; 100], 0o644);
        }
        let five = t.finish();
        let err = build_tar(&five, &tiny(|l| l.max_entries = 4)).unwrap_err();
        assert!(
            matches!(err, RootfsError::TooManyEntries { limit: 4, .. }),
            "{err}"
        );
        assert_names(&err, "f4");
        let err = build_tar(&five, &tiny(|l| l.max_file_bytes = 99)).unwrap_err();
        assert!(
            matches!(err, RootfsError::FileTooLarge { limit: 99, .. }),
            "{err}"
        );
        let err = build_tar(&five, &tiny(|l| l.max_total_bytes = 450)).unwrap_err();
        assert!(
            matches!(err, RootfsError::TotalTooLarge { limit: 450, .. }),
            "{err}"
        );
        assert_names(&err, "f4");
        let err = build_tar(&five, &tiny(|l| l.max_name_bytes = 9)).unwrap_err();
        assert!(matches!(err, RootfsError::NamesTooLarge { .. }), "{err}");
        assert!(build_tar(&five, &tiny(|l| l.max_total_bytes = 500)).is_ok());

        // A header claiming 100 GiB with nothing behind it: refused on the claim.
        let mut lying = one(b"huge", EntryType::Regular, b"", None);
        let mut header = Header::new_gnu();
        header.as_mut_bytes().copy_from_slice(&lying[..512]);
        header.set_size(100 << 30);
        header.set_cksum();
        lying[..512].copy_from_slice(header.as_bytes());
        let err = refused(lying);
        assert!(matches!(err, RootfsError::FileTooLarge { .. }), "{err}");
    }

    #[test]
    fn a_pax_or_long_name_bomb_is_refused_without_reading_it_into_memory() {
        // A PAX header claiming 8 MiB of records, highly compressible.
        let mut t = TarBuilder::new();
        t.entry(
            b"PaxHeaders/x",
            EntryType::XHeader,
            0o644,
            &vec![b'a'; 8 << 20],
            None,
        );
        t.file("x", b"", 0o644);
        let err = refused(gzip(&t.finish()));
        assert!(matches!(err, RootfsError::MetadataTooLarge { .. }), "{err}");
        let mut t = TarBuilder::new();
        t.entry(
            b"././@LongLink",
            EntryType::GNULongName,
            0o644,
            &vec![b'a'; 2 << 20],
            None,
        );
        t.file("x", b"", 0o644);
        assert!(matches!(
            refused(t.finish()),
            RootfsError::MetadataTooLarge { .. }
        ));
    }

    #[test]
    fn long_names_and_pax_headers_work() {
        let long = "dir/".repeat(40) + "file";
        let mut t = TarBuilder::new();
        t.file(&long, b"deep", 0o644);
        t.entry(
            b"pax_global_header",
            EntryType::XGlobalHeader,
            0o644,
            b"52 comment=0123456789012345678901234567890123456789\n",
            None,
        );
        let out = build_tar(&t.finish(), &Limits::default()).unwrap();
        assert_eq!(find_file(&out.bytes, &long).unwrap(), Some(&b"deep"[..]));
        assert!(!names_of(&out.bytes).iter().any(|n| n.contains("pax")));
    }

    #[test]
    fn whiteouts_are_files_in_a_tarball_and_whiteouts_in_a_layer() {
        let mut t = TarBuilder::new();
        t.file("etc/.wh.passwd", b"", 0o644);
        t.file("etc/.wh..wh..opq", b"", 0o644);
        t.file("etc/.wh..wh.plnk", b"", 0o644);
        let tarball = t.finish();
        let (layer, _) = read_layer(&tarball, Whiteouts::Off, &Limits::default()).unwrap();
        assert!(layer
            .entries
            .iter()
            .all(|e| matches!(e.kind, EntryKind::File(..))));
        let (layer, _) = read_layer(&tarball, Whiteouts::Oci, &Limits::default()).unwrap();
        let got: Vec<_> = layer
            .entries
            .iter()
            .map(|e| {
                (
                    String::from_utf8_lossy(e.path.as_bytes()).into_owned(),
                    e.kind.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("etc/passwd".into(), EntryKind::Whiteout),
                ("etc".into(), EntryKind::Opaque)
            ]
        );
        for bad in ["etc/.wh.", "etc/.wh..", "etc/.wh..."] {
            let err = read_layer(
                &one(bad.as_bytes(), EntryType::Regular, b"", None),
                Whiteouts::Oci,
                &Limits::default(),
            )
            .unwrap_err();
            assert!(
                matches!(err, RootfsError::BadWhiteout { .. }),
                "{bad}: {err}"
            );
            assert_names(&err, bad);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let limits = Limits { max_entries: 50, max_total_bytes: 10_000, ..Limits::default() };
            for whiteouts in [Whiteouts::Off, Whiteouts::Oci] {
                if let Ok((layer, spool)) = read_layer(&bytes, whiteouts, &limits) {
                    prop_assert!(layer.entries.len() <= 50);
                    prop_assert!(spool.len() <= 10_000);
                }
            }
            // The same bytes behind each magic, to reach the decoders.
            for magic in [GZIP_MAGIC, ZSTD_MAGIC] {
                let prefixed = [magic, &bytes].concat();
                let _ = read_layer(&prefixed, Whiteouts::Oci, &limits);
            }
        }

        #[test]
        fn truncated_tarballs_never_panic(cut in 0usize..6144, flip in 0usize..6144, compress in 0u8..3) {
            let plain = sample_tar();
            let mut bytes = match compress {
                0 => plain,
                1 => gzip(&plain),
                _ => zstd(&plain),
            };
            if flip < bytes.len() && flip % 3 == 0 {
                bytes[flip] ^= 0x55;
            }
            bytes.truncate(cut);
            let limits = Limits::default();
            if let Ok((layer, _)) = read_layer(&bytes, Whiteouts::Oci, &limits) {
                prop_assert!(layer.entries.len() <= 7);
            }
        }
    }
}
