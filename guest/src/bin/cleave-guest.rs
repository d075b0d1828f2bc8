//! The guest agent: PID 1 of every cleave guest.
//!
//! Mounts the filesystems, starts the reaper (the only `waitpid` caller in the process),
//! serves the agent protocol on vsock, says it is ready, and then waits for SIGTERM/SIGINT.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use nix::unistd::Pid;

use cleave_guest::boot::{self, cmdline_flag, cmdline_value};
use cleave_guest::exec_as;
use cleave_guest::init::{self, power::end_guest};
use cleave_guest::reseed::{self, KernelReseed};
use cleave_guest::server::{GateMode, Reaper, Server, ServerConfig};

/// `VMADDR_CID_ANY`: accept connections to whatever CID the device gives us.
const CID_ANY: u32 = u32::MAX;

fn main() {
    if nix::unistd::getpid() != Pid::from_raw(1) {
        // Before anything reads the arguments as UTF-8: an exec's argv is bytes.
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        if args.first().is_some_and(|a| a == exec_as::SUBCOMMAND) {
            std::process::exit(exec_as::main(&args[1..]));
        }
        std::process::exit(tool(std::env::args().skip(1).collect()));
    }
    if let Err(e) = run() {
        eprintln!("cleave-guest: fatal: {e}");
        end_guest(1);
    }
}

/// Run as anything but PID 1, the binary is a small tool for commands in the guest:
/// `getrandom N` prints N bytes from getrandom(2) in hex (busybox has no way to call it,
/// and the fork tests compare it across forks); `udp-send [FROM] ADDR:PORT TEXT` sends one
/// datagram, from source address FROM if given (busybox's `nc` cannot send UDP or pick a
/// source; the network tests use it to probe the firewall's anti-spoofing); `clock-us`
/// prints CLOCK_MONOTONIC in microseconds (busybox's `date` has no sub-second field; the
/// network benchmark times connections with it).
///
/// `exec-as UID GID PROGRAM -- ARGV...` is not for people: the agent spawns itself so to
/// run an exec as a user (see [`cleave_guest::exec_as`]).
fn tool(args: Vec<String>) -> i32 {
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["clock-us"] => match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
            Ok(t) => {
                println!("{}", t.tv_sec() * 1_000_000 + t.tv_nsec() / 1_000);
                0
            }
            Err(e) => {
                eprintln!("cleave-guest clock-us: {e}");
                1
            }
        },
        ["udp-send", to, text] => udp_send(None, to, text),
        ["udp-send", from, to, text] => udp_send(Some(from), to, text),
        ["getrandom", n] => match n.parse::<usize>() {
            Ok(n) if (1..=4096).contains(&n) => {
                let mut buf = vec![0u8; n];
                match nix_getrandom(&mut buf) {
                    Ok(()) => {
                        let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
                        println!("{hex}");
                        0
                    }
                    Err(e) => {
                        eprintln!("cleave-guest getrandom: {e}");
                        1
                    }
                }
            }
            _ => {
                eprintln!("cleave-guest getrandom: N must be 1..=4096, not {n:?}");
                2
            }
        },
        _ => {
            eprintln!(
                "cleave-guest: this is a guest's init and must run as PID 1 \
                 (as a tool: cleave-guest getrandom N | udp-send [FROM] ADDR:PORT TEXT | clock-us)"
            );
            2
        }
    }
}

fn udp_send(from: Option<&str>, to: &str, text: &str) -> i32 {
    let result = (|| -> Result<(), String> {
        let to: std::net::SocketAddr =
            to.parse().map_err(|_| format!("{to:?} is not ADDR:PORT"))?;
        let from: std::net::IpAddr = match from {
            Some(f) => f.parse().map_err(|_| format!("{f:?} is not an address"))?,
            None if to.is_ipv4() => std::net::Ipv4Addr::UNSPECIFIED.into(),
            None => std::net::Ipv6Addr::UNSPECIFIED.into(),
        };
        let sock = std::net::UdpSocket::bind((from, 0)).map_err(|e| format!("bind {from}: {e}"))?;
        sock.send_to(text.as_bytes(), to)
            .map_err(|e| format!("send to {to}: {e}"))?;
        Ok(())
    })();
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cleave-guest udp-send: {e}");
            1
        }
    }
}

