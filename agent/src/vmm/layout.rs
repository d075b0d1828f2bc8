//! Where things live in guest physical memory (x86_64).
//!
//! One table so that boot, the MP table writer and the memory map agree.

/// GDT used for the PVH 32-bit entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const MODLIST_START: u64 = 0x6040;
/// PVH memory map entries.
pub const MEMMAP_START: u64 = 0x7000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line we accept (bytes, without the NUL).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the EBDA, where the MP table lives; RAM below this is usable.
pub const EBDA_START: u64 = 0x9_fc00;
/// End of the legacy low memory window (VGA hole starts here).
pub const LOW_MEM_END: u64 = 0xa_0000;
/// First address of high memory; kernels load at or above this.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB (device windows go here).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// KVM's TSS needs three pages in the guest physical space that no RAM uses (Intel).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

// The fixed boot structures must not overlap; checked when this compiles.
const _: () = {
    assert!(BOOT_GDT_START + 8 * 4 <= PVH_INFO_START);
    assert!(MODLIST_START + 32 <= MEMMAP_START);
    assert!(CMDLINE_START + (CMDLINE_MAX_SIZE as u64) < EBDA_START);
};

/// The RAM ranges (guest address, length) for a guest of `size` bytes, skipping the MMIO gap.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
        assert_eq!(r.iter().map(|r| r.1).sum::<u64>(), 4 << 30);
    }
}
