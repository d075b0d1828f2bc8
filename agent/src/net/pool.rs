//! Slots built ahead of time. Building a slot adds chains, and the kernel re-validates the
//! whole table on every commit that adds rules, so its cost grows with the number of
//! sandboxes (measured in docs/PERFORMANCE.md); the pool keeps that off the request
//! path. A sandbox takes a ready slot (or, when none is, builds one), fills in its policy
//! as set elements, and on release hands the slot back reset — or drops it when the pool
//! is full.

use std::sync::Mutex;

use super::slot::{Slot, SlotError};

/// A bounded stock of ready slots.
#[derive(Default)]
pub struct SlotPool {
    ready: Mutex<Vec<Slot>>,
    /// How many slots to keep ready at most.
    capacity: usize,
}

impl SlotPool {
    pub fn new(capacity: usize) -> SlotPool {
        SlotPool {
            ready: Mutex::new(Vec::with_capacity(capacity)),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ready slot, if there is one.
    pub fn take(&self) -> Option<Slot> {
        self.lock().pop()
    }

    /// Adds a built slot; `Err` gives it back when the pool is full.
    pub fn put(&self, slot: Slot) -> Result<(), Box<Slot>> {
        let mut ready = self.lock();
        if ready.len() >= self.capacity {
            return Err(Box::new(slot));
        }
        ready.push(slot);
        Ok(())
    }

    /// Slots ready now.
    pub fn depth(&self) -> usize {
        self.lock().len()
    }

    /// Builds slots until the pool is full (`build` makes one).
    pub fn fill(
        &self,
        mut build: impl FnMut() -> Result<Slot, SlotError>,
    ) -> Result<usize, SlotError> {
        let mut built = 0;
        while self.depth() < self.capacity {
            if self.put(build()?).is_err() {
                break;
            }
            built += 1;
        }
        Ok(built)
    }
}
