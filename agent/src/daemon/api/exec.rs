//! The Exec service: one command in one sandbox, streamed both ways (token holders).
//!
//! The guest connection is blocking: a thread per exec pumps its output into a bounded
//! channel (so a client that stops reading stops the guest's command at a full pipe, not
//! a growing buffer), and a thread writes stdin from another bounded channel. A client
//! that goes away drops the exec, which kills the command's process group in the guest.

use std::ffi::OsString;
use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use cleave_guest::protocol::message::MAX_SIGNAL;
use cleave_guest::protocol::{ExecRequest, ExitStatus, OutputEvent};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::pb::exec_input::Input;
use super::pb::exec_server::Exec;
use super::pb::{self, exec_output, exit_status};
use super::{bounded, caller_of, Api, Caller, Finish};
use crate::image::rootfs::ExecDefaults;
use crate::node::exec::{self as node_exec, parse_env, parse_user, ExecOptions};

type OutputStream = Pin<Box<dyn Stream<Item = Result<pb::ExecOutput, Status>> + Send>>;

/// The guest request for `start`, over the sandbox's image defaults.
fn exec_request(start: &pb::ExecStart, defaults: &ExecDefaults) -> Result<ExecRequest, Status> {
    if start.argv.is_empty() || start.argv[0].is_empty() {
        return Err(Status::invalid_argument(
            "argv is empty: name the command to run",
        ));
    }
    let env = start
        .env
        .iter()
        .map(|kv| parse_env(kv).map_err(|e| Status::invalid_argument(format!("env entry {e}"))))
        .collect::<Result<_, _>>()?;
    let cwd = match start.cwd.as_str() {
        "" => None,
        c if c.starts_with('/') => Some(c.into()),
        c => {
            return Err(Status::invalid_argument(format!(
                "cwd {:?} is not an absolute path",
                bounded(c)
            )))
        }
    };
    let user = match start.user.as_str() {
        "" => None,
        u => Some(parse_user(u).map_err(|e| Status::invalid_argument(format!("user {e}")))?),
    };
    let opts = ExecOptions {
        env,
        cwd,
        user,
        stdin: start.stdin,
        timeout_ms: (start.timeout_ms > 0).then_some(start.timeout_ms),
    };
    Ok(node_exec::exec_request(
        defaults,
        start.argv.iter().map(OsString::from).collect(),
        opts,
    ))
}

fn output(o: exec_output::Output) -> Result<pb::ExecOutput, Status> {
    Ok(pb::ExecOutput { output: Some(o) })
}

#[tonic::async_trait]
impl Exec for Api {
    type ExecStream = OutputStream;

    async fn exec(
        &self,
        request: Request<Streaming<pb::ExecInput>>,
    ) -> Result<Response<OutputStream>, Status> {
        let started = Instant::now();
        let caller = caller_of(&request);
        let mut id = String::new();
        let result = self.start_exec(request, &caller, &mut id, started).await;
        if let Err(e) = &result {
            // A started exec is counted and audited when it ends.
            self.finish(Finish {
                result: Err(e.code()),
                ..Finish::new("exec", &caller, started)
                    .audited()
                    .sandboxes(vec![bounded(&id)])
            });
        }
        result.map(Response::new)
    }
}

impl Api {
    async fn start_exec(
        &self,
        request: Request<Streaming<pb::ExecInput>>,
        caller: &Caller,
        id_out: &mut String,
        started: Instant,
    ) -> Result<OutputStream, Status> {
        self.admit(caller)?;
        let (meta, ext, mut inbound) = request.into_parts();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before its start message"))?;
        let Some(Input::Start(start)) = first.input else {
            return Err(Status::invalid_argument(
                "the first message of an exec must be `start`",
            ));
        };
        *id_out = start.sandbox_id.clone();
        let auth = Request::from_parts(meta, ext, ());
        let sandbox = self.sandbox_for(&auth, &start.sandbox_id).await?;
        let req = exec_request(&start, &sandbox.defaults)?;
        let max = self.config.max_execs_per_sandbox;
        let slot = sandbox.begin_exec(max).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "sandbox {} runs {max} execs already (max_execs_per_sandbox); wait for one \
                 to end",
                sandbox.id
            ))
        })?;
        let client = sandbox.client();
        let stdin_wanted = req.stdin;
        let handle = super::blocking({
            let client = client.clone();
            move || client.start_exec(req)
        })
        .await?
        .map_err(|e| {
            Status::failed_precondition(format!(
                "the sandbox's agent did not start the command: {}",
                bounded(&e.to_string())
            ))
        })?;
        let exec_id = handle.id();
        let mut stdin = handle.stdin_writer();
        let (out_tx, out_rx) = mpsc::channel::<Result<pb::ExecOutput, Status>>(16);

        // Output: guest → client, until the exit (or the client leaves).
        let api = self.clone();
        let caller = caller.clone();
        let sandbox_id = sandbox.id.to_string();
        let pump_tx = out_tx.clone();
        std::thread::Builder::new()
            .name("cleave-exec-out".into())
            .spawn(move || {
                let _slot = slot;
                let mut handle = handle;
                let code = loop {
                    let ev = match handle.next_event() {
                        Ok(OutputEvent::Stdout(d)) => output(exec_output::Output::Stdout(d)),
                        Ok(OutputEvent::Stderr(d)) => output(exec_output::Output::Stderr(d)),
                        Ok(OutputEvent::Exited(x)) => {
                            let status = match x.status {
                                ExitStatus::Code(c) => exit_status::Status::Code(c),
                                ExitStatus::Signal(s) => exit_status::Status::Signal(s),
                            };
                            let _ = pump_tx.blocking_send(output(exec_output::Output::Exit(
                                pb::ExitStatus {
                                    status: Some(status),
                                    timed_out: x.timed_out,
                                },
                            )));
                            break tonic::Code::Ok;
                        }
                        Err(e) => {
                            let s = Status::unavailable(format!(
                                "the exec ended without an exit status (the sandbox was \
                                 destroyed, or its agent failed): {}",
                                bounded(&e.to_string())
                            ));
                            let code = s.code();
                            let _ = pump_tx.blocking_send(Err(s));
                            break code;
                        }
                    };
                    if pump_tx.blocking_send(ev).is_err() {
                        // The client left: dropping the handle kills the command.
                        break tonic::Code::Cancelled;
                    }
                };
                drop(handle);
                api.finish(Finish {
                    method: "exec",
                    caller: &caller,
                    started,
                    audited: true,
                    sandboxes: vec![sandbox_id],
                    template: None,
                    result: if code == tonic::Code::Ok {
                        Ok(())
                    } else {
                        Err(code)
                    },
                });
            })
            .map_err(|_| Status::unavailable("the daemon cannot start a thread now"))?;

        // Input: client → guest. Stdin goes through a bounded channel to a writer thread
        // (writing waits for the guest's credit).
        let (in_tx, mut in_rx) = mpsc::channel::<Option<Vec<u8>>>(4);
        std::thread::Builder::new()
            .name("cleave-exec-in".into())
            .spawn(move || {
                while let Some(chunk) = in_rx.blocking_recv() {
                    match chunk {
                        Some(d) => {
                            if stdin.write_all(&d).is_err() {
                                return;
                            }
                        }
                        None => {
                            let _ = stdin.close();
                            return;
                        }
                    }
                }
            })
            .map_err(|_| Status::unavailable("the daemon cannot start a thread now"))?;
        tokio::spawn(forward_input(
            inbound,
            in_tx,
            out_tx,
            client,
            exec_id,
            stdin_wanted,
        ));
        Ok(Box::pin(ReceiverStream::new(out_rx)))
    }
}

