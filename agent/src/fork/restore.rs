//! A fork: a new KVM VM on the template's memory (mapped `MAP_PRIVATE`, so pages stay
//! shared until the fork writes them), with the captured state put back in an order KVM
//! accepts, and its own devices. The result is a [`Vm`] ready to [`start`](Vm::start).
//!
//! Two phases. [`prepare`] builds a [`Shell`] (nothing in it depends on the request, so a
//! pool can build shells ahead of time); [`Shell::finish`] restores the state into it.
//! The order, and why:
//! 1. `KVM_CREATE_VM`, TSS address.
//! 2. Memory slot *before* `KVM_CREATE_IRQCHIP`: registering it afterwards costs ~100x
//!    (measured: 7.4 ms instead of 0.06 ms).
//! 3. Irqchip, then the vCPUs (after the irqchip, so each gets an in-kernel LAPIC) with
//!    the template's CPUID, which KVM wants before any other vCPU state. End of the
//!    shell: it holds nothing that changes with time.
//! 4. Irqchip state, then the clock.
//! 5. Devices from their saved state (COM1 with its own irqfd and console; the vsock
//!    device on the fork's own socket, at the template's address and IRQ, followed by a
//!    transport-reset event so the guest drops the template's connections and keeps its
//!    listeners).
//! 6. Each vCPU, in Firecracker's order: MP state, registers, special registers
//!    (which also set the APIC base), FPU/XSAVE, XCRs, debug registers, LAPIC, then MSRs
//!    (after the LAPIC, or KVM ignores the TSC-deadline MSR), and pending events last.
//!
//! A fork has no PIT. A Linux guest needs one only while it boots (to calibrate its TSC);
//! the template booted with one, and from then on each CPU ticks on its TSC-deadline
//! LAPIC timer, which the vCPUs' CPUID offers (`vmm::vcpu::cpuid`; KVM reports ARAT, so
//! no broadcast device is needed). Without it a fork is one kernel thread
//! (`kvm-pit/<pid>`) lighter, its shell waits for one SRCU grace period fewer, and its
//! teardown does not stop that thread. A guest still on the PIT would never wake from a
//! sleep here, so no such template is made (`MachineState::pit_clock_reason`).
//! The rig's `fork-timers` and `fork-pit-clock` scenarios (tests/tests/fork.rs) prove
//! both.
//!
//! Teardown is not here: dropping a VM costs ~19 ms in the kernel (measured without a
//! PIT; debugfs and SRCU waits), so a caller that cares drops forks off its fork path (a
//! reaper thread, or the fork's own process exiting).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_clock_data;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::state::{xsave_of, FpuState, VcpuState, VmState};
use super::Template;
use crate::devices::serial::{ConsoleOut, Serial, SerialError};
use crate::devices::virtio::net::NetBackend;
use crate::devices::virtio::vsock::VsockConfig;
use crate::devices::{LegacyDevices, Persist};
use crate::vmm;
use crate::vmm::memory::{GuestRam, MemoryError, Sharing};
use crate::vmm::vcpu::Vcpu;
use crate::vmm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("forking: {op} failed: {source}")]
    Vm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("forking: {op} on vCPU {index} failed: {source}")]
    Vcpu {
        index: u8,
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(
        "forking: KVM_SET_MSRS on vCPU {index} stopped at MSR {msr:#x} ({written} of \
         {total}); the template was captured on a host whose KVM accepts different MSRs"
    )]
    Msrs {
        index: u8,
        msr: u32,
        written: usize,
        total: usize,
    },
    #[error("forking: mapping the template memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("forking: {0}")]
    Serial(#[from] SerialError),
    #[error("forking: the VM shell was prepared for a different template")]
    OtherTemplate,
    #[error(
        "forking: the template has a vsock device but no socket path was given for the \
         fork's (or one was given for a template without)"
    )]
    VsockMismatch,
    #[error(
        "forking: a network was asked for, but the template has no network device (it was \
         made by an older cleave); recreate it (`cleave template rm NAME`)"
    )]
    NoNic,
    #[error("forking: {0}")]
    Device(#[from] vmm::VmmError),
}

impl From<vmm::KvmCallError> for RestoreError {
    fn from(e: vmm::KvmCallError) -> Self {
        RestoreError::Vm {
            op: e.op,
            source: e.source,
        }
    }
}

fn vm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> RestoreError {
    move |source| RestoreError::Vm { op, source }
}

