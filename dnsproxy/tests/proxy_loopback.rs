//! End-to-end tests of the proxy on loopback against a fake authoritative
//! upstream the test starts (never a real resolver), with a recording
//! pinner. The same flows against real nftables sets are in netfilter_e2e.rs.

mod common;

use cleave_dnsproxy::{DnsProxy, Limits, PolicySpec, ProxyConfig, SandboxNet, SandboxServer};
use common::client::{addrs, query_bytes, tcp, udp, udp_raw};
use common::fake_upstream::{FakeUpstream, Mode};
use common::pinner::RecordingPinner;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn upstream() -> FakeUpstream {
    let up = FakeUpstream::start(LO);
    up.a("api.example.com", "8.8.8.8", 5);
    up.aaaa("api.example.com", "2606:4700::1111", 5);
    up.a("long.example.com", "1.1.1.1", 100_000);
    up.a("meta.example.com", "169.254.169.254", 60);
    up.a("meta.example.com", "10.0.0.1", 60);
    up.a("meta.example.com", "192.168.1.1", 60);
    up.aaaa("meta.example.com", "64:ff9b::a9fe:a9fe", 60);
    up.aaaa("meta.example.com", "2002:a9fe:a9fe::1", 60);
    up.aaaa("meta.example.com", "fd00::1", 60);
    up.a("mixed.example.com", "169.254.169.254", 60);
    up.a("mixed.example.com", "8.8.4.4", 60);
    up.cname("alias.example.com", "internal.corp.example.net", 60);
    up.a("internal.corp.example.net", "10.1.2.3", 60);
    up.cname("www.example.com", "edge.cdn.example.org", 60);
    up.a("edge.cdn.example.org", "1.0.0.1", 60);
    up.txt("api.example.com", "v=spf1 ip4:10.0.0.0/8", 60);
    up.a("secret.example.com", "9.9.9.9", 60);
    up
}

fn config(up: &FakeUpstream) -> ProxyConfig {
    let mut cfg = ProxyConfig::with_upstreams(vec![up.addr()]);
    cfg.upstream.timeout = Duration::from_millis(200);
    cfg.upstream.attempts = 2;
    cfg
}

fn spec(names: &[&str]) -> PolicySpec {
    PolicySpec {
        names: names.iter().map(|s| s.to_string()).collect(),
        ..PolicySpec::default()
    }
}

const NAMES: &[&str] = &[
    "api.example.com",
    "long.example.com:443",
    "meta.example.com",
    "mixed.example.com:443",
    "alias.example.com",
    "www.example.com:443",
    "nx.example.com",
];

fn lo_net(guest: IpAddr) -> SandboxNet {
    SandboxNet {
        listen: SocketAddr::new(LO, 0),
        guest: vec![guest],
        device: None,
    }
}

async fn start(proxy: &DnsProxy, names: &[&str], pinner: Arc<RecordingPinner>) -> SandboxServer {
    proxy
        .add_sandbox("sb-test", &spec(names), &lo_net(LO), pinner)
        .await
        .unwrap()
}

