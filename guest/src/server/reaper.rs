//! The one place in the agent that waits for children.
//!
//! As PID 1 the agent inherits every orphan in the guest and must reap them
//! all, and the exec code needs the exit status of its own children. Two
//! waiters racing on `waitpid` would steal each other's statuses, so the
//! [`Reaper`] owns `waitpid(-1)` for the whole process: a dedicated thread
//! reaps every child that exits and hands the status of a *registered* pid
//! to whoever registered it; unregistered pids (orphans) are just reaped.
//!
//! Rules for the rest of the process, once a reaper runs:
//! - create children only through [`Reaper::spawn`] (registration happens
//!   under the same lock the reaper takes before delivering, so a child
//!   that dies at once is never lost);
//! - never call `waitpid`/`std::process::Child::wait` (and so never
//!   `std::process::Command`, which waits internally when `exec` fails).
//!
//! The thread blocks in `waitpid(-1)` rather than using a `signalfd`: that
//! needs `SIGCHLD` blocked in every thread of the process, which a test
//! harness (or any library thread) does not guarantee.
//!
//! Outside PID 1 (tests, tools) [`Reaper::start`] makes the process a child
//! subreaper, so orphaned grandchildren come back to it as they would to
//! PID 1, and are reaped here too.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::protocol::ExitStatus;

/// How long the reaper sleeps when it has no children at all before it
/// looks again, in case a child was created without [`Reaper::spawn`].
const IDLE_RECHECK: Duration = Duration::from_millis(500);

struct Inner {
    registry: Mutex<Registry>,
    spawned: Condvar,
}

#[derive(Default)]
struct Registry {
    waiting: HashMap<i32, SyncSender<ExitStatus>>,
    /// Bumped on every spawn, so the thread can tell a new child appeared
    /// between a `waitpid` that said "no children" and its sleep.
    generation: u64,
    orphans_reaped: u64,
}

/// Handle to the process-wide reaper; cheap to copy.
#[derive(Clone, Copy)]
pub struct Reaper {
    inner: &'static Inner,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

impl Reaper {
    /// Starts the reaper thread the first time; later calls return the same
    /// reaper. Call it before creating any child.
    pub fn start() -> Reaper {
        *REAPER.get_or_init(|| {
            if std::process::id() != 1 {
                // Not PID 1: adopt our orphaned descendants, as PID 1 would.
                if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
                    tracing::warn!("cannot become a child subreaper: {e}");
                }
            }
            let inner: &'static Inner = Box::leak(Box::new(Inner {
                registry: Mutex::new(Registry::default()),
                spawned: Condvar::new(),
            }));
            thread::Builder::new()
                .name("cleave-reaper".into())
                .spawn(move || reap_forever(inner))
                .expect("spawning the reaper thread");
            Reaper { inner }
        })
    }

    /// Runs `fork` (which creates exactly one child and returns its pid)
    /// with the registry locked, and registers that pid. The returned
    /// [`ExitWatch`] receives its exit status.
    pub fn spawn<T, E>(
        &self,
        fork: impl FnOnce() -> Result<(Pid, T), E>,
    ) -> Result<(T, ExitWatch), E> {
        let mut reg = self.lock();
        let (pid, value) = fork()?;
        let (tx, rx) = mpsc::sync_channel(1);
        reg.waiting.insert(pid.as_raw(), tx);
        reg.generation += 1;
        self.inner.spawned.notify_all();
        Ok((value, ExitWatch { pid, rx }))
    }

    /// Tells the reaper that a child was created some other way, so it stops
    /// idling at once (it would notice within a second anyway).
    pub fn notify_child_created(&self) {
        let mut reg = self.lock();
        reg.generation += 1;
        self.inner.spawned.notify_all();
    }

    /// How many unregistered children (orphans) were reaped so far.
    pub fn orphans_reaped(&self) -> u64 {
        self.lock().orphans_reaped
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// The exit of one registered child.
pub struct ExitWatch {
    pid: Pid,
    rx: Receiver<ExitStatus>,
}

impl ExitWatch {
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Blocks until the child has exited and been reaped.
    pub fn wait(&self) -> ExitStatus {
        // The sender lives in the registry until it is used, and the
        // registry lives for the whole process.
        self.rx
            .recv()
            .expect("the reaper keeps the sender until the child exits")
    }

    /// Like [`ExitWatch::wait`], giving up after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        match self.rx.recv_timeout(timeout) {
            Ok(s) => Some(s),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                unreachable!("the reaper keeps the sender until the child exits")
            }
        }
    }
}

fn reap_forever(inner: &'static Inner) {
    loop {
        let generation = lock(inner).generation;
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) => deliver(inner, pid, ExitStatus::Code(code)),
            Ok(WaitStatus::Signaled(pid, sig, _core)) => {
                deliver(inner, pid, ExitStatus::Signal(sig as i32))
            }
            // Without WUNTRACED/WCONTINUED only exits are reported.
            Ok(_) | Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => {
                let reg = lock(inner);
                if reg.generation == generation {
                    let _ = inner.spawned.wait_timeout(reg, IDLE_RECHECK);
                }
            }
            Err(e) => {
                tracing::error!("waitpid failed: {e}");
                thread::sleep(IDLE_RECHECK);
            }
        }
    }
}

fn deliver(inner: &Inner, pid: Pid, status: ExitStatus) {
    let mut reg = lock(inner);
    match reg.waiting.remove(&pid.as_raw()) {
        // Capacity 1 and one status per pid: never blocks. A dropped watch
        // just means nobody cares any more.
        Some(tx) => {
            let _ = tx.try_send(status);
        }
        None => {
            reg.orphans_reaped += 1;
            tracing::debug!(pid = pid.as_raw(), ?status, "reaped orphan");
        }
    }
}

fn lock(inner: &Inner) -> std::sync::MutexGuard<'_, Registry> {
    inner.registry.lock().unwrap_or_else(|e| e.into_inner())
}
