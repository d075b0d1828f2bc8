//! Where cleave keeps what it builds and caches (outside the repository).

use std::path::PathBuf;

/// `$CLEAVE_CACHE`, else `$HOME/.cache/cleave`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLEAVE_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/cleave")
}

/// The manifest of the built-in default image.
pub fn default_image_manifest() -> PathBuf {
    cache_dir().join("images/default.json")
}

/// A directory cleave keeps sockets, state or templates in, refused when someone else
/// could change what is in it.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    #[error("creating {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is owned by uid {uid} with mode {mode:o}: cleave keeps its sockets, state and \
         templates only in a directory it owns that no one else can write (chown/chmod it, \
         or point XDG_RUNTIME_DIR / the config elsewhere)"
    )]
    Unsafe { path: PathBuf, uid: u32, mode: u32 },
}

/// Creates `dir` (0700, parents as needed) or checks the existing one: it must be ours and
/// writable by no one else.
pub fn private_dir(dir: &std::path::Path) -> Result<(), PrivateDirError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let create = |source| PrivateDirError::Create {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(create)?;
    let m = std::fs::symlink_metadata(dir).map_err(create)?;
    // SAFETY: geteuid has no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !m.is_dir() || m.uid() != me || m.mode() & 0o022 != 0 {
        return Err(PrivateDirError::Unsafe {
            path: dir.to_path_buf(),
            uid: m.uid(),
            mode: m.mode() & 0o7777,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_dirs_are_made_0700_and_unsafe_ones_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b");
        private_dir(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        private_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = private_dir(&p).unwrap_err().to_string();
        assert!(e.contains("mode 777") && e.contains("chown/chmod"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
        let e = private_dir(&p).unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
        // A symlink to a private directory is not one.
        let q = d.path().join("link");
        std::os::unix::fs::symlink(d.path().join("a"), &q).unwrap();
        assert!(private_dir(&q).is_err());
    }
}
