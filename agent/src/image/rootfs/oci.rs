//! OCI images: an image layout directory or an `oci-archive` tar of one.
//!
//! index.json → the manifest tagged TAG (or the only one) → for a multi-platform index,
//! its linux/amd64 manifest → the config and the layers, applied in order with whiteouts.
//! Every blob is read against its descriptor: the size must match exactly and the sha256
//! is computed while streaming; a layer reaches the tree only after its digest matched.
//! Blob paths are made from digests checked to be 64 lowercase hex characters, never from
//! other strings of the image. An oci-archive is read in place: its members are listed
//! once and blobs read by offset.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Descriptor, DigestAlgorithm, ImageConfiguration, ImageIndex, ImageManifest, MediaType,
    OciLayout, ANNOTATION_REF_NAME,
};
use serde::de::DeserializeOwned;
use sha2::{Digest as _, Sha256};

use super::archive::{self, Compression, Whiteouts};
use super::defaults::ImageConfigDefaults;
use super::path::EntryName;
use super::spool::Spool;
use super::tree::Tree;
use super::{open_file, Budget, RootfsError};

/// Largest index, manifest or config we read: they are small JSON documents.
const MAX_JSON: u64 = 4 << 20;
/// Largest `oci-layout` file.
const MAX_LAYOUT_FILE: u64 = 4 << 10;

const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Reads the image at `path` into `tree`; returns its config's exec settings.
pub fn read_image(
    path: &Path,
    tag: Option<&str>,
    spool: &mut Spool,
    budget: &mut Budget,
    tree: &mut Tree,
) -> Result<ImageConfigDefaults, RootfsError> {
    let store = Store::open(path, budget.limits().max_entries)?;
    store.check_layout()?;
    let index: ImageIndex =
        store.parse("index.json", &store.read_named("index.json", MAX_JSON)?)?;
    let chosen = pick_tagged(&store, &index, tag)?;
    let manifest = store.manifest(chosen)?;
    let config = store.config(manifest.config())?;
    let layers = manifest.layers();
    for (i, layer) in layers.iter().enumerate() {
        store
            .apply_layer(layer, spool, budget, tree)
            .map_err(|e| RootfsError::Layer {
                index: i + 1,
                count: layers.len(),
                digest: shown(layer.digest().as_ref()),
                source: Box::new(e),
            })?;
    }
    Ok(config)
}

/// The descriptor in index.json with annotation ref.name = `tag`, or the only one.
fn pick_tagged<'i>(
    store: &Store,
    index: &'i ImageIndex,
    tag: Option<&str>,
) -> Result<&'i Descriptor, RootfsError> {
    let manifests = index.manifests();
    let tags = || {
        let mut tags: Vec<String> = manifests
            .iter()
            .map(|d| tag_of(d).map_or_else(|| "(untagged)".to_owned(), shown))
            .collect();
        tags.sort();
        tags.dedup();
        tags.truncate(20);
        tags.join(", ")
    };
    let matching: Vec<&Descriptor> = match tag {
        Some(tag) => manifests
            .iter()
            .filter(|d| tag_of(d) == Some(tag))
            .collect(),
        None => manifests.iter().collect(),
    };
    match (matching.as_slice(), tag) {
        ([one], _) => Ok(one),
        ([], None) => Err(store.problem("index.json lists no manifests")),
        ([], Some(tag)) => Err(store.problem(format!(
            "no manifest is tagged {}; the image has: {}",
            EntryName::new(tag.as_bytes()),
            tags()
        ))),
        (_, None) => Err(store.problem(format!(
            "index.json lists {} manifests; name one as PATH:TAG (the image has: {})",
            matching.len(),
            tags()
        ))),
        (_, Some(tag)) => Err(store.problem(format!(
            "{} manifests are tagged {}; the image is ambiguous",
            matching.len(),
            EntryName::new(tag.as_bytes())
        ))),
    }
}

