//! The host side of hybrid vsock (Firecracker's convention): one Unix socket per VM.
//!
//! - Host-initiated: a host process connects to the socket and writes `CONNECT <port>\n`;
//!   we send the guest a REQUEST for that port; on its RESPONSE the host reads
//!   `OK <host-port>\n` and then has a byte stream to the guest listener. A guest that
//!   refuses (no listener: RST) or does not answer gets the host connection closed.
//! - Guest-initiated: a guest connection to CID 2 port P goes to the Unix socket
//!   `<socket>_P`; if nothing listens there the guest gets a RST.
//!
//! Everything the guest can make us hold is bounded: connections ([`MAX_CONNECTIONS`]),
//! half-open host handshakes ([`MAX_PENDING_CONNECTS`]), queued control packets
//! ([`MAX_CONTROL_PACKETS`]) and per-connection buffers
//! ([`CONN_BUF_SIZE`](super::csm::CONN_BUF_SIZE)).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};

use super::csm::{ConnState, Connection, HostRead};
use super::packet::{Header, Op, TxPacket};
use super::HOST_CID;
use crate::devices::virtio::log_limit::LogLimit;

pub const MAX_CONNECTIONS: usize = 1024;
pub const MAX_PENDING_CONNECTS: usize = 64;
pub const MAX_CONTROL_PACKETS: usize = 4 * MAX_CONNECTIONS;
/// Longest `CONNECT <port>\n` line we wait for.
const CONNECT_LINE_MAX: usize = 32;
/// How long a host connection may take to send its CONNECT line, and the guest to answer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection may take to hand its last bytes to a host stream.
pub const CLOSING_TIMEOUT: Duration = Duration::from_secs(10);
/// Host ports for host-initiated connections start here (as in Firecracker).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Accepts per listener wake-up, so a connect flood cannot starve the guest's traffic.
const ACCEPTS_PER_WAKE: usize = 32;

/// A connection's ports: ours (host) and the guest's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// A packet for the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxPacket {
    pub hdr: Header,
    pub op: Op,
    pub data: Vec<u8>,
}

struct PendingConnect {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// Counters for the node's metrics (and the tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MuxerCounts {
    pub host_connects: u64,
    pub guest_connects: u64,
    pub resets_sent: u64,
    pub refused: u64,
    /// Host connections from a peer uid other than the allowed one.
    pub refused_peers: u64,
}

pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    pending: HashMap<RawFd, PendingConnect>,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    ctl: VecDeque<(ConnKey, Op)>,
    ready: VecDeque<ConnKey>,
    next_local_port: u32,
    /// Streams to take out of epoll before they are closed.
    retired: Vec<UnixStream>,
    registered: HashMap<RawFd, EventSet>,
    counts: MuxerCounts,
    log: LogLimit,
    /// Who may connect (`SO_PEERCRED`), when restricted.
    peer_uid: Option<u32>,
    /// The guest's run ended: host connections are closed as they come.
    guest_gone: bool,
}

