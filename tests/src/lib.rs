//! The KVM integration rig's test harness.
//!
//! Booting a Linux guest needs a real KVM. Where this host has one (hardware KVM), the
//! scenarios run directly; elsewhere (kvm_pvm development hosts) they run inside the rig,
//! a software-emulated machine whose kernel loads `kvm_amd`. A rig boot costs seconds, so
//! every scenario of a suite goes into one shell script run by one rig boot; markers in
//! the output split it back into per-scenario results.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cleave_agent::host::kvm::KvmFlavour;
use cleave_agent::rig::{self, RigCommand};

/// One scenario: a name and a shell fragment run with `sh -c`.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub script: String,
}

impl Scenario {
    pub fn new(name: &str, script: impl Into<String>) -> Self {
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "scenario names are [A-Za-z0-9-]: {name}"
        );
        Self {
            name: name.to_owned(),
            script: script.into(),
        }
    }
}

/// What a scenario did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub name: String,
    pub exit_code: i32,
    /// stdout and stderr, interleaved.
    pub output: String,
    /// How long it ran by the running machine's clock (`/proc/uptime`), when known: a
    /// scenario that failed after a long wait says so.
    pub secs: Option<f64>,
}

impl Outcome {
    /// The value of the last `key=value` line (scenarios print `key=$?` and the like).
    pub fn value(&self, key: &str) -> Option<&str> {
        self.output
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::trim)
    }
}

/// Where the batch ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Host,
    Rig,
}

