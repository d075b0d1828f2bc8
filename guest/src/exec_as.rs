//! `cleave-guest exec-as UID GID PROGRAM -- ARGV...`: the helper that runs an
//! exec as another user.
//!
//! `posix_spawn` cannot change credentials, so for an exec with a
//! [`ExecUser`] the agent spawns itself (same stdio, session, cwd and
//! environment) with [`helper_argv`]; the helper drops to the user and
//! `execv`s the program, keeping its pid, so the agent's reaper sees the
//! program's own exit. `PROGRAM` is already resolved in `PATH` by the agent
//! (an image needs no shell); `ARGV` is the request's argv, `argv[0]`
//! included, and the environment is passed on as inherited.
//!
//! Any failure prints `cleave-guest exec-as: <step>: <errno>` to stderr (the
//! exec's stderr pipe) and exits with [`EXIT_FAILED`].

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::{Gid, Uid};

use crate::protocol::ExecUser;

/// The subcommand's name (argv\[1\] of the helper).
pub const SUBCOMMAND: &str = "exec-as";

/// Exit status of a helper that could not run the program (as a shell's
/// "command not found / cannot execute").
pub const EXIT_FAILED: i32 = 127;

/// The helper's full argv: `[agent, "exec-as", UID, GID, program, "--", argv...]`.
pub fn helper_argv(
    agent: &Path,
    user: ExecUser,
    program: &Path,
    argv: &[OsString],
) -> Vec<OsString> {
    let mut out = Vec::with_capacity(argv.len() + 6);
    out.push(agent.as_os_str().to_owned());
    out.push(SUBCOMMAND.into());
    out.push(user.uid.to_string().into());
    out.push(user.gid.to_string().into());
    out.push(program.as_os_str().to_owned());
    out.push("--".into());
    out.extend(argv.iter().cloned());
    out
}

/// What the helper was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecAs {
    pub user: ExecUser,
    pub program: CString,
    /// Non-empty; `argv[0]` is the request's own.
    pub argv: Vec<CString>,
}

/// Parses the arguments after `exec-as`: `UID GID PROGRAM -- ARGV0 [ARG...]`.
/// UID and GID are plain decimal `u32`s as [`helper_argv`] writes them (no
/// sign, no leading zero, no spaces); nothing may contain a NUL byte.
pub fn parse(args: &[OsString]) -> Result<ExecAs, String> {
    let [uid, gid, program, sep, argv @ ..] = args else {
        return Err("usage: exec-as UID GID PROGRAM -- ARGV0 [ARG...]".into());
    };
    let uid = id(uid, "UID")?;
    let gid = id(gid, "GID")?;
    if sep != "--" {
        return Err(format!("expected \"--\" after PROGRAM, not {sep:?}"));
    }
    if program.is_empty() {
        return Err("PROGRAM is empty".into());
    }
    if argv.is_empty() {
        return Err("no ARGV0 after \"--\"".into());
    }
    let program = c_string(program, "PROGRAM")?;
    let argv = argv
        .iter()
        .map(|a| c_string(a, "ARGV"))
        .collect::<Result<_, _>>()?;
    Ok(ExecAs {
        user: ExecUser { uid, gid },
        program,
        argv,
    })
}

fn id(s: &OsStr, what: &str) -> Result<u32, String> {
    let b = s.as_bytes();
    let canonical =
        !b.is_empty() && b.iter().all(u8::is_ascii_digit) && (b == b"0" || b[0] != b'0');
    let parsed = if canonical {
        std::str::from_utf8(b)
            .ok()
            .and_then(|t| t.parse::<u32>().ok())
    } else {
        None
    };
    parsed.ok_or_else(|| format!("{what} must be a decimal number 0..=4294967295, not {s:?}"))
}

fn c_string(s: &OsStr, what: &str) -> Result<CString, String> {
    CString::new(s.to_owned().into_vec()).map_err(|_| format!("{what} contains a NUL byte"))
}

/// Runs the subcommand with the arguments after `exec-as`. Returns only on
/// failure, with the exit status, after printing why.
pub fn main(args: &[OsString]) -> i32 {
    let err = match parse(args) {
        Ok(req) => {
            let (step, errno) = exec(&req);
            format!("{step}: {errno}")
        }
        Err(usage) => usage,
    };
    eprintln!("cleave-guest {SUBCOMMAND}: {err}");
    EXIT_FAILED
}

/// Drops to the user and replaces this process by the program; returns
/// only with the step that failed.
fn exec(req: &ExecAs) -> (String, Errno) {
    reset_signals();
    if let Err(e) = drop_to(req.user) {
        return e;
    }
    let argv: Vec<&std::ffi::CStr> = req.argv.iter().map(CString::as_c_str).collect();
    let Err(errno) = nix::unistd::execv(&req.program, &argv);
    (format!("execv {}", req.program.to_string_lossy()), errno)
}

