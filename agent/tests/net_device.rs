//! The network device fed directly by a fake guest driver, with a SOCK_SEQPACKET socket
//! standing in for the tap (it keeps frame boundaries as a tap does): frames both ways,
//! starvation, the budget, and every kind of hostile input — chains in the wrong
//! direction or outside memory, oversized, truncated and offload-flagged frames, RX
//! buffers too small, a lying avail index. The device drops the frame (or stops), counts
//! it, and never panics, hangs or grows without bound.

mod support;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex, MutexGuard};

use cleave_agent::devices::virtio::net::device::{NetCounts, BUDGET, RXQ, TXQ, VIRTIO_NET_F_MAC};
use cleave_agent::devices::virtio::net::frame::{HDR_LEN, MAX_FRAME};
use cleave_agent::devices::virtio::net::{Net, NetBackend, Tap, GUEST_MAC};
use cleave_agent::devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use cleave_agent::devices::Persist;
use event_manager::{EventManager, SubscriberOps};
use proptest::prelude::*;
use support::{Driver, F_NEXT, F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 8 << 20;
const RX_BASE: u64 = 0x1_0000;
const TX_BASE: u64 = 0x2_0000;
const BUFS: u64 = 0x10_0000;
const QSIZE: u16 = 256;

struct NetHarness {
    mem: &'static GuestMemoryMmap,
    dev: Arc<Mutex<Net>>,
    interrupt: Arc<Interrupt>,
    em: EventManager<Arc<Mutex<Net>>>,
    rx: Driver,
    tx: Driver,
    /// The far end of the "tap".
    peer: Option<UnixDatagram>,
    next_buf: u64,
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

impl NetHarness {
    fn new(connected: bool) -> NetHarness {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap(),
        ));
        let interrupt = Arc::new(Interrupt::new(None, 0).unwrap());
        let (backend, peer) = if connected {
            let (ours, theirs) = std::os::unix::net::UnixDatagram::pair().unwrap();
            // A datagram pair keeps boundaries like a tap; the device sees only an fd.
            let tap = Tap::from_fd(OwnedFd::from(ours), "test0").unwrap();
            theirs.set_nonblocking(true).unwrap();
            (NetBackend::Tap(tap), Some(theirs))
        } else {
            (NetBackend::Disconnected, None)
        };
        let dev = Arc::new(Mutex::new(
            Net::new(GUEST_MAC, interrupt.clone(), backend).unwrap(),
        ));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());
        let h = NetHarness {
            mem,
            dev,
            interrupt,
            em,
            rx: Driver::new(mem, RX_BASE, QSIZE),
            tx: Driver::new(mem, TX_BASE, QSIZE),
            peer,
            next_buf: BUFS,
        };
        let queues = vec![h.rx.queue(), h.tx.queue()];
        h.lock()
            .activate(mem.clone(), VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC, queues)
            .unwrap();
        h
    }

    fn lock(&self) -> MutexGuard<'_, Net> {
        self.dev.lock().unwrap()
    }

    fn counts(&self) -> NetCounts {
        self.lock().counts()
    }

    fn pump(&mut self) {
        for _ in 0..50 {
            if self.em.run_with_timeout(10).unwrap() == 0 {
                return;
            }
        }
    }

    fn kick(&mut self, q: usize) {
        self.lock().queue_events()[q].write(1).unwrap();
        self.pump();
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let at = self.next_buf;
        self.next_buf += (u64::from(len) + 0xf) & !0xf;
        assert!(self.next_buf < MEM as u64, "test ran out of buffer space");
        at
    }

    /// Queues a TX chain: a zero header and `frame`, split after `split` bytes.
    fn queue_tx(&mut self, hdr: [u8; HDR_LEN], frame: &[u8], split: usize) {
        let mut bytes = hdr.to_vec();
        bytes.extend_from_slice(frame);
        let split = split.min(bytes.len());
        let mut bufs = Vec::new();
        for part in [&bytes[..split], &bytes[split..]] {
            if part.is_empty() {
                continue;
            }
            let at = self.alloc(part.len() as u32);
            self.mem.write_slice(part, GuestAddress(at)).unwrap();
            bufs.push((at, part.len() as u32, false));
        }
        self.tx.push(&bufs);
    }

    /// Gives the device one RX buffer of `len` bytes; returns its address.
    fn give_rx(&mut self, len: u32) -> u64 {
        let at = self.alloc(len);
        self.rx.push(&[(at, len, true)]);
        at
    }

    fn peer_recv(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_FRAME + 100];
        while let Ok(n) = self.peer.as_ref().unwrap().recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    fn peer_send(&self, frame: &[u8]) {
        self.peer.as_ref().unwrap().send(frame).unwrap();
    }
}

fn zero_hdr() -> [u8; HDR_LEN] {
    [0; HDR_LEN]
}

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

// ---- normal operation ----------------------------------------------------------------

