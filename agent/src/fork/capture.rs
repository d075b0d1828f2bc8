//! Freezing a stopped VM into a [`Template`]: each vCPU's state, the VM's interrupt
//! controllers, PIT and clock, each device's state, and its memory sealed.
//!
//! The VM is consumed: a template never runs again, and its writable shared mapping of
//! guest memory must be gone before the memfd can be sealed against writes.

use std::time::Instant;

use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VmFd};

use super::sealed::{SealError, SealedMemory};
use super::state::{DeviceState, FpuState, IrqchipState, MachineState, VcpuState, VmState};
use super::Template;
use crate::vmm::vcpu::Vcpu;
use crate::vmm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("capturing the template: {op} failed: {source}")]
    Vm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("capturing the template: {op} on vCPU {index} failed: {source}")]
    Vcpu {
        index: u8,
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(
        "capturing the template: vCPU {index} did not pause (KVM_RUN with immediate_exit \
         returned an exit instead of EINTR); stop the VM before capturing it"
    )]
    NotPaused { index: u8 },
    #[error(
        "capturing the template: the VM has no in-kernel irqchip ({0}); templates are \
         created with `Irqchip::InKernel`"
    )]
    NoIrqchip(kvm_ioctls::Error),
    #[error("capturing the template: building the MSR list: {0}")]
    MsrList(String),
    #[error(transparent)]
    Seal(#[from] SealError),
}

fn vm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> CaptureError {
    move |source| CaptureError::Vm { op, source }
}

fn vcpu_err(index: u8, op: &'static str) -> impl Fn(kvm_ioctls::Error) -> CaptureError {
    move |source| CaptureError::Vcpu { index, op, source }
}

/// Captures `vm` (stopped: [`crate::vmm::RunningVm::stop_and_keep`]) and seals its memory.
pub fn capture(kvm: &Kvm, mut vm: Vm) -> Result<Template, CaptureError> {
    let t = Instant::now();
    let candidates = kvm
        .get_msr_index_list()
        .map_err(vm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let with_xsave = kvm.check_extension(Cap::Xsave);
    let with_xcrs = kvm.check_extension(Cap::Xcrs);
    let mut vcpus = Vec::with_capacity(vm.vcpus_mut().len());
    for vcpu in vm.vcpus_mut() {
        pause(vcpu)?;
        vcpus.push(capture_vcpu(
            vcpu,
            candidates.as_slice(),
            with_xsave,
            with_xcrs,
        )?);
    }
    let vm_state = capture_vm(vm.fd())?;
    let devices = {
        let legacy = vm.devices().lock().unwrap_or_else(|e| e.into_inner());
        DeviceState {
            serial: legacy.serial.state(),
            vsock: vm.vsock_state(),
            net: vm.net_state(),
            rng: vm.rng_state(),
        }
    };
    let state = MachineState {
        format: super::state::STATE_FORMAT,
        machine: vm.machine(),
        vm: vm_state,
        vcpus,
        devices,
    };
    let (file, size) = (vm.ram().file().clone(), vm.ram().size());
    let captured = t.elapsed();
    // Dropping the VM unmaps its writable shared view of the memfd (F_SEAL_WRITE needs that)
    // and releases its KVM objects; this is the slow part (tens of ms with a PIT) and is
    // paid once per template, never per fork.
    drop(vm);
    let memory = SealedMemory::seal(file, size)?;
    tracing::debug!(
        capture_ms = captured.as_secs_f64() * 1e3,
        total_ms = t.elapsed().as_secs_f64() * 1e3,
        msrs = state.vcpus[0].msrs.as_slice().len(),
        "template captured"
    );
    Ok(Template::new(memory, state))
}

/// Completes whatever exit the vCPU last returned (KVM finishes an I/O or MMIO instruction
/// only on the next KVM_RUN) without running guest code: with `immediate_exit` set, KVM_RUN
/// completes the pending instruction and returns EINTR. Without this a fork would execute
/// the template's last `out` a second time.
fn pause(vcpu: &mut Vcpu) -> Result<(), CaptureError> {
    let index = vcpu.index();
    let fd = vcpu.fd_mut();
    fd.set_kvm_immediate_exit(1);
    let paused = match fd.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(vcpu_err(index, "KVM_RUN (immediate_exit)")(e)),
        Ok(_) => Err(CaptureError::NotPaused { index }),
    };
    fd.set_kvm_immediate_exit(0);
    paused
}

