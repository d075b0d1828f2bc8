//! Real traffic between namespaces proves each rule of the per-tap chains.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use cleave_netfilter::{AllowRule, NetMode, Uplink};
use common::*;

#[test]
fn pinned_pair_is_reachable_and_unpinned_is_not() {
    let lab = Lab::new("pin", 1);
    let g = lab.g(0);
    let _s1 = tcp_echo(&lab.remote, sa(REMOTE, 8080));
    let _s2 = tcp_echo(&lab.remote, sa(REMOTE, 8081));
    let _s3 = tcp_echo(&lab.remote, sa(REMOTE_OTHER, 8080));
    let _s6 = tcp_echo(&lab.remote, sa(REMOTE6, 8080));
    lab.fw.apply(&g.net()).unwrap();

    // Nothing is pinned yet: nothing gets out.
    assert!(!tcp_ok(&g.ns, sa(REMOTE, 8080), BLOCKED));

    let ttl = Duration::from_secs(60);
    lab.fw.pin(&g.id, REMOTE.into(), 8080, ttl).unwrap();
    lab.fw.pin(&g.id, REMOTE6.into(), 8080, ttl).unwrap();
    assert!(tcp_ok(&g.ns, sa(REMOTE, 8080), OK), "pinned v4 pair");
    assert!(tcp_ok(&g.ns, sa(REMOTE6, 8080), OK), "pinned v6 pair");
    assert!(
        !tcp_ok(&g.ns, sa(REMOTE, 8081), BLOCKED),
        "same address, other port"
    );
    assert!(
        !tcp_ok(&g.ns, sa(REMOTE_OTHER, 8080), BLOCKED),
        "same port, other address"
    );

    let c = lab.fw.counters(&g.id).unwrap();
    assert!(c.forward_dropped.packets >= 3, "{c:?}");
    assert!(c.forward_dropped.bytes > 0, "{c:?}");
}

#[test]
fn pin_many_pins_all_in_one_call() {
    let lab = Lab::new("pinmany", 1);
    let g = lab.g(0);
    let _s = [8080u16, 8081, 8082].map(|p| tcp_echo(&lab.remote, sa(REMOTE, p)));
    let _u = udp_echo(&lab.remote, sa(REMOTE, 9000));
    lab.fw.apply(&g.net()).unwrap();
    let pins: Vec<(IpAddr, u16)> = vec![
        (REMOTE.into(), 8080),
        (REMOTE.into(), 8082),
        (REMOTE.into(), 9000),
        (REMOTE6.into(), 8080),
    ];
    lab.fw
        .pin_many(&g.id, &pins, Duration::from_secs(60))
        .unwrap();
    assert!(tcp_ok(&g.ns, sa(REMOTE, 8080), OK));
    assert!(tcp_ok(&g.ns, sa(REMOTE, 8082), OK));
    assert!(!tcp_ok(&g.ns, sa(REMOTE, 8081), BLOCKED));
    assert!(udp_ok(&g.ns, g.ip4.into(), sa(REMOTE, 9000), OK), "UDP pin");
}

#[test]
fn pin_expires_but_established_connection_survives() {
    let lab = Lab::new("expiry", 1);
    let g = lab.g(0);
    let _s = tcp_echo(&lab.remote, sa(REMOTE, 8080));
    lab.fw.apply(&g.net()).unwrap();
    let pinned_at = Instant::now();
    lab.fw
        .pin(&g.id, REMOTE.into(), 8080, Duration::from_secs(1))
        .unwrap();
    let mut before = connect(&g.ns, sa(REMOTE, 8080), OK).expect("pinned pair connects");
    assert!(echoes(&mut before));

    // Wait out the 1 s timeout with margin.
    std::thread::sleep(Duration::from_millis(1600).saturating_sub(pinned_at.elapsed()));
    assert!(
        !tcp_ok(&g.ns, sa(REMOTE, 8080), BLOCKED),
        "a new connection after expiry must be dropped"
    );
    assert!(
        echoes(&mut before),
        "the established connection keeps working"
    );
}

