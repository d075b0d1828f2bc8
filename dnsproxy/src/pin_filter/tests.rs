//! Table-driven tests of the pin filter: every registry entry with its edges,
//! every embedding form with private and public IPv4 inside, every RFC 6052
//! length, strict mode and allow CIDRs.

use super::*;
use std::net::IpAddr;

const A: bool = true;
const B: bool = false;

fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad test address {s}: {e}"))
}

fn plain() -> PinFilter {
    PinFilter::default()
}

/// (entry, first inside, expect, last inside, expect, first outside, expect).
/// Where an entry ends at the top of the address space, "outside" is the
/// address just below it.
#[rustfmt::skip]
const EDGES: &[(&str, &str, bool, &str, bool, &str, bool)] = &[
    // IPv4 special-purpose registry
    ("0.0.0.0/8", "0.0.0.0", B, "0.255.255.255", B, "1.0.0.0", A),
    ("0.0.0.0/32", "0.0.0.0", B, "0.0.0.0", B, "0.0.0.1", B),
    ("10.0.0.0/8", "10.0.0.0", B, "10.255.255.255", B, "11.0.0.0", A),
    ("100.64.0.0/10", "100.64.0.0", B, "100.127.255.255", B, "100.128.0.0", A),
    ("127.0.0.0/8", "127.0.0.0", B, "127.255.255.255", B, "128.0.0.0", A),
    ("169.254.0.0/16", "169.254.0.0", B, "169.254.255.255", B, "169.255.0.0", A),
    ("172.16.0.0/12", "172.16.0.0", B, "172.31.255.255", B, "172.32.0.0", A),
    ("192.0.0.0/24", "192.0.0.0", B, "192.0.0.255", B, "192.0.1.0", A),
    ("192.0.0.0/29", "192.0.0.0", B, "192.0.0.7", B, "192.0.0.8", B),
    ("192.0.0.8/32", "192.0.0.8", B, "192.0.0.8", B, "192.0.0.9", A),
    ("192.0.0.9/32", "192.0.0.9", A, "192.0.0.9", A, "192.0.0.10", A),
    ("192.0.0.10/32", "192.0.0.10", A, "192.0.0.10", A, "192.0.0.11", B),
    ("192.0.0.170/32", "192.0.0.170", B, "192.0.0.170", B, "192.0.0.171", B),
    ("192.0.0.171/32", "192.0.0.171", B, "192.0.0.171", B, "192.0.0.172", B),
    ("192.0.2.0/24", "192.0.2.0", B, "192.0.2.255", B, "192.0.3.0", A),
    ("192.31.196.0/24", "192.31.196.0", A, "192.31.196.255", A, "192.31.197.0", A),
    ("192.52.193.0/24", "192.52.193.0", A, "192.52.193.255", A, "192.52.194.0", A),
    ("192.88.99.0/24", "192.88.99.0", B, "192.88.99.255", B, "192.88.100.0", A),
    ("192.168.0.0/16", "192.168.0.0", B, "192.168.255.255", B, "192.169.0.0", A),
    ("192.175.48.0/24", "192.175.48.0", A, "192.175.48.255", A, "192.175.49.0", A),
    ("198.18.0.0/15", "198.18.0.0", B, "198.19.255.255", B, "198.20.0.0", A),
    ("198.51.100.0/24", "198.51.100.0", B, "198.51.100.255", B, "198.51.101.0", A),
    ("203.0.113.0/24", "203.0.113.0", B, "203.0.113.255", B, "203.0.114.0", A),
    ("240.0.0.0/4", "240.0.0.0", B, "255.255.255.255", B, "239.255.255.255", B),
    ("255.255.255.255/32", "255.255.255.255", B, "255.255.255.255", B, "255.255.255.254", B),
    // multicast (not a registry entry, but a rule)
    ("224.0.0.0/4", "224.0.0.0", B, "239.255.255.255", B, "223.255.255.255", A),
    // IPv6 special-purpose registry
    ("::1/128", "::1", B, "::1", B, "::2", B),
    ("::/128", "::", B, "::", B, "::1", B),
    ("::ffff:0:0/96", "::ffff:0.0.0.0", B, "::ffff:255.255.255.255", B, "::1:0:0:0", A),
    ("64:ff9b::/96", "64:ff9b::", B, "64:ff9b::ffff:ffff", B, "64:ff9b::1:0:0", A),
    ("64:ff9b:1::/48", "64:ff9b:1::", B, "64:ff9b:1:ffff:ffff:ffff:ffff:ffff", B, "64:ff9b:2::", A),
    ("100::/64", "100::", B, "100::ffff:ffff:ffff:ffff", B, "100:0:0:1::", B),
    ("100:0:0:1::/64", "100:0:0:1::", B, "100:0:0:1:ffff:ffff:ffff:ffff", B, "100:0:0:2::", A),
    ("2001::/23", "2001::", B, "2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", B, "2001:200::", A),
    ("2001::/32", "2001::", B, "2001:0:ffff:ffff:ffff:ffff:ffff:ffff", B, "2001:1::", B),
    ("2001:1::1/128", "2001:1::1", A, "2001:1::1", A, "2001:1::2", A),
    ("2001:1::2/128", "2001:1::2", A, "2001:1::2", A, "2001:1::3", A),
    ("2001:1::3/128", "2001:1::3", A, "2001:1::3", A, "2001:1::4", B),
    ("2001:2::/48", "2001:2::", B, "2001:2:0:ffff:ffff:ffff:ffff:ffff", B, "2001:2:1::", B),
    ("2001:3::/32", "2001:3::", A, "2001:3:ffff:ffff:ffff:ffff:ffff:ffff", A, "2001:4::", B),
    ("2001:4:112::/48", "2001:4:112::", A, "2001:4:112:ffff:ffff:ffff:ffff:ffff", A, "2001:4:113::", B),
    ("2001:10::/28", "2001:10::", B, "2001:1f:ffff:ffff:ffff:ffff:ffff:ffff", B, "2001:20::", A),
    ("2001:20::/28", "2001:20::", A, "2001:2f:ffff:ffff:ffff:ffff:ffff:ffff", A, "2001:30::", A),
    ("2001:30::/28", "2001:30::", A, "2001:3f:ffff:ffff:ffff:ffff:ffff:ffff", A, "2001:40::", B),
    ("2001:db8::/32", "2001:db8::", B, "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", B, "2001:db9::", A),
    ("2002::/16", "2002::", B, "2002:ffff:ffff:ffff:ffff:ffff:ffff:ffff", B, "2003::", A),
    ("2620:4f:8000::/48", "2620:4f:8000::", A, "2620:4f:8000:ffff:ffff:ffff:ffff:ffff", A, "2620:4f:8001::", A),
    ("3fff::/20", "3fff::", B, "3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", B, "3fff:1000::", A),
    ("5f00::/16", "5f00::", B, "5f00:ffff:ffff:ffff:ffff:ffff:ffff:ffff", B, "5f01::", A),
    ("fc00::/7", "fc00::", B, "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", B, "fe00::", A),
    ("fe80::/10", "fe80::", B, "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", B, "fec0::", B),
    // site-local and multicast (rules, not registry entries)
    ("fec0::/10", "fec0::", B, "feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", B, "ff00::", B),
    ("ff00::/8", "ff00::", B, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", B, "feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", B),
];

#[test]
fn every_registry_entry_and_its_edges() {
    let f = plain();
    for &(entry, first, ef, last, el, out, eo) in EDGES {
        for (addr, expect, what) in [
            (first, ef, "first"),
            (last, el, "last"),
            (out, eo, "outside"),
        ] {
            let d = f.judge(ip(addr));
            assert_eq!(d.is_allowed(), expect, "{entry} {what} {addr}: {d}");
        }
        // The inside edges must really be inside and the outside edge outside.
        let net: IpNet = entry.parse().unwrap();
        assert!(
            net.contains(&ip(first)) && net.contains(&ip(last)),
            "{entry}"
        );
        assert!(!net.contains(&ip(out)), "{entry}");
    }
}

#[test]
fn edge_table_names_every_registry_entry() {
    let listed: Vec<IpNet> = EDGES.iter().map(|e| e.0.parse().unwrap()).collect();
    for e in registry::IPV4 {
        assert!(
            listed.contains(&IpNet::V4(e.net)),
            "{} has no edge row",
            e.net
        );
    }
    for e in registry::IPV6 {
        assert!(
            listed.contains(&IpNet::V6(e.net)),
            "{} has no edge row",
            e.net
        );
    }
}

#[test]
fn more_specific_entry_wins() {
    let f = plain();
    // 2001:4:112::/48 (AS112) is reachable inside 2001::/23.
    assert_eq!(
        f.judge(ip("2001:4:112::1")),
        Decision::Allow(AllowReason::GloballyReachable)
    );
    // 192.0.0.9 (PCP anycast) is reachable inside 192.0.0.0/24.
    assert!(f.judge(ip("192.0.0.9")).is_allowed());
    // 192.0.0.8/32 names itself, not the /29 or /24 around it.
    assert_eq!(
        f.judge(ip("192.0.0.8")),
        Decision::Block(BlockReason::Special {
            net: "192.0.0.8/32".parse().unwrap(),
            name: "IPv4 dummy address"
        })
    );
}

#[test]
fn reasons_name_the_range() {
    let f = plain();
    let cases = [
        ("169.254.169.254", "block: 169.254.0.0/16 link-local"),
        ("10.1.2.3", "block: 10.0.0.0/8 private-use"),
        ("224.0.0.251", "block: multicast 224.0.0.0/4"),
        ("ff02::fb", "block: multicast ff00::/8"),
        ("fec0::1", "block: deprecated site-local fec0::/10"),
        (
            "64:ff9b:1::808:808",
            "block: local-use IPv4/IPv6 translation prefix 64:ff9b:1::/48",
        ),
        (
            "64:ff9b::a9fe:a9fe",
            "block: NAT64 64:ff9b::/96 carries 169.254.169.254: 169.254.0.0/16",
        ),
        (
            "2002:a9fe:a9fe::1",
            "block: 6to4 2002::/16 carries 169.254.169.254: 169.254.0.0/16",
        ),
        ("::ffff:8.8.8.8", "block: ::ffff:0.0.0.0/96 IPv4-mapped"),
        ("8.8.8.8", "allow: globally reachable"),
        ("2606:4700::1111", "allow: globally reachable"),
        (
            "64:ff9b::808:808",
            "allow: NAT64 64:ff9b::/96 carries 8.8.8.8",
        ),
    ];
    for (addr, want) in cases {
        let got = f.judge(ip(addr)).to_string();
        assert!(
            got.starts_with(want),
            "{addr}: got {got:?}, want prefix {want:?}"
        );
    }
}

/// (address, expect, form) for every embedding form with a private and a
/// public IPv4 inside.
#[rustfmt::skip]
const EMBEDDINGS: &[(&str, bool, Embedding)] = &[
    ("::ffff:10.0.0.1", B, Embedding::Mapped),
    ("::ffff:8.8.8.8", B, Embedding::Mapped), // the registry blocks mapped outright
    ("::10.0.0.1", B, Embedding::Compatible),
    ("::8.8.8.8", A, Embedding::Compatible),
    ("::ffff:0:10.0.0.1", B, Embedding::Translated),
    ("::ffff:0:8.8.8.8", A, Embedding::Translated),
    ("64:ff9b::10.0.0.1", B, Embedding::Nat64WellKnown),
    ("64:ff9b::169.254.169.254", B, Embedding::Nat64WellKnown),
    ("64:ff9b::8.8.8.8", A, Embedding::Nat64WellKnown),
    ("2002:a00:1::1", B, Embedding::SixToFour),
    ("2002:a9fe:a9fe::1", B, Embedding::SixToFour),
    ("2002:808:808::1", A, Embedding::SixToFour),
    // Teredo: server 10.0.0.1, client 8.8.8.8 (stored inverted: f7f7:f7f7)
    ("2001:0:a00:1::f7f7:f7f7", B, Embedding::TeredoServer),
    // server 8.8.8.8, client 10.0.0.1 (inverted: f5ff:fffe)
    ("2001:0:808:808::f5ff:fffe", B, Embedding::TeredoClient),
    // server 8.8.8.8, client 169.254.169.254 (inverted: 5601:5601)
    ("2001:0:808:808::5601:5601", B, Embedding::TeredoClient),
    // both public
    ("2001:0:808:808::f7f7:f7f7", A, Embedding::TeredoServer),
];

#[test]
fn every_embedding_form_private_and_public() {
    let f = plain();
    for &(addr, expect, form) in EMBEDDINGS {
        let d = f.judge(ip(addr));
        assert_eq!(d.is_allowed(), expect, "{addr}: {d}");
        let decoded = decode(addr.parse().unwrap(), &[]);
        assert!(
            decoded.iter().flatten().any(|e| e.form == form),
            "{addr} not decoded as {form}"
        );
        match d {
            Decision::Block(BlockReason::Embedded { form: got, .. }) => {
                assert_eq!(got, form, "{addr}")
            }
            Decision::Block(BlockReason::Special { name, .. }) => {
                assert_eq!(name, "IPv4-mapped", "{addr}")
            }
            Decision::Allow(AllowReason::EmbeddedGlobal { .. }) => {}
            other => panic!("{addr}: unexpected {other}"),
        }
    }
}

#[test]
fn teredo_decodes_server_and_inverted_client() {
    let got = decode("2001:0:4136:e378:8000:63bf:3fff:fdd2".parse().unwrap(), &[]);
    // RFC 4380 example: server 65.54.227.120, client 192.0.2.45.
    assert_eq!(
        got[0],
        Some(EmbeddedV4 {
            form: Embedding::TeredoServer,
            v4: "65.54.227.120".parse().unwrap()
        })
    );
    assert_eq!(
        got[1],
        Some(EmbeddedV4 {
            form: Embedding::TeredoClient,
            v4: "192.0.2.45".parse().unwrap()
        })
    );
}

/// Places `v4` after `prefix` as RFC 6052 section 2.2 lays it out, with the
/// u-octet set to `u` (it must be ignored by the decoder).
fn rfc6052_embed(prefix: Ipv6Net, v4: Ipv4Addr, u: u8) -> Ipv6Addr {
    let mut o = prefix.addr().octets();
    let v = v4.octets();
    let at: &[usize] = match prefix.prefix_len() {
        32 => &[4, 5, 6, 7],
        40 => &[5, 6, 7, 9],
        48 => &[6, 7, 9, 10],
        56 => &[7, 9, 10, 11],
        64 => &[9, 10, 11, 12],
        96 => &[12, 13, 14, 15],
        l => panic!("bad length {l}"),
    };
    for (i, &pos) in at.iter().enumerate() {
        o[pos] = v[i];
    }
    if prefix.prefix_len() < 96 {
        o[8] = u;
    }
    Ipv6Addr::from(o)
}

#[test]
fn operator_nat64_every_rfc6052_length() {
    let prefixes = [
        "2001:db8::/32",
        "2001:db8:100::/40",
        "2001:db8:122::/48",
        "2001:db8:122:300::/56",
        "2001:db8:122:344::/64",
        "2001:db8:122:344::/96",
    ];
    for p in prefixes {
        let prefix: Nat64Prefix = p.parse().unwrap();
        let f = PinFilter {
            nat64: vec![prefix],
            ..PinFilter::default()
        };
        for u in [0u8, 0xff] {
            let private = rfc6052_embed(prefix.net(), "169.254.169.254".parse().unwrap(), u);
            let public = rfc6052_embed(prefix.net(), "8.8.8.8".parse().unwrap(), u);
            assert_eq!(
                f.judge(IpAddr::V6(private)),
                Decision::Block(BlockReason::Embedded {
                    form: Embedding::Nat64Operator(prefix),
                    v4: "169.254.169.254".parse().unwrap(),
                    why: V4Block::Special {
                        net: "169.254.0.0/16".parse().unwrap(),
                        name: registry::IPV4[5].name
                    },
                }),
                "{p} u={u} {private}"
            );
            // Allowed although 2001:db8::/32 itself is documentation space:
            // the operator declared the prefix translated.
            assert_eq!(
                f.judge(IpAddr::V6(public)),
                Decision::Allow(AllowReason::EmbeddedGlobal {
                    form: Embedding::Nat64Operator(prefix),
                    v4: "8.8.8.8".parse().unwrap()
                }),
                "{p} u={u} {public}"
            );
            // Without the prefix configured the same addresses are documentation space.
            assert!(!plain().judge(IpAddr::V6(public)).is_allowed());
        }
    }
}

#[test]
fn nat64_prefix_validation() {
    for (p, why) in [
        ("2001:db8::/33", "length /33"),
        ("2001:db8::1/96", "bits set after the prefix length"),
        ("2001:db8:0:0:ff00::/96", "u-octet"),
        ("64:ff9b:1::/48", "local-use"),
        ("64:ff9b:1:2::/64", "local-use"),
        ("64:ff9b::/32", "local-use"),
        ("not-a-prefix", "not an IPv6 prefix"),
        ("10.0.0.0/8", "not an IPv6 prefix"),
    ] {
        let err = p.parse::<Nat64Prefix>().unwrap_err().to_string();
        assert!(err.contains(why), "{p}: {err}");
    }
    assert!("64:ff9b::/96".parse::<Nat64Prefix>().is_ok());
}

#[test]
fn strict_blocks_every_embedding_form() {
    let prefix: Nat64Prefix = "2001:db8:64::/96".parse().unwrap();
    let f = PinFilter {
        strict: true,
        nat64: vec![prefix],
        ..PinFilter::default()
    };
    for &(addr, _, form) in EMBEDDINGS {
        let d = f.judge(ip(addr));
        let Decision::Block(BlockReason::Strict(got)) = d else {
            panic!("{addr}: {d}")
        };
        // Teredo reports the first part it found (the server).
        let want = if form == Embedding::TeredoClient {
            Embedding::TeredoServer
        } else {
            form
        };
        assert_eq!(got, want, "{addr}");
    }
    assert_eq!(
        f.judge(ip("2001:db8:64::808:808")),
        Decision::Block(BlockReason::Strict(Embedding::Nat64Operator(prefix)))
    );
    // Plain addresses are judged as usual.
    assert!(f.judge(ip("8.8.8.8")).is_allowed());
    assert!(f.judge(ip("2606:4700::1111")).is_allowed());
    assert!(!f.judge(ip("10.0.0.1")).is_allowed());
    // The loopback and unspecified addresses are not "compatible" forms.
    assert!(matches!(
        f.judge(ip("::1")),
        Decision::Block(BlockReason::Special { .. })
    ));
}

#[test]
fn allow_cidrs_override_for_that_filter_only() {
    let f = PinFilter {
        allow: vec![
            "10.1.0.0/16".parse().unwrap(),
            "fd00:1::/64".parse().unwrap(),
        ],
        ..PinFilter::default()
    };
    assert_eq!(
        f.judge(ip("10.1.2.3")),
        Decision::Allow(AllowReason::OperatorCidr("10.1.0.0/16".parse().unwrap()))
    );
    assert!(f.judge(ip("fd00:1::5")).is_allowed());
    // Just outside the CIDRs: the usual rules.
    assert!(!f.judge(ip("10.2.0.1")).is_allowed());
    assert!(!f.judge(ip("10.0.255.255")).is_allowed());
    assert!(!f.judge(ip("fd00:1:0:1::5")).is_allowed());
    // Another sandbox's filter without the CIDR still blocks.
    assert!(!plain().judge(ip("10.1.2.3")).is_allowed());
    // Strict mode does not take an explicit allow away.
    let strict = PinFilter {
        strict: true,
        allow: vec!["64:ff9b::/96".parse().unwrap()],
        ..PinFilter::default()
    };
    assert!(strict.judge(ip("64:ff9b::a00:1")).is_allowed());
}