impl Muxer {
    /// Binds the VM's Unix socket at `path`; with `peer_uid`, only that uid may connect.
    pub fn bind(path: &Path, guest_cid: u64, peer_uid: Option<u32>) -> io::Result<Muxer> {
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(Muxer {
            guest_cid,
            peer_uid,
            guest_gone: false,
            path: path.to_path_buf(),
            listener,
            pending: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            ctl: VecDeque::new(),
            ready: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            retired: Vec::new(),
            registered: HashMap::new(),
            counts: MuxerCounts::default(),
            log: LogLimit::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    pub fn control_queue_len(&self) -> usize {
        self.ctl.len()
    }

    pub fn counts(&self) -> MuxerCounts {
        self.counts
    }

    /// Whether anything waits to go to the guest.
    pub fn has_rx(&self) -> bool {
        !self.ctl.is_empty() || !self.ready.is_empty()
    }

    // ---- guest → host ----------------------------------------------------------------

    /// Acts on one validated packet from the guest.
    pub fn handle_guest_packet(&mut self, pkt: TxPacket) {
        let key = ConnKey {
            local_port: pkt.hdr.dst_port,
            peer_port: pkt.hdr.src_port,
        };
        if pkt.op == Op::Request {
            self.guest_connect(key, &pkt.hdr);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            // Nothing there: tell the guest, except in answer to a reset (no RST loops).
            if pkt.op != Op::Rst {
                self.queue_ctl(key, Op::Rst);
            }
            return;
        };
        conn.update_peer_credit(pkt.hdr.buf_alloc, pkt.hdr.fwd_cnt);
        match (conn.state, pkt.op) {
            (_, Op::Rst) => self.retire(key),
            (ConnState::LocalInit, Op::Response) => self.host_connect_accepted(key),
            (ConnState::LocalInit, op) => self.violation(key, &format!("{op:?} before RESPONSE")),
            (_, Op::Response) => self.violation(key, "RESPONSE on an open connection"),
            (_, Op::Rw) => self.guest_data(key, &pkt.data),
            (_, Op::CreditUpdate) => self.mark_ready(key),
            (_, Op::CreditRequest) => self.queue_credit_update(key),
            (_, Op::Shutdown { rcv, send }) => {
                conn.peer_shut_rcv |= rcv;
                conn.peer_shut_send |= send;
                if conn.peer_shut_rcv && conn.peer_shut_send && conn.state != ConnState::Closing {
                    conn.state = ConnState::Closing;
                    conn.since = Instant::now();
                }
                self.progress_close(key);
            }
            (_, Op::Request) => unreachable!("handled above"),
        }
    }

    /// Queues a reset for a packet we refused (a malformed or unsupported one).
    pub fn refuse(&mut self, hdr: &Header) {
        self.counts.refused += 1;
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if self.conns.contains_key(&key) {
            self.reset(key);
        } else {
            self.queue_ctl(key, Op::Rst);
        }
    }

    fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.contains_key(&key) {
            self.violation(key, "REQUEST for a connection that already exists");
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.log.warn(format_args!(
                "vsock: guest connection to port {} refused: {MAX_CONNECTIONS} connections open",
                key.local_port
            ));
            self.queue_ctl(key, Op::Rst);
            return;
        }
        let target = port_path(&self.path, key.local_port);
        match connect_nonblocking(&target) {
            Ok(stream) => {
                let mut conn = Connection::new(
                    stream,
                    key.local_port,
                    key.peer_port,
                    ConnState::Established,
                );
                conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
                self.by_fd.insert(conn.stream.as_raw_fd(), key);
                self.conns.insert(key, conn);
                self.counts.guest_connects += 1;
                self.queue_ctl(key, Op::Response);
            }
            Err(e) => {
                tracing::debug!(port = key.local_port, error = %e, "vsock: nothing accepts guest connection");
                self.queue_ctl(key, Op::Rst);
            }
        }
    }

    fn host_connect_accepted(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let line = format!("OK {}\n", key.local_port);
        // A fresh stream's buffer always holds a dozen bytes; anything else is a dead host.
        match conn.stream.write(line.as_bytes()) {
            Ok(n) if n == line.len() => {
                conn.state = ConnState::Established;
                self.mark_ready(key);
            }
            _ => self.reset(key),
        }
    }

    fn guest_data(&mut self, key: ConnKey, data: &[u8]) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.peer_shut_send {
            self.violation(key, "data after SHUTDOWN");
            return;
        }
        match conn.recv_from_guest(data) {
            Ok(()) => {
                if conn.needs_credit_update() {
                    self.queue_credit_update(key);
                }
            }
            Err(e) => {
                self.log.warn(format_args!(
                    "vsock: connection {}:{} reset: {e}",
                    key.local_port, key.peer_port
                ));
                self.reset(key);
            }
        }
    }

    /// Finishes a connection the guest is closing once its bytes reached the host.
    fn progress_close(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let flushed = match conn.flush() {
            Ok(f) => f,
            Err(_) => {
                self.reset(key);
                return;
            }
        };
        if !flushed {
            return;
        }
        if conn.state == ConnState::Closing || (conn.peer_shut_send && conn.local_eof) {
            self.reset(key);
        } else if conn.peer_shut_send {
            // The host reads end of file; it may still write.
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        }
    }

    fn violation(&mut self, key: ConnKey, why: &str) {
        self.log.warn(format_args!(
            "vsock: connection {}:{} reset: {why}",
            key.local_port, key.peer_port
        ));
        self.reset(key);
    }

    // ---- host side -------------------------------------------------------------------

    /// Reacts to readiness of a host-side fd (the listener, a handshake, a connection).
    pub fn handle_host_event(&mut self, fd: RawFd, set: EventSet) {
        if fd == self.listener.as_raw_fd() {
            self.accept_host();
        } else if self.pending.contains_key(&fd) {
            self.read_connect_line(fd);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            if set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
                self.flush_host(key);
            }
            if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                self.mark_ready(key);
            }
        }
    }

    fn accept_host(&mut self) {
        for _ in 0..ACCEPTS_PER_WAKE {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.log
                        .warn(format_args!("vsock: accepting a host connection: {e}"));
                    return;
                }
            };
            if let Some(want) = self.peer_uid {
                let peer = nix::sys::socket::getsockopt(
                    &stream,
                    nix::sys::socket::sockopt::PeerCredentials,
                )
                .map(|c| c.uid());
                if peer != Ok(want) {
                    self.counts.refused_peers += 1;
                    self.log.warn(format_args!(
                        "vsock: host connection refused: peer uid {peer:?} is not {want}"
                    ));
                    continue;
                }
            }
            if self.guest_gone {
                continue; // closed: no guest will answer
            }
            if self.pending.len() >= MAX_PENDING_CONNECTS
                || self.conns.len() >= MAX_CONNECTIONS
                || stream.set_nonblocking(true).is_err()
            {
                self.log.warn(format_args!(
                    "vsock: host connection refused: too many connections"
                ));
                continue;
            }
            self.pending.insert(
                stream.as_raw_fd(),
                PendingConnect {
                    stream,
                    line: Vec::new(),
                    since: Instant::now(),
                },
            );
        }
    }

    /// Reads `CONNECT <port>\n` a byte at a time, so no byte of the stream after it is
    /// consumed here.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break None,
                Ok(_) if byte[0] == b'\n' => break parse_connect(&p.line),
                Ok(_) if p.line.len() < CONNECT_LINE_MAX => p.line.push(byte[0]),
                Ok(_) => break None,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let p = self.pending.remove(&fd).expect("found above");
        let Some(peer_port) = port else {
            tracing::debug!("vsock: host connection without a valid CONNECT line closed");
            self.retired.push(p.stream);
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            self.retired.push(p.stream);
            return;
        }
        let key = self.allocate_local_port(peer_port);
        let conn = Connection::new(p.stream, key.local_port, peer_port, ConnState::LocalInit);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.counts.host_connects += 1;
        self.queue_ctl(key, Op::Request);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> ConnKey {
        loop {
            let key = ConnKey {
                local_port: self.next_local_port,
                peer_port,
            };
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&key) {
                return key;
            }
        }
    }

    fn flush_host(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match conn.flush() {
            Ok(_) => {
                if conn.needs_credit_update() {
                    self.queue_credit_update(key);
                }
                self.progress_close(key);
            }
            Err(_) => self.reset(key),
        }
    }

    // ---- host → guest ----------------------------------------------------------------

    /// The next packet for the guest, with at most `max_data` bytes of data.
    pub fn next_rx(&mut self, max_data: usize) -> Option<RxPacket> {
        if let Some((key, op)) = self.ctl.pop_front() {
            let credit = self.conns.get_mut(&key).map(|c| {
                if op == Op::CreditUpdate {
                    c.credit_update_queued = false;
                }
                c.credit_fields()
            });
            if op == Op::Rst {
                self.counts.resets_sent += 1;
            }
            return Some(self.packet(key, op, credit.unwrap_or((0, 0)), Vec::new()));
        }
        if max_data == 0 {
            return None;
        }
        while let Some(key) = self.ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_ready = false;
            if !conn.wants_read() {
                continue;
            }
            match conn.read_for_guest(max_data) {
                Ok(HostRead::Data(d)) => {
                    conn.in_ready = true;
                    self.ready.push_back(key);
                    let credit = conn.credit_fields();
                    return Some(self.packet(key, Op::Rw, credit, d));
                }
                Ok(HostRead::Empty) => continue,
                Ok(HostRead::Eof) => {
                    conn.local_eof = true;
                    let credit = conn.credit_fields();
                    if conn.peer_shut_send && !conn.has_pending() {
                        self.retire(key);
                        self.counts.resets_sent += 1;
                        return Some(self.packet(key, Op::Rst, (0, 0), Vec::new()));
                    }
                    let op = Op::Shutdown {
                        rcv: false,
                        send: true,
                    };
                    return Some(self.packet(key, op, credit, Vec::new()));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "vsock: host stream failed");
                    self.retire(key);
                    self.counts.resets_sent += 1;
                    return Some(self.packet(key, Op::Rst, (0, 0), Vec::new()));
                }
            }
        }
        None
    }

    fn packet(&self, key: ConnKey, op: Op, credit: (u32, u32), data: Vec<u8>) -> RxPacket {
        RxPacket {
            hdr: Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: key.local_port,
                dst_port: key.peer_port,
                buf_alloc: credit.0,
                fwd_cnt: credit.1,
            },
            op,
            data,
        }
    }

    fn queue_ctl(&mut self, key: ConnKey, op: Op) {
        if self.ctl.len() >= MAX_CONTROL_PACKETS {
            self.log.warn(format_args!(
                "vsock: control queue full (the guest is not taking packets); {op:?} dropped"
            ));
            return;
        }
        self.ctl.push_back((key, op));
    }

    fn queue_credit_update(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.credit_update_queued {
                c.credit_update_queued = true;
                self.queue_ctl(key, Op::CreditUpdate);
            }
        }
    }

    fn mark_ready(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if c.wants_read() && !c.in_ready {
                c.in_ready = true;
                self.ready.push_back(key);
            }
        }
    }

    // ---- lifecycle -------------------------------------------------------------------

    /// Resets the connection towards the guest and closes the host stream.
    fn reset(&mut self, key: ConnKey) {
        self.retire(key);
        self.queue_ctl(key, Op::Rst);
    }

    /// Forgets a connection and closes its host stream (after epoll lets go of it).
    fn retire(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            self.by_fd.remove(&conn.stream.as_raw_fd());
            self.retired.push(conn.stream);
        }
    }

    /// Drops every connection and handshake (device reset, transport reset).
    pub fn reset_all(&mut self) {
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for k in keys {
            self.retire(k);
        }
        for (_, p) in self.pending.drain() {
            self.retired.push(p.stream);
        }
        self.ctl.clear();
        self.ready.clear();
    }

    /// The guest's run ended: every connection and handshake is dropped (their host
    /// streams close once the event loop lets go of them) and later connects are closed
    /// as they are accepted.
    pub fn guest_gone(&mut self) {
        self.guest_gone = true;
        self.reset_all();
    }

    /// Whether something waits on a deadline that only [`tick`](Self::tick) enforces: a
    /// host connect whose `CONNECT` line has not come, a guest that has not answered our
    /// REQUEST, a close the guest has not confirmed. Otherwise nothing needs the timer.
    pub fn awaits_deadline(&self) -> bool {
        !self.pending.is_empty()
            || self
                .conns
                .values()
                .any(|c| matches!(c.state, ConnState::LocalInit | ConnState::Closing))
    }

    /// Expires handshakes and closes that take too long.
    pub fn tick(&mut self, now: Instant) {
        let stale: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.since) > HANDSHAKE_TIMEOUT)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            if let Some(p) = self.pending.remove(&fd) {
                self.retired.push(p.stream);
            }
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| match c.state {
                ConnState::LocalInit => now.duration_since(c.since) > HANDSHAKE_TIMEOUT,
                ConnState::Closing => now.duration_since(c.since) > CLOSING_TIMEOUT,
                ConnState::Established => false,
            })
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.reset(key);
        }
    }

    /// Brings epoll in line with what each fd waits for. Only this touches `ops`, so
    /// streams closed anywhere else are taken out of epoll before they are closed.
    pub fn sync_interest(&mut self, ops: &mut EventOps, rx_starved: bool) {
        for stream in std::mem::take(&mut self.retired) {
            if self.registered.remove(&stream.as_raw_fd()).is_some() {
                let _ = ops.remove(Events::empty(&stream));
            }
        }
        let mut want: Vec<(RawFd, EventSet)> =
            self.pending.keys().map(|fd| (*fd, EventSet::IN)).collect();
        want.extend(self.conns.values().map(|c| {
            let mut set = EventSet::empty();
            if c.wants_read() && !c.in_ready && !rx_starved {
                set |= EventSet::IN;
            }
            if c.has_pending() {
                set |= EventSet::OUT;
            }
            (c.stream.as_raw_fd(), set)
        }));
        for (fd, set) in want {
            let old = self.registered.get(&fd).copied();
            let r = match (old, set.is_empty()) {
                (None, true) => Ok(()),
                (None, false) => ops.add(Events::new_raw(fd, set)),
                // Out of epoll entirely: a hung-up stream would otherwise wake us forever.
                (Some(_), true) => ops.remove(Events::empty_raw(fd)),
                (Some(o), false) if o != set => ops.modify(Events::new_raw(fd, set)),
                (Some(_), false) => Ok(()),
            };
            match r {
                Ok(()) if set.is_empty() => {
                    self.registered.remove(&fd);
                }
                Ok(()) => {
                    self.registered.insert(fd, set);
                }
                Err(e) => {
                    self.log
                        .warn(format_args!("vsock: updating epoll for fd {fd}: {e:?}"));
                }
            }
        }
    }
}

