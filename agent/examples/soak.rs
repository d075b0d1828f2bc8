//! Soak and fault storms against the node library (needs a KVM that runs Linux guests,
//! and, with `--net`, the lab's node namespace: scripts/soak.sh sets both up).
//!
//! 1. `--cycles N` fork → exec `true` → destroy cycles, two at a time (with `--net`, each
//!    sandbox gets a network slot, a DNS proxy and its nftables chains), printing every
//!    `--every` cycles what a leak would grow: this process's fds and RSS, host
//!    MemAvailable, worker processes, runtime directories, cgroup leaves, taps.
//! 2. Faults, each beside a healthy sandbox that must keep answering: a guest flooding
//!    its vsock with output; a guest that stops answering (its worker SIGSTOPped) during
//!    a timed exec; a worker SIGKILLed mid-exec. Each must end only its own sandbox.
//!
//! Output is markdown (tables and one line per fault) for docs/PERFORMANCE.md.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cleave_agent::fork::jail::{Jail, DEFAULT_FIRST_UID, DEFAULT_UIDS};
use cleave_agent::fork::store::{TemplateName, TemplateStore};
use cleave_agent::host::memory;
use cleave_agent::net::{EgressPolicy, NetOptions};
use cleave_agent::node::boot::resolve_image;
use cleave_agent::node::templates::TemplateSpec;
use cleave_agent::node::{LiveSandbox, Node, NodeLimits, NodeOptions, SandboxRequest};
use cleave_agent::vmm::runtime_dir::RuntimeDir;
use cleave_guest::protocol::ExecRequest;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn count_dir(dir: &Path, keep: impl Fn(&str) -> bool) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_str().is_some_and(&keep))
                .count()
        })
        .unwrap_or(0)
}

/// What a leak would grow.
struct Sample {
    fds: usize,
    rss_kib: u64,
    avail_mib: u64,
    workers: usize,
    /// Zygotes and template workers (one zygote per loaded template while the pool runs).
    others: usize,
    runtime_dirs: usize,
    cgroups: usize,
    taps: usize,
}

fn sample() -> Sample {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let comms: Vec<String> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .unwrap_or_default();
    let named = |names: &[&str]| comms.iter().filter(|c| names.contains(&c.as_str())).count();
    let workers = named(&["cleave-fork-wor"]);
    let others = named(&["cleave-zygote", "cleave-template"]);
    Sample {
        fds: count_dir(Path::new("/proc/self/fd"), |_| true),
        rss_kib,
        avail_mib: memory::available_kib().unwrap_or(0) >> 10,
        workers,
        others,
        runtime_dirs: count_dir(&RuntimeDir::base(), |n| n.starts_with("vm-")),
        cgroups: count_dir(Path::new("/sys/fs/cgroup/cleave"), |n| {
            n.starts_with("worker-")
        }),
        taps: count_dir(Path::new("/sys/class/net"), |n| {
            Path::new("/sys/class/net")
                .join(n)
                .join("tun_flags")
                .exists()
        }),
    }
}

fn row(cycles: u64, s: &Sample) {
    println!(
        "| {cycles} | {} | {} | {} | {} | {} | {} | {} | {} |",
        s.fds, s.rss_kib, s.avail_mib, s.workers, s.others, s.runtime_dirs, s.cgroups, s.taps
    );
}

fn request(net: bool) -> Result<SandboxRequest> {
    Ok(SandboxRequest {
        template: TemplateName::default_name(),
        count: 1,
        ttl: None,
        policy: net
            .then(|| EgressPolicy::parse(&["allowed.test:80".into()], &[]))
            .transpose()?,
        all_or_nothing: false,
    })
}

fn create(node: &Node, net: bool) -> Result<Arc<LiveSandbox>> {
    let created = node
        .create_sandboxes(&request(net)?)?
        .pop()
        .context("one fork asked for")?
        .map_err(|f| anyhow::anyhow!(f.message))?;
    Ok(created.sandbox)
}

