//! The network device's state as one plain value. The tap is not part of it: a restored
//! device gets the backend of the VM it is restored into (a fork's own tap).

use serde::{Deserialize, Serialize};

use crate::devices::virtio::mmio::MmioState;
use crate::devices::virtio::queue_state::QueueSnapshot;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub acked_features: u64,
    /// `None` before the driver started the device.
    pub queues: Option<Vec<QueueSnapshot>>,
}

/// A network device with its transport and where the guest found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNet {
    /// The MMIO window's guest physical address.
    pub base: u64,
    /// Its IO-APIC pin.
    pub irq: u32,
    pub transport: MmioState,
    pub device: NetState,
}
