//! A worker's process, started with `clone3` rather than `std::process::Command` so it can
//! be born where the jail wants it — in a PID namespace of its own (it is PID 1 there and
//! sees no other process) and already inside its cgroup leaf. It holds no fd: it is waited
//! for on a pidfd opened when needed and signalled by pid, so a node with 10,000 forks
//! does not spend 10,000 of its fds on them. That is as safe as holding a pidfd: a child
//! we have not reaped keeps its pid (as a zombie once it exits), and only [`Process`] reaps
//! it, so its pid cannot name anyone else until then.

use super::worker::WorkerError;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

/// `CLONE_INTO_CGROUP` (Linux 5.7), not in the libc crate.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Where a new worker process starts.
pub struct Birth<'a> {
    /// Its own PID namespace (needs CAP_SYS_ADMIN).
    pub new_pid_namespace: bool,
    /// A cgroup v2 directory to start in.
    pub cgroup: Option<&'a Path>,
}

/// A child process we started and have not yet reaped.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    status: Option<ExitStatus>,
}

impl Process {
    /// Runs `exe args...` with `stdin` as its fd 0, stdout on /dev/null and our stderr,
    /// an empty signal mask, and this process's environment. An `exec` failure is
    /// returned here, not discovered later as an exit status.
    pub fn spawn(exe: &Path, args: &[&str], stdin: OwnedFd, birth: &Birth) -> io::Result<Process> {
        // Everything the child touches is made before the clone: between clone3 and
        // execve the child may only make system calls (the parent may be multi-threaded).
        let exe_c = CString::new(exe.as_os_str().as_bytes())?;
        let args_c: Vec<CString> = args
            .iter()
            .map(|a| CString::new(*a))
            .collect::<Result<_, _>>()?;
        let mut argv: Vec<*const libc::c_char> = Vec::with_capacity(args_c.len() + 2);
        argv.push(exe_c.as_ptr());
        argv.extend(args_c.iter().map(|a| a.as_ptr()));
        argv.push(std::ptr::null());
        let devnull = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
        let cgroup = birth.cgroup.map(open_cgroup).transpose()?;
        // The child reports an exec failure's errno here; a successful exec closes it.
        let (report_r, report_w) = pipe()?;

        let (stdin_fd, devnull_fd, report_fd) =
            (stdin.as_raw_fd(), devnull.as_raw_fd(), report_w.as_raw_fd());
        // SAFETY: the child only makes async-signal-safe system calls, on memory prepared
        // above, and never returns: it execs or _exits.
        let cloned = unsafe {
            clone_child(
                birth.new_pid_namespace,
                cgroup.as_ref().map(|c| c.as_fd()),
                false,
            )
        };
        if let Ok(Cloned::Child) = cloned {
            // SAFETY: see above; every pointer was made before the clone.
            unsafe {
                if libc::dup2(stdin_fd, 0) < 0 || libc::dup2(devnull_fd, 1) < 0 {
                    child_fail(report_fd);
                }
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                libc::execv(exe_c.as_ptr(), argv.as_ptr());
                child_fail(report_fd);
            }
        }
        let Cloned::Parent(pid) = cloned? else {
            unreachable!("the child execs or exits above")
        };
        drop(report_w);
        let mut process = Process { pid, status: None };
        let mut errno = [0u8; 4];
        match read_full(&report_r, &mut errno) {
            Ok(0) => Ok(process),
            Ok(_) => {
                let _ = process.wait();
                Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)))
            }
            Err(e) => {
                let _ = process.kill();
                let _ = process.wait();
                Err(e)
            }
        }
    }

    /// Takes charge of `pid`, a child of ours that we did not start ourselves: a
    /// [zygote](super::zygote) started it with `CLONE_PARENT`. Refused unless `pid` is
    /// our unreaped child, so a wrong pid can never make us signal or reap someone else.
    pub(crate) fn adopt(pid: u32) -> io::Result<Process> {
        // SAFETY: a zeroed siginfo_t is a valid out value for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid with a valid out pointer; WNOWAIT leaves the child unreaped, and
        // WNOHANG makes it answer at once: 0 for our child (running or exited), ECHILD
        // for anyone else.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Process { pid, status: None })
    }

    pub fn id(&self) -> u32 {
        self.pid
    }

    /// A pidfd for it, readable once it has exited (`None` once it has been reaped: its
    /// pid may be someone else's by then).
    pub fn pidfd(&self) -> io::Result<Option<OwnedFd>> {
        if self.status.is_some() {
            return Ok(None);
        }
        // SAFETY: pidfd_open on our own unreaped child's pid (see the module docs).
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pidfd_open returned a new fd that nothing else owns.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) }))
    }

    /// Its exit status if it has exited (reaping it), without waiting.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.wait_with(libc::WNOHANG)
    }

    /// Waits for it to exit and reaps it.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.wait_with(0)? {
                return Ok(s);
            }
        }
    }

    fn wait_with(&mut self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let mut status = 0;
        loop {
            // SAFETY: waitpid on our own unreaped child, with a valid out pointer.
            let rc = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut status, flags) };
            match rc {
                0 => return Ok(None),
                r if r > 0 => {
                    let s = ExitStatus::from_raw(status);
                    self.status = Some(s);
                    return Ok(Some(s));
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// SIGKILL (a no-op once it has been reaped). A plain `kill`, needing no fd: the pid
    /// is our unreaped child's (see the module docs).
    pub fn kill(&mut self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // SAFETY: kill(2) with a pid and a signal number; no memory is involved.
        if unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A cgroup v2 directory opened for `CLONE_INTO_CGROUP`.
pub(crate) fn open_cgroup(dir: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
}

/// Which side of [`clone_child`] we are on.
pub(crate) enum Cloned {
    Child,
    Parent(u32),
}

/// `clone3` as `fork`: the child runs on a copy of our memory. With `new_pid_namespace`
/// it is PID 1 of a PID namespace of its own; with `cgroup` (an open cgroup v2
/// directory) it is born there; with `sibling` (`CLONE_PARENT`) it is our parent's child,
/// not ours, so our parent waits for it and gets its `SIGCHLD`.
///
/// # Safety
/// When this process has other threads, the child may only make async-signal-safe calls
/// until it execs or exits: another thread may have held a lock (the allocator's, say)
/// at the clone, and nobody will ever release it in the child.
pub(crate) unsafe fn clone_child(
    new_pid_namespace: bool,
    cgroup: Option<BorrowedFd<'_>>,
    sibling: bool,
) -> io::Result<Cloned> {
    let mut flags = 0u64;
    if new_pid_namespace {
        flags |= libc::CLONE_NEWPID as u64;
    }
    if cgroup.is_some() {
        flags |= CLONE_INTO_CGROUP;
    }
    if sibling {
        flags |= libc::CLONE_PARENT as u64;
    }
    // SAFETY: a zeroed clone_args is valid (no stack: the child runs on a copy of ours,
    // as after fork); we set the fields clone3 reads.
    let mut ca: libc::clone_args = unsafe { std::mem::zeroed() };
    ca.flags = flags;
    // With CLONE_PARENT the child gets our own exit signal (SIGCHLD for a process
    // started as ours are), and clone3 refuses any other value than 0 here.
    ca.exit_signal = if sibling { 0 } else { libc::SIGCHLD as u64 };
    ca.cgroup = cgroup.map_or(0, |c| c.as_raw_fd() as u64);
    // SAFETY: clone3 with a valid clone_args of the size we pass; what the child may do
    // is the caller's contract.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut ca as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    match rc {
        0 => Ok(Cloned::Child),
        pid if pid > 0 => Ok(Cloned::Parent(pid as u32)),
        _ => Err(io::Error::last_os_error()),
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-int array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reading into the unfilled tail of our own buffer.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
            )
        };
        match n {
            0 => break,
            n if n > 0 => got += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(got)
}

/// In the child: report errno to the parent and exit.
///
/// # Safety
/// Only in the child between clone3 and exec.
unsafe fn child_fail(report_fd: libc::c_int) -> ! {
    // SAFETY: reading this thread's errno, writing our own bytes to a pipe, exiting:
    // all async-signal-safe, as the caller's contract requires.
    unsafe {
        let errno = *libc::__errno_location();
        let bytes = errno.to_ne_bytes();
        libc::write(report_fd, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(127)
    }
}

/// Names this process (its main thread, and every thread it creates afterwards), so `ps`
/// tells a zygote and a template worker from fork workers of the same binary.
pub(super) fn set_comm(name: &str) -> Result<(), WorkerError> {
    let c = std::ffi::CString::new(name).expect("a constant name has no NUL");
    nix::sys::prctl::set_name(&c)
        .map_err(|e| WorkerError::Jail(std::io::Error::other(format!("naming {name}: {e}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stdin() -> OwnedFd {
        OwnedFd::from(std::fs::File::open("/dev/null").unwrap())
    }

    #[test]
    fn a_child_runs_and_its_status_comes_back() {
        let plain = Birth {
            new_pid_namespace: false,
            cgroup: None,
        };
        let mut p =
            Process::spawn(Path::new("/bin/sh"), &["-c", "exit 7"], stdin(), &plain).unwrap();
        assert_eq!(p.wait().unwrap().code(), Some(7));
        // Cached: a second wait does not touch a pid that may be someone else's now.
        assert_eq!(p.try_wait().unwrap().unwrap().code(), Some(7));
        p.kill().unwrap();
    }

    #[test]
    fn an_exec_failure_is_an_error_not_an_exit_status() {
        let plain = Birth {
            new_pid_namespace: false,
            cgroup: None,
        };
        let e = Process::spawn(Path::new("/nonexistent/worker"), &[], stdin(), &plain).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }

    #[test]
    fn a_child_in_its_own_pid_namespace_is_pid_1_there_and_can_be_killed() {
        // Needs root (CAP_SYS_ADMIN), as the whole suite does.
        let own = Birth {
            new_pid_namespace: true,
            cgroup: None,
        };
        let mut p = Process::spawn(
            Path::new("/bin/sh"),
            &["-c", "[ $$ = 1 ] && exec sleep 30"],
            stdin(),
            &own,
        )
        .unwrap();
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
        // Give it a moment to exec; it must still be alive (so `$$` was 1).
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(
            p.try_wait().unwrap(),
            None,
            "the child did not see itself as pid 1"
        );
        assert_ne!(ns(&p.id().to_string()), ns("self"));
        p.kill().unwrap();
        assert_eq!(p.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
