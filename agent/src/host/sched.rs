//! The scheduling class of the calling thread.
//!
//! A node's two CPUs (or two hundred) are shared by two kinds of work. What a request
//! waits for (the node's threads, a fork worker's control thread from `go` on) must run
//! the moment it wakes; everything else (guests, preparing pool workers, tearing forks
//! down) can run whenever the first kind does not. Linux says exactly that with
//! `SCHED_IDLE`: a woken `SCHED_OTHER` thread preempts an idle-class one at once, and a
//! CPU running only idle-class threads counts as free when a waking thread is placed.
//! Within the idle class, threads share fairly, so guests and refills still progress
//! together. Measured in docs/PERFORMANCE.md ("The control path's scheduling class").

use std::io;

/// A thread's share of a busy CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `SCHED_OTHER` at nice 0: answers requests.
    Interactive,
    /// `SCHED_IDLE`: runs guests and background work; yields to every interactive thread.
    Background,
}

impl Class {
    fn policy(self) -> libc::c_int {
        match self {
            Class::Interactive => libc::SCHED_OTHER,
            Class::Background => libc::SCHED_IDLE,
        }
    }
}

/// Puts the calling thread (not its process) in `class`. Threads it starts afterwards
/// inherit it.
pub fn set_current(class: Class) -> io::Result<()> {
    set(0, class)
}

/// Puts thread `tid` (a node pid) in `class`. Moving a thread out of
/// [`Class::Background`] takes `CAP_SYS_NICE` (a worker, jailed or confined, cannot leave
/// it on its own: the node moves it); moving one in takes nothing for one's own threads.
pub fn set_thread(tid: u32, class: Class) -> io::Result<()> {
    let tid = libc::pid_t::try_from(tid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    set(tid, class)
}

fn set(tid: libc::pid_t, class: Class) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call, and the kernel only
    // reads it; `tid` 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(tid, class.policy(), &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this process may move a thread out of [`Class::Background`]: `CAP_SYS_NICE`
/// in its effective set, or an `RLIMIT_NICE` of 20 or more (the kernel's ceiling is
/// `20 - limit`). The zygote (an exec'd worker: itself, before its jail) asks, while it
/// has the node's credentials: a node without either (one not running as root) could not
/// move a worker back at `go`, so its workers stay in the interactive class throughout.
pub fn may_leave_background() -> bool {
    let nice = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NICE)
        .is_ok_and(|(soft, _)| soft >= 20);
    nice || std::fs::read_to_string("/proc/self/status").is_ok_and(|s| has_cap_sys_nice(&s))
}

/// `CAP_SYS_NICE` (23) in the `CapEff` line of a `/proc/PID/status`.
fn has_cap_sys_nice(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 23) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's class; `None` for a policy cleave never sets (real-time, batch).
    fn current() -> io::Result<Option<Class>> {
        // SAFETY: no pointers; pid 0 is the calling thread.
        let policy = unsafe { libc::sched_getscheduler(0) };
        match policy {
            -1 => Err(io::Error::last_os_error()),
            p if p == libc::SCHED_OTHER => Ok(Some(Class::Interactive)),
            p if p == libc::SCHED_IDLE => Ok(Some(Class::Background)),
            _ => Ok(None),
        }
    }

    #[test]
    fn cap_sys_nice_is_read_from_the_effective_set() {
        let status = |eff: &str| format!("Name:\tx\nCapPrm:\t000001ffffffffff\nCapEff:\t{eff}\n");
        assert!(has_cap_sys_nice(&status("000001ffffffffff")));
        assert!(has_cap_sys_nice(&status("0000000000800000")));
        // This workplace's root: everything but CAP_SYS_RESOURCE (24).
        assert!(has_cap_sys_nice(&status("000001fffeffffff")));
        assert!(!has_cap_sys_nice(&status("000001ffff7fffff")));
        assert!(!has_cap_sys_nice(&status("0000000000000000")));
        assert!(!has_cap_sys_nice(&status("zz")));
        assert!(!has_cap_sys_nice("Name:\tx\n"));
        // Tests run as root.
        assert!(may_leave_background());
    }

    #[test]
    fn a_thread_moves_between_classes_and_its_new_threads_inherit() {
        std::thread::spawn(|| {
            assert_eq!(current().unwrap(), Some(Class::Interactive));
            set_current(Class::Background).unwrap();
            assert_eq!(current().unwrap(), Some(Class::Background));
            let child = std::thread::spawn(|| current().unwrap()).join().unwrap();
            assert_eq!(child, Some(Class::Background));
            // Tests run as root (CAP_SYS_NICE): the way back is open, to a thread by its id
            // as the node moves a worker's.
            set_thread(nix::unistd::gettid().as_raw() as u32, Class::Interactive).unwrap();
            assert_eq!(current().unwrap(), Some(Class::Interactive));
        })
        .join()
        .unwrap();
        // Only that thread moved.
        assert_eq!(current().unwrap(), Some(Class::Interactive));
    }
}
