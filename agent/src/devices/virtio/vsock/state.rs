//! The vsock device's state as one plain value.
//!
//! Connections are not part of it: they are host streams of one VM. A restored device
//! starts with none and sends the guest a transport reset, which makes the guest drop its
//! connections too (what the virtio spec prescribes after migration).

use serde::{Deserialize, Serialize};

use crate::devices::virtio::mmio::MmioState;
use crate::devices::virtio::queue_state::QueueSnapshot;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    pub acked_features: u64,
    /// `None` before the driver started the device.
    pub queues: Option<Vec<QueueSnapshot>>,
}

/// A vsock device with its transport and where the guest found it: all a fork needs to
/// put the same device back at the same address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedVsock {
    /// The MMIO window's guest physical address.
    pub base: u64,
    /// Its IO-APIC pin.
    pub irq: u32,
    pub transport: MmioState,
    pub device: VsockState,
}
