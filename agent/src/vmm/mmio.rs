//! The MMIO bus: which virtio-mmio window a guest physical address falls in.
//!
//! Windows are 4 KiB each, packed from the start of the MMIO gap; fixed once the VM starts,
//! so vCPUs look them up without a lock on the bus itself.

use crate::sync::lock;
use std::sync::{Arc, Mutex};

use crate::devices::virtio::mmio::{MmioTransport, WINDOW_SIZE};

use super::layout;

/// The first IRQ (IO-APIC pin) for virtio devices: 4 is COM1, and 5..=23 are free.
pub const FIRST_VIRTIO_IRQ: u32 = 5;
const LAST_IRQ: u32 = 23;

#[derive(Default)]
pub struct MmioBus {
    slots: Vec<Arc<Mutex<MmioTransport>>>,
}

/// Where a device was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub irq: u32,
}

impl MmioBus {
    /// The window and IRQ the next device gets; `None` when the IRQs are used up.
    pub fn next_slot(&self) -> Option<MmioSlot> {
        let n = self.slots.len() as u32;
        let irq = FIRST_VIRTIO_IRQ + n;
        (irq <= LAST_IRQ).then_some(MmioSlot {
            base: layout::MMIO_GAP_START + u64::from(n) * WINDOW_SIZE,
            irq,
        })
    }

    /// Places `transport` at the slot [`next_slot`](Self::next_slot) returned.
    pub fn push(&mut self, transport: Arc<Mutex<MmioTransport>>) {
        self.slots.push(transport);
    }

    fn find(&self, addr: u64) -> Option<(&Mutex<MmioTransport>, u64)> {
        let offset = addr.checked_sub(layout::MMIO_GAP_START)?;
        let slot = self
            .slots
            .get(usize::try_from(offset / WINDOW_SIZE).ok()?)?;
        Some((slot, offset % WINDOW_SIZE))
    }

    /// A guest read; `false` when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((t, offset)) => {
                lock(t).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// A guest write; `false` when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((t, offset)) => {
                lock(t).write(offset, data);
                true
            }
            None => false,
        }
    }
}
