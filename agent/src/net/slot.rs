//! A network slot: everything a sandbox's network has that does not depend on its policy —
//! a claimed slot index, its tap with the host's addresses, its chains and (empty) sets.
//! Built ahead of time by the pool, so a sandbox only fills in its policy (set elements)
//! and starts its DNS listener. Its nftables objects are owned by `slot-<i>`.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cleave_guest::netconf::{self, InterfacePlan, Link, NetconfError};
use cleave_netfilter::{
    InvalidInput, MacAddr, NetfilterError, SandboxId, SandboxNet, TapName, Uplink,
};

use super::addressing::{SlotAddrs, PREFIX4, PREFIX6};
use super::lease::{self, LeaseError, SlotLease};
use super::node::NetNode;
use crate::devices::virtio::net::tap::TapError;
use crate::devices::virtio::net::{Tap, GUEST_MAC};

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("claiming a network slot: {0}")]
    Lease(#[from] LeaseError),
    #[error("{0}")]
    Tap(#[from] TapError),
    #[error("configuring tap {tap}: {source}")]
    HostSide {
        tap: String,
        source: Box<NetconfError>,
    },
    #[error("the slot's network description: {0}")]
    Describe(InvalidInput),
    #[error("the slot's firewall chains: {0}")]
    Firewall(#[from] NetfilterError),
}

/// Where building a slot went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotTimings {
    pub claim: Duration,
    pub tap: Duration,
    pub chains: Duration,
    pub host_side: Duration,
}

/// A built slot. Dropping it removes its chains, closes its tap (which goes with its last
/// fd) and frees its index.
pub struct Slot {
    // Drop order: chains (in `Drop`), then the tap, then the lock.
    firewall: std::sync::Arc<cleave_netfilter::Firewall>,
    owner: SandboxId,
    chains: bool,
    tap: Tap,
    addrs: SlotAddrs,
    timings: SlotTimings,
    _lease: SlotLease,
}

impl Slot {
    /// Claims a free index and builds its slot: tap, chains before the tap is up (fail
    /// closed), then the host's addresses.
    pub fn build(node: &NetNode) -> Result<Slot, SlotError> {
        let mut tm = SlotTimings::default();
        let mut t = Instant::now();
        let mut lap = |slot: &mut Duration| {
            *slot = t.elapsed();
            t = Instant::now();
        };
        let slots = node.range().slots();
        let start = node.next_slot.load(Ordering::Relaxed);
        let lease = lease::claim(&node.options.lock_dir, slots, start)?;
        node.next_slot
            .store((lease.index() + 1) % slots, Ordering::Relaxed);
        let addrs = node
            .range()
            .slot(lease.index())
            .expect("claim returns an index inside the range");
        let owner = SandboxId::new(format!("slot-{}", addrs.index)).map_err(SlotError::Describe)?;
        lap(&mut tm.claim);
        let tap = Tap::create(&addrs.tap)?;
        lap(&mut tm.tap);
        let mut slot = Slot {
            firewall: node.firewall.clone(),
            owner,
            chains: false,
            tap,
            addrs,
            timings: SlotTimings::default(),
            _lease: lease,
        };
        slot.install_chains(node)?;
        lap(&mut tm.chains);
        let plan = InterfacePlan {
            addresses: vec![
                (IpAddr::V4(slot.addrs.host4), PREFIX4),
                (IpAddr::V6(slot.addrs.host6), PREFIX6),
            ],
            gateways: Vec::new(),
            loopback_up: false,
        };
        netconf::apply(&Link::Name(slot.addrs.tap.clone()), &plan).map_err(|source| {
            SlotError::HostSide {
                tap: slot.addrs.tap.clone(),
                source: Box::new(source),
            }
        })?;
        lap(&mut tm.host_side);
        slot.timings = tm;
        Ok(slot)
    }

    fn install_chains(&mut self, node: &NetNode) -> Result<(), SlotError> {
        let a = &self.addrs;
        let tap = TapName::new(a.tap.clone()).map_err(SlotError::Describe)?;
        let mac = MacAddr::new(GUEST_MAC).map_err(SlotError::Describe)?;
        let mut desc = SandboxNet::new(self.owner.clone(), tap, mac, a.guest4, a.host4)
            .and_then(|n| n.with_ipv6(a.guest6, a.host6))
            .map_err(SlotError::Describe)?;
        if let Some(up) = node.uplink() {
            let uplink = Uplink::new(up).map_err(SlotError::Describe)?;
            desc = desc.with_nat(uplink).map_err(SlotError::Describe)?;
        }
        match self.firewall.apply(&desc) {
            Ok(()) => {}
            // A crashed holder of this index left its chains (and maybe flows): remove
            // them, try once more.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                for (owner, t) in self.firewall.list()? {
                    if t.as_str() == self.addrs.tap {
                        tracing::info!(sandbox = %owner, tap = %t, "removing a dead slot's chains");
                        self.firewall.teardown(&owner)?;
                    }
                }
                forget_flows(&self.addrs);
                self.firewall.apply(&desc)?;
            }
            Err(e) => return Err(e.into()),
        }
        self.chains = true;
        Ok(())
    }

    /// Readies a used slot for the next sandbox: policy and pins flushed, the old guest's
    /// flows forgotten, frames it left queued on the tap read and dropped. On error the
    /// slot must not be reused.
    pub fn reset(&mut self) -> Result<(), NetfilterError> {
        self.firewall.release(&self.owner)?;
        forget_flows(&self.addrs);
        let mut buf = vec![0u8; 65_600];
        // Bounded: a tap queue holds at most txqueuelen frames.
        for _ in 0..10_000 {
            if self.tap.read_frame(&mut buf).is_err() {
                break;
            }
        }
        Ok(())
    }

    pub fn owner(&self) -> &SandboxId {
        &self.owner
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    pub fn addrs(&self) -> &SlotAddrs {
        &self.addrs
    }

    pub fn timings(&self) -> SlotTimings {
        self.timings
    }

    pub fn firewall(&self) -> &std::sync::Arc<cleave_netfilter::Firewall> {
        &self.firewall
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.chains {
            if let Err(e) = self.firewall.teardown(&self.owner) {
                tracing::error!(slot = %self.owner, error = %e, "removing a slot's chains");
            }
        }
        forget_flows(&self.addrs);
    }
}

/// Deletes the conntrack entries of a slot's guest addresses (logged on failure: it
/// happens on release paths that must go on).
pub(super) fn forget_flows(addrs: &SlotAddrs) {
    if let Err(e) = super::conntrack::forget(addrs.guest4.into(), addrs.guest6.into()) {
        tracing::warn!(tap = %addrs.tap, error = %e, "deleting a slot's conntrack entries");
    }
}
