//! The request server over a Unix socketpair, in-process (not PID 1: the
//! reaper makes this test process a child subreaper). The same scenarios
//! run against a real guest over vsock in the rig.
//!
//! Nothing here may use `std::process::Command`: the reaper owns
//! `waitpid` for the whole test process.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use cleave_guest::protocol::*;
use cleave_guest::reseed::{KernelReseed, Reseed};
use cleave_guest::server::{GateMode, Reaper, Server, ServerConfig};
use sha2::{Digest, Sha256};

const T: Duration = Duration::from_secs(10);
const AGENT: &str = env!("CARGO_BIN_EXE_cleave-guest");

/// A reseed that cannot credit (a regular file: ENOTTY) and leaves the
/// clock alone, so no test touches this machine's CRNG or time.
fn harmless_reseed() -> Arc<dyn Reseed> {
    let f = tempfile::NamedTempFile::new().unwrap();
    let (_, path) = f.keep().unwrap();
    Arc::new(KernelReseed {
        device: path,
        set_clock: false,
        test_mode: cleave_guest::reseed::TestMode::Off,
    })
}

/// Test double for the gate: a reseed that succeeds.
struct Succeeds;
impl Reseed for Succeeds {
    fn reseed(&self, req: &ReseedRequest) -> ReseedReply {
        ReseedReply {
            reseeded: true,
            nonce: req.nonce,
            clock_set: false,
            detail: String::new(),
        }
    }
}

fn server(config: ServerConfig) -> UnixStream {
    let server = Server::new(config, Reaper::start());
    let (host, guest) = UnixStream::pair().unwrap();
    thread::spawn(move || {
        let r = guest.try_clone().unwrap();
        server.serve(r, guest);
    });
    host
}

