//! A sandbox's egress policy: which names it may resolve (and on which ports
//! their addresses are pinned), which CIDRs it may reach without DNS, its
//! NAT64 prefixes and whether strict mode is on.
//!
//! Parsed once, when the sandbox's proxy is created; every entry is validated
//! and the first invalid one is named in the error. An empty policy allows
//! nothing.

use crate::pin_filter::{Nat64Prefix, Nat64PrefixError, PinFilter};
use ipnet::IpNet;
use std::net::IpAddr;

/// Ports pinned for a name written without `:PORTS`: the web ports. Name
/// other ports explicitly (`git.example.com:22`).
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];
/// Most ports one name may list: with the per-answer address cap this bounds the pins
/// one answer can ask for.
pub const MAX_PORTS: usize = 16;

/// The policy as the operator writes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySpec {
    /// `api.example.com`, `*.example.com`, optionally `:443` or `:80,443`.
    pub names: Vec<String>,
    /// Extra CIDRs allowed for this sandbox (`10.20.0.0/16`, `fd00:1::/64`).
    pub allow_cidrs: Vec<String>,
    /// Operator NAT64 prefixes (RFC 6052 lengths).
    pub nat64_prefixes: Vec<String>,
    /// Block every IPv6 form that carries IPv4.
    pub strict: bool,
}

/// Why a policy entry was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy name {entry:?}: {why}")]
    Name { entry: String, why: NameError },
    #[error("policy CIDR {entry:?}: {why}")]
    Cidr { entry: String, why: String },
    #[error("policy NAT64 prefix: {0}")]
    Nat64(#[from] Nat64PrefixError),
}

/// What is wrong with a name entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("longer than 253 characters")]
    TooLong,
    #[error("label {0:?} is empty or longer than 63 characters")]
    Label(String),
    #[error(
        "label {0:?} has a character other than a-z, 0-9, '-' or '_', or starts or ends with '-'"
    )]
    Character(String),
    #[error("a wildcard must be a whole leading label, as in *.example.com")]
    Wildcard,
    #[error("port {0:?} is not a number from 1 to 65535")]
    Port(String),
    #[error("more than {MAX_PORTS} ports for one name")]
    TooManyPorts,
}

/// How a rule matches names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamePattern {
    /// Exactly this name (lowercase, no trailing dot).
    Exact(String),
    /// Any name with at least one label before `.suffix`; never the bare suffix.
    Subdomains(String),
}

/// One name entry of the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameRule {
    pub pattern: NamePattern,
    /// Ports pinned for answers; never empty (defaults to [`DEFAULT_PORTS`]).
    pub ports: Vec<u16>,
}

impl NameRule {
    fn matches(&self, name: &str) -> bool {
        match &self.pattern {
            NamePattern::Exact(n) => n == name,
            NamePattern::Subdomains(suffix) => {
                name.len() > suffix.len() + 1
                    && name.ends_with(suffix.as_str())
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
            }
        }
    }
}

/// A validated policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub names: Vec<NameRule>,
    pub filter: PinFilter,
}

impl Policy {
    /// Validates `spec`; the error names the first invalid entry and why.
    pub fn load(spec: &PolicySpec) -> Result<Self, PolicyError> {
        let names = spec
            .names
            .iter()
            .map(|e| {
                parse_rule(e).map_err(|why| PolicyError::Name {
                    entry: e.clone(),
                    why,
                })
            })
            .collect::<Result<_, _>>()?;
        let allow = spec
            .allow_cidrs
            .iter()
            .map(|e| parse_cidr(e))
            .collect::<Result<_, _>>()?;
        let nat64 = spec
            .nat64_prefixes
            .iter()
            .map(|e| e.parse::<Nat64Prefix>())
            .collect::<Result<_, _>>()?;
        Ok(Self {
            names,
            filter: PinFilter {
                strict: spec.strict,
                nat64,
                allow,
            },
        })
    }

    /// The ports to pin for `name` (any case, trailing dot or not), or `None`
    /// if no rule allows it. Ports of every matching rule are merged.
    pub fn ports_for(&self, name: &str) -> Option<Vec<u16>> {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        let mut ports: Option<Vec<u16>> = None;
        for rule in self.names.iter().filter(|r| r.matches(&name)) {
            ports.get_or_insert_with(Vec::new).extend(&rule.ports);
        }
        ports.map(|mut p| {
            p.sort_unstable();
            p.dedup();
            p
        })
    }
}

fn parse_rule(entry: &str) -> Result<NameRule, NameError> {
    let entry = entry.trim();
    let (name, ports) = match entry.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (entry, None),
    };
    let ports = match ports {
        None => DEFAULT_PORTS.to_vec(),
        Some(list) => list
            .split(',')
            .map(|p| match p.trim().parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(NameError::Port(p.to_string())),
            })
            .collect::<Result<Vec<u16>, _>>()?,
    };
    if ports.len() > MAX_PORTS {
        return Err(NameError::TooManyPorts);
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let pattern = match name.strip_prefix("*.") {
        Some(suffix) => {
            check_name(suffix)?;
            NamePattern::Subdomains(suffix.to_string())
        }
        None => {
            check_name(&name)?;
            NamePattern::Exact(name)
        }
    };
    Ok(NameRule { pattern, ports })
}

fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > 253 {
        return Err(NameError::TooLong);
    }
    for label in name.split('.') {
        if label.contains('*') {
            return Err(NameError::Wildcard);
        }
        if label.is_empty() || label.len() > 63 {
            return Err(NameError::Label(label.to_string()));
        }
        let ok_chars = label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok_chars || label.starts_with('-') || label.ends_with('-') {
            return Err(NameError::Character(label.to_string()));
        }
    }
    Ok(())
}

