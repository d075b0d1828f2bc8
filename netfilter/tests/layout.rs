//! The ruleset read back with `nft -j list ruleset` matches the intended
//! layout, and a failing batch leaves nothing behind.

mod common;

use cleave_netfilter::testutil::NetNs;
use cleave_netfilter::{
    AllowRule, Firewall, MacAddr, NetfilterError, PortRange, SandboxId, SandboxNet, TapName, Uplink,
};
use common::*;
use serde_json::Value;

fn sandbox(id: &str, tap: &str, last: u8) -> SandboxNet {
    SandboxNet::new(
        SandboxId::new(id).unwrap(),
        TapName::new(tap).unwrap(),
        MacAddr::new([2, 0, 0, 0, 0, last]).unwrap(),
        format!("10.0.{last}.2").parse().unwrap(),
        format!("10.0.{last}.1").parse().unwrap(),
    )
    .unwrap()
}

fn find<'a>(rs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    rs.iter()
        .filter_map(|o| o.get(kind))
        .find(|b| b["table"] == "cleave" && b["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn rules<'a>(rs: &'a [Value], chain: &str) -> Vec<&'a Value> {
    rs.iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| r["table"] == "cleave" && r["chain"] == chain)
        .collect()
}

#[test]
fn ruleset_matches_intended_layout() {
    let ns = NetNs::new("layout").unwrap();
    let fw = ns.run(Firewall::open).unwrap().unwrap();
    let net = sandbox("sb-layout", "ctap7", 7)
        .with_ipv6("fd00:7::2".parse().unwrap(), "fd00:7::1".parse().unwrap())
        .unwrap()
        .with_allow([AllowRule::new(
            "203.0.113.0/24".parse().unwrap(),
            Some(PortRange::new(80, 90).unwrap()),
        )])
        .unwrap()
        .with_nat(Uplink::new("eth0").unwrap())
        .unwrap();
    fw.apply(&net).unwrap();
    let rs = ruleset(&ns);

    // Base chains: hooks, priorities, policies, one dispatch rule each.
    for (name, hook, prio, ty) in [
        ("forward", "forward", 0, "filter"),
        ("input", "input", 0, "filter"),
        ("postrouting", "postrouting", 100, "nat"),
    ] {
        let c = find(&rs, "chain", name);
        assert_eq!(c["family"], "inet");
        assert_eq!(c["hook"], hook, "{name}");
        assert_eq!(c["prio"], prio, "{name}");
        assert_eq!(c["type"], ty, "{name}");
        assert_eq!(c["policy"], "accept", "{name}");
    }
    for (chain, rules_in_chain) in [("forward", 2), ("input", 1)] {
        assert_eq!(
            rules(&rs, chain).len(),
            rules_in_chain,
            "dispatch rules in {chain}"
        );
    }
    for (chain, i, key, map) in [
        ("forward", 0, "iifname", "fwd_taps"),
        ("forward", 1, "oifname", "to_taps"),
        ("input", 0, "iifname", "in_taps"),
    ] {
        let vmap = &rules(&rs, chain)[i]["expr"][0]["vmap"];
        assert_eq!(vmap["key"]["meta"]["key"], key);
        assert_eq!(vmap["data"], format!("@{map}"));
    }
    assert_eq!(rules(&rs, "postrouting").len(), 2);

    // Dispatch maps and their entries.
    for (map, ty) in [
        ("fwd_taps", "ifname"),
        ("in_taps", "ifname"),
        ("to_taps", "ifname"),
        ("nat4_guests", "ipv4_addr"),
    ] {
        let m = find(&rs, "map", map);
        assert_eq!(m["type"], ty);
        assert_eq!(m["map"], "verdict");
    }
    let c = census(&ns);
    assert_eq!(
        c.map_entries,
        vec![
            ("fwd_taps".into(), "ctap7".into(), "fwd-ctap7".into()),
            ("in_taps".into(), "ctap7".into(), "in-ctap7".into()),
            ("nat4_guests".into(), "10.0.7.2".into(), "nat-ctap7".into()),
            ("nat6_guests".into(), "fd00:7::2".into(), "nat-ctap7".into()),
            ("to_taps".into(), "ctap7".into(), "to-ctap7".into()),
        ]
    );

    // Pin sets: concatenated keys with timeouts, commented with the owner.
    for (set, addr) in [("pin4-ctap7", "ipv4_addr"), ("pin6-ctap7", "ipv6_addr")] {
        let s = find(&rs, "set", set);
        assert_eq!(
            s["type"],
            serde_json::json!([addr, "inet_service"]),
            "{set}"
        );
        assert_eq!(s["flags"], serde_json::json!(["timeout"]), "{set}");
        assert!(
            s["comment"].as_str().unwrap().contains("sb-layout"),
            "{set}"
        );
    }
    for ctr in ["fwd-drop-ctap7", "in-drop-ctap7"] {
        find(&rs, "counter", ctr);
    }
    // nft 1.0.6 leaves chain comments out of its JSON; read them as text.
    let listing = ns
        .exec_ok("nft", &["list", "table", "inet", "cleave"])
        .unwrap();
    let listing = String::from_utf8(listing.stdout).unwrap();
    for (chain, what) in [
        ("fwd-ctap7", "egress policy"),
        ("in-ctap7", "access to the host"),
        ("nat-ctap7", "NAT"),
        ("to-ctap7", "traffic into the guest"),
    ] {
        let c = find(&rs, "chain", chain);
        assert!(c.get("hook").is_none(), "{chain} is a regular chain");
        let comment = format!(
            "chain {chain} {{\n\t\tcomment \"cleave sandbox sb-layout (tap ctap7): {what}\""
        );
        assert!(listing.contains(&comment), "{comment}\n{listing}");
    }

    // Forward chain: the policy in order, ending in a counted drop.
    let fwd = rules(&rs, "fwd-ctap7");
    let comments: Vec<&str> = fwd.iter().map(|r| r["comment"].as_str().unwrap()).collect();
    assert_eq!(
        comments,
        [
            "invalid",
            "no L2 header, cannot check MAC",
            "spoofed MAC",
            "spoofed IPv4 source",
            "spoofed IPv6 source",
            "replies and established flows",
            "metadata endpoint",
            "metadata endpoint",
            "policy",
            "policy",
            "DNS pins",
            "DNS pins",
            "DNS pins",
            "DNS pins",
            "everything else",
        ]
    );
    let text = |r: &Value| r["expr"].to_string();
    assert!(text(fwd[2]).contains("02:00:00:00:00:07"));
    assert!(text(fwd[6]).contains("169.254.0.0"));
    assert!(text(fwd[7]).contains("fd00:ec2::254"));
    assert!(text(fwd[8]).contains("@allow4-ctap7"));
    assert!(text(fwd[9]).contains("@allow6-ctap7"));
    // The policy is elements: address . protocol . port ranges, TCP and UDP.
    let allow = ns
        .exec_ok("nft", &["list", "set", "inet", "cleave", "allow4-ctap7"])
        .unwrap();
    let allow = String::from_utf8(allow.stdout).unwrap();
    assert!(allow.contains("flags interval"), "{allow}");
    for proto in ["tcp", "udp"] {
        assert!(
            allow.contains(&format!("203.0.113.0/24 . {proto} . 80-90")),
            "{allow}"
        );
    }
    assert!(text(fwd[10]).contains("@pin4-ctap7"));
    assert!(text(fwd[12]).contains("@pin6-ctap7"));
    let last = &fwd[14]["expr"];
    assert_eq!(last[0]["counter"], "fwd-drop-ctap7");
    assert!(last[1].get("drop").is_some());

    // Input chain: DNS to the resolver only.
    let inp = rules(&rs, "in-ctap7");
    let accepts: Vec<String> = inp
        .iter()
        .filter(|r| {
            r["expr"]
                .as_array()
                .unwrap()
                .last()
                .unwrap()
                .get("accept")
                .is_some()
        })
        .map(|r| text(r))
        .collect();
    assert_eq!(accepts.len(), 6, "2 ND + udp/tcp 53 on v4 and v6");
    for a in accepts.iter().filter(|a| !a.contains("icmpv6")) {
        assert!(a.contains("\"right\":53"), "{a}");
        assert!(a.contains("10.0.7.1") || a.contains("fd00:7::1"), "{a}");
    }
    assert_eq!(inp.last().unwrap()["expr"][0]["counter"], "in-drop-ctap7");

    // NAT chain.
    let nat = rules(&rs, "nat-ctap7");
    assert_eq!(nat.len(), 1);
    assert!(text(nat[0]).contains("masquerade") && text(nat[0]).contains("eth0"));

    // Teardown leaves exactly the base layout.
    assert!(fw.teardown(net.id()).unwrap());
    let c = census(&ns);
    assert_eq!(c.chains, ["forward", "input", "postrouting"]);
    assert_eq!(
        c.sets,
        [
            "fwd_taps",
            "in_taps",
            "nat4_guests",
            "nat6_guests",
            "to_taps"
        ]
    );
    assert!(c.counters.is_empty() && c.map_entries.is_empty());
    assert_eq!(c.rules, 5);
    assert!(
        !fw.teardown(net.id()).unwrap(),
        "second teardown finds nothing"
    );
}

