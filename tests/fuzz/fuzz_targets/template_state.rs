//! A template's saved state as a worker decodes and checks it before mapping anything
//! (the parent sends it, but a store on disk can be tampered with).
#![no_main]

use cleave_agent::fork::state::MachineState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = serde_json::from_slice::<MachineState>(data) {
        let _ = state.validate();
    }
});
