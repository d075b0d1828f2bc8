//! Templates: booting an image, capturing it into the store, and finding one to fork.

use std::ffi::OsString;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use super::boot::{BootKit, ResolvedImage, BASE_CMDLINE};
use crate::fork::freeze::{FreezeOptions, WarmupOutput};
use crate::fork::jail::Jail;
use crate::fork::state::STATE_FORMAT;
use crate::fork::store::{TemplateMeta, TemplateName, TemplateStore};
use crate::fork::Template;
use crate::host::fingerprint::HostFingerprint;
use crate::image::store::ImageName;

/// How a template guest misbehaves at its reseed, for the gate's tests.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestReseed {
    Fail,
    Hang,
    WrongNonce,
}

/// What a template is made of.
#[derive(Debug, Clone)]
pub struct TemplateSpec {
    pub name: TemplateName,
    pub mem_mib: u64,
    pub vcpus: u64,
    /// Give up when the guest agent is not ready within this.
    pub boot_timeout: Duration,
    /// For the gate's tests only: every fork of the template answers its reseed wrongly.
    pub test_reseed: Option<TestReseed>,
    /// For tests only: appended to the guest's kernel command line (e.g. `noapictimer`:
    /// a guest that keeps the PIT as its clock).
    pub test_kernel_args: Vec<String>,
    /// Run in the template before capture; must exit 0 and leave no process behind.
    pub warmup: Vec<OsString>,
    /// The image to boot (`None`: the built-in default). For an existing template, a
    /// given image must be the one it was made from.
    pub image: Option<ImageName>,
}

impl TemplateSpec {
    /// The default shape (256 MiB, one vCPU, no warm-up) under `name`.
    pub fn new(name: TemplateName) -> Self {
        TemplateSpec {
            name,
            mem_mib: 256,
            vcpus: 1,
            boot_timeout: Duration::from_secs(120),
            test_reseed: None,
            test_kernel_args: Vec::new(),
            warmup: Vec::new(),
            image: None,
        }
    }
}

/// A template just captured and saved, and what it took.
pub struct CreatedTemplate {
    pub template: Template,
    pub meta: TemplateMeta,
    /// The warm-up's output, if there was one (it exited 0).
    pub warmup: Option<WarmupOutput>,
    /// Start → agent ready.
    pub boot: Duration,
    /// Quiesce, stop, capture and seal.
    pub capture: Duration,
}

/// How a template's image is found: [`super::boot::resolve_image`], or a stand-in in tests.
pub trait ImageResolver: FnOnce(Option<&ImageName>) -> anyhow::Result<ResolvedImage> {}
impl<F: FnOnce(Option<&ImageName>) -> anyhow::Result<ResolvedImage>> ImageResolver for F {}

/// Where templates boot: in a `cleave-fork-worker --template` (`exe`), jailed as forks
/// are when there is a `jail` ([`crate::fork::template_worker`]).
#[derive(Debug, Clone, Copy)]
pub struct TemplateWorkers<'a> {
    pub exe: &'a std::path::Path,
    pub jail: Option<&'a Jail>,
}

