//! The production [`Pinner`]: one sandbox's pin sets in nftables, through
//! the `netfilter` crate.

use crate::pin::{PinError, Pinner};
use cleave_netfilter::{Firewall, SandboxId, MAX_PINS_PER_CALL};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Pins into the sets of the one sandbox it was made for.
pub struct FirewallPinner {
    firewall: Arc<Firewall>,
    sandbox: SandboxId,
}

impl FirewallPinner {
    pub fn new(firewall: Arc<Firewall>, sandbox: SandboxId) -> Self {
        Self { firewall, sandbox }
    }
}

impl Pinner for FirewallPinner {
    /// One netlink batch per answer, so all of it is pinned or none of it. An answer
    /// needing more than `MAX_PINS_PER_CALL` pairs is refused whole (the handler's
    /// per-answer caps keep real answers far below it).
    fn pin(&self, pins: &[(IpAddr, u16)], ttl: Duration) -> Result<(), PinError> {
        if pins.len() > MAX_PINS_PER_CALL {
            return Err(PinError {
                count: pins.len(),
                reason: format!("more than {MAX_PINS_PER_CALL} pairs in one answer"),
            });
        }
        self.firewall
            .pin_many(&self.sandbox, pins, ttl)
            .map_err(|e| PinError {
                count: pins.len(),
                reason: e.to_string(),
            })
    }
}
