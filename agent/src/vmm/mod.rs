//! Our VMM: a KVM VM built from guest memory, vCPUs and devices, booted in one straight
//! sequence ([`boot_linux`]) and run with one thread per vCPU.

pub mod agent_vm;
pub mod boot;
pub mod config;
pub mod control;
pub mod event_loop;
pub mod layout;
pub mod memory;
pub mod mmio;
pub mod mptable;
pub mod runtime_dir;
pub mod seccomp;
pub mod threads;
#[cfg(any(test, feature = "testutil"))]
pub mod tiny;
pub mod vcpu;

use crate::sync::lock;
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::serial::{ConsoleOut, Serial, SerialError};
use crate::devices::virtio::mmio::{MmioError, MmioState, MmioTransport, SavedVirtio};
use crate::devices::virtio::net::device::NetError;
use crate::devices::virtio::net::{Net, NetBackend, SavedNet};
use crate::devices::virtio::rng::{Rng, RngError, SavedRng};
use crate::devices::virtio::vsock::device::VsockError;
use crate::devices::virtio::vsock::{SavedVsock, Vsock, VsockConfig};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::Persist;
use crate::devices::{GuestEnd, LegacyDevices};
use config::MachineConfig;
use control::{ExitCounts, RunControl};
use event_loop::{EventLoop, Subscriber};
use memory::{GuestRam, MemoryError};
use mmio::{MmioBus, MmioSlot};
use threads::{ParkedThread, ThreadError, VmThreads};
use vcpu::{Vcpu, VcpuError};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("opening /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("{op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Rng(#[from] RngError),
    #[error(transparent)]
    Mmio(#[from] MmioError),
    #[error("the guest memory given has {ram} bytes; the machine has {machine}")]
    RamSize { ram: u64, machine: u64 },
    #[error("wiring a virtio interrupt to IRQ {irq}: {source}")]
    VirtioIrq { irq: u32, source: std::io::Error },
    #[error("no room for another virtio device (IRQs 5..=23 are all in use)")]
    NoMmioSlot,
    #[error(
        "restoring the {device} device: it was at {saved_base:#x} on IRQ {saved_irq}, but the \
         next free slot is {base:#x} on IRQ {irq}"
    )]
    SlotMismatch {
        device: &'static str,
        saved_base: u64,
        saved_irq: u32,
        base: u64,
        irq: u32,
    },
    #[error("starting the device event loop: {0}")]
    EventLoop(std::io::Error),
    #[error("starting the VM's threads: {0}")]
    Threads(#[from] ThreadError),
}

/// One KVM call that failed, by name.
#[derive(Debug, thiserror::Error)]
#[error("{op} failed: {source}")]
pub struct KvmCallError {
    pub op: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

impl From<KvmCallError> for VmmError {
    fn from(e: KvmCallError) -> Self {
        VmmError::Kvm {
            op: e.op,
            source: e.source,
        }
    }
}

fn call(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> KvmCallError {
    move |source| KvmCallError { op, source }
}

// The platform steps every VM takes, in this order: `create_vm_fd`, register guest
// memory, `create_irqchip`, and `create_pit` for a VM that boots (a fork has no PIT: see
// fork/restore.rs).

/// A new KVM VM with KVM's TSS placed (Intel needs it before any vCPU runs).
pub fn create_vm_fd(kvm: &Kvm) -> Result<VmFd, KvmCallError> {
    let fd = kvm.create_vm().map_err(call("KVM_CREATE_VM"))?;
    fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(call("KVM_SET_TSS_ADDR"))?;
    Ok(fd)
}

/// The in-kernel PIC, IO-APIC and LAPICs. Register guest memory first: a memory slot
/// registered after KVM_CREATE_IRQCHIP costs ~100x more (7.4 ms against 0.06 ms).
pub fn create_irqchip(fd: &VmFd) -> Result<(), KvmCallError> {
    fd.create_irq_chip().map_err(call("KVM_CREATE_IRQCHIP"))
}

/// The in-kernel PIT, with the PC speaker port answered by KVM as a dummy.
pub fn create_pit(fd: &VmFd) -> Result<(), KvmCallError> {
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).map_err(call("KVM_CREATE_PIT2"))
}

/// Opens /dev/kvm.
pub fn open_kvm() -> Result<Kvm, VmmError> {
    Kvm::new().map_err(VmmError::OpenKvm)
}

/// Whether the VM gets the in-kernel interrupt controllers (PIC, IO-APIC, LAPIC) and PIT.
/// Linux guests need them; the ioctl-level tests also run without, to see `hlt` exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Irqchip {
    InKernel,
    /// For those tests only (`testutil`).
    #[cfg(any(test, feature = "testutil"))]
    None,
}

/// A virtio device, its transport, and where the guest finds them.
struct Placed<D> {
    device: Arc<Mutex<D>>,
    transport: Arc<Mutex<MmioTransport>>,
    slot: MmioSlot,
}

impl<D: Persist> Placed<D> {
    /// The device, its transport and its place, as one saved value.
    fn saved(&self) -> SavedVirtio<D::State> {
        SavedVirtio {
            base: self.slot.base,
            irq: self.slot.irq,
            transport: lock(&self.transport).state(),
            device: lock(&self.device).state(),
        }
    }
}

/// A VM that has not started running.
pub struct Vm {
    // Drop order: vCPUs, then the VM, then the memory KVM was pointed at.
    vcpus: Vec<Vcpu>,
    fd: VmFd,
    ram: GuestRam,
    devices: Arc<Mutex<LegacyDevices>>,
    mmio: MmioBus,
    /// What the event loop drives (the virtio devices).
    subscribers: Vec<Subscriber>,
    /// `virtio_mmio.device=` arguments announcing the devices to the guest kernel.
    device_args: Vec<String>,
    vsock: Option<Placed<Vsock>>,
    net: Option<Placed<Net>>,
    rng: Option<Placed<Rng>>,
    supported_cpuid: CpuId,
    machine: MachineConfig,
}

impl Vm {
    /// The VM shell: memory, interrupt controllers and PIT, COM1, and unconfigured vCPUs.
    pub fn create(
        kvm: &Kvm,
        machine: MachineConfig,
        irqchip: Irqchip,
        console: ConsoleOut,
    ) -> Result<Vm, VmmError> {
        Self::create_on(
            kvm,
            machine,
            GuestRam::create(machine.mem)?,
            irqchip,
            console,
        )
    }

    /// [`create`](Self::create) with guest memory the caller made (e.g. before jailing
    /// itself, where a file can no longer be sized); it must be `machine`'s size.
    pub fn create_on(
        kvm: &Kvm,
        machine: MachineConfig,
        ram: GuestRam,
        irqchip: Irqchip,
        console: ConsoleOut,
    ) -> Result<Vm, VmmError> {
        if ram.size() != machine.mem.bytes() {
            return Err(VmmError::RamSize {
                ram: ram.size(),
                machine: machine.mem.bytes(),
            });
        }
        let fd = create_vm_fd(kvm)?;
        ram.register(&fd)?;
        if irqchip == Irqchip::InKernel {
            create_irqchip(&fd)?;
            create_pit(&fd)?;
        }
        let serial = Serial::new(console, (irqchip == Irqchip::InKernel).then_some(&fd))?;
        let mut supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(call("KVM_GET_SUPPORTED_CPUID"))?;
        // KVM emulates the TSC-deadline timer in its LAPIC but leaves it to userspace to
        // offer. Without it a Linux guest calibrates its LAPIC timer against the PIT, and
        // on a loaded host that calibration fails and leaves the guest on the PIT, which
        // its forks do not have.
        if irqchip == Irqchip::InKernel && kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
            vcpu::cpuid::offer_tsc_deadline(&mut supported_cpuid);
        }
        let vcpus = (0..machine.vcpus.get())
            .map(|i| Vcpu::create(&fd, i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Vm {
            vcpus,
            fd,
            ram,
            devices: Arc::new(Mutex::new(LegacyDevices::new(serial))),
            mmio: MmioBus::default(),
            subscribers: Vec::new(),
            device_args: Vec::new(),
            vsock: None,
            net: None,
            rng: None,
            supported_cpuid,
            machine,
        })
    }

    /// A VM from parts built elsewhere: a fork restored from a template (`fork::restore`)
    /// has its VM fd, private memory, restored vCPUs and devices, and no virtio devices yet.
    pub fn from_parts(
        fd: VmFd,
        ram: GuestRam,
        vcpus: Vec<Vcpu>,
        devices: LegacyDevices,
        cpuid: CpuId,
        machine: MachineConfig,
    ) -> Vm {
        Vm {
            vcpus,
            fd,
            ram,
            devices: Arc::new(Mutex::new(devices)),
            mmio: MmioBus::default(),
            subscribers: Vec::new(),
            device_args: Vec::new(),
            vsock: None,
            net: None,
            rng: None,
            supported_cpuid: cpuid,
            machine,
        }
    }

    /// Adds a virtio-vsock device: its MMIO window and IRQ, the irqfd, one ioeventfd per
    /// queue, and the VM's Unix socket. Call before [`load_linux`](Self::load_linux), which
    /// announces it on the command line.
    pub fn add_vsock(&mut self, config: &VsockConfig) -> Result<(), VmmError> {
        let slot = self.mmio.next_slot().ok_or(VmmError::NoMmioSlot)?;
        let vsock = Vsock::new(config, self.virtio_interrupt(slot)?)?;
        self.vsock = Some(self.attach(slot, vsock, None)?);
        Ok(())
    }

    /// Puts back a vsock device as a template left it (a fork), on its own socket
    /// (`config`), at the address and IRQ the guest already knows. It has no connections;
    /// call [`Vsock::send_transport_reset`] before the fork runs so the guest drops its own.
    pub fn restore_vsock(
        &mut self,
        config: &VsockConfig,
        saved: &SavedVsock,
    ) -> Result<(), VmmError> {
        let slot = self.saved_slot("vsock", saved.base, saved.irq)?;
        let vsock = Vsock::restore((config, self.virtio_interrupt(slot)?), &saved.device)?;
        self.vsock = Some(self.attach(slot, vsock, Some(&saved.transport))?);
        Ok(())
    }

    /// Adds a virtio-net device with MAC `mac` on `backend`. Like
    /// [`add_vsock`](Self::add_vsock), call before [`load_linux`](Self::load_linux).
    pub fn add_net(&mut self, mac: [u8; 6], backend: NetBackend) -> Result<(), VmmError> {
        let slot = self.mmio.next_slot().ok_or(VmmError::NoMmioSlot)?;
        let net = Net::new(mac, self.virtio_interrupt(slot)?, backend)?;
        self.net = Some(self.attach(slot, net, None)?);
        Ok(())
    }

    /// Puts back a network device as a template left it (a fork), on the fork's own
    /// `backend`, at the address and IRQ the guest already knows.
    pub fn restore_net(&mut self, backend: NetBackend, saved: &SavedNet) -> Result<(), VmmError> {
        let slot = self.saved_slot("net", saved.base, saved.irq)?;
        let net = Net::restore((backend, self.virtio_interrupt(slot)?), &saved.device)?;
        self.net = Some(self.attach(slot, net, Some(&saved.transport))?);
        Ok(())
    }

    /// Adds a virtio-rng device (the guest's entropy from the host's). Like
    /// [`add_vsock`](Self::add_vsock), call before [`load_linux`](Self::load_linux).
    pub fn add_rng(&mut self) -> Result<(), VmmError> {
        let slot = self.mmio.next_slot().ok_or(VmmError::NoMmioSlot)?;
        let rng = Rng::new(self.virtio_interrupt(slot)?)?;
        self.rng = Some(self.attach(slot, rng, None)?);
        Ok(())
    }

    /// Puts back an entropy device as a template left it (a fork), at the address and IRQ
    /// the guest already knows; a request the template left waiting is served with this
    /// fork's own bytes.
    pub fn restore_rng(&mut self, saved: &SavedRng) -> Result<(), VmmError> {
        let slot = self.saved_slot("rng", saved.base, saved.irq)?;
        let rng = Rng::restore(self.virtio_interrupt(slot)?, &saved.device)?;
        self.rng = Some(self.attach(slot, rng, Some(&saved.transport))?);
        Ok(())
    }

    /// Puts `device` behind a transport at `slot`: a new one (announced on the kernel
    /// command line), or the one a template saved (`saved`: the guest already knows it).
    fn attach<D>(
        &mut self,
        slot: MmioSlot,
        device: D,
        saved: Option<&MmioState>,
    ) -> Result<Placed<D>, VmmError>
    where
        D: VirtioDevice + event_manager::MutEventSubscriber + Send + 'static,
    {
        let device = Arc::new(Mutex::new(device));
        let mem = self.ram.memory().clone();
        let transport = match saved {
            Some(state) => MmioTransport::restore((device.clone(), mem), state)?,
            None => {
                self.device_args
                    .push(MmioTransport::cmdline_arg(slot.base, slot.irq));
                MmioTransport::new(device.clone(), mem)?
            }
        };
        self.place(slot, device, transport)
    }

    /// The next slot, which must be where a saved device was (devices are restored in the
    /// order they were added).
    fn saved_slot(&self, device: &'static str, base: u64, irq: u32) -> Result<MmioSlot, VmmError> {
        let slot = self.mmio.next_slot().ok_or(VmmError::NoMmioSlot)?;
        if (slot.base, slot.irq) != (base, irq) {
            return Err(VmmError::SlotMismatch {
                device,
                saved_base: base,
                saved_irq: irq,
                base: slot.base,
                irq: slot.irq,
            });
        }
        Ok(slot)
    }

    fn virtio_interrupt(&self, slot: MmioSlot) -> Result<Arc<Interrupt>, VmmError> {
        Interrupt::new(Some(&self.fd), slot.irq)
            .map(Arc::new)
            .map_err(|source| VmmError::VirtioIrq {
                irq: slot.irq,
                source,
            })
    }

    /// Wires a device's queue notifications and puts it on the bus and event loop.
    fn place<D>(
        &mut self,
        slot: MmioSlot,
        device: Arc<Mutex<D>>,
        transport: MmioTransport,
    ) -> Result<Placed<D>, VmmError>
    where
        D: event_manager::MutEventSubscriber + Send + 'static,
    {
        transport.register_ioevents(&self.fd, slot.base)?;
        let transport = Arc::new(Mutex::new(transport));
        self.mmio.push(transport.clone());
        self.subscribers.push(device.clone());
        Ok(Placed {
            device,
            transport,
            slot,
        })
    }

    /// The vsock device's state with its transport's (a stopped VM being captured).
    pub fn vsock_state(&self) -> Option<SavedVsock> {
        self.vsock.as_ref().map(Placed::saved)
    }

    /// The network device's state with its transport's (a stopped VM being captured).
    pub fn net_state(&self) -> Option<SavedNet> {
        self.net.as_ref().map(Placed::saved)
    }

    /// The entropy device's state with its transport's (a stopped VM being captured).
    pub fn rng_state(&self) -> Option<SavedRng> {
        self.rng.as_ref().map(Placed::saved)
    }

    /// The entropy device, if the VM has one.
    pub fn rng(&self) -> Option<&Arc<Mutex<Rng>>> {
        self.rng.as_ref().map(|r| &r.device)
    }

    /// Loads a Linux kernel and initramfs for the PVH entry and configures every vCPU.
    pub fn load_linux(
        &mut self,
        kernel: &[u8],
        initrd: &[u8],
        cmdline: &str,
    ) -> Result<(), VmmError> {
        let mut cmdline = cmdline.to_string();
        for arg in &self.device_args {
            cmdline.push(' ');
            cmdline.push_str(arg);
        }
        let cmdline = boot::cmdline(&cmdline)?;
        let count = self.machine.vcpus.get();
        let entry = boot::load(
            self.ram.memory(),
            self.ram.size(),
            kernel,
            initrd,
            &cmdline,
            count,
        )?;
        for vcpu in &self.vcpus {
            vcpu.configure_linux(&self.supported_cpuid, count, self.ram.memory(), &entry)?;
        }
        Ok(())
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }
    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }
    /// The vCPUs, mutably (capture runs each once with `immediate_exit` set).
    pub fn vcpus_mut(&mut self) -> &mut [Vcpu] {
        &mut self.vcpus
    }
    pub fn devices(&self) -> &Arc<Mutex<LegacyDevices>> {
        &self.devices
    }
    pub fn machine(&self) -> MachineConfig {
        self.machine
    }
    /// The vsock device, if the VM has one (for a transport reset after a fork).
    pub fn vsock(&self) -> Option<&Arc<Mutex<Vsock>>> {
        self.vsock.as_ref().map(|v| &v.device)
    }
    /// The network device, if the VM has one.
    pub fn net(&self) -> Option<&Arc<Mutex<Net>>> {
        self.net.as_ref().map(|n| &n.device)
    }

    /// Starts the device event loop (if there are devices) and one thread per vCPU.
    pub fn start(self) -> Result<RunningVm, VmmError> {
        self.start_confined(None)
    }

    /// [`start`](Self::start), each thread confined to its kind's seccomp filter before
    /// it does any work for the guest. A thread that cannot confine itself is an error,
    /// and the guest does not run.
    pub fn start_confined(
        self,
        filters: Option<Arc<seccomp::Filters>>,
    ) -> Result<RunningVm, VmmError> {
        let threads = VmThreads::park(
            self.machine.vcpus.get(),
            !self.subscribers.is_empty(),
            filters.as_ref(),
        )?;
        Ok(self.arm(threads)?.start())
    }

    /// Readies the VM to run on `threads`, parked ahead ([`VmThreads::park`]) for this
    /// VM's vCPU count: the device event loop runs on its thread (a VM without devices
    /// leaves that one to end unused); each vCPU is handed to its thread by
    /// [`ArmedVm::start`], which cannot fail. A fork worker answers `ready` in between, so
    /// the vCPU it wakes cannot delay the answer by taking its CPU.
    pub fn arm(mut self, threads: VmThreads) -> Result<ArmedVm, VmmError> {
        let VmThreads {
            vcpus: parked,
            events,
        } = threads;
        if parked.len() != self.vcpus.len() {
            return Err(ThreadError::Count {
                vcpus: self.vcpus.len(),
                parked: parked.len(),
            }
            .into());
        }
        install_kick_handler();
        let control = Arc::new(RunControl::default());
        if let Some(vsock) = &self.vsock {
            // A guest that dies without resetting its devices (a panic, a triple fault)
            // must still close every host connection: nothing else would wake the loop.
            match crate::sync::lock(&vsock.device).end_event() {
                Ok(evt) => control.wake_on_guest_end(evt),
                Err(e) => return Err(VmmError::EventLoop(e)),
            }
        }
        let event_loop = match (self.subscribers.is_empty(), events) {
            (true, _) => None,
            (false, Some(thread)) => Some(
                EventLoop::start_on(thread, self.subscribers.clone())
                    .map_err(VmmError::EventLoop)?,
            ),
            (false, None) => return Err(ThreadError::NoEvents.into()),
        };
        let mmio = Arc::new(std::mem::take(&mut self.mmio));
        let vcpus = std::mem::take(&mut self.vcpus)
            .into_iter()
            .zip(parked)
            .map(|(vcpu, thread)| {
                let devices = self.devices.clone();
                let mmio = mmio.clone();
                let ctl = control.clone();
                let job: VcpuJob = Box::new(move || vcpu.run(devices, mmio, ctl));
                (thread, job)
            })
            .collect();
        Ok(ArmedVm {
            vcpus,
            control,
            event_loop,
            vm: self,
        })
    }
}

/// A vCPU's run, handed to its parked thread.
type VcpuJob = Box<dyn FnOnce() -> Vcpu + Send>;

/// A VM whose every thread waits and whose devices run: [`start`](Self::start) hands
/// each vCPU to its thread. Dropped instead, its threads end and the guest never runs.
pub struct ArmedVm {
    // Drop order: the vCPUs (with their fds) and their threads before the VM.
    vcpus: Vec<(ParkedThread<Vcpu>, VcpuJob)>,
    control: Arc<RunControl>,
    event_loop: Option<EventLoop>,
    vm: Vm,
}

impl ArmedVm {
    /// Runs every vCPU on its thread.
    pub fn start(self) -> RunningVm {
        let threads = self
            .vcpus
            .into_iter()
            .map(|(thread, job)| thread.run(job))
            .collect();
        RunningVm {
            control: self.control,
            threads,
            vm: Some(self.vm),
            event_loop: self.event_loop,
            started: Instant::now(),
        }
    }
}

/// The virtio devices a booted VM gets, in the order the guest sees them.
#[derive(Debug, Default)]
pub struct BootDevices<'a> {
    pub vsock: Option<&'a VsockConfig>,
    /// A NIC on this backend.
    pub net: Option<NetBackend>,
    /// The guest memory, when the caller made it ([`Vm::create_on`]); `None`: a fresh
    /// memfd.
    pub ram: Option<GuestRam>,
    /// Each vCPU and the event loop confine themselves to their kind's filter as they
    /// start ([`Vm::start_confined`]).
    pub filters: Option<Arc<seccomp::Filters>>,
}

