//! Facts about the host this agent runs on.

pub mod entropy;
pub mod fingerprint;
pub mod kvm;
pub mod memory;
pub mod paths;
