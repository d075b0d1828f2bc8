//! Host-side fork path benchmark: request → new VM ready to run (VM created, memory
//! mapped, all state restored, devices wired), p50/p99 over many forks, step by step.
//!
//! Runs directly on /dev/kvm (kvm_pvm included: only ioctls are timed) with a template
//! captured from the tiny counting guest. Teardown is timed separately: it is not on the
//! fork path (a fork's process exits, or a reaper drops it).
//!
//! Then the same with one process per fork (`cleave-fork-worker`, built beside this
//! example by `cargo build --release -p cleave-agent --bins --examples`): a fresh process
//! per request (exec'd, or forked from a zygote), and a pool of pre-started workers that
//! already hold the template and a prepared shell.
//!
//! `cargo run --release -p cleave-agent --example fork_bench -- --help` for the flags.

use cleave_agent::fork::process::Process;
use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use cleave_agent::devices::virtio::net::NetBackend;
use cleave_agent::fork::jail::Jail;
use cleave_agent::fork::worker::{Encoded, Worker};
use cleave_agent::fork::zygote::Zygote;
use cleave_agent::fork::{self, RestoreTimings, Template};
use cleave_agent::host::memory::{HostMemory, ProcessMemory};
use cleave_agent::vmm::config::MachineConfig;
use cleave_agent::vmm::{self, tiny, Irqchip, Vm};
use kvm_ioctls::Kvm;

struct Args {
    forks: usize,
    mem_mib: u64,
    /// Forks kept alive at once (in-process path: 1; `--churn`: 64).
    alive: Option<usize>,
    warmup: usize,
    workers: usize,
    pool: usize,
    /// Idle-fork counts to measure memory at; when given, only that runs.
    idle: Vec<usize>,
    /// `--idle` with jailed workers (the node's path).
    jailed: bool,
    /// Requests per second on the pooled path.
    rate: u32,
    /// Seconds of sustained churn to measure; when given, only that runs.
    churn: Option<u64>,
    /// Threads refilling the pool during `--churn`.
    refillers: usize,
    /// What the guest of every process-per-fork fork does once it runs.
    guest: tiny::Ending,
}

const USAGE: &str = "\
usage: fork_bench [--forks N] [--warmup N] [--mem-mib M] [--alive K] [--workers N] [--pool P]
                  [--rate R] [--guest count|halt]
       fork_bench --idle N[,N...] [--jailed] [--mem-mib M]
       fork_bench --churn SECS [--alive K] [--pool P] [--refillers R] [--mem-mib M]

Times forks of a tiny guest on /dev/kvm: in-process (cold and from a warm shell), then one
process per fork (a fresh cleave-fork-worker per request, exec'd or forked from a zygote,
jailed and not, and a pool of pre-started workers refilled either way). Build the worker
first:
  cargo build --release -p cleave-agent --bins --examples

  --forks N     forks per path; 0 skips the in-process paths (1000)
  --warmup N    untimed forks first (20)
  --mem-mib M   guest memory (256)             --alive K    in-process forks kept alive (1)
  --workers N   forks per process path; 0 skips them (1000)
  --pool P      pre-started workers in the pool (32)
  --rate R      requests per second on the pooled path (250)
  --guest G     what each process-per-fork guest does once it runs: count (a busy loop
                that prints, so every fork served and not yet torn down takes a CPU) or
                halt (it waits, as an idle sandbox does) (count)
  --idle LIST   only: keep N idle forks alive at once (one worker each), for each N, and
                report memory per fork (process and kernel) and the creation rate
  --jailed      with --idle: each worker jailed as the node jails it (uid, namespaces,
                cgroup leaf where cgroup2 is mounted, seccomp)
  --churn SECS  only: create → ready → destroy as fast as the pool allows for SECS, one
                worker per fork, at most K forks alive (--alive, 64 here), the pool of P
                refilled by R threads (--refillers, 2), from the zygote and then by exec;
                reports the sustained rate of each
";

