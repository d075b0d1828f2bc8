//! The entropy device against a hostile driver: requests on its one queue from fuzz
//! input, served from the host and held to the byte budget.
#![no_main]

#[path = "queues.rs"]
mod queues;

use std::sync::{Arc, Mutex, OnceLock};

use cleave_agent::devices::virtio::rng::Rng;
use cleave_agent::devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use libfuzzer_sys::fuzz_target;

fn device() -> &'static Mutex<Rng> {
    static DEV: OnceLock<Mutex<Rng>> = OnceLock::new();
    DEV.get_or_init(|| {
        let interrupt = Arc::new(Interrupt::new(None, 0).expect("an eventfd"));
        Mutex::new(Rng::new(interrupt).expect("the rng device"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(g) = queues::guest(data, 1) else {
        return;
    };
    let mut dev = device().lock().unwrap_or_else(|p| p.into_inner());
    if dev.activate(g.mem, VIRTIO_F_VERSION_1, g.queues).is_ok() {
        dev.process();
    }
    dev.reset();
});
