//! Local APIC LINT pins wired as on a PC: LINT0 takes the PIC's ExtINT, LINT1 takes NMI.

use kvm_ioctls::VcpuFd;

use super::VcpuError;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn get_reg(regs: &[libc::c_char], offset: usize) -> u32 {
    let b: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
    u32::from_le_bytes(b)
}

fn set_reg(regs: &mut [libc::c_char], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        regs[offset + i] = b as libc::c_char;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

pub fn setup(vcpu: &VcpuFd) -> Result<(), VcpuError> {
    let mut lapic = vcpu.get_lapic().map_err(VcpuError::kvm("KVM_GET_LAPIC"))?;
    let lvt0 = get_reg(&lapic.regs, APIC_LVT0);
    set_reg(
        &mut lapic.regs,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = get_reg(&lapic.regs, APIC_LVT1);
    set_reg(
        &mut lapic.regs,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic)
        .map_err(VcpuError::kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_replaces_only_bits_8_to_10() {
        assert_eq!(
            with_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(with_delivery_mode(0x0000_07ff, APIC_MODE_NMI), 0x0000_04ff);
    }

    #[test]
    fn registers_round_trip_little_endian() {
        let mut regs = [0 as libc::c_char; 1024];
        set_reg(&mut regs, APIC_LVT1, 0x8765_4321);
        assert_eq!(get_reg(&regs, APIC_LVT1), 0x8765_4321);
    }
}
