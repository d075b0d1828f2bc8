//! Asking the configured upstream resolvers, with bounded retries.
//!
//! Each exchange uses a fresh UDP socket on a random port, connected to the
//! server (so only that server's packets are read), a random query ID, and
//! checks that the reply answers the question asked. Truncated replies are
//! retried over TCP. CNAME chains that end without an address are followed
//! with further queries, up to [`MAX_CHAIN`] hops in all.

use crate::answer::{follow, MAX_CHAIN};
use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, Record, RecordType};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;
use tracing::debug;

/// Our advertised UDP payload size upstream (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;

/// Where and how hard to ask.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub servers: Vec<SocketAddr>,
    /// Per exchange.
    pub timeout: Duration,
    /// Rounds over all servers before giving up.
    pub attempts: u32,
}

/// The upstream could not answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream answered {name} {qtype} after {tries} tries (last: {last})")]
    Exhausted {
        name: Name,
        qtype: RecordType,
        tries: u32,
        last: String,
    },
    #[error("CNAME chain from {0} is longer than {MAX_CHAIN} or loops")]
    ChainTooLong(Name),
}

/// A resolved question: NOERROR or NXDOMAIN, the CNAME chain and the
/// address records at its end (unfiltered).
#[derive(Debug)]
pub struct Resolved {
    pub rcode: ResponseCode,
    pub chain: Vec<Record>,
    pub addrs: Vec<Record>,
}

/// The upstream client.
#[derive(Debug)]
pub struct Upstream {
    cfg: UpstreamConfig,
}

impl Upstream {
    pub fn new(cfg: UpstreamConfig) -> Self {
        Self { cfg }
    }

    /// Resolves `name`/`qtype`, following CNAMEs.
    pub async fn resolve(&self, name: &Name, qtype: RecordType) -> Result<Resolved, UpstreamError> {
        let mut chain = Vec::new();
        let mut current = name.clone();
        loop {
            let msg = self.exchange(&current, qtype).await?;
            if msg.metadata.response_code == ResponseCode::NXDomain {
                return Ok(Resolved {
                    rcode: ResponseCode::NXDomain,
                    chain,
                    addrs: Vec::new(),
                });
            }
            let budget = MAX_CHAIN - chain.len();
            let f = follow(&current, qtype, &msg.answers, budget);
            let hopped = !f.chain.is_empty();
            chain.extend(f.chain);
            // Done when the chain ends in addresses, or in a name the
            // upstream had nothing more for (NODATA).
            if !f.addrs.is_empty() || !hopped {
                return Ok(Resolved {
                    rcode: ResponseCode::NoError,
                    chain,
                    addrs: f.addrs,
                });
            }
            if chain.len() >= MAX_CHAIN {
                return Err(UpstreamError::ChainTooLong(name.clone()));
            }
            current = f.target.unwrap_or(current);
        }
    }

    /// One question, over every server, `attempts` rounds.
    async fn exchange(&self, name: &Name, qtype: RecordType) -> Result<Message, UpstreamError> {
        let mut last = String::from("no servers configured");
        let mut tries = 0;
        for _ in 0..self.cfg.attempts.max(1) {
            for &server in &self.cfg.servers {
                tries += 1;
                match self.exchange_one(server, name, qtype).await {
                    Ok(msg) => return Ok(msg),
                    Err(e) => {
                        debug!(%server, %name, %qtype, error = %e, "upstream exchange failed");
                        last = format!("{server}: {e}");
                    }
                }
            }
        }
        Err(UpstreamError::Exhausted {
            name: name.clone(),
            qtype,
            tries,
            last,
        })
    }

    async fn exchange_one(
        &self,
        server: SocketAddr,
        name: &Name,
        qtype: RecordType,
    ) -> Result<Message, String> {
        let question = Query::query(name.clone(), qtype);
        let mut req = Message::query();
        req.metadata.recursion_desired = true;
        req.add_query(question.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        req.set_edns(edns);
        let bytes = req.to_vec().map_err(|e| e.to_string())?;
        let id = req.metadata.id;

        let msg = timeout(
            self.cfg.timeout,
            udp_exchange(server, &bytes, id, &question),
        )
        .await
        .map_err(|_| "timed out".to_string())??;
        let msg = if msg.metadata.truncation {
            timeout(
                self.cfg.timeout,
                tcp_exchange(server, &bytes, id, &question),
            )
            .await
            .map_err(|_| "timed out over TCP".to_string())??
        } else {
            msg
        };
        match msg.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => Ok(msg),
            other => Err(format!("answered {other}")),
        }
    }
}

fn unspecified(server: SocketAddr) -> SocketAddr {
    let ip: IpAddr = match server {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    SocketAddr::new(ip, 0)
}

/// True if `msg` is the reply to our question.
fn answers(msg: &Message, id: u16, question: &Query) -> bool {
    msg.metadata.message_type == MessageType::Response
        && msg.metadata.id == id
        && msg.queries.len() == 1
        && msg.queries[0] == *question
}

async fn udp_exchange(
    server: SocketAddr,
    bytes: &[u8],
    id: u16,
    question: &Query,
) -> Result<Message, String> {
    let sock = UdpSocket::bind(unspecified(server))
        .await
        .map_err(|e| format!("bind: {e}"))?;
    sock.connect(server)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    sock.send(bytes).await.map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; usize::from(EDNS_PAYLOAD) + 1];
    loop {
        let n = sock
            .recv(&mut buf)
            .await
            .map_err(|e| format!("recv: {e}"))?;
        // Anything that is not our reply (stale, spoofed, garbage) is skipped;
        // the caller's timeout bounds the wait.
        if let Ok(msg) = Message::from_vec(&buf[..n]) {
            if answers(&msg, id, question) {
                return Ok(msg);
            }
        }
    }
}

async fn tcp_exchange(
    server: SocketAddr,
    bytes: &[u8],
    id: u16,
    question: &Query,
) -> Result<Message, String> {
    let mut s = TcpStream::connect(server)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let len = u16::try_from(bytes.len()).map_err(|_| "query too long".to_string())?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    s.write_all(&framed)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let n = s.read_u16().await.map_err(|e| format!("recv: {e}"))?;
    let mut buf = vec![0u8; usize::from(n)];
    s.read_exact(&mut buf)
        .await
        .map_err(|e| format!("recv: {e}"))?;
    let msg = Message::from_vec(&buf).map_err(|e| format!("bad reply: {e}"))?;
    if answers(&msg, id, question) {
        Ok(msg)
    } else {
        Err("reply does not match the question".into())
    }
}
