//! The QEMU command line of the rig: a software-emulated AMD machine with SVM
//! (so Debian's kvm_amd gives a real KVM inside), Debian's kernel, the rig
//! initramfs, and the host's root shared read-only over virtio-9p.
//!
//! SAFETY RULE: the rig has no network card (`-nodefaults` and `-nic none`),
//! so nothing that runs inside it can reach any network. Never add one.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::error::RigError;
use super::manifest::RigImage;

pub const QEMU: &str = "qemu-system-x86_64";

/// Rig machine size; the environment can override it (CLEAVE_RIG_MEM_MIB,
/// CLEAVE_RIG_VCPUS) for guests that need more.
///
/// One vCPU by default: with two, QEMU's emulated SVM under multi-threaded TCG wedges
/// or crashes the rig's own kernel under nested VM churn (every time within 50
/// sequential fork/destroy cycles here, and twice in one CI run during 64 MiB of vsock
/// output), while one vCPU ran the same 200 cycles cleanly and faster.
#[derive(Debug, Clone, Copy)]
pub struct Machine {
    pub mem_mib: u32,
    pub vcpus: u32,
}

impl Machine {
    pub fn from_env() -> Result<Self, RigError> {
        Ok(Self {
            mem_mib: env_number("CLEAVE_RIG_MEM_MIB", 4096, 512..=65536)?,
            vcpus: env_number("CLEAVE_RIG_VCPUS", 1, 1..=64)?,
        })
    }
}

fn env_number(
    name: &str,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, RigError> {
    let Ok(text) = std::env::var(name) else {
        return Ok(default);
    };
    match text.parse::<u32>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(RigError::BadCommand(format!(
            "{name}={text:?} is not a number in {}..={}",
            range.start(),
            range.end()
        ))),
    }
}

/// Finds qemu-system-x86_64 on PATH.
pub fn find_qemu() -> Result<PathBuf, RigError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(QEMU))
        .find(|candidate| is_executable(candidate))
        .ok_or(RigError::QemuMissing)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The kernel command line: quiet (nothing but the command on the console),
/// the script to run and the nonce its markers carry. `mitigations=off`: the
/// rig is a throwaway test machine, and under emulation the speculation
/// mitigations cost a measurable share of its boot (≈15%).
///
/// `nohz=off highres=off`: the rig's kernel ticks on a periodic LAPIC timer,
/// which QEMU re-arms by itself, instead of one-shot timers it re-arms from
/// each interrupt. Under nested-guest load the rig has been seen to lose one
/// such interrupt and never wake again (QEMU idle, its main loop's next
/// deadline hours away, while the rig had 5 s timers pending: docs/TESTING.md).
/// Nested guests' timers are unaffected in kind (KVM's hrtimers just expire
/// at tick granularity).
pub fn kernel_cmdline(script: &Path, nonce: &str, keep: &[PathBuf]) -> Result<String, RigError> {
    let script = script.to_str().filter(|s| {
        // The kernel splits its command line at whitespace and treats quotes.
        s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\'')
    });
    let Some(script) = script else {
        return Err(RigError::BadCommand(
            "the rig cache path must be printable ASCII without spaces or quotes (set CLEAVE_CACHE to such a directory)"
                .into(),
        ));
    };
    let mut line = format!(
        "console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off nohz=off highres=off \
         cleave.rig_nonce={nonce} cleave.rig_cmd={script}"
    );
    if !keep.is_empty() {
        let mut list = Vec::new();
        for dir in keep {
            match dir.to_str() {
                Some(d) if d.bytes().all(|b| b.is_ascii_graphic() && !b",'\"".contains(&b)) => {
                    list.push(d)
                }
                _ => {
                    return Err(RigError::BadCommand(format!(
                        "{} must be printable ASCII without spaces, commas or quotes to be shared with the rig; move it",
                        dir.display()
                    )))
                }
            }
        }
        line.push_str(" cleave.rig_keep=");
        line.push_str(&list.join(","));
    }
    Ok(line)
}

/// Arguments for qemu-system-x86_64 (without the program name).
pub fn qemu_args(image: &RigImage, machine: Machine, cmdline: &str) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&["-accel", "tcg,thread=multi", "-M", "q35"]);
    // EPYC + svm: kvm_amd loads on it. (`-cpu max` hangs on the first KVM_RUN
    // inside unless vGIF is off.)
    push(&["-cpu", "EPYC,+svm"]);
    push(&[
        "-m",
        &machine.mem_mib.to_string(),
        "-smp",
        &machine.vcpus.to_string(),
    ]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    // No network card, ever: see the safety rule at the top of this file.
    push(&["-nic", "none"]);
    push(&["-serial", "stdio", "-no-reboot"]);
    // The host's whole root, read-only: host binaries, libraries and cached
    // images work at the same paths inside (the rig's init chroots into it).
    push(&[
        "-fsdev",
        "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device",
        "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
    ]);
    args.push("-kernel".into());
    args.push(image.kernel.clone().into_os_string());
    args.push("-initrd".into());
    args.push(image.initrd.clone().into_os_string());
    args.push("-append".into());
    args.push(cmdline.into());
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> RigImage {
        RigImage {
            kernel: "/cache/rig/k/vmlinuz".into(),
            initrd: "/cache/rig/k/rig-initrd.cpio".into(),
            debian_kernel: "linux-image-test 1".into(),
        }
    }

    #[test]
    fn argv_has_no_network_and_a_read_only_share() {
        let machine = Machine {
            mem_mib: 4096,
            vcpus: 2,
        };
        let args = qemu_args(&image(), machine, "console=ttyS0");
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_str().unwrap().to_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-nic none"), "{joined}");
        assert!(args.contains(&"-nodefaults".to_owned()));
        assert!(
            !joined.contains("-netdev") && !joined.contains("-net "),
            "{joined}"
        );
        assert!(joined.contains("readonly=on"), "{joined}");
        assert!(
            joined.contains("-kernel /cache/rig/k/vmlinuz -initrd /cache/rig/k/rig-initrd.cpio")
        );
        assert!(joined.contains("-cpu EPYC,+svm"));
        assert!(joined.contains("-m 4096 -smp 2"));
    }

    #[test]
    fn cmdline_names_script_and_nonce() {
        let line = kernel_cmdline(Path::new("/c/rig/runs/x/cmd.sh"), "ab12", &[]).unwrap();
        assert!(line.ends_with("cleave.rig_nonce=ab12 cleave.rig_cmd=/c/rig/runs/x/cmd.sh"));
        assert!(line.contains("quiet"));
        assert!(kernel_cmdline(Path::new("/a b/cmd.sh"), "ab12", &[]).is_err());
        assert!(kernel_cmdline(Path::new("/a\"b/cmd.sh"), "ab12", &[]).is_err());
    }
}