#[test]
fn config_space_is_the_mac_and_features_are_minimal() {
    let h = NetHarness::new(true);
    let dev = h.lock();
    let mut mac = [0u8; 6];
    dev.read_config(0, &mut mac);
    assert_eq!(mac, GUEST_MAC);
    let mut beyond = [0xffu8; 4];
    dev.read_config(6, &mut beyond);
    assert_eq!(beyond, [0; 4]);
    dev.read_config(u64::MAX - 1, &mut beyond);
    assert_eq!(
        beyond, [0; 4],
        "no overflow at the end of the address space"
    );
    // No offloads: a frame is a frame.
    assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
}

#[test]
fn a_tx_frame_reaches_the_tap_whole() {
    let mut h = NetHarness::new(true);
    let f = frame(1514, 7);
    h.queue_tx(zero_hdr(), &f, 5); // the header itself split across descriptors
    h.kick(TXQ);
    assert_eq!(h.peer_recv(), vec![f.clone()]);
    let used = h.tx.used();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 0, "TX buffers are only read");
    assert!(h.interrupt.status() & 1 != 0, "the guest is told");
    let c = h.counts();
    assert_eq!((c.tx_frames, c.tx_bytes), (1, f.len() as u64));
}

#[test]
fn a_frame_from_the_tap_lands_in_a_guest_buffer_with_its_header() {
    let mut h = NetHarness::new(true);
    let at = h.give_rx(2048);
    h.kick(RXQ);
    let f = frame(600, 3);
    h.peer_send(&f);
    h.pump();
    let used = h.rx.used();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1 as usize, HDR_LEN + f.len());
    let mut got = vec![0u8; HDR_LEN + f.len()];
    h.mem.read_slice(&mut got, GuestAddress(at)).unwrap();
    assert_eq!(&got[..10], &[0; 10], "no offload flags");
    assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers = 1");
    assert_eq!(&got[HDR_LEN..], &f[..]);
}

#[test]
fn a_frame_waits_for_a_buffer_instead_of_being_lost() {
    let mut h = NetHarness::new(true);
    let f = frame(100, 9);
    h.peer_send(&f);
    h.pump();
    assert!(h.rx.used().is_empty(), "no buffer yet");
    assert_eq!(h.counts().rx_dropped, 0);
    let at = h.give_rx(2048);
    h.kick(RXQ);
    assert_eq!(h.rx.used().len(), 1);
    let mut got = vec![0u8; f.len()];
    h.mem
        .read_slice(&mut got, GuestAddress(at + HDR_LEN as u64))
        .unwrap();
    assert_eq!(got, f);
}

#[test]
fn an_unplugged_nic_swallows_frames_and_receives_none() {
    let mut h = NetHarness::new(false);
    h.queue_tx(zero_hdr(), &frame(60, 1), 100);
    h.give_rx(2048);
    h.kick(TXQ);
    h.kick(RXQ);
    assert_eq!(h.tx.used().len(), 1, "the buffer goes back to the guest");
    assert!(h.rx.used().is_empty());
    assert_eq!(h.counts().tx_unsent, 1);
}

#[test]
fn a_full_ring_goes_out_in_order() {
    let mut h = NetHarness::new(true);
    let n = usize::from(QSIZE);
    assert!(n <= BUDGET, "one wake-up can empty a full ring");
    for i in 0..n {
        h.queue_tx(zero_hdr(), &frame(60, i as u8), 100);
    }
    h.kick(TXQ);
    let sent = h.peer_recv();
    assert_eq!(sent.len(), n);
    assert!(sent
        .iter()
        .enumerate()
        .all(|(i, f)| *f == frame(60, i as u8)));
}

// ---- hostile input ---------------------------------------------------------------------

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let mut h = NetHarness::new(true);
    // Write-only descriptor in a TX chain.
    let at = h.alloc(100);
    h.tx.push(&[(at, 100, true)]);
    // Outside guest memory.
    h.tx.push(&[(MEM as u64 - 10, 100, false)]);
    h.tx.push(&[(u64::MAX - 50, 100, false)]);
    // Shorter than an Ethernet header.
    h.queue_tx(zero_hdr(), &frame(10, 0), 100);
    // Offload asked for but never negotiated.
    let mut csum = zero_hdr();
    csum[0] = 1;
    h.queue_tx(csum, &frame(60, 0), 100);
    let mut gso = zero_hdr();
    gso[1] = 1;
    h.queue_tx(gso, &frame(60, 0), 100);
    // Longer than any frame: two descriptors adding up past the bound.
    let big = h.alloc(40_000);
    let big2 = h.alloc(40_000);
    h.tx.push(&[(big, 40_000, false), (big2, 40_000, false)]);
    // An empty chain: a zero-length descriptor.
    h.tx.push(&[(at, 0, false)]);
    h.kick(TXQ);
    assert!(
        h.peer_recv().is_empty(),
        "nothing malformed reaches the tap"
    );
    assert_eq!(h.tx.used().len(), 8, "every buffer is returned");
    assert_eq!(h.counts().tx_malformed, 8);
    // And the device still works.
    h.queue_tx(zero_hdr(), &frame(60, 2), 100);
    h.kick(TXQ);
    assert_eq!(h.peer_recv().len(), 1);
}

