//! `cleave daemon`: the node daemon. It opens the node (reconciling what a killed
//! predecessor left), serves the API on a Unix socket (and, when configured, a mutual-TLS
//! TCP listener), serves metrics and health, destroys sandboxes whose TTL ran out, and on
//! SIGTERM/SIGINT destroys every sandbox before it exits.

pub mod api;
pub mod audit;
pub mod client;
pub mod config;
pub mod metrics;
pub mod rate;

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use self::api::pb::{
    exec_server::ExecServer, files_server::FilesServer, sandboxes_server::SandboxesServer,
    templates_server::TemplatesServer,
};
use self::api::Api;
use self::audit::{rfc3339, AuditLog, AuditRecord};
use self::config::DaemonConfig;
use self::metrics::Metrics;
use self::rate::RateLimiter;
use crate::fork::store::{TemplateName, TemplateStore};
use crate::net::NetOptions;
use crate::node::boot::resolve_image;
use crate::node::templates::TemplateSpec;
use crate::node::{Node, NodeOptions};
use crate::vmm::runtime_dir::RuntimeDir;

/// What `cleave daemon` was started with.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    pub socket: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    pub audit_log: Option<PathBuf>,
}

/// `/run/cleave/cleave.sock`, or `$XDG_RUNTIME_DIR/cleave/cleave.sock` when that is set.
pub fn default_socket() -> PathBuf {
    RuntimeDir::base().join("cleave.sock")
}