/// A manifest's tag: its `org.opencontainers.image.ref.name` annotation.
fn tag_of(desc: &Descriptor) -> Option<&str> {
    desc.annotations()
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_REF_NAME))
        .map(String::as_str)
}

fn is_index(media_type: &MediaType) -> bool {
    *media_type == MediaType::ImageIndex || media_type.as_ref() == DOCKER_MANIFEST_LIST
}

fn is_manifest(media_type: &MediaType) -> bool {
    *media_type == MediaType::ImageManifest || media_type.as_ref() == DOCKER_MANIFEST
}

fn is_config(media_type: &MediaType) -> bool {
    *media_type == MediaType::ImageConfig || media_type.as_ref() == DOCKER_CONFIG
}

fn is_layer(media_type: &MediaType) -> bool {
    matches!(
        media_type,
        MediaType::ImageLayer
            | MediaType::ImageLayerGzip
            | MediaType::ImageLayerZstd
            | MediaType::ImageLayerNonDistributable
            | MediaType::ImageLayerNonDistributableGzip
            | MediaType::ImageLayerNonDistributableZstd
    ) || media_type.as_ref() == DOCKER_LAYER
}

fn is_linux_amd64(os: &impl ToString, arch: &impl ToString) -> bool {
    os.to_string() == "linux" && arch.to_string() == "amd64"
}

/// A digest and its text, shortened and escaped for messages.
fn shown(s: &str) -> String {
    EntryName::new(s.as_bytes()).as_str().to_owned()
}

/// A blob a descriptor points at, its digest checked to be a sha256 we can use as a file name.
struct BlobRef {
    what: &'static str,
    /// "sha256:<hex>", for messages.
    digest: String,
    hex: String,
    size: u64,
}

impl BlobRef {
    fn new(what: &'static str, desc: &Descriptor) -> Result<Self, RootfsError> {
        let digest = desc.digest();
        let text = shown(digest.as_ref());
        let hex = digest.digest();
        if *digest.algorithm() != DigestAlgorithm::Sha256 {
            return Err(RootfsError::UnsupportedDigest {
                what: what.into(),
                digest: text,
            });
        }
        // oci-spec checks this too; a file name is made from it, so we check ourselves.
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(RootfsError::UnsupportedDigest {
                what: what.into(),
                digest: text,
            });
        }
        Ok(Self {
            what,
            digest: text,
            hex: hex.to_owned(),
            size: desc.size(),
        })
    }

    fn size_error(&self, actual: u64) -> RootfsError {
        RootfsError::BlobSize {
            what: self.what.into(),
            digest: self.digest.clone(),
            declared: self.size,
            actual,
        }
    }
}

/// Reads a blob through sha256, at most one byte past its declared size.
struct Verifying<R> {
    inner: io::Take<R>,
    hasher: Sha256,
    seen: u64,
}

impl<R: Read> Verifying<R> {
    fn new(inner: R, size: u64) -> Self {
        Self {
            inner: inner.take(size.saturating_add(1)),
            hasher: Sha256::new(),
            seen: 0,
        }
    }

    /// Reads what is left (bounded) and checks size and digest.
    fn finish(mut self, blob: &BlobRef) -> Result<(), RootfsError> {
        io::copy(&mut self, &mut io::sink()).map_err(|source| RootfsError::BlobMissing {
            what: blob.what.into(),
            digest: blob.digest.clone(),
            source,
        })?;
        if self.seen != blob.size {
            return Err(blob.size_error(self.seen));
        }
        let actual = hex::encode(self.hasher.finalize());
        if actual != blob.hex {
            return Err(RootfsError::BlobDigest {
                what: blob.what.into(),
                digest: blob.digest.clone(),
                actual,
            });
        }
        Ok(())
    }
}

impl<R: Read> Read for Verifying<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.seen = self.seen.saturating_add(n as u64);
        Ok(n)
    }
}

/// Where the layout's files are.
enum Store {
    Layout {
        root: PathBuf,
    },
    Archive {
        path: PathBuf,
        file: File,
        /// Normalised member name → (offset, size) in the file.
        members: HashMap<Box<[u8]>, (u64, u64)>,
    },
}