/// Parses the flags; `Ok(None)` after printing the usage for `--help`.
fn parse_args() -> Result<Option<Args>> {
    let mut args = Args {
        forks: 1000,
        mem_mib: 256,
        alive: None,
        warmup: 20,
        workers: 1000,
        pool: 32,
        idle: Vec::new(),
        jailed: false,
        rate: 250,
        churn: None,
        refillers: 2,
        guest: tiny::Ending::Count,
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
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(None);
            }
            "--jailed" => args.jailed = true,
            "--rate" => args.rate = (value()? as u32).max(1),
            "--forks" => args.forks = value()?,
            "--mem-mib" => args.mem_mib = value()? as u64,
            "--alive" => args.alive = Some(value()?.max(1)),
            "--warmup" => args.warmup = value()?,
            "--workers" => args.workers = value()?,
            "--pool" => args.pool = value()?.max(1),
            "--churn" => args.churn = Some(value()?.max(1) as u64),
            "--refillers" => args.refillers = value()?.max(1),
            "--guest" => {
                args.guest = match it.next().as_deref() {
                    Some("count") => tiny::Ending::Count,
                    Some("halt") => tiny::Ending::Halt,
                    Some(other) => bail!("--guest: {other:?} is neither count nor halt"),
                    None => bail!("--guest needs count or halt"),
                }
            }
            "--idle" => {
                let list = it
                    .next()
                    .context("--idle needs a list such as 1,100,1000")?;
                args.idle = list
                    .split(',')
                    .map(|n| {
                        n.parse()
                            .with_context(|| format!("--idle: {n:?} is not a count"))
                    })
                    .collect::<Result<_>>()?;
                if args.idle.contains(&0) {
                    bail!("--idle: every count must be at least 1");
                }
            }
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }
    Ok(Some(args))
}

/// Boots a tiny guest, lets it run a moment, and captures it.
fn template(kvm: &Kvm, mem_mib: u64, ending: tiny::Ending) -> Result<Template> {
    let machine = MachineConfig::new(mem_mib, 1)?;
    let vm = Vm::create(kvm, machine, Irqchip::InKernel, Box::new(std::io::sink()))?;
    tiny::load(vm.ram().memory(), ending)?;
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

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fork_bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    let kvm = vmm::open_kvm()?;
    if let Some(secs) = args.churn {
        // Churned forks halt, as idle ones do: the run measures the fork path, not guests.
        let template = template(&kvm, args.mem_mib, tiny::Ending::Halt)?;
        return churn(&template, &args, Duration::from_secs(secs));
    }
    if !args.idle.is_empty() {
        // Idle forks halt: the counting guest would keep writing and printing.
        return idle(&template(&kvm, args.mem_mib, tiny::Ending::Halt)?, &args);
    }
    if args.forks > 0 {
        // In-process forks count: each path times its fork's first exit.
        in_process(
            &kvm,
            &template(&kvm, args.mem_mib, tiny::Ending::Count)?,
            &args,
        )?;
    }
    let template = template(&kvm, args.mem_mib, args.guest)?;
    if args.workers > 0 {
        workers(&template, &args)?;
    }
    Ok(())
}

/// The in-process paths: cold forks and forks from a warm shell, alternating.
fn in_process(kvm: &Kvm, template: &Template, args: &Args) -> Result<()> {
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
    let alive_max = args.alive.unwrap_or(1);
    let mut alive: VecDeque<Vm> = VecDeque::with_capacity(alive_max);
    let mut keep = |vm: Vm, teardown: &mut Column, record: bool| {
        alive.push_back(vm);
        if alive.len() >= alive_max {
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
        let restored = fork::restore(
            kvm,
            template,
            Box::new(std::io::sink()),
            None,
            NetBackend::Disconnected,
        )?;
        let cold_path = t.elapsed();
        let mut vm = restored.vm;
        let ran = first_run(&mut vm)?;
        keep(vm, &mut teardown, record);

        let shell = fork::Shell::build(kvm, template)?;
        let t = Instant::now();
        let warm_fork = shell.finish(
            template,
            Box::new(std::io::sink()),
            None,
            NetBackend::Disconnected,
        )?;
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
            prepare.samples.push(warm_fork.timings.shell_build());
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
        alive_max,
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
    drop(out);
    Ok(())
}

/// `cleave-fork-worker` beside this example's directory (target/<profile>/).
fn worker_exe() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|examples| examples.parent())
        .context("locating the target directory")?;
    let worker = dir.join("cleave-fork-worker");
    if !worker.exists() {
        bail!(
            "{} is missing: cargo build --release -p cleave-agent --bins --examples",
            worker.display()
        );
    }
    Ok(worker)
}

