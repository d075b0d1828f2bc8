//! A fake authoritative DNS server on a loopback (or test namespace) address,
//! for tests and the benchmark. It answers from an in-memory zone, counts the
//! queries it gets, and can be told to fail. It never forwards anything.

#![allow(dead_code)] // each test binary uses a different part

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// How the server behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Answer = 0,
    ServFail = 1,
    Silent = 2,
}

#[derive(Default)]
struct Zone {
    records: HashMap<(Name, RecordType), Vec<Record>>,
    cnames: HashMap<Name, Record>,
    /// Suffix → A address for any name under it (benchmark names).
    wildcard_a: Vec<(Name, std::net::Ipv4Addr, u32)>,
    /// Suffix → a distinct public A address per name (benchmark names).
    wildcard_spread: Vec<(Name, u32)>,
    /// Leave CNAME targets out of answers, so the proxy must ask again.
    split_cnames: bool,
}

struct State {
    zone: RwLock<Zone>,
    queries: AtomicU64,
    mode: AtomicU8,
    stop: AtomicBool,
}

pub struct FakeUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    threads: Vec<JoinHandle<()>>,
}

fn name(s: &str) -> Name {
    let mut n = Name::from_ascii(s).expect("test name");
    n.set_fqdn(true);
    n
}

impl FakeUpstream {
    /// Listens on `ip` (UDP and TCP, same ephemeral port).
    pub fn start(ip: IpAddr) -> Self {
        let udp = UdpSocket::bind(SocketAddr::new(ip, 0)).expect("bind fake upstream udp");
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).expect("bind fake upstream tcp");
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        let state = Arc::new(State {
            zone: RwLock::new(Zone::default()),
            queries: AtomicU64::new(0),
            mode: AtomicU8::new(Mode::Answer as u8),
            stop: AtomicBool::new(false),
        });
        let s1 = state.clone();
        let s2 = state.clone();
        let threads = vec![
            std::thread::spawn(move || udp_loop(udp, s1)),
            std::thread::spawn(move || tcp_loop(tcp, s2)),
        ];
        Self {
            addr,
            state,
            threads,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn queries(&self) -> u64 {
        self.state.queries.load(Relaxed)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.mode.store(mode as u8, Relaxed);
    }

    pub fn split_cnames(&self, on: bool) {
        self.state.zone.write().unwrap().split_cnames = on;
    }

    fn add(&self, owner: &str, ttl: u32, data: RData) {
        let r = Record::from_rdata(name(owner), ttl, data);
        let key = (name(owner), r.record_type());
        self.state
            .zone
            .write()
            .unwrap()
            .records
            .entry(key)
            .or_default()
            .push(r);
    }

    pub fn a(&self, owner: &str, ip: &str, ttl: u32) {
        self.add(owner, ttl, RData::A(A(ip.parse().unwrap())));
    }

    pub fn aaaa(&self, owner: &str, ip: &str, ttl: u32) {
        self.add(owner, ttl, RData::AAAA(AAAA(ip.parse().unwrap())));
    }

    pub fn txt(&self, owner: &str, text: &str, ttl: u32) {
        self.add(owner, ttl, RData::TXT(TXT::new(vec![text.to_string()])));
    }

    pub fn cname(&self, owner: &str, target: &str, ttl: u32) {
        let r = Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))));
        self.state
            .zone
            .write()
            .unwrap()
            .cnames
            .insert(name(owner), r);
    }

    /// Any name under `suffix` has its own A record in 1.0.0.0/8, derived
    /// from the name, so pin sets grow as they would in real use.
    pub fn wildcard_spread(&self, suffix: &str, ttl: u32) {
        self.state
            .zone
            .write()
            .unwrap()
            .wildcard_spread
            .push((name(suffix), ttl));
    }

    /// Any name under `suffix` has this A record.
    pub fn wildcard_a(&self, suffix: &str, ip: &str, ttl: u32) {
        self.state
            .zone
            .write()
            .unwrap()
            .wildcard_a
            .push((name(suffix), ip.parse().unwrap(), ttl));
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.state.stop.store(true, Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The answer section for one question, CNAMEs first.
fn lookup(zone: &Zone, q: &Name, qtype: RecordType) -> (ResponseCode, Vec<Record>) {
    let mut out = Vec::new();
    let mut current = q.clone();
    for _ in 0..16 {
        if let Some(c) = zone.cnames.get(&current) {
            out.push(c.clone());
            let RData::CNAME(t) = &c.data else {
                unreachable!()
            };
            current = t.0.clone();
            if zone.split_cnames {
                return (ResponseCode::NoError, out);
            }
            continue;
        }
        break;
    }
    if let Some(rs) = zone.records.get(&(current.clone(), qtype)) {
        out.extend(rs.iter().cloned());
        return (ResponseCode::NoError, out);
    }
    for (suffix, ip, ttl) in &zone.wildcard_a {
        if qtype == RecordType::A && suffix.zone_of(&current) && *suffix != current {
            out.push(Record::from_rdata(current.clone(), *ttl, RData::A(A(*ip))));
            return (ResponseCode::NoError, out);
        }
    }
    for (suffix, ttl) in &zone.wildcard_spread {
        if qtype == RecordType::A && suffix.zone_of(&current) && *suffix != current {
            let h = current.to_ascii().bytes().fold(2166136261u32, |h, b| {
                (h ^ u32::from(b)).wrapping_mul(16777619)
            });
            let ip = std::net::Ipv4Addr::from(0x0100_0000 | (h & 0x00ff_ffff));
            out.push(Record::from_rdata(current.clone(), *ttl, RData::A(A(ip))));
            return (ResponseCode::NoError, out);
        }
    }
    let exists = zone.records.keys().any(|(n, _)| *n == current)
        || zone.wildcard_a.iter().any(|(s, _, _)| s.zone_of(&current));
    if out.is_empty() && !exists {
        return (ResponseCode::NXDomain, out);
    }
    (ResponseCode::NoError, out)
}

fn respond(state: &State, packet: &[u8]) -> Option<Vec<u8>> {
    state.queries.fetch_add(1, Relaxed);
    let req = Message::from_vec(packet).ok()?;
    let mode = state.mode.load(Relaxed);
    if mode == Mode::Silent as u8 {
        return None;
    }
    let mut resp = Message::response(req.metadata.id, OpCode::Query);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.add_queries(req.queries.iter().cloned());
    if mode == Mode::ServFail as u8 {
        resp.metadata.response_code = ResponseCode::ServFail;
    } else if let Some(q) = req.queries.first() {
        let zone = state.zone.read().unwrap();
        let (rcode, answers) = lookup(&zone, q.name(), q.query_type());
        resp.metadata.response_code = rcode;
        resp.add_answers(answers);
    }
    resp.metadata.message_type = MessageType::Response;
    resp.to_vec().ok()
}

fn udp_loop(sock: UdpSocket, state: Arc<State>) {
    let mut buf = [0u8; 4096];
    while !state.stop.load(Relaxed) {
        let Ok((n, src)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some(r) = respond(&state, &buf[..n]) {
            let _ = sock.send_to(&r, src);
        }
    }
}

fn tcp_loop(listener: TcpListener, state: Arc<State>) {
    while !state.stop.load(Relaxed) {
        let Ok((mut s, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut len = [0u8; 2];
        if s.read_exact(&mut len).is_err() {
            continue;
        }
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if s.read_exact(&mut buf).is_err() {
            continue;
        }
        if let Some(r) = respond(&state, &buf) {
            let mut framed = (r.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&r);
            let _ = s.write_all(&framed);
        }
    }
}
