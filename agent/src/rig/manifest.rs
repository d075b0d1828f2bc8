//! rig.json: which kernel and initramfs the rig boots, pinned by sha256.
//! Written by images/rig/build-rig.sh; both digests are checked on every start,
//! so a changed or truncated cached file stops the rig instead of booting it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::error::RigError;
use crate::image::digest::Digest;

#[derive(Debug, Deserialize)]
struct Artifact {
    path: PathBuf,
    sha256: Digest,
}

#[derive(Debug, Deserialize)]
struct RawManifest {
    kernel: Artifact,
    initrd: Artifact,
    debian_kernel: String,
}

/// A rig image whose files matched their pins when it was loaded.
#[derive(Debug, Clone)]
pub struct RigImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The Debian kernel package and version, e.g. `linux-image-6.1.0-56-amd64 6.1.192-2`.
    pub debian_kernel: String,
}

/// Loads `path` and checks both files against their digests (fail closed).
pub fn load(path: &Path) -> Result<RigImage, RigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RigError::NotBuilt {
                path: path.to_owned(),
            })
        }
        Err(e) => {
            return Err(RigError::BadManifest {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        }
    };
    let raw: RawManifest = serde_json::from_str(&text).map_err(|e| RigError::BadManifest {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    verify("kernel", &raw.kernel)?;
    verify("initramfs", &raw.initrd)?;
    Ok(RigImage {
        kernel: raw.kernel.path,
        initrd: raw.initrd.path,
        debian_kernel: raw.debian_kernel,
    })
}

fn verify(role: &'static str, artifact: &Artifact) -> Result<(), RigError> {
    let read_err = |source| RigError::ReadArtifact {
        role,
        path: artifact.path.clone(),
        source,
    };
    if !artifact.path.is_absolute() {
        return Err(RigError::BadManifest {
            path: artifact.path.clone(),
            reason: format!("the {role} path is not absolute"),
        });
    }
    let bytes = std::fs::read(&artifact.path).map_err(read_err)?;
    let actual = Digest::of(&bytes);
    if actual != artifact.sha256 {
        return Err(RigError::DigestMismatch {
            role,
            path: artifact.path.clone(),
            expected: artifact.sha256,
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_rig(dir: &Path, kernel: &[u8], initrd: &[u8], pin_kernel: Digest) -> PathBuf {
        let k = dir.join("vmlinuz");
        let i = dir.join("rig-initrd.cpio");
        std::fs::write(&k, kernel).unwrap();
        std::fs::write(&i, initrd).unwrap();
        let manifest = dir.join("rig.json");
        let json = serde_json::json!({
            "kernel": {"path": k, "sha256": pin_kernel.to_string()},
            "initrd": {"path": i, "sha256": Digest::of(initrd).to_string()},
            "debian_kernel": "linux-image-test 1",
        });
        std::fs::write(&manifest, json.to_string()).unwrap();
        manifest
    }

    #[test]
    fn matching_digests_load() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = write_rig(dir.path(), b"kernel", b"initrd", Digest::of(b"kernel"));
        let image = load(&manifest).unwrap();
        assert_eq!(image.kernel, dir.path().join("vmlinuz"));
        assert_eq!(image.debian_kernel, "linux-image-test 1");
    }

    #[test]
    fn digest_mismatch_names_role_and_both_digests() {
        let dir = tempfile::tempdir().unwrap();
        let pinned = Digest::of(b"the kernel that was built");
        let manifest = write_rig(dir.path(), b"a tampered kernel", b"initrd", pinned);
        let err = load(&manifest).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, RigError::DigestMismatch { role: "kernel", .. }),
            "{text}"
        );
        assert!(text.contains(&pinned.to_string()), "{text}");
        assert!(
            text.contains(&Digest::of(b"a tampered kernel").to_string()),
            "{text}"
        );
        assert!(text.contains("make rig"), "{text}");
    }

    #[test]
    fn missing_manifest_says_to_build_the_rig() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(&dir.path().join("rig.json")).unwrap_err();
        assert!(matches!(err, RigError::NotBuilt { .. }));
        assert!(err.to_string().contains("make rig"));
    }

    #[test]
    fn missing_artifact_and_malformed_manifest_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = write_rig(dir.path(), b"k", b"i", Digest::of(b"k"));
        std::fs::remove_file(dir.path().join("rig-initrd.cpio")).unwrap();
        let err = load(&manifest).unwrap_err();
        assert!(
            matches!(
                err,
                RigError::ReadArtifact {
                    role: "initramfs",
                    ..
                }
            ),
            "{err}"
        );

        std::fs::write(&manifest, "{\"kernel\": 1}").unwrap();
        assert!(matches!(
            load(&manifest).unwrap_err(),
            RigError::BadManifest { .. }
        ));
    }
}
