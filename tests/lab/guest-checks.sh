# Run inside a sandbox whose policy is `--allow allowed.test:80 --allow private.test
# --allow nat64meta.test` with the lab (tests/lab/lab.sh) as its internet. Prints one
# `CHECK <name> ok` or `CHECK <name> FAIL <detail>` line per rule; the spoofing probes
# come last because they change the guest's own interface.
ok() { echo "CHECK $1 ok"; }
bad() { echo "CHECK $1 FAIL $2" | tr '\n' ' '; echo; }
get() { printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 "$@" 2>&1; }
gw=$(ip route | awk '/^default/ {print $3}')

a=$(nslookup -type=A allowed.test 2>&1)
case "$a" in *45.45.0.10*) ok resolve-allowed ;; *) bad resolve-allowed "$a" ;; esac
r=$(get 45.45.0.10 80)
case "$r" in *"hello from allowed.test"*) ok pinned-port ;; *) bad pinned-port "$r" ;; esac
r=$(get 45.45.0.10 8080)
case "$r" in *hello*) bad same-address-other-port "$r" ;; *) ok same-address-other-port ;; esac
r=$(get 45.45.0.11 80)
case "$r" in *hello*) bad never-resolved-address "$r" ;; *) ok never-resolved-address ;; esac
r=$(get 172.31.255.2 80)
case "$r" in *hello*) bad uplink-peer "$r" ;; *) ok uplink-peer ;; esac
r=$(get 169.254.169.254 80)
case "$r" in *secrets*) bad metadata "$r" ;; *) ok metadata ;; esac
n=$(nslookup -type=A other.test 2>&1)
case "$n" in *45.45.0.11*) bad unlisted-name "$n" ;; *) ok unlisted-name ;; esac
p=$(nslookup -type=A private.test 2>&1)
case "$p" in *10.1.2.3*) bad private-answer "$p" ;; *) ok private-answer ;; esac
m=$(nslookup -type=AAAA nat64meta.test 2>&1)
case "$m" in *a9fe*) bad nat64-metadata "$m" ;; *) ok nat64-metadata ;; esac
r=$(get "$gw" 8000)
case "$r" in *hello*) bad host-service "$r" ;; *) ok host-service ;; esac
r=$(get 172.31.255.1 8000)
case "$r" in *hello*) bad host-uplink-address "$r" ;; *) ok host-uplink-address ;; esac
# Spoofing, judged where the packets would arrive: the lab counts UDP datagrams reaching
# 45.45.0.10:80 (a pinned pair for TCP and UDP). Three from the guest's own address must
# arrive, three from another source address must not. (A spoofed MAC needs AF_PACKET,
# which the guest kernel does not have; netfilter/tests/traffic.rs proves that rule.)
for i in 1 2 3; do /init udp-send 45.45.0.10:80 own; done
ip addr add 10.231.200.9/32 dev eth0
for i in 1 2 3; do /init udp-send 10.231.200.9 45.45.0.10:80 spoofed-ip; done
ip addr del 10.231.200.9/32 dev eth0
echo SENT-UDP
