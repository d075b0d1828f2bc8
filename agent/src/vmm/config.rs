//! A validated machine shape: memory size and vCPU count.
//!
//! Values come from the command line or an API client, so they are checked once here and
//! carried as types that cannot hold an absurd value.

use std::fmt;

/// Smallest guest we boot: the kernel plus initramfs need room to unpack.
pub const MIN_MEM_MIB: u64 = 32;
/// Largest guest we boot.
pub const MAX_MEM_MIB: u64 = 64 * 1024;
/// Most vCPUs per guest; the MP table and the guest kernel's NR_CPUS bound this.
pub const MAX_VCPUS: u8 = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("memory size {0} MiB is out of range: use {MIN_MEM_MIB}..={MAX_MEM_MIB} MiB")]
    MemOutOfRange(u64),
    #[error("vCPU count {0} is out of range: use 1..={MAX_VCPUS}")]
    VcpusOutOfRange(u64),
}

/// Guest memory size, a whole number of MiB within [`MIN_MEM_MIB`, `MAX_MEM_MIB`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSize(u64);

impl MemSize {
    pub fn from_mib(mib: u64) -> Result<Self, ConfigError> {
        if (MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
            Ok(Self(mib))
        } else {
            Err(ConfigError::MemOutOfRange(mib))
        }
    }
    pub fn mib(self) -> u64 {
        self.0
    }
    pub fn bytes(self) -> u64 {
        self.0 << 20
    }
}

impl fmt::Display for MemSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB", self.0)
    }
}

/// Number of vCPUs, 1..=[`MAX_VCPUS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuCount(u8);

impl VcpuCount {
    pub fn new(n: u64) -> Result<Self, ConfigError> {
        match u8::try_from(n) {
            Ok(v) if (1..=MAX_VCPUS).contains(&v) => Ok(Self(v)),
            _ => Err(ConfigError::VcpusOutOfRange(n)),
        }
    }
    pub fn get(self) -> u8 {
        self.0
    }
}

/// The shape of one machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineConfig {
    pub mem: MemSize,
    pub vcpus: VcpuCount,
}

impl MachineConfig {
    pub fn new(mem_mib: u64, vcpus: u64) -> Result<Self, ConfigError> {
        Ok(Self {
            mem: MemSize::from_mib(mem_mib)?,
            vcpus: VcpuCount::new(vcpus)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_sane_shapes() {
        let c = MachineConfig::new(256, 2).unwrap();
        assert_eq!(c.mem.bytes(), 256 << 20);
        assert_eq!(c.vcpus.get(), 2);
    }

    #[test]
    fn rejects_absurd_shapes_with_the_allowed_range() {
        assert_eq!(MemSize::from_mib(0), Err(ConfigError::MemOutOfRange(0)));
        assert_eq!(
            MemSize::from_mib(1 << 40),
            Err(ConfigError::MemOutOfRange(1 << 40))
        );
        assert_eq!(VcpuCount::new(0), Err(ConfigError::VcpusOutOfRange(0)));
        assert_eq!(VcpuCount::new(300), Err(ConfigError::VcpusOutOfRange(300)));
        let msg = VcpuCount::new(33).unwrap_err().to_string();
        assert!(msg.contains("1..=32"), "{msg}");
    }
}
