//! Host-side fork path benchmark: request → new VM ready to run (VM created, memory
//! mapped, all state restored, devices wired), p50/p99 over many forks, step by step.
//!
//! Runs directly on /dev/kvm (kvm_pvm included: only ioctls are timed) with a template
//! captured from the tiny counting guest. Teardown is timed separately: it is not on the
//! fork path (a fork's process exits, or a reaper drops it).
//!
//! `cargo run --release -p cleave-agent --example fork_bench -- [--forks N] [--mem-mib M]
//! [--alive K]` (K: how many forks stay alive at once; the oldest is dropped first).

use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cleave_agent::fork::{self, RestoreTimings, Template};
use cleave_agent::vmm::config::MachineConfig;
use cleave_agent::vmm::{self, tiny, Irqchip, Vm};
use kvm_ioctls::Kvm;

struct Args {
    forks: usize,
    mem_mib: u64,
    alive: usize,
    warmup: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        forks: 1000,
        mem_mib: 256,
        alive: 1,
        warmup: 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> Result<usize> {
            it.next()
                .with_context(|| format!("{flag} needs a value"))?
                .parse()
                .with_context(|| format!("{flag} takes a number"))
        };
        match flag.as_str() {
            "--forks" => args.forks = value()?,
            "--mem-mib" => args.mem_mib = value()? as u64,
            "--alive" => args.alive = value()?.max(1),
            "--warmup" => args.warmup = value()?,
            other => bail!("unknown argument {other}; see the file's header for usage"),
        }
    }
    Ok(args)
}

/// Boots the tiny counting guest, lets it run a moment, and captures it.
fn template(kvm: &Kvm, mem_mib: u64) -> Result<Template> {
    let machine = MachineConfig::new(mem_mib, 1)?;
    let vm = Vm::create(kvm, machine, Irqchip::InKernel, Box::new(std::io::sink()))?;
    tiny::load(vm.ram().memory(), tiny::Ending::Count)?;
    vm.vcpus()[0].configure_cpu(vm.supported_cpuid(), 1)?;
    tiny::setup_vcpu(&vm.vcpus()[0])?;
    let running = vm.start()?;
    std::thread::sleep(Duration::from_millis(20));
    let (_, vm) = running.stop_and_keep();
    Ok(fork::capture(kvm, vm)?)
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[Duration], q: f64) -> Duration {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

struct Column {
    name: &'static str,
    samples: Vec<Duration>,
}

impl Column {
    fn new(name: &'static str, n: usize) -> Self {
        Self {
            name,
            samples: Vec::with_capacity(n),
        }
    }
    fn row(&mut self) -> String {
        self.samples.sort();
        let v = &self.samples;
        let mean = v.iter().sum::<Duration>() / v.len().max(1) as u32;
        format!(
            "| {} | {} | {} | {} | {} | {} |",
            self.name,
            us(mean),
            us(pct(v, 0.5)),
            us(pct(v, 0.9)),
            us(pct(v, 0.99)),
            us(*v.last().unwrap_or(&Duration::ZERO)),
        )
    }
}

/// Runs the fork once to its first exit (not part of the fork path; shows it runs).
fn first_run(vm: &mut Vm) -> Result<Duration> {
    let t = Instant::now();
    vm.vcpus_mut()[0]
        .fd_mut()
        .run()
        .context("first KVM_RUN of a fork")?;
    Ok(t.elapsed())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let kvm = vmm::open_kvm()?;
    let template = template(&kvm, args.mem_mib)?;
    let n = args.forks;

    let mut steps: Vec<Column> = RestoreTimings::STEP_NAMES
        .iter()
        .map(|name| Column::new(name, n))
        .collect();
    let mut cold = Column::new("**cold: request → ready (prepare + finish)**", n);
    let mut warm = Column::new("**warm shell: request → ready (finish only)**", n);
    let mut prepare = Column::new("(warm shell: prepare, ahead of the request)", n);
    let mut first_exit = Column::new("(first KVM_RUN → first exit)", n);
    let mut teardown = Column::new("(teardown: drop the VM)", n);
    let mut alive: VecDeque<Vm> = VecDeque::with_capacity(args.alive);
    let mut keep = |vm: Vm, teardown: &mut Column, record: bool| {
        alive.push_back(vm);
        if alive.len() >= args.alive {
            let t = Instant::now();
            drop(alive.pop_front());
            if record {
                teardown.samples.push(t.elapsed());
            }
        }
    };

    // Cold and warm forks alternate, so both see the same machine load.
    for i in 0..args.warmup + n {
        let record = i >= args.warmup;

        let t = Instant::now();
        let restored = fork::restore(&kvm, &template, Box::new(std::io::sink()))?;
        let cold_path = t.elapsed();
        let mut vm = restored.vm;
        let ran = first_run(&mut vm)?;
        keep(vm, &mut teardown, record);

        let shell = fork::prepare(&kvm, &template)?;
        let t = Instant::now();
        let warm_fork = shell.finish(&template, Box::new(std::io::sink()))?;
        let warm_path = t.elapsed();
        let mut wvm = warm_fork.vm;
        first_run(&mut wvm)?;
        keep(wvm, &mut teardown, record);

        if record {
            for (col, d) in steps.iter_mut().zip(restored.timings.steps()) {
                col.samples.push(d);
            }
            cold.samples.push(cold_path);
            warm.samples.push(warm_path);
            prepare.samples.push(warm_fork.timings.prepare());
            first_exit.samples.push(ran);
        }
    }
    drop(alive);

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "forks={n} (each cold and warm) warmup={} guest={} MiB, 1 vCPU, alive at once={}, \
         msrs={}",
        args.warmup,
        args.mem_mib,
        args.alive,
        template.state().vcpus[0].msrs.as_slice().len()
    )?;
    writeln!(
        out,
        "| step (cold fork) | mean µs | p50 µs | p90 µs | p99 µs | max µs |"
    )?;
    writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: |")?;
    for col in steps.iter_mut() {
        writeln!(out, "{}", col.row())?;
    }
    for col in [
        &mut cold,
        &mut warm,
        &mut prepare,
        &mut first_exit,
        &mut teardown,
    ] {
        writeln!(out, "{}", col.row())?;
    }
    Ok(())
}
