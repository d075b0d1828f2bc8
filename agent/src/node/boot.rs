//! What every path that boots a guest checks first, in one order: the machine's shape, a
//! KVM that can run Linux, the image's pins (on every start, cached files too). A VM may
//! be built while the pins are checked; nothing is loaded into it before both match.

use std::time::Instant;

use crate::host::{kvm, paths};
use crate::image::rootfs::ExecDefaults;
use crate::image::store::{BaseImage, ImageName, ImageStore};
use crate::image::{ImageSpec, Manifest, VerifiedImage};
use crate::vmm::{self, config::MachineConfig};

/// The command line every cleave guest gets; callers append theirs (later values win).
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodule 8250.nr_uarts=1 no_timer_check quiet";

/// The default image's pins, embedded when this binary was built (agent/build.rs).
const EMBEDDED_PINS: (&str, &str) = (
    env!("CLEAVE_DEFAULT_KERNEL_SHA256"),
    env!("CLEAVE_DEFAULT_INITRD_SHA256"),
);

/// The built-in default image (`make image`): its files where its manifest says, pinned by
/// the digests embedded in this binary — never by the manifest's alone, which sits in the
/// cache beside the files it pins.
pub fn default_image() -> anyhow::Result<ImageSpec> {
    pinned_by(
        Manifest::load(&paths::default_image_manifest())?,
        EMBEDDED_PINS,
    )
}

/// An image chosen by name, ready to boot: its pins and its exec defaults.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// `None`: the built-in default image.
    pub name: Option<ImageName>,
    pub spec: ImageSpec,
    pub defaults: ExecDefaults,
}

/// The image `name` from the image store (`cleave image build`), or the built-in default
/// image when `name` is `None` or `default`.
pub fn resolve_image(name: Option<&ImageName>) -> anyhow::Result<ResolvedImage> {
    let Some(name) = name.filter(|n| !n.is_default()) else {
        return Ok(ResolvedImage {
            name: None,
            spec: default_image()?,
            defaults: ExecDefaults::default(),
        });
    };
    let record = ImageStore::default_location().get(name)?;
    Ok(ResolvedImage {
        name: Some(name.clone()),
        spec: record.spec(),
        defaults: record.defaults,
    })
}

/// The default image's kernel and guest agent, for `cleave image build`: read and checked
/// against the pins built into this binary before anything is taken from them.
pub fn base_image() -> anyhow::Result<BaseImage> {
    let spec = default_image()?;
    let initrd = spec.initrd.read_verified()?;
    Ok(BaseImage::from_default(&spec, &initrd)?)
}

fn pinned_by(manifest: Manifest, (kernel, initrd): (&str, &str)) -> anyhow::Result<ImageSpec> {
    if kernel.is_empty() || initrd.is_empty() {
        anyhow::bail!(
            "this cleave was built before the default image existed, so it carries no pins \
             for it: run `make image`, then build cleave again"
        );
    }
    let spec = manifest.spec();
    for (what, in_cache, built) in [
        ("kernel", spec.kernel.sha256.to_string(), kernel),
        ("initramfs", spec.initrd.sha256.to_string(), initrd),
    ] {
        if in_cache != built {
            anyhow::bail!(
                "refusing the default image: its manifest pins the {what} as {in_cache}, but \
                 this cleave was built with {built}. The cache was rebuilt or rewritten; if \
                 you rebuilt the image (`make image`), build cleave again"
            );
        }
    }
    Ok(spec)
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
        Self::check_building(mem_mib, vcpus, image, |_, _| Ok(())).map(|(kit, ())| kit)
    }

    /// [`check`](Self::check), with `build` (the VM, empty) run while the pins are checked:
    /// see [`verify_while`].
    pub fn check_building<T>(
        mem_mib: u64,
        vcpus: u64,
        image: impl FnOnce() -> anyhow::Result<ImageSpec>,
        build: impl FnOnce(&kvm_ioctls::Kvm, MachineConfig) -> anyhow::Result<T>,
    ) -> anyhow::Result<(BootKit, T)> {
        let machine = MachineConfig::new(mem_mib, vcpus)?;
        kvm::require_linux_capable()?;
        let spec = image()?;
        let kvm = vmm::open_kvm()?;
        let (image, built) = verify_while(&spec, || build(&kvm, machine))?;
        let kit = BootKit {
            machine,
            image,
            kvm,
        };
        Ok((kit, built))
    }
}

