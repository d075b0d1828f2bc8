//! The guest half of the fork reseed gate.
//!
//! A fork starts with its template's CRNG state. The host sends fresh
//! entropy; the agent credits it with `RNDADDENTROPY` (full bit count) and
//! forces the CRNG to rekey now with `RNDRESEEDCRNG`. `reseeded` is true
//! only when both ioctls succeeded: there is no uncredited fallback (a
//! plain `write` to `/dev/random` mixes bytes in without rekeying, which is
//! exactly the failure the gate exists to catch).
//!
//! The same exchange steps `CLOCK_REALTIME` to the host's time. A clock
//! failure is reported separately (`clock_set: false`, with the reason in
//! `detail`) and does not change `reseeded`: the flag states one fact, the
//! CRNG's, as DESIGN.md defines it; the host decides what a wrong clock is
//! worth (the node agent treats it as a failed fork too).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};

use crate::protocol::{ReseedReply, ReseedRequest, WallTime};

/// `cleave.test_reseed=fail|hang|wrong-nonce` on the kernel command line
/// makes [`KernelReseed`] misbehave on purpose, one way each gate failure
/// the host must catch. For the integration tests of the host's gate only:
/// every mode can only make a reseed fail, never pass one that did not.
pub const TEST_RESEED_FLAG: &str = "cleave.test_reseed";

/// How a reseed misbehaves for the host gate's tests ([`TEST_RESEED_FLAG`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TestMode {
    /// Behave: the real reseed.
    #[default]
    Off,
    /// Skip the ioctls and report `reseeded: false`.
    Fail,
    /// Never answer.
    Hang,
    /// Reseed for real, but echo a different nonce.
    WrongNonce,
}

impl TestMode {
    /// The mode the kernel command line asks for; unknown values are [`TestMode::Off`]
    /// (a typo must not silently weaken anything, and `Off` is the strict path).
    pub fn from_cmdline(cmdline: &str) -> TestMode {
        match crate::boot::cmdline_value(cmdline, TEST_RESEED_FLAG) {
            Some("fail") => TestMode::Fail,
            Some("hang") => TestMode::Hang,
            Some("wrong-nonce") => TestMode::WrongNonce,
            _ => TestMode::Off,
        }
    }
}

/// `_IOW('R', 0x03, int[2])`
const RNDADDENTROPY: libc::c_ulong = nix::request_code_write!(b'R', 0x03, 8) as libc::c_ulong;
/// `_IO('R', 0x07)`
const RNDRESEEDCRNG: libc::c_ulong = nix::request_code_none!(b'R', 0x07) as libc::c_ulong;

#[derive(Debug, thiserror::Error)]
pub enum ReseedError {
    #[error("open {path}: {errno}")]
    Open { path: String, errno: Errno },
    #[error("RNDADDENTROPY: {0}")]
    AddEntropy(Errno),
    #[error("RNDRESEEDCRNG: {0}")]
    ReseedCrng(Errno),
    #[error("entropy of {0} bytes is too large to credit")]
    TooLarge(usize),
    #[error("clock_settime(CLOCK_REALTIME): {0}")]
    Clock(Errno),
    #[error(
        "reseed failure forced for tests ({TEST_RESEED_FLAG}=fail on the kernel command line)"
    )]
    Forced,
}

/// What the server calls for a `reseed` request; a seam so tests of the
/// server do not touch the machine's CRNG or clock.
pub trait Reseed: Send + Sync {
    fn reseed(&self, req: &ReseedRequest) -> ReseedReply;
}

/// The real reseed: ioctls on `device`, then the clock.
#[derive(Debug, Clone)]
pub struct KernelReseed {
    /// Normally `/dev/random`.
    pub device: PathBuf,
    /// Step `CLOCK_REALTIME` to the host's time. Off only where the agent
    /// is not the guest's (tests on a development host).
    pub set_clock: bool,
    /// Misbehave on purpose. For tests only: the agent's main sets it from
    /// [`TEST_RESEED_FLAG`] on the kernel command line.
    pub test_mode: TestMode,
}

impl KernelReseed {
    /// `/dev/random`, clock on, no forced failure.
    pub fn guest_default() -> Self {
        KernelReseed {
            device: PathBuf::from("/dev/random"),
            set_clock: true,
            test_mode: TestMode::Off,
        }
    }
}

impl Reseed for KernelReseed {
    fn reseed(&self, req: &ReseedRequest) -> ReseedReply {
        if self.test_mode == TestMode::Hang {
            tracing::warn!("reseed: {TEST_RESEED_FLAG}=hang, never answering");
            loop {
                std::thread::park();
            }
        }
        let crng = if self.test_mode == TestMode::Fail {
            Err(ReseedError::Forced)
        } else {
            open_device(&self.device).and_then(|f| credit_and_reseed(&f, &req.entropy))
        };
        let clock = if self.set_clock {
            step_clock(req.time)
        } else {
            Ok(())
        };
        let mut detail = Vec::new();
        if let Err(e) = &crng {
            tracing::error!("reseed failed: {e}");
            detail.push(e.to_string());
        }
        if let Err(e) = &clock {
            tracing::error!("clock step failed: {e}");
            detail.push(e.to_string());
        }
        let mut nonce = req.nonce;
        if self.test_mode == TestMode::WrongNonce {
            nonce[0] ^= 0xff;
        }
        ReseedReply {
            reseeded: crng.is_ok(),
            nonce,
            clock_set: self.set_clock && clock.is_ok(),
            detail: detail.join("; "),
        }
    }
}

