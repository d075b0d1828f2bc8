//! The newc ("070701") cpio format the kernel unpacks as the initramfs: a writer for the
//! tree, and a small bounded reader.
//!
//! The writer is deterministic: entries in tree order, inode numbers from 1 in that order
//! (hard links share one: the kernel links entries with nlink >= 2 and equal inode and
//! mode, the first one carrying the data, later ones size 0), device 0, owners and mtimes
//! from the tree. Each entry is a 110-byte header of thirteen 8-digit hex fields, the name
//! with its NUL, padding to 4 bytes, the data, padding to 4 bytes; "TRAILER!!!" ends it.

use std::collections::HashMap;
use std::io::{self, BufWriter, Write};

use super::path::EntryName;
use super::spool::{CopyError, Spool};
use super::tree::{Node, Tree};
use super::RootfsError;

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &[u8] = b"TRAILER!!!";

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// What [`write_tree`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Written {
    pub entries: u64,
    pub file_bytes: u64,
}

/// One header's fields (the rest are always 0: dev, check).
#[derive(Debug, Default, Clone, Copy)]
struct Header {
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: u32,
    size: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

/// Writes the tree as a newc archive; file bytes come from the spool.
pub(crate) fn write_tree(
    tree: &Tree,
    spool: &Spool,
    out: &mut dyn Write,
) -> Result<Written, RootfsError> {
    let mut out = BufWriter::with_capacity(256 * 1024, out);
    let links = count_links(tree);
    let mut inodes: HashMap<u64, u32> = HashMap::new();
    let mut next_ino: u32 = 0;
    let mut written = Written {
        entries: 0,
        file_bytes: 0,
    };
    for (path, node) in tree.iter() {
        let name: &[u8] = if path.is_root() {
            b"."
        } else {
            path.as_bytes()
        };
        let entry = || EntryName::from(path);
        let mut new_ino = || {
            next_ino = next_ino.checked_add(1).ok_or_else(|| RootfsError::Newc {
                entry: entry(),
                problem: "more than 2^32 entries".into(),
            })?;
            Ok::<_, RootfsError>(next_ino)
        };
        match node {
            Node::Dir { meta } => {
                let header = Header {
                    ino: new_ino()?,
                    mode: S_IFDIR | meta.mode,
                    nlink: 2,
                    ..Header::with_meta(meta)
                };
                write_header(&mut out, &header, name).map_err(RootfsError::Output)?;
            }
            Node::File {
                meta,
                extent,
                inode,
            } => {
                let nlink = links.get(inode).copied().unwrap_or(1);
                let first = !inodes.contains_key(inode);
                let ino = match inodes.get(inode) {
                    Some(&ino) => ino,
                    None => {
                        let ino = new_ino()?;
                        inodes.insert(*inode, ino);
                        ino
                    }
                };
                let size = if first { extent.len } else { 0 };
                let header = Header {
                    ino,
                    mode: S_IFREG | meta.mode,
                    nlink,
                    size: u32::try_from(size).map_err(|_| RootfsError::Newc {
                        entry: entry(),
                        problem: format!(
                            "is {size} bytes; an initramfs holds at most 4 GiB - 1 per file"
                        ),
                    })?,
                    ..Header::with_meta(meta)
                };
                write_header(&mut out, &header, name).map_err(RootfsError::Output)?;
                if first {
                    spool.copy_to(*extent, &mut out).map_err(|e| match e {
                        CopyError::Spool(e) => RootfsError::Spool(e),
                        CopyError::Out(e) => RootfsError::Output(e),
                    })?;
                    pad(&mut out, size).map_err(RootfsError::Output)?;
                    written.file_bytes = written.file_bytes.saturating_add(size);
                }
            }
            Node::Symlink { meta, target } => {
                // Symlink permissions mean nothing on Linux; 0777 keeps the bytes equal
                // whichever tool made the input.
                let header = Header {
                    ino: new_ino()?,
                    mode: S_IFLNK | 0o777,
                    nlink: 1,
                    size: u32::try_from(target.len()).unwrap_or(u32::MAX),
                    ..Header::with_meta(meta)
                };
                write_header(&mut out, &header, name).map_err(RootfsError::Output)?;
                out.write_all(target).map_err(RootfsError::Output)?;
                pad(&mut out, target.len() as u64).map_err(RootfsError::Output)?;
            }
            Node::CharDevice { meta, major, minor } => {
                let header = Header {
                    ino: new_ino()?,
                    mode: S_IFCHR | meta.mode,
                    nlink: 1,
                    rdev_major: *major,
                    rdev_minor: *minor,
                    ..Header::with_meta(meta)
                };
                write_header(&mut out, &header, name).map_err(RootfsError::Output)?;
            }
        }
        written.entries = written.entries.saturating_add(1);
    }
    let trailer = Header {
        nlink: 1,
        ..Header::default()
    };
    write_header(&mut out, &trailer, TRAILER).map_err(RootfsError::Output)?;
    out.flush().map_err(RootfsError::Output)?;
    Ok(written)
}

impl Header {
    fn with_meta(meta: &super::tree::Meta) -> Self {
        Self {
            uid: meta.uid,
            gid: meta.gid,
            mtime: u32::try_from(meta.mtime).unwrap_or(u32::MAX),
            ..Self::default()
        }
    }
}

/// How many tree entries share each file inode.
fn count_links(tree: &Tree) -> HashMap<u64, u32> {
    let mut links: HashMap<u64, u32> = HashMap::new();
    for (_, node) in tree.iter() {
        if let Node::File { inode, .. } = node {
            let n = links.entry(*inode).or_insert(0);
            *n = n.saturating_add(1);
        }
    }
    links
}

fn write_header(out: &mut dyn Write, h: &Header, name: &[u8]) -> io::Result<()> {
    let name_size = name.len() + 1;
    let fields = [
        h.ino,
        h.mode,
        h.uid,
        h.gid,
        h.nlink,
        h.mtime,
        h.size,
        0, // dev major
        0, // dev minor
        h.rdev_major,
        h.rdev_minor,
        u32::try_from(name_size).unwrap_or(u32::MAX),
        0, // check (newc has none)
    ];
    let mut header = Vec::with_capacity(HEADER_LEN + name_size + 3);
    header.extend_from_slice(MAGIC);
    for field in fields {
        write!(header, "{field:08X}")?;
    }
    header.extend_from_slice(name);
    header.push(0);
    header.resize(align4(header.len()), 0);
    out.write_all(&header)
}

fn pad(out: &mut dyn Write, len: u64) -> io::Result<()> {
    let n = ((4 - len % 4) % 4) as usize;
    out.write_all(&[0u8; 3][..n])
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// Why a newc archive could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NewcError {
    #[error("the cpio archive is truncated at byte {offset}: {what}")]
    Truncated { offset: usize, what: &'static str },
    #[error("no newc (070701) cpio header at byte {offset}")]
    BadMagic { offset: usize },
    #[error("the cpio header at byte {offset} has a bad {field} field")]
    BadField { offset: usize, field: &'static str },
    #[error("the cpio entry name at byte {offset} is not NUL-terminated")]
    BadName { offset: usize },
}

/// One entry of a newc archive, borrowing from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewcEntry<'a> {
    pub name: &'a [u8],
    pub ino: u32,
    /// File type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    pub data: &'a [u8],
}

impl NewcEntry<'_> {
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
}

/// The entries of a newc archive, in order, trailers left out. Archives concatenated
/// after a trailer (with NUL padding between) are read too; anything else after a trailer
/// ends the iteration (a compressed archive appended, say). Stops at the first error.
pub fn entries(archive: &[u8]) -> NewcEntries<'_> {
    NewcEntries {
        archive,
        pos: 0,
        done: false,
    }
}

