//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs,
//! the IO-APIC and the ISA interrupt wiring.
//!
//! Built as bytes (little endian, packed) rather than `#[repr(packed)]` structs, so there is
//! no unsafe and every field's place is visible.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REV: u8 = 4;
/// ISA IRQs routed through the IO-APIC, identity mapped to its pins.
const IOAPIC_PINS: u8 = 24;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// CPUID signature family 6 and feature flags FPU + APIC, as the table wants them.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("writing the MP table to guest memory at {addr:#x}: {reason}")]
    Write { addr: u64, reason: String },
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The configuration table (header and entries) for `cpus` CPUs, with its checksum.
fn config_table(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus.saturating_add(1);
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // type, irq type, flags (u16, conforming), source bus, source irq, dest apic, dest pin
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"CLEAVE  ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// The 16-byte floating pointer structure the guest scans for.
fn floating_pointer(table_addr: u32) -> [u8; 16] {
    let mut fp = [0u8; 16];
    fp[..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&table_addr.to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = SPEC_REV;
    fp[10] = checksum(&fp);
    fp
}

/// Writes the MP table for `cpus` CPUs at the start of the EBDA.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let fp_addr = layout::EBDA_START;
    let table_addr = fp_addr + 16;
    let err = |addr: u64| {
        move |e: vm_memory::GuestMemoryError| MpTableError::Write {
            addr,
            reason: e.to_string(),
        }
    };
    mem.write_slice(&floating_pointer(table_addr as u32), GuestAddress(fp_addr))
        .map_err(err(fp_addr))?;
    mem.write_slice(&config_table(cpus), GuestAddress(table_addr))
        .map_err(err(table_addr))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn structures_checksum_to_zero() {
        assert_eq!(sum(&floating_pointer(0x9fc10)), 0);
        for cpus in [1, 2, 32] {
            assert_eq!(sum(&config_table(cpus)), 0);
        }
    }

    #[test]
    fn table_length_and_entry_count_match_contents() {
        let t = config_table(4);
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(len, t.len());
        let count = u16::from_le_bytes([t[34], t[35]]);
        // 4 CPUs, bus, IO-APIC, 24 IRQs, 2 local interrupts
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        assert_eq!(t.len(), 44 + 4 * 20 + 8 + 8 + 24 * 8 + 2 * 8);
    }

    #[test]
    fn only_cpu_zero_is_bootstrap() {
        let t = config_table(2);
        assert_eq!(t[44 + 3], CPU_ENABLED | CPU_BOOTSTRAP);
        assert_eq!(t[64 + 3], CPU_ENABLED);
    }

    #[test]
    fn largest_table_stays_inside_low_memory_window() {
        let end =
            layout::EBDA_START + 16 + config_table(crate::vmm::config::MAX_VCPUS).len() as u64;
        // The EBDA window ends at 0xA0000 + the table may run into the (backed, non-RAM) hole;
        // make sure it never reaches high memory where the kernel lives.
        assert!(end < layout::HIMEM_START);
    }
}
