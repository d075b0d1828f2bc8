//! A sandbox: one fork of a template, running in its own worker process, that has passed
//! its reseed gate. The only way to a [`Sandbox`] — and so to its agent's [`Client`] — is
//! [`Sandbox::start`], which destroys the fork when the gate fails.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_guest::protocol::{Client, ReseedReply};

use super::gate::{self, GateError};
use super::worker::{Encoded, ReadyReport, Worker, WorkerError};
use crate::net::SandboxNetwork;

/// The worker binary's name; it is installed next to `cleave`.
pub const WORKER_EXE: &str = "cleave-fork-worker";

#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("the template has no vsock device, so its forks cannot be reached; recreate it")]
    NoVsock,
    /// Shown with its source (`{:#}` / the error chain): the gate's reason.
    #[error("fork (worker pid {pid}) failed its reseed gate and was destroyed")]
    Gate {
        pid: u32,
        #[source]
        source: GateError,
    },
    /// The guest could not apply its network identity; the fork was destroyed.
    #[error("fork (worker pid {pid}) could not be given its network and was destroyed")]
    Network {
        pid: u32,
        #[source]
        source: cleave_guest::protocol::ClientError,
    },
    #[error(
        "cannot find {WORKER_EXE} next to {cleave} ({source}); build it with `cargo build \
         --bins` or install it beside cleave"
    )]
    NoWorkerExe {
        cleave: String,
        source: std::io::Error,
    },
}

impl ForkError {
    /// The gate's reason when the gate failed (`--json`).
    pub fn gate_reason(&self) -> Option<&'static str> {
        match self {
            ForkError::Gate { source, .. } => Some(source.reason()),
            _ => None,
        }
    }
}

/// The `cleave-fork-worker` beside the running executable.
pub fn worker_exe() -> Result<PathBuf, ForkError> {
    let not_found = |cleave: String, source| ForkError::NoWorkerExe { cleave, source };
    let me = std::env::current_exe().map_err(|e| not_found("cleave".into(), e))?;
    let exe = me.with_file_name(WORKER_EXE);
    std::fs::metadata(&exe).map_err(|e| not_found(me.display().to_string(), e))?;
    Ok(exe)
}

/// A worker process with a template loaded and a VM shell prepared: the part of a fork
/// that can happen before anyone asks for one.
pub struct WarmWorker {
    worker: Worker,
}

impl WarmWorker {
    /// Starts a worker and has it load `template` and build its VM shell; with `jail`,
    /// the worker runs as a uid of its range (in its own cgroup leaf, when it has
    /// cgroups), jailed before it builds anything.
    pub fn new(
        exe: &std::path::Path,
        template: &Encoded,
        jail: Option<&super::jail::Jail>,
    ) -> Result<WarmWorker, WorkerError> {
        let mut worker = Worker::spawn_for(exe, jail, template.guest_bytes())?;
        match worker.load(template) {
            Ok(()) => Ok(WarmWorker { worker }),
            Err(e) => {
                let _ = worker.destroy();
                Err(e)
            }
        }
    }

    /// A worker forked from `zygote` (which holds the template), its shell prepared and,
    /// with `jail`, jailed as [`new`](Self::new) does.
    pub fn forked(
        zygote: &super::zygote::Zygote,
        jail: Option<&super::jail::Jail>,
    ) -> Result<WarmWorker, WorkerError> {
        Ok(WarmWorker {
            worker: zygote.spawn(jail)?,
        })
    }

    /// The worker's pid (the fork's id before it starts).
    pub fn pid(&self) -> u32 {
        self.worker.pid()
    }
}

/// A running fork whose gate passed.
pub struct Sandbox {
    // Drop order: the connection, then the worker (closing its socket ends the fork), then
    // (in `destroy`/`Drop`) its network.
    client: Arc<Client>,
    worker: Option<Worker>,
    network: Option<SandboxNetwork>,
    ready: ReadyReport,
    reseed: ReseedReply,
    fork_time: Duration,
    /// Of `fork_time`: the guest applying its network identity.
    identity_time: Option<Duration>,
    gate_attempts: u32,
}

