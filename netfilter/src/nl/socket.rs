//! The netfilter netlink socket: send a batch and account for every reply,
//! or run a dump.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sys::socket::{recv, setsockopt, sockopt, MsgFlags};

use super::encode::Encoded;

/// Receive buffer, aligned for `nlmsghdr` as libmnl requires.
#[repr(C, align(8))]
struct RecvBuf([u8; 128 * 1024]);

/// How the kernel answered a batch.
#[derive(Debug)]
pub(crate) enum BatchError {
    /// The kernel rejected the op at this index (the batch rolled back).
    Rejected {
        index: Option<usize>,
        err: io::Error,
        ext: Option<String>,
    },
    /// Socket-level failure.
    Io(&'static str, io::Error),
}

/// `NLMSGERR_ATTR_MSG` from `linux/netlink.h` (not in the libc crate).
const NLMSGERR_ATTR_MSG: u16 = 1;

/// One parsed reply header.
struct Reply<'a> {
    kind: u16,
    flags: u16,
    payload: &'a [u8],
}

fn header(msg: &[u8]) -> Option<Reply<'_>> {
    let kind = u16::from_ne_bytes(msg.get(4..6)?.try_into().ok()?);
    let flags = u16::from_ne_bytes(msg.get(6..8)?.try_into().ok()?);
    Some(Reply {
        kind,
        flags,
        payload: msg.get(16..)?,
    })
}

/// An `NLMSG_ERROR` payload: errno (0 for an ACK), the sequence number of
/// the message it answers, and the kernel's extended-ack text if any.
fn parse_error(r: &Reply<'_>) -> Option<(i32, u32, Option<String>)> {
    let err = i32::from_ne_bytes(r.payload.get(0..4)?.try_into().ok()?);
    let seq = u32::from_ne_bytes(r.payload.get(12..16)?.try_into().ok()?);
    // With NETLINK_CAP_ACK the echoed request is just its 16-byte header;
    // NLM_F_ACK_TLVS means attributes follow.
    let mut ext = None;
    if r.flags & (libc::NLM_F_ACK_TLVS as u16) != 0 {
        let mut tlvs = r.payload.get(20..).unwrap_or_default();
        while tlvs.len() >= 4 {
            let len = u16::from_ne_bytes([tlvs[0], tlvs[1]]) as usize;
            let ty = u16::from_ne_bytes([tlvs[2], tlvs[3]]);
            if len < 4 || len > tlvs.len() {
                break;
            }
            if ty == NLMSGERR_ATTR_MSG {
                let s = &tlvs[4..len];
                let s = s.split(|&b| b == 0).next().unwrap_or_default();
                ext = Some(String::from_utf8_lossy(s).into_owned());
            }
            tlvs = &tlvs[len.next_multiple_of(4).min(tlvs.len())..];
        }
    }
    Some((err, seq, ext))
}

/// A netlink socket on the netfilter bus.
pub(crate) struct Netlink {
    sock: mnl::Socket,
    buf: Box<RecvBuf>,
    send_buf: Vec<u8>,
}

// SAFETY: an mnl_socket is a file descriptor plus its bound address; it has
// no thread affinity. `Netlink` is only used through `&mut`, so it is never
// used from two threads at once.
unsafe impl Send for Netlink {}

