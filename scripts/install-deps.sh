#!/usr/bin/env bash
# Installs what cleave needs from Debian's archive, idempotently.
# Called by `make deps` (and so by `make run` / `make test`); safe to re-run.
set -euo pipefail

PKGS=(
  # guest kernel build
  linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils
  # guest userland and the rig's initramfs
  busybox-static
  # the rig: a software-emulated SVM machine that runs Debian's kvm_amd
  qemu-system-x86
  # netfilter crate (nftnl + mnl) and its tests; conntrack lets the network tests check
  # that a released sandbox's flows are gone (the agent itself uses ctnetlink directly)
  pkg-config libnftnl-dev libmnl-dev nftables iproute2 conntrack
  # the node API's contract (agent/proto) is compiled by tonic-prost-build with protoc
  protobuf-compiler
  # dnsproxy benchmark peer
  dnsmasq-base
  # tooling used by scripts; scripts/validate-manifests.sh keeps its validator in a venv
  jq python3-venv
  # the rig harness's watchdog (ps, pkill) and the lab scripts
  procps
  # tests/lab/python-rootfs.sh: builds the Python test image's OCI layout
  umoci
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
