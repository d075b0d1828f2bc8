#!/usr/bin/env bash
# The main job of `make run`, run where a real KVM is (directly, or in the rig via
# scripts/kvm-or-rig): boot the default image and time the guest agent's readiness, then
# run a few commands in a fresh guest over the vsock control channel, fork a template
# three times, and put two forks on a network that lets them reach one name only.
set -euo pipefail
cleave=${CLEAVE_BIN:-target/debug/cleave}
echo "== cleave boot --selftest"
"$cleave" boot --selftest
echo "== cleave run -- sh -c 'uname -a; grep -m3 ... /proc/cpuinfo; nproc'"
"$cleave" run --vcpus 2 -- sh -c 'uname -a; grep -m3 -E "^(vendor_id|model name|flags)" /proc/cpuinfo | cut -c1-100; echo "cpus: $(nproc)"'
echo "== cleave run --json -- true"
"$cleave" run --json -- true
echo "== cleave run --forks 3 -- sh -c 'head -c 16 /dev/urandom | od -An -tx1'"
# Forks of the default template (created on first use), each reseeded before it runs;
# the three lines of random bytes must all differ. Templates live in the VM runtime
# directory; this demo keeps its own and removes it.
demo_runtime=$(mktemp -d /tmp/cleave-demo.XXXXXX)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
lab=$here/tests/lab/lab.sh
trap '"$lab" down; rm -rf "$demo_runtime"' EXIT
XDG_RUNTIME_DIR=$demo_runtime "$cleave" run --forks 3 -- sh -c 'head -c 16 /dev/urandom | od -An -tx1'
echo "== cleave template ls"
XDG_RUNTIME_DIR=$demo_runtime "$cleave" template ls
echo "== cleave run --forks 2 --allow allowed.test:80 --dns-upstream 45.45.0.53 -- ..."
# The "internet" is a lab of network namespaces this demo makes (tests/lab/lab.sh): a
# fake DNS server and web hosts that exist only there, no route off the machine. Each
# fork gets its own tap, address and DNS proxy; it may resolve allowed.test and reach
# its port 80, and nothing else: not the metadata address, not an unlisted name.
"$lab" up
XDG_RUNTIME_DIR=$demo_runtime "$lab" node "$cleave" run --forks 2 \
  --allow allowed.test:80 --dns-upstream 45.45.0.53 -- sh -c '
  echo "eth0: $(ip -4 -o addr show eth0 | awk "{print \$4}")"
  echo "allowed.test -> $(nslookup -type=A allowed.test | awk "/^Address: / {print \$2}")"
  printf "GET / HTTP/1.0\r\n\r\n" | nc -w 3 45.45.0.10 80 | tail -1
  printf "GET / HTTP/1.0\r\n\r\n" | nc -w 3 169.254.169.254 80 >/dev/null 2>&1 && echo "metadata: REACHED" || echo "metadata: refused"
  nslookup -type=A other.test >/dev/null 2>&1 && echo "other.test: RESOLVED" || echo "other.test: refused"'
echo "== cleave daemon, and its clients: cleave sandbox create | exec | cp | ls | rm"
# The node daemon serves the same library over its API (a Unix socket, 0600): sandboxes
# live until deleted or until their TTL runs out, and each has a token that works for it
# alone. It runs in the lab's node namespace so its sandboxes get the lab's network.
printf '%s\n' 'warm_workers = 2' '[network]' 'dns_upstream = ["45.45.0.53:53"]' \
  > "$demo_runtime/cleave.toml"
daemon="env CLEAVE=$cleave D=$demo_runtime sh $here/tests/lab/daemon.sh"
trap '$daemon stop >/dev/null 2>&1; "$lab" down; rm -rf "$demo_runtime"' EXIT
$daemon start >/dev/null
export XDG_RUNTIME_DIR=$demo_runtime
"$cleave" sandbox create --count 2 --ttl 300 --allow allowed.test:80 | tee "$demo_runtime/created"
ids=($(awk 'NR > 1 {print $1}' "$demo_runtime/created"))
tokens=($(awk 'NR > 1 {print $2}' "$demo_runtime/created"))
for n in 0 1; do
  echo "-- cleave exec ${ids[$n]} (its own token)"
  CLEAVE_TOKEN=${tokens[$n]} "$cleave" exec "${ids[$n]}" -- sh -c \
    'echo "$(hostname) $(ip -4 -o addr show eth0 | awk "{print \$4}") random=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d " ")"; nslookup -type=A allowed.test >/dev/null; printf "GET / HTTP/1.0\r\n\r\n" | nc -w 3 45.45.0.10 80 | tail -1' </dev/null
done
echo "-- cleave exec ${ids[1]} with the token of ${ids[0]}"
CLEAVE_TOKEN=${tokens[0]} "$cleave" exec "${ids[1]}" -- true </dev/null || echo "(refused, exit $?)"
echo "-- cleave cp, both ways, and stdin and exit codes through cleave exec"
echo "hello from the host" > "$demo_runtime/note"
CLEAVE_TOKEN=${tokens[0]} "$cleave" cp "$demo_runtime/note" "${ids[0]}:/tmp/note"
echo "piped in" | CLEAVE_TOKEN=${tokens[0]} "$cleave" exec "${ids[0]}" -- sh -c 'cat /tmp/note; cat; exit 3' || echo "(exit $?)"
CLEAVE_TOKEN=${tokens[0]} "$cleave" cp "${ids[0]}:/proc/version" - | cut -c1-60
echo "-- cleave sandbox ls; rm"
"$cleave" sandbox ls
"$cleave" sandbox rm "${ids[@]}"
$daemon stop >/dev/null
echo "daemon stopped; audit log:"
cut -c1-160 "$demo_runtime/audit.jsonl" | tail -4
