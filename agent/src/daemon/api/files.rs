//! The Files service: read and write files in one sandbox as streams (token holders),
//! bounded by `max_file_bytes`.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Instant;

use cleave_guest::protocol::ClientError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::pb::files_server::Files;
use super::pb::write_file_input::Input;
use super::pb::{self};
use super::{bounded, caller_of, Api, Finish};

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::FileChunk, Status>> + Send>>;

fn absolute(path: &str) -> Result<PathBuf, Status> {
    if !path.starts_with('/') || path.len() > 4096 || path.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "path {:?} is not an absolute path",
            bounded(path)
        )));
    }
    Ok(PathBuf::from(path))
}

/// A guest's refusal (no such file, permission) as the caller sees it.
fn guest_status(what: &str, e: ClientError) -> Status {
    match e {
        ClientError::Remote(r) => {
            Status::failed_precondition(format!("{what}: {}", bounded(&r.to_string())))
        }
        e => Status::unavailable(format!("{what}: {}", bounded(&e.to_string()))),
    }
}

/// Sends what the guest's file reader writes as chunks on a bounded channel.
struct ChunkSink(mpsc::Sender<Result<pb::FileChunk, Status>>);

impl Write for ChunkSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Ok(pb::FileChunk { data: buf.to_vec() }))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client left"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads the client's data chunks (forwarded by the request task) for the guest writer.
struct ChunkSource {
    rx: mpsc::Receiver<Vec<u8>>,
    pending: Vec<u8>,
    at: usize,
}

impl Read for ChunkSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.pending.len() {
            match self.rx.blocking_recv() {
                Some(d) => {
                    self.pending = d;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.pending.len() - self.at);
        buf[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[tonic::async_trait]
impl Files for Api {
    type ReadFileStream = ChunkStream;

    async fn read_file(
        &self,
        request: Request<pb::ReadFileRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let started = Instant::now();
        let caller = caller_of(&request);
        let id = request.get_ref().sandbox_id.clone();
        let result = async {
            self.admit(&caller)?;
            let sandbox = self.sandbox_for(&request, &id).await?;
            let req = request.into_inner();
            let path = absolute(&req.path)?;
            let max = self.config.max_file_bytes;
            let limit = if req.limit == 0 {
                max
            } else {
                req.limit.min(max)
            };
            let client = sandbox.client();
            let (tx, rx) = mpsc::channel(8);
            std::thread::Builder::new()
                .name("cleave-file-read".into())
                .spawn(move || {
                    let err_tx = tx.clone();
                    let mut sink = ChunkSink(tx);
                    if let Err(e) = client.read_file(&path, limit, &mut sink) {
                        let _ = err_tx.blocking_send(Err(guest_status("reading the file", e)));
                    }
                })
                .map_err(|_| Status::unavailable("the daemon cannot start a thread now"))?;
            Ok(Box::pin(ReceiverStream::new(rx)) as ChunkStream)
        }
        .await;
        self.respond(Finish::new("file.read", &caller, started), result)
    }

    async fn write_file(
        &self,
        request: Request<Streaming<pb::WriteFileInput>>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        let started = Instant::now();
        let caller = caller_of(&request);
        let mut id = String::new();
        let result = async {
            self.admit(&caller)?;
            let (meta, ext, mut inbound) = request.into_parts();
            let first = inbound.message().await?.ok_or_else(|| {
                Status::invalid_argument("the stream ended before its start message")
            })?;
            let Some(Input::Start(start)) = first.input else {
                return Err(Status::invalid_argument(
                    "the first message of a file write must be `start`",
                ));
            };
            id = start.sandbox_id.clone();
            let auth = Request::from_parts(meta, ext, ());
            let sandbox = self.sandbox_for(&auth, &start.sandbox_id).await?;
            let path = absolute(&start.path)?;
            if start.size > self.config.max_file_bytes {
                return Err(Status::invalid_argument(format!(
                    "the file is {} bytes; this daemon takes at most {} (max_file_bytes)",
                    start.size, self.config.max_file_bytes
                )));
            }
            let mode = if start.mode == 0 {
                0o644
            } else {
                start.mode & 0o7777
            };
            let size = start.size;
            let client = sandbox.client();
            let (data_tx, data_rx) = mpsc::channel::<Vec<u8>>(4);
            let writer = super::blocking(move || {
                let mut src = ChunkSource {
                    rx: data_rx,
                    pending: Vec::new(),
                    at: 0,
                };
                client.write_file(&path, mode, size, &mut src)
            });
            let forward = async {
                let mut got = 0u64;
                while let Some(m) = inbound.message().await? {
                    match m.input {
                        Some(Input::Data(d)) => {
                            got += d.len() as u64;
                            if got > size {
                                return Err(Status::invalid_argument(format!(
                                    "more data than the {size} bytes `start` announced"
                                )));
                            }
                            if data_tx.send(d).await.is_err() {
                                break;
                            }
                        }
                        _ => {
                            return Err(Status::invalid_argument(
                                "after `start`, a file write takes only `data`",
                            ))
                        }
                    }
                }
                if got < size {
                    return Err(Status::invalid_argument(format!(
                        "the stream ended after {got} of the {size} bytes `start` announced"
                    )));
                }
                Ok(())
            };
            let forwarded = forward.await;
            // The writer sees the end of the data (early, on an error: the guest then
            // refuses the short file and nothing half-written is kept as if complete).
            drop(data_tx);
            let written = writer.await?;
            forwarded?;
            let bytes = written.map_err(|e| guest_status("writing the file", e))?;
            Ok(pb::WriteFileResponse { bytes })
        }
        .await;
        self.respond(
            Finish::new("file.write", &caller, started)
                .audited()
                .sandboxes(vec![bounded(&id)]),
            result,
        )
    }
}
