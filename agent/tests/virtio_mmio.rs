//! The virtio-mmio transport driven register by register, as a well-behaved driver and
//! as a confused or hostile one: wrong widths, out-of-order status, unknown features,
//! queues outside guest memory, out-of-range selectors.

mod support;

use std::sync::{Arc, Mutex};

use cleave_agent::devices::virtio::interrupt::{INT_CONFIG, INT_USED_RING};
use cleave_agent::devices::virtio::mmio::{status, MmioTransport};
use cleave_agent::devices::virtio::vsock::Vsock;
use cleave_agent::devices::virtio::VirtioDevice;
use support::Harness;

struct T {
    h: Harness,
    t: MmioTransport,
}

impl T {
    fn new() -> T {
        let h = Harness::inactive();
        let dev: Arc<Mutex<dyn VirtioDevice>> = h.dev.clone();
        let t = MmioTransport::new(dev, h.mem.clone()).unwrap();
        T { h, t }
    }
    fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }
    fn dev(&self) -> std::sync::MutexGuard<'_, Vsock> {
        self.h.dev.lock().unwrap()
    }
    fn negotiate(&mut self) {
        self.w(0x70, status::ACKNOWLEDGE);
        self.w(0x70, status::ACKNOWLEDGE | status::DRIVER);
        self.w(0x24, 1);
        self.w(0x20, 1); // VIRTIO_F_VERSION_1 (bit 32)
        self.w(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }
    /// Places queue `i` at `base` (desc), with rings after it.
    fn setup_queue(&mut self, i: u32, base: u64) {
        let avail = base + 16 * 256;
        let used = base + 0x2000;
        self.w(0x30, i);
        self.w(0x38, 256);
        for (lo, addr) in [(0x80, base), (0x90, avail), (0xa0, used)] {
            self.w(lo, addr as u32);
            self.w(lo + 4, (addr >> 32) as u32);
        }
        self.w(0x44, 1);
    }
    fn start(&mut self) {
        self.negotiate();
        for i in 0..3 {
            self.setup_queue(i, 0x10_0000 + u64::from(i) * 0x1_0000);
        }
        self.w(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }
}

#[test]
fn identifies_as_a_v2_vsock_device() {
    let mut t = T::new();
    assert_eq!(t.r(0x0), 0x7472_6976);
    assert_eq!(t.r(0x4), 2);
    assert_eq!(t.r(0x8), 19);
    t.w(0x14, 1);
    assert_eq!(t.r(0x10), 1, "VERSION_1 offered");
    t.w(0x14, 7);
    assert_eq!(t.r(0x10), 0, "no feature words beyond 64 bits");
    // The config space is the CID.
    assert_eq!(t.r(0x100), 3);
    assert_eq!(t.r(0x104), 0);
}

#[test]
fn a_normal_driver_starts_the_device() {
    let mut t = T::new();
    t.start();
    assert!(t.dev().is_active());
    assert_eq!(t.r(0x70) & status::DEVICE_NEEDS_RESET, 0);
    let st = t.t.state();
    assert_eq!(st.acked_features, 1 << 32);
    assert_eq!(st.queues.len(), 3);
    assert!(st.queues.iter().all(|q| q.ready && q.size == 256));
    assert!(t.dev().active_queues().is_some());
}

#[test]
fn features_without_version_1_or_unknown_bits_are_refused() {
    for (word, value) in [(1u32, 0u32), (0, 1 << 5), (1, 1 | 1 << 3)] {
        let mut t = T::new();
        t.w(0x70, status::ACKNOWLEDGE | status::DRIVER);
        t.w(0x24, word);
        t.w(0x20, value);
        t.w(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(
            t.r(0x70) & status::FEATURES_OK,
            0,
            "features word {word} = {value:#x} refused"
        );
    }
}

#[test]
fn queue_registers_are_ignored_outside_setup() {
    let mut t = T::new();
    t.setup_queue(0, 0x10_0000);
    t.w(0x30, 0);
    assert_eq!(t.r(0x44), 0, "not ready: written before FEATURES_OK");
    t.start();
    // After DRIVER_OK the rings cannot be moved.
    t.w(0x30, 0);
    t.w(0x80, 0xdead_0000);
    assert_eq!(t.t.state().queues[0].desc_table, 0x10_0000);
}

#[test]
fn queues_outside_guest_memory_need_a_reset() {
    let mut t = T::new();
    t.negotiate();
    t.setup_queue(0, 0x10_0000);
    t.setup_queue(1, 0x20_0000);
    t.setup_queue(2, 0xffff_ffff_0000); // far beyond the 16 MiB of RAM
    t.w(
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert!(!t.dev().is_active());
    assert_ne!(t.r(0x70) & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(t.r(0x60) & INT_CONFIG, 0, "the driver is told");
    // A reset and a correct setup recover.
    t.w(0x70, 0);
    assert_eq!(t.r(0x70), 0);
    assert_eq!(t.r(0x60), 0);
    t.start();
    assert!(t.dev().is_active());
}

#[test]
fn driver_ok_without_a_ready_queue_needs_a_reset() {
    let mut t = T::new();
    t.negotiate();
    t.setup_queue(0, 0x10_0000);
    t.w(
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert!(!t.dev().is_active());
    assert_ne!(t.r(0x70) & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn odd_widths_unknown_offsets_and_bad_selectors_are_harmless() {
    let mut t = T::new();
    let mut b = [0xffu8; 1];
    t.t.read(0x0, &mut b);
    assert_eq!(b, [0], "1-byte register read");
    let mut b = [0xffu8; 8];
    t.t.read(0x4, &mut b);
    assert_eq!(b, [0; 8], "8-byte register read");
    t.t.write(0x70, &[1, 0]);
    assert_eq!(t.r(0x70), 0, "2-byte status write ignored");
    t.t.write(0x70, &[]);
    assert_eq!(t.r(0xe00), 0);
    t.w(0xe00, 5);
    t.w(0x4, 9);
    assert_eq!(t.r(0x4), 2, "read-only register");
    t.w(0x30, 1000);
    assert_eq!(t.r(0x34), 0, "no such queue: max size 0");
    t.w(0x38, 8);
    t.w(0x50, 1000); // notify for a queue that does not exist
    t.w(0x50, u32::MAX);
    // The config space ignores writes and reads zero past its end, at any width.
    t.t.write(0x100, &[1, 2, 3]);
    let mut b = [0xffu8; 3];
    t.t.read(0xffd, &mut b);
    assert_eq!(b, [0; 3]);
    assert_eq!(t.r(0x100), 3);
}

#[test]
fn status_bits_cannot_be_taken_back_without_a_reset() {
    let mut t = T::new();
    t.start();
    t.w(0x70, status::ACKNOWLEDGE);
    assert_ne!(t.r(0x70) & status::DRIVER_OK, 0, "still running");
    assert!(t.dev().is_active());
    t.w(0x70, 0);
    assert!(!t.dev().is_active(), "reset stops the device");
}

#[test]
fn interrupt_ack_clears_only_the_acked_bits() {
    let mut t = T::new();
    t.h.interrupt.raise(INT_USED_RING | INT_CONFIG);
    assert_eq!(t.r(0x60), INT_USED_RING | INT_CONFIG);
    t.w(0x64, INT_USED_RING);
    assert_eq!(t.r(0x60), INT_CONFIG);
}

#[test]
fn a_notify_write_reaches_the_queue_event() {
    let mut t = T::new();
    t.start();
    t.w(0x50, 1);
    assert_eq!(t.dev().queue_events()[1].read().unwrap(), 1);
}

#[test]
fn a_started_transport_and_device_restore_to_the_same_state_on_a_new_socket() {
    use cleave_agent::devices::virtio::mmio::MmioState;
    use cleave_agent::devices::virtio::vsock::{VsockConfig, VsockState};
    use cleave_agent::devices::virtio::Interrupt;
    use cleave_agent::devices::Persist;

    let mut t = T::new();
    t.start();
    t.dev().interrupt().raise(INT_USED_RING);
    let transport: MmioState = t.t.state();
    let device: VsockState = t.dev().state();
    assert_eq!(
        transport.queues,
        t.dev().active_queues().unwrap(),
        "the transport saves the started device's live queues: one copy"
    );
    // Through JSON, as a template on disk or on the way to a worker.
    let transport: MmioState =
        serde_json::from_str(&serde_json::to_string(&transport).unwrap()).unwrap();
    let device: VsockState =
        serde_json::from_str(&serde_json::to_string(&device).unwrap()).unwrap();

    let config = VsockConfig {
        guest_cid: device.guest_cid,
        uds_path: t.h.dir.path().join("fork.sock"),
        peer_uid: None,
    };
    let irq = Arc::new(Interrupt::new(None, 0).unwrap());
    let dev = Arc::new(Mutex::new(Vsock::restore((&config, irq), &device).unwrap()));
    let dyn_dev: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
    let restored = MmioTransport::restore((dyn_dev, t.h.mem.clone()), &transport).unwrap();
    assert_eq!(
        restored.state(),
        transport,
        "transport state, interrupt status and live queues included"
    );
    assert_eq!(dev.lock().unwrap().state(), device);
    assert!(
        dev.lock().unwrap().is_active(),
        "its transport started it again, without a new DRIVER_OK"
    );
    assert!(
        config.uds_path.exists(),
        "the fork's device listens on its own socket"
    );

    // A state that does not fit the device is refused, not half restored.
    let fresh = |name: &str| {
        let c = VsockConfig {
            guest_cid: device.guest_cid,
            uds_path: t.h.dir.path().join(name),
            peer_uid: None,
        };
        let d: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(
            Vsock::restore((&c, Arc::new(Interrupt::new(None, 0).unwrap())), &device).unwrap(),
        ));
        d
    };
    let mut bad = transport.clone();
    bad.queues.pop();
    assert!(MmioTransport::restore((fresh("a.sock"), t.h.mem.clone()), &bad).is_err());
    let mut bad = transport.clone();
    bad.queues[0].size = 100; // not a power of two
    assert!(MmioTransport::restore((fresh("b.sock"), t.h.mem.clone()), &bad).is_err());
    let mut bad = transport.clone();
    bad.queues[1].desc_table = u64::MAX - 4096; // outside guest memory
    assert!(MmioTransport::restore((fresh("c.sock"), t.h.mem.clone()), &bad).is_err());
    let other = VsockConfig {
        guest_cid: device.guest_cid + 1,
        uds_path: t.h.dir.path().join("other.sock"),
        peer_uid: None,
    };
    let irq = Arc::new(Interrupt::new(None, 0).unwrap());
    assert!(
        Vsock::restore((&other, irq), &device).is_err(),
        "another CID"
    );
}
