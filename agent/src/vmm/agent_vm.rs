//! A booted guest whose agent answers on vsock: the VM, its private runtime directory
//! (with the hybrid-vsock socket), its console tail, and a protocol client. What
//! `cleave run` and the integration probes drive.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cleave_guest::boot::{AGENT_VSOCK_PORT, READY_PREFIX};
use cleave_guest::protocol::{Client, ClientError, HelloReply};
use kvm_ioctls::Kvm;

use super::config::MachineConfig;
use super::memory::GuestRam;
use super::runtime_dir::{RuntimeDir, RuntimeDirError};
use super::{boot_linux, BootDevices, RunningVm, VmmError};
use crate::devices::serial::console::Console;
use crate::devices::virtio::net::NetBackend;
use crate::devices::virtio::vsock::{hybrid, VsockConfig, DEFAULT_GUEST_CID};
use crate::devices::GuestEnd;
use crate::image::VerifiedImage;

#[derive(Debug, thiserror::Error)]
pub enum AgentVmError {
    #[error(transparent)]
    RuntimeDir(#[from] RuntimeDirError),
    #[error("booting the guest: {0}")]
    Boot(#[from] VmmError),
    #[error("the guest ended before its agent was ready: {end}")]
    Ended { end: GuestEnd },
    #[error("the guest agent was not ready within {0:?}")]
    NotReady(Duration),
    #[error("connecting to the guest agent over vsock: {0}")]
    Connect(std::io::Error),
    #[error("the guest agent did not answer hello: {0}")]
    Hello(ClientError),
}

/// A running guest with a connected agent. Dropping it stops the VM and removes its
/// runtime directory.
pub struct AgentVm {
    // Drop order: the client, then the VM, then the directory its socket lives in.
    /// `None` only after [`AgentVm::stop_quiet`] closed it.
    client: Option<Client>,
    vm: Option<RunningVm>,
    console: Console,
    dir: RuntimeDir,
    /// The vsock socket as this process reaches it.
    vsock_path: PathBuf,
    hello: HelloReply,
    ready_after: Duration,
}

/// What a process prepares for a boot before it jails itself.
pub struct Prepared {
    /// The guest memory (`None`: a fresh memfd).
    pub ram: Option<GuestRam>,
    /// The runtime directory for the vsock socket.
    pub dir: RuntimeDir,
    /// The vsock socket's path as this process sees it (inside the jail, the directory is
    /// `/`).
    pub vsock_path: PathBuf,
    /// The vCPU and event-loop threads' seccomp filters, if they are to have them.
    pub filters: Option<std::sync::Arc<super::seccomp::Filters>>,
}

/// What to boot: the machine, the verified kernel and initramfs, the command line, and
/// how long the agent has to answer.
#[derive(Debug, Clone, Copy)]
pub struct BootSpec<'a> {
    pub machine: MachineConfig,
    pub kernel: &'a [u8],
    pub initrd: &'a [u8],
    pub cmdline: &'a str,
    pub timeout: Duration,
}

impl AgentVm {
    /// Boots `image` with a vsock device and a NIC on `net` and waits (up to `timeout`)
    /// until the agent answers `hello`.
    pub fn boot(
        kvm: &Kvm,
        machine: MachineConfig,
        image: &VerifiedImage,
        cmdline: &str,
        timeout: Duration,
        net: NetBackend,
    ) -> Result<AgentVm, AgentVmError> {
        let dir = RuntimeDir::create()?;
        let spec = BootSpec {
            machine,
            kernel: &image.kernel,
            initrd: &image.initrd,
            cmdline,
            timeout,
        };
        let vsock = dir.vsock_path();
        Self::boot_on(
            kvm,
            &spec,
            Prepared {
                ram: None,
                dir,
                vsock_path: vsock,
                filters: None,
            },
            net,
        )
    }

