#!/usr/bin/env python3
"""Networking benchmarks with real guests (run where a real KVM is: directly, or in the
rig via scripts/kvm-or-rig). Side by side in one run, on one template:

- fork -> ready without a network vs with one (slot, tap, chains, DNS listener built,
  then fork, gate, identity applied): `cleave run --forks 1 --json`, R times each;
- TCP connect time from the guest to an allowed name's pinned address;
- bulk throughput guest -> "internet" host through virtio-net, the tap, the chains and NAT.

Traffic stays inside the lab's namespaces (tests/lab/lab.sh). Prints a markdown table.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LAB = os.path.join(ROOT, "tests", "lab", "lab.sh")
POLICY = ["--allow", "allowed.test:80,9000", "--dns-upstream", "45.45.0.53"]
BULK_MIB = 8


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def pct(xs, p):
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cleave", default=os.path.join(ROOT, "target", "release", "cleave"))
    ap.add_argument("--runs", type=int, default=10)
    a = ap.parse_args()
    env = dict(os.environ, XDG_RUNTIME_DIR=tempfile.mkdtemp(prefix="cleave-bench-net."))
    node = ["ip", "netns", "exec", "cl-node", a.cleave]
    sh([LAB, "up"])
    try:
        sh(node + ["template", "create", "--name", "bench", "--mem", "128"], env=env)

        def fork(extra, cmd):
            out = sh(node + ["run", "--forks", "1", "--template", "bench", "--json"] + extra
                     + ["--", "sh", "-c", cmd], env=env).stdout
            return json.loads([l for l in out.splitlines() if l.startswith("{")][0])

        plain, netted, net_only, identity = [], [], [], []
        for i in range(a.runs):
            j = fork([], "true")
            plain.append(j["fork_ms"])
            j = fork(POLICY, "true")
            netted.append(j["fork_ms"] + j["net_ms"])
            net_only.append(j["net_ms"])
            identity.append(j["identity_ms"])
            print(f"bench-net: run {i + 1}/{a.runs}", file=sys.stderr)

        # Connect time and throughput, measured inside the guest with its own clock.
        counted = tempfile.mktemp(prefix="cleave-bench-sink.")
        sink = subprocess.Popen(["ip", "netns", "exec", "cl-inet", "sh", "-c",
                                 f"sleep 120 | busybox nc -l -p 9000 | wc -c > {counted}"])
        try:
            probe = (
                "nslookup -type=A allowed.test >/dev/null; "
                "for i in 1 2 3 4 5 6 7 8 9 10; do a=$(/init clock-us); "
                "printf 'HEAD / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 45.45.0.10 80 >/dev/null; "
                "b=$(/init clock-us); echo connect_us=$((b - a)); done; "
                f"a=$(/init clock-us); dd if=/dev/zero bs=65536 count={BULK_MIB * 16} 2>/dev/null "
                "| nc -w 5 45.45.0.10 9000; b=$(/init clock-us); echo bulk_us=$((b - a))"
            )
            j = fork(POLICY, probe)
        finally:
            try:
                sink.wait(timeout=15)
            except subprocess.TimeoutExpired:
                sink.kill()
        received = int(open(counted).read().strip() or 0) if os.path.exists(counted) else 0
        lines = j["stdout"].splitlines()
        conn = [int(l.split("=")[1]) / 1000 for l in lines if l.startswith("connect_us=")]
        bulk = [int(l.split("=")[1]) for l in lines if l.startswith("bulk_us=")]
    finally:
        sh([LAB, "down"])

    p50p, p50n = statistics.median(plain), statistics.median(netted)
    print("| what | p50 | p90 | max |")
    print("| --- | ---: | ---: | ---: |")
    for name, xs in [
        ("fork -> ready, no network (ms)", plain),
        ("fork -> ready with network: slot + fork + gate + identity (ms)", netted),
        ("  of which building the slot (tap, chains, DNS listener) (ms)", net_only),
        ("  of which the guest applying its identity after the gate (ms)", identity),
        ("TCP connect + HTTP HEAD from the guest to a pinned address (ms)", conn),
    ]:
        if xs:
            print(f"| {name} | {statistics.median(xs):.2f} | {pct(xs, 90):.2f} | {max(xs):.2f} |")
    print(f"\nnetwork adds {100 * (p50n - p50p) / p50p:.0f} % to fork -> ready (p50s, {a.runs} runs each)")
    if bulk and received != BULK_MIB << 20:
        print(f"bulk: the sink received {received} bytes, not {BULK_MIB} MiB; no throughput figure")
    elif bulk:
        mib = BULK_MIB
        print(f"bulk guest -> internet host: {mib} MiB in {bulk[0] / 1e6:.2f} s = "
              f"{mib / (bulk[0] / 1e6):.1f} MiB/s")


if __name__ == "__main__":
    main()
