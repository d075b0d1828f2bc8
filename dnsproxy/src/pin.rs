//! The seam between the proxy and the firewall: something that pins
//! (address, port) pairs into one sandbox's sets.
//!
//! Each sandbox's resolver holds its own pinner, bound to that sandbox when it
//! was created; nothing in a query can choose which sandbox's sets a pin goes
//! into.

use std::net::IpAddr;
use std::time::Duration;

/// Pins answer addresses into one sandbox's firewall sets.
pub trait Pinner: Send + Sync + 'static {
    /// Pins every pair for `ttl`, all or nothing, and returns only once the
    /// pins are in force (the answer is sent after this returns).
    fn pin(&self, pins: &[(IpAddr, u16)], ttl: Duration) -> Result<(), PinError>;
}

/// Pinning failed; the query gets SERVFAIL.
#[derive(Debug, thiserror::Error)]
#[error("pinning {count} address/port pairs failed: {reason}")]
pub struct PinError {
    pub count: usize,
    pub reason: String,
}
