//! `cleave daemon` end to end, in one rig boot (or directly on a hardware-KVM host): the
//! daemon serves `cleave sandbox create --count 2`, each sandbox runs commands only with
//! its own token, stdin and exit codes stream through, files round trip, limits and TTLs
//! hold, a networked sandbox reaches only its policy, the audit log is complete and holds
//! no secret, `/metrics` shows the fork histogram, and `kill -9` of the daemon during a
//! storm of creates and execs, then a restart, leaves nothing orphaned.

use std::path::PathBuf;
use std::time::Duration;

use cleave_tests::{cleave_bin, json_lines, run_batch, sh_quote, Failures, Outcome, Scenario};

const D: &str = "/tmp/cleave-daemon-test";

fn lab_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("lab")
}

/// The `key=value` lines after `marker` in the output.
fn after<'a>(r: &'a Outcome, marker: &str, key: &str) -> Option<&'a str> {
    let rest = &r.output[r.output.find(marker)? + marker.len()..];
    rest.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::trim)
}

const CONFIG: &str = "default_template_mem_mib = 128\n\
                      warm_workers = 2\n\
                      max_sandboxes = 4\n\
                      max_ttl_secs = 3600\n\
                      default_ttl_secs = 600\n\
                      max_execs_per_sandbox = 4\n\
                      [network]\n\
                      dns_upstream = [\"45.45.0.53:53\"]\n";