fn client() -> Client {
    let mut config = ServerConfig::new(GateMode::Open, harmless_reseed());
    config.max_file_size = 64 << 20;
    // This process is the test binary, not the agent: execs with a user
    // start the built agent as their `exec-as` helper.
    config.agent_exe = PathBuf::from(AGENT);
    Client::new(server(config)).unwrap()
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

fn run(c: &Client, req: ExecRequest) -> (ExitReport, String, String) {
    let (x, out, err) = c.exec_collect(req, None).unwrap();
    (
        x,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

fn remote(e: ClientError) -> ErrorReply {
    match e {
        ClientError::Remote(r) => r,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

/// True once `pid` no longer exists (not even as a zombie).
fn gone(pid: i32) -> bool {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn hello_reports_version_and_uptime() {
    let c = client();
    let h = c.hello(T).unwrap();
    assert_eq!(h.version, u16::from(PROTOCOL_VERSION));
    assert!(h.agent.starts_with("cleave-guest"));
}

#[test]
fn echo() {
    let c = client();
    let (x, out, err) = run(&c, ExecRequest::new(["echo", "hi", "there"]));
    assert_eq!(x.status, ExitStatus::Code(0));
    assert!(!x.timed_out);
    assert_eq!(out, "hi there\n");
    assert_eq!(err, "");
}

#[test]
fn exit_codes_and_signals_propagate() {
    let c = client();
    let (x, out, err) = run(&c, sh("echo out; echo err >&2; exit 7"));
    assert_eq!(x.status, ExitStatus::Code(7));
    assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
    let (x, _, _) = run(&c, sh("kill -TERM $$"));
    assert_eq!(x.status, ExitStatus::Signal(libc::SIGTERM));
}

#[test]
fn env_and_cwd_are_exactly_as_requested() {
    let c = client();
    let mut req = sh("pwd; echo \"$FOO\"; env | wc -l");
    req.env.push(("FOO".into(), "bar baz".into()));
    req.cwd = Some(PathBuf::from("/tmp"));
    let (x, out, _) = run(&c, req);
    assert_eq!(x.status, ExitStatus::Code(0));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "/tmp");
    assert_eq!(lines[1], "bar baz");
    // PATH and FOO, plus what sh itself exports (PWD, SHLVL, ...): nothing
    // of the agent's own environment.
    let n: usize = lines[2].trim().parse().unwrap();
    assert!(n <= 5, "unexpected inherited environment ({n} variables)");
}

#[test]
fn stdin_round_trips() {
    let c = client();
    let input: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut req = ExecRequest::new(["cat"]);
    req.stdin = true;
    let (x, out, _) = c.exec_collect(req, Some(input.clone())).unwrap();
    assert_eq!(x.status, ExitStatus::Code(0));
    assert_eq!(out.len(), input.len());
    assert!(out == input);
}

#[test]
fn stdin_can_be_closed_early_by_the_process() {
    let c = client();
    let mut req = sh("head -c 10 >/dev/null; echo done");
    req.stdin = true;
    let (x, out, _) = c.exec_collect(req, Some(vec![b'x'; 2_000_000])).unwrap();
    assert_eq!(x.status, ExitStatus::Code(0));
    assert_eq!(out, b"done\n");
}

#[test]
fn sixty_four_mib_of_output_match_by_sha256() {
    let c = client();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("blob");
    let script = format!(
        "head -c 67108864 /dev/urandom > {f}; sha256sum {f} >&2; cat {f}",
        f = f.display()
    );
    let mut hasher = Sha256::new();
    let mut n = 0usize;
    let mut stderr = Vec::new();
    let x = c
        .exec(sh(&script), None, |ev| match ev {
            OutputEvent::Stdout(d) => {
                n += d.len();
                hasher.update(d);
            }
            OutputEvent::Stderr(d) => stderr.extend_from_slice(d),
            OutputEvent::Exited(_) => {}
        })
        .unwrap();
    assert_eq!(x.status, ExitStatus::Code(0));
    assert_eq!(n, 64 << 20);
    let ours: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let theirs = String::from_utf8(stderr).unwrap();
    assert_eq!(theirs.split_whitespace().next(), Some(ours.as_str()));
}

#[test]
fn sixty_four_concurrent_execs_on_one_connection() {
    let c = Arc::new(client());
    let threads: Vec<_> = (0..64)
        .map(|i| {
            let c = c.clone();
            thread::spawn(move || {
                let req = sh(&format!("sleep 0.2; echo {i}; exit {}", i % 5));
                let (x, out, _) = c.exec_collect(req, None).unwrap();
                assert_eq!(x.status, ExitStatus::Code(i % 5));
                assert_eq!(String::from_utf8(out).unwrap(), format!("{i}\n"));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn many_connections_are_served_concurrently() {
    let threads: Vec<_> = (0..8)
        .map(|i| {
            thread::spawn(move || {
                let c = client();
                let (x, out, _) = run(&c, sh(&format!("sleep 0.2; echo {i}")));
                assert_eq!(x.status, ExitStatus::Code(0));
                assert_eq!(out, format!("{i}\n"));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn write_then_read_a_sixteen_mib_file() {
    let c = client();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    let data: Vec<u8> = (0..16u32 << 20).map(|i| (i ^ (i >> 9)) as u8).collect();
    let n = c
        .write_file(&path, 0o640, data.len() as u64, &mut &data[..])
        .unwrap();
    assert_eq!(n, data.len() as u64);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640);
    let back = c.read_file_to_vec(&path, 32 << 20).unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data);
}

#[test]
fn read_of_a_missing_file_names_the_path_and_the_errno() {
    let c = client();
    let e = remote(
        c.read_file_to_vec(Path::new("/nonexistent/cleave/file"), 1024)
            .unwrap_err(),
    );
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(e.message.contains("/nonexistent/cleave/file"), "{e}");
    assert!(e.message.contains("No such file or directory"), "{e}");
    // The connection is still good.
    c.hello(T).unwrap();
}

#[test]
fn file_limits_are_enforced() {
    let c = client();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![1u8; 5000]).unwrap();
    let e = remote(c.read_file_to_vec(&path, 4999).unwrap_err());
    assert_eq!(e.code, ErrorCode::TooLarge);
    // Above the agent's own limit (64 MiB here).
    let e = remote(
        c.write_file(&path, 0o600, 1 << 30, &mut std::io::empty())
            .unwrap_err(),
    );
    assert_eq!(e.code, ErrorCode::TooLarge);
    // A source shorter than announced aborts the write with a clear error.
    let e = c
        .write_file(&path, 0o600, 100, &mut &[0u8; 10][..])
        .unwrap_err();
    assert!(e.to_string().contains("10 of 100"), "{e}");
    c.hello(T).unwrap();
}

#[test]
fn exec_of_a_missing_command_is_a_clear_error() {
    let c = client();
    let e = remote(
        c.exec_collect(ExecRequest::new(["no-such-command-cleave"]), None)
            .unwrap_err(),
    );
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(e.message.contains("no-such-command-cleave"), "{e}");
    let mut req = ExecRequest::new(["true"]);
    req.cwd = Some(PathBuf::from("/nonexistent/dir"));
    let e = remote(c.exec_collect(req, None).unwrap_err());
    assert!(e.message.contains("chdir /nonexistent/dir"), "{e}");
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let c = client();
    let mut req = sh("sleep 1000 & echo $!; wait");
    req.timeout_ms = Some(300);
    let (x, out, _) = run(&c, req);
    assert!(x.timed_out);
    assert_eq!(x.status, ExitStatus::Signal(libc::SIGKILL));
    let grandchild: i32 = out.trim().parse().unwrap();
    assert!(
        gone(grandchild),
        "grandchild {grandchild} survived the timeout"
    );
}

#[test]
fn timeout_also_covers_a_background_process_holding_stdout() {
    let c = client();
    let mut req = sh("sleep 1000 & echo $!");
    req.timeout_ms = Some(300);
    let (x, out, _) = run(&c, req);
    // The leader exited by itself; the group was killed to end the exec.
    assert_eq!(x.status, ExitStatus::Code(0));
    assert!(x.timed_out);
    let grandchild: i32 = out.trim().parse().unwrap();
    assert!(gone(grandchild));
}

#[test]
fn signal_reaches_a_running_exec() {
    let c = client();
    let mut h = c.start_exec(sh("echo ready; sleep 1000")).unwrap();
    assert_eq!(
        h.next_event().unwrap(),
        OutputEvent::Stdout(b"ready\n".to_vec())
    );
    c.signal(h.id(), libc::SIGTERM).unwrap();
    let OutputEvent::Exited(x) = h.next_event().unwrap() else {
        panic!("expected the exit");
    };
    assert_eq!(x.status, ExitStatus::Signal(libc::SIGTERM));
    let e = remote(c.signal(h.id(), libc::SIGTERM).unwrap_err());
    assert_eq!(e.code, ErrorCode::NotFound);
}

#[test]
fn a_dropped_connection_kills_its_execs() {
    let c = client();
    let mut h = c.start_exec(sh("sleep 1000 & echo $! $$; wait")).unwrap();
    let OutputEvent::Stdout(d) = h.next_event().unwrap() else {
        panic!("expected the pids");
    };
    let pids: Vec<i32> = String::from_utf8(d)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    drop(h);
    drop(c);
    for pid in pids {
        assert!(gone(pid), "process {pid} survived its connection");
    }
}

#[test]
fn the_gate_refuses_work_until_a_reseed_succeeds() {
    // A reseed that fails keeps the gate closed.
    let c = Client::new(server(ServerConfig::new(
        GateMode::RequireReseed,
        harmless_reseed(),
    )))
    .unwrap();
    let e = remote(
        c.exec_collect(ExecRequest::new(["true"]), None)
            .unwrap_err(),
    );
    assert_eq!(e.code, ErrorCode::NotReady);
    let e = remote(
        c.read_file_to_vec(Path::new("/etc/hostname"), 1024)
            .unwrap_err(),
    );
    assert_eq!(e.code, ErrorCode::NotReady);
    let req = ReseedRequest {
        entropy: vec![3; 32],
        nonce: *b"0123456789abcdef",
        time: WallTime::now(),
    };
    let r = c.reseed(req.clone(), T).unwrap();
    assert!(!r.reseeded);
    assert_eq!(&r.nonce, b"0123456789abcdef");
    assert!(r.detail.contains("ENOTTY"), "{}", r.detail);
    let e = remote(
        c.exec_collect(ExecRequest::new(["true"]), None)
            .unwrap_err(),
    );
    assert_eq!(e.code, ErrorCode::NotReady);

    // A reseed that succeeds opens it.
    let c = Client::new(server(ServerConfig::new(
        GateMode::RequireReseed,
        Arc::new(Succeeds),
    )))
    .unwrap();
    c.hello(T).unwrap();
    let r = c.reseed(req, T).unwrap();
    assert!(r.reseeded);
    let (x, _, _) = run(&c, ExecRequest::new(["true"]));
    assert_eq!(x.status, ExitStatus::Code(0));
}

#[test]
fn quiesce_closes_an_open_gate_and_names_what_still_runs() {
    // This test process is not a guest: the development host has other processes (at
    // least this test's own parent), so quiesce refuses and names them, and the gate is
    // closed whatever the answer.
    let c = Client::new(server(ServerConfig::new(
        GateMode::Open,
        Arc::new(Succeeds),
    )))
    .unwrap();
    let (x, _, _) = run(&c, ExecRequest::new(["true"]));
    assert_eq!(x.status, ExitStatus::Code(0));
    let e = remote(c.quiesce(T).unwrap_err());
    assert_eq!(e.code, ErrorCode::Busy);
    assert!(e.message.contains("besides the agent still run"), "{e}");
    let e = remote(
        c.exec_collect(ExecRequest::new(["true"]), None)
            .unwrap_err(),
    );
    assert_eq!(e.code, ErrorCode::NotReady, "quiesce must close the gate");
}

#[test]
fn shutdown_without_a_handler_is_refused_and_with_one_is_acknowledged() {
    let c = client();
    assert_eq!(
        remote(c.shutdown().unwrap_err()).code,
        ErrorCode::Unsupported
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let mut config = ServerConfig::new(GateMode::Open, harmless_reseed());
    config.on_shutdown = Some(Arc::new(move || {
        tx.lock().unwrap().send(()).unwrap();
    }));
    let c = Client::new(server(config)).unwrap();
    c.shutdown().unwrap();
    rx.recv_timeout(T).unwrap();
}

/// A raw connection for frames the client would never send.
struct Raw {
    w: UnixStream,
    r: FrameReader<UnixStream>,
}

impl Raw {
    fn new() -> Raw {
        let s = server(ServerConfig::new(GateMode::Open, harmless_reseed()));
        Raw {
            r: FrameReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    fn send(&mut self, id: RequestId, body: Body) {
        write_message(&mut self.w, &Message::new(id, body)).unwrap();
    }

    fn recv(&mut self) -> Message {
        self.r.read_message().unwrap().unwrap()
    }

    fn expect_error(&mut self, id: RequestId, code: ErrorCode) -> String {
        let mut m = self.recv();
        while matches!(m.body, Body::Credit(_)) {
            m = self.recv();
        }
        assert_eq!(m.id, id);
        match m.body {
            Body::Error(e) => {
                assert_eq!(e.code, code, "{e}");
                e.message
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn expect_alive(&mut self, id: RequestId) {
        self.send(
            id,
            Body::Hello(Hello {
                min_version: 1,
                max_version: 1,
            }),
        );
        // Frames of earlier requests (credit, the end of an exec killed by an error) may
        // still be in flight; the connection is alive if this hello is answered.
        let mut m = self.recv();
        while m.id != id {
            m = self.recv();
        }
        assert!(matches!(m.body, Body::HelloReply(_)), "{m:?}");
    }
}

#[test]
fn unknown_ops_get_an_error_and_the_connection_keeps_working() {
    let mut raw = Raw::new();
    let mut frame = vec![PROTOCOL_VERSION, 0x42, 0, 0];
    frame.extend_from_slice(&9u64.to_le_bytes());
    frame.extend_from_slice(&4u32.to_le_bytes());
    frame.extend_from_slice(b"junk");
    raw.w.write_all(&frame).unwrap();
    raw.expect_error(9, ErrorCode::UnknownOp);
    // A reply kind sent to the agent is an unknown op too.
    raw.send(10, Body::Stdout(b"x".to_vec()));
    raw.expect_error(10, ErrorCode::UnknownOp);
    raw.expect_alive(11);
}

#[test]
fn an_oversized_frame_gets_an_error_and_the_connection_keeps_working() {
    let mut raw = Raw::new();
    let len = MAX_PAYLOAD + 1;
    let mut frame = vec![PROTOCOL_VERSION, 0x02, 0, 0];
    frame.extend_from_slice(&3u64.to_le_bytes());
    frame.extend_from_slice(&len.to_le_bytes());
    raw.w.write_all(&frame).unwrap();
    // The server answers from the header alone, then skips the payload.
    let msg = raw.expect_error(3, ErrorCode::TooLarge);
    assert!(msg.contains("exceeds the limit"), "{msg}");
    raw.w.write_all(&vec![0u8; len as usize]).unwrap();
    raw.expect_alive(4);
}

#[test]
fn bad_arguments_get_an_error_and_the_connection_keeps_working() {
    let mut raw = Raw::new();
    raw.send(
        5,
        Body::Exec(ExecRequest {
            argv: vec![],
            env: vec![],
            cwd: None,
            stdin: false,
            timeout_ms: None,
            user: None,
        }),
    );
    let msg = raw.expect_error(5, ErrorCode::BadArguments);
    assert!(msg.contains("argv"), "{msg}");
    raw.send(
        6,
        Body::Signal(SignalRequest {
            target: 1,
            signal: 99,
        }),
    );
    raw.expect_error(6, ErrorCode::BadArguments);
    raw.send(
        7,
        Body::Hello(Hello {
            min_version: 5,
            max_version: 9,
        }),
    );
    raw.expect_error(7, ErrorCode::UnsupportedVersion);
    raw.expect_alive(8);
}

#[test]
fn stdin_beyond_the_window_ends_that_exec_only() {
    let mut raw = Raw::new();
    let mut req = ExecRequest::new(["sleep", "1000"]);
    req.stdin = true;
    raw.send(1, Body::Exec(req));
    // `sleep` never reads. The pipe absorbs one chunk (64 KiB), so at most
    // that much credit comes back and the feeder blocks on the next chunk:
    // the window plus two chunks is certainly beyond the credit.
    let chunk = vec![0u8; CHUNK_SIZE];
    for _ in 0..(INITIAL_WINDOW as usize / CHUNK_SIZE + 2) {
        raw.send(1, Body::Stdin(chunk.clone()));
    }
    raw.send(1, Body::Stdin(vec![0]));
    raw.expect_error(1, ErrorCode::FlowControl);
    raw.expect_alive(2);
}

#[test]
fn orphans_are_reaped_not_left_as_zombies() {
    let c = client();
    let before = Reaper::start().orphans_reaped();
    // The leader exits at once; its background child is orphaned to this
    // process (a subreaper, as PID 1 would be) and must be reaped.
    let (x, out, _) = run(&c, sh("sleep 0.2 >/dev/null & echo $!"));
    assert_eq!(x.status, ExitStatus::Code(0));
    let orphan: i32 = out.trim().parse().unwrap();
    assert!(gone(orphan), "orphan {orphan} left behind (zombie?)");
    assert!(Reaper::start().orphans_reaped() > before);
}

#[test]
fn dropping_an_unfinished_exec_handle_kills_it() {
    let c = client();
    let mut h = c.start_exec(sh("echo $$; exec sleep 1000")).unwrap();
    let OutputEvent::Stdout(d) = h.next_event().unwrap() else {
        panic!("expected the pid");
    };
    let pid: i32 = String::from_utf8(d).unwrap().trim().parse().unwrap();
    drop(h);
    assert!(gone(pid), "exec {pid} survived its dropped handle");
    c.hello(T).unwrap();
}

// Execs as a user. Changing ids needs root: these fail (not skip)
// without it, as CI runs them as root.

fn as_user(mut req: ExecRequest, uid: u32, gid: u32) -> ExecRequest {
    req.user = Some(ExecUser { uid, gid });
    req
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test changes user ids and must run as root"
    );
}

#[test]
fn an_exec_runs_as_the_requested_user_and_group() {
    require_root();
    let c = client();
    let (x, out, err) = run(&c, as_user(sh("id -u; id -g"), 65534, 65534));
    assert_eq!((x.status, err.as_str()), (ExitStatus::Code(0), ""));
    assert_eq!(out, "65534\n65534\n");
    // No supplementary groups are left (only the primary group shows).
    let (_, out, _) = run(&c, as_user(ExecRequest::new(["id", "-G"]), 1234, 5678));
    assert_eq!(out, "5678\n");
    // Ids with no passwd entry, a non-root user in the root group.
    let (_, out, _) = run(&c, as_user(sh("id -u; id -g"), 4321, 0));
    assert_eq!(out, "4321\n0\n");
    // And it cannot get root back.
    let (x, _, _) = run(
        &c,
        as_user(ExecRequest::new(["cat", "/proc/1/environ"]), 65534, 65534),
    );
    assert_ne!(x.status, ExitStatus::Code(0));
}

#[test]
fn without_a_user_an_exec_runs_as_root() {
    require_root();
    let c = client();
    let (x, out, _) = run(&c, sh("id -u; id -g"));
    assert_eq!(x.status, ExitStatus::Code(0));
    assert_eq!(out, "0\n0\n");
    // Root asked for explicitly goes through the helper too.
    let (x, out, _) = run(&c, as_user(sh("id -u; id -g; id -G"), 0, 0));
    assert_eq!(x.status, ExitStatus::Code(0));
    assert_eq!(out, "0\n0\n0\n");
}

#[test]
fn a_user_exec_keeps_env_cwd_stdin_and_signal_dispositions() {
    require_root();
    let c = client();
    let mut req = as_user(sh("pwd; echo \"$CLEAVE_X\"; cat"), 65534, 65534);
    req.env.push(("CLEAVE_X".into(), "x y".into()));
    req.cwd = Some(PathBuf::from("/tmp"));
    req.stdin = true;
    let (x, out, err) = c.exec_collect(req, Some(b"from stdin\n".to_vec())).unwrap();
    assert_eq!(
        x.status,
        ExitStatus::Code(0),
        "{}",
        String::from_utf8_lossy(&err)
    );
    assert_eq!(String::from_utf8(out).unwrap(), "/tmp\nx y\nfrom stdin\n");
    // The helper's runtime ignores SIGPIPE; the program must not inherit that.
    let status = ExecRequest::new(["grep", "^Sig[IB]", "/proc/self/status"]);
    let (_, direct, _) = run(&c, status.clone());
    let (_, helped, _) = run(&c, as_user(status, 65534, 65534));
    assert_eq!(helped, direct);
    let ignored = helped
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:\t"))
        .map(|m| u64::from_str_radix(m, 16).unwrap())
        .unwrap();
    assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "{helped}");
}

#[test]
fn a_user_exec_of_a_missing_program_is_the_usual_not_found() {
    require_root();
    let c = client();
    for argv0 in [
        "no-such-command-cleave",
        "/nonexistent/no-such-command-cleave",
    ] {
        let req = as_user(ExecRequest::new([argv0]), 65534, 65534);
        let e = remote(c.exec_collect(req, None).unwrap_err());
        assert_eq!(e.code, ErrorCode::NotFound, "{e}");
        assert!(e.message.contains("no-such-command-cleave"), "{e}");
    }
}

#[test]
fn a_user_exec_times_out_as_a_group() {
    require_root();
    let c = client();
    let mut req = as_user(sh("sleep 1000 & echo $!; wait"), 65534, 65534);
    req.timeout_ms = Some(300);
    let (x, out, _) = run(&c, req);
    assert!(x.timed_out);
    assert_eq!(x.status, ExitStatus::Signal(libc::SIGKILL));
    let grandchild: i32 = out.trim().parse().unwrap();
    assert!(gone(grandchild));
}

#[test]
fn a_broken_server_config_is_an_io_error_not_a_missing_program() {
    let mut config = ServerConfig::new(GateMode::Open, harmless_reseed());
    config.agent_exe = PathBuf::from("/nonexistent/cleave-guest");
    let c = Client::new(server(config)).unwrap();
    let e = remote(
        c.exec_collect(as_user(ExecRequest::new(["true"]), 1, 1), None)
            .unwrap_err(),
    );
    assert_eq!(e.code, ErrorCode::Io, "{e}");
    assert!(e.message.contains("exec-as helper"), "{e}");
}

#[test]
fn exec_as_refuses_bad_arguments_with_127_and_a_message() {
    let c = client();
    let helper = |args: &[&str]| {
        let mut argv = vec![AGENT, "exec-as"];
        argv.extend_from_slice(args);
        run(&c, ExecRequest::new(argv))
    };
    for (args, says) in [
        (
            &["x", "0", "/bin/true", "--", "true"][..],
            "UID must be a decimal",
        ),
        (
            &["0", "-1", "/bin/true", "--", "true"],
            "GID must be a decimal",
        ),
        (&["0", "0", "/bin/true", "true"], "expected \"--\""),
        (&["0", "0", "/bin/true"], "usage: exec-as"),
        (&["0", "0", "/bin/true", "-", "true"], "expected \"--\""),
        (&["0", "0", "/bin/true", "--"], "no ARGV0"),
        (&[], "usage: exec-as"),
    ] {
        let (x, out, err) = helper(args);
        assert_eq!(x.status, ExitStatus::Code(127), "{args:?}: {err}");
        assert_eq!(out, "");
        assert!(err.starts_with("cleave-guest exec-as: "), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // A failing step names itself (as root, the ids change; execv fails).
    let (x, _, err) = helper(&["65534", "65534", "/nonexistent/prog", "--", "prog"]);
    assert_eq!(x.status, ExitStatus::Code(127));
    assert!(err.contains("execv /nonexistent/prog: ENOENT"), "{err}");
}