/// Reaps released workers (their VM teardown runs in their own process) once there are
/// more than `keep`.
fn reap(children: &mut VecDeque<Process>, keep: usize) -> Result<()> {
    while children.len() > keep {
        if let Some(mut c) = children.pop_front() {
            c.wait()?;
        }
    }
    Ok(())
}

/// The head of a table of [`Column`] rows.
const STEP_HEADER: &str =
    "| step | mean µs | p50 µs | p90 µs | p99 µs | max µs |\n| --- | ---: | ---: | ---: | ---: | ---: |";

fn workers(template: &Template, args: &Args) -> Result<()> {
    let exe = worker_exe()?;
    let encoded = Encoded::new(template)?;
    let n = args.workers;
    let mut spawn = Column::new("fresh: spawn()", n);
    let mut load = Column::new(
        "fresh: template → prepared (exec, decode, verify seals, prepare)",
        n,
    );
    let mut go = Column::new("fresh: go → ready (finish, start)", n);
    let mut fresh = Column::new("**fresh process: request → ready**", n);
    // The same fresh path with the worker jailed (when root): what the jail adds, and
    // that it adds it before the request (`go` should not move).
    let jail = Jail::best_effort();
    let mut jailed_spawn = Column::new("fresh, jailed: spawn (+ uid, cgroup leaf)", n);
    let mut jailed_load = Column::new("fresh, jailed: template → prepared (+ jail)", n);
    let mut jailed_go = Column::new("fresh, jailed: go → ready", n);
    // The node's path: forked from a zygote that holds the template.
    let zygote = Zygote::start(&exe, &encoded)?;
    let mut z_spawn = Column::new("zygote: spawn → prepared (clone, jail-free, prepare)", n);
    let mut z_go = Column::new("zygote: go → ready (finish, start)", n);
    let mut z_inside = Column::new("(zygote: go → ready inside the worker)", n);
    let mut z_fresh = Column::new("**zygote: request → ready**", n);
    let mut z_jailed = Column::new("zygote, jailed: spawn → prepared (+ uid, cgroup, jail)", n);
    let mut released: VecDeque<Process> = VecDeque::new();

    for i in 0..args.warmup + n {
        let record = i >= args.warmup;
        let t0 = Instant::now();
        let mut w = Worker::spawn(&exe)?;
        let t1 = Instant::now();
        w.load(&encoded)?;
        let t2 = Instant::now();
        w.go(None)?;
        let t3 = Instant::now();
        released.push_back(w.release());
        reap(&mut released, 64)?;
        if record {
            spawn.samples.push(t1 - t0);
            load.samples.push(t2 - t1);
            go.samples.push(t3 - t2);
            fresh.samples.push(t3 - t0);
        }
        let t0 = Instant::now();
        let mut w = zygote.spawn(None)?;
        let t1 = Instant::now();
        let ready = w.go(None)?;
        let t2 = Instant::now();
        released.push_back(w.release());
        reap(&mut released, 64)?;
        if record {
            z_spawn.samples.push(t1 - t0);
            z_go.samples.push(t2 - t1);
            z_inside
                .samples
                .push(Duration::from_micros(ready.finish_us));
            z_fresh.samples.push(t2 - t0);
        }
        if let Some(jail) = &jail {
            let t0 = Instant::now();
            let mut w = zygote.spawn(Some(jail))?;
            let t1 = Instant::now();
            w.go(None)?;
            w.destroy()?;
            if record {
                z_jailed.samples.push(t1 - t0);
            }
            let t0 = Instant::now();
            let mut w = Worker::spawn_for(&exe, Some(jail), encoded.guest_bytes())?;
            let t1 = Instant::now();
            w.load(&encoded)?;
            let t2 = Instant::now();
            w.go(None)?;
            let t3 = Instant::now();
            // Reaped here (not timed): its uid and runtime directory go with it.
            w.destroy()?;
            if record {
                jailed_spawn.samples.push(t1 - t0);
                jailed_load.samples.push(t2 - t1);
                jailed_go.samples.push(t3 - t2);
            }
        }
    }

    reap(&mut released, 0)?;
    // The pool as a node runs it: refilled by a thread of its own while requests come at
    // a steady rate and served forks end behind them; refilled from the zygote (the
    // node's path) and by exec (the old one), one after the other.
    let mut pools = Vec::new();
    for spawner in [Spawner::Zygote(&zygote), Spawner::Exec(&exe, &encoded)] {
        let (request, inside, waited) = pool_run(spawner, args)?;
        let mut pooled = Column::new(
            match spawner {
                Spawner::Zygote(_) => "**pool refilled from the zygote: request → ready**",
                Spawner::Exec(..) => "**pool refilled by exec: request → ready**",
            },
            n,
        );
        let mut in_worker = Column::new("(pool: go → ready inside the worker)", n);
        pooled.samples = request;
        in_worker.samples = inside;
        pools.push((pooled, in_worker, waited));
    }

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\none process per fork: {n} fresh workers, {n} from a pool of {} (state {} bytes JSON), \
         guests that {}",
        args.pool,
        encoded.len(),
        match args.guest {
            tiny::Ending::Halt => "halt",
            tiny::Ending::Count | tiny::Ending::Exit(_) => "count",
        }
    )?;
    writeln!(out, "{STEP_HEADER}")?;
    for col in [&mut spawn, &mut load, &mut go, &mut fresh] {
        writeln!(out, "{}", col.row())?;
    }
    if jail.is_some() {
        for col in [&mut jailed_spawn, &mut jailed_load, &mut jailed_go] {
            writeln!(out, "{}", col.row())?;
        }
    }
    for col in [&mut z_spawn, &mut z_go, &mut z_inside, &mut z_fresh] {
        writeln!(out, "{}", col.row())?;
    }
    if jail.is_some() {
        writeln!(out, "{}", z_jailed.row())?;
    }
    writeln!(
        out,
        "\npool of {}, refilled by its own thread, {} requests/s; served forks torn down \
         behind them",
        args.pool, args.rate
    )?;
    writeln!(out, "{STEP_HEADER}")?;
    let mut empty = Vec::new();
    for (pooled, in_worker, waited) in &mut pools {
        writeln!(out, "{}", pooled.row())?;
        writeln!(out, "{}", in_worker.row())?;
        empty.push(waited.to_string());
    }
    writeln!(
        out,
        "\nrequests that found the pool empty (zygote, exec): {}",
        empty.join(", ")
    )?;
    Ok(())
}

