//! `cleave run [--mem --vcpus] [--json] -- CMD ARGS...`: boot the default image, run one
//! command in the guest over vsock with this terminal's stdin/stdout/stderr, and exit
//! with its exit code (128+N when signal N ended it).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use cleave_guest::protocol::{ExecRequest, ExitReport, ExitStatus, OutputEvent};

use super::boot::{default_image, prepare, Prepared, BASE_CMDLINE};
use crate::vmm::agent_vm::AgentVm;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u64,
    /// Print one JSON object {"id","exit_code","signal","stdout","stderr","ms"} instead of
    /// streaming the output.
    #[arg(long)]
    json: bool,
    /// Kill the command's whole process group after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Give up if the guest agent is not ready within this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    boot_timeout: u64,
    /// The command and its arguments, run in the guest.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<OsString>,
}

/// The exit code for a finished command: its own, or 128+N for signal N (as a shell does).
pub fn exit_code_of(report: &ExitReport) -> i32 {
    match report.status {
        ExitStatus::Code(c) => c,
        ExitStatus::Signal(n) => 128 + n,
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let Prepared {
        machine,
        image,
        kvm,
    } = prepare(args.mem, args.vcpus, default_image)?;
    let vm = AgentVm::boot(
        &kvm,
        machine,
        &image,
        BASE_CMDLINE,
        Duration::from_secs(args.boot_timeout),
    );
    let vm = vm.context("starting the guest")?;
    tracing::info!(
        ms = vm.ready_after().as_secs_f64() * 1e3,
        "guest agent ready"
    );

    let mut req = ExecRequest::new(args.command.iter().cloned());
    req.timeout_ms = args.timeout.map(|s| s.saturating_mul(1000));
    let stdin: Box<dyn Read + Send> = Box::new(std::io::stdin());
    let started = Instant::now();
    let (report, out, err) = if args.json {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let report = vm.client().exec(req, Some(stdin), |ev| match ev {
            OutputEvent::Stdout(d) => out.extend_from_slice(d),
            OutputEvent::Stderr(d) => err.extend_from_slice(d),
            OutputEvent::Exited(_) => {}
        });
        (report, out, err)
    } else {
        let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
        let report = vm.client().exec(req, Some(stdin), |ev| {
            // A closed stdout (`| head`) must not stop the command's exit from arriving.
            let _ = match ev {
                OutputEvent::Stdout(d) => stdout.write_all(d).and_then(|_| stdout.flush()),
                OutputEvent::Stderr(d) => stderr.write_all(d),
                OutputEvent::Exited(_) => Ok(()),
            };
        });
        (report, Vec::new(), Vec::new())
    };
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            let tail = vm.console_tail();
            vm.stop();
            tracing::info!(console = %tail, "guest console");
            return Err(e).context("running the command in the guest");
        }
    };
    let id = vm.id();
    vm.stop();

    if report.timed_out {
        eprintln!(
            "cleave: the command ran past its {} s timeout; its process group was killed",
            args.timeout.unwrap_or(0)
        );
    }
    if args.json {
        let (code, signal) = match report.status {
            ExitStatus::Code(c) => (Some(c), None),
            ExitStatus::Signal(n) => (None, Some(n)),
        };
        let obj = serde_json::json!({
            "id": id,
            "exit_code": code,
            "signal": signal,
            "stdout": String::from_utf8_lossy(&out),
            "stderr": String::from_utf8_lossy(&err),
            "ms": (ms * 1000.0).round() / 1000.0,
        });
        println!("{obj}");
    }
    Ok(super::exit_code(exit_code_of(&report)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_map_to_128_plus_n() {
        let r = |status| ExitReport {
            status,
            timed_out: false,
        };
        assert_eq!(exit_code_of(&r(ExitStatus::Code(7))), 7);
        assert_eq!(exit_code_of(&r(ExitStatus::Signal(9))), 137);
    }

    #[test]
    fn parses_the_command_after_the_separator() {
        use clap::Parser;
        #[derive(clap::Parser, Debug)]
        struct T {
            #[command(flatten)]
            run: RunArgs,
        }
        let t = T::try_parse_from(["run", "--json", "--mem", "128", "--", "sh", "-c", "exit 7"])
            .unwrap();
        assert!(t.run.json);
        assert_eq!(t.run.mem, 128);
        assert_eq!(t.run.command, ["sh", "-c", "exit 7"]);
        assert!(T::try_parse_from(["run"]).is_err(), "CMD is required");
    }
}