pub struct NewcEntries<'a> {
    archive: &'a [u8],
    pos: usize,
    done: bool,
}

impl<'a> Iterator for NewcEntries<'a> {
    type Item = Result<NewcEntry<'a>, NewcError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            match self.parse_one() {
                Ok(Some(entry)) => return Some(Ok(entry)),
                Ok(None) => self.after_trailer(),
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

impl<'a> NewcEntries<'a> {
    /// The entry at `pos`, or `None` for a trailer.
    fn parse_one(&mut self) -> Result<Option<NewcEntry<'a>>, NewcError> {
        let start = self.pos;
        let header = self
            .archive
            .get(start..start.saturating_add(HEADER_LEN))
            .filter(|h| h.len() == HEADER_LEN)
            .ok_or(NewcError::Truncated {
                offset: start,
                what: "in a header",
            })?;
        if &header[..6] != MAGIC {
            return Err(NewcError::BadMagic { offset: start });
        }
        let field = |i: usize, name: &'static str| hex_field(header, i, start, name);
        let ino = field(0, "ino")?;
        let mode = field(1, "mode")?;
        let uid = field(2, "uid")?;
        let gid = field(3, "gid")?;
        let nlink = field(4, "nlink")?;
        let mtime = field(5, "mtime")?;
        let size = field(6, "filesize")? as usize;
        let rdev_major = field(9, "rdevmajor")?;
        let rdev_minor = field(10, "rdevminor")?;
        let name_size = field(11, "namesize")? as usize;
        let name_start = start.saturating_add(HEADER_LEN);
        let name_end = name_start
            .checked_add(name_size)
            .ok_or(NewcError::BadField {
                offset: start,
                field: "namesize",
            })?;
        let name = self
            .archive
            .get(name_start..name_end)
            .ok_or(NewcError::Truncated {
                offset: name_start,
                what: "in a name",
            })?;
        let name = match name.split_last() {
            Some((0, name)) => name,
            _ => return Err(NewcError::BadName { offset: name_start }),
        };
        let data_start = align4(name_end);
        let data_end = data_start.checked_add(size).ok_or(NewcError::BadField {
            offset: start,
            field: "filesize",
        })?;
        let data = self
            .archive
            .get(data_start..data_end)
            .ok_or(NewcError::Truncated {
                offset: data_start,
                what: "in a file's data",
            })?;
        self.pos = align4(data_end);
        if name == TRAILER {
            return Ok(None);
        }
        Ok(Some(NewcEntry {
            name,
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            rdev_major,
            rdev_minor,
            data,
        }))
    }

