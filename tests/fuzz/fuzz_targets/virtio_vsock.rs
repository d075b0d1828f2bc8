//! The vsock device against a hostile driver: descriptor chains and packets from fuzz
//! input, processed as the event loop would (TX, then RX, then the event queue).
#![no_main]

#[path = "queues.rs"]
mod queues;

use std::sync::{Arc, Mutex, OnceLock};

use cleave_agent::devices::virtio::vsock::{Vsock, VsockConfig};
use cleave_agent::devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use libfuzzer_sys::fuzz_target;

fn device() -> &'static Mutex<Vsock> {
    static DEV: OnceLock<Mutex<Vsock>> = OnceLock::new();
    DEV.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cleave-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let interrupt = Arc::new(Interrupt::new(None, 0).expect("an eventfd"));
        let config = VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("v.sock"),
            peer_uid: None,
        };
        Mutex::new(Vsock::new(&config, interrupt).expect("the vsock device"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(g) = queues::guest(data, 3) else {
        return;
    };
    let mut dev = device().lock().unwrap_or_else(|p| p.into_inner());
    if dev.activate(g.mem, VIRTIO_F_VERSION_1, g.queues).is_ok() {
        dev.process_tx();
        dev.process_rx();
        dev.process_event_queue();
    }
    dev.reset();
});
