//! One connection: the frame loop, dispatch, live requests, the writer.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::exec::{self, ExecState};
use super::files::{self, WriteState};
use super::ServerInner;
use crate::protocol::flow::SendWindow;
use crate::protocol::{
    write_message, Body, DecodeError, ErrorCode, ErrorReply, FrameReader, HelloReply, Message,
    RequestId, PROTOCOL_VERSION,
};
use crate::sync::lock;

/// A request that outlives the frame that started it.
pub(crate) enum Live {
    Exec(Arc<ExecState>),
    WriteFile(Arc<WriteState>),
    ReadFile(Arc<SendWindow>),
}

pub(crate) struct Conn {
    pub(crate) server: Arc<ServerInner>,
    out: Mutex<Box<dyn Write + Send>>,
    dead: AtomicBool,
    live: Mutex<HashMap<RequestId, Live>>,
}

pub(crate) fn serve<R: Read>(server: Arc<ServerInner>, reader: R, writer: Box<dyn Write + Send>) {
    let conn = Arc::new(Conn {
        server,
        out: Mutex::new(writer),
        dead: AtomicBool::new(false),
        live: Mutex::new(HashMap::new()),
    });
    let mut frames = FrameReader::new(reader);
    loop {
        match frames.read_message() {
            Ok(Some(msg)) => conn.dispatch(msg),
            Ok(None) => break,
            Err(DecodeError::Io(e)) => {
                tracing::debug!("connection read failed: {e}");
                break;
            }
            Err(e) => conn.reject(e),
        }
    }
    conn.close();
}

