//! Network-namespace helpers for tests (feature `testutil`).
//!
//! [`NetNs`] creates a uniquely named namespace and deletes it on `Drop`,
//! also when the test panics. Code runs inside it on a short-lived thread
//! that `setns`es into it ([`NetNs::run`]); commands run through
//! `ip netns exec` ([`NetNs::exec`], [`NetNs::spawn`]). [`veth`] links two
//! namespaces. Nothing here touches the caller's own namespace.

use std::fs::File;
use std::io;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{setns, CloneFlags};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace that exists for the guard's lifetime.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

fn check(what: &str, out: Output) -> io::Result<Output> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl NetNs {
    /// Creates `cleave-<tag>-<pid>-<n>` with its loopback up.
    pub fn new(tag: &str) -> io::Result<NetNs> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("cleave-{tag}-{}-{n}", std::process::id());
        check(
            "ip netns add",
            Command::new("ip").args(["netns", "add", &name]).output()?,
        )?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a new thread inside the namespace and returns its result.
    /// Sockets (and a [`Firewall`](crate::Firewall)) created in `f` stay in
    /// the namespace after `f` returns. A panic in `f` is re-raised here.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let file = File::open(format!("/run/netns/{}", self.name))?;
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                Ok(f())
            });
            match h.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// `ip -n <ns> <args>`; fails with ip's stderr.
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()?;
        check(&format!("ip -n {} {}", self.name, args.join(" ")), out).map(|_| ())
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]).args(args);
        c
    }

    /// Runs a command inside the namespace and waits for it.
    pub fn exec(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        self.command(program, args).output()
    }

    /// Like [`exec`](Self::exec) but fails unless it exits 0.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        check(
            &format!("{program} {}", args.join(" ")),
            self.exec(program, args)?,
        )
    }

    /// Starts a command inside the namespace; it is killed when the guard
    /// drops.
    pub fn spawn(&self, program: &str, args: &[&str]) -> io::Result<ChildGuard> {
        let child = self
            .command(program, args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(ChildGuard(child))
    }

    /// Writes a sysctl inside the namespace, e.g.
    /// `("net/ipv4/ip_forward", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        let path = format!("/proc/sys/{key}");
        self.run(|| std::fs::write(&path, value))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A child process killed (and reaped) on drop.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Creates a veth pair: `a_if` in `a`, `b_if` in `b`, both up. Deleting
/// either namespace removes the pair.
pub fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> io::Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])
}
