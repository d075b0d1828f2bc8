//! Template creation in a worker of its own: `cleave-fork-worker --template` boots the
//! image, runs the warm-up, quiesces and captures, in its own process and — under a node
//! jail — as a uid of its own, in the jail's namespaces and cgroup leaf, under the worker
//! process seccomp filter. The template guest runs whatever its warm-up runs, so a VMM
//! escape there must land where an escape from a fork lands, never in the node.
//!
//! The node does everything that needs trust before the worker starts: it reads and
//! checks the image's pins and hands over the verified bytes in sealed memfds (the worker
//! never opens an image file, so a file changed after the check cannot reach the guest).
//! The worker makes its guest memory and runtime directory, jails itself, boots, and
//! sends back the captured state with the guest memory's memfd, which it sealed. The node
//! trusts nothing in that answer: the state is validated as any template read from disk
//! is, the memfd is mapped only if it carries every template seal and has the state's
//! size, and the machine must be the one asked for.
//!
//! Protocol (one packet each, as [`super::worker`]): node → worker `boot` (body:
//! [`BootRequest`]; fds: kernel, initramfs), answered by `frozen` (body: [`FrozenReport`];
//! fd: the sealed guest memory) or `failed`. The worker exits after answering.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::memfd::{memfd_create, MFdFlags};
use serde::{Deserialize, Serialize};

use super::freeze::{freeze, FreezeOptions, Frozen, WarmupOutput, WARMUP_TIMEOUT};
use super::jail::{self, Jail, JailIds};
use super::process::set_comm;
use super::sealed::{template_seals, SealedMemory};
use super::state::MachineState;
use super::worker::{
    claim, describe_end, expect, readable_within, send, tell_failure, Kind, Worker, WorkerError,
};
use super::Template;
use crate::image::VerifiedImage;
use crate::vmm::agent_vm::{AgentVm, BootSpec, Prepared};
use crate::vmm::config::MachineConfig;
use crate::vmm::memory::GuestRam;
use crate::vmm::runtime_dir::{RuntimeDir, VSOCK_SOCKET};
use crate::vmm::seccomp;
use crate::vmm::{self};

/// The worker binary's flag that makes it boot a template.
pub const TEMPLATE_FLAG: &str = "--template";

/// A template worker's process name (`comm`).
pub const TEMPLATE_COMM: &str = "cleave-template";

/// How much of each warm-up output stream comes back to the node (the rest is counted).
pub const WARMUP_OUTPUT_KEPT: usize = 256 << 10;

/// What the node asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BootRequest {
    mem_mib: u64,
    vcpus: u8,
    /// The whole guest command line (with the template flag).
    cmdline: String,
    warmup: Option<Vec<std::ffi::OsString>>,
    boot_timeout_ms: u64,
}

/// What the worker answers: the captured machine, what it took, the warm-up's output
/// (hex, each stream cut at [`WARMUP_OUTPUT_KEPT`] with a note of what was dropped).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FrozenReport {
    state: MachineState,
    boot_us: u64,
    capture_us: u64,
    warmup: Option<(String, String)>,
}

/// Boots, warms up and captures a template in a `cleave-fork-worker --template` (`exe`),
/// jailed with `jail` when there is one, from `image` (already verified) as `opts` says.
pub fn create(
    exe: &Path,
    jail: Option<&Jail>,
    image: &VerifiedImage,
    opts: &FreezeOptions,
) -> Result<Frozen, WorkerError> {
    let kernel = sealed_copy(c"cleave-kernel", &image.kernel)?;
    let initrd = sealed_copy(c"cleave-initrd", &image.initrd)?;
    // Its leaf holds the guest and the worker's copy of the image on top of the usual.
    let image_bytes = (image.kernel.len() + image.initrd.len()) as u64;
    let claimed = claim(jail, opts.machine.mem.bytes().saturating_add(image_bytes))?;
    let (lease, leaf) = match claimed {
        Some((lease, leaf)) => (Some(lease), leaf),
        None => (None, None),
    };
    // From here, dropping `worker` ends the process and frees its directory, leaf and uid.
    let worker = Worker::spawn_in(exe, &[TEMPLATE_FLAG], lease, leaf)?;
    let req = BootRequest {
        mem_mib: opts.machine.mem.mib(),
        vcpus: opts.machine.vcpus.get(),
        cmdline: opts.guest_cmdline(),
        warmup: opts.warmup.clone(),
        boot_timeout_ms: u64::try_from(opts.boot_timeout.as_millis()).unwrap_or(u64::MAX),
    };
    let body = serde_json::to_vec(&req).map_err(WorkerError::Encode)?;
    let sock = worker.sock()?;
    send(
        sock,
        Kind::Boot,
        &body,
        &[kernel.as_fd(), initrd.as_fd()],
        "the boot request",
    )?;
    drop((kernel, initrd));
    let within = answer_deadline(opts.boot_timeout);
    if !readable_within(sock, within)? {
        return Err(WorkerError::Deadline {
            what: "the captured template",
            after: within,
        });
    }
    match receive_frozen(sock, opts.machine) {
        Ok(frozen) => {
            // It has answered and exits on its own; this reaps it and frees what it held.
            worker.destroy()?;
            Ok(frozen)
        }
        // Gone without a word (killed, or a crash): say how it ended.
        Err(WorkerError::Closed(_)) => {
            let status = worker.destroy()?;
            Err(WorkerError::Ended {
                what: "the template worker",
                how: describe_end(&status).unwrap_or_else(|| "exited 0".into()),
            })
        }
        Err(e) => Err(e),
    }
}

