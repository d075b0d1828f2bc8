//! The captured machine as plain data: what a fork restores, one struct per part.
//!
//! Everything here is a copy of what KVM or a device model handed out; nothing holds a file
//! descriptor or a pointer, so a template's state can be cloned, compared and sent to
//! another process as it is (serde; KVM's structs as their raw bytes, the few types
//! without serde support through the adapters in [`wire`]).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

use crate::devices::virtio::net::SavedNet;
use crate::devices::virtio::rng::SavedRng;
use crate::devices::virtio::vsock::SavedVsock;
use crate::vmm::config::MachineConfig;

/// The floating-point and vector state: the whole XSAVE area where the host has it, the
/// legacy FXSAVE-shaped state otherwise.
#[derive(Clone, Serialize, Deserialize)]
pub enum FpuState {
    /// `kvm_xsave.region` (the struct itself is not `Clone`: it ends in a flexible array).
    Xsave(#[serde(with = "wire::xsave_region")] Box<[u32; 1024]>),
    Legacy(#[serde(with = "wire::legacy_fpu")] Box<kvm_fpu>),
}

impl FpuState {
    pub fn from_xsave(xsave: &kvm_xsave) -> Self {
        FpuState::Xsave(Box::new(xsave.region))
    }
}

/// The `kvm_xsave` for an XSAVE area.
pub fn xsave_of(region: &[u32; 1024]) -> kvm_xsave {
    kvm_xsave {
        region: *region,
        ..Default::default()
    }
}

/// One vCPU, as KVM reports it.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    /// The CPUID table the vCPU ran with (a fork must see the same CPU).
    #[serde(with = "wire::cpuid")]
    pub cpuid: CpuId,
    /// Every MSR that this host's KVM both reads and writes back (see `capture`).
    #[serde(with = "wire::msrs")]
    pub msrs: Msrs,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// Extended control registers; `None` where KVM has no XCR support.
    pub xcrs: Option<kvm_xcrs>,
    pub lapic: Box<kvm_lapic_state>,
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and the interrupt shadow.
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
}

/// The LAPIC's LVT timer register (offset in the register page) and its timer-mode field.
pub(crate) const APIC_LVTT: usize = 0x320;
const LVTT_MODE: u32 = 0b11 << 17;
const LVTT_MODE_TSC_DEADLINE: u32 = 0b10 << 17;

impl VcpuState {
    /// Whether the guest runs this vCPU's clock on its TSC-deadline LAPIC timer: Linux
    /// puts the LVT timer in that mode only then, and keeps the mode when it masks the
    /// timer while idle. Any other mode (a calibrated one-shot or periodic LAPIC timer, a
    /// calibration that failed, or none) may mean the guest's clock is the PIT.
    pub fn ticks_on_tsc_deadline(&self) -> bool {
        lvtt(&self.lapic) & LVTT_MODE == LVTT_MODE_TSC_DEADLINE
    }
}

fn lvtt(lapic: &kvm_lapic_state) -> u32 {
    let b = |i: usize| lapic.regs[APIC_LVTT + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

/// The in-kernel interrupt controllers and timer.
#[derive(Clone, Serialize, Deserialize)]
pub struct IrqchipState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
}

/// VM-wide state.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub irqchip: IrqchipState,
    /// The kvmclock value at capture; a fork's guest clock continues from here.
    pub clock: kvm_clock_data,
}

/// Every device's state, one plain struct per device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    #[serde(with = "wire::SerialStateDef")]
    pub serial: SerialState,
    /// The vsock device and its transport, when the machine has one.
    pub vsock: Option<SavedVsock>,
    /// The network device and its transport, when the machine has one (templates made
    /// before cleave had networking have none).
    #[serde(default)]
    pub net: Option<SavedNet>,
    /// The entropy device and its transport (templates made before it have none).
    #[serde(default)]
    pub rng: Option<SavedRng>,
}