impl Conn {
    /// Sends one frame; false when the connection is gone.
    pub(crate) fn send(&self, id: RequestId, body: Body) -> bool {
        if self.dead.load(Ordering::Relaxed) {
            return false;
        }
        let mut out = lock(&self.out);
        if let Err(e) = write_message(&mut **out, &Message::new(id, body)) {
            tracing::debug!("connection write failed: {e}");
            self.dead.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Ends a live request with its terminal reply, unless something else
    /// (a cancel) ended it first.
    pub(crate) fn finish(&self, id: RequestId, body: Body) {
        if self.remove(id).is_some() {
            self.send(id, body);
        }
    }

    pub(crate) fn error(&self, id: RequestId, code: ErrorCode, message: impl Into<String>) {
        self.send(id, Body::Error(ErrorReply::new(code, message)));
    }

    fn remove(&self, id: RequestId) -> Option<Live> {
        lock(&self.live).remove(&id)
    }

    /// Removes a live request and hands it to `f` (no reply is sent).
    pub(crate) fn take_live(&self, id: RequestId, f: impl FnOnce(Live)) {
        if let Some(l) = self.remove(id) {
            f(l);
        }
    }

    /// Ends a live request with an error, stopping whatever it runs.
    fn cancel(&self, id: RequestId, code: ErrorCode, message: String) {
        if let Some(live) = self.remove(id) {
            stop(live);
            self.error(id, code, message);
        }
    }

    fn dispatch(self: &Arc<Self>, msg: Message) {
        let id = msg.id;
        match msg.body {
            Body::Hello(h) => self.hello(id, h.min_version, h.max_version),
            Body::Reseed(r) => {
                let reply = self.server.config.reseed.reseed(&r);
                self.server.gate.record(reply.reseeded);
                tracing::info!(reseeded = reply.reseeded, "reseed");
                self.send(id, Body::Reseeded(reply));
            }
            Body::Quiesce => {
                // Closed before looking: a template must never be captured open.
                self.server.gate.record(false);
                match super::quiesce::user_processes() {
                    Ok(p) if p.is_empty() => {
                        self.send(id, Body::Ok);
                    }
                    Ok(p) => self.error(id, ErrorCode::Busy, super::quiesce::describe(&p)),
                    Err(e) => self.error(id, ErrorCode::Io, format!("reading /proc: {e}")),
                }
            }
            Body::Shutdown => match self.server.config.on_shutdown.clone() {
                Some(hook) => {
                    self.send(id, Body::Ok);
                    hook();
                }
                None => self.error(
                    id,
                    ErrorCode::Unsupported,
                    "shutdown is not supported by this agent",
                ),
            },
            Body::Network(cfg) => {
                if !self.admit(id) {
                    return;
                }
                match self.server.config.on_network.clone() {
                    Some(apply) => match apply(&cfg) {
                        Ok(()) => {
                            self.send(id, Body::Ok);
                        }
                        Err(e) => self.error(id, ErrorCode::Io, e),
                    },
                    None => self.error(
                        id,
                        ErrorCode::Unsupported,
                        "network configuration is not supported by this agent",
                    ),
                }
            }
            Body::Signal(s) => self.signal(id, s.target, s.signal),
            Body::Exec(req) => {
                if self.admit(id) {
                    exec::start(self, id, req);
                }
            }
            Body::WriteFile(req) => {
                if self.admit(id) {
                    files::start_write(self, id, req);
                }
            }
            Body::ReadFile(req) => {
                if self.admit(id) {
                    files::start_read(self, id, req);
                }
            }
            Body::Stdin(data) => self.stdin(id, data),
            Body::Eof => self.eof(id),
            Body::FileData(data) => self.file_data(id, data),
            Body::Credit(n) => self.credit(id, n),
            other => self.error(
                id,
                ErrorCode::UnknownOp,
                format!("{} is sent by the agent, not to it", other.name()),
            ),
        }
    }

    /// A frame the decoder refused: answer for its request id and go on.
    fn reject(&self, e: DecodeError) {
        let Some(id) = e.request_id() else { return };
        let code = match &e {
            DecodeError::TooLarge { .. } => ErrorCode::TooLarge,
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownKind { .. } => ErrorCode::UnknownOp,
            DecodeError::BadPayload { .. } | DecodeError::Io(_) => ErrorCode::BadArguments,
        };
        tracing::warn!("rejected frame: {e}");
        // A broken frame for a live request (say, oversized stdin) ends it.
        if let Some(live) = self.remove(id) {
            stop(live);
        }
        self.error(id, code, e.to_string());
    }

    /// Checks that a new exec or file request may start.
    fn admit(&self, id: RequestId) -> bool {
        if !self.server.gate.is_open() {
            self.error(
                id,
                ErrorCode::NotReady,
                "the agent has not been reseeded yet; send reseed first",
            );
            return false;
        }
        let live = lock(&self.live);
        if live.contains_key(&id) {
            drop(live);
            self.error(
                id,
                ErrorCode::BadArguments,
                format!("request id {id} is already in use on this connection"),
            );
            return false;
        }
        if live.len() >= self.server.config.max_requests {
            let max = self.server.config.max_requests;
            drop(live);
            self.error(
                id,
                ErrorCode::Busy,
                format!("{max} requests already in flight on this connection; wait for one to end"),
            );
            return false;
        }
        true
    }

    /// Registers a live request. Called from the frame loop, so it is in
    /// place before the request's next frame is read.
    pub(crate) fn insert(&self, id: RequestId, live: Live) {
        lock(&self.live).insert(id, live);
    }

    fn hello(&self, id: RequestId, min: u16, max: u16) {
        let ours = u16::from(PROTOCOL_VERSION);
        if !(min..=max).contains(&ours) {
            self.error(
                id,
                ErrorCode::UnsupportedVersion,
                format!("agent speaks protocol version {ours} only, host offered {min}..={max}"),
            );
            return;
        }
        let uptime = self.server.started.elapsed().as_millis();
        self.send(
            id,
            Body::HelloReply(HelloReply {
                version: ours,
                min_version: ours,
                max_version: ours,
                uptime_ms: u64::try_from(uptime).unwrap_or(u64::MAX),
                agent: format!("cleave-guest {}", env!("CARGO_PKG_VERSION")),
            }),
        );
    }

    fn signal(&self, id: RequestId, target: RequestId, signal: i32) {
        let pgid = match lock(&self.live).get(&target) {
            Some(Live::Exec(e)) => e.pgid,
            _ => {
                self.error(
                    id,
                    ErrorCode::NotFound,
                    format!("no running exec with request id {target} on this connection"),
                );
                return;
            }
        };
        match exec::signal_group(pgid, signal) {
            Ok(()) => {
                self.send(id, Body::Ok);
            }
            Err(errno) => self.error(
                id,
                ErrorCode::Io,
                format!("kill(-{pgid}, {signal}): {errno}"),
            ),
        }
    }

    fn stdin(&self, id: RequestId, data: Vec<u8>) {
        let live = lock(&self.live);
        let Some(Live::Exec(e)) = live.get(&id) else {
            // The exec ended while its stdin was in flight: normal.
            return;
        };
        match e.feed_stdin(data) {
            Ok(()) => {}
            Err((code, why)) => {
                drop(live);
                self.cancel(id, code, why);
            }
        }
    }

    fn eof(&self, id: RequestId) {
        let live = lock(&self.live);
        match live.get(&id) {
            Some(Live::Exec(e)) => e.close_stdin(),
            Some(Live::WriteFile(w)) => w.abort(),
            _ => {}
        }
    }

    fn file_data(&self, id: RequestId, data: Vec<u8>) {
        let live = lock(&self.live);
        let Some(Live::WriteFile(w)) = live.get(&id) else {
            return;
        };
        if let Err((code, why)) = w.feed(data) {
            drop(live);
            self.cancel(id, code, why);
        }
    }

    fn credit(&self, id: RequestId, n: u32) {
        match lock(&self.live).get(&id) {
            Some(Live::Exec(e)) => e.out.grant(n),
            Some(Live::ReadFile(w)) => w.grant(n),
            _ => {}
        }
    }

    /// The connection is gone: stop everything it still runs.
    fn close(&self) {
        self.dead.store(true, Ordering::Relaxed);
        let live: Vec<Live> = lock(&self.live).drain().map(|(_, l)| l).collect();
        if !live.is_empty() {
            tracing::info!(
                requests = live.len(),
                "connection closed; cancelling its requests"
            );
        }
        live.into_iter().for_each(stop);
    }
}

/// Stops a request that was removed from the live map.
fn stop(live: Live) {
    match live {
        Live::Exec(e) => e.kill(),
        Live::WriteFile(w) => w.abort(),
        Live::ReadFile(w) => w.close(),
    }
}
