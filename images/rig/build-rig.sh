#!/usr/bin/env bash
# Builds the KVM integration rig: Debian's own kernel (the exact package that
# linux-image-amd64 depends on) and a small initramfs with busybox-static, the
# modules the rig needs (virtio-pci + 9p for the read-only host share, kvm_amd
# for a real KVM, tun/veth/nf_tables for network tests) and images/rig/init.
# Writes ${CLEAVE_CACHE:-$HOME/.cache/cleave}/rig/rig.json:
#   {"kernel":{"path","sha256"},"initrd":{"path","sha256"},"debian_kernel":"<pkg> <version>"}
# with one rename, and prints its path on stdout. Artifacts are cached by a
# hash of their inputs; a second run is instant.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
images=$(dirname "$here")
cache=${CLEAVE_CACHE:-$HOME/.cache/cleave}
busybox=/bin/busybox
# shellcheck source=../lib/newc.sh
. "$images/lib/newc.sh"

# Modules the rig loads, with their dependencies found from each module's own
# depends= field. virtio_pci + 9p carry the host share; kvm_amd is the point;
# the rest lets integration tests build taps, veths and nftables chains.
ROOT_MODULES=(
  virtio_pci 9pnet_virtio 9p
  kvm_amd
  tun veth
  nf_tables nft_ct nft_objref nft_reject_inet nft_chain_nat nft_nat nft_masq
  nf_conntrack_netlink
)
# Module parameters, applied at insmod. nested=1 lets the rig's guests use SVM
# too (not needed by cleave itself, but kvm_amd reports it and tests print it).
declare -A MODULE_PARAMS=([kvm_amd]="nested=1")
# Soft dependencies name a crypto algorithm, not a module; without depmod's
# alias table we map the ones our modules ask for to the generic provider.
declare -A SOFTDEP_PROVIDERS=([crc32c]=crc32c_generic)

log() { echo "build-rig: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ -x "$busybox" ] || die "$busybox is missing (install busybox-static: scripts/install-deps.sh)"
for tool in apt-cache apt-get dpkg-deb objcopy xz; do
  command -v "$tool" >/dev/null || die "$tool is missing (run scripts/install-deps.sh)"
done

# The kernel package linux-image-amd64 points at, e.g. linux-image-6.1.0-56-amd64.
find_pkg() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
}
pkg=$(find_pkg)
if [ -z "$pkg" ]; then
  log "linux-image-amd64 is not in the apt lists; running apt-get update"
  apt-get update -qq >&2 || die "apt-get update failed"
  pkg=$(find_pkg)
fi
[ -n "$pkg" ] || die "cannot tell which kernel package linux-image-amd64 depends on (apt-cache depends linux-image-amd64)"
version=$(apt-cache show --no-all-versions "$pkg" | sed -n 's/^Version: //p' | head -n1)
[ -n "$version" ] || die "apt-cache knows no version of $pkg"

key=$({
  echo "$pkg $version"
  printf '%s\n' "${ROOT_MODULES[@]}"
  for m in "${!MODULE_PARAMS[@]}"; do echo "$m ${MODULE_PARAMS[$m]}"; done | LC_ALL=C sort
  sha256sum <"${BASH_SOURCE[0]}"
  sha256sum <"$here/init"
  sha256sum <"$images/lib/newc.sh"
  sha256sum <"$busybox"
} | sha256sum | cut -c1-64)
out=$cache/rig/$key
manifest=$cache/rig/rig.json

write_manifest() {
  local tmp
  tmp=$(mktemp "$cache/rig/.rig.json.XXXXXX")
  printf '{"kernel":{"path":"%s","sha256":"%s"},"initrd":{"path":"%s","sha256":"%s"},"debian_kernel":"%s %s"}\n' \
    "$out/vmlinuz" "$(sha256sum <"$out/vmlinuz" | cut -c1-64)" \
    "$out/rig-initrd.cpio" "$(sha256sum <"$out/rig-initrd.cpio" | cut -c1-64)" \
    "$pkg" "$version" >"$tmp"
  chmod 644 "$tmp"
  mv -f "$tmp" "$manifest"
  echo "$manifest"
}

case "$cache" in *'"'* | *'\'* | *' '*) die "cache path '$cache' holds a quote, backslash or space; set CLEAVE_CACHE elsewhere" ;; esac
mkdir -p "$cache/rig/debs"
exec 9>"$cache/rig/.lock"
flock 9
if [ -f "$out/rig-initrd.cpio" ] && [ -f "$out/vmlinuz" ]; then
  write_manifest
  exit 0
