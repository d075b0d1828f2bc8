//! `cleave image build|ls|rm`: images from a user's root filesystem (a directory, a
//! tarball or an OCI image), kept in the image store (`image::store`) for `cleave template
//! create --image` and `cleave run --image`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::image::rootfs::{Limits, Source};
use crate::image::store::{ImageName, ImageRecord, ImageStore, DEFAULT_IMAGE};
use crate::node::boot::base_image;

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build an image from a root filesystem: the default kernel, the tree as the guest's
    /// root and the guest agent as its /init.
    Build(BuildArgs),
    /// List the images.
    Ls {
        /// One JSON object per image instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove an image (templates made from it keep working).
    Rm {
        /// The image's name.
        name: ImageName,
    },
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("from").required(true).args(["from_dir", "from_tar", "from_oci"])))]
pub struct BuildArgs {
    /// The image's name.
    #[arg(long)]
    name: ImageName,
    /// A directory holding the root filesystem.
    #[arg(long, value_name = "DIR")]
    from_dir: Option<PathBuf>,
    /// A tarball of the root filesystem (as `docker export` writes; plain, gzip or zstd).
    #[arg(long, value_name = "FILE")]
    from_tar: Option<PathBuf>,
    /// An OCI image: a layout directory or an `oci-archive` tar, with the tag to use when
    /// it holds more than one (`skopeo copy docker://… oci:DIR:TAG` writes one).
    #[arg(long, value_name = "PATH[:TAG]")]
    from_oci: Option<String>,
    /// Print the image's record as JSON.
    #[arg(long)]
    json: bool,
}

impl BuildArgs {
    fn source(&self) -> Source {
        match (&self.from_dir, &self.from_tar, &self.from_oci) {
            (Some(d), _, _) => Source::Dir(d.clone()),
            (_, Some(t), _) => Source::Tar(t.clone()),
            (_, _, Some(o)) => {
                let (path, tag) = Source::parse_oci(o);
                Source::Oci { path, tag }
            }
            (None, None, None) => unreachable!("clap requires one of the --from flags"),
        }
    }
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    let store = ImageStore::default_location();
    match cmd {
        ImageCommand::Build(args) => build(&store, &args),
        ImageCommand::Ls { json } => list(&store, json),
        ImageCommand::Rm { name } => {
            store.remove(&name)?;
            println!("removed image {name}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn build(store: &ImageStore, args: &BuildArgs) -> anyhow::Result<ExitCode> {
    let source = args.source();
    let base = base_image().context("taking the kernel and guest agent from the default image")?;
    let built = store.build(&args.name, &source, &base, &Limits::default())?;
    let r = &built.record;
    if args.json {
        let mut v = serde_json::to_value(r)?;
        v["build_ms"] = serde_json::json!(built.took.as_secs_f64() * 1e3);
        println!("{v}");
    } else {
        eprintln!(
            "cleave: image {}: {} entries, {:.1} MiB of files → {:.1} MiB initramfs in {:.2} s",
            r.name,
            r.entries,
            mib(r.file_bytes),
            mib(r.initrd_bytes),
            built.took.as_secs_f64(),
        );
        eprintln!("  initramfs sha256 {}", r.initrd.sha256);
        describe_defaults(r);
        eprintln!(
            "  next: cleave template create --name {n} --image {n}",
            n = r.name
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_defaults(r: &ImageRecord) {
    let d = &r.defaults;
    if !d.env.is_empty() {
        let keys: Vec<&str> = d.env.iter().map(|(k, _)| k.as_str()).collect();
        eprintln!("  exec defaults: env {}", keys.join(" "));
    }
    if let Some(cwd) = &d.cwd {
        eprintln!("  exec defaults: working directory {cwd}");
    }
    if let Some(u) = &d.user {
        eprintln!("  exec defaults: user {}:{}", u.uid, u.gid);
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn list(store: &ImageStore, json: bool) -> anyhow::Result<ExitCode> {
    let all = store.list()?;
    if json {
        for r in &all {
            match r {
                Ok(r) => println!("{}", serde_json::to_string(r)?),
                Err(e) => println!("{}", serde_json::json!({ "error": e.to_string() })),
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:>10} {:>9} {:>10}  {:<12}  SOURCE",
        "NAME", "SIZE_MIB", "ENTRIES", "AGE", "INITRD"
    );
    println!(
        "{:<20} {:>10} {:>9} {:>10}  {:<12}  built in (make image)",
        DEFAULT_IMAGE, "-", "-", "-", "-"
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for r in all {
        match r {
            Ok(r) => println!(
                "{:<20} {:>10.1} {:>9} {:>10}  {:<12}  {}",
                r.name.as_str(),
                mib(r.initrd_bytes),
                r.entries,
                format!("{}s", now.saturating_sub(r.created)),
                &r.initrd.sha256.to_string()[..12],
                r.source,
            ),
            Err(e) => println!("  (unreadable: {e})"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[command(subcommand)]
        cmd: ImageCommand,
    }

    #[test]
    fn build_takes_exactly_one_source() {
        let t = T::try_parse_from(["t", "build", "--name", "py", "--from-oci", "/l:py"]).unwrap();
        let ImageCommand::Build(b) = t.cmd else {
            panic!("not build")
        };
        assert!(matches!(
            b.source(),
            Source::Oci { path, tag: Some(t) } if path == std::path::Path::new("/l") && t == "py"
        ));
        let e = T::try_parse_from(["t", "build", "--name", "py"]).unwrap_err();
        assert!(e.to_string().contains("--from-dir"), "{e}");
        let e = T::try_parse_from([
            "t",
            "build",
            "--name",
            "py",
            "--from-dir",
            "/a",
            "--from-tar",
            "/b",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("cannot be used with"), "{e}");
        let e =
            T::try_parse_from(["t", "build", "--name", "../x", "--from-dir", "/a"]).unwrap_err();
        assert!(e.to_string().contains("not a valid image name"), "{e}");
    }
}
