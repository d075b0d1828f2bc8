//! Benchmark: per-sandbox apply and teardown, and pin insertion, through
//! this crate (one netlink batch each) side by side with the same ruleset
//! applied through `nft -f` per sandbox (what mitos does), inside a network
//! namespace this program creates and removes.
//!
//! `cargo run --release -p cleave-netfilter --example nft_bench [-- --max 1000]`
//!
//! Prints a Markdown table for docs/PERFORMANCE.md.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cleave_netfilter::testutil::NetNs;
use cleave_netfilter::{Firewall, MacAddr, SandboxId, SandboxNet, TapName};

fn sandbox(prefix: &str, i: u32) -> SandboxNet {
    let [_, _, hi, lo] = i.to_be_bytes();
    SandboxNet::new(
        SandboxId::new(format!("{prefix}-{i}")).unwrap(),
        TapName::new(format!("{prefix}{i}")).unwrap(),
        MacAddr::new([2, 0, 0, hi, lo, 2]).unwrap(),
        Ipv4Addr::new(10, hi, lo, 2),
        Ipv4Addr::new(10, hi, lo, 1),
    )
    .unwrap()
    .with_ipv6(
        format!("fd00:{i:x}::2").parse().unwrap(),
        format!("fd00:{i:x}::1").parse().unwrap(),
    )
    .unwrap()
}

/// The same objects and rules `Firewall::apply` installs, as an nft script.
fn nft_apply_script(n: &SandboxNet) -> String {
    let t = n.tap();
    let id = n.id();
    let (g4, h4) = (n.guest_ipv4(), n.host_ipv4());
    let (g6, h6) = (n.guest_ipv6().unwrap(), n.host_ipv6().unwrap());
    let mac = n.guest_mac();
    let c = |what: &str| format!("comment \"cleave sandbox {id} (tap {t}): {what}\"");
    let mut s = String::new();
    s += &format!(
        "add set inet cleave pin4-{t} {{ type ipv4_addr . inet_service; flags timeout; {}; }}\n",
        c("pins v4")
    );
    s += &format!(
        "add set inet cleave pin6-{t} {{ type ipv6_addr . inet_service; flags timeout; {}; }}\n",
        c("pins v6")
    );
    s += &format!(
        "add counter inet cleave fwd-drop-{t} {{ {}; }}\n",
        c("egress drops")
    );
    s += &format!(
        "add counter inet cleave in-drop-{t} {{ {}; }}\n",
        c("drops to the host")
    );
    s += &format!(
        "add chain inet cleave fwd-{t} {{ {}; }}\n",
        c("egress policy")
    );
    s += &format!(
        "add chain inet cleave in-{t} {{ {}; }}\n",
        c("access to the host")
    );
    for chain in ["fwd", "in"] {
        let r = |rule: &str| format!("add rule inet cleave {chain}-{t} {rule}\n");
        s += &r("ct state invalid drop");
        s += &r("meta iiftype != ether drop");
        s += &r(&format!("ether saddr != {mac} drop"));
        s += &r(&format!("ip saddr != {g4} drop"));
        s += &r(&format!("ip6 saddr != {g6} drop"));
        if chain == "fwd" {
            s += &r("ct state established,related accept");
            s += &r(&format!(
                "ip daddr 169.254.0.0/16 counter name \"fwd-drop-{t}\" drop"
            ));
            s += &r(&format!(
                "ip6 daddr fd00:ec2::254 counter name \"fwd-drop-{t}\" drop"
            ));
            for (ip, set) in [("ip", "pin4"), ("ip6", "pin6")] {
                for l4 in ["tcp", "udp"] {
                    s += &r(&format!("{ip} daddr . {l4} dport @{set}-{t} accept"));
                }
            }
            s += &r(&format!("counter name \"fwd-drop-{t}\" drop"));
        } else {
            for ty in ["nd-neighbor-solicit", "nd-neighbor-advert"] {
                s += &r(&format!("ip6 hoplimit 255 icmpv6 type {ty} accept"));
            }
            for (ip, a) in [("ip", h4.to_string()), ("ip6", h6.to_string())] {
                for l4 in ["udp", "tcp"] {
                    s += &r(&format!("{ip} daddr {a} {l4} dport 53 accept"));
                }
            }
            s += &r(&format!("counter name \"in-drop-{t}\" drop"));
        }
    }
    s += &format!("add element inet cleave fwd_taps {{ \"{t}\" : goto fwd-{t} }}\n");
    s += &format!("add element inet cleave in_taps {{ \"{t}\" : goto in-{t} }}\n");
    s
}

fn nft_teardown_script(n: &SandboxNet) -> String {
    let t = n.tap();
    format!(
        "delete element inet cleave fwd_taps {{ \"{t}\" }}\n\
         delete element inet cleave in_taps {{ \"{t}\" }}\n\
         flush chain inet cleave fwd-{t}\ndelete chain inet cleave fwd-{t}\n\
         flush chain inet cleave in-{t}\ndelete chain inet cleave in-{t}\n\
         delete set inet cleave pin4-{t}\ndelete set inet cleave pin6-{t}\n\
         delete counter inet cleave fwd-drop-{t}\ndelete counter inet cleave in-drop-{t}\n"
    )
}

