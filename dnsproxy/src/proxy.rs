//! The node-wide proxy: shared upstream settings, one resolver per sandbox.

use crate::handler::{SandboxHandler, TtlBounds};
use crate::pin::Pinner;
use crate::policy::{Policy, PolicyError, PolicySpec};
use crate::server::{serve, Limits, SandboxNet, SandboxServer};
use crate::upstream::{Upstream, UpstreamConfig};
use std::sync::Arc;
use std::time::Duration;

/// Settings shared by every sandbox on the node.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub upstream: UpstreamConfig,
    /// Pin lifetime bounds; a record's TTL is clamped into them.
    pub pin_ttl: TtlBounds,
    /// Answers cached per sandbox.
    pub cache_entries: usize,
    pub limits: Limits,
}

impl ProxyConfig {
    /// Defaults for everything but the upstream servers.
    pub fn with_upstreams(servers: Vec<std::net::SocketAddr>) -> Self {
        Self {
            upstream: UpstreamConfig {
                servers,
                timeout: Duration::from_secs(2),
                attempts: 2,
            },
            pin_ttl: TtlBounds {
                min: Duration::from_secs(30),
                max: Duration::from_secs(3600),
            },
            cache_entries: 1024,
            limits: Limits::default(),
        }
    }
}

/// Creating a sandbox resolver failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("sandbox {sandbox}: {source}")]
    Policy {
        sandbox: String,
        source: PolicyError,
    },
    #[error("sandbox {sandbox}: no guest addresses given; the resolver would answer nobody")]
    NoGuest { sandbox: String },
    #[error("sandbox {sandbox}: cannot listen on {listen}: {source}")]
    Listen {
        sandbox: String,
        listen: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// The proxy for all sandboxes of a node.
pub struct DnsProxy {
    cfg: ProxyConfig,
    upstream: Arc<Upstream>,
}

impl DnsProxy {
    pub fn new(cfg: ProxyConfig) -> Self {
        let upstream = Arc::new(Upstream::new(cfg.upstream.clone()));
        Self { cfg, upstream }
    }

    /// Validates the sandbox's policy and starts its resolver (on the current
    /// tokio runtime). Pins go through `pinner`, which must be bound to this
    /// sandbox. Dropping the returned server stops it and forgets its cache.
    pub async fn add_sandbox(
        &self,
        sandbox: &str,
        spec: &PolicySpec,
        net: &SandboxNet,
        pinner: Arc<dyn Pinner>,
    ) -> Result<SandboxServer, ProxyError> {
        let policy = Policy::load(spec).map_err(|source| ProxyError::Policy {
            sandbox: sandbox.to_string(),
            source,
        })?;
        if net.guest.is_empty() {
            return Err(ProxyError::NoGuest {
                sandbox: sandbox.to_string(),
            });
        }
        let handler = Arc::new(SandboxHandler::new(
            sandbox,
            policy,
            pinner,
            self.upstream.clone(),
            self.cfg.pin_ttl,
            self.cfg.cache_entries,
        ));
        // The address was this slot's previous sandbox's, whose sockets are closed
        // before the slot is reused; but a process the node was starting at that moment
        // (between its fork and its exec) may still hold a copy for a few milliseconds.
        let mut waited = Duration::ZERO;
        loop {
            match serve(handler.clone(), net, self.cfg.limits).await {
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && waited < BIND_PATIENCE => {
                    tokio::time::sleep(BIND_RETRY).await;
                    waited += BIND_RETRY;
                }
                r => {
                    return r.map_err(|source| ProxyError::Listen {
                        sandbox: sandbox.to_string(),
                        listen: net.listen,
                        source,
                    })
                }
            }
        }
    }
}

/// How long a listener waits for its address to be let go of, and how often it tries.
const BIND_PATIENCE: Duration = Duration::from_secs(1);
const BIND_RETRY: Duration = Duration::from_millis(5);
