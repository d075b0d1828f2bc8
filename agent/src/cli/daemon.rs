//! `cleave daemon`: flags in, `crate::daemon::run` does the rest.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::daemon::{self, DaemonOptions};

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// The API's Unix socket [default: /run/cleave/cleave.sock, or under $XDG_RUNTIME_DIR].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The daemon's TOML config (limits, allowed uids, networking, TLS) [default: built-in
    /// defaults].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz over HTTP on this address.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Append one JSON line per mutating request here [default: the node log].
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
}

pub fn run(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    daemon::run(DaemonOptions {
        socket: args.socket,
        config: args.config,
        metrics_listen: args.metrics_listen,
        audit_log: args.audit_log,
    })?;
    Ok(ExitCode::SUCCESS)
}
