//! `cleave exec ID -- CMD` and `cleave cp SRC DST`: token-holder calls to the daemon.
//! The token comes from `--token` or `CLEAVE_TOKEN` (prefer the variable: a flag shows in
//! `ps`).

use std::io::{Read, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::sandbox::{refused, runtime, SocketArg};
use crate::daemon::api::pb::{
    self, exec_client::ExecClient, exec_input, exec_output, exit_status, files_client::FilesClient,
    write_file_input,
};
use crate::daemon::client;

#[derive(Args, Debug, Clone)]
pub struct TokenArg {
    /// The sandbox's token [default: $CLEAVE_TOKEN].
    #[arg(
        long,
        value_name = "TOKEN",
        env = "CLEAVE_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

impl TokenArg {
    fn get(&self) -> anyhow::Result<&str> {
        self.token.as_deref().context(
            "this needs the sandbox's token (printed by `cleave sandbox create`): set \
             CLEAVE_TOKEN or pass --token",
        )
    }
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    token: TokenArg,
    /// KEY=VALUE for the command's environment, over the image's (by key).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory in the guest [default: the image's, else /].
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// Run as this user [default: the image's, else root].
    #[arg(long, value_name = "UID:GID", value_parser = parse_user_arg)]
    user: Option<String>,
    /// Kill the command's process group after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Give the command no stdin (/dev/null) instead of this terminal's.
    #[arg(long)]
    no_stdin: bool,
    /// The sandbox.
    id: String,
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Checked here so a typo is refused before a token is read or the daemon asked.
fn parse_user_arg(s: &str) -> Result<String, String> {
    crate::node::exec::parse_user(s).map(|_| s.to_string())
}

pub fn exec(args: ExecArgs, socket: SocketArg) -> anyhow::Result<ExitCode> {
    let token = args.token.get()?.to_string();
    let path = client::socket_path(socket.socket);
    runtime()?.block_on(async move {
        let mut c = ExecClient::new(client::connect(&path).await?);
        let (tx, rx) = mpsc::channel::<pb::ExecInput>(8);
        let input = |i| pb::ExecInput { input: Some(i) };
        tx.send(input(exec_input::Input::Start(pb::ExecStart {
            sandbox_id: args.id.clone(),
            argv: args.command.clone(),
            env: args.env.clone(),
            cwd: args.cwd.clone().unwrap_or_default(),
            stdin: !args.no_stdin,
            timeout_ms: args.timeout.map_or(0, |s| s.saturating_mul(1000)),
            user: args.user.clone().unwrap_or_default(),
        })))
        .await?;
        if !args.no_stdin {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut stdin = tokio::io::stdin();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stdin.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            let _ = tx.send(input(exec_input::Input::StdinClose(true))).await;
                            return;
                        }
                        Ok(n) => {
                            if tx
                                .send(input(exec_input::Input::Stdin(buf[..n].to_vec())))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                }
            });
        }
        // SIGINT/SIGTERM/SIGHUP go to the command in the guest; its exit ends us.
        {
            use tokio::signal::unix::{signal, SignalKind};
            let tx = tx.clone();
            let kinds = [
                (SignalKind::interrupt(), libc::SIGINT),
                (SignalKind::terminate(), libc::SIGTERM),
                (SignalKind::hangup(), libc::SIGHUP),
            ];
            for (kind, n) in kinds {
                if let Ok(mut s) = signal(kind) {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        while s.recv().await.is_some() {
                            let _ = tx.send(input(exec_input::Input::Signal(n))).await;
                        }
                    });
                }
            }
        }
        drop(tx);
        let req = client::with_token(tonic::Request::new(ReceiverStream::new(rx)), &token)?;
        let mut out = c
            .exec(req)
            .await
            .map_err(|s| refused(&format!("exec in {}", args.id), s))?
            .into_inner();
        let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
        loop {
            let msg = out
                .message()
                .await
                .map_err(|s| refused(&format!("exec in {}", args.id), s))?;
            let Some(msg) = msg else {
                anyhow::bail!("the daemon ended the exec without an exit status");
            };
            match msg.output {
                Some(exec_output::Output::Stdout(d)) => {
                    let _ = stdout.write_all(&d).and_then(|_| stdout.flush());
                }
                Some(exec_output::Output::Stderr(d)) => {
                    let _ = stderr.write_all(&d);
                }
                Some(exec_output::Output::Exit(x)) => {
                    if x.timed_out {
                        eprintln!("cleave: the command ran past its timeout; it was killed");
                    }
                    let code = match x.status {
                        Some(exit_status::Status::Code(c)) => c,
                        Some(exit_status::Status::Signal(n)) => 128i32.saturating_add(n),
                        None => 1,
                    };
                    return Ok(super::exit_code(code));
                }
                None => {}
            }
        }
    })
}

