//! The `cleave` command line: parsing, logging, and one module per subcommand.

mod boot;
mod daemon;
mod dns;
mod exec;
mod forks;
mod image;
mod net_args;
mod rig;
mod run;
mod sandbox;
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
    /// Copy a file into or out of a sandbox (through the daemon): `cleave cp ./f sb-…:/tmp/f`.
    Cp {
        #[command(flatten)]
        socket: sandbox::SocketArg,
        #[command(flatten)]
        args: exec::CpArgs,
    },
    /// The node daemon: serves the cleave API on a Unix socket.
    Daemon(daemon::DaemonArgs),
    /// DNS tools: `cleave dns classify ADDR...` shows the pin filter's verdict.
    #[command(subcommand)]
    Dns(dns::DnsCommand),
    /// Run a command in a sandbox (through the daemon): `cleave exec sb-… -- uname -a`.
    Exec {
        #[command(flatten)]
        socket: sandbox::SocketArg,
        #[command(flatten)]
        args: exec::ExecArgs,
    },
    /// Images from your own root filesystem: `cleave image build|ls|rm`.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Run a cleave command inside the KVM rig, e.g. `cleave rig -- boot --selftest`.
    Rig(rig::RigArgs),
    /// Boot an image and run one command in it: `cleave run -- uname -a`; or run
    /// it in N forks of a template: `cleave run --forks 3 -- head -c 16 /dev/urandom`.
    Run(run::RunArgs),
    /// Sandboxes on the daemon: `cleave sandbox create|ls|rm`.
    Sandbox {
        #[command(flatten)]
        socket: sandbox::SocketArg,
        #[command(subcommand)]
        cmd: sandbox::SandboxCommand,
    },
    /// Templates to fork from: `cleave template create|ls|rm`.
    #[command(subcommand)]
    Template(template::TemplateCommand),
}

/// Logs go to stderr as structured lines; `RUST_LOG` picks the level (default: warnings;
/// the daemon: info, as JSON lines).
fn init_logging(daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let filter = crate::host::log_filter(default);
    if daemon {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
        return;
    }
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
    init_logging(matches!(cli.command, Command::Daemon(_)));
    let result = match cli.command {
        Command::Boot(args) => boot::run(args),
        Command::Cp { socket, args } => exec::cp(args, socket),
        Command::Daemon(args) => daemon::run(args),
        Command::Exec { socket, args } => exec::exec(args, socket),
        Command::Sandbox { socket, cmd } => sandbox::run(cmd, socket),
        Command::Dns(cmd) => dns::run(cmd),
        Command::Image(cmd) => image::run(cmd),
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
