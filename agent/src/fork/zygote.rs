//! A zygote: a `cleave-fork-worker --zygote` that receives one template, decodes and
//! checks it and builds the seccomp filters once, and then forks a worker per request.
//! Each child starts where an exec'd worker would be after reading its template, so a
//! new worker costs a `clone3` — no exec, no dynamic loader, no decode, no filter build
//! (a quarter of the CPU of sustained fork churn).
//!
//! The child is born the node's child, not the zygote's (`CLONE_PARENT`): the node
//! reaps it and gets its `SIGCHLD` exactly as for an exec'd worker ([`Worker`]), and a
//! zygote that dies takes no worker with it. Jailed, it is born in its own PID namespace
//! and its cgroup leaf, as an exec'd worker is; the first thing it does is close the
//! zygote's socket, so nothing it runs can ask the zygote for anything. Then it serves
//! its fork exactly as an exec'd worker does ([`super::worker::serve_fork`]).
//!
//! What siblings share: the zygote's address-space layout (ASLR offsets) and its heap
//! and stack canary, as Android's app zygote does. `docs/SECURITY.md` says what that
//! means for an escape.
//!
//! The zygote confines itself with the worker process filter
//! ([`seccomp::ProcessFilter`]) before it forks anything, so each worker starts under it
//! and its thread filters install cheaply on top.
//!
//! The zygote must stay single-threaded: a child of a threaded process may only make
//! async-signal-safe calls until it execs, and this child never execs. It checks before
//! every clone.
//!
//! Protocol (one packet each, as [`super::worker`]): node → zygote `template` (state,
//! memfd), answered by `loaded`; then `spawn` (body: [`SpawnRequest`]; fds: the child's
//! end of its socket pair, then its cgroup directory when it has one), answered by
//! `spawned` (body: [`Spawned`]) or `failed`. Closing the socket ends the zygote.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::jail::{Jail, JailIds};
use super::process::{self, set_comm, Cloned, Process};
use super::worker::{
    self, claim, expect, recv, send, seqpacket_pair, Encoded, Kind, Worker, WorkerError, MAX_FDS,
    MAX_SMALL_MESSAGE,
};
use super::Template;
use crate::host::sched::{self, Class};
use crate::sync::lock;
use crate::vmm::seccomp;

/// The worker binary's flag that makes it a zygote.
pub const ZYGOTE_FLAG: &str = "--zygote";

/// A zygote's process name (`comm`), so it is told from its workers at a glance (`ps`):
/// forked without exec, they would otherwise share its name and command line.
pub const ZYGOTE_COMM: &str = "cleave-zygote";

/// A worker's process name, as the kernel cuts `cleave-fork-worker` (15 bytes).
const WORKER_COMM: &str = "cleave-fork-wor";

/// The body of `spawn`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SpawnRequest {
    /// `UID:GID` the child jails itself as.
    jail: Option<String>,
    /// Whether a cgroup directory fd follows the socket.
    cgroup: bool,
}

/// The body of `spawned`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Spawned {
    pid: u32,
}

/// The node's handle on a zygote process. Dropping it ends the zygote (its children,
/// the node's own, live on).
pub struct Zygote {
    /// The zygote as a process with a socket: ended (closed, waited for, killed after a
    /// grace) as a worker is.
    process: Mutex<Worker>,
    guest_bytes: u64,
    /// Its socket failed (it died, or broke the protocol): it is never asked again.
    broken: AtomicBool,
}

impl Zygote {
    /// Starts `exe` (the `cleave-fork-worker` binary) as a zygote for `template` and
    /// waits until it holds it.
    pub fn start(exe: &Path, template: &Encoded) -> Result<Zygote, WorkerError> {
        // From here, dropping `process` ends it.
        let process = Worker::spawn_in(exe, &[ZYGOTE_FLAG], None, None)?;
        let sock = process.sock()?;
        template.send_to(sock)?;
        expect(sock, Kind::Loaded, "the zygote's loaded template")?;
        Ok(Zygote {
            process: Mutex::new(process),
            guest_bytes: template.guest_bytes(),
            broken: AtomicBool::new(false),
        })
    }

    pub fn pid(&self) -> u32 {
        lock(&self.process).pid()
    }

    /// Whether the zygote can still serve: running, and its socket has not failed (a
    /// zygote killed a moment ago may not have exited yet, but its socket already says
    /// so).
    pub fn is_alive(&self) -> bool {
        !self.broken.load(Ordering::Relaxed) && lock(&self.process).ended().is_none()
    }