#[tokio::test]
async fn allowed_public_answers_are_pinned_then_answered() {
    let up = upstream();
    let proxy = DnsProxy::new(config(&up));
    let pins = Arc::new(RecordingPinner::default());
    let sb = start(&proxy, NAMES, pins.clone()).await;

    let m = udp(LO, sb.udp_addr(), "api.example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&m), vec![ip("8.8.8.8")]);
    // Record TTL 5 s: pinned for the 30 s minimum; the guest sees 5 s.
    assert_eq!(m.answers[0].ttl, 5);
    let mut got = pins.pinned();
    got.sort();
    assert_eq!(
        got,
        vec![
            (ip("8.8.8.8"), 80, Duration::from_secs(30)),
            (ip("8.8.8.8"), 443, Duration::from_secs(30))
        ]
    );

    let m = udp(LO, sb.udp_addr(), "API.Example.COM.", RecordType::AAAA)
        .await
        .unwrap();
    assert_eq!(addrs(&m), vec![ip("2606:4700::1111")]);
    assert!(pins.pinned_addrs().contains(&ip("2606:4700::1111")));

    // A huge TTL is clamped: the pin lives the maximum and the guest never
    // holds the address longer than the pin.
    let m = udp(LO, sb.udp_addr(), "long.example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(m.answers[0].ttl, 3600);
    assert!(pins
        .pinned()
        .contains(&(ip("1.1.1.1"), 443, Duration::from_secs(3600))));
    assert!(!pins
        .pinned()
        .iter()
        .any(|p| p.0 == ip("1.1.1.1") && p.1 == 80));
}

#[tokio::test]
async fn blocked_answers_are_stripped_and_never_pinned() {
    let up = upstream();
    let proxy = DnsProxy::new(config(&up));
    let pins = Arc::new(RecordingPinner::default());
    let sb = start(&proxy, NAMES, pins.clone()).await;

    for qtype in [RecordType::A, RecordType::AAAA] {
        let m = udp(LO, sb.udp_addr(), "meta.example.com.", qtype)
            .await
            .unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{qtype}");
        assert!(addrs(&m).is_empty(), "{qtype}: {:?}", addrs(&m));
    }
    assert!(pins.pinned().is_empty(), "{:?}", pins.pinned());
    // 3 A + 3 AAAA addresses were blocked, each logged with its reason.
    assert_eq!(sb.handler().stats().snapshot().blocked_addrs, 6);

    // Mixed answers keep only the public address.
    let m = udp(LO, sb.udp_addr(), "mixed.example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(addrs(&m), vec![ip("8.8.4.4")]);
    assert_eq!(pins.pinned_addrs(), vec![ip("8.8.4.4")]);
}

#[tokio::test]
async fn cname_chains_are_followed_and_filtered() {
    let up = upstream();
    let proxy = DnsProxy::new(config(&up));
    let pins = Arc::new(RecordingPinner::default());
    let sb = start(&proxy, NAMES, pins.clone()).await;

    // Allowed name → CNAME → private address: the address is stripped.
    let m = udp(LO, sb.udp_addr(), "alias.example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(addrs(&m).is_empty());
    assert!(matches!(m.answers[0].data, RData::CNAME(_)));
    assert!(pins.pinned().is_empty());

    // Allowed name → CNAME to a public address outside the policy: answered
    // and pinned (the policy names what the guest asks for).
    let m = udp(LO, sb.udp_addr(), "www.example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(addrs(&m), vec![ip("1.0.0.1")]);
    assert_eq!(pins.pinned_addrs(), vec![ip("1.0.0.1")]);
}

#[tokio::test]
async fn cname_targets_missing_from_the_answer_are_asked_for() {
    let up = upstream();
    up.split_cnames(true);
    let proxy = DnsProxy::new(config(&up));
    let pins = Arc::new(RecordingPinner::default());
    let sb = start(&proxy, NAMES, pins.clone()).await;

    let m = udp(LO, sb.udp_addr(), "www.example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(addrs(&m), vec![ip("1.0.0.1")]);
    assert_eq!(
        up.queries(),
        2,
        "the CNAME target was asked in a second query"
    );
    let m = udp(LO, sb.udp_addr(), "alias.example.com.", RecordType::A)
        .await
        .unwrap();
    assert!(addrs(&m).is_empty());
    assert_eq!(pins.pinned_addrs(), vec![ip("1.0.0.1")]);
}

#[tokio::test]
async fn names_outside_the_policy_and_non_address_types_are_refused() {
    let up = upstream();
    let proxy = DnsProxy::new(config(&up));
    let pins = Arc::new(RecordingPinner::default());
    let sb = start(&proxy, NAMES, pins.clone()).await;

    let m = udp(LO, sb.udp_addr(), "secret.example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    // The bare parent of an allowed name is not allowed either.
    let m = udp(LO, sb.udp_addr(), "example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    for qtype in [
        RecordType::TXT,
        RecordType::MX,
        RecordType::SRV,
        RecordType::HTTPS,
        RecordType::ANY,
    ] {
        let m = udp(LO, sb.udp_addr(), "api.example.com.", qtype)
            .await
            .unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{qtype}");
        assert!(m.answers.is_empty());
    }
    assert_eq!(up.queries(), 0, "refused queries never reach upstream");
    assert!(pins.pinned().is_empty());
}

#[tokio::test]
async fn nxdomain_passes_through_without_pins() {
    let up = upstream();
    let proxy = DnsProxy::new(config(&up));
    let pins = Arc::new(RecordingPinner::default());
    let sb = start(&proxy, NAMES, pins.clone()).await;
    let m = udp(LO, sb.udp_addr(), "nx.example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(pins.pinned().is_empty());
}

#[tokio::test]
async fn pin_failure_gives_servfail_and_is_not_cached() {
    let up = upstream();
    let proxy = DnsProxy::new(config(&up));
    let pins = Arc::new(RecordingPinner::default());
    let sb = start(&proxy, NAMES, pins.clone()).await;

    pins.fail.store(true, Relaxed);
    let m = udp(LO, sb.udp_addr(), "api.example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(m.answers.is_empty(), "never an unpinned address");

    pins.fail.store(false, Relaxed);
    let m = udp(LO, sb.udp_addr(), "api.example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&m), vec![ip("8.8.8.8")]);
    assert_eq!(up.queries(), 2);
}

#[tokio::test]
async fn upstream_failure_gives_servfail_after_bounded_retries() {
    let up = upstream();
    let proxy = DnsProxy::new(config(&up));
    let pins = Arc::new(RecordingPinner::default());
    let sb = start(&proxy, NAMES, pins.clone()).await;

    up.set_mode(Mode::ServFail);
    let m = udp(LO, sb.udp_addr(), "api.example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(up.queries(), 2, "one server, two attempts");

    up.set_mode(Mode::Silent);
    let m = udp(LO, sb.udp_addr(), "api.example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(up.queries(), 4);
    assert!(pins.pinned().is_empty());
}

#[tokio::test]
async fn answers_are_cached_with_ttls_counting_down() {
    let up = upstream();
    let proxy = DnsProxy::new(config(&up));
    let pins = Arc::new(RecordingPinner::default());
    let sb = start(&proxy, NAMES, pins.clone()).await;
    let a = udp(LO, sb.udp_addr(), "long.example.com.", RecordType::A)
        .await
        .unwrap();
    let b = udp(LO, sb.udp_addr(), "LONG.example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(addrs(&a), addrs(&b));
    assert!(b.answers[0].ttl <= a.answers[0].ttl);
    assert_eq!(up.queries(), 1);
    assert_eq!(sb.handler().stats().snapshot().cache_hits, 1);
}

#[tokio::test]
async fn two_sandboxes_keep_caches_and_pins_apart() {
    let up = upstream();
    let proxy = DnsProxy::new(config(&up));
    let pins_a = Arc::new(RecordingPinner::default());
    let pins_b = Arc::new(RecordingPinner::default());
    let a = proxy
        .add_sandbox(
            "sb-a",
            &spec(&["api.example.com", "secret.example.com"]),
            &lo_net(LO),
            pins_a.clone(),
        )
        .await
        .unwrap();
    let b = proxy
        .add_sandbox(
            "sb-b",
            &spec(&["api.example.com:443"]),
            &lo_net(LO),
            pins_b.clone(),
        )
        .await
        .unwrap();

    let m = udp(LO, a.udp_addr(), "secret.example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(addrs(&m), vec![ip("9.9.9.9")]);
    // A cached and pinned secret.example.com; B still may not resolve it.
    let m = udp(LO, b.udp_addr(), "secret.example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);

    let before = up.queries();
    udp(LO, a.udp_addr(), "api.example.com.", RecordType::A)
        .await
        .unwrap();
    udp(LO, b.udp_addr(), "api.example.com.", RecordType::A)
        .await
        .unwrap();
    // B did not get A's cached answer: it asked upstream and pinned for itself.
    assert_eq!(up.queries(), before + 2);
    assert_eq!(pins_a.pinned_addrs(), vec![ip("8.8.8.8"), ip("9.9.9.9")]);
    assert_eq!(
        pins_b.pinned(),
        vec![(ip("8.8.8.8"), 443, Duration::from_secs(30))]
    );
}

#[tokio::test]
async fn queries_from_other_sources_are_dropped() {
    let up = upstream();
    let proxy = DnsProxy::new(config(&up));
    let pins = Arc::new(RecordingPinner::default());
    let sb = proxy
        .add_sandbox(
            "sb-src",
            &spec(NAMES),
            &lo_net(ip("127.0.0.2")),
            pins.clone(),
        )
        .await
        .unwrap();
    let (_, q) = query_bytes("api.example.com.", RecordType::A);
    assert!(udp_raw(LO, sb.udp_addr(), &q, Duration::from_millis(300))
        .await
        .is_none());
    assert!(tcp(sb.tcp_addr(), "api.example.com.", RecordType::A)
        .await
        .is_none());
    assert_eq!(sb.handler().stats().snapshot().dropped_source, 2);
    let m = udp(
        ip("127.0.0.2"),
        sb.udp_addr(),
        "api.example.com.",
        RecordType::A,
    )
    .await
    .unwrap();
    assert_eq!(addrs(&m), vec![ip("8.8.8.8")]);
}

#[tokio::test]
async fn malformed_packets_are_dropped() {
    let up = upstream();
    let proxy = DnsProxy::new(config(&up));
    let pins = Arc::new(RecordingPinner::default());
    let sb = start(&proxy, NAMES, pins.clone()).await;
    let (_, good) = query_bytes("api.example.com.", RecordType::A);
    let mut response_bit = good.clone();
    response_bit[2] |= 0x80;
    let mut two_questions = good.clone();
    two_questions[5] = 2;
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0; 5],
        vec![0xff; 12],
        good[..good.len() - 3].to_vec(),
        response_bit,
        two_questions,
        vec![0; 2000],
    ];
    for c in &cases {
        assert!(
            udp_raw(LO, sb.udp_addr(), c, Duration::from_millis(200))
                .await
                .is_none(),
            "{c:?}"
        );
    }
    let s = sb.handler().stats().snapshot();
    // The empty datagram and the 2000-byte one count as malformed too.
    assert_eq!(s.dropped_malformed, cases.len() as u64);
    assert_eq!(up.queries(), 0);
    // The proxy still serves.
    assert!(udp(LO, sb.udp_addr(), "api.example.com.", RecordType::A)
        .await
        .is_some());
}

#[tokio::test]
async fn tcp_serves_queries_and_closes_on_oversized_frames() {
    let up = upstream();
    let proxy = DnsProxy::new(config(&up));
    let pins = Arc::new(RecordingPinner::default());
    let sb = start(&proxy, NAMES, pins.clone()).await;

    let m = tcp(sb.tcp_addr(), "api.example.com.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(addrs(&m), vec![ip("8.8.8.8")]);

    let mut s = tokio::net::TcpStream::connect(sb.tcp_addr()).await.unwrap();
    s.write_all(&4000u16.to_be_bytes()).await.unwrap();
    s.write_all(&[0u8; 100]).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "connection must be closed, got {n:?}"
    );
    assert_eq!(sb.handler().stats().snapshot().tcp_closed_oversized, 1);
}

#[tokio::test]
async fn query_rate_is_bounded_per_sandbox() {
    let up = upstream();
    let mut cfg = config(&up);
    cfg.limits = Limits {
        // No refill: the test sees exactly the burst, whatever the timing.
        queries_per_sec: 0,
        burst: 5,
        ..Limits::default()
    };
    let proxy = DnsProxy::new(cfg);
    let pins = Arc::new(RecordingPinner::default());
    let a = start(&proxy, NAMES, pins.clone()).await;
    let b = start(&proxy, NAMES, pins.clone()).await;
    let (_, q) = query_bytes("secret.example.com.", RecordType::A);
    let mut answered = 0;
    for _ in 0..20 {
        if udp_raw(LO, a.udp_addr(), &q, Duration::from_millis(100))
            .await
            .is_some()
        {
            answered += 1;
        }
    }
    assert_eq!(answered, 5);
    assert_eq!(a.handler().stats().snapshot().dropped_rate, 15);
    // Another sandbox's budget is its own.
    assert!(udp(LO, b.udp_addr(), "api.example.com.", RecordType::A)
        .await
        .is_some());
}

#[tokio::test]
async fn dropping_a_sandbox_closes_its_open_tcp_connections() {
    let up = upstream();
    let proxy = DnsProxy::new(config(&up));
    let pins = Arc::new(RecordingPinner::default());
    let sb = start(&proxy, NAMES, pins.clone()).await;
    let mut s = tokio::net::TcpStream::connect(sb.tcp_addr()).await.unwrap();
    let (_, q) = query_bytes("api.example.com.", RecordType::A);
    let framed = |q: &[u8]| {
        let mut f = (q.len() as u16).to_be_bytes().to_vec();
        f.extend_from_slice(q);
        f
    };
    s.write_all(&framed(&q)).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut len))
        .await
        .unwrap()
        .unwrap();
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut answer).await.unwrap();

    // The sandbox goes away; its open connection must not keep answering.
    drop(sb);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = s.write_all(&framed(&q)).await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("the connection is closed, not left hanging");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "a dropped sandbox answered: {n:?}"
    );
}

#[tokio::test]
async fn an_answer_pins_and_returns_at_most_the_cap() {
    use cleave_dnsproxy::handler::MAX_ADDRS_PER_ANSWER;
    let up = upstream();
    for i in 0..40 {
        up.a("many.example.com", &format!("8.8.{i}.1"), 60);
    }
    let proxy = DnsProxy::new(config(&up));
    let pins = Arc::new(RecordingPinner::default());
    let sb = start(&proxy, &["many.example.com:443"], pins.clone()).await;
    let m = tcp(sb.tcp_addr(), "many.example.com.", RecordType::A)
        .await
        .unwrap();
    let got = addrs(&m);
    assert_eq!(got.len(), MAX_ADDRS_PER_ANSWER);
    assert_eq!(pins.pinned().len(), MAX_ADDRS_PER_ANSWER, "one port each");
    // What is returned is exactly what is pinned.
    for a in &got {
        assert!(pins.pinned_addrs().contains(a));
    }
    assert_eq!(
        sb.handler().stats().snapshot().capped_addrs,
        40 - MAX_ADDRS_PER_ANSWER as u64
    );
}

#[tokio::test]
async fn a_name_with_too_many_ports_is_refused() {
    let up = upstream();
    let proxy = DnsProxy::new(config(&up));
    let ports: Vec<String> = (1..=17).map(|p| p.to_string()).collect();
    let name = format!("api.example.com:{}", ports.join(","));
    let err = proxy
        .add_sandbox(
            "sb-ports",
            &spec(&[&name]),
            &lo_net(LO),
            Arc::new(RecordingPinner::default()),
        )
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("more than 16 ports"), "{err}");
}

#[tokio::test]
async fn shutdown_frees_the_address_at_once() {
    let up = upstream();
    let proxy = DnsProxy::new(config(&up));
    let pins = Arc::new(RecordingPinner::default());
    let sb = start(&proxy, NAMES, pins.clone()).await;
    let (udp, tcp_addr) = (sb.udp_addr(), sb.tcp_addr());
    let mut open = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    sb.shutdown().await;
    // Nothing of it is left holding the port, and its open connection is closed.
    std::net::UdpSocket::bind(udp).expect("the UDP address is free");
    let mut buf = [0u8; 4];
    let n = tokio::time::timeout(Duration::from_secs(3), open.read(&mut buf))
        .await
        .expect("closed, not hanging");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}

#[tokio::test]
async fn a_listener_waits_briefly_for_its_address_and_then_says_why() {
    let up = upstream();
    let proxy = DnsProxy::new(config(&up));
    // Something (a process between fork and exec, in a node) still holds the address.
    let held = std::net::UdpSocket::bind(SocketAddr::new(LO, 0)).unwrap();
    let addr = held.local_addr().unwrap();
    let net = SandboxNet {
        listen: addr,
        guest: vec![LO],
        device: None,
    };
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);
    });
    let sb = proxy
        .add_sandbox(
            "sb-late",
            &spec(NAMES),
            &net,
            Arc::new(RecordingPinner::default()),
        )
        .await
        .expect("bound once the address was let go of");
    assert_eq!(sb.udp_addr(), addr);
    release.await.unwrap();
    // Held for good: an error naming the address.
    let _keep = std::net::UdpSocket::bind(SocketAddr::new(LO, 0)).unwrap();
    let busy = SandboxNet {
        listen: _keep.local_addr().unwrap(),
        ..net
    };
    let e = proxy
        .add_sandbox(
            "sb-busy",
            &spec(NAMES),
            &busy,
            Arc::new(RecordingPinner::default()),
        )
        .await
        .err()
        .expect("the address stays taken");
    assert!(e.to_string().contains("cannot listen on"), "{e}");
}
