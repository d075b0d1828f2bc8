//! `cleave run [--image NAME] [--mem --vcpus] [--json] -- CMD ARGS...`: boot an image, run one
//! command in the guest over vsock with this terminal's stdin/stdout/stderr, and exit
//! with its exit code (128+N when signal N ended it). With `--forks N` the command runs in
//! N forks of a template instead (`super::forks`).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::devices::virtio::net::NetBackend;
use clap::Args;
use cleave_guest::protocol::{
    BoundedOutput, Client, ClientError, ExecRequest, ExitReport, ExitStatus, OutputEvent,
    MAX_COLLECTED,
};
use nix::sys::signal::{SigSet, Signal};
use std::sync::atomic::{AtomicBool, Ordering};

use super::net_args::NetArgs;
use crate::fork::store::TemplateName;
use crate::image::rootfs::ExecDefaults;
use crate::image::store::ImageName;
use crate::net::SandboxNetwork;
use crate::node::boot::{resolve_image, BootKit, BASE_CMDLINE};
use crate::node::exec::{exec_request, parse_env, parse_user, ExecOptions};
use crate::vmm::agent_vm::AgentVm;
use cleave_guest::protocol::message::ExecUser;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Guest memory in MiB [default: 256]. With --forks: only when the template is created.
    #[arg(long, value_name = "MIB")]
    mem: Option<u64>,
    /// Number of vCPUs [default: 1]. With --forks: only when the template is created.
    #[arg(long, value_name = "N")]
    vcpus: Option<u64>,
    /// Print one JSON object {"id","exit_code","signal","stdout","stderr","ms"} instead of
    /// streaming the output (with --forks: one per fork, with "reseeded" and "fork_ms").
    #[arg(long)]
    json: bool,
    /// Run the command in N forks of a template (created first if it does not exist), each
    /// reseeded before anything runs in it.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    forks: Option<u32>,
    /// With --forks: the template to fork.
    #[arg(long, value_name = "NAME", default_value = TemplateName::DEFAULT, requires = "forks")]
    template: TemplateName,
    /// With --forks: destroy a fork whose reseed has not been confirmed within this many
    /// milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10_000, requires = "forks")]
    gate_timeout_ms: u64,
    /// Kill the command's whole process group after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Give up if the guest agent is not ready within this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    boot_timeout: u64,
    /// The image to boot (`cleave image ls`) [default: the built-in image]. With --forks:
    /// the template must have been made from it (or is created from it).
    #[arg(long, value_name = "NAME")]
    image: Option<ImageName>,
    #[command(flatten)]
    exec: ExecFlags,
    #[command(flatten)]
    net: NetArgs,
    /// The command and its arguments, run in the guest.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// How the command runs, over its image's defaults.
#[derive(Args, Debug, Clone, Default)]
pub struct ExecFlags {
    /// KEY=VALUE for the command's environment, over the image's (by key).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(OsString, OsString)>,
    /// Working directory in the guest [default: the image's, else /].
    #[arg(long, value_name = "DIR")]
    cwd: Option<PathBuf>,
    /// Run as this user [default: the image's, else root].
    #[arg(long, value_name = "UID:GID", value_parser = parse_user)]
    user: Option<ExecUser>,
}

impl ExecFlags {
    /// The guest request for `argv` under `defaults`.
    pub fn request(
        &self,
        defaults: &ExecDefaults,
        argv: &[OsString],
        timeout_ms: Option<u64>,
    ) -> ExecRequest {
        exec_request(
            defaults,
            argv.to_vec(),
            ExecOptions {
                env: self.env.clone(),
                cwd: self.cwd.clone(),
                user: self.user,
                stdin: false,
                timeout_ms,
            },
        )
    }
}

