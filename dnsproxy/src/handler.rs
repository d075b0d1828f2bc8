//! One sandbox's request handler: decide, pin, then answer.
//!
//! `prepare` does everything that needs no upstream (parse, policy, cache)
//! and `resolve` the rest (upstream, pin filter, pin, answer). A handler is
//! bound to one sandbox: its policy, its cache and its pinner; the server
//! picks the handler by the listener a packet arrived on.

use crate::answer::address;
use crate::cache::Cache;
use crate::pin::Pinner;
use crate::pin_filter::Decision;
use crate::policy::Policy;
use crate::query::{parse, GuestQuery, Parsed};
use crate::stats::Stats;
use crate::upstream::Upstream;
use hickory_proto::op::{Edns, Message, OpCode, ResponseCode};
use hickory_proto::rr::Record;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Our advertised UDP payload size to the guest.
const EDNS_PAYLOAD: u16 = 1232;
/// Most addresses one answer may pin (and return); the rest are dropped from it. With
/// at most [`crate::policy::MAX_PORTS`] ports per name this bounds one pin batch.
pub const MAX_ADDRS_PER_ANSWER: usize = 16;

/// Bounds on pin lifetime; the TTL the guest sees never exceeds the pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtlBounds {
    pub min: Duration,
    pub max: Duration,
}

impl TtlBounds {
    fn clamp(&self, ttl: u32) -> Duration {
        let max = self.max.max(self.min);
        Duration::from_secs(u64::from(ttl)).clamp(self.min, max)
    }
}

/// How the reply travels: it bounds the reply size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do after looking at a packet.
#[derive(Debug)]
pub enum Step {
    /// Send nothing.
    Drop,
    /// Send these bytes.
    Reply(Vec<u8>),
    /// Ask upstream, then pin with these ports.
    Resolve(GuestQuery, Vec<u16>),
}

/// Everything one sandbox's queries are answered with.
pub struct SandboxHandler {
    sandbox: Arc<str>,
    policy: Policy,
    pinner: Arc<dyn Pinner>,
    upstream: Arc<Upstream>,
    ttl: TtlBounds,
    cache: Mutex<Cache>,
    stats: Arc<Stats>,
}

impl SandboxHandler {
    pub fn new(
        sandbox: &str,
        policy: Policy,
        pinner: Arc<dyn Pinner>,
        upstream: Arc<Upstream>,
        ttl: TtlBounds,
        cache_entries: usize,
    ) -> Self {
        Self {
            sandbox: sandbox.into(),
            policy,
            pinner,
            upstream,
            ttl,
            cache: Mutex::new(Cache::new(cache_entries)),
            stats: Arc::new(Stats::default()),
        }
    }

