//! Register state for the first instruction: the PVH 32-bit entry, and the FPU.

use kvm_bindings::{kvm_fpu, kvm_regs};
use kvm_ioctls::VcpuFd;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::gdt;
use super::VcpuError;

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
    let table = gdt::flat_table(gdt::CODE32);
    gdt::write(mem, &table)?;
    let mut sregs = vcpu.get_sregs().map_err(VcpuError::kvm("KVM_GET_SREGS"))?;
    gdt::load_flat(&mut sregs, &table);
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
