//! The host client against a scripted, misbehaving guest: each violation
//! fails the request it concerns with a protocol error, and the rest of the
//! connection goes on.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::Duration;

use cleave_guest::protocol::*;

const T: Duration = Duration::from_secs(10);

/// Starts a fake guest: `script` sees every frame the host sends and may
/// write anything back. Hello is always answered properly.
fn fake_guest(mut script: impl FnMut(Message, &mut UnixStream) + Send + 'static) -> Client {
    let (host, guest) = UnixStream::pair().unwrap();
    thread::spawn(move || {
        let mut w = guest.try_clone().unwrap();
        let mut r = FrameReader::new(guest);
        while let Ok(Some(m)) = r.read_message() {
            if let Body::Hello(_) = m.body {
                let reply = Body::HelloReply(HelloReply {
                    version: 1,
                    min_version: 1,
                    max_version: 1,
                    uptime_ms: 1,
                    agent: "fake".into(),
                });
                write_message(&mut w, &Message::new(m.id, reply)).unwrap();
            } else {
                script(m, &mut w);
            }
        }
    });
    Client::new(host).unwrap()
}

fn send(w: &mut UnixStream, id: RequestId, body: Body) {
    write_message(w, &Message::new(id, body)).unwrap();
}

fn protocol_error(e: ClientError) -> String {
    match e {
        ClientError::Protocol(why) => why,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[test]
fn output_beyond_the_window_fails_that_exec() {
    let c = fake_guest(|m, w| {
        if let Body::Exec(_) = m.body {
            for _ in 0..=(INITIAL_WINDOW as usize / CHUNK_SIZE) {
                send(w, m.id, Body::Stdout(vec![b'x'; CHUNK_SIZE]));
            }
        }
    });
    let mut h = c.start_exec(ExecRequest::new(["true"])).unwrap();
    // Do not read until the guest has sent everything.
    c.hello(T).unwrap();
    let why = loop {
        match h.next_event() {
            Ok(OutputEvent::Stdout(_)) => {}
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => break protocol_error(e),
        }
    };
    assert!(why.contains("flow-control window"), "{why}");
    c.hello(T).unwrap();
}

#[test]
fn empty_output_frames_fail_that_exec_instead_of_queueing_without_credit() {
    // Empty frames take no credit: a guest could queue them without bound in the host.
    let c = fake_guest(|m, w| {
        if let Body::Exec(_) = m.body {
            for _ in 0..100_000 {
                send(w, m.id, Body::Stdout(Vec::new()));
            }
        }
    });
    let mut h = c.start_exec(ExecRequest::new(["true"])).unwrap();
    let why = loop {
        match h.next_event() {
            Ok(OutputEvent::Stdout(d)) => assert!(!d.is_empty(), "an empty frame was delivered"),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => break protocol_error(e),
        }
    };
    assert!(why.contains("empty stdout"), "{why}");
    c.hello(T).unwrap();
}

#[test]
fn frames_that_do_not_belong_to_a_request_fail_it() {
    let c = fake_guest(|m, w| match m.body {
        Body::Exec(_) => send(w, m.id, Body::ReadDone { bytes: 0 }),
        Body::Signal(_) => send(w, m.id, Body::Stdout(b"x".to_vec())),
        _ => {}
    });
    let e = c
        .exec_collect(ExecRequest::new(["true"]), None)
        .unwrap_err();
    assert!(protocol_error(e).contains("read_done"));
    let e = c.signal(1, 15).unwrap_err();
    assert!(protocol_error(e).contains("stdout"));
    c.hello(T).unwrap();
}

#[test]
fn frames_for_unknown_ids_are_ignored() {
    let c = fake_guest(|m, w| {
        if let Body::Signal(_) = m.body {
            send(w, m.id + 1000, Body::Stdout(b"stray".to_vec()));
            send(
                w,
                m.id + 1001,
                Body::Error(ErrorReply::new(ErrorCode::Io, "x")),
            );
            send(w, m.id, Body::Ok);
        }
    });
    c.signal(1, 15).unwrap();
}

#[test]
fn read_file_data_beyond_the_limit_or_the_announced_count_fails() {
    let c = fake_guest(|m, w| {
        if let Body::ReadFile(r) = m.body {
            send(w, m.id, Body::ReadStart(FileInfo { size: 1, mode: 0 }));
            send(w, m.id, Body::FileData(vec![0; 100]));
            let bytes = if r.limit == 1000 { 7 } else { 100 };
            send(w, m.id, Body::ReadDone { bytes });
        }
    });
    let e = c.read_file_to_vec(Path::new("/x"), 10).unwrap_err();
    assert!(protocol_error(e).contains("limit"));
    let e = c.read_file_to_vec(Path::new("/x"), 1000).unwrap_err();
    assert!(protocol_error(e).contains("announced 7"));
    // Data before ReadStart is not accepted either.
    let c = fake_guest(|m, w| {
        if let Body::ReadFile(_) = m.body {
            send(w, m.id, Body::FileData(vec![0; 1]));
        }
    });
    let e = c.read_file_to_vec(Path::new("/x"), 10).unwrap_err();
    assert!(protocol_error(e).contains("file_data"));
}

#[test]
fn a_bad_frame_from_the_guest_fails_only_its_request() {
    let c = fake_guest(|m, w| {
        if let Body::Shutdown = m.body {
            // An oversized frame for this request, then garbage kind.
            let mut f = vec![PROTOCOL_VERSION, 0x82, 0, 0];
            f.extend_from_slice(&m.id.to_le_bytes());
            f.extend_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
            w.write_all(&f).unwrap();
            w.write_all(&vec![0; MAX_PAYLOAD as usize + 1]).unwrap();
        }
    });
    let e = c.shutdown().unwrap_err();
    assert!(protocol_error(e).contains("exceeds the limit"));
    c.hello(T).unwrap();
}

#[test]
fn a_silent_guest_times_out_and_a_closed_one_fails_everything() {
    let c = fake_guest(|_, _| {});
    let req = ReseedRequest {
        entropy: vec![0; 32],
        nonce: [1; 16],
        time: WallTime::now(),
    };
    assert!(matches!(
        c.reseed(req, Duration::from_millis(100)),
        Err(ClientError::Timeout(_))
    ));

    let c = fake_guest(|m, w| {
        if let Body::Exec(_) = m.body {
            send(w, m.id, Body::Stdout(b"partial".to_vec()));
            w.shutdown(std::net::Shutdown::Both).unwrap();
        }
    });
    let e = c
        .exec_collect(ExecRequest::new(["true"]), None)
        .unwrap_err();
    assert!(matches!(e, ClientError::Closed), "{e:?}");
    assert!(matches!(c.hello(T), Err(ClientError::Closed)));
}

#[test]
fn a_timed_exec_ends_on_the_host_when_the_guest_stops_answering() {
    // The guest takes the exec, prints once, then never reports its end (and ignores
    // the kill): the host gives up at the exec's timeout plus the grace, and sends the
    // kill, instead of waiting forever.
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let c = fake_guest(move |m, w| match m.body {
        Body::Exec(_) => send(w, m.id, Body::Stdout(b"started".to_vec())),
        Body::Signal(s) => {
            let _ = seen_tx.send(s.signal);
        }
        _ => {}
    })
    .with_exec_grace(Duration::from_millis(200));
    let mut req = ExecRequest::new(["sleep", "1000"]);
    req.timeout_ms = Some(100);
    let e = c.exec_collect(req, None).unwrap_err();
    assert!(
        matches!(e, ClientError::Timeout(d) if d == Duration::from_millis(300)),
        "{e:?}"
    );
    assert_eq!(seen_rx.recv_timeout(T), Ok(libc::SIGKILL));
    // The connection goes on.
    c.hello(T).unwrap();
}
