#!/usr/bin/env python3
"""Boot to the guest agent's readiness line: cleave vs QEMU -M microvm.

Both boot the same kernel and initramfs (the default image's manifest) with the same
kernel command line, under the same KVM, alternating runs. Time is measured the same way
for both: from starting the process to the readiness line appearing on its stdout.
Run it where there is a real KVM: directly on a hardware-KVM host, or in the rig
(`make bench-boot` picks). Prints a Markdown table row for docs/PERFORMANCE.md.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

READY = b"cleave-guest: ready"
# Keep in sync with BASE_CMDLINE in agent/src/cli/boot.rs (a unit test checks).
BASE_CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off nomodule 8250.nr_uarts=1 no_timer_check quiet"


def time_to_ready(argv, timeout):
    start = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    elapsed = None
    try:
        for line in p.stdout:
            if READY in line:
                elapsed = time.monotonic() - start
                break
            if time.monotonic() - start > timeout:
                break
    finally:
        p.kill()
        p.wait()
    if elapsed is None:
        raise SystemExit(f"no readiness line from: {' '.join(argv)}")
    return elapsed * 1000.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cleave", default="target/release/cleave")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--mem", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()

    cache = os.environ.get("CLEAVE_CACHE") or os.path.expanduser("~/.cache/cleave")
    with open(os.path.join(cache, "images/default.json")) as f:
        m = json.load(f)
    kernel, initrd = m["kernel"]["path"], m["initrd"]["path"]
    cmdline = BASE_CMDLINE + " cleave.selftest=1"

    ours = [args.cleave, "boot", "--selftest", "--mem", str(args.mem), "--vcpus", "1"]
    qemu = [
        "qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu", "host",
        "-m", str(args.mem), "-smp", "1", "-nodefaults", "-no-user-config",
        "-display", "none", "-serial", "stdio", "-nic", "none", "-no-reboot",
        "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
    ]
    results = {"cleave": [], "qemu": []}
    for i in range(args.runs):
        for name, argv in (("cleave", ours), ("qemu", qemu)):
            ms = time_to_ready(argv, args.timeout)
            results[name].append(ms)
            print(f"run {i + 1:2d} {name:6s} {ms:8.1f} ms", file=sys.stderr, flush=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    env = "hardware KVM" if not os.path.exists("/sys/module/kvm_pvm") and os.environ.get("CLEAVE_IN_RIG") != "1" else "rig (TCG, nested kvm_amd)"
    print(f"| {time.strftime('%Y-%m-%d')} | {env}, {platform.machine()}, {os.cpu_count()} vCPU | "
          f"{args.runs} | {med['cleave']:.0f} ms | {med['qemu']:.0f} ms | {med['cleave'] / med['qemu']:.2f} | "
          f"{min(results['cleave']):.0f}–{max(results['cleave']):.0f} ms | {min(results['qemu']):.0f}–{max(results['qemu']):.0f} ms |")


if __name__ == "__main__":
    main()
