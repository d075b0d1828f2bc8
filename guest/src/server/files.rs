//! `write_file` and `read_file`, streamed under flow control.
//!
//! `write_file` opens the path with `O_CREAT|O_TRUNC`, sets the requested
//! mode with `fchmod` (so the umask does not change it) and expects exactly
//! the announced size; it is not atomic (special files such as
//! `/proc/sys/...` must stay writable in place). A host `Eof` before the
//! last byte aborts it and leaves what was written.
//!
//! `read_file` refuses a file larger than the smaller of the host's limit
//! and the agent's, before sending anything when the size is known, and
//! while streaming for files whose size grows or is not reported (`/proc`).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use super::conn::{Conn, Live};
use crate::protocol::flow::{RecvWindow, SendWindow};
use crate::protocol::{
    Body, ErrorCode, FileInfo, ReadFileRequest, RequestId, WriteFileRequest, CHUNK_SIZE,
};
use crate::sync::lock;

const THREAD_STACK: usize = 256 * 1024;

/// `None` in the channel: the host ended the data early.
type Chunk = Option<Vec<u8>>;

/// The parts of a running `write_file` the frame loop needs.
pub(crate) struct WriteState {
    size: u64,
    window: Mutex<Received>,
    tx: Mutex<Option<Sender<Chunk>>>,
}

struct Received {
    window: RecvWindow,
    bytes: u64,
}

impl WriteState {
    /// Queues a data chunk; the error ends the request.
    pub(crate) fn feed(&self, data: Vec<u8>) -> Result<(), (ErrorCode, String)> {
        {
            let mut r = lock(&self.window);
            if !r.window.receive(data.len()) {
                return Err((
                    ErrorCode::FlowControl,
                    "file data beyond the flow-control window".into(),
                ));
            }
            r.bytes += data.len() as u64;
            if r.bytes > self.size {
                return Err((
                    ErrorCode::BadArguments,
                    format!("more file data than the announced {} bytes", self.size),
                ));
            }
        }
        if let Some(tx) = lock(&self.tx).as_ref() {
            let _ = tx.send(Some(data));
        }
        Ok(())
    }

    /// The host ended the data (or the request is cancelled).
    pub(crate) fn abort(&self) {
        if let Some(tx) = lock(&self.tx).take() {
            let _ = tx.send(None);
        }
    }
}

fn io_code(e: &io::Error) -> ErrorCode {
    if e.kind() == io::ErrorKind::NotFound {
        ErrorCode::NotFound
    } else {
        ErrorCode::Io
    }
}

fn spawn_thread(conn: &Arc<Conn>, id: RequestId, f: impl FnOnce() + Send + 'static) {
    let spawned = thread::Builder::new()
        .name("cleave-file".into())
        .stack_size(THREAD_STACK)
        .spawn(f);
    if let Err(e) = spawned {
        conn.take_live(id, |_| {});
        conn.error(id, ErrorCode::Io, format!("cannot start a thread: {e}"));
    }
}

pub(crate) fn start_write(conn: &Arc<Conn>, id: RequestId, req: WriteFileRequest) {
    let max = conn.server.config.max_file_size;
    if req.size > max {
        conn.error(
            id,
            ErrorCode::TooLarge,
            format!(
                "write_file {}: {} bytes exceed the agent's limit of {max} bytes",
                req.path.display(),
                req.size
            ),
        );
        return;
    }
    let (tx, rx) = mpsc::channel();
    let state = Arc::new(WriteState {
        size: req.size,
        window: Mutex::new(Received {
            window: RecvWindow::new(),
            bytes: 0,
        }),
        tx: Mutex::new(Some(tx)),
    });
    conn.insert(id, Live::WriteFile(state.clone()));
    let c = conn.clone();
    spawn_thread(conn, id, move || {
        let reply = match write(&c, id, &req, &state, rx) {
            Ok(bytes) => Body::WriteDone { bytes },
            Err((code, why)) => Body::Error(crate::protocol::ErrorReply::new(
                code,
                format!("write_file {}: {why}", req.path.display()),
            )),
        };
        c.finish(id, reply);
    });
}

fn write(
    conn: &Conn,
    id: RequestId,
    req: &WriteFileRequest,
    state: &WriteState,
    rx: Receiver<Chunk>,
) -> Result<u64, (ErrorCode, String)> {
    let io_err = |e: io::Error| (io_code(&e), e.to_string());
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(req.mode)
        .custom_flags(libc::O_CLOEXEC)
        .open(&req.path)
        .map_err(io_err)?;
    if f.metadata().map_err(io_err)?.is_file() {
        f.set_permissions(std::fs::Permissions::from_mode(req.mode))
            .map_err(io_err)?;
    }
    let mut written = 0u64;
    while written < req.size {
        match rx.recv() {
            Ok(Some(data)) => {
                f.write_all(&data).map_err(io_err)?;
                written += data.len() as u64;
                let credit = lock(&state.window).window.consume(data.len());
                if let Some(c) = credit {
                    conn.send(id, Body::Credit(c));
                }
            }
            Ok(None) | Err(_) => {
                return Err((
                    ErrorCode::BadArguments,
                    format!("data ended after {written} of {} bytes", req.size),
                ))
            }
        }
    }
    Ok(written)
}

pub(crate) fn start_read(conn: &Arc<Conn>, id: RequestId, req: ReadFileRequest) {
    let window = Arc::new(SendWindow::new());
    conn.insert(id, Live::ReadFile(window.clone()));
    let limit = req.limit.min(conn.server.config.max_file_size);
    let c = conn.clone();
    spawn_thread(conn, id, move || {
        let reply = match read(&c, id, &req.path, limit, &window) {
            Ok(bytes) => Body::ReadDone { bytes },
            Err((code, why)) => Body::Error(crate::protocol::ErrorReply::new(
                code,
                format!("read_file {}: {why}", req.path.display()),
            )),
        };
        c.finish(id, reply);
    });
}

fn read(
    conn: &Conn,
    id: RequestId,
    path: &Path,
    limit: u64,
    window: &SendWindow,
) -> Result<u64, (ErrorCode, String)> {
    let io_err = |e: io::Error| (io_code(&e), e.to_string());
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err)?;
    let meta = f.metadata().map_err(io_err)?;
    if meta.is_dir() {
        return Err((ErrorCode::BadArguments, "is a directory".into()));
    }
    let too_large = |n: u64| {
        (
            ErrorCode::TooLarge,
            format!("{n} bytes or more, above the limit of {limit} bytes"),
        )
    };
    if meta.len() > limit {
        return Err(too_large(meta.len()));
    }
    conn.send(
        id,
        Body::ReadStart(FileInfo {
            size: meta.len(),
            mode: meta.permissions().mode() & 0o7777,
        }),
    );
    read_stream(conn, id, &mut f, limit, window, too_large)
}

fn read_stream(
    conn: &Conn,
    id: RequestId,
    f: &mut File,
    limit: u64,
    window: &SendWindow,
    too_large: impl Fn(u64) -> (ErrorCode, String),
) -> Result<u64, (ErrorCode, String)> {
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut total = 0u64;
    loop {
        let Some(credit) = window.take(CHUNK_SIZE) else {
            // Cancelled: the reply is not sent (the request is gone).
            return Ok(total);
        };
        let n = loop {
            match f.read(&mut buf[..credit]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err((io_code(&e), e.to_string())),
            }
        };
        window.grant((credit - n) as u32);
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        if total > limit {
            return Err(too_large(total));
        }
        if !conn.send(id, Body::FileData(buf[..n].to_vec())) {
            return Ok(total);
        }
    }
}
