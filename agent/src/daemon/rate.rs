//! Per-caller request rate: one token bucket per caller (uid or certificate), the same
//! bucket the DNS proxy uses per sandbox (`cleave_dnsproxy::rate::TokenBucket`), refilled
//! at the configured rate with a burst of twice that. The table is bounded: callers idle
//! long enough to have a full bucket again are forgotten when it grows.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cleave_dnsproxy::rate::TokenBucket;

const MAX_CALLERS: usize = 4096;

pub struct RateLimiter {
    per_second: u32,
    /// How long an idle bucket takes to fill up again (then forgetting it loses nothing).
    refill: Duration,
    buckets: Mutex<HashMap<String, (TokenBucket, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        let per_second = per_second.max(1);
        RateLimiter {
            per_second,
            refill: Duration::from_secs(2),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `caller`'s bucket; `false` when it is empty.
    pub fn allow(&self, caller: &str) -> bool {
        self.allow_at(caller, Instant::now())
    }

    fn allow_at(&self, caller: &str, now: Instant) -> bool {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() >= MAX_CALLERS && !b.contains_key(caller) {
            let refill = self.refill;
            b.retain(|_, (_, seen)| now.saturating_duration_since(*seen) < refill);
        }
        let rate = self.per_second;
        let (bucket, seen) = b
            .entry(caller.to_string())
            .or_insert_with(|| (TokenBucket::new(rate, rate.saturating_mul(2), now), now));
        *seen = now;
        bucket.allow(now)
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate_per_caller() {
        let r = RateLimiter::new(5);
        let t = Instant::now();
        let allowed = (0..20).filter(|_| r.allow_at("uid:1", t)).count();
        assert_eq!(allowed, 10, "a burst of twice the rate");
        assert!(r.allow_at("uid:2", t), "callers have their own buckets");
        assert!(!r.allow_at("uid:1", t + Duration::from_millis(100)));
        assert!(r.allow_at("uid:1", t + Duration::from_millis(250)));
    }

    #[test]
    fn the_caller_table_is_bounded() {
        let r = RateLimiter::new(1);
        let t = Instant::now();
        for i in 0..MAX_CALLERS * 2 {
            r.allow_at(&format!("uid:{i}"), t + Duration::from_secs(10 * i as u64));
        }
        assert!(r.buckets.lock().unwrap().len() <= MAX_CALLERS + 1);
    }
}
