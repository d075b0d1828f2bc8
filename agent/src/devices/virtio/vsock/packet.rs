//! The one place that reads and writes vsock packets in guest memory.
//!
//! `virtio-vsock` walks the descriptor chain and bounds-checks every buffer against guest
//! memory; on top of that, a TX packet must name a known op and the stream type, come from
//! the guest's own CID, go to the host, and carry data only when it is a `RW`. What leaves
//! this module is a [`TxPacket`] that the rest of the device can trust.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::VsockPacket;
use vm_memory::{GuestMemory, GuestMemoryMmap};

use super::{HOST_CID, TYPE_STREAM};

/// The largest payload we accept in one TX packet (the Linux driver sends at most 64 KiB).
pub const MAX_PKT_DATA: u32 = 64 * 1024;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;

const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;

/// A packet operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Request,
    Response,
    Rst,
    /// `rcv`: the sender will receive no more; `send`: it will send no more.
    Shutdown {
        rcv: bool,
        send: bool,
    },
    Rw,
    CreditUpdate,
    CreditRequest,
}

impl Op {
    fn from_wire(op: u16, flags: u32) -> Option<Op> {
        Some(match op {
            OP_REQUEST => Op::Request,
            OP_RESPONSE => Op::Response,
            OP_RST => Op::Rst,
            OP_SHUTDOWN => Op::Shutdown {
                rcv: flags & SHUTDOWN_RCV != 0,
                send: flags & SHUTDOWN_SEND != 0,
            },
            OP_RW => Op::Rw,
            OP_CREDIT_UPDATE => Op::CreditUpdate,
            OP_CREDIT_REQUEST => Op::CreditRequest,
            _ => return None,
        })
    }

    fn to_wire(self) -> (u16, u32) {
        match self {
            Op::Request => (OP_REQUEST, 0),
            Op::Response => (OP_RESPONSE, 0),
            Op::Rst => (OP_RST, 0),
            Op::Shutdown { rcv, send } => (
                OP_SHUTDOWN,
                if rcv { SHUTDOWN_RCV } else { 0 } | if send { SHUTDOWN_SEND } else { 0 },
            ),
            Op::Rw => (OP_RW, 0),
            Op::CreditUpdate => (OP_CREDIT_UPDATE, 0),
            Op::CreditRequest => (OP_CREDIT_REQUEST, 0),
        }
    }
}

/// The addressing and credit fields of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far (wrapping).
    pub fwd_cnt: u32,
}

/// A validated packet from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    pub hdr: Header,
    pub op: Op,
    /// Empty unless `op` is [`Op::Rw`].
    pub data: Vec<u8>,
}

/// Why a TX packet was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The chain or its buffers are broken: the packet is dropped, nobody is answered.
    #[error("malformed descriptor chain: {0}")]
    Chain(virtio_vsock::packet::Error),
    #[error("packet from CID {0}, which is not the guest's")]
    WrongSource(u64),
    #[error("packet for CID {0}; only the host (CID 2) is reachable")]
    WrongDestination(u64),
    /// A well-addressed packet we refuse: the connection it names gets a reset.
    #[error("{why}")]
    Refused { hdr: Header, why: String },
}

/// Reads one TX packet from `chain`.
pub fn parse_tx<T>(
    mem: &GuestMemoryMmap,
    chain: &mut DescriptorChain<T>,
    guest_cid: u64,
) -> Result<TxPacket, PacketError>
where
    T: Deref,
    T::Target: GuestMemory,
{
    let pkt =
        VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PKT_DATA).map_err(PacketError::Chain)?;
    let hdr = Header {
        src_cid: pkt.src_cid(),
        dst_cid: pkt.dst_cid(),
        src_port: pkt.src_port(),
        dst_port: pkt.dst_port(),
        buf_alloc: pkt.buf_alloc(),
        fwd_cnt: pkt.fwd_cnt(),
    };
    if hdr.src_cid != guest_cid {
        return Err(PacketError::WrongSource(hdr.src_cid));
    }
    if hdr.dst_cid != HOST_CID {
        return Err(PacketError::WrongDestination(hdr.dst_cid));
    }
    let refuse = |why: String| PacketError::Refused { hdr, why };
    if pkt.type_() != TYPE_STREAM {
        return Err(refuse(format!(
            "socket type {} is not supported (stream only)",
            pkt.type_()
        )));
    }
    let op = Op::from_wire(pkt.op(), pkt.flags())
        .ok_or_else(|| refuse(format!("unknown op {}", pkt.op())))?;
    let data = match (op, pkt.data_slice()) {
        (Op::Rw, Some(slice)) => {
            let mut data = vec![0u8; slice.len()];
            let copied = slice.copy_to(&mut data[..]);
            data.truncate(copied);
            data
        }
        (_, None) => Vec::new(),
        (op, Some(_)) => return Err(refuse(format!("{op:?} packet carries data"))),
    };
    Ok(TxPacket { hdr, op, data })
}