/// How long the node waits for the worker's answer: booting, the reseed before a warm-up
/// and quiescing each have `boot_timeout`, the warm-up [`WARMUP_TIMEOUT`]; a minute more
/// covers the exec's grace, settling and capture.
fn answer_deadline(boot_timeout: Duration) -> Duration {
    boot_timeout
        .saturating_mul(3)
        .saturating_add(WARMUP_TIMEOUT)
        .saturating_add(Duration::from_secs(60))
}

/// A memfd holding `bytes`, sealed against any change.
fn sealed_copy(name: &std::ffi::CStr, bytes: &[u8]) -> Result<OwnedFd, WorkerError> {
    let io = |e: std::io::Error| WorkerError::Image(format!("copying the image into a memfd: {e}"));
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .map_err(|e| io(e.into()))?;
    let mut file = File::from(fd);
    file.write_all(bytes).map_err(io)?;
    fcntl(&file, FcntlArg::F_ADD_SEALS(template_seals())).map_err(|e| io(e.into()))?;
    Ok(OwnedFd::from(file))
}

/// Reads the worker's `frozen` answer and checks it as untrusted input.
fn receive_frozen(sock: &OwnedFd, asked: MachineConfig) -> Result<Frozen, WorkerError> {
    let msg = expect(sock, Kind::Frozen, "the captured template")?;
    let [memfd]: [OwnedFd; 1] = msg.fds.try_into().map_err(|fds: Vec<OwnedFd>| {
        answer_error(format!("{} fds, expected the memfd", fds.len()))
    })?;
    let answer = decode_answer(&msg.body, asked)?;
    let memory = SealedMemory::from_sealed(
        Arc::new(File::from(memfd)),
        answer.state.machine.mem.bytes(),
    )?;
    Ok(Frozen {
        template: Template::new(memory, answer.state),
        warmup: answer.warmup,
        boot: answer.boot,
        capture: answer.capture,
    })
}

/// The body of a template worker's `frozen` answer, checked.
#[derive(Debug)]
pub struct Answer {
    pub state: MachineState,
    pub warmup: Option<WarmupOutput>,
    pub boot: Duration,
    pub capture: Duration,
}

/// Decodes and checks the body of a `frozen` answer for a machine of shape `asked`: the
/// state validated as a stored template's is, its vCPUs' timers on TSC-deadline, the
/// machine the one asked for, the warm-up output hex. A worker a guest escaped into can
/// send anything here (fuzzed: `tests/fuzz` target `template_state`).
pub fn decode_answer(body: &[u8], asked: MachineConfig) -> Result<Answer, WorkerError> {
    let report: FrozenReport =
        serde_json::from_slice(body).map_err(|e| answer_error(e.to_string()))?;
    report.state.validate().map_err(WorkerError::BadState)?;
    // The worker refuses such a template itself; a worker a guest escaped into may not.
    if let Some(why) = report.state.pit_clock_reason() {
        return Err(WorkerError::Freeze(super::freeze::FreezeError::PitClock(
            why,
        )));
    }
    if report.state.machine != asked {
        return Err(answer_error(format!(
            "a {:?} machine, not the {asked:?} asked for",
            report.state.machine
        )));
    }
    let unhex = |text: String, stream: &str| {
        hex::decode(text).map_err(|e| answer_error(format!("warm-up {stream}: {e}")))
    };
    let warmup = match report.warmup {
        Some((out, err)) => Some(WarmupOutput {
            stdout: unhex(out, "stdout")?,
            stderr: unhex(err, "stderr")?,
        }),
        None => None,
    };
    Ok(Answer {
        state: report.state,
        warmup,
        boot: Duration::from_micros(report.boot_us),
        capture: Duration::from_micros(report.capture_us),
    })
}

