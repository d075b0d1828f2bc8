//! One sandbox's network, built whole or not at all: a slot claimed node-wide, its tap
//! with the host's addresses, its nftables chains and sets (policy CIDRs in, NAT out of
//! the uplink), and its DNS proxy listener. Dropping it takes all of that down again in
//! the reverse order; the tap itself goes with the last fd (ours and the worker's).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_dnsproxy::{FirewallPinner, ProxyError, SandboxServer};
use cleave_guest::netconf::{self, InterfacePlan, Link, NetconfError};
use cleave_guest::protocol::{Ipv4Iface, Ipv6Iface, NetworkConfig};
use cleave_netfilter::{
    InvalidInput, MacAddr, NetfilterError, SandboxId, SandboxNet, TapName, Uplink,
};

use super::addressing::{SlotAddrs, PREFIX4, PREFIX6};
use super::lease::{self, LeaseError, SlotLease};
use super::node::NetNode;
use super::policy::EgressPolicy;
use crate::devices::virtio::net::tap::TapError;
use crate::devices::virtio::net::{Tap, GUEST_MAC};

#[derive(Debug, thiserror::Error)]
pub enum SandboxNetError {
    #[error("claiming a network slot: {0}")]
    Lease(#[from] LeaseError),
    #[error("the sandbox id: {0}")]
    Id(InvalidInput),
    #[error("{0}")]
    Tap(#[from] TapError),
    #[error("configuring tap {tap}: {source}")]
    HostSide {
        tap: String,
        source: Box<NetconfError>,
    },
    #[error("the sandbox's network description: {0}")]
    Describe(InvalidInput),
    #[error("installing the sandbox's firewall chains: {0}")]
    Firewall(#[from] NetfilterError),
    #[error("starting the sandbox's DNS proxy: {0}")]
    Dns(#[from] ProxyError),
}

/// Where building one sandbox's network went, step by step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildTimings {
    pub claim: Duration,
    pub tap: Duration,
    pub chains: Duration,
    pub host_side: Duration,
    pub dns: Duration,
}

/// A sandbox's network; everything in it is removed when it is dropped.
pub struct SandboxNetwork {
    // Drop order matters: the DNS listener, then (in `Drop`) the chains, then the tap and
    // finally the slot lock, so the slot is free only once nothing of it is left.
    dns: Option<SandboxServer>,
    firewall: Arc<cleave_netfilter::Firewall>,
    id: SandboxId,
    chains: bool,
    tap: Tap,
    addrs: SlotAddrs,
    timings: BuildTimings,
    _lease: SlotLease,
}

impl SandboxNetwork {
    /// Claims a slot and builds the sandbox `id`'s network for `policy` (which must not be
    /// empty: a sandbox without policy gets no network at all).
    pub fn create(
        node: &NetNode,
        id: &str,
        policy: &EgressPolicy,
    ) -> Result<SandboxNetwork, SandboxNetError> {
        let sid = SandboxId::new(id).map_err(SandboxNetError::Id)?;
        let mut tm = BuildTimings::default();
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
        lap(&mut tm.claim);
        let tap = Tap::create(&addrs.tap)?;
        lap(&mut tm.tap);
        let mut net = SandboxNetwork {
            dns: None,
            firewall: node.firewall.clone(),
            id: sid,
            chains: false,
            tap,
            addrs,
            timings: BuildTimings::default(),
            _lease: lease,
        };
        // Fail closed: the chains are in place before the tap is up (and long before a
        // guest is attached to it).
        net.install_chains(node, policy)?;
        lap(&mut tm.chains);
        let plan = InterfacePlan {
            addresses: vec![
                (IpAddr::V4(net.addrs.host4), PREFIX4),
                (IpAddr::V6(net.addrs.host6), PREFIX6),
            ],
            gateways: Vec::new(),
            loopback_up: false,
        };
        netconf::apply(&Link::Name(net.addrs.tap.clone()), &plan).map_err(|source| {
            SandboxNetError::HostSide {
                tap: net.addrs.tap.clone(),
                source: Box::new(source),
            }
        })?;
        lap(&mut tm.host_side);
        net.start_dns(node, policy)?;
        lap(&mut tm.dns);
        net.timings = tm;
        tracing::info!(
            sandbox = id,
            tap = %net.addrs.tap,
            guest = %net.addrs.guest4,
            "sandbox network up"
        );
        Ok(net)
    }

    fn install_chains(
        &mut self,
        node: &NetNode,
        policy: &EgressPolicy,
    ) -> Result<(), SandboxNetError> {
        let a = &self.addrs;
        let tap = TapName::new(a.tap.clone()).map_err(SandboxNetError::Describe)?;
        let mac = MacAddr::new(GUEST_MAC).map_err(SandboxNetError::Describe)?;
        let mut desc = SandboxNet::new(self.id.clone(), tap, mac, a.guest4, a.host4)
            .and_then(|n| n.with_ipv6(a.guest6, a.host6))
            .and_then(|n| n.with_allow(policy.cidrs.iter().cloned()))
            .map_err(SandboxNetError::Describe)?;
        if let Some(up) = node.uplink() {
            let uplink = Uplink::new(up).map_err(SandboxNetError::Describe)?;
            desc = desc.with_nat(uplink).map_err(SandboxNetError::Describe)?;
        }
        match self.firewall.apply(&desc) {
            Ok(()) => {}
            // A crashed holder of this slot left its chains: remove them and try once more.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                for (owner, t) in self.firewall.list()? {
                    if t.as_str() == self.addrs.tap {
                        tracing::info!(sandbox = %owner, tap = %t, "removing a dead sandbox's chains from a reused slot");
                        self.firewall.teardown(&owner)?;
                    }
                }
                self.firewall.apply(&desc)?;
            }
            Err(e) => return Err(e.into()),
        }
        self.chains = true;
        Ok(())
    }

    fn start_dns(&mut self, node: &NetNode, policy: &EgressPolicy) -> Result<(), SandboxNetError> {
        let a = &self.addrs;
        let listen = cleave_dnsproxy::server::SandboxNet {
            listen: SocketAddr::new(IpAddr::V4(a.host4), 53),
            guest: vec![IpAddr::V4(a.guest4), IpAddr::V6(a.guest6)],
            device: Some(a.tap.clone()),
        };
        let pinner = Arc::new(FirewallPinner::new(self.firewall.clone(), self.id.clone()));
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
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    pub fn addrs(&self) -> &SlotAddrs {
        &self.addrs
    }

    /// Where building it went.
    pub fn timings(&self) -> BuildTimings {
        self.timings
    }

    /// What the guest is told after its gate: its addresses, gateway and resolver.
    pub fn guest_config(&self) -> NetworkConfig {
        let a = &self.addrs;
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
        drop(self.dns.take());
        if self.chains {
            if let Err(e) = self.firewall.teardown(&self.id) {
                tracing::error!(sandbox = %self.id, error = %e, "removing the sandbox's chains");
            }
        }
        if let Err(e) = super::conntrack::forget(self.addrs.guest4.into(), self.addrs.guest6.into())
        {
            tracing::warn!(sandbox = %self.id, error = %e, "flushing the sandbox's conntrack entries");
        }
        tracing::debug!(sandbox = %self.id, tap = %self.addrs.tap, "sandbox network down");
    }
}
