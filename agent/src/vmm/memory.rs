//! Guest RAM: one memfd, mapped into this process and registered with KVM.
//!
//! The memfd (not anonymous memory) is what lets a later step seal a captured template and
//! hand the same pages to forks copy-on-write.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use nix::sys::memfd::{memfd_create, MFdFlags};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::config::MemSize;
use super::layout;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("creating the guest memory file (memfd_create): {0}")]
    Memfd(nix::Error),
    #[error("sizing the guest memory file to {size} bytes: {source}")]
    Resize { size: u64, source: std::io::Error },
    #[error("mapping {size} bytes of guest memory at guest address {addr:#x}: {reason}")]
    Map {
        addr: u64,
        size: u64,
        reason: String,
    },
    #[error("registering guest memory slot {slot} with KVM: {source}")]
    Register {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// How the memfd is mapped: a booting guest owns its pages; a fork shares them until written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// `MAP_SHARED`: writes land in the memfd.
    Shared,
    /// `MAP_PRIVATE`: writes are copied into this process only.
    Private,
}

/// Guest RAM backed by a memfd.
pub struct GuestRam {
    file: Arc<File>,
    mem: GuestMemoryMmap,
    size: u64,
}

impl GuestRam {
    /// Creates a fresh, zeroed memfd of `size` and maps it shared.
    pub fn create(size: MemSize) -> Result<Self, MemoryError> {
        let fd = memfd_create(
            c"cleave-guest-ram",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(MemoryError::Memfd)?;
        let file = File::from(fd);
        file.set_len(size.bytes())
            .map_err(|source| MemoryError::Resize {
                size: size.bytes(),
                source,
            })?;
        Self::map(Arc::new(file), size.bytes(), Sharing::Shared)
    }

    /// Maps an existing memfd of `size` bytes.
    pub fn map(file: Arc<File>, size: u64, sharing: Sharing) -> Result<Self, MemoryError> {
        let flags = libc::MAP_NORESERVE
            | match sharing {
                Sharing::Shared => libc::MAP_SHARED,
                Sharing::Private => libc::MAP_PRIVATE,
            };
        let mut regions = Vec::new();
        let mut file_offset = 0u64;
        for (addr, len) in layout::ram_ranges(size) {
            let map_err = |reason: String| MemoryError::Map {
                addr,
                size: len,
                reason,
            };
            let len_usize = usize::try_from(len).map_err(|e| map_err(e.to_string()))?;
            let region = MmapRegionBuilder::new(len_usize)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .with_file_offset(FileOffset::from_arc(file.clone(), file_offset))
                .build()
                .map_err(|e| map_err(e.to_string()))?;
            let region = GuestRegionMmap::new(region, GuestAddress(addr))
                .ok_or_else(|| map_err("guest address overflows".into()))?;
            regions.push(region);
            file_offset += len;
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map {
            addr: 0,
            size,
            reason: e.to_string(),
        })?;
        Ok(Self { file, mem, size })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Tells KVM about every region, one slot each.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        for (slot, region) in self.mem.iter().enumerate() {
            let slot = slot as u32;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| MemoryError::Map {
                    addr: region.start_addr().0,
                    size: region.len(),
                    reason: e.to_string(),
                })?;
            let entry = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping owned by `self.mem`, which outlives the
            // VM (the `Vm` keeps both and drops the VM fd first); slots do not overlap.
            unsafe { vm.set_user_memory_region(entry) }
                .map_err(|source| MemoryError::Register { slot, source })?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("memfd", &self.file.as_raw_fd())
            .field("size", &self.size)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_is_memfd_backed_and_shared() {
        let ram = GuestRam::create(MemSize::from_mib(32).unwrap()).unwrap();
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        ram.file().read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }

    #[test]
    fn private_mapping_does_not_write_through() {
        let ram = GuestRam::create(MemSize::from_mib(32).unwrap()).unwrap();
        ram.memory().write_obj(1u64, GuestAddress(0x2000)).unwrap();
        let fork = GuestRam::map(ram.file().clone(), ram.size(), Sharing::Private).unwrap();
        assert_eq!(
            fork.memory().read_obj::<u64>(GuestAddress(0x2000)).unwrap(),
            1
        );
        fork.memory().write_obj(2u64, GuestAddress(0x2000)).unwrap();
        assert_eq!(
            ram.memory().read_obj::<u64>(GuestAddress(0x2000)).unwrap(),
            1
        );
    }
}
