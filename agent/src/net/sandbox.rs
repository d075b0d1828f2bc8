//! One sandbox's network: a slot (from the pool, or built now), its policy put in as set
//! elements, and its DNS proxy listener. Built whole or not at all. Dropping it stops the
//! listener and returns the slot to the pool reset (policy and pins flushed, flows
//! forgotten) — or removes it whole when the pool is full or the reset failed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_dnsproxy::{FirewallPinner, ProxyError, SandboxServer};
use cleave_guest::protocol::{Ipv4Iface, Ipv6Iface, NetworkConfig};
use cleave_netfilter::{InvalidInput, NetfilterError, SandboxId};

use super::addressing::{SlotAddrs, PREFIX4, PREFIX6};
use super::node::NetNode;
use super::policy::EgressPolicy;
use super::pool::SlotPool;
use super::slot::{Slot, SlotError, SlotTimings};
use crate::devices::virtio::net::{Tap, GUEST_MAC};

#[derive(Debug, thiserror::Error)]
pub enum SandboxNetError {
    #[error("the sandbox id: {0}")]
    Id(InvalidInput),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error("putting the sandbox's policy in: {0}")]
    Policy(NetfilterError),
    #[error("starting the sandbox's DNS proxy: {0}")]
    Dns(#[from] ProxyError),
}

/// Where building one sandbox's network went, step by step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildTimings {
    /// The slot, when none was ready in the pool (zero when one was).
    pub slot: Option<SlotTimings>,
    /// Taking a ready slot, or building one.
    pub claim: Duration,
    /// The policy's set elements.
    pub policy: Duration,
    pub dns: Duration,
}

/// A sandbox's network.
pub struct SandboxNetwork {
    // Drop order: the DNS listener first (in `Drop`), then the slot goes back or away.
    dns: Option<SandboxServer>,
    id: SandboxId,
    slot: Option<Slot>,
    pool: Arc<SlotPool>,
    /// Where the DNS listener runs: its shutdown is awaited there on release.
    runtime: tokio::runtime::Handle,
    timings: BuildTimings,
}

impl SandboxNetwork {
    /// Builds the sandbox `id`'s network for `policy` (which must not be empty: a sandbox
    /// without policy gets no network at all).
    pub fn create(
        node: &NetNode,
        id: &str,
        policy: &EgressPolicy,
    ) -> Result<SandboxNetwork, SandboxNetError> {
        let id = SandboxId::new(id).map_err(SandboxNetError::Id)?;
        let mut tm = BuildTimings::default();
        let t = Instant::now();
        let slot = match node.pool.take() {
            Some(s) => s,
            None => {
                let s = Slot::build(node)?;
                tm.slot = Some(s.timings());
                s
            }
        };
        tm.claim = t.elapsed();
        let mut net = SandboxNetwork {
            dns: None,
            id,
            slot: Some(slot),
            pool: node.pool.clone(),
            runtime: node.runtime.handle().clone(),
            timings: BuildTimings::default(),
        };
        let t = Instant::now();
        let slot = net.slot();
        slot.firewall()
            .set_policy(slot.owner(), &policy.cidrs)
            .map_err(SandboxNetError::Policy)?;
        tm.policy = t.elapsed();
        let t = Instant::now();
        net.start_dns(node, policy)?;
        tm.dns = t.elapsed();
        net.timings = tm;
        tracing::info!(
            sandbox = %net.id,
            tap = %net.addrs().tap,
            guest = %net.addrs().guest4,
            "sandbox network up"
        );
        Ok(net)
    }

    fn slot(&self) -> &Slot {
        self.slot.as_ref().expect("the slot is only taken on drop")
    }

    fn start_dns(&mut self, node: &NetNode, policy: &EgressPolicy) -> Result<(), SandboxNetError> {
        let slot = self.slot();
        let a = slot.addrs();
        let listen = cleave_dnsproxy::server::SandboxNet {
            listen: SocketAddr::new(IpAddr::V4(a.host4), 53),
            guest: vec![IpAddr::V4(a.guest4), IpAddr::V6(a.guest6)],
            device: Some(a.tap.clone()),
        };
        // Pins go into this slot's sets (the nftables owner is the slot).
        let pinner = Arc::new(FirewallPinner::new(
            slot.firewall().clone(),
            slot.owner().clone(),
        ));
        let server = node.runtime.block_on(node.dns.add_sandbox(
            self.id.as_str(),
            &policy.dns,
            &listen,
            pinner,
        ))?;
        self.dns = Some(server);
        Ok(())
    }

    /// The tap the sandbox's NIC is to use.
    /// What its DNS proxy has done so far.
    pub fn dns_stats(&self) -> Option<cleave_dnsproxy::StatsSnapshot> {
        self.dns.as_ref().map(|d| d.handler().stats().snapshot())
    }

    pub fn tap(&self) -> &Tap {
        self.slot().tap()
    }

    pub fn addrs(&self) -> &SlotAddrs {
        self.slot().addrs()
    }

    /// Where building it went.
    pub fn timings(&self) -> BuildTimings {
        self.timings
    }

    /// What the guest is told after its gate: its addresses, gateway and resolver.
    pub fn guest_config(&self) -> NetworkConfig {
        let a = self.addrs();
        NetworkConfig {
            mac: GUEST_MAC,
            ipv4: Ipv4Iface {
                addr: a.guest4,
                prefix: PREFIX4,
                gateway: a.host4,
            },
            ipv6: Some(Ipv6Iface {
                addr: a.guest6,
                prefix: PREFIX6,
                gateway: a.host6,
            }),
            nameservers: vec![IpAddr::V4(a.host4)],
        }
    }
}

impl Drop for SandboxNetwork {
    fn drop(&mut self) {
        if let Some(dns) = self.dns.take() {
            // Wait until its sockets are closed, so the slot's next sandbox can bind the
            // same address at once. On a runtime thread a plain drop is all we may do (it
            // stops the listener a moment later).
            if tokio::runtime::Handle::try_current().is_err() {
                self.runtime.block_on(dns.shutdown());
            }
        }
        let Some(mut slot) = self.slot.take() else {
            return;
        };
        match slot.reset() {
            Ok(()) => {
                // A full pool drops the slot: chains, tap and index go.
                let _ = self.pool.put(slot);
            }
            Err(e) => {
                tracing::error!(sandbox = %self.id, error = %e, "resetting a slot; removing it instead");
                drop(slot);
            }
        }
        tracing::debug!(sandbox = %self.id, "sandbox network down");
    }
}
