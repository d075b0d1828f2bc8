//! The image manifest written by `images/build-image.sh`: where the default kernel and
//! initramfs are and the sha256 each must have.

use std::path::{Path, PathBuf};

use super::{Digest, ImageSpec, PinnedFile, Role};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("no image manifest at {0}: build the default image first (`make image`), or pass --kernel/--initrd with their --kernel-sha256/--initrd-sha256")]
    Missing(PathBuf),
    #[error("cannot read the image manifest {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the image manifest {path} is malformed: {reason}; rebuild it with `make image`")]
    Malformed { path: PathBuf, reason: String },
}

/// A file and its pin, as a manifest or an image record writes it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub path: PathBuf,
    pub sha256: Digest,
}

impl Entry {
    /// The file pinned for `role`.
    pub fn pinned(&self, role: Role) -> PinnedFile {
        PinnedFile {
            role,
            path: self.path.clone(),
            sha256: self.sha256,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub kernel: Entry,
    pub initrd: Entry,
    #[serde(default)]
    pub kernel_source: Option<String>,
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ManifestError::Missing(path.to_owned()))
            }
            Err(source) => {
                return Err(ManifestError::Unreadable {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let m: Manifest = serde_json::from_str(&text).map_err(|e| ManifestError::Malformed {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        for (what, p) in [("kernel", &m.kernel.path), ("initrd", &m.initrd.path)] {
            if !p.is_absolute() {
                return Err(ManifestError::Malformed {
                    path: path.to_owned(),
                    reason: format!("{what}.path {} is not absolute", p.display()),
                });
            }
        }
        Ok(m)
    }

    pub fn spec(&self) -> ImageSpec {
        ImageSpec {
            kernel: self.kernel.pinned(Role::Kernel),
            initrd: self.initrd.pinned(Role::Initrd),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"kernel":{"path":"/k","sha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        "initrd":{"path":"/i","sha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        "kernel_source":"linux-source-6.1 6.1.1"}"#;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("default.json");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn parses_the_build_scripts_manifest() {
        let (_d, p) = write(GOOD);
        let spec = Manifest::load(&p).unwrap().spec();
        assert_eq!(spec.kernel.path, PathBuf::from("/k"));
        assert_eq!(spec.initrd.role, Role::Initrd);
    }

    #[test]
    fn rejects_bad_manifests_with_reasons() {
        let (_d, p) = write(&GOOD.replace("ba78", "zz78"));
        let e = Manifest::load(&p).unwrap_err().to_string();
        assert!(e.contains("malformed") && e.contains("64 hex"), "{e}");
        let (_d, p) = write(&GOOD.replace("\"/k\"", "\"relative/k\""));
        assert!(Manifest::load(&p)
            .unwrap_err()
            .to_string()
            .contains("not absolute"));
        let (_d, p) = write("{");
        assert!(matches!(
            Manifest::load(&p),
            Err(ManifestError::Malformed { .. })
        ));
        assert!(matches!(
            Manifest::load(Path::new("/nonexistent/cleave/default.json")),
            Err(ManifestError::Missing(_))
        ));
    }
}
