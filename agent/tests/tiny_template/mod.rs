//! The tiny counting guest, run for a moment and captured: a template that needs no
//! guest image (for tests of what happens around a fork, not inside a Linux guest).

use std::time::Duration;

use cleave_agent::devices::GuestEnd;
use cleave_agent::fork::{self, Template};
use cleave_agent::vmm::config::MachineConfig;
use cleave_agent::vmm::{self, tiny};

/// Guest memory of [`capture`]'s template.
pub const MEM_MIB: u64 = 32;

/// A 32 MiB, one-vCPU template of the tiny guest counting.
pub fn capture() -> Template {
    let kvm = vmm::open_kvm().expect("these tests need /dev/kvm");
    let vm = tiny::vm(
        &kvm,
        MachineConfig::new(MEM_MIB, 1).unwrap(),
        tiny::Ending::Count,
    )
    .unwrap();
    let running = vm.start().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let (end, vm) = running.stop_and_keep();
    assert_eq!(end, GuestEnd::Stopped);
    fork::capture(&kvm, vm).unwrap()
}