impl Netlink {
    /// Opens and binds a socket in the calling thread's network namespace.
    pub(crate) fn open() -> Result<Netlink, (&'static str, io::Error)> {
        let sock = mnl::Socket::new(mnl::Bus::Netfilter).map_err(|e| ("socket", e))?;
        // SAFETY: the fd belongs to `sock`, which outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(sock.as_raw_fd()) };
        // A dump that stalls must not hang the agent.
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::from(libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            }),
        )
        .map_err(|e| ("set SO_RCVTIMEO", e.into()))?;
        // Room for the acks of a large batch; best effort (needs CAP_NET_ADMIN).
        let _ = setsockopt(&fd, sockopt::RcvBufForce, &(4 << 20));
        let _ = setsockopt(&fd, sockopt::SndBufForce, &(4 << 20));
        // Short acks (header only) with the kernel's error text attached.
        for opt in [libc::NETLINK_CAP_ACK, libc::NETLINK_EXT_ACK] {
            let one: libc::c_int = 1;
            // SAFETY: plain setsockopt on our fd with a c_int option value.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_NETLINK,
                    opt,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(("set netlink ack options", io::Error::last_os_error()));
            }
        }
        Ok(Netlink {
            sock,
            buf: Box::new(RecvBuf([0; 128 * 1024])),
            send_buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// Discards anything left over from an earlier request.
    fn drain(&mut self) {
        while recv(
            self.sock.as_raw_fd(),
            &mut self.buf.0,
            MsgFlags::MSG_DONTWAIT,
        )
        .is_ok()
        {}
    }

    /// Sends one batch and reads every reply to it.
    ///
    /// nfnetlink processes a batch synchronously inside `sendmsg`, so once
    /// the send returns every ack and error is already queued on the socket:
    /// a non-blocking read to empty settles the whole batch, and the batch is
    /// complete only if the ack for its last message arrived.
    pub(crate) fn run_batch(&mut self, enc: &Encoded) -> Result<(), BatchError> {
        self.drain();
        // One datagram, so the kernel sees begin..end as a single batch even
        // when libnftnl spread it over several pages.
        self.send_buf.clear();
        for page in &enc.batch {
            self.send_buf.extend_from_slice(page);
        }
        let sent = self
            .sock
            .send(&self.send_buf)
            .map_err(|e| BatchError::Io("send batch", e))?;
        if sent != self.send_buf.len() {
            return Err(BatchError::Io(
                "send batch",
                io::Error::other(format!("short send: {sent} of {}", self.send_buf.len())),
            ));
        }
        let mut first_err: Option<(u32, i32, Option<String>)> = None;
        let mut saw_last = false;
        loop {
            let n = match recv(
                self.sock.as_raw_fd(),
                &mut self.buf.0,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => return Err(BatchError::Io("receive acks", e.into())),
            };
            for msg in mnl::NlMessages::new(&self.buf.0[..n]) {
                let msg = msg.map_err(|e| BatchError::Io("parse acks", e))?;
                let Some(reply) = header(msg) else { continue };
                if reply.kind != libc::NLMSG_ERROR as u16 {
                    continue;
                }
                let Some((err, seq, ext)) = parse_error(&reply) else {
                    continue;
                };
                if seq == enc.last_seq && err == 0 {
                    saw_last = true;
                }
                if err != 0 && first_err.is_none() {
                    first_err = Some((seq, -err, ext));
                }
            }
        }
        if let Some((seq, errno, ext)) = first_err {
            let index = seq
                .checked_sub(enc.first_op_seq)
                .map(|i| i as usize)
                .filter(|&i| i < enc.ops);
            return Err(BatchError::Rejected {
                index,
                err: io::Error::from_raw_os_error(errno),
                ext,
            });
        }
        if !saw_last {
            return Err(BatchError::Io(
                "receive acks",
                io::Error::other("the kernel did not acknowledge the whole batch"),
            ));
        }
        Ok(())
    }

    /// Sends a request (dump or single get) and calls `each` with every
    /// nf_tables message of the answer. A kernel error answer is returned as
    /// `Err` (e.g. `ENOENT` for a missing object).
    pub(crate) fn request(
        &mut self,
        req: &[u8],
        dump: bool,
        mut each: impl FnMut(&[u8]),
    ) -> io::Result<()> {
        self.drain();
        self.sock.send(req)?;
        loop {
            let n = self.sock.recv_raw(&mut self.buf.0)?;
            if n == 0 {
                return Err(io::Error::other("netlink socket closed"));
            }
            for msg in mnl::NlMessages::new(&self.buf.0[..n]) {
                let msg = msg?;
                let Some(reply) = header(msg) else { continue };
                match reply.kind as i32 {
                    libc::NLMSG_DONE => return Ok(()),
                    libc::NLMSG_ERROR => {
                        let (err, _, ext) = parse_error(&reply)
                            .ok_or_else(|| io::Error::other("short netlink error"))?;
                        if err == 0 {
                            return Ok(());
                        }
                        let e = io::Error::from_raw_os_error(-err);
                        return Err(match ext {
                            Some(t) => io::Error::new(e.kind(), format!("{e}: {t}")),
                            None => e,
                        });
                    }
                    _ => {
                        each(msg);
                        if !dump {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}
