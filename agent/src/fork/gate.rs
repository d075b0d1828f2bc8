//! The host half of the reseed gate: the first thing that happens to a fork.
//!
//! A fork resumes with its template's kernel CRNG state, byte for byte, as do all its
//! siblings. Before anything else the host connects to the fork's agent and sends
//! [`ENTROPY_BYTES`] from its own `getrandom`, a fresh nonce and its wall-clock time. The
//! agent credits the bytes (`RNDADDENTROPY`), rekeys its CRNG now (`RNDRESEEDCRNG`), steps
//! its clock, and answers `{reseeded, nonce}`. The gate passes only on an answer within the
//! deadline that says `reseeded`, carries our nonce and set the clock; anything else — a
//! false, no answer, a late one, another nonce, an error — fails it, and the caller
//! destroys the fork. Only a passed gate hands out the [`Client`]: no exec or file request
//! can reach a fork that did not pass (and the agent refuses them itself until then).
//!
//! A fork's vsock device sends the guest a transport reset as it resumes. A connection
//! the guest accepted before handling that reset is dropped by it, so a connection that
//! closes before the answer is retried (with a fresh nonce) until the deadline.

use std::path::Path;
use std::time::{Duration, Instant};

use cleave_guest::boot::AGENT_VSOCK_PORT;
use cleave_guest::protocol::{
    Client, ClientError, ErrorReply, ReseedReply, ReseedRequest, WallTime,
};

use crate::devices::virtio::vsock::hybrid;
use crate::host::entropy;

/// Bytes of host entropy per fork: a full CRNG key's worth, credited at 8 bits a byte.
pub const ENTROPY_BYTES: usize = 64;

/// The default bound on resume → answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(
        "reseed gate: the guest agent reported reseeded: false ({detail}); its CRNG may \
         still be the template's"
    )]
    NotReseeded { detail: String },
    #[error(
        "reseed gate: the guest agent answered with another nonce than the one sent (a \
         stale or forged answer)"
    )]
    WrongNonce,
    #[error("reseed gate: the guest agent could not set its clock ({detail})")]
    ClockNotSet { detail: String },
    #[error("reseed gate: no answer from the guest agent within {0:?}")]
    Timeout(Duration),
    #[error("reseed gate: the guest agent refused the reseed ({0})")]
    Refused(ErrorReply),
    #[error("reseed gate: the guest agent broke the protocol ({0})")]
    Protocol(String),
    #[error("reseed gate: the host's getrandom failed: {0}")]
    Entropy(std::io::Error),
}

impl GateError {
    /// A short machine-readable reason (`--json`, logs).
    pub fn reason(&self) -> &'static str {
        match self {
            GateError::NotReseeded { .. } => "not_reseeded",
            GateError::WrongNonce => "wrong_nonce",
            GateError::ClockNotSet { .. } => "clock_not_set",
            GateError::Timeout(_) => "timeout",
            GateError::Refused(_) => "refused",
            GateError::Protocol(_) => "protocol",
            GateError::Entropy(_) => "host_entropy",
        }
    }
}

/// A fork whose gate passed: the agent's connection and its answer.
pub struct Passed {
    pub client: Client,
    pub reply: ReseedReply,
    /// Connection attempts it took (more than one: the transport reset raced us).
    pub attempts: u32,
}

/// Runs the gate against the fork whose hybrid-vsock socket is `socket`, within `timeout`
/// of now.
pub fn pass(socket: &Path, timeout: Duration) -> Result<Passed, GateError> {
    let deadline = Instant::now() + timeout;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(GateError::Timeout(timeout));
        }
        // The agent's listener survives the transport reset; until the guest has handled
        // the reset and accepted, connecting fails and is retried up to the deadline.
        let Ok(stream) = hybrid::connect(socket, AGENT_VSOCK_PORT, deadline) else {
            return Err(GateError::Timeout(timeout));
        };
        let client = Client::new(stream).map_err(|e| GateError::Protocol(e.to_string()))?;
        let left = deadline.saturating_duration_since(Instant::now());
        match exchange(&client, left) {
            Ok(Ok(reply)) => {
                return Ok(Passed {
                    client,
                    reply,
                    attempts,
                })
            }
            Ok(Err(e)) => return Err(e),
            Err(ClientError::Closed | ClientError::Io(_)) => {
                tracing::debug!(
                    attempts,
                    "reseed connection dropped (transport reset); retrying"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(ClientError::Timeout(_)) => return Err(GateError::Timeout(timeout)),
            Err(ClientError::Remote(e)) => return Err(GateError::Refused(e)),
            Err(e @ (ClientError::Protocol(_) | ClientError::Encode(_))) => {
                return Err(GateError::Protocol(e.to_string()))
            }
        }
    }
}

