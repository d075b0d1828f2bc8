//! Guest memory and split virtqueues laid out from fuzz input, for the device targets.
//!
//! The input is the guest: byte 0 picks the queue size, the rest is written over the
//! first 64 KiB of guest memory, where every queue's descriptor table, available ring and
//! used ring live (at fixed places) beside the buffers they point to. Anything goes:
//! descriptors that loop, point outside memory, overlap the rings, or an available index
//! far ahead.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: usize = 64 << 10;

/// Queue `i`'s descriptor table, available ring and used ring.
fn layout(i: u64) -> (u64, u64, u64) {
    let base = i * 0x2000;
    (base, base + 0x1000, base + 0x1800)
}

pub struct Guest {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
}

pub fn guest(data: &[u8], queues: u64) -> Option<Guest> {
    let (&size_byte, image) = data.split_first()?;
    let size = 1u16 << (1 + size_byte % 8);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let n = image.len().min(MEM_SIZE);
    mem.write_slice(&image[..n], GuestAddress(0)).ok()?;
    let queues = (0..queues)
        .map(|i| {
            let (desc, avail, used) = layout(i);
            let mut q = Queue::new(256).expect("256 is a valid queue size");
            q.set_size(size);
            q.set_desc_table_address(Some(desc as u32), Some(0));
            q.set_avail_ring_address(Some(avail as u32), Some(0));
            q.set_used_ring_address(Some(used as u32), Some(0));
            q.set_ready(true);
            q
        })
        .collect();
    Some(Guest { mem, queues })
}
