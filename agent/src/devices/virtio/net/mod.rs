//! virtio-net (virtio spec 5.1) backed by a tap device.
//!
//! - [`device`]: what the device does with its two queues (RX, TX).
//! - [`event_handler`]: how the VM's event loop wakes it (queue kicks, the tap).
//! - [`frame`]: the only code that reads or writes frames in guest memory.
//! - [`tap`]: the host side: a tap file descriptor.
//! - [`state`]: the device's state as one plain struct.
//!
//! The device offers no offloads (no checksum, no GSO, no mergeable buffers): every frame
//! is one plain Ethernet frame of at most [`frame::MAX_FRAME`] bytes behind a zero
//! virtio-net header, so the only thing a hostile guest can make it do is move bounded
//! frames between its queues and its own tap. Addresses are not checked here: the tap's
//! nftables chains drop anything not from the guest's MAC and addresses.

pub mod device;
pub mod event_handler;
pub mod frame;
pub mod state;
pub mod tap;

pub use device::Net;
pub use state::{NetState, SavedNet};
pub use tap::Tap;

/// The MAC every cleave guest has (locally administered, unicast). Each guest is alone on
/// its own tap, so they need not differ; the firewall pins each tap to it.
pub const GUEST_MAC: [u8; 6] = [0x02, 0xc1, 0xea, 0x00, 0x00, 0x02];

/// Where a VM's network device sends and receives frames.
pub enum NetBackend {
    /// No backend: frames the guest sends are counted and dropped, none arrive. A
    /// template's NIC, and a fork without a network policy.
    Disconnected,
    /// The VM's tap (opened by the node agent, passed in).
    Tap(Tap),
}

impl std::fmt::Debug for NetBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetBackend::Disconnected => f.write_str("Disconnected"),
            NetBackend::Tap(t) => write!(f, "Tap({})", t.name()),
        }
    }
}
