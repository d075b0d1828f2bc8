//! seccomp filters for a fork worker's threads, one per kind of thread, each allowing the
//! system calls (and, for `ioctl` and `socket`, the arguments) that kind makes once the
//! guest runs, and nothing else:
//!
//! - **vCPU**: `KVM_RUN`, eventfd writes for queue notifications and interrupts, locks,
//!   memory for the allocator, and ending the thread;
//! - **events** (the device event loop): epoll, reads and writes on eventfds, timerfds,
//!   the tap and vsock streams, accepting host connections on the vsock socket and
//!   connecting (Unix sockets only) to the host side of a guest's connection;
//! - **control** (the worker's main thread): its socket to the parent, kicking and joining
//!   the vCPU threads, and tearing the VM down.
//!
//! Under those, a worker forked from a zygote also runs under the **process** filter
//! ([`ProcessFilter`]), which the zygote installs on itself once: everything a zygote and
//! a worker call at any point, including jailing itself and building its VM (no `execve`,
//! `ptrace`, `bpf`, `process_vm_*`, module, key or io_uring calls, no sockets but Unix
//! ones). Besides confining the zygote and each worker before its thread filters apply,
//! it makes those cheaper to install: the kernel pre-computes a filter's action for
//! every system call number at attach, but only for the numbers the filters already
//! installed allow, ~120 of ~460.
//!
//! A thread installs its own filter before it does anything on the guest's behalf (a
//! vCPU before its first `KVM_RUN`, the event loop before its first wait, the main thread
//! as soon as the VM runs), so no thread inherits a wider filter from its creator. A call
//! outside the filter raises SIGSYS; [`install_violation_handler`] turns that into a line
//! on stderr naming the thread and the call, and ends the whole worker with
//! [`VIOLATION_EXIT`], which the parent reports.

use std::cell::Cell;
use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The exit status of a worker ended by a seccomp violation (as a shell reports a death
/// by SIGSYS).
pub const VIOLATION_EXIT: i32 = 128 + libc::SIGSYS;

/// The kinds of thread a running fork has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ThreadKind {
    Vcpu = 1,
    Events = 2,
    Control = 3,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vcpu, ThreadKind::Events, ThreadKind::Control];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Events => "events",
            ThreadKind::Control => "control",
        }
    }

    fn from_byte(b: u8) -> Option<ThreadKind> {
        Self::ALL.into_iter().find(|k| *k as u8 == b)
    }
}

impl std::str::FromStr for ThreadKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("{s:?} is not a thread kind (vcpu, events, control)"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {kind} thread's seccomp filter: {source}")]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("compiling the {kind} thread's seccomp filter: {source}")]
    Compile {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("installing the {kind} thread's seccomp filter: {source}")]
    Apply {
        kind: &'static str,
        source: seccompiler::Error,
    },
}

/// The compiled filters, built once per worker before the fork starts.
#[derive(Debug, Clone)]
pub struct Filters {
    vcpu: BpfProgram,
    events: BpfProgram,
    control: BpfProgram,
}

thread_local! {
    /// Which filter this thread runs under, for the violation message (read in the signal
    /// handler: a plain, const-initialised thread-local).
    static CONFINED_AS: Cell<u8> = const { Cell::new(0) };
}

impl Filters {
    pub fn build() -> Result<Filters, SeccompError> {
        Ok(Filters {
            vcpu: compile(ThreadKind::Vcpu)?,
            events: compile(ThreadKind::Events)?,
            control: compile(ThreadKind::Control)?,
        })
    }

    /// Confines the calling thread (and every thread it creates afterwards) to `kind`'s
    /// filter, for good.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let prog = match kind {
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::Events => &self.events,
            ThreadKind::Control => &self.control,
        };
        CONFINED_AS.with(|c| c.set(kind as u8));
        seccompiler::apply_filter(prog).map_err(|source| SeccompError::Apply {
            kind: kind.name(),
            source,
        })?;
        fault::after_apply(kind);
        Ok(())
    }

    /// The number of BPF instructions of `kind`'s filter (for tests and docs).
    pub fn len(&self, kind: ThreadKind) -> usize {
        match kind {
            ThreadKind::Vcpu => self.vcpu.len(),
            ThreadKind::Events => self.events.len(),
            ThreadKind::Control => self.control.len(),
        }
    }
}

