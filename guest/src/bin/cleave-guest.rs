//! The guest agent: PID 1 of every cleave guest.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use cleave_guest::boot::{self, cmdline_flag, cmdline_value};
use cleave_guest::init::{self, power::end_guest};

fn main() {
    if nix::unistd::getpid() != Pid::from_raw(1) {
        eprintln!("cleave-guest: this is a guest's init and must run as PID 1");
        std::process::exit(2);
    }
    if let Err(e) = run() {
        eprintln!("cleave-guest: fatal: {e}");
        end_guest(1);
    }
}

fn run() -> Result<(), init::InitError> {
    // Block the signals PID 1 acts on before anything can send them; they are taken
    // synchronously below.
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        signals.add(s);
    }
    let _ = signals.thread_block();

    init::mounts::mount_all()?;
    init::stdio::ensure_console();
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(init::InitError::Cmdline)?;
    let hostname = cmdline_value(&cmdline, boot::FLAG_HOSTNAME).unwrap_or(boot::DEFAULT_HOSTNAME);
    init::set_hostname(hostname)?;

    println!(
        "{} version={} uptime_ms={} cpus={} mem_mib={}",
        boot::READY_PREFIX,
        env!("CARGO_PKG_VERSION"),
        init::uptime_ms(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        init::mem_total_mib().unwrap_or(0),
    );
    if cmdline_flag(&cmdline, boot::FLAG_SELFTEST) {
        end_guest(0);
    }

    loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) => reap_zombies(),
            Ok(Signal::SIGTERM | Signal::SIGINT) => {
                println!("cleave-guest: shutting down");
                end_guest(0);
            }
            _ => {}
        }
    }
}

/// Reaps every exited child, orphans included.
fn reap_zombies() {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}
