//! The client side of the API, for the CLI: a channel to the daemon's Unix socket, and
//! the token as request metadata.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

/// The socket to use: `--socket`, else `CLEAVE_SOCKET`, else the daemon's default.
pub fn socket_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("CLEAVE_SOCKET").map(PathBuf::from))
        .unwrap_or_else(super::default_socket)
}

/// Connects to the daemon at `path`.
pub async fn connect(path: &Path) -> anyhow::Result<Channel> {
    let p = path.to_path_buf();
    // The URI is a placeholder: every connection goes to the socket.
    Endpoint::from_static("http://cleave.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                let s = tokio::net::UnixStream::connect(&p).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
        .map_err(|e| {
            // The transport's own chain repeats its cause; say it once.
            let mut cause: &dyn std::error::Error = &e;
            while let Some(next) = cause.source() {
                cause = next;
            }
            anyhow::anyhow!(
                "connecting to the cleave daemon at {}: {cause} (is `cleave daemon` running? \
                 --socket or CLEAVE_SOCKET choose another socket)",
                path.display()
            )
        })
}

/// `request` with the sandbox token in its `authorization` metadata.
pub fn with_token<T>(
    mut request: tonic::Request<T>,
    token: &str,
) -> anyhow::Result<tonic::Request<T>> {
    let v: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .context("the token has characters a token cannot have")?;
    request.metadata_mut().insert("authorization", v);
    Ok(request)
}
