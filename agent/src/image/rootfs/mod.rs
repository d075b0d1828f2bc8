//! User root filesystems to initramfs: a directory, a tarball or an OCI image becomes a
//! reproducible newc cpio archive with our guest agent as `/init`.
//!
//! The input is hostile. It is never unpacked on the host: every entry is checked once,
//! where it is parsed (`path.rs`, `archive.rs`, `dir.rs`, `oci.rs`), into an in-memory tree of
//! validated paths (`tree.rs`) whose file bytes sit in one anonymous spool file (`spool.rs`).
//! The archive is written from the tree in a fixed order (`newc.rs`), so equal inputs give
//! equal bytes whichever form they came in. Every size is bounded before anything is
//! allocated or read ([`Limits`]), and OCI blobs are checked against their digests before
//! their content reaches the tree.
//!
//! Refused, naming the entry: absolute paths, `..`, entries below a non-directory (the
//! symlink escape), hard links to anything but an earlier regular file, relative symlinks
//! climbing above the root, device nodes, FIFOs and sockets (only our own `/dev/console`
//! is written), and anything over a limit.

mod archive;
mod defaults;
mod dir;
pub mod newc;
mod oci;
mod path;
mod spool;
mod tree;

#[cfg(test)]
mod test_support;

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

pub use defaults::{ExecDefaults, UserId};
pub use newc::{entries, find_file, NewcEntries, NewcEntry, NewcError};
pub use path::{EntryName, PathError, TargetError, MAX_PATH};

use path::EntryPath;
use spool::{AppendError, Extent, Spool};
use tree::{Meta, Node, Tree};

/// Bounds on what one image may hold. Each is checked before the bytes or entries it
/// counts are read, so a hostile input costs at most this much memory, disk and time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Entries read, over all layers (whiteouts and overwritten entries count too).
    pub max_entries: u64,
    /// Bytes in one regular file.
    pub max_file_bytes: u64,
    /// Bytes of file data read in total, over all layers, decompressed.
    pub max_total_bytes: u64,
    /// Bytes of names and link targets held in memory: 1M entries of 4 KiB paths would
    /// otherwise cost 4 GiB before a single file byte is read.
    pub max_name_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: 1_000_000,
            max_file_bytes: 1 << 30,
            max_total_bytes: 2 << 30,
            max_name_bytes: 256 << 20,
        }
    }
}

/// Where the root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A directory on the host, read without following symlinks.
    Dir(PathBuf),
    /// A tarball (`docker export`), plain, gzip or zstd (detected by content).
    Tar(PathBuf),
    /// An OCI image layout directory or `oci-archive` tar, and the tag to use (needed
    /// when the image holds more than one manifest).
    Oci { path: PathBuf, tag: Option<String> },
}

impl Source {
    /// Splits `PATH[:TAG]` at the last ':', but only if what follows is a non-empty name
    /// without '/' (so "dir/a:b/c" is a path and "img:" keeps its colon).
    pub fn parse_oci(arg: &str) -> (PathBuf, Option<String>) {
        match arg.rsplit_once(':') {
            Some((path, tag)) if !tag.is_empty() && !tag.contains('/') && !path.is_empty() => {
                (PathBuf::from(path), Some(tag.to_owned()))
            }
            _ => (PathBuf::from(arg), None),
        }
    }
}

/// What [`build`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// Env, working directory and user from the OCI image config (empty otherwise).
    pub defaults: ExecDefaults,
    /// Entries written to the archive, trailer excluded.
    pub entries: u64,
    /// Bytes of file data written (a hard-linked file's once).
    pub file_bytes: u64,
}

