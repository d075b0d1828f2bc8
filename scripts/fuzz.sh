#!/bin/sh
# Builds the fuzz targets (tests/fuzz) with libFuzzer's coverage instrumentation on the
# stable toolchain, and runs each for a bounded time from its seed corpus.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   default: 15 s each, every target
#
# `make test` runs it briefly; run it longer by hand (e.g. `scripts/fuzz.sh 3600`). The
# working corpus grows under the cache ($CLEAVE_CACHE/fuzz/TARGET, never the repo); a
# crash leaves its input in target/fuzz/artifacts/TARGET/ and fails the run. Each
# target's executions and corpus size are printed as `fuzz TARGET execs=N corpus=N`.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-15}
[ $# -gt 0 ] && shift
targets=${*:-"virtio_vsock virtio_net virtio_rng guest_protocol dns template_state rootfs_archive"}
cache=${CLEAVE_CACHE:-$HOME/.cache/cleave}/fuzz
triple=x86_64-unknown-linux-gnu
out="$here/target/fuzz"

# What cargo-fuzz passes, minus the sanitizer (which needs a nightly compiler): coverage
# counters, comparison tracing and the PC table for libFuzzer; debug assertions and
# overflow checks come from the crate's release profile. With --target, these flags
# reach our code and its dependencies but not build scripts or proc macros.
RUSTFLAGS="-Cpasses=sancov-module \
  -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
  -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares \
  --cfg fuzzing -Cforce-frame-pointers" \
  cargo build --quiet --release --locked --manifest-path "$here/tests/fuzz/Cargo.toml" \
  --target "$triple" --target-dir "$out" --bins

for t in $targets; do
  corpus="$cache/$t"
  artifacts="$out/artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  log="$out/$t.log"
  if ! "$out/$triple/release/$t" "$corpus" "$here/tests/fuzz/seeds/$t" \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -timeout=10 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz $t: FAILED (input saved in $artifacts/)" >&2
    exit 1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  echo "fuzz $t execs=${execs:-?} corpus=$(ls "$corpus" | wc -l) secs=$secs"
done
