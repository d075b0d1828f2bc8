//! The host side of one connection to a guest agent.
//!
//! One reader thread decodes every frame from the guest and routes it to the
//! request it belongs to. The guest is hostile: each request accepts only
//! the frames its kind allows, data beyond the credit the host granted fails
//! that request, and frames for unknown ids are dropped. Every queue is
//! therefore bounded by the flow-control window plus a frame or two.

use crate::sync::lock;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::error::{DecodeError, EncodeError};
use super::flow::{RecvWindow, SendWindow};
use super::frame::{write_message, FrameReader};
use super::message::*;
use super::{RequestId, CHUNK_SIZE, PROTOCOL_VERSION};

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the connection to the guest agent is closed")]
    Closed,
    #[error("guest agent refused the request: {0}")]
    Remote(ErrorReply),
    #[error("guest agent broke the protocol: {0}")]
    Protocol(String),
    #[error("no reply from the guest agent within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("local I/O failed: {0}")]
    Io(#[from] io::Error),
}

/// How an exec ended.
pub type ExecResult = ExitReport;

/// The most output of one stream a collecting call keeps in memory.
pub const MAX_COLLECTED: usize = 16 << 20;

/// Output kept in memory up to a limit; what comes beyond it is counted, not kept, and
/// [`BoundedOutput::finish`] says so at the end.
#[derive(Debug, Clone)]
pub struct BoundedOutput {
    bytes: Vec<u8>,
    dropped: u64,
    limit: usize,
}

impl BoundedOutput {
    pub fn new(limit: usize) -> Self {
        BoundedOutput {
            bytes: Vec::new(),
            dropped: 0,
            limit,
        }
    }

    pub fn push(&mut self, d: &[u8]) {
        let room = self.limit.saturating_sub(self.bytes.len()).min(d.len());
        self.bytes.extend_from_slice(&d[..room]);
        self.dropped += (d.len() - room) as u64;
    }

    /// Bytes that were not kept.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// What was kept, followed by a marker line when anything was dropped.
    pub fn finish(mut self) -> Vec<u8> {
        if self.dropped > 0 {
            self.bytes.extend_from_slice(
                format!(
                    "\n[cleave: output truncated: {} more bytes were not kept]\n",
                    self.dropped
                )
                .as_bytes(),
            );
        }
        self.bytes
    }
}

/// One event of a running exec, in the order the guest sent them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exited(ExitReport),
}

/// Which frames a request accepts, and where it is in its exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One terminal reply of the given kind byte.
    Single(u8),
    Exec,
    ReadFile {
        started: bool,
    },
    WriteFile,
}

/// `Err` carries a protocol violation found by the reader thread.
type Delivery = Result<Body, String>;

struct Route {
    tx: Sender<Delivery>,
    kind: Kind,
    recv: RecvWindow,
    send: Arc<SendWindow>,
}

struct Shared {
    writer: Mutex<Box<dyn Write + Send>>,
    routes: Mutex<Routes>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Routes {
    map: HashMap<RequestId, Route>,
    closed: bool,
}

/// A connection to one guest agent. Cheap to share between threads
/// (`&Client` is enough for every call); requests run concurrently.
pub struct Client {
    shared: Arc<Shared>,
    /// Shut down on drop so the reader thread ends.
    socket: Option<UnixStream>,
    /// How long past its own timeout an exec may take to report its end.
    exec_grace: Duration,
}

/// How long past an exec's `timeout_ms` the host waits for the guest to report that the
/// exec ended (the guest kills it at the timeout): a guest that stops answering cannot
/// hold a timed exec open beyond this.
pub const EXEC_GRACE: Duration = Duration::from_secs(5);

impl Client {
    /// A client on a connected Unix stream (on the host, the hybrid vsock
    /// socket after `CONNECT <port>` / `OK`). Dropping the client shuts the
    /// stream down.
    pub fn new(stream: UnixStream) -> io::Result<Client> {
        let reader = stream.try_clone()?;
        let writer = stream.try_clone()?;
        let mut c = Client::from_parts(reader, writer)?;
        c.socket = Some(stream);
        Ok(c)
    }

    /// A client on any reader/writer pair; the reader thread runs until the
    /// reader reports end of stream or an error.
    pub fn from_parts<R, W>(reader: R, writer: W) -> io::Result<Client>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let shared = Arc::new(Shared {
            writer: Mutex::new(Box::new(writer)),
            routes: Mutex::new(Routes::default()),
            next_id: AtomicU64::new(1),
        });
        let s = shared.clone();
        thread::Builder::new()
            .name("cleave-client-rx".into())
            .spawn(move || read_loop(s, reader))?;
        Ok(Client {
            shared,
            socket: None,
            exec_grace: EXEC_GRACE,
        })
    }

