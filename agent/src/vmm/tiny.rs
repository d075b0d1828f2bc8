//! A tiny hand-made long-mode guest, for what needs only KVM ioctls: VMM tests and
//! host-side benchmarks on hosts whose KVM cannot run a Linux guest (`kvm_pvm`).
//!
//! It prints "hi\n" on COM1, reads a byte from an unclaimed MMIO address and prints it,
//! writes it back there, then either reports an exit status on the debug-exit port or
//! halts with interrupts off.

use kvm_bindings::kvm_regs;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::vcpu::{gdt, Vcpu, VcpuError};

/// Where the code is loaded and starts.
pub const CODE_START: u64 = 0x1000;
/// The unclaimed MMIO address the guest touches (inside the MMIO gap).
pub const MMIO_ADDR: u64 = 0xd000_0000;

const PML4_START: u64 = 0x9000;
const PDPT_START: u64 = 0xa000;
/// Four page directories of 2 MiB pages identity-map the first 4 GiB.
const PD_START: u64 = 0xb000;

const PTE_PRESENT_RW: u64 = 0x3;
const PDE_2M: u64 = 0x80;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the tiny guest ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Writes the status to the debug-exit port.
    Exit(u8),
    /// `cli; hlt`: stays halted until the host stops it.
    Halt,
    /// Counts forever: `rcx` += 1, stores it at [`COUNTER_ADDR`], reads COM1's line
    /// status ([`COUNT_STATUS_PORT`]), prints [`count_char`]`(rcx)` on COM1, repeat. What a fork test watches to see a clone
    /// continue exactly where its template stopped.
    Count,
}

/// The port [`Ending::Count`] reads once per count (COM1's line status register).
pub const COUNT_STATUS_PORT: u16 = 0x3fd;

/// Where [`Ending::Count`] stores its counter.
pub const COUNTER_ADDR: u64 = 0x5000;

/// The character [`Ending::Count`] prints for counter value `n`: 64 printable ASCII
/// characters, cycling.
pub fn count_char(n: u64) -> u8 {
    b'0' + (n & 0x3f) as u8
}

/// The machine code.
pub fn program(ending: Ending) -> Vec<u8> {
    let mut code = vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'h', 0xee, // mov al, 'h'; out dx, al
        0xb0, b'i', 0xee, // mov al, 'i'; out dx, al
        0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
        0x48, 0xbb, // movabs rbx, MMIO_ADDR
    ];
    code.extend_from_slice(&MMIO_ADDR.to_le_bytes());
    code.extend_from_slice(&[
        0x8a, 0x03, // mov al, [rbx]   (MMIO read)
        0xee, // out dx, al     (print what it read)
        0x88, 0x03, // mov [rbx], al   (MMIO write)
    ]);
    match ending {
        Ending::Exit(status) => code.extend_from_slice(&[
            0xb0, status, // mov al, status
            0x66, 0xba, 0xf4, 0x00, // mov dx, 0xf4
            0xee, // out dx, al
            0xf4, // hlt (not reached)
        ]),
        Ending::Halt => code.extend_from_slice(&[0xfa, 0xf4]), // cli; hlt
        Ending::Count => {
            code.extend_from_slice(&[
                0x31, 0xc9, // xor ecx, ecx
                // loop:
                0x48, 0xff, 0xc1, // inc rcx
                0x48, 0x89, 0x0c, 0x25, // mov [COUNTER_ADDR], rcx
            ]);
            code.extend_from_slice(&(COUNTER_ADDR as u32).to_le_bytes());
            code.extend_from_slice(&[
                0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd (line status, as a driver polls)
                0xec, // in al, dx
                0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
                0x89, 0xc8, // mov eax, ecx
                0x24, 0x3f, // and al, 0x3f
                0x04, b'0', // add al, '0'
                0xee, // out dx, al
                0xeb, 0xe3, // jmp loop (-29)
            ]);
        }
    }
    code
}

/// A one-vCPU VM of `machine`'s shape (in-kernel irqchip, console discarded) with the
/// tiny guest loaded, ending as `ending`, and its first vCPU set up to run it.
pub fn vm(
    kvm: &kvm_ioctls::Kvm,
    machine: super::config::MachineConfig,
    ending: Ending,
) -> Result<super::Vm, super::VmmError> {
    let vm = super::Vm::create(
        kvm,
        machine,
        super::Irqchip::InKernel,
        Box::new(std::io::sink()),
    )?;
    load(vm.ram().memory(), ending)?;
    vm.vcpus()[0].configure_cpu(vm.supported_cpuid(), 1)?;
    setup_vcpu(&vm.vcpus()[0])?;
    Ok(vm)
}

/// Writes the page tables, GDT and code into guest memory.
pub fn load(mem: &GuestMemoryMmap, ending: Ending) -> Result<(), VcpuError> {
    let err = |e: vm_memory::GuestMemoryError| VcpuError::GuestMemory(e.to_string());
    mem.write_obj(PDPT_START | PTE_PRESENT_RW, GuestAddress(PML4_START))
        .map_err(err)?;
    for pd in 0..4u64 {
        let pd_addr = PD_START + pd * 0x1000;
        mem.write_obj(pd_addr | PTE_PRESENT_RW, GuestAddress(PDPT_START + pd * 8))
            .map_err(err)?;
        for i in 0..512u64 {
            let phys = (pd * 512 + i) << 21;
            mem.write_obj(
                phys | PTE_PRESENT_RW | PDE_2M,
                GuestAddress(pd_addr + i * 8),
            )
            .map_err(err)?;
        }
    }
    gdt::write(mem, &gdt::flat_table(gdt::CODE64))?;
    mem.write_slice(&program(ending), GuestAddress(CODE_START))
        .map_err(err)
}

/// Puts `vcpu` in 64-bit mode at [`CODE_START`].
pub fn setup_vcpu(vcpu: &Vcpu) -> Result<(), VcpuError> {
    let fd = vcpu.fd();
    let table = gdt::flat_table(gdt::CODE64);
    let mut sregs = fd.get_sregs().map_err(VcpuError::kvm("KVM_GET_SREGS"))?;
    gdt::load_flat(&mut sregs, &table);
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    fd.set_sregs(&sregs)
        .map_err(VcpuError::kvm("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: CODE_START,
        rflags: 0x2,
        rsp: CODE_START,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(VcpuError::kvm("KVM_SET_REGS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_ends_as_asked() {
        let exit = program(Ending::Exit(42));
        assert_eq!(&exit[exit.len() - 8..exit.len() - 6], &[0xb0, 42]);
        assert!(program(Ending::Halt).ends_with(&[0xfa, 0xf4]));
    }

    #[test]
    fn count_loop_jumps_back_to_its_start() {
        let code = program(Ending::Count);
        let start = code
            .windows(3)
            .position(|w| w == [0x48, 0xff, 0xc1])
            .unwrap();
        let rel = code[code.len() - 1] as i8;
        assert_eq!(code.len() as isize + rel as isize, start as isize);
        assert_eq!(count_char(1), b'1');
        assert_eq!(count_char(64), b'0');
    }
}