/// Supplementary groups first (that needs CAP_SETGID), then the group
/// (also needs root), then the user, which gives up the capabilities.
fn drop_to(user: ExecUser) -> Result<(), (String, Errno)> {
    fn step(s: &'static str) -> impl Fn(Errno) -> (String, Errno) {
        move |e| (s.to_string(), e)
    }
    nix::unistd::setgroups(&[]).map_err(step("setgroups"))?;
    nix::unistd::setgid(Gid::from_raw(user.gid)).map_err(step("setgid"))?;
    nix::unistd::setuid(Uid::from_raw(user.uid)).map_err(step("setuid"))?;
    verify(user)
}

/// Defence in depth: every id is the requested one, no supplementary group
/// is left, and a non-root user cannot get root back.
fn verify(user: ExecUser) -> Result<(), (String, Errno)> {
    let mismatch = |what: &str| (format!("verify {what}"), Errno::EPERM);
    let u = nix::unistd::getresuid().map_err(|e| ("getresuid".to_string(), e))?;
    if [u.real, u.effective, u.saved] != [Uid::from_raw(user.uid); 3] {
        return Err(mismatch(
            "uid (real/effective/saved differ from the request)",
        ));
    }
    let g = nix::unistd::getresgid().map_err(|e| ("getresgid".to_string(), e))?;
    if [g.real, g.effective, g.saved] != [Gid::from_raw(user.gid); 3] {
        return Err(mismatch(
            "gid (real/effective/saved differ from the request)",
        ));
    }
    let groups = nix::unistd::getgroups().map_err(|e| ("getgroups".to_string(), e))?;
    if groups.iter().any(|&g| g != Gid::from_raw(user.gid)) {
        return Err(mismatch("groups (supplementary groups left)"));
    }
    if user.uid != 0 && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(mismatch("setuid(0) (succeeded after dropping root)"));
    }
    Ok(())
}

/// The program must start as `posix_spawn` would have started it: default
/// dispositions and an empty mask. The helper's Rust runtime ignores
/// SIGPIPE, and an ignored signal stays ignored across `execve`.
fn reset_signals() {
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: SIG_DFL installs no handler; numbers libc reserves or
        // that do not exist fail with EINVAL, which is ignored.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    // SAFETY: an initialised empty set, and a null old-set pointer.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn parses_what_the_agent_writes() {
        let argv = os(&["sh", "-c", "id -u"]);
        let user = ExecUser {
            uid: 65534,
            gid: 100,
        };
        let full = helper_argv(
            Path::new("/proc/self/exe"),
            user,
            Path::new("/bin/sh"),
            &argv,
        );
        assert_eq!(full[..2], os(&["/proc/self/exe", "exec-as"])[..]);
        let req = parse(&full[2..]).unwrap();
        assert_eq!(req.user, user);
        assert_eq!(req.program.as_bytes(), b"/bin/sh");
        let got: Vec<&[u8]> = req.argv.iter().map(|a| a.as_bytes()).collect();
        assert_eq!(got, [&b"sh"[..], b"-c", b"id -u"]);
        // Extremes, and an argv that itself holds "--".
        let req = parse(&os(&["0", "4294967295", "p", "--", "p", "--", "x"])).unwrap();
        assert_eq!(
            req.user,
            ExecUser {
                uid: 0,
                gid: u32::MAX
            }
        );
        assert_eq!(req.argv.len(), 3);
    }

    #[test]
    fn non_utf8_arguments_pass_through() {
        let mut args = os(&["1", "2", "/p", "--"]);
        args.push(OsString::from_vec(vec![0xff, b'a']));
        let req = parse(&args).unwrap();
        assert_eq!(req.argv[0].as_bytes(), [0xff, b'a']);
    }

    #[test]
    fn refuses_anything_else() {
        for bad in [
            &[][..],
            &["1", "2", "/p", "--"],
            &["1", "2", "/p"],
            &["1", "2", "/p", "-", "p"],
            &["1", "2", "", "--", "p"],
            &["", "2", "/p", "--", "p"],
            &["-1", "2", "/p", "--", "p"],
            &["+1", "2", "/p", "--", "p"],
            &["01", "2", "/p", "--", "p"],
            &[" 1", "2", "/p", "--", "p"],
            &["1 ", "2", "/p", "--", "p"],
            &["0x10", "2", "/p", "--", "p"],
            &["4294967296", "2", "/p", "--", "p"],
            &["1", "nobody", "/p", "--", "p"],
            &["1", "2.0", "/p", "--", "p"],
        ] {
            assert!(parse(&os(bad)).is_err(), "{bad:?} was accepted");
        }
        assert!(parse(&os(&["1", "2", "/p\0x", "--", "p"])).is_err());
        assert!(parse(&os(&["1", "2", "/p", "--", "p\0"])).is_err());
        let e = parse(&os(&["1", "x", "/p", "--", "p"])).unwrap_err();
        assert!(e.contains("GID") && e.contains("\"x\""), "{e}");
    }
}