#[test]
fn spoofed_source_address_and_mac_are_dropped() {
    let lab = Lab::new("spoof", 1);
    let g = lab.g(0);
    let _t = tcp_echo(&lab.remote, sa(REMOTE, 8080));
    let _u = udp_echo(&lab.remote, sa(REMOTE, 9000));
    lab.fw.apply(&g.net()).unwrap();
    let pins = [(REMOTE.into(), 8080), (REMOTE.into(), 9000)];
    lab.fw
        .pin_many(&g.id, &pins, Duration::from_secs(60))
        .unwrap();

    // Control: the guest's own address gets through.
    assert!(udp_ok(&g.ns, g.ip4.into(), sa(REMOTE, 9000), OK));
    // A second address on the guest's interface is a spoofed source.
    g.ns.ip(&["addr", "add", "10.200.1.99/24", "dev", "eth0"])
        .unwrap();
    let spoof: IpAddr = "10.200.1.99".parse().unwrap();
    assert!(
        !udp_ok(&g.ns, spoof, sa(REMOTE, 9000), BLOCKED),
        "spoofed IPv4 source"
    );
    g.ns.ip(&["addr", "add", "fd00:1::99/64", "dev", "eth0", "nodad"])
        .unwrap();
    let spoof6: IpAddr = "fd00:1::99".parse().unwrap();
    lab.fw
        .pin(&g.id, REMOTE6.into(), 9000, Duration::from_secs(60))
        .unwrap();
    let _u6 = udp_echo(&lab.remote, sa(REMOTE6, 9000));
    assert!(udp_ok(&g.ns, g.ip6.into(), sa(REMOTE6, 9000), OK));
    assert!(
        !udp_ok(&g.ns, spoof6, sa(REMOTE6, 9000), BLOCKED),
        "spoofed IPv6 source"
    );

    // Right address, wrong MAC.
    assert!(tcp_ok(&g.ns, sa(REMOTE, 8080), OK));
    g.ns.ip(&["link", "set", "eth0", "address", "02:00:00:00:99:99"])
        .unwrap();
    // Both sides re-learn the neighbour, so replies would reach the new MAC:
    // only the MAC rule stands between the guest and the remote.
    g.ns.ip(&["neigh", "flush", "dev", "eth0"]).unwrap();
    lab.router.ip(&["neigh", "flush", "dev", &g.tap]).unwrap();
    let before = lab.fw.counters(&g.id).unwrap().forward_dropped.packets;
    assert!(!tcp_ok(&g.ns, sa(REMOTE, 8080), BLOCKED), "spoofed MAC");
    assert!(
        !udp_ok(&g.ns, g.ip4.into(), sa(REMOTE, 9000), BLOCKED),
        "spoofed MAC (udp)"
    );
    let after = lab.fw.counters(&g.id).unwrap().forward_dropped.packets;
    assert_eq!(
        after, before,
        "MAC spoofing is dropped before the counted catch-all"
    );
    let seen = lab
        .router
        .exec_ok("ip", &["neigh", "show", "dev", &g.tap])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&seen.stdout).contains("02:00:00:00:99:99"),
        "the router has learned the new MAC, so only the rule drops the traffic"
    );
}

#[test]
fn metadata_is_dropped_even_when_allowed_or_pinned() {
    let lab = Lab::new("meta", 1);
    let g = lab.g(0);
    let _m = tcp_echo(&lab.remote, sa(METADATA, 80));
    let _a = tcp_echo(&lab.remote, sa(ALLOWED_HOST, 80));
    let net = g
        .net()
        .with_allow([AllowRule::new("0.0.0.0/0".parse().unwrap(), None)])
        .unwrap();
    lab.fw.apply(&net).unwrap();
    lab.fw
        .pin(&g.id, METADATA.into(), 80, Duration::from_secs(60))
        .unwrap();
    assert!(tcp_ok(&g.ns, sa(ALLOWED_HOST, 80), OK), "allow CIDR works");
    assert!(
        !tcp_ok(&g.ns, sa(METADATA, 80), BLOCKED),
        "metadata endpoint"
    );
    // Naming the metadata range itself changes nothing.
    lab.fw
        .set_policy(
            &g.id,
            &[
                AllowRule::new("169.254.0.0/16".parse().unwrap(), None),
                AllowRule::new("203.0.113.0/24".parse().unwrap(), None),
            ],
        )
        .unwrap();
    assert!(tcp_ok(&g.ns, sa(ALLOWED_HOST, 80), OK));
    assert!(!tcp_ok(&g.ns, sa(METADATA, 80), BLOCKED));
}

