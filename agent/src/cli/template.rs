//! `cleave template create|ls|rm`: templates of the default image or of one `cleave image
//! build` made, kept in the template store (`fork::store`) for `cleave run --forks`.

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};

use crate::fork::jail::Jail;
use crate::fork::sandbox::worker_exe;
use crate::fork::store::{TemplateName, TemplateStore};
use crate::image::store::ImageName;
use crate::node::boot::resolve_image;
use crate::node::templates::{self, TemplateSpec, TemplateWorkers, TestReseed};

#[derive(Subcommand, Debug)]
pub enum TemplateCommand {
    /// Boot an image (the default, or --image), quiesce it and capture it as a template.
    Create(CreateArgs),
    /// List the templates.
    Ls,
    /// Remove a template.
    Rm {
        /// The template's name.
        name: TemplateName,
    },
}

#[derive(Args, Debug, Clone)]
pub struct CreateArgs {
    /// The template's name.
    #[arg(long, default_value = TemplateName::DEFAULT)]
    pub name: TemplateName,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u64,
    /// The image to boot (`cleave image ls`); the built-in default when left out.
    #[arg(long, value_name = "NAME")]
    pub image: Option<ImageName>,
    /// Give up if the guest agent is not ready within this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub boot_timeout: u64,
    /// For tests of the fork gate only: the template's agent answers every reseed wrongly
    /// this way, so every fork of it must be refused.
    #[arg(long, value_enum, hide = true)]
    pub test_reseed: Option<TestReseed>,
    /// For tests only: appended to the guest's kernel command line (repeatable).
    #[arg(long, value_name = "ARG", hide = true)]
    pub test_kernel_arg: Vec<String>,
    /// A warm-up command run in the template before it is captured (it must exit 0 and
    /// leave no process behind), after `--`: `-- sh -c 'import-things'`.
    #[arg(last = true, value_name = "WARMUP")]
    pub warmup: Vec<OsString>,
}

impl CreateArgs {
    fn spec(&self) -> TemplateSpec {
        TemplateSpec {
            name: self.name.clone(),
            mem_mib: self.mem,
            vcpus: self.vcpus,
            boot_timeout: Duration::from_secs(self.boot_timeout),
            test_reseed: self.test_reseed,
            test_kernel_args: self.test_kernel_arg.clone(),
            warmup: self.warmup.clone(),
            image: self.image.clone(),
        }
    }
}

pub fn run(cmd: TemplateCommand) -> anyhow::Result<ExitCode> {
    let store = TemplateStore::default_location();
    match cmd {
        TemplateCommand::Create(args) => {
            let exe = worker_exe()?;
            let jail = Jail::best_effort();
            let workers = TemplateWorkers {
                exe: &exe,
                jail: jail.as_ref(),
            };
            let created = templates::create(&store, &args.spec(), resolve_image, workers)?;
            if let Some(w) = &created.warmup {
                std::io::stdout().write_all(&w.stdout)?;
                std::io::stderr().write_all(&w.stderr)?;
            }
            let meta = &created.meta;
            eprintln!(
                "cleave: template {} (image {}): {} MiB, {} vCPU(s); agent ready after {:.0} ms, quiesced \
                 and captured in {:.0} ms; {:.1} MiB in {}",
                meta.name,
                meta.image_label(),
                meta.mem_mib,
                meta.vcpus,
                created.boot.as_secs_f64() * 1e3,
                created.capture.as_secs_f64() * 1e3,
                store.disk_usage(&meta.name) as f64 / (1 << 20) as f64,
                store.dir().join(meta.name.as_str()).display(),
            );
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Ls => {
            list(&store)?;
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Rm { name } => {
            store.remove(&name)?;
            println!("removed template {name}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn list(store: &TemplateStore) -> anyhow::Result<()> {
    let all = store.list()?;
    if all.is_empty() {
        eprintln!(
            "no templates in {} (create one with `cleave template create`)",
            store.dir().display()
        );
        return Ok(());
    }
    println!(
        "{:<20} {:>8} {:>5} {:>10} {:>12}  {:<12}  IMAGE",
        "NAME", "MEM_MIB", "VCPUS", "DISK_MIB", "AGE", "KERNEL"
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for m in all {
        println!(
            "{:<20} {:>8} {:>5} {:>10.1} {:>12}  {:<12}  {}",
            m.name.as_str(),
            m.mem_mib,
            m.vcpus,
            store.disk_usage(&m.name) as f64 / (1 << 20) as f64,
            format!("{}s", now.saturating_sub(m.created)),
            &m.kernel_sha256[..12.min(m.kernel_sha256.len())],
            m.image_label(),
        );
        if let Some(why) = m.unusable_reason() {
            println!("  ^ cannot be forked here: {why}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[command(subcommand)]
        cmd: TemplateCommand,
    }

    #[test]
    fn parses_create_with_a_warmup_and_refuses_bad_names() {
        let t =
            T::try_parse_from(["t", "create", "--name", "py", "--", "sh", "-c", "true"]).unwrap();
        let TemplateCommand::Create(c) = t.cmd else {
            panic!("not create")
        };
        assert_eq!(c.name.as_str(), "py");
        assert_eq!(c.warmup, ["sh", "-c", "true"]);
        let e = T::try_parse_from(["t", "rm", "../x"]).unwrap_err();
        assert!(e.to_string().contains("not a valid template name"), "{e}");
    }
}
