//! A directory on the host as one layer, read without following a single symlink.
//!
//! Every open is relative to an already open directory and refuses symlinks
//! (`O_NOFOLLOW`), and every file is checked after opening to be what `lstat` said, so a
//! tree changing under us (a directory swapped for a symlink to /) cannot make us read
//! outside it. Names are listed in byte order, so the walk, and with it the hard-link
//! pairing, is the same every time.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::dir::Dir;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};

use super::path::{check_symlink_target, EntryName, EntryPath};
use super::spool::Spool;
use super::tree::{EntryKind, Layer, Meta};
use super::{spool_file, Budget, RootfsError};

/// Reads the directory at `root` (which may itself be a symlink: the user named it) as a
/// single layer.
pub fn read_dir(root: &Path, spool: &mut Spool, budget: &mut Budget) -> Result<Layer, RootfsError> {
    let open_err = |e: nix::Error| RootfsError::Open {
        path: root.to_owned(),
        source: e.into(),
    };
    let root_fd = nix::fcntl::open(
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(open_err)?;
    let mut walk = Walk {
        root: root_fd,
        spool,
        budget,
        layer: Layer::default(),
        links: HashMap::new(),
    };
    let root_stat = fstat(&walk.root).map_err(open_err)?;
    walk.layer
        .push(EntryPath::root(), EntryKind::Dir(meta_of(&root_stat)));
    let mut pending = vec![EntryPath::root()];
    while let Some(dir) = pending.pop() {
        let mut subdirs = walk.directory(&dir)?;
        // Popped in order: the walk is depth first, names in byte order.
        subdirs.reverse();
        pending.extend(subdirs);
    }
    Ok(walk.layer)
}

struct Walk<'a> {
    root: OwnedFd,
    spool: &'a mut Spool,
    budget: &'a mut Budget,
    layer: Layer,
    /// (dev, ino) of files with more than one link, and where we first saw them.
    links: HashMap<(u64, u64), EntryPath>,
}

impl Walk<'_> {
    /// Reads one directory's entries into the layer; returns its subdirectories.
    fn directory(&mut self, dir: &EntryPath) -> Result<Vec<EntryPath>, RootfsError> {
        let fd = self.open_dir(dir)?;
        let mut names = list(&fd).map_err(|e| io_err(dir, e))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = dir.join(&name).map_err(|problem| RootfsError::BadPath {
                entry: EntryName::new(&joined(dir, &name)),
                problem,
            })?;
            self.budget.entry(path.as_bytes())?;
            let stat = fstatat(&fd, name.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| io_err(&path, e))?;
            let meta = meta_of(&stat);
            let kind = match SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) {
                SFlag::S_IFDIR => {
                    subdirs.push(path.clone());
                    EntryKind::Dir(meta)
                }
                SFlag::S_IFREG => self.file(&fd, &name, &path, &stat)?,
                SFlag::S_IFLNK => self.symlink(&fd, &name, &path, meta)?,
                SFlag::S_IFCHR => return Err(special(&path, "character device")),
                SFlag::S_IFBLK => return Err(special(&path, "block device")),
                SFlag::S_IFIFO => return Err(special(&path, "FIFO")),
                SFlag::S_IFSOCK => return Err(special(&path, "socket")),
                _ => return Err(special(&path, "file of unknown type")),
            };
            self.layer.push(path, kind);
        }
        Ok(subdirs)
    }

    /// Opens `dir` one component at a time from the root, refusing symlinks on the way.
    fn open_dir(&self, dir: &EntryPath) -> Result<OwnedFd, RootfsError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut fd = openat(&self.root, ".", flags, Mode::empty()).map_err(|e| io_err(dir, e))?;
        if dir.is_root() {
            return Ok(fd);
        }
        for component in dir.as_bytes().split(|&b| b == b'/') {
            fd = openat(&fd, component, flags, Mode::empty()).map_err(|e| io_err(dir, e))?;
        }
        Ok(fd)
    }

    fn file(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        path: &EntryPath,
        stat: &FileStat,
    ) -> Result<EntryKind, RootfsError> {
        let key = (stat.st_dev, stat.st_ino);
        if stat.st_nlink > 1 {
            if let Some(first) = self.links.get(&key) {
                return Ok(EntryKind::HardLink(first.clone()));
            }
        }
        // O_NONBLOCK: if the file was swapped for a FIFO, opening it must not hang.
        let flags = OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY
            | OFlag::O_NONBLOCK;
        let fd = openat(dir, name, flags, Mode::empty()).map_err(|e| io_err(path, e))?;
        let opened = fstat(&fd).map_err(|e| io_err(path, e))?;
        let is_file =
            SFlag::from_bits_truncate(opened.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG;
        if !is_file || (opened.st_dev, opened.st_ino) != key {
            return Err(RootfsError::Read {
                entry: EntryName::from(path),
                source: std::io::Error::other(
                    "it changed while the directory was being read; build from a directory nothing else is writing to",
                ),
            });
        }
        let declared = u64::try_from(opened.st_size).unwrap_or(0);
        let mut file = File::from(fd);
        let extent = spool_file(
            self.spool,
            self.budget,
            path.as_bytes(),
            declared,
            &mut file,
        )?;
        if stat.st_nlink > 1 {
            self.links.insert(key, path.clone());
        }
        Ok(EntryKind::File(meta_of(stat), extent))
    }

    fn symlink(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        path: &EntryPath,
        meta: Meta,
    ) -> Result<EntryKind, RootfsError> {
        let target = readlinkat(dir.as_fd(), name).map_err(|e| io_err(path, e))?;
        let target = std::os::unix::ffi::OsStringExt::into_vec(target);
        check_symlink_target(path, &target).map_err(|problem| RootfsError::BadSymlink {
            entry: EntryName::from(path),
            target: EntryName::new(&target),
            problem,
        })?;
        self.budget.names(path.as_bytes(), target.len())?;
        Ok(EntryKind::Symlink(meta, target.into_boxed_slice()))
    }
}

