//! The vsock device: moves packets between its queues and the host side ([`Muxer`]).
//!
//! Queue 0 (RX) holds guest buffers we fill with packets for the guest, queue 1 (TX)
//! packets from the guest, queue 2 (event) buffers for device events (transport reset).

use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packet::{self, PacketError, RxSlot};
use super::state::VsockState;
use super::unix::Muxer;
use super::VsockConfig;
use crate::devices::virtio::interrupt::INT_USED_RING;
use crate::devices::virtio::log_limit::LogLimit;
use crate::devices::virtio::queue_state::QueueSnapshot;
use crate::devices::virtio::timer::DeviceTimer;
use crate::devices::virtio::{
    check_queues, read_config_bytes, ActivateError, Interrupt, VirtioDevice, TYPE_VSOCK,
    VIRTIO_F_VERSION_1,
};

pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
pub const EVQ: usize = 2;
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// TX packets handled per wake-up before others get a turn (the rest: next round).
const TX_BUDGET: usize = 256;
/// How often handshakes and closes are checked for expiry.
pub const TICK: std::time::Duration = std::time::Duration::from_millis(500);

/// The device's counters (metrics; the tests read them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VsockCounts {
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// TX packets dropped as malformed (bad chain, wrong CIDs).
    pub tx_dropped: u64,
    /// TX packets refused with a reset (unknown op, wrong type, data on a control op).
    pub tx_refused: u64,
    pub transport_resets: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("creating the vsock device's eventfds/timer: {0}")]
    Fd(std::io::Error),
    #[error("restoring the vsock device: {0}")]
    Restore(String),
    #[error("binding the vsock socket {path}: {source}")]
    Bind {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

pub struct Vsock {
    cid: u64,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    /// Armed (every [`TICK`]) only while the muxer awaits a deadline: an idle VM's loop
    /// then sleeps until a queue or socket wakes it.
    pub(super) timer: DeviceTimer,
    /// Written when the guest's run ends (see [`end_event`](Self::end_event)).
    pub(super) guest_end: EventFd,
    active: Option<Active>,
    acked_features: u64,
    pub(super) muxer: Muxer,
    /// The guest gave us no RX buffer last time we had something for it.
    pub(super) rx_starved: bool,
    reset_event_pending: bool,
    /// The guest broke a queue (its avail index lies); nothing is processed until reset.
    broken: bool,
    counts: VsockCounts,
    log: LogLimit,
}

impl Vsock {
    pub fn new(config: &VsockConfig, interrupt: Arc<Interrupt>) -> Result<Self, VsockError> {
        let queue_evts = (0..QUEUE_SIZES.len())
            .map(|_| EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VsockError::Fd)?;
        let timer = DeviceTimer::new().map_err(VsockError::Fd)?;
        let guest_end = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VsockError::Fd)?;
        let muxer =
            Muxer::bind(&config.uds_path, config.guest_cid, config.peer_uid).map_err(|source| {
                VsockError::Bind {
                    path: config.uds_path.clone(),
                    source,
                }
            })?;
        Ok(Vsock {
            cid: config.guest_cid,
            queue_evts,
            interrupt,
            timer,
            guest_end,
            active: None,
            acked_features: 0,
            muxer,
            rx_starved: false,
            reset_event_pending: false,
            broken: false,
            counts: VsockCounts::default(),
            log: LogLimit::new(),
        })
    }

    /// Arms the timer while the muxer awaits a deadline and disarms it after.
    pub(super) fn sync_timer(&mut self) {
        let want = self.muxer.awaits_deadline();
        if want == self.timer.is_armed() {
            return;
        }
        let r = if want {
            self.timer.arm_periodic(TICK)
        } else {
            self.timer.disarm()
        };
        // Left as it was: armed, a tick is spent for nothing; disarmed, handshakes wait
        // for the next event to expire. Retried on the next event either way.
        if let Err(e) = r {
            self.log.warn(format_args!("vsock: timer: {e}"));
        }
    }

    /// An eventfd to write when the guest's run ends (reset, crash, VMM failure): the
    /// device then closes every host connection and refuses new ones, since nothing in a
    /// guest that is gone will answer them. Its holder is the VM's
    /// [`RunControl`](crate::vmm::control::RunControl).
    pub fn end_event(&self) -> std::io::Result<EventFd> {
        self.guest_end.try_clone()
    }

    /// The guest's run ended: see [`end_event`](Self::end_event).
    pub(super) fn on_guest_end(&mut self) {
        let _ = self.guest_end.read();
        self.muxer.guest_gone();
    }

    /// Whether the expiry timer is armed (only while a handshake or close is under way).
    pub fn timer_armed(&self) -> bool {
        self.timer.is_armed()
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    pub fn counts(&self) -> VsockCounts {
        self.counts
    }

    /// Whether the guest broke a queue and the device stopped (until the guest resets it).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// See [`super::super::avail_index_sane`]: a lying queue stops the device.
    fn queue_sane(&mut self, index: usize) -> bool {
        if self.broken {
            return false;
        }
        let Some(a) = self.active.as_ref() else {
            return false;
        };
        if super::super::avail_index_sane(&a.queues[index], &a.mem) {
            return true;
        }
        self.broken = true;
        self.log.warn(format_args!(
            "vsock: queue {index}'s avail index is corrupt; the device stops until the guest \
             resets it"
        ));
        false
    }

    /// Takes every packet the guest queued on TX and acts on it.
    pub fn process_tx(&mut self) {
        if !self.queue_sane(TXQ) {
            return;
        }
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        for _ in 0..TX_BUDGET {
            let Some(mut chain) = a.queues[TXQ].pop_descriptor_chain(&a.mem) else {
                break;
            };
            let head = chain.head_index();
            let parsed = packet::parse_tx(&a.mem, &mut chain, self.cid);
            if let Err(e) = a.queues[TXQ].add_used(&a.mem, head, 0) {
                self.log.warn(format_args!("vsock: TX used ring: {e}"));
            }
            used = true;
            match parsed {
                Ok(pkt) => {
                    self.counts.tx_packets += 1;
                    self.muxer.handle_guest_packet(pkt);
                }
                Err(PacketError::Refused { hdr, why }) => {
                    self.counts.tx_refused += 1;
                    self.log.warn(format_args!("vsock: packet refused: {why}"));
                    self.muxer.refuse(&hdr);
                }
                Err(e) => {
                    self.counts.tx_dropped += 1;
                    self.log.warn(format_args!("vsock: packet dropped: {e}"));
                }
            }
        }
        if a.queues[TXQ].is_valid(&a.mem) && self.tx_has_more() {
            // Budget spent with packets left: come back after others had a turn.
            let _ = self.queue_evts[TXQ].write(1);
        }
        if used {
            self.interrupt.raise(INT_USED_RING);
        }
    }

    fn tx_has_more(&self) -> bool {
        let Some(a) = self.active.as_ref() else {
            return false;
        };
        let q = &a.queues[TXQ];
        q.avail_idx(&a.mem, std::sync::atomic::Ordering::Acquire)
            .map(|idx| idx.0 != q.next_avail())
            .unwrap_or(false)
    }

    /// Fills guest RX buffers with whatever the host side has for the guest.
    pub fn process_rx(&mut self) {
        if !self.queue_sane(RXQ) {
            return;
        }
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(mut chain) = a.queues[RXQ].pop_descriptor_chain(&a.mem) else {
                self.rx_starved = true;
                break;
            };
            let head = chain.head_index();
            let len = match RxSlot::parse(&a.mem, &mut chain) {
                Ok(slot) => match self.muxer.next_rx(slot.capacity()) {
                    Some(p) => {
                        self.counts.rx_packets += 1;
                        slot.fill(&p.hdr, p.op, &p.data)
                    }
                    None if slot.capacity() > 0 => {
                        // Nothing to send after all: the buffer stays the guest's.
                        a.queues[RXQ].go_to_previous_position();
                        break;
                    }
                    None => 0,
                },
                Err(e) => {
                    self.log
                        .warn(format_args!("vsock: RX buffer unusable: {e}"));
                    0
                }
            };
            if let Err(e) = a.queues[RXQ].add_used(&a.mem, head, len) {
                self.log.warn(format_args!("vsock: RX used ring: {e}"));
            }
            used = true;
        }
        if used {
            self.interrupt.raise(INT_USED_RING);
        }
    }

    /// Tells the guest its transport was reset (after a fork or restore: every connection
    /// is gone and the CID may have changed). Host connections are closed now; the event
    /// goes out now or as soon as the guest provides an event buffer.
    pub fn send_transport_reset(&mut self) {
        self.muxer.reset_all();
        self.reset_event_pending = true;
        self.counts.transport_resets += 1;
        self.process_event_queue();
        self.wake_event_loop();
    }

    /// Wakes the event loop from another thread (a vCPU, the worker): it takes streams
    /// the muxer closed out of epoll, closes them and re-arms the timer as needed.
    fn wake_event_loop(&self) {
        let _ = self.queue_evts[EVQ].write(1);
    }

    /// Delivers a pending event if the guest left a buffer for it.
    pub fn process_event_queue(&mut self) {
        if !self.reset_event_pending {
            return;
        }
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(mut chain) = a.queues[EVQ].pop_descriptor_chain(&a.mem) else {
            return;
        };
        let head = chain.head_index();
        let len = match packet::write_transport_reset(&a.mem, &mut chain) {
            Ok(n) => {
                self.reset_event_pending = false;
                n
            }
            Err(e) => {
                self.log
                    .warn(format_args!("vsock: event buffer unusable: {e}"));
                0
            }
        };
        if let Err(e) = a.queues[EVQ].add_used(&a.mem, head, len) {
            self.log.warn(format_args!("vsock: event used ring: {e}"));
        }
        self.interrupt.raise(INT_USED_RING);
    }

    pub(super) fn queue_event(&self, index: usize) -> &EventFd {
        &self.queue_evts[index]
    }
}

