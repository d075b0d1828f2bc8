//! What every path that boots a guest checks first, in one order: the machine's shape, a
//! KVM that can run Linux, the image's pins (on every start, cached files too); only then
//! is KVM opened.

use std::time::Instant;

use crate::host::{kvm, paths};
use crate::image::{ImageSpec, Manifest, VerifiedImage};
use crate::vmm::{self, config::MachineConfig};

/// The command line every cleave guest gets; callers append theirs (later values win).
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodule 8250.nr_uarts=1 no_timer_check quiet";

/// The built-in default image (`make image`), pinned by its manifest.
pub fn default_image() -> anyhow::Result<ImageSpec> {
    Ok(Manifest::load(&paths::default_image_manifest())?.spec())
}

/// A guest ready to boot on this host: its machine shape, its verified image bytes and an
/// open KVM.
pub struct BootKit {
    pub machine: MachineConfig,
    pub image: VerifiedImage,
    pub kvm: kvm_ioctls::Kvm,
}

impl BootKit {
    /// Checks the shape, this host's KVM and `image`'s pins, then opens KVM.
    pub fn check(
        mem_mib: u64,
        vcpus: u64,
        image: impl FnOnce() -> anyhow::Result<ImageSpec>,
    ) -> anyhow::Result<BootKit> {
        let machine = MachineConfig::new(mem_mib, vcpus)?;
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
        Ok(BootKit {
            machine,
            image,
            kvm,
        })
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
