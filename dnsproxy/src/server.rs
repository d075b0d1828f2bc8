//! Serving one sandbox: a UDP socket and a TCP listener on its resolver
//! address, answered by that sandbox's handler.
//!
//! The sandbox is known from the listener alone (its address, and its tap
//! when `device` is set); a packet whose source is not one of the sandbox's
//! own guest addresses is dropped. Nothing in the packet decides whose
//! policy, cache or pins apply.
//!
//! hickory-server's `Server` is not used here: it answers malformed packets
//! with FORMERR (we drop them), accepts 64 KiB TCP frames (we close the
//! connection on anything longer than a query can be) and has no per-sandbox
//! rate limit ahead of parsing.

use crate::handler::{SandboxHandler, Step, Transport};
use crate::query::MAX_QUERY_LEN;
use crate::rate::TokenBucket;
use crate::stats::Stats;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::debug;

/// Where a sandbox's resolver listens and whom it answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxNet {
    /// The resolver address the guest is told to use (port 53 in production).
    pub listen: SocketAddr,
    /// The guest's own addresses; packets from anywhere else are dropped.
    pub guest: Vec<IpAddr>,
    /// Bind to this interface (the sandbox's tap) as well as the address.
    pub device: Option<String>,
}

/// Per-sandbox bounds on what a guest can make the proxy do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Average queries per second (UDP and TCP together).
    pub queries_per_sec: u32,
    /// Queries allowed at once above the average.
    pub burst: u32,
    /// Queries waiting on upstream at once; more are dropped.
    pub max_inflight: usize,
    /// TCP connections at once; more are closed on accept.
    pub max_tcp_conns: usize,
    /// A TCP connection idle this long is closed.
    pub tcp_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queries_per_sec: 200,
            burst: 400,
            max_inflight: 64,
            max_tcp_conns: 8,
            tcp_idle: Duration::from_secs(10),
        }
    }
}

/// A running sandbox resolver. Dropping it stops the listeners and everything they
/// started (open TCP connections, queries waiting on upstream): nothing keeps answering
/// with a policy that is gone. [`shutdown`](Self::shutdown) does the same and returns
/// only once every socket is closed, so the address can be bound again at once.
pub struct SandboxServer {
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
    handler: Arc<SandboxHandler>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl SandboxServer {
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    pub fn handler(&self) -> &Arc<SandboxHandler> {
        &self.handler
    }

    /// Stops serving and waits until the listeners, their connections and their pending
    /// queries are gone (their sockets closed).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }
}

impl Drop for SandboxServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Shared {
    handler: Arc<SandboxHandler>,
    guest: Vec<IpAddr>,
    bucket: Mutex<TokenBucket>,
    inflight: Arc<Semaphore>,
    stats: Arc<Stats>,
    limits: Limits,
}

impl Shared {
    /// Source and rate checks, before any parsing.
    fn admit(&self, src: IpAddr) -> bool {
        if !self.guest.contains(&src) {
            Stats::bump(&self.stats.dropped_source);
            return false;
        }
        let ok = self
            .bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(Instant::now());
        if !ok {
            Stats::bump(&self.stats.dropped_rate);
        }
        ok
    }
}

/// Binds the sandbox's UDP and TCP sockets and starts serving on the current
/// tokio runtime. With port 0 in `net.listen`, UDP and TCP get their own
/// ephemeral ports (tests); see [`SandboxServer::udp_addr`].
pub async fn serve(
    handler: Arc<SandboxHandler>,
    net: &SandboxNet,
    limits: Limits,
) -> io::Result<SandboxServer> {
    let udp = std::net::UdpSocket::bind(net.listen)?;
    udp.set_nonblocking(true)?;
    let udp = UdpSocket::from_std(udp)?;
    let tcp = match net.listen {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(dev) = &net.device {
        udp.bind_device(Some(dev.as_bytes()))?;
        tcp.bind_device(Some(dev.as_bytes()))?;
    }
    tcp.set_reuseaddr(true)?;
    tcp.bind(net.listen)?;
    let tcp = tcp.listen(64)?;

    let stats = handler.stats().clone();
    let shared = Arc::new(Shared {
        handler: handler.clone(),
        guest: net.guest.clone(),
        bucket: Mutex::new(TokenBucket::new(
            limits.queries_per_sec,
            limits.burst,
            Instant::now(),
        )),
        inflight: Arc::new(Semaphore::new(limits.max_inflight)),
        stats,
        limits,
    });
    let udp_addr = udp.local_addr()?;
    let tcp_addr = tcp.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(udp_loop(Arc::new(udp), shared.clone(), stopped.clone())),
        tokio::spawn(tcp_loop(tcp, shared, stopped)),
    ];
    Ok(SandboxServer {
        udp_addr,
        tcp_addr,
        handler,
        stop,
        tasks,
    })
}

async fn udp_loop(sock: Arc<UdpSocket>, sh: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    // One byte more than the largest query, to tell "too long" from "fits".
    let mut buf = [0u8; MAX_QUERY_LEN + 1];
    // Owned by this task: stopping (or aborting) the loop ends them too.
    let mut resolving = JoinSet::new();
    loop {
        while resolving.try_join_next().is_some() {}
        let received = tokio::select! {
            // A stop request, or the server gone.
            _ = stop.changed() => break,
            r = sock.recv_from(&mut buf) => r,
        };
        let (n, src) = match received {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "udp recv failed");
                continue;
            }
        };
        if !sh.admit(src.ip()) {
            continue;
        }
        let step = sh.handler.prepare(&buf[..n], Transport::Udp);
        match step {
            Step::Drop => {}
            Step::Reply(r) => send(&sock, &r, src).await,
            Step::Resolve(q, ports) => {
                let Ok(permit) = sh.inflight.clone().try_acquire_owned() else {
                    Stats::bump(&sh.stats.dropped_busy);
                    continue;
                };
                let sock = sock.clone();
                let handler = sh.handler.clone();
                resolving.spawn(async move {
                    let r = handler.resolve(q, ports, Transport::Udp).await;
                    drop(permit);
                    send(&sock, &r, src).await;
                });
            }
        }
    }
    // Waits for them, so every clone of the socket is dropped when this task ends.
    resolving.shutdown().await;
}

