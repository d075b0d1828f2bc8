//! Running one exec: the process, its stdin feed, its output pump and the
//! waiter that reports how it ended.
//!
//! Threads per exec: a waiter (exit and timeout), an output pump (stdout
//! and stderr through one `poll`), and a stdin feeder when stdin was asked
//! for. Memory per exec is bounded by the flow-control windows: the pump
//! reads only as much as the host has given credit for, and the host may
//! not send more stdin than the agent has given credit for.
//!
//! An exec ends when its leader has exited *and* its stdout/stderr reached
//! end of file: a background process that keeps them open keeps the exec
//! running (as with any pipe), bounded by the timeout when one was given.
//! Timeout and cancel kill the whole process group with SIGKILL.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::conn::{Conn, Live};
use super::reaper::ExitWatch;
use super::spawn::{spawn, SpawnError, Spawned};
use crate::protocol::flow::{RecvWindow, SendWindow};
use crate::protocol::{Body, ErrorCode, ExecRequest, ExitReport, RequestId, CHUNK_SIZE};
use crate::sync::lock;

/// How often a pump blocked in `poll` checks whether it was cancelled.
const POLL_TICK_MS: libc::c_int = 250;
/// After a timeout kill, how long output may still drain before the exec
/// is reported without the rest (a process that escaped the group may hold
/// the pipes forever).
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(1);
const THREAD_STACK: usize = 256 * 1024;

/// The parts of a running exec the frame loop needs.
pub(crate) struct ExecState {
    /// Process group (and session) id: the leader's pid.
    pub(crate) pgid: i32,
    has_stdin: bool,
    stdin: Mutex<Option<Sender<Vec<u8>>>>,
    stdin_window: Arc<Mutex<RecvWindow>>,
    /// Credit for stdout/stderr towards the host.
    pub(crate) out: Arc<SendWindow>,
    killed: AtomicBool,
}

impl ExecState {
    /// Queues a stdin chunk; the error ends the exec.
    pub(crate) fn feed_stdin(&self, data: Vec<u8>) -> Result<(), (ErrorCode, String)> {
        if !self.has_stdin {
            return Err((
                ErrorCode::BadArguments,
                "stdin sent to an exec started with stdin: false".into(),
            ));
        }
        if !lock(&self.stdin_window).receive(data.len()) {
            return Err((
                ErrorCode::FlowControl,
                "stdin beyond the flow-control window".into(),
            ));
        }
        // After the host's own Eof there is no sender: drop the data.
        if let Some(tx) = lock(&self.stdin).as_ref() {
            let _ = tx.send(data);
        }
        Ok(())
    }

    pub(crate) fn close_stdin(&self) {
        lock(&self.stdin).take();
    }

    /// Kills the process group and stops the threads (cancel).
    pub(crate) fn kill(&self) {
        if !self.killed.swap(true, Ordering::SeqCst) {
            let _ = signal_group(self.pgid, libc::SIGKILL);
        }
        self.out.close();
        self.close_stdin();
    }
}

