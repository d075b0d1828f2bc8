#!/usr/bin/env bash
# `make bench`: every benchmark of docs/PERFORMANCE.md in one run, each side by side with
# its peer or baseline, written as one Markdown file with the date and environment:
# docs/bench/DATE-KVM.md (KVM = kvm_pvm, kvm_amd or kvm_intel); a run of some sections
# only, to target/bench/DATE-KVM-partial.md.
#
#   scripts/bench.sh [SECTION...]      (default: all; `make bench BENCH="fork churn"`)
#
# Host sections time ioctls and processes on this machine's /dev/kvm (any KVM, kvm_pvm
# included) or need no KVM at all. Guest sections boot Linux guests: directly on hardware
# KVM, in the rig elsewhere (scripts/kvm-or-rig, one rig per section), so on a
# hardware-KVM host they measure the hardware rows. A section that fails is marked as
# failed in the file, with its log named, and the run goes on; the exit status is 1 if any
# failed. Expects the release builds `make bench` makes first. All traffic stays on
# loopback or in namespaces the benchmarks create (none leaves the machine).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REL=$ROOT/target/release
EX=$REL/examples

ALL=(fork fork-halt churn density netfilter dns agent slots boot control fork-linux api net)
case "${1:-}" in
  -h | --help)
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    echo "sections: ${ALL[*]}"
    exit 0
    ;;
esac
SECTIONS=("$@")
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=("${ALL[@]}")
for s in "${SECTIONS[@]}"; do
  [[ " ${ALL[*]} " == *" $s "* ]] || { echo "bench: unknown section '$s'; the sections are: ${ALL[*]}" >&2; exit 2; }
done

kvm=none
for m in kvm_pvm kvm_amd kvm_intel; do
  [ -d /sys/module/$m ] && { kvm=$m; break; }
done
date_=$(date -u +%F)
out=$ROOT/docs/bench/$date_-$kvm.md
# A run of some sections only does not replace the day's full run, nor does a second one.
[ "${SECTIONS[*]}" = "${ALL[*]}" ] || out=$ROOT/target/bench/$date_-$kvm-partial.md
[ "${SECTIONS[*]}" = "${ALL[*]}" ] && [ -e "$out" ] && out=${out%.md}-$(date -u +%H%M).md
logs=$ROOT/target/bench/$date_
mkdir -p "$(dirname "$out")" "$logs"
if [ "$kvm" = kvm_pvm ] || [ "$kvm" = none ]; then
  guests="the rig (QEMU TCG, nested kvm_amd, $(nproc) vCPU host; ${CLEAVE_RIG_VCPUS:-1} rig vCPU): two levels of emulation deep, so compare rows with each other, not with hardware"
else
  guests="directly on this host's $kvm"
fi

{
  echo "# \`make bench\`, $date_ ($kvm)"
  echo
  echo "Written by \`scripts/bench.sh\` (docs/PERFORMANCE.md says what each benchmark measures)."
  echo
  echo "| | |"
  echo "| --- | --- |"
  echo "| started | $(date -u '+%F %T') UTC |"
  echo "| commit | $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)') |"
  echo "| CPU | $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) vCPU |"
  echo "| memory | $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) |"
  echo "| kernel | $(uname -r) |"
  echo "| /dev/kvm | $kvm |"
  echo "| guests | $guests |"
  echo "| load average at start | $(cut -d' ' -f1-3 /proc/loadavg) |"
  echo "| sections | ${SECTIONS[*]} |"
} > "$out"

failed=()
# section NAME TITLE -- COMMAND...: runs COMMAND, its stdout into the file under TITLE,
# its stderr into the section's log.
section() {
  local name=$1 title=$2
  shift 3
  [[ " ${SECTIONS[*]} " == *" $name "* ]] || return 0
  local log=$logs/$name.log t0=$SECONDS
  echo "bench: $name: $*" >&2
  local shown="${*#"$ROOT"/}"
  [ "$1" = guest ] && shown="scripts/kvm-or-rig bash scripts/bench-guest.sh $2"
  printf '\n## %s\n\n`%s`\n\n' "$title" "$shown" >> "$out"
  local ok=true
  "$@" > "$logs/$name.out" 2> "$log" || ok=false
  # Output without a table is plain text: keep its lines as they are.
  if grep -q '^|' "$logs/$name.out"; then
    cat "$logs/$name.out" >> "$out"
  else
    { echo '```text'; cat "$logs/$name.out"; echo '```'; } >> "$out"
  fi
  if $ok; then
    printf '\n(%d s)\n' $((SECONDS - t0)) >> "$out"
  else
    printf '\n**failed** after %d s: see %s\n' $((SECONDS - t0)) "${log#"$ROOT"/}" >> "$out"
    failed+=("$name")
    echo "bench: $name FAILED (log: $log)" >&2
    tail -5 "$log" >&2
  fi
}
# In the rig, stdout and stderr share one console: keep stderr out of the tables there.
guest() { CLEAVE_BIN=$REL/cleave scripts/kvm-or-rig bash scripts/bench-guest.sh "$@"; }

section fork "Fork path: in-process cold and warm, fresh process, pool (host, tiny guest)" -- \
  "$EX/fork_bench" --forks 500 --workers 500
section fork-halt "Fork path, one process per fork, with served guests halted instead of counting (host, tiny guest)" -- \
  "$EX/fork_bench" --forks 0 --workers 500 --guest halt
section churn "Sustained churn: create → ready → destroy, one process per fork (host, tiny guest)" -- \
  "$EX/fork_bench" --churn 30
section density "Idle forks alive at once: memory per fork and creation rate (host, tiny guest)" -- \
  "$EX/fork_bench" --idle 1,100,1000,10000
section netfilter "netfilter: per-sandbox apply / teardown vs nft -f" -- "$EX/nft_bench"
section dns "dnsproxy: added latency and throughput vs dnsmasq --nftset" -- "$EX/dns_bench" 1000 0
section agent "Guest agent protocol, in-process (no VM)" -- "$EX/agent_bench" 1000
section slots "Sandbox network slots at scale (host side)" -- "$EX/net_bench" --slots 1000
section boot "Boot: cleave vs QEMU -M microvm (guests)" -- guest boot
section control "Control channel over vsock (guests)" -- guest control
section fork-linux "Fork → ready with a Linux guest vs its cold boot (guests)" -- guest fork-linux
section api "The node API vs the library it serves (guests)" -- guest api
section net "Sandbox networking with real guests (guests)" -- guest net

printf '\nfinished %s UTC\n' "$(date -u '+%F %T')" >> "$out"
echo "bench: wrote ${out#"$ROOT"/}" >&2
if [ ${#failed[@]} -gt 0 ]; then
  echo "bench: failed: ${failed[*]} (logs in ${logs#"$ROOT"/})" >&2
  exit 1
fi