fn open_device(path: &std::path::Path) -> Result<File, ReseedError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| ReseedError::Open {
            path: path.display().to_string(),
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })
}

/// Credits `entropy` at 8 bits per byte, then rekeys the CRNG. Both must
/// succeed.
pub fn credit_and_reseed(dev: &File, entropy: &[u8]) -> Result<(), ReseedError> {
    let bits = entropy
        .len()
        .checked_mul(8)
        .and_then(|b| i32::try_from(b).ok())
        .ok_or(ReseedError::TooLarge(entropy.len()))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = vec![0u32; 2 + entropy.len().div_ceil(4)];
    info[0] = bits as u32;
    info[1] = entropy.len() as u32;
    for (i, chunk) in entropy.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(word);
    }
    // SAFETY: `info` is a valid rand_pool_info whose buf holds buf_size
    // bytes, alive for the call; the kernel only reads it.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if r < 0 {
        return Err(ReseedError::AddEntropy(Errno::last()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG) };
    if r < 0 {
        return Err(ReseedError::ReseedCrng(Errno::last()));
    }
    Ok(())
}

/// Steps `CLOCK_REALTIME` to `time`.
pub fn step_clock(time: WallTime) -> Result<(), ReseedError> {
    let ts = TimeSpec::new(time.secs, i64::from(time.nanos));
    clock_settime(ClockId::CLOCK_REALTIME, ts).map_err(ReseedError::Clock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ReseedRequest {
        ReseedRequest {
            entropy: vec![7u8; 32],
            nonce: [9u8; 16],
            time: WallTime::now(),
        }
    }

    #[test]
    fn a_regular_file_cannot_credit_so_reseeded_is_false() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let r = KernelReseed {
            device: f.path().to_path_buf(),
            set_clock: false,
            test_mode: TestMode::Off,
        }
        .reseed(&request());
        assert!(!r.reseeded);
        assert_eq!(r.nonce, [9u8; 16]);
        assert!(!r.clock_set);
        assert!(r.detail.contains("RNDADDENTROPY"), "{}", r.detail);
        assert!(r.detail.contains("ENOTTY"), "{}", r.detail);
    }

    #[test]
    fn credit_on_a_regular_file_is_enotty() {
        let f = tempfile::tempfile().unwrap();
        match credit_and_reseed(&f, &[1u8; 64]) {
            Err(ReseedError::AddEntropy(Errno::ENOTTY)) => {}
            other => panic!("expected ENOTTY from RNDADDENTROPY, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_device_is_reported_with_its_path() {
        let r = KernelReseed {
            device: PathBuf::from("/nonexistent/cleave-random"),
            set_clock: false,
            test_mode: TestMode::Off,
        }
        .reseed(&request());
        assert!(!r.reseeded);
        assert!(
            r.detail.contains("/nonexistent/cleave-random"),
            "{}",
            r.detail
        );
    }

    #[test]
    fn forced_failure_never_reports_reseeded() {
        let r = KernelReseed {
            device: PathBuf::from("/dev/random"),
            set_clock: false,
            test_mode: TestMode::Fail,
        }
        .reseed(&request());
        assert!(!r.reseeded);
        assert!(r.detail.contains(TEST_RESEED_FLAG), "{}", r.detail);
    }

    #[test]
    fn wrong_nonce_mode_changes_only_the_nonce() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let r = KernelReseed {
            device: f.path().to_path_buf(),
            set_clock: false,
            test_mode: TestMode::WrongNonce,
        }
        .reseed(&request());
        assert_ne!(r.nonce, request().nonce);
        assert!(!r.reseeded, "a regular file still cannot credit");
    }

    #[test]
    fn the_test_mode_is_read_from_the_command_line() {
        let m = TestMode::from_cmdline;
        assert_eq!(
            m("console=ttyS0 cleave.test_reseed=fail quiet"),
            TestMode::Fail
        );
        assert_eq!(m("cleave.test_reseed=hang"), TestMode::Hang);
        assert_eq!(m("cleave.test_reseed=wrong-nonce"), TestMode::WrongNonce);
        assert_eq!(m("cleave.test_reseed=bogus"), TestMode::Off);
        assert_eq!(m("xcleave.test_reseed=fail"), TestMode::Off);
        assert_eq!(m("console=ttyS0"), TestMode::Off);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // linux/random.h: RNDADDENTROPY 0x40085203, RNDRESEEDCRNG 0x5207.
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x5207);
    }
}
