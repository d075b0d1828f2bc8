//! Images that `cleave image build` made from a user's root filesystem.
//!
//! `<store>/<name>/` holds `initramfs.cpio` (the user's tree with the guest agent as
//! `/init`) and `image.json` (an [`ImageRecord`]: what it was built from, the pins of the
//! kernel it boots and of that initramfs, and the image's exec defaults). The store is
//! `$CLEAVE_IMAGES`, else `<cache>/images/built`; it must be a private directory (ours,
//! writable by no one else), checked on every use, because the pins live in it.
//!
//! A build writes into `.build-<random>/` inside the store and renames it into place with
//! `RENAME_NOREPLACE`: a failed or interrupted build leaves nothing a reader could take
//! for an image, and an existing image is never silently replaced.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::manifest::Entry;
use super::rootfs::{self, newc, ExecDefaults, Limits, Source};
use super::{Digest, ImageSpec, PinnedFile, Role};
use crate::fork::store::TemplateName;
use crate::host::paths::{self, PrivateDirError};

/// The name `cleave image ls` shows for the built-in image; no built image may take it.
pub const DEFAULT_IMAGE: &str = "default";

const RECORD: &str = "image.json";
const INITRAMFS: &str = "initramfs.cpio";

/// An image's name: the same rules as a template's (it is a directory name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageName(String);

impl ImageName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this names the built-in image.
    pub fn is_default(&self) -> bool {
        self.0 == DEFAULT_IMAGE
    }
}

impl std::str::FromStr for ImageName {
    type Err = ImageStoreError;
    fn from_str(s: &str) -> Result<Self, ImageStoreError> {
        match s.parse::<TemplateName>() {
            Ok(n) => Ok(ImageName(n.into())),
            Err(_) => Err(ImageStoreError::BadName(s.chars().take(80).collect())),
        }
    }
}

impl TryFrom<String> for ImageName {
    type Error = ImageStoreError;
    fn try_from(s: String) -> Result<Self, ImageStoreError> {
        s.parse()
    }
}

impl From<ImageName> for String {
    fn from(n: ImageName) -> String {
        n.0
    }
}

