//! Making a template from an image: boot it with the gate closed (`cleave.template=1`),
//! wait for the agent, optionally run a warm-up command, quiesce, stop and capture.
//!
//! Quiesce is what makes the template safe to clone: the agent closes its gate again (so
//! every fork must pass its own reseed) and confirms that no process but itself runs, so
//! no userspace RNG state of a running process is cloned into the forks. Then the host
//! closes its connection and waits for the guest to close its side, so the template holds
//! no half-open connection; only the agent remains, blocked in `accept` on vsock.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use cleave_guest::boot::FLAG_TEMPLATE;
use cleave_guest::protocol::{ClientError, ExecRequest, ExitStatus};
use kvm_ioctls::Kvm;

use super::capture::{capture, CaptureError};
use super::gate::{self, GateError};
use super::Template;
use crate::vmm::agent_vm::{AgentVm, AgentVmError};
use crate::vmm::config::MachineConfig;

/// How long the guest gets to close the host's last connection before capture.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("template: {0}")]
    Boot(#[from] AgentVmError),
    #[error("template: reseeding before the warm-up: {0}")]
    Gate(#[from] GateError),
    #[error("template: running the warm-up command: {0}")]
    Warmup(ClientError),
    #[error(
        "template: the warm-up command failed ({status:?}{}); stderr: {stderr}",
        timed_out_note(*timed_out)
    )]
    WarmupFailed {
        status: ExitStatus,
        timed_out: bool,
        stderr: String,
    },
    #[error("template: quiescing the guest: {0}")]
    Quiesce(ClientError),
    #[error("template: the guest ended before it was captured: {0}")]
    Ended(crate::devices::GuestEnd),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("template: {0}")]
    PitClock(String),
}

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct FreezeOptions {
    pub machine: MachineConfig,
    /// The kernel command line; [`FLAG_TEMPLATE`] is added.
    pub cmdline: String,
    /// Run in the template before capture (after a reseed), e.g. to warm caches.
    pub warmup: Option<Vec<OsString>>,
    pub boot_timeout: Duration,
}

impl FreezeOptions {
    /// The command line the template guest boots with.
    pub fn guest_cmdline(&self) -> String {
        format!("{} {FLAG_TEMPLATE}=1", self.cmdline)
    }
}

/// How long a warm-up command may run before it is killed and the template refused.
pub const WARMUP_TIMEOUT: Duration = Duration::from_secs(600);

/// What a warm-up command printed (each stream as bounded by the protocol client).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WarmupOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A captured template and what it took.
#[derive(Debug)]
pub struct Frozen {
    pub template: Template,
    /// The warm-up's output, if there was one (it exited 0).
    pub warmup: Option<WarmupOutput>,
    /// Start → agent ready.
    pub boot: Duration,
    /// Quiesce, stop and capture (with sealing).
    pub capture: Duration,
}

/// Runs the warm-up in `vm` (booted with [`FreezeOptions::guest_cmdline`]), quiesces,
/// stops and captures it.
pub fn freeze(kvm: &Kvm, vm: AgentVm, opts: &FreezeOptions) -> Result<Frozen, FreezeError> {
    let boot = vm.ready_after();
    let warmup = match &opts.warmup {
        Some(argv) => {
            gate::reseed(vm.client(), opts.boot_timeout)?;
            let mut req = ExecRequest::new(argv.iter().cloned());
            req.timeout_ms = Some(WARMUP_TIMEOUT.as_millis() as u64);
            let (x, stdout, stderr) = vm
                .client()
                .exec_collect(req, None)
                .map_err(FreezeError::Warmup)?;
            if x.status != ExitStatus::Code(0) {
                return Err(FreezeError::WarmupFailed {
                    status: x.status,
                    timed_out: x.timed_out,
                    stderr: tail(&stderr, WARMUP_STDERR_SHOWN),
                });
            }
            Some(WarmupOutput { stdout, stderr })
        }
        None => None,
    };
    let t = Instant::now();
    vm.client()
        .quiesce(opts.boot_timeout)
        .map_err(FreezeError::Quiesce)?;
    let (end, stopped) = vm.stop_quiet(SETTLE);
    if end != crate::devices::GuestEnd::Stopped {
        return Err(FreezeError::Ended(end));
    }
    let template = capture(kvm, stopped)?;
    if let Some(why) = template.state().pit_clock_reason() {
        return Err(FreezeError::PitClock(why));
    }
    Ok(Frozen {
        template,
        warmup,
        boot,
        capture: t.elapsed(),
    })
}

fn timed_out_note(timed_out: bool) -> String {
    if timed_out {
        format!(", killed after its {} s limit", WARMUP_TIMEOUT.as_secs())
    } else {
        String::new()
    }
}

/// How much of a failed warm-up's stderr its error quotes (the end, where the reason
/// usually is).
const WARMUP_STDERR_SHOWN: usize = 2048;

/// The last `max` bytes of `bytes` as text, marked when cut.
fn tail(bytes: &[u8], max: usize) -> String {
    let cut = bytes.len().saturating_sub(max);
    let text = String::from_utf8_lossy(&bytes[cut..]);
    if cut == 0 {
        text.into_owned()
    } else {
        format!("[{cut} earlier bytes not shown]{text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_warmups_stderr_is_quoted_from_its_end() {
        assert_eq!(tail(b"short", 10), "short");
        let long = [b'a'; 100]
            .iter()
            .chain(b"the reason")
            .copied()
            .collect::<Vec<_>>();
        assert_eq!(tail(&long, 10), "[100 earlier bytes not shown]the reason");
    }
}
