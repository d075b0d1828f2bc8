//! The network device against a hostile driver: TX and RX descriptor chains from fuzz
//! input (the NIC is unplugged, so frames are parsed and dropped, never sent).
#![no_main]

#[path = "queues.rs"]
mod queues;

use std::sync::{Arc, Mutex, OnceLock};

use cleave_agent::devices::virtio::net::{Net, NetBackend};
use cleave_agent::devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use libfuzzer_sys::fuzz_target;

fn device() -> &'static Mutex<Net> {
    static DEV: OnceLock<Mutex<Net>> = OnceLock::new();
    DEV.get_or_init(|| {
        let interrupt = Arc::new(Interrupt::new(None, 0).expect("an eventfd"));
        Mutex::new(
            Net::new([0x02, 0, 0, 0, 0, 1], interrupt, NetBackend::Disconnected)
                .expect("the net device"),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(g) = queues::guest(data, 2) else {
        return;
    };
    let mut dev = device().lock().unwrap_or_else(|p| p.into_inner());
    if dev.activate(g.mem, VIRTIO_F_VERSION_1, g.queues).is_ok() {
        dev.process_tx();
        dev.process_rx();
    }
    dev.reset();
});
