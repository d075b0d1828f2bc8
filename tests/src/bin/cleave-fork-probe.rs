//! cleave-fork-probe: drives forks of a stored template through the agent library, for
//! what `cleave run --forks` does not show, and for the fork benchmarks. Runs wherever a
//! Linux-capable KVM is (the rig on kvm_pvm hosts).
//!
//! - `gate-closed TEMPLATE`: resumes a fork *without* the host's gate and tries to run a
//!   command before and after a reseed; passes only if the guest refused both (with a
//!   template whose reseed fails, no command can ever run in a fork, whatever the host
//!   does).
//! - `bench TEMPLATE FORKS COLD`: fork → ready (gate passed) over FORKS sequential forks
//!   beside cold boot → ready over COLD boots of the template's image; JSON.
//! - `idle TEMPLATE N...`: for each N, N idle forks at once: unique memory per fork
//!   (worker private memory, guest pages copied included) and creation rate; JSON.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use cleave_agent::devices::virtio::net::NetBackend;
use cleave_agent::devices::virtio::vsock::hybrid;
use cleave_agent::fork::gate;
use cleave_agent::fork::sandbox::{worker_exe, Sandbox, WarmWorker};
use cleave_agent::fork::store::{TemplateMeta, TemplateStore};
use cleave_agent::fork::worker::{Encoded, Worker};
use cleave_agent::host::kvm;
use cleave_agent::host::memory::{self, ProcessMemory};
use cleave_agent::node::boot::{resolve_image, BASE_CMDLINE};
use cleave_agent::vmm::agent_vm::AgentVm;
use cleave_agent::vmm::config::MachineConfig;
use cleave_agent::vmm::open_kvm;
use cleave_guest::boot::AGENT_VSOCK_PORT;
use cleave_guest::protocol::{Client, ClientError, ErrorCode, ExecRequest};

fn load(name: &str) -> anyhow::Result<(Encoded, TemplateMeta)> {
    let store = TemplateStore::default_location();
    let (t, meta) = store.load(&name.parse()?)?;
    Ok((Encoded::new(&t)?, meta))
}

fn refused(
    r: Result<(cleave_guest::protocol::ExitReport, Vec<u8>, Vec<u8>), ClientError>,
) -> anyhow::Result<()> {
    match r {
        Err(ClientError::Remote(e)) if e.code == ErrorCode::NotReady => Ok(()),
        other => bail!("expected NotReady, got {other:?}"),
    }
}

fn gate_closed(template: &str) -> anyhow::Result<()> {
    let (encoded, _) = load(template)?;
    let mut worker = Worker::spawn(&worker_exe()?)?;
    worker.load(&encoded)?;
    let ready = worker.go(None)?;
    let socket = ready.vsock.context("the fork has no vsock socket")?;
    let c = connect_past_reset(&socket)?;
    let marker = ExecRequest::new(["sh", "-c", "echo RAN"]);
    refused(c.exec_collect(marker.clone(), None)).context("exec before any reseed")?;
    match gate::reseed(&c, Duration::from_secs(30)) {
        Ok(_) => {
            bail!("the reseed passed; this check needs a template made with --test-reseed fail")
        }
        Err(e) => println!("gate-closed: reseed refused as expected: {e}"),
    }
    refused(c.exec_collect(marker, None)).context("exec after a failed reseed")?;
    drop(c);
    let status = worker.destroy()?;
    println!("gate-closed: ok (both execs refused; worker exited {status})");
    Ok(())
}

