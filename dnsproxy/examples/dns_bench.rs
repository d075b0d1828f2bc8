//! DNS proxy benchmark: added latency over a direct query to the same fake
//! upstream (p50/p99) with pinning into real nftables sets, and queries/s,
//! side by side with `dnsmasq --nftset` doing the same job.
//!
//! Everything runs inside a network namespace this program creates (and
//! removes on exit): the fake authoritative upstream, the proxy, dnsmasq and
//! the client, all on that namespace's loopback. Run as root:
//!
//!     cargo run --release -p cleave-dnsproxy --example dns_bench [-- QUERIES]
//!
//! Each query asks a new name (`q<N>.bench.example.com`), so every query
//! goes upstream and pins a new address: the proxy into the sandbox's
//! `ipv4_addr . inet_service` set (port 443), dnsmasq into an `ipv4_addr`
//! set. The client and upstream run on CPU 1; the proxy (one thread) and
//! dnsmasq run on CPU `SERVER_CPU` (second argument, default 0):
//!
//!     dns_bench [QUERIES [SERVER_CPU]]     (QUERIES: 1000, at most 1024)

#[path = "../tests/common/mod.rs"]
mod common;

use cleave_dnsproxy::{DnsProxy, FirewallPinner, Limits, PolicySpec, ProxyConfig};
use cleave_netfilter::testutil::NetNs;
use cleave_netfilter::{Firewall, SandboxId, TapName, MAX_PINS_PER_SET};
use common::client::query_bytes;
use common::fake_upstream::FakeUpstream;
use hickory_proto::rr::RecordType;
use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const PROXY_PORT: u16 = 5300;
const DNSMASQ_PORT: u16 = 5301;
const NOPIN_PORT: u16 = 5302;

/// Pins nothing: isolates the proxy's own cost from the netlink round trip.
struct NoPin;

impl cleave_dnsproxy::Pinner for NoPin {
    fn pin(&self, _: &[(IpAddr, u16)], _: Duration) -> Result<(), cleave_dnsproxy::PinError> {
        Ok(())
    }
}

fn pin_to(cpu: usize) {
    let mut set = CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = sched_setaffinity(Pid::from_raw(0), &set);
    }
}

/// Sequential queries, one at a time; round-trip times in microseconds.
fn latencies(to: SocketAddr, tag: &str, n: usize) -> Vec<f64> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(to).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 2048];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (_, q) = query_bytes(&format!("l{i}.{tag}.bench.example.com."), RecordType::A);
        let t = Instant::now();
        sock.send(&q).unwrap();
        if sock.recv(&mut buf).is_ok() {
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    out.sort_by(|a, b| a.partial_cmp(b).unwrap());
    out
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Queries/s with `window` queries outstanding; lost replies count as lost.
fn throughput(to: SocketAddr, tag: &str, n: usize, window: usize, fresh: bool) -> (f64, usize) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(to).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let queries: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let name = if fresh {
                format!("t{i}.{tag}.bench.example.com.")
            } else {
                format!("hot{}.{tag}.bench.example.com.", i % 16)
            };
            query_bytes(&name, RecordType::A).1
        })
        .collect();
    let mut buf = [0u8; 2048];
    let (mut sent, mut answered, mut lost, mut outstanding) = (0, 0, 0, 0);
    let start = Instant::now();
    while answered + lost < n {
        while outstanding < window && sent < n {
            sock.send(&queries[sent]).unwrap();
            sent += 1;
            outstanding += 1;
        }
        match sock.recv(&mut buf) {
            Ok(_) => {
                answered += 1;
                outstanding -= 1;
            }
            Err(_) => {
                lost += outstanding;
                outstanding = 0;
            }
        }
    }
    (answered as f64 / start.elapsed().as_secs_f64(), lost)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    // Every phase starts from an empty pin set; the throughput phase pins 4 × n names.
    if n == 0 || 4 * n > MAX_PINS_PER_SET as usize {
        eprintln!(
            "dns_bench: QUERIES must be 1..={} (a sandbox's pin set holds {MAX_PINS_PER_SET} \
             and the throughput phase pins 4 × QUERIES names)",
            MAX_PINS_PER_SET / 4
        );
        std::process::exit(2);
    }
    // CPU for the proxy and dnsmasq; the client and upstream use CPU 1.
    let server_cpu: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let ns = NetNs::new("dbench").expect("create namespace (run as root)");
    ns.run(|| run(&ns, n, server_cpu)).expect("enter namespace");
}

