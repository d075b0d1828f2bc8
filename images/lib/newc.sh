# shellcheck shell=bash
# A reproducible newc (SVR4, no CRC) cpio writer in plain bash, sourced by the
# initramfs builders. Why not GNU cpio: it records the builder's mtimes, owners
# and inode numbers, and device nodes (/dev/console) would need mknod as root.
# Here every entry is owned by root, has mtime 0, gets a sequential inode, and
# the caller decides the order (we sort), so equal inputs give equal bytes.
#
# Usage: newc_write LIST > archive.cpio
# LIST has one entry per line, fields separated by single spaces:
#   dir   PATH MODE            (MODE in octal, permission bits only)
#   file  PATH MODE SOURCE     (SOURCE is copied byte for byte; may hold spaces)
#   slink PATH TARGET
#   nod   PATH MODE c|b MAJOR MINOR
# PATH is relative to the archive root, without a leading slash.

_newc_ino=721

# _newc_header NAME MODE(full, decimal) SIZE RMAJ RMIN
_newc_header() {
  local name=$1 mode=$2 size=$3 rmaj=$4 rmin=$5
  local namesize=$((${#name} + 1))
  printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
    "$_newc_ino" "$mode" 0 0 1 0 "$size" 0 0 "$rmaj" "$rmin" "$namesize" 0
  _newc_ino=$((_newc_ino + 1))
  printf '%s\0' "$name"
  # The 110-byte header plus the name is padded to a multiple of 4.
  _newc_pad $((110 + namesize))
}

_newc_pad() {
  local n=$(((4 - $1 % 4) % 4))
  [ "$n" -eq 0 ] || head -c "$n" /dev/zero
}

newc_write() {
  local list=$1 kind path rest a b c d size
  while IFS=' ' read -r kind path rest; do
    [ -n "$kind" ] || continue
    # SOURCE and TARGET take the rest of the line, so they may hold spaces.
    IFS=' ' read -r a b c d <<<"$rest"
    case "$kind" in file) b=${rest#* } ;; slink) a=$rest ;; esac
    case "$kind" in
    dir) _newc_header "$path" $((0040000 | 0$a)) 0 0 0 ;;
    file)
      [ -f "$b" ] || { echo "newc: $b is not a regular file" >&2; return 1; }
      size=$(stat -Lc %s "$b")
      _newc_header "$path" $((0100000 | 0$a)) "$size" 0 0
      cat "$b"
      _newc_pad "$size"
      ;;
    slink)
      _newc_header "$path" $((0120000 | 0777)) "${#a}" 0 0
      printf '%s' "$a"
      _newc_pad "${#a}"
      ;;
    nod)
      case "$b" in
      c) _newc_header "$path" $((0020000 | 0$a)) 0 "$c" "$d" ;;
      b) _newc_header "$path" $((0060000 | 0$a)) 0 "$c" "$d" ;;
      *) echo "newc: bad node type '$b' for $path" >&2; return 1 ;;
      esac
      ;;
    *) echo "newc: unknown entry kind '$kind'" >&2; return 1 ;;
    esac
  done <"$list"
  _newc_header "TRAILER!!!" 0 0 0 0
}

# newc_sort LIST: orders entries by path (C locale) so parents precede children.
newc_sort() {
  LC_ALL=C sort -t ' ' -k2,2 -o "$1" "$1"
}

# newc_busybox_base BUSYBOX: list lines for what every initramfs of ours has: the
# console and null device nodes, BUSYBOX as /bin/busybox and a /bin symlink for each of
# its applets (except init: /init is the image's own).
newc_busybox_base() {
  local busybox=$1 applet
  echo "nod dev/console 600 c 5 1"
  echo "nod dev/null 666 c 1 3"
  echo "file bin/busybox 755 $busybox"
  for applet in $("$busybox" --list); do
    case "$applet" in busybox | init) continue ;; esac
    echo "slink bin/$applet busybox"
  done
}
