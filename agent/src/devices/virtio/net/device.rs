//! The network device: moves frames between its queues and its tap.
//!
//! Queue 0 (RX) holds guest buffers we fill with frames from the tap, queue 1 (TX) frames
//! from the guest. Work per wake-up is bounded ([`BUDGET`] frames each way) so one busy
//! guest cannot hold the event loop, and a guest that corrupts its rings (an avail index
//! more than a queue ahead) gets a device that stops, not one that spins.

use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::frame::{self, MAX_FRAME};
use super::state::NetState;
use super::{NetBackend, Tap};
use crate::devices::virtio::interrupt::INT_USED_RING;
use crate::devices::virtio::log_limit::LogLimit;
use crate::devices::virtio::queue_state::QueueSnapshot;
use crate::devices::virtio::{
    check_queues, read_config_bytes, ActivateError, Interrupt, VirtioDevice, TYPE_NET,
    VIRTIO_F_VERSION_1,
};

pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
/// Frames moved per wake-up and direction before others get a turn.
pub const BUDGET: usize = 256;
/// The device has a MAC in its configuration space (virtio spec 5.1.3).
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;

/// The device's counters (metrics; the tests read them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounts {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// TX chains dropped as malformed (direction, length, memory, offload flags).
    pub tx_malformed: u64,
    /// Well-formed TX frames that went nowhere (no backend, or the tap refused them).
    pub tx_unsent: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames from the tap dropped because the guest's buffer was unusable or too small.
    pub rx_dropped: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("creating the network device's eventfds: {0}")]
    Fd(std::io::Error),
}

pub struct Net {
    mac: [u8; 6],
    queue_evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    active: Option<Active>,
    acked_features: u64,
    pub(super) tap: Option<Tap>,
    /// A frame read from the tap that no guest buffer has taken yet.
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
    /// The guest gave us no RX buffer last time we had a frame for it.
    pub(super) rx_starved: bool,
    /// Whether the tap is in the event loop's epoll set.
    pub(super) tap_watched: bool,
    /// The guest broke a queue; nothing more is processed until it resets the device.
    broken: bool,
    counts: NetCounts,
    log: LogLimit,
}