impl crate::devices::Persist for Vsock {
    type State = VsockState;
    type Args<'a> = (&'a VsockConfig, Arc<Interrupt>);
    type Error = VsockError;

    fn state(&self) -> VsockState {
        VsockState {
            guest_cid: self.cid,
        }
    }

    /// The device again on a new socket (`config`), not started: its transport starts it
    /// on the saved queues. It has no connections; a fork follows with
    /// [`send_transport_reset`](Vsock::send_transport_reset) so the guest drops its own.
    fn restore(
        (config, interrupt): (&VsockConfig, Arc<Interrupt>),
        state: &VsockState,
    ) -> Result<Self, VsockError> {
        if state.guest_cid != config.guest_cid {
            return Err(VsockError::Restore(format!(
                "the saved device has CID {} but this one is configured with {}",
                state.guest_cid, config.guest_cid
            )));
        }
        Vsock::new(config, interrupt)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
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

    /// The configuration space is the guest CID (le64), read-only.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.log.warn(format_args!(
            "vsock: guest wrote {} bytes to read-only config at {offset:#x}; ignored",
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
        // Anything queued while the driver was starting goes out on the next loop turn.
        let _ = self.queue_evts[RXQ].write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.broken = false;
        self.reset_event_pending = false;
        self.muxer.reset_all();
        // Runs on a vCPU thread, and a guest resetting its devices as it dies may never
        // kick a queue again.
        self.wake_event_loop();
    }

    fn active_queues(&self) -> Option<Vec<QueueSnapshot>> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(QueueSnapshot::of).collect())
    }
}