/// The exit code for a finished command: its own, or 128+N for signal N (as a shell does).
pub fn exit_code_of(report: &ExitReport) -> i32 {
    match report.status {
        ExitStatus::Code(c) => c,
        ExitStatus::Signal(n) => 128i32.saturating_add(n),
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    // Refused before anything starts, whichever path runs it.
    let policy = args.net.policy()?;
    // Before any thread exists, so every thread inherits the mask: these signals are
    // for the command in the guest(s), and the VMs and their networks must be torn down
    // rather than the process killed.
    let signals = block_forwarded_signals();
    if let Some(forks) = args.forks {
        return super::forks::run(super::forks::ForksRequest {
            forks,
            template: args.template,
            mem: args.mem,
            vcpus: args.vcpus,
            json: args.json,
            timeout_ms: args.timeout.map(|s| s.saturating_mul(1000)),
            gate_timeout: Duration::from_millis(args.gate_timeout_ms),
            boot_timeout: args.boot_timeout,
            image: args.image,
            exec: args.exec,
            command: args.command,
            net: args.net,
            policy,
            signals,
        });
    }
    // The image and this host's KVM are checked first: nothing is set up on the host's
    // network for a guest that cannot run here.
    let resolved = resolve_image(args.image.as_ref())?;
    let defaults = resolved.defaults;
    let BootKit {
        machine,
        image,
        kvm,
    } = BootKit::check(args.mem.unwrap_or(256), args.vcpus.unwrap_or(1), || {
        Ok(resolved.spec)
    })?;
    let node = args.net.node(&policy)?;
    let network = match &node {
        Some(node) => Some(
            SandboxNetwork::create(node, &format!("run-{}", std::process::id()), &policy)
                .context("creating the sandbox's network")?,
        ),
        None => None,
    };
    let backend = match &network {
        Some(n) => NetBackend::Tap(n.tap().try_clone().context("sharing the tap with the VM")?),
        None => NetBackend::Disconnected,
    };
    let vm = AgentVm::boot(
        &kvm,
        machine,
        &image,
        BASE_CMDLINE,
        Duration::from_secs(args.boot_timeout),
        backend,
    );
    let vm = vm.context("starting the guest")?;
    if let Some(net) = &network {
        if let Err(e) = vm
            .client()
            .configure_network(net.guest_config(), Duration::from_secs(args.boot_timeout))
        {
            vm.stop();
            return Err(e).context("giving the guest its network; the guest was stopped");
        }
    }
    tracing::info!(
        ms = vm.ready_after().as_secs_f64() * 1e3,
        "guest agent ready"
    );
    if let Some(sig) = next_signal(&signals, Duration::ZERO) {
        // Interrupted while booting: nothing ran; end cleanly.
        vm.stop();
        return Ok(super::exit_code(128 + sig));
    }

    let req = args.exec.request(
        &defaults,
        &args.command,
        args.timeout.map(|s| s.saturating_mul(1000)),
    );
    let stdin: Box<dyn Read + Send> = Box::new(std::io::stdin());
    let started = Instant::now();
    // --json holds the output until the end: bounded, the rest marked.
    let (mut out, mut err) = (
        BoundedOutput::new(MAX_COLLECTED),
        BoundedOutput::new(MAX_COLLECTED),
    );
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    let report = exec_forwarding_signals(vm.client(), req, stdin, &signals, |ev| {
        // A closed stdout (`| head`) must not stop the command's exit from arriving.
        let _ = match (args.json, ev) {
            (true, OutputEvent::Stdout(d)) => {
                out.push(d);
                Ok(())
            }
            (true, OutputEvent::Stderr(d)) => {
                err.push(d);
                Ok(())
            }
            (false, OutputEvent::Stdout(d)) => stdout.write_all(d).and_then(|_| stdout.flush()),
            (false, OutputEvent::Stderr(d)) => stderr.write_all(d),
            (_, OutputEvent::Exited(_)) => Ok(()),
        };
    });
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
            "stdout": String::from_utf8_lossy(&out.finish()),
            "stderr": String::from_utf8_lossy(&err.finish()),
            "ms": (ms * 1000.0).round() / 1000.0,
            "ip": network.as_ref().map(|n| n.addrs().guest4.to_string()),
        });
        println!("{obj}");
    }
    Ok(super::exit_code(exit_code_of(&report)))
}

