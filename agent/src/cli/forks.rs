//! `cleave run --forks N [--json] -- CMD`: fork N sandboxes from a template (creating the
//! default one when it does not exist), run CMD in each, and print each one's result.
//!
//! Each fork runs in its own worker process. Workers are started and handed the template
//! first (the part of a fork that needs no request); then every fork is resumed, gated
//! and used on a thread of its own, and destroyed as soon as its command ends.

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use cleave_guest::protocol::{Client, ClientError, ExecRequest, ExitStatus, OutputEvent};
use nix::sys::signal::SigSet;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use super::boot::default_image;
use super::net_args::NetArgs;
use super::run::next_signal;
use super::template::{create, CreateArgs};
use crate::fork::sandbox::{worker_exe, ForkError, Prepared, Sandbox};
use crate::fork::store::{TemplateName, TemplateStore};
use crate::fork::worker::Encoded;
use crate::net::{EgressPolicy, NetNode, SandboxNetwork};

/// What `run --forks` needs.
pub struct ForksRequest {
    pub forks: u32,
    pub template: TemplateName,
    /// Used only when the template is created here.
    pub mem: Option<u64>,
    pub vcpus: Option<u64>,
    pub json: bool,
    pub timeout_ms: Option<u64>,
    pub gate_timeout: Duration,
    pub boot_timeout: u64,
    pub command: Vec<OsString>,
    pub net: NetArgs,
    pub policy: EgressPolicy,
    /// SIGINT/SIGTERM/SIGHUP, blocked: forwarded to every fork's command.
    pub signals: SigSet,
}

/// One fork's outcome.
struct Outcome {
    id: String,
    fork_ms: Option<f64>,
    reseeded: bool,
    result: Result<(ExitStatus, Vec<u8>, Vec<u8>), anyhow::Error>,
    /// Why the gate refused the fork, when it did.
    gate_reason: Option<&'static str>,
    /// The guest's address, when it had a network.
    ip: Option<std::net::Ipv4Addr>,
    /// Building its network (slot, tap, chains, DNS listener), before the fork resumed.
    net_ms: Option<f64>,
    /// Of `fork_ms`: the guest applying its network identity after the gate.
    identity_ms: Option<f64>,
}

pub fn run(req: ForksRequest) -> anyhow::Result<ExitCode> {
    let store = TemplateStore::default_location();
    let template = if store.exists(&req.template) {
        let (t, meta) = store.load(&req.template)?;
        for (flag, asked, has) in [
            ("--mem", req.mem, meta.mem_mib),
            ("--vcpus", req.vcpus, u64::from(meta.vcpus)),
        ] {
            if asked.is_some_and(|a| a != has) {
                anyhow::bail!(
                    "template {} has {flag} {has}; {flag} applies only when a template is \
                     created: leave it out, or remove the template (`cleave template rm {}`)",
                    req.template,
                    req.template
                );
            }
        }
        t
    } else {
        eprintln!("cleave: no template {}; creating it", req.template);
        let args = CreateArgs {
            name: req.template.clone(),
            mem: req.mem.unwrap_or(256),
            vcpus: req.vcpus.unwrap_or(1),
            boot_timeout: req.boot_timeout,
            test_reseed: None,
            warmup: Vec::new(),
        };
        create(&store, &args, default_image)?.0
    };
    // After the template exists (and so after this host's KVM proved it runs guests):
    // nothing is set up on the host's network for forks that cannot run.
    let node = req.net.node(&req.policy)?;
    let encoded = Encoded::new(&template)?;
    let exe = worker_exe()?;
    let prepared: Vec<_> = (0..req.forks)
        .map(|_| Prepared::new(&exe, &encoded))
        .collect();
    let stop = AtomicI32::new(0);
    let finished = AtomicBool::new(false);
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        // One watcher takes the signals; each fork passes them on to its own command, so
        // every fork ends and is torn down (VM, tap, chains, proxy) before we exit.
        s.spawn(|| {
            while !finished.load(Ordering::Acquire) {
                if let Some(sig) = next_signal(&req.signals, Duration::from_millis(100)) {
                    stop.store(sig, Ordering::Release);
                }
            }
        });
        let handles: Vec<_> = prepared
            .into_iter()
            .map(|p| s.spawn(|| one_fork(p, &req, node.as_ref(), &stop)))
            .collect();
        let outcomes = handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| Outcome {
                    id: "?".into(),
                    fork_ms: None,
                    reseeded: false,
                    result: Err(anyhow::anyhow!("the fork's thread panicked")),
                    gate_reason: None,
                    ip: None,
                    net_ms: None,
                    identity_ms: None,
                })
            })
            .collect();
        finished.store(true, Ordering::Release);
        outcomes
    });
    match stop.load(Ordering::Acquire) {
        0 => report(&req, &outcomes),
        sig => {
            report(&req, &outcomes)?;
            eprintln!("cleave: stopped by signal {sig}; every fork was torn down");
            Ok(super::exit_code(128 + sig))
        }
    }
}

