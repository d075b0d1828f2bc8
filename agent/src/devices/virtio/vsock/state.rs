//! The vsock device's state as one plain value.
//!
//! Connections are not part of it: they are host streams of one VM. A restored device
//! starts with none and sends the guest a transport reset, which makes the guest drop its
//! connections too (what the virtio spec prescribes after migration).

use virtio_queue::QueueState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockState {
    pub guest_cid: u64,
    pub acked_features: u64,
    /// `None` before the driver started the device.
    pub queues: Option<Vec<QueueState>>,
}
