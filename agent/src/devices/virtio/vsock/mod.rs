//! virtio-vsock (virtio spec 5.10) with Firecracker's hybrid host side.
//!
//! - [`device`]: what the device does with its three queues (RX, TX, event).
//! - [`event_handler`]: how the VM's event loop wakes it.
//! - [`packet`]: the only code that reads or writes packets in guest memory.
//! - [`csm`]: one connection: its state and credit accounting.
//! - [`unix`]: the host side: the VM's Unix socket, handshakes, the connection table.
//! - [`hybrid`]: the host client side of the handshake (`CONNECT <port>` / `OK`).
//! - [`state`]: the device's state as one plain struct.

pub mod csm;
pub mod device;
pub mod event_handler;
pub mod hybrid;
pub mod packet;
pub mod state;
pub mod unix;

use std::path::PathBuf;

pub use device::Vsock;
pub use state::{SavedVsock, VsockState};

/// The host's CID: where every guest packet must go.
pub const HOST_CID: u64 = 2;
/// The CID every cleave guest gets (each VM has its own socket, so they need not differ).
pub const DEFAULT_GUEST_CID: u64 = 3;
/// The only socket type we carry.
pub const TYPE_STREAM: u16 = 1;

/// How to build a vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// The VM's hybrid-vsock Unix socket (host-initiated connections arrive here; guest
    /// connections to port P go to `<uds_path>_P`).
    pub uds_path: PathBuf,
    /// Only peers with this uid (`SO_PEERCRED`) may connect to the socket; `None`: any
    /// peer the socket's directory lets in.
    pub peer_uid: Option<u32>,
}
