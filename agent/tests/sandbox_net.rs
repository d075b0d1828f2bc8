//! A sandbox's network on the host side, without a guest, inside a network namespace the
//! test makes (as root): the slot's tap with the host's addresses, chains owned by the
//! sandbox, the DNS listener on the tap; a second sandbox on the next slot; everything
//! gone on drop; a dead sandbox's chains reconciled; a full range refused whole.

use std::net::SocketAddr;
use std::path::Path;

use cleave_agent::net::addressing::NodeRange;
use cleave_agent::net::{EgressPolicy, NetNode, NetOptions, SandboxNetwork};
use cleave_netfilter::testutil::NetNs;
use cleave_netfilter::{Firewall, MacAddr, SandboxId, SandboxNet, TapName};

fn options(lock_dir: &Path, range: NodeRange) -> NetOptions {
    NetOptions {
        range,
        uplink: Some("lo".into()),
        // Never asked here: no guest sends a query.
        dns_upstream: vec!["127.0.0.1:53".parse::<SocketAddr>().unwrap()],
        lock_dir: lock_dir.to_path_buf(),
        pool: 0,
    }
}

fn text(ns: &NetNs, program: &str, args: &[&str]) -> String {
    String::from_utf8(ns.exec_ok(program, args).unwrap().stdout).unwrap()
}

#[test]
fn a_sandbox_network_is_built_whole_and_removed_whole() {
    let ns = NetNs::new("sbnet").unwrap();
    let locks = tempfile::tempdir().unwrap();
    let policy = EgressPolicy::parse(&["allowed.test:80".into()], &[]).unwrap();
    ns.run(|| {
        let node = NetNode::open(options(locks.path(), NodeRange::default())).unwrap();
        let a = SandboxNetwork::create(&node, "sb-a", &policy).unwrap();
        let b = SandboxNetwork::create(&node, "sb-b", &policy).unwrap();
        assert_eq!(
            (a.addrs().tap.as_str(), b.addrs().tap.as_str()),
            ("cl0", "cl1")
        );

        let addrs = text(&ns, "ip", &["-o", "addr", "show", "dev", "cl0"]);
        assert!(addrs.contains("10.231.0.1/30"), "{addrs}");
        assert!(addrs.contains("fd63:6c65:6176::1/126"), "{addrs}");
        let table = text(&ns, "nft", &["list", "table", "inet", "cleave"]);
        for chain in ["fwd-cl0", "in-cl0", "to-cl0", "nat-cl0", "fwd-cl1"] {
            assert!(
                table.contains(&format!("chain {chain} ")),
                "{chain}\n{table}"
            );
        }
        assert!(table.contains("cleave sandbox slot-0 (tap cl0)"));
        let udp = text(&ns, "ss", &["-lnu"]);
        assert!(udp.contains("10.231.0.1%cl0:53"), "{udp}");
        let tcp = text(&ns, "ss", &["-lnt"]);
        assert!(tcp.contains("10.231.0.1%cl0:53"), "{tcp}");

        let cfg = a.guest_config();
        assert_eq!(cfg.ipv4.addr.to_string(), "10.231.0.2");
        assert_eq!(cfg.ipv4.gateway.to_string(), "10.231.0.1");
        assert_eq!(
            cfg.nameservers,
            vec![std::net::IpAddr::V4(cfg.ipv4.gateway)]
        );
        cfg.validate().unwrap();

        drop(a);
        let links = text(&ns, "ip", &["-o", "link"]);
        assert!(
            !links.contains("cl0:"),
            "the tap goes with its last fd\n{links}"
        );
        let table = text(&ns, "nft", &["list", "table", "inet", "cleave"]);
        assert!(!table.contains("-cl0"), "{table}");
        assert!(
            table.contains("chain fwd-cl1 "),
            "the other sandbox is untouched"
        );
        let udp = text(&ns, "ss", &["-lnu"]);
        assert!(!udp.contains("10.231.0.1%cl0:53"), "{udp}");
        drop(b);
        let table = text(&ns, "nft", &["list", "table", "inet", "cleave"]);
        assert!(!table.contains("-cl"), "{table}");
    })
    .unwrap();
}

