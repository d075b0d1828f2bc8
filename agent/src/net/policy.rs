//! A sandbox's egress policy as a user writes it, checked whole before anything starts.
//!
//! - `--allow NAME[:PORT[,PORT…]]`: `NAME` exact or `*.suffix`; resolvable through the
//!   sandbox's DNS proxy, and each answer address pinned for these ports (80 and 443 when
//!   none are given).
//! - `--allow-cidr CIDR[:PORT[,PORT…]]`: reachable without DNS (all ports when none are
//!   given); DNS answers inside it may be pinned even when not globally reachable.
//!
//! No entry at all means no egress: the sandbox gets no network.

use cleave_dnsproxy::policy::{Policy, PolicySpec};
use cleave_netfilter::{check_allow, AllowRule, PortRange, MAX_ALLOW_RULES};
use ipnet::IpNet;

/// Most `--allow` names one sandbox may carry.
pub const MAX_NAMES: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("--allow {entry:?}: {why}")]
    Name { entry: String, why: String },
    #[error("--allow-cidr {entry:?}: {why}")]
    Cidr { entry: String, why: String },
    #[error("{0} --allow entries; at most {MAX_NAMES}")]
    TooManyNames(usize),
    #[error("the --allow-cidr entries make {0} rules; at most {MAX_ALLOW_RULES}")]
    TooManyRules(usize),
    #[error("--allow-cidr: {0}")]
    Overlap(String),
}

/// A validated egress policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// For the DNS proxy (names as written, CIDRs it may pin inside).
    pub dns: PolicySpec,
    /// For the firewall: destinations reachable without DNS.
    pub cidrs: Vec<AllowRule>,
}

fn parse_ports(list: &str) -> Result<Vec<PortRange>, String> {
    list.split(',')
        .map(|p| {
            let p = p.trim();
            let (a, b) = p.split_once('-').unwrap_or((p, p));
            let (a, b) = (a.parse::<u16>(), b.parse::<u16>());
            match (a, b) {
                (Ok(a), Ok(b)) => PortRange::new(a, b).map_err(|e| e.to_string()),
                _ => Err(format!(
                    "port {p:?} is not a number from 1 to 65535 (or a range a-b)"
                )),
            }
        })
        .collect()
}

impl EgressPolicy {
    /// Parses and validates every entry; the error names the first bad one and why.
    pub fn parse(names: &[String], cidrs: &[String]) -> Result<Self, PolicyError> {
        if names.len() > MAX_NAMES {
            return Err(PolicyError::TooManyNames(names.len()));
        }
        let mut rules = Vec::new();
        let mut pin_cidrs = Vec::new();
        for entry in cidrs {
            let bad = |why: String| PolicyError::Cidr {
                entry: entry.clone(),
                why,
            };
            // An IPv6 CIDR has colons of its own: ports follow the prefix length.
            let (net, ports) = match entry.split_once('/') {
                Some((addr, rest)) => match rest.split_once(':') {
                    Some((len, ports)) => (format!("{addr}/{len}"), Some(ports)),
                    None => (entry.clone(), None),
                },
                None => {
                    return Err(bad(
                        "not a CIDR (write ADDRESS/PREFIX, e.g. 192.0.2.0/24)".into()
                    ))
                }
            };
            let net: IpNet = net
                .parse()
                .map_err(|_| bad(format!("{net:?} is not a CIDR")))?;
            if net.prefix_len() == 0 {
                return Err(bad(
                    "a /0 would allow every destination; name the networks you need".into(),
                ));
            }
            match ports {
                None => rules.push(AllowRule::new(net, None)),
                Some(list) => {
                    for r in parse_ports(list).map_err(bad)? {
                        rules.push(AllowRule::new(net, Some(r)));
                    }
                }
            }
            pin_cidrs.push(net.trunc().to_string());
        }
        if rules.len() > MAX_ALLOW_RULES {
            return Err(PolicyError::TooManyRules(rules.len()));
        }
        // The firewall keeps the CIDRs as interval elements, which must not overlap.
        check_allow(&rules).map_err(|e| PolicyError::Overlap(e.to_string()))?;
        let dns = PolicySpec {
            names: names.to_vec(),
            allow_cidrs: pin_cidrs,
            nat64_prefixes: Vec::new(),
            strict: false,
        };
        // The proxy's own parser is the judge of names; run it now so a bad entry stops
        // the command before anything is created.
        if let Err(e) = Policy::load(&dns) {
            let entry = names
                .iter()
                .find(|n| {
                    Policy::load(&PolicySpec {
                        names: vec![(*n).clone()],
                        ..PolicySpec::default()
                    })
                    .is_err()
                })
                .cloned()
                .unwrap_or_default();
            return Err(PolicyError::Name {
                entry,
                why: e.to_string(),
            });
        }
        Ok(EgressPolicy { dns, cidrs: rules })
    }

    /// No names and no CIDRs: the sandbox gets no network at all.
    pub fn is_empty(&self) -> bool {
        self.dns.names.is_empty() && self.cidrs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn good_entries_parse() {
        let p = EgressPolicy::parse(
            &s(&["example.com", "*.example.org:443", "git.example.net:22,443"]),
            &s(&[
                "192.0.2.0/24:80,8000-8080",
                "2001:db8::/32",
                "198.51.100.7/32",
            ]),
        )
        .unwrap();
        assert_eq!(p.dns.names.len(), 3);
        assert_eq!(p.cidrs.len(), 4);
        assert_eq!(p.cidrs[1].ports().unwrap().last(), 8080);
        assert!(p.cidrs[2].ports().is_none());
        assert!(!p.is_empty());
        assert!(EgressPolicy::parse(&[], &[]).unwrap().is_empty());
    }

    #[test]
    fn bad_entries_are_named_with_the_reason() {
        for (names, cidrs, needle) in [
            (s(&["exa mple.com"]), vec![], "exa mple.com"),
            (s(&["example.com:0"]), vec![], "port"),
            (s(&["*example.com"]), vec![], "wildcard"),
            (vec![], s(&["10.0.0.0"]), "not a CIDR"),
            (vec![], s(&["10.0.0.0/33"]), "is not a CIDR"),
            (vec![], s(&["0.0.0.0/0"]), "/0"),
            (vec![], s(&["10.0.0.0/8:http"]), "port"),
            (vec![], s(&["10.0.0.0/8:90-80"]), "first <= last"),
            (vec![], s(&["10.0.0.0/8", "10.1.0.0/16:443"]), "overlap"),
        ] {
            let e = EgressPolicy::parse(&names, &cidrs).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should mention {needle}");
        }
    }
}
