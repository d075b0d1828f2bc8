//! The 16550 UART on COM1 (port 0x3f8, IRQ 4): the guest's console.
//!
//! `vm-superio` models the registers; this wraps it with the interrupt line (an eventfd
//! the in-kernel irqchip listens on) and the console sink.

pub mod console;

use std::io::Write;

use kvm_ioctls::VmFd;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// The UART decodes 8 ports.
pub const PORT_COUNT: u16 = 8;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("creating the serial interrupt eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("wiring the serial interrupt to IRQ {COM1_IRQ}: {0}")]
    Irqfd(kvm_ioctls::Error),
    #[error("restoring the serial device from its saved state: {0}")]
    State(String),
}

/// The UART's interrupt line: an eventfd registered as an irqfd.
pub struct IrqLine(EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type ConsoleOut = Box<dyn Write + Send>;

pub struct Serial {
    uart: Uart<IrqLine, NoEvents, ConsoleOut>,
}

impl Serial {
    /// A UART writing to `out`; with `vm`, its interrupt is wired to the in-kernel irqchip.
    pub fn new(out: ConsoleOut, vm: Option<&VmFd>) -> Result<Self, SerialError> {
        Self::from_state(&SerialState::default(), out, vm)
    }

    /// A UART continuing from `state` (a fork of a template), wired like [`new`](Self::new).
    pub fn from_state(
        state: &SerialState,
        out: ConsoleOut,
        vm: Option<&VmFd>,
    ) -> Result<Self, SerialError> {
        // Close-on-exec: a worker process started later must not inherit this VM's IRQ line.
        let evt = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(SerialError::EventFd)?;
        if let Some(vm) = vm {
            vm.register_irqfd(&evt, COM1_IRQ)
                .map_err(SerialError::Irqfd)?;
        }
        let uart = Uart::from_state(state, IrqLine(evt), NoEvents, out)
            .map_err(|e| SerialError::State(format!("{e:?}")))?;
        Ok(Self { uart })
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        // A console write that fails (closed stdout) must not stop the guest.
        if let Err(e) = self.uart.write(offset, value) {
            tracing::debug!(error = ?e, "serial write failed");
        }
    }

    /// The register state, for snapshots.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }
}

impl crate::devices::Persist for Serial {
    type State = SerialState;
    type Args<'a> = (ConsoleOut, Option<&'a VmFd>);
    type Error = SerialError;

    fn state(&self) -> SerialState {
        Serial::state(self)
    }

    /// The UART as `state` left it, writing to `out`, its interrupt on `vm`'s IRQ 4.
    fn restore(
        (out, vm): (ConsoleOut, Option<&VmFd>),
        state: &SerialState,
    ) -> Result<Self, SerialError> {
        Serial::from_state(state, out, vm)
    }
}
