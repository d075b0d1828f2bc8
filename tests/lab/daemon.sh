#!/bin/sh
# Drives a `cleave daemon` for tests/tests/daemon.rs, inside the lab's node namespace
# (tests/lab/lab.sh): its taps, chains and DNS proxies live there; its API socket is a
# file, reachable from anywhere in the rig.
#
#   daemon.sh start          start it (config: $D/cleave.toml), wait until /readyz is ready
#   daemon.sh get PATH       an HTTP GET of its metrics listener (127.0.0.1:9464 in cl-node)
#   daemon.sh leftovers      what a dead or stopped daemon could leave, one `key=value` a line
#   daemon.sh running        the pids of its workers whose fork runs, one a line
#   daemon.sh container      a second daemon as a privileged pod runs it (own cgroup
#                            namespace); where it and its workers' leaves end up
#   daemon.sh jail           how each of its workers is confined, `key=value`
#   daemon.sh kill9          kill -9 the daemon
#   daemon.sh stop           SIGTERM and wait; prints rc=
#
# $CLEAVE is the cleave binary; $D the test's runtime directory (XDG_RUNTIME_DIR).
set -u
: "${CLEAVE:?}" "${D:?}"
export XDG_RUNTIME_DIR="$D"
NODE="ip netns exec cl-node"
RUN="$D/cleave"

pid() { cat "$D/daemon.pid" 2>/dev/null; }

# The daemon's workers: its children named cleave-fork-worker (a template's zygote,
# `cleave-zygote`, forks them as the daemon's children: CLONE_PARENT).
workers_of() {
  ps -eo pid,ppid,comm | awk -v d="$1" '$2==d && $3=="cleave-fork-wor" {print $1}'
}

# Whether worker $1's fork runs: its vsock socket exists from `go` on. (Its vCPU thread
# is no sign: a pooled worker parks it, confined, before it is used.)
runs() {
  rd=$(ls -d "$RUN"/vm-$1-* 2>/dev/null | head -1)
  [ -n "$rd" ] && [ -S "$rd/vsock.sock" ]
}

# busybox nc closes the connection when its stdin ends: keep it open until the reply
# (HTTP/1.0: the server closes when it has answered).
get() {
  (printf 'GET %s HTTP/1.0\r\n\r\n' "$1"; sleep 1) | $NODE busybox nc 127.0.0.1 9464 2>/dev/null
}

case "$1" in
start)
  sh "$(dirname "$0")/lab.sh" node "$CLEAVE" daemon --config "$D/cleave.toml" --metrics-listen 127.0.0.1:9464 \
    --audit-log "$D/audit.jsonl" >>"$D/daemon.log" 2>&1 &
  echo $! >"$D/daemon.pid"
  i=0
  while [ $i -lt 120 ]; do
    # Each try takes about a second (see get).
    if get /readyz | grep -q '^ready'; then
      echo "ready_after_tries=$i"
      exit 0
    fi
    kill -0 "$(pid)" 2>/dev/null || { echo "daemon died"; tail -20 "$D/daemon.log"; exit 1; }
    i=$((i + 1))
  done
  echo "not ready after 120 tries"; get /readyz; tail -20 "$D/daemon.log"; exit 1
  ;;
get) get "$2" ;;
kill9)
  kill -9 "$(pid)"
  while kill -0 "$(pid)" 2>/dev/null; do sleep 0.1; done
  ;;
stop)
  kill -TERM "$(pid)"
  wait "$(pid)" 2>/dev/null
  while kill -0 "$(pid)" 2>/dev/null; do sleep 0.1; done
  echo "rc=$(grep -c 'stopping: destroying every sandbox' "$D/daemon.log")"
  ;;
