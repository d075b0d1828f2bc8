//! Rebuilds every sandbox's [`Footprint`] from the kernel's table, so
//! teardown and reconcile work after a crash, when the agent remembers
//! nothing.

use std::collections::BTreeMap;
use std::io;

use crate::names::{base, parse_owner, Namespace, ObjectNames, TapName};
use crate::nl::dump;
use crate::nl::socket::Netlink;
use crate::plan::{Footprint, KeyType};

fn group(groups: &mut BTreeMap<TapName, Footprint>, tap: TapName) -> &mut Footprint {
    groups.entry(tap.clone()).or_insert_with(|| Footprint {
        tap,
        owner: None,
        chains: Vec::new(),
        sets: Vec::new(),
        counters: Vec::new(),
        elems: Vec::new(),
    })
}

/// Every per-sandbox object in the table, grouped by the tap its name
/// derives from. The owner comes from the chains' comments; a group with
/// no readable owner comment has `owner: None` (and is a leftover).
pub(crate) fn discover(nl: &mut Netlink) -> io::Result<Vec<Footprint>> {
    if !dump::table_exists(nl)? {
        return Ok(Vec::new());
    }
    let mut groups = BTreeMap::new();
    for c in dump::chains(nl)? {
        if let Some((_, tap)) = ObjectNames::parse(Namespace::Chain, &c.name) {
            let fp = group(&mut groups, tap);
            if fp.owner.is_none() {
                fp.owner = c.comment.as_deref().and_then(parse_owner);
            }
            fp.chains.push(c.name);
        }
    }
    for name in dump::sets(nl)? {
        if let Some((_, tap)) = ObjectNames::parse(Namespace::Set, &name) {
            group(&mut groups, tap).sets.push(name);
        }
    }
    for name in dump::counters(nl)? {
        if let Some((_, tap)) = ObjectNames::parse(Namespace::Counter, &name) {
            group(&mut groups, tap).counters.push(name);
        }
    }
    for (map, key_type) in [
        (base::FWD_MAP, KeyType::IfName),
        (base::IN_MAP, KeyType::IfName),
        (base::TO_MAP, KeyType::IfName),
        (base::NAT4_MAP, KeyType::Ipv4),
        (base::NAT6_MAP, KeyType::Ipv6),
    ] {
        for (key, chain) in dump::map_entries(nl, map)? {
            let tap = chain
                .as_deref()
                .and_then(|c| ObjectNames::parse(Namespace::Chain, c))
                .map(|(_, tap)| tap);
            if let Some(tap) = tap {
                group(&mut groups, tap).elems.push((map, key_type, key));
            }
        }
    }
    Ok(groups.into_values().collect())
}