    /// After a trailer: skip NUL padding; go on only if another archive follows.
    fn after_trailer(&mut self) {
        let rest = self.archive.get(self.pos..).unwrap_or_default();
        let padding = rest.iter().take_while(|&&b| b == 0).count();
        self.pos = self.pos.saturating_add(padding);
        let next = self.archive.get(self.pos..).unwrap_or_default();
        self.done = !next.starts_with(MAGIC);
    }
}

fn hex_field(
    header: &[u8],
    index: usize,
    offset: usize,
    name: &'static str,
) -> Result<u32, NewcError> {
    let at = 6 + 8 * index;
    let bad = NewcError::BadField {
        offset,
        field: name,
    };
    let digits = header.get(at..at + 8).ok_or(bad.clone())?;
    let text = std::str::from_utf8(digits).map_err(|_| bad.clone())?;
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad);
    }
    u32::from_str_radix(text, 16).map_err(|_| bad)
}

/// The contents of the regular file at `path` ("init", "/init" and "./init" alike) in a
/// newc archive, as the kernel would leave it: the last entry of that name wins, and a
/// hard link without data gets its inode's. `None` if there is no such regular file.
pub fn find_file<'a>(archive: &'a [u8], path: &str) -> Result<Option<&'a [u8]>, NewcError> {
    let wanted = normalise(path.as_bytes());
    let mut found = None;
    // Data of hard-linked inodes, for later links that carry none.
    let mut linked: HashMap<u32, &'a [u8]> = HashMap::new();
    for entry in entries(archive) {
        let entry = entry?;
        let mut data = entry.data;
        if entry.is_file() && entry.nlink >= 2 {
            match linked.get(&entry.ino) {
                Some(&first) if data.is_empty() => data = first,
                Some(_) => {}
                None => {
                    linked.insert(entry.ino, data);
                }
            }
        }
        if normalise(entry.name) == wanted {
            found = entry.is_file().then_some(data);
        }
    }
    Ok(found)
}

