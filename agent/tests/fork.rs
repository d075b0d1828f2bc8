//! Fork tests on /dev/kvm directly (any KVM, kvm_pvm included), with the tiny counting
//! guest: a template is captured from a running guest and forks continue exactly where it
//! stopped, with private memory, several at once, and nothing left behind.
//!
//! The guest ([`tiny::Ending::Count`]) counts in `rcx`, stores the count in memory and
//! prints one character per count on COM1, so the console of template + fork must read as
//! one unbroken count: a fork that lost or replayed an instruction shows up as a gap or a
//! repeated character.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cleave_agent::devices::virtio::net::NetBackend;
use cleave_agent::devices::GuestEnd;
use cleave_agent::fork::worker::{Encoded, Worker};
use cleave_agent::fork::zygote::Zygote;

mod proc_status;
use cleave_agent::fork::{self, SealedMemory, Template};
use cleave_agent::host::kvm::KvmFlavour;
use cleave_agent::vmm::config::MachineConfig;
use cleave_agent::vmm::{self, tiny, Irqchip, RunningVm, Vm};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress};

/// The tests count this process's fds, so they run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// /dev/kvm with its ioctls: these tests fail (not skip) on a host without it.
fn kvm() -> Kvm {
    assert!(
        KvmFlavour::detect().has_ioctls(),
        "these tests need /dev/kvm (KVM ioctls); run them on a KVM host"
    );
    vmm::open_kvm().expect("open /dev/kvm")
}

/// A console that keeps the first bytes the guest printed, the last one, and a count.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Recorded>>);

#[derive(Default)]
struct Recorded {
    head: Vec<u8>,
    last: Option<u8>,
    total: usize,
}

const HEAD_BYTES: usize = 4096;

