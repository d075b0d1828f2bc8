//! DNS from both directions: a guest's query as the proxy parses it, and an upstream
//! answer as the proxy follows its CNAME chain and reads addresses out of it.
#![no_main]

use cleave_dnsproxy::answer::{address, follow};
use cleave_dnsproxy::query::{parse, Parsed};
use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Parsed::Query(q) | Parsed::Reject(q, _) = parse(data) {
        let _ = q.query.name().to_ascii();
    }
    if let Ok(msg) = Message::from_vec(data) {
        if let Some(question) = msg.queries.first() {
            let followed = follow(question.name(), question.query_type(), &msg.answers, 16);
            for r in followed.addrs.iter().chain(&followed.chain) {
                let _ = address(r);
            }
        }
    }
});