    /// [`boot`](Self::boot) with what a jailed process prepares before it jails itself
    /// ([`Prepared`]).
    pub fn boot_on(
        kvm: &Kvm,
        spec: &BootSpec<'_>,
        prepared: Prepared,
        net: NetBackend,
    ) -> Result<AgentVm, AgentVmError> {
        let Prepared {
            ram,
            dir,
            vsock_path,
            filters,
        } = prepared;
        let vsock = VsockConfig {
            guest_cid: DEFAULT_GUEST_CID,
            uds_path: vsock_path,
            // This process is the only client.
            peer_uid: Some(nix::unistd::geteuid().as_raw()),
        };
        let (console, writer) = Console::new(None, Some(READY_PREFIX));
        let start = Instant::now();
        let deadline = start + spec.timeout;
        let vm = boot_linux(
            kvm,
            spec.machine,
            spec.kernel,
            spec.initrd,
            spec.cmdline,
            Box::new(writer),
            BootDevices {
                vsock: Some(&vsock),
                net: Some(net),
                ram,
                filters,
            },
        )?;
        // The readiness line comes after the agent listens; watch for an early end.
        while console.wait_for_line(Duration::from_millis(100)).is_none() {
            if let Some(end) = vm.wait(Some(Duration::ZERO)) {
                return Err(AgentVmError::Ended { end });
            }
            if Instant::now() >= deadline {
                return Err(AgentVmError::NotReady(spec.timeout));
            }
        }
        let stream = hybrid::connect(&vsock.uds_path, AGENT_VSOCK_PORT, deadline)
            .map_err(AgentVmError::Connect)?;
        let client = Client::new(stream).map_err(AgentVmError::Connect)?;
        let left = deadline.saturating_duration_since(Instant::now());
        let hello = client
            .hello(left.max(Duration::from_secs(1)))
            .map_err(AgentVmError::Hello)?;
        Ok(AgentVm {
            client: Some(client),
            vm: Some(vm),
            console,
            dir,
            vsock_path: vsock.uds_path,
            hello,
            ready_after: start.elapsed(),
        })
    }

    pub fn client(&self) -> &Client {
        self.client
            .as_ref()
            .expect("the client is only taken by stop_quiet, which consumes self")
    }

    pub fn hello(&self) -> &HelloReply {
        &self.hello
    }

    /// From starting the VM to the agent's `hello` answer.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// The VM's hybrid-vsock socket.
    pub fn vsock_path(&self) -> PathBuf {
        self.vsock_path.clone()
    }

    /// The VM's private runtime directory (an id for the run).
    pub fn id(&self) -> String {
        self.dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// A further raw stream to the agent (a second protocol connection).
    pub fn connect(&self, timeout: Duration) -> std::io::Result<UnixStream> {
        hybrid::connect(
            &self.vsock_path(),
            AGENT_VSOCK_PORT,
            Instant::now() + timeout,
        )
    }

    pub fn vm(&self) -> &RunningVm {
        self.vm.as_ref().expect("the VM is only taken on drop")
    }

    /// The last bytes the guest printed on its console.
    pub fn console_tail(&self) -> String {
        self.console.tail()
    }

    /// Closes the agent connection, waits (up to `settle`) until the guest has closed its
    /// side too (so no connection is half open in its memory), then stops the vCPUs and
    /// hands back the stopped VM: what a template is captured from.
    pub fn stop_quiet(mut self, settle: Duration) -> (GuestEnd, super::Vm) {
        drop(self.client.take());
        let vm = self
            .vm
            .take()
            .expect("the VM is only taken on drop or here");
        let deadline = Instant::now() + settle;
        while Instant::now() < deadline {
            let open = vm.vsock().map_or(0, |v| {
                v.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .muxer()
                    .connection_count()
            });
            if open == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        vm.stop_and_keep()
    }

    /// Stops the VM and returns why it ended.
    pub fn stop(mut self) -> GuestEnd {
        self.vm.take().map_or(GuestEnd::Stopped, RunningVm::stop)
    }
}

impl Drop for AgentVm {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            vm.stop();
        }
        tracing::debug!(dir = %self.dir.path().display(), "VM stopped; removing its runtime directory");
    }
}
