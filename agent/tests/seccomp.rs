//! The worker's seccomp filters, on real processes: each thread kind's filter lets a
//! running fork work and turns a call outside it into the end of that worker alone, with
//! the thread and the call named and an exit status the parent reports.
//!
//! One test per file: `CLEAVE_TEST_FORBIDDEN_SYSCALL` (honoured by debug builds of the
//! worker) is set in this process's environment while one worker is spawned.

mod tiny_template;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use cleave_agent::fork::worker::{describe_end, Encoded, Worker};
use cleave_agent::vmm::seccomp::{self, Filters, ThreadKind, VIOLATION_EXIT};

fn running(w: &mut Worker) -> bool {
    let Ok(before) = w.probe() else { return false };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match w.probe() {
            Ok(now) if now.io_out > before.io_out => return true,
            Ok(_) => std::thread::sleep(Duration::from_millis(1)),
            Err(_) => return false,
        }
    }
    false
}

/// In a forked child: stderr to a pipe, the handler, `kind`'s filter, then `call`. Returns
/// the child's exit status and what it wrote.
fn in_confined_child(filters: &Filters, kind: ThreadKind, call: fn() -> i64) -> (i32, String) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-int array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    seccomp::install_violation_handler().unwrap();
    // SAFETY: the child only makes system calls (dup2, prctl, seccomp, the call, _exit)
    // and touches memory it owns; it never returns into the test harness.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: see above; `w` is open in the child.
        unsafe {
            libc::dup2(w.as_raw_fd(), 2);
            if filters.apply(kind).is_err() {
                libc::_exit(2);
            }
            let rc = call();
            libc::_exit(if rc >= 0 { 0 } else { 3 });
        }
    }
    drop(w);
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let out = std::io::read_to_string(std::fs::File::from(r)).unwrap();
    (libc::WEXITSTATUS(status), out)
}

#[test]
fn a_forbidden_call_ends_only_the_worker_that_made_it() {
    // Each filter on its own: an allowed call goes through, a forbidden one ends the
    // process with the thread and the call named.
    let filters = Filters::build().unwrap();
    for kind in ThreadKind::ALL {
        let (code, out) = in_confined_child(&filters, kind, || {
            let mut b = [0u8; 8];
            // SAFETY: getrandom into a local buffer (allowed everywhere).
            unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) as i64 }
        });
        assert_eq!((code, out.as_str()), (0, ""), "{kind:?}: getrandom");
        let (code, out) = in_confined_child(&filters, kind, || {
            // SAFETY: plain syscall with integers.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as i64 }
        });
        assert_eq!(code, VIOLATION_EXIT, "{kind:?}: socket(AF_INET): {out}");
        assert!(
            out.contains(&format!(
                "the {} thread called system call {}",
                kind.name(),
                libc::SYS_socket
            )),
            "{kind:?}: {out}"
        );
    }
    // The event loop's socket rule checks the family: a Unix socket is allowed.
    let (code, _) = in_confined_child(&filters, ThreadKind::Events, || {
        // SAFETY: plain syscall with integers.
        unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) as i64 }
    });
    assert_eq!(code, 0, "events: socket(AF_UNIX)");
    // Only the vCPU's own ioctl.
    let (code, _) = in_confined_child(&filters, ThreadKind::Vcpu, || {
        // SAFETY: an ioctl on stdin with an integer argument.
        unsafe { libc::ioctl(0, libc::FIONBIO, 0) as i64 }
    });
    assert_eq!(code, VIOLATION_EXIT, "vcpu: ioctl(FIONBIO)");

    // Real workers: for each thread kind, one worker whose thread of that kind makes a
    // forbidden call as the fork starts, beside one that does not.
    let template = tiny_template::capture();
    let encoded = Encoded::new(&template).unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_cleave-fork-worker"));
    let mut healthy = Worker::spawn(exe).unwrap();
    healthy.load(&encoded).unwrap();
    healthy.go(None).unwrap();
    // The tiny guest has no virtio devices, so no event loop thread: vCPU and control.
    for kind in [ThreadKind::Vcpu, ThreadKind::Control] {
        std::env::set_var("CLEAVE_TEST_FORBIDDEN_SYSCALL", kind.name());
        let spawned = Worker::spawn(exe);
        std::env::remove_var("CLEAVE_TEST_FORBIDDEN_SYSCALL");
        let mut faulty = spawned.unwrap();
        // Its vCPU thread confines itself while the worker prepares (parked for `go`), its
        // control thread once it has answered `go`: it dies during one or the other, or
        // just after; either way it stops running.
        let _ = faulty
            .load(&encoded)
            .and_then(|()| faulty.go(None).map(drop));
        assert!(
            !running(&mut faulty),
            "{kind:?}: the faulty fork still runs"
        );
        let status = faulty.destroy().unwrap();
        assert_eq!(status.code(), Some(VIOLATION_EXIT), "{kind:?}: {status}");
        assert!(describe_end(&status).unwrap().contains("seccomp"));
        assert!(running(&mut healthy), "the other fork was affected");
    }
    // The healthy worker runs under its filters too, and ends cleanly.
    let pid = healthy.pid();
    let status: String = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    for t in threads.flatten() {
        let st = std::fs::read_to_string(t.path().join("status")).unwrap();
        assert!(
            st.lines().any(|l| l == "Seccomp:\t2"),
            "thread {:?}",
            t.path()
        );
    }
    let status = healthy.destroy().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(describe_end(&status), None);
}