/// The filter over a zygote and every worker it forks (see the module docs).
#[derive(Debug, Clone)]
pub struct ProcessFilter(BpfProgram);

impl ProcessFilter {
    pub fn build() -> Result<ProcessFilter, SeccompError> {
        compile_rules(PROCESS_NAME, process_rules()?).map(ProcessFilter)
    }

    /// Confines the calling thread and every thread and process it creates afterwards.
    /// Call while the process has one thread: the others would stay outside.
    pub fn apply(&self) -> Result<(), SeccompError> {
        seccompiler::apply_filter(&self.0).map_err(|source| SeccompError::Apply {
            kind: PROCESS_NAME,
            source,
        })
    }
}

/// The process filter's name in errors.
const PROCESS_NAME: &str = "worker process";

fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    compile_rules(kind.name(), rules(kind)?)
}

fn compile_rules(kind: &'static str, rules: Rules) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| SeccompError::Build { kind, source })?;
    filter
        .try_into()
        .map_err(|source| SeccompError::Compile { kind, source })
}

/// `KVM_RUN`: `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Every thread: the allocator, locks, time, logging to stderr, signal return (the vCPU
/// kick, the violation handler), the thread's own exit (std frees its signal stack).
const COMMON: &[libc::c_long] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The event loop's calls beyond [`COMMON`] (`ioctl` and `socket` are argument-checked).
const EVENTS: &[libc::c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_timerfd_settime,
];

/// The main thread's calls beyond [`COMMON`] once the fork runs.
const CONTROL: &[libc::c_long] = &[
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
];

/// What a zygote and its workers call beyond every thread kind's calls: the zygote's loop
/// (its socket, `clone3`, counting its threads), and a worker's life before its threads
/// confine themselves (opening KVM, its runtime directory and vsock socket, the jail,
/// building the VM, starting threads), and the error paths of both (removing a runtime
/// directory, logging).
const PROCESS: &[libc::c_long] = &[
    // Files and directories: /dev/kvm, /proc/self, the runtime directory.
    libc::SYS_openat,
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_lseek,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_chown,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_close_range,
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    // The vsock device's Unix socket.
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_getsockname,
    libc::SYS_setsockopt,
    // The jail.
    libc::SYS_unshare,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chdir,
    libc::SYS_setgroups,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_prctl,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_prlimit64,
    libc::SYS_setrlimit,
    libc::SYS_getrlimit,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    // The VM and its threads.
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_gettime,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_rt_sigaction,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_restart_syscall,
    // Each thread installing its own filter on top.
    libc::SYS_seccomp,
];

/// The process filter's rules: every thread kind's calls and [`PROCESS`]; `socket` only
/// for Unix sockets, `ioctl` and `fcntl` with any argument (KVM's and the tap's ioctls
/// are many; the thread filters narrow them).
fn process_rules() -> Result<Rules, SeccompError> {
    let mut all: Rules = Rules::new();
    for kind in ThreadKind::ALL {
        for (nr, _) in rules(kind)? {
            all.insert(nr, vec![]);
        }
    }
    all.extend(PROCESS.iter().map(|&n| (n, vec![])));
    let unix_only = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(|source| SeccompError::Build {
        kind: PROCESS_NAME,
        source,
    })?;
    all.insert(libc::SYS_socket, vec![unix_only]);
    all.insert(
        libc::SYS_sched_setscheduler,
        vec![into_background(PROCESS_NAME)?],
    );
    Ok(all)
}