/// Why an image could not be built. Every variant about the input names the entry.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot read {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("{}: {problem}", path.display())]
    Source { path: PathBuf, problem: String },
    #[error("cannot create a spool file in {}: {source} (give a writable directory with room for the image)", dir.display())]
    SpoolCreate { dir: PathBuf, source: io::Error },
    #[error("spool file: {0}")]
    Spool(io::Error),
    #[error("writing the initramfs: {0}")]
    Output(io::Error),

    #[error("entry {entry}: {problem}")]
    BadPath {
        entry: EntryName,
        problem: PathError,
    },
    #[error("hard link {entry}: its target {target}: {problem}")]
    BadLinkTarget {
        entry: EntryName,
        target: EntryName,
        problem: PathError,
    },
    #[error("symlink {entry} -> {target}: {problem}")]
    BadSymlink {
        entry: EntryName,
        target: EntryName,
        problem: TargetError,
    },
    #[error("entry {entry} is below {parent}, which is a {kind}, not a directory; writing through it could escape the root (symlink escape). Remove one of the two from the image")]
    ParentNotDir {
        entry: EntryName,
        parent: EntryName,
        kind: &'static str,
    },
    #[error("hard link {entry} -> {target}: the target is not a regular file earlier in the image; a hard link may only name a file already there")]
    HardLink { entry: EntryName, target: EntryName },
    #[error("entry {entry} is a {kind}; device nodes, FIFOs and sockets are not allowed in an image (the guest mounts devtmpfs on /dev): remove it")]
    Special {
        entry: EntryName,
        kind: &'static str,
    },
    #[error("entry {entry} has tar type {kind}, which is not supported: only regular files, directories, symlinks and hard links are")]
    UnsupportedType { entry: EntryName, kind: String },
    #[error("entry {entry}: the root of the image must be a directory, not a {kind}")]
    RootNotDir {
        entry: EntryName,
        kind: &'static str,
    },
    #[error("entry {entry}: /dev is a {kind}; it must be a directory (the guest needs /dev/console in it)")]
    DevNotDir {
        entry: EntryName,
        kind: &'static str,
    },
    #[error("entry {entry}: invalid whiteout ({problem})")]
    BadWhiteout {
        entry: EntryName,
        problem: PathError,
    },
    #[error("entry {entry}: bad tar header: {source}")]
    BadHeader { entry: EntryName, source: io::Error },
    #[error("entry {entry}: {field} {value} does not fit in 32 bits")]
    BadOwner {
        entry: EntryName,
        field: &'static str,
        value: u64,
    },
    #[error(
        "entry {entry} is truncated: it declares {declared} bytes but the input ends after {got}"
    )]
    Truncated {
        entry: EntryName,
        declared: u64,
        got: u64,
    },
    #[error("reading entry {entry}: {source}")]
    Read { entry: EntryName, source: io::Error },
    #[error("reading the {compression} tar {after}: {source}")]
    Tar {
        compression: &'static str,
        after: After,
        source: io::Error,
    },

    #[error("entry {entry}: the image has more than {limit} entries; raise the entry limit if it really is that big")]
    TooManyEntries { entry: EntryName, limit: u64 },
    #[error("entry {entry}: the image's names and link targets add up to more than {limit} bytes")]
    NamesTooLarge { entry: EntryName, limit: u64 },
    #[error("file {entry} has more than {limit} bytes, the limit for one file")]
    FileTooLarge { entry: EntryName, limit: u64 },
    #[error(
        "file {entry}: the image's files add up to more than {limit} bytes, the limit for an image"
    )]
    TotalTooLarge { entry: EntryName, limit: u64 },
    #[error("the tar {after} spends more than {limit} bytes on headers, long names and PAX records; it is not a root filesystem, or it is a decompression bomb")]
    MetadataTooLarge { after: After, limit: u64 },
    #[error("entry {entry}: {problem}")]
    Newc { entry: EntryName, problem: String },

    #[error("OCI image {}: {problem}", path.display())]
    Oci { path: PathBuf, problem: String },
    #[error("{what} {digest}: only sha256 digests are supported")]
    UnsupportedDigest { what: String, digest: String },
    #[error("{what} {digest} is missing from the image: {source}")]
    BlobMissing {
        what: String,
        digest: String,
        source: io::Error,
    },
    #[error("{what} {digest} is {actual} bytes but its descriptor says {declared}; the image is corrupt or was tampered with")]
    BlobSize {
        what: String,
        digest: String,
        declared: u64,
        actual: u64,
    },
    #[error("{what} {digest} has sha256 {actual}; the image is corrupt or was tampered with")]
    BlobDigest {
        what: String,
        digest: String,
        actual: String,
    },
    #[error("layer {index} of {count} ({digest}): {source}")]
    Layer {
        index: usize,
        count: usize,
        digest: String,
        source: Box<RootfsError>,
    },

    #[error("image config {field} {value}: {problem}")]
    Defaults {
        field: &'static str,
        value: EntryName,
        problem: String,
    },
}