/// Reseeds the agent on an open connection (a template's warm-up, before it runs a
/// command) and judges the answer like the gate does.
pub fn reseed(client: &Client, timeout: Duration) -> Result<ReseedReply, GateError> {
    match exchange(client, timeout) {
        Ok(verdict) => verdict,
        Err(ClientError::Timeout(_)) => Err(GateError::Timeout(timeout)),
        Err(ClientError::Remote(e)) => Err(GateError::Refused(e)),
        Err(e) => Err(GateError::Protocol(e.to_string())),
    }
}

/// One reseed request with fresh entropy and nonce; the outer error is the connection's,
/// the inner the verdict on the answer.
fn exchange(
    client: &Client,
    timeout: Duration,
) -> Result<Result<ReseedReply, GateError>, ClientError> {
    let fresh = || -> std::io::Result<([u8; 16], Vec<u8>)> {
        let nonce = entropy::array::<16>()?;
        let mut bytes = vec![0u8; ENTROPY_BYTES];
        entropy::fill(&mut bytes)?;
        Ok((nonce, bytes))
    };
    let (nonce, bytes) = match fresh() {
        Ok(v) => v,
        Err(e) => return Ok(Err(GateError::Entropy(e))),
    };
    let req = ReseedRequest {
        entropy: bytes,
        nonce,
        time: WallTime::now(),
    };
    let reply = client.reseed(req, timeout)?;
    Ok(judge(nonce, &reply).map(|()| reply))
}

/// The verdict on an answer: our nonce, reseeded, clock set — in that order, so a stale
/// answer is never judged on what it claims.
fn judge(nonce: [u8; 16], reply: &ReseedReply) -> Result<(), GateError> {
    if reply.nonce != nonce {
        return Err(GateError::WrongNonce);
    }
    if !reply.reseeded {
        return Err(GateError::NotReseeded {
            detail: reply.detail.clone(),
        });
    }
    if !reply.clock_set {
        return Err(GateError::ClockNotSet {
            detail: reply.detail.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(reseeded: bool, nonce: [u8; 16], clock_set: bool) -> ReseedReply {
        ReseedReply {
            reseeded,
            nonce,
            clock_set,
            detail: "why".into(),
        }
    }

    #[test]
    fn passes_only_on_our_nonce_reseeded_and_clock_set() {
        let n = [7u8; 16];
        assert!(judge(n, &reply(true, n, true)).is_ok());
        assert!(matches!(
            judge(n, &reply(false, n, true)),
            Err(GateError::NotReseeded { .. })
        ));
        assert!(matches!(
            judge(n, &reply(true, n, false)),
            Err(GateError::ClockNotSet { .. })
        ));
        let mut other = n;
        other[15] ^= 1;
        assert!(matches!(
            judge(n, &reply(true, other, true)),
            Err(GateError::WrongNonce)
        ));
        // A stale answer is judged on its nonce first, whatever it claims.
        assert!(matches!(
            judge(n, &reply(false, other, false)),
            Err(GateError::WrongNonce)
        ));
    }

    #[test]
    fn no_socket_is_a_timeout_not_a_pass() {
        let dir = tempfile::tempdir().unwrap();
        let Err(e) = pass(&dir.path().join("nothing"), Duration::from_millis(50)) else {
            panic!("a gate with no agent passed");
        };
        assert!(matches!(e, GateError::Timeout(_)), "{e}");
        assert_eq!(e.reason(), "timeout");
    }
}