fn answer_error(why: String) -> WorkerError {
    WorkerError::Protocol {
        what: "the captured template",
        why,
    }
}

/// The worker's side, run by `cleave-fork-worker --template [--jail UID:GID]` with the
/// node's socket as `sock`.
pub fn serve(sock: OwnedFd, jail: Option<JailIds>) -> Result<(), WorkerError> {
    let result = set_comm(TEMPLATE_COMM).and_then(|()| boot_and_capture(&sock, jail));
    tell_failure(&sock, &result);
    result
}

fn boot_and_capture(sock: &OwnedFd, jail: Option<JailIds>) -> Result<(), WorkerError> {
    let msg = expect(sock, Kind::Boot, "the boot request")?;
    let protocol = |why: String| WorkerError::Protocol {
        what: "the boot request",
        why,
    };
    let [kernel, initrd]: [OwnedFd; 2] = msg.fds.try_into().map_err(|fds: Vec<OwnedFd>| {
        protocol(format!(
            "{} fds, expected the kernel and initramfs",
            fds.len()
        ))
    })?;
    let req: BootRequest =
        serde_json::from_slice(&msg.body).map_err(|e| protocol(e.to_string()))?;
    let machine = MachineConfig::new(req.mem_mib, u64::from(req.vcpus))
        .map_err(|e| protocol(e.to_string()))?;
    let kernel = read_all(kernel, "kernel")?;
    let initrd = read_all(initrd, "initramfs")?;
    // Everything that needs the node's filesystem or sizes a file comes before the jail.
    let kvm = vmm::open_kvm()?;
    let ram = GuestRam::create(machine.mem).map_err(vmm::VmmError::from)?;
    let mut dir = RuntimeDir::create()?;
    let vsock_path = match jail {
        Some(ids) => {
            std::os::unix::fs::chown(dir.path(), Some(ids.uid), Some(ids.gid))
                .map_err(WorkerError::Jail)?;
            jail::enter(ids, dir.path())
                .map_err(|e| WorkerError::Jail(std::io::Error::other(e)))?;
            // The node removes it after reaping us; from inside it is `/`.
            dir.disown();
            PathBuf::from("/").join(VSOCK_SOCKET)
        }
        None => dir.vsock_path(),
    };
    // A template nobody waits for is not worth finishing (the jail's uid switch cleared
    // any earlier setting).
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| WorkerError::Jail(e.into()))?;
    // A node gone before that would not have signalled us; the node sends nothing after
    // the request, so anything to read now is its end of the socket closing.
    if readable_within(sock, Duration::ZERO)? {
        return Err(WorkerError::Closed(
            "the node, which went away before the boot",
        ));
    }
    seccomp::install_violation_handler().map_err(WorkerError::Seccomp)?;
    // Still single-threaded: every thread the boot starts runs under it, and the vCPUs
    // and the event loop, which handle the guest's bytes, under their own on top. This
    // thread keeps the process filter only: it captures the VM and seals its memory.
    seccomp::ProcessFilter::build()?.apply()?;
    let filters = Arc::new(seccomp::Filters::build()?);

    let timeout = Duration::from_millis(req.boot_timeout_ms);
    let spec = BootSpec {
        machine,
        kernel: &kernel,
        initrd: &initrd,
        cmdline: &req.cmdline,
        timeout,
    };
    let prepared = Prepared {
        ram: Some(ram),
        dir,
        vsock_path,
        filters: Some(filters),
    };
    let vm = AgentVm::boot_on(
        &kvm,
        &spec,
        prepared,
        // Templates always carry the NIC, unplugged: each fork gets its own tap.
        crate::devices::virtio::net::NetBackend::Disconnected,
    )
    .map_err(|e| WorkerError::Freeze(e.into()))?;
    drop((kernel, initrd));
    let opts = FreezeOptions {
        machine,
        // The request's command line is the whole one already.
        cmdline: String::new(),
        warmup: req.warmup,
        boot_timeout: timeout,
    };
    let t = Instant::now();
    let frozen = freeze(&kvm, vm, &opts).map_err(WorkerError::Freeze)?;
    tracing::debug!(ms = t.elapsed().as_millis() as u64, "template frozen");
    let report = FrozenReport {
        state: frozen.template.state().clone(),
        boot_us: micros(frozen.boot),
        capture_us: micros(frozen.capture),
        warmup: frozen.warmup.map(|w| {
            (
                hex::encode(kept(w.stdout, "stdout")),
                hex::encode(kept(w.stderr, "stderr")),
            )
        }),
    };
    let body = serde_json::to_vec(&report).map_err(WorkerError::Encode)?;
    send(
        sock,
        Kind::Frozen,
        &body,
        &[frozen.template.memory().file().as_fd()],
        "the captured template",
    )
}