#[derive(Args, Debug)]
pub struct CpArgs {
    #[command(flatten)]
    token: TokenArg,
    /// `ID:PATH` (from the sandbox) or a local file (`-`: stdin).
    src: String,
    /// `ID:PATH` (into the sandbox) or a local file (`-`: stdout).
    dst: String,
}

/// `sb-…:/path` → (id, path).
fn remote(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    (id.starts_with("sb-") && path.starts_with('/')).then_some((id, path))
}

pub fn cp(args: CpArgs, socket: SocketArg) -> anyhow::Result<ExitCode> {
    let (src, dst) = (remote(&args.src), remote(&args.dst));
    if src.is_some() == dst.is_some() {
        anyhow::bail!(
            "one side of `cleave cp` must be ID:/ABSOLUTE/PATH in a sandbox and the other a \
             local file (or -), e.g. `cleave cp ./in.txt sb-0123456789abcdef:/tmp/in.txt`"
        );
    }
    let token = args.token.get()?.to_string();
    let path = client::socket_path(socket.socket);
    runtime()?.block_on(async {
        let mut c = FilesClient::new(client::connect(&path).await?);
        match (src, dst) {
            (Some((id, from)), None) => {
                let req = client::with_token(
                    tonic::Request::new(pb::ReadFileRequest {
                        sandbox_id: id.into(),
                        path: from.into(),
                        limit: 0,
                    }),
                    &token,
                )?;
                let mut s = c
                    .read_file(req)
                    .await
                    .map_err(|s| refused("reading the file", s))?
                    .into_inner();
                let mut sink: Box<dyn Write> = if args.dst == "-" {
                    Box::new(std::io::stdout())
                } else {
                    Box::new(
                        std::fs::File::create(&args.dst)
                            .with_context(|| format!("creating {}", args.dst))?,
                    )
                };
                let mut n = 0u64;
                while let Some(chunk) = s
                    .message()
                    .await
                    .map_err(|s| refused("reading the file", s))?
                {
                    n += chunk.data.len() as u64;
                    sink.write_all(&chunk.data)?;
                }
                sink.flush()?;
                if args.dst != "-" {
                    eprintln!("cleave: {n} bytes from {}", args.src);
                }
                Ok(ExitCode::SUCCESS)
            }
            (None, Some((id, to))) => {
                let data = if args.src == "-" {
                    let mut v = Vec::new();
                    std::io::stdin().read_to_end(&mut v)?;
                    v
                } else {
                    std::fs::read(&args.src).with_context(|| format!("reading {}", args.src))?
                };
                let mode = if args.src == "-" {
                    0o644
                } else {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::metadata(&args.src)?.permissions().mode() & 0o777
                };
                let size = data.len() as u64;
                let mut msgs = vec![pb::WriteFileInput {
                    input: Some(write_file_input::Input::Start(pb::WriteFileStart {
                        sandbox_id: id.into(),
                        path: to.into(),
                        mode,
                        size,
                    })),
                }];
                msgs.extend(data.chunks(64 * 1024).map(|d| pb::WriteFileInput {
                    input: Some(write_file_input::Input::Data(d.to_vec())),
                }));
                let req =
                    client::with_token(tonic::Request::new(tokio_stream::iter(msgs)), &token)?;
                let r = c
                    .write_file(req)
                    .await
                    .map_err(|s| refused("writing the file", s))?
                    .into_inner();
                eprintln!("cleave: {} bytes to {}", r.bytes, args.dst);
                Ok(ExitCode::SUCCESS)
            }
            _ => unreachable!("checked above: exactly one side is in a sandbox"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[command(flatten)]
        exec: ExecArgs,
    }

    #[test]
    fn a_mistyped_flag_is_refused_and_the_commands_own_flags_are_kept() {
        let e = T::try_parse_from(["exec", "sb-1", "--no-stdn", "--", "true"]).unwrap_err();
        assert!(e.to_string().contains("--no-stdn"), "{e}");
        let t = T::try_parse_from(["exec", "--no-stdin", "sb-1", "ls", "-l"]).unwrap();
        assert!(t.exec.no_stdin);
        assert_eq!(t.exec.id, "sb-1");
        assert_eq!(t.exec.command, ["ls", "-l"]);
        let t = T::try_parse_from(["exec", "sb-1", "--", "--help"]).unwrap();
        assert_eq!(t.exec.command, ["--help"]);
    }
}
