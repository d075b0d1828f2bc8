//! Claiming a slot node-wide. Several processes may create sandboxes on one node (the
//! daemon, a one-shot `cleave run`); each slot index is claimed by taking an exclusive
//! `flock` on `<dir>/slot-<i>.lock` and held for the sandbox's whole life. The kernel drops
//! the lock when its holder dies, so a crash frees the slot (its leftovers are reconciled
//! by whoever claims it next) and a lock that can be taken means nobody alive owns it.

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("the slot lock directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("locking {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "every one of the node's {0} network slots is in use; destroy sandboxes or widen the \
         sandbox range"
    )]
    Exhausted(u32),
}

/// A claimed slot index; dropping it frees the slot.
#[derive(Debug)]
pub struct SlotLease {
    index: u32,
    file: File,
    path: PathBuf,
}

impl SlotLease {
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        // Unlink first, while still holding the lock: whoever opens the path next gets a
        // new file, never one we are about to unlock.
        let _ = std::fs::remove_file(&self.path);
        let _ = &self.file;
    }
}

fn lock_path(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("slot-{index}.lock"))
}

/// Tries to take slot `index`; `Ok(None)` when someone alive holds it.
pub fn try_claim(dir: &Path, index: u32) -> Result<Option<SlotLease>, LeaseError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| LeaseError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
    let path = lock_path(dir, index);
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|source| LeaseError::Lock {
                path: path.clone(),
                source,
            })?;
        match crate::host::lock::try_exclusive(&file) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(source) => return Err(LeaseError::Lock { path, source }),
        }
        // The previous holder may have unlinked the path between our open and our lock:
        // then we locked an orphan; start again on the current file.
        let same = match (std::fs::metadata(&path), file.metadata()) {
            (Ok(a), Ok(b)) => {
                use std::os::unix::fs::MetadataExt;
                a.ino() == b.ino() && a.dev() == b.dev()
            }
            _ => false,
        };
        if same {
            return Ok(Some(SlotLease { index, file, path }));
        }
    }
}

/// Claims the first free slot below `slots`, probing from `start` and wrapping around
/// (a caller that remembers where its last claim ended finds a free slot in a probe or
/// two instead of walking every held one).
pub fn claim(dir: &Path, slots: u32, start: u32) -> Result<SlotLease, LeaseError> {
    let start = if start < slots { start } else { 0 };
    for index in (start..slots).chain(0..start) {
        if let Some(l) = try_claim(dir, index)? {
            return Ok(l);
        }
    }
    Err(LeaseError::Exhausted(slots))
}

/// Whether someone alive holds slot `index` (probes by taking and dropping the lock).
pub fn is_held(dir: &Path, index: u32) -> Result<bool, LeaseError> {
    if !lock_path(dir, index).exists() {
        return Ok(false);
    }
    Ok(try_claim(dir, index)?.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_slot_is_skipped_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let a = claim(dir.path(), 4, 0).unwrap();
        let b = claim(dir.path(), 4, 0).unwrap();
        assert_eq!((a.index(), b.index()), (0, 1));
        assert!(is_held(dir.path(), 0).unwrap());
        drop(a);
        assert!(!is_held(dir.path(), 0).unwrap());
        assert_eq!(claim(dir.path(), 4, 0).unwrap().index(), 0);
        // Probing starts where asked (b holds 1) and wraps around.
        assert_eq!(claim(dir.path(), 4, 3).unwrap().index(), 3);
        let c = claim(dir.path(), 4, 1).unwrap();
        assert_eq!(c.index(), 2);
        let d = claim(dir.path(), 4, 3).unwrap();
        assert_eq!(d.index(), 3);
        assert_eq!(claim(dir.path(), 4, 2).unwrap().index(), 0, "wrapped");
    }

    #[test]
    fn a_full_range_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let _a = claim(dir.path(), 1, 0).unwrap();
        let e = claim(dir.path(), 1, 0).unwrap_err();
        assert!(e.to_string().contains("1 network slots"), "{e}");
    }
}