#[test]
fn a_descriptor_loop_is_bounded() {
    let mut h = NetHarness::new(true);
    let at = h.alloc(64);
    // Two descriptors pointing at each other: the chain ends after a queue's worth of
    // descriptors, so at most one bounded frame comes of it, and the device goes on.
    h.tx.push_raw(&[raw(at, 32, F_NEXT, 1), raw(at, 32, F_NEXT, 0)]);
    h.kick(TXQ);
    let out = h.peer_recv();
    assert!(out.len() <= 1 && out.iter().all(|f| f.len() <= 32 * usize::from(QSIZE)));
    assert_eq!(h.tx.used().len(), 1);
    h.queue_tx(zero_hdr(), &frame(60, 4), 100);
    h.kick(TXQ);
    assert_eq!(h.peer_recv(), vec![frame(60, 4)]);
}

#[test]
fn unusable_rx_buffers_drop_the_frame_not_the_device() {
    let mut h = NetHarness::new(true);
    // Read-only RX buffer, then one too small for header + frame, then a good one.
    let ro = h.alloc(2048);
    h.rx.push(&[(ro, 2048, false)]);
    let small = h.give_rx(HDR_LEN as u32 + 10);
    let good = h.give_rx(2048);
    let _ = (small, good);
    h.kick(RXQ);
    for i in 0..3 {
        h.peer_send(&frame(100, i));
    }
    h.pump();
    let used = h.rx.used();
    assert_eq!(used.len(), 3);
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [0, 0, 112]);
    let mut untouched = vec![0u8; 16];
    h.mem.read_slice(&mut untouched, GuestAddress(ro)).unwrap();
    assert_eq!(
        untouched,
        vec![0u8; 16],
        "a read-only buffer is never written"
    );
    assert_eq!(h.counts().rx_dropped, 2);
    assert_eq!(h.counts().rx_frames, 1);
}

#[test]
fn a_lying_avail_index_stops_the_device_instead_of_spinning() {
    let mut h = NetHarness::new(true);
    h.queue_tx(zero_hdr(), &frame(60, 0), 100);
    // Claim far more buffers than the ring holds.
    h.tx.set_avail_idx(QSIZE * 3 + 7);
    h.kick(TXQ);
    assert!(h.lock().is_broken());
    // Stopped means stopped: no processing, no self-rekick storm.
    for _ in 0..10 {
        h.kick(TXQ);
    }
    assert!(h.peer_recv().is_empty());
    // A reset (the driver writes status 0) and a new activation bring it back.
    let h2 = h;
    h2.lock().reset();
    assert!(!h2.lock().is_broken());
}

#[test]
fn state_round_trips_and_live_queues_are_what_gets_saved() {
    let mut h = NetHarness::new(true);
    h.queue_tx(zero_hdr(), &frame(60, 0), 100);
    h.kick(TXQ);
    let state = h.lock().state();
    assert_eq!(state.mac, GUEST_MAC);
    // The transport saves the device's live queues: the TX queue has moved on.
    let live = h.lock().active_queues().expect("started");
    assert_eq!(live[TXQ].next_avail, 1);
    assert_eq!(live[RXQ].next_avail, 0);
    let back = Net::restore(
        (
            NetBackend::Disconnected,
            Arc::new(Interrupt::new(None, 0).unwrap()),
        ),
        &state,
    )
    .unwrap();
    assert_eq!(back.state(), state);
    assert!(
        !back.is_active(),
        "its transport starts it, not its own state"
    );
    h.lock().reset();
    assert!(h.lock().active_queues().is_none());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any chain a guest can build — any addresses, lengths, flags and links — is either
    /// a frame of checked length on the tap or a dropped buffer; never a panic.
    #[test]
    fn arbitrary_tx_chains_are_safe(
        descs in proptest::collection::vec(
            (0u64..(MEM as u64 + 4096), 0u32..70_000, 0u16..4, 0u16..QSIZE),
            1..8,
        ),
        rx in proptest::collection::vec((0u64..(MEM as u64 + 4096), 0u32..5000, 0u16..4), 0..4),
        frames in proptest::collection::vec(1usize..3000, 0..4),
    ) {
        let mut h = NetHarness::new(true);
        let raws: Vec<RawDescriptor> = descs.iter().map(|&(a, l, f, n)| raw(a, l, f & (F_NEXT | F_WRITE), n)).collect();
        h.tx.push_raw(&raws);
        for &(a, l, f) in &rx {
            h.rx.push_raw(&[raw(a, l, f & F_WRITE, 0)]);
        }
        for &len in &frames {
            h.peer_send(&frame(len, 1));
        }
        h.kick(TXQ);
        h.kick(RXQ);
        for f in h.peer_recv() {
            prop_assert!(f.len() <= MAX_FRAME && f.len() >= 14);
        }
        for (_, len) in h.rx.used() {
            prop_assert!(len as usize <= HDR_LEN + 3000);
        }
    }
}