fn rules(kind: ThreadKind) -> Result<Rules, SeccompError> {
    let err = |source| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    let mut rules: Rules = COMMON.iter().map(|&n| (n, vec![])).collect();
    let extra = match kind {
        ThreadKind::Vcpu => &[][..],
        ThreadKind::Events => EVENTS,
        ThreadKind::Control => CONTROL,
    };
    rules.extend(extra.iter().map(|&n| (n, vec![])));
    let arg_is = |index, value| {
        SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(err)
    };
    // Debug builds of std check that an fd is open (F_GETFD) when one is adopted.
    let mut fcntl = vec![arg_is(1, libc::F_GETFD as u64)?];
    match kind {
        ThreadKind::Vcpu => {
            rules.insert(libc::SYS_ioctl, vec![arg_is(1, KVM_RUN)?]);
        }
        ThreadKind::Events => {
            // Accepted vsock streams are made non-blocking.
            rules.insert(libc::SYS_ioctl, vec![arg_is(1, libc::FIONBIO)?]);
            for cmd in [libc::F_GETFL, libc::F_SETFL] {
                fcntl.push(arg_is(1, cmd as u64)?);
            }
            // The host side of a guest-initiated vsock connection: a Unix socket only.
            rules.insert(libc::SYS_socket, vec![arg_is(0, libc::AF_UNIX as u64)?]);
        }
        ThreadKind::Control => {
            // Into the background class for the teardown.
            rules.insert(
                libc::SYS_sched_setscheduler,
                vec![into_background(kind.name())?],
            );
        }
    }
    rules.insert(libc::SYS_fcntl, fcntl);
    Ok(rules)
}

/// `sched_setscheduler(0, SCHED_IDLE, _)`: the calling thread into the background class
/// (`host::sched`), never another task and never out of it (the node does that).
fn into_background(kind: &'static str) -> Result<SeccompRule, SeccompError> {
    [(0, 0), (1, libc::SCHED_IDLE as u64)]
        .map(|(arg, value)| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        })
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .and_then(SeccompRule::new)
        .map_err(|source| SeccompError::Build { kind, source })
}

/// Installs the SIGSYS handler that reports a violation and ends the worker. Call once,
/// before any filter is applied.
pub fn install_violation_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; we then set the
    // handler and flags, and pass valid pointers to sigaction.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_violation as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `si_code` of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: i32 = 1;

/// Async-signal-safe: formats into a stack buffer, one `write`, then `_exit` (both allowed
/// by every filter).
extern "C" fn on_violation(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t. For SIGSYS with SYS_SECCOMP, the union
    // after the three ints (and padding, at byte 16) holds `_call_addr` (8 bytes) and then
    // `_syscall` (an int, at byte 24) on x86_64.
    let (code, nr) = unsafe {
        let code = (*info).si_code;
        let nr = std::ptr::read_unaligned((info as *const u8).add(24) as *const i32);
        (code, nr)
    };
    let kind = ThreadKind::from_byte(CONFINED_AS.with(Cell::get))
        .map_or("not yet confined", ThreadKind::name);
    let mut msg = Message::default();
    if code == SYS_SECCOMP {
        msg.push(b"cleave-fork-worker: seccomp: the ");
        msg.push(kind.as_bytes());
        msg.push(b" thread called system call ");
        msg.push_number(i64::from(nr));
        msg.push(b", which its filter does not allow; ending the fork\n");
    } else {
        msg.push(b"cleave-fork-worker: SIGSYS sent by another process; ending the fork\n");
    }
    // SAFETY: write and _exit take plain values and a pointer into our own buffer.
    unsafe {
        libc::write(2, msg.buf.as_ptr().cast(), msg.len);
        libc::_exit(VIOLATION_EXIT);
    }
}

/// A fixed buffer the signal handler formats into (no allocation).
struct Message {
    buf: [u8; 160],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Message {
            buf: [0; 160],
            len: 0,
        }
    }
}

