#!/usr/bin/env bash
# Builds (once, then reuses) a Python root filesystem from Debian's own packages, in the
# three forms a user can hand cleave: a directory, a tarball and an OCI image layout.
#
#   tests/lab/python-rootfs.sh      prints the output directory's path, and nothing else
#
# $CACHE/test-images/python-<key>/ (CACHE=${CLEAVE_CACHE:-$HOME/.cache/cleave}) holds:
#   rootfs/          python3's Depends/Pre-Depends closure, each .deb unpacked with
#                    dpkg-deb -x, plus users root and sandbox (1000:1000), /srv/hello.txt, /tmp
#   rootfs.tar.gz    that tree as a tarball (entries ./...)
#   oci/             an OCI image layout, tag "py": one layer with the tree, a second that
#                    whites out /usr/share/doc; env GREETING=hello-from-oci, workdir /srv,
#                    user sandbox
#   oci.tar          the same layout as an oci-archive
#   key, packages.txt, done
#
# The key hashes the closure's "name version sha256" lines and this script, so a new
# package version in the archive or an edit here rebuilds; nothing else does. It runs at
# the start of every `make test`, so the cached path must be instant: the closure is
# memoised per state of apt's lists. Needs root (dpkg-deb keeps owners, chroot self-check).
set -euo pipefail

log() { echo "python-rootfs: $*" >&2; }
die() { log "error: $*"; exit 1; }

CACHE=${CLEAVE_CACHE:-$HOME/.cache/cleave}
IMG=$CACHE/test-images
DEBS=$CACHE/debs
SELF=$(readlink -f "${BASH_SOURCE[0]}")
SELF_SHA=$(sha256sum "$SELF" | cut -d' ' -f1)

# Maintainer-script machinery: needed to run package scripts, which we never run. An
# alternative group naming one of these is treated as satisfied (debconf | debconf-2.0).
# dpkg alone would pull in tar, perl-base and friends.
declare -A EXCLUDE=([debconf]=1 [cdebconf]=1 [dpkg]=1 [perl-base]=1 [perl]=1 [install-info]=1)

mkdir -p "$IMG" "$DEBS"

