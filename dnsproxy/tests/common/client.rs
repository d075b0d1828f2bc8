//! A minimal stub-resolver client for tests and the benchmark.

#![allow(dead_code)]

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

pub fn query_bytes(name: &str, qtype: RecordType) -> (u16, Vec<u8>) {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    (m.metadata.id, m.to_vec().unwrap())
}

/// Sends `bytes` from `from` and waits up to `wait` for a reply.
pub async fn udp_raw(
    from: IpAddr,
    to: SocketAddr,
    bytes: &[u8],
    wait: Duration,
) -> Option<Message> {
    let sock = UdpSocket::bind(SocketAddr::new(from, 0)).await.unwrap();
    sock.send_to(bytes, to).await.unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = tokio::time::timeout(wait, sock.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(Message::from_vec(&buf[..n]).expect("proxy sent a malformed reply"))
}

/// Asks `name`/`qtype` over UDP from 127.0.0.1-style `from`.
pub async fn udp(from: IpAddr, to: SocketAddr, name: &str, qtype: RecordType) -> Option<Message> {
    let (id, bytes) = query_bytes(name, qtype);
    let m = udp_raw(from, to, &bytes, Duration::from_secs(3)).await?;
    assert_eq!(m.metadata.id, id);
    Some(m)
}

/// Asks over TCP; `None` if the connection was closed without a reply.
pub async fn tcp(to: SocketAddr, name: &str, qtype: RecordType) -> Option<Message> {
    let (_, bytes) = query_bytes(name, qtype);
    let mut s = TcpStream::connect(to).await.unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    s.write_all(&framed).await.unwrap();
    let n = s.read_u16().await.ok()?;
    let mut buf = vec![0u8; usize::from(n)];
    s.read_exact(&mut buf).await.ok()?;
    Some(Message::from_vec(&buf).unwrap())
}

/// The addresses in a reply's answer section.
pub fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// Asks over UDP with a blocking socket (for clients inside another network
/// namespace, which run on their own thread).
pub fn blocking_udp(to: SocketAddr, name: &str, qtype: RecordType) -> Option<Message> {
    let (id, bytes) = query_bytes(name, qtype);
    let unspecified: SocketAddr = match to {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
    };
    let sock = std::net::UdpSocket::bind(unspecified).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    sock.send_to(&bytes, to).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = sock.recv_from(&mut buf).ok()?;
    let m = Message::from_vec(&buf[..n]).expect("proxy sent a malformed reply");
    assert_eq!(m.metadata.id, id);
    Some(m)
}
