//! Register state for the first instruction: the PVH 32-bit entry, and the FPU.

use kvm_bindings::{kvm_fpu, kvm_regs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt;
use super::VcpuError;
use crate::vmm::layout;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;

/// Puts the vCPU at the PVH entry: 32-bit protected mode, paging off, flat segments,
/// `%ebx` pointing at `hvm_start_info` (x86/HVM direct boot ABI).
pub fn setup_pvh(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: GuestAddress,
    start_info: GuestAddress,
) -> Result<(), VcpuError> {
    let table = [
        0,
        gdt::entry(gdt::CODE32, 0, 0xfffff),
        gdt::entry(gdt::DATA, 0, 0xfffff),
        gdt::entry(gdt::TSS, 0, 0x67),
    ];
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT_START + 8 * i as u64))
            .map_err(|e| VcpuError::GuestMemory(e.to_string()))?;
    }

    let mut sregs = vcpu.get_sregs().map_err(VcpuError::kvm("KVM_GET_SREGS"))?;
    let code = gdt::segment(1, table[1]);
    let data = gdt::segment(2, table[2]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::segment(3, table[3]);
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(VcpuError::kvm("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rbx: start_info.0,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(VcpuError::kvm("KVM_SET_REGS"))
}

/// x87 control word and SSE state as after FNINIT, so the guest starts from a known FPU.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), VcpuError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(VcpuError::kvm("KVM_SET_FPU"))
}
