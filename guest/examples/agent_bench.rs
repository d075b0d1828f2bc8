//! Agent protocol benchmark, in-process over a Unix socketpair (no VM):
//! what the agent and protocol add on top of spawning a process.
//!
//! `cargo run --release -p cleave-guest --example agent_bench [N]`
//!
//! Side by side in one run: `true` through the agent vs `true` spawned
//! directly with `std::process::Command` (measured first, before the
//! reaper takes over `waitpid`); hello round trip; stdout and stdin
//! throughput through the agent.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_guest::protocol::{Client, ExecRequest, OutputEvent};
use cleave_guest::reseed::KernelReseed;
use cleave_guest::server::{GateMode, Reaper, Server, ServerConfig};

fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(v[v.len() / 2]), us(v[v.len() * 99 / 100]))
}

fn time<F: FnMut()>(n: usize, mut f: F) -> (f64, f64) {
    for _ in 0..n / 10 {
        f();
    }
    let v = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    percentiles(v)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);

    // Baseline before the reaper exists (std waits for its own child).
    let (b50, b99) = time(n, || {
        let s = std::process::Command::new("true").status().unwrap();
        assert!(s.success());
    });

    let reseed = Arc::new(KernelReseed {
        device: "/nonexistent".into(),
        set_clock: false,
        test_mode: cleave_guest::reseed::TestMode::Fail,
    });
    let server = Server::new(ServerConfig::new(GateMode::Open, reseed), Reaper::start());
    let (host, guest) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let r = guest.try_clone().unwrap();
        server.serve(r, guest);
    });
    let c = Client::new(host).unwrap();

    let (h50, h99) = time(n * 10, || {
        c.hello(Duration::from_secs(10)).unwrap();
    });
    let (e50, e99) = time(n, || {
        let (x, _, _) = c.exec_collect(ExecRequest::new(["true"]), None).unwrap();
        assert_eq!(x.status, cleave_guest::protocol::ExitStatus::Code(0));
    });

    let size: u64 = 1 << 30;
    let t = Instant::now();
    let mut got = 0u64;
    let req = ExecRequest::new(["head", "-c", &size.to_string(), "/dev/zero"]);
    c.exec(req, None, |ev| {
        if let OutputEvent::Stdout(d) = ev {
            got += d.len() as u64;
        }
    })
    .unwrap();
    assert_eq!(got, size);
    let out_mib_s = size as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    let src: Box<dyn Read + Send> = Box::new(std::io::repeat(0).take(size));
    let mut req = ExecRequest::new(["sh", "-c", "cat > /dev/null"]);
    req.stdin = true;
    c.exec(req, Some(src), |_| {}).unwrap();
    let in_mib_s = size as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();

    println!(
        "exec `true` direct (std::process::Command): p50 {b50:.0} us, p99 {b99:.0} us (n={n})"
    );
    println!(
        "exec `true` through the agent:              p50 {e50:.0} us, p99 {e99:.0} us (n={n})"
    );
    println!(
        "hello round trip:                           p50 {h50:.1} us, p99 {h99:.1} us (n={})",
        n * 10
    );
    println!("stdout guest->host: {out_mib_s:.0} MiB/s; stdin host->guest: {in_mib_s:.0} MiB/s (1 GiB each)");
}
