//! Sandboxes on the network, proven with real traffic from real guests (the rig on kvm_pvm
//! hosts): every rule of a sandbox's tap, DNS answered and pinned by its own proxy, two
//! forks side by side, one sandbox's pins useless to another, no policy no network, bad
//! policies refused before anything starts, and nothing left behind — after teardown and
//! after `kill -9`. The "internet" is tests/lab/lab.sh: namespaces with no way out.
//! One rig boot for all.

use std::path::PathBuf;
use std::time::Duration;

use cleave_tests::{cleave_bin, json_lines, run_batch, sh_quote, Failures, Outcome, Scenario};

const RUNTIME: &str = "/tmp/cleave-net-test";
const POLICY: &str = "--allow allowed.test:80 --allow private.test --allow nat64meta.test \
                      --dns-upstream 45.45.0.53";
/// Checks every guest reports (tests/lab/guest-checks.sh).
const CHECKS: [&str; 11] = [
    "resolve-allowed",
    "pinned-port",
    "same-address-other-port",
    "never-resolved-address",
    "uplink-peer",
    "metadata",
    "unlisted-name",
    "private-answer",
    "nat64-metadata",
    "host-service",
    "host-uplink-address",
];

fn lab_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("lab")
}

/// Value of a `key=value` line in the output.
fn value<'a>(r: &'a Outcome, key: &str) -> Option<&'a str> {
    r.output
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::trim)
}

