//! Guest images (kernel + initramfs) and their digest pins.
//!
//! Fail closed: a file is booted only if its sha256 matches its pin, checked on every
//! start, cached files included. The bytes that were hashed are the bytes that get loaded
//! (read once into memory), so a file swapped after the check cannot slip through.

pub mod digest;
pub mod manifest;
pub mod rootfs;
pub mod store;

use std::fmt;
use std::path::{Path, PathBuf};

pub use digest::Digest;
pub use manifest::Manifest;

/// Largest kernel we read; anything bigger is a mistake, not a kernel.
pub const MAX_KERNEL_BYTES: u64 = 1 << 30;
/// Largest initramfs we read: an image's tree may hold 2 GiB of files
/// (`rootfs::Limits`), plus headers and the agent.
pub const MAX_INITRD_BYTES: u64 = 3 << 30;

/// What a file is for, named in every error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Kernel,
    Initrd,
}

impl Role {
    /// The most bytes a file of this role may have.
    pub fn max_bytes(self) -> u64 {
        match self {
            Role::Kernel => MAX_KERNEL_BYTES,
            Role::Initrd => MAX_INITRD_BYTES,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Kernel => "kernel",
            Role::Initrd => "initramfs",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{role} {path} does not exist{hint}")]
    Missing {
        role: Role,
        path: PathBuf,
        hint: String,
    },
    #[error("{role} {path} is a directory, not a file")]
    Directory { role: Role, path: PathBuf },
    #[error(
        "{role} {path} is {size} bytes, more than the {limit}-byte limit: is this the right file?"
    )]
    TooLarge {
        role: Role,
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{role} {path} is empty")]
    Empty { role: Role, path: PathBuf },
    #[error("cannot read {role} {path}: {source}")]
    Unreadable {
        role: Role,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refusing to boot: {role} {path} has sha256 {actual} but its pin is {expected}. If you rebuilt the image, run `make image` to refresh the manifest; if you passed --{flag}-sha256, check the value")]
    DigestMismatch {
        role: Role,
        path: PathBuf,
        expected: Digest,
        actual: Digest,
        flag: &'static str,
    },
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
}

/// A file and the digest it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedFile {
    pub role: Role,
    pub path: PathBuf,
    pub sha256: Digest,
}

impl PinnedFile {
    /// Reads the file and checks it against its pin; returns the verified bytes.
    pub fn read_verified(&self) -> Result<Vec<u8>, ImageError> {
        let bytes = read_bounded(self.role, &self.path)?;
        let actual = Digest::of(&bytes);
        if actual != self.sha256 {
            return Err(ImageError::DigestMismatch {
                role: self.role,
                path: self.path.clone(),
                expected: self.sha256,
                actual,
                flag: match self.role {
                    Role::Kernel => "kernel",
                    Role::Initrd => "initrd",
                },
            });
        }
        Ok(bytes)
    }
}

fn read_bounded(role: Role, path: &Path) -> Result<Vec<u8>, ImageError> {
    use std::io::Read;
    let unreadable = |source| ImageError::Unreadable {
        role,
        path: path.to_owned(),
        source,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ImageError::Missing {
                role,
                path: path.to_owned(),
                hint: String::new(),
            })
        }
        Err(e) => return Err(unreadable(e)),
    };
    if meta.is_dir() {
        return Err(ImageError::Directory {
            role,
            path: path.to_owned(),
        });
    }
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let limit = role.max_bytes();
    if meta.len() > limit {
        return Err(ImageError::TooLarge {
            role,
            path: path.to_owned(),
            size: meta.len(),
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // Bound the read itself too: the file may grow after the metadata call.
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > limit {
        return Err(ImageError::TooLarge {
            role,
            path: path.to_owned(),
            size: bytes.len() as u64,
            limit,
        });
    }
    if bytes.is_empty() {
        return Err(ImageError::Empty {
            role,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// A kernel and initramfs, each pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    pub kernel: PinnedFile,
    pub initrd: PinnedFile,
}

/// An image whose bytes matched their pins.
pub struct VerifiedImage {
    pub kernel: Vec<u8>,
    pub initrd: Vec<u8>,
}

impl ImageSpec {
    /// Reads both files and checks both pins; nothing is returned unless both match.
    /// The initramfs is read and hashed on a thread of its own while this one does the
    /// kernel: on a cold boot hashing is most of what the VMM does before the guest runs.
    pub fn load_verified(&self) -> Result<VerifiedImage, ImageError> {
        let (kernel, initrd) = std::thread::scope(|s| {
            let initrd = s.spawn(|| self.initrd.read_verified());
            let kernel = self.kernel.read_verified();
            // A panic while hashing is a bug; re-raising it here keeps it one.
            let initrd = initrd
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (kernel, initrd)
        });
        Ok(VerifiedImage {
            kernel: kernel?,
            initrd: initrd?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pinned(dir: &Path, name: &str, content: &[u8], role: Role) -> PinnedFile {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        PinnedFile {
            role,
            path,
            sha256: Digest::of(content),
        }
    }

    #[test]
    fn matching_pins_load() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ImageSpec {
            kernel: pinned(dir.path(), "k", b"kernel", Role::Kernel),
            initrd: pinned(dir.path(), "i", b"initrd", Role::Initrd),
        };
        let img = spec.load_verified().unwrap();
        assert_eq!(
            (img.kernel.as_slice(), img.initrd.as_slice()),
            (&b"kernel"[..], &b"initrd"[..])
        );
    }

    #[test]
    fn a_changed_file_is_refused_naming_role_and_both_digests() {
        let dir = tempfile::tempdir().unwrap();
        let k = pinned(dir.path(), "k", b"kernel", Role::Kernel);
        std::fs::write(&k.path, b"kernel, tampered").unwrap();
        let err = k.read_verified().unwrap_err().to_string();
        assert!(err.contains("kernel"), "{err}");
        assert!(err.contains(&Digest::of(b"kernel").to_string()), "{err}");
        assert!(
            err.contains(&Digest::of(b"kernel, tampered").to_string()),
            "{err}"
        );
        assert!(err.contains("refusing to boot"), "{err}");
    }

    #[test]
    fn an_image_loads_only_when_both_pins_match_whichever_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |k: &[u8], i: &[u8]| {
            let kernel = pinned(dir.path(), "k", b"kernel", Role::Kernel);
            let initrd = pinned(dir.path(), "i", b"initrd", Role::Initrd);
            std::fs::write(&kernel.path, k).unwrap();
            std::fs::write(&initrd.path, i).unwrap();
            ImageSpec { kernel, initrd }
        };
        let img = spec(b"kernel", b"initrd").load_verified().unwrap();
        assert_eq!(
            (&img.kernel[..], &img.initrd[..]),
            (&b"kernel"[..], &b"initrd"[..])
        );
        // The initramfs, hashed on its own thread, is refused like the kernel; with both
        // wrong, the kernel is named (the same answer every time).
        for (k, i, named) in [
            (&b"kernel"[..], &b"evil"[..], Role::Initrd),
            (b"evil", b"initrd", Role::Kernel),
            (b"evil", b"evil", Role::Kernel),
        ] {
            match spec(k, i).load_verified() {
                Err(ImageError::DigestMismatch { role, .. }) => assert_eq!(role, named),
                Err(e) => panic!("wrong error: {e}"),
                Ok(_) => panic!("a wrong pin loaded"),
            }
        }
    }

    #[test]
    fn files_over_their_roles_limit_are_refused_before_they_are_read() {
        let dir = tempfile::tempdir().unwrap();
        // Each role has its own limit (an initramfs holds an image's whole tree).
        for (name, role, named) in [
            ("k", Role::Kernel, "1073741824"),
            ("i", Role::Initrd, "3221225472"),
        ] {
            let f = pinned(dir.path(), name, b"x", role);
            // Sparse: no disk, and nothing is read.
            std::fs::File::options()
                .write(true)
                .open(&f.path)
                .unwrap()
                .set_len(role.max_bytes() + 1)
                .unwrap();
            let e = f.read_verified().unwrap_err().to_string();
            assert!(e.contains(&role.to_string()) && e.contains(named), "{e}");
        }
    }

    #[test]
    fn bad_paths_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut k = pinned(dir.path(), "k", b"x", Role::Kernel);
        k.path = dir.path().join("missing");
        assert!(matches!(k.read_verified(), Err(ImageError::Missing { .. })));
        k.path = dir.path().to_owned();
        assert!(matches!(
            k.read_verified(),
            Err(ImageError::Directory { .. })
        ));
        let empty = pinned(dir.path(), "e", b"", Role::Initrd);
        assert!(matches!(
            empty.read_verified(),
            Err(ImageError::Empty { .. })
        ));
    }
}