/// Where a benchmark's workers come from: forked from a zygote that holds the template
/// (the node's path), or exec'd and sent it (the path before the zygote).
#[derive(Clone, Copy)]
enum Spawner<'a> {
    Zygote(&'a Zygote),
    Exec(&'a std::path::Path, &'a Encoded),
}

impl Spawner<'_> {
    /// A worker with its shell prepared, jailed as the node would when `jail` is given.
    fn prepared(&self, jail: Option<&Jail>) -> Result<Worker> {
        match self {
            Spawner::Zygote(z) => Ok(z.spawn(jail)?),
            Spawner::Exec(exe, encoded) => {
                let mut w = Worker::spawn_for(exe, jail, encoded.guest_bytes())?;
                w.load(encoded)?;
                Ok(w)
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Spawner::Zygote(_) => "zygote",
            Spawner::Exec(..) => "exec",
        }
    }
}

/// Keeps `tx`'s pool topped up with prepared workers until the run drops its end.
fn refill(spawner: Spawner, tx: &std::sync::mpsc::SyncSender<Worker>) -> Result<()> {
    loop {
        let w = spawner.prepared(None)?;
        if tx.send(w).is_err() {
            return Ok(()); // the run is over
        }
    }
}

/// One pooled run: a refill thread keeps up to `args.pool` prepared workers while `args.warmup + args.workers` requests take one each at `args.rate`
/// per second. Returns request → ready and the worker's own finish + start, per request,
/// and how many requests found the pool empty.
fn pool_run(spawner: Spawner, args: &Args) -> Result<(Vec<Duration>, Vec<Duration>, usize)> {
    let total = args.warmup + args.workers;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Worker>(args.pool);
    std::thread::scope(|scope| {
        let refill = scope.spawn(move || refill(spawner, &tx));
        let mut request = Vec::with_capacity(args.workers);
        let mut inside = Vec::with_capacity(args.workers);
        let mut released: VecDeque<Process> = VecDeque::new();
        let mut next = Instant::now();
        let mut waited = 0;
        for i in 0..total {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            next += interval;
            // A request that finds the pool empty waits for a worker: not timed here, since
            // that is the refill rate, not the fork path (the run says how often).
            let mut w = match rx.try_recv() {
                Ok(w) => w,
                Err(_) => {
                    waited += 1;
                    rx.recv().context("the refill thread stopped")?
                }
            };
            let t = Instant::now();
            let ready = w.go(None)?;
            let took = t.elapsed();
            if i >= args.warmup {
                request.push(took);
                inside.push(Duration::from_micros(ready.finish_us));
            }
            released.push_back(w.release());
            // Reap the ones that are done; wait only when far behind.
            released.retain_mut(|p| !matches!(p.try_wait(), Ok(Some(_))));
            reap(&mut released, 256)?;
        }
        drop(rx);
        let refilled = refill
            .join()
            .map_err(|_| anyhow::anyhow!("the refill thread panicked"))?;
        reap(&mut released, 0)?;
        refilled?;
        Ok((request, inside, waited))
    })
}

