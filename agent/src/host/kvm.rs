//! Which KVM this host has, and whether a standard Linux guest can run on it.

use std::fmt;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmFlavour {
    /// Hardware virtualisation (VMX).
    Intel,
    /// Hardware virtualisation (SVM).
    Amd,
    /// `kvm_pvm`: real KVM ioctls, but guest kernel mode is emulated and cannot run a
    /// standard Linux kernel.
    Pvm,
    /// `/dev/kvm` exists but no known vendor module is loaded.
    Unknown,
    /// No `/dev/kvm`.
    Missing,
}

impl KvmFlavour {
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/"))
    }

    /// Detection against a root directory (for tests).
    pub fn detect_in(root: &Path) -> Self {
        if !root.join("dev/kvm").exists() {
            return KvmFlavour::Missing;
        }
        let module = |m: &str| root.join("sys/module").join(m).exists();
        if module("kvm_pvm") {
            KvmFlavour::Pvm
        } else if module("kvm_intel") {
            KvmFlavour::Intel
        } else if module("kvm_amd") {
            KvmFlavour::Amd
        } else {
            KvmFlavour::Unknown
        }
    }

    /// Whether a standard Linux guest can boot here.
    pub fn runs_linux(self) -> bool {
        matches!(
            self,
            KvmFlavour::Intel | KvmFlavour::Amd | KvmFlavour::Unknown
        )
    }

    /// Whether the KVM ioctls themselves work (enough for VMM tests with tiny guests).
    pub fn has_ioctls(self) -> bool {
        self != KvmFlavour::Missing
    }
}

impl fmt::Display for KvmFlavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvmFlavour::Intel => "hardware KVM (kvm_intel)",
            KvmFlavour::Amd => "hardware KVM (kvm_amd)",
            KvmFlavour::Pvm => "kvm_pvm (software nested virtualisation)",
            KvmFlavour::Unknown => "KVM (vendor module unknown)",
            KvmFlavour::Missing => "no /dev/kvm",
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoLinuxKvm(String);

/// Fails with a plain explanation where a Linux guest cannot run.
pub fn require_linux_capable() -> Result<KvmFlavour, NoLinuxKvm> {
    let flavour = KvmFlavour::detect();
    if flavour.runs_linux() {
        return Ok(flavour);
    }
    let found = match flavour {
        KvmFlavour::Pvm => {
            "this host's /dev/kvm is provided by kvm_pvm (/sys/module/kvm_pvm exists). \
            Its KVM ioctls are real, but it emulates guest kernel mode in software and cannot run \
            SSE/XSAVE/int3 there, so a standard Linux guest kernel crashes on it."
                .to_string()
        }
        _ => "this host has no /dev/kvm, so no guest can run here.".to_string(),
    };
    Err(NoLinuxKvm(format!(
        "{found} Run it inside the KVM rig instead (a software-emulated machine with a real \
         KVM): `cleave rig -- <the same arguments>`, e.g. `cleave rig -- boot --selftest`."
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(modules: &[&str], dev_kvm: bool) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("dev")).unwrap();
        if dev_kvm {
            std::fs::write(d.path().join("dev/kvm"), b"").unwrap();
        }
        for m in modules {
            std::fs::create_dir_all(d.path().join("sys/module").join(m)).unwrap();
        }
        d
    }

    #[test]
    fn detects_each_flavour() {
        let cases: [(&[&str], bool, KvmFlavour); 5] = [
            (&["kvm", "kvm_pvm"], true, KvmFlavour::Pvm),
            (&["kvm", "kvm_intel"], true, KvmFlavour::Intel),
            (&["kvm", "kvm_amd"], true, KvmFlavour::Amd),
            (&["kvm"], true, KvmFlavour::Unknown),
            (&["kvm_amd"], false, KvmFlavour::Missing),
        ];
        for (mods, dev, want) in cases {
            assert_eq!(KvmFlavour::detect_in(root(mods, dev).path()), want);
        }
        assert!(!KvmFlavour::Pvm.runs_linux() && KvmFlavour::Pvm.has_ioctls());
        assert!(KvmFlavour::Amd.runs_linux());
    }
}