fn one_fork(
    prepared: Result<Prepared, crate::fork::worker::WorkerError>,
    req: &ForksRequest,
    node: Option<&NetNode>,
    stop: &AtomicI32,
) -> Outcome {
    let failed = |id: String, e: anyhow::Error, gate_reason| Outcome {
        id,
        fork_ms: None,
        reseeded: false,
        result: Err(e),
        gate_reason,
        ip: None,
        net_ms: None,
        identity_ms: None,
    };
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => return failed("-".into(), anyhow::Error::new(e), None),
    };
    let id = format!("fork-{}", prepared.pid());
    let t = std::time::Instant::now();
    let network = match node {
        Some(node) => match SandboxNetwork::create(node, &id, &req.policy) {
            Ok(n) => Some(n),
            Err(e) => {
                return failed(
                    id,
                    anyhow::Error::new(e).context("creating the fork's network"),
                    None,
                )
            }
        },
        None => None,
    };
    let net_ms = network.as_ref().map(|_| t.elapsed().as_secs_f64() * 1e3);
    let sandbox = match Sandbox::start(prepared, req.gate_timeout, network) {
        Ok(s) => s,
        Err(e) => {
            let id = match &e {
                ForkError::Gate { pid, .. } => format!("fork-{pid}"),
                _ => "-".into(),
            };
            let reason = e.gate_reason();
            return failed(id, anyhow::Error::new(e), reason);
        }
    };
    let mut exec = ExecRequest::new(req.command.iter().cloned());
    exec.timeout_ms = req.timeout_ms;
    let result = exec_passing_signals(sandbox.client(), exec, stop)
        .context("running the command in the fork");
    let outcome = Outcome {
        id: sandbox.id(),
        fork_ms: Some(sandbox.fork_time().as_secs_f64() * 1e3),
        reseeded: sandbox.reseed_reply().reseeded,
        result,
        gate_reason: None,
        ip: sandbox.guest_ip(),
        net_ms,
        identity_ms: sandbox.identity_time().map(|d| d.as_secs_f64() * 1e3),
    };
    if let Err(e) = sandbox.destroy() {
        tracing::warn!(error = %e, "destroying a fork");
    }
    outcome
}

/// Runs `req` to its end, collecting its output, while a helper passes a host signal
/// (`stop`, once set) to the command's process group.
fn exec_passing_signals(
    client: &Client,
    req: ExecRequest,
    stop: &AtomicI32,
) -> Result<(ExitStatus, Vec<u8>, Vec<u8>), ClientError> {
    let mut handle = client.start_exec(req)?;
    let id = handle.id();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Acquire) {
                let sig = stop.load(Ordering::Acquire);
                if sig != 0 {
                    let _ = client.signal(id, sig);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let result = loop {
            match handle.next_event() {
                Ok(OutputEvent::Stdout(d)) => out.extend_from_slice(&d),
                Ok(OutputEvent::Stderr(d)) => err.extend_from_slice(&d),
                Ok(OutputEvent::Exited(x)) => break Ok((x.status, out, err)),
                Err(e) => break Err(e),
            }
        };
        done.store(true, Ordering::Release);
        result
    })
}

fn round3(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

fn report(req: &ForksRequest, outcomes: &[Outcome]) -> anyhow::Result<ExitCode> {
    let mut code = 0;
    let (mut stdout, mut stderr) = (std::io::stdout().lock(), std::io::stderr().lock());
    for (i, o) in outcomes.iter().enumerate() {
        let (exit_code, signal) = match &o.result {
            Ok((ExitStatus::Code(c), _, _)) => (Some(*c), None),
            Ok((ExitStatus::Signal(n), _, _)) => (None, Some(*n)),
            Err(_) => (None, None),
        };
        let this = match (&o.result, exit_code, signal) {
            (Err(_), _, _) => 1,
            (_, Some(c), _) => c,
            (_, _, Some(n)) => 128i32.saturating_add(n),
            _ => 1,
        };
        if code == 0 {
            code = this;
        }
        if req.json {
            let (out, err) = match &o.result {
                Ok((_, out, err)) => (
                    String::from_utf8_lossy(out).into_owned(),
                    String::from_utf8_lossy(err).into_owned(),
                ),
                Err(_) => (String::new(), String::new()),
            };
            let obj = serde_json::json!({
                "id": o.id,
                "fork": i + 1,
                "exit_code": exit_code,
                "signal": signal,
                "stdout": out,
                "stderr": err,
                "reseeded": o.reseeded,
                "fork_ms": o.fork_ms.map(round3),
                "error": o.result.as_ref().err().map(|e| format!("{e:#}")),
                "gate_failure": o.gate_reason,
                "ip": o.ip.map(|ip| ip.to_string()),
                "net_ms": o.net_ms.map(round3),
                "identity_ms": o.identity_ms.map(round3),
            });
            writeln!(stdout, "{obj}")?;
            continue;
        }
        match &o.result {
            Ok((status, out, err)) => {
                writeln!(
                    stdout,
                    "--- fork {}/{} {}: reseeded, ready in {:.2} ms, {} ---",
                    i + 1,
                    outcomes.len(),
                    o.id,
                    o.fork_ms.unwrap_or(0.0),
                    match status {
                        ExitStatus::Code(c) => format!("exit {c}"),
                        ExitStatus::Signal(n) => format!("signal {n}"),
                    }
                )?;
                stdout.write_all(out)?;
                stderr.write_all(err)?;
            }
            Err(e) => {
                writeln!(
                    stdout,
                    "--- fork {}/{} {}: failed ---",
                    i + 1,
                    outcomes.len(),
                    o.id
                )?;
                writeln!(stderr, "cleave: fork {}: {e:#}", i + 1)?;
            }
        }
    }
    Ok(super::exit_code(code))
}