/// Where in a tar stream something went wrong: after which entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct After(pub Option<EntryName>);

impl std::fmt::Display for After {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(name) => write!(f, "after entry {name}"),
            None => f.write_str("at its first entry"),
        }
    }
}

impl RootfsError {
    /// Whether this says the input is malformed (rather than refused or over a limit): for
    /// an OCI layer a digest mismatch then explains it better.
    fn is_malformed(&self) -> bool {
        matches!(
            self,
            Self::Tar { .. } | Self::Truncated { .. } | Self::BadHeader { .. } | Self::Read { .. }
        )
    }
}

/// Reads `source`, checks every entry, and writes a newc archive of the tree with `init`
/// as /init (0755, root-owned, replacing any /init the image had) to `out`.
///
/// File bytes are spooled to an anonymous file in `spool_dir`, which needs room for up to
/// `limits.max_total_bytes`.
pub fn build(
    source: &Source,
    init: &[u8],
    spool_dir: &Path,
    limits: &Limits,
    out: &mut dyn Write,
) -> Result<Built, RootfsError> {
    let mut spool = Spool::new_in(spool_dir).map_err(|source| RootfsError::SpoolCreate {
        dir: spool_dir.to_owned(),
        source,
    })?;
    let mut budget = Budget::new(limits);
    let mut tree = Tree::new(limits);
    let config = match source {
        Source::Dir(path) => {
            tree.apply(dir::read_dir(path, &mut spool, &mut budget)?)?;
            defaults::ImageConfigDefaults::default()
        }
        Source::Tar(path) => {
            tree.apply(archive::read_tarball(path, &mut spool, &mut budget)?)?;
            defaults::ImageConfigDefaults::default()
        }
        Source::Oci { path, tag } => {
            oci::read_image(path, tag.as_deref(), &mut spool, &mut budget, &mut tree)?
        }
    };
    install_init(&mut tree, &mut spool, init)?;
    install_console(&mut tree)?;
    let defaults = defaults::resolve(&config, &tree, &spool)?;
    let written = newc::write_tree(&tree, &spool, out)?;
    Ok(Built {
        defaults,
        entries: written.entries,
        file_bytes: written.file_bytes,
    })
}

/// Our agent as /init, whatever the image had there.
fn install_init(tree: &mut Tree, spool: &mut Spool, init: &[u8]) -> Result<(), RootfsError> {
    let extent = spool.append_bytes(init).map_err(|e| match e {
        AppendError::Write(e) | AppendError::Read(e) => RootfsError::Spool(e),
        AppendError::TooLarge { .. } => RootfsError::Spool(io::Error::other("init too large")),
    })?;
    let path = EntryPath::parse(b"init").expect("a constant path");
    tree.insert_file(path, Meta::new(0o755, 0, 0, 0), extent)
}

/// The one device node an image gets: the kernel opens /dev/console for init's stdio
/// before anything can mount devtmpfs.
fn install_console(tree: &mut Tree) -> Result<(), RootfsError> {
    let dev = EntryPath::parse(b"dev").expect("a constant path");
    match tree.get(&dev) {
        None => tree.insert(dev.clone(), Node::Dir { meta: Meta::DIR })?,
        Some(Node::Dir { .. }) => {}
        Some(other) => {
            return Err(RootfsError::DevNotDir {
                entry: EntryName::from(&dev),
                kind: other.kind(),
            })
        }
    }
    let console = dev.join(b"console").expect("a constant name");
    tree.remove(&console);
    tree.insert(
        console,
        Node::CharDevice {
            meta: Meta::new(0o600, 0, 0, 0),
            major: 5,
            minor: 1,
        },
    )
}