/// A guest RX buffer, ready to receive one packet.
pub struct RxSlot<'a> {
    pkt: VsockPacket<'a, ()>,
}

impl<'a> RxSlot<'a> {
    /// Checks that `chain` is a usable RX buffer (writable header, optional data buffer).
    pub fn parse<T>(
        mem: &'a GuestMemoryMmap,
        chain: &mut DescriptorChain<T>,
    ) -> Result<Self, PacketError>
    where
        T: Deref,
        T::Target: GuestMemory,
    {
        let pkt = VsockPacket::from_rx_virtq_chain(mem, chain, MAX_PKT_DATA)
            .map_err(PacketError::Chain)?;
        Ok(RxSlot { pkt })
    }

    /// How many data bytes fit, at most [`MAX_PKT_DATA`]: `virtio-vsock` applies that
    /// limit to a separate data descriptor but not to a single descriptor holding header
    /// and data (Linux >= 6.2 drivers), whose length the guest chooses freely.
    pub fn capacity(&self) -> usize {
        self.pkt
            .data_slice()
            .map_or(0, |s| s.len().min(MAX_PKT_DATA as usize))
    }

    /// Writes the packet; `data` must fit (callers size it by [`capacity`](Self::capacity)).
    /// Returns the length to report in the used ring.
    pub fn fill(mut self, hdr: &Header, op: Op, data: &[u8]) -> u32 {
        let data = &data[..data.len().min(self.capacity())];
        let (op, flags) = op.to_wire();
        // The header buffer may hold whatever the guest left there: overwrite all of it.
        self.pkt
            .set_src_cid(hdr.src_cid)
            .set_dst_cid(hdr.dst_cid)
            .set_src_port(hdr.src_port)
            .set_dst_port(hdr.dst_port)
            .set_type(TYPE_STREAM)
            .set_op(op)
            .set_flags(flags)
            .set_buf_alloc(hdr.buf_alloc)
            .set_fwd_cnt(hdr.fwd_cnt)
            .set_len(data.len() as u32);
        if let Some(slice) = self.pkt.data_slice() {
            // `data` fits by the clamp above; only its own length is written.
            if let Ok(part) = slice.subslice(0, data.len()) {
                part.copy_from(data);
            }
        }
        (virtio_vsock::packet::PKT_HEADER_SIZE + data.len()) as u32
    }
}

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Writes a transport-reset event into an event-queue buffer. Returns the used length.
pub fn write_transport_reset<T>(
    mem: &GuestMemoryMmap,
    chain: &mut DescriptorChain<T>,
) -> Result<u32, PacketError>
where
    T: Deref,
    T::Target: GuestMemory,
{
    use virtio_vsock::packet::Error;
    use vm_memory::Bytes;
    let desc = chain
        .next()
        .ok_or(PacketError::Chain(Error::DescriptorChainTooShort))?;
    if !desc.is_write_only() {
        return Err(PacketError::Chain(Error::UnexpectedReadOnlyDescriptor));
    }
    let event = EVENT_TRANSPORT_RESET.to_le_bytes();
    if (desc.len() as usize) < event.len() {
        return Err(PacketError::Chain(Error::DescriptorLengthTooSmall));
    }
    mem.write_slice(&event, desc.addr())
        .map_err(|e| PacketError::Chain(Error::InvalidMemoryAccess(e)))?;
    Ok(event.len() as u32)
}
