#!/usr/bin/env bash
# The main job of `make run`, run where a real KVM is (directly, or in the rig via
# scripts/kvm-or-rig): boot the default image and time the guest agent's readiness, then
# run a few commands in a fresh guest over the vsock control channel.
set -euo pipefail
cleave=${CLEAVE_BIN:-target/debug/cleave}
echo "== cleave boot --selftest"
"$cleave" boot --selftest
echo "== cleave run -- sh -c 'uname -a; grep -m3 ... /proc/cpuinfo; nproc'"
"$cleave" run --vcpus 2 -- sh -c 'uname -a; grep -m3 -E "^(vendor_id|model name|flags)" /proc/cpuinfo | cut -c1-100; echo "cpus: $(nproc)"'
echo "== cleave run --json -- true"
"$cleave" run --json -- true