impl Message {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Test builds only: `CLEAVE_TEST_FORBIDDEN_SYSCALL=<kind>` makes the first thread of that
/// kind make a call its filter forbids right after confining itself (an Internet
/// socket: refused by every filter, including the event loop's Unix-only rule), so tests
/// can watch a real violation end a real worker. Release builds ignore it.
mod fault {
    use super::ThreadKind;

    #[cfg(debug_assertions)]
    pub fn after_apply(kind: ThreadKind) {
        let wanted = std::env::var("CLEAVE_TEST_FORBIDDEN_SYSCALL").ok();
        if wanted.as_deref() == Some(kind.name()) {
            // SAFETY: socket takes integers only; under the filter it never returns.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        }
    }

    #[cfg(not(debug_assertions))]
    pub fn after_apply(_: ThreadKind) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_and_vcpu_is_the_narrowest() {
        let f = Filters::build().unwrap();
        for k in ThreadKind::ALL {
            assert!(f.len(k) > 0, "{k:?}");
        }
        assert!(f.len(ThreadKind::Vcpu) < f.len(ThreadKind::Events));
    }

    #[test]
    fn only_the_event_loop_may_open_sockets_and_only_unix_ones() {
        for k in ThreadKind::ALL {
            let r = rules(k).unwrap();
            assert_eq!(r.contains_key(&libc::SYS_socket), k == ThreadKind::Events);
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_ptrace,
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_bind,
                libc::SYS_mount,
                libc::SYS_process_vm_writev,
            ] {
                assert!(!r.contains_key(&forbidden), "{k:?} allows {forbidden}");
            }
        }
    }

    #[test]
    fn the_process_filter_allows_every_threads_calls_and_no_dangerous_one() {
        ProcessFilter::build().unwrap();
        let process = process_rules().unwrap();
        for k in ThreadKind::ALL {
            for nr in rules(k).unwrap().keys() {
                assert!(
                    process.contains_key(nr),
                    "{k:?} needs {nr}, the process filter refuses it"
                );
            }
        }
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_kexec_load,
            libc::SYS_open_by_handle_at,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_io_uring_setup,
            libc::SYS_userfaultfd,
            libc::SYS_setns,
            libc::SYS_clone,
            libc::SYS_fork,
        ] {
            assert!(!process.contains_key(&forbidden), "allows {forbidden}");
        }
        // Sockets: Unix only (one argument-checked rule).
        assert_eq!(process[&libc::SYS_socket].len(), 1);
    }

    #[test]
    fn only_the_control_thread_may_change_its_scheduling_class_and_only_to_idle() {
        for k in ThreadKind::ALL {
            let r = rules(k).unwrap();
            let rule = r.get(&libc::SYS_sched_setscheduler);
            match k {
                // One rule: pid 0 (itself) and SCHED_IDLE, both checked.
                ThreadKind::Control => assert_eq!(rule.map(Vec::len), Some(1)),
                ThreadKind::Vcpu | ThreadKind::Events => assert!(rule.is_none(), "{k:?}"),
            }
        }
        // Before the thread filters, the same one rule (the zygote, the worker preparing).
        assert_eq!(
            process_rules().unwrap()[&libc::SYS_sched_setscheduler].len(),
            1
        );
        assert!(!process_rules()
            .unwrap()
            .contains_key(&libc::SYS_sched_setattr));
    }

    #[test]
    fn thread_kinds_parse_by_name() {
        for k in ThreadKind::ALL {
            assert_eq!(k.name().parse::<ThreadKind>(), Ok(k));
        }
        assert!("gpu".parse::<ThreadKind>().is_err());
    }

    #[test]
    fn the_handler_formats_numbers_without_allocating() {
        let mut m = Message::default();
        m.push(b"nr ");
        m.push_number(41);
        m.push(b" ");
        m.push_number(-7);
        m.push(b" ");
        m.push_number(0);
        assert_eq!(&m.buf[..m.len], b"nr 41 -7 0");
        let mut full = Message::default();
        for _ in 0..100 {
            full.push(b"xxxx");
        }
        assert_eq!(full.len, full.buf.len());
    }
}