/// The names in a directory, "." and ".." left out.
fn list(dir: &OwnedFd) -> nix::Result<Vec<Vec<u8>>> {
    let fd = openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut listing = Dir::from_fd(fd)?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    Ok(names)
}

fn meta_of(stat: &FileStat) -> Meta {
    let mtime = u64::try_from(stat.st_mtime).unwrap_or(0);
    Meta::new(stat.st_mode, stat.st_uid, stat.st_gid, mtime)
}

fn special(path: &EntryPath, kind: &'static str) -> RootfsError {
    RootfsError::Special {
        entry: EntryName::from(path),
        kind,
    }
}

fn io_err(path: &EntryPath, e: nix::Error) -> RootfsError {
    RootfsError::Read {
        entry: EntryName::from(path),
        source: e.into(),
    }
}

/// For an error about a name we could not join: the name as it would have been.
fn joined(dir: &EntryPath, name: &[u8]) -> Vec<u8> {
    let mut out = dir.as_bytes().to_vec();
    if !out.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::super::test_support::*;
    use super::super::{Limits, RootfsError};
    use super::*;

    fn read(root: &Path) -> Result<Layer, RootfsError> {
        let mut spool = Spool::new_in(&std::env::temp_dir()).unwrap();
        let mut budget = Budget::new(&Limits::default());
        read_dir(root, &mut spool, &mut budget)
    }

    #[test]
    fn fifos_and_sockets_are_refused_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        nix::unistd::mkfifo(&dir.path().join("sub/pipe"), Mode::S_IRWXU).unwrap();
        let err = read(dir.path()).unwrap_err();
        assert!(
            matches!(err, RootfsError::Special { kind: "FIFO", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("\"sub/pipe\""), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).unwrap();
        let err = read(dir.path()).unwrap_err();
        assert!(
            matches!(err, RootfsError::Special { kind: "socket", .. }),
            "{err}"
        );
    }

    #[test]
    fn escaping_symlinks_are_refused_and_others_kept_unfollowed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        symlink("../../etc", dir.path().join("a/up")).unwrap();
        let err = read(dir.path()).unwrap_err();
        assert!(matches!(err, RootfsError::BadSymlink { .. }), "{err}");
        assert!(err.to_string().contains("\"a/up\""), "{err}");

        let dir = tempfile::tempdir().unwrap();
        symlink("/etc", dir.path().join("etc")).unwrap();
        let layer = read(dir.path()).unwrap();
        assert_eq!(layer.entries.len(), 2);
        assert!(matches!(&layer.entries[1].kind, EntryKind::Symlink(_, t) if &**t == b"/etc"));
    }

    #[test]
    fn hard_links_are_found_and_metadata_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"data").unwrap();
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        std::fs::set_permissions(
            dir.path().join("a"),
            std::fs::Permissions::from_mode(0o4750),
        )
        .unwrap();
        let layer = read(dir.path()).unwrap();
        let kinds: Vec<_> = layer
            .entries
            .iter()
            .map(|e| (e.path.as_bytes().to_vec(), e.kind.clone()))
            .collect();
        assert_eq!(kinds.len(), 3);
        assert!(
            matches!(&kinds[1].1, EntryKind::File(meta, extent) if meta.mode == 0o4750 && extent.len == 4)
        );
        assert_eq!(
            kinds[2].1,
            EntryKind::HardLink(EntryPath::parse(b"a").unwrap())
        );
        let out = build_source(&Source::Dir(dir.path().to_owned()), &Limits::default()).unwrap();
        let all: Vec<_> = entries(&out.bytes).map(Result::unwrap).collect();
        let a = all.iter().find(|e| e.name == b"a").unwrap();
        let b = all.iter().find(|e| e.name == b"b").unwrap();
        assert_eq!((a.ino, a.nlink, a.data), (b.ino, 2, &b"data"[..]));
        assert!(b.data.is_empty());
    }

    #[test]
    fn a_root_that_is_not_a_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let err = read(&file).unwrap_err();
        assert!(err.to_string().contains(&*file.to_string_lossy()), "{err}");
    }

    #[test]
    fn limits_apply_to_directories_too() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big"), vec![0u8; 100]).unwrap();
        let limits = Limits {
            max_file_bytes: 99,
            ..Limits::default()
        };
        let err = build_source(&Source::Dir(dir.path().to_owned()), &limits).unwrap_err();
        assert!(matches!(err, RootfsError::FileTooLarge { .. }), "{err}");
        assert!(err.to_string().contains("\"big\""), "{err}");
    }
}
