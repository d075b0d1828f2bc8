//! The Sandboxes service (operator calls).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use super::pb::sandboxes_server::Sandboxes;
use super::pb::{self, fork_result};
use super::{blocking, caller_of, status_of, Api, Finish};
use crate::fork::store::TemplateName;
use crate::net::EgressPolicy;
use crate::node::credential::SandboxId;
use crate::node::{LiveSandbox, SandboxRequest};

pub fn sandbox_pb(s: &LiveSandbox) -> pb::Sandbox {
    pb::Sandbox {
        id: s.id.to_string(),
        template: s.template.to_string(),
        created_unix: s.created,
        expires_unix: s.expires.unwrap_or(0),
        ipv4: s.ip.map(|ip| ip.to_string()).unwrap_or_default(),
        fork_ms: s.fork_time.as_secs_f64() * 1e3,
        active_execs: s.active_execs(),
    }
}

fn parse_id(s: &str) -> Result<SandboxId, Status> {
    s.parse::<SandboxId>()
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

impl Api {
    fn sandbox_request(&self, req: &pb::CreateSandboxesRequest) -> Result<SandboxRequest, Status> {
        let template = if req.template.is_empty() {
            TemplateName::default_name()
        } else {
            req.template
                .parse::<TemplateName>()
                .map_err(|e| Status::invalid_argument(e.to_string()))?
        };
        if template.as_str() == TemplateName::DEFAULT
            && self.config.default_template
            && !self.metrics.template_ready.load(Ordering::Acquire)
        {
            return Err(Status::unavailable(
                "the default template is still being made; retry when /readyz says ready",
            ));
        }
        let policy = match &req.network {
            Some(n) => Some(
                EgressPolicy::parse(&n.allow, &n.allow_cidr)
                    .map_err(|e| Status::invalid_argument(format!("network policy: {e}")))?,
            ),
            None => None,
        };
        Ok(SandboxRequest {
            template,
            count: req.count.max(1),
            ttl: (req.ttl_secs > 0).then(|| Duration::from_secs(req.ttl_secs)),
            policy,
            all_or_nothing: req.all_or_nothing,
        })
    }
}

#[tonic::async_trait]
impl Sandboxes for Api {
    async fn create_sandboxes(
        &self,
        request: Request<pb::CreateSandboxesRequest>,
    ) -> Result<Response<pb::CreateSandboxesResponse>, Status> {
        let started = Instant::now();
        let caller = caller_of(&request);
        let req = request.into_inner();
        let mut ids = Vec::new();
        let result = async {
            self.admit_operator(&caller)?;
            let sreq = self.sandbox_request(&req)?;
            let node = self.node.clone();
            let outcomes = blocking(move || node.create_sandboxes(&sreq))
                .await?
                .map_err(status_of)?;
            let results = outcomes
                .into_iter()
                .map(|o| {
                    let result = match o {
                        Ok(c) => {
                            self.metrics.fork_ok(c.sandbox.fork_time);
                            ids.push(c.sandbox.id.to_string());
                            fork_result::Result::Created(pb::CreatedSandbox {
                                sandbox: Some(sandbox_pb(&c.sandbox)),
                                token: c.token.reveal(),
                            })
                        }
                        Err(f) => {
                            self.metrics.fork_failed(f.gate_reason);
                            fork_result::Result::Failed(pb::ForkFailure {
                                message: f.message,
                                gate_failure: f.gate_reason.unwrap_or_default().to_string(),
                            })
                        }
                    };
                    pb::ForkResult {
                        result: Some(result),
                    }
                })
                .collect();
            Ok(pb::CreateSandboxesResponse { results })
        }
        .await;
        self.respond(
            Finish::new("sandbox.create", &caller, started)
                .audited()
                .sandboxes(ids)
                .template(&req.template),
            result,
        )
    }

    async fn list_sandboxes(
        &self,
        request: Request<pb::ListSandboxesRequest>,
    ) -> Result<Response<pb::ListSandboxesResponse>, Status> {
        let started = Instant::now();
        let caller = caller_of(&request);
        let result = (|| {
            self.admit_operator(&caller)?;
            Ok(pb::ListSandboxesResponse {
                sandboxes: self.node.list().iter().map(|s| sandbox_pb(s)).collect(),
            })
        })();
        self.respond(Finish::new("sandbox.list", &caller, started), result)
    }

    async fn get_sandbox(
        &self,
        request: Request<pb::GetSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let started = Instant::now();
        let caller = caller_of(&request);
        let req = request.into_inner();
        let result = (|| {
            self.admit_operator(&caller)?;
            let id = parse_id(&req.id)?;
            let s = self.node.get(&id).map_err(status_of)?;
            Ok(sandbox_pb(&s))
        })();
        self.respond(Finish::new("sandbox.get", &caller, started), result)
    }

    async fn delete_sandbox(
        &self,
        request: Request<pb::DeleteSandboxRequest>,
    ) -> Result<Response<pb::DeleteSandboxResponse>, Status> {
        let started = Instant::now();
        let caller = caller_of(&request);
        let req = request.into_inner();
        let result = async {
            self.admit_operator(&caller)?;
            let id = parse_id(&req.id)?;
            let node = self.node.clone();
            blocking(move || node.destroy(&id))
                .await?
                .map_err(status_of)?;
            Ok(pb::DeleteSandboxResponse {})
        }
        .await;
        self.respond(
            Finish::new("sandbox.delete", &caller, started)
                .audited()
                .sandboxes(vec![super::bounded(&req.id)]),
            result,
        )
    }
}
