//! The node-wide half of sandbox networking: one firewall handle, one DNS proxy (with the
//! tokio runtime its listeners run on), the address range, the uplink and the slot locks.
//! One per process that creates sandboxes (the daemon, or `cleave run`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use cleave_dnsproxy::{DnsProxy, ProxyConfig};
use cleave_netfilter::{Firewall, NetfilterError, SandboxId};

use super::addressing::NodeRange;
use super::lease;
use super::pool::SlotPool;
use super::slot::{Slot, SlotError};
use super::uplink;
use crate::vmm::runtime_dir::RuntimeDir;

/// How a node's sandbox networking is set up.
#[derive(Debug, Clone)]
pub struct NetOptions {
    pub range: NodeRange,
    /// Where masqueraded egress leaves; `None`: the default route's interface.
    pub uplink: Option<String>,
    /// Upstream resolvers; empty: the host's `/etc/resolv.conf`.
    pub dns_upstream: Vec<SocketAddr>,
    /// Where slot locks live (default `<runtime dir>/net`).
    pub lock_dir: PathBuf,
    /// Slots kept ready (built ahead, reused after release); 0 builds each on demand.
    pub pool: usize,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            range: NodeRange::default(),
            uplink: None,
            dns_upstream: Vec::new(),
            lock_dir: RuntimeDir::base().join("net"),
            pool: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("opening the nftables table: {0}")]
    Firewall(#[from] NetfilterError),
    #[error(
        "no DNS upstream: pass --dns-upstream ADDR[:PORT], or list a nameserver in \
         /etc/resolv.conf"
    )]
    NoUpstream,
    #[error("starting the DNS proxy's runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Forwarding(#[from] uplink::ForwardingError),
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
}

/// Nameservers listed in resolv.conf text, on port 53.
pub fn resolv_conf_upstreams(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next())
                .flatten()
                .and_then(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The node's sandbox networking.
pub struct NetNode {
    pub(super) options: NetOptions,
    pub(super) uplink: Option<String>,
    pub(super) firewall: Arc<Firewall>,
    pub(super) dns: DnsProxy,
    pub(super) runtime: tokio::runtime::Runtime,
    /// Where the next slot claim starts probing (just past the last one claimed).
    pub(super) next_slot: std::sync::atomic::AtomicU32,
    pub(super) pool: Arc<SlotPool>,
}

impl NetNode {
    /// Opens the firewall (creating the table), removes what dead sandboxes left, turns
    /// forwarding on, and starts the DNS proxy's runtime.
    pub fn open(options: NetOptions) -> Result<NetNode, NodeError> {
        let upstreams = if options.dns_upstream.is_empty() {
            let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            resolv_conf_upstreams(&text)
        } else {
            options.dns_upstream.clone()
        };
        if upstreams.is_empty() {
            return Err(NodeError::NoUpstream);
        }
        let firewall = Arc::new(Firewall::open()?);
        let uplink = options.uplink.clone().or_else(uplink::detect);
        if uplink.is_none() {
            tracing::warn!(
                "no default route and no --uplink: sandbox egress is not masqueraded and \
                 reaches only what this host routes to directly"
            );
        }
        uplink::ensure_forwarding()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cleave-dns")
            .enable_all()
            .build()
            .map_err(NodeError::Runtime)?;
        let pool = options.pool;
        let node = NetNode {
            dns: DnsProxy::new(ProxyConfig::with_upstreams(upstreams)),
            options,
            uplink,
            firewall,
            runtime,
            next_slot: std::sync::atomic::AtomicU32::new(0),
            pool: Arc::new(SlotPool::new(pool)),
        };
        node.reconcile()?;
        Ok(node)
    }

    /// Builds slots until the pool is full; returns how many were built.
    pub fn fill_pool(&self) -> Result<usize, SlotError> {
        self.pool.fill(|| Slot::build(self))
    }

    /// Slots ready in the pool now.
    pub fn pool_depth(&self) -> usize {
        self.pool.depth()
    }

    /// Removes the chains and sets of every sandbox whose slot nobody alive holds (its
    /// process crashed); taps went with their last fd.
    pub fn reconcile(&self) -> Result<usize, NodeError> {
        let mut live: Vec<SandboxId> = Vec::new();
        for (id, tap) in self.firewall.list()? {
            let held = match NodeRange::index_of_tap(tap.as_str()) {
                Some(i) => lease::is_held(&self.options.lock_dir, i)?,
                None => false,
            };
            if held {
                live.push(id);
            }
        }
        let removed = self.firewall.reconcile(&live)?;
        for l in &removed {
            // A dead holder could not forget its flows: a reused index must not inherit them.
            if let Some(addrs) =
                NodeRange::index_of_tap(l.tap.as_str()).and_then(|i| self.options.range.slot(i))
            {
                super::slot::forget_flows(&addrs);
            }
            tracing::info!(
                sandbox = ?l.sandbox.as_ref().map(|s| s.to_string()),
                tap = %l.tap,
                "removed a dead sandbox's firewall objects"
            );
        }
        Ok(removed.len())
    }

    pub fn uplink(&self) -> Option<&str> {
        self.uplink.as_deref()
    }

    pub fn range(&self) -> &NodeRange {
        &self.options.range
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_come_from_resolv_conf() {
        let t = "# comment\nnameserver 192.0.2.53\nsearch example.com\nnameserver fe80::1%eth0\nnameserver bogus\n";
        assert_eq!(
            resolv_conf_upstreams(t),
            vec![
                "192.0.2.53:53".parse::<SocketAddr>().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
