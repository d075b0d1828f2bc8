//! Global descriptor table entries and the KVM segments that describe them.

use kvm_bindings::{kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::VcpuError;
use crate::vmm::layout;

/// Flat 32-bit code, execute/read (PVH entry).
pub const CODE32: u16 = 0xc09b;
/// Flat 64-bit code, execute/read (long-mode guests).
pub const CODE64: u16 = 0xa09b;
/// Flat data, read/write.
pub const DATA: u16 = 0xc093;
/// 32-bit TSS, busy.
pub const TSS: u16 = 0x008b;

/// Encodes one descriptor: `flags` holds the access byte (low 8 bits) and the G/DB/L/AVL
/// nibble (bits 12..16), as in the CPU's layout.
pub fn entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The KVM segment register for descriptor `index` holding `entry`.
pub fn segment(index: u16, entry: u64) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let granular = bit(55) == 1;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT: null, flat code with `code_flags`, flat data, TSS.
pub fn flat_table(code_flags: u16) -> [u64; 4] {
    [
        0,
        entry(code_flags, 0, 0xfffff),
        entry(DATA, 0, 0xfffff),
        entry(TSS, 0, 0x67),
    ]
}

/// Writes `table` to guest memory at [`layout::BOOT_GDT_START`].
pub fn write(mem: &GuestMemoryMmap, table: &[u64; 4]) -> Result<(), VcpuError> {
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT_START + 8 * i as u64))
            .map_err(|e| VcpuError::GuestMemory(e.to_string()))?;
    }
    Ok(())
}

/// Points the segment registers and GDTR of `sregs` at a [`flat_table`] in guest memory.
pub fn load_flat(sregs: &mut kvm_sregs, table: &[u64; 4]) {
    let data = segment(2, table[2]);
    sregs.cs = segment(1, table[1]);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(3, table[3]);
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_segment_round_trips() {
        let e = entry(CODE32, 0, 0xfffff);
        assert_eq!(e, 0x00cf_9b00_0000_ffff);
        let s = segment(1, e);
        assert_eq!((s.base, s.limit, s.selector), (0, 0xffff_ffff, 8));
        assert_eq!(
            (s.type_, s.present, s.s, s.db, s.g, s.l),
            (0xb, 1, 1, 1, 1, 0)
        );
    }

    #[test]
    fn long_mode_code_sets_l_not_db() {
        let s = segment(1, entry(CODE64, 0, 0xfffff));
        assert_eq!((s.l, s.db), (1, 0));
    }

    #[test]
    fn base_and_byte_limit_are_decoded() {
        let s = segment(3, entry(TSS, 0x1234_5678, 0x67));
        assert_eq!((s.base, s.limit, s.g, s.type_), (0x1234_5678, 0x67, 0, 0xb));
        assert_eq!(segment(0, 0).unusable, 1);
    }
}
