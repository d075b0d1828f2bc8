//! Fixtures for the rootfs tests, all generated in code: tarballs (hostile ones written
//! header field by header field, as the `tar` crate's own setters refuse them), and runs
//! of [`build`] on them.

use tar::{EntryType, Header};

use super::archive::{read_tar, Whiteouts};
use super::spool::Spool;
use super::tree::Layer;
use super::*;

pub use super::{entries, find_file, Built, Limits, RootfsError, Source};

/// Stands in for the guest agent.
pub const INIT: &[u8] = b"\x7fELF the cleave guest agent";

/// A fixed mtime, so fixtures are the same on every run.
pub const MTIME: u64 = 1_700_000_000;

/// Builds tarballs entry by entry; names of up to 100 bytes are written to the header's
/// name field as they are (absolute, `..`, whatever the test needs).
pub struct TarBuilder {
    builder: tar::Builder<Vec<u8>>,
}

impl TarBuilder {
    pub fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    /// Any entry, as raw as a test needs it.
    pub fn entry(
        &mut self,
        name: &[u8],
        kind: EntryType,
        mode: u32,
        data: &[u8],
        link: Option<&[u8]>,
    ) {
        let mut header = Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(MTIME);
        header.set_size(data.len() as u64);
        if let Some(link) = link {
            if link.len() <= 100 {
                header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
            } else {
                let name = std::str::from_utf8(name).unwrap();
                let link = std::str::from_utf8(link).unwrap();
                self.builder.append_link(&mut header, name, link).unwrap();
                return;
            }
        }
        if name.len() <= 100 {
            header.as_old_mut().name[..name.len()].copy_from_slice(name);
            header.set_cksum();
            self.builder.append(&header, data).unwrap();
        } else {
            let name = std::str::from_utf8(name).unwrap();
            self.builder.append_data(&mut header, name, data).unwrap();
        }
    }

    pub fn dir(&mut self, name: &str, mode: u32) {
        self.entry(name.as_bytes(), EntryType::Directory, mode, b"", None);
    }

    pub fn file(&mut self, name: &str, data: &[u8], mode: u32) {
        self.entry(name.as_bytes(), EntryType::Regular, mode, data, None);
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(
            name.as_bytes(),
            EntryType::Symlink,
            0o777,
            b"",
            Some(target.as_bytes()),
        );
    }

    pub fn hardlink(&mut self, name: &str, target: &str) {
        self.entry(
            name.as_bytes(),
            EntryType::Link,
            0o644,
            b"",
            Some(target.as_bytes()),
        );
    }

    pub fn finish(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

/// An archive [`build`] wrote, and what it said.
#[derive(Debug)]
pub struct Out {
    pub bytes: Vec<u8>,
    pub built: Built,
}

pub fn build_source(source: &Source, limits: &Limits) -> Result<Out, RootfsError> {
    let spool = tempfile::tempdir().unwrap();
    let mut bytes = Vec::new();
    let built = build(source, INIT, spool.path(), limits, &mut bytes)?;
    Ok(Out { bytes, built })
}

/// Builds from a tarball with these bytes.
pub fn build_tar(tarball: &[u8], limits: &Limits) -> Result<Out, RootfsError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rootfs.tar");
    std::fs::write(&path, tarball).unwrap();
    build_source(&Source::Tar(path), limits)
}

/// Reads one tar stream as a layer, as an OCI layer (whiteouts on) or a tarball.
pub fn read_layer(
    bytes: &[u8],
    whiteouts: Whiteouts,
    limits: &Limits,
) -> Result<(Layer, Spool), RootfsError> {
    let mut spool = Spool::new_in(&std::env::temp_dir()).unwrap();
    let mut budget = Budget::new(limits);
    let layer = read_tar(bytes, whiteouts, &mut spool, &mut budget)?;
    Ok((layer, spool))
}

/// The names in a newc archive, in order.
pub fn names_of(archive: &[u8]) -> Vec<String> {
    entries(archive)
        .map(|e| String::from_utf8_lossy(e.unwrap().name).into_owned())
        .collect()
}

/// A small tree with every kind of entry we keep: directories (one implicit), files, a
/// symlink and a hard link.
pub fn sample_tar() -> Vec<u8> {
    let mut t = TarBuilder::new();
    t.dir("./", 0o755);
    t.dir("etc/", 0o755);
    t.file("etc/hostname", b"cleave\n", 0o644);
    t.symlink("bin", "usr/bin");
    t.file("usr/bin/tool", b"#!/bin/sh\necho hi\n", 0o755);
    t.hardlink("usr/bin/tool2", "usr/bin/tool");
    t.file("usr/share/doc/README", b"hello", 0o444);
    t.finish()
}
