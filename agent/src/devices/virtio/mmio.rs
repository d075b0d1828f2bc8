//! The virtio-mmio transport, version 2 (virtio spec 4.2.2): the register window a driver
//! uses to negotiate features, place the queues and start a device.
//!
//! Every register access comes from the guest, so each one is checked: unknown offsets and
//! odd widths read as zero and are ignored on write, queue setup is accepted only in the
//! states the spec allows, and a device starts only when its queues are valid.

use crate::sync::lock;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::interrupt::INT_CONFIG;
use super::log_limit::LogLimit;
use super::queue_state::QueueSnapshot;
use super::{VirtioDevice, VIRTIO_F_VERSION_1};

/// Each device gets one 4 KiB window.
pub const WINDOW_SIZE: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4c56_4c43; // "CLVL"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Also where the ioeventfds listen.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (virtio spec 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// A virtio device saved with its transport and where the guest found it: all a fork needs
/// to put the same device back at the same address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedVirtio<S> {
    /// The MMIO window's guest physical address.
    pub base: u64,
    /// Its IO-APIC pin.
    pub irq: u32,
    pub transport: MmioState,
    pub device: S,
}

/// Everything the transport holds, as one plain value (for snapshots). Its queues are the
/// one saved copy of queue state: a started device's live queues, else the driver's
/// settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    /// The queues as the driver configured them (before activation they live here).
    pub queues: Vec<QueueSnapshot>,
}

/// One virtio device behind its register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    config_generation: u32,
    log: LogLimit,
}

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("registering the queue-notify ioeventfd at {addr:#x} for queue {queue}: {source}")]
    Ioevent {
        addr: u64,
        queue: u32,
        source: kvm_ioctls::Error,
    },
    #[error("queue {index} has an invalid maximum size {size}")]
    QueueSize { index: usize, size: u16 },
    #[error("restoring the virtio-mmio transport: {0}")]
    Restore(String),
}

impl MmioTransport {
    /// A transport for `device`, whose rings will live in `mem`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
    ) -> Result<Self, MmioError> {
        let sizes = lock(&device).queue_max_sizes().to_vec();
        let queues = sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|_| MmioError::QueueSize { index, size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            queues,
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
            log: LogLimit::new(),
        })
    }

    /// Wires each queue's notify eventfd to a write of its index at `base + QueueNotify`,
    /// so a kick never leaves the kernel.
    pub fn register_ioevents(&self, vm: &VmFd, base: u64) -> Result<(), MmioError> {
        let dev = lock(&self.device);
        let addr = base + REG_QUEUE_NOTIFY;
        for (i, evt) in dev.queue_events().iter().enumerate() {
            let queue = i as u32;
            vm.register_ioevent(evt, &IoEventAddress::Mmio(addr), queue)
                .map_err(|source| MmioError::Ioevent {
                    addr,
                    queue,
                    source,
                })?;
        }
        Ok(())
    }

    /// The kernel command-line argument that announces a device at `base` on `irq`.
    pub fn cmdline_arg(base: u64, irq: u32) -> String {
        format!("virtio_mmio.device=4K@{base:#x}:{irq}")
    }

    pub fn state(&self) -> MmioState {
        let dev = lock(&self.device);
        MmioState {
            device_status: self.device_status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: dev.interrupt().status(),
            queues: dev
                .active_queues()
                .unwrap_or_else(|| self.queues.iter().map(QueueSnapshot::of).collect()),
        }
    }

    /// Whether the driver had started the device (and it had not failed).
    fn was_started(state: &MmioState) -> bool {
        state.device_status & status::DRIVER_OK != 0
            && state.device_status & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0
    }
}

impl crate::devices::Persist for MmioTransport {
    type State = MmioState;
    type Args<'a> = (Arc<Mutex<dyn VirtioDevice>>, GuestMemoryMmap);
    type Error = MmioError;

    fn state(&self) -> MmioState {
        MmioTransport::state(self)
    }

    /// A transport for a freshly made `device` as `state` left it (a fork of a template):
    /// the driver's settings and queue registers back, and — when the driver had started
    /// the device — the device started again on the saved queues, with no new DRIVER_OK.
    fn restore(
        (device, mem): (Arc<Mutex<dyn VirtioDevice>>, GuestMemoryMmap),
        state: &MmioState,
    ) -> Result<Self, MmioError> {
        let mut t = MmioTransport::new(device, mem)?;
        if state.queues.len() != t.queues.len() {
            return Err(MmioError::Restore(format!(
                "{} saved queues for a device with {}",
                state.queues.len(),
                t.queues.len()
            )));
        }
        for (i, (q, saved)) in t.queues.iter_mut().zip(&state.queues).enumerate() {
            if saved.max_size != q.max_size() {
                return Err(MmioError::Restore(format!(
                    "queue {i}: saved maximum size {} but the device offers {}",
                    saved.max_size,
                    q.max_size()
                )));
            }
            *q = saved
                .to_queue()
                .map_err(|e| MmioError::Restore(format!("queue {i}: {e:?}")))?;
        }
        t.device_status = state.device_status;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.acked_features = state.acked_features;
        t.queue_sel = state.queue_sel;
        t.config_generation = state.config_generation;
        let mut dev = lock(&t.device);
        if MmioTransport::was_started(state) {
            let queues = state
                .queues
                .iter()
                .map(QueueSnapshot::to_queue)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| MmioError::Restore(format!("queues: {e:?}")))?;
            dev.activate(t.mem.clone(), state.acked_features, queues)
                .map_err(|e| MmioError::Restore(format!("starting the device again: {e}")))?;
        }
        dev.interrupt().set_status(state.interrupt_status);
        drop(dev);
        Ok(t)
    }
}

