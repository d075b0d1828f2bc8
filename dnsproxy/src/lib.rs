//! cleave's per-sandbox DNS proxy.
//!
//! A guest resolves only names its policy lists; the proxy asks upstream,
//! drops every answer address that is not globally reachable (the
//! [`pin_filter`]), pins the rest into that sandbox's firewall sets and only
//! then answers. See docs/ARCHITECTURE.md (dnsproxy) for how a query flows.
//!
//! Layout, after hickory's split of protocol, serving and deciding:
//! - [`pin_filter`]: the pure decision on one address;
//! - [`policy`]: a sandbox's names, CIDRs, NAT64 prefixes, strict mode;
//! - [`query`]: parsing guest bytes (the one place);
//! - [`upstream`] and [`answer`]: asking upstream, following CNAMEs;
//! - [`handler`]: decide, pin, answer; [`cache`] and [`pin`] serve it
//!   ([`firewall_pin`] pins into nftables through `cleave-netfilter`);
//! - [`server`]: per-sandbox UDP and TCP listeners, rate limit;
//! - [`proxy`]: the node-wide object that creates sandbox resolvers.

pub mod answer;
pub mod cache;
pub mod firewall_pin;
pub mod handler;
pub mod pin;
pub mod pin_filter;
pub mod policy;
pub mod proxy;
pub mod query;
pub mod rate;
pub mod server;
pub mod stats;
pub mod upstream;

pub use firewall_pin::FirewallPinner;
pub use handler::{SandboxHandler, Transport, TtlBounds};
pub use pin::{PinError, Pinner};
pub use pin_filter::{Decision, PinFilter};
pub use policy::{Policy, PolicyError, PolicySpec};
pub use proxy::{DnsProxy, ProxyConfig, ProxyError};
pub use server::{Limits, SandboxNet, SandboxServer};
pub use stats::StatsSnapshot;
pub use upstream::UpstreamConfig;
