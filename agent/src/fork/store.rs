//! Templates on disk, so `cleave template create` and a later `cleave run --forks` can share
//! one: `<base>/templates/<name>/` holds `meta.json` (what it is), `state.json` (the
//! [`MachineState`]) and `memory` (guest memory, written sparse: only pages that are not
//! all zero take space).
//!
//! The base is the VM runtime directory's (`$XDG_RUNTIME_DIR/cleave` or `/run/cleave`):
//! a template is only good for the host kernel and CPU it was captured on, so it belongs
//! on a tmpfs that a reboot clears. Directories are mode 0700; a template is created in a
//! temporary directory and renamed into place, so a reader never sees half of one.
//!
//! Loading copies the memory into a new memfd and seals it, so what forks map cannot
//! change after the check, whatever happens to the file.

use std::fs::{self, DirBuilder, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::memfd::{memfd_create, MFdFlags};
use serde::{Deserialize, Serialize};

use super::sealed::{SealError, SealedMemory};
use super::state::{MachineState, STATE_FORMAT};
use super::Template;
use crate::host::fingerprint::HostFingerprint;
use crate::image::rootfs::ExecDefaults;
use crate::vmm::runtime_dir::RuntimeDir;

/// A template's name: 1..=63 of `a-z 0-9 . _ -`, starting with a letter or digit (it is a
/// directory name, so nothing else may get in).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TemplateName(String);

impl TemplateName {
    pub const DEFAULT: &'static str = "default";

    pub fn default_name() -> Self {
        TemplateName(Self::DEFAULT.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for TemplateName {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        let ok_first = s
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let ok_rest = s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
        if ok_first && ok_rest && s.len() <= 63 {
            Ok(TemplateName(s.to_string()))
        } else {
            Err(StoreError::BadName(s.to_string()))
        }
    }
}

impl TryFrom<String> for TemplateName {
    type Error = StoreError;
    fn try_from(s: String) -> Result<Self, StoreError> {
        s.parse()
    }
}

impl From<TemplateName> for String {
    fn from(n: TemplateName) -> String {
        n.0
    }
}

impl std::fmt::Display for TemplateName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a template is, for `cleave template ls` and for checks before forking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMeta {
    pub name: TemplateName,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub kernel_sha256: String,
    pub initrd_sha256: String,
    /// The guest's kernel command line.
    pub cmdline: String,
    /// The command run in the template before capture, if any.
    pub warmup: Option<Vec<String>>,
    /// The state's [`STATE_FORMAT`]; templates from before it was recorded read as 0.
    #[serde(default)]
    pub format: u32,
    /// The host it was captured on; it forks only on a host with the same fingerprint.
    #[serde(default)]
    pub host: Option<HostFingerprint>,
    /// The image it was booted from (`cleave image build`); `None`: the built-in default.
    #[serde(default)]
    pub image: Option<String>,
    /// That image's exec defaults (environment, working directory, user).
    #[serde(default)]
    pub defaults: ExecDefaults,
}

impl TemplateMeta {
    /// Its image, as `cleave template ls` shows it.
    pub fn image_label(&self) -> &str {
        self.image
            .as_deref()
            .unwrap_or(crate::image::store::DEFAULT_IMAGE)
    }

    /// Why this template cannot be forked on this host, if it cannot.
    pub fn unusable_reason(&self) -> Option<String> {
        if self.format != STATE_FORMAT {
            return Some(format!(
                "it was made by a cleave with template format {} (this one reads {STATE_FORMAT})",
                self.format
            ));
        }
        let Some(then) = &self.host else {
            return Some("it records no host fingerprint".into());
        };
        match HostFingerprint::current() {
            Ok(here) => then.mismatch(here),
            Err(e) => Some(format!("this host's fingerprint cannot be read: {e}")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "{0:?} is not a valid template name (1 to 63 of a-z, 0-9, '.', '_', '-', starting \
         with a letter or digit)"
    )]
    BadName(String),
    #[error("no template named {name} (create it with `cleave template create --name {name}`)")]
    NotFound { name: TemplateName },
    #[error("a template named {name} exists already (remove it with `cleave template rm {name}`)")]
    Exists { name: TemplateName },
    #[error("template store: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "template {name}: {what} is damaged: {why} (remove it with `cleave template rm {name}`)"
    )]
    Damaged {
        name: TemplateName,
        what: &'static str,
        why: String,
    },
    #[error(
        "template {name} cannot be forked on this host: {why}; remove it (`cleave template rm \
         {name}`) and create it again"
    )]
    Unusable { name: TemplateName, why: String },
    #[error("the template store: {0}")]
    Unsafe(#[from] crate::host::paths::PrivateDirError),
    #[error("template memory: creating its memfd: {0}")]
    Memfd(nix::Error),
    #[error(transparent)]
    Seal(#[from] SealError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { what, path, source }
}

const META: &str = "meta.json";
const STATE: &str = "state.json";
const MEMORY: &str = "memory";
const PAGE: usize = 4096;
/// Memory is copied in chunks of this many bytes.
const CHUNK: usize = 2 << 20;

/// The directory of templates.
#[derive(Debug, Clone)]
pub struct TemplateStore {
    dir: PathBuf,
}

impl TemplateStore {
    /// `templates/` under the VM runtime base.
    pub fn default_location() -> Self {
        Self::at(RuntimeDir::base().join("templates"))
    }

    pub fn at(dir: PathBuf) -> Self {
        TemplateStore { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &TemplateName) -> PathBuf {
        self.dir.join(name.as_str())
    }

    pub fn exists(&self, name: &TemplateName) -> bool {
        self.path(name).join(META).is_file()
    }

    /// Writes `template` under `meta.name`; fails if that name is taken.
    pub fn save(&self, template: &Template, meta: &TemplateMeta) -> Result<(), StoreError> {
        crate::host::paths::private_dir(&self.dir)?;
        let final_path = self.path(&meta.name);
        if final_path.exists() {
            return Err(StoreError::Exists {
                name: meta.name.clone(),
            });
        }
        let tmp = self
            .dir
            .join(format!(".partial-{}-{}", meta.name, std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io_err("creating", &tmp))?;
        let written = (|| {
            let state = serde_json::to_vec(template.state()).map_err(|e| StoreError::Io {
                what: "encoding",
                path: tmp.join(STATE),
                source: io::Error::other(e),
            })?;
            fs::write(tmp.join(STATE), state).map_err(io_err("writing", &tmp.join(STATE)))?;
            write_sparse(template.memory(), &tmp.join(MEMORY))?;
            let meta_json = serde_json::to_vec_pretty(meta).map_err(|e| StoreError::Io {
                what: "encoding",
                path: tmp.join(META),
                source: io::Error::other(e),
            })?;
            fs::write(tmp.join(META), meta_json).map_err(io_err("writing", &tmp.join(META)))?;
            // rename(2) onto an existing non-empty directory fails: a racing creator of the
            // same name loses cleanly.
            fs::rename(&tmp, &final_path).map_err(|e| match e.raw_os_error() {
                Some(libc::ENOTEMPTY | libc::EEXIST) => StoreError::Exists {
                    name: meta.name.clone(),
                },
                _ => StoreError::Io {
                    what: "renaming into place",
                    path: final_path.clone(),
                    source: e,
                },
            })
        })();
        if written.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        written
    }

    pub fn meta(&self, name: &TemplateName) -> Result<TemplateMeta, StoreError> {
        let path = self.path(name).join(META);
        let raw = fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::NotFound { name: name.clone() },
            _ => StoreError::Io {
                what: "reading",
                path: path.clone(),
                source: e,
            },
        })?;
        serde_json::from_slice(&raw).map_err(|e| StoreError::Damaged {
            name: name.clone(),
            what: META,
            why: e.to_string(),
        })
    }

    /// Reads a template back: its state checked, its memory in a new sealed memfd.
    pub fn load(&self, name: &TemplateName) -> Result<(Template, TemplateMeta), StoreError> {
        let meta = self.meta(name)?;
        // What forks map must come from a store no one else can write.
        crate::host::paths::private_dir(&self.dir)?;
        // Refused here with the difference named, not deep in a KVM ioctl at restore.
        if let Some(why) = meta.unusable_reason() {
            return Err(StoreError::Unusable {
                name: name.clone(),
                why,
            });
        }
        let dir = self.path(name);
        let damaged = |what: &'static str| {
            let name = name.clone();
            move |why: String| StoreError::Damaged { name, what, why }
        };
        let raw = fs::read(dir.join(STATE)).map_err(io_err("reading", &dir.join(STATE)))?;
        let state: MachineState =
            serde_json::from_slice(&raw).map_err(|e| damaged(STATE)(e.to_string()))?;
        state.validate().map_err(damaged(STATE))?;
        let size = state.machine.mem.bytes();
        if meta.mem_mib != state.machine.mem.mib() {
            return Err(damaged(META)(format!(
                "says {} MiB, the state {} MiB",
                meta.mem_mib,
                state.machine.mem.mib()
            )));
        }
        let memory = read_sealed(&dir.join(MEMORY), size, damaged(MEMORY))?;
        Ok((Template::new(memory, state), meta))
    }

    /// Every template, by name; damaged ones are skipped with a warning.
    pub fn list(&self) -> Result<Vec<TemplateMeta>, StoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("listing", &self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("listing", &self.dir))?;
            let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<TemplateName>().ok())
            else {
                continue;
            };
            match self.meta(&name) {
                Ok(m) => out.push(m),
                Err(e) => tracing::warn!(template = %name, error = %e, "skipping template"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Bytes the template's files take on disk.
    pub fn disk_usage(&self, name: &TemplateName) -> u64 {
        use std::os::unix::fs::MetadataExt;
        [META, STATE, MEMORY]
            .iter()
            .filter_map(|f| fs::metadata(self.path(name).join(f)).ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    pub fn remove(&self, name: &TemplateName) -> Result<(), StoreError> {
        let path = self.path(name);
        if !path.join(META).exists() {
            return Err(StoreError::NotFound { name: name.clone() });
        }
        fs::remove_dir_all(&path).map_err(io_err("removing", &path))
    }
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// The data extents of `file` (SEEK_DATA/SEEK_HOLE), clamped to `size`.
fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (start, end) = (data as u64, (hole as u64).min(size));
        if start >= end {
            break;
        }
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

/// Copies the non-zero pages of `src`'s data extents to `dst` at the same offsets.
fn copy_pages(src: &File, dst: &File, size: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut copied = 0;
    for (start, end) in data_extents(src, size)? {
        let mut off = start;
        while off < end {
            let n = usize::try_from((end - off).min(CHUNK as u64)).unwrap_or(CHUNK);
            src.read_exact_at(&mut buf[..n], off)?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if !is_zero(page) {
                    dst.write_all_at(page, off + (i * PAGE) as u64)?;
                    copied += page.len() as u64;
                }
            }
            off += n as u64;
        }
    }
    Ok(copied)
}

fn write_sparse(memory: &SealedMemory, path: &Path) -> Result<(), StoreError> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("creating", path))?;
    file.set_len(memory.size())
        .map_err(io_err("sizing", path))?;
    let copied =
        copy_pages(memory.file(), &file, memory.size()).map_err(io_err("writing", path))?;
    tracing::debug!(
        bytes = copied,
        size = memory.size(),
        "template memory written"
    );
    Ok(())
}

fn read_sealed(
    path: &Path,
    size: u64,
    damaged: impl FnOnce(String) -> StoreError,
) -> Result<SealedMemory, StoreError> {
    let file = File::open(path).map_err(io_err("opening", path))?;
    let len = file.metadata().map_err(io_err("reading", path))?.len();
    if len != size {
        return Err(damaged(format!("{len} bytes, the state says {size}")));
    }
    let fd = memfd_create(
        c"cleave-template",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(StoreError::Memfd)?;
    let memfd = File::from(fd);
    memfd
        .set_len(size)
        .map_err(io_err("sizing the memfd for", path))?;
    copy_pages(&file, &memfd, size).map_err(io_err("reading", path))?;
    Ok(SealedMemory::seal(Arc::new(memfd), size)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["default", "a", "py3.12", "x_y-z", "0abc"] {
            assert!(good.parse::<TemplateName>().is_ok(), "{good}");
        }
        for bad in [
            "",
            "..",
            ".x",
            "-x",
            "A",
            "a/b",
            "a b",
            &"x".repeat(64),
            "é",
        ] {
            let e = bad.parse::<TemplateName>().unwrap_err();
            assert!(
                e.to_string().contains("not a valid template name"),
                "{bad}: {e}"
            );
        }
        assert!(serde_json::from_str::<TemplateName>("\"../etc\"").is_err());
    }

    fn memfd_with(pages: &[(u64, u8)], size: u64) -> File {
        let f = File::from(
            memfd_create(c"t", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap(),
        );
        f.set_len(size).unwrap();
        for &(off, byte) in pages {
            f.write_all_at(&vec![byte; PAGE], off).unwrap();
        }
        f
    }

    #[test]
    fn memory_round_trips_sparse_and_sealed() {
        let size = 8 << 20;
        // One page of data, one explicitly zeroed page (not copied), one at the end.
        let src = memfd_with(
            &[(0x3000, 0xaa), (0x10_0000, 0), (size - PAGE as u64, 7)],
            size,
        );
        let src = SealedMemory::seal(Arc::new(src), size).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        write_sparse(&src, &path).unwrap();
        use std::os::unix::fs::MetadataExt;
        let used = fs::metadata(&path).unwrap().blocks() * 512;
        assert!(used <= 4 * PAGE as u64, "sparse file uses {used} bytes");
        let back = read_sealed(&path, size, |w| panic!("{w}")).unwrap();
        let mut a = vec![0u8; size as usize];
        let mut b = vec![0u8; size as usize];
        src.file().read_exact_at(&mut a, 0).unwrap();
        back.file().read_exact_at(&mut b, 0).unwrap();
        assert!(a == b, "memory differs after the round trip");
        assert!(
            back.file().write_all_at(&[1], 0).is_err(),
            "loaded memory is sealed"
        );
    }

    #[test]
    fn wrong_size_memory_is_damaged_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        fs::write(&path, [0u8; 100]).unwrap();
        let e = read_sealed(&path, 4096, |why| StoreError::Damaged {
            name: TemplateName::default_name(),
            what: MEMORY,
            why,
        })
        .map(drop)
        .unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
    }

    #[test]
    fn missing_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let store = TemplateStore::at(dir.path().join("templates"));
        assert!(store.list().unwrap().is_empty());
        let name: TemplateName = "nope".parse().unwrap();
        let e = store.load(&name).map(drop).unwrap_err();
        assert!(
            e.to_string().contains("cleave template create --name nope"),
            "{e}"
        );
        let e = store.remove(&name).unwrap_err();
        assert!(matches!(e, StoreError::NotFound { .. }));
        // A damaged meta is skipped by ls and named by load.
        fs::create_dir_all(store.dir().join("bad")).unwrap();
        fs::write(store.dir().join("bad").join(META), "{").unwrap();
        assert!(store.list().unwrap().is_empty());
        let e = store.meta(&"bad".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
    }
}
