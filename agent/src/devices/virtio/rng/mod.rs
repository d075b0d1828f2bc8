//! The entropy device (virtio-rng, device type 4): the guest's `hw_random` driver hands us
//! writable buffers on its one queue and we fill them from the host's `getrandom`, so the
//! guest kernel keeps feeding its CRNG from the host for the life of the fork. The reseed
//! gate is what separates forks at fork time; this device keeps them apart afterwards.
//!
//! A guest can ask for as much as it likes: what it gets is bounded by a per-sandbox byte
//! budget ([`RATE`] bytes a second, bursts of [`BURST`]). A request the budget cannot
//! cover waits in the queue, and a timer wakes the device when it can.

pub mod event_handler;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::interrupt::INT_USED_RING;
use super::log_limit::LogLimit;
use super::mmio::SavedVirtio;
use super::queue_state::QueueSnapshot;
use super::timer::DeviceTimer;
use super::{check_queues, ActivateError, Interrupt, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1};

pub const QUEUE_SIZE: u16 = 64;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Bytes per second a guest may draw.
pub const RATE: u64 = 64 << 10;
/// The most a guest may draw at once after being idle.
pub const BURST: u64 = 64 << 10;
/// The most one request is given (a driver asks for far less).
const MAX_REQUEST: usize = 4096;
/// Requests served per wake-up before others get a turn.
const BUDGET: usize = 64;

/// The device has no state of its own beyond its transport's (the byte budget starts
/// full in every fork).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {}

/// An entropy device with its transport and where the guest found it.
pub type SavedRng = SavedVirtio<RngState>;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("creating the entropy device's eventfd or timer: {0}")]
    Fd(std::io::Error),
}

/// What the device has given (the tests read it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RngCounts {
    pub requests: u64,
    pub bytes: u64,
    /// Times a request had to wait for the budget.
    pub throttled: u64,
}

/// Bytes a guest may still draw, refilled at [`RATE`].
#[derive(Debug)]
struct ByteBudget {
    available: u64,
    at: Instant,
}

impl ByteBudget {
    fn full(now: Instant) -> Self {
        ByteBudget {
            available: BURST,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.at).as_micros() as u64 * RATE / 1_000_000;
        if earned > 0 {
            self.available = (self.available + earned).min(BURST);
            self.at = now;
        }
    }

    /// Takes up to `want` bytes; returns how many.
    fn take(&mut self, want: u64, now: Instant) -> u64 {
        self.refill(now);
        let n = want.min(self.available);
        self.available -= n;
        n
    }

    /// How long until `want` bytes are available.
    fn wait_for(&self, want: u64) -> Duration {
        let short = want.min(BURST).saturating_sub(self.available);
        Duration::from_micros(short * 1_000_000 / RATE + 1)
    }
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
}

pub struct Rng {
    queue_evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    active: Option<Active>,
    acked_features: u64,
    budget: ByteBudget,
    pub(super) timer: DeviceTimer,
    buf: Vec<u8>,
    /// The guest broke its queue; nothing more is processed until it resets the device.
    broken: bool,
    counts: RngCounts,
    log: LogLimit,
}

impl Rng {
    pub fn new(interrupt: Arc<Interrupt>) -> Result<Self, RngError> {
        let queue_evts =
            vec![EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(RngError::Fd)?];
        let timer = DeviceTimer::new().map_err(RngError::Fd)?;
        Ok(Rng {
            queue_evts,
            interrupt,
            active: None,
            acked_features: 0,
            budget: ByteBudget::full(Instant::now()),
            timer,
            buf: Vec::new(),
            broken: false,
            counts: RngCounts::default(),
            log: LogLimit::new(),
        })
    }