/// Sustained churn: forks created → ready → destroyed back to back for `secs`, one worker
/// process each, at most `--alive` forks alive, the pool refilled by `--refillers`
/// threads. Every cost of a fork's life shares the machine at once: the refill (spawn,
/// exec, template, shell), the request, and the teardown of the forks it displaces. Runs
/// with workers from the zygote, then (as long again) exec'd ones.
fn churn(template: &Template, args: &Args, secs: Duration) -> Result<()> {
    let exe = worker_exe()?;
    let encoded = Encoded::new(template)?;
    let zygote = Zygote::start(&exe, &encoded)?;
    println!(
        "churn for {} s per path: one worker per fork, at most {} alive, pool of {}, {} refill \
         threads, guest {} MiB",
        secs.as_secs(),
        args.alive.unwrap_or(64),
        args.pool,
        args.refillers,
        args.mem_mib
    );
    println!(
        "| workers | forks created → ready → destroyed | forks/s sustained | forks/s per \
         second: min / median / max | go → ready p50 µs | p99 µs | requests that found the \
         pool empty |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for spawner in [Spawner::Zygote(&zygote), Spawner::Exec(&exe, &encoded)] {
        churn_run(spawner, args, secs)?;
    }
    Ok(())
}

/// One churn run (see [`churn`]): prints its row.
fn churn_run(spawner: Spawner, args: &Args, secs: Duration) -> Result<()> {
    use std::sync::mpsc::TryRecvError;
    let alive_max = args.alive.unwrap_or(64);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Worker>(args.pool);
    std::thread::scope(|scope| -> Result<()> {
        let refills: Vec<_> = (0..args.refillers)
            .map(|_| {
                let tx = tx.clone();
                scope.spawn(move || refill(spawner, &tx))
            })
            .collect();
        drop(tx);
        // Let the pool fill before the clock starts.
        std::thread::sleep(Duration::from_secs(1));

        let mut ready = Vec::new();
        let mut per_second = vec![0u32; secs.as_secs() as usize + 1];
        let mut empty = 0usize;
        let mut alive: VecDeque<Worker> = VecDeque::with_capacity(alive_max + 1);
        let mut released: VecDeque<Process> = VecDeque::new();
        let start = Instant::now();
        while start.elapsed() < secs {
            let mut w = match rx.try_recv() {
                Ok(w) => w,
                Err(TryRecvError::Empty) => {
                    empty += 1;
                    rx.recv().context("every refill thread stopped")?
                }
                Err(TryRecvError::Disconnected) => bail!("every refill thread stopped"),
            };
            let t = Instant::now();
            w.go(None)?;
            ready.push(t.elapsed());
            let second = (start.elapsed().as_secs() as usize).min(per_second.len() - 1);
            per_second[second] += 1;
            alive.push_back(w);
            if alive.len() > alive_max {
                if let Some(old) = alive.pop_front() {
                    released.push_back(old.release());
                }
            }
            released.retain_mut(|p| !matches!(p.try_wait(), Ok(Some(_))));
            reap(&mut released, 256)?;
        }
        let elapsed = start.elapsed();
        drop(rx);
        for r in refills {
            r.join()
                .map_err(|_| anyhow::anyhow!("a refill thread panicked"))??;
        }
        released.extend(alive.into_iter().map(Worker::release));
        reap(&mut released, 0)?;

        let created = ready.len();
        if created == 0 {
            bail!("no fork became ready in {secs:?}");
        }
        ready.sort();
        // Whole seconds only: the first and the last are partial.
        let mut steady: Vec<u32> = per_second[1..per_second.len() - 1].to_vec();
        steady.sort();
        let (lo, mid, hi) = match steady.as_slice() {
            [] => (0, 0, 0),
            s => (s[0], s[s.len() / 2], s[s.len() - 1]),
        };
        println!(
            "| {} | {created} | **{:.0}** | {lo} / {mid} / {hi} | {} | {} | {empty} |",
            spawner.name(),
            created as f64 / elapsed.as_secs_f64(),
            us(pct(&ready, 0.5)),
            us(pct(&ready, 0.99)),
        );
        Ok(())
    })
}

