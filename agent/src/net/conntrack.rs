//! Forgetting a released sandbox's flows. A slot's addresses are reused by later
//! sandboxes; a conntrack entry left from an old flow would let a new guest's packets that
//! match it pass as "established" without any pin. On release every entry whose original
//! source is one of the sandbox's addresses is deleted, over ctnetlink (a dump, then one
//! delete per entry carrying the entry's own original tuple).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V6_SRC: u16 = 3;

/// One attribute: its type (flags stripped) and payload.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & !NLA_F_NESTED & !(1 << 14);
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        let next = (len + 3) & !3;
        buf = &buf[next.min(buf.len())..];
        Some((ty, payload))
    })
}

/// The original source address of a conntrack entry's attributes.
fn orig_source(entry: &[u8]) -> Option<IpAddr> {
    let (_, tuple) = attrs(entry).find(|(t, _)| *t == CTA_TUPLE_ORIG)?;
    let (_, ip) = attrs(tuple).find(|(t, _)| *t == CTA_TUPLE_IP)?;
    attrs(ip).find_map(|(t, v)| match (t, v.len()) {
        (CTA_IP_V4_SRC, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
        (CTA_IP_V6_SRC, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
        _ => None,
    })
}

fn message(ty: u16, flags: u16, seq: u32, family: u8, body: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + body.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | ty).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version 0, resource id 0.
    m.extend_from_slice(&[family, 0, 0, 0]);
    m.extend_from_slice(body);
    m
}

fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut a = Vec::with_capacity((len + 3) & !3);
    a.extend_from_slice(&(len as u16).to_ne_bytes());
    a.extend_from_slice(&ty.to_ne_bytes());
    a.extend_from_slice(payload);
    a.resize((len + 3) & !3, 0);
    a
}

struct Socket(OwnedFd);

impl Socket {
    fn open() -> io::Result<Socket> {
        // SAFETY: plain socket(2); the fd is owned by the OwnedFd on success.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
        Ok(Socket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: `msg` is a valid buffer for its length; the kernel is the destination
        // (a netlink socket's default peer).
        let n = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads replies until DONE or an error/ack, calling `each` with every message's
    /// attributes (after the nfgenmsg header).
    fn read_until_done(&self, mut each: impl FnMut(&[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: `buf` is writable for its whole length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let ty = u16::from_ne_bytes([rest[4], rest[5]]);
                if len < 16 || len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "short netlink message",
                    ));
                }
                let body = &rest[16..len];
                match ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = body
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(-libc::EPROTO);
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    _ => each(body.get(4..).unwrap_or(&[])),
                }
                rest = &rest[((len + 3) & !3).min(rest.len())..];
            }
        }
    }
}

/// Deletes every conntrack entry whose original source is `v4` or `v6`. Returns how many.
pub fn forget(v4: IpAddr, v6: IpAddr) -> io::Result<usize> {
    let sock = Socket::open()?;
    let mut deleted = 0;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let mut doomed: Vec<Vec<u8>> = Vec::new();
        sock.send(&message(
            IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            1,
            family,
            &[],
        ))?;
        sock.read_until_done(|entry| {
            if matches!(orig_source(entry), Some(a) if a == v4 || a == v6) {
                // The delete names the entry by its original tuple (and zone).
                let mut body = Vec::new();
                for (t, v) in attrs(entry) {
                    if t == CTA_TUPLE_ORIG {
                        body.extend(attr(CTA_TUPLE_ORIG | NLA_F_NESTED, v));
                    } else if t == CTA_ZONE {
                        body.extend(attr(CTA_ZONE, v));
                    }
                }
                doomed.push(body);
            }
        })?;
        for body in doomed {
            sock.send(&message(
                IPCTNL_MSG_CT_DELETE,
                NLM_F_REQUEST | NLM_F_ACK,
                2,
                family,
                &body,
            ))?;
            match sock.read_until_done(|_| {}) {
                Ok(()) => deleted += 1,
                // Gone meanwhile (expired, or deleted by someone else): fine.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_original_source_of_an_entry() {
        let ip = attr(CTA_IP_V4_SRC, &[10, 231, 0, 2]);
        let mut ipdst = attr(2, &[192, 0, 2, 1]);
        let mut tuple_ip = ip.clone();
        tuple_ip.append(&mut ipdst);
        let tuple = attr(CTA_TUPLE_IP | NLA_F_NESTED, &tuple_ip);
        let entry = attr(CTA_TUPLE_ORIG | NLA_F_NESTED, &tuple);
        assert_eq!(orig_source(&entry), Some("10.231.0.2".parse().unwrap()));
        // Truncated or garbage attributes yield nothing rather than a panic.
        assert_eq!(orig_source(&entry[..entry.len() - 3]), None);
        assert_eq!(orig_source(&[0xff; 7]), None);
    }
}
