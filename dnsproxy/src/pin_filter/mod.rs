//! The pin filter: which answer addresses may be pinned for a guest.
//!
//! One pure function of (address, per-sandbox settings); no I/O. The rules are
//! DESIGN.md's "pin filter": an address is allowed only if the IANA
//! special-purpose registries call it globally reachable (most specific entry
//! wins), it is neither multicast nor site-local, and any IPv4 address carried
//! inside it is allowed by the same rules. Strict mode blocks every embedding
//! form outright. Operator allow CIDRs override all of this for one sandbox.
//! Every decision carries its reason.

mod embedded;
pub mod registry;
#[cfg(test)]
mod tests;

pub use embedded::{
    decode, EmbeddedV4, Embedding, Nat64Prefix, Nat64PrefixError, NAT64_LOCAL_USE, NAT64_WELL_KNOWN,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use registry::Reach;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const MULTICAST_V4: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4);
const MULTICAST_V6: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8);
const SITE_LOCAL: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10);

/// Per-sandbox settings of the filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinFilter {
    /// Block every IPv6 form that carries an IPv4 address.
    pub strict: bool,
    /// Operator NAT64 prefixes, in addition to the well-known one.
    pub nat64: Vec<Nat64Prefix>,
    /// Operator allow CIDRs: addresses inside are allowed whatever the rules say.
    pub allow: Vec<IpNet>,
}

/// The filter's verdict on one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow(AllowReason),
    Block(BlockReason),
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow(r) => write!(f, "allow: {r}"),
            Decision::Block(r) => write!(f, "block: {r}"),
        }
    }
}

/// Why an address is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllowReason {
    /// No registry entry marks it unreachable.
    GloballyReachable,
    /// It carries an IPv4 address that is globally reachable.
    EmbeddedGlobal { form: Embedding, v4: Ipv4Addr },
    /// The operator allowed it for this sandbox.
    OperatorCidr(IpNet),
}

impl fmt::Display for AllowReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowReason::GloballyReachable => f.write_str("globally reachable"),
            AllowReason::EmbeddedGlobal { form, v4 } => {
                write!(f, "{form} carries {v4}, which is globally reachable")
            }
            AllowReason::OperatorCidr(net) => write!(f, "inside operator allow CIDR {net}"),
        }
    }
}

/// Why an IPv4 address carried inside an IPv6 address is blocked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V4Block {
    Special { net: Ipv4Net, name: &'static str },
    Multicast,
}

impl fmt::Display for V4Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            V4Block::Special { net, name } => {
                write!(
                    f,
                    "{net} {name} is not globally reachable (IANA special-purpose registry)"
                )
            }
            V4Block::Multicast => write!(f, "multicast {MULTICAST_V4}"),
        }
    }
}

/// Why an address is blocked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockReason {
    /// A special-purpose registry entry marks it not globally reachable.
    Special { net: IpNet, name: &'static str },
    /// 224.0.0.0/4 or ff00::/8.
    Multicast(IpNet),
    /// Deprecated site-local fec0::/10.
    SiteLocal,
    /// 64:ff9b:1::/48, blocked outright whatever it carries.
    LocalUseNat64,
    /// Strict mode: the address carries IPv4 in this form.
    Strict(Embedding),
    /// It carries an IPv4 address that is blocked.
    Embedded {
        form: Embedding,
        v4: Ipv4Addr,
        why: V4Block,
    },
}

impl fmt::Display for BlockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockReason::Special { net, name } => {
                write!(
                    f,
                    "{net} {name} is not globally reachable (IANA special-purpose registry)"
                )
            }
            BlockReason::Multicast(net) => write!(f, "multicast {net}"),
            BlockReason::SiteLocal => write!(f, "deprecated site-local {SITE_LOCAL}"),
            BlockReason::LocalUseNat64 => write!(
                f,
                "local-use IPv4/IPv6 translation prefix {NAT64_LOCAL_USE} is blocked outright"
            ),
            BlockReason::Strict(form) => {
                write!(f, "strict mode blocks IPv4 embedded in IPv6 ({form})")
            }
            BlockReason::Embedded { form, v4, why } => write!(f, "{form} carries {v4}: {why}"),
        }
    }
}

impl PinFilter {
    /// Judges one answer address.
    pub fn judge(&self, addr: IpAddr) -> Decision {
        if let Some(net) = self.allow.iter().find(|n| n.contains(&addr)) {
            return Decision::Allow(AllowReason::OperatorCidr(*net));
        }
        match addr {
            IpAddr::V4(a) => match judge_v4(a) {
                Ok(()) => Decision::Allow(AllowReason::GloballyReachable),
                Err(V4Block::Special { net, name }) => Decision::Block(BlockReason::Special {
                    net: IpNet::V4(net),
                    name,
                }),
                Err(V4Block::Multicast) => {
                    Decision::Block(BlockReason::Multicast(IpNet::V4(MULTICAST_V4)))
                }
            },
            IpAddr::V6(a) => self.judge_v6(a),
        }
    }

    fn judge_v6(&self, a: Ipv6Addr) -> Decision {
        use Decision::{Allow, Block};
        if NAT64_LOCAL_USE.contains(&a) {
            return Block(BlockReason::LocalUseNat64);
        }
        if MULTICAST_V6.contains(&a) {
            return Block(BlockReason::Multicast(IpNet::V6(MULTICAST_V6)));
        }
        if SITE_LOCAL.contains(&a) {
            return Block(BlockReason::SiteLocal);
        }
        let carried = decode(a, &self.nat64);
        let mut first = None;
        for e in carried.iter().flatten() {
            if self.strict {
                return Block(BlockReason::Strict(e.form));
            }
            if let Err(why) = judge_v4(e.v4) {
                return Block(BlockReason::Embedded {
                    form: e.form,
                    v4: e.v4,
                    why,
                });
            }
            first.get_or_insert(*e);
        }
        // An operator NAT64 prefix is the operator's statement that the
        // network translates it: the carried IPv4 alone decides, even when
        // the prefix itself is, say, unique-local.
        let operator = matches!(
            first,
            Some(EmbeddedV4 {
                form: Embedding::Nat64Operator(_),
                ..
            })
        );
        if !operator {
            if let Some(e) = registry::lookup_v6(a) {
                if e.reach == Reach::No {
                    return Block(BlockReason::Special {
                        net: IpNet::V6(e.net),
                        name: e.name,
                    });
                }
            }
        }
        match first {
            Some(EmbeddedV4 { form, v4 }) => Allow(AllowReason::EmbeddedGlobal { form, v4 }),
            None => Allow(AllowReason::GloballyReachable),
        }
    }
}

/// The IPv4 rules: registry (most specific entry) and multicast.
fn judge_v4(a: Ipv4Addr) -> Result<(), V4Block> {
    if MULTICAST_V4.contains(&a) {
        return Err(V4Block::Multicast);
    }
    match registry::lookup_v4(a) {
        Some(e) if e.reach == Reach::No => Err(V4Block::Special {
            net: e.net,
            name: e.name,
        }),
        _ => Ok(()),
    }
}