fn run(ns: &NetNs, n: usize, server_cpu: usize) {
    pin_to(1);
    let up = FakeUpstream::start(LO);
    up.wildcard_spread("bench.example.com", 300);

    // The sandbox whose sets the proxy pins into.
    let fw = Arc::new(Firewall::open().unwrap());
    let id = SandboxId::new("bench").unwrap();
    let net = cleave_netfilter::SandboxNet::new(
        id.clone(),
        TapName::new("btap0").unwrap(),
        "02:00:00:00:00:02".parse().unwrap(),
        Ipv4Addr::new(10, 9, 0, 2),
        Ipv4Addr::new(10, 9, 0, 1),
    )
    .unwrap();
    fw.apply(&net).unwrap();

    // The proxy on one core (a current-thread runtime on CPU 0).
    let upstream_addr = up.addr();
    let fw2 = fw.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let proxy_thread = std::thread::spawn(move || {
        pin_to(server_cpu);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut cfg = ProxyConfig::with_upstreams(vec![upstream_addr]);
            cfg.limits = Limits {
                queries_per_sec: 10_000_000,
                burst: 10_000_000,
                max_inflight: 4096,
                ..Limits::default()
            };
            cfg.cache_entries = 1 << 20;
            let proxy = DnsProxy::new(cfg);
            let spec = PolicySpec {
                names: vec!["*.bench.example.com:443".into()],
                ..PolicySpec::default()
            };
            let sn = cleave_dnsproxy::SandboxNet {
                listen: SocketAddr::new(LO, PROXY_PORT),
                guest: vec![LO],
                device: None,
            };
            let _server = proxy
                .add_sandbox("bench", &spec, &sn, Arc::new(FirewallPinner::new(fw2, id)))
                .await
                .unwrap();
            let nopin_net = cleave_dnsproxy::SandboxNet {
                listen: SocketAddr::new(LO, NOPIN_PORT),
                ..sn.clone()
            };
            let _nopin = proxy
                .add_sandbox("nopin", &spec, &nopin_net, Arc::new(NoPin))
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            let _ = stop_rx.await;
        });
    });
    ready_rx.recv().unwrap();

    // dnsmasq on the same core, same upstream, pinning into an nftables set
    // (dnsmasq's nftset takes plain address sets, not address . port).
    ns.exec_ok(
        "nft",
        &["add table inet dnsmasqbench; add set inet dnsmasqbench pin4 { type ipv4_addr; flags timeout; timeout 300s; }"],
    )
    .expect("create dnsmasq's set");
    let cpu = server_cpu.to_string();
    let _dnsmasq = ns
        .spawn(
            "taskset",
            &[
                "-c",
                &cpu,
                "dnsmasq",
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
                "--user=root",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                &format!("--port={DNSMASQ_PORT}"),
                &format!("--server=127.0.0.1#{}", up.addr().port()),
                "--nftset=/bench.example.com/4#inet#dnsmasqbench#pin4",
                "--stop-dns-rebind",
                "--dns-forward-max=4096",
                "--cache-size=10000",
                "--pid-file=",
            ],
        )
        .expect("start dnsmasq");
    std::thread::sleep(Duration::from_millis(500));

    let proxy = SocketAddr::new(LO, PROXY_PORT);
    let dnsmasq = SocketAddr::new(LO, DNSMASQ_PORT);
    // Warm up each path (sockets, first set elements).
    latencies(up.addr(), "warm", 200);
    latencies(proxy, "warm", 200);
    latencies(dnsmasq, "warm", 200);

    let direct = latencies(up.addr(), "d", n);
    let nopin = latencies(SocketAddr::new(LO, NOPIN_PORT), "n", n);
    let pin_alone = {
        let id = SandboxId::new("bench").unwrap();
        let mut v: Vec<f64> = (0..n as u32)
            .map(|i| {
                let addr = IpAddr::V4(Ipv4Addr::from(0x0200_0000 | i));
                let t = Instant::now();
                fw.pin_many(&id, &[(addr, 443)], Duration::from_secs(300))
                    .unwrap();
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v
    };
    // A full set refuses pins (the proxy then answers SERVFAIL): empty it between phases.
    let empty_pins = || fw.release(&SandboxId::new("bench").unwrap()).unwrap();
    empty_pins();
    let ours = latencies(proxy, "p", n);
    let theirs = latencies(dnsmasq, "m", n);
    empty_pins();
    let (tp_ours, lost_ours) = throughput(proxy, "tp", n * 4, 32, true);
    let (tp_theirs, lost_theirs) = throughput(dnsmasq, "tm", n * 4, 32, true);
    let (hot_ours, hot_lost_ours) = throughput(proxy, "hp", n * 4, 32, false);
    let (hot_theirs, hot_lost_theirs) = throughput(dnsmasq, "hm", n * 4, 32, false);

    let pinned = ns
        .exec_ok("nft", &["list", "set", "inet", "cleave", "pin4-btap0"])
        .map(|o| String::from_utf8_lossy(&o.stdout).matches(" . 443").count())
        .unwrap_or(0);
    let pinned_dnsmasq = ns
        .exec_ok(
            "nft",
            &["-j", "list", "set", "inet", "dnsmasqbench", "pin4"],
        )
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .matches("\"elem\"")
                .count()
        })
        .unwrap_or(0);

    println!("queries per latency run: {n} (sequential, each a new name); proxy and dnsmasq on CPU {server_cpu}, client and upstream on CPU 1");
    println!("| path | p50 µs | p99 µs | p50 added µs | p99 added µs |");
    println!("| --- | --- | --- | --- | --- |");
    let (d50, d99) = (pct(&direct, 0.5), pct(&direct, 0.99));
    println!("| direct to fake upstream | {d50:.1} | {d99:.1} | – | – |");
    for (name, v) in [
        ("cleave-dnsproxy (pin to nftables)", &ours),
        ("cleave-dnsproxy, no-op pinner", &nopin),
        ("dnsmasq --nftset", &theirs),
    ] {
        let (p50, p99) = (pct(v, 0.5), pct(v, 0.99));
        println!(
            "| {name} | {p50:.1} | {p99:.1} | {:.1} | {:.1} |",
            p50 - d50,
            p99 - d99
        );
    }
    println!(
        "| one `Firewall::pin_many` call alone | {:.1} | {:.1} | – | – |",
        pct(&pin_alone, 0.5),
        pct(&pin_alone, 0.99)
    );
    println!();
    println!("| throughput, one core, 32 outstanding | new name each query (upstream + pin) | 16 hot names (cache) |");
    println!("| --- | --- | --- |");
    println!("| cleave-dnsproxy | {tp_ours:.0} q/s (lost {lost_ours}) | {hot_ours:.0} q/s (lost {hot_lost_ours}) |");
    println!("| dnsmasq --nftset | {tp_theirs:.0} q/s (lost {lost_theirs}) | {hot_theirs:.0} q/s (lost {hot_lost_theirs}) |");
    println!();
    println!("pins in the sandbox set: {pinned}; elements in dnsmasq's set: {pinned_dnsmasq}; upstream saw {} queries", up.queries());

    let _ = stop_tx.send(());
    let _ = proxy_thread.join();
    let _ = fw.teardown(&SandboxId::new("bench").unwrap());
}
