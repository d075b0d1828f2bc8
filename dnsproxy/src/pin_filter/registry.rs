//! The IANA IPv4 and IPv6 Special-Purpose Address Registries as tables.
//!
//! Transcribed from iana.org/assignments/iana-ipv4-special-registry and
//! iana-ipv6-special-registry ("Globally Reachable" column). Where the
//! registry says N/A for a block that carries IPv4 (6to4, Teredo), the verdict
//! is left to the embedded IPv4 (`Reach::ByEmbedded`). Lookup picks the most
//! specific entry containing the address, as the registries intend
//! (2001:4:112::/48 is reachable inside the unreachable 2001::/23).

use ipnet::{Ipv4Net, Ipv6Net};
use std::net::{Ipv4Addr, Ipv6Addr};

/// What a registry entry says about global reachability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// "Globally Reachable: True".
    Yes,
    /// "Globally Reachable: False" (or deprecated and treated as such).
    No,
    /// "N/A": the block carries an IPv4 address that decides.
    ByEmbedded,
}

/// One row of a special-purpose registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<N: 'static> {
    pub net: N,
    pub name: &'static str,
    pub reach: Reach,
}

const fn v4(
    a: u8,
    b: u8,
    c: u8,
    d: u8,
    len: u8,
    name: &'static str,
    reach: Reach,
) -> Entry<Ipv4Net> {
    Entry {
        net: Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len),
        name,
        reach,
    }
}

#[allow(clippy::too_many_arguments)]
const fn v6(s: [u16; 8], len: u8, name: &'static str, reach: Reach) -> Entry<Ipv6Net> {
    Entry {
        net: Ipv6Net::new_assert(
            Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]),
            len,
        ),
        name,
        reach,
    }
}

use Reach::{ByEmbedded, No, Yes};

/// IANA IPv4 Special-Purpose Address Registry.
///
/// 192.88.99.0/24 (the deprecated 6to4 relay anycast block) is blocked as a
/// whole, as DESIGN.md lists it.
pub static IPV4: &[Entry<Ipv4Net>] = &[
    v4(0, 0, 0, 0, 8, "\"this network\"", No),
    v4(0, 0, 0, 0, 32, "\"this host on this network\"", No),
    v4(10, 0, 0, 0, 8, "private-use", No),
    v4(100, 64, 0, 0, 10, "shared address space (CGN)", No),
    v4(127, 0, 0, 0, 8, "loopback", No),
    v4(
        169,
        254,
        0,
        0,
        16,
        "link-local (cloud metadata lives here)",
        No,
    ),
    v4(172, 16, 0, 0, 12, "private-use", No),
    v4(192, 0, 0, 0, 24, "IETF protocol assignments", No),
    v4(192, 0, 0, 0, 29, "IPv4 service continuity prefix", No),
    v4(192, 0, 0, 8, 32, "IPv4 dummy address", No),
    v4(192, 0, 0, 9, 32, "Port Control Protocol anycast", Yes),
    v4(192, 0, 0, 10, 32, "TURN anycast", Yes),
    v4(192, 0, 0, 170, 32, "NAT64/DNS64 discovery", No),
    v4(192, 0, 0, 171, 32, "NAT64/DNS64 discovery", No),
    v4(192, 0, 2, 0, 24, "documentation (TEST-NET-1)", No),
    v4(192, 31, 196, 0, 24, "AS112-v4", Yes),
    v4(192, 52, 193, 0, 24, "AMT", Yes),
    v4(192, 88, 99, 0, 24, "deprecated 6to4 relay anycast", No),
    v4(192, 168, 0, 0, 16, "private-use", No),
    v4(192, 175, 48, 0, 24, "direct delegation AS112 service", Yes),
    v4(198, 18, 0, 0, 15, "benchmarking", No),
    v4(198, 51, 100, 0, 24, "documentation (TEST-NET-2)", No),
    v4(203, 0, 113, 0, 24, "documentation (TEST-NET-3)", No),
    v4(240, 0, 0, 0, 4, "reserved", No),
    v4(255, 255, 255, 255, 32, "limited broadcast", No),
];

/// IANA IPv6 Special-Purpose Address Registry.
pub static IPV6: &[Entry<Ipv6Net>] = &[
    v6([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback", No),
    v6([0, 0, 0, 0, 0, 0, 0, 0], 128, "unspecified", No),
    v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96, "IPv4-mapped", No),
    v6(
        [0x64, 0xff9b, 0, 0, 0, 0, 0, 0],
        96,
        "IPv4-IPv6 translation (NAT64)",
        Yes,
    ),
    v6(
        [0x64, 0xff9b, 1, 0, 0, 0, 0, 0],
        48,
        "local-use IPv4/IPv6 translation",
        No,
    ),
    v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only", No),
    v6([0x100, 0, 0, 1, 0, 0, 0, 0], 64, "dummy IPv6 prefix", No),
    v6(
        [0x2001, 0, 0, 0, 0, 0, 0, 0],
        23,
        "IETF protocol assignments",
        No,
    ),
    v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, "Teredo", ByEmbedded),
    v6(
        [0x2001, 1, 0, 0, 0, 0, 0, 1],
        128,
        "Port Control Protocol anycast",
        Yes,
    ),
    v6([0x2001, 1, 0, 0, 0, 0, 0, 2], 128, "TURN anycast", Yes),
    v6(
        [0x2001, 1, 0, 0, 0, 0, 0, 3],
        128,
        "DNS-SD service registration anycast",
        Yes,
    ),
    v6([0x2001, 2, 0, 0, 0, 0, 0, 0], 48, "benchmarking", No),
    v6([0x2001, 3, 0, 0, 0, 0, 0, 0], 32, "AMT", Yes),
    v6([0x2001, 4, 0x112, 0, 0, 0, 0, 0], 48, "AS112-v6", Yes),
    v6(
        [0x2001, 0x10, 0, 0, 0, 0, 0, 0],
        28,
        "deprecated ORCHID",
        No,
    ),
    v6([0x2001, 0x20, 0, 0, 0, 0, 0, 0], 28, "ORCHIDv2", Yes),
    v6(
        [0x2001, 0x30, 0, 0, 0, 0, 0, 0],
        28,
        "drone remote ID (DET)",
        Yes,
    ),
    v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, "documentation", No),
    v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16, "6to4", ByEmbedded),
    v6(
        [0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0],
        48,
        "direct delegation AS112 service",
        Yes,
    ),
    v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, "documentation", No),
    v6(
        [0x5f00, 0, 0, 0, 0, 0, 0, 0],
        16,
        "segment routing (SRv6) SIDs",
        No,
    ),
    v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique-local", No),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local unicast", No),
];

/// The most specific IPv4 entry containing `addr`, if any.
pub fn lookup_v4(addr: Ipv4Addr) -> Option<&'static Entry<Ipv4Net>> {
    most_specific(IPV4, |n| n.contains(&addr), |n| n.prefix_len())
}

/// The most specific IPv6 entry containing `addr`, if any.
pub fn lookup_v6(addr: Ipv6Addr) -> Option<&'static Entry<Ipv6Net>> {
    most_specific(IPV6, |n| n.contains(&addr), |n| n.prefix_len())
}

fn most_specific<N>(
    table: &'static [Entry<N>],
    contains: impl Fn(&N) -> bool,
    len: impl Fn(&N) -> u8,
) -> Option<&'static Entry<N>> {
    table
        .iter()
        .filter(|e| contains(&e.net))
        .max_by_key(|e| len(&e.net))
}
