//! VMM tests that need only KVM ioctls: VM and vCPU setup, state round trips, and a tiny
//! hand-made long-mode guest doing port I/O, MMIO and hlt. They run on any /dev/kvm,
//! including this project's kvm_pvm development hosts (where a Linux guest cannot run).

use std::time::Duration;

use cleave_agent::devices::serial::console::Console;
use cleave_agent::devices::GuestEnd;
use cleave_agent::host::kvm::KvmFlavour;
use cleave_agent::vmm::config::MachineConfig;
use cleave_agent::vmm::{self, tiny, Irqchip, Vm};

/// /dev/kvm with its ioctls: these tests fail (not skip) on a host without it.
fn kvm() -> kvm_ioctls::Kvm {
    assert!(
        KvmFlavour::detect().has_ioctls(),
        "these tests need /dev/kvm (KVM ioctls); run them on a KVM host"
    );
    vmm::open_kvm().expect("open /dev/kvm")
}

fn tiny_vm(kvm: &kvm_ioctls::Kvm, irqchip: Irqchip, ending: tiny::Ending) -> (Console, Vm) {
    let (console, writer) = Console::new(None, Some("hi"));
    let machine = MachineConfig::new(32, 1).unwrap();
    let vm = Vm::create(kvm, machine, irqchip, Box::new(writer)).unwrap();
    tiny::load(vm.ram().memory(), ending).unwrap();
    vm.vcpus()[0]
        .configure_cpu(vm.supported_cpuid(), 1)
        .unwrap();
    tiny::setup_vcpu(&vm.vcpus()[0]).unwrap();
    (console, vm)
}

#[test]
fn tiny_guest_does_port_io_and_mmio_then_reports_its_status() {
    let kvm = kvm();
    let (console, vm) = tiny_vm(&kvm, Irqchip::InKernel, tiny::Ending::Exit(42));
    let running = vm.start().unwrap();
    let end = running.wait(Some(Duration::from_secs(30)));
    let exits = running.exits();
    running.stop();
    assert_eq!(end, Some(GuestEnd::Exited { status: 42 }));
    // "hi\n" then the byte the unclaimed MMIO read returned (floating bus: 0xff).
    assert_eq!(console.tail().as_bytes(), "hi\n\u{fffd}".as_bytes());
    assert!(exits.mmio_read >= 1 && exits.mmio_write >= 1, "{exits:?}");
    assert!(exits.io_out >= 5, "{exits:?}");
}

#[test]
fn tiny_guest_hlt_exits_to_the_vmm_without_an_irqchip() {
    let kvm = kvm();
    let (console, vm) = tiny_vm(&kvm, Irqchip::None, tiny::Ending::Halt);
    let running = vm.start().unwrap();
    let end = running.wait(Some(Duration::from_secs(30)));
    running.stop();
    assert_eq!(end, Some(GuestEnd::Halted));
    assert!(console.tail().starts_with("hi\n"));
}

#[test]
fn a_halted_guest_with_an_irqchip_is_stopped_by_the_host() {
    let kvm = kvm();
    let (console, vm) = tiny_vm(&kvm, Irqchip::InKernel, tiny::Ending::Halt);
    let running = vm.start().unwrap();
    // The guest halts in the kernel (no exit to us); wait until it has printed, then stop.
    console
        .wait_for_line(Duration::from_secs(30))
        .expect("tiny guest printed hi");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        running.wait(Some(Duration::ZERO)),
        None,
        "still running, halted"
    );
    let (end, vm) = running.stop_and_keep();
    assert_eq!(end, GuestEnd::Stopped);
    assert_eq!(vm.vcpus().len(), 1, "the vCPU came back from its thread");
    let regs = vm.vcpus()[0].fd().get_regs().unwrap();
    // rip is past the hlt at the end of the program.
    let end_of_code = tiny::CODE_START + tiny::program(tiny::Ending::Halt).len() as u64;
    assert_eq!(regs.rip, end_of_code);
}

#[test]
fn vcpu_and_vm_state_round_trips() {
    let kvm = kvm();
    let machine = MachineConfig::new(32, 2).unwrap();
    let vm = Vm::create(&kvm, machine, Irqchip::InKernel, Box::new(std::io::sink())).unwrap();
    for vcpu in vm.vcpus() {
        vcpu.configure_cpu(vm.supported_cpuid(), 2).unwrap();
        tiny::setup_vcpu(vcpu).unwrap();
        let fd = vcpu.fd();
        let mut regs = fd.get_regs().unwrap();
        regs.rax = 0x1234_5678_9abc_def0;
        regs.r15 = u64::from(vcpu.index());
        fd.set_regs(&regs).unwrap();
        assert_eq!(fd.get_regs().unwrap(), regs);
        let sregs = fd.get_sregs().unwrap();
        assert_eq!(sregs.cr3, 0x9000);
        fd.set_sregs(&sregs).unwrap();
        assert_eq!(fd.get_sregs().unwrap().efer, sregs.efer);
        let lapic = fd.get_lapic().unwrap();
        fd.set_lapic(&lapic).unwrap();
        assert_eq!(fd.get_lapic().unwrap().regs[..0x100], lapic.regs[..0x100]);
        let mp = fd.get_mp_state().unwrap();
        fd.set_mp_state(mp).unwrap();
    }
    // The APIC ID each vCPU got through CPUID matches its index.
    let fd = vm.fd();
    let pit = fd.get_pit2().unwrap();
    fd.set_pit2(&pit).unwrap();
    let clock = fd.get_clock().unwrap();
    fd.set_clock(&kvm_bindings::kvm_clock_data {
        clock: clock.clock,
        ..Default::default()
    })
    .unwrap();
    for chip in [
        kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
        kvm_bindings::KVM_IRQCHIP_PIC_SLAVE,
        kvm_bindings::KVM_IRQCHIP_IOAPIC,
    ] {
        let mut state = kvm_bindings::kvm_irqchip {
            chip_id: chip,
            ..Default::default()
        };
        fd.get_irqchip(&mut state).unwrap();
        fd.set_irqchip(&state).unwrap();
    }
}