#[test]
fn policy_changes_and_release_are_elements_that_take_effect_at_once() {
    let lab = Lab::new("policy", 1);
    let g = lab.g(0);
    let _a = tcp_echo(&lab.remote, sa(ALLOWED_HOST, 443));
    let _b = tcp_echo(&lab.remote, sa(ALLOWED_HOST, 444));
    let _c = tcp_echo(&lab.remote, sa(REMOTE, 8090));
    lab.fw.apply(&g.net()).unwrap();
    assert!(
        !tcp_ok(&g.ns, sa(ALLOWED_HOST, 443), BLOCKED),
        "no policy, no egress"
    );
    let only = |port| {
        [AllowRule::new(
            "203.0.113.0/24".parse().unwrap(),
            Some(cleave_netfilter::PortRange::single(port).unwrap()),
        )]
    };
    lab.fw.set_policy(&g.id, &only(443)).unwrap();
    assert!(tcp_ok(&g.ns, sa(ALLOWED_HOST, 443), OK));
    assert!(!tcp_ok(&g.ns, sa(ALLOWED_HOST, 444), BLOCKED));
    lab.fw.set_policy(&g.id, &only(444)).unwrap();
    assert!(tcp_ok(&g.ns, sa(ALLOWED_HOST, 444), OK));
    assert!(
        !tcp_ok(&g.ns, sa(ALLOWED_HOST, 443), BLOCKED),
        "the old policy is gone"
    );
    // Overlapping rules are refused whole; the policy in force stays.
    let bad = [
        AllowRule::new("203.0.0.0/8".parse().unwrap(), None),
        AllowRule::new("203.0.113.0/24".parse().unwrap(), None),
    ];
    assert!(lab.fw.set_policy(&g.id, &bad).is_err());
    assert!(tcp_ok(&g.ns, sa(ALLOWED_HOST, 444), OK));
    // Release: policy and pins emptied, chains kept (the slot allows nothing).
    lab.fw
        .pin(&g.id, REMOTE.into(), 8090, Duration::from_secs(60))
        .unwrap();
    assert!(tcp_ok(&g.ns, sa(REMOTE, 8090), OK));
    lab.fw.release(&g.id).unwrap();
    assert!(!tcp_ok(&g.ns, sa(ALLOWED_HOST, 444), BLOCKED));
    assert!(!tcp_ok(&g.ns, sa(REMOTE, 8090), BLOCKED));
    assert_eq!(lab.fw.list().unwrap().len(), 1, "the slot's chains remain");
}

#[test]
fn allow_cidr_with_ports_limits_ports() {
    let lab = Lab::new("ports", 1);
    let g = lab.g(0);
    let _a = tcp_echo(&lab.remote, sa(ALLOWED_HOST, 443));
    let _b = tcp_echo(&lab.remote, sa(ALLOWED_HOST, 444));
    let net = g
        .net()
        .with_allow([AllowRule::new(
            "203.0.113.0/24".parse().unwrap(),
            Some(cleave_netfilter::PortRange::single(443).unwrap()),
        )])
        .unwrap();
    lab.fw.apply(&net).unwrap();
    assert!(tcp_ok(&g.ns, sa(ALLOWED_HOST, 443), OK));
    assert!(!tcp_ok(&g.ns, sa(ALLOWED_HOST, 444), BLOCKED));
}

#[test]
fn guest_reaches_its_resolver_on_53_and_nothing_else_host_local() {
    let lab = Lab::new("input", 2);
    let (g, other) = (lab.g(0), lab.g(1));
    let _dns_udp = udp_echo(&lab.router, sa(g.gw4, 53));
    let _dns_tcp = tcp_echo(&lab.router, sa(g.gw4, 53));
    let _dns6 = udp_echo(&lab.router, sa(g.gw6, 53));
    let _ssh = tcp_echo(&lab.router, sa(g.gw4, 22));
    let _mdns = udp_echo(&lab.router, sa(g.gw4, 5353));
    let _uplink = tcp_echo(&lab.router, sa(ROUTER_UPLINK, 8080));
    let _other_gw = udp_echo(&lab.router, sa(other.gw4, 53));
    let _lo = tcp_echo(&lab.router, "0.0.0.0:9100".parse().unwrap());
    lab.fw.apply(&g.net()).unwrap();

    assert!(udp_ok(&g.ns, g.ip4.into(), sa(g.gw4, 53), OK), "udp 53");
    assert!(tcp_ok(&g.ns, sa(g.gw4, 53), OK), "tcp 53");
    assert!(
        udp_ok(&g.ns, g.ip6.into(), sa(g.gw6, 53), OK),
        "udp 53 over IPv6"
    );
    let before = lab.fw.counters(&g.id).unwrap().input_dropped.packets;
    assert!(
        !tcp_ok(&g.ns, sa(g.gw4, 22), BLOCKED),
        "other port on the resolver address"
    );
    assert!(
        !udp_ok(&g.ns, g.ip4.into(), sa(g.gw4, 5353), BLOCKED),
        "udp other port"
    );
    assert!(
        !tcp_ok(&g.ns, sa(ROUTER_UPLINK, 8080), BLOCKED),
        "the node's other address"
    );
    assert!(
        !udp_ok(&g.ns, g.ip4.into(), sa(other.gw4, 53), BLOCKED),
        "another tap's gateway"
    );
    assert!(
        !tcp_ok(&g.ns, sa(g.gw4, 9100), BLOCKED),
        "wildcard listener"
    );
    let after = lab.fw.counters(&g.id).unwrap().input_dropped.packets;
    assert!(
        after >= before + 5,
        "input drops counted: {before} -> {after}"
    );
}

