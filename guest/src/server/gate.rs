//! The reseed gate, agent-wide: until it is open, exec and file requests
//! are refused with `NotReady`.
//!
//! Which mode to start in is the caller's (the PID-1 main's) choice:
//! - [`GateMode::RequireReseed`] for any boot that will be captured as a
//!   template. The gate then stays closed in the template (nothing but
//!   `hello` and `reseed` is served before capture), and since every fork
//!   resumes from the template's memory, every fork starts closed too and
//!   opens only on its own successful reseed.
//! - [`GateMode::Open`] for a cold boot used directly as one sandbox (no
//!   fork will ever share its CRNG state), e.g. `cleave run` without
//!   `--forks`. Such a guest must never be captured.
//!
//! A successful reseed opens the gate; a failed one closes it (fail closed),
//! whatever the mode.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateMode {
    /// Serve everything from the start (a cold boot used as-is).
    Open,
    /// Serve exec and files only after a successful reseed (templates and
    /// therefore forks).
    RequireReseed,
}

#[derive(Debug)]
pub struct Gate {
    open: AtomicBool,
}

impl Gate {
    pub fn new(mode: GateMode) -> Self {
        Gate {
            open: AtomicBool::new(mode == GateMode::Open),
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }

    /// Records the outcome of a reseed.
    pub fn record(&self, reseeded: bool) {
        self.open.store(reseeded, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_reseed_opens_only_on_success_and_closes_on_failure() {
        let g = Gate::new(GateMode::RequireReseed);
        assert!(!g.is_open());
        g.record(false);
        assert!(!g.is_open());
        g.record(true);
        assert!(g.is_open());
        g.record(false);
        assert!(!g.is_open());
    }

    #[test]
    fn open_mode_starts_open() {
        assert!(Gate::new(GateMode::Open).is_open());
    }
}