fi

tmp=$(mktemp -d "$cache/rig/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
started=$(date +%s)

deb=$(ls "$cache/rig/debs/${pkg}_${version//:/%3a}_amd64.deb" 2>/dev/null || true)
if [ -z "$deb" ]; then
  log "downloading $pkg $version"
  # apt's sandbox user cannot write into a root-owned cache dir; the download
  # is checked against the signed apt lists either way.
  (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$version" >&2) ||
    die "apt-get download $pkg=$version failed"
  mv "$tmp"/"${pkg}"_*.deb "$cache/rig/debs/"
  deb=$(ls "$cache/rig/debs/${pkg}"_*.deb | head -n1)
fi
log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$tmp/deb"
kver=${pkg#linux-image-}
moddir=$tmp/deb/lib/modules/$kver
[ -f "$tmp/deb/boot/vmlinuz-$kver" ] || die "$deb has no boot/vmlinuz-$kver"
[ -d "$moddir" ] || die "$deb has no lib/modules/$kver"
(cd "$moddir" && find . -name '*.ko' -o -name '*.ko.xz') >"$tmp/all-modules"

# module_file NAME: the .ko or .ko.xz for a module name (files may spell _ as -).
module_file() {
  local name=$1 alt=${1//_/-} f
  f=$(grep -E "/(${name}|${alt})\.ko(\.xz)?$" "$tmp/all-modules" | head -n1)
  [ -n "$f" ] && echo "$moddir/${f#./}"
}

mkdir "$tmp/mods"
# unpack_module NAME: leaves a plain NAME.ko in mods/ (busybox insmod wants it uncompressed).
unpack_module() {
  local name=$1 src
  src=$(module_file "$name") || die "module $name is not in $pkg (built in? check boot/config-$kver)"
  case "$src" in
  *.xz) xz -dc "$src" >"$tmp/mods/$name.ko" ;;
  *) cp "$src" "$tmp/mods/$name.ko" ;;
  esac
}

modinfo_field() {
  objcopy -O binary --only-section=.modinfo "$tmp/mods/$1.ko" /dev/stdout |
    tr '\0' '\n' | sed -n "s/^$2=//p"
}

# module_depends NAME: hard dependencies, then "pre:" soft dependencies (e.g.
# libcrc32c needs a crc32c implementation loaded first or its insmod fails).
module_depends() {
  local soft word phase=
  modinfo_field "$1" depends | tr ',' ' '
  soft=$(modinfo_field "$1" softdep)
  for word in $soft; do
    case "$word" in
    pre:) phase=pre ;;
    post:) phase=post ;;
    *)
      [ "$phase" = pre ] || continue
      if module_file "$word" >/dev/null; then
        echo "$word"
      elif [ -n "${SOFTDEP_PROVIDERS[$word]:-}" ]; then
        echo "${SOFTDEP_PROVIDERS[$word]}"
      else
        log "warning: $1 has soft dependency $word, which maps to no module; skipped"
      fi
      ;;
    esac
  done
}

# Depth-first: a module goes into the order after everything it depends on.
declare -A state=()
order=()
visit() {
  local name=$1 dep
  case "${state[$name]:-}" in
  done) return ;;
  active) die "module dependency cycle through $name" ;;
  esac
  state[$name]=active
  unpack_module "$name"
  for dep in $(module_depends "$name"); do visit "$dep"; done
  state[$name]=done
  order+=("$name")
}
for m in "${ROOT_MODULES[@]}"; do visit "$m"; done
log "modules in load order: ${order[*]}"

for m in "${order[@]}"; do echo "$m ${MODULE_PARAMS[$m]:-}"; done >"$tmp/modules.order"

list=$tmp/list
{
  for d in bin dev etc host lib lib/modules proc sys tmp; do echo "dir $d 755"; done
  echo "file init 755 $here/init"
  newc_busybox_base "$busybox"
  echo "file lib/modules/order 644 $tmp/modules.order"
  for m in "${order[@]}"; do echo "file lib/modules/$m.ko 644 $tmp/mods/$m.ko"; done
} >"$list"
newc_sort "$list"

mkdir "$tmp/out"
newc_write "$list" >"$tmp/out/rig-initrd.cpio"
cp "$tmp/deb/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
echo "$pkg $version" >"$tmp/out/debian-kernel"
mv -T "$tmp/out" "$out"
log "built in $(($(date +%s) - started)) s: $out"
write_manifest
