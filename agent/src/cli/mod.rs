//! The `cleave` command line: parsing, logging, and one module per subcommand.

mod boot;
mod dns;
mod forks;
mod net_args;
mod rig;
mod run;
mod template;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cleave",
    version,
    about = "KVM microVM sandboxes, forked copy-on-write from a frozen template"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest image and stream its console until it ends.
    Boot(boot::BootArgs),
    /// DNS tools: `cleave dns classify ADDR...` shows the pin filter's verdict.
    #[command(subcommand)]
    Dns(dns::DnsCommand),
    /// Run a cleave command inside the KVM rig, e.g. `cleave rig -- boot --selftest`.
    Rig(rig::RigArgs),
    /// Boot the default image and run one command in it: `cleave run -- uname -a`; or run
    /// it in N forks of a template: `cleave run --forks 3 -- head -c 16 /dev/urandom`.
    Run(run::RunArgs),
    /// Templates to fork from: `cleave template create|ls|rm`.
    #[command(subcommand)]
    Template(template::TemplateCommand),
}

/// Logs go to stderr as structured lines; `RUST_LOG` picks the level (default: warnings).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colour codes only for a person at a terminal, never into logs and pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Boot(args) => boot::run(args),
        Command::Dns(cmd) => dns::run(cmd),
        Command::Rig(args) => rig::run(args),
        Command::Run(args) => run::run(args),
        Command::Template(cmd) => template::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cleave: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// An exit code from a guest's or command's status (0..=255).
pub(crate) fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
