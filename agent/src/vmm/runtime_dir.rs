//! A VM's private runtime directory (mode 0700) for its sockets: under
//! `$XDG_RUNTIME_DIR/cleave` when that is set, else `/run/cleave`. Removed with everything
//! in it when dropped, however the VM ended.

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeDirError {
    #[error(
        "creating the VM runtime directory {path}: {source} (set XDG_RUNTIME_DIR to a \
         writable directory)"
    )]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the VM runtime base: {0}")]
    Base(#[from] crate::host::paths::PrivateDirError),
}

/// The VM's hybrid-vsock socket's name in its directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";

#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
    /// Someone else (the parent of a jailed worker) removes it.
    disowned: bool,
}

impl RuntimeDir {
    /// Where VM directories go.
    pub fn base() -> PathBuf {
        match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(d) => PathBuf::from(d).join("cleave"),
            None => PathBuf::from("/run/cleave"),
        }
    }

    /// Creates a fresh directory for one VM under `base`.
    pub fn create_in(base: &Path) -> Result<RuntimeDir, RuntimeDirError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RuntimeDirError::Create { path, source }
        };
        // Sockets go here: a base someone else can write is refused.
        crate::host::paths::private_dir(base)?;
        let random = unique_suffix();
        let path = base.join(format!(
            "vm-{}-{}",
            crate::host::node_pid(),
            hex::encode(random)
        ));
        // Not recursive: the directory must be new, and ours alone.
        DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(err(&path))?;
        Ok(RuntimeDir {
            path,
            disowned: false,
        })
    }

    pub fn create() -> Result<RuntimeDir, RuntimeDirError> {
        Self::create_in(&Self::base())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The VM's hybrid-vsock socket.
    pub fn vsock_path(&self) -> PathBuf {
        self.path.join(VSOCK_SOCKET)
    }
}

impl RuntimeDir {
    /// Leaves removing the directory to someone else (a jailed worker cannot: its parent
    /// directory is not its own, and after the jail the path does not exist for it).
    pub fn disown(&mut self) {
        self.disowned = true;
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if self.disowned {
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "removing the VM runtime directory");
        }
    }
}

/// 8 bytes to tell this VM's directory from others of the same process.
fn unique_suffix() -> [u8; 8] {
    crate::host::entropy::array().unwrap_or_else(|_| {
        // Uniqueness, not secrecy: the pid and the time still tell VMs apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t.to_le_bytes()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_and_removed_on_drop() {
        let base = tempfile::tempdir().unwrap();
        let d = RuntimeDir::create_in(&base.path().join("cleave")).unwrap();
        let mode = std::fs::metadata(d.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::write(d.vsock_path(), b"x").unwrap();
        let p = d.path().to_path_buf();
        let other = RuntimeDir::create_in(&base.path().join("cleave")).unwrap();
        assert_ne!(other.path(), p);
        drop(d);
        assert!(!p.exists());
    }
}
