#!/usr/bin/env bash
# Builds the cleave guest initramfs (uncompressed newc cpio):
#   /init          the static cleave-guest binary given as the argument
#   /bin/busybox   Debian's busybox-static, with a symlink per applet in /bin
#   /dev/console   so PID 1 has a console before it mounts devtmpfs
#   empty /proc /sys /dev/pts /tmp /run /root, a minimal /etc/passwd and group
# Prints the archive's path on stdout; everything else goes to stderr.
#
# Cached under ${CLEAVE_CACHE:-$HOME/.cache/cleave}/initramfs/<key>/ where key
# is the sha256 of the guest binary, busybox and these scripts; the archive is
# byte-for-byte reproducible and published with one rename.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${CLEAVE_CACHE:-$HOME/.cache/cleave}
busybox=/bin/busybox
# shellcheck source=lib/newc.sh
. "$here/lib/newc.sh"

log() { echo "build-initramfs: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ $# -eq 1 ] || die "usage: $0 GUEST_BINARY (the static cleave-guest, becomes /init)"
guest=$(realpath -- "$1") || die "guest binary $1 does not exist"
[ -f "$guest" ] || die "guest binary $guest is not a regular file"
[ -x "$guest" ] || die "guest binary $guest is not executable"
# A dynamically linked /init dies before printing anything: say so up front.
if ! file_out=$(LC_ALL=C readelf -l "$guest" 2>/dev/null); then
  die "guest binary $guest is not an ELF executable"
fi
if grep -q 'Requesting program interpreter' <<<"$file_out"; then
  die "guest binary $guest is dynamically linked; build it with RUSTFLAGS='-C target-feature=+crt-static'"
fi
[ -x "$busybox" ] || die "$busybox is missing (install busybox-static: scripts/install-deps.sh)"
# busybox (the shared build) would need libc in the image; insist on the static one.
if LC_ALL=C readelf -l "$busybox" | grep -q 'Requesting program interpreter'; then
  die "$busybox is dynamically linked; install busybox-static instead of busybox"
fi

key=$({
  sha256sum <"$guest"
  sha256sum <"$busybox"
  sha256sum <"${BASH_SOURCE[0]}"
  sha256sum <"$here/lib/newc.sh"
} | sha256sum | cut -c1-64)
out=$cache/initramfs/$key

if [ -f "$out/initramfs.cpio" ]; then
  echo "$out/initramfs.cpio"
  exit 0
fi

mkdir -p "$cache/initramfs"
# One builder per cache: a concurrent caller waits, then finds the result.
exec 9>"$cache/initramfs/.lock"
flock 9
if [ -f "$out/initramfs.cpio" ]; then
  echo "$out/initramfs.cpio"
  exit 0
fi
tmp=$(mktemp -d "$cache/initramfs/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

list=$tmp/list
{
  for d in bin dev dev/pts etc proc root run sys tmp usr; do echo "dir $d 755"; done
  echo "file init 755 $guest"
  newc_busybox_base "$busybox"
  # Scripts say #!/usr/bin/env or #!/sbin/...: one /bin serves them all.
  echo "slink sbin bin"
  echo "slink usr/bin ../bin"
  echo "slink usr/sbin ../bin"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$tmp/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$tmp/group"
  echo "file etc/passwd 644 $tmp/passwd"
  echo "file etc/group 644 $tmp/group"
} >"$list"
# /tmp is world-writable with the sticky bit.
sed -i 's/^dir tmp 755$/dir tmp 1777/' "$list"
newc_sort "$list"

mkdir "$tmp/out"
newc_write "$list" >"$tmp/out/initramfs.cpio"
mv -T "$tmp/out" "$out"
log "built $out/initramfs.cpio ($(stat -c %s "$out/initramfs.cpio") bytes)"
echo "$out/initramfs.cpio"
