//! The one lock helper every Faultline thread uses.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, carrying on if a thread panicked while holding it. Faultline keeps every critical
/// section to updates that leave the data consistent at each step, so a poisoned lock holds
/// data as good as any other; refusing it would turn one thread's panic into every thread's.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