/// Where the time of one fork went, step by step (in the order they run). The first four
/// are the [`Shell`] ([`prepare`]), the last three [`Shell::finish`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreTimings {
    /// `KVM_CREATE_VM` (+ mapping the run size) and `KVM_SET_TSS_ADDR`.
    pub create_vm: Duration,
    /// `mmap(MAP_PRIVATE)` of the memfd and `KVM_SET_USER_MEMORY_REGION`.
    pub map_memory: Duration,
    /// `KVM_CREATE_IRQCHIP` (PIC, IO-APIC, default IRQ routing).
    pub irqchip: Duration,
    /// `KVM_CREATE_VCPU` (+ mapping `kvm_run`) and `KVM_SET_CPUID2` (the template's CPU).
    pub create_vcpus: Duration,
    /// `KVM_SET_IRQCHIP` x3, `KVM_SET_CLOCK`.
    pub vm_state: Duration,
    /// Devices from their state, with their irqfds.
    pub devices: Duration,
    /// Every vCPU `KVM_SET_*`.
    pub vcpu_state: Duration,
}

impl RestoreTimings {
    pub const STEP_NAMES: [&'static str; 7] = [
        "create_vm",
        "map_memory",
        "irqchip",
        "create_vcpus",
        "vm_state",
        "devices",
        "vcpu_state",
    ];

    /// The steps in order, as [`STEP_NAMES`](Self::STEP_NAMES).
    pub fn steps(&self) -> [Duration; 7] {
        [
            self.create_vm,
            self.map_memory,
            self.irqchip,
            self.create_vcpus,
            self.vm_state,
            self.devices,
            self.vcpu_state,
        ]
    }

    /// Building the shell.
    pub fn shell_build(&self) -> Duration {
        self.steps()[..4].iter().sum()
    }

    /// Restoring state into it.
    pub fn finish(&self) -> Duration {
        self.steps()[4..].iter().sum()
    }

    pub fn total(&self) -> Duration {
        self.steps().iter().sum()
    }
}

/// A restored fork, not yet running.
pub struct Restored {
    pub vm: Vm,
    pub timings: RestoreTimings,
}

/// Times one step into `slot`.
fn timed<T>(slot: &mut Duration, step: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = step();
    *slot = t.elapsed();
    out
}

/// Forks `template` into a new VM whose console writes to `console` (and whose vsock
/// device, if the template has one, listens on `vsock`): [`Shell::build`] then
/// [`Shell::finish`].
pub fn restore(
    kvm: &Kvm,
    template: &Template,
    console: ConsoleOut,
    vsock: Option<&VsockConfig>,
    net: NetBackend,
) -> Result<Restored, RestoreError> {
    Shell::build(kvm, template)?.finish(template, console, vsock, net)
}

/// A VM for one template with nothing of the template's state in it yet: created, its
/// memory mapped and registered, irqchip and vCPUs made (no PIT: see the module docs).
///
/// These are the slow, noisy steps: the memory slot and the irqchip's IRQ routing each
/// wait for a KVM SRCU grace period, which on a busy host can take
/// milliseconds. None of them depends on the fork request, so a pool can make shells ahead
/// of time and a fork only [`finish`](Shell::finish)es one.
pub struct Shell {
    // Drop order: vCPUs, then the VM, then the memory KVM points at.
    vcpus: Vec<Vcpu>,
    fd: VmFd,
    ram: GuestRam,
    timings: RestoreTimings,
}

impl Shell {
    /// Builds a [`Shell`] for `template`.
    pub fn build(kvm: &Kvm, template: &Template) -> Result<Shell, RestoreError> {
        let state = template.state();
        let memory = template.memory();
        let mut tm = RestoreTimings::default();
        let fd = timed(&mut tm.create_vm, || vmm::create_vm_fd(kvm))?;
        let ram = timed(&mut tm.map_memory, || -> Result<GuestRam, RestoreError> {
            let ram = GuestRam::map(memory.file().clone(), memory.size(), Sharing::Private)?;
            ram.register(&fd)?;
            Ok(ram)
        })?;
        timed(&mut tm.irqchip, || vmm::create_irqchip(&fd))?;
        let vcpus = timed(&mut tm.create_vcpus, || {
            state
                .vcpus
                .iter()
                .map(|v| {
                    let err = |op| {
                        move |source| RestoreError::Vcpu {
                            index: v.index,
                            op,
                            source,
                        }
                    };
                    let vcpu_fd = fd
                        .create_vcpu(u64::from(v.index))
                        .map_err(err("KVM_CREATE_VCPU"))?;
                    vcpu_fd
                        .set_cpuid2(&v.cpuid)
                        .map_err(err("KVM_SET_CPUID2"))?;
                    Ok::<_, RestoreError>(Vcpu::from_fd(v.index, vcpu_fd))
                })
                .collect::<Result<Vec<_>, _>>()
        })?;
        Ok(Shell {
            vcpus,
            fd,
            ram,
            timings: tm,
        })
    }