#[test]
fn sandboxes_on_the_network() {
    let lab = sh_quote(&lab_dir().join("lab.sh").to_string_lossy());
    let checks = std::fs::read_to_string(lab_dir().join("guest-checks.sh")).unwrap();
    let checks = sh_quote(&checks);
    let bin = sh_quote(&cleave_bin().to_string_lossy());
    let env = format!("export XDG_RUNTIME_DIR={RUNTIME}; mkdir -p {RUNTIME};");
    // cleave runs in the lab's node namespace: its taps, chains and proxies live there
    // (with the cgroup hierarchy in view, for its workers' leaves).
    let cleave = format!("{env} timeout 300 sh {lab} node {bin}");
    let node = "ip netns exec cl-node";
    let leftovers = format!(
        "echo taps=$({node} ip -o link show type tun | wc -l); \
         echo sandbox_chains=$({node} nft list table inet cleave 2>/dev/null | grep -cE 'chain (fwd|in|to|nat)-'); \
         echo sandbox_sets=$({node} nft list table inet cleave 2>/dev/null | grep -c 'set pin'); \
         echo workers=$(ps -eo comm | grep -cE '^cleave-(fork-wor|zygote|template)'); \
         echo flows=$({node} conntrack -L 2>/dev/null | grep -c 'src=10[.]231[.]')"
    );
    let scenarios = vec![
        Scenario::new("lab-up", format!("{lab} up && echo LAB-UP")),
        Scenario::new(
            "template",
            format!("{cleave} template create --name net --mem 128"),
        ),
        // Two forks, every rule checked from inside each; UDP probes counted at the target.
        Scenario::new(
            "forks-policy",
            format!(
                "{lab} udp-reset; {cleave} run --forks 2 --template net {POLICY} --json -- \
                 sh -c {checks}; echo rc=$?; echo udp=$({lab} udp-count)"
            ),
        ),
        // A fresh boot (no fork) gets the same network.
        Scenario::new(
            "fresh-boot",
            format!(
                "{cleave} run --mem 128 {POLICY} --json -- sh -c \
                 'nslookup -type=A allowed.test >/dev/null; \
                 printf \"GET / HTTP/1.0\\r\\n\\r\\n\" | nc -w 3 45.45.0.10 80'; echo rc=$?"
            ),
        ),
        // A keeps a pin alive while B (another policy) tries A's pinned pair, and the
        // internet tries to open a connection into A.
        Scenario::new(
            "cross-and-inbound",
            format!(
                "{cleave} run --forks 1 --template net --allow allowed.test:80 \
                 --dns-upstream 45.45.0.53 --json -- sh -c 'nc -l -p 7777 > /tmp/in 2>&1 & \
                 nslookup -type=A allowed.test >/dev/null; sleep 10; echo \"inbound=[$(cat /tmp/in)]\"' \
                 > {RUNTIME}/a.out 2>&1 & a=$!; \
                 for i in $(seq 1 150); do {node} nft list set inet cleave pin4-cl0 2>/dev/null \
                 | grep -q 45.45.0.10 && break; sleep 0.2; done; echo pinned_after=$i; \
                 ip netns exec cl-inet sh -c 'echo intruder | busybox nc -w 3 10.231.0.2 7777'; \
                 echo inbound_rc=$?; \
                 {cleave} run --forks 1 --template net --allow other.test:80 \
                 --dns-upstream 45.45.0.53 --json -- sh -c 'printf \"GET / HTTP/1.0\\r\\n\\r\\n\" \
                 | nc -w 3 45.45.0.10 80; echo cross_rc=$?'; \
                 wait $a; cat {RUNTIME}/a.out"
            ),
        ),
        Scenario::new(
            "no-policy",
            format!(
                "{cleave} run --forks 1 --template net --json -- sh -c \
                 'echo addrs=$(ip -4 addr show eth0 | grep -c inet); \
                 nc -w 3 45.45.0.10 80 </dev/null; echo nc_rc=$?'"
            ),
        ),
        Scenario::new(
            "bad-policy",
            format!(
                "{cleave} run --forks 1 --template net --allow 'exa mple.test' -- true; echo rc=$?; \
                 {cleave} run --forks 1 --template net --allow-cidr 10.0.0.0 -- true; echo rc=$?; \
                 {cleave} run --forks 1 --template net --allow-cidr 0.0.0.0/0 -- true; echo rc=$?; \
                 {cleave} run --forks 1 --template net --dns-upstream 45.45.0.53 -- true; echo rc=$?; \
                 {leftovers}"
            ),
        ),
        Scenario::new("after-teardown", leftovers.clone()),
        // SIGTERM mid-run: passed to every fork's command; everything is torn down.
        Scenario::new(
            "sigterm",
            format!(
                "{env} {node} {bin} run --forks 2 --template net --allow allowed.test:80 \
                 --dns-upstream 45.45.0.53 -- sleep 60 >/dev/null 2>&1 & k=$!; \
                 for i in $(seq 1 150); do {node} nft list chain inet cleave fwd-cl1 >/dev/null 2>&1 \
                 && break; sleep 0.2; done; sleep 2; kill -TERM $k; wait $k; echo rc=$?; {leftovers}"
            ),
        ),
        // kill -9 of `cleave run` mid-sandbox: its worker and tap go with it, its chains
        // stay until the next start reconciles them.
        Scenario::new(
            "kill-9",
            format!(
                "{env} {node} {bin} run --forks 1 --template net --allow allowed.test:80 \
                 --dns-upstream 45.45.0.53 -- sleep 60 >/dev/null 2>&1 & k=$!; \
                 for i in $(seq 1 150); do {node} ip link show cl0 >/dev/null 2>&1 && \
                 {node} nft list chain inet cleave fwd-cl0 >/dev/null 2>&1 && break; sleep 0.2; \
                 done; sleep 1; kill -9 $k; wait $k; sleep 2; \
                 echo before_restart:; {leftovers}; \
                 {cleave} run --forks 1 --template net --allow allowed.test:80 \
                 --dns-upstream 45.45.0.53 -- true; echo rc=$?; \
                 echo after_restart:; {leftovers}"
            ),
        ),
        Scenario::new(
            "lab-down",
            format!(
                "{lab} down; echo netns=$(ip netns list | grep -c cl-); rm -rf {RUNTIME}"
            ),
        ),
    ];
    // A healthy batch takes ~80 s; see fork.rs for why the bound is tight.
    let (place, results) = run_batch(&scenarios, Duration::from_secs(420));
    eprintln!("ran in {place:?}");
    let get = |name: &str| results.iter().find(|r| r.name == name).unwrap();
    let mut f = Failures::default();

    let r = get("lab-up");
    f.check(
        r,
        r.exit_code == 0 && r.output.contains("LAB-UP"),
        "the lab comes up",
    );
    let r = get("template");
    f.check(
        r,
        r.exit_code == 0,
        "a template (with its unplugged NIC) is created",
    );

    let r = get("forks-policy");
    let forks = json_lines(r);
    f.check(r, forks.len() == 2, "two JSON results");
    let ips: Vec<&str> = forks.iter().filter_map(|j| j["ip"].as_str()).collect();
    f.check(
        r,
        ips.len() == 2 && ips[0] != ips[1] && ips.iter().all(|ip| ip.starts_with("10.231.")),
        "two forks of one template get distinct addresses",
    );
    for j in &forks {
        let out = j["stdout"].as_str().unwrap_or("");
        for check in CHECKS {
            f.check(
                r,
                out.contains(&format!("CHECK {check} ok")),
                &format!("fork {}: check {check}", j["fork"]),
            );
        }
        f.check(r, !out.contains("FAIL"), "no check failed");
        f.check(r, out.contains("SENT-UDP"), "the UDP probes were sent");
        f.check(r, j["exit_code"] == 0, "the checks ran to the end");
    }
    f.check(
        r,
        value(r, "udp") == Some("6"),
        "exactly the 3 own datagrams of each fork arrive; the spoofed ones do not",
    );

    let r = get("fresh-boot");
    let j = json_lines(r);
    f.check(
        r,
        j.len() == 1
            && j[0]["stdout"]
                .as_str()
                .unwrap_or("")
                .contains("hello from allowed.test")
            && j[0]["ip"].as_str().is_some(),
        "a fresh boot reaches its allowed name",
    );

    let r = get("cross-and-inbound");
    f.check(
        r,
        value(r, "pinned_after").is_some_and(|n| n != "150"),
        "A's pin appears",
    );
    f.check(
        r,
        value(r, "inbound_rc").is_some_and(|c| c != "0"),
        "nothing from outside opens a connection into a guest",
    );
    f.check(
        r,
        r.output.contains("inbound=[]"),
        "the guest received nothing",
    );
    f.check(
        r,
        !r.output.contains("hello from allowed.test") && r.output.contains("cross_rc="),
        "B cannot use A's pin",
    );
    let a = json_lines(r);
    f.check(
        r,
        a.iter().any(|j| j["ip"] == "10.231.0.2"),
        "A held the first slot (the inbound probe's target)",
    );

    let r = get("no-policy");
    let j = json_lines(r);
    f.check(
        r,
        j.len() == 1
            && {
                let out = j[0]["stdout"].as_str().unwrap_or("");
                out.contains("addrs=0") && !out.contains("nc_rc=0")
            }
            && j[0]["ip"].is_null(),
        "a sandbox without policy has no address and reaches nothing",
    );

    let r = get("bad-policy");
    for needle in [
        "--allow \"exa mple.test\"",
        "--allow-cidr \"10.0.0.0\"",
        "/0 would allow every destination",
        "--dns-upstream and --uplink need a policy",
    ] {
        f.check(
            r,
            r.output.contains(needle),
            &format!("refused naming {needle:?}"),
        );
    }
    f.check(
        r,
        r.output.lines().filter(|l| l.trim() == "rc=1").count() == 4,
        "each bad policy fails the command (exit 1, not a crash)",
    );

    for name in ["bad-policy", "after-teardown"] {
        let r = get(name);
        for (k, want) in [
            ("taps", "0"),
            ("sandbox_chains", "0"),
            ("sandbox_sets", "0"),
            ("workers", "0"),
        ] {
            f.check(r, value(r, k) == Some(want), &format!("no {k} left"));
        }
    }

    let r = get("sigterm");
    f.check(r, value(r, "rc") == Some("143"), "cleave exits 128+SIGTERM");
    for (k, want) in [
        ("taps", "0"),
        ("sandbox_chains", "0"),
        ("sandbox_sets", "0"),
        ("workers", "0"),
    ] {
        f.check(
            r,
            value(r, k) == Some(want),
            &format!("no {k} left after SIGTERM"),
        );
    }

    let r = get("kill-9");
    let (before, after) = r
        .output
        .split_once("after_restart:")
        .unwrap_or((&r.output, ""));
    f.check(
        r,
        before.contains("taps=0") && before.contains("workers=0"),
        "the killed run's tap and worker are gone with it",
    );
    f.check(
        r,
        !before.contains("sandbox_chains=0"),
        "its chains outlive it (until reconciled)",
    );
    f.check(
        r,
        after.contains("sandbox_chains=0")
            && after.contains("sandbox_sets=0")
            && after.contains("taps=0"),
        "the next start removes them",
    );

    let r = get("lab-down");
    f.check(
        r,
        value(r, "netns") == Some("0"),
        "the lab's namespaces are gone",
    );
    f.assert_none();
}