# Fingerprint of what apt-cache answers from: the package lists and apt's configuration.
apt_state() {
  local files=(/var/lib/apt/lists/*_Packages* /etc/apt/sources.list /etc/apt/sources.list.d/*
    /etc/apt/preferences /etc/apt/preferences.d/*)
  { echo "$SELF_SHA"; stat -c '%n %s %Y' "${files[@]}" 2>/dev/null || true; } |
    sha256sum | cut -d' ' -f1
}

# python3's closure: one name a line. apt-cache's recursive output follows every
# alternative and every provider, so walk it ourselves taking the first choice of each
# group, which keeps e.g. media-types and leaves mime-support -> mailcap -> perl out.
# Reads `apt-cache depends --recurse` output on stdin.
closure() {
  local p line a sat skip i=0 grp
  # Emit "pkg<TAB>alt alt ..." per dependency group: " |Depends:" continues a group, and a
  # virtual "<name>" is replaced by its providers, listed beneath it indented by four.
  local -A deps=()
  while IFS=$'\t' read -r p line; do
    deps[$p]+="$line"$'\n'
  done < <(awk '
    function flush() { if (!cont && grp != "") print pkg "\t" grp; if (!cont) grp = "" }
    /^[^ ]/ { flush(); pkg = $1; next }
    /^ [ |](Pre)?Depends: / {
      flush(); cont = (substr($0, 2, 1) == "|"); t = $2; sub(/:any$/, "", t)
      if (t !~ /^</) grp = grp " " t
      next
    }
    /^    [^ ]/ { grp = grp " " $1; next }
    END { cont = 0; flush() }')
  local -A chosen=([python3]=1)
  local queue=(python3)
  while ((i < ${#queue[@]})); do
    p=${queue[i]}
    i=$((i + 1))
    while read -ra grp; do
      ((${#grp[@]})) || continue
      sat=0 skip=0
      for a in "${grp[@]}"; do
        [[ -n ${chosen[$a]:-} ]] && sat=1
        [[ -n ${EXCLUDE[$a]:-} ]] && skip=1
      done
      ((sat || skip)) && continue
      chosen[${grp[0]}]=1
      queue+=("${grp[0]}")
    done <<<"${deps[$p]:-}"
  done
  printf '%s\n' "${queue[@]}"
}

# "name version sha256" per package of the closure, sorted; memoised per apt state.
package_list() {
  local state memo list names raw
  state=$(apt_state)
  memo=$IMG/.packages-$state
  if [[ -s $memo ]]; then
    cat "$memo"
    return
  fi
  # Each apt-cache call parses all of apt's lists (~1.5 s here): make only two.
  local deps_cmd=(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts
    --no-breaks --no-replaces --no-enhances python3)
  if ! raw=$("${deps_cmd[@]}" 2>/dev/null) || [[ -z $raw ]]; then
    log "apt knows no python3; running apt-get update"
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    $sudo apt-get update -qq >&2
    raw=$("${deps_cmd[@]}")
    state=$(apt_state)
    memo=$IMG/.packages-$state
  fi
  mapfile -t names < <(closure <<<"$raw")
  list=$(apt-cache show --no-all-versions "${names[@]}" | awk '
    /^Package: / { p = $2 } /^Version: / { v = $2 } /^SHA256: / { s = $2 }
    /^$/ { if (p != "") print p, v, s; p = v = s = "" }
    END { if (p != "") print p, v, s }' | sort)
  [[ $(wc -l <<<"$list") -eq ${#names[@]} ]] ||
    die "apt-cache show gave $(wc -l <<<"$list") entries for ${#names[@]} packages"
  rm -f "$IMG"/.packages-*
  printf '%s\n' "$list" >"$memo.tmp.$$"
  mv "$memo.tmp.$$" "$memo"
  printf '%s\n' "$list"
}

LIST=$(package_list)
KEY=$(printf '%s\n%s\n' "$LIST" "$SELF_SHA" | sha256sum | cut -d' ' -f1)
OUT=$IMG/python-$KEY
if [[ -e $OUT/done ]]; then
  echo "$OUT"
  exit 0
fi

# Build path. One builder at a time: a second `make test` waits and then reuses.
exec 9>"$IMG/.lock"
flock 9
if [[ -e $OUT/done ]]; then
  echo "$OUT"
  exit 0
fi
[[ $(id -u) -eq 0 ]] || die "building needs root (dpkg-deb -x keeps owners; chroot self-check)"
for tool in apt-get dpkg-deb umoci jq chroot; do
  command -v "$tool" >/dev/null || die "$tool missing: run scripts/install-deps.sh"
done

# Leftovers of builds that were killed outright (the EXIT trap below covers the rest).
for d in "$IMG"/.python-*.tmp.*; do
  [[ -e $d ]] || continue
  kill -0 "${d##*.}" 2>/dev/null || rm -rf "$d"
done

TMP=$IMG/.python-$KEY.tmp.$$
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/rootfs"
log "building $OUT ($(wc -l <<<"$LIST") packages)"

# Fetch what the .deb cache lacks, then check every file against the archive's SHA256.
deb_path() { echo "$DEBS/${1}_${2//:/%3a}_"*.deb; }
missing=()
while read -r name ver sha; do
  f=$(deb_path "$name" "$ver")
  [[ -f $f ]] && [[ $(sha256sum "$f" | cut -d' ' -f1) == "$sha" ]] && continue
  rm -f "$f"
  missing+=("$name=$ver")
done <<<"$LIST"
if ((${#missing[@]})); then
  log "downloading ${#missing[@]} packages into $DEBS"
  # root downloads directly: the _apt sandbox user may not write in a home directory
  (cd "$DEBS" && apt-get download -qq -o APT::Sandbox::User=root "${missing[@]}") >&2
fi
debs=()
while read -r name ver sha; do
  f=$(deb_path "$name" "$ver")
  [[ -f $f ]] || die "no .deb for $name $ver after download"
  [[ $(sha256sum "$f" | cut -d' ' -f1) == "$sha" ]] || die "$f: sha256 differs from the archive's"
  debs+=("$f")
  dpkg-deb -x "$f" "$TMP/rootfs"
done <<<"$LIST"

# What an image needs that no package ships (their maintainer scripts would make some).
R=$TMP/rootfs
mkdir -p "$R/etc" "$R/root" "$R/home/sandbox" "$R/srv" "$R/tmp"
# mount points the guest fills in
mkdir -p "$R/dev" "$R/proc" "$R/sys" "$R/run"
cat >"$R/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
sandbox:x:1000:1000:sandbox:/home/sandbox:/bin/sh
EOF
cat >"$R/etc/group" <<'EOF'
root:x:0:
sandbox:x:1000:
EOF
chmod 0644 "$R/etc/passwd" "$R/etc/group"
chmod 0700 "$R/root"
chown 1000:1000 "$R/home/sandbox"
chmod 0755 "$R/home/sandbox" "$R/srv"
printf 'hello from the image\n' >"$R/srv/hello.txt"
chmod 0644 "$R/srv/hello.txt"
chmod 1777 "$R/tmp"

# Self-check: the tree runs python3 on its own loader and libraries (chroot would fail if
# /lib64/ld-linux-x86-64.so.2 did not resolve inside it), and knows its users.
log "self-check: $(chroot "$R" /usr/bin/python3 -c 'import os, hashlib, json; print(os.urandom(16).hex())')"
chroot "$R" /usr/bin/python3 -c '
import os, pwd
assert os.path.exists("/lib64/ld-linux-x86-64.so.2")
assert pwd.getpwnam("sandbox").pw_uid == 1000
assert open("/srv/hello.txt").read() == "hello from the image\n"
' || die "self-check failed"

log "writing rootfs.tar.gz"
tar --numeric-owner --sort=name -C "$R" -czf "$TMP/rootfs.tar.gz" .

# OCI layout with two layers, the second only a whiteout, so image import must apply it.
# Layers come from unpack/repack of a bundle, not `umoci insert`: bookworm's umoci 0.4.7
# never closes insert's tar writer (umoci#436), leaving layers GNU tar calls truncated.
# Repack turns the deleted /usr/share/doc into a .wh.doc entry.
log "writing oci/ and oci.tar"
(
  cd "$TMP"
  umoci init --layout oci
  umoci new --image oci:py
  umoci unpack --image oci:py bundle
  cp -a rootfs/. bundle/rootfs/
  umoci repack --refresh-bundle --image oci:py bundle
  rm -rf bundle/rootfs/usr/share/doc
  umoci repack --image oci:py bundle
  rm -rf bundle
  umoci config --image oci:py --config.env PATH=/usr/local/bin:/usr/bin:/bin \
    --config.env GREETING=hello-from-oci --config.workingdir /srv --config.user sandbox
  # every insert/config leaves the previous manifest and config behind
  umoci gc --layout oci
) >&2
n=$(jq '[.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == "py")]
  | length' "$TMP/oci/index.json")
[[ $n -eq 1 ]] || die "oci/index.json: $n manifests tagged py, want 1"
tar --numeric-owner --sort=name -C "$TMP/oci" -cf "$TMP/oci.tar" .

printf '%s\n' "$LIST" >"$TMP/packages.txt"
echo "$KEY" >"$TMP/key"
touch "$TMP/done"
rm -rf "$OUT"
mv "$TMP" "$OUT"
trap - EXIT

# Only the current image and its .debs are kept.
for d in "$IMG"/python-*; do
  [[ $d == "$OUT" ]] || rm -rf "$d"
done
declare -A keep=()
for f in "${debs[@]}"; do keep[$f]=1; done
for f in "$DEBS"/*.deb; do
  [[ -e $f && -z ${keep[$f]:-} ]] && rm -f "$f"
done
log "built $OUT"
echo "$OUT"
