//! The host–guest control channel on real guests under a real KVM (the rig on kvm_pvm
//! hosts): `cleave run` end to end (output, exit codes, signals, stdin, --json, cleanup)
//! and, through `cleave-probe`, what the CLI does not expose (64 MiB of output checked
//! by sha256 on both sides, 64 concurrent execs, a 16 MiB file round trip, a missing
//! file's error, a timeout killing the whole process group). One rig boot for all.

use std::path::PathBuf;
use std::time::Duration;

use cleave_tests::{cleave_bin, run_batch, sh_quote, Failures, Scenario};

fn probe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cleave-probe"))
}

#[test]
fn control_channel_end_to_end() {
    // `timeout`: a hang in one scenario fails that scenario, not the whole batch.
    let cleave = format!("timeout 300 {}", sh_quote(&cleave_bin().to_string_lossy()));
    let probe = format!("timeout 900 {}", sh_quote(&probe_bin().to_string_lossy()));
    let scenarios = vec![
        Scenario::new("echo", format!("{cleave} run -- echo hello from the guest")),
        Scenario::new(
            "exit-code",
            format!("{cleave} run -- sh -c 'echo hi; exit 7'"),
        ),
        Scenario::new("signal", format!("{cleave} run -- sh -c 'kill -KILL $$'")),
        Scenario::new(
            "stdin",
            format!("printf 'line one\\nline two\\n' | {cleave} run -- sh -c 'tac; echo done'"),
        ),
        Scenario::new(
            "stderr",
            format!("{cleave} run -- sh -c 'echo to-err >&2' 2>/tmp/err >/tmp/out; echo \"rc=$? out=[$(cat /tmp/out)] err=[$(cat /tmp/err)]\""),
        ),
        Scenario::new(
            "json",
            format!("{cleave} run --json -- sh -c 'echo out; echo err >&2; exit 3'"),
        ),
        Scenario::new("json-true", format!("{cleave} run --json -- true")),
        Scenario::new(
            "timeout",
            format!("{cleave} run --timeout 1 -- sh -c 'sleep 100 & sleep 100'"),
        ),
        Scenario::new("missing-program", format!("{cleave} run -- /no/such/program")),
        Scenario::new(
            "runtime-dir-removed",
            format!("{cleave} run -- true && ls -A /run/cleave | wc -l"),
        ),
        // SIGTERM to `cleave run` goes to the command in the guest; the VM still ends
        // cleanly and its directory is removed.
        Scenario::new(
            "forward-sigterm",
            format!(
                "{cleave} run -- sh -c 'trap \"echo got-term; exit 5\" TERM; echo ready; \
                 while true; do sleep 1; done' > /tmp/fwd 2>&1 & pid=$!; \
                 for i in $(seq 600); do grep -q ready /tmp/fwd && break; sleep 0.2; done; \
                 kill -TERM $pid; wait $pid; echo \"rc=$?\"; cat /tmp/fwd; ls -A /run/cleave | wc -l"
            ),
        ),
        Scenario::new("probe", format!("{probe} check")),
    ];
    let (place, results) = run_batch(&scenarios, Duration::from_secs(600));
    eprintln!("ran {} scenarios on the {place:?}", results.len());
    let mut f = Failures::default();
    let by = |n: &str| results.iter().find(|r| r.name == n).unwrap();

    let r = by("echo");
    f.check(r, r.exit_code == 0, "exits 0");
    f.check(
        r,
        r.output.trim() == "hello from the guest",
        "prints the guest's output, nothing else",
    );

    let r = by("exit-code");
    f.check(r, r.exit_code == 7, "exits with the command's code");
    f.check(r, r.output.trim() == "hi", "prints hi");

    let r = by("signal");
    f.check(r, r.exit_code == 128 + 9, "128+N for signal N");

    let r = by("stdin");
    f.check(r, r.exit_code == 0, "exits 0");
    f.check(
        r,
        r.output.trim() == "line two\nline one\ndone",
        "stdin reaches the command and ends",
    );

    let r = by("stderr");
    f.check(
        r,
        r.output.trim() == "rc=0 out=[] err=[to-err]",
        "stderr goes to stderr, stdout to stdout",
    );

    let r = by("json");
    f.check(r, r.exit_code == 3, "exit code is still the command's");
    match serde_json::from_str::<serde_json::Value>(r.output.trim()) {
        Ok(v) => {
            f.check(r, v["exit_code"] == 3, "exit_code");
            f.check(r, v["signal"].is_null(), "signal is null");
            f.check(r, v["stdout"] == "out\n", "stdout");
            f.check(r, v["stderr"] == "err\n", "stderr");
            f.check(r, v["id"].is_string(), "id");
            f.check(r, v["ms"].as_f64().is_some_and(|ms| ms > 0.0), "ms");
        }
        Err(e) => f.check(r, false, &format!("prints one JSON object ({e})")),
    }
    let r = by("json-true");
    f.check(r, r.exit_code == 0, "exits 0");
    f.check(
        r,
        r.output.trim().lines().count() == 1
            && serde_json::from_str::<serde_json::Value>(r.output.trim())
                .is_ok_and(|v| v["exit_code"] == 0),
        "one JSON object with exit_code 0",
    );

    let r = by("timeout");
    f.check(r, r.exit_code == 128 + 9, "killed with SIGKILL");
    f.check(r, r.output.contains("timeout"), "says it timed out");

    let r = by("missing-program");
    f.check(r, r.exit_code != 0, "fails");
    f.check(
        r,
        r.output.contains("/no/such/program"),
        "names the program",
    );

    let r = by("runtime-dir-removed");
    f.check(
        r,
        r.output.trim() == "0",
        "the VM's private directory is gone",
    );

    let r = by("forward-sigterm");
    f.check(
        r,
        r.output.contains("rc=5"),
        "the command's trap decided the exit code",
    );
    f.check(r, r.output.contains("got-term"), "the command got SIGTERM");
    f.check(
        r,
        r.output.trim_end().ends_with('0'),
        "the VM's private directory is gone",
    );

    let r = by("probe");
    f.check(r, r.exit_code == 0, "every probe check passes");
    for check in [
        "output-64mib",
        "concurrent-64",
        "stdin-roundtrip",
        "file-16mib",
        "missing-file",
        "timeout-kills-group",
        "signal",
        "bad-exec",
    ] {
        f.check(
            r,
            r.output.contains(&format!("probe {check}: ok")),
            &format!("probe check {check}"),
        );
    }
    f.check(
        r,
        r.output.contains("NotFound") && r.output.contains("/no/such/file"),
        "a missing file's error names the path and says not found",
    );

    for r in &results {
        f.check(r, !r.output.contains("panicked"), "no panic");
    }
    f.assert_none();
}
