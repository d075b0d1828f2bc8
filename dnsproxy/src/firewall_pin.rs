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
    /// One netlink batch per answer (answers beyond `MAX_PINS_PER_CALL`
    /// pairs take several; a failure in any fails the answer).
    fn pin(&self, pins: &[(IpAddr, u16)], ttl: Duration) -> Result<(), PinError> {
        for chunk in pins.chunks(MAX_PINS_PER_CALL) {
            self.firewall
                .pin_many(&self.sandbox, chunk, ttl)
                .map_err(|e| PinError {
                    count: pins.len(),
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }
}