/// A connection to the fork's agent that answered `hello` (allowed before the gate). A
/// connection the guest accepted before it handled the fork's transport reset is dropped
/// by that reset; those are retried, as the host's gate does.
fn connect_past_reset(socket: &std::path::Path) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stream = hybrid::connect(socket, AGENT_VSOCK_PORT, deadline)?;
        let c = Client::new(stream)?;
        match c.hello(Duration::from_secs(10)) {
            Ok(_) => return Ok(c),
            Err(ClientError::Closed | ClientError::Io(_)) if Instant::now() < deadline => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn stats(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    serde_json::json!({
        "n": v.len(),
        "p50": percentile(&v, 0.5),
        "p99": percentile(&v, 0.99),
        "min": v[0],
        "max": v[v.len() - 1],
    })
}

fn bench(template: &str, forks: usize, cold: usize) -> anyhow::Result<()> {
    let (encoded, meta) = load(template)?;
    let exe = worker_exe()?;
    let gate_timeout = Duration::from_secs(30);
    // Fork → ready: the worker is started and handed the template beforehand (a pool's
    // job); the clock runs from the request (go) to the gate passing.
    let mut fork_ms = Vec::with_capacity(forks);
    let mut restore_ms = Vec::with_capacity(forks);
    let started = Instant::now();
    for i in 1..=forks {
        let p = WarmWorker::new(&exe, &encoded, None)?;
        let s = Sandbox::start(p, gate_timeout, None).with_context(|| format!("fork {i}"))?;
        fork_ms.push(s.fork_time().as_secs_f64() * 1e3);
        restore_ms.push(s.ready_report().finish_us as f64 / 1e3);
        s.destroy()?;
        if i % 25 == 0 {
            // Progress on stderr: in an emulated rig a stall is otherwise invisible.
            eprintln!(
                "bench: {i}/{forks} forks, {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    // Cold boot → ready of the same image and machine shape, in this process.
    kvm::require_linux_capable()?;
    // The template's own image (the built-in one, or one `cleave image build` made).
    let name = meta.image.as_deref().map(str::parse).transpose()?;
    let image = resolve_image(name.as_ref())?.spec.load_verified()?;
    let kvm = open_kvm()?;
    let machine = MachineConfig::new(meta.mem_mib, u64::from(meta.vcpus))?;
    let mut cold_ms = Vec::with_capacity(cold);
    for i in 1..=cold {
        eprintln!("bench: cold boot {i}/{cold}");
        let vm = AgentVm::boot(
            &kvm,
            machine,
            &image,
            BASE_CMDLINE,
            Duration::from_secs(120),
            NetBackend::Disconnected,
        )?;
        cold_ms.push(vm.ready_after().as_secs_f64() * 1e3);
        vm.stop();
    }
    let (f50, c50) = {
        let mut f = fork_ms.clone();
        let mut c = cold_ms.clone();
        f.sort_by(f64::total_cmp);
        c.sort_by(f64::total_cmp);
        (percentile(&f, 0.5), percentile(&c, 0.5))
    };
    println!(
        "{}",
        serde_json::json!({
            "template": template,
            "mem_mib": meta.mem_mib,
            "vcpus": meta.vcpus,
            "fork_to_ready_ms": stats(fork_ms),
            "worker_restore_and_start_ms": stats(restore_ms),
            "cold_boot_to_ready_ms": stats(cold_ms),
            "cold_over_fork_p50": c50 / f50,
        })
    );
    Ok(())
}

fn idle(template: &str, counts: &[usize]) -> anyhow::Result<()> {
    let (encoded, meta) = load(template)?;
    let exe = worker_exe()?;
    let mut rows = Vec::new();
    for &n in counts {
        let before = memory::available_kib()?;
        let t = Instant::now();
        let prepared = (0..n)
            .map(|_| WarmWorker::new(&exe, &encoded, None))
            .collect::<Result<Vec<_>, _>>()?;
        let prepare_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let forks = prepared
            .into_iter()
            .map(|p| Sandbox::start(p, Duration::from_secs(60), None))
            .collect::<Result<Vec<_>, _>>()?;
        let start_s = t.elapsed().as_secs_f64();
        // Let them go idle before measuring.
        std::thread::sleep(Duration::from_secs(2));
        let total = ProcessMemory::total(forks.iter().map(Sandbox::pid))?;
        let per_fork = |kib: u64| kib as f64 / n as f64;
        let host_used = before.saturating_sub(memory::available_kib()?);
        rows.push(serde_json::json!({
            "forks": n,
            "unique_kib_per_fork": per_fork(total.private_dirty_kib),
            "private_clean_kib_per_fork": per_fork(total.private_clean_kib),
            "pss_kib_per_fork": per_fork(total.pss_kib),
            "host_mem_used_kib_per_fork": per_fork(host_used),
            "prepare_per_s": n as f64 / prepare_s,
            "start_per_s": n as f64 / start_s,
            "create_per_s": n as f64 / (prepare_s + start_s),
        }));
        for f in forks {
            f.destroy()?;
        }
    }
    println!(
        "{}",
        serde_json::json!({"template": template, "mem_mib": meta.mem_mib, "rows": rows})
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let num = |s: &str| {
        s.parse::<usize>()
            .with_context(|| format!("{s:?} is not a number"))
    };
    let result =
        match a[..] {
            ["gate-closed", t] => gate_closed(t),
            ["bench", t, forks, cold] => num(forks)
                .and_then(|f| num(cold).map(|c| (f, c)))
                .and_then(|(f, c)| {
                    ensure!(f > 0 && c > 0, "FORKS and COLD must be at least 1");
                    bench(t, f, c)
                }),
            ["idle", t, ref counts @ ..] if !counts.is_empty() => counts
                .iter()
                .map(|c| num(c))
                .collect::<Result<Vec<_>, _>>()
                .and_then(|c| {
                    ensure!(!c.contains(&0), "every N must be at least 1");
                    idle(t, &c)
                }),
            _ => {
                eprintln!(
                    "usage: cleave-fork-probe gate-closed TEMPLATE | bench TEMPLATE FORKS COLD | \
                 idle TEMPLATE N..."
                );
                return std::process::ExitCode::from(2);
            }
        };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cleave-fork-probe: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
