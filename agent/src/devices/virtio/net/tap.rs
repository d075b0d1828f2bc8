//! The host side of virtio-net: a tap device's file descriptor.
//!
//! The node agent creates the tap ([`Tap::create`]: `TUNSETIFF` on `/dev/net/tun`, no
//! packet-info prefix, no virtio header, no offloads) and hands the fd to the VM's worker,
//! which needs no network privilege to use it ([`Tap::from_fd`]). The tap is not
//! persistent: it disappears with the last fd, so a crashed worker and agent leave none.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// Longest interface name (IFNAMSIZ without the NUL).
pub const MAX_NAME: usize = 15;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
// _IOW('T', 202, int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} must be 1..=15 characters of [A-Za-z0-9_.-]")]
    Name(String),
    #[error("opening /dev/net/tun: {0} (is the tun module loaded, and are we root?)")]
    Open(io::Error),
    #[error("creating tap {name}: TUNSETIFF: {source}")]
    Create { name: String, source: io::Error },
}

/// An open tap device, non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

impl Tap {
    /// Creates (or attaches to) the tap `name`.
    pub fn create(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::Name(name.to_string()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `IfReq` has its layout
        // (16-byte name, then the flags in the 24-byte union) and lives across the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc != 0 {
            return Err(TapError::Create {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// A tap opened elsewhere (the fd a worker received); made non-blocking here.
    pub fn from_fd(fd: OwnedFd, name: impl Into<String>) -> io::Result<Tap> {
        let file = File::from(fd);
        // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is passed.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0
            // SAFETY: as above.
            || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) }
                < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(Tap {
            file,
            name: name.into(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// One frame into `buf`; `WouldBlock` when none is waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    /// Sends one frame (a short write cannot happen on a tap: it takes whole frames).
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.file.write(frame).map(drop)
    }

    /// Another handle on the same tap (for a VM in this process; a worker gets the fd).
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

use std::os::unix::fs::OpenOptionsExt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        for bad in ["", "0123456789abcdef", "a b", "a/b", "tap\0"] {
            assert!(
                matches!(Tap::create(bad), Err(TapError::Name(_))),
                "{bad:?}"
            );
        }
    }
}
