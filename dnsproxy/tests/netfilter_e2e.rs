//! End-to-end through real nftables: guests in their own network namespaces
//! ask their resolver over a veth "tap", the proxy (in a host namespace the
//! test creates) asks a fake authoritative upstream on that namespace's
//! loopback, and pins into the sandbox's sets through `cleave-netfilter`.
//! The sets are read back with `nft -j list set`. No packet leaves the
//! test's namespaces; they are removed on drop, also on failure.

mod common;

use cleave_dnsproxy::{DnsProxy, FirewallPinner, PolicySpec, ProxyConfig, SandboxServer};
use cleave_netfilter::testutil::{veth, NetNs};
use cleave_netfilter::{Firewall, SandboxId, TapName};
use common::client::{addrs, blocking_udp};
use common::fake_upstream::FakeUpstream;
use common::nft::{set_elems, Elem};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

struct Guest {
    ns: NetNs,
    id: SandboxId,
    tap: String,
    resolver: SocketAddr,
    addr: Ipv4Addr,
}

impl Guest {
    fn ask(&self, name: &str, qtype: RecordType) -> Message {
        let to = self.resolver;
        let name = name.to_string();
        self.ns
            .run(move || blocking_udp(to, &name, qtype))
            .expect("enter guest namespace")
            .expect("no reply from the proxy")
    }
}

struct Ctx<'a> {
    host: &'a NetNs,
    fw: Arc<Firewall>,
    up: FakeUpstream,
    a: &'a Guest,
    b: &'a Guest,
}

impl Ctx<'_> {
    fn pins(&self, g: &Guest, family: u8) -> Vec<Elem> {
        set_elems(self.host, &format!("pin{family}-{}", g.tap))
    }
}

fn guest(host: &NetNs, n: u8) -> Guest {
    let ns = NetNs::new(&format!("dg{n}")).expect("create guest namespace");
    let tap = format!("dtap{n}");
    veth(host, &tap, &ns, "eth0").expect("veth");
    host.ip(&["addr", "add", &format!("10.0.{n}.1/24"), "dev", &tap])
        .unwrap();
    ns.ip(&[
        "link",
        "set",
        "eth0",
        "address",
        &format!("02:00:00:00:0{n}:02"),
    ])
    .unwrap();
    ns.ip(&["addr", "add", &format!("10.0.{n}.2/24"), "dev", "eth0"])
        .unwrap();
    Guest {
        ns,
        id: SandboxId::new(format!("sb-{n}")).unwrap(),
        tap,
        resolver: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, n, 1)), 53),
        addr: Ipv4Addr::new(10, 0, n, 2),
    }
}

fn upstream() -> FakeUpstream {
    let up = FakeUpstream::start(IpAddr::V4(Ipv4Addr::LOCALHOST));
    up.a("api.example.com", "8.8.8.8", 5);
    up.aaaa("api.example.com", "2606:4700::1111", 5);
    up.a("meta.example.com", "169.254.169.254", 60);
    up.a("meta.example.com", "10.0.0.1", 60);
    up.aaaa("meta.example.com", "64:ff9b::a9fe:a9fe", 60);
    up.aaaa("meta.example.com", "2002:a9fe:a9fe::1", 60);
    up.cname("alias.example.com", "internal.corp.example.net", 60);
    up.a("internal.corp.example.net", "192.168.7.7", 60);
    up.txt("api.example.com", "hello", 60);
    up.a("secret.example.com", "9.9.9.9", 60);
    up
}

fn spec(names: &[&str]) -> PolicySpec {
    PolicySpec {
        names: names.iter().map(|s| s.to_string()).collect(),
        ..PolicySpec::default()
    }
}

/// Builds the namespaces and sandboxes, runs `body` inside the host
/// namespace with both sandboxes' resolvers serving.
fn with_rig(body: impl FnOnce(&Ctx) + Send) {
    let host = NetNs::new("dhost").expect("create host namespace");
    let a = guest(&host, 1);
    let b = guest(&host, 2);
    host.run(|| {
        let fw = Arc::new(Firewall::open().expect("netlink in test namespace"));
        for g in [&a, &b] {
            let n = g.addr.octets()[2];
            let net = cleave_netfilter::SandboxNet::new(
                g.id.clone(),
                TapName::new(g.tap.clone()).unwrap(),
                format!("02:00:00:00:0{n}:02").parse().unwrap(),
                g.addr,
                Ipv4Addr::new(10, 0, n, 1),
            )
            .unwrap();
            fw.apply(&net).expect("apply sandbox chains");
        }
        let up = upstream();
        let mut cfg = ProxyConfig::with_upstreams(vec![up.addr()]);
        cfg.upstream.timeout = Duration::from_millis(300);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let proxy = DnsProxy::new(cfg);
        let serve = |g: &Guest, names: &[&str]| -> SandboxServer {
            let net = cleave_dnsproxy::SandboxNet {
                listen: g.resolver,
                guest: vec![IpAddr::V4(g.addr)],
                device: Some(g.tap.clone()),
            };
            let pinner = Arc::new(FirewallPinner::new(fw.clone(), g.id.clone()));
            rt.block_on(proxy.add_sandbox(g.id.as_str(), &spec(names), &net, pinner))
                .expect("start sandbox resolver")
        };
        let _sa = serve(
            &a,
            &[
                "api.example.com",
                "meta.example.com",
                "alias.example.com",
                "secret.example.com",
            ],
        );
        let _sb = serve(&b, &["api.example.com:443"]);
        let ctx = Ctx {
            host: &host,
            fw: fw.clone(),
            up,
            a: &a,
            b: &b,
        };
        body(&ctx);
        drop(_sa);
        drop(_sb);
        rt.shutdown_timeout(Duration::from_secs(1));
    })
    .expect("enter host namespace");
}