/// Delivers `signal` to every process of the group `pgid`.
pub(crate) fn signal_group(pgid: i32, signal: i32) -> Result<(), Errno> {
    // SAFETY: kill(2) takes plain integers; a negative pid names a group.
    if unsafe { libc::kill(-pgid, signal) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Starts `req` for request `id`; replies with an error when it cannot.
pub(crate) fn start(conn: &Arc<Conn>, id: RequestId, req: ExecRequest) {
    let Spawned {
        pid,
        stdin,
        stdout,
        stderr,
        exit,
    } = match spawn(&conn.server.reaper, &req, &conn.server.config.agent_exe) {
        Ok(s) => s,
        Err(e) => {
            let code = match &e {
                SpawnError::NotFound { .. }
                | SpawnError::Child {
                    errno: Errno::ENOENT,
                    ..
                } => ErrorCode::NotFound,
                _ => ErrorCode::Io,
            };
            conn.error(id, code, format!("exec: {e}"));
            return;
        }
    };
    let pgid = pid.as_raw();
    let stdin_window = Arc::new(Mutex::new(RecvWindow::new()));
    let (stdin_tx, stdin_rx) = mpsc::channel();
    let state = Arc::new(ExecState {
        pgid,
        has_stdin: stdin.is_some(),
        stdin: Mutex::new(stdin.is_some().then_some(stdin_tx)),
        stdin_window: stdin_window.clone(),
        out: Arc::new(SendWindow::new()),
        killed: AtomicBool::new(false),
    });
    conn.insert(id, Live::Exec(state.clone()));

    let started = (|| -> std::io::Result<()> {
        if let Some(pipe) = stdin {
            let c = conn.clone();
            spawn_thread("cleave-stdin", move || {
                feed(c, id, pipe, stdin_rx, stdin_window)
            })?;
        }
        let (done_tx, done_rx) = mpsc::channel();
        let (c, out) = (conn.clone(), state.out.clone());
        spawn_thread("cleave-output", move || {
            pump(&c, id, stdout, stderr, &out);
            let _ = done_tx.send(());
        })?;
        let c = conn.clone();
        let timeout = req.timeout_ms.map(Duration::from_millis);
        spawn_thread("cleave-wait", move || {
            wait(c, id, state, exit, timeout, done_rx)
        })?;
        Ok(())
    })();
    if let Err(e) = started {
        // Without its threads nobody would report this exec: end it now.
        tracing::error!("cannot start exec threads: {e}");
        if let Some(Live::Exec(s)) = conn_remove(conn, id) {
            s.kill();
        }
        conn.error(
            id,
            ErrorCode::Io,
            format!("exec: cannot start a thread: {e}"),
        );
    }
}

fn conn_remove(conn: &Conn, id: RequestId) -> Option<Live> {
    // `finish` with no reply: the caller sends its own.
    let mut removed = None;
    conn.take_live(id, |l| removed = Some(l));
    removed
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    thread::Builder::new()
        .name(name.into())
        .stack_size(THREAD_STACK)
        .spawn(f)
        .map(drop)
}

/// Writes host stdin into the pipe, returning credit as it goes. Ends when
/// the host sends Eof or the exec ends (the sender is dropped).
fn feed(
    conn: Arc<Conn>,
    id: RequestId,
    pipe: File,
    rx: Receiver<Vec<u8>>,
    window: Arc<Mutex<RecvWindow>>,
) {
    let mut pipe = Some(pipe);
    for data in rx {
        if let Some(p) = pipe.as_mut() {
            // EPIPE: the process closed its stdin; keep draining so the
            // host's credit still comes back.
            if p.write_all(&data).is_err() {
                pipe = None;
            }
        }
        let credit = lock(&window).consume(data.len());
        if let Some(c) = credit {
            conn.send(id, Body::Credit(c));
        }
    }
}

/// Moves stdout and stderr to the host, as far as the host's credit goes.
fn pump(conn: &Conn, id: RequestId, stdout: File, stderr: File, out: &SendWindow) {
    let mut fds = [Some(stdout), Some(stderr)];
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        let mut pfds = Vec::with_capacity(2);
        let mut which = Vec::with_capacity(2);
        for (i, f) in fds.iter().enumerate() {
            if let Some(f) = f {
                pfds.push(libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                which.push(i);
            }
        }
        if pfds.is_empty() || out.is_closed() {
            return;
        }
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, POLL_TICK_MS) };
        if r < 0 {
            if Errno::last() == Errno::EINTR {
                continue;
            }
            return;
        }
        for (p, &i) in pfds.iter().zip(&which) {
            if p.revents == 0 {
                continue;
            }
            let Some(credit) = out.take(CHUNK_SIZE) else {
                return;
            };
            let f = fds[i].as_mut().expect("only open fds are polled");
            match f.read(&mut buf[..credit]) {
                Ok(0) => {
                    fds[i] = None;
                    out.grant(credit as u32);
                }
                Ok(n) => {
                    out.grant((credit - n) as u32);
                    let chunk = buf[..n].to_vec();
                    let body = if i == 0 {
                        Body::Stdout(chunk)
                    } else {
                        Body::Stderr(chunk)
                    };
                    if !conn.send(id, body) {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    out.grant(credit as u32);
                }
                Err(_) => {
                    fds[i] = None;
                    out.grant(credit as u32);
                }
            }
        }
    }
}

/// Waits for the exit (killing the group at the timeout), then for the
/// output to drain, then reports.
fn wait(
    conn: Arc<Conn>,
    id: RequestId,
    state: Arc<ExecState>,
    exit: ExitWatch,
    timeout: Option<Duration>,
    done: Receiver<()>,
) {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut timed_out = false;
    let status = match deadline {
        None => exit.wait(),
        Some(d) => match exit.wait_timeout(d.saturating_duration_since(Instant::now())) {
            Some(s) => s,
            None => {
                timed_out = true;
                let _ = signal_group(state.pgid, libc::SIGKILL);
                exit.wait()
            }
        },
    };
    let drained = match deadline {
        Some(d) if !timed_out => {
            match done.recv_timeout(d.saturating_duration_since(Instant::now())) {
                Err(RecvTimeoutError::Timeout) => {
                    // The leader is gone but its group still holds the pipes.
                    timed_out = true;
                    let _ = signal_group(state.pgid, libc::SIGKILL);
                    false
                }
                _ => true,
            }
        }
        _ => false,
    };
    if !drained {
        if timed_out {
            if let Err(RecvTimeoutError::Timeout) = done.recv_timeout(DRAIN_AFTER_KILL) {
                state.out.close();
            }
        }
        let _ = done.recv();
    }
    conn.finish(id, Body::Exited(ExitReport { status, timed_out }));
    state.close_stdin();
}
