//! A fake pinner that records pins and fails on demand. It stands in for the
//! firewall where a test is about the proxy's decisions, and is the only way
//! to make pinning fail deterministically (the "pin failure gives SERVFAIL"
//! test).

#![allow(dead_code)]

use cleave_dnsproxy::{PinError, Pinner};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
pub struct RecordingPinner {
    pub pins: Mutex<Vec<(IpAddr, u16, Duration)>>,
    pub fail: AtomicBool,
}

impl RecordingPinner {
    pub fn pinned(&self) -> Vec<(IpAddr, u16, Duration)> {
        self.pins.lock().unwrap().clone()
    }

    pub fn pinned_addrs(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.pinned().iter().map(|p| p.0).collect();
        v.sort();
        v.dedup();
        v
    }
}

impl Pinner for RecordingPinner {
    fn pin(&self, pins: &[(IpAddr, u16)], ttl: Duration) -> Result<(), PinError> {
        if self.fail.load(Relaxed) {
            return Err(PinError {
                count: pins.len(),
                reason: "test pinner told to fail".into(),
            });
        }
        self.pins
            .lock()
            .unwrap()
            .extend(pins.iter().map(|&(a, p)| (a, p, ttl)));
        Ok(())
    }
}
