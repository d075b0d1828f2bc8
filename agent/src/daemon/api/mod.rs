//! The gRPC services (`proto/cleave/v1/cleave.proto`): who is calling, whether they may,
//! the rate limit, the audit line and the request counter, then a call into the node.
//! The node is blocking code: it runs on threads of its own, never on the runtime's.

mod exec;
mod files;
mod sandboxes;
mod templates;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use super::audit::{rfc3339, AuditLog, AuditRecord};
use super::config::DaemonConfig;
use super::metrics::{code_name, Metrics};
use super::rate::RateLimiter;
use crate::fork::store::StoreError;
use crate::node::credential::SandboxId;
use crate::node::{LiveSandbox, Node, NodeError};

pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("cleave.v1");
}

/// Everything a service needs; cheap to clone.
#[derive(Clone)]
pub struct Api {
    pub node: Arc<Node>,
    pub config: Arc<DaemonConfig>,
    pub audit: Arc<AuditLog>,
    pub rate: Arc<RateLimiter>,
    pub metrics: Arc<Metrics>,
}

/// Who made a request: a local uid (the Unix socket's peer credentials) or a TLS client
/// certificate (its sha256, shortened).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Uid(u32),
    Cert(String),
    Unknown,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Uid(u) => write!(f, "uid:{u}"),
            Caller::Cert(c) => write!(f, "cert:{c}"),
            Caller::Unknown => f.write_str("unknown"),
        }
    }
}

pub fn caller_of<T>(req: &Request<T>) -> Caller {
    if let Some(info) = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
    {
        if let Some(cred) = info.peer_cred {
            return Caller::Uid(cred.uid());
        }
    }
    if let Some(certs) = req.peer_certs() {
        if let Some(c) = certs.first() {
            return Caller::Cert(hex::encode(&Sha256::digest(c.as_ref())[..12]));
        }
    }
    Caller::Unknown
}

/// Runs blocking node work on a thread of its own (not a runtime thread: a sandbox's
/// network waits there for its DNS listener to close when it is torn down). The thread
/// starts now, not when the returned future is first polled.
pub fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> R + Send + 'static,
) -> impl std::future::Future<Output = Result<R, Status>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let started = std::thread::Builder::new()
        .name("cleave-api".into())
        .spawn(move || {
            let _ = tx.send(f());
        });
    async move {
        started.map_err(|e| {
            tracing::error!(error = %e, "starting an API thread");
            Status::unavailable("the daemon cannot start a thread now; retry shortly")
        })?;
        rx.await
            .map_err(|_| Status::internal("the request's worker thread failed; see the node log"))
    }
}

/// A node error as the caller sees it: what and how to fix; internal detail (paths, OS
/// errors) only in the node log.
pub fn status_of(e: NodeError) -> Status {
    match e {
        NodeError::BadRequest(m) => Status::invalid_argument(m),
        NodeError::Template(StoreError::NotFound { name }) => Status::not_found(format!(
            "no template {name} (create it with `cleave template create --name {name}`, or \
             through the Templates service)"
        )),
        NodeError::Template(e @ StoreError::BadName(_)) => Status::invalid_argument(e.to_string()),
        NodeError::Template(e @ StoreError::Exists { .. }) => Status::already_exists(e.to_string()),
        NodeError::Template(e @ StoreError::Unusable { .. }) => {
            Status::failed_precondition(e.to_string())
        }
        e @ (NodeError::TooManySandboxes { .. } | NodeError::MemoryBudget { .. }) => {
            Status::resource_exhausted(e.to_string())
        }
        e @ NodeError::NotFound(_) => Status::not_found(e.to_string()),
        e @ (NodeError::TemplateInUse { .. } | NodeError::NoNetwork(_)) => {
            Status::failed_precondition(e.to_string())
        }
        e => {
            tracing::error!(error = %e, "request failed");
            Status::internal("the daemon failed to do this; the node log says why")
        }
    }
}

/// Cuts a message a guest or the system produced to a size fit for a status or a log.
pub fn bounded(s: &str) -> String {
    const MAX: usize = 512;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &s[..end], s.len() - end)
}

impl Api {
    /// Refuses the request when its caller is over the rate limit.
    pub fn admit(&self, caller: &Caller) -> Result<(), Status> {
        if self.rate.allow(&caller.to_string()) {
            Ok(())
        } else {
            Err(Status::resource_exhausted(format!(
                "rate limit: more than {} requests per second from {caller}; slow down",
                self.config.requests_per_second
            )))
        }
    }

    /// An operator call: within the caller's rate, from an operator.
    pub fn admit_operator(&self, caller: &Caller) -> Result<(), Status> {
        self.admit(caller)?;
        self.operator(caller)
    }

