//! Starting an exec's process: fork + execve, in a new session.
//!
//! Not `std::process::Command`: std waits for the child itself when
//! `execve` fails, which races with the [`Reaper`] (and panics when the
//! reaper wins). Everything the child needs is prepared before `fork`;
//! between `fork` and `execve` the child calls only async-signal-safe
//! functions and allocates nothing.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::unistd::{pipe2, Pid};

use super::reaper::{ExitWatch, Reaper};
use crate::protocol::{ExecRequest, DEFAULT_PATH};

/// Why an exec could not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{program}: command not found in PATH {path}")]
    NotFound { program: String, path: String },
    #[error("{step} {what}: {errno}")]
    Child {
        step: &'static str,
        what: String,
        errno: Errno,
    },
    #[error("{step}: {errno}")]
    Setup { step: &'static str, errno: Errno },
}

/// A started process, its pipes and its exit.
pub struct Spawned {
    /// Also the process group and session id (the child calls `setsid`).
    pub pid: Pid,
    pub stdin: Option<File>,
    pub stdout: File,
    pub stderr: File,
    pub exit: ExitWatch,
}

/// Steps the child reports failure from, for the error message.
const STEP_CHDIR: u8 = 1;
const STEP_EXEC: u8 = 2;
const STEP_SETUP: u8 = 3;

pub fn spawn(reaper: &Reaper, req: &ExecRequest) -> Result<Spawned, SpawnError> {
    let program = resolve(req)?;
    let c_program = cstring(program.as_os_str());
    let c_argv: Vec<CString> = req.argv.iter().map(|a| cstring(a)).collect();
    let c_env: Vec<CString> = req
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            cstring(&kv)
        })
        .collect();
    let c_cwd = req.cwd.as_ref().map(|c| cstring(c.as_os_str()));
    let mut argv: Vec<*const libc::c_char> = c_argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = c_env.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());

    let (stdin_child, stdin_parent) = if req.stdin {
        let (r, w) = pipe()?;
        (r, Some(w))
    } else {
        let null = File::open("/dev/null").map_err(|e| SpawnError::Setup {
            step: "open /dev/null",
            errno: io_errno(&e),
        })?;
        (above_stdio(OwnedFd::from(null))?, None)
    };
    let (stdout_parent, stdout_child) = pipe()?;
    let (stderr_parent, stderr_child) = pipe()?;
    let (err_r, err_w) = pipe()?;

    let child = ChildPlan {
        program: c_program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: c_cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        stdio: [
            stdin_child.as_raw_fd(),
            stdout_child.as_raw_fd(),
            stderr_child.as_raw_fd(),
        ],
        err_fd: err_w.as_raw_fd(),
    };

    let ((), exit) = reaper.spawn(|| {
        // SAFETY: the child branch runs only `child_exec`, which calls
        // async-signal-safe functions on memory prepared above and never
        // returns; the parent branch just records the pid.
        match unsafe { libc::fork() } {
            -1 => Err(SpawnError::Setup {
                step: "fork",
                errno: Errno::last(),
            }),
            0 => unsafe { child_exec(&child) },
            pid => Ok((Pid::from_raw(pid), ())),
        }
    })?;

    // The child's ends belong to the child now.
    drop((stdin_child, stdout_child, stderr_child, err_w));
    if let Some((step, errno)) = read_child_error(err_r) {
        // The child has exited (127); collect it so nothing is left behind.
        exit.wait();
        let what = match step {
            STEP_CHDIR => format!("{}", req.cwd.as_deref().unwrap_or(Path::new("")).display()),
            _ => program.display().to_string(),
        };
        let step = match step {
            STEP_CHDIR => "chdir",
            STEP_EXEC => "execve",
            _ => "child setup",
        };
        return Err(SpawnError::Child { step, what, errno });
    }
    Ok(Spawned {
        pid: exit.pid(),
        stdin: stdin_parent.map(File::from),
        stdout: File::from(stdout_parent),
        stderr: File::from(stderr_parent),
        exit,
    })
}

