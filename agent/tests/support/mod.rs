//! A fake guest driver for the vsock device: guest memory, the three queues as a driver
//! sees them, packet builders, and the device wired into a real event loop.
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use cleave_agent::devices::virtio::vsock::device::{RXQ, TXQ};
use cleave_agent::devices::virtio::vsock::{Vsock, VsockConfig};
use cleave_agent::devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use event_manager::{EventManager, SubscriberOps};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

pub const GUEST_CID: u64 = 3;
pub const HOST_CID: u64 = 2;
pub const HDR: usize = 44;
pub const MEM_SIZE: usize = 16 << 20;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// A packet header as raw fields (so tests can write nonsense too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    /// A guest → host packet from guest port `src` to host port `dst`.
    pub fn guest(op: u16, src: u32, dst: u32) -> Hdr {
        Hdr {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: src,
            dst_port: dst,
            len: 0,
            type_: 1,
            op,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0,
        }
    }

    pub fn bytes(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn parse(b: &[u8]) -> Hdr {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap());
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// One queue as the driver sees it. (Our own layout: `virtio_queue::mock` places the used
/// ring inside the avail ring for queues this large.)
pub struct Driver {
    mem: &'static GuestMemoryMmap,
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    pub fn new(mem: &'static GuestMemoryMmap, base: u64, size: u16) -> Driver {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 0xfff) & !0xfff;
        Driver {
            mem,
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    fn store_desc(&self, index: u16, d: RawDescriptor) {
        let d = SplitDescriptor::from(d);
        let at = self.desc + 16 * u64::from(index);
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr().0.to_le_bytes());
        b[8..12].copy_from_slice(&d.len().to_le_bytes());
        b[12..14].copy_from_slice(&d.flags().to_le_bytes());
        b[14..16].copy_from_slice(&d.next().to_le_bytes());
        self.mem.write_slice(&b, GuestAddress(at)).unwrap();
    }

    /// Publishes a chain of `(addr, len, device-writable)` buffers; returns its head.
    pub fn push(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        let n = bufs.len() as u16;
        let raw: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let i = i as u16;
                let mut flags = if write { F_WRITE } else { 0 };
                if i + 1 < n {
                    flags |= F_NEXT;
                }
                RawDescriptor::from(SplitDescriptor::new(
                    addr,
                    len,
                    flags,
                    (head + i + 1) % self.size,
                ))
            })
            .collect();
        self.push_raw(&raw)
    }

    /// Publishes descriptors exactly as given (flags and next untouched); head = first.
    pub fn push_raw(&mut self, raw: &[RawDescriptor]) -> u16 {
        let head = self.next_desc;
        for (i, d) in raw.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            self.store_desc(idx, *d);
        }
        self.next_desc = (head + raw.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Puts `head` in the avail ring and bumps its index.
    pub fn publish(&mut self, head: u16) {
        let slot = 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(self.avail + slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes the avail index directly (a hostile driver can say anything).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// The avail ring entries (debugging aid).
    pub fn avail_entries(&self) -> Vec<u16> {
        (0..self.avail_idx)
            .map(|i| {
                self.mem
                    .read_obj::<u16>(GuestAddress(self.avail + 4 + 2 * u64::from(i % self.size)))
                    .unwrap()
            })
            .collect()
    }

    /// Used entries `(head, len)` since the last call.
    pub fn used(&mut self) -> Vec<(u32, u32)> {
        let used = GuestAddress(self.used);
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = self.mem.read_obj(used.unchecked_add(slot)).unwrap();
            let len: u32 = self.mem.read_obj(used.unchecked_add(slot + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// Buffers handed to the device on RX: head → (header address, data address).
pub struct RxBuffers {
    slots: HashMap<u32, (u64, u64)>,
    next: u64,
    /// Chains given and not yet used: their descriptors must not be reused.
    outstanding: usize,
}

/// The device under test, with its queues, socket and event loop.
pub struct Harness {
    pub mem: &'static GuestMemoryMmap,
    pub dev: Arc<Mutex<Vsock>>,
    pub interrupt: Arc<Interrupt>,
    pub em: EventManager<Arc<Mutex<Vsock>>>,
    pub rx: Driver,
    pub tx: Driver,
    pub ev: Driver,
    rx_bufs: RxBuffers,
    /// Next free TX packet buffer.
    tx_next: u64,
    pub uds: PathBuf,
    pub dir: tempfile::TempDir,
}

const RX_BASE: u64 = 0x1_0000;
const TX_BASE: u64 = 0x2_0000;
const EV_BASE: u64 = 0x3_0000;
const TX_BUFS: u64 = 0x10_0000;
const TX_BUFS_END: u64 = 0x80_0000;
const RX_BUFS: u64 = 0x80_0000;
const RX_BUFS_END: u64 = 0xf0_0000;
pub const QSIZE: u16 = 256;

impl Harness {
    /// A device whose driver has started it.
    pub fn new() -> Harness {
        let mut h = Harness::inactive();
        let queues = vec![h.rx.queue(), h.tx.queue(), h.ev.queue()];
        h.lock()
            .activate(h.mem.clone(), VIRTIO_F_VERSION_1, queues)
            .unwrap();
        h.pump();
        h
    }

    /// A device the driver has not started.
    pub fn inactive() -> Harness {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let interrupt = Arc::new(Interrupt::new(None, 0).unwrap());
        let dev = Vsock::new(
            &VsockConfig {
                guest_cid: GUEST_CID,
                uds_path: uds.clone(),
                peer_uid: None,
            },
            interrupt.clone(),
        )
        .unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());
        Harness {
            mem,
            dev,
            interrupt,
            em,
            rx: Driver::new(mem, RX_BASE, QSIZE),
            tx: Driver::new(mem, TX_BASE, QSIZE),
            ev: Driver::new(mem, EV_BASE, QSIZE),
            rx_bufs: RxBuffers {
                slots: HashMap::new(),
                next: RX_BUFS,
                outstanding: 0,
            },
            tx_next: TX_BUFS,
            uds,
            dir,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Vsock> {
        self.dev.lock().unwrap()
    }

    /// Runs the event loop until it has nothing more to do.
    pub fn pump(&mut self) {
        for _ in 0..200 {
            if self.em.run_with_timeout(20).unwrap() == 0 {
                return;
            }
        }
    }

    /// Kicks queue `q` (what the ioeventfd does) and runs the loop.
    pub fn kick(&mut self, q: usize) {
        self.lock().queue_events()[q].write(1).unwrap();
        self.pump();
    }

    fn tx_buf(&mut self, len: usize) -> u64 {
        let len = (len as u64 + 0xfff) & !0xfff;
        if self.tx_next + len.max(0x1000) > TX_BUFS_END {
            self.tx_next = TX_BUFS;
        }
        let a = self.tx_next;
        self.tx_next += len.max(0x1000);
        a
    }

    /// Queues one packet on TX as header + data descriptors (without kicking; at most
    /// 128 packets between kicks, the queue's descriptor count).
    pub fn queue_tx(&mut self, hdr: Hdr, data: &[u8]) {
        let h = self.tx_buf(HDR);
        self.mem.write_slice(&hdr.bytes(), GuestAddress(h)).unwrap();
        if data.is_empty() {
            self.tx.push(&[(h, HDR as u32, false)]);
        } else {
            let d = self.tx_buf(data.len());
            self.mem.write_slice(data, GuestAddress(d)).unwrap();
            self.tx
                .push(&[(h, HDR as u32, false), (d, data.len() as u32, false)]);
        }
    }

    /// Sends one packet from the guest and runs the device.
    pub fn send(&mut self, hdr: Hdr, data: &[u8]) {
        self.queue_tx(hdr, data);
        self.kick(TXQ);
    }

    /// RX chains the device may still fill.
    pub fn rx_outstanding(&self) -> usize {
        self.rx_bufs.outstanding
    }

    /// Gives the device `n` RX buffers of `data_len` bytes each and kicks RX.
    pub fn give_rx(&mut self, n: usize, data_len: u32) {
        // Two descriptors per chain; a driver never reuses descriptors still in flight.
        assert!(
            (self.rx_bufs.outstanding + n) * 2 <= usize::from(QSIZE),
            "test gives more RX buffers than the queue holds"
        );
        self.rx_bufs.outstanding += n;
        for _ in 0..n {
            let span = (HDR as u64 + u64::from(data_len) + 0xfff) & !0xfff;
            if self.rx_bufs.next + span > RX_BUFS_END {
                self.rx_bufs.next = RX_BUFS;
            }
            let h = self.rx_bufs.next;
            let d = h + HDR as u64;
            self.rx_bufs.next += span;
            let head = self.rx.push(&[(h, HDR as u32, true), (d, data_len, true)]);
            self.rx_bufs.slots.insert(u32::from(head), (h, d));
        }
        self.kick(RXQ);
    }

    /// Packets the device put on RX since the last call.
    pub fn recv(&mut self) -> Vec<(Hdr, Vec<u8>)> {
        let used = self.rx.used();
        self.rx_bufs.outstanding -= used.len();
        used.into_iter()
            .map(|(head, len)| {
                let Some(&(h, d)) = self.rx_bufs.slots.get(&head) else {
                    panic!(
                        "used head {head} len {len} was never given ({} given); avail {:?}",
                        self.rx_bufs.slots.len(),
                        self.rx.avail_entries()
                    )
                };
                let mut hb = [0u8; HDR];
                self.mem.read_slice(&mut hb, GuestAddress(h)).unwrap();
                let hdr = Hdr::parse(&hb);
                assert_eq!(len as usize, HDR + hdr.len as usize, "used length matches");
                let mut data = vec![0u8; hdr.len as usize];
                self.mem.read_slice(&mut data, GuestAddress(d)).unwrap();
                (hdr, data)
            })
            .collect()
    }

    /// Connects a host process and completes the handshake towards guest port `port`
    /// (the guest side answers RESPONSE). Returns the host stream and our port.
    pub fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        use std::io::Write;
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.pump();
        self.give_rx(1, 4096);
        let pkts = self.recv();
        let (req, _) = pkts
            .iter()
            .find(|(h, _)| h.op == OP_REQUEST)
            .expect("the device asks the guest to connect");
        assert_eq!(req.dst_port, port);
        let local = req.src_port;
        self.send(Hdr::guest(OP_RESPONSE, port, local), &[]);
        (s, local)
    }
}
