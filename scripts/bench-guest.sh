#!/usr/bin/env bash
# One guest section of `make bench` (scripts/bench.sh), run where Linux guests run:
# directly on hardware KVM, inside the rig elsewhere (scripts/kvm-or-rig). Prints only
# the section's tables; the benchmark's own progress goes to a file and is shown only
# if it fails, since the rig's console merges stdout and stderr.
#
#   bash scripts/bench-guest.sh boot|control|fork-linux|api|net
set -euo pipefail
rel=target/release
work=$(mktemp -d /tmp/cleave-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
export XDG_RUNTIME_DIR=$work
err=$work/stderr
run() {
  if ! "$@" 2>> "$err"; then
    echo "bench-guest: failed: $*" >&2
    tail -40 "$err" >&2
    exit 1
  fi
}
table() { python3 scripts/json-table.py "$@"; }
case ${1:-} in
  boot)
    echo "| date | environment | runs | cleave median | QEMU median | ratio | cleave range | QEMU range |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"
    run python3 scripts/bench-boot.py --cleave "$PWD/$rel/cleave"
    ;;
  control)
    echo "1,000 sequential execs of \`true\` and \`hello\` round trips, then 64 MiB each way (default image, 512 MiB, 2 vCPUs):"
    echo
    run $rel/cleave-probe bench 1000 | table
    ;;
  fork-linux)
    run $rel/cleave template create --name b256 --mem 256 > /dev/null
    echo "200 forks of a 256 MiB default-image template, each destroyed before the next, then 10 cold boots of the same image:"
    echo
    run $rel/cleave-fork-probe bench b256 200 10 | table
    echo
    echo "Idle forks alive at once:"
    echo
    run $rel/cleave-fork-probe idle b256 1 10 100 | table
    ;;
  api) run $rel/examples/api_bench --runs 20 --secs 16 ;;
  net) run python3 scripts/bench-net.py --cleave "$PWD/$rel/cleave" ;;
  *)
    echo "usage: $0 boot|control|fork-linux|api|net" >&2
    exit 2
    ;;
esac