pub fn run(opts: DaemonOptions) -> anyhow::Result<()> {
    let config = match &opts.config {
        Some(p) => DaemonConfig::load(p)?,
        None => DaemonConfig::default(),
    };
    let socket = opts.socket.clone().unwrap_or_else(default_socket);
    private_dir(&config.state_dir)?;
    // One daemon per state directory: a second would reconcile away the first's workers.
    let _lock = exclusive(&config.state_dir.join("daemon.lock"))?;
    let audit = Arc::new(
        AuditLog::open(opts.audit_log.as_deref())
            .with_context(|| format!("opening the audit log {:?}", opts.audit_log))?,
    );
    let node = Node::open(NodeOptions {
        store: TemplateStore::default_location(),
        net: config.network.as_ref().map(|n| NetOptions {
            uplink: n.uplink.clone(),
            dns_upstream: n.dns_upstream.clone(),
            pool: n.pool,
            ..NetOptions::default()
        }),
        limits: config.limits(),
        gate_timeout: Duration::from_millis(config.gate_timeout_ms),
        warm_workers: config.warm_workers,
        state_dir: Some(config.state_dir.clone()),
        worker_exe: None,
        jail: crate::fork::jail::Jail::for_node(
            config.jail_first_uid,
            config.jail_uids,
            config.cgroup_settings().as_ref(),
        )
        .context("preparing the worker cgroups")?,
        worker_start: config.worker_start,
    })?;
    let r = node.reconciled();
    tracing::info!(
        killed = r.killed,
        runtime_dirs = r.runtime_dirs,
        "node open"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cleave-daemon")
        .enable_all()
        .build()
        .context("starting the daemon's runtime")?;
    let api = Api {
        node: node.clone(),
        config: Arc::new(config),
        audit,
        rate: Arc::new(RateLimiter::new(1)),
        metrics: Arc::new(Metrics::new()),
    };
    let api = Api {
        rate: Arc::new(RateLimiter::new(api.config.requests_per_second)),
        ..api
    };
    let served = runtime.block_on(serve(api, socket.clone(), opts.metrics_listen));
    // Everything the runtime's tasks held is dropped with it; the node is torn down on
    // this plain thread (its network's DNS runtime must not be dropped inside another).
    runtime.shutdown_timeout(Duration::from_secs(5));
    node.shutdown();
    let _ = std::fs::remove_file(&socket);
    served
}

async fn serve(
    api: Api,
    socket: PathBuf,
    metrics_listen: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let listener = bind_socket(&socket)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = tokio::task::JoinSet::new();

    if let Some(addr) = metrics_listen {
        let l = metrics::bind(addr)
            .await
            .with_context(|| format!("listening for metrics on {addr}"))?;
        tracing::info!(%addr, "metrics, /healthz and /readyz");
        tasks.spawn(metrics::serve(
            l,
            api.node.clone(),
            api.metrics.clone(),
            stopped(stop_rx.clone()),
        ));
    }

    // The default template: created when missing, then loaded so its pool fills.
    if api.config.default_template {
        let a = api.clone();
        tokio::spawn(async move {
            let spec = TemplateSpec {
                mem_mib: a.config.default_template_mem_mib,
                ..TemplateSpec::new(TemplateName::default_name())
            };
            let node = a.node.clone();
            let r =
                api::blocking(move || node.ensure_template(&spec, (true, false), resolve_image))
                    .await;
            match r {
                Ok(Ok((_, created))) => {
                    a.metrics.template_ready.store(true, Ordering::Release);
                    tracing::info!(created, "default template loaded");
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "the default template cannot be loaded; /readyz stays unready")
                }
                Err(e) => tracing::error!(error = %e, "loading the default template"),
            }
        });
    } else {
        api.metrics.template_ready.store(true, Ordering::Release);
    }

    // TTLs, and sandboxes whose worker ended on its own.
    {
        let a = api.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let node = a.node.clone();
                let started = Instant::now();
                let reaped = api::blocking(move || {
                    let lost = node
                        .reap_lost()
                        .into_iter()
                        .map(|(id, _)| (id, "sandbox.lost"));
                    let expired = node
                        .reap_expired()
                        .into_iter()
                        .map(|id| (id, "sandbox.expire"));
                    lost.chain(expired).collect::<Vec<_>>()
                })
                .await;
                for (id, action) in reaped.unwrap_or_default() {
                    a.audit.write(&AuditRecord {
                        time: rfc3339(SystemTime::now()),
                        caller: "daemon",
                        action,
                        sandboxes: vec![id.to_string()],
                        template: None,
                        result: "ok",
                        duration_ms: started.elapsed().as_secs_f64() * 1e3,
                    });
                }
            }
        });
    }

    let max = api.config.max_message_bytes;
    let router = Server::builder()
        .add_service(
            TemplatesServer::new(api.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            SandboxesServer::new(api.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            ExecServer::new(api.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            FilesServer::new(api.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        );
    if let Some(tls) = api.config.tls.clone() {
        let tls_config = tls_config(&tls)?;
        let tcp = tokio::net::TcpListener::bind(tls.listen)
            .await
            .with_context(|| format!("listening on {} for mutual TLS", tls.listen))?;
        tracing::info!(addr = %tls.listen, "API on TCP, client certificates required");
        let server = Server::builder()
            .tls_config(tls_config)
            .context("configuring TLS")?
            .add_service(TemplatesServer::new(api.clone()).max_decoding_message_size(max))
            .add_service(SandboxesServer::new(api.clone()).max_decoding_message_size(max))
            .add_service(ExecServer::new(api.clone()).max_decoding_message_size(max))
            .add_service(FilesServer::new(api.clone()).max_decoding_message_size(max));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(tcp);
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move {
            server
                .serve_with_incoming_shutdown(incoming, stop)
                .await
                .map_err(std::io::Error::other)
        });
    }
    tracing::info!(socket = %socket.display(), "serving the cleave API");
    eprintln!("cleave daemon: serving on {}", socket.display());

    // SIGTERM/SIGINT: destroy every sandbox first (that ends every exec stream), then
    // stop the servers.
    let node = api.node.clone();
    let shutdown = async move {
        wait_for_signal().await;
        tracing::info!("stopping: destroying every sandbox");
        let _ = api::blocking(move || node.shutdown()).await;
        let _ = stop_tx.send(true);
    };
    router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("serving the API")?;
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn tls_config(tls: &config::TlsConfig) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let ca = tls
        .client_ca
        .as_ref()
        .context("[tls] needs client_ca: no TLS listener without client certificates")?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?))
        .client_ca_root(Certificate::from_pem(read(ca)?))
        .client_auth_optional(false))
}

fn private_dir(dir: &Path) -> anyhow::Result<()> {
    Ok(crate::host::paths::private_dir(dir)?)
}

fn exclusive(path: &Path) -> anyhow::Result<File> {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let locked = crate::host::lock::try_exclusive(&f)
        .with_context(|| format!("locking {}", path.display()))?;
    if !locked {
        anyhow::bail!(
            "another cleave daemon is running with this state directory ({} is locked); \
             stop it first",
            path.display()
        );
    }
    Ok(f)
}

/// Binds the API socket 0600 in a private directory. A stale socket file (no one
/// answering) is replaced; a live one means another daemon serves it.
fn bind_socket(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        private_dir(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{} is served by another process (another cleave daemon?); stop it or pass \
                 --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    l.set_nonblocking(true)?;
    Ok(tokio::net::UnixListener::from_std(l)?)
}
