//! The entropy device fed directly by a fake guest driver: requests filled with fresh host
//! bytes, only into device-writable buffers, bounded per request and per second (a request
//! over budget waits and is served when the timer fires), and a corrupt queue stops the
//! device instead of spinning.

mod support;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cleave_agent::devices::virtio::rng::{Rng, BURST, RATE};
use cleave_agent::devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use event_manager::{EventManager, SubscriberOps};
use support::Driver;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 8 << 20;
const BUFS: u64 = 0x10_0000;

struct RngHarness {
    mem: &'static GuestMemoryMmap,
    dev: Arc<Mutex<Rng>>,
    em: EventManager<Arc<Mutex<Rng>>>,
    q: Driver,
}

impl RngHarness {
    fn new() -> RngHarness {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap(),
        ));
        let interrupt = Arc::new(Interrupt::new(None, 0).unwrap());
        let dev = Arc::new(Mutex::new(Rng::new(interrupt).unwrap()));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());
        let q = Driver::new(mem, 0x1_0000, 64);
        dev.lock()
            .unwrap()
            .activate(mem.clone(), VIRTIO_F_VERSION_1, vec![q.queue()])
            .unwrap();
        let mut h = RngHarness { mem, dev, em, q };
        h.pump(Duration::from_millis(10));
        h
    }

    fn lock(&self) -> MutexGuard<'_, Rng> {
        self.dev.lock().unwrap()
    }

    /// Runs the event loop until it has been idle for `idle`.
    fn pump(&mut self, idle: Duration) {
        let ms = idle.as_millis() as i32;
        for _ in 0..1000 {
            if self.em.run_with_timeout(ms).unwrap() == 0 {
                return;
            }
        }
    }

    fn kick(&mut self) {
        self.lock().queue_events()[0].write(1).unwrap();
        self.pump(Duration::from_millis(10));
    }

    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        b
    }
}

#[test]
fn requests_get_fresh_bytes_only_where_the_device_may_write() {
    let mut h = RngHarness::new();
    let (a, b) = (BUFS, BUFS + 0x1000);
    let ha = h.q.push(&[(a, 64, true)]);
    let hb = h.q.push(&[(b, 64, true)]);
    h.kick();
    assert_eq!(h.q.used(), vec![(u32::from(ha), 64), (u32::from(hb), 64)]);
    let (x, y) = (h.read(a, 64), h.read(b, 64));
    assert_ne!(x, vec![0; 64]);
    assert_ne!(x, y, "two requests, two different answers");

    // A read-only descriptor in the chain gets nothing; the writable one is filled.
    let (ro, rw) = (BUFS + 0x2000, BUFS + 0x3000);
    let head = h.q.push(&[(ro, 32, false), (rw, 32, true)]);
    h.kick();
    assert_eq!(h.q.used(), vec![(u32::from(head), 32)]);
    assert_eq!(h.read(ro, 32), vec![0; 32]);
    assert_ne!(h.read(rw, 32), vec![0; 32]);
    // A buffer outside guest memory: nothing written, the request still completes.
    let head = h.q.push(&[(MEM as u64 - 8, 64, true)]);
    h.kick();
    assert_eq!(h.q.used(), vec![(u32::from(head), 0)]);
    assert!(!h.lock().is_broken());
}

#[test]
fn a_greedy_guest_is_held_to_the_budget_and_served_later() {
    let started = Instant::now();
    let mut h = RngHarness::new();
    // Twice the burst in 4 KiB requests (the most one request gets).
    let n = (2 * BURST / 4096) as usize;
    for i in 0..n {
        h.q.push(&[(BUFS + 0x1000 * i as u64, 4096, true)]);
    }
    h.kick();
    let first = h.q.used();
    let given: u64 = first.iter().map(|(_, len)| u64::from(*len)).sum();
    // At most the burst plus what the budget earned meanwhile (the last grant may be
    // partial: a request gets what there is).
    let earned = started.elapsed().as_micros() as u64 * RATE / 1_000_000;
    assert!(given <= BURST + earned, "gave {given} bytes at once");
    assert!(first.len() < n, "the budget held some requests back");
    assert!(h.lock().counts().throttled > 0);
    // The rest wait in the queue and are answered as the budget refills (the timer).
    let mut answered = first;
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered.len() < n && Instant::now() < deadline {
        h.pump(Duration::from_millis(200));
        answered.extend(h.q.used());
    }
    assert_eq!(answered.len(), n, "every request is answered in the end");
    let total: u64 = answered.iter().map(|(_, len)| u64::from(*len)).sum();
    assert_eq!(h.lock().counts().bytes, total);
}

#[test]
fn a_lying_avail_index_stops_the_device() {
    let mut h = RngHarness::new();
    h.q.set_avail_idx(40_000);
    h.kick();
    assert!(h.lock().is_broken());
    assert!(h.q.used().is_empty());
    // A reset brings it back.
    h.lock().reset();
    assert!(!h.lock().is_broken());
}
