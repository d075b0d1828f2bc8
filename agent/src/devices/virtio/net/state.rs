//! The network device's state as one plain value. The tap is not part of it: a restored
//! device gets the backend of the VM it is restored into (a fork's own tap). Its queues and
//! negotiated features are its transport's.

use serde::{Deserialize, Serialize};

use crate::devices::virtio::mmio::SavedVirtio;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
}

/// A network device with its transport and where the guest found it.
pub type SavedNet = SavedVirtio<NetState>;
