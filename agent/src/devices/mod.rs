//! Devices the guest can reach. Each device keeps its state in one plain struct, saved and
//! put back as a unit through [`Persist`].

pub mod debug_exit;
pub mod i8042;
pub mod legacy;
pub mod serial;
pub mod virtio;

pub use legacy::LegacyDevices;

/// A device (or transport) whose whole saved state is one plain value: [`state`] takes
/// it, [`restore`] builds the device again from it plus what is not state — the new VM's
/// interrupt lines, sockets, tap, memory (`Args`). `fork::capture` and `fork::restore`
/// only orchestrate these calls.
///
/// [`state`]: Persist::state
/// [`restore`]: Persist::restore
pub trait Persist: Sized {
    type State;
    type Args<'a>;
    type Error;
    fn state(&self) -> Self::State;
    fn restore(args: Self::Args<'_>, state: &Self::State) -> Result<Self, Self::Error>;
}

/// How a guest ended, as seen by the devices and vCPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest wrote its exit status to the debug-exit port.
    Exited { status: u8 },
    /// The guest reset the machine (reboot, or a kernel panic with `panic=-1`).
    Reset,
    /// A triple fault: the guest kernel crashed beyond recovery.
    TripleFault,
    /// A vCPU halted with no way to wake (only without an in-kernel irqchip).
    Halted,
    /// The host stopped the VM.
    Stopped,
    /// The VMM could not keep running the guest.
    Failed(String),
}

impl GuestEnd {
    /// The exit code a CLI should return for this end.
    pub fn exit_code(&self) -> i32 {
        match self {
            GuestEnd::Exited { status } => i32::from(*status),
            GuestEnd::Reset | GuestEnd::Halted | GuestEnd::Stopped => 0,
            GuestEnd::TripleFault | GuestEnd::Failed(_) => 1,
        }
    }

    /// Whether the guest's side ended it (anything but a host's stop): nothing in the
    /// guest will answer again.
    pub fn by_guest(&self) -> bool {
        !matches!(self, GuestEnd::Stopped)
    }

    /// Whether this is an orderly end (the guest asked for it, or the host did).
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            GuestEnd::Exited { status: 0 } | GuestEnd::Reset | GuestEnd::Stopped
        )
    }
}

impl std::fmt::Display for GuestEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestEnd::Exited { status } => write!(f, "guest exited with status {status}"),
            GuestEnd::Reset => write!(f, "guest reset the machine"),
            GuestEnd::TripleFault => write!(f, "guest triple-faulted (kernel crash)"),
            GuestEnd::Halted => write!(f, "guest halted"),
            GuestEnd::Stopped => write!(f, "stopped by the host"),
            GuestEnd::Failed(why) => write!(f, "VMM failure: {why}"),
        }
    }
}