/// Host signals that go to the command's process group in the guest.
const FORWARDED: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

pub(super) fn block_forwarded_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    if let Err(e) = set.thread_block() {
        tracing::warn!(error = %e, "cannot block SIGINT/SIGTERM; they will kill cleave outright");
    }
    set
}

/// A pending signal of `set`, waiting up to `timeout`.
pub(super) fn next_signal(set: &SigSet, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` is a valid, initialised signal set and `ts` a valid timespec; a null
    // siginfo pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

/// Runs `req` with `stdin` wired, handing every event to `on_event`, while a watcher
/// thread forwards SIGINT/SIGTERM/SIGHUP to the command's process group in the guest.
fn exec_forwarding_signals(
    client: &Client,
    mut req: ExecRequest,
    stdin: Box<dyn Read + Send>,
    signals: &SigSet,
    mut on_event: impl FnMut(&OutputEvent),
) -> Result<ExitReport, ClientError> {
    req.stdin = true;
    let mut handle = client.start_exec(req)?;
    let mut w = handle.stdin_writer();
    let mut src = stdin;
    // Not joined: a terminal stdin may block forever; the exit does not wait for it.
    std::thread::Builder::new()
        .name("cleave-run-stdin".into())
        .spawn(move || {
            if std::io::copy(&mut src, &mut w).is_ok() {
                let _ = w.close();
            }
        })?;
    let id = handle.id();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Acquire) {
                if let Some(sig) = next_signal(signals, Duration::from_millis(100)) {
                    if let Err(e) = client.signal(id, sig) {
                        tracing::warn!(error = %e, "forwarding signal {sig} to the command");
                    }
                }
            }
        });
        let result = loop {
            match handle.next_event() {
                Ok(OutputEvent::Exited(x)) => {
                    on_event(&OutputEvent::Exited(x));
                    break Ok(x);
                }
                Ok(ev) => on_event(&ev),
                Err(e) => break Err(e),
            }
        };
        done.store(true, Ordering::Release);
        result
    })
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
        // Never an overflow, whatever a status claims (the decoder bounds it too).
        assert_eq!(exit_code_of(&r(ExitStatus::Signal(i32::MAX))), i32::MAX);
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
        let u = T::try_parse_from([
            "run", "--image", "py", "--env", "A=b", "--user", "1000:100", "--cwd", "/srv", "id",
        ])
        .unwrap();
        assert_eq!(u.run.image.unwrap().as_str(), "py");
        assert_eq!(u.run.exec.env, [("A".into(), "b".into())]);
        assert_eq!(
            u.run.exec.user,
            Some(ExecUser {
                uid: 1000,
                gid: 100
            })
        );
        for bad in [["--user", "root"], ["--env", "NOEQ"], ["--image", "../x"]] {
            let e = T::try_parse_from(["run", bad[0], bad[1], "id"]).unwrap_err();
            assert!(e.to_string().contains(bad[1]), "{e}");
        }
        assert_eq!(t.run.mem, Some(128));
        assert_eq!(t.run.command, ["sh", "-c", "exit 7"]);
        assert!(T::try_parse_from(["run"]).is_err(), "CMD is required");
        // A mistyped flag is refused, not run in the guest as the command.
        let e = T::try_parse_from(["run", "--forkz", "2", "--", "true"]).unwrap_err();
        assert!(e.to_string().contains("--forkz"), "{e}");
        // Once the command starts, its own flags are its own; after `--` anything goes.
        let v = T::try_parse_from(["run", "uname", "-a"]).unwrap();
        assert_eq!(v.run.command, ["uname", "-a"]);
        let w = T::try_parse_from(["run", "--", "--version"]).unwrap();
        assert_eq!(w.run.command, ["--version"]);
    }
}