/// Unique memory per idle fork and the creation rate, with `n` forks alive at once (one
/// worker process each), for each `n` in `args.idle`.
fn idle(template: &Template, args: &Args) -> Result<()> {
    let exe = worker_exe()?;
    let encoded = Encoded::new(template)?;
    // Workers come from the zygote, as on a node.
    let zygote = Zygote::start(&exe, &encoded)?;
    let spawner = Spawner::Zygote(&zygote);
    let jail = match args.jailed {
        true => Some(Jail::best_effort().context("--jailed needs root")?),
        false => None,
    };
    println!(
        "| idle forks | unique KiB/fork (Private_Dirty) | Private_Clean KiB/fork | PSS KiB/fork \
         | host MemAvailable drop KiB/fork | prepare/s | go/s | created/s |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut kernel_rows = Vec::new();
    for &n in &args.idle {
        let before = HostMemory::read()?;
        let t = Instant::now();
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let w = spawner
                .prepared(jail.as_ref())
                .with_context(|| format!("idle fork {} of {n}", i + 1))?;
            workers.push(w);
        }
        let prepare = t.elapsed();
        let t = Instant::now();
        for w in &mut workers {
            w.go(None)?;
        }
        let go = t.elapsed();
        // Let every vCPU reach its hlt and the workers settle.
        std::thread::sleep(Duration::from_secs(1));
        // The host's figure first: reading every worker's /proc below makes ~12 KiB of
        // inodes per worker, which are the benchmark's, not the fork's.
        let after = HostMemory::read()?;
        let total = ProcessMemory::total(workers.iter().map(Worker::pid))?;
        let host = before.available.saturating_sub(after.available);
        let per = |kib: u64| kib / n as u64;
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        println!(
            "| {n} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} |",
            per(total.private_dirty_kib),
            per(total.private_clean_kib),
            per(total.pss_kib),
            per(host),
            rate(prepare),
            rate(go),
            rate(prepare + go),
        );
        let parts: Vec<String> = before
            .parts()
            .iter()
            .zip(after.parts())
            .map(|((_, b), (_, a))| format!("{:.1}", a.saturating_sub(*b) as f64 / n as f64))
            .collect();
        kernel_rows.push(format!("| {n} | {} | {} |", parts.join(" | "), per(host)));
        for w in workers {
            w.destroy()?;
        }
    }
    // Where the host's memory went, per fork, by /proc/meminfo's own accounting.
    let names = HostMemory::default().parts().map(|(name, _)| name);
    println!(
        "\n| idle forks | {} | MemAvailable drop |",
        names.join(" | ")
    );
    println!("| ---: |{} ---: |", " ---: |".repeat(names.len()));
    for row in kernel_rows {
        println!("{row}");
    }
    Ok(())
}
