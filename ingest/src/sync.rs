//! Locking the small shared states of the pipeline's processes.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, also after a task panicked while holding it: every state kept behind
/// one of these is updated by a single assignment, insert, clear or retain, so a holder
/// that panicked left it whole.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
