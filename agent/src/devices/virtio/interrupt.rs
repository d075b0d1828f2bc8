//! A virtio-mmio device's interrupt: the InterruptStatus register the driver reads and
//! acknowledges, and the irqfd that raises the device's IO-APIC pin in the in-kernel
//! irqchip without a trip through this process.

use std::sync::atomic::{AtomicU32, Ordering};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// InterruptStatus bit: a queue has new used buffers.
pub const INT_USED_RING: u32 = 1;
/// InterruptStatus bit: the configuration (or device status) changed.
pub const INT_CONFIG: u32 = 2;

#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// A line whose eventfd is wired to `gsi` on `vm` (none: unwired, for unit tests).
    pub fn new(vm: Option<&VmFd>, gsi: u32) -> std::io::Result<Self> {
        // Close-on-exec: a forked worker must not inherit another VM's interrupt line.
        let irqfd = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        if let Some(vm) = vm {
            vm.register_irqfd(&irqfd, gsi)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        }
        Ok(Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        })
    }

    /// Marks `bits` pending and raises the line.
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::error!(error = %e, "raising a virtio interrupt");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits` (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Puts back a saved status (a restored device) without raising the line.
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The eventfd behind the line (tests read it to see that an interrupt was raised).
    pub fn eventfd(&self) -> &EventFd {
        &self.irqfd
    }
}
