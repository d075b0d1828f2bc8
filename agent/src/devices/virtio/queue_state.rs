//! A virtio queue's state as plain data that serde can carry: `virtio_queue::QueueState`
//! field for field (that type has no serde support). Turning it back into a queue goes
//! through `virtio_queue`'s own checks (size a power of two, within the maximum).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl QueueSnapshot {
    /// Of a live queue.
    pub fn of(q: &Queue) -> Self {
        q.state().into()
    }

    /// The queue again; `Err` when the saved values are out of range.
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;

    #[test]
    fn round_trips_a_configured_queue() {
        let mut q = Queue::new(256).unwrap();
        q.set_size(128);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        q.set_next_avail(7);
        q.set_ready(true);
        let s = QueueSnapshot::of(&q);
        let back = s.to_queue().unwrap();
        assert_eq!(QueueSnapshot::of(&back), s);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<QueueSnapshot>(&json).unwrap(), s);
    }

    #[test]
    fn out_of_range_sizes_are_refused() {
        let mut s = QueueSnapshot::of(&Queue::new(256).unwrap());
        s.size = 100; // not a power of two
        assert!(s.to_queue().is_err());
        s.size = 512; // above the maximum
        assert!(s.to_queue().is_err());
    }
}
