#!/bin/sh
# Soak and fault storms (agent/examples/soak.rs): CYCLES fork → exec → destroy cycles of
# networked sandboxes, sampled every EVERY cycles for anything that grows, then a vsock
# flood, a guest that stops answering and a worker killed mid-exec, each beside a healthy
# sandbox. Runs in the rig where this host's KVM cannot run Linux guests, inside the lab's
# node namespace (tests/lab/lab.sh: no route off the machine). Markdown on stdout.
#
#   scripts/soak.sh [CYCLES [EVERY [FLAGS]]]   default: 10000 cycles, a row every 500;
#                                              FLAGS e.g. --no-cgroups (passed to soak)
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
if [ "${1:-}" = --inside ]; then
  shift
  cycles=$1 every=$2 flags=${3:-}
  export XDG_RUNTIME_DIR=/tmp/cleave-soak
  rm -rf "$XDG_RUNTIME_DIR"; mkdir -p "$XDG_RUNTIME_DIR"; chmod 700 "$XDG_RUNTIME_DIR"
  trap 'sh tests/lab/lab.sh down; rm -rf "$XDG_RUNTIME_DIR"' EXIT
  sh tests/lab/lab.sh up >/dev/null
  echo "soak: $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB, $(uname -r)"
  # shellcheck disable=SC2086
  sh tests/lab/lab.sh node target/release/examples/soak --cycles "$cycles" --every "$every" --net $flags
  exit
fi
cycles=${1:-10000}
every=${2:-500}
flags=${3:-}
cargo build --quiet --release -p cleave-agent --bins --example soak
# A long soak outlasts the rig's default 20 minutes.
CLEAVE_RIG_TIMEOUT_SECS=${CLEAVE_RIG_TIMEOUT_SECS:-14400} CLEAVE_BIN=target/release/cleave \
  scripts/kvm-or-rig sh scripts/soak.sh --inside "$cycles" "$every" "$flags"