    /// Operator calls: an allowed uid on the socket, or any verified client certificate.
    pub fn operator(&self, caller: &Caller) -> Result<(), Status> {
        match caller {
            Caller::Uid(u) if self.config.allowed_uids.contains(u) => Ok(()),
            Caller::Cert(_) => Ok(()),
            Caller::Uid(u) => Err(Status::permission_denied(format!(
                "uid {u} may not make operator calls on this daemon (allowed_uids in its \
                 config lists who may)"
            ))),
            Caller::Unknown => Err(Status::permission_denied(
                "the caller could not be identified (no peer credentials, no client \
                 certificate)",
            )),
        }
    }

    /// The sandbox a token-holder's request is for. Unknown sandbox and wrong token get
    /// the same answer, from the same constant-time path.
    pub async fn sandbox_for<T>(
        &self,
        req: &Request<T>,
        id: &str,
    ) -> Result<Arc<LiveSandbox>, Status> {
        let id: SandboxId = id
            .parse()
            .map_err(|e: crate::node::credential::BadSandboxId| {
                Status::invalid_argument(e.to_string())
            })?;
        let token = bearer(req)?;
        let node = self.node.clone();
        let shown = id.clone();
        blocking(move || node.authorize(&id, &token))
            .await?
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "the token does not grant access to sandbox {shown}"
                ))
            })
    }

    /// Records a unary request's end ([`Api::finish`]) and answers with its result.
    pub fn respond<T>(
        &self,
        f: Finish<'_>,
        result: Result<T, Status>,
    ) -> Result<tonic::Response<T>, Status> {
        self.finish(Finish {
            result: result.as_ref().map(drop).map_err(Status::code),
            ..f
        });
        result.map(tonic::Response::new)
    }

    /// Counts a finished request and, for mutating ones, writes its audit line.
    pub fn finish(&self, f: Finish<'_>) {
        let code = f.result.as_ref().err().map_or(tonic::Code::Ok, |c| *c);
        self.metrics.request(f.method, code);
        if f.audited {
            self.audit.write(&AuditRecord {
                time: rfc3339(SystemTime::now()),
                caller: &f.caller.to_string(),
                action: f.method,
                sandboxes: f.sandboxes,
                template: f.template,
                result: code_name(code),
                duration_ms: (f.started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            });
        }
    }
}

/// What [`Api::finish`] records.
pub struct Finish<'a> {
    pub method: &'static str,
    pub caller: &'a Caller,
    pub started: Instant,
    pub audited: bool,
    pub sandboxes: Vec<String>,
    pub template: Option<String>,
    pub result: Result<(), tonic::Code>,
}

impl<'a> Finish<'a> {
    /// A request counted (not audited) with no sandbox or template named, so far a success.
    pub fn new(method: &'static str, caller: &'a Caller, started: Instant) -> Self {
        Finish {
            method,
            caller,
            started,
            audited: false,
            sandboxes: Vec::new(),
            template: None,
            result: Ok(()),
        }
    }

    /// A mutating request: it gets an audit line.
    pub fn audited(self) -> Self {
        Finish {
            audited: true,
            ..self
        }
    }

    pub fn sandboxes(self, sandboxes: Vec<String>) -> Self {
        Finish { sandboxes, ..self }
    }

    pub fn template(self, name: &str) -> Self {
        Finish {
            template: Some(bounded(name)),
            ..self
        }
    }
}

/// The `authorization: Bearer <token>` metadata.
fn bearer<T>(req: &Request<T>) -> Result<String, Status> {
    let missing = || {
        Status::unauthenticated(
            "this call needs the sandbox's token: `authorization: Bearer <token>` (the CLI \
             takes --token or CLEAVE_TOKEN)",
        )
    };
    let v = req.metadata().get("authorization").ok_or_else(missing)?;
    let v = v.to_str().map_err(|_| missing())?;
    let t = v.strip_prefix("Bearer ").ok_or_else(missing)?.trim();
    // A token is 64 hex digits; anything far longer is not hashed.
    if t.is_empty() || t.len() > 128 {
        return Err(missing());
    }
    Ok(t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_and_bounded() {
        let mut r = Request::new(());
        assert_eq!(bearer(&r).unwrap_err().code(), tonic::Code::Unauthenticated);
        r.metadata_mut()
            .insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&r).unwrap(), "abc");
        let long = format!("Bearer {}", "a".repeat(1000));
        r.metadata_mut()
            .insert("authorization", long.parse().unwrap());
        assert!(bearer(&r).is_err());
        r.metadata_mut()
            .insert("authorization", "Basic abc".parse().unwrap());
        let e = bearer(&r).unwrap_err();
        assert!(e.message().contains("CLEAVE_TOKEN"));
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        assert_eq!(bounded("short"), "short");
        let s = "é".repeat(1000);
        let b = bounded(&s);
        assert!(b.len() < 600 && b.contains("bytes cut"), "{b}");
    }
}