impl Recorder {
    fn lock(&self) -> MutexGuard<'_, Recorded> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn total(&self) -> usize {
        self.lock().total
    }
    fn wait_for(&self, bytes: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.total() < bytes {
            assert!(
                Instant::now() < deadline,
                "guest printed only {} bytes",
                self.total()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Write for Recorder {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut r = self.lock();
        let room = HEAD_BYTES.saturating_sub(r.head.len()).min(buf.len());
        r.head.extend_from_slice(&buf[..room]);
        if let Some(&b) = buf.last() {
            r.last = Some(b);
        }
        r.total += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the template had done when it was captured.
struct Captured {
    template: Template,
    /// The last count the template printed: a fork's first character is for the next one.
    last_printed: u64,
}

/// Boots the counting guest, lets it print `bytes` characters, stops and captures it.
fn counting_template(kvm: &Kvm, vcpus: u64, bytes: usize) -> Captured {
    let console = Recorder::default();
    let machine = MachineConfig::new(32, vcpus).unwrap();
    let vm = Vm::create(kvm, machine, Irqchip::InKernel, Box::new(console.clone())).unwrap();
    tiny::load(vm.ram().memory(), tiny::Ending::Count).unwrap();
    for vcpu in vm.vcpus() {
        vcpu.configure_cpu(vm.supported_cpuid(), vcpus as u8)
            .unwrap();
    }
    tiny::setup_vcpu(&vm.vcpus()[0]).unwrap();
    let running = vm.start().unwrap();
    console.wait_for(bytes);
    let (end, vm) = running.stop_and_keep();
    assert_eq!(end, GuestEnd::Stopped);
    let template = fork::capture(kvm, vm).unwrap();

    let rcx = template.state().vcpus[0].regs.rcx;
    let last = console.lock().last.unwrap();
    // The vCPU may have stopped just after `inc` (printed rcx - 1) or later (printed rcx).
    let last_printed = if last == tiny::count_char(rcx) {
        rcx
    } else {
        assert_eq!(last, tiny::count_char(rcx - 1), "rcx={rcx}");
        rcx - 1
    };
    let stored = template_counter(&template);
    assert!(
        stored == rcx || stored + 1 == rcx,
        "stored {stored}, rcx {rcx}"
    );
    Captured {
        template,
        last_printed,
    }
}

fn template_counter(t: &Template) -> u64 {
    let mut buf = [0u8; 8];
    t.memory()
        .file()
        .read_exact_at(&mut buf, tiny::COUNTER_ADDR)
        .unwrap();
    u64::from_le_bytes(buf)
}

/// A fork of `c`, running, and its console.
fn start_fork(kvm: &Kvm, c: &Captured) -> (RunningVm, Recorder) {
    let console = Recorder::default();
    let restored = fork::restore(
        kvm,
        &c.template,
        Box::new(console.clone()),
        None,
        NetBackend::Disconnected,
    )
    .unwrap();
    (restored.vm.start().unwrap(), console)
}

/// Checks that the fork's console continues the template's count without a gap or a
/// repeat, and that its memory and registers agree with what it printed.
fn assert_continues(c: &Captured, console: &Recorder, vm: &Vm) {
    let rec = console.lock();
    assert!(!rec.head.is_empty(), "the fork printed nothing");
    for (i, &b) in rec.head.iter().enumerate() {
        let want = tiny::count_char(c.last_printed + 1 + i as u64);
        assert_eq!(
            b, want,
            "fork byte {i}: got {:?}, want {:?} (template printed up to {})",
            b as char, want as char, c.last_printed
        );
    }
    let last_printed = c.last_printed + rec.total as u64;
    let rcx = vm.vcpus()[0].fd().get_regs().unwrap().rcx;
    assert!(
        rcx == last_printed || rcx == last_printed + 1,
        "rcx {rcx}, printed up to {last_printed}"
    );
    let stored: u64 = vm
        .ram()
        .memory()
        .read_obj(GuestAddress(tiny::COUNTER_ADDR))
        .unwrap();
    assert!(
        stored == rcx || stored + 1 == rcx,
        "stored {stored}, rcx {rcx}"
    );
}

#[test]
fn a_fork_continues_exactly_where_the_template_stopped() {
    let _one = serial();
    let kvm = kvm();
    let c = counting_template(&kvm, 1, 500);
    let before = template_counter(&c.template);

    // Restored state is the captured state, before anything runs.
    let restored = fork::restore(
        &kvm,
        &c.template,
        Box::new(std::io::sink()),
        None,
        NetBackend::Disconnected,
    )
    .unwrap();
    let saved = &c.template.state().vcpus[0];
    let fd = restored.vm.vcpus()[0].fd();
    assert_eq!(fd.get_regs().unwrap(), saved.regs);
    let sregs = fd.get_sregs().unwrap();
    assert_eq!(
        (sregs.cr0, sregs.cr3, sregs.cr4),
        (saved.sregs.cr0, saved.sregs.cr3, saved.sregs.cr4)
    );
    assert_eq!(sregs.efer, saved.sregs.efer);
    assert!(restored.timings.total() > Duration::ZERO);
    drop(restored);

    let (running, console) = start_fork(&kvm, &c);
    console.wait_for(300);
    let (end, vm) = running.stop_and_keep();
    assert_eq!(end, GuestEnd::Stopped);
    assert_continues(&c, &console, &vm);
    assert!(vm.vcpus()[0].fd().get_regs().unwrap().rcx > c.last_printed + 300);
    // The fork wrote its counter hundreds of times; the template's memory never saw it.
    assert_eq!(template_counter(&c.template), before);
}

#[test]
fn a_shell_prepared_ahead_forks_the_same_and_only_for_its_template() {
    let _one = serial();
    let kvm = kvm();
    let c = counting_template(&kvm, 1, 100);
    let other = counting_template(&kvm, 1, 10);
    let shell = fork::Shell::build(&kvm, &c.template).unwrap();
    let wrong = fork::Shell::build(&kvm, &other.template).unwrap();
    assert!(matches!(
        wrong.finish(
            &c.template,
            Box::new(std::io::sink()),
            None,
            NetBackend::Disconnected
        ),
        Err(fork::RestoreError::OtherTemplate)
    ));
    let console = Recorder::default();
    let restored = shell
        .finish(
            &c.template,
            Box::new(console.clone()),
            None,
            NetBackend::Disconnected,
        )
        .unwrap();
    assert!(restored.timings.shell_build() > Duration::ZERO);
    assert!(restored.timings.finish() > Duration::ZERO);
    let running = restored.vm.start().unwrap();
    console.wait_for(100);
    let (_, vm) = running.stop_and_keep();
    assert_continues(&c, &console, &vm);
}

#[test]
fn capture_completes_a_port_read_the_vmm_already_answered() {
    let _one = serial();
    let kvm = kvm();
    let machine = MachineConfig::new(32, 1).unwrap();
    let mut vm = Vm::create(&kvm, machine, Irqchip::InKernel, Box::new(std::io::sink())).unwrap();
    tiny::load(vm.ram().memory(), tiny::Ending::Count).unwrap();
    vm.vcpus()[0]
        .configure_cpu(vm.supported_cpuid(), 1)
        .unwrap();
    tiny::setup_vcpu(&vm.vcpus()[0]).unwrap();
    // Run by hand up to the guest's `in` and answer it, but do not re-enter the guest: the
    // state a stopped VM is in when its vCPU thread saw the stop flag after an exit.
    loop {
        match vm.vcpus_mut()[0].fd_mut().run().unwrap() {
            VcpuExit::IoIn(port, data) if port == tiny::COUNT_STATUS_PORT => {
                data[0] = 0x60;
                break;
            }
            _ => {}
        }
    }
    // KVM moves past an `in` only when it completes it, on the next KVM_RUN.
    let at_in = vm.vcpus()[0].fd().get_regs().unwrap().rip;
    let template = fork::capture(&kvm, vm).unwrap();
    let regs = template.state().vcpus[0].regs;
    assert_eq!(
        regs.rip,
        at_in + 1,
        "captured at the `in`: a fork would read again"
    );
    assert_eq!(regs.rax & 0xff, 0x60, "the answer the VMM gave was lost");
}

#[test]
fn template_memory_is_sealed_and_forks_writes_stay_private() {
    let _one = serial();
    let kvm = kvm();
    let c = counting_template(&kvm, 1, 100);
    let memory = c.template.memory();
    SealedMemory::from_sealed(memory.file().clone(), memory.size()).expect("sealed");
    assert!(
        memory.file().write_at(&[1], 0x6000).is_err(),
        "memfd writable"
    );

    let a = fork::restore(
        &kvm,
        &c.template,
        Box::new(std::io::sink()),
        None,
        NetBackend::Disconnected,
    )
    .unwrap();
    let b = fork::restore(
        &kvm,
        &c.template,
        Box::new(std::io::sink()),
        None,
        NetBackend::Disconnected,
    )
    .unwrap();
    let marker = GuestAddress(0x6000);
    a.vm.ram()
        .memory()
        .write_obj(0xa5a5_a5a5_u32, marker)
        .unwrap();
    b.vm.ram()
        .memory()
        .write_obj(0x5b5b_5b5b_u32, marker)
        .unwrap();
    assert_eq!(
        a.vm.ram().memory().read_obj::<u32>(marker).unwrap(),
        0xa5a5_a5a5
    );
    assert_eq!(
        b.vm.ram().memory().read_obj::<u32>(marker).unwrap(),
        0x5b5b_5b5b
    );
    let mut buf = [0u8; 4];
    memory.file().read_exact_at(&mut buf, 0x6000).unwrap();
    assert_eq!(buf, [0; 4], "a fork's write reached the template");
    // A fork started after its sibling wrote still sees the template's bytes.
    let c2 = fork::restore(
        &kvm,
        &c.template,
        Box::new(std::io::sink()),
        None,
        NetBackend::Disconnected,
    )
    .unwrap();
    assert_eq!(c2.vm.ram().memory().read_obj::<u32>(marker).unwrap(), 0);
}

#[test]
fn many_forks_run_at_once_each_from_the_same_point() {
    let _one = serial();
    let kvm = kvm();
    let c = counting_template(&kvm, 1, 200);
    let before = template_counter(&c.template);
    let forks: Vec<_> = (0..8).map(|_| start_fork(&kvm, &c)).collect();
    for (_, console) in &forks {
        console.wait_for(100);
    }
    let mut counters = Vec::new();
    for (running, console) in forks {
        let (end, vm) = running.stop_and_keep();
        assert_eq!(end, GuestEnd::Stopped);
        assert_continues(&c, &console, &vm);
        counters.push(
            vm.ram()
                .memory()
                .read_obj::<u64>(GuestAddress(tiny::COUNTER_ADDR))
                .unwrap(),
        );
    }
    // Each fork counted in its own memory (they ran for different lengths).
    assert!(counters.iter().all(|&n| n > before + 50), "{counters:?}");
    assert_eq!(template_counter(&c.template), before);
}

#[test]
fn a_two_vcpu_machine_round_trips() {
    let _one = serial();
    let kvm = kvm();
    let c = counting_template(&kvm, 2, 100);
    let state = c.template.state();
    assert_eq!(state.vcpus.len(), 2);
    let restored = fork::restore(
        &kvm,
        &c.template,
        Box::new(std::io::sink()),
        None,
        NetBackend::Disconnected,
    )
    .unwrap();
    for (vcpu, saved) in restored.vm.vcpus().iter().zip(&state.vcpus) {
        let fd = vcpu.fd();
        assert_eq!(fd.get_regs().unwrap(), saved.regs, "vCPU {}", saved.index);
        assert_eq!(fd.get_mp_state().unwrap().mp_state, saved.mp_state.mp_state);
        let lapic = fd.get_lapic().unwrap();
        // APIC ID (0x20) and the LVT/SVR registers come back as captured.
        assert_eq!(lapic.regs[0x20..0x40], saved.lapic.regs[0x20..0x40]);
        assert_eq!(lapic.regs[0xf0..0xf4], saved.lapic.regs[0xf0..0xf4]);
        assert_eq!(lapic.regs[0x350..0x370], saved.lapic.regs[0x350..0x370]);
    }
}

fn fd_census() -> (usize, usize) {
    let mut fds = 0;
    let mut memfds = 0;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        fds += 1;
        if let Ok(target) = std::fs::read_link(entry.path()) {
            if target.to_string_lossy().starts_with("/memfd:") {
                memfds += 1;
            }
        }
    }
    (fds, memfds)
}

#[test]
fn destroying_forks_in_any_order_leaves_no_fds_or_memfds() {
    let _one = serial();
    let kvm = kvm();
    let start = fd_census();
    let c = counting_template(&kvm, 1, 50);
    let with_template = fd_census();
    assert_eq!(with_template.1, start.1 + 1, "the template holds one memfd");

    let mut forks: Vec<Option<(RunningVm, Recorder)>> =
        (0..6).map(|_| Some(start_fork(&kvm, &c))).collect();
    assert!(fd_census().0 > with_template.0);
    for (_, console) in forks.iter().flatten() {
        console.wait_for(10);
    }
    for i in [3, 0, 5, 1, 4, 2] {
        let (running, _) = forks[i].take().unwrap();
        assert_eq!(running.stop(), GuestEnd::Stopped);
    }
    assert_eq!(fd_census(), with_template, "forks left fds behind");
    drop(c);
    assert_eq!(fd_census(), start, "the template left fds behind");
}

fn memfds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|t| t.to_string_lossy().starts_with("/memfd:"))
        .count()
}

/// How a test's workers are started: exec'd and sent the template, or forked from a
/// zygote that holds it.
#[derive(Debug, Clone, Copy)]
enum Start {
    Exec,
    Zygote,
}

#[test]
fn forks_run_in_their_own_processes_and_leave_nothing_behind() {
    let _one = serial();
    let kvm = kvm();
    let c = counting_template(&kvm, 1, 100);
    let with_template = fd_census();
    for start in [Start::Exec, Start::Zygote] {
        forks_in_their_own_processes(&c, start);
        assert_eq!(
            fd_census(),
            with_template,
            "{start:?} workers left fds behind"
        );
    }
}

fn forks_in_their_own_processes(c: &Captured, start: Start) {
    let encoded = Encoded::new(&c.template).unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_cleave-fork-worker"));
    let zygote = matches!(start, Start::Zygote).then(|| Zygote::start(exe, &encoded).unwrap());

    let mut workers: Vec<Option<Worker>> = (0..4)
        .map(|_| match &zygote {
            Some(z) => Some(z.spawn(None).unwrap()),
            None => {
                let mut w = Worker::spawn(exe).unwrap();
                w.load(&encoded).unwrap();
                Some(w)
            }
        })
        .collect();
    let mut pids = HashSet::new();
    for w in workers.iter_mut().flatten() {
        let ready = w.go(None).unwrap();
        assert_eq!(ready.pid, w.pid());
        assert_ne!(ready.pid, std::process::id());
        assert!(pids.insert(ready.pid), "two forks in one process");
        // Ours to reap, however it was started.
        assert_eq!(parent_of(ready.pid), std::process::id(), "{start:?}");
        // The worker holds the template's memory and nothing else of ours.
        assert_eq!(memfds_of(ready.pid), 1);
    }
    // Every fork's guest is running in its own process: its exit counters move.
    for w in workers.iter_mut().flatten() {
        let before = w.probe().unwrap().io_out;
        let deadline = Instant::now() + Duration::from_secs(30);
        while w.probe().unwrap().io_out <= before {
            assert!(
                Instant::now() < deadline,
                "fork in {} is not running",
                w.pid()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    for i in [2, 0, 3, 1] {
        let w = workers[i].take().unwrap();
        let pid = w.pid();
        let status = w.destroy().unwrap();
        assert!(status.success(), "worker {pid}: {status}");
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
    if let Some(z) = zygote {
        let pid = z.pid();
        drop(z);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "zygote not reaped"
        );
    }
}

/// `pid`'s parent, from /proc/<pid>/stat (the field after the parenthesised name).
fn parent_of(pid: u32) -> u32 {
    proc_status::name_and_parent(pid).unwrap().1
}

/// The socket inodes `pid` holds.
fn sockets_of(pid: u32) -> HashSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .filter(|t| t.starts_with("socket:"))
        .collect()
}

/// Thread `tid`'s scheduling policy: field 41 of its `stat`, the 39th after the name.
fn policy(tid: u32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{tid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 1..];
    after_name
        .split_whitespace()
        .nth(38)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_zygotes_workers_cannot_reach_it_and_outlive_it() {
    let _one = serial();
    let kvm = kvm();
    let c = counting_template(&kvm, 1, 100);
    let encoded = Encoded::new(&c.template).unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_cleave-fork-worker"));
    let zygote = Zygote::start(exe, &encoded).unwrap();
    let zpid = zygote.pid();
    let mut a = zygote.spawn(None).unwrap();
    let b = zygote.spawn(None).unwrap();
    // The zygote is under the process filter (one filter), and so is each worker it forks.
    let status = proc_status::status_field;
    assert_eq!(status(zpid, "Seccomp"), "2");
    assert_eq!(status(zpid, "Seccomp_filters"), "1");
    assert_eq!(status(a.pid(), "Seccomp_filters"), "1");
    // Prepared, before any `go`: its vCPU thread is parked and already under its own
    // filter on top of the process one, so no guest instruction runs unconfined.
    let thread = |pid: u32, name: &str| -> u32 {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .find(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
            })
            .and_then(|t| t.file_name().to_str()?.parse().ok())
            .unwrap_or_else(|| panic!("worker {pid} has no {name} thread"))
    };
    assert_eq!(status(thread(a.pid(), "vcpu0"), "Seccomp_filters"), "2");
    // Preparing and the guest are background work (SCHED_IDLE, 5): the zygote, the
    // prepared worker and its parked vCPU thread.
    let vcpu = thread(a.pid(), "vcpu0");
    for tid in [zpid, a.pid(), vcpu] {
        assert_eq!(policy(tid), libc::SCHED_IDLE, "thread {tid}");
    }
    let comm = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm(zpid), "cleave-zygote\n");
    assert_eq!(comm(a.pid()), "cleave-fork-wor\n");
    // A worker holds none of the zygote's sockets (its own: the one to us, its vsock
    // listener).
    let zygote_sockets = sockets_of(zpid);
    assert!(!zygote_sockets.is_empty());
    for w in [&a, &b] {
        let theirs = sockets_of(w.pid());
        assert!(
            theirs.is_disjoint(&zygote_sockets),
            "worker {} holds the zygote's socket: {theirs:?} / {zygote_sockets:?}",
            w.pid()
        );
    }
    // The zygote dies; its workers are ours and carry on.
    // SAFETY: kill(2) on our own unreaped child, no memory involved.
    assert_eq!(unsafe { libc::kill(zpid as libc::pid_t, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while zygote.is_alive() {
        assert!(
            Instant::now() < deadline,
            "the killed zygote is still alive"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    a.go(None).unwrap();
    let before = a.probe().unwrap().io_out;
    while a.probe().unwrap().io_out <= before {
        assert!(Instant::now() < deadline, "the orphaned fork does not run");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Running (it has answered a probe since `go`), its main thread is under its control
    // filter on top of the process one.
    assert_eq!(status(a.pid(), "Seccomp_filters"), "2");
    // The node moved the control thread out of the background class at `go` (SCHED_OTHER,
    // 0); the guest stays in it. Destroyed below, the worker moves itself back under its
    // control filter and exits cleanly: the filter allows that move.
    assert_eq!(policy(a.pid()), libc::SCHED_OTHER);
    assert_eq!(policy(vcpu), libc::SCHED_IDLE);
    // A dead zygote says so; it does not hang.
    let Err(e) = zygote.spawn(None) else {
        panic!("a dead zygote spawned a worker")
    };
    let e = e.to_string();
    assert!(e.contains("fork worker"), "{e}");
    for w in [a, b] {
        let status = w.destroy().unwrap();
        assert!(status.success(), "{status}");
    }
}

#[test]
fn a_node_without_cap_sys_nice_keeps_its_workers_out_of_the_idle_class() {
    let _one = serial();
    // Capabilities are per thread and a child starts with its parent thread's: with
    // CAP_SYS_NICE out of this thread's bounding set, neither the zygote it starts nor
    // that zygote's workers have it, as under a node not running as root. Such a node
    // could not move a worker out of the idle class at `go`, so none may enter it.
    std::thread::spawn(|| {
        const CAP_SYS_NICE: libc::c_ulong = 23;
        // SAFETY: prctl with integer arguments only; it changes this thread alone.
        let dropped = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_NICE, 0, 0, 0) };
        assert_eq!(dropped, 0);
        let kvm = kvm();
        let c = counting_template(&kvm, 1, 100);
        let encoded = Encoded::new(&c.template).unwrap();
        let exe = Path::new(env!("CARGO_BIN_EXE_cleave-fork-worker"));
        let zygote = Zygote::start(exe, &encoded).unwrap();
        let status = proc_status::status_field;
        let eff = u64::from_str_radix(&status(zygote.pid(), "CapEff"), 16).unwrap();
        assert_eq!(eff & (1 << CAP_SYS_NICE), 0, "the zygote has CAP_SYS_NICE");
        let mut w = zygote.spawn(None).unwrap();
        for tid in [zygote.pid(), w.pid()] {
            assert_eq!(policy(tid), libc::SCHED_OTHER, "thread {tid}");
        }
        w.go(None).unwrap();
        let before = w.probe().unwrap().io_out;
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.probe().unwrap().io_out <= before {
            assert!(Instant::now() < deadline, "the fork does not run");
            std::thread::sleep(Duration::from_millis(1));
        }
        let exit = w.destroy().unwrap();
        assert!(exit.success(), "{exit}");
    })
    .join()
    .unwrap();
}

#[test]
fn template_state_survives_the_wire_and_bad_states_are_refused() {
    let _one = serial();
    let kvm = kvm();
    let c = counting_template(&kvm, 2, 10);
    let state = c.template.state();
    let bytes = serde_json::to_vec(state).unwrap();
    let back: fork::MachineState = serde_json::from_slice(&bytes).unwrap();
    back.validate().unwrap();
    assert_eq!(serde_json::to_vec(&back).unwrap(), bytes);
    assert_eq!(back.vcpus[1].regs, state.vcpus[1].regs);
    assert_eq!(
        back.vcpus[0].msrs.as_slice(),
        state.vcpus[0].msrs.as_slice()
    );
    let mut missing = back.clone();
    missing.vcpus.pop();
    assert!(missing.validate().is_err());
    let mut swapped = back;
    swapped.vcpus.swap(0, 1);
    assert!(swapped.validate().unwrap_err().contains("vCPU state 0"));
}

#[test]
fn a_stored_template_loads_sealed_and_its_forks_continue_exactly() {
    use cleave_agent::fork::store::{TemplateMeta, TemplateStore};
    use cleave_agent::host::fingerprint::HostFingerprint;
    let _one = serial();
    let kvm = kvm();
    let c = counting_template(&kvm, 1, 200);
    let dir = tempfile::tempdir().unwrap();
    let store = TemplateStore::at(dir.path().join("templates"));
    let meta = TemplateMeta {
        name: "tiny".parse().unwrap(),
        created: 0,
        mem_mib: c.template.state().machine.mem.mib(),
        vcpus: 1,
        kernel_sha256: "none".into(),
        initrd_sha256: "none".into(),
        cmdline: String::new(),
        warmup: None,
        format: cleave_agent::fork::state::STATE_FORMAT,
        host: Some(HostFingerprint::current().unwrap().clone()),
        image: None,
        defaults: Default::default(),
    };
    store.save(&c.template, &meta).unwrap();
    let e = store.save(&c.template, &meta).unwrap_err();
    assert!(e.to_string().contains("exists already"), "{e}");
    let (loaded, back) = store.load(&meta.name).unwrap();
    assert_eq!(back, meta);
    assert_eq!(store.list().unwrap(), vec![meta.clone()]);
    // The loaded template is a different memfd, sealed, with the same bytes.
    assert!(!Arc::ptr_eq(
        loaded.memory().file(),
        c.template.memory().file()
    ));
    assert_eq!(template_counter(&loaded), template_counter(&c.template));
    assert!(loaded.memory().file().write_at(&[1], 0).is_err(), "sealed");

    let reloaded = Captured {
        template: loaded,
        last_printed: c.last_printed,
    };
    let (running, console) = start_fork(&kvm, &reloaded);
    console.wait_for(100);
    let (_, vm) = running.stop_and_keep();
    assert_continues(&reloaded, &console, &vm);
    store.remove(&meta.name).unwrap();
    assert!(store.list().unwrap().is_empty());

    // Captured elsewhere, or by another template format: refused before any restore, with
    // the difference named.
    let mut other_host = meta.clone();
    other_host.name = "elsewhere".parse().unwrap();
    other_host.host.as_mut().unwrap().kernel_release = "5.10.0-other".into();
    store.save(&c.template, &other_host).unwrap();
    let e = store.load(&other_host.name).unwrap_err().to_string();
    assert!(
        e.contains("cannot be forked on this host") && e.contains("5.10.0-other"),
        "{e}"
    );
    let mut old_format = meta.clone();
    old_format.name = "old".parse().unwrap();
    old_format.format = 1;
    store.save(&c.template, &old_format).unwrap();
    let e = store.load(&old_format.name).unwrap_err().to_string();
    assert!(e.contains("template format 1"), "{e}");
}