/// Boots `spec.image` (found by `resolve`) in a template worker, runs the warm-up,
/// captures and saves the template as `spec.name` (which must not exist).
pub fn create(
    store: &TemplateStore,
    spec: &TemplateSpec,
    resolve: impl ImageResolver,
    workers: TemplateWorkers<'_>,
) -> anyhow::Result<CreatedTemplate> {
    // Checked before anything is resolved or booted.
    if let Some(arg) = spec
        .test_kernel_args
        .iter()
        .find(|a| a.is_empty() || a.contains(|c: char| c.is_whitespace() || c.is_control()))
    {
        anyhow::bail!("kernel argument {arg:?} must be one word (no spaces or controls)");
    }
    if store.exists(&spec.name) {
        anyhow::bail!(
            "a template named {} exists already (remove it with `cleave template rm {}`)",
            spec.name,
            spec.name
        );
    }
    let resolved = resolve(spec.image.as_ref())?;
    let image_spec = resolved.spec;
    let pins = (
        image_spec.kernel.sha256.to_string(),
        image_spec.initrd.sha256.to_string(),
    );
    let host = HostFingerprint::current()
        .map_err(|e| anyhow::anyhow!("reading this host's fingerprint: {e}"))?
        .clone();
    let BootKit { machine, image, .. } =
        BootKit::check(spec.mem_mib, spec.vcpus, || Ok(image_spec))?;
    let mut cmdline = BASE_CMDLINE.to_string();
    if let Some(mode) = spec.test_reseed {
        let v = match mode {
            TestReseed::Fail => "fail",
            TestReseed::Hang => "hang",
            TestReseed::WrongNonce => "wrong-nonce",
        };
        cmdline.push_str(&format!(" {}={v}", cleave_guest::reseed::TEST_RESEED_FLAG));
    }
    for arg in &spec.test_kernel_args {
        cmdline.push(' ');
        cmdline.push_str(arg);
    }
    let opts = FreezeOptions {
        machine,
        cmdline,
        warmup: (!spec.warmup.is_empty()).then(|| spec.warmup.clone()),
        boot_timeout: spec.boot_timeout,
    };
    let frozen = crate::fork::template_worker::create(workers.exe, workers.jail, &image, &opts)
        .with_context(|| format!("creating template {}", spec.name))?;
    let meta = TemplateMeta {
        name: spec.name.clone(),
        created: unix_now(),
        mem_mib: machine.mem.mib(),
        vcpus: machine.vcpus.get(),
        kernel_sha256: pins.0,
        initrd_sha256: pins.1,
        cmdline: opts.guest_cmdline(),
        warmup: opts
            .warmup
            .as_ref()
            .map(|w| w.iter().map(|a| a.to_string_lossy().into_owned()).collect()),
        format: STATE_FORMAT,
        host: Some(host),
        image: resolved.name.map(String::from),
        defaults: resolved.defaults,
    };
    store.save(&frozen.template, &meta)?;
    Ok(CreatedTemplate {
        template: frozen.template,
        meta,
        warmup: frozen.warmup,
        boot: frozen.boot,
        capture: frozen.capture,
    })
}

/// The template `spec.name`, loaded (and checked for this host) when it exists, else
/// created from `image`. A template that exists with another shape than `spec` asks for
/// is refused rather than silently used; `shape_given` says which of mem/vcpus the
/// caller actually chose (only those are compared).
pub fn ensure(
    store: &TemplateStore,
    spec: &TemplateSpec,
    shape_given: (bool, bool),
    resolve: impl ImageResolver,
    workers: TemplateWorkers<'_>,
) -> anyhow::Result<(Template, TemplateMeta, bool)> {
    if store.exists(&spec.name) {
        let (t, meta) = store.load(&spec.name)?;
        for (flag, given, asked, has) in [
            ("--mem", shape_given.0, spec.mem_mib, meta.mem_mib),
            ("--vcpus", shape_given.1, spec.vcpus, u64::from(meta.vcpus)),
        ] {
            if given && asked != has {
                anyhow::bail!(
                    "template {} has {flag} {has}; {flag} applies only when a template is \
                     created: leave it out, or remove the template (`cleave template rm {}`)",
                    spec.name,
                    spec.name
                );
            }
        }
        if let Some(asked) = &spec.image {
            if meta.image_label() != asked.as_str() {
                anyhow::bail!(
                    "template {} was made from {}, not image {asked}: leave out --image, or \
                     use another template name (`cleave template create --name NAME --image \
                     {asked}`)",
                    spec.name,
                    meta.image_label(),
                );
            }
        }
        return Ok((t, meta, false));
    }
    let created = create(store, spec, resolve, workers)?;
    Ok((created.template, created.meta, true))
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
