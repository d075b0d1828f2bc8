//! Property tests of the pin filter: decoding never panics, and an IPv6
//! address carrying a blocked IPv4 address is never allowed, in any form.

use cleave_dnsproxy::pin_filter::{decode, Nat64Prefix, PinFilter};
use ipnet::Ipv6Net;
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const LENGTHS: [u8; 6] = [32, 40, 48, 56, 64, 96];

fn nat64_prefix() -> impl Strategy<Value = Nat64Prefix> {
    (any::<u128>(), prop::sample::select(&LENGTHS[..])).prop_filter_map(
        "invalid prefix",
        |(bits, len)| {
            // Clear the u-octet so /96 prefixes are valid.
            let bits = bits & !(0xffu128 << 56);
            let net = Ipv6Net::new(Ipv6Addr::from(bits), len).ok()?.trunc();
            Nat64Prefix::new(net).ok()
        },
    )
}

/// Every way of carrying `v4` in an IPv6 address (operator NAT64 at `p`).
fn embeddings(v4: Ipv4Addr, p: Nat64Prefix) -> Vec<Ipv6Addr> {
    let v = u128::from(u32::from(v4));
    let mut out = vec![
        Ipv6Addr::from(0xffff_0000_0000u128 | v),      // mapped
        Ipv6Addr::from(0xffff_0000_0000_0000u128 | v), // translated
        Ipv6Addr::from(0x0064_ff9b_u128 << 96 | v),    // NAT64 well-known
        Ipv6Addr::from(0x2002u128 << 112 | v << 80 | 0x1234), // 6to4
        Ipv6Addr::from(0x2001_0000u128 << 96 | v << 64 | 0xf7f7_f7f7), // Teredo server (client 8.8.8.8)
        Ipv6Addr::from(0x2001_0000u128 << 96 | 0x0808_0808u128 << 64 | (!v & 0xffff_ffff)), // Teredo client
    ];
    if u32::from(v4) > 1 {
        out.push(Ipv6Addr::from(v)); // compatible
    }
    // RFC 6052 placement after the operator prefix, u-octet left random-ish.
    let mut o = p.net().addr().octets();
    let b = v4.octets();
    let at: &[usize] = match p.net().prefix_len() {
        32 => &[4, 5, 6, 7],
        40 => &[5, 6, 7, 9],
        48 => &[6, 7, 9, 10],
        56 => &[7, 9, 10, 11],
        64 => &[9, 10, 11, 12],
        _ => &[12, 13, 14, 15],
    };
    for (i, &pos) in at.iter().enumerate() {
        o[pos] = b[i];
    }
    out.push(Ipv6Addr::from(o));
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn decoding_and_judging_never_panic(
        bits in any::<u128>(),
        prefixes in prop::collection::vec(nat64_prefix(), 0..4),
        strict in any::<bool>(),
    ) {
        let addr = Ipv6Addr::from(bits);
        let _ = decode(addr, &prefixes);
        let f = PinFilter { strict, nat64: prefixes, allow: vec![] };
        let d = f.judge(IpAddr::V6(addr));
        let _ = d.to_string();
        let _ = f.judge(IpAddr::V4(Ipv4Addr::from(bits as u32))).to_string();
    }

    #[test]
    fn a_blocked_ipv4_inside_is_never_allowed(
        v4 in any::<u32>().prop_map(Ipv4Addr::from),
        prefix in nat64_prefix(),
        strict in any::<bool>(),
    ) {
        let f = PinFilter { strict, nat64: vec![prefix], allow: vec![] };
        // About one random IPv4 address in six is blocked; the rest have
        // nothing to prove here.
        if f.judge(IpAddr::V4(v4)).is_allowed() {
            return Ok(());
        }
        for addr in embeddings(v4, prefix) {
            let d = f.judge(IpAddr::V6(addr));
            prop_assert!(!d.is_allowed(), "{v4} inside {addr} was allowed: {d}");
        }
    }

    #[test]
    fn blocked_ipv4_from_known_ranges_is_never_allowed_inside(
        base in prop::sample::select(&[
            "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
            "172.16.0.0/12", "192.168.0.0/16", "192.0.2.0/24", "198.18.0.0/15", "224.0.0.0/4",
            "240.0.0.0/4",
        ][..]),
        host in any::<u32>(),
        prefix in nat64_prefix(),
    ) {
        let net: ipnet::Ipv4Net = base.parse().unwrap();
        let v4 = Ipv4Addr::from(u32::from(net.network()) | (host & u32::from(net.hostmask())));
        let f = PinFilter { strict: false, nat64: vec![prefix], allow: vec![] };
        for addr in embeddings(v4, prefix) {
            prop_assert!(!f.judge(IpAddr::V6(addr)).is_allowed(), "{v4} inside {addr}");
        }
    }
}