/// Reads the client's messages after `start` until its stream ends.
async fn forward_input(
    mut inbound: Streaming<pb::ExecInput>,
    stdin: mpsc::Sender<Option<Vec<u8>>>,
    out: mpsc::Sender<Result<pb::ExecOutput, Status>>,
    client: Arc<cleave_guest::protocol::Client>,
    exec_id: u64,
    stdin_wanted: bool,
) {
    let refuse = |s: Status| async {
        let _ = out.send(Err(s)).await;
    };
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            // End of the client's stream, or it broke: stdin (if any) is closed.
            Ok(None) | Err(_) => {
                let _ = stdin.send(None).await;
                return;
            }
        };
        match msg.input {
            Some(Input::Stdin(d)) if stdin_wanted => {
                if stdin.send(Some(d)).await.is_err() {
                    return;
                }
            }
            Some(Input::StdinClose(_)) if stdin_wanted => {
                let _ = stdin.send(None).await;
            }
            Some(Input::Stdin(_) | Input::StdinClose(_)) => {
                return refuse(Status::invalid_argument(
                    "stdin sent to an exec started with stdin: false",
                ))
                .await;
            }
            Some(Input::Signal(n)) if (1..=MAX_SIGNAL).contains(&n) => {
                let client = client.clone();
                let _ = super::blocking(move || client.signal(exec_id, n)).await;
            }
            Some(Input::Signal(n)) => {
                return refuse(Status::invalid_argument(format!(
                    "signal {n} is out of range (1 to {MAX_SIGNAL})"
                )))
                .await;
            }
            Some(Input::Start(_)) => {
                return refuse(Status::invalid_argument("`start` may only come first")).await;
            }
            None => {
                return refuse(Status::invalid_argument("an exec input message is empty")).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(argv: &[&str], env: &[&str], cwd: &str) -> pb::ExecStart {
        pb::ExecStart {
            sandbox_id: String::new(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            cwd: cwd.into(),
            stdin: false,
            timeout_ms: 0,
            user: String::new(),
        }
    }

    fn req(start: &pb::ExecStart) -> Result<ExecRequest, Status> {
        exec_request(start, &ExecDefaults::default())
    }

    #[test]
    fn exec_requests_are_checked() {
        assert!(req(&start(&[], &[], "")).is_err());
        assert!(req(&start(&[""], &[], "")).is_err());
        let e = req(&start(&["ls"], &["NOEQUALS"], "")).unwrap_err();
        assert!(e.message().contains("KEY=VALUE"));
        assert!(req(&start(&["ls"], &["=v"], "")).is_err());
        assert!(req(&start(&["ls"], &[], "tmp")).is_err());
        let mut bad_user = start(&["ls"], &[], "");
        bad_user.user = "root".into();
        let e = req(&bad_user).unwrap_err();
        assert!(e.message().contains("UID:GID"), "{e}");
        // The given PATH replaces the default one; other keys are added.
        let r = req(&start(&["ls", "-l"], &["PATH=/bin", "A=b=c"], "/tmp")).unwrap();
        assert_eq!(r.env[0], ("PATH".into(), "/bin".into()));
        assert_eq!(r.env[1], ("A".into(), "b=c".into()));
        assert_eq!(r.cwd.as_deref(), Some(std::path::Path::new("/tmp")));
        // No env given: the guest's default PATH.
        let r = req(&start(&["ls"], &[], "")).unwrap();
        assert_eq!(r.env.len(), 1);
        assert_eq!(r.user, None);
    }
}