leftovers)
  me=$(pid)
  alive=0; kill -0 "$me" 2>/dev/null && alive=1
  # Workers not started by the running daemon (all of them when it is not running).
  orphans=0; ours=0; zygotes=0
  for p in $(ps -eo pid,ppid,comm | awk '$3=="cleave-fork-wor" || $3=="cleave-zygote" || $3=="cleave-template" {print $1":"$2":"$3}'); do
    ppid=${p#*:}; ppid=${ppid%%:*}
    if [ "$alive" = 1 ] && [ "$ppid" = "$me" ]; then
      case "$p" in *:cleave-zygote) zygotes=$((zygotes + 1)) ;; *) ours=$((ours + 1)) ;; esac
    else
      orphans=$((orphans + 1))
    fi
  done
  echo "orphan_workers=$orphans"
  echo "workers=$ours"
  echo "zygotes=$zygotes"
  dead_dirs=0
  for d in "$RUN"/vm-*; do
    [ -e "$d" ] || continue
    p=${d##*/vm-}; p=${p%%-*}
    [ -e "/proc/$p" ] || dead_dirs=$((dead_dirs + 1))
  done
  echo "dead_runtime_dirs=$dead_dirs"
  echo "runtime_dirs=$(ls -d "$RUN"/vm-* 2>/dev/null | wc -l)"
  echo "journal=$(ls "$RUN/daemon/workers" 2>/dev/null | wc -l)"
  echo "cgroups=$(ls -d /sys/fs/cgroup/cleave/worker-* 2>/dev/null | wc -l)"
  echo "taps=$($NODE ip -o link show type tun | wc -l)"
  echo "chains=$($NODE nft list table inet cleave 2>/dev/null | grep -cE 'chain (fwd|in|to|nat)-')"
  echo "sets=$($NODE nft list table inet cleave 2>/dev/null | grep -cE 'set (pin|allow)')"
  echo "sockets=$(find "$RUN" -type s | wc -l)"
  ;;
container)
  # The daemon as a privileged pod runs it: alone at the root of a private cgroup
  # namespace, whose root cannot hand controllers down while it sits there. It must move
  # itself into cleave-agent/ and give its workers leaves under cleave/.
  echo "+memory +cpu +pids" > /sys/fs/cgroup/cgroup.subtree_control
  mkdir -p /sys/fs/cgroup/pod
  printf 'default_template_mem_mib = 128\nwarm_workers = 1\n' > "$D/container.toml"
  # shellcheck disable=SC2016
  sh -c 'echo $$ > /sys/fs/cgroup/pod/cgroup.procs
    exec unshare -C -m sh -c "umount -l /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup &&
      exec \"\$0\" daemon --config \"\$1\"" "$0" "$1"' "$CLEAVE" "$D/container.toml" >"$D/container.log" 2>&1 &
  pid=$!
  i=0
  while [ $i -lt 240 ] && ! ls -d /sys/fs/cgroup/pod/cleave/worker-* >/dev/null 2>&1; do
    sleep 0.5; i=$((i + 1))
  done
  echo "daemon_cgroup=$(sed -n 's/^0:://p' /proc/$pid/cgroup)"
  echo "leaves=$(ls -d /sys/fs/cgroup/pod/cleave/worker-* 2>/dev/null | wc -l)"
  kill $pid; wait $pid
  echo "leaves_after_stop=$(ls -d /sys/fs/cgroup/pod/cleave/worker-* 2>/dev/null | wc -l)"
  ;;
running)
  # The pids of the daemon's workers whose fork runs.
  for p in $(workers_of "$(pid)"); do
    runs "$p" && echo "$p"
  done
  ;;