impl Net {
    pub fn new(
        mac: [u8; 6],
        interrupt: Arc<Interrupt>,
        backend: NetBackend,
    ) -> Result<Self, NetError> {
        let queue_evts = (0..QUEUE_SIZES.len())
            .map(|_| EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<Result<Vec<_>, _>>()
            .map_err(NetError::Fd)?;
        let tap = match backend {
            NetBackend::Disconnected => None,
            NetBackend::Tap(t) => Some(t),
        };
        Ok(Net {
            mac,
            queue_evts,
            interrupt,
            active: None,
            acked_features: 0,
            tap,
            // Zeroed by the allocator lazily: untouched pages of an idle fork cost nothing.
            rx_frame: vec![0; MAX_FRAME],
            rx_pending: None,
            tx_buf: Vec::new(),
            rx_starved: false,
            tap_watched: false,
            broken: false,
            counts: NetCounts::default(),
            log: LogLimit::new(),
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    pub fn counts(&self) -> NetCounts {
        self.counts
    }

    /// Whether the guest broke a queue and the device stopped.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Checks that the guest's avail index is at most a queue ahead of ours. A lie would
    /// make `virtio-queue` refuse (and log) on every pop, for ever: stop the device instead.
    fn queue_sane(&mut self, index: usize) -> bool {
        if self.broken {
            return false;
        }
        let Some(a) = self.active.as_ref() else {
            return false;
        };
        let sane = super::super::avail_index_sane(&a.queues[index], &a.mem);
        if !sane {
            self.broken = true;
            self.log.warn(format_args!(
                "net: queue {index}'s avail index is corrupt; the device stops until the \
                 guest resets it"
            ));
        }
        sane
    }

    /// Sends every frame the guest queued on TX (up to the budget).
    pub fn process_tx(&mut self) {
        if !self.queue_sane(TXQ) {
            return;
        }
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        let mut more = false;
        for turn in 0..=BUDGET {
            let Some(mut chain) = a.queues[TXQ].pop_descriptor_chain(&a.mem) else {
                break;
            };
            if turn == BUDGET {
                // Budget spent with frames left: put this one back, come back later.
                a.queues[TXQ].go_to_previous_position();
                more = true;
                break;
            }
            let head = chain.head_index();
            match frame::read_tx(&a.mem, &mut chain, &mut self.tx_buf) {
                Ok(f) => match self.tap.as_mut() {
                    Some(tap) => match tap.write_frame(f) {
                        Ok(()) => {
                            self.counts.tx_frames += 1;
                            self.counts.tx_bytes += f.len() as u64;
                        }
                        Err(e) => {
                            self.counts.tx_unsent += 1;
                            if e.kind() != std::io::ErrorKind::WouldBlock {
                                self.log.warn(format_args!("net: tap write: {e}"));
                            }
                        }
                    },
                    None => self.counts.tx_unsent += 1,
                },
                Err(e) => {
                    self.counts.tx_malformed += 1;
                    self.log.warn(format_args!("net: TX frame dropped: {e}"));
                }
            }
            if let Err(e) = a.queues[TXQ].add_used(&a.mem, head, 0) {
                self.log.warn(format_args!("net: TX used ring: {e}"));
            }
            used = true;
        }
        if more {
            let _ = self.queue_evts[TXQ].write(1);
        }
        if used {
            self.interrupt.raise(INT_USED_RING);
        }
    }

    /// Moves frames from the tap into guest RX buffers (up to the budget).
    pub fn process_rx(&mut self) {
        if self.tap.is_none() || !self.queue_sane(RXQ) {
            return;
        }
        let (Some(a), Some(tap)) = (self.active.as_mut(), self.tap.as_mut()) else {
            return;
        };
        let mut used = false;
        for _ in 0..BUDGET {
            let len = match self.rx_pending {
                Some(n) => n,
                None => match tap.read_frame(&mut self.rx_frame) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        self.log.warn(format_args!("net: tap read: {e}"));
                        break;
                    }
                },
            };
            let Some(mut chain) = a.queues[RXQ].pop_descriptor_chain(&a.mem) else {
                // Keep the frame until the guest gives us a buffer.
                self.rx_pending = Some(len);
                self.rx_starved = true;
                break;
            };
            self.rx_pending = None;
            let head = chain.head_index();
            let written = match frame::write_rx(&a.mem, &mut chain, &self.rx_frame[..len]) {
                Ok(n) => {
                    self.counts.rx_frames += 1;
                    self.counts.rx_bytes += len as u64;
                    n
                }
                Err(e) => {
                    self.counts.rx_dropped += 1;
                    self.log.warn(format_args!("net: RX frame dropped: {e}"));
                    0
                }
            };
            if let Err(e) = a.queues[RXQ].add_used(&a.mem, head, written) {
                self.log.warn(format_args!("net: RX used ring: {e}"));
            }
            used = true;
        }
        if used {
            self.interrupt.raise(INT_USED_RING);
        }
    }

    /// Whether the event loop should watch the tap: only while there is somewhere to put
    /// what it reads (else a level-triggered tap would wake the loop for nothing).
    pub(super) fn wants_tap(&self) -> bool {
        self.tap.is_some() && self.active.is_some() && !self.rx_starved && !self.broken
    }

    pub(super) fn queue_event(&self, index: usize) -> &EventFd {
        &self.queue_evts[index]
    }
}

impl crate::devices::Persist for Net {
    type State = NetState;
    type Args<'a> = (NetBackend, Arc<Interrupt>);
    type Error = NetError;

    fn state(&self) -> NetState {
        NetState { mac: self.mac }
    }

    /// The device again on `backend` (a fork's own tap), not started: its transport
    /// starts it on the saved queues.
    fn restore(
        (backend, interrupt): (NetBackend, Arc<Interrupt>),
        state: &NetState,
    ) -> Result<Self, NetError> {
        Net::new(state.mac, interrupt, backend)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The configuration space is the MAC (6 bytes), read-only.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.log.warn(format_args!(
            "net: guest wrote {} bytes to read-only config at {offset:#x}; ignored",
            data.len()
        ));
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        check_queues(&queues, QUEUE_SIZES.len(), &mem)?;
        self.acked_features = acked_features;
        self.active = Some(Active { mem, queues });
        self.rx_starved = false;
        self.broken = false;
        // Frames may be waiting on the tap: look on the next loop turn.
        let _ = self.queue_evts[RXQ].write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.rx_pending = None;
        self.rx_starved = false;
        self.broken = false;
    }

    fn active_queues(&self) -> Option<Vec<QueueSnapshot>> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(QueueSnapshot::of).collect())
    }
}
