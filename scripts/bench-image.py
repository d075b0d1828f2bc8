#!/usr/bin/env python3
"""Images users bring, measured side by side with the built-in busybox image.

`make bench-image` runs it in two steps:

  prepare STORE   on the host: builds the Python image of tests/lab/python-rootfs.sh (its
                  OCI layout) and synthetic images of 10 and 500 MiB (busybox plus random
                  bytes, so nothing compresses them away) into the image store STORE, and
                  records each build's time and size.
  measure STORE   where a real KVM is (the rig on kvm_pvm hosts): per image, a template
                  (its creation time), fork -> ready and cold boot -> ready
                  (cleave-fork-probe bench), and memory per idle fork (cleave-fork-probe
                  idle); prints the Markdown rows for docs/PERFORMANCE.md. The 1 GiB
                  image (s1g) is booted fresh once (it needs ~2.5 GiB of guest memory
                  while the kernel unpacks it), to show that it works.

No network: the images come from Debian's packages fetched by the rootfs script (on the
host), and the guests have no NIC.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (how to build it, template memory in MiB)
SYNTHETIC = {"s10": 10, "s500": 500, "s1g": 1024}
MEM = {"default": 256, "py": 256, "s10": 256, "s500": 1280}


def log(msg):
    print(f"bench-image: {msg}", file=sys.stderr, flush=True)


def run(argv, env=None, capture=True):
    p = subprocess.run(argv, env=env, stdout=subprocess.PIPE if capture else None, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(argv)}")
    return p.stdout


def synthetic_tree(root, mib):
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy("/bin/busybox", os.path.join(root, "bin/busybox"))
    os.symlink("busybox", os.path.join(root, "bin/sh"))
    with open(os.path.join(root, "payload"), "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))


def prepare(args):
    store = args.store
    shutil.rmtree(store, ignore_errors=True)
    os.makedirs(store, mode=0o700)
    env = dict(os.environ, CLEAVE_IMAGES=store)
    py = run(["bash", os.path.join(HERE, "tests/lab/python-rootfs.sh")]).strip()
    sources = {"py": ["--from-oci", os.path.join(py, "oci") + ":py"]}
    for name, mib in SYNTHETIC.items():
        src = os.path.join(os.path.dirname(store), f"src-{name}")
        shutil.rmtree(src, ignore_errors=True)
        synthetic_tree(src, mib)
        sources[name] = ["--from-dir", src]
    builds = {}
    for name, src in sources.items():
        t = time.monotonic()
        rec = json.loads(run([args.cleave, "image", "build", "--name", name, *src, "--json"], env))
        builds[name] = {
            "build_s": time.monotonic() - t,
            "initrd_mib": rec["initrd_bytes"] / (1 << 20),
            "entries": rec["entries"],
        }
        log(f"{name}: {builds[name]}")
    for name in SYNTHETIC:
        shutil.rmtree(os.path.join(os.path.dirname(store), f"src-{name}"))
    with open(os.path.join(store, "builds.json"), "w") as f:
        json.dump(builds, f)


def measure(args):
    store = args.store
    runtime = "/tmp/cleave-bench-image"
    shutil.rmtree(runtime, ignore_errors=True)
    os.makedirs(runtime)
    env = dict(os.environ, CLEAVE_IMAGES=store, XDG_RUNTIME_DIR=runtime)
    with open(os.path.join(store, "builds.json")) as f:
        builds = json.load(f)
    rows = []
    for name in ["default", "py", "s10", "s500"]:
        tpl = f"b-{name}"
        create = [args.cleave, "template", "create", "--name", tpl, "--mem", str(MEM[name])]
        if name != "default":
            create += ["--image", name]
        t = time.monotonic()
        p = subprocess.run(create, env=env, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise SystemExit(f"template {tpl}: {p.stderr}")
        create_s = time.monotonic() - t
        ready = re.search(r"agent ready after (\d+) ms", p.stderr)
        log(f"{tpl}: created in {create_s:.1f} s ({p.stderr.strip()})")
        bench = json.loads(run([args.probe, "bench", tpl, str(args.forks), str(args.cold)], env))
        idle = json.loads(run([args.probe, "idle", tpl, str(args.idle)], env))["rows"][0]
        run([args.cleave, "template", "rm", tpl], env)
        rows.append({
            "image": name,
            "build": builds.get(name),
            "mem_mib": MEM[name],
            "template_create_s": create_s,
            "template_boot_ms": float(ready.group(1)) if ready else None,
            "fork_p50_ms": bench["fork_to_ready_ms"]["p50"],
            "fork_p99_ms": bench["fork_to_ready_ms"]["p99"],
            "cold_p50_ms": bench["cold_boot_to_ready_ms"]["p50"],
            "idle_unique_kib": idle["unique_kib_per_fork"],
            "idle_host_kib": idle["host_mem_used_kib_per_fork"],
        })
        print(json.dumps(rows[-1]), flush=True)
    big = subprocess.run(
        [args.cleave, "run", "--image", "s1g", "--mem", "2600", "--json", "--",
         "sh", "-c", "ls -l /payload; free -m | head -2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log(f"s1g fresh boot: exit {big.returncode}: {big.stdout.strip()} {big.stderr.strip()[-500:]}")
    shutil.rmtree(runtime, ignore_errors=True)
    base = rows[0]
    print()
    print("| image | initramfs | build | template create | fork → ready p50 / p99 | cold boot p50 | idle fork: unique / host |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        b = r["build"]
        size = f"{b['initrd_mib']:.1f} MiB, {b['entries']} entries" if b else "built in"
        build = f"{b['build_s']:.2f} s" if b else "—"
        ratio = "" if r is base else f" (×{r['template_create_s'] / base['template_create_s']:.2f})"
        fratio = "" if r is base else f" (×{r['fork_p50_ms'] / base['fork_p50_ms']:.2f})"
        print(
            f"| {r['image']} ({r['mem_mib']} MiB guest) | {size} | {build} "
            f"| {r['template_create_s']:.1f} s{ratio} "
            f"| {r['fork_p50_ms']:.1f} / {r['fork_p99_ms']:.1f} ms{fratio} "
            f"| {r['cold_p50_ms']:.0f} ms "
            f"| {r['idle_unique_kib'] / 1024:.2f} / {r['idle_host_kib'] / 1024:.2f} MiB |"
        )
    b = builds["s1g"]
    out = json.loads(big.stdout) if big.returncode == 0 else {}
    print(
        f"\ns1g ({b['initrd_mib']:.0f} MiB initramfs, built in {b['build_s']:.1f} s), fresh boot "
        f"with 2600 MiB: exit {big.returncode}, {out.get('ms', 0):.0f} ms for the command; "
        f"{out.get('stdout', '').strip()!r}"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["prepare", "measure"])
    ap.add_argument("store")
    ap.add_argument("--cleave", default=os.path.join(HERE, "target/release/cleave"))
    ap.add_argument("--probe", default=os.path.join(HERE, "target/release/cleave-fork-probe"))
    ap.add_argument("--forks", type=int, default=20)
    ap.add_argument("--cold", type=int, default=3)
    ap.add_argument("--idle", type=int, default=10)
    args = ap.parse_args()
    prepare(args) if args.step == "prepare" else measure(args)


if __name__ == "__main__":
    main()
