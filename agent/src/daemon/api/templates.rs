//! The Templates service (operator calls).

use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use super::pb::templates_server::Templates;
use super::pb::{self};
use super::{blocking, caller_of, status_of, Api, Finish};
use crate::fork::store::{TemplateMeta, TemplateName};
use crate::image::store::{ImageName, ImageStore, ImageStoreError};
use crate::node::boot::resolve_image;
use crate::node::templates::TemplateSpec;

/// Most warm-up arguments and bytes a template request may carry.
const MAX_WARMUP_ARGS: usize = 256;

pub fn template_pb(m: &TemplateMeta) -> pb::Template {
    let why = m.unusable_reason();
    pb::Template {
        name: m.name.to_string(),
        mem_mib: m.mem_mib,
        vcpus: u32::from(m.vcpus),
        created_unix: m.created,
        kernel_sha256: m.kernel_sha256.clone(),
        initrd_sha256: m.initrd_sha256.clone(),
        usable: why.is_none(),
        unusable_reason: why.unwrap_or_default(),
        image: m.image_label().to_string(),
    }
}

/// The image a template request names (empty or `default`: the built-in one), checked to
/// exist before anything boots.
fn image_of(name: &str) -> Result<Option<ImageName>, Status> {
    if name.is_empty() {
        return Ok(None);
    }
    let image = name
        .parse::<ImageName>()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    if image.is_default() {
        return Ok(None);
    }
    match ImageStore::default_location().get(&image) {
        Ok(_) => Ok(Some(image)),
        Err(e @ ImageStoreError::NotFound(_)) => Err(Status::not_found(e.to_string())),
        Err(e) => {
            tracing::error!(error = %e, image = %image, "image unusable");
            Err(Status::failed_precondition(format!(
                "image {image} cannot be used; the node log says why"
            )))
        }
    }
}

fn parse_name(s: &str) -> Result<TemplateName, Status> {
    s.parse::<TemplateName>()
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl Templates for Api {
    async fn create_template(
        &self,
        request: Request<pb::CreateTemplateRequest>,
    ) -> Result<Response<pb::Template>, Status> {
        let started = Instant::now();
        let caller = caller_of(&request);
        let req = request.into_inner();
        let result = async {
            self.admit_operator(&caller)?;
            let name = parse_name(&req.name)?;
            if req.warmup.len() > MAX_WARMUP_ARGS {
                return Err(Status::invalid_argument(format!(
                    "warmup has {} arguments; at most {MAX_WARMUP_ARGS}",
                    req.warmup.len()
                )));
            }
            let spec = TemplateSpec {
                mem_mib: if req.mem_mib == 0 { 256 } else { req.mem_mib },
                vcpus: if req.vcpus == 0 {
                    1
                } else {
                    u64::from(req.vcpus)
                },
                boot_timeout: Duration::from_secs(120),
                warmup: req.warmup.iter().map(Into::into).collect(),
                image: image_of(&req.image)?,
                ..TemplateSpec::new(name)
            };
            let node = self.node.clone();
            let created = blocking(move || node.create_template(&spec, resolve_image))
                .await?
                .map_err(status_of)?;
            Ok(template_pb(&created.meta))
        }
        .await;
        self.respond(
            Finish::new("template.create", &caller, started)
                .audited()
                .template(&req.name),
            result,
        )
    }

    async fn list_templates(
        &self,
        request: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        let started = Instant::now();
        let caller = caller_of(&request);
        let result = async {
            self.admit_operator(&caller)?;
            let node = self.node.clone();
            let all = blocking(move || node.list_templates())
                .await?
                .map_err(status_of)?;
            Ok(pb::ListTemplatesResponse {
                templates: all.iter().map(template_pb).collect(),
            })
        }
        .await;
        self.respond(Finish::new("template.list", &caller, started), result)
    }

    async fn delete_template(
        &self,
        request: Request<pb::DeleteTemplateRequest>,
    ) -> Result<Response<pb::DeleteTemplateResponse>, Status> {
        let started = Instant::now();
        let caller = caller_of(&request);
        let req = request.into_inner();
        let result = async {
            self.admit_operator(&caller)?;
            let name = parse_name(&req.name)?;
            let node = self.node.clone();
            blocking(move || node.remove_template(&name))
                .await?
                .map_err(status_of)?;
            Ok(pb::DeleteTemplateResponse {})
        }
        .await;
        self.respond(
            Finish::new("template.delete", &caller, started)
                .audited()
                .template(&req.name),
            result,
        )
    }
}
