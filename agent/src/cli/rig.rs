//! `cleave rig -- ARGS...`: run `cleave ARGS...` inside the KVM rig (a software-emulated
//! machine with a real KVM), relaying its output and exit status.

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

#[derive(Args, Debug)]
pub struct RigArgs {
    /// Run ARGS as a program (looked up in PATH) instead of as cleave's arguments.
    #[arg(long)]
    exec: bool,
    /// The cleave arguments to run in the rig, e.g. `boot --selftest`.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<OsString>,
}

pub fn run(args: RigArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout();
    let code = if args.exec {
        let cwd = std::env::current_dir().context("reading the current directory")?;
        let mut cmd = crate::rig::RigCommand::new(args.args, cwd);
        cmd.timeout = crate::rig::timeout_from_env().context("the rig's timeout")?;
        crate::rig::run(&cmd, &mut out)
            .context("running the command in the rig")?
            .exit_code
    } else {
        crate::rig::run_cleave(&args.args, &mut out).context("running cleave in the rig")?
    };
    Ok(super::exit_code(code))
}
