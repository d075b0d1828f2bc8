//! The captured machine as plain data: what a fork restores, one struct per part.
//!
//! Everything here is a copy of what KVM or a device model handed out; nothing holds a file
//! descriptor or a pointer, so a template's state can be cloned, compared and sent to
//! another process as it is.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use vm_superio::serial::SerialState;

use crate::vmm::config::MachineConfig;

/// The floating-point and vector state: the whole XSAVE area where the host has it, the
/// legacy FXSAVE-shaped state otherwise.
#[derive(Clone)]
pub enum FpuState {
    /// `kvm_xsave.region` (the struct itself is not `Clone`: it ends in a flexible array).
    Xsave(Box<[u32; 1024]>),
    Legacy(Box<kvm_fpu>),
}

impl FpuState {
    pub fn from_xsave(xsave: &kvm_xsave) -> Self {
        FpuState::Xsave(Box::new(xsave.region))
    }
}

/// The `kvm_xsave` for an XSAVE area.
pub fn xsave_of(region: &[u32; 1024]) -> kvm_xsave {
    kvm_xsave {
        region: *region,
        ..Default::default()
    }
}

/// One vCPU, as KVM reports it.
#[derive(Clone)]
pub struct VcpuState {
    pub index: u8,
    /// The CPUID table the vCPU ran with (a fork must see the same CPU).
    pub cpuid: CpuId,
    /// Every MSR that this host's KVM both reads and writes back (see `capture`).
    pub msrs: Msrs,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// Extended control registers; `None` where KVM has no XCR support.
    pub xcrs: Option<kvm_xcrs>,
    pub lapic: Box<kvm_lapic_state>,
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and the interrupt shadow.
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
}

/// The in-kernel interrupt controllers and timer.
#[derive(Clone)]
pub struct IrqchipState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
}

/// VM-wide state.
#[derive(Clone)]
pub struct VmState {
    pub irqchip: IrqchipState,
    /// The kvmclock value at capture; a fork's guest clock continues from here.
    pub clock: kvm_clock_data,
}

/// Every device's state, one plain struct per device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    pub serial: SerialState,
}

/// The whole machine except its memory (which is the template's sealed memfd).
#[derive(Clone)]
pub struct MachineState {
    pub machine: MachineConfig,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceState,
}

impl std::fmt::Debug for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineState")
            .field("machine", &self.machine)
            .field("vcpus", &self.vcpus.len())
            .field(
                "msrs_per_vcpu",
                &self.vcpus.first().map(|v| v.msrs.as_slice().len()),
            )
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}
