//! The one place that reads and writes network frames in guest memory.
//!
//! A TX chain is a virtio-net header followed by one Ethernet frame, spread over readable
//! descriptors; an RX chain is writable descriptors we fill with a header and one frame.
//! Every descriptor is checked for direction and against guest memory, every length is
//! bounded before anything is copied, and since the device negotiates no offload the header
//! a guest sends must ask for none. What leaves this module is a frame of checked length.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// `struct virtio_net_hdr_mrg_rxbuf`: the header size whenever `VIRTIO_F_VERSION_1` is
/// negotiated (virtio spec 5.1.6).
pub const HDR_LEN: usize = 12;
/// The longest frame either way: the largest a tap device takes (64 KiB of IP plus the
/// Ethernet and VLAN headers).
pub const MAX_FRAME: usize = 65_536 + 18;
/// The shortest: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Offset of `num_buffers` (le16) in the header.
const NUM_BUFFERS: usize = 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("the descriptor chain is empty")]
    Empty,
    #[error("a {found} descriptor in a chain that must be all {expected}")]
    Direction {
        found: &'static str,
        expected: &'static str,
    },
    #[error("a frame of more than {MAX_FRAME} bytes")]
    TooLong,
    #[error("a frame of {0} bytes is shorter than an Ethernet header")]
    TooShort(usize),
    #[error("a descriptor at {addr:#x} ({len} bytes) lies outside guest memory")]
    Memory { addr: u64, len: u32 },
    #[error(
        "the header asks for an offload that was not negotiated (flags {flags:#x}, gso_type \
         {gso_type})"
    )]
    Offload { flags: u8, gso_type: u8 },
    #[error("an RX buffer of {capacity} bytes cannot hold a {needed}-byte frame and header")]
    BufferTooSmall { capacity: usize, needed: usize },
}

fn direction(write_only: bool) -> &'static str {
    if write_only {
        "device-writable"
    } else {
        "device-readable"
    }
}

/// Reads one TX frame from `chain` into `buf` (reused between calls) and returns the frame
/// without its header.
pub fn read_tx<'b, M, T>(
    mem: &M,
    chain: &mut DescriptorChain<T>,
    buf: &'b mut Vec<u8>,
) -> Result<&'b [u8], FrameError>
where
    M: GuestMemory,
    T: Deref,
    T::Target: GuestMemory,
{
    buf.clear();
    let mut any = false;
    for desc in chain.by_ref() {
        any = true;
        if desc.is_write_only() {
            return Err(FrameError::Direction {
                found: direction(true),
                expected: direction(false),
            });
        }
        let len = desc.len() as usize;
        let start = buf.len();
        if start + len > HDR_LEN + MAX_FRAME {
            return Err(FrameError::TooLong);
        }
        buf.resize(start + len, 0);
        mem.read_slice(&mut buf[start..], desc.addr())
            .map_err(|_| FrameError::Memory {
                addr: desc.addr().0,
                len: desc.len(),
            })?;
    }
    if !any {
        return Err(FrameError::Empty);
    }
    if buf.len() < HDR_LEN + MIN_FRAME {
        return Err(FrameError::TooShort(buf.len().saturating_sub(HDR_LEN)));
    }
    let (flags, gso_type) = (buf[0], buf[1]);
    if flags != 0 || gso_type != 0 {
        return Err(FrameError::Offload { flags, gso_type });
    }
    Ok(&buf[HDR_LEN..])
}

/// Most descriptors an RX chain may have (a queue's size bounds a chain anyway).
const MAX_RX_DESCRIPTORS: usize = 256;

/// Writes a header and `frame` into the RX buffer `chain` and returns the length to report
/// in the used ring. Nothing is written when the buffer is unusable or too small.
pub fn write_rx<M, T>(
    mem: &M,
    chain: &mut DescriptorChain<T>,
    frame: &[u8],
) -> Result<u32, FrameError>
where
    M: GuestMemory,
    T: Deref,
    T::Target: GuestMemory,
{
    if frame.len() > MAX_FRAME {
        return Err(FrameError::TooLong);
    }
    let mut parts: Vec<(GuestAddress, usize)> = Vec::new();
    let mut capacity = 0usize;
    for desc in chain.by_ref().take(MAX_RX_DESCRIPTORS) {
        if !desc.is_write_only() {
            return Err(FrameError::Direction {
                found: direction(false),
                expected: direction(true),
            });
        }
        let len = desc.len() as usize;
        if !mem.check_range(desc.addr(), len, vm_memory::Permissions::Write) {
            return Err(FrameError::Memory {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        parts.push((desc.addr(), len));
        capacity += len;
    }
    if parts.is_empty() {
        return Err(FrameError::Empty);
    }
    let needed = HDR_LEN + frame.len();
    if capacity < needed {
        return Err(FrameError::BufferTooSmall { capacity, needed });
    }
    let mut hdr = [0u8; HDR_LEN];
    hdr[NUM_BUFFERS..].copy_from_slice(&1u16.to_le_bytes());
    // Copy header then frame across the buffers, each piece straight into guest memory.
    let mut pieces = [&hdr[..], frame].into_iter().filter(|p| !p.is_empty());
    let mut piece: &[u8] = pieces.next().unwrap_or(&[]);
    for (mut addr, mut room) in parts {
        while room > 0 && !piece.is_empty() {
            let n = room.min(piece.len());
            mem.write_slice(&piece[..n], addr)
                .map_err(|_| FrameError::Memory {
                    addr: addr.0,
                    len: n as u32,
                })?;
            addr = addr.unchecked_add(n as u64);
            room -= n;
            piece = &piece[n..];
            if piece.is_empty() {
                piece = pieces.next().unwrap_or(&[]);
            }
        }
    }
    Ok(needed as u32)
}
