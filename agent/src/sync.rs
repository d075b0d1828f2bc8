//! Locks that survive a panicking holder: every mutex here guards state that stays
//! consistent between statements, so a poisoned lock is taken as it is rather than
//! turning one thread's panic into every thread's.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poison.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
