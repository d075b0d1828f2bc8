//! Credit-based flow control for one data stream.
//!
//! The sending side holds a [`SendWindow`]: it takes credit before sending
//! and blocks when there is none. The receiving side holds a
//! [`RecvWindow`]: it checks each arriving chunk against the credit it has
//! given out and tells the caller when to return credit.

use std::sync::{Condvar, Mutex};

use super::INITIAL_WINDOW;

/// Credit the sender may still use.
pub struct SendWindow {
    state: Mutex<SendState>,
    changed: Condvar,
}

struct SendState {
    available: u64,
    closed: bool,
}

impl Default for SendWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl SendWindow {
    /// A window holding the initial credit.
    pub fn new() -> Self {
        SendWindow {
            state: Mutex::new(SendState {
                available: u64::from(INITIAL_WINDOW),
                closed: false,
            }),
            changed: Condvar::new(),
        }
    }

    /// Waits for credit and takes up to `max` bytes of it. `None` once the
    /// window is closed (request over or connection gone).
    pub fn take(&self, max: usize) -> Option<usize> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if s.closed {
                return None;
            }
            if s.available > 0 {
                let n = s.available.min(max as u64);
                s.available -= n;
                return Some(n as usize);
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The receiver returned `n` bytes of credit.
    pub fn grant(&self, n: u32) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.available = s.available.saturating_add(u64::from(n));
        self.changed.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed
    }

    /// Wakes and fails every waiter, now and later.
    pub fn close(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.closed = true;
        self.changed.notify_all();
    }
}

/// Credit the receiver has given out and not yet seen used.
#[derive(Debug)]
pub struct RecvWindow {
    outstanding: u64,
    consumed: u64,
}

impl Default for RecvWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvWindow {
    pub fn new() -> Self {
        RecvWindow {
            outstanding: u64::from(INITIAL_WINDOW),
            consumed: 0,
        }
    }

    /// Accounts for `n` arriving bytes; false when the sender had no credit
    /// for them (a protocol violation).
    pub fn receive(&mut self, n: usize) -> bool {
        match self.outstanding.checked_sub(n as u64) {
            Some(left) => {
                self.outstanding = left;
                true
            }
            None => false,
        }
    }

    /// The consumer used `n` bytes. Returns the credit to send back, batched
    /// so that small reads do not each cost a frame.
    pub fn consume(&mut self, n: usize) -> Option<u32> {
        self.consumed += n as u64;
        if self.consumed >= u64::from(INITIAL_WINDOW / 4) {
            let c = u32::try_from(self.consumed).unwrap_or(u32::MAX);
            self.consumed -= u64::from(c);
            self.outstanding += u64::from(c);
            Some(c)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_beyond_credit_is_refused() {
        let mut w = RecvWindow::new();
        assert!(w.receive(INITIAL_WINDOW as usize));
        assert!(!w.receive(1));
    }

    #[test]
    fn consuming_the_window_returns_credit() {
        let mut w = RecvWindow::new();
        assert!(w.receive(INITIAL_WINDOW as usize));
        let mut returned = 0u64;
        for _ in 0..(INITIAL_WINDOW / 1024) {
            returned += u64::from(w.consume(1024).unwrap_or(0));
        }
        assert_eq!(returned, u64::from(INITIAL_WINDOW));
        assert!(w.receive(INITIAL_WINDOW as usize));
    }

    #[test]
    fn send_window_blocks_until_granted_and_fails_when_closed() {
        let w = std::sync::Arc::new(SendWindow::new());
        assert_eq!(w.take(usize::MAX), Some(INITIAL_WINDOW as usize));
        let w2 = w.clone();
        let t = std::thread::spawn(move || w2.take(10));
        w.grant(4);
        assert_eq!(t.join().unwrap(), Some(4));
        w.close();
        assert_eq!(w.take(1), None);
    }
}
