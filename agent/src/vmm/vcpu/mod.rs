//! One virtual CPU: created on a VM, configured for boot (CPUID, MSRs, registers, FPU,
//! LAPIC, each in its own file), and run on its own thread until the guest ends or the
//! host stops it.

pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod msrs;
pub mod regs;

use std::sync::{Arc, Mutex};

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use super::boot::BootEntry;
use super::control::RunControl;
use super::mmio::MmioBus;
use crate::devices::{GuestEnd, LegacyDevices};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("{op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU setup: {0}")]
    Setup(String),
    #[error("writing vCPU boot data to guest memory: {0}")]
    GuestMemory(String),
}

impl VcpuError {
    /// Maps a KVM error to one that names the ioctl.
    pub fn kvm(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
        move |source| VcpuError::Kvm { op, source }
    }
}

pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    pub fn create(vm: &VmFd, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(VcpuError::kvm("KVM_CREATE_VCPU"))?;
        Ok(Self { index, fd })
    }

    /// Wraps a vCPU fd created elsewhere (a fork restores its state before wrapping).
    pub fn from_fd(index: u8, fd: VcpuFd) -> Self {
        Self { index, fd }
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// CPUID and MSRs: the part every vCPU needs, whatever it runs.
    pub fn configure_cpu(&self, supported: &CpuId, count: u8) -> Result<(), VcpuError> {
        let cpuid = cpuid::for_vcpu(supported, self.index, count);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(VcpuError::kvm("KVM_SET_CPUID2"))?;
        msrs::setup(&self.fd)
    }

    /// Everything for a Linux PVH boot. Only the boot vCPU gets the entry registers; the
    /// others wait for the guest's INIT/SIPI in the in-kernel LAPIC.
    pub fn configure_linux(
        &self,
        supported: &CpuId,
        count: u8,
        mem: &GuestMemoryMmap,
        boot: &BootEntry,
    ) -> Result<(), VcpuError> {
        self.configure_cpu(supported, count)?;
        regs::setup_fpu(&self.fd)?;
        lapic::setup(&self.fd)?;
        if self.index == 0 {
            regs::setup_pvh(&self.fd, mem, boot.entry, boot.start_info)?;
        }
        Ok(())
    }

    /// Runs until the guest ends, this vCPU fails, or `control` says stop.
    pub fn run(
        mut self,
        devices: Arc<Mutex<LegacyDevices>>,
        mmio: Arc<MmioBus>,
        control: Arc<RunControl>,
    ) -> Self {
        let span = tracing::debug_span!("vcpu", index = self.index);
        let _enter = span.enter();
        while !control.is_stopping() {
            let end = match self.fd.run() {
                Ok(exit) => handle_exit(self.index, exit, &devices, &mmio, &control),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(GuestEnd::Failed(format!(
                    "KVM_RUN on vCPU {} failed: {e}",
                    self.index
                ))),
            };
            if let Some(end) = end {
                control.end(end);
            }
        }
        self
    }
}

/// What one exit means: device work, or the end of the guest.
fn handle_exit(
    index: u8,
    exit: VcpuExit<'_>,
    devices: &Mutex<LegacyDevices>,
    mmio: &MmioBus,
    control: &RunControl,
) -> Option<GuestEnd> {
    let lock = || devices.lock().unwrap_or_else(|e| e.into_inner());
    match exit {
        VcpuExit::IoIn(port, data) => {
            control.stats.count_io_in();
            lock().pio_read(port, data);
            None
        }
        VcpuExit::IoOut(port, data) => {
            control.stats.count_io_out();
            lock().pio_write(port, data)
        }
        VcpuExit::MmioRead(addr, data) => {
            control.stats.count_mmio_read();
            if !mmio.read(addr, data) {
                tracing::trace!(addr, len = data.len(), "unclaimed MMIO read");
                data.fill(0xff);
            }
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            control.stats.count_mmio_write();
            if !mmio.write(addr, data) {
                tracing::trace!(addr, len = data.len(), "unclaimed MMIO write");
            }
            None
        }
        VcpuExit::Hlt => Some(GuestEnd::Halted),
        VcpuExit::Shutdown => Some(GuestEnd::TripleFault),
        VcpuExit::SystemEvent(kind, _) => Some(match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => GuestEnd::Reset,
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => GuestEnd::Exited { status: 0 },
            other => GuestEnd::Failed(format!("unexpected KVM system event {other}")),
        }),
        VcpuExit::FailEntry(reason, cpu) => Some(GuestEnd::Failed(format!(
            "KVM could not enter the guest on vCPU {cpu} (hardware reason {reason:#x})"
        ))),
        VcpuExit::InternalError => Some(GuestEnd::Failed(format!(
            "KVM internal error on vCPU {}",
            index
        ))),
        VcpuExit::Intr => None,
        other => Some(GuestEnd::Failed(format!(
            "unhandled vCPU exit on vCPU {}: {other:?}",
            index
        ))),
    }
}
