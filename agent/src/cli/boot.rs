//! `cleave boot`: verify the image's pins, boot it, stream the console; or, with
//! `--selftest`, wait for the guest agent's readiness line and report the time to it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::devices::serial::console::Console;
use crate::host::{kvm, paths};
use crate::image::{Digest, ImageSpec, Manifest, PinnedFile, Role, VerifiedImage};
use crate::vmm::{self, config::MachineConfig};
use cleave_guest::boot as guest_boot;

/// The command line every cleave guest gets; `--cmdline` is appended (later values win).
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodule 8250.nr_uarts=1 no_timer_check quiet";

#[derive(Args, Debug)]
pub struct BootArgs {
    /// Kernel (ELF vmlinux with a PVH note); needs --kernel-sha256. Default: the built-in image.
    #[arg(long, requires = "kernel_sha256", requires = "initrd")]
    kernel: Option<PathBuf>,
    /// Initramfs (newc cpio); needs --initrd-sha256.
    #[arg(long, requires = "initrd_sha256", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// The sha256 the kernel must have (as printed by sha256sum).
    #[arg(long, value_name = "SHA256")]
    kernel_sha256: Option<Digest>,
    /// The sha256 the initramfs must have.
    #[arg(long, value_name = "SHA256")]
    initrd_sha256: Option<Digest>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u64,
    /// Extra kernel command-line arguments, appended to the built-in ones.
    #[arg(long, value_name = "ARGS")]
    cmdline: Option<String>,
    /// Boot, wait for the guest agent's readiness line, end the guest, print the time.
    #[arg(long)]
    selftest: bool,
    /// With --selftest: give up after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    timeout: u64,
}

impl BootArgs {
    fn image(&self) -> anyhow::Result<ImageSpec> {
        match (
            &self.kernel,
            &self.initrd,
            self.kernel_sha256,
            self.initrd_sha256,
        ) {
            (Some(k), Some(i), Some(ks), Some(is)) => Ok(ImageSpec {
                kernel: PinnedFile {
                    role: Role::Kernel,
                    path: k.clone(),
                    sha256: ks,
                },
                initrd: PinnedFile {
                    role: Role::Initrd,
                    path: i.clone(),
                    sha256: is,
                },
            }),
            (None, None, None, None) => default_image(),
            (None, None, _, _) => bail!(
                "--kernel-sha256/--initrd-sha256 pin files given with --kernel/--initrd; \
                 without those flags the built-in image's own pins are used"
            ),
            // clap's `requires` rules out the remaining combinations.
            _ => bail!("--kernel, --initrd, --kernel-sha256 and --initrd-sha256 go together"),
        }
    }

    fn cmdline(&self) -> String {
        let mut c = BASE_CMDLINE.to_string();
        if self.selftest {
            c.push_str(&format!(" {}=1", guest_boot::FLAG_SELFTEST));
        }
        if let Some(extra) = &self.cmdline {
            c.push(' ');
            c.push_str(extra);
        }
        c
    }
}

/// The built-in default image (`make image`), pinned by its manifest.
pub(super) fn default_image() -> anyhow::Result<ImageSpec> {
    Ok(Manifest::load(&paths::default_image_manifest())?.spec())
}

/// What every command that boots a guest has checked, in this order: the machine shape,
/// a KVM that can run Linux, the image's pins (on every start); then KVM is open.
pub(super) struct Prepared {
    pub machine: MachineConfig,
    pub image: VerifiedImage,
    pub kvm: kvm_ioctls::Kvm,
}

pub(super) fn prepare(
    mem: u64,
    vcpus: u64,
    image: impl FnOnce() -> anyhow::Result<ImageSpec>,
) -> anyhow::Result<Prepared> {
    let machine = MachineConfig::new(mem, vcpus)?;
    kvm::require_linux_capable()?;
    let spec = image()?;
    let t = Instant::now();
    let image = spec.load_verified()?;
    tracing::info!(
        ms = t.elapsed().as_secs_f64() * 1e3,
        bytes = image.kernel.len() + image.initrd.len(),
        "image read and verified"
    );
    let kvm = vmm::open_kvm()?;
    Ok(Prepared {
        machine,
        image,
        kvm,
    })
}

pub fn run(args: BootArgs) -> anyhow::Result<ExitCode> {
    let Prepared {
        machine,
        image,
        kvm,
    } = prepare(args.mem, args.vcpus, || args.image())?;
    let cmdline = args.cmdline();

    // The self-test keeps the console to itself (shown only on failure); a plain boot
    // streams it.
    let (console, writer) = if args.selftest {
        Console::new(None, Some(guest_boot::READY_PREFIX))
    } else {
        Console::new(Some(Box::new(std::io::stdout())), None)
    };
    let start = Instant::now();
    let vm = vmm::boot_linux(
        &kvm,
        machine,
        &image.kernel,
        &image.initrd,
        &cmdline,
        Box::new(writer),
        vmm::BootDevices::default(),
    )
    .context("booting the guest")?;
    if args.selftest {
        return selftest(vm, console, start, Duration::from_secs(args.timeout));
    }
    let end = vm.wait(None).unwrap_or(crate::devices::GuestEnd::Stopped);
    vm.stop();
    eprintln!("cleave: {end}");
    Ok(super::exit_code(end.exit_code()))
}

fn selftest(
    vm: vmm::RunningVm,
    console: Console,
    start: Instant,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let report_failure = |why: String| -> anyhow::Result<ExitCode> {
        eprintln!(
            "--- guest console (last {} bytes at most) ---",
            crate::devices::serial::console::TAIL_BYTES
        );
        eprintln!("{}", console.tail());
        eprintln!("--- end of guest console ---");
        bail!(why)
    };
    let ready = console.wait_for_line(timeout);
    let Some((at, line)) = ready else {
        let end = vm.wait(Some(Duration::ZERO));
        vm.stop();
        return report_failure(match end {
            Some(end) => format!("the guest ended before its agent was ready: {end}"),
            None => format!(
                "the guest agent was not ready within {} s",
                timeout.as_secs()
            ),
        });
    };
    let ready_ms = at.duration_since(start).as_secs_f64() * 1000.0;
    println!("selftest: guest agent ready in {ready_ms:.1} ms ({line})");
    let end = vm.wait(Some(Duration::from_secs(30)));
    vm.stop();
    match end {
        Some(end) if end.is_clean() => {
            println!("selftest: {end}");
            Ok(ExitCode::SUCCESS)
        }
        Some(end) => report_failure(format!("the guest did not end cleanly: {end}")),
        None => report_failure("the guest did not end within 30 s after it was ready".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_benchmark_gives_qemu_the_same_command_line() {
        let bench = include_str!("../../../scripts/bench-boot.py");
        assert!(bench.contains(&format!("BASE_CMDLINE = \"{BASE_CMDLINE}\"")));
    }
}