/// Loads and starts a Linux guest: the whole boot, top to bottom.
pub fn boot_linux(
    kvm: &Kvm,
    machine: MachineConfig,
    kernel: &[u8],
    initrd: &[u8],
    cmdline: &str,
    console: ConsoleOut,
    devices: BootDevices<'_>,
) -> Result<RunningVm, VmmError> {
    build_linux(kvm, machine, console, devices)?.boot(kernel, initrd, cmdline)
}

/// Builds a Linux guest's VM (memory, irqchip, vCPUs, devices) with nothing in it: no
/// kernel is loaded and nothing runs until [`LinuxShell::boot`]. So it may be built while
/// the image's pins are still being checked (`cleave boot` does).
pub fn build_linux(
    kvm: &Kvm,
    machine: MachineConfig,
    console: ConsoleOut,
    devices: BootDevices<'_>,
) -> Result<LinuxShell, VmmError> {
    let BootDevices {
        vsock,
        net,
        ram,
        filters,
    } = devices;
    tracing::info!(mem = %machine.mem, vcpus = machine.vcpus.get(), "creating VM");
    let t = Instant::now();
    let ram = match ram {
        Some(ram) => ram,
        None => GuestRam::create(machine.mem)?,
    };
    let mut vm = Vm::create_on(kvm, machine, ram, Irqchip::InKernel, console)?;
    // The order is the guest's view (MMIO windows and IRQs): vsock, the NIC, entropy.
    if let Some(config) = vsock {
        vm.add_vsock(config)?;
    }
    if let Some(backend) = net {
        vm.add_net(crate::devices::virtio::net::GUEST_MAC, backend)?;
    }
    vm.add_rng()?;
    tracing::info!(create_ms = t.elapsed().as_secs_f64() * 1e3, "VM built");
    Ok(LinuxShell { vm, filters })
}