/// Reads and verifies `spec` on threads of their own while this thread runs `build`, and
/// returns both. A VM may be *built* before its image's pins are checked, never loaded or
/// started: if a pin does not match, what `build` made is dropped unused and the pin's
/// error is the answer, whatever `build` returned.
pub fn verify_while<T>(
    spec: &ImageSpec,
    build: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(VerifiedImage, T)> {
    let t = Instant::now();
    let (image, built) = std::thread::scope(|s| {
        let image = s.spawn(|| {
            let image = spec.load_verified();
            (image, t.elapsed())
        });
        let built = build();
        // A panic while hashing is a bug; re-raising it here keeps it one.
        let image = image
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (image, built)
    });
    let (image, took) = image;
    let image = image?;
    tracing::info!(
        ms = took.as_secs_f64() * 1e3,
        bytes = image.kernel.len() + image.initrd.len(),
        "image read and verified"
    );
    Ok((image, built?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(kernel: &str, initrd: &str) -> Manifest {
        serde_json::from_value(serde_json::json!({
            "kernel": {"path": "/cache/vmlinux", "sha256": kernel},
            "initrd": {"path": "/cache/initramfs.cpio", "sha256": initrd},
        }))
        .unwrap()
    }

    #[test]
    fn what_is_built_while_the_pins_are_checked_is_dropped_when_a_pin_fails() {
        use crate::image::{PinnedFile, Role};
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, content: &[u8], pin: &[u8], role| {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            PinnedFile {
                path,
                sha256: crate::image::Digest::of(pin),
                role,
            }
        };
        struct Built<'a>(&'a AtomicBool);
        impl Drop for Built<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = AtomicBool::new(false);
        let good = ImageSpec {
            kernel: file("k", b"kernel", b"kernel", Role::Kernel),
            initrd: file("i", b"initrd", b"initrd", Role::Initrd),
        };
        let (image, built) = verify_while(&good, || Ok(Built(&dropped))).unwrap();
        assert_eq!(image.kernel, b"kernel");
        assert!(!dropped.load(Ordering::SeqCst));
        drop(built);
        // The initramfs was swapped: the pin's error, and the built VM gone unused, even
        // though building it went well.
        dropped.store(false, Ordering::SeqCst);
        let bad = ImageSpec {
            kernel: good.kernel.clone(),
            initrd: file("i2", b"evil", b"initrd", Role::Initrd),
        };
        let e = verify_while(&bad, || Ok(Built(&dropped))).err().unwrap();
        assert!(e.to_string().contains("refusing to boot"), "{e}");
        assert!(dropped.load(Ordering::SeqCst));
        // A failed build with good pins is the build's error.
        let e = verify_while(&good, || {
            anyhow::Result::<()>::Err(anyhow::anyhow!("no VM"))
        })
        .err()
        .unwrap();
        assert_eq!(e.to_string(), "no VM");
    }

    #[test]
    fn the_default_images_pins_come_from_the_build_not_the_cache() {
        let (k, i) = ("ab".repeat(32), "cd".repeat(32));
        let spec = pinned_by(manifest(&k, &i), (&k, &i)).unwrap();
        assert_eq!(spec.kernel.sha256.to_string(), k);
        // Someone rewrote the cached kernel and its manifest line: refused, both named.
        let evil = "ee".repeat(32);
        let e = pinned_by(manifest(&evil, &i), (&k, &i))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&evil) && e.contains(&k) && e.contains("kernel"),
            "{e}"
        );
        let e = pinned_by(manifest(&k, &evil), (&k, &i))
            .unwrap_err()
            .to_string();
        assert!(e.contains("initramfs"), "{e}");
        // Built without an image: no pins, nothing boots.
        let e = pinned_by(manifest(&k, &i), ("", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("make image"), "{e}");
    }

    #[test]
    fn the_name_default_is_the_built_in_image() {
        // `make test` builds the default image first.
        let named = resolve_image(Some(&"default".parse().unwrap())).unwrap();
        let unnamed = resolve_image(None).unwrap();
        assert_eq!(named.name, None);
        assert_eq!(named.spec, unnamed.spec);
        assert_eq!(named.defaults, ExecDefaults::default());
    }

    #[test]
    fn this_build_carries_pins() {
        // `make test` builds the image first; a build without one boots nothing.
        let (k, i) = EMBEDDED_PINS;
        assert_eq!(
            (k.len(), i.len()),
            (64, 64),
            "built without `make image` first"
        );
    }

    #[test]
    fn the_boot_benchmark_gives_qemu_the_same_command_line() {
        let bench = include_str!("../../../scripts/bench-boot.py");
        assert!(bench.contains(&format!("BASE_CMDLINE = \"{BASE_CMDLINE}\"")));
    }
}
