//! Reading an nftables set back with `nft -j list set` inside a namespace.

#![allow(dead_code)]

use cleave_netfilter::testutil::NetNs;
use serde_json::Value;

/// One element of a pin set: address, port, timeout in seconds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Elem {
    pub addr: String,
    pub port: u64,
    pub timeout_s: Option<u64>,
}

/// The elements of `inet cleave <set>` in `ns`.
pub fn set_elems(ns: &NetNs, set: &str) -> Vec<Elem> {
    let out = ns
        .exec_ok("nft", &["-j", "list", "set", "inet", "cleave", set])
        .expect("nft -j list set");
    let v: Value = serde_json::from_slice(&out.stdout).expect("nft JSON");
    let mut elems = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(list) = item["set"]["elem"].as_array() else {
            continue;
        };
        for e in list {
            // Either {"concat": [...]} or, with a timeout,
            // {"elem": {"val": {"concat": [...]}, "timeout": N, ...}}.
            let (val, timeout) = match e.get("elem") {
                Some(inner) => (&inner["val"], inner["timeout"].as_u64()),
                None => (e, None),
            };
            let c = val["concat"].as_array().expect("concat element");
            elems.push(Elem {
                addr: c[0].as_str().expect("address").to_string(),
                port: c[1].as_u64().expect("port"),
                timeout_s: timeout,
            });
        }
    }
    elems.sort();
    elems
}
