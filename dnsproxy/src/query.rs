//! Parsing a guest's query: the one place guest DNS bytes are read.
//!
//! Everything past `parse` holds a validated [`GuestQuery`].

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, RecordType};

/// Largest query accepted on UDP or TCP. A query is a header, one question
/// (≤ 259 bytes) and an OPT record; anything bigger is not a query a stub
/// resolver sends.
pub const MAX_QUERY_LEN: usize = 1024;

/// A well-formed query for one question.
#[derive(Clone, Debug)]
pub struct GuestQuery {
    pub id: u16,
    pub query: Query,
    pub recursion_desired: bool,
    /// The guest's advertised UDP payload size, if it sent EDNS.
    pub edns_payload: Option<u16>,
}

/// What to do with a packet from the guest.
#[derive(Debug)]
pub enum Parsed {
    /// Malformed (or not a query): drop without a reply.
    Drop,
    /// Well-formed but not something we serve: reply with this code.
    Reject(GuestQuery, ResponseCode),
    /// A query for one IN-class question.
    Query(GuestQuery),
}

/// Parses and validates one packet.
pub fn parse(bytes: &[u8]) -> Parsed {
    if bytes.len() < 12 || bytes.len() > MAX_QUERY_LEN {
        return Parsed::Drop;
    }
    let Ok(msg) = Message::from_vec(bytes) else {
        return Parsed::Drop;
    };
    // Responses are dropped so that no packet can start a reply loop.
    if msg.metadata.message_type != MessageType::Query
        || msg.queries.len() != 1
        || !msg.answers.is_empty()
        || !msg.authorities.is_empty()
    {
        return Parsed::Drop;
    }
    let q = GuestQuery {
        id: msg.metadata.id,
        query: msg.queries[0].clone(),
        recursion_desired: msg.metadata.recursion_desired,
        edns_payload: msg.edns.as_ref().map(|e| e.max_payload()),
    };
    if msg.metadata.op_code != OpCode::Query {
        return Parsed::Reject(q, ResponseCode::NotImp);
    }
    if q.query.query_class() != DNSClass::IN {
        return Parsed::Reject(q, ResponseCode::Refused);
    }
    // Only address queries are forwarded. Every other type can carry
    // addresses the guest could use (SVCB/HTTPS ipv4hint, SRV/MX targets with
    // glue, TXT payloads) that never pass the pin filter, and the firewall
    // only opens what was pinned; answering them would either leak
    // unfiltered addresses or promise reachability that does not exist.
    if !matches!(q.query.query_type(), RecordType::A | RecordType::AAAA) {
        return Parsed::Reject(q, ResponseCode::Refused);
    }
    Parsed::Query(q)
}
