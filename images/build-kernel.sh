#!/usr/bin/env bash
# Builds the cleave guest kernel: Debian's linux-source-6.1, `make tinyconfig`,
# plus images/kernel/microvm.config. Prints the path of the built vmlinux on
# stdout (bzImage sits next to it); everything else goes to stderr.
#
# Cached under ${CLEAVE_CACHE:-$HOME/.cache/cleave}/kernel/<key>/, where key is
# the sha256 of the fragment, this script and the linux-source package version:
# a second run with the same inputs is instant. A build happens in a temp dir
# and is published with one rename, so an interrupted build never looks done.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${CLEAVE_CACHE:-$HOME/.cache/cleave}
fragment=$here/kernel/microvm.config
src_tar=/usr/src/linux-source-6.1.tar.xz

log() { echo "build-kernel: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ -r "$fragment" ] || die "missing config fragment $fragment"
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null) ||
  die "linux-source-6.1 is not installed (run scripts/install-deps.sh)"
[ -r "$src_tar" ] || die "$src_tar is missing (reinstall linux-source-6.1)"

key=$({
  sha256sum <"$fragment"
  sha256sum <"${BASH_SOURCE[0]}"
  echo "linux-source-6.1 $src_version"
} | sha256sum | cut -c1-64)
out=$cache/kernel/$key

if [ -f "$out/vmlinux" ]; then
  echo "$out/vmlinux"
  exit 0
fi

mkdir -p "$cache/kernel"
# One builder per cache: a second caller waits, then finds the result.
exec 9>"$cache/kernel/.lock"
flock 9
if [ -f "$out/vmlinux" ]; then
  echo "$out/vmlinux"
  exit 0
fi

tmp=$(mktemp -d "$cache/kernel/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
started=$(date +%s)

log "building kernel from linux-source-6.1 $src_version (key ${key:0:12}) in $tmp"
mkdir "$tmp/src"
tar -xJf "$src_tar" -C "$tmp/src" --strip-components=1
cd "$tmp/src"

kmake() { make ARCH=x86_64 "$@" >>"$tmp/build.log" 2>&1 || {
  tail -n 60 "$tmp/build.log" >&2
  die "make $* failed (log above)"
}; }

kmake tinyconfig
scripts/kconfig/merge_config.sh -m .config "$fragment" >>"$tmp/build.log" 2>&1 ||
  die "merge_config.sh failed"
kmake olddefconfig

# Every option the fragment names must have survived olddefconfig; a silently
# dropped dependency would give a kernel that boots but lacks what we need.
missing=()
while IFS= read -r line; do
  case "$line" in
  CONFIG_*=*)
    grep -qxF -- "$line" .config || missing+=("$line (got: $(grep -E "^(# )?${line%%=*}[= ]" .config || echo absent))")
    ;;
  "# CONFIG_"*" is not set")
    opt=${line#\# }
    opt=${opt%% *}
    if grep -q "^$opt=" .config; then missing+=("$line (got: $(grep "^$opt=" .config))"); fi
    ;;
  esac
done <"$fragment"
if [ ${#missing[@]} -gt 0 ]; then
  log "these options from $fragment are not in the final .config:"
  printf '  %s\n' "${missing[@]}" >&2
  die "fix the fragment (a dependency is probably missing)"
fi

log "compiling with make -j$(nproc) (log: $tmp/build.log)"
kmake -j"$(nproc)" vmlinux bzImage

mkdir "$tmp/out"
cp vmlinux "$tmp/out/vmlinux"
cp arch/x86/boot/bzImage "$tmp/out/bzImage"
cp .config "$tmp/out/config"
echo "linux-source-6.1 $src_version" >"$tmp/out/source-version"
cd /
mv -T "$tmp/out" "$out"
log "built in $(($(date +%s) - started)) s: $out"
echo "$out/vmlinux"
