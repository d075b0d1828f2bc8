//! The messages of the protocol, as validated types, and their payload
//! encoding. A value of any type here has passed every check the wire
//! format implies (non-empty argv, no NUL bytes in strings bound for the
//! kernel, signal numbers in range, ...), so code past the decoder does not
//! check again.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use super::error::PayloadError;
use super::wire::{Reader, Writer};
use super::RequestId;

/// Smallest and largest entropy a reseed may carry.
pub const MIN_RESEED_ENTROPY: usize = 32;
pub const MAX_RESEED_ENTROPY: usize = 4096;
/// Largest signal number (Linux `SIGRTMAX`).
pub const MAX_SIGNAL: i32 = 64;
/// Most resolvers a network configuration may name (what `resolv.conf` honours).
pub const MAX_NAMESERVERS: usize = 3;

/// One frame: the request it belongs to and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: RequestId,
    pub body: Body,
}

impl Message {
    pub fn new(id: RequestId, body: Body) -> Self {
        Message { id, body }
    }
}

/// Every message of the protocol. Requests (host → guest) start a request
/// id; stream messages continue it; replies (guest → host) end it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    // Requests, host → guest.
    Hello(Hello),
    Exec(ExecRequest),
    Signal(SignalRequest),
    WriteFile(WriteFileRequest),
    ReadFile(ReadFileRequest),
    Shutdown,
    Reseed(ReseedRequest),
    /// Before a template is captured: close the reseed gate and confirm that
    /// no process but the agent runs. Ends with `Ok`, or an error naming the
    /// processes still running (the gate stays closed either way).
    Quiesce,
    /// After the gate: the guest's network identity (addresses, routes,
    /// resolvers). Ends with `Ok` once all of it is applied.
    Network(NetworkConfig),
    // Streams.
    /// A chunk of an exec's stdin (host → guest).
    Stdin(Vec<u8>),
    /// The host ends its data stream: closes an exec's stdin, or aborts a
    /// `write_file` that has not received all its bytes.
    Eof,
    /// A chunk of file data: host → guest for `write_file`, guest → host for
    /// `read_file`.
    FileData(Vec<u8>),
    /// The receiver of a data stream consumed this many bytes; the sender
    /// may send that many more (see [`super::INITIAL_WINDOW`]).
    Credit(u32),
    // Replies and output, guest → host.
    HelloReply(HelloReply),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Ends an exec.
    Exited(ExitReport),
    /// Ends a `signal`, `shutdown` or `quiesce` request.
    Ok,
    /// Ends a `write_file`.
    WriteDone {
        bytes: u64,
    },
    /// Starts the data of a `read_file`.
    ReadStart(FileInfo),
    /// Ends a `read_file`.
    ReadDone {
        bytes: u64,
    },
    /// Ends a `reseed`.
    Reseeded(ReseedReply),
    /// Ends any request.
    Error(ErrorReply),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The protocol versions the host speaks, inclusive.
    pub min_version: u16,
    pub max_version: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    /// The version both sides will use.
    pub version: u16,
    /// The versions the agent speaks, inclusive.
    pub min_version: u16,
    pub max_version: u16,
    /// Milliseconds since the agent started (a fork reports its template's
    /// age plus its own).
    pub uptime_ms: u64,
    /// The agent's build, e.g. `cleave-guest 0.1.0`.
    pub agent: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in the `PATH` of `env`
    /// when it has no `/`.
    pub argv: Vec<OsString>,
    /// The complete environment of the process (nothing is inherited).
    pub env: Vec<(OsString, OsString)>,
    /// Working directory; the agent's own (`/`) when absent.
    pub cwd: Option<PathBuf>,
    /// When false the process gets `/dev/null` as stdin and `Stdin` frames
    /// for this request are refused.
    pub stdin: bool,
    /// Kill the whole process group after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Run as this user and group (no supplementary groups) instead of as
    /// the agent's own root. `None`: as root, like before the field existed.
    ///
    /// On the wire an optional trailing field, written only when set, so a
    /// request without it is byte-identical to what older agents read.
    pub user: Option<ExecUser>,
}