    /// A new worker forked from the zygote, with its shell prepared: what
    /// [`Worker::spawn_for`] and [`Worker::load`] make, without exec or decode. With
    /// `jail`, it runs as a uid of its range (in its own cgroup leaf, when the jail has
    /// cgroups), jailed before it builds anything.
    pub fn spawn(&self, jail: Option<&Jail>) -> Result<Worker, WorkerError> {
        let claimed = claim(jail, self.guest_bytes)?;
        let (ours, theirs) = seqpacket_pair()?;
        let (lease, leaf) = match claimed {
            Some((lease, leaf)) => (Some(lease), leaf),
            None => (None, None),
        };
        let cgroup = leaf
            .as_ref()
            .map(|l| process::open_cgroup(l.path()))
            .transpose()
            .map_err(|e| {
                WorkerError::Jail(std::io::Error::other(format!("opening its cgroup: {e}")))
            })?;
        let request = SpawnRequest {
            jail: lease.as_ref().map(|l| l.ids().arg()),
            cgroup: cgroup.is_some(),
        };
        let body = serde_json::to_vec(&request).map_err(WorkerError::Encode)?;
        let pid = {
            let mut fds = vec![theirs.as_fd()];
            fds.extend(cgroup.as_ref().map(AsFd::as_fd));
            let zygote = lock(&self.process);
            let sock = zygote.sock()?;
            let answer = send(sock, Kind::Spawn, &body, &fds, "a spawn request")
                .and_then(|()| expect(sock, Kind::Spawned, "the spawned worker's pid"))
                .and_then(|msg| {
                    serde_json::from_slice::<Spawned>(&msg.body).map_err(|e| {
                        WorkerError::Protocol {
                            what: "spawned",
                            why: e.to_string(),
                        }
                    })
                });
            match answer {
                Ok(spawned) => spawned.pid,
                Err(e) => {
                    // `failed` is this spawn's error; anything else is the zygote's.
                    if !matches!(e, WorkerError::Remote(_)) {
                        self.broken.store(true, Ordering::Relaxed);
                    }
                    return Err(e);
                }
            }
        };
        // Only the child holds its end now: its exit closes the socket.
        drop((theirs, cgroup));
        let child = Process::adopt(pid).map_err(|e| WorkerError::Protocol {
            what: "spawned",
            why: format!("pid {pid} is not a child of ours: {e}"),
        })?;
        let mut worker = Worker::forked(ours, child, lease, leaf);
        // On failure, dropping it reaps the child and frees its uid and cgroup.
        worker.await_shell()?;
        Ok(worker)
    }
}

/// The zygote's side, run by `cleave-fork-worker --zygote` with the node's socket as
/// `sock`. Returns when the node closes the socket, or on the first error in the zygote
/// itself (after telling the node why). In each child it never returns: the child serves
/// its fork and exits.
pub fn serve(sock: OwnedFd) -> Result<(), WorkerError> {
    let ended = serve_spawns(&sock);
    match ended {
        Ok(Ended::Closed) => Ok(()),
        Ok(Ended::InChild(child)) => {
            // Nothing the child runs may reach the zygote.
            drop(sock);
            child.run()
        }
        Err(e) => {
            let result = Err(e);
            worker::tell_failure(&sock, &result);
            result
        }
    }
}

/// How [`serve_spawns`] returned.
enum Ended {
    /// The node closed the socket.
    Closed,
    /// In a new child, with what it needs.
    InChild(Box<Child>),
}

/// A child's work: the fork it serves.
struct Child {
    sock: OwnedFd,
    jail: Option<JailIds>,
    template: Template,
    filters: Arc<seccomp::Filters>,
    /// Whether the worker prepares in the idle class (`worker::serve_fork`).
    background: bool,
}

impl Child {
    fn run(self) -> ! {
        // `template` is borrowed, never dropped: its pages stay shared with the zygote.
        let result = set_comm(WORKER_COMM).and_then(|()| {
            worker::serve_fork(
                &self.sock,
                &self.template,
                self.jail,
                self.filters,
                self.background,
            )
        });
        worker::tell_failure(&self.sock, &result);
        let code = match result {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("cleave-fork-worker: {e}");
                1
            }
        };
        // SAFETY: _exit ends the child without running the zygote's destructors or
        // atexit handlers, which are the zygote's, not its copy's.
        unsafe { libc::_exit(code) }
    }
}