    pub fn counts(&self) -> RngCounts {
        self.counts
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Fills the guest's waiting buffers, as far as the budget allows.
    pub fn process(&mut self) {
        if self.broken {
            return;
        }
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if !super::avail_index_sane(&a.queues[0], &a.mem) {
            self.broken = true;
            self.log.warn(format_args!(
                "rng: the queue's avail index is corrupt; the device stops until the guest \
                 resets it"
            ));
            return;
        }
        let mut used = false;
        for _ in 0..BUDGET {
            let Some(chain) = a.queues[0].pop_descriptor_chain(&a.mem) else {
                break;
            };
            let head = chain.head_index();
            // Only device-writable descriptors take bytes; the request asks for their sum.
            let writable: Vec<_> = chain.filter(|d| d.is_write_only()).collect();
            let want = writable
                .iter()
                .map(|d| d.len() as usize)
                .sum::<usize>()
                .min(MAX_REQUEST);
            let now = Instant::now();
            let granted = self.budget.take(want as u64, now) as usize;
            if granted == 0 && want > 0 {
                // Over budget: the request waits in the queue for the timer.
                a.queues[0].go_to_previous_position();
                self.counts.throttled += 1;
                if !self.timer.is_armed() {
                    let _ = self.timer.arm_once(self.budget.wait_for(want as u64));
                }
                break;
            }
            self.buf.resize(granted, 0);
            let mut written = 0usize;
            if crate::host::entropy::fill(&mut self.buf).is_ok() {
                for d in &writable {
                    if written == granted {
                        break;
                    }
                    let n = (d.len() as usize).min(granted - written);
                    if a.mem
                        .write_slice(&self.buf[written..written + n], d.addr())
                        .is_err()
                    {
                        self.log
                            .warn(format_args!("rng: a buffer lies outside guest memory"));
                        break;
                    }
                    written += n;
                }
            }
            // Never the same bytes twice.
            self.buf.fill(0);
            if let Err(e) = a.queues[0].add_used(&a.mem, head, written as u32) {
                self.log.warn(format_args!("rng: used ring: {e}"));
            }
            self.counts.requests += 1;
            self.counts.bytes += written as u64;
            used = true;
        }
        if used {
            self.interrupt.raise(INT_USED_RING);
        }
    }

    /// The timer fired: the budget has grown, try again.
    pub(super) fn on_timer(&mut self) {
        if self.timer.take_expiry() {
            self.process();
        }
    }

    pub(super) fn queue_event(&self) -> &EventFd {
        &self.queue_evts[0]
    }
}

impl crate::devices::Persist for Rng {
    type State = RngState;
    type Args<'a> = Arc<Interrupt>;
    type Error = RngError;

    fn state(&self) -> RngState {
        RngState {}
    }

    /// The device again, not started: its transport starts it on the saved queue.
    fn restore(interrupt: Arc<Interrupt>, _: &RngState) -> Result<Self, RngError> {
        Rng::new(interrupt)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
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

    /// No configuration space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.log.warn(format_args!(
            "rng: guest wrote {} bytes to a configuration space it does not have, at \
             {offset:#x}; ignored",
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
        self.broken = false;
        // A request may already be waiting (a fork restored with one): serve it now.
        let _ = self.queue_evts[0].write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.broken = false;
    }

    fn active_queues(&self) -> Option<Vec<QueueSnapshot>> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(QueueSnapshot::of).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refills_at_the_rate_and_caps_at_the_burst() {
        let t0 = Instant::now();
        let mut b = ByteBudget::full(t0);
        assert_eq!(b.take(BURST + 100, t0), BURST);
        assert_eq!(b.take(1, t0), 0);
        // A second later, a second's worth.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.take(10 * BURST, t1), RATE.min(BURST));
        // Never more than the burst, however long it was idle.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!(b.take(u64::MAX, t2), BURST);
        // 4 KiB at 64 KiB/s: about 62.5 ms.
        let w = b.wait_for(4096);
        assert!(
            w >= Duration::from_millis(62) && w <= Duration::from_millis(63),
            "{w:?}"
        );
    }
}
