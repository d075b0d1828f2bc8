//! Sandbox network slots at scale, host side (as root, inside a network namespace it makes
//! and removes): the time to build one sandbox's network — claim a slot, create its tap,
//! install its chains and sets with the policy, give the tap the host's addresses, start
//! its DNS listener — when 1, 100, 1,000 (and, with `--slots 10000`, 10,000) sandboxes
//! already exist, then the time to take one down. No traffic is sent.
//!
//! `cargo run --release -p cleave-agent --example net_bench -- [--slots N]`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cleave_agent::net::addressing::NodeRange;
use cleave_agent::net::{EgressPolicy, NetNode, NetOptions, SandboxNetwork};
use cleave_netfilter::testutil::NetNs;

fn pct(xs: &mut [Duration], p: f64) -> f64 {
    xs.sort();
    let i = ((xs.len() - 1) as f64 * p).round() as usize;
    xs[i].as_secs_f64() * 1e6
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let slots: usize = args
        .iter()
        .position(|a| a == "--slots")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse().expect("--slots N"))
        .unwrap_or(1000);
    raise_fd_limit();
    let checkpoints: Vec<usize> = [1usize, 100, 1000, 10_000]
        .into_iter()
        .filter(|&c| c <= slots)
        .collect();
    let ns = NetNs::new("netbench").expect("a network namespace (run as root)");
    let locks = tempfile::tempdir().unwrap();
    let policy = EgressPolicy::parse(
        &["api.example.com:443".into(), "*.pkg.example.org".into()],
        &["192.0.2.0/24:5432".into()],
    )
    .unwrap();
    let rows = ns
        .run(|| {
            let node = NetNode::open(NetOptions {
                range: NodeRange::default(),
                uplink: Some("lo".into()),
                dns_upstream: vec!["127.0.0.1:53".parse::<SocketAddr>().unwrap()],
                lock_dir: locks.path().to_path_buf(),
            })
            .unwrap();
            let mut alive = Vec::with_capacity(slots);
            let mut rows = Vec::new();
            for &cp in &checkpoints {
                // Fill up to one below the checkpoint, then time 20 creates and destroys
                // at that occupancy.
                while alive.len() + 1 < cp {
                    let id = format!("bench-{}", alive.len());
                    alive.push(SandboxNetwork::create(&node, &id, &policy).unwrap());
                    if alive.len() % 500 == 0 {
                        eprintln!("net_bench: {} sandboxes", alive.len());
                    }
                }
                let (mut up, mut down) = (Vec::new(), Vec::new());
                let mut steps = [Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()];
                for k in 0..20 {
                    let t = Instant::now();
                    let n =
                        SandboxNetwork::create(&node, &format!("probe-{cp}-{k}"), &policy).unwrap();
                    up.push(t.elapsed());
                    let s = n.timings();
                    for (v, d) in
                        steps
                            .iter_mut()
                            .zip([s.claim, s.tap, s.chains, s.host_side, s.dns])
                    {
                        v.push(d);
                    }
                    let t = Instant::now();
                    drop(n);
                    down.push(t.elapsed());
                }
                let split: Vec<f64> = steps.iter_mut().map(|v| pct(v, 0.5)).collect();
                rows.push((
                    cp,
                    pct(&mut up, 0.5),
                    pct(&mut up, 0.99),
                    pct(&mut down, 0.5),
                    pct(&mut down, 0.99),
                    split,
                ));
                eprintln!("net_bench: checkpoint {cp} done");
            }
            drop(alive);
            rows
        })
        .unwrap();
    println!("| sandboxes alive | build p50 | build p99 | claim | tap | chains + policy | host addresses | DNS listener | teardown p50 | teardown p99 |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (cp, b50, b99, d50, d99, s) in rows {
        println!(
            "| {cp} | {b50:.0} µs | {b99:.0} µs | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {d50:.0} µs | {d99:.0} µs |",
            s[0], s[1], s[2], s[3], s[4]
        );
    }
}
