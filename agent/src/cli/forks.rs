//! `cleave run --forks N [--json] -- CMD`: fork N sandboxes from a template (creating the
//! default one when it does not exist), run CMD in each, and print each one's result.
//!
//! The node library does the work (`crate::node`): the template is ensured first (which
//! proves this host's KVM runs the guest), then the node opens networking and forks every
//! sandbox, each in its own worker process and reseeded; here the command runs in each
//! and every sandbox is destroyed.

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use cleave_guest::protocol::{
    BoundedOutput, Client, ClientError, ExecRequest, ExitStatus, OutputEvent, MAX_COLLECTED,
};
use nix::sys::signal::SigSet;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use super::net_args::NetArgs;
use super::run::next_signal;
use super::run::ExecFlags;
use crate::fork::sandbox::worker_exe;
use crate::fork::store::{TemplateName, TemplateStore};
use crate::image::store::ImageName;
use crate::net::EgressPolicy;
use crate::node::boot::resolve_image;
use crate::node::templates::{self, TemplateSpec, TemplateWorkers};
use crate::node::{ForkOutcome, Node, NodeLimits, NodeOptions, SandboxRequest, WorkerStart};

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
    /// The image the template is (or is created) from; `None`: whatever it was made from.
    pub image: Option<ImageName>,
    /// How the command runs, over the template's image defaults.
    pub exec: ExecFlags,
    pub command: Vec<OsString>,
    pub net: NetArgs,
    pub policy: EgressPolicy,
    /// SIGINT/SIGTERM/SIGHUP, blocked: forwarded to every fork's command.
    pub signals: SigSet,
}

type Output = Result<(ExitStatus, Vec<u8>, Vec<u8>), anyhow::Error>;

