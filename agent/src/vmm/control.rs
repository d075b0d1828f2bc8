//! What the vCPU threads and the host share while a VM runs: the first reason it ended,
//! a stop flag every vCPU checks before re-entering the guest, and exit counters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::GuestEnd;

/// Exit counters per kind (metrics, and what the ioctl-level tests observe).
#[derive(Debug, Default)]
pub struct ExitStats {
    io_in: AtomicU64,
    io_out: AtomicU64,
    mmio_read: AtomicU64,
    mmio_write: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitCounts {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
}

impl ExitStats {
    pub fn count_io_in(&self) {
        self.io_in.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_io_out(&self) {
        self.io_out.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_mmio_read(&self) {
        self.mmio_read.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_mmio_write(&self) {
        self.mmio_write.fetch_add(1, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> ExitCounts {
        ExitCounts {
            io_in: self.io_in.load(Ordering::Relaxed),
            io_out: self.io_out.load(Ordering::Relaxed),
            mmio_read: self.mmio_read.load(Ordering::Relaxed),
            mmio_write: self.mmio_write.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Default)]
pub struct RunControl {
    stopping: AtomicBool,
    end: Mutex<Option<GuestEnd>>,
    ended: Condvar,
    /// Written when the guest's side ends the run (see [`GuestEnd::by_guest`]).
    on_guest_end: Mutex<Vec<EventFd>>,
    pub stats: ExitStats,
}

impl RunControl {
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Records why the VM ended (the first reason wins) and tells every vCPU to stop.
    /// When the guest's side ended it, every [`wake_on_guest_end`](Self::wake_on_guest_end)
    /// eventfd is written: the device event loop is not a vCPU and would not know.
    pub fn end(&self, why: GuestEnd) {
        let mut end = crate::sync::lock(&self.end);
        let by_guest = why.by_guest();
        if end.is_none() {
            tracing::debug!(end = %why, "guest ended");
            *end = Some(why);
        }
        self.stopping.store(true, Ordering::Release);
        self.ended.notify_all();
        if by_guest {
            for evt in crate::sync::lock(&self.on_guest_end).iter() {
                let _ = evt.write(1);
            }
        }
    }

    /// Has `evt` written when the guest's side ends the run (a reset, crash or VMM
    /// failure, not a host's stop), at once if it already has.
    pub fn wake_on_guest_end(&self, evt: EventFd) {
        let end = crate::sync::lock(&self.end);
        if end.as_ref().is_some_and(GuestEnd::by_guest) {
            let _ = evt.write(1);
        }
        crate::sync::lock(&self.on_guest_end).push(evt);
    }

    /// Waits until the VM ended or `timeout` passed.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<GuestEnd> {
        let end = crate::sync::lock(&self.end);
        let end = match timeout {
            Some(t) => {
                self.ended
                    .wait_timeout_while(end, t, |e| e.is_none())
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => self
                .ended
                .wait_while(end, |e| e.is_none())
                .unwrap_or_else(|e| e.into_inner()),
        };
        end.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_end_wins_and_stops() {
        let c = RunControl::default();
        assert!(!c.is_stopping());
        assert_eq!(c.wait(Some(Duration::from_millis(1))), None);
        c.end(GuestEnd::Reset);
        c.end(GuestEnd::TripleFault);
        assert!(c.is_stopping());
        assert_eq!(c.wait(None), Some(GuestEnd::Reset));
    }

    fn written(e: &EventFd) -> bool {
        e.read().is_ok()
    }

    fn nonblocking() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    #[test]
    fn the_guests_end_wakes_its_listeners_and_a_hosts_stop_does_not() {
        let c = RunControl::default();
        let early = nonblocking();
        c.wake_on_guest_end(early.try_clone().unwrap());
        assert!(!written(&early), "nothing ended yet");
        c.end(GuestEnd::Stopped);
        assert!(!written(&early), "a host's stop is not the guest's end");

        let c = RunControl::default();
        let early = nonblocking();
        c.wake_on_guest_end(early.try_clone().unwrap());
        c.end(GuestEnd::TripleFault);
        assert!(written(&early));
        let late = nonblocking();
        c.wake_on_guest_end(late.try_clone().unwrap());
        assert!(written(&late), "registered after the end: written at once");
    }
}
