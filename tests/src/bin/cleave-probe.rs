//! cleave-probe: boots one guest through the agent library and drives its agent with the
//! protocol client, for the scenarios the `cleave` CLI does not expose (concurrency, big
//! transfers, files, timeouts) and for the control-channel benchmark. Runs wherever a
//! Linux-capable KVM is (the rig on kvm_pvm hosts), like `cleave` itself.
//!
//! `cleave-probe check` runs every check in one guest and prints `probe <name>: ok` or
//! `probe <name>: FAIL <why>`; `cleave-probe bench [N]` prints the benchmark as JSON.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use cleave_agent::devices::virtio::net::NetBackend;
use cleave_agent::host::{kvm, paths};
use cleave_agent::image::Manifest;
use cleave_agent::node::boot::BASE_CMDLINE;
use cleave_agent::vmm::agent_vm::AgentVm;
use cleave_agent::vmm::config::MachineConfig;
use cleave_agent::vmm::open_kvm;
use cleave_guest::protocol::{
    Client, ClientError, ErrorCode, ExecRequest, ExitStatus, OutputEvent,
};
use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;

fn boot(mem_mib: u64, vcpus: u64) -> anyhow::Result<AgentVm> {
    kvm::require_linux_capable()?;
    let image = Manifest::load(&paths::default_image_manifest())?
        .spec()
        .load_verified()?;
    let kvm = open_kvm()?;
    let machine = MachineConfig::new(mem_mib, vcpus)?;
    Ok(AgentVm::boot(
        &kvm,
        machine,
        &image,
        BASE_CMDLINE,
        Duration::from_secs(120),
        NetBackend::Disconnected,
    )?)
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

/// Deterministic bytes (xorshift), so both sides can check them.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The first word of `sha256sum` output.
fn first_word(out: &[u8]) -> String {
    String::from_utf8_lossy(out)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}

fn check_output_64mib(c: &Client) -> anyhow::Result<()> {
    // Random bytes, hashed in the guest (to stderr) and on the host (what arrived).
    let script = "head -c 67108864 /dev/urandom > /tmp/big && sha256sum /tmp/big >&2 && cat /tmp/big && rm /tmp/big";
    let mut hasher = Sha256::new();
    let mut n = 0usize;
    let mut err = Vec::new();
    let x = c.exec(sh(script), None, |ev| match ev {
        OutputEvent::Stdout(d) => {
            hasher.update(d);
            n += d.len();
        }
        OutputEvent::Stderr(d) => err.extend_from_slice(d),
        OutputEvent::Exited(_) => {}
    })?;
    ensure!(
        x.status == ExitStatus::Code(0),
        "exit {:?}: {}",
        x.status,
        String::from_utf8_lossy(&err)
    );
    ensure!(n == 64 * MIB, "received {n} bytes, not 64 MiB");
    let host = hex::encode(hasher.finalize());
    let guest = first_word(&err);
    ensure!(host == guest, "sha256 differs: host {host}, guest {guest}");
    Ok(())
}

fn check_concurrent_64(vm: &AgentVm) -> anyhow::Result<()> {
    // 64 execs at once: 16 on each of 4 connections.
    let clients: Vec<Arc<Client>> = (0..4)
        .map(|_| -> anyhow::Result<Arc<Client>> {
            Ok(Arc::new(Client::new(vm.connect(Duration::from_secs(30))?)?))
        })
        .collect::<anyhow::Result<_>>()?;
    let threads: Vec<_> = (0..64)
        .map(|i| {
            let c = clients[i % 4].clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut req = ExecRequest::new([
                    "sh",
                    "-c",
                    "echo begin-$0; sleep 1; echo end-$0; exit $(($0 % 7))",
                ]);
                req.argv.push(i.to_string().into());
                let (x, out, _) = c.exec_collect(req, None)?;
                let want = format!("begin-{i}\nend-{i}\n");
                ensure!(
                    String::from_utf8_lossy(&out) == want,
                    "exec {i} printed {:?}",
                    String::from_utf8_lossy(&out)
                );
                ensure!(
                    x.status == ExitStatus::Code((i % 7) as i32),
                    "exec {i}: {:?}",
                    x.status
                );
                Ok(())
            })
        })
        .collect();
    let started = Instant::now();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("exec thread panicked"))??;
    }
    // 64 one-second sleeps in well under 64 s: they ran at the same time.
    ensure!(
        started.elapsed() < Duration::from_secs(40),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

fn check_stdin_roundtrip(c: &Client) -> anyhow::Result<()> {
    let data = pattern(3 * MIB + 17, 7);
    let (x, out, _) = c.exec_collect(ExecRequest::new(["cat"]), Some(data.clone()))?;
    ensure!(x.status == ExitStatus::Code(0), "{:?}", x.status);
    ensure!(out == data, "cat returned {} bytes that differ", out.len());
    Ok(())
}

fn check_file_16mib(c: &Client) -> anyhow::Result<()> {
    let data = pattern(16 * MIB, 42);
    let path = Path::new("/tmp/f16");
    let n = c.write_file(path, 0o600, data.len() as u64, &mut &data[..])?;
    ensure!(n == data.len() as u64, "wrote {n}");
    let (_, out, _) = c.exec_collect(ExecRequest::new(["sha256sum", "/tmp/f16"]), None)?;
    ensure!(
        first_word(&out) == sha_hex(&data),
        "guest sha256 {} differs",
        first_word(&out)
    );
    let back = c.read_file_to_vec(path, 32 * MIB as u64)?;
    ensure!(back == data, "read back {} bytes that differ", back.len());
    let (_, out, _) = c.exec_collect(sh("stat -c %a /tmp/f16; rm /tmp/f16"), None)?;
    ensure!(
        String::from_utf8_lossy(&out).trim() == "600",
        "mode {:?}",
        String::from_utf8_lossy(&out)
    );
    Ok(())
}

fn check_missing_file(c: &Client) -> anyhow::Result<()> {
    match c.read_file_to_vec(Path::new("/no/such/file"), 1024) {
        Err(ClientError::Remote(e)) => {
            ensure!(e.code == ErrorCode::NotFound, "code {:?}", e.code);
            ensure!(
                e.message.contains("/no/such/file"),
                "message does not name the path: {}",
                e.message
            );
            println!("probe missing-file: error was: {e}");
            Ok(())
        }
        other => bail!("expected a NotFound error, got {other:?}"),
    }
}

fn check_timeout_kills_group(c: &Client) -> anyhow::Result<()> {
    // A shell with two background sleeps: the timeout must kill all three.
    let mut req = sh("sleep 300 & sleep 301 & echo started; wait");
    req.timeout_ms = Some(1500);
    let started = Instant::now();
    let (x, out, _) = c.exec_collect(req, None)?;
    ensure!(
        String::from_utf8_lossy(&out).contains("started"),
        "did not start"
    );
    ensure!(x.timed_out, "not reported as timed out: {x:?}");
    ensure!(
        matches!(x.status, ExitStatus::Signal(9)),
        "status {:?}",
        x.status
    );
    ensure!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    // Nothing of the group survives (reaped, not zombies either).
    std::thread::sleep(Duration::from_millis(300));
    let (_, out, _) = c.exec_collect(
        sh("ps -o pid,stat,args | grep 'sleep 30[01]' || true"),
        None,
    )?;
    ensure!(
        out.is_empty(),
        "left behind: {}",
        String::from_utf8_lossy(&out)
    );
    Ok(())
}

fn check_signal(c: &Client) -> anyhow::Result<()> {
    let mut h = c.start_exec(sh("echo up; sleep 300"))?;
    match h.next_event()? {
        OutputEvent::Stdout(d) if d.starts_with(b"up") => {}
        other => bail!("unexpected first event {other:?}"),
    }
    c.signal(h.id(), libc::SIGTERM)?;
    loop {
        if let OutputEvent::Exited(x) = h.next_event()? {
            ensure!(
                x.status == ExitStatus::Signal(libc::SIGTERM),
                "{:?}",
                x.status
            );
            return Ok(());
        }
    }
}

fn check_bad_exec(c: &Client) -> anyhow::Result<()> {
    match c.exec_collect(ExecRequest::new(["/no/such/program"]), None) {
        Err(ClientError::Remote(e)) => {
            ensure!(e.message.contains("/no/such/program"), "{e}");
        }
        Ok((x, _, _)) => ensure!(x.status != ExitStatus::Code(0), "ran: {x:?}"),
        Err(e) => bail!("{e}"),
    }
    // The agent is still fine.
    let (x, _, _) = c.exec_collect(ExecRequest::new(["true"]), None)?;
    ensure!(x.status == ExitStatus::Code(0), "{:?}", x.status);
    Ok(())
}

type Check<'a> = Box<dyn Fn() -> anyhow::Result<()> + 'a>;

fn checks() -> anyhow::Result<bool> {
    let vm = boot(512, 2).context("booting the guest")?;
    println!(
        "probe: guest agent {} ready after {:.0} ms",
        vm.hello().agent,
        vm.ready_after().as_secs_f64() * 1e3
    );
    let c = vm.client();
    let list: Vec<(&str, Check<'_>)> = vec![
        ("output-64mib", Box::new(|| check_output_64mib(c))),
        ("concurrent-64", Box::new(|| check_concurrent_64(&vm))),
        ("stdin-roundtrip", Box::new(|| check_stdin_roundtrip(c))),
        ("file-16mib", Box::new(|| check_file_16mib(c))),
        ("missing-file", Box::new(|| check_missing_file(c))),
        (
            "timeout-kills-group",
            Box::new(|| check_timeout_kills_group(c)),
        ),
        ("signal", Box::new(|| check_signal(c))),
        ("bad-exec", Box::new(|| check_bad_exec(c))),
    ];
    let mut ok = true;
    for (name, f) in list {
        let t = Instant::now();
        match f() {
            Ok(()) => println!("probe {name}: ok ({:.1} s)", t.elapsed().as_secs_f64()),
            Err(e) => {
                ok = false;
                println!("probe {name}: FAIL {e:#}");
            }
        }
    }
    if !ok {
        println!("--- guest console ---\n{}\n--- end ---", vm.console_tail());
    }
    let _ = std::io::stdout().flush();
    Ok(ok)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn bench(iterations: usize) -> anyhow::Result<()> {
    let vm = boot(512, 2).context("booting the guest")?;
    let c = vm.client();
    for _ in 0..20 {
        c.exec_collect(ExecRequest::new(["true"]), None)?;
    }
    let mut us = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let (x, _, _) = c.exec_collect(ExecRequest::new(["true"]), None)?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
        ensure!(x.status == ExitStatus::Code(0), "{:?}", x.status);
    }
    us.sort_by(f64::total_cmp);
    // A request without a process: the channel alone.
    let mut hello_us = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        c.hello(Duration::from_secs(30))?;
        hello_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    hello_us.sort_by(f64::total_cmp);

    let size = 64 * MIB;
    // Host → guest: stdin into `cat > /dev/null`.
    let data = pattern(size, 3);
    let t = Instant::now();
    let (x, _, _) = c.exec_collect(sh("cat > /dev/null"), Some(data))?;
    let h2g = size as f64 / MIB as f64 / t.elapsed().as_secs_f64();
    ensure!(x.status == ExitStatus::Code(0), "{:?}", x.status);
    // Guest → host: stdout of `head -c`.
    let t = Instant::now();
    let mut n = 0usize;
    c.exec(sh("head -c 67108864 /dev/zero"), None, |ev| {
        if let OutputEvent::Stdout(d) = ev {
            n += d.len();
        }
    })?;
    let g2h = n as f64 / MIB as f64 / t.elapsed().as_secs_f64();
    ensure!(n == size, "got {n}");
    println!(
        "{}",
        serde_json::json!({
            "iterations": iterations,
            "exec_true_us": {"p50": percentile(&us, 0.5), "p99": percentile(&us, 0.99), "min": us[0]},
            "hello_us": {"p50": percentile(&hello_us, 0.5), "p99": percentile(&hello_us, 0.99)},
            "host_to_guest_mib_s": h2g,
            "guest_to_host_mib_s": g2h,
            "transfer_mib": size / MIB,
        })
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("check") => checks(),
        Some("bench") => {
            let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
            bench(n).map(|()| true)
        }
        _ => {
            eprintln!("usage: cleave-probe check | cleave-probe bench [ITERATIONS]");
            return std::process::ExitCode::from(2);
        }
    };
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("cleave-probe: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