/// Raw pointers the child uses; all point into memory the parent keeps
/// alive until after `fork` returns.
struct ChildPlan {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    stdio: [RawFd; 3],
    err_fd: RawFd,
}

/// The child between `fork` and `execve`.
///
/// # Safety
/// Call only in a freshly forked child, with `plan` pointing at live data.
unsafe fn child_exec(plan: &ChildPlan) -> ! {
    // Signal state survives execve: the agent may block or ignore signals
    // (Rust ignores SIGPIPE), user commands must start with defaults.
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    for sig in 1..libc::SIGRTMIN() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    if libc::setsid() < 0 {
        fail(plan.err_fd, STEP_SETUP);
    }
    // Every source fd is >= 3 (see `above_stdio`), so no dup2 clobbers
    // another source; dup2 clears FD_CLOEXEC on the targets.
    for (target, &src) in plan.stdio.iter().enumerate() {
        if libc::dup2(src, target as RawFd) < 0 {
            fail(plan.err_fd, STEP_SETUP);
        }
    }
    if !plan.cwd.is_null() && libc::chdir(plan.cwd) < 0 {
        fail(plan.err_fd, STEP_CHDIR);
    }
    libc::execve(plan.program, plan.argv, plan.envp);
    fail(plan.err_fd, STEP_EXEC)
}

/// Reports `step` and errno to the parent and exits.
///
/// # Safety
/// Child-side only (async-signal-safe calls).
unsafe fn fail(fd: RawFd, step: u8) -> ! {
    let errno = *libc::__errno_location();
    let mut msg = [0u8; 5];
    msg[0] = step;
    msg[1..].copy_from_slice(&errno.to_le_bytes());
    libc::write(fd, msg.as_ptr().cast(), msg.len());
    libc::_exit(127)
}

/// The child's report: nothing (EOF at execve thanks to O_CLOEXEC) or a
/// step and errno.
fn read_child_error(fd: OwnedFd) -> Option<(u8, Errno)> {
    let mut f = File::from(fd);
    let mut msg = [0u8; 5];
    let mut got = 0;
    while got < msg.len() {
        match std::io::Read::read(&mut f, &mut msg[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if got < msg.len() {
        return None;
    }
    let errno = i32::from_le_bytes([msg[1], msg[2], msg[3], msg[4]]);
    Some((msg[0], Errno::from_raw(errno)))
}

/// `argv[0]` itself when it has a `/`, else the first executable regular
/// file named so in the request's `PATH`.
fn resolve(req: &ExecRequest) -> Result<PathBuf, SpawnError> {
    let program = &req.argv[0];
    if program.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    let path = req
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| OsString::from(DEFAULT_PATH));
    for dir in path.as_bytes().split(|&b| b == b':') {
        let dir = if dir.is_empty() { b"." as &[u8] } else { dir };
        let candidate = Path::new(OsStr::from_bytes(dir)).join(program);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(SpawnError::NotFound {
        program: program.to_string_lossy().into_owned(),
        path: path.to_string_lossy().into_owned(),
    })
}

/// Validated at decode time: no NUL in argv, env or paths.
fn cstring(s: &OsStr) -> CString {
    CString::new(s.as_bytes()).expect("NUL bytes are rejected by the decoder")
}

/// A close-on-exec pipe with both ends at fd 3 or above.
fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(|errno| SpawnError::Setup {
        step: "pipe2",
        errno,
    })?;
    Ok((above_stdio(r)?, above_stdio(w)?))
}

/// As PID 1 fds 0–2 may be closed, so a new fd can land there; moving
/// every child-side fd to >= 3 keeps the dup2 sequence from clobbering one.
fn above_stdio(fd: OwnedFd) -> Result<OwnedFd, SpawnError> {
    if fd.as_raw_fd() >= 3 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on an fd we own returns a new fd we own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(SpawnError::Setup {
            step: "fcntl(F_DUPFD_CLOEXEC)",
            errno: Errno::last(),
        });
    }
    // SAFETY: `new` is a fresh fd returned to us above.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}
