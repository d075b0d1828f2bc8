//! Per-sandbox counters, for metrics and for tests to see what happened to
//! packets that got no reply.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Stats {
    pub queries: AtomicU64,
    pub answered: AtomicU64,
    pub cache_hits: AtomicU64,
    pub refused: AtomicU64,
    pub servfail: AtomicU64,
    pub dropped_malformed: AtomicU64,
    pub dropped_source: AtomicU64,
    pub dropped_rate: AtomicU64,
    pub dropped_busy: AtomicU64,
    pub tcp_closed_oversized: AtomicU64,
    pub blocked_addrs: AtomicU64,
    /// Allowed answer addresses dropped beyond the per-answer cap.
    pub capped_addrs: AtomicU64,
    pub pinned: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub queries: u64,
    pub answered: u64,
    pub cache_hits: u64,
    pub refused: u64,
    pub servfail: u64,
    pub dropped_malformed: u64,
    pub dropped_source: u64,
    pub dropped_rate: u64,
    pub dropped_busy: u64,
    pub tcp_closed_oversized: u64,
    pub blocked_addrs: u64,
    pub capped_addrs: u64,
    pub pinned: u64,
}

impl Stats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            queries: self.queries.load(Relaxed),
            answered: self.answered.load(Relaxed),
            cache_hits: self.cache_hits.load(Relaxed),
            refused: self.refused.load(Relaxed),
            servfail: self.servfail.load(Relaxed),
            dropped_malformed: self.dropped_malformed.load(Relaxed),
            dropped_source: self.dropped_source.load(Relaxed),
            dropped_rate: self.dropped_rate.load(Relaxed),
            dropped_busy: self.dropped_busy.load(Relaxed),
            tcp_closed_oversized: self.tcp_closed_oversized.load(Relaxed),
            blocked_addrs: self.blocked_addrs.load(Relaxed),
            capped_addrs: self.capped_addrs.load(Relaxed),
            pinned: self.pinned.load(Relaxed),
        }
    }
}

impl std::ops::AddAssign for StatsSnapshot {
    fn add_assign(&mut self, o: StatsSnapshot) {
        self.queries += o.queries;
        self.answered += o.answered;
        self.cache_hits += o.cache_hits;
        self.refused += o.refused;
        self.servfail += o.servfail;
        self.dropped_malformed += o.dropped_malformed;
        self.dropped_source += o.dropped_source;
        self.dropped_rate += o.dropped_rate;
        self.dropped_busy += o.dropped_busy;
        self.tcp_closed_oversized += o.tcp_closed_oversized;
        self.blocked_addrs += o.blocked_addrs;
        self.capped_addrs += o.capped_addrs;
        self.pinned += o.pinned;
    }
}