async fn send(sock: &UdpSocket, bytes: &[u8], to: SocketAddr) {
    if let Err(e) = sock.send_to(bytes, to).await {
        debug!(%to, error = %e, "udp send failed");
    }
}

async fn tcp_loop(listener: TcpListener, sh: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let conns = Arc::new(Semaphore::new(sh.limits.max_tcp_conns));
    // Owned by this task: stopping (or aborting) the loop closes every connection.
    let mut open = JoinSet::new();
    loop {
        while open.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            r = listener.accept() => r,
        };
        let (stream, src) = match accepted {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "tcp accept failed");
                continue;
            }
        };
        if !sh.guest.contains(&src.ip()) {
            Stats::bump(&sh.stats.dropped_source);
            continue;
        }
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            Stats::bump(&sh.stats.dropped_busy);
            continue;
        };
        let sh = sh.clone();
        open.spawn(async move {
            if let Err(e) = tcp_conn(stream, src, &sh).await {
                debug!(%src, error = %e, "tcp connection ended");
            }
            drop(permit);
        });
    }
    open.shutdown().await;
}

/// Serves length-prefixed queries one after another until the guest closes,
/// idles, or sends a frame no query could fill.
async fn tcp_conn(mut s: TcpStream, src: SocketAddr, sh: &Shared) -> io::Result<()> {
    let idle = sh.limits.tcp_idle;
    let mut buf = vec![0u8; MAX_QUERY_LEN];
    loop {
        let len = match tokio::time::timeout(idle, s.read_u16()).await {
            Ok(r) => usize::from(r?),
            Err(_) => return Ok(()),
        };
        if len == 0 || len > MAX_QUERY_LEN {
            Stats::bump(&sh.stats.tcp_closed_oversized);
            return Ok(());
        }
        match tokio::time::timeout(idle, s.read_exact(&mut buf[..len])).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        if !sh.admit(src.ip()) {
            continue;
        }
        let Some(reply) = sh.handler.handle(&buf[..len], Transport::Tcp).await else {
            continue;
        };
        let rlen = u16::try_from(reply.len()).unwrap_or(u16::MAX);
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&rlen.to_be_bytes());
        framed.extend_from_slice(&reply[..usize::from(rlen)]);
        s.write_all(&framed).await?;
    }
}
