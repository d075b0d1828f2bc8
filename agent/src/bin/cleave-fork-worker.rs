//! `cleave-fork-worker`: runs one fork in its own process. The parent (the node agent, or
//! a benchmark) starts it with a `SOCK_SEQPACKET` socket as stdin and drives it through
//! `cleave_agent::fork::worker`; it is not meant to be started by hand. With `--zygote`
//! it holds a template and forks workers for it (`cleave_agent::fork::zygote`); with
//! `--template` it boots and captures a template (`cleave_agent::fork::template_worker`).

use std::process::ExitCode;

use cleave_agent::fork::jail::JailIds;
use cleave_agent::fork::template_worker::{self, TEMPLATE_FLAG};
use cleave_agent::fork::{worker, zygote};

/// What this process is for. `--jail UID:GID`: it jails itself as that uid before it
/// builds any VM.
#[derive(Debug, PartialEq, Eq)]
enum Role {
    /// One fork (the default).
    Fork(Option<JailIds>),
    /// A template's zygote.
    Zygote,
    /// Booting and capturing a template.
    Template(Option<JailIds>),
}

impl Role {
    fn parse(args: &[String]) -> Option<Role> {
        let (template, rest) = match args {
            [flag, rest @ ..] if flag == TEMPLATE_FLAG => (true, rest),
            [flag] if flag == zygote::ZYGOTE_FLAG => return Some(Role::Zygote),
            rest => (false, rest),
        };
        let jail = match rest {
            [] => None,
            [flag, ids] if flag == "--jail" => Some(JailIds::parse(ids)?),
            _ => return None,
        };
        Some(if template {
            Role::Template(jail)
        } else {
            Role::Fork(jail)
        })
    }
}

fn main() -> ExitCode {
    // Nothing but stdin/stdout/stderr may come from the parent: a stray inherited fd
    // (another fork's eventfd, say) would cross the one-process-per-fork boundary.
    // SAFETY: plain syscall; at this point no Rust object in this process owns an fd >= 3,
    // so nothing is left holding a closed descriptor.
    if unsafe { libc::close_range(3, libc::c_uint::MAX, 0) } != 0 {
        eprintln!(
            "cleave-fork-worker: closing inherited fds: {}",
            std::io::Error::last_os_error()
        );
        return ExitCode::FAILURE;
    }
    // One malloc arena for all threads: a vCPU thread's first allocation would otherwise
    // make an arena of its own (a 64 MiB reservation whose first pages become private
    // memory, and page faults on the fork path) for the few allocations it ever makes.
    // SAFETY: mallopt takes two integers; it runs before this process has other threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let filter = cleave_agent::host::log_filter("warn");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(role) = Role::parse(&args) else {
        eprintln!(
            "cleave-fork-worker: usage: cleave-fork-worker [--template] [--jail UID:GID] | \
             --zygote (started by cleave; UID and GID are not 0)"
        );
        return ExitCode::FAILURE;
    };
    let sock = match worker::socket_from_stdin() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cleave-fork-worker: stdin is not the parent's socket: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = match role {
        Role::Fork(jail) => worker::serve(sock, jail),
        Role::Zygote => zygote::serve(sock),
        Role::Template(jail) => template_worker::serve(sock, jail),
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cleave-fork-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(args: &[&str]) -> Option<Role> {
        Role::parse(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn roles_are_parsed_and_anything_else_is_refused() {
        let ids = JailIds { uid: 7, gid: 8 };
        assert_eq!(role(&[]), Some(Role::Fork(None)));
        assert_eq!(role(&["--jail", "7:8"]), Some(Role::Fork(Some(ids))));
        assert_eq!(role(&["--zygote"]), Some(Role::Zygote));
        assert_eq!(role(&["--template"]), Some(Role::Template(None)));
        assert_eq!(
            role(&["--template", "--jail", "7:8"]),
            Some(Role::Template(Some(ids)))
        );
        for bad in [
            &["--zygote", "--jail", "7:8"][..],
            &["--template", "--zygote"],
            &["--jail", "0:0"],
            &["--template", "--jail"],
            &["--jail", "7:8", "--template"],
            &["extra"],
        ] {
            assert_eq!(role(bad), None, "{bad:?}");
        }
    }
}
