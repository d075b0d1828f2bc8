#!/usr/bin/env bash
# The main job of `make run`, run where a real KVM is (directly, or in the rig via
# scripts/kvm-or-rig): boot the default image and time the guest agent's readiness, then
# run a few commands in a fresh guest over the vsock control channel, then fork a
# template three times.
set -euo pipefail
cleave=${CLEAVE_BIN:-target/debug/cleave}
echo "== cleave boot --selftest"
"$cleave" boot --selftest
echo "== cleave run -- sh -c 'uname -a; grep -m3 ... /proc/cpuinfo; nproc'"
"$cleave" run --vcpus 2 -- sh -c 'uname -a; grep -m3 -E "^(vendor_id|model name|flags)" /proc/cpuinfo | cut -c1-100; echo "cpus: $(nproc)"'
echo "== cleave run --json -- true"
"$cleave" run --json -- true
echo "== cleave run --forks 3 -- sh -c 'head -c 16 /dev/urandom | od -An -tx1'"
# Forks of the default template (created on first use), each reseeded before it runs;
# the three lines of random bytes must all differ. Templates live in the VM runtime
# directory; this demo keeps its own and removes it.
demo_runtime=$(mktemp -d /tmp/cleave-demo.XXXXXX)
trap 'rm -rf "$demo_runtime"' EXIT
XDG_RUNTIME_DIR=$demo_runtime "$cleave" run --forks 3 -- sh -c 'head -c 16 /dev/urandom | od -An -tx1'
echo "== cleave template ls"
XDG_RUNTIME_DIR=$demo_runtime "$cleave" template ls