    /// Replaces [`EXEC_GRACE`] (tests use a short one).
    pub fn with_exec_grace(mut self, grace: Duration) -> Client {
        self.exec_grace = grace;
        self
    }

    /// Negotiates the version and reads the agent's uptime.
    pub fn hello(&self, timeout: Duration) -> Result<HelloReply, ClientError> {
        let v = u16::from(PROTOCOL_VERSION);
        let body = Body::Hello(Hello {
            min_version: v,
            max_version: v,
        });
        match self.call(body, HELLO_REPLY, Some(timeout))? {
            Body::HelloReply(h) => Ok(h),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends host entropy, nonce and time; the caller checks `reseeded` and
    /// the nonce (see `docs` in the agent's fork gate).
    pub fn reseed(
        &self,
        req: ReseedRequest,
        timeout: Duration,
    ) -> Result<ReseedReply, ClientError> {
        match self.call(Body::Reseed(req), RESEEDED, Some(timeout))? {
            Body::Reseeded(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// Closes the agent's reseed gate and checks that only the agent runs: the
    /// last request before a template is captured. An error names the
    /// processes still running.
    pub fn quiesce(&self, timeout: Duration) -> Result<(), ClientError> {
        self.call(Body::Quiesce, OK, Some(timeout)).map(drop)
    }

    /// Gives the guest its network identity (after the reseed gate); returns
    /// once the agent has applied all of it.
    pub fn configure_network(
        &self,
        config: NetworkConfig,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        self.call(Body::Network(config), OK, Some(timeout))
            .map(drop)
    }

    /// Delivers `signal` to the process group of the exec `target`.
    pub fn signal(&self, target: RequestId, signal: i32) -> Result<(), ClientError> {
        let body = Body::Signal(SignalRequest { target, signal });
        self.call(body, OK, None).map(drop)
    }

    /// Asks the agent to power the guest off.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.call(Body::Shutdown, OK, None).map(drop)
    }

    /// Starts an exec and returns a handle for its stdin and output.
    pub fn start_exec(&self, req: ExecRequest) -> Result<ExecHandle, ClientError> {
        // A timed exec has a host-side deadline too: the guest's word is not needed.
        let limit = req
            .timeout_ms
            .map(|ms| Duration::from_millis(ms).saturating_add(self.exec_grace));
        let (id, rx, send) = self.start(Body::Exec(req), Kind::Exec)?;
        Ok(ExecHandle {
            shared: self.shared.clone(),
            id,
            rx,
            send,
            done: false,
            limit: limit.map(|l| (Instant::now() + l, l)),
        })
    }

    /// Runs an exec to the end. `stdin` (when given) is copied on a thread
    /// of its own that is not waited for, so a stdin that blocks (a
    /// terminal) does not hold up the result. `on_output` sees every chunk.
    pub fn exec(
        &self,
        mut req: ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        mut on_output: impl FnMut(&OutputEvent),
    ) -> Result<ExecResult, ClientError> {
        req.stdin |= stdin.is_some();
        let mut handle = self.start_exec(req)?;
        if let Some(mut src) = stdin {
            let mut w = handle.stdin_writer();
            thread::Builder::new()
                .name("cleave-client-stdin".into())
                .spawn(move || {
                    // A failure here means the exec is over; its result says why.
                    if io::copy(&mut src, &mut w).is_ok() {
                        let _ = w.close();
                    }
                })?;
        }
        loop {
            let ev = handle.next_event()?;
            on_output(&ev);
            if let OutputEvent::Exited(x) = ev {
                return Ok(x);
            }
        }
    }

    /// Runs an exec with `stdin` as its whole input and collects its output, at most
    /// [`MAX_COLLECTED`] bytes of each stream (the rest is counted and marked).
    pub fn exec_collect(
        &self,
        req: ExecRequest,
        stdin: Option<Vec<u8>>,
    ) -> Result<(ExecResult, Vec<u8>, Vec<u8>), ClientError> {
        let (mut out, mut err) = (
            BoundedOutput::new(MAX_COLLECTED),
            BoundedOutput::new(MAX_COLLECTED),
        );
        let stdin = stdin.map(|v| Box::new(io::Cursor::new(v)) as Box<dyn Read + Send>);
        let x = self.exec(req, stdin, |ev| match ev {
            OutputEvent::Stdout(d) => out.push(d),
            OutputEvent::Stderr(d) => err.push(d),
            OutputEvent::Exited(_) => {}
        })?;
        Ok((x, out.finish(), err.finish()))
    }

    /// Writes exactly `size` bytes from `data` to `path` in the guest with
    /// permission bits `mode`. Returns the bytes written.
    pub fn write_file(
        &self,
        path: &Path,
        mode: u32,
        size: u64,
        data: &mut dyn Read,
    ) -> Result<u64, ClientError> {
        let body = Body::WriteFile(WriteFileRequest {
            path: path.to_path_buf(),
            mode,
            size,
        });
        let (id, rx, send) = self.start(body, Kind::WriteFile)?;
        let mut buf = vec![0u8; CHUNK_SIZE];
        let mut sent = 0u64;
        while sent < size {
            // No credit means the request already ended: its reply says why.
            let Some(n) = send.take(CHUNK_SIZE.min((size - sent) as usize)) else {
                break;
            };
            let got = match read_some(data, &mut buf[..n]) {
                Ok(got) => got,
                Err(e) => {
                    // End the request in the guest, then report our error.
                    self.send(id, Body::Eof)?;
                    let _ = wait(&rx, None);
                    return Err(ClientError::Io(e));
                }
            };
            if got == 0 {
                // The guest answers an early Eof with an error naming how
                // much arrived (or with the error it had already sent).
                self.send(id, Body::Eof)?;
                break;
            }
            if got < n {
                // Unused credit goes back to the window.
                send.grant((n - got) as u32);
            }
            self.send(id, Body::FileData(buf[..got].to_vec()))?;
            sent += got as u64;
        }
        match wait(&rx, None)? {
            Body::WriteDone { bytes } if bytes == sent => Ok(bytes),
            other => Err(unexpected(&other)),
        }
    }

    /// Streams `path` from the guest into `sink`; fails when it is larger
    /// than `limit`. Returns the bytes read.
    pub fn read_file(
        &self,
        path: &Path,
        limit: u64,
        sink: &mut dyn Write,
    ) -> Result<u64, ClientError> {
        let body = Body::ReadFile(ReadFileRequest {
            path: path.to_path_buf(),
            limit,
        });
        let (id, rx, _send) = self.start(body, Kind::ReadFile { started: false })?;
        let mut got = 0u64;
        loop {
            match wait(&rx, None)? {
                Body::ReadStart(_) => {}
                Body::FileData(d) => {
                    got += d.len() as u64;
                    if got > limit {
                        return Err(ClientError::Protocol(format!(
                            "read_file sent more than the limit of {limit} bytes"
                        )));
                    }
                    sink.write_all(&d)?;
                    self.consumed(id, d.len())?;
                }
                Body::ReadDone { bytes } if bytes == got => return Ok(got),
                Body::ReadDone { bytes } => {
                    return Err(ClientError::Protocol(format!(
                        "read_file announced {bytes} bytes but sent {got}"
                    )))
                }
                other => return Err(unexpected(&other)),
            }
        }
    }

    /// [`Client::read_file`] into memory.
    pub fn read_file_to_vec(&self, path: &Path, limit: u64) -> Result<Vec<u8>, ClientError> {
        let mut v = Vec::new();
        self.read_file(path, limit, &mut v)?;
        Ok(v)
    }

    fn call(
        &self,
        body: Body,
        reply_kind: u8,
        timeout: Option<Duration>,
    ) -> Result<Body, ClientError> {
        let (id, rx, _) = self.start(body, Kind::Single(reply_kind))?;
        let r = wait(&rx, timeout);
        if r.is_err() {
            self.forget(id);
        }
        r
    }

    fn start(
        &self,
        body: Body,
        kind: Kind,
    ) -> Result<(RequestId, Receiver<Delivery>, Arc<SendWindow>), ClientError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let send = Arc::new(SendWindow::new());
        {
            let mut routes = lock(&self.shared.routes);
            if routes.closed {
                return Err(ClientError::Closed);
            }
            routes.map.insert(
                id,
                Route {
                    tx,
                    kind,
                    recv: RecvWindow::new(),
                    send: send.clone(),
                },
            );
        }
        if let Err(e) = self.send(id, body) {
            self.forget(id);
            return Err(e);
        }
        Ok((id, rx, send))
    }

    fn send(&self, id: RequestId, body: Body) -> Result<(), ClientError> {
        send(&self.shared, id, body)
    }

    fn consumed(&self, id: RequestId, n: usize) -> Result<(), ClientError> {
        consumed(&self.shared, id, n)
    }

    fn forget(&self, id: RequestId) {
        if let Some(r) = lock(&self.shared.routes).map.remove(&id) {
            r.send.close();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(s) = &self.socket {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A running exec.
pub struct ExecHandle {
    shared: Arc<Shared>,
    id: RequestId,
    rx: Receiver<Delivery>,
    send: Arc<SendWindow>,
    done: bool,
    /// A timed exec's deadline, and the whole allowance (for the error).
    limit: Option<(Instant, Duration)>,
}

impl ExecHandle {
    /// The request id, for [`Client::signal`].
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// A writer for the exec's stdin (the request must have `stdin: true`).
    pub fn stdin_writer(&self) -> StdinWriter {
        StdinWriter {
            shared: self.shared.clone(),
            id: self.id,
            send: self.send.clone(),
        }
    }

    /// The next output chunk or the exit. Returning credit for consumed
    /// output happens here, so a caller that stops reading stops the
    /// guest's process at a full pipe instead of growing a buffer.
    pub fn next_event(&mut self) -> Result<OutputEvent, ClientError> {
        if self.done {
            return Err(ClientError::Closed);
        }
        let left = self
            .limit
            .map(|(at, _)| at.saturating_duration_since(Instant::now()));
        let ev = match wait(&self.rx, left) {
            Ok(b) => b,
            Err(ClientError::Timeout(_)) => {
                // Past its timeout and the grace: kill it and stop waiting for it.
                self.abandon();
                let whole = self.limit.map_or(Duration::ZERO, |(_, l)| l);
                return Err(ClientError::Timeout(whole));
            }
            Err(e) => {
                self.done = true;
                return Err(e);
            }
        };
        match ev {
            Body::Stdout(d) => {
                consumed(&self.shared, self.id, d.len())?;
                Ok(OutputEvent::Stdout(d))
            }
            Body::Stderr(d) => {
                consumed(&self.shared, self.id, d.len())?;
                Ok(OutputEvent::Stderr(d))
            }
            Body::Exited(x) => {
                self.done = true;
                Ok(OutputEvent::Exited(x))
            }
            other => {
                self.done = true;
                Err(unexpected(&other))
            }
        }
    }
}

impl ExecHandle {
    /// Stops waiting for the exec and has the guest kill it, so it does not hold a
    /// request slot (and its process group) in the guest forever.
    fn abandon(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        if let Some(r) = lock(&self.shared.routes).map.remove(&self.id) {
            r.send.close();
        }
        // The reply comes back for an id nobody routes: dropped.
        let kill_id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let body = Body::Signal(SignalRequest {
            target: self.id,
            signal: libc::SIGKILL,
        });
        let _ = send(&self.shared, kill_id, body);
    }
}

impl Drop for ExecHandle {
    /// An exec nobody waits for any more is killed.
    fn drop(&mut self) {
        self.abandon();
    }
}

/// Streams an exec's stdin; `close` sends end of file.
pub struct StdinWriter {
    shared: Arc<Shared>,
    id: RequestId,
    send: Arc<SendWindow>,
}

impl StdinWriter {
    pub fn close(&mut self) -> Result<(), ClientError> {
        send(&self.shared, self.id, Body::Eof)
    }
}

impl Write for StdinWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self
            .send
            .take(buf.len().min(CHUNK_SIZE))
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "the exec has ended"))?;
        send(&self.shared, self.id, Body::Stdin(buf[..n].to_vec()))
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()))?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const HELLO_REPLY: u8 = 0x81;
const OK: u8 = 0x85;
const RESEEDED: u8 = 0x89;

fn send(shared: &Shared, id: RequestId, body: Body) -> Result<(), ClientError> {
    let mut w = lock(&shared.writer);
    write_message(&mut **w, &Message::new(id, body))?;
    Ok(())
}

/// The consumer used `n` bytes of request `id`; return credit when due.
fn consumed(shared: &Shared, id: RequestId, n: usize) -> Result<(), ClientError> {
    let credit = {
        let mut routes = lock(&shared.routes);
        match routes.map.get_mut(&id) {
            Some(r) => r.recv.consume(n),
            // Ended: the guest sends nothing more, no credit needed.
            None => None,
        }
    };
    match credit {
        Some(c) => send(shared, id, Body::Credit(c)),
        None => Ok(()),
    }
}

fn wait(rx: &Receiver<Delivery>, timeout: Option<Duration>) -> Result<Body, ClientError> {
    let delivery = match timeout {
        Some(t) => rx.recv_timeout(t).map_err(|e| match e {
            RecvTimeoutError::Timeout => ClientError::Timeout(t),
            RecvTimeoutError::Disconnected => ClientError::Closed,
        })?,
        None => rx.recv().map_err(|_| ClientError::Closed)?,
    };
    match delivery {
        Ok(Body::Error(e)) => Err(ClientError::Remote(e)),
        Ok(b) => Ok(b),
        Err(why) => Err(ClientError::Protocol(why)),
    }
}

fn unexpected(b: &Body) -> ClientError {
    ClientError::Protocol(format!("unexpected {} reply", b.name()))
}

/// Reads until `buf` is full or the source ends.
fn read_some(src: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What to do with a frame for a live request.
enum Verdict {
    Forward,
    Terminal,
    Violation(String),
}

fn judge(route: &mut Route, body: &Body) -> Verdict {
    use Verdict::*;
    match (&mut route.kind, body) {
        (_, Body::Error(_)) => Terminal,
        (Kind::Single(k), b) if b.kind() == *k => Terminal,
        (Kind::Exec, Body::Stdout(d) | Body::Stderr(d))
        | (Kind::ReadFile { started: true }, Body::FileData(d)) => {
            // An empty frame costs no credit, so nothing would bound how many of them
            // queue up here: a guest never needs to send one.
            if d.is_empty() {
                Violation(format!("an empty {} frame", body.name()))
            } else if route.recv.receive(d.len()) {
                Forward
            } else {
                Violation(format!("{} beyond the flow-control window", body.name()))
            }
        }
        (Kind::Exec, Body::Exited(_)) => Terminal,
        (Kind::ReadFile { started }, Body::ReadStart(_)) if !*started => {
            *started = true;
            Forward
        }
        (Kind::ReadFile { started: true }, Body::ReadDone { .. }) => Terminal,
        (Kind::WriteFile, Body::WriteDone { .. }) => Terminal,
        (_, b) => Violation(format!("unexpected {} frame", b.name())),
    }
}

fn read_loop<R: Read>(shared: Arc<Shared>, reader: R) {
    let mut frames = FrameReader::new(reader);
    loop {
        match frames.read_message() {
            Ok(Some(msg)) => route(&shared, msg),
            Ok(None) | Err(DecodeError::Io(_)) => break,
            Err(e) => {
                // A bad frame fails the request it names; others go on.
                if let Some(id) = e.request_id() {
                    fail(&shared, id, format!("bad frame: {e}"));
                }
            }
        }
    }
    let mut routes = lock(&shared.routes);
    routes.closed = true;
    for (_, r) in routes.map.drain() {
        r.send.close();
    }
}

fn route(shared: &Shared, msg: Message) {
    let mut routes = lock(&shared.routes);
    let Some(r) = routes.map.get_mut(&msg.id) else {
        // A request that ended or never existed: nothing waits for it.
        return;
    };
    if let Body::Credit(n) = msg.body {
        r.send.grant(n);
        return;
    }
    match judge(r, &msg.body) {
        Verdict::Forward => {
            let _ = r.tx.send(Ok(msg.body));
        }
        Verdict::Terminal => {
            let r = routes.map.remove(&msg.id).expect("route was just found");
            r.send.close();
            let _ = r.tx.send(Ok(msg.body));
        }
        Verdict::Violation(why) => {
            drop(routes);
            fail(shared, msg.id, why);
        }
    }
}

/// Ends request `id` locally with a protocol error.
fn fail(shared: &Shared, id: RequestId, why: String) {
    if let Some(r) = lock(&shared.routes).map.remove(&id) {
        r.send.close();
        let _ = r.tx.send(Err(why));
    }
}

#[cfg(test)]
mod bounded_tests {
    use super::BoundedOutput;

    #[test]
    fn output_beyond_the_limit_is_counted_and_marked_not_kept() {
        let mut b = BoundedOutput::new(10);
        b.push(b"0123456");
        b.push(b"789abcdef");
        b.push(b"more");
        assert_eq!(b.dropped(), 10);
        let text = String::from_utf8(b.finish()).unwrap();
        assert!(
            text.starts_with("0123456789\n[cleave: output truncated: 10 more bytes"),
            "{text}"
        );
        let mut small = BoundedOutput::new(10);
        small.push(b"ok");
        assert_eq!(small.finish(), b"ok");
    }
}
