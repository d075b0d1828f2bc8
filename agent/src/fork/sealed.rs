//! A template's guest memory: the memfd it ran on, sealed so that nobody — not the agent,
//! not a fork, not a process the fd is passed to — can change, grow or shrink it again.
//!
//! `F_SEAL_WRITE` is refused (`EBUSY`) while any writable `MAP_SHARED` mapping of the file
//! exists, so the template VM's own mapping must be gone before [`SealedMemory::seal`];
//! `capture` drops the VM first. Forks map the file `MAP_PRIVATE`, which the seal allows:
//! their writes are copied into their own pages and never reach the file.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};

/// How often sealing is retried on `EBUSY` (10 + 20 + … ms, capped at 250: ~1.1 s).
const SEAL_RETRIES: u32 = 7;

/// The seals every template memfd carries.
pub fn template_seals() -> SealFlag {
    SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(
        "sealing the template memory (F_ADD_SEALS): {0} (EBUSY means a writable shared \
         mapping of it still exists)"
    )]
    Seal(nix::Error),
    #[error("reading the template memory's seals (F_GET_SEALS): {0}")]
    GetSeals(nix::Error),
    #[error("the template memory is not sealed against writes and resizing (seals {found:#x})")]
    NotSealed { found: i32 },
    #[error("reading the template memory's size: {0}")]
    Stat(std::io::Error),
    #[error("the template memory is {found} bytes, expected {expected}")]
    Size { expected: u64, found: u64 },
}

/// Guest memory that can no longer change.
#[derive(Clone)]
pub struct SealedMemory {
    file: Arc<File>,
    size: u64,
}

impl SealedMemory {
    /// Seals `file` (write, grow, shrink, and further sealing) and checks its size.
    ///
    /// Right after the template VM is dropped, KVM may still hold references to some of
    /// its pages for a moment (its teardown is partly asynchronous), and the kernel
    /// answers `EBUSY` for those just as for a live writable mapping: a bounded retry
    /// (~1 s in all) tells the two apart.
    pub fn seal(file: Arc<File>, size: u64) -> Result<Self, SealError> {
        let mut wait = std::time::Duration::from_millis(10);
        let mut tries = 0;
        loop {
            match fcntl(&*file, FcntlArg::F_ADD_SEALS(template_seals())) {
                Ok(_) => break,
                Err(nix::errno::Errno::EBUSY) if tries < SEAL_RETRIES => {
                    tries += 1;
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(std::time::Duration::from_millis(250));
                }
                Err(e) => return Err(SealError::Seal(e)),
            }
        }
        Self::from_sealed(file, size)
    }

    /// Accepts a memfd that someone else sealed (a worker receiving a template) only if it
    /// carries every template seal and is exactly `size` bytes.
    pub fn from_sealed(file: Arc<File>, size: u64) -> Result<Self, SealError> {
        let found = fcntl(&*file, FcntlArg::F_GET_SEALS).map_err(SealError::GetSeals)?;
        if !SealFlag::from_bits_truncate(found).contains(template_seals()) {
            return Err(SealError::NotSealed { found });
        }
        let len = file.metadata().map_err(SealError::Stat)?.len();
        if len != size {
            return Err(SealError::Size {
                expected: size,
                found: len,
            });
        }
        Ok(Self { file, size })
    }

    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

impl std::fmt::Debug for SealedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedMemory")
            .field("memfd", &self.file.as_raw_fd())
            .field("size", &self.size)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::config::MemSize;
    use crate::vmm::memory::{GuestRam, Sharing};
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};

    fn ram() -> GuestRam {
        GuestRam::create(MemSize::from_mib(32).unwrap()).unwrap()
    }

    #[test]
    fn sealing_waits_for_the_shared_mapping_to_go() {
        let ram = ram();
        ram.memory().write_obj(7u64, GuestAddress(0x3000)).unwrap();
        let (file, size) = (ram.file().clone(), ram.size());
        let busy = SealedMemory::seal(file.clone(), size).unwrap_err();
        assert!(matches!(busy, SealError::Seal(nix::Error::EBUSY)), "{busy}");
        drop(ram);
        let sealed = SealedMemory::seal(file, size).unwrap();
        // Writes through the fd, resizing and shared writable mappings are all refused now.
        assert!(sealed.file().write_at(&[1], 0x3000).is_err());
        assert!(sealed.file().set_len(size * 2).is_err());
        assert!(sealed.file().set_len(size / 2).is_err());
        assert!(GuestRam::map(sealed.file().clone(), size, Sharing::Shared).is_err());
        // A private mapping sees the contents and keeps its writes to itself.
        let fork = GuestRam::map(sealed.file().clone(), size, Sharing::Private).unwrap();
        assert_eq!(
            fork.memory().read_obj::<u64>(GuestAddress(0x3000)).unwrap(),
            7
        );
        fork.memory().write_obj(8u64, GuestAddress(0x3000)).unwrap();
        let mut buf = [0u8; 8];
        sealed.file().read_exact_at(&mut buf, 0x3000).unwrap();
        assert_eq!(u64::from_le_bytes(buf), 7);
    }

    #[test]
    fn a_mapping_that_goes_within_the_retries_is_waited_for() {
        let ram = ram();
        let (file, size) = (ram.file().clone(), ram.size());
        // What KVM's asynchronous teardown looks like from here: busy, then not.
        let later = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(ram);
        });
        SealedMemory::seal(file, size).unwrap();
        later.join().unwrap();
    }

    #[test]
    fn an_unsealed_or_wrong_sized_memfd_is_refused() {
        let ram = ram();
        let err = SealedMemory::from_sealed(ram.file().clone(), ram.size()).unwrap_err();
        assert!(matches!(err, SealError::NotSealed { .. }), "{err}");
        let (file, size) = (ram.file().clone(), ram.size());
        drop(ram);
        SealedMemory::seal(file.clone(), size).unwrap();
        let err = SealedMemory::from_sealed(file, size + 4096).unwrap_err();
        assert!(matches!(err, SealError::Size { .. }), "{err}");
    }
}