#[test]
fn one_sandboxs_pins_never_open_anothers_egress() {
    let lab = Lab::new("iso", 2);
    let (a, b) = (lab.g(0), lab.g(1));
    let _s1 = tcp_echo(&lab.remote, sa(REMOTE, 8080));
    let _s2 = tcp_echo(&lab.remote, sa(REMOTE, 8081));
    lab.fw.apply(&a.net()).unwrap();
    lab.fw.apply(&b.net()).unwrap();
    let ttl = Duration::from_secs(60);
    lab.fw.pin(&a.id, REMOTE.into(), 8080, ttl).unwrap();
    lab.fw.pin(&b.id, REMOTE.into(), 8081, ttl).unwrap();
    assert!(tcp_ok(&a.ns, sa(REMOTE, 8080), OK));
    assert!(tcp_ok(&b.ns, sa(REMOTE, 8081), OK));
    assert!(
        !tcp_ok(&b.ns, sa(REMOTE, 8080), BLOCKED),
        "A's pin must not open B"
    );
    assert!(
        !tcp_ok(&a.ns, sa(REMOTE, 8081), BLOCKED),
        "B's pin must not open A"
    );
    // And sandboxes cannot reach each other.
    let _ga = tcp_echo(&a.ns, sa(a.ip4, 7000));
    assert!(!tcp_ok(&b.ns, sa(a.ip4, 7000), BLOCKED));
}

#[test]
fn blocked_mode_drops_everything() {
    let lab = Lab::new("blocked", 1);
    let g = lab.g(0);
    let _s = tcp_echo(&lab.remote, sa(REMOTE, 8080));
    let _dns = udp_echo(&lab.router, sa(g.gw4, 53));
    let net = g
        .net()
        .with_allow([AllowRule::new("0.0.0.0/0".parse().unwrap(), None)])
        .unwrap()
        .with_mode(NetMode::Blocked);
    lab.fw.apply(&net).unwrap();
    lab.fw
        .pin(&g.id, REMOTE.into(), 8080, Duration::from_secs(60))
        .unwrap();
    assert!(!tcp_ok(&g.ns, sa(REMOTE, 8080), BLOCKED));
    assert!(!udp_ok(&g.ns, g.ip4.into(), sa(g.gw4, 53), BLOCKED));
    let c = lab.fw.counters(&g.id).unwrap();
    assert!(
        c.forward_dropped.packets > 0 && c.input_dropped.packets > 0,
        "{c:?}"
    );
}

#[test]
fn nat_masquerades_through_the_uplink() {
    let lab = Lab::new("nat", 1);
    let g = lab.g(0);
    let net = g.net().with_nat(Uplink::new("up0").unwrap()).unwrap();
    lab.fw.apply(&net).unwrap();
    lab.fw
        .pin(&g.id, REMOTE.into(), 8090, Duration::from_secs(60))
        .unwrap();
    let listener = lab
        .remote
        .run(|| std::net::TcpListener::bind(sa(REMOTE, 8090)))
        .unwrap()
        .unwrap();
    let _client = connect(&g.ns, sa(REMOTE, 8090), OK).expect("pinned pair connects");
    let (_, peer) = listener.accept().unwrap();
    assert_eq!(
        peer.ip(),
        IpAddr::from(ROUTER_UPLINK),
        "source is the uplink address"
    );
}

#[test]
fn other_traffic_is_untouched_but_nothing_opens_a_connection_into_a_guest() {
    let lab = Lab::new("other", 1);
    let g = lab.g(0);
    lab.fw.apply(&g.net()).unwrap();
    // remote -> router host-local is not from or to a sandbox tap, so the table does not
    // judge it.
    let _r = tcp_echo(&lab.router, sa(ROUTER_UPLINK, 8080));
    let _g = tcp_echo(&g.ns, sa(g.ip4, 7000));
    assert!(tcp_ok(&lab.remote, sa(ROUTER_UPLINK, 8080), OK));
    // remote -> guest is routed to the tap, and the tap's inbound chain lets in only
    // replies to the guest's own flows.
    lab.remote
        .ip(&["route", "add", "10.200.1.0/24", "via", "198.51.100.1"])
        .unwrap();
    assert!(!tcp_ok(&lab.remote, sa(g.ip4, 7000), BLOCKED));
}