pub fn run(req: ForksRequest) -> anyhow::Result<ExitCode> {
    let store = TemplateStore::default_location();
    let spec = TemplateSpec {
        mem_mib: req.mem.unwrap_or(256),
        vcpus: req.vcpus.unwrap_or(1),
        boot_timeout: Duration::from_secs(req.boot_timeout),
        image: req.image.clone(),
        ..TemplateSpec::new(req.template.clone())
    };
    if !store.exists(&spec.name) {
        eprintln!("cleave: no template {}; creating it", spec.name);
    }
    let exe = worker_exe()?;
    let jail = crate::fork::jail::Jail::best_effort();
    let (template, meta, _) = templates::ensure(
        &store,
        &spec,
        (req.mem.is_some(), req.vcpus.is_some()),
        resolve_image,
        TemplateWorkers {
            exe: &exe,
            jail: jail.as_ref(),
        },
    )?;
    let defaults = meta.defaults.clone();
    // After the template exists (and so after this host's KVM proved it runs guests):
    // nothing is set up on the host's network for forks that cannot run.
    let node = Node::open(NodeOptions {
        store,
        net: req.net.options(&req.policy)?,
        limits: NodeLimits::unlimited(),
        gate_timeout: req.gate_timeout,
        warm_workers: 0,
        state_dir: None,
        worker_exe: Some(exe),
        jail,
        worker_start: WorkerStart::default(),
    })?;
    node.load_template(template, meta)?;
    let outcomes = node.create_sandboxes(&SandboxRequest {
        template: req.template.clone(),
        count: req.forks,
        ttl: None,
        policy: Some(req.policy.clone()),
        all_or_nothing: false,
    })?;
    let stop = AtomicI32::new(0);
    let finished = AtomicBool::new(false);
    let outputs: Vec<Option<Output>> = std::thread::scope(|s| {
        // One watcher takes the signals; each fork passes them on to its own command, so
        // every fork ends and is torn down (VM, tap, chains, proxy) before we exit.
        s.spawn(|| {
            while !finished.load(Ordering::Acquire) {
                if let Some(sig) = next_signal(&req.signals, Duration::from_millis(100)) {
                    stop.store(sig, Ordering::Release);
                }
            }
        });
        let handles: Vec<_> = outcomes
            .iter()
            .map(|o| {
                s.spawn(|| {
                    let created = o.as_ref().ok()?;
                    let exec = req.exec.request(&defaults, &req.command, req.timeout_ms);
                    let out = exec_passing_signals(&created.sandbox.client(), exec, &stop)
                        .context("running the command in the fork");
                    // Torn down as soon as its command ends.
                    let _ = node.destroy(&created.sandbox.id);
                    Some(out)
                })
            })
            .collect();
        let outputs = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Some(Err(anyhow::anyhow!("the fork's thread panicked"))))
            })
            .collect();
        finished.store(true, Ordering::Release);
        outputs
    });
    node.shutdown();
    match stop.load(Ordering::Acquire) {
        0 => report(&req, &outcomes, outputs),
        sig => {
            report(&req, &outcomes, outputs)?;
            eprintln!("cleave: stopped by signal {sig}; every fork was torn down");
            Ok(super::exit_code(128 + sig))
        }
    }
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
        // Each fork's output is held until all are done: bounded, the rest marked.
        let (mut out, mut err) = (
            BoundedOutput::new(MAX_COLLECTED),
            BoundedOutput::new(MAX_COLLECTED),
        );
        let result = loop {
            match handle.next_event() {
                Ok(OutputEvent::Stdout(d)) => out.push(&d),
                Ok(OutputEvent::Stderr(d)) => err.push(&d),
                Ok(OutputEvent::Exited(x)) => break Ok((x.status, out.finish(), err.finish())),
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

fn report(
    req: &ForksRequest,
    outcomes: &[ForkOutcome],
    outputs: Vec<Option<Output>>,
) -> anyhow::Result<ExitCode> {
    let mut code = 0;
    let (mut stdout, mut stderr) = (std::io::stdout().lock(), std::io::stderr().lock());
    let n = outcomes.len();
    for (i, (o, out)) in outcomes.iter().zip(outputs).enumerate() {
        let result: Output = match (o, out) {
            (Ok(_), Some(r)) => r,
            (Err(f), _) => Err(anyhow::anyhow!("{}", f.message)),
            (Ok(_), None) => Err(anyhow::anyhow!("the fork was not run")),
        };
        let created = o.as_ref().ok();
        let id = created.map_or("-".to_string(), |c| c.sandbox.id.to_string());
        let (exit_code, signal) = match &result {
            Ok((ExitStatus::Code(c), _, _)) => (Some(*c), None),
            Ok((ExitStatus::Signal(n), _, _)) => (None, Some(*n)),
            Err(_) => (None, None),
        };
        let this = match (&result, exit_code, signal) {
            (Err(_), _, _) => 1,
            (_, Some(c), _) => c,
            (_, _, Some(n)) => 128i32.saturating_add(n),
            _ => 1,
        };
        if code == 0 {
            code = this;
        }
        let ms = |d: Duration| round3(d.as_secs_f64() * 1e3);
        if req.json {
            let (out, err) = match &result {
                Ok((_, out, err)) => (
                    String::from_utf8_lossy(out).into_owned(),
                    String::from_utf8_lossy(err).into_owned(),
                ),
                Err(_) => (String::new(), String::new()),
            };
            let obj = serde_json::json!({
                "id": id,
                "fork": i + 1,
                "exit_code": exit_code,
                "signal": signal,
                "stdout": out,
                "stderr": err,
                "reseeded": created.is_some_and(|c| c.sandbox.reseeded),
                "fork_ms": created.map(|c| ms(c.sandbox.fork_time)),
                "error": result.as_ref().err().map(|e| format!("{e:#}")),
                "gate_failure": o.as_ref().err().and_then(|f| f.gate_reason),
                "ip": created.and_then(|c| c.sandbox.ip).map(|ip| ip.to_string()),
                "net_ms": created.and_then(|c| c.sandbox.net_time).map(ms),
                "identity_ms": created.and_then(|c| c.sandbox.identity_time).map(ms),
            });
            writeln!(stdout, "{obj}")?;
            continue;
        }
        match &result {
            Ok((status, out, err)) => {
                writeln!(
                    stdout,
                    "--- fork {}/{n} {id}: reseeded, ready in {:.2} ms, {} ---",
                    i + 1,
                    created.map_or(0.0, |c| c.sandbox.fork_time.as_secs_f64() * 1e3),
                    match status {
                        ExitStatus::Code(c) => format!("exit {c}"),
                        ExitStatus::Signal(n) => format!("signal {n}"),
                    }
                )?;
                stdout.write_all(out)?;
                stderr.write_all(err)?;
            }
            Err(e) => {
                writeln!(stdout, "--- fork {}/{n} {id}: failed ---", i + 1)?;
                writeln!(stderr, "cleave: fork {}: {e:#}", i + 1)?;
            }
        }
    }
    Ok(super::exit_code(code))
}
