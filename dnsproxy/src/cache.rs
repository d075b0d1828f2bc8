//! The answer cache of one sandbox.
//!
//! Each sandbox's resolver owns its cache, so a lookup by one sandbox can
//! never be answered from (or pin because of) another's. An entry holds the
//! filtered answer as sent to the guest and lives no longer than the
//! shortest TTL in it, which is never longer than its pins: a hit never hands
//! out an address whose pin has lapsed.

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, Record, RecordType};
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Entry {
    rcode: ResponseCode,
    records: Vec<Record>,
    stored: Instant,
    expires: Instant,
}

/// A bounded map from question to filtered answer.
#[derive(Debug)]
pub struct Cache {
    map: HashMap<(Name, RecordType), Entry>,
    capacity: usize,
}

impl Cache {
    pub fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            capacity,
        }
    }

    /// The cached answer with TTLs counted down, if still fresh.
    pub fn get(
        &mut self,
        name: &Name,
        qtype: RecordType,
        now: Instant,
    ) -> Option<(ResponseCode, Vec<Record>)> {
        let key = (name.clone(), qtype);
        let e = self.map.get(&key)?;
        if now >= e.expires {
            self.map.remove(&key);
            return None;
        }
        // Round the age up so a counted-down TTL never outlives the entry.
        let age = now.duration_since(e.stored);
        let age =
            u32::try_from(age.as_secs() + u64::from(age.subsec_nanos() > 0)).unwrap_or(u32::MAX);
        let records = e
            .records
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.ttl = r.ttl.saturating_sub(age);
                r
            })
            .collect();
        Some((e.rcode, records))
    }

    /// Stores an answer for `lifetime` from `stored` (the moment its pins
    /// were made, so the entry never outlives them).
    pub fn insert(
        &mut self,
        name: &Name,
        qtype: RecordType,
        rcode: ResponseCode,
        records: Vec<Record>,
        stored: Instant,
        lifetime: Duration,
    ) {
        if lifetime.is_zero() || self.capacity == 0 {
            return;
        }
        if self.map.len() >= self.capacity {
            let now = Instant::now();
            self.map.retain(|_, e| e.expires > now);
            if self.map.len() >= self.capacity {
                // Still full of live entries: make room by dropping any one.
                if let Some(k) = self.map.keys().next().cloned() {
                    self.map.remove(&k);
                }
            }
        }
        self.map.insert(
            (name.clone(), qtype),
            Entry {
                rcode,
                records,
                stored,
                expires: stored + lifetime,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::RData;

    fn rec(ttl: u32) -> Record {
        Record::from_rdata(
            Name::from_ascii("a.example.com.").unwrap(),
            ttl,
            RData::A(A::new(192, 0, 2, 1)),
        )
    }

    #[test]
    fn ttl_counts_down_and_entry_expires() {
        let mut c = Cache::new(4);
        let t0 = Instant::now();
        let name = Name::from_ascii("A.Example.com.").unwrap();
        c.insert(
            &name,
            RecordType::A,
            ResponseCode::NoError,
            vec![rec(10)],
            t0,
            Duration::from_secs(10),
        );
        let lower = Name::from_ascii("a.example.com.").unwrap();
        let (_, r) = c
            .get(&lower, RecordType::A, t0 + Duration::from_millis(2500))
            .unwrap();
        assert_eq!(r[0].ttl, 7);
        assert!(c.get(&lower, RecordType::AAAA, t0).is_none());
        assert!(c
            .get(&lower, RecordType::A, t0 + Duration::from_secs(10))
            .is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn bounded_and_zero_lifetime_not_stored() {
        let mut c = Cache::new(2);
        let t0 = Instant::now();
        for i in 0..5 {
            let n = Name::from_ascii(format!("n{i}.example.com.")).unwrap();
            c.insert(
                &n,
                RecordType::A,
                ResponseCode::NoError,
                vec![rec(60)],
                t0,
                Duration::from_secs(60),
            );
        }
        assert_eq!(c.len(), 2);
        let n = Name::from_ascii("zero.example.com.").unwrap();
        let mut c = Cache::new(2);
        c.insert(
            &n,
            RecordType::A,
            ResponseCode::NoError,
            vec![rec(0)],
            t0,
            Duration::ZERO,
        );
        assert!(c.is_empty());
    }
}
