//! Starting an exec's process: `posix_spawn` in a new session.
//!
//! Not `std::process::Command`: std waits for the child itself when
//! `execve` fails, which races with the [`Reaper`] (and panics when the
//! reaper wins). `posix_spawn` (glibc: `clone(CLONE_VM|CLONE_VFORK)`, no
//! page-table copy, so cheaper than `fork` in a big process) also waits for
//! a child whose `execve` failed, but then returns the error without a pid:
//! nothing was registered, and if the reaper won the race it just counts
//! an orphan. Success is registered under the reaper's lock, so a child
//! that exits at once is never lost.
//!
//! An exec with a user cannot change ids through `posix_spawn`: the agent
//! spawns itself as the [`exec_as`] helper instead, the same way (stdio,
//! session, cwd, environment), and the helper drops to the user and execs
//! the program under the same pid.

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
use crate::exec_as;
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
    /// The agent's own binary could not be started as the `exec-as` helper.
    #[error("cannot start the exec-as helper {path}: {errno}")]
    Helper { path: String, errno: Errno },
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

/// Starts `req`; with a user, through the `exec-as` helper at `agent_exe`.
pub fn spawn(reaper: &Reaper, req: &ExecRequest, agent_exe: &Path) -> Result<Spawned, SpawnError> {
    // In the agent, as root, before any spawn: an image needs no shell.
    let program = resolve(req)?;
    let (c_program, c_argv): (CString, Vec<CString>) = match req.user {
        None => (
            cstring(program.as_os_str()),
            req.argv.iter().map(|a| cstring(a)).collect(),
        ),
        Some(user) => {
            let helper =
                CString::new(agent_exe.as_os_str().as_bytes()).map_err(|_| SpawnError::Helper {
                    path: agent_exe.display().to_string(),
                    errno: Errno::EINVAL,
                })?;
            let argv = exec_as::helper_argv(agent_exe, user, &program, &req.argv);
            (helper, argv.iter().map(|a| cstring(a)).collect())
        }
    };
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

    if let Some(cwd) = &req.cwd {
        // posix_spawn cannot say which step failed; check the directory
        // first so a bad cwd gets an error that names it.
        if let Err(e) = std::fs::read_dir(cwd) {
            return Err(SpawnError::Child {
                step: "chdir",
                what: cwd.display().to_string(),
                errno: io_errno(&e),
            });
        }
    }
    if req.user.is_some() {
        // The helper could only report a missing program as exit 127 with
        // a message: check here, so it is the same error as without a user
        // (a program found in PATH exists; this is for paths with a `/`).
        let at = match &req.cwd {
            Some(cwd) if program.is_relative() => cwd.join(&program),
            _ => program.clone(),
        };
        if let Err(e) = std::fs::metadata(&at) {
            return Err(SpawnError::Child {
                step: "execve",
                what: program.display().to_string(),
                errno: io_errno(&e),
            });
        }
    }
    let attrs = SpawnAttrs::new(
        [
            stdin_child.as_raw_fd(),
            stdout_child.as_raw_fd(),
            stderr_child.as_raw_fd(),
        ],
        c_cwd.as_deref(),
    )?;

    let ((), exit) = reaper.spawn(|| {
        let mut pid: libc::pid_t = 0;
        // SAFETY: every pointer is valid and NUL-terminated (argv/envp
        // arrays end with null) for the duration of the call; the
        // attributes and file actions were initialised by `SpawnAttrs`.
        let rc = unsafe {
            libc::posix_spawn(
                &mut pid,
                c_program.as_ptr(),
                &attrs.actions,
                &attrs.attr,
                argv.as_ptr() as *const *mut libc::c_char,
                envp.as_ptr() as *const *mut libc::c_char,
            )
        };
        if rc != 0 {
            // glibc has already waited for the failed child itself.
            let errno = Errno::from_raw(rc);
            return Err(match req.user {
                None => SpawnError::Child {
                    step: "execve",
                    what: program.display().to_string(),
                    errno,
                },
                Some(_) => SpawnError::Helper {
                    path: agent_exe.display().to_string(),
                    errno,
                },
            });
        }
        Ok((Pid::from_raw(pid), ()))
    })?;

    // The child's ends belong to the child now.
    drop((stdin_child, stdout_child, stderr_child));
    Ok(Spawned {
        pid: exit.pid(),
        stdin: stdin_parent.map(File::from),
        stdout: File::from(stdout_parent),
        stderr: File::from(stderr_parent),
        exit,
    })
}

/// posix_spawn attributes and file actions, destroyed on drop.
struct SpawnAttrs {
    attr: libc::posix_spawnattr_t,
    actions: libc::posix_spawn_file_actions_t,
}

impl SpawnAttrs {
    /// New session (so a new process group), default signal dispositions
    /// and an empty signal mask (the agent may block or ignore signals;
    /// Rust ignores SIGPIPE), the given stdio, and `cwd`.
    fn new(stdio: [RawFd; 3], cwd: Option<&std::ffi::CStr>) -> Result<Self, SpawnError> {
        let check = |step: &'static str, rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(SpawnError::Setup {
                    step,
                    errno: Errno::from_raw(rc),
                })
            }
        };
        // SAFETY: zeroed storage is immediately initialised by the
        // *_init calls below before any other use; every later call gets
        // pointers to those initialised objects.
        unsafe {
            let mut a = SpawnAttrs {
                attr: std::mem::zeroed(),
                actions: std::mem::zeroed(),
            };
            check(
                "posix_spawnattr_init",
                libc::posix_spawnattr_init(&mut a.attr),
            )?;
            check(
                "posix_spawn_file_actions_init",
                libc::posix_spawn_file_actions_init(&mut a.actions),
            )?;
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::sigemptyset(&mut none);
            check(
                "posix_spawnattr_setsigdefault",
                libc::posix_spawnattr_setsigdefault(&mut a.attr, &all),
            )?;
            check(
                "posix_spawnattr_setsigmask",
                libc::posix_spawnattr_setsigmask(&mut a.attr, &none),
            )?;
            let flags = libc::POSIX_SPAWN_SETSID
                | libc::POSIX_SPAWN_SETSIGDEF as libc::c_short
                | libc::POSIX_SPAWN_SETSIGMASK as libc::c_short;
            check(
                "posix_spawnattr_setflags",
                libc::posix_spawnattr_setflags(&mut a.attr, flags),
            )?;
            // Every source fd is >= 3 (see `above_stdio`), so no dup2
            // clobbers another source; dup2 clears FD_CLOEXEC on targets.
            for (target, &src) in stdio.iter().enumerate() {
                check(
                    "posix_spawn_file_actions_adddup2",
                    libc::posix_spawn_file_actions_adddup2(&mut a.actions, src, target as RawFd),
                )?;
            }
            if let Some(cwd) = cwd {
                check(
                    "posix_spawn_file_actions_addchdir_np",
                    libc::posix_spawn_file_actions_addchdir_np(&mut a.actions, cwd.as_ptr()),
                )?;
            }
            Ok(a)
        }
    }
}

impl Drop for SpawnAttrs {
    fn drop(&mut self) {
        // SAFETY: both objects were initialised in `new`.
        unsafe {
            libc::posix_spawnattr_destroy(&mut self.attr);
            libc::posix_spawn_file_actions_destroy(&mut self.actions);
        }
    }
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
