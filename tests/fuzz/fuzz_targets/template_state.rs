//! A template's saved state as a worker decodes and checks it before mapping anything
//! (the parent sends it, but a store on disk can be tampered with), and a template
//! worker's answer (the captured state and warm-up output) as the node checks it (a
//! worker a guest escaped into can send anything).
#![no_main]

use cleave_agent::fork::state::MachineState;
use cleave_agent::fork::template_worker::decode_answer;
use cleave_agent::vmm::config::MachineConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = serde_json::from_slice::<MachineState>(data) {
        let _ = state.validate();
    }
    // The seed answer's shape (the tiny guest, 32 MiB, 2 vCPUs).
    let asked = MachineConfig::new(32, 2).expect("a valid shape");
    let _ = decode_answer(data, asked);
});