fn serve_spawns(sock: &OwnedFd) -> Result<Ended, WorkerError> {
    set_comm(ZYGOTE_COMM)?;
    let template = worker::receive_template(sock)?;
    let filters = Arc::new(seccomp::Filters::build()?);
    // Inherited by every child, as the filters are.
    seccomp::install_violation_handler().map_err(WorkerError::Seccomp)?;
    // From here the zygote, and every worker it forks, calls only what a worker needs.
    seccomp::ProcessFilter::build()?.apply()?;
    // Forking workers for the pool is background work; each worker starts in this class
    // (unless the node could not move it back: asked once, with the node's credentials).
    let background = sched::may_leave_background();
    if background {
        worker::schedule("zygote", Class::Background)?;
    }
    send(sock, Kind::Loaded, &[], &[], "loaded")?;
    while let Some(msg) = recv(sock, MAX_SMALL_MESSAGE, MAX_FDS, "a spawn request")? {
        let (child_sock, jail, cgroup) = parse(msg)?;
        single_threaded().map_err(WorkerError::Jail)?;
        // SAFETY: this process has one thread (checked just above, and nothing in this
        // loop starts one), so the child may run any code: no lock can be held by a
        // thread that does not exist in it.
        let cloned =
            unsafe { process::clone_child(jail.is_some(), cgroup.as_ref().map(AsFd::as_fd), true) };
        drop(cgroup);
        match cloned {
            Ok(Cloned::Child) => {
                return Ok(Ended::InChild(Box::new(Child {
                    sock: child_sock,
                    jail,
                    template,
                    filters,
                    background,
                })))
            }
            Ok(Cloned::Parent(pid)) => {
                drop(child_sock);
                let body = serde_json::to_vec(&Spawned { pid }).map_err(WorkerError::Encode)?;
                send(sock, Kind::Spawned, &body, &[], "spawned")?;
            }
            // The node hears why; the zygote itself is fine and serves the next request.
            Err(e) => {
                drop(child_sock);
                let failed = Err(WorkerError::Spawn {
                    exe: "a worker from the zygote".into(),
                    source: e,
                });
                worker::tell_failure(sock, &failed);
            }
        }
    }
    Ok(Ended::Closed)
}

/// A `spawn` request's parts: the child's socket, its jail, its cgroup directory.
fn parse(msg: worker::Message) -> Result<(OwnedFd, Option<JailIds>, Option<OwnedFd>), WorkerError> {
    let protocol = |why: String| WorkerError::Protocol {
        what: "a spawn request",
        why,
    };
    if msg.kind != Kind::Spawn {
        return Err(protocol(format!("got {:?}", msg.kind)));
    }
    let request: SpawnRequest =
        serde_json::from_slice(&msg.body).map_err(|e| protocol(e.to_string()))?;
    let jail = match &request.jail {
        Some(ids) => Some(
            JailIds::parse(ids).ok_or_else(|| protocol(format!("jail {ids:?} is not UID:GID")))?,
        ),
        None => None,
    };
    let msg_fds = msg.fds.len();
    let mut fds = msg.fds.into_iter();
    let (Some(sock), cgroup, None) = (fds.next(), fds.next(), fds.next()) else {
        return Err(protocol(format!(
            "{} fds attached: the socket, then at most its cgroup",
            msg_fds
        )));
    };
    if request.cgroup != cgroup.is_some() {
        return Err(protocol(format!(
            "cgroup {} but {} fds attached",
            request.cgroup,
            1 + usize::from(cgroup.is_some())
        )));
    }
    Ok((sock, jail, cgroup))
}

/// Fails unless this process has exactly one thread.
fn single_threaded() -> std::io::Result<()> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads == 1 {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "the zygote has {threads} threads; it forks without exec, so it must have one"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_thread_is_not_alone() {
        // The test harness runs tests on threads of their own: the check sees them.
        let e = single_threaded().unwrap_err().to_string();
        assert!(e.contains("threads"), "{e}");
    }

    fn message(body: &[u8], fds: usize) -> worker::Message {
        let fds = (0..fds)
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
            .collect();
        worker::Message {
            kind: Kind::Spawn,
            body: body.to_vec(),
            fds,
        }
    }

    #[test]
    fn a_malformed_spawn_request_is_refused_with_why() {
        let refused = |body: &[u8], fds| match parse(message(body, fds)) {
            Ok(_) => panic!(
                "{:?} with {fds} fds was accepted",
                String::from_utf8_lossy(body)
            ),
            Err(e) => e.to_string(),
        };
        assert!(
            refused(br#"{"jail":null,"cgroup":false}"#, 0).contains("0 fds attached: the socket")
        );
        assert!(refused(br#"{"jail":null,"cgroup":true}"#, 1).contains("cgroup true but 1 fds"));
        assert!(refused(br#"{"jail":null,"cgroup":false}"#, 2).contains("cgroup false but 2 fds"));
        assert!(refused(br#"{"jail":"0:0","cgroup":false}"#, 1).contains("is not UID:GID"));
        assert!(refused(b"not json", 1).contains("a spawn request"));
        let (_, jail, cgroup) =
            parse(message(br#"{"jail":"70000:70001","cgroup":true}"#, 2)).unwrap();
        assert_eq!(
            jail,
            Some(JailIds {
                uid: 70000,
                gid: 70001
            })
        );
        assert!(cgroup.is_some());
    }

    #[test]
    fn a_spawn_request_round_trips() {
        let r = SpawnRequest {
            jail: Some("70000:70000".into()),
            cgroup: true,
        };
        let back: SpawnRequest = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
