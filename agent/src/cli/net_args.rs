//! The network flags `cleave run` shares with sandbox creation: the egress policy, where
//! DNS goes upstream, and the uplink. Everything is parsed and checked before anything
//! starts; an empty policy means no network at all.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use clap::Args;

use crate::net::{EgressPolicy, NetNode, NetOptions};

#[derive(Args, Debug, Clone, Default)]
pub struct NetArgs {
    /// Let the sandbox resolve NAME and reach its addresses on these ports (80 and 443
    /// when none are given). NAME is exact (`api.example.com`) or `*.suffix`. Repeatable.
    #[arg(long = "allow", value_name = "NAME[:PORT[,PORT...]]")]
    allow: Vec<String>,
    /// Let the sandbox reach CIDR without DNS (every port when none are given).
    /// Repeatable.
    #[arg(long = "allow-cidr", value_name = "CIDR[:PORT[,PORT...]]")]
    allow_cidr: Vec<String>,
    /// The resolver the sandbox's DNS proxy asks [default: the host's /etc/resolv.conf].
    #[arg(long, value_name = "ADDR[:PORT]", value_parser = parse_upstream)]
    dns_upstream: Option<SocketAddr>,
    /// The interface sandbox egress is masqueraded out of [default: the default route's].
    #[arg(long, value_name = "IFACE")]
    uplink: Option<String>,
}

/// `192.0.2.53`, `192.0.2.53:5353`, `2001:db8::53` or `[2001:db8::53]:5353`.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| {
            format!("{s:?} is not ADDR or ADDR:PORT (e.g. 192.0.2.53 or [2001:db8::53]:53)")
        })
}

impl NetArgs {
    /// The policy, checked whole.
    pub fn policy(&self) -> anyhow::Result<EgressPolicy> {
        EgressPolicy::parse(&self.allow, &self.allow_cidr)
            .context("refusing the network policy; nothing was started")
    }

    /// The node's networking, when `policy` asks for any.
    pub fn node(&self, policy: &EgressPolicy) -> anyhow::Result<Option<NetNode>> {
        let Some(options) = self.options(policy)? else {
            return Ok(None);
        };
        NetNode::open(options)
            .map(Some)
            .context("setting up sandbox networking")
    }

    /// How to set the node's networking up, when `policy` asks for any.
    pub fn options(&self, policy: &EgressPolicy) -> anyhow::Result<Option<NetOptions>> {
        if policy.is_empty() {
            if self.dns_upstream.is_some() || self.uplink.is_some() {
                anyhow::bail!(
                    "--dns-upstream and --uplink need a policy: add --allow NAME or \
                     --allow-cidr CIDR (without one the sandbox has no network at all)"
                );
            }
            return Ok(None);
        }
        Ok(Some(NetOptions {
            uplink: self.uplink.clone(),
            dns_upstream: self.dns_upstream.into_iter().collect(),
            ..NetOptions::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_parse_with_and_without_ports() {
        assert_eq!(parse_upstream("192.0.2.53").unwrap().port(), 53);
        assert_eq!(parse_upstream("192.0.2.53:5353").unwrap().port(), 5353);
        assert_eq!(parse_upstream("2001:db8::53").unwrap().port(), 53);
        assert_eq!(parse_upstream("[2001:db8::53]:54").unwrap().port(), 54);
        assert!(parse_upstream("resolver.example").is_err());
    }
}