impl DeviceState {
    /// Whether a fork has virtio devices, and so a device event loop to run.
    pub fn has_virtio(&self) -> bool {
        self.vsock.is_some() || self.net.is_some() || self.rng.is_some()
    }
}

/// The layout of [`MachineState`] this build reads and writes. Bumped whenever a saved
/// field changes meaning (2: queue state saved once, by the transport; the NIC).
pub const STATE_FORMAT: u32 = 2;

/// The whole machine except its memory (which is the template's sealed memfd).
#[derive(Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// [`STATE_FORMAT`] when captured; templates from before it was recorded read as 0.
    #[serde(default)]
    pub format: u32,
    #[serde(with = "wire::machine")]
    pub machine: MachineConfig,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceState,
}

impl MachineState {
    /// Why a Linux guest in this state would stop keeping time in a fork, if it would
    /// (checked when a template is made: tests' tiny guests never set a timer up):
    /// forks have no PIT (`fork::restore`), so every vCPU must tick on its own
    /// TSC-deadline LAPIC timer (offered by `vmm::vcpu::cpuid`). A guest still on the PIT
    /// would never wake from a sleep in a fork.
    pub fn pit_clock_reason(&self) -> Option<String> {
        let v = self.vcpus.iter().find(|v| !v.ticks_on_tsc_deadline())?;
        Some(format!(
            "its guest does not keep time on TSC-deadline LAPIC timers (vCPU {}'s LVT timer \
             is {:#x}), so it may tick on the PIT, which forks do not have: their timers \
             would never fire (boot it with a kernel that has the TSC-deadline timer, \
             without `noapictimer` or `lapic=notscdeadline`)",
            v.index,
            lvtt(&v.lapic)
        ))
    }

    /// Checks what a decoded state must satisfy before anything is restored from it:
    /// one vCPU state per vCPU of the machine, in index order.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != STATE_FORMAT {
            return Err(format!(
                "it was captured by another cleave (state format {}, this one reads {}); \
                 recreate the template (`cleave template rm NAME`, then create it again)",
                self.format, STATE_FORMAT
            ));
        }
        let want = usize::from(self.machine.vcpus.get());
        if self.vcpus.len() != want {
            return Err(format!(
                "{} vCPU states for a {want}-vCPU machine",
                self.vcpus.len()
            ));
        }
        if let Some((i, v)) = self
            .vcpus
            .iter()
            .enumerate()
            .find(|(i, v)| usize::from(v.index) != *i)
        {
            return Err(format!("vCPU state {i} is for vCPU {}", v.index));
        }
        Ok(())
    }
}

impl std::fmt::Debug for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineState")
            .field("machine", &self.machine)
            .field("vcpus", &self.vcpus.len())
            .field(
                "msrs_per_vcpu",
                &self.vcpus.first().map(|v| v.msrs.as_slice().len()),
            )
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

/// serde adapters for the types that have no serde support of their own. Decoding
/// validates: wrong lengths and out-of-range machine shapes are errors, not truncations.
mod wire {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub mod cpuid {
        use super::*;
        use kvm_bindings::{kvm_cpuid_entry2, CpuId};

        pub fn serialize<S: Serializer>(v: &CpuId, s: S) -> Result<S::Ok, S::Error> {
            v.as_slice().serialize(s)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CpuId, D::Error> {
            let entries = Vec::<kvm_cpuid_entry2>::deserialize(d)?;
            CpuId::from_entries(&entries).map_err(|e| D::Error::custom(format!("CPUID: {e:?}")))
        }
    }

    pub mod msrs {
        use super::*;
        use kvm_bindings::{kvm_msr_entry, Msrs};

        pub fn serialize<S: Serializer>(v: &Msrs, s: S) -> Result<S::Ok, S::Error> {
            v.as_slice().serialize(s)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Msrs, D::Error> {
            let entries = Vec::<kvm_msr_entry>::deserialize(d)?;
            Msrs::from_entries(&entries).map_err(|e| D::Error::custom(format!("MSRs: {e:?}")))
        }
    }

    pub mod xsave_region {
        use super::*;

