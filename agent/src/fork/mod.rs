//! Forking: a booted VM frozen into a [`Template`] ([`capture`]) and cloned copy-on-write
//! into new VMs ([`restore`]).
//!
//! A template is plain data ([`state`]: every vCPU, the irqchip, PIT, clock and each
//! device) plus its guest memory, a memfd sealed so it can never change again
//! ([`sealed`]). A fork maps that memfd `MAP_PRIVATE`: it shares every page with the
//! template and its siblings until it writes one, and its writes stay its own.
//!
//! Each fork can run in its own process ([`worker`]): the parent passes the template's
//! state and memfd to a `cleave-fork-worker`, which restores and runs the fork.

pub mod capture;
pub mod freeze;
pub mod gate;
pub mod jail;
pub mod process;
pub mod restore;
pub mod sandbox;
pub mod sealed;
pub mod state;
pub mod store;
pub mod template_worker;
pub mod worker;
pub mod zygote;

pub use capture::{capture, CaptureError};
pub use restore::{restore, RestoreError, RestoreTimings, Restored, Shell};
pub use sealed::{SealError, SealedMemory};
pub use state::MachineState;

/// A frozen machine: its state and its sealed memory. It never runs; forks are made from it.
#[derive(Debug, Clone)]
pub struct Template {
    memory: SealedMemory,
    state: MachineState,
}

impl Template {
    /// A template from its parts (a worker process that received them).
    pub fn new(memory: SealedMemory, state: MachineState) -> Self {
        Self { memory, state }
    }

    pub fn memory(&self) -> &SealedMemory {
        &self.memory
    }

    pub fn state(&self) -> &MachineState {
        &self.state
    }
}