    /// Puts `template`'s state into the shell and gives it its own devices: the fork, ready
    /// to [`start`](Vm::start). Its NIC (if the template has one) is on `net`.
    pub fn finish(
        self,
        template: &Template,
        console: ConsoleOut,
        vsock: Option<&VsockConfig>,
        net: NetBackend,
    ) -> Result<Restored, RestoreError> {
        let Shell {
            vcpus,
            fd,
            ram,
            timings: mut tm,
        } = self;
        if !Arc::ptr_eq(ram.file(), template.memory().file()) {
            return Err(RestoreError::OtherTemplate);
        }
        let state = template.state();
        let vsock = match (&state.devices.vsock, vsock) {
            (Some(saved), Some(config)) => Some((saved, config)),
            (None, None) => None,
            _ => return Err(RestoreError::VsockMismatch),
        };
        if state.devices.net.is_none() && matches!(net, NetBackend::Tap(_)) {
            return Err(RestoreError::NoNic);
        }
        timed(&mut tm.vm_state, || restore_vm(&fd, &state.vm))?;
        let serial = timed(&mut tm.devices, || {
            Serial::restore((console, Some(&fd)), &state.devices.serial)
        })?;
        timed(&mut tm.vcpu_state, || -> Result<(), RestoreError> {
            for (vcpu, saved) in vcpus.iter().zip(&state.vcpus) {
                restore_vcpu(vcpu.fd(), saved)?;
            }
            Ok(())
        })?;
        let cpuid = state.vcpus[0].cpuid.clone();
        let mut vm = Vm::from_parts(
            fd,
            ram,
            vcpus,
            LegacyDevices::new(serial),
            cpuid,
            state.machine,
        );
        if let Some((saved, config)) = vsock {
            let t = Instant::now();
            vm.restore_vsock(config, saved)?;
            if let Some(dev) = vm.vsock() {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .send_transport_reset();
            }
            tm.devices += t.elapsed();
        }
        if let Some(saved) = &state.devices.net {
            let t = Instant::now();
            vm.restore_net(net, saved)?;
            tm.devices += t.elapsed();
        }
        if let Some(saved) = &state.devices.rng {
            let t = Instant::now();
            vm.restore_rng(saved)?;
            tm.devices += t.elapsed();
        }
        Ok(Restored { vm, timings: tm })
    }

    pub fn timings(&self) -> &RestoreTimings {
        &self.timings
    }
}

fn restore_vm(fd: &VmFd, saved: &VmState) -> Result<(), RestoreError> {
    let chip = &saved.irqchip;
    fd.set_irqchip(&chip.pic_master)
        .map_err(vm_err("KVM_SET_IRQCHIP (PIC master)"))?;
    fd.set_irqchip(&chip.pic_slave)
        .map_err(vm_err("KVM_SET_IRQCHIP (PIC slave)"))?;
    fd.set_irqchip(&chip.ioapic)
        .map_err(vm_err("KVM_SET_IRQCHIP (IOAPIC)"))?;
    // Only the clock value: the flags KVM reported (e.g. whether the TSC is stable) are
    // facts about the host, not settings.
    fd.set_clock(&kvm_clock_data {
        clock: saved.clock.clock,
        ..Default::default()
    })
    .map_err(vm_err("KVM_SET_CLOCK"))
}

fn restore_vcpu(fd: &VcpuFd, saved: &VcpuState) -> Result<(), RestoreError> {
    let index = saved.index;
    let err = |op| move |source| RestoreError::Vcpu { index, op, source };
    fd.set_mp_state(saved.mp_state)
        .map_err(err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&saved.regs).map_err(err("KVM_SET_REGS"))?;
    fd.set_sregs(&saved.sregs).map_err(err("KVM_SET_SREGS"))?;
    match &saved.fpu {
        FpuState::Xsave(region) => {
            // SAFETY: KVM reads past the 4096-byte `kvm_xsave` only for XSTATE features a
            // process enabled dynamically (arch_prctl ARCH_REQ_XCOMP_GUEST_PERM, e.g. AMX);
            // cleave never does, and the area came whole from KVM_GET_XSAVE.
            unsafe { fd.set_xsave(&xsave_of(region)) }.map_err(err("KVM_SET_XSAVE"))?
        }
        FpuState::Legacy(fpu) => fd.set_fpu(fpu).map_err(err("KVM_SET_FPU"))?,
    }
    if let Some(xcrs) = &saved.xcrs {
        fd.set_xcrs(xcrs).map_err(err("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&saved.debugregs)
        .map_err(err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&saved.lapic).map_err(err("KVM_SET_LAPIC"))?;
    let total = saved.msrs.as_slice().len();
    let written = fd.set_msrs(&saved.msrs).map_err(err("KVM_SET_MSRS"))?;
    if written != total {
        return Err(RestoreError::Msrs {
            index,
            msr: saved.msrs.as_slice()[written].index,
            written,
            total,
        });
    }
    fd.set_vcpu_events(&saved.events)
        .map_err(err("KVM_SET_VCPU_EVENTS"))
}
