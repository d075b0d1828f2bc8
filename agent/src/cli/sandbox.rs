//! `cleave sandbox create|ls|rm`: operator calls to the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::daemon::api::pb::{self, fork_result, sandboxes_client::SandboxesClient};
use crate::daemon::client;

#[derive(Args, Debug, Clone)]
pub struct SocketArg {
    /// The daemon's socket [default: $CLEAVE_SOCKET, else the daemon's default].
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum SandboxCommand {
    /// Fork sandboxes from a template; prints each one's id and token (shown only once).
    Create(CreateArgs),
    /// List live sandboxes.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Destroy sandboxes.
    Rm {
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[arg(long, default_value = "default")]
    template: String,
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    count: u32,
    /// Lifetime in seconds [default: the daemon's].
    #[arg(long, value_name = "SECS")]
    ttl: Option<u64>,
    /// Egress: NAME[:PORTS] the sandbox may resolve and reach. Repeatable.
    #[arg(long = "allow", value_name = "NAME[:PORTS]")]
    allow: Vec<String>,
    /// Egress: CIDR[:PORTS] the sandbox may reach without DNS. Repeatable.
    #[arg(long = "allow-cidr", value_name = "CIDR[:PORTS]")]
    allow_cidr: Vec<String>,
    /// Destroy every fork of the request if any fails.
    #[arg(long)]
    all_or_nothing: bool,
    /// One JSON object per fork: {"id","token","ip","fork_ms","expires_unix"} or {"error"}.
    #[arg(long)]
    json: bool,
}

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client's runtime")
}

/// A refusal from the daemon, as the user sees it.
pub(super) fn refused(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {} ({:?})", s.message(), s.code())
}

pub fn run(cmd: SandboxCommand, socket: SocketArg) -> anyhow::Result<ExitCode> {
    let path = client::socket_path(socket.socket);
    runtime()?.block_on(async move {
        let mut c = SandboxesClient::new(client::connect(&path).await?);
        match cmd {
            SandboxCommand::Create(a) => create(&mut c, a).await,
            SandboxCommand::Ls { json } => {
                let r = c
                    .list_sandboxes(pb::ListSandboxesRequest {})
                    .await
                    .map_err(|s| refused("listing sandboxes", s))?
                    .into_inner();
                if json {
                    for s in &r.sandboxes {
                        println!("{}", sandbox_json(s));
                    }
                } else {
                    println!(
                        "{:<20} {:<12} {:<16} {:>9} {:>6} {:>10}",
                        "ID", "TEMPLATE", "IP", "FORK_MS", "EXECS", "EXPIRES_IN"
                    );
                    let now = crate::node::templates::unix_now();
                    for s in &r.sandboxes {
                        println!(
                            "{:<20} {:<12} {:<16} {:>9.2} {:>6} {:>9}s",
                            s.id,
                            s.template,
                            if s.ipv4.is_empty() { "-" } else { &s.ipv4 },
                            s.fork_ms,
                            s.active_execs,
                            s.expires_unix.saturating_sub(now)
                        );
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            SandboxCommand::Rm { ids } => {
                let mut code = ExitCode::SUCCESS;
                for id in ids {
                    match c
                        .delete_sandbox(pb::DeleteSandboxRequest { id: id.clone() })
                        .await
                    {
                        Ok(_) => println!("destroyed {id}"),
                        Err(s) => {
                            eprintln!("cleave: {:#}", refused(&format!("destroying {id}"), s));
                            code = ExitCode::FAILURE;
                        }
                    }
                }
                Ok(code)
            }
        }
    })
}

fn sandbox_json(s: &pb::Sandbox) -> serde_json::Value {
    serde_json::json!({
        "id": s.id,
        "template": s.template,
        "ip": (!s.ipv4.is_empty()).then_some(&s.ipv4),
        "fork_ms": (s.fork_ms * 1000.0).round() / 1000.0,
        "created_unix": s.created_unix,
        "expires_unix": s.expires_unix,
        "active_execs": s.active_execs,
    })
}

async fn create(
    c: &mut SandboxesClient<tonic::transport::Channel>,
    a: CreateArgs,
) -> anyhow::Result<ExitCode> {
    let network = (!a.allow.is_empty() || !a.allow_cidr.is_empty()).then(|| pb::EgressPolicy {
        allow: a.allow.clone(),
        allow_cidr: a.allow_cidr.clone(),
    });
    let r = c
        .create_sandboxes(pb::CreateSandboxesRequest {
            template: a.template.clone(),
            count: a.count,
            ttl_secs: a.ttl.unwrap_or(0),
            network,
            all_or_nothing: a.all_or_nothing,
        })
        .await
        .map_err(|s| refused("creating sandboxes", s))?
        .into_inner();
    let mut failed = 0;
    if !a.json {
        println!("{:<20} {:<64} {:<16} {:>8}", "ID", "TOKEN", "IP", "FORK_MS");
    }
    for (i, r) in r.results.iter().enumerate() {
        match &r.result {
            Some(fork_result::Result::Created(c)) => {
                let s = c.sandbox.clone().unwrap_or_default();
                if a.json {
                    let mut v = sandbox_json(&s);
                    v["token"] = c.token.clone().into();
                    println!("{v}");
                } else {
                    println!(
                        "{:<20} {:<64} {:<16} {:>8.2}",
                        s.id,
                        c.token,
                        if s.ipv4.is_empty() { "-" } else { &s.ipv4 },
                        s.fork_ms
                    );
                }
            }
            Some(fork_result::Result::Failed(f)) => {
                failed += 1;
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "fork": i + 1,
                            "error": f.message,
                            "gate_failure": (!f.gate_failure.is_empty()).then_some(&f.gate_failure),
                        })
                    );
                } else {
                    eprintln!("cleave: fork {}: {}", i + 1, f.message);
                }
            }
            None => failed += 1,
        }
    }
    if failed > 0 {
        eprintln!("cleave: {failed} of {} fork(s) failed", r.results.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