    pub fn sandbox(&self) -> &str {
        &self.sandbox
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Answers a packet completely: [`prepare`](Self::prepare) then, if
    /// needed, [`resolve`](Self::resolve). `None` means drop.
    pub async fn handle(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        match self.prepare(packet, transport) {
            Step::Drop => None,
            Step::Reply(r) => Some(r),
            Step::Resolve(q, ports) => Some(self.resolve(q, ports, transport).await),
        }
    }

    /// Parses, applies the policy and the cache.
    pub fn prepare(&self, packet: &[u8], transport: Transport) -> Step {
        Stats::bump(&self.stats.queries);
        let q = match parse(packet) {
            Parsed::Drop => {
                Stats::bump(&self.stats.dropped_malformed);
                return Step::Drop;
            }
            Parsed::Reject(q, rcode) => {
                Stats::bump(&self.stats.refused);
                return Step::Reply(encode(&q, rcode, Vec::new(), transport));
            }
            Parsed::Query(q) => q,
        };
        let name = q.query.name();
        let Some(ports) = self.policy.ports_for(&name.to_ascii()) else {
            info!(sandbox = %self.sandbox, %name, "name not in policy: REFUSED");
            Stats::bump(&self.stats.refused);
            return Step::Reply(encode(&q, ResponseCode::Refused, Vec::new(), transport));
        };
        let hit = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(
            name,
            q.query.query_type(),
            Instant::now(),
        );
        if let Some((rcode, records)) = hit {
            Stats::bump(&self.stats.cache_hits);
            Stats::bump(&self.stats.answered);
            return Step::Reply(encode(&q, rcode, records, transport));
        }
        Step::Resolve(q, ports)
    }

    /// Asks upstream, filters, pins, answers. Never returns an address that
    /// is not pinned: any failure is SERVFAIL.
    pub async fn resolve(&self, q: GuestQuery, ports: Vec<u16>, transport: Transport) -> Vec<u8> {
        let name = q.query.name().clone();
        let qtype = q.query.query_type();
        let resolved = match self.upstream.resolve(&name, qtype).await {
            Ok(r) => r,
            Err(e) => {
                warn!(sandbox = %self.sandbox, error = %e, "upstream failed: SERVFAIL");
                Stats::bump(&self.stats.servfail);
                return encode(&q, ResponseCode::ServFail, Vec::new(), transport);
            }
        };

        let mut kept = Vec::with_capacity(resolved.addrs.len());
        let mut pins = Vec::with_capacity(resolved.addrs.len() * ports.len());
        for r in resolved.addrs {
            let Some(ip) = address(&r) else { continue };
            match self.policy.filter.judge(ip) {
                Decision::Allow(_) if kept.len() >= MAX_ADDRS_PER_ANSWER => {
                    Stats::bump(&self.stats.capped_addrs);
                }
                Decision::Allow(_) => {
                    pins.extend(ports.iter().map(|&p| (ip, p)));
                    kept.push(r);
                }
                Decision::Block(reason) => {
                    info!(sandbox = %self.sandbox, %name, addr = %ip, %reason, "answer address blocked");
                    Stats::bump(&self.stats.blocked_addrs);
                }
            }
        }

        let shortest = resolved.chain.iter().chain(&kept).map(|r| r.ttl).min();
        let pin_ttl = self.ttl.clamp(shortest.unwrap_or(0));
        let pinned_at = Instant::now();
        if !pins.is_empty() {
            // Pinning is a blocking netlink round trip under the firewall's lock: keep it
            // off the runtime's worker threads.
            let pinner = self.pinner.clone();
            let batch = pins.clone();
            let pinned = tokio::task::spawn_blocking(move || pinner.pin(&batch, pin_ttl)).await;
            let failed = match pinned {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("the pin task failed: {e}")),
            };
            if let Some(e) = failed {
                warn!(sandbox = %self.sandbox, %name, error = %e, "pin failed: SERVFAIL");
                Stats::bump(&self.stats.servfail);
                return encode(&q, ResponseCode::ServFail, Vec::new(), transport);
            }
            self.stats
                .pinned
                .fetch_add(pins.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }

        let cap = u32::try_from(pin_ttl.as_secs()).unwrap_or(u32::MAX);
        let records: Vec<Record> = resolved
            .chain
            .into_iter()
            .chain(kept)
            .map(|mut r| {
                r.ttl = r.ttl.min(cap);
                r
            })
            .collect();
        // Answers without pins (NXDOMAIN, NODATA, everything stripped) are
        // kept for the minimum pin lifetime so they are not re-asked per query.
        let lifetime = match records.iter().map(|r| r.ttl).min() {
            Some(t) if !pins.is_empty() => Duration::from_secs(u64::from(t)),
            _ => self.ttl.min,
        };
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(
            &name,
            qtype,
            resolved.rcode,
            records.clone(),
            pinned_at,
            lifetime,
        );
        Stats::bump(&self.stats.answered);
        encode(&q, resolved.rcode, records, transport)
    }
}

/// Builds and encodes the reply, truncating (TC) if it does not fit the
/// guest's UDP payload size.
fn encode(
    q: &GuestQuery,
    rcode: ResponseCode,
    answers: Vec<Record>,
    transport: Transport,
) -> Vec<u8> {
    let mut m = Message::response(q.id, OpCode::Query);
    m.metadata.recursion_desired = q.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.response_code = rcode;
    m.add_query(q.query.clone());
    m.add_answers(answers);
    if q.edns_payload.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        m.set_edns(edns);
    }
    let limit = match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => usize::from(q.edns_payload.unwrap_or(512).clamp(512, EDNS_PAYLOAD)),
    };
    match m.to_vec() {
        Ok(bytes) if bytes.len() <= limit => bytes,
        // Too big, or unencodable (cannot happen for records we parsed):
        // send the question with TC set; the guest retries over TCP.
        _ => m.truncate().to_vec().unwrap_or_default(),
    }
}