impl Store {
    fn open(path: &Path, max_entries: u64) -> Result<Self, RootfsError> {
        let meta = std::fs::metadata(path).map_err(|source| RootfsError::Open {
            path: path.to_owned(),
            source,
        })?;
        if meta.is_dir() {
            return Ok(Store::Layout {
                root: path.to_owned(),
            });
        }
        let file = open_file(path)?;
        let problem = |problem: String| RootfsError::Oci {
            path: path.to_owned(),
            problem,
        };
        let mut head = [0u8; 4];
        let n = file
            .read_at(&mut head, 0)
            .map_err(|e| problem(format!("cannot read: {e}")))?;
        if archive::compression_of(&head[..n]) != Compression::Plain {
            return Err(problem(
                "a compressed oci-archive; decompress it first (an oci-archive is a plain tar)"
                    .into(),
            ));
        }
        let file_len = meta.len();
        (&file)
            .seek(io::SeekFrom::Start(0))
            .map_err(|e| problem(format!("cannot read: {e}")))?;
        let listed =
            archive::list_members(BufReader::new(&file), max_entries).map_err(|e| match e {
                RootfsError::Tar { source, after, .. } => {
                    problem(format!("not a valid oci-archive tar ({after}): {source}"))
                }
                other => other,
            })?;
        let mut members = HashMap::new();
        for member in listed {
            if member
                .offset
                .checked_add(member.size)
                .is_none_or(|end| end > file_len)
            {
                return Err(problem(format!(
                    "member {} runs past the end of the file: the archive is truncated",
                    EntryName::from(&member.path)
                )));
            }
            members.insert(member.path.as_bytes().into(), (member.offset, member.size));
        }
        Ok(Store::Archive {
            path: path.to_owned(),
            file,
            members,
        })
    }

    fn path(&self) -> &Path {
        match self {
            Store::Layout { root } => root,
            Store::Archive { path, .. } => path,
        }
    }

    fn problem(&self, problem: impl Into<String>) -> RootfsError {
        RootfsError::Oci {
            path: self.path().to_owned(),
            problem: problem.into(),
        }
    }

    fn parse<T: DeserializeOwned>(&self, what: &str, bytes: &[u8]) -> Result<T, RootfsError> {
        serde_json::from_slice(bytes).map_err(|e| {
            let mut reason = e.to_string();
            reason.truncate(300);
            self.problem(format!("{what} is not valid: {reason}"))
        })
    }

    fn check_layout(&self) -> Result<(), RootfsError> {
        let bytes = self.read_named("oci-layout", MAX_LAYOUT_FILE).map_err(|e| match e {
            RootfsError::Oci { .. } => e,
            _ => self.problem(
                "no oci-layout file: not an OCI image layout (convert other formats with e.g. `skopeo copy docker-archive:IN oci-archive:OUT`)",
            ),
        })?;
        let layout: OciLayout = self.parse("oci-layout", &bytes)?;
        if !layout.image_layout_version().starts_with("1.") {
            return Err(self.problem(format!(
                "image layout version {} is not supported (1.x is)",
                EntryName::new(layout.image_layout_version().as_bytes())
            )));
        }
        Ok(())
    }