/// Fills `buf` from getrandom(2), blocking until the CRNG is ready.
fn nix_getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

fn run() -> Result<(), init::InitError> {
    // Block the signals PID 1 acts on before anything can send them; they are taken
    // synchronously below. SIGCHLD stays at its default: the reaper waits for children
    // itself, and children get a clean signal mask from the spawner.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    let _ = signals.thread_block();
    // Before any child exists: from here on it owns waitpid for the whole process.
    let reaper = Reaper::start();

    init::mounts::mount_all()?;
    init::stdio::ensure_console();
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(init::InitError::Cmdline)?;
    let hostname = cmdline_value(&cmdline, boot::FLAG_HOSTNAME).unwrap_or(boot::DEFAULT_HOSTNAME);
    init::set_hostname(hostname)?;

    let selftest = cmdline_flag(&cmdline, boot::FLAG_SELFTEST);
    let vsock = if selftest {
        None
    } else {
        match serve_vsock(reaper, &cmdline) {
            Ok(()) => Some(boot::AGENT_VSOCK_PORT),
            Err(e) => {
                // Still a usable console guest; the host sees no `vsock=` in the ready line.
                eprintln!("cleave-guest: not serving on vsock: {e}");
                None
            }
        }
    };

    println!(
        "{} version={} uptime_ms={} cpus={} mem_mib={}{}",
        boot::READY_PREFIX,
        env!("CARGO_PKG_VERSION"),
        init::uptime_ms(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        init::mem_total_mib().unwrap_or(0),
        vsock.map_or(String::new(), |p| format!(" vsock={p}")),
    );
    if selftest {
        end_guest(0);
    }

    loop {
        if let Ok(Signal::SIGTERM | Signal::SIGINT) = signals.wait() {
            println!("cleave-guest: shutting down");
            end_guest(0);
        }
    }
}

/// Listens on [`boot::AGENT_VSOCK_PORT`] and serves each connection on its own thread.
/// A cold boot serves at once ([`GateMode::Open`]); a template boot starts closed.
fn serve_vsock(reaper: Reaper, cmdline: &str) -> nix::Result<()> {
    let listener = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        listener.as_raw_fd(),
        &VsockAddr::new(CID_ANY, boot::AGENT_VSOCK_PORT),
    )?;
    listen(&listener, Backlog::new(64)?)?;

    let mut reseeder = KernelReseed::guest_default();
    reseeder.test_mode = reseed::TestMode::from_cmdline(cmdline);
    // A boot that will be captured as a template starts closed (and so does every fork
    // of it); a boot used as one sandbox as it is serves at once.
    let gate = if cmdline_flag(cmdline, boot::FLAG_TEMPLATE) {
        GateMode::RequireReseed
    } else {
        GateMode::Open
    };
    let mut config = ServerConfig::new(gate, Arc::new(reseeder));
    config.on_shutdown = Some(Arc::new(|| end_guest(0)));
    config.on_network = Some(Arc::new(cleave_guest::server::network::apply));
    let server = Server::new(config, reaper);

    std::thread::Builder::new()
        .name("cleave-accept".into())
        .spawn(move || accept_forever(listener, server))
        .map_err(|e| nix::Error::try_from(e).unwrap_or(nix::Error::EAGAIN))?;
    Ok(())
}

fn accept_forever(listener: OwnedFd, server: Server) {
    loop {
        // CLOEXEC: commands the agent spawns must not inherit the control channel.
        match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                if let Err(e) = server.spawn_connection(fd) {
                    eprintln!("cleave-guest: cannot serve a connection: {e}");
                }
            }
            Err(nix::Error::EINTR | nix::Error::ECONNABORTED) => {}
            Err(e) => {
                eprintln!("cleave-guest: accept on vsock failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}
