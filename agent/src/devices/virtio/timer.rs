//! A device's timer on the event loop: a non-blocking timerfd that knows whether it is
//! armed.
//!
//! Non-blocking because a device may disarm its timer while the loop still holds an
//! event for it from the same `epoll_wait` batch; a blocking read of the now-empty fd
//! would then stall the VM's whole event loop forever.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

pub struct DeviceTimer {
    fd: TimerFd,
    /// Disarmed, or armed once or periodically (only `timerfd_settime` and `read` are
    /// ever called: the event loop's seccomp filter allows nothing else on it).
    armed: Armed,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Armed {
    No,
    Once,
    Periodic,
}

impl DeviceTimer {
    /// A disarmed timer.
    pub fn new() -> io::Result<Self> {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        Ok(Self {
            fd,
            armed: Armed::No,
        })
    }

    /// Fires every `period` from now on.
    pub fn arm_periodic(&mut self, period: Duration) -> io::Result<()> {
        self.set(
            Expiration::Interval(TimeSpec::from_duration(period)),
            Armed::Periodic,
        )
    }

    /// Fires once, after `after` (at least 1 ns: a zero would disarm it).
    pub fn arm_once(&mut self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        self.set(
            Expiration::OneShot(TimeSpec::from_duration(after)),
            Armed::Once,
        )
    }

    fn set(&mut self, when: Expiration, armed: Armed) -> io::Result<()> {
        self.fd.set(when, TimerSetTimeFlags::empty())?;
        self.armed = armed;
        Ok(())
    }

    /// Stops it; an expiry not yet read is forgotten.
    pub fn disarm(&mut self) -> io::Result<()> {
        self.fd.unset()?;
        self.armed = Armed::No;
        Ok(())
    }

    pub fn is_armed(&self) -> bool {
        self.armed != Armed::No
    }

    /// Consumes the expiries since the last call; false if there were none (disarmed or
    /// re-armed since the event was reported). A one-shot timer that fired is disarmed.
    pub fn take_expiry(&mut self) -> bool {
        let fired = self.fd.wait().is_ok();
        if fired && self.armed == Armed::Once {
            self.armed = Armed::No;
        }
        fired
    }
}

impl AsRawFd for DeviceTimer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_fd().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_a_disarmed_timer_does_not_block() {
        let mut t = DeviceTimer::new().unwrap();
        assert!(!t.take_expiry(), "never armed");
        t.arm_periodic(Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        // Disarmed after it fired, before its expiry is read: the case that used to hang.
        t.disarm().unwrap();
        assert!(!t.take_expiry());
        assert!(!t.is_armed());
    }

    #[test]
    fn a_one_shot_fires_once_and_disarms() {
        let mut t = DeviceTimer::new().unwrap();
        t.arm_once(Duration::ZERO).unwrap();
        assert!(t.is_armed());
        std::thread::sleep(Duration::from_millis(5));
        assert!(t.take_expiry());
        assert!(!t.is_armed());
        assert!(!t.take_expiry());
    }

    #[test]
    fn a_periodic_timer_stays_armed() {
        let mut t = DeviceTimer::new().unwrap();
        t.arm_periodic(Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(t.take_expiry());
        assert!(t.is_armed());
    }
}