/// A pin set element with the 30 s minimum pin lifetime.
fn elem(addr: &str, port: u64) -> Elem {
    elem_ttl(addr, port, 30)
}

fn elem_ttl(addr: &str, port: u64, timeout_s: u64) -> Elem {
    Elem {
        addr: addr.to_string(),
        port,
        timeout_s: Some(timeout_s),
    }
}

#[test]
fn allowed_public_answers_are_pinned_into_the_sandbox_sets() {
    with_rig(|c| {
        let m = c.a.ask("api.example.com.", RecordType::A);
        assert_eq!(addrs(&m), vec!["8.8.8.8".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            m.answers[0].ttl, 5,
            "guest TTL is the record's, under the 30 s pin"
        );
        // Record TTL 5 s, pinned for the 30 s minimum; the pin was in the
        // set before the reply was sent (pinning returns first).
        assert_eq!(
            c.pins(c.a, 4),
            vec![elem("8.8.8.8", 80), elem("8.8.8.8", 443)]
        );

        let m = c.a.ask("api.example.com.", RecordType::AAAA);
        assert_eq!(
            addrs(&m),
            vec!["2606:4700::1111".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            c.pins(c.a, 6),
            vec![elem("2606:4700::1111", 80), elem("2606:4700::1111", 443)]
        );
        // Nothing went into the other sandbox's sets.
        assert!(c.pins(c.b, 4).is_empty());
        assert!(c.pins(c.b, 6).is_empty());
    });
}

#[test]
fn metadata_private_and_embedded_answers_are_stripped_and_not_pinned() {
    with_rig(|c| {
        for qtype in [RecordType::A, RecordType::AAAA] {
            let m = c.a.ask("meta.example.com.", qtype);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            assert!(addrs(&m).is_empty(), "{qtype}: {:?}", addrs(&m));
        }
        let m = c.a.ask("alias.example.com.", RecordType::A);
        assert_eq!(m.answers.len(), 1, "only the CNAME remains");
        assert!(addrs(&m).is_empty());
        assert!(c.pins(c.a, 4).is_empty());
        assert!(c.pins(c.a, 6).is_empty());
    });
}

#[test]
fn disallowed_names_and_txt_are_refused_without_pins() {
    with_rig(|c| {
        assert_eq!(
            c.b.ask("secret.example.com.", RecordType::A)
                .metadata
                .response_code,
            ResponseCode::Refused
        );
        assert_eq!(
            c.a.ask("other.example.org.", RecordType::A)
                .metadata
                .response_code,
            ResponseCode::Refused
        );
        assert_eq!(
            c.a.ask("api.example.com.", RecordType::TXT)
                .metadata
                .response_code,
            ResponseCode::Refused
        );
        assert_eq!(c.up.queries(), 0);
        for g in [c.a, c.b] {
            assert!(c.pins(g, 4).is_empty());
        }
    });
}

#[test]
fn two_sandboxes_keep_caches_and_pins_apart() {
    with_rig(|c| {
        c.a.ask("secret.example.com.", RecordType::A);
        c.a.ask("api.example.com.", RecordType::A);
        let before = c.up.queries();
        let m = c.b.ask("api.example.com.", RecordType::A);
        assert_eq!(addrs(&m), vec!["8.8.8.8".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            c.up.queries(),
            before + 1,
            "B asked upstream itself, not A's cache"
        );
        assert_eq!(
            c.pins(c.a, 4),
            vec![
                elem("8.8.8.8", 80),
                elem("8.8.8.8", 443),
                elem_ttl("9.9.9.9", 80, 60),
                elem_ttl("9.9.9.9", 443, 60)
            ]
        );
        // B's policy names port 443 only, and B never sees A's secret name.
        assert_eq!(c.pins(c.b, 4), vec![elem("8.8.8.8", 443)]);
    });
}

#[test]
fn pin_failure_gives_servfail() {
    with_rig(|c| {
        // Tear the sandbox's firewall objects down under the proxy: its pin
        // sets are gone, so pinning fails for real.
        assert!(c.fw.teardown(&c.a.id).expect("teardown"));
        let m = c.a.ask("api.example.com.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(m.answers.is_empty(), "never an unpinned address");
        // B is unaffected.
        let m = c.b.ask("api.example.com.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    });
}
