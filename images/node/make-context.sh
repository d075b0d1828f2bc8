#!/usr/bin/env bash
# Assembles the build context for images/node/Containerfile:
#   OUTDIR/bin/cleave                         the static node agent (from CLEAVE_BIN)
#   OUTDIR/bin/cleave-fork-worker             the static fork worker (from WORKER_BIN)
#   OUTDIR/images/default/vmlinux             the default guest kernel
#   OUTDIR/images/default/initramfs.cpio      the default guest initramfs
#   OUTDIR/images/default.json                its manifest, paths rewritten to where the
#                                             node image holds the files:
#                                             /usr/lib/cleave/images/default/{vmlinux,initramfs.cpio}
# The kernel and initramfs come from the default image's manifest
# (${CLEAVE_CACHE:-$HOME/.cache/cleave}/images/default.json, written by `make image`)
# and are checked against its sha256 digests before they are copied; the digests
# are carried over unchanged. OUTDIR must not exist or be empty. Prints OUTDIR.
set -euo pipefail

cache=${CLEAVE_CACHE:-$HOME/.cache/cleave}
manifest=$cache/images/default.json
# Where the Containerfile puts images/ (its CLEAVE_CACHE is /usr/lib/cleave).
in_image=/usr/lib/cleave/images

log() { echo "make-context: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ $# -eq 3 ] || die "usage: $0 CLEAVE_BIN WORKER_BIN OUTDIR (both binaries static, e.g. built with -C target-feature=+crt-static)"
cleave_bin=$1 worker_bin=$2 out=$3
command -v jq >/dev/null || die "jq is missing (make deps)"

# A scratch image has no dynamic loader or libc: refuse a dynamic binary here rather
# than ship an image whose entrypoint fails with "no such file or directory".
for b in "$cleave_bin" "$worker_bin"; do
  { [ -f "$b" ] && [ -x "$b" ]; } || die "$b is not an executable file"
  elf=$(LC_ALL=C readelf -lh "$b" 2>/dev/null) || die "$b is not an ELF executable"
  grep -q 'Machine:.*X86-64' <<<"$elf" || die "$b is not an x86_64 binary"
  if grep -q 'Requesting program interpreter' <<<"$elf"; then
    die "$b is dynamically linked; the node image is FROM scratch and needs static binaries"
  fi
done

[ -f "$manifest" ] || die "no default image manifest at $manifest: run \`make image\` first"
if [ -e "$out" ] && [ -n "$(ls -A "$out")" ]; then
  die "$out exists and is not empty"
fi

field() { jq -er "$1" "$manifest" || die "manifest $manifest has no $1"; }
kernel=$(field .kernel.path)
kernel_sha=$(field .kernel.sha256)
initrd=$(field .initrd.path)
initrd_sha=$(field .initrd.sha256)
kernel_source=$(jq -c '.kernel_source // null' "$manifest")

mkdir -p "$out/bin" "$out/images/default"
install -m 0755 "$cleave_bin" "$out/bin/cleave"
install -m 0755 "$worker_bin" "$out/bin/cleave-fork-worker"
copy_pinned() { # SRC SHA256 DEST
  install -m 0644 "$1" "$3"
  [ "$(sha256sum <"$3" | cut -c1-64)" = "$2" ] || die "$1 does not match its sha256 $2 in $manifest: rebuild with \`make image\`"
}
copy_pinned "$kernel" "$kernel_sha" "$out/images/default/vmlinux"
copy_pinned "$initrd" "$initrd_sha" "$out/images/default/initramfs.cpio"

jq -n --arg k "$in_image/default/vmlinux" --arg ks "$kernel_sha" \
  --arg i "$in_image/default/initramfs.cpio" --arg is "$initrd_sha" \
  --argjson src "$kernel_source" \
  '{kernel:{path:$k,sha256:$ks},initrd:{path:$i,sha256:$is}} + (if $src == null then {} else {kernel_source:$src} end)' \
  -c >"$out/images/default.json"
chmod 0644 "$out/images/default.json"
log "context ready; build with: buildah bud --isolation chroot --timestamp 0 -f images/node/Containerfile -t IMAGE $out"
echo "$out"
