//! One vsock connection between a guest socket and a host Unix stream: its state, the
//! credit accounting of both directions (virtio spec 5.10.6.3), and the bounded buffer of
//! guest bytes the host side has not taken yet.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Our receive buffer per connection, as announced to the guest (`buf_alloc`): the most
/// guest bytes we ever hold for a host stream that is not reading.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Tell the guest about freed space once this much has been forwarded unannounced.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// The host connected and we sent the guest a REQUEST; waiting for its RESPONSE.
    LocalInit,
    Established,
    /// The guest closed both directions; we forward what it sent, then reset.
    Closing,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("the guest sent {got} bytes with only {room} bytes of credit")]
    CreditExceeded { got: usize, room: usize },
    #[error("host stream: {0}")]
    Io(#[from] io::Error),
}

/// What a read from the host stream produced.
#[derive(Debug, PartialEq, Eq)]
pub enum HostRead {
    Data(Vec<u8>),
    /// Nothing to read now.
    Empty,
    /// The host closed its end for writing.
    Eof,
}

pub struct Connection {
    pub stream: UnixStream,
    /// Our (host) port.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    pub state: ConnState,
    pub since: Instant,
    /// The host stream reached end of file (we told the guest: SHUTDOWN send).
    pub local_eof: bool,
    /// The guest will send no more.
    pub peer_shut_send: bool,
    /// The guest will receive no more.
    pub peer_shut_rcv: bool,
    /// Already queued for the RX path (so it is queued once).
    pub in_ready: bool,
    /// A CREDIT_UPDATE is already queued.
    pub credit_update_queued: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Guest bytes written to the host stream.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Guest bytes not yet taken by the host stream; never more than [`CONN_BUF_SIZE`].
    pending: VecDeque<u8>,
}

impl Connection {
    pub fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: ConnState) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            since: Instant::now(),
            local_eof: false,
            peer_shut_send: false,
            peer_shut_rcv: false,
            in_ready: false,
            credit_update_queued: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            pending: VecDeque::new(),
        }
    }

    /// Records the guest's receive window from any packet it sent.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Bytes the guest can take now. A guest claiming more consumed than we sent gets none.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether host bytes should flow to the guest now.
    pub fn wants_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.local_eof
            && !self.peer_shut_rcv
            && self.peer_credit() > 0
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Guest bytes for the host stream. Written at once where the stream takes them; the
    /// rest waits, within the credit we gave the guest.
    pub fn recv_from_guest(&mut self, data: &[u8]) -> Result<(), ConnError> {
        let room = CONN_BUF_SIZE as usize - self.pending.len();
        if data.len() > room {
            return Err(ConnError::CreditExceeded {
                got: data.len(),
                room,
            });
        }
        let mut written = 0;
        if self.pending.is_empty() {
            written = write_some(&mut self.stream, data)?;
            self.fwd_cnt += Wrapping(written as u32);
        }
        self.pending.extend(&data[written..]);
        Ok(())
    }

    /// Writes held guest bytes to the host stream. Returns whether all are out.
    pub fn flush(&mut self) -> Result<bool, ConnError> {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            let n = write_some(&mut self.stream, front)?;
            if n == 0 {
                return Ok(false);
            }
            self.pending.drain(..n);
            self.fwd_cnt += Wrapping(n as u32);
        }
        Ok(true)
    }

    /// Whether the guest should hear about freed buffer space now.
    pub fn needs_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// `(buf_alloc, fwd_cnt)` for a packet to the guest; the guest now knows our window.
    pub fn credit_fields(&mut self) -> (u32, u32) {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        (CONN_BUF_SIZE, self.fwd_cnt.0)
    }

    /// Reads at most `max` bytes (and never beyond the guest's credit) for the guest.
    pub fn read_for_guest(&mut self, max: usize) -> io::Result<HostRead> {
        let n = max.min(self.peer_credit() as usize);
        if n == 0 {
            return Ok(HostRead::Empty);
        }
        let mut buf = vec![0u8; n];
        loop {
            return match self.stream.read(&mut buf) {
                Ok(0) => Ok(HostRead::Eof),
                Ok(k) => {
                    buf.truncate(k);
                    self.rx_cnt += Wrapping(k as u32);
                    Ok(HostRead::Data(buf))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(HostRead::Empty),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
        }
    }
}

/// One nonblocking write; 0 when the stream is full.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    if data.is_empty() {
        return Ok(0);
    }
    loop {
        return match stream.write(data) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, 1, 2, ConnState::Established), b)
    }

    #[test]
    fn credit_never_goes_negative_for_a_lying_guest() {
        let (mut c, _b) = pair();
        c.update_peer_credit(100, 0);
        assert_eq!(c.peer_credit(), 100);
        // fwd_cnt ahead of what we sent: in flight wraps huge, credit saturates at 0.
        c.update_peer_credit(100, 5);
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn guest_bytes_beyond_the_window_are_refused() {
        let (mut c, b) = pair();
        // Fill the host socket's buffer so nothing more is taken, then the window.
        let mut sent = 0usize;
        let chunk = vec![7u8; 64 * 1024];
        loop {
            let room = CONN_BUF_SIZE as usize - c.pending.len();
            if room < chunk.len() {
                break;
            }
            c.recv_from_guest(&chunk).unwrap();
            sent += chunk.len();
        }
        assert!(c.has_pending());
        assert!(matches!(
            c.recv_from_guest(&chunk),
            Err(ConnError::CreditExceeded { .. })
        ));
        assert!(c.pending.len() <= CONN_BUF_SIZE as usize);
        drop(b);
        assert!(sent > 0);
    }

    #[test]
    fn reads_stop_at_the_guest_credit() {
        let (mut c, mut b) = pair();
        b.write_all(&[1u8; 1000]).unwrap();
        c.update_peer_credit(10, 0);
        assert_eq!(
            c.read_for_guest(4096).unwrap(),
            HostRead::Data(vec![1u8; 10])
        );
        assert_eq!(c.read_for_guest(4096).unwrap(), HostRead::Empty);
        c.update_peer_credit(10, 10);
        assert_eq!(c.read_for_guest(4).unwrap(), HostRead::Data(vec![1u8; 4]));
    }
}
