//! Sandbox network slots at scale, host side (as root, inside a network namespace it makes
//! and removes), when 1, 100, 1,000 (and, with `--slots 10000`, 10,000) sandboxes already
//! exist, side by side:
//! - on demand: build a slot (claim, tap, chains, host addresses), put the policy in, start
//!   the DNS listener; teardown removes the slot;
//! - pooled: take a ready slot, put the policy in (set elements), start the listener;
//!   release resets the slot and puts it back.
//!
//! No traffic is sent.
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

/// Each sandbox holds four fds (tap, UDP and TCP listeners, slot lock): raise the limit
/// to what `slots` needs (the hard limit too, where we may: CAP_SYS_RESOURCE).
fn raise_fd_limit(slots: usize) {
    let want = (slots as libc::rlim_t) * 4 + 1024;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_max = lim.rlim_max.max(want);
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                eprintln!(
                    "net_bench: cannot raise the fd limit to {want}: {}",
                    std::io::Error::last_os_error()
                );
            }
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
    raise_fd_limit(slots);
    let mut checkpoints: Vec<usize> = [1usize, 100, 1000, 10_000]
        .into_iter()
        .filter(|&c| c <= slots)
        .collect();
    if !checkpoints.contains(&slots) {
        checkpoints.push(slots);
    }
    let ns = NetNs::new("netbench").expect("a network namespace (run as root)");
    let locks = tempfile::tempdir().unwrap();
    let policy = EgressPolicy::parse(
        &["api.example.com:443".into(), "*.pkg.example.org".into()],
        &["192.0.2.0/24:5432".into()],
    )
    .unwrap();
    let rows = ns
        .run(|| {
            let opts = |pool| NetOptions {
                range: NodeRange::default(),
                uplink: Some("lo".into()),
                dns_upstream: vec!["127.0.0.1:53".parse::<SocketAddr>().unwrap()],
                lock_dir: locks.path().to_path_buf(),
                pool,
            };
            // Two nodes on one table and one set of slot locks: one builds every slot on
            // demand, the other keeps 20 ready.
            let node = NetNode::open(opts(0)).unwrap();
            let pooled_node = NetNode::open(opts(20)).unwrap();
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
                let mut row = Vec::new();
                for pooled in [false, true] {
                    let n0 = if pooled { &pooled_node } else { &node };
                    if pooled {
                        n0.fill_pool().unwrap();
                    }
                    let (mut up, mut down, mut policy_t) = (Vec::new(), Vec::new(), Vec::new());
                    for k in 0..20 {
                        let t = Instant::now();
                        let n = SandboxNetwork::create(n0, &format!("probe-{cp}-{k}"), &policy)
                            .unwrap();
                        up.push(t.elapsed());
                        policy_t.push(n.timings().policy);
                        let t = Instant::now();
                        drop(n); // on demand: the slot is removed; pooled: it goes back
                        down.push(t.elapsed());
                    }
                    row.push((
                        pct(&mut up, 0.5),
                        pct(&mut up, 0.99),
                        pct(&mut policy_t, 0.5),
                        pct(&mut down, 0.5),
                    ));
                }
                // Printed as measured: the 10,000 case takes many minutes.
                eprintln!(
                    "net_bench: at {cp}: {row:?} (build p50, p99, policy p50, release p50; µs)"
                );
                rows.push((cp, row));
                eprintln!("net_bench: checkpoint {cp} done");
            }
            // Removing thousands of taps one by one waits an RCU grace period each;
            // deleting the namespace (below) removes them all at once, with the table.
            std::mem::forget(alive);
            rows
        })
        .unwrap();
    println!("| sandboxes alive | path | network ready p50 | p99 | of which policy (set elements) p50 | release p50 |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: |");
    for (cp, row) in rows {
        for ((b50, b99, p50, d50), path) in row
            .into_iter()
            .zip(["slot built on demand", "slot from the pool"])
        {
            println!("| {cp} | {path} | {b50:.0} µs | {b99:.0} µs | {p50:.0} µs | {d50:.0} µs |");
        }
    }
}