        pub fn serialize<S: Serializer>(v: &[u32; 1024], s: S) -> Result<S::Ok, S::Error> {
            v.as_slice().serialize(s)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Box<[u32; 1024]>, D::Error> {
            let words = Vec::<u32>::deserialize(d)?;
            let len = words.len();
            words
                .into_boxed_slice()
                .try_into()
                .map_err(|_| D::Error::custom(format!("XSAVE area of {len} words, not 1024")))
        }
    }

    pub mod legacy_fpu {
        use super::*;
        use kvm_bindings::kvm_fpu;

        #[derive(Serialize, Deserialize)]
        struct Fpu {
            fpr: [[u8; 16]; 8],
            fcw: u16,
            fsw: u16,
            ftwx: u8,
            last_opcode: u16,
            last_ip: u64,
            last_dp: u64,
            xmm: [[u8; 16]; 16],
            mxcsr: u32,
        }

        pub fn serialize<S: Serializer>(v: &kvm_fpu, s: S) -> Result<S::Ok, S::Error> {
            Fpu {
                fpr: v.fpr,
                fcw: v.fcw,
                fsw: v.fsw,
                ftwx: v.ftwx,
                last_opcode: v.last_opcode,
                last_ip: v.last_ip,
                last_dp: v.last_dp,
                xmm: v.xmm,
                mxcsr: v.mxcsr,
            }
            .serialize(s)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Box<kvm_fpu>, D::Error> {
            let f = Fpu::deserialize(d)?;
            Ok(Box::new(kvm_fpu {
                fpr: f.fpr,
                fcw: f.fcw,
                fsw: f.fsw,
                ftwx: f.ftwx,
                last_opcode: f.last_opcode,
                last_ip: f.last_ip,
                last_dp: f.last_dp,
                xmm: f.xmm,
                mxcsr: f.mxcsr,
                ..Default::default()
            }))
        }
    }

    pub mod machine {
        use super::*;
        use crate::vmm::config::MachineConfig;

        pub fn serialize<S: Serializer>(v: &MachineConfig, s: S) -> Result<S::Ok, S::Error> {
            (v.mem.mib(), v.vcpus.get()).serialize(s)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MachineConfig, D::Error> {
            let (mem_mib, vcpus) = <(u64, u8)>::deserialize(d)?;
            MachineConfig::new(mem_mib, u64::from(vcpus)).map_err(D::Error::custom)
        }
    }

    /// `vm_superio::serial::SerialState`, field for field.
    #[derive(Serialize, Deserialize)]
    #[serde(remote = "vm_superio::serial::SerialState")]
    pub struct SerialStateDef {
        pub baud_divisor_low: u8,
        pub baud_divisor_high: u8,
        pub interrupt_enable: u8,
        pub interrupt_identification: u8,
        pub line_control: u8,
        pub line_status: u8,
        pub modem_control: u8,
        pub modem_status: u8,
        pub scratch: u8,
        pub in_buffer: Vec<u8>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_lvtt(v: u32) -> kvm_lapic_state {
        let mut l = kvm_lapic_state::default();
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            l.regs[APIC_LVTT + i] = b as _;
        }
        l
    }

    #[test]
    fn only_a_tsc_deadline_lvt_timer_counts_as_ticking_on_the_lapic() {
        let mode = |v: u32| lvtt(&with_lvtt(v)) & LVTT_MODE;
        // Linux's lapic-deadline clock event, armed and masked (idle) alike.
        for v in [0x0004_00ec, 0x0005_00ec] {
            assert_eq!(mode(v), LVTT_MODE_TSC_DEADLINE, "{v:#x}");
        }
        // Reset (masked, one-shot), a failed calibration (masked one-shot with its
        // vector), a calibrated one-shot and a periodic LAPIC timer.
        for v in [0x0001_0000, 0x0001_00ec, 0x0000_00ec, 0x0002_00ec] {
            assert_ne!(mode(v), LVTT_MODE_TSC_DEADLINE, "{v:#x}");
        }
    }
}