/// What the input has used of [`Limits`] so far; shared by all layers of one build.
pub(crate) struct Budget {
    limits: Limits,
    entries: u64,
    file_bytes: u64,
    name_bytes: u64,
}

impl Budget {
    pub(crate) fn new(limits: &Limits) -> Self {
        Self {
            limits: limits.clone(),
            entries: 0,
            file_bytes: 0,
            name_bytes: 0,
        }
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Counts one entry named `name` (raw, as in the input).
    pub(crate) fn entry(&mut self, name: &[u8]) -> Result<(), RootfsError> {
        self.entries = self.entries.saturating_add(1);
        if self.entries > self.limits.max_entries {
            return Err(RootfsError::TooManyEntries {
                entry: EntryName::new(name),
                limit: self.limits.max_entries,
            });
        }
        self.names(name, name.len())
    }

    /// Counts `len` bytes of names or link targets held for entry `name`.
    pub(crate) fn names(&mut self, name: &[u8], len: usize) -> Result<(), RootfsError> {
        self.name_bytes = self.name_bytes.saturating_add(len as u64);
        if self.name_bytes > self.limits.max_name_bytes {
            return Err(RootfsError::NamesTooLarge {
                entry: EntryName::new(name),
                limit: self.limits.max_name_bytes,
            });
        }
        Ok(())
    }

    fn file_bytes_left(&self) -> u64 {
        self.limits.max_total_bytes.saturating_sub(self.file_bytes)
    }

    /// The error for a file of `len` bytes, if it is over a limit.
    fn check_file(&self, name: &[u8], len: u64) -> Result<(), RootfsError> {
        if len > self.limits.max_file_bytes {
            return Err(RootfsError::FileTooLarge {
                entry: EntryName::new(name),
                limit: self.limits.max_file_bytes,
            });
        }
        if len > self.file_bytes_left() {
            return Err(RootfsError::TotalTooLarge {
                entry: EntryName::new(name),
                limit: self.limits.max_total_bytes,
            });
        }
        Ok(())
    }
}

/// Spools one file's bytes from `reader`, which claims to hold `declared` bytes. The claim
/// is checked against the limits before anything is read, and the read itself is bounded
/// by them too, so a reader holding more than it claimed costs no more than the limit.
/// Returns the extent; it may be shorter than `declared` (the caller decides whether
/// that means truncation).
pub(crate) fn spool_file(
    spool: &mut Spool,
    budget: &mut Budget,
    name: &[u8],
    declared: u64,
    reader: &mut dyn Read,
) -> Result<Extent, RootfsError> {
    budget.check_file(name, declared)?;
    let limit = budget.limits.max_file_bytes.min(budget.file_bytes_left());
    let extent = spool.append(reader, limit).map_err(|e| match e {
        AppendError::Read(source) => RootfsError::Read {
            entry: EntryName::new(name),
            source,
        },
        AppendError::Write(e) => RootfsError::Spool(e),
        AppendError::TooLarge { limit } => budget
            .check_file(name, limit.saturating_add(1))
            .err()
            .unwrap_or(RootfsError::FileTooLarge {
                entry: EntryName::new(name),
                limit,
            }),
    })?;
    budget.file_bytes = budget.file_bytes.saturating_add(extent.len);
    Ok(extent)
}

/// Opens a file the user named (a tarball, an oci-archive) for reading.
fn open_file(path: &Path) -> Result<std::fs::File, RootfsError> {
    let file = std::fs::File::open(path).map_err(|source| RootfsError::Open {
        path: path.to_owned(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| RootfsError::Open {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(RootfsError::Source {
            path: path.to_owned(),
            problem: "is not a regular file".into(),
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn parse_oci_splits_only_a_plain_tag() {
        let p = |s: &str| Source::parse_oci(s);
        assert_eq!(p("img"), ("img".into(), None));
        assert_eq!(p("img:latest"), ("img".into(), Some("latest".into())));
        assert_eq!(p("./a/img:v1.2"), ("./a/img".into(), Some("v1.2".into())));
        assert_eq!(p("a:b/c"), ("a:b/c".into(), None));
        assert_eq!(p("img:"), ("img:".into(), None));
        assert_eq!(p("a:b:c"), ("a:b".into(), Some("c".into())));
        assert_eq!(p(":tag"), (":tag".into(), None));
    }

    #[test]
    fn init_replaces_the_images_own_and_dev_console_is_added() {
        let mut t = TarBuilder::new();
        t.dir("init/", 0o755);
        t.file("init/x", b"old", 0o644);
        t.symlink("dev", "/elsewhere-is-refused");
        let err = build_tar(&t.finish(), &Limits::default()).unwrap_err();
        assert!(matches!(err, RootfsError::DevNotDir { .. }), "{err}");

        let mut t = TarBuilder::new();
        t.dir("init/", 0o700);
        t.file("init/x", b"old", 0o644);
        t.file("dev/console", b"not a device", 0o644);
        let out = build_tar(&t.finish(), &Limits::default()).unwrap();
        let names = names_of(&out.bytes);
        assert_eq!(names, vec![".", "dev", "dev/console", "init"]);
        assert_eq!(find_file(&out.bytes, "/init").unwrap(), Some(INIT));
        let all: Vec<_> = entries(&out.bytes).map(Result::unwrap).collect();
        let console = &all[2];
        assert_eq!(console.mode, 0o020600);
        assert_eq!((console.rdev_major, console.rdev_minor), (5, 1));
        assert_eq!(all[3].mode, 0o100755);
        assert_eq!((all[3].uid, all[3].gid, all[3].mtime), (0, 0, 0));
        assert_eq!(out.built.entries, 4);
        assert_eq!(out.built.file_bytes, INIT.len() as u64);
    }

    #[test]
    fn a_directory_and_its_tarball_give_identical_archives() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let root = tempfile::tempdir().unwrap();
        let at = |p: &str| root.path().join(p);
        std::fs::create_dir_all(at("usr/bin")).unwrap();
        std::fs::create_dir_all(at("usr/share/doc")).unwrap();
        std::fs::create_dir_all(at("tmp")).unwrap();
        std::fs::write(at("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::write(at("usr/bin/su"), b"setuid").unwrap();
        std::fs::write(at("usr/share/doc/README"), b"hello").unwrap();
        std::fs::write(at("empty"), b"").unwrap();
        std::fs::write(at(".wh.not-a-whiteout"), b"kept").unwrap();
        symlink("usr/bin", at("bin")).unwrap();
        for (path, mode) in [
            ("usr/bin/tool", 0o755),
            ("usr/bin/su", 0o4755),
            ("tmp", 0o1777),
        ] {
            std::fs::set_permissions(at(path), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let mut tar = tar::Builder::new(Vec::new());
        tar.follow_symlinks(false);
        tar.mode(tar::HeaderMode::Complete);
        tar.append_dir_all(".", root.path()).unwrap();
        let tarball = tar.into_inner().unwrap();

        let from_dir =
            build_source(&Source::Dir(root.path().to_owned()), &Limits::default()).unwrap();
        let from_tar = build_tar(&tarball, &Limits::default()).unwrap();
        assert!(from_dir.bytes == from_tar.bytes);
        assert_eq!(from_dir.built, from_tar.built);
        let su = entries(&from_dir.bytes)
            .map(Result::unwrap)
            .find(|e| e.name == b"usr/bin/su")
            .unwrap();
        assert_eq!(su.mode, 0o104755);
        assert_eq!(
            find_file(&from_dir.bytes, ".wh.not-a-whiteout").unwrap(),
            Some(&b"kept"[..])
        );
    }

    #[test]
    fn a_missing_source_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.tar");
        let err = build(
            &Source::Tar(missing.clone()),
            INIT,
            dir.path(),
            &Limits::default(),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains(&*missing.to_string_lossy()),
            "{err}"
        );
        let err = build(
            &Source::Tar(dir.path().to_owned()),
            INIT,
            dir.path(),
            &Limits::default(),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