    /// A named file of the layout (`oci-layout`, `index.json`), at most `max` bytes.
    fn read_named(&self, name: &str, max: u64) -> Result<Vec<u8>, RootfsError> {
        let missing = |source| RootfsError::Open {
            path: self.path().join(name),
            source,
        };
        let (reader, size) = match self {
            Store::Layout { root } => {
                let (file, size) = open_regular(&root.join(name)).map_err(missing)?;
                (Box::new(file) as Box<dyn Read>, size)
            }
            Store::Archive { .. } => self.member(name.as_bytes()).map_err(missing)?,
        };
        if size > max {
            return Err(self.problem(format!(
                "{name} is {size} bytes, more than the {max} an image needs"
            )));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        reader.take(max).read_to_end(&mut bytes).map_err(missing)?;
        Ok(bytes)
    }

    /// A reader of an archive member's bytes, and its size.
    fn member(&self, name: &[u8]) -> io::Result<(Box<dyn Read + '_>, u64)> {
        let Store::Archive { file, members, .. } = self else {
            return Err(io::Error::other("not an archive"));
        };
        let &(offset, size) = members.get(name).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "no such member in the archive")
        })?;
        let reader = ReadAt {
            file,
            pos: offset,
            end: offset.saturating_add(size),
        };
        Ok((Box::new(BufReader::new(reader)), size))
    }

    /// A reader of a blob's bytes, its size checked against the descriptor.
    fn open_blob(&self, blob: &BlobRef) -> Result<Verifying<Box<dyn Read + '_>>, RootfsError> {
        let missing = |source| RootfsError::BlobMissing {
            what: blob.what.into(),
            digest: blob.digest.clone(),
            source,
        };
        let (reader, size) = match self {
            Store::Layout { root } => {
                let path = root.join("blobs").join("sha256").join(&blob.hex);
                let (file, size) = open_regular(&path).map_err(missing)?;
                (Box::new(BufReader::new(file)) as Box<dyn Read>, size)
            }
            Store::Archive { .. } => {
                let name = format!("blobs/sha256/{}", blob.hex);
                self.member(name.as_bytes()).map_err(missing)?
            }
        };
        if size != blob.size {
            return Err(blob.size_error(size));
        }
        Ok(Verifying::new(reader, blob.size))
    }

    /// A JSON blob (index, manifest, config), verified before it is parsed.
    fn json<T: DeserializeOwned>(
        &self,
        what: &'static str,
        desc: &Descriptor,
    ) -> Result<T, RootfsError> {
        let blob = BlobRef::new(what, desc)?;
        if blob.size > MAX_JSON {
            return Err(self.problem(format!(
                "{what} {} is {} bytes, more than the {MAX_JSON} a {what} needs",
                blob.digest, blob.size
            )));
        }
        let mut reader = self.open_blob(&blob)?;
        let mut bytes = Vec::with_capacity(usize::try_from(blob.size).unwrap_or(0));
        (&mut reader)
            .take(blob.size)
            .read_to_end(&mut bytes)
            .map_err(|source| RootfsError::BlobMissing {
                what: what.into(),
                digest: blob.digest.clone(),
                source,
            })?;
        reader.finish(&blob)?;
        self.parse(&format!("{what} {}", blob.digest), &bytes)
    }

    /// The image manifest `desc` names, through one level of multi-platform index.
    fn manifest(&self, desc: &Descriptor) -> Result<ImageManifest, RootfsError> {
        let desc = if is_index(desc.media_type()) {
            let index: ImageIndex = self.json("index", desc)?;
            self.pick_platform(&index)?.clone()
        } else {
            desc.clone()
        };
        if !is_manifest(desc.media_type()) {
            return Err(self.problem(format!(
                "{} has media type {}, not an image manifest",
                shown(desc.digest().as_ref()),
                shown(desc.media_type().as_ref())
            )));
        }
        self.json("manifest", &desc)
    }

    fn pick_platform<'i>(&self, index: &'i ImageIndex) -> Result<&'i Descriptor, RootfsError> {
        let platform_of = |d: &Descriptor| {
            d.platform()
                .as_ref()
                .map(|p| (p.os().to_string(), p.architecture().to_string()))
        };
        if let Some(found) = index
            .manifests()
            .iter()
            .find(|d| platform_of(d).is_some_and(|(os, arch)| is_linux_amd64(&os, &arch)))
        {
            return Ok(found);
        }
        let mut have: Vec<String> = index
            .manifests()
            .iter()
            .map(|d| {
                platform_of(d).map_or_else(
                    || "(no platform)".into(),
                    |(os, arch)| shown(&format!("{os}/{arch}")),
                )
            })
            .collect();
        have.sort();
        have.dedup();
        have.truncate(20);
        Err(self.problem(format!(
            "the image has no linux/amd64 variant (it has: {}); cleave runs linux/amd64 guests",
            have.join(", ")
        )))
    }

    fn config(&self, desc: &Descriptor) -> Result<ImageConfigDefaults, RootfsError> {
        if !is_config(desc.media_type()) {
            return Err(self.problem(format!(
                "the manifest's config has media type {}, not an image config (is this an artifact rather than an image?)",
                shown(desc.media_type().as_ref())
            )));
        }
        let config: ImageConfiguration = self.json("config", desc)?;
        if !is_linux_amd64(config.os(), config.architecture()) {
            return Err(self.problem(format!(
                "the image is for {}/{}; cleave runs linux/amd64 guests (pull the amd64 variant, e.g. `skopeo copy --override-arch amd64`)",
                shown(&config.os().to_string()),
                shown(&config.architecture().to_string())
            )));
        }
        let exec = config.config().as_ref();
        Ok(ImageConfigDefaults {
            env: exec.and_then(|c| c.env().clone()).unwrap_or_default(),
            working_dir: exec.and_then(|c| c.working_dir().clone()),
            user: exec.and_then(|c| c.user().clone()),
        })
    }

    /// Reads a layer into a batch, checks its digest, and only then applies it.
    fn apply_layer(
        &self,
        desc: &Descriptor,
        spool: &mut Spool,
        budget: &mut Budget,
        tree: &mut Tree,
    ) -> Result<(), RootfsError> {
        if !is_layer(desc.media_type()) {
            return Err(self.problem(format!(
                "layer media type {} is not supported (tar, tar+gzip or tar+zstd layers are)",
                shown(desc.media_type().as_ref())
            )));
        }
        let blob = BlobRef::new("layer", desc)?;
        let mut reader = self.open_blob(&blob)?;
        match archive::read_tar(&mut reader, Whiteouts::Oci, spool, budget) {
            Ok(layer) => {
                reader.finish(&blob)?;
                tree.apply(layer)
            }
            // Corrupt bytes are better explained by the digest that does not match.
            Err(e) if e.is_malformed() => {
                reader.finish(&blob)?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}

/// Opens a file of the layout: not through a symlink, not a FIFO or device.
fn open_regular(path: &Path) -> io::Result<(File, u64)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok((file, meta.len()))
}

/// Reads `file` from `pos` to `end` with positioned reads (no shared cursor).
struct ReadAt<'f> {
    file: &'f File,
    pos: u64,
    end: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos = self.pos.saturating_add(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use serde_json::{json, Value};

    use super::super::test_support::*;
    use super::*;

    const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    const INDEX: &str = "application/vnd.oci.image.index.v1+json";
    const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

    fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// An OCI layout being written by hand into a temporary directory.
    struct Layout {
        dir: tempfile::TempDir,
    }

    impl Layout {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
            std::fs::write(
                dir.path().join("oci-layout"),
                br#"{"imageLayoutVersion": "1.0.0"}"#,
            )
            .unwrap();
            Self { dir }
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }

        fn blob_path(&self, hex: &str) -> PathBuf {
            self.path().join("blobs/sha256").join(hex)
        }

        /// Stores a blob; returns its descriptor.
        fn blob(&self, media_type: &str, bytes: &[u8]) -> Value {
            let hex = sha256_hex(bytes);
            std::fs::write(self.blob_path(&hex), bytes).unwrap();
            json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()})
        }

        fn json_blob(&self, media_type: &str, value: &Value) -> Value {
            self.blob(media_type, &serde_json::to_vec(value).unwrap())
        }

        fn index(&self, manifests: Vec<Value>) {
            let index = json!({"schemaVersion": 2, "manifests": manifests});
            std::fs::write(
                self.path().join("index.json"),
                serde_json::to_vec(&index).unwrap(),
            )
            .unwrap();
        }

        fn manifest(&self, config: Value, layers: Vec<Value>) -> Value {
            self.json_blob(MANIFEST, &json!({"schemaVersion": 2, "mediaType": MANIFEST, "config": config, "layers": layers}))
        }

        fn build(&self, tag: Option<&str>) -> Result<Out, RootfsError> {
            let source = Source::Oci {
                path: self.path().to_owned(),
                tag: tag.map(str::to_owned),
            };
            build_source(&source, &Limits::default())
        }
    }

    fn tagged(mut desc: Value, tag: &str) -> Value {
        desc["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        desc
    }

    fn config_json(arch: &str) -> Value {
        json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/usr/bin:/bin", "GREETING=a=b"], "WorkingDir": "/srv", "User": "app"},
            "rootfs": {"type": "layers", "diff_ids": []}
        })
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn layer_tars() -> [Vec<u8>; 3] {
        let mut base = TarBuilder::new();
        base.file(
            "etc/passwd",
            b"root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
            0o644,
        );
        base.file("etc/group", b"root:x:0:\napp:x:1001:\n", 0o644);
        base.file("opt/old/x", b"lower", 0o644);
        base.file("opt/keep-not", b"lower", 0o644);
        base.file("gone/file", b"lower", 0o644);
        base.file("stays", b"lower", 0o644);
        let mut upper = TarBuilder::new();
        upper.file("opt/new", b"upper", 0o644);
        upper.file("opt/.wh..wh..opq", b"", 0o644);
        upper.file(".wh.gone", b"", 0o644);
        upper.file("etc/motd", b"hi", 0o644);
        let mut top = TarBuilder::new();
        top.file("usr/bin/tool", b"top", 0o755);
        let top = ruzstd::encoding::compress_to_vec(
            top.finish().as_slice(),
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        [base.finish(), gzip(&upper.finish()), top]
    }

    /// The standard test image: three layers (plain, gzip, zstd), tagged "latest".
    fn standard(layout: &Layout, arch: &str) -> Vec<Value> {
        let config = layout.json_blob(CONFIG, &config_json(arch));
        let [base, upper, top] = layer_tars();
        let layers = vec![
            layout.blob(LAYER_TAR, &base),
            layout.blob(LAYER_GZIP, &upper),
            layout.blob(LAYER_ZSTD, &top),
        ];
        let manifest = layout.manifest(config, layers.clone());
        layout.index(vec![tagged(manifest, "latest")]);
        layers
    }

    fn hex_of(desc: &Value) -> String {
        desc["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_owned()
    }

    #[test]
    fn layers_apply_with_whiteouts_and_the_config_is_kept() {
        let layout = Layout::new();
        standard(&layout, "amd64");
        let out = layout.build(None).unwrap();
        let names = names_of(&out.bytes);
        assert_eq!(
            names,
            vec![
                ".",
                "dev",
                "dev/console",
                "etc",
                "etc/group",
                "etc/motd",
                "etc/passwd",
                "init",
                "opt",
                "opt/new",
                "stays",
                "usr",
                "usr/bin",
                "usr/bin/tool"
            ]
        );
        let d = &out.built.defaults;
        assert_eq!(
            d.env,
            vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("GREETING".into(), "a=b".into())
            ]
        );
        assert_eq!(d.cwd.as_deref(), Some("/srv"));
        assert_eq!(
            d.user,
            Some(super::super::UserId {
                uid: 1000,
                gid: 1001
            })
        );
        assert_eq!(layout.build(Some("latest")).unwrap().bytes, out.bytes);
    }

    #[test]
    fn an_oci_archive_gives_the_same_image_as_its_layout() {
        let layout = Layout::new();
        standard(&layout, "amd64");
        let expected = layout.build(None).unwrap().bytes;
        let mut tar = tar::Builder::new(Vec::new());
        tar.append_dir_all(".", layout.path()).unwrap();
        let tar = tar.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("image.oci.tar");
        std::fs::write(&archive, &tar).unwrap();
        let source = Source::Oci {
            path: archive.clone(),
            tag: Some("latest".into()),
        };
        assert_eq!(
            build_source(&source, &Limits::default()).unwrap().bytes,
            expected
        );

        std::fs::write(&archive, gzip(&tar)).unwrap();
        let err = build_source(&source, &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("compressed oci-archive"), "{err}");
        // A truncated archive: its members run past the end.
        std::fs::write(&archive, &tar[..tar.len() / 2]).unwrap();
        assert!(build_source(&source, &Limits::default()).is_err());
    }

    #[test]
    fn a_layer_with_the_wrong_digest_is_refused_and_never_applied() {
        let layout = Layout::new();
        let layers = standard(&layout, "amd64");
        // Same size, different bytes: a valid tar that would add a file.
        let mut evil = TarBuilder::new();
        evil.file("evil", b"x", 0o644);
        let mut evil = evil.finish();
        let size = layers[0]["size"].as_u64().unwrap() as usize;
        evil.resize(size, 0);
        std::fs::write(layout.blob_path(&hex_of(&layers[0])), &evil).unwrap();
        let err = layout.build(None).unwrap_err();
        match &err {
            RootfsError::Layer {
                index: 1,
                count: 3,
                source,
                ..
            } => {
                assert!(matches!(**source, RootfsError::BlobDigest { .. }), "{err}")
            }
            _ => panic!("{err}"),
        }
        // Garbage of the right size: the digest, not the tar parser, explains it.
        std::fs::write(
            layout.blob_path(&hex_of(&layers[1])),
            vec![0x1f; layers[1]["size"].as_u64().unwrap() as usize],
        )
        .unwrap();
        std::fs::write(
            layout.blob_path(&hex_of(&layers[0])),
            layer_tars()[0].clone(),
        )
        .unwrap();
        let err = layout.build(None).unwrap_err();
        assert!(err.to_string().contains("has sha256"), "{err}");
        assert!(err.to_string().contains("layer 2 of 3"), "{err}");
    }

    #[test]
    fn wrong_sizes_and_missing_blobs_are_refused() {
        let layout = Layout::new();
        let layers = standard(&layout, "amd64");
        std::fs::remove_file(layout.blob_path(&hex_of(&layers[2]))).unwrap();
        let err = layout.build(None).unwrap_err();
        assert!(err.to_string().contains("is missing"), "{err}");
        assert!(err.to_string().contains(&hex_of(&layers[2])), "{err}");

        let layout = Layout::new();
        let layers = standard(&layout, "amd64");
        let path = layout.blob_path(&hex_of(&layers[0]));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.push(0);
        std::fs::write(&path, bytes).unwrap();
        let err = layout.build(None).unwrap_err();
        assert!(
            err.to_string().contains("bytes but its descriptor says"),
            "{err}"
        );
    }

    #[test]
    fn a_tampered_manifest_or_config_is_refused() {
        let layout = Layout::new();
        standard(&layout, "amd64");
        let index: Value =
            serde_json::from_slice(&std::fs::read(layout.path().join("index.json")).unwrap())
                .unwrap();
        let manifest_hex = hex_of(&index["manifests"][0]);
        let path = layout.blob_path(&manifest_hex);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] = b' ';
        std::fs::write(&path, bytes).unwrap();
        let err = layout.build(None).unwrap_err();
        assert!(matches!(err, RootfsError::BlobDigest { .. }), "{err}");
    }

    #[test]
    fn other_platforms_are_refused_naming_them() {
        let layout = Layout::new();
        standard(&layout, "arm64");
        let err = layout.build(None).unwrap_err();
        assert!(err.to_string().contains("linux/arm64"), "{err}");
    }

    #[test]
    fn a_multi_platform_index_gives_its_linux_amd64_manifest() {
        let layout = Layout::new();
        let config = layout.json_blob(CONFIG, &config_json("amd64"));
        let arm_config = layout.json_blob(CONFIG, &config_json("arm64"));
        let [base, _, _] = layer_tars();
        let layer = layout.blob(LAYER_TAR, &base);
        let amd = layout.manifest(config, vec![layer.clone()]);
        let arm = layout.manifest(arm_config, vec![layer]);
        let with_platform = |mut d: Value, arch: &str| {
            d["platform"] = json!({"os": "linux", "architecture": arch});
            d
        };
        let both = layout.json_blob(
            INDEX,
            &json!({"schemaVersion": 2, "manifests": [with_platform(arm.clone(), "arm64"), with_platform(amd, "amd64")]}),
        );
        layout.index(vec![tagged(both, "multi")]);
        let out = layout.build(Some("multi")).unwrap();
        assert!(names_of(&out.bytes).contains(&"stays".to_string()));

        let arm_only = layout.json_blob(
            INDEX,
            &json!({"schemaVersion": 2, "manifests": [with_platform(arm, "arm64")]}),
        );
        layout.index(vec![tagged(arm_only, "multi")]);
        let err = layout.build(None).unwrap_err();
        assert!(err.to_string().contains("linux/arm64"), "{err}");
        assert!(err.to_string().contains("no linux/amd64"), "{err}");
    }

    #[test]
    fn tags_pick_the_manifest_and_errors_list_them() {
        let layout = Layout::new();
        standard(&layout, "amd64");
        let index: Value =
            serde_json::from_slice(&std::fs::read(layout.path().join("index.json")).unwrap())
                .unwrap();
        let manifest = index["manifests"][0].clone();
        layout.index(vec![tagged(manifest.clone(), "v1"), tagged(manifest, "v2")]);
        let err = layout.build(None).unwrap_err().to_string();
        assert!(err.contains("PATH:TAG") && err.contains("v1, v2"), "{err}");
        let err = layout.build(Some("v3")).unwrap_err().to_string();
        assert!(err.contains("\"v3\"") && err.contains("v1, v2"), "{err}");
        assert!(layout.build(Some("v2")).is_ok());
    }

    #[test]
    fn digests_must_be_sha256_in_lowercase_hex() {
        let layout = Layout::new();
        standard(&layout, "amd64");
        let index: Value =
            serde_json::from_slice(&std::fs::read(layout.path().join("index.json")).unwrap())
                .unwrap();
        let manifest = index["manifests"][0].clone();

        let mut sha512 = manifest.clone();
        sha512["digest"] = json!(format!("sha512:{}", "ab".repeat(64)));
        layout.index(vec![sha512]);
        let err = layout.build(None).unwrap_err();
        assert!(
            matches!(err, RootfsError::UnsupportedDigest { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("sha512:abab"), "{err}");

        for bad in [
            format!("sha256:{}", "AB".repeat(32)),
            format!("sha256:{}", "ab".repeat(31)),
            "sha256:../../../../etc/passwd".to_owned(),
            "md5:d41d8cd98f00b204e9800998ecf8427e".to_owned(),
        ] {
            let mut desc = manifest.clone();
            desc["digest"] = json!(bad);
            layout.index(vec![desc]);
            let err = layout.build(None).unwrap_err();
            assert!(
                matches!(
                    err,
                    RootfsError::UnsupportedDigest { .. } | RootfsError::Oci { .. }
                ),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn not_a_layout_and_unknown_media_types_are_refused() {
        let layout = Layout::new();
        standard(&layout, "amd64");
        std::fs::remove_file(layout.path().join("oci-layout")).unwrap();
        let err = layout.build(None).unwrap_err();
        assert!(err.to_string().contains("no oci-layout"), "{err}");

        let layout = Layout::new();
        let config = layout.json_blob(CONFIG, &config_json("amd64"));
        let layer = layout.blob("application/vnd.example.weird", b"whatever");
        let manifest = layout.manifest(config, vec![layer]);
        layout.index(vec![manifest]);
        let err = layout.build(None).unwrap_err();
        assert!(
            err.to_string().contains("application/vnd.example.weird"),
            "{err}"
        );

        let layout = Layout::new();
        let big = layout.blob(MANIFEST, &vec![b' '; (MAX_JSON + 1) as usize]);
        layout.index(vec![big]);
        let err = layout.build(None).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
    }
}
