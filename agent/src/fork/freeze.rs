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
use cleave_guest::protocol::{ClientError, ExecRequest, ExitReport, ExitStatus};
use kvm_ioctls::Kvm;

use super::capture::{capture, CaptureError};
use super::gate::{self, GateError};
use super::Template;
use crate::devices::virtio::net::NetBackend;
use crate::image::VerifiedImage;
use crate::vmm::agent_vm::{AgentVm, AgentVmError};
use crate::vmm::config::MachineConfig;

/// How long the guest gets to close the host's last connection before capture.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("template: booting the guest: {0}")]
    Boot(#[from] AgentVmError),
    #[error("template: reseeding before the warm-up: {0}")]
    Gate(#[from] GateError),
    #[error("template: running the warm-up command: {0}")]
    Warmup(ClientError),
    #[error("template: the warm-up command failed ({status:?}); stderr: {stderr}")]
    WarmupFailed { status: ExitStatus, stderr: String },
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

/// A captured template and what it took.
pub struct Frozen {
    pub template: Template,
    /// The warm-up's exit and output, if there was one.
    pub warmup: Option<(ExitReport, Vec<u8>, Vec<u8>)>,
    /// Start → agent ready.
    pub boot: Duration,
    /// Quiesce, stop and capture (with sealing).
    pub capture: Duration,
}

pub fn freeze(
    kvm: &Kvm,
    image: &VerifiedImage,
    opts: &FreezeOptions,
) -> Result<Frozen, FreezeError> {
    let vm = AgentVm::boot(
        kvm,
        opts.machine,
        image,
        &opts.guest_cmdline(),
        opts.boot_timeout,
        // Templates always carry the NIC, unplugged: each fork gets its own tap.
        NetBackend::Disconnected,
    )?;
    let boot = vm.ready_after();
    let warmup = match &opts.warmup {
        Some(argv) => {
            gate::reseed(vm.client(), opts.boot_timeout)?;
            let (x, out, err) = vm
                .client()
                .exec_collect(ExecRequest::new(argv.iter().cloned()), None)
                .map_err(FreezeError::Warmup)?;
            if x.status != ExitStatus::Code(0) {
                return Err(FreezeError::WarmupFailed {
                    status: x.status,
                    stderr: String::from_utf8_lossy(&err).into_owned(),
                });
            }
            Some((x, out, err))
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
