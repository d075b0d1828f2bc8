use std::process::ExitCode;

fn main() -> ExitCode {
    cleave_agent::cli::main()
}
