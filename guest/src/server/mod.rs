//! The agent's request server: serves connections of the wire protocol.
//!
//! - [`conn`]: one connection: reads frames, dispatches, owns the live
//!   requests and the shared writer; dropping the connection cancels them.
//! - [`exec`]: running a command (threads for stdin, output and exit).
//! - [`spawn`]: `posix_spawn` in a new session, registered with the [`Reaper`].
//! - [`files`]: `write_file` / `read_file`.
//! - [`gate`]: the reseed gate.
//! - [`network`]: applying the network identity a fork gets after its gate.
//! - [`quiesce`]: closing the gate and checking that only the agent runs (templates).
//! - [`reaper`]: the process-wide owner of `waitpid`.

mod conn;
mod exec;
mod files;
pub mod gate;
pub mod network;
pub mod quiesce;
pub mod reaper;
mod spawn;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

pub use gate::{Gate, GateMode};
pub use reaper::{ExitWatch, Reaper};
pub use spawn::SpawnError;

use crate::reseed::Reseed;

/// Limits and hooks of a server.
#[derive(Clone)]
pub struct ServerConfig {
    /// The reseed gate's starting mode (see [`gate`]).
    pub gate: GateMode,
    /// What a `reseed` request does.
    pub reseed: Arc<dyn Reseed>,
    /// Largest file `write_file` accepts and `read_file` sends.
    pub max_file_size: u64,
    /// Most requests in flight on one connection (beyond: `Busy`).
    pub max_requests: usize,
    /// Called after `shutdown` is acknowledged (PID 1 powers off here).
    /// Without it `shutdown` is refused as unsupported.
    pub on_shutdown: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Applies a `network` request (PID 1: [`network::apply`]). Without it
    /// `network` is refused as unsupported.
    pub on_network: Option<NetworkHook>,
    /// The agent's own binary, spawned as `AGENT exec-as UID GID ...` to
    /// run an exec that names a user (see [`crate::exec_as`]). The default,
    /// [`DEFAULT_AGENT_EXE`], is right for the agent itself; a server run
    /// in another program (tests) points it at a built `cleave-guest`.
    pub agent_exe: PathBuf,
}

/// The binary of the running process.
pub const DEFAULT_AGENT_EXE: &str = "/proc/self/exe";

/// What applies a guest's network identity; the error says what failed.
pub type NetworkHook =
    Arc<dyn Fn(&crate::protocol::NetworkConfig) -> Result<(), String> + Send + Sync>;

impl ServerConfig {
    pub fn new(gate: GateMode, reseed: Arc<dyn Reseed>) -> Self {
        ServerConfig {
            gate,
            reseed,
            max_file_size: 1 << 30,
            max_requests: 256,
            on_shutdown: None,
            on_network: None,
            agent_exe: PathBuf::from(DEFAULT_AGENT_EXE),
        }
    }
}

pub(crate) struct ServerInner {
    pub(crate) config: ServerConfig,
    pub(crate) gate: Gate,
    pub(crate) reaper: Reaper,
    pub(crate) started: Instant,
}

/// Serves any number of connections concurrently (one thread each, plus a
/// few per running request). Cheap to clone.
#[derive(Clone)]
pub struct Server {
    inner: Arc<ServerInner>,
}

impl Server {
    pub fn new(config: ServerConfig, reaper: Reaper) -> Server {
        Server {
            inner: Arc::new(ServerInner {
                gate: Gate::new(config.gate),
                config,
                reaper,
                started: Instant::now(),
            }),
        }
    }

    pub fn gate(&self) -> &Gate {
        &self.inner.gate
    }

    /// Serves one connection until the peer closes it or it fails; then
    /// cancels whatever it still runs (killing exec process groups).
    /// Bad requests get error replies and never end the connection.
    pub fn serve<R, W>(&self, reader: R, writer: W)
    where
        R: Read,
        W: Write + Send + 'static,
    {
        conn::serve(self.inner.clone(), reader, Box::new(writer));
    }

    /// [`Server::serve`] on a connected socket (a vsock stream in the guest).
    pub fn serve_fd(&self, fd: OwnedFd) -> io::Result<()> {
        let reader = File::from(fd);
        let writer = reader.try_clone()?;
        self.serve(reader, writer);
        Ok(())
    }

    /// Runs [`Server::serve_fd`] on a thread of its own.
    pub fn spawn_connection(&self, fd: OwnedFd) -> io::Result<std::thread::JoinHandle<()>> {
        let server = self.clone();
        std::thread::Builder::new()
            .name("cleave-conn".into())
            .spawn(move || {
                if let Err(e) = server.serve_fd(fd) {
                    tracing::warn!("connection setup failed: {e}");
                }
            })
    }
}
