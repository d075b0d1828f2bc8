//! `/metrics` (Prometheus text), `/healthz` and `/readyz` on the `--metrics-listen`
//! address. Metric names are prefixed `cleave_`. Nothing served here is secret: no ids
//! beyond template names, no tokens.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use cleave_dnsproxy::StatsSnapshot;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::node::Node;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Request {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Pool {
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Decision {
    decision: String,
}

pub struct Metrics {
    registry: Registry,
    fork_latency: Histogram,
    gate_failures: Family<Reason, Counter>,
    fork_failures: Counter,
    requests: Family<Request, Counter>,
    live: Gauge,
    pools: Family<Pool, Gauge>,
    dns_queries: Family<Decision, Counter>,
    dns_addresses: Family<Decision, Counter>,
    dns_seen: Mutex<StatsSnapshot>,
    /// The default template is loaded (set once).
    pub template_ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cleave");
        let fork_latency = Histogram::new(exponential_buckets(0.000_25, 2.0, 18));
        let m = Metrics {
            fork_latency,
            gate_failures: Family::default(),
            fork_failures: Counter::default(),
            requests: Family::default(),
            live: Gauge::default(),
            pools: Family::default(),
            dns_queries: Family::default(),
            dns_addresses: Family::default(),
            dns_seen: Mutex::new(StatsSnapshot::default()),
            template_ready: AtomicBool::new(false),
            registry: Registry::default(),
        };
        registry.register(
            "fork_latency_seconds",
            "Fork request to sandbox ready (reseeded, network applied)",
            m.fork_latency.clone(),
        );
        registry.register(
            "gate_failures",
            "Forks the reseed gate refused, by reason",
            m.gate_failures.clone(),
        );
        registry.register(
            "fork_failures",
            "Forks that did not become sandboxes (any reason)",
            m.fork_failures.clone(),
        );
        registry.register(
            "api_requests",
            "API requests by method and gRPC code",
            m.requests.clone(),
        );
        registry.register("sandboxes_live", "Live sandboxes", m.live.clone());
        registry.register(
            "pool_depth",
            "Ready items per pool (warm workers per template, network slots)",
            m.pools.clone(),
        );
        registry.register(
            "dns_queries",
            "DNS queries by what the proxies decided",
            m.dns_queries.clone(),
        );
        registry.register(
            "dns_answer_addresses",
            "DNS answer addresses: pinned, or dropped (blocked range, per-answer cap)",
            m.dns_addresses.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn fork_ok(&self, d: Duration) {
        self.fork_latency.observe(d.as_secs_f64());
    }

    pub fn fork_failed(&self, gate_reason: Option<&str>) {
        self.fork_failures.inc();
        if let Some(r) = gate_reason {
            self.gate_failures
                .get_or_create(&Reason { reason: r.into() })
                .inc();
        }
    }

    pub fn request(&self, method: &str, code: tonic::Code) {
        self.requests
            .get_or_create(&Request {
                method: method.into(),
                code: code_name(code).into(),
            })
            .inc();
    }

    /// Reads the node's gauges and counters into the registry and encodes it.
    pub fn render(&self, node: &Node) -> String {
        self.live.set(node.list().len() as i64);
        for (t, depth) in node.pool_depths() {
            self.pools
                .get_or_create(&Pool {
                    pool: format!("workers/{t}"),
                })
                .set(depth as i64);
        }
        if let Some(net) = node.net() {
            self.pools
                .get_or_create(&Pool {
                    pool: "network_slots".into(),
                })
                .set(net.pool_depth() as i64);
        }
        self.dns(node.dns_stats());
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counters advance by what the node-wide totals grew since the last scrape.
    fn dns(&self, now: StatsSnapshot) {
        let mut seen = self.dns_seen.lock().unwrap_or_else(|p| p.into_inner());
        let q = |d: &str| {
            self.dns_queries
                .get_or_create(&Decision { decision: d.into() })
                .clone()
        };
        let a = |d: &str| {
            self.dns_addresses
                .get_or_create(&Decision { decision: d.into() })
                .clone()
        };
        let rows: [(Counter, u64, u64); 11] = [
            (q("answered"), now.answered, seen.answered),
            (q("cache_hit"), now.cache_hits, seen.cache_hits),
            (q("refused"), now.refused, seen.refused),
            (q("servfail"), now.servfail, seen.servfail),
            (
                q("dropped_malformed"),
                now.dropped_malformed,
                seen.dropped_malformed,
            ),
            (q("dropped_source"), now.dropped_source, seen.dropped_source),
            (q("dropped_rate"), now.dropped_rate, seen.dropped_rate),
            (q("dropped_busy"), now.dropped_busy, seen.dropped_busy),
            (a("pinned"), now.pinned, seen.pinned),
            (a("blocked"), now.blocked_addrs, seen.blocked_addrs),
            (a("capped"), now.capped_addrs, seen.capped_addrs),
        ];
        for (c, now, before) in rows {
            c.inc_by(now.saturating_sub(before));
        }
        // Never backwards: a total read mid-teardown may briefly miss a sandbox.
        let max = |a: u64, b: u64| a.max(b);
        *seen = StatsSnapshot {
            queries: max(seen.queries, now.queries),
            answered: max(seen.answered, now.answered),
            cache_hits: max(seen.cache_hits, now.cache_hits),
            refused: max(seen.refused, now.refused),
            servfail: max(seen.servfail, now.servfail),
            dropped_malformed: max(seen.dropped_malformed, now.dropped_malformed),
            dropped_source: max(seen.dropped_source, now.dropped_source),
            dropped_rate: max(seen.dropped_rate, now.dropped_rate),
            dropped_busy: max(seen.dropped_busy, now.dropped_busy),
            tcp_closed_oversized: max(seen.tcp_closed_oversized, now.tcp_closed_oversized),
            blocked_addrs: max(seen.blocked_addrs, now.blocked_addrs),
            capped_addrs: max(seen.capped_addrs, now.capped_addrs),
            pinned: max(seen.pinned, now.pinned),
        };
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

#[derive(Clone)]
struct HttpState {
    node: Arc<Node>,
    metrics: Arc<Metrics>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Arc<Node>,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(HttpState { node, metrics });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn render(
    State(s): State<HttpState>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    let body = tokio::task::spawn_blocking(move || s.metrics.render(&s.node))
        .await
        .unwrap_or_default();
    (
        StatusCode::OK,
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

async fn ready(State(s): State<HttpState>) -> (StatusCode, String) {
    if !s.metrics.template_ready.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the default template is not loaded yet\n".into(),
        );
    }
    if !s.node.pools_warm() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the warm pools are filling\n".into(),
        );
    }
    (StatusCode::OK, "ready\n".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_encodes_prefixed_names() {
        let m = Metrics::new();
        m.fork_ok(Duration::from_micros(700));
        m.fork_failed(Some("timeout"));
        m.request("sandbox.create", tonic::Code::ResourceExhausted);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        assert!(out.contains("cleave_fork_latency_seconds_bucket"), "{out}");
        assert!(
            out.contains("cleave_gate_failures_total{reason=\"timeout\"} 1"),
            "{out}"
        );
        assert!(
            out.contains(
                "cleave_api_requests_total{method=\"sandbox.create\",code=\"resource_exhausted\"} 1"
            ),
            "{out}"
        );
    }

    #[test]
    fn dns_counters_follow_totals_and_never_go_back() {
        let m = Metrics::new();
        let snap = |pinned| StatsSnapshot {
            pinned,
            ..StatsSnapshot::default()
        };
        m.dns(snap(5));
        m.dns(snap(3));
        m.dns(snap(7));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        assert!(
            out.contains("cleave_dns_answer_addresses_total{decision=\"pinned\"} 7"),
            "{out}"
        );
    }
}