fn parse_cidr(entry: &str) -> Result<IpNet, PolicyError> {
    let err = |why: &str| PolicyError::Cidr {
        entry: entry.to_string(),
        why: why.to_string(),
    };
    let s = entry.trim();
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        // A bare address means that one host.
        Err(_) => match s.parse::<IpAddr>() {
            Ok(a) => IpNet::from(a),
            Err(_) => return Err(err("not an address or CIDR like 10.20.0.0/16")),
        },
    };
    if net.trunc() != net {
        return Err(err(&format!(
            "bits set after the prefix length; write {}",
            net.trunc()
        )));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(names: &[&str]) -> Policy {
        Policy::load(&PolicySpec {
            names: names.iter().map(|s| s.to_string()).collect(),
            ..PolicySpec::default()
        })
        .unwrap()
    }

    #[test]
    fn empty_policy_allows_nothing() {
        let p = Policy::load(&PolicySpec::default()).unwrap();
        assert_eq!(p.ports_for("example.com"), None);
        assert_eq!(p.ports_for("."), None);
        assert_eq!(p.ports_for(""), None);
    }

    #[test]
    fn exact_names_ignore_case_and_trailing_dot() {
        let p = policy(&["API.Example.com."]);
        assert_eq!(p.ports_for("api.example.com"), Some(vec![80, 443]));
        assert_eq!(p.ports_for("api.EXAMPLE.com."), Some(vec![80, 443]));
        assert_eq!(p.ports_for("example.com"), None);
        assert_eq!(p.ports_for("x.api.example.com"), None);
        assert_eq!(p.ports_for("api.example.co"), None);
    }

    #[test]
    fn wildcard_needs_a_label_and_never_matches_the_suffix() {
        let p = policy(&["*.example.com:443"]);
        assert_eq!(p.ports_for("a.example.com"), Some(vec![443]));
        assert_eq!(p.ports_for("a.b.example.com."), Some(vec![443]));
        assert_eq!(p.ports_for("example.com"), None);
        assert_eq!(p.ports_for(".example.com"), None);
        assert_eq!(p.ports_for("badexample.com"), None);
    }

    #[test]
    fn ports_of_matching_rules_merge() {
        let p = policy(&[
            "api.example.com:8443",
            "*.example.com:443,8443",
            "other.example.net",
        ]);
        assert_eq!(p.ports_for("api.example.com"), Some(vec![443, 8443]));
        assert_eq!(p.ports_for("www.example.com"), Some(vec![443, 8443]));
        assert_eq!(p.ports_for("other.example.net"), Some(vec![80, 443]));
    }

    #[test]
    fn invalid_entries_are_named() {
        // (names, allow CIDRs, NAT64 prefixes, expected error text)
        type Case<'a> = (&'a [&'a str], &'a [&'a str], &'a [&'a str], &'a str);
        let cases: &[Case] = &[
            (&[""], &[], &[], "policy name \"\": empty name"),
            (&["*"], &[], &[], "wildcard"),
            (&["*."], &[], &[], "wildcard"),
            (&["*.."], &[], &[], "empty name"),
            (&["a.*.com"], &[], &[], "wildcard"),
            (&["*foo.com"], &[], &[], "wildcard"),
            (
                &["ok.example.com", "bad..example.com"],
                &[],
                &[],
                "\"bad..example.com\": label \"\"",
            ),
            (&["-x.example.com"], &[], &[], "label \"-x\""),
            (&["sp ace.example.com"], &[], &[], "label \"sp ace\""),
            (&["api.example.com:0"], &[], &[], "port \"0\""),
            (&["api.example.com:https"], &[], &[], "port \"https\""),
            (&["api.example.com:443,"], &[], &[], "port \"\""),
            (&["api.example.com:70000"], &[], &[], "port \"70000\""),
            (&[&"a".repeat(64)], &[], &[], "longer than 63"),
            (
                &[],
                &["10.0.0.1/8"],
                &[],
                "\"10.0.0.1/8\": bits set after the prefix length; write 10.0.0.0/8",
            ),
            (
                &[],
                &["10.0.0.0/33"],
                &[],
                "\"10.0.0.0/33\": not an address or CIDR",
            ),
            (&[], &["example.com"], &[], "not an address or CIDR"),
            (&[], &[], &["64:ff9b:1::/48"], "local-use"),
            (&[], &[], &["2001:db8::/44"], "/44"),
        ];
        for (names, cidrs, nat64, want) in cases {
            let spec = PolicySpec {
                names: names.iter().map(|s| s.to_string()).collect(),
                allow_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
                nat64_prefixes: nat64.iter().map(|s| s.to_string()).collect(),
                strict: false,
            };
            let err = Policy::load(&spec).unwrap_err().to_string();
            assert!(err.contains(want), "{spec:?}: {err}");
        }
    }

    #[test]
    fn cidrs_nat64_and_strict_reach_the_filter() {
        let p = Policy::load(&PolicySpec {
            names: vec![],
            allow_cidrs: vec!["10.20.0.0/16".into(), "fd00::5".into()],
            nat64_prefixes: vec!["2001:db8:64::/96".into()],
            strict: true,
        })
        .unwrap();
        assert_eq!(
            p.filter.allow,
            vec![
                "10.20.0.0/16".parse::<IpNet>().unwrap(),
                "fd00::5/128".parse().unwrap()
            ]
        );
        assert_eq!(p.filter.nat64[0].net(), "2001:db8:64::/96".parse().unwrap());
        assert!(p.filter.strict);
    }
}