/// `nft -f -` with `script` on stdin; the child inherits this thread's
/// network namespace.
fn nft(script: &str) {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Clone, Copy)]
struct Stats {
    mean: Duration,
    p50: Duration,
    p99: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let n = v.len();
    Stats {
        mean: v.iter().sum::<Duration>() / n as u32,
        p50: v[n / 2],
        p99: v[(n * 99 / 100).min(n - 1)],
    }
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// Applies `n` sandboxes then tears them all down, timing each call.
fn run_ours(fw: &Firewall, n: u32) -> (Stats, Stats) {
    let nets: Vec<_> = (0..n).map(|i| sandbox("ours", i)).collect();
    let mut apply = Vec::new();
    for net in &nets {
        let t = Instant::now();
        fw.apply(net).unwrap();
        apply.push(t.elapsed());
    }
    let mut down = Vec::new();
    for net in &nets {
        let t = Instant::now();
        assert!(fw.teardown(net.id()).unwrap());
        down.push(t.elapsed());
    }
    (stats(apply), stats(down))
}

fn run_nft(n: u32) -> (Stats, Stats) {
    let nets: Vec<_> = (0..n).map(|i| sandbox("nft", i)).collect();
    let scripts: Vec<_> = nets
        .iter()
        .map(|n| (nft_apply_script(n), nft_teardown_script(n)))
        .collect();
    let mut apply = Vec::new();
    for (up, _) in &scripts {
        let t = Instant::now();
        nft(up);
        apply.push(t.elapsed());
    }
    let mut down = Vec::new();
    for (_, td) in &scripts {
        let t = Instant::now();
        nft(td);
        down.push(t.elapsed());
    }
    (stats(apply), stats(down))
}

fn main() {
    let max: u32 = std::env::args()
        .skip_while(|a| a != "--max")
        .nth(1)
        .map(|v| v.parse().expect("--max N"))
        .unwrap_or(1000);
    let ns = NetNs::new("bench").expect("create namespace (run as root)");
    ns.run(|| {
        let fw = Firewall::open().unwrap();
        // Warm up module loading and caches on both paths.
        run_ours(&fw, 5);
        run_nft(2);

        println!("| sandboxes | path | apply mean | apply p50 | apply p99 | teardown mean | teardown p50 | teardown p99 |");
        println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        let mut ratios = Vec::new();
        for n in [1u32, 100, 1000].into_iter().filter(|&n| n <= max) {
            let reps = if n == 1 { 200 } else { 1 };
            // n = 1 is repeated so its figures are not a single sample.
            let (mut oa, mut od) = (Vec::new(), Vec::new());
            let (mut na, mut nd) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                let (a, d) = run_ours(&fw, n);
                oa.push(a);
                od.push(d);
            }
            for _ in 0..reps.min(50) {
                let (a, d) = run_nft(n);
                na.push(a);
                nd.push(d);
            }
            let agg = |v: &[Stats]| Stats {
                mean: v.iter().map(|s| s.mean).sum::<Duration>() / v.len() as u32,
                p50: { let mut x: Vec<_> = v.iter().map(|s| s.p50).collect(); x.sort(); x[x.len() / 2] },
                p99: v.iter().map(|s| s.p99).max().unwrap(),
            };
            let (oa, od, na, nd) = (agg(&oa), agg(&od), agg(&na), agg(&nd));
            for (path, a, d) in [("cleave-netfilter (netlink batch)", oa, od), ("`nft -f` per sandbox", na, nd)] {
                println!(
                    "| {n} | {path} | {} | {} | {} | {} | {} | {} |",
                    us(a.mean), us(a.p50), us(a.p99), us(d.mean), us(d.p50), us(d.p99)
                );
            }
            ratios.push((n, na.mean.as_secs_f64() / oa.mean.as_secs_f64(), nd.mean.as_secs_f64() / od.mean.as_secs_f64()));
        }
        println!();
        for (n, a, d) in ratios {
            println!("- {n} sandboxes: apply {a:.0}x, teardown {d:.0}x faster than `nft -f`");
        }

        // Pin insertion rate into one sandbox's set.
        let net = sandbox("pin", 1);
        fw.apply(&net).unwrap();
        let ttl = Duration::from_secs(600);
        let addr = |k: u32| IpAddr::V4(Ipv4Addr::from(0xc000_0000u32 + k));
        // A set holds at most MAX_PINS_PER_SET (a full one refuses): each path starts
        // from an empty set.
        let k = cleave_netfilter::MAX_PINS_PER_SET - 96;
        let t = Instant::now();
        for i in 0..k {
            fw.pin(net.id(), addr(i), 443, ttl).unwrap();
        }
        let single = k as f64 / t.elapsed().as_secs_f64();
        fw.release(net.id()).unwrap();
        let t = Instant::now();
        let batch: Vec<(IpAddr, u16)> = (0..k).map(|i| (addr(i + k), 443)).collect();
        for chunk in batch.chunks(64) {
            fw.pin_many(net.id(), chunk, ttl).unwrap();
        }
        let many = k as f64 / t.elapsed().as_secs_f64();
        fw.release(net.id()).unwrap();
        let kn = 300u32;
        let t = Instant::now();
        for i in 0..kn {
            let a = addr(i + 2 * k);
            nft(&format!(
                "add element inet cleave pin4-{} {{ {a} . 443 timeout 600s }}\n",
                net.tap()
            ));
        }
        let nft_rate = kn as f64 / t.elapsed().as_secs_f64();
        fw.teardown(net.id()).unwrap();
        println!();
        println!("| pin path | pins/s |");
        println!("| --- | ---: |");
        println!("| `pin` (one batch per pin) | {single:.0} |");
        println!("| `pin_many`, 64 per batch | {many:.0} |");
        println!("| `nft add element` per pin | {nft_rate:.0} |");
    })
    .unwrap();
}
