//! Runs one rig QEMU: streams its console through the relay, enforces the
//! timeout, and makes sure QEMU is gone however the run ends.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::error::RigError;
use super::relay::{Event, Relay};
use super::RigOutcome;

/// Keep this much of QEMU's stderr for error messages.
const STDERR_KEEP: usize = 16 * 1024;

/// Kills and reaps QEMU when dropped, unless it already exited.
struct QemuGuard(Child);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

enum Chunk {
    Data(Vec<u8>),
    End,
    Failed(std::io::Error),
}

pub fn run(
    qemu: &Path,
    args: &[OsString],
    mut relay: Relay,
    timeout: Duration,
    out: &mut dyn Write,
) -> Result<RigOutcome, RigError> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut command = Command::new(qemu);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // If this process dies without running its cleanup (SIGKILL), QEMU must
    // not live on: the kernel kills it when the spawning thread goes away.
    // SAFETY: runs in the forked child before exec; prctl is async-signal-safe
    // and touches no memory of ours.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(RigError::Spawn)?;
    let mut qemu_proc = QemuGuard(child);
    tracing::debug!(pid = qemu_proc.0.id(), "rig qemu started");

    let stdout = qemu_proc.0.stdout.take().expect("stdout is piped");
    let stderr = qemu_proc.0.stderr.take().expect("stderr is piped");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || pump(stdout, tx));
    let stderr_reader = std::thread::spawn(move || keep_tail(stderr));

    let mut boot: Option<Duration> = None;
    let outcome = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = match rx.recv_timeout(left) {
            Ok(chunk) => chunk,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                break Err(RigError::TimedOut { after: timeout })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Chunk::End,
        };
        match chunk {
            Chunk::Data(data) => match relay.feed(&data, out) {
                Err(e) => break Err(RigError::Relay(e)),
                Ok(events) => {
                    if let Some(result) = handle(events, started, &mut boot) {
                        break result;
                    }
                }
            },
            Chunk::Failed(e) => break Err(RigError::Relay(e)),
            Chunk::End => {
                let _ = out.write_all(&relay.take_unfinished());
                let _ = out.flush();
                let status = qemu_proc
                    .0
                    .wait()
                    .map_or_else(|e| e.to_string(), |s| s.to_string());
                let stderr = finish_stderr(stderr_reader);
                break Err(RigError::NoExitStatus {
                    qemu_status: status,
                    stderr,
                });
            }
        }
    };
    // The command is over (or failed): nothing in the rig needs a clean
    // shutdown (the share is read-only), so stop QEMU now.
    drop(qemu_proc);
    let _ = reader.join();
    if let Ok(outcome) = &outcome {
        tracing::info!(
            exit_code = outcome.exit_code,
            boot_ms = outcome.boot_ms,
            total_ms = started.elapsed().as_millis() as u64,
            "rig command finished"
        );
    }
    outcome
}

/// Turns relay events into the run's result, once there is one.
fn handle(
    events: Vec<Event>,
    started: Instant,
    boot: &mut Option<Duration>,
) -> Option<Result<RigOutcome, RigError>> {
    for event in events {
        match event {
            Event::Started => {
                let took = started.elapsed();
                tracing::info!(
                    boot_ms = took.as_millis() as u64,
                    "rig booted; command starting"
                );
                *boot = Some(took);
            }
            Event::Exited(status) => {
                let Some(boot) = *boot else {
                    return Some(Err(RigError::SetupFailed { status }));
                };
                return Some(Ok(RigOutcome {
                    exit_code: status,
                    boot_ms: boot.as_millis() as u64,
                }));
            }
        }
    }
    None
}

fn pump(mut stdout: impl Read, tx: mpsc::Sender<Chunk>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let msg = match stdout.read(&mut buf) {
            Ok(0) => Chunk::End,
            Ok(n) => Chunk::Data(buf[..n].to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => Chunk::Failed(e),
        };
        let last = !matches!(msg, Chunk::Data(_));
        if tx.send(msg).is_err() || last {
            return;
        }
    }
}

fn keep_tail(mut stderr: impl Read) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stderr.read(&mut buf) {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * STDERR_KEEP {
            kept.drain(..kept.len() - STDERR_KEEP);
        }
    }
    kept
}

/// QEMU's stderr without the TCG "feature not supported" warnings that every
/// run prints (the EPYC model names features TCG does not emulate).
fn finish_stderr(reader: JoinHandle<Vec<u8>>) -> String {
    let bytes = reader.join().unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("TCG doesn't support requested feature"))
        .collect();
    if lines.is_empty() {
        "nothing".into()
    } else {
        lines.join("\n")
    }
}