fn capture_vcpu(
    vcpu: &Vcpu,
    msr_candidates: &[u32],
    with_xsave: bool,
    with_xcrs: bool,
) -> Result<VcpuState, CaptureError> {
    let index = vcpu.index();
    let fd = vcpu.fd();
    let err = |op| vcpu_err(index, op);
    let fpu = if with_xsave {
        FpuState::from_xsave(&fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?)
    } else {
        FpuState::Legacy(Box::new(fd.get_fpu().map_err(err("KVM_GET_FPU"))?))
    };
    let xcrs = if with_xcrs {
        Some(fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?)
    } else {
        None
    };
    Ok(VcpuState {
        index,
        cpuid: fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_CPUID2"))?,
        msrs: {
            let mut msrs = msrs_that_round_trip(vcpu, msr_candidates)?;
            arm_an_expired_deadline(&mut msrs);
            msrs
        },
        regs: fd.get_regs().map_err(err("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(err("KVM_GET_SREGS"))?,
        fpu,
        xcrs,
        lapic: Box::new(fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?),
        mp_state: fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?,
        events: fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?,
        debugregs: fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?,
    })
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// A TSC deadline of 0 means the timer fired (KVM clears it then), but its interrupt may
/// still be pending inside KVM, where `KVM_GET_LAPIC` does not see it: a fork would never
/// get it, and its guest, still waiting for that tick, would not program another. The
/// deadline becomes the captured TSC instead: already due, it fires as soon as a fork
/// runs, and a Linux guest takes the extra tick in its stride. (Firecracker found the
/// same.)
fn arm_an_expired_deadline(msrs: &mut Msrs) {
    let tsc = msrs
        .as_slice()
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.data);
    let Some(tsc) = tsc else {
        return;
    };
    for m in msrs.as_mut_slice() {
        if m.index == MSR_IA32_TSC_DEADLINE && m.data == 0 {
            m.data = tsc;
        }
    }
}

/// Reads every MSR KVM lists (`KVM_GET_MSR_INDEX_LIST`: the architectural ones it saves
/// plus those it emulates, TSC and kvmclock among them) and keeps those this vCPU can both
/// read and have written back, so a fork's single `KVM_SET_MSRS` cannot stop half way.
/// KVM stops at the first MSR it refuses and reports how many it handled; that one is
/// dropped and the rest retried (the list holds ~100, the loop is bounded by its length).
fn msrs_that_round_trip(vcpu: &Vcpu, candidates: &[u32]) -> Result<Msrs, CaptureError> {
    let index = vcpu.index();
    let mut indices = candidates.to_vec();
    loop {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| CaptureError::MsrList(format!("{e:?}")))?;
        let read = vcpu
            .fd()
            .get_msrs(&mut msrs)
            .map_err(vcpu_err(index, "KVM_GET_MSRS"))?;
        if read < indices.len() {
            tracing::trace!(msr = indices[read], "MSR not readable; left out");
            indices.remove(read);
            continue;
        }
        let written = vcpu
            .fd()
            .set_msrs(&msrs)
            .map_err(vcpu_err(index, "KVM_SET_MSRS"))?;
        if written < indices.len() {
            tracing::trace!(msr = indices[written], "MSR not writable; left out");
            indices.remove(written);
            continue;
        }
        return Ok(msrs);
    }
}

fn capture_vm(fd: &VmFd) -> Result<VmState, CaptureError> {
    let chip = |chip_id: u32| -> Result<kvm_irqchip, kvm_ioctls::Error> {
        let mut state = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        fd.get_irqchip(&mut state)?;
        Ok(state)
    };
    let pic_master = chip(KVM_IRQCHIP_PIC_MASTER).map_err(CaptureError::NoIrqchip)?;
    Ok(VmState {
        irqchip: IrqchipState {
            pic_master,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)
                .map_err(vm_err("KVM_GET_IRQCHIP (PIC slave)"))?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC).map_err(vm_err("KVM_GET_IRQCHIP (IOAPIC)"))?,
            pit: fd.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?,
        },
        clock: fd.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msrs(entries: &[(u32, u64)]) -> Msrs {
        let e: Vec<kvm_msr_entry> = entries
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        Msrs::from_entries(&e).unwrap()
    }

    fn data(m: &Msrs) -> Vec<(u32, u64)> {
        m.as_slice().iter().map(|e| (e.index, e.data)).collect()
    }

    #[test]
    fn an_expired_tsc_deadline_is_armed_at_the_captured_tsc() {
        let mut m = msrs(&[
            (MSR_IA32_TSC, 5_000),
            (MSR_IA32_TSC_DEADLINE, 0),
            (0x174, 0),
        ]);
        arm_an_expired_deadline(&mut m);
        assert_eq!(
            data(&m),
            [
                (MSR_IA32_TSC, 5_000),
                (MSR_IA32_TSC_DEADLINE, 5_000),
                (0x174, 0)
            ]
        );
        // An armed deadline is the guest's own and stays.
        let mut m = msrs(&[(MSR_IA32_TSC_DEADLINE, 9_000), (MSR_IA32_TSC, 5_000)]);
        arm_an_expired_deadline(&mut m);
        assert_eq!(
            data(&m),
            [(MSR_IA32_TSC_DEADLINE, 9_000), (MSR_IA32_TSC, 5_000)]
        );
        // Without the TSC there is nothing to arm it at.
        let mut m = msrs(&[(MSR_IA32_TSC_DEADLINE, 0)]);
        arm_an_expired_deadline(&mut m);
        assert_eq!(data(&m), [(MSR_IA32_TSC_DEADLINE, 0)]);
    }
}
