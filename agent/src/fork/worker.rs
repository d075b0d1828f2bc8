//! One process per fork. A worker is a small process (`cleave-fork-worker`) that gets a
//! template — its state, and its sealed memfd passed with `SCM_RIGHTS` — over a
//! `SOCK_SEQPACKET` socket on its stdin, prepares a VM [`Shell`](super::Shell) for it,
//! and on `go` finishes and starts the fork. The fork's memory, vCPU and device fds live
//! only in that process: a VMM escape in one fork sees no other fork's memory or fds.
//!
//! Messages are one packet each: a kind byte, then a JSON body. Parent → worker:
//! `template` (body: [`MachineState`], one fd: the memfd), `go`, `probe`. Worker →
//! parent: `shell-ready`, `ready` (body: [`ReadyReport`]), `status` (body: exit counts),
//! `failed` (body: the error text). Closing the socket ends the fork: the worker stops
//! the VM and exits, so teardown cost lands in that process, off everyone's fork path.

use std::borrow::Borrow;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};

use super::jail::{self, JailIds, JailLease};
use super::process::{Birth, Process};
use super::sealed::{SealError, SealedMemory};
use super::state::MachineState;
use super::{RestoreError, Shell, Template};
use crate::devices::virtio::net::{NetBackend, Tap};
use crate::devices::virtio::vsock::VsockConfig;
use crate::host::cgroup::CgroupLeaf;
use crate::host::sched::{self, Class};
use crate::vmm::control::ExitCounts;
use crate::vmm::runtime_dir::{RuntimeDir, VSOCK_SOCKET};
use crate::vmm::seccomp::{self, SeccompError};
use crate::vmm::threads::VmThreads;
use crate::vmm::{self, VmmError};

