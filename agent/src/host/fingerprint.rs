//! What a template depends on in the host it was captured on. A template's vCPU state
//! (CPUID, MSRs, XSAVE layout) is only valid where the CPU and KVM offer the same
//! features; restoring it elsewhere fails deep in a KVM ioctl, or worse, runs a guest
//! whose kernel believes in features it lacks. So a template records this fingerprint
//! and is refused, with the difference named, on a host whose fingerprint differs.

use std::fmt::Write as _;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFingerprint {
    /// `/proc/cpuinfo`'s `vendor_id`.
    pub cpu_vendor: String,
    /// `/proc/cpuinfo`'s `model name`, with family/model/stepping.
    pub cpu_model: String,
    /// sha256 of the KVM API version, the CPUID KVM supports and its MSR index list.
    pub kvm: String,
    /// The host kernel's release (`uname -r`).
    pub kernel_release: String,
    /// The cleave that captured it.
    pub cleave_version: String,
}

impl HostFingerprint {
    /// This host's fingerprint (computed once per process; KVM must open).
    pub fn current() -> Result<&'static HostFingerprint, String> {
        static CURRENT: OnceLock<Result<HostFingerprint, String>> = OnceLock::new();
        CURRENT
            .get_or_init(Self::read)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn read() -> Result<HostFingerprint, String> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")
            .map_err(|e| format!("reading /proc/cpuinfo: {e}"))?;
        let field = |name: &str| -> String {
            cpuinfo
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim() == name).then(|| v.trim().to_string())
                })
                .unwrap_or_default()
        };
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
        Ok(HostFingerprint {
            cpu_vendor: field("vendor_id"),
            cpu_model: format!(
                "{} (family {} model {} stepping {})",
                field("model name"),
                field("cpu family"),
                field("model"),
                field("stepping")
            ),
            kvm: kvm_digest(&kvm)?,
            kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            cleave_version: env!("CARGO_PKG_VERSION").to_string(),
        })
    }

    /// Why a template captured on `self` cannot run on `here`, or `None` when it can.
    pub fn mismatch(&self, here: &HostFingerprint) -> Option<String> {
        let fields = [
            ("CPU vendor", &self.cpu_vendor, &here.cpu_vendor),
            ("CPU model", &self.cpu_model, &here.cpu_model),
            ("KVM capabilities", &self.kvm, &here.kvm),
            ("host kernel", &self.kernel_release, &here.kernel_release),
            ("cleave version", &self.cleave_version, &here.cleave_version),
        ];
        fields
            .iter()
            .find(|(_, a, b)| a != b)
            .map(|(what, then, now)| format!("its {what} was {then:?}, this host's is {now:?}"))
    }
}

fn kvm_digest(kvm: &kvm_ioctls::Kvm) -> Result<String, String> {
    let mut text = format!("api {}\n", kvm.get_api_version());
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    for e in cpuid.as_slice() {
        let _ = writeln!(
            text,
            "cpuid {:x}.{:x} {:x} {:x} {:x} {:x} {:x}",
            e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx
        );
    }
    let msrs = kvm
        .get_msr_index_list()
        .map_err(|e| format!("KVM_GET_MSR_INDEX_LIST: {e}"))?;
    for m in msrs.as_slice() {
        let _ = writeln!(text, "msr {m:x}");
    }
    Ok(hex::encode(Sha256::digest(text.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HostFingerprint {
        HostFingerprint {
            cpu_vendor: "AuthenticAMD".into(),
            cpu_model: "AMD EPYC (family 25 model 1 stepping 1)".into(),
            kvm: "ab".repeat(32),
            kernel_release: "6.1.0-13-amd64".into(),
            cleave_version: "0.1.0".into(),
        }
    }

    #[test]
    fn a_difference_is_named_with_both_values() {
        let a = sample();
        assert_eq!(a.mismatch(&a.clone()), None);
        let mut b = sample();
        b.kernel_release = "6.12.0".into();
        let why = a.mismatch(&b).unwrap();
        assert!(why.contains("host kernel"), "{why}");
        assert!(
            why.contains("6.1.0-13-amd64") && why.contains("6.12.0"),
            "{why}"
        );
        let mut c = sample();
        c.kvm = "cd".repeat(32);
        assert!(a.mismatch(&c).unwrap().contains("KVM capabilities"));
    }

    #[test]
    fn this_host_has_a_stable_fingerprint_when_kvm_opens() {
        let a = HostFingerprint::read().unwrap();
        let b = HostFingerprint::read().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.kvm.len(), 64);
        assert!(!a.cpu_vendor.is_empty());
    }
}