/// `true` in the sandbox, with a timeout: a guest that stops answering fails the cycle
/// (host-side deadline) instead of stalling the soak.
fn exec_ok(s: &LiveSandbox) -> Result<Duration> {
    let t = Instant::now();
    let mut req = ExecRequest::new(["true"]);
    req.timeout_ms = Some(30_000);
    let (x, _, _) = s.client().exec_collect(req, None)?;
    if x.status != cleave_guest::protocol::ExitStatus::Code(0) {
        bail!("true failed: {:?}", x.status);
    }
    Ok(t.elapsed())
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) -> Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)?;
    Ok(())
}

fn main() -> Result<()> {
    // Warnings (a pool that cannot refill, a worker that had to be killed) go to stderr.
    tracing_subscriber::fmt()
        .with_env_filter(cleave_agent::host::log_filter("warn"))
        .with_writer(std::io::stderr)
        .init();
    let cycles = arg("--cycles", 10_000);
    let every = arg("--every", 500).max(1);
    let net = flag("--net");
    let target_dir = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .context("target/<profile>/examples/soak")?
        .to_path_buf();
    let node = Node::open(NodeOptions {
        store: TemplateStore::default_location(),
        net: net.then(|| NetOptions {
            dns_upstream: vec!["45.45.0.53:53".parse().expect("an address")],
            pool: 2,
            ..NetOptions::default()
        }),
        limits: NodeLimits::unlimited(),
        gate_timeout: Duration::from_secs(30),
        warm_workers: 2,
        state_dir: None,
        worker_exe: Some(target_dir.join("cleave-fork-worker")),
        // `--no-cgroups`: the same jail without cgroup leaves (to tell whether they matter
        // to a finding).
        jail: if flag("--no-cgroups") {
            Jail::for_node(DEFAULT_FIRST_UID, DEFAULT_UIDS, None)?
        } else {
            Jail::best_effort()
        },
        worker_start: Default::default(),
    })?;
    let spec = TemplateSpec::new(TemplateName::default_name());
    node.ensure_template(&spec, (false, false), resolve_image)?;
    while !node.pools_warm() {
        std::thread::sleep(Duration::from_millis(10));
    }

    println!(
        "| cycles | fds | RSS KiB | MemAvailable MiB | workers | zygotes + template workers | \
         runtime dirs | cgroups | taps |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    row(0, &sample());
    let done = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let n = done.fetch_add(1, Ordering::AcqRel);
                if n >= cycles {
                    return;
                }
                // Each stage's time, to say where a slow cycle went.
                let mut times = [Duration::ZERO; 3];
                let t = Instant::now();
                let r = create(&node, net).and_then(|sb| {
                    times[0] = t.elapsed();
                    let e = exec_ok(&sb);
                    times[1] = t.elapsed() - times[0];
                    node.destroy(&sb.id)?;
                    times[2] = t.elapsed() - times[0] - times[1];
                    e
                });
                if t.elapsed() > Duration::from_secs(30) {
                    eprintln!(
                        "soak: cycle {n}: slow: create {:?}, exec {:?}, destroy {:?}",
                        times[0], times[1], times[2]
                    );
                }
                if let Err(e) = r {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("soak: cycle {n}: {e:#}");
                }
                if (n + 1).is_multiple_of(every) {
                    // Let the pools settle so the sample is comparable (bounded: a pool
                    // that cannot refill is itself a finding).
                    let t = Instant::now();
                    while !node.pools_warm() && t.elapsed() < Duration::from_secs(60) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    if !node.pools_warm() {
                        eprintln!("soak: cycle {n}: pools not warm after 60 s");
                    }
                    row(n + 1, &sample());
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    println!();
    println!(
        "{cycles} cycles in {secs:.0} s ({:.1}/s), {} failed",
        cycles as f64 / secs,
        failed.load(Ordering::Relaxed)
    );

    // Faults, each beside a healthy sandbox.
    println!();
    let healthy = create(&node, net)?;
    let calm = exec_ok(&healthy)?;

    // A flood: 64 MiB of output through vsock while the healthy sandbox execs.
    let flood = create(&node, net)?;
    let flooder = flood.client();
    let t = Instant::now();
    let h = std::thread::spawn(move || {
        flooder.exec_collect(
            ExecRequest::new(["sh", "-c", "head -c 67108864 /dev/zero"]),
            None,
        )
    });
    let mut during = Vec::new();
    while !h.is_finished() {
        during.push(exec_ok(&healthy)?);
    }
    let flooded = h.join().expect("the flood thread")?;
    let worst = during.iter().max().copied().unwrap_or_default();
    println!(
        "- flood: 64 MiB of stdout in {:.1} s (host kept {} bytes, the rest counted and marked); \
         {} execs in the other sandbox meanwhile, slowest {:.0} ms (calm: {:.0} ms)",
        t.elapsed().as_secs_f64(),
        flooded.1.len(),
        during.len(),
        worst.as_secs_f64() * 1e3,
        calm.as_secs_f64() * 1e3
    );
    node.destroy(&flood.id)?;

    // A guest that stops answering mid-exec (its whole VM frozen).
    let frozen = create(&node, net)?;
    let client = frozen.client();
    let pid = frozen.worker_pid();
    let h = std::thread::spawn(move || {
        let mut req = ExecRequest::new(["sleep", "30"]);
        req.timeout_ms = Some(1000);
        let t = Instant::now();
        (client.exec_collect(req, None).map(|_| ()), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    signal(pid, nix::sys::signal::Signal::SIGSTOP)?;
    let (r, waited) = h.join().expect("the exec thread");
    let healthy_ok = exec_ok(&healthy).is_ok();
    let t = Instant::now();
    node.destroy(&frozen.id)?;
    println!(
        "- stops answering: the timed exec (1 s) ended after {:.1} s with {}; the other \
         sandbox {}; destroying the frozen one took {:.1} s (SIGKILL after the grace)",
        waited.as_secs_f64(),
        match r {
            Ok(()) => "success (unexpected)".to_string(),
            Err(e) => format!("\"{e}\""),
        },
        if healthy_ok { "answered" } else { "FAILED" },
        t.elapsed().as_secs_f64()
    );

    // A worker killed mid-exec.
    let doomed = create(&node, net)?;
    let client = doomed.client();
    let pid = doomed.worker_pid();
    let h =
        std::thread::spawn(move || client.exec_collect(ExecRequest::new(["sleep", "30"]), None));
    std::thread::sleep(Duration::from_millis(300));
    signal(pid, nix::sys::signal::Signal::SIGKILL)?;
    let r = h.join().expect("the exec thread");
    std::thread::sleep(Duration::from_millis(100));
    let lost = node.reap_lost();
    println!(
        "- SIGKILL mid-exec: the exec ended with {}; reaped as lost: {}; the other sandbox {}",
        match r {
            Ok(_) => "success (unexpected)".to_string(),
            Err(e) => format!("\"{e}\""),
        },
        lost.iter()
            .map(|(id, why)| format!("{id} ({why})"))
            .collect::<Vec<_>>()
            .join(", "),
        if exec_ok(&healthy).is_ok() {
            "answered"
        } else {
            "FAILED"
        }
    );
    node.destroy(&healthy.id)?;
    node.shutdown();
    std::thread::sleep(Duration::from_millis(200));
    println!();
    println!("After every sandbox and the warm pools are gone:");
    println!();
    println!(
        "| cycles | fds | RSS KiB | MemAvailable MiB | workers | zygotes + template workers | \
         runtime dirs | cgroups | taps |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    row(cycles, &sample());
    Ok(())
}