/// A VM built for a Linux guest and not yet loaded ([`build_linux`]).
pub struct LinuxShell {
    vm: Vm,
    filters: Option<Arc<seccomp::Filters>>,
}

impl LinuxShell {
    /// Loads the kernel, initramfs and command line and starts the vCPUs.
    pub fn boot(
        mut self,
        kernel: &[u8],
        initrd: &[u8],
        cmdline: &str,
    ) -> Result<RunningVm, VmmError> {
        let t = Instant::now();
        self.vm.load_linux(kernel, initrd, cmdline)?;
        tracing::info!(load_ms = t.elapsed().as_secs_f64() * 1e3, "starting guest");
        self.vm.start_confined(self.filters)
    }
}

/// A VM whose vCPUs are running.
pub struct RunningVm {
    control: Arc<RunControl>,
    threads: Vec<JoinHandle<Option<Vcpu>>>,
    /// `None` only after [`RunningVm::stop_and_keep`] handed it out.
    vm: Option<Vm>,
    /// Device work; stopped after the vCPUs.
    event_loop: Option<EventLoop>,
    started: Instant,
}

/// Bound on how long stopping may take before we report a stuck vCPU.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

impl RunningVm {
    /// Waits for the guest to end (or `timeout`).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<GuestEnd> {
        self.control.wait(timeout)
    }

    pub fn exits(&self) -> ExitCounts {
        self.control.stats.snapshot()
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// The vsock device, if the VM has one.
    pub fn vsock(&self) -> Option<&Arc<Mutex<Vsock>>> {
        self.vm.as_ref().and_then(Vm::vsock)
    }

    /// The network device, if the VM has one.
    pub fn net(&self) -> Option<&Arc<Mutex<Net>>> {
        self.vm.as_ref().and_then(Vm::net)
    }

    /// Stops every vCPU (the guest may already have ended) and returns why the VM ended.
    pub fn stop(self) -> GuestEnd {
        self.stop_and_keep().0
    }

    /// Like [`stop`](Self::stop), but hands back the stopped VM (with its vCPUs) for
    /// inspection.
    pub fn stop_and_keep(mut self) -> (GuestEnd, Vm) {
        self.control.end(GuestEnd::Stopped);
        self.join_all();
        if let Some(mut l) = self.event_loop.take() {
            l.stop();
        }
        let end = self
            .control
            .wait(Some(Duration::ZERO))
            .unwrap_or(GuestEnd::Stopped);
        let vm = self.vm.take().expect("the VM is only taken here, once");
        (end, vm)
    }

    /// Kicks each vCPU out of KVM_RUN until its thread has returned.
    fn join_all(&mut self) {
        let deadline = Instant::now() + STOP_TIMEOUT;
        for t in std::mem::take(&mut self.threads) {
            while !t.is_finished() && Instant::now() < deadline {
                // A kick that lands before the thread re-checks the stop flag is lost, so
                // keep kicking until it returns.
                let _ = t.kill(kick_signal());
                std::thread::sleep(Duration::from_micros(200));
            }
            if !t.is_finished() {
                // Leaking the thread (and so its VM) beats tearing memory out from under it.
                tracing::error!(thread = ?t.thread().name(), "vCPU thread did not stop");
                std::mem::forget(self.vm.take());
                continue;
            }
            if let (Ok(Some(vcpu)), Some(vm)) = (t.join(), self.vm.as_mut()) {
                vm.vcpus.push(vcpu);
            }
        }
        if let Some(vm) = self.vm.as_mut() {
            vm.vcpus.sort_by_key(|v| v.index());
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.control.end(GuestEnd::Stopped);
            self.join_all();
        }
    }
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// A no-op handler, so the kick signal interrupts KVM_RUN instead of killing the process.
fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), on_kick) {
            tracing::error!(error = %e, "installing the vCPU kick handler");
        }
    });
}