/// The first [`WARMUP_OUTPUT_KEPT`] bytes of a warm-up stream, and a note of the rest.
fn kept(mut bytes: Vec<u8>, stream: &str) -> Vec<u8> {
    if bytes.len() > WARMUP_OUTPUT_KEPT {
        let dropped = bytes.len() - WARMUP_OUTPUT_KEPT;
        bytes.truncate(WARMUP_OUTPUT_KEPT);
        bytes.extend_from_slice(
            format!("\n[cleave: {dropped} more bytes of the warm-up's {stream} not kept]\n")
                .as_bytes(),
        );
    }
    bytes
}

/// The whole of a memfd, from its start (the node's writes left the shared file offset
/// at its end).
fn read_all(fd: OwnedFd, what: &str) -> Result<Vec<u8>, WorkerError> {
    use std::os::unix::fs::FileExt;
    let err = |e: std::io::Error| WorkerError::Image(format!("reading the {what} memfd: {e}"));
    let file = File::from(fd);
    let len = file.metadata().map_err(err)?.len();
    let mut bytes = vec![0u8; usize::try_from(len).map_err(|e| err(std::io::Error::other(e)))?];
    file.read_exact_at(&mut bytes, 0).map_err(err)?;
    Ok(bytes)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::tiny;

    fn pair() -> (OwnedFd, OwnedFd) {
        crate::fork::worker::seqpacket_pair().unwrap()
    }

    /// A real captured machine: the tiny guest, run for a moment.
    fn tiny_template() -> Template {
        let kvm = vmm::open_kvm().expect("this test needs /dev/kvm");
        let machine = MachineConfig::new(32, 1).unwrap();
        let vm = tiny::vm(&kvm, machine, tiny::Ending::Count).unwrap();
        let running = vm.start().unwrap();
        std::thread::sleep(Duration::from_millis(10));
        let (_, vm) = running.stop_and_keep();
        super::super::capture(&kvm, vm).unwrap()
    }

    /// `t`'s state as a Linux template's would be: its vCPUs' LAPIC timers in
    /// TSC-deadline mode (the tiny guest never arms its own).
    fn ticking_on_tsc_deadline(t: &Template) -> MachineState {
        let mut state = t.state().clone();
        for v in &mut state.vcpus {
            let lvtt = 0x0005_00ecu32.to_le_bytes().map(|b| b as _);
            v.lapic.regs[crate::fork::state::APIC_LVTT..][..4].copy_from_slice(&lvtt);
        }
        state
    }

    /// Sends `state` with `fds` as a worker's `frozen` answer and checks it as the node.
    fn answer(
        state: &MachineState,
        warmup: Option<(String, String)>,
        fds: &[std::os::fd::BorrowedFd<'_>],
        asked: MachineConfig,
    ) -> Result<Frozen, WorkerError> {
        let (node, worker) = pair();
        let report = FrozenReport {
            state: state.clone(),
            boot_us: 1,
            capture_us: 2,
            warmup,
        };
        let body = serde_json::to_vec(&report).unwrap();
        send(&worker, Kind::Frozen, &body, fds, "test").unwrap();
        receive_frozen(&node, asked)
    }

    #[test]
    fn the_node_takes_a_captured_template_only_sealed_whole_and_of_the_shape_asked() {
        let t = tiny_template();
        let asked = t.state().machine;
        let sealed = t.memory().file().as_fd();
        // A guest that would tick on the PIT in its forks (the worker should have refused).
        let e = answer(t.state(), None, &[sealed], asked).unwrap_err();
        assert!(e.to_string().contains("TSC-deadline"), "{e}");
        let state = ticking_on_tsc_deadline(&t);
        let out = Some((hex::encode("warm"), hex::encode("")));
        let got = answer(&state, out, &[sealed], asked).unwrap();
        assert_eq!(got.template.state().machine, asked);
        assert_eq!(got.warmup.unwrap().stdout, b"warm");
        assert_eq!(got.capture, Duration::from_micros(2));

        // A worker that kept its memory writable (or never sealed it) is refused.
        let unsealed = GuestRam::create(asked.mem).unwrap();
        let e = answer(&state, None, &[unsealed.file().as_fd()], asked).unwrap_err();
        assert!(e.to_string().contains("not sealed"), "{e}");
        // Memory of another size than its state says.
        let small = sealed_copy(c"small", b"tiny").unwrap();
        let e = answer(&state, None, &[small.as_fd()], asked).unwrap_err();
        assert!(e.to_string().contains("bytes, expected"), "{e}");
        // Another machine than the one asked for.
        let other = MachineConfig::new(64, 1).unwrap();
        let e = answer(&state, None, &[sealed], other).unwrap_err();
        assert!(e.to_string().contains("not the"), "{e}");
        // A state that does not hold together (a vCPU missing).
        let mut broken = state.clone();
        broken.vcpus.clear();
        let e = answer(&broken, None, &[sealed], asked).unwrap_err();
        assert!(matches!(e, WorkerError::BadState(_)), "{e}");
        // No memory at all; output that is not hex.
        let e = answer(&state, None, &[], asked).unwrap_err();
        assert!(e.to_string().contains("0 fds, expected the memfd"), "{e}");
        let bad = Some(("zz".to_string(), String::new()));
        let e = answer(&state, bad, &[sealed], asked).unwrap_err();
        assert!(e.to_string().contains("warm-up stdout"), "{e}");
    }

    /// Runs the worker's side on `request` (with `fds`) and returns what it answered.
    fn worker_answer(request: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) -> String {
        let (node, worker) = pair();
        send(&node, Kind::Boot, request, fds, "test").unwrap();
        let served = serve(worker, None);
        assert!(served.is_err());
        match expect(&node, Kind::Frozen, "test") {
            Err(WorkerError::Remote(text)) => text,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn a_bad_boot_request_is_refused_before_anything_is_built() {
        let image = sealed_copy(c"k", b"k").unwrap();
        let fds = [image.as_fd(), image.as_fd()];
        let req = |mem_mib: u64| {
            serde_json::to_vec(&BootRequest {
                mem_mib,
                vcpus: 1,
                cmdline: "console=ttyS0".into(),
                warmup: None,
                boot_timeout_ms: 1000,
            })
            .unwrap()
        };
        let text = worker_answer(&req(0), &fds);
        assert!(text.contains("memory size 0 MiB is out of range"), "{text}");
        let text = worker_answer(&req(128), &fds[..1]);
        assert!(
            text.contains("1 fds, expected the kernel and initramfs"),
            "{text}"
        );
        let text = worker_answer(b"{", &fds);
        assert!(text.contains("malformed message"), "{text}");
    }

    #[test]
    fn the_fuzz_seed_answer_is_one_the_node_takes() {
        let seed =
            include_bytes!("../../../tests/fuzz/seeds/template_state/answer-tiny-2vcpu.json");
        let asked = MachineConfig::new(32, 2).unwrap();
        let answer = decode_answer(seed, asked).unwrap();
        assert_eq!(answer.warmup.unwrap().stdout, b"warm\n");
        let other = MachineConfig::new(32, 1).unwrap();
        assert!(decode_answer(seed, other).is_err());
    }

    #[test]
    fn warmup_output_past_the_limit_is_cut_with_a_note() {
        assert_eq!(kept(b"hi".to_vec(), "stdout"), b"hi");
        let long = vec![b'x'; WARMUP_OUTPUT_KEPT + 10];
        let k = String::from_utf8(kept(long, "stderr")).unwrap();
        assert!(k.starts_with(&"x".repeat(WARMUP_OUTPUT_KEPT)));
        assert!(
            k.ends_with("[cleave: 10 more bytes of the warm-up's stderr not kept]\n"),
            "{k}"
        );
    }

    #[test]
    fn the_node_waits_for_boot_warmup_and_capture_but_not_forever() {
        let d = answer_deadline(Duration::from_secs(120));
        assert_eq!(d, Duration::from_secs(360 + 600 + 60));
        assert!(answer_deadline(Duration::MAX) == Duration::MAX);
    }

    #[test]
    fn an_image_copy_is_sealed_and_whole() {
        let fd = sealed_copy(c"test", b"kernel bytes").unwrap();
        let seals = fcntl(&fd, FcntlArg::F_GET_SEALS).unwrap();
        assert_eq!(seals, template_seals().bits());
        assert_eq!(read_all(fd, "kernel").unwrap(), b"kernel bytes");
    }
}