#[test]
fn failed_apply_leaves_nothing_behind() {
    let ns = NetNs::new("atomic").unwrap();
    let fw = ns.run(Firewall::open).unwrap().unwrap();
    let nat = Uplink::new("eth0").unwrap();
    let a = sandbox("sb-a", "tapa", 1).with_nat(nat.clone()).unwrap();
    fw.apply(&a).unwrap();
    let before = census(&ns);

    // Same guest address, NATed: the NAT dispatch entry, the very last
    // message of the batch, collides. Everything before it must roll back.
    let b = SandboxNet::new(
        SandboxId::new("sb-b").unwrap(),
        TapName::new("tapb").unwrap(),
        MacAddr::new([2, 0, 0, 0, 0, 9]).unwrap(),
        a.guest_ipv4(),
        "10.0.1.9".parse().unwrap(),
    )
    .unwrap()
    .with_nat(nat)
    .unwrap();
    let err = fw.apply(&b).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, NetfilterError::Rejected { .. }), "{msg}");
    assert!(msg.contains("sb-b") && msg.contains("nat4_guests"), "{msg}");
    assert_eq!(census(&ns), before, "nothing of sb-b is left");

    // Same tap as a live sandbox: rejected, and a is untouched.
    let c = sandbox("sb-c", "tapa", 3);
    let msg = fw.apply(&c).unwrap_err().to_string();
    assert!(msg.contains("sb-c") && msg.contains("reconcile"), "{msg}");
    assert_eq!(census(&ns), before);

    // Applying the same sandbox twice is refused before reaching the kernel.
    assert!(matches!(
        fw.apply(&a),
        Err(NetfilterError::AlreadyApplied { .. })
    ));
}

