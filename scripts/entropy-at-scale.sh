#!/bin/sh
# Entropy at scale: forks FORKS Linux guests of one template, BATCH alive at a time, and
# checks that every fork's first getrandom(2) block (64 bytes, read right after its
# reseed gate) differs from every other fork's and from the template's own read before
# capture. Exits 1 on any repeat, or if a fork printed no block. Every block is printed
# (`template <hex>`, then `block <hex>`) as it comes, so a cut-short run (the rig has
# frozen under long fork churn) can still be checked.
#
#   scripts/kvm-or-rig sh scripts/entropy-at-scale.sh [FORKS] [BATCH]   (make entropy)
#
# Runs directly on hardware KVM, in the rig elsewhere; FORKS defaults to 2000 (10000 on
# a hardware-KVM host is the figure to take there).
set -eu
forks=${1:-2000}
batch=${2:-25}
cleave=${CLEAVE_BIN:-target/release/cleave}
for v in "$forks" "$batch"; do
  case $v in
    '' | *[!0-9]* | 0) echo "usage: $0 [FORKS] [BATCH]: both are counts of at least 1 (got '$v')" >&2; exit 2 ;;
  esac
done
[ -x "$cleave" ] || { echo "$cleave is missing: cargo build --release -p cleave-agent (or set CLEAVE_BIN)" >&2; exit 2; }
work=$(mktemp -d /tmp/cleave-entropy.XXXXXX)
trap 'rm -rf "$work"' EXIT
export XDG_RUNTIME_DIR="$work"
# 128 hex digits on a line of their own: one 64-byte read.
blocks() { grep -oE '[0-9a-f]{128}' || true; }

start=$(date +%s)
"$cleave" template create --name entropy --mem 128 -- /init getrandom 64 | blocks > "$work/template"
[ "$(wc -l < "$work/template")" -eq 1 ] || { echo "the template printed no block" >&2; exit 1; }
sed 's/^/template /' "$work/template"
done_=0
while [ "$done_" -lt "$forks" ]; do
  n=$batch
  [ $((forks - done_)) -lt "$n" ] && n=$((forks - done_))
  # The rig runs guests under emulation: a batch's gates may take many seconds.
  "$cleave" run --forks "$n" --template entropy --gate-timeout-ms 120000 --json -- \
    /init getrandom 64 | blocks | tee -a "$work/forks" | sed 's/^/block /'
  done_=$((done_ + n))
  printf '%s forks, %s blocks\n' "$done_" "$(wc -l < "$work/forks")" >&2
done
got=$(wc -l < "$work/forks")
distinct=$(sort -u "$work/forks" | wc -l)
repeats=$(sort "$work/forks" | uniq -d | wc -l)
template_seen=$(grep -cxFf "$work/template" "$work/forks" || true)
echo "forks=$forks blocks=$got distinct=$distinct repeated=$repeats template_seen=$template_seen secs=$(( $(date +%s) - start ))"
[ "$got" -eq "$forks" ] && [ "$distinct" -eq "$forks" ] && [ "$template_seen" -eq 0 ]