/// The `cleave` binary built beside the test executable (`target/<profile>/cleave`).
pub fn cleave_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let bin = profile_dir.join("cleave");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build --workspace`, or `make test`)",
        bin.display()
    );
    bin
}

/// Single-quotes `s` for sh.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

const BEGIN: &str = "@@scenario-begin:";
const END: &str = "@@scenario-end:";

/// A scenario still running after this long gets one dump of what every process waits
/// on (see [`watchdog`]).
const STALL_SECS: u32 = 150;

/// Lines the watchdog prints start with this; they are kept out of scenario outputs.
const STALL: &str = "@@stall ";

/// A background loop for the batch script: when the scenario named in `$__wd/cur` has
/// run [`STALL_SECS`], it prints once (each line prefixed [`STALL`]) every process with
/// its state and wait channel, the kernel stack and system call of each cleave task, and
/// the kernel log's tail, then a line a minute while the scenario goes on. A rig attempt
/// that times out so leaves a record of where it hung; silence means the machine itself
/// stopped.
fn watchdog() -> String {
    format!(
        r#"__wd=$(mktemp -d /tmp/cleave-watchdog.XXXXXX)
(
  __last=0
  while [ -d "$__wd" ]; do
    sleep 5
    read __name __t0 < "$__wd/cur" 2>/dev/null || continue
    read __now __ </proc/uptime
    __el=$(( ${{__now%.*}} - ${{__t0%.*}} ))
    [ "$__el" -ge {STALL_SECS} ] || continue
    if [ ! -e "$__wd/dumped-$__name" ]; then
      : > "$__wd/dumped-$__name"
      __last=$__el
      {{
        echo "scenario $__name still running after $__el s; processes:"
        ps --ppid 2 -p 2 -N -o pid,ppid,stat,etimes,wchan:32,args | cut -c1-200
        for __p in /proc/[0-9]*; do
          case "$(cat $__p/comm 2>/dev/null)" in cleave*) ;; *) continue ;; esac
          for __t in $__p/task/[0-9]*; do
            echo "== $__t $(cat $__t/comm) wchan=$(cat $__t/wchan) syscall=$(cut -d' ' -f1 $__t/syscall)"
            cat $__t/stack
          done
        done
        echo "kernel log tail:"
        dmesg | tail -n 30
      }} 2>&1 | sed 's/^/{STALL}/'
    elif [ $(( __el - __last )) -ge 60 ]; then
      __last=$__el
      echo "{STALL}scenario $__name still running after $__el s"
    fi
  done
) &
__wdpid=$!
"#
    )
}

fn batch_script(scenarios: &[Scenario]) -> String {
    let mut s = String::from("exec 2>&1\n");
    s.push_str(&watchdog());
    for sc in scenarios {
        let _ = writeln!(
            s,
            "read __t0 __ </proc/uptime\necho '{name}' \"$__t0\" > \"$__wd/cur\"\n\
             echo '{BEGIN}{name}@@'\n( {body}\n) </dev/null 2>&1\n\
             __rc=$?; rm -f \"$__wd/cur\"; read __t1 __ </proc/uptime\n\
             echo \"\n{END}{name}:$__rc:$__t0:$__t1@@\"",
            name = sc.name,
            body = sc.script
        );
    }
    // The loop's `sleep` would otherwise hold the output open for up to 5 s more.
    s.push_str("rm -rf \"$__wd\"; pkill -P $__wdpid 2>/dev/null; kill $__wdpid 2>/dev/null\n");
    s
}

/// The watchdog's lines in `output`, without their prefix.
fn stall_lines(output: &str) -> impl Iterator<Item = &str> {
    output.lines().filter_map(|l| l.strip_prefix(STALL))
}

/// Prints what the watchdog saw (shown with a failing test's output).
fn report_stalls(output: &str) {
    for line in stall_lines(output) {
        eprintln!("watchdog: {line}");
    }
}

/// `text` without the watchdog's lines.
fn without_stall_lines(text: &str) -> String {
    text.split_inclusive('\n')
        .filter(|l| !l.starts_with(STALL))
        .collect()
}

fn parse(output: &str, scenarios: &[Scenario]) -> Vec<Outcome> {
    scenarios
        .iter()
        .map(|sc| {
            let begin = format!("{BEGIN}{}@@\n", sc.name);
            let end = format!("\n{END}{}:", sc.name);
            let Some(b) = output.find(&begin).map(|i| i + begin.len()) else {
                return Outcome {
                    name: sc.name.clone(),
                    exit_code: -1,
                    output: "(scenario never started)".into(),
                    secs: None,
                };
            };
            let Some(e) = output[b..].find(&end).map(|i| b + i) else {
                return Outcome {
                    name: sc.name.clone(),
                    exit_code: -1,
                    output: format!("(scenario never ended)\n{}", &output[b..]),
                    secs: None,
                };
            };
            // `RC:T0:T1` (uptimes in seconds).
            let fields: Vec<&str> = output[e + end.len()..]
                .split("@@")
                .next()
                .unwrap_or("")
                .split(':')
                .map(str::trim)
                .collect();
            let code = fields.first().and_then(|c| c.parse().ok()).unwrap_or(-1);
            let uptime = |i: usize| fields.get(i).and_then(|t| t.parse::<f64>().ok());
            let secs = uptime(1).zip(uptime(2)).map(|(t0, t1)| t1 - t0);
            Outcome {
                name: sc.name.clone(),
                exit_code: code,
                secs,
                // The end marker starts on a line of its own; the newline that ended the
                // scenario's last line is not part of its output.
                output: without_stall_lines(
                    output[b..e].strip_suffix('\n').unwrap_or(&output[b..e]),
                ),
            }
        })
        .collect()
}

/// Prints how long each scenario took (shown with a failing test's output), then
/// passes the outcomes on.
fn timed(outcomes: Vec<Outcome>) -> Vec<Outcome> {
    for o in &outcomes {
        match o.secs {
            Some(s) => eprintln!("scenario {}: exit {}, {s:.1} s", o.name, o.exit_code),
            None => eprintln!("scenario {}: exit {}", o.name, o.exit_code),
        }
    }
    outcomes
}

/// How many times a batch is tried when the rig itself fails (see [`run_batch`]).
const RIG_ATTEMPTS: usize = 2;

/// Runs every scenario in one go, on this host if it has hardware KVM, else in one rig
/// boot. Panics (failing the test) if the rig itself cannot run, with its output.
///
/// The rig is an emulated machine (QEMU's software SVM under a nested Debian kernel), and
/// that stack has been seen to crash its own kernel under heavy nested load (a kernel
/// oops in the rig, in KVM's vCPU thread, with no exit status reported). When the *rig*
/// fails like that, the batch is run once more from a fresh rig boot, and the first
/// attempt's output is printed and kept in `$TMPDIR/cleave-rig-failures/`; a scenario
/// that fails is never retried.
pub fn run_batch(scenarios: &[Scenario], timeout: Duration) -> (Place, Vec<Outcome>) {
    let script = batch_script(scenarios);
    let cwd = std::env::current_dir().expect("current dir");
    if KvmFlavour::detect().runs_linux() {
        let out = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .expect("running sh");
        let output = String::from_utf8_lossy(&out.stdout).into_owned();
        report_stalls(&output);
        return (Place::Host, timed(parse(&output, scenarios)));
    }
    let argv = ["sh", "-c", script.as_str()].map(OsString::from).to_vec();
    let mut cmd = RigCommand::new(argv, cwd);
    cmd.timeout = timeout;
    for attempt in 1..=RIG_ATTEMPTS {
        let mut buf = Vec::new();
        let result = rig::run(&cmd, &mut buf);
        let text = String::from_utf8_lossy(&buf).into_owned();
        match result {
            Ok(_) => {
                report_stalls(&text);
                return (Place::Rig, timed(parse(&text, scenarios)));
            }
            Err(e) if attempt < RIG_ATTEMPTS => {
                // cargo shows a passing test's stderr to no one: keep the output on disk.
                let kept = keep_rig_failure(&text);
                eprintln!(
                    "WARNING: the rig itself failed (attempt {attempt} of {RIG_ATTEMPTS}): {e}; \
                     running the batch again in a fresh rig (its output is also in {kept})\n\
                     --- rig output ---\n{text}\n--- end ---"
                )
            }
            Err(e) => {
                panic!("the rig failed {RIG_ATTEMPTS} times; last: {e}\n--- rig output ---\n{text}")
            }
        }
    }
    unreachable!("the loop returns or panics on its last attempt")
}

/// Writes a failed rig attempt's output to `$TMPDIR/cleave-rig-failures/` and says where
/// (or why not).
fn keep_rig_failure(text: &str) -> String {
    let dir = std::env::temp_dir().join("cleave-rig-failures");
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = dir.join(format!("{stamp}-{}.log", std::process::id()));
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, text)) {
        Ok(()) => path.display().to_string(),
        Err(e) => format!("nowhere: writing {}: {e}", path.display()),
    }
}

/// The JSON objects a scenario printed, one a line (`--json` output).
pub fn json_lines(r: &Outcome) -> Vec<serde_json::Value> {
    r.output
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Collects failures so one run reports every failing scenario, each with its output.
#[derive(Default)]
pub struct Failures(Vec<String>);

impl Failures {
    pub fn check(&mut self, outcome: &Outcome, ok: bool, what: &str) {
        if !ok {
            let took = outcome
                .secs
                .map(|s| format!(", after {s:.1} s"))
                .unwrap_or_default();
            self.0.push(format!(
                "scenario {} (exit {}{took}): {what}\n--- output ---\n{}\n--- end ---",
                outcome.name, outcome.exit_code, outcome.output
            ));
        }
    }

    pub fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "{} check(s) failed:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_output_splits_back_into_scenarios() {
        let sc = [
            Scenario::new("a", "echo one; exit 3"),
            Scenario::new("b-2", "echo two"),
        ];
        let out = Command::new("sh")
            .arg("-c")
            .arg(batch_script(&sc))
            .output()
            .unwrap();
        let r = parse(&String::from_utf8_lossy(&out.stdout), &sc);
        assert_eq!((r[0].exit_code, r[0].output.as_str()), (3, "one"));
        assert_eq!((r[1].exit_code, r[1].output.as_str()), (0, "two"));
        assert!(r.iter().all(|o| o.secs.is_some_and(|s| s >= 0.0)), "{r:?}");
    }

    #[test]
    fn the_watchdogs_lines_stay_out_of_scenario_outputs() {
        let sc = [Scenario::new(
            "a",
            "echo one; echo '@@stall seen'; echo two",
        )];
        let out = Command::new("sh")
            .arg("-c")
            .arg(batch_script(&sc))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let r = parse(&text, &sc);
        assert_eq!((r[0].exit_code, r[0].output.as_str()), (0, "one\ntwo"));
        assert_eq!(stall_lines(&text).collect::<Vec<_>>(), ["seen"]);
    }

    #[test]
    fn the_last_value_of_a_key_is_read() {
        let o = Outcome {
            name: "v".into(),
            exit_code: 0,
            output: "rc=1\nrc=0 \n  rc=7\nrcx=5\nnoise".into(),
            secs: None,
        };
        assert_eq!(o.value("rc"), Some("0"));
        assert_eq!(o.value("rcx"), Some("5"));
        // Only a line that starts with the key counts.
        assert_ne!(o.value("rc"), Some("7"));
        assert_eq!(o.value("missing"), None);
    }

    #[test]
    fn missing_scenarios_are_reported_not_hidden() {
        let sc = [Scenario::new("gone", "true")];
        assert_eq!(parse("noise", &sc)[0].exit_code, -1);
    }

    #[test]
    fn quoting_survives_the_shell() {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", sh_quote("it's $HOME")))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's $HOME");
    }
}