/// A name without leading "/" and "./".
fn normalise(mut name: &[u8]) -> &[u8] {
    loop {
        if let Some(rest) = name.strip_prefix(b"/") {
            name = rest;
        } else if let Some(rest) = name.strip_prefix(b"./") {
            name = rest;
        } else {
            return name;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::test_support::*;
    use super::super::Limits;
    use super::*;

    /// A newc entry built by hand, the way the kernel's gen_init_cpio lays it out.
    fn raw_entry(name: &str, mode: u32, ino: u32, nlink: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let h = Header {
            ino,
            mode,
            nlink,
            size: data.len() as u32,
            ..Header::default()
        };
        write_header(&mut out, &h, name.as_bytes()).unwrap();
        out.extend_from_slice(data);
        pad(&mut out, data.len() as u64).unwrap();
        out
    }

    fn trailer() -> Vec<u8> {
        raw_entry("TRAILER!!!", 0, 0, 1, b"")
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        assert_eq!(
            find_file(b"", "init"),
            Err(NewcError::Truncated {
                offset: 0,
                what: "in a header"
            })
        );
        assert_eq!(
            find_file(b"070707", "init"),
            Err(NewcError::Truncated {
                offset: 0,
                what: "in a header"
            })
        );
        let mut bad_magic = trailer();
        bad_magic[5] = b'2';
        assert_eq!(
            find_file(&bad_magic, "x"),
            Err(NewcError::BadMagic { offset: 0 })
        );
        let mut bad_hex = trailer();
        bad_hex[6] = b'g';
        assert!(matches!(
            find_file(&bad_hex, "x"),
            Err(NewcError::BadField { field: "ino", .. })
        ));
        let full = [
            raw_entry("init", S_IFREG | 0o755, 1, 1, b"hello"),
            trailer(),
        ]
        .concat();
        for cut in 0..full.len() {
            assert!(find_file(&full[..cut], "init").is_err(), "cut at {cut}");
        }
        // A name without its NUL.
        let mut no_nul = raw_entry("init", S_IFREG, 1, 1, b"");
        no_nul[HEADER_LEN + 4] = b'x';
        assert!(matches!(
            find_file(&no_nul, "init"),
            Err(NewcError::BadName { .. })
        ));
        // A huge filesize is bounded by the input, not trusted.
        let mut huge = raw_entry("init", S_IFREG, 1, 1, b"");
        huge[6 + 8 * 6..6 + 8 * 7].copy_from_slice(b"FFFFFFFF");
        assert!(matches!(
            find_file(&huge, "init"),
            Err(NewcError::Truncated { .. })
        ));
    }

    #[test]
    fn find_file_follows_the_kernels_rules() {
        let archive = [
            raw_entry("./a", S_IFREG | 0o644, 1, 1, b"first"),
            raw_entry("dir", S_IFDIR | 0o755, 2, 2, b""),
            raw_entry("a", S_IFREG | 0o644, 3, 1, b"second"),
            raw_entry("l1", S_IFREG | 0o644, 4, 2, b"linked"),
            raw_entry("l2", S_IFREG | 0o644, 4, 2, b""),
            trailer(),
            vec![0; 12],
            raw_entry("late", S_IFREG | 0o644, 1, 1, b"from a second archive"),
            trailer(),
        ]
        .concat();
        assert_eq!(find_file(&archive, "/a").unwrap(), Some(&b"second"[..]));
        assert_eq!(find_file(&archive, "l2").unwrap(), Some(&b"linked"[..]));
        assert_eq!(find_file(&archive, "dir").unwrap(), None);
        assert_eq!(find_file(&archive, "missing").unwrap(), None);
        assert_eq!(
            find_file(&archive, "late").unwrap(),
            Some(&b"from a second archive"[..])
        );
        // Something else after a trailer ends the archive.
        let tail = [
            raw_entry("x", S_IFREG, 1, 1, b"x"),
            trailer(),
            b"\x1f\x8bgzip...".to_vec(),
        ]
        .concat();
        assert_eq!(find_file(&tail, "x").unwrap(), Some(&b"x"[..]));
    }

    #[test]
    fn the_writer_round_trips_and_is_padded() {
        let mut t = TarBuilder::new();
        t.dir("etc", 0o755);
        t.file("etc/hosts", b"127.0.0.1 localhost\n", 0o644);
        t.file("odd", b"abc", 0o600);
        t.symlink("bin", "usr/bin");
        let out = build_tar(&t.finish(), &Limits::default()).unwrap();
        assert_eq!(out.bytes.len() % 4, 0);
        assert_eq!(
            find_file(&out.bytes, "etc/hosts").unwrap(),
            Some(&b"127.0.0.1 localhost\n"[..])
        );
        assert_eq!(find_file(&out.bytes, "odd").unwrap(), Some(&b"abc"[..]));
        assert_eq!(find_file(&out.bytes, "bin").unwrap(), None);
        let all: Vec<_> = entries(&out.bytes).map(Result::unwrap).collect();
        let inos: Vec<u32> = all.iter().map(|e| e.ino).collect();
        assert_eq!(inos, (1..=all.len() as u32).collect::<Vec<_>>());
        let bin = all.iter().find(|e| e.name == b"bin").unwrap();
        assert_eq!((bin.mode, bin.data), (S_IFLNK | 0o777, &b"usr/bin"[..]));
        assert_eq!(all[0].name, b".");
    }

    proptest! {
        #[test]
        fn find_file_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048), cut in 0usize..4096) {
            let _ = find_file(&bytes, "init");
            let mut valid = [raw_entry("init", S_IFREG | 0o755, 1, 1, &bytes), trailer()].concat();
            valid.truncate(cut.min(valid.len()));
            if let Ok(Some(data)) = find_file(&valid, "init") {
                prop_assert!(data.len() <= bytes.len());
            }
            prop_assert!(entries(&bytes).count() <= bytes.len() / HEADER_LEN + 1);
        }
    }
}
