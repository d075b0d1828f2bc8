//! Decoders for IPv4 addresses carried inside IPv6 addresses.
//!
//! Every form a guest could use to smuggle an IPv4 destination through an
//! AAAA record: IPv4-mapped, IPv4-compatible, IPv4-translated (SIIT, judged
//! too for defence in depth), NAT64 (RFC 6052, well-known and operator
//! prefixes), 6to4 and Teredo (server and de-obfuscated client).

use ipnet::Ipv6Net;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The well-known NAT64 prefix (RFC 6052).
pub const NAT64_WELL_KNOWN: Ipv6Net =
    Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96);
/// The local-use translation prefix (RFC 8215): blocked outright.
pub const NAT64_LOCAL_USE: Ipv6Net =
    Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48);

/// How an IPv4 address was carried inside an IPv6 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Embedding {
    /// `::ffff:0:0/96`.
    Mapped,
    /// `::/96` (deprecated; `::` and `::1` excluded).
    Compatible,
    /// `::ffff:0:0:0/96` (SIIT).
    Translated,
    /// The well-known NAT64 prefix `64:ff9b::/96`.
    Nat64WellKnown,
    /// An operator NAT64 prefix.
    Nat64Operator(Nat64Prefix),
    /// `2002::/16`.
    SixToFour,
    /// Teredo `2001::/32`, the server address.
    TeredoServer,
    /// Teredo `2001::/32`, the client address (stored inverted).
    TeredoClient,
}

impl fmt::Display for Embedding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Embedding::Mapped => f.write_str("IPv4-mapped ::ffff:0:0/96"),
            Embedding::Compatible => f.write_str("IPv4-compatible ::/96"),
            Embedding::Translated => f.write_str("IPv4-translated ::ffff:0:0:0/96"),
            Embedding::Nat64WellKnown => f.write_str("NAT64 64:ff9b::/96"),
            Embedding::Nat64Operator(p) => write!(f, "operator NAT64 {}", p.net()),
            Embedding::SixToFour => f.write_str("6to4 2002::/16"),
            Embedding::TeredoServer => f.write_str("Teredo 2001::/32 server"),
            Embedding::TeredoClient => f.write_str("Teredo 2001::/32 client (de-obfuscated)"),
        }
    }
}

/// An IPv4 address found inside an IPv6 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddedV4 {
    pub form: Embedding,
    pub v4: Ipv4Addr,
}

/// Why a NAT64 prefix was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Nat64PrefixError {
    #[error("NAT64 prefix {0:?} is not an IPv6 prefix like 2001:db8:64::/96")]
    Unparsable(String),
    #[error("NAT64 prefix {0} has length /{1}; RFC 6052 allows /32, /40, /48, /56, /64 or /96")]
    Length(Ipv6Net, u8),
    #[error("NAT64 prefix {0} has bits set after the prefix length; write {1}")]
    HostBits(Ipv6Net, Ipv6Net),
    #[error("NAT64 prefix {0} sets the RFC 6052 u-octet (bits 64-71), which must be zero")]
    UOctet(Ipv6Net),
    #[error("NAT64 prefix {0} lies in the local-use prefix 64:ff9b:1::/48, which the pin filter blocks outright")]
    LocalUse(Ipv6Net),
}

/// A validated operator NAT64 prefix at an RFC 6052 length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Nat64Prefix(Ipv6Net);

impl Nat64Prefix {
    /// Validates `net` as a NAT64 prefix.
    pub fn new(net: Ipv6Net) -> Result<Self, Nat64PrefixError> {
        let len = net.prefix_len();
        if ![32, 40, 48, 56, 64, 96].contains(&len) {
            return Err(Nat64PrefixError::Length(net, len));
        }
        if net.trunc() != net {
            return Err(Nat64PrefixError::HostBits(net, net.trunc()));
        }
        if len == 96 && net.addr().octets()[8] != 0 {
            return Err(Nat64PrefixError::UOctet(net));
        }
        if NAT64_LOCAL_USE.contains(&net) || net.contains(&NAT64_LOCAL_USE) {
            return Err(Nat64PrefixError::LocalUse(net));
        }
        Ok(Self(net))
    }

    pub fn net(&self) -> Ipv6Net {
        self.0
    }

    /// The IPv4 address RFC 6052 places after this prefix, if `addr` is in it.
    /// The u-octet (byte 8) is skipped whatever its value: a translator may
    /// ignore it, so the guest must not be able to hide an address there.
    pub fn extract(&self, addr: Ipv6Addr) -> Option<Ipv4Addr> {
        if !self.0.contains(&addr) {
            return None;
        }
        Some(rfc6052_extract(addr, self.0.prefix_len()))
    }
}

impl FromStr for Nat64Prefix {
    type Err = Nat64PrefixError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let net: Ipv6Net = s
            .trim()
            .parse()
            .map_err(|_| Nat64PrefixError::Unparsable(s.to_string()))?;
        Self::new(net)
    }
}

/// RFC 6052 section 2.2: the IPv4 bytes for each prefix length, skipping
/// byte 8 (the u-octet). Lengths other than the six legal ones are never
/// constructed (see `Nat64Prefix::new`).
fn rfc6052_extract(addr: Ipv6Addr, len: u8) -> Ipv4Addr {
    let o = addr.octets();
    let b = match len {
        32 => [o[4], o[5], o[6], o[7]],
        40 => [o[5], o[6], o[7], o[9]],
        48 => [o[6], o[7], o[9], o[10]],
        56 => [o[7], o[9], o[10], o[11]],
        64 => [o[9], o[10], o[11], o[12]],
        _ => [o[12], o[13], o[14], o[15]],
    };
    Ipv4Addr::from(b)
}

/// Every IPv4 address `addr` carries, in the first form that matches.
/// Operator NAT64 prefixes are tried first: they are explicit configuration
/// and say how the operator's network will translate the address. Teredo
/// yields two addresses (server and client); the other forms one.
pub fn decode(addr: Ipv6Addr, operator_nat64: &[Nat64Prefix]) -> [Option<EmbeddedV4>; 2] {
    let one = |form, v4| [Some(EmbeddedV4 { form, v4 }), None];
    for p in operator_nat64 {
        if let Some(v4) = p.extract(addr) {
            return one(Embedding::Nat64Operator(*p), v4);
        }
    }
    let o = addr.octets();
    let s = addr.segments();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if s[..5] == [0; 5] && s[5] == 0xffff {
        return one(Embedding::Mapped, tail);
    }
    if s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0 {
        return one(Embedding::Translated, tail);
    }
    if s[..6] == [0; 6] && u32::from(tail) > 1 {
        return one(Embedding::Compatible, tail);
    }
    if NAT64_WELL_KNOWN.contains(&addr) {
        return one(Embedding::Nat64WellKnown, tail);
    }
    if s[0] == 0x2002 {
        return one(Embedding::SixToFour, Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    if s[0] == 0x2001 && s[1] == 0 {
        let server = Ipv4Addr::new(o[4], o[5], o[6], o[7]);
        let client = Ipv4Addr::from(!u32::from(tail));
        return [
            Some(EmbeddedV4 {
                form: Embedding::TeredoServer,
                v4: server,
            }),
            Some(EmbeddedV4 {
                form: Embedding::TeredoClient,
                v4: client,
            }),
        ];
    }
    [None, None]
}
