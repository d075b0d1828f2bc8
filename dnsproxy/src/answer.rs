//! Reading an upstream answer: the CNAME chain from the asked name and the
//! address records at its end. Records not on that chain are ignored, so an
//! upstream cannot slip in addresses for other names.

use hickory_proto::rr::{Name, RData, Record, RecordType};

/// Longest CNAME chain followed, across all upstream queries for one question.
pub const MAX_CHAIN: usize = 8;

/// What one upstream answer section says about `name`.
#[derive(Debug, Default)]
pub struct Followed {
    /// CNAME records, in chain order.
    pub chain: Vec<Record>,
    /// The name the chain ends at.
    pub target: Option<Name>,
    /// Records of the asked type owned by the target.
    pub addrs: Vec<Record>,
}

/// Follows CNAMEs from `name` through `answers` (at most `budget` hops) and
/// collects the `qtype` records at the end.
pub fn follow(name: &Name, qtype: RecordType, answers: &[Record], budget: usize) -> Followed {
    let mut out = Followed::default();
    let mut current = name.clone();
    while out.chain.len() < budget {
        let next = answers.iter().find_map(|r| match &r.data {
            RData::CNAME(c) if r.name == current => Some((r, c.0.clone())),
            _ => None,
        });
        let Some((record, target)) = next else { break };
        out.chain.push(record.clone());
        current = target;
    }
    out.addrs = answers
        .iter()
        .filter(|r| r.name == current && r.record_type() == qtype)
        .cloned()
        .collect();
    out.target = Some(current);
    out
}

/// The address a record carries, if it is an A or AAAA record.
pub fn address(r: &Record) -> Option<std::net::IpAddr> {
    match &r.data {
        RData::A(a) => Some(a.0.into()),
        RData::AAAA(a) => Some(a.0.into()),
        _ => None,
    }
}
