//! The vsock device's state as one plain value.
//!
//! Connections are not part of it: they are host streams of one VM. A restored device
//! starts with none and sends the guest a transport reset, which makes the guest drop its
//! connections too (what the virtio spec prescribes after migration).

use serde::{Deserialize, Serialize};

use crate::devices::virtio::mmio::SavedVirtio;

/// What the device itself holds beyond its transport (which owns the queues and the
/// negotiated features).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
}

/// A vsock device with its transport and where the guest found it.
pub type SavedVsock = SavedVirtio<VsockState>;