#[test]
fn the_daemon_serves_sandboxes_and_survives_kill_9() {
    let lab = sh_quote(&lab_dir().join("lab.sh").to_string_lossy());
    let bin = sh_quote(&cleave_bin().to_string_lossy());
    let ctl = format!(
        "CLEAVE={bin} D={D} sh {}",
        sh_quote(&lab_dir().join("daemon.sh").to_string_lossy())
    );
    // Clients run outside the lab namespace: the socket is a file.
    let c = format!("XDG_RUNTIME_DIR={D} timeout 120 {bin}");
    let id = |n: usize| format!("$(sed -n '{n}p' {D}/ids)");
    let tok = |n: usize| format!("$(sed -n '{n}p' {D}/tokens)");
    let scenarios = vec![
        Scenario::new(
            "up",
            format!(
                "rm -rf {D}; mkdir -p {D}; chmod 700 {D}; printf '%s' {config} > {D}/cleave.toml; \
                 {lab} up >/dev/null && {ctl} start",
                config = sh_quote(CONFIG)
            ),
        ),
        Scenario::new(
            "create-two",
            format!(
                "{c} sandbox create --count 2 --json > {D}/created; echo rc=$?; cat {D}/created; \
                 sed -n 's/.*\"id\":\"\\([^\"]*\\)\".*/\\1/p' {D}/created > {D}/ids; \
                 sed -n 's/.*\"token\":\"\\([^\"]*\\)\".*/\\1/p' {D}/created > {D}/tokens; \
                 {c} sandbox ls"
            ),
        ),
        // Every worker (the two sandboxes' and the warm ones) is jailed.
        Scenario::new("jail", format!("{ctl} jail")),
        Scenario::new(
            "own-tokens",
            format!(
                "for n in 1 2; do i=$(sed -n \"${{n}}p\" {D}/ids); t=$(sed -n \"${{n}}p\" {D}/tokens); \
                 CLEAVE_TOKEN=$t {c} exec --no-stdin $i -- sh -c 'echo out-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d \" \\n\")'; \
                 echo rc$n=$?; done"
            ),
        ),
        Scenario::new(
            "cross-token",
            format!(
                "CLEAVE_TOKEN={t1} {c} exec --no-stdin {i2} -- true; echo cross_rc=$?; \
                 CLEAVE_TOKEN=0000000000000000000000000000000000000000000000000000000000000000 \
                 {c} exec --no-stdin {i1} -- true; echo wrong_rc=$?; \
                 CLEAVE_TOKEN={t1} {c} exec --no-stdin sb-0123456789abcdef -- true; echo unknown_rc=$?; \
                 {c} exec --no-stdin {i1} -- true; echo missing_rc=$?; \
                 CLEAVE_TOKEN={t1} {c} exec --no-stdin not-an-id -- true; echo badid_rc=$?",
                t1 = tok(1),
                i1 = id(1),
                i2 = id(2)
            ),
        ),
        Scenario::new(
            "stdin-and-exit",
            format!(
                "echo piped-input | CLEAVE_TOKEN={t1} {c} exec {i1} -- sh -c 'cat; echo to-stderr >&2; exit 7'; \
                 echo rc=$?; \
                 CLEAVE_TOKEN={t1} {c} exec --no-stdin {i1} -- sh -c 'kill -TERM $$'; echo sig_rc=$?",
                t1 = tok(1),
                i1 = id(1)
            ),
        ),
        // max_execs_per_sandbox = 4: a fifth concurrent exec is refused, naming the limit.
        Scenario::new(
            "exec-limit",
            format!(
                "for k in 1 2 3 4; do CLEAVE_TOKEN={t1} {c} exec --no-stdin {i1} -- sleep 8 & done; \
                 for w in $(seq 1 60); do n=$({c} sandbox ls --json | grep {i1} | \
                 grep -o 'active_execs.:[0-9]*' | cut -d: -f2); [ \"$n\" = 4 ] && break; sleep 0.2; done; \
                 echo active=$n; CLEAVE_TOKEN={t1} {c} exec --no-stdin {i1} -- true; echo fifth_rc=$?; wait",
                t1 = tok(1),
                i1 = id(1)
            ),
        ),
        Scenario::new(
            "files",
            format!(
                "head -c 300000 /dev/urandom > {D}/f; \
                 CLEAVE_TOKEN={t1} {c} cp {D}/f {i1}:/tmp/f; echo up_rc=$?; \
                 CLEAVE_TOKEN={t1} {c} cp {i1}:/tmp/f {D}/g; echo down_rc=$?; \
                 cmp {D}/f {D}/g && echo same=yes; \
                 CLEAVE_TOKEN={t2} {c} exec --no-stdin {i2} -- test -e /tmp/f; echo sibling_sees=$?; \
                 CLEAVE_TOKEN={t2} {c} cp {i1}:/tmp/f {D}/h; echo cross_cp_rc=$?; \
                 CLEAVE_TOKEN={t1} {c} cp {i1}:/nonexistent {D}/h; echo missing_rc=$?",
                t1 = tok(1),
                t2 = tok(2),
                i1 = id(1),
                i2 = id(2)
            ),
        ),
        Scenario::new(
            "limits",
            format!(
                "{c} sandbox create --count 3; echo over_rc=$?; \
                 {c} sandbox create --ttl 99999; echo ttl_rc=$?; \
                 {c} sandbox create --template nosuch; echo template_rc=$?; \
                 {c} sandbox create --allow 'exa mple.test'; echo policy_rc=$?; \
                 {c} sandbox create --count 0; echo count_rc=$?; \
                 echo live=$({c} sandbox ls --json | wc -l)"
            ),
        ),
        Scenario::new(
            "network",
            format!(
                "{c} sandbox create --allow allowed.test:80 --json > {D}/net; echo rc=$?; \
                 i=$(sed -n 's/.*\"id\":\"\\([^\"]*\\)\".*/\\1/p' {D}/net); \
                 t=$(sed -n 's/.*\"token\":\"\\([^\"]*\\)\".*/\\1/p' {D}/net); \
                 CLEAVE_TOKEN=$t {c} exec --no-stdin $i -- sh -c \
                 'nslookup allowed.test >/dev/null; printf \"GET / HTTP/1.0\\r\\n\\r\\n\" | nc -w 3 45.45.0.10 80; \
                 printf \"GET / HTTP/1.0\\r\\n\\r\\n\" | nc -w 3 45.45.0.11 80; echo other_rc=$?'; \
                 echo exec_rc=$?; {c} sandbox rm $i; echo rm_rc=$?"
            ),
        ),
        Scenario::new(
            "ttl",
            format!(
                "{c} sandbox create --ttl 2 --json > {D}/ttl; \
                 i=$(sed -n 's/.*\"id\":\"\\([^\"]*\\)\".*/\\1/p' {D}/ttl); echo id=$i; \
                 sleep 5; {c} sandbox ls | grep -c \"$i\"; \
                 grep -c \"sandbox.expire.*$i\" {D}/audit.jsonl | sed 's/^/expired=/'"
            ),
        ),
        // A worker killed mid-exec (what a crashed VMM or a seccomp violation looks like
        // from outside): only its sandbox ends, reported as lost; the others go on.
        Scenario::new(
            "lost",
            format!(
                "{ctl} running > {D}/before; {c} sandbox create --json > {D}/lost; \
                 i=$(sed -n 's/.*\"id\":\"\\([^\"]*\\)\".*/\\1/p' {D}/lost); \
                 t=$(sed -n 's/.*\"token\":\"\\([^\"]*\\)\".*/\\1/p' {D}/lost); \
                 {ctl} running > {D}/after; p=$(grep -vxFf {D}/before {D}/after | head -1); \
                 echo pid_found=$([ -n \"$p\" ] && echo 1 || echo 0); \
                 (CLEAVE_TOKEN=$t {c} exec --no-stdin $i -- sleep 30 >/dev/null 2>&1; echo exec_rc=$?) & \
                 sleep 2; kill -9 $p; wait; sleep 2; \
                 echo listed=$({c} sandbox ls | grep -c \"$i\"); echo live=$({c} sandbox ls --json | wc -l); \
                 grep -c \"sandbox.lost.*$i\" {D}/audit.jsonl | sed 's/^/lost=/'; \
                 grep -c 'sandbox lost' {D}/daemon.log | sed 's/^/logged=/'; \
                 CLEAVE_TOKEN={t1} {c} exec --no-stdin {i1} -- true; echo other_rc=$?",
                t1 = tok(1),
                i1 = id(1)
            ),
        ),
        Scenario::new(
            "metrics",
            format!("{ctl} get /metrics | grep -E '^cleave_(fork_latency_seconds_count|sandboxes_live|pool_depth|api_requests_total|dns_)'"),
        ),
        Scenario::new(
            "audit",
            format!(
                "cat {D}/audit.jsonl; for t in $(cat {D}/tokens); do grep -c \"$t\" {D}/audit.jsonl {D}/daemon.log; done | \
                 awk -F: '{{s+=$NF}} END {{print \"token_hits=\" s}}'"
            ),
        ),
        // A storm of creates and execs; kill -9 in the middle of it; restart; count.
        Scenario::new(
            "kill-9",
            format!(
                "for w in 1 2 3; do (for k in 1 2 3 4 5 6; do \
                 out=$({c} sandbox create --ttl 60 --json 2>/dev/null); \
                 i=$(echo \"$out\" | sed -n 's/.*\"id\":\"\\([^\"]*\\)\".*/\\1/p'); \
                 t=$(echo \"$out\" | sed -n 's/.*\"token\":\"\\([^\"]*\\)\".*/\\1/p'); \
                 [ -n \"$i\" ] && CLEAVE_TOKEN=$t {c} exec --no-stdin $i -- sleep 30 >/dev/null 2>&1 & \
                 sleep 0.3; done; wait) & done; \
                 sleep 4; echo live_before=$({c} sandbox ls --json 2>/dev/null | wc -l); {ctl} kill9; wait; \
                 echo before_restart:; {ctl} leftovers; \
                 {ctl} start; echo after_restart:; {ctl} leftovers; \
                 echo live_after=$({c} sandbox ls --json | wc -l); \
                 grep -o '\"killed\":[0-9]*' {D}/daemon.log | tail -1"
            ),
        ),
        Scenario::new(
            "sigterm",
            format!(
                "{c} sandbox create --count 2 --json >/dev/null; echo live=$({c} sandbox ls --json | wc -l); \
                 {ctl} stop; {ctl} leftovers; echo sock=$(ls {D}/cleave/cleave.sock 2>/dev/null | wc -l)"
            ),
        ),
        // The daemon as a privileged pod runs it (after the first one stopped: same
        // templates, free state directory).
        Scenario::new("container", format!("{ctl} container")),
        Scenario::new(
            "down",
            format!("{lab} down; echo netns=$(ip netns list | grep -c cl-); rm -rf {D}"),
        ),
    ];
    let (place, results) = run_batch(&scenarios, Duration::from_secs(600));
    eprintln!("ran in {place:?}");
    let get = |name: &str| results.iter().find(|r| r.name == name).unwrap();
    let mut f = Failures::default();

    let r = get("up");
    f.check(
        r,
        r.exit_code == 0 && r.output.contains("ready_after"),
        "the daemon becomes ready",
    );

    let r = get("create-two");
    let created = json_lines(r);
    f.check(r, r.value("rc") == Some("0"), "create --count 2 succeeds");
    f.check(
        r,
        created.len() == 2
            && created.iter().all(|j| {
                j["id"].as_str().is_some_and(|i| i.starts_with("sb-"))
                    && j["token"].as_str().is_some_and(|t| t.len() == 64)
            })
            && created[0]["id"] != created[1]["id"],
        "each sandbox has its own id and a 256-bit token",
    );

    let r = get("jail");
    f.check(
        r,
        r.value("jailed_workers")
            .is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n >= 4))
            && r.value("running_forks") == Some("2")
            && r.value("foreign_connects_refused") == Some("2")
            && r.value("jail_violations") == Some("0")
            && r.value("distinct_uids") == r.value("jailed_workers"),
        "every worker runs as its own uid, without capabilities, with no_new_privs, in its \
         own mount and network namespaces and cgroup leaf (memory and pids limits), in a \
         directory only it can enter; both running forks have every thread under seccomp; \
         neither another uid nor another worker's can connect to a fork's socket",
    );

    let r = get("own-tokens");
    let outs: Vec<&str> = r
        .output
        .lines()
        .filter_map(|l| l.strip_prefix("out-"))
        .collect();
    f.check(
        r,
        r.value("rc1") == Some("0") && r.value("rc2") == Some("0"),
        "exec runs with the sandbox's own token",
    );
    f.check(
        r,
        outs.len() == 2 && outs[0] != outs[1] && outs[0].len() == 32,
        "the two sandboxes' random bytes differ",
    );

    let r = get("cross-token");
    let denied = "the token does not grant access";
    f.check(
        r,
        r.value("cross_rc") == Some("1")
            && r.value("wrong_rc") == Some("1")
            && r.value("unknown_rc") == Some("1")
            && r.output.matches(denied).count() == 3,
        "A's token on B, a wrong token and an unknown sandbox get the same refusal",
    );
    f.check(
        r,
        r.value("missing_rc") == Some("1") && r.output.contains("CLEAVE_TOKEN"),
        "a missing token is refused with how to pass one",
    );
    f.check(
        r,
        r.value("badid_rc") == Some("1") && r.output.contains("is not a sandbox id"),
        "a malformed id is refused as such",
    );

    let r = get("stdin-and-exit");
    f.check(
        r,
        r.output.contains("piped-input")
            && r.output.contains("to-stderr")
            && r.value("rc") == Some("7"),
        "stdin, stdout, stderr and the exit code stream through",
    );
    f.check(
        r,
        r.value("sig_rc") == Some("143"),
        "a signal death is 128+N",
    );

    let r = get("exec-limit");
    f.check(
        r,
        r.value("active") == Some("4")
            && r.value("fifth_rc") == Some("1")
            && r.output.contains("runs 4 execs already"),
        "a fifth concurrent exec in one sandbox is refused, naming the limit",
    );

    let r = get("files");
    f.check(
        r,
        r.value("up_rc") == Some("0")
            && r.value("down_rc") == Some("0")
            && r.value("same") == Some("yes"),
        "a file round trips through the sandbox",
    );
    f.check(
        r,
        r.value("sibling_sees") == Some("1"),
        "a sandbox's file is not in its sibling",
    );
    f.check(
        r,
        r.value("cross_cp_rc") == Some("1") && r.value("missing_rc") == Some("1"),
        "cp with another sandbox's token, or of a missing file, fails",
    );

    let r = get("limits");
    f.check(
        r,
        r.value("over_rc") == Some("1") && r.output.contains("limit reached"),
        "a create beyond max_sandboxes is refused, naming the limit",
    );
    f.check(
        r,
        r.value("ttl_rc") == Some("1") && r.output.contains("longer than this node allows"),
        "a TTL beyond the maximum is refused",
    );
    f.check(
        r,
        r.value("template_rc") == Some("1") && r.output.contains("no template nosuch"),
        "an unknown template is refused",
    );
    f.check(
        r,
        r.value("policy_rc") == Some("1") && r.output.contains("network policy"),
        "a bad policy is refused",
    );
    f.check(r, r.value("count_rc") != Some("0"), "count 0 is refused");
    f.check(
        r,
        r.value("live") == Some("2"),
        "no refused request created anything",
    );

    let r = get("network");
    f.check(
        r,
        r.value("rc") == Some("0") && r.output.contains("hello from allowed.test"),
        "a sandbox created with a policy reaches its allowed name",
    );
    f.check(
        r,
        !r.output.contains("hello from other.test")
            && r.value("other_rc").is_some_and(|c| c != "0"),
        "and nothing else",
    );
    f.check(r, r.value("rm_rc") == Some("0"), "and is removed");

    let r = get("ttl");
    f.check(
        r,
        r.output.lines().any(|l| l.trim() == "0") && r.value("expired") == Some("1"),
        "a sandbox is destroyed when its TTL runs out, and the audit log says so",
    );

    let r = get("metrics");
    let count = r
        .value("cleave_fork_latency_seconds_count")
        .or_else(|| {
            r.output
                .lines()
                .find_map(|l| l.strip_prefix("cleave_fork_latency_seconds_count "))
        })
        .and_then(|v| v.trim().parse::<u64>().ok());
    f.check(
        r,
        count.is_some_and(|n| n >= 4) && r.output.contains("cleave_sandboxes_live 2"),
        "/metrics shows the fork histogram and the live sandboxes",
    );
    f.check(
        r,
        r.output
            .contains("cleave_pool_depth{pool=\"workers/default\"}")
            && r.output.contains("cleave_dns_queries_total"),
        "/metrics shows pool depths and DNS decisions",
    );

    let r = get("audit");
    let lines = json_lines(r);
    for action in [
        "sandbox.create",
        "exec",
        "file.write",
        "sandbox.delete",
        "sandbox.expire",
    ] {
        f.check(
            r,
            lines.iter().any(|j| j["action"] == action),
            &format!("the audit log has {action}"),
        );
    }
    f.check(
        r,
        lines
            .iter()
            .all(|j| j["time"].is_string() && j["caller"].is_string() && j["result"].is_string()),
        "every audit line has time, caller and result",
    );
    f.check(
        r,
        r.value("token_hits") == Some("0"),
        "no token appears in the audit log or the node log",
    );

    let r = get("lost");
    f.check(
        r,
        r.value("pid_found") == Some("1")
            && r.value("exec_rc").is_some_and(|c| c != "0")
            && r.value("listed") == Some("0")
            && r.value("live") == Some("2")
            && r.value("lost") == Some("1")
            && r.value("logged").is_some_and(|n| n != "0")
            && r.value("other_rc") == Some("0"),
        "a worker killed mid-exec ends that exec and only its sandbox, which is audited as \
         lost and logged; the other sandboxes go on",
    );

    let r = get("kill-9");
    f.check(
        r,
        r.value("live_before").is_some_and(|n| n != "0"),
        "the storm had sandboxes alive when the daemon was killed",
    );
    for key in [
        "orphan_workers",
        "dead_runtime_dirs",
        "taps",
        "chains",
        "sets",
    ] {
        f.check(
            r,
            after(r, "after_restart:", key) == Some("0"),
            &format!("after restart: {key}=0"),
        );
    }
    let count = |key| after(r, "after_restart:", key).and_then(|v| v.parse::<u32>().ok());
    f.check(
        r,
        count("zygotes") == Some(1)
            && count("journal") == count("workers").map(|w| w + 1)
            && count("runtime_dirs") == count("workers")
            && count("cgroups") == count("workers"),
        "after restart: only the new daemon's warm workers and its template's zygote, all \
         journaled, the workers with their directories and cgroups",
    );
    f.check(
        r,
        after(r, "after_restart:", "sockets") == Some("1"),
        "after restart: only the API socket",
    );
    f.check(
        r,
        r.value("live_after") == Some("0"),
        "no sandbox survives a restart",
    );

    let r = get("sigterm");
    f.check(
        r,
        r.value("live") == Some("2"),
        "two sandboxes before SIGTERM",
    );
    f.check(
        r,
        r.value("rc") == Some("1"),
        "SIGTERM stops the daemon cleanly",
    );
    for key in [
        "orphan_workers",
        "dead_runtime_dirs",
        "runtime_dirs",
        "journal",
        "cgroups",
        "taps",
        "chains",
        "sockets",
    ] {
        f.check(
            r,
            r.value(key) == Some("0"),
            &format!("after SIGTERM: {key}=0"),
        );
    }
    f.check(r, r.value("sock") == Some("0"), "the socket is removed");

    let r = get("container");
    f.check(
        r,
        r.value("daemon_cgroup") == Some("/pod/cleave-agent")
            && r.value("leaves").is_some_and(|n| n != "0")
            && r.value("leaves_after_stop") == Some("0"),
        "a daemon alone at the root of its cgroup namespace (a privileged pod) moves itself \
         into cleave-agent/, gives its workers leaves under cleave/, and removes them when \
         it stops",
    );

    let r = get("down");
    f.check(r, r.value("netns") == Some("0"), "the lab is gone");
    f.assert_none();
}
