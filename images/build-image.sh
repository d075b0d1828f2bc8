#!/usr/bin/env bash
# Builds the default guest image (kernel + initramfs with GUEST_BINARY as
# /init) and writes its manifest, ${CLEAVE_CACHE:-$HOME/.cache/cleave}/images/default.json:
#   {"kernel":{"path":"/abs/vmlinux","sha256":"<hex>"},
#    "initrd":{"path":"/abs/initramfs.cpio","sha256":"<hex>"},
#    "kernel_source":"linux-source-6.1 <debian version>"}
# The VMM pins both digests from it and checks them on every start. The
# manifest is replaced with one rename, so readers never see half of it.
# Prints the manifest's path on stdout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${CLEAVE_CACHE:-$HOME/.cache/cleave}

die() { echo "build-image: error: $*" >&2; exit 1; }
[ $# -eq 1 ] || die "usage: $0 GUEST_BINARY (the static cleave-guest, becomes /init)"

kernel=$("$here/build-kernel.sh")
initrd=$("$here/build-initramfs.sh" "$1")
source_version=$(cat "$(dirname "$kernel")/source-version")

# JSON strings: our paths never hold quotes or backslashes, but refuse rather
# than write a manifest the loader would misread.
for p in "$kernel" "$initrd"; do
  case "$p" in *'"'* | *'\'*) die "cache path $p holds a quote or backslash; set CLEAVE_CACHE elsewhere" ;; esac
done

mkdir -p "$cache/images"
tmp=$(mktemp "$cache/images/.default.json.XXXXXX")
trap 'rm -f "$tmp"' EXIT
printf '{"kernel":{"path":"%s","sha256":"%s"},"initrd":{"path":"%s","sha256":"%s"},"kernel_source":"%s"}\n' \
  "$kernel" "$(sha256sum <"$kernel" | cut -c1-64)" \
  "$initrd" "$(sha256sum <"$initrd" | cut -c1-64)" \
  "$source_version" >"$tmp"
chmod 644 "$tmp"
mv -f "$tmp" "$cache/images/default.json"
trap - EXIT
echo "$cache/images/default.json"