/// Largest packet either side accepts (a template's state is ~30 KB of JSON per vCPU).
pub const MAX_MESSAGE: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Kind {
    Template = 1,
    ShellReady = 2,
    Go = 3,
    Ready = 4,
    Probe = 5,
    Status = 6,
    Failed = 7,
    Spawn = 8,
    Spawned = 9,
    Loaded = 10,
    Boot = 11,
    Frozen = 12,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        [
            Kind::Template,
            Kind::ShellReady,
            Kind::Go,
            Kind::Ready,
            Kind::Probe,
            Kind::Status,
            Kind::Failed,
            Kind::Spawn,
            Kind::Spawned,
            Kind::Loaded,
            Kind::Boot,
            Kind::Frozen,
        ]
        .into_iter()
        .find(|k| *k as u8 == b)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("fork worker: creating its socket pair: {0}")]
    Socket(nix::Error),
    #[error(
        "fork worker: starting {exe}: {source}{}",
        crate::host::tasks_hint(source)
    )]
    Spawn { exe: String, source: std::io::Error },
    #[error("fork worker: sending {what}: {source}")]
    Send {
        what: &'static str,
        source: nix::Error,
    },
    #[error("fork worker: receiving {what}: {source}")]
    Recv {
        what: &'static str,
        source: nix::Error,
    },
    #[error("fork worker: the other side closed the socket while we waited for {0}")]
    Closed(&'static str),
    #[error("fork worker: malformed message while waiting for {what}: {why}")]
    Protocol { what: &'static str, why: String },
    #[error("fork worker failed: {0}")]
    Remote(String),
    #[error("fork worker: encoding the template state: {0}")]
    Encode(serde_json::Error),
    #[error("fork worker: the template state is invalid: {0}")]
    BadState(String),
    #[error("fork worker: {0}")]
    Seal(#[from] SealError),
    #[error("fork worker: {0}")]
    Vmm(#[from] VmmError),
    #[error("fork worker: {0}")]
    Restore(#[from] RestoreError),
    #[error("fork worker: {0}")]
    RuntimeDir(#[from] crate::vmm::runtime_dir::RuntimeDirError),
    #[error("fork worker: waiting for it to exit: {0}")]
    Wait(std::io::Error),
    #[error("fork worker: {0}")]
    Jail(std::io::Error),
    #[error("fork worker: {0}")]
    Filter(#[from] SeccompError),
    #[error("fork worker: {0}")]
    Cgroup(#[from] crate::host::cgroup::CgroupError),
    #[error("fork worker: installing the seccomp violation handler: {0}")]
    Seccomp(std::io::Error),
    #[error("fork worker: moving its {thread} to the {class:?} scheduling class: {source}")]
    Schedule {
        thread: &'static str,
        class: crate::host::sched::Class,
        source: std::io::Error,
    },
    #[error("template worker: {0}")]
    Image(String),
    #[error(transparent)]
    Freeze(#[from] super::freeze::FreezeError),
    #[error("{what} ended before it answered: {how}")]
    Ended { what: &'static str, how: String },
    #[error("worker: no answer with {what} within {after:?}; it was stopped")]
    Deadline { what: &'static str, after: Duration },
}

/// What a worker reports when its fork is ready to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadyReport {
    pub pid: u32,
    /// The fork's hybrid-vsock socket (in the worker's own runtime directory), when the
    /// template has a vsock device.
    pub vsock: Option<std::path::PathBuf>,
    /// Building the shell, before the request.
    pub prepare_us: u64,
    /// Restoring state into it and starting the vCPUs, after the request.
    pub finish_us: u64,
}

/// The body of `shell-ready`: the runtime directory the parent removes after reaping a
/// jailed worker (a jailed worker cannot remove it itself).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ShellReady {
    runtime_dir: Option<PathBuf>,
}

/// The body of `go`: the name of the tap whose fd comes with it, if one does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct GoRequest {
    tap: Option<String>,
}

#[derive(Debug)]
pub(super) struct Message {
    pub(super) kind: Kind,
    pub(super) body: Vec<u8>,
    pub(super) fds: Vec<OwnedFd>,
}

/// Most fds one packet carries (a spawn request: the worker's socket and its cgroup).
pub(super) const MAX_FDS: usize = 2;

pub(super) fn send(
    sock: &OwnedFd,
    kind: Kind,
    body: &[u8],
    fds: &[BorrowedFd<'_>],
    what: &'static str,
) -> Result<(), WorkerError> {
    let head = [kind as u8];
    let iov = [IoSlice::new(&head), IoSlice::new(body)];
    let raw: Vec<std::os::fd::RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(|source| WorkerError::Send { what, source })?;
    Ok(())
}

/// A connected `SOCK_SEQPACKET` pair (close-on-exec): the parent's end and the one a
/// worker gets.
pub(super) fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd), WorkerError> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(WorkerError::Socket)
}

/// Largest packet other than a template (requests, reports, errors).
pub(super) const MAX_SMALL_MESSAGE: usize = 64 << 10;

/// Receives one packet of at most `max` bytes and `max_fds` fds; `Ok(None)` when the
/// other side closed the socket.
pub(super) fn recv(
    sock: &OwnedFd,
    max: usize,
    max_fds: usize,
    what: &'static str,
) -> Result<Option<Message>, WorkerError> {
    // Sized to the packet, not to `max`: zeroing 64 KiB for a request of a few bytes costs
    // a worker forked from a zygote 16 copy-on-write page faults.
    // (`recvmsg`, the one receive call the control thread's seccomp filter allows.)
    let mut one = [0u8; 1];
    let pending = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut [IoSliceMut::new(&mut one)],
        None,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC,
    )
    .map_err(|source| WorkerError::Recv { what, source })?
    .bytes;
    // A longer packet is cut at `max`, which the receive below reports as truncated.
    let mut buf = vec![0u8; pending.clamp(1, max)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
    let (len, truncated, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|source| WorkerError::Recv { what, source })?;
        let mut fds = Vec::new();
        for c in msg
            .cmsgs()
            .map_err(|source| WorkerError::Recv { what, source })?
        {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: SCM_RIGHTS just installed `fd` in this process's table (close-on-
                    // exec); nothing else refers to it, so the OwnedFd is its only owner.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        let truncated = msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (msg.bytes, truncated, fds)
    };
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    let protocol = |why: String| WorkerError::Protocol { what, why };
    if truncated {
        return Err(protocol(format!("longer than {max} bytes or too many fds")));
    }
    if fds.len() > max_fds {
        return Err(protocol(format!(
            "{} fds attached, at most {max_fds} expected",
            fds.len()
        )));
    }
    let kind = Kind::from_byte(buf[0]).ok_or_else(|| protocol(format!("kind {}", buf[0])))?;
    buf.truncate(len);
    buf.remove(0);
    Ok(Some(Message {
        kind,
        body: buf,
        fds,
    }))
}

/// Receives a packet of `kind`; a `failed` packet becomes [`WorkerError::Remote`].
pub(super) fn expect(
    sock: &OwnedFd,
    kind: Kind,
    what: &'static str,
) -> Result<Message, WorkerError> {
    let (max, max_fds) = match kind {
        Kind::Template | Kind::Frozen => (MAX_MESSAGE, 1),
        Kind::Spawn | Kind::Boot => (MAX_SMALL_MESSAGE, MAX_FDS),
        _ => (MAX_SMALL_MESSAGE, 0),
    };
    let msg = recv(sock, max, max_fds, what)?.ok_or(WorkerError::Closed(what))?;
    if msg.kind == Kind::Failed {
        return Err(WorkerError::Remote(remote_text(&msg.body)));
    }
    if msg.kind != kind {
        return Err(WorkerError::Protocol {
            what,
            why: format!("got {:?}", msg.kind),
        });
    }
    Ok(msg)
}

/// A template ready to hand to workers: its state encoded once.
pub struct Encoded {
    body: Vec<u8>,
    memfd: Arc<File>,
    guest_bytes: u64,
}

impl Encoded {
    pub fn new(template: &Template) -> Result<Self, WorkerError> {
        Ok(Self {
            body: serde_json::to_vec(template.state()).map_err(WorkerError::Encode)?,
            memfd: template.memory().file().clone(),
            guest_bytes: template.state().machine.mem.bytes(),
        })
    }

    /// Sends it (state and memfd) as a `template` packet.
    pub(super) fn send_to(&self, sock: &OwnedFd) -> Result<(), WorkerError> {
        send(
            sock,
            Kind::Template,
            &self.body,
            &[self.memfd.as_fd()],
            "the template",
        )
    }

    /// The guest's memory size.
    pub fn guest_bytes(&self) -> u64 {
        self.guest_bytes
    }

    pub fn len(&self) -> usize {
        self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }
}

/// How long a worker has to stop its VM and exit once its socket is closed, before it
/// is killed.
pub const EXIT_GRACE: Duration = Duration::from_secs(5);

/// The parent's handle on one worker process. Dropping it ends the worker as
/// [`destroy`](Worker::destroy) does.
pub struct Worker {
    sock: Option<OwnedFd>,
    child: Option<Process>,
    /// A jailed worker's runtime directory, removed here once it is reaped.
    runtime_dir: Option<PathBuf>,
    /// A jailed worker's cgroup, removed once it is reaped.
    cgroup: Option<CgroupLeaf>,
    /// A jailed worker's uid, held until it is reaped.
    jail: Option<JailLease>,
}

impl Worker {
    /// Starts `exe` (the `cleave-fork-worker` binary) with its end of the socket as stdin.
    pub fn spawn(exe: &Path) -> Result<Worker, WorkerError> {
        Self::spawn_in(exe, &[], None, None)
    }

    /// [`spawn`](Self::spawn), and the worker jails itself as `jail`'s uid/gid before it
    /// builds anything for its fork; with `cgroup`, it runs in that leaf from before it is
    /// sent anything.
    pub fn spawn_jailed(
        exe: &Path,
        jail: JailLease,
        cgroup: Option<CgroupLeaf>,
    ) -> Result<Worker, WorkerError> {
        Self::spawn_in(exe, &[], Some(jail), cgroup)
    }

    /// A worker as the node starts one: with `jail`, [`spawn_jailed`](Self::spawn_jailed)
    /// as a uid claimed from the jail's range, in a cgroup leaf sized for a guest of
    /// `guest_bytes` when the jail has cgroups; without, [`spawn`](Self::spawn).
    pub fn spawn_for(
        exe: &Path,
        jail: Option<&jail::Jail>,
        guest_bytes: u64,
    ) -> Result<Worker, WorkerError> {
        match claim(jail, guest_bytes)? {
            Some((lease, leaf)) => Self::spawn_jailed(exe, lease, leaf),
            None => Self::spawn(exe),
        }
    }

    /// Starts `exe` with `role` flags (none: a fork's worker), jailed as `jail` in
    /// `cgroup` when given.
    pub(super) fn spawn_in(
        exe: &Path,
        role: &[&str],
        jail: Option<JailLease>,
        cgroup: Option<CgroupLeaf>,
    ) -> Result<Worker, WorkerError> {
        let (ours, theirs) = seqpacket_pair()?;
        // Jailed, it is born in its own PID namespace (PID 1 there, alone) and its cgroup.
        let ids = jail.as_ref().map(|j| j.ids().arg());
        let mut args = role.to_vec();
        if let Some(ids) = &ids {
            args.extend(["--jail", ids.as_str()]);
        }
        let birth = Birth {
            new_pid_namespace: jail.is_some(),
            cgroup: cgroup.as_ref().map(CgroupLeaf::path),
        };
        let child =
            Process::spawn(exe, &args, theirs, &birth).map_err(|source| WorkerError::Spawn {
                exe: exe.display().to_string(),
                source,
            })?;
        Ok(Worker {
            sock: Some(ours),
            child: Some(child),
            runtime_dir: None,
            cgroup,
            jail,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Process::id)
    }

    pub(super) fn sock(&self) -> Result<&OwnedFd, WorkerError> {
        self.sock
            .as_ref()
            .ok_or(WorkerError::Closed("a live worker"))
    }

    /// A handle on a process and its socket that we did not start with
    /// [`spawn_in`](Self::spawn_in): a worker a [zygote](super::zygote) forked for us
    /// (our child, by `CLONE_PARENT`, already holding the template).
    pub(super) fn forked(
        sock: OwnedFd,
        child: Process,
        jail: Option<JailLease>,
        cgroup: Option<CgroupLeaf>,
    ) -> Worker {
        Worker {
            sock: Some(sock),
            child: Some(child),
            runtime_dir: None,
            cgroup,
            jail,
        }
    }

    /// Hands the worker a template and waits until it has prepared a shell for it.
    pub fn load(&mut self, template: &Encoded) -> Result<(), WorkerError> {
        template.send_to(self.sock()?)?;
        self.await_shell()
    }

    /// Waits until the worker, which holds its template, has prepared a shell for it.
    pub(super) fn await_shell(&mut self) -> Result<(), WorkerError> {
        let msg = expect(self.sock()?, Kind::ShellReady, "the prepared shell")?;
        let ready: ShellReady = if msg.body.is_empty() {
            ShellReady::default()
        } else {
            serde_json::from_slice(&msg.body).map_err(|e| WorkerError::Protocol {
                what: "shell-ready",
                why: e.to_string(),
            })?
        };
        // Only a directory under the runtime base, named as workers name theirs, is ever
        // removed on a worker's word.
        self.runtime_dir = ready.runtime_dir.filter(|d| {
            d.parent() == Some(RuntimeDir::base().as_path())
                && d.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("vm-{}-", self.pid())))
        });
        Ok(())
    }

    /// The fork request: the worker restores and starts its fork, its NIC on `tap` (or
    /// unplugged: a fork without network).
    pub fn go(&mut self, tap: Option<&Tap>) -> Result<ReadyReport, WorkerError> {
        let req = GoRequest {
            tap: tap.map(|t| t.name().to_string()),
        };
        let body = serde_json::to_vec(&req).map_err(WorkerError::Encode)?;
        let sock = self.sock()?;
        let fds: Vec<BorrowedFd> = tap.map(|t| t.as_fd()).into_iter().collect();
        // The worker prepared in the background class; from `go` until it is let go, its
        // control thread (its main thread, whose id is its pid) answers us. Only we can
        // move it back: leaving the class takes CAP_SYS_NICE (a worker whose node lacks
        // it stayed out of the class, and this is then no change, which takes nothing).
        // The pid is still this worker's: we have not reaped it. A failure costs speed,
        // not correctness; a worker that died is reported by the exchange below.
        if let Err(e) = sched::set_thread(self.pid(), Class::Interactive) {
            tracing::warn!(
                pid = self.pid(),
                "the fork's control thread stays in the idle scheduling class: {e}"
            );
        }
        send(sock, Kind::Go, &body, &fds, "go")?;
        let msg = expect(sock, Kind::Ready, "ready")?;
        serde_json::from_slice(&msg.body).map_err(|e| WorkerError::Protocol {
            what: "ready",
            why: e.to_string(),
        })
    }

    /// The running fork's exit counters (proof that its guest runs).
    pub fn probe(&mut self) -> Result<ExitCounts, WorkerError> {
        let sock = self.sock()?;
        send(sock, Kind::Probe, &[], &[], "probe")?;
        let msg = expect(sock, Kind::Status, "status")?;
        serde_json::from_slice(&msg.body).map_err(|e| WorkerError::Protocol {
            what: "status",
            why: e.to_string(),
        })
    }

    /// Ends the fork: closes the socket (the worker stops its VM and exits) and reaps it,
    /// killing it when it has not exited within [`EXIT_GRACE`].
    pub fn destroy(mut self) -> Result<ExitStatus, WorkerError> {
        self.end(EXIT_GRACE)
    }

    fn end(&mut self, grace: Duration) -> Result<ExitStatus, WorkerError> {
        drop(self.sock.take());
        let Some(mut child) = self.child.take() else {
            return Err(WorkerError::Closed("a live worker"));
        };
        let exited = matches!(child.try_wait(), Ok(Some(_)));
        if !exited && !exits_within(&child, grace) {
            tracing::warn!(
                pid = child.id(),
                grace_ms = grace.as_millis() as u64,
                "fork worker did not exit after its socket closed; killing it"
            );
            let _ = child.kill();
        }
        let pid = child.id();
        let status = child.wait().map_err(WorkerError::Wait);
        if let Ok(st) = &status {
            report_end(pid, st);
        }
        // A worker that failed before it reported its directory may still have made one.
        let dirs = match self.runtime_dir.take() {
            Some(dir) => vec![dir],
            None => dirs_of(pid),
        };
        for dir in dirs {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(path = %dir.display(), error = %e, "removing a worker's runtime directory");
            }
        }
        // Its cgroup and uid are free only now that nothing runs in or as them.
        drop(self.cgroup.take());
        drop(self.jail.take());
        status
    }

    /// How the worker ended, if it has (without waiting).
    pub fn ended(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Closes the socket without waiting: the worker tears its VM down on its own time.
    /// Reap the returned child later.
    pub fn release(mut self) -> Process {
        drop(self.sock.take());
        self.child
            .take()
            .expect("a worker's child is taken only once")
    }
}

/// With `jail`, what a new worker becomes: a uid claimed from its range and, when the jail
/// has cgroups, a leaf sized for a guest of `guest_bytes`.
pub(super) fn claim(
    jail: Option<&jail::Jail>,
    guest_bytes: u64,
) -> Result<Option<(JailLease, Option<CgroupLeaf>)>, WorkerError> {
    let Some(jail) = jail else {
        return Ok(None);
    };
    let lease = jail
        .uids
        .claim(0)
        .map_err(|e| WorkerError::Jail(std::io::Error::other(e)))?;
    let leaf = match &jail.cgroups {
        Some(c) => Some(c.leaf_for(lease.ids(), guest_bytes)?),
        None => None,
    };
    Ok(Some((lease, leaf)))
}

/// The runtime directories named for worker `pid`.
fn dirs_of(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("vm-{pid}-");
    std::fs::read_dir(RuntimeDir::base())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .map(|e| e.path())
        .collect()
}

/// Why a worker ended, in words, when it was not the plain exit it makes after its socket
/// closes.
pub fn describe_end(status: &ExitStatus) -> Option<String> {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => None,
        (Some(seccomp::VIOLATION_EXIT), _) => Some(format!(
            "killed by its seccomp filter (exit {}): it made a system call its thread may \
             not; the worker's stderr line above names the thread and the call",
            seccomp::VIOLATION_EXIT
        )),
        (Some(code), _) => Some(format!("exited with status {code}")),
        (None, Some(sig)) => Some(format!("killed by signal {sig}")),
        (None, None) => Some(format!("ended: {status}")),
    }
}

fn report_end(pid: u32, status: &ExitStatus) {
    if let Some(why) = describe_end(status) {
        tracing::warn!(pid, "fork worker {why}");
    }
}

/// Waits up to `grace` for `child` to exit (without reaping it), on its pidfd: no polling
/// interval, so a worker that exits at once is reaped at once.
fn exits_within(child: &Process, grace: Duration) -> bool {
    let pidfd = match child.pidfd() {
        Ok(Some(fd)) => fd,
        Ok(None) => return true,
        // No fd to wait on (the node is at its fd limit): the caller kills it instead.
        Err(_) => return false,
    };
    let mut fds = [nix::poll::PollFd::new(
        pidfd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = u16::try_from(grace.as_millis()).unwrap_or(u16::MAX);
    loop {
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
            Ok(n) => return n > 0,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return true,
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.end(EXIT_GRACE);
        }
    }
}

/// The worker's side, run by `cleave-fork-worker` with the socket as `sock`. Returns when
/// the parent closes the socket (after stopping the fork) or on the first error (after
/// telling the parent why).
pub fn serve(sock: OwnedFd, jail: Option<JailIds>) -> Result<(), WorkerError> {
    let result = serve_inner(&sock, jail);
    tell_failure(&sock, &result);
    result
}

/// Tells the parent why we failed, when we did (best effort: it may be gone).
pub(super) fn tell_failure(sock: &OwnedFd, result: &Result<(), WorkerError>) {
    if let Err(e) = result {
        let _ = send(
            sock,
            Kind::Failed,
            failure_text(e).as_bytes(),
            &[],
            "the error",
        );
    }
}

/// Longest error text a worker sends or the node takes from one (an error may quote
/// guest output, and a worker a guest escaped into may say anything).
const MAX_ERROR_TEXT: usize = 8 << 10;

/// An error's text as a `failed` packet carries it.
fn failure_text(e: &WorkerError) -> String {
    bounded_text(&e.to_string())
}

/// A worker's `failed` text as the node keeps and logs it: bounded, control characters
/// (but newlines) shown as `?`.
fn remote_text(body: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .collect();
    bounded_text(&text)
}

/// `text` cut at [`MAX_ERROR_TEXT`] bytes (on a character boundary), marked when cut.
fn bounded_text(text: &str) -> String {
    if text.len() <= MAX_ERROR_TEXT {
        return text.to_owned();
    }
    let mut cut = MAX_ERROR_TEXT;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{} [cut]", &text[..cut])
}

/// Waits until `sock` has something to read (a packet, or the peer's close), up to
/// `within`; `false` when it has not by then.
pub(super) fn readable_within(sock: &OwnedFd, within: Duration) -> Result<bool, WorkerError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // poll takes at most i32::MAX ms; a longer wait goes round again.
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) if Instant::now() >= deadline => return Ok(false),
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => return Ok(true),
            Err(source) => {
                return Err(WorkerError::Recv {
                    what: "the worker's answer",
                    source,
                })
            }
        }
    }
}

fn serve_inner(sock: &OwnedFd, jail: Option<JailIds>) -> Result<(), WorkerError> {
    let template = receive_template(sock)?;
    // Built here, off the fork path; applied by each thread as the fork starts.
    let filters = Arc::new(seccomp::Filters::build()?);
    seccomp::install_violation_handler().map_err(WorkerError::Seccomp)?;
    serve_fork(sock, template, jail, filters, sched::may_leave_background())
}

/// Receives the template (state and sealed memfd) and checks it.
pub(super) fn receive_template(sock: &OwnedFd) -> Result<Template, WorkerError> {
    let Message { body, mut fds, .. } = expect(sock, Kind::Template, "the template")?;
    let memfd = fds.pop().ok_or_else(|| WorkerError::Protocol {
        what: "the template",
        why: "no memfd attached".into(),
    })?;
    let state: MachineState = serde_json::from_slice(&body).map_err(|e| WorkerError::Protocol {
        what: "the template",
        why: e.to_string(),
    })?;
    // The receive buffer is sized for the largest template: give it back now, not when
    // the fork ends.
    drop(body);
    state.validate().map_err(WorkerError::BadState)?;
    // Only a sealed memfd of the right size is mapped: the template stays immutable
    // whatever the sender did.
    let memory = SealedMemory::from_sealed(Arc::new(File::from(memfd)), state.machine.mem.bytes())?;
    Ok(Template::new(memory, state))
}

/// Runs one fork of `template` for the parent on `sock`: jails this process (with
/// `jail`), prepares the shell, and on `go` starts the fork and serves it until the
/// socket closes. `template` is the worker's own (dropped once the fork runs) or, in a
/// zygote's child, a borrow of the copy it was born with (left alone: those pages stay
/// shared with the zygote). With `background`, it prepares in the idle scheduling class
/// and the fork's guest stays there: pass it only when the node can move the control
/// thread back out at `go` ([`sched::may_leave_background`], asked with the node's
/// credentials, before any jail).
pub(super) fn serve_fork<T: Borrow<Template>>(
    sock: &OwnedFd,
    template: T,
    jail: Option<JailIds>,
    filters: Arc<seccomp::Filters>,
    background: bool,
) -> Result<(), WorkerError> {
    // The parent is the only peer the fork's socket accepts: the uid we were started as.
    let parent_uid = nix::unistd::getuid().as_raw();
    // Read while the node's /proc is still in reach (we may be PID 1 of our own namespace).
    let pid = crate::host::node_pid();
    // The fork's socket lives in a directory of this process's own. Jailed, that
    // directory becomes the whole filesystem: the socket is `/vsock.sock` inside, and the
    // parent (who sees the real path) removes the directory after reaping us.
    let kvm = vmm::open_kvm()?;
    let has_vsock = template.borrow().state().devices.vsock.as_ref();
    let mut dir = match (has_vsock, jail) {
        (None, None) => None,
        _ => Some(RuntimeDir::create()?),
    };
    let outside = dir.as_ref().map(RuntimeDir::vsock_path);
    if let (Some(ids), Some(d)) = (jail, dir.as_ref()) {
        // Even without a socket, the empty private directory makes the jail's root.
        std::os::unix::fs::chown(d.path(), Some(ids.uid), Some(ids.gid))
            .map_err(WorkerError::Jail)?;
        jail::enter(ids, d.path()).map_err(|e| WorkerError::Jail(std::io::Error::other(e)))?;
    }
    // The parent removes the directory after reaping us: jailed, we cannot (the path does
    // not exist for us); confined by seccomp, we touch no file once the fork runs.
    let runtime_dir = dir.as_mut().map(|d| {
        d.disown();
        d.path().to_path_buf()
    });
    let vsock = has_vsock.zip(outside).map(|(saved, outside)| {
        let inside = match jail {
            Some(_) => PathBuf::from("/").join(VSOCK_SOCKET),
            None => outside.clone(),
        };
        let config = VsockConfig {
            guest_cid: saved.device.guest_cid,
            uds_path: inside,
            peer_uid: Some(parent_uid),
        };
        (config, outside)
    });
    // Preparing is off the request path, and the vCPU threads parked below inherit the
    // class: the guest, too, yields to whatever answers a request (`host::sched`).
    if background {
        schedule("control thread", Class::Background)?;
    }
    let t = Instant::now();
    let shell = Shell::build(&kvm, template.borrow())?;
    // The fork's threads wait, confined, for `go`: starting it is then a wake-up each.
    let state = template.borrow().state();
    let threads = VmThreads::park(
        state.machine.vcpus.get(),
        state.devices.has_virtio(),
        Some(&filters),
    )
    .map_err(VmmError::from)?;
    let prepare_us = micros(t.elapsed());
    let body = serde_json::to_vec(&ShellReady { runtime_dir }).map_err(WorkerError::Encode)?;
    send(sock, Kind::ShellReady, &body, &[], "shell-ready")?;

    // A pool may retire a prepared worker without using it: closing is not an error then.
    let go = match recv(sock, MAX_SMALL_MESSAGE, 1, "go")? {
        None => return Ok(()),
        Some(m) if m.kind == Kind::Go => m,
        Some(m) => {
            return Err(WorkerError::Protocol {
                what: "go",
                why: format!("got {:?}", m.kind),
            })
        }
    };
    let t = Instant::now();
    let net = go_backend(go)?;
    let config = vsock.as_ref().map(|(c, _)| c);
    let restored = shell.finish(template.borrow(), Box::new(std::io::sink()), config, net)?;
    let armed = restored.vm.arm(threads)?;
    let report = ReadyReport {
        pid,
        vsock: vsock.as_ref().map(|(_, outside)| outside.clone()),
        prepare_us,
        finish_us: micros(t.elapsed()),
    };
    let body = serde_json::to_vec(&report).map_err(WorkerError::Encode)?;
    send(sock, Kind::Ready, &body, &[], "ready")?;
    drop(body);
    let running = armed.start();
    // From here on this thread only talks to the parent and stops the VM. Its filter
    // loads after the answer (~120 µs off the request path) and before it reads anything
    // else; up to here it has run nothing but our own code on our own data.
    filters.apply(seccomp::ThreadKind::Control)?;
    drop((filters, template));
    release_free_heap();

    while let Some(msg) = recv(sock, MAX_SMALL_MESSAGE, 0, "a request")? {
        match msg.kind {
            Kind::Probe => {
                let body = serde_json::to_vec(&running.exits()).map_err(WorkerError::Encode)?;
                send(sock, Kind::Status, &body, &[], "status")?;
            }
            other => {
                return Err(WorkerError::Protocol {
                    what: "a request",
                    why: format!("{other:?} after go"),
                })
            }
        }
    }
    // Tearing the VM down (and this process's exit after it) is background work, whoever
    // the node is: moving in takes no privilege, and the control filter allows exactly it.
    if let Err(e) = schedule("control thread", Class::Background) {
        tracing::warn!("{e}");
    }
    let end = running.stop();
    tracing::debug!(%end, "fork ended");
    Ok(())
}

/// Hands the heap's free pages back to the kernel. Decoding the template and building
/// the fork leave ~100 KiB of freed heap that would otherwise stay private to this
/// process for the fork's whole life (×10,000 idle forks on a node). Runs after the
/// `ready` reply, off the fork path.
fn release_free_heap() {
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists; it takes
    // no pointer, and every allocation in use stays where it is.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The fork's NIC backend from a `go` message: its tap when one came with it.
fn go_backend(mut go: Message) -> Result<NetBackend, WorkerError> {
    let protocol = |why: String| WorkerError::Protocol { what: "go", why };
    let req: GoRequest = if go.body.is_empty() {
        GoRequest::default()
    } else {
        serde_json::from_slice(&go.body).map_err(|e| protocol(e.to_string()))?
    };
    match (req.tap, go.fds.pop()) {
        (None, None) => Ok(NetBackend::Disconnected),
        (Some(name), Some(fd)) => Tap::from_fd(fd, name)
            .map(NetBackend::Tap)
            .map_err(|e| protocol(format!("the tap fd: {e}"))),
        (Some(_), None) => Err(protocol("a tap name without its fd".into())),
        (None, Some(_)) => Err(protocol("an fd without a tap name".into())),
    }
}

/// Moves the calling thread, `thread` in the error, to `class`.
pub(super) fn schedule(thread: &'static str, class: Class) -> Result<(), WorkerError> {
    sched::set_current(class).map_err(|source| WorkerError::Schedule {
        thread,
        class,
        source,
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The worker's socket: its stdin, as the parent set it up. Taken, not copied: stdin is
/// /dev/null afterwards, so the socket has one fd, and a zygote's child that closes it
/// holds nothing of the zygote's.
pub fn socket_from_stdin() -> std::io::Result<OwnedFd> {
    let sock = std::io::stdin().as_fd().try_clone_to_owned()?;
    let null = File::open("/dev/null")?;
    // SAFETY: dup2 onto fd 0, which `std::io::stdin` refers to by number and no Rust
    // object owns; the socket lives on in `sock`.
    if unsafe { libc::dup2(null.as_raw_fd(), libc::STDIN_FILENO) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        seqpacket_pair().unwrap()
    }

    #[test]
    fn a_packet_comes_back_whole_with_its_fds_and_a_closed_socket_is_none() {
        let (a, b) = pair();
        let file = File::open("/dev/null").unwrap();
        send(&a, Kind::Go, b"{\"tap\":null}", &[file.as_fd()], "go").unwrap();
        let msg = recv(&b, MAX_SMALL_MESSAGE, 1, "go").unwrap().unwrap();
        assert_eq!(msg.kind, Kind::Go);
        assert_eq!(msg.body, b"{\"tap\":null}");
        assert_eq!(msg.fds.len(), 1);
        drop(a);
        assert!(recv(&b, MAX_SMALL_MESSAGE, 1, "go").unwrap().is_none());
    }

    #[test]
    fn a_workers_error_text_is_bounded_and_shows_no_control_characters() {
        let (node, worker) = pair();
        let mut body = b"bad\x1b[31m\r\nline two ".to_vec();
        body.extend(std::iter::repeat_n(b'x', 3 * MAX_ERROR_TEXT));
        send(&worker, Kind::Failed, &body, &[], "test").unwrap();
        let Err(WorkerError::Remote(text)) = expect(&node, Kind::Ready, "test") else {
            panic!("a failed packet is a remote error");
        };
        assert!(text.starts_with("bad?[31m?\nline two xxx"), "{text:?}");
        assert!(text.ends_with("x [cut]") && text.len() <= MAX_ERROR_TEXT + 6);
        assert_eq!(
            bounded_text("é".repeat(MAX_ERROR_TEXT).as_str()).len(),
            MAX_ERROR_TEXT + 6
        );
    }

    #[test]
    fn a_packet_longer_than_allowed_or_with_too_many_fds_is_refused() {
        let (a, b) = pair();
        send(&a, Kind::Probe, &[7u8; 100], &[], "probe").unwrap();
        let e = recv(&b, 50, 0, "a request").unwrap_err().to_string();
        assert!(e.contains("longer than 50 bytes"), "{e}");
        let file = File::open("/dev/null").unwrap();
        send(&a, Kind::Probe, &[], &[file.as_fd(), file.as_fd()], "probe").unwrap();
        let e = recv(&b, MAX_SMALL_MESSAGE, 1, "a request")
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 fds attached, at most 1"), "{e}");
        // An unknown kind byte.
        nix::sys::socket::send(a.as_raw_fd(), &[200, 1, 2], MsgFlags::empty()).unwrap();
        let e = recv(&b, MAX_SMALL_MESSAGE, 0, "a request")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kind 200"), "{e}");
    }
}