impl MmioTransport {
    pub fn device_status(&self) -> u32 {
        self.device_status
    }

    fn has(&self, bits: u32) -> bool {
        self.device_status & bits == bits
    }

    /// Queue registers may change only while features are settled and the device has
    /// not started.
    fn queue_writable(&self) -> bool {
        self.has(status::FEATURES_OK) && !self.has(status::DRIVER_OK) && !self.has(status::FAILED)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A read of `data.len()` bytes at `offset` into the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 {
            self.log.warn(format_args!(
                "virtio-mmio: {}-byte register read at {offset:#x} ignored",
                data.len()
            ));
            data.fill(0);
            return;
        }
        let v = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => lock(&self.device).device_type(),
            REG_VENDOR_ID => VENDOR,
            REG_DEVICE_FEATURES => {
                let f = lock(&self.device).avail_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => lock(&self.device).interrupt().status(),
            REG_STATUS => self.device_status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A write of `data` at `offset` into the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.has(status::DRIVER) && !self.has(status::FAILED) {
                lock(&self.device).write_config(offset - CONFIG_SPACE, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.log.warn(format_args!(
                "virtio-mmio: {}-byte register write at {offset:#x} ignored",
                data.len()
            ));
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => self.write_driver_features(v),
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NOTIFY => self.notify_without_ioeventfd(v),
            REG_INTERRUPT_ACK => lock(&self.device).interrupt().ack(v),
            REG_STATUS => self.write_status(v),
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue(offset, v),
            _ => {
                self.log.warn(format_args!(
                    "virtio-mmio: write of {v:#x} to read-only or unknown register {offset:#x} ignored"
                ));
            }
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if !self.has(status::DRIVER) || self.has(status::FEATURES_OK) {
            self.log.warn(format_args!(
                "virtio-mmio: driver features written in status {:#x}; ignored",
                self.device_status
            ));
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        self.acked_features &= !(0xffff_ffffu64 << shift);
        self.acked_features |= u64::from(v) << shift;
    }

    fn write_queue(&mut self, offset: u64, v: u32) {
        if !self.queue_writable() {
            self.log.warn(format_args!(
                "virtio-mmio: queue register {offset:#x} written in status {:#x}; ignored",
                self.device_status
            ));
            return;
        }
        let Some(q) = self.selected_queue() else {
            return;
        };
        match offset {
            REG_QUEUE_NUM => q.set_size(v.min(u32::from(u16::MAX)) as u16),
            REG_QUEUE_READY => q.set_ready(v == 1),
            REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
            REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
            REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
            REG_QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }

    /// A notify the ioeventfd did not catch (an index with no queue, or no ioeventfd in
    /// tests): pass valid ones on, ignore the rest.
    fn notify_without_ioeventfd(&mut self, v: u32) {
        let dev = lock(&self.device);
        match dev.queue_events().get(v as usize) {
            Some(evt) => {
                let _ = evt.write(1);
            }
            None => {
                drop(dev);
                self.log.warn(format_args!(
                    "virtio-mmio: notify for queue {v}, which does not exist; ignored"
                ));
            }
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (spec 3.1.1); anything else is a confused or hostile
        // driver, and the device stays where it is.
        if v & self.device_status != self.device_status {
            self.log.warn(format_args!(
                "virtio-mmio: status {v:#x} clears bits of {:#x}; ignored",
                self.device_status
            ));
            return;
        }
        let added = v & !self.device_status;
        if added & status::FEATURES_OK != 0 && !self.features_acceptable() {
            // Leaving FEATURES_OK unset tells the driver we refuse its features.
            self.device_status = v & !status::FEATURES_OK;
            return;
        }
        self.device_status = v;
        if added & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = lock(&self.device).avail_features();
        self.acked_features & !offered == 0 && self.acked_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        if !self.has(status::FEATURES_OK) {
            self.fail("DRIVER_OK without FEATURES_OK");
            return;
        }
        if let Some(i) = self
            .queues
            .iter()
            .position(|q| !q.ready() || !q.is_valid(&self.mem))
        {
            self.fail(&format!("queue {i} is not ready or invalid at DRIVER_OK"));
            return;
        }
        // The device gets its own copies; ours keep the driver's settings for `state`.
        let Ok(queues) = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect::<Result<Vec<_>, _>>()
        else {
            self.fail("queue settings out of range at DRIVER_OK");
            return;
        };
        let mut dev = lock(&self.device);
        let result = dev.activate(self.mem.clone(), self.acked_features, queues);
        drop(dev);
        if let Err(e) = result {
            self.fail(&e.to_string());
        }
    }

    /// Tells the driver the device cannot go on (it may reset and try again).
    fn fail(&mut self, why: &str) {
        self.log
            .warn(format_args!("virtio-mmio: device needs reset: {why}"));
        self.device_status |= status::DEVICE_NEEDS_RESET;
        lock(&self.device).interrupt().raise(INT_CONFIG);
    }

    fn reset(&mut self) {
        let mut dev = lock(&self.device);
        dev.reset();
        dev.interrupt().clear();
        drop(dev);
        for q in &mut self.queues {
            q.reset();
        }
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
    }
}
