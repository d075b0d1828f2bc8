//! `cleave-fork-worker`: runs one fork in its own process. The parent (the node agent, or
//! a benchmark) starts it with a `SOCK_SEQPACKET` socket as stdin and drives it through
//! `cleave_agent::fork::worker`; it is not meant to be started by hand. With `--zygote`
//! it holds a template and forks workers for it (`cleave_agent::fork::zygote`).

use std::process::ExitCode;

use cleave_agent::fork::jail::JailIds;
use cleave_agent::fork::{worker, zygote};

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
    // `--jail UID:GID`: the worker jails itself as that uid before it builds its fork.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let zygote = matches!(args.as_slice(), [flag] if flag == zygote::ZYGOTE_FLAG);
    let jail = match args.as_slice() {
        [] => None,
        [_] if zygote => None,
        [flag, ids] if flag == "--jail" => match JailIds::parse(ids) {
            Some(ids) => Some(ids),
            None => {
                eprintln!("cleave-fork-worker: --jail {ids:?} is not UID:GID (neither 0)");
                return ExitCode::FAILURE;
            }
        },
        _ => {
            eprintln!(
                "cleave-fork-worker: usage: cleave-fork-worker [--jail UID:GID | --zygote] \
                 (started by cleave)"
            );
            return ExitCode::FAILURE;
        }
    };
    let sock = match worker::socket_from_stdin() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cleave-fork-worker: stdin is not the parent's socket: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = if zygote {
        zygote::serve(sock)
    } else {
        worker::serve(sock, jail)
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cleave-fork-worker: {e}");
            ExitCode::FAILURE
        }
    }
}
