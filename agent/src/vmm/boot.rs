//! Loading a Linux guest for the PVH direct boot: the ELF vmlinux at its physical address,
//! the initramfs at the top of low RAM, the command line, the memory map, the MP table and
//! the `hvm_start_info` that ties them together.

use std::io::Cursor;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{layout, mptable};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("the kernel is not a loadable ELF vmlinux: {0} (cleave boots an uncompressed vmlinux with a PVH entry note; bzImage is not supported)")]
    Kernel(linux_loader::loader::Error),
    #[error("the kernel has no PVH entry note: build it with CONFIG_PVH=y")]
    NoPvhEntry,
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("the initramfs ({initrd} bytes) does not fit in guest memory after the kernel (ends at {kernel_end:#x}, low RAM ends at {low_end:#x}): give the guest more memory")]
    InitrdTooLarge {
        initrd: u64,
        kernel_end: u64,
        low_end: u64,
    },
    #[error("writing boot data to guest memory: {0}")]
    Memory(String),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
}

/// Where the first vCPU starts and what it is handed.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub entry: GuestAddress,
    pub start_info: GuestAddress,
}

/// Builds a validated command line.
pub fn cmdline(text: &str) -> Result<Cmdline, BootError> {
    let mut c =
        Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    c.insert_str(text)
        .map_err(|e| BootError::Cmdline(format!("{e} (in {text:?})")))?;
    Ok(c)
}

/// Loads everything the guest needs to start; returns the entry point.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &[u8],
    initrd: &[u8],
    cmdline: &Cmdline,
    vcpus: u8,
) -> Result<BootEntry, BootError> {
    let loaded = Elf::load(
        mem,
        None,
        &mut Cursor::new(kernel),
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(BootError::Kernel)?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr,
        _ => return Err(BootError::NoPvhEntry),
    };

    let low_end = mem_size.min(layout::MMIO_GAP_START);
    let initrd_len = initrd.len() as u64;
    let initrd_addr = low_end
        .checked_sub(initrd_len)
        .map(|a| a & !(PAGE - 1))
        .filter(|a| *a >= loaded.kernel_end)
        .ok_or(BootError::InitrdTooLarge {
            initrd: initrd_len,
            kernel_end: loaded.kernel_end,
            low_end,
        })?;
    let mem_err = |e: vm_memory::GuestMemoryError| BootError::Memory(e.to_string());
    mem.write_slice(initrd, GuestAddress(initrd_addr))
        .map_err(mem_err)?;

    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    mptable::write(mem, vcpus)?;

    let memmap = memory_map(mem_size);
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: 1,
        modlist_paddr: layout::MODLIST_START,
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: layout::MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let module = hvm_modlist_entry {
        paddr: initrd_addr,
        size: initrd_len,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(layout::MEMMAP_START));
    params.set_modules(&[module], GuestAddress(layout::MODLIST_START));
    PvhBootConfigurator::write_bootparams(&params, mem)
        .map_err(|e| BootError::Memory(e.to_string()))?;

    Ok(BootEntry {
        entry,
        start_info: GuestAddress(layout::PVH_INFO_START),
    })
}

/// RAM the guest may use: low memory below the EBDA, then everything from 1 MiB up,
/// around the MMIO gap.
fn memory_map(mem_size: u64) -> Vec<hvm_memmap_table_entry> {
    let ram = |addr: u64, size: u64| hvm_memmap_table_entry {
        addr,
        size,
        type_: E820_RAM,
        reserved: 0,
    };
    let mut map = vec![ram(0, layout::EBDA_START)];
    for (start, len) in layout::ram_ranges(mem_size) {
        let end = start + len;
        let start = start.max(layout::HIMEM_START);
        if end > start {
            map.push(ram(start, end - start));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_covers_ram_and_skips_holes() {
        let m = memory_map(256 << 20);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].addr, m[0].size), (0, layout::EBDA_START));
        assert_eq!(
            (m[1].addr, m[1].size),
            (layout::HIMEM_START, (256 << 20) - layout::HIMEM_START)
        );

        let big = memory_map(4 << 30);
        assert_eq!(big.len(), 3);
        assert_eq!(big[1].addr + big[1].size, layout::MMIO_GAP_START);
        assert_eq!(big[2].addr, layout::MMIO_GAP_END);
        assert_eq!(big[2].size, (4 << 30) - layout::MMIO_GAP_START);
    }

    #[test]
    fn cmdline_rejects_what_the_kernel_cannot_take() {
        assert!(cmdline("console=ttyS0 quiet").is_ok());
        assert!(cmdline("bad\0nul").is_err());
        assert!(cmdline(&"x".repeat(layout::CMDLINE_MAX_SIZE + 1)).is_err());
    }

    #[test]
    fn garbage_and_truncated_kernels_are_rejected_not_panicking() {
        let ram = crate::vmm::memory::GuestRam::create(
            crate::vmm::config::MemSize::from_mib(32).unwrap(),
        )
        .unwrap();
        let c = cmdline("console=ttyS0").unwrap();
        for kernel in [
            &b""[..],
            b"\x7fELF",
            &[0u8; 4096][..],
            b"MZ this is not a kernel",
        ] {
            let err = load(ram.memory(), ram.size(), kernel, b"", &c, 1).unwrap_err();
            assert!(matches!(err, BootError::Kernel(_)), "{err}");
        }
    }
}
