//! Many sandboxes: apply and teardown leave an empty table (objects
//! counted), and reconcile after a simulated crash removes exactly the dead.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use cleave_netfilter::testutil::NetNs;
use cleave_netfilter::{Firewall, MacAddr, SandboxId, SandboxNet, TapName, Uplink};
use common::census;

fn sandbox(i: u32) -> SandboxNet {
    let [_, _, hi, lo] = i.to_be_bytes();
    let net = SandboxNet::new(
        SandboxId::new(format!("sb-{i}")).unwrap(),
        TapName::new(format!("ctap{i}")).unwrap(),
        MacAddr::new([2, 0, 0, hi, lo, 2]).unwrap(),
        Ipv4Addr::new(10, hi, lo, 2),
        Ipv4Addr::new(10, hi, lo, 1),
    )
    .unwrap()
    .with_ipv6(
        format!("fd00:{i:x}::2").parse().unwrap(),
        format!("fd00:{i:x}::1").parse().unwrap(),
    )
    .unwrap();
    // Every third sandbox is NATed, so teardown covers those objects too.
    if i.is_multiple_of(3) {
        net.with_nat(Uplink::new("eth0").unwrap()).unwrap()
    } else {
        net
    }
}

/// Objects one sandbox owns: fwd/in/to chains, 4 sets (pins, policy), 2 counters, 3
/// dispatch entries; NATed ones add a nat chain and 2 NAT entries.
fn objects_of(i: u32) -> usize {
    12 + if i.is_multiple_of(3) { 3 } else { 0 }
}

fn apply_then_teardown(n: u32) {
    let ns = NetNs::new(&format!("scale{n}")).unwrap();
    let fw = ns.run(Firewall::open).unwrap().unwrap();
    let empty = census(&ns);
    for i in 0..n {
        let net = sandbox(i);
        fw.apply(&net).unwrap();
        fw.pin(
            net.id(),
            "192.0.2.1".parse().unwrap(),
            443,
            Duration::from_secs(60),
        )
        .unwrap();
    }
    let full = census(&ns);
    let want: usize = (0..n).map(objects_of).sum();
    assert_eq!(full.sandbox_objects(), want, "objects after applying {n}");
    assert_eq!(full.set_elements, n as usize, "one pin each");
    assert_eq!(fw.list().unwrap().len(), n as usize);
    for i in 0..n {
        assert!(fw
            .teardown(&SandboxId::new(format!("sb-{i}")).unwrap())
            .unwrap());
    }
    let after = census(&ns);
    assert_eq!(after.sandbox_objects(), 0, "{after:?}");
    assert_eq!(after, empty, "only the base layout is left");
}

#[test]
fn teardown_of_100_sandboxes_leaves_an_empty_table() {
    apply_then_teardown(100);
}

#[test]
fn a_thousand_sandboxes_apply_and_tear_down_to_an_empty_table() {
    apply_then_teardown(1000);
}

#[test]
fn reconcile_after_crash_removes_exactly_the_dead_sandboxes() {
    let ns = NetNs::new("reconcile").unwrap();
    let nets: Vec<SandboxNet> = (0..12).map(sandbox).collect();
    {
        // The "agent" applies everything, then crashes: its handle and
        // memory are gone, the kernel state stays.
        let fw = ns.run(Firewall::open).unwrap().unwrap();
        for n in &nets {
            fw.apply(n).unwrap();
        }
    }
    let before = census(&ns);
    let live: Vec<SandboxId> = nets.iter().step_by(3).map(|n| n.id().clone()).collect();
    let dead: Vec<&SandboxNet> = nets.iter().filter(|n| !live.contains(n.id())).collect();

    let fw = ns.run(Firewall::open).unwrap().unwrap();
    let mut removed = fw.reconcile(&live).unwrap();
    removed.sort_by_key(|l| l.tap.clone());
    let mut want: Vec<_> = dead
        .iter()
        .map(|n| (Some(n.id().clone()), n.tap().clone()))
        .collect();
    want.sort_by_key(|w| w.1.clone());
    let got: Vec<_> = removed
        .iter()
        .map(|l| (l.sandbox.clone(), l.tap.clone()))
        .collect();
    assert_eq!(got, want, "reports exactly the dead");

    // Live sandboxes keep every object, byte for byte as listed; the dead
    // have none left.
    let after = census(&ns);
    let dead_taps: Vec<String> = dead.iter().map(|n| n.tap().to_string()).collect();
    let owned_by_dead = |name: &str| dead_taps.iter().any(|t| name.ends_with(&format!("-{t}")));
    let keep = |v: &Vec<String>| -> Vec<String> {
        v.iter().filter(|n| !owned_by_dead(n)).cloned().collect()
    };
    assert_eq!(after.chains, keep(&before.chains));
    assert_eq!(after.sets, keep(&before.sets));
    assert_eq!(after.counters, keep(&before.counters));
    let live_entries: Vec<_> = before
        .map_entries
        .iter()
        .filter(|(_, _, target)| !owned_by_dead(target))
        .cloned()
        .collect();
    assert_eq!(after.map_entries, live_entries);
    let want_live: usize = (0..12).step_by(3).map(objects_of).sum();
    assert_eq!(after.sandbox_objects(), want_live);

    // The new handle knows the live ones without having applied them.
    assert!(fw.reconcile(&live).unwrap().is_empty(), "idempotent");
    fw.pin(
        &live[0],
        "192.0.2.1".parse().unwrap(),
        443,
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(fw.teardown(&live[1]).unwrap());
    assert!(!fw.teardown(dead[0].id()).unwrap());
}

#[test]
fn a_fresh_handle_can_pin_and_tear_down_what_another_applied() {
    let ns = NetNs::new("handoff").unwrap();
    let agent = ns.run(Firewall::open).unwrap().unwrap();
    let net = sandbox(5);
    agent.apply(&net).unwrap();
    // e.g. the DNS proxy's own handle, opened before the sandbox existed
    let proxy = ns.run(Firewall::open).unwrap().unwrap();
    proxy
        .pin(
            net.id(),
            "192.0.2.9".parse().unwrap(),
            80,
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(census(&ns).set_elements, 1);
    assert!(agent.teardown(net.id()).unwrap());
    // The proxy's cached tap is now stale: pinning fails cleanly.
    let err = proxy
        .pin(
            net.id(),
            "192.0.2.9".parse().unwrap(),
            80,
            Duration::from_secs(60),
        )
        .unwrap_err();
    assert!(err.to_string().contains("sb-5"), "{err}");
    // Re-applied on a new tap, the proxy follows it.
    let moved = SandboxNet::new(
        net.id().clone(),
        TapName::new("moved0").unwrap(),
        net.guest_mac(),
        net.guest_ipv4(),
        net.host_ipv4(),
    )
    .unwrap();
    agent.apply(&moved).unwrap();
    proxy
        .pin(
            net.id(),
            "192.0.2.9".parse().unwrap(),
            80,
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(census(&ns).set_elements, 1);
}
