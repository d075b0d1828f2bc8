#!/bin/sh
# A test network with no way out: two network namespaces this script makes and removes.
#
#   cl-node  where cleave runs (its taps, chains and DNS proxies live here); its default
#            route, through veth up0 (172.31.255.1/30), is the "internet" namespace.
#   cl-inet  the "internet": inet0 (172.31.255.2/30) and, on lo, test hosts with
#            globally-reachable-looking addresses that exist only here:
#              45.45.0.10   web host: httpd on :80 and :8080 (allowed.test)
#              45.45.0.11   web host: httpd on :80 (other.test)
#              45.45.0.53   fake authoritative DNS (dnsmasq, answers only the names below)
#              169.254.169.254  a "metadata" httpd on :80
#              172.31.255.2 the uplink's peer itself: httpd on :80
#            and a route back to the sandbox range through cl-node (so a refused inbound
#            connection is refused by the firewall, not by a missing route).
#   cl-node also serves httpd on 0.0.0.0:8000: a host service no guest may reach.
#
# Nothing here has a route off the machine: the namespaces have no interface but these.
#
#   lab.sh up         build it (idempotent: tears down a previous lab first)
#   lab.sh down       remove it and everything running in it
#   lab.sh udp-count  UDP datagrams that reached 45.45.0.10:80 since the last reset
#   lab.sh udp-reset  zero that count
#   lab.sh node CMD.. run CMD in cl-node, with the cgroup v2 hierarchy visible (`ip netns
#                     exec` mounts a fresh /sys, which hides /sys/fs/cgroup)
set -eu

NODE=cl-node
INET=cl-inet
WWW=${LAB_WWW:-/tmp/cleave-lab-www}

down() {
  for ns in $INET $NODE; do
    if ip netns pids "$ns" >/dev/null 2>&1; then
      for p in $(ip netns pids "$ns"); do kill -9 "$p" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
  rm -rf "$WWW"
}

up() {
  down
  ip netns add $NODE
  ip netns add $INET
  ip -n $NODE link set lo up
  ip -n $INET link set lo up
  ip link add up0 netns $NODE type veth peer name inet0 netns $INET
  ip -n $NODE addr add 172.31.255.1/30 dev up0
  ip -n $INET addr add 172.31.255.2/30 dev inet0
  ip -n $NODE link set up0 up
  ip -n $INET link set inet0 up
  ip -n $NODE route add default via 172.31.255.2 dev up0
  for a in 45.45.0.10 45.45.0.11 45.45.0.53 169.254.169.254; do
    ip -n $INET addr add "$a/32" dev lo
  done
  ip -n $INET route add 10.231.0.0/16 via 172.31.255.1 dev inet0

  mkdir -p "$WWW/allowed" "$WWW/other" "$WWW/meta"
  echo "hello from allowed.test" >"$WWW/allowed/index.html"
  echo "hello from other.test" >"$WWW/other/index.html"
  echo "instance secrets" >"$WWW/meta/index.html"
  ip netns exec $INET busybox httpd -p 45.45.0.10:80 -h "$WWW/allowed"
  ip netns exec $INET busybox httpd -p 45.45.0.10:8080 -h "$WWW/allowed"
  ip netns exec $INET busybox httpd -p 45.45.0.11:80 -h "$WWW/other"
  ip netns exec $INET busybox httpd -p 169.254.169.254:80 -h "$WWW/meta"
  ip netns exec $INET busybox httpd -p 172.31.255.2:80 -h "$WWW/other"
  ip netns exec $NODE busybox httpd -p 0.0.0.0:8000 -h "$WWW/other"
  ip netns exec $INET dnsmasq --keep-in-foreground --no-resolv --no-hosts --no-poll \
    --bind-interfaces --listen-address=45.45.0.53 --port=53 --user=root --group=root \
    --pid-file= --log-facility=- \
    --address=/allowed.test/45.45.0.10 \
    --address=/other.test/45.45.0.11 \
    --address=/private.test/10.1.2.3 \
    --address=/meta.test/169.254.169.254 \
    --address=/nat64meta.test/64:ff9b::a9fe:a9fe >/dev/null 2>&1 &
  # Where spoofing is judged: what actually arrives at a pinned pair.
  ip netns exec $INET nft -f - <<'NFT'
table inet lab {
  counter udp80 { }
  chain in {
    type filter hook input priority 0; policy accept;
    ip daddr 45.45.0.10 udp dport 80 counter name "udp80"
  }
}
NFT
  # Wait until the fake DNS answers (it starts in the background).
  i=0
  until ip netns exec $NODE busybox nslookup -type=A allowed.test 45.45.0.53 >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -lt 50 ] || { echo "lab: the fake DNS did not come up" >&2; exit 1; }
    sleep 0.2
  done
}

case "${1:-}" in
up) up ;;
node)
  shift
  exec ip netns exec $NODE sh -c \
    'mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup; exec "$@"' sh "$@" ;;
down) down ;;
udp-count) ip netns exec $INET nft list counter inet lab udp80 | awk '/packets/ {print $2}' ;;
udp-reset) ip netns exec $INET nft reset counter inet lab udp80 >/dev/null ;;
*) echo "usage: lab.sh up|down|udp-count|udp-reset" >&2; exit 2 ;;
esac