#[test]
fn pin_and_counters_on_unknown_sandbox_fail_clearly() {
    let ns = NetNs::new("unknown").unwrap();
    let fw = ns.run(Firewall::open).unwrap().unwrap();
    let id = SandboxId::new("ghost").unwrap();
    let err = fw
        .pin(
            &id,
            "192.0.2.1".parse().unwrap(),
            443,
            std::time::Duration::from_secs(5),
        )
        .unwrap_err();
    assert!(
        matches!(err, NetfilterError::UnknownSandbox { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("ghost"));
    assert!(fw.counters(&id).is_err());
    let net = sandbox("real", "tapr", 4);
    fw.apply(&net).unwrap();
    let zero_ttl = fw.pin(
        net.id(),
        "192.0.2.1".parse().unwrap(),
        443,
        std::time::Duration::ZERO,
    );
    assert!(matches!(zero_ttl, Err(NetfilterError::Invalid { .. })));
    let port0 = fw.pin(
        net.id(),
        "192.0.2.1".parse().unwrap(),
        0,
        std::time::Duration::from_secs(1),
    );
    assert!(matches!(port0, Err(NetfilterError::Invalid { .. })));
}

#[test]
fn repinning_refreshes_the_timeout() {
    let ns = NetNs::new("repin").unwrap();
    let fw = ns.run(Firewall::open).unwrap().unwrap();
    let net = sandbox("sb-r", "tapr", 5);
    fw.apply(&net).unwrap();
    let addr = "192.0.2.1".parse().unwrap();
    fw.pin(net.id(), addr, 443, std::time::Duration::from_secs(5))
        .unwrap();
    fw.pin(net.id(), addr, 443, std::time::Duration::from_secs(500))
        .unwrap();
    let rs = ruleset(&ns);
    let set = find(&rs, "set", "pin4-tapr");
    let elems = set["elem"].as_array().unwrap();
    assert_eq!(elems.len(), 1, "one element, not two");
    assert_eq!(elems[0]["elem"]["timeout"], 500, "{set}");
}

#[test]
fn a_full_pin_set_refuses_more_pins() {
    use cleave_netfilter::{MAX_PINS_PER_CALL, MAX_PINS_PER_SET};
    use std::time::Duration;
    let ns = NetNs::new("pinsize").unwrap();
    let fw = ns.run(Firewall::open).unwrap().unwrap();
    let net = sandbox("sb-full", "ctap9", 9);
    fw.apply(&net).unwrap();
    let all: Vec<(std::net::IpAddr, u16)> = (0..MAX_PINS_PER_SET)
        .map(|i| (format!("8.{}.{}.1", i / 256, i % 256).parse().unwrap(), 443))
        .collect();
    for chunk in all.chunks(MAX_PINS_PER_CALL) {
        fw.pin_many(net.id(), chunk, Duration::from_secs(60))
            .unwrap();
    }
    let listing = ns
        .exec_ok("nft", &["list", "set", "inet", "cleave", "pin4-ctap9"])
        .unwrap();
    let listing = String::from_utf8(listing.stdout).unwrap();
    assert!(listing.contains("size 4096"), "{listing:.300}");
    // Every pin of a full-size call is really in the set (a call is several messages).
    assert_eq!(listing.matches(". 443").count(), MAX_PINS_PER_SET as usize);
    // Re-pinning an existing pair only refreshes it.
    fw.pin(net.id(), all[0].0, 443, Duration::from_secs(60))
        .unwrap();
    let e = fw
        .pin(
            net.id(),
            "9.9.9.9".parse().unwrap(),
            443,
            Duration::from_secs(60),
        )
        .unwrap_err();
    assert!(
        e.raw_os_error() == Some(libc::ENFILE),
        "a full set refuses: {e}"
    );
    fw.teardown(net.id()).unwrap();
}