impl std::fmt::Display for ImageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    #[error("{0:?} is not a valid image name: use 1 to 63 of a-z, 0-9, '.', '_' and '-', starting with a letter or digit")]
    BadName(String),
    #[error("the name {DEFAULT_IMAGE:?} is the built-in image's; choose another name")]
    Reserved,
    #[error("an image named {0} exists already: remove it first (`cleave image rm {0}`) or choose another name")]
    Exists(ImageName),
    #[error("no image named {0} (`cleave image ls` lists them; `cleave image build` makes one)")]
    NotFound(ImageName),
    #[error(transparent)]
    Private(#[from] PrivateDirError),
    // Not a `source`: the rootfs error says its own cause, and the CLI prints the chain.
    #[error("building image {name}: {error}")]
    Rootfs {
        name: ImageName,
        error: rootfs::RootfsError,
    },
    #[error("the default image's initramfs has no /init to take the guest agent from: rebuild it with `make image`")]
    NoAgent,
    #[error("reading the default image's initramfs: {0}")]
    BadBase(String),
    #[error("the record {path} is malformed: {reason}; remove the image (`cleave image rm`) and build it again")]
    BadRecord { path: PathBuf, reason: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageStoreError {
    let path = path.to_owned();
    move |source| ImageStoreError::Io { what, path, source }
}

/// What an image is: `image.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: ImageName,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// What it was built from, as given (`dir:PATH`, `tar:PATH`, `oci:PATH[:TAG]`).
    pub source: String,
    pub kernel: Entry,
    pub initrd: Entry,
    /// Bytes of the initramfs.
    pub initrd_bytes: u64,
    /// Entries in the tree and bytes of file data in it.
    pub entries: u64,
    pub file_bytes: u64,
    /// Environment, working directory and user an exec gets unless it says otherwise.
    #[serde(default)]
    pub defaults: ExecDefaults,
}

impl ImageRecord {
    /// Its kernel and initramfs with their pins, for a boot.
    pub fn spec(&self) -> ImageSpec {
        ImageSpec {
            kernel: self.kernel.pinned(Role::Kernel),
            initrd: self.initrd.pinned(Role::Initrd),
        }
    }
}

/// What a build used from the default image: its kernel (booted as is) and the guest
/// agent inside its initramfs (becomes `/init`), both taken only after their pins matched.
pub struct BaseImage {
    pub kernel: PinnedFile,
    pub agent: Vec<u8>,
}

impl BaseImage {
    /// Takes the agent out of the verified initramfs bytes of the default image.
    pub fn from_default(spec: &ImageSpec, initrd: &[u8]) -> Result<Self, ImageStoreError> {
        let agent = newc::find_file(initrd, "init")
            .map_err(|e| ImageStoreError::BadBase(e.to_string()))?
            .ok_or(ImageStoreError::NoAgent)?;
        Ok(BaseImage {
            kernel: spec.kernel.clone(),
            agent: agent.to_vec(),
        })
    }
}

/// A finished build and what it took.
#[derive(Debug)]
pub struct BuiltImage {
    pub record: ImageRecord,
    pub took: Duration,
}

/// The image store.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    /// `$CLEAVE_IMAGES`, else `<cache>/images/built`.
    pub fn default_location() -> Self {
        match std::env::var_os("CLEAVE_IMAGES").filter(|d| !d.is_empty()) {
            Some(d) => Self::at(PathBuf::from(d)),
            None => Self::at(paths::cache_dir().join("images/built")),
        }
    }

    pub fn at(dir: PathBuf) -> Self {
        ImageStore { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Builds `name` from `source` on `base` (the name must be free).
    pub fn build(
        &self,
        name: &ImageName,
        source: &Source,
        base: &BaseImage,
        limits: &Limits,
    ) -> Result<BuiltImage, ImageStoreError> {
        let started = Instant::now();
        if name.is_default() {
            return Err(ImageStoreError::Reserved);
        }
        paths::private_dir(&self.dir)?;
        let final_dir = self.dir.join(name.as_str());
        if final_dir.exists() {
            return Err(ImageStoreError::Exists(name.clone()));
        }
        let staging = self.dir.join(format!(
            ".build-{}",
            hex::encode(
                crate::host::entropy::array::<8>()
                    .map_err(io_err("drawing a name for a build directory in", &self.dir))?
            )
        ));
        self.remove_abandoned_builds();
        let result = self.build_in(&staging, &final_dir, name, source, base, limits);
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result.map(|record| BuiltImage {
            record,
            took: started.elapsed(),
        })
    }

    fn build_in(
        &self,
        staging: &Path,
        final_dir: &Path,
        name: &ImageName,
        source: &Source,
        base: &BaseImage,
        limits: &Limits,
    ) -> Result<ImageRecord, ImageStoreError> {
        fs::create_dir(staging).map_err(io_err("creating", staging))?;
        // Held until the build ends: a staging directory nobody holds was left by a
        // build that died, and the next build removes it.
        let held = fs::File::open(staging).map_err(io_err("opening", staging))?;
        crate::host::lock::try_exclusive(&held).map_err(io_err("locking", staging))?;
        let cpio_path = staging.join(INITRAMFS);
        let file = fs::File::create(&cpio_path).map_err(io_err("creating", &cpio_path))?;
        let mut out = HashingWriter::new(BufWriter::new(file));
        let built =
            rootfs::build(source, &base.agent, staging, limits, &mut out).map_err(|error| {
                ImageStoreError::Rootfs {
                    name: name.clone(),
                    error,
                }
            })?;
        let (sha256, bytes, file) = out.finish().map_err(io_err("writing", &cpio_path))?;
        file.sync_all().map_err(io_err("syncing", &cpio_path))?;
        let record = ImageRecord {
            name: name.clone(),
            created: crate::node::templates::unix_now(),
            source: describe(source),
            kernel: Entry {
                path: base.kernel.path.clone(),
                sha256: base.kernel.sha256,
            },
            initrd: Entry {
                path: final_dir.join(INITRAMFS),
                sha256,
            },
            initrd_bytes: bytes,
            entries: built.entries,
            file_bytes: built.file_bytes,
            defaults: built.defaults,
        };
        let record_path = staging.join(RECORD);
        let json = serde_json::to_vec_pretty(&record).expect("an image record serialises");
        fs::write(&record_path, json).map_err(io_err("writing", &record_path))?;
        rename_noreplace(staging, final_dir).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                ImageStoreError::Exists(name.clone())
            } else {
                ImageStoreError::Io {
                    what: "moving the built image into place at",
                    path: final_dir.to_owned(),
                    source: e,
                }
            }
        })?;
        Ok(record)
    }

    /// Removes the staging directories of builds that died (no live build holds them).
    fn remove_abandoned_builds(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let staging = entry.file_name().to_string_lossy().starts_with(".build-");
            let abandoned = staging
                && fs::File::open(&path)
                    .and_then(|f| crate::host::lock::try_exclusive(&f))
                    .unwrap_or(false);
            if abandoned {
                tracing::info!(dir = %path.display(), "removing an abandoned image build");
                let _ = fs::remove_dir_all(&path);
            }
        }
    }

    /// The record of `name` (its files are checked against it when it boots).
    pub fn get(&self, name: &ImageName) -> Result<ImageRecord, ImageStoreError> {
        paths::private_dir(&self.dir)?;
        let path = self.dir.join(name.as_str()).join(RECORD);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageStoreError::NotFound(name.clone()))
            }
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        let bad = |reason: String| ImageStoreError::BadRecord {
            path: path.clone(),
            reason,
        };
        let record: ImageRecord = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if &record.name != name {
            return Err(bad(format!("it names image {}", record.name)));
        }
        // The initramfs must be the one in this image's own directory.
        if record.initrd.path != self.dir.join(name.as_str()).join(INITRAMFS) {
            return Err(bad(format!(
                "its initramfs path {} is not in the image's directory",
                record.initrd.path.display()
            )));
        }
        Ok(record)
    }

    /// Every image, by name; broken entries are reported, not skipped.
    pub fn list(&self) -> Result<Vec<Result<ImageRecord, ImageStoreError>>, ImageStoreError> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        paths::private_dir(&self.dir)?;
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("listing", &self.dir))? {
            let entry = entry.map_err(io_err("listing", &self.dir))?;
            if let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<ImageName>().ok())
            {
                names.push(name);
            }
        }
        names.sort();
        Ok(names.iter().map(|n| self.get(n)).collect())
    }

    /// Removes `name` (templates made from it keep working: they hold its memory).
    pub fn remove(&self, name: &ImageName) -> Result<(), ImageStoreError> {
        paths::private_dir(&self.dir)?;
        let dir = self.dir.join(name.as_str());
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&dir).map_err(io_err("removing", &dir)),
            Ok(_) => Err(io_err("removing", &dir)(io::Error::other(
                "not a directory",
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(ImageStoreError::NotFound(name.clone()))
            }
            Err(e) => Err(io_err("removing", &dir)(e)),
        }
    }
}

