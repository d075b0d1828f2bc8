//! Property tests for the one place that parses vsock packets: whatever the guest puts
//! in its descriptors and headers, parsing never panics, and what it accepts is
//! consistent (right CIDs, a known op, data only on RW and exactly `len` bytes of it).
//! A second property throws random descriptor tables and ring indices at the whole device.

mod support;

use cleave_agent::devices::virtio::vsock::device::TXQ;
use cleave_agent::devices::virtio::vsock::packet::{parse_tx, Op, PacketError, MAX_PKT_DATA};
use proptest::prelude::*;
use support::*;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn mem() -> &'static GuestMemoryMmap {
    static MEM: std::sync::OnceLock<&'static GuestMemoryMmap> = std::sync::OnceLock::new();
    MEM.get_or_init(|| {
        Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        ))
    })
}

/// Addresses that are mostly valid, sometimes at the edge or far outside memory.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0x1_0000u64..0xf_0000,
        1 => Just((1u64 << 20) - 44),
        1 => (1u64 << 20)..(1u64 << 21),
        1 => Just(u64::MAX - 16),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => 0u32..200,
        2 => Just(44u32),
        1 => 0u32..(MAX_PKT_DATA + 10),
        1 => any::<u32>(),
    ]
}

fn header() -> impl Strategy<Value = Hdr> {
    (
        prop_oneof![4 => Just(GUEST_CID), 1 => any::<u64>()],
        prop_oneof![4 => Just(HOST_CID), 1 => any::<u64>()],
        any::<u32>(),
        any::<u32>(),
        len(),
        prop_oneof![4 => Just(1u16), 1 => any::<u16>()],
        prop_oneof![4 => 0u16..9, 1 => any::<u16>()],
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(
            |(src_cid, dst_cid, src_port, dst_port, len, type_, op, flags, buf_alloc, fwd_cnt)| {
                Hdr {
                    src_cid,
                    dst_cid,
                    src_port,
                    dst_port,
                    len,
                    type_,
                    op,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parse_tx_never_panics_and_accepts_only_consistent_packets(
        hdr in header(),
        descs in prop::collection::vec((addr(), len(), 0u16..8, 0u16..20), 1..5),
        hdr_at in 0x1_0000u64..0xf_0000,
        data in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mem = mem();
        let mut d = Driver::new(mem, 0, 16);
        // The head descriptor usually points at the header we wrote.
        let _ = mem.write_slice(&hdr.bytes(), GuestAddress(hdr_at));
        if let Some(&(a, _, _, _)) = descs.get(1) {
            let _ = mem.write_slice(&data, GuestAddress(a));
        }
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f, n))| {
                let a = if i == 0 && f & 4 == 0 { hdr_at } else { a };
                RawDescriptor::from(SplitDescriptor::new(a, l, f & 3, n))
            })
            .collect();
        d.push_raw(&raw);
        let mut q = d.queue();
        let Some(mut chain) = q.pop_descriptor_chain(mem) else {
            return Ok(());
        };
        match parse_tx(mem, &mut chain, GUEST_CID) {
            Ok(p) => {
                prop_assert_eq!(p.hdr.src_cid, GUEST_CID);
                prop_assert_eq!(p.hdr.dst_cid, HOST_CID);
                prop_assert!(p.data.len() <= MAX_PKT_DATA as usize);
                if p.op == Op::Rw {
                    prop_assert_eq!(p.data.len(), hdr.len as usize);
                } else {
                    prop_assert!(p.data.is_empty());
                    prop_assert_eq!(hdr.len, 0);
                }
                prop_assert_eq!(hdr.type_, 1);
            }
            Err(PacketError::Refused { hdr: h, .. }) => {
                // Refusals name the connection to reset, and only well-addressed ones.
                prop_assert_eq!(h.src_cid, GUEST_CID);
                prop_assert_eq!(h.dst_cid, HOST_CID);
            }
            Err(_) => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_tx_rings_never_break_the_device(
        table in prop::collection::vec((addr(), len(), any::<u16>(), any::<u16>()), 1..64),
        heads in prop::collection::vec(any::<u16>(), 0..64),
        avail_idx in any::<u16>(),
    ) {
        let mut h = Harness::new();
        let raw: Vec<RawDescriptor> = table
            .iter()
            .map(|&(a, l, f, n)| RawDescriptor::from(SplitDescriptor::new(a, l, f, n)))
            .collect();
        h.tx.push_raw(&raw);
        for head in heads {
            h.tx.publish(head);
        }
        h.tx.set_avail_idx(avail_idx);
        h.kick(TXQ);
        h.kick(TXQ);
        // Still answers a good packet afterwards.
        let ok = h.lock().counts();
        prop_assert!(ok.tx_packets + ok.tx_dropped + ok.tx_refused <= 64 * 3 + 256);
        h.give_rx(4, 4096);
        let _ = h.recv();
    }
}
