//! What the vCPU threads and the host share while a VM runs: the first reason it ended,
//! a stop flag every vCPU checks before re-entering the guest, and exit counters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

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
    pub stats: ExitStats,
}

impl RunControl {
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Records why the VM ended (the first reason wins) and tells every vCPU to stop.
    pub fn end(&self, why: GuestEnd) {
        let mut end = self.end.lock().unwrap_or_else(|e| e.into_inner());
        if end.is_none() {
            tracing::debug!(end = %why, "guest ended");
            *end = Some(why);
        }
        self.stopping.store(true, Ordering::Release);
        self.ended.notify_all();
    }

    /// Waits until the VM ended or `timeout` passed.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<GuestEnd> {
        let end = self.end.lock().unwrap_or_else(|e| e.into_inner());
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
}