impl Sandbox {
    /// Resumes the prepared fork (its NIC on `network`'s tap, or unplugged without one),
    /// runs its gate within `gate_timeout`, then gives the guest its network identity. On
    /// any failure the worker is destroyed (its VM stopped, its process reaped) and the
    /// network taken down before this returns.
    pub fn start(
        warm: WarmWorker,
        gate_timeout: Duration,
        network: Option<SandboxNetwork>,
    ) -> Result<Sandbox, ForkError> {
        let t = Instant::now();
        let mut worker = warm.worker;
        let ready = match worker.go(network.as_ref().map(SandboxNetwork::tap)) {
            Ok(r) => r,
            Err(e) => {
                let _ = worker.destroy();
                return Err(e.into());
            }
        };
        let Some(socket) = ready.vsock.clone() else {
            let _ = worker.destroy();
            return Err(ForkError::NoVsock);
        };
        match gate::pass(&socket, gate_timeout) {
            Ok(passed) => {
                // Only a reseeded guest gets an identity, and only a configured one is ready.
                let configured = Instant::now();
                if let Some(net) = &network {
                    if let Err(source) = passed
                        .client
                        .configure_network(net.guest_config(), gate_timeout)
                    {
                        let pid = worker.pid();
                        tracing::warn!(pid, error = %source, "fork could not apply its network; destroying it");
                        drop(passed.client);
                        let _ = worker.destroy();
                        return Err(ForkError::Network { pid, source });
                    }
                }
                let identity_time = network.as_ref().map(|_| configured.elapsed());
                Ok(Sandbox {
                    client: Arc::new(passed.client),
                    worker: Some(worker),
                    network,
                    ready,
                    reseed: passed.reply,
                    fork_time: t.elapsed(),
                    identity_time,
                    gate_attempts: passed.attempts,
                })
            }
            Err(source) => {
                let pid = worker.pid();
                tracing::warn!(
                    pid,
                    reason = source.reason(),
                    "fork failed its reseed gate; destroying it"
                );
                let _ = worker.destroy();
                Err(ForkError::Gate { pid, source })
            }
        }
    }

    /// The agent's connection (after the gate).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The connection, to use without holding the sandbox (it fails with
    /// `ClientError::Closed` once the sandbox is destroyed).
    pub fn shared_client(&self) -> Arc<Client> {
        self.client.clone()
    }

    /// A name for the fork: its worker's pid.
    pub fn id(&self) -> String {
        format!("fork-{}", self.ready.pid)
    }

    pub fn pid(&self) -> u32 {
        self.ready.pid
    }

    /// Request → gate passed: worker restore and start, then the reseed round trip.
    pub fn fork_time(&self) -> Duration {
        self.fork_time
    }

    /// Of [`fork_time`](Self::fork_time): the guest applying its network identity.
    pub fn identity_time(&self) -> Option<Duration> {
        self.identity_time
    }

    pub fn ready_report(&self) -> &ReadyReport {
        &self.ready
    }

    pub fn reseed_reply(&self) -> &ReseedReply {
        &self.reseed
    }

    pub fn gate_attempts(&self) -> u32 {
        self.gate_attempts
    }

    pub fn network(&self) -> Option<&SandboxNetwork> {
        self.network.as_ref()
    }

    /// The guest's IPv4 address, when it has a network.
    pub fn guest_ip(&self) -> Option<std::net::Ipv4Addr> {
        self.network.as_ref().map(|n| n.addrs().guest4)
    }

    /// How its worker ended, if it did on its own (a guest that crashed its VMM, a
    /// seccomp violation, a kill): the sandbox is gone and only needs destroying.
    pub fn worker_ended(&mut self) -> Option<ExitStatus> {
        self.worker.as_mut().and_then(Worker::ended)
    }

    /// Ends the fork: closes the connection and the worker's socket, reaps the worker
    /// (which stops its VM and removes its runtime directory first), then takes its
    /// network down.
    pub fn destroy(mut self) -> Result<ExitStatus, WorkerError> {
        let worker = self.worker.take().expect("taken only here or on drop");
        let network = self.network.take();
        drop(self);
        let r = worker.destroy();
        drop(network);
        r
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            let _ = w.destroy();
        }
        drop(self.network.take());
    }
}