jail)
  # Every worker of the running daemon: its own non-root uid (distinct), no
  # capabilities, no_new_privs, its own mount, network and PID namespaces, a runtime
  # directory (its whole filesystem) that only its uid can enter, its own cgroup leaf;
  # a running fork's threads are all under seccomp, in their scheduling classes.
  me=$(pid); n=0; bad=0; uids=""; running=0; socks=""; foreign=0
  for p in $(workers_of "$me"); do
    n=$((n + 1))
    uid=$(awk '/^Uid:/ {print $2}' /proc/$p/status)
    [ "$uid" != 0 ] || { echo "worker $p runs as root"; bad=$((bad + 1)); }
    grep -q '^NoNewPrivs:[[:space:]]*1' /proc/$p/status || { echo "worker $p: no_new_privs off"; bad=$((bad + 1)); }
    grep -q '^CapEff:[[:space:]]*0000000000000000' /proc/$p/status || { echo "worker $p has capabilities"; bad=$((bad + 1)); }
    [ "$(readlink /proc/$p/ns/mnt)" != "$(readlink /proc/$me/ns/mnt)" ] || { echo "worker $p shares the mount namespace"; bad=$((bad + 1)); }
    [ "$(readlink /proc/$p/ns/net)" != "$(readlink /proc/$me/ns/net)" ] || { echo "worker $p shares the network namespace"; bad=$((bad + 1)); }
    [ "$(readlink /proc/$p/ns/pid)" != "$(readlink /proc/$me/ns/pid)" ] && grep -q "^NSpid:[[:space:]]*$p[[:space:]]*1\$" /proc/$p/status ||
      { echo "worker $p is not PID 1 of its own PID namespace"; bad=$((bad + 1)); }
    d=$(ls -d "$RUN"/vm-$p-* 2>/dev/null | head -1)
    [ -n "$d" ] && [ "$(stat -c '%u %a' "$d")" = "$uid 700" ] || { echo "worker $p: runtime dir ${d:-missing} is not its own 0700"; bad=$((bad + 1)); }
    # Its own cgroup leaf, with a memory and a pids limit.
    cg=$(sed -n 's/^0:://p' /proc/$p/cgroup)
    [ "$cg" = "/cleave/worker-$uid" ] || { echo "worker $p: cgroup $cg"; bad=$((bad + 1)); }
    [ "$(cat /sys/fs/cgroup$cg/memory.max 2>/dev/null)" != max ] && [ "$(cat /sys/fs/cgroup$cg/pids.max 2>/dev/null)" = 64 ] ||
      { echo "worker $p: no memory/pids limit in $cg"; bad=$((bad + 1)); }
    # A running fork: every thread under a seccomp filter.
    if runs "$p"; then
      running=$((running + 1))
      for t in /proc/$p/task/*; do
        grep -q '^Seccomp:[[:space:]]*2' $t/status || { echo "worker $p thread $(cat $t/comm): no seccomp filter"; bad=$((bad + 1)); }
        # Scheduling (host/sched.rs): the node moved the jailed worker's control thread
        # out of the idle class at go (SCHED_OTHER, 0); the guest's threads stay in it (5).
        pol=$(sed 's/.*) //' $t/stat | awk '{print $39}')
        want=5; [ "${t##*/}" = "$p" ] && want=0
        [ "$pol" = "$want" ] || { echo "worker $p thread $(cat $t/comm): scheduling policy $pol, not $want"; bad=$((bad + 1)); }
      done
      socks="$socks $uid:$d/vsock.sock"
    fi
    uids="$uids $uid"
  done
  # Another uid (a made-up one, then another worker's) cannot connect to a running fork's
  # socket: its directory is its own 0700, and the device checks SO_PEERCRED.
  set -- $socks
  if [ $# -ge 2 ]; then
    a_sock=${1#*:}; b_uid=${2%%:*}
    for u in 12345 "$b_uid"; do
      if setpriv --reuid="$u" --regid="$u" --clear-groups /usr/bin/python3 -c \
        "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'CONNECT 1024\\n'); sys.exit(0 if s.recv(64) else 1)" \
        "$a_sock" 2>/dev/null; then
        echo "uid $u connected to $a_sock"; bad=$((bad + 1))
      else
        foreign=$((foreign + 1))
      fi
    done
  fi
  echo "jailed_workers=$n"
  echo "running_forks=$running"
  echo "foreign_connects_refused=$foreign"
  echo "jail_violations=$bad"
  echo "distinct_uids=$(echo $uids | tr ' ' '\n' | sort -u | grep -c .)"
  ;;
*) echo "usage: daemon.sh start|get PATH|leftovers|running|container|jail|kill9|stop" >&2; exit 2 ;;
esac