#[test]
fn a_dead_sandboxs_chains_are_reconciled_and_its_slot_reused() {
    let ns = NetNs::new("sbdead").unwrap();
    let locks = tempfile::tempdir().unwrap();
    let policy = EgressPolicy::parse(&["allowed.test".into()], &[]).unwrap();
    ns.run(|| {
        // What a crashed process leaves: chains on cl0, no lock held.
        let fw = Firewall::open().unwrap();
        let dead = SandboxNet::new(
            SandboxId::new("fork-dead").unwrap(),
            TapName::new("cl0").unwrap(),
            MacAddr::new([2, 0xc1, 0xea, 0, 0, 2]).unwrap(),
            "10.231.0.2".parse().unwrap(),
            "10.231.0.1".parse().unwrap(),
        )
        .unwrap();
        fw.apply(&dead).unwrap();
        let node = NetNode::open(options(locks.path(), NodeRange::default())).unwrap();
        let table = text(&ns, "nft", &["list", "table", "inet", "cleave"]);
        assert!(!table.contains("fork-dead"), "reconciled on open\n{table}");
        let a = SandboxNetwork::create(&node, "sb-new", &policy).unwrap();
        assert_eq!(a.addrs().tap, "cl0", "the freed slot is reused");
    })
    .unwrap();
}

#[test]
fn a_full_range_is_refused_and_nothing_is_half_made() {
    let ns = NetNs::new("sbfull").unwrap();
    let locks = tempfile::tempdir().unwrap();
    let policy = EgressPolicy::parse(&["allowed.test".into()], &[]).unwrap();
    ns.run(|| {
        let one_slot = NodeRange::new(
            "10.99.0.0/30".parse().unwrap(),
            "fd63:6c65:6176::/64".parse().unwrap(),
        )
        .unwrap();
        let node = NetNode::open(options(locks.path(), one_slot)).unwrap();
        let _a = SandboxNetwork::create(&node, "sb-a", &policy).unwrap();
        let before = text(&ns, "nft", &["list", "table", "inet", "cleave"]);
        let e = SandboxNetwork::create(&node, "sb-b", &policy)
            .err()
            .expect("no slot left");
        assert!(e.to_string().contains("widen the sandbox range"), "{e}");
        assert_eq!(
            text(&ns, "nft", &["list", "table", "inet", "cleave"]),
            before
        );
        // A bad id is refused before a slot is claimed.
        assert!(SandboxNetwork::create(&node, "bad id", &policy).is_err());
    })
    .unwrap();
}

#[test]
fn pooled_slots_take_a_policy_as_elements_and_come_back_clean() {
    let ns = NetNs::new("sbpool").unwrap();
    let locks = tempfile::tempdir().unwrap();
    let policy =
        EgressPolicy::parse(&["allowed.test".into()], &["192.0.2.0/24:443".into()]).unwrap();
    ns.run(|| {
        let mut opts = options(locks.path(), NodeRange::default());
        opts.pool = 2;
        let node = NetNode::open(opts).unwrap();
        assert_eq!(node.fill_pool().unwrap(), 2);
        assert_eq!(node.pool_depth(), 2);
        let links = text(&ns, "ip", &["-o", "link"]);
        assert!(links.contains("cl0:") && links.contains("cl1:"), "{links}");

        let a = SandboxNetwork::create(&node, "sb-a", &policy).unwrap();
        assert!(a.timings().slot.is_none(), "taken from the pool, not built");
        assert_eq!(node.pool_depth(), 1);
        let tap = a.addrs().tap.clone();
        let set = format!("allow4-{tap}");
        let allow = text(&ns, "nft", &["list", "set", "inet", "cleave", &set]);
        assert!(allow.contains("192.0.2.0/24 . tcp . 443"), "{allow}");

        drop(a);
        assert_eq!(node.pool_depth(), 2, "the slot went back");
        let allow = text(&ns, "nft", &["list", "set", "inet", "cleave", &set]);
        assert!(
            !allow.contains("192.0.2.0/24"),
            "and came back without its policy\n{allow}"
        );
        let links = text(&ns, "ip", &["-o", "link"]);
        assert!(
            links.contains(&format!("{tap}:")),
            "its tap is kept for the next sandbox"
        );

        // A full pool takes no more: a third sandbox's slot is built, then removed.
        let b = SandboxNetwork::create(&node, "sb-b", &policy).unwrap();
        let c = SandboxNetwork::create(&node, "sb-c", &policy).unwrap();
        let d = SandboxNetwork::create(&node, "sb-d", &policy).unwrap();
        assert!(d.timings().slot.is_some(), "the pool was empty: built now");
        let extra = d.addrs().tap.clone();
        drop((b, c, d));
        assert_eq!(node.pool_depth(), 2);
        let links = text(&ns, "ip", &["-o", "link"]);
        assert!(!links.contains(&format!("{extra}:")), "{links}");
    })
    .unwrap();
}