/// `<socket>_<port>`: where guest connections to host port `port` go.
pub fn port_path(socket: &Path, port: u32) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Parses `CONNECT <port>` (the newline already stripped).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Connects without waiting: a host listener with a full backlog is a refusal, not a
/// stall of the device.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_allowed_peer_uid_gets_a_connection() {
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        // Another uid only: this process is refused.
        let mut m = Muxer::bind(&dir.path().join("a.sock"), 3, Some(me.wrapping_add(1))).unwrap();
        let _c = UnixStream::connect(dir.path().join("a.sock")).unwrap();
        m.accept_host();
        assert!(m.pending.is_empty());
        assert_eq!(m.counts().refused_peers, 1);
        // Our uid: accepted; no restriction: accepted.
        for (name, peer) in [("b.sock", Some(me)), ("c.sock", None)] {
            let mut m = Muxer::bind(&dir.path().join(name), 3, peer).unwrap();
            let _c = UnixStream::connect(dir.path().join(name)).unwrap();
            m.accept_host();
            assert_eq!(m.pending.len(), 1, "{name}");
            assert_eq!(m.counts().refused_peers, 0);
        }
    }

    #[test]
    fn only_an_unfinished_handshake_needs_the_timer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sock");
        let mut m = Muxer::bind(&path, 3, None).unwrap();
        assert!(!m.awaits_deadline(), "an idle muxer waits on nothing");
        let _c = UnixStream::connect(&path).unwrap();
        m.accept_host();
        assert!(
            m.awaits_deadline(),
            "a connect without its CONNECT line expires"
        );
        m.tick(Instant::now() + HANDSHAKE_TIMEOUT + Duration::from_secs(1));
        assert!(!m.awaits_deadline(), "expired: nothing left to wait on");
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT -1",
            b"CONNECT +1",
            b"CONNECT ",
            b"connect 52",
            b"CONNECT 5 2",
            b"\xff\xfe",
        ] {
            assert_eq!(
                parse_connect(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn port_paths_append_the_port() {
        assert_eq!(
            port_path(Path::new("/run/cleave/vm/vsock.sock"), 1234),
            PathBuf::from("/run/cleave/vm/vsock.sock_1234")
        );
    }
}
