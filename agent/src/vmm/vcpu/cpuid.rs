//! CPUID for one vCPU: what KVM supports on this host, with the per-vCPU and hypervisor
//! fix-ups a Linux guest expects (APIC IDs, topology, the hypervisor bit).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE_8B: u32 = 8;

/// Topology level types in leaf 0xB/0x1F ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` items (ceil(log2(n))).
fn id_width(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn fix_entry(e: &mut kvm_cpuid_entry2, index: u8, count: u8) {
    let apic_id = u32::from(index);
    let count = u32::from(count);
    match e.function {
        LEAF_FEATURES => {
            e.ebx = (apic_id << 24) | (count << 16) | (CLFLUSH_LINE_8B << 8);
            e.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
            // One thread per core, all vCPUs cores of one package.
            let (eax, ebx, level) = match e.index {
                0 => (0, 1, LEVEL_SMT),
                1 => (id_width(count), count, LEVEL_CORE),
                _ => (0, 0, 0),
            };
            e.eax = eax;
            e.ebx = ebx;
            e.ecx = (level << 8) | (e.index & 0xff);
            e.edx = apic_id;
        }
        _ => {}
    }
}

/// Lists the TSC-deadline timer in leaf 1, for a VM whose in-kernel LAPIC emulates it
/// (`KVM_CAP_TSC_DEADLINE_TIMER`). A Linux guest then runs each CPU's clock on it
/// (`lapic-deadline`), from the TSC frequency it already knows, and never calibrates its
/// LAPIC timer against the PIT.
pub fn offer_tsc_deadline(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        if e.function == LEAF_FEATURES {
            e.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

/// The CPUID table for vCPU `index` of `count`.
pub fn for_vcpu(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        fix_entry(e, index, count);
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            edx: EDX_HTT,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_and_hypervisor_bit() {
        let mut e = leaf(LEAF_FEATURES, 0);
        fix_entry(&mut e, 3, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
        fix_entry(&mut e, 0, 1);
        assert_eq!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_numbers_cores() {
        let mut core = leaf(LEAF_EXT_TOPOLOGY, 1);
        fix_entry(&mut core, 5, 6);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        let mut smt = leaf(LEAF_EXT_TOPOLOGY, 0);
        fix_entry(&mut smt, 5, 6);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
    }

    #[test]
    fn the_tsc_deadline_timer_is_offered_in_leaf_1_only() {
        let mut cpuid =
            CpuId::from_entries(&[leaf(LEAF_FEATURES, 0), leaf(LEAF_EXT_TOPOLOGY, 0)]).unwrap();
        offer_tsc_deadline(&mut cpuid);
        let e = cpuid.as_slice();
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(e[1].ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn id_width_is_ceil_log2() {
        assert_eq!([1, 2, 3, 4, 5, 32].map(id_width), [0, 1, 2, 2, 3, 5]);
    }
}
