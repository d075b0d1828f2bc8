//! Virtio devices over the virtio-mmio transport.
//!
//! - [`mmio`]: the transport: the register file a driver programs, one 4 KiB window per
//!   device in the MMIO gap, announced on the kernel command line.
//! - [`interrupt`]: a device's interrupt line (an irqfd) and its interrupt status.
//! - [`queue_state`]: a queue's state as plain, serializable data.
//! - [`vsock`]: virtio-vsock with Firecracker's hybrid Unix-socket host side.
//! - [`net`]: virtio-net backed by a tap.
//! - [`rng`]: virtio-rng, the guest's entropy from the host's, rate-limited.
//!
//! A device is driven from two sides: the vCPU threads touch the transport (register
//! reads and writes), and the VM's event loop does the device work (queue kicks arrive
//! on ioeventfds, interrupts leave on irqfds). Only activation and reset cross over.

pub mod interrupt;
pub mod log_limit;
pub mod mmio;
pub mod net;
pub mod queue_state;
pub mod rng;
pub mod timer;
pub mod vsock;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use interrupt::Interrupt;

/// Feature bit every modern (non-legacy) device offers and a driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device type ids (virtio spec 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Why a device could not start with what the driver configured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    #[error("queue {0} is not ready or its rings lie outside guest memory")]
    BadQueue(usize),
    #[error("the device is already active")]
    AlreadyActive,
}

/// Reads `data.len()` bytes of a read-only configuration space `config` at `offset`;
/// bytes outside it read as zero (no overflow at the end of the address space).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| config.get(usize::try_from(o).ok()?).copied())
            .unwrap_or(0);
    }
}

/// Checks the queues a driver hands a device at activation: `count` of them, each valid
/// in `mem`.
/// Whether the guest's avail index is at most one queue ahead of where the device is. A
/// driver that claims more lies: `virtio-queue` refuses (and logs) every pop for ever, and a
/// device that re-arms itself while "buffers are left" spins. Devices stop instead.
pub fn avail_index_sane(q: &virtio_queue::Queue, mem: &GuestMemoryMmap) -> bool {
    use virtio_queue::QueueT;
    match q.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(idx) => idx.0.wrapping_sub(q.next_avail()) <= q.size(),
        Err(_) => false,
    }
}

pub fn check_queues(
    queues: &[virtio_queue::Queue],
    count: usize,
    mem: &GuestMemoryMmap,
) -> Result<(), ActivateError> {
    use virtio_queue::QueueT;
    if queues.len() != count {
        return Err(ActivateError::BadQueue(queues.len()));
    }
    match queues.iter().position(|q| !q.is_valid(mem)) {
        Some(i) => Err(ActivateError::BadQueue(i)),
        None => Ok(()),
    }
}

/// What the transport needs from a device.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// The largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// One eventfd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    fn interrupt(&self) -> &std::sync::Arc<Interrupt>;
    /// Reads device configuration space; bytes outside it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; the guest may not change read-only fields.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's features and queues (already validated).
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<virtio_queue::Queue>,
    ) -> Result<(), ActivateError>;
    /// Stops the device and drops everything it was doing (the driver wrote status 0).
    fn reset(&mut self);
    /// The live queues of a started device (their indices move on as it works); `None`
    /// before activation. The transport saves these, so queue state has one owner.
    fn active_queues(&self) -> Option<Vec<queue_state::QueueSnapshot>>;
}