/// The numeric identity an exec runs as. No name lookup: the image's
/// `/etc/passwd` is the guest's, and the host gives numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecUser {
    pub uid: u32,
    pub gid: u32,
}

impl ExecRequest {
    /// A request for `argv` with a minimal `PATH` and nothing else.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            env: vec![(OsString::from("PATH"), OsString::from(DEFAULT_PATH))],
            cwd: None,
            stdin: false,
            timeout_ms: None,
            user: None,
        }
    }
}

/// The `PATH` given to commands that do not name one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalRequest {
    /// The request id of the running exec.
    pub target: RequestId,
    /// 1..=64; delivered to the exec's whole process group.
    pub signal: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFileRequest {
    pub path: PathBuf,
    /// Permission bits (at most `0o7777`), applied regardless of umask.
    pub mode: u32,
    /// Exactly this many bytes follow as `FileData` frames.
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadFileRequest {
    pub path: PathBuf,
    /// The most bytes the host accepts; a larger file is an error.
    pub limit: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallTime {
    pub secs: i64,
    /// Below 1_000_000_000.
    pub nanos: u32,
}

impl WallTime {
    /// The current `CLOCK_REALTIME` (host side).
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        WallTime {
            secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: d.subsec_nanos(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReseedRequest {
    /// Host entropy, `MIN_RESEED_ENTROPY..=MAX_RESEED_ENTROPY` bytes.
    pub entropy: Vec<u8>,
    /// Fresh per fork; echoed in the reply.
    pub nonce: [u8; 16],
    /// The host's wall-clock time; the agent steps `CLOCK_REALTIME` to it.
    pub time: WallTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReseedReply {
    /// True only when both `RNDADDENTROPY` and `RNDRESEEDCRNG` succeeded.
    pub reseeded: bool,
    pub nonce: [u8; 16],
    /// Whether `CLOCK_REALTIME` was stepped to the host's time. Reported
    /// separately: it says nothing about the CRNG.
    pub clock_set: bool,
    /// Why something failed; empty when everything succeeded.
    pub detail: String,
}

/// An IPv4 interface address, its prefix and the default gateway (on-link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Iface {
    pub addr: Ipv4Addr,
    /// 1..=31 (the gateway must share the prefix and differ from `addr`).
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

/// An IPv6 interface address, its prefix and the default gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Iface {
    pub addr: Ipv6Addr,
    /// 1..=127.
    pub prefix: u8,
    pub gateway: Ipv6Addr,
}

/// A guest's network identity, sent after the reseed gate. Every fork of a
/// template starts with the template's (unconfigured) interface; this gives
/// it its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The interface to configure: the one with this MAC.
    pub mac: [u8; 6],
    pub ipv4: Ipv4Iface,
    pub ipv6: Option<Ipv6Iface>,
    /// `1..=MAX_NAMESERVERS` resolvers for `/etc/resolv.conf`.
    pub nameservers: Vec<IpAddr>,
}

fn same_prefix(a: u128, b: u128, prefix: u8, bits: u8) -> bool {
    let shift = u32::from(bits - prefix);
    (a >> shift) == (b >> shift)
}

impl NetworkConfig {
    /// Checks what the decoder checks: prefixes in range, gateways on-link and
    /// distinct from the address, 1..=3 unicast resolvers.
    pub fn validate(&self) -> Result<(), &'static str> {
        let v4 = &self.ipv4;
        if !(1..=31).contains(&v4.prefix) {
            return Err("ipv4.prefix (must be 1..=31)");
        }
        if v4.addr == v4.gateway
            || !same_prefix(
                u128::from(u32::from(v4.addr)),
                u128::from(u32::from(v4.gateway)),
                v4.prefix,
                32,
            )
        {
            return Err("ipv4.gateway (must be another address in the interface's prefix)");
        }
        if let Some(v6) = &self.ipv6 {
            if !(1..=127).contains(&v6.prefix) {
                return Err("ipv6.prefix (must be 1..=127)");
            }
            if v6.addr == v6.gateway {
                return Err("ipv6.gateway (must differ from the address)");
            }
        }
        if self.nameservers.is_empty() || self.nameservers.len() > MAX_NAMESERVERS {
            return Err("nameservers (1..=3)");
        }
        if self
            .nameservers
            .iter()
            .any(|a| a.is_unspecified() || a.is_multicast())
        {
            return Err("nameservers (must be unicast)");
        }
        if self.mac[0] & 1 != 0 || self.mac == [0; 6] {
            return Err("mac (must be unicast and non-zero)");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitReport {
    pub status: ExitStatus,
    /// The agent killed the process group because the timeout expired.
    pub timed_out: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    /// Size when opened (files in `/proc` report 0 and may still have data).
    pub size: u64,
    pub mode: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The message kind is unknown or not valid in this direction.
    UnknownOp,
    /// A frame or file exceeds a limit.
    TooLarge,
    /// The message is malformed or its arguments are invalid.
    BadArguments,
    /// The reseed gate has not passed yet.
    NotReady,
    /// A path or request id does not exist.
    NotFound,
    /// A system call failed; the message names it and the errno text.
    Io,
    /// No protocol version in common.
    UnsupportedVersion,
    /// Too many requests in flight on this connection.
    Busy,
    /// The peer sent more data than it had credit for.
    FlowControl,
    /// The agent cannot do this here (e.g. shutdown without a handler).
    Unsupported,
    /// A code this build does not know (sent by a newer peer).
    Other(u16),
}

impl ErrorCode {
    fn to_wire(self) -> u16 {
        match self {
            ErrorCode::UnknownOp => 1,
            ErrorCode::TooLarge => 2,
            ErrorCode::BadArguments => 3,
            ErrorCode::NotReady => 4,
            ErrorCode::NotFound => 5,
            ErrorCode::Io => 6,
            ErrorCode::UnsupportedVersion => 7,
            ErrorCode::Busy => 8,
            ErrorCode::FlowControl => 9,
            ErrorCode::Unsupported => 10,
            ErrorCode::Other(v) => v,
        }
    }

    fn from_wire(v: u16) -> Self {
        match v {
            1 => ErrorCode::UnknownOp,
            2 => ErrorCode::TooLarge,
            3 => ErrorCode::BadArguments,
            4 => ErrorCode::NotReady,
            5 => ErrorCode::NotFound,
            6 => ErrorCode::Io,
            7 => ErrorCode::UnsupportedVersion,
            8 => ErrorCode::Busy,
            9 => ErrorCode::FlowControl,
            10 => ErrorCode::Unsupported,
            other => ErrorCode::Other(other),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub code: ErrorCode,
    /// What went wrong and, where it helps, how to fix it.
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Message kinds on the wire.
mod kind {
    pub const HELLO: u8 = 0x01;
    pub const EXEC: u8 = 0x02;
    pub const SIGNAL: u8 = 0x03;
    pub const WRITE_FILE: u8 = 0x04;
    pub const READ_FILE: u8 = 0x05;
    pub const SHUTDOWN: u8 = 0x06;
    pub const RESEED: u8 = 0x07;
    pub const QUIESCE: u8 = 0x08;
    pub const NETWORK: u8 = 0x09;
    pub const STDIN: u8 = 0x10;
    pub const EOF: u8 = 0x11;
    pub const FILE_DATA: u8 = 0x12;
    pub const CREDIT: u8 = 0x13;
    pub const HELLO_REPLY: u8 = 0x81;
    pub const STDOUT: u8 = 0x82;
    pub const STDERR: u8 = 0x83;
    pub const EXITED: u8 = 0x84;
    pub const OK: u8 = 0x85;
    pub const WRITE_DONE: u8 = 0x86;
    pub const READ_START: u8 = 0x87;
    pub const READ_DONE: u8 = 0x88;
    pub const RESEEDED: u8 = 0x89;
    pub const ERROR: u8 = 0xff;
}

impl Body {
    /// The kind byte of this message on the wire.
    pub fn kind(&self) -> u8 {
        match self {
            Body::Hello(_) => kind::HELLO,
            Body::Exec(_) => kind::EXEC,
            Body::Signal(_) => kind::SIGNAL,
            Body::WriteFile(_) => kind::WRITE_FILE,
            Body::ReadFile(_) => kind::READ_FILE,
            Body::Shutdown => kind::SHUTDOWN,
            Body::Reseed(_) => kind::RESEED,
            Body::Quiesce => kind::QUIESCE,
            Body::Network(_) => kind::NETWORK,
            Body::Stdin(_) => kind::STDIN,
            Body::Eof => kind::EOF,
            Body::FileData(_) => kind::FILE_DATA,
            Body::Credit(_) => kind::CREDIT,
            Body::HelloReply(_) => kind::HELLO_REPLY,
            Body::Stdout(_) => kind::STDOUT,
            Body::Stderr(_) => kind::STDERR,
            Body::Exited(_) => kind::EXITED,
            Body::Ok => kind::OK,
            Body::WriteDone { .. } => kind::WRITE_DONE,
            Body::ReadStart(_) => kind::READ_START,
            Body::ReadDone { .. } => kind::READ_DONE,
            Body::Reseeded(_) => kind::RESEEDED,
            Body::Error(_) => kind::ERROR,
        }
    }

    /// A short name for logs and error messages.
    pub fn name(&self) -> &'static str {
        kind_name(self.kind()).unwrap_or("unknown")
    }

    /// Appends the payload of this message to `out`.
    pub(crate) fn encode_payload(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(out);
        match self {
            Body::Hello(h) => {
                w.u16(h.min_version);
                w.u16(h.max_version);
            }
            Body::Exec(e) => {
                w.count(e.argv.len());
                for a in &e.argv {
                    w.bytes(a.as_bytes());
                }
                w.count(e.env.len());
                for (k, v) in &e.env {
                    w.bytes(k.as_bytes());
                    w.bytes(v.as_bytes());
                }
                match &e.cwd {
                    Some(c) => {
                        w.bool(true);
                        w.bytes(c.as_os_str().as_bytes());
                    }
                    None => w.bool(false),
                }
                w.bool(e.stdin);
                match e.timeout_ms {
                    Some(t) => {
                        w.bool(true);
                        w.u64(t);
                    }
                    None => w.bool(false),
                }
                // Optional trailing field: absent means not written at all.
                if let Some(u) = e.user {
                    w.u8(USER_PRESENT);
                    w.u32(u.uid);
                    w.u32(u.gid);
                }
            }
            Body::Signal(s) => {
                w.u64(s.target);
                w.i32(s.signal);
            }
            Body::WriteFile(f) => {
                w.bytes(f.path.as_os_str().as_bytes());
                w.u32(f.mode);
                w.u64(f.size);
            }
            Body::ReadFile(f) => {
                w.bytes(f.path.as_os_str().as_bytes());
                w.u64(f.limit);
            }
            Body::Shutdown | Body::Quiesce | Body::Eof | Body::Ok => {}
            Body::Network(n) => {
                w.raw(&n.mac);
                w.raw(&n.ipv4.addr.octets());
                w.u8(n.ipv4.prefix);
                w.raw(&n.ipv4.gateway.octets());
                match &n.ipv6 {
                    Some(v6) => {
                        w.bool(true);
                        w.raw(&v6.addr.octets());
                        w.u8(v6.prefix);
                        w.raw(&v6.gateway.octets());
                    }
                    None => w.bool(false),
                }
                w.count(n.nameservers.len());
                for ns in &n.nameservers {
                    match ns {
                        IpAddr::V4(a) => {
                            w.u8(4);
                            w.raw(&a.octets());
                        }
                        IpAddr::V6(a) => {
                            w.u8(6);
                            w.raw(&a.octets());
                        }
                    }
                }
            }
            Body::Reseed(r) => {
                w.bytes(&r.entropy);
                w.raw(&r.nonce);
                w.i64(r.time.secs);
                w.u32(r.time.nanos);
            }
            Body::Stdin(d) | Body::FileData(d) | Body::Stdout(d) | Body::Stderr(d) => w.raw(d),
            Body::Credit(n) => w.u32(*n),
            Body::HelloReply(h) => {
                w.u16(h.version);
                w.u16(h.min_version);
                w.u16(h.max_version);
                w.u64(h.uptime_ms);
                w.bytes(h.agent.as_bytes());
            }
            Body::Exited(x) => {
                match x.status {
                    ExitStatus::Code(c) => {
                        w.u8(0);
                        w.i32(c);
                    }
                    ExitStatus::Signal(s) => {
                        w.u8(1);
                        w.i32(s);
                    }
                }
                w.bool(x.timed_out);
            }
            Body::WriteDone { bytes } | Body::ReadDone { bytes } => w.u64(*bytes),
            Body::ReadStart(i) => {
                w.u64(i.size);
                w.u32(i.mode);
            }
            Body::Reseeded(r) => {
                w.bool(r.reseeded);
                w.raw(&r.nonce);
                w.bool(r.clock_set);
                w.bytes(r.detail.as_bytes());
            }
            Body::Error(e) => {
                w.u16(e.code.to_wire());
                w.bytes(e.message.as_bytes());
            }
        }
    }

    /// Decodes the payload of a frame of kind `kind`. `Ok(None)` means the
    /// kind is unknown.
    pub(crate) fn decode(kind: u8, payload: &[u8]) -> Result<Option<Body>, PayloadError> {
        let mut r = Reader::new(payload);
        let body = match kind {
            kind::HELLO => Body::Hello(Hello {
                min_version: r.u16("min_version")?,
                max_version: r.u16("max_version")?,
            }),
            kind::EXEC => Body::Exec(decode_exec(&mut r)?),
            kind::SIGNAL => {
                let target = r.u64("target")?;
                let signal = r.i32("signal")?;
                if !(1..=MAX_SIGNAL).contains(&signal) {
                    return Err(PayloadError::Invalid("signal (must be 1..=64)"));
                }
                Body::Signal(SignalRequest { target, signal })
            }
            kind::WRITE_FILE => {
                let path = path(&mut r)?;
                let mode = r.u32("mode")?;
                if mode > 0o7777 {
                    return Err(PayloadError::Invalid("mode (must be at most 0o7777)"));
                }
                let size = r.u64("size")?;
                Body::WriteFile(WriteFileRequest { path, mode, size })
            }
            kind::READ_FILE => Body::ReadFile(ReadFileRequest {
                path: path(&mut r)?,
                limit: r.u64("limit")?,
            }),
            kind::SHUTDOWN => Body::Shutdown,
            kind::QUIESCE => Body::Quiesce,
            kind::NETWORK => Body::Network(decode_network(&mut r)?),
            kind::RESEED => {
                let entropy = r.bytes("entropy")?;
                if !(MIN_RESEED_ENTROPY..=MAX_RESEED_ENTROPY).contains(&entropy.len()) {
                    return Err(PayloadError::Invalid("entropy (must be 32..=4096 bytes)"));
                }
                let entropy = entropy.to_vec();
                let nonce = r.fixed::<16>("nonce")?;
                let secs = r.i64("time.secs")?;
                let nanos = r.u32("time.nanos")?;
                if nanos >= 1_000_000_000 {
                    return Err(PayloadError::Invalid("time.nanos"));
                }
                Body::Reseed(ReseedRequest {
                    entropy,
                    nonce,
                    time: WallTime { secs, nanos },
                })
            }
            kind::STDIN => Body::Stdin(r.rest().to_vec()),
            kind::EOF => Body::Eof,
            kind::FILE_DATA => Body::FileData(r.rest().to_vec()),
            kind::CREDIT => Body::Credit(r.u32("credit")?),
            kind::HELLO_REPLY => Body::HelloReply(HelloReply {
                version: r.u16("version")?,
                min_version: r.u16("min_version")?,
                max_version: r.u16("max_version")?,
                uptime_ms: r.u64("uptime_ms")?,
                agent: r.string("agent")?,
            }),
            kind::STDOUT => Body::Stdout(r.rest().to_vec()),
            kind::STDERR => Body::Stderr(r.rest().to_vec()),
            kind::EXITED => {
                let status = match r.u8("status")? {
                    0 => ExitStatus::Code(r.i32("exit code")?),
                    1 => {
                        // The host reports 128 + n: a guest must not pick n.
                        let n = r.i32("signal")?;
                        if !(1..=MAX_SIGNAL).contains(&n) {
                            return Err(PayloadError::Invalid("signal (must be 1..=64)"));
                        }
                        ExitStatus::Signal(n)
                    }
                    _ => return Err(PayloadError::Invalid("status")),
                };
                Body::Exited(ExitReport {
                    status,
                    timed_out: r.bool("timed_out")?,
                })
            }
            kind::OK => Body::Ok,
            kind::WRITE_DONE => Body::WriteDone {
                bytes: r.u64("bytes")?,
            },
            kind::READ_START => Body::ReadStart(FileInfo {
                size: r.u64("size")?,
                mode: r.u32("mode")?,
            }),
            kind::READ_DONE => Body::ReadDone {
                bytes: r.u64("bytes")?,
            },
            kind::RESEEDED => Body::Reseeded(ReseedReply {
                reseeded: r.bool("reseeded")?,
                nonce: r.fixed::<16>("nonce")?,
                clock_set: r.bool("clock_set")?,
                detail: r.string("detail")?,
            }),
            kind::ERROR => Body::Error(ErrorReply {
                code: ErrorCode::from_wire(r.u16("code")?),
                message: r.string("message")?,
            }),
            _ => return Ok(None),
        };
        r.finish()?;
        Ok(Some(body))
    }
}

/// The name of a message kind, `None` when unknown.
pub fn kind_name(kind: u8) -> Option<&'static str> {
    Some(match kind {
        kind::HELLO => "hello",
        kind::EXEC => "exec",
        kind::SIGNAL => "signal",
        kind::WRITE_FILE => "write_file",
        kind::READ_FILE => "read_file",
        kind::SHUTDOWN => "shutdown",
        kind::RESEED => "reseed",
        kind::QUIESCE => "quiesce",
        kind::NETWORK => "network",
        kind::STDIN => "stdin",
        kind::EOF => "eof",
        kind::FILE_DATA => "file_data",
        kind::CREDIT => "credit",
        kind::HELLO_REPLY => "hello_reply",
        kind::STDOUT => "stdout",
        kind::STDERR => "stderr",
        kind::EXITED => "exited",
        kind::OK => "ok",
        kind::WRITE_DONE => "write_done",
        kind::READ_START => "read_start",
        kind::READ_DONE => "read_done",
        kind::RESEEDED => "reseeded",
        kind::ERROR => "error",
        _ => return None,
    })
}

/// Bytes bound for the kernel (argv, env, paths) must not contain NUL.
fn os_string(raw: &[u8], what: &'static str) -> Result<OsString, PayloadError> {
    if raw.contains(&0) {
        return Err(PayloadError::Invalid(what));
    }
    Ok(OsString::from_vec(raw.to_vec()))
}

fn path(r: &mut Reader<'_>) -> Result<PathBuf, PayloadError> {
    let raw = r.bytes("path")?;
    if raw.is_empty() {
        return Err(PayloadError::Invalid("path (empty)"));
    }
    Ok(PathBuf::from(os_string(raw, "path (contains NUL)")?))
}

fn decode_network(r: &mut Reader<'_>) -> Result<NetworkConfig, PayloadError> {
    let mac = r.fixed::<6>("mac")?;
    let ipv4 = Ipv4Iface {
        addr: Ipv4Addr::from(r.fixed::<4>("ipv4.addr")?),
        prefix: r.u8("ipv4.prefix")?,
        gateway: Ipv4Addr::from(r.fixed::<4>("ipv4.gateway")?),
    };
    let ipv6 = if r.bool("ipv6 present")? {
        Some(Ipv6Iface {
            addr: Ipv6Addr::from(r.fixed::<16>("ipv6.addr")?),
            prefix: r.u8("ipv6.prefix")?,
            gateway: Ipv6Addr::from(r.fixed::<16>("ipv6.gateway")?),
        })
    } else {
        None
    };
    // Each resolver takes at least its family byte and four address bytes.
    let n = r.count(5, "nameservers")?;
    if n > MAX_NAMESERVERS {
        return Err(PayloadError::Invalid("nameservers (1..=3)"));
    }
    let mut nameservers = Vec::with_capacity(n);
    for _ in 0..n {
        nameservers.push(match r.u8("nameserver family")? {
            4 => IpAddr::from(r.fixed::<4>("nameserver")?),
            6 => IpAddr::from(r.fixed::<16>("nameserver")?),
            _ => return Err(PayloadError::Invalid("nameserver family (4 or 6)")),
        });
    }
    let cfg = NetworkConfig {
        mac,
        ipv4,
        ipv6,
        nameservers,
    };
    cfg.validate().map_err(PayloadError::Invalid)?;
    Ok(cfg)
}

/// The tag of `ExecRequest::user` when it is on the wire. There is no tag
/// for "absent": an absent user is not written, so every request has exactly
/// one encoding.
const USER_PRESENT: u8 = 1;

fn decode_exec(r: &mut Reader<'_>) -> Result<ExecRequest, PayloadError> {
    // Each argument takes at least its 4-byte length.
    let argc = r.count(4, "argv")?;
    if argc == 0 {
        return Err(PayloadError::Invalid("argv (empty)"));
    }
    let mut argv = Vec::with_capacity(argc);
    for _ in 0..argc {
        argv.push(os_string(r.bytes("argv")?, "argv (contains NUL)")?);
    }
    if argv[0].is_empty() {
        return Err(PayloadError::Invalid("argv[0] (empty)"));
    }
    let envc = r.count(8, "env")?;
    let mut env = Vec::with_capacity(envc);
    for _ in 0..envc {
        let k = r.bytes("env name")?;
        if k.is_empty() || k.contains(&b'=') {
            return Err(PayloadError::Invalid("env name (empty or contains '=')"));
        }
        let k = os_string(k, "env name (contains NUL)")?;
        let v = os_string(r.bytes("env value")?, "env value (contains NUL)")?;
        env.push((k, v));
    }
    let cwd = if r.bool("cwd present")? {
        Some(PathBuf::from(os_string(
            r.bytes("cwd")?,
            "cwd (contains NUL)",
        )?))
    } else {
        None
    };
    let stdin = r.bool("stdin")?;
    let timeout_ms = if r.bool("timeout present")? {
        Some(r.u64("timeout_ms")?)
    } else {
        None
    };
    // A request may end here (hosts that never ask for a user, and older
    // hosts, write nothing more). Otherwise exactly a tag and the ids
    // follow; the caller's `finish` refuses anything after them.
    let user = if r.is_empty() {
        None
    } else {
        if r.u8("user present")? != USER_PRESENT {
            return Err(PayloadError::Invalid("user present (must be 1 when sent)"));
        }
        Some(ExecUser {
            uid: r.u32("user.uid")?,
            gid: r.u32("user.gid")?,
        })
    };
    Ok(ExecRequest {
        argv,
        env,
        cwd,
        stdin,
        timeout_ms,
        user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(req: &ExecRequest) -> Vec<u8> {
        let mut out = Vec::new();
        Body::Exec(req.clone()).encode_payload(&mut out);
        out
    }

    fn decode(payload: &[u8]) -> Result<ExecRequest, PayloadError> {
        match Body::decode(kind::EXEC, payload)? {
            Some(Body::Exec(e)) => Ok(e),
            other => panic!("expected an exec, got {other:?}"),
        }
    }

    fn full() -> ExecRequest {
        let mut req = ExecRequest::new(["sh", "-c", "id"]);
        req.cwd = Some(PathBuf::from("/tmp"));
        req.stdin = true;
        req.timeout_ms = Some(1234);
        req
    }

    #[test]
    fn exec_round_trips_without_a_user() {
        let req = full();
        assert_eq!(req.user, None);
        assert_eq!(decode(&payload(&req)).unwrap(), req);
        assert_eq!(
            decode(&payload(&ExecRequest::new(["true"]))).unwrap(),
            ExecRequest::new(["true"])
        );
    }

    #[test]
    fn exec_round_trips_with_a_user() {
        for (uid, gid) in [(0, 0), (65534, 65534), (1000, 0), (u32::MAX, 1)] {
            let mut req = full();
            req.user = Some(ExecUser { uid, gid });
            assert_eq!(decode(&payload(&req)).unwrap(), req);
        }
    }

    #[test]
    fn a_user_is_a_trailing_field_that_is_absent_when_unset() {
        let mut req = full();
        let without = payload(&req);
        req.user = Some(ExecUser {
            uid: 0x0102_0304,
            gid: 7,
        });
        let with = payload(&req);
        // What an older agent reads is unchanged; the user only appends.
        assert_eq!(&with[..without.len()], &without[..]);
        assert_eq!(
            &with[without.len()..],
            &[1, 4, 3, 2, 1, 7, 0, 0, 0][..],
            "tag, then uid and gid little-endian"
        );
    }

    #[test]
    fn a_request_encoded_without_the_field_decodes_with_no_user() {
        // Hand-built as an older host writes it: ends after timeout_ms.
        let mut p = Vec::new();
        p.extend_from_slice(&1u32.to_le_bytes()); // argc
        p.extend_from_slice(&2u32.to_le_bytes());
        p.extend_from_slice(b"id");
        p.extend_from_slice(&0u32.to_le_bytes()); // envc
        p.push(0); // no cwd
        p.push(0); // stdin: false
        p.push(0); // no timeout
        let req = decode(&p).unwrap();
        assert_eq!(req.argv, [OsString::from("id")]);
        assert_eq!(req.user, None);
    }

    #[test]
    fn truncated_or_padded_users_are_refused() {
        let mut req = full();
        req.user = Some(ExecUser {
            uid: 65534,
            gid: 65534,
        });
        let good = payload(&req);
        let base = payload(&full()).len();
        // Every cut inside the user field (after the tag, inside uid, inside gid).
        for cut in base + 1..good.len() {
            match decode(&good[..cut]) {
                Err(PayloadError::Truncated(what)) => assert!(what.starts_with("user"), "{what}"),
                other => panic!("cut at {cut}: expected truncation, got {other:?}"),
            }
        }
        // Bytes after the user.
        for extra in [&[0u8][..], &[1], &[0xff; 9]] {
            let mut bad = good.clone();
            bad.extend_from_slice(extra);
            assert_eq!(decode(&bad), Err(PayloadError::TrailingBytes(extra.len())));
        }
        // A tag other than "present", with or without ids after it.
        for tag in [0u8, 2, 0xff] {
            let mut bad = payload(&full());
            bad.push(tag);
            assert!(
                matches!(decode(&bad), Err(PayloadError::Invalid(_))),
                "tag {tag}"
            );
            bad.extend_from_slice(&[0; 8]);
            assert!(
                matches!(decode(&bad), Err(PayloadError::Invalid(_))),
                "tag {tag}"
            );
        }
    }
}