/// How `image.json` and `cleave image ls` name a source.
fn describe(source: &Source) -> String {
    match source {
        Source::Dir(p) => format!("dir:{}", p.display()),
        Source::Tar(p) => format!("tar:{}", p.display()),
        Source::Oci { path, tag: None } => format!("oci:{}", path.display()),
        Source::Oci { path, tag: Some(t) } => format!("oci:{}:{t}", path.display()),
    }
}

/// `renameat2(RENAME_NOREPLACE)`: fails with `AlreadyExists` instead of replacing.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        from,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(io::Error::from)
}

/// Hashes and counts what passes through, so the pin is of the bytes written.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hash: Sha256::new(),
            bytes: 0,
        }
    }
}

impl HashingWriter<BufWriter<fs::File>> {
    fn finish(mut self) -> io::Result<(Digest, u64, fs::File)> {
        self.inner.flush()?;
        let file = self.inner.into_inner().map_err(|e| e.into_error())?;
        let digest: [u8; 32] = self.hash.finalize().into();
        Ok((Digest::from_bytes(digest), self.bytes, file))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BaseImage {
        BaseImage {
            kernel: PinnedFile {
                role: Role::Kernel,
                path: "/cache/vmlinux".into(),
                sha256: Digest::of(b"kernel"),
            },
            agent: b"the guest agent".to_vec(),
        }
    }

    fn tree(dir: &Path) -> Source {
        let root = dir.join("rootfs");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/hostname"), "img\n").unwrap();
        Source::Dir(root)
    }

    fn name(s: &str) -> ImageName {
        s.parse().unwrap()
    }

    #[test]
    fn a_build_is_pinned_listed_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let store = ImageStore::at(d.path().join("images"));
        let built = store
            .build(&name("img"), &tree(d.path()), &base(), &Limits::default())
            .unwrap();
        let r = &built.record;
        let cpio = fs::read(&r.initrd.path).unwrap();
        assert_eq!(Digest::of(&cpio), r.initrd.sha256);
        assert_eq!(r.initrd_bytes, cpio.len() as u64);
        assert_eq!(
            newc::find_file(&cpio, "init").unwrap(),
            Some(&b"the guest agent"[..])
        );
        assert_eq!(r.kernel.sha256, Digest::of(b"kernel"));
        assert!(r.source.starts_with("dir:"), "{}", r.source);
        // The spec a boot checks is the record's.
        let spec = store.get(&name("img")).unwrap().spec();
        assert_eq!(spec.initrd.read_verified().unwrap(), cpio);
        let all = store.list().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].as_ref().unwrap(), r);
        // Nothing but the image itself is left in the store.
        let names: Vec<_> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["img"]);
        store.remove(&name("img")).unwrap();
        assert!(matches!(
            store.get(&name("img")),
            Err(ImageStoreError::NotFound(_))
        ));
        assert!(matches!(
            store.remove(&name("img")),
            Err(ImageStoreError::NotFound(_))
        ));
    }

    #[test]
    fn names_taken_reserved_or_malformed_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let store = ImageStore::at(d.path().join("images"));
        let src = tree(d.path());
        store
            .build(&name("img"), &src, &base(), &Limits::default())
            .unwrap();
        let e = store
            .build(&name("img"), &src, &base(), &Limits::default())
            .unwrap_err();
        assert!(e.to_string().contains("exists already"), "{e}");
        let e = store
            .build(&name(DEFAULT_IMAGE), &src, &base(), &Limits::default())
            .unwrap_err();
        assert!(matches!(e, ImageStoreError::Reserved), "{e}");
        for bad in ["", "../x", "A", "a/b", &"a".repeat(64)] {
            let e = bad.parse::<ImageName>().unwrap_err().to_string();
            assert!(e.contains("not a valid image name"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_failed_build_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let store = ImageStore::at(d.path().join("images"));
        let src = tree(d.path());
        let tiny = Limits {
            max_entries: 1,
            ..Limits::default()
        };
        let e = store.build(&name("img"), &src, &base(), &tiny).unwrap_err();
        assert!(e.to_string().contains("building image img"), "{e}");
        assert_eq!(fs::read_dir(store.dir()).unwrap().count(), 0);
        let missing = Source::Tar(d.path().join("nope.tar"));
        assert!(store
            .build(&name("img"), &missing, &base(), &Limits::default())
            .is_err());
        assert_eq!(fs::read_dir(store.dir()).unwrap().count(), 0);
    }

    #[test]
    fn a_build_that_died_is_cleaned_up_and_a_live_one_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let store = ImageStore::at(d.path().join("images"));
        paths::private_dir(store.dir()).unwrap();
        let dead = store.dir().join(".build-dead");
        let live = store.dir().join(".build-live");
        for dir in [&dead, &live] {
            fs::create_dir(dir).unwrap();
            fs::write(dir.join(INITRAMFS), b"half").unwrap();
        }
        let holder = fs::File::open(&live).unwrap();
        assert!(crate::host::lock::try_exclusive(&holder).unwrap());
        store
            .build(&name("img"), &tree(d.path()), &base(), &Limits::default())
            .unwrap();
        assert!(!dead.exists(), "an abandoned build is removed");
        assert!(live.exists(), "a build in progress is left alone");
    }

    #[test]
    fn a_record_that_points_elsewhere_or_a_shared_store_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let store = ImageStore::at(d.path().join("images"));
        store
            .build(&name("img"), &tree(d.path()), &base(), &Limits::default())
            .unwrap();
        let rec = store.dir().join("img").join(RECORD);
        let text = fs::read_to_string(&rec).unwrap();
        let moved = text.replace(
            &store
                .dir()
                .join("img")
                .join(INITRAMFS)
                .display()
                .to_string(),
            "/tmp/other.cpio",
        );
        fs::write(&rec, moved).unwrap();
        let e = store.get(&name("img")).unwrap_err().to_string();
        assert!(e.contains("not in the image's directory"), "{e}");
        fs::write(&rec, &text).unwrap();
        store.get(&name("img")).unwrap();
        fs::set_permissions(store.dir(), fs::Permissions::from_mode(0o777)).unwrap();
        let e = store.get(&name("img")).unwrap_err().to_string();
        assert!(e.contains("mode 777"), "{e}");
    }
}
