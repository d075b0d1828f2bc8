//! `cleave boot`: verify the image's pins, boot it, stream the console; or, with
//! `--selftest`, wait for the guest agent's readiness line and report the time to it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::devices::serial::console::Console;
use crate::image::{Digest, ImageSpec, PinnedFile, Role};
use crate::node::boot::{default_image, BootKit, BASE_CMDLINE};
use crate::vmm;
use cleave_guest::boot as guest_boot;

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

pub fn run(args: BootArgs) -> anyhow::Result<ExitCode> {
    let cmdline = args.cmdline();
    // The self-test keeps the console to itself (shown only on failure); a plain boot
    // streams it.
    let (console, writer) = if args.selftest {
        Console::new(None, Some(guest_boot::READY_PREFIX))
    } else {
        Console::new(Some(Box::new(std::io::stdout())), None)
    };
    // The VM is built while the image is hashed, and loaded only once both pins match.
    let (kit, shell) = BootKit::check_building(
        args.mem,
        args.vcpus,
        || args.image(),
        |kvm, machine| {
            vmm::build_linux(kvm, machine, Box::new(writer), vmm::BootDevices::default())
                .context("building the VM")
        },
    )?;
    let start = Instant::now();
    let vm = shell
        .boot(&kit.image.kernel, &kit.image.initrd, &cmdline)
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
